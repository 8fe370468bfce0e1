"""Synchformer and DeSync (eval.synchformer): front ends, segmenting, offsets, loading, and equivalence with
av-benchmark's own code.

The equivalence tests run the reference (hkchengrex/av-benchmark, av_bench/synchformer/) in a subprocess, because it
needs its own dependencies. Environment:

- AV_BENCHMARK_SRC: a checkout of av-benchmark (the folder that holds av_bench/); the tests skip when it is unset.
- AV_BENCHMARK_PYTHONPATH (optional): extra folders put on the subprocess's path, for what the reference needs and
  this environment lacks: omegaconf, and a transformers 4.x (its hf_src/modeling_ast.py imports helpers that
  transformers 5 removed).
- AV_BENCHMARK_PYTHON (optional): the interpreter for the reference (default: this one).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchaudio
from torchvision.transforms import v2

from eval.synchformer import (
    CHECKPOINT_NAME,
    SEGMENTS_COMPARED,
    SYNCHFORMER_CONFIGS,
    Synchformer,
    load_synchformer,
    num_segments,
    offset_grid,
    synchformer_audio_input,
    synchformer_video_input,
)

TINY = SYNCHFORMER_CONFIGS["tiny"]


@pytest.fixture(scope="module")
def tiny() -> Synchformer:
    return load_synchformer(None, config=TINY, seed=0)


# --------------------------------------------------------------------------------------------------------------
# Front ends
# --------------------------------------------------------------------------------------------------------------
def test_audio_spectrograms_match_torchaudio(tiny: Synchformer) -> None:
    """Segments of 10240 every 5120, torchaudio MelSpectrogram, log(x + 1e-6), zero pad to 66, (x - m) / (2 s)."""
    rng = np.random.default_rng(0)
    waveform = torch.from_numpy(rng.standard_normal((2, 3 * 10240)).astype(np.float32) * 0.1)
    spec = tiny.audio_spectrograms(waveform)
    mel = torchaudio.transforms.MelSpectrogram(sample_rate=16000, win_length=400, hop_length=160, n_fft=1024, n_mels=128)
    starts = range(0, waveform.shape[1] - 10240 + 1, 5120)
    segments = torch.stack([waveform[:, s:s + 10240] for s in starts], dim=1)  # (B, S, 10240)
    expected = torch.log(mel(segments) + 1e-6)  # (B, S, 128, 65)
    assert expected.shape[-1] == 65
    expected = torch.nn.functional.pad(expected, (0, 1))
    expected = ((expected + 4.2677393) / (2 * 4.5689974)).transpose(-1, -2)  # (B, S, 66, 128)
    assert spec.shape == (2, 5, 66, 128)
    torch.testing.assert_close(spec, expected, rtol=1e-5, atol=1e-5)
    # the padded 66th frame is log-domain zero, normalised
    torch.testing.assert_close(spec[..., -1, :], torch.full_like(spec[..., -1, :], 4.2677393 / (2 * 4.5689974)))


def test_audio_input_resamples_averages_and_cuts() -> None:
    rng = np.random.default_rng(1)
    stereo = rng.standard_normal((2, 44100 * 3)).astype(np.float32) * 0.1
    x = synchformer_audio_input(stereo, 44100, 2.5)
    expected = torchaudio.transforms.Resample(44100, 16000)(torch.from_numpy(stereo).mean(dim=0))[:40000]
    assert x.shape == (40000,) and x.dtype == torch.float32
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    mono = rng.standard_normal(16000 * 2).astype(np.float32)
    np.testing.assert_array_equal(synchformer_audio_input(mono, 16000, 1.5).numpy(), mono[:24000])  # no mean removal
    with pytest.raises(ValueError, match="too short"):
        synchformer_audio_input(mono, 16000, 2.5)
    with pytest.raises(ValueError):
        synchformer_audio_input(np.zeros((2, 2, 5), np.float32), 16000, 1.0)


def test_video_input_matches_torchvision_v2() -> None:
    """Resize(224, bicubic) on uint8 (so rounded to uint8), CenterCrop(224), /255, (x - 0.5) / 0.5."""
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 256, (3, 180, 320, 3), dtype=np.uint8)
    x = synchformer_video_input(frames)
    reference = v2.Compose([v2.Resize(224, interpolation=v2.InterpolationMode.BICUBIC), v2.CenterCrop(224), v2.ToImage(),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)])
    expected = reference(torch.from_numpy(frames).permute(0, 3, 1, 2))
    assert x.shape == (3, 3, 224, 224) and x.dtype == torch.float32 and type(x) is torch.Tensor
    torch.testing.assert_close(x, expected.as_subclass(torch.Tensor), rtol=0, atol=0)
    levels = (x * 0.5 + 0.5) * 255  # resized in uint8: every value is an integer level
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    constant = synchformer_video_input(np.full((1, 240, 240, 3), 255, np.uint8))
    torch.testing.assert_close(constant, torch.ones_like(constant))
    with pytest.raises(ValueError, match="uint8"):
        synchformer_video_input(frames.astype(np.float32))


# --------------------------------------------------------------------------------------------------------------
# Segmenting
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("seconds", "segments"), [(8.0, 24), (10.0, 30)])
def test_segment_counts(seconds: float, segments: int) -> None:
    assert num_segments(int(25 * seconds), 16, 8) == segments
    assert num_segments(int(16000 * seconds), 10240, 5120) == segments
    assert num_segments(15, 16, 8) == 0 and num_segments(16, 16, 8) == 1


def test_shortest_window_for_desync_comes_from_the_config() -> None:
    """4.8 s gives both streams the 14 segments the offset classifier compares; less gives 13, which DeSync
    refuses: the evaluation decides this before the model runs, from these numbers."""
    config = SYNCHFORMER_CONFIGS["paper"]
    assert (config.min_frames, config.min_samples, config.min_seconds) == (120, 76800, 4.8)
    assert config.measures_window(4.8) and not config.measures_window(4.79)
    assert num_segments(int(25 * 4.8), 16, 8) == 14 and num_segments(int(16000 * 4.79), 10240, 5120) == 13
    fewer = dataclasses.replace(config, segments_compared=4)  # (16 + 3 x 8) / 25
    assert fewer.min_seconds == pytest.approx(1.6) and fewer.measures_window(1.6) and not fewer.measures_window(1.5)


def test_features_of_an_8_second_clip(tiny: Synchformer) -> None:
    rng = np.random.default_rng(3)
    audio = tiny.audio_features(torch.from_numpy(rng.standard_normal((1, 128000)).astype(np.float32)))
    assert audio.shape == (1, 24, 6, TINY.audio_dim)
    frames = torch.from_numpy(rng.uniform(-1, 1, (1, 200, 3, 224, 224)).astype(np.float32))
    video = tiny.video_features(frames)
    assert video.shape == (1, 24, 8, TINY.video_dim)
    assert torch.isfinite(video).all() and torch.isfinite(audio).all()
    # segment k sees frames 8k .. 8k + 15: features of a sub-clip equal those of the whole clip
    torch.testing.assert_close(tiny.video_features(frames[:, 8 * 5:8 * 5 + 24]), video[:, 5:7], rtol=1e-4, atol=1e-5)
    assert tiny.audio_features(torch.zeros(1, 160000)).shape == (1, 30, 6, TINY.audio_dim)
    with pytest.raises(ValueError):
        tiny.video_features(frames[:, :15])
    with pytest.raises(ValueError):
        tiny.audio_features(torch.zeros(1, 10239))


# --------------------------------------------------------------------------------------------------------------
# Offsets and DeSync
# --------------------------------------------------------------------------------------------------------------
def _features(batch: int, segments: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, segments, 8, TINY.video_dim, generator=g),
            torch.randn(batch, segments, 6, TINY.audio_dim, generator=g))


def test_offset_grid() -> None:
    grid = offset_grid()
    assert grid.dtype == np.float32 and grid.shape == (21,)
    np.testing.assert_allclose(grid, np.linspace(-2, 2, 21), atol=1e-7)
    assert grid[10] == 0.0


@pytest.mark.parametrize("target", [0, 3, 10, 17])
def test_desync_follows_the_classifier(target: int) -> None:
    """With a zero head weight and a one-hot bias the argmax is `target`: |offset| = |linspace(-2, 2, 21)[target]|."""
    model = load_synchformer(None, config=TINY, seed=1)
    model.transformer.off_head.weight.zero_()
    model.transformer.off_head.bias.zero_()
    model.transformer.off_head.bias[target] = 1.0
    video, audio = _features(3, 20)
    logits = model.offset_logits(video[:, :14], audio[:, :14])
    assert logits.shape == (3, 21) and (logits.argmax(dim=-1) == target).all()
    result = model.desync(video, audio)
    assert result.shape == (3, 2) and result.dtype == np.float64
    np.testing.assert_array_equal(result, np.full((3, 2), abs(float(np.float32(np.linspace(-2, 2, 21)[target])))))


def test_desync_uses_the_first_and_the_last_14_segments(tiny: Synchformer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Segment s of the video features holds the value s; a stand-in classifier picks class (first segment) % 21."""
    seen: list[tuple[int, int]] = []

    def fake_logits(video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        assert video.shape[1] == audio.shape[1] == SEGMENTS_COMPARED
        first = int(video[0, 0, 0, 0])
        seen.append((first, int(video[0, -1, 0, 0])))
        return torch.nn.functional.one_hot(torch.tensor([first % 21]), 21).float()

    monkeypatch.setattr(tiny, "offset_logits", fake_logits)
    video = torch.arange(20.0).view(1, 20, 1, 1).expand(1, 20, 8, TINY.video_dim)
    _, audio = _features(1, 23)  # the two streams may differ in length; each is cut on its own
    result = tiny.desync(video, audio)
    assert seen == [(0, 13), (6, 19)]
    np.testing.assert_allclose(result, [[2.0, abs(-2.0 + 0.2 * 6)]], atol=1e-6)


def test_fewer_than_14_segments_is_an_error(tiny: Synchformer) -> None:
    video, audio = _features(1, 13)
    with pytest.raises(ValueError, match="14 segments"):
        tiny.desync(video, audio)
    video, audio = _features(1, 20)
    with pytest.raises(ValueError, match="14 segments"):
        tiny.desync(video, audio[:, :13])
    with pytest.raises(ValueError, match="offset_logits"):
        tiny.offset_logits(video, audio)  # the classifier takes exactly 14


# --------------------------------------------------------------------------------------------------------------
# Loading and the checkpoint layout
# --------------------------------------------------------------------------------------------------------------
def test_paper_layout_is_the_official_one() -> None:
    """513 tensors, 237,460,245 values (av-benchmark's Synchformer()), under the official names (transformers 4 AST)."""
    with torch.device("meta"):
        model = Synchformer()
    state = model.state_dict()
    assert len(state) == 513 and sum(v.numel() for v in state.values()) == 237_460_245
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["vfeat_extractor.patch_embed_3d.proj.weight"] == (768, 3, 2, 16, 16)
    assert shapes["vfeat_extractor.pos_embed"] == (1, 197, 768) and shapes["vfeat_extractor.temp_embed"] == (1, 8, 768)
    assert shapes["vfeat_extractor.spatial_attn_agg.self_attn.in_proj_weight"] == (2304, 768)
    assert shapes["afeat_extractor.ast.embeddings.position_embeddings"] == (1, 74, 768)
    assert shapes["afeat_extractor.ast.encoder.layer.11.attention.attention.query.weight"] == (768, 768)
    assert shapes["afeat_extractor.ast.encoder.layer.11.output.dense.weight"] == (768, 3072)
    assert shapes["transformer.pos_emb_cfg.pos_emb"] == (1, 198, 768)
    assert shapes["transformer.blocks.2.mlp.2.weight"] == (768, 3072)
    assert shapes["transformer.off_head.weight"] == (21, 768)
    assert not any(k.startswith("mel_") for k in state)


def test_load_round_trip_and_errors(tmp_path: Path, tiny: Synchformer) -> None:
    torch.save(tiny.state_dict(), tmp_path / CHECKPOINT_NAME)
    loaded = load_synchformer(tmp_path, config=TINY)
    assert len(loaded.checkpoint_id) == 64 and loaded.protocol()["checkpoint"] == loaded.checkpoint_id
    assert tiny.protocol()["checkpoint"] == "random-init:seed=0"
    waveform = torch.randn(1, 20480, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded.audio_features(waveform), tiny.audio_features(waveform), rtol=0, atol=0)
    again = load_synchformer(None, config=TINY, seed=0)
    torch.testing.assert_close(again.audio_features(waveform), tiny.audio_features(waveform), rtol=0, atol=0)
    loaded.train()
    assert not loaded.training

    with pytest.raises(FileNotFoundError) as missing:
        load_synchformer(tmp_path / "absent", config=TINY)
    assert CHECKPOINT_NAME in str(missing.value) and "\n" not in str(missing.value)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError) as bad:
        load_synchformer(garbage, config=TINY)
    assert CHECKPOINT_NAME in str(bad.value) and "\n" not in str(bad.value)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    state = tiny.state_dict()
    state.pop("transformer.off_head.bias")
    torch.save(state, wrong / CHECKPOINT_NAME)
    with pytest.raises(ValueError, match="off_head.bias") as incomplete:
        load_synchformer(wrong, config=TINY)
    assert "\n" not in str(incomplete.value)
    with pytest.raises(ValueError, match="does not fit"):
        load_synchformer(tmp_path, config=dataclasses.replace(TINY, sync_dim=16))  # other widths


