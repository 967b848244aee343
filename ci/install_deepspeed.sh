#!/usr/bin/env bash
# DeepSpeed 0.19.8 for the installed torch, on a fresh machine of this project's kind. Safe to
# run again. DS_BUILD_OPS=0 installs no prebuilt ops (~15 s); on CPU, DeepSpeed's communication
# backend JIT-compiles a shared-memory op the first time it starts (~75 s): it is compiled here,
# once, into ~/.cache/torch_extensions, so launches and tests start in seconds. A failed compile
# stops this script with the compiler's error.
set -euo pipefail
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python3 -c "import deepspeed; assert deepspeed.__version__ == '0.19.8'" 2>/dev/null; then
  DS_BUILD_OPS=0 python3 -m pip install -q "deepspeed==0.19.8"
fi
python3 - <<'PY'
from deepspeed.accelerator import get_accelerator
builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
if builder is not None:
    builder.load()  # compiles on the first run, loads from the cache afterwards
    print("deepspeed shm comm op ready:", builder.absolute_name())
PY
