//! Remembered options: what a run was told that changes what runs (`--engine`, `--router`,
//! `--templates`, `--backend`, `--site`), with a digest of the templates dir and the site
//! file it read. A run records them in `options.json` beside the journal (atomically, while
//! it holds the state dir's lock). `run --resume`, `status -v` and the commands prl-flow
//! suggests use them where the user gives none; an option given again with another value is
//! a change, and the decisions name it ([`name_changes`]).

use std::path::{Path, PathBuf};

use prl_flow_engine::{Decision, Reason};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Error, LoadOptions, Loaded, Prepared, Result, RunSettings, Session};
use crate::plan::{shell_word, Plan};

/// The file beside the journal that keeps the options of the last run.
pub const OPTIONS: &str = "options.json";

/// Which program serves as the inference engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// The recipe's launcher (`vllm serve`).
    #[default]
    Real,
    /// `prl-flow-mock-engine`, beside prl-flow.
    Mock,
}

impl Engine {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Real => "real",
            Self::Mock => "mock",
        }
    }
}

/// The options that change what runs. Given by the user, `None` is "not given"; recorded,
/// it is "not used" (the recipe's, the built-in one), except the engine, always recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chosen {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<Engine>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub templates: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<PathBuf>,
}

/// One option given with another value than the last run's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub flag: &'static str,
    pub from: String,
    pub to: String,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} → {}", self.flag, self.from, self.to)
    }
}

impl Chosen {
    /// Paths made canonical (they are read again later, maybe from another directory); a
    /// router given as a path to a file too.
    pub fn normalized(mut self) -> Self {
        let canon = super::identity::canonical;
        self.templates = self.templates.map(|p| canon(&p));
        self.site = self.site.map(|p| canon(&p));
        self.router = self.router.map(|r| {
            if r.contains('/') && Path::new(&r).is_file() {
                canon(Path::new(&r)).display().to_string()
            } else {
                r
            }
        });
        self
    }

    /// Each option as given, else as `recorded` has it.
    pub fn over(&self, recorded: Option<&Chosen>) -> Chosen {
        let Some(r) = recorded else {
            return self.clone();
        };
        Chosen {
            engine: self.engine.or(r.engine),
            router: self.router.clone().or_else(|| r.router.clone()),
            templates: self.templates.clone().or_else(|| r.templates.clone()),
            backend: self.backend.clone().or_else(|| r.backend.clone()),
            site: self.site.clone().or_else(|| r.site.clone()),
        }
    }

    /// The options given (`self`) with another value than `recorded`'s.
    pub fn changes_from(&self, recorded: &Chosen) -> Vec<Change> {
        let mut out = Vec::new();
        let mut push = |flag, given: Option<String>, was: Option<String>, none: &str| {
            if let Some(g) = given {
                if Some(&g) != was.as_ref() {
                    out.push(Change {
                        flag,
                        from: was.unwrap_or_else(|| none.to_string()),
                        to: g,
                    });
                }
            }
        };
        let engine = |e: Option<Engine>| e.map(|e| e.as_str().to_string());
        let path = |p: &Option<PathBuf>| p.as_deref().map(shown);
        push(
            "--engine",
            engine(self.engine),
            engine(Some(recorded.engine.unwrap_or_default())),
            "real",
        );
        push(
            "--router",
            self.router.clone(),
            recorded.router.clone(),
            "the recipe's",
        );
        push(
            "--templates",
            path(&self.templates),
            path(&recorded.templates),
            "the built-in ones",
        );
        push(
            "--backend",
            self.backend.clone(),
            recorded.backend.clone(),
            "the recipe's",
        );
        push("--site", path(&self.site), path(&recorded.site), "none");
        out
    }

    /// The options as flags of a command people can copy (` --engine mock ...`, each
    /// preceded by a space; empty when none is used).
    pub fn args(&self) -> String {
        let mut s = String::new();
        let mut add = |flag: &str, v: String| {
            s.push_str(&format!(" {flag} {}", shell_word(&v)));
        };
        if self.engine == Some(Engine::Mock) {
            add("--engine", "mock".into());
        }
        if let Some(r) = &self.router {
            add("--router", r.clone());
        }
        if let Some(t) = &self.templates {
            add("--templates", shown(t));
        }
        if let Some(b) = &self.backend {
            add("--backend", b.clone());
        }
        if let Some(p) = &self.site {
            add("--site", shown(p));
        }
        s
    }

