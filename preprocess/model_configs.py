"""Configs of the frozen stage-one models for random-weight builds: toy widths (`tiny`) or the real architectures
(`paper`).

`random_init` builds every model from a config with random weights. The `tiny` configs keep each model's structure
at toy width (tests, the demo, CI); the `paper` configs are the published architectures, so that speed, FLOPs and
memory can be measured without the checkpoints (benchmarks/gpu_bench.py). Random weights say nothing about
quality. CLIP needs nothing here: open_clip builds the real architecture of `cfg.clip_model` either way.

Sources of the `paper` configs (the checkpoints the paper preset loads from the weights folder):
- Grounding DINO Swin-T, IDEA-Research/grounding-dino-tiny: transformers' GroundingDinoConfig defaults follow
  that checkpoint (d_model 256, 6 + 6 layers, 900 queries, 4 levels); its backbone is Swin-T (SwinConfig
  defaults: embed_dim 96, depths [2, 2, 6, 2], heads [3, 6, 12, 24], window 7) feeding stages 2-4, and its
  text encoder is bert-base-uncased (BertConfig defaults, vocabulary 30522). ~172 M parameters.
- SAM ViT-B, facebook/sam-vit-base: hidden 768, 12 layers, 12 heads, window 14, global attention in blocks
  2, 5, 8, 11, 1024 x 1024 input, patch 16; prompt encoder and mask decoder at 256 wide. ~94 M parameters.
- AudioLDM's VAE, cvssp/audioldm-s-full-v2 vae/: AudioLDM's first-stage ddconfig (ch 128, ch_mult [1, 2, 4],
  num_res_blocks 2, z_channels 8, in/out 1 channel) as diffusers' convert_original_audioldm_to_diffusers.py
  maps it (block_out_channels [128, 256, 512], layers_per_block 2, latent_channels 8, sample_size 512) and the
  scaling factor stored in that folder. ~56 M parameters (encoder + decoder).
- AudioLDM's HiFi-GAN, cvssp/audioldm-s-full-v2 vocoder/: AudioLDM's HIFIGAN_16K_64 (64 mels in, 16 kHz,
  upsample_initial_channel 1024, upsample rates [5, 4, 2, 2, 2] = hop 160, kernels [16, 16, 8, 4, 4],
  resblock kernels [3, 7, 11], dilations [1, 3, 5] each, no input normalisation). ~55 M parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from transformers import (
    BertConfig,
    GroundingDinoConfig,
    SamConfig,
    SamMaskDecoderConfig,
    SamPromptEncoderConfig,
    SamVisionConfig,
    SpeechT5HifiGanConfig,
    SwinConfig,
)

from preprocess.config import MEL_BINS, MEL_FRAMES, FeatureConfig

RandomSize = Literal["tiny", "paper"]
RANDOM_SIZES: tuple[str, ...] = ("tiny", "paper")

# WordPiece vocab whose special and punctuation ids equal bert-base-uncased's ([CLS]=101, [SEP]=102, '.'=1012,
# '?'=1029): Grounding DINO hard-codes these ids to split the prompt into phrases (SPECIAL_TOKENS in
# transformers' modeling_grounding_dino.py). Then a-z, ##a-##z, ##0-9 and some common nouns. Every id is below
# 30522, so it also tokenizes for the paper-size model (whose embedding has bert-base-uncased's 30522 rows).
TINY_BERT_VOCAB = Path(__file__).parent / "assets" / "tiny_bert_vocab.txt"
BERT_BASE_VOCAB_SIZE = 30522  # bert-base-uncased, Grounding DINO's text encoder
TINY_SAM_IMAGE_SIZE = 64
SAM_IMAGE_SIZE = 1024  # SAM's input: the longest side resized to 1024, padded to 1024 x 1024
AUDIOLDM_VAE_SCALING_FACTOR = 0.9227914214134216  # audioldm-s-full-v2 vae/config.json


@dataclass(frozen=True)
class RandomConfigs:
    """Everything a random-weight build of stage one's transformers/diffusers models needs."""

    grounding: GroundingDinoConfig
    sam: SamConfig
    sam_image_size: int  # SamImageProcessor longest_edge and pad size (= the vision config's image_size)
    vae: dict[str, Any]  # diffusers AutoencoderKL keyword arguments
    vocoder: SpeechT5HifiGanConfig


