"""Stage one end to end on generated media: every odd file is processed or recorded, and runs resume."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

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
    # 94:1 still fits the tiny preset's 96 px Grounding DINO input; 250:1 would be 0 px across
    media.make_video(folder / "tall.mp4", seconds=2.0, size=(16, 1504), audio="tone")
    media.make_video(folder / "sliver.mp4", seconds=2.0, size=(16, 4000), audio="tone")
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
    assert {"good", "short", "silent", "surround", "portrait", "vfr", "vp9", "tall"} <= set(written)
    assert failed["sliver"]["stage"] == "video" and "16x4000 are too narrow to ground" in failed["sliver"]["reason"]
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
    # schema version 2: p_tk's factors are stored, zeros past the clip's end like p_tk
    assert spec.schema_version == json.loads((out / shards.META_FILE).read_text())["schema_version"] == 2
    for sample in samples.values():
        valid = sample["json"]["valid_frames"]
        detector, iou = sample["detector.npy"].astype(np.float32), sample["iou.npy"].astype(np.float32)
        assert detector.shape == iou.shape == sample["probs.npy"].shape
        np.testing.assert_allclose(sample["probs.npy"].astype(np.float32), detector * iou, atol=2e-3)
        assert not detector[valid:].any() and not iou[valid:].any()
    assert (samples["surround"]["iou.npy"][: samples["surround"]["json"]["valid_frames"]] < 1).any()  # SAM is on
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
    assert features_main(args) == 0  # its one clip fails to decode (not a missing file): meta.json is written
    assert features_main([*args, "--fps", "1.0"]) == 2
    assert "meta.json: this folder holds features made differently (fps: 2.0 there vs 1.0 now)" in capsys.readouterr().err
    # a folder stage one wrote with schema version 1 (no detector.npy / iou.npy) is not extended with version 2
    meta = json.loads((out / shards.META_FILE).read_text())
    meta["schema_version"] = meta["spec"]["schema_version"] = 1
    (out / shards.META_FILE).write_text(json.dumps(meta))
    assert features_main(args) == 2
    assert "this folder holds features made differently (schema_version: 1 there vs 2 now)" in capsys.readouterr().err
    # the same config with an edited spec: resumed before, and every sample it then wrote was refused by verify
    meta["schema_version"] = meta["spec"]["schema_version"] = 2
    meta["spec"]["num_frames"] += 1
    (out / shards.META_FILE).write_text(json.dumps(meta))
    assert features_main(args) == 2
    assert "this folder holds features made differently (spec num_frames: 21 there vs 20 now)" in capsys.readouterr().err


def test_ranks_write_disjoint_shards(odd_media, tmp_path):
    out = tmp_path / "shards"
    for rank in (0, 1):
        assert features_main(["--videos", str(odd_media), "--out", str(out), "--rank", str(rank), "--world-size", "2", *FAST]) == 0
    names = [p.name for p in shards.list_shards(out)]
    assert any("-000-" in n for n in names) and any("-001-" in n for n in names)
    done = processed_ids(out) + list(failures(out))
    assert len(done) == len(set(done)) == len([p for p in odd_media.iterdir() if p.suffix in {".mp4", ".webm"}])


def start_stage_one(tmp_path: Path, clips: int, shard_size: int) -> tuple[list[str], Path, subprocess.Popen]:
    """`python -m preprocess` on `clips` 2-second videos in its own process group: (command, output, process)."""
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(clips):
        media.make_video(videos / f"clip{i}.mp4", seconds=2.0, audio="tone")
    out = tmp_path / "shards"
    command = [sys.executable, "-m", "preprocess", "--videos", str(videos), "--out", str(out),
               "--no-progress", "--num-workers", "1", "--batch-clips", "1", "--shard-max-samples", str(shard_size)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    return command, out, process


def test_resume_after_sigkill_writes_each_clip_once(tmp_path):
    command, out, process = start_stage_one(tmp_path, clips=8, shard_size=2)
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


@pytest.fixture(scope="module")
def five_clips(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("five")
    for i in range(5):
        media.make_video(folder / f"clip{i}.mp4", seconds=2.0, audio="tone")
    return folder


def run_stage_one(videos: Path, out: Path, threaded: bool, captions: Path | None = None, **overrides):
    from preprocess.config import PRESETS
    from preprocess.manifest import from_folder
    from preprocess.pipeline import run

    cfg = PRESETS["tiny"].replace(**{"num_workers": 0, "batch_clips": 2, "shard_max_samples": 2, "device": "cpu", **overrides})
    return run(cfg, from_folder(videos, captions), out, None, progress=False, threaded_writer=threaded)


def test_sound_past_the_last_frame_is_padding_like_the_frames(tmp_path):
    """A video of 3 s of picture and 8 s of sound: the sample said duration 3 s, but its FLAC and latents held 8 s
    of sound, over frames that are zeros; training would learn sound from no picture."""
    videos = tmp_path / "videos"
    videos.mkdir()
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=96x64:rate=10:duration=3", "-f", "lavfi",
                    "-i", "sine=frequency=440:duration=8:sample_rate=16000", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                    "-c:a", "aac", str(videos / "long_sound.mp4")], check=True)
    run_stage_one(videos, tmp_path / "out", threaded=False)
    [sample] = shards.iterate_samples(shards.list_shards(tmp_path / "out"))
    meta, flac = sample["json"], sample["flac"]
    assert abs(meta["duration"] - 3.0) < 0.15
    cut = round((meta["duration"] + 0.05) * 16000)
    assert np.abs(flac[cut:]).max() == 0.0 and np.abs(flac[: round(2.5 * 16000)]).max() > 0.1


def test_a_single_frame_video_is_made_and_a_still_image_is_said_to_be_one(tmp_path):
    """A 0.1 s video of one frame, shorter than the first sampling time, was "no frame inside the window" (vta-sam
    generate gave it sound): its first frame now stands in, as there. A JPEG named .mp4 said the same; it is now
    "a still image"."""
    videos = tmp_path / "videos"
    videos.mkdir()
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=96x64:rate=10:duration=0.1", "-f", "lavfi",
                    "-i", "sine=frequency=440:duration=0.1:sample_rate=16000", "-c:v", "libx264",
                    "-pix_fmt", "yuv420p", "-c:a", "aac", str(videos / "one_frame.mp4")], check=True)
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=96x64", "-frames:v", "1", "-f", "image2",
                    str(videos / "photo.mp4")], check=True)
    summary = run_stage_one(videos, tmp_path / "out", threaded=False)
    assert summary.written == 1
    [sample] = shards.iterate_samples(shards.list_shards(tmp_path / "out"))
    assert sample["json"]["id"] == "one_frame" and sample["json"]["valid_frames"] == 1
    assert sample["clip.npy"][0].any() and not sample["clip.npy"][1:].any()
    [failed] = failures(tmp_path / "out").values()
    assert (failed["id"], failed["stage"], failed["reason"]) == ("photo", "video", f"{videos / 'photo.mp4'}: a still image, not a video")


def test_two_processes_of_one_rank_in_one_folder_are_refused(five_clips, tmp_path):
    """Two stage-one processes of one rank (two launches without --rank, a requeued job while the first still ran)
    wrote the same shard names and deleted each other's partial shards: clips written twice, which no rerun
    repaired. The second now stops before writing anything; another rank of the same folder still runs."""
    from preprocess.pipeline import FeatureError
    from tests.conftest import lock_holder

    out = tmp_path / "out"
    with lock_holder(out, "stage one of rank 0", ".lock-rank000") as holder:
        with pytest.raises(FeatureError) as refused:
            run_stage_one(five_clips, out, threaded=False)
        assert str(refused.value) == (f"{out}: another stage one of rank 0 is writing into this folder (pid "
                                      f"{holder.pid}); wait for it to end, or choose another folder (processes "
                                      "sharing a folder each need their own --rank)")
        assert sorted(p.name for p in out.iterdir()) == [".lock-rank000"]
        from preprocess.config import PRESETS
        from preprocess.manifest import from_folder
        from preprocess.pipeline import run

        cfg = PRESETS["tiny"].replace(num_workers=0, batch_clips=2, shard_max_samples=2, device="cpu")
        other = run(cfg, from_folder(five_clips), out, None, rank=1, world_size=2, progress=False)
        assert other.written > 0


def test_clips_whose_video_was_missing_are_tried_again_once_it_is_there(five_clips, tmp_path, capsys):
    """A manifest given the wrong --videos folder recorded every clip as failed ('input': file not found), exited
    0, and a rerun with the right folder made nothing: the failures were 'done' for good."""
    from shards.__main__ import main as verify_main

    csv = tmp_path / "m.csv"
    csv.write_text("".join(f"clip{i},0,dog barking,train\n" for i in range(3)))
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    assert features_main(["--csv", str(csv), "--videos", str(tmp_path / "empty"), "--out", str(out), *FAST]) == 1
    captured = capsys.readouterr()
    assert f"error: no clip of this run could be made (3 failed: see {out / 'failures.jsonl'})" in captured.err
    reasons = [json.loads(line)["reason"] for line in (out / "failures.jsonl").read_text().splitlines()]
    assert "video file not found in the video folder (no clip0_000000.* or clip0.* of a video suffix)" in reasons
    assert features_main(["--csv", str(csv), "--videos", str(five_clips), "--out", str(out), *FAST]) == 0
    captured = capsys.readouterr()
    assert "note: 3 clip(s) recorded as failed for a missing video file have one now: trying them again" in captured.err
    assert "written 3 clips" in captured.out
    assert processed_ids(out) == ["clip0_000000", "clip1_000000", "clip2_000000"]
    assert verify_main(["verify", str(out)]) == 0
    assert "valid samples: 3; problems: 0; recorded failures: 0" in capsys.readouterr().out
    assert features_main(["--csv", str(csv), "--videos", str(five_clips), "--out", str(out), *FAST]) == 0
    captured = capsys.readouterr()
    assert "trying them again" not in captured.err and "written 0 clips" in captured.out


def test_a_full_disk_is_one_line_and_a_rerun_goes_on(five_clips, tmp_path, monkeypatch, capsys):
    """A disk that filled up while a shard was written gave four chained tracebacks ending in 'write to closed
    file': closing the aborted shard's file failed again, so its temporary file stayed and the sink then flushed
    the closed writer. Now: one line, the complete shards kept, no partial file, and the same command goes on."""
    import errno

    import shards.io

    opened: list[str] = []

    class FullDisk:
        """A shard file on a disk that is full from the second shard on: writes fail, and so does close."""

        def __init__(self, path, mode):
            self.file, self.full = open(path, mode), len(opened) >= 1  # noqa: SIM115
            opened.append(str(path))

        def write(self, data):
            if self.full:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(data)

        def close(self):
            self.file.close()
            if self.full:
                raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.file, name)

    monkeypatch.setattr(shards.io, "open", FullDisk, raising=False)
    out = tmp_path / "out"
    args = ["--videos", str(five_clips), "--out", str(out), "--shard-max-samples", "2", *FAST]
    assert features_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {out}: No space left on device; what was written is kept: run the same command again "
                   "once the cause is gone"], err
    assert "Traceback" not in "\n".join(err) and not list(out.glob("*.tmp"))
    assert processed_ids(out) == ["clip0", "clip1"]
    monkeypatch.undo()
    assert features_main(args) == 0
    assert sorted(processed_ids(out)) == [f"clip{i}" for i in range(5)]


def test_the_source_recorded_is_absolute(five_clips, tmp_path, monkeypatch):
    """A relative --videos folder was recorded as given, so evaluation run from another folder found no source
    video for any clip (AV-Align, IB-score and DeSync all 'videos missing')."""
    monkeypatch.chdir(five_clips.parent)
    out = tmp_path / "out"
    assert features_main(["--videos", five_clips.name, "--out", str(out), "--limit", "1", *FAST]) == 0
    [meta] = shards.iter_meta(shards.list_shards(out))
    assert meta.source == str(five_clips / "clip0.mp4")


def test_a_video_replaced_since_its_clip_was_made_is_said_on_the_rerun(five_clips, tmp_path, capsys):
    """A video file replaced at the same path kept its old features without a word: resuming skips a clip by its
    id. The sample now records the file's size and modification time, and a rerun says which clips changed."""
    videos = tmp_path / "videos"
    shutil.copytree(five_clips, videos)
    out = tmp_path / "out"
    assert run_stage_one(videos, out, threaded=False).written == 5
    [meta] = [m for m in shards.iter_meta(shards.list_shards(out)) if m.id == "clip1"]
    stat = (videos / "clip1.mp4").stat()
    assert meta.source_stamp == f"{stat.st_size}:{stat.st_mtime_ns}"
    capsys.readouterr()
    assert run_stage_one(videos, out, threaded=False).written == 0
    assert "changed since" not in capsys.readouterr().err  # nothing changed: nothing said
    media.make_video(videos / "clip1.mp4", seconds=3.0, audio="tone")  # another video at the same path
    assert run_stage_one(videos, out, threaded=False).written == 0
    err = capsys.readouterr().err
    assert (f"warning: {out}: 1 clip(s) there were made from a video file that has changed since (its size or "
            f"modification time; e.g. {videos / 'clip1.mp4'}); they are kept as they are") in err


