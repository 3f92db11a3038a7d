#!/usr/bin/env python3
"""Processes of one SLURM test cluster, split by where they run.

    procs.py SLURM_CONF            one line: here_count here_rss_kb node_count node_rss_kb srun_count
    procs.py SLURM_CONF --sample F --until-file G
                                    every 200 ms, the line above with a timestamp appended to F,
                                    until G exists

"Ours" are the processes whose environment names SLURM_CONF (what prl-flow, the agent and
SLURM's steps run), without SLURM's own daemons. A process is "on a node" when a slurmstepd
or slurmd is among its ancestors; else it is on the submitting machine ("here").
"""
import os
import sys
import time

DAEMONS = {"slurmd", "slurmctld", "slurmscriptd", "slurmstepd", "munged"}


def read(pid, name):
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError:
        return b""


def comm(pid):
    return read(pid, "comm").decode(errors="replace").strip()


def parent(pid):
    stat = read(pid, "stat").decode(errors="replace")
    rest = stat.rsplit(")", 1)[-1].split()
    return rest[1] if len(rest) > 1 else None


def rss_kb(pid):
    for line in read(pid, "status").decode(errors="replace").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def snapshot(conf):
    needle = f"SLURM_CONF={conf}".encode()
    here = [0, 0]
    node = [0, 0]
    sruns = 0
    me = str(os.getpid())
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == me:
            continue
        if needle not in read(pid, "environ").split(b"\0"):
            continue
        c = comm(pid)
        if c in DAEMONS:
            continue
        on_node = False
        p = parent(pid)
        while p and p not in ("0", "1"):
            if comm(p) in ("slurmstepd", "slurmd"):
                on_node = True
                break
            p = parent(p)
        side = node if on_node else here
        side[0] += 1
        side[1] += rss_kb(pid)
        if c == "srun":
            sruns += 1
    return f"{here[0]} {here[1]} {node[0]} {node[1]} {sruns}"


def main():
    conf = sys.argv[1]
    if "--sample" in sys.argv:
        out = sys.argv[sys.argv.index("--sample") + 1]
        until = sys.argv[sys.argv.index("--until-file") + 1]
        with open(out, "a") as f:
            while not os.path.exists(until):
                f.write(f"{snapshot(conf)} {time.time():.3f}\n")
                f.flush()
                time.sleep(0.2)
    else:
        print(snapshot(conf))


if __name__ == "__main__":
    main()
