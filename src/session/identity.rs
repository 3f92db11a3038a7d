//! Which file a state dir belongs to. A run records the canonical path of its recipe or
//! workflow in `owner.json` beside the journal (written atomically, while the run holds
//! the state dir's lock), and later the endpoint it answers on. A command given a FILE and
//! a state dir that belongs to another file is refused ([`check`]); the default state dir
//! of a file is `.prl-flow/<name>`, or `.prl-flow/<name>-<hash>` when that one belongs to
//! another file ([`state_dir_for`]), so two files with one name never share a state dir.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Error, Result};

/// The file beside the journal that names the state dir's owner.
pub const OWNER: &str = "owner.json";

/// What `owner.json` holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The canonical path of the recipe or workflow that runs in this state dir.
    pub file: PathBuf,
    /// Where the deployment answers, once a run brought it up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

/// `path` made absolute with every link resolved (as it is when it exists).
pub fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path)
        .or_else(|_| std::path::absolute(path))
        .unwrap_or_else(|_| path.to_path_buf())
}

/// The owner of `dir`, if a run recorded one.
pub fn read(dir: &Path) -> Option<Identity> {
    let text = std::fs::read_to_string(dir.join(OWNER)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Records `identity` as the owner of `dir` (atomically).
pub fn write(dir: &Path, identity: &Identity) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut bytes = serde_json::to_vec_pretty(identity).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    prl_flow_engine::fs::write_atomic(&dir.join(OWNER), &bytes)
}

/// Records that `file` owns `dir`, keeping the endpoint recorded before when the owner is
/// the same.
pub fn claim(dir: &Path, file: &Path) -> std::io::Result<()> {
    let file = canonical(file);
    let endpoint = read(dir)
        .filter(|i| i.file == file)
        .and_then(|i| i.endpoint);
    write(dir, &Identity { file, endpoint })
}

/// Records where the deployment in `dir` answers.
pub fn record_endpoint(dir: &Path, endpoint: &str) -> std::io::Result<()> {
    let Some(mut identity) = read(dir) else {
        return Ok(());
    };
    identity.endpoint = Some(endpoint.to_string());
    write(dir, &identity)
}

/// Whether `dir` may hold the state of `file`: it has no owner yet, or `file` is it.
pub fn belongs(dir: &Path, file: &Path) -> bool {
    read(dir).map_or(true, |i| i.file == canonical(file))
}

/// `<name>-<8 hex digits of the canonical path's SHA-256>`.
pub fn hashed_name(name: &str, file: &Path) -> String {
    let digest = Sha256::digest(canonical(file).to_string_lossy().as_bytes());
    let hex: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    format!("{name}-{hex}")
}

/// A file's default state dir, and a note for people when it is not the plain one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDir {
    pub dir: PathBuf,
    pub note: Option<String>,
}

/// The default state dir of `file`, whose plan is named `name`: `.prl-flow/<name>` unless
/// that belongs to another file; then `.prl-flow/<name>-<hash>` ([`hashed_name`]). A hashed
/// dir that already belongs to `file` is kept even once the plain one is free again, so a
/// file's state never moves.
pub fn state_dir_for(name: &str, file: &Path) -> StateDir {
    let plain = super::default_state_dir(name);
    let hashed = super::default_state_dir(&hashed_name(name, file));
    let own_hashed = read(&hashed).is_some_and(|i| i.file == canonical(file));
    if !own_hashed && belongs(&plain, file) {
        return StateDir {
            dir: plain,
            note: None,
        };
    }
    let other = read(&plain).map(|i| i.file.display().to_string());
    StateDir {
        note: Some(format!(
            "note: `{}` belongs to `{}`; the state of `{}` is in `{}`",
            plain.display(),
            other.unwrap_or_else(|| "another file".into()),
            file.display(),
            hashed.display()
        )),
        dir: hashed,
    }
}

/// Refuses `dir` for `file` when it belongs to another file, naming both and the ways on.
pub fn check(dir: &Path, file: &Path) -> Result<()> {
    let Some(owner) = read(dir) else {
        return Ok(());
    };
    if owner.file == canonical(file) {
        return Ok(());
    }
    Err(Error::Usage(format!(
        "error: the state dir `{}` belongs to `{}`, not to `{}`\n  \
         help: give `{}` a state dir of its own with `--state-dir DIR` (or leave it out: the \
         default is `.prl-flow/<name>`, and `name = \"...\"` at the top of the file sets the \
         name); `prl-flow status --state-dir {}` shows what runs there",
        dir.display(),
        owner.file.display(),
        canonical(file).display(),
        file.display(),
        crate::plan::shell_word(&dir.display().to_string()),
    )))
}

impl super::Session {
    /// [`Session::prepare`](super::Session::prepare) of a loaded file with its state dir's
    /// identity: the default state dir by [`state_dir_for`] (with its note, if any), a
    /// state dir of another file refused ([`check`]), and the file recorded as its owner
    /// once the run holds the state dir.
    pub async fn prepare_owned(
        &self,
        loaded: &super::Loaded,
        settings: &super::RunSettings,
    ) -> Result<(super::Prepared, Option<String>)> {
        let (dir, note) = match &settings.state_dir {
            Some(d) => (d.clone(), None),
            None => {
                let s = state_dir_for(&loaded.plan.name, &loaded.path);
                (s.dir, s.note)
            }
        };
        check(&dir, &loaded.path)?;
        let settings = super::RunSettings {
            state_dir: Some(dir.clone()),
            ..settings.clone()
        };
        let prepared = self.prepare(loaded, &settings).await?;
        // Again, now that this run holds the state dir: another may have claimed it since.
        check(&dir, &loaded.path)?;
        claim(&dir, &loaded.path).map_err(|e| {
            Error::Usage(format!(
                "error: cannot write `{}`: {e}\n  help: nothing was started; make room in `{}` or pass another `--state-dir`",
                dir.join(OWNER).display(),
                dir.display()
            ))
        })?;
        Ok((prepared, note))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dir_without_owner_belongs_to_anyone_and_claiming_it_refuses_others() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let a = tmp.path().join("a.toml");
        let b = tmp.path().join("b.toml");
        std::fs::write(&a, "").expect("write");
        std::fs::write(&b, "").expect("write");
        let dir = tmp.path().join("st");
        assert!(check(&dir, &a).is_ok());
        claim(&dir, &a).expect("claim");
        assert!(check(&dir, &a).is_ok());
        let Err(Error::Usage(msg)) = check(&dir, &b) else {
            panic!("another file's dir was not refused");
        };
        assert!(msg.contains("a.toml") && msg.contains("b.toml"), "{msg}");
        record_endpoint(&dir, "http://x").expect("endpoint");
        claim(&dir, &a).expect("claim again");
        assert_eq!(
            read(&dir).and_then(|i| i.endpoint).as_deref(),
            Some("http://x")
        );
    }

    #[test]
    fn hashed_names_differ_by_path() {
        assert_ne!(
            hashed_name("x", Path::new("/a/x.toml")),
            hashed_name("x", Path::new("/b/x.toml"))
        );
        assert!(hashed_name("x", Path::new("/a/x.toml")).starts_with("x-"));
    }
}
