//! `prl-flow import prime-rl FILE` on configs written the way prime-rl's examples are:
//! the recipe on stdout, one line per value not carried over on stderr (both snapshotted),
//! exit codes, and that the recipes validate and plan.

mod common;

use std::path::Path;

use common::Sandbox;

/// The fixtures under `tests/fixtures/prime-rl/`.
const FIXTURES: &[&str] = &[
    "single_node.toml",
    "multi_node.toml",
    "pd_seed.toml",
    "rl_single_node.toml",
    "rl_multi_node.toml",
    "rl_pd_islands.toml",
];

fn fixture_text(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/prime-rl")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Imports fixture `name` in a fresh sandbox; returns the sandbox and the output.
fn import(name: &str) -> (Sandbox, common::Out) {
    let sb = Sandbox::new();
    sb.write(name, &fixture_text(name));
    let out = sb.run(&["import", "prime-rl", name]);
    (sb, out)
}

#[test]
fn each_config_gives_its_recipe_and_lists_what_it_cannot_map() {
    for name in FIXTURES {
        let (sb, out) = import(name);
        out.expect_code(0);
        let stem = name.trim_end_matches(".toml");
        sb.settings().bind(|| {
            insta::assert_snapshot!(format!("import_{stem}_recipe"), out.stdout);
            insta::assert_snapshot!(format!("import_{stem}_stderr"), out.stderr);
        });
    }
}

/// The recipe with the fields the concurrent recipe change adds taken out (or, for node
/// counts per replica, written as totals), so that today's `validate` can check the rest.
fn without_new_fields(recipe: &str) -> String {
    let mut doc: toml_edit::DocumentMut = recipe.parse().expect("the recipe is TOML");
    let dep = doc["inference"]["deployment"]
        .as_table_mut()
        .expect("a deployment table");
    dep.remove("router_host");
    dep.remove("router_log_level");
    if dep.get("type").and_then(|t| t.as_str()) == Some("disaggregated") {
        dep.remove("num_replicas");
        for role in ["prefill", "decode"] {
            if let Some(per) = dep.remove(&format!("{role}_nodes_per_replica")) {
                let r = dep
                    .get(&format!("num_{role}_replicas"))
                    .and_then(|v| v.as_integer())
                    .unwrap_or(1);
                let per = per.as_integer().expect("a count");
                dep.insert(&format!("num_{role}_nodes"), toml_edit::value(per * r));
            }
        }
    }
    doc.to_string()
}

#[test]
fn each_recipe_validates_apart_from_the_new_fields() {
    for name in FIXTURES {
        let (sb, out) = import(name);
        out.expect_code(0);
        sb.write("recipe.toml", &without_new_fields(&out.stdout));
        let v = sb.run(&["validate", "recipe.toml"]);
        assert_eq!(
            v.code,
            Some(0),
            "{name}: the imported recipe does not validate\n{}\n--- recipe\n{}",
            v.stderr,
            out.stdout
        );
    }
}

/// Every imported recipe validates and plans as written, the fields prime-rl's layout needs
/// (`router_host`, `router_log_level`, P/D `num_replicas`, `*_nodes_per_replica`) included.
#[test]
fn each_recipe_validates_and_plans_as_written() {
    for name in FIXTURES {
        let (sb, out) = import(name);
        out.expect_code(0);
        sb.write("recipe.toml", &out.stdout);
        for cmd in ["validate", "plan"] {
            let v = sb.run(&[cmd, "recipe.toml"]);
            assert_eq!(
                v.code,
                Some(0),
                "{name}: `{cmd}` refuses the imported recipe\n{}\n--- recipe\n{}",
                v.stderr,
                out.stdout
            );
        }
    }
}

#[test]
fn a_pd_unit_count_comes_from_num_infer_replicas_and_node_spellings_are_kept() {
    let (_sb, out) = import("rl_pd_islands.toml");
    let doc: toml_edit::DocumentMut = out.stdout.parse().expect("TOML");
    let dep = &doc["inference"]["deployment"];
    assert_eq!(dep["num_replicas"].as_integer(), Some(2));
    assert_eq!(dep["prefill_nodes_per_replica"].as_integer(), Some(1));
    assert!(dep.get("num_prefill_nodes").is_none());
    let (_sb, out) = import("pd_seed.toml");
    let doc: toml_edit::DocumentMut = out.stdout.parse().expect("TOML");
    let dep = &doc["inference"]["deployment"];
    assert_eq!(dep["num_prefill_nodes"].as_integer(), Some(4));
    assert!(dep.get("num_replicas").is_none());
}

#[test]
fn broken_or_refused_files_fail_with_their_place() {
    let sb = Sandbox::new();
    let out = sb.run(&["import", "prime-rl", "missing.toml"]);
    out.expect_code(2);
    assert!(
        out.stderr.contains("cannot read missing.toml"),
        "{}",
        out.stderr
    );
    assert!(out.stdout.is_empty());

    sb.write(
        "broken.toml",
        "[inference]\nmodel = \"x\"\n[inference.parallel\ntp = 2\n",
    );
    let out = sb.run(&["import", "prime-rl", "broken.toml"]);
    out.expect_code(2);
    assert!(
        out.stderr.starts_with("error: broken.toml:3:"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("invalid TOML"), "{}", out.stderr);

    sb.write(
        "both.toml",
        "[deployment]\ntype = \"disaggregated\"\nnum_prefill_nodes = 2\nprefill_nodes_per_replica = 2\n",
    );
    let out = sb.run(&["import", "prime-rl", "both.toml"]);
    out.expect_code(2);
    assert!(
        out.stderr.starts_with("error: both.toml:4:1:") && out.stderr.contains("only one"),
        "{}",
        out.stderr
    );

    sb.write(
        "rl.toml",
        "[deployment]\ntype = \"multi_node\"\nnum_train_nodes = 1\nnum_infer_nodes = 4\n\n[inference.deployment]\ntype = \"disaggregated\"\nnum_prefill_nodes = 1\nnum_decode_nodes = 1\n",
    );
    let out = sb.run(&["import", "prime-rl", "rl.toml"]);
    out.expect_code(2);
    assert!(
        out.stderr.starts_with("error: rl.toml:4:1:"),
        "{}",
        out.stderr
    );

    sb.write("trainer_only.toml", "[trainer]\n[orchestrator]\n");
    let out = sb.run(&["import", "prime-rl", "trainer_only.toml"]);
    out.expect_code(2);
    assert!(
        out.stderr.contains("no `[inference]` table"),
        "{}",
        out.stderr
    );
}
