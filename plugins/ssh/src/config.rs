//! The `[backend]` table of an ssh recipe, checked in one pass.
//!
//! ```toml
//! [backend]
//! type = "ssh"
//! hosts = ["gpu1", "ubuntu@10.0.0.12", "10.0.0.13:2222", { host = "gpu4", address = "192.168.1.4" }]
//! # or, instead of `hosts`, a site file with one host per line in the same syntax:
//! # hosts_file = "/etc/prl-flow/hosts"
//! accept_new_host_keys = false   # the default: an unknown host key is an error
//! ```
//!
//! Nodes of the recipe take the hosts in order (`node0` the first). Every problem is
//! reported at once, each with the field it is about (`hosts[2]`), so the recipe module can
//! point at the place in the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use prl_flow_backend::ConfigError;
use prl_flow_engine::text::closest;
use serde_json::Value;

pub use crate::hosts::HostSpec;
use crate::hosts::{parse_hosts, parse_hosts_file};

/// The validated `[backend]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct SshConfig {
    pub hosts: Vec<HostSpec>,
    /// `ssh -F FILE`: instead of `~/.ssh/config` (tests use it; sites rarely need it).
    pub ssh_config: Option<PathBuf>,
    /// Extra `-o Key=Value` options, before prl-flow's own.
    pub options: BTreeMap<String, String>,
    /// `StrictHostKeyChecking accept-new` instead of `yes`.
    pub accept_new_host_keys: bool,
    /// Where run dirs go on the hosts; relative paths are under the remote home.
    pub remote_dir: String,
    /// Where the local ControlMaster sockets live.
    pub control_dir: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// `ServerAliveInterval`: a dropped link is noticed after three missed answers.
    pub server_alive_interval: Duration,
    /// How long an idle master connection stays open after the last task used it.
    pub control_persist: Duration,
    /// sshd's `MaxSessions` on the hosts (10 unless changed): prl-flow opens no more
    /// sessions than this at once over one connection.
    pub max_sessions: usize,
}

pub const DEFAULT_REMOTE_DIR: &str = ".prl-flow/remote";
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_SERVER_ALIVE: Duration = Duration::from_secs(5);
pub const DEFAULT_CONTROL_PERSIST: Duration = Duration::from_secs(600);
pub const DEFAULT_MAX_SESSIONS: usize = 10;

/// The fields `[backend]` may have for `type = "ssh"`.
pub const FIELDS: &[&str] = &[
    "type",
    "hosts",
    "hosts_file",
    "ssh_config",
    "options",
    "accept_new_host_keys",
    "remote_dir",
    "control_dir",
    "connect_timeout",
    "server_alive_interval",
    "control_persist",
    "max_sessions",
];

/// ssh options prl-flow sets itself: a recipe may not override them through `options`.
const OWN_OPTIONS: &[(&str, &str)] = &[
    ("batchmode", "prl-flow runs ssh without a terminal, so it always sets `BatchMode yes`"),
    (
        "stricthostkeychecking",
        "host keys are always checked; set `accept_new_host_keys = true` to accept keys of hosts not yet known",
    ),
    ("controlmaster", "prl-flow keeps one master connection per host itself"),
    ("controlpath", "set `control_dir` to choose where the master sockets live"),
    ("controlpersist", "set `control_persist` (a duration)"),
    ("connecttimeout", "set `connect_timeout` (a duration)"),
    ("serveraliveinterval", "set `server_alive_interval` (a duration)"),
    ("user", "write the user in the host: `user@host`, or `{ host = ..., user = ... }`"),
    ("port", "write the port in the host: `host:2222`, or `{ host = ..., port = 2222 }`"),
];

