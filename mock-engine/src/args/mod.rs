//! `vllm serve` argument parsing, modelled on vLLM 0.33.
//!
//! Real `vllm serve` runs argv through two layers, and the mock copies both so that a command
//! line it accepts is one vLLM accepts, and an error it prints is the one vLLM would print:
//!
//! 1. vLLM's `FlexibleArgumentParser` rewrites argv first: `-O3`, `-O=3` and `-O 3` become
//!    `--optimization-level`, `_` in a long flag's name becomes `-` (only in the name, up to
//!    the first `.` or `=`), and dotted sub-keys (`--kv-transfer-config.kv_role kv_producer`,
//!    `--x.key+ a,b` for a list) are gathered into one JSON object per flag and appended at the
//!    *end* of argv. Being appended, that object replaces, not merges with, a plain
//!    `--kv-transfer-config '{...}'` given earlier: argparse keeps the last value.
//! 2. Python's argparse then walks argv left to right. A value error (`invalid int value`,
//!    `invalid choice`, `expected one argument`) stops the parse at once; unknown options and
//!    stray positionals are collected and reported together at the end as
//!    `unrecognized arguments`, which is why a value error wins over an earlier unknown flag.
//!
//! The flag list is the `vllm serve` table of `prl-flow-flags`, compiled in so that the mock
//! never reads a file at run time. One deliberate difference from the real parser:
//! argparse's `allow_abbrev` is on in vLLM, so `--max-model` would be taken as
//! `--max-model-len`. The mock demands exact names, because a deployment that only works
//! thanks to an abbreviation breaks the day vLLM adds a flag sharing that prefix.
//!
//! Here: the parsed result ([`ServeArgs`]) and the entry point; [`preprocess`] is layer 1,
//! [`parser`] layer 2, [`value`] the Python conversions of one value.

mod parser;
mod preprocess;
mod value;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use prl_flow_flags::vllm::{table, Flag};
use serde_json::Value as Json;

pub(crate) use self::value::py_repr;

pub(crate) const USAGE: &str = "usage: vllm serve [model_tag] [options]";
const PROG: &str = "vllm serve";

/// A parsed value, as argparse would have stored it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum ArgValue {
    Bool(bool),
    Str(String),
    Int(i64),
    Float(f64),
    Json(Json),
    None,
    List(Vec<ArgValue>),
}

impl ArgValue {
    /// Python's repr, for the `non-default args` log line.
    fn py(&self) -> String {
        match self {
            ArgValue::Bool(true) => "True".into(),
            ArgValue::Bool(false) => "False".into(),
            ArgValue::Str(s) => py_repr(s),
            ArgValue::Int(i) => i.to_string(),
            ArgValue::Float(f) => format!("{f:?}"),
            ArgValue::Json(j) => j.to_string(),
            ArgValue::None => "None".into(),
            ArgValue::List(items) => {
                let inner: Vec<String> = items.iter().map(ArgValue::py).collect();
                format!("[{}]", inner.join(", "))
            }
        }
    }
}

/// The result of a successful parse: the positional model tag and one value per dest.
#[derive(Debug, Default)]
pub(crate) struct ServeArgs {
    pub(crate) model_tag: Option<String>,
    values: BTreeMap<&'static str, ArgValue>,
    order: Vec<&'static str>,
    /// Things vLLM would log a warning about (duplicate dotted keys, --model next to a tag).
    pub(crate) warnings: Vec<String>,
}

impl ServeArgs {
    pub(crate) fn get(&self, dest: &str) -> Option<&ArgValue> {
        self.values.get(dest)
    }

    pub(crate) fn str(&self, dest: &str) -> Option<&str> {
        match self.get(dest) {
            Some(ArgValue::Str(s)) => Some(s),
            _ => None,
        }
    }

    pub(crate) fn int(&self, dest: &str) -> Option<i64> {
        match self.get(dest) {
            Some(ArgValue::Int(i)) => Some(*i),
            _ => None,
        }
    }

