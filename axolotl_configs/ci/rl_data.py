"""KTO, ORPO and EBFT rows for the CI configs, made from the DPO pairs ``prepare.py`` writes.

Run from the repository root, after ``python axolotl_configs/prepare.py --tiny``::

    python axolotl_configs/ci/rl_data.py     # writes commonsense_train.{kto,orpo,ebft}.jsonl

The files hold the same constructed pairs as ``commonsense_train.dpo.jsonl`` (correct option chosen,
one wrong option rejected), in the layouts Axolotl's loaders read:

* KTO (``type: chatml.argilla``): one row per answer, ``{"instruction", "completion", "label"}``; the
  chosen answer is desirable (``true``), the rejected one undesirable (``false``);
* ORPO (``type: chat_template.argilla``): ``{"prompt", "chosen", "rejected"}`` with chosen and
  rejected as ``[user, assistant]`` conversations;
* EBFT (``type: ebft_opencode.transform``, Axolotl's transform for ``{"input", "output"}`` rows): the
  prompt and the chosen answer as the ground truth whose features the completions are matched to.

Standard library only, so either virtual environment (or none) can run it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

DATA = Path("outputs/axolotl/data")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_jsonl(rows: Iterable[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def kto_rows(pairs: Iterable[dict[str, str]]) -> list[dict[str, Any]]:
    """Unpaired KTO rows: the chosen answer labelled desirable, the rejected one undesirable."""
    rows = []
    for pair in pairs:
        rows.append({"instruction": pair["prompt"], "completion": pair["chosen"], "label": True})
        rows.append({"instruction": pair["prompt"], "completion": pair["rejected"], "label": False})
    return rows


def orpo_rows(pairs: Iterable[dict[str, str]]) -> list[dict[str, Any]]:
    """ORPO rows: the prompt string and both answers as ``[user, assistant]`` conversations."""

    def conversation(prompt: str, answer: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]

    return [
        {
            "prompt": pair["prompt"],
            "chosen": conversation(pair["prompt"], pair["chosen"]),
            "rejected": conversation(pair["prompt"], pair["rejected"]),
        }
        for pair in pairs
    ]


def ebft_rows(pairs: Iterable[dict[str, str]]) -> list[dict[str, str]]:
    """EBFT rows: the prompt as ``input``, the chosen answer as the ground-truth ``output``."""
    return [{"input": pair["prompt"], "output": pair["chosen"]} for pair in pairs]


def write_rl_files(dpo_file: Path, out_dir: Path, stem: str) -> dict[str, Path]:
    """``<stem>.kto.jsonl``, ``<stem>.orpo.jsonl`` and ``<stem>.ebft.jsonl`` under ``out_dir`` from the pairs in ``dpo_file``."""
    pairs = read_jsonl(dpo_file)
    return {
        "kto": write_jsonl(kto_rows(pairs), out_dir / f"{stem}.kto.jsonl"),
        "orpo": write_jsonl(orpo_rows(pairs), out_dir / f"{stem}.orpo.jsonl"),
        "ebft": write_jsonl(ebft_rows(pairs), out_dir / f"{stem}.ebft.jsonl"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dpo", type=Path, default=DATA / "commonsense_train.dpo.jsonl")
    parser.add_argument("--out-dir", type=Path, default=DATA)
    args = parser.parse_args()
    for kind, path in write_rl_files(args.dpo, args.out_dir, "commonsense_train").items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
