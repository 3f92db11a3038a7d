//! Importers: another launcher's config file becomes an equivalent recipe.
//!
//! An importer reads the foreign file with `toml_edit` (which keeps every key's place),
//! builds the recipe as a `toml_edit` document, and returns it with a list of [`Note`]s:
//! one per value it could not map, with the reason. Every key of the source is either
//! mapped or noted, so nothing is dropped silently. A file that cannot be read as the
//! foreign format at all is an [`ImportError`] with its line and column.

pub mod prime_rl;
mod source;

use std::fmt;

/// A recipe made from a foreign file, and what could not be carried over.
#[derive(Debug, Clone)]
pub struct Imported {
    /// The recipe, as TOML text.
    pub recipe: String,
    /// One entry per value that was not mapped, in the order of the file.
    pub notes: Vec<Note>,
}

/// A value of the source that the recipe does not carry, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// The key, dotted from the file's root (`inference.enable_fp32_lm_head`).
    pub key: String,
    /// The line (1-based) where the key is written; none for a default left unwritten.
    pub line: Option<usize>,
    pub why: String,
}

impl Note {
    /// `FILE:LINE: KEY: why` (without `:LINE` for an unwritten default).
    pub fn render(&self, file: &str) -> String {
        match self.line {
            Some(l) => format!("{file}:{l}: {}: {}", self.key, self.why),
            None => format!("{file}: {}: {}", self.key, self.why),
        }
    }
}

/// The source cannot be imported: broken TOML, a value of the wrong type, or a
/// combination the foreign launcher itself refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportError {
    /// 1-based line and column, when the problem has a place.
    pub place: Option<(usize, usize)>,
    pub message: String,
}

impl ImportError {
    /// `FILE:LINE:COL: message`.
    pub fn render(&self, file: &str) -> String {
        match self.place {
            Some((l, c)) => format!("{file}:{l}:{c}: {}", self.message),
            None => format!("{file}: {}", self.message),
        }
    }
}

impl fmt::Display for ImportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render("<input>"))
    }
}
