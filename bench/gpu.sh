#!/usr/bin/env bash
# The GPU figures in one command, on a Linux machine with an NVIDIA GPU and Python 3.11:
#
#   bench/gpu.sh             writes into bench/results/:
#                              cuda_check.{md,json}          bitsandbytes NF4 on CUDA, end to end
#                              client_memory_cuda.{md,json}  the device table on the GPU
#                              server_memory_cuda.{md,json}  the server, default model and 1.3B
#                              ray_gpu.{md,json}             4 devices on one GPU (0.25 each)
#   bench/gpu.sh --dry-run   the same steps on the CPU, small (tiny model, 3 device rows, 2
#                            devices), into a scratch folder (FEDPEAT_BENCH_RESULTS, or a new
#                            temporary one): everything but the CUDA calls, as the tests run it
#
# Each step's figures name the machine they were taken on; a failed check exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."

dry=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry=1 ;;
    -h | --help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "bench/gpu.sh: unknown argument '$arg' (expected --dry-run)" >&2; exit 2 ;;
  esac
done

make -s deps  # the project's .venv from the pinned dependencies, as `make run` builds it
py=.venv/bin/python
# What the Makefile gives `make run` and `make bench`: Flower's state and the converted model
# inside the checkout, no hub access, no second venv at run time.
export FLWR_HOME="$PWD/.flwr" FEDPEAT_CACHE_DIR="${FEDPEAT_CACHE_DIR:-$PWD/.cache/fedpeat}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_DISABLE_UPDATE_CHECK=1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

step() { echo "[gpu.sh] $*" >&2; }

if [ "$dry" = 1 ]; then
  export FEDPEAT_BENCH_RESULTS="${FEDPEAT_BENCH_RESULTS:-$(mktemp -d)}"
  step "dry run on the CPU; results in $FEDPEAT_BENCH_RESULTS"
  step "1/4 bitsandbytes NF4"
  "$py" -m bench.cuda_check --device cpu --overrides "experiment=tiny"
  step "2/4 device memory and throughput"
  "$py" -m bench.client_memory --device cpu --overrides "experiment=tiny" --steps 1 \
    --only fed_ft,full_lora,keep0.5-4 --out client_memory_cuda
  step "3/4 server memory"
  "$py" -m bench.server_memory --device cpu --only default --overrides "experiment=tiny" \
    --out server_memory_cuda
  step "4/4 devices sharing the accelerator under Ray"
  "$py" -m bench.ray_gpu --device cpu --devices 2 --gpus-per-device 0
  exit 0
fi

if ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  "$py" -c "import torch; print(f'bench/gpu.sh: torch {torch.__version__} sees no CUDA device', \
    '(a CPU-only build, or no driver); on a CPU, --dry-run checks everything else')" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
step "1/4 bitsandbytes NF4 on CUDA"
"$py" -m bench.cuda_check --device cuda
step "2/4 device memory and throughput on the GPU"
"$py" -m bench.client_memory --device cuda
step "3/4 server memory on the GPU (default model and the 1.3B Llama)"
"$py" -m bench.server_memory --device cuda
step "4/4 four devices sharing one GPU under Ray"
"$py" -m bench.ray_gpu --device cuda --devices 4 --gpus-per-device 0.25
