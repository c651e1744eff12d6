"""A workspace folder: where every output of one dataset lives, and who may write it.

Layout: ``manifests/`` (CSV tables, journals, locks), ``frames/<unit>/``, ``faces/<unit>/``, ``tmp/``.
Every path derived from a video id goes through :meth:`Workspace.unit_dir`, which flattens the id into one
safe folder name, so a hostile id like ``../../x`` can never write outside the workspace.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import DfpipeError
from .table import check_writable


class WorkspaceError(DfpipeError, RuntimeError):
    pass


@dataclass(frozen=True)
class Shard:
    """``--shard I/N``: this process owns the units whose stable hash lands in bucket I of N."""
    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str | None) -> "Shard":
        if not text:
            return cls()
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
            raise WorkspaceError(f"--shard '{text}': expected I/N with 0 <= I < N, e.g. 0/4")
        return cls(int(m.group(1)), int(m.group(2)))

    @property
    def name(self) -> str:
        return f"{self.index}-of-{self.count}"

    def owns(self, unit_id: str) -> bool:
        import hashlib
        if self.count == 1:
            return True
        h = int.from_bytes(hashlib.sha256(unit_id.encode("utf-8")).digest()[:8], "big")
        return h % self.count == self.index


_UNSAFE = re.compile(r"[\x00-\x1f/\\]")


def safe_name(unit_id: str) -> str:
    """One folder name per id: separators become '__', and names that mean a parent are refused."""
    name = _UNSAFE.sub("__", unit_id.strip())
    if name in ("", ".", "..") or name.startswith(".."):
        name = "_" + name
    return name


def _holder(path: Path) -> str:
    """The note an exclusive holder writes into its lock file, which may not be written yet when it has just taken
    the lock."""
    for _ in range(20):
        note = path.read_text(errors="replace").strip()
        if note:
            return note
        time.sleep(0.01)
    return "another process"


class LockHeld(DfpipeError):
    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


@contextmanager
def lock_file(path: Path, *, shared: bool = False) -> Iterator[None]:
    """An flock on `path` for the duration; LockHeld (naming the holder) at once when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask decides, as for every file
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise LockHeld(_holder(path)) from None
        if not shared:  # written over the last holder's note, then cut: a reader never finds it empty
            note = f"pid {os.getpid()} on {socket.gethostname()}".encode()
            os.pwrite(fd, note, 0)
            os.ftruncate(fd, len(note))
        yield
    finally:
        os.close(fd)


class Workspace:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.manifests = self.root / "manifests"

    def init(self) -> "Workspace":
        """Create the workspace, or check an existing one is writable: a read-only one must be one error up front,
        not a failed row for every video that needs a rerun with --retry-failed once it is fixed."""
        try:
            self.manifests.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WorkspaceError(f"{self.root}: cannot create workspace ({e.strerror})") from None
        for folder in (self.root, self.manifests):
            try:
                check_writable(folder)
            except OSError as e:
                reason = os.strerror(e.errno) if e.errno else str(e)
                raise WorkspaceError(f"{folder}: workspace is not writable ({reason})") from None
        return self

    def manifest(self, name: str) -> Path:
        return self.manifests / name

    def inside(self, path: str | Path) -> Path:
        """Resolve a workspace-relative path, refusing anything that escapes the workspace."""
        p = (self.root / path).resolve()
        if p != self.root and self.root not in p.parents:
            raise WorkspaceError(f"{path}: path escapes the workspace {self.root}")
        return p

    def rel(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.root).as_posix()

    def unit_dir(self, area: str, unit_id: str) -> Path:
        return self.inside(Path(area) / safe_name(unit_id))

    def tmp_dir(self, stage: str, shard: Shard) -> Path:
        """Private scratch of one (stage, shard) writer; emptied when that writer starts."""
        return self.inside(Path("tmp") / f"{stage}.{shard.name}")

    @contextmanager
    def lock(self, name: str, *, shared: bool = False, what: str = "") -> Iterator[None]:
        """An flock on ``manifests/locks/<name>``; refused at once (not waited for) when held elsewhere."""
        lock_dir = self.manifests / "locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        try:
            with lock_file(lock_dir / f"{name}.lock", shared=shared):
                yield
        except LockHeld as e:
            raise WorkspaceError(f"{self.root}: {what or name} is in use by {e.holder}; wait for it to finish "
                                 f"(or use --shard I/N to split the work between processes)") from None

    def held(self, name: str) -> bool:
        """Whether another process holds lock ``name`` (shared or exclusive); takes it for no longer than the test
        and writes nothing. Tried a few times: two processes testing at the same instant must not see each other's
        test as a holder (a real one holds it for its whole run)."""
        path = self.manifests / "locks" / f"{name}.lock"
        if not path.exists():
            return False
        for _ in range(5):
            fd = os.open(path, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return False
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            finally:
                os.close(fd)  # closing releases the lock
            time.sleep(0.01)
        return True

    @contextmanager
    def reading(self, stage: str, reader: str) -> Iterator[None]:
        """Held by a command that reads ``stage``'s outputs (align: extract's frames; train: align's crops). A writer of
        ``stage``, sharded or not, refuses to start meanwhile (`refuse_if_read`), and none may be running now. The
        readers' lock is a file of its own, so readers never block each other, `verify`, or journal merges. Each side
        takes its own lock before it tests the other's, so two that start together cannot both miss each other."""
        with self.lock(f"{stage}.readers", shared=True, what=f"the {stage} outputs"):
            if self.held(stage):
                raise WorkspaceError(f"{self.root}: {stage} is running; wait for it to finish, then run {reader}")
            yield

    def refuse_if_read(self, stage: str) -> None:
        """For a writer of ``stage``, once it holds its own lock (see `reading`)."""
        if self.held(f"{stage}.readers"):
            raise WorkspaceError(f"{self.root}: another dfpipe command is reading the {stage} outputs (align reads "
                                 "extract's frames, train align's crops); wait for it to finish")

    def try_lock(self, name: str):
        """The exclusive lock if free right now, else None (for opportunistic merges)."""
        cm = self.lock(name)
        try:
            cm.__enter__()
        except WorkspaceError:
            return None
        return cm


def replace_dir(src: Path, dst: Path) -> None:
    """Put a finished unit's folder in place; the old one is moved aside first and removed after."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if dst.exists():
        old = src.parent / (src.name + ".old")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
