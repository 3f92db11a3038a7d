//! Reading a foreign TOML file key by key: each table remembers which keys were read, so
//! the importer can note every key it did not map ([`Tab::rest`]), and each value keeps its
//! place for notes and errors.

use std::ops::Range;

use toml_edit::{Item, TableLike, Value};

use super::{ImportError, Note};

/// The source text and the notes gathered so far.
pub(crate) struct Ctx<'s> {
    src: &'s str,
    pub notes: Vec<Note>,
}

impl<'s> Ctx<'s> {
    pub fn new(src: &'s str) -> Self {
        Ctx {
            src,
            notes: Vec::new(),
        }
    }

    /// 1-based line and column of a byte offset.
    pub fn line_col(&self, pos: usize) -> (usize, usize) {
        let before = &self.src[..pos.min(self.src.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, col)
    }

    /// Notes a value that is not carried over.
    pub fn note(&mut self, key: &str, at: Option<&Range<usize>>, why: impl Into<String>) {
        let line = at.map(|r| self.line_col(r.start).0);
        self.notes.push(Note {
            key: key.to_string(),
            line,
            why: why.into(),
        });
    }

    pub fn error(&self, at: Option<&Range<usize>>, message: impl Into<String>) -> ImportError {
        ImportError {
            place: at.map(|r| self.line_col(r.start)),
            message: message.into(),
        }
    }
}

/// A value read from the source, with its dotted key and the place of the key.
#[derive(Debug, Clone)]
pub(crate) struct V<T> {
    pub v: T,
    pub key: String,
    pub at: Option<Range<usize>>,
}

/// One table of the source, with the keys read so far.
pub(crate) struct Tab<'a> {
    t: &'a dyn TableLike,
    prefix: String,
    used: Vec<String>,
}

pub(crate) type R<T> = Result<T, ImportError>;

impl<'a> Tab<'a> {
    pub fn new(t: &'a dyn TableLike, prefix: &str) -> Self {
        Tab {
            t,
            prefix: prefix.to_string(),
            used: Vec::new(),
        }
    }

    /// The dotted key of `k` in this table.
    pub fn path(&self, k: &str) -> String {
        if self.prefix.is_empty() {
            k.to_string()
        } else {
            format!("{}.{k}", self.prefix)
        }
    }

    pub fn has(&self, k: &str) -> bool {
        self.t.contains_key(k)
    }

    /// Where key `k` is written.
    pub fn at(&self, k: &str) -> Option<Range<usize>> {
        self.t.get_key_value(k).and_then(|(key, _)| key.span())
    }

