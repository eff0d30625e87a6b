"""BSS, batch spectral shrinkage (Chen et al., NeurIPS 2019): penalize the k smallest singular
values of the batch's feature matrix F (batch × feature_dim),

    L_bss = eta · Σ_{i=1..k} σ²_{-i}(F)

— the directions fine-tuning on few labels learns from noise (negative transfer). The paper:
k = 1, eta = 0.001. σ² are the eigenvalues of the smaller Gram matrix (F Fᵀ or Fᵀ F), one
symmetric eigendecomposition of a min(batch, d)² matrix instead of an SVD of F — in float64: the
Gram matrix squares F's condition number, and in float32 the smallest σ² of a near-square batch
(128 × 128) came out up to 100% off, once exactly 0. The batch is small, so float64 costs little;
the gradient flows back to the features in their own dtype.
"""

from __future__ import annotations

import torch

from transferlab.config import NonNegative, PositiveInt
from transferlab.errors import ConfigError
from transferlab.method import MethodContext, Step
from transferlab.regularizers.base import Regularizer


def smallest_squared_singular_values(features: torch.Tensor, k: int) -> torch.Tensor:
    """The k smallest σ² of `features` (N, d), ascending."""
    with torch.autocast(features.device.type, enabled=False):  # mixed precision must not cast it back down
        f = features.double()
        gram = f @ f.T if f.shape[0] <= f.shape[1] else f.T @ f
        return torch.linalg.eigvalsh(gram)[:k].clamp_min(0)  # eigvalsh: ascending; rounding can dip below 0


class BSS(Regularizer):
    supports_language_modeling = False  # penalizes a classifier's pooled features' spectrum
    has_loss_term = True
    has_penalty = False

    def __init__(self, eta: NonNegative = 0.001, k: PositiveInt = 1):
        self.eta, self.k = eta, k

    def attach(self, ctx: MethodContext) -> None:
        if ctx.task is not None and ctx.task.token_level:
            raise ConfigError("regularizer=bss: the target task is token classification (NER); BSS shrinks a "
                              "batch × feature matrix of pooled features: use a sequence-level task")

    def loss_term(self, step: Step) -> torch.Tensor:
        return self.eta * smallest_squared_singular_values(step.features, self.k).sum().to(step.features.dtype)
