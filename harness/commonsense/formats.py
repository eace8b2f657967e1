"""How a question becomes a conversation: the prompt format every consumer of a run shares.

A :class:`PromptFormat` (:data:`CLOZE`: question -> ``"bookstore"``; :data:`LETTERED`: question +
lettered options -> ``"B. bookstore"``) is passed to the SFT rows, the constructed DPO pairs, the
GRPO prompts and their reward, the Axolotl JSONL export and the log-likelihood evaluation, which
scores each option exactly as the SFT target that training optimises.
"""

from __future__ import annotations

from dataclasses import dataclass

from .data import LETTERS, MCQuestion

INSTRUCTION = "Answer with the letter and text of the correct option."
"""Last line of every user prompt: tells the model which answer format is expected."""


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


def assistant_turn(content: str) -> list[dict[str, str]]:
    """``content`` as the assistant's message of a conversation."""
    return [{"role": "assistant", "content": content}]
