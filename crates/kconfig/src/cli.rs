//! kconfiglib's command-line tools, with the same arguments, environment
//! variables, outputs and exit statuses:
//!
//! | command | arguments |
//! |---|---|
//! | `olddefconfig`, `alldefconfig`, `allnoconfig`, `allyesconfig`, `allmodconfig` | `[KCONFIG]` |
//! | `listnewconfig` | `[--show-help\|-l] [KCONFIG]` |
//! | `savedefconfig` | `[--kconfig KCONFIG] [--out FILE]` (default `defconfig`) |
//! | `defconfig` | `[--kconfig KCONFIG] FILE` |
//! | `setconfig` | `[--kconfig KCONFIG] [--no-check-exists] [--no-check-value] NAME=VALUE...` |
//! | `config get` | `[--kconfig KCONFIG] SYMBOL` |
//! | `conf` | Linux's `scripts/kconfig/conf` command line (module [`crate::conf`]) |
//! | `config set` | `[--kconfig KCONFIG] [--no-check-exists] [--no-check-value] SYMBOL VALUE` or `NAME=VALUE...` |
//!
//! Every command also takes `--allow-shell`, which lets `$(shell,...)` run
//! commands (as Linux's `conf` always does; also `KCONFIG_ALLOW_SHELL=1`).
//!
//! `KCONFIG` defaults to `Kconfig` (relative to `$srctree`). The `.config`
//! path is `$KCONFIG_CONFIG`, default `.config`; `KCONFIG_ALLCONFIG` works
//! for the all*config commands as in the kernel. Each function takes the
//! arguments after the command name and returns the exit status: 0, 1 for
//! errors, 2 for usage errors. Messages go to `out`, warnings and errors to
//! `err`.

use std::io::Write;
use std::path::Path;

use crate::{Env, Kconfig, LoadOptions};

/// The command names [`run`] accepts.
pub const COMMANDS: &[&str] = &[
    "olddefconfig",
    "alldefconfig",
    "allnoconfig",
    "allyesconfig",
    "allmodconfig",
    "listnewconfig",
    "savedefconfig",
    "defconfig",
    "setconfig",
    "config",
    "conf",
];

/// Runs `args[0]` (one of [`COMMANDS`]) with the remaining arguments.
pub fn run(args: &[String], out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let Some(cmd) = args.first() else {
        let _ = writeln!(err, "usage: kconfig-tool COMMAND [ARGS...]\ncommands: {}", COMMANDS.join(", "));
        return 2;
    };
    let rest = &args[1..];
    match cmd.as_str() {
        "olddefconfig" => olddefconfig(rest, out, err),
        "alldefconfig" => alldefconfig(rest, out, err),
        "allnoconfig" => allnoconfig(rest, out, err),
        "allyesconfig" => allyesconfig(rest, out, err),
        "allmodconfig" => allmodconfig(rest, out, err),
        "listnewconfig" => listnewconfig(rest, out, err),
        "savedefconfig" => savedefconfig(rest, out, err),
        "defconfig" => defconfig(rest, out, err),
        "setconfig" => setconfig(rest, out, err),
        "config" => config(rest, out, err),
        "conf" => crate::conf::run(rest, out, err),
        other => {
            let _ = writeln!(err, "unknown command '{}'; commands: {}", other, COMMANDS.join(", "));
            2
        }
    }
}

/// A command-line option.
struct Opt {
    long: &'static str,
    short: Option<&'static str>,
    takes_value: bool,
}

const KCONFIG_OPT: Opt = Opt { long: "--kconfig", short: None, takes_value: true };

/// Accepted by every command: lets `$(shell,...)` run (also
/// `KCONFIG_ALLOW_SHELL=1`).
const ALLOW_SHELL_OPT: Opt = Opt { long: "--allow-shell", short: None, takes_value: false };

struct Parsed {
    opts: Vec<(&'static str, Option<String>)>,
    positional: Vec<String>,
}

impl Parsed {
    fn value(&self, long: &str) -> Option<String> {
        self.opts.iter().rev().find(|(l, _)| *l == long).and_then(|(_, v)| v.clone())
    }

