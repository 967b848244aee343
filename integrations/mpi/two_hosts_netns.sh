#!/usr/bin/env bash
# A real two-host MPI run on one machine: two network namespaces ("hosts" 10.77.0.1 and
# 10.77.0.2) joined by a veth pair, and `mpirun` in the first starting one rank in each. Open
# MPI's launcher reaches the second host through an rsh agent that enters its namespace (where a
# cluster uses ssh); all MPI traffic (out-of-band and data) is TCP over the veth pair only
# (`*_if_include 10.77.0.0/24`): nothing leaves the two namespaces. Needs root (ip netns).
#
#   bash integrations/mpi/two_hosts_netns.sh [examples/train.py arguments]
# e.g. bash integrations/mpi/two_hosts_netns.sh --variant lagged --train-limit 6400
set -euo pipefail
# A failing step names itself (some, as ip's, can fail without a word).
trap 'echo "two_hosts_netns.sh: line $LINENO failed (exit $?): $BASH_COMMAND" >&2' ERR
cd "$(dirname "$0")/../.."
NS1=seng-host1 NS2=seng-host2 A=10.77.0.1 B=10.77.0.2
remove_namespaces() {
  ip netns del "$NS1" 2>/dev/null || true
  ip netns del "$NS2" 2>/dev/null || true
}
remove_namespaces  # leftovers of an interrupted run
WORK=$(mktemp -d)
trap 'remove_namespaces; rm -rf "$WORK"' EXIT

ip netns add "$NS1"
ip netns add "$NS2"
ip link add seng-veth1 netns "$NS1" type veth peer name seng-veth2 netns "$NS2"
ip -n "$NS1" addr add "$A/24" dev seng-veth1
ip -n "$NS2" addr add "$B/24" dev seng-veth2
for ns in "$NS1" "$NS2"; do ip -n "$ns" link set lo up; done
ip -n "$NS1" link set seng-veth1 up
ip -n "$NS2" link set seng-veth2 up

# Open MPI calls the agent as `agent HOST COMMAND...`, as it would call ssh.
cat > "$WORK/netns-rsh" <<AGENT
#!/bin/sh
host="\$1"; shift
case "\$host" in
  $A) ns=$NS1 ;;
  $B) ns=$NS2 ;;
  *) echo "netns-rsh: unknown host \$host" >&2; exit 1 ;;
esac
exec ip netns exec "\$ns" /bin/sh -c "\$*"
AGENT
chmod +x "$WORK/netns-rsh"
printf '%s slots=1\n%s slots=1\n' "$A" "$B" > "$WORK/hostfile"

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
ip netns exec "$NS1" mpirun -np 2 --hostfile "$WORK/hostfile" \
  --mca plm_rsh_agent "$WORK/netns-rsh" \
  --mca btl tcp,self --mca btl_tcp_if_include 10.77.0.0/24 \
  --mca oob_tcp_if_include 10.77.0.0/24 \
  -x PATH -x PYTHONPATH ${FASHION_MNIST_DIR:+-x FASHION_MNIST_DIR} \
  python3 examples/train.py --engine mpi "$@"
