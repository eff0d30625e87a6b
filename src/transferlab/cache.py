"""A stage cache shared by every job of a sweep.

What a stage produces (the source stage's weights and metrics, the EWC Fisher) is stored under
``<root>/<kind>/<key>/`` where the key hashes exactly the settings that determine it (data,
backbone, source settings, seed; never target settings). Every job with the same key reuses the
entry instead of recomputing it.

- Writes are atomic: an entry is built in a temporary folder and renamed into place.
- Processes that need the same missing entry compute it once: the others wait on a lock, then
  find the entry. `lock="flock"`: filelock's FileLock (flock(2); the kernel releases it when the
  holder dies). `lock="soft"`: `SoftLock`, an atomic-create lock file for shared filesystems where
  flock is unsupported or node-local; a holder that is gone (dead pid on this host, or no heartbeat
  for `stale_lock_s`) has its lock broken with a warning. `lock="auto"`: soft on network and
  cluster filesystems (NFS, Lustre, GPFS, CIFS, …, from the cache dir's mount type), flock else.
- A writer killed mid-write leaves only its temporary folder: no manifest, no entry (the next
  writer on that host removes the folder).
- An entry is validated on load (file checksums from its manifest, then the caller's own loading,
  e.g. tensor shapes). One that fails is recomputed with a warning: never a crash, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

import torch
from filelock import FileLock, Timeout

from transferlab.collectives import barrier, broadcast_from_zero, rank_and_world_size
from transferlab.errors import ConfigError

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


# Filesystems shared between nodes, where flock is unsupported, emulated or node-local.
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "ceph", "fuse.ceph", "cephfs", "glusterfs",
    "fuse.glusterfs", "beegfs", "panfs", "afs", "wekafs", "9p", "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse",
    "fuse.juicefs", "orangefs", "pvfs2"})  # not ocfs2/gfs2: their flock is cluster-wide
LOCKS = ("auto", "flock", "soft")


def mount_type(path: str | Path, mounts: str | None = None) -> str | None:
    """The filesystem type of the mount holding `path`: the longest mount point that contains it in
    /proc/self/mounts (or the given text in that format); None when that cannot be read."""
    if mounts is None:
        try:
            mounts = Path("/proc/self/mounts").read_text()
        except OSError:
            return None
    target = os.path.realpath(path)
    best, best_type = "", None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])  # "\040" is a space
        inside = point == "/" or target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):  # >=: a later mount over the same point hides the earlier
            best, best_type = point, fields[2]
    return best_type


def choose_lock(lock: str, folder: str | Path, mounts: str | None = None) -> str:
    """"flock" or "soft" for cache.lock=auto|flock|soft and the cache dir `folder`."""
    if lock not in LOCKS:
        raise ConfigError(f"cache.lock={lock}: choose auto, flock or soft")
    if lock != "auto":
        return lock
    return "soft" if mount_type(folder, mounts) in NETWORK_FILESYSTEMS else "flock"


class SoftLock:
    """A lock that needs no flock: the holder creates the lock file atomically (O_CREAT|O_EXCL,
    atomic on local disks and on NFSv3+, Lustre, GPFS), writes its host and pid into it, and
    refreshes its mtime from a heartbeat thread every stale_s/10 s while it holds it.

    A waiter breaks the lock (with a warning) when its holder is gone: on the same host, its pid
    no longer exists; on any host, the lock file has not changed for stale_s by the *waiter's*
    clock (so clock skew between nodes does not matter; keep stale_s well above the filesystem's
    attribute cache time, e.g. NFS actimeo, 60 s at most by default). Breaking happens under a
    second atomic-create file and only if the lock is still the one seen stale, so two waiters
    never both break it or remove a fresh lock."""

    def __init__(self, path: str | Path, timeout_s: float = 3600, stale_s: float = 300):
        self.path, self.timeout_s, self.stale_s = Path(path), timeout_s, stale_s
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def __enter__(self) -> SoftLock:
        deadline = time.monotonic() + self.timeout_s
        seen: tuple | None = None  # (the lock file's signature, when this waiter first saw it)
        delay = 0.02
        while not self._try_create(self.path):
            signature, holder = self._inspect(self.path)
            if signature is None:  # released between our create and our look: try again now
                continue
            if seen is None or seen[0] != signature:
                seen = (signature, time.monotonic())
            if holder_is_dead(holder):
                self._break(signature, f"its holder (pid {holder.get('pid')} on this host) is gone")
            elif time.monotonic() - seen[1] > self.stale_s:
                self._break(signature, f"unchanged for {self.stale_s:g} s (holder {holder or 'unknown'})")
            elif time.monotonic() > deadline:
                raise Timeout(str(self.path))
            else:
                time.sleep(delay)
                delay = min(delay * 1.5, 1.0)
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name="cache-lock-heartbeat", daemon=True)
        self._heartbeat.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        try:
            self.path.unlink()
        except FileNotFoundError:
            log.warning("cache lock %s was broken by another process while held here", self.path)

    @staticmethod
    def _try_create(path: Path) -> bool:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "created": time.time()}, f)
        return True

    @staticmethod
    def _inspect(path: Path) -> tuple[tuple | None, dict]:
        """(signature, holder) of the lock file; opening it revalidates NFS's cached attributes."""
        try:
            with open(path) as f:
                st = os.fstat(f.fileno())
                text = f.read()
        except FileNotFoundError:
            return None, {}
        try:
            holder = json.loads(text)
        except ValueError:  # being written right now
            holder = {}
        return (st.st_ino, st.st_mtime_ns, st.st_size), holder if isinstance(holder, dict) else {}

    def _break(self, signature: tuple, why: str) -> None:
        breaker = self.path.with_name(self.path.name + ".break")
        if not self._try_create(breaker):
            # Another waiter is breaking it (a breaker lives microseconds); one left by a waiter
            # that died right there is removed once it is itself stale.
            breaker_signature, holder = self._inspect(breaker)
            if breaker_signature is not None and (holder_is_dead(holder) or
                                                  time.time() - holder.get("created", time.time()) > self.stale_s):
                breaker.unlink(missing_ok=True)
            time.sleep(0.05)
            return
        try:
            if self._inspect(self.path)[0] == signature:  # still the lock we judged, not a fresh one
                log.warning("breaking cache lock %s: %s", self.path, why)
                self.path.unlink(missing_ok=True)
        finally:
            breaker.unlink(missing_ok=True)

    def _beat(self) -> None:
        interval = max(self.stale_s / 10, 0.05)
        while not self._stop.wait(interval):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return


