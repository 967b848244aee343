#!/usr/bin/env bash
# The whole test suite on a fresh machine: install what it needs, then run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/install.sh
python3 -m pytest -q -p no:cacheprovider tests
