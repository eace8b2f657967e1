"""Trainer rows built from commonsense questions: SFT, DPO and GRPO (with its reward), and JSONL export."""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .data import LETTERS, MCQuestion
from .formats import CLOZE, LETTERED, PromptFormat, assistant_turn, prompt_messages

# ----------------------------------------------------------------------------------------------------------------
# Trainer rows
# ----------------------------------------------------------------------------------------------------------------


def wrong_option(q: MCQuestion, seed: int = 0) -> int:
    """A deterministic wrong option of ``q`` (seeded by ``seed`` and the question id)."""
    rng = random.Random(f"neuroada-wrong-option-{seed}-{q.uid}")
    return rng.choice([i for i in range(len(q.options)) if i != q.label])


def sft_rows(questions: Iterable[MCQuestion], fmt: PromptFormat = CLOZE) -> list[dict[str, Any]]:
    """Conversational prompt-completion rows for ``SFTTrainer`` (loss on the answer only)."""
    return [{"prompt": prompt_messages(q, fmt), "completion": assistant_turn(fmt.answer_text(q))} for q in questions]


def dpo_rows(questions: Iterable[MCQuestion], fmt: PromptFormat = CLOZE, *, seed: int = 0) -> list[dict[str, Any]]:
    """Constructed preference pairs for ``DPOTrainer``: the correct option chosen, one wrong option rejected.

    These are not human preferences: the pair is built from the answer key, with the wrong
    option drawn by :func:`wrong_option`.
    """
    return [
        {
            "prompt": prompt_messages(q, fmt),
            "chosen": assistant_turn(fmt.answer_text(q)),
            "rejected": assistant_turn(fmt.answer_text(q, wrong_option(q, seed))),
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
