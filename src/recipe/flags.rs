//! The command-line flags of the programs a recipe starts, as their real parsers accept
//! them: `vllm serve` 0.33, `vllm-router` 0.1.17 (its Python launcher), and Mooncake's
//! `mooncake_master`, `mooncake_client` and `mooncake_http_metadata_server`.
//!
//! The tables are the project's own copies under `data/`, embedded at build time and parsed
//! once. They serve two ends: `vllm_extra` keys are checked and turned into flags here
//! ([`VllmFlags::extra_args`]), and the tests check every rendered argv against them
//! ([`check_vllm_args`], [`check_router_args`], [`check_mooncake_args`]), so a template
//! that writes a flag the program would refuse fails a test rather than a cluster job.

use std::collections::HashMap;
use std::sync::OnceLock;

use toml_edit::{Item, Value};

const VLLM_TABLE: &str = include_str!("../../data/vllm-serve-flags.txt");
const ROUTER_TABLE: &str = include_str!("../../data/vllm-router-flags.txt");
const MOONCAKE_TABLE: &str = include_str!("../../data/mooncake-flags.txt");

/// How a `vllm serve` flag takes its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A bare switch that sets its option.
    Bool,
    /// A bare switch that clears it (`--disable-x`, `--no-x`).
    Negation,
    /// Takes a value.
    Value,
}

#[derive(Debug, Clone)]
pub struct VllmFlag {
    /// Without the leading `--`.
    pub name: String,
    /// The option it sets (`enable_prefix_caching` for both `--enable-...` and `--no-...`).
    pub dest: String,
    pub kind: Kind,
    pub choices: Vec<String>,
    pub nargs: Option<String>,
    pub ty: Option<String>,
    pub action: Option<String>,
    pub hidden: bool,
}

impl VllmFlag {
    fn repeated(&self) -> bool {
        self.action.as_deref().is_some_and(|a| a.contains("Append"))
    }
    fn many(&self) -> bool {
        matches!(self.nargs.as_deref(), Some("+") | Some("*"))
    }
    /// JSON-typed options take a table, written as compact JSON.
    fn takes_json(&self) -> bool {
        matches!(
            self.ty.as_deref(),
            Some(
                "loads"
                    | "_parse_type"
                    | "parse_dataclass"
                    | "union_dict_and_str"
                    | "_optional_type"
            )
        ) && !self.many()
    }
}

/// The `vllm serve` flag table.
pub struct VllmFlags {
    flags: Vec<VllmFlag>,
    by_name: HashMap<String, usize>,
}

/// The parsed `vllm serve` table (parsed on first use).
pub fn vllm() -> &'static VllmFlags {
    static TABLE: OnceLock<VllmFlags> = OnceLock::new();
    TABLE.get_or_init(|| VllmFlags::parse(VLLM_TABLE))
}

