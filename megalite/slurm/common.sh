# shellcheck shell=bash
# Shared body of slurm/*.sbatch: environment, launch, signal forwarding, requeue on preemption.
#
# A batch script sets its #SBATCH lines, sources this file and calls `megalite_main LAUNCHER "$@"`
# with LAUNCHER one of srun | torchrun | deepspeed and "$@" = CONFIG [--set KEY=VALUE ...].
#
# Environment (all optional):
#   MEGALITE_HOME            repository root (default: the submit directory)
#   MEGALITE_VENV            virtual environment to activate (default: $MEGALITE_HOME/.venv if present)
#   MEGALITE_CONFIG          run config when the script gets no arguments
#   MEGALITE_GPUS_PER_NODE   GPUs (= ranks) per node; default: what SLURM allocated, else 0
#   MEGALITE_PROCS_PER_NODE  ranks per node when MEGALITE_GPUS_PER_NODE is 0 (CPU runs; default 1)
#   MEGALITE_IFNAME          network interface for gloo/NCCL sockets (GLOO_/NCCL_SOCKET_IFNAME)
#   MEGALITE_PREFLIGHT       1: run `megalite preflight` on all ranks before the first attempt (default 0:
#                            `megalite train` runs the same checks when it starts)
#   MEGALITE_EVAL            1: evaluate the last checkpoint after a successful run (default 1)
#   MEGALITE_MAX_RESTARTS    stop requeueing after this many restarts (default 50)
#   MEGALITE_TASK_WAIT       seconds the other ranks get after the first one exits (srun --wait; default 300)
#   MEGALITE_COMMAND         what each rank runs instead of `python -m megalite.commands.rank` (the megalite CLI)
#   MEGALITE_HANG_EXCLUDE    1: a requeue after a hang excludes the hosts the watchdog named (default 1; see
#                            megalite_requeue_hung), 0: requeue without excluding
#   MEGALITE_MAX_HANG_REQUEUES  stop requeueing after this many hangs in one job (default 3)
#   MEGALITE_HANG_GRACE      seconds a rank that exited 79 waits before ending the job step, which a stopped
#                            rank never leaves by itself (rank.sh; default 10)
#   TORCH_FR_BUFFER_SIZE     torch's flight recorder of collectives (default 2000 entries; 0 turns it off)
#   MASTER_ADDR, MASTER_PORT default: the first node's address, 29500 + job id % 10000
#
# Exit codes of `megalite train` (megalite/engine/signals.py): 0 done, 75 preempted and saved
# (requeue), 79 a rank hung and the watchdog named it (requeue, excluding its host), anything else a
# real failure (stop).

MEGALITE_EXIT_OK=0
MEGALITE_EXIT_PREEMPTED=75
MEGALITE_EXIT_HUNG=79

megalite_log() {
    echo "megalite-slurm [$(date '+%F %T')] $*" >&2
}

megalite_die() {
    megalite_log "error: $*"
    exit 2
}

# The first host of the allocation and the address SLURM itself reaches it at (NodeAddr), so
# the rendezvous works where node names do not resolve.
megalite_master_addr() {
    local first addr
    first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    addr=$(scontrol show node "$first" 2>/dev/null | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n 1)
    echo "${addr:-$first}"
}

# train.output_dir of the run, after --set overrides; only JSON parsing, no torch import.
megalite_output_dir() {
    python - "$@" <<'PYEOF'
import argparse, json, sys
from megalite import config
p = argparse.ArgumentParser()
p.add_argument("config")
p.add_argument("--set", dest="overrides", action="append", default=[])
a, _ = p.parse_known_args(sys.argv[1:])
raw = config.apply_overrides(json.load(open(a.config)), a.overrides)
train = raw.get("train") or {}
print(train.get("output_dir") or "runs/default")
print(train.get("checkpoint_dir") or "")
PYEOF
}

