"""What a user sees while a stage trains (`trainer.progress_bar`: auto | true | false).

- On a terminal (auto, or true): Lightning's tqdm bar, showing the training loss and the
  validation metric selection uses (`<stage>/val_<primary>`) instead of Lightning's `v_num`.
- Otherwise (auto in CI, SLURM logs, multirun workers): one line per epoch on stdout,
  ``[target] epoch 3/10  loss 0.412  val_acc 0.9537  1.2 s`` — a bar's carriage returns make a log
  file unreadable.
- false: neither.

The loss shown is the epoch's mean training loss (the line) or the last logged step's (the bar):
both read values already on the host or summed on the device, never a host sync per step.
"""

from __future__ import annotations

import sys
import time

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar

MODES = ("auto", "true", "false")


def progress_mode(setting) -> str:
    """`trainer.progress_bar` (a bool from YAML, or auto/true/false) → "bar" | "lines" | "off"."""
    value = str(setting).lower()
    if value not in MODES:
        raise ValueError(f"trainer.progress_bar={setting}: choose auto, true or false")
    if value == "auto":
        return "bar" if sys.stdout.isatty() else "lines"
    return "bar" if value == "true" else "off"


class LossBar(TQDMProgressBar):
    """Lightning's bar with the loss and the monitored validation metric."""

    def __init__(self, monitor: str):
        super().__init__()
        self.monitor = monitor
        self._loss: float | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        stage = self.monitor.split("/", 1)[0]  # which stage, and epochs counted from 1 as in the lines
        self.train_progress_bar.set_description(f"[{stage}] epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % trainer.log_every_n_steps == 0 and outputs is not None:
            self._loss = float(outputs["loss"])  # a logging step: the module synced here anyway
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer, pl_module) -> dict:
        shown = {k: v for k, v in super().get_metrics(trainer, pl_module).items() if k != "v_num"}
        if self._loss is not None:
            shown["loss"] = f"{self._loss:.3f}"
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None:
            shown[self.monitor.rsplit("/", 1)[-1]] = f"{float(value):.4f}"
        return shown


class EpochLines(pl.Callback):
    """One line per epoch: stage, epoch, mean training loss, the monitored metric, wall time."""

    def __init__(self, stage: str, monitor: str, stream=None):
        self.stage, self.monitor, self.stream = stage, monitor, stream
        self._loss_sum, self._steps, self._started = None, 0, time.monotonic()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._loss_sum, self._steps, self._started = None, 0, time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if outputs is None:
            return
        loss = outputs["loss"].detach()  # summed on its device: no host sync per step
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._steps += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # Lightning runs the epoch's validation before this hook, so the metric is this epoch's.
        if not trainer.is_global_zero:
            return
        parts = [f"[{self.stage}] epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"]
        if self._steps:
            parts.append(f"loss {float(self._loss_sum) / self._steps:.3f}")
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None:
            parts.append(f"{self.monitor.rsplit('/', 1)[-1]} {float(value):.4f}")
        parts.append(f"{time.monotonic() - self._started:.1f} s")
        print("  ".join(parts), file=self.stream or sys.stdout, flush=True)


def progress_callbacks(setting, stage: str, monitor: str) -> tuple[list[pl.Callback], bool]:
    """The callbacks for `trainer.progress_bar`, and whether Lightning's own bar stays enabled."""
    mode = progress_mode(setting)
    if mode == "bar":
        return [LossBar(monitor)], True
    if mode == "lines":
        return [EpochLines(stage, monitor)], False
    return [], False
