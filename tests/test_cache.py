"""The stage cache: keyed by what determines a stage, computed once across processes,
validated on load, recomputed (never used, never a crash) when damaged."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import time
from pathlib import Path

from transferlab.cache import StageCache, cache_key


def counting_compute(log_file: Path, value: str, delay: float = 0.0):
    def compute(folder: Path) -> None:
        time.sleep(delay)
        with open(log_file, "a") as f:
            f.write(value + "\n")
        (folder / "value.txt").write_text(value)
    return compute


def read_value(folder: Path) -> str:
    return (folder / "value.txt").read_text()


def test_key_depends_on_every_setting_and_nothing_else():
    assert cache_key({"a": 1, "b": [1, 2]}) == cache_key({"b": [1, 2], "a": 1})
    assert cache_key({"a": 1}) != cache_key({"a": 2})
    assert cache_key({"a": 1}) != cache_key({"a": 1, "b": None})


def test_hit_and_miss_by_key(tmp_path):
    cache, log_file = StageCache(tmp_path / "cache"), tmp_path / "computed.log"
    assert cache.fetch("source", {"seed": 0}, counting_compute(log_file, "zero"), read_value) == ("zero", False)
    assert cache.fetch("source", {"seed": 0}, counting_compute(log_file, "other"), read_value) == ("zero", True)
    assert cache.fetch("source", {"seed": 1}, counting_compute(log_file, "one"), read_value) == ("one", False)
    assert log_file.read_text().split() == ["zero", "one"]
    assert not list((tmp_path / "cache" / "source").glob(".*.tmp"))  # no temp folders left behind


def test_corrupt_entry_is_recomputed_with_a_warning(tmp_path, caplog):
    cache, log_file = StageCache(tmp_path / "cache"), tmp_path / "computed.log"
    cache.fetch("source", {"seed": 0}, counting_compute(log_file, "v1"), read_value)
    [entry] = [p for p in (tmp_path / "cache" / "source").iterdir() if p.is_dir()]
    (entry / "value.txt").write_text("tampered")
    with caplog.at_level(logging.WARNING, logger="transferlab.cache"):
        value, hit = cache.fetch("source", {"seed": 0}, counting_compute(log_file, "v2"), read_value)
    assert (value, hit) == ("v2", False)
    assert "failed validation" in caplog.text and "checksum mismatch" in caplog.text
    assert log_file.read_text().split() == ["v1", "v2"]


def test_entry_rejected_by_its_loader_is_recomputed(tmp_path):
    cache, log_file = StageCache(tmp_path / "cache"), tmp_path / "computed.log"
    cache.fetch("fisher", {"k": 1}, counting_compute(log_file, "bad-shape"), read_value)

    def strict_load(folder: Path) -> str:
        value = read_value(folder)
        if value == "bad-shape":
            raise ValueError("shape mismatch")
        return value

    assert cache.fetch("fisher", {"k": 1}, counting_compute(log_file, "good"), strict_load) == ("good", False)
    assert cache.fetch("fisher", {"k": 1}, counting_compute(log_file, "never"), strict_load) == ("good", True)


def _worker(root: str, log_file: str, value: str, out: str) -> None:
    result = StageCache(root).fetch("source", {"seed": 7}, counting_compute(Path(log_file), value, delay=1.0),
                                    read_value)
    Path(out).write_text(json.dumps(result))


def test_two_processes_compute_one_entry_once(tmp_path):
    ctx = mp.get_context("spawn")
    log_file = tmp_path / "computed.log"
    procs = [ctx.Process(target=_worker, args=(str(tmp_path / "cache"), str(log_file), name, str(tmp_path / name)))
             for name in ("first", "second")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    computed = log_file.read_text().split()
    assert len(computed) == 1  # the other process waited on the lock, then hit the entry
    results = sorted(json.loads((tmp_path / name).read_text()) for name in ("first", "second"))
    assert [value for value, _ in results] == computed * 2
    assert sorted(hit for _, hit in results) == [False, True]


def test_runs_share_the_source_stage_but_not_across_source_settings(make_cfg, tmp_path):
    from transferlab.experiment import run_experiment

    a = run_experiment(make_cfg("target.lr=1e-2"), tmp_path / "a")["metrics"]
    b = run_experiment(make_cfg("target.lr=3e-3", "regularizer=l2sp"), tmp_path / "b")["metrics"]
    c = run_experiment(make_cfg("source.lr=3e-3"), tmp_path / "c")["metrics"]
    d = run_experiment(make_cfg("cache=off"), tmp_path / "d")["metrics"]
    assert (a["cache/source_hit"], b["cache/source_hit"], c["cache/source_hit"]) == (False, True, False)
    assert d["cache/source_hit"] is None
    assert b["source/test_acc_before"] == a["source/test_acc_before"] == d["source/test_acc_before"]
    assert d["target/test_acc"] == a["target/test_acc"]  # cached or not, the same numbers
    assert (tmp_path / "b" / "checkpoints" / "source.pt").is_file()  # every run dir keeps its own copy
    assert len([p for p in (tmp_path / "outputs" / "cache" / "source").iterdir() if p.is_dir()]) == 2