megalite_setup() {
    : "${SLURM_JOB_ID:?not inside a SLURM job: submit this script with sbatch}"
    MEGALITE_HOME=${MEGALITE_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
    MEGALITE_SLURM_DIR=${MEGALITE_SLURM_DIR:-$MEGALITE_HOME/slurm}
    if [[ -z "${MEGALITE_VENV:-}" && -x "$MEGALITE_HOME/.venv/bin/python" ]]; then
        MEGALITE_VENV="$MEGALITE_HOME/.venv"
    fi
    if [[ -n "${MEGALITE_VENV:-}" ]]; then
        # Not `source activate`: PATH is all that is needed and it travels to every srun task.
        export VIRTUAL_ENV="$MEGALITE_VENV"
        export PATH="$MEGALITE_VENV/bin:$PATH"
    fi
    command -v megalite >/dev/null || megalite_die "megalite is not on PATH (set MEGALITE_VENV or MEGALITE_HOME)"
    export MEGALITE_HOME MEGALITE_SLURM_DIR

    if [[ $# -eq 0 && -n "${MEGALITE_CONFIG:-}" ]]; then
        set -- "$MEGALITE_CONFIG"
    fi
    [[ $# -ge 1 ]] || megalite_die "usage: sbatch $0 CONFIG [--set KEY=VALUE ...] (or set MEGALITE_CONFIG)"
    [[ -f "$1" ]] || megalite_die "config file not found: $1 (relative paths resolve against $PWD)"
    MEGALITE_ARGS=("$@")

    local dirs
    dirs=$(megalite_output_dir "$@") || megalite_die "cannot read $1"
    MEGALITE_OUTPUT_DIR=$(sed -n 1p <<<"$dirs")
    MEGALITE_CHECKPOINT_DIR=$(sed -n 2p <<<"$dirs")
    MEGALITE_CHECKPOINT_DIR=${MEGALITE_CHECKPOINT_DIR:-$MEGALITE_OUTPUT_DIR/checkpoints}

    MEGALITE_RESTART=${SLURM_RESTART_COUNT:-0}
    # Where the ranks leave their exit codes: on the shared output directory, one folder per attempt.
    MEGALITE_STATE_DIR="$MEGALITE_OUTPUT_DIR/slurm/$SLURM_JOB_ID/attempt-$MEGALITE_RESTART"
    rm -rf "$MEGALITE_STATE_DIR"
    mkdir -p "$MEGALITE_STATE_DIR" || megalite_die "cannot create $MEGALITE_STATE_DIR"
    export MEGALITE_STATE_DIR
    # Hangs (README "When a job hangs"): the watchdog's stacks, flight-recorder traces and suspect hosts, and
    # torch's own NCCL dump on a collective timeout, in one folder per attempt inside the run directory.
    MEGALITE_HANG_DIR="$MEGALITE_STATE_DIR/hang"
    mkdir -p "$MEGALITE_HANG_DIR" || megalite_die "cannot create $MEGALITE_HANG_DIR"
    export MEGALITE_HANG_DIR
    export TORCH_FR_BUFFER_SIZE=${TORCH_FR_BUFFER_SIZE:-2000}
    export TORCH_FR_DUMP_TEMP_FILE=${TORCH_FR_DUMP_TEMP_FILE:-$MEGALITE_HANG_DIR/fr_trace_rank_}
    export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}

    MEGALITE_NODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    if [[ -z "${MEGALITE_GPUS_PER_NODE:-}" ]]; then
        MEGALITE_GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-0}
        MEGALITE_GPUS_PER_NODE=${MEGALITE_GPUS_PER_NODE##*:}  # "gpu:8" forms
    fi
    if [[ "$MEGALITE_GPUS_PER_NODE" -gt 0 ]]; then
        MEGALITE_RANKS_PER_NODE=$MEGALITE_GPUS_PER_NODE
    else
        MEGALITE_RANKS_PER_NODE=${MEGALITE_PROCS_PER_NODE:-1}
    fi
    MEGALITE_WORLD_SIZE=$((MEGALITE_NODES * MEGALITE_RANKS_PER_NODE))
    export MEGALITE_WORLD_SIZE MEGALITE_RANKS_PER_NODE

    MASTER_ADDR=${MASTER_ADDR:-$(megalite_master_addr)}
    # Derived from the job id: stable across requeues, distinct between jobs sharing a node.
    MASTER_PORT=${MASTER_PORT:-$((29500 + SLURM_JOB_ID % 10000))}
    export MASTER_ADDR MASTER_PORT

    # Node-local Triton cache: a shared filesystem turns thousands of small cache files into a
    # metadata storm and races between nodes compiling the same kernel.
    local user=${USER:-$(id -un)}
    export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${SLURM_TMPDIR:-${TMPDIR:-/tmp}}/megalite-$user/triton-cache}
    export PYTHONUNBUFFERED=1
    # NCCL: a dead peer raises instead of hanging until the collective timeout; warnings only.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # Megatron-style tensor parallelism overlaps communication only with one hardware queue.
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    if [[ -n "${MEGALITE_IFNAME:-}" ]]; then
        export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$MEGALITE_IFNAME}
        export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$MEGALITE_IFNAME}
    fi
}

# Signals for the batch shell (#SBATCH --signal=B:USR1@N) go to every process of every job step:
# the ranks save at the next step boundary. Launchers (torchrun, deepspeed) ignore USR1 (node.sh).
megalite_forward() {
    local sig=$1
    megalite_log "received SIG$sig: forwarding it to every rank of job $SLURM_JOB_ID"
    MEGALITE_SIGNALLED=$sig
    scancel --signal="$sig" "$SLURM_JOB_ID" || megalite_log "scancel --signal=$sig failed"
}

# Run "$@" in the background and wait for it, forwarding signals meanwhile; sets MEGALITE_STEP_RC.
megalite_run_step() {
    MEGALITE_SIGNALLED=""
    trap 'megalite_forward USR1' USR1
    trap 'megalite_forward USR2' USR2
    trap 'megalite_forward TERM' TERM
    "$@" &
    local pid=$! rc
    while :; do
        wait "$pid"
        rc=$?
        # A trapped signal interrupts `wait` with 128+n while the step runs on.
        if [[ $rc -gt 128 ]] && kill -0 "$pid" 2>/dev/null; then
            continue
        fi
        break
    done
    trap - USR1 USR2 TERM
    MEGALITE_STEP_RC=$rc
}

megalite_srun_ranks() {
    srun --nodes="$MEGALITE_NODES" --ntasks="$MEGALITE_WORLD_SIZE" --ntasks-per-node="$MEGALITE_RANKS_PER_NODE" \
        --kill-on-bad-exit=0 --wait="${MEGALITE_TASK_WAIT:-300}" "$@"
}

megalite_srun_nodes() {
    srun --nodes="$MEGALITE_NODES" --ntasks="$MEGALITE_NODES" --ntasks-per-node=1 \
        --kill-on-bad-exit=0 --wait="${MEGALITE_TASK_WAIT:-300}" "$@"
}

megalite_launch() {
    local launcher=$1
    case "$launcher" in
        srun)
            megalite_run_step megalite_srun_ranks "$MEGALITE_SLURM_DIR/rank.sh" train "${MEGALITE_ARGS[@]}"
            ;;
        torchrun)
            megalite_run_step megalite_srun_nodes "$MEGALITE_SLURM_DIR/node.sh" torchrun train "${MEGALITE_ARGS[@]}"
            ;;
        deepspeed)
            # Hostfile for the runner's no-ssh mode: each node starts its own local launcher.
            export MEGALITE_HOSTFILE="$MEGALITE_STATE_DIR/hostfile"
            scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n "$MEGALITE_NODES" |
                sed "s/\$/ slots=$MEGALITE_RANKS_PER_NODE/" >"$MEGALITE_HOSTFILE"
            megalite_run_step megalite_srun_nodes "$MEGALITE_SLURM_DIR/node.sh" deepspeed train "${MEGALITE_ARGS[@]}"
            ;;
        *)
            megalite_die "unknown launcher '$launcher' (srun | torchrun | deepspeed)"
            ;;
    esac
}

