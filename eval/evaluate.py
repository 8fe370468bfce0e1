"""One evaluation, end to end, as a straight pipeline: select the clips (`eval.clips`: all, a seeded sample of
`max_clips`, or a --clip-ids list; their ids written to <output>/clip_ids.txt), generate the missing WAVs
(`eval.generate`), embed the reference and generated audio and the source videos (`eval.embed` for PANNs and
VGGish, `eval.benchmark_embed` for PaSST, ImageBind and Synchformer), score the metrics `--metrics` selects
(`eval.score`, `eval.registry`: FD, FAD, KL, IS and their PaSST versions on the audio embeddings, IB-score and
DeSync on source video against generated audio, AV-Align on the source videos), then write results.json,
report.md and figure.png (`eval.report`). Definitions: `eval.metrics`. An embedder whose official file is
missing (without --random-embedders) is said in one line at the start; its metrics are null with that line
and the others are computed.

Reference set = the shards' ground-truth audio (the `flac` member) of every selected clip, embedded once per
protocol into the HDF5 cache of `eval.cache`. Generated set = the readable WAVs in <output>/wav. FD and FAD
compare the two sets as distributions; KL pairs clips by id; AV-Align measures each generated WAV against the
original video's window [start, start + duration) at the video's native frame rate.

Bad input is reported, never papered over: a WAV that cannot be read is a failure (listed in results.json),
not silence; a clip without a WAV after generation is a failure too (stage 'missing_wav', unless its
generation failure already explains it: a missing WAV is listed once; counts 'missing_wavs'); when fewer than
`min_paired` of the clips have a readable WAV, FD/FAD/KL are null with the reason;
a metric whose computation fails is null with the error; a clip whose AV-Align fails (a video OpenCV cannot
follow, a WAV shorter than the onset detection's 93 ms frame, a dead worker) is a failure with its reason; a clip whose source video is missing is left out of
AV-Align (counted), and with no video at all AV-Align is null with the reason.

What results.json states about generation comes from <output>/wav/manifest.json (written by `eval.generate`
when it starts filling the folder), not from the current flags: with --no-generate the WAVs may have been made
with other settings than the command line says. The protocol's 'model_weights' is the run's weights file whose
checksum the manifest records, and 'sampler_schedule' the timesteps of the manifest's sampler and steps.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

import shards
from common.devices import resolve_device
from common.lock import FolderBusy, folder_lock
from common.versions import software_versions
from eval.benchmark_embed import benchmark_sets
from eval.clips import (
    EvalError,
    clip_selection,
    evaluation_clips,
    iterate_split_samples,
    missing_wav_failures,
    read_split,
    unreadable_wav_failures,
    wav_path,
    write_clip_ids,
)
from eval.config import EvalConfig
from eval.embed import PANNS_VGGISH, embedder_protocol, generated_embeddings, load_embedders, reference_audio, reference_set
from eval.generate import (
    generate,
    generated_rate,
    generation_protocol,
    manifest_notes,
    read_manifest,
    standing_failures,
    unique_failures,
    wav_notes,
)
from eval.registry import Metric, metric_protocol, select_metrics
from eval.report import FIGURE_FILE, REPORT_FILE, RESULTS_FILE, Results, write_outputs
from eval.score import score

CONFIG_FILE = "config.json"
SUPERSEDED = "superseded"  # where the results of a run with other settings go when the next one starts
# settings that change where a run writes, how many processes measure AV-Align or its figure, never a number: a
# rerun that differs only in them replaces its results in place
UNMEASURED = frozenset({"output", "cache_dir", "workers", "figure_clips"})
log = logging.getLogger(__name__)


def evaluate(config: EvalConfig, progress: bool = True) -> dict[str, Any]:
    """Generate (unless config.generate is off), measure, and write config.json, results.json, report.md and
    figure.png into config.output_dir. Returns the results (results.json's content). One evaluation at a time
    writes into a folder (`common.lock.folder_lock`): a second one given the same folder stops with one line."""
    try:
        selected = select_metrics(config.metrics)
    except ValueError as error:
        raise EvalError(str(error)) from None
    try:
        resolve_device(config.device)
    except ValueError as error:
        raise EvalError(f"--{error}") from None
    if config.output_dir.exists() and not config.output_dir.is_dir():
        raise EvalError(f"{config.output_dir}: exists and is not a folder; give --output a folder")
    try:
        with folder_lock(config.output_dir, "evaluation"):
            return _evaluate(config, selected, progress)
    except FolderBusy as error:
        raise EvalError(str(error)) from None


def supersede_results(out_dir: Path, config: EvalConfig, clips: list[shards.SampleMeta]) -> None:
    """Move results.json, report.md and figure.png of a run made with other settings or clips than this one into
    `superseded/<their time>/` as this run starts: config.json and clip_ids.txt are about to say this run's, and
    a run that then fails must not leave the folder's results describing other clips than its clip_ids.txt."""
    path = out_dir / RESULTS_FILE
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # unreadable, not JSON: not this run's either
        old = None
    def measured(settings: Any) -> Any:  # less what cannot change a number (UNMEASURED)
        return {k: v for k, v in settings.items() if k not in UNMEASURED} if isinstance(settings, dict) else settings

    if (isinstance(old, dict) and measured(old.get("config")) == measured(json.loads(config.to_json()))
            and old.get("clips") == [c.id for c in clips]):
        return  # this run's own: replaced when this run ends
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(path.stat().st_mtime))
    folder = out_dir / SUPERSEDED / stamp
    for n in itertools.count(2):  # two runs within a second
        try:
            folder.mkdir(parents=True)
            break
        except FileExistsError:
            folder = out_dir / SUPERSEDED / f"{stamp}-{n}"
    for name in (RESULTS_FILE, REPORT_FILE, FIGURE_FILE):
        if (out_dir / name).exists():
            os.replace(out_dir / name, folder / name)
    log.warning("warning: %s: the results of the run before this one (other settings or clips) moved to %s", out_dir,
                folder)


