//! Post-parse processing, ported from kconfiglib: dependency propagation,
//! implicit submenus, `if` removal, choice finalisation, sanity checks,
//! the dependency graph and dependency-loop detection.

use std::collections::HashSet;

use crate::error::{ErrorKind, KconfigError};
use crate::model::*;
use crate::util::py_int;

/// How deeply finalisation may recurse (implicit submenus nest one level
/// per dependent symbol).
const MAX_FINALIZE_DEPTH: usize = 5000;

impl Kconfig {
    pub(crate) fn finalize(&mut self) -> Result<(), KconfigError> {
        let top = self.top;
        self.finalize_node(top, Expr::y(), 0)?;

        let mut seen = HashSet::new();
        self.unique_defined_syms = self.defined_syms.iter().copied().filter(|s| seen.insert(*s)).collect();
        let mut seen = HashSet::new();
        self.unique_choices = self.choice_order.iter().copied().filter(|c| seen.insert(*c)).collect();

        self.check_sym_sanity()?;
        self.check_choice_sanity()?;
        let undef = |k: &str| self.env.get(k).as_deref() == Some("y");
        if undef("KCONFIG_WARN_UNDEF") || undef("KCONFIG_STRICT") {
            self.check_undef_syms();
        }
        self.build_dep();
        for i in 0..self.unique_defined_syms.len() {
            let s = self.unique_defined_syms[i];
            if let Some(lp) = self.check_dep_loop_sym(s, false, 0) {
                return Err(self.loop_error(lp));
            }
        }
        // Choice symbols' visibility changes the choice's selection; added
        // after loop detection, like kconfiglib, to avoid spurious loops.
        for &c in &self.unique_choices.clone() {
            for &s in &self.choices[c].syms.clone() {
                push_unique(&mut self.syms[s].dependents, Sc::Choice(c));
            }
        }
        Ok(())
    }

    fn finalize_node(&mut self, node: NodeId, visible_if: Expr, depth: usize) -> Result<(), KconfigError> {
        if depth > MAX_FINALIZE_DEPTH {
            let n = &self.nodes[node];
            return Err(KconfigError::new(
                ErrorKind::Parse,
                &*n.filename,
                n.linenr,
                "menu structure nested too deeply".to_string(),
            ));
        }
        let mut visible_if = visible_if;
        match self.nodes[node].item {
            Item::Sym(_) => {
                self.add_props_to_sym(node);
                // Following nodes that depend on this symbol go into an
                // implicit submenu rooted at it.
                let mut cur = node;
                while let Some(next) = self.nodes[cur].next {
                    if !self.auto_menu_dep(node, next) {
                        break;
                    }
                    self.finalize_node(next, visible_if.clone(), depth + 1)?;
                    cur = next;
                    self.nodes[cur].parent = Some(node);
                }
                if cur != node {
                    self.nodes[node].list = self.nodes[node].next;
                    self.nodes[node].next = self.nodes[cur].next;
                    self.nodes[cur].next = None;
                }
            }
            _ => {
                if self.nodes[node].list.is_some() {
                    if self.nodes[node].item == Item::Menu {
                        visible_if = make_and(visible_if, self.nodes[node].visibility.clone());
                    }
                    self.propagate_deps(node, &visible_if);
                    let mut cur = self.nodes[node].list;
                    while let Some(c) = cur {
                        self.finalize_node(c, visible_if.clone(), depth + 1)?;
                        cur = self.nodes[c].next;
                    }
                }
            }
        }
        if let Some(list) = self.nodes[node].list {
            self.flatten(list);
            self.remove_ifs(node);
        }
        if let Item::Choice(c) = self.nodes[node].item {
            let dep = self.nodes[node].dep.clone();
            let old = std::mem::replace(&mut self.choices[c].direct_dep, Expr::n());
            self.choices[c].direct_dep = make_or(old, dep);
            let defaults = self.nodes[node].defaults.clone();
            self.choices[c].defaults.extend(defaults);
            self.finalize_choice(node);
        }
        Ok(())
    }

