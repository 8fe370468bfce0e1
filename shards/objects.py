"""The object embedding of VTA-SAM, derived from stored raw features when loading."""

from __future__ import annotations

import torch
from einops import einsum


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