def test_captions_without_a_noun_are_said_once(five_clips, tmp_path, capsys):
    """A caption in which the tagger finds no noun (another script's words, only stopwords) gave a zero object
    embedding without a word; vta-sam generate warned about the same caption."""
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"clip1": "and then of it", "clip3": "lo que sea", "clip0": "a dog barking"}))
    run_stage_one(five_clips, tmp_path / "out", threaded=False, captions=captions)
    err = [line for line in capsys.readouterr().err.splitlines() if "finds no noun" in line]
    assert len(err) == 1 and err[0].startswith("warning: ") and " clip(s) have a caption in which the tagger" in err[0]
    assert "e.g. clip1: 'and then of it'" in err[0]


def test_a_rerun_for_another_split_says_its_clips_are_there_already(five_clips, tmp_path, capsys):
    """Resuming skips a clip by its key, whatever split it was made for: a rerun into the same folder with another
    split wrote nothing and said "already done". It still writes nothing (a clip is made once per folder), but it
    says which clips went to which split, and what to do."""
    from preprocess.config import PRESETS
    from preprocess.manifest import from_folder
    from preprocess.pipeline import run

    cfg = PRESETS["tiny"].replace(num_workers=0, batch_clips=2, shard_max_samples=2, device="cpu")
    first = run(cfg, from_folder(five_clips, split="train"), tmp_path / "out", None, progress=False)
    assert first.written == 5
    capsys.readouterr()
    again = run(cfg, from_folder(five_clips, split="test"), tmp_path / "out", None, progress=False)
    assert again.written == 0 and again.resumed == 5
    assert (f"warning: {tmp_path / 'out'}: 5 clip(s) of this manifest are there already for another split (e.g. clip0: "
            "train there, test now); they are kept as they are: give another --out to make them for split test"
            ) in capsys.readouterr().err
    run(cfg, from_folder(five_clips, split="train"), tmp_path / "out", None, progress=False)
    assert "another split" not in capsys.readouterr().err


