"""The one way fedit writes a file or a folder: under a temporary name, then renamed into place.

A reader (or a resumed run) therefore never sees a half-written file under its real name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from fedit.errors import FeditError


class OutputError(FeditError, OSError):
    """An output folder fedit cannot write to; the message names it."""


def writable_folder(path: Path, what: str = "output folder") -> Path:
    """`path` as a folder fedit can write into (created if missing), checked before any work.

    Tried by writing, not by permission bits: a read-only mount or a root-owned folder says no
    the same way.
    """
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: the {what} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise OutputError(f"{path}: cannot write the {what} there: {e.strerror or e}") from None
    return path


@contextmanager
def atomic_file(path: Path, binary: bool = False, mode: int = 0o644) -> Iterator[IO[Any]]:
    """An open file that appears as `path` only once the block has finished without error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        kind: str = "wb" if binary else "w"
        with os.fdopen(fd, kind, encoding=None if binary else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_text(path: Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def atomic_bytes(path: Path, data: bytes, private: bool = False) -> None:
    """`private`: readable by the owner only (keys)."""
    with atomic_file(path, binary=True, mode=0o600 if private else 0o644) as f:
        f.write(data)


def atomic_json(path: Path, data: Any, indent: int | None = 1) -> None:
    atomic_text(path, json.dumps(data, indent=indent) + "\n")


def atomic_lines(path: Path, rows: Iterable[Any]) -> None:
    """JSON lines, one value per line."""
    with atomic_file(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def atomic_dir(final: Path, fill: Callable[[Path], None]) -> Path:
    """`fill(tmp)` writes a folder's files; then it replaces `final` (an old one moved aside)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    old = final.with_name(f".{final.name}.old")
    try:
        fill(tmp)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return final


def append_line(path: Path, row: Any) -> None:
    """One JSON line appended and synced (metrics logs: a crash loses at most this line)."""
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
