//! Sweeps (spec 11.7): a sweep file of `CONFIG_X=start:step:end` ranges,
//! `CONFIG_X=a|b|c` choices and single values expands to the Cartesian
//! product of its variables (names sorted, the last one varying fastest),
//! each combination laid over a base `.config`.
//!
//! Every configuration is checked by the Kconfig engine before anything
//! runs: each swept value must hold (a known symbol, its type, its range,
//! its dependencies), and the configuration must read as an experiment with
//! at least one cell. Each configuration then becomes one or more cells
//! `config_NNN_<cell id>` of one matrix project (`runs/sweep-<name>-<time>/`)
//! that carry their configuration's evaluated experiment, so the matrix
//! runner, `knlp continue`, BASELINE, `knlp results` and the graphs treat a
//! sweep like any matrix. After a run, `sweep_summary.json`, `.md` and `.txt`
//! rank the cells by their headline metric, with the swept values per row,
//! and list the failures with their error.
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use kconfig::{Kconfig, SymbolType, Tristate};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::{Experiment, Reader};
use crate::matrix::{self, Cell, MatrixFile};
use crate::runs::RunDir;

/// The sweep's record in its project folder.
pub const SWEEP_FILE: &str = "sweep.json";
pub const SUMMARY_JSON: &str = "sweep_summary.json";
pub const SUMMARY_MD: &str = "sweep_summary.md";
pub const SUMMARY_TXT: &str = "sweep_summary.txt";
/// Each configuration's frozen `.config`, in the project folder.
pub const CONFIGS_DIR: &str = "configs";
/// More configurations than this need `--force` (`make FORCE=1`).
pub const MAX_CONFIGS: usize = 10_000;
/// Not even `--force` expands more than this.
pub const HARD_MAX_CONFIGS: usize = 1_000_000;

/// Settings of the whole sweep, not of one configuration: a sweep cannot vary them.
const SWEEP_WIDE: &[(&str, &str)] = &[
    ("RUNS_DIR", "the folder of the sweep's project"),
    ("TRACKER_PROJECT", "the sweep's project; `make sweep PROJECT=name` names it"),
    ("PARALLEL_JOBS", "cells run at once"),
    ("BASELINE", "a run reused by the sweep"),
    ("AUTO_GRAPHS", "the graphs drawn at the end"),
    ("DIST_NPROC", "ranks per cell"),
    ("DIST_TIMEOUT", "the ranks' timeout"),
];

/// One variable of a sweep file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Variable {
    /// The symbol, without `CONFIG_`.
    pub name: String,
    /// Its values (unquoted), in the order given.
    pub values: Vec<String>,
    /// Its line in the sweep file.
    pub line: usize,
}

/// A parsed sweep file.
#[derive(Clone, Debug)]
pub struct SweepFile {
    pub path: PathBuf,
    pub text: String,
    /// Sorted by name.
    pub variables: Vec<Variable>,
}

/// Cut an inline `#` comment that is outside double quotes.
fn strip_comment(line: &str) -> &str {
    split_outside(line, '#')[0]
}

/// Split at `sep` outside double quotes.
fn split_outside(s: &str, sep: char) -> Vec<&str> {
    let (mut quoted, mut escaped, mut start) = (false, false, 0);
    let mut out = Vec::new();
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                out.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

/// A value as written: `"..."` (with `\"` and `\\`) or bare.
fn unquote(s: &str) -> std::result::Result<String, String> {
    let s = s.trim();
    if let Some(inner) = s.strip_prefix('"') {
        let inner = inner.strip_suffix('"').ok_or_else(|| format!("unbalanced quotes in {s}"))?;
        let mut out = String::new();
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => out.push(chars.next().ok_or_else(|| format!("{s}: a quoted value ends in \\"))?),
                '"' => return Err(format!("{s}: write a quote inside a quoted value as \\\"")),
                c => out.push(c),
            }
        }
        return Ok(out);
    }
    if s.contains('"') {
        return Err(format!("unbalanced quotes in {s}"));
    }
    Ok(s.to_string())
}

/// `x` as the user wrote the range: exponent style (`1e-3`) if any bound
/// was, else with as many decimals as the most precise bound.
fn format_float(x: f64, exp_style: bool, decimals: usize) -> String {
    if exp_style {
        // Twelve significant digits drop the multiplication's last bits
        // (3 * 1e-4 = 0.00030000000000000003).
        let clean: f64 = format!("{x:.11e}").parse().unwrap_or(x);
        format!("{clean:e}")
    } else {
        format!("{x:.decimals$}")
    }
}

/// `start:step:end`, inclusive: integers when all three are, else floats.
fn range(v: &str) -> std::result::Result<Vec<String>, String> {
    let parts: Vec<&str> = v.split(':').map(str::trim).collect();
    let [a, b, c] = parts.as_slice() else {
        return Err("a range is start:step:end, three numbers (quote a string that holds ':')".into());
    };
    if let (Ok(s), Ok(st), Ok(e)) = (a.parse::<i64>(), b.parse::<i64>(), c.parse::<i64>()) {
        if st <= 0 {
            return Err(format!("the step {st} must be > 0"));
        }
        if s > e {
            return Err(format!("the start {s} is after the end {e}"));
        }
        let n = (e as i128 - s as i128) / st as i128 + 1;
        if n > HARD_MAX_CONFIGS as i128 {
            return Err(format!("the range gives {n} values, more than {HARD_MAX_CONFIGS}"));
        }
        return Ok((0..n).map(|k| (s as i128 + k * st as i128).to_string()).collect());
    }
    let num = |x: &str| {
        x.parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .ok_or_else(|| format!("'{x}' is not a number (a range is start:step:end)"))
    };
    let (s, st, e) = (num(a)?, num(b)?, num(c)?);
    if st <= 0.0 {
        return Err(format!("the step {b} must be > 0"));
    }
    if s > e {
        return Err(format!("the start {a} is after the end {c}"));
    }
    let span = (e - s) / st;
    if !span.is_finite() || span >= HARD_MAX_CONFIGS as f64 {
        return Err(format!("the range gives more than {HARD_MAX_CONFIGS} values"));
    }
    // A last value within a billionth of a step of the end is the end: each
    // value is start + k * step (no running sum), and 0.1:0.1:0.3 has three.
    let n = (span + 1e-9).floor() as usize;
    let exp_style = [a, b, c].iter().any(|x| x.contains(['e', 'E']));
    let decimals = [a, b, c].iter().map(|x| x.split_once('.').map_or(0, |(_, f)| f.len())).max().unwrap_or(0);
    Ok((0..=n)
        .map(|k| {
            let mut x = s + k as f64 * st;
            if k == n && (x - e).abs() <= 1e-9 * st {
                x = e;
            }
            if x.abs() <= 1e-9 * st {
                x = 0.0;
            }
            format_float(x, exp_style, decimals)
        })
        .collect())
}

