#!/usr/bin/env bash
# prl-flow against ninja on the same 10,000-task DAG (10 layers of 1,000; each task needs 2
# random tasks of the layer before; fixed seed; every task `/bin/true && touch stamps/ID`).
#
#   benches/ninja_compare.sh [--rounds N] [--noop-runs N] [--work DIR] [--jobs "2 16"]
#                          [--width 1000]   (tasks per layer; smaller for a quick check)
#                          [--no-hyperfine] (time with the plain loop even if hyperfine is here)
#
# Measures, alternating between the tools within each round so that noise from anything
# else on the machine hits both alike:
#   full-*   a full run from clean (ninja: no stamps, no .ninja_log/.ninja_deps; prl-flow: no
#            stamps, a fresh --state-dir), at each -j;
#   floor    the process-spawn floor: 10,000 `/bin/sh -c '/bin/true && touch floor/ID'`,
#            2 at a time, by `spawn_floor.rs` (one thread, `posix_spawn`, `waitpid(-1)`; no
#            graph, journal or log; built here with `rustc -O`);
#   floor-wrapped  the same with the shell script prl-flow's local backend wraps a one-shot
#            in (its pid and attempt to its pid file `run/ID.pid`, its attempt exported, a
#            trap that appends the exit status to that file): what the wrapper costs inside
#            the child, with no scheduler at all;
#   floor-guaranteed-*  at each -j, the wrapped floor with a log file per task (`logs/ID.log`,
#            opened by the spawner) and a journal of prl-flow's line sizes, each record
#            written before its spawn: what prl-flow's promises about a one-shot cost at
#            their least, with no engine around them;
#   noop-*   the no-op rerun: ninja with everything up to date; `prl-flow run --resume` with
#            every task recorded as done.
# and once, before the rounds, what the files prl-flow keeps per task of a workflow (a log
# file, a pid file) cost on this file system, with no scheduler involved.
#
# Uses hyperfine when present (apt-get install -y hyperfine), else a plain timing loop;
# ninja is required (apt-get install -y ninja-build). prl-flow is the release binary
# (cargo build --release), or $PRL_FLOW. Progress output is off on both sides (ninja
# --quiet; prl-flow --no-progress -q), so that neither pays for a terminal.
#
# Results: a table on stdout (each measure's median, min, max and CPU; then, within each
# round, the full-run ratio prl-flow/ninja at each -j, the floors against ninja at -j2 and
# prl-flow against the wrapped floor, the guaranteed floor against ninja and prl-flow
# against it at each -j, with their medians over the rounds), and the raw
# hyperfine JSON under WORK/results/.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
rounds=3
noop_runs=10
work=${TMPDIR:-/tmp}/prl-flow-vs-ninja
jobs_list="2 16"
width=1000
prl=${PRL_FLOW:-$root/target/release/prl-flow}
use_hyperfine=1

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case $1 in
        --rounds) rounds=$2; shift 2 ;;
        --noop-runs) noop_runs=$2; shift 2 ;;
        --work) work=$2; shift 2 ;;
        --jobs) jobs_list=$2; shift 2 ;;
        --width) width=$2; shift 2 ;;
        --no-hyperfine) use_hyperfine=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument \`$1\`" >&2; usage >&2; exit 2 ;;
    esac
done

need() {
    if ! command -v "$1" >/dev/null 2>&1; then
        echo "error: \`$1\` is not installed; $2" >&2
        exit 2
    fi
}
need ninja "install it with \`apt-get install -y ninja-build\`"
need python3 "the DAG generator and the summary need it"
if [ ! -x "$prl" ]; then
    echo "error: no release binary at \`$prl\`; build it with \`cargo build --release\` (or set PRL_FLOW)" >&2
    exit 2
fi
if [ "$use_hyperfine" = 0 ]; then
    have_hyperfine=0
elif command -v hyperfine >/dev/null 2>&1; then
    have_hyperfine=1
else
    have_hyperfine=0
    echo "note: hyperfine is not installed (\`apt-get install -y hyperfine\`); timing with a plain loop" >&2
fi
ninja_quiet=""
if ninja --help 2>&1 | grep -q -- '--quiet'; then
    ninja_quiet="--quiet"
fi

need rustc "it builds benches/spawn_floor.rs"

mkdir -p "$work"
work=$(cd "$work" && pwd)
floor=$work/spawn_floor
rustc -O --edition 2021 "$here/spawn_floor.rs" -o "$floor"
full=$work/full
noop=$work/noop
results=$work/results
rm -rf "$full" "$noop" "$results"
mkdir -p "$results"
tasks=$((10 * width))
python3 "$here/gen_dag.py" "$full" --layers 10 --width "$width"
# The no-op dirs are one per tool: a prl-flow run must not touch ninja's stamps.
python3 "$here/gen_dag.py" "$noop/ninja" --layers 10 --width "$width" >/dev/null
python3 "$here/gen_dag.py" "$noop/prl-flow" --layers 10 --width "$width" >/dev/null

{
    echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "kernel: $(uname -r); file system of $work: $(df -T "$work" | awk 'NR==2 {print $2}')"
    echo "ninja $(ninja --version); $("$prl" --version); $(hyperfine --version 2>/dev/null || echo 'no hyperfine')"
    echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$results/machine.txt"

# What prl-flow's per-task files cost here, apart from any scheduler: log files and pid
# files, each in one directory, created from fresh and again right after an `rm -rf` of the
# same (as between the full runs below).
python3 - "$work/fsprobe" "$tasks" <<'EOF' | tee "$results/files.txt"
import os, shutil, sys, time
base, n = sys.argv[1], int(sys.argv[2])
def each(label, f):
    t = time.perf_counter()
    for i in range(n):
        f(i)
    print(f"files: {label}: {(time.perf_counter() - t) * 1e6 / n:.0f} us per task")
for when in ("fresh", "after rm -rf"):
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(f"{base}/run"); os.makedirs(f"{base}/logs")
    each(f"create logs/ID.log ({when})", lambda i: open(f"{base}/logs/{i}.log", "a").close())
    each(f"create run/ID.pid ({when})", lambda i: open(f"{base}/run/{i}.pid", "w").close())
shutil.rmtree(base)
EOF

# The no-op state: one full run of each tool, not timed.
(cd "$noop/ninja" && mkdir -p stamps && ninja $ninja_quiet -j16 >/dev/null)
(cd "$noop/prl-flow" && mkdir -p stamps && "$prl" run flow.toml -j16 --state-dir state --no-progress -q)
# The workflow as generated (relative stamp paths) leaves its stamps beside the file.
made=$(find "$noop/prl-flow/stamps" -type f | wc -l)
if [ "$made" != "$tasks" ]; then
    echo "error: prl-flow made $made of $tasks stamps in $noop/prl-flow/stamps" >&2
    exit 1
fi


# name, prepare, command: in the order they alternate.
full_names=() full_prepare=() full_cmds=()
for j in $jobs_list; do
    full_names+=("full-ninja-j$j")
    full_prepare+=("rm -rf stamps .ninja_log .ninja_deps && mkdir stamps")
    full_cmds+=("ninja $ninja_quiet -j$j >/dev/null")
    full_names+=("full-prl-flow-j$j")
    full_prepare+=("rm -rf stamps state && mkdir stamps")
    full_cmds+=("'$prl' run flow.toml -j$j --state-dir state --no-progress -q")
done
full_names+=("floor-spawn-j2")
full_prepare+=("rm -rf floor && mkdir floor")
full_cmds+=("'$floor' $tasks 2 floor")
# With the wrapper's script as `plugins/local/src/wrapper.rs` writes it for a one-shot whose
# command is a shell line (`$0` is its pid file).
full_names+=("floor-spawn-wrapped-j2")
full_prepare+=("rm -rf floor run && mkdir floor run")
full_cmds+=("'$floor' $tasks 2 floor --wrapped")
# The guaranteed floor at each -j: the wrapper, a log file per task and a journal written
# ahead of each start, with no engine around them (what prl-flow promises of a one-shot,
# at its least).
for j in $jobs_list; do
    full_names+=("floor-guaranteed-j$j")
    full_prepare+=("rm -rf floor run logs journal.log && mkdir floor run logs")
    full_cmds+=("'$floor' $tasks $j floor --wrapped --logged --journal journal.log")
done

# No shell around these (hyperfine -N): a shell's start-up is not small next to a no-op.
noop_names=("noop-ninja" "noop-prl-flow-resume")
noop_cmds=("ninja $ninja_quiet -C $noop/ninja -j2"
    "$prl run $noop/prl-flow/flow.toml --resume --state-dir $noop/prl-flow/state --no-progress -q")

# Runs commands in $dir: hyperfine if present (one JSON file per call), else a timing loop
# writing the same JSON shape. Arguments: dir, json, runs, mode (`shell`, or `noshell`: no
# shell and one warm-up run), then name/prepare/command triples (prepare may be empty).
measure() {
    local dir=$1 json=$2 runs=$3 mode=$4
    shift 4
    if [ "$have_hyperfine" = 1 ]; then
        local args=(--runs "$runs" --export-json "$json" --style basic)
        if [ "$mode" = noshell ]; then
            args+=(--shell=none --warmup 1)
        fi
        local names=() cmds=() preps=()
        while [ $# -gt 0 ]; do
            names+=("$1"); preps+=("${2:-true}"); cmds+=("$3"); shift 3
        done
        for p in "${preps[@]}"; do args+=(--prepare "$p"); done
        for n in "${names[@]}"; do args+=(--command-name "$n"); done
        (cd "$dir" && hyperfine "${args[@]}" "${cmds[@]}" >&2)
    else
        local first=1
        echo '{"results": [' >"$json"
        while [ $# -gt 0 ]; do
            local name=$1 prep=${2:-true} cmd=$3 times=""
            shift 3
            for _ in $(seq "$runs"); do
                (cd "$dir" && sh -c "$prep")
                local t0 t1
                t0=$(date +%s%N)
                (cd "$dir" && sh -c "$cmd")
                t1=$(date +%s%N)
                times="$times${times:+, }$(python3 -c "print(($t1 - $t0) / 1e9)")"
            done
            [ $first = 1 ] || echo ',' >>"$json"
            first=0
            echo "{\"command\": \"$name\", \"times\": [$times]}" >>"$json"
            echo "$name: $times" >&2
        done
        echo ']}' >>"$json"
    fi
}

for r in $(seq "$rounds"); do
    echo "== round $r of $rounds (load average $(cut -d' ' -f1-3 /proc/loadavg))" >&2
    triples=()
    for i in "${!full_names[@]}"; do
        triples+=("${full_names[$i]}" "${full_prepare[$i]}" "${full_cmds[$i]}")
    done
    measure "$full" "$results/full-$r.json" 1 shell "${triples[@]}"
    triples=()
    for i in "${!noop_names[@]}"; do
        triples+=("${noop_names[$i]}" "" "${noop_cmds[$i]}")
    done
    measure "$noop" "$results/noop-$r.json" "$noop_runs" noshell "${triples[@]}"
done

# Sanity: the no-op runs did nothing.
if ! (cd "$noop/ninja" && ninja -n -j2 | grep -q 'no work to do'); then
    echo "warning: ninja's no-op state is not up to date" >&2
fi


python3 - "$results" <<'EOF'
import glob, json, statistics, sys
results = sys.argv[1]
rows = {}
for path in sorted(glob.glob(f"{results}/*-[0-9]*.json")):
    with open(path) as f:
        for r in json.load(f)["results"]:
            row = rows.setdefault(r["command"], {"times": [], "cpu": []})
            row["times"] += r["times"]
            if "user" in r and "system" in r:
                row["cpu"].append(r["user"] + r["system"])
print()
print("| what | runs | median (s) | min (s) | max (s) | CPU user+sys (s, mean) |")
print("|---|---:|---:|---:|---:|---:|")
for name, row in rows.items():
    t = row["times"]
    cpu = f"{statistics.mean(row['cpu']):.2f}" if row["cpu"] else "-"
    print(f"| {name} | {len(t)} | {statistics.median(t):.3f} | {min(t):.3f} | {max(t):.3f} | {cpu} |")

# Each round's full runs ran one right after the other: the ratio within a round cancels
# the machine's drift between rounds, which is larger than the gap being measured.
ratios = {}
rounds = glob.glob(f"{results}/full-[0-9]*.json")
for path in sorted(rounds, key=lambda p: int(p.rsplit("-", 1)[1].removesuffix(".json"))):
    with open(path) as f:
        times = {r["command"]: statistics.median(r["times"]) for r in json.load(f)["results"]}
    for name, t in times.items():
        if name.startswith("full-prl-flow-j"):
            j = name.removeprefix("full-prl-flow-j")
            ninja = times.get(f"full-ninja-j{j}")
            if ninja:
                ratios.setdefault(f"prl-flow / ninja, -j{j}", []).append(t / ninja)
            # What the guarantees cost at their least, against ninja, and what prl-flow's
            # engine adds to them.
            floor = times.get(f"floor-guaranteed-j{j}")
            if floor and ninja:
                ratios.setdefault(f"floor-guaranteed / ninja, -j{j}", []).append(floor / ninja)
            if floor:
                ratios.setdefault(f"prl-flow / floor-guaranteed, -j{j}", []).append(t / floor)
    # The floors against ninja at -j2, and prl-flow against the wrapped floor: what the
    # wrapper alone costs with no scheduler at all, and what prl-flow adds to it.
    pairs = [
        ("floor-spawn-j2", "full-ninja-j2"),
        ("floor-spawn-wrapped-j2", "full-ninja-j2"),
        ("floor-spawn-wrapped-j2", "floor-spawn-j2"),
        ("full-prl-flow-j2", "floor-spawn-wrapped-j2"),
    ]
    for a, b in pairs:
        if a in times and b in times:
            ratios.setdefault(f"{a} / {b}", []).append(times[a] / times[b])
if ratios:
    print()
    print("| within each round | per round | median of the rounds |")
    print("|---|---|---:|")
    for what, r in ratios.items():
        each = ", ".join(f"{x:.3f}" for x in r)
        print(f"| {what} | {each} | {statistics.median(r):.3f}× |")
EOF
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$results/machine.txt"
