"""The measuring half of `python -m eval` on a tiny run: results.json with every knob (generation settings from
the WAVs' manifest), report.md, the figure, the table of several runs, and bad input (missing clips, an
unreadable WAV, no source videos, a clip or a metric that fails, missing embedder checkpoints), the metric
variants (KL with sigmoid, IS, AV-Align by the 2023 rule) and the audioldm-eval audio protocol."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import shards
from eval.__main__ import main as eval_main
from eval.audio_embedding import AudioEmbedding
from eval.av_align import av_align_scores
from eval.clips import EvalError, read_split, select_clips, wav_path
from eval.config import EvalConfig
from eval.embed import ShardAudio, reference_audio_hashes, reference_fingerprint
from eval.evaluate import evaluate
from eval.generate import GENERATION_FAILURES, MANIFEST_FILE, generate
from eval.registry import BY_NAME, TABLES, Metric
from eval.report import NOT_COMPARABLE, table
from eval.score import audio_scores, video_score
from tests.conftest import make_sample
from tests.test_eval_generate import FEATURES, SPEC, TEST_IDS, VIDEO_IDS, config_for, tiny_run  # noqa: F401  (fixture)
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
    for metric in ("fd", "fad", "kl", "kl_sigmoid"):
        assert isinstance(results[metric], float) and math.isfinite(results[metric]), metric
    assert results["kl_sigmoid"] != results["kl"]
    assert results["counts"]["paired"] == 4 and results["failures"] == []
    # IS: four clips in ten splits would leave splits empty, and a split of one clip scores exp(0) = 1 whatever
    # the audio (it was reported as 1.000): no score, saying why
    assert results["inception_score"] is None and "inception_score_clips" not in results["counts"]
    assert results["null_reasons"]["inception_score"] == "needs at least 10 generated clips (4)"
    # AV-Align on the two clips whose video exists, with its spread; the two others are counted as missing
    av = results["av_align"]
    assert av["n"] + av["n_excluded"] == len(VIDEO_IDS) and av["videos_missing"] == 2
    assert set(results["av_align_per_clip"]) == set(VIDEO_IDS)
    # the 2023 rule on the same clips, from the same optical flow
    av_2023 = results["av_align_2023"]
    assert av_2023["n"] + av_2023["n_excluded"] == len(VIDEO_IDS) and av_2023["videos_missing"] == 2
    assert set(results["av_align_2023_per_clip"]) == set(VIDEO_IDS)
    # random embedders: the first line of the report says the numbers are not comparable
    report = (out / "report.md").read_text()
    assert report.splitlines()[0] == f"**{NOT_COMPARABLE}**" and not results["comparable"]
    assert "| run (V+O) |" in report
    assert "- AV-Align (2023 rule) over" in report and "- IS not computed: needs at least 10 generated clips" in report
    assert "| KL ↓ | KL-sigmoid ↓ | IS ↑ | AV-Align ↑ | AV-Align 2023 ↑ |" in report
    # how it sampled: --batch-size clips at a time on the CPU, no CUDA graph
    assert results["generation"]["speed"] == {"sampling_batch": 2, "cuda_graphs": False, "device": "cpu"}
    assert "- sampled 2 clips at a time on cpu, CUDA graphs off" in report
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
    assert all(len(row.split("|")) == 11 for row in rows)  # run, FD, FAD, KL, KL-sigmoid, IS, AV-Align (2), clips
    assert "clip_count (4, 3)" in text  # rows measured on different clip sets are flagged
    assert eval_main(["table", str(tmp_path / "a"), str(tmp_path / "nowhere")]) == 2


def test_missing_clips_are_counted_and_refused_below_the_fraction(tiny_run, generated, tmp_path):  # noqa: F811
    shutil.copytree(generated / "wav", tmp_path / "strict" / "wav")
    for clip_id in ("t0", "t3"):
        wav_path(tmp_path / "strict", clip_id).unlink()
    strict = evaluate(config_for(tiny_run, tmp_path / "strict", generate=False, figure_clips=0, min_paired=0.9),
                      progress=False)
    assert strict["counts"]["paired"] == 2 and strict["counts"]["clips"] == 4
    # each clip without a WAV is listed among the failures, once, with the file and the reason; report.md lists it
    assert [(f["id"], f["stage"]) for f in strict["failures"]] == [("t0", "missing_wav"), ("t3", "missing_wav")]
    assert all(f"{f['id']}.wav: no generated WAV" in f["reason"] and "--no-generate" in f["reason"]
               for f in strict["failures"])
    assert strict["counts"]["failures"] == strict["counts"]["failed_clips"] == strict["counts"]["missing_wavs"] == 2
    assert "- `t0` (missing_wav): " in (tmp_path / "strict" / "report.md").read_text()
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


@pytest.mark.parametrize("protocol", ["av-benchmark", "mean-cut"])
def test_a_wav_panns_cannot_take_fails_its_clip_not_the_run(tiny_run, generated, tmp_path, protocol):  # noqa: F811
    """A WAV of 800 samples under a protocol that never pads (av-benchmark; mean-cut with --duration 0) stopped
    the run with Cnn14's ValueError traceback; a float WAV of samples near 1e20 made the Cnn14 outputs infinite
    and nulled FD, KL and IS for every clip, blaming the embedder's weights."""
    import soundfile

    shutil.copytree(generated / "wav", tmp_path / "out" / "wav")
    short, loud = wav_path(tmp_path / "out", "t1"), wav_path(tmp_path / "out", "t2")
    waveform, rate = soundfile.read(short, dtype="float32")
    soundfile.write(short, waveform[:800], rate)
    soundfile.write(loud, waveform * 1e20, rate, subtype="FLOAT")
    changes = {"audio_protocol": protocol} | ({"duration": 0.0} if protocol == "mean-cut" else {})
    results = evaluate(config_for(tiny_run, tmp_path / "out", generate=False, figure_clips=0, min_paired=0.5,
                                  **changes), progress=False)
    failed = {f["id"]: f for f in results["failures"]}
    assert sorted(failed) == ["t1", "t2"] and {f["stage"] for f in failed.values()} == {"embed_audio"}
    assert failed["t1"]["reason"] == (f"{short}: too short for Cnn14 under the {protocol} audio protocol (800 samples at "
                                      "16000 Hz; it takes at least 4960, 0.31 s)")
    assert failed["t2"]["reason"].startswith(f"{loud}: the Cnn14/VGGish output for it is not finite (its peak sample is")
    assert "far outside [-1, 1]" in failed["t2"]["reason"]
    assert results["counts"]["kl_pairs"] == 2
    assert all(isinstance(results[m], float) and math.isfinite(results[m]) for m in ("fd", "fad", "kl", "kl_sigmoid"))


