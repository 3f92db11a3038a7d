//! The Plan: pure data, the DAG of task specs that `plan` and `graph` print and `run`
//! executes. Nothing in a Plan has touched a machine.
//!
//! Both inputs end here: a generic workflow file (`[[task]]` entries) and a deployment
//! recipe (`[inference]`, rendered by the shapes). Each [`TaskSpec`] carries everything its
//! execution needs, and its fingerprint is a hash of exactly that, so a resume can tell
//! whether a task would now do something different.

pub mod draw;
mod ready;

pub use ready::{Probe, Readiness};

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The whole plan of one workflow or deployment.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Plan {
    /// The recipe's or workflow's name (the file stem by default): names the state dir.
    pub name: String,
    /// The backend it is meant for (`local`, `ssh`, `slurm`, a plugin's name).
    pub backend: String,
    /// The `[backend]` table's other fields (partition, hosts, ...), for the backend to read.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub backend_config: serde_json::Value,
    /// Nodes the plan uses, in order (`node0`, `node1`, ...). Empty for a plain workflow,
    /// whose tasks run on this machine.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    pub tasks: Vec<TaskSpec>,
    /// Where the deployment answers once it is up (the router's URL), for the closing
    /// message of `run`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// A deployment's arithmetic, for people: the node count and, per node, which ranks,
    /// GPUs and ports each engine process has. `None` for a plain workflow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<Layout>,
    /// How `run --attach` and `watch` restart a service that dies.
    #[serde(default)]
    pub restart: RestartPolicy,
}

/// How `run --attach` and `watch` restart a service that dies: after `backoff`, doubled at
/// each death up to `max_backoff`; more than `budget` deaths within `window` and it is left
/// down, reported once.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RestartPolicy {
    pub budget: u32,
    #[serde(with = "duration")]
    pub window: Duration,
    #[serde(with = "duration")]
    pub backoff: Duration,
    #[serde(with = "duration")]
    pub max_backoff: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            budget: 5,
            window: Duration::from_secs(600),
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
        }
    }
}

/// How a deployment's ranks sit on its nodes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Layout {
    /// One line: nodes, units, replicas, ranks and how they are balanced.
    pub summary: String,
    pub nodes: Vec<NodeLayout>,
}

/// One node's engine processes and other services.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NodeLayout {
    pub node: String,
    pub processes: Vec<ProcessLayout>,
}

/// One process on a node.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ProcessLayout {
    pub task: String,
    /// Its global data-parallel rank(s) (`3`, `8-15`), or `-` for an engine of its own or a
    /// service that has none.
    pub ranks: String,
    /// `CUDA_VISIBLE_DEVICES`, or `all` / `-`.
    pub gpus: String,
    pub ports: Vec<u16>,
}

/// The state dir of a plan when none is given: `.prl-flow/<name>`.
pub fn default_state_dir(name: &str) -> std::path::PathBuf {
    std::path::Path::new(".prl-flow").join(name)
}

/// The rule for a plan's name and a task's id, both of which become parts of paths under the
/// state dir (`.prl-flow/<name>/`, `logs/<id>.log`, `run/<id>/`), said in messages.
pub const IDENTIFIER_RULE: &str =
    "letters, digits, `-`, `_` and `.`, not starting with `.`, at most 128 characters";

