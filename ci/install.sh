#!/usr/bin/env bash
# Set up a fresh machine of the project's kind (Debian, Python 3.11, CPU only) for seng-dist:
# the Fashion-MNIST data and the Python documentation's sources (the language-model example's
# text) from Debian, the CPU build of torch (pinned: an unpinned torch pulls a multi-GB CUDA
# build), and the package with its dev extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] \
    || [ ! -d /usr/share/doc/python3.11/html/_sources ]; then
  apt-get update -qq
  apt-get install -y -qq dataset-fashion-mnist python3.11-doc
fi
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[dev]"
python3 -c "import torch, seng_dist; print('torch', torch.__version__, '| seng_dist', seng_dist.__version__)"
