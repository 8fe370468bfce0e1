"""Frozen extractors of stage one: shapes, ranges, batching, freezing, and real-format checkpoint round trips.

Every model is the tiny random-init preset; "real-format" checkpoints are written here by the libraries' own
savers (safetensors state dict, TorchScript, save_pretrained) and loaded back through `from_config`.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import shutil
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
from diffusers import AutoencoderKL
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    BertTokenizer,
    GroundingDinoForObjectDetection,
    GroundingDinoImageProcessor,
    GroundingDinoProcessor,
    SamImageProcessor,
    SamModel,
    SamProcessor,
    SpeechT5HifiGan,
)

from audio_models.config import MEL_BINS, MEL_FRAMES
from audio_models.random_configs import tiny_vae_config, tiny_vocoder_config
from audio_models.vae import AudioVAE
from audio_models.vocoder import load_vocoder
from common import weights
from common.devices import half_dtype, resolve_device
from preprocess import encoders, model_configs
from preprocess import weights as weights_folder
from preprocess.config import PRESETS
from preprocess.encoders import CLIPEncoder, Grounder, OutOfMemory

CFG = PRESETS["tiny"]
CPU = torch.device("cpu")
LOADED = CFG.replace(random_init=False)  # same sizes, weights from a folder


def _frames(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images (uint8, N x H x W x 3), closer to video frames than pixel noise."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=generator)
    image = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return (image * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


@pytest.fixture(scope="module")
def clip() -> CLIPEncoder:
    return CLIPEncoder.from_config(CFG, None, CPU)


@pytest.fixture(scope="module")
def grounder() -> Grounder:
    return Grounder.from_config(CFG, None, CPU)


@pytest.fixture(scope="module")
def grounder_no_sam() -> Grounder:
    return Grounder.from_config(CFG.replace(use_sam=False), None, CPU)


@pytest.fixture(scope="module")
def vae() -> AudioVAE:
    return AudioVAE.from_config(CFG.audio_models(), None, CPU)


# ----------------------------------------------------------------------------------- devices
def test_device_and_dtype() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device(CFG.device).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert half_dtype(CFG.half, CPU) == torch.float32
    assert half_dtype(CFG.half, torch.device("cuda")) == torch.float16
    assert half_dtype(False, torch.device("cuda")) == torch.float32


# ----------------------------------------------------------------------------------- CLIP
def test_clip_shapes_and_raw_embeddings(clip: CLIPEncoder) -> None:
    assert clip.embed_dim == CFG.embed_dim and clip.checksum == f"random-init(seed={CFG.seed})"
    for shape in [(5, 40, 70), (3, 100, 50), (2, 20, 30)]:  # any H, W, also smaller than the model input
        out = clip.encode_frames(_frames(*shape))
        assert out.shape == (shape[0], CFG.embed_dim) and out.dtype == torch.float32 and out.device == CPU
        assert torch.isfinite(out).all()
    texts = clip.encode_texts(["a dog barks", "rain on a window"])
    assert texts.shape == (2, CFG.embed_dim) and texts.dtype == torch.float32
    assert not torch.allclose(texts.norm(dim=-1), torch.ones(2))  # raw projections, not L2-normalised
    assert clip.encode_texts([]).shape == (0, CFG.embed_dim)
    assert clip.encode_frames(torch.zeros(0, 16, 16, 3, dtype=torch.uint8)).shape == (0, CFG.embed_dim)
    with pytest.raises(ValueError, match="uint8"):
        clip.encode_frames(torch.zeros(2, 16, 16, 3))


def test_clip_preprocess_matches_open_clip_transform(clip: CLIPEncoder) -> None:
    """Our batched tensor preprocessing vs open_clip's own PIL eval transform built from the model's config."""
    transform = image_transform_v2(PreprocessCfg(**open_clip.get_model_preprocess_cfg(clip.model)), is_train=False)
    for shape in [(1, 40, 70), (1, 100, 50), (1, 240, 320)]:
        frames = _frames(*shape, seed=shape[1])
        ours = clip.preprocess(frames)[0]
        reference = transform(Image.fromarray(frames[0].numpy()))
        assert ours.shape == reference.shape == (3, *clip.image_size)
        # PIL resizes in uint8; we resize in float: differences are at the 1/255 level (x 1/std ~ 3.7)
        assert (ours - reference).abs().max() < 0.03 and (ours - reference).abs().mean() < 0.01


def test_clip_chunking_and_seed(clip: CLIPEncoder) -> None:
    frames = _frames(7, 48, 64)
    small_batches = CLIPEncoder.from_config(CFG.replace(frame_batch=3), None, CPU)
    torch.testing.assert_close(small_batches.encode_frames(frames), clip.encode_frames(frames), rtol=1e-5, atol=1e-5)
    other_seed = CLIPEncoder.from_config(CFG.replace(seed=1), None, CPU)
    assert not torch.allclose(other_seed.encode_frames(frames), clip.encode_frames(frames))


# ----------------------------------------------------------------------------------- grounding
def test_grounder_shapes_ranges_and_empty_nouns(grounder: Grounder) -> None:
    frames = [_frames(4, 48, 64, seed=1), _frames(3, 80, 40, seed=2), _frames(2, 64, 64, seed=3)]  # sizes differ
    nouns = [["dog", "guitar player"], [], ["cat", "man", "car", "Xylophone"]]
    probs = grounder.probabilities(frames, nouns)
    assert [tuple(p.shape) for p in probs] == [(4, 2), (3, 0), (2, 4)]
    for p in probs:
        assert p.dtype == torch.float32 and p.device == CPU
        assert ((p >= 0) & (p <= 1)).all()
    assert probs[0].std() > 0  # not a constant
    assert grounder.probabilities([], []) == []
    with pytest.raises(ValueError, match="noun lists"):
        grounder.probabilities(frames, nouns[:2])


def test_grounder_noun_token_spans(grounder: Grounder) -> None:
    prompt = grounder.prompt(["Dog", "guitar player", "st. bernard"])
    tokens = grounder.tokenizer.convert_ids_to_tokens(prompt.input_ids)
    assert [[tokens[i] for i in span] for span in prompt.spans][:1] == [["dog"]]
    assert "".join(tokens[i] for i in prompt.spans[1]).replace("##", "") == "guitarplayer"
    assert tokens.count(".") == 3  # one delimiter per noun; the '.' inside "st. bernard" was removed
    assert all("." not in tokens[i] for span in prompt.spans for i in span)


def test_grounder_batches_across_clips_like_one_by_one(grounder_no_sam: Grounder) -> None:
    """Text padding must not leak: a short prompt batched with a long one scores as it does alone."""
    frames = [_frames(2, 48, 64, seed=4), _frames(3, 48, 64, seed=5)]
    nouns = [["dog"], ["cat", "man", "car", "water"]]
    together = grounder_no_sam.probabilities(frames, nouns)
    for clip_frames, clip_nouns, joint in zip(frames, nouns, together):
        alone = grounder_no_sam.probabilities([clip_frames], [clip_nouns])[0]
        torch.testing.assert_close(joint, alone, rtol=1e-4, atol=1e-4)


def test_sam_only_lowers_probabilities(grounder: Grounder, grounder_no_sam: Grounder) -> None:
    frames = [_frames(3, 48, 64, seed=6), _frames(2, 72, 56, seed=7)]
    nouns = [["dog", "car"], ["man"]]
    with_sam = grounder.probabilities(frames, nouns)
    without = grounder_no_sam.probabilities(frames, nouns)
    for a, b in zip(with_sam, without):
        assert (a <= b + 1e-6).all()
    assert any((a < b - 1e-3).any() for a, b in zip(with_sam, without))


def test_probabilities_are_the_detector_score_times_sams_iou(grounder: Grounder, grounder_no_sam: Grounder) -> None:
    frames = [_frames(3, 48, 64, seed=6), _frames(2, 72, 56, seed=7), _frames(2, 40, 40, seed=8)]
    nouns = [["dog", "car"], ["man"], []]
    with_sam = grounder.detections(frames, nouns)
    probabilities = grounder.probabilities(frames, nouns)
    assert [tuple(d.detector.shape) for d in with_sam] == [tuple(d.iou.shape) for d in with_sam] == [(3, 2), (2, 1), (2, 0)]
    for found, p in zip(with_sam, probabilities):
        assert torch.equal(p, found.detector * found.iou)
        assert ((found.iou >= 0) & (found.iou <= 1)).all() and ((found.detector >= 0) & (found.detector <= 1)).all()
    assert any((d.iou < 1 - 1e-3).any() for d in with_sam)  # SAM did change something
    # the detector score does not depend on SAM; without SAM the IoU is one and p is the detector score
    without = grounder_no_sam.detections(frames, nouns)
    for a, b in zip(with_sam, without):
        torch.testing.assert_close(a.detector, b.detector)
        assert torch.equal(b.iou, torch.ones_like(b.iou)) and torch.equal(b.probs, b.detector)


def test_frozen_modules_stay_in_eval(clip: CLIPEncoder, grounder: Grounder, vae: AudioVAE) -> None:
    for module in (clip, grounder, vae):
        module.train()
        assert not any(m.training for m in module.modules())
        assert not any(p.requires_grad for p in module.parameters())


# ----------------------------------------------------------------------------------- audio
def test_vae_and_vocoder_shapes(vae: AudioVAE) -> None:
    mel = torch.randn(3, MEL_FRAMES, MEL_BINS)
    mean, std = vae.encode(mel)
    ds = CFG.vae_downsample
    assert mean.shape == std.shape == (3, CFG.latent_channels, MEL_FRAMES // ds, MEL_BINS // ds)
    assert mean.dtype == std.dtype == torch.float32 and (std > 0).all()
    chunked = AudioVAE.from_config(CFG.replace(batch_clips=1).audio_models(), None, CPU).encode(mel)[0]
    torch.testing.assert_close(chunked, mean, rtol=1e-5, atol=1e-5)
    assert vae.decode(mean).shape == (3, MEL_FRAMES, MEL_BINS)
    assert vae.encode(torch.zeros(0, MEL_FRAMES, MEL_BINS))[0].shape == (0, *mean.shape[1:])
    with pytest.raises(ValueError, match="mel must be"):
        vae.encode(torch.zeros(1, 64, MEL_FRAMES))
    vocoder = load_vocoder(CFG.audio_models(), None, CPU)
    with torch.inference_mode():
        waveform = vocoder(torch.randn(2, MEL_FRAMES, MEL_BINS))
    hop = 160
    assert waveform.shape[0] == 2 and abs(waveform.shape[1] - MEL_FRAMES * hop) < hop
    assert not vocoder.training and not any(p.requires_grad for p in vocoder.parameters())


# ----------------------------------------------------------------------------------- checkpoints
def _save_tiny_weights(root: Path) -> dict[str, object]:
    """Write every tiny model in its real on-disk format, with seeds other than CFG.seed; return the models."""
    torch.manual_seed(11)
    # frozen like the encoders: nn.MultiheadAttention takes another (fused) kernel without gradients
    clip_model = open_clip.create_model(CFG.clip_model).eval().requires_grad_(False)
    (root / "clip").mkdir(parents=True)
    save_file(clip_model.state_dict(), str(root / LOADED.clip_checkpoint))

    tokenizer = encoders.tiny_bert_tokenizer()
    torch.manual_seed(12)
    detector = GroundingDinoForObjectDetection(model_configs.tiny_grounding_dino_config(len(tokenizer))).eval()
    detector.save_pretrained(root / LOADED.grounding_dir)
    image_size = {"shortest_edge": CFG.grounding_short_side, "longest_edge": CFG.grounding_long_side}
    image_processor = GroundingDinoImageProcessor(size=image_size)
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(
        root / LOADED.grounding_dir)

    torch.manual_seed(13)
    sam = SamModel(model_configs.tiny_sam_config()).eval()
    torch.nn.init.constant_(sam.mask_decoder.iou_prediction_head.proj_out.bias, 0.5)
    sam.save_pretrained(root / LOADED.sam_dir)
    side = model_configs.TINY_SAM_IMAGE_SIZE
    sam_image_processor = SamImageProcessor(size={"longest_edge": side}, pad_size={"height": side, "width": side})
    SamProcessor(image_processor=sam_image_processor).save_pretrained(root / LOADED.sam_dir)

    torch.manual_seed(14)
    vae = AutoencoderKL(**tiny_vae_config(CFG.audio_models())).eval()
    vae.save_pretrained(root / LOADED.audioldm_dir / "vae")
    torch.manual_seed(15)
    vocoder = SpeechT5HifiGan(tiny_vocoder_config(CFG.audio_models())).eval()
    vocoder.save_pretrained(root / LOADED.audioldm_dir / "vocoder")
    return dict(clip=clip_model, detector=detector, image_processor=image_processor, tokenizer=tokenizer,
                image_size=image_size, sam=sam, sam_image_processor=sam_image_processor, vae=vae, vocoder=vocoder)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    root = tmp_path_factory.mktemp("weights")
    return root, _save_tiny_weights(root)


def test_checkpoints_load_back_identically(saved: tuple[Path, dict[str, object]]) -> None:
    root, models = saved
    frames = _frames(3, 48, 64, seed=8)

    clip = CLIPEncoder.from_config(LOADED, root, CPU)
    assert clip.checksum == weights.sha256_file(root / LOADED.clip_checkpoint)
    clip_model = models["clip"]
    with torch.inference_mode():
        expected_images = clip_model.encode_image(clip.preprocess(frames))
        expected_texts = clip_model.encode_text(open_clip.get_tokenizer(CFG.clip_model)(["a dog", "a cat"]))
    assert torch.equal(clip.encode_frames(frames), expected_images)
    assert torch.equal(clip.encode_texts(["a dog", "a cat"]), expected_texts)

    grounder = Grounder.from_config(LOADED, root, CPU)
    assert grounder.checksum != f"random-init(seed={CFG.seed})" and len(grounder.checksum) == 64
    reference = Grounder(models["detector"], models["image_processor"], models["tokenizer"], models["image_size"],
                         models["sam"], models["sam_image_processor"], CFG.frame_batch, "reference")
    nouns = [["dog", "drum"], ["man"]]
    clips = [frames, _frames(2, 60, 40, seed=9)]
    for loaded, expected in zip(grounder.probabilities(clips, nouns), reference.probabilities(clips, nouns)):
        assert torch.equal(loaded, expected)

    vae = AudioVAE.from_config(LOADED.audio_models(), root, CPU)
    assert vae.checksum == weights.sha256_dir(root / LOADED.audioldm_dir / "vae")
    mel = torch.randn(2, MEL_FRAMES, MEL_BINS)
    with torch.inference_mode():
        posterior = models["vae"].encode(mel[:, None]).latent_dist
        waveform = models["vocoder"](mel)
    mean, std = vae.encode(mel)
    assert torch.equal(mean, posterior.mean) and torch.equal(std, posterior.std)
    vocoder = load_vocoder(LOADED.audio_models(), root, CPU)
    with torch.inference_mode():
        assert torch.equal(vocoder(mel), waveform)


def test_weights_check_command(saved: tuple[Path, dict[str, object]], capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = saved
    assert weights_folder.main(["check", "--weights", str(root), "--preset", "tiny", "--load"]) == 0
    lines = capsys.readouterr().out.splitlines()
    checksum = weights.sha256_file(root / LOADED.clip_checkpoint)
    assert any(line.startswith("clip") and checksum in line for line in lines)
    assert sum(len(line.split()) > 1 and len(line.split()[1]) == 64 for line in lines) == 5
    assert weights_folder.main(["check", "--weights", str(root / "nowhere"), "--preset", "tiny"]) == 1
    assert "MISSING" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning")
def test_clip_openai_torchscript_and_sidecar_config(tmp_path: Path) -> None:
    """OpenAI's JIT archive and open_clip's hub folder (with open_clip_config.json) both mean QuickGELU."""
    torch.manual_seed(21)
    quick = open_clip.create_model(CFG.clip_model, force_quick_gelu=True).eval()
    frames = _frames(2, 40, 56, seed=10)

    (tmp_path / "jit").mkdir()
    torch.jit.save(torch.jit.script(quick), str(tmp_path / "jit" / "openai.pt"))
    jit_clip = CLIPEncoder.from_config(LOADED.replace(clip_checkpoint="jit/openai.pt", clip_torchscript=True),
                                       tmp_path, CPU)
    # without the option a TorchScript archive is refused (loading one executes code from the file)
    with pytest.raises(ValueError, match=r"openai.pt: a TorchScript archive .* only done with --clip-torchscript"):
        CLIPEncoder.from_config(LOADED.replace(clip_checkpoint="jit/openai.pt"), tmp_path, CPU)

    (tmp_path / "hub").mkdir()
    save_file(quick.state_dict(), str(tmp_path / "hub" / "open_clip_model.safetensors"))
    mean = [0.5, 0.5, 0.5]
    sidecar = {"model_cfg": {"quick_gelu": True}, "preprocess_cfg": {"mean": mean, "std": mean}}
    (tmp_path / "hub" / "open_clip_config.json").write_text(json.dumps(sidecar))
    hub_clip = CLIPEncoder.from_config(LOADED.replace(clip_checkpoint="hub/open_clip_model.safetensors"), tmp_path, CPU)
    assert hub_clip.mean.flatten().tolist() == mean and jit_clip.mean.flatten().tolist() != mean

    for encoder in (jit_clip, hub_clip):
        with torch.inference_mode():
            expected = quick.encode_image(encoder.preprocess(frames))
        torch.testing.assert_close(encoder.encode_frames(frames), expected, rtol=1e-5, atol=1e-5)

    # a sidecar that is JSON of the wrong shape is one line naming it (before: AttributeError / TypeError tracebacks)
    for bad, reason in (([1, 2], "expected an object"), ({"model_cfg": "x"}, "expected an object"),
                        ({"preprocess_cfg": {"mean": "abc"}}, "mean must be three numbers"),
                        ({"preprocess_cfg": {"std": [0.5, 0.0, 0.5]}}, "std must be positive"),
                        ({"preprocess_cfg": {"size": [224, "x"]}}, "size must be"),
                        ({"preprocess_cfg": {"interpolation": 3}}, "interpolation must be a string")):
        (tmp_path / "hub" / "open_clip_config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=rf"open_clip_config\.json: .*{reason}"):
            CLIPEncoder.from_config(LOADED.replace(clip_checkpoint="hub/open_clip_model.safetensors"), tmp_path, CPU)


# ----------------------------------------------------------------------------------- errors
class _Touch:
    """Unpickling this creates the file `path`: what a crafted checkpoint could do instead."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return Path.touch, (self.path,)


@pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_a_crafted_clip_checkpoint_runs_no_code(tmp_path: Path) -> None:
    """A pickle followed by a zip holding constants.pkl looks like TorchScript to a zip sniffer but is unpickled
    in full by torch.load(weights_only=False); and a plain torch.save of an object runs it when unpickled."""
    marker = tmp_path / "marker"
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("model/constants.pkl", b"")
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "disguised.pt").write_bytes(pickle.dumps(_Touch(marker)) + archive.getvalue())
    torch.save({"visual.proj": _Touch(marker)}, tmp_path / "clip" / "saved.pt")
    for name in ("disguised.pt", "saved.pt"):
        with pytest.raises(ValueError, match=rf"{name}: refused, not a plain tensor checkpoint"):
            CLIPEncoder.from_config(LOADED.replace(clip_checkpoint=f"clip/{name}"), tmp_path, CPU)
        assert not marker.exists()
        # with the TorchScript option it goes to torch.jit.load alone, never to a general unpickler
        with pytest.raises(ValueError, match=rf"{name}: not a TorchScript archive, as --clip-torchscript says"):
            CLIPEncoder.from_config(LOADED.replace(clip_checkpoint=f"clip/{name}", clip_torchscript=True), tmp_path, CPU)
        assert not marker.exists()
    (tmp_path / "clip" / "torn.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"torn.safetensors: not a readable safetensors file"):
        CLIPEncoder.from_config(LOADED.replace(clip_checkpoint="clip/torn.safetensors"), tmp_path, CPU)


def test_missing_weights_name_the_path(tmp_path: Path) -> None:
    for build in (CLIPEncoder.from_config, Grounder.from_config, AudioVAE.from_config, load_vocoder):
        with pytest.raises(FileNotFoundError, match=rf"not found at {tmp_path}.*weights layout in README"):
            build(LOADED, tmp_path, CPU)
    with pytest.raises(ValueError, match="no weights folder"):
        CLIPEncoder.from_config(LOADED, None, CPU)
    (tmp_path / LOADED.clip_checkpoint).mkdir(parents=True)  # a folder where the checkpoint file should be
    with pytest.raises(FileNotFoundError, match=r"CLIP checkpoint at .*open_clip_model.safetensors is a folder, not a"):
        CLIPEncoder.from_config(LOADED, tmp_path, CPU)


def test_size_mismatches_raise(saved: tuple[Path, dict[str, object]], tmp_path: Path) -> None:
    root, models = saved
    with pytest.raises(ValueError, match=rf"{LOADED.clip_checkpoint}.*embed_dim=64"):
        CLIPEncoder.from_config(LOADED.replace(embed_dim=64), root, CPU)
    with pytest.raises(ValueError, match=r"vae.*latent_channels=8.*config says 1, 4"):
        AudioVAE.from_config(LOADED.replace(latent_channels=4).audio_models(), root, CPU)
    with pytest.raises(ValueError, match=r"vocoder.*sampling_rate=16000"):
        load_vocoder(LOADED.replace(sample_rate=22050).audio_models(), root, CPU)

    # a checkpoint of another architecture: open_clip's strict load fails -> one ValueError naming the file
    state = dict(models["clip"].state_dict())
    state["text_projection"] = torch.zeros(32, 16)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"bad.safetensors: checkpoint does not fit open_clip model vta-tiny-clip"):
        CLIPEncoder.from_config(LOADED.replace(clip_checkpoint="bad.safetensors"), tmp_path, CPU)

    # a tokenizer whose delimiter ids differ from those Grounding DINO splits phrases at
    folder = tmp_path / LOADED.grounding_dir
    models["detector"].save_pretrained(folder)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?", "dog"]
    shuffled = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    GroundingDinoProcessor(image_processor=models["image_processor"], tokenizer=shuffled).save_pretrained(folder)
    with pytest.raises(ValueError, match=r"grounding-dino: tokenizer ids of .* are \[2, 3, 5, 6\]"):
        Grounder.from_config(LOADED.replace(use_sam=False), tmp_path, CPU)
    # transformers before 5.24 has no special_tokens buffer on the model: the module's constant is what it splits at
    older = SimpleNamespace(model=SimpleNamespace())  # what the check reads of such a detector
    with pytest.raises(ValueError, match=r"tokenizer ids of .* are \[2, 3, 5, 6\], the model splits at \[101, 102, 1012, 1029\]"):
        encoders._check_grounding_tokenizer(shuffled, older, folder)  # type: ignore[arg-type]


