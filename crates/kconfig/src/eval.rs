//! Symbol and choice values, ported from kconfiglib's `Symbol.tri_value`,
//! `Symbol.str_value`, `_visibility`, `Choice.selection` and friends.
//!
//! Values are computed on demand and cached per generation (see
//! `Kconfig::invalidate`). Warnings that kconfiglib prints while computing a
//! value (out-of-range user values, clamped defaults, selects that ignore
//! unmet dependencies) are emitted at the same moments, so they come out in
//! the same order.

use std::cmp::Ordering;
use std::sync::Arc;

use crate::model::*;
use crate::util::{py_hex, py_int};

impl Kconfig {
    pub(crate) fn modules_tri(&self) -> u8 {
        self.sym_tri(self.modules)
    }

    /// `Symbol.type`: tristate symbols act as bool without modules and in
    /// y-mode choices.
    pub(crate) fn sym_type(&self, s: SymId) -> SymbolType {
        let sym = &self.syms[s];
        if sym.orig_type == SymbolType::Tristate
            && (sym.choice.is_some_and(|c| self.choice_tri(c) == 2) || self.modules_tri() == 0)
        {
            return SymbolType::Bool;
        }
        sym.orig_type
    }

    pub(crate) fn choice_type(&self, c: ChoiceId) -> SymbolType {
        let t = self.choices[c].orig_type;
        if t == SymbolType::Tristate && self.modules_tri() == 0 {
            return SymbolType::Bool;
        }
        t
    }

    /// `expr_value`, with kconfiglib's short-circuits (they decide which
    /// symbols get evaluated, hence which warnings appear).
    pub(crate) fn eval(&self, e: &Expr) -> u8 {
        match e {
            Expr::Sym(s) => self.sym_tri(*s),
            Expr::Choice(c) => self.choice_tri(*c),
            Expr::And(a, b) => {
                let v1 = self.eval(a);
                if v1 == 0 {
                    0
                } else {
                    v1.min(self.eval(b))
                }
            }
            Expr::Or(a, b) => {
                let v1 = self.eval(a);
                if v1 == 2 {
                    2
                } else {
                    v1.max(self.eval(b))
                }
            }
            Expr::Not(a) => 2 - self.eval(a),
            Expr::Rel(op, a, b) => {
                let comp = self.compare(*a, *b);
                let r = match op {
                    RelOp::Eq => comp == Ordering::Equal,
                    RelOp::Ne => comp != Ordering::Equal,
                    RelOp::Lt => comp == Ordering::Less,
                    RelOp::Le => comp != Ordering::Greater,
                    RelOp::Gt => comp == Ordering::Greater,
                    RelOp::Ge => comp != Ordering::Less,
                };
                if r {
                    2
                } else {
                    0
                }
            }
        }
    }

    /// Two strings compare as strings; otherwise as numbers when both parse
    /// (n/m/y count as 0/1/2 for bool/tristate), else as strings.
    fn compare(&self, a: SymId, b: SymId) -> Ordering {
        let (ta, tb) = (self.syms[a].orig_type, self.syms[b].orig_type);
        if ta == SymbolType::String && tb == SymbolType::String {
            return self.sym_str(a).cmp(&self.sym_str(b));
        }
        if let Some(x) = self.sym_to_num(a) {
            if let Some(y) = self.sym_to_num(b) {
                return x.cmp(&y);
            }
        }
        self.sym_str(a).cmp(&self.sym_str(b))
    }

    fn sym_to_num(&self, s: SymId) -> Option<i128> {
        let t = self.syms[s].orig_type;
        if t.is_bool_tri() {
            return Some(self.sym_tri(s) as i128);
        }
        py_int(&self.sym_str(s), t.base())
    }

    /// `Symbol.tri_value`.
    pub(crate) fn sym_tri(&self, s: SymId) -> u8 {
        let sym = &self.syms[s];
        if sym.is_constant {
            return match s {
                M => 1,
                Y => 2,
                _ => 0,
            };
        }
        let c = &sym.cache;
        let g = self.gen.get();
        if c.tri_gen.get() == g {
            return c.tri.get();
        }
        if c.busy_tri.get() {
            // Only reachable through a dependency loop, which loading
            // rejects; never recurse forever.
            return 0;
        }
        c.busy_tri.set(true);
        let (v, write) = self.compute_tri(s);
        c.busy_tri.set(false);
        c.tri.set(v);
        c.tri_gen.set(g);
        if let Some(w) = write {
            c.write_to_conf.set(w);
        }
        v
    }

