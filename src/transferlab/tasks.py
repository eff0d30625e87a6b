"""What a task is judged by: its loss, its metrics, its primary metric, and how they reduce
across DDP ranks. Validation (inside fit), the test split and the source-forgetting evaluation
all go through `Task.evaluate` / `Task.tally`, so there is one scoring path per task kind.

- `Classification`: accuracy and macro F1 from a confusion matrix (a sum, so DDP ranks add
  theirs); primary metric `acc`.
- `TokenClassification` (NER): entity-level precision / recall / F1 (seqeval, conlleval rules:
  exact span and type) and accuracy over scored words; tag sequences are gathered across ranks;
  primary metric `f1`.
- `LanguageModeling`: next-token cross-entropy over the scored tokens (`nll`, nats per token, a
  sum and a count across ranks), perplexity exp(nll) and `token_acc` (scored tokens ranked first);
  primary metric `ppl`, lower is better.

`higher_is_better` is the primary metric's direction: selection, early stopping, WiSE-FT's α,
forgetting's sign and the report (results.json's task block) all follow it.

The primary metric is what validation selects on (`<stage>/val_<primary>`), what the report's
headline and transfer gain use, and what Optuna optimizes when `optimized_metric` is null.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from transferlab.collectives import gather_lists, sum_across_ranks

IGNORE = -100  # token labels that no loss or metric counts (sub-tokens after the first, specials, padding)


# -- batches and eval mode ---------------------------------------------------------------------
def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def to_device(batch, device: torch.device):
    """A batch tuple — (x, y) or (x, y, index) — with x a tensor or a dict of tensors (text)."""
    def move(t):
        if isinstance(t, dict):
            return {k: v.to(device, non_blocking=True) for k, v in t.items()}
        return t.to(device, non_blocking=True)
    return tuple(move(t) for t in batch)


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """Eval mode (dropout off, BatchNorm statistics fixed) for the block; yields the model's device.
    The model's own mode comes back afterwards, whatever happens inside."""
    was_training = model.training
    model.eval()
    try:
        yield model_device(model)
    finally:
        model.train(was_training)


