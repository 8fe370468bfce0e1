"""`python -m preprocess` (`make features`, `vta-sam features`): videos -> WebDataset feature shards."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from common.config import add_config_arguments, config_from_args, os_error_line, path_argument
from preprocess.config import PRESETS

DEMO_CSV = Path("data/demo/vggsound.csv")
DEMO_VIDEOS = Path("data/demo/videos")
DEMO_OUT = Path("data/shards/demo")


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={os.environ[name]!r} is not a whole number") from None


def distributed_rank(args: argparse.Namespace) -> tuple[int, int]:
    """--rank/--world-size, else torchrun/accelerate (RANK, WORLD_SIZE), else SLURM (array or tasks).

    Raises ValueError (one line) unless 0 <= rank < world size: a rank outside that range would process no clip
    or, with a negative rank, another rank's clips."""
    rank, world_size = _rank_and_size(args)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} with world size {world_size}: the world size must be at least 1 and the rank "
                         "between 0 and world size - 1")
    return rank, world_size


def _rank_and_size(args: argparse.Namespace) -> tuple[int, int]:
    if args.rank is not None or args.world_size is not None:
        return (0 if args.rank is None else args.rank), (1 if args.world_size is None else args.world_size)
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return _env_int("RANK"), _env_int("WORLD_SIZE")
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        offset = _env_int("SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
        return _env_int("SLURM_ARRAY_TASK_ID") - offset, _env_int("SLURM_ARRAY_TASK_COUNT")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return _env_int("SLURM_PROCID"), _env_int("SLURM_NTASKS")
    return 0, 1


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m preprocess",
        description="Stage one of VTA-SAM: decode videos and write per-frame CLIP, Grounding-DINO/SAM and "
        "AudioLDM-VAE features to WebDataset shards. With no input arguments it processes the bundled demo set.",
    )
    source = parser.add_argument_group("input (a VGGSound CSV + video folder, or a folder of videos)")
    source.add_argument("--csv", type=path_argument, help="VGGSound-style CSV: youtube_id,start_seconds,label,split")
    source.add_argument("--videos", type=path_argument, help="video folder")
    source.add_argument("--captions", type=path_argument, help="without --csv: captions for the folder's videos (JSON or CSV name,caption)")
    source.add_argument("--split", help="without --csv: split name given to the folder's videos (default train)")
    parser.add_argument("--out", type=path_argument, help=f"output folder for shards, meta.json, failures.jsonl (default {DEMO_OUT} with the tiny preset, "
                        "data/shards/<preset> with another)")
    parser.add_argument("--weights", type=path_argument, default=Path("weights"), help="weights folder (see README); unused with --random-init")
    parser.add_argument("--rank", type=int, help="this process's rank (default: RANK / SLURM variables, else 0)")
    parser.add_argument("--world-size", type=int, help="number of processes sharing the manifest")
    parser.add_argument("--limit", type=int, help="process at most this many clips of the manifest (first by id)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved configuration and the work to do, then stop")
    add_config_arguments(parser, PRESETS, "tiny", "stage-one configuration (overrides the preset)", argv)
    return parser


def main(argv: list[str] | None = None) -> int:
    from preprocess import manifest

    args = build_parser(argv).parse_args(argv)
    cfg = config_from_args(PRESETS, args)
    if cfg is None:
        return 2
    folder_only = [name for name, value in (("--captions", args.captions), ("--split", args.split)) if value is not None]
    if folder_only and (args.csv is not None or args.videos is None):  # a CSV gives each row's caption and split
        print(f"error: {' and '.join(folder_only)} apply to a folder of videos (--videos without --csv); a CSV's rows give "
              "their own labels and splits", file=sys.stderr)
        return 2
    if args.csv is None and args.videos is None:
        args.csv, args.videos = DEMO_CSV, DEMO_VIDEOS
        if not DEMO_CSV.exists():
            print(f"error: {DEMO_CSV} not found: run `make features` (or `python -m preprocess.demo --out data/demo`) first", file=sys.stderr)
            return 2
    out_dir = args.out or (DEMO_OUT if cfg.preset == "tiny" else Path("data/shards") / cfg.preset)
    try:
        rank, world_size = distributed_rank(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        if args.csv is not None:
            if args.videos is None:
                raise manifest.ManifestError("--csv needs --videos (the folder holding the clips)")
            clips = manifest.from_vggsound_csv(args.csv, args.videos)
        else:
            clips = manifest.from_folder(args.videos, args.captions, args.split or "train")
    except manifest.ManifestError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a manifest, captions file or video folder it may not read
        print(os_error_line(error, args.csv or args.videos), file=sys.stderr)
        return 2
    clips, duplicates = manifest.dedupe(clips)
    if not clips:  # a folder of files of no video suffix, an empty CSV: exit 0 said nothing
        print(f"warning: {args.csv or args.videos}: no clip to make (video files: "
              f"{', '.join(manifest.VIDEO_SUFFIXES)})", file=sys.stderr)
    if args.limit is not None and args.limit < 0:
        print(f"error: --limit must be 0 or more (got {args.limit})", file=sys.stderr)
        return 2
    if args.limit is not None:
        clips = sorted(clips, key=lambda c: c.id)[: args.limit]
    if args.dry_run:
        print(json.dumps({"config": dataclasses.asdict(cfg), "spec": cfg.shard_spec().to_dict(), "clips": len(clips),
                          "duplicate_rows_dropped": duplicates, "out": str(out_dir), "rank": rank, "world_size": world_size}, indent=2))
        return 0

    from common.signals import exit_on_stop_signals
    from preprocess.encoders import OutOfMemory
    from preprocess.nouns import TaggerUnavailableError
    from preprocess.pipeline import FeatureError, print_summary, run

    weights_dir = None if cfg.random_init else args.weights
    # SLURM and friends stop jobs with SIGTERM (SIGUSR1 ahead of a time limit with `--signal=USR1@<seconds>`): an
    # exception, so that the shard in progress is closed; the decoding workers ignore both (`common.signals`)
    try:
        with exit_on_stop_signals(out_dir):
            summary = run(cfg, clips, out_dir, weights_dir, rank, world_size, progress=not args.no_progress)
    except (FeatureError, TaggerUnavailableError, FileNotFoundError, OutOfMemory) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # what was written is kept (the shard in progress is closed, the writer finishes)
        print(f"\ninterrupted: run the same command again to go on ({out_dir})", file=sys.stderr)
        return 130
    except OSError as error:  # writing the shards: a full disk, a folder that went away (reading is per clip)
        print(f"{os_error_line(error, out_dir)}; what was written is kept: run the same command again once the "
              "cause is gone", file=sys.stderr)
        return 2
    if duplicates:
        print(f"note: {duplicates} repeated manifest rows were ignored")
    print_summary(summary)
    # a --videos folder holding none of the manifest's files: every clip of a first run missing (not a resumed run
    # whose last clips are bad files, nor a rank whose share is)
    if set(summary.failed) == {"input"} and not summary.written and not summary.resumed:
        print(f"error: no clip of this run could be made ({sum(summary.failed.values())} failed: see "
              f"{out_dir / 'failures.jsonl'})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from common.signals import exit_with

    exit_with(main)
