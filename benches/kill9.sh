#!/usr/bin/env bash
# kill -9 stress: N bring-ups of a small workflow with the mock engine, each killed with
# SIGKILL at a random moment of its first 300 ms, then `run --resume` and `down`. Counts
#   duplicates  a task whose process was started twice (each task writes a start line),
#   orphans     a process of the bring-up still alive after `down` (its cwd is under the
#               try's `tasks/` dir, where every task starts: its `dir`),
#   failures    a resume or down that did not exit 0, or a resume that left a service down.
# Prints the counts and exits 1 if any is not 0.
#
#   benches/kill9.sh                 500 tries
#   N=50 benches/kill9.sh            fewer
#   WINDOW_MS=300 DELAY=150ms ...    the kill window, the mock engines' load time
#   BUILD=0 benches/kill9.sh         use the binaries already built (target/debug)
#
# The workflow (written per try, with free ports): a one-shot `prep`; two mock engines
# `e1`, `e2` (services, ready on /health) after it; a one-shot `client` after both; a third
# engine `e3` after `client`. A bring-up takes a few hundred ms, so the kills land in every
# phase: before the journal exists, between a spawn and its record, while engines load, while
# one-shots run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

N=${N:-500}
WINDOW_MS=${WINDOW_MS:-300}
DELAY=${DELAY:-150ms}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET/debug/prl-flow
MOCK=$TARGET/debug/prl-flow-mock-engine
SERVICES="e1 e2 e3"

if [ "${BUILD:-1}" != 0 ]; then
    cargo build --workspace --quiet
fi
for f in "$BIN" "$MOCK"; do
    [ -x "$f" ] || { echo "kill9.sh: $f is missing (cargo build --workspace)" >&2; exit 2; }
done
command -v python3 >/dev/null || { echo "kill9.sh needs python3 (free ports)" >&2; exit 2; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/prl-flow-kill9.XXXXXX")
RUN_PID=
cleanup() {
    [ -n "$RUN_PID" ] && kill -9 "$RUN_PID" 2>/dev/null || true
    # Whatever a failed try left: its processes are found by their cwd, as below.
    for pid in $(procs_under "$TMP"); do kill -9 "$pid" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT

# Live (not zombie) processes whose working directory is $1 or under it.
procs_under() {
    local dir=$1 p pid cwd state
    for p in /proc/[0-9]*; do
        pid=${p#/proc/}
        cwd=$(readlink "$p/cwd" 2>/dev/null) || continue
        case "$cwd" in "$dir" | "$dir"/*) ;; *) continue ;; esac
        state=$(sed 's/.*) //' "$p/stat" 2>/dev/null | cut -d' ' -f1) || continue
        case "$state" in Z | X | "") continue ;; esac
        echo "$pid"
    done
}

free_ports() {
    python3 -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))'
}

write_workflow() {
    local dir=$1 p1=$2 p2=$3 p3=$4
    engine() { # id port
        printf '\n[[task]]\nid = "%s"\ndir = "tasks"\n' "$1"
        printf 'run = %s\n' "'echo $1 >> \"\$WORK/starts\"; exec \"$MOCK\" serve m --port $2'"
        printf 'service = true\nenv = { PRL_MOCK_STARTUP_DELAY = "%s" }\n' "$DELAY"
        printf 'ready = { http = "http://127.0.0.1:%s/health", interval = "20ms" }\n' "$2"
    }
    {
        printf 'name = "kill9"\n'
        printf '\n[[task]]\nid = "prep"\ndir = "tasks"\nrun = %s\n' "'echo prep >> \"\$WORK/starts\"; sleep 0.05'"
        engine e1 "$p1"
        printf 'needs = ["prep"]\n'
        engine e2 "$p2"
        printf 'needs = ["prep"]\n'
        printf '\n[[task]]\nid = "client"\ndir = "tasks"\nrun = %s\nneeds = ["e1", "e2"]\n' \
            "'echo client >> \"\$WORK/starts\"; sleep 0.05'"
        engine e3 "$p3"
        printf 'needs = ["client"]\n'
    } >"$dir/wf.toml"
}

dups=0 orphans=0 failures=0 finished_first=0
say_fail() { printf 'try %d: %s\n' "$1" "$2" >&2; }

for i in $(seq 1 "$N"); do
    dir=$TMP/$i
    mkdir -p "$dir/tasks"
    read -r p1 p2 p3 < <(free_ports)
    write_workflow "$dir" "$p1" "$p2" "$p3"
    export WORK=$dir
    cd "$dir"
    at_ms=$((RANDOM % WINDOW_MS))

    "$BIN" -q run wf.toml --state-dir st >run.out 2>&1 &
    RUN_PID=$!
    sleep "$(printf '0.%03d' "$at_ms")"
    # A run that already ended is a zombie until `wait`: count it as not killed.
    case "$(sed 's/.*) //' "/proc/$RUN_PID/stat" 2>/dev/null | cut -d' ' -f1)" in
    Z | X | "") finished_first=$((finished_first + 1)) ;;
    *) kill -9 "$RUN_PID" 2>/dev/null || true ;;
    esac
    wait "$RUN_PID" 2>/dev/null || true
    RUN_PID=

    if ! timeout 120 "$BIN" -q run wf.toml --state-dir st --resume >resume.out 2>&1; then
        failures=$((failures + 1))
        say_fail "$i" "resume after a kill at ${at_ms}ms failed: $(tail -3 resume.out)"
    else
        # Every service runs, once.
        live=$(procs_under "$dir/tasks" | wc -l)
        if [ "$live" -ne 3 ]; then
            failures=$((failures + 1))
            say_fail "$i" "after the resume (kill at ${at_ms}ms) $live processes run, not 3"
        fi
    fi
    for id in prep e1 e2 client e3; do
        n=$(grep -cx "$id" starts 2>/dev/null || true)
        if [ "${n:-0}" -gt 1 ]; then
            dups=$((dups + 1))
            say_fail "$i" "\`$id\` started $n times (kill at ${at_ms}ms)"
        fi
    done

    if ! timeout 60 "$BIN" -q down --state-dir st >down.out 2>&1; then
        failures=$((failures + 1))
        say_fail "$i" "down failed: $(tail -3 down.out)"
    fi
    left=$(procs_under "$dir/tasks")
    if [ -n "$left" ]; then
        orphans=$((orphans + $(echo "$left" | wc -l)))
        say_fail "$i" "left after down (kill at ${at_ms}ms): $(echo "$left" | tr '\n' ' ')"
        for pid in $left; do kill -9 "$pid" 2>/dev/null || true; done
    fi
    cd "$ROOT"
    rm -rf "$dir"
    if [ $((i % 50)) -eq 0 ]; then
        printf '%d/%d tries: %d duplicates, %d orphans, %d failures\n' \
            "$i" "$N" "$dups" "$orphans" "$failures" >&2
    fi
done

printf 'kill9: %d tries (%d finished before the kill), %d duplicates, %d orphans, %d failures (load average %s)\n' \
    "$N" "$finished_first" "$dups" "$orphans" "$failures" "$(cut -d' ' -f1-3 /proc/loadavg)"
[ "$dups" -eq 0 ] && [ "$orphans" -eq 0 ] && [ "$failures" -eq 0 ]
