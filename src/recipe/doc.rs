//! Reading a TOML document field by field, with a place for every problem.
//!
//! Plain serde stops at the first error; a recipe must report all of them. So the recipe is
//! parsed with `toml_edit` (which keeps the byte span of every key and value) and read by
//! hand through a [`Table`] cursor: each accessor names the field it reads, checks its type,
//! and records the name as known. [`Table::finish`] then reports every key nobody asked for,
//! with the closest known name as a suggestion. A wrong type or an unknown key becomes a
//! [`Problem`] and reading goes on, so one pass finds everything.

use std::ops::Range;
use std::time::Duration;

use toml_edit::{Item, TableLike, Value};

use crate::diag::{did_you_mean, Problem, Problems};
use crate::plan::parse_duration;

/// A value with the byte range it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Sp<T> {
    pub v: T,
    pub span: Range<usize>,
}

impl<T> Sp<T> {
    pub fn new(v: T, span: Range<usize>) -> Self {
        Self { v, span }
    }
}

/// What a TOML item is, for messages ("an integer", "a table").
pub fn kind_of(item: &Item) -> &'static str {
    match item {
        Item::None => "nothing",
        Item::Table(_) | Item::Value(Value::InlineTable(_)) => "a table",
        Item::ArrayOfTables(_) => "an array of tables",
        Item::Value(v) => value_kind(v),
    }
}

pub fn value_kind(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date",
        Value::Array(_) => "an array",
        Value::InlineTable(_) => "a table",
    }
}

/// The span of an item, or `fallback` when the parser kept none (implicit tables).
pub fn item_span(item: &Item, fallback: &Range<usize>) -> Range<usize> {
    item.span().unwrap_or_else(|| fallback.clone())
}

/// A cursor over one table of the document.
pub struct Table<'a> {
    /// Dotted path of the table (`inference.deployment`); empty for the root.
    pub path: String,
    table: &'a dyn TableLike,
    /// Where the table is written (its header, or the inline table).
    pub span: Range<usize>,
    known: Vec<&'static str>,
}

impl<'a> Table<'a> {
    pub fn new(path: &str, table: &'a dyn TableLike, span: Range<usize>) -> Self {
        Self {
            path: path.to_string(),
            table,
            span,
            known: Vec::new(),
        }
    }

