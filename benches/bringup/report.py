#!/usr/bin/env python3
"""Turns the raw data of benches/bringup.sh into a markdown report.

usage: report.py OUT_DIR

Per recipe dir (OUT_DIR/NAME/): plan.json; prl-flow-N/{wall_ns, watch.json, journal.json};
baseline-N/{wall_ns, watch.json, times.tsv}; hyperfine.json if hyperfine ran.

- critical path: the plan's longest chain, engine → router, each service at its own time to
  ready: the slowest engine's spawn → healthy log line, plus the router's spawn → `Starting
  server on`. Reported as medians over the baseline runs, and taken per run for the overhead.
- overhead: a run's wall time − its own chain (so the router's load-dependent start-up, which
  varies several-fold on a shared machine, cancels out), also as a share of the chain (goal
  for prl-flow: median under 5%).
- healthy → ready: per engine and run, from its healthy log line to prl-flow's journal
  marking the task done (`finished_ms`), or to the baseline's loop seeing it (goal for
  prl-flow: median under 100 ms).
"""

import json
import os
import statistics
import sys

ENGINE_KINDS = {"engine", "prefill", "decode"}


def runs(dir_, tool):
    out = []
    i = 1
    while os.path.isdir(os.path.join(dir_, f"{tool}-{i}")):
        out.append(os.path.join(dir_, f"{tool}-{i}"))
        i += 1
    return out


def read(path, default=None):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return default


def pct(values, q):
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ms(x):
    return f"{x:.0f} ms" if x == x else "n/a"


def own_times(r, engines, router):
    """(wall, slowest engine's own time to healthy, router's own time to serving, engine
    latencies, router latency) of one run, in ms; None where a marker was not seen."""
    seen = json.load(open(os.path.join(r, "watch.json")))
    wall = int(read(os.path.join(r, "wall_ns"))) / 1e6
    if os.path.exists(os.path.join(r, "times.tsv")):
        times = {}
        for line in read(os.path.join(r, "times.tsv"), "").splitlines():
            tid, spawned, ready = line.split("\t")
            times[tid] = (int(spawned) / 1e6, int(ready) / 1e6)
    else:
        recs = json.load(open(os.path.join(r, "journal.json")))["records"]
        times = {k: (v["started_ms"], v["finished_ms"]) for k, v in recs.items()}
    seen = {k: v / 1e6 for k, v in seen.items()}
    if not all(k in seen for k in engines + [router]):
        return None
    slowest = max(engines, key=lambda e: seen[e] - times[e][0])
    engine_own = seen[slowest] - times[slowest][0]
    router_own = seen[router] - times[router][0]
    lat = [times[e][1] - seen[e] for e in engines]
    t0 = int(read(os.path.join(r, "t0_ns"), "0")) / 1e6
    # Where the wall time goes; the parts add up to it.
    phases = {
        "to the spawn": times[slowest][0] - t0,
        "engines": engine_own,
        "engines ready → router spawn": times[router][0] - max(seen[e] for e in engines),
        "router": router_own,
        "router ready": times[router][1] - seen[router],
        "register, health probe, exit": t0 + wall - times[router][1],
    } if t0 else None
    return wall, engine_own, router_own, lat, times[router][1] - seen[router], phases


