"""Manifest tables on disk: CSV read as text, written atomically.

Values are kept as strings end to end so that reading a manifest and writing it back gives the same bytes;
stages convert the columns they compute with. A write goes to a temp file in the same folder, is fsynced and
renamed over the target, so a crash leaves either the old table or the new one, never half of one.
"""
from __future__ import annotations

import csv
import glob
import io
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Iterable, Mapping

import pandas as pd

from .errors import DfpipeError, InputError

TMP_PREFIX = ".tmp-"
STALE_TMP_SECONDS = 600  # a temp file this old is a killed writer's: a write takes seconds, even of a checkpoint
_UMASK = os.umask(0o022)  # reading the umask means setting it: put it straight back
os.umask(_UMASK)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class NotWritable(DfpipeError, OSError):
    """Names the user's path, not the private temp file the write failed on, and prints without '[Errno N]'."""

    def __str__(self) -> str:
        return self.strerror


def _sweep(folder: Path, prefix: str) -> None:
    """Remove what a writer killed between creating its temp file (or probe) and renaming it left behind: each is
    a whole copy of a table or a checkpoint, and no rerun would ever use it."""
    now = time.time()
    for left in folder.glob(glob.escape(prefix) + "*"):
        try:
            if now - left.lstat().st_mtime > STALE_TMP_SECONDS:
                left.rmdir() if left.is_dir() and not left.is_symlink() else left.unlink()
        except OSError:
            pass  # another process got there first, or the probe folder is not empty: not ours to force


def check_writable(folder: str | Path) -> None:
    """Create `folder` if needed and try a file in it: a write that would fail after the work fails before it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _sweep(folder, TMP_PREFIX + "probe.")
        os.rmdir(tempfile.mkdtemp(prefix=TMP_PREFIX + "probe.", dir=folder))
    except OSError as e:
        raise NotWritable(e.errno, f"{folder}: cannot write there ({e.strerror})") from None


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _sweep(path.parent, TMP_PREFIX + path.name + ".")
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    except OSError as e:
        raise NotWritable(e.errno, f"{path}: cannot write it ({e.strerror})") from None
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's private 0600 would hide manifests and checkpoints from the team
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk, `path` a folder...
        Path(tmp).unlink(missing_ok=True)
        raise NotWritable(e.errno, f"{path}: cannot write it ({e.strerror})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def read_table(path: str | Path, columns: list[str], optional: Iterable[str] = ()) -> pd.DataFrame:
    """A manifest as strings; an absent manifest is an empty table with the expected columns. ``optional``
    columns, added to a table after workspaces were made with it, read as empty where a table lacks them."""
    path = Path(path)
    if not path.exists():
        return pd.DataFrame({c: pd.Series(dtype=str) for c in columns})
    df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8")
    for column in (c for c in optional if c not in df.columns):
        df[column] = ""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(f"{path}: manifest lacks columns {missing} (written by another dfpipe version?)")
    return df[columns]


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def table_bytes(rows: Iterable[Mapping] | pd.DataFrame, columns: list[str]) -> bytes:
    """Cells are converted one by one (never through a float column: '3' must not come back as '3.0')."""
    records = rows.to_dict("records") if isinstance(rows, pd.DataFrame) else rows
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in records:
        writer.writerow([_cell(row.get(c)) for c in columns])
    return buf.getvalue().encode("utf-8")


def write_table(path: str | Path, rows: Iterable[Mapping] | pd.DataFrame, columns: list[str]) -> None:
    data = table_bytes(rows, columns)
    path = Path(path)
    if path.exists() and path.read_bytes() == data:
        return  # unchanged: keep mtime, so readers caching on it stay valid
    atomic_write_bytes(path, data)
