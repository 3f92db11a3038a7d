# shellcheck shell=bash
# Network-namespace hosts on a private bridge: the one harness behind the ssh test hosts
# (netns_hosts.sh) and the SLURM test cluster (slurm/cluster.sh). Sourced, not run.
#
#   netns_possible NAME             can this process make network namespaces? (tries NAME)
#   netns_bridge BR NET|ADDR/LEN [BRMAC]
#                                   a bridge BR holding NET.1/24 (or ADDR/LEN), up
#   netns_host NS VETH ADDR[/LEN] BR [GW] [MAC]
#                                   a namespace NS whose `eth0` (peer of VETH on BR) has
#                                   ADDR/24 (or ADDR/LEN); a default route via GW when given
#                                   (may be empty); with MAC, `eth0` has that address and
#                                   no ARP is needed between host and bridge (below)
#   netns_host_remove NS VETH       kill every process in NS, remove NS and VETH
#   netns_bridge_remove BR          remove the bridge
#
# Every remove is idempotent. Names of interfaces are at most 15 characters: callers derive
# short tags. A bridge takes at most 1024 ports (the kernel's limit), so at most 1024 hosts.
#
# Why MACs: with MAC given, the bridge holds a permanent neighbour entry for ADDR and a
# static forwarding entry for MAC, and the namespace one for the bridge's address (BRMAC, made
# by `netns_bridge` when given one), so the host and its hosts never ask each other by ARP.
# An ARP request is a broadcast, copied to every port: with hundreds of hosts, a burst of them
# overflows the kernel's receive backlog (`netdev_max_backlog`, 1000 packets) and requests
# are dropped.

netns_possible() {
    local probe=$1
    if ip netns add "$probe" 2>/dev/null; then
        ip netns del "$probe" 2>/dev/null || true
        return 0
    fi
    return 1
}

netns_bridge() {
    local br=$1 net=$2 mac=${3:-}
    [ "${net#*/}" != "$net" ] || net="$net.1/24"
    ip link add "$br" ${mac:+address "$mac"} type bridge
    ip addr add "$net" dev "$br"
    ip link set "$br" up
}

netns_host() {
    local ns=$1 veth=$2 addr=$3 br=$4 gw=${5:-} mac=${6:-}
    [ "${addr#*/}" != "$addr" ] || addr="$addr/24"
    ip netns add "$ns"
    ip link add "$veth" type veth peer name eth0 ${mac:+address "$mac"} netns "$ns"
    ip link set "$veth" master "$br"
    if [ -n "$mac" ]; then
        bridge fdb replace "$mac" dev "$veth" master static
        ip neigh replace "${addr%/*}" lladdr "$mac" dev "$br" nud permanent
    fi
    ip link set "$veth" up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$addr" dev eth0
    ip -n "$ns" link set eth0 up
    if [ -n "$mac" ]; then
        local braddr
        braddr=$(ip -o -4 addr show dev "$br" | awk '{ print $4; exit }')
        ip -n "$ns" neigh replace "${braddr%/*}" lladdr "$(cat "/sys/class/net/$br/address")" \
            dev eth0 nud permanent
    fi
    if [ -n "$gw" ]; then
        ip -n "$ns" route add default via "$gw"
    fi
}

netns_host_remove() {
    local ns=$1 veth=$2
    # `ip netns add` names its namespaces under /run/netns. (Not `ip netns list | grep -q`:
    # with many namespaces, grep's early exit fails `ip` with SIGPIPE, and under `pipefail`
    # the namespace would be left.)
    if [ -e "/run/netns/$ns" ]; then
        local pids
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
    fi
    ip link del "$veth" 2>/dev/null || true
}

netns_bridge_remove() {
    ip link del "$1" 2>/dev/null || true
}
