"""Stage one end to end on generated media: every odd file is processed or recorded, and runs resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import shards
from preprocess.__main__ import main as features_main
from shards.__main__ import main as verify_main
from tests import media

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--no-progress", "--num-workers", "0", "--batch-clips", "3"]


def processed_ids(out: Path) -> list[str]:
    return [s["json"]["id"] for s in shards.iterate_samples(shards.list_shards(out))]


def failures(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in shards.read_jsonl(out / shards.FAILURES_FILE)}


@pytest.fixture(scope="module")
def odd_media(tmp_path_factory) -> Path:
    """One folder with a good clip and every kind of odd file stage one meets in VGGSound."""
    folder = tmp_path_factory.mktemp("odd")
    media.make_video(folder / "good.mp4", seconds=4.0, audio="tone")
    media.make_video(folder / "short.mp4", seconds=1.5, audio="tone")
    media.make_video(folder / "silent.mp4", seconds=3.0, audio="silent")
    media.make_video(folder / "noaudio.mp4", seconds=3.0, audio=None)
    media.make_51_48k(folder / "surround.mp4")
    media.make_portrait(folder / "portrait.mp4")
    media.make_vfr(folder / "vfr.mp4")
    media.make_video(folder / "vp9.webm", seconds=3.0, audio="tone", codec="vp9")
    media.make_truncated(folder / "truncated.mp4")
    media.make_zero_bytes(folder / "zero.mp4")
    media.make_not_video(folder / "text.mp4")
    media.make_audio_only(folder / "audioonly.mp4")
    (folder / "captions.json").write_text(json.dumps({"good": "dog barking", "surround": "bell ringing and drum beating"}))
    return folder


def test_every_odd_file_is_processed_or_recorded(odd_media, tmp_path, capsys):
    out = tmp_path / "shards"
    code = features_main(["--videos", str(odd_media), "--captions", str(odd_media / "captions.json"), "--out", str(out), *FAST])
    assert code == 0
    summary = capsys.readouterr().out
    assert "written" in summary and "clips/s" in summary

    written = processed_ids(out)
    failed = failures(out)
    all_ids = {p.stem for p in odd_media.iterdir() if p.suffix in {".mp4", ".webm"}}
    assert set(written) | set(failed) == all_ids and not set(written) & set(failed)
    assert len(written) == len(set(written))
    assert {"good", "short", "silent", "surround", "portrait", "vfr", "vp9"} <= set(written)
    assert failed["noaudio"]["stage"] == "audio" and "no audio stream" in failed["noaudio"]["reason"]
    for broken in ("zero", "text", "audioonly"):
        assert failed[broken]["stage"] == "video" and broken in failed[broken]["reason"]
    assert verify_main(["verify", str(out)]) == 0

    samples = {s["json"]["id"]: s for s in shards.iterate_samples(shards.list_shards(out))}
    spec = shards.read_spec(out)
    short = samples["short"]["json"]
    assert short["duration"] == pytest.approx(1.5, abs=0.15)
    assert short["valid_frames"] < spec.num_frames
    assert not samples["short"]["clip.npy"][short["valid_frames"]:].any()  # padding past the true end
    assert samples["good"]["json"]["nouns"] == ["dog"] and samples["good"]["probs.npy"].shape == (spec.num_frames, 1)
    assert samples["surround"]["json"]["nouns"] == ["bell", "drum"]
    assert samples["silent"]["json"]["silent"] and np.isfinite(samples["silent"]["latent_mean.npy"]).all()
    assert len(samples["good"]["flac"]) == pytest.approx(4.0 * spec.sample_rate, rel=0.02)

    # running the same command again does nothing and keeps everything
    assert features_main(["--videos", str(odd_media), "--captions", str(odd_media / "captions.json"), "--out", str(out), *FAST]) == 0
    assert sorted(processed_ids(out)) == sorted(written) and failures(out) == failed
    assert "written 0 clips" in capsys.readouterr().out


def test_an_output_folder_of_other_features_is_refused(odd_media, tmp_path, capsys):
    out = tmp_path / "shards"
    args = ["--videos", str(odd_media), "--out", str(out), "--limit", "1", *FAST]
    assert features_main(args) == 0
    assert features_main([*args, "--fps", "1.0"]) == 2
    assert "meta.json: this folder holds features made differently (fps: 2.0 there vs 1.0 now)" in capsys.readouterr().err


def test_ranks_write_disjoint_shards(odd_media, tmp_path):
    out = tmp_path / "shards"
    for rank in (0, 1):
        assert features_main(["--videos", str(odd_media), "--out", str(out), "--rank", str(rank), "--world-size", "2", *FAST]) == 0
    names = [p.name for p in shards.list_shards(out)]
    assert any("-000-" in n for n in names) and any("-001-" in n for n in names)
    done = processed_ids(out) + list(failures(out))
    assert len(done) == len(set(done)) == len([p for p in odd_media.iterdir() if p.suffix in {".mp4", ".webm"}])


def test_resume_after_sigkill_writes_each_clip_once(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(8):
        media.make_video(videos / f"clip{i}.mp4", seconds=2.0, audio="tone")
    out = tmp_path / "shards"
    command = [sys.executable, "-m", "preprocess", "--videos", str(videos), "--out", str(out),
               "--no-progress", "--num-workers", "1", "--batch-clips", "1", "--shard-max-samples", "2"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while not shards.list_shards(out) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the whole group: main process and decoding workers
    process.wait()
    first = processed_ids(out)
    assert 0 < len(first) < 8, "the kill should land mid-run"

    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    ids = processed_ids(out)
    assert sorted(ids) == [f"clip{i}" for i in range(8)]  # exact set, none twice
    assert set(first) <= set(ids)
    assert not list(out.glob("*.tmp"))
    assert verify_main(["verify", str(out)]) == 0
