"""`python -m eval [flags]`: generate and measure one run; `python -m eval table RUN_EVAL_DIR... [--columns
paper|av-benchmark] --out table.md`.

With no arguments: the demo model runs/demo on data/shards/demo, every clip of split test, into runs/demo/eval
(DDIM, 25 steps, EMA weights). `--preset paper`: ancestral DDPM, 300 steps, guidance 3, on 1,000 test clips chosen
by a seeded rule (--max-clips, --selection-seed). Every evaluation lists its clips in <output>/clip_ids.txt;
`--clip-ids <that file>` scores another run or system on exactly the same clips. `--model-weights raw` generates
with the run's raw (non-EMA) weights, as VTA-LDM does; `--weights` stays the stage-one AudioLDM weights folder.
Run the same command again to resume: WAVs already written are kept (their settings are in <output>/wav/manifest.json;
other settings, or the other weights file, need another --output), ground-truth embeddings come from the cache.
"""

from __future__ import annotations

import argparse
import sys

from common.config import config_main, os_error_line, path_argument
from eval.config import PRESETS, EvalConfig


def table_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval table",
                                     description="Gather the results.json of several evaluations into one Markdown table.")
    parser.add_argument("folders", nargs="+", type=path_argument, help="evaluation output folders (each holds results.json)")
    parser.add_argument("--names", nargs="+", help="row names, one per folder (default: '<run> (<inputs>)')")
    parser.add_argument("--out", type=path_argument, help="write the table here (default: print it)")
    parser.add_argument("--columns", choices=("paper", "av-benchmark"), default="paper",
                        help="the paper's columns (FD, FAD, KL, KL-sigmoid, IS, AV-Align, AV-Align 2023) or "
                             "av-benchmark's (FD-PaSST, FD-PANNs, FD-VGG, KL-PANNs, KL-PaSST, IS-PANNs, IS-PaSST, "
                             "IB-score, DeSync), as MMAudio and later papers print them")
    args = parser.parse_args(argv)
    from eval.report import load_results, table

    if args.names and len(args.names) != len(args.folders):
        print(f"error: {len(args.names)} names for {len(args.folders)} folders", file=sys.stderr)
        return 2
    try:
        text = table([load_results(folder) for folder in args.folders], args.names, columns=args.columns)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.out:
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text, encoding="utf-8")
        except OSError as error:
            print(f"error: {args.out}: cannot write the table ({error.strerror or error})", file=sys.stderr)
            return 2
        print(f"table of {len(args.folders)} runs written to {args.out}")
    else:
        print(text, end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["table"]:
        return table_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m eval",
        description="Generate one WAV per test clip with a trained run and measure it: the paper's FD, FAD, KL and "
                    "AV-Align (--metrics paper, the default), av-benchmark's FD/KL/IS on PaSST, ImageBind score and "
                    "DeSync (--metrics av-benchmark), or both (--metrics all). `python -m eval table DIR... "
                    "[--columns paper|av-benchmark] --out table.md` gathers several evaluations into one table.",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return config_main(parser, PRESETS, "demo", "evaluation configuration (overrides the preset)", argv, run)


def run(config: EvalConfig, args: argparse.Namespace) -> int:
    from common.signals import exit_on_stop_signals
    from eval.clips import EvalError
    from eval.evaluate import evaluate
    from eval.report import RESULTS_FILE, selected_tables, table
    from shards import ShardFormatError

    try:
        # a scheduler's SIGTERM: the file being written is dropped, as on Ctrl-C
        with exit_on_stop_signals(config.output_dir):
            results = evaluate(config, progress=not args.quiet)
    except (EvalError, ShardFormatError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the WAVs and cached embeddings written so far are kept
        print(f"\ninterrupted: run the same command again to go on ({config.output_dir})", file=sys.stderr)
        return 130
    except OSError as error:  # an output or cache folder it may not write, a file it may not read
        print(os_error_line(error, config.output_dir), file=sys.stderr)
        return 2
    for columns in selected_tables(results):
        print(table([results], columns=columns), end="")
    print(f"results: {config.output_dir / RESULTS_FILE}")
    return 0


if __name__ == "__main__":
    from common.signals import exit_with

    exit_with(main)
