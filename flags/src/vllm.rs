//! The `vllm serve` flag table: every option string vLLM 0.33's parser accepts, with how it
//! takes its value, the option it sets, its type and choices.
//!
//! The table's lines are `--long-name[ {a,b,...}]<TAB># kind=... dest=... [group=...]
//! [nargs=+|?] [type=...] [action=...] [default=<Python repr>] [short=-x] [hidden]`.
//! The parse is strict: a line it cannot read is an error the tests report, so a bad edit of
//! the data file fails CI rather than a deployment. [`table`] skips such lines.

use std::collections::HashMap;
use std::sync::OnceLock;

/// How a flag consumes argv, from the table's `kind=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Takes a value.
    Value,
    /// A bare switch that sets its option.
    Bool,
    /// A bare switch that clears it (`--disable-x`, `--no-x`).
    Negation,
}

/// How many values a [`Kind::Value`] flag takes, from the table's `nargs=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nargs {
    /// Exactly one.
    One,
    /// `nargs=+`: one or more.
    OneOrMore,
    /// `nargs=?`: one or none.
    Optional,
}

/// One line of the table.
#[derive(Debug)]
pub struct Flag {
    /// With its leading `--`.
    pub long: &'static str,
    /// The short spelling (`-tp`), if any.
    pub short: Option<&'static str>,
    pub kind: Kind,
    /// The option it sets (`enable_prefix_caching` for both `--enable-...` and `--no-...`).
    pub dest: &'static str,
    pub nargs: Nargs,
    /// The name of vLLM's converter (`int`, `human_readable_int`, `loads`, ...).
    pub ty: Option<&'static str>,
    /// The allowed values; empty when any value goes.
    pub choices: Vec<&'static str>,
    /// The flag may be repeated, each value appended (`action=_AppendAction`).
    pub append: bool,
    /// Not shown by `vllm serve --help`.
    pub hidden: bool,
}

impl Flag {
    /// The name without its leading `--`.
    pub fn name(&self) -> &'static str {
        self.long.trim_start_matches("--")
    }

    /// Options whose converter reads JSON take a structured value, written as compact JSON.
    pub fn takes_json(&self) -> bool {
        matches!(
            self.ty,
            Some(
                "loads"
                    | "_parse_type"
                    | "parse_dataclass"
                    | "union_dict_and_str"
                    | "_optional_type"
            )
        ) && self.nargs != Nargs::OneOrMore
    }

    /// What the flag's value must be, in words ("an integer").
    pub fn expected(&self) -> &'static str {
        match self.ty {
            Some("int") => "an integer",
            Some("float") => "a number",
            Some("human_readable_int") | Some("human_readable_int_or_auto") => {
                "a size (an integer or e.g. \"32k\")"
            }
            _ if self.takes_json() => "a value or a table",
            _ => "a value",
        }
    }

    /// Whether `text` is a value the flag accepts (among its choices, of its type); the
    /// error says why not.
    pub fn accepts(&self, text: &str) -> Result<(), String> {
        if !self.choices.is_empty() && !self.choices.contains(&text) {
            return Err(format!(
                "takes one of {}, not `{text}`",
                self.choices.join(", ")
            ));
        }
        let ok = match self.ty {
            Some("int") => text.parse::<i64>().is_ok(),
            Some("float") => text.parse::<f64>().is_ok(),
            Some("human_readable_int") => human_int(text),
            Some("human_readable_int_or_auto") => human_int(text) || text == "auto" || text == "-1",
            Some("loads") if text.starts_with('{') || text.starts_with('[') => {
                serde_json::from_str::<serde_json::Value>(text).is_ok()
            }
            _ => true,
        };
        if ok {
            Ok(())
        } else {
            Err(format!("takes {}, not `{text}`", self.expected()))
        }
    }
}

/// `1024`, `32k`, `1.5M`, `2g` (vLLM's human-readable integers).
fn human_int(text: &str) -> bool {
    let t = text.trim();
    let body = t
        .strip_suffix(|c: char| "kKmMgGtT".contains(c))
        .unwrap_or(t);
    !body.is_empty() && body.parse::<f64>().is_ok_and(|f| f >= 0.0)
}

/// The parsed table.
pub struct FlagTable {
    flags: Vec<Flag>,
    /// Long and short spellings.
    index: HashMap<&'static str, usize>,
}

impl FlagTable {
    /// Every flag, in the table's order.
    pub fn flags(&self) -> &[Flag] {
        &self.flags
    }

    /// The flag spelt `name` on a command line, long (`--port`) or short (`-tp`).
    pub fn lookup(&self, name: &str) -> Option<&Flag> {
        self.index.get(name).and_then(|&i| self.flags.get(i))
    }

    /// The flag of a long name, with or without its `--` (`port`, `--port`).
    pub fn get(&self, name: &str) -> Option<&Flag> {
        let long = format!("--{}", name.trim_start_matches("--"));
        self.lookup(&long).filter(|f| f.long == long)
    }

    /// The switch that sets `dest` to `on` (`--enable-x` / `--no-enable-x`), preferring a
    /// spelling that `--help` shows.
    pub fn switch_for(&self, dest: &str, on: bool) -> Option<&Flag> {
        let want = if on { Kind::Bool } else { Kind::Negation };
        let mut found: Option<&Flag> = None;
        for f in self
            .flags
            .iter()
            .filter(|f| f.dest == dest && f.kind == want)
        {
            if found.map_or(true, |g| g.hidden && !f.hidden) {
                found = Some(f);
            }
        }
        found
    }
}

