"""PaSST (FD / KL / IS on PaSST, av-benchmark's protocol): equivalence with hear21passt's get_basic_model(mode="all")
on random weights saved in the official checkpoint layout, the 32 kHz / 10 s front end against av-benchmark's
AudioDataset steps, checkpoint errors, frozen eval mode, and no download."""

from __future__ import annotations

import dataclasses
import inspect
import socket
from pathlib import Path

import hear21passt.base as hear21passt_base
import numpy as np
import pytest
import soundfile
import torch
import torchaudio
from hear21passt.models import passt as hear21passt_passt
from hear21passt.models.helpers import vit_helpers
from hear21passt.models.passt import PaSST

from eval import passt as passt_module
from eval.passt import (
    CHECKPOINT_NAME,
    INPUT_SAMPLES,
    PASST_CONFIGS,
    SAMPLE_RATE,
    PaSSTConfig,
    build_net,
    load_passt,
    passt_waveform,
)

TINY = PASST_CONFIGS["tiny"]
PAPER = PASST_CONFIGS["paper"]

# The embedder runs the same hear21passt modules, in the same order, on the same device as the reference, so the
# outputs are expected to be bit-identical (measured: max |diff| 0.0). The tolerance allows for a reduction-order
# change inside a kernel (another BLAS path under inference_mode than under no_grad): a few float32 ulp per
# operation, amplified over ~10 sequential matmul/LayerNorm/softmax steps per block, stays far below 1e-5 relative.
RTOL, ATOL = 1e-5, 1e-6


def reference_model(monkeypatch: pytest.MonkeyPatch, config: PaSSTConfig, seed: int) -> torch.nn.Module:
    """hear21passt.base.get_basic_model(mode="all") verbatim, its get_model_passt swapped for hear21passt's own
    _create_vision_transformer with pretrained=False (no download) and the config's transformer sizes (the paper
    config gives the arguments get_model(arch="passt_s_swa_p16_128_ap476") passes). LayerNorm scales and all biases
    are then perturbed: their init (ones, zeros) would hide a loader that dropped them."""

    def get_model_passt(arch: str, **kwargs: object) -> torch.nn.Module:
        return hear21passt_passt._create_vision_transformer(
            arch, pretrained=False, distilled=True, patch_size=16, embed_dim=config.embed_dim, depth=config.depth,
            num_heads=config.num_heads, num_classes=527, in_chans=1, img_size=(128, 998), stride=(10, 10),
            u_patchout=0, s_patchout_t=0, s_patchout_f=0)

    monkeypatch.setattr(hear21passt_base, "get_model_passt", get_model_passt)
    torch.manual_seed(seed)
    model = hear21passt_base.get_basic_model(mode="all").eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.net.named_parameters():
            if name.endswith("bias") or ("norm" in name or name.startswith("head.0")):
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model


def random_clips(batch: int, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal((batch, INPUT_SAMPLES))).astype(np.float32)