def holder_is_dead(holder: dict) -> bool:
    """Whether a lock's holder was a process on this host that no longer exists."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


def remove_dead_writers(entry: Path) -> None:
    """Delete the temporary folders of writers of `entry` that died on this host (a job killed
    mid-compute leaves `.<key>.<host>.<pid>.tmp`, e.g. a source stage's weights). Only this host's,
    and only dead pids: a live writer elsewhere (a DDP rank 0 builds without the lock) is left alone."""
    prefix = f".{entry.name}."
    for tmp in entry.parent.glob(f"{prefix}*.tmp"):
        host, _, pid = tmp.name[len(prefix):-len(".tmp")].rpartition(".")
        if pid.isdigit() and holder_is_dead({"host": host, "pid": int(pid)}):
            log.info("removing %s, left by a writer that died", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


# the file names these kinds' entries have always had (entries already written stay valid)
TENSOR_FILES = {"method_statistics": "stats.pt", "frozen_blocks": "outputs.pt"}


class StageCache:
    def __init__(self, root: str | Path, lock_timeout_s: float = 3600, lock: str = "auto",
                 stale_lock_s: float = 300):
        self.root = Path(root)
        self.lock_timeout_s = lock_timeout_s
        self.lock, self.stale_lock_s = lock, stale_lock_s
        if lock not in LOCKS:  # fail here, before any stage runs
            raise ConfigError(f"cache.lock={lock}: choose auto, flock or soft")
        self._lock_kind: str | None = None  # decided at the first lock, when the cache dir exists

    def _lock(self, entry: Path):
        if self._lock_kind is None:
            self._lock_kind = choose_lock(self.lock, entry.parent)
            log.info("cache lock: %s (cache.lock=%s, %s is on %s)", self._lock_kind, self.lock, entry.parent,
                     mount_type(entry.parent) or "an unknown filesystem")
        path = str(entry) + ".lock"
        if self._lock_kind == "soft":
            return SoftLock(path, timeout_s=self.lock_timeout_s, stale_s=self.stale_lock_s)
        return FileLock(path, timeout=self.lock_timeout_s)

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
        with self._lock(entry):
            value = self._try_load(kind, key, entry, load)  # another job may have just written it
            if value is not None:
                return value, True
            log.info("cache miss: %s %s — computing", kind, key)
            remove_dead_writers(entry)
            self._build(entry, settings, compute)
        value = self._try_load(kind, key, entry, load, announce=False)
        if value is None:
            raise RuntimeError(f"cache entry {entry} failed validation right after it was written")
        return value, False

    def fetch_tensors(self, kind: str, settings: dict, compute: Callable[[], dict],
                      use: Callable[[dict], T] = lambda tensors: tensors) -> tuple[T, bool]:
        """`fetch` for a result that is a dict of tensors (one file): (use(tensors), hit). `use`
        may raise to reject a loaded entry (it is then recomputed)."""
        name = TENSOR_FILES.get(kind, "tensors.pt")

        def build(folder: Path) -> None:
            torch.save(compute(), folder / name)

        def load(folder: Path) -> tuple[T]:  # in a tuple: `use` may return None, which is not a miss
            return (use(torch.load(folder / name, map_location="cpu", weights_only=True)),)

        (value,), hit = self.fetch(kind, settings, build, load)
        return value, hit

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
        tmp = entry.with_name(f".{entry.name}.{socket.gethostname()}.{os.getpid()}.tmp")
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