def test_a_rerun_with_other_captions_says_which_clips_keep_their_old_ones(five_clips, tmp_path, capsys, monkeypatch):
    """Captions corrected in the manifest after a run reach only the clips not made yet; the rerun said nothing
    about the others. It now warns how many were made with another caption, with an example, and what to do."""
    from preprocess.config import PRESETS
    from preprocess.manifest import from_folder
    from preprocess.pipeline import run

    cfg = PRESETS["tiny"].replace(num_workers=0, batch_clips=2, shard_max_samples=2, device="cpu")
    first = tmp_path / "first.csv"
    first.write_text("".join(f"clip{i},a dog barks\n" for i in range(5)))
    assert run(cfg, from_folder(five_clips, first), tmp_path / "out", None, progress=False).written == 5
    capsys.readouterr()
    run(cfg, from_folder(five_clips, first), tmp_path / "out", None, progress=False)
    assert "another caption" not in capsys.readouterr().err
    fixed = tmp_path / "fixed.csv"
    fixed.write_text("".join(f"clip{i},{'a cat meows' if i in (1, 3) else 'a dog barks'}\n" for i in range(5)))
    opened = []
    real_open = tarfile.open

    def counting_open(name=None, *args, **kwargs):
        opened.append(Path(name).name)
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(tarfile, "open", counting_open)
    again = run(cfg, from_folder(five_clips, fixed), tmp_path / "out", None, progress=False)
    assert again.written == 0 and again.resumed == 5
    # what is done and what it was made with come from one pass over the shards (they were read twice)
    assert sorted(opened) == sorted(p.name for p in shards.list_shards(tmp_path / "out")) and len(opened) == 3
    # and only this rank's clips' metadata is held (every rank's: ~100 MB per rank at VGGSound's size)
    from preprocess.pipeline import completed_ids

    stored: dict = {}
    assert len(completed_ids(tmp_path / "out", stored=stored, mine={shards.sample_key("clip1")})) == 5
    assert list(stored) == [shards.sample_key("clip1")] and stored[shards.sample_key("clip1")].caption == "a dog barks"
    assert (f"warning: {tmp_path / 'out'}: 2 clip(s) there were made with another caption than this manifest gives "
            "(e.g. clip1: 'a dog barks' there, 'a cat meows' now)") in capsys.readouterr().err


def test_the_background_writer_writes_what_the_inline_one_does(five_clips, tmp_path):
    inline = run_stage_one(five_clips, tmp_path / "inline", threaded=False)
    threaded = run_stage_one(five_clips, tmp_path / "threaded", threaded=True)
    assert inline.written == threaded.written == 5 and len(threaded.shards) == 3
    a = {s["json"]["id"]: s for s in shards.iterate_samples(shards.list_shards(tmp_path / "inline"))}
    b = {s["json"]["id"]: s for s in shards.iterate_samples(shards.list_shards(tmp_path / "threaded"))}
    assert sorted(a) == sorted(b) == [f"clip{i}" for i in range(5)]
    for key in a:
        for member in ("clip.npy", "probs.npy", "latent_mean.npy", "flac"):
            left, right = a[key][member], b[key][member]
            assert np.array_equal(left, right) if isinstance(left, np.ndarray) else left == right


