"""`transferlab merge <sweep dir> [method=…] [lambda=…] [k=…] [p=…]`: model merging of a sweep's
fine-tunes of one start to several target tasks, evaluated on every task with error bars.

The sweep: several target tasks fine-tuned from one start — one source stage (`source=train`: the
same source settings and seed, shared through the stage cache) or the backbone's pretrained
weights (`source=pretrained`) — each run with its own head, over seeds, e.g.

    transferlab -m 'data.target_classes=[5,6,7],[6,7,8],[7,8,9]' seed=0,1,2
    transferlab merge outputs/multiruns/default/<time>

What merging needs is in each run dir: results.json (the config: task, seed, backbone, start),
checkpoints/target.pt (the fine-tuned backbone — under freeze=lora its base weights and adapters,
folded here into W₀ + (α/r)·B A — and the task's head) and, with a source stage,
checkpoints/source.pt (the start). A `source=pretrained` start is the backbone rebuilt from its
config (pretrained weights load deterministically; the rebuilt weights of every run of a seed must
have one digest, and a LoRA run's frozen base weights must be exactly them).

Seeds are never mixed: a merge combines the runs of one seed (one fine-tune per task), and the
seeds give the error bars. A seed without a completed run of every task is skipped (and said so).
For each seed and method the merged backbone is evaluated on every task with that task's own
fine-tuned head: the task's primary metric (results.json's task.primary_metric) on validation and
test, normalized by the task's individually fine-tuned run (merged / individual). Methods with a
scale λ (task arithmetic, TIES, DARE) choose it per seed on the mean normalized validation metric
over the tasks (ties: the smaller λ). Reference rows: the individual fine-tunes (1 by definition)
and the start model with a linear probe per task (logistic regression on frozen start features of
the task's training split). Then mean ± 95% CI over seeds, and a paired comparison of the methods'
average normalized test metric against the plain average (t-test and Wilcoxon, Holm).

Parameters are merged by each method (merging/); floating buffers (BatchNorm's running statistics)
are averaged over the fine-tunes, integer buffers taken from the first. Fisher merging's Fisher and
RegMean's Gram matrices are computed here, on at most `examples` training examples of each task at
its fine-tuned weights, and kept in the run dir (checkpoints/merge_fisher.pt, merge_gram.pt) for
the next merge.

Written into the sweep dir: merge.md, merge.csv, merge.tex, merge.json and
plots/merge_normalized_test.{pdf,png}.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch import nn

from transferlab import figures, stats
from transferlab.collectives import uses_cuda
from transferlab.config import register_schemas
from transferlab.data.loaders import EVAL_BATCH, make_loader
from transferlab.errors import TransferlabError
from transferlab.evidence import p_text, primary_metric
from transferlab.experiment import build_setup
from transferlab.files import atomic_write, atomic_write_text, file_digest
from transferlab.freeze.lora import is_conv1d
from transferlab.merging import Knob, MergeMethod, methods
from transferlab.merging.base import LAMBDA
from transferlab.regularizers.fisher import diagonal_fisher
from transferlab.report.pairing import SOURCE_DATA_KEYS
from transferlab.report.runs import assign_settings, canonical, load_runs
from transferlab.report.tables import tex_escape
from transferlab.tasks import IGNORE, evaluating, task_of, to_device
from transferlab.weights import add, average, fold_lora, has_adapters, state_digest

INDIVIDUAL, START = "individual", "start"
ROW_TITLES = {INDIVIDUAL: "individual fine-tunes", START: "start + linear probe"}
BASELINE = "uniform"
FIGURE = "plots/merge_normalized_test"

# Settings of the command itself (the methods' own come from their Knobs).
METHOD = Knob("method", "method", "all", str, many=True,
              help="merge methods, a comma list, or all")
EXAMPLES = Knob("examples", "examples", 1000, int, low=1,
                help="training examples per task for the Fisher and the Gram matrices")
FISHER_LABELS = Knob("fisher_labels", "fisher_labels", "sampled", str, choices=("sampled", "empirical"),
                     help="Fisher merging: labels drawn from the model (the true Fisher) or the data's")
BASELINE_KNOB = Knob("baseline", "baseline", BASELINE, str, help="the method the paired comparison is against")
PROBE_EXAMPLES = 10_000  # the start's linear probe: its task's training split, up to this many


# ---------------------------------------------------------------------------------------------
# Finding the runs


@dataclass
class Run:
    dir: Path
    name: str
    status: str
    config: dict
    label: str  # the task's name: the sweep's overrides minus the seed
    task: str  # what makes two runs the same target task (canonical target data + metric)
    primary: str

    @property
    def seed(self):
        return self.config.get("seed")

    @property
    def mode(self) -> str:
        return str((self.config.get("source") or {}).get("mode"))

    @property
    def target_file(self) -> Path:
        return self.dir / "checkpoints" / "target.pt"

    @property
    def mergeable(self) -> bool:
        return self.status == "completed" and self.target_file.is_file()


def task_key(config: dict, primary: str) -> str:
    """The target task a run fine-tuned on: its target data (the data config minus the source
    side) and primary metric."""
    data = {k: v for k, v in (config.get("data") or {}).items() if k not in SOURCE_DATA_KEYS}
    return canonical([primary, data])


def backbone_key(config: dict) -> str:
    return canonical({k: v for k, v in (config.get("backbone") or {}).items() if k != "gradient_checkpointing"})


def find_runs(sweep_dir: Path) -> list[Run]:
    if not sweep_dir.is_dir():
        raise TransferlabError(f"no such directory: {sweep_dir}")
    loaded = [r for r in load_runs(sweep_dir) if r["config"]]
    if not loaded:
        raise TransferlabError(f"{sweep_dir}: no readable results.json under it; point at a sweep dir of fine-tunes")
    runs = []
    for r in assign_settings(loaded):
        primary = primary_metric(r)
        runs.append(Run(r["dir"], r["name"], str(r["status"]), r["config"], r["setting"],
                        task_key(r["config"], primary), primary))
    return runs


def names(runs: list[Run], limit: int = 6) -> str:
    shown = ", ".join(r.name for r in runs[:limit])
    return shown + (f" and {len(runs) - limit} more" if len(runs) > limit else "")


def runs_text(runs: list[Run], plural: str, singular: str) -> str:
    """"run a uses" / "runs a, b use"."""
    return f"run {names(runs)} {singular}" if len(runs) == 1 else f"runs {names(runs)} {plural}"


def minority(groups: dict) -> tuple[list, list]:
    """(the runs of the largest group, the runs of every other group)."""
    ordered = sorted(groups.values(), key=len, reverse=True)
    return ordered[0], [r for g in ordered[1:] for r in g]


def check_backbones(runs: list[Run]) -> None:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(backbone_key(run.config), []).append(run)
    if len(groups) > 1:
        major, other = minority(groups)
        raise TransferlabError(
            f"runs with different backbones: {runs_text(other, 'use', 'uses')} another backbone config than "
            f"{names(major)} "
            f"({(major[0].config.get('backbone') or {}).get('_target_')}): merging needs one architecture and one "
            "start; sweep over target tasks only")


@dataclass
class Plan:
    tasks: list[str]  # task keys, in order of first appearance
    labels: dict[str, str]  # task key → label
    groups: dict[object, list[Run]]  # seed → one run per task, in task order (complete seeds only)
    skipped: dict[object, str]  # seed → why


def plan_merge(runs: list[Run]) -> Plan:
    tasks = list(dict.fromkeys(r.task for r in runs))
    labels = {}
    for r in runs:
        labels.setdefault(r.task, r.label)
    if len(tasks) < 2:
        raise TransferlabError(f"the sweep holds {len(tasks)} target task ({labels[tasks[0]]}): merging needs "
                               "fine-tunes of at least 2 different target tasks from one start, e.g. -m "
                               "'data.target_classes=[5,6,7],[7,8,9]' seed=0,1,2")
    mergeable = [r for r in runs if r.mergeable]
    if not mergeable:
        raise TransferlabError("no completed run with a checkpoints/target.pt: nothing to merge")
    check_backbones(mergeable)
    seeds = list(dict.fromkeys(r.seed for r in runs))
    groups, skipped = {}, {}
    for seed in seeds:
        mine = [r for r in mergeable if r.seed == seed]
        by_task: dict[str, list[Run]] = {}
        for r in mine:
            by_task.setdefault(r.task, []).append(r)
        doubled = [task for task, rs in by_task.items() if len(rs) > 1]
        if doubled:
            rs = by_task[doubled[0]]
            raise TransferlabError(f"seed {seed}: {len(rs)} fine-tunes of task {labels[doubled[0]]} ({names(rs)}): "
                                   "a merge takes one fine-tune per task and seed; sweep over target tasks and seeds "
                                   "only (or merge each setting's runs from its own sweep dir)")
        missing = [labels[t] for t in tasks if t not in by_task]
        if missing:
            skipped[seed] = f"no completed run of task{'s' * (len(missing) > 1)} {', '.join(missing)}"
        else:
            groups[seed] = [by_task[t][0] for t in tasks]
    if not groups:
        raise TransferlabError("no seed has a completed run of every task (" +
                               "; ".join(f"seed {s}: {why}" for s, why in skipped.items()) + "): nothing to merge")
    return Plan(tasks, labels, groups, skipped)


# ---------------------------------------------------------------------------------------------
# The start


def load_payload(path: Path, what: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  torch raises many types for a damaged file
        raise TransferlabError(f"{path}: cannot be read ({type(e).__name__}); {what}") from e


def start_identity(run: Run) -> tuple[str, str]:
    """(what the start is, its identity): a source stage's backbone weights by digest, or the
    pretrained backbone by its config (its weights are checked by digest once rebuilt)."""
    if run.mode == "train":
        path = run.dir / "checkpoints" / "source.pt"
        if not path.is_file():
            raise TransferlabError(f"run {run.name}: no checkpoints/source.pt, so its start (the source stage) cannot "
                                   "be recovered; rerun it (the stage cache gives the same source stage back)")
        return "source stage", state_digest(load_payload(path, "rerun the run")["backbone"])
    if run.mode == "checkpoint":
        path = Path(str((run.config.get("source") or {}).get("path")))
        if not path.is_file():
            raise TransferlabError(f"run {run.name}: its start source.path={path} no longer exists; merging needs the "
                                   "start weights: restore the file")
        return "source checkpoint", state_digest(load_payload(path, "restore the source checkpoint")["backbone"])
    if run.mode == "pretrained":
        return "pretrained weights", backbone_key(run.config)
    raise TransferlabError(f"run {run.name}: source={run.mode} starts from its own random initialization, so runs "
                           "share no start to merge from; fine-tune every task from one source stage (source=train) "
                           "or from pretrained weights (source=pretrained)")


def check_starts(seed, runs: list[Run]) -> tuple[str, str]:
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault(start_identity(run), []).append(run)
    if len(groups) > 1:
        major, other = minority(groups)
        kinds = sorted({k for k, _ in groups})
        why = f"{kinds[0]}: different weights" if len(kinds) == 1 else " vs ".join(kinds)
        raise TransferlabError(
            f"seed {seed}: {runs_text(other, 'do', 'does')} not share the start of {names(major)} ({why}): "
            "merging needs one start — fine-tune every task from the same source stage (the same source settings "
            "and seed; the stage cache shares it) or the same pretrained backbone")
    return next(iter(groups))


# ---------------------------------------------------------------------------------------------
# One task's model


class TaskModel(nn.Module):
    """The shared backbone → a task's head (a token task's head reads per-token features)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, token_level: bool):
        super().__init__()
        self.backbone, self.head, self.token_level = backbone, head, token_level

    def forward(self, x):
        return self.head(self.backbone.token_features(x) if self.token_level else self.backbone(x))


