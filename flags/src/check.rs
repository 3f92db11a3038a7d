//! Checks of a whole rendered command line against a program's table, for the tests: every
//! flag known, every value of its kind and among its choices. A template that writes a flag
//! the program would refuse then fails a test rather than a cluster job. Each check returns
//! the problems it found, empty when the argv is good.

use crate::vllm::{Kind, Nargs};

/// The values that follow `args[*i]`, up to the next `--flag`; advances `i` past them.
fn values<'a>(args: &'a [String], i: &mut usize) -> &'a [String] {
    let start = *i;
    while *i < args.len() && !args[*i].starts_with("--") {
        *i += 1;
    }
    &args[start..*i]
}

/// Checks the arguments of a rendered `vllm serve` command that follow the model.
pub fn check_vllm_args(args: &[String]) -> Vec<String> {
    let table = crate::vllm::table();
    let mut errors = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        let Some(flag) = a.strip_prefix("--").and_then(|_| table.get(a)) else {
            errors.push(format!("`{a}` is not a `vllm serve` flag"));
            values(args, &mut i);
            continue;
        };
        let values = values(args, &mut i);
        let arity_ok = match flag.kind {
            Kind::Bool | Kind::Negation => values.is_empty(),
            Kind::Value => match flag.nargs {
                Nargs::OneOrMore => !values.is_empty(),
                Nargs::Optional => values.len() <= 1,
                Nargs::One => values.len() == 1,
            },
        };
        if !arity_ok {
            errors.push(format!("`{a}` got {} value(s): {values:?}", values.len()));
            continue;
        }
        for v in values {
            if let Err(why) = flag.accepts(v) {
                errors.push(format!("`{a}` {why}"));
            }
        }
    }
    errors
}

/// Checks a rendered `vllm-router` argv (without the program): every flag known to the
/// Python launcher, values in their choices, `--prefill URL [BOOTSTRAP_PORT|none]`.
pub fn check_router_args(args: &[String]) -> Vec<String> {
    let table = crate::router::table();
    let mut errors = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        let Some(flag) = table.get(a.as_str()) else {
            errors.push(format!("`{a}` is not a `vllm-router` flag"));
            values(args, &mut i);
            continue;
        };
        let values = values(args, &mut i);
        let ok = if flag.bool {
            values.is_empty()
        } else {
            match flag.nargs {
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
                if !flag.choices.contains(&v.as_str()) {
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

/// Checks a rendered Mooncake argv (without the program) against the program's flags:
/// gflags as `--name=value` (`mooncake_master`, `mooncake_client`), argparse as
/// `--name value` (`mooncake_http_metadata_server`).
pub fn check_mooncake_args(program: &str, args: &[String]) -> Vec<String> {
    let Some(table) = crate::mooncake::program(program) else {
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
        if gflags && crate::mooncake::GLOG_FLAGS.contains(&name) {
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
