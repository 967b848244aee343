#!/usr/bin/env bash
# Horovod 0.28.1 for the installed torch, with Gloo and MPI controllers, on a fresh machine of
# this project's kind. Safe to run again: the built wheel is cached (keyed on the Python, torch
# and Horovod versions) so a second run installs in seconds. Needs torch installed first.
#
# Horovod 0.28.1 (its last release) does not build as published against torch 2.x: pip's build
# isolation hides torch from cmake (so: --no-build-isolation), and torch 2.x headers need
# C++17 where the sdist asks for C++14 in BOTH CMakeLists.txt and horovod/torch/CMakeLists.txt
# (patching only the torch one fails at link time). A failed build stops this script with the
# build's own error.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
HVD=0.28.1
PY=$(python3 -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
TORCH=$(python3 -c 'import torch; print(torch.__version__)')
CACHE="${SENG_WHEEL_CACHE:-$HOME/.cache/seng-dist/wheels}/horovod-$HVD-$PY-torch$TORCH"

if python3 -c "import horovod, horovod.torch as h; assert horovod.__version__ == '$HVD'" \
    2>/dev/null; then
  echo "horovod $HVD already installed and loads against torch $TORCH"
  exit 0
fi

# MPI for the MPI controller and mpirun launches (Gloo needs nothing from apt).
if ! command -v mpirun >/dev/null || ! command -v mpicxx >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq openmpi-bin libopenmpi-dev
fi
python3 -m pip install -q cloudpickle psutil pyyaml cffi packaging

if ! ls "$CACHE"/horovod-*.whl >/dev/null 2>&1; then
  SRC=$(mktemp -d)
  trap 'rm -rf "$SRC"' EXIT
  python3 -m pip download -q --no-deps --no-binary :all: "horovod==$HVD" -d "$SRC"
  tar xzf "$SRC/horovod-$HVD.tar.gz" -C "$SRC"
  for f in "$SRC/horovod-$HVD/CMakeLists.txt" "$SRC/horovod-$HVD/horovod/torch/CMakeLists.txt"; do
    grep -q 'set(CMAKE_CXX_STANDARD 14)' "$f" || {
      echo "install_horovod.sh: $f has no 'set(CMAKE_CXX_STANDARD 14)': the sdist changed," \
           "check the C++17 patch by hand" >&2
      exit 1
    }
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$f"
  done
  mkdir -p "$CACHE"
  echo "building horovod $HVD against torch $TORCH (4-6 min on 2 cores)"
  HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
    HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 HOROVOD_CPU_OPERATIONS=gloo \
    MAKEFLAGS="-j$(nproc)" \
    python3 -m pip wheel --no-build-isolation --no-deps --no-cache-dir -w "$CACHE" \
    "$SRC/horovod-$HVD"
fi
python3 -m pip install -q --no-deps --force-reinstall "$CACHE"/horovod-*.whl
horovodrun --check-build