@dataclass
class Entry:
    """A task of one seed: its run, data, task, fine-tuned backbone (plain weights) and head."""

    label: str
    run: Run
    data: object  # TaskSplits of the target task
    task: object  # tasks.Task
    theta: dict  # the fine-tuned backbone's state dict, LoRA folded
    head: nn.Module
    loaders: dict = field(default_factory=dict)

    def loader(self, split: str):
        if split not in self.loaders:
            self.loaders[split] = make_loader(getattr(self.data, split), EVAL_BATCH, shuffle=False)
        return self.loaders[split]


def cut(x, n: int):
    return {k: v[:n] for k, v in x.items()} if isinstance(x, dict) else x[:n]


def capped_batches(split: tuple, limit: int):
    """The split's first `limit` examples (training splits are in random order), in batches."""
    seen = 0
    for batch in make_loader(split, EVAL_BATCH, shuffle=False):
        if seen >= limit:
            return
        x, y = batch[0], batch[1]
        take = min(len(y), limit - seen)
        if take < len(y):
            x, y = cut(x, take), y[:take]
        seen += take
        yield x, y


class Seed:
    """Everything one seed's merge needs: the rebuilt backbone, the start, each task's entry."""

    def __init__(self, seed, runs: list[Run], labels: list[str], start_kind: str, log: Callable[[str], None]):
        self.seed, self.runs, self.log = seed, runs, log
        setups = []
        for run in runs:
            cfg = OmegaConf.create(run.config)
            pl.seed_everything(int(cfg.seed), verbose=False)  # as run_stages does before build_setup
            setups.append((cfg, build_setup(cfg)))
        cfg0, setup0 = setups[0]
        self.backbone = setup0.backbone
        self.device = torch.device("cuda" if uses_cuda(cfg0.trainer) and torch.cuda.is_available() else "cpu")
        self.param_names = [n for n, _ in self.backbone.named_parameters()]
        reference = self.backbone.state_dict()
        self.start_kind = start_kind
        self.start = self.recover_start(runs[0], reference)
        if runs[0].mode == "pretrained":  # every run's rebuilt backbone must be the same weights
            digest = state_digest(self.start)
            for run, (_, setup) in zip(runs[1:], setups[1:]):
                if state_digest(setup.backbone.state_dict()) != digest:
                    raise TransferlabError(f"seed {seed}: the pretrained backbone rebuilt for run {run.name} differs "
                                           f"from run {runs[0].name}'s: the runs do not share one start")
        payloads = [load_payload(run.target_file, "rerun the run") for run in runs]
        self.check_recorded_start(runs, payloads)
        transposed = {path for path, m in self.backbone.named_modules() if is_conv1d(m)}
        self.entries = []
        for label, run, (cfg, setup), saved in zip(labels, runs, setups, payloads):
            theta = self.plain_weights(run, cfg, saved["backbone"], transposed, reference)
            task = task_of(setup.data.target)
            head = nn.Linear(self.backbone.feature_dim, setup.data.target.num_classes)
            try:
                head.load_state_dict(saved["head"])
            except RuntimeError:
                raise TransferlabError(f"run {run.name}: its target.pt head does not fit its task "
                                       f"({setup.data.target.num_classes} classes)") from None
            self.entries.append(Entry(label, run, setup.data.target, task, theta, head.to(self.device)))
            if setup is not setup0:
                del setup.backbone
        self.backbone.to(self.device)
        self.model = TaskModel(self.backbone, self.entries[0].head, self.entries[0].task.token_level)
        self.current: dict | None = None

    def check_recorded_start(self, runs: list[Run], payloads: list[dict]) -> None:
        """target.pt records the digest of the weights its target stage started from (runs from
        before that record nothing): they must agree, and be the start recovered here."""
        groups: dict[str, list[Run]] = {}
        for run, saved in zip(runs, payloads):
            if saved.get("start_digest"):
                groups.setdefault(saved["start_digest"], []).append(run)
        if len(groups) > 1:
            major, other = minority(groups)
            raise TransferlabError(f"seed {self.seed}: {runs_text(other, 'do', 'does')} not share the start of "
                                   f"{names(major)} (the start digests their target.pt records differ): merging "
                                   "needs one start")
        if groups and next(iter(groups)) != state_digest(self.start):
            hint = (" — did the pretrained weights change since they ran?" if runs[0].mode == "pretrained"
                    else "")
            raise TransferlabError(f"seed {self.seed}: the start recovered now ({self.start_kind}) is not the one "
                                   f"runs {names(next(iter(groups.values())))} were fine-tuned from (the digest their "
                                   f"target.pt records differs){hint}")

    def recover_start(self, run: Run, reference: dict) -> dict:
        if run.mode == "pretrained":
            return {k: v.detach().clone() for k, v in reference.items()}
        path = run.dir / "checkpoints" / "source.pt" if run.mode == "train" else Path(str(run.config["source"]["path"]))
        start = load_payload(path, "rerun the run")["backbone"]
        self.check_keys(run, start, reference, "its start")
        return start

    @staticmethod
    def check_keys(run: Run, state: dict, reference: dict, what: str) -> None:
        if set(state) != set(reference) or any(state[k].shape != v.shape for k, v in reference.items()):
            odd = sorted(set(state) ^ set(reference)) or [k for k, v in reference.items() if state[k].shape != v.shape]
            raise TransferlabError(f"run {run.name}: {what} does not fit the backbone rebuilt from its config "
                                   f"(first difference: {odd[0]})")

    def plain_weights(self, run: Run, cfg, backbone_state: dict, transposed: set, reference: dict) -> dict:
        """The run's fine-tuned backbone as plain weights: LoRA adapters folded into W₀ + (α/r)·B A
        (and its frozen base checked against the start)."""
        if has_adapters(backbone_state):
            r, alpha = cfg.freeze.get("r"), cfg.freeze.get("alpha")
            if not r or alpha is None:
                raise TransferlabError(f"run {run.name}: target.pt holds LoRA adapters but its config has no "
                                       "freeze.r / freeze.alpha to scale them")
            try:
                base = fold_lora(backbone_state, 0.0, transposed)
                theta = fold_lora(backbone_state, float(alpha) / float(r), transposed)
            except ValueError as e:
                raise TransferlabError(f"run {run.name}: {e}") from None
            self.check_keys(run, theta, reference, "its target.pt backbone (LoRA folded)")
            if any(not torch.equal(base[n], self.start[n]) for n in self.param_names):
                raise TransferlabError(f"run {run.name}: its LoRA base weights are not the start's: it was not "
                                       "fine-tuned from the start the other runs share")
            return theta
        self.check_keys(run, backbone_state, reference, "its target.pt backbone")
        return dict(backbone_state)

    # -- evaluation ------------------------------------------------------------------------------
    def load(self, state: dict) -> None:
        if state is not self.current:
            self.backbone.load_state_dict(state)
            self.current = state

    def evaluate(self, state: dict, entry: Entry, split: str, head: nn.Module | None = None) -> float:
        """`entry`'s primary metric on `split`, the backbone holding `state`, with the entry's head."""
        self.load(state)
        self.model.head, self.model.token_level = head if head is not None else entry.head, entry.task.token_level
        return float(entry.task.evaluate(self.model, entry.loader(split))[entry.task.primary])

    def full_state(self, params: dict) -> dict:
        """Merged parameters + the fine-tunes' floating buffers averaged + integer ones from the first."""
        thetas = [e.theta for e in self.entries]
        buffers = {k: v for k, v in thetas[0].items() if k not in params and v.is_floating_point()}
        averaged = average([{k: t[k] for k in buffers} for t in thetas]) if buffers else {}
        return {k: params.get(k, averaged.get(k, v)) for k, v in thetas[0].items()}

    def params(self, state: dict) -> dict:
        return {n: state[n] for n in self.param_names}


