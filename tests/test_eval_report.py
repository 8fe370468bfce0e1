"""The measuring half of `python -m eval` on a tiny run: results.json with every knob, report.md, the figure,
the table of several runs, and bad input (missing clips, an unreadable WAV, no source videos)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from eval.__main__ import main as eval_main
from eval.config import EvalConfig
from eval.evaluate import NOT_COMPARABLE, evaluate
from eval.generate import generate, read_split, select_clips, wav_path
from tests.test_eval_generate import TEST_IDS, VIDEO_IDS, config_for, tiny_run  # noqa: F401  (fixture)
from tests.test_train_support import one_thread  # noqa: F401  (autouse: single-threaded torch)

KNOBS = ("duration", "sample_rate", "sampler", "steps", "guidance", "seed", "clip_count", "checkpoint_sha256",
         "embedder_checkpoints", "samples_per_clip")


@pytest.fixture(scope="module")
def generated(tiny_run, tmp_path_factory) -> Path:  # noqa: F811
    """The WAVs of the four test clips, generated once; each test measures a copy."""
    out = tmp_path_factory.mktemp("generated") / "eval"
    config = config_for(tiny_run, out)
    generate(config, select_clips(read_split(config.shards, "test"), 0), progress=False)
    return out


def measure(tiny_run, generated: Path, out: Path, **changes: object) -> tuple[dict, EvalConfig]:  # noqa: F811
    """Copy the generated WAVs to `out` and evaluate them without generating."""
    shutil.copytree(generated / "wav", out / "wav")
    config = config_for(tiny_run, out, generate=False, figure_clips=0, **changes)
    return evaluate(config, progress=False), config


def test_results_report_and_figure(tiny_run, generated, tmp_path):  # noqa: F811
    data, run = tiny_run
    out = tmp_path / "eval"
    assert eval_main(["--run", str(run), "--shards", str(data), "--output", str(out), "--steps", "2",
                      "--batch-size", "2", "--cache-dir", str(tmp_path / "cache"), "--figure-clips", "2",
                      "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert (results["shards"], results["split"], results["wav_dir"]) == (str(data), "test", "wav")
    assert results["clips"] == list(TEST_IDS) and results["run_name"] == "run"
    assert all(knob in results["protocol"] for knob in KNOBS), set(KNOBS) - set(results["protocol"])
    assert (results["protocol"]["steps"], results["protocol"]["sampler"], results["protocol"]["guidance"]) == (2, "ddim", 3.0)
    assert len(results["protocol"]["checkpoint_sha256"]) == 64
    assert results["protocol"]["embedder_checkpoints"] == {"cnn14": "random-init:seed=0", "vggish": "random-init:seed=0"}
    assert {"torch", "diffusers", "python"} <= results["software"].keys()
    for metric in ("fd", "fad", "kl"):
        assert isinstance(results[metric], float) and math.isfinite(results[metric]), metric
    assert results["counts"]["paired"] == 4 and results["failures"] == []
    # AV-Align on the two clips whose video exists, with its spread; the two others are counted as missing
    av = results["av_align"]
    assert av["n"] + av["n_excluded"] == len(VIDEO_IDS) and av["videos_missing"] == 2
    assert set(results["av_align_per_clip"]) == set(VIDEO_IDS)
    # random embedders: the first line of the report says the numbers are not comparable
    report = (out / "report.md").read_text()
    assert report.splitlines()[0] == f"**{NOT_COMPARABLE}**" and not results["comparable"]
    assert "| run (V+O) |" in report
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "config.json").read_text())["steps"] == 2
    # the WAVs match the generated ones: the same command resumes rather than regenerates
    assert sorted(p.name for p in (out / "wav").iterdir()) == sorted(p.name for p in (generated / "wav").iterdir())


def test_table_gathers_runs(tiny_run, generated, tmp_path):  # noqa: F811
    measure(tiny_run, generated, tmp_path / "a", name="V-only")
    measure(tiny_run, generated, tmp_path / "b", name="V+O", max_clips=3)
    table = tmp_path / "table.md"
    assert eval_main(["table", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(table)]) == 0
    text = table.read_text()
    assert text.splitlines()[0] == f"**{NOT_COMPARABLE}**"
    rows = [line for line in text.splitlines() if line.startswith("| V")]
    assert [row.split(" | ")[0] for row in rows] == ["| V-only (V+O)", "| V+O (V+O)"]
    assert all(len(row.split("|")) == 8 for row in rows)  # run, FD, FAD, KL, AV-Align, clips
    assert "clip_count (4, 3)" in text  # rows measured on different clip sets are flagged
    assert eval_main(["table", str(tmp_path / "a"), str(tmp_path / "nowhere")]) == 2


def test_missing_clips_are_counted_and_refused_below_the_fraction(tiny_run, generated, tmp_path):  # noqa: F811
    shutil.copytree(generated / "wav", tmp_path / "strict" / "wav")
    for clip_id in ("t0", "t3"):
        wav_path(tmp_path / "strict", clip_id).unlink()
    strict = evaluate(config_for(tiny_run, tmp_path / "strict", generate=False, figure_clips=0, min_paired=0.9),
                      progress=False)
    assert strict["counts"]["paired"] == 2 and strict["counts"]["clips"] == 4
    assert strict["fd"] is None and strict["fad"] is None and strict["kl"] is None
    assert "only 2 of 4 clips" in strict["null_reasons"]["fd"]
    assert "2 of 4 clips" in (tmp_path / "strict" / "report.md").read_text()
    on_disk = json.loads((tmp_path / "strict" / "results.json").read_text())
    assert on_disk["fd"] is None and on_disk["null_reasons"]["kl"] == strict["null_reasons"]["kl"]
    # the same WAVs with a lower bar: measured, KL on the 2 pairs
    shutil.copytree(tmp_path / "strict" / "wav", tmp_path / "loose" / "wav")
    loose = evaluate(config_for(tiny_run, tmp_path / "loose", generate=False, figure_clips=0, min_paired=0.5),
                     progress=False)
    assert isinstance(loose["fd"], float) and loose["counts"]["kl_pairs"] == 2


def test_unreadable_wav_is_recorded_not_silenced(tiny_run, generated, tmp_path):  # noqa: F811
    shutil.copytree(generated / "wav", tmp_path / "out" / "wav")
    broken = wav_path(tmp_path / "out", "t1")
    broken.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio")
    results = evaluate(config_for(tiny_run, tmp_path / "out", generate=False, figure_clips=0, min_paired=0.5),
                       progress=False)
    assert [(f["id"], f["stage"]) for f in results["failures"]] == [("t1", "read_wav")]
    assert "t1.wav" in results["failures"][0]["reason"]
    assert results["counts"]["paired"] == 3 and results["counts"]["kl_pairs"] == 3
    assert broken.read_bytes() == b"RIFF\x00\x00\x00\x00WAVEnot audio"  # left as it is, not replaced
    assert "t1" in (tmp_path / "out" / "report.md").read_text()


def test_no_videos_skips_av_align_with_the_reason(tiny_run, generated, tmp_path):  # noqa: F811
    # the first two clips by id have no source video
    results, _ = measure(tiny_run, generated, tmp_path / "out", max_clips=2)
    assert results["av_align"] is None
    reason = results["null_reasons"]["av_align"]
    assert "no source video" in reason and "t0.avi" in reason
    assert isinstance(results["fd"], float)  # the audio metrics are still there
    assert "AV-Align skipped: no source video" in (tmp_path / "out" / "report.md").read_text()
