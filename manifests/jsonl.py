"""JSON-lines records, the resumable form of every stage's results: one format and one fsynced appender, used by
the stages' journals (units.Journal) and score-video's record (stages/score_store.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable


def json_line(record: dict) -> bytes:
    """One record as one line: sorted keys (a rewritten file compares equal byte for byte), UTF-8 as it is."""
    return json.dumps(record, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8") + b"\n"


def json_lines(records: Iterable[dict]) -> bytes:
    return b"".join(map(json_line, records))


class Appender:
    """Append-only, fsynced: a record is on disk when `append` returns, so a crash loses at most the line being
    written, whose torn rest (no newline) is cut when the file is next opened, so that the next record is not
    glued onto it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f = open(self.path, "a+b")  # writes always append; the reads are for the torn tail
        end = self._f.seek(0, os.SEEK_END)
        if end:
            self._f.seek(end - 1)
            if self._f.read(1) != b"\n":  # torn: only then is the file read whole, to cut back to its last line
                self._f.seek(0)
                self._f.truncate(self._f.read().rfind(b"\n") + 1)

    def append(self, record: dict) -> None:
        self._f.write(json_line(record))
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> Appender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
