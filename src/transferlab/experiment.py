"""One transfer experiment, config in, results.json out:

    validate → data → backbone → source stage → (EWC Fisher) → target stage → evaluation

`run_experiment` is a plain function: the CLI calls it, and so do tests (through Hydra's compose
API), without a subprocess.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytorch_lightning as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from transferlab.config import validate
from transferlab.data import make_transfer_data
from transferlab.data.loaders import make_loader
from transferlab.errors import ConfigError, TransferlabError
from transferlab.results import git_state, package_versions, write_results
from transferlab.stages.evaluate import accuracy
from transferlab.stages.source import load_source_checkpoint, train_source
from transferlab.stages.target import train_target

log = logging.getLogger(__name__)

EVAL_BATCH = 256


def run_experiment(cfg: DictConfig, run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    sha, dirty = git_state()
    results = {
        "status": "running",
        "error": None,
        "metrics": {},
        "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        "provenance": {"git_sha": sha, "git_dirty": dirty, "versions": package_versions(),
                       "seed": cfg.seed, "wall_time_s": None},
    }
    write_results(run_dir, results)
    try:
        validate(cfg)
        results["metrics"] = run_stages(cfg, run_dir)
        results["status"] = "completed"
    except BaseException as e:
        results["status"] = "failed"
        results["error"] = one_line(e)
        raise
    finally:
        results["provenance"]["wall_time_s"] = round(time.time() - started, 3)
        write_results(run_dir, results)
    return results


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return text if isinstance(e, TransferlabError) else f"{type(e).__name__}: {text}".rstrip(": ")


def build(node, **kwargs):
    """hydra.utils.instantiate, but our own errors come out as themselves, not wrapped."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, TransferlabError):
            raise e.__cause__ from None
        raise


def source_mode(cfg) -> str:
    return getattr(cfg.source.mode, "value", cfg.source.mode)


def run_stages(cfg: DictConfig, run_dir: Path) -> dict:
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    mode = source_mode(cfg)
    pool = build(cfg.data.dataset)
    data = make_transfer_data(pool, cfg.data, seed=cfg.seed, with_source=mode != "scratch")
    backbone = build(cfg.backbone, input_shape=data.input_shape)
    freeze = build(cfg.freeze)
    regularizer = build(cfg.regularizer)
    freeze.check(backbone.num_blocks, cfg.target.epochs)
    if regularizer.needs_source and mode == "scratch":
        raise ConfigError("regularizer=ewc needs a source stage to estimate its Fisher: "
                          "use source=train or source=checkpoint, or another regularizer with source=scratch")

    metrics: dict = {f"data/target_{k}_size": v for k, v in data.target.sizes().items()}
    source_model = None
    if mode != "scratch":
        metrics.update({f"data/source_{k}_size": v for k, v in data.source.sizes().items()})
        if mode == "train":
            source_model, info = train_source(cfg, data, backbone, run_dir)
        else:
            source_model, info = load_source_checkpoint(cfg, data, backbone)
        metrics.update(info)
        source_test = make_loader(data.source.test, EVAL_BATCH, shuffle=False)
        metrics["source/test_acc_before"] = accuracy(source_model, source_test)
        if regularizer.needs_source:
            started = time.time()
            regularizer.prepare_from_source(source_model, make_loader(data.source.train, EVAL_BATCH, shuffle=False),
                                            backbone)
            metrics["time/fisher_s"] = round(time.time() - started, 3)

    started = time.time()
    target_model, info = train_target(cfg, data, backbone, freeze, regularizer, run_dir)
    metrics["time/target_fit_s"] = round(time.time() - started, 3)
    metrics.update(info)
    # Selection happened on validation; the test split is evaluated here, once.
    metrics["target/test_acc"] = accuracy(target_model, make_loader(data.target.test, EVAL_BATCH, shuffle=False))

    if source_model is not None:
        metrics["source/test_acc_after"] = accuracy(source_model, source_test)
        metrics["transfer/forgetting"] = metrics["source/test_acc_before"] - metrics["source/test_acc_after"]
    else:
        metrics.update({"source/test_acc_before": None, "source/test_acc_after": None,
                        "transfer/forgetting": None})

    always_frozen = freeze.always_frozen(backbone.num_blocks, cfg.target.epochs)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    metrics["params/total"] = count(backbone) + count(target_model.head)
    metrics["params/trainable"] = count(target_model.head) + sum(
        count(block) for i, block in enumerate(backbone.blocks) if i not in always_frozen)
    return metrics


def format_summary(results: dict) -> str:
    """The table printed at the end of a run."""
    m = results["metrics"]
    fmt = lambda v: "—" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    rows = [("status", results["status"])]
    keys = ["target/test_acc", "target/val_acc", "target/best_epoch", "source/test_acc_before",
            "source/test_acc_after", "transfer/forgetting", "params/trainable", "params/total"]
    rows += [(k, fmt(m.get(k))) for k in keys]
    rows.append(("wall time (s)", fmt(results["provenance"]["wall_time_s"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
