"""The synthetic demo set: layout, determinism, sound only while its object is on screen, idempotence."""

from __future__ import annotations

import csv
from pathlib import Path

import av
import numpy as np
import pytest

from preprocess import demo
from preprocess.nouns import caption_nouns
from preprocess.video import decode_frames, probe_video

N_TRAIN, N_TEST, SECONDS = 2, 2, 5.0


def read_rows(csv_path: Path) -> list[list[str]]:
    with open(csv_path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def all_frames(path: Path) -> tuple[np.ndarray, float]:
    """Every frame of a clip (at its native rate) and that rate."""
    fps = probe_video(path)["fps"]
    duration = probe_video(path)["duration"]
    times = [(k + 0.5) / fps for k in range(round(duration * fps))]
    return decode_frames(path, 0.0, times, 60.0, 96).frames, fps


def mono_audio(path: Path) -> tuple[np.ndarray, int]:
    """The audio track averaged over channels, placed by its timestamps (t = 0 at sample 0)."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        rate = stream.rate
        pieces = [(round((f.time or 0.0) * rate), f.to_ndarray().mean(axis=0)) for f in container.decode(stream)]
    out = np.zeros(max(at + len(x) for at, x in pieces))
    for at, samples in pieces:
        out[max(at, 0) : at + len(samples)] = samples[max(-at, 0) :]
    return out, rate


def visible(frames: np.ndarray) -> np.ndarray:
    """Per frame: does any object show? The background is grey; every object is strongly coloured."""
    saturation = frames.max(axis=3).astype(int) - frames.min(axis=3)
    return (saturation > 80).sum(axis=(1, 2)) >= 10


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    demo.make_demo_set(out, n_train=N_TRAIN, n_test=N_TEST, seconds=SECONDS, seed=3)
    return out


def test_writes_vggsound_layout(demo_dir: Path) -> None:
    rows = read_rows(demo_dir / "vggsound.csv")
    assert [row[3] for row in rows] == ["train"] * N_TRAIN + ["test"] * N_TEST
    assert all(len(row) == 4 and row[1] == "0" for row in rows)  # no header; start_seconds 0
    rates = set()
    for ytid, _, label, _ in rows:
        path = demo_dir / "videos" / f"{ytid}_000000.mp4"
        info = probe_video(path)
        assert (info["codec"], info["width"], info["height"], info["fps"]) == ("h264", 96, 96, 12.0)
        assert info["has_audio"]
        assert 0.75 * SECONDS - 0.1 <= info["duration"] <= 1.25 * SECONDS + 0.1
        with av.open(str(path)) as container:
            audio = container.streams.audio[0]
            assert audio.codec_context.name == "aac"
            rates.add(audio.rate)
        nouns = caption_nouns(label, "pattern")
        assert 1 <= len(nouns) <= 2 and set(nouns) <= set(demo.KINDS), label
    assert rates == {16000, 44100}
    assert not list(demo_dir.rglob("*.part"))


def test_labels_name_the_objects_on_screen(demo_dir: Path) -> None:
    for ytid, _, label, _ in read_rows(demo_dir / "vggsound.csv"):
        frames, _ = all_frames(demo_dir / "videos" / f"{ytid}_000000.mp4")
        pixels = frames.reshape(-1, 3).astype(int)
        shown = {kind for kind, colour in demo.COLOURS.items() if (np.abs(pixels - colour).max(axis=1) < 30).sum() > 50}
        assert shown == set(caption_nouns(label, "pattern")), label


def test_sound_plays_only_while_an_object_is_visible(demo_dir: Path) -> None:
    for ytid, *_ in read_rows(demo_dir / "vggsound.csv"):
        path = demo_dir / "videos" / f"{ytid}_000000.mp4"
        frames, fps = all_frames(path)
        audio, rate = mono_audio(path)
        seen = visible(frames)
        assert 0 < seen.sum() < len(seen)  # objects appear and vanish within the clip
        hop = rate / fps
        rms = np.array([np.sqrt(np.mean(audio[round(k * hop) : round((k + 1) * hop)] ** 2)) for k in range(len(seen))])
        # Frames next to a visible one are left out: AAC spreads energy over its 1024-sample blocks.
        near = np.convolve(seen.astype(int), np.ones(3, dtype=int), mode="same") > 0
        assert rms[~near].max(initial=0.0) < 0.01 * rms.max(), ytid
        # Each appearance is a sound onset: loud within a frame of the first visible frame.
        first = int(np.argmax(seen))
        assert rms[first : first + 2].max() > 0.1 * rms.max(), ytid
        assert rms[: max(first - 1, 0)].max(initial=0.0) < 0.01 * rms.max(), ytid


def test_same_seed_same_set_other_seed_other_set(demo_dir: Path, tmp_path: Path) -> None:
    again = demo.make_demo_set(tmp_path / "again", n_train=N_TRAIN, n_test=N_TEST, seconds=SECONDS, seed=3)
    assert again.read_text() == (demo_dir / "vggsound.csv").read_text()
    for ytid, *_ in read_rows(again):
        first = demo_dir / "videos" / f"{ytid}_000000.mp4"
        second = tmp_path / "again" / "videos" / f"{ytid}_000000.mp4"
        assert np.array_equal(all_frames(first)[0], all_frames(second)[0])
        assert np.array_equal(mono_audio(first)[0], mono_audio(second)[0])
        assert first.read_bytes() == second.read_bytes()  # the encoders are run deterministically
    plans = {seed: [demo.plan_clip(i, "train", seed, SECONDS, 96, 12).objects for i in range(8)] for seed in (3, 4)}
    assert plans[3] != plans[4]


def test_rerun_writes_nothing(demo_dir: Path) -> None:
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in demo_dir.rglob("*")}
    demo.make_demo_set(demo_dir, n_train=N_TRAIN, n_test=N_TEST, seconds=SECONDS, seed=3)
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in demo_dir.rglob("*")} == before


def test_durations_vary_below_the_window_and_every_kind_appears() -> None:
    clips = [demo.plan_clip(i, "train", 0, 8.0, 96, 12) for i in range(30)]
    seconds = [c.seconds for c in clips]
    assert 6.0 <= min(seconds) < max(seconds) <= 10.0 < 10.24
    assert len(set(seconds)) > 10
    assert {o.kind for c in clips for o in c.objects} == set(demo.KINDS)
    assert {len(c.objects) for c in clips} == {1, 2}


def test_main_writes_a_set(tmp_path: Path) -> None:
    assert demo.main(["--out", str(tmp_path / "cli"), "--train", "1", "--test", "1", "--seconds", "3"]) == 0
    rows = read_rows(tmp_path / "cli" / "vggsound.csv")
    assert [row[3] for row in rows] == ["train", "test"]
    assert all((tmp_path / "cli" / "videos" / f"{row[0]}_000000.mp4").is_file() for row in rows)
