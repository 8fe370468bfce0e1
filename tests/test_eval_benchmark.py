"""av-benchmark's metrics in `python -m eval`: frames picked as ffmpeg's fps filter picks them (checked against
ffmpeg itself), the per-clip array cache, KL in log space (checked against av-benchmark's torch formula), its
audio front end (checked against torchaudio's Resample), the --metrics selection, and an evaluation with every
metric on clips with source videos (random embedders), including missing weights for some of them."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torch.nn.functional as F

import shards
from eval.__main__ import main as eval_main
from eval.array_cache import cached_arrays
from eval.audio_embedding import prepare_waveform
from eval.config import PRESETS
from eval.evaluate import evaluate
from eval.metrics import kl_log_softmax
from eval.registry import BY_NAME, METRICS, TABLES, select_metrics
from eval.video_frames import VideoReadError, fps_filter_indices, window_frames
from preprocess.config import PRESETS as FEATURE_PRESETS
from tests.conftest import make_sample
from tests.media import frame_index, make_video
from tests.test_train_support import one_thread  # noqa: F401  (autouse: single-threaded torch)


# ----------------------------------------------------------------------------------------------------------------
# Frames at a rate, as ffmpeg's fps filter picks them
# ----------------------------------------------------------------------------------------------------------------
def ffmpeg_indices(path: Path, start: float, rate: float) -> list[int]:
    """The frame indices ffmpeg's own fps filter outputs from `start` on (what av-benchmark's reader sees)."""
    width, height = 96, 64
    out = subprocess.run(["ffmpeg", "-v", "error", "-ss", repr(start), "-i", str(path),
                          "-vf", f"fps={rate}", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         check=True, capture_output=True).stdout
    frames = np.frombuffer(out, np.uint8).reshape(-1, height, width, 3)
    return [frame_index(f) for f in frames]


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
@pytest.mark.parametrize(("fps", "start", "rate", "seconds"), [
    (25, 0.0, 0.5, 8.0), (25, 0.0, 25.0, 8.0), (30, 0.0, 25.0, 8.0), (30, 1.3, 0.5, 8.0), (24, 0.5, 25.0, 8.0),
    (10, 0.0, 25.0, 8.0), (25, 0.5, 25.0, 6.5), (25, 0.5, 25.0, 6.52), (29.97, 0.7, 25.0, 8.0)])
def test_frames_are_those_ffmpegs_fps_filter_keeps(tmp_path, fps, start, rate, seconds):
    video = make_video(tmp_path / "v.mp4", seconds=seconds, fps=fps, audio=None)
    duration = 6.0
    expected = ffmpeg_indices(video, start, rate)
    if len(expected) < int(rate * duration):  # the video ends first: refused, as av-benchmark refuses it
        with pytest.raises(VideoReadError, match="needed"):
            window_frames(video, start, duration, {"x": rate})
        return
    ours = window_frames(video, start, duration, {"x": rate, "y": 0.5})["x"]
    assert [frame_index(f) for f in ours] == expected[:int(rate * duration)]


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
@pytest.mark.parametrize("start", [0.0, 2.0])
def test_start_counts_from_the_files_start_time(tmp_path, start):
    video = make_video(tmp_path / "v.mp4", seconds=6.0, fps=25, audio=None)
    shifted = tmp_path / "shifted.mp4"  # the same frames, timestamps starting at 1 s
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(video), "-c", "copy", "-output_ts_offset", "1.0",
                    str(shifted)], check=True)
    ours = window_frames(shifted, start, 3.0, {"x": 25.0})["x"]
    assert [frame_index(f) for f in ours] == ffmpeg_indices(shifted, start, 25.0)[:75]
    assert frame_index(ours[0]) == round(start * 25) % 256


def test_fps_rule_on_exact_times():
    at_25 = [Fraction(i, 25) for i in range(200)]
    assert fps_filter_indices(at_25, Fraction(1, 2), 4) == [24, 74, 124, 174]  # the frame before each half-slot
    assert fps_filter_indices(at_25, Fraction(25), 200) == list(range(200))
    # 4 s of frames: the stream ends at 4 s, slot 2 starts there: two frames where four were asked for
    assert fps_filter_indices(at_25[:100], Fraction(1, 2), 4, end=Fraction(4)) == [24, 74]
    # the last frame is repeated up to the stream's end (here 10 fps -> 25 fps)
    at_10 = [Fraction(i, 10) for i in range(10)]
    # frame i at i/10 s rescales to round(2.5 i), halves away from zero: 0, 3, 5, 8, 10, 13, 15, 18, 20, 23
    assert fps_filter_indices(at_10, Fraction(25), 30, end=Fraction(1)) == [
        0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 4, 5, 5, 6, 6, 6, 7, 7, 8, 8, 8, 9, 9]


def test_a_short_or_missing_video_is_one_line(tmp_path):
    video = make_video(tmp_path / "short.mp4", seconds=2.0, fps=25, audio=None)
    with pytest.raises(VideoReadError, match=r"short\.mp4: the window .* gives 1 frames at 0.5 fps, 4 needed"):
        window_frames(video, 0.0, 8.0, {"imagebind": 0.5})
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(VideoReadError, match=r"bad\.mp4: cannot decode"):
        window_frames(tmp_path / "bad.mp4", 0.0, 8.0, {"x": 25.0})


def test_resizing_twice_to_the_same_short_side_changes_nothing():
    from eval.video_frames import resize_short_side

    frame = np.random.default_rng(0).integers(0, 256, (360, 640, 3), dtype=np.uint8)
    once = resize_short_side(frame, 224)
    assert once.shape == (224, 398, 3) and np.array_equal(resize_short_side(once, 224), once)


# ----------------------------------------------------------------------------------------------------------------
# The per-clip array cache
# ----------------------------------------------------------------------------------------------------------------
def test_array_cache_computes_once_resumes_and_redoes_changed_clips(tmp_path):
    path = tmp_path / "c.h5"
    calls: list[list[str]] = []

    def compute(todo: list[str]):
        calls.append(list(todo))
        for clip_id in todo:
            if clip_id == "bad":
                yield clip_id, "cannot decode"  # a failure: cached with its reason
            else:
                yield clip_id, {"x": np.full(3, float(len(clip_id)))}

    wanted = {"a": "h1", "bb": "h2", "bad": "h3"}
    first, failed = cached_arrays(path, {"v": 1}, wanted, compute)
    assert sorted(first) == ["a", "bb"] and np.array_equal(first["bb"]["x"], [2, 2, 2])
    assert failed == {"bad": "cannot decode"}
    inode = path.stat().st_ino
    again, failed_again = cached_arrays(path, {"v": 1}, wanted, compute)
    assert calls == [["a", "bb", "bad"]]  # the second call read the file: nothing computed, not even the failure
    assert sorted(again) == ["a", "bb"] and np.array_equal(again["a"]["x"], first["a"]["x"])
    assert failed_again == failed
    cached_arrays(path, {"v": 1}, {"a": "h1", "bb": "changed", "bad": "h3-fixed"}, compute)
    assert calls[-1] == ["bb", "bad"]  # only the clips whose source changed
    assert path.stat().st_ino == inode  # grown in place, not copied
    cached_arrays(path, {"v": 1}, {"a": "h1", "new": None}, compute)
    assert calls[-1] == ["new"]
    cached_arrays(path, {"v": 2}, {"a": "h1"}, compute)
    assert calls[-1] == ["a"]  # another protocol: rebuilt

    def crash(todo: list[str]):
        yield todo[0], {"x": np.zeros(1)}
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cached_arrays(tmp_path / "d.h5", {"v": 1}, {"p": None, "q": None}, crash)
    assert not (tmp_path / "d.h5").exists()  # a first build stays in the partial file until whole
    calls.clear()
    out, _ = cached_arrays(tmp_path / "d.h5", {"v": 1}, {"p": None, "q": None}, compute)
    assert calls == [["q"]] and sorted(out) == ["p", "q"]  # resumed from the partial file


# ----------------------------------------------------------------------------------------------------------------
# Formulas and front end against av-benchmark's
# ----------------------------------------------------------------------------------------------------------------
def test_kl_in_log_space_is_av_benchmarks():
    rng = np.random.default_rng(0)
    gt, pred = rng.normal(0, 3, (6, 527)), rng.normal(0, 3, (6, 527))
    # av_bench/metrics/kl.py: F.kl_div(F.log_softmax(pred), F.log_softmax(gt), reduction="sum", log_target=True) / N
    reference = F.kl_div(F.log_softmax(torch.from_numpy(pred), 1), F.log_softmax(torch.from_numpy(gt), 1),
                         reduction="sum", log_target=True) / len(pred)
    value, pairs = kl_log_softmax({f"c{i}": gt[i] for i in range(6)}, {f"c{i}": pred[i] for i in range(6)})
    assert pairs == 6 and value == pytest.approx(float(reference), rel=1e-12)
    assert kl_log_softmax({"a": gt[0]}, {"a": gt[0]})[0] == pytest.approx(0.0, abs=1e-12)
    # a second pair changes the mean: every pair counts, not only the last
    assert kl_log_softmax({"a": gt[0], "b": gt[1]}, {"a": pred[0], "b": pred[1]})[0] != pytest.approx(
        kl_log_softmax({"b": gt[1]}, {"b": pred[1]})[0])


@pytest.mark.parametrize(("rate", "channels", "seconds"), [(44100, 2, 3.0), (16000, 1, 12.0), (48000, 2, 9.0)])
def test_av_benchmark_audio_protocol_is_its_audio_dataset(rate, channels, seconds):
    import torchaudio

    rng = np.random.default_rng(1)
    wave = (0.3 * rng.standard_normal((channels, int(rate * seconds))) + 0.05).astype(np.float32)
    ours = prepare_waveform(wave if channels > 1 else wave[0], rate, 16000, 8.0, "av-benchmark")
    # av_bench/data/audio_dataset.py AudioDataset.read_from_file, after torchaudio.load
    waveform = torch.from_numpy(wave).mean(dim=0)
    waveform = waveform - waveform.mean()
    if rate != 16000:
        waveform = torchaudio.transforms.Resample(rate, 16000)(waveform)
    expected = waveform[:int(16000 * 8.0)].numpy()
    assert ours.shape == expected.shape and np.allclose(ours, expected, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# --metrics
# ----------------------------------------------------------------------------------------------------------------
def test_metric_selection():
    paper = [m.name for m in select_metrics("paper")]
    assert paper == list(TABLES["paper"])
    av = {m.name for m in select_metrics("av-benchmark")}
    assert av == set(TABLES["av-benchmark"])
    assert [m.name for m in select_metrics("all")] == [m.name for m in METRICS]
    assert [m.name for m in select_metrics("desync, fd")] == ["fd", "desync"]
    with pytest.raises(ValueError, match="unknown metric or group 'fid'"):
        select_metrics("fd,fid")
    with pytest.raises(ValueError, match="names no metric"):
        select_metrics(" , ")
    assert BY_NAME["ib_score"].cell(0.3322) == "33.22"


def test_unknown_metric_is_one_line_at_the_command_line(tmp_path, capsys):
    assert eval_main(["--metrics", "fd,nope", "--output", str(tmp_path / "o"), "--shards", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --metrics: unknown metric or group 'nope'") and "\n" not in err


# ----------------------------------------------------------------------------------------------------------------
# An evaluation with every metric
# ----------------------------------------------------------------------------------------------------------------
FEATURES = FEATURE_PRESETS["tiny"]
SPEC = dataclasses.replace(FEATURES.shard_spec(), latent_time=64)
SECONDS = 6.0  # long enough for ImageBind (2-frame clips at 0.5 fps) and DeSync (14 segments of 0.64 s)
IDS = ("v0", "v1", "v2", "n0")  # n0: no source video


@pytest.fixture(scope="module")
def clips_with_videos(tmp_path_factory) -> Path:
    return make_clips(tmp_path_factory.mktemp("benchmark"))


def make_clips(root: Path, seconds: float = SECONDS) -> Path:
    """Shards of four test clips of `seconds` (6 s; three with a source video) and one generated WAV each, under
    `root`."""
    data = root / "shards"
    data.mkdir(parents=True)
    meta = {"schema_version": shards.SCHEMA_VERSION, "spec": SPEC.to_dict(), "config": dataclasses.asdict(FEATURES)}
    (data / shards.META_FILE).write_text(json.dumps(meta), encoding="utf-8")
    writer = shards.ShardWriter(data, "test", 0, 8)
    rng = np.random.default_rng(0)
    for seed, clip_id in enumerate(IDS):
        sample_meta, arrays, _ = make_sample(spec=SPEC, clip_id=clip_id, seed=seed, split="test")
        video = root / "videos" / f"{clip_id}.mp4"
        if clip_id.startswith("v"):
            make_video(video, seconds=seconds + 1.0, fps=25, size=(96, 64), audio=None)
        sample_meta.update(duration=seconds, start=0.5, source=str(video))
        waveform = (0.2 * rng.standard_normal(int(SPEC.sample_rate * seconds))).astype(np.float32)
        writer.write(shards.encode_sample(SPEC, sample_meta, arrays, waveform))
        wav = root / "eval" / "wav" / f"{clip_id}.wav"
        wav.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(wav, (0.2 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000)
    writer.close()
    return root


def benchmark_config(root: Path, out: Path, **changes: object):
    shutil.copytree(root / "eval" / "wav", out / "wav")
    settings: dict[str, object] = dict(run=str(root / "no-run"), shards=str(root / "shards"), output=str(out),
                                       generate=False, figure_clips=0, duration=SECONDS, av_align=False,
                                       cache_dir=str(out.parent / "cache"), metrics="all", min_paired=0.5)
    return PRESETS["demo"].replace(**{**settings, **changes})


def test_every_metric_with_random_embedders(clips_with_videos, tmp_path):
    results = evaluate(benchmark_config(clips_with_videos, tmp_path / "out"), progress=False)
    for name in ("fd", "fad", "kl", "kl_sigmoid", "kl_panns", "fd_passt", "kl_passt", "ib_score", "desync"):
        assert isinstance(results[name], float), (name, results["null_reasons"].get(name))
    for name in ("inception_score", "is_passt"):  # ten splits need ten clips
        assert results[name] is None
        assert results["null_reasons"][name] == "needs at least 10 generated clips (4)"
    assert -1.0 <= results["ib_score"] <= 1.0 and 0.0 <= results["desync"] <= 2.0
    assert results["counts"]["ib_pairs"] == 3 and results["counts"]["desync_clips"] == 3  # n0 has no video
    assert results["counts"]["benchmark_videos_missing"] == 1
    assert results["counts"]["kl_passt_pairs"] == 4
    assert not results["comparable"] and not results["failures"]
    assert set(results["protocol"]["random_embedder_names"]) == {"cnn14", "vggish", "passt", "imagebind",
                                                                 "synchformer"}
    report = (tmp_path / "out" / "report.md").read_text()
    assert report.startswith("**The embedders have random weights")
    assert "| FD-PaSST ↓ | FD-PANNs ↓ | FD-VGG ↓ | KL-PANNs ↓ | KL-PaSST ↓ | IS-PANNs ↑ | IS-PaSST ↑ | IB-score ↑ | DeSync ↓ |" in report
    # the table command prints either set of columns from the same results.json
    table = tmp_path / "t.md"
    assert eval_main(["table", str(tmp_path / "out"), "--columns", "av-benchmark", "--out", str(table)]) == 0
    row = table.read_text().splitlines()[4]
    assert row.count("|") == 12 and row.count("—") == 2  # IS-PANNs, IS-PaSST
    # a second evaluation, on a subset of the clips, reads the ground-truth side from the caches: no cache file is
    # written again and no new one appears
    caches = sorted((tmp_path / "cache").glob("*.h5"))
    assert {p.name.split("-")[1] for p in caches} == {"passt", "video", *{p.name.split("-")[1] for p in caches}}
    before = {p: p.stat().st_mtime_ns for p in caches}
    (tmp_path / "ids.txt").write_text("v0\nv1\nn0\n")
    again = evaluate(benchmark_config(clips_with_videos, tmp_path / "again", clip_ids=str(tmp_path / "ids.txt"),
                                      min_paired=0.3), progress=False)
    assert {p: p.stat().st_mtime_ns for p in sorted((tmp_path / "cache").glob("*.h5"))} == before
    assert again["counts"]["ib_pairs"] == 2 and isinstance(again["desync"], float)


def test_missing_weights_null_only_their_metrics(clips_with_videos, tmp_path, caplog, monkeypatch):
    from eval.passt import PASST_CONFIGS, load_passt
    from eval.registry import NOT_SELECTED

    weights = tmp_path / "weights"
    weights.mkdir()
    # an official file is built at the official ("paper") size: here that size is the tiny one, to stay fast
    monkeypatch.setitem(PASST_CONFIGS, "paper", PASST_CONFIGS["tiny"])
    passt = load_passt(None, config=PASST_CONFIGS["tiny"], seed=3)  # an 'official' file for PaSST only
    torch.save(passt.model.net.state_dict(), weights / "passt-s-f128-p16-s10-ap.476-swa.pt")
    config = benchmark_config(clips_with_videos, tmp_path / "out", metrics="fd_passt,ib_score,desync,kl",
                              random_embedders=False, embedder_weights=str(weights), random_embedder_size="tiny")
    with caplog.at_level("WARNING"):
        results = evaluate(config, progress=False)
    assert isinstance(results["fd_passt"], float)
    for name, file in (("ib_score", "imagebind_huge.pth"), ("desync", "synchformer_state_dict.pth"),
                       ("kl", "Cnn14_16k_mAP=0.438.pth")):
        assert results[name] is None and results["null_reasons"][name].startswith(str(weights / file))
        assert sum(str(weights / file) in r.getMessage() for r in caplog.records) == 1
    assert results["null_reasons"]["fad"].startswith(NOT_SELECTED)
    assert results["comparable"]  # what was computed used official (here: saved) weights only


# ----------------------------------------------------------------------------------------------------------------
# python -m eval.weights
# ----------------------------------------------------------------------------------------------------------------
def test_weights_listing_and_fetch(tmp_path, monkeypatch, capsys):
    from eval import weights

    folder = tmp_path / "eval"
    assert weights.main(["list", "--out", str(folder)]) == 0
    listed = capsys.readouterr().out
    for file in ("Cnn14_16k_mAP=0.438.pth", "vggish-10086976.pth", "passt-s-f128-p16-s10-ap.476-swa.pt",
                 "imagebind_huge.pth", "synchformer_state_dict.pth"):
        assert f"MISSING  {folder / file}" in listed
    # fetch: every file a local URL serves arrives whole; one that cannot be fetched is one line, the rest go on
    served = tmp_path / "served"
    served.mkdir()
    sources = {}
    for name in weights.SOURCES:
        (served / name).write_bytes(name.encode() * 1000)
        sources[name] = (served / name).as_uri()
    sources["imagebind"] = (served / "absent").as_uri()
    monkeypatch.setattr(weights, "SOURCES", sources)
    assert weights.main(["fetch", "--out", str(folder)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(folder / "imagebind_huge.pth") in err[0]
    assert (folder / "synchformer_state_dict.pth").read_bytes() == b"synchformer" * 1000
    assert not (folder / "imagebind_huge.pth").exists() and not list(folder.glob("*.partial"))
    assert weights.main(["check", "--out", str(folder)]) == 1  # one still missing
    assert "imagebind_huge.pth: missing" in capsys.readouterr().out


def test_video_metrics_count_clips_with_both_sides():
    from eval.score import audio_scores

    rng = np.random.default_rng(0)
    video = {f"c{i}": {"video": rng.standard_normal(8)} for i in range(2)}  # two of five clips have a video
    audio = {f"c{i}": {"audio": rng.standard_normal(8)} for i in range(5)}
    values, reasons = audio_scores(video, audio, 5, 0.9, (BY_NAME["ib_score"],))
    assert values["ib_score"] is None
    assert reasons["ib_score"].startswith("only 2 of 5 clips (40%) have a source-video embedding and a generated WAV")
    values, reasons = audio_scores(video, audio, 5, 0.4, (BY_NAME["ib_score"],))
    assert not reasons and isinstance(values["ib_score"], float) and values["ib_pairs"] == 2


def test_a_bad_video_or_a_short_wav_fails_that_clip_alone(tmp_path):
    root = make_clips(tmp_path / "clips")
    (root / "videos" / "v0.mp4").write_bytes(b"not a video")
    config = benchmark_config(root, tmp_path / "out", metrics="ib_score,desync", min_paired=0.25)
    soundfile.write(tmp_path / "out" / "wav" / "v1.wav", np.zeros(100, np.float32), 16000)  # 6 ms of audio
    results = evaluate(config, progress=False)
    stages = {(f["id"], f["stage"]) for f in results["failures"]}
    assert {("v0", "imagebind_video"), ("v0", "synchformer_video"), ("v1", "imagebind_audio"),
            ("v1", "synchformer_audio")} <= stages
    assert all("\n" not in f["reason"] for f in results["failures"])
    named = {"v0": str(root / "videos" / "v0.mp4"), "v1": str(tmp_path / "out" / "wav" / "v1.wav")}
    for failure in results["failures"]:  # each names the file it is about
        if failure["stage"].endswith(("_video", "_audio")):
            assert failure["reason"].startswith(f"{named[failure['id']]}: "), failure
    reasons = {f["stage"]: f["reason"] for f in results["failures"] if f["id"] == "v1"}
    assert reasons["synchformer_audio"].endswith("Synchformer audio too short: 0.00625 s for a window of 6 s "
                                                 "(100 of 96000 samples at 16 kHz)")
    assert results["counts"]["ib_pairs"] == 1 and results["counts"]["desync_clips"] == 1  # v2 alone
    # run again: the bad video's failure comes from the cache, reported again, not retried
    again = evaluate(config, progress=False)
    assert ("v0", "imagebind_video") in {(f["id"], f["stage"]) for f in again["failures"]}
    assert again["ib_score"] == results["ib_score"]


def test_clips_too_short_for_imagebind_or_synchformer_fail_before_the_models_run(tmp_path, monkeypatch):
    """2 s clips: ImageBind needs two frames at 0.5 fps (4 s), DeSync 14 segments (4.8 s). Each clip with a video
    is one failure per embedder naming its video window and WAV, its length and the least the embedder takes, under
    a stage of its own; no model or decoder is run for them (they failed inside the front ends, naming no file)."""
    import eval.benchmark_embed as benchmark_embed
    import eval.imagebind as imagebind

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a clip too short for the embedder reached it")

    for module, name in ((benchmark_embed, "window_frames"), (benchmark_embed, "embed_video"),
                         (benchmark_embed, "desync_of"), (imagebind, "imagebind_audio_input")):
        monkeypatch.setattr(module, name, refuse)
    root = make_clips(tmp_path / "clips", seconds=2.0)
    out = tmp_path / "out"
    results = evaluate(benchmark_config(root, out, metrics="ib_score,desync", duration=10.0), progress=False)
    assert results["ib_score"] is None and results["desync"] is None
    failures = {(f["id"], f["stage"]): f["reason"] for f in results["failures"]}
    assert sorted(failures) == [(clip_id, stage) for clip_id in ("v0", "v1", "v2")
                                for stage in ("imagebind_window", "synchformer_window")]  # n0: no video, counted
    window = f"{root / 'videos' / 'v0.mp4'} [0.5, 2.5) s and {out / 'wav' / 'v0.wav'}: the clip is 2 s long"
    assert failures["v0", "imagebind_window"] == f"{window} while ImageBind needs at least 4 s (2 frames at 0.5 fps)"
    assert failures["v0", "synchformer_window"] == (f"{window} while Synchformer needs at least 4.8 s for DeSync "
                                                    "(14 segments of 0.64 s every 0.32 s)")
    assert results["counts"]["benchmark_videos_missing"] == 1
    # a window cut by --duration says so
    again = evaluate(benchmark_config(root, tmp_path / "cut", metrics="ib_score", duration=1.5), progress=False)
    reason = {f["id"]: f["reason"] for f in again["failures"]}["v1"]
    assert reason.endswith("[0.5, 2) s and " f"{tmp_path / 'cut' / 'wav' / 'v1.wav'}: its window (--duration) is 1.5 s "
                           "long while ImageBind needs at least 4 s (2 frames at 0.5 fps)")


def test_only_what_is_selected_runs(clips_with_videos, tmp_path, monkeypatch):
    import eval.evaluate as evaluate_module

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the reference audio was read for a metric that does not need it")

    monkeypatch.setattr(evaluate_module, "reference_audio", refuse)
    results = evaluate(benchmark_config(clips_with_videos, tmp_path / "out", metrics="ib_score"), progress=False)
    assert isinstance(results["ib_score"], float)
    assert sorted(results["protocol"]["embedder_checkpoints"]) == ["imagebind"]
    assert all(results[m.name] is None for m in METRICS if m.name != "ib_score")
    assert "desync" not in results["protocol"] and "ib_score" in results["protocol"]  # the selected knobs only


def test_desync_is_the_mean_of_both_windows_over_clips():
    generated = {"a": {"desync": np.array([0.2, 0.4])}, "b": {"desync": np.array([0.0, 0.0])}}
    counts: dict[str, object] = {}
    assert BY_NAME["desync"].compute({}, generated, counts) == pytest.approx(0.15)
    assert counts["desync_clips"] == 2


def test_window_frames_read_the_video_not_a_cover_picture_stored_first(tmp_path):
    """An mkv whose first video track is a one-frame cover picture: the benchmark embedders see the real video (the
    stream ffmpeg picks by default, and the one the audio was generated for)."""
    from tests import media

    video = media.make_video(tmp_path / "v.mp4", seconds=3.0, fps=10, audio=None)
    covered = media.make_covered(tmp_path / "covered.mkv", video)
    frames = window_frames(covered, 0.0, 2.0, {"two": 2.0})["two"]
    plain = window_frames(video, 0.0, 2.0, {"two": 2.0})["two"]
    assert frames.shape == plain.shape == (4, 64, 96, 3)
    assert [media.frame_index(f) for f in frames] == [media.frame_index(f) for f in plain]


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
def test_packets_the_decoder_refuses_are_skipped_as_ffmpeg_does(tmp_path):
    """Theora codes an unchanged frame as an empty packet, which FFmpeg's decoder refuses (EINVAL); ffmpeg goes on
    (the frame before stays shown), and so does evaluation: before, the first such packet ended the reading and
    AV-Align's frames of a still scene were refused as 'cannot decode'."""
    video = tmp_path / "still.ogv"  # the picture changes once a second, 10 frames a second
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=96x64:rate=1:duration=6", "-r", "10",
                    "-c:v", "libtheora", str(video)], check=True)
    ours = window_frames(video, 0.0, 5.0, {"x": 2.0})["x"]
    out = subprocess.run(["ffmpeg", "-v", "quiet", "-i", str(video), "-vf", "fps=2", "-f", "rawvideo", "-pix_fmt",
                          "rgb24", "-"], capture_output=True).stdout
    theirs = np.frombuffer(out, np.uint8).reshape(-1, 64, 96, 3)[:10]
    assert ours.shape == theirs.shape == (10, 64, 96, 3)
    differences = np.abs(ours.astype(int) - theirs.astype(int)).mean(axis=(1, 2, 3))
    assert differences.max() < 2.0, differences  # the same pictures (up to the RGB conversion)
    assert np.abs(ours[0].astype(int) - ours[-1].astype(int)).mean() > 10  # testsrc's picture moved on
