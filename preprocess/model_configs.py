"""Configs of stage one's frozen detectors for random-weight builds: toy widths (`tiny`) or the real architectures
(`paper`). (The AudioLDM VAE's and vocoder's are in `audio_models.random_configs`.)

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
"""

from __future__ import annotations

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
    SwinConfig,
)

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


@dataclass(frozen=True)
class RandomConfigs:
    """Everything a random-weight build of Grounding DINO and SAM needs."""

    grounding: GroundingDinoConfig
    sam: SamConfig
    sam_image_size: int  # SamImageProcessor longest_edge and pad size (= the vision config's image_size)


def random_configs(size: RandomSize) -> RandomConfigs:
    """The `tiny` (toy width) or `paper` (published architectures) configs of Grounding DINO and SAM."""
    if size == "tiny":
        vocab = len(TINY_BERT_VOCAB.read_text(encoding="utf-8").splitlines())
        return RandomConfigs(tiny_grounding_dino_config(vocab), tiny_sam_config(), TINY_SAM_IMAGE_SIZE)
    if size == "paper":
        return RandomConfigs(paper_grounding_dino_config(), paper_sam_config(), SAM_IMAGE_SIZE)
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


# the fields that tell the paper's checkpoints from their larger or smaller siblings (Swin-B for Swin-T, ViT-H
# for ViT-B): `variant_differences` names those a loaded checkpoint does not share with the paper preset's
GROUNDING_DINO_VARIANT_FIELDS = ("backbone_config.embed_dim", "backbone_config.depths", "backbone_config.num_heads",
                                 "text_config.hidden_size", "d_model", "num_queries")
SAM_VARIANT_FIELDS = ("vision_config.hidden_size", "vision_config.num_hidden_layers", "vision_config.global_attn_indexes")


def variant_differences(config: Any, reference: Any, fields: tuple[str, ...]) -> list[str]:
    """'field value (the paper's value)' for each dotted `fields` path where `config` differs from `reference`."""
    def get(obj: Any, path: str) -> Any:
        for part in path.split("."):
            obj = getattr(obj, part, None)
        return list(obj) if isinstance(obj, tuple) else obj

    return [f"{field} {get(config, field)!r} (the paper's {get(reference, field)!r})" for field in fields
            if get(config, field) != get(reference, field)]


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
    SAM's fixed 256 (their widths do not change between ViT-B/L/H).

    The image encoder's random weights are drawn at std 0.02 (`initializer_range`), not at SamVisionConfig's
    default 1e-10: weights that small make its activations denormal floats, which a CPU computes several times
    slower (one windowed block: 1.9 s against 0.36 s), so CPU timings of the random model would say nothing about
    the real one. Only random builds read it; a checkpoint's weights replace them."""
    return SamConfig(
        vision_config=SamVisionConfig(hidden_size=768, output_channels=256, num_hidden_layers=12, num_attention_heads=12,
                                      image_size=SAM_IMAGE_SIZE, patch_size=16, window_size=14,
                                      global_attn_indexes=[2, 5, 8, 11], num_pos_feats=128, mlp_ratio=4.0,
                                      initializer_range=0.02),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=256, image_size=SAM_IMAGE_SIZE, patch_size=16,
                                                     mask_input_channels=16),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=256, mlp_dim=2048, num_hidden_layers=2, num_attention_heads=8,
                                                 iou_head_depth=3, iou_head_hidden_dim=256),
    )
