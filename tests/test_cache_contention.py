"""The stage cache under contention: 16 spawned processes on one missing entry compute it once
and all load the same value (with either lock), a writer SIGKILLed inside compute leaves nothing
a reader accepts, the soft lock's stale rule (dead holder, silent heartbeat; never a live one), and
how cache.lock=auto reads the mount table."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from transferlab.cache import SoftLock, StageCache, choose_lock, mount_type
from transferlab.errors import ConfigError

N_PROCESSES = 16
SETTINGS = {"seed": 7, "what": "contention"}


def compute_tensor(count_file: Path, sleep_s: float = 0.3, die: bool = False):
    """Appends one line per compute to count_file (O_APPEND: whole lines from any process), then
    saves a tensor that differs per process, so a second compute would show in the values."""
    def compute(folder: Path) -> None:
        with open(count_file, "a") as f:
            f.write(f"{os.getpid()}\n")
        torch.save(torch.randn(4, generator=torch.Generator().manual_seed(os.getpid())), folder / "t.pt")
        if die:  # mid-write: the tensor is there, the manifest and the rename are not
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(sleep_s)
    return compute


def load_tensor(folder: Path) -> list[float]:
    return torch.load(folder / "t.pt").tolist()


BARRIER = None


def _init(barrier) -> None:
    global BARRIER
    BARRIER = barrier


def _fetch_together(args: tuple[str, str, str]) -> tuple[int, list[float], bool]:
    root, lock, count_file = args
    BARRIER.wait(timeout=300)  # all 16 ask at once
    value, hit = StageCache(root, lock=lock).fetch("source", SETTINGS, compute_tensor(Path(count_file)), load_tensor)
    return os.getpid(), value, hit


def _fetch_and_die(root: str, lock: str, count_file: str) -> None:
    StageCache(root, lock=lock).fetch("source", SETTINGS, compute_tensor(Path(count_file), die=True), load_tensor)


@pytest.fixture(scope="module")
def pool():
    """16 spawned workers, started once (each imports torch) and shared by both lock kinds."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(N_PROCESSES, initializer=_init, initargs=(ctx.Barrier(N_PROCESSES),)) as workers:
        yield workers


@pytest.mark.slow  # an end-to-end run in subprocesses: CI runs it (.ci/run)
@pytest.mark.parametrize("lock", ["flock", "soft"])
def test_sixteen_processes_compute_a_missing_entry_once(pool, tmp_path, lock):
    count_file = tmp_path / "computes.txt"
    results = pool.map(_fetch_together, [(str(tmp_path / "cache"), lock, str(count_file))] * N_PROCESSES, chunksize=1)
    assert len({pid for pid, _, _ in results}) == N_PROCESSES  # 16 distinct processes asked
    [computer] = count_file.read_text().split()  # computed exactly once
    values = [value for _, value, _ in results]
    assert all(value == values[0] for value in values)
    expected = torch.randn(4, generator=torch.Generator().manual_seed(int(computer))).tolist()
    assert values[0] == expected  # what the one computing process saved
    assert sorted(hit for _, _, hit in results) == [False] + [True] * (N_PROCESSES - 1)
    assert [p.name for p in (tmp_path / "cache" / "source").iterdir() if p.name.endswith(".tmp")] == []
    if lock == "soft":  # released: no lock file left behind
        assert not list((tmp_path / "cache" / "source").glob("*.lock"))


