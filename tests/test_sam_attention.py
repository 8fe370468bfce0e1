"""SAM's image-encoder attention with its relative positions folded into the query and key
(`preprocess.sam_attention`) against transformers' attention with the dense bias."""

from __future__ import annotations

import pytest
import torch
from transformers import SamModel
from transformers.models.sam.modeling_sam import SamVisionAttention, SamVisionSdpaAttention

from preprocess.config import PRESETS
from preprocess.encoders import Grounder
from preprocess.model_configs import random_configs
from preprocess.sam_attention import FoldedRelPosAttention, use_folded_rel_pos, use_transformers_rel_pos
from tests.test_sam_floor import _frames


def _randomised(module: torch.nn.Module, std: float) -> torch.nn.Module:
    """Every weight drawn at `std`, the relative-position tables included (transformers starts them at zero,
    which would make the test blind to them)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return module.eval()


def _attention(kind: type, window: int) -> torch.nn.Module:
    """One attention module of the paper's ViT-B, weights at 0.02 and relative-position tables at 0.5: large
    enough that the positions move the logits by several units (transformers starts the tables at zero)."""
    config = random_configs("paper").sam.vision_config
    attention = _randomised(kind(config, window), 0.02)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(5)
        for table in (attention.rel_pos_h, attention.rel_pos_w):
            table.copy_(torch.randn(table.shape, generator=generator) * 0.5)
    return attention


@pytest.mark.parametrize(("window", "grid", "batch"), [(14, 14, 3), (0, 64, 1)], ids=["windowed", "global"])
@pytest.mark.parametrize("kind", [SamVisionSdpaAttention, SamVisionAttention], ids=["sdpa", "eager"])
def test_a_vit_b_attention_gives_the_same_output(window, grid, batch, kind):
    """The paper ViT-B's attention on a 14 x 14 window (3 windows) or on SAM's whole 64 x 64 token grid, whose
    bias would be 12 x 4096 x 4096."""
    attention = _attention(kind, window)
    hidden = torch.randn(batch, grid, grid, 768, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = attention(hidden)[0]
        got = FoldedRelPosAttention(attention)(hidden)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_the_rel_pos_terms_matter_so_the_comparison_can_fail():
    attention = _attention(SamVisionSdpaAttention, 14)
    hidden = torch.randn(2, 14, 14, 768, generator=torch.Generator().manual_seed(2))
    folded = FoldedRelPosAttention(attention)
    with torch.no_grad():
        with_tables = folded(hidden)[0]
        attention.rel_pos_h.zero_()
        attention.rel_pos_w.zero_()
        without = folded(hidden)[0]
        expected = attention(hidden)[0]
    assert (with_tables - without).abs().max() > 100 * 1e-5  # far beyond the tolerance the comparisons use
    torch.testing.assert_close(without, expected, atol=1e-5, rtol=1e-4)


def test_swapping_every_block_keeps_sam_outputs_and_can_be_undone():
    sam = _randomised(SamModel(random_configs("tiny").sam), 0.05)
    with torch.no_grad():  # positions that move the logits (see _attention)
        for layer in sam.vision_encoder.layers:
            layer.attn.rel_pos_h.mul_(40)
            layer.attn.rel_pos_w.mul_(40)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    boxes = torch.tensor([[[4.0, 4.0, 40.0, 50.0]], [[10.0, 0.0, 60.0, 30.0]]])
    with torch.no_grad():
        expected = sam(pixel_values=pixels, input_boxes=boxes, multimask_output=False)
        expected_image = sam.vision_encoder(pixels).last_hidden_state
        blocks = len(sam.vision_encoder.layers)
        assert use_folded_rel_pos(sam) == blocks and use_folded_rel_pos(sam) == 0  # idempotent
        got = sam(pixel_values=pixels, input_boxes=boxes, multimask_output=False)
        got_image = sam.vision_encoder(pixels).last_hidden_state
        assert use_transformers_rel_pos(sam) == blocks
    assert not any(isinstance(layer.attn, FoldedRelPosAttention) for layer in sam.vision_encoder.layers)
    # the image embedding carries the positions (the tiny mask decoder's IoU barely depends on it)
    torch.testing.assert_close(got_image, expected_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.iou_scores, expected.iou_scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.pred_masks, expected.pred_masks, atol=1e-4, rtol=1e-4)


def test_stage_one_grounds_the_same_with_the_folded_attention():
    """The plumbing: `sam_rel_pos` swaps SAM's attention in stage one, and the grounding agrees (the random tiny
    SAM's position tables start at zero, as transformers initialises them; the tests above cover their use)."""
    frames = [_frames(3, 48, 64, seed=1), _frames(2, 40, 40, seed=4)]
    nouns = [["dog", "guitar player"], ["drum"]]
    found = {}
    for way in ("bias", "folded"):
        grounder = Grounder.from_config(PRESETS["tiny"].replace(sam_floor=0.0, sam_rel_pos=way), None, torch.device("cpu"))
        folded = sum(isinstance(layer.attn, FoldedRelPosAttention) for layer in grounder.sam.vision_encoder.layers)
        assert folded == (len(grounder.sam.vision_encoder.layers) if way == "folded" else 0)
        found[way] = grounder.detections(frames, nouns)
    for bias, folded in zip(found["bias"], found["folded"]):
        assert torch.equal(bias.detector, folded.detector)  # the detector is untouched
        torch.testing.assert_close(folded.iou, bias.iou, atol=1e-5, rtol=1e-5)
    assert any((d.iou < 1).any() for d in found["bias"])  # SAM did refine: the IoUs compared are SAM's


