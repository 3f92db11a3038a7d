//! What belongs to a site, not to a deployment: which backend it runs on, that backend's
//! defaults (partition, account, hosts), its templates, and its own plugins. It lives in a
//! site file, so one recipe runs unchanged at two sites.
//!
//! ```toml
//! # site.toml, named by `--site FILE` or `PRL_FLOW_SITE`
//! name = "cluster-a"                 # for messages
//! templates = "templates"            # default templates dir (a recipe's own wins)
//!
//! [backend]
//! type = "wrapped"                   # the backend of recipes that name none
//! plugin = "bin/prl-flow-backend-wrapped"   # its executable (else found on PATH)
//! partition = "gpu"                  # every other key: a default for the recipe's
//! account = "rl"                     # `[backend]` table, which wins key by key
//!
//! [plugins]                          # more plugins, by name
//! podman = "/opt/site/bin/prl-flow-backend-podman"
//! ```
//!
//! Relative paths are relative to the site file's directory. Unknown top-level keys are
//! errors, reported with `file:line:col` like a recipe's. This module only reads the file;
//! the [registry](crate::registry) decides, from it, which backend a run uses.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;
use toml::Spanned;

use crate::diag::{Problem, Problems};

/// The environment variable naming a site file when `--site` is not given.
pub const SITE_ENV: &str = "PRL_FLOW_SITE";

/// The backend name that means "the site's backend" (`[backend] type = "site"`).
pub const SITE_BACKEND: &str = "site";

/// Top-level fields of a site file, for messages and suggestions.
const SITE_FIELDS: &[&str] = &["name", "templates", "backend", "plugins"];

/// A loaded site file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Site {
    /// The file it was read from.
    pub path: PathBuf,
    pub name: Option<String>,
    /// `[backend] type`: the backend of recipes that do not name one.
    pub backend: Option<String>,
    /// `[backend] plugin`: the executable of that backend.
    pub plugin: Option<PathBuf>,
    /// The other keys of `[backend]`: defaults for the recipe's `[backend]` table.
    pub defaults: serde_json::Map<String, Value>,
    /// The default templates dir.
    pub templates: Option<PathBuf>,
    /// `[plugins]`: plugin executables by backend name.
    pub plugins: BTreeMap<String, PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SiteFile {
    name: Option<Spanned<String>>,
    templates: Option<Spanned<String>>,
    backend: Option<BTreeMap<Spanned<String>, Spanned<toml::Value>>>,
    #[serde(default)]
    plugins: BTreeMap<Spanned<String>, Spanned<String>>,
}

/// The site file named by `flag` (`--site`) or else by `PRL_FLOW_SITE`; `None` when
/// neither names one.
pub fn load(flag: Option<&Path>) -> Result<Option<Site>, Problems> {
    let from_env = std::env::var_os(SITE_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    match flag.map(Path::to_path_buf).or(from_env) {
        Some(p) => load_site(&p).map(Some),
        None => Ok(None),
    }
}

/// Reads and checks a site file; every problem is reported, with its place.
pub fn load_site(path: &Path) -> Result<Site, Problems> {
    let shown = path.display().to_string();
    let source = match std::fs::read_to_string(path) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            let mut p = Problems::new(shown, Arc::new(String::new()));
            p.push(Problem::new(format!("cannot read the site file `{}`: {e}", path.display())).help(
                format!("name an existing file with `--site FILE` or `{SITE_ENV}`, or unset `{SITE_ENV}`"),
            ));
            return Err(p);
        }
    };
    parse_site(path, source)
}