/// The values of one `CONFIG_X=...` right-hand side.
fn expand_value(value: &str) -> std::result::Result<Vec<String>, String> {
    let parts = split_outside(value, '|');
    if parts.len() > 1 {
        let mut out: Vec<String> = Vec::new();
        for p in parts {
            let p = p.trim();
            if p.is_empty() {
                return Err("an empty choice (write \"\" for an empty string)".into());
            }
            let v = unquote(p)?;
            if out.contains(&v) {
                return Err(format!("the choice {p} is given twice"));
            }
            out.push(v);
        }
        return Ok(out);
    }
    let v = value.trim();
    if !v.starts_with('"') && split_outside(v, ':').len() > 1 {
        return range(v);
    }
    Ok(vec![unquote(v)?])
}

impl SweepFile {
    pub fn read(path: &Path) -> Result<SweepFile> {
        let text = fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the sweep file", path.display()))?;
        SweepFile::parse(&text, path)
    }

    /// Parse `text` (from `path`, for messages): one `CONFIG_NAME=VALUE`
    /// per line; blank lines and `#` comments are skipped.
    pub fn parse(text: &str, path: &Path) -> Result<SweepFile> {
        let mut vars: Vec<Variable> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = strip_comment(raw).trim();
            if line.is_empty() {
                continue;
            }
            let at = format!("{}:{}", path.display(), i + 1);
            let assignment = line.strip_prefix("CONFIG_").and_then(|r| r.split_once('='));
            let Some((name, value)) = assignment
                .filter(|(n, _)| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
            else {
                bail!("{at}: expected CONFIG_NAME=value, CONFIG_NAME=start:step:end or CONFIG_NAME=a|b|c, got '{line}'");
            };
            if let Some(first) = vars.iter().find(|v| v.name == name) {
                bail!("{at}: CONFIG_{name} is given again (first on line {})", first.line);
            }
            if value.trim().is_empty() {
                bail!("{at}: CONFIG_{name} has no value (write \"\" for an empty string)");
            }
            let values =
                expand_value(value).map_err(|e| anyhow!("{at}: CONFIG_{name}={}: {e}", value.trim()))?;
            vars.push(Variable { name: name.to_string(), values, line: i + 1 });
        }
        if vars.is_empty() {
            bail!("{}: no CONFIG_ lines: nothing to sweep", path.display());
        }
        vars.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(SweepFile { path: path.to_path_buf(), text: text.to_string(), variables: vars })
    }

    /// The number of configurations (None when it overflows).
    pub fn count(&self) -> Option<usize> {
        self.variables.iter().try_fold(1usize, |n, v| n.checked_mul(v.values.len()))
    }

    /// Every combination, as (symbol, value) in name order; the last
    /// variable varies fastest.
    pub fn combinations(&self) -> Vec<Vec<(String, String)>> {
        let mut out: Vec<Vec<(String, String)>> = vec![Vec::new()];
        for v in &self.variables {
            out = out
                .into_iter()
                .flat_map(|prefix| {
                    v.values.iter().map(move |x| {
                        let mut p = prefix.clone();
                        p.push((v.name.clone(), x.clone()));
                        p
                    })
                })
                .collect();
        }
        out
    }

    /// Variables with more than one value (all of them when none has).
    pub fn swept(&self) -> Vec<&Variable> {
        let many: Vec<&Variable> = self.variables.iter().filter(|v| v.values.len() > 1).collect();
        if many.is_empty() {
            self.variables.iter().collect()
        } else {
            many
        }
    }

    fn at(&self, name: &str) -> String {
        let line = self.variables.iter().find(|v| v.name == name).map_or(0, |v| v.line);
        format!("{}:{line}", self.path.display())
    }
}

/// How to expand a sweep.
#[derive(Clone, Debug)]
pub struct Options {
    /// The Kconfig tree.
    pub kconfig: PathBuf,
    /// The base configuration each combination is laid over.
    pub base: PathBuf,
    /// `make VAR=value` overrides, applied to every configuration.
    pub overrides: Vec<(String, String)>,
    /// Allow more than [`MAX_CONFIGS`] configurations.
    pub force: bool,
}

/// One configuration of a sweep, checked.
#[derive(Clone, Debug)]
pub struct Configuration {
    /// `config_001`, ...
    pub name: String,
    /// The swept values, (symbol, value) in name order.
    pub values: Vec<(String, String)>,
    /// Its complete `.config` (overrides included), with a header.
    pub text: String,
    pub experiment: Experiment,
    /// Its cells, ids prefixed with the name, each carrying the experiment.
    pub cells: Vec<Cell>,
}

/// A sweep expanded and checked: what `knlp sweep` runs.
#[derive(Clone, Debug)]
pub struct Plan {
    pub sweep: SweepFile,
    pub base: PathBuf,
    pub base_text: String,
    /// The base with the overrides: the sweep-wide settings (runs folder,
    /// jobs, ranks, baseline, graphs).
    pub experiment: Experiment,
    pub configs: Vec<Configuration>,
    pub overrides: Vec<(String, String)>,
    /// Warnings of the Kconfig engine, each once.
    pub warnings: Vec<String>,
}

/// `(symbol, value)` pairs as `A=1, B="x"`.
fn show_values(values: &[(String, String)]) -> String {
    values.iter().map(|(n, v)| format!("CONFIG_{n}={}", show_value(v))).collect::<Vec<_>>().join(", ")
}

/// A value quoted when it is empty or holds a space, quote, `|` or `#`.
fn show_value(v: &str) -> String {
    if v.is_empty() || v.contains([' ', '"', '|', '#', ':']) {
        format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        v.to_string()
    }
}

