"""Frozen visual and text feature extractors of stage one: CLIP and Grounding DINO (+ SAM).

(The AudioLDM VAE that encodes the audio is in `audio_models`, shared with evaluation and generation.)

Every model comes from one of two places, chosen by `FeatureConfig.random_init`:
- a config with random weights seeded by `cfg.seed`: toy widths (the `tiny` preset: tests, the demo, CI) or, with
  `random_size="paper"`, the real architectures (benchmarks); the configs are in `preprocess.model_configs`; or
- a local weights folder laid out as `preprocess.weights.WEIGHTS_LAYOUT` says (the `paper` preset).
Both go through the same library constructors (open_clip.create_model, transformers/diffusers classes), and
after loading the sizes are checked against the config, so a wrong checkpoint fails at start-up, not in a shard.

The wrappers are frozen: eval mode forever (`train()` is overridden, as in MMAudio's FeaturesUtils), no gradients,
and every public method runs under `torch.inference_mode()`. Inputs may live on any device; results are float32
tensors on the CPU, ready for the shard writer.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import pickle
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import open_clip
import torch
import transformers
from safetensors import SafetensorError
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from transformers import (
    BertTokenizer,
    GroundingDinoForObjectDetection,
    GroundingDinoImageProcessor,
    GroundingDinoProcessor,
    SamImageProcessor,
    SamModel,
    SamProcessor,
)
from transformers.image_transforms import get_size_with_aspect_ratio
from transformers.models.grounding_dino import modeling_grounding_dino as grounding_dino_modeling

from common.devices import half_dtype
from common.frozen import FrozenModule, chunks, random_init_checksum, seeded
from common.weights import (
    load_pretrained_model,
    load_pretrained_parts,
    require_file,
    require_model_dir,
    sha256_configs,
    sha256_dir,
    sha256_file,
    state_dict_problem,
    weight_file_problem,
    weights_folder,
)
from preprocess import model_configs
from preprocess.config import FeatureConfig
from preprocess.model_configs import TINY_BERT_VOCAB, random_configs
from preprocess.sam_attention import FoldedRelPosAttention, use_folded_rel_pos
from shards import FEATURE_DTYPE

ASSETS = Path(__file__).parent / "assets"
TINY_CLIP_CONFIG = ASSETS / "vta-tiny-clip.json"  # registered with open_clip under its stem, "vta-tiny-clip"
GROUNDING_DELIMITERS = ("[CLS]", "[SEP]", ".", "?")
GIB = 1024**3
PYTORCH_HINT = "use --deformable-attention pytorch"  # what to do when the fused kernel cannot run
# Estimated peak CUDA memory per frame of one forward pass (half precision), used only to size the first frame
# batch from the device's free memory. Measured on an H200 at 64 frames of 800x1333 per pass: Grounding DINO Swin-T
# with SAM ViT-B's attention folded (`preprocess.sam_attention`) peaked at 42.8 GiB (Grounding DINO alone: 43.0),
# taken as proportional to the detector input's pixels; with transformers' dense relative-position bias SAM peaked
# at 53.8 GiB, 11 GiB more, a cost per frame (SAM's input is 1024 x 1024 whatever the detector's size). CLIP
# ViT-L/14 at 224 px is far cheaper; 0.1 GiB a frame is a generous bound. These are estimates: the out-of-memory
# halving of `AdaptiveBatch` is what guarantees a pass fits.
GROUNDING_GIB_PER_MEGAPIXEL = 42.8 / 64 / (800 * 1333 / 1e6)
SAM_BIAS_GIB_PER_FRAME = (53.8 - 42.8) / 64
CLIP_GIB_PER_FRAME = 0.1
log = logging.getLogger(__name__)
_T = TypeVar("_T")

if TINY_CLIP_CONFIG.stem not in open_clip.list_models():
    open_clip.add_model_config(TINY_CLIP_CONFIG)


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """open_clip logs "No pretrained weights loaded" on the root logger for every build; we load weights
    ourselves right after (or want random ones), so that line only misleads."""
    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "No pretrained weights loaded" not in record.getMessage()

    root, drop = logging.getLogger(), _Drop()  # open_clip calls logging.warning(): records of the root logger
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


# ----------------------------------------------------------------------------------- memory
def cap_cuda_memory(max_memory_gib: float, device: torch.device) -> None:
    """With `max_memory_gib` > 0 on CUDA, let this process's allocator hold at most that much of the device
    (`torch.cuda.set_per_process_memory_fraction`): a bigger card then runs out of memory where a card of that
    size would, which `AdaptiveBatch` answers by halving. Nothing happens on the CPU or with 0 (no cap). A device
    without an index (`--device cuda`) means the current one: torch's setter wants an index."""
    if max_memory_gib <= 0 or device.type != "cuda":
        return
    index = torch.cuda.current_device() if device.index is None else device.index
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, max_memory_gib * GIB / total), index)


class OutOfMemory(RuntimeError):
    """CUDA ran out of memory with one frame per pass: nothing smaller to try (one line, naming the model)."""


