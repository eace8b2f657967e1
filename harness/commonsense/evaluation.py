"""Log-likelihood multiple-choice evaluation, and paired before/after comparison.

:func:`evaluate_multiple_choice` scores all options of a batch of questions with one pass over
the shared chat-template prefix, one over the prompts and one over the candidate answers
(key/value cache reuse), so a few hundred questions take well under a minute on a CPU for a
135M model.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .data import MCQuestion
from .formats import CLOZE, PromptFormat, assistant_turn, prompt_messages


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

    def to_json(self) -> dict[str, Any]:
        """Plain lists and dicts (for ``json.dump``); :meth:`from_json` reads them back."""
        return {
            "uids": self.uids,
            "sources": self.sources,
            "labels": self.labels,
            "predictions": self.predictions,
            "scores": self.scores,
            "per_source": self.per_source,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MCEvaluation:
        return cls(**{key: data[key] for key in ("uids", "sources", "labels", "predictions", "scores")},
                   per_source=dict(data.get("per_source", {})))  # fmt: skip

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
        full = _render(tokenizer, messages + assistant_turn(fmt.answer_text(q, j)), add_generation_prompt=False)
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
