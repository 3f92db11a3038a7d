//! The backend registry: the one place that knows which backends exist (the built-in ones
//! and site plugins, [`plugins`]), decides which one a run uses, and makes it.
//!
//! - [`Registry::decide`]: the backend of a file, decided once, before its recipe is
//!   derived: `--backend`, else the recipe's own `[backend] type`, else the site's backend
//!   (`type = "site"` asks for the site's by name).
//! - [`Registry::settle`]: after the plan is made, its backend name is that decision and the
//!   site's defaults fill the keys of its `[backend]` table that the recipe left out (the
//!   recipe wins key by key). This is the only place defaults are merged into a plan.
//! - [`Registry::check`]: the backend checks its table against the plan before anything
//!   starts ([`Backend::check`]), every problem at once, placed in the recipe's text.
//! - [`Registry::for_plan`] makes the backend of a run; [`Registry::for_record`] the backend
//!   that made a journal record's handle, so `status`, `logs` and `down` need neither the
//!   recipe nor the site file.
//!
//! Nothing else in prl-flow names a concrete backend type.

pub mod builtins;
pub mod plugins;
pub mod report;

use std::path::Path;
use std::sync::Arc;

use prl_flow_backend::{Backend, ConfigError, Held, ProcHandle};
use prl_flow_engine::Record;
use serde_json::Value;

use crate::diag::{Problem, Problems};
use crate::plan::Plan;
use crate::site::Site;

pub use builtins::BUILTINS;
pub use plugins::{PluginInfo, Source};

/// The backends an invocation can use.
#[derive(Debug, Default)]
pub struct Registry {
    site: Option<Site>,
}

/// Why a backend could not be made.
#[derive(Debug)]
pub enum MakeError {
    /// No such backend, or its plugin cannot be used: a message with help.
    Unknown(String),
    /// Its `[backend]` table has problems, each naming its field.
    Config(Vec<ConfigError>),
}

impl MakeError {
    fn message(self, plan: &str) -> String {
        match self {
            MakeError::Unknown(m) => m,
            MakeError::Config(errors) => format!(
                "error: the `[backend]` of `{plan}` is not usable: {}",
                ConfigError::join(&errors)
            ),
        }
    }
}

impl Registry {
    pub fn new(site: Option<Site>) -> Self {
        Self { site }
    }

    pub fn site(&self) -> Option<&Site> {
        self.site.as_ref()
    }

    /// The backend a file runs on, decided before its recipe is derived (a recipe is
    /// derived for its backend): `flag` (`--backend`), else the recipe's `[backend] type`,
    /// else the site's backend, else `local`. `site`, as a flag or a type, names the site's.
    pub fn decide(&self, flag: Option<&str>, source: &str) -> Result<String, String> {
        self.decide_own(flag, recipe_backend(source))
    }

    /// [`Registry::decide`] with the file's own `[backend] type` (`own`) already read.
    pub fn decide_own(&self, flag: Option<&str>, own: Option<String>) -> Result<String, String> {
        let named = match flag.map(str::to_string).or(own) {
            Some(n) => n,
            None => match self.site().and_then(|s| s.backend.clone()) {
                Some(b) => return Ok(b),
                None => builtins::LOCAL.to_string(),
            },
        };
        plugins::resolve_name(&named, self.site()).map(str::to_string)
    }