def test_wavs_at_another_rate_or_in_another_format_are_noted_and_drawn_at_their_rate(tiny_run, generated,  # noqa: F811
                                                                                      tmp_path):
    """WAVs at another rate than the manifest's were scored without a word and drawn in figure.png as if at the
    manifest's rate (a 48 kHz WAV stretched 3x); a FLAC named .wav was scored silently."""
    import librosa
    import soundfile

    from eval.report import figure_clips

    shutil.copytree(generated / "wav", tmp_path / "out" / "wav")
    fast, flac = wav_path(tmp_path / "out", "t1"), wav_path(tmp_path / "out", "t2")
    original, rate = soundfile.read(fast, dtype="float32")
    soundfile.write(fast, librosa.resample(original, orig_sr=rate, target_sr=48000), 48000)
    audio, _ = soundfile.read(flac, dtype="float32")
    soundfile.write(flac, audio, rate, format="FLAC")
    config = config_for(tiny_run, tmp_path / "out", generate=False, figure_clips=0, min_paired=0.5)
    results = evaluate(config, progress=False)
    assert results["generation"]["notes"] == [
        f"1 WAV(s) are at another rate than {rate} Hz (e.g. {fast}: 48000 Hz); each was resampled for the embedders",
        f"1 file(s) named .wav are another format (e.g. {flac}: FLAC); they were decoded and scored as they are"]
    drawn = {clip.id: clip for clip in figure_clips(dataclasses.replace(config, figure_clips=4),
                                                    read_split(config.shards, "test"), rate)}
    assert drawn["t1"].generated.shape == original.shape  # at the shards' rate, as the ground truth beside it


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


def test_results_state_the_manifest_not_the_flags(tiny_run, generated, tmp_path):  # noqa: F811
    manifest = json.loads((generated / "wav" / MANIFEST_FILE).read_text())
    # --no-generate with other generation flags: the WAVs' settings are what results.json states
    results, _ = measure(tiny_run, generated, tmp_path / "out", steps=7, guidance=1.5, seed=9, embedder_seed=3)
    protocol = results["protocol"]
    assert (protocol["steps"], protocol["guidance"], protocol["seed"]) == (2, 3.0, 0)
    assert protocol["generation_manifest"] == manifest and protocol["checkpoint_sha256"] == manifest["checkpoint_sha256"]
    assert results["generation"] == {"generated_in_this_run": False, "wavs_written": 0, "manifest_found": True,
                                     "notes": [], "speed": None}  # nothing sampled: no sampling speed
    assert protocol["generated_sample_rate"] == 16000
    # the random embedders follow embedder_seed, not the generation seed
    assert protocol["embedder_checkpoints"] == {"cnn14": "random-init:seed=3", "vggish": "random-init:seed=3"}
    assert (protocol["embedder_seed"], protocol["random_embedder_size"]) == (3, "tiny")
    # every number the metrics rest on
    assert (protocol["fd_eps"], protocol["kl_eps"]) == (1e-6, 1e-6)
    assert protocol["av_align"]["flow_min_magnitude"] == 0.1 and protocol["av_align"]["match_window_frames"] == 1
    assert protocol["av_align_2023"]["flow_min_magnitude"] == 0.0 and "34d9502" in protocol["av_align_2023"]["method"]
    assert protocol["inception_score"] == {"probabilities": "softmax(fc_audioset)", "set": "generated", "splits": 10,
                                           "shuffle_seed": 2020}
    assert (protocol["audio_protocol"], protocol["duration"]) == ("mean-cut", 10.0)
    assert "soxr_hq" in protocol["resampler"]
    assert len(protocol["reference"]["fingerprint"]) == 64 and protocol["reference"]["sample_rate"] == 16000
    # generating into that folder with those flags is refused before anything is written
    with pytest.raises(EvalError, match="generated with other settings"):
        evaluate(config_for(tiny_run, tmp_path / "out", steps=7, figure_clips=0), progress=False)
    # WAVs of unknown origin: the generation knobs are null and the report says why
    (tmp_path / "out" / "wav" / MANIFEST_FILE).unlink()
    unknown = evaluate(config_for(tiny_run, tmp_path / "out", generate=False, figure_clips=0), progress=False)
    assert unknown["protocol"]["steps"] is None and unknown["protocol"]["generated_sample_rate"] == 16000
    assert "manifest.json is missing" in (tmp_path / "out" / "report.md").read_text()


