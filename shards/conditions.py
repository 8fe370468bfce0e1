"""The model's conditions: one row per condition, from the shard members it is made of to what the model takes.

| letter | name      | shard members         | shape per sample    | made in stage one by               | enters the model                |
|--------|-----------|-----------------------|---------------------|------------------------------------|---------------------------------|
| V      | `video`   | `clip.npy`            | (frames, embed_dim) | CLIP image tower, one per frame    | Linear, one key token per frame |
| O      | `objects` | `probs.npy`,          | (frames, embed_dim) | Grounding DINO score (+ SAM's IoU) | Eq. (1) on p_tk kept where the  |
|        |           | `detector.npy`,       |                     | p_tk; CLIP text tower e_k of each  | detector score passes the       |
|        |           | `nouns.npy`           |                     | noun                               | object threshold; Linear        |
| T      | `caption` | `caption.npy`         | (embed_dim,)        | CLIP text tower                    | Linear, one key token           |

The letter is the vocabulary of the training config (`inputs` "V+O", Tables III and IV of the paper), the name is
the key of the conditions dict the model, the trainer, evaluation and `vta-sam generate` pass around. Where a
condition enters (cross-attention key or added term) is the training config's `scheme` (`train.config.route`).
Every condition is derived from the stored raw features when loading (`sample_conditions`), so changing, say,
the object threshold needs no new shards. Adding a condition: one row here, its member in `shards.schema`, its
encoder in stage one.

The object threshold applies to Grounding DINO's score before SAM's IoU multiplies it (`detector.npy`, schema
version 2), as Grounding DINO's `box_threshold` does (IDEA-Research/GroundingDINO, groundingdino/util/inference.py:
`predict` keeps the boxes whose highest token score passes it; there the highest over all the prompt's tokens,
here d_tk, the best box's highest score on noun k's own tokens); p_tk itself stays the product. Below the SAM floor
the shards were made with, p_tk is the unrefined score (stage one sent SAM nothing there), so a threshold below the
floor counts those noun-frames unrefined (training says so). A version-1 sample has no detector score: the
threshold then applies to p_tk, with one warning per process.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from einops import einsum

from shards.schema import DETECTOR_KEY, FEATURE_DTYPE, PROBS_KEY, ShardSpec


def object_embedding(
    probs: torch.Tensor,
    nouns: torch.Tensor,
    noun_mask: torch.Tensor | None = None,
    threshold: float = 0.0,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. (1): O_t = sum_k p'_tk * e_k, with p'_tk = p_tk where s_tk >= threshold, else 0.

    probs: (..., T, K) probability p_tk that noun k is seen in frame t (Grounding DINO's score times SAM's IoU).
    nouns: (..., K, D) CLIP text embedding e_k of noun k.
    noun_mask: (..., K) True for real nouns, False for padding (batches of clips with different K).
    threshold: the object threshold (0 keeps every detection).
    scores: (..., T, K) s_tk, what the threshold applies to: Grounding DINO's score before SAM (`detector.npy`);
        None thresholds p_tk itself (version-1 shards).
    Returns O: (..., T, D). A clip with no nouns gets zeros.
    """
    p = probs.to(nouns.dtype)
    s = p if scores is None else scores.to(nouns.dtype)
    p = torch.where(s >= threshold, p, torch.zeros_like(p))
    if noun_mask is not None:
        p = p * noun_mask.unsqueeze(-2).to(p.dtype)
    return einsum(p, nouns, "... t k, ... k d -> ... t d")


def _float(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array, dtype=np.float32))


Arrays = Mapping[str, np.ndarray]


@functools.cache
def _warn_no_detector_scores() -> None:
    """Said once per process: every sample of a version-1 folder would say it again."""
    warnings.warn(f"a sample without {DETECTOR_KEY} (shard schema version 1): the object threshold applies to "
                  f"{PROBS_KEY} (the detector score times SAM's IoU) instead; run stage one again for version-2 "
                  "shards", UserWarning, stacklevel=4)


def detector_scores(arrays: Arrays, threshold: float) -> torch.Tensor | None:
    """What the object threshold applies to: the detector score as stored (float16, so that stage one's in-memory
    float32 features and a decoded shard keep the same frames), or None for a version-1 sample (p_tk itself; a
    warning when the threshold can make a difference, i.e. is above 0)."""
    if DETECTOR_KEY not in arrays:
        if threshold > 0:
            _warn_no_detector_scores()
        return None
    return _float(np.asarray(arrays[DETECTOR_KEY]).astype(FEATURE_DTYPE))


def _objects(arrays: Arrays, threshold: float) -> torch.Tensor:
    return object_embedding(_float(arrays[PROBS_KEY]), _float(arrays["nouns.npy"]), threshold=threshold,
                            scores=detector_scores(arrays, threshold))


@dataclass(frozen=True)
class Condition:
    """One row of the table above."""

    letter: str  # in the training config's `inputs`
    name: str  # key in the conditions dict
    members: tuple[str, ...]  # shard members it is derived from
    per_frame: bool  # (frames, embed_dim) per sample, else (embed_dim,): one key token
    encoder: str  # what makes its members in stage one
    projection: str  # how the model takes it
    derive: Callable[[Arrays, float], torch.Tensor]  # (a sample's arrays, object threshold) -> float32 tensor

    def shape(self, spec: ShardSpec) -> tuple[int, ...]:
        return (spec.num_frames, spec.embed_dim) if self.per_frame else (spec.embed_dim,)


CONDITIONS: tuple[Condition, ...] = (
    Condition("V", "video", ("clip.npy",), True, "CLIP image tower, one embedding per frame (zeros past the end)",
              "Linear to the cross-attention width; one key token per frame",
              lambda arrays, threshold: _float(arrays["clip.npy"])),
    Condition("O", "objects", (PROBS_KEY, DETECTOR_KEY, "nouns.npy"), True,
              "Grounding DINO's score (+ SAM's IoU): p_tk per frame and noun; CLIP text tower: e_k per noun",
              "Eq. (1) O_t = sum_k p_tk e_k over the nouns whose detector score passes the object threshold, "
              "then Linear to the cross-attention width; per frame",
              _objects),
    Condition("T", "caption", ("caption.npy",), False, "CLIP text tower, the whole caption",
              "Linear to the cross-attention width; one key token",
              lambda arrays, threshold: _float(arrays["caption.npy"])),
)
BY_LETTER: dict[str, Condition] = {c.letter: c for c in CONDITIONS}
CONDITION_NAMES: tuple[str, ...] = tuple(c.name for c in CONDITIONS)


def sample_conditions(arrays: Arrays, object_threshold: float = 0.0) -> dict[str, torch.Tensor]:
    """Every condition of one sample (its decoded arrays, or stage one's features of a window) as float32 tensors,
    by name; `object_threshold`: p_tk counts as 0 in Eq. (1) where the detector score is below it."""
    return {c.name: c.derive(arrays, object_threshold) for c in CONDITIONS}


def stack_conditions(samples: Sequence[Mapping[str, torch.Tensor]], device: torch.device | str = "cpu"
                     ) -> dict[str, torch.Tensor]:
    """The conditions of several samples (each a dict holding them by name) as one batch on `device`."""
    return {name: torch.stack([s[name] for s in samples]).to(device) for name in CONDITION_NAMES}
