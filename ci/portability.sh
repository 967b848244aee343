#!/usr/bin/env bash
# The single-process tests under other CPU kernels and thread counts: a machine with another
# instruction set, MKL or oneDNN build or core count rounds float32 otherwise, and a test that
# holds numbers to one machine's rounding fails there (issue 27). For a maintainer to run by
# hand before a release; ci/test.sh does not call it. The engine and multi-rank files
# (test_distributed, test_horovod, test_mpi, test_deepspeed, test_faults, test_examples) are
# left out: they launch ranks and engines, and test_distributed pins one thread on purpose.
#
# Takes 7-20 minutes on 2 cores: 9 pytest runs, one at a time, of 40 s to 2.5 min each (the
# longer when other work shares the CPU).
# Usage: bash ci/portability.sh [pytest args...]   (e.g. -x, or -k exact)
#
# Each variation's line says whether it changes a kernel on this CPU (a fingerprint of a few
# float32 products, a convolution, a softmax, randn and LAPACK factorizations, compared with the
# run as the machine is): on AMD, MKL_ENABLE_INSTRUCTIONS changes nothing (MKL takes its own
# path there) and ATEN_CPU_CAPABILITY=avx2 is the default on an AVX2 CPU; on an AVX-512 Intel
# CPU both change kernels.
# No -e: every variation runs after one fails; the exit status says whether any did.
set -uo pipefail
cd "$(dirname "$0")/.."

files=()
for f in tests/test_*.py; do
  case "$(basename "$f")" in
    test_distributed.py|test_horovod.py|test_mpi.py|test_deepspeed.py|test_faults.py|test_examples.py) ;;
    *) files+=("$f") ;;
  esac
done

variations=(
  ""                                 # as the machine is
  "ATEN_CPU_CAPABILITY=default"      # ATen's scalar kernels: elementwise, reductions, randn
  "ATEN_CPU_CAPABILITY=avx2"         # ATen's AVX2 kernels (another path on AVX-512 CPUs)
  "MKL_ENABLE_INSTRUCTIONS=AVX2"     # MKL's AVX2 GEMM and LAPACK on an Intel AVX-512 CPU
  "MKL_ENABLE_INSTRUCTIONS=SSE4_2"   # MKL's SSE4.2 ones
  "MKL_CBWR=COMPATIBLE"              # MKL's reproducible branch: other GEMM, eigh, QR (AMD too)
  "DNNL_MAX_CPU_ISA=SSE41"           # oneDNN's SSE4.1 convolutions
  "OMP_NUM_THREADS=1"                # one thread: other splits of parallel sums
  "ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE DNNL_MAX_CPU_ISA=SSE41 OMP_NUM_THREADS=1"
)

fingerprint='
import hashlib, torch
g = torch.Generator().manual_seed(0)
a, b = torch.randn(257, 129, generator=g), torch.randn(129, 65, generator=g)
x, w = torch.randn(8, 3, 16, 16, generator=g), torch.randn(4, 3, 3, 3, generator=g)
outs = [a @ b, a[:10, :30] @ a[:30, :10], torch.nn.functional.conv2d(x, w), a.softmax(1),
        a.sum(0), torch.linalg.eigh(a[:20] @ a[:20].T)[1], torch.linalg.qr(a[:, :10]).Q,
        torch.linalg.svd(a[:4, :28])[2], torch.randn(64, generator=g)]
print(hashlib.md5(b"".join(t.contiguous().numpy().tobytes() for t in outs)).hexdigest())'

base=$(python3 -c "$fingerprint")
summary=()
failed=0
for v in "${variations[@]}"; do
  name=${v:-"(as the machine is)"}
  # shellcheck disable=SC2086  # $v is a list of NAME=value words
  print=$(env $v python3 -c "$fingerprint")
  if [ -z "$v" ]; then changes="-"; elif [ "$print" = "$base" ]; then changes="no"; else changes="yes"; fi
  echo "== $name (changes kernels here: $changes)"
  start=$(date +%s)
  # shellcheck disable=SC2086
  out=$(env $v python3 -m pytest -q -p no:cacheprovider "${files[@]}" "$@" 2>&1)
  rc=$?
  took=$(( $(date +%s) - start ))
  tally=$(printf '%s\n' "$out" | tail -n 1)
  printf '%s\n' "$out" | grep -E '^(FAILED|ERROR) ' || true
  echo "$tally"
  [ "$rc" -eq 0 ] || failed=1
  summary+=("$(printf '%-40s kernels changed: %-3s %4ss  %s' "$name" "$changes" "$took" "$tally")")
done

echo
echo "== summary (torch $(python3 -c 'import torch; print(torch.__version__, torch.backends.cpu.get_cpu_capability())'))"
printf '%s\n' "${summary[@]}"
exit "$failed"
