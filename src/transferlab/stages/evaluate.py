"""Accuracy of a model on a split: one pass in eval mode, no gradients, on the model's device
(CPU batches are moved there; Lightning leaves a model on the CPU after `fit`)."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def to_device(batch, device: torch.device):
    """A (x, y) batch, x a tensor or a dict of tensors (text), on `device`."""
    x, y = batch
    if isinstance(x, dict):
        x = {k: v.to(device, non_blocking=True) for k, v in x.items()}
    else:
        x = x.to(device, non_blocking=True)
    return x, y.to(device, non_blocking=True)


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
def predictions(model: nn.Module, loader) -> tuple[np.ndarray, np.ndarray]:
    """(true labels, predicted labels) over the loader."""
    true, predicted = [], []
    with evaluating(model) as device:
        for batch in loader:
            x, y = to_device(batch, device)
            predicted.append(model(x).argmax(-1).cpu())
            true.append(y.cpu())
    if not true:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return torch.cat(true).numpy(), torch.cat(predicted).numpy()


def accuracy(model: nn.Module, loader) -> float:
    true, predicted = predictions(model, loader)
    return float((true == predicted).mean()) if len(true) else 0.0


def classification_scores(model: nn.Module, loader, num_classes: int) -> dict[str, float]:
    """Accuracy and macro F1 (every class weighs the same, whatever its size; a class never
    predicted scores 0)."""
    from sklearn.metrics import f1_score

    true, predicted = predictions(model, loader)
    return {"acc": float((true == predicted).mean()) if len(true) else 0.0,
            "macro_f1": float(f1_score(true, predicted, labels=list(range(num_classes)), average="macro",
                                       zero_division=0))}


# -- token classification (NER) ----------------------------------------------------------------
def tag_sequences(logits: torch.Tensor, y: torch.Tensor, label_names: list[str]) -> tuple[list, list]:
    """True and predicted tag strings per example, at the scored (first sub-token) positions."""
    predicted, scored = logits.argmax(-1).cpu(), (y != -100).cpu()
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


@torch.no_grad()
def token_scores(model: nn.Module, loader, label_names: list[str]) -> dict[str, float]:
    true_tags, pred_tags = [], []
    with evaluating(model) as device:
        for batch in loader:
            x, y = to_device(batch, device)
            t, p = tag_sequences(model(x), y, label_names)
            true_tags += t
            pred_tags += p
    return entity_scores(true_tags, pred_tags)
