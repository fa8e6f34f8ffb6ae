#!/bin/bash
# A two-node Slurm cluster on this machine, to run the recipes in examples/slurm/ on the tiny job
# (tiny_job.py) and check them: munged, slurmctld and two slurmd (nodes n1 and n2, both at
# 127.0.0.1) from Debian's slurm-wlm and munge packages, with a configuration, ports and files of
# their own in a temporary folder (the system's /etc/slurm and /etc/munge are not used). As root,
# from the repository's root; not in CI (it takes a few minutes):
#
#   apt-get install -y slurm-wlm munge       # once
#   bash examples/slurm/local_cluster.sh     # PYTHON=... to use another interpreter than .venv's
#
# Each job's final weights are compared, bit for bit, with the same job run by `python train.py`:
#   1. warp.sbatch on one node, 2 ranks          2. on two nodes, 1 rank each
#   3. `scontrol requeue` while it runs: the job comes back and resumes from its folder
#   4. the time limit's SIGUSR1 (sent by hand): the trap stops the ranks and requeues the job
#   5. warp_seeds.sbatch: a job array over seeds 0 and 1
# The jobs are cancelled and the daemons stopped at the end, even on a failure.

set -euo pipefail
export PYTHON=${PYTHON:-$PWD/.venv/bin/python}
ports=${SLURM_PORTS:-17000}  # slurmctld's; the slurmd of n1 and n2 listen on the next two
work=$(mktemp -d /tmp/nanowarp-slurm.XXXXXX)
export SLURM_CONF=$work/slurm.conf
echo "jobs and logs in $work" >&2
exec > >(sed -u "s|$work|\$WORK|g")  # the output names that folder $WORK
mkdir -p "$work/state" "$work/spool/n1" "$work/spool/n2" "$work/log"

stop() {
    for id in $(squeue -h -o %i 2>/dev/null); do scancel "$id"; done
    for _ in $(seq 30); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 1; done
    for name in slurmd-n1 slurmd-n2 slurmctld munged; do
        [ -f "$work/$name.pid" ] && kill "$(cat "$work/$name.pid")" 2>/dev/null
    done
    echo "daemons stopped; jobs and logs in $work" >&2
}
trap stop EXIT

dd if=/dev/urandom of="$work/munge.key" bs=128 count=1 status=none
chmod 400 "$work/munge.key"
munged --force --socket="$work/munge.sock" --key-file="$work/munge.key" --pid-file="$work/munged.pid" \
    --seed-file="$work/munged.seed" --log-file="$work/log/munged.log"
host=$(hostname -s)
cat > "$SLURM_CONF" <<EOF
ClusterName=nanowarp
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ports
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$work/munge.sock
CredType=cred/munge
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool/%n
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd-%n.pid
SlurmctldLogFile=$work/log/slurmctld.log
SlurmdLogFile=$work/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=3600
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((ports + 1)) CPUs=2 State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((ports + 2)) CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
slurmctld -c
slurmd -N n1
slurmd -N n2
for _ in $(seq 30); do sinfo -h -o %t | grep -qv idle || break; sleep 1; done
echo "\$ sinfo   ($(sinfo --version), $(date -u '+%F %T') UTC)"
sinfo