def recipe_report(name, dir_):
    plan = json.load(open(os.path.join(dir_, "plan.json")))
    engines = [
        t["id"]
        for t in plan["tasks"]
        if t["kind"] in ENGINE_KINDS and t.get("ready")
    ]
    router = "router"
    per = {}
    for tool in ("prl-flow", "baseline"):
        per[tool] = [x for x in (own_times(r, engines, router) for r in runs(dir_, tool)) if x]
    n = len(per["prl-flow"])
    base = per["baseline"]
    # The plan's critical path as the brief words it: the engines' startup (their own time
    # to healthy) + the router's own ready time, both from the baseline runs.
    plan_cp = statistics.median(x[1] for x in base) + statistics.median(x[2] for x in base)
    lines = [f"### `{name}` ({len(engines)} engines, {n} runs each)", ""]
    lines.append(
        f"Critical path (allocate → engine → router → register → health-probe): the engines' "
        f"own time to healthy (spawn → `/health` 200; the slower of {len(engines)}) + the "
        f"router's own time to ready (spawn → serving). Medians over the baseline runs: "
        f"{ms(statistics.median(x[1] for x in base))} + "
        f"{ms(statistics.median(x[2] for x in base))} = {ms(plan_cp)}. The router's part "
        f"swings with the machine's load (min {ms(min(x[2] for x in base + per['prl-flow']))}, "
        f"max {ms(max(x[2] for x in base + per['prl-flow']))} over all runs), so each run's "
        f"overhead is taken against its own chain: wall − (engines + router) of that run."
    )
    lines.append("")
    lines.append(
        "| | wall: median | min | max | own chain: median | overhead: median | p90 | of chain: median "
        "| healthy → ready, engines: median | p90 | max | router: median |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    verdicts = []
    for tool, label in (("prl-flow", "prl-flow"), ("baseline", "shell baseline")):
        rows = per[tool]
        wall = [x[0] for x in rows]
        chain = [x[1] + x[2] for x in rows]
        over = [x[0] - x[1] - x[2] for x in rows]
        share = [100 * o / c for o, c in zip(over, chain)]
        lat = [v for x in rows for v in x[3]]
        rlat = [x[4] for x in rows]
        lines.append(
            f"| {label} | {ms(statistics.median(wall))} | {ms(min(wall))} | {ms(max(wall))} "
            f"| {ms(statistics.median(chain))} | {ms(statistics.median(over))} "
            f"| {ms(pct(over, 0.9))} | {statistics.median(share):.1f}% "
            f"| {ms(statistics.median(lat))} | {ms(pct(lat, 0.9))} | {ms(max(lat))} "
            f"| {ms(statistics.median(rlat))} |"
        )
        if tool == "prl-flow":
            s = statistics.median(share)
            verdicts.append(
                f"overhead {s:.1f}% of the critical path: "
                + ("**met** (goal < 5%)" if s < 5 else "**missed** (goal < 5%)")
            )
            m = statistics.median(lat)
            verdicts.append(
                f"healthy → ready median {ms(m)}: "
                + ("**met** (goal < 100 ms)" if m < 100 else "**missed** (goal < 100 ms)")
            )
    lines.append("")
    hf = os.path.join(dir_, "hyperfine.json")
    if os.path.exists(hf):
        res = json.load(open(hf))["results"]
        parts = [
            f"{r['command']} {1000 * r['mean']:.0f} ± {1000 * r['stddev']:.0f} ms "
            f"(median {1000 * r['median']:.0f}, min {1000 * r['min']:.0f}, max {1000 * r['max']:.0f})"
            for r in res
        ]
        lines.append("hyperfine, same commands without the watcher: " + "; ".join(parts) + ".")
        lines.append("")
    phases = {tool: [x[5] for x in per[tool] if x[5]] for tool in per}
    if all(phases.values()):
        names = list(phases["prl-flow"][0])
        lines.append("Where the wall time goes (medians, ms; the engine and router parts are "
                     "their own start-up, the rest is the orchestrator's):")
        lines.append("")
        lines.append("| | " + " | ".join(names) + " |")
        lines.append("|---" * (len(names) + 1) + "|")
        for tool, label in (("prl-flow", "prl-flow"), ("baseline", "shell baseline")):
            cells = [f"{statistics.median(p[k] for p in phases[tool]):.0f}" for k in names]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("Verdicts for prl-flow: " + "; ".join(verdicts) + ".")
    lines.append("")
    return "\n".join(lines)


def main():
    out = sys.argv[1]
    parts = ["## Results", ""]
    env = read(os.path.join(out, "env.txt"), "")
    parts.append("```\n" + env.strip() + "\n```\n")
    for name in sorted(os.listdir(out)):
        d = os.path.join(out, name)
        if os.path.isfile(os.path.join(d, "plan.json")):
            parts.append(recipe_report(name, d))
    print("\n".join(parts))


if __name__ == "__main__":
    main()
