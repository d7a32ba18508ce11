#!/usr/bin/env bash
# Runs a command with CUDA_VISIBLE_DEVICES set to this rank's GPU on its node.
#
#   mpiexec ... launch/gpu_affinity.sh python -m cljax.train ...
#
# The local rank comes from PALS/MPICH (PMI_LOCAL_RANK), Open MPI or Slurm.
set -euo pipefail
local_rank=${PMI_LOCAL_RANK:-${OMPI_COMM_WORLD_LOCAL_RANK:-${SLURM_LOCALID:-0}}}
gpus_per_node=${CLJAX_GPUS_PER_NODE:-4}
export CUDA_VISIBLE_DEVICES=$(( local_rank % gpus_per_node ))
exec "$@"