def test_the_summary_separates_start_up_and_finishing_from_the_steady_rate(five_clips, tmp_path, monkeypatch):
    """A slow first decode is start-up, a slow last write is finishing; the rate in between leaves both out."""
    from preprocess import pipeline

    decode, write = pipeline.DecodeDataset.__getitem__, pipeline.ShardSink._write
    calls = {"decode": 0, "write": 0}

    def slow_first_decode(self, index):
        calls["decode"] += 1
        if calls["decode"] == 1:
            time.sleep(1.0)
        return decode(self, index)

    def slow_last_write(self, samples):
        calls["write"] += 1
        if calls["write"] == 3:  # 5 clips in batches of 2: the third batch is the last
            time.sleep(1.0)
        return write(self, samples)

    monkeypatch.setattr(pipeline.DecodeDataset, "__getitem__", slow_first_decode)
    monkeypatch.setattr(pipeline.ShardSink, "_write", slow_last_write)
    summary = run_stage_one(five_clips, tmp_path / "out", threaded=True)
    assert summary.written == 5 and calls["write"] == 3
    assert summary.startup_seconds >= 1.0 and summary.drain_seconds >= 1.0
    assert summary.startup_seconds + summary.drain_seconds < summary.wall_seconds
    steady = 5 / (summary.wall_seconds - summary.startup_seconds - summary.drain_seconds)
    assert summary.steady_clips_per_second == pytest.approx(steady) and steady > summary.clips_per_second
    assert re.search(r"\(start-up \d+\.\d s, finishing 1\.\d s; in between \d+\.\d\d clips/s\)$", summary.lines()[-1])


def test_out_of_memory_halving_writes_the_shards_of_an_uninterrupted_run(five_clips, tmp_path, monkeypatch, caplog):
    """CLIP and Grounding DINO + SAM run out of memory above 3 frames a pass: every clip is still written once, each
    member equal to a run that never ran out (within float rounding, as frames are regrouped into other batches)."""
    import torch
    from transformers import GroundingDinoForObjectDetection, SamModel

    from preprocess.encoders import CLIPEncoder

    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({f"clip{i}": "a dog barking at a car and a man" for i in range(0, 5, 2)}))
    plain = run_stage_one(five_clips, tmp_path / "plain", threaded=False, captions=captions, frame_batch=8)
    passes: list[int] = []

    def oom_above_3(method):
        def failing(self, *args, **kwargs):
            batch = (args[0] if args else kwargs["pixel_values"]).shape[0]
            passes.append(batch)
            if batch > 3:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return method(self, *args, **kwargs)
        return failing

    for owner, name in ((CLIPEncoder, "preprocess"), (GroundingDinoForObjectDetection, "forward"), (SamModel, "forward")):
        monkeypatch.setattr(owner, name, oom_above_3(getattr(owner, name)))
    with caplog.at_level("WARNING", logger="preprocess.encoders"):
        halved = run_stage_one(five_clips, tmp_path / "halved", threaded=False, captions=captions, frame_batch=8)
    halvings = [r.getMessage() for r in caplog.records if "continuing with" in r.getMessage()]
    assert any("(CLIP)" in m for m in halvings) and any("(Grounding DINO + SAM)" in m for m in halvings)
    assert max(passes) > 3 and plain.written == halved.written == 5 and len(halved.shards) == len(plain.shards)
    a = list(shards.iterate_samples(shards.list_shards(tmp_path / "plain")))
    b = list(shards.iterate_samples(shards.list_shards(tmp_path / "halved")))
    assert [s["json"]["id"] for s in a] == [s["json"]["id"] for s in b] == [f"clip{i}" for i in range(5)]
    for left, right in zip(a, b):
        assert sorted(left) == sorted(right)
        assert left["probs.npy"].shape[1] == (3 if left["json"]["id"] in ("clip0", "clip2", "clip4") else 0)
        for member in (m for m in left if not m.startswith("__")):  # __url__: the shard's own path
            if isinstance(left[member], np.ndarray):
                np.testing.assert_allclose(right[member], left[member], rtol=1e-4, atol=1e-5, err_msg=member)
            else:
                assert left[member] == right[member], member


def test_a_writing_error_is_raised_and_earlier_shards_survive(five_clips, tmp_path, monkeypatch):
    real = shards.encode_sample
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    out = tmp_path / "shards"
    monkeypatch.setattr(shards, "encode_sample", failing)
    with pytest.raises(OSError, match="No space left"):
        run_stage_one(five_clips, out, threaded=True)
    # the clips written before the failing one are kept (shard 1 full, shard 2 closed early), nothing torn
    assert processed_ids(out) == ["clip0", "clip1", "clip2"] and not list(out.glob("*.tmp"))
    monkeypatch.setattr(shards, "encode_sample", real)
    assert run_stage_one(five_clips, out, threaded=True).written == 2  # the same command finishes the job
    assert sorted(processed_ids(out)) == [f"clip{i}" for i in range(5)]
    assert verify_main(["verify", str(out)]) == 0


