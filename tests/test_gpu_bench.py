"""The GPU benchmark script runs end to end on the CPU with the tiny models and reports every section with numbers."""

from __future__ import annotations

import json
import numbers

import numpy as np
import pytest
import torch

from benchmarks import gpu_bench
from preprocess.encoders import sam_refined


def test_peak_table_prefers_the_specific_name():
    assert gpu_bench.peak_bf16_tflops("NVIDIA H200") == pytest.approx(989.4)
    assert gpu_bench.peak_bf16_tflops("NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert gpu_bench.peak_bf16_tflops("NVIDIA L40S") == pytest.approx(362.1)
    assert gpu_bench.peak_bf16_tflops("NVIDIA L4") == pytest.approx(121.0)
    assert gpu_bench.peak_bf16_tflops("CPU (x86_64)") is None


@pytest.mark.slow
def test_cpu_tiny_run_writes_every_section(tmp_path):
    code = gpu_bench.main(["--preset", "tiny", "--device", "cpu", "--out", str(tmp_path), "--budget-s", "240",
                           "--clips", "4", "--train-steps", "3", "--every-change"])
    results = json.loads((tmp_path / "gpu_bench.json").read_text())
    failures = {name: results[name].get("error") for name in ("device", *gpu_bench.SECTION_SHARES)
                if results[name]["status"] != "ok"}
    assert code == 0 and not failures, failures

    def positive(value: object) -> bool:
        return isinstance(value, numbers.Real) and value > 0

    one = results["stage_one"]
    assert one["end_to_end"]["clips"] == 4 and positive(one["end_to_end"]["clips_per_second"])
    assert positive(one["encoders_alone"]["clips_per_second"])
    for model in ("clip", "grounding_dino", "grounding_dino+sam", "vae_encoder"):
        assert positive(one["per_model"][model]["seconds_per_clip"]) and positive(one["per_model"][model]["tflop_per_clip"])
    assert one["grounding_profile"]["status"] == "ok" and positive(one["grounding_profile"]["ms_per_frame"])
    training = results["training"]
    assert positive(training["tflop_per_step"])
    for key in ("from_shards", "from_memory"):
        assert positive(training[key]["samples_per_second"]) and positive(training[key]["mfu_vs_measured_matmul"])
    runs = results["generation"]["runs"]
    assert {(r["sampler"], r["steps"], r["batch"]) for r in runs} == {(s, n, b) for s, n in gpu_bench.SAMPLERS
                                                                      for b in gpu_bench.GENERATION_BATCHES}
    assert all(positive(r["seconds_per_clip"]) for r in runs)
    probe = results["generation"]["sampling_batch"]  # evaluation's own choice of the sampling batch
    assert probe["status"] == "ok" and str(probe["sampling_batch"]) in probe["seconds_per_clip_step"]
    assert positive(probe["seconds_per_clip_300_steps"])
    profiled = results["generation"]["sampling_profile"]  # at evaluation's sampling batch, where the 300 steps run
    assert profiled["status"] == "ok" and profiled["batch"] == probe["sampling_batch"] and profiled["top_kernels"]
    assert all(positive(op["self_ms"]) for op in profiled["top_kernels"])
    training = results["training"]  # the profile and the changes at the global batch in one micro-batch
    assert training["profile_batch"] == training["changes_batch"] == training["global_batch"]["samples"]
    summary = (tmp_path / "gpu_bench.md").read_text()
    assert "### Stage one" in summary and "Grounding step by part" in summary and "ddpm-300" in summary and "dpmsolver++-25" in summary

    # every before/after comparison that can run on the CPU ran; the CUDA-only ones and torch.compile (without
    # --compile) say why they were skipped; none failed
    cpu_runs = {"stage_one": {"sam_folded_rel_pos", "grounding_dino_batched", "decode_worker_transfer",
                              "background_shard_writer"},
                "training": {"fused_attention", "channels_last"}, "generation": {"channels_last", "channels_last_batch16"}}
    for section, expected in cpu_runs.items():
        changes = results[section]["changes"]
        assert {name for name, c in changes.items() if c["status"] == "ok"} == expected, changes
        for change in changes.values():
            if change["status"] == "ok":
                assert positive(change["before"][1]) and positive(change["after"][1]) and positive(change["speedup"])
            else:
                assert change["status"] == "skipped" and ("CUDA" in change["reason"] or "--compile" in change["reason"])
    assert "| fused_attention |" in summary and "### Targets" in summary


def test_speedups_read_rates_and_seconds_the_right_way_round(monkeypatch):
    monkeypatch.setitem(gpu_bench.EVERY_CHANGE, "on", False)  # a main() run before may have left it on
    out: dict = {}
    deadline = gpu_bench.Deadline(60)
    gpu_bench.compare(out, "rate", deadline, 0, print, lambda: {"unit": "samples/s", "before": ("a", 2.0), "after": ("b", 3.0)})
    gpu_bench.compare(out, "time", deadline, 0, print, lambda: {"unit": "s", "before": ("a", 2.0), "after": ("b", 1.0)})
    gpu_bench.compare(out, "late", deadline, 120, print, lambda: {"unit": "s", "before": ("a", 1.0), "after": ("b", 1.0)})
    gpu_bench.compare(out, "broken", deadline, 0, print, lambda: {"unit": "s", "before": ("a", 1 / 0), "after": ("b", 1.0)})
    changes = out["changes"]
    assert changes["rate"]["speedup"] == 1.5 and changes["time"]["speedup"] == 2.0
    assert changes["late"]["status"] == "skipped" and "needs ~120 s" in changes["late"]["reason"]
    assert changes["broken"]["status"] == "error" and "ZeroDivisionError" in changes["broken"]["error"]


def test_changes_runs_only_the_comparisons_named(monkeypatch):
    monkeypatch.setitem(gpu_bench.EVERY_CHANGE, "on", False)
    monkeypatch.setitem(gpu_bench.ONLY_CHANGES, "names", {"wanted"})
    ran: list[str] = []

    def job(name: str):
        return lambda: ran.append(name) or {"unit": "s", "before": ("a", 2.0), "after": ("b", 1.0)}

    out: dict = {}
    for name in ("wanted", "other"):
        gpu_bench.compare(out, name, gpu_bench.Deadline(60), 0, print, job(name))
    assert ran == ["wanted"] and out["changes"]["wanted"]["speedup"] == 2.0
    assert out["changes"]["other"] == {"status": "skipped", "reason": "not among --changes"}


def test_floors_leave_the_wanted_share_of_scores_below_them():
    scores = np.random.default_rng(0).uniform(0.0, 1.0, size=(41, 8))  # noun-frames of one clip
    chosen = gpu_bench.floors_for_skip_fractions(scores, [0.0, 0.5, 0.8, 1.0])
    assert [got for _, got in chosen] == pytest.approx([0.0, 0.5, 0.8, 1.0], abs=1 / scores.size)
    for floor, got in chosen:
        assert 0.0 <= floor <= 1.0
        # the encoder's own rule agrees: the share of scores SAM would not refine is the one returned
        left = ~sam_refined(torch.as_tensor(scores, dtype=torch.float32), floor)
        assert left.float().mean().item() == pytest.approx(got)
    assert chosen[1][0] == pytest.approx(np.quantile(scores, 0.5), abs=0.05)


def test_floors_report_what_saturated_scores_allow():
    # a random-weight detector's scores: ~1.0, most of them exactly 1.0 once stored as float16
    scores = np.concatenate([np.full(90, 1.0), np.linspace(0.9999, 0.99999, 10)]).astype(np.float32)
    chosen = gpu_bench.floors_for_skip_fractions(scores, [0.5, 0.8])
    assert all(got < 0.2 for _, got in chosen)
    with pytest.raises(ValueError):
        gpu_bench.floors_for_skip_fractions(np.zeros(0), [0.5])


def test_grounding_sizes_scale_the_paper_sizes():
    assert gpu_bench.grounding_sizes(800, 1333) == [(480, 800), (600, 1000), (800, 1333)]
    assert gpu_bench.grounding_sizes(64, 96) == [(38, 58), (48, 72), (64, 96)]


def test_fixed_length_clips_fill_the_paper_window(tmp_path):
    from preprocess.config import PRESETS
    from preprocess.video import decode_frames

    cfg = PRESETS["paper"]
    lengths = gpu_bench.render_fixed_length_clips(tmp_path, 3, cfg.window_seconds, (48, 32), 25)
    assert lengths == [cfg.window_seconds] * 3
    rows = (tmp_path / "vggsound.csv").read_text().splitlines()
    assert len(rows) == 3
    for row in rows:
        video = decode_frames(tmp_path / "videos" / f"{row.split(',')[0]}_000000.mp4", 0.0, cfg.frame_times(),
                              cfg.window_seconds, 32)
        assert len(video.frames) == cfg.num_frames == 41


def test_stage_one_summary_shows_skipped_and_failed_knobs():
    one = {"preset_sam_floor": 0.1, "preset_floor_skip_fraction": 0.0, "sam_floor_scores": "the detector's own scores",
           "sam_floor": [{"target_skip_fraction": 0.5, "status": "ok", "clips": 2, "floor": 0.4, "skip_fraction": 0.5,
                          "frames_sam_skips": 0.3, "seconds_per_clip": 0.5, "before": ("floor 0", 1.0), "speedup": 2.0},
                         {"target_skip_fraction": 0.8, "status": "skipped", "reason": "budget: 3 s left, needs ~9 s"}],
           "grounding_sizes": [{"short_side": 480, "long_side": 800, "status": "error", "error": "RuntimeError: x"}],
           "memory_cap_gib": 24.0, "memory_cap": {"status": "skipped", "reason": "the memory cap is CUDA-only (no CUDA)"}}
    text = "\n".join(gpu_bench.stage_one_knob_lines(one))
    assert "| 0.5 | 0.4 | 0.5 | 0.3 | 0.5 | 1 | **2x** |" in text
    assert "skipped: budget" in text and "| 480x800 | error: RuntimeError: x |" in text
    assert "memory cap 24 GiB: skipped: the memory cap is CUDA-only" in text


def test_grounding_profile_splits_the_step_by_part():
    from types import SimpleNamespace

    from benchmarks import grounding_cost
    from preprocess.config import PRESETS
    from preprocess.encoders import Grounder

    grounder = Grounder.from_config(PRESETS["tiny"].replace(sam_floor=0.0), None, torch.device("cpu"))
    rng = np.random.default_rng(0)
    batch = [{"frames": rng.integers(0, 256, (n, 48, 64, 3), dtype=np.uint8)} for n in (3, 2)]
    prof = gpu_bench.grounding_profile(SimpleNamespace(grounder=grounder), batch, [["dog", "car"], ["drum"]],
                                       torch.device("cpu"), repeats=1)
    assert prof["frames"] == 5 and prof["nouns_per_clip"] == [2, 1]
    parts = {(r["model"], r["part"]): r for r in prof["parts"]}
    # every part of both splits was hooked and ran (SAM refines every detection at floor 0)
    assert set(parts) == ({("grounding_dino", p) for p in [*grounding_cost.DETECTOR_PARTS, *grounding_cost.DETECTOR_DETAILS]}
                          | {("sam", p) for p in grounding_cost.sam_parts(
                              grounder.sam.config.vision_config.global_attn_indexes,
                              grounder.sam.config.vision_config.num_hidden_layers)})
    assert all(r["ms_per_frame"] > 0 for r in prof["parts"])
    top_level = [r for r in prof["parts"] if not r["detail"]]
    assert sum(r["share"] for r in top_level) <= 1.0 + 1e-3
    assert sum(r["ms_per_frame"] for r in top_level) + prof["other_ms_per_frame"] == pytest.approx(prof["ms_per_frame"], rel=1e-2)
    assert prof["top_kernels"] and all(op["self_ms"] >= 0 for op in prof["top_kernels"])
    lines = "\n".join(gpu_bench.grounding_profile_lines({"grounding_profile": {"status": "ok", **prof}}))
    assert "Swin-T backbone" in lines and "global-attention blocks" in lines and "| op / kernel |" in lines


def test_part_timers_count_a_shared_module_once_in_the_outer_part(monkeypatch):
    """transformers up to 5.17 registers Grounding DINO's heads under two names (`class_embed.N` and
    `model.decoder.class_embed.N`) and runs them inside the decoder as well as after it. The parts still match (by
    either name), and the heads' calls inside the decoder count for the decoder only, so that the parts split the
    forward. Time is a clock that the modules advance by hand: each head call costs 1, the decoder's own work 10."""
    from torch import nn

    from benchmarks import grounding_cost

    clock = [0.0]
    monkeypatch.setattr(grounding_cost.time, "perf_counter", lambda: clock[0])

    class Head(nn.Module):
        def forward(self, x):
            clock[0] += 1
            return x

    class Decoder(nn.Module):
        def __init__(self, heads):
            super().__init__()
            self.class_embed = heads  # shared, as older transformers do

        def forward(self, x):
            clock[0] += 10
            for head in self.class_embed:
                x = head(x)
            return x

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            heads = nn.ModuleList([Head(), Head()])
            self.model = nn.Module()
            self.model.decoder = Decoder(heads)
            self.class_embed = heads

        def forward(self, x):
            x = self.model.decoder(x)
            return sum(head(x) for head in self.class_embed)

    model = Model()
    parts = {"decoder": ("model.decoder",), "heads": ("class_embed.*",)}
    assert [name for name, _ in grounding_cost.part_modules(model, parts)["heads"]] == ["class_embed.0", "class_embed.1"]
    seconds: dict[str, float] = {}
    with grounding_cost.part_timers(model, parts, seconds, details={"one head": ("class_embed.0",)}):
        model(torch.zeros(1))
    assert seconds == {"decoder": 12.0, "heads": 2.0, "one head": 2.0}  # details count every call


def test_the_latency_target_reads_dpm_at_batch_one_only():
    """torch_compile_evaluation_batch's "after" is seconds per DDPM step at evaluation's batch (0.3-0.4 s on an
    H200, as DPM-Solver++-25 at batch 1 is): the summary took it for the latency target."""
    runs = [{"sampler": "dpmsolver++", "batch": 1, "sample_seconds": 0.9}]
    changes = {"cuda_graphs": {"status": "ok", "after": ("graphs", 0.6)},
               "channels_last_batch16": {"status": "ok", "after": ("channels_last", 0.05)},
               "torch_compile_evaluation_batch": {"status": "ok", "after": ("compiled", 0.01)},
               "cuda_graphs_batch16": {"status": "ok", "after": ("graphs", 0.02)}}
    assert gpu_bench.target_values({"generation": {"runs": runs, "changes": changes}})[-1] == 0.6


def test_a_section_keeps_its_numbers_when_it_fails_or_is_cut_off(tmp_path, monkeypatch):
    """A section's numbers were recorded when it returned: an exception late in a section lost all of them, and a
    run killed by its time limit (`timeout`) lost the section it was in from gpu_bench.json. Each section now fills
    its dict as it goes, and the JSON is written at each log line."""
    results: dict = {}

    def failing(out):
        out["measured"] = 1.5
        raise RuntimeError("late failure")

    gpu_bench.guarded("stage_one", results, lambda message: None, failing)
    assert results["stage_one"]["measured"] == 1.5 and results["stage_one"]["status"] == "error"

    seen = {}

    def cut_off(out, log, **ignored):
        out["end_to_end"] = {"clips_per_second": 0.5}
        log("stage one: measured")
        seen.update(json.loads((tmp_path / "gpu_bench.json").read_text()))
        raise KeyboardInterrupt  # as a time limit's signal ends the process

    monkeypatch.setattr(gpu_bench, "bench_device", lambda device: {"name": "cpu"})
    monkeypatch.setattr(gpu_bench, "bench_stage_one", cut_off)
    monkeypatch.setattr(gpu_bench, "markdown", lambda results: "")
    with pytest.raises(KeyboardInterrupt):
        gpu_bench.main(["--preset", "tiny", "--device", "cpu", "--out", str(tmp_path), "--sections", "stage_one"])
    assert seen["stage_one"] == {"status": "running", "end_to_end": {"clips_per_second": 0.5}}


def test_a_section_gets_what_the_ones_before_it_left(monkeypatch, tmp_path):
    """Each section's deadline was its share of the budget left before the first: one that overran took the time
    of the next ones, and time one left unused was lost. Now each gets its share of what is left when it starts."""
    given = {}
    clock = [0.0]
    monkeypatch.setattr(gpu_bench.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(gpu_bench.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(gpu_bench, "bench_device", lambda device: {"name": "cpu"})

    def section(name, spends):
        def run(out, deadline, **ignored):
            given[name] = deadline.left()
            clock[0] += spends
            return {}
        return run

    monkeypatch.setattr(gpu_bench, "bench_stage_one", section("stage_one", 150.0))  # overruns its 40 of 100
    monkeypatch.setattr(gpu_bench, "bench_training", section("training", 0.0))
    monkeypatch.setattr(gpu_bench, "bench_generation", section("generation", 0.0))
    monkeypatch.setattr(gpu_bench, "markdown", lambda results: "")
    gpu_bench.main(["--preset", "tiny", "--device", "cpu", "--out", str(tmp_path), "--budget-s", "100"])
    assert given["stage_one"] == pytest.approx(40.0)
    assert given["training"] == 0.0 and given["generation"] == 0.0  # the overrun left nothing


@pytest.mark.parametrize("fails", [False, True])
def test_a_changes_name_not_reached_is_no_typo(tmp_path, monkeypatch, fails):
    """A section that failed before its comparisons left the name unmet: it was reported as a name no section
    compares. It is 'not reached' then; a name met nowhere in a run whose sections all finished is still unknown."""
    monkeypatch.setattr(gpu_bench, "COMPARED", set())
    monkeypatch.setitem(gpu_bench.ONLY_CHANGES, "names", None)  # main sets them: put back afterwards
    monkeypatch.setitem(gpu_bench.EVERY_CHANGE, "on", False)
    monkeypatch.setattr(gpu_bench, "bench_device", lambda device: {"name": "cpu"})
    monkeypatch.setattr(gpu_bench, "markdown", lambda results: "")

    def generation(out, **ignored):
        if fails:
            raise RuntimeError("before its comparisons")
        return {}

    monkeypatch.setattr(gpu_bench, "bench_generation", generation)
    code = gpu_bench.main(["--preset", "tiny", "--device", "cpu", "--out", str(tmp_path), "--sections", "generation",
                           "--changes", "torch_compile_evaluation_batch"])
    meta = json.loads((tmp_path / "gpu_bench.json").read_text())["meta"]
    assert code == 1
    if fails:
        assert meta["changes_not_reached"] == ["torch_compile_evaluation_batch"] and "unknown_changes" not in meta
    else:
        assert meta["unknown_changes"] == ["torch_compile_evaluation_batch"] and "changes_not_reached" not in meta
