//! The recipe's `[inference.vllm_extra]` table: each entry a `vllm serve` flag by its name,
//! checked against vLLM's own flags as it is read, so that a misspelt flag or a bad value is
//! reported at its line and what passes becomes the engine's extra arguments.

use super::doc::{Sp, Table};
use super::flags::{self, ExtraError};
use crate::diag::{Problem, Problems};

/// One `vllm_extra` entry, already checked against `vllm serve`'s flags.
#[derive(Debug, Clone)]
pub struct VllmExtra {
    pub key: Sp<String>,
    /// The option it sets (`tensor_parallel_size` for `tp`...), to spot managed ones.
    pub dest: String,
    pub args: Vec<String>,
    /// The value as JSON (for `served_model_name`).
    pub value: serde_json::Value,
}

pub(super) fn read_extra(t: &Table<'_>, p: &mut Problems) -> Vec<VllmExtra> {
    let table = flags::vllm();
    let mut out = Vec::new();
    for (key, item) in t.entries() {
        let vspan = super::doc::item_span(item, &key.span);
        match table.extra_args(&key.v, item) {
            Ok(args) if args.iter().any(|a| flags::unusable_arg(a).is_some()) => {
                let why = args
                    .iter()
                    .find_map(|a| flags::unusable_arg(a))
                    .unwrap_or_default();
                p.push(
                    Problem::new(format!("`inference.vllm_extra.{}` {why}", key.v))
                        .at(Some(vspan))
                        .label("not a usable argument")
                        .help(format!(
                            "give it a value of one line, without spaces at its ends, or drop `{}`",
                            key.v
                        )),
                );
            }
            Ok(args) => {
                let dest = table
                    .by_key(&key.v)
                    .map(|f| f.dest.to_string())
                    .unwrap_or_default();
                out.push(VllmExtra {
                    value: super::doc::to_json(item),
                    key,
                    dest,
                    args,
                });
            }
            Err(ExtraError::Unknown { suggestion }) => {
                let help = match suggestion {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => "any `vllm serve` flag may be given by its name, e.g. `max_model_len = 32768`; see `vllm serve --help=all`".to_string(),
                };
                p.push(
                    Problem::new(format!(
                        "`inference.vllm_extra.{}` is not a `vllm serve` flag",
                        key.v
                    ))
                    .at(Some(key.span))
                    .label("unknown flag")
                    .help(help),
                );
            }
            Err(ExtraError::Value { message, help }) => p.push(
                Problem::new(format!("`inference.vllm_extra.{}` {message}", key.v))
                    .at(Some(vspan))
                    .label("not a valid value")
                    .help(help),
            ),
        }
    }
    out
}
