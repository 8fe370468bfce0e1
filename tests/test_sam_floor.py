"""The SAM floor: SAM refines only detections whose score can pass an object threshold >= the floor.

A pair (frame t, noun k) whose detector score s_tk is below `sam_floor` keeps iou 1.0 and costs no SAM work; at
every object threshold >= the floor it counts 0 in Eq. (1) anyway, so no object embedding changes. Tiny preset,
random weights, CPU. The tiny detector's scores crowd just under 1.0, so each test picks its floor from the
scores it observes (as a shard stores them, float16), which guarantees some pairs are skipped and some are not.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import SamModel

import shards
from preprocess.config import BEFORE_FIELD, PRESETS, FeatureConfig
from preprocess.encoders import Detections, Grounder, sam_refined
from preprocess.pipeline import FeatureError, build_meta, prepare_output

CFG = PRESETS["tiny"]
CPU = torch.device("cpu")
CHECKSUMS = {"clip": "c", "grounding": "g", "vae": "v"}


def _frames(n: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Smooth random images (uint8, N x H x W x 3)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=generator)
    image = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return (image * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _stored(scores: torch.Tensor) -> torch.Tensor:
    """Scores as a shard stores them and the object threshold sees them (float16, back to float32)."""
    return torch.from_numpy(scores.numpy().astype(shards.FEATURE_DTYPE)).float()


def _median_floor(found: list[Detections]) -> float:
    """The median of the distinct stored scores: a float16 value, so a pair is refined exactly where its stored
    score is >= the floor, and at least one distinct value lies on each side."""
    values = torch.cat([_stored(d.detector).flatten() for d in found]).unique()  # sorted
    assert len(values) >= 2, "the tiny detector gave a single score value: nothing to split"
    return float(values[len(values) // 2])


def _grounder(floor: float, **changes: object) -> Grounder:
    return Grounder.from_config(CFG.replace(sam_floor=floor, **changes), None, CPU)


@pytest.fixture(scope="module")
def clips() -> tuple[list[torch.Tensor], list[list[str]]]:
    frames = [_frames(3, 48, 64, seed=1), _frames(3, 56, 64, seed=2), _frames(2, 48, 48, seed=3),
              _frames(2, 40, 40, seed=4)]
    return frames, [["dog", "guitar player"], ["cat", "man", "car"], [], ["drum"]]


@pytest.fixture(scope="module")
def everywhere(clips: tuple[list[torch.Tensor], list[list[str]]]) -> list[Detections]:
    """Today's behaviour: floor 0, SAM on every pair."""
    return _grounder(0.0).detections(*clips)


def _objects(found: Detections, nouns: torch.Tensor, threshold: float) -> torch.Tensor:
    """Eq. (1) from the arrays as a shard stores them, through `shards.sample_conditions`."""
    stored = {
        shards.PROBS_KEY: found.probs.numpy().astype(shards.FEATURE_DTYPE),
        shards.DETECTOR_KEY: found.detector.numpy().astype(shards.FEATURE_DTYPE),
        "nouns.npy": nouns.numpy().astype(shards.FEATURE_DTYPE),
        "clip.npy": np.zeros((len(found.detector), nouns.shape[1]), shards.FEATURE_DTYPE),
        "caption.npy": np.zeros(nouns.shape[1], shards.FEATURE_DTYPE),
    }
    return shards.sample_conditions(stored, threshold)["objects"]


# ----------------------------------------------------------------------------------- config
def test_config_defaults_and_validation() -> None:
    assert FeatureConfig().sam_floor == CFG.sam_floor == PRESETS["paper"].sam_floor == 0.1
    assert CFG.replace(sam_floor=0.0).sam_floor == 0.0 and CFG.replace(sam_floor=1.0).sam_floor == 1.0
    for bad in (-0.01, 1.5):
        with pytest.raises(ValueError, match="sam_floor must be in"):
            CFG.replace(sam_floor=bad)
    # a config written before the field existed loads as what those runs did: SAM everywhere
    old = {k: v for k, v in PRESETS["paper"].to_dict().items() if k != "sam_floor"}
    assert FeatureConfig.from_dict(old).sam_floor == BEFORE_FIELD["sam_floor"] == 0.0
    assert FeatureConfig.from_dict(PRESETS["paper"].to_dict()) == PRESETS["paper"]
    assert _grounder(0.25).sam_floor == 0.25  # from_config hands the floor over


