//! The flags of Mooncake's programs (`mooncake_master`, `mooncake_client`: gflags;
//! `mooncake_http_metadata_server`: argparse), one `[program]` section each.

use std::collections::HashMap;
use std::sync::OnceLock;

use crate::line::{field, split_line};

/// glog's own flags, which every Mooncake C++ binary accepts but the table (made from the
/// programs' `--help`) does not list.
pub const GLOG_FLAGS: &[&str] = &[
    "logtostderr",
    "alsologtostderr",
    "v",
    "log_dir",
    "minloglevel",
];

/// A program's flags: name (without `--`) → type (`bool`, `int32`, `string`, ...; a flag
/// with a set of values has the type `choice:a,b,c`).
pub type Flags = HashMap<&'static str, String>;

/// The flags of `program`, or None for a program the table does not have.
pub fn program(program: &str) -> Option<&'static Flags> {
    static TABLE: OnceLock<HashMap<&'static str, Flags>> = OnceLock::new();
    TABLE
        .get_or_init(|| parse(crate::MOONCAKE_TABLE))
        .get(program)
}

fn parse(text: &'static str) -> HashMap<&'static str, Flags> {
    let mut all: HashMap<&'static str, Flags> = HashMap::new();
    let mut section = "";
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix('[') {
            section = rest.split(']').next().unwrap_or("");
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let Some((name, choices, meta)) = split_line(line) else {
            continue;
        };
        let Some(name) = name.strip_prefix("--") else {
            continue;
        };
        let ty = if choices.is_empty() {
            field(meta, "type").unwrap_or("string").to_string()
        } else {
            format!("choice:{}", choices.join(","))
        };
        all.entry(section).or_default().insert(name, ty);
    }
    all
}

#[cfg(test)]
mod tests {
    #[test]
    fn table_parses() {
        assert!(super::program("mooncake_master").is_some_and(|t| t.contains_key("rpc_port")));
        assert!(
            super::program("mooncake_http_metadata_server").is_some_and(|t| t
                .get("log-level")
                .is_some_and(|ty| ty.starts_with("choice:")))
        );
        assert!(super::program("mooncake_nothing").is_none());
    }
}