def test_a_transformers_that_numbers_text_positions_unlike_the_original_is_named(monkeypatch, caplog) -> None:
    """transformers 5.17 gives each phrase delimiter position 0 (the original model and 4.57/5.24 count it in its
    phrase): every detector score moves slightly, so stage one says so when it builds the detector."""
    import transformers
    from packaging import version
    from transformers.models.grounding_dino import modeling_grounding_dino as modeling

    delimiters = torch.tensor(modeling.SPECIAL_TOKENS)

    def original(input_ids, special_tokens=None):  # the original model's numbering (the mask is not looked at)
        positions = torch.zeros_like(input_ids)
        for row, ids in enumerate(input_ids.tolist()):
            start = 0
            for col, token in enumerate(ids):
                if token in modeling.SPECIAL_TOKENS:  # a phrase ends here, its delimiter counted in it
                    if 0 < col < len(ids) - 1:
                        positions[row, start: col + 1] = torch.arange(col + 1 - start)
                    start = col + 1
        return None, positions

    def delimiters_at_zero(input_ids, special_tokens=None):  # transformers 5.17's numbering
        _, positions = original(input_ids)
        return None, torch.where(torch.isin(input_ids, delimiters), 0, positions)

    detector = Grounder.from_config(CFG.replace(use_sam=False), None, CPU).detector
    monkeypatch.setattr(modeling, "generate_masks_with_special_tokens_and_transfer_map", original)
    assert encoders.text_positions_problem(detector) is None
    monkeypatch.setattr(modeling, "generate_masks_with_special_tokens_and_transfer_map", delimiters_at_zero)
    problem = encoders.text_positions_problem(detector)
    assert problem is not None and "[0, 0, 1, 0, 0, 0, 0, 1, 0, 0]" in problem
    with caplog.at_level("WARNING"):
        Grounder.from_config(CFG.replace(use_sam=False), None, CPU)
    assert any("numbers the text positions" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()  # the installed version's own function, through its own signature: 4.57 and 5.24 agree
    if version.parse(transformers.__version__) >= version.parse("5.24"):
        assert encoders.text_positions_problem(detector) is None


def test_fetch_without_hub_fails_fast_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    start = time.monotonic()
    # a closed local port stands in for "no network" (this test must never download on a machine that has one)
    code = weights_folder.main(["fetch", "--out", str(tmp_path), "--endpoint", "http://127.0.0.1:9", "--timeout", "5"])
    captured = capsys.readouterr()
    assert code == 1 and time.monotonic() - start < 30
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("weights fetch failed: cannot reach the Hugging Face Hub")
    assert "Traceback" not in captured.err and not any(tmp_path.iterdir())


def test_weights_layout_and_dir_checksum(tmp_path: Path) -> None:
    for entry in ("clip/open_clip_model.safetensors", "grounding-dino/", "sam/", "audioldm/vae/", "audioldm/vocoder/"):
        assert entry in weights_folder.WEIGHTS_LAYOUT
    (tmp_path / "sub").mkdir()
    np.save(tmp_path / "ignored.npy", np.zeros(3))
    (tmp_path / "a.safetensors").write_bytes(b"one")
    (tmp_path / "sub" / "b.bin").write_bytes(b"two")
    first = weights.sha256_dir(tmp_path)
    (tmp_path / "ignored.npy").write_bytes(b"changed")  # not a weight file: digest unchanged
    assert weights.sha256_dir(tmp_path) == first
    (tmp_path / "sub" / "b.bin").write_bytes(b"three")
    assert weights.sha256_dir(tmp_path) != first
    with pytest.raises(FileNotFoundError):
        weights.sha256_dir(tmp_path / "sub" / "empty")


def test_a_single_frame_is_grounded_like_in_a_batch():
    # a chunk of one 64 px frame used to crash Grounding DINO's GroupNorm (one value per group)
    cfg = PRESETS["tiny"]
    grounder = Grounder.from_config(cfg, None, torch.device("cpu"))
    frames = torch.randint(0, 255, (3, 64, 64, 3), dtype=torch.uint8)
    alone = grounder.probabilities([frames[:1]], [["dog", "ball"]])[0]
    batched = grounder.probabilities([frames], [["dog", "ball"]])[0]
    assert alone.shape == (1, 2)
    torch.testing.assert_close(alone, batched[:1], atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------- out-of-memory halving
def _oom_above(limit: int, method, calls: list[int]):
    """Wrap `method` (first tensor argument or `pixel_values` batched on dim 0) to raise CUDA's out-of-memory
    error when given more than `limit` items, as a card that holds `limit` frames would."""
    def wrapper(self, *args, **kwargs):
        batch = (args[0] if args else kwargs["pixel_values"]).shape[0]
        calls.append(batch)
        if batch > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return method(self, *args, **kwargs)
    return wrapper


def test_clip_halves_its_batch_on_out_of_memory_and_gets_the_same_embeddings(monkeypatch, caplog) -> None:
    frames = _frames(13, 40, 56, seed=11)
    clip = CLIPEncoder.from_config(CFG.replace(frame_batch=8), None, CPU)
    expected = clip.encode_frames(frames)
    calls: list[int] = []
    monkeypatch.setattr(CLIPEncoder, "preprocess", _oom_above(3, CLIPEncoder.preprocess, calls))
    with caplog.at_level("WARNING", logger="preprocess.encoders"):
        got = clip.encode_frames(frames)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert calls[:3] == [8, 4, 2] and clip.batch == 2 and all(n <= 2 for n in calls[3:])
    assert sum(n for n in calls if n <= 3) == 13  # every frame once in the kept passes
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["CUDA out of memory at 8 frames per pass; continuing with 4 (CLIP)",
                        "CUDA out of memory at 4 frames per pass; continuing with 2 (CLIP)"]
    calls.clear()
    clip.encode_frames(frames)  # the smaller size is kept: no pass fails again
    assert max(calls) == 2


def test_grounding_and_sam_halve_their_batch_on_out_of_memory_with_the_same_results(monkeypatch) -> None:
    """Frames are regrouped (other batch mates, other prompt padding): equal within batching's float rounding."""
    grounder = Grounder.from_config(CFG.replace(frame_batch=8), None, CPU)
    frames = [_frames(3, 48, 64, seed=12), _frames(4, 48, 64, seed=13), _frames(2, 48, 64, seed=14)]
    nouns = [["dog", "car"], [], ["man", "guitar player", "water"]]
    expected = grounder.detections(frames, nouns)
    detector_calls: list[int] = []
    sam_calls: list[int] = []
    monkeypatch.setattr(GroundingDinoForObjectDetection, "forward",
                        _oom_above(4, GroundingDinoForObjectDetection.forward, detector_calls))
    monkeypatch.setattr(SamModel, "forward", _oom_above(1, SamModel.forward, sam_calls))
    got = grounder.detections(frames, nouns)
    # 5 noun-bearing frames: the detector fails at 5, SAM at 2, then one frame per pass (the tiny detector gets a
    # lone frame twice, see Grounder._detect)
    assert detector_calls == [5, 2, 2, 2, 2, 2, 2] and sam_calls == [2, 1, 1, 1, 1, 1] and grounder.batch == 1
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.detector, b.detector, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.iou, b.iou, rtol=1e-4, atol=1e-5)


def _recording(method, shapes: list[tuple[int, ...]], key: str = "pixel_values"):
    """Wrap a forward to note the shape of its `key` input (keyword or first positional argument)."""
    def wrapper(self, *args, **kwargs):
        shapes.append(tuple((kwargs[key] if key in kwargs else args[0]).shape))
        return method(self, *args, **kwargs)
    return wrapper


# clip 0 and 3 become detector inputs of one size (64 x 96), clip 1 a portrait one (96 x 64), clip 4 a wider one
MIXED_FRAMES = [_frames(3, 48, 72, seed=21), _frames(5, 72, 48, seed=22), _frames(2, 48, 72, seed=23),
                _frames(4, 30, 45, seed=24), _frames(3, 40, 80, seed=25)]
MIXED_NOUNS = [["dog", "car"], ["man", "guitar player", "water"], [], ["bird"], ["train", "horn"]]


def test_a_clips_scores_do_not_depend_on_the_frame_sizes_of_its_batch_mates(monkeypatch) -> None:
    """Frames that become detector inputs of different sizes never share a pass, so none is padded to a batch
    mate's size (border pixels the backbone would see): a clip grounded alone and among clips of other shapes
    and orientations gets the same scores (within batching's float rounding)."""
    grounder = Grounder.from_config(CFG.replace(frame_batch=64), None, CPU)
    alone = [grounder.detections([frames], [nouns])[0] for frames, nouns in zip(MIXED_FRAMES, MIXED_NOUNS)]
    shapes: list[tuple[int, ...]] = []
    monkeypatch.setattr(GroundingDinoForObjectDetection, "forward",
                        _recording(GroundingDinoForObjectDetection.forward, shapes))
    together = grounder.detections(MIXED_FRAMES, MIXED_NOUNS)
    assert sorted(shapes) == [(3, 3, 48, 96), (5, 3, 96, 64), (7, 3, 64, 96)]  # one pass per input size
    for a, b in zip(together, alone):
        torch.testing.assert_close(a.detector, b.detector, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.iou, b.iou, rtol=1e-4, atol=1e-5)


def test_static_shapes_pad_each_pass_to_a_few_shapes_without_changing_scores(monkeypatch) -> None:
    """With static shapes (what --compile needs) a pass's frames are padded to their orientation's canvas, its frame
    count to a multiple of a quarter of the frame batch and its prompt to a power of two: the detector and SAM's
    image encoder see few shapes, and frames that fill the canvas get the scores they get without padding."""
    from transformers.models.sam.modeling_sam import SamVisionEncoder

    plain = Grounder.from_config(CFG.replace(frame_batch=8), None, CPU)
    static = Grounder.from_config(CFG.replace(frame_batch=8), None, CPU)
    static.static_shapes = True
    expected = plain.detections(MIXED_FRAMES, MIXED_NOUNS)
    detector_images: list[tuple[int, ...]] = []
    prompt_ids: list[tuple[int, ...]] = []
    sam_images: list[tuple[int, ...]] = []
    forward = GroundingDinoForObjectDetection.forward
    monkeypatch.setattr(GroundingDinoForObjectDetection, "forward",
                        _recording(_recording(forward, prompt_ids, "input_ids"), detector_images))
    monkeypatch.setattr(SamVisionEncoder, "forward", _recording(SamVisionEncoder.forward, sam_images))
    got = static.detections(MIXED_FRAMES, MIXED_NOUNS)
    # 10 landscape frames (3 + 4 + 3): passes of 8 and 2; 5 portrait frames: a pass of 6 (multiples of 2)
    assert sorted(detector_images) == [(2, 3, 64, 96), (6, 3, 96, 64), (8, 3, 64, 96)]
    assert {ids[1] for ids in prompt_ids} == {16}  # the longest prompt has 14 tokens
    assert sorted(sam_images) == sorted((n, 3, 64, 64) for n, *_ in detector_images)
    for i in (0, 1, 3):  # frames that fill their canvas (clip 4's 40 x 80 becomes 48 x 96, then padded)
        torch.testing.assert_close(got[i].detector, expected[i].detector, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[i].iou, expected[i].iou, rtol=1e-4, atol=1e-5)
    assert got[4].detector.shape == (3, 2) and bool(((got[4].detector >= 0) & (got[4].detector <= 1)).all())


def test_static_passes_never_exceed_the_frame_batch() -> None:
    """A pass is padded to a multiple of a quarter of the batch, but never past the batch: a batch the free memory
    or an out-of-memory halving sized (10, 37, ...) is what fits."""
    grounder = Grounder.from_config(CFG.replace(frame_batch=10), None, CPU)
    grounder.static_shapes = True
    for batch in (10, 37, 5, 3, 1):
        grounder.batch = batch
        sizes = [grounder._pass_size(count) for count in range(1, batch + 1)]
        assert all(count <= size <= batch for count, size in zip(range(1, batch + 1), sizes))
        assert len(set(sizes)) <= 5 and sizes[-1] == batch


def test_a_processor_that_resizes_past_the_canvas_pads_to_the_pass_instead(monkeypatch) -> None:
    """Another transformers version may round a frame's resize a pixel past the canvas, which its pad refuses:
    that pass is padded to its own largest frame instead (a shape more to compile), with the same scores."""
    static = Grounder.from_config(CFG.replace(frame_batch=8), None, CPU)
    static.static_shapes = True
    expected = static.detections(MIXED_FRAMES[:2], MIXED_NOUNS[:2])
    processor = static.image_processor
    refused: list[dict[str, int]] = []

    def rounds_past(*args, pad_size=None, **kwargs):  # as such a processor's pad answers
        if pad_size is not None:
            refused.append(pad_size)
            raise ValueError("Padding dimensions are negative. Please make sure that the padded size is larger ...")
        return type(processor).__call__(processor, *args, **kwargs)

    monkeypatch.setattr(static, "image_processor", rounds_past)
    got = static.detections(MIXED_FRAMES[:2], MIXED_NOUNS[:2])
    assert refused == [{"height": 64, "width": 96}, {"height": 96, "width": 64}]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.detector, b.detector, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compiled_grounding_computes_what_the_eager_one_does() -> None:
    """--compile (inductor's C++ backend on the CPU): the same scores and IoUs as the eager models on the same
    padded shapes, with graphs really compiled for both models. Minutes of compilation on two cores."""
    import torch._dynamo

    eager = Grounder.from_config(CFG.replace(frame_batch=8), None, CPU)
    eager.static_shapes = True
    expected = eager.detections(MIXED_FRAMES[:2], MIXED_NOUNS[:2])
    torch._dynamo.reset()
    compiled = Grounder.from_config(CFG.replace(frame_batch=8, compile=True), None, CPU)
    assert compiled.static_shapes and list(compiled.state_dict()) == list(eager.state_dict())
    got = compiled.detections(MIXED_FRAMES[:2], MIXED_NOUNS[:2])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.detector, b.detector, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(a.iou, b.iou, rtol=1e-3, atol=1e-4)


def test_out_of_memory_at_one_frame_is_one_line(monkeypatch) -> None:
    clip = CLIPEncoder.from_config(CFG.replace(frame_batch=4), None, CPU)
    monkeypatch.setattr(CLIPEncoder, "preprocess", _oom_above(0, CLIPEncoder.preprocess, []))
    with pytest.raises(OutOfMemory) as error:
        clip.encode_frames(_frames(3, 40, 56))
    assert str(error.value).startswith("CUDA out of memory in CLIP at 1 frame per pass (CUDA out of memory.")
    assert "\n" not in str(error.value) and error.value.__cause__ is None


def test_memory_cap_on_a_cuda_device_without_an_index(monkeypatch) -> None:
    """`--device cuda` (no index) caps the current device: torch's setter refuses a device without an index, as its
    own check (run here, on any machine) says; before, --max-memory-gib stopped stage one with a ValueError."""
    from torch.cuda._utils import _get_device_index

    capped: list[tuple[float, int]] = []

    class Props:
        total_memory = 80 * encoders.GIB

    def set_fraction(fraction: float, device: object) -> None:
        capped.append((fraction, _get_device_index(device)))  # torch's own argument check (not optional)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_fraction)
    encoders.cap_cuda_memory(20, torch.device("cuda"))
    encoders.cap_cuda_memory(40, torch.device("cuda", 0))
    assert capped == [(0.25, 1), (0.5, 0)]


def test_memory_cap_and_first_batch_from_free_memory(monkeypatch) -> None:
    """--max-memory-gib sets the allocator's share of the card; the first batch fits the free memory's estimate."""
    cuda = torch.device("cuda", 0)
    fractions: list[float] = []

    class Props:
        total_memory = 80 * encoders.GIB

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, device: fractions.append(f))
    encoders.cap_cuda_memory(0, cuda)
    encoders.cap_cuda_memory(24, CPU)
    encoders.cap_cuda_memory(20, cuda)
    assert fractions == [0.25]

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (30 * encoders.GIB, 80 * encoders.GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 4 * encoders.GIB)
    paper = encoders.GROUNDING_GIB_PER_MEGAPIXEL * 800 * 1333 / 1e6
    batches = encoders.AdaptiveBatch(64, "Grounding DINO")
    batches.fit_free_memory(cuda, paper)
    assert batches.size == int(30 / paper) == 44
    batches.fit_free_memory(cuda, paper, max_memory_gib=20)  # 16 GiB left under the cap
    assert batches.size == int(16 / paper) == 23
    batches.fit_free_memory(CPU, paper, max_memory_gib=1)
    assert batches.size == 23


