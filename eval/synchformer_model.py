"""Synchformer's networks, under the state-dict names of av-benchmark's `Synchformer()` (synchformer_state_dict.pth).

Sources: Iashin et al., "Synchformer: Efficient Synchronization from Sparse Cues", ICASSP 2024 (v-iashin/Synchformer),
as vendored by hkchengrex/av-benchmark in av_bench/synchformer/ (synchformer.py, motionformer.py,
video_model_builder.py, vit_helper.py, divided_224_16x4.yaml, ast.py, hf_src/modeling_ast.py, transformer.py).
Only the inference path that av-benchmark uses is built (no token masks, no global segment aggregation, no dropout):

- video (`vfeat_extractor`, a MotionFormer with divided space-time attention): a segment of 16 frames 224x224 ->
  Conv3d tubelets (2 x 16 x 16) -> 8 x 196 tokens + CLS, plus the spatial position embedding (shared by the 8 token
  frames) + the temporal one; 12 blocks of x + TimeAttn(LN3 x), x + SpaceAttn(LN1 x), x + MLP(LN2 x) (CLS attends to
  all tokens; a patch token attends, with CLS, to the same patch in the 8 frames, then to the 196 patches of its
  frame); LayerNorm; then per token frame a pre-norm TransformerEncoderLayer with its own CLS over the 196 patches
  (`spatial_attn_agg`), whose CLS output is the frame's feature: (8, 768) per segment.
- audio (`afeat_extractor`, AST): a (66 frames, 128 mels) log-mel segment -> 16x16 patches with stride 10 ->
  12 x 6 tokens + CLS + distillation token, the AST encoder (transformers' ASTModel, the same computation as the
  vendored hf_src/modeling_ast.py without masks), then per time column a pre-norm TransformerEncoderLayer with its
  own CLS over the 12 frequency tokens (`freq_attn_agg`): (6, 768) per segment.
- offsets (`vproj`, `aproj`, `transformer`): 14 segments of both, projected, LayerNorm-ed per modality, packed as
  [OFF, video (14 x 8), MOD, audio (14 x 6)] + a learnt position embedding (198 positions), 3 pre-norm GPT blocks
  (8 heads), LayerNorm, a linear head on OFF: 21 logits over the offsets linspace(-2, 2, 21) seconds.

The parameters of the unused 2D patch embedding (`vfeat_extractor.patch_embed`) are kept so that the official file
loads strictly. transformers 5 renamed ASTModel's parameters; `ASTEncoder` maps the official (transformers 4) names
to the installed ones when loading and back when saving, so `state_dict()` always has the official names.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn
from transformers import ASTConfig, ASTModel


@dataclass(frozen=True)
class SynchformerConfig:
    """Front ends and segmenting (fixed by the checkpoint: av-benchmark's extract_video.py and extract.py) and the
    widths; `tiny` keeps the front ends and the token grids and narrows the networks."""

    # video: 25 fps frames, bicubic short side 224 + centre crop, (x - 0.5) / 0.5; segments of 16 frames, step 8
    video_fps: float = 25.0
    frame_size: int = 224
    segment_frames: int = 16
    segment_step_frames: int = 8
    patch_size: int = 16
    patch_frames: int = 2  # tubelet depth: 16 frames -> 8 token frames
    # audio: 16 kHz, segments of 10240 samples (0.64 s), step 5120; torchaudio MelSpectrogram; log(x + 1e-6)
    sample_rate: int = 16000
    segment_samples: int = 10240
    segment_step_samples: int = 5120
    n_fft: int = 1024
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 128
    log_offset: float = 1e-6
    spec_frames: int = 66  # 65 STFT frames zero-padded (after the log) to 66
    mel_mean: float = -4.2677393
    mel_std: float = 4.5689974  # normalised as (x - mean) / (2 std)
    audio_patch: int = 16
    audio_stride: int = 10
    # offsets: the first / last 14 segments, 21 classes on linspace(-2, 2, 21) seconds
    segments_compared: int = 14
    offset_min: float = -2.0
    offset_max: float = 2.0
    offset_classes: int = 21
    # widths
    video_dim: int = 768
    video_depth: int = 12
    video_heads: int = 12
    video_mlp_ratio: int = 4
    audio_dim: int = 768
    audio_depth: int = 12
    audio_heads: int = 12
    audio_ffn: int = 3072
    sync_dim: int = 768
    sync_depth: int = 3
    sync_heads: int = 8

    @property
    def video_token_frames(self) -> int:
        return self.segment_frames // self.patch_frames  # 8

    @property
    def video_grid(self) -> int:
        return self.frame_size // self.patch_size  # 14

    @property
    def audio_grid(self) -> tuple[int, int]:
        """(frequency, time) tokens of a segment: (12, 6)."""
        return ((self.n_mels - self.audio_patch) // self.audio_stride + 1,
                (self.spec_frames - self.audio_patch) // self.audio_stride + 1)

    @property
    def sync_tokens(self) -> int:
        """OFF + video + MOD + audio tokens of the offset transformer: 2 + 14 * (8 + 6) = 198."""
        return 2 + self.segments_compared * (self.video_token_frames + self.audio_grid[1])

    @property
    def min_frames(self) -> int:
        """Video frames that give `segments_compared` segments: 16 + 13 x 8 = 120."""
        return self.segment_frames + (self.segments_compared - 1) * self.segment_step_frames

    @property
    def min_samples(self) -> int:
        """Audio samples that give `segments_compared` segments: 10240 + 13 x 5120 = 76800."""
        return self.segment_samples + (self.segments_compared - 1) * self.segment_step_samples

    @property
    def min_seconds(self) -> float:
        """The shortest clip DeSync can measure: `min_frames` at `video_fps` and `min_samples` at `sample_rate`
        (4.8 s of each), since the offset classifier compares `segments_compared` segments of both."""
        return max(self.min_frames / self.video_fps, self.min_samples / self.sample_rate)

    def measures_window(self, seconds: float) -> bool:
        """Whether a window of `seconds` gives both streams `segments_compared` segments, counted as the front
        ends cut it: int(video_fps * seconds) frames and int(sample_rate * seconds) samples."""
        return (int(self.video_fps * seconds) >= self.min_frames
                and int(self.sample_rate * seconds) >= self.min_samples)

    def protocol(self) -> dict[str, object]:
        """The knobs the features and the offsets depend on (written into result and cache files)."""
        return {**dataclasses.asdict(self), "features": "per-segment token features (vfeat / afeat extractors)",
                "desync": "|offset| of argmax over the first and the last segments_compared segments"}


SYNCHFORMER_CONFIGS: dict[str, SynchformerConfig] = {
    "paper": SynchformerConfig(),
    "tiny": SynchformerConfig(video_dim=32, video_depth=1, video_heads=2, audio_dim=32, audio_depth=1, audio_heads=2,
                              audio_ffn=64, sync_dim=32, sync_depth=1, sync_heads=2),
}


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over the last two axes, any leading axes: (..., Lq, d), (..., Lk, d) -> (..., Lq, d)."""
    lead = q.shape[:-2]
    out = F.scaled_dot_product_attention(q.reshape(-1, *q.shape[-2:]), k.reshape(-1, *k.shape[-2:]),
                                         v.reshape(-1, *v.shape[-2:]))
    return out.reshape(*lead, *out.shape[-2:])


class ClsEncoderLayer(nn.TransformerEncoderLayer):
    """A pre-norm TransformerEncoderLayer (GELU, LayerNorm eps 1e-6, no dropout) with a learnt CLS token prepended;
    `pool` returns the CLS output (av-benchmark motionformer.py BaseEncoderLayer without mask and position
    embedding: the Spatial/Frequency/TemporalTransformerEncoderLayer adapters)."""

    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__(d_model=dim, nhead=heads, dim_feedforward=ffn, dropout=0.0, activation=nn.GELU(),
                         layer_norm_eps=1e-6, batch_first=True, norm_first=True)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, L, D) -> (N, D)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return self(x)[:, 0]


