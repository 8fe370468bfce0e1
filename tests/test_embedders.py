"""Cnn14 and VGGish: front ends against librosa on a 1 kHz sine, official-format checkpoints, shapes, batching,
the two audio protocols, and the ground-truth embedding cache (reuse, protocol change, audio protocol, an older
cache version, changed reference audio, crash recovery, two builds at once)."""

from __future__ import annotations

import fcntl
import json
import threading
from types import SimpleNamespace

import h5py
import librosa
import numpy as np
import pytest
import soundfile
import torch

from common.weights import sha256_file
from eval.__main__ import main as eval_main
from eval.audio_embedding import embed_clips, prepare_waveform
from eval.cache import CACHE_VERSION, ground_truth_embeddings, read_cache
from eval.config import EvalConfig
from eval.embed import generated_embeddings
from eval.panns import CHECKPOINT_NAME as CNN14_FILE
from eval.panns import CNN14_CONFIGS, Cnn14, load_cnn14
from eval.score import audio_metrics
from eval.vggish import CHECKPOINT_NAME as VGGISH_FILE
from eval.vggish import VGGISH_CONFIGS, VGGish, load_vggish, log_mel, stft_magnitude, vggish_mel_matrix

SR = 16000
TINY_CNN14 = CNN14_CONFIGS["tiny"]
TINY_VGGISH = VGGISH_CONFIGS["tiny"]


def sine(hz: float = 1000.0, seconds: float = 2.0) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * hz * np.arange(round(seconds * SR)) / SR)).astype(np.float32)


def noise(seed: int, seconds: float = 2.0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(round(seconds * SR))).astype(np.float32)


def bn_keys(prefix: str) -> set[str]:
    return {f"{prefix}.{name}" for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}


def randomize_batchnorm(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial running statistics, so that a checkpoint that failed to load them would show."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator))
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)


# ---- Cnn14 ----------------------------------------------------------------------------------------------------
def test_cnn14_logmel_matches_librosa_on_a_sine():
    model = load_cnn14(None, config=TINY_CNN14)
    y = sine()
    ours = model.logmel(torch.from_numpy(y[None]))[0, 0].numpy()  # (T, 64)
    power = librosa.feature.melspectrogram(y=y, sr=SR, n_fft=512, hop_length=160, window="hann", center=True,
                                           pad_mode="reflect", power=2.0, n_mels=64, fmin=50, fmax=8000)
    reference = librosa.power_to_db(power, ref=1.0, amin=1e-10, top_db=None).T
    assert ours.shape == reference.shape == (len(y) // 160 + 1, 64)
    np.testing.assert_allclose(ours, reference, atol=1e-3)
    centres = librosa.mel_frequencies(66, fmin=50, fmax=8000)[1:-1]  # Slaney scale, as the filters
    assert ours.mean(axis=0).argmax() == np.abs(centres - 1000).argmin()


def test_cnn14_state_dict_has_the_official_names_and_shapes():
    model = Cnn14(CNN14_CONFIGS["paper"])  # full size: 80.753 M learnt parameters (PANNs paper, Table)
    expected = {"spectrogram_extractor.stft.conv_real.weight", "spectrogram_extractor.stft.conv_imag.weight",
                "logmel_extractor.melW", "fc1.weight", "fc1.bias", "fc_audioset.weight", "fc_audioset.bias",
                *bn_keys("bn0")}
    for i in range(1, 7):
        expected |= {f"conv_block{i}.conv1.weight", f"conv_block{i}.conv2.weight"}
        expected |= bn_keys(f"conv_block{i}.bn1") | bn_keys(f"conv_block{i}.bn2")
    state = model.state_dict()
    assert set(state) == expected
    assert state["spectrogram_extractor.stft.conv_real.weight"].shape == (257, 1, 512)
    assert state["logmel_extractor.melW"].shape == (257, 64)
    assert state["conv_block6.conv2.weight"].shape == (2048, 2048, 3, 3)
    assert state["fc_audioset.weight"].shape == (527, 2048)
    learnt = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert learnt // 1000 == 80753


def test_cnn14_official_checkpoint_round_trip(tmp_path):
    source = load_cnn14(None, config=TINY_CNN14, seed=1)
    randomize_batchnorm(source, seed=1)
    path = tmp_path / CNN14_FILE
    torch.save({"iteration": 660000, "model": source.state_dict()}, path)  # the layout of the published file
    loaded = load_cnn14(tmp_path, config=TINY_CNN14)
    assert loaded.checkpoint_id == sha256_file(path)
    batch = np.stack([noise(0), sine()])
    embedding, probs = loaded.embed_and_probs(batch)
    np.testing.assert_array_equal(embedding, source.embed(batch))
    assert not np.allclose(embedding, load_cnn14(None, config=TINY_CNN14, seed=0).embed(batch))
    assert embedding.shape == (2, TINY_CNN14.embed_dim) and (embedding >= 0).all()  # relu(fc1)
    assert probs.shape == (2, 527)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)  # softmax (the KL of audioldm_eval and av-benchmark), not PANNs' sigmoid
    # the logits behind them (sigmoid KL, Inception score): fc_audioset of the same forward pass
    _, same_probs, logits = loaded.embed_probs_logits(batch)
    np.testing.assert_array_equal(same_probs, probs)
    assert logits.shape == (2, 527) and (logits < 0).any()  # before any activation
    np.testing.assert_allclose(np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True), probs, rtol=1e-5)


