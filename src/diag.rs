//! Problems in input files, reported with their place: file, line, column, the field, and
//! what to do. Every checker collects all its problems in one pass and returns them
//! together as [`Problems`]; only `main` turns them into output and exit code 2.

use std::fmt::Write as _;
use std::ops::Range;
use std::sync::Arc;

use miette::{GraphicalReportHandler, GraphicalTheme, LabeledSpan, NamedSource, SourceSpan};

/// One problem at one place of a source file.
#[derive(Debug, Clone)]
pub struct Problem {
    /// What is wrong, naming the field in backticks: ``unknown field `nmae` in `[[task]]` ``.
    pub message: String,
    /// Byte range in the source; `None` when the problem has no single place.
    pub span: Option<Range<usize>>,
    /// A short label drawn under the span.
    pub label: String,
    /// How to fix it.
    pub help: Option<String>,
}

impl Problem {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            span: None,
            label: String::new(),
            help: None,
        }
    }
    pub fn at(mut self, span: Option<Range<usize>>) -> Self {
        self.span = span;
        self
    }
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

/// All problems found in one source file.
#[derive(Debug, Clone)]
pub struct Problems {
    pub path: String,
    pub source: Arc<String>,
    pub items: Vec<Problem>,
}

impl Problems {
    pub fn new(path: impl Into<String>, source: Arc<String>) -> Self {
        Self {
            path: path.into(),
            source,
            items: Vec::new(),
        }
    }
    pub fn push(&mut self, p: Problem) {
        self.items.push(p);
    }
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// `path:line:col` of a byte offset (1-based, columns in characters).
    pub fn location(&self, offset: usize) -> String {
        let (line, col) = line_col(&self.source, offset);
        format!("{}:{line}:{col}", self.path)
    }

    /// Renders every problem: a plain `error: file:line:col: message` line (easy to grep and
    /// to jump to from an editor), then the source excerpt with its label and the help.
    pub fn render(&self, color: bool) -> String {
        let theme = if color {
            GraphicalTheme::unicode()
        } else {
            GraphicalTheme::unicode_nocolor()
        };
        let handler = GraphicalReportHandler::new_themed(theme).with_context_lines(1);
        let mut out = String::new();
        for p in &self.items {
            let place = match &p.span {
                Some(s) => self.location(s.start),
                None => self.path.clone(),
            };
            let _ = writeln!(out, "error: {place}: {}", p.message);
            let d = Rendered {
                message: p.message.clone(),
                src: NamedSource::new(&self.path, self.source.clone()),
                span: p.span.clone(),
                label: p.label.clone(),
                help: p.help.clone(),
            };
            let mut buf = String::new();
            if handler.render_report(&mut buf, &d).is_ok() {
                // The first line repeats the message: the plain line above already says it.
                let body: Vec<&str> = buf.lines().skip(1).collect();
                for line in body {
                    let _ = writeln!(out, "{}", line.trim_end());
                }
            }
        }
        let n = self.items.len();
        let _ = writeln!(
            out,
            "{n} problem{} in `{}`; nothing was started",
            if n == 1 { "" } else { "s" },
            self.path
        );
        out
    }
}

pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..floor_char_boundary(text, offset)];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    (line, col)
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[derive(Debug)]
struct Rendered {
    message: String,
    src: NamedSource<Arc<String>>,
    span: Option<Range<usize>>,
    label: String,
    help: Option<String>,
}

impl std::fmt::Display for Rendered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Rendered {}

impl miette::Diagnostic for Rendered {
    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        self.span
            .as_ref()
            .map(|_| &self.src as &dyn miette::SourceCode)
    }
    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        let span = self.span.clone()?;
        let label = (!self.label.is_empty()).then(|| self.label.clone());
        Some(Box::new(std::iter::once(LabeledSpan::new_with_span(
            label,
            SourceSpan::from(span),
        ))))
    }
    fn help<'a>(&'a self) -> Option<Box<dyn std::fmt::Display + 'a>> {
        self.help
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn std::fmt::Display>)
    }
}

/// `1 task`, `2 tasks`.
pub fn count(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// The closest of `candidates` to `wrong`, when it is close enough to be a typo.
pub fn did_you_mean<'a>(
    wrong: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    prl_flow_engine::text::closest(wrong, candidates).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based() {
        let t = "a = 1\nbb = 2\n";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 6), (2, 1));
        assert_eq!(line_col(t, 8), (2, 3));
    }

    #[test]
    fn render_names_file_line_col_and_help() {
        let src = Arc::new("[[task]]\nid = \"a\"\nnmae = 1\n".to_string());
        let mut p = Problems::new("wf.toml", src);
        p.push(
            Problem::new("unknown field `nmae` in `[[task]]`")
                .at(Some(18..22))
                .label("not a field")
                .help("did you mean `name`?"),
        );
        let out = p.render(false);
        assert!(
            out.starts_with("error: wf.toml:3:1: unknown field `nmae`"),
            "{out}"
        );
        assert!(out.contains("did you mean `name`?"), "{out}");
        assert!(out.contains("1 problem in `wf.toml`"), "{out}");
    }
}
