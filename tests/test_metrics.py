"""Metric functions against closed forms: Frechet distance of Gaussians, KL by hand, summary statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from eval.metrics import frechet_distance, frechet_from_stats, gaussian_stats, kl_divergence, summarize


def exact_samples(rng: np.random.Generator, n: int, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """n rows whose sample mean and unbiased sample covariance are exactly `mean` and `cov`."""
    z = rng.standard_normal((n, mean.size))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample covariance -> identity
    return z @ np.linalg.cholesky(cov).T + mean


def test_frechet_of_diagonal_gaussians_matches_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, -0.5])
    s1, s2 = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 0.25, 0.5])
    x = exact_samples(rng, 500, mu1, np.diag(s1))
    y = exact_samples(rng, 300, mu2, np.diag(s2))
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert expected == pytest.approx(6.0 + 4.0 + 1.0 + 0.0 + 0.5)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(y, x) == pytest.approx(expected, rel=1e-9)


def test_frechet_with_full_covariance_matches_eigenvalue_form():
    # S1 = I, S2 = R diag(l) R^T: Tr(S1 + S2 - 2 sqrtm(S1 S2)) = sum (1 - sqrt(l))^2
    rng = np.random.default_rng(1)
    rotation, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    eigenvalues = np.array([0.1, 0.5, 1.0, 2.0, 7.0])
    s2 = rotation @ np.diag(eigenvalues) @ rotation.T
    mu2 = np.arange(5.0)
    expected = mu2 @ mu2 + np.sum((1 - np.sqrt(eigenvalues)) ** 2)
    assert frechet_from_stats(np.zeros(5), np.eye(5), mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_of_identical_sets_is_zero():
    x = np.random.default_rng(2).standard_normal((200, 16))
    assert abs(frechet_distance(x, x)) < 1e-8
    assert frechet_distance(x, x + 1.0) == pytest.approx(16.0, rel=1e-9)  # a shift of the mean only


def test_frechet_with_singular_covariance_stays_finite():
    # 6 embeddings in 32 dimensions: rank-deficient covariances, as FD on a small set has
    x = np.random.default_rng(3).standard_normal((6, 32))
    distance = frechet_distance(x, x)
    assert math.isfinite(distance) and abs(distance) < 1e-3


def test_frechet_rejects_bad_shapes():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError):
        gaussian_stats(np.zeros((1, 3)))


def test_kl_of_a_distribution_with_itself_is_zero_up_to_eps():
    rng = np.random.default_rng(4)
    probs = {f"clip{i}": rng.dirichlet(np.ones(527)) for i in range(3)}
    kl, pairs = kl_divergence(probs, probs)
    assert pairs == 3
    # sum_c p log(p / (p + 1e-6)) is -527e-6 to first order, not exactly 0
    by_hand = np.mean([np.sum(p * np.log(p / (p + 1e-6))) for p in probs.values()])
    assert kl == pytest.approx(by_hand, rel=1e-9)
    assert abs(kl) < 1e-3
    assert kl_divergence(probs, probs, eps=0.0)[0] == pytest.approx(0.0, abs=1e-12)


def test_kl_two_pairs_by_hand_and_unpaired_ids_ignored():
    p_ref = {"a": np.array([0.5, 0.5]), "b": np.array([0.9, 0.1]), "only_ref": np.array([1.0, 0.0])}
    p_gen = {"b": np.array([0.6, 0.4]), "a": np.array([0.25, 0.75]), "only_gen": np.array([0.5, 0.5])}
    eps = 1e-6
    kl_a = 0.5 * math.log(0.5 / (0.25 + eps)) + 0.5 * math.log(0.5 / (0.75 + eps))
    kl_b = 0.9 * math.log(0.9 / (0.6 + eps)) + 0.1 * math.log(0.1 / (0.4 + eps))
    kl, pairs = kl_divergence(p_ref, p_gen)
    assert pairs == 2
    assert kl == pytest.approx((kl_a + kl_b) / 2, rel=1e-12)  # not the last pair's value alone (av-benchmark)
    assert kl != pytest.approx(kl_b)


def test_kl_zero_reference_probability_contributes_nothing():
    kl, _ = kl_divergence({"x": np.array([1.0, 0.0])}, {"x": np.array([0.5, 0.5])})
    assert kl == pytest.approx(math.log(1.0 / (0.5 + 1e-6)))


def test_kl_without_common_ids_raises():
    with pytest.raises(ValueError, match="no clip id"):
        kl_divergence({"a": np.ones(2) / 2}, {"b": np.ones(2) / 2})


def test_summarize_mean_spread_and_confidence_interval():
    scores = [0.2, 0.4, 0.6, float("nan"), 0.8]
    summary = summarize(scores)
    values = np.array([0.2, 0.4, 0.6, 0.8])
    assert summary["n"] == 4 and summary["n_excluded"] == 1
    assert summary["mean"] == pytest.approx(0.5)
    assert summary["std"] == pytest.approx(np.std(values, ddof=1))
    half = stats.t.ppf(0.975, 3) * np.std(values, ddof=1) / 2.0
    assert summary["ci95_low"] == pytest.approx(0.5 - half)
    assert summary["ci95_high"] == pytest.approx(0.5 + half)
    assert math.isnan(summarize([0.3])["std"]) and summarize([0.3])["mean"] == 0.3
    assert summarize([])["n"] == 0