def test_sams_dense_bias_adds_to_the_memory_estimate_unless_folded() -> None:
    """The first frame batch is sized from an estimate per frame: SAM with transformers' dense relative-position
    bias costs more per frame than SAM with the positions folded into query and key (the default)."""
    from preprocess.encoders import Grounder

    estimate = {way: Grounder.from_config(PRESETS["tiny"].replace(sam_rel_pos=way), None, CPU).gib_per_frame
                for way in ("bias", "folded")}
    assert estimate["bias"] - estimate["folded"] == pytest.approx(encoders.SAM_BIAS_GIB_PER_FRAME)
    assert PRESETS["paper"].sam_rel_pos == "folded"
    without_sam = Grounder.from_config(PRESETS["tiny"].replace(use_sam=False, sam_rel_pos="bias"), None, CPU)
    assert without_sam.gib_per_frame == pytest.approx(estimate["folded"])


def test_damaged_model_folders_are_one_line(saved: tuple[Path, dict[str, object]], tmp_path: Path,
                                           capfd: pytest.CaptureFixture[str]) -> None:
    """A truncated weight file, a config.json of the wrong shape, and weights that lack learnt tensors: each a
    one-line ValueError naming the folder. Before, the first two were tracebacks (SafetensorError, TypeError) and
    the third loaded with those tensors at unseeded random values, written to shards as if the checkpoint were
    whole."""
    import shutil

    from safetensors.torch import load_file

    from audio_models.vocoder import load_vocoder

    source, _ = saved
    loaders = {  # folder -> (load it, the tensor-name fragment to drop)
        LOADED.sam_dir: (lambda root: Grounder.from_config(LOADED, root, CPU), "mask_decoder"),
        LOADED.grounding_dir: (lambda root: Grounder.from_config(LOADED.replace(use_sam=False), root, CPU), "bbox_embed"),
        f"{LOADED.audioldm_dir}/vae": (lambda root: AudioVAE.from_config(LOADED.audio_models(), root, CPU), "decoder"),
        f"{LOADED.audioldm_dir}/vocoder": (lambda root: load_vocoder(LOADED.audio_models(), root, CPU), "resblocks"),
    }
    for name, (load, fragment) in loaders.items():
        root = tmp_path / name.replace("/", "_")
        shutil.copytree(source, root)
        folder = root / name
        weights_file = next(folder.glob("*.safetensors"))
        whole = weights_file.read_bytes()
        state = load_file(weights_file)
        config = (folder / "config.json").read_text()
        capfd.readouterr()
        for damage in ("truncated", "config", "lacking", "transposed", "kind", "absurd"):
            if damage == "truncated":
                weights_file.write_bytes(whole[: len(whole) // 2])
            elif damage == "config":
                (folder / "config.json").write_text("[]")
            elif damage == "absurd":  # sizes whose memory from_pretrained would take before finding the mismatch
                changed = json.loads(config)
                key = next(k for k in ("block_out_channels", "hidden_size", "d_model", "upsample_initial_channel")
                           if k in changed or k in changed.get("vision_config", {}))
                if key in changed:
                    changed[key] = [10**9] * len(changed[key]) if isinstance(changed[key], list) else 10**9
                else:
                    changed["vision_config"][key] = 10**9
                (folder / "config.json").write_text(json.dumps(changed))
            elif damage == "kind":  # e.g. SAM's config.json in the Grounding DINO folder
                kind = "_class_name" if "_class_name" in json.loads(config) else "model_type"
                (folder / "config.json").write_text(json.dumps({**json.loads(config), kind: "something_else"}))
            elif damage == "transposed":
                victim = next(k for k, v in sorted(state.items()) if v.ndim >= 2 and v.shape[0] != v.shape[1])
                save_file({**state, victim: state[victim].transpose(0, 1).contiguous()}, str(weights_file),
                          metadata={"format": "pt"})
            else:
                save_file({k: v for k, v in state.items() if fragment not in k}, str(weights_file),
                          metadata={"format": "pt"})
            with pytest.raises(ValueError, match=rf"^{re.escape(str(folder))}") as error:
                load(root)
            assert "\n" not in str(error.value), (name, damage)
            if damage == "lacking":
                assert "lack" in str(error.value) and fragment in str(error.value), str(error.value)
            if damage == "transposed":  # the tensor is named, not "see the report above"
                assert f"{victim} is [" in str(error.value) and "by config.json" in str(error.value), str(error.value)
            if damage == "absurd":  # refused from the config alone, before any of that memory is taken
                assert "describes no model that can be built" in str(error.value) or "by config.json" in str(error.value)
            if damage == "kind":
                assert "something_else" in str(error.value) and "not a " in str(error.value), str(error.value)
            # transformers' and diffusers' own report and progress bar stay off: the one line says it all
            assert capfd.readouterr().err == "", (name, damage)
            weights_file.write_bytes(whole)
            (folder / "config.json").write_text(config)
        load(root)  # whole again: loads


def _rewritten(source: Path, target: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Copy a weights folder (or file) to `target` with change(tensors) applied to every safetensors file in it."""
    from safetensors.torch import load_file

    if source.is_dir():
        shutil.copytree(source, target)
        files = sorted(target.glob("*.safetensors"))
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
        files = [target]
    for file in files:
        tensors = load_file(str(file))
        change(tensors)
        save_file(tensors, str(file), metadata={"format": "pt"})


def _nan_first(tensors: dict[str, torch.Tensor]) -> None:
    name = sorted(k for k, v in tensors.items() if v.is_floating_point() and v.ndim >= 2)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")


def _as_int(tensors: dict[str, torch.Tensor]) -> None:
    for name, tensor in list(tensors.items()):
        if tensor.is_floating_point():
            tensors[name] = tensor.to(torch.int32)


@pytest.mark.parametrize(("change", "reason"), [(_nan_first, "holds NaN or infinite values"),
                                                (_as_int, "is stored as torch.int32, where the model has float")])
def test_weights_that_load_but_are_no_trained_model_are_refused_naming_the_tensor(
        saved: tuple[Path, dict[str, object]], tmp_path: Path, change, reason: str) -> None:
    """NaN weights, or float weights stored as integers (which load_state_dict and from_pretrained cast without a
    word), loaded into every stage-one model; the evaluation embedders already refused them."""
    root, _ = saved
    _rewritten(root / LOADED.clip_checkpoint, tmp_path / LOADED.clip_checkpoint, change)
    with pytest.raises(ValueError, match=rf"{LOADED.clip_checkpoint}: checkpoint does not fit .*{reason.split(',')[0]}"):
        CLIPEncoder.from_config(LOADED, tmp_path, CPU)
    hf_reason = reason.replace("torch.int32", "I32")
    for folder, build in ((LOADED.grounding_dir, lambda: Grounder.from_config(LOADED.replace(use_sam=False), tmp_path, CPU)),
                          (f"{LOADED.audioldm_dir}/vae", lambda: AudioVAE.from_config(LOADED.audio_models(), tmp_path, CPU)),
                          (f"{LOADED.audioldm_dir}/vocoder", lambda: load_vocoder(LOADED.audio_models(), tmp_path, CPU))):
        _rewritten(root / folder, tmp_path / folder, change)
        with pytest.raises(ValueError, match=rf"{folder}: the .* weights are not a trained model's \(.*{hf_reason.split(',')[0]}"):
            build()


def test_a_clip_of_another_image_size_is_refused_not_interpolated(saved: tuple[Path, dict[str, object]],
                                                                   tmp_path: Path) -> None:
    """open_clip's load_checkpoint interpolates positional embeddings of another length into place, so a CLIP of
    another image size (ViT-L/14-336 for ViT-L/14) or context length loaded as the configured model; one of
    another width ended in an AssertionError traceback. Both are refused naming the tensor."""
    torch.manual_seed(3)
    variants = {"size": open_clip.create_model(CFG.clip_model, force_image_size=64).state_dict()}
    state = {k: v.clone() for k, v in open_clip.create_model(CFG.clip_model).state_dict().items()}
    state["positional_embedding"] = torch.randn(40, state["positional_embedding"].shape[1])  # context length 40
    variants["context"] = state
    for name, variant in variants.items():
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in variant.items()}, str(path))
        with pytest.raises(ValueError, match=rf"{name}.safetensors: checkpoint does not fit open_clip model "
                                             r"vta-tiny-clip \((visual\.)?positional_embedding is \["):
            CLIPEncoder.from_config(LOADED.replace(clip_checkpoint=path.name), tmp_path, CPU)


def test_weights_check_without_loading_finds_empty_and_damaged_files(saved: tuple[Path, dict[str, object]],
                                                                    tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`check` without --load printed a checksum for a zero-byte or torn file and said all was well; a file where a
    model folder goes was 'not found at .../config.json'."""
    root, _ = saved
    for damage in ("empty", "torn", "file for folder"):
        copy = tmp_path / damage.replace(" ", "_")
        shutil.copytree(root, copy)
        if damage == "empty":
            (copy / LOADED.clip_checkpoint).write_bytes(b"")
            expected = f"WRONG  {copy / LOADED.clip_checkpoint}: empty file"
        elif damage == "torn":
            target = next((copy / LOADED.sam_dir).glob("*.safetensors"))
            target.write_bytes(target.read_bytes()[:100])
            expected = f"WRONG  {target}: not a readable safetensors file"
        else:
            shutil.rmtree(copy / LOADED.grounding_dir)
            (copy / LOADED.grounding_dir).write_text("oops")
            expected = "is a file, not a model folder"
        assert weights_folder.main(["check", "--weights", str(copy), "--preset", "tiny"]) == 1
        assert expected in capsys.readouterr().out, damage


def test_a_torn_torch_zip_is_found_without_loading(tmp_path: Path) -> None:
    """A .pt/.pth/.bin cut short has no zip directory: `check` without --load printed its checksum as if whole."""
    path = tmp_path / "w.pth"
    torch.save({"a": torch.randn(1000, 100)}, path)
    assert weights.weight_file_problem(path) is None
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert weights.weight_file_problem(path) == "a torch zip archive cut short (no central directory)"


def test_config_files_have_their_own_checksum(saved: tuple[Path, dict[str, object]], tmp_path: Path) -> None:
    """The weights' checksum leaves config, preprocessor and tokenizer files out, so a config.json that changes an
    activation function (other features from the same weights) went unnoticed by generation and evaluation. Their
    own checksum ignores JSON key order and spacing, weight files and hidden files, and follows any value."""
    root, _ = saved
    copy = tmp_path / "w"
    shutil.copytree(root, copy)
    folder = copy / LOADED.grounding_dir
    before = weights.sha256_configs(folder)
    weights_before = weights.sha256_dir(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(reversed(list(config.items()))), indent=4))
    (folder / ".notes.json").write_text("{}")
    assert weights.sha256_configs(folder) == before  # the same JSON, reordered and re-spaced
    (folder / "config.json").write_text(json.dumps({**config, "activation_function": "gelu"}))
    assert weights.sha256_configs(folder) != before and weights.sha256_dir(folder) == weights_before
    grounder = Grounder.from_config(LOADED.replace(use_sam=False), copy, CPU)
    assert grounder.config_checksum is not None
    assert Grounder.from_config(CFG.replace(use_sam=False), None, CPU).config_checksum is None  # random init
    assert AudioVAE.from_config(LOADED.audio_models(), copy, CPU).config_checksum == weights.sha256_configs(
        copy / LOADED.audioldm_dir / "vae")
    clip = CLIPEncoder.from_config(LOADED, copy, CPU)
    assert clip.config_checksum is None  # no open_clip_config.json beside the checkpoint
    sidecar = (copy / LOADED.clip_checkpoint).parent / "open_clip_config.json"
    sidecar.write_text(json.dumps({"model_cfg": {}, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5]}}))
    assert CLIPEncoder.from_config(LOADED, copy, CPU).config_checksum == weights.sha256_configs(sidecar)


