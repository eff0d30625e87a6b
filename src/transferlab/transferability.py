"""Transferability scores: how well a source model should transfer, before any fine-tuning.

Inputs are the backbone's features f (N × D) of the target *training* set at the start of the
target stage, the target labels y (N,), and for LEEP/NCE the source head's softmax θ(x) (N × Z)
on the same examples. numpy, float64 throughout (features arrive as numpy arrays or CPU/GPU
tensors); one SVD of f dominates the cost: ~2,000 × 384 features score in well under a second.

- LogME (You et al., ICML 2021): per class c, the log evidence of Bayesian linear regression of
  the one-hot column y_c on f (w ~ N(0, α⁻¹I), noise N(0, β⁻¹)), maximized over α, β by MacKay's
  fixed-point updates on the SVD of f; the score is the mean over classes of evidence / N. The
  paper's code stops after ≤ 11 updates at a 1% change of α/β; here the updates run to a 1e-10
  change, so the result is the evidence maximum itself (the test checks it against a direct
  numerical maximization).
- LEEP (Nguyen et al., ICML 2020): the mean log-likelihood of the "expected empirical predictor"
  Σ_z P̂(y|z)·θ(x)_z, with P̂(y, z) = 1/N Σ_{i: yᵢ = y} θ(xᵢ)_z. Always ≤ 0.
- NCE (Tran et al., ICCV 2019): −H(Y | Z), Z = argmax of the source head. Always ≤ 0.
- H-score (Bao et al., ICIP 2019): tr(cov(f)⁻¹ · cov(E[f | y])). cov(f) is singular whenever
  N ≤ D or features are collinear, so it is inverted with a small ridge, 1e-6 · (its mean
  eigenvalue) on the diagonal: negligible when cov(f) is well conditioned, and it keeps rounding
  noise in near-null directions from being amplified (a plain pinv with the reference code's
  rcond=1e-15 can be). The score lies in [0, C − 1] and approaches C − 1 (saturates) when N ≲ D;
  constant features score 0 (pinv(0) = 0).

Higher is better for all four; their scales differ, so compare a score only with itself across
settings (the report's Kendall τ), never across scores.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy import optimize

from transferlab.errors import TransferlabError

log = logging.getLogger(__name__)

HSCORE_RIDGE = 1e-6  # × mean eigenvalue of cov(f); see the module docstring
LOGME_GRID = 400  # points over log(α/β) (a few tenths apart), before the refinement


def as_array(x, dtype=np.float64) -> np.ndarray:
    """numpy array from numpy or a torch tensor (any device, with or without grad)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# LogME


def logme(features, labels) -> float:
    """Mean over classes of the maximal log evidence / N (You et al. 2021)."""
    f, y = as_array(features), as_array(labels, np.int64)
    n = len(f)
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    # the non-zero spectrum of fᵀf (zero eigenvalues add nothing, see below); zero as
    # numpy.linalg.matrix_rank decides it, so rounding noise (constant features) is not a direction
    nonzero = s > s.max(initial=0.0) * max(f.shape) * np.finfo(np.float64).eps
    sigma, u = s[nonzero] ** 2, u[:, nonzero]
    evidences = []
    for c in np.unique(y):
        target = (y == c).astype(np.float64)
        x2 = (u.T @ target) ** 2  # target's energy along each singular direction
        outside = max(float(target @ target - x2.sum()), 0.0)  # what no w can fit
        evidences.append(_max_log_evidence(sigma, x2, outside, n, c) / n)
    return float(np.mean(evidences))


