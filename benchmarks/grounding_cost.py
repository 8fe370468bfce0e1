"""Where stage one's grounding compute goes: FLOPs (and, optionally, CPU seconds) of one frame, per part of Grounding
DINO (Swin-T + BERT, paper-size random-init configs) and of SAM ViT-B, as `preprocess.encoders.Grounder` runs them.

The question it answers is which speed changes of the grounding pass pay. Grounding DINO takes each frame with its
clip's prompt ("noun1 . noun2 . ..."), so its text side (the BERT text backbone and the text projection; the
masks and position ids built from the token ids cost no FLOPs) is recomputed for every frame although it depends
on the clip only. The encoder's fusion and text-enhancer layers see the image, so they are per frame whatever
happens. The script splits one frame's detector FLOPs into text side, Swin backbone, input projections, encoder
(fusion / text enhancer / deformable layers), two-stage query selection, decoder and heads, at several input short
sides, for prompts of several nouns; and SAM's into image encoder, prompt encoder and mask decoder (1024 x 1024,
one box per noun).

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` (2 per multiply-add of matrix products,
convolutions and attention), batch 1, float32 on the CPU. Two ops it has no formula for are added: the CPU's fused
attention kernel (BERT's) and the bilinear sampling of the deformable attention (`grid_sample`, 4 multiply-adds per
sampled value). Elementwise ops (norms, activations, softmax) are not counted; they show in the CPU seconds. CPU
seconds come from forward hooks on the same modules (each part's fastest of --repeats forwards). The random SAM's
image encoder is drawn at a trained checkpoint's weight scale (`preprocess.model_configs.paper_sam_config`:
transformers' default init makes the CPU compute denormal floats, several times slower).

`python -m benchmarks.grounding_cost [--short-sides 800 600 480] [--nouns 3 6] [--no-time] [--no-write]` prints
the tables and records them in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.results import machine_name, write_section

TITLE = "Stage one: where grounding's compute goes (grounding_cost.py)"
NOUNS = ("dog", "guitar", "drum", "car", "people", "water", "bird", "train")
FRAME_HEIGHT, FRAME_WIDTH = 360, 640  # a 640 x 360 video frame, resized by Grounding DINO's image processor
TEXT_PARTS = ("text: BERT backbone", "text: projection")
OTHER = "other (ops outside these modules)"

# part -> module-name patterns (fnmatch, relative to the model); the patterns of one model never nest
DETECTOR_PARTS: dict[str, tuple[str, ...]] = {
    "text: BERT backbone": ("model.text_backbone",),
    "text: projection": ("model.text_projection",),
    "Swin-T backbone (+ sine positions)": ("model.backbone",),
    "input projections (conv + GroupNorm)": ("model.input_proj_vision.*",),
    "encoder: fusion (image-text cross-attention)": ("model.encoder.layers.*.fusion_layer",),
    "encoder: text enhancer (text self-attention)": ("model.encoder.layers.*.text_enhancer_layer",),
    "encoder: deformable self-attention + FFN": ("model.encoder.layers.*.deformable_layer",),
    "two-stage query selection": ("model.enc_output", "model.enc_output_norm", "model.encoder_output_class_embed",
                                  "model.encoder_output_bbox_embed"),
    "decoder (6 layers)": ("model.decoder",),
    "heads (class + box per decoder layer)": ("class_embed.*", "bbox_embed.*"),
}
# modules inside a part, measured on their own as well (not part of the split's sum)
DETECTOR_DETAILS: dict[str, tuple[str, ...]] = {
    "deformable attention of the encoder's deformable layers (sampling + projections)":
        ("model.encoder.layers.*.deformable_layer.self_attn",),
    "the encoder's deformable layers' FFN (fc1, fc2)":
        ("model.encoder.layers.*.deformable_layer.fc1", "model.encoder.layers.*.deformable_layer.fc2"),
    "deformable cross-attention of the decoder": ("model.decoder.layers.*.encoder_attn",),
}
SAM_ENCODER = "image encoder: "
SAM_PROMPT_SIDE = ("positional embedding", "prompt encoder", "mask decoder")


def sam_parts(global_blocks: Sequence[int], blocks: int) -> dict[str, tuple[str, ...]]:
    """SAM's parts: the ViT-B image encoder split into patch embedding, windowed and global attention blocks and
    neck; then the prompt side (the image-wide positional embedding, prompt encoder, mask decoder)."""
    windowed = tuple(f"vision_encoder.layers.{i}" for i in range(blocks) if i not in global_blocks)
    return {
        SAM_ENCODER + "patch embedding": ("vision_encoder.patch_embed",),
        SAM_ENCODER + f"{len(windowed)} windowed-attention blocks": windowed,
        SAM_ENCODER + f"{len(global_blocks)} global-attention blocks": tuple(f"vision_encoder.layers.{i}" for i in global_blocks),
        SAM_ENCODER + "neck": ("vision_encoder.neck",),
        "positional embedding": ("shared_image_embedding",),
        "prompt encoder": ("prompt_encoder",),
        "mask decoder": ("mask_decoder",),
    }


def _cpu_attention_flop(query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int],
                        *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """aten._scaled_dot_product_flash_attention_for_cpu: Q K^T and the weighted sum of V, 2 FLOPs a multiply-add."""
    *batch, queries, dim = query_shape
    keys, value_dim = key_shape[-2], value_shape[-1]
    return 2 * math.prod(batch) * queries * keys * (dim + value_dim)


def _grid_sample_flop(input_shape: Sequence[int], grid_shape: Sequence[int], *args: Any, out_shape: Any = None,
                      **kwargs: Any) -> int:
    """aten.grid_sampler_2d, bilinear: 4 multiply-adds per sampled value (N, C, H_out, W_out)."""
    return 8 * math.prod(out_shape)


CUSTOM_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flop,
    torch.ops.aten.grid_sampler_2d: _grid_sample_flop,
}


@dataclass
class PartCost:
    """One forward's FLOPs and (when timed) seconds per part; the OTHER part is the total minus the named parts."""

    flops: dict[str, float]
    seconds: dict[str, float] | None = None