fn field<'a>(meta: &'a str, key: &str) -> Option<&'a str> {
    meta.split_whitespace()
        .find_map(|t| t.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// Splits `--name {a,b}\t# meta` into name, choices and meta.
fn split_line(line: &str) -> Option<(&str, Vec<String>, &str)> {
    let (head, meta) = line.split_once('\t')?;
    let meta = meta.trim_start_matches('#').trim();
    let mut parts = head.splitn(2, ' ');
    let name = parts.next()?.trim();
    let choices = parts
        .next()
        .map(|c| {
            c.trim()
                .trim_start_matches('{')
                .trim_end_matches('}')
                .split(',')
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    Some((name, choices, meta))
}

impl VllmFlags {
    fn parse(text: &str) -> Self {
        let mut flags = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let Some((name, choices, meta)) = split_line(line) else {
                continue;
            };
            let Some(name) = name.strip_prefix("--") else {
                continue;
            };
            let kind = match field(meta, "kind") {
                Some("bool") => Kind::Bool,
                Some("bool-negation") => Kind::Negation,
                _ => Kind::Value,
            };
            flags.push(VllmFlag {
                name: name.to_string(),
                dest: field(meta, "dest").unwrap_or(name).to_string(),
                kind,
                choices,
                nargs: field(meta, "nargs").map(str::to_string),
                ty: field(meta, "type").map(str::to_string),
                action: field(meta, "action").map(str::to_string),
                hidden: meta.split_whitespace().any(|t| t == "hidden"),
            });
        }
        let by_name = flags
            .iter()
            .enumerate()
            .map(|(i, f)| (f.name.clone(), i))
            .collect();
        Self { flags, by_name }
    }

    pub fn get(&self, name: &str) -> Option<&VllmFlag> {
        self.by_name
            .get(name.trim_start_matches("--"))
            .map(|&i| &self.flags[i])
    }

    /// The flag a `vllm_extra` key names: `max_model_len` and `max-model-len` are
    /// `--max-model-len` (vLLM's parser treats `_` and `-` alike).
    pub fn by_key(&self, key: &str) -> Option<&VllmFlag> {
        self.get(&key.trim_start_matches("--").replace('_', "-"))
    }

    /// The closest flag to a misspelt key, written as a key (`max_model_len`).
    pub fn suggest(&self, key: &str) -> Option<String> {
        let wanted = key.trim_start_matches("--").replace('-', "_");
        let names: Vec<String> = self
            .flags
            .iter()
            .filter(|f| !f.hidden)
            .map(|f| f.name.replace('-', "_"))
            .collect();
        super::doc::near(&wanted, names.iter().map(String::as_str))
    }

    /// The switch that sets `dest` to `on` (`--enable-x` / `--no-enable-x`), preferring a
    /// spelling that `--help` shows.
    pub fn switch_for(&self, dest: &str, on: bool) -> Option<&VllmFlag> {
        let want = if on { Kind::Bool } else { Kind::Negation };
        let mut found: Option<&VllmFlag> = None;
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

    /// The arguments one `vllm_extra` entry renders to, or why it cannot.
    pub fn extra_args(&self, key: &str, item: &Item) -> Result<Vec<String>, ExtraError> {
        let Some(flag) = self.by_key(key) else {
            return Err(ExtraError::Unknown {
                suggestion: self.suggest(key),
            });
        };
        let value = item.as_value();
        match flag.kind {
            Kind::Bool | Kind::Negation => {
                let Some(on) = value.and_then(Value::as_bool) else {
                    return Err(ExtraError::Value {
                        message: format!("is a switch, not {}", super::doc::kind_of(item)),
                        help: format!("write `{key} = true` (or `false`)"),
                    });
                };
                if on {
                    return Ok(vec![format!("--{}", flag.name)]);
                }
                // `key = false` asks for the opposite switch of the same option, if any.
                Ok(self
                    .switch_for(&flag.dest, flag.kind == Kind::Negation)
                    .map(|f| vec![format!("--{}", f.name)])
                    .unwrap_or_default())
            }
            Kind::Value => self.value_args(key, flag, item),
        }
    }

    fn value_args(
        &self,
        key: &str,
        flag: &VllmFlag,
        item: &Item,
    ) -> Result<Vec<String>, ExtraError> {
        let name = format!("--{}", flag.name);
        let value = item.as_value();
        if let Some(Value::Array(arr)) = value {
            if flag.many() || flag.repeated() {
                let mut texts = Vec::with_capacity(arr.len());
                for v in arr.iter() {
                    texts.push(scalar_text(key, flag, v)?);
                }
                if texts.is_empty() {
                    return Err(ExtraError::Value {
                        message: "is an empty list".to_string(),
                        help: format!("give at least one value, or drop `{key}`"),
                    });
                }
                if flag.repeated() {
                    return Ok(texts.into_iter().flat_map(|t| [name.clone(), t]).collect());
                }
                return Ok(std::iter::once(name).chain(texts).collect());
            }
        }
        let is_table = matches!(item, Item::Table(_) | Item::Value(Value::InlineTable(_)));
        if is_table || matches!(value, Some(Value::Array(_))) {
            if flag.takes_json() {
                let json = super::doc::to_json(item);
                return Ok(vec![name, json.to_string()]);
            }
            return Err(ExtraError::Value {
                message: format!("takes one value, not {}", super::doc::kind_of(item)),
                help: format!("write e.g. `{key} = \"...\"`"),
            });
        }
        if flag.nargs.as_deref() == Some("?") && value.and_then(Value::as_bool) == Some(true) {
            return Ok(vec![name]);
        }
        match value {
            Some(v) => Ok(vec![name, scalar_text(key, flag, v)?]),
            None => Err(ExtraError::Value {
                message: format!("takes a value, not {}", super::doc::kind_of(item)),
                help: format!("write e.g. `{key} = \"...\"`"),
            }),
        }
    }
}

/// Why a `vllm_extra` entry cannot be rendered.
#[derive(Debug, Clone, PartialEq)]
pub enum ExtraError {
    Unknown { suggestion: Option<String> },
    Value { message: String, help: String },
}

fn scalar_text(key: &str, flag: &VllmFlag, v: &Value) -> Result<String, ExtraError> {
    let bad = |what: &str, help: String| ExtraError::Value {
        message: format!("takes {}, not {what}", expected(flag)),
        help,
    };
    let text = match v {
        Value::String(s) => s.value().clone(),
        Value::Integer(i) => i.value().to_string(),
        Value::Float(f) => f.value().to_string(),
        Value::Boolean(_) => {
            return Err(bad(
                "a boolean",
                format!("write e.g. `{key} = {}`", example(flag)),
            ));
        }
        other => {
            return Err(bad(
                super::doc::value_kind(other),
                format!("write e.g. `{key} = {}`", example(flag)),
            ))
        }
    };
    if text.contains('\n') {
        return Err(ExtraError::Value {
            message: "has a line break in its value".to_string(),
            help: "write the value on one line".into(),
        });
    }
    if let Err(why) = check_value(flag, &text) {
        return Err(ExtraError::Value {
            message: why,
            help: if flag.choices.is_empty() {
                format!("write e.g. `{key} = {}`", example(flag))
            } else {
                match super::doc::near(&text, flag.choices.iter().map(String::as_str)) {
                    Some(near) => format!("did you mean `{near}`?"),
                    None => format!("choose one of: {}", flag.choices.join(", ")),
                }
            },
        });
    }
    Ok(text)
}

fn expected(flag: &VllmFlag) -> &'static str {
    match flag.ty.as_deref() {
        Some("int") => "an integer",
        Some("float") => "a number",
        Some("human_readable_int") | Some("human_readable_int_or_auto") => {
            "a size (an integer or e.g. \"32k\")"
        }
        _ if flag.takes_json() => "a value or a table",
        _ => "a value",
    }
}

fn example(flag: &VllmFlag) -> String {
    if let Some(c) = flag.choices.first() {
        return format!("\"{c}\"");
    }
    match flag.ty.as_deref() {
        Some("int") | Some("human_readable_int") | Some("human_readable_int_or_auto") => {
            "1024".into()
        }
        Some("float") => "0.9".into(),
        _ => "\"...\"".into(),
    }
}

/// Whether `text` is a value `flag` accepts.
fn check_value(flag: &VllmFlag, text: &str) -> Result<(), String> {
    if !flag.choices.is_empty() && !flag.choices.iter().any(|c| c == text) {
        return Err(format!(
            "takes one of {}, not `{text}`",
            flag.choices.join(", ")
        ));
    }
    let ok = match flag.ty.as_deref() {
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
        Err(format!("takes {}, not `{text}`", expected(flag)))
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

/// Checks the arguments of a rendered `vllm serve` command that follow the model: every
/// flag known, every value of its kind and among its choices. Returns the problems.
pub fn check_vllm_args(args: &[String]) -> Vec<String> {
    let table = vllm();
    let mut errors = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        let Some(flag) = a.strip_prefix("--").and_then(|_| table.get(a)) else {
            errors.push(format!("`{a}` is not a `vllm serve` flag"));
            while i < args.len() && !args[i].starts_with("--") {
                i += 1;
            }
            continue;
        };
        let start = i;
        while i < args.len() && !args[i].starts_with("--") {
            i += 1;
        }
        let values = &args[start..i];
        let arity_ok = match flag.kind {
            Kind::Bool | Kind::Negation => values.is_empty(),
            Kind::Value => match flag.nargs.as_deref() {
                Some("+") => !values.is_empty(),
                Some("*") => true,
                Some("?") => values.len() <= 1,
                _ => values.len() == 1,
            },
        };
        if !arity_ok {
            errors.push(format!("`{a}` got {} value(s): {values:?}", values.len()));
            continue;
        }
        for v in values {
            if let Err(why) = check_value(flag, v) {
                errors.push(format!("`{a}` {why}"));
            }
        }
    }
    errors
}

/// One `vllm-router` flag of the Python launcher.
#[derive(Debug, Clone)]
struct RouterFlag {
    bool: bool,
    choices: Vec<String>,
    nargs: Option<String>,
}

fn router() -> &'static HashMap<String, RouterFlag> {
    static TABLE: OnceLock<HashMap<String, RouterFlag>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut map = HashMap::new();
        for line in ROUTER_TABLE.lines() {
            if line.starts_with('#') {
                continue;
            }
            let Some((name, braces, meta)) = split_line(line) else {
                continue;
            };
            // The pip package's `vllm-router` is the Python launcher: its flags are the
            // `cli=both` and `cli=python` ones.
            if !matches!(field(meta, "cli"), Some("both" | "python")) || !name.starts_with("--") {
                continue;
            }
            let choices = field(meta, "python_choices")
                .map(|c| c.split(',').map(str::to_string).collect())
                .unwrap_or(braces);
            let nargs = field(meta, "python_nargs").map(str::to_string).or_else(|| {
                meta.split_whitespace()
                    .any(|t| t == "repeatable")
                    .then(|| "1".to_string())
            });
            map.insert(
                name.to_string(),
                RouterFlag {
                    bool: field(meta, "kind") == Some("bool"),
                    choices,
                    nargs,
                },
            );
        }
        map
    })
}

