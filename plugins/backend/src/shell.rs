//! Handing a task's command and environment to a shell on another machine: one word per
//! value ([`quote`]), and the environment as a file of `export` lines ([`env_file`]) that a
//! wrapper sources and removes before the command starts, so no value is ever on a command
//! line (where `ps` shows it to every user of the host).

use std::collections::BTreeMap;

use crate::BackendError;

/// One word for a POSIX shell. Text with a NUL byte cannot be passed to a program at all.
pub fn quote(s: &str) -> Result<String, BackendError> {
    shlex::try_quote(s).map(|c| c.into_owned()).map_err(|_| {
        BackendError::new(format!(
            "cannot pass text with a NUL byte to a shell: {s:?}"
        ))
    })
}

/// The environment file's text: one `export NAME=VALUE` line per variable, each value
/// quoted. Names must be portable shell names, which [`is_env_name`] checks.
pub fn env_file(env: &BTreeMap<String, String>) -> Result<String, BackendError> {
    let mut text = String::new();
    for (k, v) in env {
        if !is_env_name(k) {
            return Err(BackendError::new(format!(
                "`{k}` cannot be set on a host: names of environment variables there are letters, digits and `_`"
            )));
        }
        text.push_str(&format!("export {k}={}\n", quote(v)?));
    }
    Ok(text)
}

/// A name a POSIX shell can export: letters, digits and `_`, not starting with a digit.
pub fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_values() {
        assert!(is_env_name("HF_TOKEN") && is_env_name("_x1"));
        assert!(!is_env_name("1X") && !is_env_name("A B") && !is_env_name(""));
        let env: BTreeMap<String, String> = [("A".to_string(), "it's $x".to_string())].into();
        let text = env_file(&env).expect("env");
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{text}printf %s \"$A\""))
            .output()
            .expect("sh");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "it's $x", "{text}");
        let bad: BTreeMap<String, String> = [("A B".to_string(), "v".to_string())].into();
        assert!(env_file(&bad).is_err());
        assert!(quote("a\0b").is_err());
    }
}