def random_configs(size: RandomSize, cfg: FeatureConfig | None = None) -> RandomConfigs:
    """The `tiny` (toy width) or `paper` (published architectures) configs of Grounding DINO, SAM, the AudioLDM VAE
    and its vocoder. `cfg` shapes the toy VAE and vocoder (latent channels, downsampling, sample rate); the paper
    configs are fixed by their checkpoints, and the encoders' size checks reject a `cfg` that disagrees."""
    cfg = cfg or FeatureConfig()
    if size == "tiny":
        vocab = len(TINY_BERT_VOCAB.read_text(encoding="utf-8").splitlines())
        return RandomConfigs(tiny_grounding_dino_config(vocab), tiny_sam_config(), TINY_SAM_IMAGE_SIZE,
                             tiny_vae_config(cfg), tiny_vocoder_config(cfg))
    if size == "paper":
        return RandomConfigs(paper_grounding_dino_config(), paper_sam_config(), SAM_IMAGE_SIZE,
                             paper_vae_config(), paper_vocoder_config())
    raise ValueError(f"random model size must be one of {RANDOM_SIZES}, got {size!r}")


# ----------------------------------------------------------------------------------- Grounding DINO
def tiny_grounding_dino_config(vocab_size: int) -> GroundingDinoConfig:
    """Grounding DINO's structure (Swin backbone, BERT text encoder, 4 feature levels) at toy width."""
    return GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8],  # type: ignore[call-arg]
                                   out_indices=[2, 3, 4]),  # stages 2-4 feed the detector, as in the real model
        text_config=BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=20,
    )


def paper_grounding_dino_config() -> GroundingDinoConfig:
    """IDEA-Research/grounding-dino-tiny: Swin-T backbone (stages 2-4), bert-base-uncased text encoder, the
    detector at transformers' defaults (which follow that checkpoint). Spelled out so a change of defaults in a
    later transformers does not silently change the benchmarked model."""
    return GroundingDinoConfig(
        backbone_config=SwinConfig(image_size=224, patch_size=4, embed_dim=96, depths=[2, 2, 6, 2],  # type: ignore[call-arg]
                                   num_heads=[3, 6, 12, 24], window_size=7, out_indices=[2, 3, 4]),
        text_config=BertConfig(vocab_size=BERT_BASE_VOCAB_SIZE, hidden_size=768, num_hidden_layers=12,
                               num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512),
        d_model=256, encoder_layers=6, decoder_layers=6, encoder_ffn_dim=2048, decoder_ffn_dim=2048,
        encoder_attention_heads=8, decoder_attention_heads=8, num_queries=900, num_feature_levels=4,
        encoder_n_points=4, decoder_n_points=4, max_text_len=256, two_stage=True,
    )


# ----------------------------------------------------------------------------------- SAM
def tiny_sam_config() -> SamConfig:
    """SAM at toy width. Constraints: the prompt encoder's image_size/patch_size equal the vision encoder's (its
    image_embedding_size is their ratio); vision output_channels == prompt and mask-decoder hidden sizes
    == 2 * num_pos_feats (the shared positional embedding)."""
    size, patch, hidden = TINY_SAM_IMAGE_SIZE, 8, 32
    return SamConfig(
        vision_config=SamVisionConfig(hidden_size=hidden, output_channels=hidden, num_hidden_layers=2,
                                      num_attention_heads=2, image_size=size, patch_size=patch, window_size=4,
                                      global_attn_indexes=[1], num_pos_feats=hidden // 2, mlp_dim=2 * hidden),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=hidden, image_size=size, patch_size=patch,
                                                     mask_input_channels=8),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=hidden, mlp_dim=2 * hidden, num_attention_heads=2,
                                                 iou_head_hidden_dim=hidden),
    )