# --------------------------------------------------------------------------------------------------------------
# Equivalence with av-benchmark's code
# --------------------------------------------------------------------------------------------------------------
# Runs in a subprocess with av-benchmark on its path: builds av_bench's Synchformer() (for "tiny", with the widths
# of SYNCHFORMER_CONFIGS["tiny"] patched into its configs and constructors), perturbs every tensor (its own init
# leaves the tubelet convolution at zero), saves the state dict, and computes the features and logits the way
# extract_video.py, extract.py and evaluate.py do.
REFERENCE_SCRIPT = r"""
import sys
import torch
import torchaudio
from torch import nn

size, inputs_path, weights_path, outputs_path = sys.argv[1:5]
torch.manual_seed(0)
if size == "tiny":
    import transformers
    import av_bench.synchformer.ast as ref_ast
    import av_bench.synchformer.motionformer as ref_motionformer
    load_yaml = ref_motionformer.OmegaConf.load

    def tiny_yaml(path):
        cfg = load_yaml(path)
        cfg.VIT.EMBED_DIM, cfg.VIT.DEPTH, cfg.VIT.NUM_HEADS = 32, 1, 2
        return cfg

    ref_motionformer.OmegaConf.load = tiny_yaml
    ref_ast.ASTConfig = lambda: transformers.ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=64)
from av_bench.data.audio_dataset import pad_or_truncate
from av_bench.synchformer.synchformer import Synchformer
from av_bench.synchformer.transformer import GlobalTransformer, RandInitPositionalEncoding

model = Synchformer()
if size == "tiny":
    model.vproj, model.aproj = nn.Linear(32, 32), nn.Linear(32, 32)
    model.transformer = GlobalTransformer(tok_pdrop=0.0, embd_pdrop=0.1, resid_pdrop=0.1, attn_pdrop=0.1, n_layer=1,
                                          n_head=2, n_embd=32)
    model.transformer.pos_emb_cfg = RandInitPositionalEncoding(block_shape=[198], n_embd=32)
    model.transformer.off_head = nn.Linear(32, 21)
model.eval()
generator = torch.Generator().manual_seed(1)
with torch.no_grad():
    for tensor in model.state_dict().values():
        tensor.add_(0.02 * torch.randn(tensor.shape, generator=generator))
torch.save(model.state_dict(), weights_path)

inputs = torch.load(inputs_path)
with torch.inference_mode():
    frames = inputs["frames"]  # (B, T, 3, 224, 224)
    b = frames.shape[0]
    starts = range(0, frames.shape[1] - 16 + 1, 8)
    segments = torch.stack([frames[:, s:s + 16] for s in starts], dim=1)  # (B, S, 16, 3, H, W)
    s = segments.shape[1]
    video = model.extract_vfeats(segments.reshape(b * s, 1, *segments.shape[2:]))  # as extract_video.py
    video = video.reshape(b, s, *video.shape[2:])

    waveform = inputs["waveform"]  # (B, L)
    starts = range(0, waveform.shape[1] - 10240 + 1, 5120)
    x = torch.stack([waveform[:, s:s + 10240] for s in starts], dim=1)
    mel = torchaudio.transforms.MelSpectrogram(sample_rate=16000, win_length=400, hop_length=160, n_fft=1024,
                                               n_mels=128)
    x = pad_or_truncate(torch.log(mel(x) + 1e-6), 66)
    x = (x - -4.2677393) / (2 * 4.5689974)
    audio = model.extract_afeats(x.unsqueeze(2))

    logits = model.compare_v_a(inputs["video_features"], inputs["audio_features"])
torch.save({"video": video, "audio": audio, "logits": logits}, outputs_path)
"""


