//! A Kconfig engine: parses Kconfig trees and reads and writes `.config`
//! files with the semantics of the Linux kernel's kconfig, verified against
//! Python kconfiglib 14.1 (whose algorithms it ports one to one).
//!
//! ```no_run
//! use std::path::Path;
//! use kconfig::Kconfig;
//!
//! let mut kconf = Kconfig::load(Path::new("Kconfig"), None)?;
//! let load = kconf.load_config(Path::new(".config"))?;
//! for w in &load.warnings {
//!     eprintln!("{w}");
//! }
//! kconf.set_value("DEBUG", "y")?;
//! println!("{}", kconf.write_config(Path::new(".config"))?);
//! # Ok::<(), kconfig::KconfigError>(())
//! ```
//!
//! - [`Kconfig`]: the parsed tree and the current values. Loading parses,
//!   finalises the menu tree and rejects dependency loops.
//! - [`Symbol`], [`Choice`], [`MenuNode`]: read-only views for queries and
//!   for building a menuconfig-like interface.
//! - [`cli`]: the kconfiglib command-line tools (`olddefconfig`,
//!   `savedefconfig`, `config set` ...) as functions over argument lists.
//!
//! Warnings (kconfiglib prints them on stderr) are collected; take them
//! with [`Kconfig::take_warnings`]. Errors are [`KconfigError`]s whose
//! `Display` starts with `file:line: `.

#![warn(missing_docs)]

mod api;
pub mod cli;
pub mod conf;
mod config;
mod error;
mod eval;
mod finalize;
mod model;
mod parse;
mod util;

use std::path::{Path, PathBuf};

pub use api::{Choice, Location, MenuNode, NodeKind, Property, Symbol, Value};
pub use config::{ConfigLoad, NewConfigEntry};
pub use error::{ErrorKind, KconfigError, Warning};
pub use model::{Kconfig, SymbolType, Tristate};
pub use util::{escape, unescape, Env};

use config::{std_io_msg, SetVal};
use model::*;
use parse::{read_text, Parser, ReadError};
use util::{path_join, realpath};

/// Options for [`Kconfig::load_with`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// The source tree that `source` statements (and the top-level Kconfig
    /// path) are relative to. `None`: the `srctree` environment variable,
    /// else the current directory.
    pub srctree: Option<PathBuf>,
    /// The environment for `$(NAME)`, `option env`, `srctree`, `CONFIG_`,
    /// `KCONFIG_CONFIG` and the other variables kconfiglib reads.
    pub env: Env,
    /// Let `$(shell,...)` run commands (`/bin/sh -c`), as Linux's `conf`
    /// does. Off by default; also switched on by `KCONFIG_ALLOW_SHELL=1`.
    pub allow_shell: bool,
}

impl Kconfig {
    /// Parses the Kconfig tree rooted at `path` (looked up relative to the
    /// source tree, like kconfiglib), using the process environment.
    ///
    /// `srctree` overrides the `srctree` environment variable.
    pub fn load(path: &Path, srctree: Option<&Path>) -> Result<Kconfig, KconfigError> {
        Kconfig::load_with(
            path,
            &LoadOptions { srctree: srctree.map(Path::to_path_buf), env: Env::process(), allow_shell: false },
        )
    }