    /// Gives a plan the backend [`Registry::decide`] chose and fills its `[backend]` table
    /// with the site's defaults for that backend, under the recipe's own keys.
    pub fn settle(&self, plan: &mut Plan, decided: String) {
        plan.backend = decided;
        let Some(defaults) = self.site().and_then(|s| s.defaults_for(&plan.backend)) else {
            return;
        };
        if plan.backend_config.is_null() {
            plan.backend_config = Value::Object(serde_json::Map::new());
        }
        if let Value::Object(config) = &mut plan.backend_config {
            for (k, v) in defaults {
                config.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
    }

    /// Checks the plan's `[backend]` table with its backend, before anything starts: every
    /// problem at once, each at its field's value when the file writes it, else at the
    /// table's header (e.g. a recipe that needs more nodes than there are ssh hosts). A
    /// plugin's table is its own business: it is checked when it starts.
    pub async fn check(
        &self,
        plan: &Plan,
        path: &Path,
        source: &Arc<String>,
    ) -> Result<(), Problems> {
        if !BUILTINS.contains(&plan.backend.as_str()) {
            return match self.backend_problem(&plan.backend, &plan.backend_config, source) {
                None => Ok(()),
                Some(q) => {
                    let mut p = Problems::new(path.display().to_string(), source.clone());
                    p.push(q);
                    Err(p)
                }
            };
        }
        let base = path.parent().filter(|p| !p.as_os_str().is_empty());
        let state_dir = crate::plan::default_state_dir(&plan.name);
        let errors = match builtins::make(&plan.backend, &plan.backend_config, base, &state_dir) {
            Ok(backend) => match backend.check(&plan.nodes).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            },
            Err(e) => e,
        };
        let table = source.find("[backend]").map(|i| i..i + "[backend]".len());
        let doc = toml_edit::ImDocument::parse(source.as_str()).ok();
        let mut p = Problems::new(path.display().to_string(), source.clone());
        for e in errors {
            let (at, label) = match doc.as_ref().and_then(|d| backend_field_span(d, &e.field)) {
                Some(at) => (Some(at), "here".to_string()),
                None => (
                    table.clone(),
                    format!("the {} backend's table", plan.backend),
                ),
            };
            let mut q = Problem::new(format!("`backend.{}`: {}", e.field, e.message))
                .at(at)
                .label(label);
            if let Some(h) = e.help {
                q = q.help(h);
            }
            p.push(q);
        }
        Err(p)
    }

    /// The problem with the backend `name`, when this prl-flow cannot use it: neither built
    /// in nor a plugin it can find (with the backends there are and the closest of them),
    /// or a plugin file the recipe names that is not executable. Placed at the file's
    /// `[backend] type` when that names it. `config` is the `[backend]` table (its `plugin`
    /// key names a plugin's file).
    pub fn backend_problem(&self, name: &str, config: &Value, source: &str) -> Option<Problem> {
        let err = plugins::locate(name, self.site(), config).err()?;
        let at = backend_type_span(source).filter(|s| source[s.clone()].contains(name));
        if config.get("plugin").is_some() {
            let msg = err.strip_prefix("error: ").unwrap_or(&err);
            let (what, help) = msg.split_once("\n  help: ").unwrap_or((msg, ""));
            return Some(Problem::new(what).at(at).label("this backend").help(help));
        }
        let known: Vec<String> = plugins::discover(self.site())
            .into_iter()
            .map(|p| p.name)
            .collect();
        let help = match crate::diag::did_you_mean(name, known.iter().map(String::as_str)) {
            Some(near) => format!("did you mean `{near}`? The backends here: {}", known.join(", ")),
            None => format!(
                "the backends here: {}; a site plugin is `{}{name}` on PATH or named in a site file (docs/plugins.md)",
                known.join(", "),
                prl_flow_plugin::EXE_PREFIX
            ),
        };
        Some(
            Problem::new(format!(
                "no backend `{name}`: it is not built in ({}), and no site plugin of that name is found",
                BUILTINS.join(", ")
            ))
            .at(at)
            .label("unknown backend")
            .help(help),
        )
    }

    /// [`Registry::backend_problem`] for a file that did not plan: its `[backend]` table
    /// read from the text.
    pub fn backend_problem_of(&self, name: &str, source: &str) -> Option<Problem> {
        let config = toml::from_str::<toml::Table>(source)
            .ok()
            .and_then(|t| t.get("backend").cloned())
            .and_then(|b| serde_json::to_value(b).ok())
            .unwrap_or(Value::Null);
        self.backend_problem(name, &config, source)
    }

    /// A backend by name: built in, or a plugin (recipe, site file, PATH), made from
    /// `config`, its whole `[backend]` table.
    pub fn make(
        &self,
        name: &str,
        config: &Value,
        state_dir: &Path,
    ) -> Result<Arc<dyn Backend>, MakeError> {
        let info = plugins::locate(name, self.site(), config).map_err(MakeError::Unknown)?;
        match &info.path {
            None => builtins::make(&info.name, config, None, state_dir).map_err(MakeError::Config),
            Some(p) => Ok(Arc::new(self.plugin(&info, p, config))),
        }
    }

    /// The backend a run of `plan` uses, made from the plan's `[backend]` table (the site's
    /// defaults are in it already) and knowing the state dir.
    pub fn for_plan(&self, plan: &Plan, dir: &Path) -> Result<Arc<dyn Backend>, String> {
        self.make(&plan.backend, &plan.backend_config, dir)
            .map_err(|e| e.message(&plan.name))
    }

    /// A backend by name with no plan at hand (`plugin test`): its table is the site's
    /// defaults for it. Outside a run, backends that keep files keep them in a state dir of
    /// their own.
    pub fn by_name(&self, name: &str) -> Result<Arc<dyn Backend>, String> {
        let config = self
            .site()
            .and_then(|s| s.defaults_for(name))
            .map_or(Value::Null, |d| Value::Object(d.clone()));
        let dir = Path::new(".prl-flow").join("plugin-test");
        self.make(name, &config, &dir).map_err(|e| e.message(name))
    }

    /// A backend that looks after what an earlier run recorded (`status`, `logs`, `down`):
    /// every handle says how to reach its process, so no table is needed.
    pub fn for_handles(
        &self,
        name: &str,
        handle: Option<&ProcHandle>,
    ) -> Result<Arc<dyn Backend>, String> {
        match builtins::for_handles(name, handle) {
            Some(b) => Ok(b),
            None => self.by_name(name),
        }
    }

    pub(crate) fn plugin(
        &self,
        info: &PluginInfo,
        path: &Path,
        config: &Value,
    ) -> prl_flow_plugin::PluginBackend {
        prl_flow_plugin::PluginBackend::new(&info.name, path).with_config(config.clone())
    }

    /// The handle a record keeps: a process's, or (for an allocation record) the
    /// allocation's.
    fn handle_of(r: &Record) -> Option<ProcHandle> {
        let held = Held::from_json(r.handle.as_ref()?).ok()?;
        Some(held.handle().clone())
    }

    /// The backend that started what a record's handle names: a plugin by the path the
    /// handle carries, else by name.
    pub fn for_record(&self, r: &Record) -> Result<Arc<dyn Backend>, String> {
        let handle = Self::handle_of(r);
        let name = handle
            .as_ref()
            .map_or_else(|| builtins::LOCAL.into(), |h| h.backend.clone());
        let plugin = handle.as_ref().and_then(prl_flow_plugin::plugin_path);
        match plugin {
            Some(p) if prl_flow_plugin::is_executable(&p) => {
                Ok(Arc::new(prl_flow_plugin::PluginBackend::new(name, p)))
            }
            _ => self.for_handles(&name, handle.as_ref()),
        }
    }

    /// The backend of a journal: that of its allocation when it has one (its handle tells
    /// a backend the most: which host each node is), else of its first record with a
    /// handle (local when none).
    pub fn for_records<'a>(
        &self,
        records: impl Iterator<Item = &'a Record>,
    ) -> Result<Arc<dyn Backend>, String> {
        let with_handle: Vec<&Record> = records.filter(|r| r.handle.is_some()).collect();
        let allocation = with_handle.iter().find(|r| {
            r.handle
                .as_ref()
                .is_some_and(|h| matches!(Held::from_json(h), Ok(Held::Allocation(_))))
        });
        match allocation.or(with_handle.first()) {
            Some(r) => self.for_record(r),
            None => self.for_handles(builtins::LOCAL, None),
        }
    }
}

