"""Cost of the evaluation embedders per clip: seconds to embed one 8 s clip (front end included) with each
embedder, tiny and paper size, random weights; and the time to build each. Writes a section of
benchmarks/RESULTS.md.

The video side starts from frames already taken at the embedder's rate and resized to a short side of 224 (what
`eval.video_frames.window_frames` hands over); decoding is not timed. `python -m benchmarks.eval_embedders
[--sizes tiny paper] [--threads N] [--device cuda]`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from benchmarks.results import machine_name, write_section

SECONDS = 8.0
RATE = 16000


def timed(step: Callable[[], object], repeat: int = 1) -> float:
    """Best of `repeat` wall-clock seconds of step() (after one warm-up call when repeating)."""
    if repeat > 1:
        step()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def clip_inputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An 8 s clip: 16 kHz audio, 0.5 fps frames (4) and 25 fps frames (200), 224 x 398 (a 16:9 video)."""
    rng = np.random.default_rng(seed)
    audio = (0.2 * rng.standard_normal(int(RATE * SECONDS))).astype(np.float32)
    frames = rng.integers(0, 256, (int(25 * SECONDS), 224, 398, 3), dtype=np.uint8)
    return audio, frames[12::50][:int(0.5 * SECONDS)], frames


def measure(size: str, device: torch.device, repeat: int) -> list[tuple[str, float, float]]:
    """(embedder, build seconds, seconds per clip) for each embedder at `size`."""
    from eval.audio_embedding import embed_clips
    from eval.imagebind import IMAGEBIND_CONFIGS, imagebind_audio_input, imagebind_video_input, load_imagebind
    from eval.panns import CNN14_CONFIGS, load_cnn14
    from eval.passt import PASST_CONFIGS, load_passt, passt_waveform
    from eval.synchformer import (
        SYNCHFORMER_CONFIGS,
        load_synchformer,
        synchformer_audio_input,
        synchformer_video_input,
    )
    from eval.vggish import VGGISH_CONFIGS, load_vggish

    audio, ib_frames, sync_frames = clip_inputs()
    rows = []

    start = time.perf_counter()
    cnn14, vggish = load_cnn14(None, device, CNN14_CONFIGS[size]), load_vggish(None, device, VGGISH_CONFIGS[size])
    build = time.perf_counter() - start
    rows.append(("PANNs Cnn14 + VGGish", build,
                 timed(lambda: list(embed_clips([("c", audio)], cnn14, vggish, RATE, SECONDS, progress=False)), repeat)))

    start = time.perf_counter()
    passt = load_passt(None, device, PASST_CONFIGS[size])
    build = time.perf_counter() - start
    rows.append(("PaSST", build, timed(lambda: passt.logits_and_embedding(passt_waveform(audio, RATE, SECONDS)[None]),
                                       repeat)))

    start = time.perf_counter()
    imagebind = load_imagebind(None, device, IMAGEBIND_CONFIGS[size])
    build = time.perf_counter() - start
    rows.append(("ImageBind, video (4 frames, 9 clips)", build,
                 timed(lambda: imagebind.embed_video(imagebind_video_input(ib_frames)[None]), repeat)))
    rows.append(("ImageBind, audio (three 2 s clips)", 0.0,
                 timed(lambda: imagebind.embed_audio(imagebind_audio_input(audio, RATE)[None]), repeat)))

    start = time.perf_counter()
    sync = load_synchformer(None, device, SYNCHFORMER_CONFIGS[size])
    build = time.perf_counter() - start

    def video() -> torch.Tensor:
        with torch.inference_mode():
            return sync.video_features(synchformer_video_input(sync_frames)[None].to(device))

    features = video()

    def audio_and_desync() -> object:
        with torch.inference_mode():
            a = sync.audio_features(synchformer_audio_input(audio, RATE, SECONDS)[None].to(device))
            return sync.desync(features, a)

    rows.append(("Synchformer, video (200 frames, 24 segments)", build, timed(video, repeat)))
    rows.append(("Synchformer, audio + DeSync", 0.0, timed(audio_and_desync, repeat)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "paper"], choices=("tiny", "paper"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=1, help="best of N timed calls (after a warm-up when N > 1)")
    parser.add_argument("--no-write", action="store_true", help="print, do not write benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    lines = [f"Machine: {machine_name()}; device {device}; {args.threads} torch threads; random weights; one 8 s "
             f"clip, batch 1, front end included, decoding not; best of {args.repeat}.", "",
             "| embedder | size | build (s) | per clip (s) |", "|---|---|---|---|"]
    for size in args.sizes:
        for name, build, seconds in measure(size, device, args.repeat):
            lines.append(f"| {name} | {size} | {build:.1f} | {seconds:.3f} |")
            print(lines[-1], flush=True)
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("Evaluation embedders: cost per clip (eval_embedders.py)", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
