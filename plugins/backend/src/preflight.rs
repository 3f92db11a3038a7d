//! The shell side of [`crate::Backend::preflight`] for backends that run `sh` on their
//! nodes: a `check` function that says which programs cannot be run, and how its answer is
//! read. The ssh and SLURM backends put it in their scripts.

/// The shell function `check INDEX PROGRAM`: says `PRLFLOW missing INDEX WHY` unless the
/// program can be run, found as `exec` finds it: a name on `PATH`, or an absolute path to
/// an executable file. A relative path depends on where the task starts: not checked.
pub const CHECK_SH: &str = r#"check() {
	case $2 in
	/*)
		if [ ! -e "$2" ]; then printf 'PRLFLOW missing %s absent\n' "$1"
		elif [ ! -f "$2" ] || [ ! -x "$2" ]; then printf 'PRLFLOW missing %s noexec\n' "$1"
		fi ;;
	*/*) ;;
	*) command -v -- "$2" >/dev/null 2>&1 || printf 'PRLFLOW missing %s nopath\n' "$1" ;;
	esac
}
"#;

/// The programs `check` said are missing (each line without its `PRLFLOW ` mark): their
/// indexes, each with why in words; `path` ends the words of a program not on `PATH`
/// (`is not on PATH` + `path`).
pub fn read_missing<'a>(
    lines: impl IntoIterator<Item = &'a str>,
    path: &str,
) -> Vec<(usize, String)> {
    lines
        .into_iter()
        .filter_map(|l| {
            let mut w = l.split(' ');
            if w.next() != Some("missing") {
                return None;
            }
            let i = w.next()?.parse().ok()?;
            let why = match w.next()? {
                "absent" => "does not exist".to_string(),
                "noexec" => "is not an executable file".to_string(),
                _ => format!("is not on PATH{path}"),
            };
            Some((i, why))
        })
        .collect()
}
