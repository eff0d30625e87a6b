"""Atomic writes: a reader (a resumed run, another job of a sweep) never sees half a file. And
files' digests."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` writes the file's content to a temporary path beside `path`, which then
    replaces `path` in one rename (e.g. `atomic_write(p, lambda tmp: torch.save(obj, tmp))`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    tmp.replace(path)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (checkpoints can be large)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