def test_table_flags_embedders_of_another_size():
    def row(size: str, channels: list[int]) -> dict:
        return {"run_name": size, "comparable": False, "fd": 1.0, "counts": {"clips": 4, "paired": 4},
                "protocol": {"embedder_checkpoints": {"cnn14": "random-init:seed=0"}, "random_embedder_size": size,
                             "embedders": {"cnn14": {"channels": channels}}}}

    text = table([row("tiny", [4, 8]), row("paper", [64, 128])])
    assert "embedders (" in text and "random_embedder_size (" in text
    assert "Rows differ" not in table([row("tiny", [4, 8]), row("tiny", [4, 8])])


def test_missing_embedder_checkpoints_are_one_line_each_and_the_rest_runs(tiny_run, generated, tmp_path, caplog):  # noqa: F811
    folder = tmp_path / "none"
    with caplog.at_level("WARNING"):
        results, _ = measure(tiny_run, generated, tmp_path / "out", random_embedders=False,
                             embedder_weights=str(folder))
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and str(folder) in r.getMessage()]
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert any(str(folder / "Cnn14_16k_mAP=0.438.pth") in line for line in lines)
    assert any(str(folder / "vggish-10086976.pth") in line for line in lines)
    for name in ("fd", "fad", "kl", "kl_sigmoid", "inception_score"):
        assert results[name] is None and "missing" in results["null_reasons"][name]
    assert results["null_reasons"]["fd"].startswith(str(folder / "Cnn14_16k_mAP=0.438.pth"))
    assert results["null_reasons"]["fad"].startswith(str(folder / "vggish-10086976.pth"))
    assert results["av_align"] is not None  # needs no weights: still measured
    assert results["comparable"] and results["protocol"]["embedder_checkpoints"] == {}


def test_failures_are_counted_once(tiny_run, generated, tmp_path):  # noqa: F811
    shutil.copytree(generated / "wav", tmp_path / "out" / "wav")
    wav_path(tmp_path / "out", "t0").unlink()
    for _ in range(2):  # the same clip failing on two runs
        shards.append_jsonl(tmp_path / "out" / GENERATION_FAILURES, {"id": "t0", "stage": "generate", "reason": "x"})
    broken = wav_path(tmp_path / "out", "t2")  # t2 has a source video: AV-Align must not list it again
    broken.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio")
    results = evaluate(config_for(tiny_run, tmp_path / "out", generate=False, figure_clips=0, min_paired=0.5),
                       progress=False)
    assert sorted((f["id"], f["stage"]) for f in results["failures"]) == [("t0", "generate"), ("t2", "read_wav")]
    assert results["counts"]["failures"] == 2 and results["counts"]["failed_clips"] == 2
    assert results["counts"]["missing_wavs"] == 1  # t0: listed by its generation failure, not a second time
    assert results["av_align"]["n"] + results["av_align"]["n_excluded"] == 1  # t3 alone
    assert results["av_align_2023"]["n"] + results["av_align_2023"]["n_excluded"] == 1


def av_align_double(video: str, start: float, duration: float, wav: str) -> dict[str, float]:
    """AV-Align stand-in: OpenCV's error for clip t2 (as Farneback on a stream that changes size), 0.5 (2025 rule)
    and 1.5 (2023 rule) otherwise."""
    import cv2

    if wav.endswith("t2.wav"):
        raise cv2.error("OpenCV(4.x) optflowgf.cpp: error: (-215:Assertion failed) prev0.size() == next0.size()")
    return {"av_align": 0.5, "av_align_2023": 1.5}


def dying_worker(video: str, start: float, duration: float, wav: str) -> dict[str, float]:
    os._exit(1)


def test_one_bad_clip_does_not_end_av_align(tiny_run, generated, tmp_path):  # noqa: F811
    clips = select_clips(read_split(tiny_run[0], "test"), 0)
    failures: list[dict[str, str]] = []
    results = av_align_scores(generated, clips, 1, failures, False, measure=av_align_double)
    av, av_2023 = results["av_align"], results["av_align_2023"]
    assert av["per_clip"] == {"t3": 0.5} and av["n"] == 1
    assert av_2023["per_clip"] == {"t3": 1.5} and av_2023["mean"] == 1.5
    assert [(f["id"], f["stage"]) for f in failures] == [("t2", "av_align")]  # once, not once per rule
    assert failures[0]["reason"].startswith("error: OpenCV")
    failures.clear()
    results = av_align_scores(generated, clips, 2, failures, False, measure=dying_worker)  # a worker that crashes
    assert results["av_align"]["n"] == 0 and results["av_align_2023"]["n"] == 0
    assert sorted(f["id"] for f in failures) == sorted(VIDEO_IDS)
    assert all("BrokenProcessPool" in f["reason"] for f in failures)