# ---------------------------------------------------------------------------------------------
# Statistics: the Fisher and the Gram matrices, per task, kept in the run dir


def cached_statistics(entry: Entry, kind: str, settings: dict, compute: Callable[[], dict]) -> tuple[dict, bool]:
    """A task's statistics from checkpoints/merge_<kind>.pt when they were computed with these
    settings from this target.pt, else computed and written there. Returns (stats, cached)."""
    path = entry.run.dir / "checkpoints" / f"merge_{kind}.pt"
    settings = {**settings, "target_pt": file_digest(entry.run.target_file)}
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("settings") == settings:
                return saved["statistics"], True
        except Exception:  # noqa: BLE001  a damaged cache file is recomputed
            pass
    result = compute()
    try:
        atomic_write(path, lambda tmp: torch.save({"settings": settings, "statistics": result}, tmp))
    except OSError:
        pass  # a read-only sweep dir: computed, not kept
    return result, False


def fisher_of(seed: Seed, entry: Entry, examples: int, labels: str) -> dict:
    """The diagonal Fisher of the task's loss at its fine-tuned weights, per backbone parameter
    (regularizers/fisher.py: exact per-example gradients, eval mode)."""
    if entry.task.token_level:
        raise TransferlabError(f"method=fisher: task {entry.label} is token classification; the per-example "
                               "Fisher needs (examples, classes) logits: leave fisher out (method=…)")
    seed.load(entry.theta)
    seed.current = None  # the Fisher pass leaves the weights alone, but be safe
    model = TaskModel(seed.backbone, entry.head, False)
    params = {f"backbone.{n}": p for n, p in seed.backbone.named_parameters()}
    fisher = diagonal_fisher(model, params, capped_batches(entry.data.train, examples),
                             sample_labels=labels == "sampled", seed=int(entry.run.seed))
    return {name[len("backbone."):]: f.cpu() for name, f in fisher.items()}


