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
import sys
from collections.abc import Callable

from . import __version__
from .capabilities import capability_legend
from .cli_exit import run_command, stderr_log
from .merge.cli import add_allow_base_mismatch, add_merge_arguments, merge_help, run_merge
from .merge.cli import main as merge_main
from .registry import MethodSpec, load_object, methods

__all__ = ["build_parser", "main", "merge_main"]

PROG = "neuroada-plugin"

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
        **merge_help(f"{PROG} merge"),
    )
    add_merge_arguments(merge)
    merge.set_defaults(func=run_merge, error_prog=f"{PROG} merge")

    verify = commands.add_parser(
        "verify",
        help="Check a merged checkpoint against base + adapter (loads the model).",
        description=_VERIFY_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument("--base", required=True, metavar="BASE", help="Base model folder (or hub repo id).")
    verify.add_argument("--adapter", required=True, metavar="ADAPTER", help="Adapter folder (or hub repo id).")
    verify.add_argument("--merged", required=True, metavar="MERGED", help="Merged checkpoint folder to check.")
    add_allow_base_mismatch(verify)
    verify.add_argument("--quiet", "-q", action="store_true", help="Print only the result and errors.")
    verify.set_defaults(func=_run_verify, error_prog=f"{PROG} verify")

    listing = commands.add_parser(
        "methods",
        help="List the registered methods.",
        description="List the registered methods and their flags.",
        epilog=capability_legend(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    output = listing.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="Print a JSON list instead of a table.")
    output.add_argument(
        "--table",
        action="store_true",
        help="Print the capability table as Markdown (PEFT, TRL, Axolotl, DDP/FSDP/ZeRO-3, 4/8-bit, merge, vLLM: "
        "yes / no = refused at config time / untested), as the README shows it.",
    )
    listing.set_defaults(func=_run_methods, error_prog=f"{PROG} methods")

    for spec in methods().values():
        for path in spec.cli_commands:
            register: Callable[[argparse._SubParsersAction], None] = load_object(path)
            register(commands)
    return parser


# ----------------------------------------------------------------------------- commands


def _run_verify(args: argparse.Namespace) -> int:
    def verify() -> str:
        from .merge.sources import resolve_folder
        from .merge.verify import verify_merge

        log = stderr_log(args.quiet)
        base = resolve_folder(args.base, "Base model")
        adapter = resolve_folder(args.adapter, "Adapter")
        merged = resolve_folder(args.merged, "Merged checkpoint")
        result = verify_merge(base, adapter, merged, allow_base_mismatch=args.allow_base_mismatch, log=log)
        return f"verified {merged}: {result['summary']}"

    return run_command(args.error_prog, verify)


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
    if args.table:
        from .capabilities import markdown_table

        print(markdown_table(specs), end="")
        return 0
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


if __name__ == "__main__":
    sys.exit(main())
