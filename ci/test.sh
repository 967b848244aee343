#!/usr/bin/env bash
# The whole test suite on a fresh machine: install what it needs (the package, then the engines
# the tests launch), run the lint, format and type gate (ruff check, ruff format --check, mypy
# on the package and on the tests; zero findings), a 2-rank job in a venv holding only torch
# and the package, then pytest.
# With SENG_REQUIRE_ENGINES=1 an engine test fails instead of skipping when its engine is
# missing, so a broken install cannot pass quietly.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/install.sh
python3 -m ruff check .
python3 -m ruff format --check .
python3 -m mypy
python3 -m mypy tests
bash ci/torch_only.sh
bash ci/install_horovod.sh
bash ci/install_deepspeed.sh
bash ci/install_mpi.sh
bash ci/install_frameworks.sh
SENG_REQUIRE_ENGINES=1 python3 -m pytest -q -p no:cacheprovider tests
