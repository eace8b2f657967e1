"""Exit codes of every command of the package, in one place (standard library only at import).

0 ok; 1 a check failed (``--verify``, ``verify``); 2 bad input, with a message that says what to
fix and nothing written; 3 the output exists (``--force`` replaces it); 4 disk full; 130 interrupted
(nothing partial left behind). A command's handler calls :func:`run_command` with what it does.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable

__all__ = [
    "BAD_INPUT",
    "CHECK_FAILED",
    "DISK_FULL",
    "INTERRUPTED",
    "OK",
    "OUTPUT_EXISTS",
    "fail",
    "run_command",
    "stderr_log",
]

OK, CHECK_FAILED, BAD_INPUT, OUTPUT_EXISTS, DISK_FULL, INTERRUPTED = 0, 1, 2, 3, 4, 130


def fail(prog: str, error: BaseException | str, code: int) -> int:
    """Print ``prog: error: <message>`` (wrapped) on stderr; return ``code``."""
    message = "\n".join(textwrap.wrap(str(error), width=110, break_long_words=False, break_on_hyphens=False))
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def stderr_log(quiet: bool) -> Callable[[str], None]:
    """Where a command's progress messages go: stderr (flushed), or nowhere with ``--quiet``."""
    if quiet:
        return lambda message: None
    return lambda message: print(message, file=sys.stderr, flush=True)


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    from .errors import AdapterCheckpointError, MergeError, UnsupportedTargetError
    from .merge.errors import CheckpointFileError, UnsupportedAdapterError

    return (
        AdapterCheckpointError,
        CheckpointFileError,
        UnsupportedAdapterError,
        UnsupportedTargetError,
        MergeError,
        ValueError,
        OSError,
    )


def run_command(prog: str, action: Callable[[], str | None], *, interrupted: str = "nothing written") -> int:
    """Run ``action``; print what it returns; map the package's errors to the exit codes above."""
    from .merge.errors import InsufficientSpaceError, OutputExistsError
    from .merge.verify import VerificationError

    try:
        summary = action()
    except OutputExistsError as error:
        return fail(prog, error, OUTPUT_EXISTS)
    except InsufficientSpaceError as error:
        return fail(prog, error, DISK_FULL)
    except VerificationError as error:
        return fail(prog, error, CHECK_FAILED)
    except _bad_input_errors() as error:
        return fail(prog, error, BAD_INPUT)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {interrupted}.", file=sys.stderr)
        return INTERRUPTED
    if summary:
        print(summary)
    return OK