def test_integer_weights_in_a_torch_bin_folder_are_refused_too(saved: tuple[Path, dict[str, object]], tmp_path: Path,
                                                               capfd: pytest.CaptureFixture[str]) -> None:
    """A folder with only diffusion_pytorch_model.bin (the format `make weights` falls back to) loaded integer
    weights cast to float: the dtype check read safetensors headers only. diffusers' ERROR line about the missing
    .safetensors stays off too."""
    _, models = saved
    folder = tmp_path / LOADED.audioldm_dir / "vae"
    models["vae"].save_pretrained(folder, safe_serialization=False)
    (path,) = folder.glob("*.bin")
    state = torch.load(path, weights_only=True)
    AudioVAE.from_config(LOADED.audio_models(), tmp_path, CPU)  # whole: loads
    torch.save({k: v.to(torch.int32) if v.is_floating_point() else v for k, v in state.items()}, path)
    capfd.readouterr()
    with pytest.raises(ValueError, match=rf"{path.name}: .* is stored as int32, where the model has float weights"):
        AudioVAE.from_config(LOADED.audio_models(), tmp_path, CPU)
    assert capfd.readouterr().err == ""


SWIN_QUERY = "model.backbone.conv_encoder.model.encoder.layers.0.blocks.0.attention.self.query.weight"


