"""The one error model, in the lowest layer because every layer raises it.

A `DfpipeError` is an error dfpipe explains: bad input, a setting, a workspace or run it cannot use. The command
line prints it as one line and exits 2. Any other exception is a bug: the command line writes its traceback to a
log file (`write_traceback`) and exits 3, so that a bug never passes for a bad input, nor for a failed video
(exit 1, whose manifest row says why).
"""
from __future__ import annotations

import os
import tempfile
import traceback
from datetime import datetime, timezone
from pathlib import Path


# Exit codes, the same for every command.
EXIT_OK = 0
EXIT_FAILED_UNITS = 1   # some inputs failed; their rows say why
EXIT_BAD_INPUT = 2      # a DfpipeError (or an OS error): one line
EXIT_INTERNAL = 3       # a bug: its traceback is in a log file
EXIT_INTERRUPTED = 130  # the shell's code for Ctrl-C


class DfpipeError(Exception):
    """An error the user can act on, reported as one line."""


class InputError(DfpipeError, ValueError):
    """A bad value: a setting, a file's contents, a manifest. Also a ValueError, for callers that catch one."""


def write_traceback(exc: BaseException, folders: list[str | Path | None]) -> Path:
    """Writes the traceback of ``exc`` to dfpipe-error-<UTC time>-<pid>.log in the first of ``folders`` that is an
    existing, writable folder (the run folder, the workspace...), else the system's temp folder; returns its path."""
    from .table import atomic_write_bytes  # table's own errors derive from DfpipeError: imported here, not above
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    text = "".join(traceback.format_exception(exc)).encode()
    for folder in [*folders, tempfile.gettempdir()]:
        if folder is None or not Path(folder).is_dir() or not os.access(folder, os.W_OK):
            continue
        path = Path(folder) / f"dfpipe-error-{stamp}-{os.getpid()}.log"
        try:
            atomic_write_bytes(path, text)
        except OSError:
            continue
        return path.resolve()
    raise OSError(f"cannot write the traceback anywhere ({', '.join(map(str, folders))}, the temp folder)")