/// Why `value` is not a value of a symbol of type `ty`, if it is not.
fn check_type(ty: SymbolType, value: &str) -> std::result::Result<(), String> {
    let ok = match ty {
        SymbolType::Bool => ["y", "n"].contains(&value),
        SymbolType::Tristate => ["y", "m", "n"].contains(&value),
        SymbolType::Int => value.parse::<i64>().is_ok(),
        SymbolType::Hex => value
            .strip_prefix("0x")
            .or_else(|| value.strip_prefix("0X"))
            .is_some_and(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit())),
        _ => true,
    };
    if ok {
        return Ok(());
    }
    let want = match ty {
        SymbolType::Bool => "y or n",
        SymbolType::Tristate => "y, m or n",
        SymbolType::Int => "an integer",
        _ => "a hex number (0x...)",
    };
    let ty = format!("{ty:?}").to_lowercase();
    Err(format!("'{value}' is not a value of this {ty} symbol (it takes {want})"))
}

/// The `.config` line that gives symbol `name` of type `ty` the value.
fn config_line(name: &str, ty: SymbolType, value: &str) -> String {
    match ty {
        SymbolType::String => {
            format!("CONFIG_{name}=\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
        }
        SymbolType::Bool | SymbolType::Tristate if value == "n" => format!("# CONFIG_{name} is not set"),
        _ => format!("CONFIG_{name}={value}"),
    }
}

/// `base` without its lines for `names`, then `lines`.
fn overlay(base: &str, names: &[&str], lines: &[String]) -> String {
    let mut out = String::new();
    for l in base.lines() {
        let t = l.trim();
        let assigns = names.iter().any(|n| {
            t.strip_prefix("CONFIG_").and_then(|r| r.strip_prefix(n)).is_some_and(|r| r.starts_with('='))
                || t == format!("# CONFIG_{n} is not set")
        });
        if !assigns {
            out.push_str(l);
            out.push('\n');
        }
    }
    out.push_str("# the sweep's values\n");
    for l in lines {
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// Why symbol `name` did not keep `want` (its value is `got`).
fn why_not(kc: &Kconfig, name: &str, want: &str) -> String {
    let Some(sym) = kc.symbol(name) else { return format!("CONFIG_{name} is not defined") };
    let got = sym.str_value();
    let why = if sym.prompt().is_none() {
        "it has no prompt, so no configuration sets it".to_string()
    } else if sym.direct_deps_value() == Tristate::N {
        format!("unmet dependencies: {}", sym.direct_deps())
    } else if let Some(r) = sym.ranges().first() {
        format!("allowed range {}", r.value.replace(' ', " to "))
    } else {
        "the Kconfig tree gives it another value (a select, a choice or a dependency)".to_string()
    };
    format!("CONFIG_{name}={} does not hold (value is '{got}'; {why})", show_value(want))
}

/// A scratch folder, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Scratch> {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let d = std::env::temp_dir().join(format!("knlp-sweep-{}-{}", std::process::id(), t.as_nanos()));
        fs::create_dir_all(&d).with_context(|| format!("{}: cannot create", d.display()))?;
        Ok(Scratch(d))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Expand `sweep` over the base of `opts` and check every configuration
/// with the Kconfig engine; nothing is written (but a scratch file).
pub fn expand(sweep: &SweepFile, opts: &Options) -> Result<Plan> {
    let n = sweep.count().unwrap_or(usize::MAX);
    let sizes: Vec<String> = sweep.variables.iter().map(|v| v.values.len().to_string()).collect();
    if n > HARD_MAX_CONFIGS || (n > MAX_CONFIGS && !opts.force) {
        let more = if n > HARD_MAX_CONFIGS {
            format!("more than {HARD_MAX_CONFIGS}, which not even --force allows")
        } else {
            format!("more than {MAX_CONFIGS}; narrow the ranges or pass --force (make FORCE=1)")
        };
        let count = if n == usize::MAX { "too many".to_string() } else { n.to_string() };
        bail!("{}: {} value(s) give {count} configurations, {more}", sweep.path.display(), sizes.join(" x "));
    }
    if !opts.base.exists() {
        bail!(
            "{}: no base configuration; run `make defconfig-<name>` or give --base FILE (make sweep BASE=FILE)",
            opts.base.display()
        );
    }
    let base_text = fs::read_to_string(&opts.base).with_context(|| format!("{}", opts.base.display()))?;
    // The base must check out by itself, as `make check-config` checks it.
    crate::config::check_file(&opts.kconfig, &opts.base)
        .map_err(|e| anyhow!("the base configuration {}: {e:#}", opts.base.display()))?;
    let (kc, base_warnings) = crate::config::load(&opts.kconfig, &opts.base, &opts.overrides)?;
    let experiment = Experiment::read(&Reader::new(&kc))?;
    let mut warnings = base_warnings;

    let mut kc = Kconfig::load(&opts.kconfig, None).map_err(|e| anyhow!("{e}"))?;
    let mut types = BTreeMap::new();
    for v in &sweep.variables {
        let at = sweep.at(&v.name);
        if let Some((_, what)) = SWEEP_WIDE.iter().find(|(n, _)| *n == v.name) {
            bail!(
                "{at}: CONFIG_{} is a setting of the whole sweep ({what}), not of one configuration; set it in the base configuration or on the command line",
                v.name
            );
        }
        let ty = kc
            .symbol(&v.name)
            .filter(|s| s.is_defined())
            .map(|s| s.orig_type())
            .ok_or_else(|| anyhow!("{at}: CONFIG_{}: the Kconfig tree defines no such symbol", v.name))?;
        for x in &v.values {
            check_type(ty, x).map_err(|e| anyhow!("{at}: CONFIG_{}: {e}", v.name))?;
        }
        types.insert(v.name.clone(), ty);
    }

    let combos = sweep.combinations();
    let width = combos.len().to_string().len().max(3);
    let names: Vec<&str> = sweep.variables.iter().map(|v| v.name.as_str()).collect();
    let scratch = Scratch::new()?;
    let file = scratch.0.join("config");
    let mut configs = Vec::with_capacity(combos.len());
    for (i, values) in combos.into_iter().enumerate() {
        let name = format!("config_{:0width$}", i + 1);
        let what = format!("{name} ({})", show_values(&values));
        let lines: Vec<String> = values.iter().map(|(n, v)| config_line(n, types[n], v)).collect();
        fs::write(&file, overlay(&base_text, &names, &lines))
            .with_context(|| format!("{}: cannot write", file.display()))?;
        let loaded = kc.load_config(&file).map_err(|e| anyhow!("{}: {what}: {e}", sweep.path.display()))?;
        let mut problems: Vec<String> = loaded.warnings.iter().map(|w| w.to_string()).collect();
        problems.extend(kc.take_warnings().iter().map(|w| w.to_string()));
        if !problems.is_empty() {
            let shown = problems.join("; ").replace(&file.display().to_string(), &name);
            bail!("{}: {what}: {shown}", sweep.path.display());
        }
        let holds = |kc: &Kconfig| {
            values.iter().find(|(n, v)| kc.symbol(n).map(|s| s.str_value()) != Some(v.clone()))
        };
        if let Some((n, v)) = holds(&kc) {
            bail!("{}: {what}: {}", sweep.at(n), why_not(&kc, n, v));
        }
        for (k, v) in &opts.overrides {
            let (_, _, apply) = crate::config::OVERRIDES
                .iter()
                .find(|(o, _, _)| o == k)
                .ok_or_else(|| anyhow!("unknown override {k}"))?;
            apply(&mut kc, v).map_err(|e| anyhow!("{what}: override {k}={v}: {e:#}"))?;
            if let Some((n, _)) = holds(&kc) {
                bail!(
                    "{}: {what}: the override {k}={v} changes CONFIG_{n}, which the sweep varies; leave one of them out",
                    sweep.at(n)
                );
            }
        }
        for w in kc.take_warnings() {
            let w = w.to_string();
            if !warnings.contains(&w) {
                warnings.push(w);
            }
        }
        // Name the line of the variable an error is about, if it is about one.
        let fail = |e: anyhow::Error| {
            let msg = format!("{e:#}");
            let at =
                values.iter().find(|(n, _)| msg.contains(&format!("CONFIG_{n}="))).map(|(n, _)| sweep.at(n));
            anyhow!("{}: {what}: {msg}", at.unwrap_or_else(|| sweep.path.display().to_string()))
        };
        let exp = Experiment::read(&Reader::new(&kc)).map_err(fail)?;
        let cells = matrix::cells(&exp).map_err(fail)?;
        let cells = cells
            .into_iter()
            .map(|c| Cell { id: format!("{name}_{}", c.id), experiment: Some(Box::new(exp.clone())), ..c })
            .collect();
        let mut text =
            format!("# knlp sweep {}: {name}\n# base: {}\n", sweep.path.display(), opts.base.display());
        for (n, v) in &values {
            text.push_str(&format!("# {}\n", config_line(n, types[n], v)));
        }
        for (k, v) in &opts.overrides {
            text.push_str(&format!("# override {k}={v}\n"));
        }
        text.push_str(&kc.config_text());
        configs.push(Configuration { name, values, text, experiment: exp, cells });
    }
    Ok(Plan {
        sweep: sweep.clone(),
        base: opts.base.clone(),
        base_text,
        experiment,
        configs,
        overrides: opts.overrides.clone(),
        warnings,
    })
}

/// The project of a sweep: the given name (`PROJECT=`), else
/// `sweep-<file name>-<UTC time>`.
pub fn project_name(sweep: &Path, explicit: Option<&str>) -> Result<String> {
    if let Some(p) = explicit {
        crate::config::check_project_name(p).map_err(|e| anyhow!("PROJECT={p}: {e}"))?;
        return Ok(p.to_string());
    }
    let stem = sweep.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    let mut stem: String = stem
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '-' })
        .take(60)
        .collect();
    if stem.is_empty() || stem.starts_with('.') {
        stem = format!("x{stem}");
    }
    let t: String = crate::runs::now_iso().chars().filter(|c| c.is_ascii_digit() || *c == 'T').collect();
    Ok(format!("sweep-{stem}-{}", t.replace('T', "-")))
}

/// One configuration as recorded in `sweep.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ConfigRecord {
    pub name: String,
    /// Swept symbol (without `CONFIG_`) -> value.
    pub values: BTreeMap<String, String>,
    /// Its frozen `.config`, relative to the project folder.
    pub config: String,
    pub cells: Vec<String>,
}

