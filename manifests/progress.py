"""What a running command shows, on a terminal and in a log.

On a terminal, tqdm bars. Written to a file or a pipe (a Slurm log, `| tee`), a bar's redrawn frames become one
carriage-return frame per batch, which no one can read: there a bar is a plain line every `INTERVAL` seconds
(counts, rate, ETA) and never a carriage return. Lines between bars go through ``tqdm.write`` so that they do not
break a bar: results on stdout (`say`), notes and warnings on stderr (`note`, `warn`; -q silences notes). `tee`
copies all of it into a log file, as lines. In the lowest layer because `manifests.units` runs the stages' bars.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, TextIO

from tqdm import tqdm

INTERVAL = 30.0  # seconds between two plain progress lines (tests set 0: a line per update)
_settings = {"quiet": False}


def configure(*, quiet: bool) -> None:
    """The command line's -q: no notes (warnings, errors and results stay); its stages get no bars either."""
    _settings["quiet"] = quiet


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
        leave: bool = True, enabled: bool = True, file: TextIO | None = None):
    """A tqdm bar on a terminal, plain lines elsewhere, nothing when not ``enabled``; used as tqdm is (iterate,
    ``update``, ``set_postfix``, a context manager)."""
    file = file or sys.stderr
    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    if _is_terminal(file):
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=file, dynamic_ncols=True)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, leave=leave, file=file)


class LineProgress:
    """A bar for logs: a line at most every `INTERVAL` seconds, and one at the end when ``leave`` (the per-epoch
    bars of train do not leave one: the epoch's own line follows)."""

    def __init__(self, iterable: Iterable | None, *, total: int | None, desc: str, unit: str, leave: bool,
                 file: TextIO):
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit, self.leave, self.file = (iterable, total, desc, unit,
                                                                                   leave, file)
        self.n = self.shown = 0
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.closed = False

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= INTERVAL:
            self._line()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed and self.leave and self.n != self.shown:
            self._line()
        self.closed = True

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.n / elapsed if elapsed > 0 else None
        parts = [f"{self.n}/{self.total} {self.unit}" if self.total is not None else f"{self.n} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(_rate(rate, self.unit))
        parts.append(f"elapsed {tqdm.format_interval(elapsed)}")
        if self.total is not None and rate:
            parts.append(f"ETA {tqdm.format_interval(max(self.total - self.n, 0) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        return f"{self.desc}: " * bool(self.desc) + ", ".join(parts)

    def _line(self) -> None:
        tqdm.write(self.line(), file=self.file)
        self.file.flush()
        self.last, self.shown = time.monotonic(), self.n


def _rate(per_second: float | None, unit: str) -> str:
    """As tqdm writes it: units per second, or seconds per unit below one a second (a training batch on a CPU)."""
    if not per_second:
        return f"? {unit}/s"
    if per_second < 1:
        return f"{1 / per_second:.3g} s/{unit}"
    return f"{per_second:.3g} {unit}/s" if per_second < 1000 else f"{per_second:.0f} {unit}/s"


def say(line: str) -> None:
    """A result (an epoch's metrics, a summary): stdout."""
    tqdm.write(line, file=sys.stdout)


def warn(line: str) -> None:
    """Something the user should act on or know even with -q: stderr."""
    tqdm.write(line, file=sys.stderr)


def note(line: str) -> None:
    """What happens and why (a choice made, work skipped): stderr, silenced by -q."""
    if not _settings["quiet"]:
        warn(line)


# ---------------------------------------------------------------- the copy in a log file

class _LogFile:
    """Appends lines to ``path`` once its folder exists (a run folder is made only once the run is accepted, and a
    refused run must not leave one behind); until then they wait in memory."""

    def __init__(self, path: Path, header: str):
        self.path, self.waiting, self.file = path, [header], None

    def add(self, text: str) -> None:
        if self.file is None:
            self.waiting.append(text)
            if not self.path.parent.is_dir():
                return
            self.file = open(self.path, "a", encoding="utf-8")
            text, self.waiting = "".join(self.waiting), []
        self.file.write(text)
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class _Tee:
    """A text stream writing through to ``stream`` and, line by line, to the log. A terminal bar redraws its line
    after a carriage return; the log gets only what is left of a line when it ends, so no frame and no '\\r'."""

    def __init__(self, stream: TextIO, log: _LogFile):
        self.stream, self.log, self.pending = stream, log, ""

    def write(self, text: str) -> int:
        written = self.stream.write(text)  # first: bytes are refused here, as the stream does (click probes so)
        *lines, self.pending = (self.pending + text).split("\n")
        self.pending = self.pending.rsplit("\r", 1)[-1]
        kept = [line.rsplit("\r", 1)[-1] for line in lines]
        if any(line.strip() for line in kept):
            self.log.add("".join(line + "\n" for line in kept if line.strip()))
        return written

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return _is_terminal(self.stream)

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.stream, "encoding", "utf-8")

    @property
    def errors(self) -> str:
        return getattr(self.stream, "errors", "strict")


@contextmanager
def tee(path: str | Path, header: str = "") -> Iterator[None]:
    """While open, everything printed on stdout and stderr is also appended to ``path``, after ``header``."""
    log = _LogFile(Path(path), header)
    saved = sys.stdout, sys.stderr
    streams = sys.stdout, sys.stderr = _Tee(sys.stdout, log), _Tee(sys.stderr, log)
    try:
        yield
    finally:
        for stream in streams:
            if stream.pending.strip():
                log.add(stream.pending + "\n")
        sys.stdout, sys.stderr = saved
        log.close()
