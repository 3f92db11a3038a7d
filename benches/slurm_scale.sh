#!/usr/bin/env bash
# The slurm backend at scale: a multi_node deployment of N nodes (one mock engine each, the
# real router) on a private SLURM cluster of N virtual nodes on this machine, against a
# batch script that starts the same plan the way prime-rl's and Dynamo's SLURM scripts do
# (one srun per role group; benches/slurm_scale/peer.py), in the same run.
#
#   benches/slurm_scale.sh                 N = 64 128 256
#   benches/slurm_scale.sh 64              one size
#   PROBE=1s benches/slurm_scale.sh         prl-flow's probe interval (default 100ms, the
#                                          peer's polling interval; 1s is the recipe default)
#
# Per N, for prl-flow:
#   - bring-up wall time (`prl-flow run`, from the command to its return, the deployment
#     serving) and the plan's critical path (the longest chain of `needs`, each task
#     counted with its own time from the journal: benches/slurm_scale/crit.py);
#   - processes and RSS of the deployment on the submitting machine (peak while `run` runs,
#     and after it returned; `run` itself excluded) and on the nodes' side (the agent and its
#     srun processes, the engines), from benches/slurm_scale/procs.py;
#   - slurmctld RPCs during the bring-up (`sdiag`: all of them, and step creations);
#   - `status`, a no-op `run --resume` and `down`, each timed.
# and for the peer: wall time from sbatch to a completion through the router, RPCs, and
# processes on the submitting machine.
#
# Needs what tests/slurm.rs needs (slurm-wlm, munge, root) and a release build:
# `cargo build --release --workspace`. PRL_FLOW_ROUTER names the router (default: the venv
# `./dev` installs). Results: a table on stdout; raw files under target/bench-slurm-scale/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SIZES=${*:-64 128 256}
PRL=${PRL_FLOW:-$ROOT/target/release/prl-flow}
MOCK=${MOCK:-$ROOT/target/release/prl-flow-mock-engine}
ROUTER=${PRL_FLOW_ROUTER:-${XDG_CACHE_HOME:-$HOME/.cache}/prl-flow/router-0.1.17/bin/vllm-router}
OUT=$ROOT/target/bench-slurm-scale
NET=${BENCH_NET:-127.198}
# prl-flow's readiness probes every PROBE; the peer polls every 0.1 s.
PROBE=${PROBE:-100ms}
CTLD_PORT=${BENCH_CTLD_PORT:-24400}
for f in "$PRL" "$MOCK" "$ROUTER"; do
    [ -x "$f" ] || { echo "missing $f (cargo build --release --workspace; ./dev test installs the router)" >&2; exit 2; }
done
mkdir -p "$OUT"
export PATH="$(dirname "$MOCK"):$PATH"

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
# sdiag's RPC counts: "total step_creates".
rpcs() {
    sdiag | awk '
        /Remote Procedure Call statistics by message type/ { on = 1; next }
        /Remote Procedure Call statistics by user/ { on = 0 }
        on && /count:/ { for (i = 1; i <= NF; i++) if ($i ~ /^count:/) { split($i, c, ":"); t += c[2]; if ($1 == "REQUEST_JOB_STEP_CREATE") s = c[2] } }
        END { printf "%d %d\n", t, s }'
}
peak() { # peak here_count here_rss node_count node_rss sruns of a sample file
    awk '{ for (i = 1; i <= 5; i++) if ($i > m[i]) m[i] = $i } END { printf "%d %d %d %d %d\n", m[1], m[2], m[3], m[4], m[5] }' "$1"
}

printf '| nodes | side | bring-up | critical path (allocate + engines + router) | here: peak procs / RSS | here after | nodes side: procs / RSS | sruns | RPCs (step creates) | status | no-op resume | down |\n'
printf '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n'
for N in $SIZES; do
    dir=$OUT/n$N
    rm -rf "$dir"
    mkdir -p "$dir"
    cleanup() { tests/support/slurm/cluster.sh stop "$dir/cluster" >/dev/null 2>&1 || true; }
    trap cleanup EXIT
    SLURM_NODES=$N SLURM_NETNS=0 SLURM_NET=$NET SLURM_TAG=bss SLURM_CTLD_PORT=$CTLD_PORT \
        tests/support/slurm/cluster.sh start "$dir/cluster" 2>"$dir/cluster.log"
    export SLURM_CONF=$dir/cluster/slurm.conf
    cat >"$dir/mn.toml" <<EOF
