#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests and CI (Debian, as root).
#   tests/services/slurm.sh start DIR   installs slurm-wlm and munge if missing, starts munged,
#                                       slurmctld and slurmd with everything under DIR, on free
#                                       local ports; prints SLURM_CONF=... and SLURM_PARTITION=...
#   tests/services/slurm.sh stop DIR    stops them by their pids and removes DIR
# Then: export SLURM_CONF=DIR/slurm.conf; sbatch/squeue/scontrol (and submitit) use this cluster.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/common.sh"

start() {
    local dir=$1
    need_root
    command -v slurmctld >/dev/null && command -v munged >/dev/null || apt_install slurm-wlm munge
    mkdir -p "$dir"/{state,spool,log,munge}
    chmod 755 "$dir"  # munged runs as munge
    dir=$(cd "$dir" && pwd)
    local host mem_mb ctld_port d_port
    host=$(hostname -s)
    mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
    ctld_port=$(free_port)
    d_port=$(free_port)
    # munge: a key and a socket of this cluster's own (another munged on the machine is left alone)
    chown munge:munge "$dir/munge"
    chmod 700 "$dir/munge"
    head -c 1024 /dev/urandom > "$dir/munge/munge.key"
    chown munge:munge "$dir/munge/munge.key"
    chmod 400 "$dir/munge/munge.key"
    su -s /bin/sh munge -c "munged --force --key-file=$dir/munge/munge.key --socket=$dir/munge/socket \
        --pid-file=$dir/munge/munged.pid --log-file=$dir/munge/munged.log --seed-file=$dir/munge/seed"
    cat > "$dir/slurm.conf" <<CONF
ClusterName=echo-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/socket
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
MpiDefault=none
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
MessageTimeout=20
KillWait=30
MinJobAge=600
NodeName=$host NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
    export SLURM_CONF="$dir/slurm.conf"
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF"
    local i
    for i in $(seq 120); do
        if sinfo -h -o %t 2>/dev/null | grep -qx idle; then
            echo "SLURM_CONF=$SLURM_CONF"
            echo "SLURM_PARTITION=debug"
            return 0
        fi
        sleep 0.5
    done
    echo "slurm: the node did not come up in 60 s" >&2
    tail -n 20 "$dir"/log/*.log >&2 || true
    stop "$dir"
    return 1
}

stop() {
    local dir=$1
    [ -d "$dir" ] || return 0
    if [ -f "$dir/slurmctld.pid" ] && [ -f "$dir/slurm.conf" ]; then  # end the jobs still there first
        export SLURM_CONF="$dir/slurm.conf"
        local jobs i
        jobs=$(squeue -h -o %A 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for i in $(seq 60); do
                [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break
                sleep 0.5
            done
        fi
    fi
    stop_pidfile "$dir/slurmd.pid"
    stop_pidfile "$dir/slurmctld.pid"
    stop_pidfile "$dir/munge/munged.pid"
    rm -rf "$dir"
}

case "${1:-}" in
    start) start "${2:?usage: $0 start DIR}" ;;
    stop) stop "${2:?usage: $0 stop DIR}" ;;
    *) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
