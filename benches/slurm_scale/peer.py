#!/usr/bin/env python3
"""The peer of benches/slurm_scale.sh: a batch script that starts the same plan the way
prime-rl's and NVIDIA Dynamo's SLURM scripts do, one `srun` per role group (every engine of
the deployment in one step, each task picking its command by its node), polls every
engine's /health, then starts the router as a step of its own and polls it until a
completion succeeds.

    peer.py PLAN_JSON NODES_FILE READY_FILE > peer.sbatch

PLAN_JSON: `prl-flow plan RECIPE --format json`; NODES_FILE: the cluster's `nodes` file
(`NAME ADDRESS NETNS`), whose order is the plan's node0, node1, ...
"""
import json
import shlex
import sys

plan = json.load(open(sys.argv[1]))
nodes = [l.split() for l in open(sys.argv[2]) if l.strip()]
ready = sys.argv[3]
addr = {f"node{k}": n[1] for k, n in enumerate(nodes)}
name = {f"node{k}": n[0] for k, n in enumerate(nodes)}


def fill(arg):
    for k, a in addr.items():
        arg = arg.replace("${host:" + k + "}", a)
    return arg


engines = [t for t in plan["tasks"] if t["id"].startswith("engine[")]
router = next(t for t in plan["tasks"] if t["id"] == "router")
n = len(plan["nodes"])
out = ["#!/bin/sh", "#SBATCH --ntasks-per-node=1", f"#SBATCH --nodes={n}", ""]
out.append("# Each engine task finds its command by its node.")
out.append("cat > engines.sh <<'PEER_EOF'")
out.append('case "$SLURMD_NODENAME" in')
for t in engines:
    out.append(f"{name[t['node']]}) exec {shlex.join(fill(a) for a in t['argv'])} ;;")
out.append("esac")
out.append("PEER_EOF")
out.append(
    f"srun --overlap -N {n} -n {len(engines)} --ntasks-per-node=1 --kill-on-bad-exit=0 "
    "--output=engines.log sh engines.sh &"
)
out.append("for url in \\")
for t in engines:
    port = t["argv"][t["argv"].index("--port") + 1]
    out.append(f"  http://{addr[t['node']]}:{port} \\")
out.append("; do")
out.append('  until curl -sf -o /dev/null "$url/health"; do sleep 0.1; done')
out.append("done")
rargv = [fill(a) for a in router["argv"]]
out.append(
    f"srun --overlap -w {name[router['node']]} -N1 -n1 --output=router.log "
    + shlex.join(rargv)
    + " &"
)
rurl = f"http://{addr[router['node']]}:{rargv[rargv.index('--port') + 1]}"
body = json.dumps({"model": engines[0]["argv"][1], "prompt": "hi", "max_tokens": 4})
out.append(
    f"until curl -sf -o /dev/null -H 'Content-Type: application/json' -d {shlex.quote(body)} "
    f"{rurl}/v1/completions; do sleep 0.1; done"
)
out.append(f"touch {shlex.quote(ready)}")
out.append("wait")
print("\n".join(out))
