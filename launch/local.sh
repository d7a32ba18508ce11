#!/usr/bin/env bash
# N processes of `python -m cljax.train` on this machine, joined by jax.distributed.
#
#   launch/local.sh N [cljax.train flags...]
#
# Process 0 hosts the coordinator on 127.0.0.1:$CLJAX_PORT (default 12355); every process
# gets --config.num_cpu_devices devices of its own on CPU. The script waits for all
# processes and exits non-zero if any of them failed.
set -euo pipefail
if [[ $# -lt 1 || ! $1 =~ ^[0-9]+$ ]]; then
  echo "usage: launch/local.sh N [cljax.train flags...]" >&2
  exit 2
fi
num_processes=$1
shift
port=${CLJAX_PORT:-12355}
python=${PYTHON:-python}
pids=()
for ((rank = 0; rank < num_processes; rank++)); do
  "$python" -m cljax.train \
    --config.distributed.coordinator_address="127.0.0.1:$port" \
    --config.distributed.num_processes="$num_processes" \
    --config.distributed.process_id="$rank" \
    "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
