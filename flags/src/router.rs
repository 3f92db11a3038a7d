//! The flags of `vllm-router` 0.1.17's Python launcher, the `vllm-router` that the pip package
//! installs. The table also lists the Rust binary's flags (`cli=rust`); those are left out.

use std::collections::HashMap;
use std::sync::OnceLock;

use crate::line::{field, split_line};

/// One flag of the Python launcher.
#[derive(Debug, Clone)]
pub struct RouterFlag {
    /// A bare switch.
    pub bool: bool,
    /// The allowed values; empty when any value goes.
    pub choices: Vec<&'static str>,
    /// argparse's `nargs` (`+`, `*`); `1` for a repeatable flag; None for one value.
    pub nargs: Option<&'static str>,
}

/// The launcher's flags by name (`--worker-urls`), parsed on first use.
pub fn table() -> &'static HashMap<&'static str, RouterFlag> {
    static TABLE: OnceLock<HashMap<&'static str, RouterFlag>> = OnceLock::new();
    TABLE.get_or_init(|| parse(crate::VLLM_ROUTER_TABLE))
}

fn parse(text: &'static str) -> HashMap<&'static str, RouterFlag> {
    let mut map = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((name, braces, meta)) = split_line(line) else {
            continue;
        };
        // The pip package's `vllm-router` is the Python launcher: its flags are the
        // `cli=both` and `cli=python` ones.
        if !matches!(field(meta, "cli"), Some("both" | "python")) || !name.starts_with("--") {
            continue;
        }
        let choices = field(meta, "python_choices")
            .map(|c| c.split(',').collect())
            .unwrap_or(braces);
        let nargs = field(meta, "python_nargs").or_else(|| {
            meta.split_whitespace()
                .any(|t| t == "repeatable")
                .then_some("1")
        });
        map.insert(
            name,
            RouterFlag {
                bool: field(meta, "kind") == Some("bool"),
                choices,
                nargs,
            },
        );
    }
    map
}

#[cfg(test)]
mod tests {
    #[test]
    fn table_parses() {
        let t = super::table();
        assert!(t.contains_key("--worker-urls"));
        assert!(
            !t.contains_key("--epd-config"),
            "a flag of the Rust binary only"
        );
        let policy = t.get("--policy").expect("--policy");
        assert!(!policy.choices.contains(&"rendezvous_hash"));
    }
}
