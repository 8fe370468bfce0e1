"""SAM's image-encoder attention with its relative positions folded into the query and key (stage one).

SAM's ViT adds decomposed relative positions to every attention logit (MViTv2):

    logit[i, j] = scale q_i . k_j + rel_h[i, row(j)] + rel_w[i, col(j)],
    rel_h[i, r] = q_i . R_h[row(i), r],   rel_w[i, c] = q_i . R_w[col(i), c]

transformers builds the sum rel_h + rel_w as a dense (frames, heads, tokens, tokens) bias and hands it to
`scaled_dot_product_attention` as a mask. In the four global-attention blocks of ViT-B that is 12 x 4096 x 4096
values per frame, 0.375 GiB in float16 (0.75 GiB in float32) written and read again in each of them: at stage
one's 64 frames per pass, one 24 GiB tensor. The same logits come out of
a plain dot product when each query carries [scale q_i, rel_h[i, :], rel_w[i, :]] and each key
[k_j, onehot(row(j)), onehot(col(j))]: the one-hot channels pick rel_h[i, row(j)] and rel_w[i, col(j)] out of the
query's extra channels. So SDPA runs without a mask on queries and keys of head_dim + height + width channels
(64 + 64 + 64 in the global blocks, 64 + 14 + 14 padded to 96 in the windowed ones), with scale 1, and the value
padded with zero channels to the same width: one head size for all three is what SDPA's fused flash kernels need
(with a narrower value it falls back to building the attention matrix, on the CPU at least). The wider heads cost
FLOPs: 3x the attention's in the global blocks, 1.5x in the windowed ones, against a bias tensor written and read
once per block. Whether that is faster depends on the device: `benchmarks/gpu.sh` measures it
(`stage_one.changes.sam_folded_rel_pos`, with peak memory), and `benchmarks/sam_attention.py` measures time and
memory of one block on any device (on the idle 2-core CPU of benchmarks/RESULTS.md, float32, one frame: 0.95x
the time in the global block and 0.86x in the windowed ones, and 1.3 GiB less peak memory in the global block).

The logits are the same sums, up to the order of float32 accumulation; the one rounding that differs is the query
scaled before the dot product instead of after (exact for head sizes that are powers of 4: ViT-B's 64).
`tests/test_sam_attention.py` compares it with transformers' attention and SAM's outputs.

`use_folded_rel_pos(sam)` swaps every attention module of SAM's image encoder; `use_transformers_rel_pos(sam)`
puts them back; `FeatureConfig.sam_rel_pos = "folded"` does it for stage one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FoldedRelPosAttention(nn.Module):
    """Drop-in for transformers' SamVisionAttention / SamVisionSdpaAttention (same forward and outputs: the
    attention's output and None for the weights), computing the same attention without a bias tensor."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, hidden_states: Tensor, output_attentions: bool = False) -> tuple[Tensor, None]:
        a: Any = self.attention  # transformers' module: qkv, proj, scale, rel_pos_h/w, get_rel_pos
        batch, height, width, _ = hidden_states.shape
        heads, tokens = a.num_attention_heads, height * width
        qkv = a.qkv(hidden_states).reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)  # (batch, heads, tokens, head_dim)
        if not a.use_rel_pos:
            out = F.scaled_dot_product_attention(query, key, value, scale=a.scale)
        else:
            grid = query.reshape(batch, heads, height, width, -1)
            rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid, a.get_rel_pos(height, height, a.rel_pos_h))
            rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid, a.get_rel_pos(width, width, a.rel_pos_w))
            rows = torch.arange(tokens, device=query.device) // width
            cols = torch.arange(tokens, device=query.device) % width
            picks = [F.one_hot(rows, height).to(query.dtype), F.one_hot(cols, width).to(query.dtype)]  # (tokens, .)
            channels = query.shape[-1] + height + width
            pad = -channels % 8  # SDPA's fused kernels want a multiple of 8 channels; zeros add nothing
            zeros = query.new_zeros(batch, heads, tokens, pad)
            query = torch.cat([query * a.scale, rel_h.reshape(batch, heads, tokens, height),
                               rel_w.reshape(batch, heads, tokens, width), zeros], -1)
            key = torch.cat([key, *(p.expand(batch, heads, tokens, -1) for p in picks), zeros], -1)
            # value padded with zero channels to the query's width: SDPA's fused kernels (flash on CUDA and on
            # the CPU) want one head size for all three, and without them it would build the attention matrix
            head_dim = value.shape[-1]
            value = F.pad(value, (0, query.shape[-1] - head_dim))
            out = F.scaled_dot_product_attention(query, key, value, scale=1.0)[..., :head_dim]
        out = out.reshape(batch, heads, height, width, -1).permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1)
        return a.proj(out), None


def use_folded_rel_pos(sam: Any) -> int:
    """Swaps the attention of every block of a transformers SamModel's image encoder for `FoldedRelPosAttention`;
    returns how many. Idempotent."""
    swapped = 0
    for layer in sam.vision_encoder.layers:
        if not isinstance(layer.attn, FoldedRelPosAttention):
            layer.attn = FoldedRelPosAttention(layer.attn)
            swapped += 1
    return swapped


def use_transformers_rel_pos(sam: Any) -> int:
    """Undoes `use_folded_rel_pos`; returns how many attention modules were put back."""
    restored = 0
    for layer in sam.vision_encoder.layers:
        if isinstance(layer.attn, FoldedRelPosAttention):
            layer.attn = layer.attn.attention
            restored += 1
    return restored