def assert_equivalent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, config: PaSSTConfig, batch: int) -> None:
    reference = reference_model(monkeypatch, config, seed=5)
    # the official layout: the PaSST net's state dict, no prefix
    torch.save(reference.get_submodule("net").state_dict(), tmp_path / CHECKPOINT_NAME)
    model = load_passt(tmp_path, config=config)
    clips = random_clips(batch, seed=1)
    with torch.no_grad():
        out = reference(torch.from_numpy(clips)).numpy()  # out: (B, 527 + embed_dim), av_bench/extract.py splits it
    logits, embedding = model.logits_and_embedding(clips)
    assert logits.shape == (batch, 527) and embedding.shape == (batch, config.embed_dim)
    assert logits.dtype == embedding.dtype == np.float32
    np.testing.assert_allclose(logits, out[:, :527], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(embedding, out[:, 527:], rtol=RTOL, atol=ATOL)
    assert np.abs(out[:, :527]).max() > 1e-2 and np.abs(embedding).max() > 1e-2  # not trivially zero
    other = load_passt(None, config=config, seed=5).logits_and_embedding(clips)[1]
    assert np.abs(other - embedding).max() > 1e-3  # the loaded weights matter: a random model differs


# ---- 1. equivalence with hear21passt ---------------------------------------------------------------------------
def test_tiny_matches_get_basic_model_from_official_layout_file(monkeypatch, tmp_path):
    assert_equivalent(monkeypatch, tmp_path, TINY, batch=3)


@pytest.mark.slow
def test_paper_matches_get_basic_model_from_official_layout_file(monkeypatch, tmp_path):
    assert_equivalent(monkeypatch, tmp_path, PAPER, batch=2)


def test_paper_config_is_the_get_model_architecture(monkeypatch):
    """The paper config builds PaSST with the arguments (defaults filled in) that get_basic_model's
    get_model(arch="passt_s_swa_p16_128_ap476") passes, so the official file loads strictly into it."""
    calls: list[dict[str, object]] = []

    class Recorder:
        def __init__(self, **kwargs: object) -> None:
            bound = inspect.signature(PaSST).bind(**kwargs)
            bound.apply_defaults()
            calls.append({k: tuple(v) if isinstance(v, list) else v for k, v in bound.arguments.items()})
            self.num_classes = kwargs["num_classes"]

    monkeypatch.setattr(hear21passt_passt, "PaSST", Recorder)
    monkeypatch.setattr(passt_module, "PaSST", Recorder)
    monkeypatch.setattr(hear21passt_passt, "fix_embedding_layer", lambda model: model)
    monkeypatch.setattr(hear21passt_passt, "print", lambda *args: None, raising=False)
    hear21passt_passt.get_model(arch="passt_s_swa_p16_128_ap476", pretrained=False)
    with pytest.raises(AttributeError):  # Recorder has no .eval(): the arguments are recorded by then
        build_net(PAPER)
    reference, ours = calls
    assert ours == reference
    assert ours["embed_dim"] == 768 and ours["depth"] == 12 and ours["stride"] == (10, 10)


def test_batched_equals_one_by_one_and_seeded():
    model = load_passt(None, config=TINY, seed=3)
    clips = random_clips(3, seed=2)
    logits, embedding = model.logits_and_embedding(clips)
    for i in range(3):
        one_logits, one_embedding = model.logits_and_embedding(clips[i])
        np.testing.assert_allclose(one_logits[0], logits[i], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(one_embedding[0], embedding[i], rtol=1e-5, atol=1e-5)
    again = load_passt(None, config=TINY, seed=3).logits_and_embedding(torch.from_numpy(clips))
    np.testing.assert_array_equal(again[1], embedding)
    assert model.checkpoint_id == "random-init:seed=3"


def test_frozen_eval_mode_and_global_rng_untouched():
    """AugmentMelSTFT draws its fmin/fmax jitter from the global generator even in eval mode; masking, jitter and
    patchout only act in training, which train() cannot switch on."""
    model = load_passt(None, config=TINY)
    model.train()
    assert not any(module.training for module in model.modules())
    assert not any(parameter.requires_grad for parameter in model.parameters())
    clips = random_clips(1, seed=4)
    state = torch.get_rng_state()
    first = model.logits_and_embedding(clips)
    assert torch.equal(state, torch.get_rng_state())
    torch.manual_seed(123)
    second = model.logits_and_embedding(clips)
    np.testing.assert_array_equal(first[0], second[0])
    with pytest.raises(ValueError, match="320000"):
        model.logits_and_embedding(clips[:, :16000])


def test_nothing_downloads(monkeypatch):
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access")

    monkeypatch.setattr(vit_helpers, "download_cached_file", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    model = load_passt(None, config=TINY)
    assert model.logits_and_embedding(random_clips(1, seed=0))[1].shape == (1, TINY.embed_dim)


def test_protocol_names_every_knob(tmp_path):
    protocol = load_passt(None, config=TINY).protocol()
    assert protocol["input_samples"] == INPUT_SAMPLES and protocol["sample_rate"] == SAMPLE_RATE
    assert protocol["resampler"]["lowpass_filter_width"] == 6 and protocol["resampler"]["rolloff"] == 0.99
    assert protocol["fmax"] == 15000.0 and protocol["checkpoint"] == "random-init:seed=0"
    assert protocol["embed_dim"] == TINY.embed_dim and protocol["hear21passt"] != "not installed"


# ---- 2. front end against av-benchmark's AudioDataset steps ----------------------------------------------------
def av_benchmark_front_end(path: Path, duration: float | None) -> np.ndarray:
    """av_bench/data/audio_dataset.py AudioDataset(sr=32000, audio_length=duration).read_from_file, then the
    320000 cut/zero-pad of av_bench/extract.py. torchaudio.load decodes through torchcodec, which is not installed
    here; soundfile's float32 read gives the samples torchaudio.load returns (channels first, int16 / 32768)."""
    data, sample_rate = soundfile.read(path, dtype="float32", always_2d=True)
    waveform = torch.from_numpy(data.T.copy())  # (C, L), as torchaudio.load
    waveform = waveform.mean(dim=0)
    waveform = waveform - waveform.mean()
    audio = waveform if sample_rate == 32000 else torchaudio.transforms.Resample(sample_rate, 32000)(waveform)
    if duration is not None:
        audio = audio[: int(32000 * duration)]
    wav = audio.unsqueeze(0).float()  # (1, L): the DataLoader batch after squeeze(1)
    if wav.size(-1) >= 320000:
        wav = wav[..., :320000]
    else:
        wav = torch.nn.functional.pad(wav, (0, 320000 - wav.size(-1)))
    return wav[0].numpy()


@pytest.mark.parametrize("sample_rate,channels", [(44100, 2), (16000, 1), (32000, 1)])
@pytest.mark.parametrize("seconds", [3.0, 12.0])
@pytest.mark.parametrize("duration", [None, 8.0])
def test_front_end_matches_av_benchmark(tmp_path, sample_rate, channels, seconds, duration):
    rng = np.random.default_rng(sample_rate + channels)
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    tone = 0.3 * np.sin(2 * np.pi * 440.0 * t)[:, None] + 0.05 * rng.standard_normal((t.size, channels)) + 0.1
    path = tmp_path / "clip.wav"
    soundfile.write(path, tone, sample_rate)  # 16-bit PCM
    data, _ = soundfile.read(path, dtype="float32", always_2d=True)
    ours = passt_waveform(data.T if channels > 1 else data[:, 0], sample_rate, duration)
    reference = av_benchmark_front_end(path, duration)
    assert ours.shape == (INPUT_SAMPLES,) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, reference)
    kept = int(32000 * min(seconds, duration or 10.0))
    assert np.all(ours[kept + 1:] == 0) and np.abs(ours[: kept - 100]).max() > 0.1


def test_front_end_refuses_bad_input():
    with pytest.raises(ValueError, match="float"):
        passt_waveform(np.zeros(100, dtype=np.int16), 16000, None)
    with pytest.raises(ValueError, match="float"):
        passt_waveform(np.zeros((1, 2, 3), dtype=np.float32), 16000, None)


# ---- 3. checkpoint errors --------------------------------------------------------------------------------------
def test_missing_checkpoint_is_one_line_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_passt(tmp_path, config=TINY)
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / CHECKPOINT_NAME) in message


def test_garbage_checkpoint_is_a_value_error_naming_the_file(tmp_path):
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=CHECKPOINT_NAME):
        load_passt(tmp_path, config=TINY)