/// `--backend sim` over a recipe whose `[backend]` table was written for another backend:
/// those fields are not the model's, whose knobs keep their defaults (docs/sim.md).
pub fn simulated_over(plan: &mut Plan, decided: &str, source: &str) {
    simulated_over_own(plan, decided, recipe_backend(source));
}

/// [`simulated_over`] with the file's own `[backend] type` (`own`) already read.
pub fn simulated_over_own(plan: &mut Plan, decided: &str, own: Option<String>) {
    if builtins::simulated(decided) && own.is_some_and(|o| !builtins::simulated(&o)) {
        plan.backend_config = Value::Null;
    }
}

/// Where a file's `[backend] type` value is written.
fn backend_type_span(source: &str) -> Option<std::ops::Range<usize>> {
    let doc = toml_edit::ImDocument::parse(source).ok()?;
    doc.as_table()
        .get("backend")?
        .as_table_like()?
        .get("type")?
        .span()
}

/// Where field `field` of the `[backend]` table of `doc` is written, as a backend names it in a
/// [`ConfigError`] (`poll`, `hosts[2]`, `options.User`): its value, or the value of the
/// nearest enclosing field that is written; `None` for the table as a whole or a field
/// that is not in the file (a site's default).
fn backend_field_span(
    doc: &toml_edit::ImDocument<&str>,
    field: &str,
) -> Option<std::ops::Range<usize>> {
    if field.is_empty() {
        return None;
    }
    let mut item = doc.as_table().get("backend")?;
    let mut found = None;
    for part in field.split('.') {
        let (key, indices) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        item = match item.as_table_like().and_then(|t| t.get(key)) {
            Some(next) => next,
            None => break,
        };
        found = item.span().or(found);
        for index in indices.split(['[', ']']).filter(|s| !s.is_empty()) {
            let Some(v) = index
                .parse::<usize>()
                .ok()
                .and_then(|i| item.as_array()?.get(i))
            else {
                return found;
            };
            found = v.span().or(found);
        }
    }
    found
}