@pytest.mark.parametrize("lock", ["flock", "soft"])
def test_a_writer_killed_mid_write_leaves_no_entry_and_the_next_fetch_recomputes(tmp_path, lock, caplog):
    count_file, root = tmp_path / "computes.txt", tmp_path / "cache"
    writer = mp.get_context("spawn").Process(target=_fetch_and_die, args=(str(root), lock, str(count_file)))
    writer.start()
    writer.join(timeout=120)
    assert writer.exitcode == -signal.SIGKILL
    [dead_pid] = count_file.read_text().split()
    entries = [p for p in (root / "source").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert entries == []  # only the writer's temporary folder: nothing with a manifest
    assert [p.name for p in (root / "source").iterdir() if p.name.endswith(".tmp")] != []
    with caplog.at_level(logging.WARNING, logger="transferlab.cache"):
        start = time.monotonic()
        value, hit = StageCache(root, lock=lock, lock_timeout_s=30).fetch(
            "source", SETTINGS, compute_tensor(count_file, sleep_s=0), load_tensor)
    assert hit is False and count_file.read_text().split() == [dead_pid, str(os.getpid())]
    assert value == torch.randn(4, generator=torch.Generator().manual_seed(os.getpid())).tolist()
    assert time.monotonic() - start < 10  # the dead holder's lock did not make us wait it out
    if lock == "soft":  # the kernel frees a flock; a soft lock file stays until a waiter breaks it
        assert f"pid {int(dead_pid)} on this host) is gone" in caplog.text
    assert StageCache(root, lock=lock).fetch("source", SETTINGS, compute_tensor(count_file), load_tensor) == (value, True)
    assert [p.name for p in (root / "source").iterdir() if p.name.endswith(".tmp")] == []  # the dead writer's, removed


def write_foreign_lock(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": "another-node", "pid": 12345, "created": 0}))


def test_soft_lock_of_a_silent_holder_on_another_node_is_broken_after_the_timeout(tmp_path, caplog):
    lock_path = tmp_path / "entry.lock"
    write_foreign_lock(lock_path)
    with caplog.at_level(logging.WARNING, logger="transferlab.cache"):
        start = time.monotonic()
        with SoftLock(lock_path, timeout_s=30, stale_s=0.5):
            waited = time.monotonic() - start
            assert json.loads(lock_path.read_text())["host"] == socket.gethostname()  # ours now
    assert 0.5 <= waited < 5
    assert "breaking cache lock" in caplog.text and "unchanged for 0.5 s" in caplog.text
    assert not lock_path.exists()


def test_soft_lock_with_a_live_heartbeat_is_never_broken(tmp_path, caplog):
    """Another node holds the lock for 1.5 s, touching it every 0.1 s: a waiter with stale_s=0.5
    waits the whole time and breaks nothing."""
    lock_path = tmp_path / "entry.lock"
    write_foreign_lock(lock_path)
    stop = threading.Event()

    def holder() -> None:
        for _ in range(15):
            stop.wait(0.1)
            os.utime(lock_path)
        lock_path.unlink()

    thread = threading.Thread(target=holder)
    with caplog.at_level(logging.WARNING, logger="transferlab.cache"):
        start = time.monotonic()
        thread.start()
        with SoftLock(lock_path, timeout_s=30, stale_s=0.5):
            waited = time.monotonic() - start
    thread.join()
    assert waited >= 1.4 and "breaking" not in caplog.text


def test_soft_lock_holder_keeps_its_lock_alive_while_computing(tmp_path):
    lock_path = tmp_path / "entry.lock"
    with SoftLock(lock_path, stale_s=0.5):
        first = lock_path.stat().st_mtime_ns
        time.sleep(0.3)
        assert lock_path.stat().st_mtime_ns > first  # the heartbeat (every stale_s/10) moved it


MOUNTS = r"""/dev/vda1 / ext4 rw,relatime 0 0
proc /proc proc rw,nosuid 0 0
tmpfs /tmp tmpfs rw 0 0
nas:/export/home /home nfs4 rw,vers=4.2,addr=10.0.0.1 0 0
10.0.0.2@tcp:/lustre /scratch lustre rw,flock 0 0
/dev/sdb1 /scratch/local ext4 rw 0 0
gpfs0 /gpfs gpfs rw 0 0
//smb/share /mnt/my\040share cifs rw 0 0
/dev/sdc1 /data xfs rw 0 0
nas:/export/data /data nfs rw 0 0
"""


def test_mount_type_is_the_longest_matching_mount_point():
    assert mount_type("/home/alice/outputs/cache", MOUNTS) == "nfs4"
    assert mount_type("/scratch/alice/cache", MOUNTS) == "lustre"
    assert mount_type("/scratch/local/cache", MOUNTS) == "ext4"  # a local disk mounted inside Lustre
    assert mount_type("/scratchy/cache", MOUNTS) == "ext4"  # a prefix of the name is not a parent
    assert mount_type("/mnt/my share/cache", MOUNTS) == "cifs"  # \040 in the mount table is a space
    assert mount_type("/data/cache", MOUNTS) == "nfs"  # mounted over /data later: the later one counts
    assert mount_type("/opt/cache", MOUNTS) == "ext4"
    assert mount_type("/opt/cache", "") is None


def test_auto_picks_soft_on_shared_filesystems_and_flock_elsewhere():
    assert [choose_lock("auto", p, MOUNTS) for p in ("/home/a", "/scratch/a", "/gpfs/a", "/mnt/my share/a")] \
        == ["soft"] * 4
    assert [choose_lock("auto", p, MOUNTS) for p in ("/scratch/local/a", "/tmp/a", "/opt/a")] == ["flock"] * 3
    assert choose_lock("flock", "/home/a", MOUNTS) == "flock" and choose_lock("soft", "/tmp/a", MOUNTS) == "soft"
    with pytest.raises(ConfigError, match="cache.lock=nfs: choose auto, flock or soft"):
        StageCache("/tmp/x", lock="nfs")


def test_only_the_temporary_folders_of_dead_writers_on_this_host_are_removed(tmp_path):
    from transferlab.cache import remove_dead_writers

    dead = subprocess.Popen(["true"])
    dead.wait()
    entry, host = tmp_path / "source" / "abc", socket.gethostname()
    names = [f".abc.{host}.{dead.pid}.tmp", f".abc.{host}.{os.getpid()}.tmp", f".abc.other-node.{dead.pid}.tmp",
             f".abd.{host}.{dead.pid}.tmp"]
    for name in names:
        (tmp_path / "source" / name).mkdir(parents=True)
    remove_dead_writers(entry)
    assert sorted(p.name for p in (tmp_path / "source").iterdir()) == sorted(names[1:])