def part_modules(model: nn.Module, parts: dict[str, tuple[str, ...]]) -> dict[str, list[tuple[str, nn.Module]]]:
    """The (name, module) pairs of each part; every part must match at least one module. A pattern's '*' stands
    for one component of the dotted name (so 'bbox_embed.*' is each head, not also their layers). A module shared
    under several names (transformers up to 5.17 registers Grounding DINO's heads also as the decoder's) matches by
    any of them, and appears once in a part."""

    def matches(name: str, pattern: str) -> bool:
        names, patterns = name.split("."), pattern.split(".")
        return len(names) == len(patterns) and all(fnmatch.fnmatchcase(n, p) for n, p in zip(names, patterns))

    found: dict[str, list[tuple[str, nn.Module]]] = {}
    for part, patterns in parts.items():
        seen: set[int] = set()
        found[part] = []
        for name, module in model.named_modules(remove_duplicate=False):
            if id(module) not in seen and any(matches(name, p) for p in patterns):
                seen.add(id(module))
                found[part].append((name, module))
        if not found[part]:
            raise RuntimeError(f"no module of {type(model).__name__} matches {patterns} ({part})")
    return found


def count_flops(model: nn.Module, parts: dict[str, tuple[str, ...]], forward: Callable[[], object],
                details: dict[str, tuple[str, ...]] | None = None) -> dict[str, float]:
    """FLOPs of one call of forward() per part and detail (plus OTHER and 'total', which count the parts only),
    from FlopCounterMode's per-module counts."""
    with FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) as counter:
        forward()
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    root = type(model).__name__
    flops = {part: float(sum(counts.get(f"{root}.{name}", 0) for name, _ in modules))
             for part, modules in part_modules(model, {**parts, **(details or {})}).items()}
    flops["total"] = float(counter.get_total_flops())
    flops[OTHER] = flops["total"] - sum(flops[p] for p in parts)
    return flops


