"""Score multiple-choice questions on a served model, the way the adapter was scored, and compare the two.

:func:`score_served` sends every question's prompt + option tokens (the ids
:func:`harness.commonsense.encode_question` gives, as in training and in
:func:`~harness.commonsense.evaluate_multiple_choice`) to the OpenAI ``/v1/completions`` route with
vLLM's ``prompt_logprobs`` extension, and sums each option's token log-probabilities: the same
quantity the in-process evaluation computes, so their predictions must agree except where two
options are nearly tied. :func:`compare` says whether they do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from harness.commonsense import CLOZE, MCEvaluation, MCQuestion, PromptFormat, encode_question
from serving.client import post

__all__ = ["ServedComparison", "compare", "score_served"]


def _option_logprob(choice: dict, prompt_len: int, candidate: Sequence[int]) -> float:
    """Sum of the log-probs vLLM reports for the candidate tokens after a ``prompt_len``-token prompt."""
    entries = choice.get("prompt_logprobs")
    if entries is None:
        raise RuntimeError("the server returned no prompt_logprobs: serve with vLLM (an OpenAI server lacks them)")
    total = 0.0
    for position, token in enumerate(candidate, start=prompt_len):
        entry = entries[position] or {}
        found = entry.get(str(token), entry.get(token))
        if found is None:
            raise RuntimeError(f"prompt_logprobs at position {position} lack the prompt token {token}")
        total += float(found["logprob"])
    return total


def score_served(
    base_url: str,
    model: str,
    tokenizer,
    questions: Sequence[MCQuestion],
    *,
    fmt: PromptFormat = CLOZE,
    length_normalize: bool = False,
    batch_size: int = 32,
) -> MCEvaluation:
    """Multiple-choice scores of the model served at ``base_url`` (an :class:`MCEvaluation`, as in process)."""
    encoded = [encode_question(tokenizer, q, fmt) for q in questions]
    sequences = [(i, prompt, c) for i, (prompt, candidates) in enumerate(encoded) for c in candidates]
    scores: list[list[float]] = [[] for _ in questions]
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        reply = post(
            base_url,
            "completions",
            {
                "model": model,
                "prompt": [prompt + candidate for _, prompt, candidate in chunk],
                "max_tokens": 1,
                "temperature": 0,
                "prompt_logprobs": 0,
            },
            timeout=600,
        )
        choices = sorted(reply["choices"], key=lambda choice: choice["index"])
        for (i, prompt, candidate), choice in zip(chunk, choices, strict=True):
            value = _option_logprob(choice, len(prompt), candidate)
            scores[i].append(value / len(candidate) if length_normalize else value)
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


@dataclass(frozen=True)
class ServedComparison:
    """How the served model's held-out scores relate to the adapter's on the same questions."""

    n: int
    near_ties: int  # questions whose two best options the adapter separates by less than ``tie``
    disagreements: int  # different predictions
    unexplained: int  # different predictions on questions that are not near-ties
    max_score_difference: float  # largest |served - adapter| option log-likelihood, nats
    tie: float

    @property
    def consistent(self) -> bool:
        return self.unexplained == 0

    def summary(self) -> str:
        return (
            f"{self.disagreements} of {self.n} predictions differ ({self.unexplained} outside the {self.near_ties} "
            f"near-ties, margin < {self.tie:g} nats); largest option score difference {self.max_score_difference:.2e}"
        )


def _margin(row: Sequence[float]) -> float:
    best = sorted(row, reverse=True)
    return best[0] - best[1] if len(best) > 1 else float("inf")


def compare(adapter: MCEvaluation, served: MCEvaluation, tie: float = 1e-2) -> ServedComparison:
    """Compare two evaluations of the same questions; predictions may differ only on near-ties."""
    if adapter.uids != served.uids:
        raise ValueError("compare needs the same questions in the same order")
    near = [_margin(a) < tie or _margin(s) < tie for a, s in zip(adapter.scores, served.scores, strict=True)]
    differ = [a != s for a, s in zip(adapter.predictions, served.predictions, strict=True)]
    gap = max(
        (abs(x - y) for a, s in zip(adapter.scores, served.scores, strict=True) for x, y in zip(a, s, strict=True)),
        default=0.0,
    )
    return ServedComparison(
        n=adapter.n,
        near_ties=sum(near),
        disagreements=sum(differ),
        unexplained=sum(d and not t for d, t in zip(differ, near, strict=True)),
        max_score_difference=gap,
        tie=tie,
    )