def _max_log_evidence(sigma: np.ndarray, x2: np.ndarray, outside: float, n: int, label=None) -> float:
    """max over α, β ∈ (0, ∞] of log p(y | f, α, β), with β profiled out in closed form.

    With f = U S Vᵀ, x = Uᵀy and t = α/β, the posterior mean m has ‖m‖² = Σ σᵢxᵢ²/(t+σᵢ)² and
    the residual ‖f m − y‖² = Σ t²xᵢ²/(t+σᵢ)² + ‖y‖² − ‖x‖²; d/2·log α − ½·log|αI + βfᵀf| =
    −½ Σ log(1 + σᵢ/t) (the d − len(σ) zero eigenvalues cancel). At fixed t the evidence is
    N/2·log β − β/2·(residual + t‖m‖²) + (terms without β), largest at β = N/(residual + t‖m‖²):
    what is left is a function of t alone, maximized over log t on a grid spanning 1e-13·σ_min to
    1e13·σ_max, then refined (MacKay's fixed-point updates reach the same stationary points, but
    crawl — or divide by zero, γ rounding to N — where the maximum is a limit). The limits:
    - t → ∞ (α → ∞: features that explain nothing, w = 0): β = N/‖y‖².
    - t → 0 (β → ∞: no noise) with rank N — N ≤ D features fit every y exactly, as separable
      classes with fewer examples than dimensions do: y ~ N(0, f fᵀ/α), whose log density
      −N/2·log 2π − ½ Σ log(σᵢ/α) − α/2·Σ xᵢ²/σᵢ is largest at α = N / Σ xᵢ²/σᵢ.
    - t → 0 with rank < N and y inside f's span: the evidence grows without bound (a
      TransferlabError; the run records no score).
    """
    rank = len(sigma)
    total = float(np.sum(x2)) + outside  # ‖y‖²
    if rank < n and outside <= 1e-10 * total:
        raise TransferlabError(f"LogME: class {label}'s labels are an exact linear function of {rank} feature "
                               f"directions of {n} examples: the evidence has no maximum (it grows without bound)")

    def profile(log_t: np.ndarray) -> np.ndarray:
        t = np.exp(log_t)[:, None]
        m2 = np.sum(sigma * x2 / (t + sigma) ** 2, axis=1)
        residual = np.sum((t / (t + sigma)) ** 2 * x2, axis=1) + outside
        beta = n / (residual + t[:, 0] * m2)
        return n / 2 * np.log(beta) - n / 2 * (1 + math.log(2 * math.pi)) - np.sum(np.log1p(sigma / t), axis=1) / 2

    candidates = [n / 2 * math.log(n / total) - n / 2 * (1 + math.log(2 * math.pi))]  # t → ∞
    if rank == 0:
        return candidates[0]
    if rank == n:  # t → 0
        m0 = float(np.sum(x2 / sigma))
        candidates.append(-n / 2 * (1 + math.log(2 * math.pi)) - float(np.sum(np.log(sigma))) / 2
                          + n / 2 * math.log(n / m0))
    grid = np.linspace(math.log(sigma.min()) - 30, math.log(sigma.max()) + 30, LOGME_GRID)
    values = profile(grid)
    best = int(np.argmax(values))
    step = grid[1] - grid[0]
    refined = optimize.minimize_scalar(lambda v: -profile(np.array([v]))[0], method="bounded",
                                       bounds=(grid[best] - step, grid[best] + step), options={"xatol": 1e-10})
    candidates += [float(values[best]), -float(refined.fun)]
    return max(candidates)


# ---------------------------------------------------------------------------------------------
# LEEP and NCE: the source head's predictions against the target labels


def leep(source_probs, labels) -> float:
    """1/N Σᵢ log Σ_z P̂(yᵢ | z)·θ(xᵢ)_z (Nguyen et al. 2020)."""
    theta, y = as_array(source_probs), _class_index(labels)
    joint = np.zeros((y.max() + 1, theta.shape[1]))
    np.add.at(joint, y, theta)  # row y: Σ over examples of class y of θ(x)
    joint /= len(y)
    marginal = joint.sum(axis=0)  # P̂(z)
    conditional = np.divide(joint, marginal, out=np.zeros_like(joint), where=marginal > 0)
    eep = np.sum(theta * conditional[y], axis=1)  # the predictor's probability of the true label
    return float(np.mean(np.log(eep)))


def nce(source_probs, labels) -> float:
    """−H(Y | Z) with Z = argmax of the source head (Tran et al. 2019); 0 log 0 = 0."""
    theta, y = as_array(source_probs), _class_index(labels)
    joint = np.zeros((y.max() + 1, theta.shape[1]))
    np.add.at(joint, (y, np.argmax(theta, axis=1)), 1.0)
    joint /= len(y)  # P̂(y, z) from counts
    present = joint > 0
    conditional = np.divide(joint, joint.sum(axis=0), out=np.ones_like(joint), where=present)
    return float(np.sum(joint[present] * np.log(conditional[present])))