def test_a_failing_metric_is_null_with_its_reason(tiny_run, generated, tmp_path):  # noqa: F811
    rng = np.random.default_rng(0)

    def embedding(dim: int) -> AudioEmbedding:
        return AudioEmbedding(rng.standard_normal(dim), rng.dirichlet(np.ones(5)), rng.standard_normal((3, 8)),
                              rng.standard_normal(5))

    reference = {f"c{i}": embedding(4) for i in range(12)}
    generated_set = {f"c{i}": embedding(6) for i in range(12)}  # another Cnn14 width: FD cannot be computed
    metrics, reasons = audio_scores(reference, generated_set, 12, 0.9)
    assert metrics["fd"] is None and "ValueError" in reasons["fd"]
    assert all(isinstance(metrics[k], float) for k in ("fad", "kl", "kl_sigmoid", "inception_score"))
    assert set(reasons) == {"fd"}


def random_embeddings(seed: int = 0) -> Callable[[], AudioEmbedding]:
    """A maker of random AudioEmbeddings (4-d Cnn14 embedding, 5 classes, three 8-d VGGish patches)."""
    rng = np.random.default_rng(seed)

    def embedding() -> AudioEmbedding:
        return AudioEmbedding(rng.standard_normal(4), rng.dirichlet(np.ones(5)), rng.standard_normal((3, 8)),
                              rng.standard_normal(5))

    return embedding


def test_a_non_finite_metric_is_null_with_its_reason(monkeypatch):
    """A metric that comes out NaN or infinite without raising (the metrics refuse non-finite embeddings, so this
    takes a statistic that overflows) is null with a reason, as a failing one is; results.json used to show null
    with no reason."""
    import eval.score

    embedding = random_embeddings()
    reference = {f"c{i}": embedding() for i in range(12)}
    generated_set = {f"c{i}": embedding() for i in range(12)}
    real = eval.score.audio_metrics

    def overflowing(*args, **kwargs):
        result = real(*args, **kwargs)  # one group of metrics (same min_clips) at a time
        return result | {k: v for k, v in (("fd", np.float64("inf")), ("kl", float("nan"))) if k in result}

    monkeypatch.setattr(eval.score, "audio_metrics", overflowing)
    metrics, reasons = audio_scores(reference, generated_set, 12, 0.9)
    assert (metrics["fd"], metrics["kl"]) == (None, None)
    assert reasons == {"fd": "computation gave inf (a statistic overflowed or was undefined)",
                       "kl": "computation gave nan (a statistic overflowed or was undefined)"}
    assert all(isinstance(metrics[k], float) and math.isfinite(metrics[k]) for k in ("fad", "inception_score"))


def test_one_clip_is_too_few_for_every_embedding_metric_and_says_so_plainly():
    """With one clip per set, every embedding metric is null; the reason said "a Frechet distance needs at least 2
    clips" also for KL and the Inception score, which are no Frechet distances."""
    rng = np.random.default_rng(0)
    one = {"c0": AudioEmbedding(rng.standard_normal(4), rng.dirichlet(np.ones(5)), rng.standard_normal((3, 8)),
                                rng.standard_normal(5))}
    metrics, reasons = audio_scores(one, one, 1, 0.9)
    assert set(reasons) == {"fd", "fad", "kl", "kl_sigmoid", "kl_panns", "inception_score"}
    assert all(metrics[name] is None for name in reasons)
    assert reasons.pop("inception_score") == "needs at least 10 generated clips (1)"
    assert set(reasons.values()) == {"needs at least 2 clips per set (1 reference, 1 generated)"}


def test_reference_audio_streams_in_shard_order(tmp_path):
    """Two ranks with ids round-robin (as stage one writes them): the audio is read in shard order, one clip at a
    time, and a changed clip changes its hash alone."""
    data = tmp_path / "shards"
    data.mkdir()
    meta = {"schema_version": shards.SCHEMA_VERSION, "spec": SPEC.to_dict(), "config": dataclasses.asdict(FEATURES)}
    (data / shards.META_FILE).write_text(json.dumps(meta), encoding="utf-8")
    waves = {f"c{i}": (0.2 * np.sin(np.arange(8000) * (i + 1) * 0.05)).astype(np.float32) for i in range(4)}

    def write(rank: int, ids: tuple[str, ...]) -> None:
        writer = shards.ShardWriter(data, "test", rank, 8)
        for clip_id in ids:
            sample_meta, arrays, _ = make_sample(spec=SPEC, clip_id=clip_id, split="test")
            writer.write(shards.encode_sample(SPEC, sample_meta, arrays, waves[clip_id]))
        writer.close()

    write(0, ("c0", "c2"))
    write(1, ("c1", "c3"))
    order = [c.id for c in read_split(data, "test")]
    assert order == ["c0", "c2", "c1", "c3"]
    audio = ShardAudio(data, "test", order)
    stream = audio.stream
    for clip_id in ("c0", "c1", "c3"):  # c2 cached: skipped, never held
        np.testing.assert_allclose(audio(clip_id), waves[clip_id], atol=1 / 32767)
        assert audio.stream is stream  # one pass
    np.testing.assert_allclose(audio("c2"), waves["c2"], atol=1 / 32767)  # out of order: the stream restarts
    assert audio.stream is not stream
    with pytest.raises(EvalError, match="'zz' not found"):
        audio("zz")
    before = reference_audio_hashes(data, "test", order)
    shards.list_shards(data)[1].unlink()
    waves["c1"] = -waves["c1"]
    write(1, ("c1", "c3"))
    after = reference_audio_hashes(data, "test", order)
    assert [k for k in order if before[k] != after[k]] == ["c1"]
    assert reference_fingerprint(before) != reference_fingerprint(after)


