//! `vllm serve` argument parsing, modelled on vLLM 0.33.
//!
//! Real `vllm serve` runs argv through two layers, and the mock copies both so that a command
//! line it accepts is one vLLM accepts, and an error it prints is the one vLLM would print:
//!
//! 1. vLLM's `FlexibleArgumentParser` rewrites argv first: `-O3`, `-O=3` and `-O 3` become
//!    `--optimization-level`, `_` in a long flag's name becomes `-` (only in the name, up to
//!    the first `.` or `=`), and dotted sub-keys (`--kv-transfer-config.kv_role kv_producer`,
//!    `--x.key+ a,b` for a list) are gathered into one JSON object per flag and appended at the
//!    *end* of argv. Being appended, that object replaces, not merges with, a plain
//!    `--kv-transfer-config '{...}'` given earlier: argparse keeps the last value.
//! 2. Python's argparse then walks argv left to right. A value error (`invalid int value`,
//!    `invalid choice`, `expected one argument`) stops the parse at once; unknown options and
//!    stray positionals are collected and reported together at the end as
//!    `unrecognized arguments`, which is why a value error wins over an earlier unknown flag.
//!
//! The flag list is `data/vllm-serve-flags.txt`, compiled in with `include_str!` so that the
//! product never reads a file at run time. One deliberate difference from the real parser:
//! argparse's `allow_abbrev` is on in vLLM, so `--max-model` would be taken as
//! `--max-model-len`. The mock demands exact names, because a deployment that only works
//! thanks to an abbreviation breaks the day vLLM adds a flag sharing that prefix.

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

use serde_json::{Map, Value as Json};

pub(crate) const USAGE: &str = "usage: vllm serve [model_tag] [options]";
const PROG: &str = "vllm serve";
const TABLE_TEXT: &str = include_str!("../../data/vllm-serve-flags.txt");

/// How a flag consumes argv, from the table's `kind=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Value,
    Bool,
    BoolNegation,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Nargs {
    One,
    OneOrMore,
    Optional,
}

/// One line of the flag table.
#[derive(Debug)]
pub(crate) struct FlagSpec {
    pub(crate) long: &'static str,
    pub(crate) short: Option<&'static str>,
    pub(crate) kind: Kind,
    pub(crate) dest: &'static str,
    pub(crate) nargs: Nargs,
    pub(crate) ty: Option<&'static str>,
    pub(crate) choices: Option<Vec<&'static str>>,
    pub(crate) append: bool,
}

/// What a raw string becomes. Derived from the table's `type=` because the table records
/// Python converter names, not types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Conv {
    Str,
    /// `_optional_type(str)`: "" and "None" mean None.
    OptionalStr,
    Int,
    Float,
    HumanInt,
    HumanIntOrAuto,
    /// JSON; `optional` adds the "" / "None" spellings of None.
    Json {
        optional: bool,
    },
}

impl FlagSpec {
    /// argparse names an action by all its option strings joined with `/`; vLLM adds the long
    /// spelling first.
    fn display(&self) -> String {
        match self.short {
            Some(short) => format!("{}/{}", self.long, short),
            None => self.long.to_string(),
        }
    }

    pub(crate) fn conv(&self) -> Conv {
        match self.ty {
            Some("int") => Conv::Int,
            Some("float") => Conv::Float,
            Some("human_readable_int") => Conv::HumanInt,
            Some("human_readable_int_or_auto") => Conv::HumanIntOrAuto,
            Some("loads" | "parse_dataclass" | "_parse_type") => Conv::Json { optional: false },
            // Config objects (`--kv-transfer-config`, `--speculative-config`, ...) are
            // `optional_type(json.loads)`; other optional values are plain strings as far as
            // the table can tell.
            Some("_optional_type") if self.dest.ends_with("_config") => {
                Conv::Json { optional: true }
            }
            Some("_optional_type") => Conv::OptionalStr,
            _ => Conv::Str,
        }
    }

    fn converter_name(&self) -> &'static str {
        self.ty.unwrap_or("str")
    }
}

pub(crate) struct Table {
    pub(crate) flags: Vec<FlagSpec>,
    index: HashMap<&'static str, usize>,
}

impl Table {
    pub(crate) fn lookup(&self, name: &str) -> Option<&FlagSpec> {
        self.index.get(name).and_then(|&i| self.flags.get(i))
    }
}

/// The embedded table. Lines that fail to parse are skipped here; the unit tests assert there
/// are none, so a bad edit of the data file fails CI rather than a deployment.
pub(crate) fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| parse_table(TABLE_TEXT).0)
}

