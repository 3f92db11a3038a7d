//! The generic workflow file: `[[task]]` entries of shell commands, so the engine can be used
//! (and tested, and measured) on its own. Recipes may carry the same entries to add steps of
//! their own to a deployment.
//!
//! ```toml
//! [[task]]
//! id = "server"
//! run = "python3 -m http.server 8000"   # or argv = ["python3", "-m", "http.server", "8000"]
//! service = true
//! ready = { http = "http://127.0.0.1:8000/", interval = "100ms", start_period = "5s" }
//! ```
//!
//! Parsing is serde with `deny_unknown_fields` and spans (`toml::Spanned`): a structural
//! problem is reported at its place with a "did you mean" where a field is misspelt. Then
//! every entry is checked in one pass (durations, commands, readiness), and problems are
//! returned together.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

mod dir;
mod ports;

use crate::diag::{did_you_mean, Problem, Problems};
use crate::plan::{
    check_identifier, parse_duration, Command, Plan, Probe, Readiness, TaskSpec, IDENTIFIER_RULE,
};

/// The fields of a `[[task]]` entry, for messages and suggestions.
pub const TASK_FIELDS: &[&str] = &[
    "id", "run", "argv", "dir", "needs", "before", "node", "env", "service", "ready", "ports",
    "timeout", "retries", "backoff",
];
const READY_FIELDS: &[&str] = &[
    "http",
    "tcp",
    "log",
    "interval",
    "timeout",
    "start_period",
    "ready_timeout",
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkflowFile {
    name: Option<Spanned<String>>,
    #[serde(default)]
    task: Vec<Spanned<TaskEntry>>,
}

/// One `[[task]]` entry as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskEntry {
    pub id: Spanned<String>,
    pub run: Option<Spanned<String>>,
    pub argv: Option<Spanned<Vec<String>>>,
    pub dir: Option<Spanned<String>>,
    #[serde(default)]
    pub needs: Vec<Spanned<String>>,
    #[serde(default)]
    pub before: Vec<Spanned<String>>,
    pub node: Option<Spanned<String>>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub service: bool,
    pub ready: Option<Spanned<ReadyEntry>>,
    pub ports: Option<Spanned<Vec<u16>>>,
    pub timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub retries: u32,
    pub backoff: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadyEntry {
    pub http: Option<Spanned<String>>,
    pub tcp: Option<Spanned<String>>,
    pub log: Option<Spanned<String>>,
    pub interval: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub start_period: Option<Spanned<String>>,
    pub ready_timeout: Option<Spanned<String>>,
}

/// A task spec with the extras that only matter while assembling a plan.
pub struct Entry {
    pub spec: TaskSpec,
    pub before: Vec<Spanned<String>>,
}

/// Parses a workflow file into a plan named `default_name` (unless the file names itself).
pub fn parse(path: &str, source: Arc<String>, default_name: &str) -> Result<Plan, Problems> {
    let doc = toml_edit::ImDocument::parse(source.to_string());
    parse_doc(path, source, doc, default_name)
}

/// [`parse`] of a file whose text the caller parsed already (once per command: a 1 MB
/// workflow takes longer to parse than the rest of a no-op resume).
pub fn parse_doc(
    path: &str,
    source: Arc<String>,
    doc: Result<toml_edit::ImDocument<String>, toml_edit::TomlError>,
    default_name: &str,
) -> Result<Plan, Problems> {
    parse_doc_dirs(path, source, doc, default_name).map(|(plan, _)| plan)
}

/// [`parse_doc`], with the start dirs it looked up: each as written (joined to the file's
/// directory as named) with the directory it led to. The same text named by the same path
/// makes the same plan as long as each still leads there.
pub fn parse_doc_dirs(
    path: &str,
    source: Arc<String>,
    doc: Result<toml_edit::ImDocument<String>, toml_edit::TomlError>,
    default_name: &str,
) -> Result<(Plan, Vec<(std::path::PathBuf, String)>), Problems> {
    let mut problems = Problems::new(path, source.clone());
    let read = doc
        .map_err(toml_edit::de::Error::from)
        .and_then(|d| WorkflowFile::deserialize(toml_edit::de::Deserializer::from(d)));
    let file: WorkflowFile = match read {
        Ok(f) => f,
        Err(e) => {
            problems.push(problem_at(e.message(), e.span(), TASK_FIELDS));
            return Err(problems);
        }
    };
    if file.task.is_empty() {
        problems.push(
            Problem::new("the file declares no `[[task]]`")
                .help("add a task: `[[task]]` then `id = \"hello\"` and `run = \"echo hello\"`"),
        );
        return Err(problems);
    }
    // Thousands of tasks share a handful of start dirs: each is looked up once.
    let mut dirs = dir::StartDirs::default();
    let entries: Vec<Entry> = file
        .task
        .iter()
        .filter_map(|t| entry_to_spec_in(t, "custom", &mut problems, &mut dirs))
        .collect();
    let tasks = apply_before(entries, &mut problems);
    let written = file.name.as_ref().map(|n| (n.get_ref().as_str(), n.span()));
    check_name(written, default_name, &mut problems);
    if !problems.is_empty() {
        return Err(problems);
    }
    let plan = Plan {
        name: file
            .name
            .map(Spanned::into_inner)
            .unwrap_or_else(|| default_name.to_string()),
        backend: "local".into(),
        backend_config: serde_json::Value::Null,
        nodes: Vec::new(),
        tasks,
        endpoint: None,
        layout: None,
        restart: Default::default(),
    };
    Ok((plan, dirs.found()))
}

/// Checks the plan's name, which names its state dir (`.prl-flow/<name>/`): the `name`
/// written in the file (with its place), else `default_name` (the file's stem), against
/// [`IDENTIFIER_RULE`].
pub fn check_name(written: Option<(&str, Range<usize>)>, default_name: &str, p: &mut Problems) {
    match written {
        Some((name, span)) => {
            if let Err(why) = check_identifier(name) {
                p.push(
                    Problem::new(format!(
                        "`name` `{}` cannot name a state dir: it {why}",
                        name.escape_debug()
                    ))
                    .at(Some(span))
                    .label("not a safe name")
                    .help(format!(
                        "a name is {IDENTIFIER_RULE}, e.g. `name = \"my-deployment\"`"
                    )),
                );
            }
        }
        None => {
            if let Err(why) = check_identifier(default_name) {
                p.push(
                    Problem::new(format!(
                        "the file's name gives the plan the name `{}`, which cannot name a state dir: it {why}",
                        default_name.escape_debug()
                    ))
                    .help(format!(
                        "add `name = \"...\"` at the top of the file ({IDENTIFIER_RULE}), or rename the file"
                    )),
                );
            }
        }
    }
}

/// Turns a toml/serde error into a problem at its place, with a suggestion for a misspelt
/// field.
pub fn toml_problem(e: &toml::de::Error, fields: &[&str]) -> Problem {
    problem_at(e.message(), e.span(), fields)
}

/// [`toml_problem`] of an error's message and place.
fn problem_at(message: &str, span: Option<Range<usize>>, fields: &[&str]) -> Problem {
    let msg = message.trim().to_string();
    let mut p = Problem::new(msg.clone()).at(span).label("here");
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        if let Some(name) = rest.split('`').next() {
            let candidates: Vec<&str> = if msg.contains("expected one of") {
                msg.split("expected one of")
                    .nth(1)
                    .unwrap_or("")
                    .split('`')
                    .skip(1)
                    .step_by(2)
                    .collect()
            } else {
                fields.to_vec()
            };
            p = p.label("not a known field");
            p.help = Some(match did_you_mean(name, candidates.iter().copied()) {
                Some(s) => format!("did you mean `{s}`?"),
                None => format!("known fields: {}", candidates.join(", ")),
            });
        }
    } else if msg.starts_with("missing field") {
        p = p.label("in this entry");
    }
    p
}