state() { scontrol show job "$1" | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p'; }
wait_state() {  # job, state (a regular expression)
    for _ in $(seq 300); do state "$1" | grep -Eq "^($2)$" && return; sleep 1; done
    echo "job $1 is $(state "$1"), not $2"; exit 1
}
wait_line() {  # file, text
    for _ in $(seq 300); do grep -q "$2" "$1" 2>/dev/null && return; sleep 1; done
    echo "no '$2' in $1"; exit 1
}
finished() {  # job, its log: it must have COMPLETED
    wait_state "$1" "COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY"
    echo "\$ scontrol show job $1"
    scontrol show job "$1" | grep -E "JobState|NodeList=|Restarts"
    if [ "$(state "$1")" != COMPLETED ]; then cat "$2"; exit 1; fi
}
requeued() {  # job: back in the queue; start it now rather than after Slurm's delay of a requeue
    wait_state "$1" PENDING
    echo "\$ squeue"
    squeue
    scontrol update JobId="$1" StartTime=now
}
same() {  # two job folders: the same final weights, bit for bit
    "$PYTHON" - "$1" "$2" <<'EOF'
import sys
import torch
from safetensors.torch import load_file
a, b = (load_file(f"{out}/iter_2/liti/model.safetensors") for out in sys.argv[1:])
assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{sys.argv[1]}: other weights"
print(f"{sys.argv[1]}: the final weights of {sys.argv[2]}, bit for bit")
EOF
}
submit() {  # sbatch arguments (the environment first, as in VAR=value); sets $id
    line="$*"
    echo "\$ ${line//"$flags"/\$TINY}"
    out=$(env "$@")
    echo "$out"
    id=${out##* }
}

flags=$("$PYTHON" examples/slurm/tiny_job.py "$work/tiny")
long="$flags --steps 60 --save_every 10"  # long enough to requeue it while it runs
echo "TINY=\"$flags\""
"$PYTHON" train.py $flags --out_dir "$work/seq" > "$work/seq.out"
"$PYTHON" train.py $long --out_dir "$work/seq_long" > "$work/seq_long.out"
"$PYTHON" train.py $flags --seed 100 --out_dir "$work/seq_seed100" > "$work/seq_seed100.out"

echo "== 1. one node, 2 ranks"
submit NPROC=2 sbatch --output="$work/one-%j.out" examples/slurm/warp.sbatch $flags --out_dir "$work/one"
finished "$id" "$work/one-$id.out"
same "$work/one" "$work/seq"

echo "== 2. two nodes, 1 rank each"
submit NPROC=1 sbatch --nodes 2 --output="$work/two-%j.out" examples/slurm/warp.sbatch $flags --out_dir "$work/two"
wait_state "$id" RUNNING
squeue
finished "$id" "$work/two-$id.out"
same "$work/two" "$work/seq"

echo "== 3. scontrol requeue while it runs"
submit NPROC=1 sbatch --nodes 2 --output="$work/requeue-%j.out" examples/slurm/warp.sbatch $long \
    --out_dir "$work/requeue"
wait_line "$work/requeue-$id.out" "iter 1/2 run 1/2 step   30/60"
echo "\$ scontrol requeue $id"
scontrol requeue "$id"
requeued "$id"
finished "$id" "$work/requeue-$id.out"
grep -E "^20.* job $id|stopped after|resuming" "$work/requeue-$id.out"
same "$work/requeue" "$work/seq_long"

echo "== 4. the time limit near: SIGUSR1 to the batch shell"
submit NPROC=1 sbatch --nodes 2 --output="$work/usr1-%j.out" examples/slurm/warp.sbatch $long --out_dir "$work/usr1"
wait_line "$work/usr1-$id.out" "iter 1/2 run 1/2 step   30/60"
echo "\$ scancel --batch --signal=USR1 $id"
scancel --batch --signal=USR1 "$id"
requeued "$id"
finished "$id" "$work/usr1-$id.out"
grep -E "^20.* job $id|time limit|stopped after|resuming" "$work/usr1-$id.out"
same "$work/usr1" "$work/seq_long"

echo "== 5. a job array over seeds 0 and 1"
submit NPROC=1 sbatch --array 0-1 --output="$work/seeds-%A_%a.out" examples/slurm/warp_seeds.sbatch "$work/seeds" \
    $flags
finished "${id}_0" "$work/seeds-${id}_0.out"
finished "${id}_1" "$work/seeds-${id}_1.out"
same "$work/seeds_seed0" "$work/seq"
same "$work/seeds_seed1" "$work/seq_seed100"
echo "all checks passed"
