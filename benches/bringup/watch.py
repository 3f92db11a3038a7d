#!/usr/bin/env python3
"""Timestamps the moment each service of a bring-up becomes healthy, from its log.

usage: watch.py LOGS_DIR OUT.json

Polls every log file under LOGS_DIR (created later is fine) once a millisecond and records,
per file, the wall-clock time (ns since the epoch) at which a marker line first appeared:
  - a mock engine's `Application startup complete.` (it is written right after /health
    turns 200),
  - the router's `Starting server on` (written as it binds its port, once its workers are
    healthy: /readiness answers 200 from then on, within a millisecond).
Runs until SIGTERM or SIGINT, then writes {"TASK": ns, ...} to OUT.json. Only sizes are
looked at between changes, so the watcher costs little CPU.
"""

import json
import os
import signal
import sys
import time

MARKERS = (b"Application startup complete.", b"Starting server on")


def main():
    logs, out = sys.argv[1:3]
    seen = {}  # task -> ns
    offsets = {}  # file -> bytes read
    tails = {}  # file -> last partial line
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    while not stop:
        try:
            names = os.listdir(logs)
        except FileNotFoundError:
            names = []
        for name in names:
            task = name[:-4] if name.endswith(".log") else name
            if task in seen:
                continue
            path = os.path.join(logs, name)
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:
                continue
            if size == offsets.get(path, 0):
                continue
            with open(path, "rb") as f:
                f.seek(offsets.get(path, 0))
                data = tails.get(path, b"") + f.read()
            offsets[path] = size
            now = time.time_ns()
            if any(m in data for m in MARKERS):
                seen[task] = now
            tails[path] = data[-64:]
        time.sleep(0.001)
    with open(out, "w") as f:
        json.dump(seen, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
