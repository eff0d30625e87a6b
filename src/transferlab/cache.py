"""A stage cache shared by every job of a sweep.

What a stage produces (the source stage's weights and metrics, the EWC Fisher) is stored under
``<root>/<kind>/<key>/`` where the key hashes exactly the settings that determine it (data,
backbone, source settings, seed; never target settings). Every job with the same key reuses the
entry instead of recomputing it.

- Writes are atomic: an entry is built in a temporary folder and renamed into place.
- Two processes that need the same missing entry compute it once: the second waits on a file
  lock, then finds the entry.
- An entry is validated on load (file checksums from its manifest, then the caller's own loading,
  e.g. tensor shapes). One that fails is recomputed with a warning: never a crash, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, TypeVar

from filelock import FileLock

from transferlab.collectives import barrier, broadcast_from_zero, rank_and_world_size

log = logging.getLogger(__name__)
T = TypeVar("T")

MANIFEST = "manifest.json"
# Bump when what a stage computes changes meaning, so old entries stop matching.
CACHE_VERSION = 1


class InvalidEntry(Exception):
    """Raised by a loader for an entry it cannot use."""


def cache_key(settings: dict) -> str:
    blob = json.dumps({"cache_version": CACHE_VERSION, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class StageCache:
    def __init__(self, root: str | Path, lock_timeout_s: float = 3600):
        self.root = Path(root)
        self.lock_timeout_s = lock_timeout_s

    def fetch(self, kind: str, settings: dict, compute: Callable[[Path], None],
              load: Callable[[Path], T]) -> tuple[T, bool]:
        """Return (load(entry), hit). On a miss, `compute(folder)` writes the entry's files."""
        key = cache_key(settings)
        entry = self.root / kind / key
        if rank_and_world_size()[1] > 1:
            return self._fetch_together(kind, key, entry, settings, compute, load)
        value = self._try_load(kind, key, entry, load)
        if value is not None:
            return value, True
        entry.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(entry) + ".lock", timeout=self.lock_timeout_s):
            value = self._try_load(kind, key, entry, load)  # another job may have just written it
            if value is not None:
                return value, True
            log.info("cache miss: %s %s — computing", kind, key)
            self._build(entry, settings, compute)
        value = self._try_load(kind, key, entry, load, announce=False)
        if value is None:
            raise RuntimeError(f"cache entry {entry} failed validation right after it was written")
        return value, False

    def _fetch_together(self, kind: str, key: str, entry: Path, settings: dict, compute: Callable[[Path], None],
                        load: Callable[[Path], T]) -> tuple[T, bool]:
        """Under DDP a missing entry is computed by all ranks together (training is collective):
        rank 0 decides hit or miss for everyone and alone writes the entry. No file lock here:
        rank 0 waiting on another job's lock while its peers train would deadlock."""
        rank = rank_and_world_size()[0]
        value = self._try_load(kind, key, entry, load) if rank == 0 else None
        if broadcast_from_zero(value is not None):
            return (value if rank == 0 else load(entry)), True
        if rank == 0:
            entry.parent.mkdir(parents=True, exist_ok=True)
            self._build(entry, settings, compute)
        else:
            with tempfile.TemporaryDirectory() as scratch:  # the same (collective) work; rank 0 writes
                compute(Path(scratch))
        barrier()  # the entry is in place
        return (self._try_load(kind, key, entry, load, announce=False) if rank == 0 else load(entry)), False

    def _try_load(self, kind: str, key: str, entry: Path, load: Callable[[Path], T],
                  announce: bool = True) -> T | None:
        manifest_path = entry / MANIFEST
        if not manifest_path.is_file():
            return None
        try:
            manifest = json.loads(manifest_path.read_text())
            for name, digest in manifest["files"].items():
                if _sha256(entry / name) != digest:
                    raise InvalidEntry(f"checksum mismatch for {name}")
            value = load(entry)
        except Exception as e:  # noqa: BLE001  any unusable entry is recomputed, never used
            log.warning("cache entry %s failed validation (%s: %s); recomputing it", entry, type(e).__name__, e)
            shutil.rmtree(entry, ignore_errors=True)
            return None
        if announce:
            log.info("cache hit: %s %s", kind, key)
        return value

    def _build(self, entry: Path, settings: dict, compute: Callable[[Path], None]) -> None:
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            compute(tmp)
            files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            manifest = {"settings": settings, "files": files, "created": time.time()}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
            shutil.rmtree(entry, ignore_errors=True)
            os.replace(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