def pointwise(module: nn.Module) -> bool:
    """A 1×1, stride-1, ungrouped, unpadded convolution: y = W x at every position."""
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride == (1, 1)
            and module.groups == 1 and all(p == 0 for p in getattr(module, "padding", (0, 0)) if isinstance(p, int)))


@torch.no_grad()
def grams_of(seed: Seed, entry: Entry, examples: int) -> dict:
    """Gₜ = XᵀX (float64) of the inputs of every linear layer of the backbone (by its weight's
    name) on the task's training examples at its fine-tuned weights: each nn.Linear (text: padding
    positions left out) and each pointwise convolution (1×1, stride 1, ungrouped: a Linear over the
    channels at every position, so X has one row per example and position)."""
    seed.load(entry.theta)
    model = TaskModel(seed.backbone, entry.head, entry.task.token_level)
    linears = {path: m for path, m in seed.backbone.named_modules()
               if (isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward) or pointwise(m)}
    grams: dict[str, torch.Tensor] = {}
    mask: list[torch.Tensor | None] = [None]

    def hook(path):
        def record(module, args):
            x = args[0].detach()
            if isinstance(module, nn.Conv2d):  # (N, C, H, W) → one row per example and position
                x = x.movedim(1, -1)
            elif mask[0] is not None and x.dim() == 3 and x.shape[:2] == mask[0].shape:
                x = x[mask[0].bool()]
            x = x.reshape(-1, x.shape[-1]).double()
            grams[f"{path}.weight"] = grams.get(f"{path}.weight", 0) + x.T @ x
        return record

    handles = [m.register_forward_pre_hook(hook(path)) for path, m in linears.items()]
    try:
        with evaluating(model) as device:
            for x, _ in capped_batches(entry.data.train, examples):
                (x,) = to_device((x,), device)
                mask[0] = x.get("attention_mask") if isinstance(x, dict) else None
                model(x)
    finally:
        for h in handles:
            h.remove()
    return {k: v.cpu() for k, v in grams.items()}


