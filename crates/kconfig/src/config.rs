//! `.config` files: reading, writing, minimal configurations, user values
//! and the all*config operations, ported from kconfiglib.

use std::path::Path;

use crate::error::{ErrorKind, KconfigError, Warning};
use crate::model::*;
use crate::parse::{decode, io_reason};
use crate::util::*;

/// A value handed to `sym_set_value`: kconfiglib accepts ints 0/1/2 and
/// strings.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum SetVal {
    Tri(u8),
    Str(String),
}

/// One entry of `listnewconfig`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewConfigEntry {
    /// Symbol name.
    pub name: String,
    /// The line listnewconfig prints, without the newline: `CONFIG_FOO=n`
    /// for bool/tristate (n is spelled out), the `.config` line otherwise
    /// (empty when the symbol would not be written).
    pub line: String,
    /// The first help text of the symbol, if any.
    pub help: Option<String>,
}

/// The result of reading a `.config` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigLoad {
    /// kconfiglib's message, e.g. `Loaded configuration '.config'`.
    pub message: String,
    /// Warnings produced while loading (malformed lines, unknown symbols,
    /// invalid values), each with `file:line`.
    pub warnings: Vec<Warning>,
}

impl Kconfig {
    /// `Symbol.set_value`: stores a user value if it is well-formed for the
    /// type; returns false (with a warning) otherwise.
    pub(crate) fn sym_set_value(&mut self, s: SymId, value: SetVal) -> bool {
        let t = self.syms[s].orig_type;
        let value = match value {
            SetVal::Str(v) if t.is_bool_tri() && matches!(v.as_str(), "n" | "m" | "y") => {
                SetVal::Tri(Tristate::parse(&v).map(|x| x as u8).unwrap_or(0))
            }
            v => v,
        };
        let same = match (&value, &self.syms[s].user_value) {
            (SetVal::Tri(a), Some(UserValue::Tri(b))) => a == b,
            (SetVal::Str(a), Some(UserValue::Str(b))) => a == b,
            _ => false,
        };
        // Choice symbols skip this: setting one to y changes the choice.
        if same && self.syms[s].choice.is_none() {
            self.syms[s].was_set = true;
            return true;
        }
        let valid = match &value {
            SetVal::Tri(v) => {
                (t == SymbolType::Bool && (*v == 0 || *v == 2)) || (t == SymbolType::Tristate && *v <= 2)
            }
            SetVal::Str(v) => {
                t == SymbolType::String
                    || (t == SymbolType::Int && py_int(v, 10).is_some())
                    || (t == SymbolType::Hex && py_int(v, 16).is_some_and(|n| n >= 0))
            }
        };
        if !valid {
            let shown = match &value {
                SetVal::Tri(v) => tri_str(*v).to_string(),
                SetVal::Str(v) => format!("'{}'", v),
            };
            self.warn_msg(
                format!(
                    "the value {} is invalid for {}, which has type {} -- assignment ignored",
                    shown,
                    self.sym_name_and_loc(s),
                    t.as_str()
                ),
                None,
            );
            return false;
        }
        let is_y = value == SetVal::Tri(2);
        self.syms[s].user_value = Some(match value {
            SetVal::Tri(v) => UserValue::Tri(v),
            SetVal::Str(v) => UserValue::Str(v),
        });
        self.syms[s].was_set = true;
        match self.syms[s].choice {
            Some(c) if is_y => {
                // The user's pick; it only counts while visible.
                self.choices[c].user_selection = Some(s);
                self.choices[c].was_set = true;
                self.invalidate();
            }
            _ => self.invalidate_if_has_prompt(s),
        }
        true
    }

    fn invalidate_if_has_prompt(&self, s: SymId) {
        if self.syms[s].nodes.iter().any(|&n| self.nodes[n].prompt.is_some()) {
            self.invalidate();
        } else if self.warn_assign_no_prompt {
            self.warn_msg(
                format!(
                    "{} has no prompt, meaning user values have no effect on it",
                    self.sym_name_and_loc(s)
                ),
                None,
            );
        }
    }

    /// `Symbol.unset_value`.
    pub(crate) fn sym_unset_value(&mut self, s: SymId) {
        if self.syms[s].user_value.is_some() {
            self.syms[s].user_value = None;
            self.invalidate_if_has_prompt(s);
        }
    }