    fn compute_tri(&self, s: SymId) -> (u8, Option<bool>) {
        let sym = &self.syms[s];
        if !sym.orig_type.is_bool_tri() {
            if sym.orig_type != SymbolType::Unknown {
                self.warn_msg(
                    format!(
                        "The {} symbol {} is being evaluated in a logical context somewhere. It will always \
                         evaluate to n.",
                        sym.orig_type.as_str(),
                        self.sym_name_and_loc(s)
                    ),
                    None,
                );
            }
            return (0, None);
        }
        let vis = self.sym_vis(s);
        let mut write = vis != 0;
        let mut val = 0u8;
        match sym.choice {
            None => {
                match (&sym.user_value, vis) {
                    (Some(UserValue::Tri(u)), v) if v != 0 => val = (*u).min(vis),
                    _ => {
                        for (d, cond) in &sym.defaults {
                            let dep_val = self.eval(cond);
                            if dep_val != 0 {
                                val = self.eval(d).min(dep_val);
                                if val != 0 {
                                    write = true;
                                }
                                break;
                            }
                        }
                        // kconfiglib: imply only acts when the direct
                        // dependencies hold. Linux: an active imply always
                        // writes the symbol, its value capped by them.
                        let dep_val = self.eval(&sym.weak_rev_dep);
                        if self.linux_semantics {
                            if dep_val != 0 {
                                val = val.max(dep_val).min(self.eval(&sym.direct_dep));
                                write = true;
                            }
                        } else if dep_val != 0 && self.eval(&sym.direct_dep) != 0 {
                            val = val.max(dep_val);
                            write = true;
                        }
                    }
                }
                // select wins over everything, even unmet dependencies.
                let dep_val = self.eval(&sym.rev_dep);
                if dep_val != 0 {
                    if self.eval(&sym.direct_dep) < dep_val {
                        self.warn_select_unsatisfied_deps(s);
                    }
                    val = val.max(dep_val);
                    write = true;
                }
                if val == 1 && (self.sym_type(s) == SymbolType::Bool || self.imply_forces_y(s)) {
                    val = 2;
                }
            }
            Some(c) => {
                if vis == 2 {
                    val = if self.choice_selection(c) == Some(s) { 2 } else { 0 };
                } else if vis != 0 && matches!(sym.user_value, Some(UserValue::Tri(u)) if u != 0) {
                    // Visible symbol in an m-mode choice, set to m or y.
                    val = 1;
                }
            }
        }
        (val, Some(write))
    }

    fn warn_select_unsatisfied_deps(&self, s: SymId) {
        let sym = &self.syms[s];
        let dd = self.eval(&sym.direct_dep);
        let mut msg = format!(
            "{} has direct dependencies {} with value {}, but is currently being {}-selected by the following \
             symbols:",
            self.sym_name_and_loc(s),
            self.expr_str(&sym.direct_dep),
            tri_str(dd),
            tri_str(self.eval(&sym.rev_dep))
        );
        for select in split_expr(&sym.rev_dep, true) {
            if self.eval(select) <= self.eval(&sym.direct_dep) {
                continue;
            }
            let Expr::Sym(sel) = split_expr(select, false)[0] else { continue };
            let sel_sym = &self.syms[*sel];
            msg += &format!(
                "\n - {}, with value {}, direct dependencies {} (value: {})",
                self.sym_name_and_loc(*sel),
                self.sym_str(*sel),
                self.expr_str(&sel_sym.direct_dep),
                tri_str(self.eval(&sel_sym.direct_dep))
            );
            if let Expr::And(_, cond) = select {
                msg += &format!(
                    ", and select condition {} (value: {})",
                    self.expr_str(cond),
                    tri_str(self.eval(cond))
                );
            }
        }
        self.warn_msg(msg, None);
    }

