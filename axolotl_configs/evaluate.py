"""Held-out commonsense accuracy of an Axolotl NeuroAda run, before and after training.

Scores the held-out questions of the shared split (:func:`harness.commonsense.make_splits`,
never trained on by ``prepare.py``'s train rows) by option log-likelihood, with the same
function the TRL examples use, so the numbers are comparable::

    python axolotl_configs/evaluate.py outputs/axolotl/sft-smollm2            # adapter folder
    python axolotl_configs/evaluate.py outputs/axolotl/sft-smollm2/merged     # merged checkpoint

For an adapter folder the base model is read from its ``adapter_config.json``
(``base_model_name_or_path``) unless ``--base`` is given; it is scored too, as the "before".
Runs in either environment (``.venv`` or ``.venv-axolotl``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import neuroada_plugin  # noqa: F401  (registers NeuroAda with PEFT)
from harness import commonsense


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="Adapter folder (adapter_config.json) or a merged checkpoint.")
    parser.add_argument("--base", type=Path, default=None, help="Base model folder (default: from the adapter).")
    parser.add_argument("--sources", default="csqa", help="Commonsense sets to score (as in prepare.py).")
    parser.add_argument("--heldout-size", type=int, default=200, help="Held-out questions scored (0: all).")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)

    splits = commonsense.make_splits(commonsense.load_questions(args.sources), seed=args.split_seed)
    heldout = splits.heldout[: args.heldout_size] if args.heldout_size > 0 else splits.heldout
    adapter_config = args.model / "adapter_config.json"
    if adapter_config.is_file():
        base_dir = args.base or Path(json.loads(adapter_config.read_text())["base_model_name_or_path"])
    else:
        base_dir = args.base
    tokenizer = AutoTokenizer.from_pretrained(
        args.model if (args.model / "tokenizer_config.json").is_file() else base_dir
    )

    def score(label: str, model) -> commonsense.MCEvaluation:
        start = time.perf_counter()
        result = commonsense.evaluate_multiple_choice(model, tokenizer, heldout, batch_size=args.batch_size)
        print(f"[{label}] held-out {result.summary()} [{time.perf_counter() - start:.0f}s]", flush=True)
        return result

    before = None
    if base_dir is not None:
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        before = score(f"base {base_dir}", base)
    if adapter_config.is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, args.model)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    after = score(f"trained {args.model}", model)
    if before is not None:
        print(f"change: {commonsense.paired_change(before, after).summary()}")


if __name__ == "__main__":
    main()