# ---------------------------------------------------------------------------------------------
# The start's linear probe


@torch.no_grad()
def start_features(seed: Seed, entry: Entry, limit: int) -> tuple[np.ndarray, np.ndarray]:
    seed.load(seed.start)
    features, labels = [], []
    with evaluating(seed.backbone) as device:
        for x, y in capped_batches(entry.data.train, limit):
            (x,) = to_device((x,), device)
            f = seed.backbone.token_features(x) if entry.task.token_level else seed.backbone(x)
            if entry.task.token_level:
                keep = (y != IGNORE).to(f.device)
                f, y = f[keep], y[keep.cpu()]
            features.append(f.float().cpu().numpy())
            labels.append(y.numpy())
    return np.concatenate(features), np.concatenate(labels)


def probe_head(seed: Seed, entry: Entry) -> nn.Linear:
    """A linear head on frozen start features: logistic regression (L2, C = 1) on the standardized
    features of the task's training split, folded back into one Linear layer."""
    from sklearn.linear_model import LogisticRegression

    x, y = start_features(seed, entry, PROBE_EXAMPLES)
    mean, std = x.mean(0), x.std(0) + 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = LogisticRegression(max_iter=1000).fit((x - mean) / std, y)
    classes = entry.head.out_features
    weight = np.zeros((classes, x.shape[1]))
    bias = np.full(classes, -1e9)  # a class absent from the training split is never predicted
    coef, intercept = clf.coef_, clf.intercept_
    if len(clf.classes_) == 2:  # scikit-learn keeps one row for two classes: logit of the second
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    for row, c in enumerate(clf.classes_):
        weight[int(c)] = coef[row] / std
        bias[int(c)] = intercept[row] - (coef[row] * mean / std).sum()
    head = nn.Linear(x.shape[1], classes)
    head.weight.data = torch.tensor(weight, dtype=torch.float32)
    head.bias.data = torch.tensor(bias, dtype=torch.float32)
    return head.to(seed.device)


# ---------------------------------------------------------------------------------------------
# One seed


def ratio(value: float, reference: float) -> float:
    return value / reference if reference else math.nan


def mean(values: list[float]) -> float:
    """The mean of the values that are numbers (NaN: a task whose individual metric is 0)."""
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


def merge_one_seed(seed: Seed, chosen: list[MergeMethod], knobs: dict, examples: int, fisher_labels: str) -> dict:
    entries = seed.entries
    rows: dict[str, dict] = {}
    individual = {e.label: {"val": seed.evaluate(e.theta, e, "val"), "test": seed.evaluate(e.theta, e, "test")}
                  for e in entries}

    def row(state: dict | None = None, heads: dict | None = None, val: dict | None = None, **extra) -> dict:
        """Every task's val and test metric (`val`: already measured), and normalized."""
        tasks = {}
        for e in entries:
            head = heads[e.label] if heads else None
            values = individual[e.label] if state is None else {
                split: (val[e.label] if split == "val" and val else seed.evaluate(state, e, split, head))
                for split in ("val", "test")}
            tasks[e.label] = {**values, **{f"normalized_{s}": ratio(values[s], individual[e.label][s])
                                           for s in ("val", "test")}}
        return {**extra, "tasks": tasks,
                "average_normalized_test": mean([t["normalized_test"] for t in tasks.values()]),
                "average_normalized_val": mean([t["normalized_val"] for t in tasks.values()])}

    needs = {s for m in chosen for s in m.statistics}
    statistics: dict[str, list[dict]] = {}
    cache_note: dict[str, list[bool]] = {}
    for kind in sorted(needs):
        results = []
        for e in entries:
            if kind == "fisher":
                settings = {"kind": kind, "examples": examples, "labels": fisher_labels, "seed": e.run.seed}
                compute = lambda e=e: fisher_of(seed, e, examples, fisher_labels)  # noqa: E731
            elif kind == "gram":
                settings = {"kind": kind, "examples": examples, "layers": "linear+pointwise"}
                compute = lambda e=e: grams_of(seed, e, examples)  # noqa: E731
            else:
                raise TransferlabError(f"merge: no way to compute the statistics {kind!r} a method asks for")
            results.append(cached_statistics(e, kind, settings, compute))
        statistics[kind] = [r for r, _ in results]
        cache_note[kind] = [hit for _, hit in results]
        seed.log(f"seed {seed.seed}: {kind} of {len(entries)} tasks ({sum(cache_note[kind])} kept from an earlier "
                 f"merge, on ≤ {examples} training examples each)")

    rows[INDIVIDUAL] = row()
    heads = {e.label: probe_head(seed, e) for e in entries}
    rows[START] = row(seed.start, heads)
    start = seed.params(seed.start)
    thetas = [seed.params(e.theta) for e in entries]
    for method in chosen:
        own = {k.arg: knobs.get(k.arg, k.default) for k in method.knobs if k is not LAMBDA}
        if method.seeded:
            own["seed"] = int(seed.seed) if isinstance(seed.seed, int) else 0
        stats_arg = {}
        if len(method.statistics) == 1:  # one kind: each task's dict of it
            stats_arg = {"stats": statistics[method.statistics[0]]}
        elif method.statistics:  # several: each task's {kind: dict}
            stats_arg = {"stats": [{kind: statistics[kind][i] for kind in method.statistics}
                                   for i in range(len(entries))]}
        if method.scaled:
            tau = method.vector(start, thetas, **stats_arg, **own)
            tried, val = {}, {}
            for lam in method.lambda_grid(knobs):
                state = seed.full_state(add(start, tau, lam))
                val[lam] = {e.label: seed.evaluate(state, e, "val") for e in entries}
                tried[lam] = mean([ratio(val[lam][e.label], individual[e.label]["val"]) for e in entries])
            scored = {v: score for v, score in tried.items() if not math.isnan(score)} or tried
            best = max(scored.values())
            lam = min(v for v, score in scored.items() if score == best or math.isnan(best))  # ties: the smaller λ
            rows[method.name] = row(seed.full_state(add(start, tau, lam)), val=val[lam],
                                    **{"lambda": lam, "val_by_lambda": tried})
        else:
            rows[method.name] = row(seed.full_state(method.merge(start, thetas, **stats_arg, **own)))
    return {"seed": seed.seed, "runs": {e.label: e.run.name for e in entries}, "start": seed.start_kind,
            "start_digest": state_digest(seed.start),
            "statistics_cached": cache_note, "rows": rows}


