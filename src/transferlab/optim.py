"""Learning-rate schedules for `conf/scheduler/` (Hydra partials: `scheduler(optimizer, total_steps=)`).

Every schedule is a factor on each param group's own rate, so the per-block scales of freeze
policies (llrd, gradual) compose with it: group g at step s trains at lr · scale_g · factor(s).
The schedule steps once per optimizer step (Lightning `interval: step`); its state is in the stage
checkpoint, so a resumed run continues the curve exactly.

Warmup (Goyal et al. 2017; the transformers convention): factor(s) = s / w for s < w, with
w = `warmup_steps`, or `warmup_ratio` of the stage's total steps. After warmup, with
p = (s − w) / (total − w) the progress through the rest and f = `final_ratio`:

- constant: 1
- linear:   f + (1 − f) · (1 − p)
- cosine:   f + (1 − f) · ½ (1 + cos(π p))          (Loshchilov & Hutter 2017, one cycle)
"""

from __future__ import annotations

import math
from typing import Annotated, Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from transferlab.config import Bounds, NonNegativeInt
from transferlab.errors import ConfigError

Ratio = Annotated[float, Bounds(ge=0, le=1)]


def warmup_length(total_steps: int, warmup_steps: int, warmup_ratio: float) -> int:
    if warmup_steps and warmup_ratio:
        raise ConfigError(f"scheduler: warmup_steps={warmup_steps} and warmup_ratio={warmup_ratio} both set; "
                          "set one (the other to 0)")
    return warmup_steps or round(warmup_ratio * total_steps)


def factor_curve(kind: str, total_steps: int, warmup: int, final_ratio: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        decay = 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return final_ratio + (1.0 - final_ratio) * decay
    return factor


def _schedule(kind: str, optimizer: Optimizer, total_steps: int, warmup_steps: int, warmup_ratio: float,
              final_ratio: float) -> LambdaLR | None:
    warmup = warmup_length(int(total_steps), warmup_steps, warmup_ratio)
    if kind == "constant" and warmup == 0:
        return None  # nothing to schedule: the optimizer's rates as they are
    return LambdaLR(optimizer, factor_curve(kind, int(total_steps), warmup, final_ratio))


def constant(optimizer: Optimizer, total_steps: int, warmup_steps: NonNegativeInt = 0,
             warmup_ratio: Annotated[float, Bounds(ge=0, lt=1)] = 0.0) -> LambdaLR | None:
    return _schedule("constant", optimizer, total_steps, warmup_steps, warmup_ratio, 1.0)


def linear(optimizer: Optimizer, total_steps: int, warmup_steps: NonNegativeInt = 0,
           warmup_ratio: Annotated[float, Bounds(ge=0, lt=1)] = 0.0, final_ratio: Ratio = 0.0) -> LambdaLR:
    return _schedule("linear", optimizer, total_steps, warmup_steps, warmup_ratio, final_ratio)


def cosine(optimizer: Optimizer, total_steps: int, warmup_steps: NonNegativeInt = 0,
           warmup_ratio: Annotated[float, Bounds(ge=0, lt=1)] = 0.0, final_ratio: Ratio = 0.0) -> LambdaLR:
    return _schedule("cosine", optimizer, total_steps, warmup_steps, warmup_ratio, final_ratio)
