#!/usr/bin/env bash
# The time from a child's exit to the tool's next start, prl-flow against ninja, on the same
# DAG (benches/gen_dag.py; 2,000 tasks by default): with as many children as cores, each
# exit leaves a core idle until the tool starts the next task, so this latency is what a
# full run at -j2 on 2 cores pays per task on top of the children's own time.
#
#   benches/spawn_gap.sh [--rounds N] [--jobs J] [--width W] [--work DIR]
#
# Each round runs ninja, then prl-flow, under `perf record` of the scheduler's fork, exec
# and exit tracepoints (system-wide), and prints per tool: the time from its exec to its
# first fork (start-up), from the last child's exit to its own (the end), the whole run,
# and the median and mean of the gaps between each child's exit and the tool's next fork.
# Needs perf (Debian: linux-perf) with tracepoints readable (root, or
# kernel.perf_event_paranoid <= -1), ninja and python3; prl-flow is the release binary
# (cargo build --release), or $PRL_FLOW.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
rounds=3
jobs=2
width=200
work=${TMPDIR:-/tmp}/prl-flow-spawn-gap
prl=${PRL_FLOW:-$root/target/release/prl-flow}

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case $1 in
        --rounds) rounds=$2; shift 2 ;;
        --jobs) jobs=$2; shift 2 ;;
        --width) width=$2; shift 2 ;;
        --work) work=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument \`$1\`" >&2; usage >&2; exit 2 ;;
    esac
done
. "$here/dag_setup.sh"
dag_setup perf ninja python3

# One traced run of `name` (the command's basename, as the kernel names its exec).
traced() {
    local name=$1
    shift
    rm -rf stamps state .ninja_log .ninja_deps
    mkdir stamps
    perf record -q -a -o "$work/trace.data" \
        -e sched:sched_process_fork,sched:sched_process_exit,sched:sched_process_exec \
        -- "$@" >/dev/null 2>&1
    perf script -i "$work/trace.data" 2>/dev/null | python3 -c '
import bisect, re, sys
name = sys.argv[1]
tool = t_exec = t_exit = None
forks, exits = [], {}
for line in sys.stdin:
    m = re.match(r"\s*\S+\s+(\d+)\s+\[\d+\]\s+([\d.]+): sched:(\w+): (.*)", line)
    if not m:
        continue
    pid, t, event, rest = int(m.group(1)), float(m.group(2)), m.group(3), m.group(4)
    if event == "sched_process_exec" and tool is None and rest.split()[0].endswith("/" + name):
        tool, t_exec = pid, t
    if tool is None:
        continue
    if event == "sched_process_fork" and pid == tool:
        forks.append((t, int(re.search(r"child_pid=(\d+)", rest).group(1))))
    elif event == "sched_process_exit":
        exits[pid] = t
        if pid == tool:
            t_exit = t
times = [t for t, _ in forks]
children = [c for _, c in forks if c in exits and c != tool]
gaps = []
for c in children:
    i = bisect.bisect_left(times, exits[c])
    if i < len(times):
        gaps.append(times[i] - exits[c])
if not gaps or t_exit is None:
    sys.exit("no run of %s found in the trace" % name)
gaps.sort()
last = max(exits[c] for c in children)
print("%-9s start %6.1f ms  end %5.1f ms  run %7.3f s  exit->next start: median %4.0f us, mean %4.0f us"
      % (name, (forks[0][0] - t_exec) * 1e3, (t_exit - last) * 1e3, t_exit - t_exec,
         gaps[len(gaps) // 2] * 1e6, sum(gaps) / len(gaps) * 1e6))
' "$name"
}

echo "$((10 * width)) tasks, -j$jobs; load average $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq "$rounds"); do
    echo "== round $r of $rounds"
    traced ninja ninja -j"$jobs"
    traced "$(basename "$prl")" "$prl" run flow.toml -j"$jobs" --state-dir state --no-progress -q
done