# ---------------------------------------------------------------------------------------------
# The command


def merge_sweep(sweep_dir: str | Path, settings: dict | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Merge a sweep's fine-tunes per seed with every chosen method, evaluate, and write
    merge.md/.csv/.tex/.json and the figure. `settings`: parsed key=value settings (see
    `parse_settings`); `log`: where progress and skipped seeds are said (default: stderr)."""
    sweep_dir = Path(sweep_dir)
    log = log or (lambda line: print(f"transferlab merge: {line}", file=sys.stderr))
    settings = dict(settings or {})
    catalogue = methods()
    chosen = [catalogue[name] for name in settings.pop("method", None) or catalogue]
    examples = settings.pop("examples", EXAMPLES.default)
    fisher_labels = settings.pop("fisher_labels", FISHER_LABELS.default)
    baseline = settings.pop("baseline", None)
    knobs = settings  # the methods' own, by Python name
    baseline = baseline or (BASELINE if any(m.name == BASELINE for m in chosen) else chosen[0].name)
    if baseline not in [m.name for m in chosen]:
        raise TransferlabError(f"baseline={baseline}: not among the chosen methods "
                               f"({', '.join(m.name for m in chosen)})")

    register_schemas()
    runs = find_runs(sweep_dir)
    plan = plan_merge(runs)
    for seed, why in plan.skipped.items():
        log(f"seed {seed} skipped: {why}; merging the complete seeds ({', '.join(map(str, plan.groups))})")
    starts = {seed: check_starts(seed, group) for seed, group in plan.groups.items()}
    labels = [plan.labels[t] for t in plan.tasks]
    per_seed = {}
    for seed, group in plan.groups.items():
        log(f"seed {seed}: {len(group)} tasks, methods {', '.join(m.name for m in chosen)}")
        state = Seed(seed, group, labels, starts[seed][0], log)
        per_seed[seed] = merge_one_seed(state, chosen, knobs, examples, fisher_labels)
        del state
    primaries = {plan.labels[t]: next(r.primary for r in runs if r.task == t) for t in plan.tasks}
    result = summarize(per_seed, labels, primaries, chosen, baseline)
    result.update(sweep=str(sweep_dir), skipped={str(s): why for s, why in plan.skipped.items()},
                  settings={"methods": [m.name for m in chosen], "examples": examples, "fisher_labels": fisher_labels,
                            "knobs": {k: list(v) if isinstance(v, tuple) else v for k, v in knobs.items()},
                            "lambda_grids": {m.name: list(m.lambda_grid(knobs)) for m in chosen if m.scaled},
                            "baseline": baseline},
                  start=sorted({kind for kind, _ in starts.values()}),
                  per_seed={str(s): r for s, r in per_seed.items()})
    write_outputs(sweep_dir, result, chosen)
    return result


def summarize(per_seed: dict, labels: list[str], primaries: dict, chosen: list[MergeMethod], baseline: str) -> dict:
    row_keys = [INDIVIDUAL, START, *[m.name for m in chosen]]
    titles = {**ROW_TITLES, **{m.name: m.title for m in chosen}}
    summary = {}
    for key in row_keys:
        seeds = [r["rows"][key] for r in per_seed.values()]
        summary[key] = {
            "title": titles[key],
            "tasks": {label: {"normalized_test": stats.mean_ci([s["tasks"][label]["normalized_test"] for s in seeds]),
                              "test": stats.mean_ci([s["tasks"][label]["test"] for s in seeds])} for label in labels},
            "average": stats.mean_ci([s["average_normalized_test"] for s in seeds]),
            "lambdas": [s.get("lambda") for s in seeds if s.get("lambda") is not None],
        }
    by_method = {m.name: {seed: r["rows"][m.name]["average_normalized_test"] for seed, r in per_seed.items()}
                 for m in chosen}
    comparison = stats.compare_to_baseline(by_method, baseline) if len(chosen) > 1 else {}
    return {"tasks": labels, "primary_metrics": primaries, "seeds": [str(s) for s in per_seed], "rows": row_keys,
            "summary": summary, "comparison": comparison}


# ---------------------------------------------------------------------------------------------
# merge.md, .csv, .tex, .json and the figure


def cell(summary: dict, digits: int = 4) -> str:
    if summary["n"] == 0 or math.isnan(summary["mean"]):
        return "—"
    if summary["n"] == 1 or math.isnan(summary["ci"]):
        return f"{summary['mean']:.{digits}f}"
    return f"{summary['mean']:.{digits}f} ± {summary['ci']:.{digits}f}"


def lambda_text(lambdas: list[float]) -> str:
    if not lambdas:
        return "—"
    return ", ".join(f"{v:g} ×{n}" for v, n in sorted(Counter(lambdas).items()))


def md_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def column(label: str, primaries: dict) -> str:
    return f"{label} ({primaries[label]})"


def markdown(result: dict, chosen: list[MergeMethod]) -> str:
    labels, summary, primaries = result["tasks"], result["summary"], result["primary_metrics"]
    n = len(result["seeds"])
    lines = [f"# Model merging: {result['sweep']}", "",
             f"{len(labels)} target tasks fine-tuned from one start ({', '.join(result['start'])}), merged per seed "
             f"(seeds {', '.join(result['seeds'])}; never across seeds). Each merged backbone is evaluated on every "
             "task with that task's own fine-tuned head. Cells: the task's test primary metric of the merged model "
             "divided by that of the task's individually fine-tuned run (1 = nothing lost), mean ± 95% CI over "
             f"seeds (t, n−1 d.o.f.; n = {n}); average: the mean over tasks, per seed, then over seeds. "
             "λ: the scale "
             "chosen per seed on the mean normalized validation metric (× the seeds that chose it)."]
    if result["skipped"]:
        lines += ["", "**Skipped seeds** (a task without a completed run): " +
                  "; ".join(f"seed {s}: {why}" for s, why in result["skipped"].items()) + "."]
    lines += ["", "## Normalized test metric (merged / individual)", "",
              md_row(["model", "λ (seeds)", *[column(label, primaries) for label in labels], "average"]),
              md_row(["---", "---", *["---:"] * (len(labels) + 1)])]
    for key in result["rows"]:
        s = summary[key]
        lines.append(md_row([s["title"], lambda_text(s["lambdas"]),
                             *[cell(s["tasks"][label]["normalized_test"]) for label in labels], cell(s["average"])]))
    lines += ["", "## Test metric", "", "The same models' test primary metric itself.", "",
              md_row(["model", *[column(label, primaries) for label in labels]]),
              md_row(["---", *["---:"] * len(labels)])]
    for key in result["rows"]:
        s = summary[key]
        lines.append(md_row([s["title"], *[cell(s["tasks"][label]["test"]) for label in labels]]))
    if result["comparison"]:
        base = result["settings"]["baseline"]
        titles = {m.name: m.title for m in chosen}
        lines += ["", f"## Paired comparison: average normalized test metric against {titles[base]}", "",
                  "Per method, the difference from the baseline over the seeds both merged (the same fine-tunes): "
                  "mean with its 95% CI, paired t-test and Wilcoxon signed-rank p-values, Holm-corrected across the "
                  "methods; **win** / **loss**: Holm-adjusted t-test p < 0.05.", "",
                  md_row(["method", "paired seeds", "Δ (95% CI)", "t p (Holm)", "Wilcoxon p (Holm)", ""]),
                  md_row(["---", "---:", "---:", "---:", "---:", "---"])]
        for name, r in result["comparison"].items():
            if r["n"] == 0:
                lines.append(md_row([titles[name], "0", "—", "—", "—", ""]))
                continue
            interval = (f"{r['mean_diff']:+.4f}" if r["n"] < 2 or math.isnan(r["low"])
                        else f"{r['mean_diff']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}]")
            mark = stats.significance_mark(r)
            lines.append(md_row([titles[name], str(r["n"]), interval, p_text(r["t_p"], r["t_p_holm"]),
                                 p_text(r["wilcoxon_p"], r["wilcoxon_p_holm"]),
                                 f"**{mark}**" if mark != stats.NS else "ns"]))
        if 0 < min(r["n"] for r in result["comparison"].values()) < 6:
            lines += ["", "With fewer than 6 seeds the two-sided Wilcoxon p cannot go below 0.05 (2/2ⁿ at best)."]
    lines += ["", "## Figure", "", f"![normalized test metric by method]({FIGURE}.png)", "",
              "*Normalized test metric (merged / individual) of each task and their average, by method: mean ± 95% "
              "t-interval over seeds; dashed: the individual fine-tunes (1).*", "",
              "## Methods", ""]
    lines.append(f"- **{ROW_TITLES[START]}**: the start's backbone, frozen, with a logistic-regression head per task "
                 "(L2, C = 1, standardized features of the task's training split).")
    settings = result["settings"]
    for m in chosen:
        knob_text = ", ".join(f"{k.name}={fmt_knob(settings['knobs'].get(k.arg, k.default))}" for k in m.knobs
                              if k is not LAMBDA)
        grid = settings["lambda_grids"].get(m.name)
        extra = [knob_text] if knob_text else []
        if grid:
            extra.append(f"λ ∈ {{{', '.join(f'{v:g}' for v in grid)}}} on validation")
        if m.statistics:
            extra.append(f"{' and '.join(m.statistics)} on ≤ {settings['examples']} training examples per task"
                         + (f" ({settings['fisher_labels']} labels)" if "fisher" in m.statistics else ""))
        lines.append(f"- **{m.title}** ({m.reference}): {m.formula}" + (f"; {'; '.join(extra)}" if extra else "") + ".")
    lines.append("- Floating buffers (BatchNorm statistics) are the fine-tunes' average in every merge; "
                 "LoRA fine-tunes "
                 "are merged as W₀ + (α/r)·B A.")
    lines += ["", "## Runs", "", md_row(["seed", *labels]), md_row(["---", *["---"] * len(labels)])]
    for seed, r in result["per_seed"].items():
        lines.append(md_row([seed, *[r["runs"][label] for label in labels]]))
    return "\n".join(lines) + "\n"


def fmt_knob(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def write_csv(result: dict, path: Path) -> None:
    stats_names = ("mean", "std", "ci", "n")
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "title", "task", "primary_metric", "lambdas",
                         *[f"normalized_test_{s}" for s in stats_names], *[f"test_{s}" for s in stats_names]])
        for key in result["rows"]:
            s = result["summary"][key]
            lam = " ".join(f"{v:g}" for v in s["lambdas"])
            for label in result["tasks"]:
                t = s["tasks"][label]
                writer.writerow([key, s["title"], label, result["primary_metrics"][label], lam,
                                 *[number(t["normalized_test"][x]) for x in stats_names],
                                 *[number(t["test"][x]) for x in stats_names]])
            writer.writerow([key, s["title"], "average", "", lam, *[number(s["average"][x]) for x in stats_names],
                             "", "", "", ""])


def number(value) -> str:
    return "" if isinstance(value, float) and math.isnan(value) else repr(value)


def latex(result: dict) -> str:
    labels = result["tasks"]
    lines = [f"% Model merging: {result['sweep']}",
             "% test primary metric, merged / individually fine-tuned, mean $\\pm$ 95% CI over seeds; "
             "needs \\usepackage{booktabs}",
             "\\begin{tabular}{l" + "c" * (len(labels) + 1) + "}", "\\toprule",
             " & ".join(["Model", *[tex_escape(label) for label in labels], "Average"]) + " \\\\", "\\midrule"]
    for key in result["rows"]:
        s = result["summary"][key]
        cells = [tex_escape(s["title"]), *[tex_cell(s["tasks"][label]["normalized_test"]) for label in labels],
                 tex_cell(s["average"])]
        lines.append(" & ".join(cells) + " \\\\")
        if key == START:
            lines.append("\\midrule")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def tex_cell(summary: dict) -> str:
    text = cell(summary)
    return "--" if text == "—" else "$" + text.replace("±", "\\pm") + "$"


def figure(result: dict, out: Path) -> list[Path]:
    points = []
    for key in result["rows"]:
        if key == INDIVIDUAL:
            continue  # the reference line
        s = result["summary"][key]
        for label in result["tasks"]:
            points.append({"label": s["title"], "group": label, **s["tasks"][label]["normalized_test"]})
        points.append({"label": s["title"], "group": "average over tasks", **s["average"]})
    points = [p for p in points if p["n"] > 0 and not math.isnan(p["mean"])]
    if not points:
        return []
    plot = figures.categorical(points, "merge/normalized_test", "merge method", reference=1.0,
                               reference_label="individual fine-tunes",
                               ylabel="normalized test metric (merged / individual)", save_to=out / FIGURE)
    return plot.files


def write_outputs(sweep_dir: Path, result: dict, chosen: list[MergeMethod]) -> dict[str, Path]:
    written = {name: sweep_dir / name for name in ("merge.md", "merge.csv", "merge.tex", "merge.json")}
    result["figure"] = [p.relative_to(sweep_dir).as_posix() for p in figure(result, sweep_dir)]
    atomic_write_text(written["merge.md"], markdown(result, chosen))
    write_csv(result, written["merge.csv"])
    atomic_write_text(written["merge.tex"], latex(result))
    atomic_write_text(written["merge.json"], json.dumps(plain(result), indent=2, allow_nan=False) + "\n")
    return written


def plain(value):
    """JSON-safe: NaN (no interval with one seed) as null, numpy numbers as Python's, keys as strings."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# ---------------------------------------------------------------------------------------------
# Command line


def all_knobs() -> dict[str, tuple[Knob, list[str]]]:
    """Every setting the command takes: name → (Knob, the methods that read it)."""
    catalogue = methods().values()
    found: dict[str, tuple[Knob, list[str]]] = {
        METHOD.name: (METHOD, []), BASELINE_KNOB.name: (BASELINE_KNOB, []),
        EXAMPLES.name: (EXAMPLES, [m.name for m in catalogue if m.statistics]),
        FISHER_LABELS.name: (FISHER_LABELS, [m.name for m in catalogue if "fisher" in m.statistics])}
    for m in catalogue:
        for k in m.knobs:
            found.setdefault(k.name, (k, []))[1].append(m.name)
    return found


def parse_settings(items: list[str]) -> dict:
    """key=value settings → {Python name: value}; one-line TransferlabError for anything wrong:
    an unknown key, a value out of range, a setting no chosen method reads."""
    known, catalogue = all_knobs(), methods()
    parsed, given = {}, {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise TransferlabError(f"{item}: expected key=value (keys: {', '.join(known)})")
        if key not in known:
            raise TransferlabError(f"{key}: no such setting; choose among {', '.join(known)}")
        knob = known[key][0]
        try:
            parsed[knob.arg] = knob.parse(text)
        except ValueError as e:
            raise TransferlabError(str(e)) from None
        given[key] = knob
    if "method" in parsed:
        listed = list(dict.fromkeys(parsed["method"]))
        if "all" in listed:
            listed = list(catalogue)
        unknown = [name for name in listed if name not in catalogue]
        if unknown:
            raise TransferlabError(f"method={unknown[0]}: no such merge method; choose among "
                                   f"{', '.join(catalogue)} or all (a comma list)")
        parsed["method"] = listed
    chosen = parsed.get("method") or list(catalogue)
    for key, knob in given.items():
        readers = known[key][1]
        if readers and not set(readers) & set(chosen):
            raise TransferlabError(f"{key}: none of the chosen methods ({', '.join(chosen)}) reads it "
                                   f"({', '.join(readers)} do{'es' * (len(readers) == 1)})")
    if "baseline" in parsed and parsed["baseline"] not in chosen:
        raise TransferlabError(f"baseline={parsed['baseline']}: not among the chosen methods ({', '.join(chosen)})")
    return parsed


def main(argv: list[str]) -> int:
    knobs = all_knobs()
    lines = [f"  method=…  {', '.join(methods())} or all, a comma list (default all)",
             f"  baseline=…  the method the paired comparison is against (default {BASELINE}, else the first)"]
    lines += [f"  {k.describe()}" + (f" [{', '.join(readers)}]" if readers else "")
              for name, (k, readers) in knobs.items() if name not in ("method", "baseline")]
    parser = argparse.ArgumentParser(
        prog="transferlab merge", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="settings (key=value):\n" + "\n".join(lines))
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("settings", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        settings = parse_settings(args.settings)
        result = merge_sweep(args.sweep_dir, settings)
    except TransferlabError as e:
        print(f"transferlab merge: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    print((args.sweep_dir / "merge.md").read_text())
    print(f"transferlab merge: wrote merge.md, merge.csv, merge.tex, merge.json and {len(result['figure'])} figure "
          f"files to {args.sweep_dir}", file=sys.stderr)
    return 0
