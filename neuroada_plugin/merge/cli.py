"""``neuroada-merge``: merge a saved adapter into its base checkpoint, streaming shard by shard.

Also runnable as ``python -m neuroada_plugin.merge`` or ``python -m neuroada_plugin.merge.cli``.
Exit codes: 0 success, 1 verification failed, 2 bad input (message on stderr, nothing written),
3 output exists, 4 disk full, 130/143 interrupted (partial output removed).
"""

from __future__ import annotations

import argparse
import signal
import sys
import textwrap

__all__ = ["build_parser", "main"]

_DESCRIPTION = """\
Merge a PEFT adapter (NeuroAda, saved by PEFT, TRL or Axolotl) into its base model and write an
ordinary Hugging Face checkpoint that transformers, vLLM (`vllm serve OUT`) and other runtimes
load with no custom code.

How it works: the base checkpoint's safetensors shards are streamed one tensor at a time.
Tensors the adapter does not touch are copied byte for byte; the few it touches are decoded,
patched and written back in the base dtype (bf16 stays bf16), with the same arithmetic as
PEFT's in-memory merge_and_unload(), so the result is bit-identical to it. Peak memory is about
one tensor, never the whole model. The shard index, config.json, generation_config.json,
tokenizer and other non-weight files are copied.

Safety: everything is validated before writing (adapter keys map to base tensors, shapes and
index ranges fit, all shards present and not truncated, enough free disk). Output is written
to a hidden staging folder next to OUT and renamed into place only when complete; on any error,
Ctrl-C, SIGTERM or a full disk nothing is left behind. A folder left by a SIGKILL-ed run
(.OUT.neuroada-merge-tmp.PID.*) is removed by the next run for the same OUT.
"""

_EPILOG = """\
examples:
  neuroada-merge --base ./SmolLM2-135M-Instruct --adapter ./outputs/sft-neuroada --output ./merged
  neuroada-merge --base HuggingFaceTB/SmolLM2-135M-Instruct --adapter user/my-adapter --output ./merged --force
  neuroada-merge --base ./base --adapter ./outputs/checkpoint-500 --output ./merged --verify
  vllm serve ./merged        # GPU; on a CPU-only machine see serving/README.md

exit codes: 0 ok, 1 --verify failed, 2 bad input (nothing written), 3 output exists, 4 disk full,
130/143 interrupted (partial output removed)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuroada-merge",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    parser.add_argument("--no-progress", action="store_true", help="Do not show the progress bar.")
    parser.add_argument("--quiet", "-q", action="store_true", help="Print only errors (implies --no-progress).")
    return parser


def _raise_on_sigterm(signum, frame) -> None:  # pragma: no cover - exercised through a subprocess
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``neuroada-merge`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    # SIGTERM becomes SystemExit so the staging folder is removed on the way out.
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        from ..errors import AdapterCheckpointError, MergeError
        from .errors import CheckpointFileError, InsufficientSpaceError, OutputExistsError, UnsupportedAdapterError
        from .streaming import merge_adapter_checkpoint
        from .verify import VerificationError

        log = None if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
        try:
            report = merge_adapter_checkpoint(
                args.base,
                args.adapter,
                args.output,
                force=args.force,
                progress=not (args.no_progress or args.quiet),
                tokenizer=args.tokenizer,
                verify=args.verify,
                log=log,
            )
        except OutputExistsError as error:
            return _fail(error, 3)
        except InsufficientSpaceError as error:
            return _fail(error, 4)
        except VerificationError as error:
            return _fail(error, 1)
        except (
            AdapterCheckpointError,
            CheckpointFileError,
            UnsupportedAdapterError,
            MergeError,
            ValueError,
            FileNotFoundError,
        ) as error:
            return _fail(error, 2)
        except KeyboardInterrupt:
            print("neuroada-merge: interrupted; partial output removed.", file=sys.stderr)
            return 130
        if not args.quiet:
            print(report.summary())
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fail(error: BaseException, code: int) -> int:
    message = "\n".join(textwrap.wrap(str(error), width=110, break_long_words=False, break_on_hyphens=False))
    print(f"neuroada-merge: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
