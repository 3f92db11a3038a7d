//! The backend registry: the one place that knows which backends exist (the built-in ones
//! and site plugins) and makes them. A run gets its backend from the plan
//! ([`Registry::for_plan`]); `status`, `logs` and `down` get theirs from what a journal
//! record's handle says ([`Registry::for_record`]), so they need neither the recipe nor the
//! site file.

use std::path::Path;
use std::sync::Arc;

use prl_flow_backend::{Backend, Held, ProcHandle};
use prl_flow_engine::Record;
use serde_json::Value;

use crate::diag::{Problem, Problems};
use crate::plan::Plan;
use crate::site::Site;

/// The backends an invocation can use.
#[derive(Debug, Default)]
pub struct Registry {
    site: Option<Site>,
}

impl Registry {
    pub fn new(site: Option<Site>) -> Self {
        Self { site }
    }

    pub fn site(&self) -> Option<&Site> {
        self.site.as_ref()
    }

    /// Checks the plan's `[backend]` table with its backend, before anything starts: every
    /// problem at once, at the table's place (e.g. a recipe that needs more nodes than
    /// there are ssh hosts).
    pub fn check(&self, plan: &Plan, path: &Path, source: &Arc<String>) -> Result<(), Problems> {
        if plan.backend != "ssh" {
            return Ok(());
        }
        let base = path.parent().filter(|p| !p.as_os_str().is_empty());
        let Err(errors) = prl_flow_ssh::validate(&plan.backend_config, plan.nodes.len(), base)
        else {
            return Ok(());
        };
        let at = source.find("[backend]").map(|i| i..i + "[backend]".len());
        let mut p = Problems::new(path.display().to_string(), source.clone());
        for e in errors {
            let mut q = Problem::new(format!("`backend.{}`: {}", e.field, e.message))
                .at(at.clone())
                .label("the ssh backend's table");
            if let Some(h) = e.help {
                q = q.help(h);
            }
            p.push(q);
        }
        Err(p)
    }

    /// A backend by name: built in, or a plugin (site file, recipe, PATH). `config` is the
    /// plan's `[backend]` table, `Value::Null` without a plan.
    pub fn by_name(&self, name: &str, config: &Value) -> Result<Arc<dyn Backend>, String> {
        match name {
            "ssh" => Ok(Arc::new(prl_flow_ssh::SshBackend::from_handles())),
            "slurm" => Ok(Arc::new(prl_flow_slurm::SlurmBackend::for_handles())),
            _ => crate::site::find(name, self.site(), config),
        }
    }

    /// The backend a run of `plan` uses, configured by the plan's `[backend]` table (with
    /// the site's defaults) and knowing the state dir.
    pub fn for_plan(&self, plan: &Plan, dir: &Path) -> Result<Arc<dyn Backend>, String> {
        let bad = |e: String| {
            format!(
                "error: the `[backend]` of `{}` is not usable: {e}",
                plan.name
            )
        };
        match plan.backend.as_str() {
            "ssh" => Ok(Arc::new(
                prl_flow_ssh::SshBackend::from_config(&plan.backend_config, dir).map_err(bad)?,
            )),
            "slurm" => Ok(Arc::new(
                prl_flow_slurm::SlurmBackend::from_config(&plan.backend_config, dir)
                    .map_err(bad)?,
            )),
            other => self.by_name(other, &plan.backend_config),
        }
    }

    /// The handle a record keeps: a process's, or (for an allocation record) the
    /// allocation's.
    fn handle_of(r: &Record) -> Option<ProcHandle> {
        let held = Held::from_json(r.handle.as_ref()?).ok()?;
        Some(held.handle().clone())
    }

    /// The name of the backend that made a record's handle (`None`: no handle).
    pub fn backend_name(r: &Record) -> Option<String> {
        Self::handle_of(r).map(|h| h.backend)
    }

    /// The backend that started what a record's handle names: a plugin by the path the
    /// handle carries, else by name.
    pub fn for_record(&self, r: &Record) -> Result<Arc<dyn Backend>, String> {
        let handle = Self::handle_of(r);
        let name = handle
            .as_ref()
            .map_or_else(|| "local".into(), |h| h.backend.clone());
        let plugin = handle.as_ref().and_then(prl_flow_plugin::plugin_path);
        match plugin {
            Some(p) if prl_flow_plugin::is_executable(&p) => {
                Ok(Arc::new(prl_flow_plugin::PluginBackend::new(name, p)))
            }
            // A SLURM handle says which cluster (its `SLURM_CONF`) it belongs to.
            _ if name == "slurm" => Ok(Arc::new(
                handle
                    .as_ref()
                    .and_then(|h| prl_flow_slurm::SlurmBackend::from_handle(h).ok())
                    .unwrap_or_else(prl_flow_slurm::SlurmBackend::for_handles),
            )),
            _ => self.by_name(&name, &Value::Null),
        }
    }

    /// The backend of a journal: that of its first record with a handle (local when none).
    pub fn for_records<'a>(
        &self,
        mut records: impl Iterator<Item = &'a Record>,
    ) -> Result<Arc<dyn Backend>, String> {
        match records.find(|r| r.handle.is_some()) {
            Some(r) => self.for_record(r),
            None => self.by_name("local", &Value::Null),
        }
    }
}