    /// `Choice.set_value`: sets the mode.
    pub(crate) fn choice_set_value(&mut self, c: ChoiceId, value: SetVal) -> bool {
        let v = match &value {
            SetVal::Tri(v) => Some(*v),
            SetVal::Str(s) => Tristate::parse(s).map(|t| t as u8),
        };
        if v.is_some() && v == self.choices[c].user_value {
            self.choices[c].was_set = true;
            return true;
        }
        let t = self.choices[c].orig_type;
        let valid = match v {
            Some(v) => (t == SymbolType::Bool && (v == 0 || v == 2)) || (t == SymbolType::Tristate && v <= 2),
            None => false,
        };
        let Some(v) = v.filter(|_| valid) else {
            let shown = match (&value, v) {
                (_, Some(v)) => tri_str(v).to_string(),
                (SetVal::Str(s), None) => format!("'{}'", s),
                (SetVal::Tri(x), None) => x.to_string(),
            };
            self.warn_msg(
                format!(
                    "the value {} is invalid for {}, which has type {} -- assignment ignored",
                    shown,
                    self.choice_name_and_loc(c),
                    t.as_str()
                ),
                None,
            );
            return false;
        };
        self.choices[c].user_value = Some(v);
        self.choices[c].was_set = true;
        self.invalidate();
        true
    }

    pub(crate) fn choice_unset_value(&mut self, c: ChoiceId) {
        if self.choices[c].user_value.is_some() || self.choices[c].user_selection.is_some() {
            self.choices[c].user_value = None;
            self.choices[c].user_selection = None;
            self.invalidate();
        }
    }

    /// `Kconfig.unset_values`.
    pub(crate) fn unset_all_values(&mut self) {
        let old = self.warn_assign_no_prompt;
        self.warn_assign_no_prompt = false;
        for i in 0..self.unique_defined_syms.len() {
            let s = self.unique_defined_syms[i];
            self.sym_unset_value(s);
        }
        for i in 0..self.unique_choices.len() {
            let c = self.unique_choices[i];
            self.choice_unset_value(c);
        }
        self.warn_assign_no_prompt = old;
    }

    /// Opens a `.config`: `filename`, else `$srctree/filename`. Returns the
    /// path that worked and its text.
    pub(crate) fn open_config(&self, filename: &str) -> Result<(String, String), KconfigError> {
        let first = std::fs::read(filename);
        let (path, bytes) = match first {
            Ok(b) => (filename.to_string(), b),
            Err(_) => {
                let alt = path_join(&self.srctree, filename);
                match std::fs::read(&alt) {
                    Ok(b) => (alt, b),
                    Err(e) => {
                        let st = if self.srctree.is_empty() {
                            "unset or blank".to_string()
                        } else {
                            format!("set to '{}'", self.srctree)
                        };
                        return Err(KconfigError::new(
                            ErrorKind::Io,
                            filename,
                            0,
                            format!(
                                "Could not open '{}' ({}). Check that the $srctree environment variable ({}) is \
                                 set correctly.",
                                filename,
                                io_reason(&e),
                                st
                            ),
                        ));
                    }
                }
            }
        };
        let text = decode(bytes, filename)?;
        Ok((path, text))
    }

    /// `Kconfig.defconfig_filename`.
    pub(crate) fn defconfig_filename(&self) -> Option<String> {
        let d = self.defconfig_list?;
        for (f, cond) in &self.syms[d].defaults {
            if self.eval(cond) != 0 {
                let Expr::Sym(f) = f else { continue };
                if let Ok((path, _)) = self.open_config(&self.sym_str(*f)) {
                    return Some(path);
                }
            }
        }
        None
    }

    /// `Kconfig.load_config`; `filename` None means `$KCONFIG_CONFIG` (or
    /// `.config`), falling back on the `option defconfig_list` file.
    pub(crate) fn load_config_impl(
        &mut self,
        filename: Option<&str>,
        replace: bool,
    ) -> Result<String, KconfigError> {
        let mut msg = None;
        let filename = match filename {
            Some(f) => f.to_string(),
            None => {
                let f = self.env.get("KCONFIG_CONFIG").unwrap_or_else(|| ".config".to_string());
                if !Path::new(&f).exists() && !Path::new(&path_join(&self.srctree, &f)).exists() {
                    match self.defconfig_filename() {
                        None => return Ok(format!("Using default symbol values (no '{}')", f)),
                        Some(d) => {
                            msg = Some(format!(" default configuration '{}' (no '{}')", d, f));
                            d
                        }
                    }
                } else {
                    f
                }
            }
        };
        let msg = msg.unwrap_or_else(|| format!(" configuration '{}'", filename));
        let old = self.warn_assign_no_prompt;
        self.warn_assign_no_prompt = false;
        let r = self.load_config_file(&filename, replace);
        self.warn_assign_no_prompt = old;
        r?;
        Ok(format!("{}{}", if replace { "Loaded" } else { "Merged" }, msg))
    }

