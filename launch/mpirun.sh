#!/usr/bin/env bash
# N processes with mpirun and the MPI backend (mpi4jax): one device per process.
#
#   launch/mpirun.sh N [cljax.train flags...]
#
# Needs `pip install -e '.[mpi]'` (see README). MPIRUN defaults to the mpirun next to the
# Python interpreter (the `mpich` wheel's), else the one on PATH.
set -euo pipefail
if [[ $# -lt 1 || ! $1 =~ ^[0-9]+$ ]]; then
  echo "usage: launch/mpirun.sh N [cljax.train flags...]" >&2
  exit 2
fi
num_processes=$1
shift
python=${PYTHON:-python}
bindir=$(dirname "$(command -v "$python")")
mpirun=${MPIRUN:-$([[ -x $bindir/mpirun ]] && echo "$bindir/mpirun" || echo mpirun)}
exec "$mpirun" -n "$num_processes" "$python" -m cljax.train \
  --config.distributed.backend=mpi "$@"
