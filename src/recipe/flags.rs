//! `vllm_extra` keys of a recipe, checked against `vllm serve`'s flags and turned into
//! arguments ([`VllmFlags::extra_args`]). The flag table and its parser are the
//! `prl-flow-flags` crate's; this module adds what a recipe needs: keys spelt with `_`,
//! TOML values, and messages with help.

use prl_flow_flags::vllm::{Flag, FlagTable, Kind, Nargs};
use toml_edit::{Item, Value};

/// The `vllm serve` flag table, as a recipe's `vllm_extra` reads it.
pub struct VllmFlags {
    table: &'static FlagTable,
}

/// The `vllm serve` table (parsed on first use).
pub fn vllm() -> VllmFlags {
    VllmFlags {
        table: prl_flow_flags::vllm::table(),
    }
}

impl VllmFlags {
    /// The flag a `vllm_extra` key names: `max_model_len` and `max-model-len` are
    /// `--max-model-len` (vLLM's parser treats `_` and `-` alike).
    pub fn by_key(&self, key: &str) -> Option<&'static Flag> {
        self.table
            .get(&key.trim_start_matches("--").replace('_', "-"))
    }

    /// The closest flag to a misspelt key, written as a key (`max_model_len`).
    pub fn suggest(&self, key: &str) -> Option<String> {
        let wanted = key.trim_start_matches("--").replace('-', "_");
        let names: Vec<String> = self
            .table
            .flags()
            .iter()
            .filter(|f| !f.hidden)
            .map(|f| f.name().replace('-', "_"))
            .collect();
        super::doc::near(&wanted, names.iter().map(String::as_str))
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
                    return Ok(vec![flag.long.to_string()]);
                }
                // `key = false` asks for the opposite switch of the same option, if any.
                Ok(self
                    .table
                    .switch_for(flag.dest, flag.kind == Kind::Negation)
                    .map(|f| vec![f.long.to_string()])
                    .unwrap_or_default())
            }
            Kind::Value => self.value_args(key, flag, item),
        }
    }

    fn value_args(&self, key: &str, flag: &Flag, item: &Item) -> Result<Vec<String>, ExtraError> {
        let name = flag.long.to_string();
        let value = item.as_value();
        if let Some(Value::Array(arr)) = value {
            if flag.nargs == Nargs::OneOrMore || flag.append {
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
                if flag.append {
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
        if flag.nargs == Nargs::Optional && value.and_then(Value::as_bool) == Some(true) {
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

fn scalar_text(key: &str, flag: &Flag, v: &Value) -> Result<String, ExtraError> {
    let bad = |what: &str, help: String| ExtraError::Value {
        message: format!("takes {}, not {what}", flag.expected()),
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
    if let Err(why) = flag.accepts(&text) {
        return Err(ExtraError::Value {
            message: why,
            help: if flag.choices.is_empty() {
                format!("write e.g. `{key} = {}`", example(flag))
            } else {
                match super::doc::near(&text, flag.choices.iter().copied()) {
                    Some(near) => format!("did you mean `{near}`?"),
                    None => format!("choose one of: {}", flag.choices.join(", ")),
                }
            },
        });
    }
    Ok(text)
}

fn example(flag: &Flag) -> String {
    if let Some(c) = flag.choices.first() {
        return format!("\"{c}\"");
    }
    match flag.ty {
        Some("int") | Some("human_readable_int") | Some("human_readable_int_or_auto") => {
            "1024".into()
        }
        Some("float") => "0.9".into(),
        _ => "\"...\"".into(),
    }
}

/// Why an argument rendered from `vllm_extra` would not reach `vllm serve` as written: the
/// argv format trims each line and drops blank ones, so a blank value vanishes and the next
/// flag takes its place (`--tokenizer --revision ...`).
pub fn unusable_arg(arg: &str) -> Option<&'static str> {
    if arg.trim().is_empty() {
        Some("has an empty or blank value, which would vanish from the command line and shift the next flag into its place")
    } else if arg.contains('\0') {
        Some("holds a NUL character, which no command line can carry")
    } else if arg.contains('\n') || arg.contains('\r') {
        Some("holds a line break, which would split it into two arguments")
    } else if arg.trim() != arg {
        Some("has spaces at its start or end, which the command line would drop")
    } else {
        None
    }
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
        assert_eq!(
            vllm().by_key("max_model_len").map(|f| f.dest),
            Some("max_model_len")
        );
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
}
