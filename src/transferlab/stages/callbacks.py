"""Callbacks the stages share."""

from __future__ import annotations

import pytorch_lightning as pl


class KeepBestWeights(pl.Callback):
    """Model selection on validation: remember the best epoch's weights, restore them at the end.

    Kept in memory (a small model's state is cheap to copy; a disk checkpoint per epoch is not).
    Ties keep the earlier epoch.
    """

    def __init__(self, monitor: str, higher_is_better: bool = True):
        self.monitor, self.higher_is_better = monitor, higher_is_better
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self._best_state = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module) -> None:
        score = trainer.callback_metrics.get(self.monitor)
        if score is None or trainer.sanity_checking:
            return
        score = float(score)
        if self.best_score is None or (score > self.best_score if self.higher_is_better else score < self.best_score):
            self.best_score, self.best_epoch = score, trainer.current_epoch
            self._best_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_fit_end(self, trainer: pl.Trainer, pl_module) -> None:
        if self._best_state is not None:
            pl_module.load_state_dict(self._best_state)

    # In the stage checkpoint: a resumed run keeps comparing against the best epoch so far.
    def state_dict(self) -> dict:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch, "best_state": self._best_state}

    def load_state_dict(self, state: dict) -> None:
        self.best_score, self.best_epoch, self._best_state = state["best_score"], state["best_epoch"], state["best_state"]