# the results.json layout before the pipeline was split into modules: older files must still read the same
# (every key kept with its meaning; newer keys are added beside them)
RESULTS_KEYS = ["av_align", "av_align_per_clip", "clips", "comparable", "config", "counts", "fad", "failures", "fd",
                "generation", "kl", "null_reasons", "protocol", "run", "run_name", "shards", "software", "split",
                "warning", "wav_dir"]
PROTOCOL_KEYS = ["av_align", "checkpoint_sha256", "clip_count", "duration", "embedder_checkpoints", "embedder_seed",
                 "embedders", "fd_eps", "generated_sample_rate", "generation_manifest", "guidance", "inputs", "kl_eps",
                 "max_clips", "peak", "random_embedder_size", "random_embedders", "reference", "resampler",
                 "sample_rate", "sampler", "samples_per_clip", "scheme", "seed", "steps", "train_preset", "vae",
                 "vae_scaling_factor", "window_seconds"]
COUNTS_KEYS = ["clips", "failed_clips", "failures", "kl_pairs", "min_paired", "n_generated_patches",
               "n_reference_patches", "paired", "paired_fraction", "reference", "videos_missing"]
# added with the metric variants and the audio protocol
NEW_RESULTS_KEYS = ["av_align_2023", "av_align_2023_per_clip", "inception_score", "kl_sigmoid"]
NEW_PROTOCOL_KEYS = ["audio_protocol", "av_align_2023", "inception_score"]
NEW_COUNTS_KEYS: list[str] = []  # the Inception score's (inception_score_clips, ...) come with 10 clips or more
SUMMARY_KEYS = ["ci95_high", "ci95_low", "mean", "n", "n_excluded", "sem", "std", "videos_missing"]


def test_results_json_keys_are_kept(tiny_run, generated, tmp_path):  # noqa: F811
    results, _ = measure(tiny_run, generated, tmp_path / "out")
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted(on_disk) == sorted(results)
    assert set(RESULTS_KEYS) | set(NEW_RESULTS_KEYS) <= set(on_disk)
    assert set(PROTOCOL_KEYS) | set(NEW_PROTOCOL_KEYS) <= set(on_disk["protocol"])
    assert set(COUNTS_KEYS) | set(NEW_COUNTS_KEYS) <= set(on_disk["counts"])
    assert sorted(on_disk["generation"]) == ["generated_in_this_run", "manifest_found", "notes", "speed", "wavs_written"]
    assert sorted(on_disk["av_align"]) == sorted(on_disk["av_align_2023"]) == SUMMARY_KEYS


def test_the_registry_drives_the_table(monkeypatch):
    assert [BY_NAME[name].header for name in TABLES["paper"]] == ["FD ↓", "FAD ↓", "KL ↓", "KL-sigmoid ↓", "IS ↑",
                                                                  "AV-Align ↑", "AV-Align 2023 ↑"]
    # a row of an older results.json (no KL-sigmoid, IS, AV-Align 2023): the new columns show '—'
    row = {"run_name": "r", "comparable": True, "fd": 1.0, "fad": 2.0, "kl": 0.5, "loudness": 7.25,
           "av_align": {"mean": 0.5, "ci95_low": 0.25, "ci95_high": 0.75}, "counts": {"clips": 4, "paired": 3},
           "protocol": {}}
    lines = table([row]).splitlines()
    assert lines[:3] == ["| Run | FD ↓ | FAD ↓ | KL ↓ | KL-sigmoid ↓ | IS ↑ | AV-Align ↑ | AV-Align 2023 ↑ | Clips (paired) |",
                         "|---|---|---|---|---|---|---|---|---|",
                         "| r | 1.000 | 2.000 | 0.500 | — | — | 0.500 ± 0.250 | — | 4 (3) |"]
    newer = {**row, "kl_sigmoid": -0.125, "inception_score": 3.5,
             "av_align_2023": {"mean": 1.25, "ci95_low": 1.0, "ci95_high": 1.5}}
    assert table([newer]).splitlines()[2] == "| r | 1.000 | 2.000 | 0.500 | -0.125 | 3.500 | 0.500 ± 0.250 | 1.250 ± 0.250 | 4 (3) |"
    # one more entry in a table is one more column (header, separator and cell), with nothing else to change
    extra = Metric("loudness", "Loudness", "higher", "cnn14", lambda reference, generated, counts: 0.0)
    monkeypatch.setitem(BY_NAME, "loudness", extra)
    monkeypatch.setitem(TABLES, "paper", (*TABLES["paper"], "loudness"))
    lines = table([row]).splitlines()
    assert lines[0].endswith("| AV-Align 2023 ↑ | Loudness ↑ | Clips (paired) |")
    assert lines[1] == "|---|" + "---|" * 9 and lines[2].endswith("| — | 7.250 | 4 (3) |")


def test_table_flags_another_audio_protocol_and_reads_older_files_as_mean_cut():
    def row(name: str, **protocol: object) -> dict:
        return {"run_name": name, "comparable": True, "fd": 1.0, "counts": {"clips": 4, "paired": 4},
                "protocol": {"duration": 10.0, **protocol}}

    older = row("older")  # written before the knob existed: measured with mean-cut
    assert "Rows differ" not in table([older, row("new", audio_protocol="mean-cut")])
    text = table([older, row("audioldm", audio_protocol="audioldm-eval")])
    assert 'audio_protocol ("mean-cut", "audioldm-eval")' in text
    # a metric knob a file predates is left out of the comparison, not reported as a difference
    assert "Rows differ" not in table([older, row("new", inception_score={"splits": 10})])
    assert "inception_score (" in table([row("a", inception_score={"splits": 10}), row("b", inception_score={"splits": 5})])


