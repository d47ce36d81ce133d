//! Errors and warnings.

use std::fmt;

/// What went wrong, for callers that want to react differently to kinds of
/// failures (the message says the rest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Kconfig syntax or semantics (bad token, missing `endif`, dependency loop ...).
    Parse,
    /// A file could not be read or written.
    Io,
    /// A file is not valid UTF-8.
    Encoding,
    /// A preprocessor feature that is refused (`$(shell,...)` and other
    /// function calls) or a preprocessor expansion error.
    Preprocessor,
    /// A symbol name that the configuration does not define.
    UnknownSymbol,
    /// A value that is malformed for the symbol's type.
    InvalidValue,
    /// A well-formed value that the symbol does not take (dependencies,
    /// range, missing prompt).
    ValueNotTaken,
}

/// An error with the location it concerns.
///
/// `Display` always starts with `file:line: `. Line 0 means the error is
/// about the file as a whole (it could not be opened, or the problem has no
/// single line, like an unknown symbol name given on the command line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KconfigError {
    /// The kind of failure.
    pub kind: ErrorKind,
    /// File name as kconfiglib shows it: relative to `$srctree` where possible.
    pub file: String,
    /// 1-based line number, 0 when no single line is concerned.
    pub line: usize,
    /// The message, without the location prefix.
    pub message: String,
    /// Warnings produced before the error (while parsing, for a tree that
    /// then failed to load); kconfiglib would already have printed them.
    pub warnings: Vec<Warning>,
}

impl KconfigError {
    pub(crate) fn new(
        kind: ErrorKind,
        file: impl Into<String>,
        line: usize,
        message: impl Into<String>,
    ) -> Self {
        KconfigError { kind, file: file.into(), line, message: message.into(), warnings: Vec::new() }
    }
}

impl fmt::Display for KconfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.message)
    }
}

impl std::error::Error for KconfigError {}

/// A warning, formatted like kconfiglib's: `file:line: warning: message`, or
/// `warning: message` when it has no location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// File and line, when the warning concerns one place.
    pub location: Option<(String, usize)>,
    /// The text after `warning: `.
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            Some((file, line)) => write!(f, "{}:{}: warning: {}", file, line, self.message),
            None => write!(f, "warning: {}", self.message),
        }
    }
}