def paper_sam_config() -> SamConfig:
    """facebook/sam-vit-base (SAM ViT-B): the image encoder at ViT-B width, prompt encoder and mask decoder at
    SAM's fixed 256 (their widths do not change between ViT-B/L/H)."""
    return SamConfig(
        vision_config=SamVisionConfig(hidden_size=768, output_channels=256, num_hidden_layers=12, num_attention_heads=12,
                                      image_size=SAM_IMAGE_SIZE, patch_size=16, window_size=14,
                                      global_attn_indexes=[2, 5, 8, 11], num_pos_feats=128, mlp_ratio=4.0),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=256, image_size=SAM_IMAGE_SIZE, patch_size=16,
                                                     mask_input_channels=16),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=256, mlp_dim=2048, num_hidden_layers=2, num_attention_heads=8,
                                                 iou_head_depth=3, iou_head_hidden_dim=256),
    )


# ----------------------------------------------------------------------------------- AudioLDM VAE + vocoder
def tiny_vae_config(cfg: FeatureConfig) -> dict[str, Any]:
    """AudioLDM's VAE structure (1 input channel, 3 down blocks -> downsample 4) at toy width."""
    blocks = 1 + int(math.log2(cfg.vae_downsample))
    return dict(in_channels=1, out_channels=1, latent_channels=cfg.latent_channels,
                block_out_channels=[8] + [16] * (blocks - 1), down_block_types=["DownEncoderBlock2D"] * blocks,
                up_block_types=["UpDecoderBlock2D"] * blocks, layers_per_block=1, norm_num_groups=4,
                sample_size=MEL_FRAMES // 4, scaling_factor=1.0)


def paper_vae_config() -> dict[str, Any]:
    """cvssp/audioldm-s-full-v2 vae/ (diffusers AutoencoderKL). force_upcast is left at diffusers' default (True),
    as in that folder's config, so the VAE runs in float32 under half-precision inference too."""
    blocks = 3
    return dict(in_channels=1, out_channels=1, latent_channels=8, block_out_channels=[128, 256, 512],
                down_block_types=["DownEncoderBlock2D"] * blocks, up_block_types=["UpDecoderBlock2D"] * blocks,
                layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=512,
                scaling_factor=AUDIOLDM_VAE_SCALING_FACTOR)


def tiny_vocoder_config(cfg: FeatureConfig) -> SpeechT5HifiGanConfig:
    """AudioLDM's HiFi-GAN (64 mel bins in, upsampling x160 = the hop) at toy width.

    initializer_range 0.2 instead of HF's 0.01: at 0.01 each of the random layers shrinks the signal and the
    toy vocoder outputs ~1e-10, i.e. silent WAVs (every sample rounds to 0 in 16-bit PCM); at 0.2 its output
    is audible noise of amplitude ~0.1-0.9 (still random: the tiny preset's audio means nothing)."""
    return SpeechT5HifiGanConfig(model_in_dim=MEL_BINS, sampling_rate=cfg.sample_rate, upsample_initial_channel=32,
                                 upsample_rates=[5, 4, 2, 2, 2], upsample_kernel_sizes=[10, 8, 4, 4, 4],
                                 resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]], normalize_before=False,
                                 initializer_range=0.2)


def paper_vocoder_config() -> SpeechT5HifiGanConfig:
    """cvssp/audioldm-s-full-v2 vocoder/: AudioLDM's HIFIGAN_16K_64 (audioldm/utils.py) in transformers' format."""
    return SpeechT5HifiGanConfig(model_in_dim=MEL_BINS, sampling_rate=16000, upsample_initial_channel=1024,
                                 upsample_rates=[5, 4, 2, 2, 2], upsample_kernel_sizes=[16, 16, 8, 4, 4],
                                 resblock_kernel_sizes=[3, 7, 11], resblock_dilation_sizes=[[1, 3, 5]] * 3,
                                 leaky_relu_slope=0.1, normalize_before=False)
