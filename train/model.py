"""The VTA-SAM denoiser: Tango's Transformer UNet over the AudioLDM latent, conditioned as in Eq. (4).

The latent z: (B, 8, 256, 16) is an image with H = time (10.24 s) and W = frequency. Every Transformer
block of the diffusers `UNet2DConditionModel` is self-attention, cross-attention, feed-forward. Eq. (4):

    h <- h + Attention(Q = h, K = V = keys) + Linear_l(added aligned to the token grid of h)

`train.config.route(inputs, scheme)` decides which conditions are `keys` and which one is `added`; with the default
Z@V+O, the keys are the projected CLIP frames V and the added term is the object embedding O (Eq. (1)).
The added term enters through a custom attention processor on every `attn2`; diffusers passes it the
`cross_attention_kwargs` its `__call__` names (diffusers/models/attention_processor.py, Attention.forward).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from einops import repeat
from torch import nn

from shards import CONDITIONS, ShardSpec
from train.config import TrainConfig, route

PER_FRAME = frozenset(c.name for c in CONDITIONS if c.per_frame)  # conditions with one vector per frame

@functools.lru_cache(maxsize=64)
def time_overlap(steps: int, frames: int, device: torch.device | None = None) -> torch.Tensor:
    """(steps, frames) weights: W[i, j] = share of time step i's interval covered by frame j.

    Both axes tile the same window (10.24 s): step i covers [i, i+1) / steps, frame j [j, j+1) / frames.
    Rows sum to 1, so a step inside one frame gets that frame's value and a step straddling a frame
    boundary gets the overlap-weighted mix of the two (piecewise-constant interpolation). When steps <
    frames (coarse UNet levels), a step averages the frames it covers.
    """
    step_edges = torch.arange(steps + 1, dtype=torch.float64, device=device) / steps
    frame_edges = torch.arange(frames + 1, dtype=torch.float64, device=device) / frames
    lo = torch.maximum(step_edges[:-1, None], frame_edges[None, :-1])
    hi = torch.minimum(step_edges[1:, None], frame_edges[None, 1:])
    return ((hi - lo).clamp(min=0) * steps).float()


def token_grid(num_tokens: int, latent_grid: tuple[int, int]) -> tuple[int, int]:
    """(time, freq) of the UNet level holding `num_tokens` tokens: each downsampler halves both (ceil)."""
    height, width = latent_grid
    while height * width > num_tokens:
        height, width = (height + 1) // 2, (width + 1) // 2
    if height * width != num_tokens:
        raise ValueError(f"{num_tokens} tokens are no UNet level of a {latent_grid} latent")
    return height, width


def align_to_tokens(added: torch.Tensor, num_tokens: int, latent_grid: tuple[int, int]) -> torch.Tensor:
    """Per-frame features (B, frames, C) -> per-token features (B, tokens, C) of one UNet level.

    diffusers' Transformer2DModel flattens (B, C, H, W) to (B, H*W, C) row-major (H outer, W inner;
    transformer_2d.py `_operate_on_continuous_inputs`), so token n is time step n // W, frequency n % W.
    Each time step takes its frames (`time_overlap`) and the value is broadcast over frequency.
    """
    height, width = token_grid(num_tokens, latent_grid)
    # made on the condition's device (cached there): no host-to-device copy per call, nothing on the CPU inside a
    # compiled (or CUDA-graphed) UNet
    weights = time_overlap(height, added.shape[1], added.device).to(dtype=added.dtype)
    per_step = torch.einsum("tf,bfc->btc", weights, added)  # (B, H, C)
    return repeat(per_step, "b h c -> b (h w) c", w=width)


class PlainProcessor(AttnProcessor2_0):
    """Scaled-dot-product attention that names the added-condition kwargs (attn1, self-attention, ignores them).

    diffusers hands cross_attention_kwargs to attn1 as well, passes a processor only the kwargs its `__call__`
    names and warns for the others; naming them here keeps the logs quiet.
    """

    def __call__(  # type: ignore[override]
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        added_condition: torch.Tensor | None = None,
        latent_grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        out = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return self.add(out, added_condition, latent_grid)

    def add(self, out: torch.Tensor, added_condition: torch.Tensor | None, latent_grid: tuple[int, int] | None) -> torch.Tensor:
        return out


class AddedConditionProcessor(PlainProcessor, nn.Module):
    """attn2 processor: standard scaled-dot-product cross-attention plus Linear_l(added aligned in time).

    Linear_l starts at zero, so a fresh model equals the model without the added condition. (PlainProcessor
    comes first so that its `__call__`, not nn.Module's, runs; `project` is a registered submodule.)
    """

    def __init__(self, condition_dim: int, channels: int):
        nn.Module.__init__(self)
        PlainProcessor.__init__(self)
        self.project = nn.Linear(condition_dim, channels)
        nn.init.zeros_(self.project.weight)
        nn.init.zeros_(self.project.bias)

    def add(self, out: torch.Tensor, added_condition: torch.Tensor | None, latent_grid: tuple[int, int] | None) -> torch.Tensor:
        if added_condition is None:
            return out
        assert latent_grid is not None, "added_condition needs latent_grid"
        # out: (B, tokens, C) for the 3-D hidden states a BasicTransformerBlock passes
        return out + align_to_tokens(self.project(added_condition.to(out.dtype)), out.shape[1], latent_grid)


def sinusoidal(positions: int, dim: int) -> torch.Tensor:
    """(positions, dim) sin/cos embedding of the index (Vaswani et al. 2017), as VTA-LDM's optional one."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / max(half, 1))
    angles = torch.arange(positions, dtype=torch.float32)[:, None] * frequencies[None]
    table = torch.cat([angles.sin(), angles.cos()], dim=1)
    return nn.functional.pad(table, (0, dim - table.shape[1]))


def build_unet(config: TrainConfig, spec: ShardSpec) -> UNet2DConditionModel:
    """diffusers UNet2DConditionModel; the paper preset is Tango's (SD 2.1 layout with 8 latent channels)."""
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.cross_attention_blocks)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.cross_attention_blocks))
    return UNet2DConditionModel(
        sample_size=(spec.latent_time, spec.latent_freq),
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=tuple(config.block_channels),
        layers_per_block=config.layers_per_block,
        attention_head_dim=tuple(config.attention_heads),
        cross_attention_dim=config.cross_attention_dim,
        norm_num_groups=config.norm_groups,
        use_linear_projection=True,
        upcast_attention=config.upcast_attention,
    )


