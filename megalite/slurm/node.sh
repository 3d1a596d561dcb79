#!/bin/bash
# One task per node: start torchrun or the deepspeed launcher (no-ssh mode) for this node's ranks.
# `node.sh torchrun|deepspeed SUBCOMMAND ARGS...`; each local rank runs slurm/rank.sh.
set -eu

launcher=$1
shift
: "${MEGALITE_SLURM_DIR:?set by common.sh}" "${MASTER_ADDR:?}" "${MASTER_PORT:?}" "${MEGALITE_RANKS_PER_NODE:?}"

# The launchers die of SIGUSR1 (default action) and orphan their workers; the deepspeed runner
# also does so on SIGTERM. `scancel --signal` reaches every process of the step, so the launcher
# must ignore USR1 and let the ranks (which install their own handler) save and exit.
trap '' USR1

case "$launcher" in
    torchrun)
        exec torchrun --nnodes="$SLURM_NNODES" --nproc-per-node="$MEGALITE_RANKS_PER_NODE" \
            --node-rank="$SLURM_NODEID" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" \
            --max-restarts=0 --no-python "$MEGALITE_SLURM_DIR/rank.sh" "$@"
        ;;
    deepspeed)
        : "${MEGALITE_HOSTFILE:?set by common.sh}"
        exec deepspeed --hostfile="$MEGALITE_HOSTFILE" --no_ssh --node_rank="$SLURM_NODEID" \
            --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
            --no_python --no_local_rank "$MEGALITE_SLURM_DIR/rank.sh" "$@"
        ;;
    *)
        echo "node.sh: unknown launcher '$launcher' (torchrun | deepspeed)" >&2
        exit 2
        ;;
esac