/// The embedded table, parsed on first use (lines that fail to parse are skipped; the tests
/// assert there are none).
pub fn table() -> &'static FlagTable {
    static TABLE: OnceLock<FlagTable> = OnceLock::new();
    TABLE.get_or_init(|| parse(crate::VLLM_SERVE_TABLE).0)
}

/// Parses a table; returns it and one error per line it could not read.
pub fn parse(text: &'static str) -> (FlagTable, Vec<String>) {
    let mut flags = Vec::new();
    let mut errors = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match parse_line(line) {
            Ok(flag) => flags.push(flag),
            Err(e) => errors.push(format!("line {}: {e}: {line}", n + 1)),
        }
    }
    let mut index = HashMap::new();
    for (i, flag) in flags.iter().enumerate() {
        index.insert(flag.long, i);
        if let Some(short) = flag.short {
            index.insert(short, i);
        }
    }
    (FlagTable { flags, index }, errors)
}

fn parse_line(line: &'static str) -> Result<Flag, String> {
    let (head, attrs) = line
        .split_once('\t')
        .ok_or("no TAB between flag and attributes")?;
    let attrs = attrs
        .strip_prefix("# ")
        .ok_or("attributes must start with `# `")?;
    let (long, choices) = match head.split_once(' ') {
        Some((long, set)) => {
            let inner = set
                .strip_prefix('{')
                .and_then(|s| s.strip_suffix('}'))
                .ok_or("choices must be written {a,b,...}")?;
            (long, inner.split(',').collect::<Vec<_>>())
        }
        None => (head, Vec::new()),
    };
    if !long.starts_with("--") || long.len() < 3 {
        return Err(format!("`{long}` is not a long flag"));
    }
    let mut kind = None;
    let mut dest = None;
    let mut nargs = Nargs::One;
    let mut ty = None;
    let mut short = None;
    let mut append = false;
    let mut hidden = false;
    // `default=` values hold spaces (Python reprs), so once it starts only the trailing
    // `short=` and `hidden` tokens are read.
    let mut in_default = false;
    for tok in attrs.split(' ') {
        if let Some(s) = tok.strip_prefix("short=") {
            if !s.starts_with('-') || s.starts_with("--") {
                return Err(format!("bad short flag `{s}`"));
            }
            short = Some(s);
            continue;
        }
        if tok == "hidden" {
            hidden = true;
            continue;
        }
        if in_default {
            continue;
        }
        let (key, value) = tok
            .split_once('=')
            .ok_or_else(|| format!("attribute `{tok}` has no `=`"))?;
        match key {
            "kind" => {
                kind = Some(match value {
                    "value" => Kind::Value,
                    "bool" => Kind::Bool,
                    "bool-negation" => Kind::Negation,
                    other => return Err(format!("unknown kind `{other}`")),
                })
            }
            "dest" => dest = Some(value),
            "group" => {}
            "nargs" => {
                nargs = match value {
                    "+" => Nargs::OneOrMore,
                    "?" => Nargs::Optional,
                    other => return Err(format!("unknown nargs `{other}`")),
                }
            }
            "type" => ty = Some(value),
            "action" => append = value == "_AppendAction",
            "default" => in_default = true,
            other => return Err(format!("unknown attribute `{other}`")),
        }
    }
    Ok(Flag {
        long,
        short,
        kind: kind.ok_or("no kind=")?,
        dest: dest.ok_or("no dest=")?,
        nargs,
        ty,
        choices,
        append,
        hidden,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_parses_completely() {
        let (table, errors) = parse(crate::VLLM_SERVE_TABLE);
        assert!(
            errors.is_empty(),
            "bad lines in the flag table: {errors:#?}"
        );
        let lines = crate::VLLM_SERVE_TABLE
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .count();
        assert_eq!(table.flags.len(), lines);
        assert!(table.flags.len() > 400);
        for must in [
            "--port",
            "--host",
            "--kv-transfer-config",
            "--headless",
            "--model",
        ] {
            assert!(table.lookup(must).is_some(), "{must} missing");
        }
    }

    #[test]
    fn lookups() {
        let t = table();
        assert_eq!(
            t.get("max-model-len").map(|f| f.dest),
            Some("max_model_len")
        );
        assert_eq!(t.get("--port").map(|f| f.long), Some("--port"));
        assert_eq!(
            t.lookup("-tp").map(|f| f.long),
            Some("--tensor-parallel-size")
        );
        // A short spelling is not a long name.
        assert!(t.get("-tp").is_none());
        assert_eq!(
            t.switch_for("enable_chunked_prefill", false)
                .map(|f| f.long),
            Some("--disable-chunked-prefill")
        );
    }

    #[test]
    fn values_are_checked_by_type_and_choices() {
        let t = table();
        let flag = |n: &str| t.get(n).expect("known flag");
        assert!(flag("port").accepts("8000").is_ok());
        assert!(flag("port").accepts("x").is_err());
        assert!(flag("max-model-len").accepts("32k").is_ok());
        assert!(flag("max-model-len").accepts("auto").is_ok());
        assert!(flag("dtype").accepts("bfloat16").is_ok());
        assert!(flag("dtype").accepts("bfloat61").is_err());
        assert!(flag("compilation-config").takes_json());
        assert!(!flag("served-model-name").takes_json());
    }
}
