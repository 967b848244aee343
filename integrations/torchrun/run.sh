#!/usr/bin/env bash
# SENG under torchrun: NCCL when CUDA is available, Gloo on CPU (the training script picks
# Gloo here; on GPU nodes set the backend in your own script). Usage:
#   bash integrations/torchrun/run.sh [NPROC] [extra examples/train.py arguments]
# e.g.  bash integrations/torchrun/run.sh 2 --variant lagged --epochs 1
set -euo pipefail
cd "$(dirname "$0")/../.."
NPROC="${1:-2}"
shift || true
exec torchrun --standalone --nproc_per_node "$NPROC" examples/train.py "$@"