pub(crate) fn parse_table(text: &'static str) -> (Table, Vec<String>) {
    let mut flags = Vec::new();
    let mut errors = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match parse_table_line(line) {
            Ok(spec) => flags.push(spec),
            Err(e) => errors.push(format!("line {}: {e}: {line}", n + 1)),
        }
    }
    let mut index = HashMap::new();
    for (i, spec) in flags.iter().enumerate() {
        index.insert(spec.long, i);
        if let Some(short) = spec.short {
            index.insert(short, i);
        }
    }
    (Table { flags, index }, errors)
}

fn parse_table_line(line: &'static str) -> Result<FlagSpec, String> {
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
            (long, Some(inner.split(',').collect::<Vec<_>>()))
        }
        None => (head, None),
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
        if tok == "hidden" || in_default {
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
                    "bool-negation" => Kind::BoolNegation,
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
    Ok(FlagSpec {
        long,
        short,
        kind: kind.ok_or("no kind=")?,
        dest: dest.ok_or("no dest=")?,
        nargs,
        ty,
        choices,
        append,
    })
}

/// A parsed value, as argparse would have stored it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum ArgValue {
    Bool(bool),
    Str(String),
    Int(i64),
    Float(f64),
    Json(Json),
    None,
    List(Vec<ArgValue>),
}

impl ArgValue {
    /// Python's repr, for the `non-default args` log line.
    fn py(&self) -> String {
        match self {
            ArgValue::Bool(true) => "True".into(),
            ArgValue::Bool(false) => "False".into(),
            ArgValue::Str(s) => py_repr(s),
            ArgValue::Int(i) => i.to_string(),
            ArgValue::Float(f) => format!("{f:?}"),
            ArgValue::Json(j) => j.to_string(),
            ArgValue::None => "None".into(),
            ArgValue::List(items) => {
                let inner: Vec<String> = items.iter().map(ArgValue::py).collect();
                format!("[{}]", inner.join(", "))
            }
        }
    }
}

/// The result of a successful parse: the positional model tag and one value per dest.
#[derive(Debug, Default)]
pub(crate) struct ServeArgs {
    pub(crate) model_tag: Option<String>,
    values: BTreeMap<&'static str, ArgValue>,
    order: Vec<&'static str>,
    /// Things vLLM would log a warning about (duplicate dotted keys, --model next to a tag).
    pub(crate) warnings: Vec<String>,
}

impl ServeArgs {
    pub(crate) fn get(&self, dest: &str) -> Option<&ArgValue> {
        self.values.get(dest)
    }

    pub(crate) fn str(&self, dest: &str) -> Option<&str> {
        match self.get(dest) {
            Some(ArgValue::Str(s)) => Some(s),
            _ => None,
        }
    }

    pub(crate) fn int(&self, dest: &str) -> Option<i64> {
        match self.get(dest) {
            Some(ArgValue::Int(i)) => Some(*i),
            _ => None,
        }
    }

