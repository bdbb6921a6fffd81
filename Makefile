# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo

.PHONY: install test demo bench bench-gpu clean

install: $(STAMP)

# torch is pinned first: on a machine without a GPU 2.13.0 is the CPU wheel, while an
# unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found: install Python 3.11 or run 'make PYTHON=python3 ...'"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# `make demo` scores the shipped models; `make demo TRAIN=1` trains every model itself.
demo: $(STAMP)
	$(VENV)/bin/microctsynth demo --out $(DEMO_OUT) $(if $(TRAIN),--train)

bench: $(STAMP)
	$(PY) benchmarks/bench_train.py --compare-bf16
	$(PY) benchmarks/bench_synthesis.py

# On a machine with a CUDA GPU: seconds per training iteration of the paper preset in fp32 and
# bf16 (autocast), then synthesis throughput against MONAI's sliding_window_inference.
bench-gpu: $(STAMP)
	$(PY) benchmarks/bench_train.py --preset paper --device cuda
	$(PY) benchmarks/bench_train.py --preset paper --device cuda --amp
	$(PY) benchmarks/bench_synthesis.py --preset quick,paper --device cuda --no-agreement --no-roi

clean:
	rm -rf $(VENV) .pytest_cache