def _compare_with_reference(size: str, tmp_path: Path, frames: int, batch: int) -> dict[str, float]:
    source = os.environ.get("AV_BENCHMARK_SRC")
    if not source:
        pytest.skip("AV_BENCHMARK_SRC is not set (a checkout of hkchengrex/av-benchmark holding av_bench/)")
    if not (Path(source) / "av_bench" / "synchformer" / "synchformer.py").is_file():
        pytest.fail(f"AV_BENCHMARK_SRC={source} does not hold av_bench/synchformer/synchformer.py")
    config = SYNCHFORMER_CONFIGS[size]
    g = torch.Generator().manual_seed(2)
    inputs = {
        "frames": torch.rand(batch, frames, 3, 224, 224, generator=g) * 2 - 1,
        "waveform": 0.1 * torch.randn(batch, round(frames / 25 * 16000), generator=g),
        "video_features": torch.randn(2, 14, 8, config.video_dim, generator=g),
        "audio_features": torch.randn(2, 14, 6, config.audio_dim, generator=g),
    }
    torch.save(inputs, tmp_path / "inputs.pt")
    weights = tmp_path / "weights"
    weights.mkdir()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source, os.environ.get("AV_BENCHMARK_PYTHONPATH", "")) if p)
    done = subprocess.run([os.environ.get("AV_BENCHMARK_PYTHON", sys.executable), "-c", REFERENCE_SCRIPT, size,
                           str(tmp_path / "inputs.pt"), str(weights / CHECKPOINT_NAME), str(tmp_path / "outputs.pt")],
                          env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = torch.load(tmp_path / "outputs.pt")
    model = load_synchformer(weights, config=config)  # strict: the reference's state dict fits as it is
    got = {"video": model.video_features(inputs["frames"]), "audio": model.audio_features(inputs["waveform"]),
           "logits": model.offset_logits(inputs["video_features"], inputs["audio_features"])}
    segments = num_segments(frames, 16, 8)
    assert got["video"].shape == (batch, segments, 8, config.video_dim)
    assert got["audio"].shape == (batch, segments, 6, config.audio_dim)
    gaps = {}
    for key, value in got.items():
        assert value.shape == expected[key].shape, key
        scale = float(expected[key].abs().max())
        gaps[key] = float((value - expected[key]).abs().max())
        assert gaps[key] <= 1e-4 * max(scale, 1.0), (key, gaps[key], scale)
        print(f"{size} {key}: max abs difference vs av-benchmark {gaps[key]:.3g} (max abs value {scale:.3g})")
    assert torch.equal(got["logits"].argmax(-1), expected["logits"].argmax(-1))
    return gaps


def test_equivalence_with_av_benchmark_tiny(tmp_path: Path) -> None:
    _compare_with_reference("tiny", tmp_path, frames=48, batch=2)


@pytest.mark.slow
def test_equivalence_with_av_benchmark_paper(tmp_path: Path) -> None:
    _compare_with_reference("paper", tmp_path, frames=48, batch=1)