    fn propagate_deps(&mut self, node: NodeId, visible_if: &Expr) {
        let basedep = match self.nodes[node].item {
            Item::Choice(c) => Expr::Choice(c),
            _ => self.nodes[node].dep.clone(),
        };
        let mut cur = self.nodes[node].list;
        while let Some(c) = cur {
            let n = &mut self.nodes[c];
            let dep = make_and(std::mem::replace(&mut n.dep, Expr::y()), basedep.clone());
            n.dep = dep.clone();
            if matches!(n.item, Item::Sym(_) | Item::Choice(_)) {
                if let Some((text, cond)) = n.prompt.take() {
                    n.prompt = Some((text, make_and(cond, make_and(visible_if.clone(), dep.clone()))));
                }
                for d in n.defaults.iter_mut() {
                    d.1 = make_and(std::mem::replace(&mut d.1, Expr::y()), dep.clone());
                }
                for r in n.ranges.iter_mut() {
                    r.2 = make_and(std::mem::replace(&mut r.2, Expr::y()), dep.clone());
                }
                for s in n.selects.iter_mut() {
                    s.1 = make_and(std::mem::replace(&mut s.1, Expr::y()), dep.clone());
                }
                for s in n.implies.iter_mut() {
                    s.1 = make_and(std::mem::replace(&mut s.1, Expr::y()), dep.clone());
                }
            } else if let Some((text, cond)) = n.prompt.take() {
                // Menus and comments: 'visible if' only applies to symbols
                // and choices.
                n.prompt = Some((text, make_and(cond, dep)));
            }
            cur = self.nodes[c].next;
        }
    }

    fn add_props_to_sym(&mut self, node: NodeId) {
        let Item::Sym(sym) = self.nodes[node].item else { return };
        let n = &self.nodes[node];
        let (dep, defaults, ranges, selects, implies) =
            (n.dep.clone(), n.defaults.clone(), n.ranges.clone(), n.selects.clone(), n.implies.clone());
        let s = &mut self.syms[sym];
        s.direct_dep = make_or(std::mem::replace(&mut s.direct_dep, Expr::n()), dep);
        s.defaults.extend(defaults);
        s.ranges.extend(ranges);
        s.selects.extend(selects.iter().cloned());
        s.implies.extend(implies.iter().cloned());
        for (target, cond) in selects {
            let t = &mut self.syms[target];
            t.rev_dep = make_or(std::mem::replace(&mut t.rev_dep, Expr::n()), make_and(Expr::Sym(sym), cond));
        }
        for (target, cond) in implies {
            let t = &mut self.syms[target];
            t.weak_rev_dep =
                make_or(std::mem::replace(&mut t.weak_rev_dep, Expr::n()), make_and(Expr::Sym(sym), cond));
        }
    }

    /// `_expr_depends_on` (mconf's `expr_depends_symbol`).
    fn expr_depends_on(&self, e: &Expr, sym: SymId) -> bool {
        match e {
            Expr::Sym(s) => *s == sym,
            Expr::Rel(op @ (RelOp::Eq | RelOp::Ne), l, r) => {
                let (l, r) = if *r == sym { (*r, *l) } else { (*l, *r) };
                if l != sym {
                    return false;
                }
                (*op == RelOp::Eq && r == M) || r == Y || (*op == RelOp::Ne && r == N)
            }
            Expr::And(a, b) => self.expr_depends_on(a, sym) || self.expr_depends_on(b, sym),
            _ => false,
        }
    }

    fn auto_menu_dep(&self, node1: NodeId, node2: NodeId) -> bool {
        let Item::Sym(sym) = self.nodes[node1].item else { return false };
        let n2 = &self.nodes[node2];
        let e = match &n2.prompt {
            Some((_, cond)) => cond,
            None => &n2.dep,
        };
        self.expr_depends_on(e, sym)
    }