impl SshConfig {
    /// Reads and checks `[backend]` (as JSON); relative `hosts_file` and `ssh_config` paths
    /// are taken from `base_dir` (the recipe's directory) when given, else from the current
    /// directory.
    pub fn from_value(value: &Value, base_dir: Option<&Path>) -> Result<Self, Vec<ConfigError>> {
        let mut errs = Vec::new();
        let empty = serde_json::Map::new();
        let table = match value {
            Value::Object(m) => m,
            Value::Null => &empty,
            other => {
                return Err(vec![ConfigError::new(
                    "",
                    format!("expected a table, found {other}"),
                )]);
            }
        };
        prl_flow_backend::table::TableReader::new(table, &mut errs).unknown_fields(
            "ssh",
            FIELDS,
            |k, f| closest(k, f.iter().copied()),
        );
        let resolve = |p: &str| -> PathBuf {
            let p = PathBuf::from(p);
            match base_dir {
                Some(b) if p.is_relative() => b.join(p),
                _ => p,
            }
        };

        let mut hosts = Vec::new();
        match (table.get("hosts"), table.get("hosts_file")) {
            (Some(_), Some(_)) => errs.push(
                ConfigError::new("hosts_file", "both `hosts` and `hosts_file` are given")
                    .help("keep one: the list in the recipe, or the site file"),
            ),
            (None, None) => errs.push(
                ConfigError::new("hosts", "the ssh backend needs hosts")
                    .help("add `hosts = [\"host1\", \"user@host2:2222\"]`, or `hosts_file = \"PATH\"` (one host per line)"),
            ),
            (Some(v), None) => hosts = parse_hosts(v, &mut errs),
            (None, Some(v)) => match v.as_str() {
                Some(p) => {
                    let path = resolve(p);
                    match std::fs::read_to_string(&path) {
                        Ok(text) => hosts = parse_hosts_file(&text, &path, &mut errs),
                        Err(e) => errs.push(ConfigError::new(
                            "hosts_file",
                            format!("cannot read `{}`: {e}", path.display()),
                        )),
                    }
                }
                None => errs.push(ConfigError::new("hosts_file", "expected a path (a string)")),
            },
        }
        for (i, h) in hosts.iter().enumerate() {
            if let Some(j) = hosts[..i].iter().position(|o| o == h) {
                errs.push(
                    ConfigError::new(
                        format!("hosts[{i}]"),
                        format!("`{h}` is listed twice (also hosts[{j}])"),
                    )
                    .help("each node needs a host of its own"),
                );
            }
        }

        let string = |key: &str, errs: &mut Vec<ConfigError>| -> Option<String> {
            match table.get(key) {
                None => None,
                Some(Value::String(s)) if !s.trim().is_empty() => Some(s.clone()),
                Some(_) => {
                    errs.push(ConfigError::new(key, "expected a non-empty string"));
                    None
                }
            }
        };
        let duration = |key: &str, default: Duration, errs: &mut Vec<ConfigError>| -> Duration {
            match table.get(key) {
                None => default,
                Some(Value::String(s)) => match humantime::parse_duration(s.trim()) {
                    Ok(d) if d >= Duration::from_secs(1) => d,
                    Ok(_) => {
                        errs.push(
                            ConfigError::new(key, format!("`{s}` is under a second"))
                                .help("ssh counts these in whole seconds"),
                        );
                        default
                    }
                    Err(e) => {
                        errs.push(
                            ConfigError::new(key, format!("`{s}` is not a duration ({e})"))
                                .help("write e.g. `10s` or `2m`"),
                        );
                        default
                    }
                },
                Some(Value::Number(n)) => match n.as_u64() {
                    Some(s) if s > 0 => Duration::from_secs(s),
                    _ => {
                        errs.push(ConfigError::new(
                            key,
                            format!("`{n}` is not a positive number of seconds"),
                        ));
                        default
                    }
                },
                Some(other) => {
                    errs.push(ConfigError::new(
                        key,
                        format!("expected a duration like \"10s\", found {other}"),
                    ));
                    default
                }
            }
        };

        let ssh_config = string("ssh_config", &mut errs).map(|p| resolve(&p));
        let mut options = BTreeMap::new();
        match table.get("options") {
            None => {}
            Some(Value::Object(m)) => {
                for (k, v) in m {
                    let field = format!("options.{k}");
                    let value = match v {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        Value::Bool(b) => if *b { "yes" } else { "no" }.to_string(),
                        _ => {
                            errs.push(ConfigError::new(field, "expected a string, number or boolean"));
                            continue;
                        }
                    };
                    if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric()) {
                        errs.push(ConfigError::new(field, "not an ssh option name").help("see `man ssh_config`: e.g. `IdentityFile`, `ProxyJump`"));
                        continue;
                    }
                    if let Some((_, why)) = OWN_OPTIONS.iter().find(|(o, _)| o.eq_ignore_ascii_case(k)) {
                        errs.push(ConfigError::new(field, format!("`{k}` is set by prl-flow")).help(*why));
                        continue;
                    }
                    if value.contains(['\n', '\r', '\0']) {
                        errs.push(ConfigError::new(field, "a value may not span lines"));
                        continue;
                    }
                    options.insert(k.clone(), value);
                }
            }
            Some(_) => errs.push(
                ConfigError::new("options", "expected a table of ssh options")
                    .help("e.g. `options = { ProxyJump = \"bastion\", IdentityFile = \"~/.ssh/cluster\" }`"),
            ),
        }
        let accept_new_host_keys = match table.get("accept_new_host_keys") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                errs.push(ConfigError::new(
                    "accept_new_host_keys",
                    "expected true or false",
                ));
                false
            }
        };
        let remote_dir =
            string("remote_dir", &mut errs).unwrap_or_else(|| DEFAULT_REMOTE_DIR.into());
        if remote_dir.contains(['\n', '\0']) {
            errs.push(ConfigError::new("remote_dir", "a path may not span lines"));
        }
        let control_dir = string("control_dir", &mut errs).map(|p| resolve(&p));
        let connect_timeout = duration("connect_timeout", DEFAULT_CONNECT_TIMEOUT, &mut errs);
        let server_alive_interval =
            duration("server_alive_interval", DEFAULT_SERVER_ALIVE, &mut errs);
        let control_persist = duration("control_persist", DEFAULT_CONTROL_PERSIST, &mut errs);
        let max_sessions = match table.get("max_sessions") {
            None => DEFAULT_MAX_SESSIONS,
            Some(v) => match v.as_u64() {
                Some(n) if (2..=1000).contains(&n) => n as usize,
                _ => {
                    errs.push(
                        ConfigError::new(
                            "max_sessions",
                            format!("`{v}` is not a number from 2 to 1000"),
                        )
                        .help("set it to the hosts' sshd `MaxSessions` (10 by default)"),
                    );
                    DEFAULT_MAX_SESSIONS
                }
            },
        };
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(Self {
            hosts,
            ssh_config,
            options,
            accept_new_host_keys,
            remote_dir,
            control_dir,
            connect_timeout,
            server_alive_interval,
            control_persist,
            max_sessions,
        })
    }

    /// Is there a host for each of `nodes` nodes?
    pub fn check_nodes(&self, nodes: usize) -> Result<(), ConfigError> {
        if nodes <= self.hosts.len() {
            return Ok(());
        }
        let listed: Vec<String> = self.hosts.iter().map(|h| h.to_string()).collect();
        Err(ConfigError::new(
            "hosts",
            format!(
                "the recipe needs {nodes} node{} but {} host{} {} given ({})",
                if nodes == 1 { "" } else { "s" },
                self.hosts.len(),
                if self.hosts.len() == 1 { "" } else { "s" },
                if self.hosts.len() == 1 { "is" } else { "are" },
                listed.join(", ")
            ),
        )
        .help(format!(
            "add {} more host{}, or make the deployment smaller",
            nodes - self.hosts.len(),
            if nodes - self.hosts.len() == 1 {
                ""
            } else {
                "s"
            }
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn too_few_hosts_is_refused_with_the_numbers() {
        let v = json!({ "hosts": ["a", "b", "c"] });
        let config = SshConfig::from_value(&v, None).expect("a valid table");
        let err = config.check_nodes(4).expect_err("4 > 3");
        assert_eq!(err.field, "hosts");
        assert!(
            err.message
                .contains("needs 4 nodes but 3 hosts are given (a, b, c)"),
            "{err}"
        );
        assert!(config.check_nodes(3).is_ok());
    }

    #[test]
    fn every_problem_at_once() {
        let v = json!({
            "type": "ssh",
            "hosts": ["a", "a", { "host": "b", "port": 70000 }, 3],
            "hots": 1,
            "options": { "StrictHostKeyChecking": "no", "ProxyJump": "bastion" },
            "accept_new_host_keys": "yes",
            "connect_timeout": "soon",
        });
        let errs = SshConfig::from_value(&v, None).expect_err("bad");
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "hots",
            "hosts[1]",
            "hosts[2].port",
            "hosts[3]",
            "options.StrictHostKeyChecking",
            "accept_new_host_keys",
            "connect_timeout",
        ] {
            assert!(fields.contains(&f), "{f} missing from {fields:?}");
        }
        let typo = errs.iter().find(|e| e.field == "hots").expect("typo");
        assert_eq!(typo.help.as_deref(), Some("did you mean `hosts`?"));
    }

    #[test]
    fn site_file_and_tables() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("hosts"),
            "# the rack\nroot@10.0.0.2\n\n10.0.0.3:2222  # spare\n",
        )
        .expect("write");
        let c =
            SshConfig::from_value(&json!({ "hosts_file": "hosts" }), Some(dir.path())).expect("ok");
        assert_eq!(c.hosts.len(), 2);
        assert_eq!(c.hosts[1].port, Some(2222));
        assert!(!c.accept_new_host_keys, "never a silent default");
        let c = SshConfig::from_value(
            &json!({ "hosts": [{ "host": "gpu4", "user": "me", "port": 22, "address": "192.168.1.4" }], "control_persist": 30 }),
            None,
        )
        .expect("ok");
        assert_eq!(c.hosts[0].address.as_deref(), Some("192.168.1.4"));
        assert_eq!(c.control_persist, Duration::from_secs(30));
        let errs = SshConfig::from_value(&json!({ "hosts_file": "nope" }), Some(dir.path()))
            .expect_err("missing");
        assert!(errs[0].message.contains("cannot read"), "{}", errs[0]);
    }
}
