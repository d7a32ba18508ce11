#!/usr/bin/env bash
# N processes of `python -m cljax.train` on this machine, joined by jax.distributed.
#
#   launch/local.sh N [cljax.train flags...]
#
# With no flags this is the default experiment of `python -m cljax.train`: on CPU the
# config's num_cpu_devices (4) are split over the N processes. Process 0 hosts the
# coordinator on a free port of 127.0.0.1 (or $CLJAX_PORT). The script waits for all
# processes and exits with the first non-zero status among them.
set -euo pipefail
if [[ $# -lt 1 || ! $1 =~ ^[0-9]+$ || $1 -lt 1 ]]; then
  echo "usage: launch/local.sh N [cljax.train flags...]" >&2
  exit 2
fi
num_processes=$1
shift
python=${PYTHON:-python}
port_check='
import socket, sys
with socket.socket() as s:
    try:
        s.bind(("127.0.0.1", int(sys.argv[1])))
    except OSError:
        sys.exit(1)
    print(s.getsockname()[1])
'
if [[ -n ${CLJAX_PORT:-} ]]; then
  if ! port=$("$python" -c "$port_check" "$CLJAX_PORT"); then
    echo "launch/local.sh: port $CLJAX_PORT (CLJAX_PORT) is in use, maybe by another job;" \
      "unset CLJAX_PORT to pick a free port" >&2
    exit 2
  fi
else
  port=$("$python" -c "$port_check" 0)
fi
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
  wait "$pid" || { code=$?; [[ $status -ne 0 ]] || status=$code; }
done
exit "$status"