    fn load_config_file(&mut self, filename: &str, replace: bool) -> Result<(), KconfigError> {
        let (_, text) = self.open_config(filename)?;
        if replace {
            self.missing_syms.clear();
            for i in 0..self.unique_defined_syms.len() {
                let s = self.unique_defined_syms[i];
                self.syms[s].was_set = false;
            }
            for i in 0..self.unique_choices.len() {
                let c = self.unique_choices[i];
                self.choices[c].was_set = false;
            }
        }
        let prefix = self.config_prefix.clone();
        let unset_prefix = format!("# {}", prefix);
        for (idx, raw) in text.lines().enumerate() {
            let linenr = idx + 1;
            // The C tools ignore trailing whitespace.
            let line = py_rstrip(raw);
            let set = line.strip_prefix(prefix.as_str()).and_then(|rest| match rest.find('=') {
                Some(eq) if eq > 0 => Some((&rest[..eq], &rest[eq + 1..])),
                _ => None,
            });
            let (s, val) = if let Some((name, val)) = set {
                let Some(s) = self.defined_sym(name) else {
                    self.undef_assign(name, val, filename, linenr);
                    continue;
                };
                let t = self.syms[s].orig_type;
                let val = if t.is_bool_tri() {
                    // Like the C tools, only the first character counts.
                    let ok = match t {
                        SymbolType::Bool => val.starts_with(['y', 'n']),
                        _ => val.starts_with(['y', 'm', 'n']),
                    };
                    if !ok {
                        self.warn_msg(
                            format!(
                                "'{}' is not a valid value for the {} symbol {}. Assignment ignored.",
                                val,
                                t.as_str(),
                                self.sym_name_and_loc(s)
                            ),
                            Some((filename, linenr)),
                        );
                        continue;
                    }
                    let v = val[..1].to_string();
                    if let Some(c) = self.syms[s].choice {
                        if v != "n" {
                            // The kind of values assigned to choice symbols
                            // gives the choice's mode.
                            if let Some(prev) = self.choices[c].user_value {
                                if tri_str(prev) != v {
                                    self.warn_msg(
                                        "both m and y assigned to symbols within the same choice".to_string(),
                                        Some((filename, linenr)),
                                    );
                                }
                            }
                            self.choice_set_value(c, SetVal::Str(v.clone()));
                        }
                    }
                    v
                } else if t == SymbolType::String {
                    match match_conf_string(val) {
                        Some(inner) => unescape(inner),
                        None => {
                            self.warn_msg(
                                format!(
                                    "malformed string literal in assignment to {}. Assignment ignored.",
                                    self.sym_name_and_loc(s)
                                ),
                                Some((filename, linenr)),
                            );
                            continue;
                        }
                    }
                } else {
                    val.to_string()
                };
                (s, val)
            } else {
                let name = line
                    .strip_prefix(unset_prefix.as_str())
                    .and_then(|rest| rest.find(' ').filter(|&sp| sp > 0).map(|sp| (rest, sp)))
                    .filter(|(rest, sp)| rest[*sp..].starts_with(" is not set"))
                    .map(|(rest, sp)| &rest[..sp]);
                let Some(name) = name else {
                    if !line.is_empty() && !py_lstrip(line).starts_with('#') {
                        self.warn_msg(
                            format!("ignoring malformed line '{}'", line),
                            Some((filename, linenr)),
                        );
                    }
                    continue;
                };
                let Some(s) = self.defined_sym(name) else {
                    self.undef_assign(name, "n", filename, linenr);
                    continue;
                };
                if !self.syms[s].orig_type.is_bool_tri() {
                    continue;
                }
                (s, "n".to_string())
            };
            if self.syms[s].was_set {
                self.assigned_twice(s, &val, filename, linenr);
            }
            self.sym_set_value(s, SetVal::Str(val));
        }
        if replace {
            for i in 0..self.unique_defined_syms.len() {
                let s = self.unique_defined_syms[i];
                if !self.syms[s].was_set {
                    self.sym_unset_value(s);
                }
            }
            for i in 0..self.unique_choices.len() {
                let c = self.unique_choices[i];
                if !self.choices[c].was_set {
                    self.choice_unset_value(c);
                }
            }
        }
        Ok(())
    }

