//! The one error type of the pure model: a parse or validation failure with a position.

/// A value given to the model was not valid.
///
/// It names what was being parsed, the input (with any secret redacted), the byte position of the
/// problem, what is wrong there and what would be valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {input:?} at byte {position}: {problem}; {expected}")]
#[non_exhaustive]
pub struct ParseError {
    /// What was being parsed ("NFS address", "mount options", ...).
    pub what: &'static str,
    /// The input, with secret values replaced by `***`.
    pub input: String,
    /// Byte offset of the problem in `input`.
    pub position: usize,
    /// What is wrong at `position`.
    pub problem: String,
    /// What a valid value looks like.
    pub expected: String,
}

impl ParseError {
    /// An error about `input` (what it is, e.g. "NFS address"), at byte `position`.
    pub fn new(
        what: &'static str,
        input: &str,
        position: usize,
        problem: impl Into<String>,
        expected: impl Into<String>,
    ) -> Self {
        ParseError { what, input: input.to_owned(), position, problem: problem.into(), expected: expected.into() }
    }
}

/// Position of the first control character (NUL, newline, ...) in `s`, if any.
pub(crate) fn first_control(s: &str) -> Option<usize> {
    s.char_indices().find(|(_, c)| c.is_control()).map(|(i, _)| i)
}