class AdaptiveBatch:
    """How many frames go through one forward pass of a model; halved whenever CUDA runs out of memory.

    `map(n, run)` calls `run(part)` on consecutive slices covering range(n), each at most `size` long, and returns
    the results in order. A pass that raises `torch.OutOfMemoryError` is discarded, the CUDA cache is emptied,
    `size` becomes half that pass's length and the same slice is run again in the smaller passes, down to one
    frame; there the error is re-raised as a one-line `OutOfMemory`. So each item appears exactly once in the
    results, computed by the same per-item computation as in an uninterrupted run (equal up to how the model's
    numerics depend on the batch size). The smaller size is kept for the rest of the run, with one warning per
    change. `run` must not keep side effects of a pass that fails (return its results instead).
    """

    def __init__(self, size: int, name: str) -> None:
        self.size = max(1, size)
        self.name = name

    def map(self, n: int, run: Callable[[slice], _T]) -> list[_T]:
        out: list[_T] = []
        start = 0
        while start < n:
            part = slice(start, min(n, start + self.size))
            length, failed = part.stop - part.start, False
            try:
                out.append(run(part))
            except torch.OutOfMemoryError as error:
                if length == 1:
                    first = str(error).strip().splitlines()[0] if str(error).strip() else "no details"
                    raise OutOfMemory(f"CUDA out of memory in {self.name} at 1 frame per pass ({first}); "
                                       f"free GPU memory or use a bigger card") from None
                failed = True
            if failed:  # outside the handler: the failed pass's tensors, held by its traceback, are released
                self.size = length // 2
                torch.cuda.empty_cache()  # a no-op unless CUDA was initialised
                log.warning("CUDA out of memory at %d frames per pass; continuing with %d (%s)", length, self.size,
                            self.name)
            else:
                start = part.stop
        return out

    def fit_free_memory(self, device: torch.device, gib_per_frame: float, max_memory_gib: float = 0.0) -> None:
        """On CUDA, lower `size` to the frames that the device's free memory (within `max_memory_gib`, if set)
        holds at an estimated `gib_per_frame`; the estimate only sets the start, halving on out-of-memory
        corrects it. Unchanged on the CPU."""
        if device.type != "cuda" or gib_per_frame <= 0:
            return
        free = float(torch.cuda.mem_get_info(device)[0])
        if max_memory_gib > 0:
            free = min(free, max_memory_gib * GIB - torch.cuda.memory_reserved(device))
        fits = max(1, int(free / GIB / gib_per_frame))
        if fits < self.size:
            log.info("%s: %.1f GiB free holds about %d frames per pass (was %d)", self.name, free / GIB, fits,
                     self.size)
            self.size = fits


class _Batched:
    """A model that runs frames in `AdaptiveBatch` passes; `batch` is their current size (settable)."""

    batches: AdaptiveBatch

    @property
    def batch(self) -> int:
        return self.batches.size

    @batch.setter
    def batch(self, size: int) -> None:
        self.batches.size = max(1, size)


# ----------------------------------------------------------------------------------- CLIP
def _looks_like_torchscript(path: Path) -> bool:
    """Whether the file is shaped like a TorchScript archive (a zip holding constants.pkl).

    Only used to word an error message: what is loaded, and how, is decided by `FeatureConfig.clip_torchscript`
    alone. Deciding by this sniff would let a crafted file choose the unsafe loader (e.g. a pickle followed by
    a zip that holds constants.pkl: the sniff sees a zip, torch.load sees a pickle and unpickles it in full)."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            return any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


class CLIPEncoder(_Batched, FrozenModule):
    """open_clip image/text towers; raw projected embeddings (not L2-normalised), one per frame or text."""

    model: Any  # open_clip CLIP or CustomTextCLIP
    mean: torch.Tensor
    std: torch.Tensor
    config_checksum: str | None = None  # of open_clip_config.json beside the checkpoint (`sha256_configs`), if any

    def __init__(self, model: nn.Module, tokenizer: Any, preprocess_cfg: dict[str, Any], batch: int,
                 checksum: str) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.batches = AdaptiveBatch(batch, "CLIP")
        self.gib_per_frame = CLIP_GIB_PER_FRAME
        self.checksum = checksum
        size = preprocess_cfg["size"]
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        device = next(model.parameters()).device
        self.register_buffer("mean", torch.tensor(preprocess_cfg["mean"], device=device).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(preprocess_cfg["std"], device=device).view(1, 3, 1, 1),
                             persistent=False)
        # open_clip evaluates 'random' interpolation as bicubic (transform.py, image_transform)
        bilinear = preprocess_cfg.get("interpolation") == "bilinear"
        self.interpolation = InterpolationMode.BILINEAR if bilinear else InterpolationMode.BICUBIC
        self.resize_mode: str = preprocess_cfg.get("resize_mode", "shortest")
        self.fill_color: float = preprocess_cfg.get("fill_color", 0) / 255.0
        self.freeze()
        self.embed_dim: int = int(self.encode_texts([""]).shape[1])

    @classmethod
    def from_config(cls, cfg: FeatureConfig, weights_dir: Path | None, device: torch.device) -> CLIPEncoder:
        if cfg.random_init:
            with seeded(cfg.seed), _quiet_open_clip():
                model = open_clip.create_model(cfg.clip_model, device="cpu")
            checksum, where = random_init_checksum(cfg.seed, cfg.random_size), f"open_clip model {cfg.clip_model}"
        else:
            path = require_file(weights_folder(weights_dir, "CLIP") / cfg.clip_checkpoint, "CLIP checkpoint")
            model = _load_open_clip(cfg.clip_model, path, cfg.clip_torchscript)
            checksum, where = sha256_file(path), str(path)
            sidecar = path.parent / "open_clip_config.json"
            config_checksum = sha256_configs(sidecar) if sidecar.is_file() else None
        dtype = half_dtype(cfg.half, device)
        model = model.to(device=device, dtype=dtype)
        preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
        encoder = cls(model, open_clip.get_tokenizer(cfg.clip_model), preprocess_cfg, cfg.frame_batch, checksum)
        if not cfg.random_init:
            encoder.config_checksum = config_checksum
        if encoder.embed_dim != cfg.embed_dim:
            raise ValueError(f"{where}: CLIP embedding size is {encoder.embed_dim}, the config says "
                             f"embed_dim={cfg.embed_dim}")
        return encoder

    @torch.inference_mode()
    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> normalised (N, 3, h, w) in the model's dtype, as open_clip's eval transform does.

        open_clip (transform.py, image_transform with is_train=False): resize ('shortest': the short side to the
        model size, then centre crop; 'longest': the long side, then centre pad with fill_color; 'squash': both
        sides), ToTensor (/255), Normalize(mean, std). Done here as batched tensor ops with antialiasing, which
        matches the PIL path up to uint8 rounding.
        """
        height, width = self.image_size
        x = TF.to_dtype(frames.to(self.device).permute(0, 3, 1, 2), torch.float32, scale=True)
        h, w = x.shape[-2:]
        if self.resize_mode == "squash":
            x = TF.resize(x, [height, width], self.interpolation, antialias=True)
        elif self.resize_mode == "longest":
            scale = min(height / h, width / w)
            x = TF.resize(x, [max(1, round(h * scale)), max(1, round(w * scale))], self.interpolation, antialias=True)
            pad_h, pad_w = height - x.shape[-2], width - x.shape[-1]
            x = TF.pad(x, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=self.fill_color)
        else:  # 'shortest'
            if height == width:  # torchvision's Resize(int): short side -> size, long side truncated
                x = TF.resize(x, [height], self.interpolation, antialias=True)
            else:  # timm's ResizeKeepRatio: cover the target box, keep the aspect ratio
                scale = max(height / h, width / w)
                x = TF.resize(x, [round(h * scale), round(w * scale)], self.interpolation, antialias=True)
            x = TF.center_crop(x, [height, width])
        x = x.clamp(0.0, 1.0)  # bicubic overshoots; the PIL path clips to the uint8 range
        return ((x - self.mean) / self.std).to(self.dtype)

    @torch.inference_mode()
    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) frames -> (N, D) float32 image embeddings, at most `cfg.frame_batch` frames per pass
        (fewer after CUDA ran out of memory: `AdaptiveBatch`)."""
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8 (N, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
        out = self.batches.map(frames.shape[0], lambda part: self.model.encode_image(
            self.preprocess(frames[part])).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Strings -> (N, D) float32 text embeddings (open_clip tokenizer, its context length); [] -> (0, D)."""
        if not texts:
            return torch.zeros(0, self.embed_dim)
        out = [self.model.encode_text(self.tokenizer(texts[part]).to(self.device)).float().cpu()
               for part in chunks(len(texts), self.batch)]
        return torch.cat(out)