    fn defined_sym(&self, name: &str) -> Option<SymId> {
        self.sym_map.get(name).copied().filter(|&s| !self.syms[s].nodes.is_empty())
    }

    fn undef_assign(&mut self, name: &str, val: &str, filename: &str, linenr: usize) {
        self.missing_syms.push((name.to_string(), val.to_string()));
        if self.warn_assign_undef {
            self.warn_msg(
                format!("attempt to assign the value '{}' to the undefined symbol {}", val, name),
                Some((filename, linenr)),
            );
        }
    }

    fn assigned_twice(&self, s: SymId, new_val: &str, filename: &str, linenr: usize) {
        let user_val = match &self.syms[s].user_value {
            Some(UserValue::Tri(v)) => tri_str(*v).to_string(),
            Some(UserValue::Str(v)) => v.clone(),
            None => String::new(),
        };
        let msg = format!(
            "{} set more than once. Old value \"{}\", new value \"{}\".",
            self.sym_name_and_loc(s),
            user_val,
            new_val
        );
        if user_val == new_val {
            if self.warn_assign_redun {
                self.warn_msg(msg, Some((filename, linenr)));
            }
        } else if self.warn_assign_override {
            self.warn_msg(msg, Some((filename, linenr)));
        }
    }

    /// `Symbol.config_string`.
    pub(crate) fn config_string(&self, s: SymId) -> String {
        let val = self.sym_str_rc(s);
        if !self.write_to_conf(s) {
            return String::new();
        }
        let sym = &self.syms[s];
        let p = &self.config_prefix;
        if sym.orig_type.is_bool_tri() {
            if &*val != "n" {
                format!("{}{}={}\n", p, sym.name, val)
            } else {
                format!("# {}{} is not set\n", p, sym.name)
            }
        } else if sym.orig_type.is_int_hex() {
            format!("{}{}={}\n", p, sym.name, val)
        } else {
            format!("{}{}=\"{}\"\n", p, sym.name, escape(&val))
        }
    }

    /// `_config_contents`: the `.config` text, with menus as comments.
    pub(crate) fn config_contents(&self) -> String {
        let mut out = self.config_header.clone();
        let mut visited = vec![false; self.syms.len()];
        let mut after_end_comment = false;
        let mut node = self.top;
        loop {
            let n = &self.nodes[node];
            if let Some(l) = n.list {
                node = l;
            } else if let Some(nx) = n.next {
                node = nx;
            } else {
                let mut cur = node;
                let mut found = None;
                while let Some(p) = self.nodes[cur].parent {
                    cur = p;
                    let pn = &self.nodes[cur];
                    // Close visible menus with an '# end of' comment.
                    if pn.item == Item::Menu
                        && cur != self.top
                        && self.eval(&pn.dep) != 0
                        && self.eval(&pn.visibility) != 0
                    {
                        out +=
                            &format!("# end of {}\n", pn.prompt.as_ref().map(|p| p.0.as_str()).unwrap_or(""));
                        after_end_comment = true;
                    }
                    if let Some(nx) = pn.next {
                        found = Some(nx);
                        break;
                    }
                }
                match found {
                    Some(nx) => node = nx,
                    None => return out,
                }
            }
            let n = &self.nodes[node];
            match n.item {
                Item::Sym(s) => {
                    if visited[s] {
                        continue;
                    }
                    visited[s] = true;
                    let cs = self.config_string(s);
                    if cs.is_empty() {
                        continue;
                    }
                    if after_end_comment {
                        after_end_comment = false;
                        out.push('\n');
                    }
                    out += &cs;
                }
                Item::Menu | Item::Comment
                    if self.eval(&n.dep) != 0
                        && (n.item == Item::Comment || self.eval(&n.visibility) != 0) =>
                {
                    out += &format!("\n#\n# {}\n#\n", n.prompt.as_ref().map(|p| p.0.as_str()).unwrap_or(""));
                    after_end_comment = false;
                }
                _ => {}
            }
        }
    }