# --------------------------------------------------------------------------------------------------------------
# Video: MotionFormer (divided space-time attention)
# --------------------------------------------------------------------------------------------------------------
class _Projection(nn.Module):
    """Holds a patchifying convolution under the name `proj` (vit_helper.PatchEmbed / PatchEmbed3D)."""

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj


class DividedAttention(nn.Module):
    """Multi-head self-attention over time or over space (vit_helper.DividedAttention): the CLS query attends to all
    tokens; a patch query attends to CLS plus the tokens of its group (same patch across frames for time, same frame
    for space)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, frames: int, over_time: bool) -> torch.Tensor:
        # x: (B, 1 + frames * patches, D), tokens ordered (frame, patch)
        b, length, dim = x.shape
        patches = (length - 1) // frames
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, L, d)
        cls_out = _attention(q[:, :, :1], k, v)  # (B, h, 1, d)
        grid = (b, self.heads, frames, patches, -1)
        q_, k_, v_ = (t[:, :, 1:].reshape(grid) for t in (q, k, v))  # (B, h, F, P, d)
        if over_time:
            q_, k_, v_ = (t.transpose(2, 3) for t in (q_, k_, v_))  # (B, h, P, F, d): groups are patches
        groups = q_.shape[2]
        k_ = torch.cat((k[:, :, None, :1].expand(-1, -1, groups, -1, -1), k_), dim=3)  # CLS key in every group
        v_ = torch.cat((v[:, :, None, :1].expand(-1, -1, groups, -1, -1), v_), dim=3)
        out = _attention(q_, k_, v_)
        if over_time:
            out = out.transpose(2, 3)
        out = torch.cat((cls_out, out.reshape(b, self.heads, frames * patches, -1)), dim=2)  # (B, h, L, d)
        return self.proj(out.transpose(1, 2).reshape(b, length, dim))


class DividedSpaceTimeBlock(nn.Module):
    """x + TimeAttn(LN3 x), then + SpaceAttn(LN1 x), then + MLP(LN2 x) (vit_helper.DividedSpaceTimeBlock)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = DividedAttention(dim, heads)
        self.timeattn = DividedAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio * dim, act_layer=nn.GELU)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        x = x + self.timeattn(self.norm3(x), frames, over_time=True)
        x = x + self.attn(self.norm1(x), frames, over_time=False)
        return x + self.mlp(self.norm2(x))


