"""Shared fixtures: compose configs with Hydra's compose API, as the CLI would."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub in tests
# The stage cache defaults to the user's cache folder: tests never write there. A run that names
# paths.output_root keeps its cache beside it (compose_config); anything else lands here.
_TEST_CACHE = tempfile.mkdtemp(prefix="transferlab-test-cache-")
atexit.register(shutil.rmtree, _TEST_CACHE, ignore_errors=True)
os.environ["TRANSFERLAB_CACHE"] = _TEST_CACHE
if os.environ.get("PYTEST_XDIST_WORKER"):  # one of several test processes: one thread each, no oversubscription
    os.environ["OMP_NUM_THREADS"] = "1"  # the runs these tests start as subprocesses too
    torch.set_num_threads(1)

from transferlab.cli import CONF_DIR  # noqa: E402
from transferlab.config import register_schemas  # noqa: E402

register_schemas()

# Small and quick, still real: digits, the CNN, a couple of epochs, CSV logging only.
FAST = ["logger=csv", "source.epochs=2", "target.epochs=2", "source.lr=1e-2", "target.lr=1e-2",
        "backbone.channels=[8,16]"]


def compose_config(overrides: list[str] | None = None):
    overrides = list(overrides or [])
    roots = [o.split("=", 1)[1] for o in overrides if o.startswith("paths.output_root=")]
    if roots and not any(o.startswith(("cache.dir=", "cache=")) for o in overrides):
        overrides.append(f"cache.dir={roots[-1]}/cache")  # this test's own cache, as before the user cache dir
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.fixture
def make_cfg(tmp_path):
    """Compose a fast config whose outputs (and stage cache) live under this test's tmp_path."""
    def make(*overrides):
        fast = FAST
        if any(o.startswith("backbone=") for o in overrides):  # FAST's CNN width is the CNN's own key
            fast = [o for o in FAST if not o.startswith("backbone.")]
        return compose_config(fast + [f"paths.output_root={tmp_path / 'outputs'}"] + list(overrides))
    return make


def assert_penalty_matches_autograd(reg, backbone, head, batch, y, penalty) -> None:
    """Task-loss gradient + reg.add_penalty_grad_ == autograd of (task loss + `penalty()`, written
    out by hand) on the parameters that train, and reg.penalty() == penalty()."""
    trainable = [p for p in [*backbone.parameters(), *head.parameters()] if p.requires_grad]
    (F.cross_entropy(head(backbone(batch)), y) + penalty()).backward()
    expected = [p.grad.clone() for p in trainable]
    for p in trainable:
        p.grad = None
    F.cross_entropy(head(backbone(batch)), y).backward()
    reg.add_penalty_grad_()
    for got, want in zip([p.grad for p in trainable], expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(reg.penalty(), penalty().detach(), atol=1e-5, rtol=1e-5)


def prepare_statistics(method, source_model, loader, backbone) -> None:
    """What the experiment does before the target stage: the method's statistics from the source
    model (at its current weights) and `loader`, handed back to the method."""
    from transferlab.method import MethodContext

    ctx = MethodContext(backbone=backbone, source_model=source_model, source_loader=lambda: loader)
    method.use_statistics(method.compute_statistics(ctx), ctx)


def options(group: str) -> list[str]:
    """Every option of a config group, as conf/ lists it (a new option joins the tests that use this)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def assert_completes_or_refuses(cfg, run_dir) -> dict | None:
    """The combinatorial rule: a run completes with a finite target metric, or is refused with a
    one-line TransferlabError before training. Returns the metrics (None when refused)."""
    import math

    from transferlab.errors import TransferlabError
    from transferlab.experiment import run_experiment

    try:
        metrics = run_experiment(cfg, run_dir)["metrics"]
    except TransferlabError as e:
        assert "\n" not in str(e).strip() and str(e).strip(), f"refusal must be one line: {e!r}"
        assert not (run_dir / "checkpoints" / "target.pt").exists(), "refused after the target stage trained"
        return None
    primary = next(k for k in ("target/test_acc", "target/test_f1", "target/test_ppl") if k in metrics)
    assert math.isfinite(metrics[primary])
    return metrics