def test_weights_under_names_the_loader_renames_are_checked_too(saved: tuple[Path, dict[str, object]],
                                                                tmp_path: Path) -> None:
    """from_pretrained renames some stored tensors while loading: transformers loads Grounding DINO's Swin backbone,
    stored under its older names (`attention.self.query`) by the released checkpoints, as `swin.` ...
    `attention.q_proj`, and diffusers loads a VAE's attention blocks of the deprecated names (`query`) as `to_q`.
    The dtype check matched stored names to the model's as they were, so an integer-stored backbone or VAE
    attention weight loaded cast to float without a word; the shape check before loading skipped them too."""
    root, _ = saved

    def grounder(folder: Path) -> Grounder:
        return Grounder.from_config(LOADED.replace(use_sam=False), folder, CPU)

    def swin_as_int(tensors: dict[str, torch.Tensor]) -> None:
        tensors[SWIN_QUERY] = tensors[SWIN_QUERY].to(torch.int32)

    def swin_resized(tensors: dict[str, torch.Tensor]) -> None:
        tensors[SWIN_QUERY] = torch.zeros(tensors[SWIN_QUERY].shape[0] + 1, tensors[SWIN_QUERY].shape[1])

    _rewritten(root / LOADED.grounding_dir, tmp_path / "int" / LOADED.grounding_dir, swin_as_int)
    with pytest.raises(ValueError, match=rf"the Grounding DINO weights are not a trained model's \(model.safetensors: "
                                         rf"{re.escape(SWIN_QUERY)} is stored as I32, where the model has float weights"):
        grounder(tmp_path / "int")
    _rewritten(root / LOADED.grounding_dir, tmp_path / "shape" / LOADED.grounding_dir, swin_resized)
    with pytest.raises(ValueError, match=rf"weights do not fit its config.json \({re.escape(SWIN_QUERY)} is \["):
        grounder(tmp_path / "shape")

    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def deprecated_attention(tensors: dict[str, torch.Tensor]) -> None:
        for name in [name for name in tensors if ".attentions." in name]:
            stem, _, leaf = name.rpartition(".")
            for new, old in old_names.items():
                if stem.endswith("." + new):
                    tensors[f"{stem.removesuffix(new)}{old}.{leaf}"] = tensors.pop(name)

    vae = f"{LOADED.audioldm_dir}/vae"
    _rewritten(root / vae, tmp_path / "old" / vae, deprecated_attention)
    AudioVAE.from_config(LOADED.audio_models(), tmp_path / "old", CPU)  # the deprecated names load as they are

    def deprecated_as_int(tensors: dict[str, torch.Tensor]) -> None:
        deprecated_attention(tensors)
        query = "encoder.mid_block.attentions.0.query.weight"
        tensors[query] = tensors[query].to(torch.int32)

    _rewritten(root / vae, tmp_path / "old_int" / vae, deprecated_as_int)
    with pytest.raises(ValueError, match=r"encoder.mid_block.attentions.0.query.weight is stored as I32, where the model"):
        AudioVAE.from_config(LOADED.audio_models(), tmp_path / "old_int", CPU)
    assert weights.loading_names(AutoencoderKL(**tiny_vae_config(CFG.audio_models())), ["encoder.conv_in.weight"]) == {}


