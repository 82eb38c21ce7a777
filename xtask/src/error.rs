//! The error type of the xtask commands.
//!
//! Every command returns [`Result`]; `main` prints the error and exits non-zero. The variants
//! separate what the user got wrong (usage, a bad scenario file) from what the machine lacks
//! (packages) and from tools that ran and failed, so each message can say what to do next.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

/// Result of an xtask command.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why an xtask command failed.
#[derive(Debug)]
pub enum Error {
    /// Wrong command-line arguments; the message includes the usage line.
    Usage(String),
    /// `-h`/`--help`: the usage text, which `main` prints on standard output before exiting
    /// successfully. Asking for help is not an error, but it ends the command.
    Help(String),
    /// An I/O operation failed; `context` says on what.
    Io { context: String, source: io::Error },
    /// An external program could not be started.
    Spawn { program: String, source: io::Error },
    /// An external program ran and failed.
    ToolFailed {
        command: String,
        status: ExitStatus,
        detail: String,
    },
    /// System packages or Rust targets are missing and could not be installed here.
    Deps(String),
    /// A configuration or input file (scenario, manifest, template) is invalid.
    Config { path: PathBuf, message: String },
    /// The command ran but its result is a failure (tests failed, benchmark output incomplete).
    Failed(String),
    /// A failure whose details the command has already printed (e.g. `test`, whose closing
    /// `N passed, N failed` line must stay the last line): exit non-zero, print nothing more.
    AlreadyReported,
}

impl Error {
    /// An [`Error::Config`] about `path`.
    pub fn config(path: &Path, message: impl Into<String>) -> Self {
        Error::Config {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(message) | Error::Help(message) => f.write_str(message),
            Error::Io { context, source } => write!(f, "{context}: {source}"),
            Error::Spawn { program, source } => write!(f, "cannot run `{program}`: {source}"),
            Error::ToolFailed {
                command,
                status,
                detail,
            } => {
                write!(f, "`{command}` failed ({status})")?;
                if !detail.is_empty() {
                    write!(f, ":\n{}", detail.trim_end())?;
                }
                Ok(())
            }
            Error::Deps(message) => f.write_str(message),
            Error::Config { path, message } => write!(f, "{}: {message}", path.display()),
            Error::Failed(message) => f.write_str(message),
            Error::AlreadyReported => f.write_str("failed (see above)"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } | Error::Spawn { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Adds what was being done to an [`io::Error`].
pub trait IoContext<T> {
    /// Wraps the error as [`Error::Io`] with the context computed by `context`.
    fn context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: context(),
            source,
        })
    }
}
