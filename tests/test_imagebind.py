"""ImageBind embedder (eval.imagebind) against the ImageBind package and av-benchmark's protocol.

References: the installed ImageBind package's own model (ImageBindModel.forward), its data helpers
(imagebind.data.load_and_transform_audio_data, SpatialCrop: av-benchmark's ImageBindAudioDataset and ib_data.py are
the same code) and pytorchvideo's ConstantClipsPerVideoSampler. imagebind.data imports pytorchvideo, which imports
a torchvision module renamed in torchvision 0.17, and pkg_resources (gone from current setuptools); the
`imagebind_data` fixture aliases both for the test only (and reads WAVs with soundfile where torchaudio.load would
need torchcodec) and skips when the import still fails.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
import types
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torchaudio
import torchvision.transforms
from einops import rearrange
from torchvision.transforms import v2

from common.weights import sha256_file
from eval.imagebind import (
    CHECKPOINT_NAME,
    CLIP_MEAN,
    CLIP_STD,
    IMAGEBIND_CONFIGS,
    ImageBindEmbedder,
    clip_timepoints,
    ib_score,
    imagebind_audio_input,
    imagebind_model_module,
    imagebind_video_input,
    load_imagebind,
)

TINY = IMAGEBIND_CONFIGS["tiny"]


def _torchaudio_load(path: str | Path) -> tuple[torch.Tensor, int]:
    """torchaudio.load's result for a PCM WAV: (C, L) float32 = int / 2^15, and the rate."""
    data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    return torch.from_numpy(np.ascontiguousarray(data.T)), rate


@pytest.fixture
def imagebind_data(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The package's imagebind.data module, imported with the aliases it needs on current torchvision/setuptools."""
    imagebind_model_module()  # the package object (possibly without its __init__) is in place first

    renamed = getattr(torchvision.transforms, "_functional_tensor", None)
    if renamed is not None and "torchvision.transforms.functional_tensor" not in sys.modules:
        monkeypatch.setitem(sys.modules, "torchvision.transforms.functional_tensor", renamed)
    if importlib.util.find_spec("pkg_resources") is None:
        def resource_filename(package: str, name: str) -> str:
            spec = importlib.util.find_spec(package)
            assert spec is not None and spec.submodule_search_locations
            return str(Path(list(spec.submodule_search_locations)[0]) / name)

        stub = types.ModuleType("pkg_resources")
        stub.resource_filename = resource_filename  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "pkg_resources", stub)
    monkeypatch.setattr(torchaudio, "load", _torchaudio_load)
    try:
        return importlib.import_module("imagebind.data")
    except Exception as error:  # noqa: BLE001 - any import failure of the reference means: cannot compare here
        pytest.skip(f"imagebind.data (the reference front ends) cannot be imported here: {type(error).__name__}: {error}")