class _SignalsItself(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int:
        os.kill(os.getpid(), (signal.SIGTERM, signal.SIGUSR1)[index])
        return os.getpid()


def test_a_decoding_worker_outlives_the_stop_signals_its_parent_acts_on():
    """A scheduler signals the whole process group: the decoding workers leave SIGTERM and SIGUSR1 to the main
    process, which closes its shards and then shuts them down."""
    from preprocess.pipeline import _worker_init

    loader = torch.utils.data.DataLoader(_SignalsItself(), batch_size=None, num_workers=1, worker_init_fn=_worker_init)
    pids = list(loader)
    assert len(pids) == 2 and pids[0] != os.getpid()


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # "worker killed" from DataLoader's __del__
def test_leaving_on_a_signal_does_not_wait_for_busy_decoding_workers(tmp_path, monkeypatch):
    """The workers ignore SIGTERM (their parent closes the shard in progress, then stops them); DataLoader's shutdown
    waited up to 5 s for each busy one and then sent them the SIGTERM they ignore: 8 workers on long files took 40 s,
    past SLURM's 30 s before SIGKILL, and the shard in progress was lost. Leaving on an exception kills them."""
    from preprocess.config import PRESETS
    from preprocess.manifest import from_folder
    from preprocess.pipeline import DecodeDataset, decode_clips

    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(4):
        (videos / f"v{i}.mp4").write_bytes(b"x")
    monkeypatch.setattr(DecodeDataset, "_decode", lambda self, index: time.sleep(20) or {})  # a slow file, in a worker
    cfg = PRESETS["tiny"].replace(num_workers=2, device="cpu")
    clips = decode_clips(from_folder(videos), cfg, tensors=False, prefetch=1, markers=tmp_path / "markers")

    def stop(signum, frame):
        raise SystemExit(128 + signum)  # what stage one's SIGTERM handler does

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(2)
    started = time.monotonic()
    try:
        with pytest.raises(SystemExit):
            next(clips)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - started < 6  # 2 s, then the workers are gone at once (not 2 x 5 s of joining)


@pytest.mark.parametrize("group", [False, True], ids=["main-process", "process-group"])
def test_sigterm_keeps_every_clip_already_encoded(tmp_path, group):
    """SIGUSR1 to the main process, or SIGTERM to every process of the job as a scheduler sends it: decoding workers
    that died of it printed DataLoader's "worker is killed by signal: Terminated" traceback on the way out."""
    command, out, process = start_stage_one(tmp_path, clips=10, shard_size=4)
    deadline = time.monotonic() + 120
    # wait for the second shard to be in progress (its .tmp appears when its first sample is written)
    while not (shards.list_shards(out) and list(out.glob("*.tar.tmp"))) and time.monotonic() < deadline \
            and process.poll() is None:
        time.sleep(0.02)
    signum = signal.SIGTERM if group else signal.SIGUSR1  # SLURM's `--signal=USR1@<seconds>`, to the main process
    if group:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    process.wait(timeout=60)
    kept = processed_ids(out)
    assert process.returncode == 128 + signum
    assert process.stderr is not None  # it said nothing; now, what to do
    said = process.stderr.read().decode()
    assert f"terminated ({signal.Signals(signum).name}): run the same command again to go on ({out})" in said
    assert "Traceback" not in said, said
    # the shard in progress was closed, not dropped: more than the 4 clips of the shard complete before the signal
    assert 4 < len(kept) < 10, kept
    assert not list(out.glob("*.tmp")) and verify_main(["verify", str(out)]) == 0
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert sorted(processed_ids(out)) == [f"clip{i}" for i in range(10)]


def test_a_torn_shard_is_not_counted_as_written(tmp_path, monkeypatch):
    from preprocess.config import PRESETS
    from preprocess.pipeline import ShardSink
    from tests.conftest import make_sample

    cfg = PRESETS["tiny"].replace(shard_max_samples=2)
    spec = cfg.shard_spec()
    real, calls = shards.ShardWriter.write, {"n": 0}

    def tearing(self, sample):
        calls["n"] += 1
        if calls["n"] == 4:  # the second sample of the second shard fails half-way
            raise OSError(28, "No space left on device")
        real(self, sample)

    monkeypatch.setattr(shards.ShardWriter, "write", tearing)
    sink = ShardSink(tmp_path, 0, cfg, threaded=True)
    for i in range(5):
        meta, arrays, waveform = make_sample(spec, f"clip{i}", seed=i)
        try:
            sink.put([(meta | {"split": "train"}, arrays, waveform)])
        except OSError:
            break
    with pytest.raises(OSError, match="No space left"):
        sink.close()
    # shard 1 (clip0, clip1) is kept; shard 2 held clip2 when clip3 tore it, so both are gone and not counted
    assert processed_ids(tmp_path) == ["clip0", "clip1"] and sink.written == 2


def test_a_small_dev_shm_falls_back_to_pickled_frames(five_clips, tmp_path, monkeypatch, capsys):
    from preprocess import pipeline
    from preprocess.config import PRESETS

    paper = PRESETS["paper"]
    roomy = shutil_usage(free=64 * 2**30)
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda folder: roomy)
    assert pipeline.shared_memory_room(paper, prefetch=4) == (True, "")
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda folder: shutil_usage(free=64 * 2**20))
    fits, why = pipeline.shared_memory_room(paper, prefetch=4)
    assert not fits and why.startswith("/dev/shm: 64 MiB free") and "--shm-size" in why
    # stage one then hands numpy arrays over and still writes every clip
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda folder: shutil_usage(free=2**20))
    cfg = PRESETS["tiny"].replace(num_workers=1, batch_clips=2, device="cpu")
    from preprocess.manifest import from_folder

    summary = pipeline.run(cfg, from_folder(five_clips), tmp_path / "shards", None, progress=False)
    assert summary.written == 5 and "warning: /dev/shm" in capsys.readouterr().err


def shutil_usage(free: int):
    import shutil

    return shutil._ntuple_diskusage(total=free, used=0, free=free)


# ----------------------------------------------------------------------------------- hostile input
@pytest.mark.parametrize("flags", [["--rank", "2", "--world-size", "2"], ["--rank", "-1", "--world-size", "2"],
                                   ["--rank", "0", "--world-size", "0"], ["--world-size", "-3"]])
