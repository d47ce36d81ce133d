//! Linux's `scripts/kconfig/conf` front end: the same options, environment
//! variables, messages and `.config` format as Linux 6.1's `conf`, so that
//! a kernel build can call this in its place:
//!
//! ```text
//! conf [--allow-shell] [-s] --alldefconfig|--allnoconfig|--allyesconfig|--allmodconfig|
//!          --randconfig|--olddefconfig|--listnewconfig|--helpnewconfig|--defconfig FILE|
//!          --savedefconfig FILE|--yes2modconfig|--mod2yesconfig|--mod2noconfig  KCONFIG
//! ```
//!
//! Environment: `srctree`, `KCONFIG_CONFIG` (default `.config`),
//! `KCONFIG_ALLCONFIG`, `KCONFIG_SEED`, `KCONFIG_PROBABILITY`,
//! `KCONFIG_DEFCONFIG_LIST`, and whatever the Kconfig files reference.
//!
//! Not provided: the interactive modes (`--oldaskconfig`, `--oldconfig`;
//! use menuconfig) and `--syncconfig` (no `include/config/auto.conf` or
//! `autoconf.h` is written). Warnings are not printed in `conf`'s words
//! (see README.md).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{save_old, Env, Kconfig, LoadOptions, SymbolType, Tristate};

/// What `conf` is asked to do.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    AllNo,
    AllYes,
    AllMod,
    AllDef,
    Rand,
    OldDef,
    ListNew,
    HelpNew,
    Defconfig,
    SaveDefconfig,
    Rewrite(Tristate, Tristate),
}

/// Long options: name, mode, whether it takes a file argument.
const MODES: &[(&str, Mode, bool)] = &[
    ("allnoconfig", Mode::AllNo, false),
    ("allyesconfig", Mode::AllYes, false),
    ("allmodconfig", Mode::AllMod, false),
    ("alldefconfig", Mode::AllDef, false),
    ("randconfig", Mode::Rand, false),
    ("olddefconfig", Mode::OldDef, false),
    ("listnewconfig", Mode::ListNew, false),
    ("helpnewconfig", Mode::HelpNew, false),
    ("defconfig", Mode::Defconfig, true),
    ("savedefconfig", Mode::SaveDefconfig, true),
    ("yes2modconfig", Mode::Rewrite(Tristate::Y, Tristate::M), false),
    ("mod2yesconfig", Mode::Rewrite(Tristate::M, Tristate::Y), false),
    ("mod2noconfig", Mode::Rewrite(Tristate::M, Tristate::N), false),
];

const USAGE: &str = "Usage: conf [options] <kconfig-file>

Generic options:
  -h, --help              Print this message and exit.
  -s, --silent            Do not print log.
  --allow-shell           Let $(shell,...) run commands (also KCONFIG_ALLOW_SHELL=1).

Mode options:
  --listnewconfig         List new options
  --helpnewconfig         List new options and help text
  --olddefconfig          Same as oldconfig but sets new symbols to their default value
  --defconfig <file>      New config with default defined in <file>
  --savedefconfig <file>  Save the minimal current configuration to <file>
  --allnoconfig           New config where all options are answered with no
  --allyesconfig          New config where all options are answered with yes
  --allmodconfig          New config where all options are answered with mod
  --alldefconfig          New config with all symbols set to default
  --randconfig            New config with random answer to all options
  --yes2modconfig         Change answers from yes to mod if possible
  --mod2yesconfig         Change answers from mod to yes if possible
  --mod2noconfig          Change answers from mod to no if possible
";

struct Args {
    mode: Mode,
    file: Option<String>,
    kconfig: String,
    silent: bool,
    allow_shell: bool,
}