# ---------------------------------------------------------------------------------------------
# H-score


def hscore(features, labels) -> float:
    """tr(cov(f)⁻¹ cov(E[f | y])) (Bao et al. 2019), cov(f) with a small ridge (module docstring)."""
    f, y = as_array(features), _class_index(labels)
    f = f - f.mean(axis=0)
    counts = np.bincount(y)
    class_means = np.zeros((len(counts), f.shape[1]))
    np.add.at(class_means, y, f)
    class_means /= np.maximum(counts, 1)[:, None]
    g = class_means[y]  # E[f | y] for each example; already centred, as f is
    cov_f = f.T @ f / (len(f) - 1)
    cov_g = g.T @ g / (len(f) - 1)
    if not np.trace(cov_f) > 0:  # constant features separate nothing: pinv(0) = 0, as the limit
        return 0.0
    ridge = HSCORE_RIDGE * np.trace(cov_f) / len(cov_f)
    return float(np.trace(np.linalg.solve(cov_f + ridge * np.eye(len(cov_f)), cov_g)))


# ---------------------------------------------------------------------------------------------
# What the experiment calls


def transferability_scores(features, labels, source_probs=None) -> dict[str, float | None]:
    """{"transferability/logme", "transferability/hscore"} (+ "…/leep", "…/nce" with source_probs);
    a score that cannot be computed is None (and a warning says why): every score with fewer than
    2 classes or non-finite features. Malformed input (shapes, logits for probabilities) is the
    caller's bug and raises a TransferlabError.

    features (N, D): backbone features of the target training set before fine-tuning; labels (N,)
    its target labels (any integers; for token classification pass one row per token — rows
    labelled < 0, e.g. -100 for ignored sub-tokens, are dropped); source_probs (N, Z): the source
    head's softmax on the same rows, or None when the run has no source head (scratch).
    """
    f = as_array(features)
    y = as_array(labels, np.int64)
    if f.ndim != 2 or y.ndim != 1 or len(f) != len(y):
        raise TransferlabError(f"transferability: features must be (N, D) and labels (N,), got "
                               f"{f.shape} and {y.shape}")
    keep = y >= 0
    f, y = f[keep], y[keep]
    if len(np.unique(y)) < 2 or not np.all(np.isfinite(f)):  # data the run has: nothing to score, no failure
        log.warning("transferability: need finite features and ≥ 2 classes, got %d class(es) in %d labelled rows%s; "
                    "recorded as null", len(np.unique(y)), len(y), "" if np.all(np.isfinite(f)) else
                    " and non-finite features")
        keys = ["logme", "hscore"] + (["leep", "nce"] if source_probs is not None else [])
        return {f"transferability/{k}": None for k in keys}
    scores = {"transferability/logme": measured(logme, f, y), "transferability/hscore": measured(hscore, f, y)}
    if source_probs is not None:
        theta = as_array(source_probs)
        if theta.ndim != 2 or len(theta) != len(keep):
            raise TransferlabError(f"transferability: source_probs must be (N, Z) with N = {len(keep)} "
                                   f"rows like the features, got {theta.shape}")
        theta = theta[keep]
        if np.any(theta < 0) or not np.allclose(theta.sum(axis=1), 1.0, atol=1e-3):
            raise TransferlabError("transferability: source_probs rows must be probabilities summing "
                                   "to 1: pass softmax(source head logits), not the logits")
        scores |= {"transferability/leep": measured(leep, theta, y), "transferability/nce": measured(nce, theta, y)}
    return scores


def measured(score, *inputs) -> float | None:
    """A score, or None with one warning where it cannot be computed: a measurement never takes
    the run it measures down with it."""
    try:
        value = score(*inputs)
    except Exception as error:  # noqa: BLE001  no measurement may fail the run it measures
        log.warning("transferability: %s not computed (%s); recorded as null", score.__name__, error)
        return None
    if not math.isfinite(value):
        log.warning("transferability: %s is %s; recorded as null", score.__name__, value)
        return None
    return value


def _class_index(labels) -> np.ndarray:
    """Labels as 0..C−1 (target classes may be e.g. 5..9)."""
    return np.unique(as_array(labels, np.int64), return_inverse=True)[1].ravel()