    pub(crate) fn flag(&self, dest: &str) -> Option<bool> {
        match self.get(dest) {
            Some(ArgValue::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    /// A string or list of strings (`nargs=+`) as a Vec; empty when unset or None.
    pub(crate) fn strings(&self, dest: &str) -> Vec<String> {
        match self.get(dest) {
            Some(ArgValue::Str(s)) => vec![s.clone()],
            Some(ArgValue::List(items)) => items
                .iter()
                .filter_map(|v| match v {
                    ArgValue::Str(s) => Some(s.clone()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    pub(crate) fn json(&self, dest: &str) -> Option<&Json> {
        match self.get(dest) {
            Some(ArgValue::Json(j)) => Some(j),
            _ => None,
        }
    }

    fn set(&mut self, spec: &Flag, value: ArgValue) {
        if !self.order.contains(&spec.dest) {
            self.order.push(spec.dest);
        }
        if spec.append {
            let mut items = match self.values.remove(spec.dest) {
                Some(ArgValue::List(items)) => items,
                _ => Vec::new(),
            };
            items.push(value);
            self.values.insert(spec.dest, ArgValue::List(items));
        } else {
            self.values.insert(spec.dest, value);
        }
    }

    /// `{'model_tag': 'x', 'port': 8001}` as vLLM logs it at start.
    pub(crate) fn non_default_summary(&self) -> String {
        let mut parts = Vec::new();
        if let Some(tag) = &self.model_tag {
            parts.push(format!("'model_tag': {}", py_repr(tag)));
        }
        for dest in &self.order {
            if let Some(v) = self.values.get(dest) {
                parts.push(format!("'{dest}': {}", v.py()));
            }
        }
        format!("{{{}}}", parts.join(", "))
    }
}

#[derive(Debug)]
pub(crate) enum Parsed {
    Serve(ServeArgs),
    Help,
}

/// An argparse error; `render` gives the two lines argparse prints before exiting with 2.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ArgError(pub(crate) String);

impl ArgError {
    pub(crate) fn render(&self) -> String {
        format!("{USAGE}\n{PROG}: error: {}\n", self.0)
    }
}

pub(crate) fn help_text() -> String {
    format!(
        "{USAGE}\n\n\
         Start the vLLM OpenAI-compatible API server.\n\
         This is prl-flow's mock engine: it parses the flags of vLLM 0.33 `vllm serve` exactly,\n\
         serves the OpenAI API with made-up text, and does no GPU work.\n\n\
         positional arguments:\n  \
         model_tag             The model tag to serve (default: Qwen/Qwen3-0.6B)\n\n\
         options:\n  \
         -h, --help            show this help message and exit\n  \
         --host HOST           address to bind (mock default 127.0.0.1)\n  \
         --port PORT           HTTP port (default 8000)\n  \
         ... and the other {} flags of `vllm serve` (see `vllm serve --help=all`).\n\n\
         mock-only environment:\n  \
         PRL_MOCK_STARTUP_DELAY=3s     bind the HTTP port only after this long\n  \
         PRL_MOCK_FAIL=start|hang|after:10s  fail to start, never get ready, or crash later\n",
        table().flags().len().saturating_sub(2)
    )
}

/// Parses `vllm serve`'s arguments (everything after `serve`; a leading `serve` is tolerated so
/// that the mock engine can stand in for the `vllm` executable itself).
pub(crate) fn parse(argv: &[String]) -> Result<Parsed, ArgError> {
    let argv = match argv.split_first() {
        Some((first, rest)) if first == "serve" => rest,
        _ => argv,
    };
    let mut warnings = Vec::new();
    let toks = preprocess::preprocess(argv, &mut warnings)?;
    let mut parsed = parser::Parser { table: table() }.run(&toks)?;
    if let Parsed::Serve(args) = &mut parsed {
        args.warnings.extend(warnings);
    }
    Ok(parsed)
}