/// Parses site file text; `path` names it in messages and anchors its relative paths.
pub fn parse_site(path: &Path, source: Arc<String>) -> Result<Site, Problems> {
    let mut problems = Problems::new(path.display().to_string(), source.clone());
    let file: SiteFile = match toml::from_str(&source) {
        Ok(f) => f,
        Err(e) => {
            problems.push(crate::workflow::toml_problem(&e, SITE_FIELDS));
            return Err(problems);
        }
    };
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let resolve = |s: &str| -> PathBuf {
        let p = Path::new(s);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    };
    let mut site = Site {
        path: path.to_path_buf(),
        name: file.name.map(Spanned::into_inner),
        ..Site::default()
    };

    if let Some(t) = &file.templates {
        let dir = resolve(t.get_ref());
        if dir.is_dir() {
            site.templates = Some(dir);
        } else {
            problems.push(
                Problem::new(format!(
                    "the templates dir `{}` does not exist",
                    dir.display()
                ))
                .at(Some(t.span()))
                .label("not a directory")
                .help("name a directory of template overrides, relative to the site file"),
            );
        }
    }

    for (key, value) in file.backend.unwrap_or_default() {
        let span = value.span();
        match (key.get_ref().as_str(), value.into_inner()) {
            ("type", toml::Value::String(s)) if s.trim().is_empty() => problems.push(
                Problem::new("`backend.type` is empty")
                    .at(Some(span))
                    .help("name the site's backend: `local`, or a plugin's name"),
            ),
            ("type", toml::Value::String(s)) if s == SITE_BACKEND => problems.push(
                Problem::new("a site file cannot say `type = \"site\"`")
                    .at(Some(span))
                    .label("the site's own backend")
                    .help("name the backend itself: `local`, or a plugin's name"),
            ),
            ("type", toml::Value::String(s)) => site.backend = Some(s),
            ("plugin", toml::Value::String(s)) => {
                let exe = resolve(&s);
                if prl_flow_plugin::is_executable(&exe) {
                    site.plugin = Some(exe);
                } else {
                    problems.push(not_executable(&exe, span, "`backend.plugin`"));
                }
            }
            (k @ ("type" | "plugin"), other) => problems.push(
                Problem::new(format!(
                    "`backend.{k}` must be a string, not {}",
                    other.type_str()
                ))
                .at(Some(span))
                .label("not a string"),
            ),
            (k, v) => match serde_json::to_value(&v) {
                Ok(j) => {
                    site.defaults.insert(k.to_string(), j);
                }
                Err(e) => problems.push(
                    Problem::new(format!("`backend.{k}` cannot be passed to a backend: {e}"))
                        .at(Some(span)),
                ),
            },
        }
    }
    if site.plugin.is_some() && site.backend.is_none() {
        problems.push(
            Problem::new("`backend.plugin` names an executable, but `backend.type` names no backend for it")
                .help("add `type = \"NAME\"` to `[backend]`, or list it under `[plugins]` as `NAME = \"PATH\"`"),
        );
    }

    for (name, exe) in file.plugins {
        let valid = !name.get_ref().is_empty()
            && name
                .get_ref()
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
        if !valid {
            problems.push(
                Problem::new(format!("`{}` is not a backend name", name.get_ref()))
                    .at(Some(name.span()))
                    .help("use letters, digits, `-`, `_` and `.`"),
            );
            continue;
        }
        if crate::registry::builtins::BUILTINS.contains(&name.get_ref().as_str()) {
            problems.push(
                Problem::new(format!("`{}` is a built-in backend", name.get_ref()))
                    .at(Some(name.span()))
                    .label("cannot be replaced by a plugin")
                    .help("give the plugin a name of its own"),
            );
            continue;
        }
        let path = resolve(exe.get_ref());
        if prl_flow_plugin::is_executable(&path) {
            site.plugins.insert(name.into_inner(), path);
        } else {
            problems.push(not_executable(&path, exe.span(), "a plugin"));
        }
    }

    if problems.is_empty() {
        Ok(site)
    } else {
        Err(problems)
    }
}

fn not_executable(path: &Path, span: std::ops::Range<usize>, what: &str) -> Problem {
    let (label, help) = if path.exists() {
        (
            "not executable",
            format!("make it executable: `chmod +x {}`", path.display()),
        )
    } else {
        (
            "no such file",
            "name the plugin's executable, relative to the site file".to_string(),
        )
    };
    Problem::new(format!(
        "{what} names `{}`, which is {label}",
        path.display()
    ))
    .at(Some(span))
    .label(label)
    .help(help)
}

/// The site's templates dir, for a recipe that names none of its own (a recipe's
/// `templates`, and `--templates`, win over the site's).
pub fn default_templates(site: &Site, source: &str) -> Option<PathBuf> {
    let own = toml::from_str::<toml::Table>(source)
        .ok()
        .is_some_and(|t| t.contains_key("templates"));
    if own {
        None
    } else {
        site.templates.clone()
    }
}

impl Site {
    /// The site's defaults for `backend`'s table: they apply when the site's backend is this
    /// one, or the site names none (defaults for one backend mean nothing to another).
    pub fn defaults_for(&self, backend: &str) -> Option<&serde_json::Map<String, Value>> {
        let same = self.backend.as_deref().map_or(true, |b| b == backend);
        (same && !self.defaults.is_empty()).then_some(&self.defaults)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Site, Problems> {
        parse_site(
            Path::new("/nonexistent/site.toml"),
            Arc::new(text.to_string()),
        )
    }

    #[test]
    fn backend_keys_other_than_type_and_plugin_are_defaults() {
        let site = parse("name = \"a\"\n[backend]\ntype = \"local\"\npartition = \"gpu\"\nhosts = [\"h1\", \"h2\"]\n")
            .expect("site");
        assert_eq!(site.backend.as_deref(), Some("local"));
        assert_eq!(site.defaults.get("partition"), Some(&Value::from("gpu")));
        assert_eq!(
            site.defaults.get("hosts"),
            Some(&serde_json::json!(["h1", "h2"]))
        );
    }

    #[test]
    fn unknown_fields_and_bad_values_are_reported_with_places() {
        let Err(p) = parse("nmae = \"a\"\n") else {
            panic!("an unknown field was accepted")
        };
        let out = p.render(false);
        assert!(out.contains("site.toml:1:1"), "{out}");
        assert!(out.contains("unknown field `nmae`"), "{out}");

        let Err(p) = parse("[backend]\ntype = 3\nplugin = \"nope\"\n[plugins]\nlocal = \"x\"\n")
        else {
            panic!("bad values were accepted")
        };
        let out = p.render(false);
        assert_eq!(p.len(), 3, "{out}");
        assert!(
            out.contains("site.toml:2:8: `backend.type` must be a string"),
            "{out}"
        );
        assert!(
            out.contains("site.toml:3:10: `backend.plugin` names `/nonexistent/nope`"),
            "{out}"
        );
        assert!(out.contains("`local` is a built-in backend"), "{out}");
    }

    #[test]
    fn the_site_templates_serve_a_recipe_without_its_own() {
        let site = Site {
            templates: Some("/site/t".into()),
            ..Site::default()
        };
        assert_eq!(
            default_templates(&site, "name = \"x\"\n"),
            Some("/site/t".into())
        );
        assert_eq!(default_templates(&site, "templates = \"mine\"\n"), None);
    }
}