def test_cnn14_checkpoint_with_another_front_end_is_refused(tmp_path):
    state = load_cnn14(None, config=TINY_CNN14).state_dict()
    rounded = state["logmel_extractor.melW"] * (1 + 1e-4)  # a librosa-version rounding gap: the stored one is used
    torch.save({"model": {**state, "logmel_extractor.melW": rounded}}, tmp_path / CNN14_FILE)
    torch.testing.assert_close(load_cnn14(tmp_path, config=TINY_CNN14).logmel_extractor.melW, rounded, rtol=0, atol=0)
    state["logmel_extractor.melW"] = state["logmel_extractor.melW"] * 1.5  # e.g. other mel edges
    torch.save({"model": state}, tmp_path / CNN14_FILE)
    with pytest.raises(ValueError, match="melW"):
        load_cnn14(tmp_path, config=TINY_CNN14)
    with pytest.raises(FileNotFoundError, match="Cnn14"):
        load_cnn14(tmp_path / "nowhere", config=TINY_CNN14)


def test_damaged_checkpoints_are_one_line_naming_file_and_tensor(tmp_path):
    """A NaN in a checkpoint made every class probability NaN, which KL's sum dropped: a perfect KL of 0. Names
    that are not strings raised AttributeError. Both are refused where the file is read (every embedder's loader
    goes through these checks)."""
    state = load_cnn14(None, config=TINY_CNN14).state_dict()
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    torch.save({"model": {**state, key: torch.full_like(state[key], float("nan"))}}, tmp_path / CNN14_FILE)
    with pytest.raises(ValueError, match=rf"{CNN14_FILE}: {key} holds NaN or infinity") as error:
        load_cnn14(tmp_path, config=TINY_CNN14)
    assert "\n" not in str(error.value)
    torch.save({"model": {1: torch.zeros(1)}}, tmp_path / CNN14_FILE)
    with pytest.raises(ValueError, match=rf"{CNN14_FILE}: expected a state dict"):
        load_cnn14(tmp_path, config=TINY_CNN14)
    # integers where the weights are float: load_state_dict cast them without a word
    torch.save({"model": {**state, key: state[key].round().to(torch.int64)}}, tmp_path / CNN14_FILE)
    with pytest.raises(ValueError, match=rf"{CNN14_FILE}: {key} is stored as torch.int64, where Cnn14 has float"):
        load_cnn14(tmp_path, config=TINY_CNN14)


def test_cnn14_rejects_too_short_input():
    with pytest.raises(ValueError, match="L >="):
        load_cnn14(None, config=TINY_CNN14).embed(np.zeros((1, 1000), np.float32))