    /// [`Kconfig::load`] with explicit options.
    pub fn load_with(path: &Path, options: &LoadOptions) -> Result<Kconfig, KconfigError> {
        let env = options.env.clone();
        let mut kc = Kconfig::empty(env.clone());
        let filename = path.to_string_lossy().into_owned();
        kc.srctree = match &options.srctree {
            Some(p) => p.to_string_lossy().into_owned(),
            None => env.get("srctree").unwrap_or_default(),
        };
        kc.srctree_prefix = format!("{}/", realpath(&kc.srctree));
        kc.top_filename = filename.clone();
        kc.config_prefix = env.get("CONFIG_").unwrap_or_else(|| "CONFIG_".to_string());
        kc.config_header = env.get("KCONFIG_CONFIG_HEADER").unwrap_or_default();
        // kconfiglib only warns about assignments to undefined symbols with
        // KCONFIG_WARN_UNDEF_ASSIGN=y; here they are reported unless it is n.
        kc.warn_assign_undef = env.get("KCONFIG_WARN_UNDEF_ASSIGN").as_deref() != Some("n");
        kc.modules = kc.lookup_sym("MODULES");
        kc.allow_shell = options.allow_shell || env.get("KCONFIG_ALLOW_SHELL").as_deref() == Some("1");

        let mut top = Node::new(Item::Menu, filename.as_str().into(), 1, Default::default());
        top.is_menuconfig = true;
        top.prompt = Some(("Main menu".to_string(), Expr::y()));
        kc.nodes.push(top);
        kc.top = 0;
        kc.kconfig_filenames.push(filename.clone());

        let full = path_join(&kc.srctree, &filename);
        let text = match read_text(&full, &filename) {
            Ok(t) => t,
            Err(ReadError::Io(e)) => {
                return Err(KconfigError::new(
                    ErrorKind::Io,
                    &filename,
                    0,
                    format!("could not open '{}' ({})", full, parse::io_reason(&e)),
                ))
            }
            Err(ReadError::Decode(e)) => return Err(e),
        };
        let r = Parser::new(&mut kc, &filename, text).parse_top(0);
        kc.parsing = false;
        match r.and_then(|()| kc.finalize()) {
            Ok(()) => Ok(kc),
            Err(mut e) => {
                e.warnings = kc.take_warnings();
                Err(e)
            }
        }
    }

    // ----- general information -----

    /// The `mainmenu` text ("Main menu" if none).
    pub fn mainmenu_text(&self) -> &str {
        self.nodes[self.top].prompt.as_ref().map(|p| p.0.as_str()).unwrap_or("Main menu")
    }

    /// `$srctree` as used for this tree (empty: the current directory).
    pub fn srctree(&self) -> &str {
        &self.srctree
    }

    /// The prefix of `.config` names, `CONFIG_` unless the `CONFIG_`
    /// environment variable overrides it.
    pub fn config_prefix(&self) -> &str {
        &self.config_prefix
    }

    /// Every Kconfig file read, in order (relative to `$srctree` where
    /// possible).
    pub fn kconfig_filenames(&self) -> &[String] {
        &self.kconfig_filenames
    }

    /// Environment variables referenced with `$(NAME)`.
    pub fn env_vars(&self) -> Vec<String> {
        self.env_vars.iter().cloned().collect()
    }

    /// Assignments to undefined symbols seen by the last `.config` load, as
    /// (name, value).
    pub fn missing_symbols(&self) -> &[(String, String)] {
        &self.missing_syms
    }

    /// The `.config` path the tools use: `$KCONFIG_CONFIG`, else `.config`.
    pub fn standard_config_filename(&self) -> String {
        self.env.get("KCONFIG_CONFIG").unwrap_or_else(|| ".config".to_string())
    }

    // ----- warnings -----

    /// Removes and returns the warnings collected so far.
    pub fn take_warnings(&self) -> Vec<Warning> {
        std::mem::take(&mut *self.warnings.borrow_mut())
    }

    /// Turns all warnings on or off (kconfiglib's `Kconfig.warn`).
    pub fn set_warnings_enabled(&mut self, on: bool) {
        self.warn.set(on);
    }

    /// Whether assignments to undefined symbols in `.config` files are
    /// warned about (default: yes, unless `KCONFIG_WARN_UNDEF_ASSIGN=n`).
    pub fn set_warn_undefined_assignments(&mut self, on: bool) {
        self.warn_assign_undef = on;
    }

    // ----- queries -----