/// `sweep.json`: what was swept, over what, and which cells each
/// configuration became.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SweepRecord {
    pub sweep_file: String,
    pub sweep_text: String,
    pub base: String,
    pub overrides: Vec<String>,
    pub created: String,
    pub variables: Vec<Variable>,
    pub configurations: Vec<ConfigRecord>,
}

impl SweepRecord {
    pub fn read(dir: &Path) -> Result<SweepRecord> {
        let p = dir.join(SWEEP_FILE);
        let text = fs::read_to_string(&p).with_context(|| format!("{}: no sweep here", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: not a knlp sweep record", p.display()))
    }
}

impl Plan {
    pub fn cell_count(&self) -> usize {
        self.configs.iter().map(|c| c.cells.len()).sum()
    }

    /// The matrix of the sweep's cells.
    pub fn matrix(&self, project: &str) -> MatrixFile {
        MatrixFile {
            project: project.to_string(),
            created: crate::runs::now_iso(),
            dot_config: self.base_text.clone(),
            experiment: self.experiment.clone(),
            cells: self.configs.iter().flat_map(|c| c.cells.iter().cloned()).collect(),
        }
    }

    fn record(&self) -> SweepRecord {
        SweepRecord {
            sweep_file: self.sweep.path.display().to_string(),
            sweep_text: self.sweep.text.clone(),
            base: self.base.display().to_string(),
            overrides: self.overrides.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            created: crate::runs::now_iso(),
            variables: self.sweep.variables.clone(),
            configurations: self
                .configs
                .iter()
                .map(|c| ConfigRecord {
                    name: c.name.clone(),
                    values: c.values.iter().cloned().collect(),
                    config: format!("{CONFIGS_DIR}/{}.config", c.name),
                    cells: c.cells.iter().map(|x| x.id.clone()).collect(),
                })
                .collect(),
        }
    }

    /// Write the sweep into `dir` (its configurations, `sweep.json` and
    /// `matrix.json`), or find it there already: then the bool is true.
    /// A different run in `dir` is an error.
    pub fn write(&self, dir: &Path, project: &str) -> Result<(MatrixFile, bool)> {
        let m = self.matrix(project);
        if let Ok(old) = MatrixFile::read(dir) {
            let same = old.cells == m.cells && SweepRecord::read(dir).is_ok();
            if !same {
                bail!(
                    "{} holds a run of a different configuration or sweep; `make continue PROJECT={project}` continues it as recorded, another PROJECT= starts this sweep",
                    dir.display()
                );
            }
            return Ok((old, true));
        }
        let configs = dir.join(CONFIGS_DIR);
        fs::create_dir_all(&configs).with_context(|| format!("{}: cannot create", configs.display()))?;
        for c in &self.configs {
            crate::runs::write_atomic(&configs.join(format!("{}.config", c.name)), c.text.as_bytes())?;
        }
        crate::runs::write_atomic(&dir.join(SWEEP_FILE), &serde_json::to_vec_pretty(&self.record())?)?;
        // matrix.json last: `knlp continue` finds a sweep only once it is whole.
        m.write(dir)?;
        Ok((m, false))
    }

    /// `knlp sweep --dry-run`: the configurations and their numbered cells.
    pub fn listing(&self, project: &str, dir: &Path) -> String {
        use crate::runs::Status;
        let total = self.cell_count();
        let e = &self.experiment;
        let ranks = if e.nproc > 0 { format!(", {} rank(s) each", e.nproc) } else { String::new() };
        let mut out = format!(
            "dry run: sweep {} over {}: {} configuration(s), {total} cell(s) in project {project} ({}), {} at once{ranks}, device {}\n",
            self.sweep.path.display(),
            self.base.display(),
            self.configs.len(),
            dir.display(),
            e.parallel_jobs.max(1),
            e.device,
        );
        for v in &self.sweep.variables {
            let vals: Vec<String> = v.values.iter().map(|x| show_value(x)).collect();
            out.push_str(&format!("  CONFIG_{} = {} (line {})\n", v.name, vals.join(" | "), v.line));
        }
        let mut k = 0;
        let mut to_run = 0;
        for c in &self.configs {
            out.push_str(&format!("{}: {}\n", c.name, show_values(&c.values)));
            for (cell, (_, st, run)) in c.cells.iter().zip(matrix::plan(dir, &c.cells, false)) {
                k += 1;
                to_run += usize::from(run);
                let state = match (st, run) {
                    (Status::Done, _) => "done, would be skipped",
                    (Status::Failed, false) => "failed earlier, skipped (continue --retry-failed)",
                    (Status::Pending, true) => "would run",
                    _ => "would resume from its checkpoint",
                };
                out.push_str(&format!(
                    "{k:>4}. {:<48} {}\n      {state}\n",
                    cell.id,
                    matrix::describe_cell(&c.experiment, cell)
                ));
            }
        }
        out.push_str(&format!(
            "{} configuration(s) checked by Kconfig; {to_run} of {total} cell(s) would run; nothing was started\n",
            self.configs.len()
        ));
        out
    }
}

/// The parts of an experiment that decide what `cell` computes: not the
/// matrix's other axes, not where or how many at once it runs.
fn fingerprint(exp: &Experiment, cell: &Cell) -> Result<Value> {
    let mut v = serde_json::to_value(exp)?;
    if let Some(o) = v.as_object_mut() {
        for k in [
            "models",
            "optimizers",
            "pruning",
            "sparsities",
            "variants",
            "attentions",
            "tokenizers",
            "project",
            "runs_dir",
            "parallel_jobs",
            "baseline",
            "auto_graphs",
            "nproc",
            "dist_timeout",
            "trackio",
            "cpu_threads",
        ] {
            o.remove(k);
        }
        if cell.model != "gpt2" {
            o.remove("gpt2");
        }
        if cell.pruning == "none" {
            o.remove("prune");
        }
        if cell.optimizer != "adamwprune" {
            o.remove("adamwprune_base");
        }
        o.insert("attention".into(), json!(matrix::attention_axis(exp, cell)?));
        // The tokenizer's settings matter only to a tokenizer cell, the
        // smoothing only to spline_pca.
        o.insert("tokenizer_axis".into(), json!(cell.tokenizer));
        match cell.tokenizer.as_deref() {
            None => {
                o.remove("tokenizer");
            }
            Some("spline_pca") => {}
            Some(_) => {
                if let Some(t) = o.get_mut("tokenizer").and_then(Value::as_object_mut) {
                    t.remove("smoothing");
                }
            }
        }
    }
    Ok(v)
}

/// Where two fingerprints differ: `opt.lr`, `train.steps`, ...
fn differences(a: &Value, b: &Value) -> Vec<String> {
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else { return vec!["everything".into()] };
    let mut out = Vec::new();
    for (k, va) in a {
        let vb = b.get(k).unwrap_or(&Value::Null);
        match (va.as_object(), vb.as_object()) {
            (Some(x), Some(y)) => {
                for (kk, xv) in x {
                    if y.get(kk) != Some(xv) {
                        out.push(format!("{k}.{kk}"));
                    }
                }
            }
            _ if va != vb => out.push(k.clone()),
            _ => {}
        }
    }
    out.sort();
    out
}

/// BASELINE in a sweep: the finished run named by `spec` and the cells of
/// the sweep's matrix `m` that train what it trained (same model,
/// optimizer, pruning and target, and the same settings that decide the
/// result). None of them is an error that says how the closest one differs.
pub fn baseline_cells(runs_dir: &Path, spec: &str, m: &MatrixFile) -> Result<(PathBuf, Vec<String>)> {
    let (src, id) = matrix::baseline_run(runs_dir, spec)?;
    let parent = src.parent().unwrap_or(Path::new("."));
    let theirs = MatrixFile::read(parent)
        .with_context(|| format!("BASELINE={spec}: cannot tell the configuration it ran with"))?;
    let their_cell = theirs.cell(&id)?;
    let want = fingerprint(their_cell.experiment(&theirs.experiment), their_cell)?;
    let same_axes = |c: &Cell| {
        c.model == their_cell.model
            && c.optimizer == their_cell.optimizer
            && c.pruning == their_cell.pruning
            && c.variant == their_cell.variant
            && c.attention == their_cell.attention
            && c.tokenizer == their_cell.tokenizer
            && (c.sparsity - their_cell.sparsity).abs() < 1e-9
    };
    let mut ids = Vec::new();
    let mut near: Option<(String, Vec<String>)> = None;
    for c in m.cells.iter().filter(|c| same_axes(c)) {
        let fp = fingerprint(c.experiment(&m.experiment), c)?;
        if fp == want {
            ids.push(c.id.clone());
        } else if near.is_none() {
            near = Some((c.id.clone(), differences(&want, &fp)));
        }
    }
    if ids.is_empty() {
        match near {
            Some((cell, diff)) => bail!(
                "BASELINE={spec}: no configuration of the sweep trains what its cell '{id}' trained ({cell} differs in {})",
                diff.join(", ")
            ),
            None => bail!("BASELINE={spec}: the sweep has no cell with its model, optimizer and pruning ('{id}')"),
        }
    }
    Ok((src, ids))
}

/// Copy the baseline run `src` into the project `dir` as each of `ids`
/// (its `config.json` then names the sweep's cell).
pub fn adopt_baseline(src: &Path, dir: &Path, ids: &[String]) -> Result<()> {
    for id in ids {
        let dst = dir.join(id);
        if dst.exists() {
            fs::remove_dir_all(&dst)?;
        }
        matrix::copy_dir(src, &dst)?;
        let run = RunDir { path: dst };
        let mut cfg = run.read_json(crate::runs::CONFIG)?;
        if let Some(cell) = cfg.get_mut("cell").and_then(Value::as_object_mut) {
            cell.insert("id".into(), json!(id));
        }
        run.write_json(crate::runs::CONFIG, &cfg)?;
        run.log(&format!("copied from baseline {}", src.display()));
    }
    Ok(())
}

/// One cell in the sweep summary.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Row {
    /// Place among the cells ranked by the same metric (1 = best).
    pub rank: Option<usize>,
    pub cell: String,
    pub config: String,
    /// The configuration's swept values.
    pub values: BTreeMap<String, String>,
    pub status: String,
    /// `test_acc` (higher is better) or `val_ppl` (lower is better).
    pub metric: Option<String>,
    /// The final value of the metric.
    pub value: Option<f64>,
    /// Its best value during training.
    pub best: Option<f64>,
    pub sparsity: Option<f64>,
    pub time_s: Option<f64>,
    pub reason: Option<String>,
}

/// `sweep_summary.json`: the ranked cells, the failures, the rest.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub project: String,
    pub sweep_file: String,
    pub base: String,
    pub updated: String,
    pub configurations: usize,
    pub cells: usize,
    pub variables: Vec<Variable>,
    /// Done cells, best first (accuracy ranks before perplexity when a
    /// sweep has both); done cells without a metric last.
    pub ranked: Vec<Row>,
    pub failed: Vec<Row>,
    /// Cells not finished: pending, running or interrupted.
    pub unfinished: Vec<Row>,
}

