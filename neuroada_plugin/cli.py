"""``neuroada-plugin``: the package's command line (``merge``, ``verify``, ``methods``, method subcommands).

Also ``python -m neuroada_plugin``. ``neuroada-merge`` (and ``python -m neuroada_plugin.merge``)
is the same as ``neuroada-plugin merge``: same flags, same exit codes.

Start-up is cheap on purpose: this module imports only the standard library and the method
registry; ``merge`` imports torch when it runs, ``verify`` PEFT and Transformers. A method can
add subcommands through its spec (``MethodSpec.cli_commands``: import paths of callables
``register(subparsers)`` that add a subparser and ``set_defaults(func=handler)``, ``handler(args)``
returning the exit code); their modules must be as light as this one.

Exit codes of ``merge``: 0 success, 1 ``--verify`` failed, 2 bad input (message on stderr,
nothing written), 3 output exists, 4 disk full, 130/143 interrupted (partial output removed).
``verify``: 0 match, 1 mismatch, 2 bad input. ``methods``: 0.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import textwrap
from collections.abc import Callable

from . import __version__
from .registry import MethodSpec, load_object, methods

__all__ = ["build_merge_parser", "build_parser", "fail", "main", "merge_main"]

PROG = "neuroada-plugin"
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

_VERIFY_DESCRIPTION = """\
Check a merged checkpoint against the base model and the adapter it came from (loads the whole model
with PEFT and Transformers). The inputs are validated as `merge` validates them. Then (1) every tensor
equals PEFT's in-memory merge_and_unload() bit for bit, done in the dtype the merged checkpoint is
stored in (a float16 merge of a bfloat16 base is compared with a float16 merge) and with the adapter's
vocabulary when it added tokens; missing, extra, reshaped, re-typed and changed tensors are reported
apart; (2) float32 logits of the merged model match the unmerged adapter (judged for a float32
checkpoint, reported otherwise). `merge --verify` runs the same checks before putting its output in place.

