"""An evaluation's results (`Results`, written as results.json), its report.md and figure.png, and the table
that gathers several runs.

The table has one row per run (e.g. V-only vs V+O) and the columns of one of `eval.registry.TABLES`: 'paper' (the
paper's layout: FD, FAD, KL, KL-sigmoid: lower is better; IS, AV-Align and AV-Align 2023: higher is better,
AV-Align shown as mean +- the half-width of its 95% confidence interval) or 'av-benchmark' (FD-PaSST, FD-PANNs,
FD-VGG, KL-PANNs, KL-PaSST, IS-PANNs, IS-PaSST, IB-score x100, DeSync: the columns of MMAudio and later papers). `load_results` reads
results.json as a plain dict, so that files written by older versions still make a table (a metric they lack
shows '—'); `Results.to_dict` writes exactly that layout. When a row was measured with random-weight embedders,
the first line of the report or table says the numbers are not comparable to published ones; knobs that differ
between rows are listed under the table (a knob a row's file predates is taken at its value before it existed,
`KNOB_DEFAULTS`, or else left out of that comparison).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import librosa
import numpy as np

import shards
from eval.audio_embedding import RESAMPLER
from eval.clips import WAV_DIR, EvalError, iterate_split_samples, read_wav, wav_path
from eval.config import EvalConfig
from eval.figures import FigureClip, mel_figure
from eval.registry import BY_NAME, METRICS, NOT_SELECTED, TABLES, select_metrics, tables_for

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
FIGURE_FILE = "figure.png"
NOT_COMPARABLE = ("The embedders have random weights: these numbers are NOT comparable to published ones "
                  "(only to other runs measured with the same random embedders).")
METRIC_KNOBS = tuple(dict.fromkeys(key for metric in METRICS for key in metric.protocol))
# knobs that make two rows of a table measure different things when they differ ('embedders' holds the widths:
# random embedders of either size share the checkpoint id 'random-init:seed=N')
COMPARED_KNOBS = ("duration", "audio_protocol", "sample_rate", "generated_sample_rate", "sampler", "steps",
                  "guidance", "seed", "model_weights", "clip_count", "clip_ids_sha256", "peak", "reference",
                  "embedder_checkpoints", "embedders", "random_embedder_size", "embedder_seed", "resampler",
                  *METRIC_KNOBS)
# the protocol knobs report.md lists, in this order
REPORTED_KNOBS = ("sampler", "steps", "sampler_schedule", "guidance", "seed", "samples_per_clip", "model_weights",
                  "duration", "audio_protocol", "sample_rate", "generated_sample_rate", "peak", "clip_count",
                  "clip_selection", "clip_ids_sha256", "checkpoint_sha256", "embedder_checkpoints",
                  "random_embedder_size", "embedder_seed", "random_embedder_names", "unavailable_embedders",
                  "metrics", "video_window", "inputs", "scheme", "vae", "reference", "resampler", *METRIC_KNOBS)
# the value a knob had before results files recorded it (files without it were measured that way)
KNOB_DEFAULTS: dict[str, Any] = {"audio_protocol": "mean-cut", "model_weights": "ema"}
_ABSENT = object()
# the report's lines on how many clips each kind of metric rests on: (counts key, label)
PAIR_COUNTS = (("kl_pairs", "KL pairs"), ("kl_panns_pairs", "KL-PANNs pairs"), ("kl_passt_pairs", "KL-PaSST pairs"),
               ("ib_pairs", "IB-score pairs"), ("desync_clips", "DeSync clips"))
VIDEO_COUNTS = (("videos_missing", "missing for AV-Align"), ("benchmark_videos_missing", "missing for ImageBind and "
                "Synchformer"), ("video_windows_shortened", "windows shortened to the clip's length"))


@dataclass(frozen=True)
class Results:
    """One evaluation, as results.json states it (`to_dict`); the metrics' values, null reasons, counts and
    per-clip values are keyed by the names of `eval.registry.METRICS`."""

    comparable: bool  # measured with the official embedder checkpoints
    values: dict[str, Any]  # metric name -> value (None: see null_reasons)
    null_reasons: dict[str, str]
    counts: dict[str, Any]
    failures: list[dict[str, Any]]
    generation: dict[str, Any]  # what this run generated and what the WAVs' manifest says
    run: str
    run_name: str
    shards: str
    split: str
    clips: list[str]
    protocol: dict[str, Any]  # every knob the numbers depend on
    software: dict[str, Any]
    config: dict[str, Any]
    per_clip: dict[str, dict[str, float | None]]  # per-clip metric -> clip id -> value
    wav_dir: str = WAV_DIR

    def to_dict(self) -> dict[str, Any]:
        """The content of results.json (NaN still NaN: `write_outputs` makes it JSON)."""
        return {
            "comparable": self.comparable, "warning": None if self.comparable else NOT_COMPARABLE,
            **{metric.name: self.values.get(metric.name) for metric in METRICS},
            "null_reasons": self.null_reasons, "counts": self.counts, "failures": self.failures,
            "generation": self.generation, "run": self.run, "run_name": self.run_name, "shards": self.shards,
            "split": self.split, "wav_dir": self.wav_dir, "clips": self.clips, "protocol": self.protocol,
            "software": self.software, "config": self.config,
            **{f"{metric.name}_per_clip": self.per_clip.get(metric.name, {}) for metric in METRICS if metric.per_clip},
        }


def _atomic_write(path: Path, text: str | Callable[[Path], Any]) -> None:
    """`text` (or what `text(temporary path)` writes) into `path` through a temporary file renamed over it;
    EvalError naming `path` when it cannot be written (a folder of that name, no room, no permission)."""
    tmp = path.with_name(path.name + ".tmp" + path.suffix)  # matplotlib picks the format by the suffix
    try:
        if isinstance(text, str):
            tmp.write_text(text, encoding="utf-8")
        else:
            text(tmp)
        os.replace(tmp, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise EvalError(f"{path}: cannot be written ({error.strerror or error})") from None


def _json_safe(value: Any) -> Any:
    """NaN and infinities are not JSON: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


