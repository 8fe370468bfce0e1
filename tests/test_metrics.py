"""Metric functions against closed forms: Frechet distance of Gaussians, KL (softmax and sigmoid) by hand, the
Inception score of one-hot predictions, summary statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from eval.metrics import (
    frechet_distance,
    frechet_from_stats,
    gaussian_stats,
    inception_score,
    kl_divergence,
    kl_divergence_sigmoid,
    summarize,
)


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


def test_frechet_with_singular_covariance_stays_finite_and_quiet():
    """6 embeddings in 32 dimensions: rank-deficient covariances, as FD on any set of fewer clips than dimensions
    has (scipy's 'Matrix is singular' LinAlgWarning went to stderr on every such evaluation)."""
    import warnings

    x = np.random.default_rng(3).standard_normal((6, 32))
    y = np.maximum(np.random.default_rng(4).standard_normal((6, 32)), 0.0)  # ReLU'd, as Cnn14's relu(fc1)
    y[:, :4] = 0.0  # units no clip of the set excites: an exactly singular covariance
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        distance = frechet_distance(x, x)
        assert math.isfinite(frechet_distance(x, y))
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


def test_kl_sigmoid_two_pairs_by_hand():
    # logits ln 3 and 0 have sigmoids 3/4 and 1/2; ln(1/3) gives 1/4
    third, eps = math.log(3.0), 1e-6
    logits_ref = {"a": np.array([third, 0.0]), "b": np.array([0.0, -third])}
    logits_gen = {"a": np.array([0.0, 0.0]), "b": np.array([third, third]), "only_gen": np.zeros(2)}
    kl_a = 0.75 * math.log(0.75 / (0.5 + eps)) + 0.5 * math.log(0.5 / (0.5 + eps))
    kl_b = 0.5 * math.log(0.5 / (0.75 + eps)) + 0.25 * math.log(0.25 / (0.75 + eps))
    value, pairs = kl_divergence_sigmoid(logits_ref, logits_gen)
    assert pairs == 2
    assert value == pytest.approx((kl_a + kl_b) / 2, rel=1e-9)
    assert value < 0  # the sigmoids do not sum to 1: a sum of p log(p / q) terms, not a divergence
    # softmax of the same logits gives another number
    softmax = {k: np.exp(v) / np.exp(v).sum() for k, v in logits_ref.items()}
    assert kl_divergence(softmax, {k: np.exp(v) / np.exp(v).sum() for k, v in logits_gen.items()})[0] != pytest.approx(value)


def one_hot_logits(classes: list[int], n_classes: int, scale: float = 60.0) -> np.ndarray:
    """Logits whose softmax is one-hot up to exp(-scale) (~1e-26)."""
    return scale * np.eye(n_classes)[classes]


def test_inception_score_of_identical_predictions_is_one():
    logits = one_hot_logits([2] * 30, 5)
    mean, std = inception_score(logits)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    # any identical rows: p = q in every split, KL 0, exp(0) = 1
    same = np.tile(np.random.default_rng(0).standard_normal(7), (20, 1))
    assert inception_score(same)[0] == pytest.approx(1.0, abs=1e-12)


def test_inception_score_of_evenly_spread_one_hots_is_the_number_of_classes():
    # one split: every class once, q uniform, each row's KL = log C, IS = C (the shuffle cannot matter)
    assert inception_score(one_hot_logits(list(range(8)) * 3, 8), splits=1)[0] == pytest.approx(8.0, rel=1e-12)
    # ten unshuffled splits of 4 rows, each holding the 4 classes once: IS = 4 in every split, std 0
    mean, std = inception_score(one_hot_logits(list(range(4)) * 10, 4), splits=10, shuffle_seed=None)
    assert mean == pytest.approx(4.0, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_splits_at_k_n_over_splits_and_takes_the_population_std():
    # N = 3, 2 splits: rows [0, 1) and [1, 3) (k N // splits), not numpy's array_split [0, 2) and [2, 3)
    logits = one_hot_logits([0, 0, 1], 2)
    mean, std = inception_score(logits, splits=2, shuffle_seed=None)
    # split 1 = one row: IS 1; split 2 = two distinct one-hots: IS 2
    assert mean == pytest.approx(1.5, rel=1e-12) and std == pytest.approx(0.5, rel=1e-12)


def test_inception_score_shuffles_with_the_reference_seed():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((23, 6)) * 3
    shuffled = inception_score(logits)  # seed 2020, as audioldm_eval and av-benchmark
    assert shuffled != pytest.approx(inception_score(logits, shuffle_seed=None))
    order = np.random.RandomState(2020).permutation(23)
    assert shuffled == pytest.approx(inception_score(logits[order], shuffle_seed=None), rel=1e-12)
    # by hand: split k holds shuffled rows [k * 23 // 10, (k + 1) * 23 // 10), sizes 2, 2, 2, 3, 2, 2, 3, 2, 2, 3
    scores = []
    for k in range(10):
        chunk = logits[order][k * 23 // 10 : (k + 1) * 23 // 10]
        p = np.exp(chunk) / np.exp(chunk).sum(axis=1, keepdims=True)
        scores.append(math.exp(np.mean(np.sum(p * np.log(p / p.mean(axis=0)), axis=1))))
    assert shuffled[0] == pytest.approx(np.mean(scores), rel=1e-12)
    assert shuffled[1] == pytest.approx(np.std(scores), rel=1e-9)


def test_inception_score_refuses_fewer_clips_than_splits():
    with pytest.raises(ValueError, match="at least 10 clips"):
        inception_score(np.zeros((9, 527)))
    with pytest.raises(ValueError, match="logits"):
        inception_score(np.zeros(527))


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


def test_non_finite_scores_are_refused_not_averaged_away():
    """A NaN probability fell out of KL's sum (np.where(p > 0, ...) is False for NaN): damaged embedder weights read
    as a perfect KL of 0. Non-finite inputs now raise, so the metric is reported as failed with its reason."""
    good = {"a": np.array([0.5, 0.5]), "b": np.array([0.9, 0.1])}
    bad = {"a": np.array([np.nan, np.nan]), "b": np.array([0.9, 0.1])}
    with pytest.raises(ValueError, match="'a': the reference class probabilities hold NaN"):
        kl_divergence(bad, good)
    with pytest.raises(ValueError, match="'a': the generated class probabilities hold NaN"):
        kl_divergence(good, bad)
    with pytest.raises(ValueError, match="logits hold NaN or infinity"):
        inception_score(np.array([[0.0, np.inf]] * 10))


def test_frechet_distance_refuses_non_finite_statistics_at_once():
    """scipy's sqrtm spun forever on a NaN covariance of 128 dimensions (a float WAV holding one inf sample made
    evaluation hang): non-finite statistics raise before it is called."""
    x = np.random.default_rng(0).standard_normal((300, 128))
    y = x.copy()
    y[5, 7] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        frechet_distance(x, y)
