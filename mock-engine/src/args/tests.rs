//! The parser's cases: accepted forms, help, error messages as argparse prints them.

use prl_flow_flags::vllm::{table, Flag, Kind, Nargs};
use serde_json::Value as Json;

use super::preprocess::is_negative_number;
use super::value::{conv, py_float, py_int, Conv};
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

/// A value that the flag's type and choices accept, to exercise every line.
fn sample(spec: &Flag) -> String {
    if let Some(choice) = spec.choices.first() {
        return choice.to_string();
    }
    match conv(spec) {
        Conv::Int => "3".into(),
        Conv::Float => "0.5".into(),
        Conv::HumanInt | Conv::HumanIntOrAuto => "2k".into(),
        Conv::Json { .. } => r#"{"a": 1}"#.into(),
        Conv::Str | Conv::OptionalStr => "some-value".into(),
    }
}

#[test]
fn every_flag_of_the_table_is_accepted() {
    for spec in table().flags() {
        let mut forms: Vec<Vec<String>> = Vec::new();
        let names: Vec<&str> = std::iter::once(spec.long).chain(spec.short).collect();
        for name in names {
            match spec.kind {
                Kind::Bool | Kind::Negation => forms.push(vec![name.into()]),
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
    let a = ok(r#"m --kv-transfer-config '{"kv_connector":"NixlConnector","kv_role":"kv_both"}'"#);
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
