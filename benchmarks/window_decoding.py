"""Benchmark: reading a long video window by window, as `vta-sam generate` does, with and without one decord reader
kept open for the whole video (`preprocess.video.reading_windows`).

Writes an H.264 video of `--minutes` minutes (64x48, 30 fps, a keyframe every 10 s) and decodes the frames of every
10.24 s window of it (hop 8.24 s, 20 frames per window, short side 64): once opening decord afresh for each window
(what each call did before), once inside `reading_windows`. Checks the frames agree, and records the
`## vta-sam generate: reading a long video window by window` section of benchmarks/RESULTS.md. ~1 min at 20 minutes.

    python -m benchmarks.window_decoding [--minutes 20] [--no-write]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.results import machine_name, write_section
from preprocess.video import decode_frames, reading_windows
from vta_sam.generate import window_starts

TITLE = "vta-sam generate: reading a long video window by window"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="length of the video")
    parser.add_argument("--no-write", action="store_true", help="print, do not record in RESULTS.md")
    args = parser.parse_args(argv)
    seconds = 60.0 * args.minutes
    times = [0.256 + 0.512 * i for i in range(20)]
    with tempfile.TemporaryDirectory() as folder:
        video = Path(folder) / "long.mp4"
        subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", f"testsrc2=s=64x48:r=30:d={seconds}", "-an",
                        "-c:v", "libx264", "-preset", "ultrafast", "-g", "300", str(video)], check=True)
        starts = window_starts(seconds, 10.24, 2.0)
        started = time.perf_counter()
        fresh = [decode_frames(video, start, times, 10.24, 64).frames for start in starts]
        per_window = time.perf_counter() - started
        started = time.perf_counter()
        with reading_windows():
            shared = [decode_frames(video, start, times, 10.24, 64).frames for start in starts]
        kept_open = time.perf_counter() - started
    same = all(np.array_equal(a, b) for a, b in zip(fresh, shared))
    body = f"""- machine: {machine_name()}
- video: {args.minutes:g} min of 64x48 H.264 at 30 fps (keyframe every 10 s); {len(starts)} windows of 10.24 s
  (hop 8.24 s), 20 frames each at a short side of 64

| decord reader | seconds for every window | per window |
|---|---|---|
| opened for each window (before) | {per_window:.2f} | {per_window / len(starts) * 1000:.1f} ms |
| kept open for the video (`reading_windows`) | {kept_open:.2f} | {kept_open / len(starts) * 1000:.1f} ms |

- frames identical: {same}; speed-up {per_window / kept_open:.1f}x. Opening costs grow with the video's length (decord
  reads every packet's timestamp), so the gain grows with it: without a caption a video is read three times."""
    print(body)
    if not args.no_write:
        write_section(TITLE, body)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
