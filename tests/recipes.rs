//! Recipes end to end through the library: every shipped recipe plans (snapshots), every
//! rendered flag is one its program accepts, every bad recipe of the corpus fails with its
//! message at a `file:line:col`, no input panics, and random valid recipes plan to an
//! acyclic graph without port clashes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use prl_flow::actions::Action;
use prl_flow::plan::{Command, Plan};
use prl_flow::recipe::{load, Launcher, Options};
use prl_flow_flags::check::{check_mooncake_args, check_router_args, check_vllm_args};
use proptest::prelude::*;

/// The `allocate` task's id and kind.
const ALLOCATE: &str = prl_flow::actions::Action::Allocate.name();

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `*.toml` under `dir`, sorted.
fn tomls(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "toml") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The shipped recipes, but the simulated ones (10,000 nodes: tests/sim.rs runs them, and
/// `every_recipe_plans_as_snapshotted` checks that they plan).
fn recipes() -> Vec<PathBuf> {
    let sim = root().join("recipes/sim");
    let all: Vec<PathBuf> = tomls(&root().join("recipes"))
        .into_iter()
        .filter(|p| !p.starts_with(&sim))
        .collect();
    assert!(
        all.len() >= 8,
        "recipes/ should hold the four shapes and the local ones"
    );
    all
}

fn rel(p: &Path) -> String {
    p.strip_prefix(root()).unwrap_or(p).display().to_string()
}

fn load_file(p: &Path, opts: &Options) -> Result<Plan, prl_flow::diag::Problems> {
    let text = std::fs::read_to_string(p).expect("read recipe");
    let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("recipe");
    load(&rel(p), Arc::new(text), stem, opts)
}

fn load_str(src: &str, opts: &Options) -> Result<Plan, prl_flow::diag::Problems> {
    load("t.toml", Arc::new(src.to_string()), "t", opts)
}

#[test]
fn every_recipe_plans_as_snapshotted() {
    for p in recipes() {
        let plan = match load_file(&p, &Options::default()) {
            Ok(plan) => plan,
            Err(e) => panic!("{} does not plan:\n{}", rel(&p), e.render(false)),
        };
        let name = rel(&p)
            .trim_start_matches("recipes/")
            .trim_end_matches(".toml")
            .replace('/', "__");
        insta::assert_json_snapshot!(format!("plan__{name}"), plan);
    }
    // The simulated 10,000-node recipe plans too, but its 20,000 tasks are no snapshot to
    // read: tests/sim.rs runs it.
    for p in tomls(&root().join("recipes/sim")) {
        if let Err(e) = load_file(&p, &Options::default()) {
            panic!("{} does not plan:\n{}", rel(&p), e.render(false));
        }
    }
}

#[test]
fn the_four_shapes_have_their_tasks() {
    let kinds = |file: &str| -> BTreeSet<String> {
        let plan =
            load_file(&root().join("recipes").join(file), &Options::default()).expect("plans");
        plan.tasks.iter().map(|t| t.kind.clone()).collect()
    };
    let base = [ALLOCATE, "router", "register", "health-probe"];
    for file in ["single_node.toml", "multi_node.toml", "wide_ep.toml"] {
        let k = kinds(file);
        assert!(k.contains("engine"), "{file}: {k:?}");
        assert!(base.iter().all(|b| k.contains(*b)), "{file}: {k:?}");
    }
    let k = kinds("disaggregated.toml");
    for want in [
        ALLOCATE,
        "mooncake-master",
        "metadata-server",
        "mooncake-client",
        "prefill",
        "decode",
        "router",
        "register",
        "health-probe",
    ] {
        assert!(k.contains(want), "disaggregated lacks {want}: {k:?}");
    }
}

#[test]
fn disaggregated_is_the_full_chain() {
    let plan = load_file(
        &root().join("recipes/disaggregated.toml"),
        &Options::default(),
    )
    .expect("plans");
    let needs = |id: &str| -> Vec<String> {
        plan.tasks
            .iter()
            .find(|t| t.id == id)
            .map(|t| t.needs.clone())
            .unwrap_or_else(|| panic!("no task {id}"))
    };
    assert!(needs("mooncake-master").contains(&Action::Allocate.name().to_string()));
    assert!(needs("metadata-server").contains(&"mooncake-master".to_string()));
    assert!(needs("mooncake-client.node[3]").contains(&"metadata-server".to_string()));
    assert!(needs("prefill[0].rank[0]").contains(&"mooncake-client.node[0]".to_string()));
    assert!(needs("decode[0].rank[7]").contains(&"mooncake-client.node[3]".to_string()));
    let router = needs("router");
    for e in [
        "prefill[0].rank[0]",
        "prefill[0].rank[7]",
        "decode[0].rank[0]",
        "decode[0].rank[7]",
    ] {
        assert!(router.contains(&e.to_string()), "router needs {e}");
    }
    // The registration needs the router and every engine it fronts (a restarted engine is
    // announced again; the P/D router restarts with it).
    let register = needs("register");
    assert_eq!(register[0], "router");
    assert_eq!(register.len(), 1 + 16);
    assert_eq!(needs("health-probe"), ["register"]);
    let engine = plan
        .tasks
        .iter()
        .find(|t| t.id == "decode[0].rank[7]")
        .expect("decode");
    assert_eq!(
        engine.env.get("MOONCAKE_CONFIG_PATH").map(String::as_str),
        Some("mooncake.json")
    );
    assert_eq!(engine.files.len(), 1);
    let config: serde_json::Value =
        serde_json::from_str(&engine.files[0].content).expect("mooncake config is JSON");
    assert_eq!(config["local_hostname"], "${host:node3}");
    assert_eq!(config["master_server_address"], "${host:node0}:50051");
}

fn argv(t: &prl_flow::plan::TaskSpec) -> Option<&[String]> {
    match &t.command {
        Command::Argv { argv } => Some(argv),
        _ => None,
    }
}

/// Every rendered vllm, router and mooncake flag exists in the flag tables with a valid
/// value. A marked launcher prefix shows where the program's own arguments start.
#[test]
fn every_rendered_flag_is_real() {
    let opts = Options {
        launcher: Launcher::Mock {
            argv_prefix: vec!["ENGINE".into()],
        },
        router: Some(vec!["ROUTER".into()]),
        ..Options::default()
    };
    let mut checked = BTreeMap::<String, usize>::new();
    for p in recipes() {
        let plan = load_file(&p, &opts).expect("plans");
        for t in &plan.tasks {
            let Some(a) = argv(t) else { continue };
            // KV offload starts engines through a shell that raises the memlock limit.
            let a = match a.first().map(String::as_str) {
                Some("sh") if a[1] == "-c" => &a[4..],
                _ => a,
            };
            let errors = match t.kind.as_str() {
                "engine" | "prefill" | "decode" => {
                    assert_eq!(a[0], "ENGINE", "{}", t.id);
                    assert!(!a[1].starts_with("--"), "{}: the model comes first", t.id);
                    check_vllm_args(&a[2..])
                }
                "router" => {
                    assert_eq!(a[0], "ROUTER");
                    check_router_args(&a[1..])
                }
                "mooncake-master" | "metadata-server" | "mooncake-client" => {
                    check_mooncake_args(&a[0], &a[1..])
                }
                other => panic!("unexpected argv task kind {other}"),
            };
            assert!(
                errors.is_empty(),
                "{} in {}: {errors:?}\nargv: {a:?}",
                t.id,
                rel(&p)
            );
            let kind = if t.kind == "prefill" || t.kind == "decode" {
                "engine"
            } else {
                t.kind.as_str()
            };
            *checked.entry(kind.to_string()).or_default() += 1;
        }
    }
    for k in [
        "engine",
        "router",
        "mooncake-master",
        "metadata-server",
        "mooncake-client",
    ] {
        assert!(
            checked.get(k).copied().unwrap_or(0) > 0,
            "no {k} argv was checked: {checked:?}"
        );
    }
}

#[test]
fn engines_carry_their_shape() {
    let text = std::fs::read_to_string(root().join("recipes/wide_ep.toml")).expect("recipe");
    let plan = load_str(&text, &Options::default()).expect("plans");
    let task = |plan: &Plan, id: &str| {
        plan.tasks
            .iter()
            .find(|t| t.id == id)
            .unwrap_or_else(|| panic!("no {id}"))
            .clone()
    };
    // One API server per rank: rank 9 is the second rank of the replica's second node.
    let first = task(&plan, "engine[0].rank[0]");
    let ninth = task(&plan, "engine[0].rank[9]");
    let h = argv(&first).expect("argv").join(" ");
    let n = argv(&ninth).expect("argv").join(" ");
    assert!(
        h.starts_with("vllm serve deepseek-ai/DeepSeek-V3 --host ${host:node0} --port 8100"),
        "{h}"
    );
    assert!(h.contains("--data-parallel-size 16 --data-parallel-size-local 1 --data-parallel-rank 0 --data-parallel-address ${host:node0} --data-parallel-rpc-port 29550"), "{h}");
    assert!(
        h.contains("--enable-expert-parallel")
            && h.contains("--enable-eplb")
            && h.contains("--enable-dbo"),
        "{h}"
    );
    assert!(n.contains("--host ${host:node1} --port 8101"), "{n}");
    assert!(
        n.contains("--data-parallel-rank 9 --data-parallel-address ${host:node0}"),
        "{n}"
    );
    assert_eq!(ninth.env["CUDA_VISIBLE_DEVICES"], "1");
    assert_eq!(
        first.ports,
        [8100, 29550],
        "rank 0 holds the DP coordinator's port"
    );
    assert_eq!(ninth.ports, [8101]);
    assert!(first.ready.is_some() && ninth.ready.is_some());

    // vLLM's internal balancing: one process per node, the second `--headless`.
    let internal = text.replace(
        "type = \"multi_node\"",
        "type = \"multi_node\"\nload_balancing = \"internal\"",
    );
    let plan = load_str(&internal, &Options::default()).expect("plans");
    let head = task(&plan, "engine[0].node[0]");
    let tail = task(&plan, "engine[0].node[1]");
    let h = argv(&head).expect("argv").join(" ");
    let t = argv(&tail).expect("argv").join(" ");
    assert!(h.contains("--data-parallel-size 16 --data-parallel-size-local 8 --data-parallel-address ${host:node0} --data-parallel-rpc-port 29550"), "{h}");
    assert!(
        t.contains("--headless") && t.contains("--data-parallel-start-rank 8"),
        "{t}"
    );
    assert!(!t.contains("--port"), "{t}");
    assert!(head.ready.is_some() && tail.ready.is_none());
    assert!(!head.env.contains_key("CUDA_VISIBLE_DEVICES"));

    let plan = load_file(
        &root().join("recipes/local/disaggregated.toml"),
        &Options::default(),
    )
    .expect("plans");
    let prefill = plan
        .tasks
        .iter()
        .find(|t| t.kind == "prefill")
        .expect("prefill");
    let a = argv(prefill).expect("argv").join(" ");
    assert!(
        a.contains("--all2all-backend deepep_high_throughput"),
        "{a}"
    );
    assert!(
        a.contains(r#""kv_connector":"MultiConnector""#)
            && a.contains(r#""kv_role":"kv_both""#)
            && a.contains(r#""num_threads":1"#)
            && a.contains("OffloadingConnector"),
        "{a}"
    );
    assert!(a.starts_with("sh -c ulimit -l unlimited"), "{a}");
    assert!(a.contains("--enable-prefix-caching"), "{a}");
    assert_eq!(
        prefill
            .env
            .get("VLLM_NIXL_SIDE_CHANNEL_HOST")
            .map(String::as_str),
        Some("${host:node0}")
    );
    let router = plan
        .tasks
        .iter()
        .find(|t| t.kind == "router")
        .expect("router");
    let r = argv(router).expect("argv").join(" ");
    assert!(
        r.contains("--vllm-pd-disaggregation")
            && r.contains(
                "--prefill http://${host:node0}:18130 none --decode http://${host:node1}:18130"
            ),
        "{r}"
    );
    let probe = match &router.ready.as_ref().expect("ready").probe {
        prl_flow::plan::Probe::Http { url } => url.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(probe, "http://${host:node0}:18030/readiness");
}

#[test]
fn options_replace_launchers_and_backend() {
    let src = "[inference]\nmodel = \"m\"\nlauncher = [\"uv\", \"run\", \"vllm\", \"serve\"]\n[backend]\ntype = \"slurm\"\npartition = \"gpu\"\n";
    let plan = load_str(src, &Options::default()).expect("plans");
    assert_eq!(plan.backend, "slurm");
    assert_eq!(
        plan.backend_config,
        serde_json::json!({ "partition": "gpu" })
    );
    let engine = plan
        .tasks
        .iter()
        .find(|t| t.kind == "engine")
        .expect("engine");
    assert_eq!(
        &argv(engine).expect("argv")[..5],
        ["uv", "run", "vllm", "serve", "m"]
    );
    let opts = Options {
        backend: Some("local".into()),
        launcher: Launcher::Mock {
            argv_prefix: vec!["/bin/prl-flow".into(), "mock-engine".into()],
        },
        router: Some(vec!["/venv/bin/vllm-router".into()]),
        ..Options::default()
    };
    let plan = load_str(src, &opts).expect("plans");
    assert_eq!(plan.backend, "local");
    let engine = plan
        .tasks
        .iter()
        .find(|t| t.kind == "engine")
        .expect("engine");
    assert_eq!(
        &argv(engine).expect("argv")[..3],
        ["/bin/prl-flow", "mock-engine", "m"]
    );
    let router = plan
        .tasks
        .iter()
        .find(|t| t.kind == "router")
        .expect("router");
    assert_eq!(argv(router).expect("argv")[0], "/venv/bin/vllm-router");
}

#[test]
fn custom_tasks_weave_in_by_kind_and_node() {
    let src = r#"
[inference]
model = "m"
[inference.deployment]
type = "multi_node"
num_nodes = 2

[[task]]
id = "download"
run = "huggingface-cli download m"

[[task]]
id = "stage"
run = "cp -r /shared/m /tmp/m"
node = "each"
needs = ["download"]
before = ["engine"]

[[task]]
id = "smoke"
argv = ["curl", "-sf", "http://${host:node0}:8000/v1/models"]
needs = ["health-probe"]
"#;
    let plan = load_str(src, &Options::default()).expect("plans");
    let task = |id: &str| {
        plan.tasks
            .iter()
            .find(|t| t.id == id)
            .unwrap_or_else(|| panic!("no {id}"))
    };
    assert_eq!(task("stage.node[1]").node.as_deref(), Some("node1"));
    assert_eq!(task("stage.node[1]").needs, [ALLOCATE, "download"]);
    assert!(task("engine[1].rank[0]")
        .needs
        .contains(&"stage.node[1]".to_string()));
    assert!(!task("engine[1].rank[0]")
        .needs
        .contains(&"stage.node[0]".to_string()));
    assert_eq!(task("download").node, None);
    assert_eq!(task("smoke").needs, ["health-probe"]);
    assert_eq!(task("smoke").kind, "custom");
}

#[test]
fn a_custom_tasks_unknown_need_is_never_said_to_be_the_task_itself() {
    let src = r#"
[inference]
model = "m"

[[task]]
id = "warmup"
run = "true"
needs = ["warmupp"]
"#;
    let out = load_str(src, &Options::default())
        .expect_err("an unknown need")
        .render(false);
    assert!(out.contains("task `warmup` needs `warmupp`"), "{out}");
    assert!(!out.contains("did you mean `warmup`?"), "{out}");
}

const PD_UNITS: &str = r#"
[inference]
model = "m"
[inference.parallel]
tp = 2
[inference.deployment]
type = "disaggregated"
gpus_per_node = 4
num_replicas = 3
num_prefill_nodes = 2
num_prefill_replicas = 2
num_decode_nodes = 2
"#;

#[test]
fn pd_units_get_a_router_each_listing_only_their_ranks() {
    let plan = load_str(PD_UNITS, &Options::default()).expect("plans");
    assert_eq!(
        plan.nodes.len(),
        12,
        "3 units × (2 prefill + 2 decode nodes)"
    );
    let routers: Vec<&prl_flow::plan::TaskSpec> =
        plan.tasks.iter().filter(|t| t.kind == "router").collect();
    assert_eq!(routers.len(), 3);
    for (u, r) in routers.iter().enumerate() {
        assert_eq!(r.id, format!("router[{u}]"));
        // On the unit's first prefill node.
        assert_eq!(r.node.as_deref(), Some(format!("node{}", 4 * u).as_str()));
        let a = argv(r).expect("argv").join(" ");
        let urls: Vec<&str> = a.split(' ').filter(|w| w.starts_with("http://")).collect();
        // Prefill: 2 replicas of 1 node, 2 ranks each; decode: 1 replica of 2 nodes, 2 ranks
        // on each (every GPU: dp = 2 nodes × 4 GPUs / tp 2).
        assert_eq!(urls.len(), 8, "{a}");
        for url in urls {
            let node: usize = url["http://${host:node".len()..]
                .split('}')
                .next()
                .and_then(|n| n.parse().ok())
                .expect("node");
            assert!(
                (4 * u..4 * u + 4).contains(&node),
                "router[{u}] lists {url}"
            );
        }
        let needs: Vec<&String> = r.needs.iter().filter(|n| n.as_str() != ALLOCATE).collect();
        assert_eq!(needs.len(), 8, "{needs:?}");
        // Its registration names each of those ranks by its URL, and no other unit's.
        let reg = plan
            .tasks
            .iter()
            .find(|t| t.id == format!("register[{u}]"))
            .expect("a register task per unit");
        let Command::Builtin { args, .. } = &reg.command else {
            panic!("register is built in: {:?}", reg.command)
        };
        let workers = args["worker_tasks"].as_object().expect("worker_tasks");
        let mut named: Vec<&str> = workers.values().filter_map(|v| v.as_str()).collect();
        named.sort_unstable();
        let mut ranks: Vec<&str> = needs.iter().map(|n| n.as_str()).collect();
        ranks.sort_unstable();
        assert_eq!(named, ranks, "register[{u}]: {workers:?}");
        assert!(
            workers.keys().all(|k| a.contains(k.as_str())),
            "register[{u}]'s URLs are its router's: {workers:?} / {a}"
        );
        let mut rneeds: Vec<&str> = reg.needs.iter().map(String::as_str).collect();
        rneeds.sort_unstable();
        let mut want = ranks.clone();
        want.push(r.id.as_str());
        want.sort_unstable();
        assert_eq!(rneeds, want, "register[{u}] needs its router and its ranks");
    }
    assert_ne!(
        routers[0].ports, routers[1].ports,
        "metrics ports differ per router"
    );
    assert!(plan.tasks.iter().any(|t| t.id == "prefill[5].rank[1]"));
    assert!(plan.tasks.iter().any(|t| t.id == "decode[2].rank[3]"));
    assert_eq!(
        plan.endpoint.as_deref(),
        Some("http://${host:node0}:8000 http://${host:node4}:8000 http://${host:node8}:8000")
    );
    // The other spelling: nodes per replica.
    let per_replica = PD_UNITS
        .replace("num_prefill_nodes = 2", "prefill_nodes_per_replica = 1")
        .replace("num_decode_nodes = 2", "decode_nodes_per_replica = 2");
    let again = load_str(&per_replica, &Options::default()).expect("plans");
    assert_eq!(again.tasks, plan.tasks, "both spellings give one plan");
    // Never both at once.
    let both = PD_UNITS.replace(
        "num_decode_nodes = 2",
        "num_decode_nodes = 2\ndecode_nodes_per_replica = 2",
    );
    let e = load_str(&both, &Options::default()).expect_err("two spellings");
    assert!(
        e.render(false).contains("say the same thing two ways"),
        "{}",
        e.render(false)
    );
}

/// Every rank of every shipped recipe is an engine task of its own: GPU slices on a node
/// are disjoint and of size tp, ports do not clash, and each router lists exactly the rank
/// URLs of the engines it needs.
#[test]
fn every_rank_is_a_task_on_its_own_gpus() {
    for p in recipes() {
        let plan = load_file(&p, &Options::default()).expect("plans");
        let text = std::fs::read_to_string(&p).expect("read");
        let tp: usize = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("tp = "))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(1);
        let engines: Vec<&prl_flow::plan::TaskSpec> = plan
            .tasks
            .iter()
            .filter(|t| matches!(t.kind.as_str(), "engine" | "prefill" | "decode"))
            .collect();
        let mut gpus: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let mut ports: BTreeMap<(String, u16), String> = BTreeMap::new();
        for e in &engines {
            assert!(e.id.contains(".rank["), "{}: {}", rel(&p), e.id);
            let node = e.node.clone().expect("node");
            let slice: Vec<usize> = e.env["CUDA_VISIBLE_DEVICES"]
                .split(',')
                .map(|g| g.parse().expect("gpu"))
                .collect();
            assert_eq!(slice.len(), tp, "{}: {}", rel(&p), e.id);
            let used = gpus.entry(node.clone()).or_default();
            for g in slice {
                assert!(!used.contains(&g), "{}: GPU {g} twice on {node}", rel(&p));
                used.push(g);
            }
        }
        for t in plan.tasks.iter().filter(|t| t.service) {
            for port in &t.ports {
                let key = (t.node.clone().unwrap_or_default(), *port);
                if let Some(other) = ports.insert(key, t.id.clone()) {
                    panic!("{}: port {port} of {} and {other}", rel(&p), t.id);
                }
            }
        }
        for r in plan.tasks.iter().filter(|t| t.kind == "router") {
            let a = argv(r).expect("argv").join(" ");
            let mut listed: Vec<String> = a
                .split(' ')
                .filter(|w| w.starts_with("http://"))
                .map(str::to_string)
                .collect();
            let mut want: Vec<String> = engines
                .iter()
                .filter(|e| r.needs.contains(&e.id))
                .map(|e| match &e.ready.as_ref().expect("ready").probe {
                    prl_flow::plan::Probe::Http { url } => {
                        url.trim_end_matches("/health").to_string()
                    }
                    other => panic!("{other:?}"),
                })
                .collect();
            listed.sort();
            want.sort();
            assert_eq!(listed, want, "{}: {}", rel(&p), r.id);
        }
    }
}

/// `# expect: TEXT` lines of a bad recipe.
fn expectations(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# expect:"))
        .map(|s| s.trim().to_string())
        .collect()
}

#[test]
fn bad_recipes_fail_with_their_messages_and_places() {
    let files = tomls(&root().join("tests/bad_recipes"));
    assert!(files.len() >= 30, "the corpus should cover every rule");
    let placed = regex::Regex::new(r"(?m)^error: tests/bad_recipes/[a-z0-9_]+\.toml:\d+:\d+: ")
        .expect("regex");
    for p in files {
        let text = std::fs::read_to_string(&p).expect("read");
        let expected = expectations(&text);
        assert!(!expected.is_empty(), "{} has no `# expect:` line", rel(&p));
        let err = match load_file(&p, &Options::default()) {
            Ok(_) => panic!("{} planned, but should fail", rel(&p)),
            Err(e) => e,
        };
        let out = err.render(false);
        for want in &expected {
            assert!(
                out.contains(want.as_str()),
                "{}: expected `{want}` in:\n{out}",
                rel(&p)
            );
        }
        for item in &err.items {
            assert!(
                item.span.is_some(),
                "{}: `{}` has no place",
                rel(&p),
                item.message
            );
            assert!(
                item.help.is_some(),
                "{}: `{}` says no fix",
                rel(&p),
                item.message
            );
        }
        assert_eq!(
            placed.find_iter(&out).count(),
            err.len(),
            "{}: every problem names file:line:col:\n{out}",
            rel(&p)
        );
    }
}

/// Replaces the value of every `key = value` line of every recipe, one at a time, with
/// values of every kind: loading never panics, and a failure always has places.
#[test]
fn no_edit_of_a_recipe_panics() {
    let weird = [
        "0",
        "-1",
        "99999999999999",
        "513",
        "4294967295",
        "1.5",
        "\"\"",
        "\"x\\ny\"",
        "[]",
        "[1, \"a\"]",
        "{}",
        "{ a = 1 }",
        "true",
        "1979-05-27",
    ];
    for p in recipes() {
        let text = std::fs::read_to_string(&p).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let Some((key, _)) = line.split_once(" = ") else {
                continue;
            };
            if key.starts_with('#') {
                continue;
            }
            for w in weird {
                let mut edited = lines.clone();
                let new = format!("{key} = {w}");
                edited[i] = &new;
                let src = edited.join("\n");
                if let Err(e) = load_str(&src, &Options::default()) {
                    for item in &e.items {
                        assert!(
                            item.span.is_some(),
                            "{} line {} = {w}: `{}` has no place",
                            rel(&p),
                            i + 1,
                            item.message
                        );
                    }
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Shape {
    kind: u8,
    nodes: u32,
    replicas: u32,
    decode_replicas: u32,
    gpus: u32,
    tp: u32,
    offload: u8,
    ep: bool,
    custom: bool,
}

fn divisor(n: u32, pick: u32) -> u32 {
    let ds: Vec<u32> = (1..=n).filter(|d| n % d == 0).collect();
    ds[(pick as usize) % ds.len()]
}

/// A valid recipe of a random shape, counts, and tp/dp consistent with them.
fn recipe_text(s: &Shape) -> String {
    let tp = divisor(s.gpus, s.tp);
    let mut out = String::from("[inference]\nmodel = \"m\"\n");
    let (shape, body, k, backend) = match s.kind % 3 {
        0 => ("single_node", String::new(), 1, "local"),
        1 => {
            let r = divisor(s.nodes, s.replicas);
            let k = s.nodes / r;
            (
                "multi_node",
                format!("num_nodes = {}\nnum_replicas = {r}\n", s.nodes),
                k,
                "slurm",
            )
        }
        _ => {
            // Both sides span the same number of nodes per replica, so one dp fits both.
            let pr = divisor(s.nodes, s.replicas);
            let k = s.nodes / pr;
            let dr = s.decode_replicas;
            (
                "disaggregated",
                format!(
                    "num_prefill_nodes = {}\nnum_prefill_replicas = {pr}\nnum_decode_nodes = {}\nnum_decode_replicas = {dr}\n",
                    s.nodes,
                    dr * k
                ),
                k,
                "slurm",
            )
        }
    };
    let ep = s.ep && shape == "multi_node";
    // Ranks per node: all GPUs for wide-EP, else anything that fits.
    let local = if ep {
        s.gpus / tp
    } else {
        1 + (s.tp % (s.gpus / tp))
    };
    let dp = local * k;
    if ep {
        out.push_str("enable_expert_parallel = true\n");
    }
    out.push_str(&format!("[inference.parallel]\ntp = {tp}\ndp = {dp}\n"));
    out.push_str(&format!(
        "[inference.deployment]\ntype = \"{shape}\"\ngpus_per_node = {}\n{body}",
        s.gpus
    ));
    match s.offload % 3 {
        1 => out.push_str("[inference.kv_cache_offload]\ntype = \"native\"\ncpu = { num_bytes = 1000 }\ndisk = { path = \"/d\" }\n"),
        2 if backend == "slurm" => out.push_str("[inference.kv_cache_offload]\ntype = \"mooncake\"\ncpu = { num_bytes = 1000 }\n"),
        _ => {}
    }
    out.push_str(&format!("[backend]\ntype = \"{backend}\"\n"));
    if s.custom {
        let targets = if shape == "disaggregated" {
            "\"prefill\", \"decode\""
        } else {
            "\"engine\""
        };
        out.push_str(&format!(
            "[[task]]\nid = \"stage\"\nrun = \"true\"\nnode = \"each\"\nbefore = [{targets}]\n"
        ));
    }
    out
}

fn shapes() -> impl Strategy<Value = Shape> {
    (
        0u8..3,
        1u32..9,
        0u32..8,
        1u32..4,
        prop::sample::select(vec![1u32, 2, 4, 8]),
        0u32..8,
        0u8..3,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(kind, nodes, replicas, decode_replicas, gpus, tp, offload, ep, custom)| Shape {
                kind,
                nodes,
                replicas,
                decode_replicas,
                gpus,
                tp,
                offload,
                ep,
                custom,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_valid_recipes_plan_to_acyclic_graphs_without_port_clashes(s in shapes()) {
        let text = recipe_text(&s);
        let plan = match load_str(&text, &Options::default()) {
            Ok(p) => p,
            Err(e) => panic!("valid recipe rejected:\n{text}\n{}", e.render(false)),
        };
        // Acyclic, unique ids, every need known: the engine's own sealing says so.
        let mut g = prl_flow_engine::GraphBuilder::new();
        for t in &plan.tasks {
            let needs: Vec<&str> = t.needs.iter().map(String::as_str).collect();
            g.add(prl_flow_engine::testing::FakeTask::new(&t.id, &needs).arc());
        }
        if let Err(errors) = g.seal() {
            panic!("graph errors {errors:?} for\n{text}");
        }
        // No two services on one node share a port.
        let mut seen: BTreeMap<(String, u16), String> = BTreeMap::new();
        for t in plan.tasks.iter().filter(|t| t.service) {
            let node = t.node.clone().unwrap_or_default();
            prop_assert!(node.is_empty() || plan.nodes.contains(&node), "{} on unknown node {node}", t.id);
            for port in &t.ports {
                if let Some(other) = seen.insert((node.clone(), *port), t.id.clone()) {
                    panic!("port {port} on {node} used by {other} and {}\n{text}", t.id);
                }
            }
        }
        // Every task on a node waits for the allocation.
        for t in plan.tasks.iter().filter(|t| t.node.is_some()) {
            prop_assert!(t.needs.iter().any(|n| n == ALLOCATE), "{} does not need allocate", t.id);
        }
    }
}

#[test]
fn a_site_overrides_templates_by_file_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let builtin = prl_flow::recipe::render::TEMPLATES
        .iter()
        .find(|(n, _)| *n == "engine.argv.j2")
        .map(|(_, s)| *s)
        .expect("engine template");
    // A site that pins its own all2all backend and adds a flag.
    let site = builtin.replace("deepep_low_latency", "pplx") + "--disable-log-requests\n";
    std::fs::write(dir.path().join("engine.argv.j2"), site).expect("write");
    let recipe = root().join("recipes/local/disaggregated.toml");
    let opts = Options {
        templates: Some(dir.path().to_path_buf()),
        ..Options::default()
    };
    let plan = load_file(&recipe, &opts).expect("plans");
    let decode = plan
        .tasks
        .iter()
        .find(|t| t.kind == "decode")
        .expect("decode");
    let a = argv(decode).expect("argv").join(" ");
    assert!(a.contains("--all2all-backend pplx"), "{a}");
    assert!(a.ends_with("--disable-log-requests"), "{a}");

    // A template error is a problem naming the template and its line.
    std::fs::write(
        dir.path().join("router.argv.j2"),
        "{{ launcher }}\n{{ no_such_variable }}\n",
    )
    .expect("write");
    let err = load_file(&recipe, &opts).expect_err("undefined variable");
    let out = err.render(false);
    assert!(out.contains("template `router.argv.j2` (line 2)"), "{out}");

    // A misspelt override file would silently do nothing: it is a problem too.
    std::fs::remove_file(dir.path().join("router.argv.j2")).expect("rm");
    std::fs::write(dir.path().join("engine.arg.j2"), "x").expect("write");
    let err = load_file(&recipe, &opts).expect_err("unknown template");
    let out = err.render(false);
    assert!(out.contains("did you mean `engine.argv.j2`?"), "{out}");
}

#[test]
fn the_recipe_field_names_a_templates_dir_beside_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("site")).expect("mkdir");
    std::fs::write(
        dir.path().join("site/metadata_server.argv.j2"),
        "mooncake_http_metadata_server\n--host\n0.0.0.0\n--port\n{{ port }}\n",
    )
    .expect("write");
    let src = std::fs::read_to_string(root().join("recipes/disaggregated.toml")).expect("read");
    let src = format!("templates = \"site\"\n{src}");
    let path = dir.path().join("r.toml");
    let plan = load(
        &path.display().to_string(),
        Arc::new(src),
        "r",
        &Options::default(),
    )
    .expect("plans");
    let md = plan
        .tasks
        .iter()
        .find(|t| t.kind == "metadata-server")
        .expect("metadata");
    assert_eq!(argv(md).expect("argv")[2], "0.0.0.0");
}

#[test]
fn huge_counts_are_messages_not_overflows() {
    let src = "[inference]\nmodel = \"m\"\nenable_expert_parallel = true\n[inference.parallel]\ntp = 65536\ndp = 65536\n[inference.deployment]\ntype = \"multi_node\"\nnum_nodes = 65536\ngpus_per_node = 4294967295\n";
    let err = load_str(src, &Options::default()).expect_err("too big");
    let out = err.render(false);
    assert!(out.contains("`gpus_per_node` is more than 1024"), "{out}");
    let src = "[inference]\nmodel = \"m\"\n[inference.deployment]\ntype = \"disaggregated\"\nnum_prefill_nodes = 4294967295\nnum_decode_nodes = 4294967295\n";
    let err = load_str(src, &Options::default()).expect_err("too big");
    assert!(
        err.render(false).contains("prl-flow plans at most 100000"),
        "{}",
        err.render(false)
    );
}

/// Mooncake with a disk tier, as prime-rl runs it: the master and every client offload, each
/// client first creates the disk path on its node, and every engine gets the offload env.
#[test]
fn mooncake_disk_tier_reaches_master_clients_and_engines() {
    let text = std::fs::read_to_string(root().join("recipes/disaggregated.toml"))
        .expect("recipe")
        .replace(
            "# disk = { path = \"/mnt/nvme/kv\" }",
            "disk = { path = \"/mnt/nvme/kv\" }",
        );
    let plan = load_str(&text, &Options::default()).expect("plans");
    let task = |id: &str| {
        plan.tasks
            .iter()
            .find(|t| t.id == id)
            .unwrap_or_else(|| panic!("no {id}"))
    };
    let master = argv(task("mooncake-master")).expect("argv").join(" ");
    assert!(
        master.contains("--enable_offload=true --root_fs_dir=/mnt/nvme/kv"),
        "{master}"
    );
    let client = task("mooncake-client.node[2]");
    let a = argv(client).expect("argv");
    assert_eq!(a[..2], ["sh", "-c"]);
    assert!(a[2].starts_with("mkdir -p -- \"$MOONCAKE_OFFLOAD_FILE_STORAGE_PATH\""));
    assert!(a.contains(&"--enable_offload=true".to_string()), "{a:?}");
    assert_eq!(
        client.env["MOONCAKE_OFFLOAD_FILE_STORAGE_PATH"],
        "/mnt/nvme/kv"
    );
    let engine = task("decode[0].rank[5]");
    for (k, v) in [
        ("MOONCAKE_OFFLOAD_FSDIR", "/mnt/nvme/kv"),
        ("MOONCAKE_OFFLOAD_FILE_STORAGE_PATH", "/mnt/nvme/kv"),
        ("MOONCAKE_OFFLOAD_ENABLE_EVICTION", "true"),
        ("PYTHONHASHSEED", "0"),
        ("VLLM_WORKER_MULTIPROC_METHOD", "spawn"),
    ] {
        assert_eq!(engine.env.get(k).map(String::as_str), Some(v), "{k}");
    }
    let e = argv(engine).expect("argv").join(" ");
    assert!(e.starts_with("sh -c ulimit -l unlimited"), "{e}");
    assert!(
        e.contains(r#"--compilation-config {"cudagraph_mode":"FULL_DECODE_ONLY"}"#),
        "{e}"
    );
    // A recipe's env overrides a default; the launcher's own variables are refused.
    let over = text.replace(
        "[inference.deployment.decode_env]\n",
        "[inference.deployment.decode_env]\nUCX_TLS = \"rc\"\n",
    );
    let plan = load_str(&over, &Options::default()).expect("plans");
    let d = plan
        .tasks
        .iter()
        .find(|t| t.id == "decode[0].rank[0]")
        .expect("decode");
    assert_eq!(d.env["UCX_TLS"], "rc");
    let bad = text.replace(
        "[inference.deployment.decode_env]\n",
        "[inference.deployment.decode_env]\nCUDA_VISIBLE_DEVICES = \"0\"\n",
    );
    let e = load_str(&bad, &Options::default()).expect_err("managed");
    assert!(
        e.render(false).contains("its own slice"),
        "{}",
        e.render(false)
    );
}

/// prime-rl's `vllm_extra.headless = true` is refused with what to write instead.
#[test]
fn headless_in_vllm_extra_says_what_to_write_instead() {
    let src = "[inference]\nmodel = \"m\"\n[inference.vllm_extra]\nheadless = true\n";
    let e = load_str(src, &Options::default()).expect_err("headless");
    let text = e.render(false);
    assert!(
        text.contains("api_server_count = 0") && text.contains("load_balancing = \"internal\""),
        "{text}"
    );
}

/// Every engine on a node gets its node's Mooncake client config (the node's own host), and
/// a config template that cannot be rendered is one problem per node, not one per engine.
#[test]
fn a_nodes_mooncake_config_is_the_same_for_its_engines_and_fails_once_per_node() {
    let recipe = root().join("recipes/disaggregated.toml");
    let plan = load_file(&recipe, &Options::default()).expect("plans");
    let mut by_node: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for t in plan
        .tasks
        .iter()
        .filter(|t| t.kind == "prefill" || t.kind == "decode")
    {
        let file = t
            .files
            .iter()
            .find(|f| f.path.ends_with(".json"))
            .unwrap_or_else(|| panic!("{} has no Mooncake config", t.id));
        let node = t.node.clone().expect("node");
        by_node
            .entry(node)
            .or_default()
            .insert(file.content.clone());
    }
    assert_eq!(by_node.len(), 4, "{by_node:?}");
    for (node, configs) in &by_node {
        assert_eq!(configs.len(), 1, "{node}: {configs:?}");
    }
    let distinct: BTreeSet<_> = by_node.values().flatten().collect();
    assert_eq!(distinct.len(), 4, "each node has its own: {distinct:?}");

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("mooncake_config.json.j2"),
        "{{ no_such_variable }}\n",
    )
    .expect("write");
    let opts = Options {
        templates: Some(dir.path().to_path_buf()),
        ..Options::default()
    };
    let out = load_file(&recipe, &opts)
        .expect_err("undefined variable")
        .render(false);
    let n = out.matches("template `mooncake_config.json.j2`").count();
    assert_eq!(n, by_node.len(), "{out}");
}