/// Parses `conf`'s command line; `Err` is the exit status.
fn parse_args(args: &[String], out: &mut dyn Write, err: &mut dyn Write) -> Result<Args, i32> {
    let mut mode = None;
    let (mut file, mut kconfig, mut silent, mut allow_shell) = (None, None, false, false);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => {
                let _ = write!(out, "{}", USAGE);
                return Err(1);
            }
            "-s" | "--silent" => silent = true,
            "--allow-shell" => allow_shell = true,
            "--oldaskconfig" | "--oldconfig" | "--syncconfig" => {
                let _ = writeln!(
                    err,
                    "conf: {} is not provided: use menuconfig to answer new options, \
                     or --olddefconfig to take their defaults",
                    a
                );
                return Err(1);
            }
            s if s.starts_with("--") => {
                let (name, inline) = match s[2..].split_once('=') {
                    Some((n, v)) => (n, Some(v.to_string())),
                    None => (&s[2..], None),
                };
                let Some(&(_, m, takes_file)) = MODES.iter().find(|(n, _, _)| *n == name) else {
                    let _ = writeln!(err, "conf: unrecognized option '{}'\n{}", s, USAGE);
                    return Err(1);
                };
                if takes_file {
                    file = inline.or_else(|| it.next().cloned());
                    if file.is_none() {
                        let _ = writeln!(err, "conf: option '--{}' requires an argument\n{}", name, USAGE);
                        return Err(1);
                    }
                }
                mode = Some(m);
            }
            _ if kconfig.is_none() => kconfig = Some(a.clone()),
            _ => {}
        }
    }
    let Some(kconfig) = kconfig else {
        let _ = writeln!(err, "conf: Kconfig file missing\n{}", USAGE);
        return Err(1);
    };
    let Some(mode) = mode else {
        let _ = writeln!(err, "conf: give a mode option (the interactive --oldaskconfig is not provided)");
        return Err(1);
    };
    Ok(Args { mode, file, kconfig, silent, allow_shell })
}

/// Runs `conf` with `args` (without the program name); returns the exit
/// status.
pub fn run(args: &[String], out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    match run_inner(args, out, err) {
        Ok(()) => 0,
        Err(code) => code,
    }
}

fn run_inner(args: &[String], out: &mut dyn Write, err: &mut dyn Write) -> Result<(), i32> {
    let a = parse_args(args, out, err)?;
    let env = Env::process();
    let config_name = env.get("KCONFIG_CONFIG").filter(|s| !s.is_empty()).unwrap_or(".config".into());
    let mut rng = None;
    if a.mode == Mode::Rand {
        let seed = randconfig_seed(&env);
        let _ = writeln!(out, "KCONFIG_SEED=0x{:X}", seed);
        rng = Some(Rng::new(seed));
    }
    let options = LoadOptions { srctree: None, env: env.clone(), allow_shell: a.allow_shell };
    let mut kc = Kconfig::load_with(Path::new(&a.kconfig), &options).map_err(|e| {
        let _ = writeln!(err, "{}", e);
        1
    })?;
    // kconfiglib's sanity warnings are not conf's; drop them.
    kc.take_warnings();
    kc.set_warnings_enabled(false);
    kc.linux_semantics = true;
    kc.invalidate();
    let message = |out: &mut dyn Write, msg: &str| {
        if !a.silent {
            let _ = writeln!(out, "#\n# {}\n#", msg);
        }
    };

    match a.mode {
        Mode::Defconfig => {
            let file = a.file.as_deref().unwrap_or_default();
            let loaded = find_file(&kc, file).and_then(|p| kc.load_config(&p).ok());
            if loaded.is_none() {
                let _ = writeln!(err, "***\n*** Can't find default configuration \"{}\"!\n***", file);
                return Err(1);
            }
        }
        Mode::AllNo | Mode::AllYes | Mode::AllMod | Mode::AllDef | Mode::Rand => {
            let name = match a.mode {
                Mode::AllNo => "allno.config",
                Mode::AllYes => "allyes.config",
                Mode::AllMod => "allmod.config",
                Mode::AllDef => "alldef.config",
                _ => "allrandom.config",
            };
            if let Err(e) = kc.load_allconfig(name) {
                let _ = writeln!(err, "*** {}", e.message);
                return Err(1);
            }
        }
        _ => {
            if let Some(msg) = read_default(&mut kc, &config_name, &env) {
                message(out, &msg);
            }
        }
    }

    match a.mode {
        Mode::AllNo => kc.all_no(),
        Mode::AllYes => kc.all_yes(),
        Mode::AllMod => kc.all_mod(),
        Mode::Rand => {
            let p = probabilities(&env).map_err(|e| {
                let _ = writeln!(err, "conf: {}", e);
                1
            })?;
            randomize(&mut kc, rng.as_mut().expect("seeded above"), p);
        }
        Mode::Rewrite(from, to) => rewrite_tristates(&mut kc, from, to),
        _ => {}
    }

    match a.mode {
        Mode::ListNew => {
            for e in kc.list_new_config() {
                let _ = writeln!(out, "{}", e.line);
            }
            Ok(())
        }
        Mode::HelpNew => {
            for e in kc.list_new_config() {
                let help = e.help.as_deref().unwrap_or("There is no help available for this option.");
                let _ = writeln!(
                    out,
                    "-----\n\n{}{}:\n\n{}\n\n{}\n-----",
                    kc.config_prefix(),
                    e.name,
                    help.trim_end(),
                    e.line
                );
            }
            Ok(())
        }
        Mode::SaveDefconfig => {
            let file = a.file.as_deref().unwrap_or_default();
            kc.config_header.clear();
            std::fs::write(file, kc.min_config_text()).map_err(|_| {
                let _ = writeln!(err, "n*** Error while saving defconfig to: {}\n", file);
                1
            })
        }
        _ => {
            let name = &config_name;
            kc.config_header =
                format!("#\n# Automatically generated file; DO NOT EDIT.\n# {}\n#\n", kc.mainmenu_text());
            match write_config(&kc, Path::new(name)) {
                Ok(true) => message(out, &format!("configuration written to {}", name)),
                Ok(false) => message(out, &format!("No change to {}", name)),
                Err(e) => {
                    let _ =
                        writeln!(err, "{}: {}\n\n*** Error during writing of the configuration.\n", name, e);
                    return Err(1);
                }
            }
            Ok(())
        }
    }
}

