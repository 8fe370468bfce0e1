"""Grounding DINO's multi-scale deformable attention as one fused Triton kernel (stage one, CUDA).

transformers' Grounding DINO samples its deformable attention in PyTorch (`MultiScaleDeformableAttention`): for
each feature level a transposed copy of the value map, one `grid_sample` (bilinear, zero padding,
align_corners=False) that writes (batch x heads, head_dim, queries, points), then a stack over the levels, a
product with the attention weights and a sum. At the paper's 800 x 1333 input that is ~22k queries per frame, 8
heads x 4 levels x 4 points, in each of the 6 encoder layers: several passes over a (heads, 32, 22k, 16)
intermediate per layer and frame, and a gather per channel from a channel-first map. The fused kernel reads each
sampled value vector (the head's 32 channels, contiguous in the (batch, tokens, heads, head_dim) value tensor)
at the four corners around each sampling location and accumulates the weighted sum in float32; the output is
written once. transformers can fetch a compiled kernel for this from the `kernels` hub; a GPU node without
network cannot, which is what this module is for.

The result is the PyTorch path's up to rounding: the sampling locations are turned into grid coordinates as
`grid_sample` does (2 x - 1 in the input's dtype, then ((g + 1) size - 1) / 2 in float32), corners outside the
map count zero, and the sums run in float32 where the PyTorch path rounds each level's samples and the weighted
products to the input's dtype (float16 in stage one). `tests/test_deformable.py` compares the two through
Triton's interpreter on the CPU. Inference only: inputs that need a gradient take the PyTorch path.

`use_fused_deformable_attention(detector)` swaps the sampling module of every deformable attention layer (the
encoder's self-attention, the decoder's cross-attention); `FeatureConfig.deformable_attention = "triton"` does it
for stage one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch without triton: the PyTorch path only
    triton = None

# Queries per program (each program takes one (frame, head) and BLOCK_QUERIES of its queries) and warps per
# program. With the level and point loops left as loops (only the 4 corners unrolled) this compiles for sm_90 to
# 56 registers a thread at float16 (107 at float32) and no spills; unrolling every loop took 255 registers and
# spilled (tests/test_deformable.py compiles it for sm_90 on the CPU and checks).
BLOCK_QUERIES = 64
NUM_WARPS = 4

if triton is not None:

    @triton.jit(do_not_specialize=["num_queries", "num_tokens"])  # no recompile per frame size
    def _deformable_kernel(value_ptr, shapes_ptr, starts_ptr, locations_ptr, weights_ptr, out_ptr, num_queries,
                           num_tokens, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, LEVELS: tl.constexpr,
                           POINTS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[b, q, h * D + d] = sum over levels l and points p of weights[b, q, h, l, p] x the bilinear sample of
        value[b, start_l + (y * W_l + x), h, d] at locations[b, q, h, l, p] (x, y in [0, 1] of the level's map).
        All tensors contiguous; program (b * HEADS + h, query block)."""
        row = tl.program_id(0).to(tl.int64)  # b * HEADS + h
        batch, head = row // HEADS, row % HEADS
        queries = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        channels = tl.arange(0, BLOCK_D)
        query_ok = queries < num_queries
        channel_ok = channels < HEAD_DIM
        # (b, q, h) rows of locations / weights; the value rows of frame b, head h
        rows = (batch * num_queries + queries.to(tl.int64)) * HEADS + head
        value_base = value_ptr + batch * num_tokens * HEADS * HEAD_DIM + head * HEAD_DIM
        acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
        for level in range(LEVELS):
            height = tl.load(shapes_ptr + 2 * level).to(tl.int32)
            width = tl.load(shapes_ptr + 2 * level + 1).to(tl.int32)
            start = tl.load(starts_ptr + level).to(tl.int64)
            for point in range(POINTS):
                at = rows * (LEVELS * POINTS) + level * POINTS + point
                x = tl.load(locations_ptr + 2 * at, mask=query_ok, other=0.0)
                y = tl.load(locations_ptr + 2 * at + 1, mask=query_ok, other=0.0)
                weight = tl.load(weights_ptr + at, mask=query_ok, other=0.0).to(tl.float32)
                # grid_sample's coordinates: the grid 2 x - 1 in the input dtype, unnormalised in float32; held
                # within a pixel or two of the map (every corner is outside beyond that: zero, as grid_sample
                # gives) so that far-off locations cannot overflow the integer corners
                gx = (x * 2.0 - 1.0).to(x.dtype).to(tl.float32)
                gy = (y * 2.0 - 1.0).to(y.dtype).to(tl.float32)
                ix = tl.minimum(tl.maximum(((gx + 1.0) * width - 1.0) * 0.5, -2.0), width + 1.0)
                iy = tl.minimum(tl.maximum(((gy + 1.0) * height - 1.0) * 0.5, -2.0), height + 1.0)
                x0 = tl.floor(ix)
                y0 = tl.floor(iy)
                fx = ix - x0
                fy = iy - y0
                for corner in tl.static_range(4):
                    dx = corner % 2
                    dy = corner // 2
                    xi = x0.to(tl.int32) + dx
                    yi = y0.to(tl.int32) + dy
                    share = (fx * dx + (1.0 - fx) * (1 - dx)) * (fy * dy + (1.0 - fy) * (1 - dy))
                    inside = query_ok & (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
                    # the corner's token, held within the level where the corner is outside (the load is masked
                    # there); a clamp, not tl.where(inside, ...): Triton 3.6 and 3.7 fail to compile a 1-D select
                    # on `inside` next to its use as the 2-D load mask (TritonGPURemoveLayoutConversions)
                    token = start + tl.minimum(tl.maximum(yi * width + xi, 0), height * width - 1).to(tl.int64)
                    sampled = tl.load(value_base + token[:, None] * (HEADS * HEAD_DIM) + channels[None, :],
                                      mask=inside[:, None] & channel_ok[None, :], other=0.0)
                    acc += (weight * share)[:, None] * sampled.to(tl.float32)
        out = out_ptr + rows[:, None] * HEAD_DIM + channels[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=query_ok[:, None] & channel_ok[None, :])


class KernelError(ValueError):
    """The fused kernel cannot run here: no CUDA device or no triton, or Triton cannot build it, or it disagrees
    with the PyTorch path. One line: the reason (`reason`), then what to do about it (`hint`) when given."""

    def __init__(self, reason: str, hint: str = ""):
        super().__init__(f"{reason}; {hint}" if hint else reason)
        self.reason = reason
        self.hint = hint


# Triton's interpreter (TRITON_INTERPRET=1 when triton was imported) runs the kernel on CPU tensors, slowly: tests
INTERPRETED = triton is not None and type(_deformable_kernel).__name__ == "InterpretedFunction"


def available() -> bool:
    """Whether the fused kernel can run here: triton installed and a CUDA device (or its interpreter)."""
    return triton is not None and (torch.cuda.is_available() or INTERPRETED)


def fused_deformable_attention(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                               sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """The fused sampling: value (B, tokens, heads, head_dim), spatial_shapes (levels, 2) as (height, width),
    level_start_index (levels,), sampling_locations (B, queries, heads, levels, points, 2) as (x, y) in [0, 1],
    attention_weights (B, queries, heads, levels, points) -> (B, queries, heads * head_dim) in value's dtype.
    CUDA tensors; CPU tensors in Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported)."""
    if triton is None:
        raise KernelError("the fused deformable attention needs the triton package")
    batch, tokens, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    if tuple(spatial_shapes.shape) != (levels, 2) or tuple(attention_weights.shape) != (batch, queries, heads, levels, points):
        raise ValueError(f"deformable attention: shapes do not agree (value {tuple(value.shape)}, locations "
                         f"{tuple(sampling_locations.shape)}, weights {tuple(attention_weights.shape)}, "
                         f"spatial shapes {tuple(spatial_shapes.shape)})")
    out = torch.empty(batch, queries, heads * head_dim, dtype=value.dtype, device=value.device)
    if out.numel() == 0:
        return out
    grid = (batch * heads, triton.cdiv(queries, BLOCK_QUERIES))
    # Triton launches on the current CUDA device: make it the tensors' (a torchrun rank's cuda:N)
    on_device = torch.cuda.device(value.device) if value.is_cuda else contextlib.nullcontext()
    with on_device:
        _deformable_kernel[grid](value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
                                 sampling_locations.contiguous(), attention_weights.contiguous(), out, queries, tokens,
                                 HEADS=heads, HEAD_DIM=head_dim, LEVELS=levels, POINTS=points, BLOCK_Q=BLOCK_QUERIES,
                                 BLOCK_D=triton.next_power_of_2(head_dim), num_warps=NUM_WARPS)
    return out


class FusedDeformableSampling(nn.Module):
    """Drop-in for transformers' `MultiScaleDeformableAttention` (the sampling step of a deformable attention
    layer, same forward arguments): the fused kernel on CUDA, the wrapped PyTorch module where the kernel cannot
    run (CPU tensors, inputs that need a gradient)."""

    def __init__(self, reference: nn.Module) -> None:
        super().__init__()
        self.reference = reference

    def forward(self, value: Tensor, value_spatial_shapes: Tensor, value_spatial_shapes_list: list[tuple[int, int]],
                level_start_index: Tensor, sampling_locations: Tensor, attention_weights: Tensor,
                im2col_step: int) -> Tensor:
        needs_grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in (value, sampling_locations, attention_weights))
        if needs_grad or not (value.is_cuda or INTERPRETED):
            return self.reference(value, value_spatial_shapes, value_spatial_shapes_list, level_start_index,
                                  sampling_locations, attention_weights, im2col_step)
        return fused_deformable_attention(value, value_spatial_shapes, level_start_index, sampling_locations,
                                          attention_weights)


def use_fused_deformable_attention(detector: nn.Module) -> int:
    """Swaps the sampling module (`.attn`) of every deformable attention layer of a transformers Grounding DINO
    (or Deformable DETR) for `FusedDeformableSampling`; returns how many were swapped. Idempotent."""
    if triton is None:
        raise KernelError("the fused deformable attention needs the triton package (pip install triton)")
    swapped = 0
    for module in detector.modules():
        sampling = getattr(module, "attn", None)
        if isinstance(sampling, nn.Module) and type(sampling).__name__ == "MultiScaleDeformableAttention":
            module.attn = FusedDeformableSampling(sampling)
            swapped += 1
    return swapped


def kernel_layouts(config: Any) -> list[tuple[int, int, int, int]]:
    """The (heads, head_dim, levels, points) variants of the kernel that a transformers Grounding DINO (or
    Deformable DETR) config runs: its encoder's self-attention and its decoder's cross-attention."""
    return sorted({(heads, config.d_model // heads, config.num_feature_levels, points)
                   for heads, points in ((config.encoder_attention_heads, config.encoder_n_points),
                                         (config.decoder_attention_heads, config.decoder_n_points))})


def check_kernel(device: torch.device, dtype: torch.dtype,
                 layouts: Iterable[tuple[int, int, int, int]] = ((8, 32, 4, 4),)) -> None:
    """Compiles and runs each (heads, head_dim, levels, points) variant of the kernel (`kernel_layouts`) once on a
    small random input on `device` in `dtype` and compares it with the PyTorch path, so that a machine where
    Triton cannot build it (no C compiler, an unsupported GPU) fails at start-up in one line, not in the middle of
    a run. KernelError if it cannot run or disagrees."""
    from transformers.models.grounding_dino.modeling_grounding_dino import MultiScaleDeformableAttention

    for heads, head_dim, levels, points in layouts:
        generator = torch.Generator().manual_seed(0)
        sizes = ([(6, 7), (3, 4), (2, 2)] + [(1, 1)] * levels)[:levels]
        shapes = torch.tensor(sizes)
        starts = torch.tensor([0] + [h * w for h, w in sizes]).cumsum(0)[:-1]
        value = torch.randn(2, sum(h * w for h, w in sizes), heads, head_dim, generator=generator)
        locations = torch.rand(2, 9, heads, levels, points, 2, generator=generator) * 1.2 - 0.1
        weights = torch.randn(2, 9, heads, levels * points, generator=generator).softmax(-1)
        weights = weights.view(2, 9, heads, levels, points)
        # the reference on the inputs as the kernel gets them (rounded to dtype), in float32
        inputs = [t.to(dtype).float() for t in (value, locations, weights)]
        expected = MultiScaleDeformableAttention()(inputs[0], shapes, sizes, starts, inputs[1], inputs[2], 64)
        try:
            got = fused_deformable_attention(value.to(device, dtype), shapes.to(device),
                                             starts.to(device), locations.to(device, dtype), weights.to(device, dtype))
            difference = (got.float().cpu() - expected).abs().max().item()
        except Exception as error:  # noqa: BLE001 - any failure to build or run the kernel is reported the same way
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise KernelError(f"the fused deformable attention kernel does not run on {device} "
                               f"({type(error).__name__}: {first[:200]})") from None
        tolerance = 1e-4 if dtype == torch.float32 else 1e-2
        if not difference <= tolerance:
            raise KernelError(f"the fused deformable attention kernel differs from the PyTorch path by "
                               f"{difference:.3g} on {device} ({dtype}, {heads} heads of {head_dim}, {levels} levels, "
                               f"{points} points)")


def use_pytorch_deformable_attention(detector: nn.Module) -> int:
    """Undoes `use_fused_deformable_attention`: puts back the PyTorch sampling modules; returns how many."""
    restored = 0
    for module in detector.modules():
        sampling = getattr(module, "attn", None)
        if isinstance(sampling, FusedDeformableSampling):
            module.attn = sampling.reference
            restored += 1
    return restored