/// Checks a rendered `vllm-router` argv (without the program): every flag known to the
/// Python launcher, values in their choices, `--prefill URL [BOOTSTRAP_PORT|none]`.
pub fn check_router_args(args: &[String]) -> Vec<String> {
    let table = router();
    let mut errors = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        let Some(flag) = table.get(a.as_str()) else {
            errors.push(format!("`{a}` is not a `vllm-router` flag"));
            while i < args.len() && !args[i].starts_with("--") {
                i += 1;
            }
            continue;
        };
        let start = i;
        while i < args.len() && !args[i].starts_with("--") {
            i += 1;
        }
        let values = &args[start..i];
        let ok = if flag.bool {
            values.is_empty()
        } else {
            match flag.nargs.as_deref() {
                Some("*") => true,
                Some("+") if a == "--prefill" => {
                    (1..=2).contains(&values.len())
                        && values
                            .get(1)
                            .map_or(true, |b| b == "none" || b.parse::<u16>().is_ok())
                }
                Some("+") => !values.is_empty(),
                _ => values.len() == 1,
            }
        };
        if !ok {
            errors.push(format!("`{a}` got {} value(s): {values:?}", values.len()));
            continue;
        }
        if !flag.choices.is_empty() {
            for v in values {
                if !flag.choices.contains(v) {
                    errors.push(format!(
                        "`{a}`: `{v}` is not one of {}",
                        flag.choices.join(", ")
                    ));
                }
            }
        }
    }
    errors
}

