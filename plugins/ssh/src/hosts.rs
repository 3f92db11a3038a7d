//! The hosts of an ssh recipe: `[user@]host[:port]` strings, host tables, and a site's hosts
//! file (one host per line), each read with every problem reported at its field.

use std::fmt;
use std::path::Path;

use prl_flow_backend::ConfigError;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One host as the recipe names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HostSpec {
    /// What ssh connects to: a name from `~/.ssh/config`, a DNS name or an address.
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The address services on this host bind and are reached at, when it is not the one
    /// ssh resolves `host` to (a separate data network, a host behind a jump host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

impl HostSpec {
    /// Parses `[user@]host[:port]`; an IPv6 address with a port is written `[::1]:22`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("a host is empty".into());
        }
        let (user, rest) = match text.rsplit_once('@') {
            Some((u, r)) => (Some(u.to_string()), r),
            None => (None, text),
        };
        let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
            let Some((h, after)) = inner.split_once(']') else {
                return Err(format!("`{text}`: `[` without `]`"));
            };
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| format!("`{text}`: expected `:PORT` after `]`"))?,
                ),
            };
            (h.to_string(), port)
        } else if rest.matches(':').count() > 1 {
            // A bare IPv6 address: no port possible without brackets.
            (rest.to_string(), None)
        } else {
            match rest.split_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (rest.to_string(), None),
            }
        };
        let port = match port {
            None => None,
            Some(p) => Some(
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| format!("`{text}`: `{p}` is not a port"))?,
            ),
        };
        let spec = Self {
            host,
            user,
            port,
            address: None,
        };
        spec.check().map_err(|e| format!("`{text}`: {e}"))?;
        Ok(spec)
    }

    fn check(&self) -> Result<(), String> {
        // A leading `-` would be read by ssh as an option; white space and quotes have no
        // place in a host name either.
        let bad = |s: &str| {
            s.is_empty()
                || s.starts_with('-')
                || s.chars()
                    .any(|c| c.is_whitespace() || c.is_control() || "'\"`$;&|<>\\".contains(c))
        };
        if bad(&self.host) {
            return Err(format!("`{}` is not a host name or address", self.host));
        }
        if let Some(u) = &self.user {
            if bad(u) || u.contains('@') {
                return Err(format!("`{u}` is not a user name"));
            }
        }
        if let Some(a) = &self.address {
            if bad(a) {
                return Err(format!("`{a}` is not an address"));
            }
        }
        Ok(())
    }
}

impl fmt::Display for HostSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(u) = &self.user {
            write!(f, "{u}@")?;
        }
        match self.port {
            Some(p) if self.host.contains(':') => write!(f, "[{}]:{p}", self.host),
            Some(p) => write!(f, "{}:{p}", self.host),
            None => write!(f, "{}", self.host),
        }
    }
}

pub(crate) fn parse_hosts(v: &Value, errs: &mut Vec<ConfigError>) -> Vec<HostSpec> {
    let Some(list) = v.as_array() else {
        errs.push(
            ConfigError::new("hosts", "expected a list of hosts")
                .help("e.g. `hosts = [\"gpu1\", \"root@10.0.0.2:2222\"]`"),
        );
        return Vec::new();
    };
    if list.is_empty() {
        errs.push(ConfigError::new("hosts", "the list is empty").help("name at least one host"));
    }
    let mut out = Vec::new();
    for (i, item) in list.iter().enumerate() {
        let field = format!("hosts[{i}]");
        match item {
            Value::String(s) => match HostSpec::parse(s) {
                Ok(h) => out.push(h),
                Err(e) => errs.push(
                    ConfigError::new(field, e)
                        .help("write `host`, `user@host`, `host:port` or `user@[::1]:port`"),
                ),
            },
            Value::Object(m) => {
                let known = ["host", "user", "port", "address"];
                let mut ok = true;
                for k in m.keys() {
                    if !known.contains(&k.as_str()) {
                        errs.push(
                            ConfigError::new(format!("{field}.{k}"), "not a field of a host")
                                .help("a host has `host`, `user`, `port` and `address`"),
                        );
                        ok = false;
                    }
                }
                let text = |k: &str| m.get(k).and_then(Value::as_str).map(str::to_string);
                let Some(host) = text("host") else {
                    errs.push(ConfigError::new(
                        field,
                        "a host table needs `host` (a string)",
                    ));
                    continue;
                };
                let port = match m.get("port") {
                    None => None,
                    Some(p) => match p
                        .as_u64()
                        .and_then(|p| u16::try_from(p).ok())
                        .filter(|p| *p > 0)
                    {
                        Some(p) => Some(p),
                        None => {
                            errs.push(ConfigError::new(
                                format!("{field}.port"),
                                format!("`{p}` is not a port"),
                            ));
                            ok = false;
                            None
                        }
                    },
                };
                for k in ["user", "address"] {
                    if m.get(k).is_some_and(|v| !v.is_string()) {
                        errs.push(ConfigError::new(
                            format!("{field}.{k}"),
                            "expected a string",
                        ));
                        ok = false;
                    }
                }
                let spec = HostSpec {
                    host,
                    user: text("user"),
                    port,
                    address: text("address"),
                };
                if let Err(e) = spec.check() {
                    errs.push(ConfigError::new(field, e));
                    ok = false;
                }
                if ok {
                    out.push(spec);
                }
            }
            other => errs.push(ConfigError::new(
                field,
                format!("expected a host (a string or a table), found {other}"),
            )),
        }
    }
    out
}

/// A site file: one host per line (`[user@]host[:port]`), `#` comments, blank lines.
pub(crate) fn parse_hosts_file(
    text: &str,
    path: &Path,
    errs: &mut Vec<ConfigError>,
) -> Vec<HostSpec> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), n + 1);
        if line.split_whitespace().count() > 1 {
            errs.push(ConfigError::new(
                "hosts_file",
                format!("{at}: one host per line, found `{line}`"),
            ));
            continue;
        }
        match HostSpec::parse(line) {
            Ok(h) => out.push(h),
            Err(e) => errs.push(ConfigError::new("hosts_file", format!("{at}: {e}"))),
        }
    }
    if out.is_empty() && errs.is_empty() {
        errs.push(ConfigError::new(
            "hosts_file",
            format!("`{}` names no host", path.display()),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_syntax() {
        let h = HostSpec::parse("ubuntu@10.0.0.2:2222").expect("parse");
        assert_eq!(
            (h.user.as_deref(), h.host.as_str(), h.port),
            (Some("ubuntu"), "10.0.0.2", Some(2222))
        );
        let h = HostSpec::parse("gpu1").expect("parse");
        assert_eq!((h.user, h.host.as_str(), h.port), (None, "gpu1", None));
        let h = HostSpec::parse("root@[fd00::2]:22").expect("parse");
        assert_eq!((h.host.as_str(), h.port), ("fd00::2", Some(22)));
        assert_eq!(h.to_string(), "root@[fd00::2]:22");
        let h = HostSpec::parse("fd00::2").expect("parse");
        assert_eq!((h.host.as_str(), h.port), ("fd00::2", None));
        for bad in [
            "",
            "-oProxyCommand=x",
            "host:0",
            "host:99999",
            "a b",
            "h;rm",
            "u@[::1",
        ] {
            assert!(HostSpec::parse(bad).is_err(), "{bad}");
        }
    }
}