class VTASAM(nn.Module):
    """Condition encoder + UNet. forward(z_t, t, conditions, drop) -> the network output (v or eps).

    conditions: {"video": (B, F, D), "objects": (B, F, D), "caption": (B, D)} (raw CLIP-space features, by their
    names in `shards.conditions`; only those `route` uses are read). drop: (B,) bool, True where the sample is unconditional: every
    condition is replaced by zeros before its projection (the null condition of classifier-free guidance,
    as VTA-LDM zeroes its conditions; zeros need no extra parameters and mean "nothing seen" for O).
    """

    def __init__(self, config: TrainConfig, spec: ShardSpec):
        super().__init__()
        self.config = config
        self.spec = spec
        self.channels_last = False  # set by train.speed.speed_up: the input then enters in NHWC as the weights are
        self.weight_dtype: torch.dtype | None = None  # set by train.speed.lower_precision_weights (sampling only)
        self.keys, self.added = route(config.inputs, config.scheme)
        used = sorted(set(self.keys) | ({self.added} if self.added else set()))
        # one Linear from CLIP space to the cross-attention width per condition used
        self.project = nn.ModuleDict({name: nn.Linear(spec.embed_dim, config.cross_attention_dim) for name in used})
        if config.frame_positions:
            self.register_buffer("frame_positions", sinusoidal(spec.num_frames, config.cross_attention_dim), persistent=False)
        else:
            self.frame_positions = None
        self.unet = build_unet(config, spec)
        processors: dict[str, Any] = {}
        for name in self.unet.attn_processors:
            if name.endswith("attn2.processor") and self.added is not None:
                attention = self.unet.get_submodule(name.removesuffix(".processor"))
                processors[name] = AddedConditionProcessor(config.cross_attention_dim, attention.to_out[0].out_features)
            else:
                processors[name] = PlainProcessor()
        self.unet.set_attn_processor(processors)

    @property
    def latent_grid(self) -> tuple[int, int]:
        return (self.spec.latent_time, self.spec.latent_freq)

    def encode_conditions(
        self, conditions: dict[str, torch.Tensor], drop: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """keys: (B, L, cross_dim) and added: (B, F, cross_dim) or None."""
        projected = {}
        for name in self.project:
            x = conditions[name].float()
            if drop is not None:
                x = torch.where(drop.view(-1, *[1] * (x.ndim - 1)), torch.zeros_like(x), x)
            x = self.project[name](x)
            if name not in PER_FRAME:  # one vector per sample (the caption): one key token
                x = x[:, None]
            projected[name] = x
        tokens = []
        for name in self.keys:
            x = projected[name]
            if self.frame_positions is not None and name in PER_FRAME:
                x = x + self.frame_positions.to(x.dtype)
            tokens.append(x)
        keys = torch.cat(tokens, dim=1)
        added = projected[self.added] if self.added is not None else None
        return keys, added

    def forward(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        conditions: dict[str, torch.Tensor],
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        keys, added = self.encode_conditions(conditions, drop)
        if self.channels_last:
            sample = sample.contiguous(memory_format=torch.channels_last)
        kwargs = {"added_condition": added, "latent_grid": self.latent_grid}
        return self.unet(sample, timesteps, encoder_hidden_states=keys, cross_attention_kwargs=kwargs).sample

    def added_parameters(self) -> list[nn.Parameter]:
        """The Linear_l of every block (zero at initialisation)."""
        return [p for m in self.unet.modules() if isinstance(m, AddedConditionProcessor) for p in m.project.parameters()]
