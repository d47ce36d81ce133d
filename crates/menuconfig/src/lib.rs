//! `menuconfig`: an interactive terminal interface for Kconfig trees, in
//! the style of the Linux kernel's and kconfiglib's menuconfig, over the
//! [`kconfig`] engine.
//!
//! ```no_run
//! use std::path::Path;
//!
//! let outcome = menuconfig::run(Path::new("Kconfig"), Path::new(".config"))?;
//! println!("{}", outcome.message);
//! # Ok::<(), menuconfig::Error>(())
//! ```
//!
//! The interface is a pure state machine ([`State`]: [`State::handle`]
//! takes a [`Key`] and returns an [`Action`]; [`State::render`] draws into
//! a ratatui [`Buffer`](ratatui::buffer::Buffer)); [`run`] drives it on the
//! terminal, restoring the terminal on exit, on errors, on panics and on
//! SIGTERM/SIGHUP/SIGINT/SIGQUIT.

#![warn(missing_docs)]

mod info;
mod render;
mod state;
mod term;
mod tree;

#[cfg(test)]
mod tests;

use std::fmt;
use std::io::Write;
use std::path::Path;

use kconfig::LoadOptions;

pub use state::{Action, Key, State};

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Whether the configuration was written during the session (`s`, or
    /// `y` at the quit prompt).
    pub saved: bool,
    /// kconfiglib's closing message, e.g. `Configuration saved to
    /// '.config'` or `No changes to save (for '.config')`.
    pub message: String,
}

/// Why [`run`] failed.
#[derive(Debug)]
pub enum Error {
    /// The Kconfig tree or the `.config` file could not be loaded.
    Kconfig(kconfig::KconfigError),
    /// Standard output is not a terminal.
    NotATerminal,
    /// Terminal input/output failed.
    Terminal(std::io::Error),
    /// SIGTERM, SIGHUP, SIGINT or SIGQUIT arrived (the number); unsaved
    /// changes were discarded.
    Signal(i32),
    /// The interface panicked (the message; the panic hook already printed
    /// it once the terminal was restored).
    Panic(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Kconfig(e) => write!(f, "{}", e),
            Error::NotATerminal => {
                write!(f, "menuconfig needs a terminal (standard output is not a terminal)")
            }
            Error::Terminal(e) => write!(f, "terminal error: {}", e),
            Error::Signal(s) => write!(f, "terminated by signal {}; unsaved changes were discarded", s),
            Error::Panic(m) => write!(f, "internal error: {}", m),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Kconfig(e) => Some(e),
            Error::Terminal(e) => Some(e),
            _ => None,
        }
    }
}

/// Loads `kconfig_path` (relative to `$srctree` when set, like kconfiglib)
/// and the configuration at `config_path` (if present; load warnings are
/// shown in a window), runs the interface on the terminal, and writes
/// `config_path` with the engine's `write_config` when the user saves.
pub fn run(kconfig_path: &Path, config_path: &Path) -> Result<Outcome, Error> {
    run_with(kconfig_path, config_path, &LoadOptions::default())
}

/// [`run`] with explicit load options (environment, `$(shell,...)`).
pub fn run_with(kconfig_path: &Path, config_path: &Path, options: &LoadOptions) -> Result<Outcome, Error> {
    let mut state = State::load_with(kconfig_path, config_path, options)?;
    term::run_ui(&mut state)
}

const USAGE: &str = "usage: menuconfig [-h] [--allow-shell] [kconfig]";

const HELP: &str = "\
usage: menuconfig [-h] [--allow-shell] [kconfig]

Interactive terminal interface for configuring a Kconfig tree.

positional arguments:
  kconfig     Top-level Kconfig file (default: Kconfig)

options:
  -h, --help     show this help message and exit
  --allow-shell  let $(shell,...) in the Kconfig files run commands (as Linux's
                 conf does; also KCONFIG_ALLOW_SHELL=1)

The configuration file is $KCONFIG_CONFIG, else .config; $srctree sets the
directory Kconfig paths are relative to.";

/// kconfiglib's `menuconfig [KCONFIG]` command line. `args` are the
/// arguments after the program name. Prints the closing message on
/// stdout, errors on stderr; returns the exit status (0 success, 1 error,
/// 2 usage error, 128 + N when killed by signal N).
pub fn main_from_args(args: &[String]) -> i32 {
    let mut positional = Vec::new();
    let mut only_positional = false;
    let mut options = LoadOptions::default();
    for a in args {
        if !only_positional && a == "--allow-shell" {
            options.allow_shell = true;
        } else if !only_positional && a == "--" {
            only_positional = true;
        } else if !only_positional && (a == "-h" || a == "--help") {
            println!("{}", HELP);
            return 0;
        } else if !only_positional && a.starts_with('-') && a.len() > 1 {
            eprintln!("{}\nmenuconfig: error: unrecognized arguments: {}", USAGE, a);
            return 2;
        } else {
            positional.push(a.as_str());
        }
    }
    if positional.len() > 1 {
        eprintln!("{}\nmenuconfig: error: unrecognized arguments: {}", USAGE, positional[1..].join(" "));
        return 2;
    }
    let kconfig = positional.first().copied().unwrap_or("Kconfig");
    let config = std::env::var("KCONFIG_CONFIG").ok().filter(|s| !s.is_empty()).unwrap_or(".config".into());
    match run_with(Path::new(kconfig), Path::new(&config), &options) {
        Ok(outcome) => {
            println!("{}", outcome.message);
            let _ = std::io::stdout().flush();
            0
        }
        Err(e) => {
            if let Error::Kconfig(k) = &e {
                for w in &k.warnings {
                    eprintln!("{}", w);
                }
            }
            eprintln!("menuconfig: {}", e);
            match e {
                Error::Signal(s) => 128 + s,
                _ => 1,
            }
        }
    }
}
