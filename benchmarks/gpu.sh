#!/usr/bin/env bash
# One-call GPU benchmark of the three stages (benchmarks/gpu_bench.py), made for a GPU node without network access.
#
# On a GPU node whose Python has torch, torchvision, transformers and accelerate but not the rest:
#   1. on a machine with PyPI:  bash benchmarks/fetch_gpu_wheels.sh   # the missing wheels -> .whl/ (~65 MB, git-ignored)
#   2. copy the repository with .whl/ to the GPU node and run there:
#        OUT=/some/folder bash benchmarks/gpu.sh
#      then, as a second run, a torch.compile comparison (minutes of compilation each; a section still takes its
#      headline numbers first, and a comparison that would not fit in its section's share of the budget is skipped,
#      so name one section per run), e.g. the 300-step protocol compiled at evaluation's batch:
#        OUT=/some/folder bash benchmarks/gpu.sh --sections generation --compile --changes torch_compile_evaluation_batch
#      or training compiled (default mode), or the grounding step compiled (--clips 4: fewer headline clips):
#        OUT=/some/folder bash benchmarks/gpu.sh --sections training --compile --changes torch_compile
#        OUT=/some/folder bash benchmarks/gpu.sh --sections stage_one --compile --clips 4 --changes torch_compile
#      or every comparison of training and generation, max-autotune and reduce-overhead included (a longer budget):
#        OUT=/some/folder bash benchmarks/gpu.sh --sections training generation --compile
#   3. results in $OUT: gpu_bench.json (every number), gpu_bench.md (summary), gpu_bench.log, nvidia-smi.txt;
#      copy them into benchmarks/results/ and record the summary with benchmarks.results.write_section.
#      The CUDA-only tests (the fused deformable attention kernel compiled, CUDA-graph sampling):
#        OUT=/some/folder bash benchmarks/gpu.sh --gpu-tests            # -> gpu_tests.txt, about a minute
# It needs at most ~8 minutes: the pip install (~20 s), then gpu_bench.py with a 420 s budget for its sections,
# under a hard `timeout` of 470 s (whatever was measured by then is in the JSON: it is rewritten at each log line,
# a section cut off in the middle marked "running"). Each section's share of the budget is taken from what is left
# when it starts, so one that overruns shortens the next.
#
# Elsewhere:
#   bash benchmarks/gpu.sh --cpu      # the same script on the CPU with the tiny models (~2-3 min; the slow test)
#   bash benchmarks/gpu.sh [ARGS]     # on a GPU machine with the packages installed; ARGS go to gpu_bench.py
# Results go to $OUT when set, else benchmarks/gpu_results/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-benchmarks/gpu_results}
mkdir -p "$OUT_DIR"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${OUT:-}" ] && PYTHON=.venv/bin/python  # the project venv where there is one

if [ "${1:-}" = "--cpu" ]; then
  shift
  exec "$PYTHON" -m benchmarks.gpu_bench --preset tiny --device cpu --out "$OUT_DIR" "$@"
fi

# The GPU image lacks diffusers, open_clip, webdataset, decord, av, librosa...: install the carried wheels
# (--no-deps: fetch_gpu_wheels.sh names every missing dependency) into /tmp/site, ahead of site-packages.
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu.sh: installing .whl/*.whl failed" | tee "$OUT_DIR/gpu_bench.log"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
command -v nvidia-smi >/dev/null && nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if [ "${1:-}" = "--gpu-tests" ]; then  # the CUDA-only tests (pytest -m gpu), about a minute
  shift
  timeout 300 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests/test_deformable.py tests/test_sam_attention.py \
    tests/test_sampling_speed.py "$@" \
    2>&1 | tee "$OUT_DIR/gpu_tests.txt"
  exit "${PIPESTATUS[0]}"
fi
timeout 470 "$PYTHON" -m benchmarks.gpu_bench --preset paper --out "$OUT_DIR" "$@"
status=$?
[ $status -eq 124 ] && echo "gpu.sh: stopped at the 470 s limit; $OUT_DIR/gpu_bench.json holds what was measured by then"
exit $status