    /// `_min_config_contents`: only what differs from the defaults.
    pub(crate) fn min_config_contents(&self) -> String {
        let mut out = self.config_header.clone();
        for &s in &self.unique_defined_syms {
            let sym = &self.syms[s];
            // Selected-to-the-top symbols cannot be changed; skip them.
            if sym.choice.is_none() && self.sym_vis(s) <= self.eval(&sym.rev_dep) {
                continue;
            }
            if *self.sym_str_rc(s) == *self.str_default(s) {
                continue;
            }
            if let Some(c) = sym.choice {
                if !self.choices[c].is_optional
                    && self.selection_from_defaults(c) == Some(s)
                    && sym.orig_type == SymbolType::Bool
                    && self.sym_tri(s) == 2
                {
                    continue;
                }
            }
            out += &self.config_string(s);
        }
        out
    }

    /// The lines `listnewconfig` prints.
    pub(crate) fn new_config_entries(&self) -> Vec<NewConfigEntry> {
        let mut out = Vec::new();
        for &s in &self.unique_defined_syms {
            let sym = &self.syms[s];
            if sym.user_value.is_some() {
                continue;
            }
            let show = self.sym_assignable(s).len() > 1
                || (self.sym_vis(s) != 0
                    && (matches!(sym.orig_type, SymbolType::Int | SymbolType::Hex | SymbolType::String)
                        || sym.choice.is_some()));
            if !show {
                continue;
            }
            let line = if sym.orig_type.is_bool_tri() {
                format!("{}{}={}", self.config_prefix, sym.name, tri_str(self.sym_tri(s)))
            } else {
                self.config_string(s).trim_end_matches('\n').to_string()
            };
            let help = sym.nodes.iter().find_map(|&n| self.nodes[n].help.clone());
            out.push(NewConfigEntry { name: sym.name.clone(), line, help });
        }
        out
    }

    /// Sets every symbol as low as it goes (`allnoconfig` before
    /// `KCONFIG_ALLCONFIG`).
    pub(crate) fn all_no_impl(&mut self) {
        let old = self.warn.replace(false);
        for i in 0..self.unique_defined_syms.len() {
            let s = self.unique_defined_syms[i];
            let v = if self.syms[s].is_allnoconfig_y { 2 } else { 0 };
            self.sym_set_value(s, SetVal::Tri(v));
        }
        self.warn.set(old);
    }

    pub(crate) fn all_yes_impl(&mut self) {
        let old = self.warn.replace(false);
        for i in 0..self.unique_defined_syms.len() {
            let s = self.unique_defined_syms[i];
            // m for choice symbols: ignored in y-mode choices, the maximum in
            // m-mode ones.
            let v = if self.syms[s].choice.is_some() { 1 } else { 2 };
            self.sym_set_value(s, SetVal::Tri(v));
        }
        for i in 0..self.unique_choices.len() {
            let c = self.unique_choices[i];
            self.choice_set_value(c, SetVal::Tri(2));
        }
        self.warn.set(old);
    }

    pub(crate) fn all_mod_impl(&mut self) {
        let old = self.warn.replace(false);
        for i in 0..self.unique_defined_syms.len() {
            let s = self.unique_defined_syms[i];
            match self.syms[s].orig_type {
                SymbolType::Bool if self.syms[s].choice.is_none() => {
                    self.sym_set_value(s, SetVal::Tri(2));
                }
                SymbolType::Tristate => {
                    self.sym_set_value(s, SetVal::Tri(1));
                }
                _ => {}
            }
        }
        for i in 0..self.unique_choices.len() {
            let c = self.unique_choices[i];
            let v = if self.choices[c].orig_type == SymbolType::Bool { 2 } else { 1 };
            self.choice_set_value(c, SetVal::Tri(v));
        }
        self.warn.set(old);
    }
}

/// Python's `str(IOError(errno, strerror, filename))`.
pub(crate) fn std_io_msg(e: &std::io::Error, filename: &str) -> String {
    let text = e.to_string();
    let text = match text.find(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    };
    match e.raw_os_error() {
        Some(n) => format!("[Errno {}] {}: '{}'", n, text, filename),
        None => text,
    }
}