@torch.no_grad()
def outputs(model: nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of `model` on every batch of `loader`, in eval mode, on the CPU."""
    logits, labels = [], []
    with evaluating(model) as device:
        for batch in loader:
            x, y = to_device(batch, device)[:2]
            logits.append(model(x).float().cpu())
            labels.append(y.cpu())
    return torch.cat(logits), torch.cat(labels)


class Task:
    """Subclasses define the loss, a tally (what one pass accumulates), and its scores."""

    kind: str
    primary: str  # the metric selection, reports and sweeps use: <stage>/val_<primary>, <stage>/test_<primary>
    token_level = False
    higher_is_better = True  # the primary metric's direction

    def loss(self, logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        # Token level: (N, L, C) → (N·L, C); positions labelled IGNORE are cross-entropy's ignore_index.
        return F.cross_entropy(logits.flatten(0, -2), y.flatten(), ignore_index=IGNORE, reduction=reduction)

    def scored(self, y: torch.Tensor) -> int:
        """How many loss terms `loss(..., reduction="sum")` adds up for labels `y`."""
        return int((y != IGNORE).sum()) if self.token_level else len(y)

    def better(self, score: float, than: float | None) -> bool:
        """Whether `score` beats `than` in the primary metric's direction (None: anything does)."""
        return than is None or (score > than if self.higher_is_better else score < than)

    def new_tally(self):
        raise NotImplementedError

    def add(self, tally, logits: torch.Tensor, y: torch.Tensor):
        raise NotImplementedError

    def scores(self, tally) -> dict[str, float]:
        """The metrics of everything tallied, summed (or gathered) over DDP ranks first."""
        raise NotImplementedError

    def majority_score(self, train_y, test_y) -> float:
        """The primary metric of always predicting the most frequent training label: the floor
        a run must beat (at or below it, a fine-tuning run has failed)."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader) -> dict[str, float]:
        """One pass over `loader` in eval mode, on the model's device."""
        tally = self.new_tally()
        with evaluating(model) as device:
            for batch in loader:
                x, y = to_device(batch, device)[:2]
                tally = self.add(tally, model(x), y)
        return self.scores(tally)

    def describe(self, majority_test: float | None = None) -> dict:
        """The `task` block of results.json."""
        return {"kind": self.kind, "primary_metric": self.primary, "higher_is_better": self.higher_is_better,
                "majority_test": majority_test}


class Classification(Task):
    kind, primary = "classification", "acc"

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def new_tally(self) -> torch.Tensor:
        return torch.zeros(self.num_classes * self.num_classes, dtype=torch.int64)

    def add(self, tally: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cells = (y * self.num_classes + logits.argmax(-1)).cpu()  # row = true class, column = predicted
        return tally + torch.bincount(cells, minlength=self.num_classes ** 2)

    def scores(self, tally: torch.Tensor) -> dict[str, float]:
        counts = np.asarray(sum_across_ranks([float(c) for c in tally.tolist()]), dtype=np.float64)
        return confusion_scores(counts.reshape(self.num_classes, self.num_classes))

    def majority_score(self, train_y, test_y) -> float:
        train_y, test_y = np.asarray(train_y), np.asarray(test_y)
        majority = np.bincount(train_y, minlength=self.num_classes).argmax()
        return float((test_y == majority).mean()) if len(test_y) else 0.0


def confusion_scores(confusion: np.ndarray) -> dict[str, float]:
    """Accuracy and macro F1 (every class weighs the same whatever its size; a class never
    predicted and never present scores 0, as scikit-learn's zero_division=0)."""
    total = confusion.sum()
    tp = np.diag(confusion)
    true_sum, pred_sum = confusion.sum(1), confusion.sum(0)
    denominator = true_sum + pred_sum
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return {"acc": float(tp.sum() / total) if total else 0.0, "macro_f1": float(np.mean(f1))}


class TokenClassification(Task):
    kind, primary, token_level = "token_classification", "f1", True

    def __init__(self, label_names: list[str]):
        self.label_names = list(label_names)

    def new_tally(self) -> tuple[list, list]:
        return [], []

    def add(self, tally, logits: torch.Tensor, y: torch.Tensor):
        true_tags, pred_tags = tag_sequences(logits, y, self.label_names)
        return tally[0] + true_tags, tally[1] + pred_tags

    def scores(self, tally) -> dict[str, float]:
        return entity_scores(gather_lists(tally[0]), gather_lists(tally[1]))

    def majority_score(self, train_y, test_y) -> float:
        return 0.0  # the most frequent tag is O: no entity predicted, entity F1 0


def tag_sequences(logits: torch.Tensor, y: torch.Tensor, label_names: list[str]) -> tuple[list, list]:
    """True and predicted tag strings per example, at the scored (first sub-token) positions."""
    predicted, scored = logits.argmax(-1).cpu(), (y != IGNORE).cpu()
    y = y.cpu()
    true_tags = [[label_names[t] for t in row[keep].tolist()] for row, keep in zip(y, scored)]
    pred_tags = [[label_names[t] for t in row[keep].tolist()] for row, keep in zip(predicted, scored)]
    return true_tags, pred_tags


def entity_scores(true_tags: list[list[str]], pred_tags: list[list[str]]) -> dict[str, float]:
    """Entity-level precision / recall / F1 (seqeval, conlleval rules: an entity counts only
    when its type and exact span match), plus accuracy over scored words."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    words = sum(len(t) for t in true_tags)
    correct = sum(a == b for t, p in zip(true_tags, pred_tags) for a, b in zip(t, p))
    return {"f1": float(f1_score(true_tags, pred_tags, zero_division=0)),
            "precision": float(precision_score(true_tags, pred_tags, zero_division=0)),
            "recall": float(recall_score(true_tags, pred_tags, zero_division=0)),
            "acc": correct / max(words, 1)}


class LanguageModeling(Task):
    """Next-token prediction: position t's logits predict token t+1; positions labelled IGNORE
    (padding, and a chat prompt's tokens) are not scored. `nll` is the mean over scored tokens of
    every text together (a corpus's perplexity, not a mean of per-text perplexities)."""

    kind, primary, token_level, higher_is_better = "language_modeling", "ppl", True, False

    def loss(self, logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return super().loss(logits[:, :-1], y[:, 1:], reduction)

    def scored(self, y: torch.Tensor) -> int:
        return int((y[:, 1:] != IGNORE).sum())

    def new_tally(self) -> tuple[float, int, int]:
        return 0.0, 0, 0  # summed nll, scored tokens, tokens predicted exactly (argmax)

    def add(self, tally, logits: torch.Tensor, y: torch.Tensor):
        target = y[:, 1:]
        correct = int(((logits[:, :-1].argmax(-1) == target) & (target != IGNORE)).sum())
        return (tally[0] + float(self.loss(logits.float(), y, reduction="sum")), tally[1] + self.scored(y),
                tally[2] + correct)

    def scores(self, tally) -> dict[str, float]:
        total, count, correct = sum_across_ranks([tally[0], float(tally[1]), float(tally[2])])
        nll = total / count if count else float("nan")
        # token_acc: the share of scored next tokens the model ranks first (for instruction data:
        # of the answers' tokens)
        return {"ppl": float(np.exp(nll)), "nll": nll, "token_acc": correct / count if count else float("nan")}

    def majority_score(self, train_y, test_y) -> None:
        return None  # no majority-class floor for next-token prediction


def task_of(splits) -> Task:
    """The Task a data split (data.splits.TaskSplits) is judged as."""
    if getattr(splits, "language_modeling", False):
        return LanguageModeling()
    if splits.token_level:
        return TokenClassification(splits.label_names)
    return Classification(splits.num_classes)