    /// What [`Session::load`] of `file` takes with these options.
    pub fn load_options(&self, file: &Path) -> Result<LoadOptions> {
        let launcher = match self.engine.unwrap_or_default() {
            Engine::Real => crate::recipe::Launcher::Vllm,
            Engine::Mock => crate::recipe::Launcher::Mock {
                argv_prefix: vec![mock_engine_exe()?.to_string_lossy().into_owned()],
            },
        };
        Ok(LoadOptions {
            file: file.to_path_buf(),
            backend: self.backend.clone(),
            launcher,
            templates: self.templates.clone(),
            router: self.router.clone(),
        })
    }

    /// The session of these options' site file.
    pub fn session(&self) -> Result<Session> {
        Ok(Session::new(
            crate::site::load(self.site.as_deref()).map_err(Error::Problems)?,
        ))
    }
}

/// What `options.json` holds: the options of the last run and digests of what they read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remembered {
    #[serde(flatten)]
    pub options: Chosen,
    /// The SHA-256 of the templates dir the run used (its files' names and contents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub templates_digest: Option<String>,
    /// The SHA-256 of the site file's contents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site_digest: Option<String>,
}

/// The options recorded in `dir`, if a run recorded any.
pub fn read(dir: &Path) -> Option<Remembered> {
    let text = std::fs::read_to_string(dir.join(OPTIONS)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Records `r` in `dir` (atomically).
pub fn write(dir: &Path, r: &Remembered) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut bytes = serde_json::to_vec_pretty(r).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    prl_flow_engine::fs::write_atomic(&dir.join(OPTIONS), &bytes)
}

/// What a command on `dir` uses: the options given over the recorded ones, the given ones
/// that differ from those, and what was recorded.
#[derive(Debug, Clone, Default)]
pub struct Resolved {
    pub chosen: Chosen,
    pub changes: Vec<Change>,
    pub recorded: Option<Remembered>,
}

/// `given` over the options recorded in `dir` (none are read when `reuse` is false: a
/// fresh run uses what it is given).
pub fn resolve(given: &Chosen, dir: &Path, reuse: bool) -> Resolved {
    let recorded = if reuse { read(dir) } else { None };
    let mut chosen = given.over(recorded.as_ref().map(|r| &r.options));
    chosen.engine = Some(chosen.engine.unwrap_or_default());
    let changes = recorded
        .as_ref()
        .map(|r| given.changes_from(&r.options))
        .unwrap_or_default();
    Resolved {
        chosen,
        changes,
        recorded,
    }
}

/// The templates dir a load of `loaded` with `chosen` reads: `--templates`, else the site's.
fn templates_dir(chosen: &Chosen, session: &Session, loaded: &Loaded) -> Option<PathBuf> {
    chosen.templates.clone().or_else(|| {
        session
            .site()
            .and_then(|s| crate::site::default_templates(s, &loaded.source))
    })
}

fn digest_of(chosen: &Chosen, session: &Session, loaded: &Loaded) -> Remembered {
    Remembered {
        options: chosen.clone(),
        templates_digest: templates_dir(chosen, session, loaded).and_then(|d| dir_digest(&d)),
        site_digest: chosen
            .site
            .as_deref()
            .and_then(|p| std::fs::read(p).ok())
            .map(|b| hex(&Sha256::digest(&b))),
    }
}

/// What changed in the files the recorded options name: the templates, the site file.
pub fn content_changes(resolved: &Resolved, session: &Session, loaded: &Loaded) -> Vec<String> {
    let Some(was) = &resolved.recorded else {
        return Vec::new();
    };
    let now = digest_of(&resolved.chosen, session, loaded);
    let mut out = Vec::new();
    if was.options.templates == now.options.templates
        && was.templates_digest.is_some()
        && was.templates_digest != now.templates_digest
    {
        if let Some(d) = templates_dir(&resolved.chosen, session, loaded) {
            out.push(format!("the templates in `{}` changed", shown(&d)));
        }
    }
    if was.options.site == now.options.site
        && was.site_digest.is_some()
        && was.site_digest != now.site_digest
    {
        if let Some(s) = &now.options.site {
            out.push(format!("the site file `{}` changed", shown(s)));
        }
    }
    out
}

/// Names the cause of each `changed` decision: the options given with another value, when
/// the task's plan differs between the recorded options (`before`) and the given ones
/// (`now`); else what changed in the templates or the site file, if anything did.
pub fn name_changes<'a>(
    decisions: impl Iterator<Item = (&'a str, &'a mut Decision)>,
    before: Option<&Plan>,
    now: &Plan,
    changes: &[Change],
    contents: &[String],
) {
    let fingerprint = |plan: &Plan, id: &str| {
        plan.tasks
            .iter()
            .find(|t| t.id == id)
            .map(|t| t.fingerprint())
    };
    for (id, d) in decisions {
        if *d != Decision::Run(Reason::Changed) {
            continue;
        }
        let by_option = !changes.is_empty()
            && before.is_some_and(|b| fingerprint(b, id) != fingerprint(now, id));
        let why = if by_option {
            changes
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        } else if !contents.is_empty() {
            contents.join("; ")
        } else {
            continue;
        };
        *d = Decision::Run(Reason::ChangedBy(why));
    }
}

