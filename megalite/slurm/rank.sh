#!/bin/bash
# One megalite rank: `rank.sh SUBCOMMAND ARGS...` runs `megalite SUBCOMMAND ARGS...` (or
# $MEGALITE_COMMAND SUBCOMMAND ARGS..., e.g. under a profiler), forwards
# SIGTERM to it and leaves its exit code in $MEGALITE_STATE_DIR/rank-<RANK>.rc,
# where the batch script reads it (torchrun reports a worker's 75 as 1).
# Started by srun (one task per rank) or, with --no-python, by torchrun / the deepspeed launcher.
set -u

rank=${RANK:-${SLURM_PROCID:-0}}
mkdir -p "${TRITON_CACHE_DIR:-/tmp/megalite-triton-cache}" 2>/dev/null || true

child=""
# shellcheck disable=SC2317  # called by the traps below
forward() {
    if [[ -n "$child" ]]; then
        kill -s "$1" "$child" 2>/dev/null || true
    fi
}
# USR1/USR2 (save and stop): `scancel --signal` delivers them to every process of the
# step, the rank included, so this shell only has to survive them (under torchrun/deepspeed they
# arrive ignored already, see node.sh); the Python process installs its own handler.
trap '' USR1 USR2
# TERM may come from a launcher that signals only its direct children: pass it on.
trap 'forward TERM' TERM

# The megalite CLI plus a clean process-group teardown at exit (megalite/commands/rank.py).
read -r -a command <<<"${MEGALITE_COMMAND:-python -m megalite.commands.rank}"
"${command[@]}" "$@" &
child=$!
while :; do
    wait "$child"
    rc=$?
    if [[ $rc -gt 128 ]] && kill -0 "$child" 2>/dev/null; then
        continue  # interrupted by a forwarded signal; the rank is still saving
    fi
    break
done

if [[ -n "${MEGALITE_STATE_DIR:-}" ]]; then
    echo "$rc" >"$MEGALITE_STATE_DIR/rank-$rank.rc.tmp" && mv -f "$MEGALITE_STATE_DIR/rank-$rank.rc.tmp" "$MEGALITE_STATE_DIR/rank-$rank.rc"
fi
# 79: the watchdog declared a hang. The hung rank never leaves by itself (a stopped process, a stuck
# kernel), and srun would wait MEGALITE_TASK_WAIT for it: once the live ranks have had the time to
# report, end the job step. Only this task's processes outlive it, so this runs only while some other
# task is still there (when every task has exited, the step ends and takes this with it).
if [[ $rc -eq 79 && -n "${SLURM_JOB_ID:-}" && -n "${SLURM_STEP_ID:-}" ]]; then
    (sleep "${MEGALITE_HANG_GRACE:-10}" && scancel --quiet --signal=KILL "$SLURM_JOB_ID.$SLURM_STEP_ID") &
fi
exit "$rc"
