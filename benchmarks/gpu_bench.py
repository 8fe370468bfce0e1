"""Speed of the three stages with real-size random-init models: one JSON and one Markdown summary.

    python -m benchmarks.gpu_bench                               # paper preset on the GPU (via benchmarks/gpu.sh)
    python -m benchmarks.gpu_bench --preset tiny --device cpu    # the same code on the CPU in ~2 minutes

Sections (each guarded: a failure is recorded in the JSON beside what the section had measured, and the next section
still runs; each has its share of the budget left when it starts; the JSON is rewritten at each log line):
- device: name, versions, the datasheet dense bf16 peak (table below) and a measured bf16 matmul rate.
- stage_one: clips/s end to end (`preprocess.pipeline.run`: decode workers, CLIP, Grounding DINO, SAM, VAE, shard
  write) on synthetic demo clips (paper: 10.24 s each, the 41 frames at 4 fps of a VGGSound clip), next to the
  encoders alone on pre-decoded clips; per model (CLIP, Grounding DINO, SAM, VAE) time, FLOPs
  (torch.utils.flop_counter: matmuls, convolutions and attention only; Grounding DINO's deformable sampling is not
  counted) and peak GPU memory; the grounding step with SAM on every detection vs SAM floors that skip 50% and
  80% of the noun-frames; the grounding step at Grounding DINO input short sides 480, 600 and 800; the encoders
  under a 24 GiB memory cap (CUDA only). The cap and the changes come before the SAM floors and input sizes.
- training: samples/s of the stage-two step (the trainer's `train.diffusion.training_loss`: forward, min-SNR loss;
  then backward, clip, AdamW and the trainer's EMA update `train.trainer.ema_update`; bf16 autocast as the paper
  preset's accelerate run) fed from shards (`train.data.make_loader`) vs one batch held in memory, and model FLOPs
  utilisation MFU = FLOPs per step (forward + backward, counted) x steps/s / peak; the paper's global batch 32 as
  4 accumulated micro-batches of 8 (`--global-batch 32` on one GPU) next to 32 in one micro-batch; the top 10
  kernels (CPU: ops) of one step of 32 in one micro-batch by self time under torch.profiler.
- generation: seconds to generate one 10.24 s clip (`train.sample` with classifier-free guidance, then the AudioLDM
  VAE decoder and HiFi-GAN of `eval.generate.Decoder`) at batch 1 and 16, DDPM-300 (the paper protocol) and
  DPM-Solver++-25, sampled as evaluation samples (on CUDA: bf16 with the matmul weights cast once, CUDA graphs).
  A run that would not fit the budget is timed over a few sampler steps and extrapolated (marked so). Then
  evaluation's own choice of the sampling batch (`eval.generate.measure_sampling_batch`) and the 300-step cost
  per clip at that batch.
- changes: inside each section, before/after measurements of one change at a time (`compare`): Grounding DINO's
  deformable attention as one fused Triton kernel (with the largest change of a detector score), SAM's relative
  positions folded into query and key (with peak memory), batched grounding, float16, tensors from the decoding
  workers and the background shard writer (stage one); bf16, fused attention, fused AdamW, channels_last and
  torch.compile in its default and max-autotune modes (training, at the global batch in one micro-batch); bf16,
  weights cast once, CUDA graphs (batch 1 and 16), channels_last (batch 1 and 16), torch.compile and its
  reduce-overhead mode (generation, on DPM-Solver++-25); torch.compile of Grounding DINO and SAM's image encoder
  on static shapes (stage one). torch.compile runs only with --compile; --changes NAME... runs only the
  comparisons named (the rest are recorded as skipped), e.g. the torch.compile rows of a second run.
- targets: the issues' targets (TARGETS), read off the measurements above.

Models are random-weight builds of the published architectures (`FeatureConfig.random_size="paper"`,
`preprocess.model_configs`; CLIP ViT-L/14 through open_clip; the paper UNet of `train.config`), so speed, FLOPs
and memory are the real ones while the outputs mean nothing. The tagger is textblob's offline one (nltk's data is
a download), and the Grounding DINO prompt comes from the shipped small vocab (words split into more pieces).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s; the first name found in
# torch.cuda.get_device_name() wins, so the specific names come before the general ones.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.5), ("GH200", 989.4), ("H200", 989.4), ("H100", 989.4), ("H800", 989.4),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1), ("L40", 181.0), ("L4", 121.0),
    ("RTX 4090", 165.2), ("A10", 125.0),
)
DEFAULT_OUT = Path(__file__).parent / "gpu_results"
SECTION_SHARES = {"stage_one": 0.40, "training": 0.25, "generation": 0.35}  # of the budget left after `device`
SAMPLERS = (("ddpm", 300), ("dpmsolver++", 25))  # the paper protocol (VTA-LDM's ancestral DDPM) and the fast one
GENERATION_BATCHES = (1, 16)
EVERY_CHANGE = {"on": False}  # --every-change: comparisons ignore the budget (the CPU test, whatever the load)
ONLY_CHANGES: dict[str, set[str] | None] = {"names": None}  # --changes: run only these comparisons (None: all)
COMPARED: set[str] = set()  # every comparison name met in this run (a --changes name never met is a typo)


# ----------------------------------------------------------------------------------- helpers
def peak_bf16_tflops(device_name: str) -> float | None:
    """Datasheet dense bf16 peak of a GPU by name (None when the name is not in the table, e.g. the CPU)."""
    for name, peak in PEAK_BF16_TFLOPS:
        if name.lower() in device_name.lower():
            return peak
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of one call, the device's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def warm_seconds(job: Callable[[], Any], device: torch.device, repeats: int = 2) -> tuple[float, Any]:
    """Median seconds of `repeats` timed calls after a warm-up (cuDNN autotuning of new shapes), and a result."""
    result = job()
    return float(np.median([timed(job, device)[0] for _ in range(repeats)])), result


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of one call as torch's FlopCounterMode counts them (matmul, conv, attention; forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


@contextlib.contextmanager
def peak_memory(device: torch.device, into: dict[str, Any], key: str = "peak_memory_gib") -> Iterator[None]:
    """Peak allocated GPU memory inside the block, in GiB (None on the CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield
    finally:
        into[key] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


@contextlib.contextmanager
def without_sam(grounder: Any) -> Iterator[None]:
    """The grounder with SAM detached inside the block (Grounding DINO's scores alone), put back after."""
    sam = grounder.sam
    grounder.sam = None
    try:
        yield
    finally:
        grounder.sam = sam


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA (the paper preset's mixed precision); nothing on the CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def guarded(name: str, results: dict[str, Any], log: Callable[[str], None],
            fn: Callable[[dict[str, Any]], dict[str, Any] | None]) -> None:
    """Run one section into results[name], the dict `fn` is given to fill ("status": "running" meanwhile, so that a
    save while it runs, or a run killed by its time limit, keeps what it has measured); on any exception record it
    (type, message, traceback tail) beside the numbers it had, and carry on."""
    log(f"== {name}")
    start = time.perf_counter()
    section: dict[str, Any] = {"status": "running"}
    results[name] = section
    try:
        section.update(fn(section) or {})
        section["status"] = "ok"
    except Exception as error:  # noqa: BLE001 - one broken section must not lose the others' numbers
        tail = traceback.format_exc().strip().splitlines()[-12:]
        section.update({"status": "error", "error": f"{type(error).__name__}: {error}"[:800], "traceback": tail})
        log("\n".join(tail))
    section["wall_seconds"] = round(time.perf_counter() - start, 2)
    log(json.dumps(section, indent=1, default=str)[:3000])


def compare(out: dict[str, Any], name: str, deadline: Deadline, needs_s: float, log: Callable[[str], None],
            fn: Callable[[], dict[str, Any]]) -> None:
    """One measured change (before -> after) inside a section, recorded as out["changes"][name].

    fn returns {"unit", "before": (label, value), "after": (label, value), ...more numbers}; "speedup" is added
    (after / before for rates, before / after for unit "s"). Skipped, and said so, when the section has less than
    `needs_s` seconds left; an error is recorded and the section goes on."""
    table = out.setdefault("changes", {})
    COMPARED.add(name)
    only = ONLY_CHANGES["names"]
    if only is not None and name not in only:
        table[name] = {"status": "skipped", "reason": "not among --changes"}
        return
    if deadline.left() < needs_s and not EVERY_CHANGE["on"]:
        table[name] = {"status": "skipped", "reason": f"budget: {deadline.left():.0f} s left, needs ~{needs_s:.0f} s"}
    else:
        try:
            entry = {"status": "ok", **fn()}
            if "skipped" in entry:
                entry = {"status": "skipped", "reason": entry["skipped"]}
            else:
                (_, before), (_, after) = entry["before"], entry["after"]
                entry["speedup"] = None
                if before and after:
                    faster = before / after if entry["unit"] == "s" else after / before  # seconds, or a rate
                    entry["speedup"] = round(faster, 3)
            table[name] = entry
        except Exception as error:  # noqa: BLE001 - one broken comparison must not lose the section
            table[name] = {"status": "error", "error": f"{type(error).__name__}: {error}"[:500],
                           "traceback": traceback.format_exc().strip().splitlines()[-6:]}
    log(f"{name}: {json.dumps(table[name], default=str)[:600]} ({deadline.left():.0f} s left)")


def rate(flops: float, seconds: float) -> float | None:
    return round(flops / seconds / 1e12, 4) if seconds > 0 else None


def fmt(value: Any) -> str:
    """Numbers to 3 significant digits for the Markdown tables; None -> n/a."""
    if value is None:
        return "n/a"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------------- device
def bench_device(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"name": props.name, "capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count,
                 "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda,
                 "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "peak_bf16_tflops_datasheet": peak_bf16_tflops(props.name)}
        n, dtype, repeats = 8192, torch.bfloat16, 10
    else:
        info |= {"name": f"CPU ({platform.processor() or platform.machine()})", "peak_bf16_tflops_datasheet": None}
        n, dtype, repeats = 1024, torch.float32, 5
    # measured matmul ceiling (METHOD.md: use a measured rate, on random data, after warm-up)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    seconds, _ = timed(lambda: [a @ b for _ in range(repeats)], device)
    info["matmul"] = {"n": n, "dtype": str(dtype).removeprefix("torch."), "tflops": rate(2 * n**3 * repeats, seconds)}
    return info


def peak_for_mfu(device_info: dict[str, Any]) -> tuple[float | None, float | None]:
    """(datasheet peak, measured matmul rate) in TFLOP/s."""
    return device_info.get("peak_bf16_tflops_datasheet"), device_info.get("matmul", {}).get("tflops")


# ----------------------------------------------------------------------------------- stage one
TINY_CLIP_SECONDS = 6.0  # the tiny preset's synthetic clips (the paper preset's fill its 10.24 s window)
SAM_SKIP_FRACTIONS = (0.5, 0.8)  # shares of the noun-frames below the SAM floor, each timed against floor 0
GROUNDING_SHORT_SIDES = (480, 600, 800)  # Grounding DINO input short sides on the paper preset's scale
MEMORY_CAP_GIB = 24.0  # `FeatureConfig.max_memory_gib` of the memory-cap run (a 24 GB card's setting)
STAND_IN_TOLERANCE = 0.05  # the detector's own scores are used when every skip fraction is reachable this closely


def render_fixed_length_clips(out_dir: Path, count: int, seconds: float, size: tuple[int, int], fps: int) -> list[float]:
    """The demo set's first `count` training clips (`preprocess.demo.make_demo_set`), each `seconds` long (to one
    frame at `fps`) instead of the demo's 0.75-1.25 x its `seconds`; returns their lengths in seconds.

    make_demo_set draws each clip's length as round(seconds x u_i x fps) frames with its own u_i, so clip i is
    written by a call whose `seconds` is scaled until `preprocess.demo.plan_clip` gives clip i the wanted frame
    count; a call keeps the clips already written, and the last one writes the CSV of all `count` clips (the
    labels do not depend on the length)."""
    from preprocess.demo import make_demo_set, plan_clip

    frames = max(1, round(seconds * fps))
    lengths = []
    for index in range(count):
        asked = seconds
        for _ in range(8):  # the planned frame count is proportional to `asked` up to rounding
            planned = plan_clip(index, "train", 0, asked, size[0], fps).frames
            if planned == frames:
                break
            asked *= frames / planned
        make_demo_set(out_dir, n_train=index + 1, n_test=0, seconds=asked, size=size, fps=fps)
        lengths.append(round(plan_clip(index, "train", 0, asked, size[0], fps).seconds, 3))
    return lengths


def floors_for_skip_fractions(scores: np.ndarray, fractions: tuple[float, ...] | list[float]) -> list[tuple[float, float]]:
    """For each wanted fraction f of `scores` (detector scores d_tk, any shape) to fall below the SAM floor: the
    floor and the fraction it actually leaves below, as (floor, fraction).

    A score is left to SAM when it reaches the floor as computed or as stored (float16: `preprocess.encoders.
    sam_refined`), so each score's key is max(d, float16(d)); with the keys sorted, k = round(f n) of them fall
    below a floor midway between the k-th and (k+1)-th (0 for k = 0; just above the largest key, at most 1, for
    k = n). The floor is rounded to float32, as the comparison with float32 scores rounds it. Ties (scores that
    round to the same float16, e.g. a random-weight detector's scores at 1.0) can make the achieved fraction
    differ from f: it is returned so that the caller can tell."""
    from shards import FEATURE_DTYPE

    values = np.asarray(scores, dtype=np.float32).ravel()
    if values.size == 0:
        raise ValueError("no detector scores to choose a floor from")
    keys = np.sort(np.maximum(values, values.astype(FEATURE_DTYPE).astype(np.float32)).astype(np.float64))
    out = []
    for fraction in fractions:
        k = min(len(keys), max(0, round(fraction * len(keys))))
        if k == 0:
            floor = 0.0
        elif k == len(keys):
            floor = min(1.0, float(np.nextafter(np.float32(keys[-1]), np.float32(2.0))))
        else:
            floor = (keys[k - 1] + keys[k]) / 2
        floor = float(np.float32(floor))
        out.append((floor, float(np.mean(keys < floor))))
    return out


def grounding_sizes(short_side: int, long_side: int, shorts: tuple[int, ...] = GROUNDING_SHORT_SIDES,
                    reference: int = 800) -> list[tuple[int, int]]:
    """(short, long) Grounding DINO input sides at each of `shorts`, given on the paper preset's scale (short side
    `reference` = 800, long side 1333), scaled to a config's (short_side, long_side): (round(short_side s /
    reference), round(long_side s / reference)). Paper: (480, 800), (600, 1000), (800, 1333)."""
    return [(round(short_side * s / reference), round(long_side * s / reference)) for s in shorts]


def stage_one_knobs(out: dict[str, Any], cfg: Any, encoders: Any, batch: list[dict[str, Any]], nouns: list[list[str]],
                    device: torch.device, deadline: Deadline, log: Callable[[str], None]) -> None:
    """Two knobs of stage one, each on the same few pre-decoded clips and each through `compare` (a failure or a
    spent budget is recorded and the next one runs):

    - out["sam_floor"]: the grounding step (`Grounder.detections`) with SAM on every detection (floor 0) vs floors
      chosen from these frames' detector scores (`floors_for_skip_fractions`) so that SAM_SKIP_FRACTIONS of the
      noun-frames fall below them: floor, achieved fraction, s/clip, speed-up. A random-weight detector's scores
      all round to ~1.0, which no floor splits; then (said so in out["sam_floor_scores"]) the detector's scores
      are replaced, after it ran, by seeded uniform draws, so that SAM's share of the work, which follows the
      scores alone, is measured at the stated fractions. The end-to-end numbers keep the preset's floor.
    - out["grounding_sizes"]: clips/s of the grounding step at each input size of `grounding_sizes`, vs the
      preset's own size."""
    from preprocess.encoders import sam_refined

    grounder = encoders.grounder
    frames = [torch.as_tensor(item["frames"]) for item in batch]  # (T, H, W, 3) uint8 each
    clips = len(frames)
    per_model = out.get("per_model", {})
    per_clip = per_model.get("grounding_dino+sam", per_model.get("grounding_dino", {})).get("seconds_per_clip", 1.0)
    run_s = 1.3 * per_clip * clips  # one grounding run on these clips, with a margin

    def seconds(job: Callable[[], Any], repeats: int = 2) -> tuple[float, Any]:
        return warm_seconds(job, device, repeats)

    # ---- SAM floor
    out["preset_sam_floor"] = cfg.sam_floor
    stand_in: dict[str, Any] = {"on": False}
    original_detect = grounder._detect

    def detect(images: list[torch.Tensor], prompts: list[Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        scores, boxes = original_detect(images, prompts)
        if not stand_in["on"]:
            return scores, boxes
        # scores: (K,) per image; the same draws in every run (the generator restarts with each `detections`)
        return [torch.rand(len(s), generator=stand_in["generator"]).to(s) for s in scores], boxes

    def detections(floor: float) -> list[Any]:
        stand_in["generator"] = torch.Generator().manual_seed(cfg.seed)
        previous, grounder.sam_floor = grounder.sam_floor, floor
        try:
            return grounder.detections(frames, nouns)
        finally:
            grounder.sam_floor = previous

    def detector_scores(found: list[Any]) -> torch.Tensor:
        return torch.cat([d.detector.flatten() for d in found])  # (sum T_i K_i,)

    def skipped(found: list[Any], floor: float) -> tuple[float, float]:
        """(share of noun-frames below the floor, share of frames that SAM does not see at all)."""
        left = [~sam_refined(d.detector, floor) for d in found]  # (T, K) bool per clip
        noun_frames = torch.cat([x.flatten() for x in left]).float()
        whole = torch.cat([x.all(-1) for x in left if x.shape[-1]] or [torch.zeros(0, dtype=torch.bool)]).float()
        return (round(noun_frames.mean().item(), 4) if len(noun_frames) else 0.0,
                round(whole.mean().item(), 4) if len(whole) else 0.0)

    plan: dict[str, Any] = {}

    def baseline() -> dict[str, Any]:
        if "seconds" not in plan:
            found = detections(0.0)  # also the warm-up; the detector's scores do not depend on the floor
            real = detector_scores(found)
            chosen = floors_for_skip_fractions(real.numpy(), SAM_SKIP_FRACTIONS)
            at_one = float((real.to(torch.float16) == 1.0).float().mean())
            out["preset_floor_skip_fraction"] = skipped(found, cfg.sam_floor)[0]
            if any(abs(got - want) > STAND_IN_TOLERANCE for (_, got), want in zip(chosen, SAM_SKIP_FRACTIONS)):
                stand_in["on"] = True
                out["sam_floor_scores"] = (f"seeded uniform stand-ins for the detector's scores (after it ran): its own "
                                           f"scores do not split at the stated fractions ({at_one:.0%} are 1.0 "
                                           f"once stored as float16; random weights)")
                chosen = floors_for_skip_fractions(detector_scores(detections(0.0)).numpy(), SAM_SKIP_FRACTIONS)
            else:
                out["sam_floor_scores"] = "the detector's own scores"
            plan["floors"] = dict(zip(SAM_SKIP_FRACTIONS, chosen))
            plan["seconds"] = seconds(lambda: detections(0.0))[0] / clips
        return plan

    def floor_entry(fraction: float) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            if grounder.sam is None:
                return {"skipped": "the config has no SAM (use_sam=False)"}
            before = baseline()["seconds"]
            floor, planned = plan["floors"][fraction]
            after, found = seconds(lambda: detections(floor))
            noun_frames, frames_unseen = skipped(found, floor)
            return {"unit": "s", "clips": clips, "floor": floor, "target_skip_fraction": fraction,
                    "planned_skip_fraction": round(planned, 4), "skip_fraction": noun_frames,
                    "frames_sam_skips": frames_unseen, "seconds_per_clip": round(after / clips, 5),
                    "before": ("floor 0: SAM on every detection", round(before, 5)),
                    "after": (f"floor {floor:.4g}", round(after / clips, 5))}
        return run

    entries: dict[str, Any] = {}
    try:
        grounder._detect = detect  # an instance attribute: the class's method is back once it is deleted
        for i, fraction in enumerate(SAM_SKIP_FRACTIONS):
            # the first entry also pays for the score runs (the detector's, then the stand-ins') and the floor-0 timing
            compare(entries, f"skip_{fraction}", deadline, run_s * (3 if i else 8), log, floor_entry(fraction))
    finally:
        del grounder._detect
    out["sam_floor"] = [{"target_skip_fraction": f, **entries["changes"][f"skip_{f}"]} for f in SAM_SKIP_FRACTIONS]

    # ---- Grounding DINO input size
    preset_size = (cfg.grounding_short_side, cfg.grounding_long_side)
    sizes = grounding_sizes(*preset_size)
    rates: dict[tuple[int, int], float] = {}

    def clips_per_second(size: tuple[int, int]) -> float:
        if size not in rates:
            previous = grounder.image_size
            grounder.image_size = {"shortest_edge": size[0], "longest_edge": size[1]}
            try:
                rates[size] = round(clips / seconds(lambda: grounder.detections(frames, nouns), 1)[0], 4)
            finally:
                grounder.image_size = previous
        return rates[size]

    def size_entry(size: tuple[int, int]) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            before, after = clips_per_second(preset_size), clips_per_second(size)
            return {"unit": "clips/s", "clips": clips, "short_side": size[0], "long_side": size[1],
                    "clips_per_second": after, "note": f"Grounding DINO (+ SAM at floor {cfg.sam_floor}), same frames",
                    "before": (f"{preset_size[0]}x{preset_size[1]} (preset)", before),
                    "after": (f"{size[0]}x{size[1]}", after)}
        return run

    entries = {}
    for size in sizes:
        compare(entries, f"{size[0]}x{size[1]}", deadline, run_s * (2 if rates else 4), log, size_entry(size))
    out["grounding_sizes"] = [{"short_side": s, "long_side": lg, **entries["changes"][f"{s}x{lg}"]} for s, lg in sizes]


def stage_one_memory_cap(out: dict[str, Any], cfg: Any, encoders: Any, batch: list[dict[str, Any]],
                         nouns: list[list[str]], device: torch.device, deadline: Deadline, log: Callable[[str], None]) -> None:
    """out["memory_cap"]: on CUDA, the encoders under `max_memory_gib` = MEMORY_CAP_GIB, set up as
    `preprocess.pipeline.Encoders` does (`cap_cuda_memory`, then each model's first frame batch from the free memory;
    `AdaptiveBatch` halves a pass that runs out of memory): completed, clips/s, peak memory; through `compare`."""
    from preprocess.encoders import OutOfMemory, cap_cuda_memory

    grounder = encoders.grounder
    clips = len(batch)
    out["memory_cap_gib"] = MEMORY_CAP_GIB
    models = (encoders.clip_encoder, grounder)

    def capped() -> dict[str, Any]:
        if device.type != "cuda":
            return {"skipped": "the memory cap is CUDA-only (torch.cuda.set_per_process_memory_fraction; no CUDA)"}
        encode = functools.partial(encoders.encode, batch, nouns)
        before, _ = warm_seconds(encode, device, 1)  # uncapped, the same clips
        sizes_before = [m.batch for m in models]
        entry: dict[str, Any] = {"completed": False}
        torch.cuda.empty_cache()
        try:
            with peak_memory(device, entry):
                cap_cuda_memory(MEMORY_CAP_GIB, device)
                for model in models:  # as `Encoders` sets up a run with cfg.max_memory_gib
                    model.batch = cfg.frame_batch
                    model.batches.fit_free_memory(device, model.gib_per_frame, MEMORY_CAP_GIB)
                entry["frame_batch_start"] = {"clip": models[0].batch, "grounding": models[1].batch}
                try:
                    after, _ = warm_seconds(encode, device, 1)  # the warm-up is the run that halves on out-of-memory
                    entry["completed"] = True
                except (OutOfMemory, torch.OutOfMemoryError) as error:  # the latter: a model without halving
                    after, entry["error"] = 0.0, str(error)[:300]
                entry["frame_batch_end"] = {"clip": models[0].batch, "grounding": models[1].batch}
            entry["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 3)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, torch.cuda.current_device() if device.index is None else device.index)
            for model, size in zip(models, sizes_before):
                model.batch = size
            torch.cuda.empty_cache()
        rate_after = round(clips / after, 4) if after else None
        return {"unit": "clips/s", "clips": clips, **entry, "clips_per_second": rate_after,
                "before": ("no cap", round(clips / before, 4)), "after": (f"max_memory_gib={MEMORY_CAP_GIB:g}", rate_after)}

    encode_s = clips / max(out.get("encoders_alone", {}).get("clips_per_second", 1.0), 1e-3)
    entries: dict[str, Any] = {}
    compare(entries, "memory_cap", deadline, 4 * encode_s * 1.5, log, capped)
    out["memory_cap"] = entries["changes"]["memory_cap"]


def bench_stage_one(out: dict[str, Any], preset: str, device: torch.device, root: Path, clips_wanted: int,
                    deadline: Deadline, log: Callable[[str], None], compile_runs: bool = False) -> dict[str, Any]:
    from preprocess import manifest
    from preprocess.config import PRESETS
    from preprocess.nouns import NounCache
    from preprocess.pipeline import DecodeDataset, Encoders, run

    paper = preset == "paper"
    workers = min(PRESETS[preset].num_workers, max(1, (os.cpu_count() or 2) // 2)) if paper else 1
    cfg = PRESETS[preset].replace(random_init=True, random_size=preset, tagger="pattern", device=str(device),
                                  num_workers=workers, shard_max_samples=1000)
    out.update({"preset": preset, "random_size": cfg.random_size, "clip_model": cfg.clip_model, "fps": cfg.fps,
                "frames_per_clip": cfg.num_frames, "grounding_input": [cfg.grounding_short_side, cfg.grounding_long_side],
                "use_sam": cfg.use_sam, "batch_clips": cfg.batch_clips, "frame_batch": cfg.frame_batch,
                "decode_workers": workers, "half": cfg.half and device.type == "cuda"})
    size, fps = ((640, 360), 25) if paper else ((96, 96), 12)
    # paper: every clip fills the 10.24 s window (41 frames at 4 fps, as a VGGSound clip); tiny: shorter clips
    clip_seconds = cfg.window_seconds if paper else TINY_CLIP_SECONDS
    seconds, lengths = timed(lambda: render_fixed_length_clips(root / "demo", clips_wanted, clip_seconds, size, fps), device)
    clips = manifest.from_vggsound_csv(root / "demo" / "vggsound.csv", root / "demo" / "videos")
    out["synthetic_videos"] = {"count": len(clips), "size": list(size), "fps": fps, "seconds_each": "H.264 + AAC",
                               "clip_seconds": [min(lengths), max(lengths)], "render_seconds": round(seconds, 1)}
    log(f"stage one: {len(clips)} synthetic clips rendered in {seconds:.1f} s; building the models")

    memory: dict[str, Any] = {}
    with peak_memory(device, memory):
        build_seconds, encoders = timed(lambda: Encoders(cfg, None, device), device)
    out["build_seconds"] = round(build_seconds, 1)
    out["parameters_m"] = {name: round(sum(p.numel() for p in module.parameters()) / 1e6, 1)
                           for name, module in (("clip", encoders.clip_encoder), ("grounding_dino", encoders.grounder.detector),
                                                ("sam", encoders.grounder.sam), ("vae", encoders.vae)) if module is not None}
    out["model_memory_gib"] = memory["peak_memory_gib"]

    # first-call costs (CUDA context, cuDNN autotuning, lazy imports) stay out of the timed run
    run(cfg, clips[:4], root / "warmup", None, progress=False, encoders=encoders)
    log(f"stage one: warmed up ({deadline.left():.0f} s left)")

    with peak_memory(device, out, "end_to_end_peak_memory_gib"):
        summary = run(cfg, clips, root / "shards", None, progress=False, encoders=encoders)
    out["end_to_end"] = {"clips": summary.written, "failed": dict(summary.failed), "seconds": round(summary.wall_seconds, 2),
                         "clips_per_second": round(summary.written / summary.wall_seconds, 3),
                         # of those seconds: until the first batch reached the encoders, after the last left them
                         "startup_seconds": round(summary.startup_seconds, 2),
                         "finishing_seconds": round(summary.drain_seconds, 2),
                         # written / the seconds in between, as clips_per_second is written / all seconds
                         "steady_clips_per_second": round(summary.written / max(
                             summary.wall_seconds - summary.startup_seconds - summary.drain_seconds, 1e-9), 3)}

    dataset = DecodeDataset(clips, cfg)
    decode_seconds, decoded = timed(lambda: [dataset[i] for i in range(len(dataset))], device)
    decoded = [d for d in decoded if "error" not in d]
    out["decode_one_process_clips_per_second"] = round(len(dataset) / decode_seconds, 3)
    out["synthetic_videos"]["frames_decoded_per_clip"] = sorted({len(d["frames"]) for d in decoded})
    nouns_of = NounCache(cfg.tagger, cfg.max_nouns)
    batches = [decoded[i : i + cfg.batch_clips] for i in range(0, len(decoded), cfg.batch_clips)]
    nouns = [[nouns_of(d["clip"].caption) for d in batch] for batch in batches]
    with peak_memory(device, out, "encoders_peak_memory_gib"):
        encode_seconds, _ = timed(lambda: [encoders.encode(b, n) for b, n in zip(batches, nouns)], device)
    out["encoders_alone"] = {"clips": len(decoded), "seconds": round(encode_seconds, 2),
                             "clips_per_second": round(len(decoded) / encode_seconds, 3)}
    out["ratio_end_to_end_over_encoders"] = round(out["end_to_end"]["clips_per_second"] / out["encoders_alone"]["clips_per_second"], 3)
    # the same between the first and the last batch: what the ratio approaches over a long run (VGGSound)
    out["ratio_steady_over_encoders"] = round(out["end_to_end"]["steady_clips_per_second"] / out["encoders_alone"]["clips_per_second"], 3)
    log(f"stage one: end to end {out['end_to_end']['clips_per_second']} clips/s, encoders alone "
        f"{out['encoders_alone']['clips_per_second']} clips/s ({deadline.left():.0f} s left)")
    few = 4 if deadline.left() > 0 else 2  # fewer clips once the section's budget is spent
    out["per_model"] = per_model_costs(encoders, batches[0][:few], nouns[0][:few], device, repeats=2)
    # what no GPU run has measured yet comes first (the cap is a target of its own); the knobs, measured before, last
    stage_one_memory_cap(out, cfg, encoders, batches[0][:2], nouns[0][:2], device, deadline, log)
    stage_one_changes(out, cfg, encoders, clips, batches[0][:few], nouns[0][:few], root, device, deadline, log,
                      compile_runs)
    guarded("grounding_profile", out, log, lambda _: grounding_profile(encoders, batches[0][:2], nouns[0][:2], device))
    stage_one_knobs(out, cfg, encoders, batches[0][:2], nouns[0][:2], device, deadline, log)
    return out


def stage_one_changes(out: dict[str, Any], cfg: Any, encoders: Any, clips: list[Any], batch: list[dict[str, Any]],
                      nouns: list[list[str]], root: Path, device: torch.device, deadline: Deadline,
                      log: Callable[[str], None], compile_runs: bool = False) -> None:
    """Before/after of the stage-one changes: the fused deformable attention kernel, SAM's relative positions
    folded into query and key, batched grounding, half precision, tensors from the decoding workers, the
    background shard writer; with `compile_runs`, torch.compile of Grounding DINO and SAM's image encoder."""
    from benchmarks.worker_transfer import clips_per_second as transfer_rate
    from preprocess.pipeline import run

    frames = [torch.as_tensor(item["frames"]) for item in batch]
    count = int(sum(len(f) for f in frames))
    grounder = encoders.grounder

    def frames_per_second(job: Callable[[], Any], frames_done: int = count) -> float:
        job()  # warm-up (cuDNN autotuning of this batch shape)
        return round(frames_done / float(np.median([timed(job, device)[0] for _ in range(2)])), 3)

    few_frames = [f[:32] for f in frames[:2]]  # 64 frames (paper preset): batch 1 is slow
    few_count = sum(len(f) for f in few_frames)

    def grounding(batch_size: int) -> float:
        size = grounder.batch
        grounder.batch = batch_size
        try:
            with without_sam(grounder):
                return frames_per_second(lambda: grounder.probabilities(few_frames, nouns[:2]), few_count)
        finally:
            grounder.batch = size

    def fused_deformable() -> dict[str, Any]:
        from preprocess import deformable

        if device.type != "cuda" or not deformable.available():
            return {"skipped": "the fused deformable attention kernel needs CUDA and triton"}
        detector = grounder.detector

        def scores() -> torch.Tensor:
            with without_sam(grounder):
                return torch.cat([d.detector.flatten() for d in grounder.detections(few_frames, nouns[:2])])

        # as stage one does at start-up: a kernel that cannot build or disagrees stops here, before any frame
        deformable.check_kernel(device, next(detector.parameters()).dtype, deformable.kernel_layouts(detector.config))
        reference = scores()
        before = grounding(cfg.frame_batch)
        swapped = deformable.use_fused_deformable_attention(detector)
        try:
            after = grounding(cfg.frame_batch)
            difference = (scores() - reference).abs().max().item()
        finally:
            deformable.use_pytorch_deformable_attention(detector)
        return {"unit": "frames/s", "frames": few_count, "layers_swapped": swapped,
                "max_abs_difference_detector_scores": round(difference, 6),
                "note": "Grounding DINO alone; --deformable-attention pytorch vs triton",
                "before": ("PyTorch grid_sample per level", before), "after": ("fused Triton kernel", after)}

    compare(out, "fused_deformable_attention", deadline, 25, log, fused_deformable)

    def folded_rel_pos() -> dict[str, Any]:
        from preprocess.sam_attention import use_folded_rel_pos, use_transformers_rel_pos

        if grounder.sam is None:
            return {"skipped": "this preset runs no SAM"}

        def grounding_with_sam() -> list[Any]:
            return grounder.detections(few_frames, nouns[:2])

        memory: dict[str, Any] = {}
        try:
            use_transformers_rel_pos(grounder.sam)
            reference = grounding_with_sam()
            with peak_memory(device, memory, "peak_memory_gib_before"):
                before = frames_per_second(grounding_with_sam, few_count)
            use_folded_rel_pos(grounder.sam)
            with peak_memory(device, memory, "peak_memory_gib_after"):
                after = frames_per_second(grounding_with_sam, few_count)
            difference = max((a.iou - b.iou).abs().max().item() for a, b in zip(grounding_with_sam(), reference))
        finally:  # back to the preset's way
            (use_folded_rel_pos if cfg.sam_rel_pos == "folded" else use_transformers_rel_pos)(grounder.sam)
        return {"unit": "frames/s", "frames": few_count, **memory, "max_abs_difference_sam_iou": round(difference, 6),
                "note": "Grounding DINO + SAM on the same frames; --sam-rel-pos bias vs folded",
                "before": ("SAM's relative positions as a dense bias", before),
                "after": ("folded into query and key channels", after)}

    compare(out, "sam_folded_rel_pos", deadline, 25, log, folded_rel_pos)
    compare(out, "grounding_dino_batched", deadline, 20, log, lambda: {
        "unit": "frames/s", "frames": few_count,
        "note": "Grounding DINO alone; batch 1 is the published code's way",
        "before": ("one frame per forward", grounding(1)),
        "after": (f"{cfg.frame_batch} frames per forward, prompts of many clips", grounding(cfg.frame_batch))})

    def half_precision() -> dict[str, Any]:
        if device.type != "cuda" or not cfg.half:
            return {"skipped": "float16 inference is CUDA-only (cfg.half)"}
        models = [m for m in (encoders.clip_encoder.model, grounder.detector, grounder.sam) if m is not None]

        def both() -> None:  # on 64 frames (float32 runs at a third of float16's speed)
            encoders.clip_encoder.encode_frames(torch.cat(few_frames))
            grounder.probabilities(few_frames, nouns[:2])

        for model in models:  # the weights only (the wrappers' float32 buffers stay as they are)
            model.to(torch.float32)
        try:
            before = frames_per_second(both, few_count)
        finally:
            for model in models:
                model.to(torch.float16)
        return {"unit": "frames/s", "frames": few_count, "note": "CLIP + Grounding DINO (+ SAM) on the same frames",
                "before": ("float32 (TF32 matmuls)", before), "after": ("float16", frames_per_second(both, few_count))}

    compare(out, "half_precision", deadline, 30, log, half_precision)

    def transfer() -> dict[str, Any]:
        shape, workers, n = (41, 800, 1422, 3), min(4, max(1, (os.cpu_count() or 2) // 4)), 8
        return {"unit": "clips/s", "clip_shape": list(shape), "workers": workers,
                "note": "decoded frames of one paper-preset clip handed from a DataLoader worker to the encoders",
                "before": ("numpy arrays (pickled through a pipe)", round(transfer_rate(n, shape, False, workers), 3)),
                "after": ("tensors (shared memory)", round(transfer_rate(n, shape, True, workers), 3))}

    compare(out, "decode_worker_transfer", deadline, 20, log, transfer)

    def writer() -> dict[str, Any]:
        rates = {}
        for threaded in (False, True):  # both runs here, one after the other, so that neither is the first
            summary = run(cfg, clips, root / f"shards_writer_{threaded}", None, progress=False, encoders=encoders,
                          threaded_writer=threaded)
            rates[threaded] = round(summary.written / summary.wall_seconds, 3)
        return {"unit": "clips/s", "note": "end to end, shard encoding and writing inline vs in a background thread",
                "before": ("writer inline", rates[False]), "after": ("background writer", rates[True])}

    compare(out, "background_shard_writer", deadline, 2.4 * out["end_to_end"]["seconds"], log, writer)

    def compiled_grounding() -> dict[str, Any]:
        if not compile_runs:
            return {"skipped": "torch.compile runs only with --compile (minutes of compilation)"}
        if grounder.static_shapes:
            return {"skipped": "the preset already compiles"}

        def grounding_with_sam() -> list[Any]:
            return grounder.detections(few_frames, nouns[:2])

        before = frames_per_second(grounding_with_sam, few_count)
        grounder.static_shapes = True  # the reference: eager models on the compiled run's padded shapes
        modules = [grounder.detector] + ([grounder.sam.vision_encoder] if grounder.sam is not None else [])
        try:
            padded = frames_per_second(grounding_with_sam, few_count)
            reference = grounding_with_sam()
            start = time.perf_counter()
            grounder.compile_models()
            found = grounding_with_sam()  # compiles this pass's shapes
            compile_seconds = round(time.perf_counter() - start, 1)
            after = frames_per_second(grounding_with_sam, few_count)
        finally:  # back to eager models on unpadded frames for whatever runs next
            grounder.static_shapes = False
            for module in modules:
                module._compiled_call_impl = None  # what nn.Module.compile set
        differences = {key: round(max((getattr(a, key) - getattr(b, key)).abs().max().item()
                                      for a, b in zip(found, reference)), 6) for key in ("detector", "iou")}
        return {"unit": "frames/s", "frames": few_count, "compile_seconds": compile_seconds,
                "eager_static_shapes_frames_per_second": padded,
                "max_abs_difference_vs_eager_static": differences,
                "note": "Grounding DINO + SAM on the same frames; --compile pads each frame to its orientation's "
                        "canvas, each pass's frame count and prompt to a few sizes",
                "before": ("eager, frames at their own size", before),
                "after": ("torch.compile, static shapes", after)}

    compare(out, "torch_compile", deadline, 240 if compile_runs else 0, log, compiled_grounding)


def per_model_costs(encoders: Any, batch: list[dict[str, Any]], nouns: list[list[str]], device: torch.device,
                    repeats: int = 3) -> dict[str, Any]:
    """Time (median of `repeats` after a warm-up), FLOPs and peak memory of each model on a few pre-decoded clips,
    per clip. SAM's share is Grounding DINO + SAM minus Grounding DINO alone (the grounder with SAM detached)."""
    frames = [torch.as_tensor(item["frames"]) for item in batch]
    mels = torch.stack([torch.as_tensor(item["mel"]) for item in batch])
    grounder = encoders.grounder
    sam = grounder.sam

    def grounding_only() -> Any:
        with without_sam(grounder):
            return grounder.probabilities(frames, nouns)

    jobs: dict[str, Callable[[], Any]] = {
        "clip": lambda: encoders.clip_encoder.encode_frames(torch.cat(frames)),
        "grounding_dino": grounding_only,
        "grounding_dino+sam": lambda: grounder.probabilities(frames, nouns),
        "vae_encoder": lambda: encoders.vae.encode(mels),
    }
    if sam is None:
        jobs.pop("grounding_dino+sam")
    clips = len(batch)
    costs: dict[str, Any] = {"clips": clips, "frames": int(sum(len(f) for f in frames))}
    for name, job in jobs.items():
        job()  # warm
        entry: dict[str, Any] = {}
        with peak_memory(device, entry):
            seconds = float(np.median([timed(job, device)[0] for _ in range(repeats)]))
        flops = count_flops(job)
        entry |= {"seconds_per_clip": round(seconds / clips, 5), "tflop_per_clip": round(flops / clips / 1e12, 6),
                  "achieved_tflops": rate(flops, seconds)}
        costs[name] = entry
    if "grounding_dino+sam" in costs:
        both, alone = costs["grounding_dino+sam"], costs["grounding_dino"]
        costs["sam"] = {"seconds_per_clip": round(both["seconds_per_clip"] - alone["seconds_per_clip"], 5),
                        "tflop_per_clip": round(both["tflop_per_clip"] - alone["tflop_per_clip"], 6),
                        "note": "difference of the two grounder runs"}
    return costs


def grounding_profile(encoders: Any, batch: list[dict[str, Any]], nouns: list[list[str]], device: torch.device,
                      repeats: int = 2) -> dict[str, Any]:
    """Where the grounding step's time goes on this device: `Grounder.probabilities` on a few pre-decoded clips with
    the parts of Grounding DINO and SAM (`benchmarks.grounding_cost`'s split: Swin-T, fusion, deformable layers,
    decoder...; SAM's windowed and global blocks...) timed by forward hooks, GPU time between CUDA events on CUDA
    (the fastest of `repeats` calls), then the top kernels (CPU: ops) of one call under torch.profiler. "other" is
    the call's wall-clock minus its parts: the image processors, the post-processing and any time the GPU waited
    for the host."""
    from benchmarks import grounding_cost

    grounder = encoders.grounder
    frames = [torch.as_tensor(item["frames"]) for item in batch]
    count = int(sum(len(f) for f in frames))
    models = {"grounding_dino": (grounder.detector, grounding_cost.DETECTOR_PARTS)}
    details = {"grounding_dino": grounding_cost.DETECTOR_DETAILS}
    if grounder.sam is not None:
        vision = grounder.sam.config.vision_config
        models["sam"] = (grounder.sam, grounding_cost.sam_parts(vision.global_attn_indexes, vision.num_hidden_layers))

    def job() -> Any:
        return grounder.probabilities(frames, nouns)

    job()  # warm-up (cuDNN autotuning of these shapes)
    best: dict[str, Any] | None = None
    for _ in range(repeats):
        seconds: dict[str, dict[str, float]] = {name: {} for name in models}
        with contextlib.ExitStack() as stack:
            for name, (model, parts) in models.items():
                stack.enter_context(grounding_cost.part_timers(model, parts, seconds[name], device,
                                                               details.get(name, {})))
            total, _ = timed(job, device)
        if best is None or total < best["total"]:
            best = {"total": total, "seconds": seconds}
    assert best is not None
    total, seconds = best["total"], best["seconds"]
    parts_sum = sum(seconds[name][part] for name, (_, parts) in models.items() for part in parts)
    rows = [{"model": name, "part": part, "ms_per_frame": round(1000 * value / count, 3),
             "share": round(value / total, 4), "detail": part not in parts}
            for name, (_, parts) in models.items() for part, value in seconds[name].items()]
    kernels, kernels_time = profile_top(job, device, 15)
    return {"clips": len(batch), "frames": count, "nouns_per_clip": [len(n) for n in nouns],
            "timing": "GPU seconds between CUDA events" if device.type == "cuda" else "wall-clock seconds",
            "ms_per_frame": round(1000 * total / count, 3), "parts": rows,
            "other_ms_per_frame": round(1000 * max(0.0, total - parts_sum) / count, 3),
            "top_kernels": kernels, "top_kernels_time": kernels_time}


# ----------------------------------------------------------------------------------- training
def micro_batches(batch: dict[str, Any], parts: int) -> list[dict[str, Any]]:
    """A collated batch cut into `parts` equal micro-batches along the sample axis (tensors and lists alike)."""
    size = len(batch["latent_mean"])
    if size % parts:
        raise ValueError(f"a batch of {size} does not split into {parts} equal micro-batches")
    step = size // parts
    return [{k: v[i : i + step] for k, v in batch.items()} for i in range(0, size, step)]


def repeat_batch(batch: dict[str, Any], size: int) -> dict[str, Any]:
    """The batch's samples repeated (and cut) to `size` samples."""
    times = -(-size // len(batch["latent_mean"]))
    return {k: (torch.cat([v] * times) if isinstance(v, torch.Tensor) else list(v) * times)[:size] for k, v in batch.items()}


def top_ops(events: Any, device: torch.device, count: int = 10) -> list[dict[str, Any]]:
    """The `count` ops (CPU) or kernels (CUDA) with the most self time in a profiled step, from torch.profiler's
    key_averages(): name, calls, self time in ms and share of the step's total self time. The total follows
    torch.profiler's own table: on CUDA the device events (kernels, copies), on the CPU every event's self CPU time."""
    if device.type == "cuda":
        rows = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation]
        self_us = {id(e): e.self_device_time_total for e in rows}
    else:
        rows = list(events)
        self_us = {id(e): e.self_cpu_time_total for e in rows}
    total = sum(self_us.values())
    rows.sort(key=lambda e: self_us[id(e)], reverse=True)
    return [{"name": e.key, "calls": e.count, "self_ms": round(self_us[id(e)] / 1000, 3),
             "share": round(self_us[id(e)] / total, 4) if total else None} for e in rows[:count]]


def profile_top(job: Callable[[], Any], device: torch.device, count: int = 10) -> tuple[list[dict[str, Any]], str]:
    """(`top_ops` of one call of `job` under torch.profiler, what their time is): CUDA kernels by self device time
    on CUDA, ops by self CPU time on the CPU."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        job()
        synchronize(device)
    what = "self device time (CUDA kernels)" if device.type == "cuda" else "self CPU time (ops)"
    return top_ops(profiler.key_averages(), device, count), what


def bench_training(out: dict[str, Any], preset: str, device: torch.device, root: Path, steps: int, deadline: Deadline,
                   device_info: dict[str, Any], log: Callable[[str], None], compile_runs: bool = False) -> dict[str, Any]:
    import copy

    import shards
    from benchmarks.random_shards import write_random_shards
    from common.devices import tune_backends
    from preprocess.config import PRESETS as FEATURE_PRESETS
    from train.config import PRESETS
    from train.data import make_loader
    from train.diffusion import noise_scheduler, training_loss
    from train.model import VTASAM
    from train.speed import speed_up
    from train.trainer import ema_decay, ema_update

    spec = FEATURE_PRESETS[preset].shard_spec()
    folder = root / "train_shards"
    config = PRESETS[preset]
    write_random_shards(folder, FEATURE_PRESETS[preset], {"train": max(4 * config.batch_size, 64)}, num_nouns=4)
    workers = min(config.num_workers, max(1, (os.cpu_count() or 2) // 4)) if device.type == "cuda" else 0
    config = config.replace(shards=str(folder), num_workers=workers, cpu=device.type == "cpu")
    bf16 = config.mixed_precision == "bf16" and device.type == "cuda"
    cuda = device.type == "cuda"
    tune_backends(device)  # as the trainer does
    torch.manual_seed(0)
    model = VTASAM(config, spec).to(device).train()
    ema = copy.deepcopy(model).requires_grad_(False)  # as the trainer's: a plain copy (no channels_last, not compiled)
    speed_up(model, config.channels_last, config.compile)
    updates = [0]  # optimizer steps taken: the EMA's warm-up (`ema_decay`)

    def adamw(fused: bool) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay, fused=fused)

    optimizer = adamw(fused=cuda)  # the trainer's choice
    scheduler = noise_scheduler(config)
    out.update({"preset": preset, "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                "batch_size": config.batch_size, "latent": list(spec.latent_shape), "frames": spec.num_frames,
                "precision": "bf16 autocast" if bf16 else "float32", "loader_workers": workers,
                "pin_memory": cuda, "fused_adamw": cuda, "channels_last": config.channels_last,
                "compile": config.compile,
                "includes": "the trainer's training_loss (forward, min-SNR loss), backward, grad clip, AdamW step, "
                            "EMA update (train.trainer.ema_update)"})

    def loss_of(batch: dict[str, Any], use_bf16: bool = bf16) -> torch.Tensor:
        """The trainer's step loss (`train.diffusion.training_loss`); bf16 autocast as accelerate's (CUDA only)."""
        return training_loss(model, scheduler, batch, config, device=device, precision=torch.bfloat16 if use_bf16 else None)

    def step(batch: dict[str, Any], opt: torch.optim.Optimizer, use_bf16: bool = bf16, accumulation: int = 1) -> None:
        """One optimizer step as `train.trainer.train_step` takes it: `accumulation` micro-batches of the batch, each
        loss divided by their count going backward, then clip, AdamW and the EMA update."""
        opt.zero_grad(set_to_none=True)
        for part in micro_batches(batch, accumulation):
            (loss_of(part, use_bf16) / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        updates[0] += 1
        ema_update(model, ema, ema_decay(config, updates[0]))

    warmed = [False]  # on the CPU only the first timed run warms up (no autotuning; keeps the tiny run short)

    def timed_steps(batches: Iterator[dict[str, Any]], wanted: int, opt: torch.optim.Optimizer | None = None,
                    use_bf16: bool = bf16, batch_size: int = config.batch_size, accumulation: int = 1) -> dict[str, Any]:
        opt = opt or optimizer
        for _ in range(3 if cuda else 0 if warmed[0] else 1):  # warm-up: cuDNN autotuning, allocator, first calls
            step(next(batches), opt, use_bf16, accumulation)
        warmed[0] = True
        synchronize(device)
        start, done = time.perf_counter(), 0
        while done < wanted and (done < 3 or deadline.left() > 0):
            step(next(batches), opt, use_bf16, accumulation)
            done += 1
        synchronize(device)
        seconds = time.perf_counter() - start
        return {"steps": done, "seconds": round(seconds, 3), "step_ms": round(1000 * seconds / done, 2),
                "samples_per_second": round(done * batch_size / seconds, 2)}

    datasheet, measured = peak_for_mfu(device_info)

    def with_mfu(result: dict[str, Any], flops_per_step: float) -> dict[str, Any]:
        achieved = flops_per_step * result["steps"] / result["seconds"] / 1e12
        result["achieved_tflops"] = round(achieved, 2)
        result["mfu_vs_datasheet"] = round(achieved / datasheet, 4) if datasheet else None
        result["mfu_vs_measured_matmul"] = round(achieved / measured, 4) if measured else None
        return result

    stream = iter(make_loader(shards.list_shards(folder), config, pin_memory=cuda))
    fixed = next(stream)
    memory_batches = lambda: iter(lambda: fixed, None)  # noqa: E731 - the same batch forever
    flops = count_flops(lambda: loss_of(fixed).backward())
    optimizer.zero_grad(set_to_none=True)
    with peak_memory(device, out):
        out["from_shards"] = with_mfu(timed_steps(stream, steps), flops)
        log(f"training: from shards {out['from_shards']} ({deadline.left():.0f} s left)")
        out["from_memory"] = with_mfu(timed_steps(memory_batches(), steps), flops)
    out["ratio_shards_over_memory"] = round(out["from_shards"]["samples_per_second"] / out["from_memory"]["samples_per_second"], 3)
    out["tflop_per_step"] = round(flops / 1e12, 6)
    few = max(3, steps // 2)

    # the paper's global batch (8 per GPU x 4 GPUs = 32) on one GPU: 4 accumulated micro-batches of 8, what
    # --global-batch 32 trains there, next to the 32 in one micro-batch; the tiny preset keeps the 1:4 split at its
    # batch (micro-batches of 1). One timed step each on the CPU.
    total = config.global_batch or config.batch_size
    micro = config.batch_size if config.global_batch else 1
    big = repeat_batch(fixed, total)
    runs: dict[str, Any] = {}
    for key, size in (("accumulated", micro), ("one_micro_batch", total)):
        entry: dict[str, Any] = {"micro_batch": size, "accumulation": total // size}
        with peak_memory(device, entry):
            entry |= with_mfu(timed_steps(iter(lambda: big, None), few if cuda else 1, batch_size=total,
                                          accumulation=total // size), flops * total / config.batch_size)
        runs[key] = entry
    out["global_batch"] = {"samples": total, **runs,
                           "ratio_accumulated_over_one": round(runs["accumulated"]["samples_per_second"]
                                                               / runs["one_micro_batch"]["samples_per_second"], 3)}
    log(f"training: global batch {out['global_batch']} ({deadline.left():.0f} s left)")

    # The profile and the comparisons below run at the target's setting: the global batch in one micro-batch
    # (the faster of the two above), every step on the same batch held in memory.
    target_flops = flops * total / config.batch_size
    out["changes_batch"] = total

    def at_target(**options: Any) -> dict[str, Any]:
        return timed_steps(iter(lambda: big, None), few, batch_size=total, **options)

    # one step under torch.profiler: where its time goes
    out["profile"], out["profile_time"] = profile_top(lambda: step(big, optimizer), device)
    out["profile_batch"] = total

    def mfu_pair(before_label: str, before: dict[str, Any], after_label: str, after: dict[str, Any],
                 step_flops: float = target_flops) -> dict[str, Any]:
        before, after = with_mfu(before, step_flops), with_mfu(after, step_flops)
        return {"unit": "samples/s", "before": (before_label, before["samples_per_second"]),
                "after": (after_label, after["samples_per_second"]),
                "mfu_vs_datasheet": [before["mfu_vs_datasheet"], after["mfu_vs_datasheet"]],
                "step_ms": [before["step_ms"], after["step_ms"]]}

    def precision_change() -> dict[str, Any]:
        if not bf16:
            return {"skipped": "bf16 autocast is CUDA-only"}
        return mfu_pair("float32 (TF32 matmuls)", at_target(use_bf16=False), "bf16 autocast", at_target())

    compare(out, "bf16_autocast", deadline, 25, log, precision_change)

    def attention_change() -> dict[str, Any]:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            unfused = at_target()
        return mfu_pair("attention as matmul + softmax (SDPA math backend)", unfused,
                        "fused scaled_dot_product_attention", at_target())

    compare(out, "fused_attention", deadline, 20, log, attention_change)
    def adamw_change() -> dict[str, Any]:
        if not cuda:
            return {"skipped": "the trainer uses fused AdamW on CUDA only"}
        return mfu_pair("AdamW foreach", at_target(opt=adamw(fused=False)), "AdamW fused", at_target())

    compare(out, "fused_adamw", deadline, 20, log, adamw_change)

    layout = {"name": "channels_last" if config.channels_last else "NCHW"}  # the model's, for the labels below

    def channels_last_change() -> dict[str, Any]:
        if config.channels_last:
            return {"skipped": "the preset already trains in channels_last"}
        before = at_target()
        speed_up(model, channels_last=True)  # in place: the comparisons below include it
        layout["name"] = "channels_last"
        optimizer.state.clear()  # moments made again in the new layout (fused AdamW needs the parameters' layout)
        return mfu_pair("contiguous (NCHW)", before, "channels_last (NHWC)", at_target())

    compare(out, "channels_last", deadline, 20, log, channels_last_change)

    def compiled(mode: str | None) -> Callable[[], dict[str, Any]]:
        """torch.compile of the UNet in `mode` (None: default), timed against the row before (eager, then default)."""
        def run() -> dict[str, Any]:
            if not compile_runs:
                return {"skipped": "torch.compile runs only with --compile (minutes of compilation)"}
            if config.compile:
                return {"skipped": "the preset already compiles"}
            before = at_target()
            speed_up(model, compile=True, compile_mode=mode)
            start = time.perf_counter()
            step(big, optimizer)  # compiles forward and backward
            synchronize(device)
            compile_seconds = round(time.perf_counter() - start, 1)
            label = f"eager, {layout['name']}" if mode is None else "torch.compile mode=default (previous row)"
            result = mfu_pair(label, before, f"torch.compile mode={mode or 'default'}", at_target())
            return result | {"compile_seconds": compile_seconds}
        return run

    compare(out, "torch_compile", deadline, 150 if compile_runs else 0, log, compiled(None))  # without --compile: say so
    # max-autotune benchmarks kernel choices (Triton templates for matmuls and convolutions) and uses CUDA graphs:
    # the longest compilation
    compare(out, "torch_compile_max_autotune", deadline, 300 if compile_runs else 0, log, compiled("max-autotune"))
    return out


# ----------------------------------------------------------------------------------- generation
def bench_generation(out: dict[str, Any], preset: str, device: torch.device, deadline: Deadline,
                     log: Callable[[str], None], compile_runs: bool = False) -> dict[str, Any]:
    import copy

    import shards
    import train
    from audio_models.decoder import Decoder
    from common.devices import tune_backends
    from preprocess.config import PRESETS as FEATURE_PRESETS
    from train.config import PRESETS
    from train.model import VTASAM
    from train.speed import lower_precision_weights, sampling_channels_last, speed_up

    features = FEATURE_PRESETS[preset].replace(random_init=True, random_size=preset)
    spec = features.shard_spec()
    config = PRESETS[preset]
    bf16 = config.mixed_precision == "bf16" and device.type == "cuda"
    graphs = device.type == "cuda"
    torch.manual_seed(0)
    model = VTASAM(config, spec).to(device).eval()
    # what evaluation and `vta-sam generate` sample with: matmul weights cast once to bf16, NHWC, CUDA graphs (CUDA)
    fast = lower_precision_weights(copy.deepcopy(model), torch.bfloat16) if bf16 else model
    speed_up(fast, sampling_channels_last(True, device))
    decoder = Decoder(features.audio_models(), None, device, config.vae_scaling_factor)
    tune_backends(device)  # as evaluation does
    out.update({"preset": preset, "guidance": 3.0, "clip_seconds": spec.window_seconds,
                "unet_precision": "bf16 autocast, matmul weights cast once" if bf16 else "float32",
                "cuda_graphs": graphs, "channels_last": fast.channels_last,
                "decoder": "AudioLDM VAE decoder (float32) + HiFi-GAN (float32)", "runs": []})

    def conditions(batch: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(batch)
        return {c.name: torch.randn(batch, *c.shape(spec), generator=g).to(device) for c in shards.CONDITIONS}

    def sample(batch: int, sampler: str, steps: int, use_bf16: bool = bf16, graph: bool = graphs,
               lowered: bool = True) -> torch.Tensor:
        generator = [torch.Generator(device).manual_seed(k) for k in range(batch)]
        net = fast if use_bf16 and lowered else model
        return train.sample(net, conditions(batch), steps=steps, guidance=3.0, scheduler=sampler,  # type: ignore[arg-type]
                            generator=generator, precision=torch.bfloat16 if use_bf16 else None, cuda_graph=graph)

    # one UNet call of a guided step = batch 2 (conditional + unconditional)
    one = conditions(1)
    t = torch.tensor([500, 500], device=device)
    with torch.no_grad(), autocast(device, bf16):
        out["tflop_per_guided_step_per_clip"] = round(count_flops(
            lambda: model(torch.randn(2, *spec.latent_shape, device=device), t, {k: torch.cat([v, v]) for k, v in one.items()})) / 1e12, 6)
    for batch in GENERATION_BATCHES:
        start = time.perf_counter()
        latents = sample(batch, "dpmsolver++", 2)  # warm-up; on CUDA it captures this batch's graph
        synchronize(device)
        warmup = round(time.perf_counter() - start, 2)
        decoder(latents)  # warm-up of the decoder at this batch size
        memory: dict[str, Any] = {}
        with peak_memory(device, memory):
            decode_seconds, _ = timed(functools.partial(decoder, latents), device)
        for sampler, steps in SAMPLERS:
            probe_steps = 3 if device.type == "cuda" else 2
            probe, _ = timed(functools.partial(sample, batch, sampler, probe_steps), device)
            per_step = probe / probe_steps
            run: dict[str, Any] = {"sampler": sampler, "steps": steps, "batch": batch, "seconds_per_step": round(per_step, 4),
                                   "warmup_seconds": warmup, "cuda_graph": graphs}
            remaining_runs = max(1, len(GENERATION_BATCHES) * len(SAMPLERS) - len(out["runs"]))
            if per_step * steps < deadline.left() / remaining_runs:
                with peak_memory(device, run):
                    sample_seconds, _ = timed(functools.partial(sample, batch, sampler, steps), device)
                run["measured"] = "full run"
            else:
                sample_seconds = per_step * steps
                run["measured"] = f"extrapolated from {probe_steps} steps (budget)"
            total = sample_seconds + decode_seconds
            run |= {"sample_seconds": round(sample_seconds, 3), "decode_seconds": round(decode_seconds, 3),
                    "decode_peak_memory_gib": memory["peak_memory_gib"], "seconds_total": round(total, 3),
                    "seconds_per_clip": round(total / batch, 3), "clips_per_second": round(batch / total, 3),
                    "tflops_achieved": rate(out["tflop_per_guided_step_per_clip"] * 1e12 * batch, per_step)}
            out["runs"].append(run)
            log(f"generation: {run} ({deadline.left():.0f} s left)")
        release_graphs(fast)
    try:
        out["sampling_batch"] = sampling_batch_probe(fast, spec, bf16, device, deadline, log,
                                                     out["tflop_per_guided_step_per_clip"])
    except Exception as error:  # noqa: BLE001 - the runs above must not be lost with it
        out["sampling_batch"] = {"status": "error", "error": f"{type(error).__name__}: {error}"[:500]}
        release_graphs(fast)
    guarded("sampling_profile", out, log, lambda _: sampling_profile(out, sample, device, deadline))
    generation_changes(out, model, fast, sample, bf16, device, deadline, log, compile_runs)
    return out


def sampling_profile(out: dict[str, Any], sample: Callable[..., torch.Tensor], device: torch.device,
                     deadline: Deadline) -> dict[str, Any]:
    """The top kernels (CPU: ops) of two guided DDPM steps at evaluation's sampling batch (as measured above, else
    the largest of GENERATION_BATCHES), launched one by one (under a CUDA graph the profiler sees one launch)."""
    if deadline.left() < 15 and not EVERY_CHANGE["on"]:
        return {"skipped": f"budget: {deadline.left():.0f} s left"}
    batch = evaluation_batch(out)
    sample(batch, "ddpm", 1, graph=False)  # warm-up (cuDNN autotuning at this batch)
    kernels, what = profile_top(lambda: sample(batch, "ddpm", 2, graph=False), device, 15)
    return {"batch": batch, "steps": 2, "top_kernels": kernels, "time": what}


def evaluation_batch(out: dict[str, Any]) -> int:
    """The sampling batch evaluation's probe chose in this run, else the largest of GENERATION_BATCHES."""
    probe = out.get("sampling_batch", {})
    return int(probe.get("sampling_batch") or GENERATION_BATCHES[-1]) if probe.get("status") == "ok" else GENERATION_BATCHES[-1]


def release_graphs(model: Any) -> None:
    from train.denoiser import release_graphs as release

    release(model)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sampling_batch_probe(model: Any, spec: Any, bf16: bool, device: torch.device, deadline: Deadline,
                         log: Callable[[str], None], tflop_per_step: float) -> dict[str, Any]:
    """Evaluation's own choice of the sampling batch (`eval.generate.measure_sampling_batch`, the paper's DDPM
    sampler and guidance), and what 300 steps per clip then cost in sampling."""
    from eval.config import PRESETS as EVAL_PRESETS
    from eval.generate import measure_sampling_batch

    if deadline.left() < 60 and not EVERY_CHANGE["on"]:
        return {"status": "skipped", "reason": f"budget: {deadline.left():.0f} s left"}
    cuda = device.type == "cuda"
    found = measure_sampling_batch(model, spec, EVAL_PRESETS["paper"], torch.bfloat16 if bf16 else None, device,
                                   1000 if cuda else 8, cuda)
    best = found["seconds_per_clip_step"][str(found["sampling_batch"])]
    found |= {"status": "ok", "seconds_per_clip_300_steps": round(best * 300, 3),
              "tflops_achieved": rate(tflop_per_step * 1e12, best)}
    log(f"sampling batch: {found}")
    return found


def generation_changes(out: dict[str, Any], model: Any, fast: Any, sample: Callable[..., torch.Tensor], bf16: bool,
                       device: torch.device, deadline: Deadline, log: Callable[[str], None], compile_runs: bool) -> None:
    """Before/after of the sampling changes on the headline case, DPM-Solver++-25 at batch 1 (sampling seconds);
    CUDA graphs and channels_last also at batch 16; torch.compile also on DDPM steps at evaluation's sampling batch
    (the 300-step protocol). Each comparison states both settings in full."""
    from train.speed import speed_up

    cuda = device.type == "cuda"

    def seconds(batch: int = 1, **settings: Any) -> float:
        sample(batch, "dpmsolver++", 2, **settings)  # warm-up (graph capture, compilation)
        return round(timed(lambda: sample(batch, "dpmsolver++", 25, **settings), device)[0], 3)

    def precision_change() -> dict[str, Any]:
        if not bf16:
            return {"skipped": "bf16 autocast is CUDA-only"}
        return {"unit": "s", "before": ("float32 UNet (TF32 matmuls), CUDA graph", seconds(use_bf16=False)),
                "after": ("bf16 autocast, weights cast once, CUDA graph (eval's auto)", seconds())}

    compare(out, "bf16_autocast", deadline, 30, log, precision_change)

    def cast_once_change() -> dict[str, Any]:
        if not bf16:
            return {"skipped": "bf16 autocast is CUDA-only"}
        return {"unit": "s", "before": ("bf16 autocast over float32 weights, no graph", seconds(graph=False, lowered=False)),
                "after": ("bf16 autocast, matmul weights cast once, no graph", seconds(graph=False))}

    compare(out, "weights_cast_once", deadline, 30, log, cast_once_change)

    def graph_change(batch: int) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            if not cuda:
                return {"skipped": "CUDA graphs need CUDA"}
            before = seconds(batch, graph=False)
            release_graphs(fast)
            start = time.perf_counter()
            sample(batch, "dpmsolver++", 1)  # capture + one step
            synchronize(device)
            capture = round(time.perf_counter() - start, 2)
            result = {"unit": "s", "before": ("kernels launched one by one", before),
                      "after": ("CUDA graph replay (train.denoiser)", seconds(batch)), "capture_seconds": capture}
            # the same noise both ways: the graph must give eager sampling's latents
            eager, graphed = sample(batch, "dpmsolver++", 25, graph=False), sample(batch, "dpmsolver++", 25)
            result["max_abs_difference_vs_eager"] = float((eager - graphed).abs().max())
            result["latent_std"] = float(eager.std())
            release_graphs(fast)
            return result
        return run

    compare(out, "cuda_graphs", deadline, 30, log, graph_change(1))
    compare(out, "cuda_graphs_batch16", deadline, 40, log, graph_change(16))

    def layout(channels_last: bool) -> None:
        release_graphs(fast)  # a graph holds the layout it was captured with
        fast.unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)  # type: ignore[call-overload]
        fast.channels_last = channels_last

    def channels_last_change(batch: int) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            default = fast.channels_last  # evaluation's choice on this device (`train.speed.sampling_channels_last`)
            try:
                layout(False)
                before = seconds(batch)
                layout(True)
                after = seconds(batch)
            finally:
                layout(default)
            return {"unit": "s", "batch": batch, "before": ("contiguous (NCHW)", before),
                    "after": ("channels_last (NHWC)", after)}
        return run

    compare(out, "channels_last", deadline, 20, log, channels_last_change(1))
    compare(out, "channels_last_batch16", deadline, 30, log, channels_last_change(16))

    def compiled(mode: str | None) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            if not compile_runs:
                return {"skipped": "torch.compile runs only with --compile (minutes of compilation)"}
            if mode == "reduce-overhead" and not cuda:
                return {"skipped": "CUDA graphs need CUDA"}
            before = seconds()
            speed_up(fast, compile=True, compile_mode=mode)
            start = time.perf_counter()
            sample(1, "dpmsolver++", 2)
            synchronize(device)
            compile_seconds = round(time.perf_counter() - start, 1)
            return {"unit": "s", "before": ("previous row's setting", before),
                    "after": (f"torch.compile mode={mode or 'default'}", seconds()), "compile_seconds": compile_seconds}
        return run

    def compiled_at_evaluation_batch() -> dict[str, Any]:
        """The 300-step protocol's cost: DDPM steps at evaluation's batch, its default (CUDA graph) vs compiled."""
        if not compile_runs:
            return {"skipped": "torch.compile runs only with --compile (minutes of compilation)"}
        batch, steps = evaluation_batch(out), 5

        def per_step(**settings: Any) -> float:
            sample(batch, "ddpm", 2, **settings)  # warm-up (graph capture, compilation)
            return timed(lambda: sample(batch, "ddpm", steps, **settings), device)[0] / steps

        before = per_step()
        release_graphs(fast)
        speed_up(fast, compile=True)
        try:
            start = time.perf_counter()
            sample(batch, "ddpm", 1, graph=False)
            synchronize(device)
            compile_seconds = round(time.perf_counter() - start, 1)
            after = per_step(graph=False)
        finally:
            fast.unet._compiled_call_impl = None  # what nn.Module.compile set: the rows below compile their own way
        return {"unit": "s", "batch": batch, "steps_timed": steps, "compile_seconds": compile_seconds,
                "note": "seconds per guided DDPM step of the whole batch; 300 steps per clip = 300 x s / batch",
                "seconds_per_clip_300_steps": {"before": round(before * 300 / batch, 3),
                                               "after": round(after * 300 / batch, 3)},
                "before": ("evaluation's default: bf16, weights cast once, channels_last on CUDA, CUDA graph",
                           round(before, 5)),
                "after": ("the same, torch.compile mode=default instead of the CUDA graph", round(after, 5))}

    compare(out, "torch_compile_evaluation_batch", deadline, 150 if compile_runs else 0, log,
            compiled_at_evaluation_batch)
    compare(out, "torch_compile", deadline, 120 if compile_runs else 0, log, compiled(None))
    compare(out, "torch_compile_reduce_overhead", deadline, 90 if compile_runs and cuda else 0, log,
            compiled("reduce-overhead"))


# ----------------------------------------------------------------------------------- report
TARGETS = (  # the issues' targets, read off one run
    ("stage one end to end, clips/s", ">=", 2.5),
    ("stage one end to end / encoders alone", ">=", 0.95),
    ("training from shards / from memory", ">=", 0.95),
    ("UNet training MFU at global batch 32, bf16 (best measured setting)", ">=", 0.35),
    ("sampling seconds per clip, 300 steps, evaluation's measured batch", "<=", 1.2),
    ("sampling seconds for one clip, DPM-Solver++-25, batch 1 (best measured setting)", "<", 0.5),
)


def met(value: float, sign: str, wanted: float) -> bool:
    return {">=": value >= wanted, "<=": value <= wanted, "<": value < wanted}[sign]


# generation's comparisons whose "after" is not DPM-Solver++-25's sampling seconds at batch 1 (the latency target)
NOT_DPM_BATCH_ONE = frozenset({"cuda_graphs_batch16", "channels_last_batch16", "torch_compile_evaluation_batch"})


def target_values(results: dict[str, Any]) -> list[float | None]:
    """The measured value of each of TARGETS (None where its section did not run)."""
    one, tr, gen = (results.get(k, {}) for k in ("stage_one", "training", "generation"))
    mfus = [tr.get("from_memory", {}).get("mfu_vs_datasheet")]
    for change in tr.get("changes", {}).values():
        mfus += change.get("mfu_vs_datasheet", []) if change.get("status") == "ok" else []
    mfus += [r.get("mfu_vs_datasheet") for r in (tr.get("global_batch") or {}).values() if isinstance(r, dict)]
    fast = [r for r in gen.get("runs", []) if r["sampler"] == "dpmsolver++" and r["batch"] == 1]
    dpm = None
    if fast:
        sampling = [fast[0]["sample_seconds"]] + [c["after"][1] for name, c in gen.get("changes", {}).items()
                                                  if c.get("status") == "ok" and name not in NOT_DPM_BATCH_ONE]
        dpm = round(min(sampling), 3)
    valid_mfus = [m for m in mfus if m is not None]
    return [(one.get("end_to_end") or {}).get("clips_per_second"), one.get("ratio_end_to_end_over_encoders"),
            tr.get("ratio_shards_over_memory"), max(valid_mfus) if valid_mfus else None,
            (gen.get("sampling_batch") or {}).get("seconds_per_clip_300_steps"), dpm]


def changes_table(section: dict[str, Any]) -> list[str]:
    """The section's before/after comparisons as Markdown rows."""
    changes = section.get("changes", {})
    if not changes:
        return []
    lines = ["| change | before | after | unit | speed-up |", "|---|---|---|---|---|"]
    for name, c in changes.items():
        if c["status"] == "ok":
            differences = "".join(f"; {key.replace('_', ' ')} {fmt(value)}" for key, value in c.items()
                                  if key.startswith("max_abs_difference"))
            lines.append(f"| {name} | {c['before'][0]}: {fmt(c['before'][1])} | {c['after'][0]}: {fmt(c['after'][1])} | "
                         f"{c['unit']} | **{fmt(c.get('speedup'))}x**{differences} |")
        else:
            why = " ".join(str(c.get("reason") or c.get("error", "")).split()).replace("|", "/")[:200]
            lines.append(f"| {name} | {c['status']}: {why} | | | |")
    return lines + [""]


def stage_one_knob_lines(one: dict[str, Any]) -> list[str]:
    """Markdown rows of stage one's SAM floor, Grounding DINO input size and memory-cap measurements."""
    def why(entry: dict[str, Any]) -> str:
        return " ".join(str(entry.get("reason") or entry.get("error", "")).split()).replace("|", "/")[:200]

    lines: list[str] = []
    if one.get("sam_floor"):
        lines += [f"SAM floor (grounding step on {one['sam_floor'][0].get('clips', '?')} clips; scores: "
                  f"{one.get('sam_floor_scores', 'n/a')}; the preset's floor {one.get('preset_sam_floor')} skips "
                  f"{fmt(one.get('preset_floor_skip_fraction'))} of the noun-frames here):", "",
                  "| wanted skip | floor | skipped noun-frames | frames SAM skips | s/clip | floor 0 s/clip | speed-up |",
                  "|---|---|---|---|---|---|---|"]
        for e in one["sam_floor"]:
            if e["status"] == "ok":
                lines.append(f"| {e['target_skip_fraction']} | {fmt(e['floor'])} | {fmt(e['skip_fraction'])} | "
                             f"{fmt(e['frames_sam_skips'])} | {fmt(e['seconds_per_clip'])} | {fmt(e['before'][1])} | "
                             f"**{fmt(e.get('speedup'))}x** |")
            else:
                lines.append(f"| {e['target_skip_fraction']} | {e['status']}: {why(e)} | | | | | |")
        lines.append("")
    if one.get("grounding_sizes"):
        lines += ["Grounding DINO input size (grounding step, same frames):", "",
                  "| short x long side | clips/s | vs preset size |", "|---|---|---|"]
        for e in one["grounding_sizes"]:
            size = f"{e['short_side']}x{e['long_side']}"
            lines.append(f"| {size} | {fmt(e['clips_per_second'])} | **{fmt(e.get('speedup'))}x** |" if e["status"] == "ok"
                         else f"| {size} | {e['status']}: {why(e)} | |")
        lines.append("")
    cap = one.get("memory_cap")
    if cap:
        head = f"- memory cap {fmt(one.get('memory_cap_gib'))} GiB: "
        if cap["status"] == "ok":
            lines += [head + f"completed {cap['completed']}, **{fmt(cap['clips_per_second'])} clips/s** (uncapped "
                      f"{fmt(cap['before'][1])}) on {cap['clips']} clips, peak {fmt(cap.get('peak_memory_gib'))} GiB "
                      f"allocated / {fmt(cap.get('peak_reserved_gib'))} GiB reserved, frame batches "
                      f"{cap.get('frame_batch_start')} -> {cap.get('frame_batch_end')}", ""]
        else:
            lines += [head + f"{cap['status']}: {why(cap)}", ""]
    return lines


def grounding_profile_lines(one: dict[str, Any]) -> list[str]:
    """Markdown rows of the grounding step's split by part and its top kernels."""
    prof = one.get("grounding_profile")
    if not prof:
        return []
    if prof["status"] != "ok":
        return [f"- grounding profile: {prof['status']}: {' '.join(str(prof.get('error', '')).split())[:200]}", ""]
    lines = [f"Grounding step by part ({prof['frames']} frames of {prof['clips']} clips, {prof['timing']}; "
             f"{fmt(prof['ms_per_frame'])} ms per frame in all; a row marked 'within' is part of a row above it):", "",
             "| model | part | ms/frame | share |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {'within: ' if r['detail'] else ''}{r['part']} | {fmt(r['ms_per_frame'])} | "
              f"{fmt(r['share'])} |" for r in prof["parts"]]
    lines += [f"| | other (processors, post-processing, host waits) | {fmt(prof['other_ms_per_frame'])} | |", ""]
    return lines + ops_table(f"Top {len(prof['top_kernels'])} of the grounding step by {prof['top_kernels_time']}:",
                             prof["top_kernels"])


def ops_table(title: str, ops: list[dict[str, Any]]) -> list[str]:
    """A profile's top ops (`top_ops`) as a titled Markdown table."""
    return [title, "", "| op / kernel | calls | self ms | share |", "|---|---|---|---|",
            *[f"| `{op['name'][:80].replace('|', '/')}` | {op['calls']} | {fmt(op['self_ms'])} | {fmt(op['share'])} |"
              for op in ops], ""]


def markdown(results: dict[str, Any]) -> str:
    """A short human summary of the JSON (the JSON holds every number)."""
    meta, dev = results["meta"], results.get("device", {})
    lines = [f"# GPU benchmark ({meta['preset']} preset, {dev.get('name', meta['device'])})", "",
             f"{meta['date']}; torch {dev.get('torch')}, CUDA {dev.get('cuda', '-')}; random-init models "
             f"(`random_size={meta['preset']}`{': the real architectures' if meta['preset'] == 'paper' else ': toy widths'}); budget {meta['budget_s']} s, took {meta.get('wall_seconds')} s.", ""]
    if dev.get("status") == "ok":
        lines += [f"- matmul {dev['matmul']['n']}^3 {dev['matmul']['dtype']}: **{dev['matmul']['tflops']} TFLOP/s** measured; "
                  f"datasheet dense bf16 peak: {dev.get('peak_bf16_tflops_datasheet') or 'n/a'}", ""]
    one = results.get("stage_one", {})
    lines += ["### Stage one", ""]
    if one.get("status") == "ok":
        e2e, alone = one["end_to_end"], one["encoders_alone"]
        lines += [f"- {e2e['clips']} synthetic clips {one['synthetic_videos']['size']} @ {one['synthetic_videos']['fps']} fps, "
                  f"{one['synthetic_videos'].get('clip_seconds')} s, {one['frames_per_clip']} frames/clip, grounding input {one['grounding_input']}, SAM {one['use_sam']}, "
                  f"{one['decode_workers']} decode workers; parameters (M): {one['parameters_m']}",
                  f"- end to end: **{e2e['clips_per_second']} clips/s**; encoders alone: **{alone['clips_per_second']} clips/s** "
                  f"(ratio {one['ratio_end_to_end_over_encoders']}); peak memory {fmt(one.get('end_to_end_peak_memory_gib'))} GiB",
                  f"- of the end-to-end time: start-up {fmt(e2e.get('startup_seconds'))} s (until the first batch reached the "
                  f"encoders), finishing {fmt(e2e.get('finishing_seconds'))} s; in between {fmt(e2e.get('steady_clips_per_second'))} "
                  f"clips/s (ratio {fmt(one.get('ratio_steady_over_encoders'))}: what a long run approaches)", ""]
        per = one.get("per_model", {})
        rows = [(k, v) for k, v in per.items() if isinstance(v, dict) and "seconds_per_clip" in v]
        if rows:
            lines += ["| model | s/clip | TFLOP/clip | achieved TFLOP/s | peak GiB |", "|---|---|---|---|---|"]
            lines += [f"| {k} | {fmt(v['seconds_per_clip'])} | {fmt(v['tflop_per_clip'])} | {fmt(v.get('achieved_tflops'))} | "
                      f"{fmt(v.get('peak_memory_gib'))} |" for k, v in rows]
            lines.append("")
        lines += grounding_profile_lines(one)
        lines += stage_one_knob_lines(one)
        lines += changes_table(one)
    else:
        lines += [f"- {one.get('status', 'not run')}: {one.get('error', '')}", ""]
    tr = results.get("training", {})
    lines += ["### Training", ""]
    if tr.get("status") == "ok":
        lines += [f"- UNet {tr['parameters_m']} M parameters, batch {tr['batch_size']}, {tr['precision']}, "
                  f"{fmt(tr['tflop_per_step'])} TFLOP/step (fwd+bwd), peak memory {fmt(tr.get('peak_memory_gib'))} GiB", "",
                  "| fed from | samples/s | step ms | TFLOP/s | MFU (datasheet) | MFU (measured matmul) |", "|---|---|---|---|---|---|"]
        for key in ("from_shards", "from_memory"):
            r = tr[key]
            lines.append(f"| {key.removeprefix('from_')} | {fmt(r['samples_per_second'])} | {fmt(r['step_ms'])} | "
                         f"{fmt(r['achieved_tflops'])} | {fmt(r['mfu_vs_datasheet'])} | {fmt(r['mfu_vs_measured_matmul'])} |")
        lines.append("")
        gb = tr.get("global_batch")
        if gb:
            lines += [f"Global batch {gb['samples']} per optimizer step (from memory):", "",
                      "| micro-batch x accumulation | samples/s | step ms | MFU (datasheet) | peak GiB |", "|---|---|---|---|---|"]
            lines += [f"| {r['micro_batch']} x {r['accumulation']} | {fmt(r['samples_per_second'])} | {fmt(r['step_ms'])} | "
                      f"{fmt(r['mfu_vs_datasheet'])} | {fmt(r.get('peak_memory_gib'))} |"
                      for r in (gb["accumulated"], gb["one_micro_batch"])]
            lines.append("")
        if tr.get("profile"):
            lines += ops_table(f"One profiled step (batch {tr.get('profile_batch', tr['batch_size'])}), top "
                               f"{len(tr['profile'])} by {tr['profile_time']}:", tr["profile"])
        if tr.get("changes_batch"):
            lines += [f"Changes measured at batch {tr['changes_batch']} in one micro-batch:", ""]
        lines += changes_table(tr)
    else:
        lines += [f"- {tr.get('status', 'not run')}: {tr.get('error', '')}", ""]
    gen = results.get("generation", {})
    lines += ["### Generation (one 10.24 s clip)", ""]
    if gen.get("status") == "ok":
        lines += [f"- UNet {gen['unet_precision']}, CUDA graphs {gen.get('cuda_graphs')}, channels_last {gen.get('channels_last')}, guidance {gen['guidance']}, "
                  f"{fmt(gen['tflop_per_guided_step_per_clip'])} TFLOP per guided step per clip; {gen['decoder']}", "",
                  "| sampler | batch | s/step | sampling s | decode s | s per clip | measured |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['sampler']}-{r['steps']} | {r['batch']} | {fmt(r['seconds_per_step'])} | {fmt(r['sample_seconds'])} | "
                  f"{fmt(r['decode_seconds'])} | **{fmt(r['seconds_per_clip'])}** | {r['measured']} |" for r in gen["runs"]]
        lines.append("")
        probe = gen.get("sampling_batch") or {}
        if probe.get("status") == "ok":
            lines += [f"- evaluation's sampling batch: **{probe['sampling_batch']}** (seconds per clip and step "
                      f"{probe['seconds_per_clip_step']}; {probe['probe_stopped']}): 300 steps cost "
                      f"**{fmt(probe['seconds_per_clip_300_steps'])} s per clip**, {fmt(probe.get('tflops_achieved'))} "
                      "TFLOP/s", ""]
        prof = gen.get("sampling_profile", {})
        if prof.get("top_kernels"):
            lines += ops_table(f"Two guided DDPM steps at batch {prof['batch']} (no graph), top {len(prof['top_kernels'])} "
                               f"by {prof['time']}:", prof["top_kernels"])
        lines += ["Changes measured on DPM-Solver++-25, sampling seconds (batch 1 unless named):", ""]
        lines += changes_table(gen)
    else:
        lines += [f"- {gen.get('status', 'not run')}: {gen.get('error', '')}", ""]
    lines += ["### Targets", "", "| target | wanted | measured | met |", "|---|---|---|---|"]
    on_gpu = meta["device"].startswith("cuda")
    for (name, sign, wanted), value in zip(TARGETS, target_values(results)):
        verdict = "n/a" if value is None else ("yes" if met(value, sign, wanted) else "**no**")
        verdict = verdict if on_gpu else "n/a: the targets are for a GPU"
        lines.append(f"| {name} | {sign} {wanted} | {fmt(value)} | {verdict} |")
    return "\n".join(lines)


def record_results(results: dict[str, Any]) -> None:
    """The Markdown summary as a section of benchmarks/RESULTS.md (CPU runs are labelled as such)."""
    from benchmarks.results import write_section

    meta = results["meta"]
    body = markdown(results).split("\n", 2)[2]
    if not meta["device"].startswith("cuda"):
        body = (f"**CPU run of the GPU benchmark with the toy models: it shows that the script works end to end; these "
                f"are not GPU numbers**, and on a shared 2-core machine (load average {meta.get('load_average')}) they "
                f"vary by several times between runs.\n\n" + body)
    kind = "GPU" if meta["device"].startswith("cuda") else "CPU, tiny models, not GPU numbers"
    write_section(f"GPU benchmark script ({meta['preset']} preset, {kind})",
                  body + f"\n\n`python -m benchmarks.gpu_bench --preset {meta['preset']} --device {meta['device']}` "
                  "(or benchmarks/gpu.sh) writes every number to gpu_bench.json.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper", choices=("tiny", "paper"), help="model sizes (paper: the GPU run)")
    parser.add_argument("--device", default="auto", help="'auto' (cuda when there), 'cpu' or 'cuda[:N]'")
    parser.add_argument("--out", type=Path, default=None, help="result folder (default: $OUT when set, else benchmarks/gpu_results)")
    parser.add_argument("--budget-s", type=float, default=None, help="time budget of all sections (default: 420 on a GPU, 150 on the CPU)")
    parser.add_argument("--clips", type=int, default=None, help="synthetic clips for stage one (default: 12 paper, 8 tiny)")
    parser.add_argument("--train-steps", type=int, default=None, help="timed training steps per input (default: 30 paper, 5 tiny)")
    parser.add_argument("--sections", nargs="+", default=list(SECTION_SHARES), choices=list(SECTION_SHARES))
    parser.add_argument("--results-md", action="store_true", help="also record the summary in benchmarks/RESULTS.md")
    parser.add_argument("--every-change", action="store_true",
                        help="run every before/after comparison even past the budget (the slow test, on a loaded machine)")
    parser.add_argument("--compile", action="store_true",
                        help="also measure torch.compile (and CUDA graphs) in stage one, training and generation: minutes "
                             "of compilation, best as a second run of one section, e.g. the 300-step protocol compiled: "
                             "--sections generation --compile --changes torch_compile_evaluation_batch")
    parser.add_argument("--changes", nargs="+", default=None, metavar="NAME",
                        help="run only these before/after comparisons (their names in the JSON's 'changes' tables, "
                             "e.g. torch_compile torch_compile_evaluation_batch); the others are recorded as skipped")
    args = parser.parse_args(argv)
    EVERY_CHANGE["on"] = args.every_change
    ONLY_CHANGES["names"] = set(args.changes) if args.changes else None
    COMPARED.clear()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    out_dir = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else DEFAULT_OUT)
    out_dir.mkdir(parents=True, exist_ok=True)
    budget = args.budget_s or (420.0 if device.type == "cuda" else 150.0)
    paper = args.preset == "paper"
    clips = args.clips or (12 if paper else 8)
    steps = args.train_steps or (30 if paper else 5)
    started = time.perf_counter()
    log_file = open(out_dir / "gpu_bench.log", "a", encoding="utf-8")
    results: dict[str, Any] = {"meta": {"preset": args.preset, "device": str(device), "budget_s": budget,
                                        "date": datetime.datetime.now().isoformat(timespec="seconds"),
                                        "sections": args.sections, "compile": args.compile, "argv": argv}}

    def save_json() -> None:
        """gpu_bench.json as it stands (a section still running says so): written at each log line, so a run killed
        by its time limit keeps every number it had logged."""
        results["meta"]["wall_seconds"] = round(time.perf_counter() - started, 1)
        results["meta"]["load_average"] = [round(x, 2) for x in os.getloadavg()]
        target = out_dir / "gpu_bench.json"
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, target)

    def save() -> None:
        save_json()
        (out_dir / "gpu_bench.md").write_text(markdown(results) + "\n", encoding="utf-8")

    def log(message: str) -> None:
        stamped = f"[{time.perf_counter() - started:7.1f} s] {message}"
        print(stamped, flush=True)
        log_file.write(stamped + "\n")
        log_file.flush()
        save_json()

    guarded("device", results, log, lambda _: bench_device(device))
    save()
    with tempfile.TemporaryDirectory(prefix="gpu_bench_") as tmp:
        root = Path(tmp)
        for i, name in enumerate(args.sections):
            # this section's share of what is left now: time a section leaves unused goes to the next ones, and time
            # one overruns is taken from them, so the budget holds for the whole run
            left = budget - (time.perf_counter() - started)
            share = SECTION_SHARES[name] / sum(SECTION_SHARES[s] for s in args.sections[i:])
            deadline = Deadline(max(left, 0.0) * share)
            common = {"preset": args.preset, "device": device, "deadline": deadline, "log": log,
                      "compile_runs": args.compile}
            section = {  # each is given its section's dict to fill
                "stage_one": functools.partial(bench_stage_one, root=root, clips_wanted=clips, **common),
                "training": functools.partial(bench_training, root=root, steps=steps,
                                              device_info=results.get("device", {}), **common),
                "generation": functools.partial(bench_generation, **common),
            }[name]
            guarded(name, results, log, section)
            save()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    unknown = sorted((ONLY_CHANGES["names"] or set()) - COMPARED)
    failed = [name for name in ["device", *args.sections] if results.get(name, {}).get("status") != "ok"]
    if unknown and set(failed) - {"device"}:  # a section that stopped early may not have reached it: not a typo
        results["meta"]["changes_not_reached"] = unknown
        log(f"--changes: {', '.join(unknown)} not reached ({', '.join(failed)} stopped early)")
    elif unknown:  # a name no section compares: said in the JSON, the log and the exit code
        results["meta"]["unknown_changes"] = unknown
        log(f"--changes: no comparison is named {', '.join(unknown)} (known here: {', '.join(sorted(COMPARED))})")
    save()
    summary = markdown(results)
    print("\n" + summary)
    if args.results_md:
        record_results(results)
    log_file.close()
    return 1 if failed or unknown else 0


if __name__ == "__main__":
    raise SystemExit(main())