/// `conf_read(NULL)`: `name` (`$KCONFIG_CONFIG`), else the first file of
/// `$KCONFIG_DEFCONFIG_LIST` that exists. Returns the message to print.
fn read_default(kc: &mut Kconfig, name: &str, env: &Env) -> Option<String> {
    if let Some(p) = find_file(kc, name) {
        kc.load_config(&p).ok();
        return None;
    }
    let list = env.get("KCONFIG_DEFCONFIG_LIST").unwrap_or_default();
    let (name, p) = list.split_whitespace().find_map(|n| find_file(kc, n).map(|p| (n, p)))?;
    kc.load_config(&p).ok()?;
    Some(format!("using defaults found in {}", name))
}

/// A file as `conf` opens it: the name as given, else under `$srctree`.
fn find_file(kc: &Kconfig, name: &str) -> Option<PathBuf> {
    let p = Path::new(name);
    if p.is_file() {
        return Some(p.to_path_buf());
    }
    let under = Path::new(kc.srctree()).join(name);
    (!p.is_absolute() && !kc.srctree().is_empty() && under.is_file()).then_some(under)
}

/// Writes `.config` through a temporary file; false when nothing changed.
/// The previous file is kept as `<name>.old`.
fn write_config(kc: &Kconfig, path: &Path) -> std::io::Result<bool> {
    let text = kc.config_text();
    if std::fs::read(path).is_ok_and(|old| old == text.as_bytes()) {
        return Ok(false);
    }
    let tmp = path.with_file_name(format!(
        ".tmpconfig.{}",
        path.file_name().map_or(String::new(), |n| n.to_string_lossy().into_owned())
    ));
    std::fs::write(&tmp, &text)?;
    save_old(path);
    std::fs::rename(&tmp, path)?;
    Ok(true)
}

/// `yes2modconfig` and friends: user values `from` of tristates become `to`.
fn rewrite_tristates(kc: &mut Kconfig, from: Tristate, to: Tristate) {
    let names: Vec<String> = kc
        .symbols()
        .filter(|s| {
            s.symbol_type() == SymbolType::Tristate && s.user_value().as_deref() == Some(from.as_str())
        })
        .map(|s| s.name().to_string())
        .collect();
    for n in names {
        kc.set_user_value(&n, to.as_str());
    }
}

/// `KCONFIG_SEED` (decimal, `0x` hex or `0` octal, like `strtol(.., 0)`),
/// else one from the clock.
fn randconfig_seed(env: &Env) -> u32 {
    if let Some(s) = env.get("KCONFIG_SEED").filter(|s| !s.is_empty()) {
        let t = s.trim_start();
        let parsed = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
            i64::from_str_radix(h, 16)
        } else if t.len() > 1 && t.starts_with('0') {
            i64::from_str_radix(&t[1..], 8)
        } else {
            t.parse::<i64>()
        };
        if let Ok(v) = parsed {
            return v as u32;
        }
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    ((now.as_secs() + 1) * (now.subsec_micros() as u64 + 1)) as u32
}