def test_audioldm_eval_protocol_is_recorded_and_cached_apart(tiny_run, generated, tmp_path):  # noqa: F811
    mean_cut, _ = measure(tiny_run, generated, tmp_path / "a", av_align=False)
    audioldm, _ = measure(tiny_run, generated, tmp_path / "b", av_align=False, audio_protocol="audioldm-eval")
    assert (audioldm["protocol"]["audio_protocol"], audioldm["protocol"]["duration"]) == ("audioldm-eval", None)
    assert mean_cut["protocol"]["audio_protocol"] == "mean-cut"
    assert audioldm["fd"] != mean_cut["fd"] and audioldm["kl"] != mean_cut["kl"]
    assert len(list((tmp_path / "cache").glob("*.h5"))) == 2  # one reference cache per audio protocol
    assert "- audio_protocol: `\"audioldm-eval\"`" in (tmp_path / "b" / "report.md").read_text()
    assert 'audio_protocol ("mean-cut", "audioldm-eval")' in table([mean_cut, audioldm])


def test_video_metrics_sharing_a_compute_measure_once(tmp_path):
    calls: list[int] = []

    def both_rules(out_dir, clips, workers, failures, progress) -> dict:
        calls.append(1)
        return {"first": {"mean": 0.25}, "second": {"mean": 0.75}}

    first = Metric("first", "First", "higher", None, both_rules, switch="av_align")
    second = Metric("second", "Second", "higher", None, both_rules, switch="av_align")
    config = EvalConfig(output=str(tmp_path))
    measured: dict = {}
    assert video_score(first, config, [], [], False, measured) == {"mean": 0.25}
    assert video_score(second, config, [], [], False, measured) == {"mean": 0.75}
    assert calls == [1]  # one optical flow for both AV-Align rules
    off = config.replace(av_align=False)
    assert video_score(second, off, [], [], False, {}) == {"skipped": "turned off (--no-av-align)"}


def test_damaged_results_json_is_one_line_naming_it(tmp_path, capsys):
    """results.json that is JSON of the wrong shape (a list, a metric that is not a measurement, counts that are not
    an object) or not UTF-8: `eval table` said so in a traceback, or in a line naming no file."""
    from eval.listen.study import load_run
    from eval.report import load_results

    folder = tmp_path / "run"
    folder.mkdir()
    path = folder / "results.json"
    for content, reason in (("[1, 2]", "not a JSON object"), ('{"fd": {"x": 1}}', "fd is not a measurement"),
                            ('{"fd": "abc"}', "fd is not a measurement"), ('{"counts": []}', "counts is not an object"),
                            ('{"av_align": "high"}', "av_align is not a measurement"),
                            # what no evaluation writes (it writes NaN as null), though Python's JSON reads it
                            ('{"fd": NaN}', "fd is not a measurement"), ('{"fd": -Infinity}', "fd is not a measurement"),
                            ('{"fd": 1e400}', "fd is not a measurement"), ('{"kl": true}', "kl is not a measurement"),
                            ('{"av_align": {"mean": NaN, "n": 3}}', "av_align is not a measurement")):
        path.write_text(content)
        with pytest.raises(ValueError, match=rf"results\.json: {reason}"):
            load_results(folder)
        assert eval_main(["table", str(folder)]) == 2
        assert f"{path}: {reason}" in capsys.readouterr().err
    path.write_bytes('{"fd": 1.0}'.encode("utf-16"))
    with pytest.raises(ValueError, match=r"results\.json: not readable as JSON"):
        load_results(folder)
    path.write_text('{"shards": "s", "split": "test", "clips": 3}')
    with pytest.raises(ValueError, match=r"results\.json: clips is not a list of clip ids"):
        load_run(folder)


