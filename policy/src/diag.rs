//! Diagnostics: errors and warnings with `file:line:col` positions.

use std::fmt;
use std::ops::Range;

/// How serious a [`Diagnostic`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The policy is refused.
    Error,
    /// The policy loads, but something deserves a look.
    Warning,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        })
    }
}

/// One finding about a policy file, at a 1-based line and column (columns count characters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file name given to [`crate::Policy::from_toml`].
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub col: usize,
    /// Error or warning.
    pub severity: Severity,
    /// What is wrong and, where possible, how to fix it.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file, self.line, self.col, self.severity, self.message
        )
    }
}

/// A policy that failed validation: every error found, in source order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub struct PolicyError {
    /// The errors (never empty), sorted by position.
    pub diagnostics: Vec<Diagnostic>,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// A line and column in the source, kept on loaded rules for later warnings and explain output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub col: usize,
}

/// Collects diagnostics while a policy is validated, turning byte spans into positions.
pub(crate) struct Diags<'s> {
    file: String,
    src: &'s str,
    line_starts: Vec<usize>,
    pub(crate) items: Vec<Diagnostic>,
}

impl<'s> Diags<'s> {
    pub(crate) fn new(src: &'s str, file: &str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(src.match_indices('\n').map(|(i, _)| i + 1));
        Diags {
            file: file.to_owned(),
            src,
            line_starts,
            items: Vec::new(),
        }
    }

    /// The line and column of a byte offset (clamped into the source).
    pub(crate) fn pos(&self, offset: usize) -> Pos {
        let offset = offset.min(self.src.len());
        let line_idx = match self.line_starts.binary_search(&offset) {
            Ok(i) => i,
            Err(i) => i.saturating_sub(1),
        };
        let start = self.line_starts.get(line_idx).copied().unwrap_or(0);
        let col = match self.src.get(start..offset) {
            Some(s) => s.chars().count(),
            None => offset - start,
        };
        Pos {
            line: line_idx + 1,
            col: col + 1,
        }
    }

    fn push(&mut self, span: Option<Range<usize>>, severity: Severity, message: String) {
        let pos = self.pos(span.map_or(0, |s| s.start));
        self.push_at(pos, severity, message);
    }

    pub(crate) fn push_at(&mut self, pos: Pos, severity: Severity, message: String) {
        self.items.push(Diagnostic {
            file: self.file.clone(),
            line: pos.line,
            col: pos.col,
            severity,
            message,
        });
    }

    pub(crate) fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.push(Some(span), Severity::Error, message.into());
    }

    pub(crate) fn warn(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.push(Some(span), Severity::Warning, message.into());
    }

    /// Records a TOML syntax or shape error (its span, when it has one).
    pub(crate) fn toml_error(&mut self, err: &toml::de::Error) {
        let msg = err.message().trim_end().to_owned();
        self.push(err.span(), Severity::Error, msg);
    }

    pub(crate) fn has_errors(&self) -> bool {
        self.items.iter().any(|d| d.severity == Severity::Error)
    }

    /// Splits into (errors, warnings), each sorted by position.
    pub(crate) fn finish(mut self) -> (Vec<Diagnostic>, Vec<Diagnostic>) {
        self.items.sort_by_key(|d| (d.line, d.col));
        self.items
            .into_iter()
            .partition(|d| d.severity == Severity::Error)
    }
}