class MotionFormerEncoder(nn.Module):
    """(N, 3, 16, 224, 224) segments -> (N, 8, D) per-token-frame features (motionformer.py MotionFormer with
    extract_features, factorize_space_time, agg_space_module TransformerEncoderLayer, agg_time_module Identity)."""

    def __init__(self, config: SynchformerConfig) -> None:
        super().__init__()
        dim, grid, frames = config.video_dim, config.video_grid, config.video_token_frames
        self.patch_embed = _Projection(nn.Conv2d(3, dim, config.patch_size, stride=config.patch_size))  # unused
        tubelet = (config.patch_frames, config.patch_size, config.patch_size)
        self.patch_embed_3d = _Projection(nn.Conv3d(3, dim, tubelet, stride=tubelet))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))  # CLS + spatial
        self.temp_embed = nn.Parameter(torch.zeros(1, frames, dim))
        self.blocks = nn.ModuleList(DividedSpaceTimeBlock(dim, config.video_heads, config.video_mlp_ratio)
                                    for _ in range(config.video_depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.spatial_attn_agg = ClsEncoderLayer(dim, config.video_heads, config.video_mlp_ratio * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, C, T, H, W) -> tokens (N, t * h * w, D), ordered (t, h, w)
        x = self.patch_embed_3d.proj(x)
        n, dim, frames, height, width = x.shape
        x = x.flatten(2).transpose(1, 2)
        patches = height * width
        positions = self.pos_embed[:, 1:].repeat(1, frames, 1) + self.temp_embed.repeat_interleave(patches, dim=1)
        x = torch.cat((self.cls_token.expand(n, -1, -1), x), dim=1)
        x = x + torch.cat((self.pos_embed[:, :1], positions), dim=1)  # x: (N, 1 + t*h*w, D)
        for block in self.blocks:
            x = block(x, frames)
        x = self.norm(x[:, 1:])  # without CLS
        x = self.spatial_attn_agg.pool(x.reshape(n * frames, patches, dim))  # CLS over the patches of each frame
        return x.view(n, frames, dim)


# --------------------------------------------------------------------------------------------------------------
# Audio: AST
# --------------------------------------------------------------------------------------------------------------
# ASTModel parameters: official (transformers 4.x, av-benchmark hf_src) name -> transformers 5 name, per layer
_AST_RENAMES: tuple[tuple[str, str], ...] = (
    ("encoder.layer.{i}.attention.attention.query.", "layers.{i}.attention.q_proj."),
    ("encoder.layer.{i}.attention.attention.key.", "layers.{i}.attention.k_proj."),
    ("encoder.layer.{i}.attention.attention.value.", "layers.{i}.attention.v_proj."),
    ("encoder.layer.{i}.attention.output.dense.", "layers.{i}.attention.o_proj."),
    ("encoder.layer.{i}.intermediate.dense.", "layers.{i}.mlp.fc1."),
    ("encoder.layer.{i}.output.dense.", "layers.{i}.mlp.fc2."),
    ("encoder.layer.{i}.layernorm_before.", "layers.{i}.layernorm_before."),
    ("encoder.layer.{i}.layernorm_after.", "layers.{i}.layernorm_after."),
)


def _rename_rules(reverse: bool) -> list[tuple[re.Pattern[str], str]]:
    rules = []
    for official, local in _AST_RENAMES:
        source, target = (local, official) if reverse else (official, local)
        pattern = re.compile("^" + re.escape(source).replace(re.escape("{i}"), r"(\d+)"))
        rules.append((pattern, target.replace("{i}", r"\1")))
    return rules


_TO_LOCAL, _TO_OFFICIAL = _rename_rules(reverse=False), _rename_rules(reverse=True)


def _rename(state: dict[str, Any], prefix: str, rules: list[tuple[re.Pattern[str], str]]) -> None:
    """Rename, in place and keeping the order, the keys `prefix + name` whose name matches a rule."""
    items = list(state.items())
    state.clear()
    for key, value in items:
        if key.startswith(prefix):
            name = key[len(prefix):]
            for pattern, target in rules:
                if pattern.match(name):
                    key = prefix + pattern.sub(target, name, count=1)
                    break
        state[key] = value


def _ast_load_hook(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
    if getattr(module, "renamed", False):
        _rename(state, prefix + "ast.", _TO_LOCAL)


def _ast_save_hook(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    if getattr(module, "renamed", False):
        _rename(state, prefix + "ast.", _TO_OFFICIAL)


class ASTEncoder(nn.Module):
    """(N, 66, 128) normalised log-mel segments -> (N, 6, D) per-time-column features (ast.py AST with
    extract_features, factorize_freq_time, agg_freq_module TransformerEncoderLayer, agg_time_module Identity; the
    position embedding has 2 + 12 * 6 = 74 entries, as AST.patch_position_emb cuts it for max_spec_t = 66)."""

    def __init__(self, config: SynchformerConfig) -> None:
        super().__init__()
        self.grid = config.audio_grid
        ast_config = ASTConfig(hidden_size=config.audio_dim, num_hidden_layers=config.audio_depth,
                               num_attention_heads=config.audio_heads, intermediate_size=config.audio_ffn,
                               hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                               layer_norm_eps=1e-12, qkv_bias=True, patch_size=config.audio_patch,
                               frequency_stride=config.audio_stride, time_stride=config.audio_stride,
                               max_length=config.spec_frames, num_mel_bins=config.n_mels)
        self.ast = ASTModel(ast_config)
        self.freq_attn_agg = ClsEncoderLayer(config.audio_dim, config.audio_heads, config.audio_ffn)
        names = set(self.ast.state_dict())
        official = "encoder.layer.0.layernorm_before.weight" in names
        self.renamed = not official
        if not official and "layers.0.layernorm_before.weight" not in names and config.audio_depth > 0:
            raise RuntimeError("this transformers version's ASTModel has parameter names that the Synchformer "
                               "loader does not know")
        self.register_load_state_dict_pre_hook(_ast_load_hook)
        self.register_state_dict_post_hook(_ast_save_hook)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        # spec: (N, T=66, F=128)
        hidden = self.ast(input_values=spec).last_hidden_state[:, 2:]  # (N, f * t, D) without CLS / distillation
        n, _, dim = hidden.shape
        freq, time = self.grid
        hidden = hidden.reshape(n, freq, time, dim).transpose(1, 2).reshape(n * time, freq, dim)
        return self.freq_attn_agg.pool(hidden).view(n, time, dim)  # CLS over the frequency tokens of each column


# --------------------------------------------------------------------------------------------------------------
# Offsets: the global transformer
# --------------------------------------------------------------------------------------------------------------
class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.key = nn.Linear(dim, dim)
        self.query = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        q, k, v = (layer(x).view(b, length, self.heads, -1).transpose(1, 2) for layer in (self.query, self.key, self.value))
        return self.proj(_attention(q, k, v).transpose(1, 2).reshape(b, length, dim))


class _GPTBlock(nn.Module):
    """x + Attn(LN1 x), then + MLP(LN2 x) with MLP = Linear(D, 4D), GELU, Linear(4D, D) (transformer.py Block)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.ln2 = nn.LayerNorm(dim)
        self.attn = _SelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class _PositionEmbedding(nn.Module):
    def __init__(self, length: int, dim: int) -> None:
        super().__init__()
        self.pos_emb = nn.Parameter(torch.zeros(1, length, dim))


class GlobalTransformer(nn.Module):
    """(B, Sv*tv, D) video and (B, Sa*ta, D) audio tokens -> (B, classes) offset logits (transformer.py
    GlobalTransformer: [OFF, LN_v(v), MOD, LN_a(a)] + positions -> blocks -> LN -> off_head(x[:, 0]))."""

    def __init__(self, config: SynchformerConfig) -> None:
        super().__init__()
        dim = config.sync_dim
        self.vis_in_lnorm = nn.LayerNorm(dim)
        self.aud_in_lnorm = nn.LayerNorm(dim)
        self.OFF_tok = nn.Parameter(torch.zeros(1, 1, dim))
        self.MOD_tok = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_emb_cfg = _PositionEmbedding(config.sync_tokens, dim)
        self.blocks = nn.Sequential(*(_GPTBlock(dim, config.sync_heads) for _ in range(config.sync_depth)))
        self.ln_f = nn.LayerNorm(dim)
        self.off_head = nn.Linear(dim, config.offset_classes)

    def forward(self, video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        b = video.shape[0]
        x = torch.cat((self.OFF_tok.expand(b, -1, -1), self.vis_in_lnorm(video),
                       self.MOD_tok.expand(b, -1, -1), self.aud_in_lnorm(audio)), dim=1)
        x = self.ln_f(self.blocks(x + self.pos_emb_cfg.pos_emb))
        return self.off_head(x[:, 0])


def init_weights(model: nn.Module) -> None:
    """Random weights for tests and the demo (not the reference's init, which leaves the tubelet convolution at
    zero): truncated normal (std 0.02) for linear / conv weights and learnt tokens, zero biases, unit LayerNorms."""
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d | nn.Conv3d):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            nn.init.trunc_normal_(module.in_proj_weight, std=0.02)
            nn.init.zeros_(module.in_proj_bias)
    for name, parameter in model.named_parameters():
        if name.rsplit(".", 1)[-1] in {"cls_token", "distillation_token", "pos_embed", "temp_embed",
                                       "position_embeddings", "pos_emb", "OFF_tok", "MOD_tok"}:
            nn.init.trunc_normal_(parameter, std=0.02)

