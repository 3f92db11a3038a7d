//! The preflight script: are a host's programs there, found as a task's command would find
//! them (the `PATH` of a non-interactive ssh session, or the path given)? One round trip per
//! host, with `sh` alone.

use prl_flow_backend::BackendError;

use super::Script;

/// Says `missing INDEX WHY` for each program that is not there, then `preflight done`.
const CHECK: &str = r#"# Says `missing $1 WHY` unless program $2 can be run: a name on PATH, or an absolute path
# to an executable file (a relative path depends on where the task starts: not checked).
check() {
	case $2 in
	/*)
		if [ ! -e "$2" ]; then say missing "$1" absent
		elif [ ! -f "$2" ] || [ ! -x "$2" ]; then say missing "$1" noexec
		fi ;;
	*/*) ;;
	*) command -v -- "$2" >/dev/null 2>&1 || say missing "$1" nopath ;;
	esac
}
"#;

/// The script that checks `programs` on one host.
pub fn programs(programs: &[String]) -> Result<String, BackendError> {
    let mut sc = Script::new();
    sc.line(CHECK);
    for (i, p) in programs.iter().enumerate() {
        sc.set("p", p)?;
        sc.line(&format!("check {i} \"$p\""));
    }
    sc.line("say preflight done");
    Ok(sc.text().to_string())
}

/// The programs the script found missing, each with why; `None` when it did not finish.
pub fn read(lines: &[String], programs: &[String]) -> Option<Vec<(String, String)>> {
    let mut missing = Vec::new();
    let mut done = false;
    for l in lines {
        let w: Vec<&str> = l.split(' ').collect();
        match w.as_slice() {
            ["missing", i, why] => {
                let Some(p) = i.parse::<usize>().ok().and_then(|i| programs.get(i)) else {
                    continue;
                };
                let why = match *why {
                    "absent" => "does not exist",
                    "noexec" => "is not an executable file",
                    _ => "is not on PATH (of a non-interactive ssh session)",
                };
                missing.push((p.clone(), why.to_string()));
            }
            ["preflight", "done"] => done = true,
            _ => {}
        }
    }
    done.then_some(missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_names_what_is_missing_and_nothing_else() {
        let progs: Vec<String> = [
            "sh",
            "no-such-program-anywhere",
            "/nonexistent/x",
            "./rel/x",
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
        assert_eq!(names, ["no-such-program-anywhere", "/nonexistent/x"]);
        assert!(missing[0].1.contains("PATH"));
        assert_eq!(missing[1].1, "does not exist");
    }
}
