# The README's two commands: `make run` (default experiment under `flwr run`) and `make test`.
# Each bootstraps its own .venv from pinned dependencies; nothing relies on a hand install.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Project-local Flower home: federations, SuperLink state and logs stay inside the checkout.
export FLWR_HOME := $(CURDIR)/.flwr
# Never let `flwr run` create a second venv at run time: the app runs in ours.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_DISABLE_UPDATE_CHECK := 1
# Converted model weights (GGUF -> safetensors) are cached here once.
export FEDPEAT_CACHE_DIR ?= $(CURDIR)/.cache/fedpeat
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# Byte-compile on first import instead of at install: pip would compile every file of torch,
# ray and transformers (most never imported here), a good part of a fresh install's time.
export PIP_NO_COMPILE := 1

DEVICES ?= 6
OVERRIDES ?=
ARGS ?=
SWEEP ?= controller=fixed,random,greedy,oort,ppo
# Overrides reach the tools through the environment ("$$OVERRIDES"), never pasted into the
# recipe's shell line: a value with spaces and quotes arrives exactly as typed, e.g.
#   make run OVERRIDES="\"data.prompt_template='Q: {prompt} A: '\""
export OVERRIDES SWEEP

.PHONY: run test lint bench bench-gpu bench-formats deps clean-runs sweep pretrain deploy certs

$(BIN)/.deps: pyproject.toml requirements.lock
	@test -n "$(PYTHON)" || { echo "python3.11 not found"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q -c requirements.lock -e .
	$(BIN)/python -m pip install -q --no-deps $$($(BIN)/python -c \
	  "import tomllib;print(' '.join(tomllib.load(open('pyproject.toml','rb'))['tool']['fedpeat']['embedded']))")
	@touch $@

$(BIN)/.test-deps: $(BIN)/.deps
	$(BIN)/python -m pip install -q -c requirements.lock -e ".[test]"
	@touch $@

deps: $(BIN)/.deps

run: $(BIN)/.deps
	$(BIN)/python -m fedpeat.cli.launch --devices $(DEVICES) --overrides "$$OVERRIDES" $(ARGS)

# The same app as a real deployment on loopback: a SuperLink and NODES SuperNodes, e.g.
#   make deploy NODES=2 OVERRIDES="experiment=tiny" ARGS="--secure --node-config memory-mb=900"
NODES ?= 2
deploy: $(BIN)/.deps
	$(BIN)/python -m fedpeat.cli.deploy --nodes $(NODES) --overrides "$$OVERRIDES" $(ARGS)

# TLS certificates and SuperNode keys for a real deployment (see the README's Deployment).
HOST ?= 127.0.0.1
certs: $(BIN)/.deps
	$(BIN)/python -m fedpeat.cli.certs --host $(HOST) --nodes $(NODES) --out keys

# A Hydra sweep of runs ending in one comparison table and plot (runs/sweep-*/).
sweep: $(BIN)/.deps
	$(BIN)/python -m fedpeat.cli.sweep --devices $(DEVICES) --overrides "$$SWEEP $$OVERRIDES"

# Pre-train the PPO controller on the edge-system environment, then compare the controllers.
pretrain: $(BIN)/.deps
	$(BIN)/python -m strategies.control pretrain --overrides "$$OVERRIDES"
	$(BIN)/python -m strategies.control compare --overrides "$$OVERRIDES"

test: $(BIN)/.test-deps
	$(BIN)/python -m pytest $(ARGS)

lint: $(BIN)/.test-deps
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy && $(BIN)/lint-imports

bench: $(BIN)/.deps
	$(BIN)/python -m bench $(ARGS)

# The GPU figures (bench/gpu.sh: NF4 on CUDA, the device and server tables on the GPU, Ray GPU
# fractions); `make bench-gpu ARGS=--dry-run` runs the same steps small on a CPU.
bench-gpu: $(BIN)/.deps
	bash bench/gpu.sh $(ARGS)

# Weight formats for a device's frozen weights on a CPU (bitsandbytes against torchao). torchao
# goes into a folder of its own, not .venv: PEFT imports torchao whenever it is installed, which
# would add to every device process's memory.
TORCHAO := torchao==0.18.0
bench-formats: $(BIN)/.deps
	$(BIN)/python -m pip install -q --no-deps --upgrade --target .cache/torchao $(TORCHAO)
	PYTHONPATH=.cache/torchao $(BIN)/python -m bench.weight_formats $(ARGS)

clean-runs:
	rm -rf runs