def _reference_model(config=TINY, seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return imagebind_model_module().ImageBindModel(**config.model_kwargs()).eval()


def _noise_audio(seconds: float, rate: int, channels: int, seed: int) -> np.ndarray:
    """(L, C) noise + tones + a DC offset per channel, within [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    columns = [0.1 * rng.standard_normal(len(t)) + 0.3 * np.sin(2 * np.pi * (220 + 110 * c) * t) + 0.05 * (c + 1)
               for c in range(channels)]
    return np.clip(np.stack(columns, axis=1), -1, 1).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------
# 1. The model: tiny random weights through the official state-dict path vs the package's forward
# --------------------------------------------------------------------------------------------------------------
def test_embeddings_equal_package_forward_after_loading_its_state_dict(tmp_path: Path) -> None:
    """A tiny ImageBindModel of the package (seed 1) saved as imagebind_huge.pth and loaded by load_imagebind
    (whose own random init uses seed 0, so a load that did nothing would differ) gives the package's forward
    outputs. Same modules, same inputs, same CPU kernels: the outputs are expected bit-identical; the tolerance
    of 1e-6 only allows for a threaded reduction order (embeddings are of order 1, audio of norm 20)."""
    reference = _reference_model()
    torch.save(reference.state_dict(), tmp_path / CHECKPOINT_NAME)
    embedder = load_imagebind(tmp_path, config=TINY)
    assert embedder.checkpoint_id == sha256_file(tmp_path / CHECKPOINT_NAME)
    assert embedder.protocol()["checkpoint"] == embedder.checkpoint_id
    assert not embedder.training and not embedder.train().training

    rate = 16000
    audio = torch.stack([imagebind_audio_input(_noise_audio(4.0, rate, 1, seed).T, rate) for seed in (0, 1)])
    rng = np.random.default_rng(2)
    video = torch.stack([imagebind_video_input(rng.integers(0, 256, (4, 120, 160, 3), dtype=np.uint8))
                         for _ in range(2)])
    assert audio.shape == (2, 3, 1, 128, 204) and video.shape == (2, 9, 3, 2, 224, 224)

    with torch.inference_mode():
        expected_audio = reference({"audio": audio})["audio"].numpy()
        expected_video = reference({"vision": video})["vision"].numpy()
    got_audio, got_video = embedder.embed_audio(audio), embedder.embed_video(video)
    assert got_audio.dtype == np.float32 and got_audio.shape == (2, TINY.out_embed_dim)
    assert got_video.shape == (2, TINY.out_embed_dim)
    np.testing.assert_allclose(got_audio, expected_audio, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got_video, expected_video, rtol=0, atol=1e-6)
    # the postprocessing is in: each audio clip is 20 x / |x| (the mean of 3 is shorter), vision x / |x|
    assert np.all(np.linalg.norm(got_audio, axis=1) <= 20 + 1e-4)
    assert np.all(np.linalg.norm(got_video, axis=1) <= 1 + 1e-6)
    # a differently seeded model really differs, so the comparison above can fail
    assert np.abs(load_imagebind(None, config=TINY).embed_audio(audio) - expected_audio).max() > 1e-3

    with pytest.raises(ValueError, match="expected"):
        embedder.embed_video(video[0])
    with pytest.raises(ValueError, match="expected"):
        embedder.embed_audio(audio[:, :, :, :64])


def test_paper_config_is_what_imagebind_huge_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    """imagebind_huge() is run with ImageBindModel replaced by a recorder (no 1.2 B-parameter build): the arguments
    it passes, completed by the class defaults, are the paper config; tiny keeps every front-end argument."""
    module = imagebind_model_module()
    real = module.ImageBindModel
    recorded: dict[str, object] = {}

    class Recorder:
        def __init__(self, *args: object, **kwargs: object) -> None:
            bound = inspect.signature(real.__init__).bind(self, *args, **kwargs)
            bound.apply_defaults()
            recorded.update({k: v for k, v in bound.arguments.items() if k != "self"})

    monkeypatch.setattr(module, "ImageBindModel", Recorder)
    module.imagebind_huge(pretrained=False)
    assert recorded == IMAGEBIND_CONFIGS["paper"].model_kwargs()
    assert IMAGEBIND_CONFIGS["paper"].embed_dim == 1024

    front_end = ("video_frames", "kernel_size", "audio_kernel_size", "audio_stride", "audio_num_mel_bins",
                 "audio_target_len", "depth_kernel_size", "thermal_kernel_size", "imu_kernel_size")
    paper, tiny = dataclasses.asdict(IMAGEBIND_CONFIGS["paper"]), dataclasses.asdict(TINY)
    assert {k: tiny[k] for k in front_end} == {k: paper[k] for k in front_end}
    for tower in ("vision", "audio", "text", "depth", "thermal", "imu"):
        assert tiny[f"{tower}_embed_dim"] < paper[f"{tower}_embed_dim"]
        assert tiny[f"{tower}_num_blocks"] < paper[f"{tower}_num_blocks"]


# --------------------------------------------------------------------------------------------------------------
# 2. Audio front end vs imagebind.data.load_and_transform_audio_data
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("rate", "channels", "seconds"), [(44100, 2, 4.0), (44100, 2, 10.0), (16000, 1, 4.0),
                                                            (16000, 1, 10.0)])
def test_audio_input_equals_package_loader(imagebind_data: types.ModuleType, tmp_path: Path, rate: int,
                                           channels: int, seconds: float) -> None:
    """Bit-identical to the package's loader on the same 16-bit WAV: same resampler, same clip sample bounds,
    same in-place mean removal (4 s clips overlap, so it matters there), same fbank, pad and normalisation.
    The input array is left as it was."""
    path = tmp_path / "clip.wav"
    soundfile.write(path, _noise_audio(seconds, rate, channels, seed=channels), rate, subtype="PCM_16")
    expected = imagebind_data.load_and_transform_audio_data([str(path)], "cpu")  # (1, 3, 1, 128, 204)

    samples, read_rate = soundfile.read(path, dtype="float32", always_2d=True)
    waveform = np.ascontiguousarray(samples.T) if channels > 1 else samples[:, 0].copy()
    before = waveform.copy()
    got = imagebind_audio_input(waveform, read_rate)
    assert got.shape == (3, 1, 128, 204) and got.dtype == torch.float32
    assert torch.equal(got, expected[0]), float((got - expected[0]).abs().max())
    np.testing.assert_array_equal(waveform, before)


def test_audio_mean_removal_is_in_place_like_the_reference() -> None:
    """With overlapping clips (4 s), removing each clip's mean on a copy instead of in place changes the second and
    third clips: the in-place behaviour is not a no-op, so the equality test above checks it."""
    waveform = _noise_audio(4.0, 16000, 1, seed=3).T
    got = imagebind_audio_input(waveform, 16000)
    independent = torch.stack([imagebind_audio_input(
        np.ascontiguousarray(waveform[:, int(s * 16000):int(e * 16000)]), 16000)[0]
        for s, e in clip_timepoints(4.0)])
    assert torch.equal(got[0], independent[0])
    assert float((got[1:] - independent[1:]).abs().max()) > 1e-4


def test_clip_timepoints_equal_pytorchvideo_sampler(imagebind_data: types.ModuleType) -> None:
    """The same (start, end) Fractions as ConstantClipsPerVideoSampler(2, 3) read out by get_clip_timepoints, for
    durations of whole seconds and of odd sample counts (including ones shorter than a clip)."""
    from pytorchvideo.data.clip_sampling import ConstantClipsPerVideoSampler

    sampler = ConstantClipsPerVideoSampler(clip_duration=2, clips_per_video=3)
    lengths = [8000, 32000, 32001, 64000, 128000, 160000, 160001, 123457, 99999]
    for length in lengths:
        duration = length / 16000
        expected = imagebind_data.get_clip_timepoints(sampler, duration)
        got = clip_timepoints(duration)
        assert got == expected and all(isinstance(t, Fraction) for pair in got for t in pair)
        assert [int(s * 16000) for s, _ in got] == [int(s * 16000) for s, _ in expected]


# --------------------------------------------------------------------------------------------------------------
# 3. Video front end vs av-benchmark's transforms + the package's SpatialCrop + encode_video_with_imagebind
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("height", "width", "frames"), [(360, 640, 4), (480, 270, 4), (224, 224, 5)])
def test_video_input_equals_reference_transforms(imagebind_data: types.ModuleType, height: int, width: int,
                                                 frames: int) -> None:
    """av-benchmark's VideoDataset.ib_transform (re-created: v2 Resize 224 bicubic, ToImage, ToDtype scale,
    Normalize CLIP) on the decoder's (T, C, H, W) uint8 tensor, the package's SpatialCrop(224, 3) and the clip
    arrangement of extract_video.py's encode_video_with_imagebind: bit-identical clips."""
    rng = np.random.default_rng(height + width)
    video = rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)

    transform = v2.Compose([
        v2.Resize(224, interpolation=v2.InterpolationMode.BICUBIC),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(CLIP_MEAN), std=list(CLIP_STD)),
    ])
    chunk = transform(torch.from_numpy(video).permute(0, 3, 1, 2).contiguous())  # (T, C, 224, W')
    crops = torch.stack(imagebind_data.SpatialCrop(224, 3)([chunk]))[None]  # (1, 3, T, C, 224, 224)
    clips = torch.cat([crops[:, :, i:i + 2] for i in range(frames - 1)], dim=1)
    expected = rearrange(clips, "b n t c h w -> b n c t h w")[0]

    got = imagebind_video_input(video)
    assert got.shape == (3 * (frames - 1), 3, 2, 224, 224) == expected.shape
    assert torch.equal(got, expected), float((got - expected).abs().max())


