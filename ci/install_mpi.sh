#!/usr/bin/env bash
# Open MPI (Debian) and mpi4py 4.1.2 (a prebuilt wheel on the system libmpi), plus iproute2 for
# the two-host network-namespace run. Safe to run again.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
if ! command -v mpirun >/dev/null || ! command -v mpicxx >/dev/null || ! command -v ip >/dev/null
then
  apt-get update -qq
  apt-get install -y -qq openmpi-bin libopenmpi-dev iproute2
fi
python3 -m pip install -q "mpi4py==4.1.2"
python3 -c "from mpi4py import MPI; print('mpi4py', MPI.Get_library_version().splitlines()[0])"
