//! Finding a program as `exec` would on this machine: a name is looked up in the
//! directories of `PATH`, a path is taken as it is. Used by [`crate::LocalBackend`]'s
//! preflight, before anything starts.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Where `program` is found with this `PATH`, or why it is not (`not found on PATH`, `not
/// executable`). A relative path with a `/` in it depends on where the task starts, which
/// does not exist yet: it is taken as found.
pub fn find_program(program: &str, path: Option<&OsStr>) -> Result<PathBuf, String> {
    if program.contains('/') {
        let p = Path::new(program);
        if p.is_relative() {
            return Ok(p.to_path_buf());
        }
        return if !p.exists() {
            Err("does not exist".into())
        } else if !is_executable(p) {
            Err("is not an executable file".into())
        } else {
            Ok(p.to_path_buf())
        };
    }
    let path = path.unwrap_or_default();
    std::env::split_paths(path)
        .map(|d| {
            if d.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                d
            }
        })
        .map(|d| d.join(program))
        .find(|p| is_executable(p))
        .ok_or_else(|| "is not on PATH".to_string())
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_looked_up_on_path_and_a_path_is_taken_as_it_is() {
        let path = std::env::join_paths(["/nonexistent", "/bin", "/usr/bin"]).expect("path");
        assert!(find_program("sh", Some(&path)).is_ok());
        assert_eq!(
            find_program("surely-no-such-program", Some(&path)),
            Err("is not on PATH".to_string())
        );
        assert!(find_program("/bin/sh", None).is_ok());
        assert_eq!(
            find_program("/nonexistent/x", None),
            Err("does not exist".to_string())
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "not a program").expect("write");
        let plain = plain.to_string_lossy();
        assert_eq!(
            find_program(&plain, None),
            Err("is not an executable file".to_string())
        );
    }
}