name = "scale"
[inference]
model = "Qwen/Qwen3-0.6B"
[inference.parallel]
tp = 1
dp = 1
[inference.deployment]
type = "multi_node"
num_nodes = $N
gpus_per_node = 1
router_port = 8000
backend_port = 8100
probe_interval = "$PROBE"
[backend]
type = "slurm"
poll = "500ms"
EOF
    state=$dir/state
    prl() { "$PRL" "$@" --state-dir "$state" --no-progress -q; }
    "$PRL" plan "$dir/mn.toml" --engine mock --router "$ROUTER" --format json >"$dir/plan.json"

    # prl-flow
    sdiag -r >/dev/null
    rm -f "$dir/stop-sampling"
    python3 benches/slurm_scale/procs.py "$SLURM_CONF" --sample "$dir/samples" --until-file "$dir/stop-sampling" &
    sampler=$!
    t0=$(now)
    prl run "$dir/mn.toml" --engine mock --router "$ROUTER" >"$dir/run.log" 2>&1 ||
        { echo "run failed: $dir/run.log" >&2; exit 1; }
    t1=$(now)
    touch "$dir/stop-sampling"
    wait "$sampler"
    read -r rpc_all rpc_steps < <(rpcs)
    read -r crit _wall s_alloc s_eng s_router < <(python3 benches/slurm_scale/crit.py "$dir/plan.json" "$state")
    read -r p_here p_here_rss _ _ _ < <(peak "$dir/samples")
    read -r a_here a_here_rss a_node a_node_rss a_sruns < <(python3 benches/slurm_scale/procs.py "$SLURM_CONF")
    s0=$(now); prl status "$dir/mn.toml" >"$dir/status.log" 2>&1 || { echo "status failed: $dir/status.log" >&2; exit 1; }; s1=$(now)
    r0=$(now); prl run "$dir/mn.toml" --engine mock --router "$ROUTER" --resume >"$dir/resume.log" 2>&1 ||
        { echo "resume failed: $dir/resume.log" >&2; exit 1; }; r1=$(now)
    d0=$(now); prl down "$dir/mn.toml" >"$dir/down.log" 2>&1 || { echo "down failed: $dir/down.log" >&2; exit 1; }; d1=$(now)
    [ -z "$(squeue -h -o %i)" ] || { echo "down left jobs: $(squeue -h)" >&2; exit 1; }
    printf '| %d | prl-flow | %s s | %s s (%s + %s + %s) | %d / %d MB | %d / %d MB | %d / %d MB | %d | %d (%d) | %s s | %s s | %s s |\n' \
        "$N" "$(secs "$t0" "$t1")" "$crit" "$s_alloc" "$s_eng" "$s_router" "$p_here" $((p_here_rss / 1024)) "$a_here" $((a_here_rss / 1024)) \
        "$a_node" $((a_node_rss / 1024)) "$a_sruns" "$rpc_all" "$rpc_steps" \
        "$(secs "$s0" "$s1")" "$(secs "$r0" "$r1")" "$(secs "$d0" "$d1")"

    # The peer: one srun per role group, from a batch script.
    python3 benches/slurm_scale/peer.py "$dir/plan.json" "$dir/cluster/nodes" "$dir/peer.ready" >"$dir/peer.sbatch"
    sdiag -r >/dev/null
    t0=$(now)
    job=$(cd "$dir" && sbatch --parsable --output="$dir/peer.out" "$dir/peer.sbatch")
    until [ -e "$dir/peer.ready" ]; do sleep 0.05; done
    t1=$(now)
    read -r rpc_all rpc_steps < <(rpcs)
    read -r a_here a_here_rss a_node a_node_rss a_sruns < <(python3 benches/slurm_scale/procs.py "$SLURM_CONF")
    d0=$(now)
    scancel "$job"
    while squeue -h -j "$job" 2>/dev/null | grep -q .; do sleep 0.1; done
    d1=$(now)
    printf '| %d | per-group script | %s s | | | %d / %d MB | %d / %d MB | %d | %d (%d) | | | %s s (scancel) |\n' \
        "$N" "$(secs "$t0" "$t1")" "$a_here" $((a_here_rss / 1024)) "$a_node" $((a_node_rss / 1024)) \
        "$a_sruns" "$rpc_all" "$rpc_steps" "$(secs "$d0" "$d1")"
    cleanup
    trap - EXIT
done