    /// The full dotted name of a field of this table.
    pub fn field(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// How the table is named in messages: `[inference.deployment]`, or `the top level`.
    pub fn header(&self) -> String {
        if self.path.is_empty() {
            "the top level".to_string()
        } else {
            format!("`[{}]`", self.path)
        }
    }

    /// Whether the field is written at all (and marks it known).
    pub fn has(&mut self, key: &'static str) -> bool {
        self.known.push(key);
        self.table.get(key).is_some_and(|i| !i.is_none())
    }

    /// The span of a key (for "this field is not allowed here"), or of the table.
    pub fn key_span(&self, key: &str) -> Range<usize> {
        match self.table.get_key_value(key) {
            Some((k, item)) => k
                .span()
                .or_else(|| item.span())
                .unwrap_or_else(|| self.span.clone()),
            None => self.span.clone(),
        }
    }

    /// The raw item of a field, with its span, marking the field known.
    pub fn item(&mut self, key: &'static str) -> Option<(&'a Item, Range<usize>)> {
        self.known.push(key);
        let (_, item) = self.table.get_key_value(key)?;
        if item.is_none() {
            return None;
        }
        Some((item, item_span(item, &self.key_span(key))))
    }

    fn wrong_type(
        &self,
        key: &str,
        item: &Item,
        span: Range<usize>,
        expected: &str,
        example: &str,
    ) -> Problem {
        Problem::new(format!(
            "`{}` must be {expected}, not {}",
            self.field(key),
            kind_of(item)
        ))
        .at(Some(span))
        .label(format!("expected {expected}"))
        .help(format!("write e.g. `{key} = {example}`"))
    }

    /// A NUL character: no argv, environment or file name can carry it, so the value would
    /// fail only at its spawn, after nodes were allocated.
    fn nul(&self, key: &str, span: Range<usize>) -> Problem {
        Problem::new(format!(
            "`{}` holds a NUL character, which no command line, environment or path can carry",
            self.field(key)
        ))
        .at(Some(span))
        .label("NUL here")
        .help("remove the `\\u0000` from the value")
    }

    pub fn string(&mut self, key: &'static str, p: &mut Problems) -> Option<Sp<String>> {
        let (item, span) = self.item(key)?;
        match item.as_str() {
            Some(s) if s.contains('\0') => {
                p.push(self.nul(key, span));
                None
            }
            Some(s) => Some(Sp::new(s.to_string(), span)),
            None => {
                p.push(self.wrong_type(key, item, span, "a string", "\"...\""));
                None
            }
        }
    }

    pub fn boolean(&mut self, key: &'static str, p: &mut Problems) -> Option<Sp<bool>> {
        let (item, span) = self.item(key)?;
        match item.as_bool() {
            Some(b) => Some(Sp::new(b, span)),
            None => {
                p.push(self.wrong_type(key, item, span, "a boolean", "true"));
                None
            }
        }
    }

    pub fn integer(&mut self, key: &'static str, p: &mut Problems) -> Option<Sp<i64>> {
        let (item, span) = self.item(key)?;
        match item.as_integer() {
            Some(i) => Some(Sp::new(i, span)),
            None => {
                p.push(self.wrong_type(key, item, span, "an integer", "1"));
                None
            }
        }
    }

    /// A count: an integer of at least 1.
    pub fn count(&mut self, key: &'static str, p: &mut Problems) -> Option<Sp<u32>> {
        let i = self.integer(key, p)?;
        match u32::try_from(i.v) {
            Ok(n) if n >= 1 => Some(Sp::new(n, i.span)),
            _ if i.v > 0 => {
                p.push(
                    Problem::new(format!("`{}` is far too large ({})", self.field(key), i.v))
                        .at(Some(i.span))
                        .label("too large")
                        .help(format!("write a count, e.g. `{key} = 1`")),
                );
                None
            }
            _ => {
                p.push(
                    Problem::new(format!(
                        "`{}` must be at least 1, not {}",
                        self.field(key),
                        i.v
                    ))
                    .at(Some(i.span))
                    .label("must be ≥ 1")
                    .help(format!("write a positive count, e.g. `{key} = 1`")),
                );
                None
            }
        }
    }

    /// A TCP port: 1..=65535.
    pub fn port(&mut self, key: &'static str, p: &mut Problems) -> Option<Sp<u16>> {
        let i = self.integer(key, p)?;
        match u16::try_from(i.v) {
            Ok(n) if n >= 1 => Some(Sp::new(n, i.span)),
            _ => {
                p.push(
                    Problem::new(format!(
                        "`{}` must be a port between 1 and 65535, not {}",
                        self.field(key),
                        i.v
                    ))
                    .at(Some(i.span))
                    .label("not a port")
                    .help(format!("pick a free port, e.g. `{key} = 8000`")),
                );
                None
            }
        }
    }

    /// A duration written as a string (`"20m"`).
    pub fn duration(&mut self, key: &'static str, p: &mut Problems) -> Option<Sp<Duration>> {
        let s = self.string(key, p)?;
        match parse_duration(&s.v) {
            Ok(d) if !d.is_zero() => Some(Sp::new(d, s.span)),
            Ok(_) => {
                p.push(
                    Problem::new(format!("`{}` must be longer than zero", self.field(key)))
                        .at(Some(s.span))
                        .label("zero")
                        .help(format!("write e.g. `{key} = \"20m\"`")),
                );
                None
            }
            Err(msg) => {
                p.push(
                    Problem::new(format!("`{}`: {msg}", self.field(key)))
                        .at(Some(s.span))
                        .label("not a duration")
                        .help(format!("write e.g. `{key} = \"20m\"`")),
                );
                None
            }
        }
    }

    /// One of a fixed set of strings.
    pub fn choice(
        &mut self,
        key: &'static str,
        choices: &[&str],
        p: &mut Problems,
    ) -> Option<Sp<String>> {
        let s = self.string(key, p)?;
        if choices.contains(&s.v.as_str()) {
            return Some(s);
        }
        let help = match near(&s.v, choices.iter().copied()) {
            Some(near) => format!("did you mean `{near}`?"),
            None => format!("choose one of: {}", quote_list(choices)),
        };
        p.push(
            Problem::new(format!(
                "`{}` cannot be `{}`; it is one of {}",
                self.field(key),
                s.v,
                quote_list(choices)
            ))
            .at(Some(s.span))
            .label("not a known value")
            .help(help),
        );
        None
    }

    /// A non-empty array of non-empty strings (an argv prefix).
    pub fn argv(&mut self, key: &'static str, p: &mut Problems) -> Option<Sp<Vec<String>>> {
        let (item, span) = self.item(key)?;
        let Some(arr) = item.as_array() else {
            p.push(self.wrong_type(
                key,
                item,
                span,
                "an array of strings",
                "[\"vllm\", \"serve\"]",
            ));
            return None;
        };
        let mut out = Vec::with_capacity(arr.len());
        let mut ok = true;
        for v in arr.iter() {
            let vspan = v.span().unwrap_or_else(|| span.clone());
            match v.as_str() {
                Some(s) if s.contains('\0') => {
                    ok = false;
                    p.push(self.nul(key, vspan));
                }
                Some(s) if !s.trim().is_empty() && !s.contains('\n') => out.push(s.to_string()),
                Some(_) => {
                    ok = false;
                    p.push(
                        Problem::new(format!(
                            "`{}` has an empty or multi-line argument",
                            self.field(key)
                        ))
                        .at(Some(vspan))
                        .label("not a usable argument")
                        .help("each argument is one non-empty line of text"),
                    );
                }
                None => {
                    ok = false;
                    p.push(
                        Problem::new(format!(
                            "`{}` must hold strings, not {}",
                            self.field(key),
                            value_kind(v)
                        ))
                        .at(Some(vspan))
                        .label("expected a string"),
                    );
                }
            }
        }
        if ok && out.is_empty() {
            p.push(
                Problem::new(format!("`{}` is empty", self.field(key)))
                    .at(Some(span.clone()))
                    .label("no program")
                    .help(format!("name the program and its first arguments, e.g. `{key} = [\"vllm\", \"serve\"]`")),
            );
            return None;
        }
        ok.then(|| Sp::new(out, span))
    }

    /// A sub-table (a `[header]` table or an inline `{ ... }` table).
    pub fn table(&mut self, key: &'static str, p: &mut Problems) -> Option<Table<'a>> {
        let (item, span) = self.item(key)?;
        match item.as_table_like() {
            Some(t) => Some(Table::new(&self.field(key), t, span)),
            None => {
                p.push(self.wrong_type(key, item, span, "a table", "{ ... }"));
                None
            }
        }
    }

    /// A table of environment variables: names to strings (numbers and booleans are
    /// written as text).
    pub fn env(
        &mut self,
        key: &'static str,
        p: &mut Problems,
    ) -> Option<Vec<(Sp<String>, Sp<String>)>> {
        let t = self.table(key, p)?;
        let mut out = Vec::new();
        for (name, item) in t.table.iter() {
            let kspan = t.key_span(name);
            let vspan = item_span(item, &kspan);
            let text = match item.as_value() {
                Some(Value::String(s)) => Some(s.value().clone()),
                Some(Value::Integer(i)) => Some(i.value().to_string()),
                Some(Value::Float(f)) => Some(f.value().to_string()),
                Some(Value::Boolean(b)) => Some(b.value().to_string()),
                _ => None,
            };
            match text {
                Some(v) if v.contains('\0') || name.contains('\0') => {
                    p.push(t.nul(name, vspan));
                }
                Some(v) => out.push((Sp::new(name.to_string(), kspan), Sp::new(v, vspan))),
                None => p.push(
                    Problem::new(format!(
                        "`{}.{name}` must be a string, not {}",
                        t.path,
                        kind_of(item)
                    ))
                    .at(Some(vspan))
                    .label("expected a string")
                    .help(format!("write e.g. `{name} = \"value\"`")),
                ),
            }
        }
        Some(out)
    }

    /// Every key with its item, in the order written (for free-form tables such as
    /// `vllm_extra`). Marks nothing known: the caller checks the keys itself.
    pub fn entries(&self) -> Vec<(Sp<String>, &'a Item)> {
        self.table
            .iter()
            .map(|(k, item)| (Sp::new(k.to_string(), self.key_span(k)), item))
            .collect()
    }

    /// Reports every key of the table that no accessor asked for.
    pub fn finish(self, p: &mut Problems) {
        for (key, item) in self.table.iter() {
            if item.is_none() || self.known.contains(&key) {
                continue;
            }
            let help = match near(key, self.known.iter().copied()) {
                Some(near) => format!("did you mean `{near}`?"),
                None => format!("known fields here: {}", quote_list(&self.known)),
            };
            p.push(
                Problem::new(format!("unknown field `{key}` in {}", self.header()))
                    .at(Some(self.key_span(key)))
                    .label("not a known field")
                    .help(help),
            );
        }
    }
}

/// The closest of `candidates` to a misspelt `wrong`, when close enough to be a typo (the
/// shared suggestion, which also counts a swap of two letters as one edit: `nmae` → `name`).
pub fn near<'a>(wrong: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    did_you_mean(wrong, candidates)
}

/// `` `a`, `b`, `c` `` (duplicates removed, order kept).
pub fn quote_list(items: &[&str]) -> String {
    let mut seen: Vec<&str> = Vec::new();
    for i in items {
        if !seen.contains(i) {
            seen.push(i);
        }
    }
    seen.iter()
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A TOML value as JSON (dates become their text), for free-form tables handed on
/// (`[backend]`, table-valued vLLM flags).
pub fn to_json(item: &Item) -> serde_json::Value {
    use serde_json::Value as J;
    match item {
        Item::None => J::Null,
        Item::Value(v) => value_to_json(v),
        Item::Table(t) => J::Object(t.iter().map(|(k, i)| (k.to_string(), to_json(i))).collect()),
        Item::ArrayOfTables(a) => J::Array(
            a.iter()
                .map(|t| J::Object(t.iter().map(|(k, i)| (k.to_string(), to_json(i))).collect()))
                .collect(),
        ),
    }
}

pub fn value_to_json(v: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Value::String(s) => J::String(s.value().clone()),
        Value::Integer(i) => J::from(*i.value()),
        Value::Float(f) => serde_json::Number::from_f64(*f.value()).map_or(J::Null, J::Number),
        Value::Boolean(b) => J::Bool(*b.value()),
        Value::Datetime(d) => J::String(d.value().to_string()),
        Value::Array(a) => J::Array(a.iter().map(value_to_json).collect()),
        Value::InlineTable(t) => J::Object(
            t.iter()
                .map(|(k, v)| (k.to_string(), value_to_json(v)))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn doc(src: &str) -> toml_edit::ImDocument<String> {
        toml_edit::ImDocument::parse(src.to_string()).expect("valid toml")
    }

    #[test]
    fn every_wrong_field_is_reported_with_its_place() {
        let src = "[a]\nn = \"x\"\ncount = 0\nnmae = 1\nport = 70000\n";
        let d = doc(src);
        let mut p = Problems::new("t.toml", Arc::new(src.to_string()));
        let root = Table::new("", d.as_table(), 0..0);
        let mut root = root;
        let mut a = root.table("a", &mut p).expect("table");
        assert!(a.integer("n", &mut p).is_none());
        assert!(a.count("count", &mut p).is_none());
        assert!(a.port("port", &mut p).is_none());
        a.string("name", &mut p);
        a.finish(&mut p);
        root.finish(&mut p);
        let out = p.render(false);
        assert_eq!(p.len(), 4, "{out}");
        assert!(
            out.contains("t.toml:2:5: `a.n` must be an integer, not a string"),
            "{out}"
        );
        assert!(
            out.contains("t.toml:3:9: `a.count` must be at least 1"),
            "{out}"
        );
        assert!(
            out.contains("t.toml:4:1: unknown field `nmae` in `[a]`"),
            "{out}"
        );
        assert!(out.contains("did you mean `name`?"), "{out}");
        assert!(out.contains("t.toml:5:8"), "{out}");
    }

    #[test]
    fn implicit_and_inline_tables_have_places() {
        let src = "[x.y]\nz = { w = 1, q = 2 }\n";
        let d = doc(src);
        let mut p = Problems::new("t.toml", Arc::new(src.to_string()));
        let mut root = Table::new("", d.as_table(), 0..0);
        let mut x = root.table("x", &mut p).expect("x");
        let mut y = x.table("y", &mut p).expect("y");
        let mut z = y.table("z", &mut p).expect("z");
        z.integer("w", &mut p);
        z.finish(&mut p);
        let out = p.render(false);
        assert!(
            out.contains("t.toml:2:14: unknown field `q` in `[x.y.z]`"),
            "{out}"
        );
    }
}