    /// `Symbol.str_value`.
    pub(crate) fn sym_str(&self, s: SymId) -> String {
        self.sym_str_rc(s).to_string()
    }

    pub(crate) fn sym_str_rc(&self, s: SymId) -> Arc<str> {
        let sym = &self.syms[s];
        if sym.orig_type.is_bool_tri() {
            return Arc::from(tri_str(self.sym_tri(s)));
        }
        if sym.orig_type == SymbolType::Unknown {
            // Undefined symbols and constants have their name as value.
            return Arc::from(sym.name.as_str());
        }
        let c = &sym.cache;
        let g = self.gen.get();
        if c.str_gen.get() == g {
            return c.str_val.borrow().clone();
        }
        if c.busy_str.get() {
            return Arc::from("");
        }
        c.busy_str.set(true);
        let (v, write) = self.compute_str(s);
        c.busy_str.set(false);
        let v: Arc<str> = Arc::from(v.as_str());
        *c.str_val.borrow_mut() = v.clone();
        c.str_gen.set(g);
        c.write_to_conf.set(write);
        v
    }

    fn compute_str(&self, s: SymId) -> (String, bool) {
        let sym = &self.syms[s];
        let t = sym.orig_type;
        let vis = self.sym_vis(s);
        let mut write = vis != 0;
        let mut val = String::new();
        if t.is_int_hex() {
            let base = t.base();
            let num2str = |n: i128| if base == 10 { n.to_string() } else { py_hex(n) };
            let mut range = None;
            for (lo, hi, cond) in &sym.ranges {
                if self.eval(cond) != 0 {
                    // strtoll() on garbage gives 0 in the C tools.
                    let low = py_int(&self.sym_str(*lo), base).unwrap_or(0);
                    let high = py_int(&self.sym_str(*hi), base).unwrap_or(0);
                    range = Some((low, high));
                    break;
                }
            }
            let mut use_defaults = true;
            if vis != 0 {
                if let Some(UserValue::Str(uv)) = &sym.user_value {
                    if !uv.is_empty() {
                        let user_val = py_int(uv, base).unwrap_or(0);
                        match range {
                            Some((low, high)) if !(low <= user_val && user_val <= high) => {
                                self.warn_msg(
                                    format!(
                                        "user value {} on the {} symbol {} ignored due to being outside the \
                                         active range ([{}, {}]) -- falling back on defaults",
                                        num2str(user_val),
                                        t.as_str(),
                                        self.sym_name_and_loc(s),
                                        num2str(low),
                                        num2str(high)
                                    ),
                                    None,
                                );
                            }
                            _ => {
                                // Kept verbatim ("0x10" stays "0x10").
                                val = uv.clone();
                                use_defaults = false;
                            }
                        }
                    }
                }
            }
            if use_defaults {
                let mut has_default = false;
                let mut val_num = 0i128;
                for (d, cond) in &sym.defaults {
                    if self.eval(cond) != 0 {
                        has_default = true;
                        write = true;
                        val = self.default_str(d);
                        val_num = py_int(&val, base).unwrap_or(0);
                        break;
                    }
                }
                // Clamping applies even without a default.
                if let Some((low, high)) = range {
                    let clamp = if val_num < low {
                        Some(low)
                    } else if val_num > high {
                        Some(high)
                    } else {
                        None
                    };
                    if let Some(cl) = clamp {
                        val = if t == SymbolType::Int { cl.to_string() } else { py_hex(cl) };
                        if has_default {
                            self.warn_msg(
                                format!(
                                    "default value {} on {} clamped to {} due to being outside the active \
                                     range ([{}, {}])",
                                    val_num,
                                    self.sym_name_and_loc(s),
                                    num2str(cl),
                                    num2str(low),
                                    num2str(high)
                                ),
                                None,
                            );
                        }
                    }
                }
            }
        } else if t == SymbolType::String {
            match (&sym.user_value, vis) {
                (Some(UserValue::Str(uv)), v) if v != 0 => val = uv.clone(),
                _ => {
                    for (d, cond) in &sym.defaults {
                        if self.eval(cond) != 0 {
                            val = self.default_str(d);
                            write = true;
                            break;
                        }
                    }
                }
            }
        }
        // 'option env' symbols and the defconfig_list symbol are never written.
        if sym.env_var.is_some() || self.defconfig_list == Some(s) {
            write = false;
        }
        (val, write)
    }

