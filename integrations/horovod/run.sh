#!/usr/bin/env bash
# SENG under Horovod. Usage: bash integrations/horovod/run.sh gloo|mpi|mpirun [NP] [args...]
# e.g. bash integrations/horovod/run.sh gloo 2 --variant lagged
set -euo pipefail
cd "$(dirname "$0")/../.."
MODE="${1:-gloo}"; NP="${2:-2}"
shift $(( $# < 2 ? $# : 2 ))
case "$MODE" in
  gloo|mpi) exec horovodrun -np "$NP" -H "localhost:$NP" "--$MODE" \
              python3 examples/train.py --engine horovod "$@" ;;
  mpirun) OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
            exec mpirun -np "$NP" --oversubscribe python3 examples/train.py --engine horovod "$@" ;;
  *) echo "usage: $0 gloo|mpi|mpirun [NP] [train.py arguments]" >&2; exit 2 ;;
esac
