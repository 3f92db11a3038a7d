//! Where a workflow task's command starts: the directory of its file, as make, ninja and
//! compose do, or the entry's `dir`. Its pid file (with its exit status) stays under the
//! state dir whatever it is; only the process's working directory moves.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::TaskEntry;
use crate::diag::{Problem, Problems};

/// The directories looked up for one file, by the path as written joined to the file's
/// directory: with `dir` absent, every task of a file starts in the same one.
#[derive(Default)]
pub(super) struct StartDirs(HashMap<PathBuf, Result<String, String>>);

impl StartDirs {
    /// Each directory looked up, as written joined to the file's, with where it led.
    pub(super) fn found(self) -> Vec<(PathBuf, String)> {
        let mut v: Vec<(PathBuf, String)> = self
            .0
            .into_iter()
            .filter_map(|(k, r)| Some((k, r.ok()?)))
            .collect();
        v.sort();
        v
    }
}

/// Where an entry's command starts ([`TaskSpec::dir`]), from the file named in `problems`.
///
/// Without a node: its `dir`, relative to the file's directory (an absolute path is taken
/// as it is), else that directory itself. It must be a directory, and is kept absolute with
/// links resolved, so the plan is the same from any working directory. With a node, the
/// file's directory means nothing on the node's host: the task starts in its run dir, unless
/// `dir` names an absolute path on that host (which only the host can check).
pub(super) fn start_dir(
    e: &TaskEntry,
    id: &str,
    problems: &mut Problems,
    seen: &mut StartDirs,
) -> Option<String> {
    let written = e.dir.as_ref();
    if e.node.is_some() {
        let d = written?;
        if Path::new(d.get_ref()).is_absolute() {
            return Some(d.get_ref().clone());
        }
        problems.push(
            Problem::new(format!(
                "`dir` of task `{id}` is relative, but the task runs on a node: it must be an absolute path on that node's host"
            ))
            .at(Some(d.span()))
            .label("not an absolute path")
            .help("write e.g. `dir = \"/scratch/project\"`, or drop `node` to run the task here"),
        );
        return None;
    }
    let file = Path::new(&problems.path);
    let base = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let wanted = match written {
        Some(d) => base.join(d.get_ref()),
        None => base,
    };
    let found = seen
        .0
        .entry(wanted.clone())
        .or_insert_with(|| look_up(&wanted))
        .clone();
    match (found, written) {
        (Ok(p), _) => Some(p),
        (Err(why), Some(d)) => {
            problems.push(
                Problem::new(format!(
                    "`dir` of task `{id}` is `{}`, where the task cannot start: {why}",
                    wanted.display()
                ))
                .at(Some(d.span()))
                .label("no such directory")
                .help(format!(
                    "a relative `dir` is taken from the directory of `{}`; make the directory, or name one that exists",
                    file.display()
                )),
            );
            None
        }
        (Err(why), None) => {
            problems.push(Problem::new(format!(
                "task `{id}` starts in the directory of `{}`, which cannot be found: {why}",
                file.display()
            )));
            None
        }
    }
}

/// `wanted` with links resolved, if it is a directory.
fn look_up(wanted: &Path) -> Result<String, String> {
    std::fs::canonicalize(wanted)
        .map_err(|e| e.to_string())
        .and_then(|p| {
            if p.is_dir() {
                Ok(p)
            } else {
                Err("it is not a directory".to_string())
            }
        })
        .and_then(|p| {
            p.to_str()
                .map(String::from)
                .ok_or_else(|| "its path is not UTF-8".to_string())
        })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::plan::Plan;
    use crate::workflow::parse;

    fn plan_in(dir: &std::path::Path, text: &str) -> Result<Plan, String> {
        let file = dir.join("wf.toml");
        parse(
            &file.display().to_string(),
            Arc::new(text.to_string()),
            "wf",
        )
        .map_err(|p| p.render(false))
    }

    #[test]
    fn a_task_starts_in_its_files_directory_or_its_dir() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = std::fs::canonicalize(tmp.path()).expect("canonical");
        std::fs::create_dir(root.join("sub")).expect("sub");
        let plan = plan_in(
            &root,
            "[[task]]\nid = \"a\"\nrun = \"true\"\n\n[[task]]\nid = \"b\"\nrun = \"true\"\ndir = \"sub\"\n\n[[task]]\nid = \"c\"\nrun = \"true\"\ndir = \"/\"\n",
        )
        .expect("valid");
        let dirs: Vec<Option<String>> = plan.tasks.iter().map(|t| t.dir.clone()).collect();
        let at = |p: std::path::PathBuf| Some(p.display().to_string());
        assert_eq!(
            dirs,
            [at(root.clone()), at(root.join("sub")), Some("/".into())]
        );
        // The dir is part of what the task does.
        let (a, b) = (&plan.tasks[0], &plan.tasks[1]);
        let mut moved = a.clone();
        moved.dir = b.dir.clone();
        assert_ne!(a.fingerprint(), moved.fingerprint());
    }

    #[test]
    fn a_missing_dir_is_refused_at_its_place() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let err = plan_in(
            tmp.path(),
            "[[task]]\nid = \"a\"\nrun = \"true\"\ndir = \"nowhere\"\n",
        )
        .expect_err("no such dir");
        assert!(err.contains("wf.toml:4:7"), "{err}");
        assert!(err.contains("nowhere"), "{err}");
    }

    #[test]
    fn a_task_on_a_node_keeps_its_run_dir_or_takes_an_absolute_dir_there() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let plan = plan_in(
            tmp.path(),
            "[[task]]\nid = \"a\"\nrun = \"true\"\nnode = \"node0\"\n\n[[task]]\nid = \"b\"\nrun = \"true\"\nnode = \"node0\"\ndir = \"/srv/on-the-host\"\n",
        )
        .expect("valid");
        assert_eq!(plan.tasks[0].dir, None);
        assert_eq!(plan.tasks[1].dir.as_deref(), Some("/srv/on-the-host"));
        let err = plan_in(
            tmp.path(),
            "[[task]]\nid = \"a\"\nrun = \"true\"\nnode = \"node0\"\ndir = \"sub\"\n",
        )
        .expect_err("relative on a node");
        assert!(err.contains("wf.toml:5:7"), "{err}");
        assert!(err.contains("absolute"), "{err}");
    }
}
