#!/usr/bin/env python3
"""Writes a local recipe for the bring-up benchmark: a fixture of tests/fixtures/local/ with
every port taken from the OS (free on every local address) and the mock engine's startup
delay set on every engine.

usage: recipe.py FIXTURE.toml OUT.toml DELAY [PROBE_INTERVAL]    (like `2s`, `20ms`)

With PROBE_INTERVAL, the recipe also sets `[inference.deployment] probe_interval`.
"""

import re
import socket
import sys


def free_port(taken):
    """A port free on 0.0.0.0 (so on every loopback address) and not handed out yet."""
    while True:
        with socket.socket() as s:
            s.bind(("0.0.0.0", 0))
            port = s.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


def main():
    fixture, out, delay = sys.argv[1:4]
    interval = sys.argv[4] if len(sys.argv) > 4 else ""
    text = open(fixture).read()
    taken = set()
    values = {
        "READY_TIMEOUT": "2m",
        "DELAY": delay,
        "PREFILL_DELAY": delay,
        "DECODE_DELAY": delay,
        "FAIL": "",
        "PREFILL_FAIL": "",
        "DECODE_FAIL": "",
    }
    for key in ("ROUTER_PORT", "BACKEND_PORT", "METRICS_PORT", "NIXL_PORT", "RPC_PORT"):
        values[key] = str(free_port(taken))
    text = re.sub(r"@([A-Z][A-Z0-9_]*)@", lambda m: values[m.group(1)], text)
    if interval:
        text = re.sub(
            r"^(ready_timeout = .*)$",
            lambda m: f'{m.group(1)}\nprobe_interval = "{interval}"',
            text,
            count=1,
            flags=re.M,
        )
    with open(out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
