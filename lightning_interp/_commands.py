"""How every plain ``lightning-interp`` command runs: parse, run, errors as one line.

The zoo's, the feature store's and the dashboard's commands are functions taking their argv
and returning an exit code. A library error
(:class:`~lightning_interp.errors.LightningInterpError`) becomes one line on stderr and
exit code 2, as argparse does for a usage error; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from lightning_interp.errors import LightningInterpError

PROG = "lightning-interp"


def error_line(command: str | None, err: BaseException) -> str:
    """``lightning-interp[ command]: error: <first line of err>``, the one line printed."""
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    return f"{PROG}{' ' + command if command else ''}: error: {message}"


def run_command(
    name: str,
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], int | None],
    argv: Sequence[str],
) -> int:
    """Parse ``argv`` with ``parser`` and call ``run``; returns the exit code.

    Args:
        name: The command's name, shown in error lines.
        parser: Its argument parser.
        run: Does the work; returns an exit code (``None`` means 0).
        argv: Arguments after the command name.

    Returns:
        ``run``'s code; argparse's for ``--help`` or a usage error; 2 for a library error.
    """
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exit_:  # --help, or a usage error (already printed)
        return int(exit_.code or 0)
    try:
        return int(run(args) or 0)
    except LightningInterpError as err:
        print(error_line(name, err), file=sys.stderr)
        return 2