/// The headline metrics: (key, name, higher is better).
const HEADLINES: &[(&str, &str, bool)] =
    &[("test_acc", "final test accuracy", true), ("val_ppl", "final validation perplexity", false)];

/// Read the sweep in `dir` and its runs into a summary.
pub fn summarize(dir: &Path) -> Result<Summary> {
    let rec = SweepRecord::read(dir)?;
    let project = report::load_project(dir)?;
    let mut rows: Vec<Row> = Vec::new();
    for c in &rec.configurations {
        for id in &c.cells {
            let run = project
                .runs
                .iter()
                .find(|r| &r.run == id)
                .or_else(|| project.runs.iter().find(|r| &r.cell == id));
            let mut row = Row {
                rank: None,
                cell: id.clone(),
                config: c.name.clone(),
                values: c.values.clone(),
                status: "pending".into(),
                metric: None,
                value: None,
                best: None,
                sparsity: None,
                time_s: None,
                reason: None,
            };
            if let Some(r) = run {
                row.status = r.status.clone();
                let finite = |x: Option<f64>| x.filter(|v| v.is_finite());
                let (metric, value, best) = match (finite(r.final_acc), finite(r.final_ppl)) {
                    (Some(a), _) => (Some("test_acc"), Some(a), r.best_acc),
                    (None, Some(p)) => (Some("val_ppl"), Some(p), r.best_ppl),
                    _ => (None, None, None),
                };
                row.metric = metric.map(String::from);
                row.value = value;
                row.best = best;
                row.sparsity = r.sparsity.filter(|_| !r.is_dense());
                row.time_s = r.time_s;
                row.reason = r.reason.clone();
            }
            rows.push(row);
        }
    }
    let cells = rows.len();
    let (done, rest): (Vec<Row>, Vec<Row>) = rows.into_iter().partition(|r| r.status == "done");
    let (failed, unfinished): (Vec<Row>, Vec<Row>) = rest.into_iter().partition(|r| r.status == "failed");
    let mut ranked = Vec::new();
    for (key, _, higher) in HEADLINES {
        let mut group: Vec<Row> = done.iter().filter(|r| r.metric.as_deref() == Some(key)).cloned().collect();
        group.sort_by(|a, b| {
            let (x, y) = (a.value.unwrap_or(f64::NAN), b.value.unwrap_or(f64::NAN));
            let o = if *higher { y.total_cmp(&x) } else { x.total_cmp(&y) };
            o.then_with(|| report::util::natural_cmp(&a.cell, &b.cell))
        });
        for (i, r) in group.iter_mut().enumerate() {
            r.rank = Some(i + 1);
        }
        ranked.extend(group);
    }
    ranked.extend(done.into_iter().filter(|r| r.metric.is_none()));
    Ok(Summary {
        project: project.name.clone(),
        sweep_file: rec.sweep_file,
        base: rec.base,
        updated: crate::runs::now_iso(),
        configurations: rec.configurations.len(),
        cells,
        variables: rec.variables,
        ranked,
        failed,
        unfinished,
    })
}

