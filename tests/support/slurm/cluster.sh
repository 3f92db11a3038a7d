#!/usr/bin/env bash
# A private SLURM cluster on this machine: one slurmctld, N slurmd ("virtual nodes") each
# with an address of its own, and a munged of its own. Nothing under /etc is touched;
# clients reach it with `SLURM_CONF=DIR/slurm.conf`. Used by tests/slurm.rs (`start`, and
# `stop` from a Drop guard) and by hand:
#
#   cluster.sh start DIR   write DIR/slurm.conf, start the daemons, wait until nodes are idle;
#                          DIR/nodes gets one line per node: NAME ADDRESS NETNS|-
#   cluster.sh stop DIR    cancel every job, stop the daemons, remove the namespaces
#                          (idempotent; reads what `start` recorded in DIR)
#
# Settings (environment, all optional):
#   SLURM_NODES=4        nodes n1..nN (at most 253 on a /24; on a /16, 1023 with namespaces,
#                        one bridge's ports, else 64768)
#   SLURM_TAG=t0         short tag naming the bridge `pfsb-TAG` and namespaces `pfs-TAG-K`
#                        (`pfsv-TAG-K` must stay within 15 characters)
#   SLURM_NET=10.61.7    the net of the node addresses. Three octets, a /24: the controller
#                        is NET.1, node K NET.(K+1). Two octets, a /16 (for more than 253
#                        nodes): the controller is NET.0.1, node K NET.R.C with
#                        R = (K-1)/253, C = (K-1)%253+2 (253 nodes a row, .2 to .254)
#   SLURM_NETNS=auto     1: each slurmd in a network namespace of its own, on a private
#                        bridge; 0: all on loopback (NET should then be 127.x.y); auto: 1
#                        when `ip netns add` works
#   SLURM_CTLD_PORT=6817 slurmctld's port
#   SLURMD_PORTS=...     one port per node (comma separated); default CTLD_PORT+1, +2, ...
#   SLURM_CPUS=4         CPUs each node claims (`SlurmdParameters=config_overrides` lets a
#                        node claim more than the machine has)
#   SLURM_GPUS=0         fake GPUs per node (`Gres=gpu:N`, character devices made with mknod
#                        under DIR/dev), so `--gpus-per-node` and CUDA_VISIBLE_DEVICES work
#
# Why namespaces: services on different nodes must not see each other's host-wide names.
# Distinct loopback addresses are enough for TCP ports, but not for abstract Unix sockets:
# `mooncake_client` binds `@mooncake_client_<port>.sock`, so two clients with the same port
# on one network namespace clash, as they never would on two machines.
#
# Big clusters: 256 nodes on 2 cores start in 10-25 s and hold about 1.6 GB of RSS (slurmd
# about 6 MB each, most of it shared: 1.7 MB each by PSS); a step costs one slurmstepd of
# about 7 MB RSS per node. Namespace nodes get MACs from K, and the controller and the nodes
# know each other's without ARP (see netns.sh): broadcasts to hundreds of ports overflow the
# kernel's receive backlog, and srun's launches then time out.
#
# Two partitions: `gpu` (every node, the default) and `small` (the first two nodes), so a
# test can ask for more nodes than a partition has. The scheduler runs on every submission
# (no batch delay, backfill every second): jobs start in well under a second.
#
# Why `proctrack/pgid`: like `proctrack/cgroup` on real clusters, it finds every process of
# a step (here by the task's process group), so a child that outlives its step's leader is
# ended with the step. `proctrack/linuxproc` follows parent links: such a child, reparented
# to init, escapes it, keeps the step's output open (the step never ends) and outlives a
# `scancel` of the step or the job.
#
# Why the order in `stop`: stopping a slurmd while steps run leaves slurmstepd orphans, so
# jobs are cancelled first and the script waits for them to end; then whatever still runs in
# the namespaces (only this cluster's processes can be there) is killed by pid.
set -euo pipefail

cmd="${1:-}"
dir="${2:-}"
if [ -z "$cmd" ] || [ -z "$dir" ]; then
    sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
mkdir -p "$dir"
dir="$(cd "$dir" && pwd -P)"
conf="$dir/slurm.conf"
export SLURM_CONF="$conf"
PATH="$PATH:/usr/sbin:/sbin"

log() { printf 'cluster.sh: %s\n' "$*" >&2; }

# shellcheck source=../netns.sh
. "$(dirname "$0")/../netns.sh"