def test_a_damaged_sample_is_found_before_scoring_without_generating(tiny_run, generated, tmp_path, capsys):  # noqa: F811
    """With --no-generate (or every WAV there) no sample was decoded before the figure, which found a damaged one
    after results.json was written: the run stopped half-reported. Every clip's sample is now checked before
    scoring: one line naming shard and sample, and nothing written."""
    import io

    from tests.conftest import rewrite_shard

    data, run = tiny_run
    copy = tmp_path / "shards"
    shutil.copytree(data, copy)
    victim = TEST_IDS[1]
    path = next(p for p in shards.list_shards(copy, "test") if shards.sample_key(victim) in shards.shard_index(p))

    def nan_probs(name: str, payload: bytes) -> bytes:
        if name != f"{shards.sample_key(victim)}.probs.npy":
            return payload
        probs = np.load(io.BytesIO(payload)).copy()
        probs.flat[0] = np.nan
        buffer = io.BytesIO()
        np.save(buffer, probs)
        return buffer.getvalue()

    rewrite_shard(path, nan_probs)
    out = tmp_path / "eval"
    shutil.copytree(generated / "wav", out / "wav")
    capsys.readouterr()
    assert eval_main(["--run", str(run), "--shards", str(copy), "--output", str(out), "--no-generate",
                      "--cache-dir", str(tmp_path / "cache"), "--figure-clips", "2", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "probs.npy has non-finite values" in err, err
    assert not (out / "results.json").exists() and not (out / "report.md").exists()


def test_a_run_with_other_clips_moves_the_results_before_it_aside_and_one_clip_prints_no_nan(
        tiny_run, generated, tmp_path, monkeypatch, capsys):  # noqa: F811
    """A rerun with other clips that then failed left results.json, report.md and figure.png describing the clips
    before, beside a clip_ids.txt that no longer listed them; a single clip printed 'x ± nan' to the console."""
    import eval.evaluate

    out = tmp_path / "out"
    shutil.copytree(generated / "wav", out / "wav")
    config = config_for(tiny_run, out, generate=False, figure_clips=1)
    evaluate(config, progress=False)
    assert (out / "figure.png").exists()
    before = (out / "results.json").read_text()

    def failing(*args, **kwargs):
        raise EvalError("scoring failed")

    monkeypatch.setattr(eval.evaluate, "score", failing)
    with pytest.raises(EvalError, match="scoring failed"):
        evaluate(dataclasses.replace(config, max_clips=1), progress=False)
    assert (out / "clip_ids.txt").read_text().split() == ["t0"]
    assert not (out / "results.json").exists() and not (out / "report.md").exists()
    [moved] = (out / "superseded").iterdir()
    assert (moved / "results.json").read_text() == before and {p.name for p in moved.iterdir()} == {
        "results.json", "report.md", "figure.png"}
    monkeypatch.undo()
    one_clip = ["--run", str(config.run), "--shards", str(config.shards), "--output", str(out), "--no-generate",
                "--steps", "2", "--cache-dir", str(config.cache_folder), "--max-clips", "1", "--figure-clips", "0",
                "--min-paired", "0", "--quiet"]
    assert eval_main(one_clip) == 0
    printed = capsys.readouterr().out
    assert "nan" not in printed.lower() and json.loads((out / "results.json").read_text())["clips"] == ["t0"]
    assert eval_main(one_clip) == 0
    assert eval_main([*one_clip, "--workers", "2"]) == 0  # a setting that changes no number
    assert len(list((out / "superseded").iterdir())) == 1  # the same run's results: replaced, not moved


def test_an_output_file_that_cannot_be_written_is_one_line(tiny_run, generated, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    shutil.copytree(generated / "wav", out / "wav")
    (out / "figure.png").mkdir()
    config = config_for(tiny_run, out, generate=False, figure_clips=1)
    assert eval_main(["--run", str(config.run), "--shards", str(config.shards), "--output", str(out), "--no-generate",
                      "--steps", "2", "--cache-dir", str(config.cache_folder), "--figure-clips", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {out / 'figure.png'}: cannot be written (Is a directory)", err
    assert "Traceback" not in "\n".join(err) and not list(out.glob("*.tmp*"))


def test_the_inception_score_needs_ten_generated_clips_whatever_the_reference_holds():
    """It uses the generated set alone, but was refused when the reference set held fewer than 10 clips (a
    reference clip too short to embed took it down)."""
    embedding = random_embeddings()
    generated_set = {f"c{i}": embedding() for i in range(10)}
    reference = {f"c{i}": embedding() for i in range(9)}
    metrics, reasons = audio_scores(reference, generated_set, 10, 0.5)
    assert isinstance(metrics["inception_score"], float) and "inception_score" not in reasons
    metrics, reasons = audio_scores(reference, dict(list(generated_set.items())[:9]), 10, 0.5)
    assert metrics["inception_score"] is None and reasons["inception_score"] == "needs at least 10 generated clips (9)"


def test_reference_audio_too_short_for_the_protocol_is_each_clip_s_failure(tiny_run, generated, tmp_path):  # noqa: F811
    """Cut to 0.2 s (av-benchmark never pads), every reference and generated clip is too short for Cnn14: each is
    listed once per side, the metrics are null with their reason, and nothing stops the run."""
    results, _ = measure(tiny_run, generated, tmp_path / "out", audio_protocol="av-benchmark", duration=0.2,
                         min_paired=0.5)
    stages = sorted({(f["id"], f["stage"]) for f in results["failures"]})
    assert stages == sorted((clip_id, stage) for clip_id in TEST_IDS for stage in ("embed_audio", "embed_reference"))
    reference = next(f["reason"] for f in results["failures"] if f["stage"] == "embed_reference")
    assert "its reference audio cannot be embedded: too short for Cnn14 under the av-benchmark audio protocol" in reference
    assert results["fd"] is None and "only 0 of 4 clips" in results["null_reasons"]["fd"]


def slow_marking(video: str, start: float, duration: float, wav: str) -> dict[str, float]:
    """AV-Align stand-in that notes each clip it measures (one line in $AV_ALIGN_MARKS) and takes 0.2 s."""
    import time

    with open(os.environ["AV_ALIGN_MARKS"], "a") as marks:
        marks.write(wav + "\n")
    time.sleep(0.2)
    return {"av_align": 0.5, "av_align_2023": 0.5}


def test_a_stop_signal_drops_the_queued_av_align_clips(tiny_run, generated, tmp_path, monkeypatch):  # noqa: F811
    """SIGTERM (made a SystemExit by `exit_on_stop_signals`) during AV-Align waited for every queued clip before
    evaluation stopped (the pool's shutdown waited; its workers, forked with the handler, ran on): on a test set
    of thousands, until the scheduler's SIGKILL. The workers ignore the signal and the queued clips are dropped."""
    import signal
    import threading

    from common.signals import exit_on_stop_signals

    marks = tmp_path / "marks.txt"
    monkeypatch.setenv("AV_ALIGN_MARKS", str(marks))
    clips = select_clips(read_split(tiny_run[0], "test"), 0) * 20
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    with pytest.raises(SystemExit) as stop, exit_on_stop_signals(tmp_path):
        timer.start()
        av_align_scores(generated, clips, 2, [], False, measure=slow_marking)
    timer.join()
    assert stop.value.code == 128 + signal.SIGTERM
    measured = len(marks.read_text().splitlines())
    assert 0 < measured < len(clips) // 4, measured  # of the 40 clips with a WAV, only those already begun


def sleeping_marking(video: str, start: float, duration: float, wav: str) -> dict[str, float]:
    """AV-Align stand-in that notes its process id (one line in $AV_ALIGN_MARKS) and sleeps for a minute."""
    import time

    with open(os.environ["AV_ALIGN_MARKS"], "a") as marks:
        marks.write(f"{os.getpid()}\n")
    time.sleep(60)
    return {"av_align": 0.5, "av_align_2023": 0.5}


def test_av_align_workers_die_with_a_killed_evaluation(tiny_run, generated, tmp_path):  # noqa: F811
    """SIGKILL during AV-Align left its pool's workers running (they ignore SIGTERM), holding the evaluation
    folder's lock: the same command then waited 60 s and gave up. They now die with the evaluation."""
    import subprocess
    import sys
    import time

    marks = tmp_path / "marks.txt"
    script = ("import sys; from pathlib import Path; from eval.av_align import av_align_scores; "
              "from eval.clips import read_split, select_clips; from tests.test_eval_report import sleeping_marking; "
              "clips = select_clips(read_split(Path(sys.argv[1]), 'test'), 0); "
              "av_align_scores(Path(sys.argv[2]), clips, 2, [], False, measure=sleeping_marking)")
    env = {**os.environ, "AV_ALIGN_MARKS": str(marks), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    job = subprocess.Popen([sys.executable, "-c", script, str(tiny_run[0]), str(generated)], env=env)
    try:
        deadline = time.monotonic() + 60
        while (not marks.exists() or len(marks.read_text().split()) < 2) and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = [int(pid) for pid in marks.read_text().split()]
        assert len(workers) == 2
    finally:
        job.kill()
        job.wait()

    def running(pid: int) -> bool:  # a zombie no init reaps counts as gone
        try:
            return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 10
    while any(map(running, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in workers if running(pid)]
    for pid in left:
        os.kill(pid, 9)
    assert not left


def test_a_wav_cut_short_is_refused_naming_the_file(tmp_path):
    """A WAV whose data chunk holds a third of the bytes its header declares was read as a shorter clip, padded and
    scored without a word. WAVs written to a pipe (sizes unknown), RF64 and chunks after the data stay readable."""
    import subprocess

    import soundfile

    from eval.clips import read_wav

    sound = np.sin(np.arange(16000, dtype=np.float32) * 0.05) * 0.5
    for name, kind in (("whole.wav", "WAV"), ("whole64.wav", "RF64")):
        soundfile.write(tmp_path / name, sound, 16000, subtype="PCM_16", format=kind)
        assert read_wav(tmp_path / name)[0].shape == (16000,)
        data = (tmp_path / name).read_bytes()
        cut = tmp_path / f"cut_{name}"
        cut.write_bytes(data[: len(data) // 3])
        with pytest.raises(ValueError, match=rf"^{cut}: its data chunk is cut short: \d+ of 32000 bytes$"):
            read_wav(cut)
    piped = tmp_path / "piped.wav"
    subprocess.run(f"ffmpeg -v error -f lavfi -i sine=duration=1 -f wav pipe:1 > {piped}", shell=True, check=True)
    listed = tmp_path / "listed.wav"  # ffmpeg writes a LIST chunk before the data
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=duration=1", str(listed)], check=True)
    for path in (piped, listed):
        assert read_wav(path)[0].shape == (44100,)


def test_an_unreadable_wav_is_a_failure_whatever_the_metrics(tiny_run, generated, tmp_path):  # noqa: F811
    """With AV-Align alone (no audio embedder pass) an empty, NaN or cut-short WAV was left out without a record
    and counted as paired."""
    import soundfile

    out = tmp_path / "eval"
    shutil.copytree(generated / "wav", out / "wav")
    first, second, third = TEST_IDS[:3]
    soundfile.write(wav_path(out, first), np.zeros(0, np.float32), 16000)
    soundfile.write(wav_path(out, second), np.full(1600, np.nan, np.float32), 16000, subtype="FLOAT")
    data = wav_path(out, third).read_bytes()
    wav_path(out, third).write_bytes(data[: len(data) // 2])
    config = config_for(tiny_run, out, generate=False, figure_clips=0, metrics="av_align,av_align_2023")
    results = evaluate(config, progress=False)
    unreadable = {f["id"]: f["reason"] for f in results["failures"] if f["stage"] == "read_wav"}
    assert sorted(unreadable) == sorted([first, second, third])
    assert "cut short" in unreadable[third] and str(wav_path(out, third)) in unreadable[third]
    assert results["counts"]["paired"] == len(TEST_IDS) - 3


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_pool_workers_start_under_every_start_method(method):
    """The check that the job is still alive compared the worker's parent with the job: under forkserver (Python
    3.14's default on Linux) the parent is the fork server, and every worker exited at once (BrokenProcessPool)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from common.signals import pool_worker

    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context(method), initializer=pool_worker,
                             initargs=(os.getpid(),)) as pool:
        assert list(pool.map(abs, [-1, -2, -3])) == [1, 2, 3]