    /// The item of `k`, marked as read.
    pub fn take(&mut self, k: &str) -> Option<V<&'a Item>> {
        let (key, item) = self.t.get_key_value(k)?;
        self.used.push(k.to_string());
        Some(V {
            v: item,
            key: self.path(k),
            at: key.span(),
        })
    }

    fn typed<T>(
        &mut self,
        ctx: &Ctx,
        k: &str,
        what: &str,
        conv: impl FnOnce(&Item) -> Option<T>,
    ) -> R<Option<V<T>>> {
        let Some(item) = self.take(k) else {
            return Ok(None);
        };
        match conv(item.v) {
            Some(v) => Ok(Some(V {
                v,
                key: item.key,
                at: item.at,
            })),
            None => Err(ctx.error(
                item.at.as_ref(),
                format!("`{}` must be {what}, not {}", item.key, kind_of(item.v)),
            )),
        }
    }

    pub fn str(&mut self, ctx: &Ctx, k: &str) -> R<Option<V<String>>> {
        self.typed(ctx, k, "a string", |i| i.as_str().map(str::to_string))
    }

    pub fn int(&mut self, ctx: &Ctx, k: &str) -> R<Option<V<i64>>> {
        self.typed(ctx, k, "an integer", Item::as_integer)
    }

    /// A positive integer (counts, sizes).
    pub fn count(&mut self, ctx: &Ctx, k: &str) -> R<Option<V<i64>>> {
        let v = self.int(ctx, k)?;
        if let Some(v) = &v {
            if v.v < 1 {
                return Err(ctx.error(v.at.as_ref(), format!("`{}` must be at least 1", v.key)));
            }
        }
        Ok(v)
    }

    pub fn bool(&mut self, ctx: &Ctx, k: &str) -> R<Option<V<bool>>> {
        self.typed(ctx, k, "true or false", Item::as_bool)
    }

    pub fn float(&mut self, ctx: &Ctx, k: &str) -> R<Option<V<f64>>> {
        self.typed(ctx, k, "a number", |i| {
            i.as_float().or_else(|| i.as_integer().map(|n| n as f64))
        })
    }

    /// A sub-table (`[a.b]` or `b = { ... }`).
    pub fn table(&mut self, ctx: &Ctx, k: &str) -> R<Option<Tab<'a>>> {
        let Some(item) = self.take(k) else {
            return Ok(None);
        };
        match item.v.as_table_like() {
            Some(t) => Ok(Some(Tab::new(t, &item.key))),
            None => Err(ctx.error(
                item.at.as_ref(),
                format!("`{}` must be a table, not {}", item.key, kind_of(item.v)),
            )),
        }
    }

    /// A table of environment variables: names and values (numbers and booleans as text).
    pub fn env(&mut self, ctx: &Ctx, k: &str) -> R<Vec<(String, V<String>)>> {
        let Some(mut t) = self.table(ctx, k)? else {
            return Ok(Vec::new());
        };
        let keys: Vec<String> = t.keys();
        let mut out = Vec::new();
        for name in keys {
            let item = t.take(&name).expect("listed key");
            let v = match item.v.as_value() {
                Some(Value::String(s)) => s.value().to_string(),
                Some(Value::Integer(n)) => n.value().to_string(),
                Some(Value::Float(f)) => f.value().to_string(),
                Some(Value::Boolean(b)) => b.value().to_string(),
                _ => {
                    return Err(ctx.error(
                        item.at.as_ref(),
                        format!("`{}` must be a string, not {}", item.key, kind_of(item.v)),
                    ))
                }
            };
            out.push((
                name,
                V {
                    v,
                    key: item.key,
                    at: item.at,
                },
            ));
        }
        Ok(out)
    }

    /// The keys of the table, in the file's order.
    pub fn keys(&self) -> Vec<String> {
        self.t.iter().map(|(k, _)| k.to_string()).collect()
    }

    /// Notes every key not read, each with `why(key)`.
    pub fn rest(self, ctx: &mut Ctx, why: impl Fn(&str) -> String) {
        for (k, _) in self.t.iter() {
            if !self.used.iter().any(|u| u == k) {
                let at = self.at(k);
                ctx.note(&self.path(k), at.as_ref(), why(k));
            }
        }
    }
}

/// A value copied out of the source with no formatting of its own.
pub(crate) fn plain(v: &Value) -> Value {
    match v {
        Value::String(s) => Value::from(s.value().as_str()),
        Value::Integer(n) => Value::from(*n.value()),
        Value::Float(f) => Value::from(*f.value()),
        Value::Boolean(b) => Value::from(*b.value()),
        Value::Datetime(d) => Value::from(*d.value()),
        Value::Array(a) => Value::Array(a.iter().map(plain).collect()),
        Value::InlineTable(t) => {
            let mut out = toml_edit::InlineTable::new();
            for (k, v) in t.iter() {
                out.insert(k, plain(v));
            }
            Value::InlineTable(out)
        }
    }
}

/// A table of the source as an inline table value (`[x.y]` written as `{ ... }`).
pub(crate) fn plain_item(item: &Item) -> Option<Value> {
    match item {
        Item::Value(v) => Some(plain(v)),
        Item::Table(t) => {
            let mut out = toml_edit::InlineTable::new();
            for (k, v) in t.iter() {
                out.insert(k, plain_item(v)?);
            }
            Some(Value::InlineTable(out))
        }
        _ => None,
    }
}

pub(crate) fn kind_of(item: &Item) -> &'static str {
    match item {
        Item::None => "nothing",
        Item::Table(_) => "a table",
        Item::ArrayOfTables(_) => "an array of tables",
        Item::Value(v) => match v {
            Value::String(_) => "a string",
            Value::Integer(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Boolean(_) => "a boolean",
            Value::Datetime(_) => "a date",
            Value::Array(_) => "an array",
            Value::InlineTable(_) => "a table",
        },
    }
}