@pytest.mark.parametrize("corruption", ["drop_key", "other_width", "imagenet", "prefixed"])
def test_wrong_state_dict_is_a_value_error_naming_the_file(tmp_path, corruption):
    state = load_passt(None, config=TINY).model.net.state_dict()
    if corruption == "drop_key":
        state.pop("head_dist.weight")
    elif corruption == "other_width":
        state = load_passt(None, config=dataclasses.replace(TINY, embed_dim=16)).model.net.state_dict()
    elif corruption == "imagenet":
        state.pop("time_new_pos_embed")
    else:
        state = {f"net.{key}": value for key, value in state.items()}
    torch.save(state, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(ValueError, match=CHECKPOINT_NAME):
        load_passt(tmp_path, config=TINY)


def test_wrapped_checkpoint_loads_with_its_sha256(tmp_path):
    """hear21passt's checkpoint_filter_fn unwraps {'model': state_dict}; the id is the file's sha256."""
    source = load_passt(None, config=TINY, seed=7)
    torch.save({"model": source.model.net.state_dict()}, tmp_path / CHECKPOINT_NAME)
    model = load_passt(tmp_path, config=TINY)
    clips = random_clips(1, seed=9)
    np.testing.assert_array_equal(model.logits_and_embedding(clips)[1], source.logits_and_embedding(clips)[1])
    assert len(model.checkpoint_id) == 64 and model.protocol()["checkpoint"] == model.checkpoint_id
