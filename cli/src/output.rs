//! Terminal output: colours only when stdout is a terminal and `NO_COLOR`
//! is unset (<https://no-color.org>), JSON for scripts.

use std::io::IsTerminal;

/// How to decorate text for stdout and stderr.
#[derive(Debug, Clone, Copy)]
pub struct Style {
    color: bool,
    /// stdout is a terminal (progress bars are drawn only then).
    pub terminal: bool,
}

impl Style {
    pub fn detect() -> Style {
        let terminal = std::io::stdout().is_terminal();
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Style {
            color: terminal && !no_color,
            terminal,
        }
    }

    fn paint(&self, code: &str, s: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_owned()
        }
    }

    pub fn ok(&self, s: &str) -> String {
        self.paint("32", s)
    }
    pub fn warn(&self, s: &str) -> String {
        self.paint("33", s)
    }
    pub fn error(&self, s: &str) -> String {
        self.paint("1;31", s)
    }
    pub fn bold(&self, s: &str) -> String {
        self.paint("1", s)
    }
    pub fn dim(&self, s: &str) -> String {
        self.paint("2", s)
    }
}

/// Prints a JSON value on stdout, pretty.
pub fn print_json(v: &serde_json::Value) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(_) => println!("{v}"),
    }
}
