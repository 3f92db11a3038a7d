#!/usr/bin/env bash
# Bring-up benchmark on this machine: `prl-flow run --engine mock` of the local recipes, with
# the mock engine's startup delay set, against the plan's critical path and against a plain
# shell script that starts the same processes (benches/bringup/baseline.sh), in the same run.
#
#   benches/bringup.sh                       10 runs of each, disaggregated and multi_node
#   RUNS=20 DELAY=2s RECIPES="disaggregated" benches/bringup.sh
#   HYPERFINE=0 benches/bringup.sh           skip the hyperfine pass
#   PROBE_INTERVAL=20ms benches/bringup.sh   set the recipes' probe_interval (default: 100ms
#                                          on local); the baseline polls at the same interval
#
# What it measures, per recipe (docs/benchmarks.md, "Bring-up on this machine", says more):
#   1. wall time of `prl-flow -q run` and of `baseline.sh up`, interleaved run by run; then,
#      if hyperfine is installed, both again under hyperfine (no watcher running);
#   2. the critical path of the plan: the engines' own time to healthy (spawn → /health 200,
#      the startup delay plus process start) + the router's own time to ready (spawn →
#      serving), both measured in the baseline runs;
#   3. healthy → ready: from the moment an engine is healthy (its log line, timestamped by
#      benches/bringup/watch.py) to prl-flow's journal marking its task done (finished_ms), or
#      to the baseline's polling loop seeing it.
# Results go to target/bench-bringup/DATE/ (raw data and report.md); the report is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

RUNS=${RUNS:-10}
DELAY=${DELAY:-2s}
RECIPES=${RECIPES:-"disaggregated multi_node"}
HYPERFINE=${HYPERFINE:-1}
PROBE_INTERVAL=${PROBE_INTERVAL:-}
OUT=${OUT:-$ROOT/target/bench-bringup/$(date +%Y%m%d-%H%M%S)}
BASELINE=$ROOT/benches/bringup/baseline.sh
WATCH=$ROOT/benches/bringup/watch.py

say() { printf '==> %s\n' "$*" >&2; }

for tool in python3 jq curl; do
    command -v "$tool" >/dev/null || {
        echo "bringup.sh needs \`$tool\` (apt-get install -y $tool)" >&2
        exit 2
    }
done

# The router: PRL_FLOW_ROUTER, else the venv `./dev` installs; the baseline finds it on PATH.
if [ -n "${PRL_FLOW_ROUTER:-}" ]; then
    ROUTER_BIN=$(dirname "$PRL_FLOW_ROUTER")
else
    ROUTER_BIN="${XDG_CACHE_HOME:-$HOME/.cache}/prl-flow/router-0.1.17/bin"
fi
[ -x "$ROUTER_BIN/vllm-router" ] || {
    echo "no vllm-router in $ROUTER_BIN: run \`./dev test\` (or \`./dev demo\`) once to install it" >&2
    exit 2
}
export PATH="$ROUTER_BIN:$PATH"

say "building prl-flow (release)"
cargo build --release --quiet
PF=$ROOT/target/release/prl-flow

mkdir -p "$OUT"
{
    echo "date: $(date -u +%FT%TZ)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
    echo "cpus: $(nproc)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
    echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "runs: $RUNS, startup delay: $DELAY, probe interval: ${PROBE_INTERVAL:-100ms (default)}"
    echo "hyperfine: $(command -v hyperfine >/dev/null && hyperfine --version || echo none)"
} >"$OUT/env.txt"

# Starts the watcher on STATE/logs, writing DEST/watch.json; its pid goes to $WATCHER.
watch_start() {
    python3 "$WATCH" "$1/logs" "$2/watch.json" </dev/null >/dev/null &
    WATCHER=$!
}
watch_stop() {
    kill -TERM "$WATCHER" 2>/dev/null || true
    wait "$WATCHER" 2>/dev/null || true
}

prlflow_once() {
    local recipe=$1 st=$2 dest=$3 t0 t1
    mkdir -p "$dest"
    watch_start "$st" "$dest"
    t0=$(date +%s%N)
    "$PF" -q run "$recipe" --engine mock --state-dir "$st" >/dev/null 2>"$dest/stderr" ||
        { cat "$dest/stderr" >&2; watch_stop; exit 1; }
    t1=$(date +%s%N)
    watch_stop
    echo $((t1 - t0)) >"$dest/wall_ns"
    echo "$t0" >"$dest/t0_ns"
    cp "$st/journal.json" "$dest/"
    "$PF" -q down --state-dir "$st" >/dev/null 2>&1
    rm -rf "$st"
}

baseline_once() {
    local plan=$1 st=$2 dest=$3 t0 t1
    mkdir -p "$dest"
    watch_start "$st" "$dest"
    t0=$(date +%s%N)
    "$BASELINE" up "$plan" "$st" 2>"$dest/stderr" ||
        { cat "$dest/stderr" >&2; watch_stop; "$BASELINE" down "$st"; exit 1; }
    t1=$(date +%s%N)
    watch_stop
    echo $((t1 - t0)) >"$dest/wall_ns"
    echo "$t0" >"$dest/t0_ns"
    cp "$st/times.tsv" "$dest/"
    "$BASELINE" down "$st"
    rm -rf "$st"
}

for name in $RECIPES; do
    dir=$OUT/$name
    mkdir -p "$dir"
    python3 benches/bringup/recipe.py "tests/fixtures/local/$name.toml" "$dir/$name.toml" "$DELAY" $PROBE_INTERVAL
    "$PF" plan "$dir/$name.toml" --engine mock --backend local --format json >"$dir/plan.json"
    st_p=$dir/state-prl-flow
    st_b=$dir/state-baseline
    # Whatever happens, leave nothing running.
    trap '"$PF" -q down --state-dir "$st_p" >/dev/null 2>&1 || true; "$BASELINE" down "$st_b" || true' EXIT
    say "$name: $RUNS bring-ups each, prl-flow and the shell baseline in turn"
    for i in $(seq "$RUNS"); do
        prlflow_once "$dir/$name.toml" "$st_p" "$dir/prl-flow-$i"
        baseline_once "$dir/plan.json" "$st_b" "$dir/baseline-$i"
        printf '.' >&2
    done
    echo >&2
    if [ "$HYPERFINE" != 0 ] && command -v hyperfine >/dev/null; then
        say "$name: hyperfine, $RUNS runs each"
        hyperfine --runs "$RUNS" --style basic \
            --prepare "'$PF' -q down --state-dir '$st_p' >/dev/null 2>&1; rm -rf '$st_p'" \
            --prepare "'$BASELINE' down '$st_b'; rm -rf '$st_b'" \
            --cleanup "'$PF' -q down --state-dir '$st_p' >/dev/null 2>&1; '$BASELINE' down '$st_b'; rm -rf '$st_p' '$st_b'" \
            --export-json "$dir/hyperfine.json" \
            -n prl-flow "'$PF' -q run '$dir/$name.toml' --engine mock --state-dir '$st_p' >/dev/null" \
            -n baseline "'$BASELINE' up '$dir/plan.json' '$st_b'" >&2
    fi
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/env.txt"

python3 benches/bringup/report.py "$OUT" | tee "$OUT/report.md"
say "raw data and report: $OUT"
