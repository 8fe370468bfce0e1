"""The bundled synthetic demo set: coloured objects appear, move and vanish while their sounds play.

`python -m preprocess.demo --out data/demo` writes `videos/{ytid}_000000.mp4` (H.264 + AAC) and
`vggsound.csv` (rows `ytid,0,label,split`, no header: VGGSound's layout), so the whole pipeline runs on
it with no download. Each clip holds one or two of four objects, each with a sound tied to what it does:

| label phrase      | picture                                   | sound                                     |
|-------------------|-------------------------------------------|-------------------------------------------|
| "ball bouncing"   | red disc bouncing along the floor         | a click + thump at every floor contact    |
| "bell ringing"    | yellow bell that jolts sideways at a ring | decaying 880 Hz tone + partials per ring  |
| "drum beating"    | blue drum that squashes and brightens     | decaying noise burst + 90 Hz thump per hit |
| "whistle blowing" | green whistle trembling while it sounds   | a rising sine sweep while it is shown     |

A sound plays only while its object is on screen: every sound is gated to the object's visible interval
[on, off) (it starts at `on`, and a 5 ms fade ends it at `off`), and every event (appearance, bounce, ring,
hit) falls on a frame time, so picture and sound onsets coincide. Labels join the phrases with "and"
("ball bouncing and bell ringing"), so a part-of-speech tagger finds the nouns. Clip lengths vary around
`seconds` (x0.75..1.25, e.g. 6-10 s: shorter than the 10.24 s window, so the pipeline's padding runs).

Everything is a function of (seed, clip index): the same seed gives the same CSV and the same clips, and
adding clips does not change the earlier ones. Re-running with the files present writes nothing; each file
is written under a temporary name and renamed, so a killed run never leaves a half-written clip.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

KINDS = ("ball", "bell", "drum", "whistle")
PHRASES = {"ball": "ball bouncing", "bell": "bell ringing", "drum": "drum beating", "whistle": "whistle blowing"}
COLOURS = {"ball": (220, 40, 40), "bell": (235, 200, 30), "drum": (40, 80, 220), "whistle": (40, 190, 70)}
BACKGROUND = 40  # grey (no saturation), so "is an object visible" is "is any pixel saturated"
SAMPLE_RATES = (16000, 44100)  # alternating per clip: the pipeline resamples 44.1 kHz (stereo) and keeps 16 kHz (mono)
FADE_SECONDS = 0.005
# Longest stretch of one event's sound: its decay is below 1e-3 by then (the whistle lasts while it is shown).
EVENT_SECONDS = {"ball": 0.3, "bell": 2.5, "drum": 0.8, "whistle": float("inf")}


@dataclass(frozen=True)
class DemoObject:
    """One object of a clip. Times are frame indices (at the clip's fps): visible for on <= k < off."""

    kind: str
    on: int
    off: int
    events: tuple[int, ...]  # frames of its sound onsets (bounces, rings, hits; the whistle: `on`)
    period: int  # frames between events
    region: tuple[int, int]  # x range [x0, x1) of the canvas it lives in


@dataclass(frozen=True)
class DemoClip:
    ytid: str
    split: str
    label: str
    frames: int
    fps: int
    sample_rate: int
    channels: int
    objects: tuple[DemoObject, ...]

    @property
    def seconds(self) -> float:
        return self.frames / self.fps


# ----------------------------------------------------------------------------------- planning
def plan_clip(index: int, split: str, seed: int, seconds: float, width: int, fps: int) -> DemoClip:
    """The content of clip `index`, drawn from a generator seeded by (seed, index) only."""
    rng = np.random.default_rng([seed, index])
    frames = round(seconds * rng.uniform(0.75, 1.25) * fps)
    first = KINDS[index % len(KINDS)]  # cycle the first object so every split sees every kind
    kinds = [first] if rng.random() < 0.5 else [first, str(rng.choice([k for k in KINDS if k != first]))]
    objects = []
    for slot, kind in enumerate(kinds):
        region = (0, width) if len(kinds) == 1 else (slot * width // 2, (slot + 1) * width // 2)
        on = int(rng.integers(round(0.1 * frames), round(0.4 * frames)))
        off = int(rng.integers(on + round(0.35 * frames), frames - round(0.05 * frames) + 1))
        # Frames between events, drawn in frames at 12 fps and rescaled to `fps`.
        period_12 = {"ball": rng.integers(6, 11), "bell": rng.integers(12, 19), "drum": rng.integers(4, 8)}.get(kind)
        period = off - on if period_12 is None else int(period_12) * fps // 12 or 1
        events = (on,) if kind == "whistle" else tuple(range(on, off - 1, period))
        objects.append(DemoObject(kind, on, off, events, period, region))
    label = " and ".join(PHRASES[k] for k in kinds)
    sample_rate = SAMPLE_RATES[index % len(SAMPLE_RATES)]
    channels = 1 if sample_rate == 16000 else 2
    return DemoClip(f"demo{seed:03d}{index:04d}", split, label, frames, fps, sample_rate, channels, tuple(objects))


# ----------------------------------------------------------------------------------- pictures
def _draw(canvas: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] | np.ndarray) -> None:
    canvas[mask] = colour


def render_frames(clip: DemoClip, size: tuple[int, int]) -> np.ndarray:
    """(frames, H, W, 3) uint8 RGB: a grey vertical gradient with the clip's objects drawn on it."""
    width, height = size
    unit = min(width, height) / 96  # shapes are designed on a 96x96 canvas
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    background = np.repeat((BACKGROUND + 20 * ys / height)[..., None], 3, axis=2).astype(np.uint8)
    video = np.repeat(background[None], clip.frames, axis=0)
    floor = height - 8 * unit
    for obj in clip.objects:
        x0, x1 = obj.region
        centre = (x0 + x1) / 2
        colour = np.array(COLOURS[obj.kind])
        for k in range(obj.on, obj.off):
            frame = video[k]
            age = k - obj.on
            since = (k - obj.on) % obj.period  # frames since the last event
            if obj.kind == "ball":
                # One parabolic hop per period; the ball touches the floor at every event frame.
                u = since / obj.period
                radius = 10 * unit
                cy = floor - radius - 4 * u * (1 - u) * 0.55 * height
                cx = x0 + radius + (x1 - x0 - 2 * radius) * age / max(1, obj.off - obj.on - 1)
                _draw(frame, (xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2, colour)
            elif obj.kind == "bell":
                # The bell jolts to the other side at every ring (motion and sound onset in the same frame).
                ring = (k - obj.on) // obj.period
                cx = centre + (5 * unit if ring % 2 else -5 * unit)
                top, bottom = 0.2 * height, 0.2 * height + 32 * unit
                half = 5 * unit + 12 * unit * (ys - top) / (bottom - top)
                _draw(frame, (ys >= top) & (ys <= bottom) & (np.abs(xs - cx) <= half), colour)
                _draw(frame, (xs - cx) ** 2 + (ys - bottom - 4 * unit) ** 2 <= (4 * unit) ** 2, colour)
            elif obj.kind == "drum":
                # Squashed and brighter for two frames after each hit.
                hit = since < 2
                w, h = 18 * unit, (24 - 5 * hit) * unit
                cx, top = centre, floor - h
                body = (np.abs(xs - cx) <= w) & (ys >= top) & (ys <= floor)
                _draw(frame, body, np.minimum(colour + (90 if hit else 0), 255))
                _draw(frame, ((xs - cx) / w) ** 2 + ((ys - top) / (5 * unit)) ** 2 <= 1, np.minimum(colour + 60, 255))
            else:  # whistle: drifts right and trembles while it sounds
                cx = x0 + 20 * unit + (x1 - x0 - 32 * unit) * age / max(1, obj.off - obj.on - 1)
                cy = 0.45 * height + (unit if k % 2 else -unit)
                _draw(frame, (np.abs(xs - cx + 10 * unit) <= 10 * unit) & (np.abs(ys - cy) <= 4 * unit), colour)
                _draw(frame, (xs - cx - 3 * unit) ** 2 + (ys - cy - 3 * unit) ** 2 <= (9 * unit) ** 2, colour)
    return video


# ----------------------------------------------------------------------------------- sounds
def _event_sound(kind: str, sample_rate: int, rng: np.random.Generator, length: float) -> np.ndarray:
    """One event's sound, `length` seconds long (the gate cuts it at the object's disappearance)."""
    t = np.arange(round(length * sample_rate)) / sample_rate
    if kind == "ball":  # click: 4 ms noise decay + a 180 Hz thump
        click = rng.standard_normal(t.size) * np.exp(-t / 0.004)
        return 0.5 * click + 0.5 * np.sin(2 * np.pi * 180 * t) * np.exp(-t / 0.03)
    if kind == "bell":  # inharmonic partials of a bell on 880 Hz, 0.35 s decay
        partials = ((1.0, 1.0), (2.0, 0.4), (2.76, 0.25), (5.4, 0.1))
        return 0.35 * sum(a * np.sin(2 * np.pi * 880 * r * t) for r, a in partials) * np.exp(-t / 0.35)
    if kind == "drum":  # low-passed noise burst (moving average of 8 samples at 16 kHz) + a 90 Hz thump
        noise = np.convolve(rng.standard_normal(t.size), np.ones(8) / 8 * 2.5, mode="same")
        return 0.6 * noise * np.exp(-t / 0.05) + 0.6 * np.sin(2 * np.pi * 90 * t) * np.exp(-t / 0.12)
    # whistle: a sweep 1200 -> 2400 Hz over its whole visibility (phase = 2 pi * integral of f)
    frequency = 1200 + 1200 * t / max(length, 1e-6)
    return 0.3 * np.sin(2 * np.pi * np.cumsum(frequency) / sample_rate)


def render_audio(clip: DemoClip, seed: int, index: int) -> np.ndarray:
    """(channels, samples) float32 in [-1, 1]: each object's event sounds, gated to its visible interval."""
    rate = clip.sample_rate
    total = round(clip.seconds * rate)
    rng = np.random.default_rng([seed, index, 1])
    out = np.zeros((clip.channels, total), dtype=np.float64)
    fade = round(FADE_SECONDS * rate)
    width = max(obj.region[1] for obj in clip.objects)  # the canvas width (the objects' regions tile it)
    for obj in clip.objects:
        begin, end = round(obj.on / clip.fps * rate), round(obj.off / clip.fps * rate)
        track = np.zeros(total)
        for event in obj.events:
            at = round(event / clip.fps * rate)
            sound = _event_sound(obj.kind, rate, rng, min((end - at) / rate, EVENT_SECONDS[obj.kind]))
            track[at : at + sound.size] += sound
        gate = np.zeros(total)
        gate[begin:end] = 1.0
        gate[end - fade : end] = np.linspace(1.0, 0.0, fade)  # silent from `off` on
        track *= gate
        # Stereo: constant-power pan by where the object is on screen (left half -> left channel louder).
        pan = (obj.region[0] + obj.region[1]) / 2 / width
        gains = (np.sqrt(1 - pan), np.sqrt(pan)) if clip.channels == 2 else (1.0,)
        for channel, gain in enumerate(gains):
            out[channel] += gain * track
    peak = np.abs(out).max(initial=0.0)
    if peak > 0.9:
        out *= 0.9 / peak
    return out.astype(np.float32)


# ----------------------------------------------------------------------------------- files
def _write_clip(path: Path, video: np.ndarray, audio: np.ndarray, fps: int, sample_rate: int) -> None:
    """H.264 (yuv420p) + AAC mp4, written to a temporary name and renamed into place."""
    partial = path.with_name(f".{path.name}.part")
    layout = "mono" if audio.shape[0] == 1 else "stereo"
    with av.open(str(partial), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = video.shape[1:3]
        stream.pix_fmt = "yuv420p"
        # Constant quantiser, one thread: x264's CRF rate control (macroblock-tree lookahead) wrote different
        # bytes for identical input across runs (4 variants in 60 encodes, even single-threaded); QP did not.
        stream.options = {"qp": "18", "preset": "veryfast", "threads": "1"}
        sound = container.add_stream("aac", rate=sample_rate)
        sound.layout = layout
        sound.options = {"aac_coder": "fast"}  # FFmpeg's default "twoloop" coder took 75% of the demo's time
        for k, image in enumerate(video):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = k, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
        samples = av.AudioFrame.from_ndarray(audio, format="fltp", layout=layout)
        samples.sample_rate, samples.pts, samples.time_base = sample_rate, 0, Fraction(1, sample_rate)
        container.mux(sound.encode(samples))  # PyAV cuts it into AAC's 1024-sample frames
        container.mux(sound.encode())
    os.replace(partial, path)


def _csv_text(clips: list[DemoClip]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for clip in clips:
        writer.writerow([clip.ytid, 0, clip.label, clip.split])
    return buffer.getvalue()


def make_demo_set(
    out_dir: Path,
    n_train: int = 24,
    n_test: int = 6,
    seconds: float = 8.0,
    size: tuple[int, int] = (96, 96),
    fps: int = 12,
    seed: int = 0,
) -> Path:
    """Write the demo clips and their VGGSound CSV under `out_dir`; returns the CSV path.

    Clips already present are kept as they are (the content is a function of the arguments, so a
    present file is the file this call would write); the CSV is rewritten only when its text changes.
    """
    out_dir = Path(out_dir)
    video_dir = out_dir / "videos"
    video_dir.mkdir(parents=True, exist_ok=True)
    splits = ["train"] * n_train + ["test"] * n_test
    clips = [plan_clip(index, split, seed, seconds, size[0], fps) for index, split in enumerate(splits)]
    for index, clip in enumerate(clips):
        path = video_dir / f"{clip.ytid}_000000.mp4"
        if path.is_file():
            continue
        _write_clip(path, render_frames(clip, size), render_audio(clip, seed, index), fps, clip.sample_rate)
    csv_path = out_dir / "vggsound.csv"
    text = _csv_text(clips)
    if not csv_path.is_file() or csv_path.read_text(encoding="utf-8") != text:
        partial = csv_path.with_name(f".{csv_path.name}.part")
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, csv_path)
    return csv_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m preprocess.demo",
        description="Write the synthetic demo set (coloured objects with matching sounds) in VGGSound's layout.",
    )
    parser.add_argument("--out", type=Path, default=Path("data/demo"), help="output folder (videos/ and vggsound.csv)")
    parser.add_argument("--train", type=int, default=24, help="number of training clips")
    parser.add_argument("--test", type=int, default=6, help="number of test clips")
    parser.add_argument("--seconds", type=float, default=8.0, help="mean clip length; each clip is 0.75-1.25 times it")
    parser.add_argument("--size", type=int, nargs=2, default=(96, 96), metavar=("W", "H"), help="frame size in pixels")
    parser.add_argument("--fps", type=int, default=12, help="frame rate")
    parser.add_argument("--seed", type=int, default=0, help="seed: the same seed writes the same set")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    csv_path = make_demo_set(args.out, args.train, args.test, args.seconds, tuple(args.size), args.fps, args.seed)
    seconds = time.perf_counter() - began
    print(f"{args.train + args.test} demo clips in {args.out / 'videos'}, listed in {csv_path} ({seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
