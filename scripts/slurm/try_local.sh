#!/usr/bin/env bash
# Run scripts/slurm/search.sbatch for real on a one-node SLURM on this machine, started and stopped here:
# munge and slurmctld/slurmd from Debian's packages (apt-get install slurm-wlm munge), with a configuration, key,
# sockets and state of their own in a temporary folder (the system's SLURM and munge, if any, are not touched).
# It submits a small offline search (a 120-clip demo corpus, space=smoke, 2 CPUs, no GPU), with a home that holds
# an old ~/.ray/auth_token, waits for the job, checks that it finished its trials, and that nothing the job
# started is left running; then it stops the daemons it started and removes the folder. Run as root:
#
#     scripts/slurm/try_local.sh                 # about 3 min
#     KEEP=1 scripts/slurm/try_local.sh          # keep the folder (logs, runs) for a look
#
# Exit status 0 only if the job completed, the search finished its trials and no process of the job is left.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
for tool in munged slurmctld slurmd sbatch scontrol squeue; do
    command -v "$tool" > /dev/null || { echo "try_local.sh: $tool not found: apt-get install slurm-wlm munge" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "try_local.sh: run as root (slurmd starts the job steps)" >&2; exit 2; }
VENV="${EMOTUNE_VENV:-$ROOT/.venv}"
[ -x "$VENV/bin/python" ] || { echo "try_local.sh: no environment at $VENV (scripts/test.sh --quick makes one)" >&2; exit 2; }

WORK="$(mktemp -d /tmp/emotune-slurm-XXXXXX)"
HOST="$(hostname)"
free_port() { "$VENV/bin/python" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
CTLD_PORT="$(free_port)"
SLURMD_PORT="$(free_port)"
MUNGE_SOCKET="$WORK/munge/munge.socket"
export SLURM_CONF="$WORK/slurm.conf"
PIDS=()

cleanup() {
    status=$?
    scancel --quiet --full "${JOB:-0}" 2> /dev/null || true
    for pidfile in "$WORK/slurmd.pid" "$WORK/slurmctld.pid" "$WORK/munge/munged.pid"; do
        [ -s "$pidfile" ] && kill "$(cat "$pidfile")" 2> /dev/null || true
    done
    sleep 2
    for pid in "${PIDS[@]}"; do kill -9 "$pid" 2> /dev/null || true; done
    if [ -z "${KEEP:-}" ]; then rm -rf "$WORK"; else echo "kept: $WORK"; fi
    exit "$status"
}
trap cleanup EXIT

# munge: a key and a socket of our own
mkdir -p "$WORK/munge" "$WORK/state" "$WORK/spool" "$WORK/shared" "$WORK/home/.ray"
dd if=/dev/urandom bs=1 count=1024 of="$WORK/munge/munge.key" status=none
chmod 0400 "$WORK/munge/munge.key"
chmod 0700 "$WORK/munge"
munged --force --key-file="$WORK/munge/munge.key" --socket="$MUNGE_SOCKET" --pid-file="$WORK/munge/munged.pid" \
    --log-file="$WORK/munge/munged.log" --seed-file="$WORK/munge/munged.seed"

cat > "$SLURM_CONF" <<EOF
ClusterName=emotune-local
SlurmctldHost=$HOST
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/slurmctld.log
SlurmdLogFile=$WORK/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
PlugStackConfig=$WORK/plugstack.conf
NodeName=$HOST CPUs=$(nproc) State=UNKNOWN
PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
: > "$WORK/plugstack.conf"
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do
    scontrol show node "$HOST" 2> /dev/null | grep -q "State=IDLE" && break
    sleep 1
done
scontrol show node "$HOST" | grep -q "State=IDLE" || { echo "try_local.sh: the node never came up:" >&2; tail -20 "$WORK/slurmd.log" >&2; exit 1; }

# what a user brings: a corpus in the shared folder, and a home with a token an earlier local Ray left behind
"$VENV/bin/python" -m emotune demo-corpus "$WORK/shared/corpus" --clips 120 > /dev/null 2>&1
echo "an-old-token-from-an-earlier-local-ray-0000000000" > "$WORK/home/.ray/auth_token"

cd "$WORK"
JOB="$(HOME="$WORK/home" EMOTUNE_SHARED="$WORK/shared" DATA_ROOT="$WORK/shared/corpus" EMOTUNE_VENV="$VENV" \
    SPACE=smoke sbatch --parsable --nodes=1 --exclusive --cpus-per-task="$(nproc)" --gpus-per-task=0 \
    --output="$WORK/job.log" "$ROOT/scripts/slurm/search.sbatch" encoders=offline search.num_samples=4 \
    trial.max_epochs=3 search.plan_time=false search.resources.gpu=0 features.variants=1)"
echo "submitted job $JOB"
for _ in $(seq 900); do
    squeue -h -j "$JOB" 2> /dev/null | grep -q . || break
    sleep 1
done
STATE="$(scontrol show job "$JOB" 2> /dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')"
echo "job $JOB: ${STATE:-gone}"
sleep 3
LEFT="$(ps -eo pid,args | grep -E "ray::|raylet|gcs_server|mlflow.server|emotune server|emotune.search" \
    | grep -v -E "grep|try_local" | grep -c . || true)"
if grep -q "Search 'smoke' done" "$WORK/job.log" && [ "$LEFT" = 0 ]; then
    grep "Search 'smoke' done" "$WORK/job.log"
    echo "try_local.sh: the recipe ran a search on a one-node SLURM; no process of the job is left"
    exit 0
fi
echo "try_local.sh: the job did not finish its search, or left $LEFT processes; the end of its log:" >&2
tail -40 "$WORK/job.log" >&2
exit 1
