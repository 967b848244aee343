#!/usr/bin/env bash
# `import seng_dist` needs only torch: in a venv holding torch (CPU build) and the package with
# the dependencies it declares, and no numpy, run 2 Gloo ranks through SENG
# (ci/torch_only_job.py). The venv is kept (SENG_TORCH_ONLY_VENV, default under ~/.cache) and
# reused while it holds torch 2.13.0 and no numpy; only the package is reinstalled each run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
venv="${SENG_TORCH_ONLY_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/seng-dist/torch-only-venv}"
py="$venv/bin/python"
# Read from the installed metadata: importing torch costs seconds.
torch_only='import importlib.metadata as md, importlib.util
assert md.version("torch").split("+")[0] == "2.13.0", "torch " + md.version("torch")
assert importlib.util.find_spec("numpy") is None, "numpy is installed"'
# The marker is written once torch installed completely (an interrupted install is redone).
if [ ! -f "$venv/torch-installed" ] || ! "$py" -c "$torch_only" 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  # No byte-compiling of torch's thousands of files at install (minutes on a busy machine):
  # the job compiles the few it imports, once, into the kept venv.
  "$py" -m pip install -q --no-compile torch==2.13.0
  touch "$venv/torch-installed"
fi
# Its own dependencies too: the package must not declare numpy (or pull it in) either.
# setuptools (the build backend) came with torch, so no isolated build env is fetched.
"$py" -m pip install -q --no-build-isolation -e .
"$py" -c "$torch_only"
timeout 300 "$py" -m torch.distributed.run --standalone --nproc_per_node 2 ci/torch_only_job.py