/// Checks that `text` is a safe identifier ([`IDENTIFIER_RULE`]): it can only ever name one
/// file or directory, never `..`, a hidden file, or a path elsewhere. `Err` says what is
/// wrong with it.
pub fn check_identifier(text: &str) -> Result<(), String> {
    if text.is_empty() {
        return Err("is empty".into());
    }
    if text.starts_with('.') {
        return Err("starts with `.`".into());
    }
    if text.chars().count() > 128 {
        return Err("is longer than 128 characters".into());
    }
    match text
        .chars()
        .find(|c| !(c.is_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        Some(c) => Err(format!("holds {}", describe_char(c))),
        None => Ok(()),
    }
}

fn describe_char(c: char) -> String {
    match c {
        '/' => "a `/`".into(),
        ' ' => "a space".into(),
        c if c.is_control() => format!("a control character (U+{:04X})", c as u32),
        c => format!("`{c}`"),
    }
}

/// The placeholder for a node's address in argv, env, files and probe URLs: `${host:node1}`.
/// Addresses are known only once nodes are allocated (a SLURM allocation names them), so the
/// plan keeps the placeholder and the run fills it in; `plan --backend local` shows them
/// filled.
pub fn host_ref(node: &str) -> String {
    format!("${{host:{node}}}")
}

/// Replaces every `${host:NODE}` in `text` by `lookup(NODE)`; unknown nodes stay as they are.
pub fn resolve_hosts(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    if !text.contains("${host:") {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("${host:") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 7..];
        match after.find('}') {
            Some(end) => {
                let node = &after[..end];
                match lookup(node) {
                    Some(addr) => out.push_str(&addr),
                    None => out.push_str(&rest[at..at + 7 + end + 1]),
                }
                rest = &after[end + 1..];
            }
            None => {
                out.push_str(&rest[at..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// One task, fully rendered.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TaskSpec {
    /// Stable id, e.g. `prefill[0].rank[1]`.
    pub id: String,
    /// `custom` for workflow tasks; for deployments `allocate`, `mooncake-master`,
    /// `metadata-server`, `mooncake-client`, `engine`, `prefill`, `decode`, `router`,
    /// `register`, `health-probe`.
    pub kind: String,
    #[serde(default)]
    pub needs: Vec<String>,
    /// The node it runs on (`None`: this machine, where prl-flow runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// What to execute: an argv, a shell command, or a built-in action.
    pub command: Command,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Where the command starts, an absolute path (on the node's host for a task with a
    /// node). `None`: the task's run dir under the state dir, as for every deployment task.
    /// A workflow's `[[task]]` gets its file's directory, or its `dir` field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    /// Files to place before the command starts, relative to the task's run dir.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileSpec>,
    /// Ports the task listens on (for clash checks and displays).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// The recipe field that set each of `ports`, for messages (`[inference.deployment]
    /// backend_port`). Derived from the recipe each time it is loaded, so never stored.
    #[serde(skip)]
    pub port_fields: BTreeMap<u16, String>,
    /// A service keeps running once ready; a one-shot is done when it exits 0.
    #[serde(default)]
    pub service: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<Readiness>,
    /// The whole attempt, readiness included.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "opt_duration"
    )]
    pub timeout: Option<Duration>,
    #[serde(default)]
    pub retries: u32,
    /// The pause before the first retry (doubled each time); the engine's default if unset.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "opt_duration"
    )]
    pub backoff: Option<Duration>,
    /// Where the task was declared in its source file (not part of the fingerprint).
    #[serde(skip)]
    pub span: Option<Range<usize>>,
    /// Byte ranges of each `needs` entry in the source file.
    #[serde(skip)]
    pub need_spans: Vec<Option<Range<usize>>>,
    /// On resume, what a re-run of one of its needs means for it; a need not listed
    /// re-runs it too. Not part of the fingerprint: it changes no command.
    #[serde(skip)]
    pub edges: BTreeMap<String, Edge>,
}

/// What a re-run of a need means for the task that needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "on-rerun", content = "why")]
pub enum Edge {
    /// It stays; its registration task tells it about the new process.
    Reregister,
    /// It stays: nothing of it depends on the need's process.
    Nothing,
    /// It restarts too, for this reason.
    Restart(String),
}

impl Edge {
    /// For people (`plan`): `re-register`, `nothing`, `restart (why)`.
    pub fn describe(&self) -> String {
        match self {
            Edge::Reregister => "stays; re-registered".into(),
            Edge::Nothing => "stays".into(),
            Edge::Restart(why) => format!("restarts too: {why}"),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", tag = "type")]
pub enum Command {
    /// An argv, executed without a shell.
    Argv { argv: Vec<String> },
    /// A shell command line, run with `sh -c`.
    Shell { script: String },
    /// Something prl-flow does itself rather than by a process on a node: a readiness
    /// check, a completion through the router, a registration call. `action` names it;
    /// `args` says the rest.
    Builtin {
        action: crate::actions::Action,
        #[serde(default)]
        args: serde_json::Value,
    },
}

impl Default for Command {
    fn default() -> Self {
        Command::Argv { argv: Vec::new() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileSpec {
    pub path: String,
    pub content: String,
}

impl TaskSpec {
    /// Where the task and each of its needs are written, for the graph's errors.
    pub fn origin(&self) -> prl_flow_engine::Origin {
        prl_flow_engine::Origin {
            span: self.span.clone(),
            need_spans: self.need_spans.clone(),
        }
    }

    /// A hash of everything that changes what the task does.
    pub fn fingerprint(&self) -> String {
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        let digest = Sha256::digest(&bytes);
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut hex = String::with_capacity(16);
        for b in &digest[..8] {
            hex.push(HEX[usize::from(b >> 4)] as char);
            hex.push(HEX[usize::from(b & 15)] as char);
        }
        hex
    }

    /// The command as one line for people (`plan` output), secrets shown.
    pub fn command_line(&self) -> String {
        self.shown_command_line(true)
    }

    /// The command as one line for people, every argument one shell word; the values of
    /// secret-looking flags masked unless `show_secrets` ([`shown_argv`]).
    pub fn shown_command_line(&self, show_secrets: bool) -> String {
        match &self.command {
            Command::Argv { argv } => shown_argv(argv, show_secrets)
                .iter()
                .map(|a| shell_word(a))
                .collect::<Vec<_>>()
                .join(" "),
            Command::Shell { script } => script.clone(),
            Command::Builtin { action, args } => {
                if args.is_null() {
                    format!("(built-in) {action}")
                } else {
                    format!("(built-in) {action} {args}")
                }
            }
        }
    }
}

/// Words that mark a name (an environment variable's, a flag's) as holding a secret,
/// matched anywhere in the name, case-insensitively: `HF_TOKEN`, `api_key`, `--api-key`,
/// `DB_PASSWORD`, `AWS_SECRET_ACCESS_KEY`.
pub const SECRET_WORDS: &[&str] = &[
    "TOKEN",
    "KEY",
    "SECRET",
    "PASSWORD",
    "PASSWD",
    "CREDENTIAL",
    "AUTH",
    "PRIVATE",
];

/// What a secret value is shown as.
pub const MASK: &str = "***";

/// True when `name` looks like it names a secret (see [`SECRET_WORDS`]).
pub fn is_secret(name: &str) -> bool {
    let upper = name.to_ascii_uppercase().replace('-', "_");
    SECRET_WORDS.iter().any(|w| upper.contains(w))
}

/// An environment for people: the values of secret-looking keys become [`MASK`] unless
/// `show_secrets`.
pub fn shown_env(env: &BTreeMap<String, String>, show_secrets: bool) -> BTreeMap<String, String> {
    env.iter()
        .map(|(k, v)| {
            let v = if !show_secrets && is_secret(k) {
                MASK.to_string()
            } else {
                v.clone()
            };
            (k.clone(), v)
        })
        .collect()
}

/// An argv for people: the value of a secret-looking flag (`--api-key K`,
/// `--hf-token=T`) becomes [`MASK`] unless `show_secrets`.
pub fn shown_argv(argv: &[String], show_secrets: bool) -> Vec<String> {
    let mut out = Vec::with_capacity(argv.len());
    let mut mask_next = false;
    for a in argv {
        if std::mem::take(&mut mask_next) && !a.starts_with('-') {
            out.push(MASK.to_string());
            continue;
        }
        let flag = a.starts_with('-') && !show_secrets;
        match a.split_once('=') {
            Some((name, _)) if flag && is_secret(name) => out.push(format!("{name}={MASK}")),
            None if flag && is_secret(a) => {
                mask_next = true;
                out.push(a.clone());
            }
            _ => out.push(a.clone()),
        }
    }
    out
}

/// `text` as one POSIX shell word, quoted by `shlex` where it needs it (`a b` → `'a b'`),
/// for every value prl-flow prints or renders for a shell. A NUL, which no shell word can
/// hold, is dropped (validation refuses it in every field before this is reached).
pub fn shell_word(text: &str) -> String {
    match shlex::try_quote(text) {
        Ok(q) => q.into_owned(),
        Err(_) => shell_word(&text.replace('\0', "")),
    }
}

/// Parses `500ms`, `10s`, `10m`, `1h30m` (humantime's syntax).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("`{text}` is not a duration ({e}); write e.g. `500ms`, `30s`, `10m`"))
}

pub fn format_duration(d: Duration) -> String {
    prl_flow_engine::fmt_duration(d)
}

mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&super::format_duration(*d)),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = Option::<String>::deserialize(d)?;
        text.map(|t| super::parse_duration(&t).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_single_safe_path_parts() {
        for ok in ["a", "stage-weights", "build_2", "v1.2", "modèle"] {
            assert_eq!(check_identifier(ok), Ok(()), "{ok}");
        }
        for bad in [
            "", ".", "..", ".hidden", "../../x", "/abs", "a/b", "a b", "a\0b", "x$(y)",
        ] {
            assert!(check_identifier(bad).is_err(), "{bad:?}");
        }
        assert!(check_identifier(&"a".repeat(129)).is_err());
    }

    #[test]
    fn secret_names_are_matched_case_insensitively() {
        for k in [
            "HF_TOKEN",
            "hf_token",
            "OPENAI_API_KEY",
            "db-password",
            "AWS_SECRET_ACCESS_KEY",
            "--api-key",
        ] {
            assert!(is_secret(k), "{k}");
        }
        for k in [
            "PATH",
            "VLLM_NIXL_SIDE_CHANNEL_PORT",
            "PYTHONHASHSEED",
            "--model",
        ] {
            assert!(!is_secret(k), "{k}");
        }
    }

    #[test]
    fn secret_values_are_masked_in_env_and_argv_unless_asked() {
        let env: BTreeMap<String, String> = [
            ("HF_TOKEN".to_string(), "hf_x".to_string()),
            ("A".into(), "1".into()),
        ]
        .into();
        assert_eq!(shown_env(&env, false)["HF_TOKEN"], MASK);
        assert_eq!(shown_env(&env, false)["A"], "1");
        assert_eq!(shown_env(&env, true)["HF_TOKEN"], "hf_x");
        let argv: Vec<String> = [
            "vllm",
            "serve",
            "m",
            "--api-key",
            "k1",
            "--hf-token=k2",
            "--port",
            "8",
        ]
        .map(String::from)
        .into();
        assert_eq!(
            shown_argv(&argv, false),
            [
                "vllm",
                "serve",
                "m",
                "--api-key",
                MASK,
                "--hf-token=***",
                "--port",
                "8"
            ]
        );
        assert_eq!(shown_argv(&argv, true), argv);
    }

    #[test]
    fn shell_words_come_back_intact() {
        for v in [
            "plain",
            "a b",
            "x$(touch pwned)",
            "it's",
            "`id`",
            "\"q\"",
            "",
            "a\nb",
        ] {
            let w = shell_word(v);
            assert_eq!(
                shlex::split(&w).as_deref(),
                Some(&[v.to_string()][..]),
                "{v:?} → {w}"
            );
        }
    }
}