# Sets MEGALITE_RESULT to ok | preempted | hung | failed and MEGALITE_RC from the ranks' exit codes
# (rank.sh writes them: torchrun turns a worker's 75 into 1, so the step's own code is not enough).
# A hung rank reports nothing (it was killed with its step); a rank that failed outright decides over
# a hang (a crash is a bug a requeue would only repeat).
megalite_collect() {
    local f rc n=0 ok=0 preempted=0 hung=0 other=""
    for f in "$MEGALITE_STATE_DIR"/rank-*.rc; do
        [[ -e "$f" ]] || continue
        rc=$(<"$f")
        n=$((n + 1))
        case "$rc" in
            "$MEGALITE_EXIT_OK") ok=$((ok + 1)) ;;
            "$MEGALITE_EXIT_PREEMPTED") preempted=$((preempted + 1)) ;;
            "$MEGALITE_EXIT_HUNG") hung=$((hung + 1)) ;;
            *) other=${other:-$rc} ;;
        esac
    done
    local hangs=""
    [[ $hung -eq 0 ]] || hangs=", $hung hung"
    megalite_log "step exit code $MEGALITE_STEP_RC${MEGALITE_SIGNALLED:+ (after SIG$MEGALITE_SIGNALLED)}; $n of $MEGALITE_WORLD_SIZE ranks reported: $ok done, $preempted preempted$hangs${other:+, first failure $other}"
    if [[ -n "$other" ]]; then
        MEGALITE_RESULT=failed MEGALITE_RC=$other
    elif [[ $hung -gt 0 ]]; then
        MEGALITE_RESULT=hung MEGALITE_RC=$MEGALITE_EXIT_HUNG
    elif [[ $n -lt $MEGALITE_WORLD_SIZE ]]; then
        MEGALITE_RESULT=failed
        MEGALITE_RC=$MEGALITE_STEP_RC
        [[ $MEGALITE_RC -ne 0 ]] || MEGALITE_RC=1
    elif [[ $preempted -gt 0 ]]; then
        MEGALITE_RESULT=preempted MEGALITE_RC=$MEGALITE_EXIT_PREEMPTED
    else
        MEGALITE_RESULT=ok MEGALITE_RC=0
    fi
}