def test_another_variant_than_the_papers_is_said_under_the_paper_preset(saved: tuple[Path, dict[str, object]],
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """SAM ViT-H or Grounding DINO Swin-B in the weights folder loaded under the paper preset without a word (the
    checksum pins it, but the features are not the paper's). The tiny checkpoints stand in for another variant."""
    root, _ = saved
    with caplog.at_level("WARNING", logger="preprocess.encoders"):
        Grounder.from_config(LOADED, root, CPU)
    assert "not the paper preset's" not in caplog.text  # the tiny preset compares nothing
    with caplog.at_level("WARNING", logger="preprocess.encoders"):
        Grounder.from_config(LOADED.replace(preset="paper"), root, CPU)
    assert f"{root / LOADED.sam_dir}: this SAM is not the paper preset's (vision_config.hidden_size" in caplog.text
    assert f"{root / LOADED.grounding_dir}: this Grounding DINO is not the paper preset's (" in caplog.text
    for paper, fields in ((model_configs.paper_sam_config(), model_configs.SAM_VARIANT_FIELDS),
                          (model_configs.paper_grounding_dino_config(), model_configs.GROUNDING_DINO_VARIANT_FIELDS)):
        assert model_configs.variant_differences(paper, paper, fields) == []  # the paper's own: no warning


@pytest.mark.parametrize(("change", "expected"), [
    ({"size": {"longest_edge": 96}, "pad_size": {"height": 96, "width": 96}},
     "pads images to 96x96 (longest edge 96), where the model takes 64x64"),
    ({"image_mean": "abc"}, "has image_mean 'abc', not three numbers"),
])
def test_a_sam_processor_of_another_size_is_refused_when_loading(saved: tuple[Path, dict[str, object]],
                                                                tmp_path: Path, change: dict[str, object],
                                                                expected: str) -> None:
    """A SAM processor_config.json of another size (or a mean that is no numbers) loaded, passed `weights check
    --load`, and stage one then died in its first batch with transformers' "Input image size (96*96) doesn't match
    model (64*64)" traceback."""
    import shutil

    root, _ = saved
    copy = tmp_path / "weights"
    shutil.copytree(root, copy)
    path = copy / LOADED.sam_dir / "processor_config.json"
    data = json.loads(path.read_text())
    data["image_processor"].update(change)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"its preprocessor config {re.escape(expected)}; give the folder's own"):
        Grounder.from_config(LOADED, copy, torch.device("cpu"))


