#!/usr/bin/env bash
# The network study's topology (bench/network.py): two "hosts", a switch and a client, each a
# network namespace named from PREFIX, joined by veth "wires" shaped with htb to RATE each way.
#
#   scripts/net-hosts.sh up PREFIX [RATE]   # RATE in tc's syntax, default 1gbit; does `down` first
#   scripts/net-hosts.sh down PREFIX        # removes every namespace of PREFIX; never fails
#   scripts/net-hosts.sh fdb PREFIX MAC     # which switch port (a, b, c) forwards MAC; "none", exit 1
#
#   ${PREFIX}a  host a: bridge br0 10.0.0.1/24 <- tap0 (the guest's TAP, persistent), wire
#   ${PREFIX}b  host b: bridge br0 10.0.0.2/24 <- tap0, wire
#   ${PREFIX}w  switch: bridge br0 (no address) <- pa (wire to host a), pb (to host b), pc (client)
#   ${PREFIX}c  client: eth0 10.0.0.100/24 (wire to the switch)
#
# Every wire end (a:wire, b:wire, c:eth0, w:pa, w:pb, w:pc) gets `htb default 10` with one class at
# RATE (rate = ceil), so each wire carries RATE in each direction. Bridges: STP off, forward delay 0,
# MAC ageing 300 s set explicitly, so that after a migration the switch's and the hosts' learned
# entries move because the target announced the guest (or the guest spoke), never because an entry
# aged out. IPv6 is off in every namespace (no router solicitations or DAD on the wires).
# Interface names live inside the namespaces, so they never collide between prefixes; keep PREFIX
# short (namespace names are PREFIX plus one letter). Prints nothing on success; on failure says
# which command failed (and removes what it had made).
set -u

usage() {
    echo "usage: $0 up PREFIX [RATE] | down PREFIX | fdb PREFIX MAC" >&2
    exit 2
}

run() {
    local out
    if ! out=$("$@" 2>&1); then
        out=$(printf '%s\n' "$out" | head -2 | tr '\n' ' ')
        echo "net-hosts.sh: failed: $*${out:+: ${out% }}" >&2
        return 1
    fi
}

down() {
    local p=$1 s
    for s in a b w c; do
        ip netns del "$p$s" >/dev/null 2>&1 || true
    done
    return 0
}

shape() { # NS DEV RATE
    run tc -n "$1" qdisc add dev "$2" root handle 1: htb default 10 &&
        run tc -n "$1" class add dev "$2" parent 1: classid 1:10 htb rate "$3" ceil "$3"
}

bridge_up() { # NS
    run ip -n "$1" link add br0 type bridge stp_state 0 forward_delay 0 ageing_time 30000 &&
        run ip -n "$1" link set br0 type bridge ageing_time 30000 &&
        run ip -n "$1" link set br0 up
}

up() {
    local p=$1 rate=$2 s h
    down "$p"
    for s in a b w c; do
        run ip netns add "$p$s" || return 1
        run ip -n "$p$s" link set lo up || return 1
        run ip netns exec "$p$s" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 || return 1
    done
    bridge_up "${p}w" || return 1
    # Hosts a and b: bridge, the guest's TAP, the wire to the switch.
    for h in a b; do
        bridge_up "$p$h" || return 1
        run ip -n "$p$h" addr add "10.0.0.$([ $h = a ] && echo 1 || echo 2)/24" dev br0 || return 1
        run ip -n "$p$h" tuntap add dev tap0 mode tap || return 1
        run ip -n "$p$h" link set tap0 master br0 || return 1
        run ip -n "$p$h" link set tap0 up || return 1
        run ip link add wire netns "$p$h" type veth peer name "p$h" netns "${p}w" || return 1
        run ip -n "$p$h" link set wire master br0 || return 1
        run ip -n "$p$h" link set wire up || return 1
        shape "$p$h" wire "$rate" || return 1
        run ip -n "${p}w" link set "p$h" master br0 || return 1
        run ip -n "${p}w" link set "p$h" up || return 1
        shape "${p}w" "p$h" "$rate" || return 1
    done
    # The client: one interface, straight onto the switch.
    run ip link add eth0 netns "${p}c" type veth peer name pc netns "${p}w" || return 1
    run ip -n "${p}c" addr add 10.0.0.100/24 dev eth0 || return 1
    run ip -n "${p}c" link set eth0 up || return 1
    shape "${p}c" eth0 "$rate" || return 1
    run ip -n "${p}w" link set pc master br0 || return 1
    run ip -n "${p}w" link set pc up || return 1
    shape "${p}w" pc "$rate" || return 1
}

fdb() { # PREFIX MAC: the switch port that MAC's learned entry points to
    local p=$1 mac out port
    mac=$(echo "$2" | tr 'A-F' 'a-f')
    if ! out=$(bridge -n "${p}w" fdb show br br0 2>&1); then
        echo "net-hosts.sh: failed: bridge -n ${p}w fdb show br br0: $out" >&2
        exit 1
    fi
    # Lines: "52:54:00:12:34:56 dev pb master br0" (learned), "... vlan 1 master br0 permanent" (own).
    port=$(echo "$out" | awk -v m="$mac" '$1 == m && $2 == "dev" && $0 !~ /permanent/ { print $3; exit }')
    case "$port" in
        pa | pb | pc) echo "${port#p}" ;;
        "") echo none; exit 1 ;;
        *) echo "$port" ;;
    esac
}

[ $# -ge 2 ] || usage
case "$1" in
    up)
        [ $# -le 3 ] || usage
        if ! up "$2" "${3:-1gbit}"; then
            down "$2"
            exit 1
        fi
        ;;
    down)
        [ $# -eq 2 ] || usage
        down "$2"
        ;;
    fdb)
        [ $# -eq 3 ] || usage
        fdb "$2" "$3"
        ;;
    *) usage ;;
esac
exit 0