    /// Moves the children of promptless nodes (ifs, invisible symbols with
    /// implicit submenus) up to follow them. Promptless choices stay.
    fn flatten(&mut self, node: NodeId) {
        let mut cur = Some(node);
        while let Some(n) = cur {
            let nd = &self.nodes[n];
            if let (Some(list), None) = (nd.list, &nd.prompt) {
                if !matches!(nd.item, Item::Choice(_)) {
                    let parent = nd.parent;
                    let mut last = list;
                    loop {
                        self.nodes[last].parent = parent;
                        match self.nodes[last].next {
                            Some(nx) => last = nx,
                            None => break,
                        }
                    }
                    self.nodes[last].next = self.nodes[n].next;
                    self.nodes[n].next = Some(list);
                    self.nodes[n].list = None;
                }
            }
            cur = self.nodes[n].next;
        }
    }

    fn remove_ifs(&mut self, node: NodeId) {
        let mut cur = self.nodes[node].list;
        while let Some(c) = cur {
            if self.nodes[c].item != Item::If {
                break;
            }
            cur = self.nodes[c].next;
        }
        self.nodes[node].list = cur;
        while let Some(c) = cur {
            let mut next = self.nodes[c].next;
            while let Some(nx) = next {
                if self.nodes[nx].item != Item::If {
                    break;
                }
                next = self.nodes[nx].next;
            }
            self.nodes[c].next = next;
            cur = next;
        }
    }

    fn finalize_choice(&mut self, node: NodeId) {
        let Item::Choice(choice) = self.nodes[node].item else { return };
        let mut cur = self.nodes[node].list;
        while let Some(c) = cur {
            if let Item::Sym(s) = self.nodes[c].item {
                self.syms[s].choice = Some(choice);
                self.choices[choice].syms.push(s);
            }
            cur = self.nodes[c].next;
        }
        // An untyped choice takes the type of its first typed symbol, and
        // untyped symbols take the choice's type.
        if self.choices[choice].orig_type == SymbolType::Unknown {
            let t = self.choices[choice]
                .syms
                .iter()
                .map(|&s| self.syms[s].orig_type)
                .find(|&t| t != SymbolType::Unknown);
            if let Some(t) = t {
                self.choices[choice].orig_type = t;
            }
        }
        let ct = self.choices[choice].orig_type;
        for i in 0..self.choices[choice].syms.len() {
            let s = self.choices[choice].syms[i];
            if self.syms[s].orig_type == SymbolType::Unknown {
                self.syms[s].orig_type = ct;
            }
        }
    }

    fn first_loc(&self, nodes: &[NodeId]) -> (String, usize) {
        match nodes.first() {
            Some(&n) => (self.nodes[n].filename.to_string(), self.nodes[n].linenr),
            None => (self.top_filename.clone(), 0),
        }
    }