/// A table as aligned text, or as markdown.
fn table(head: &[String], rows: &[Vec<String>], markdown: bool) -> String {
    let mut w: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: &[String]| -> String {
        let padded: Vec<String> =
            cells.iter().enumerate().map(|(i, c)| format!("{c:<width$}", width = w[i])).collect();
        if markdown {
            format!("| {} |\n", padded.join(" | "))
        } else {
            format!("{}\n", padded.join("  ").trim_end())
        }
    };
    let mut out = line(head);
    let rule: Vec<String> = w.iter().map(|n| "-".repeat(*n)).collect();
    out.push_str(&line(&rule));
    for r in rows {
        out.push_str(&line(r));
    }
    out
}

impl Summary {
    /// The variables shown per row: those with several values (all when none has).
    fn shown(&self) -> Vec<&str> {
        let many: Vec<&str> =
            self.variables.iter().filter(|v| v.values.len() > 1).map(|v| v.name.as_str()).collect();
        if many.is_empty() {
            self.variables.iter().map(|v| v.name.as_str()).collect()
        } else {
            many
        }
    }

    fn counts(&self) -> String {
        format!(
            "{} configuration(s), {} cell(s): {} done, {} failed, {} not finished",
            self.configurations,
            self.cells,
            self.ranked.len(),
            self.failed.len(),
            self.unfinished.len()
        )
    }

