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
//! errors, reported with `file:line:col` like a recipe's.
//!
//! The second half of the module finds a backend by name ([`find`]): the built-in ones
//! first, then a plugin executable named by the recipe (`[backend] plugin`), by the site
//! file, or found on `PATH` as `prl-flow-backend-<name>`. [`discover`] lists them all for
//! `prl-flow plugins`, and [`test_backend`] runs the conformance scenario for
//! `prl-flow plugin test NAME`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prl_flow_backend::Backend;
use prl_flow_plugin::{PluginBackend, Timeouts};
use serde::Deserialize;
use serde_json::Value;
use toml::Spanned;

use crate::diag::{Problem, Problems};
use crate::plan::Plan;

/// The environment variable naming a site file when `--site` is not given.
pub const SITE_ENV: &str = "PRL_FLOW_SITE";

/// The backend name that means "the site's backend" (`[backend] type = "site"`).
pub const SITE_BACKEND: &str = "site";

/// The backends built into this prl-flow.
pub const BUILTINS: &[&str] = &["local", "ssh", "slurm"];

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
        if BUILTINS.contains(&name.get_ref().as_str()) {
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

/// Does a recipe's text name a backend of its own (`[backend] type`, other than `"site"`)?
/// Tells the CLI whether the site's backend applies, before the recipe is loaded (a recipe
/// is derived for its backend: the site's must be known by then).
pub fn declares_backend(source: &str) -> bool {
    toml::from_str::<toml::Table>(source)
        .ok()
        .and_then(|t| {
            t.get("backend")?
                .get("type")?
                .as_str()
                .map(|b| b != SITE_BACKEND)
        })
        .unwrap_or(false)
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

/// Applies a site to a plan. The site's backend applies when the recipe named none
/// (`recipe_backend_explicit` false: no `[backend] type`, no `--backend`) or named
/// `"site"`; the site's defaults then fill the keys of `plan.backend_config` that the
/// recipe did not set, when the plan runs on the site's backend (defaults for one backend
/// mean nothing to another). The recipe's values always win, key by key.
pub fn apply(site: &Site, plan: &mut Plan, recipe_backend_explicit: bool) {
    if let Some(b) = &site.backend {
        if !recipe_backend_explicit || plan.backend == SITE_BACKEND {
            plan.backend = b.clone();
        }
    }
    let same_backend = site.backend.as_deref().map_or(true, |b| b == plan.backend);
    if !same_backend || site.defaults.is_empty() {
        return;
    }
    let config = match &mut plan.backend_config {
        Value::Object(m) => m,
        v @ Value::Null => {
            *v = Value::Object(serde_json::Map::new());
            match v {
                Value::Object(m) => m,
                _ => return,
            }
        }
        _ => return,
    };
    for (k, v) in &site.defaults {
        config.entry(k.clone()).or_insert_with(|| v.clone());
    }
}

/// A built-in backend by name, made from the plan's `[backend]` table (with the site's
/// defaults). Each name here is listed in [`BUILTINS`] too.
fn builtin(name: &str, config: &Value) -> Result<Arc<dyn Backend>, String> {
    // Outside a run (`plugin test`), the remote backends keep their files in a state dir
    // of their own.
    let dir = Path::new(".prl-flow").join("plugin-test");
    match name {
        "local" => Ok(Arc::new(prl_flow_local::LocalBackend::new())),
        "ssh" => Ok(Arc::new(prl_flow_ssh::SshBackend::from_config(
            config, &dir,
        )?)),
        "slurm" => Ok(Arc::new(prl_flow_slurm::SlurmBackend::from_config(
            config, &dir,
        )?)),
        other => Err(format!("error: no built-in backend `{other}`")),
    }
}

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
fn resolve_name<'a>(name: &'a str, site: Option<&'a Site>) -> Result<&'a str, String> {
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
    if BUILTINS.contains(&name) {
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

/// The config a plugin gets with `hello`: the recipe's `[backend]` table over the site's
/// defaults (when the site's backend is this one).
fn plugin_config(name: &str, site: Option<&Site>, config: &Value) -> Value {
    let mut merged = match config {
        Value::Object(m) => m.clone(),
        _ => serde_json::Map::new(),
    };
    if let Some(s) = site {
        if s.backend.as_deref().map_or(true, |b| b == name) {
            for (k, v) in &s.defaults {
                merged.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
    }
    if merged.is_empty() {
        Value::Null
    } else {
        Value::Object(merged)
    }
}

/// The backend named `name` (a built-in one or a plugin), ready to use: a plugin's process
/// starts on the first call. `config` is the plan's `[backend]` table (`Value::Null` when
/// there is no plan, as for `status` or `down`).
pub fn find(name: &str, site: Option<&Site>, config: &Value) -> Result<Arc<dyn Backend>, String> {
    let info = locate(name, site, config)?;
    match &info.path {
        None => builtin(&info.name, &plugin_config(&info.name, site, config)),
        Some(p) => Ok(Arc::new(plugin(&info, p, site, config))),
    }
}

fn plugin(info: &PluginInfo, path: &Path, site: Option<&Site>, config: &Value) -> PluginBackend {
    PluginBackend::new(&info.name, path).with_config(plugin_config(&info.name, site, config))
}

/// Every backend this prl-flow can use: built in, named by the site file, on `PATH` (a
/// name found twice is listed where it is found first, which is where [`find`] takes it).
pub fn discover(site: Option<&Site>) -> Vec<PluginInfo> {
    let mut all: Vec<PluginInfo> = BUILTINS
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

/// The text of `prl-flow plugins`: every backend, and for each plugin what it says of
/// itself when started (or why it cannot be).
pub async fn plugins_text(site: Option<&Site>) -> String {
    let infos = discover(site);
    let checks = infos.iter().map(|info| async move {
        let Some(path) = &info.path else {
            return ("ok", None);
        };
        let p = plugin(info, path, site, &Value::Null)
            .with_timeouts(Timeouts::all(Duration::from_secs(5)));
        let said = match p.handshake().await {
            Ok(h) => {
                let caps = if h.capabilities.is_empty() {
                    "none".to_string()
                } else {
                    h.capabilities.join(", ")
                };
                let version = h
                    .extra
                    .get("version")
                    .and_then(Value::as_str)
                    .map(|v| format!(" {v}"))
                    .unwrap_or_default();
                let detail = format!(
                    "`{}`{version}, protocol {}, capabilities: {caps}",
                    h.name, h.protocol
                );
                ("ok", Some(detail))
            }
            Err(e) => (
                "error",
                Some(e.message.lines().next().unwrap_or_default().to_string()),
            ),
        };
        p.shutdown().await;
        said
    });
    let said = futures::future::join_all(checks).await;
    let width = infos.iter().map(|i| i.name.len()).max().unwrap_or(4).max(4);
    let mut s = format!(
        "{:<width$}  {:<8}  {:<6}  WHERE\n",
        "NAME", "KIND", "STATUS"
    );
    for (info, (status, detail)) in infos.iter().zip(said) {
        let kind = if info.path.is_some() {
            "plugin"
        } else {
            "built-in"
        };
        s.push_str(&format!(
            "{:<width$}  {kind:<8}  {status:<6}  {}\n",
            info.name,
            info.describe()
        ));
        if let Some(d) = detail {
            s.push_str(&format!("{:<width$}  {:<8}  {:<6}  {d}\n", "", "", ""));
        }
    }
    s
}

/// `prl-flow plugin test NAME`: the conformance scenario against a backend, each step
/// printed as it ends. `Ok(true)` if every step passed; `Err` if there is no such backend.
pub async fn test_backend(
    name: &str,
    site: Option<&Site>,
    print: &mut (dyn FnMut(&str) + Send),
) -> Result<bool, String> {
    let info = locate(name, site, &Value::Null)?;
    print(&format!(
        "conformance of backend `{}`: {}",
        info.name,
        info.describe()
    ));
    if let Some(path) = &info.path {
        let p = plugin(&info, path, site, &Value::Null);
        match p.handshake().await {
            Ok(h) => print(&format!(
                "{:<8}{:<26}protocol {}, capabilities: {}",
                "ok",
                "handshake",
                h.protocol,
                h.capabilities.join(", ")
            )),
            Err(e) => {
                let mut lines = e.message.lines();
                print(&format!(
                    "{:<8}{:<26}{}",
                    "FAILED",
                    "handshake",
                    lines.next().unwrap_or_default()
                ));
                for l in lines {
                    print(&format!("          {l}"));
                }
                return Ok(false);
            }
        }
        p.shutdown().await;
    }
    let make =
        |/* a new backend object, and for a plugin a new process */| find(name, site, &Value::Null);
    let summary =
        prl_flow_plugin::conformance(&make, &prl_flow_plugin::Scenario::default(), &mut |step| {
            print(&step.line())
        })
        .await;
    print(&summary.line());
    Ok(summary.ok())
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

    fn plan(backend: &str, config: Value) -> Plan {
        Plan {
            name: "p".into(),
            backend: backend.into(),
            backend_config: config,
            ..Plan::default()
        }
    }

    #[test]
    fn the_recipe_wins_and_defaults_fill_in() {
        let site = Site {
            backend: Some("wrapped".into()),
            defaults: [("partition", "gpu"), ("account", "rl")]
                .map(|(k, v)| (k.to_string(), Value::from(v)))
                .into_iter()
                .collect(),
            ..Site::default()
        };
        // No backend in the recipe: the site's, with its defaults under the recipe's keys.
        let mut p = plan("local", serde_json::json!({"account": "mine"}));
        apply(&site, &mut p, false);
        assert_eq!(p.backend, "wrapped");
        assert_eq!(
            p.backend_config,
            serde_json::json!({"account": "mine", "partition": "gpu"})
        );
        // A recipe that names its backend keeps it, and another backend's defaults stay out.
        let mut p = plan("local", Value::Null);
        apply(&site, &mut p, true);
        assert_eq!(
            (p.backend.as_str(), &p.backend_config),
            ("local", &Value::Null)
        );
        // `type = "site"` asks for the site's backend explicitly.
        let mut p = plan("site", Value::Null);
        apply(&site, &mut p, true);
        assert_eq!(p.backend, "wrapped");
        assert_eq!(p.backend_config["partition"], "gpu");
    }

    #[test]
    fn an_unknown_backend_lists_what_there_is() {
        let e = match find("nonesuch-backend", None, &Value::Null) {
            Ok(_) => panic!("found a backend that does not exist"),
            Err(e) => e,
        };
        assert!(e.contains("no backend `nonesuch-backend`"), "{e}");
        assert!(e.contains("available: local"), "{e}");
        let e = match find("site", None, &Value::Null) {
            Ok(_) => panic!("`site` without a site file"),
            Err(e) => e,
        };
        assert!(e.contains("no site file is given"), "{e}");
        assert!(find("local", None, &Value::Null).is_ok());
    }

    #[test]
    fn a_recipe_says_whether_it_names_its_backend() {
        assert!(declares_backend("[backend]\ntype = \"ssh\"\n"));
        assert!(!declares_backend("[backend]\npartition = \"gpu\"\n"));
        assert!(!declares_backend("[[task]]\nid = \"a\"\nrun = \"true\"\n"));
        assert!(!declares_backend("[backend]\ntype = \"site\"\n"));
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

    #[tokio::test]
    async fn the_example_site_runs_its_plugin_through_conformance() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/plugins/site.toml");
        let site = match load_site(&path) {
            Ok(s) => s,
            Err(p) => panic!("{}", p.render(false)),
        };
        assert_eq!(site.backend.as_deref(), Some("wrapped"));
        assert_eq!(
            site.defaults["wrapper"],
            serde_json::json!(["env", "SITE_EXAMPLE=1"])
        );
        let info = locate("site", Some(&site), &Value::Null).expect("the site's backend");
        assert_eq!(info.source, Source::Site(path.clone()));
        let mut lines = Vec::new();
        let passed = tokio::time::timeout(
            Duration::from_secs(90),
            test_backend("wrapped", Some(&site), &mut |l| lines.push(l.to_string())),
        )
        .await
        .expect("conformance hung");
        let text = lines.join("\n");
        assert_eq!(passed, Ok(true), "{text}");
        assert!(text.contains("ok      handshake"), "{text}");
        assert!(text.ends_with("passed: all 10 steps"), "{text}");
        println!("{text}");
    }
}
