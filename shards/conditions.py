"""The model's conditions: one row per condition, from the shard members it is made of to what the model takes.

| letter | name      | shard members            | shape per sample     | made in stage one by              | enters the model                  |
|--------|-----------|--------------------------|----------------------|-----------------------------------|-----------------------------------|
| V      | `video`   | `clip.npy`               | (frames, embed_dim)  | CLIP image tower, one per frame   | Linear, one key token per frame   |
| O      | `objects` | `probs.npy`, `nouns.npy` | (frames, embed_dim)  | Grounding DINO (+ SAM) p_tk; CLIP | Eq. (1), Linear, per frame        |
|        |           |                          |                      | text tower e_k of each noun       |                                   |
| T      | `caption` | `caption.npy`            | (embed_dim,)         | CLIP text tower                   | Linear, one key token             |

The letter is the vocabulary of the training config (`inputs` "V+O", Tables III and IV of the paper), the name is
the key of the conditions dict the model, the trainer, evaluation and `vta-sam generate` pass around. Where a
condition enters (cross-attention key or added term) is the training config's `scheme` (`train.config.route`).
Every condition is derived from the stored raw features when loading (`sample_conditions`), so changing, say,
the object threshold needs no new shards. Adding a condition: one row here, its member in `shards.schema`, its
encoder in stage one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from einops import einsum

from shards.schema import ShardSpec


def object_embedding(
    probs: torch.Tensor,
    nouns: torch.Tensor,
    noun_mask: torch.Tensor | None = None,
    threshold: float = 0.0,
) -> torch.Tensor:
    """Eq. (1): O_t = sum_k p_tk * e_k.

    probs: (..., T, K) probability that noun k is seen in frame t (Grounding DINO, refined by SAM).
    nouns: (..., K, D) CLIP text embedding e_k of noun k.
    noun_mask: (..., K) True for real nouns, False for padding (batches of clips with different K).
    threshold: probabilities below it count as 0 (the paper thresholds detections; ours is a knob).
    Returns O: (..., T, D). A clip with no nouns gets zeros.
    """
    p = probs.to(nouns.dtype)
    p = torch.where(p >= threshold, p, torch.zeros_like(p))
    if noun_mask is not None:
        p = p * noun_mask.unsqueeze(-2).to(p.dtype)
    return einsum(p, nouns, "... t k, ... k d -> ... t d")


def _float(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array, dtype=np.float32))


Arrays = Mapping[str, np.ndarray]


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
    Condition("O", "objects", ("probs.npy", "nouns.npy"), True,
              "Grounding DINO (+ SAM's IoU): p_tk per frame and noun; CLIP text tower: e_k per noun",
              "Eq. (1) O_t = sum_k p_tk e_k, then Linear to the cross-attention width; per frame",
              lambda arrays, threshold: object_embedding(_float(arrays["probs.npy"]), _float(arrays["nouns.npy"]),
                                                         threshold=threshold)),
    Condition("T", "caption", ("caption.npy",), False, "CLIP text tower, the whole caption",
              "Linear to the cross-attention width; one key token",
              lambda arrays, threshold: _float(arrays["caption.npy"])),
)
BY_LETTER: dict[str, Condition] = {c.letter: c for c in CONDITIONS}
CONDITION_NAMES: tuple[str, ...] = tuple(c.name for c in CONDITIONS)


def sample_conditions(arrays: Arrays, object_threshold: float = 0.0) -> dict[str, torch.Tensor]:
    """Every condition of one sample (its decoded arrays, or stage one's features of a window) as float32 tensors,
    by name; `object_threshold`: noun probabilities below it count as 0 in Eq. (1)."""
    return {c.name: c.derive(arrays, object_threshold) for c in CONDITIONS}


def stack_conditions(samples: Sequence[Mapping[str, torch.Tensor]], device: torch.device | str = "cpu"
                     ) -> dict[str, torch.Tensor]:
    """The conditions of several samples (each a dict holding them by name) as one batch on `device`."""
    return {name: torch.stack([s[name] for s in samples]).to(device) for name in CONDITION_NAMES}