    /// The summary as text (`markdown`: as markdown); `top` limits the
    /// ranked rows.
    pub fn render(&self, markdown: bool, top: Option<usize>) -> String {
        let vars = self.shown();
        let h = |s: &str| if markdown { format!("## {s}\n\n") } else { format!("{s}:\n") };
        let mut out = if markdown {
            format!("# Sweep {}\n\n", self.project)
        } else {
            format!("sweep {}\n", self.project)
        };
        out.push_str(&format!("sweep file {}, base {}; {}\n", self.sweep_file, self.base, self.counts()));
        let swept: Vec<String> = self
            .variables
            .iter()
            .map(|v| {
                let vals: Vec<String> = v.values.iter().map(|x| show_value(x)).collect();
                format!("CONFIG_{} = {}", v.name, vals.join(" | "))
            })
            .collect();
        out.push_str(&format!(
            "{}{}\n\n",
            if markdown { "\n" } else { "" },
            swept.join(if markdown { "  \n" } else { "\n" })
        ));
        let pct = |x: f64| format!("{:.2}%", x * 100.0);
        let ppl = |x: f64| format!("{x:.2}");
        for (key, name, higher) in HEADLINES {
            let rows: Vec<&Row> = self.ranked.iter().filter(|r| r.metric.as_deref() == Some(key)).collect();
            if rows.is_empty() {
                continue;
            }
            let fmt = if *key == "test_acc" { pct } else { ppl };
            let col = if *key == "test_acc" { "acc" } else { "ppl" };
            let better = if *higher { "higher" } else { "lower" };
            out.push_str(&h(&format!("ranked by {name} ({better} is better)")));
            let sparse = rows.iter().any(|r| r.sparsity.is_some());
            let mut head: Vec<String> = vec!["rank".into(), "cell".into()];
            head.extend(vars.iter().map(|v| v.to_string()));
            head.extend([format!("final_{col}"), format!("best_{col}")]);
            if sparse {
                head.push("sparsity".into());
            }
            head.push("time".into());
            let mut body = Vec::new();
            for r in rows.iter().take(top.unwrap_or(usize::MAX)) {
                let mut line = vec![r.rank.map(|k| k.to_string()).unwrap_or_default(), r.cell.clone()];
                line.extend(vars.iter().map(|v| r.values.get(*v).map(|x| show_value(x)).unwrap_or_default()));
                line.push(r.value.map(fmt).unwrap_or_else(|| "-".into()));
                line.push(r.best.map(fmt).unwrap_or_else(|| "-".into()));
                if sparse {
                    line.push(r.sparsity.map(|s| format!("{:.1}%", s * 100.0)).unwrap_or_else(|| "-".into()));
                }
                line.push(r.time_s.map(report::util::human_time).unwrap_or_else(|| "-".into()));
                body.push(line);
            }
            out.push_str(&table(&head, &body, markdown));
            if rows.len() > body.len() {
                out.push_str(&format!("... {} more in {SUMMARY_TXT}\n", rows.len() - body.len()));
            }
            out.push('\n');
        }
        let no_metric: Vec<&Row> = self.ranked.iter().filter(|r| r.metric.is_none()).collect();
        for (title, rows) in [
            ("done without a headline metric", no_metric),
            ("failed", self.failed.iter().collect()),
            ("not finished", self.unfinished.iter().collect()),
        ] {
            if rows.is_empty() {
                continue;
            }
            out.push_str(&h(title));
            let mut head: Vec<String> = vec!["cell".into()];
            head.extend(vars.iter().map(|v| v.to_string()));
            head.extend(["status".into(), "reason".into()]);
            let body: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    let mut line = vec![r.cell.clone()];
                    line.extend(
                        vars.iter().map(|v| r.values.get(*v).map(|x| show_value(x)).unwrap_or_default()),
                    );
                    let reason = r.reason.clone().unwrap_or_default().replace(['\n', '|'], " ");
                    line.extend([r.status.clone(), reason]);
                    line
                })
                .collect();
            out.push_str(&table(&head, &body, markdown));
            out.push('\n');
        }
        out
    }
}