def test_the_folded_attention_runs_a_fused_sdpa_kernel(monkeypatch):
    """No mask and one head size for query, key and value: SDPA's fused (flash) kernel, not its math fallback,
    which would build the tokens x tokens attention matrix the folding exists to avoid."""
    import preprocess.sam_attention as folding

    chosen = []
    sdpa = folding.F.scaled_dot_product_attention

    def recording(query, key, value, **kwargs):
        chosen.append(torch._fused_sdp_choice(query, key, value, None, 0.0, False, scale=kwargs.get("scale")))
        return sdpa(query, key, value, **kwargs)

    monkeypatch.setattr(folding.F, "scaled_dot_product_attention", recording)
    for window, grid in ((14, 14), (0, 32)):
        attention = _attention(SamVisionSdpaAttention, window)
        with torch.no_grad():
            FoldedRelPosAttention(attention)(torch.randn(1, grid, grid, 768))
    assert chosen and all(choice == torch.nn.attention.SDPBackend.FLASH_ATTENTION.value for choice in chosen), chosen


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_in_float16_the_folded_attention_agrees_and_saves_memory():
    """Stage one's setting: float16 on CUDA, 8 frames through a global block. The folded attention stays within
    float16 rounding of the bias path and allocates less than the bias path's (8, 12, 4096, 4096) bias alone."""
    device = torch.device("cuda")
    attention = _attention(SamVisionSdpaAttention, 0).to(device, torch.float16)
    hidden = torch.randn(8, 64, 64, 768, device=device, dtype=torch.float16)
    peaks = {}
    with torch.no_grad():
        for way, module in (("bias", attention), ("folded", FoldedRelPosAttention(attention))):
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            out = module(hidden)[0]
            torch.cuda.synchronize(device)
            peaks[way] = (torch.cuda.max_memory_allocated(device) - base, out.float())
    bias_bytes = 8 * 12 * 4096 * 4096 * 2
    assert peaks["bias"][0] >= bias_bytes and peaks["folded"][0] < bias_bytes / 2
    torch.testing.assert_close(peaks["folded"][1], peaks["bias"][1], atol=2e-2, rtol=2e-2)