def _preprocess_cfg_problem(cfg: dict[str, Any]) -> str | None:
    """What is wrong with an open_clip `preprocess_cfg` from a sidecar file (None: nothing): mean and std three
    finite numbers (std positive), size an int or a pair of them, the interpolation and resize mode strings."""
    for key in ("mean", "std"):
        value = cfg.get(key)
        if value is None:
            continue
        if (not isinstance(value, (list, tuple)) or len(value) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in value)):
            return f"{key} must be three numbers, got {value!r}"
        if key == "std" and min(value) <= 0:
            return f"std must be positive, got {value!r}"
    size = cfg.get("size")
    sizes = size if isinstance(size, (list, tuple)) else [size]
    if size is not None and (len(sizes) not in (1, 2) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                 and v > 0 for v in sizes)):
        return f"size must be a positive int or a pair of them, got {size!r}"
    for key in ("interpolation", "resize_mode"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            return f"{key} must be a string, got {cfg[key]!r}"
    return None


def _load_open_clip(model_name: str, path: Path, torchscript: bool = False) -> nn.Module:
    """Build `model_name` with open_clip and load the checkpoint at `path` into it (strict).

    No code from the file runs unless `torchscript` is set: safetensors files are plain tensors, and other files
    go through `torch.load(weights_only=True)`, which refuses any pickled object that is not a tensor or a plain
    container. A file refused that way, or a TorchScript archive without `torchscript`, is a ValueError naming
    the file and the reason. With `torchscript` (OpenAI's original files, which the user trusts) the file goes to
    `torch.jit.load` itself, never to a general unpickler, so a file that is not TorchScript is refused.

    OpenAI's weights need QuickGELU: a TorchScript (OpenAI) file always gets it; otherwise an
    `open_clip_config.json` next to the checkpoint (as open_clip's hub folders ship it) supplies `quick_gelu` and
    the `preprocess_cfg` (mean/std/interpolation) the weights were trained with. Without one, the registered model
    config and open_clip's default (OpenAI) preprocessing apply.
    """
    quick_gelu = torchscript
    preprocess_cfg: dict[str, Any] = {}
    sidecar = path.parent / "open_clip_config.json"
    if sidecar.is_file():
        try:
            side = json.loads(sidecar.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{sidecar}: not valid JSON ({error})") from None
        model_cfg = side.get("model_cfg", {}) if isinstance(side, dict) else None
        side_preprocess = side.get("preprocess_cfg", {}) if isinstance(side, dict) else None
        if not isinstance(model_cfg, dict) or not isinstance(side_preprocess, dict):
            raise ValueError(f"{sidecar}: expected an object with 'model_cfg' and 'preprocess_cfg' objects")
        preprocess_cfg = side_preprocess
        problem = _preprocess_cfg_problem(preprocess_cfg)
        if problem:
            raise ValueError(f"{sidecar}: preprocess_cfg {problem}")
        quick_gelu = quick_gelu or bool(model_cfg.get("quick_gelu", False))
    with _quiet_open_clip():
        model = open_clip.create_model(model_name, device="cpu", force_quick_gelu=quick_gelu,
                                       force_preprocess_cfg=preprocess_cfg)
    problem = weight_file_problem(path)  # empty, cut short: said as such (an empty .pt read as a refused pickle)
    if problem:
        raise ValueError(f"{path}: {problem}")
    if torchscript:
        _load_torchscript_state(model, model_name, path)
        return model
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TorchScript archive")
            state = open_clip.factory.load_state_dict(str(path), weights_only=True)
        state = _open_clip_layout(model, state)
    except SafetensorError as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
    except (pickle.UnpicklingError, EOFError) as error:
        reason = str(error).split(".")[0] or type(error).__name__
        raise ValueError(f"{path}: refused, not a plain tensor checkpoint (loading it would run code from the file; "
                         f"{reason})") from None
    except RuntimeError as error:
        if _looks_like_torchscript(path):  # torch.load refuses TorchScript with weights_only=True
            raise ValueError(_TORCHSCRIPT_REFUSED.format(path=path)) from None
        raise ValueError(f"{path}: not a readable checkpoint ({' '.join(str(error).split())[:300]})") from None
    except (StopIteration, AttributeError, TypeError, KeyError):  # an empty file of tensors, a list, ...
        raise ValueError(f"{path}: holds no state dict of tensors (a CLIP checkpoint maps names to tensors)") from None
    problem = state_dict_problem(model, state)
    if problem:
        raise ValueError(f"{path}: checkpoint does not fit open_clip model {model_name} ({problem}; another CLIP "
                         "variant, or a damaged file)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:  # missing/unexpected keys
        details = " ".join(str(error).split())
        raise ValueError(f"{path}: checkpoint does not fit open_clip model {model_name} ({details[:300]})") from None
    return model


def _open_clip_layout(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """A state dict in the names and scalar shapes of `model`, as open_clip's `load_checkpoint` converts it (third
    party layouts, the older text-tower names, logit_scale/logit_bias as scalar or 1-d, position ids that newer
    text towers do not keep), but without its interpolation of positional embeddings of another length: a
    checkpoint of another image size or context length is another model, refused by `state_dict_problem`."""
    state = open_clip.factory.convert_state_dict(model, state)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = open_clip.factory.convert_to_custom_text_state_dict(state)
    for name in ("logit_scale", "logit_bias"):
        own = getattr(model, name, None)
        if name in state and isinstance(own, torch.Tensor) and own.ndim != state[name].ndim and state[name].numel() == 1:
            state[name] = state[name].reshape(own.shape)
    if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None:
        state["logit_bias"] = torch.zeros_like(state["logit_scale"])
    position_ids = "text.transformer.embeddings.position_ids"
    if position_ids in state and not hasattr(model, position_ids):
        del state[position_ids]
    return state


_TORCHSCRIPT_REFUSED = ("{path}: a TorchScript archive (OpenAI's original CLIP format); loading one executes code from "
                        "the file, so it is only done with --clip-torchscript: pass it if you trust this file")


def _load_torchscript_state(model: nn.Module, model_name: str, path: Path) -> None:
    """Copy the weights of the TorchScript archive at `path` into `model` (`clip_torchscript` only).

    Its state dict also holds non-persistent buffers (attn_mask) and OpenAI's scalars: loaded non-strict, then
    every parameter and persistent buffer is checked to have come from the file."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated", category=FutureWarning)
            scripted = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as error:
        details = " ".join(str(error).split())
        raise ValueError(f"{path}: not a TorchScript archive, as --clip-torchscript says it is ({details[:200]})") from None
    state = {k: v for k, v in scripted.state_dict().items() if k not in ("input_resolution", "context_length", "vocab_size")}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        details = " ".join(str(error).split())
        raise ValueError(f"{path}: checkpoint does not fit open_clip model {model_name} ({details[:300]})") from None
    non_persistent = {name for name, _ in model.named_buffers()} - set(model.state_dict())
    wrong = list(result.missing_keys) + [k for k in result.unexpected_keys if k not in non_persistent]
    if wrong:
        raise ValueError(f"{path}: checkpoint does not fit open_clip model {model_name} "
                         f"(missing or unexpected: {', '.join(wrong[:5])})")


# ----------------------------------------------------------------------------------- Grounding DINO + SAM
def tiny_bert_tokenizer() -> BertTokenizer:
    """WordPiece tokenizer on the shipped vocab (transformers 5: BertTokenizer is the fast, tokenizers-backed one;
    BertTokenizerFast is an alias of it)."""
    vocab = {token: index for index, token in enumerate(TINY_BERT_VOCAB.read_text().splitlines())}
    return BertTokenizer(vocab=vocab, do_lower_case=True)


@dataclass(frozen=True)
class GroundingPrompt:
    """One clip's Grounding DINO prompt "noun1 . noun2 ." as token ids, and each noun's token positions."""

    input_ids: list[int]
    spans: list[list[int]]  # spans[k]: indices into input_ids of noun k's tokens (empty if truncated away)


@dataclass(frozen=True)
class Detections:
    """One clip's grounding, per frame t and noun k: p_tk = detector_tk * iou_tk.

    detector: (T, K) d_tk, Grounding DINO's score of noun k's best box (before SAM): what the object threshold
        applies to, as Grounding DINO's own `box_threshold` does.
    iou: (T, K) SAM's predicted IoU of that box's mask, clamped to [0, 1]; ones without SAM and where d_tk is
        below the SAM floor (`sam_refined`).
    """

    detector: torch.Tensor
    iou: torch.Tensor

    @property
    def probs(self) -> torch.Tensor:
        """(T, K) p_tk: the probability that noun k is seen in frame t."""
        return self.detector * self.iou


_STORED = torch.from_numpy(np.zeros(0, FEATURE_DTYPE)).dtype  # how shards store the detector score


def sam_refined(scores: torch.Tensor, floor: float) -> torch.Tensor:
    """Which detector scores d_tk SAM refines (bool, the shape of `scores`): d >= floor, as computed or as stored.

    The object threshold applies to the score as a shard stores it (float16: `shards.conditions.detector_scores`),
    and rounding can lift a score just under the floor onto it (0.34999 -> 0.35010); such a score is refined too.
    So every score left unrefined is below every threshold >= floor once stored, and counts 0 in Eq. (1) there:
    with iou 1.0 in place of SAM's, no object embedding at such a threshold changes. floor 0 refines every score
    (sigmoids are >= 0)."""
    return (scores >= floor) | (scores.to(_STORED).float() >= floor)


def sam_processor_problem(processor: Any, image_size: int) -> str | None:
    """Why a SAM image processor cannot feed a SAM whose image encoder takes `image_size` pixels (None: it can): a
    padded size or longest edge of another size (the model refuses every image, a traceback in the first batch), or
    a mean and deviation that are not three numbers each."""
    pad = getattr(processor, "pad_size", None)
    pad_size = (getattr(pad, "height", None), getattr(pad, "width", None)) if pad is not None else (None, None)
    longest = getattr(getattr(processor, "size", None), "longest_edge", None)
    if pad_size != (image_size, image_size) or longest != image_size:
        return (f"pads images to {pad_size[0]}x{pad_size[1]} (longest edge {longest}), where the model takes "
                f"{image_size}x{image_size}")
    for name in ("image_mean", "image_std"):
        value = getattr(processor, name, None)
        if not (isinstance(value, (list, tuple)) and len(value) == 3
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            return f"has {name} {value!r}, not three numbers"
    return None


class Grounder(_Batched, FrozenModule):
    """p_tk: the probability that caption noun k is seen in frame t (Grounding DINO, optionally times SAM's IoU).

    For each frame and noun, the score of a detection query is its highest sigmoid logit over the noun's tokens;
    the detector score d_tk is the highest score over all queries (no threshold: the object threshold is applied
    when loading). With SAM, the box of that best query prompts SAM, and p_tk = d_tk * SAM's predicted IoU of the
    resulting mask (clamped to [0, 1]), so a box that does not outline one object counts less; without SAM
    p_tk = d_tk. `detections` returns both factors, `probabilities` their product.

    sam_floor: SAM only refines scores d_tk >= sam_floor (`sam_refined`); the others keep iou 1.0, which changes
    no object embedding at an object threshold >= sam_floor, and cost no SAM work (a frame without such a score
    is not sent to SAM at all). 0 refines everything.

    static_shapes: every pass gets one of a few input shapes, so that a compiled detector and SAM image encoder
    (`compile_models`) build each once and never again: frames are padded (bottom and right, masked, as Grounding
    DINO pads a batch of mixed sizes) to a fixed canvas, `image_size`'s short x long side turned to the frame's
    orientation, and frames of the two orientations never share a pass; a pass's frame count is padded to a
    multiple of a quarter of the frame batch, and its prompt length to a power of two (at least 16), with copies
    of its last frame and prompt whose results are dropped. Padding the prompt and the frame count changes no
    result beyond float rounding; the canvas adds border pixels that Grounding DINO's backbone sees (as for any
    frame batched with a larger one), so scores move slightly against an unpadded frame.
    """

    config_checksum: str | None = None  # of the folders' config, processor and tokenizer files (random init: None)
    _warned_cut = False  # a prompt past the text encoder's length was said once (`prompt`)

    def __init__(self, detector: GroundingDinoForObjectDetection, image_processor: GroundingDinoImageProcessor,
                 tokenizer: Any, image_size: dict[str, int], sam: SamModel | None,
                 sam_image_processor: SamImageProcessor | None, batch: int, checksum: str,
                 sam_floor: float = 0.0, static_shapes: bool = False) -> None:
        super().__init__()
        if not 0.0 <= sam_floor <= 1.0:
            raise ValueError(f"sam_floor must be in [0, 1], got {sam_floor!r}")
        self.sam_floor = sam_floor
        self.static_shapes = static_shapes
        self.detector = detector
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.sam = sam
        self.sam_image_processor = sam_image_processor
        self.batches = AdaptiveBatch(batch, "Grounding DINO" + (" + SAM" if sam is not None else ""))
        # estimate, proportional to the input's pixels, plus SAM's dense bias unless folded (see GROUNDING_GIB_PER_...)
        self.gib_per_frame = GROUNDING_GIB_PER_MEGAPIXEL * image_size["shortest_edge"] * image_size["longest_edge"] / 1e6
        if sam is not None and not any(isinstance(m, FoldedRelPosAttention) for m in sam.modules()):
            self.gib_per_frame += SAM_BIAS_GIB_PER_FRAME
        self.checksum = checksum
        self.freeze()

    @classmethod
    def from_config(cls, cfg: FeatureConfig, weights_dir: Path | None, device: torch.device) -> Grounder:
        image_size = {"shortest_edge": cfg.grounding_short_side, "longest_edge": cfg.grounding_long_side}
        sam: SamModel | None = None
        sam_image_processor: SamImageProcessor | None = None
        if cfg.random_init:
            configs = random_configs(cfg.random_size)
            # the shipped vocab keeps bert-base-uncased's ids for the tokens it has, so it also feeds the
            # 30522-word embedding of the paper-size model (its words split into more pieces than BERT's)
            tokenizer = tiny_bert_tokenizer()
            if len(tokenizer) > configs.grounding.text_config.vocab_size:
                raise ValueError(f"{TINY_BERT_VOCAB}: {len(tokenizer)} tokens do not fit the {cfg.random_size} "
                                 f"Grounding DINO's vocabulary of {configs.grounding.text_config.vocab_size}")
            with seeded(cfg.seed):
                detector = GroundingDinoForObjectDetection(configs.grounding)
            image_processor = GroundingDinoImageProcessor(size=image_size)
            if cfg.use_sam:
                with seeded(cfg.seed):
                    sam = SamModel(configs.sam)
                    # SAM's IoU head is a regression; at HF's small init it predicts ~0, which the clamp would
                    # turn into p = 0 everywhere. Centre the random model's predictions inside [0, 1] instead.
                    nn.init.constant_(sam.mask_decoder.iou_prediction_head.proj_out.bias, 0.5)
                side = configs.sam_image_size
                sam_image_processor = SamImageProcessor(size={"longest_edge": side},
                                                        pad_size={"height": side, "width": side})
            checksum = random_init_checksum(cfg.seed, cfg.random_size)
        else:
            root = weights_folder(weights_dir, "Grounding DINO")
            folder = require_model_dir(root / cfg.grounding_dir, "Grounding DINO")
            processor = load_pretrained_parts(GroundingDinoProcessor.from_pretrained, folder, "Grounding DINO processor")
            image_processor, tokenizer = processor.image_processor, processor.tokenizer
            detector = load_pretrained_model(GroundingDinoForObjectDetection.from_pretrained, folder, "Grounding DINO")
            digests = [f"grounding-dino:{sha256_dir(folder)}"]
            config_digests = [f"grounding-dino:{sha256_configs(folder)}"]
            if cfg.use_sam:
                sam_folder = require_model_dir(root / cfg.sam_dir, "SAM")
                sam = load_pretrained_model(SamModel.from_pretrained, sam_folder, "SAM")
                sam_image_processor = load_pretrained_parts(SamProcessor.from_pretrained, sam_folder,
                                                            "SAM processor").image_processor
                problem = sam_processor_problem(sam_image_processor, sam.config.vision_config.image_size)
                if problem:
                    raise ValueError(f"{sam_folder}: its preprocessor config {problem}; give the folder's own "
                                     "processor files")
                digests.append(f"sam:{sha256_dir(sam_folder)}")
                config_digests.append(f"sam:{sha256_configs(sam_folder)}")
            checksum = hashlib.sha256("\n".join(digests).encode()).hexdigest()
            _check_grounding_tokenizer(tokenizer, detector, folder)
            if cfg.preset == "paper":
                _warn_if_not_the_papers(detector, sam, root / cfg.grounding_dir, root / cfg.sam_dir)
        if sam is not None and cfg.sam_rel_pos == "folded":
            use_folded_rel_pos(sam)
        if cfg.deformable_attention == "triton":
            from preprocess import deformable

            if not (deformable.available() and (device.type == "cuda" or deformable.INTERPRETED)):
                raise deformable.KernelError(
                    "deformable_attention 'triton' needs a CUDA device and the triton package "
                    f"({'no triton' if deformable.triton is None else f'device {device}'})", PYTORCH_HINT)
            try:
                deformable.check_kernel(device, half_dtype(cfg.half, device), deformable.kernel_layouts(detector.config))
            except deformable.KernelError as error:
                raise deformable.KernelError(error.reason, PYTORCH_HINT) from None
            deformable.use_fused_deformable_attention(detector)
        problem = text_positions_problem(detector)
        if problem:  # features still made, but not comparable with other versions': said once per build
            log.warning("transformers %s: %s", getattr(transformers, "__version__", "?"), problem)
        grounder = cls(detector, image_processor, tokenizer, image_size, sam, sam_image_processor, cfg.frame_batch,
                       checksum, sam_floor=cfg.sam_floor, static_shapes=cfg.compile)
        grounder = grounder.to(device=device, dtype=half_dtype(cfg.half, device))
        if not cfg.random_init:  # the folders' config, processor and tokenizer files (`sha256_configs`)
            grounder.config_checksum = hashlib.sha256("\n".join(config_digests).encode()).hexdigest()
        if cfg.compile:
            grounder.compile_models()
        return grounder

    def compile_models(self) -> None:
        """`torch.compile` Grounding DINO and SAM's image encoder in place (state-dict keys unchanged), each for
        fixed shapes, and turn `static_shapes` on so that passes come in a few shapes: every new one compiles
        (about a minute each on a GPU node, several on a CPU), on its first pass. SAM's prompt encoder and mask
        decoder (2 % of its FLOPs; their shapes follow the number of boxes) stay eager. The detector's text side
        has data-dependent loops and a size check that reads a tensor, so it runs in a few graphs with eager
        code between them."""
        import torch._dynamo

        self.static_shapes = True
        # frame-count buckets x prompt-length buckets x two orientations, x2 after out-of-memory halving
        for name in ("recompile_limit", "cache_size_limit"):  # torch >= 2.6 calls it recompile_limit
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
                break
        self.detector.compile(dynamic=False)
        if self.sam is not None:
            self.sam.vision_encoder.compile(dynamic=False)

    def _pass_size(self, count: int) -> int:
        """With static shapes, the frame count a pass of `count` (<= the batch) frames is padded to: the next
        multiple of a quarter of the current frame batch, at most the batch itself (so at most 5 sizes per batch
        size, and a tail pass wastes under a quarter)."""
        if not self.static_shapes:
            return count
        step = max(1, -(-self.batch // 4))
        return max(count, min(self.batch, -(-count // step) * step))

    def _fill(self, count: int) -> int:
        """How many copies of a pass's last frame pad its `count` frames to `_pass_size` (0 without static shapes);
        their results are dropped."""
        return self._pass_size(count) - count

    def _padded_size(self, frame_size: tuple[int, ...]) -> tuple[int, int]:
        """(height, width) of the detector input a frame of `frame_size` (height, width) becomes: the size Grounding
        DINO's processor resizes it to; with static shapes, the canvas of its orientation (`image_size`'s short x
        long side, turned when height > width), or larger where the processor's resize passes it (a frame whose
        short side already equals the rounded target is left as it is: 360 x 1334 stays so at 800 x 1333).
        `detections` runs only frames of one padded size together, so no frame is padded to a batch mate's."""
        short, long = self.image_size["shortest_edge"], self.image_size["longest_edge"]
        height, width = get_size_with_aspect_ratio((int(frame_size[0]), int(frame_size[1])), short, long)
        if not self.static_shapes:
            return height, width
        canvas = (short, long) if frame_size[0] <= frame_size[1] else (long, short)
        return max(height, canvas[0]), max(width, canvas[1])

    def prompt(self, nouns: Sequence[str]) -> GroundingPrompt:
        """Tokenise "noun1 . noun2 ." and find each noun's tokens through the fast tokenizer's offset mapping.

        A noun with nothing left once cleaned is left out of the text (its span is empty: it scores 0); so is a noun
        whose closing '.' falls past the text encoder's `max_text_len` tokens (a partly kept noun would be scored on
        some of its pieces), with one warning per process."""
        text, char_spans = "", []
        for noun in nouns:
            # lower case as Grounding DINO was trained; a '.' or '?' inside a noun (its phrase delimiters) would
            # split it into two phrases
            clean = " ".join(noun.lower().replace(".", " ").replace("?", " ").split())
            char_spans.append((len(text), len(text) + len(clean)))
            if clean:
                text += clean + " . "
        encoding = self.tokenizer(text.rstrip(), return_offsets_mapping=True, truncation=True,
                                  max_length=self.detector.config.max_text_len)
        offsets = encoding["offset_mapping"]
        kept = max((e for _, e in offsets), default=0)  # characters of the text the tokens cover
        spans = [[i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
                 if end > start and kept >= end + 2 else []  # its " ." kept
                 for start, end in char_spans]
        cut = [noun for noun, (start, end) in zip(nouns, char_spans) if end > start and kept < end + 2]
        if cut and not Grounder._warned_cut:
            Grounder._warned_cut = True
            log.warning("a Grounding DINO prompt is longer than its %d tokens: %d noun(s) left out (%s), scored 0",
                        self.detector.config.max_text_len, len(cut), ", ".join(cut[:3]))
        return GroundingPrompt(list(encoding["input_ids"]), spans)

    @torch.inference_mode()
    def detections(self, frames: list[torch.Tensor], nouns: list[list[str]]) -> list[Detections]:
        """frames[i]: uint8 (T_i, H_i, W_i, 3); nouns[i]: clip i's nouns -> per clip float32 (T_i, K_i) detector
        scores and IoUs in [0, 1].

        Frames of all clips that become detector inputs of one size are batched together (at most
        `cfg.frame_batch` per pass, fewer after CUDA ran out of memory: `AdaptiveBatch`), each with its own clip's
        prompt, right-padded and masked. No frame is padded to a larger batch mate's size (which would add border
        pixels to what the backbone sees), so a frame's scores do not depend on its batch mates beyond float
        rounding (the tests hold them to atol 1e-5, rtol 1e-4); with `static_shapes` every frame is padded to its
        orientation's canvas, whatever its batch mates. Clips
        without nouns get (T_i, 0) results and cost nothing. SAM then gets, of the pass's frames, those with a
        score at or above `sam_floor`, each with the boxes of those scores only; the other IoUs stay 1.0.
        """
        if len(frames) != len(nouns):
            raise ValueError(f"{len(frames)} clips of frames but {len(nouns)} noun lists")
        for clip in frames:
            if clip.ndim != 4 or clip.shape[-1] != 3 or clip.dtype != torch.uint8:
                raise ValueError(f"frames must be uint8 (T, H, W, 3), got {clip.dtype} {tuple(clip.shape)}")
        detector = [torch.zeros(clip.shape[0], len(words)) for clip, words in zip(frames, nouns)]
        iou = [torch.ones(clip.shape[0], len(words)) for clip, words in zip(frames, nouns)]
        prompts: list[GroundingPrompt | None] = [self.prompt(words) if words else None for words in nouns]
        jobs = [(i, t) for i, clip in enumerate(frames) if prompts[i] is not None for t in range(clip.shape[0])]

        def run(group: list[tuple[int, int]]) -> Callable[[slice], tuple[list[torch.Tensor], list[torch.Tensor] | None]]:
            def one_pass(part: slice) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
                images = [frames[i][t] for i, t in group[part]]
                scores, boxes = self._detect(images, [prompts[i] for i, _ in group[part]])  # type: ignore[misc]
                ious = None if self.sam is None else self._refined_iou(images, scores, boxes)
                return [score.float().cpu() for score in scores], ious
            return one_pass

        sizes = [self._padded_size(clip.shape[1:3]) for clip in frames]  # a clip's frames share their size
        groups: dict[tuple[int, int], list[tuple[int, int]]] = {}  # frames padded to one size: one group
        for i, t in jobs:
            groups.setdefault(sizes[i], []).append((i, t))
        for group in groups.values():
            start = 0
            for scores, ious in self.batches.map(len(group), run(group)):
                chunk, start = group[start: start + len(scores)], start + len(scores)
                for k, (i, t) in enumerate(chunk):
                    detector[i][t] = scores[k]
                    if ious is not None:
                        iou[i][t] = ious[k]
        return [Detections(d, u) for d, u in zip(detector, iou)]

    @torch.inference_mode()
    def probabilities(self, frames: list[torch.Tensor], nouns: list[list[str]]) -> list[torch.Tensor]:
        """Per clip float32 (T_i, K_i) p_tk in [0, 1]: the product of `detections`' two factors."""
        return [found.probs for found in self.detections(frames, nouns)]

    def _detect(self, images: list[torch.Tensor], prompts: list[GroundingPrompt]) -> tuple[list[torch.Tensor],
                                                                                     list[torch.Tensor]]:
        """Per image: (K,) noun probabilities and (K, 4) xyxy boxes (pixels of the input frame) of the best query."""
        real, extra = len(images), self._fill(len(images))
        if extra:  # static shapes
            scores, boxes = self._detect(images + images[-1:] * extra, prompts + prompts[-1:] * extra)
            return scores[:real], boxes[:real]
        if len(images) == 1 and self.image_size["shortest_edge"] < 128:
            # Grounding DINO's extra feature level is a GroupNorm over a (B, C, h, w) map with h = w = 1 for small
            # inputs (64 px: the tiny preset); with B = 1 and the tiny model's one channel per group, each group
            # then holds one value and GroupNorm refuses it. A batch of one is sent twice and the copy's result
            # dropped. (At 128 px and more the map is at least 2 px high.)
            scores, boxes = self._detect(images * 2, prompts * 2)
            return scores[:1], boxes[:1]
        pixels = self._pixels(images)
        length = max(len(p.input_ids) for p in prompts)
        if self.static_shapes:  # a power of two, at least 16 (prompts are cut at max_text_len already)
            length = max(length, min(self.detector.config.max_text_len, 1 << max(4, (length - 1).bit_length())))
        input_ids = torch.full((len(prompts), length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(len(prompts), length, dtype=torch.long)
        for b, prompt in enumerate(prompts):  # right padding, as the tokenizer pads a batch
            input_ids[b, : len(prompt.input_ids)] = torch.tensor(prompt.input_ids)
            attention_mask[b, : len(prompt.input_ids)] = 1
        out = self.detector(pixel_values=pixels["pixel_values"].to(self.device, self.dtype),
                            pixel_mask=pixels["pixel_mask"].to(self.device),
                            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                            token_type_ids=torch.zeros_like(input_ids).to(self.device))
        token_probs = out.logits[..., :length].float().sigmoid()  # (B, Q, L); padded tokens are -inf -> 0
        scores, boxes = [], []
        for b, prompt in enumerate(prompts):
            span_mask = torch.zeros(len(prompt.spans), length, dtype=torch.bool, device=self.device)
            for k, span in enumerate(prompt.spans):
                span_mask[k, span] = True
            # s_qk = max over noun k's tokens of sigmoid(logit_qj): (Q, K)
            per_query = torch.where(span_mask[None], token_probs[b, :, None, :], 0.0).amax(-1)
            best = per_query.argmax(0)  # (K,)
            scores.append(per_query.amax(0))
            # pred_boxes: (cx, cy, w, h) relative to the unpadded image (Deformable DETR's valid ratios)
            cx, cy, w, h = out.pred_boxes[b, best].float().unbind(-1)
            height, width = images[b].shape[:2]
            x0, x1 = ((cx - w / 2) * width).clamp(0, width), ((cx + w / 2) * width).clamp(0, width)
            y0, y1 = ((cy - h / 2) * height).clamp(0, height), ((cy + h / 2) * height).clamp(0, height)
            boxes.append(torch.stack([x0, y0, x1, y1], -1))  # (K, 4), inside the frame
        return scores, boxes

    def _pixels(self, images: list[torch.Tensor]) -> Any:
        """Grounding DINO's image processor on a pass's frames (resize, normalise, pad with a pixel mask): padded to
        the largest frame of the pass, or with static shapes to the canvas (`_padded_size`). A processor whose
        resize rounds a frame past the canvas (another transformers version) pads to the pass's largest frame
        instead, which costs a compilation of that shape but no frame."""
        kwargs = {"images": images, "size": self.image_size, "input_data_format": "channels_last",
                  "device": self.device, "return_tensors": "pt"}
        if self.static_shapes:
            sizes = [self._padded_size(image.shape[:2]) for image in images]
            canvas = {"height": max(h for h, _ in sizes), "width": max(w for _, w in sizes)}
            try:
                return self.image_processor(pad_size=canvas, **kwargs)
            except ValueError as error:
                if "Padding dimensions are negative" not in str(error):
                    raise
        return self.image_processor(**kwargs)

    def _refined_iou(self, images: list[torch.Tensor], scores: list[torch.Tensor],
                     boxes: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per image (K,) float32 IoUs on the CPU: SAM's, clamped to [0, 1], where `sam_refined`, else 1.0. One SAM
        pass over the images with at least one refined score, each prompted with those scores' boxes only."""
        keep = [sam_refined(score.float(), self.sam_floor) for score in scores]  # (K,) bool per image
        ious = [torch.ones(len(score)) for score in scores]
        sent = [b for b, k in enumerate(keep) if k.any()]
        if sent:
            refined = self._box_iou([images[b] for b in sent], [boxes[b][keep[b]] for b in sent])
            for b, u in zip(sent, refined):
                ious[b][keep[b].cpu()] = u.float().clamp(0.0, 1.0).cpu()
        return ious

    def _box_iou(self, images: list[torch.Tensor], boxes: list[torch.Tensor]) -> list[torch.Tensor]:
        """SAM's predicted IoU for one mask per box (multimask_output=False); all boxes of a frame in one prompt."""
        assert self.sam is not None and self.sam_image_processor is not None
        extra = self._fill(len(images))
        if extra:  # static shapes
            return self._box_iou(images + images[-1:] * extra, boxes + boxes[-1:] * extra)[:len(images)]
        inputs = self.sam_image_processor(images=images, input_data_format="channels_last", device=self.device,
                                          return_tensors="pt")
        # SAM's processor scales boxes by (resized / original) per axis; so do we, on the tensors it returns
        scale = (inputs["reshaped_input_sizes"] / inputs["original_sizes"]).to(self.device).float()  # (B, 2) h, w
        most = max(len(b) for b in boxes)
        # every frame needs the same number of boxes: repeat its first box and drop the repeats' outputs
        padded = torch.stack([torch.cat([b, b[:1].expand(most - len(b), 4)]) for b in boxes])  # (B, K, 4)
        padded = padded * scale[:, None, [1, 0, 1, 0]]
        out = self.sam(pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
                       input_boxes=padded.to(self.dtype), multimask_output=False)
        iou = out.iou_scores[..., 0].float()  # (B, K)
        return [iou[b, : len(box)] for b, box in enumerate(boxes)]


def _warn_if_not_the_papers(detector: GroundingDinoForObjectDetection, sam: SamModel | None, folder: Path,
                            sam_folder: Path) -> None:
    """A warning per model whose checkpoint is another variant than the paper preset's (Grounding DINO Swin-B for
    Swin-T, SAM ViT-H for ViT-B): it loads and works, and the checksum pins it for generation, but the features
    are not the paper's."""
    checks: list[tuple[str, Path, Any, Any, tuple[str, ...]]] = [
        ("Grounding DINO", folder, detector.config, model_configs.paper_grounding_dino_config(),
         model_configs.GROUNDING_DINO_VARIANT_FIELDS)]
    if sam is not None:
        checks.append(("SAM", sam_folder, sam.config, model_configs.paper_sam_config(), model_configs.SAM_VARIANT_FIELDS))
    for name, where, config, reference, fields in checks:
        differences = model_configs.variant_differences(config, reference, fields)
        if differences:
            log.warning("%s: this %s is not the paper preset's (%s): the features will not be the paper's",
                        where, name, "; ".join(differences[:3]))


def _check_grounding_tokenizer(tokenizer: Any, detector: GroundingDinoForObjectDetection, folder: Path) -> None:
    """Grounding DINO splits phrases at fixed token ids; a tokenizer with other ids would silently mix nouns."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{folder}: Grounding DINO needs a fast tokenizer (offset mapping); found {type(tokenizer)}")
    ids = tokenizer.convert_tokens_to_ids(list(GROUNDING_DELIMITERS))
    expected = _delimiter_ids(detector)
    if ids != expected:
        raise ValueError(f"{folder}: tokenizer ids of {GROUNDING_DELIMITERS} are {ids}, the model splits at {expected}")


def _delimiter_ids(detector: GroundingDinoForObjectDetection) -> list[int]:
    """The token ids Grounding DINO splits phrases at: the model's `special_tokens` buffer (transformers >= 5.24),
    else the module's SPECIAL_TOKENS, which earlier versions use directly."""
    buffer = getattr(detector.model, "special_tokens", None)
    if isinstance(buffer, torch.Tensor):
        return [int(i) for i in buffer.tolist()]
    return list(grounding_dino_modeling.SPECIAL_TOKENS)


# Text position ids of "[CLS] a b . c . d e . [SEP]" in the original Grounding DINO: each phrase counts from 0, its
# closing delimiter included; [CLS] and [SEP] get 0. transformers 5.17 gives each delimiter 0 instead.
_PROBE_IDS = [101, 2000, 2001, 1012, 2002, 1012, 2003, 2004, 1012, 102]
_ORIGINAL_POSITIONS = [0, 0, 1, 2, 0, 1, 0, 1, 2, 0]


def text_positions_problem(detector: GroundingDinoForObjectDetection) -> str | None:
    """Why this transformers' Grounding DINO numbers its text positions unlike the original model (None: it does as
    the original). Such a version scores every noun slightly differently, so features made with it do not match
    those of other versions."""
    make = grounding_dino_modeling.generate_masks_with_special_tokens_and_transfer_map
    ids = torch.tensor([_PROBE_IDS])
    try:
        if "special_tokens" in inspect.signature(make).parameters:
            _, positions = make(ids, special_tokens=torch.tensor(_delimiter_ids(detector)))
        else:
            _, positions = make(ids)
    except (TypeError, ValueError, RuntimeError) as error:
        return f"its text position ids could not be checked ({type(error).__name__}: {error})"
    got = [int(i) for i in positions[0].tolist()]
    if got == _ORIGINAL_POSITIONS:
        return None
    return (f"its Grounding DINO numbers the text positions of {_PROBE_IDS} as {got}, the original model as "
            f"{_ORIGINAL_POSITIONS}, so every detector score differs slightly from other versions' (transformers 4.57 "
            "and 5.24 number them as the original)")
