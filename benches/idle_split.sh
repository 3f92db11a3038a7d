#!/usr/bin/env bash
# Where the cores idle during a full run, prl-flow against ninja, on the same DAG
# (benches/gen_dag.py; 10,000 tasks by default) at -j2: with as many children as cores, a
# core that idles is time the run loses. Each round runs ninja, then prl-flow, under
# `perf sched record` (system-wide scheduler events), and prints per tool:
#
#   wall     the run's wall time;
#   idle     core time spent idle during the run (both cores);
#   spawn    of that, idle that began when the tool blocked in a spawn (`posix_spawn` waits
#            until the child has called `exec`): the kernel put the new child on the other
#            core, which was busy, and this core had nothing else to run;
#   sleep    idle that began when the tool went to sleep otherwise (waiting for an exit);
#   shell    idle that began when a child's shell blocked (waiting for its own child);
#   other    idle that began after anything else (a child that ended, a kernel thread);
#   tool     the tool's main thread: time running, and time runnable but waiting for a core;
# and on a second line: the share of new children that the kernel started on the tool's own
# core, and how long the tool waited for a core after a new child's `exec` woke it (the end
# of `posix_spawn`), against its other wake-ups.
#
#   benches/idle_split.sh [--rounds N] [--jobs J] [--width W] [--work DIR] [--plain]
#
# Recording costs CPU of its own and stretches the runs. With --plain nothing is recorded:
# each run prints only its wall time and the core time the machine spent idle and busy
# during it (from /proc/stat), without the split but undisturbed.
#
# Needs perf (Debian: linux-perf) with scheduler tracepoints readable (root, or
# kernel.perf_event_paranoid <= -1), ninja and python3; prl-flow is the release binary
# (cargo build --release), or $PRL_FLOW.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
rounds=3
jobs=2
width=1000
work=${TMPDIR:-/tmp}/prl-flow-idle-split
prl=${PRL_FLOW:-$root/target/release/prl-flow}
plain=0

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case $1 in
        --rounds) rounds=$2; shift 2 ;;
        --jobs) jobs=$2; shift 2 ;;
        --width) width=$2; shift 2 ;;
        --work) work=$2; shift 2 ;;
        --plain) plain=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument \`$1\`" >&2; usage >&2; exit 2 ;;
    esac
done
. "$here/dag_setup.sh"
if [ "$plain" = 1 ]; then
    dag_setup ninja python3
else
    dag_setup perf ninja python3
fi

# One recorded run of `name` (the command name the kernel gives the tool's process).
recorded() {
    local name=$1
    shift
    rm -rf stamps state .ninja_log .ninja_deps
    mkdir stamps
    local t0 t1
    t0=$(date +%s%N)
    perf sched record -q -o "$work/sched.data" -- "$@" >/dev/null 2>&1
    t1=$(date +%s%N)
    perf sched timehist -w -i "$work/sched.data" 2>/dev/null | python3 -c '
import collections, re, sys
name, wall = sys.argv[1], float(sys.argv[2])
lines = []
seen = collections.Counter()
for line in sys.stdin:
    # The task is `<idle>`, `comm[tid]` or `comm[tid/pid]`, and a comm may hold spaces.
    m = re.match(r"\s*([\d.]+)\s+\[(\d+)\]\s+(<idle>|.+?\[[\d/]+\])\s+(.*)", line)
    if not m:
        continue
    t, cpu, task, rest = float(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
    lines.append((cpu, task, rest))
    if task.startswith(name + "["):
        seen[task] += 1
if not seen:
    sys.exit("no run of %s found in the trace" % name)
# The tool is the process of that name seen most: a spawned child bears the name only
# until its exec.
tool = seen.most_common(1)[0][0]
last = {}      # per core: what last ran there ("tool", "tool-spawned", or a command name)
spawned = {}   # per core: the tool woke a new child since it last ran there
idle = collections.Counter()
running = waiting = 0.0
for cpu, task, rest in lines:
    if rest.startswith("awakened:"):
        if task == tool and rest.split()[1].startswith(name + "["):
            spawned[cpu] = True
        continue
    f = rest.split()
    if len(f) < 3:
        continue
    _wait, delay, run = (float(x) for x in f[:3])
    if task == "<idle>":
        before = last.get(cpu, "")
        kind = ("spawn" if before == "tool-spawned" else "sleep" if before == "tool"
                else "shell" if before == "sh" else "other")
        idle[kind] += run
        idle["all"] += run
        continue
    if task == tool:
        running += run
        waiting += delay
        last[cpu] = "tool-spawned" if spawned.get(cpu) else "tool"
    else:
        last[cpu] = task.split("[")[0]
    spawned[cpu] = False
print("%-9s wall %6.2f s  idle %5.0f ms (spawn %5.0f, sleep %5.0f, shell %5.0f, other %4.0f)"
      "  tool: running %5.0f ms, waiting %5.0f ms"
      % (name, wall, idle["all"], idle["spawn"], idle["sleep"], idle["shell"], idle["other"],
         running, waiting))
' "$name" "$(python3 -c "print(($t1 - $t0) / 1e9)")"
    # Where the tool's new children start, and how long the tool then waits for a core
    # when a new child's `exec` wakes it (the end of `posix_spawn`), against its other
    # wake-ups (a child's end, mostly).
    perf script -i "$work/sched.data" 2>/dev/null | python3 -c '
import collections, re, sys
name = sys.argv[1]
pat = re.compile(r"\s*(.+?)\s+(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+sched:(\w+):\s+(.*)")
events = []
spawners = collections.Counter()
for line in sys.stdin:
    m = pat.match(line)
    if not m:
        continue
    comm, pid, cpu, t, ev, rest = m.groups()
    fields = dict(re.findall(r"(\w+)=(\S+)", rest))
    events.append((int(pid), int(cpu), float(t), ev, fields))
    if ev == "sched_wakeup_new" and comm.startswith(name):
        spawners[int(pid)] += 1
if not spawners:
    sys.exit("no spawn by %s found in the trace" % name)
tool = spawners.most_common(1)[0][0]
children, released = set(), set()
same = spawns = 0
pending = None
waited = collections.defaultdict(lambda: [0, 0.0])
for pid, cpu, t, ev, f in events:
    if ev == "sched_wakeup_new" and pid == tool:
        spawns += 1
        same += int(f.get("target_cpu", -1)) == cpu
        children.add(int(f["pid"]))
    elif ev in ("sched_waking", "sched_wakeup") and int(f.get("pid", 0)) == tool:
        kind = "exec" if pid in children and pid not in released else "other"
        released.add(pid)
        pending = (t, kind)
    elif ev == "sched_switch" and int(f.get("next_pid", 0)) == tool and pending:
        w = waited[pending[1]]
        w[0] += 1
        w[1] += t - pending[0]
        pending = None
e, o = waited["exec"], waited["other"]
print("%-9s new children on its own core %4.1f%%; woken at a new child%s exec %5d times, waited %5.0f ms (%3.0f us each); other wake-ups waited %5.0f ms"
      % ("", 100.0 * same / max(spawns, 1), chr(39) + "s", e[0], 1e3 * e[1], 1e6 * e[1] / max(e[0], 1), 1e3 * o[1]))
' "$name"
    rm -f "$work/sched.data"
}

# One run of `name`, not recorded: wall time, and the machine's idle and busy core time
# (/proc/stat's first line, in clock ticks of 1/100 s).
plain() {
    local name=$1
    shift
    rm -rf stamps state .ninja_log .ninja_deps
    mkdir stamps
    local before after t0 t1
    before=$(head -1 /proc/stat)
    t0=$(date +%s%N)
    "$@" >/dev/null 2>&1
    t1=$(date +%s%N)
    after=$(head -1 /proc/stat)
    python3 -c '
import sys
name, wall = sys.argv[1], float(sys.argv[2])
a = [int(x) for x in sys.argv[3].split()[1:]]
b = [int(x) for x in sys.argv[4].split()[1:]]
d = [y - x for x, y in zip(a, b)]
idle = (d[3] + d[4]) / 100
busy = (sum(d[:8]) - d[3] - d[4]) / 100
print("%-9s wall %6.2f s  idle %5.2f core-s  busy %6.2f core-s" % (name, wall, idle, busy))
' "$name" "$(python3 -c "print(($t1 - $t0) / 1e9)")" "$before" "$after"
}

run=recorded
[ "$plain" = 0 ] || run=plain
echo "$((10 * width)) tasks, -j$jobs; load average $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq "$rounds"); do
    echo "== round $r of $rounds"
    $run ninja ninja -j"$jobs"
    $run "$(basename "$prl")" "$prl" run flow.toml -j"$jobs" --state-dir state --no-progress -q
done
