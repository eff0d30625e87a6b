"""Accuracy of a model on a split: one pass in eval mode, no gradients."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def accuracy(model: nn.Module, loader) -> float:
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for x, y in loader:
            correct += int((model(x).argmax(-1) == y).sum())
            total += len(y)
    finally:
        model.train(was_training)
    return correct / max(total, 1)


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
    was_training = model.training
    model.eval()
    true_tags, pred_tags = [], []
    try:
        for x, y in loader:
            t, p = tag_sequences(model(x), y, label_names)
            true_tags += t
            pred_tags += p
    finally:
        model.train(was_training)
    return entity_scores(true_tags, pred_tags)
