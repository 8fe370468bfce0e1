"""Stage-one throughput on the demo set: end to end vs the encoders alone on pre-decoded clips.

`python -m benchmarks.features_cpu [--preset tiny] [--clips 30] [--no-write]` prints both numbers and their
ratio (what decoding, I/O and shard writing cost) and records them in benchmarks/RESULTS.md. End to end runs twice
per repeat, alternating, with the shard writer inline and in its background thread (`ShardSink`).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.results import machine_name, write_section
from preprocess import manifest
from preprocess.config import PRESETS
from preprocess.demo import make_demo_set
from preprocess.nouns import NounCache
from preprocess.pipeline import DecodeDataset, Encoders, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--clips", type=int, default=30, help="demo clips to generate and process")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="end-to-end runs per writer mode (median reported)")
    parser.add_argument("--no-write", dest="write", action="store_false", help="do not record the result in benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    cfg = PRESETS[args.preset].replace(num_workers=args.num_workers, random_init=True)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_demo_set(root / "demo", n_train=args.clips, n_test=0)
        clips = manifest.from_vggsound_csv(root / "demo" / "vggsound.csv", root / "demo" / "videos")
        from common.devices import resolve_device

        encoders = Encoders(cfg, None, resolve_device(cfg.device))
        run(cfg, clips, root / "warmup", None, progress=False, encoders=encoders)  # warm-up (first-call costs)
        rates: dict[bool, list[float]] = {False: [], True: []}
        for repeat in range(args.repeats):  # alternating, so that a busy spell of a shared machine hits both
            for threaded in (False, True):
                summary = run(cfg, clips, root / f"shards-{threaded}-{repeat}", None, progress=False, encoders=encoders,
                              threaded_writer=threaded)
                rates[threaded].append(summary.written / summary.wall_seconds)
        end_to_end = statistics.median(rates[True])
        inline = statistics.median(rates[False])

        dataset = DecodeDataset(clips, cfg)
        decode_start = time.perf_counter()
        decoded = [dataset[i] for i in range(len(dataset))]
        decode_seconds = time.perf_counter() - decode_start
        decoded = [d for d in decoded if "error" not in d]
        nouns_of = NounCache(cfg.tagger, cfg.max_nouns)
        start = time.perf_counter()
        for i in range(0, len(decoded), cfg.batch_clips):
            batch = decoded[i : i + cfg.batch_clips]
            encoders.encode(batch, [nouns_of(d["clip"].caption) for d in batch])
        encoders_only = len(decoded) / (time.perf_counter() - start)

    lines = [
        f"- machine: {machine_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads; preset `{args.preset}` "
        f"(random init), {len(clips)} demo clips, {args.num_workers} decoding worker(s)",
        f"- end to end (decode + encoders + shard write), median of {args.repeats}: **{end_to_end:.2f} clips/s** with the "
        f"background writer, {inline:.2f} clips/s with the writer inline (before; {summary.written} clips per run)",
        f"- encoders alone on pre-decoded clips: **{encoders_only:.2f} clips/s**",
        f"- ratio end-to-end / encoders-alone: **{end_to_end / encoders_only:.2f}**",
        f"- decoding alone, one process: {len(dataset) / decode_seconds:.2f} clips/s",
    ]
    print("\n".join(lines))
    if args.write:
        write_section(f"Stage one on the CPU ({args.preset})", "\n".join(lines) + f"\n- python {platform.python_version()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
