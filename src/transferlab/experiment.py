"""One transfer experiment, config in, results.json out:

    validate → data → backbone → source stage → (EWC Fisher) → target stage → evaluation

`run_experiment` is a plain function: the CLI calls it, and so do tests (through Hydra's compose
API), without a subprocess.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from transferlab.cache import StageCache
from transferlab.config import validate
from transferlab.data import make_transfer_data
from transferlab.data.loaders import EVAL_BATCH, make_loader
from transferlab.data.text import tokenize_transfer_data
from transferlab.distributed import barrier, ensure_process_group, is_global_zero, rank_and_world_size
from transferlab.errors import ConfigError, Preempted, TransferlabError
from transferlab.results import RESULTS_FILE, git_state, package_versions, read_results, write_results
from transferlab.stages.checkpointing import fault_point, stop_on_sigterm
from transferlab.stages.evaluate import classification_scores, token_scores
from transferlab.stages.source import load_source_checkpoint, obtain_source, source_settings
from transferlab.stages.target import train_target
from transferlab.stages.trainer import stage_device

log = logging.getLogger(__name__)

# Keys that choose *how* a run is executed, not *what* it computes: ignored when deciding
# whether a run dir already holds this run.
EXECUTION_KEYS = ("force", "cache", "logger", "trainer.num_threads", "trainer.checkpoint_every_n_steps",
                  "trainer.checkpoint_interval_s", "trainer.pin_memory", "trainer.strategy", "trainer.num_nodes")


def run_experiment(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Run one experiment into `run_dir`; an interrupted run of the same config there is resumed."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    ensure_process_group(cfg)  # under DDP every rank runs this function; rank 0 alone writes
    writer = is_global_zero()
    recorded = recorded_run(run_dir)
    previous = completed_run(run_dir, recorded, config)
    # An unfinished run (killed, preempted or failed) of this config: its stage checkpoints go on.
    resumed = (recorded is not None and recorded.get("status") != "completed"
               and same_config(recorded.get("config", {}), config))
    barrier()  # every rank has read the run dir before rank 0 changes it
    if previous is not None and not cfg.force:
        log.info("skipped: %s already holds a completed run of this config (force=true reruns it)", run_dir)
        return {**previous, "skipped": True}
    if writer and not resumed:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # an earlier run's, of another config
    barrier()
    started = time.time()
    sha, dirty = git_state()
    results = {
        "status": "running",
        "error": None,
        "metrics": {},
        "config": config,
        "provenance": {"git_sha": sha, "git_dirty": dirty, "versions": package_versions(),
                       "seed": cfg.seed, "wall_time_s": None, "resumed": resumed,
                       "world_size": rank_and_world_size()[1]},
    }
    if writer:
        write_results(run_dir, results)
    try:
        validate(cfg)
        with stop_on_sigterm():
            results["metrics"] = run_stages(cfg, run_dir)
        results["status"] = "completed"
    except BaseException as e:
        results["status"] = "interrupted" if isinstance(e, Preempted) else "failed"
        results["error"] = one_line(e)
        raise
    finally:
        results["provenance"]["wall_time_s"] = round(time.time() - started, 3)
        if writer:
            write_results(run_dir, results)
    return results


def recorded_run(run_dir: Path) -> dict | None:
    """The results.json already in `run_dir`, if any (an unreadable one counts as none: the run
    reruns and rewrites it)."""
    if not (run_dir / RESULTS_FILE).is_file():
        return None
    try:
        return read_results(run_dir)
    except (OSError, ValueError):
        return None


def completed_run(run_dir: Path, recorded: dict | None, config: dict) -> dict | None:
    """`recorded` (run_dir's results) when it is a completed run of this same config, else None.

    A completed run of a *different* config is never overwritten silently: that is an error.
    """
    if recorded is None or recorded.get("status") != "completed":
        return None
    if not same_config(recorded.get("config", {}), config):
        if config.get("force"):
            return None
        raise ConfigError(f"{run_dir} already holds a completed run of a different config; "
                          "choose another hydra.run.dir / hydra.sweep.dir, or force=true to overwrite it")
    return recorded


def same_config(previous: dict, current: dict) -> bool:
    """Whether a run dir's recorded config is this one, execution keys aside. A key the recorded
    config lacks (added to transferlab since) matches when it holds a neutral value here (null,
    false, empty), so an upgrade does not turn every finished sweep into "a different config"."""
    return comparable(previous) == comparable(without_new_neutral_keys(current, previous))


def without_new_neutral_keys(current: dict, previous: dict) -> dict:
    kept = {}
    for key, value in current.items():
        if key not in previous:
            if value in (None, False, [], {}):
                continue
        elif isinstance(value, dict) and isinstance(previous[key], dict):
            value = without_new_neutral_keys(value, previous[key])
        kept[key] = value
    return kept


def comparable(config: dict) -> dict:
    config = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
    for key in EXECUTION_KEYS:
        section, _, name = key.partition(".")
        if name and isinstance(config.get(section), dict):
            config[section].pop(name, None)
        elif not name:
            config.pop(section, None)
    return config


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
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    cache = (StageCache(cfg.cache.dir, lock=cfg.cache.lock, stale_lock_s=cfg.cache.stale_lock_s)
             if cfg.cache.enabled else None)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    mode = source_mode(cfg)
    pool = build(cfg.data.dataset)
    has_source = mode in ("train", "checkpoint")
    source_pool = build(cfg.data.source_dataset) if has_source and cfg.data.source_dataset is not None else None
    data = make_transfer_data(pool, cfg.data, seed=cfg.seed, with_source=has_source, source_pool=source_pool)
    check_data_fits_backbone(cfg, data)
    backbone = build(cfg.backbone, input_shape=data.input_shape)
    freeze = build(cfg.freeze)
    regularizer = build(cfg.regularizer)
    pretrained = check_stage_choices(cfg, mode, backbone, freeze, regularizer)
    if mode == "scratch" and pretrained:
        backbone.reset_parameters()  # the no-transfer baseline starts from random weights
    if data.is_text:
        started = time.time()
        data = tokenize_transfer_data(data, backbone.tokenizer, cfg.data.max_length)  # once per run, not per epoch
        log.info("tokenized in %.1f s", time.time() - started)

    metrics: dict = {f"data/target_{k}_size": v for k, v in data.target.sizes().items()}
    device = stage_device(cfg.trainer)  # evaluation and the Fisher run where training ran
    source_model = None
    if has_source:
        metrics.update({f"data/source_{k}_size": v for k, v in data.source.sizes().items()})
        started = time.time()
        if mode == "train":
            source_model, info = obtain_source(cfg, data, backbone, run_dir, cache)
        else:
            source_model, info = load_source_checkpoint(cfg, data, backbone)
        metrics.update(info)
        metrics["time/source_s"] = round(time.time() - started, 3)
        fault_point("after:source")
        source_test = make_loader(data.source.test, EVAL_BATCH, shuffle=False)
        before = classification_scores(source_model.to(device), source_test, data.source.num_classes)
        metrics.update({"source/test_acc_before": before["acc"], "source/test_macro_f1_before": before["macro_f1"]})
    # Adapters (LoRA) go in after the source stage, which trains without them, and before the
    # Fisher, which then covers what the target stage trains. At init they change nothing.
    freeze.adapt_backbone(backbone, seed=cfg.seed)
    if has_source and regularizer.needs_source:
        started = time.time()
        stats, hit = source_statistics(cfg, data, backbone, source_model, regularizer,
                                       cache if mode == "train" else None, freeze.adapter_settings())
        regularizer.set_source_statistics(stats, backbone)
        metrics["time/source_statistics_s"] = round(time.time() - started, 3)
        metrics["cache/source_statistics_hit"] = hit

    # The target stage starts from its own seed, so it is the same whether the source stage
    # was trained just now, loaded from the cache, or skipped (scratch).
    pl.seed_everything(cfg.seed + 1, workers=True, verbose=False)
    started = time.time()
    target_model, info = train_target(cfg, data, backbone, freeze, regularizer, run_dir)
    metrics["time/target_fit_s"] = round(time.time() - started, 3)
    metrics.update(info)
    fault_point("after:target")
    # Selection happened on validation; the test split is evaluated here, once.
    target_test = make_loader(data.target.test, EVAL_BATCH, shuffle=False)
    if data.target.token_level:  # entity-level scores; test_acc = accuracy over scored words
        scores = token_scores(target_model.to(device), target_test, data.target.label_names)
        metrics.update({f"target/test_{k}": v for k, v in scores.items()})
    else:
        scores = classification_scores(target_model.to(device), target_test, data.target.num_classes)
        metrics.update({"target/test_acc": scores["acc"], "target/test_macro_f1": scores["macro_f1"]})

    if source_model is not None:
        after = classification_scores(source_model.to(device), source_test, data.source.num_classes)
        metrics.update({"source/test_acc_after": after["acc"], "source/test_macro_f1_after": after["macro_f1"]})
        metrics["transfer/forgetting"] = metrics["source/test_acc_before"] - metrics["source/test_acc_after"]
    else:
        metrics.update({"source/test_acc_before": None, "source/test_acc_after": None,
                        "transfer/forgetting": None})

    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    metrics["params/total"] = count(backbone) + count(target_model.head)
    metrics["params/trainable"] = count(target_model.head) + freeze.trainable_backbone_params(backbone, cfg.target.epochs)
    return metrics


def check_data_fits_backbone(cfg, data) -> None:
    """Text data needs a text encoder (and token labels per-token features), images the reverse."""
    backbone_class = get_class(cfg.backbone._target_)
    reads_text = getattr(backbone_class, "reads_text", False)
    if data.is_text != reads_text:
        raise ConfigError(f"data: {data.dataset} is {'text' if data.is_text else 'not text'} but backbone "
                          f"{cfg.backbone._target_} {'is not' if data.is_text else 'is'} a text encoder: "
                          f"{'use backbone=minilm or backbone=hf' if data.is_text else 'use backbone=cnn or mlp'}")
    if data.target.token_level and not hasattr(backbone_class, "token_features"):
        raise ConfigError(f"data: {data.dataset} is token classification but backbone {cfg.backbone._target_} "
                          "has no per-token features (token_features): use backbone=minilm or backbone=hf")


def check_stage_choices(cfg, mode: str, backbone, freeze, regularizer) -> bool:
    """Freeze policy vs backbone, regularizer vs source stage, source mode vs weights.
    Returns whether the backbone came pretrained."""
    freeze.check(backbone.num_blocks, cfg.target.epochs)
    freeze.check_backbone(backbone)
    if regularizer.needs_source and mode not in ("train", "checkpoint"):
        raise ConfigError(f"regularizer=ewc needs a source stage to estimate its Fisher, and source={mode} has none: "
                          "use source=train or source=checkpoint, or another regularizer (e.g. l2sp)")
    pretrained = getattr(backbone, "pretrained", False)
    if mode == "pretrained" and not pretrained:
        raise ConfigError(f"source=pretrained needs a pretrained backbone (e.g. backbone=minilm); "
                          f"{cfg.backbone._target_} starts from random weights: use source=scratch")
    return pretrained


def source_statistics(cfg, data, backbone, source_model, regularizer, cache: StageCache | None,
                      adapters: dict | None = None):
    """The regularizer's statistics of the source stage (EWC's Fisher), cached when possible.
    `adapters`: what the freeze policy injected (LoRA) before them, which changes the parameters."""
    rank, world_size = rank_and_world_size()  # under DDP each rank takes its share; fisher.py sums them
    loader = make_loader(data.source.train, EVAL_BATCH, shuffle=False, rank=rank, world_size=world_size)
    if cache is None:
        return regularizer.compute_source_statistics(source_model, loader, backbone), None
    settings = {"source": source_settings(cfg, data), "regularizer": type(regularizer).__name__,
                **regularizer.source_statistics_settings()}
    if adapters:  # only then: earlier cache keys stay valid
        settings["adapters"] = adapters
    shapes = {name: p.shape for name, p in backbone.named_parameters()}

    def compute(folder: Path) -> None:
        torch.save(regularizer.compute_source_statistics(source_model, loader, backbone), folder / "stats.pt")

    def load(folder: Path):
        stats = torch.load(folder / "stats.pt", map_location="cpu", weights_only=True)
        if {k: v.shape for k, v in stats.items()} != shapes:
            raise ValueError("statistics do not match the backbone's parameter shapes")
        return stats

    return cache.fetch("source_statistics", settings, compute, load)


def format_summary(results: dict) -> str:
    """The table printed at the end of a run."""
    m = results["metrics"]
    fmt = lambda v: "—" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    rows = [("status", results["status"])]
    keys = ["target/test_f1", "target/val_f1"] if "target/test_f1" in m else []
    keys += ["target/test_acc", "target/test_macro_f1", "target/val_acc", "target/best_epoch",
             "source/test_acc_before", "source/test_acc_after", "transfer/forgetting", "params/trainable",
             "params/total"]
    rows += [(k, fmt(m[k])) for k in keys if k in m]  # absent: not this task's metric (NER has no val_acc)
    rows.append(("wall time (s)", fmt(results["provenance"]["wall_time_s"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