    fn check_sym_sanity(&mut self) -> Result<(), KconfigError> {
        let num_ok = |kc: &Kconfig, s: SymId, t: SymbolType| {
            if kc.syms[s].nodes.is_empty() {
                py_int(&kc.syms[s].name, t.base()).is_some()
            } else {
                kc.syms[s].orig_type == t
            }
        };
        for &s in &self.unique_defined_syms {
            let sym = &self.syms[s];
            let t = sym.orig_type;
            if t.is_bool_tri() {
                for (target, what) in sym
                    .selects
                    .iter()
                    .map(|x| (x.0, "selects"))
                    .chain(sym.implies.iter().map(|x| (x.0, "implies")))
                {
                    let tt = self.syms[target].orig_type;
                    if !tt.is_bool_tri() && tt != SymbolType::Unknown {
                        self.warn_msg(
                            format!(
                                "{} {} the {} symbol {}, which is not bool or tristate",
                                self.sym_name_and_loc(s),
                                what,
                                tt.as_str(),
                                self.sym_name_and_loc(target)
                            ),
                            None,
                        );
                    }
                }
            } else if t != SymbolType::Unknown {
                for (d, _) in &sym.defaults {
                    let Expr::Sym(d) = d else {
                        let (f, l) = self.first_loc(&sym.nodes);
                        return Err(KconfigError::new(
                            ErrorKind::Parse,
                            f,
                            l,
                            format!(
                                "the {} symbol {} has a malformed default {} -- expected a single symbol",
                                t.as_str(),
                                self.sym_name_and_loc(s),
                                self.expr_str(d)
                            ),
                        ));
                    };
                    let ds = &self.syms[*d];
                    if t == SymbolType::String {
                        let is_upper = ds.name.chars().any(|c| c.is_uppercase())
                            && !ds.name.chars().any(|c| c.is_lowercase());
                        if !ds.is_constant && ds.nodes.is_empty() && !is_upper {
                            self.warn_msg(
                                format!(
                                    "style: quotes recommended around default value for string symbol {}",
                                    self.sym_name_and_loc(s)
                                ),
                                None,
                            );
                        }
                    } else if !num_ok(self, *d, t) {
                        self.warn_msg(
                            format!(
                                "the {0} symbol {1} has a non-{0} default {2}",
                                t.as_str(),
                                self.sym_name_and_loc(s),
                                self.sym_name_and_loc(*d)
                            ),
                            None,
                        );
                    }
                }
                if !sym.selects.is_empty() || !sym.implies.is_empty() {
                    self.warn_msg(
                        format!(
                            "the {} symbol {} has selects or implies",
                            t.as_str(),
                            self.sym_name_and_loc(s)
                        ),
                        None,
                    );
                }
            } else {
                self.warn_msg(format!("{} defined without a type", self.sym_name_and_loc(s)), None);
            }
            if !sym.ranges.is_empty() {
                if !t.is_int_hex() {
                    self.warn_msg(
                        format!(
                            "the {} symbol {} has ranges, but is not int or hex",
                            t.as_str(),
                            self.sym_name_and_loc(s)
                        ),
                        None,
                    );
                } else {
                    for (lo, hi, _) in &sym.ranges {
                        if !num_ok(self, *lo, t) || !num_ok(self, *hi, t) {
                            self.warn_msg(
                                format!(
                                    "the {0} symbol {1} has a non-{0} range [{2}, {3}]",
                                    t.as_str(),
                                    self.sym_name_and_loc(s),
                                    self.sym_name_and_loc(*lo),
                                    self.sym_name_and_loc(*hi)
                                ),
                                None,
                            );
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn check_choice_sanity(&mut self) -> Result<(), KconfigError> {
        let warn_select_imply = |kc: &Kconfig, s: SymId, e: &Expr, what: &str| {
            let mut msg = format!(
                "the choice symbol {} is {} by the following symbols, but select/imply has no effect on choice \
                 symbols",
                kc.sym_name_and_loc(s),
                what
            );
            for si in split_expr(e, true) {
                if let Expr::Sym(x) = split_expr(si, false)[0] {
                    msg += &format!("\n - {}", kc.sym_name_and_loc(*x));
                }
            }
            kc.warn_msg(msg, None);
        };
        for &c in &self.unique_choices {
            let ch = &self.choices[c];
            if !ch.orig_type.is_bool_tri() {
                self.warn_msg(
                    format!("{} defined with type {}", self.choice_name_and_loc(c), ch.orig_type.as_str()),
                    None,
                );
            }
            if !ch.nodes.iter().any(|&n| self.nodes[n].prompt.is_some()) {
                self.warn_msg(format!("{} defined without a prompt", self.choice_name_and_loc(c)), None);
            }
            for (d, _) in &ch.defaults {
                let Expr::Sym(d) = d else {
                    let (f, l) = self.first_loc(&ch.nodes);
                    return Err(KconfigError::new(
                        ErrorKind::Parse,
                        f,
                        l,
                        format!(
                            "{} has a malformed default {}",
                            self.choice_name_and_loc(c),
                            self.expr_str(d)
                        ),
                    ));
                };
                if self.syms[*d].choice != Some(c) {
                    self.warn_msg(
                        format!(
                            "the default selection {} of {} is not contained in the choice",
                            self.sym_name_and_loc(*d),
                            self.choice_name_and_loc(c)
                        ),
                        None,
                    );
                }
            }
            for &s in &ch.syms {
                let sym = &self.syms[s];
                if !sym.defaults.is_empty() {
                    self.warn_msg(
                        format!(
                            "default on the choice symbol {} will have no effect, as defaults do not affect \
                             choice symbols",
                            self.sym_name_and_loc(s)
                        ),
                        None,
                    );
                }
                if !sym.rev_dep.is_sym(N) {
                    warn_select_imply(self, s, &sym.rev_dep, "selected");
                }
                if !sym.weak_rev_dep.is_sym(N) {
                    warn_select_imply(self, s, &sym.weak_rev_dep, "implied");
                }
                for &n in &sym.nodes {
                    let parent_is_choice =
                        self.nodes[n].parent.is_some_and(|p| self.nodes[p].item == Item::Choice(c));
                    if parent_is_choice {
                        if self.nodes[n].prompt.is_none() {
                            self.warn_msg(
                                format!("the choice symbol {} has no prompt", self.sym_name_and_loc(s)),
                                None,
                            );
                        }
                    } else if self.nodes[n].prompt.is_some() {
                        self.warn_msg(
                            format!(
                                "the choice symbol {} is defined with a prompt outside the choice",
                                self.sym_name_and_loc(s)
                            ),
                            None,
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// KCONFIG_WARN_UNDEF: warns about references to undefined symbols.
    fn check_undef_syms(&self) {
        let is_num = |s: &str| {
            py_int(s, 10).is_some()
                || ((s.starts_with("0x") || s.starts_with("0X")) && py_int(s, 16).is_some())
        };
        let mut names: Vec<(&String, &SymId)> = self.sym_map.iter().collect();
        names.sort_by_key(|(_, id)| **id);
        for (name, &id) in names {
            if !self.syms[id].nodes.is_empty() || is_num(name) || name == "MODULES" {
                continue;
            }
            let mut msg = format!("undefined symbol {}:", name);
            for n in self.all_nodes() {
                if self.node_referenced(n).contains(&Sc::Sym(id)) {
                    msg += &format!(
                        "\n\n- Referenced at {}:{}:\n\n{}",
                        self.nodes[n].filename,
                        self.nodes[n].linenr,
                        self.node_str(n)
                    );
                }
            }
            self.warn_msg(msg, None);
        }
    }

    /// All menu nodes below the top node, in tree order.
    pub(crate) fn all_nodes(&self) -> Vec<NodeId> {
        let mut out = Vec::new();
        let mut node = self.top;
        loop {
            let n = &self.nodes[node];
            if let Some(l) = n.list {
                node = l;
            } else if let Some(nx) = n.next {
                node = nx;
            } else {
                let mut found = None;
                let mut p = n.parent;
                while let Some(pp) = p {
                    if let Some(nx) = self.nodes[pp].next {
                        found = Some(nx);
                        break;
                    }
                    p = self.nodes[pp].parent;
                }
                match found {
                    Some(nx) => node = nx,
                    None => return out,
                }
            }
            out.push(node);
        }
    }

    /// `MenuNode.referenced`.
    pub(crate) fn node_referenced(&self, node: NodeId) -> Vec<Sc> {
        let n = &self.nodes[node];
        let mut out = Vec::new();
        Kconfig::expr_items(&n.dep, &mut out);
        if let Some((_, c)) = &n.prompt {
            Kconfig::expr_items(c, &mut out);
        }
        if n.item == Item::Menu {
            Kconfig::expr_items(&n.visibility, &mut out);
        }
        for (v, c) in &n.defaults {
            Kconfig::expr_items(v, &mut out);
            Kconfig::expr_items(c, &mut out);
        }
        for (t, c) in n.selects.iter().chain(n.implies.iter()) {
            Kconfig::expr_items(&Expr::Sym(*t), &mut out);
            Kconfig::expr_items(c, &mut out);
        }
        for (lo, hi, c) in &n.ranges {
            Kconfig::expr_items(&Expr::Sym(*lo), &mut out);
            Kconfig::expr_items(&Expr::Sym(*hi), &mut out);
            Kconfig::expr_items(c, &mut out);
        }
        out
    }

    fn depend_on(&mut self, sc: Sc, e: &Expr, seen: &mut HashSet<(Sc, Sc)>) {
        let mut leaves = Vec::new();
        Kconfig::expr_items(e, &mut leaves);
        for leaf in leaves {
            match leaf {
                Sc::Sym(s) if self.syms[s].is_constant => {}
                _ => {
                    if seen.insert((leaf, sc)) {
                        match leaf {
                            Sc::Sym(s) => self.syms[s].dependents.push(sc),
                            Sc::Choice(c) => self.choices[c].dependents.push(sc),
                        }
                    }
                }
            }
        }
    }

    /// `_build_dep`: who must be recomputed when an item changes; used for
    /// dependency-loop detection.
    fn build_dep(&mut self) {
        let mut seen = HashSet::new();
        for i in 0..self.unique_defined_syms.len() {
            let s = self.unique_defined_syms[i];
            let sc = Sc::Sym(s);
            let mut exprs: Vec<Expr> = Vec::new();
            for &n in &self.syms[s].nodes {
                if let Some((_, c)) = &self.nodes[n].prompt {
                    exprs.push(c.clone());
                }
            }
            let sym = &self.syms[s];
            for (v, c) in &sym.defaults {
                exprs.push(v.clone());
                exprs.push(c.clone());
            }
            exprs.push(sym.rev_dep.clone());
            exprs.push(sym.weak_rev_dep.clone());
            for (lo, hi, c) in &sym.ranges {
                exprs.push(Expr::Sym(*lo));
                exprs.push(Expr::Sym(*hi));
                exprs.push(c.clone());
            }
            exprs.push(sym.direct_dep.clone());
            for e in exprs {
                self.depend_on(sc, &e, &mut seen);
            }
        }
        for i in 0..self.unique_choices.len() {
            let c = self.unique_choices[i];
            let sc = Sc::Choice(c);
            let mut exprs: Vec<Expr> = Vec::new();
            for &n in &self.choices[c].nodes {
                if let Some((_, cond)) = &self.nodes[n].prompt {
                    exprs.push(cond.clone());
                }
            }
            for (_, cond) in &self.choices[c].defaults {
                exprs.push(cond.clone());
            }
            for e in exprs {
                self.depend_on(sc, &e, &mut seen);
            }
        }
    }

    fn check_dep_loop_sym(&mut self, s: SymId, ignore_choice: bool, depth: usize) -> Option<DepLoop> {
        match self.syms[s].visited {
            2 => return None,
            1 => return Some(DepLoop::Partial(vec![Sc::Sym(s)])),
            _ => {}
        }
        if depth > MAX_FINALIZE_DEPTH {
            return Some(DepLoop::TooDeep(Sc::Sym(s)));
        }
        self.syms[s].visited = 1;
        for i in 0..self.syms[s].dependents.len() {
            let dep = self.syms[s].dependents[i];
            let lp = match dep {
                Sc::Choice(c) => self.check_dep_loop_choice(c, None, depth + 1),
                Sc::Sym(d) => self.check_dep_loop_sym(d, false, depth + 1),
            };
            if let Some(lp) = lp {
                return Some(lp.back_through(Sc::Sym(s)));
            }
        }
        if let Some(c) = self.syms[s].choice {
            if !ignore_choice {
                if let Some(lp) = self.check_dep_loop_choice(c, Some(s), depth + 1) {
                    return Some(lp.back_through(Sc::Sym(s)));
                }
            }
        }
        self.syms[s].visited = 2;
        None
    }

    fn check_dep_loop_choice(&mut self, c: ChoiceId, skip: Option<SymId>, depth: usize) -> Option<DepLoop> {
        match self.choices[c].visited {
            2 => return None,
            1 => return Some(DepLoop::Partial(vec![Sc::Choice(c)])),
            _ => {}
        }
        self.choices[c].visited = 1;
        for i in 0..self.choices[c].syms.len() {
            let s = self.choices[c].syms[i];
            if Some(s) != skip {
                if let Some(lp) = self.check_dep_loop_sym(s, true, depth + 1) {
                    return Some(lp.back_through(Sc::Choice(c)));
                }
            }
        }
        self.choices[c].visited = 2;
        None
    }

    fn loop_error(&self, lp: DepLoop) -> KconfigError {
        let items = match lp {
            DepLoop::Complete(items) | DepLoop::Partial(items) => items,
            DepLoop::TooDeep(sc) => {
                let nodes = match sc {
                    Sc::Sym(s) => &self.syms[s].nodes,
                    Sc::Choice(c) => &self.choices[c].nodes,
                };
                let (f, l) = self.first_loc(nodes);
                return KconfigError::new(
                    ErrorKind::Parse,
                    f,
                    l,
                    format!("dependency chain through {} is too long", self.sc_name_and_loc(sc)),
                );
            }
        };
        let first = items[0];
        let mut msg = String::from("\nDependency loop\n===============\n\n");
        for (i, &it) in items.iter().enumerate() {
            if i > 0 {
                msg += "...depends on ";
                if let Sc::Sym(s) = it {
                    if self.syms[s].choice.is_some() {
                        msg += "the choice symbol ";
                    }
                }
            }
            let def: Vec<String> = match it {
                Sc::Sym(s) => self.syms[s].nodes.iter().map(|&n| self.node_str(n)).collect(),
                Sc::Choice(c) => self.choices[c].nodes.iter().map(|&n| self.node_str(n)).collect(),
            };
            msg += &format!("{}, with definition...\n\n{}\n\n", self.sc_name_and_loc(it), def.join("\n\n"));
            if let Sc::Sym(s) = it {
                if !self.syms[s].rev_dep.is_sym(N) {
                    msg += &format!(
                        "(select-related dependencies: {})\n\n",
                        self.expr_str(&self.syms[s].rev_dep)
                    );
                }
                if !self.syms[s].weak_rev_dep.is_sym(N) {
                    msg += &format!(
                        "(imply-related dependencies: {})\n\n",
                        self.expr_str(&self.syms[s].rev_dep)
                    );
                }
            }
        }
        msg += &format!("...depends again on {}", self.sc_name_and_loc(first));
        let nodes = match first {
            Sc::Sym(s) => &self.syms[s].nodes,
            Sc::Choice(c) => &self.choices[c].nodes,
        };
        let (f, l) = self.first_loc(nodes);
        KconfigError::new(ErrorKind::Parse, f, l, msg.trim_start().to_string())
    }
}

/// A dependency loop found by the search, as kconfiglib collects it: the
/// item where the loop was detected, then the items on the way back.
pub(crate) enum DepLoop {
    Partial(Vec<Sc>),
    Complete(Vec<Sc>),
    TooDeep(Sc),
}

impl DepLoop {
    /// `_found_dep_loop`: extends the loop until it is back at its start.
    fn back_through(self, cur: Sc) -> DepLoop {
        match self {
            DepLoop::Partial(mut items) => {
                if items[0] == cur {
                    DepLoop::Complete(items)
                } else {
                    items.push(cur);
                    DepLoop::Partial(items)
                }
            }
            done => done,
        }
    }
}

fn push_unique(v: &mut Vec<Sc>, sc: Sc) {
    if !v.contains(&sc) {
        v.push(sc);
    }
}