    fn flag(&self, long: &str) -> bool {
        self.opts.iter().any(|(l, _)| *l == long)
    }
}

enum ParseOutcome {
    Ok(Parsed),
    Exit(i32),
}

fn looks_negative_number(s: &str) -> bool {
    s.len() > 1 && s.starts_with('-') && s[1..].parse::<f64>().is_ok()
}

/// argparse-like parsing: long options (unique prefixes accepted,
/// `--opt=value`), short options, `--`, `-h`/`--help`.
fn parse(
    prog: &str,
    usage: &str,
    help: &str,
    args: &[String],
    opts: &[Opt],
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> ParseOutcome {
    let opts: Vec<&Opt> = opts.iter().chain(std::iter::once(&ALLOW_SHELL_OPT)).collect();
    let mut parsed = Parsed { opts: Vec::new(), positional: Vec::new() };
    let mut unknown = Vec::new();
    let mut i = 0;
    let mut only_positional = false;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if only_positional || a == "-" || !a.starts_with('-') || looks_negative_number(a) {
            parsed.positional.push(a.clone());
            continue;
        }
        if a == "--" {
            only_positional = true;
            continue;
        }
        if a == "-h" || a == "--help" || (a.len() > 3 && "--help".starts_with(a.as_str())) {
            let _ = write!(out, "usage: {} {}\n\n{}", prog, usage, help);
            return ParseOutcome::Exit(0);
        }
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) if a.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let matches: Vec<&Opt> = if name.starts_with("--") {
            let exact: Vec<&Opt> = opts.iter().copied().filter(|o| o.long == name).collect();
            if exact.is_empty() {
                opts.iter().copied().filter(|o| o.long.starts_with(name.as_str())).collect()
            } else {
                exact
            }
        } else {
            opts.iter().copied().filter(|o| o.short == Some(name.as_str())).collect()
        };
        match matches.as_slice() {
            [o] => {
                if o.takes_value {
                    let v = match inline {
                        Some(v) => v,
                        None => {
                            if i < args.len() {
                                i += 1;
                                args[i - 1].clone()
                            } else {
                                let _ = writeln!(
                                    err,
                                    "usage: {} {}\n{}: error: argument {}: expected one argument",
                                    prog, usage, prog, o.long
                                );
                                return ParseOutcome::Exit(2);
                            }
                        }
                    };
                    parsed.opts.push((o.long, Some(v)));
                } else if inline.is_some() {
                    let _ = writeln!(
                        err,
                        "usage: {} {}\n{}: error: argument {}: ignored explicit argument",
                        prog, usage, prog, o.long
                    );
                    return ParseOutcome::Exit(2);
                } else {
                    parsed.opts.push((o.long, None));
                }
            }
            [] => unknown.push(a.clone()),
            _ => {
                let names: Vec<&str> = matches.iter().map(|o| o.long).collect();
                let _ = writeln!(
                    err,
                    "usage: {} {}\n{}: error: ambiguous option: {} could match {}",
                    prog,
                    usage,
                    prog,
                    name,
                    names.join(", ")
                );
                return ParseOutcome::Exit(2);
            }
        }
    }
    if !unknown.is_empty() {
        let _ = writeln!(
            err,
            "usage: {} {}\n{}: error: unrecognized arguments: {}",
            prog,
            usage,
            prog,
            unknown.join(" ")
        );
        return ParseOutcome::Exit(2);
    }
    ParseOutcome::Ok(parsed)
}

fn usage_error(prog: &str, usage: &str, msg: &str, err: &mut dyn Write) -> i32 {
    let _ = writeln!(err, "usage: {} {}\n{}: error: {}", prog, usage, prog, msg);
    2
}

fn flush_warnings(kc: &Kconfig, err: &mut dyn Write) {
    for w in kc.take_warnings() {
        let _ = writeln!(err, "{}", w);
    }
}

fn load(prog: &str, kconfig: &str, p: &Parsed, err: &mut dyn Write) -> Result<Kconfig, i32> {
    let options = LoadOptions { srctree: None, env: Env::process(), allow_shell: p.flag("--allow-shell") };
    match Kconfig::load_with(Path::new(kconfig), &options) {
        Ok(kc) => {
            flush_warnings(&kc, err);
            Ok(kc)
        }
        Err(e) => {
            for w in &e.warnings {
                let _ = writeln!(err, "{}", w);
            }
            let _ = writeln!(err, "{}: {}", prog, e);
            Err(1)
        }
    }
}

