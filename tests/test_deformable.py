"""The fused deformable attention kernel (`preprocess.deformable`) against transformers' PyTorch path.

The kernel runs here in Triton's interpreter, which must be switched on before triton is imported: the checks
that run it go to one child process started with TRITON_INTERPRET=1 (CHECKS below) and report back in JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from preprocess import deformable  # noqa: E402
from preprocess.config import PRESETS  # noqa: E402
from preprocess.encoders import Grounder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

CHECKS = r'''
import json
import numpy as np
import torch
from transformers.models.grounding_dino.modeling_grounding_dino import MultiScaleDeformableAttention

from preprocess import deformable
from preprocess.config import PRESETS
from preprocess.encoders import Grounder
from tests.test_sam_floor import _frames

assert deformable.INTERPRETED
report = {}
torch.manual_seed(0)
reference = MultiScaleDeformableAttention()

# levels of odd sizes, a head size that is no power of two, a query count no multiple of the block, locations
# beyond the map on every side (zero padding), a sampling point exactly on the map's corners
shapes = torch.tensor([[7, 9], [4, 5], [2, 3], [1, 1]])
starts = torch.cat([torch.zeros(1, dtype=torch.long), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
batch, heads, head_dim, points, queries = 2, 3, 12, 2, 70
levels, tokens = len(shapes), int((shapes[:, 0] * shapes[:, 1]).sum())
value = torch.randn(batch, tokens, heads, head_dim)
locations = torch.rand(batch, queries, heads, levels, points, 2) * 1.6 - 0.3
locations[0, 0, 0, :, 0] = torch.tensor([0.0, 0.0])
locations[0, 0, 0, :, 1] = torch.tensor([1.0, 1.0])
weights = torch.softmax(torch.randn(batch, queries, heads, levels * points), -1).view(batch, queries, heads, levels, points)
args = (value, shapes, [tuple(s) for s in shapes.tolist()], starts, locations, weights, 64)
truth = reference(*args)
fused = deformable.fused_deformable_attention(value, shapes, starts, locations, weights)
report["float32"] = {"shape": list(fused.shape), "truth_shape": list(truth.shape),
                     "max_difference": (fused - truth).abs().max().item(), "scale": truth.abs().max().item()}
half = [t.half() if t.is_floating_point() else t for t in (value, locations, weights)]
fused_half = deformable.fused_deformable_attention(half[0], shapes, starts, half[1], half[2])
# the PyTorch path in float32 on the same float16-rounded inputs, with the grid 2 x - 1 rounded to float16 as the
# kernel (and the PyTorch path in float16) rounds it: then only the sums and the output's rounding differ
rounded = [t.float() for t in half]
grid = (2 * half[1] - 1).float()  # float16 arithmetic, exact in float32
truth_rounded = reference(rounded[0], *args[1:4], (grid + 1) / 2, rounded[2], 64)
report["float16"] = {"dtype": str(fused_half.dtype),
                     "max_difference": (fused_half.float() - truth_rounded).abs().max().item()}
empty = deformable.fused_deformable_attention(value[:, :0], shapes[:0], starts[:0], locations[:, :0, :, :0],
                                              weights[:, :0, :, :0])
report["empty_shape"] = list(empty.shape)
for dtype in (torch.float32, torch.float16):  # raises if the start-up check disagrees
    deformable.check_kernel(torch.device("cpu"), dtype, [(3, 12, 4, 2), (8, 32, 4, 4)])
report["start_up_check"] = "passed"

# the swapped module: the kernel, except where a gradient is wanted
sampling = deformable.FusedDeformableSampling(reference)
wanted = value.clone().requires_grad_(True)
with torch.enable_grad():
    graded = sampling(wanted, *args[1:])
report["grad_path_equal"] = bool(torch.equal(graded.detach(), truth)) and graded.requires_grad

# the tiny Grounding DINO end to end: the same detections either way
clips, nouns = [_frames(3, 48, 64, seed=1), _frames(3, 48, 64, seed=2)], [["dog", "guitar player"], ["car"]]
cfg = PRESETS["tiny"].replace(sam_floor=0.0)
runs = {}
for way in ("pytorch", "triton"):
    grounder = Grounder.from_config(cfg.replace(deformable_attention=way), None, torch.device("cpu"))
    runs[way] = grounder.detections(clips, nouns)
    report[f"{way}_fused_modules"] = sum(isinstance(m, deformable.FusedDeformableSampling)
                                         for m in grounder.detector.modules())
report["layers"] = cfg_layers = (grounder.detector.config.encoder_layers, grounder.detector.config.decoder_layers)
report["detector_difference"] = max((a.detector - b.detector).abs().max().item()
                                    for a, b in zip(runs["pytorch"], runs["triton"]))
report["iou_difference"] = max((a.iou - b.iou).abs().max().item() for a, b in zip(runs["pytorch"], runs["triton"]))
report["detector_spread"] = max(a.detector.max().item() - a.detector.min().item() for a in runs["pytorch"])
print("REPORT " + json.dumps(report))
'''


@pytest.fixture(scope="module")
def interpreted() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", CHECKS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("REPORT "))


def test_kernel_equals_the_grid_sample_path(interpreted):
    f32 = interpreted["float32"]
    assert f32["shape"] == f32["truth_shape"] == [2, 70, 36]
    assert f32["scale"] > 0.5 and f32["max_difference"] < 1e-5
    # float16 inputs: float32 sums, so one rounding of the output (float16's step is 1e-3 at 1 to 2) away from
    # the float32 path on the same rounded inputs
    assert interpreted["float16"]["dtype"] == "torch.float16"
    assert interpreted["float16"]["max_difference"] < 1e-3
    assert interpreted["empty_shape"] == [2, 0, 36]


def test_gradients_take_the_pytorch_path(interpreted):
    assert interpreted["grad_path_equal"] is True


def test_start_up_check_passes_where_the_kernel_runs_and_fails_in_one_line_elsewhere(interpreted, monkeypatch):
    assert interpreted["start_up_check"] == "passed"
    if not deformable.INTERPRETED and not torch.cuda.is_available():  # the compiled kernel cannot take CPU tensors
        with pytest.raises(deformable.KernelError, match="does not run on cpu") as error:
            deformable.check_kernel(torch.device("cpu"), torch.float32)
        assert "\n" not in str(error.value)
    # a kernel that computes something else is caught before any frame is grounded
    monkeypatch.setattr(deformable, "fused_deformable_attention",
                        lambda value, *args: torch.zeros(value.shape[0], 9, value.shape[2] * value.shape[3]))
    with pytest.raises(deformable.KernelError, match="differs from the PyTorch path by"):
        deformable.check_kernel(torch.device("cpu"), torch.float32)


def test_grounding_dino_detects_the_same_with_the_kernel(interpreted):
    encoder_layers, decoder_layers = interpreted["layers"]
    # every deformable layer is swapped: the encoder's self-attention and the decoder's cross-attention
    assert interpreted["triton_fused_modules"] == encoder_layers + decoder_layers
    assert interpreted["pytorch_fused_modules"] == 0
    assert interpreted["detector_spread"] > 0  # the scores vary, so equal scores say something
    assert interpreted["detector_difference"] < 1e-5 and interpreted["iou_difference"] < 1e-5


def test_off_cuda_the_swapped_module_is_the_pytorch_path():
    from transformers.models.grounding_dino.modeling_grounding_dino import MultiScaleDeformableAttention

    shapes = torch.tensor([[3, 4], [2, 2]])
    starts = torch.tensor([0, 12])
    value = torch.randn(1, 16, 2, 8)
    locations = torch.rand(1, 5, 2, 2, 3, 2)
    weights = torch.softmax(torch.randn(1, 5, 2, 6), -1).view(1, 5, 2, 2, 3)
    args = (value, shapes, [(3, 4), (2, 2)], starts, locations, weights, 64)
    reference = MultiScaleDeformableAttention()
    if not deformable.INTERPRETED:
        assert torch.equal(deformable.FusedDeformableSampling(reference)(*args), reference(*args))


def test_triton_without_cuda_is_refused_in_one_line():
    if deformable.INTERPRETED or torch.cuda.is_available():
        pytest.skip("this process can run the kernel")
    with pytest.raises(deformable.KernelError, match="deformable_attention 'triton' needs a CUDA device") as error:
        Grounder.from_config(PRESETS["tiny"].replace(deformable_attention="triton"), None, torch.device("cpu"))
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="deformable_attention"):
        PRESETS["tiny"].replace(deformable_attention="cuda")


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_kernel_compiles_for_sm90_without_spilling_registers(dtype, tmp_path):
    """Compiled (not interpreted) for an H100/H200 (sm_90) on this CPU, at the paper detector's layout: Triton's
    front end and ptxas accept it, and it keeps its working set in registers (with every loop unrolled it had
    spilled: 255 registers and ~2 KB of local memory per thread at float16)."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if deformable.INTERPRETED:
        pytest.skip("this process interprets the kernel")
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.is_file():
        pytest.skip("triton without its bundled ptxas")
    pointers = {name: f"*{dtype}" for name in ("value_ptr", "locations_ptr", "weights_ptr", "out_ptr")}
    signature = {**pointers, "shapes_ptr": "*i64", "starts_ptr": "*i64", "num_queries": "i32", "num_tokens": "i32",
                 **{name: "constexpr" for name in ("HEADS", "HEAD_DIM", "LEVELS", "POINTS", "BLOCK_Q", "BLOCK_D")}}
    constants = {"HEADS": 8, "HEAD_DIM": 32, "LEVELS": 4, "POINTS": 4, "BLOCK_Q": deformable.BLOCK_QUERIES, "BLOCK_D": 32}
    # at a launch Triton specializes on pointers that are 16-byte aligned, as torch's allocations are
    aligned = {(index,): [["tt.divisibility", 16]] for index in range(6)}  # the six tensors
    source = ASTSource(fn=deformable._deformable_kernel, signature=signature, constexprs=constants, attrs=aligned)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": deformable.NUM_WARPS})
    ptx = tmp_path / "kernel.ptx"
    ptx.write_text(kernel.asm["ptx"])
    report = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(ptx), "-o", str(tmp_path / "kernel.cubin")],
                            capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report.stderr)]
    registers = [int(n) for n in re.findall(r"Used (\d+) registers", report.stderr)]
    assert spills and not any(spills), report.stderr
    assert registers and max(registers) < 255, report.stderr  # 255 is the cap, where ptxas starts to spill


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_compiled_kernel_on_cuda_equals_the_pytorch_path(dtype):
    """The compiled kernel (not the interpreter) at the paper detector's layout: 8 heads of 32 channels, 4 levels
    of 4 points, a 400 x 667 input's feature maps, every map position a query (the encoder's self-attention)."""
    from transformers.models.grounding_dino.modeling_grounding_dino import MultiScaleDeformableAttention

    device = torch.device("cuda")
    shapes = torch.tensor([[50, 84], [25, 42], [13, 21], [7, 11]], device=device)
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    tokens = int((shapes[:, 0] * shapes[:, 1]).sum())
    generator = torch.Generator(device=device).manual_seed(0)
    value = torch.randn(3, tokens, 8, 32, device=device, generator=generator)
    locations = torch.rand(3, tokens, 8, 4, 4, 2, device=device, generator=generator) * 1.2 - 0.1
    weights = torch.softmax(torch.randn(3, tokens, 8, 16, device=device, generator=generator), -1).view(3, tokens, 8, 4, 4)
    value, locations, weights = value.to(dtype), locations.to(dtype), weights.to(dtype)  # the same inputs to both
    truth = MultiScaleDeformableAttention()(value, shapes, [tuple(s) for s in shapes.tolist()], starts, locations, weights, 64)
    got = deformable.fused_deformable_attention(value, shapes, starts, locations, weights)
    assert got.dtype == dtype and got.shape == truth.shape
    assert (got.float() - truth.float()).abs().max().item() < (1e-4 if dtype == torch.float32 else 1e-2)
