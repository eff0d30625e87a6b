"""One transfer experiment, config in, results.json out:

    validate → data → backbone → source stage → adapt → methods' statistics → target stage → evaluation

`run_experiment` is a plain function: the CLI calls it, and so do tests (through Hydra's compose
API), without a subprocess. `run_stages` is that list, one call per stage, each stage taking the
one `RunState` and filling in its part; the evaluations after the target stage are the ordered
`AFTER_TARGET`, scoring through the same `target_scores` / `source_test_scores`. Whether the run
dir already holds this run (skip / resume / refuse) is `run_dir.py`'s business.
"""

from __future__ import annotations

import logging
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from transferlab.cache import StageCache
from transferlab.collectives import barrier, check_devices, ensure_process_group, is_global_zero, rank_and_world_size
from transferlab.config import validate
from transferlab.data import TransferData, make_transfer_data
from transferlab.data.loaders import EVAL_BATCH, eval_batch, make_loader
from transferlab.data.text import tokenize_transfer_data
from transferlab.diagnostics import weight_diagnostics
from transferlab.errors import ConfigError, Preempted, TransferlabError, user_message
from transferlab.harness import evaluate_harness
from transferlab.method import MethodContext
from transferlab.results import git_state, package_versions, write_results
from transferlab.run_dir import identify
from transferlab.stage_store import method_statistics, obtain_source
from transferlab.stages.checkpointing import fault_point, stop_on_sigterm
from transferlab.stages.source import load_source_checkpoint
from transferlab.stages.module import TaskModule
from transferlab.stages.target import train_target
from transferlab.stages.trainer import log_results_to_wandb, stage_device
from transferlab.tasks import evaluating, task_of, to_device
from transferlab.transferability import transferability_scores
from transferlab.weights import interpolate  # WiSE-FT's θ(α): the one weight-arithmetic room

log = logging.getLogger(__name__)

def run_experiment(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Run one experiment into `run_dir`; an interrupted run of the same config there is resumed."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    ensure_process_group(cfg)  # under DDP every rank runs this function; rank 0 alone writes
    writer = is_global_zero()
    # A completed run of this config is skipped; an unfinished one (killed, preempted or failed)
    # resumes: its stage checkpoints go on.
    previous, resumed = identify(run_dir, config)
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
        "task": None,
        "config": config,
        "provenance": {"git_sha": sha, "git_dirty": dirty, "versions": package_versions(),
                       "seed": cfg.seed, "wall_time_s": None, "resumed": resumed,
                       "world_size": rank_and_world_size()[1]},
    }
    if writer:
        write_results(run_dir, results)
    try:
        validate(cfg)
        check_devices(cfg.trainer)
        with stop_on_sigterm():
            # run_stages fills results["metrics"] as it goes: an interrupted run keeps what it measured.
            results["metrics"], results["task"] = run_stages(cfg, run_dir, results["metrics"])
        results["status"] = "completed"
    except BaseException as e:
        results["status"] = "interrupted" if isinstance(e, (Preempted, KeyboardInterrupt)) else "failed"
        results["error"] = one_line(e)
        raise
    finally:
        results["provenance"]["wall_time_s"] = round(time.time() - started, 3)
        if writer:
            write_results(run_dir, results)
    log_results_to_wandb(cfg, run_dir, results)  # logger=wandb: results.json's metrics in the target run's summary
    return results


def one_line(e: BaseException) -> str:
    text = user_message(e)
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


@dataclass
class Setup:
    """What a run builds before any stage: the data and the components, checked together."""

    data: TransferData
    backbone: torch.nn.Module
    freeze: object  # freeze.FreezePolicy
    regularizer: object  # regularizers.Regularizer
    extra_regularizers: list  # more Regularizers, from cfg.extra_regularizers
    mode: str  # source.mode: train | checkpoint | scratch | pretrained

    @property
    def methods(self) -> list:
        return [self.freeze, self.regularizer, *self.extra_regularizers]

    @property
    def has_source(self) -> bool:
        """A source stage to run (train / checkpoint), or a pretrained language model's source task
        (its general-text corpus) to measure."""
        return self.data.source is not None


PEAK_RSS = {"reset": False}  # whether this job's peak-memory count was reset at its start