def check_samples(config: EvalConfig, ids: list[str], progress: bool) -> None:
    """Decode, and so validate against the schema, the samples of the clips `ids`: those generation did not decode
    (with --no-generate, or whose WAV exists), before anything is scored or written. A bad sample is one EvalError
    naming shard and sample, as it would be when generating for it; found only by the figure, after results.json,
    it used to stop the run half-reported."""
    if not ids:
        return
    from tqdm.auto import tqdm

    with tqdm(total=len(ids), unit="clip", desc="checking samples", disable=not progress) as bar:
        for _ in iterate_split_samples(config.shards, config.split, ids):
            bar.update(1)


def _evaluate(config: EvalConfig, selected: tuple[Metric, ...], progress: bool) -> dict[str, Any]:
    out_dir = config.output_dir

    # 1. the clips
    try:
        spec = shards.read_spec(config.shards)
    except shards.ShardFormatError as error:
        raise EvalError(str(error)) from None
    in_shard_order = read_split(config.shards, config.split)
    clips = evaluation_clips(config, in_shard_order)
    if not clips:
        raise EvalError(f"{config.shards}: no clip of split {config.split!r}")

    def record_run() -> None:
        """config.json and clip_ids.txt, once this run is known to go ahead (a run refused for its settings must
        not replace an earlier run's list, which other systems are scored on with --clip-ids); before generating,
        so that another run can take the same clips meanwhile."""
        supersede_results(out_dir, config, clips)
        (out_dir / CONFIG_FILE).write_text(config.to_json(), encoding="utf-8")
        write_clip_ids(out_dir, clips)

    # before generating: a bad checkpoint fails fast, a missing one is said now (its metrics will be null)
    needed: set[str] = {m.embedder for m in selected if m.embedder is not None}
    embedders = load_embedders(config, needed, torch.device("cpu"))  # on the device after generating
    for reason in embedders.unavailable.values():
        log.warning("warning: %s", reason)

    # 2. generation (or the WAVs already there, with their manifest)
    generation = generate(config, clips, progress, claimed=record_run) if config.generate else {}
    manifest = generation["manifest"] if config.generate else read_manifest(out_dir)
    notes = manifest_notes(config, manifest)
    notes += wav_notes(out_dir, clips, generated_rate(out_dir, clips, manifest))
    if not config.generate:
        record_run()
    decoded = set(generation.get("decoded", ()))
    check_samples(config, [c.id for c in clips if c.id not in decoded], progress)
    failures = standing_failures(out_dir, clips)
    failures += missing_wav_failures(out_dir, clips, failures, config.generate)
    failures += unreadable_wav_failures(out_dir, clips, failures)
    missing_wavs = sum(not wav_path(out_dir, c.id).exists() for c in clips)

    # 3. embeddings (only the passes whose metrics can be computed)
    embedders.to(resolve_device(config.device))
    usable = embedders.usable
    sets: dict[str, Any] = {}
    counts: dict[str, Any] = {}
    reference = None
    if usable & {*PANNS_VGGISH, "passt"}:
        reference = reference_audio(config, in_shard_order, clips, spec.sample_rate)
    if reference is not None and usable & set(PANNS_VGGISH):
        cnn14, vggish = embedders.models["cnn14"], embedders.models["vggish"]
        panns = reference_set(config, reference, clips, cnn14, vggish, failures, progress)
        generated = generated_embeddings(out_dir, clips, cnn14, vggish, config.metric_duration, failures, progress,
                                         config.audio_protocol)
        sets.update({name: (panns, generated) for name in PANNS_VGGISH})
    sets.update(benchmark_sets(config, embedders, reference, clips, failures, counts, progress))

    # 4. scores
    scores = score(config, clips, sets, failures, progress, selected, embedders.unavailable)
    failures = unique_failures(failures)
    paired = sum(wav_path(out_dir, c.id).exists() for c in clips) - sum(f["stage"] == "read_wav" for f in failures)

    # 5. report
    results = Results(
        comparable=embedders.comparable,
        values=scores.values,
        null_reasons=scores.reasons,
        counts={"clips": len(clips), "paired": paired, "paired_fraction": paired / len(clips),
                "min_paired": config.min_paired, "reference": len(reference.ids) if reference else 0,
                **counts, **scores.counts,
                "failures": len(failures), "failed_clips": len({f["id"] for f in failures}),
                "missing_wavs": missing_wavs},
        failures=failures,
        generation={"generated_in_this_run": config.generate, "wavs_written": generation.get("written", 0),
                    "manifest_found": manifest is not None, "notes": notes,
                    "speed": generation.get("speed")},
        run=str(config.run),
        run_name=config.run_name,
        shards=str(config.shards),
        split=config.split,
        clips=[c.id for c in clips],
        protocol={**embedder_protocol(config, embedders),
                  **generation_protocol(config, clips, manifest), "window_seconds": spec.window_seconds,
                  "clip_count": len(clips), "max_clips": config.max_clips, **clip_selection(config, clips),
                  "reference": reference.source if reference else None,
                  **metric_protocol(selected)},
        software=software_versions(),
        config=config.to_dict(),
        per_clip=scores.per_clip,
    )
    return write_outputs(out_dir, results, config, clips, progress)