# ---- VGGish ---------------------------------------------------------------------------------------------------
def test_vggish_front_end_on_a_sine():
    config = VGGISH_CONFIGS["paper"]
    y = sine(seconds=1.0).astype(np.float64)
    ours = stft_magnitude(y, config)
    # librosa on the same frames: 400-sample periodic Hann centred in a 512 FFT; shifting the signal by the
    # 56-sample centring offset puts each librosa frame on the reference's samples (the FFT phase differs only)
    shifted = np.pad(y, (56, 56))
    reference = np.abs(librosa.stft(shifted, n_fft=512, hop_length=160, win_length=400, window="hann",
                                    center=False)).T
    assert ours.shape == reference.shape == (1 + (len(y) - 400) // 160, 257)
    np.testing.assert_allclose(ours, reference, atol=1e-6 * reference.max())
    # each filter's apex sits at its HTK centre (mel = 1127 ln(1 + f/700), librosa htk=True)
    mel = vggish_mel_matrix(config)
    centres = librosa.mel_to_hz(np.linspace(librosa.hz_to_mel(125, htk=True), librosa.hz_to_mel(7500, htk=True),
                                            66), htk=True)[1:-1]
    assert np.all(np.abs(mel.argmax(axis=0) - centres / (SR / 512)) <= 1.0)
    assert mel[0].max() == 0.0  # the DC bin is not used
    band = log_mel(y, config).mean(axis=0).argmax()
    assert band == np.abs(centres - 1000).argmin()
    htk = librosa.filters.mel(sr=SR, n_fft=512, n_mels=64, fmin=125, fmax=7500, htk=True, norm=None)
    assert (reference @ htk.T).mean(axis=0).argmax() == band


def test_vggish_state_dict_names_flattening_and_embedding_sign():
    model = VGGish(VGGISH_CONFIGS["paper"])
    expected = {f"features.{i}.{p}" for i in (0, 3, 6, 8, 11, 13) for p in ("weight", "bias")}
    expected |= {f"embeddings.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    assert set(model.state_dict()) == expected
    assert model.state_dict()["embeddings.0.weight"].shape == (4096, 512 * 4 * 6)
    assert round(sum(p.numel() for p in model.parameters()) / 1e5) == 721  # VGGish: 72.1 M
    tiny = load_vggish(None, config=TINY_VGGISH)
    patches = torch.randn(3, 1, 96, 64)
    with torch.inference_mode():
        x = tiny.features(patches)
        reference = tiny.embeddings(torch.transpose(torch.transpose(x, 1, 3), 1, 2).contiguous().view(3, -1))
        ours = tiny(patches)
    torch.testing.assert_close(ours, reference)  # torchvggish's transpose(1, 3), transpose(1, 2), view
    assert (ours < 0).any()  # the embedding is taken before the last ReLU


def test_vggish_official_checkpoint_round_trip_and_patches(tmp_path):
    source = load_vggish(None, config=TINY_VGGISH, seed=1)
    path = tmp_path / VGGISH_FILE
    torch.save(source.state_dict(), path)  # torchvggish's file is a bare state dict
    loaded = load_vggish(tmp_path, config=TINY_VGGISH)
    assert loaded.checkpoint_id == sha256_file(path)
    y = noise(0, seconds=2.5)  # 248 frames: two 96-frame patches, the rest dropped
    out = loaded.embed_patches(y)
    assert out.shape == (2, 128)
    np.testing.assert_array_equal(out, source.embed_patches(y))
    assert not np.allclose(out, load_vggish(None, config=TINY_VGGISH, seed=0).embed_patches(y))
    assert loaded.embed_patches(noise(0, seconds=0.5)).shape == (0, 128)
    torch.save({"features.0.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=VGGISH_FILE):
        load_vggish(tmp_path, config=TINY_VGGISH)


# ---- batching, set metrics, cache ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_models() -> tuple[Cnn14, VGGish]:
    return load_cnn14(None, config=TINY_CNN14), load_vggish(None, config=TINY_VGGISH)


def test_batching_does_not_change_embeddings(tiny_models):
    cnn14, vggish = tiny_models
    clips = [(f"c{i}", noise(i, seconds=seconds)) for i, seconds in enumerate((1.0, 1.0, 1.5, 1.0))]
    one = dict(embed_clips(clips, cnn14, vggish, SR, duration=None, batch_size=1, progress=False))
    many = dict(embed_clips(clips, cnn14, vggish, SR, duration=None, batch_size=3, progress=False))
    assert list(many) == [c for c, _ in clips]
    for clip_id, _ in clips:
        np.testing.assert_allclose(many[clip_id].cnn14_embedding, one[clip_id].cnn14_embedding, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(many[clip_id].cnn14_probs, one[clip_id].cnn14_probs, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(many[clip_id].vggish, one[clip_id].vggish, rtol=1e-5, atol=1e-6)
    assert one["c0"].vggish.shape == (1, 128) and one["c2"].vggish.shape == (1, 128)


def test_prepare_waveform_follows_the_protocol():
    stereo_48k = np.stack([np.ones(48000, np.float32), np.zeros(48000, np.float32)])
    y = prepare_waveform(stereo_48k, 48000, SR, duration=1.5)  # mono mean, 16 kHz, zero-padded to 1.5 s
    assert y.shape == (24000,) and y.dtype == np.float32
    assert abs(y[8000] - 0.5) < 1e-3 and (y[16100:] == 0).all()
    assert prepare_waveform(noise(0, 2.0), SR, SR, duration=1.0).shape == (16000,)
    assert prepare_waveform(noise(0, 2.0), SR, SR, duration=None).shape == (32000,)


def test_the_two_audio_protocols_prepare_stereo_with_a_dc_offset_differently():
    t = np.arange(48000) / 48000
    left = (0.3 + 0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)  # 1 s, DC offset 0.3
    right = np.full(48000, 0.1, np.float32)  # DC only
    stereo = np.stack([left, right])
    # mean-cut: (left + right) / 2 = 0.2 + 0.25 sin, 16 kHz, zero-padded to 1.5 s
    mean_cut = prepare_waveform(stereo, 48000, SR, duration=1.5)
    assert mean_cut.shape == (24000,) and (mean_cut[16100:] == 0).all()
    assert mean_cut[100:15900].mean() == pytest.approx(0.2, abs=2e-3)
    assert mean_cut[100:15900].max() == pytest.approx(0.45, abs=5e-3)
    # audioldm-eval: the left channel alone, its mean removed, 16 kHz, full length zero-padded to 2 s
    first = prepare_waveform(stereo, 48000, SR, duration=None, protocol="audioldm-eval")
    assert first.shape == (32000,) and (first[16100:] == 0).all()
    assert first[100:15900].mean() == pytest.approx(0.0, abs=2e-3)
    assert first[100:15900].max() == pytest.approx(0.5, abs=5e-3) and first[100:15900].min() == pytest.approx(-0.5, abs=5e-3)
    # a clip longer than 2 s keeps its length (never cut); a cut/pad duration is refused for this protocol
    assert prepare_waveform(noise(0, 2.5), SR, SR, None, "audioldm-eval").shape == (40000,)
    with pytest.raises(ValueError, match="full length"):
        prepare_waveform(stereo, 48000, SR, duration=10.0, protocol="audioldm-eval")
    with pytest.raises(ValueError, match="audio protocol"):
        prepare_waveform(stereo, 48000, SR, duration=None, protocol="first-channel")


def test_audio_protocol_flag_and_duration(capsys):
    assert EvalConfig().audio_protocol == "mean-cut" and EvalConfig().metric_duration == 10.0
    assert EvalConfig(audio_protocol="audioldm-eval").metric_duration is None  # full length, whatever --duration says
    assert eval_main(["--audio-protocol", "audioldm-eval", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["audio_protocol"] == "audioldm-eval"
    assert eval_main(["--preset", "paper", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["audio_protocol"] == "mean-cut"  # offered, not the default
    with pytest.raises(ValueError, match="audio_protocol"):
        EvalConfig(audio_protocol="mean")  # type: ignore[arg-type]
    with pytest.raises(SystemExit):  # a Literal field: argparse offers the two choices only
        eval_main(["--audio-protocol", "mean", "--dry-run"])


def test_audio_metrics_of_a_set_with_itself(tiny_models):
    cnn14, vggish = tiny_models
    clips = dict(embed_clips([(f"c{i}", noise(i)) for i in range(10)], cnn14, vggish, SR, 2.0, progress=False))
    same = audio_metrics(clips, clips)
    assert abs(same["fd"]) < 1e-3 and abs(same["fad"]) < 1e-3 and abs(same["kl"]) < 1e-3
    assert abs(same["kl_sigmoid"]) < 1e-3  # 527 terms s log(s / (s + 1e-6)), each above -1e-6
    assert same["kl_pairs"] == 10 and same["n_reference_patches"] == 20
    # Inception score: 10 clips in 10 splits of one clip, each exp(0) = 1
    assert same["inception_score"] == pytest.approx(1.0) and same["inception_score_std"] == pytest.approx(0.0)
    assert same["inception_score_clips"] == same["inception_score_splits"] == 10
    errors: dict[str, str] = {}
    few = audio_metrics(dict(list(clips.items())[:4]), dict(list(clips.items())[:4]), errors)
    # fewer clips than splits: no score (the reference gives NaN; one clip per split would score 1 whatever the audio)
    assert few["inception_score"] is None and list(errors) == ["inception_score"]
    assert "needs at least 10 clips (one per split), got 4" in errors.pop("inception_score")
    assert isinstance(few["kl_sigmoid"], float)
    other = dict(embed_clips([(f"c{i}", sine(300.0 * (i + 1))) for i in range(4)], cnn14, vggish, SR, 2.0,
                             progress=False))
    different = audio_metrics(clips, other, errors)
    assert different["fd"] > 1e-3 and different["fad"] > 1e-3  # (random weights: class posteriors near uniform)
    assert different["kl_pairs"] == 4 and abs(different["kl_sigmoid"]) > 1e-3  # may be negative: sigmoids do not sum to 1


def noise_loader(calls: list[str]):
    """`load_audio` for ground_truth_embeddings: one second of noise seeded by the id's number ('c3': 3), noting
    each id it is asked for in `calls`."""

    def load(clip_id: str) -> np.ndarray:
        calls.append(clip_id)
        return noise(int(clip_id[1:]), seconds=1.0)

    return load


def test_reference_audio_too_short_for_its_protocol_is_a_cached_failure(tmp_path, tiny_models):
    """Reference audio that a protocol never pads (here mean-cut without a duration), shorter than Cnn14 takes,
    stopped the evaluation with Cnn14's ValueError; now it is that clip's failure, cached with its reason."""
    cnn14, vggish = tiny_models
    calls: list[str] = []

    def load(clip_id: str) -> np.ndarray:
        calls.append(clip_id)
        return noise(int(clip_id[1:]), seconds=0.05 if clip_id == "c1" else 1.0)

    path = tmp_path / "gt.h5"
    failed: dict[str, str] = {}
    first = ground_truth_embeddings(path, ["c0", "c1", "c2"], load, cnn14, vggish, SR, None, progress=False,
                                    failed=failed)
    assert list(first) == ["c0", "c2"] and calls == ["c0", "c1", "c2"]
    assert failed == {"c1": "too short for Cnn14 under the mean-cut audio protocol (800 samples at 16000 Hz; it "
                            "takes at least 4960, 0.31 s)"}
    calls.clear()
    again: dict[str, str] = {}
    assert list(ground_truth_embeddings(path, ["c0", "c1", "c2"], load, cnn14, vggish, SR, None, progress=False,
                                        failed=again)) == ["c0", "c2"]
    assert calls == [] and again == failed


def test_cache_reuses_extends_and_rebuilds(tmp_path, tiny_models):
    cnn14, vggish = tiny_models
    calls: list[str] = []
    load = noise_loader(calls)

    path = tmp_path / "gt.h5"
    first = ground_truth_embeddings(path, ["c0", "c1", "c2"], load, cnn14, vggish, SR, 1.0, progress=False)
    assert calls == ["c0", "c1", "c2"] and path.exists()
    with h5py.File(path) as handle:
        assert handle.attrs["sample_rate"] == SR and handle.attrs["duration"] == 1.0
        assert handle.attrs["cnn14_checkpoint"] == "random-init:seed=0"
        protocol = json.loads(handle.attrs["protocol"])
        assert protocol["cache_version"] == CACHE_VERSION and protocol["audio_protocol"] == "mean-cut"
        np.testing.assert_array_equal(handle["clips/id=c1/cnn14_logits"][()], first["c1"].cnn14_logits)
    assert first["c1"].cnn14_logits.shape == (527,)
    calls.clear()
    again = ground_truth_embeddings(path, ["c2", "c0"], load, cnn14, vggish, SR, 1.0, progress=False)
    assert calls == [] and list(again) == ["c2", "c0"]
    np.testing.assert_array_equal(again["c0"].cnn14_embedding, first["c0"].cnn14_embedding)
    np.testing.assert_array_equal(again["c0"].vggish, first["c0"].vggish)
    ground_truth_embeddings(path, ["c0", "c3"], load, cnn14, vggish, SR, 1.0, progress=False)
    assert calls == ["c3"] and set(read_cache(path)) == {"c0", "c1", "c2", "c3"}
    calls.clear()
    other_model = load_cnn14(None, config=TINY_CNN14, seed=5)  # another checkpoint: the cache is stale
    with pytest.raises(ValueError, match="another protocol"):
        read_cache(path, {"cnn14": other_model.protocol()})
    rebuilt = ground_truth_embeddings(path, ["c0", "c1"], load, other_model, vggish, SR, 1.0, progress=False)
    assert calls == ["c0", "c1"]
    assert not np.allclose(rebuilt["c0"].cnn14_embedding, first["c0"].cnn14_embedding)
    assert set(read_cache(path)) == {"c0", "c1"}


def test_cache_of_another_audio_protocol_or_an_older_version_is_rebuilt(tmp_path, tiny_models):
    cnn14, vggish = tiny_models
    calls: list[str] = []

    def load(clip_id: str) -> np.ndarray:
        calls.append(clip_id)
        return np.stack([noise(int(clip_id[1:]), 2.5) + 0.2, noise(9, 2.5)])  # stereo with a DC offset

    path = tmp_path / "gt.h5"
    mean_cut = ground_truth_embeddings(path, ["c0", "c1"], load, cnn14, vggish, SR, 2.0, progress=False)
    audioldm = ground_truth_embeddings(path, ["c0", "c1"], load, cnn14, vggish, SR, None, progress=False,
                                       audio_protocol="audioldm-eval")
    assert calls == ["c0", "c1", "c0", "c1"]  # never served from the other protocol's embeddings
    assert not np.allclose(audioldm["c0"].cnn14_embedding, mean_cut["c0"].cnn14_embedding)
    assert audioldm["c0"].vggish.shape == (2, 128)  # 2.5 s kept whole: two 0.96 s patches (2.0 s: two as well)
    with h5py.File(path) as handle:
        assert json.loads(handle.attrs["protocol"])["audio_protocol"] == "audioldm-eval"
    # a file of the previous layout (cache version 2, no logits) is rebuilt, not read without its logits
    with h5py.File(path, "a") as handle:
        protocol = json.loads(handle.attrs["protocol"])
        handle.attrs["protocol"] = json.dumps({**protocol, "cache_version": 2}, sort_keys=True)
        for group in handle["clips"].values():
            del group["cnn14_logits"]
    calls.clear()
    again = ground_truth_embeddings(path, ["c0", "c1"], load, cnn14, vggish, SR, None, progress=False,
                                    audio_protocol="audioldm-eval")
    assert calls == ["c0", "c1"]
    np.testing.assert_allclose(again["c1"].cnn14_logits, audioldm["c1"].cnn14_logits, rtol=1e-5, atol=1e-6)


def test_a_damaged_cached_clip_is_computed_again(tmp_path, tiny_models, caplog):
    """A complete clip in a cache of the right protocol whose arrays were removed, or replaced by integers or by
    arrays of another shape (a file edited or written by something else) is computed again with a warning, never
    handed to the metrics: a missing array used to end evaluation with a KeyError traceback."""
    cnn14, vggish = tiny_models
    calls: list[str] = []
    load = noise_loader(calls)

    path = tmp_path / "gt.h5"
    first = ground_truth_embeddings(path, ["c0", "c1", "c2", "c3"], load, cnn14, vggish, SR, 1.0, progress=False)
    with h5py.File(path, "a") as handle:
        del handle["clips/id=c0/vggish"]
        del handle["clips/id=c1/cnn14_probs"]
        handle["clips/id=c1"].create_dataset("cnn14_probs", data=np.zeros(500, np.float32))
        del handle["clips/id=c2/cnn14_logits"]
        handle["clips/id=c2"].create_dataset("cnn14_logits", data=np.zeros(527, np.int64))
        del handle["clips/id=c3/vggish"]
        handle["clips/id=c3"].create_dataset("vggish", data=np.zeros((1, 64), np.float32))
    calls.clear()
    with caplog.at_level("WARNING"):
        again = ground_truth_embeddings(path, ["c0", "c1", "c2", "c3"], load, cnn14, vggish, SR, 1.0, progress=False)
    assert calls == ["c0", "c1", "c2", "c3"]
    warnings = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert warnings == [f"{path}: cached clip 'c0' is damaged (no 'vggish'); computing it again",
                        f"{path}: cached clip 'c1' is damaged ('cnn14_probs' has shape (500,), not (527,)); "
                        "computing it again",
                        f"{path}: cached clip 'c2' is damaged ('cnn14_logits' is int64, not floating point); "
                        "computing it again",
                        f"{path}: cached clip 'c3' is damaged ('vggish' has shape (1, 64), not ('any', 128)); "
                        "computing it again"]
    assert not any("source" in r.getMessage() for r in caplog.records)
    for clip_id in ("c0", "c1", "c2", "c3"):
        for key in ("cnn14_embedding", "cnn14_probs", "vggish", "cnn14_logits"):
            np.testing.assert_allclose(getattr(again[clip_id], key), getattr(first[clip_id], key), rtol=1e-5, atol=1e-6)
    calls.clear()
    ground_truth_embeddings(path, ["c0", "c1", "c2", "c3"], load, cnn14, vggish, SR, 1.0, progress=False)
    assert calls == []  # repaired in the file


def test_what_the_embedder_computes_is_returned_as_it_is(tmp_path, caplog):
    """A clip the embedder gives NaN for (a float16 overflow) is returned as it is, now and from the cache, for the
    metrics to refuse with a reason naming it; not dropped as 'damaged' and recomputed on every run."""
    from eval.array_cache import cached_arrays

    def compute(todo):
        for clip_id in todo:
            yield clip_id, {"video": np.full(3, np.nan if clip_id == "b" else 1.0, np.float32)}

    for _ in range(2):
        with caplog.at_level("WARNING"):
            arrays, failed = cached_arrays(tmp_path / "c.h5", {"v": 1}, {"a": None, "b": None}, compute, keys=("video",))
        assert sorted(arrays) == ["a", "b"] and not failed and np.isnan(arrays["b"]["video"]).all()
        assert "damaged" not in caplog.text
        caplog.clear()


def test_a_cached_array_declared_huge_is_computed_again_not_allocated(tmp_path, caplog):
    """A dataset declared (2**40, 3) in a 40 KB file: h5py allocated what the header claims before any shape check, a
    MemoryError traceback (or, at a few GB, memory filled with fill values)."""
    from eval.array_cache import cached_arrays

    calls: list[str] = []

    def compute(todo):
        for clip_id in todo:
            calls.append(clip_id)
            yield clip_id, {"video": np.ones(3, np.float32)}

    path = tmp_path / "c.h5"
    cached_arrays(path, {"v": 1}, {"a": None, "b": None}, compute, keys=("video",))
    with h5py.File(path, "a") as handle:
        del handle["clips/id=a/video"]
        handle["clips/id=a"].create_dataset("video", shape=(2**40, 3), dtype="f4", chunks=(1, 3))
    calls.clear()
    with caplog.at_level("WARNING"):
        arrays, failed = cached_arrays(path, {"v": 1}, {"a": None, "b": None}, compute, keys=("video",))
    assert calls == ["a"] and not failed and arrays["a"]["video"].shape == (3,)
    assert "clip a: a cached array claims more than" in caplog.text


def test_cache_survives_a_crash_and_distrusts_partial_clips(tmp_path, tiny_models):
    cnn14, vggish = tiny_models
    path = tmp_path / "gt.h5"
    partial = tmp_path / "gt.h5.partial"

    def crashing(clip_id: str) -> np.ndarray:
        if clip_id == "c2":
            raise RuntimeError("killed")
        return noise(int(clip_id[1:]), seconds=1.0)

    ids = ["c0", "c1", "c2"]
    with pytest.raises(RuntimeError, match="killed"):
        ground_truth_embeddings(path, ids, crashing, cnn14, vggish, SR, 1.0, batch_size=1, progress=False)
    assert not path.exists() and partial.exists()
    with h5py.File(partial, "a") as handle:  # a clip whose writer died before marking it complete
        group = handle["clips"].create_group("id=c2")
        group.attrs["id"] = "c2"
        group.create_dataset("cnn14_embedding", data=np.full(TINY_CNN14.embed_dim, 99.0, np.float32))
    calls: list[str] = []
    load = noise_loader(calls)

    result = ground_truth_embeddings(path, ids, load, cnn14, vggish, SR, 1.0, progress=False)
    assert calls == ["c2"] and path.exists() and not partial.exists()
    fresh = dict(embed_clips([("c2", load("c2"))], cnn14, vggish, SR, 1.0, progress=False))
    np.testing.assert_allclose(result["c2"].cnn14_embedding, fresh["c2"].cnn14_embedding)
    # a partial file that no longer opens is discarded, not trusted
    partial.write_bytes(b"\x89HDF garbage")
    path.unlink()
    result = ground_truth_embeddings(path, ids, load, cnn14, vggish, SR, 1.0, progress=False)
    assert set(result) == set(ids) and not partial.exists()


def test_cache_checks_the_reference_audio_and_its_source(tmp_path, tiny_models):
    cnn14, vggish = tiny_models
    calls: list[str] = []
    audio = {f"c{i}": noise(i, seconds=1.0) for i in range(3)}

    def load(clip_id: str) -> np.ndarray:
        calls.append(clip_id)
        return audio[clip_id]

    path = tmp_path / "gt.h5"
    source = {"shards_config_sha256": "a" * 64, "sample_rate": SR}
    hashes = {"c0": "h0", "c1": "h1", "c2": "h2"}
    first = ground_truth_embeddings(path, list(hashes), load, cnn14, vggish, SR, 1.0, progress=False,
                                    source=source, audio_hashes=hashes)
    with h5py.File(path) as handle:
        assert json.loads(handle.attrs["protocol"])["reference"] == source
        assert handle["clips/id=c1"].attrs["audio_sha256"] == "h1"
    calls.clear()
    audio["c1"] = noise(7, seconds=1.0)  # the shards were rebuilt: c1's audio changed under the same config
    again = ground_truth_embeddings(path, list(hashes), load, cnn14, vggish, SR, 1.0, progress=False,
                                    source=source, audio_hashes={**hashes, "c1": "h1-new"})
    assert calls == ["c1"]
    assert not np.allclose(again["c1"].cnn14_embedding, first["c1"].cnn14_embedding)
    np.testing.assert_array_equal(again["c0"].cnn14_embedding, first["c0"].cnn14_embedding)
    calls.clear()
    # shards made with another config: another protocol, so nothing cached is trusted
    ground_truth_embeddings(path, ["c0"], load, cnn14, vggish, SR, 1.0, progress=False,
                            source={**source, "shards_config_sha256": "b" * 64}, audio_hashes=hashes)
    assert calls == ["c0"]


def test_two_builds_at_once_take_turns(tmp_path, tiny_models):
    """A second evaluation waits for the lock instead of discarding the first one's partial file."""
    cnn14, vggish = tiny_models
    path = tmp_path / "gt.h5"
    done: dict[str, object] = {}

    def build() -> None:
        done["result"] = ground_truth_embeddings(path, ["c0", "c1"], lambda i: noise(int(i[1:]), 1.0), cnn14,
                                                 vggish, SR, 1.0, progress=False)

    with open(tmp_path / "gt.h5.lock", "a+b") as other:  # another process building the same cache
        fcntl.flock(other, fcntl.LOCK_EX)
        worker = threading.Thread(target=build, daemon=True)  # never keeps a failed test from exiting
        worker.start()
        worker.join(timeout=1.0)
        assert worker.is_alive() and not (tmp_path / "gt.h5.partial").exists()  # waiting, not writing
        fcntl.flock(other, fcntl.LOCK_UN)
    worker.join(timeout=30)
    assert not worker.is_alive() and set(done["result"]) == {"c0", "c1"} and path.exists()


def test_generated_stereo_wav_is_read_by_the_audio_protocol(tmp_path, tiny_models):
    cnn14, vggish = tiny_models
    left = noise(3, seconds=2.5) + 0.1
    (tmp_path / "wav").mkdir()
    soundfile.write(tmp_path / "wav" / "x.wav", np.stack([left, -left], axis=1), SR, subtype="FLOAT")
    clips = [SimpleNamespace(id="x")]
    ours = generated_embeddings(tmp_path, clips, cnn14, vggish, None, [], False, "audioldm-eval")  # type: ignore[arg-type]
    expected = dict(embed_clips([("x", left)], cnn14, vggish, SR, None, progress=False, audio_protocol="audioldm-eval"))
    np.testing.assert_allclose(ours["x"].cnn14_logits, expected["x"].cnn14_logits, rtol=1e-5, atol=1e-5)
    # mean-cut averages the channels: silence here, another embedding
    silent = generated_embeddings(tmp_path, clips, cnn14, vggish, 2.5, [], False)  # type: ignore[arg-type]
    assert not np.allclose(silent["x"].cnn14_logits, ours["x"].cnn14_logits, atol=1e-3)


def test_an_official_file_is_built_at_the_official_size_whatever_the_random_size(tmp_path, monkeypatch):
    """The demo preset's random embedders are tiny; the official Cnn14 file in its weights folder was built at
    that size and refused ("does not fit Cnn14"). An official file now always gets the official architecture
    (here a stand-in "paper" size, to stay fast); a folder where the file goes is one line, not 'missing'."""
    from eval.clips import EvalError
    from eval.embed import load_embedders
    from eval.panns import Cnn14Config

    official = Cnn14Config(channels=(8, 8, 16, 16, 32, 32))
    monkeypatch.setitem(CNN14_CONFIGS, "paper", official)
    monkeypatch.setitem(VGGISH_CONFIGS, "paper", VGGISH_CONFIGS["tiny"])
    torch.save({"iteration": 1, "model": load_cnn14(None, config=official, seed=4).state_dict()}, tmp_path / CNN14_FILE)
    config = EvalConfig(embedder_weights=str(tmp_path), random_embedder_size="tiny", random_embedders=True)
    embedders = load_embedders(config, {"cnn14"}, torch.device("cpu"))
    assert embedders.models["cnn14"].config == official and "cnn14" not in embedders.random
    assert embedders.models["cnn14"].checkpoint_id == sha256_file(tmp_path / CNN14_FILE)
    assert "vggish" in embedders.random  # no file: random, at the configured size

    (tmp_path / VGGISH_FILE).mkdir()
    with pytest.raises(EvalError, match=rf"{VGGISH_FILE}: .* is a folder, not a checkpoint file"):
        load_embedders(config, {"cnn14"}, torch.device("cpu"))


def test_a_damaged_official_file_is_refused_before_the_model_is_built(tmp_path):
    """A zero-byte imagebind_huge.pth took a minute and 5 GB (the model was built first) before its one line."""
    from eval.panns import build_weighted

    (tmp_path / "x.pth").write_bytes(b"")
    built = []
    with pytest.raises(ValueError, match="x.pth"):
        build_weighted(lambda: built.append("model"), tmp_path, "x.pth", "X checkpoint", 0)
    assert built == []
