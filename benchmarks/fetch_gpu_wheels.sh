#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels that an offline GPU node lacks, into .whl/ (git-ignored).
#
# The GPU image this was made for has Python 3.12, torch 2.11, torchvision 0.26, transformers 5.17, accelerate
# 1.15, einops, safetensors, h5py, opencv-headless, scipy, scikit-learn, numba, timm, Pillow, pyyaml, requests...
# but not the packages below, and it cannot reach any registry. So they travel with the repository as wheels
# and benchmarks/gpu.sh installs them with --no-index --no-deps.
# The wheels: CPython 3.12, manylinux x86_64, --no-deps, each dependency named (one version each: two versions
# of one package stop the whole install). The versions are the ones this project tests with on the CPU
# (requirements.txt / the project venv). Edit --python-version and the platforms below for another image.
#
#   bash benchmarks/fetch_gpu_wheels.sh            # uses .venv/bin/python's pip, or python3's
#
# Why each one: diffusers (VAE, UNet, schedulers) needs importlib_metadata; open_clip_torch (CLIP) needs ftfy ->
# wcwidth; webdataset (shards) needs braceexpand; decord (default video/audio decoder); av (PyAV: decoding
# fallback, the demo-clip writer); textblob (offline noun tagger) needs nltk -> defusedxml; librosa (mel front end)
# needs soundfile -> cffi -> pycparser, soxr, audioread, decorator, pooch -> platformdirs; pytest (the GPU tests,
# `gpu.sh --gpu-tests`) needs pluggy, iniconfig, pygments and packaging.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

WHEELS=(
  diffusers==0.42.1 importlib_metadata==10.2.0
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
  webdataset==1.0.2 braceexpand==0.1.7
  decord==0.6.0 av==18.1.0
  textblob==0.20.1 nltk==3.10.4 defusedxml==0.7.1
  librosa==0.11.0 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 soxr==1.1.0 audioread==3.1.0 decorator==5.3.1
  pooch==1.9.0 platformdirs==4.14.8
  pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0 packaging==26.4
)

grep -qx '/.whl/' .git/info/exclude 2>/dev/null || grep -qx '/.whl/' .gitignore || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${WHEELS[@]}"

# one version per package: a wheel left from an earlier pin would make pip refuse the whole install
python3 - <<'EOF'
import collections, pathlib, re, sys
names = collections.Counter(re.split(r"-\d", p.name, 1)[0].lower().replace("_", "-") for p in pathlib.Path(".whl").glob("*.whl"))
twice = [n for n, c in names.items() if c > 1]
if twice:
    sys.exit(f".whl: more than one version of {', '.join(twice)}; delete the stale wheels")
EOF
du -sh .whl
ls .whl