def load_results(folder: str | Path) -> dict[str, Any]:
    """<folder>/results.json, checked to be what `eval table` and the listening test read: an object whose metric
    values are measurements (numbers, null, or the summaries per-clip metrics write) and whose counts, protocol
    and null_reasons are objects; ValueError naming the file otherwise, FileNotFoundError when it is absent."""
    path = Path(folder) / RESULTS_FILE
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing (run `python -m eval` for that run first)") from None
    except (OSError, ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError, a directory
        raise ValueError(f"{path}: not readable as JSON ({type(error).__name__}: {error})") from None
    if not isinstance(results, dict):
        raise ValueError(f"{path}: not a JSON object")
    for key in ("counts", "protocol", "null_reasons"):
        if not isinstance(results.get(key, {}), dict):
            raise ValueError(f"{path}: {key} is not an object")
    for name, metric in BY_NAME.items():
        if name in results:
            try:
                _measured(results[name])
                metric.cell(results[name])
            except (TypeError, ValueError, AttributeError, KeyError):
                raise ValueError(f"{path}: {name} is not a measurement ({str(results[name])[:60]!r})") from None
    return results


def _measured(value: Any) -> None:
    """TypeError or ValueError where a metric's value (a number, null, or a summary object of numbers) holds what no
    evaluation writes: true/false, or NaN and infinities (which it writes as null; Python's JSON reads them)."""
    if isinstance(value, bool):
        raise TypeError("a boolean")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("not finite")
    if isinstance(value, dict):
        for item in value.values():
            _measured(item)


# ----------------------------------------------------------------------------------------------------------------
# Table
# ----------------------------------------------------------------------------------------------------------------
def row_name(results: dict[str, Any]) -> str:
    """'<run name> (<inputs>)', e.g. 'demo (V+O)'."""
    name = results.get("run_name") or Path(str(results.get("run", "?"))).name
    inputs = results.get("protocol", {}).get("inputs")
    return f"{name} ({inputs})" if inputs else name


def table(all_results: list[dict[str, Any]], names: list[str] | None = None, warn: bool = True,
          columns: str = "paper") -> str:
    """Markdown table of several evaluations, one row each, with the columns of `TABLES[columns]`; names default
    to `row_name`. With `warn`, the first line says when some row was measured with random-weight embedders."""
    if columns not in TABLES:
        raise ValueError(f"unknown table {columns!r} (one of {', '.join(TABLES)})")
    metrics = [BY_NAME[name] for name in TABLES[columns]]
    names = names or [row_name(r) for r in all_results]
    lines = []
    if warn and any(not r.get("comparable", False) for r in all_results):
        lines += [f"**{NOT_COMPARABLE}**", ""]
    lines += ["| Run | " + " | ".join(metric.header_in(columns) for metric in metrics) + " | Clips (paired) |",
              "|---|" + "---|" * (len(metrics) + 1)]
    notes = []
    for name, r in zip(names, all_results):
        counts = r.get("counts", {})
        cells = " | ".join(metric.cell(r.get(metric.name)) for metric in metrics)
        lines.append(f"| {name} | {cells} | {counts.get('clips', '?')} ({counts.get('paired', '?')}) |")
        for metric_name, reason in r.get("null_reasons", {}).items():
            if metric_name in TABLES[columns]:
                notes.append(f"- {name}, {metric_name}: {reason}")
    lines += ["", *(metric.note for metric in metrics if metric.note)]
    differing = []
    for knob in COMPARED_KNOBS:
        stated = [r.get("protocol", {}).get(knob, KNOB_DEFAULTS.get(knob, _ABSENT)) for r in all_results]
        values = [json.dumps(v, sort_keys=True) for v in stated if v is not _ABSENT]
        if len(set(values)) > 1:
            differing.append(f"{knob} ({', '.join(values)})")
    splits = {(r.get("shards"), r.get("split")) for r in all_results}
    if len(splits) > 1:
        differing.append("test set (" + ", ".join(sorted(f"{s}:{p}" for s, p in splits)) + ")")
    if differing:
        lines.append("Rows differ in: " + "; ".join(differing) + ".")
    if notes:
        lines += ["", "Missing values:", *notes]
    return "\n".join(lines) + "\n"


def selected_tables(results: dict[str, Any]) -> list[str]:
    """The tables worth printing for one evaluation: those of its --metrics selection ('paper' for files that
    predate the selection)."""
    try:
        return tables_for(select_metrics(str(results.get("protocol", {}).get("metrics", "paper"))))
    except ValueError:
        return ["paper"]


# ----------------------------------------------------------------------------------------------------------------
# One evaluation's report
# ----------------------------------------------------------------------------------------------------------------
def report_markdown(results: dict[str, Any]) -> str:
    """report.md: warning line first when not comparable, then the table row, counts, failures and knobs."""
    protocol = results["protocol"]
    official = ", ".join(sorted(protocol.get("embedder_checkpoints", {}))) or "none"
    lines = [f"**{NOT_COMPARABLE}**" if not results["comparable"] else
             f"Numbers measured with the official checkpoints of the embedders ({official}).", ""]
    lines += [f"# Evaluation of {results['run']}", ""]
    for columns in selected_tables(results):
        lines += [table([results], warn=False, columns=columns)]
    counts = results["counts"]
    lines += ["## Clips", "",
              f"- {counts['paired']} of {counts['clips']} clips of split `{results['split']}` in `{results['shards']}` "
              f"have a readable generated WAV ({counts['paired_fraction']:.0%}; the audio metrics need "
              f"{counts['min_paired']:.0%}).",
              f"- Missing, unreadable or failed: {counts['failures']}."]
    paired = [f"{label} {counts[key]}" for key, label in PAIR_COUNTS if counts.get(key) is not None]
    if paired:
        lines.append(f"- Clips measured: {'; '.join(paired)}.")
    videos = [f"{label} {counts[key]}" for key, label in VIDEO_COUNTS if counts.get(key) is not None]
    if videos:
        lines.append(f"- Source videos: {'; '.join(videos)}.")
    lines += [metric.describe(results) for metric in METRICS if metric.describe is not None
              and not str(results["null_reasons"].get(metric.name, "")).startswith(NOT_SELECTED)]
    lines += [f"- Not computed: {reason}" for reason in dict.fromkeys(protocol.get("unavailable_embedders", {}).values())]
    for note in results.get("generation", {}).get("notes", []):
        lines.append(f"- Note: {note}.")
    if results["failures"]:
        lines += ["", "## Failures", "", *[f"- `{f['id']}` ({f['stage']}): {f['reason']}" for f in results["failures"]]]
    lines += ["", "## Protocol", ""]
    generation = results.get("generation", {})
    if generation:
        lines.append(f"- WAVs generated in this run: {generation.get('wavs_written', 0)} "
                     f"(generation {'on' if generation.get('generated_in_this_run') else 'off'}); the generation "
                     f"settings below are those of `{results['wav_dir']}/manifest.json`")
        speed = generation.get("speed") or {}
        if speed and generation.get("wavs_written"):
            probe = speed.get("seconds_per_clip_step")
            lines.append(f"- sampled {speed['sampling_batch']} clips at a time on {speed.get('device')}"
                         f"{' (measured: seconds per clip and step ' + json.dumps(probe) + ')' if probe else ''}, "
                         f"CUDA graphs {'on' if speed.get('cuda_graphs') else 'off'}")
    for key in REPORTED_KNOBS:
        if key in protocol:
            lines.append(f"- {key}: `{json.dumps(protocol[key])}`")
    lines.append(f"- software: `{json.dumps(results['software'])}`")
    lines += ["", f"Generated audio: `{results['wav_dir']}/<clip id>.wav`; every knob: `{RESULTS_FILE}`."]
    return "\n".join(lines) + "\n"


def figure_clips(config: EvalConfig, clips: list[shards.SampleMeta], sample_rate: int) -> list[FigureClip]:
    """The first `config.figure_clips` clips with a readable WAV, with their ground truth and probabilities; the
    generated audio at `sample_rate` (the shards', the ground truth's: a WAV at another rate is resampled)."""
    out_dir = config.output_dir
    chosen: dict[str, np.ndarray] = {}
    for clip in clips:
        path = wav_path(out_dir, clip.id)
        if len(chosen) == config.figure_clips:
            break
        if path.exists():
            try:
                waveform, rate = read_wav(path)
            except ValueError:  # already listed among the failures
                continue
            if rate != sample_rate:
                waveform = librosa.resample(waveform, orig_sr=rate, target_sr=sample_rate, res_type=RESAMPLER)
            chosen[clip.id] = waveform
    found: dict[str, FigureClip] = {}
    for sample in iterate_split_samples(config.shards, config.split, chosen):
        meta = sample["json"]
        found[meta["id"]] = FigureClip(id=meta["id"], generated=chosen[meta["id"]], reference=sample["flac"],
                                       probs=sample["probs.npy"], nouns=tuple(meta["nouns"]), caption=meta["caption"])
        if len(found) == len(chosen):
            break
    return [found[i] for i in chosen if i in found]


def write_outputs(out_dir: Path, results: Results, config: EvalConfig, clips: list[shards.SampleMeta],
                  progress: bool = True) -> dict[str, Any]:
    """results.json, report.md and (with config.figure_clips > 0 and some WAV) figure.png, each atomically;
    returns what results.json holds (NaN and infinities as None)."""
    content = _json_safe(results.to_dict())
    _atomic_write(out_dir / RESULTS_FILE, json.dumps(content, indent=2, sort_keys=True) + "\n")
    _atomic_write(out_dir / REPORT_FILE, report_markdown(content))
    if config.figure_clips:
        rate = shards.read_spec(config.shards).sample_rate
        chosen = figure_clips(config, clips, rate)
        if chosen:
            _atomic_write(out_dir / FIGURE_FILE,
                          lambda tmp: mel_figure(tmp, chosen, rate, results.protocol["window_seconds"]))
    return content
