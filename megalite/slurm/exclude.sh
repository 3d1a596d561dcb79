#!/bin/bash
# exclude.sh JOBID HOSTS: a helper job of common.sh's megalite_requeue_hung. SLURM changes a job's excluded
# nodes only while it is pending; the job that hung requeues itself held, so: wait until JOBID is pending,
# add HOSTS to its ExcNodeList and release it. Whatever happens, JOBID is released at the end.
#SBATCH --job-name=megalite-exclude
set -u

job=$1
hosts=$2
log() { echo "megalite-exclude [$(date '+%F %T')] $*" >&2; }

for _ in $(seq 1 600); do
    state=$(squeue -h -j "$job" -o %T 2>/dev/null || true)
    [[ "$state" != PENDING ]] || break
    sleep 1
done
current=$(scontrol show job "$job" 2>/dev/null | tr ' ' '\n' | sed -n 's/^ExcNodeList=//p' | head -n 1)
[[ "$current" != "(null)" ]] || current=""
if scontrol update JobId="$job" ExcNodeList="${current:+$current,}$hosts"; then
    log "job $job: excluded ${current:+$current,}$hosts"
else
    log "job $job: could not exclude $hosts (state ${state:-unknown}); releasing it as it is"
fi
scontrol release "$job" && log "job $job: released"