/// What names the cause of a `changed` decision: the plan as the recorded options make it
/// (when an option was given with another value), those options, and what changed in the
/// files they name.
#[derive(Debug, Clone, Default)]
pub struct Causes {
    pub before: Option<Plan>,
    pub changes: Vec<Change>,
    pub contents: Vec<String>,
}

impl Causes {
    /// The causes for a resume of `loaded` (loaded with `resolved.chosen` in `session`).
    pub async fn of(resolved: &Resolved, session: &Session, loaded: &Loaded) -> Causes {
        Causes {
            before: plan_before(resolved, &loaded.path).await,
            changes: resolved.changes.clone(),
            contents: content_changes(resolved, session, loaded),
        }
    }

    /// [`name_changes`] with these causes.
    pub fn name<'a>(
        &self,
        now: &Plan,
        decisions: impl Iterator<Item = (&'a str, &'a mut Decision)>,
    ) {
        name_changes(
            decisions,
            self.before.as_ref(),
            now,
            &self.changes,
            &self.contents,
        );
    }
}

impl Session {
    /// [`Session::prepare_owned`] that also records `chosen` (with digests of the templates
    /// and site file it reads) in the state dir, once the run holds it.
    pub async fn prepare_remembered(
        &self,
        loaded: &Loaded,
        settings: &RunSettings,
        chosen: &Chosen,
    ) -> Result<(Prepared, Option<String>)> {
        let (prepared, note) = self.prepare_owned(loaded, settings).await?;
        write(&prepared.dir, &digest_of(chosen, self, loaded)).map_err(|e| {
            Error::Usage(format!(
                "error: cannot write `{}`: {e}\n  help: nothing was started; make room in `{}` or pass another `--state-dir`",
                prepared.dir.join(OPTIONS).display(),
                prepared.dir.display()
            ))
        })?;
        Ok((prepared, note))
    }
}

/// The plan of `file` as the recorded options of `resolved` make it, to tell which tasks
/// an option given with another value changes; `None` when no option changed or it cannot
/// be made (a file gone since).
pub async fn plan_before(resolved: &Resolved, file: &Path) -> Option<Plan> {
    if resolved.changes.is_empty() {
        return None;
    }
    let mut was = resolved.recorded.as_ref()?.options.clone();
    was.engine = Some(was.engine.unwrap_or_default());
    let session = was.session().ok()?;
    let loaded = session.load(&was.load_options(file).ok()?).await.ok()?;
    Some(loaded.plan)
}

/// The name of the plan in `file` without loading it: its top-level `name`, else the file
/// name without `.toml` (as a load names it), to find its state dir.
pub fn plan_name(file: &Path) -> Result<String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| Error::Usage(format!("error: cannot read `{}`: {e}", file.display())))?;
    let name_in = |t: toml::Table| {
        t.get("name")
            .and_then(|n| n.as_str())
            .map(|n| n.trim().to_string())
    };
    // A top-level `name` comes before the first table header, so only the text before it
    // is parsed (the whole of a large workflow takes milliseconds). A prefix that does not
    // parse alone (a header-like line inside a multi-line string or array) is not cut at a
    // statement's end: then the whole file is parsed.
    let head = top_level_text(&text);
    let written = match toml::from_str::<toml::Table>(head) {
        Ok(t) => name_in(t),
        Err(_) => toml::from_str::<toml::Table>(&text).ok().and_then(name_in),
    };
    Ok(written.filter(|n| !n.is_empty()).unwrap_or_else(|| {
        file.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "run".into())
    }))
}