    /// The symbol called `name` (without the `CONFIG_` prefix). Symbols that
    /// are only referenced (undefined) are found too; see
    /// [`Symbol::is_defined`].
    pub fn symbol(&self, name: &str) -> Option<Symbol<'_>> {
        self.sym_map.get(name).map(|&id| Symbol::new(self, id))
    }

    /// Defined symbols in Kconfig order, each once.
    pub fn symbols(&self) -> impl Iterator<Item = Symbol<'_>> + '_ {
        self.unique_defined_syms.iter().map(move |&id| Symbol::new(self, id))
    }

    /// Choices in Kconfig order, each once.
    pub fn choices(&self) -> impl Iterator<Item = Choice<'_>> + '_ {
        self.unique_choices.iter().map(move |&id| Choice::new(self, id))
    }

    /// The implicit top-level menu; its children are the top-level entries.
    pub fn top_node(&self) -> MenuNode<'_> {
        MenuNode::new(self, self.top)
    }

    /// Every menu node below the top node, in tree (and `.config`) order.
    pub fn menu_nodes(&self) -> impl Iterator<Item = MenuNode<'_>> + '_ {
        self.all_nodes().into_iter().map(move |id| MenuNode::new(self, id))
    }

    /// Evaluates a condition such as `FOO && (BAR || BAZ = 3)` against the
    /// current values (`m` means `m && MODULES`, as in `depends on`).
    pub fn eval_string(&mut self, expr: &str) -> Result<Tristate, KconfigError> {
        // Names not in the configuration get temporary symbols; drop them
        // afterwards so repeated calls do not grow the symbol table.
        let n_syms = self.syms.len();
        let r = Parser::new(self, "<expression>", String::new())
            .parse_expression(expr)
            .map(|e| Tristate::from_u8(self.eval(&e)));
        self.syms.truncate(n_syms);
        r
    }

    // ----- values -----

    /// Sets a symbol like kconfiglib's `setconfig` does: the value must be
    /// well-formed for the type (`n`/`m`/`y` for bool and tristate, a
    /// decimal or hex number, any string), and the symbol must end up with
    /// exactly that value (it must have a visible prompt, be in range and
    /// not be forced by `select`). On error nothing changes.
    pub fn set_value(&mut self, name: &str, value: &str) -> Result<(), KconfigError> {
        let Some(&s) = self.sym_map.get(name) else {
            return Err(KconfigError::new(
                ErrorKind::UnknownSymbol,
                &self.top_filename,
                0,
                format!("no symbol '{}' in configuration", name),
            ));
        };
        let (file, line) = match self.syms[s].nodes.first() {
            Some(&n) => (self.nodes[n].filename.to_string(), self.nodes[n].linenr),
            None => (self.top_filename.clone(), 0),
        };
        let saved_sym = self.syms[s].user_value.clone();
        let saved_choice =
            self.syms[s].choice.map(|c| (c, self.choices[c].user_value, self.choices[c].user_selection));
        if !self.sym_set_value(s, SetVal::Str(value.to_string())) {
            return Err(KconfigError::new(
                ErrorKind::InvalidValue,
                file,
                line,
                format!(
                    "'{}' is an invalid value for the {} symbol {}",
                    value,
                    self.syms[s].orig_type.as_str(),
                    name
                ),
            ));
        }
        let got = self.sym_str(s);
        if got != value {
            self.syms[s].user_value = saved_sym;
            if let Some((c, mode, sel)) = saved_choice {
                self.choices[c].user_value = mode;
                self.choices[c].user_selection = sel;
            }
            self.invalidate();
            return Err(KconfigError::new(
                ErrorKind::ValueNotTaken,
                file,
                line,
                format!(
                    "{} was assigned the value '{}', but got the value '{}'. Check the symbol's dependencies, \
                     and make sure that it has a prompt.",
                    name, value, got
                ),
            ));
        }
        Ok(())
    }

    /// Stores a user value like an assignment in a `.config` file
    /// (kconfiglib's `Symbol.set_value`): returns false, with a warning,
    /// when the value is malformed for the type or the symbol is unknown.
    /// The value may not take effect (check [`Symbol::str_value`]).
    pub fn set_user_value(&mut self, name: &str, value: &str) -> bool {
        match self.sym_map.get(name) {
            Some(&s) => self.sym_set_value(s, SetVal::Str(value.to_string())),
            None => false,
        }
    }

    /// Removes the user value of a symbol.
    pub fn unset_value(&mut self, name: &str) {
        if let Some(&s) = self.sym_map.get(name) {
            self.sym_unset_value(s);
        }
    }

    /// Removes all user values (symbols and choices).
    pub fn unset_all(&mut self) {
        self.unset_all_impl();
    }

    /// Sets the mode of a choice (see [`Choice::index`]); false if the mode
    /// is not valid for its type. Optional choices can be set to n; m needs
    /// a tristate choice and modules.
    pub fn set_choice_mode(&mut self, choice: usize, mode: Tristate) -> bool {
        if choice >= self.choices.len() {
            return false;
        }
        self.choice_set_value(choice, SetVal::Tri(mode as u8))
    }

    // ----- .config files -----

    /// Reads a `.config` file, replacing all user values (symbols not in the
    /// file lose theirs). Also tries `$srctree/path`.
    pub fn load_config(&mut self, path: &Path) -> Result<ConfigLoad, KconfigError> {
        self.load_config_report(Some(&path.to_string_lossy()), true)
    }

    /// Reads a `.config` file on top of the current user values.
    pub fn merge_config(&mut self, path: &Path) -> Result<ConfigLoad, KconfigError> {
        self.load_config_report(Some(&path.to_string_lossy()), false)
    }

    /// Reads `$KCONFIG_CONFIG` (default `.config`); when it does not exist,
    /// the first existing file of the `option defconfig_list` symbol, else
    /// nothing (the message says which).
    pub fn load_default_config(&mut self) -> Result<ConfigLoad, KconfigError> {
        self.load_config_report(None, true)
    }

    fn load_config_report(&mut self, path: Option<&str>, replace: bool) -> Result<ConfigLoad, KconfigError> {
        let before = self.warnings.borrow().len();
        let message = self.load_config_impl(path, replace)?;
        let warnings = self.warnings.borrow_mut().split_off(before);
        Ok(ConfigLoad { message, warnings })
    }

    /// The `.config` contents [`Kconfig::write_config`] would write.
    pub fn config_text(&self) -> String {
        self.config_contents()
    }

    /// Writes the configuration (the old file is kept as `<path>.old`; an
    /// unchanged file is not touched). Returns kconfiglib's message.
    pub fn write_config(&self, path: &Path) -> Result<String, KconfigError> {
        let name = path.to_string_lossy().into_owned();
        let contents = self.config_contents();
        if contents_eq(path, &contents) {
            return Ok(format!("No change to configuration in '{}'", name));
        }
        save_old(path);
        write_file(path, &contents)?;
        Ok(format!("Configuration saved to '{}'", name))
    }

    /// The minimal configuration (`savedefconfig`): only values that differ
    /// from what the defaults would give.
    pub fn min_config_text(&self) -> String {
        self.min_config_contents()
    }

    /// Writes the minimal configuration. Returns kconfiglib's message.
    pub fn write_min_config(&self, path: &Path) -> Result<String, KconfigError> {
        let name = path.to_string_lossy().into_owned();
        let contents = self.min_config_contents();
        if contents_eq(path, &contents) {
            return Ok(format!("No change to minimal configuration in '{}'", name));
        }
        write_file(path, &contents)?;
        Ok(format!("Minimal configuration saved to '{}'", name))
    }

    /// Lists the symbols a user could set that have no user value (new
    /// symbols), like `listnewconfig`.
    pub fn list_new_config(&self) -> Vec<NewConfigEntry> {
        self.new_config_entries()
    }

    // ----- all*config -----

    /// `allnoconfig`: every symbol as low as it can go (`option
    /// allnoconfig_y` symbols y).
    pub fn all_no(&mut self) {
        self.all_no_impl();
    }

    /// `allyesconfig`: every symbol as high as it can go, choices in their
    /// highest mode.
    pub fn all_yes(&mut self) {
        self.all_yes_impl();
    }

    /// `allmodconfig`: tristates m, bools y.
    pub fn all_mod(&mut self) {
        self.all_mod_impl();
    }

    /// `alldefconfig`: default values only.
    pub fn all_defconfig(&mut self) {
        self.unset_all_impl();
    }

    /// Merges `$KCONFIG_ALLCONFIG` like the all*config tools: unset does
    /// nothing; empty or `1` means `name` (e.g. `allno.config`) or
    /// `all.config`; anything else is a path. Returns the load message.
    pub fn load_allconfig(&mut self, name: &str) -> Result<Option<String>, KconfigError> {
        let Some(allconfig) = self.env.get("KCONFIG_ALLCONFIG") else { return Ok(None) };
        let (old_o, old_r) = (self.warn_assign_override, self.warn_assign_redun);
        self.warn_assign_override = false;
        self.warn_assign_redun = false;
        let r = self.load_allconfig_inner(&allconfig, name);
        self.warn_assign_override = old_o;
        self.warn_assign_redun = old_r;
        r.map(Some)
    }

    fn load_allconfig_inner(&mut self, allconfig: &str, name: &str) -> Result<String, KconfigError> {
        // Like `_open_config`: `f`, else `$srctree/f`; a failure reports the
        // second attempt.
        let opens = |kc: &Kconfig, f: &str| -> Result<(), String> {
            if std::fs::File::open(f).is_ok() {
                return Ok(());
            }
            let alt = path_join(&kc.srctree, f);
            std::fs::File::open(&alt).map(|_| ()).map_err(|e| std_io_msg(&e, &alt))
        };
        if allconfig.is_empty() || allconfig == "1" {
            match opens(self, name) {
                Ok(()) => self.load_config_impl(Some(name), false),
                Err(e1) => match opens(self, "all.config") {
                    Ok(()) => self.load_config_impl(Some("all.config"), false),
                    Err(e2) => Err(KconfigError::new(
                        ErrorKind::Io,
                        name,
                        0,
                        format!(
                            "KCONFIG_ALLCONFIG is set, but neither {} nor all.config could be opened: {}, {}",
                            name, e1, e2
                        ),
                    )),
                },
            }
        } else {
            match opens(self, allconfig) {
                Ok(()) => self.load_config_impl(Some(allconfig), false),
                Err(e) => Err(KconfigError::new(
                    ErrorKind::Io,
                    allconfig,
                    0,
                    format!("KCONFIG_ALLCONFIG is set to '{}', which could not be opened: {}", allconfig, e),
                )),
            }
        }
    }

    fn unset_all_impl(&mut self) {
        self.unset_all_values();
    }
}