/// Summarize the sweep in `dir` into `sweep_summary.json`, `.md` and `.txt`.
pub fn write_summary(dir: &Path) -> Result<Summary> {
    let s = summarize(dir)?;
    crate::runs::write_atomic(&dir.join(SUMMARY_JSON), &serde_json::to_vec_pretty(&s)?)?;
    crate::runs::write_atomic(&dir.join(SUMMARY_MD), s.render(true, None).as_bytes())?;
    crate::runs::write_atomic(&dir.join(SUMMARY_TXT), s.render(false, None).as_bytes())?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<SweepFile> {
        SweepFile::parse(text, Path::new("s.sweep"))
    }

    fn values(text: &str) -> Vec<String> {
        parse(text).unwrap().variables.remove(0).values
    }

    #[test]
    fn integer_and_float_ranges_include_the_end_once() {
        assert_eq!(values("CONFIG_X=16:16:64"), ["16", "32", "48", "64"]);
        assert_eq!(values("CONFIG_X=1:2:6"), ["1", "3", "5"], "the end is a bound");
        assert_eq!(values("CONFIG_X=5:1:5"), ["5"]);
        assert_eq!(values("CONFIG_X=-2:1:0"), ["-2", "-1", "0"]);
        // 0.1 + 0.1 + 0.1 > 0.3 in floating point; the end is still there, once.
        assert_eq!(values("CONFIG_X=0.1:0.1:0.3"), ["0.1", "0.2", "0.3"]);
        assert_eq!(values("CONFIG_X=0.5:0.25:1.00"), ["0.50", "0.75", "1.00"]);
        assert_eq!(values("CONFIG_X=0:0.1:1").len(), 11);
        assert_eq!(values("CONFIG_X=0:0.1:1").last().unwrap(), "1.0");
        assert_eq!(values("CONFIG_X=-0.1:0.1:0.1"), ["-0.1", "0.0", "0.1"]);
        assert_eq!(values("CONFIG_X=1e-4:1e-4:5e-4"), ["1e-4", "2e-4", "3e-4", "4e-4", "5e-4"]);
        assert_eq!(values("CONFIG_X=1e-3:1e-3:3.5e-3"), ["1e-3", "2e-3", "3e-3"]);
        for (spec, n) in [("0:0.01:1", 101), ("0:0.001:1", 1001), ("0.7:0.1:1.0", 4), ("1:0.2:2", 6)] {
            let v = values(&format!("CONFIG_X={spec}"));
            assert_eq!(v.len(), n, "{spec}: {v:?}");
            let end: f64 = spec.rsplit(':').next().unwrap().parse().unwrap();
            assert_eq!(v.last().unwrap().parse::<f64>().unwrap(), end, "{spec}");
        }
    }

    #[test]
    fn choices_quotes_and_comments() {
        let s = parse(
            "# a sweep\n\n  CONFIG_B=adamw|sgd   # inline comment\nCONFIG_A=\"x # not a comment\"|\"\"|'q'\nCONFIG_C=\"a:b\" # a string with a colon\nCONFIG_D=\"say \\\"hi\\\"|\" \n",
        )
        .unwrap();
        let v: Vec<(&str, Vec<String>)> =
            s.variables.iter().map(|v| (v.name.as_str(), v.values.clone())).collect();
        assert_eq!(
            v,
            [
                ("A", vec!["x # not a comment".to_string(), String::new(), "'q'".into()]),
                ("B", vec!["adamw".into(), "sgd".into()]),
                ("C", vec!["a:b".into()]),
                ("D", vec!["say \"hi\"|".into()]),
            ],
            "sorted by name"
        );
        assert_eq!(s.variables[0].line, 4);
    }

    #[test]
    fn the_product_is_in_sorted_key_order_last_fastest() {
        let s = parse("CONFIG_Z=1|2\nCONFIG_A=x|y|z\nCONFIG_M=k\n").unwrap();
        assert_eq!(s.count(), Some(6));
        let c = s.combinations();
        let flat: Vec<String> = c
            .iter()
            .map(|combo| combo.iter().map(|(n, v)| format!("{n}={v}")).collect::<Vec<_>>().join(","))
            .collect();
        assert_eq!(
            flat,
            ["A=x,M=k,Z=1", "A=x,M=k,Z=2", "A=y,M=k,Z=1", "A=y,M=k,Z=2", "A=z,M=k,Z=1", "A=z,M=k,Z=2"]
        );
        assert_eq!(s.swept().iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["A", "Z"]);
    }

    #[test]
    fn errors_name_the_file_and_line() {
        let cases = [
            ("\nCONFIG_X=1:0:5\n", "s.sweep:2: CONFIG_X=1:0:5: the step 0 must be > 0"),
            ("CONFIG_X=1:-1:5", "s.sweep:1: CONFIG_X=1:-1:5: the step -1 must be > 0"),
            ("# c\n\nCONFIG_X=0.5:-0.1:0", "s.sweep:3: CONFIG_X=0.5:-0.1:0: the step -0.1 must be > 0"),
            ("CONFIG_X=5:1:1", "s.sweep:1: CONFIG_X=5:1:1: the start 5 is after the end 1"),
            ("CONFIG_X=0.5:0.1:0.1", "the start 0.5 is after the end 0.1"),
            ("CONFIG_X=1:2", "s.sweep:1: CONFIG_X=1:2: a range is start:step:end"),
            ("CONFIG_X=a:1:2", "'a' is not a number"),
            ("CONFIG_X=0:1:nan", "'nan' is not a number"),
            ("CONFIG_X=a||b", "s.sweep:1: CONFIG_X=a||b: an empty choice"),
            ("CONFIG_X=a|b|a", "the choice a is given twice"),
            ("CONFIG_X=\"abc", "unbalanced quotes"),
            ("CONFIG_X=", "s.sweep:1: CONFIG_X has no value"),
            ("X=1", "s.sweep:1: expected CONFIG_NAME=value"),
            ("CONFIG_X 1", "s.sweep:1: expected CONFIG_NAME=value"),
            ("CONFIG_=1", "expected CONFIG_NAME=value"),
            ("CONFIG_X=1\nCONFIG_X=2", "s.sweep:2: CONFIG_X is given again (first on line 1)"),
            ("# nothing\n\n", "s.sweep: no CONFIG_ lines"),
            ("CONFIG_X=0:1e-9:1e9", "more than 1000000 values"),
            ("CONFIG_X=0:1:9000000000000000000", "more than 1000000"),
            ("CONFIG_X=-1e308:1:1e308", "more than 1000000 values"),
        ];
        for (text, want) in cases {
            match parse(text) {
                Ok(s) => panic!("{text:?} parsed: {:?}", s.variables),
                Err(e) => assert!(e.to_string().contains(want), "{text:?}: got '{e}', want '{want}'"),
            }
        }
    }

    #[test]
    fn values_are_written_by_symbol_type() {
        assert_eq!(config_line("LR", SymbolType::String, "1e-3"), "CONFIG_LR=\"1e-3\"");
        assert_eq!(config_line("S", SymbolType::String, "a\"b"), "CONFIG_S=\"a\\\"b\"");
        assert_eq!(config_line("B", SymbolType::Bool, "n"), "# CONFIG_B is not set");
        assert_eq!(config_line("B", SymbolType::Bool, "y"), "CONFIG_B=y");
        assert_eq!(config_line("I", SymbolType::Int, "32"), "CONFIG_I=32");
        assert!(check_type(SymbolType::Int, "0.5").unwrap_err().contains("an integer"));
        assert!(check_type(SymbolType::Bool, "yes").unwrap_err().contains("y or n"));
        assert!(check_type(SymbolType::Hex, "0x1F").is_ok() && check_type(SymbolType::Hex, "12").is_err());
        let base = "CONFIG_A=1\n# CONFIG_B is not set\nCONFIG_AB=2\nCONFIG_C=\"x\"\n";
        let o = overlay(base, &["A", "B"], &["CONFIG_A=5".into(), "CONFIG_B=y".into()]);
        assert_eq!(o, "CONFIG_AB=2\nCONFIG_C=\"x\"\n# the sweep's values\nCONFIG_A=5\nCONFIG_B=y\n");
    }
}
