#!/bin/bash
# qft QAT on a Slurm cluster: one task per node, accelerate starts the processes of each node.
#   sbatch --nodes 2 --gpus-per-node 8 launch/slurm.sh recipes/smollm2-135m/quickstart.yaml [--override k=v ...]
#SBATCH --job-name=qft-train
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
set -euo pipefail
RECIPE=${1:?usage: sbatch launch/slurm.sh RECIPE [qft train options]}
shift
CONFIG=${QFT_ACCELERATE_CONFIG:-launch/multi-node.yaml}
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
GPUS_PER_NODE=${GPUS_PER_NODE:-1}
NNODES=${SLURM_NNODES:-1}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
srun --kill-on-bad-exit=1 bash -c "accelerate launch --config_file $CONFIG \
    --num_machines $NNODES --num_processes $((NNODES * GPUS_PER_NODE)) \
    --machine_rank \$SLURM_NODEID --main_process_ip $MASTER_ADDR --main_process_port $MASTER_PORT \
    --deepspeed_multinode_launcher standard \
    -m qft.cli train $RECIPE $*"
