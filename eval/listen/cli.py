"""Command line: run a listening test, or report its results.

    python -m eval.listen RUN_DIR... [--clips 30] [--seed 0] [--host 127.0.0.1] [--port 8765] [--work DIR] [--db PATH]
    python -m eval.listen --report DB [--out DIR] [--screen-threshold 50]

Resume = run the same command again: the database keeps the study (clips, systems, tokens) and every rating, and
muxed videos are reused.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from pathlib import Path

from common.config import path_argument
from eval.listen.report import DEFAULT_THRESHOLD, build_report, to_markdown, write_report
from eval.listen.server import make_server
from eval.listen.store import RatingStore
from eval.listen.study import GROUND_TRUTH, common_clips, load_runs, pick_clips, prepare_study

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.listen",
        description="Blinded listening test (Table II): serve the rating page for some evaluation runs, or report.",
    )
    parser.add_argument(
        "runs", nargs="*", metavar="RUN_DIR", help="evaluation run folders (results.json + wav/) to compare"
    )
    parser.add_argument(
        "--clips", type=int, default=30, help="number of test clips, drawn at random from those every run has (default 30)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the clip draw and of every listener's random order (default 0)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    parser.add_argument("--port", type=int, default=8765, help="port to listen on (0: any free port; default 8765)")
    parser.add_argument(
        "--work", type=path_argument, default=Path("runs/listen"), help="folder for the muxed videos and the database (default runs/listen)"
    )
    parser.add_argument(
        "--db", type=path_argument, default=None, help="SQLite database of the ratings (default: WORK/ratings.sqlite)"
    )
    parser.add_argument("--jobs", type=int, default=None, help="parallel ffmpeg processes (default: CPU count)")
    parser.add_argument(
        "--no-normalise",
        dest="normalise",
        action="store_false",
        help="keep every track's level (default: same RMS loudness for all, peaks under -1 dBFS)",
    )
    parser.add_argument("--prepare-only", action="store_true", help="mux the videos and set up the database, then exit")
    parser.add_argument("--report", type=path_argument, metavar="DB", help="print and write the results table of this database")
    parser.add_argument(
        "--out", type=path_argument, default=None, help="folder for the report's .md and .json (default: the DB's folder)"
    )
    parser.add_argument(
        "--screen-threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help="flag listeners whose mean ground-truth score is below this (default: %(default)s)",
    )
    return parser


def report(args: argparse.Namespace) -> int:
    result = build_report(args.report, threshold=args.screen_threshold)
    markdown, data = write_report(result, args.out or args.report.parent)
    print(to_markdown(result))
    print(f"wrote {markdown} and {data}")
    return 0


def serve(args: argparse.Namespace) -> int:
    runs = load_runs(args.runs)
    db = args.db or args.work / "ratings.sqlite"
    store = RatingStore(db)
    try:
        systems = [GROUND_TRUTH, *(run.name for run in runs)]
        stored = store.study()
        if stored is None:
            clips, seed = pick_clips(runs, args.clips, args.seed), args.seed
        else:  # the database is the test: same clips and tokens, whatever the flags say now
            clips, seed = stored["clips"], stored["seed"]
            if set(stored["systems"]) != set(systems):
                raise ValueError(
                    f"{db}: holds a test of {', '.join(stored['systems'])}, not of {', '.join(systems)}; "
                    "pass another --db for a new test"
                )
            missing = sorted(set(clips) - set(common_clips(runs)))
            if missing:
                raise ValueError(f"{db}: its clip(s) {', '.join(missing[:5])} lack a WAV in some run")
            if (len(clips), seed) != (args.clips, args.seed):
                print(
                    f"note: resuming the test in {db} ({len(clips)} clips, seed {seed}); --clips/--seed are ignored",
                    file=sys.stderr,
                )
        study = prepare_study(runs, clips, args.work, normalise=args.normalise, jobs=args.jobs)
        store.register_study(clips, study.systems, seed)
        if args.prepare_only:
            print(f"ready: {len(clips)} clips x {len(study.systems)} versions in {args.work}, database {db}")
            return 0
        server = make_server(store, study.media, args.host, args.port)
        if args.host not in LOOPBACK:
            print(
                f"warning: bound to {args.host}: anyone who can reach this machine can open the test", file=sys.stderr
            )
        print(
            f"listening test ({len(clips)} clips, {len(study.systems)} versions each) at {server.url}  "
            f"(ratings: {db}; Ctrl+C stops)",
            flush=True,
        )
        try:
            server.serve_forever(poll_interval=0.5)
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
        return 0
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.report is not None and args.runs:
        parser.error("give either RUN_DIR... (run a test) or --report DB, not both")
    if args.report is None and not args.runs:
        parser.error("give the evaluation run folders to compare, or --report DB")
    if not 0 <= args.port <= 65535:  # found only after every video was muxed (bind's OverflowError)
        parser.error(f"argument --port: {args.port} is not a port (0-65535; 0: any free port)")
    try:
        return report(args) if args.report is not None else serve(args)
    except sqlite3.DatabaseError as error:  # --db names a file that is no SQLite database
        db = args.report or args.db or args.work / "ratings.sqlite"
        what = "not a ratings database" if "not a database" in str(error) else "SQLite"
        print(f"error: {db}: {what} ({error})", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
