//! Layer 1: vLLM's `FlexibleArgumentParser` rewrites argv before argparse sees it (`-O3`,
//! `_` in flag names, dotted sub-keys gathered into one JSON object per flag).

use serde_json::{Map, Value as Json};

use super::ArgError;

/// Layer 1: vLLM's FlexibleArgumentParser rewrites.
pub(super) fn preprocess(
    argv: &[String],
    warnings: &mut Vec<String>,
) -> Result<Vec<String>, ArgError> {
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
pub(super) fn is_negative_number(s: &str) -> bool {
    let Some(rest) = s.strip_prefix('-') else {
        return false;
    };
    let all_digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    match rest.split_once('.') {
        None => all_digits(rest),
        Some((int, frac)) => (int.is_empty() || all_digits(int)) && all_digits(frac),
    }
}
