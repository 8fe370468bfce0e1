"""The science check's pieces: the latent source, the shuffled control and the loudness readout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import shards
from benchmarks.train_science import LoudnessReadout, derangement, pearson, shuffled_copy
from tests.test_train_support import SPEC, write_shards
from train.config import PRESETS
from train.diffusion import sample_latents


def test_latents_are_the_posterior_mean_unless_sampling_is_asked_for():
    mean, std = torch.randn(2, 8, 16, 4), torch.full((2, 8, 16, 4), 0.9)
    assert torch.equal(sample_latents(mean, None, 2.0), 2.0 * mean)
    drawn = sample_latents(mean, std, 2.0, generator=torch.Generator().manual_seed(0))
    # (z / 2 - mean) / std is the standard normal draw
    eps = (drawn / 2.0 - mean) / std
    assert abs(float(eps.std()) - 1) < 0.1 and abs(float(eps.mean())) < 0.1
    # the random tiny VAE's posterior is meaningless; a trained VAE's is sampled as Tango does
    assert not PRESETS["tiny"].posterior_sample and PRESETS["paper"].posterior_sample


@pytest.mark.parametrize("count", [2, 3, 24])
def test_derangement_moves_every_clip(count):
    for seed in range(5):
        donor = derangement(count, seed)
        assert sorted(donor) == list(range(count))
        assert all(d != i for i, d in enumerate(donor))


def test_shuffled_copy_moves_conditions_and_keeps_latents(tmp_path):
    write_shards(tmp_path / "src", num_shards=2, per_shard=4, splits=("train", "train", "train", "test"))
    shuffled_copy(tmp_path / "src", tmp_path / "dst", seed=0)
    source = {s["json"]["id"]: s for s in shards.iterate_samples(shards.list_shards(tmp_path / "src"))}
    target = {s["json"]["id"]: s for s in shards.iterate_samples(shards.list_shards(tmp_path / "dst"))}
    assert source.keys() == target.keys()
    for clip_id, s in source.items():
        t = target[clip_id]
        assert np.array_equal(s["latent_mean.npy"], t["latent_mean.npy"])
        own = np.array_equal(s["clip.npy"], t["clip.npy"])
        assert own == (s["json"]["split"] == "test"), clip_id  # held-out clips keep theirs, no train clip does
        donors = [d for d in source.values() if np.array_equal(d["clip.npy"], t["clip.npy"])]
        assert len(donors) == 1 and np.array_equal(donors[0]["probs.npy"], t["probs.npy"])


def test_pearson_matches_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 50)), rng.standard_normal((3, 50))
    expected = [np.corrcoef(x, y)[0, 1] for x, y in zip(a, b)]
    assert np.allclose(pearson(a, b), expected)


def test_loudness_readout_recovers_a_planted_envelope_on_new_clips():
    """Loudness hidden in a mixed-sign linear image of the latent columns (as a random VAE makes it)."""
    rng = np.random.default_rng(0)
    channels, steps, freq = SPEC.latent_channels, 32, 4
    direction = rng.standard_normal(channels * freq)

    def clips(count: int) -> tuple[np.ndarray, np.ndarray]:
        # zero-mean envelopes (a few sound-silence cycles per clip) under unit latent noise
        cycles, phase = rng.uniform(1, 3, (count, 1)), rng.uniform(0, 2 * np.pi, (count, 1))
        loudness = np.sin(2 * np.pi * cycles * np.arange(steps) / steps + phase)
        columns = rng.standard_normal((count, steps, channels * freq)) + loudness[..., None] * direction
        latents = columns.reshape(count, steps, channels, freq).transpose(0, 2, 1, 3)
        return latents, loudness

    train_latents, train_loudness = clips(20)
    test_latents, test_loudness = clips(5)
    readout = LoudnessReadout.fit(train_latents, train_loudness)
    assert pearson(readout(test_latents), test_loudness).min() > 0.9
    # mean(z^2) cannot see a signed envelope: the planted direction averages out
    energy = (test_latents**2).mean(axis=(1, 3))
    assert pearson(energy, test_loudness).mean() < pearson(readout(test_latents), test_loudness).mean() - 0.3


def test_pearson_inside_ignores_what_follows_each_clip_end():
    from benchmarks.train_science import pearson_inside

    rng = np.random.default_rng(0)
    truth = rng.standard_normal((2, 50))
    guess = truth.copy()
    guess[:, 30:] = -truth[:, 30:]  # wrong only after the clips' ends
    np.testing.assert_allclose(pearson_inside(guess, truth, [30, 30]), [1.0, 1.0])
    assert (pearson_inside(guess, truth, [50, 50]) < 0.9).all()