/// Converts one entry; problems go to `problems` and the entry is dropped.
pub fn entry_to_spec(t: &Spanned<TaskEntry>, kind: &str, problems: &mut Problems) -> Option<Entry> {
    entry_to_spec_in(t, kind, problems, &mut dir::StartDirs::default())
}

/// [`entry_to_spec`], with the start dirs already looked up by the entries before.
fn entry_to_spec_in(
    t: &Spanned<TaskEntry>,
    kind: &str,
    problems: &mut Problems,
    dirs: &mut dir::StartDirs,
) -> Option<Entry> {
    let e = t.get_ref();
    let before = problems.len();
    let id = e.id.get_ref().trim().to_string();
    if id.is_empty() {
        problems.push(
            Problem::new("`id` is empty")
                .at(Some(e.id.span()))
                .help("give the task a name, e.g. `id = \"compile\"`"),
        );
    } else if let Err(why) = check_identifier(&id) {
        problems.push(
            Problem::new(format!(
                "task id `{}` cannot name the task's log and run dir: it {why}",
                id.escape_debug()
            ))
            .at(Some(e.id.span()))
            .label("not a safe id")
            .help(format!(
                "a task id is {IDENTIFIER_RULE}, e.g. `id = \"stage-weights\"`"
            )),
        );
    }
    let command = match (&e.run, &e.argv) {
        (Some(r), None) => Command::Shell {
            script: r.get_ref().clone(),
        },
        (None, Some(a)) if !a.get_ref().is_empty() => Command::Argv {
            argv: a.get_ref().clone(),
        },
        (None, Some(a)) => {
            problems.push(
                Problem::new(format!("`argv` of task `{id}` is empty"))
                    .at(Some(a.span()))
                    .help("name the program and its arguments: `argv = [\"echo\", \"hi\"]`"),
            );
            Command::default()
        }
        (Some(r), Some(_)) => {
            problems.push(
                Problem::new(format!("task `{id}` has both `run` and `argv`"))
                    .at(Some(r.span()))
                    .help("keep one: `run` for a shell command line, `argv` for a program and its arguments"),
            );
            Command::default()
        }
        (None, None) => {
            problems.push(
                Problem::new(format!("task `{id}` has no command"))
                    .at(Some(t.span()))
                    .label("this task")
                    .help("add `run = \"...\"` (a shell command) or `argv = [...]`"),
            );
            Command::default()
        }
    };
    let nul_in_command = match (&e.run, &e.argv) {
        (Some(r), _) if r.get_ref().contains('\0') => Some(("run", r.span())),
        (_, Some(a)) if a.get_ref().iter().any(|x| x.contains('\0')) => Some(("argv", a.span())),
        _ => None,
    };
    let nul_in_env = e
        .env
        .iter()
        .find(|(k, v)| k.contains('\0') || v.contains('\0'))
        .map(|(k, _)| format!("env.{}", k.escape_debug()));
    for (field, span) in nul_in_command
        .map(|(f, s)| (f.to_string(), s))
        .into_iter()
        .chain(nul_in_env.map(|f| (f, t.span())))
    {
        problems.push(
            Problem::new(format!(
                "`{field}` of task `{id}` holds a NUL character, which no command line or environment can carry"
            ))
            .at(Some(span))
            .label("NUL here")
            .help("remove the `\\u0000` from the value"),
        );
    }
    let dir = dir::start_dir(e, &id, problems, dirs);
    let mut duration = |v: &Option<Spanned<String>>, field: &str| {
        v.as_ref().and_then(|s| match parse_duration(s.get_ref()) {
            Ok(d) => Some(d),
            Err(msg) => {
                problems.push(
                    Problem::new(format!("`{field}` of task `{id}`: {msg}"))
                        .at(Some(s.span()))
                        .label("not a duration"),
                );
                None
            }
        })
    };
    let timeout = duration(&e.timeout, "timeout");
    let backoff = duration(&e.backoff, "backoff");
    let ready = match &e.ready {
        None => None,
        Some(r) => {
            let rr = r.get_ref();
            let interval = duration(&rr.interval, "ready.interval");
            let ptimeout = duration(&rr.timeout, "ready.timeout");
            let start_period = duration(&rr.start_period, "ready.start_period");
            let ready_timeout = duration(&rr.ready_timeout, "ready.ready_timeout");
            let probes: Vec<Probe> = [
                rr.http.as_ref().map(|url| Probe::Http {
                    url: url.get_ref().clone(),
                }),
                rr.tcp.as_ref().map(|addr| Probe::Tcp {
                    addr: addr.get_ref().clone(),
                }),
                rr.log.as_ref().map(|regex| Probe::Log {
                    regex: regex.get_ref().clone(),
                }),
            ]
            .into_iter()
            .flatten()
            .collect();
            if let Some(regex) = &rr.log {
                if let Err(err) = regex::Regex::new(regex.get_ref()) {
                    problems.push(
                        Problem::new(format!(
                            "`ready.log` of task `{id}` is not a valid regex: {err}"
                        ))
                        .at(Some(regex.span()))
                        .label("not a regex")
                        .help("write a regex a line of the log matches, e.g. `log = \"listening on\"`"),
                    );
                }
            }
            if let Some(addr) = &rr.tcp {
                if let Err(why) = check_tcp(addr.get_ref()) {
                    problems.push(
                        Problem::new(format!(
                            "`ready.tcp` of task `{id}` must be `host:port`, not `{}`: {why}",
                            addr.get_ref().escape_debug()
                        ))
                        .at(Some(addr.span()))
                        .label("not host:port")
                        .help("write e.g. `tcp = \"127.0.0.1:8000\"`"),
                    );
                }
            }
            if let Some(url) = &rr.http {
                if let Err(why) = check_http(url.get_ref()) {
                    problems.push(
                        Problem::new(format!(
                            "`ready.http` of task `{id}` is not an http URL: `{}` {why}",
                            url.get_ref().escape_debug()
                        ))
                        .at(Some(url.span()))
                        .label("not an http URL")
                        .help("write e.g. `http = \"http://127.0.0.1:8000/health\"`"),
                    );
                }
            }
            if probes.len() != 1 {
                problems.push(
                    Problem::new(format!(
                        "`ready` of task `{id}` needs exactly one probe: `http`, `tcp` or `log`"
                    ))
                    .at(Some(r.span()))
                    .help(format!(
                        "e.g. `ready = {{ http = \"http://127.0.0.1:8000/\" }}`; fields: {}",
                        READY_FIELDS.join(", ")
                    )),
                );
                None
            } else if !e.service {
                problems.push(
                    Problem::new(format!("task `{id}` has `ready` but is not a service"))
                        .at(Some(r.span()))
                        .help(
                            "add `service = true` (it keeps running once ready), or drop `ready`",
                        ),
                );
                None
            } else {
                let mut rd = Readiness::new(probes.into_iter().next()?);
                if let Some(v) = interval {
                    rd.interval = v;
                }
                if let Some(v) = ptimeout {
                    rd.timeout = v;
                }
                if let Some(v) = start_period {
                    rd.start_period = v;
                }
                rd.ready_timeout = ready_timeout;
                Some(rd)
            }
        }
    };
    let (ports, port_fields) = ports::own_ports(e, &id, ready.as_ref(), problems);
    if problems.len() > before {
        return None;
    }
    Some(Entry {
        spec: TaskSpec {
            id,
            kind: kind.to_string(),
            needs: e.needs.iter().map(|n| n.get_ref().clone()).collect(),
            node: e.node.as_ref().map(|n| n.get_ref().clone()),
            command,
            dir,
            env: e.env.clone(),
            files: Vec::new(),
            ports,
            port_fields,
            service: e.service,
            ready,
            timeout,
            retries: e.retries,
            backoff,
            span: Some(t.span()),
            need_spans: e.needs.iter().map(|n| Some(n.span())).collect(),
            edges: Default::default(),
        },
        before: e.before.clone(),
    })
}