megalite_requeue() {
    local max=${MEGALITE_MAX_RESTARTS:-50}
    if [[ $MEGALITE_RESTART -ge $max ]]; then
        megalite_log "preempted, but restart $MEGALITE_RESTART reached MEGALITE_MAX_RESTARTS=$max: not requeueing"
        exit "$MEGALITE_EXIT_PREEMPTED"
    fi
    megalite_log "preempted and saved: requeueing job $SLURM_JOB_ID (restart $((MEGALITE_RESTART + 1)))"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        megalite_log "scontrol requeue failed (JobRequeue disabled?): resubmit to resume from the checkpoint"
        exit "$MEGALITE_EXIT_PREEMPTED"
    fi
    exit 0
}

# After a hang (exit 79): requeue, so the next attempt resumes from the last checkpoint, without the hosts the
# watchdog named (MEGALITE_HANG_DIR/suspect-hosts). SLURM 22.05 changes a job's excluded nodes only while it is
# pending, and a requeue ends this script at once; so a small helper job (slurm/exclude.sh) waits until this
# job is requeued and held, adds the hosts to its ExcNodeList and releases it. If the helper cannot be
# submitted, or MEGALITE_HANG_EXCLUDE=0, a plain requeue. A job that can only run on the excluded nodes stays
# pending: `scontrol update JobId=ID ExcNodeList=` clears the list.
megalite_requeue_hung() {
    local hosts="" max=${MEGALITE_MAX_HANG_REQUEUES:-3} hangs helper
    if [[ -s "$MEGALITE_HANG_DIR/suspect-hosts" ]]; then
        hosts=$(sort -u "$MEGALITE_HANG_DIR/suspect-hosts" | paste -sd, -)
    fi
    megalite_log "hang: the watchdog named host(s) ${hosts:-(none)}; stacks and flight-recorder traces in $MEGALITE_HANG_DIR"
    hangs=$(cat "$MEGALITE_OUTPUT_DIR/slurm/$SLURM_JOB_ID"/attempt-*/result 2>/dev/null | grep -cx hung)
    if [[ $hangs -gt $max || $MEGALITE_RESTART -ge ${MEGALITE_MAX_RESTARTS:-50} ]]; then
        megalite_log "hang $hangs of this job (MEGALITE_MAX_HANG_REQUEUES=$max, restart $MEGALITE_RESTART): not requeueing"
        exit "$MEGALITE_EXIT_HUNG"
    fi
    if [[ -n "$hosts" && "${MEGALITE_HANG_EXCLUDE:-1}" == 1 ]]; then
        local opts=(--parsable --job-name="megalite-exclude-$SLURM_JOB_ID" --nodes=1 --ntasks=1 --time=15
                    --output="$MEGALITE_STATE_DIR/exclude-helper.log" --exclude="$hosts")
        [[ -z "${SLURM_JOB_PARTITION:-}" ]] || opts+=(--partition="$SLURM_JOB_PARTITION")
        [[ -z "${SLURM_JOB_ACCOUNT:-}" ]] || opts+=(--account="$SLURM_JOB_ACCOUNT")
        if helper=$(sbatch "${opts[@]}" "$MEGALITE_SLURM_DIR/exclude.sh" "$SLURM_JOB_ID" "$hosts"); then
            megalite_log "hang: requeueing job $SLURM_JOB_ID held (restart $((MEGALITE_RESTART + 1))); helper job $helper excludes $hosts, then releases it"
            scontrol requeuehold "$SLURM_JOB_ID" && exit 0
            megalite_log "scontrol requeuehold failed: cancelling helper job $helper"
            scancel "$helper" || true
        else
            megalite_log "hang: could not submit the helper job that excludes $hosts: requeueing without excluding"
        fi
    fi
    megalite_log "hang: requeueing job $SLURM_JOB_ID (restart $((MEGALITE_RESTART + 1)))"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        megalite_log "scontrol requeue failed (JobRequeue disabled?): resubmit to resume from the checkpoint"
        exit "$MEGALITE_EXIT_HUNG"
    fi
    exit 0
}

