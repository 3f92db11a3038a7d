//! Where backends come from: built in, or a plugin named by the recipe's `[backend] plugin`,
//! by the site file, or found on `PATH` (`prl-flow-backend-<name>`).

use serde_json::Value;
use std::path::PathBuf;

use crate::site::{Site, SITE_BACKEND, SITE_ENV};

/// Where a backend comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    BuiltIn,
    /// Named by the recipe's `[backend] plugin`.
    Recipe,
    /// Named by the site file.
    Site(PathBuf),
    /// Found on `PATH`.
    Path,
}

/// A backend prl-flow can use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginInfo {
    pub name: String,
    pub source: Source,
    /// The executable (`None` for a built-in backend).
    pub path: Option<PathBuf>,
}

impl PluginInfo {
    pub fn describe(&self) -> String {
        match (&self.source, &self.path) {
            (Source::BuiltIn, _) => "built in".into(),
            (Source::Recipe, Some(p)) => format!("{} (named by the recipe)", p.display()),
            (Source::Site(f), Some(p)) => format!("{} (named by {})", p.display(), f.display()),
            (_, Some(p)) => p.display().to_string(),
            (_, None) => String::new(),
        }
    }
}

/// The name a backend is really known by: `site` means the site's backend.
pub(super) fn resolve_name<'a>(name: &'a str, site: Option<&'a Site>) -> Result<&'a str, String> {
    if name != SITE_BACKEND {
        return Ok(name);
    }
    match site.and_then(|s| s.backend.as_deref()) {
        Some(b) => Ok(b),
        None => Err(match site {
            None => format!(
                "error: the backend is `{SITE_BACKEND}`, and no site file is given\n  help: name one with `--site FILE` or `{SITE_ENV}`"
            ),
            Some(s) => format!(
                "error: the backend is `{SITE_BACKEND}`, and the site file `{}` names no backend\n  help: add `[backend] type = \"NAME\"` to it",
                s.path.display()
            ),
        }),
    }
}

/// Where the backend `name` would come from, without starting anything.
pub fn locate(name: &str, site: Option<&Site>, config: &Value) -> Result<PluginInfo, String> {
    let name = resolve_name(name, site)?;
    if super::builtins::BUILTINS.contains(&name) {
        return Ok(PluginInfo {
            name: name.into(),
            source: Source::BuiltIn,
            path: None,
        });
    }
    if let Some(p) = config.get("plugin").and_then(Value::as_str) {
        let path = PathBuf::from(p);
        return if prl_flow_plugin::is_executable(&path) {
            Ok(PluginInfo {
                name: name.into(),
                source: Source::Recipe,
                path: Some(path),
            })
        } else {
            Err(format!(
                "error: the recipe names `{p}` as the plugin of backend `{name}`, and it is not an executable file\n  help: a relative path is taken from the current directory; check it, or `chmod +x` it"
            ))
        };
    }
    if let Some(s) = site {
        let named = match (&s.backend, &s.plugin) {
            (Some(b), Some(p)) if b == name => Some(p.clone()),
            _ => s.plugins.get(name).cloned(),
        };
        if let Some(p) = named {
            return Ok(PluginInfo {
                name: name.into(),
                source: Source::Site(s.path.clone()),
                path: Some(p),
            });
        }
    }
    if let Some(p) = prl_flow_plugin::on_path(name) {
        return Ok(PluginInfo {
            name: name.into(),
            source: Source::Path,
            path: Some(p),
        });
    }
    let available: Vec<String> = discover(site).iter().map(|p| p.name.clone()).collect();
    let mut msg = format!(
        "error: no backend `{name}`: it is not built in{}, and there is no `{}{name}` on PATH",
        if site.is_some() {
            ", the site file does not name it"
        } else {
            ""
        },
        prl_flow_plugin::EXE_PREFIX
    );
    msg.push_str(&format!("\n  available: {}", available.join(", ")));
    if let Some(s) = crate::diag::did_you_mean(name, available.iter().map(String::as_str)) {
        msg.push_str(&format!("\n  help: did you mean `{s}`?"));
    } else {
        msg.push_str(&format!(
            "\n  help: put a plugin named `{}{name}` on PATH, or name it in a site file (`[plugins] {name} = \"PATH\"`); see docs/plugins.md",
            prl_flow_plugin::EXE_PREFIX
        ));
    }
    Err(msg)
}

/// Every backend this prl-flow can use: built in, named by the site file, on `PATH` (a
/// name found twice is listed where it is found first, which is where the registry takes it).
pub fn discover(site: Option<&Site>) -> Vec<PluginInfo> {
    let mut all: Vec<PluginInfo> = super::builtins::BUILTINS
        .iter()
        .map(|b| PluginInfo {
            name: b.to_string(),
            source: Source::BuiltIn,
            path: None,
        })
        .collect();
    let mut push = |info: PluginInfo| {
        if !all.iter().any(|i| i.name == info.name) {
            all.push(info);
        }
    };
    if let Some(s) = site {
        if let (Some(b), Some(p)) = (&s.backend, &s.plugin) {
            push(PluginInfo {
                name: b.clone(),
                source: Source::Site(s.path.clone()),
                path: Some(p.clone()),
            });
        }
        for (n, p) in &s.plugins {
            push(PluginInfo {
                name: n.clone(),
                source: Source::Site(s.path.clone()),
                path: Some(p.clone()),
            });
        }
    }
    for (n, p) in prl_flow_plugin::scan_path() {
        push(PluginInfo {
            name: n,
            source: Source::Path,
            path: Some(p),
        });
    }
    all
}
