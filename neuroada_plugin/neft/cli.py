"""``neuroada-plugin neft-select``: choose NeFT's neurons as the paper does, from a short fine-tuning on your data.

Light on purpose (standard library only at import): ``neuroada-plugin --help`` builds this parser.
"""

from __future__ import annotations

import argparse

from ..cli_exit import run_command, stderr_log

_DESCRIPTION = """\
Choose the neurons a NeFT adapter trains, by the paper's rule (Xu et al., COLING 2025):

  1. fine-tune a copy of the model on your data for a few steps (TRL's SFTTrainer; every parameter
     trainable, as the paper; --train candidates trains only the candidate layers, a cheaper deviation);
  2. score every candidate neuron (rows of up_proj, columns of down_proj, by default) by the cosine
     similarity between its original and its briefly trained weights;
  3. keep the lowest-scoring neurons over all layers under one global budget (no per-layer quota).

The result is a JSON file for NeftConfig(selection_file=...). It records each layer's weight fingerprint,
so using it with another model fails naming the layer; the adapter trained from it saves its neurons, so
loading the adapter never needs this file. The file is written atomically (complete or not at all).

DATA is a JSON/JSONL file in any format SFTTrainer takes: {"messages": [...]}, {"prompt": ..., "completion":
...} or {"text": ...} per row. Launch with `accelerate launch -m neuroada_plugin neft-select ...` to use
several GPUs or DeepSpeed, like any TRL run; only the main process writes the file.
"""

_EPILOG = """\
example:
  neuroada-plugin neft-select --model ./SmolLM2-135M-Instruct --data train.jsonl --steps 200 \\
      --share 0.004 --output neurons.json
  # then: NeftConfig(selection_file="neurons.json"), or `adapter: neft` + `neft_selection_file: neurons.json`

exit codes: 0 ok, 2 bad input (nothing written), 3 output exists, 130 interrupted (nothing written)
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``neft-select`` subcommand to ``neuroada-plugin``."""
    parser = subparsers.add_parser(
        "neft-select",
        help="Choose NeFT's neurons from a short fine-tuning on your data (the paper's rule).",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="Model folder or hub id (the base the adapter will train).")
    parser.add_argument("--data", required=True, help="Training data: a JSON/JSONL file SFTTrainer accepts.")
    parser.add_argument("--output", "-o", required=True, help="Selection file to write (JSON).")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--neurons", type=int, help="Global budget as a neuron count over all candidate layers.")
    budget.add_argument(
        "--share",
        type=float,
        help="Global budget as a share of ALL model parameters, as the paper counts it (default 0.004 = 0.4%%).",
    )
    parser.add_argument("--steps", type=int, default=200, help="Reference fine-tuning steps K (default 200).")
    parser.add_argument("--learning-rate", type=float, default=2e-5, help="Its learning rate (default 2e-5, the paper's).")
    parser.add_argument("--batch-size", type=int, default=4, help="Per-device batch size (default 4).")
    parser.add_argument("--max-length", type=int, default=512, help="Tokens per example (default 512).")
    parser.add_argument(
        "--target-modules",
        nargs="+",
        default=["up_proj", "down_proj"],
        help="Candidate layers, by name suffix (default: up_proj down_proj, the paper's).",
    )
    parser.add_argument(
        "--column-modules",
        nargs="*",
        default=["down_proj"],
        help="Candidates whose neurons are input columns (default: down_proj); the others' are output rows.",
    )
    parser.add_argument(
        "--train",
        choices=("all", "candidates"),
        default="all",
        help="What the reference run trains: every parameter (default, the paper's) or only the candidate layers "
        "(less memory; a deviation from the paper).",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="Compute precision of the reference run: float32 (default), or bf16/fp16 mixed precision (autocast; "
        "the weights stay float32).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the reference run (default 0).")
    parser.add_argument("--keep-reference", metavar="DIR", help="Also save the briefly fine-tuned model (M_FT) here.")
    parser.add_argument("--force", action="store_true", help="Replace OUTPUT if it exists.")
    parser.add_argument("--no-progress", action="store_true", help="Do not show the training progress bar.")
    parser.add_argument("--quiet", "-q", action="store_true", help="Print only errors.")
    parser.set_defaults(func=run, error_prog="neuroada-plugin neft-select")


def run(args: argparse.Namespace) -> int:
    """Run the selection; returns the exit code (:mod:`neuroada_plugin.cli_exit`)."""

    def select() -> str | None:
        from .select import SelectionRun, select_neurons

        settings = SelectionRun(
            model=args.model,
            data=args.data,
            output=args.output,
            num_neurons=args.neurons,
            neuron_share=args.share if args.share is not None or args.neurons is not None else 0.004,
            steps=args.steps,
            learning_rate=args.learning_rate,
            batch_size=args.batch_size,
            max_length=args.max_length,
            target_modules=tuple(args.target_modules),
            column_modules=tuple(args.column_modules),
            train=args.train,
            dtype=args.dtype,
            seed=args.seed,
            keep_reference=args.keep_reference,
            force=args.force,
            progress=not (args.no_progress or args.quiet),
        )
        report = select_neurons(settings, log=stderr_log(args.quiet))
        return None if args.quiet else report

    return run_command(args.error_prog, select)
