#!/usr/bin/env bash
# SENG under mpirun with the mpi4py engine.
#   bash integrations/mpi/run.sh NP [HOSTFILE|-] [examples/train.py arguments]
# e.g. bash integrations/mpi/run.sh 2 - --variant lagged          (this machine)
#      bash integrations/mpi/run.sh 8 integrations/mpi/hostfile.example --epochs 5
set -euo pipefail
cd "$(dirname "$0")/../.."
NP="${1:-2}"; HOSTFILE="${2:--}"
shift $(( $# < 2 ? $# : 2 ))
HOSTS=()
[ "$HOSTFILE" != "-" ] && HOSTS=(--hostfile "$HOSTFILE")
# Root (containers, CI) and more ranks than cores (small machines) need these two settings.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1
exec mpirun -np "$NP" "${HOSTS[@]}" -x PATH -x PYTHONPATH \
  python3 examples/train.py --engine mpi "$@"
