//! Layer 2: Python argparse's left-to-right walk over the rewritten argv, without prefix
//! abbreviations. A value error stops the walk; unknown arguments are reported together at
//! the end.

use prl_flow_flags::vllm::{Flag, FlagTable, Kind, Nargs};

use super::preprocess::is_negative_number;
use super::value::{convert, py_repr};
use super::{ArgError, ArgValue, Parsed, ServeArgs};

enum Token<'a> {
    Positional,
    Help,
    Known(&'static Flag, Option<&'a str>),
    Unknown,
}

pub(super) struct Parser {
    pub(super) table: &'static FlagTable,
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

    pub(super) fn run(&self, toks: &[String]) -> Result<Parsed, ArgError> {
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
                    let err = |msg: String| ArgError(format!("argument {}: {msg}", display(spec)));
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

/// argparse names an action by all its option strings joined with `/`; vLLM adds the long
/// spelling first.
fn display(spec: &Flag) -> String {
    match spec.short {
        Some(short) => format!("{}/{}", spec.long, short),
        None => spec.long.to_string(),
    }
}
