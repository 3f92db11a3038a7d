#!/usr/bin/env bash
# The bring-up of a plan by a plain shell script, to compare `prl-flow run` with
# (benches/bringup.sh): the same processes with the same argv, env and working dirs, taken
# from `prl-flow plan --format json --backend local`, started in dependency order, each
# waited for with a `curl` polling loop at the plan's interval (100 ms on `local`).
#
#   baseline.sh up PLAN.json DIR    start everything, wait until each service is ready, then
#                                   check the router's workers and send one completion
#   baseline.sh down DIR            stop what `up` started, last started first
#
# Tasks go by levels: a task starts once every task it needs is ready, and all the tasks of
# a level start together and are waited for in parallel (one polling loop each), which is
# what a careful shell script does. DIR gets logs/TASK.log, run/TASK/ (each process's cwd),
# pids (one per line, in start order) and times.tsv: TASK, spawned (ns), ready (ns).
set -euo pipefail

now() { date +%s%N; }

die() {
    echo "baseline: $*" >&2
    exit 1
}

# Polls URL every INTERVAL until it answers 2xx; fails when PID has died.
wait_http() {
    local id=$1 url=$2 interval=$3 pid=$4 spawned=$5 dir=$6
    until curl -sf -o /dev/null --max-time 2 "$url"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "baseline: \`$id\` exited before it was ready; last lines of its log:" >&2
            tail -n 15 "$dir/logs/$id.log" >&2
            return 1
        fi
        sleep "$interval"
    done
    printf '%s\t%s\t%s\n' "$id" "$spawned" "$(now)" >>"$dir/times.tsv"
}

# The plan as shell words, one task a line, in level order:
#   LEVEL ID INTERVAL_SECONDS PROBE_URL|- -- [ENV=VALUE...] -- ARGV...
# A built-in action's ARGV is `builtin ACTION ROUTER [MODEL | WORKER...]`. One `jq` for the
# whole plan, so the script's own cost stays that of bash, curl and sleep.
steps() {
    jq -r '
      def seconds: if endswith("ms") then (rtrimstr("ms") | tonumber / 1000)
                   elif endswith("s") then (rtrimstr("s") | tonumber) else 0.1 end;
      (reduce .tasks[] as $t ({};
          .[$t.id] = (([$t.needs[] as $n | .[$n]] | max // -1) + 1))) as $level
      | .tasks
      | map(. + {level: $level[.id]})
      | sort_by(.level)[]
      | (.builtin.args // {}) as $a
      | [(.level | tostring), .id, ((.ready.interval // "100ms") | seconds | tostring),
         (.ready.probe.http.url // "-"), "--"]
        + (.env | to_entries | map("\(.key)=\(.value)")) + ["--"]
        + (if .builtin == null then .argv
           elif .builtin.action == "register" then
             ["builtin", "register", $a.router] + ($a.workers // []) + ($a.prefill // []) + ($a.decode // [])
           elif .builtin.action == "health-probe" then ["builtin", "health-probe", $a.router, $a.model]
           else ["builtin", .builtin.action] end)
      | @sh' "$1"
}

# builtin ACTION [ROUTER [ARGS...]]: what prl-flow does itself, done with curl.
builtin_step() {
    local action=$1
    case "$action" in
    allocate) ;;
    register)
        local router=$2 listed url
        shift 2
        listed=$(curl -sf --max-time 10 "$router/list_workers")
        for url in "$@"; do
            case "$listed" in
            *"\"$url\""*) ;;
            *) die "the router at $router does not list $url" ;;
            esac
        done
        ;;
    health-probe)
        local router=$2 model=$3 body
        until curl -sf -o /dev/null --max-time 5 "$router/readiness"; do sleep 0.1; done
        body=$(curl -sf --max-time 120 "$router/v1/completions" \
            -H 'Content-Type: application/json' -H 'X-Session-ID: baseline' \
            -d "{\"model\": \"$model\", \"prompt\": \"Say hello.\", \"max_tokens\": 8}") ||
            die "a completion through $router failed"
        case "$body" in
        *'"text"'*) ;;
        *) die "a completion through $router has no text: $body" ;;
        esac
        ;;
    *) die "unknown built-in action \`$action\`" ;;
    esac
}

up() {
    local plan=$1 dir=$2
    mkdir -p "$dir/logs" "$dir/run"
    : >"$dir/pids"
    : >"$dir/times.tsv"
    local level=0 waits=() line
    run_level_waits() {
        local w
        for w in "${waits[@]}"; do
            wait "$w" || die "a service of level $level did not get ready"
        done
        waits=()
    }
    while IFS= read -r line; do
        eval "set -- $line"
        local l=$1 id=$2 interval=$3 probe=$4
        shift 5
        local env=()
        while [ "$1" != "--" ]; do
            env+=("$1")
            shift
        done
        shift
        if [ "$l" != "$level" ]; then
            run_level_waits
            level=$l
        fi
        if [ "$1" = builtin ]; then
            shift
            builtin_step "$@"
            continue
        fi
        local run="$dir/run/$id" log="$dir/logs/$id.log" spawned pid
        mkdir -p "$run"
        spawned=$(now)
        (cd "$run" && exec setsid env "${env[@]}" "$@") >>"$log" 2>&1 </dev/null &
        pid=$!
        echo "$pid" >>"$dir/pids"
        if [ "$probe" != "-" ]; then
            wait_http "$id" "$probe" "$interval" "$pid" "$spawned" "$dir" &
            waits+=($!)
        else
            printf '%s\t%s\t%s\n' "$id" "$spawned" "$spawned" >>"$dir/times.tsv"
        fi
    done < <(steps "$plan")
    run_level_waits
}

down() {
    local dir=$1 pid pids=()
    [ -f "$dir/pids" ] || return 0
    mapfile -t pids < <(tac "$dir/pids")
    for pid in "${pids[@]}"; do
        kill -TERM -- "-$pid" 2>/dev/null || continue
        for _ in $(seq 500); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.02
        done
        kill -KILL -- "-$pid" 2>/dev/null || true
    done
    : >"$dir/pids"
}

case "${1:-}" in
up) up "$2" "$3" ;;
down) down "$2" ;;
*)
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
