#!/usr/bin/env bash
# The training frameworks the integration tests drive: HuggingFace transformers and accelerate,
# PyTorch Lightning, at pinned versions. torch is pinned in the same pip command: some of their
# optional dependencies would otherwise pull a newer, CUDA-only torch over the CPU build.
# torchvision and timm stay out: no torchvision wheel loads against the CPU torch 2.13 build
# here, and with it installed transformers' BERT import breaks too. Safe to run again (~30 s
# on a fresh machine, a no-op once installed).
set -euo pipefail
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python3 - 2>/dev/null <<'PY'
import accelerate, pytorch_lightning, transformers
assert transformers.__version__ == "5.25.0", transformers.__version__
assert accelerate.__version__ == "1.16.0", accelerate.__version__
assert pytorch_lightning.__version__ == "2.6.6", pytorch_lightning.__version__
PY
then
  python3 -m pip install -q torch==2.13.0 transformers==5.25.0 accelerate==1.16.0 \
    pytorch-lightning==2.6.6
fi
python3 -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