exit codes: 0 match, 1 mismatch, 2 bad input (unreadable or missing files, an adapter for another model)
"""


def _methods_text(indent: str = "  ") -> str:
    lines = []
    for spec in methods().values():
        if spec.checkpoint_rule:
            lines.append(f"{indent}{spec.name} (peft_type {spec.peft_type}): {spec.summary}")
    return "\n".join(lines) or f"{indent}(none registered)"


def _add_allow_base_mismatch(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-base-mismatch",
        action="store_true",
        help="Merge/check even where the base weights are not the ones the adapter was created on. Each adapter "
        "records a fingerprint of every adapted base weight; a base whose fingerprint is far from it (another model "
        "of the same shapes) is refused by default (exit 2, nothing written). The same model in another dtype, or its "
        "full-precision original for an adapter trained on a 4-bit base, is accepted without this flag.",
    )


def _add_merge_arguments(parser: argparse.ArgumentParser) -> None:
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
    _add_allow_base_mismatch(parser)
    parser.add_argument("--no-progress", action="store_true", help="Do not show the progress bar.")
    parser.add_argument("--quiet", "-q", action="store_true", help="Print only errors (implies --no-progress).")


def _merge_help(prog: str) -> dict[str, object]:
    return {
        "description": _MERGE_DESCRIPTION.format(methods=_methods_text()),
        "epilog": _MERGE_EPILOG.format(prog=prog),
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }


def build_merge_parser(prog: str = MERGE_ALIAS) -> argparse.ArgumentParser:
    """The parser of ``neuroada-merge`` (the same flags as ``neuroada-plugin merge``)."""
    parser = argparse.ArgumentParser(prog=prog, **_merge_help(prog))
    _add_merge_arguments(parser)
    parser.set_defaults(func=_run_merge, error_prog=prog)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``neuroada-plugin`` with every subcommand (built-in and method-declared)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="NeuroAda and sibling fine-tuning methods as native PEFT methods: tools.\n\nMethods:\n"
        + "\n".join(f"  {s.name} (peft_type {s.peft_type}): {s.summary}" for s in methods().values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    merge = commands.add_parser(
        "merge",
        help="Merge an adapter into its base checkpoint (streaming, bit-exact).",
        **_merge_help(f"{PROG} merge"),
    )
    _add_merge_arguments(merge)
    merge.set_defaults(func=_run_merge, error_prog=f"{PROG} merge")

    verify = commands.add_parser(
        "verify",
        help="Check a merged checkpoint against base + adapter (loads the model).",
        description=_VERIFY_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument("--base", required=True, metavar="BASE", help="Base model folder (or hub repo id).")
    verify.add_argument("--adapter", required=True, metavar="ADAPTER", help="Adapter folder (or hub repo id).")
    verify.add_argument("--merged", required=True, metavar="MERGED", help="Merged checkpoint folder to check.")
    _add_allow_base_mismatch(verify)
    verify.add_argument("--quiet", "-q", action="store_true", help="Print only the result and errors.")
    verify.set_defaults(func=_run_verify, error_prog=f"{PROG} verify")

    listing = commands.add_parser(
        "methods", help="List the registered methods.", description="List the registered methods and their flags."
    )
    listing.add_argument("--json", action="store_true", help="Print a JSON list instead of a table.")
    listing.set_defaults(func=_run_methods, error_prog=f"{PROG} methods")

    for spec in methods().values():
        for path in spec.cli_commands:
            register: Callable[[argparse._SubParsersAction], None] = load_object(path)
            register(commands)
    return parser


# ----------------------------------------------------------------------------- commands


def _raise_on_sigterm(signum, frame) -> None:  # pragma: no cover - exercised through a subprocess
    raise SystemExit(128 + signum)


def fail(prog: str, error: BaseException, code: int) -> int:
    message = "\n".join(textwrap.wrap(str(error), width=110, break_long_words=False, break_on_hyphens=False))
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    """What ``merge`` and ``verify`` report as bad input (exit 2): messages that say what to fix."""
    from .errors import AdapterCheckpointError, MergeError
    from .merge.errors import CheckpointFileError, UnsupportedAdapterError

    return (AdapterCheckpointError, CheckpointFileError, UnsupportedAdapterError, MergeError, ValueError, OSError)


def _run_merge(args: argparse.Namespace) -> int:
    prog = args.error_prog
    # SIGTERM becomes SystemExit so the staging folder is removed on the way out.
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        from .merge.errors import (
            InsufficientSpaceError,
            OutputExistsError,
        )
        from .merge.streaming import merge_adapter_checkpoint
        from .merge.verify import VerificationError

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
                allow_base_mismatch=args.allow_base_mismatch,
                log=log,
            )
        except OutputExistsError as error:
            return fail(prog, error, 3)
        except InsufficientSpaceError as error:
            return fail(prog, error, 4)
        except VerificationError as error:
            return fail(prog, error, 1)
        except _bad_input_errors() as error:
            return fail(prog, error, 2)
        except KeyboardInterrupt:
            print(f"{prog}: interrupted; partial output removed.", file=sys.stderr)
            return 130
        if not args.quiet:
            print(report.summary())
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_verify(args: argparse.Namespace) -> int:
    from .merge.sources import resolve_folder
    from .merge.verify import VerificationError, verify_merge

    prog = args.error_prog
    log = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    try:
        base = resolve_folder(args.base, "Base model")
        adapter = resolve_folder(args.adapter, "Adapter")
        merged = resolve_folder(args.merged, "Merged checkpoint")
        result = verify_merge(base, adapter, merged, allow_base_mismatch=args.allow_base_mismatch, log=log)
    except VerificationError as error:
        return fail(prog, error, 1)
    except _bad_input_errors() as error:
        return fail(prog, error, 2)
    print(f"verified {merged}: {result['summary']}")
    return 0


def _flags(spec: MethodSpec) -> list[str]:
    flags = []
    if spec.checkpoint_rule:
        flags.append("streaming-merge")
    if spec.exact_merge:
        flags.append("exact-merge")
    if spec.needs_float_weights:
        flags.append("needs-float-weights")
    if spec.reads_weights_when_created:
        flags.append("reads-weights-when-created")
    if spec.reads_weights_in_forward:
        flags.append("reads-weights-in-forward")
    return flags


def _run_methods(args: argparse.Namespace) -> int:
    specs = list(methods().values())
    if args.json:
        rows = [
            {
                "name": s.name,
                "peft_type": s.peft_type,
                "flags": _flags(s),
                "summary": s.summary,
                "config": s.config,
                "tuner": s.tuner,
                "checkpoint_rule": s.checkpoint_rule,
            }
            for s in specs
        ]
        print(json.dumps(rows, indent=2))
        return 0
    header = ("method", "peft_type", "flags", "summary")
    rows = [(s.name, s.peft_type, ",".join(_flags(s)) or "-", s.summary) for s in specs]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)) + "  " + row[3])
    return 0


# ----------------------------------------------------------------------------- entry points


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``neuroada-plugin`` (and ``python -m neuroada_plugin``); returns the exit code."""
    args = build_parser().parse_args(argv)
    return args.func(args)


def merge_main(argv: list[str] | None = None) -> int:
    """Entry point of ``neuroada-merge`` (= ``neuroada-plugin merge``); returns the exit code."""
    args = build_merge_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
