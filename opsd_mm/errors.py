"""User-facing errors, and how the command line reports them.

A :class:`UserError` is a problem with what the user gave (a config key, a data file, a row, a
flag, a benchmark copy): its message names that thing and says what to do, so the command line
prints it as one or a few lines and exits 2, without a traceback. Anything else is a bug and
keeps its traceback. ``--debug`` (or ``OPSD_MM_DEBUG=1``) prints the traceback of user errors
too. Ctrl-C exits 130 with one line.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
DEBUG_ENV = "OPSD_MM_DEBUG"


class UserError(ValueError):
    """A problem with the user's input; ``kind`` prefixes the printed message."""

    kind = "error"


class ConfigError(UserError):
    """A configuration problem; the message names the key (``section.field``)."""

    kind = "config error"


# Raised by the standard library with the path in the message; treated as user errors.
_OS_USER_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def debug_requested(argv: list[str]) -> bool:
    """``--debug`` anywhere on the command line, or ``OPSD_MM_DEBUG`` set to a non-zero value."""
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_command(func: Callable[[Any], int | None], args: Any, *, debug: bool = False) -> int:
    """``func(args)``'s exit code, with user errors as short messages (exit 2) and Ctrl-C as
    exit 130."""
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (UserError, *_OS_USER_ERRORS) as e:
        if debug:
            traceback.print_exc()
        kind = getattr(e, "kind", "error")
        print(f"{kind}: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
