"""Random-weight model configs: the paper-size ones are the published architectures (parameter counts, AudioLDM's
own VAE and vocoder settings), the toy ones stay what the tiny preset used, and `random_size` selects them."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import AutoencoderKL
from transformers import GroundingDinoForObjectDetection, SamModel, SpeechT5HifiGan

from audio_models import random_configs as audio_configs
from audio_models.config import MEL_BINS
from audio_models.vae import AudioVAE
from audio_models.vocoder import load_vocoder
from common.frozen import random_init_checksum
from preprocess import encoders, model_configs
from preprocess.config import PRESETS, FeatureConfig
from preprocess.model_configs import BERT_BASE_VOCAB_SIZE, TINY_BERT_VOCAB, random_configs

# AudioLDM's own settings (audioldm/utils.py: default_audioldm_config's first_stage_config ddconfig, HIFIGAN_16K_64)
AUDIOLDM_DDCONFIG = {"ch": 128, "ch_mult": [1, 2, 4], "num_res_blocks": 2, "z_channels": 8, "in_channels": 1, "out_ch": 1}
AUDIOLDM_HIFIGAN = {"upsample_rates": [5, 4, 2, 2, 2], "upsample_kernel_sizes": [16, 16, 8, 4, 4],
                    "upsample_initial_channel": 1024, "resblock_kernel_sizes": [3, 7, 11],
                    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]], "num_mels": 64, "sampling_rate": 16000}


def parameters(build) -> int:
    """Parameter count of a model built on the meta device (no memory, no initialisation: fast)."""
    with torch.device("meta"):
        model = build()
    return sum(p.numel() for p in model.parameters())


def test_paper_sizes_have_the_published_parameter_counts():
    configs = random_configs("paper")
    # Hugging Face model cards: IDEA-Research/grounding-dino-tiny 172M, facebook/sam-vit-base 93.7M parameters
    assert parameters(lambda: GroundingDinoForObjectDetection(configs.grounding)) == pytest.approx(172e6, rel=0.01)
    assert parameters(lambda: SamModel(configs.sam)) == pytest.approx(93.7e6, rel=0.01)
    # no published count for AudioLDM's VAE and vocoder: their structure is checked against AudioLDM's settings below
    assert parameters(lambda: AutoencoderKL(**audio_configs.vae_config("paper"))) > 50e6
    assert parameters(lambda: SpeechT5HifiGan(audio_configs.vocoder_config("paper"))) > 50e6


def test_paper_vae_and_vocoder_follow_audioldm():
    vae, ddconfig = audio_configs.vae_config("paper"), AUDIOLDM_DDCONFIG
    assert vae["block_out_channels"] == [ddconfig["ch"] * m for m in ddconfig["ch_mult"]]
    assert (vae["layers_per_block"], vae["latent_channels"]) == (ddconfig["num_res_blocks"], ddconfig["z_channels"])
    assert (vae["in_channels"], vae["out_channels"]) == (ddconfig["in_channels"], ddconfig["out_ch"])
    vocoder = audio_configs.vocoder_config("paper")
    for name in ("upsample_rates", "upsample_kernel_sizes", "resblock_kernel_sizes"):
        assert list(getattr(vocoder, name)) == AUDIOLDM_HIFIGAN[name]
    assert vocoder.upsample_initial_channel == AUDIOLDM_HIFIGAN["upsample_initial_channel"]
    assert [list(d) for d in vocoder.resblock_dilation_sizes] == AUDIOLDM_HIFIGAN["resblock_dilation_sizes"]
    assert (vocoder.model_in_dim, vocoder.sampling_rate) == (AUDIOLDM_HIFIGAN["num_mels"], AUDIOLDM_HIFIGAN["sampling_rate"])
    assert math.prod(vocoder.upsample_rates) == 160  # the mel hop: one mel frame -> 160 samples
    assert not vocoder.normalize_before


def test_paper_detector_is_swin_t_with_bert_base():
    grounding = random_configs("paper").grounding
    swin, bert = grounding.backbone_config, grounding.text_config
    assert (swin.embed_dim, list(swin.depths), list(swin.num_heads), swin.window_size) == (96, [2, 2, 6, 2], [3, 6, 12, 24], 7)
    assert list(swin.out_indices) == [2, 3, 4]
    assert (bert.vocab_size, bert.hidden_size, bert.num_hidden_layers) == (30522, 768, 12)
    vision = random_configs("paper").sam.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, list(vision.global_attn_indexes)) == (768, 12, [2, 5, 8, 11])


def test_tiny_vocab_tokenizes_for_the_bert_base_embedding():
    tokenizer = encoders.tiny_bert_tokenizer()
    ids = tokenizer("a dog barking . a bell ?")["input_ids"]
    assert max(ids) < BERT_BASE_VOCAB_SIZE
    assert len(tokenizer) == len(TINY_BERT_VOCAB.read_text().splitlines()) < BERT_BASE_VOCAB_SIZE
    # Grounding DINO splits phrases at bert-base-uncased's ids of these tokens
    assert tokenizer.convert_tokens_to_ids(list(encoders.GROUNDING_DELIMITERS)) == [101, 102, 1012, 1029]


def test_tiny_configs_are_the_ones_the_tiny_preset_builds():
    cfg = PRESETS["tiny"]
    tiny = random_configs("tiny")
    assert audio_configs.vae_config("tiny", cfg.audio_models()) == audio_configs.tiny_vae_config(cfg.audio_models())
    assert tiny.sam.to_dict() == model_configs.tiny_sam_config().to_dict()
    assert tiny.grounding.text_config.vocab_size == len(encoders.tiny_bert_tokenizer())
    assert tiny.sam_image_size == model_configs.TINY_SAM_IMAGE_SIZE
    assert parameters(lambda: SpeechT5HifiGan(audio_configs.vocoder_config("tiny", cfg.audio_models()))) < 1e6


def test_random_size_is_checked_and_named_in_the_checksum():
    with pytest.raises(ValueError, match="random_size"):
        FeatureConfig(random_size="huge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="random model size"):
        random_configs("huge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="random model size"):
        audio_configs.vae_config("huge")
    tiny, paper = FeatureConfig(), FeatureConfig(random_size="paper")
    assert random_init_checksum(tiny.seed, tiny.random_size) == "random-init(seed=0)"  # existing shards stay valid
    assert random_init_checksum(paper.seed, paper.random_size) != random_init_checksum(tiny.seed, tiny.random_size)


@pytest.mark.slow
def test_paper_size_random_models_run_through_the_encoders():
    """The real architectures, random weights, through the same wrappers as stage one (CPU, ~1 min)."""
    # 900 queries need at least 900 encoder tokens: sides 256 x 384 give 2040 over the four levels
    cfg = PRESETS["tiny"].replace(random_size="paper", grounding_short_side=256, grounding_long_side=384)
    device = torch.device("cpu")
    grounder = encoders.Grounder.from_config(cfg, None, device)
    assert grounder.detector.config.d_model == 256 and grounder.sam is not None
    frames = torch.randint(0, 256, (2, 72, 96, 3), dtype=torch.uint8)
    (probabilities,) = grounder.probabilities([frames], [["dog", "bell"]])
    assert probabilities.shape == (2, 2) and bool(((probabilities >= 0) & (probabilities <= 1)).all())
    vae = AudioVAE.from_config(cfg.audio_models(), None, device)
    assert vae.scaling_factor == pytest.approx(0.9227914214134216)
    mean, std = vae.encode(torch.randn(1, 1024, MEL_BINS))
    assert mean.shape == std.shape == (1, 8, 256, 16) and bool(torch.isfinite(mean).all())
    vocoder = load_vocoder(cfg.audio_models(), None, device)
    with torch.inference_mode():
        waveform = vocoder(torch.randn(1, 8, MEL_BINS))
    # each transposed conv maps L -> (L - 1) * stride - 2 * ((kernel - stride) // 2) + kernel: the first one (16, 5)
    # gives 5 L + 1, the others multiply by 4 * 2 * 2 * 2: 160 L + 32 samples (AudioLDM cuts to the clip's length)
    assert waveform.shape[-1] == 160 * 8 + 32
