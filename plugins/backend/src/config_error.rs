//! One problem with a backend's `[backend]` table, as every backend reports it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One problem with the `[backend]` table: the field it is about, what is wrong, and
/// perhaps how to put it right. Backends report every problem at once, so that the CLI can
/// show them all at the table's place in the recipe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigError {
    /// The field, as written under `[backend]`: `hosts`, `hosts[2]`, `options.User`;
    /// empty for the table as a whole.
    pub field: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub help: Option<String>,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
            help: None,
        }
    }

    /// The same problem with a hint.
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    /// Every problem, one after another, as one message.
    pub fn join(errors: &[ConfigError]) -> String {
        errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`[backend] {}`: {}", self.field, self.message)?;
        if let Some(h) = &self.help {
            write!(f, "\n  help: {h}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_message_and_help_read_as_one() {
        let e = ConfigError::new("hosts", "the list is empty").help("name at least one host");
        assert_eq!(
            e.to_string(),
            "`[backend] hosts`: the list is empty\n  help: name at least one host"
        );
        let two = [e.clone(), ConfigError::new("time", "is empty")];
        assert_eq!(
            ConfigError::join(&two),
            format!("{e}\n`[backend] time`: is empty")
        );
    }
}