/// The gflags of a Mooncake program: name → type (`bool`, `int32`, `string`, ...).
fn mooncake(program: &str) -> Option<&'static HashMap<String, String>> {
    static TABLE: OnceLock<HashMap<String, HashMap<String, String>>> = OnceLock::new();
    TABLE
        .get_or_init(|| {
            let mut all: HashMap<String, HashMap<String, String>> = HashMap::new();
            let mut section = String::new();
            for line in MOONCAKE_TABLE.lines() {
                if let Some(rest) = line.strip_prefix('[') {
                    section = rest.split(']').next().unwrap_or("").to_string();
                    continue;
                }
                if line.starts_with('#') {
                    continue;
                }
                let Some((name, choices, meta)) = split_line(line) else {
                    continue;
                };
                let Some(name) = name.strip_prefix("--") else {
                    continue;
                };
                let ty = if choices.is_empty() {
                    field(meta, "type").unwrap_or("string").to_string()
                } else {
                    format!("choice:{}", choices.join(","))
                };
                all.entry(section.clone())
                    .or_default()
                    .insert(name.to_string(), ty);
            }
            all
        })
        .get(program)
}

/// glog's own flags, which every Mooncake C++ binary accepts but the table (made from the
/// programs' `--help`) does not list.
const GLOG_FLAGS: &[&str] = &[
    "logtostderr",
    "alsologtostderr",
    "v",
    "log_dir",
    "minloglevel",
];