    /// The string value of a default of an int/hex/string symbol (always a
    /// single symbol; checked at load time).
    fn default_str(&self, d: &Expr) -> String {
        match d {
            Expr::Sym(x) => self.sym_str(*x),
            _ => String::new(),
        }
    }

    /// Whether the symbol gets a line in `.config` (computed with its value).
    pub(crate) fn write_to_conf(&self, s: SymId) -> bool {
        let sym = &self.syms[s];
        if sym.is_constant {
            return false;
        }
        if sym.orig_type.is_bool_tri() {
            self.sym_tri(s);
        } else if sym.orig_type == SymbolType::Unknown {
            return false;
        } else {
            self.sym_str_rc(s);
        }
        sym.cache.write_to_conf.get()
    }

    /// `_visibility` for a symbol.
    pub(crate) fn sym_vis(&self, s: SymId) -> u8 {
        let sym = &self.syms[s];
        let c = &sym.cache;
        let g = self.gen.get();
        if c.vis_gen.get() == g {
            return c.vis.get();
        }
        if c.busy_vis.get() {
            return 0;
        }
        c.busy_vis.set(true);
        let v = self.compute_sym_vis(s);
        c.busy_vis.set(false);
        c.vis.set(v);
        c.vis_gen.set(g);
        v
    }

    fn compute_sym_vis(&self, s: SymId) -> u8 {
        let sym = &self.syms[s];
        let mut vis = 0;
        for &n in &sym.nodes {
            if let Some((_, cond)) = &self.nodes[n].prompt {
                vis = vis.max(self.eval(cond));
            }
        }
        if let Some(c) = sym.choice {
            // Non-tristate symbols in tristate choices are only visible in
            // y mode; m-visible tristate symbols are hidden in y mode.
            if self.choices[c].orig_type == SymbolType::Tristate
                && sym.orig_type != SymbolType::Tristate
                && self.choice_tri(c) != 2
            {
                return 0;
            }
            if sym.orig_type == SymbolType::Tristate && vis == 1 && self.choice_tri(c) == 2 {
                return 0;
            }
        }
        if vis == 1 && self.sym_type(s) != SymbolType::Tristate {
            return 2;
        }
        vis
    }

    pub(crate) fn choice_vis(&self, c: ChoiceId) -> u8 {
        let ch = &self.choices[c];
        let g = self.gen.get();
        if ch.cache.vis_gen.get() == g {
            return ch.cache.vis.get();
        }
        if ch.cache.busy_vis.get() {
            return 0;
        }
        ch.cache.busy_vis.set(true);
        let mut vis = 0;
        for &n in &ch.nodes {
            if let Some((_, cond)) = &self.nodes[n].prompt {
                vis = vis.max(self.eval(cond));
            }
        }
        if vis == 1 && self.choice_type(c) != SymbolType::Tristate {
            vis = 2;
        }
        ch.cache.busy_vis.set(false);
        ch.cache.vis.set(vis);
        ch.cache.vis_gen.set(g);
        vis
    }

    /// `Choice.tri_value`: the mode. Non-optional choices act as if
    /// selected to m by their own visibility.
    pub(crate) fn choice_tri(&self, c: ChoiceId) -> u8 {
        let ch = &self.choices[c];
        let mut val = if ch.is_optional { 0 } else { 1 };
        if let Some(u) = ch.user_value {
            val = val.max(u);
        }
        val = val.min(self.choice_vis(c));
        if val == 1 && self.choice_type(c) == SymbolType::Bool {
            2
        } else {
            val
        }
    }