def reset_peak_rss() -> bool:
    """Start this job's peak-memory count afresh (Linux: writing 5 to /proc/self/clear_refs resets
    VmHWM). In a multirun whose jobs share a process, the process's running maximum would charge
    every earlier job's peak to this one."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> tuple[float, str]:
    """(peak RSS in MB, its scope): "job" since `reset_peak_rss`, else "process" (ru_maxrss)."""
    if PEAK_RSS["reset"]:
        try:
            with open("/proc/self/status") as f:
                line = next(line for line in f if line.startswith("VmHWM:"))
            return round(int(line.split()[1]) / 1024, 1), "job"
        except (OSError, StopIteration, ValueError):
            pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "process"


@dataclass
class RunState:
    """What the stages hand on, one to the next: `run_stages` builds it once and passes it to each
    stage, which reads what earlier stages left and fills in its own part."""

    cfg: DictConfig
    run_dir: Path
    setup: Setup  # the data and the components (backbone, freeze policy, regularizers)
    cache: StageCache | None  # None: cache=off
    metrics: dict  # results.json's metrics so far, filled in place (an interrupted run keeps them)
    source_model: TaskModule | None = None  # the source stage's backbone + kept head; None: no source stage
    context: MethodContext | None = None  # what the methods may use (after adapt)
    lm_head: torch.nn.Module | None = None  # the head lm-eval scores before the target stage
    target_model: TaskModule | None = None  # the target stage's backbone + new head

    @property
    def device(self) -> torch.device:
        return stage_device(self.cfg.trainer)

    @property
    def task(self):
        """The target task (tasks.Task)."""
        return self.context.task


def run_stages(cfg: DictConfig, run_dir: Path, metrics: dict | None = None) -> tuple[dict, dict]:
    """The stages in order; returns (metrics, the task block of results.json). `metrics`, when
    given, is filled in place as each stage measures."""
    PEAK_RSS["reset"] = reset_peak_rss()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    cache = (StageCache(cfg.cache.dir, lock=cfg.cache.lock, stale_lock_s=cfg.cache.stale_lock_s)
             if cfg.cache.enabled else None)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    state = RunState(cfg, run_dir, build_setup(cfg), cache, {} if metrics is None else metrics)
    state.metrics.update({f"data/target_{k}_size": v for k, v in state.setup.data.target.sizes().items()})
    source_stage(state)
    adapt_stage(state)
    statistics_stage(state)
    transferability_stage(state)
    # The target stage starts from its own seed, so it is the same whether the source stage
    # was trained just now, loaded from the cache, or skipped (scratch).
    pl.seed_everything(cfg.seed + 1, workers=True, verbose=False)
    if cfg.evaluate.wise_ft_alphas or cfg.evaluate.diagnostics:
        state.context.take_start_weights()  # what WiSE-FT / diagnostics compare with, before any step
    start_language_model_stage(state)
    harness_stage(state, "before")
    target_stage(state)
    for evaluation in AFTER_TARGET:
        evaluation(state)
    return state.metrics, state.task.describe(majority_test=majority_score(state.task, state.setup.data))


def build_setup(cfg) -> Setup:
    mode = source_mode(cfg)
    pool = build(cfg.data.dataset)
    if pool.language_modeling and mode in ("train", "checkpoint"):
        raise ConfigError(f"source={mode}: a language-modeling target continues the pretrained model, whose "
                          "pretraining is the source: use source=pretrained (or source=scratch)")
    # A language model's source task is its pretraining: with data.source_dataset (a general text
    # corpus) the pretrained model and head are measured there before and after (forgetting).
    has_source = mode in ("train", "checkpoint") or (pool.language_modeling and mode == "pretrained")
    has_source = has_source and (cfg.data.source_dataset is not None or not pool.language_modeling)
    source_pool = build(cfg.data.source_dataset) if has_source and cfg.data.source_dataset is not None else None
    data = make_transfer_data(pool, cfg.data, seed=cfg.seed, with_source=has_source, source_pool=source_pool)
    check_data_fits_backbone(cfg, data)
    if cfg.data.augment and data.is_text:
        raise ConfigError("data.augment: the augmentation crops and flips images; this data is text: set it to false")
    backbone = build(cfg.backbone, input_shape=data.input_shape)
    freeze, regularizer = build(cfg.freeze), build(cfg.regularizer)
    extras = []
    for name, node in cfg.extra_regularizers.items():
        extra = build(node)
        extra.name = name  # named by its key: its loss term, penalty and statistics are its own
        extras.append(extra)
    pretrained = check_stage_choices(cfg, mode, backbone, freeze, [regularizer, *extras], has_source)
    if data.target.language_modeling:
        check_language_modeling(cfg, backbone, [freeze, regularizer, *extras])
    if cfg.evaluate.lm_eval.tasks and not backbone.language_model:
        raise ConfigError(f"evaluate.lm_eval.tasks: lm-eval scores a language model; {type(backbone).__name__} is "
                          "not one (use backbone=smollm2 or backbone=hf_causal)")
    if mode == "scratch" and pretrained:
        backbone.reset_parameters()  # the no-transfer baseline starts from random weights
    if data.is_text:
        started = time.time()
        data = tokenize_transfer_data(data, backbone.tokenizer, cfg.data.max_length)  # once per run, not per epoch
        log.info("tokenized in %.1f s", time.time() - started)
    return Setup(data, backbone, freeze, regularizer, extras, mode)


def source_stage(state: RunState) -> None:
    """Train (or take from the cache, or load) the source stage; measure it on its test split."""
    cfg, setup, metrics = state.cfg, state.setup, state.metrics
    if not setup.has_source:
        return
    data = setup.data
    metrics.update({f"data/source_{k}_size": v for k, v in data.source.sizes().items()})
    started = time.time()
    if setup.mode == "train":
        source_model, info = obtain_source(cfg, data, setup.backbone, state.run_dir, state.cache)
    elif setup.mode == "pretrained":  # a language model: its own head on the general-text corpus
        source_model, info = TaskModule(setup.backbone, setup.backbone.language_model_head(), stage="source",
                                        task=task_of(data.source), lr=0.0), {}
    else:
        source_model, info = load_source_checkpoint(cfg, data, setup.backbone)
    metrics.update(info)
    metrics["time/source_s"] = round(time.time() - started, 3)
    fault_point("after:source")
    state.source_model = source_model
    metrics.update({f"source/test_{k}_before": v for k, v in source_test_scores(state).items()})


def adapt_stage(state: RunState) -> None:
    """Adapters (LoRA) go in after the source stage, which trains without them, and before the
    methods' statistics (EWC's Fisher), which then cover what the target stage trains; then the
    methods' context."""
    state.setup.freeze.adapt_backbone(state.setup.backbone, seed=state.cfg.seed)
    state.context = method_context(state.cfg, state.setup, state.source_model)