def test_a_rank_outside_the_world_is_one_line(odd_media, tmp_path, capsys, flags):
    out = tmp_path / "shards"
    assert features_main(["--videos", str(odd_media), "--out", str(out), *flags, *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: rank ") and "world size" in err[0]
    assert not out.exists()  # nothing built, nothing written


def test_a_bad_rank_variable_is_one_line(odd_media, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "zero")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert features_main(["--videos", str(odd_media), "--out", str(tmp_path / "shards"), *FAST]) == 2
    assert capsys.readouterr().err.strip() == "error: environment variable RANK='zero' is not a whole number"


def test_bad_failure_lines_and_an_empty_shard_are_reported_not_fatal(five_clips, tmp_path, capsys, caplog):
    out = tmp_path / "shards"
    args = ["--videos", str(five_clips), "--out", str(out), "--shard-max-samples", "2", *FAST]
    assert features_main([*args, "--limit", "2"]) == 0
    kept = {p.name: p.read_bytes() for p in out.iterdir()}
    # a zero-byte shard (a copy interrupted elsewhere) and failure lines that are not objects with an id
    (out / "train-007-000000.tar").write_bytes(b"")
    with open(out / shards.FAILURES_FILE, "a", encoding="utf-8") as handle:
        handle.write('{"stage": "video", "reason": "no id"}\n[1, 2]\n{"id": 7}\n')
    capsys.readouterr()
    assert features_main(args) == 0
    err = capsys.readouterr().err
    assert "train-007-000000.tar: unreadable shard (empty file); its clips are not counted as done" in err
    assert err.count("failures.jsonl: skipped a line without a clip id") == 2 and "Traceback" not in err
    assert "failures.jsonl:2: not a JSON object; skipped" in caplog.text  # the reader's own warning
    readable = [p for p in shards.list_shards(out) if p.name != "train-007-000000.tar"]
    ids = [s["json"]["id"] for s in shards.iterate_samples(readable)]
    assert sorted(ids) == [f"clip{i}" for i in range(5)]  # each clip once
    assert (out / "train-007-000000.tar").read_bytes() == b""  # left as it was
    for name, data in kept.items():  # nothing already written is lost or changed
        if name != shards.FAILURES_FILE:
            assert (out / name).read_bytes() == data


def _meta(fps: float = 2.0) -> dict:
    from preprocess.config import PRESETS
    from preprocess.pipeline import build_meta

    return build_meta(PRESETS["tiny"].replace(fps=fps), {"clip": "c", "grounding": "g", "vae": "v"}, 1.0)


def test_a_rank_starting_alone_writes_meta_json(tmp_path):
    from preprocess.pipeline import FeatureError, prepare_output

    prepare_output(tmp_path, _meta(), rank=1)  # no rank 0 yet: the folder still gets its meta.json
    assert json.loads((tmp_path / shards.META_FILE).read_text()) == _meta()
    prepare_output(tmp_path, _meta(), rank=0)
    with pytest.raises(FeatureError, match="features made differently"):
        prepare_output(tmp_path, _meta(fps=1.0), rank=3)
    assert [p.name for p in tmp_path.iterdir()] == [shards.META_FILE]  # no temporary file left


def test_a_meta_json_written_meanwhile_by_another_rank_is_compared_not_clobbered(tmp_path, monkeypatch):
    from preprocess import pipeline

    real_link = os.link
    theirs = json.dumps(_meta(fps=1.0))

    def other_rank_first(source, target):
        Path(target).write_text(theirs)  # another rank's meta.json appears between our check and our link
        real_link(source, target)

    monkeypatch.setattr(pipeline.os, "link", other_rank_first)
    with pytest.raises(pipeline.FeatureError, match=r"fps: 1.0 there vs 2.0 now"):
        pipeline.prepare_output(tmp_path, _meta(), rank=1)
    assert (tmp_path / shards.META_FILE).read_text() == theirs
    assert [p.name for p in tmp_path.iterdir()] == [shards.META_FILE]


def test_colliding_sample_keys_are_refused_before_anything_is_written(tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("x.1.mp4", "x_1.mp4"):
        media.make_video(videos / name, seconds=1.0, audio="tone")
    out = tmp_path / "shards"
    assert features_main(["--videos", str(videos), "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {videos}: clip ids 'x.1' and 'x_1' both become shard sample key 'x_1' ('.' and '/' are "
                   "written as '_'); rename one of them"]
    assert not out.exists()


def _process_group(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, read from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads processes from Linux's /proc")
def test_decoding_workers_die_with_a_sigkilled_parent(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(12):
        media.make_video(videos / f"clip{i}.mp4", seconds=2.0, audio="tone")
    command = [sys.executable, "-m", "preprocess", "--videos", str(videos), "--out", str(tmp_path / "shards"),
               "--no-progress", "--num-workers", "2", "--batch-clips", "1"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(_children(process.pid)) < 2 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.02)
        workers = _children(process.pid)
        assert len(workers) >= 2, "the decoding workers never started"
        os.kill(process.pid, signal.SIGKILL)  # the main process alone, as the OOM killer does
        process.wait()
        time.sleep(10)
        assert _process_group(process.pid) == [], "a decoding worker outlived its parent"
    finally:
        for pid in _process_group(process.pid):
            os.kill(pid, signal.SIGKILL)


def test_out_of_memory_at_one_frame_is_one_line_at_the_command_line(odd_media, tmp_path, capsys, monkeypatch):
    import preprocess.pipeline
    from preprocess.encoders import OutOfMemory

    def out_of_memory(*args, **kwargs):
        raise OutOfMemory("CUDA out of memory in Grounding DINO at 1 frame per pass (tried to allocate 2 GiB)")

    monkeypatch.setattr(preprocess.pipeline, "run", out_of_memory)
    assert features_main(["--videos", str(odd_media), "--out", str(tmp_path / "shards"), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: CUDA out of memory in Grounding DINO at 1 frame per pass (tried to allocate 2 GiB)"


def abort_quietly() -> None:
    """End this process as a native decoder's abort does (SIGABRT), without a core file or Python's fault dump in
    the test log."""
    import faulthandler
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    faulthandler.disable()
    os.abort()


def test_a_file_that_crashes_a_decoding_worker_costs_only_that_clip(tmp_path, monkeypatch, capsys):
    """A native decoder that aborts on one file (as decord did on AVIs written to a pipe) kills the worker decoding
    it. That clip is recorded as failed, naming the file; every other clip is written once, as a run without the
    file writes it; and running again resumes without meeting the crash."""
    from preprocess import pipeline

    videos = tmp_path / "videos"
    for i in range(6):
        media.make_video(videos / f"clip{i}.mp4", seconds=2.0, audio="tone")
    real = pipeline.decode_frames

    def crashing(path, *args, **kwargs):
        if Path(path).name == "clip2.mp4":
            abort_quietly()  # in the worker process (forked: it has this patch)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pipeline, "decode_frames", crashing)
    for _ in torch.utils.data.DataLoader(range(2), num_workers=1):  # PyTorch's SIGCHLD handler, as a trainer has it
        pass
    handler = signal.getsignal(signal.SIGCHLD)
    summary = run_stage_one(videos, tmp_path / "out", threaded=True, num_workers=2)
    assert signal.getsignal(signal.SIGCHLD) is handler  # taken off while decoding, put back after
    assert summary.written == 5 and summary.failed == {"video": 1}
    assert processed_ids(tmp_path / "out") == [f"clip{i}" for i in (0, 1, 3, 4, 5)]  # in order, none twice
    reason = failures(tmp_path / "out")["clip2"]["reason"]
    assert reason.startswith(f"{videos / 'clip2.mp4'}: the decoding worker died while decoding this file (killed by SIGABRT)")
    # the workers' notes are removed; the rank's lock file stays (empty, as every lock file)
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == [".lock-rank000"]

    others = tmp_path / "others"  # a run that never met the file writes the same samples
    others.mkdir()
    for i in (0, 1, 3, 4, 5):
        shutil.copy(videos / f"clip{i}.mp4", others)
    run_stage_one(others, tmp_path / "clean", threaded=True, num_workers=2)
    crashed = {s["json"]["id"]: s for s in shards.iterate_samples(shards.list_shards(tmp_path / "out"))}
    clean = {s["json"]["id"]: s for s in shards.iterate_samples(shards.list_shards(tmp_path / "clean"))}
    assert sorted(crashed) == sorted(clean)
    for key in clean:
        for member in ("clip.npy", "probs.npy", "latent_mean.npy", "flac"):
            assert np.array_equal(crashed[key][member], clean[key][member]), (key, member)

    again = run_stage_one(videos, tmp_path / "out", threaded=True, num_workers=2)
    assert again.written == 0 and again.resumed == 6 and not again.failed


def test_a_crash_in_decord_keeps_what_it_printed_in_the_failure(five_clips, tmp_path, monkeypatch):
    """A native crash while decord's stderr is held in a temporary file (to keep its own log lines off the
    terminal) lost the crash's message with the file: the failure said only 'killed by SIGABRT'."""
    from preprocess import video

    real = video._decode_decord

    def crashing(path, *args, **kwargs):
        if Path(path).name == "clip1.mp4":
            os.write(2, b"[10:00:00] /src/video/video_reader.cc:83: a log line of decord's\n"
                        b"terminate called after throwing an instance of 'std::bad_alloc'\n  what():  std::bad_alloc\n")
            abort_quietly()
        return real(path, *args, **kwargs)

    monkeypatch.setattr(video, "_decode_decord", crashing)
    summary = run_stage_one(five_clips, tmp_path / "out", threaded=True, num_workers=1)
    assert summary.written == 4 and summary.failed == {"video": 1}
    reason = failures(tmp_path / "out")["clip1"]["reason"]
    assert ("(killed by SIGABRT; it printed: terminate called after throwing an instance of 'std::bad_alloc' what(): "
            "std::bad_alloc)") in reason, reason
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == [".lock-rank000"]


@pytest.mark.parametrize(("tensors", "slow_check"), [(False, False), (True, False), (False, True)],
                         ids=["numpy", "shared tensors", "death during the check"])
def test_a_worker_killed_while_its_last_clip_is_half_sent_costs_only_its_clip(tmp_path, monkeypatch, tensors,
                                                                             slow_check):
    """A worker hands a decoded clip over in a message (with numpy hand-over, as when shared memory is short, its
    frames and waveform: about 1 MB) that its queue's feeder thread writes into the pipe while the worker decodes
    the next clip. When that next clip kills the worker, the
    message is cut off half-way; the main process, busy encoding meanwhile, then waited forever reading it (it
    holds the pipe's other end itself). Now the death is found before the read: the crashing clip is a failure
    naming its file, the cut-off one is decoded again, and nothing hangs. `slow_check`: the check for dead workers
    takes 1.5 s (the worker dies during it, after it looked), so only the SIGCHLD handler can stop the read that
    follows: it must already be armed during the check."""
    from preprocess import pipeline
    from preprocess.config import PRESETS
    from preprocess.manifest import from_folder

    videos = tmp_path / "videos"
    for i in range(4):
        media.make_video(videos / f"clip{i}.mp4", seconds=10.24, audio="tone")  # a whole window of audio
    real = pipeline.decode_frames

    def crashing(path, *args, **kwargs):
        if Path(path).name == "clip2.mp4":
            abort_quietly()  # in the worker process (forked: it has this patch)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pipeline, "decode_frames", crashing)
    if slow_check:
        real_check = pipeline._dead_workers

        def late(iterator):
            dead = real_check(iterator)
            time.sleep(1.5)
            return dead

        monkeypatch.setattr(pipeline, "_dead_workers", late)
    cfg = PRESETS["tiny"].replace(num_workers=1, device="cpu")

    class Hangs(BaseException):  # not an Exception: DataLoader turns those into "worker exited unexpectedly"
        pass

    def too_long(signum, frame):
        raise Hangs("decode_clips still waits after 60 s")

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(60)
    items = []
    try:
        for item in pipeline.decode_clips(from_folder(videos), cfg, tensors, 2, tmp_path / ".decoding"):
            items.append(item)
            # the encoders' time (with slow_check, the check's): the worker decodes ahead while its feeder waits on
            # the full pipe
            time.sleep(0.0 if slow_check else 1.0)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert sorted(item["clip"].id for item in items) == [f"clip{i}" for i in range(4)]
    failed = {item["clip"].id: item["error"] for item in items if "error" in item}
    assert list(failed) == ["clip2"] and failed["clip2"][0] == "video"
    assert failed["clip2"][1].startswith(f"{videos / 'clip2.mp4'}: the decoding worker died while decoding this file "
                                         "(killed by SIGABRT)")
    assert all(len(item["frames"]) > 0 for item in items if "error" not in item)


def test_non_finite_audio_or_features_cost_only_their_clip(tmp_path, monkeypatch):
    """Float PCM audio holding NaN and inf (a crafted or broken file), and a model output that overflowed on one
    clip: each is that clip's failure, named; the shard writer's schema check no longer stops the run (which
    running again would have met again)."""
    from preprocess import pipeline
    from tests.test_audio import tones, write_media

    videos = tmp_path / "videos"
    videos.mkdir()
    broken = tones([440.0], 44100, 3.0)
    broken[0, 1000:1100] = np.nan
    broken[0, 5000] = np.inf
    write_media(videos / "nan_audio.mkv", broken, 44100, "pcm_f32le", video_seconds=3.0)
    for i in range(3):
        media.make_video(videos / f"clip{i}.mp4", seconds=2.0, audio="tone")
    real = pipeline.Encoders.encode

    def overflowing(self, items, nouns):
        features = real(self, items, nouns)
        for item, arrays in zip(items, features):
            if item["clip"].id == "clip1":
                arrays["clip.npy"] = arrays["clip.npy"].copy()
                arrays["clip.npy"][0, 0] = np.inf
        return features

    monkeypatch.setattr(pipeline.Encoders, "encode", overflowing)
    summary = run_stage_one(videos, tmp_path / "out", threaded=True)
    assert summary.written == 2 and summary.failed == {"audio": 1, "features": 1}
    assert processed_ids(tmp_path / "out") == ["clip0", "clip2"]
    recorded = failures(tmp_path / "out")
    assert re.fullmatch(rf"{re.escape(str(videos / 'nan_audio.mkv'))}: \d+ audio samples in the window are NaN or infinite",
                        recorded["nan_audio"]["reason"])
    assert recorded["clip1"]["reason"].endswith("clip1.mp4: non-finite values in clip.npy")


def test_other_model_config_files_are_features_made_differently(tmp_path):
    """Same weights, another config.json (or tokenizer, or CLIP's open_clip_config.json): stage one's resume,
    generation and evaluation refuse it where the folder recorded it; a folder written before the config checksum
    existed compares nothing."""
    from eval.clips import EvalError
    from eval.generate import check_decoder_checkpoint
    from preprocess.config import PRESETS
    from preprocess.pipeline import FeatureError, build_meta, prepare_output
    from vta_sam.generate import GenerateError, check_checkpoints

    sums = {"clip": "c", "grounding": "g", "vae": "v"}
    configs = {"clip": None, "grounding": "g-config", "vae": "v-config"}
    prepare_output(tmp_path / "new", build_meta(PRESETS["tiny"], sums, 1.0, configs), rank=0)
    prepare_output(tmp_path / "new", build_meta(PRESETS["tiny"], sums, 1.0, configs), rank=0)  # the same: resumes
    with pytest.raises(FeatureError, match="grounding configuration differs"):
        prepare_output(tmp_path / "new", build_meta(PRESETS["tiny"], sums, 1.0, {**configs, "grounding": "other"}), rank=0)
    with pytest.raises(FeatureError, match="clip configuration differs"):  # a sidecar added since
        prepare_output(tmp_path / "new", build_meta(PRESETS["tiny"], sums, 1.0, {**configs, "clip": "sidecar"}), rank=0)
    prepare_output(tmp_path / "old", build_meta(PRESETS["tiny"], sums, 1.0), rank=0)  # as written before the field
    prepare_output(tmp_path / "old", build_meta(PRESETS["tiny"], sums, 1.0, configs), rank=0)

    meta = json.loads((tmp_path / "new" / "meta.json").read_text())
    check_checkpoints(meta, sums, tmp_path, None, configs)
    with pytest.raises(GenerateError, match="grounding features made with other config, preprocessor or tokenizer"):
        check_checkpoints(meta, sums, tmp_path, None, {**configs, "grounding": "other"})
    check_decoder_checkpoint(tmp_path / "new", "v", None, "v-config")
    with pytest.raises(EvalError, match="a VAE with another config.json"):
        check_decoder_checkpoint(tmp_path / "new", "v", None, "other")
    check_decoder_checkpoint(tmp_path / "old", "v", None, "other")


def test_a_killed_ranks_temporary_meta_json_is_removed(tmp_path):
    """A rank killed between writing its temporary meta.json and linking it left `.meta.json.<rank>.<pid>.<id>.tmp`
    for good; the next run of that rank (which holds the rank's lock) removes its own, never another rank's (which
    may be running on another machine, where its pid says nothing here)."""
    from preprocess.pipeline import prepare_output

    mine = tmp_path / f".{shards.META_FILE}.0.{os.getpid()}.{'a' * 32}.tmp"
    other = tmp_path / f".{shards.META_FILE}.1.999999999.{'b' * 32}.tmp"
    for path in (mine, other):
        path.write_text("{}")
    prepare_output(tmp_path, _meta(), rank=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([shards.META_FILE, other.name])


def test_a_rerun_says_which_clips_have_another_start_and_refuses_a_clip_under_another_ones_key(tmp_path, capsys):
    """A start changed within one second (the same id) kept the old window without a word; a clip `x_1` made after
    `x.1` (the same sample key) was taken as made, keeping the other video's sample."""
    from preprocess.manifest import Clip
    from preprocess.pipeline import FeatureError, warn_about_changes
    from tests.conftest import make_sample
    from tests.test_train_support import SPEC

    meta = shards.SampleMeta.from_json(make_sample(SPEC, "w_000001", split="train")[0] | {"start": 1.2})
    key = shards.sample_key("w_000001")
    warn_about_changes(tmp_path, {key: Clip("w_000001", None, 1.7, "", meta.caption, "train")}, {key: meta})
    assert (f"warning: {tmp_path}: 1 clip(s) there were made from another window start than this manifest gives "
            "(e.g. w_000001: 1.2 s there, 1.7 s now)") in capsys.readouterr().err
    other = shards.SampleMeta.from_json(make_sample(SPEC, "x.1", split="train")[0])
    key = shards.sample_key("x_1")
    with pytest.raises(FeatureError, match=r"clip 'x_1' has the shard sample key of clip 'x.1' made there before"):
        warn_about_changes(tmp_path, {key: Clip("x_1", None, 0.0, "", other.caption, "train")}, {key: other})
