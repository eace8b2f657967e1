"""Dataset transform and reward functions of ``tiny_grpo.yml`` (GRPO on a tiny random Llama, CPU).

Axolotl imports them by their dotted names, ``rewards_tiny.prompt_transform`` (``datasets[].type``) and
``rewards_tiny.vowel_share`` (``trl.reward_funcs``; ``distinct_letter_share`` is a second reward for
multi-objective runs), so this folder must be on ``sys.path``. ``axolotl train ... --launcher python``
does not put the current directory there: run it with ``PYTHONPATH=axolotl_configs/ci`` (see
``tiny_grpo.yml``).

The rewards are toys, deterministic and free of any model: the share of vowels (or of distinct letters)
among the letters of the completion. Each differs between the sampled completions of one prompt, so
GRPO's advantages are not all zero and the adapter moves, which is all a CI run needs; neither says
anything about correctness.
"""

from __future__ import annotations

from typing import Any

VOWELS = frozenset("aeiouAEIOU")


def completion_text(completion: Any) -> str:
    """The text of a TRL completion: a string, or (conversational prompts) a list of messages."""
    if isinstance(completion, str):
        return completion
    return "".join(message.get("content") or "" for message in completion)


def vowel_share(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    """Share of vowels among the letters of each completion (0.0 for a completion without letters)."""
    rewards = []
    for completion in completions:
        letters = [c for c in completion_text(completion) if c.isalpha()]
        rewards.append(sum(c in VOWELS for c in letters) / len(letters) if letters else 0.0)
    return rewards


def distinct_letter_share(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    """Share of distinct letters (case-folded) among the letters of each completion: a second toy objective."""
    rewards = []
    for completion in completions:
        letters = [c.lower() for c in completion_text(completion) if c.isalpha()]
        rewards.append(len(set(letters)) / len(letters) if letters else 0.0)
    return rewards


def prompt_transform(cfg: Any, *args: Any, **kwargs: Any):
    """``{"prompt", "chosen", "rejected"}`` strings (``prepare.py``'s DPO file) -> a conversational GRPO prompt.

    Returns the row transform and the ``map`` arguments, as Axolotl's GRPO transforms do; ``answer``
    (the correct option) stays as an extra column that TRL hands to reward functions as a keyword.
    """

    def transform_fn(example: dict[str, Any]) -> dict[str, Any]:
        return {"prompt": [{"role": "user", "content": example["prompt"]}], "answer": example["chosen"]}

    return transform_fn, {"remove_columns": ["chosen", "rejected"]}