start() {
    local nodes="${SLURM_NODES:-4}" tag="${SLURM_TAG:-t0}" net="${SLURM_NET:-10.61.7}"
    local ctld_port="${SLURM_CTLD_PORT:-6817}" cpus="${SLURM_CPUS:-4}" gpus="${SLURM_GPUS:-0}"
    local use_netns="${SLURM_NETNS:-auto}"
    local ports=() k
    if [ -n "${SLURMD_PORTS:-}" ]; then
        IFS=, read -r -a ports <<<"$SLURMD_PORTS"
    else
        for k in $(seq 1 "$nodes"); do ports+=($((ctld_port + k))); done
    fi
    [ "${#ports[@]}" -ge "$nodes" ] || { log "SLURMD_PORTS names fewer than $nodes ports"; exit 2; }
    for tool in slurmctld slurmd munged sinfo; do
        command -v "$tool" >/dev/null 2>&1 ||
            { log "\`$tool\` is not installed (apt-get install -y slurm-wlm munge)"; exit 3; }
    done
    if [ "$use_netns" = auto ]; then
        if netns_possible "pfs-probe-$$"; then use_netns=1; else use_netns=0; fi
    fi
    if [ "$use_netns" = 1 ] && [ "${net#127.}" != "$net" ]; then
        log "SLURM_NET=$net is a loopback net: namespaces need another (e.g. 10.61.7)"
        exit 2
    fi
    # A /24 (three octets) holds 253 nodes; a /16 (two octets) 253 a row, 256 rows.
    local len max
    if [[ "$net" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
        len=24 max=253
    elif [[ "$net" =~ ^[0-9]+\.[0-9]+$ ]]; then
        len=16 max=$((253 * 256))
    else
        log "SLURM_NET=$net: give three octets (a /24) or two (a /16)"
        exit 2
    fi
    # One bridge: the kernel gives a bridge at most 1024 ports.
    [ "$use_netns" = 1 ] && [ "$max" -gt 1023 ] && max=1023
    [ "$nodes" -le "$max" ] || { log "SLURM_NET=$net holds at most $max nodes here"; exit 2; }
    mkdir -p "$dir/munge" "$dir/state" "$dir/spool" "$dir/log"
    chmod 0700 "$dir/munge"
    echo "$tag $nodes $use_netns" >"$dir/cluster"

    # addrs[K]: node K's address; addrs[0] the controller's (the bridge's) in netns mode.
    local addrs=()
    if [ "$len" = 24 ]; then
        for k in $(seq 0 "$nodes"); do addrs[k]="$net.$((k + 1))"; done
    else
        addrs[0]="$net.0.1"
        for k in $(seq 1 "$nodes"); do addrs[k]="$net.$(((k - 1) / 253)).$(((k - 1) % 253 + 2))"; done
    fi
    local ctld_addr=127.0.0.1 k
    {
        for k in $(seq 1 "$nodes"); do
            if [ "$use_netns" = 1 ]; then echo "n$k ${addrs[k]} pfs-$tag-$k"; else echo "n$k ${addrs[k]} -"; fi
        done
    } >"$dir/nodes"
    if [ "$use_netns" = 1 ]; then
        local br="pfsb-$tag"
        netns_bridge "$br" "${addrs[0]}/$len" 02:00:00:01:00:00
        ctld_addr="${addrs[0]}"
        for k in $(seq 1 "$nodes"); do
            # No default route: nodes only talk within the bridge's subnet. With one, a DNS
            # query (every reverse lookup: Python's getfqdn, a bare hostname's AAAA) would go
            # to a nameserver this namespace cannot reach and time out after 10 s; without,
            # it fails at once, as on a cluster without DNS for these addresses.
            # A MAC from K: no ARP between the controller and the nodes (see netns.sh).
            netns_host "pfs-$tag-$k" "pfsv-$tag-$k" "${addrs[k]}/$len" "$br" "" \
                "$(printf '02:00:00:00:%02x:%02x' $((k / 256)) $((k % 256)))"
        done
    fi

    if [ ! -f "$dir/munge/key" ]; then
        dd if=/dev/urandom bs=1024 count=1 of="$dir/munge/key" status=none
        chmod 0400 "$dir/munge/key"
    fi
    munged --force --socket="$dir/munge/socket" --key-file="$dir/munge/key" \
        --pid-file="$dir/munge/pid" --log-file="$dir/munge/log" --seed-file="$dir/munge/seed"

    local gres="" host all="" small=""
    host="$(hostname -s)"
    if [ "$gpus" -gt 0 ]; then
        mkdir -p "$dir/dev"
        : >"$dir/gres.conf"
        for g in $(seq 0 $((gpus - 1))); do
            # Character devices like /dev/null: slurmd only needs them to exist.
            [ -e "$dir/dev/gpu$g" ] || mknod "$dir/dev/gpu$g" c 1 3
        done
        echo "Name=gpu File=$dir/dev/gpu[0-$((gpus - 1))]" >"$dir/gres.conf"
        gres=" Gres=gpu:$gpus"
    fi
    {
        echo "# Generated by tests/support/slurm/cluster.sh"
        echo "ClusterName=pf$tag"
        echo "SlurmctldHost=$host($ctld_addr)"
        echo "SlurmctldPort=$ctld_port"
        echo "SlurmUser=root"
        echo "SlurmdUser=root"
        echo "AuthType=auth/munge"
        echo "CredType=cred/munge"
        echo "AuthInfo=socket=$dir/munge/socket"
        echo "StateSaveLocation=$dir/state"
        echo "SlurmdSpoolDir=$dir/spool/%n"
        echo "SlurmctldPidFile=$dir/slurmctld.pid"
        echo "SlurmdPidFile=$dir/slurmd.%n.pid"
        echo "SlurmctldLogFile=$dir/log/slurmctld.log"
        echo "SlurmdLogFile=$dir/log/slurmd.%n.log"
        echo "SlurmdParameters=config_overrides"
        echo "ProctrackType=proctrack/pgid"
        echo "TaskPlugin=task/none"
        echo "JobAcctGatherType=jobacct_gather/none"
        echo "AccountingStorageType=accounting_storage/none"
        echo "JobCompType=jobcomp/none"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_Core"
        echo "SchedulerType=sched/backfill"
        echo "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,bf_interval=1"
        echo "MpiDefault=none"
        echo "ReturnToService=2"
        echo "KillWait=5"
        echo "MinJobAge=60"
        echo "InactiveLimit=0"
        echo "SlurmctldTimeout=30"
        echo "SlurmdTimeout=30"
        echo "MessageTimeout=10"
        [ -n "$gres" ] && echo "GresTypes=gpu"
        for k in $(seq 1 "$nodes"); do
            echo "NodeName=n$k NodeHostname=$host NodeAddr=${addrs[k]} Port=${ports[$((k - 1))]} CPUs=$cpus$gres State=UNKNOWN"
            all="$all${all:+,}n$k"
            [ "$k" -le 2 ] && small="$small${small:+,}n$k"
        done
        echo "PartitionName=gpu Nodes=$all Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
        echo "PartitionName=small Nodes=$small MaxTime=INFINITE State=UP OverSubscribe=YES"
    } >"$conf"

    slurmctld -c -f "$conf" || { log "slurmctld did not start: see $dir/log/slurmctld.log"; exit 1; }
    while read -r name _ ns; do
        if [ "$ns" = - ]; then
            slurmd -f "$conf" -N "$name" || { log "slurmd of $name did not start: see $dir/log/slurmd.$name.log"; exit 1; }
        else
            # nsenter, not `ip netns exec`: that remounts /sys, hiding /sys/fs/cgroup
            # from slurmd, which then refuses to start.
            nsenter --net="/run/netns/$ns" slurmd -f "$conf" -N "$name" ||
                { log "slurmd of $name did not start: see $dir/log/slurmd.$name.log"; exit 1; }
        fi
    done <"$dir/nodes"
    # Ready when every node is idle.
    local limit=$((30 + nodes / 4)) t0=$SECONDS
    while [ $((SECONDS - t0)) -lt "$limit" ]; do
        if [ "$(sinfo -h -p gpu -t idle -o '%D' 2>/dev/null || true)" = "$nodes" ]; then
            log "up: $nodes nodes idle (SLURM_CONF=$conf)"
            return 0
        fi
        sleep 0.1
    done
    log "the nodes did not become idle in $limit s:"
    sinfo -N -l >&2 || true
    tail -n 20 "$dir/log/slurmctld.log" >&2 || true
    exit 1
}

# SIGTERM to every pid file's process at once (each daemon takes about 2 s to wind down:
# one after another would be 10 s), then SIGKILL what is left after 5 s.
kill_pidfiles() {
    local f pid pids=()
    for f in "$@"; do
        [ -f "$f" ] || continue
        pid="$(cat "$f" 2>/dev/null || true)"
        rm -f "$f"
        [ -n "$pid" ] && kill "$pid" 2>/dev/null && pids+=("$pid")
    done
    [ "${#pids[@]}" -gt 0 ] || return 0
    for _ in $(seq 1 50); do
        local alive=0
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null && alive=1
        done
        [ "$alive" = 0 ] && return 0
        sleep 0.1
    done
    for pid in "${pids[@]}"; do
        kill -9 "$pid" 2>/dev/null || true
    done
}

stop() {
    [ -f "$dir/cluster" ] || return 0
    local tag nodes use_netns
    read -r tag nodes use_netns <"$dir/cluster"
    if [ -f "$dir/slurmctld.pid" ]; then
        scancel --quiet --user="$(id -un)" 2>/dev/null || true
        for _ in $(seq 1 100); do
            [ -z "$(squeue -h -o %i 2>/dev/null || true)" ] && break
            sleep 0.1
        done
    fi
    kill_pidfiles "$dir/slurmctld.pid" "$dir"/slurmd.*.pid
    if [ "$use_netns" = 1 ]; then
        local k
        for k in $(seq 1 "$nodes"); do
            # Only this cluster's processes live in its namespaces.
            netns_host_remove "pfs-$tag-$k" "pfsv-$tag-$k"
        done
        netns_bridge_remove "pfsb-$tag"
    fi
    kill_pidfiles "$dir/munge/pid"
    rm -f "$dir/cluster"
    log "stopped"
}

case "$cmd" in
start) start ;;
stop) stop ;;
*)
    log "unknown command \`$cmd\` (start|stop)"
    exit 2
    ;;
esac