megalite_main() {
    local launcher=$1
    shift
    megalite_setup "$@"
    # A task is one rank under srun, one node's ranks under torchrun/deepspeed: share its CPUs.
    local cpus=${SLURM_CPUS_PER_TASK:-1}
    [[ $launcher == srun ]] || cpus=$((cpus / MEGALITE_RANKS_PER_NODE))
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cpus > 0 ? cpus : 1))}
    megalite_log "job $SLURM_JOB_ID SLURM_RESTART_COUNT=$MEGALITE_RESTART launcher=$launcher" \
        "nodes=$MEGALITE_NODES ranks/node=$MEGALITE_RANKS_PER_NODE world=$MEGALITE_WORLD_SIZE" \
        "master=$MASTER_ADDR:$MASTER_PORT output=$MEGALITE_OUTPUT_DIR"

    if [[ "${MEGALITE_PREFLIGHT:-0}" == 1 && $MEGALITE_RESTART -eq 0 ]]; then
        megalite_run_step megalite_srun_ranks megalite preflight "${MEGALITE_ARGS[@]}"
        if [[ $MEGALITE_STEP_RC -ne 0 ]]; then
            megalite_log "preflight failed (exit $MEGALITE_STEP_RC): not starting the training"
            exit "$MEGALITE_STEP_RC"
        fi
    fi

    megalite_launch "$launcher"
    megalite_collect
    echo "$MEGALITE_RESULT" >"$MEGALITE_STATE_DIR/result"
    case "$MEGALITE_RESULT" in
        ok)
            megalite_log "training finished"
            if [[ "${MEGALITE_EVAL:-1}" == 1 ]]; then
                if ! megalite eval --checkpoint "$MEGALITE_CHECKPOINT_DIR"; then
                    megalite_log "evaluation of $MEGALITE_CHECKPOINT_DIR failed"
                    exit 1
                fi
            fi
            exit 0
            ;;
        preempted)
            megalite_requeue
            ;;
        hung)
            megalite_requeue_hung
            ;;
        *)
            megalite_log "training failed with exit code $MEGALITE_RC: not requeueing"
            exit "$MEGALITE_RC"
            ;;
    esac
}