def test_video_input_rejects_bad_frames() -> None:
    with pytest.raises(ValueError, match="uint8"):
        imagebind_video_input(np.zeros((1, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        imagebind_video_input(np.zeros((4, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="channels-first"):
        imagebind_audio_input(np.zeros((16000, 2), np.float32), 16000)


def test_shortest_window_is_one_clip_of_frames_at_half_a_frame_per_second() -> None:
    """The video front end keeps int(0.5 x seconds) frames and a vision clip takes two: 4 s is the least the
    evaluation lets through (a 2 s clip gives one frame, which `imagebind_video_input` refuses)."""
    config = IMAGEBIND_CONFIGS["paper"]
    assert config.min_video_seconds == 4.0
    assert config.embeds_window(4.0) and not config.embeds_window(3.99)
    assert dataclasses.replace(config, video_frames=3).min_video_seconds == 6.0
    assert "min_video_seconds" not in config.model_kwargs()  # not an argument of ImageBindModel


# --------------------------------------------------------------------------------------------------------------
# 4. Checkpoint errors and the score
# --------------------------------------------------------------------------------------------------------------
def test_missing_and_bad_checkpoints_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as missing:
        load_imagebind(tmp_path, config=TINY)
    assert CHECKPOINT_NAME in str(missing.value) and "\n" not in str(missing.value)

    (tmp_path / CHECKPOINT_NAME).write_bytes(b"not a checkpoint" * 64)
    with pytest.raises(ValueError) as garbage:
        load_imagebind(tmp_path, config=TINY)
    assert CHECKPOINT_NAME in str(garbage.value) and "\n" not in str(garbage.value)

    state = _reference_model().state_dict()
    state.pop("modality_heads.audio.2.weight")
    torch.save(state, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(ValueError) as incomplete:
        load_imagebind(tmp_path, config=TINY)
    assert CHECKPOINT_NAME in str(incomplete.value) and "\n" not in str(incomplete.value)

    torch.save(_reference_model().state_dict(), tmp_path / CHECKPOINT_NAME)
    with pytest.raises(ValueError) as other_size:
        load_imagebind(tmp_path, config=dataclasses.replace(TINY, out_embed_dim=8))
    assert CHECKPOINT_NAME in str(other_size.value) and "\n" not in str(other_size.value)


def test_ib_score_is_torch_cosine_similarity() -> None:
    rng = np.random.default_rng(0)
    video, audio = rng.standard_normal((5, 16)).astype(np.float32), 20 * rng.standard_normal((5, 16)).astype(np.float32)
    expected = torch.cosine_similarity(torch.from_numpy(video), torch.from_numpy(audio), dim=-1).numpy()
    np.testing.assert_array_equal(ib_score(video, audio), expected)
    manual = (video * audio).sum(1) / np.linalg.norm(video, axis=1) / np.linalg.norm(audio, axis=1)
    np.testing.assert_allclose(ib_score(video, audio), manual, rtol=1e-5)
    tiny = np.full((1, 2), 0.0, np.float32)
    tiny[0, 0] = 1e-9
    np.testing.assert_allclose(ib_score(tiny, tiny), [0.01], rtol=1e-5)  # each norm clamped at eps = 1e-8
    with pytest.raises(ValueError, match="shape"):
        ib_score(video, audio[:4])


# --------------------------------------------------------------------------------------------------------------
# Paper size (slow): the 1.2 B-parameter model with random weights on an 8 s clip
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_paper_size_random_weights_embed_an_8s_clip() -> None:
    embedder = load_imagebind(None, config=IMAGEBIND_CONFIGS["paper"])
    assert isinstance(embedder, ImageBindEmbedder)
    rng = np.random.default_rng(0)
    video = imagebind_video_input(rng.integers(0, 256, (4, 360, 640, 3), dtype=np.uint8))[None]
    audio = imagebind_audio_input(_noise_audio(8.0, 16000, 1, seed=0).T, 16000)[None]
    v, a = embedder.embed_video(video), embedder.embed_audio(audio)
    assert v.shape == a.shape == (1, 1024)
    assert np.isfinite(ib_score(v, a)).all()