@contextmanager
def part_timers(model: nn.Module, parts: dict[str, tuple[str, ...]], seconds: dict[str, float],
                device: torch.device | None = None, details: dict[str, tuple[str, ...]] | None = None) -> Iterator[None]:
    """Adds each part's and detail's seconds into `seconds` while active (forward pre-hooks and hooks). On the CPU
    these are wall-clock seconds. On CUDA they are GPU seconds between two CUDA events recorded on the current stream
    at each call's start and end, so nothing synchronises inside the forward; the elapsed times are summed when the
    block ends, after one synchronize. The parts split the forward: a call made inside another part's call (a module
    shared by two parts, e.g. Grounding DINO's heads, which older transformers also run inside the decoder) counts
    for the outer part only. Details are modules inside parts, timed on their own as well."""
    cuda = device is not None and device.type == "cuda"
    handles = []
    pending: list[tuple[str, Any, Any]] = []  # (part, start event, end event) on CUDA
    inside = [0]  # calls of split parts under way
    split = part_modules(model, parts)
    for part, modules in {**split, **part_modules(model, details or {})}.items():
        seconds.setdefault(part, 0.0)
        is_split = part in split
        for _, module in modules:
            started: list[Any] = []

            def pre(_module: nn.Module, _args: Any, started: list[Any] = started, is_split: bool = is_split) -> None:
                if is_split:
                    inside[0] += 1
                    if inside[0] > 1:  # inside another part's call: timed there
                        started.append(None)
                        return
                if cuda:
                    event = torch.cuda.Event(enable_timing=True)
                    event.record(torch.cuda.current_stream(device))
                    started.append(event)
                else:
                    started.append(time.perf_counter())

            def post(_module: nn.Module, _args: Any, _out: Any, part: str = part, started: list[Any] = started,
                     is_split: bool = is_split) -> None:
                if is_split:
                    inside[0] -= 1
                    if started[-1] is None:
                        started.pop()
                        return
                if cuda:
                    event = torch.cuda.Event(enable_timing=True)
                    event.record(torch.cuda.current_stream(device))
                    pending.append((part, started.pop(), event))
                else:
                    seconds[part] += time.perf_counter() - started.pop()

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    if pending:  # only after a forward that finished: after an error this would hide it
        torch.cuda.synchronize(device)
        for part, start, end in pending:
            seconds[part] += start.elapsed_time(end) / 1000


def time_parts(model: nn.Module, parts: dict[str, tuple[str, ...]], forward: Callable[[], object], repeats: int,
               details: dict[str, tuple[str, ...]] | None = None, device: torch.device | None = None) -> dict[str, float]:
    """Seconds per part and detail (plus OTHER) of forward(), each the fastest over `repeats` calls (a busy spell of
    a shared machine then spoils one call, not the result); 'total' is the sum over the parts and OTHER. On CUDA
    the parts are GPU seconds (`part_timers`) and the whole call is wall-clock between two synchronizes, so OTHER
    holds the ops outside the parts and any time the GPU waited for the host."""
    runs = []
    for _ in range(repeats):
        seconds: dict[str, float] = {}
        with part_timers(model, parts, seconds, device, details):
            total = timed(forward, 1, device)
        seconds[OTHER] = max(0.0, total - sum(seconds[p] for p in parts))
        runs.append(seconds)
    best = {part: min(run[part] for run in runs) for part in [*parts, OTHER]}
    best["total"] = sum(best.values())
    best |= {detail: min(run[detail] for run in runs) for detail in details or {}}
    return best


