//! The preflight script: are a host's programs there, found as a task's command would find
//! them (the `PATH` of a non-interactive ssh session, or the path given)? One round trip per
//! host, with `sh` alone.

use prl_flow_backend::preflight::{read_missing, CHECK_SH};
use prl_flow_backend::BackendError;

use super::Script;

/// The script that checks `programs` on one host: `missing INDEX WHY` for each that is
/// not there, then `preflight done`.
pub fn programs(programs: &[String]) -> Result<String, BackendError> {
    let mut sc = Script::new();
    sc.line(CHECK_SH);
    for (i, p) in programs.iter().enumerate() {
        sc.set("p", p)?;
        sc.line(&format!("check {i} \"$p\""));
    }
    sc.line("say preflight done");
    Ok(sc.text().to_string())
}

/// The programs the script found missing, each with why; `None` when it did not finish.
pub fn read(lines: &[String], programs: &[String]) -> Option<Vec<(String, String)>> {
    if !lines.iter().any(|l| l == "preflight done") {
        return None;
    }
    let missing = read_missing(
        lines.iter().map(String::as_str),
        " (of a non-interactive ssh session)",
    );
    Some(
        missing
            .into_iter()
            .filter_map(|(i, why)| Some((programs.get(i)?.clone(), why)))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_names_what_is_missing_and_nothing_else() {
        let dir = tempfile::tempdir().expect("temp dir");
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "not a program").expect("write");
        let plain = plain.to_string_lossy().into_owned();
        let progs: Vec<String> = [
            "sh",
            "no-such-program-anywhere",
            "/nonexistent/x",
            "./rel/x",
            &plain,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(programs(&progs).expect("script"))
            .output()
            .expect("sh");
        let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("PRLFLOW ").map(String::from))
            .collect();
        let missing = read(&lines, &progs).expect("finished");
        let names: Vec<&str> = missing.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            names,
            ["no-such-program-anywhere", "/nonexistent/x", &plain]
        );
        assert!(missing[0].1.contains("PATH"));
        assert_eq!(missing[1].1, "does not exist");
        assert_eq!(missing[2].1, "is not an executable file");
    }
}