/// A file's own `[backend] type`, if it names one.
fn recipe_backend(source: &str) -> Option<String> {
    let table = toml::from_str::<toml::Table>(source).ok()?;
    Some(table.get("backend")?.get("type")?.as_str()?.to_string())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

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
        let registry = Registry::new(Some(site));
        // No backend in the recipe: the site's, with its defaults under the recipe's keys.
        let decided = registry.decide(None, "[backend]\naccount = \"mine\"\n");
        assert_eq!(decided, Ok("wrapped".into()));
        let mut p = plan("local", serde_json::json!({"account": "mine"}));
        registry.settle(&mut p, decided.expect("decided"));
        assert_eq!(p.backend, "wrapped");
        assert_eq!(
            p.backend_config,
            serde_json::json!({"account": "mine", "partition": "gpu"})
        );
        // A recipe that names its backend keeps it, and another backend's defaults stay out.
        let decided = registry.decide(None, "[backend]\ntype = \"local\"\n");
        assert_eq!(decided, Ok("local".into()));
        let mut p = plan("local", Value::Null);
        registry.settle(&mut p, decided.expect("decided"));
        assert_eq!(
            (p.backend.as_str(), &p.backend_config),
            ("local", &Value::Null)
        );
        // `type = "site"` asks for the site's backend explicitly, and `--backend` wins.
        let decided = registry.decide(None, "[backend]\ntype = \"site\"\n");
        assert_eq!(decided, Ok("wrapped".into()));
        let mut p = plan("site", Value::Null);
        registry.settle(&mut p, decided.expect("decided"));
        assert_eq!(p.backend, "wrapped");
        assert_eq!(p.backend_config["partition"], "gpu");
        assert_eq!(
            registry.decide(Some("ssh"), "[backend]\ntype = \"site\"\n"),
            Ok("ssh".into())
        );
        // A workflow names no backend: the site's, else local.
        let workflow = "[[task]]\nid = \"a\"\nrun = \"true\"\n";
        assert_eq!(registry.decide(None, workflow), Ok("wrapped".into()));
        assert_eq!(
            Registry::default().decide(None, workflow),
            Ok("local".into())
        );
    }

    #[test]
    fn a_backend_field_is_placed_at_its_own_value() {
        let source = "name = \"x\"\n\n[backend]\ntype = \"ssh\"\nhosts = [\"a\", 7]\npoll = 5\n\n[backend.options]\nUser = 1\n";
        let doc = toml_edit::ImDocument::parse(source).expect("parses");
        let at = |field: &str| backend_field_span(&doc, field).map(|s| &source[s]);
        assert_eq!(at("poll"), Some("5"));
        assert_eq!(at("hosts[1]"), Some("7"));
        assert_eq!(at("hosts"), Some("[\"a\", 7]"));
        // An index past the end, or a field not written: the nearest one that is.
        assert_eq!(at("hosts[9]"), Some("[\"a\", 7]"));
        assert_eq!(at("options.User"), Some("1"));
        assert_eq!(at("nonesuch"), None);
        assert_eq!(at(""), None);
    }

    #[tokio::test]
    async fn a_bad_builtin_backend_field_is_reported_at_its_line() {
        let source = Arc::new(
            "name = \"x\"\n\n[backend]\ntype = \"sim\"\nseed = 3\nengine_startup = 5\n".to_string(),
        );
        let p = plan(
            "sim",
            serde_json::json!({"type": "sim", "seed": 3, "engine_startup": 5}),
        );
        let e = Registry::default()
            .check(&p, Path::new("r.toml"), &source)
            .await
            .expect_err("a number is not a duration");
        let text = e.render(false);
        assert!(
            text.contains("r.toml:6:18: `backend.engine_startup`: must be a duration as a string"),
            "{text}"
        );
    }

    #[test]
    fn an_unknown_backend_lists_what_there_is() {
        let registry = Registry::default();
        let e = match registry.by_name("nonesuch-backend") {
            Ok(_) => panic!("found a backend that does not exist"),
            Err(e) => e,
        };
        assert!(e.contains("no backend `nonesuch-backend`"), "{e}");
        assert!(e.contains("available: local"), "{e}");
        let e = match registry.by_name("site") {
            Ok(_) => panic!("`site` without a site file"),
            Err(e) => e,
        };
        assert!(e.contains("no site file is given"), "{e}");
        let e = registry
            .decide(None, "[backend]\ntype = \"site\"\n")
            .expect_err("`site` without a site file");
        assert!(e.contains("no site file is given"), "{e}");
        assert!(registry.by_name("local").is_ok());
    }

    #[tokio::test]
    async fn the_example_site_runs_its_plugin_through_conformance() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/plugins/site.toml");
        let site = match crate::site::load_site(&path) {
            Ok(s) => s,
            Err(p) => panic!("{}", p.render(false)),
        };
        assert_eq!(site.backend.as_deref(), Some("wrapped"));
        assert_eq!(
            site.defaults["wrapper"],
            serde_json::json!(["env", "SITE_EXAMPLE=1"])
        );
        let info = plugins::locate("site", Some(&site), &Value::Null).expect("the site's backend");
        assert_eq!(info.source, Source::Site(path.clone()));
        let registry = Registry::new(Some(site));
        let mut lines = Vec::new();
        let passed = tokio::time::timeout(
            Duration::from_secs(90),
            report::test_backend(&registry, "wrapped", &mut |l| lines.push(l.to_string())),
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
