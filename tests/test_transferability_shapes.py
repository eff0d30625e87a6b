"""Transferability scores over the shapes that break them (issue 25, item 7): n < d, n = d,
n = number of classes, one example per class, constant features, duplicated features. Each score
is checked against its paper's formula written out here independently of transferability.py:

- LogME (You et al., ICML 2021): max over α, β of log N(y; 0, α⁻¹ f fᵀ + β⁻¹ I) / n per class, on
  the n × n marginal covariance (no SVD, no profile), maximized numerically and at its two
  closed-form limits (α → ∞: w = 0; β → ∞ where f fᵀ is invertible);
- LEEP (Nguyen et al., ICML 2020) and NCE (Tran et al., ICCV 2019) as sums over examples;
- H-score (Bao et al., ICIP 2019): tr(pinv(cov f) · cov E[f | y]) with a plain pseudo-inverse.

(hypothesis is not installed: the shapes are enumerated, each with a few seeds.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize

from transferlab import transferability as tr


# -- the references ---------------------------------------------------------------------------------
def log_evidence(f, t, log_alpha, log_beta) -> float:
    """log p(t | f, α, β) of Bayesian linear regression (w ~ N(0, α⁻¹I), noise β⁻¹): t ~ N(0, C),
    C = α⁻¹ f fᵀ + β⁻¹ I, evaluated through a Cholesky factor."""
    n = len(f)
    cov = f @ f.T * math.exp(-log_alpha) + np.eye(n) * math.exp(-log_beta)
    try:
        chol = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        return -math.inf
    z = np.linalg.solve(chol, t)
    return float(-n / 2 * math.log(2 * math.pi) - np.sum(np.log(np.diag(chol))) - z @ z / 2)


def logme_reference(f, y) -> float:
    per_class = []
    n = len(f)
    gram = f @ f.T
    invertible = np.linalg.matrix_rank(gram) == n
    for c in np.unique(y):
        t = (y == c).astype(float)
        # α → ∞: t ~ N(0, β⁻¹ I), best β = n / ‖t‖²
        best = -n / 2 * math.log(2 * math.pi) + n / 2 * math.log(n / (t @ t)) - n / 2
        if invertible:  # β → ∞: t ~ N(0, f fᵀ / α), best α = n / tᵀ(f fᵀ)⁻¹t
            q = float(t @ np.linalg.solve(gram, t))
            sign, logdet = np.linalg.slogdet(gram / (n / q))
            best = max(best, -n / 2 * math.log(2 * math.pi) - logdet / 2 - n / 2)
        for start in ((0.0, 0.0), (4.0, 2.0), (-4.0, 4.0), (0.0, 8.0)):
            res = optimize.minimize(lambda p: -log_evidence(f, t, *p), start, method="Nelder-Mead",
                                    options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 4000})
            best = max(best, -res.fun)
        per_class.append(best / n)
    return float(np.mean(per_class))


def leep_reference(theta, y) -> float:
    n, z_count = theta.shape
    classes = sorted(set(y))
    joint = {(c, z): sum(theta[i, z] for i in range(n) if y[i] == c) / n for c in classes for z in range(z_count)}
    marginal = {z: sum(joint[c, z] for c in classes) for z in range(z_count)}
    return sum(math.log(sum(joint[y[i], z] / marginal[z] * theta[i, z] for z in range(z_count) if marginal[z] > 0))
               for i in range(n)) / n


def nce_reference(theta, y) -> float:
    n = len(y)
    z = [int(np.argmax(row)) for row in theta]
    pairs, per_z = {}, {}
    for yi, zi in zip(y, z):
        pairs[yi, zi] = pairs.get((yi, zi), 0) + 1
        per_z[zi] = per_z.get(zi, 0) + 1
    return sum(count / n * math.log(count / per_z[zi]) for (yi, zi), count in pairs.items())


def hscore_reference(f, y) -> float:
    n = len(f)
    centred = f - f.mean(axis=0)
    means = {c: centred[y == c].mean(axis=0) for c in set(y)}
    g = np.stack([means[c] for c in y])
    return float(np.trace(np.linalg.pinv(centred.T @ centred / (n - 1)) @ (g.T @ g / (n - 1))))


# -- the shapes -------------------------------------------------------------------------------------
def task(n, d, classes, seed, separation=1.0):
    """n examples of `classes` classes (each present), d nonnegative features with a class mean."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    rng.shuffle(y)
    f = np.abs(separation * rng.standard_normal((classes, d))[y] + rng.standard_normal((n, d)))
    logits = rng.standard_normal((n, 4)) * 2
    theta = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return f, y, theta


