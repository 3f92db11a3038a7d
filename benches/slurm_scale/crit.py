#!/usr/bin/env python3
"""The critical path of a finished bring-up: the longest chain of the plan's `needs`, each
task counted with its own time (journal: started_ms → finished_ms), against the run's wall
time (first start → last finish).

    crit.py PLAN_JSON STATE_DIR    prints: critical_path_s wall_s allocate_s engines_s router_s

allocate: the allocation (sbatch, the wait, the node list, the preflight step); engines: from
the first engine's start to the last one's readiness; router: its start to its readiness.
"""
import json
import os
import sys

plan = json.load(open(sys.argv[1]))
state = sys.argv[2]
records = {}
snap = os.path.join(state, "journal.json")
if os.path.exists(snap):
    records.update(json.load(open(snap)).get("records", {}))
log = os.path.join(state, "journal.log")
if os.path.exists(log):
    for line in open(log):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        # A change line (`{"set": ID, ...}`) sets its fields of the record put before it.
        if "set" in r:
            rec = records.get(r.pop("set"))
            if rec is not None:
                rec.update(r)
            continue
        rid = r.get("id") or r.get("record", {}).get("id")
        if rid:
            records[rid] = r.get("record", r)
needs = {t["id"]: t["needs"] for t in plan["tasks"]}
own = {}
for tid, r in records.items():
    s, f = r.get("started_ms"), r.get("finished_ms")
    if s is not None and f is not None:
        own[tid] = (f - s) / 1000
memo = {}


def crit(t):
    if t not in memo:
        memo[t] = own.get(t, 0) + max((crit(n) for n in needs.get(t, [])), default=0)
    return memo[t]


starts = [r["started_ms"] for r in records.values() if r.get("started_ms")]
ends = [r["finished_ms"] for r in records.values() if r.get("finished_ms")]
eng = [r for k, r in records.items() if k.startswith(("engine[", "prefill[", "decode["))]
span = (max(r["finished_ms"] for r in eng) - min(r["started_ms"] for r in eng)) / 1000
print(
    f"{max(crit(t) for t in needs):.2f} {(max(ends) - min(starts)) / 1000:.2f} "
    f"{own.get('allocate', 0):.2f} {span:.2f} {own.get('router', 0):.2f}"
)
