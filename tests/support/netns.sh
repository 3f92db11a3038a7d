# shellcheck shell=bash
# Network-namespace hosts on a private bridge: the one harness behind the ssh test hosts
# (netns_hosts.sh) and the SLURM test cluster (slurm/cluster.sh). Sourced, not run.
#
#   netns_possible NAME             can this process make network namespaces? (tries NAME)
#   netns_bridge BR NET             a bridge BR holding NET.1/24, up
#   netns_host NS VETH ADDR BR [GW] a namespace NS whose `eth0` (peer of VETH on BR) has
#                                   ADDR/24; a default route via GW when given
#   netns_host_remove NS VETH       kill every process in NS, remove NS and VETH
#   netns_bridge_remove BR          remove the bridge
#
# Every remove is idempotent. Names of interfaces are at most 15 characters: callers derive
# short tags.

netns_possible() {
    local probe=$1
    if ip netns add "$probe" 2>/dev/null; then
        ip netns del "$probe" 2>/dev/null || true
        return 0
    fi
    return 1
}

netns_bridge() {
    local br=$1 net=$2
    ip link add "$br" type bridge
    ip addr add "$net.1/24" dev "$br"
    ip link set "$br" up
}

netns_host() {
    local ns=$1 veth=$2 addr=$3 br=$4 gw=${5:-}
    ip netns add "$ns"
    ip link add "$veth" type veth peer name eth0 netns "$ns"
    ip link set "$veth" master "$br"
    ip link set "$veth" up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$addr/24" dev eth0
    ip -n "$ns" link set eth0 up
    if [ -n "$gw" ]; then
        ip -n "$ns" route add default via "$gw"
    fi
}

netns_host_remove() {
    local ns=$1 veth=$2
    if ip netns list 2>/dev/null | grep -qw "^$ns"; then
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