def timed(step: Callable[[], object], repeats: int, device: torch.device | None = None) -> float:
    """Fastest of `repeats` wall-clock seconds of step() (on CUDA between two synchronizes)."""
    cuda = device is not None and device.type == "cuda"
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def share_table(header: str, columns: list[str], costs: list[dict[str, float]], parts: list[str], scale: float,
                digits: int) -> list[str]:
    """Markdown table: one row per part, one 'value (share %)' column per cost, and a total row."""
    lines = [f"| {header} | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for part in [*parts, OTHER]:
        cells = [f"{c[part] / scale:.{digits}f} ({100 * c[part] / c['total']:.1f} %)" for c in costs]
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join(f"**{c['total'] / scale:.{digits}f}**" for c in costs) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short-sides", type=int, nargs="+", default=[800, 600, 480],
                        help="Grounding DINO input short sides (the paper preset: 800)")
    parser.add_argument("--long-side", type=int, default=1333, help="Grounding DINO input long-side cap")
    parser.add_argument("--nouns", type=int, nargs="+", default=[3, 6],
                        help=f"prompt sizes in nouns (at most {len(NOUNS)}); the detector split and the times use the last")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per short side and of SAM (each part's fastest kept)")
    parser.add_argument("--no-time", dest="time", action="store_false", help="count FLOPs only")
    parser.add_argument("--no-write", dest="write", action="store_false", help="do not record the result in benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    if max(args.nouns) > len(NOUNS) or min(args.nouns) < 1:
        parser.error(f"--nouns must be between 1 and {len(NOUNS)}")
    torch.set_num_threads(args.threads)

    from preprocess.config import PRESETS
    from preprocess.encoders import Grounder

    cfg = PRESETS["paper"].replace(random_init=True, random_size="paper", device="cpu", half=False, use_sam=True)
    grounder = Grounder.from_config(cfg, None, torch.device("cpu"))
    detector, sam, sam_processor = grounder.detector, grounder.sam, grounder.sam_image_processor
    assert sam is not None and sam_processor is not None
    frame = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (FRAME_HEIGHT, FRAME_WIDTH, 3), dtype=np.uint8))
    prompts = {n: grounder.prompt(list(NOUNS[:n])) for n in args.nouns}
    main_nouns = args.nouns[-1]

    def pixels(short_side: int) -> dict[str, torch.Tensor]:
        size = {"shortest_edge": short_side, "longest_edge": args.long_side}
        return dict(grounder.image_processor(images=[frame], size=size, input_data_format="channels_last", return_tensors="pt"))

    def detect(inputs: dict[str, torch.Tensor], nouns: int) -> Callable[[], object]:
        ids = torch.tensor([prompts[nouns].input_ids])
        return lambda: detector(pixel_values=inputs["pixel_values"], pixel_mask=inputs["pixel_mask"], input_ids=ids,
                                attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))

    shapes: dict[int, tuple[int, int]] = {}
    flops: dict[tuple[int, int], dict[str, float]] = {}  # (short side, nouns) -> part -> FLOPs
    seconds: dict[int, dict[str, float]] = {}
    preprocess_seconds: dict[int, float] = {}
    with torch.inference_mode():
        if args.time:  # first-call costs (allocator, kernels) out of the timed runs
            detect(pixels(min(args.short_sides)), main_nouns)()
        for side in args.short_sides:
            inputs = pixels(side)
            height, width = inputs["pixel_values"].shape[-2:]
            shapes[side] = (int(height), int(width))
            for nouns in args.nouns:
                flops[side, nouns] = count_flops(detector, DETECTOR_PARTS, detect(inputs, nouns), DETECTOR_DETAILS)
            if args.time:
                seconds[side] = time_parts(detector, DETECTOR_PARTS, detect(inputs, main_nouns), args.repeats,
                                           DETECTOR_DETAILS)
                preprocess_seconds[side] = timed(functools.partial(pixels, side), 3)
            print(f"short side {side}: input {shapes[side][0]} x {shapes[side][1]}, "
                  f"{flops[side, main_nouns]['total'] / 1e9:.1f} GFLOP" +
                  (f", {seconds[side]['total']:.2f} s" if args.time else ""), flush=True)

        sam_inputs = sam_processor(images=[frame], input_data_format="channels_last", return_tensors="pt")
        scale = (sam_inputs["reshaped_input_sizes"] / sam_inputs["original_sizes"]).float()[0]  # h, w
        rng = np.random.default_rng(1)
        corners = np.sort(rng.uniform(0, 1, (main_nouns, 2, 2)), axis=1)  # (K, [min, max], [x, y])
        boxes = torch.tensor(corners.reshape(main_nouns, 4), dtype=torch.float32)  # x0, y0, x1, y1
        boxes = boxes * torch.tensor([FRAME_WIDTH, FRAME_HEIGHT] * 2) * scale[[1, 0, 1, 0]]

        def segment() -> object:
            return sam(pixel_values=sam_inputs["pixel_values"], input_boxes=boxes[None], multimask_output=False)

        vision = sam.config.vision_config
        sam_split = sam_parts(vision.global_attn_indexes, vision.num_hidden_layers)
        sam_flops = count_flops(sam, sam_split, segment)
        sam_seconds = None
        if args.time:
            sam_seconds = time_parts(sam, sam_split, segment, args.repeats)
        sam_preprocess = timed(lambda: sam_processor(
            images=[frame], input_data_format="channels_last", return_tensors="pt"), 3) if args.time else None

    sides = args.short_sides
    columns = [f"{side} ({shapes[side][0]} x {shapes[side][1]})" for side in sides]
    detector_parts = list(DETECTOR_PARTS)
    lines = [
        f"- machine: {machine_name()}; torch {torch.__version__}, {args.threads} threads; float32, batch 1 (one frame)",
        f"- models: `random_configs(\"paper\")` (Grounding DINO Swin-T + bert-base, 900 queries, 6 + 6 layers; SAM "
        f"ViT-B), random weights; a {FRAME_WIDTH} x {FRAME_HEIGHT} frame resized by Grounding DINO's image processor "
        f"(long side capped at {args.long_side}) and by SAM's (1024, padded to 1024 x 1024)",
        "- FLOPs: `FlopCounterMode`, 2 per multiply-add of matrix products, convolutions and attention, plus the "
        "deformable attention's bilinear sampling (4 multiply-adds per sampled value); elementwise ops uncounted",
        "- prompts: " + ", ".join(f"{n} nouns = {len(prompts[n].input_ids)} tokens" for n in args.nouns) +
        " (the shipped vocabulary splits some words into more pieces than bert-base-uncased would)",
        "",
        f"Grounding DINO, GFLOP per frame (share of the frame's total), prompt of {main_nouns} nouns, by input short side:",
        "",
        *share_table("part", columns, [flops[side, main_nouns] for side in sides], detector_parts, 1e9, 2),
        "",
        "Text side (BERT + text projection) per frame, by prompt and short side: GFLOP and share of the frame's total:",
        "",
        "| prompt | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(sides),
    ]
    for nouns in args.nouns:
        cells = []
        for side in sides:
            cost = flops[side, nouns]
            text = sum(cost[p] for p in TEXT_PARTS)
            cells.append(f"{text / 1e9:.2f} of {cost['total'] / 1e9:.0f} ({100 * text / cost['total']:.2f} %)")
        lines.append(f"| {nouns} nouns ({len(prompts[nouns].input_ids)} tokens) | " + " | ".join(cells) + " |")
    lines += ["", "Inside those parts, GFLOP (share of the frame)" + (", CPU seconds (share of the forward)" if args.time else "")
              + ":", "", "| module | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(sides)]
    for detail in DETECTOR_DETAILS:
        cells = []
        for side in sides:
            cost = flops[side, main_nouns]
            cell = f"{cost[detail] / 1e9:.1f} ({100 * cost[detail] / cost['total']:.1f} %)"
            if args.time:
                cell += f", {seconds[side][detail]:.2f} s ({100 * seconds[side][detail] / seconds[side]['total']:.1f} %)"
            cells.append(cell)
        lines.append(f"| {detail} | " + " | ".join(cells) + " |")
    lines += ["", f"SAM ViT-B, one 1024 x 1024 image with {main_nouns} boxes, GFLOP (share):", "",
              *share_table("part", ["GFLOP"], [sam_flops], list(sam_split), 1e9, 2)]
    if args.time and sam_seconds is not None and sam_preprocess is not None:
        lines += ["", f"CPU seconds of one frame's forward per part ({args.threads} threads; each part's fastest of "
                  f"{args.repeats} forwards, the total their sum; a machine shared with other work, so roughly):", "",
                  *share_table("part", columns, [seconds[side] for side in sides], detector_parts, 1.0, 3),
                  "| detector GFLOP/s achieved | " +
                  " | ".join(f"{flops[side, main_nouns]['total'] / seconds[side]['total'] / 1e9:.1f}" for side in sides) + " |",
                  "| Grounding DINO image processor (resize + normalise; not in the total) | " +
                  " | ".join(f"{preprocess_seconds[side]:.3f}" for side in sides) + " |",
                  "", f"SAM, CPU seconds (share), fastest of {args.repeats}:", "",
                  *share_table("part", ["seconds"], [sam_seconds], list(sam_split), 1.0, 3),
                  f"| GFLOP/s achieved | {sam_flops['total'] / sam_seconds['total'] / 1e9:.1f} |",
                  f"| SAM image processor (resize + pad; not in the total) | {sam_preprocess:.3f} |"]
    frames_per_clip = round(cfg.fps * cfg.window_seconds)
    lines += ["", "Conclusion: " + conclusion({side: flops[side, main_nouns] for side in sides}, seconds, sam_flops,
                                              sam_seconds, main_nouns, frames_per_clip)]
    print("\n".join(lines))
    if args.write:
        write_section(TITLE, "\n".join(lines))
    return 0


def conclusion(flops: dict[int, dict[str, float]], seconds: dict[int, dict[str, float]], sam: dict[str, float],
               sam_seconds: dict[str, float] | None, nouns: int, frames_per_clip: int) -> str:
    """The sentences the numbers support: the text side's share and what once-per-clip saves, the dominant parts
    of the detector (at the largest short side), and SAM's split."""
    sides = sorted(flops, reverse=True)
    top, low = flops[sides[0]], flops[sides[-1]]

    def share(cost: dict[str, float], parts: Sequence[str]) -> float:
        return 100 * sum(cost[p] for p in parts) / cost["total"]

    text_gflop = sum(top[p] for p in TEXT_PARTS) / 1e9
    saved = text_gflop * (frames_per_clip - 1) / frames_per_clip
    shares = ", ".join(f"{share(flops[side], TEXT_PARTS):.2f} % at {side}" for side in sides)
    verdict = "not worth building for its FLOPs" if share(low, TEXT_PARTS) < 2 else "worth considering"
    timing = ""
    if seconds:
        time_shares = [share(seconds[side], TEXT_PARTS) for side in sides]
        timing = (f"; on the CPU it takes {', '.join(f'{t:.1f} %' for t in time_shares)} of the forward's time" +
                  (", more than its FLOP share (BERT's matrices of ~10-20 rows run less efficiently than the "
                   "image side's); a GPU run should check its time share there too" if min(time_shares) > 2 * share(low, TEXT_PARTS)
                   else ", in line with its FLOPs") + ".")
    ranked = sorted(DETECTOR_PARTS, key=lambda p: -top[p])[:4]
    encoder_share = share(top, [p for p in DETECTOR_PARTS if p.startswith("encoder:")])
    sam_encoder = share(sam, [p for p in sam if p.startswith(SAM_ENCODER)])
    deformable = next(iter(DETECTOR_DETAILS))
    if seconds and share(seconds[sides[0]], [deformable]) > 1.5 * share(top, [deformable]):
        timing += (f" The encoder's deformable attention is {share(top, [deformable]):.0f} % of the FLOPs at {sides[0]} "
                   f"but {share(seconds[sides[0]], [deformable]):.0f} % of the CPU time: its bilinear sampling "
                   "(grid_sample) is memory-bound work that FLOPs understate, so on the GPU whether the fused "
                   "deformable-attention kernel runs is worth timing.")
    sam_time = ""
    if sam_seconds is not None and seconds:
        sam_time = f", {sam_seconds['total'] / seconds[sides[0]]['total']:.1f} x its CPU time"
    return (
        f"the text side is {text_gflop:.2f} GFLOP per frame with a {nouns}-noun prompt ({shares} of the detector's "
        f"FLOPs); computing it once per clip of {frames_per_clip} frames would save {saved:.2f} GFLOP per frame, "
        f"{verdict}{timing}{'' if timing else '.'} At {sides[0]} the encoder's layers take {encoder_share:.0f} % of the detector's FLOPs; "
        f"the largest parts are " + ", ".join(f"{p} {share(top, [p]):.0f} %" for p in ranked) +
        f"; the image-side parts grow with the input's pixels ({top['total'] / 1e9:.0f} GFLOP at {sides[0]}, "
        f"{low['total'] / 1e9:.0f} at {sides[-1]}), so the input size and fp16 are the levers there. SAM is "
        f"{sam['total'] / 1e9:.0f} GFLOP per image ({sam['total'] / top['total']:.1f} x the detector's frame at "
        f"{sides[0]}{sam_time}), {sam_encoder:.1f} % of it in the image encoder" +
        (", so what saves SAM compute is sending it fewer images (sam_floor) or a smaller image encoder, not the "
         "prompt side." if sam_encoder >= 90 else ".")
    )


if __name__ == "__main__":
    raise SystemExit(main())
