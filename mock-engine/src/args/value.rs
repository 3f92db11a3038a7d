//! One raw string to the value argparse would store, with Python's spellings of numbers
//! (`1_024`, ` +7 `, `.5`, `inf`), vLLM's human-readable integers (`32k`, `32K`) and JSON; and
//! Python's `repr()` for messages.

use prl_flow_flags::vllm::Flag;
use serde_json::Value as Json;

use super::ArgValue;

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

/// How a flag's raw strings convert, from its converter name (and, for `_optional_type`, its
/// option name).
pub(crate) fn conv(spec: &Flag) -> Conv {
    match spec.ty {
        Some("int") => Conv::Int,
        Some("float") => Conv::Float,
        Some("human_readable_int") => Conv::HumanInt,
        Some("human_readable_int_or_auto") => Conv::HumanIntOrAuto,
        Some("loads" | "parse_dataclass" | "_parse_type") => Conv::Json { optional: false },
        // Config objects (`--kv-transfer-config`, `--speculative-config`, ...) are
        // `optional_type(json.loads)`; other optional values are plain strings as far as
        // the table can tell.
        Some("_optional_type") if spec.dest.ends_with("_config") => Conv::Json { optional: true },
        Some("_optional_type") => Conv::OptionalStr,
        _ => Conv::Str,
    }
}

fn converter_name(spec: &Flag) -> &'static str {
    spec.ty.unwrap_or("str")
}

/// Converts one raw string by the flag's type, then checks `choices` as argparse does (on the
/// converted value, so `--max-lora-rank 08` is the choice 8).
pub(super) fn convert(spec: &Flag, raw: &str) -> Result<ArgValue, String> {
    let invalid = || format!("invalid {} value: {}", converter_name(spec), py_repr(raw));
    let value = match conv(spec) {
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
    let choices = &spec.choices;
    if !choices.is_empty() {
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