/// The text before the first line that opens with `[` (a table header, where the top-level
/// keys end), or all of it.
fn top_level_text(text: &str) -> &str {
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_start().starts_with('[') {
            return &text[..at];
        }
        at += line.len();
    }
    text
}

/// The mock engine's program: `prl-flow-mock-engine` in the directory of this executable
/// (where `cargo build` and an install put it), else the first on PATH.
pub fn mock_engine_exe() -> Result<PathBuf> {
    const NAME: &str = "prl-flow-mock-engine";
    let exe = std::env::current_exe().ok();
    let beside = exe.as_deref().and_then(Path::parent).map(|d| d.join(NAME));
    if let Some(p) = beside.filter(|p| prl_flow_plugin::is_executable(p)) {
        return Ok(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(p) = std::env::split_paths(&path)
        .map(|d| d.join(NAME))
        .find(|p| prl_flow_plugin::is_executable(p))
    {
        return Ok(p);
    }
    let dir = exe.as_deref().and_then(Path::parent).map_or_else(
        || "this program's directory".to_string(),
        |d| format!("`{}`", d.display()),
    );
    Err(Error::Usage(format!(
        "error: the mock engine `{NAME}` is neither in {dir} nor on PATH\n  \
         help: build it beside prl-flow with `cargo build --workspace` (a plain `cargo build` \
         at the repository root builds both)"
    )))
}

/// A path as people read it: relative to the current directory when under it.
fn shown(p: &Path) -> String {
    std::env::current_dir()
        .ok()
        .map(|d| super::identity::canonical(&d))
        .and_then(|d| p.strip_prefix(d).ok().map(Path::to_path_buf))
        .filter(|r| !r.as_os_str().is_empty())
        .unwrap_or_else(|| p.to_path_buf())
        .display()
        .to_string()
}

/// The SHA-256 of every file under `dir`, by relative path, in order; `None` when it
/// cannot be read.
fn dir_digest(dir: &Path) -> Option<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                walk(root, &path, out)?;
            } else {
                let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
                out.push((rel, std::fs::read(&path)?));
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(dir, dir, &mut files).ok()?;
    files.sort();
    let mut h = Sha256::new();
    for (rel, bytes) in files {
        h.update(rel.to_string_lossy().as_bytes());
        h.update([0]);
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    Some(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_options_win_and_differences_are_named() {
        let recorded = Chosen {
            engine: Some(Engine::Mock),
            router: Some("/r".into()),
            ..Chosen::default()
        };
        let none = Chosen::default();
        assert_eq!(none.over(Some(&recorded)), recorded);
        assert!(none.changes_from(&recorded).is_empty());
        let given = Chosen {
            engine: Some(Engine::Real),
            backend: Some("local".into()),
            ..Chosen::default()
        };
        let shown: Vec<String> = given
            .changes_from(&recorded)
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(
            shown,
            ["--engine: mock → real", "--backend: the recipe's → local"]
        );
        assert_eq!(recorded.args(), " --engine mock --router /r");
    }

    #[test]
    fn a_plan_name_is_read_before_the_first_table_or_from_the_whole_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let f = tmp.path().join("flow.toml");
        let name = |text: &str| {
            std::fs::write(&f, text).expect("write");
            plan_name(&f).expect("name")
        };
        assert_eq!(name("name = \"a\"\n[[task]]\nid = \"x\"\n"), "a");
        assert_eq!(name("[[task]]\nname = \"b\"\n"), "flow");
        // A header-like line inside a top-level string: the prefix alone does not parse.
        assert_eq!(
            name("x = \"\"\"\n[t]\n\"\"\"\nname = \"c\"\n[[task]]\n"),
            "c"
        );
        assert_eq!(name("x = [\n[1],\n]\nname = \"d\"\n"), "d");
    }

    #[test]
    fn a_dir_digest_follows_contents() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(tmp.path().join("a.j2"), "x").expect("write");
        let one = dir_digest(tmp.path());
        std::fs::write(tmp.path().join("a.j2"), "y").expect("write");
        assert_ne!(one, dir_digest(tmp.path()));
        assert!(one.is_some());
    }
}
