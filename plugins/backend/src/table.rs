//! Reading a backend's `[backend]` table one field at a time. Each reader gives the field's
//! value, nothing for a field that is not there, or notes a [`ConfigError`] that names the
//! field and goes on, so that a backend reports every problem of its table at once.

use std::time::Duration;

use serde_json::{Map, Value};

use crate::ConfigError;

const DURATION_HELP: &str = "write it like `90s`, `5m` or `1h 30m`";

/// The fields of one `[backend]` table, and the problems found in them so far.
pub struct TableReader<'a> {
    table: &'a Map<String, Value>,
    errors: &'a mut Vec<ConfigError>,
}

impl<'a> TableReader<'a> {
    pub fn new(table: &'a Map<String, Value>, errors: &'a mut Vec<ConfigError>) -> Self {
        Self { table, errors }
    }

    /// Notes every field of the table that is not one of `fields` (the backend's, `type`
    /// first), with the likeliest of them as a help when `suggest` finds one (the
    /// project's "did you mean", which lives above this crate) or else the list of them.
    pub fn unknown_fields<'f>(
        &mut self,
        backend: &str,
        fields: &[&'f str],
        suggest: impl Fn(&str, &[&'f str]) -> Option<&'f str>,
    ) {
        for key in self.table.keys() {
            if fields.contains(&key.as_str()) {
                continue;
            }
            let e = ConfigError::new(key, format!("is not a field of the {backend} backend"));
            self.errors.push(match suggest(key, fields) {
                Some(s) => e.help(format!("did you mean `{s}`?")),
                None => {
                    let listed: Vec<&str> =
                        fields.iter().copied().filter(|f| *f != "type").collect();
                    e.help(format!("fields: {}", listed.join(", ")))
                }
            });
        }
    }

    /// A field as written, for what the readers below do not cover.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.table.get(key)
    }

    /// Notes a problem found by the backend's own check of a field.
    pub fn error(&mut self, e: ConfigError) {
        self.errors.push(e);
    }

    pub fn string(&mut self, key: &str) -> Option<String> {
        match self.table.get(key)? {
            Value::String(s) => Some(s.clone()),
            other => {
                self.error(ConfigError::new(
                    key,
                    format!("must be a string, not {}", kind(other)),
                ));
                None
            }
        }
    }

    /// A whole number that fits a `u32`.
    pub fn count(&mut self, key: &str) -> Option<u32> {
        match self.table.get(key)? {
            Value::Number(n) => match n.as_u64().and_then(|v| u32::try_from(v).ok()) {
                Some(v) => Some(v),
                None => {
                    self.error(ConfigError::new(key, format!("`{n}` is not a count")));
                    None
                }
            },
            other => {
                self.error(ConfigError::new(
                    key,
                    format!("must be a whole number, not {}", kind(other)),
                ));
                None
            }
        }
    }

    /// A whole number ≥ 0 of any size (a seed).
    pub fn whole(&mut self, key: &str) -> Option<u64> {
        let v = self.table.get(key)?;
        let n = v.as_u64();
        if n.is_none() {
            self.error(ConfigError::new(
                key,
                format!("`{v}` is not a whole number ≥ 0"),
            ));
        }
        n
    }

    /// A number from `min` to `max`, both included.
    pub fn number(&mut self, key: &str, min: f64, max: f64) -> Option<f64> {
        let v = self.table.get(key)?;
        match v.as_f64() {
            Some(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                self.error(ConfigError::new(
                    key,
                    format!("`{v}` is not a number from {min} to {max}"),
                ));
                None
            }
        }
    }

    pub fn boolean(&mut self, key: &str) -> Option<bool> {
        match self.table.get(key)? {
            Value::Bool(b) => Some(*b),
            other => {
                self.error(ConfigError::new(
                    key,
                    format!("must be `true` or `false`, not {}", kind(other)),
                ));
                None
            }
        }
    }

    /// A list of one-line strings; empty when the field is not there. Each bad item is a
    /// problem of its own (`key[i]`).
    pub fn list(&mut self, key: &str) -> Vec<String> {
        let Some(v) = self.table.get(key) else {
            return Vec::new();
        };
        let Value::Array(items) = v else {
            self.error(ConfigError::new(
                key,
                format!("must be a list of strings, not {}", kind(v)),
            ));
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match item {
                Value::String(s) if s.contains('\n') => self.error(ConfigError::new(
                    format!("{key}[{i}]"),
                    "holds a line break",
                )),
                Value::String(s) => out.push(s.clone()),
                other => self.error(ConfigError::new(
                    format!("{key}[{i}]"),
                    format!("must be a string, not {}", kind(other)),
                )),
            }
        }
        out
    }

    /// A duration written as a string, in humantime's words: `90s`, `5m`, `1h 30m`.
    pub fn duration(&mut self, key: &str) -> Option<Duration> {
        let s = match self.table.get(key)? {
            Value::String(s) => s,
            other => {
                self.error(
                    ConfigError::new(
                        key,
                        format!("must be a duration as a string, not {}", kind(other)),
                    )
                    .help(DURATION_HELP),
                );
                return None;
            }
        };
        match humantime::parse_duration(s.trim()) {
            Ok(d) => Some(d),
            Err(e) => {
                self.error(
                    ConfigError::new(key, format!("`{s}` is not a duration: {e}"))
                        .help(DURATION_HELP),
                );
                None
            }
        }
    }
}

/// What a value is, in the words of an error message: "a number", "a list".
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a table",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_reader_gives_the_value_or_names_the_field() {
        let table = serde_json::json!({
            "name": "a", "n": 3, "big": -1, "seed": 7, "p": 0.5, "on": true,
            "args": ["x", 2, "y\nz"], "wait": "90s", "later": "soon", "t": 5,
        });
        let Value::Object(table) = table else {
            unreachable!()
        };
        let mut errors = Vec::new();
        let mut r = TableReader::new(&table, &mut errors);
        assert_eq!(r.string("name").as_deref(), Some("a"));
        assert_eq!(r.string("missing"), None);
        assert_eq!(r.count("n"), Some(3));
        assert_eq!(r.count("big"), None);
        assert_eq!(r.whole("seed"), Some(7));
        assert_eq!(r.number("p", 0.0, 1.0), Some(0.5));
        assert_eq!(r.number("n", 0.0, 1.0), None);
        assert_eq!(r.boolean("on"), Some(true));
        assert_eq!(r.list("args"), ["x"]);
        assert_eq!(r.duration("wait"), Some(Duration::from_secs(90)));
        assert_eq!(r.duration("later"), None);
        assert_eq!(r.duration("t"), None);
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["big", "n", "args[1]", "args[2]", "later", "t"]);
        assert_eq!(errors[0].message, "`-1` is not a count");
        assert_eq!(
            errors[4].message.split(':').next(),
            Some("`soon` is not a duration")
        );
        assert_eq!(
            errors[5].message,
            "must be a duration as a string, not a number"
        );
        assert!(errors[5].help.is_some());
    }

    #[test]
    fn an_unknown_field_is_named_with_a_suggestion_or_the_list() {
        let Value::Object(table) =
            serde_json::json!({ "type": "x", "sede": 1, "zzz": 2, "seed": 3 })
        else {
            unreachable!()
        };
        let mut errors = Vec::new();
        let fields = ["type", "seed", "rate"];
        TableReader::new(&table, &mut errors).unknown_fields("x", &fields, |k, f| {
            f.iter().copied().find(|c| c.starts_with(&k[..1]))
        });
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(errors[0].field, "sede");
        assert_eq!(errors[0].message, "is not a field of the x backend");
        assert_eq!(errors[0].help.as_deref(), Some("did you mean `seed`?"));
        assert_eq!(errors[1].field, "zzz");
        assert_eq!(errors[1].help.as_deref(), Some("fields: seed, rate"));
    }
}