def test_a_prompt_keeps_each_noun_on_its_own_tokens(grounder: Grounder, caplog) -> None:
    """An empty noun shifted the offsets of every noun after it (the text was stripped of its leading ' . ', the
    spans were not): 'x' after it got no token and scored 0. A '?' (a phrase delimiter of Grounding DINO, as '.')
    stayed inside its noun's span. A noun cut off by the text encoder's length kept the pieces that fit."""
    tokens_of = grounder.tokenizer.convert_ids_to_tokens
    prompt = grounder.prompt(["", "dog", "cat?"])
    tokens = tokens_of(prompt.input_ids)
    assert prompt.spans[0] == [] and [tokens[i] for i in prompt.spans[1]] == ["dog"]
    assert [tokens[i] for i in prompt.spans[2]] == ["cat"] and "?" not in tokens
    assert tokens.count(".") == 2  # one delimiter per noun the text holds

    limit = grounder.detector.config.max_text_len
    many = [f"noun{i}" for i in range(limit)]  # far past the limit: the last fit whole, then one partly, then none
    with caplog.at_level("WARNING"):
        long = grounder.prompt(many)
    assert len(long.input_ids) == limit
    tokens = tokens_of(long.input_ids)
    whole = [k for k, span in enumerate(long.spans) if span]
    assert whole == list(range(len(whole))) and 0 < len(whole) < limit
    assert all("".join(tokens[i] for i in long.spans[k]).replace("##", "") == many[k] for k in whole)
    assert "longer than its" in caplog.text and "left out" in caplog.text


def test_a_text_embedding_does_not_depend_on_the_texts_encoded_with_it():
    """Texts were encoded in one batch of whatever was new: a caption's embedding then differed in its last bits
    with its batch mates, so `vta-sam generate` without a caption gave a video another WAV (by one 16-bit step)
    after other videos than alone, and a resumed stage one other text embeddings. Each text is encoded alone."""
    from preprocess.pipeline import Encoders

    cfg = PRESETS["tiny"].replace(device="cpu")
    alone = Encoders(cfg, None, torch.device("cpu"), audio=False)
    crowded = Encoders(cfg, None, torch.device("cpu"), audio=False)
    crowded.texts(["a man singing loudly", "car"])
    mates = crowded.texts(["dog", "ball barking", "a man singing loudly", "car", "x", "cat"])
    assert np.array_equal(alone.texts(["dog"])["dog"], mates["dog"])
    assert np.array_equal(alone.texts(["car"])["car"], mates["car"])


@pytest.mark.parametrize("folder, edit", [
    ("sam", lambda c: c["vision_config"].update(num_hidden_layers=c["vision_config"]["num_hidden_layers"] - 1)),
    ("audioldm/vocoder", lambda c: c.update(resblock_dilation_sizes=[d[:-1] for d in c["resblock_dilation_sizes"]])),
])
def test_a_config_with_fewer_layers_than_its_weights_is_refused(tmp_path, folder, edit):
    """A config.json building fewer layers than its weights hold loaded the first ones and dropped the rest with a
    log warning: `weights check --load` said "loaded every model", and stage one made features with a cut SAM."""
    from common.weights import load_pretrained_model

    _save_tiny_weights(tmp_path)
    path = tmp_path / folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    model_class = SamModel if folder == "sam" else SpeechT5HifiGan
    with pytest.raises(ValueError, match=rf"^{tmp_path / folder}: the x weights hold \d+ tensors of layers its "
                                         r"config.json does not build \(.*\): config.json describes a smaller model"):
        load_pretrained_model(model_class.from_pretrained, tmp_path / folder, "x")


class _RunsCode:
    def __reduce__(self):  # unpickling it would call os.system
        import os

        return (os.system, ("true",))


def test_checkpoint_files_that_do_not_load_say_why_in_one_line(tmp_path):
    """An evaluation embedder's file that would run code gave a 650-character torch paragraph advising
    weights_only=False; an empty CLIP .pt was called a refused pickle; a cut-short VAE said only 'Unable to load
    weights'; a stale extra .safetensors beside a vocoder's weights got the folder refused for its config.json."""
    from common.weights import load_pretrained_model
    from eval.panns import read_state_dict

    evil = tmp_path / "evil.pth"
    torch.save({"a": _RunsCode()}, evil)
    with pytest.raises(ValueError) as refused:
        read_state_dict(evil)
    message = str(refused.value)
    assert message.startswith(f"{evil}: cannot be read as a PyTorch checkpoint (UnpicklingError: the restricted "
                              "unpickler refused the file:") and "system" in message and "weights_only" not in message
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"^{empty}: empty file$"):
        read_state_dict(empty)

    _save_tiny_weights(tmp_path / "w")
    (tmp_path / "w/clip/empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.pt: empty file$"):
        CLIPEncoder.from_config(LOADED.replace(clip_checkpoint="clip/empty.pt"), tmp_path / "w", CPU)
    vae = tmp_path / "w/audioldm/vae/diffusion_pytorch_model.safetensors"
    vae.write_bytes(vae.read_bytes()[: vae.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"^{vae}: not a readable safetensors file"):
        load_pretrained_model(AutoencoderKL.from_pretrained, vae.parent, "AudioLDM VAE")
    vocoder = tmp_path / "w/audioldm/vocoder"
    save_file({"conv_post.bias": torch.zeros(2)}, vocoder / "old.safetensors")  # not read by from_pretrained
    assert isinstance(load_pretrained_model(SpeechT5HifiGan.from_pretrained, vocoder, "AudioLDM vocoder"),
                      SpeechT5HifiGan)


def test_the_weight_files_checked_are_the_ones_from_pretrained_reads(tmp_path):
    """A single model.safetensors is read before an index beside it (transformers 5), an index's shards without a
    single file, and a stale extra file never."""
    from common.weights import read_weight_files

    for name in ("model.safetensors", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "old.safetensors"):
        save_file({"a": torch.zeros(1)}, tmp_path / name)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert read_weight_files(tmp_path) == [tmp_path / "model.safetensors"]
    (tmp_path / "model.safetensors").unlink()
    assert read_weight_files(tmp_path) == [tmp_path / "model-00001-of-00002.safetensors",
                                           tmp_path / "model-00002-of-00002.safetensors"]
