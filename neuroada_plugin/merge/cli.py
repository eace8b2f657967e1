"""``neuroada-plugin merge`` and its alias ``neuroada-merge`` (also ``python -m neuroada_plugin.merge``).

Standard library and the registry only at import; the merge imports torch when it runs. The package
CLI (:mod:`neuroada_plugin.cli`) adds this command to its own parser.
"""

from __future__ import annotations

import argparse
import signal
import sys

from ..cli_exit import run_command, stderr_log
from ..registry import methods

__all__ = ["add_allow_base_mismatch", "add_merge_arguments", "build_parser", "main", "merge_help", "run_merge"]

MERGE_ALIAS = "neuroada-merge"

_MERGE_DESCRIPTION = """\
Merge a saved adapter of one of this package's methods (saved by PEFT, TRL or Axolotl) into its base
model and write an ordinary Hugging Face checkpoint that transformers, vLLM (`vllm serve OUT`) and other
runtimes load with no custom code. The method is read from the adapter's adapter_config.json (peft_type).

Methods it merges:
{methods}

How it works: the base checkpoint's safetensors shards are streamed one tensor at a time.
Tensors the adapter does not touch are copied byte for byte; the few it touches are decoded,
patched and written back in the base dtype (bf16 stays bf16), with the same arithmetic as
PEFT's in-memory merge_and_unload(), so the result is bit-identical to it. Peak memory is about
one tensor, never the whole model. The shard index, config.json, generation_config.json,
tokenizer and other non-weight files are copied, and merge_info.json records what was merged.

Safety: everything is validated before writing (adapter keys map to base tensors, shapes and
index ranges fit, all shards present and not truncated, adapter values finite, enough free disk).
Output is written to a hidden staging folder next to OUT and renamed into place only when complete;
on any error, Ctrl-C, SIGTERM or a full disk nothing is left behind. A folder left by a SIGKILL-ed
run (.OUT.neuroada-merge-tmp.PID.*) is removed by the next run for the same OUT.
"""

_MERGE_EPILOG = """\
examples:
  {prog} --base ./SmolLM2-135M-Instruct --adapter ./outputs/sft-neuroada --output ./merged
  {prog} --base HuggingFaceTB/SmolLM2-135M-Instruct --adapter user/my-adapter --output ./merged --force
  {prog} --base ./base --adapter ./outputs/checkpoint-500 --output ./merged --verify
  vllm serve ./merged        # GPU; on a CPU-only machine see serving/README.md

exit codes: 0 ok, 1 --verify failed, 2 bad input (nothing written), 3 output exists, 4 disk full,
130/143 interrupted (partial output removed)
"""


def _methods_text(indent: str = "  ") -> str:
    lines = []
    for spec in methods().values():
        if spec.checkpoint_rule:
            lines.append(f"{indent}{spec.name} (peft_type {spec.peft_type}): {spec.summary}")
    return "\n".join(lines) or f"{indent}(none registered)"


def add_allow_base_mismatch(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-base-mismatch",
        action="store_true",
        help="Merge/check even where the base weights are not the ones the adapter was created on. Each adapter "
        "records a fingerprint of every adapted base weight; a base whose fingerprint is far from it (another model "
        "of the same shapes) is refused by default (exit 2, nothing written). The same model in another dtype, or its "
        "full-precision original for an adapter trained on a 4-bit base, is accepted without this flag.",
    )


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base",
        required=True,
        metavar="BASE",
        help="Base model: a local folder with config.json and safetensors weights (model.safetensors, or shards "
        "plus model.safetensors.index.json), or a hub repo id (downloaded when a hub is reachable).",
    )
    parser.add_argument(
        "--adapter",
        required=True,
        metavar="ADAPTER",
        help="Adapter folder written by save_pretrained (adapter_config.json + adapter_model.safetensors): a PEFT, "
        "TRL (output_dir or checkpoint-N) or Axolotl output folder, or a hub repo id.",
    )
    parser.add_argument(
        "--output",
        "-o",
        required=True,
        metavar="OUT",
        help="Folder to create for the merged checkpoint. Refused if it exists, unless --force.",
    )
    parser.add_argument(
        "--force", action="store_true", help="Replace OUT if it already exists (only after the new one is complete)."
    )
    parser.add_argument(
        "--tokenizer",
        choices=("auto", "base", "adapter"),
        default="auto",
        help="Where the tokenizer files come from. auto (default): the adapter folder's when it has a "
        "tokenizer_config.json (TRL saves the tokenizer it trained with), else the base folder's.",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="Before OUT is put in place, load the model (whole, in memory) and check (1) every tensor equals PEFT's "
        "in-memory merge_and_unload() bit for bit and (2) float32 logits of the merged model match the unmerged "
        "adapter. On a mismatch nothing is written (exit code 1).",
    )
    add_allow_base_mismatch(parser)
    parser.add_argument("--no-progress", action="store_true", help="Do not show the progress bar.")
    parser.add_argument("--quiet", "-q", action="store_true", help="Print only errors (implies --no-progress).")


def merge_help(prog: str) -> dict[str, object]:
    return {
        "description": _MERGE_DESCRIPTION.format(methods=_methods_text()),
        "epilog": _MERGE_EPILOG.format(prog=prog),
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }


def build_parser(prog: str = MERGE_ALIAS) -> argparse.ArgumentParser:
    """The parser of ``neuroada-merge`` (the same flags as ``neuroada-plugin merge``)."""
    parser = argparse.ArgumentParser(prog=prog, **merge_help(prog))
    add_merge_arguments(parser)
    parser.set_defaults(func=run_merge, error_prog=prog)
    return parser


def _raise_on_sigterm(signum, frame) -> None:  # pragma: no cover - exercised through a subprocess
    raise SystemExit(128 + signum)


def run_merge(args: argparse.Namespace) -> int:
    """Run a merge from parsed arguments; returns the exit code (:mod:`neuroada_plugin.cli_exit`)."""
    # SIGTERM becomes SystemExit so the staging folder is removed on the way out.
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)

    def merge() -> str | None:
        from .streaming import merge_adapter_checkpoint

        log = stderr_log(args.quiet)
        report = merge_adapter_checkpoint(
            args.base,
            args.adapter,
            args.output,
            force=args.force,
            progress=not (args.no_progress or args.quiet),
            tokenizer=args.tokenizer,
            verify=args.verify,
            allow_base_mismatch=args.allow_base_mismatch,
            log=log,
        )
        return None if args.quiet else report.summary()

    try:
        return run_command(args.error_prog, merge, interrupted="partial output removed")
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``neuroada-merge`` (= ``neuroada-plugin merge``); returns the exit code."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
