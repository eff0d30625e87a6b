"""End to end through `run_experiment` (what the CLI calls): the results contract, the stages,
reproducibility, and every failure leaving status=failed with a one-line error."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from transferlab.errors import NonFiniteLossError, TransferlabError
from transferlab.experiment import run_experiment
from transferlab.results import read_results

REQUIRED = ["target/test_acc", "target/val_acc", "source/test_acc_before", "source/test_acc_after",
            "transfer/forgetting", "params/total", "params/trainable"]


def run(make_cfg, tmp_path, *overrides, name="run"):
    return run_experiment(make_cfg(*overrides), tmp_path / name)


def test_transfer_run_meets_the_results_contract(make_cfg, tmp_path):
    began = time.time()
    results = run(make_cfg, tmp_path, "regularizer=l2sp", "seed=0")
    elapsed = time.time() - began
    on_disk = read_results(tmp_path / "run")
    assert on_disk == json.loads(json.dumps(results))
    assert on_disk["status"] == "completed" and on_disk["error"] is None
    m = on_disk["metrics"]
    assert set(REQUIRED) <= set(m)
    assert 0.5 < m["target/test_acc"] <= 1.0 and 0.5 < m["source/test_acc_before"] <= 1.0  # 5 classes: chance 0.2
    assert m["transfer/forgetting"] == pytest.approx(m["source/test_acc_before"] - m["source/test_acc_after"])
    assert m["params/trainable"] == m["params/total"] > 0
    assert on_disk["config"]["regularizer"]["_target_"].endswith("L2SP")
    prov = on_disk["provenance"]
    assert prov["seed"] == 0
    # The wall time spans the whole run: every stage's own time (timed one after another inside it,
    # each rounded to the ms) and no more than the call took.
    stages = {k: v for k, v in m.items() if k.startswith("time/")}
    assert {"time/source_s", "time/target_fit_s"} <= set(stages) and stages["time/target_fit_s"] > 0
    assert sum(stages.values()) - 0.0005 * (len(stages) + 1) <= prov["wall_time_s"] <= elapsed + 0.0005
    assert prov["versions"]["torch"] == torch.__version__.split("+")[0] or prov["versions"]["torch"].startswith(
        torch.__version__.split("+")[0])
    assert "git_sha" in prov
    for stage in ("source", "target"):
        assert (tmp_path / "run" / "csv" / stage / "metrics.csv").read_text().count("\n") > 1
        assert (tmp_path / "run" / "checkpoints" / f"{stage}.pt").is_file()


def test_source_after_is_the_kept_source_head_on_the_moved_backbone(make_cfg, tmp_path):
    """Recompute source accuracy after the target stage by hand from the saved checkpoints."""
    from hydra.utils import instantiate

    from transferlab.data import make_transfer_data
    from transferlab.heads import classification_head

    cfg = make_cfg("freeze=full")
    m = run_experiment(cfg, tmp_path / "run")["metrics"]
    data = make_transfer_data(instantiate(cfg.data.dataset), cfg.data, seed=cfg.seed)
    backbone = instantiate(cfg.backbone, input_shape=data.input_shape)
    source = torch.load(tmp_path / "run" / "checkpoints" / "source.pt", weights_only=True)
    target = torch.load(tmp_path / "run" / "checkpoints" / "target.pt", weights_only=True)
    head = classification_head(backbone.feature_dim, 5)
    head.load_state_dict(source["head"])
    x, y = data.source.test

    def scores(backbone_state):
        backbone.load_state_dict(backbone_state)
        backbone.eval()
        with torch.no_grad():
            predicted = head(backbone(x)).argmax(-1)
        f1 = []  # macro F1 by hand: per class 2·TP / (2·TP + FP + FN), averaged over the 5 classes
        for c in range(5):
            tp = int(((predicted == c) & (y == c)).sum())
            wrong = int(((predicted == c) != (y == c)).sum())
            f1.append(2 * tp / (2 * tp + wrong) if tp + wrong else 0.0)
        return float((predicted == y).float().mean()), sum(f1) / 5

    acc, f1 = scores(source["backbone"])
    assert (acc, f1) == pytest.approx((m["source/test_acc_before"], m["source/test_macro_f1_before"]))
    acc, f1 = scores(target["backbone"])
    assert (acc, f1) == pytest.approx((m["source/test_acc_after"], m["source/test_macro_f1_after"]))
    assert 0 < m["target/test_macro_f1"] <= 1 and m["target/test_macro_f1"] != m["target/test_acc"]


def test_a_key_added_since_a_run_was_recorded_still_matches_it_when_neutral():
    from transferlab.run_dir import same_config

    recorded = {"seed": 0, "data": {"dataset": "x"}, "trainer": {"precision": "32-true"}}
    now = {"seed": 0, "data": {"dataset": "x", "source_dataset": None},
           "trainer": {"precision": "32-true", "sync_batchnorm": False, "strategy": "auto"}}
    assert same_config(recorded, now)
    assert not same_config(recorded, {**now, "data": {"dataset": "x", "source_dataset": {"_target_": "y"}}})
    assert not same_config(recorded, {**now, "seed": 1})
    assert not same_config({**recorded, "force": False, "data": {"dataset": "x", "source_dataset": None}},
                           {**now, "data": {"dataset": "x", "source_dataset": {"_target_": "y"}}})


def test_linear_probe_forgets_nothing_and_counts_trainable_params(make_cfg, tmp_path):
    m = run(make_cfg, tmp_path, "freeze=linear_probe")["metrics"]
    assert m["transfer/forgetting"] == 0.0
    assert m["params/trainable"] == 16 * 5 + 5  # the head: features(16) x 5 classes + bias


def test_scratch_baseline_has_null_source_metrics(make_cfg, tmp_path):
    results = run(make_cfg, tmp_path, "source=scratch")
    m = results["metrics"]
    assert results["status"] == "completed" and m["target/test_acc"] > 0.3
    assert m["source/test_acc_before"] is None and m["source/test_acc_after"] is None
    assert m["transfer/forgetting"] is None
    assert not (tmp_path / "run" / "checkpoints" / "source.pt").exists()


def test_same_seed_same_numbers_and_seed_zero_is_a_seed(make_cfg, tmp_path, monkeypatch):
    import transferlab.experiment as experiment

    spans, real = [], experiment.method_statistics

    def timed(*args, **kwargs):  # the statistics stage, timed here independently (+ 0.1 s, so 0 is wrong)
        began = time.time()
        time.sleep(0.1)
        try:
            return real(*args, **kwargs)
        finally:
            spans.append(time.time() - began)

    monkeypatch.setattr(experiment, "method_statistics", timed)
    a = run(make_cfg, tmp_path, "seed=0", "regularizer=ewc", name="a")["metrics"]
    b = run(make_cfg, tmp_path, "seed=0", "regularizer=ewc", name="b")["metrics"]
    c = run(make_cfg, tmp_path, "seed=1", "regularizer=ewc", name="c")["metrics"]
    strip = lambda m: {k: v for k, v in m.items()  # noqa: E731  measurements, not results
                       if not k.startswith(("time/", "cache/", "efficiency/"))}
    assert strip(a) == strip(b)  # b took the source stage and the Fisher from the cache: same numbers
    assert (a["cache/source_hit"], b["cache/source_hit"], b["cache/ewc_statistics_hit"]) == (False, True, True)
    assert strip(a) != strip(c)
    # time/ewc_statistics_s: the statistics stage's own span (computed for a, from the cache for b),
    # not less than the span timed around it here, and inside the run's wall time
    assert len(spans) == 3  # one statistics stage per run
    for m, span, name in zip((a, b), spans, "ab"):
        wall = read_results(tmp_path / name)["provenance"]["wall_time_s"]
        assert span - 0.0005 <= m["time/ewc_statistics_s"] <= wall + 0.0005, (m["time/ewc_statistics_s"], span, wall)


def test_checkpoint_source_reuses_a_saved_source_stage(make_cfg, tmp_path):
    first = run(make_cfg, tmp_path, name="first")["metrics"]
    path = tmp_path / "first" / "checkpoints" / "source.pt"
    second = run(make_cfg, tmp_path, "source=checkpoint", f"source.path={path}", "regularizer=ewc",
                 name="second")["metrics"]
    assert second["source/test_acc_before"] == first["source/test_acc_before"]
    assert "source/best_epoch" not in second  # nothing was trained for the source


@pytest.mark.parametrize("content,needle", [(None, "file not found"), (b"garbage" * 10, "cannot be read")])
def test_bad_source_checkpoint_fails_cleanly(make_cfg, tmp_path, content, needle):
    path = tmp_path / "source.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(TransferlabError, match=needle) as info:
        run(make_cfg, tmp_path, "source=checkpoint", f"source.path={path}")
    assert f"source.path={path}" in str(info.value)
    results = read_results(tmp_path / "run")
    assert results["status"] == "failed" and needle in results["error"] and "\n" not in results["error"]


def test_checkpoint_from_another_backbone_says_so(make_cfg, tmp_path):
    run(make_cfg, tmp_path, name="first")
    path = tmp_path / "first" / "checkpoints" / "source.pt"
    with pytest.raises(TransferlabError, match="do not fit backbone"):
        run(make_cfg, tmp_path, "source=checkpoint", f"source.path={path}", "backbone.channels=[8,32]")


@pytest.mark.parametrize("overrides,needle", [
    (["target.lr=-1"], "target.lr=-1.0: must be > 0"),
    (["freeze=partial", "freeze.k=3"], "freeze.k=3: the backbone has 2 blocks"),
    (["data.source_classes=[4,5]"], "overlap on [5]"),
    (["data.target_train_size=100000"], "data.target_train_size=100000 exceeds"),
    (["source=scratch", "regularizer=ewc"], "regularizer=ewc needs a source stage"),
    (["data=fashion_mnist", "paths.fashion_mnist=/nonexistent"], "apt-get install dataset-fashion-mnist"),
])
def test_bad_input_fails_with_one_line_and_no_completed_results(make_cfg, tmp_path, overrides, needle):
    with pytest.raises(TransferlabError) as info:
        run(make_cfg, tmp_path, *overrides)
    assert needle in str(info.value)
    results = read_results(tmp_path / "run")
    assert results["status"] == "failed" and needle in results["error"] and "\n" not in results["error"]


def test_nan_loss_stops_the_run_as_failed(make_cfg, tmp_path):
    with pytest.raises(NonFiniteLossError, match="lower target.lr"):
        run(make_cfg, tmp_path, "target.lr=1e30", "source.epochs=1")
    results = read_results(tmp_path / "run")
    assert results["status"] == "failed" and "training loss became" in results["error"]
    # What was measured before the failure stays (the source stage); no target result is recorded.
    assert results["metrics"]["source/test_acc_before"] is not None
    assert not any(k.startswith("target/test") for k in results["metrics"])
    assert math.isfinite(results["provenance"]["wall_time_s"])


def test_early_stopping_watches_target_validation(make_cfg, tmp_path):
    m = run(make_cfg, tmp_path, "target.epochs=30", "target.early_stopping_patience=1", "target.lr=1e-1")["metrics"]
    assert m["target/epochs_run"] < 30
    assert m["target/best_epoch"] <= m["target/epochs_run"]


def test_peak_memory_is_each_jobs_own_in_a_shared_process(make_cfg, tmp_path):
    """Jobs of a multirun share one process: a job's peak RSS must not include an earlier job's."""
    import resource

    import numpy as np

    first = run(make_cfg, tmp_path, "source.epochs=1", "target.epochs=1", name="a")["metrics"]
    big = np.ones(400 * 2**20 // 8)  # 400 MB touched between the two jobs, then freed
    big[::512] = 2.0
    del big
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    second = run(make_cfg, tmp_path, "source.epochs=1", "target.epochs=1", "seed=1", name="b")["metrics"]
    assert first["efficiency/peak_rss_scope"] == second["efficiency/peak_rss_scope"] == "job"
    assert second["efficiency/peak_rss_mb"] < process_peak - 300  # the 400 MB is not charged to job b