/// Checks a rendered Mooncake argv (without the program) against the program's flags:
/// gflags as `--name=value` (`mooncake_master`, `mooncake_client`), argparse as
/// `--name value` (`mooncake_http_metadata_server`).
pub fn check_mooncake_args(program: &str, args: &[String]) -> Vec<String> {
    let Some(table) = mooncake(program) else {
        return vec![format!(
            "`{program}` is not a Mooncake program of the table"
        )];
    };
    let gflags = program != "mooncake_http_metadata_server";
    let mut errors = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        let Some(body) = a.strip_prefix("--") else {
            errors.push(format!("`{a}` is not a flag"));
            continue;
        };
        let (name, value) = if gflags {
            match body.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (body, None),
            }
        } else {
            let v = args.get(i).filter(|v| !v.starts_with("--")).cloned();
            if v.is_some() {
                i += 1;
            }
            (body, v)
        };
        if gflags && GLOG_FLAGS.contains(&name) {
            continue;
        }
        let Some(ty) = table.get(name) else {
            errors.push(format!("`--{name}` is not a `{program}` flag"));
            continue;
        };
        let ok = match (ty.as_str(), value.as_deref()) {
            ("bool", None) => true,
            ("bool", Some(v)) => v == "true" || v == "false",
            (t, Some(v)) if t.starts_with("int") || t.starts_with("uint") => {
                v.parse::<i64>().is_ok()
            }
            ("double", Some(v)) => v.parse::<f64>().is_ok(),
            (t, Some(v)) if t.starts_with("choice:") => t[7..].split(',').any(|c| c == v),
            (_, Some(_)) => true,
            (_, None) => false,
        };
        if !ok {
            errors.push(format!("`{a}` is not a valid `--{name}` ({ty})"));
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(src: &str) -> Item {
        let doc = toml_edit::ImDocument::parse(format!("x = {src}")).expect("toml");
        doc.as_table().get("x").cloned().expect("x")
    }

    #[test]
    fn tables_parse() {
        assert!(vllm().flags.len() > 400);
        assert_eq!(
            vllm().by_key("max_model_len").map(|f| f.dest.as_str()),
            Some("max_model_len")
        );
        assert!(router().contains_key("--worker-urls"));
        assert!(mooncake("mooncake_master").is_some_and(|t| t.contains_key("rpc_port")));
    }

    #[test]
    fn extra_values_render_as_vllm_flags() {
        let t = vllm();
        assert_eq!(
            t.extra_args("max_model_len", &item("32768")),
            Ok(vec!["--max-model-len".into(), "32768".into()])
        );
        assert_eq!(
            t.extra_args("max_model_len", &item("\"32k\"")),
            Ok(vec!["--max-model-len".into(), "32k".into()])
        );
        assert_eq!(
            t.extra_args("enforce_eager", &item("true")),
            Ok(vec!["--enforce-eager".into()])
        );
        assert_eq!(
            t.extra_args("enforce_eager", &item("false")),
            Ok(vec!["--no-enforce-eager".into()])
        );
        assert_eq!(
            t.extra_args("enable_chunked_prefill", &item("false")),
            Ok(vec!["--disable-chunked-prefill".into()])
        );
        assert_eq!(
            t.extra_args("disable_log_requests", &item("true")),
            Ok(vec!["--disable-log-requests".into()])
        );
        assert_eq!(
            t.extra_args(
                "compilation_config",
                &item("{ cudagraph_mode = \"FULL_DECODE_ONLY\" }")
            ),
            Ok(vec![
                "--compilation-config".into(),
                "{\"cudagraph_mode\":\"FULL_DECODE_ONLY\"}".into()
            ])
        );
        assert_eq!(
            t.extra_args("served_model_name", &item("[\"a\", \"b\"]")),
            Ok(vec!["--served-model-name".into(), "a".into(), "b".into()])
        );
        assert_eq!(
            t.extra_args("middleware", &item("[\"a\", \"b\"]")),
            Ok(vec![
                "--middleware".into(),
                "a".into(),
                "--middleware".into(),
                "b".into()
            ])
        );
    }

    #[test]
    fn bad_extra_values_say_why() {
        let t = vllm();
        assert_eq!(
            t.extra_args("max_model_lenn", &item("1")),
            Err(ExtraError::Unknown {
                suggestion: Some("max_model_len".into())
            })
        );
        assert!(
            matches!(t.extra_args("dtype", &item("\"bfloat61\"")), Err(ExtraError::Value { help, .. }) if help.contains("bfloat16"))
        );
        assert!(t.extra_args("max_num_seqs", &item("\"many\"")).is_err());
        assert!(t.extra_args("enforce_eager", &item("1")).is_err());
        assert!(t
            .extra_args("gpu_memory_utilization", &item("true"))
            .is_err());
    }

    #[test]
    fn rendered_argv_checks_catch_mistakes() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(check_vllm_args(&args(&["--port", "8100", "--enforce-eager"])).is_empty());
        assert_eq!(check_vllm_args(&args(&["--prot", "8100"])).len(), 1);
        assert_eq!(check_vllm_args(&args(&["--port", "x"])).len(), 1);
        assert_eq!(check_vllm_args(&args(&["--enforce-eager", "1"])).len(), 1);
        assert!(check_router_args(&args(&[
            "--prefill",
            "http://a:1",
            "none",
            "--decode",
            "http://b:2"
        ]))
        .is_empty());
        assert_eq!(
            check_router_args(&args(&["--policy", "rendezvous_hash"])).len(),
            1
        );
        assert!(check_mooncake_args(
            "mooncake_master",
            &args(&["--rpc_port=50051", "--logtostderr"])
        )
        .is_empty());
        assert_eq!(
            check_mooncake_args("mooncake_client", &args(&["--port=x"])).len(),
            1
        );
        assert!(check_mooncake_args(
            "mooncake_http_metadata_server",
            &args(&["--host", "h", "--port", "8080"])
        )
        .is_empty());
    }
}