    pub(crate) fn flag(&self, dest: &str) -> Option<bool> {
        match self.get(dest) {
            Some(ArgValue::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    /// A string or list of strings (`nargs=+`) as a Vec; empty when unset or None.
    pub(crate) fn strings(&self, dest: &str) -> Vec<String> {
        match self.get(dest) {
            Some(ArgValue::Str(s)) => vec![s.clone()],
            Some(ArgValue::List(items)) => items
                .iter()
                .filter_map(|v| match v {
                    ArgValue::Str(s) => Some(s.clone()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    pub(crate) fn json(&self, dest: &str) -> Option<&Json> {
        match self.get(dest) {
            Some(ArgValue::Json(j)) => Some(j),
            _ => None,
        }
    }

    fn set(&mut self, spec: &FlagSpec, value: ArgValue) {
        if !self.order.contains(&spec.dest) {
            self.order.push(spec.dest);
        }
        if spec.append {
            let mut items = match self.values.remove(spec.dest) {
                Some(ArgValue::List(items)) => items,
                _ => Vec::new(),
            };
            items.push(value);
            self.values.insert(spec.dest, ArgValue::List(items));
        } else {
            self.values.insert(spec.dest, value);
        }
    }

    /// `{'model_tag': 'x', 'port': 8001}` as vLLM logs it at start.
    pub(crate) fn non_default_summary(&self) -> String {
        let mut parts = Vec::new();
        if let Some(tag) = &self.model_tag {
            parts.push(format!("'model_tag': {}", py_repr(tag)));
        }
        for dest in &self.order {
            if let Some(v) = self.values.get(dest) {
                parts.push(format!("'{dest}': {}", v.py()));
            }
        }
        format!("{{{}}}", parts.join(", "))
    }
}

#[derive(Debug)]
pub(crate) enum Parsed {
    Serve(ServeArgs),
    Help,
}

/// An argparse error; `render` gives the two lines argparse prints before exiting with 2.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ArgError(pub(crate) String);

impl ArgError {
    pub(crate) fn render(&self) -> String {
        format!("{USAGE}\n{PROG}: error: {}\n", self.0)
    }
}

pub(crate) fn help_text() -> String {
    format!(
        "{USAGE}\n\n\
         Start the vLLM OpenAI-compatible API server.\n\
         This is prl-flow's mock engine: it parses the flags of vLLM 0.33 `vllm serve` exactly,\n\
         serves the OpenAI API with made-up text, and does no GPU work.\n\n\
         positional arguments:\n  \
         model_tag             The model tag to serve (default: Qwen/Qwen3-0.6B)\n\n\
         options:\n  \
         -h, --help            show this help message and exit\n  \
         --host HOST           address to bind (mock default 127.0.0.1)\n  \
         --port PORT           HTTP port (default 8000)\n  \
         ... and the other {} flags of `vllm serve` (see `vllm serve --help=all`).\n\n\
         mock-only environment:\n  \
         PRL_MOCK_STARTUP_DELAY=3s     bind the HTTP port only after this long\n  \
         PRL_MOCK_FAIL=start|hang|after:10s  fail to start, never get ready, or crash later\n",
        table().flags.len().saturating_sub(2)
    )
}

/// Parses `vllm serve`'s arguments (everything after `serve`; a leading `serve` is tolerated so
/// that `prl-flow mock-engine` can stand in for the `vllm` executable itself).
pub(crate) fn parse(argv: &[String]) -> Result<Parsed, ArgError> {
    let argv = match argv.split_first() {
        Some((first, rest)) if first == "serve" => rest,
        _ => argv,
    };
    let mut warnings = Vec::new();
    let toks = preprocess(argv, &mut warnings)?;
    let mut parsed = Parser { table: table() }.run(&toks)?;
    if let Parsed::Serve(args) = &mut parsed {
        args.warnings.extend(warnings);
    }
    Ok(parsed)
}

/// Layer 1: vLLM's FlexibleArgumentParser rewrites.
fn preprocess(argv: &[String], warnings: &mut Vec<String>) -> Result<Vec<String>, ArgError> {
    let mut out: Vec<String> = Vec::new();
    // Insertion-ordered: the dicts are appended in the order their flags first appeared.
    let mut dicts: Vec<(String, Map<String, Json>)> = Vec::new();
    let mut i = 0;
    while let Some(arg) = argv.get(i) {
        i += 1;
        if arg == "--" {
            out.push(arg.clone());
            out.extend(argv[i..].iter().cloned());
            break;
        }
        if arg == "-O" {
            out.push("--optimization-level".into());
            continue;
        }
        if let Some(rest) = arg.strip_prefix("-O") {
            if !rest.starts_with('.') {
                let level = rest.strip_prefix('=').unwrap_or(rest);
                out.push(format!("--optimization-level={level}"));
                continue;
            }
        }
        let arg = normalize_underscores(arg);
        let (key, inline) = match arg.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        let dotted = key.starts_with('-') && key.contains('.') && !is_negative_number(&key);
        if !dotted {
            out.push(arg);
            continue;
        }
        let value = match inline {
            Some(v) => v,
            None => match argv.get(i) {
                Some(v) => {
                    i += 1;
                    v.clone()
                }
                None => return Err(ArgError(format!("argument {key}: expected one argument"))),
            },
        };
        let (key, value) = match key.strip_suffix('+') {
            Some(k) => (
                k.to_string(),
                Json::Array(value.split(',').map(|s| Json::String(s.into())).collect()),
            ),
            None => (
                key.clone(),
                serde_json::from_str(&value).unwrap_or(Json::String(value)),
            ),
        };
        let mut path = key.split('.');
        let base = path.next().unwrap_or_default().to_string();
        let path: Vec<&str> = path.collect();
        let slot = match dicts.iter().position(|(b, _)| *b == base) {
            Some(p) => p,
            None => {
                dicts.push((base.clone(), Map::new()));
                dicts.len() - 1
            }
        };
        if let Some((_, map)) = dicts.get_mut(slot) {
            if insert_nested(map, &path, value) {
                warnings.push(format!("Found duplicate keys {key}"));
            }
        }
    }
    for (base, map) in dicts {
        out.push(base);
        out.push(Json::Object(map).to_string());
    }
    Ok(out)
}

/// `--max_model_len=4_096` → `--max-model-len=4_096`: only the flag name, up to `.` or `=`.
fn normalize_underscores(arg: &str) -> String {
    let Some(rest) = arg.strip_prefix("--") else {
        return arg.to_string();
    };
    let end = rest.find(['.', '=']).unwrap_or(rest.len());
    let (name, tail) = rest.split_at(end);
    format!("--{}{tail}", name.replace('_', "-"))
}

/// Inserts `value` at `path` inside `map`; returns true when it replaced something.
fn insert_nested(map: &mut Map<String, Json>, path: &[&str], value: Json) -> bool {
    match path {
        [] => false,
        [last] => map.insert((*last).to_string(), value).is_some(),
        [first, rest @ ..] => {
            let entry = map
                .entry((*first).to_string())
                .or_insert_with(|| Json::Object(Map::new()));
            if !entry.is_object() {
                *entry = Json::Object(Map::new());
            }
            match entry {
                Json::Object(inner) => insert_nested(inner, rest, value),
                _ => false,
            }
        }
    }
}

/// argparse's `_negative_number_matcher`: `^-\d+$|^-\d*\.\d+$`.
fn is_negative_number(s: &str) -> bool {
    let Some(rest) = s.strip_prefix('-') else {
        return false;
    };
    let all_digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    match rest.split_once('.') {
        None => all_digits(rest),
        Some((int, frac)) => (int.is_empty() || all_digits(int)) && all_digits(frac),
    }
}

enum Token<'a> {
    Positional,
    Help,
    Known(&'static FlagSpec, Option<&'a str>),
    Unknown,
}

struct Parser {
    table: &'static Table,
}

impl Parser {
    /// argparse's `_parse_optional`, minus abbreviations.
    fn classify<'a>(&self, arg: &'a str) -> Token<'a> {
        if arg == "-h" || arg == "--help" || arg.starts_with("--help=") {
            return Token::Help;
        }
        if !arg.starts_with('-') || arg.len() == 1 {
            return Token::Positional;
        }
        if let Some(spec) = self.table.lookup(arg) {
            return Token::Known(spec, None);
        }
        if let Some((name, value)) = arg.split_once('=') {
            if let Some(spec) = self.table.lookup(name) {
                return Token::Known(spec, Some(value));
            }
        }
        // A two-character short option takes its value glued on: `-qawq`.
        if !arg.starts_with("--") {
            if let (Some(head), Some(tail)) = (arg.get(..2), arg.get(2..)) {
                if let Some(spec) = self.table.lookup(head) {
                    if spec.short == Some(head) {
                        return Token::Known(spec, Some(tail));
                    }
                }
            }
        }
        if is_negative_number(arg) || arg.contains(' ') {
            return Token::Positional;
        }
        Token::Unknown
    }

    fn is_value(&self, arg: &str) -> bool {
        arg != "--" && matches!(self.classify(arg), Token::Positional)
    }

    fn run(&self, toks: &[String]) -> Result<Parsed, ArgError> {
        let mut args = ServeArgs::default();
        let mut extras: Vec<&str> = Vec::new();
        let mut positional_only = false;
        let mut i = 0;
        while let Some(arg) = toks.get(i) {
            i += 1;
            let token = if positional_only {
                Token::Positional
            } else if arg == "--" {
                positional_only = true;
                continue;
            } else {
                self.classify(arg)
            };
            match token {
                Token::Help => return Ok(Parsed::Help),
                Token::Positional => {
                    if args.model_tag.is_none() {
                        args.model_tag = Some(arg.clone());
                    } else {
                        extras.push(arg);
                    }
                }
                Token::Unknown => extras.push(arg),
                Token::Known(spec, explicit) => {
                    let err = |msg: String| ArgError(format!("argument {}: {msg}", spec.display()));
                    if spec.kind != Kind::Value {
                        if let Some(x) = explicit {
                            return Err(err(format!("ignored explicit argument {}", py_repr(x))));
                        }
                        args.set(spec, ArgValue::Bool(spec.kind == Kind::Bool));
                        continue;
                    }
                    let mut raw: Vec<&str> = Vec::new();
                    if let Some(x) = explicit {
                        raw.push(x);
                    } else {
                        while let Some(next) = toks.get(i) {
                            let want_more = raw.is_empty() || spec.nargs == Nargs::OneOrMore;
                            if !want_more || !self.is_value(next) {
                                break;
                            }
                            raw.push(next);
                            i += 1;
                        }
                    }
                    let value = match (spec.nargs, raw.as_slice()) {
                        (Nargs::One, []) => return Err(err("expected one argument".into())),
                        (Nargs::OneOrMore, []) => {
                            return Err(err("expected at least one argument".into()))
                        }
                        // `--hf-token` alone means "use the cached token" (argparse const).
                        (Nargs::Optional, []) => ArgValue::Bool(true),
                        (Nargs::One | Nargs::Optional, [one, ..]) => {
                            convert(spec, one).map_err(err)?
                        }
                        (Nargs::OneOrMore, many) => ArgValue::List(
                            many.iter()
                                .map(|r| convert(spec, r))
                                .collect::<Result<Vec<_>, _>>()
                                .map_err(err)?,
                        ),
                    };
                    args.set(spec, value);
                }
            }
        }
        if !extras.is_empty() {
            return Err(ArgError(format!(
                "unrecognized arguments: {}",
                extras.join(" ")
            )));
        }
        // `--model X` is the deprecated spelling of the positional; the positional wins.
        if let Some(model) = args.str("model").map(str::to_string) {
            match &args.model_tag {
                None => args.model_tag = Some(model),
                Some(tag) if *tag != model => args.warnings.push(format!(
                    "both a model tag ({tag}) and --model ({model}) given; serving {tag}"
                )),
                Some(_) => {}
            }
        }
        Ok(Parsed::Serve(args))
    }
}

/// Converts one raw string by the flag's type, then checks `choices` as argparse does (on the
/// converted value, so `--max-lora-rank 08` is the choice 8).
fn convert(spec: &FlagSpec, raw: &str) -> Result<ArgValue, String> {
    let invalid = || format!("invalid {} value: {}", spec.converter_name(), py_repr(raw));
    let value = match spec.conv() {
        Conv::Str => ArgValue::Str(raw.to_string()),
        Conv::OptionalStr => {
            if raw.is_empty() || raw == "None" {
                ArgValue::None
            } else {
                ArgValue::Str(raw.to_string())
            }
        }
        Conv::Int => ArgValue::Int(py_int(raw).ok_or_else(invalid)?),
        Conv::Float => ArgValue::Float(py_float(raw).ok_or_else(invalid)?),
        Conv::HumanInt => ArgValue::Int(human_readable_int(raw)?.ok_or_else(invalid)?),
        Conv::HumanIntOrAuto => {
            let lower = raw.trim().to_ascii_lowercase();
            if lower == "auto" || lower == "-1" {
                ArgValue::Int(-1)
            } else {
                ArgValue::Int(human_readable_int(raw)?.ok_or_else(invalid)?)
            }
        }
        Conv::Json { optional } => {
            if optional && (raw.is_empty() || raw == "None") {
                ArgValue::None
            } else {
                match serde_json::from_str::<Json>(raw) {
                    Ok(j) => ArgValue::Json(j),
                    Err(e) => return Err(format!("invalid JSON value: {} ({e})", py_repr(raw))),
                }
            }
        }
    };
    if let Some(choices) = &spec.choices {
        let ok = match &value {
            ArgValue::None => choices.contains(&"None"),
            ArgValue::Int(v) => choices.iter().any(|c| py_int(c) == Some(*v)),
            ArgValue::Str(s) => choices.contains(&s.as_str()),
            _ => true,
        };
        if !ok {
            let shown = match &value {
                ArgValue::Int(v) => v.to_string(),
                ArgValue::None => "None".to_string(),
                _ => py_repr(raw),
            };
            return Err(format!(
                "invalid choice: {shown} (choose from {})",
                choices.join(", ")
            ));
        }
    }
    Ok(value)
}

/// Python's `int(s)`: surrounding whitespace, a sign, `_` between digits.
pub(crate) fn py_int(s: &str) -> Option<i64> {
    let t = s.trim();
    let (neg, digits) = match t.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let clean = strip_digit_underscores(digits)?;
    if clean.is_empty() || !clean.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: i64 = clean.parse().ok()?;
    Some(if neg { -n } else { n })
}

/// Python's `float(s)`, including `inf`, `nan`, exponents and `_` between digits.
pub(crate) fn py_float(s: &str) -> Option<f64> {
    let t = s.trim();
    let body = t.strip_prefix(['+', '-']).unwrap_or(t);
    if ["inf", "infinity", "nan"].contains(&body.to_ascii_lowercase().as_str()) {
        return t.to_ascii_lowercase().parse().ok();
    }
    if body.is_empty()
        || !body
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-' | b'_'))
    {
        return None;
    }
    strip_digit_underscores(t)?.parse().ok()
}

/// Removes `_` that sit between two digits; None if any `_` is elsewhere.
fn strip_digit_underscores(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'_' {
            let before = i.checked_sub(1).and_then(|j| bytes.get(j));
            let after = bytes.get(i + 1);
            let digit = |c: Option<&u8>| c.is_some_and(|c| c.is_ascii_digit());
            if !digit(before) || !digit(after) {
                return None;
            }
        } else {
            out.push(char::from(b));
        }
    }
    Some(out)
}

/// vLLM's `human_readable_int`: `1k` = 1000, `1K` = 1024, `25.6k` = 25600; decimals are refused
/// with binary suffixes (that refusal is vLLM's own message, hence the Err).
fn human_readable_int(raw: &str) -> Result<Option<i64>, String> {
    let v = raw.trim();
    if let Some(suffix) = v.chars().last().filter(|c| "kKmMgGtT".contains(*c)) {
        let number = &v[..v.len() - 1];
        let (int, frac) = number.split_once('.').unwrap_or((number, ""));
        let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        if digits(int) && (frac.is_empty() || digits(frac)) && !number.ends_with('.') {
            let exp = match suffix.to_ascii_lowercase() {
                'k' => 1,
                'm' => 2,
                'g' => 3,
                _ => 4,
            };
            if suffix.is_ascii_lowercase() {
                let x: f64 = number.parse().map_err(|_| String::new())?;
                return Ok(Some((x * 1000f64.powi(exp)) as i64));
            }
            if !frac.is_empty() {
                return Err(format!(
                    "Decimals are not allowed with binary suffixes like {suffix}. Did you mean to \
                     use {number}{} instead?",
                    suffix.to_ascii_lowercase()
                ));
            }
            let n: i64 = int.parse().map_err(|_| String::new())?;
            return Ok(n.checked_mul(1i64 << (10 * exp)));
        }
    }
    Ok(py_int(v))
}

/// Python's `repr()` of a str, as argparse puts it in messages.
pub(crate) fn py_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        shlex::split(s).expect("test argv must be valid shell words")
    }

    fn ok(s: &str) -> ServeArgs {
        match parse(&argv(s)) {
            Ok(Parsed::Serve(a)) => a,
            Ok(Parsed::Help) => panic!("`{s}` parsed as --help"),
            Err(e) => panic!("`{s}` was refused: {}", e.0),
        }
    }

    fn err(s: &str) -> String {
        match parse(&argv(s)) {
            Err(e) => e.0,
            Ok(_) => panic!("`{s}` was accepted"),
        }
    }

    #[test]
    fn table_parses_completely() {
        let (table, errors) = parse_table(TABLE_TEXT);
        assert!(
            errors.is_empty(),
            "bad lines in the flag table: {errors:#?}"
        );
        let lines = TABLE_TEXT
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

    /// A value that the flag's type and choices accept, to exercise every line.
    fn sample(spec: &FlagSpec) -> String {
        if let Some(choices) = &spec.choices {
            return choices[0].to_string();
        }
        match spec.conv() {
            Conv::Int => "3".into(),
            Conv::Float => "0.5".into(),
            Conv::HumanInt | Conv::HumanIntOrAuto => "2k".into(),
            Conv::Json { .. } => r#"{"a": 1}"#.into(),
            Conv::Str | Conv::OptionalStr => "some-value".into(),
        }
    }

    #[test]
    fn every_flag_of_the_table_is_accepted() {
        for spec in &table().flags {
            let mut forms: Vec<Vec<String>> = Vec::new();
            let names: Vec<&str> = std::iter::once(spec.long).chain(spec.short).collect();
            for name in names {
                match spec.kind {
                    Kind::Bool | Kind::BoolNegation => forms.push(vec![name.into()]),
                    Kind::Value => {
                        let v = sample(spec);
                        forms.push(vec![name.into(), v.clone()]);
                        forms.push(vec![format!("{name}={v}")]);
                        if spec.nargs == Nargs::OneOrMore {
                            forms.push(vec![name.into(), v.clone(), v.clone()]);
                        }
                    }
                }
            }
            for form in forms {
                let mut full = vec!["my/model".to_string()];
                full.extend(form.iter().cloned());
                let parsed = match parse(&full) {
                    Ok(Parsed::Serve(a)) => a,
                    other => panic!("{form:?} not accepted: {other:?}"),
                };
                assert!(parsed.get(spec.dest).is_some(), "{form:?} set nothing");
                // A positional tag beats `--model`, so the tag is the same for every line.
                assert_eq!(parsed.model_tag.as_deref(), Some("my/model"), "{form:?}");
            }
        }
    }

    #[test]
    fn accepted_forms() {
        let a = ok("meta/llama --port 8001 --host=0.0.0.0 --tensor_parallel_size 2 -pp=2");
        assert_eq!(a.model_tag.as_deref(), Some("meta/llama"));
        assert_eq!(a.int("port"), Some(8001));
        assert_eq!(a.str("host"), Some("0.0.0.0"));
        assert_eq!(a.int("tensor_parallel_size"), Some(2));
        assert_eq!(a.int("pipeline_parallel_size"), Some(2));

        // model tag after the options, negative ints, bool switches and their negations.
        let a = ok("--seed -1 --enforce-eager --no-trust-remote-code m");
        assert_eq!(a.model_tag.as_deref(), Some("m"));
        assert_eq!(a.int("seed"), Some(-1));
        assert_eq!(a.flag("enforce_eager"), Some(true));
        assert_eq!(a.flag("trust_remote_code"), Some(false));

        // nargs=+ takes every following value, stopping at the next option.
        let a = ok("m --served-model-name a b c --port 1");
        assert_eq!(a.strings("served_model_name"), ["a", "b", "c"]);
        assert_eq!(a.int("port"), Some(1));

        // --model is moved into the positional slot.
        assert_eq!(ok("--model x/y").model_tag.as_deref(), Some("x/y"));
        // A leading `serve` is the vllm subcommand, not a model.
        assert_eq!(ok("serve x/y").model_tag.as_deref(), Some("x/y"));

        // -O forms.
        for form in ["m -O3", "m -O 3", "m -O=3", "m --optimization-level 3"] {
            assert_eq!(ok(form).str("optimization_level"), Some("3"), "{form}");
        }

        // Python int/float spellings.
        assert_eq!(ok("m --max-num-seqs 1_024").int("max_num_seqs"), Some(1024));
        assert_eq!(ok("m --max-num-seqs ' +7 '").int("max_num_seqs"), Some(7));
        assert_eq!(
            ok("m --gpu-memory-utilization .5").get("gpu_memory_utilization"),
            Some(&ArgValue::Float(0.5))
        );
        assert_eq!(
            ok("m --gpu-memory-utilization 1e-1").get("gpu_memory_utilization"),
            Some(&ArgValue::Float(0.1))
        );

        // human-readable ints.
        assert_eq!(
            ok("m --max-model-len 32k").int("max_model_len"),
            Some(32_000)
        );
        assert_eq!(
            ok("m --max-model-len 32K").int("max_model_len"),
            Some(32_768)
        );
        assert_eq!(
            ok("m --max-model-len 25.6k").int("max_model_len"),
            Some(25_600)
        );
        assert_eq!(ok("m --max-model-len auto").int("max_model_len"), Some(-1));

        // JSON flags: whole, dotted, list-append, None.
        let a =
            ok(r#"m --kv-transfer-config '{"kv_connector":"NixlConnector","kv_role":"kv_both"}'"#);
        assert_eq!(
            a.json("kv_transfer_config").and_then(|j| j.get("kv_role")),
            Some(&Json::from("kv_both"))
        );
        let a = ok("m --kv-transfer-config.kv_connector NixlConnector --kv_transfer_config.kv_role=kv_producer --kv-transfer-config.kv_connector_extra_config.n 3");
        assert_eq!(
            a.json("kv_transfer_config").map(Json::to_string).as_deref(),
            Some(
                r#"{"kv_connector":"NixlConnector","kv_connector_extra_config":{"n":3},"kv_role":"kv_producer"}"#
            )
        );
        let a = ok("m -cc.cudagraph_capture_sizes+ 1,2");
        assert_eq!(
            a.json("compilation_config").map(Json::to_string).as_deref(),
            Some(r#"{"cudagraph_capture_sizes":["1","2"]}"#)
        );
        assert_eq!(
            ok("m --kv-transfer-config None").get("kv_transfer_config"),
            Some(&ArgValue::None)
        );

        // Choices, including an int-typed choice set and a glued two-letter short.
        assert_eq!(ok("m --dtype bfloat16").str("dtype"), Some("bfloat16"));
        assert_eq!(ok("m --max-lora-rank 08").int("max_lora_rank"), Some(8));
        assert_eq!(ok("m -qawq").str("quantization"), Some("awq"));
        assert_eq!(
            ok("m --tool-strict-level None").get("tool_strict_level"),
            Some(&ArgValue::None)
        );

        // A value containing a space is a value even if it starts with '-'.
        assert_eq!(
            ok("m --chat-template '-x y'").str("chat_template"),
            Some("-x y")
        );
        // Everything after `--` is positional.
        assert_eq!(ok("-- m").model_tag.as_deref(), Some("m"));
        // Append action.
        assert_eq!(
            ok("m --middleware a --middleware b").strings("middleware"),
            ["a", "b"]
        );
        // nargs=? with and without its value.
        assert_eq!(
            ok("m --hf-token").get("hf_token"),
            Some(&ArgValue::Bool(true))
        );
        assert_eq!(ok("m --hf-token abc").str("hf_token"), Some("abc"));
        // No model at all is allowed (vLLM serves its default model).
        assert_eq!(ok("--port 9").model_tag, None);
    }

    #[test]
    fn help_forms() {
        for form in ["--help", "-h", "m --help=all", "m --port 1 --help"] {
            assert!(matches!(parse(&argv(form)), Ok(Parsed::Help)), "{form}");
        }
    }

    #[test]
    fn error_messages() {
        assert_eq!(err("m --foo"), "unrecognized arguments: --foo");
        assert_eq!(
            err("m --foo bar --baz=1"),
            "unrecognized arguments: --foo bar --baz=1"
        );
        assert_eq!(err("m extra"), "unrecognized arguments: extra");
        // Strict: no prefix abbreviations.
        assert_eq!(
            err("m --max-model 10"),
            "unrecognized arguments: --max-model 10"
        );
        assert_eq!(err("m -tp2"), "unrecognized arguments: -tp2");
        assert_eq!(err("m --port x"), "argument --port: invalid int value: 'x'");
        assert_eq!(
            err("m --port=1.5"),
            "argument --port: invalid int value: '1.5'"
        );
        assert_eq!(
            err("m -tp two"),
            "argument --tensor-parallel-size/-tp: invalid int value: 'two'"
        );
        assert_eq!(
            err("m --gpu-memory-utilization high"),
            "argument --gpu-memory-utilization: invalid float value: 'high'"
        );
        assert_eq!(
            err("m --dtype fp7"),
            "argument --dtype: invalid choice: 'fp7' (choose from auto, bfloat16, float, float16, float32, half)"
        );
        assert_eq!(
            err("m --max-lora-rank 7"),
            "argument --max-lora-rank: invalid choice: 7 (choose from 1, 8, 16, 32, 64, 128, 256, 320, 512)"
        );
        assert_eq!(
            err("m --collect-detailed-traces all bogus"),
            "argument --collect-detailed-traces: invalid choice: 'bogus' (choose from all, model, worker, None)"
        );
        assert_eq!(err("m --port"), "argument --port: expected one argument");
        assert_eq!(
            err("m --port --host h"),
            "argument --port: expected one argument"
        );
        assert_eq!(
            err("m --served-model-name --port 1"),
            "argument --served-model-name: expected at least one argument"
        );
        assert_eq!(
            err("m --enforce-eager=true"),
            "argument --enforce-eager: ignored explicit argument 'true'"
        );
        assert_eq!(
            err("m --kv-transfer-config '{bad'"),
            "argument --kv-transfer-config: invalid JSON value: '{bad' (key must be a string at line 1 column 2)"
        );
        assert_eq!(
            err("m --max-model-len lots"),
            "argument --max-model-len: invalid human_readable_int_or_auto value: 'lots'"
        );
        assert_eq!(
            err("m --max-num-batched-tokens 1.5K"),
            "argument --max-num-batched-tokens: Decimals are not allowed with binary suffixes like K. Did you mean to use 1.5k instead?"
        );
        assert_eq!(
            err("m --kv-transfer-config.kv_role"),
            "argument --kv-transfer-config.kv_role: expected one argument"
        );
        // A dotted key on an unknown flag stays unknown.
        assert_eq!(
            err(r#"m --nope.x 1"#),
            r#"unrecognized arguments: --nope {"x":1}"#
        );
        // A value error wins over an unknown flag seen before it, as in argparse.
        assert_eq!(
            err("m --foo --port x"),
            "argument --port: invalid int value: 'x'"
        );
    }

    #[test]
    fn rendering() {
        let e = ArgError("unrecognized arguments: --foo".into());
        assert_eq!(
            e.render(),
            "usage: vllm serve [model_tag] [options]\nvllm serve: error: unrecognized arguments: --foo\n"
        );
        assert_eq!(py_repr("it's"), "\"it's\"");
        assert_eq!(py_repr("a\tb"), "'a\\tb'");
        let a = ok("m --port 8001 --enforce-eager");
        assert_eq!(
            a.non_default_summary(),
            "{'model_tag': 'm', 'port': 8001, 'enforce_eager': True}"
        );
    }

    #[test]
    fn number_spellings() {
        assert_eq!(py_int("12"), Some(12));
        assert_eq!(py_int("-0"), Some(0));
        assert_eq!(py_int("1__0"), None);
        assert_eq!(py_int("_1"), None);
        assert_eq!(py_int("0x10"), None);
        assert_eq!(py_int(""), None);
        assert_eq!(py_float("inf"), Some(f64::INFINITY));
        assert!(py_float("nan").is_some_and(f64::is_nan));
        assert_eq!(py_float("1_0.5"), Some(10.5));
        assert_eq!(py_float("1e"), None);
        assert!(is_negative_number("-1"));
        assert!(is_negative_number("-.5"));
        assert!(!is_negative_number("-x"));
        assert!(!is_negative_number("--1"));
    }
}