def method_context(cfg, setup: Setup, source_model) -> MethodContext:
    data = setup.data
    rank, world_size = rank_and_world_size()  # under DDP each rank takes its share of the source set
    return MethodContext(
        backbone=setup.backbone, task=task_of(data.target),
        source_model=source_model, source_head=source_model.head if source_model is not None else None,
        source_task=source_model.task if source_model is not None else None,
        source_loader=(lambda: make_loader(data.source.train, EVAL_BATCH, shuffle=False, rank=rank,
                                           world_size=world_size)) if data.source is not None else None,
        target_loader=lambda: make_loader(data.target.train, EVAL_BATCH, shuffle=False),
        seed=cfg.seed)


def statistics_stage(state: RunState) -> None:
    """What each method computes once before the target stage, through one cached path (the
    stage cache only for a source stage trained here)."""
    setup, context, metrics = state.setup, state.context, state.metrics
    cache = state.cache if setup.mode == "train" else None
    for method in setup.methods:
        if not method.statistics_inputs:
            continue
        started = time.time()
        if context.source_model is not None:  # where training runs: the Fisher is a backward pass
            context.source_model.to(state.device)
        hit = method_statistics(state.cfg, setup.data, method, context, cache, setup.freeze.adapter_settings())
        metrics[f"time/{method.name}_statistics_s"] = round(time.time() - started, 3)
        metrics[f"cache/{method.name}_statistics_hit"] = hit
        metrics.update({f"{method.name}/{key}": value for key, value in method.report().items()})


TRANSFERABILITY_EXAMPLES = 2000  # LogME's SVD of 2,000 × 384 features: ~1 s on 2 cores


@torch.no_grad()
def transferability_stage(state: RunState) -> None:
    """Transferability scores (LogME, H-score; LEEP and NCE with a source head) of the target
    training set, from the features the target stage starts with — before any fine-tuning.
    Classification targets only (a token task's features are per token)."""
    context = state.context
    if not state.cfg.evaluate.transferability or context.task.token_level:
        return
    started = time.time()
    backbone, device = state.setup.backbone, state.device
    features, probs = [], []
    y_train = state.setup.data.target.train[1]
    n = min(len(y_train), TRANSFERABILITY_EXAMPLES)  # the split is in random order: its first n
    with evaluating(backbone.to(device)):
        for x, _ in make_loader(state.setup.data.target.train, EVAL_BATCH, shuffle=False):
            if sum(len(f) for f in features) >= n:
                break
            f = backbone(to_device((x,), device)[0])
            features.append(f.float().cpu())
            if context.source_head is not None:
                probs.append(torch.softmax(context.source_head.to(device)(f).float(), -1).cpu())
    features, probs = torch.cat(features)[:n], (torch.cat(probs)[:n] if probs else None)
    state.metrics.update(transferability_scores(features, y_train[:n], probs))
    state.metrics["time/transferability_s"] = round(time.time() - started, 3)