/// `host:port` with a host and a port of 1 to 65535 (`${host:nodeK}` counts as a host).
fn check_tcp(addr: &str) -> Result<(), String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| "there is no `:port`".to_string())?;
    if host.trim().is_empty() {
        return Err("there is no host".into());
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("`{port}` is not a port (1 to 65535)")),
    }
}

/// An `http://` or `https://` URL with a host. A `${host:nodeK}` placeholder is taken for
/// an address (the run fills it in).
fn check_http(url: &str) -> Result<(), String> {
    let sample = crate::plan::resolve_hosts(url, &|_| Some("127.0.0.1".to_string()));
    let parsed = reqwest::Url::parse(&sample).map_err(|e| format!("does not parse ({e})"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "has the scheme `{}`; a probe speaks `http` or `https`",
            parsed.scheme()
        ));
    }
    if parsed.host_str().map_or(true, str::is_empty) {
        return Err("has no host".into());
    }
    Ok(())
}

/// Resolves `before = [...]`: the named tasks get this one added to their `needs`. Works
/// over the entries of the file and any tasks already in `tasks` (a recipe's).
pub fn apply_before(entries: Vec<Entry>, problems: &mut Problems) -> Vec<TaskSpec> {
    let mut tasks: Vec<TaskSpec> = Vec::with_capacity(entries.len());
    let mut befores = Vec::new();
    for e in entries {
        for b in &e.before {
            befores.push((e.spec.id.clone(), b.clone()));
        }
        tasks.push(e.spec);
    }
    add_before(&mut tasks, befores, problems);
    tasks
}

/// Adds each `(task, before target)` pair as a dependency of the target.
pub fn add_before(
    tasks: &mut [TaskSpec],
    befores: Vec<(String, Spanned<String>)>,
    problems: &mut Problems,
) {
    for (id, target) in befores {
        let name = target.get_ref();
        match tasks.iter_mut().find(|t| &t.id == name) {
            Some(t) => {
                if !t.needs.contains(&id) {
                    t.needs.push(id);
                    t.need_spans.push(Some(target.span()));
                }
            }
            None => {
                let ids: Vec<String> = tasks.iter().map(|t| t.id.clone()).collect();
                let mut p = Problem::new(format!(
                    "task `{id}` is to run before `{name}`, which is not a task"
                ))
                .at(Some(target.span()))
                .label("unknown task");
                if let Some(s) = did_you_mean(name, ids.iter().map(String::as_str)) {
                    p = p.help(format!("did you mean `{s}`?"));
                }
                problems.push(p);
            }
        }
    }
}

#[cfg(test)]
mod tests;