def test_a_score_that_float16_lifts_onto_the_floor_is_refined() -> None:
    """The threshold sees the float16 score: 0.34999 is stored as 0.35010, which passes a threshold of 0.35."""
    scores = torch.tensor([0.34999, 0.3499, 0.35, 0.9, 0.0])
    assert sam_refined(scores, 0.35).tolist() == [True, False, True, True, False]
    assert sam_refined(scores, 0.0).all()  # floor 0: every score
    unrefined = ~sam_refined(scores, 0.35)
    assert (_stored(scores)[unrefined] < 0.35).all()


# ----------------------------------------------------------------------------------- results
def test_floor_keeps_scores_and_refined_ious_and_every_object_embedding_at_or_above_it(
        clips: tuple[list[torch.Tensor], list[list[str]]], everywhere: list[Detections]) -> None:
    floor = _median_floor(everywhere)
    found = _grounder(floor).detections(*clips)
    skipped = refined = 0
    for a, b in zip(everywhere, found):
        assert torch.equal(a.detector, b.detector)  # the detector does not depend on SAM
        keep = _stored(a.detector) >= floor  # floor is a float16 value: see _median_floor
        assert keep[a.detector >= floor].all()  # every score at or above the floor as computed, too
        assert torch.equal(b.iou[keep], a.iou[keep])  # SAM's IoU, bit for bit, where it still runs
        assert torch.equal(b.iou[~keep], torch.ones(int((~keep).sum())))
        skipped, refined = skipped + int((~keep).sum()), refined + int(keep.sum())
    assert skipped > 0 and refined > 0
    assert any((a.iou[b.iou == 1.0] < 1.0).any() for a, b in zip(everywhere, found))  # SAM had changed them

    generator = torch.Generator().manual_seed(0)
    changed_at_zero = False
    for a, b in zip(everywhere, found):
        nouns = torch.randn(a.detector.shape[1], CFG.embed_dim, generator=generator)
        for threshold in (floor, (floor + 1.0) / 2, 1.0):
            assert torch.equal(_objects(a, nouns, threshold), _objects(b, nouns, threshold))
        changed_at_zero |= not torch.equal(_objects(a, nouns, 0.0), _objects(b, nouns, 0.0))
    assert changed_at_zero  # below the floor the skipped pairs do count: the comparison above can fail


def test_floor_zero_is_sam_everywhere(clips: tuple[list[torch.Tensor], list[list[str]]],
                                      everywhere: list[Detections]) -> None:
    without = _grounder(0.0, use_sam=False).detections(*clips)
    for a, b in zip(everywhere, without):
        assert torch.equal(a.detector, b.detector)
    assert all((a.iou < 1.0).all() for a in everywhere if a.iou.numel())  # every pair was refined