/// `[KCONFIG]` for the tools built on kconfiglib's `standard_kconfig()`.
fn standard_kconfig(
    prog: &str,
    help: &str,
    args: &[String],
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Kconfig, i32> {
    let usage = "[-h] [KCONFIG]";
    let p = match parse(prog, usage, help, args, &[], out, err) {
        ParseOutcome::Ok(p) => p,
        ParseOutcome::Exit(c) => return Err(c),
    };
    if p.positional.len() > 1 {
        let extra = p.positional[1..].join(" ");
        return Err(usage_error(prog, usage, &format!("unrecognized arguments: {}", extra), err));
    }
    let kconfig = p.positional.first().cloned().unwrap_or_else(|| "Kconfig".to_string());
    load(prog, &kconfig, &p, err)
}

/// Loads the default `.config` (or defconfig_list file) and prints the
/// message to `msg_out`.
fn load_default(
    prog: &str,
    kc: &mut Kconfig,
    msg_out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), i32> {
    let r = kc.load_default_config();
    flush_warnings(kc, err);
    match r {
        Ok(l) => {
            for w in &l.warnings {
                let _ = writeln!(err, "{}", w);
            }
            let _ = writeln!(msg_out, "{}", l.message);
            Ok(())
        }
        Err(e) => {
            let _ = writeln!(err, "{}: {}", prog, e);
            Err(1)
        }
    }
}

fn write_config(prog: &str, kc: &Kconfig, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let path = kc.standard_config_filename();
    let r = kc.write_config(Path::new(&path));
    flush_warnings(kc, err);
    match r {
        Ok(msg) => {
            let _ = writeln!(out, "{}", msg);
            0
        }
        Err(e) => {
            let _ = writeln!(err, "{}: {}", prog, e);
            1
        }
    }
}

fn allconfig(kc: &mut Kconfig, name: &str, out: &mut dyn Write, err: &mut dyn Write) -> Result<(), i32> {
    let r = kc.load_allconfig(name);
    flush_warnings(kc, err);
    match r {
        Ok(Some(msg)) => {
            let _ = writeln!(out, "{}", msg);
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(e) => {
            let _ = writeln!(err, "error: {}", e.message);
            Err(1)
        }
    }
}

const OLDDEFCONFIG_HELP: &str =
    "Updates an old .config file or creates a new one, by filling in default values
for all new symbols. The default input/output filename is '.config'; a
different one can be passed in the KCONFIG_CONFIG environment variable.
When overwriting a configuration file, the old version is saved to
<filename>.old.

positional arguments:
  KCONFIG     Top-level Kconfig file (default: Kconfig)
";

/// `olddefconfig [KCONFIG]`: loads `.config`, fills in defaults for new
/// symbols, drops what no longer applies and writes it back.
pub fn olddefconfig(args: &[String], out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let prog = "olddefconfig";
    let mut kc = match standard_kconfig(prog, OLDDEFCONFIG_HELP, args, out, err) {
        Ok(kc) => kc,
        Err(c) => return c,
    };
    if let Err(c) = load_default(prog, &mut kc, out, err) {
        return c;
    }
    write_config(prog, &kc, out, err)
}

/// `alldefconfig [KCONFIG]`: writes a configuration with every symbol at
/// its default.
pub fn alldefconfig(args: &[String], out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let prog = "alldefconfig";
    let help = "Writes a configuration file where all symbols are set to their default values.\n";
    let mut kc = match standard_kconfig(prog, help, args, out, err) {
        Ok(kc) => kc,
        Err(c) => return c,
    };
    if let Err(c) = allconfig(&mut kc, "alldef.config", out, err) {
        return c;
    }
    write_config(prog, &kc, out, err)
}

/// `allnoconfig [KCONFIG]`: as many symbols as possible n.
pub fn allnoconfig(args: &[String], out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let prog = "allnoconfig";
    let help = "Writes a configuration file where as many symbols as possible are set to 'n'.\n";
    let mut kc = match standard_kconfig(prog, help, args, out, err) {
        Ok(kc) => kc,
        Err(c) => return c,
    };
    kc.all_no();
    if let Err(c) = allconfig(&mut kc, "allno.config", out, err) {
        return c;
    }
    write_config(prog, &kc, out, err)
}

/// `allyesconfig [KCONFIG]`: as many symbols as possible y.
pub fn allyesconfig(args: &[String], out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let prog = "allyesconfig";
    let help = "Writes a configuration file where as many symbols as possible are set to 'y'.\n";
    let mut kc = match standard_kconfig(prog, help, args, out, err) {
        Ok(kc) => kc,
        Err(c) => return c,
    };
    kc.all_yes();
    if let Err(c) = allconfig(&mut kc, "allyes.config", out, err) {
        return c;
    }
    write_config(prog, &kc, out, err)
}

/// `allmodconfig [KCONFIG]`: as many symbols as possible m.
pub fn allmodconfig(args: &[String], out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let prog = "allmodconfig";
    let help = "Writes a configuration file where as many symbols as possible are set to 'm'.\n";
    let mut kc = match standard_kconfig(prog, help, args, out, err) {
        Ok(kc) => kc,
        Err(c) => return c,
    };
    kc.all_mod();
    if let Err(c) = allconfig(&mut kc, "allmod.config", out, err) {
        return c;
    }
    write_config(prog, &kc, out, err)
}

/// `listnewconfig [--show-help|-l] [KCONFIG]`: lists settable symbols that
/// `.config` does not assign (the load message goes to `err`).
pub fn listnewconfig(args: &[String], out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let prog = "listnewconfig";
    let usage = "[-h] [--show-help] [KCONFIG]";
    let help = "Lists all user-modifiable symbols that are not given a value in the
configuration file.

positional arguments:
  KCONFIG          Top-level Kconfig file (default: Kconfig)

options:
  --show-help, -l  Show any help texts as well
";
    let opts = [Opt { long: "--show-help", short: Some("-l"), takes_value: false }];
    let p = match parse(prog, usage, help, args, &opts, out, err) {
        ParseOutcome::Ok(p) => p,
        ParseOutcome::Exit(c) => return c,
    };
    if p.positional.len() > 1 {
        return usage_error(
            prog,
            usage,
            &format!("unrecognized arguments: {}", p.positional[1..].join(" ")),
            err,
        );
    }
    let kconfig = p.positional.first().cloned().unwrap_or_else(|| "Kconfig".to_string());
    let mut kc = match load(prog, &kconfig, &p, err) {
        Ok(kc) => kc,
        Err(c) => return c,
    };
    // The load message goes to stderr so that it can be filtered out.
    let mut msgs: Vec<u8> = Vec::new();
    let r = load_default(prog, &mut kc, &mut msgs, err);
    let _ = err.write_all(&msgs);
    if let Err(c) = r {
        return c;
    }
    let show_help = p.flag("--show-help");
    for e in kc.list_new_config() {
        if !e.line.is_empty() {
            let _ = writeln!(out, "{}", e.line);
        }
        if show_help {
            if let Some(h) = &e.help {
                let lines: Vec<String> = h.split('\n').map(|l| format!("  {}", l)).collect();
                let _ = writeln!(out, "{}", lines.join("\n"));
            }
        }
    }
    flush_warnings(&kc, err);
    0
}

/// `savedefconfig [--kconfig KCONFIG] [--out FILE]`: writes the minimal
/// configuration (default `defconfig`).
pub fn savedefconfig(args: &[String], out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let prog = "savedefconfig";
    let usage = "[-h] [--kconfig KCONFIG] [--out MINIMAL_CONFIGURATION]";
    let help = "Saves a minimal configuration file that only lists symbols that differ in value
from their defaults.

options:
  --kconfig KCONFIG     Top-level Kconfig file (default: Kconfig)
  --out MINIMAL_CONFIGURATION
                        Output filename for minimal configuration (default: defconfig)
";
    let opts = [KCONFIG_OPT, Opt { long: "--out", short: None, takes_value: true }];
    let p = match parse(prog, usage, help, args, &opts, out, err) {
        ParseOutcome::Ok(p) => p,
        ParseOutcome::Exit(c) => return c,
    };
    if !p.positional.is_empty() {
        return usage_error(prog, usage, &format!("unrecognized arguments: {}", p.positional.join(" ")), err);
    }
    let kconfig = p.value("--kconfig").unwrap_or_else(|| "Kconfig".to_string());
    let outfile = p.value("--out").unwrap_or_else(|| "defconfig".to_string());
    let mut kc = match load(prog, &kconfig, &p, err) {
        Ok(kc) => kc,
        Err(c) => return c,
    };
    if let Err(c) = load_default(prog, &mut kc, out, err) {
        return c;
    }
    let r = kc.write_min_config(Path::new(&outfile));
    flush_warnings(&kc, err);
    match r {
        Ok(msg) => {
            let _ = writeln!(out, "{}", msg);
            0
        }
        Err(e) => {
            let _ = writeln!(err, "{}: {}", prog, e);
            1
        }
    }
}

/// `defconfig [--kconfig KCONFIG] FILE`: loads a (minimal) configuration
/// and writes the full `.config`.
pub fn defconfig(args: &[String], out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let prog = "defconfig";
    let usage = "[-h] [--kconfig KCONFIG] CONFIGURATION";
    let help = "Reads a specified configuration file, then writes a new configuration file.

positional arguments:
  CONFIGURATION      Input configuration file

options:
  --kconfig KCONFIG  Top-level Kconfig file (default: Kconfig)
";
    let p = match parse(prog, usage, help, args, &[KCONFIG_OPT], out, err) {
        ParseOutcome::Ok(p) => p,
        ParseOutcome::Exit(c) => return c,
    };
    match p.positional.len() {
        0 => return usage_error(prog, usage, "the following arguments are required: CONFIGURATION", err),
        1 => {}
        _ => {
            return usage_error(
                prog,
                usage,
                &format!("unrecognized arguments: {}", p.positional[1..].join(" ")),
                err,
            )
        }
    }
    let kconfig = p.value("--kconfig").unwrap_or_else(|| "Kconfig".to_string());
    let mut kc = match load(prog, &kconfig, &p, err) {
        Ok(kc) => kc,
        Err(c) => return c,
    };
    let r = kc.load_config(Path::new(&p.positional[0]));
    flush_warnings(&kc, err);
    match r {
        Ok(l) => {
            for w in &l.warnings {
                let _ = writeln!(err, "{}", w);
            }
            let _ = writeln!(out, "{}", l.message);
        }
        Err(e) => {
            let _ = writeln!(err, "{}: {}", prog, e);
            return 1;
        }
    }
    write_config(prog, &kc, out, err)
}

const SET_HELP: &str = "Sets configuration values from the command line: loads the configuration
file, applies the assignments with all Kconfig rules, and writes it back.
Symbol names are given without 'CONFIG_'. The exit status on errors is 1.

options:
  --kconfig KCONFIG   Top-level Kconfig file (default: Kconfig)
  --no-check-exists   Ignore assignments to non-existent symbols instead of erroring out
  --no-check-value    Ignore assignments that didn't \"take\" (where the symbol got a
                      different value, e.g. due to unsatisfied dependencies) instead
                      of erroring out
";

fn set_opts() -> [Opt; 3] {
    [
        KCONFIG_OPT,
        Opt { long: "--no-check-exists", short: None, takes_value: false },
        Opt { long: "--no-check-value", short: None, takes_value: false },
    ]
}

/// `setconfig [--kconfig KCONFIG] [--no-check-exists] [--no-check-value]
/// NAME=VALUE...`: kconfiglib's setconfig.
pub fn setconfig(args: &[String], out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let prog = "setconfig";
    let usage = "[-h] [--kconfig KCONFIG] [--no-check-exists] [--no-check-value] [ASSIGNMENT ...]";
    let p = match parse(prog, usage, SET_HELP, args, &set_opts(), out, err) {
        ParseOutcome::Ok(p) => p,
        ParseOutcome::Exit(c) => return c,
    };
    let mut assignments = Vec::new();
    for a in &p.positional {
        match a.split_once('=') {
            Some((n, v)) => assignments.push((n.to_string(), v.to_string())),
            None => assignments.push((a.clone(), String::new())),
        }
    }
    apply_assignments(prog, &p, &assignments, &p.positional, out, err)
}

fn apply_assignments(
    prog: &str,
    p: &Parsed,
    assignments: &[(String, String)],
    raw: &[String],
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> i32 {
    let kconfig = p.value("--kconfig").unwrap_or_else(|| "Kconfig".to_string());
    let check_exists = !p.flag("--no-check-exists");
    let check_value = !p.flag("--no-check-value");
    let mut kc = match load(prog, &kconfig, p, err) {
        Ok(kc) => kc,
        Err(c) => return c,
    };
    if let Err(c) = load_default(prog, &mut kc, out, err) {
        return c;
    }
    for (i, (name, value)) in assignments.iter().enumerate() {
        if !raw.is_empty() && !raw[i].contains('=') {
            let _ = writeln!(err, "error: no '=' in assignment: '{}'", raw[i]);
            return 1;
        }
        // A .config line cannot hold a line break: it would corrupt the file.
        if value.contains(['\n', '\r']) {
            let _ = writeln!(
                err,
                "error: the value for {name} holds a line break, which a .config line cannot store"
            );
            return 1;
        }
        let Some(sym) = kc.symbol(name) else {
            if !check_exists {
                continue;
            }
            let _ = writeln!(err, "error: no symbol '{}' in configuration", name);
            return 1;
        };
        let orig_type = sym.orig_type();
        let ok = kc.set_user_value(name, value);
        flush_warnings(&kc, err);
        if !ok {
            let _ =
                writeln!(err, "error: '{}' is an invalid value for the {} symbol {}", value, orig_type, name);
            return 1;
        }
        if !check_value {
            continue;
        }
        let got = kc.symbol(name).map(|s| s.str_value()).unwrap_or_default();
        flush_warnings(&kc, err);
        if got != *value {
            let _ = writeln!(
                err,
                "error: {} was assigned the value '{}', but got the value '{}'. Check the symbol's dependencies, \
                 and make sure that it has a prompt.",
                name, value, got
            );
            return 1;
        }
    }
    write_config(prog, &kc, out, err)
}

/// `config get SYMBOL` prints a symbol's value (after loading `.config`);
/// `config set SYMBOL VALUE` (or `config set NAME=VALUE...`) works like
/// `setconfig`.
pub fn config(args: &[String], out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let prog = "config";
    let usage = "[-h] {get,set} ...";
    let help = "config get [--kconfig KCONFIG] SYMBOL
    Prints the value of SYMBOL (n/m/y, the number, or the string) after
    loading the configuration file.
config set [--kconfig KCONFIG] [--no-check-exists] [--no-check-value] SYMBOL VALUE
config set [...] NAME=VALUE...
    Loads the configuration file, sets the values with all Kconfig rules
    (like setconfig) and writes it back.
";
    match args.first().map(String::as_str) {
        Some("get") => config_get(&args[1..], out, err),
        Some("set") => config_set(&args[1..], out, err),
        Some("-h") | Some("--help") => {
            let _ = write!(out, "usage: {} {}\n\n{}", prog, usage, help);
            0
        }
        _ => usage_error(prog, usage, "expected 'get' or 'set'", err),
    }
}

fn config_get(args: &[String], out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let prog = "config get";
    let usage = "[-h] [--kconfig KCONFIG] SYMBOL";
    let help = "Prints the value of SYMBOL after loading the configuration file.\n";
    let p = match parse(prog, usage, help, args, &[KCONFIG_OPT], out, err) {
        ParseOutcome::Ok(p) => p,
        ParseOutcome::Exit(c) => return c,
    };
    if p.positional.len() != 1 {
        return usage_error(prog, usage, "expected exactly one SYMBOL", err);
    }
    let kconfig = p.value("--kconfig").unwrap_or_else(|| "Kconfig".to_string());
    let mut kc = match load(prog, &kconfig, &p, err) {
        Ok(kc) => kc,
        Err(c) => return c,
    };
    // Keep stdout to the value alone: the load message goes to stderr.
    let mut msgs: Vec<u8> = Vec::new();
    let r = load_default(prog, &mut kc, &mut msgs, err);
    let _ = err.write_all(&msgs);
    if let Err(c) = r {
        return c;
    }
    let name = &p.positional[0];
    let name = name.strip_prefix(kc.config_prefix()).filter(|n| kc.symbol(n).is_some()).unwrap_or(name);
    let Some(sym) = kc.symbol(name) else {
        let _ = writeln!(err, "error: no symbol '{}' in configuration", name);
        return 1;
    };
    let v = sym.str_value();
    flush_warnings(&kc, err);
    let _ = writeln!(out, "{}", v);
    0
}

fn config_set(args: &[String], out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let prog = "config set";
    let usage =
        "[-h] [--kconfig KCONFIG] [--no-check-exists] [--no-check-value] (SYMBOL VALUE | NAME=VALUE...)";
    let p = match parse(prog, usage, SET_HELP, args, &set_opts(), out, err) {
        ParseOutcome::Ok(p) => p,
        ParseOutcome::Exit(c) => return c,
    };
    let pos = &p.positional;
    if pos.is_empty() {
        return usage_error(prog, usage, "expected SYMBOL VALUE", err);
    }
    if pos.len() == 2 && !pos[0].contains('=') {
        let assignments = vec![(pos[0].clone(), pos[1].clone())];
        return apply_assignments(prog, &p, &assignments, &[], out, err);
    }
    let assignments: Vec<(String, String)> = pos
        .iter()
        .map(|a| match a.split_once('=') {
            Some((n, v)) => (n.to_string(), v.to_string()),
            None => (a.clone(), String::new()),
        })
        .collect();
    apply_assignments(prog, &p, &assignments, pos, out, err)
}
