"""The GPU benchmark script runs end to end on the CPU with the tiny models and reports every section with numbers."""

from __future__ import annotations

import json
import numbers

import pytest

from benchmarks import gpu_bench


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
    training = results["training"]
    assert positive(training["tflop_per_step"])
    for key in ("from_shards", "from_memory"):
        assert positive(training[key]["samples_per_second"]) and positive(training[key]["mfu_vs_measured_matmul"])
    runs = results["generation"]["runs"]
    assert {(r["sampler"], r["steps"], r["batch"]) for r in runs} == {(s, n, b) for s, n in gpu_bench.SAMPLERS
                                                                      for b in gpu_bench.GENERATION_BATCHES}
    assert all(positive(r["seconds_per_clip"]) for r in runs)
    summary = (tmp_path / "gpu_bench.md").read_text()
    assert "### Stage one" in summary and "ddim-300" in summary and "dpmsolver++-25" in summary

    # every before/after comparison that can run on the CPU ran; the CUDA-only ones and torch.compile (without
    # --compile) say why they were skipped; none failed
    cpu_runs = {"stage_one": {"grounding_dino_batched", "decode_worker_transfer", "background_shard_writer"},
                "training": {"fused_attention", "channels_last", "batch_x4"}, "generation": {"channels_last"}}
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