# ----------------------------------------------------------------------------------- cost
class _SamCalls:
    """Wraps SamModel.forward and Grounder._box_iou: images per SAM pass, boxes per image sent."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.passes: list[int] = []
        self.boxes: list[int] = []
        forward, box_iou = SamModel.forward, Grounder._box_iou

        def counted_forward(model: SamModel, *args: object, **kwargs: torch.Tensor) -> object:
            self.passes.append(kwargs["pixel_values"].shape[0])
            return forward(model, *args, **kwargs)

        def counted_box_iou(grounder: Grounder, images: list[torch.Tensor],
                            boxes: list[torch.Tensor]) -> list[torch.Tensor]:
            self.boxes.extend(len(b) for b in boxes)
            return box_iou(grounder, images, boxes)

        monkeypatch.setattr(SamModel, "forward", counted_forward)
        monkeypatch.setattr(Grounder, "_box_iou", counted_box_iou)

    def reset(self) -> None:
        self.passes.clear()
        self.boxes.clear()


def test_skipped_pairs_cost_nothing(clips: tuple[list[torch.Tensor], list[list[str]]],
                                    everywhere: list[Detections], monkeypatch: pytest.MonkeyPatch) -> None:
    """Batched (the frames of one detector input size in one pass; each clip here has its own): SAM gets the pass's
    frames with a refined pair, each with those boxes only."""
    floor = _median_floor(everywhere)
    calls = _SamCalls(monkeypatch)
    _grounder(0.0).detections(*clips)
    assert calls.passes == [len(f) for f, n in zip(*clips) if n]
    assert sum(calls.boxes) == sum(d.detector.numel() for d in everywhere)

    calls.reset()
    _grounder(floor).detections(*clips)
    keep = [_stored(d.detector) >= floor for d in everywhere]  # (T, K) per clip
    per_frame = [[int(n) for n in k.sum(1) if n > 0] for k in keep]  # refined pairs of each frame that has one
    assert calls.passes == [len(clip) for clip in per_frame if clip]
    assert calls.boxes == [n for clip in per_frame for n in clip]
    assert sum(map(sum, per_frame)) < sum(d.detector.numel() for d in everywhere)


def test_a_frame_without_a_refined_pair_sends_no_sam_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """One frame per pass, one noun per clip: SAM runs once per frame whose score reaches the floor, never else."""
    frames = [_frames(2, 48, 64, seed=5), _frames(1, 48, 64, seed=6), _frames(1, 48, 64, seed=7)]
    nouns = [["dog"], ["bird"], ["water"]]
    calls = _SamCalls(monkeypatch)
    reference = _grounder(0.0, frame_batch=1).detections(frames, nouns)
    assert calls.passes == [1] * 4  # floor 0: every frame
    floor = _median_floor(reference)
    keep = torch.cat([_stored(d.detector)[:, 0] >= floor for d in reference])  # (frames,)
    assert keep.any() and not keep.all()
    calls.reset()
    found = _grounder(floor, frame_batch=1).detections(frames, nouns)
    assert calls.passes == [1] * int(keep.sum()) and calls.boxes == [1] * int(keep.sum())
    ious = torch.cat([d.iou[:, 0] for d in found])
    assert torch.equal(ious[~keep], torch.ones(int((~keep).sum())))
    assert torch.equal(ious[keep], torch.cat([d.iou[:, 0] for d in reference])[keep])

    # only the frames below the floor, each alone as before (so scored exactly as before): no SAM pass at all
    below = [(clip[t: t + 1], words) for clip, words, d in zip(frames, nouns, reference)
             for t in range(len(clip)) if not bool(_stored(d.detector)[t, 0] >= floor)]
    calls.reset()
    found = _grounder(floor, frame_batch=1).detections([f for f, _ in below], [w for _, w in below])
    assert calls.passes == [] and calls.boxes == []
    assert all(torch.equal(d.iou, torch.ones(1, 1)) for d in found)


# ----------------------------------------------------------------------------------- meta.json
def _old_meta_json(folder: Path, cfg: FeatureConfig) -> Path:
    """A meta.json as stage one wrote it before the field existed (no `sam_floor` in its config)."""
    meta = build_meta(cfg, CHECKSUMS, 1.0)
    del meta["config"]["sam_floor"]
    folder.mkdir()
    path = folder / shards.META_FILE
    path.write_text(json.dumps(meta))
    return path


def test_an_old_folder_resumes_with_floor_zero_only(tmp_path: Path) -> None:
    path = _old_meta_json(tmp_path / "old", CFG.replace(sam_floor=0.0))
    before = path.read_text()
    prepare_output(tmp_path / "old", build_meta(CFG.replace(sam_floor=0.0), CHECKSUMS, 1.0), rank=0)
    with pytest.raises(FeatureError) as error:
        prepare_output(tmp_path / "old", build_meta(CFG.replace(sam_floor=0.1), CHECKSUMS, 1.0), rank=1)
    assert str(error.value) == (f"{path}: this folder holds features made differently "
                                "(sam_floor: 0.0 there vs 0.1 now); use another --out")
    assert path.read_text() == before  # never rewritten

    # a new folder records the floor, and a run with another one is refused the same way
    prepare_output(tmp_path / "new", build_meta(CFG, CHECKSUMS, 1.0), rank=0)
    assert json.loads((tmp_path / "new" / shards.META_FILE).read_text())["config"]["sam_floor"] == 0.1
    with pytest.raises(FeatureError, match=r"made differently \(sam_floor: 0.1 there vs 0.0 now\)"):
        prepare_output(tmp_path / "new", build_meta(CFG.replace(sam_floor=0.0), CHECKSUMS, 1.0), rank=0)


def test_without_sam_the_floor_is_not_compared(tmp_path: Path) -> None:
    no_sam = CFG.replace(use_sam=False)
    _old_meta_json(tmp_path / "old", no_sam.replace(sam_floor=0.0))
    prepare_output(tmp_path / "old", build_meta(no_sam, CHECKSUMS, 1.0), rank=0)  # floor 0.1: changes nothing
    with pytest.raises(FeatureError, match=r"made differently \(use_sam: False there vs True now\); use"):
        prepare_output(tmp_path / "old", build_meta(CFG, CHECKSUMS, 1.0), rank=0)