fn contents_eq(path: &Path, contents: &str) -> bool {
    match std::fs::read(path) {
        Ok(b) => match String::from_utf8(b) {
            Ok(s) => s.replace("\r\n", "\n").replace('\r', "\n") == contents,
            Err(_) => false,
        },
        Err(_) => false,
    }
}

/// Keeps the previous file as `<path>.old` (errors ignored, as in
/// kconfiglib). Symlinks are copied to keep the link; only regular files are
/// moved (never a device such as `/dev/null`).
pub(crate) fn save_old(path: &Path) {
    let mut old = path.as_os_str().to_owned();
    old.push(".old");
    let old = PathBuf::from(old);
    let Ok(meta) = std::fs::symlink_metadata(path) else { return };
    if meta.file_type().is_symlink() {
        if std::fs::metadata(path).map(|m| m.is_file()).unwrap_or(false) {
            let _ = std::fs::copy(path, &old);
        }
    } else if meta.is_file() {
        let _ = std::fs::rename(path, &old);
    }
}

fn write_file(path: &Path, contents: &str) -> Result<(), KconfigError> {
    std::fs::write(path, contents).map_err(|e| {
        KconfigError::new(
            ErrorKind::Io,
            path.to_string_lossy(),
            0,
            format!("could not write '{}' ({})", path.display(), parse::io_reason(&e)),
        )
    })
}
