//! `config()` and `config_from(file)`: the evaluated configuration as a map
//! of typed values, for scripts that follow the project's `.config`.
use std::path::{Path, PathBuf};

use kconfig::{Kconfig, SymbolType, Tristate};
use rhai::{Dynamic, Engine, Map};

use super::api::{Api, DocEntry};
use super::value::*;

/// The Kconfig tree: `$KNLP_KCONFIG`, else `Kconfig` in the working folder.
fn tree() -> PathBuf {
    std::env::var_os("KNLP_KCONFIG").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("Kconfig"))
}

/// Evaluate the tree with `file` and return every symbol with a value.
fn evaluated(file: &Path) -> RResult<Map> {
    let t = tree();
    let mut kc = Kconfig::load(&t, None).map_err(|e| rerr(format!("{}: {e}", t.display())))?;
    if !file.exists() {
        return Err(rerr(format!(
            "{}: no such configuration (make defconfig-<name> writes .config)",
            file.display()
        )));
    }
    kc.load_config(file).map_err(|e| rerr(e.to_string()))?;
    let mut out = Map::new();
    for s in kc.symbols() {
        let v = s.str_value();
        let d = match s.orig_type() {
            SymbolType::Bool | SymbolType::Tristate => Dynamic::from_bool(s.tri_value() != Tristate::N),
            SymbolType::Int if !v.is_empty() => Dynamic::from_int(v.parse().unwrap_or(0)),
            SymbolType::Hex if !v.is_empty() => Dynamic::from_int(
                i64::from_str_radix(v.trim_start_matches("0x").trim_start_matches("0X"), 16).unwrap_or(0),
            ),
            SymbolType::Int | SymbolType::Hex => continue,
            _ => Dynamic::from(v),
        };
        out.insert(s.name().into(), d);
    }
    Ok(out)
}

pub fn register(engine: &mut Engine, docs: &mut Vec<DocEntry>) {
    let mut api = Api::new(engine, docs);
    api.group("Script helpers");
    api.f("config", "", "The evaluated `.config` ($KCONFIG_CONFIG) of the project's Kconfig tree as a map of typed values: bools, ints, strings (keys without CONFIG_; symbols of disabled int menus are absent).", || -> RResult<Map> {
        let f = std::env::var_os("KCONFIG_CONFIG").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".config"));
        evaluated(&f)
    });
    api.f(
        "config_from",
        "file",
        "A defconfig (or any .config file) evaluated through the Kconfig tree, as `config()` returns it.",
        |file: &str| -> RResult<Map> { evaluated(Path::new(file)) },
    );
}
