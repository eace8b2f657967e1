"""``neuroada-plugin neat-to-lora``: export a NEAT adapter as an exactly equal standard LoRA adapter.

Light on purpose (standard library only at import): ``neuroada-plugin --help`` builds this parser.
"""

from __future__ import annotations

import argparse

from ..cli_exit import run_command, stderr_log

_DESCRIPTION = """\
Write a standard PEFT LoRA adapter whose update equals a trained NEAT adapter exactly:
lora_A = act(A @ W0) [r, in], lora_B = s * B [out, r], lora_alpha = r (LoRA scale 1).
Serve it with vLLM's multi-LoRA path (`vllm serve BASE --enable-lora --lora-modules name=OUT`) or
load it with PEFT as any LoRA adapter; to serve at base speed, merge instead (`neuroada-plugin merge`).

The base model is needed because lora_A depends on the frozen weight W0: only the adapted layers'
weights are read, one at a time, from the base's safetensors shards. Output is written to a staging
folder and renamed into place when complete; on failure nothing is left behind.
"""

_EPILOG = """\
example:
  neuroada-plugin neat-to-lora --base ./SmolLM2-135M-Instruct --adapter ./outputs/sft-neat --output ./neat-as-lora

exit codes: 0 ok, 2 bad input (nothing written), 3 output exists, 130 interrupted (nothing written)
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``neat-to-lora`` subcommand to ``neuroada-plugin``."""
    parser = subparsers.add_parser(
        "neat-to-lora",
        help="Export a NEAT adapter as an exactly equal LoRA adapter (vLLM multi-LoRA).",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--base", required=True, metavar="BASE", help="Base model folder (safetensors) or hub id.")
    parser.add_argument("--adapter", required=True, metavar="ADAPTER", help="Saved NEAT adapter folder or hub id.")
    parser.add_argument("--output", "-o", required=True, metavar="OUT", help="LoRA adapter folder to create.")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="dtype of the LoRA factors (default: the NEAT adapter's, float32 unless trained otherwise; exact).",
    )
    parser.add_argument("--force", action="store_true", help="Replace OUT if it exists (once the new one is complete).")
    parser.add_argument("--no-progress", action="store_true", help="Do not show the progress bar.")
    parser.add_argument("--quiet", "-q", action="store_true", help="Print only errors.")
    parser.set_defaults(func=run, error_prog="neuroada-plugin neat-to-lora")


def run(args: argparse.Namespace) -> int:
    """Run the export; returns the exit code (:mod:`neuroada_plugin.cli_exit`)."""

    def export() -> str | None:
        from .lora_export import export_lora_checkpoint

        log = stderr_log(args.quiet)
        report = export_lora_checkpoint(
            args.base,
            args.adapter,
            args.output,
            dtype=args.dtype,
            force=args.force,
            progress=not (args.no_progress or args.quiet),
            log=log,
        )
        return None if args.quiet else report.summary()

    return run_command(args.error_prog, export)