SHAPES = {  # name: (n, d, classes)
    "n<d": (12, 30, 3),
    "n=d": (15, 15, 3),
    "n>d": (40, 6, 3),
    "n=classes (one example per class), d>n": (5, 8, 5),
    "n=classes, d<n": (6, 3, 6),
    "two examples per class, n=d": (8, 8, 4),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_logme_is_the_evidence_maximum_over_every_shape(shape, seed):
    f, y, _ = task(*SHAPES[shape], seed=seed)
    got, want = tr.logme(f, y), logme_reference(f, y)
    assert math.isfinite(got)
    # never below what any (α, β) or limit reaches; above it only by the optimizer's shortfall
    assert want - 1e-7 <= got <= want + 1e-4, (got, want)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_hscore_is_the_pseudo_inverse_formula_over_every_shape(shape, seed):
    n, d, classes = SHAPES[shape]
    f, y, _ = task(n, d, classes, seed=seed)
    got = tr.hscore(f, y)
    assert got == pytest.approx(hscore_reference(f, y), rel=1e-3, abs=1e-3)
    assert -1e-9 <= got <= min(classes - 1, d) + 1e-6
    if n <= d:  # rank(cov f) = n − 1 ≥ every between-class direction: saturated
        assert got == pytest.approx(classes - 1, rel=1e-3)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_leep_and_nce_are_their_sums_over_every_shape(shape, seed):
    f, y, theta = task(*SHAPES[shape], seed=seed)
    assert tr.leep(theta, y) == pytest.approx(leep_reference(theta, list(y)), rel=1e-10, abs=1e-12)
    assert tr.nce(theta, y) == pytest.approx(nce_reference(theta, list(y)), rel=1e-10, abs=1e-12)


def test_one_example_per_class_has_closed_forms():
    """n = C, each y_c a unit vector. A source head that always says the same class: LEEP = mean
    log P̂(y) = −log C, NCE = −H(Y) = −log C. H-score: each class mean is its example, so
    cov E[f|y] = cov f and the score is rank(cov f) = C − 1 (d ≥ C − 1)."""
    classes = 5
    f, y, _ = task(classes, 8, classes, seed=3)
    constant_head = np.tile(np.array([0.7, 0.2, 0.1]), (classes, 1))
    assert tr.leep(constant_head, y) == pytest.approx(-math.log(classes), abs=1e-12)
    assert tr.nce(constant_head, y) == pytest.approx(-math.log(classes), abs=1e-12)
    assert tr.hscore(f, y) == pytest.approx(classes - 1, rel=1e-4)


def test_duplicated_features_change_nothing():
    """[f, f]: f fᵀ doubles, which α absorbs (LogME), and cov f's range is the same (H-score)."""
    for shape in ("n<d", "n>d", "n=classes, d<n"):
        f, y, _ = task(*SHAPES[shape], seed=0)
        doubled = np.hstack([f, f])
        assert tr.logme(doubled, y) == pytest.approx(tr.logme(f, y), abs=1e-7)
        assert tr.hscore(doubled, y) == pytest.approx(tr.hscore(f, y), rel=1e-3)


def test_constant_features_are_the_no_information_limits():
    """Every feature constant: nothing separates the classes. LogME's evidence is largest with
    w = 0 (α → ∞, t ~ N(0, β⁻¹I) with a constant direction at most); H-score is 0 (pinv(0) = 0)."""
    for n, d, classes in ((12, 30, 3), (15, 15, 3), (40, 6, 3)):
        y = np.arange(n) % classes
        for f in (np.zeros((n, d)), np.full((n, d), 0.5)):
            assert tr.logme(f, y) == pytest.approx(logme_reference(f, y), abs=1e-6)
            assert tr.hscore(f, y) == 0.0 == hscore_reference(f, y)
            scores = tr.transferability_scores(f, y)
            assert all(v is not None and math.isfinite(v) for v in scores.values()), scores


def test_some_constant_features_among_informative_ones():
    f, y, _ = task(30, 8, 3, seed=2)
    f[:, :3] = 1.0  # three dead units
    assert tr.logme(f, y) == pytest.approx(logme_reference(f, y), abs=1e-6)
    assert tr.hscore(f, y) == pytest.approx(hscore_reference(f, y), rel=1e-3)


def test_what_has_no_maximum_is_null_with_one_warning(caplog):
    """Labels an exact linear function of fewer than n feature directions (the class indicators
    as features, duplicated): the evidence grows without bound; the score is null, the run goes on."""
    y = np.arange(12) % 3
    f = np.hstack([np.eye(3)[y], np.eye(3)[y]])
    scores = tr.transferability_scores(f, y)
    assert scores["transferability/logme"] is None and scores["transferability/hscore"] == pytest.approx(2, rel=1e-4)
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1
