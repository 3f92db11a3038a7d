# Sourced by the bench scripts that run the generated DAG (spawn_gap.sh, idle_split.sh):
# `dag_setup TOOL...` checks that each TOOL is installed and that $prl is a built binary,
# then makes a fresh DAG of $width tasks a layer (10 layers) in $work/dag and enters it.
# Expects $here (the benches directory), $prl, $work and $width to be set.
dag_setup() {
    local tool
    for tool in "$@"; do
        if ! command -v "$tool" >/dev/null 2>&1; then
            echo "error: \`$tool\` is not installed" >&2
            exit 2
        fi
    done
    if [ ! -x "$prl" ]; then
        echo "error: no release binary at \`$prl\`; build it with \`cargo build --release\` (or set PRL_FLOW)" >&2
        exit 2
    fi
    rm -rf "$work"
    mkdir -p "$work"
    work=$(cd "$work" && pwd)
    python3 "$here/gen_dag.py" "$work/dag" --layers 10 --width "$width" >/dev/null
    cd "$work/dag"
}