@torch.no_grad()
def start_language_model_stage(state: RunState) -> None:
    """The start model on the target test split: what continued training improves on (a language
    model has a target metric before any target training; `transfer/target_gain` is the change)."""
    context = state.context
    if context.task.kind != "language_modeling":
        return
    head = context.source_head if context.source_head is not None else state.setup.backbone.language_model_head()
    start = TaskModule(state.setup.backbone, head, stage="target", task=context.task, lr=0.0)
    state.metrics.update({f"{k}_before": v for k, v in target_scores(state, start, ("test",)).items()})


def target_stage(state: RunState) -> None:
    cfg, setup, metrics = state.cfg, state.setup, state.metrics
    started = time.time()
    state.target_model, info = train_target(cfg, setup.data, setup.backbone, setup.freeze,
                                            [setup.regularizer, *setup.extra_regularizers], state.run_dir,
                                            context=state.context, cache=state.cache)
    metrics["time/target_fit_s"] = round(time.time() - started, 3)
    metrics.update(info)
    # Efficiency (target samples/s: train_target's) and the process's peak memory (RSS; on CUDA
    # also the allocator's peak).
    metrics["efficiency/peak_rss_mb"], metrics["efficiency/peak_rss_scope"] = peak_rss_mb()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        metrics["efficiency/peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    fault_point("after:target")


# -- the evaluations after the target stage, in order: each takes the run state -----------------

def evaluation_stage(state: RunState) -> None:
    """Selection happened on validation; the test split is evaluated here, once. Forgetting: the
    kept source head (trained on, under LwF) on the source test split, after the target stage."""
    setup, task, target_model, metrics = state.setup, state.task, state.target_model, state.metrics
    scores = target_scores(state, target_model, ("test", "ood_test"))
    metrics.update(scores)
    if f"target/test_{task.primary}_before" in metrics:  # a language model: its gain from continued training
        before, after = metrics[f"target/test_{task.primary}_before"], scores[f"target/test_{task.primary}"]
        metrics["transfer/target_gain"] = after - before if task.higher_is_better else before - after
    if setup.data.target.ood_test is not None:  # generalization: held-out domains or a shifted test split
        metrics["data/target_ood_test_size"] = len(setup.data.target.ood_test[1])
    if state.source_model is not None:
        after = source_test_scores(state)
        metrics.update({f"source/test_{k}_after": v for k, v in after.items()})
        metrics.update(forgetting(state.source_model.task, metrics))
    else:
        metrics.update({"source/test_acc_before": None, "source/test_acc_after": None,
                        "transfer/forgetting": None})
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    extra = count(target_model.method_modules)  # e.g. LwF's source head, trained alongside
    metrics["params/total"] = count(setup.backbone) + count(target_model.head) + extra
    metrics["params/trainable"] = (count(target_model.head) + extra
                                   + setup.freeze.trainable_backbone_params(setup.backbone, state.cfg.target.epochs))


def harness_stage(state: RunState, when: str = "after") -> None:
    """lm-evaluation-harness tasks on the model as it is now: lm_eval/<task>/<metric>_<when>; after
    the target stage also the change (after − before). Before: the kept source head, else the
    model's own; after: the target stage's head when it trained one (language modeling), else
    the same head as before."""
    lm = state.cfg.evaluate.lm_eval
    if not lm.tasks:
        return
    context, metrics = state.context, state.metrics
    if when == "before":
        state.lm_head = (context.source_head if context.source_head is not None
                         else state.setup.backbone.language_model_head())
    head = state.target_model.head if when == "after" and context.task.kind == "language_modeling" else state.lm_head
    started = time.time()
    scores = evaluate_harness(state.setup.backbone.to(state.device), head, list(lm.tasks), limit=lm.limit,
                              num_fewshot=lm.num_fewshot, include_path=lm.include_path, batch_size=lm.batch_size,
                              device=state.device)
    metrics.update({f"lm_eval/{k}_{when}": v for k, v in scores.items()})
    if when == "after":
        metrics.update({f"lm_eval/{k}_change": v - metrics[f"lm_eval/{k}_before"] for k, v in scores.items()
                        if v is not None and metrics.get(f"lm_eval/{k}_before") is not None})
    metrics[f"time/lm_eval_{when}_s"] = round(time.time() - started, 3)


def diagnostics_stage(state: RunState) -> None:
    """Where the target stage moved the backbone, block by block (never fails a run: a value it
    cannot compute is null, with one warning). Before WiSE-FT, which swaps the weights (and
    restores them)."""
    if not state.cfg.evaluate.diagnostics:
        return
    started = time.time()
    target = state.setup.data.target
    val = make_loader(target.val, eval_batch(target), shuffle=False)
    state.metrics.update(weight_diagnostics(state.setup.backbone.to(state.device), state.context.start_weights, val))
    state.metrics["time/diagnostics_s"] = round(time.time() - started, 3)


@torch.no_grad()
def wise_ft_stage(state: RunState) -> None:
    """WiSE-FT: the backbone at θ(α) = (1-α)·θ_start + α·θ_tuned for each α (every floating-point
    tensor, BatchNorm statistics included; integer counters stay the tuned ones). The target head is
    the fine-tuned one at every α (it has no start value: at α = 0 it reads the start features), the
    source head is the kept one (as trained under LwF / Co-Tuning). α is selected on target
    validation (ties: the larger α); its test metrics are reported as wise_ft/target/test_*."""
    if not state.cfg.evaluate.wise_ft_alphas:
        return
    task, metrics, source_model = state.task, state.metrics, state.source_model
    backbone = state.setup.backbone
    tuned = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    start = state.context.start_weights
    chosen = None
    for alpha in sorted(set(state.cfg.evaluate.wise_ft_alphas)):
        backbone.load_state_dict(interpolate(start, tuned, alpha))
        scores = target_scores(state, state.target_model, ("val", "test", "ood_test"))
        if source_model is not None:
            after = {f"source/test_{k}_after": v for k, v in source_test_scores(state).items()}
            source_primary = source_model.task.primary
            scores[f"source/test_{source_primary}"] = after[f"source/test_{source_primary}_after"]
            scores |= forgetting(source_model.task, {**metrics, **after})
        metrics.update({f"wise_ft/{alpha:g}/{k}": v for k, v in scores.items()})
        primary = scores[f"target/val_{task.primary}"]
        if chosen is None or not task.better(chosen[1], primary):  # ties: the larger α
            chosen = (alpha, primary, scores)
    backbone.load_state_dict(tuned)  # the run's own model again
    metrics["wise_ft/best_alpha"] = chosen[0]
    metrics.update({f"wise_ft/{k}": v for k, v in chosen[2].items() if "test_" in k or k == "transfer/forgetting"})


AFTER_TARGET = (evaluation_stage, harness_stage, diagnostics_stage, wise_ft_stage)  # each returns when off


def target_scores(state: RunState, model, splits: tuple[str, ...]) -> dict:
    """The target task's metrics of `model` on each of `splits` that this data has (val, test,
    ood_test): target/<split>_<metric>."""
    target, scores = state.setup.data.target, {}
    for split in splits:
        examples = getattr(target, split)
        if examples is None:  # no OOD test split
            continue
        loader = make_loader(examples, eval_batch(target), shuffle=False, num_workers=state.cfg.data.num_workers)
        scores |= {f"target/{split}_{k}": v for k, v in state.task.evaluate(model.to(state.device), loader).items()}
    return scores


def source_test_scores(state: RunState) -> dict:
    """The source model (the shared backbone as it is now + the kept source head) on the source
    test split: {metric: value}."""
    source = state.setup.data.source
    loader = make_loader(source.test, eval_batch(source), shuffle=False, num_workers=state.cfg.data.num_workers)
    return state.source_model.task.evaluate(state.source_model.to(state.device), loader)


def forgetting(source_task, metrics: dict) -> dict:
    """How much of the source the target stage destroyed, in the source metric's good direction
    (positive: worse after): accuracy before − after; for a language model, perplexity after −
    before on the general-text corpus, also relative to before and in nats per token."""
    primary = source_task.primary
    before, after = metrics[f"source/test_{primary}_before"], metrics[f"source/test_{primary}_after"]
    drop = before - after if source_task.higher_is_better else after - before
    out = {"transfer/forgetting": drop}
    if source_task.kind == "language_modeling":
        out["transfer/forgetting_relative"] = drop / before
        if "source/test_nll_after" in metrics:
            out["transfer/forgetting_nll"] = metrics["source/test_nll_after"] - metrics["source/test_nll_before"]
    return out


def majority_score(task, data: TransferData) -> float:
    return task.majority_score(data.target.train[1], data.target.test[1])


def check_data_fits_backbone(cfg, data) -> None:
    """Text data needs a text encoder (and token labels per-token features), images the reverse."""
    backbone_class = get_class(cfg.backbone._target_)
    if data.is_text != backbone_class.reads_text:  # a text backbone has per-token features too (token tasks)
        raise ConfigError(f"data: {data.dataset} is {'text' if data.is_text else 'not text'} but backbone "
                          f"{cfg.backbone._target_} {'is not' if data.is_text else 'is'} a text encoder: "
                          f"{'use backbone=minilm or backbone=hf' if data.is_text else 'use an image backbone: cnn, mlp, efficientnet_lite0 or hf_vision'}")
    if data.target.language_modeling and not backbone_class.language_model:
        raise ConfigError(f"data: {data.dataset} is language modeling but backbone {cfg.backbone._target_} is not a "
                          "language model: use backbone=smollm2 or backbone=hf_causal")


def check_language_modeling(cfg, backbone, methods: list) -> None:
    """What a language-modeling target needs: a context long enough for data.max_length, and
    methods that apply to next-token prediction (they declare `supports_language_modeling`)."""
    context = getattr(backbone.model_config, "max_position_embeddings", None)
    if context is not None and cfg.data.max_length > context:
        raise ConfigError(f"data.max_length={cfg.data.max_length}: longer than {type(backbone).__name__}'s context "
                          f"of {context} tokens; lower it")
    frozen = methods[0].always_frozen(backbone.num_blocks, cfg.target.epochs)
    if len(frozen) == backbone.num_blocks and getattr(backbone.model_config, "tie_word_embeddings", False):
        raise ConfigError(f"freeze={methods[0].name}: freezes every block, and {type(backbone).__name__}'s next-token "
                          "head is tied to its embeddings: nothing would train; use freeze=lora or freeze=partial")
    for method, group in zip(methods, ("freeze", "regularizer", *(f"extra_regularizers.{k}" for k in cfg.extra_regularizers))):
        if not getattr(method, "supports_language_modeling", True):
            raise ConfigError(f"{group}={method.name}: does not apply to a language-modeling target (it reads class "
                              "logits or features of a classifier); use l2sp, l2, ewc or none, with any freeze policy")


def check_stage_choices(cfg, mode: str, backbone, freeze, regularizers: list, has_source: bool) -> bool:
    """Freeze policy vs backbone, regularizer vs source stage, source mode vs weights.
    Returns whether the backbone came pretrained."""
    freeze.check(backbone.num_blocks, cfg.target.epochs)
    freeze.check_backbone(backbone)
    for method, group in ((freeze, "freeze"), *((r, "regularizer") for r in regularizers)):
        if method.needs_source_model and not has_source:
            raise ConfigError(f"{group}={method.name} needs a source stage (its statistics come from the source "
                              f"model), and source={mode} has none: use source=train or source=checkpoint (a "
                              "language model: data.source_dataset, a general-text corpus), or another method "
                              "(e.g. regularizer=l2sp)")
    pretrained = getattr(backbone, "pretrained", False)
    if mode == "pretrained" and not pretrained:
        raise ConfigError(f"source=pretrained needs a pretrained backbone (e.g. backbone=minilm); "
                          f"{cfg.backbone._target_} starts from random weights: use source=scratch")
    return pretrained


def format_summary(results: dict) -> str:
    """The table printed at the end of a run."""
    m = results["metrics"]
    fmt = lambda v: "—" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    rows = [("status", results["status"])]
    keys = ["target/test_f1", "target/val_f1"] if "target/test_f1" in m else []
    keys += ["target/test_ppl_before", "target/test_ppl", "target/test_nll", "target/val_ppl",
             "source/test_ppl_before", "source/test_ppl_after"] if "target/test_ppl" in m else []
    keys += ["target/test_acc", "target/test_macro_f1", "target/val_acc", "target/best_epoch",
             "source/test_acc_before", "source/test_acc_after", "transfer/forgetting",
             "transfer/forgetting_relative", "params/trainable", "params/total"]
    rows += [(k, fmt(m[k])) for k in keys if k in m]  # absent: not this task's metric (NER has no val_acc)
    rows.append(("wall time (s)", fmt(results["provenance"]["wall_time_s"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
