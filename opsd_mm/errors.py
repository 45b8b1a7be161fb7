"""User-facing errors, and how the command line reports them.

A :class:`UserError` is a problem with what the user gave (a config key, a data file, a row, a
flag, a benchmark copy): its message names that thing and says what to do, so the command line
prints it as one or a few lines and exits 2, without a traceback. So do OS errors about the
user's files and disks (:data:`USER_ERRNOS`: a missing path, a file where a directory belongs,
no permission, a read-only filesystem, a full disk or quota). Anything else is a bug and keeps
its traceback. ``--debug`` (or ``OPSD_MM_DEBUG=1``) prints the traceback of user errors
too. Ctrl-C exits 130 with one line.
"""

from __future__ import annotations

import errno
import os
import re
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


# OS errors about the user's files and disks rather than about our code: a path that is missing,
# is a file where a directory is needed (or the reverse), already exists, cannot be written
# (permissions, a read-only filesystem), or a disk or quota that is full. The standard library
# puts the path in the message. Others (EIO, EMFILE, EXDEV, ...) point at the machine or at a
# bug and keep their traceback.
USER_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EEXIST,
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.ENAMETOOLONG,
        errno.ELOOP,
    }
)
# The OSError subclasses of those numbers, which code (ours, libraries') also raises with a
# message and no number: FileNotFoundError("no weights in DIR").
_USER_OS_CLASSES = (
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    FileExistsError,
    PermissionError,
)
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def is_user_os_error(e: BaseException) -> bool:
    """``e`` is an OSError about the user's files or disks (:data:`USER_ERRNOS`)."""
    return isinstance(e, _USER_OS_CLASSES) or (isinstance(e, OSError) and e.errno in USER_ERRNOS)


def user_os_error(e: BaseException) -> OSError | None:
    """The OS error behind ``e`` when it is one of :data:`USER_ERRNOS`, else None.

    Looks at ``e`` itself, then at its cause and context (``torch.save`` to a Python file
    object re-raises a failed write as a RuntimeError whose context is the OSError), and at
    the ``(os error N)`` that Rust libraries (safetensors) put in their messages."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if is_user_os_error(e):
            return e
        found = _RUST_OS_ERROR.search(str(e))
        if found and int(found.group(1)) in USER_ERRNOS:
            code = int(found.group(1))
            return OSError(code, os.strerror(code))
        e = e.__cause__ or e.__context__
    return None


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
    except (UserError, OSError) as e:
        if isinstance(e, OSError) and not is_user_os_error(e):
            raise
        if debug:
            traceback.print_exc()
        kind = getattr(e, "kind", "error")
        print(f"{kind}: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