/// `KCONFIG_PROBABILITY` as `conf` reads it (`Documentation/kbuild/
/// kconfig.rst`): `Y` (bools y, tristates y and m sharing it), `Y:M`
/// (tristates; bools y with both), or `B:Y:M`, in percent. Returns (bool y,
/// tristate y, tristate m); default (50, 33, 33).
fn probabilities(env: &Env) -> Result<(u32, u32, u32), String> {
    let Some(text) = env.get("KCONFIG_PROBABILITY").filter(|s| !s.is_empty()) else {
        return Ok((50, 33, 33));
    };
    let bad = || format!("KCONFIG_PROBABILITY={}: expected Y, Y:M or B:Y:M, percentages 0-100", text);
    let p: Vec<u32> = text
        .split(':')
        .take(3)
        .map(|v| v.trim().parse::<u32>().ok().filter(|&v| v <= 100).ok_or_else(bad))
        .collect::<Result<_, _>>()?;
    let (b, y, m) = match p.as_slice() {
        [b] => (*b, b - b / 2, b / 2),
        [y, m] => (y + m, *y, *m),
        [b, y, m] => (*b, *y, *m),
        _ => return Err(bad()),
    };
    if y + m > 100 {
        return Err(bad());
    }
    Ok((b, y, m))
}

/// xorshift64*: a small seeded generator (randconfig need not match
/// `conf`'s `rand()` stream, only be reproducible from its seed).
struct Rng(u64);

impl Rng {
    fn new(seed: u32) -> Rng {
        Rng((seed as u64) ^ 0x9E37_79B9_7F4A_7C15)
    }

    fn below(&mut self, n: u32) -> u32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) % n as u64) as u32
    }
}

/// randconfig: every visible bool/tristate without a value gets a random
/// value (the nearest assignable one), every visible y-mode choice a random
/// visible member; repeated until a pass finds nothing new (settings reveal
/// symbols). Each symbol and choice is decided once.
fn randomize(kc: &mut Kconfig, rng: &mut Rng, (bool_y, tri_y, tri_m): (u32, u32, u32)) {
    let mut done_syms = std::collections::HashSet::new();
    let mut done_choices = std::collections::HashSet::new();
    loop {
        let mut todo: Vec<(String, &'static str)> = Vec::new();
        for s in kc.symbols() {
            if s.user_value().is_some()
                || s.choice().is_some()
                || s.visibility() == Tristate::N
                || done_syms.contains(s.name())
            {
                continue;
            }
            let can = s.assignable();
            if can.len() < 2 {
                continue;
            }
            let r = rng.below(100);
            let want = match s.symbol_type() {
                SymbolType::Bool if r < bool_y => Tristate::Y,
                SymbolType::Bool => Tristate::N,
                SymbolType::Tristate if r < tri_y => Tristate::Y,
                SymbolType::Tristate if r < tri_y + tri_m => Tristate::M,
                SymbolType::Tristate => Tristate::N,
                _ => continue,
            };
            let v = *can.iter().min_by_key(|t| (**t as i32 - want as i32).abs()).unwrap_or(&want);
            todo.push((s.name().to_string(), v.as_str()));
        }
        let mut picks: Vec<(usize, Tristate, Option<String>)> = Vec::new();
        for c in kc.choices() {
            if c.visibility() == Tristate::N || done_choices.contains(&c.index()) {
                continue;
            }
            let members: Vec<String> = c
                .symbols()
                .iter()
                .filter(|m| m.visibility() != Tristate::N)
                .map(|m| m.name().to_string())
                .collect();
            let pick = (c.mode() == Tristate::Y && !members.is_empty())
                .then(|| members[rng.below(members.len() as u32) as usize].clone());
            picks.push((c.index(), c.mode(), pick));
        }
        if todo.is_empty() && picks.is_empty() {
            return;
        }
        for (name, v) in todo {
            kc.set_user_value(&name, v);
            done_syms.insert(name);
        }
        for (choice, mode, pick) in picks {
            kc.set_choice_mode(choice, mode);
            if let Some(m) = pick {
                kc.set_user_value(&m, "y");
            }
            done_choices.insert(choice);
        }
    }
}
