# vta-sam: `make demo` sets everything up and runs the pipeline on the bundled synthetic set;
# `make test` runs the tests. Both work on a fresh machine (Python 3.11, Debian).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: help setup demo features weights verify train eval listen test test-slow lint bench clean

help:
	@echo "make setup      create .venv with the pinned packages (+ Debian's ffmpeg); every target below runs it first"
	@echo "make demo       set up, then run the whole pipeline (features, verify, train, eval) on the bundled synthetic demo set"
	@echo "make test       fast CPU tests (slow ones: make test-slow)"
	@echo "make features   stage one (ARGS='--csv ... --videos ... --out ... --preset paper')"
	@echo "make train      stage two (ARGS='--preset paper --shards ... --output ...'); run again to resume"
	@echo "make eval       generate audio for the test split and report FD / FAD / KL / AV-Align (ARGS='--preset paper ...'; --metrics all adds av-benchmark's)"
	@echo "make listen     blinded listening test (ARGS='runs/a/eval runs/b/eval'); report: ARGS='--report DB'"
	@echo "make weights    fetch real checkpoints into weights/ and weights/eval/, and nltk's tagger data (needs network access; lists what is missing)"
	@echo "make verify     check the demo shards against their schema"
	@echo "make lint       ruff + mypy"
	@echo "make bench      CPU benchmarks -> benchmarks/RESULTS.md"
	@echo "make clean      remove the demo's shards and run (data/shards/demo, runs/demo)"

$(STAMP): requirements.txt setup.cfg pyproject.toml Makefile
	@command -v ffmpeg >/dev/null || { echo "installing Debian's ffmpeg"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null) \
		|| echo "warning: could not install ffmpeg (needed by the tests' media generator and vta-sam generate)"; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
	@# the checkout as a path entry (editable_mode=compat), not setuptools' import hook: under the hook, a folder named
	@# like a package (shards/, train/, eval/) in the folder where `python -m ...` runs took that package's place
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=compat \
		2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
	touch $(STAMP)

setup: $(STAMP)

# the listening test's browser check drives Debian's chromium; it skips (saying why) where this cannot install
BROWSER := $(VENV)/.browser
$(BROWSER): | $(STAMP)
	@command -v chromedriver >/dev/null || { echo "installing Debian's chromium + chromium-driver (browser test)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
		|| echo "warning: could not install chromium; the browser test will be skipped"; }
	touch $(BROWSER)

demo: features verify train eval

data/demo/vggsound.csv: | $(STAMP)
	$(PY) -m preprocess.demo --out data/demo

features: $(STAMP) $(if $(ARGS),,data/demo/vggsound.csv)
	$(PY) -m preprocess $(ARGS)

verify: $(STAMP)
	$(PY) -m shards verify data/shards/demo

train: $(STAMP)
	$(PY) -m train $(ARGS)

eval: $(STAMP)
	$(PY) -m eval $(ARGS)

listen: $(STAMP)
	$(PY) -m eval.listen $(ARGS)

weights: $(STAMP)
	-$(PY) -m preprocess.weights fetch --out weights
	-$(PY) -m nltk.downloader -q averaged_perceptron_tagger_eng
	$(PY) -m eval.weights list --out weights/eval
	$(PY) -m eval.weights fetch --out weights/eval

test: $(STAMP) $(BROWSER)
	$(PY) -m pytest -q -m "not slow and not gpu"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy shards common audio_models preprocess train eval vta_sam

bench: $(STAMP)
	$(PY) -m benchmarks.features_cpu
	$(PY) -m benchmarks.audio_decode
	$(PY) -m benchmarks.train_throughput
	$(PY) -m benchmarks.data_streams
	$(PY) -m benchmarks.eval_speed

clean:
	rm -rf data/shards/demo runs/demo