    /// `Choice.selection`: the user's pick if visible, else the first
    /// visible default, else the first visible symbol (y mode only).
    pub(crate) fn choice_selection(&self, c: ChoiceId) -> Option<SymId> {
        let ch = &self.choices[c];
        let g = self.gen.get();
        if ch.cache.sel_gen.get() == g {
            return ch.cache.sel.get();
        }
        if ch.cache.busy_sel.get() {
            return None;
        }
        ch.cache.busy_sel.set(true);
        let sel = if self.choice_tri(c) != 2 {
            None
        } else {
            match ch.user_selection {
                Some(us) if self.sym_vis(us) != 0 => Some(us),
                _ => self.selection_from_defaults(c),
            }
        };
        ch.cache.busy_sel.set(false);
        ch.cache.sel.set(sel);
        ch.cache.sel_gen.set(g);
        sel
    }

    pub(crate) fn selection_from_defaults(&self, c: ChoiceId) -> Option<SymId> {
        let ch = &self.choices[c];
        for (d, cond) in &ch.defaults {
            if let Expr::Sym(d) = d {
                if self.eval(cond) != 0 && self.sym_vis(*d) != 0 {
                    return Some(*d);
                }
            }
        }
        ch.syms.iter().copied().find(|&s| self.sym_vis(s) != 0)
    }

    /// `Symbol.assignable`: the tristate values a user can give it now.
    pub(crate) fn sym_assignable(&self, s: SymId) -> Vec<u8> {
        let sym = &self.syms[s];
        if !sym.orig_type.is_bool_tri() {
            return vec![];
        }
        let vis = self.sym_vis(s);
        if vis == 0 {
            return vec![];
        }
        let rev = self.eval(&sym.rev_dep);
        if vis == 2 {
            if sym.choice.is_some() {
                return vec![2];
            }
            let boolish = |kc: &Kconfig| kc.sym_type(s) == SymbolType::Bool || kc.imply_forces_y(s);
            return match rev {
                0 => {
                    if boolish(self) {
                        vec![0, 2]
                    } else {
                        vec![0, 1, 2]
                    }
                }
                2 => vec![2],
                _ => {
                    if boolish(self) {
                        vec![2]
                    } else {
                        vec![1, 2]
                    }
                }
            };
        }
        // vis == 1: must be a tristate (bool m-visibility becomes y).
        match rev {
            0 => {
                if !self.imply_forces_y(s) {
                    vec![0, 1]
                } else {
                    vec![0, 2]
                }
            }
            2 => vec![2],
            _ => vec![1],
        }
    }

    pub(crate) fn choice_assignable(&self, c: ChoiceId) -> Vec<u8> {
        let vis = self.choice_vis(c);
        let opt = self.choices[c].is_optional;
        let is_bool = self.choice_type(c) == SymbolType::Bool;
        match vis {
            0 => vec![],
            2 => match (opt, is_bool) {
                (false, true) => vec![2],
                (false, false) => vec![1, 2],
                (true, true) => vec![0, 2],
                (true, false) => vec![0, 1, 2],
            },
            _ => {
                if opt {
                    vec![0, 1]
                } else {
                    vec![1]
                }
            }
        }
    }

    /// kconfiglib 14.1's rule that a tristate implied to y cannot be m;
    /// Linux 6.1's `symbol.c` has no such rule.
    fn imply_forces_y(&self, s: SymId) -> bool {
        !self.linux_semantics && self.eval(&self.syms[s].weak_rev_dep) == 2
    }

    /// `Symbol._str_default`: the value the symbol would have without a
    /// user value (for savedefconfig).
    pub(crate) fn str_default(&self, s: SymId) -> String {
        let sym = &self.syms[s];
        if sym.orig_type.is_bool_tri() {
            let mut val = 0u8;
            if sym.choice.is_none() {
                for (d, cond) in &sym.defaults {
                    let cv = self.eval(cond);
                    if cv != 0 {
                        val = self.eval(d).min(cv);
                        break;
                    }
                }
                val = self.eval(&sym.rev_dep).max(self.eval(&sym.weak_rev_dep)).max(val);
                if val == 1 && self.sym_type(s) == SymbolType::Bool {
                    val = 2;
                }
            }
            return tri_str(val).to_string();
        }
        if sym.orig_type != SymbolType::Unknown {
            for (d, cond) in &sym.defaults {
                if self.eval(cond) != 0 {
                    return self.default_str(d);
                }
            }
        }
        String::new()
    }
}
