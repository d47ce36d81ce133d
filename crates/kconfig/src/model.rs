//! The parsed configuration: symbols, choices, menu nodes and expressions,
//! stored in arenas and addressed by index. Mirrors kconfiglib's object
//! model so that its algorithms port one to one.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use crate::error::Warning;
use crate::util::{escape, Env};

pub(crate) type SymId = usize;
pub(crate) type ChoiceId = usize;
pub(crate) type NodeId = usize;

/// The constant symbols `n`, `m` and `y` always have these ids.
pub(crate) const N: SymId = 0;
pub(crate) const M: SymId = 1;
pub(crate) const Y: SymId = 2;

/// A symbol or choice type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SymbolType {
    /// Undefined symbols, constants, and symbols defined without a type.
    Unknown,
    /// `bool`: n or y.
    Bool,
    /// `tristate`: n, m or y.
    Tristate,
    /// `string`.
    String,
    /// `int` (decimal).
    Int,
    /// `hex`.
    Hex,
}

impl SymbolType {
    /// The Kconfig keyword for the type (`unknown` for [`SymbolType::Unknown`]).
    pub fn as_str(self) -> &'static str {
        match self {
            SymbolType::Unknown => "unknown",
            SymbolType::Bool => "bool",
            SymbolType::Tristate => "tristate",
            SymbolType::String => "string",
            SymbolType::Int => "int",
            SymbolType::Hex => "hex",
        }
    }

    pub(crate) fn is_bool_tri(self) -> bool {
        matches!(self, SymbolType::Bool | SymbolType::Tristate)
    }

    pub(crate) fn is_int_hex(self) -> bool {
        matches!(self, SymbolType::Int | SymbolType::Hex)
    }

    /// Base for Python's `int(s, base)` (0: inferred from the prefix).
    pub(crate) fn base(self) -> u32 {
        match self {
            SymbolType::Hex => 16,
            SymbolType::Int => 10,
            _ => 0,
        }
    }
}

impl fmt::Display for SymbolType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A tristate value. `N < M < Y`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tristate {
    /// n (0)
    N = 0,
    /// m (1)
    M = 1,
    /// y (2)
    Y = 2,
}

impl Tristate {
    pub(crate) fn from_u8(v: u8) -> Tristate {
        match v {
            0 => Tristate::N,
            1 => Tristate::M,
            _ => Tristate::Y,
        }
    }

    /// `"n"`, `"m"` or `"y"`.
    pub fn as_str(self) -> &'static str {
        tri_str(self as u8)
    }

    /// Parses `"n"`, `"m"` or `"y"`.
    pub fn parse(s: &str) -> Option<Tristate> {
        match s {
            "n" => Some(Tristate::N),
            "m" => Some(Tristate::M),
            "y" => Some(Tristate::Y),
            _ => None,
        }
    }
}

impl fmt::Display for Tristate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

pub(crate) fn tri_str(v: u8) -> &'static str {
    match v {
        0 => "n",
        1 => "m",
        _ => "y",
    }
}

/// Relational operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RelOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl RelOp {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RelOp::Eq => "=",
            RelOp::Ne => "!=",
            RelOp::Lt => "<",
            RelOp::Le => "<=",
            RelOp::Gt => ">",
            RelOp::Ge => ">=",
        }
    }
}

/// A Kconfig expression. Operands of relations are symbols (quoted strings
/// and numbers are constant or undefined symbols, as in kconfiglib).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Expr {
    Sym(SymId),
    Choice(ChoiceId),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Rel(RelOp, SymId, SymId),
}

impl Expr {
    pub(crate) fn y() -> Expr {
        Expr::Sym(Y)
    }

    pub(crate) fn n() -> Expr {
        Expr::Sym(N)
    }

    pub(crate) fn is_sym(&self, id: SymId) -> bool {
        matches!(self, Expr::Sym(s) if *s == id)
    }
}

/// `_make_and`: AND with the trivial simplifications kconfiglib applies.
pub(crate) fn make_and(e1: Expr, e2: Expr) -> Expr {
    if e1.is_sym(Y) {
        return e2;
    }
    if e2.is_sym(Y) {
        return e1;
    }
    if e1.is_sym(N) || e2.is_sym(N) {
        return Expr::n();
    }
    Expr::And(Box::new(e1), Box::new(e2))
}

/// `_make_or`.
pub(crate) fn make_or(e1: Expr, e2: Expr) -> Expr {
    if e1.is_sym(N) {
        return e2;
    }
    if e2.is_sym(N) {
        return e1;
    }
    if e1.is_sym(Y) || e2.is_sym(Y) {
        return Expr::y();
    }
    Expr::Or(Box::new(e1), Box::new(e2))
}

/// `split_expr(expr, OR)` / `split_expr(expr, AND)`.
pub(crate) fn split_expr(e: &Expr, or: bool) -> Vec<&Expr> {
    let mut out = Vec::new();
    fn rec<'a>(e: &'a Expr, or: bool, out: &mut Vec<&'a Expr>) {
        match e {
            Expr::Or(a, b) if or => {
                rec(a, or, out);
                rec(b, or, out);
            }
            Expr::And(a, b) if !or => {
                rec(a, or, out);
                rec(b, or, out);
            }
            _ => out.push(e),
        }
    }
    rec(e, or, &mut out);
    out
}

/// Something an expression leaf or a dependency edge can refer to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Sc {
    Sym(SymId),
    Choice(ChoiceId),
}

/// What a menu node stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Item {
    Sym(SymId),
    Choice(ChoiceId),
    Menu,
    Comment,
    /// `if` blocks; removed from the tree after parsing.
    If,
}

#[derive(Debug, Clone)]
pub(crate) enum UserValue {
    Tri(u8),
    Str(String),
}

/// Cached results of value computations. A cache entry is valid when its
/// generation tag equals `Kconfig::gen`; bumping the generation invalidates
/// everything at once.
#[derive(Debug, Default)]
pub(crate) struct SymCache {
    pub tri_gen: Cell<u64>,
    pub tri: Cell<u8>,
    pub str_gen: Cell<u64>,
    pub str_val: RefCell<Arc<str>>,
    pub vis_gen: Cell<u64>,
    pub vis: Cell<u8>,
    pub write_to_conf: Cell<bool>,
    pub busy_tri: Cell<bool>,
    pub busy_str: Cell<bool>,
    pub busy_vis: Cell<bool>,
}

#[derive(Debug, Default)]
pub(crate) struct ChoiceCache {
    pub vis_gen: Cell<u64>,
    pub vis: Cell<u8>,
    pub sel_gen: Cell<u64>,
    pub sel: Cell<Option<SymId>>,
    pub busy_vis: Cell<bool>,
    pub busy_sel: Cell<bool>,
}

#[derive(Debug)]
pub(crate) struct Sym {
    pub name: String,
    pub is_constant: bool,
    pub orig_type: SymbolType,
    pub nodes: Vec<NodeId>,
    pub defaults: Vec<(Expr, Expr)>,
    pub selects: Vec<(SymId, Expr)>,
    pub implies: Vec<(SymId, Expr)>,
    pub ranges: Vec<(SymId, SymId, Expr)>,
    pub rev_dep: Expr,
    pub weak_rev_dep: Expr,
    pub direct_dep: Expr,
    pub choice: Option<ChoiceId>,
    pub env_var: Option<String>,
    pub is_allnoconfig_y: bool,
    pub user_value: Option<UserValue>,
    pub was_set: bool,
    pub dependents: Vec<Sc>,
    pub visited: u8,
    pub cache: SymCache,
}

impl Sym {
    pub(crate) fn new(name: &str, is_constant: bool) -> Sym {
        Sym {
            name: name.to_string(),
            is_constant,
            orig_type: SymbolType::Unknown,
            nodes: Vec::new(),
            defaults: Vec::new(),
            selects: Vec::new(),
            implies: Vec::new(),
            ranges: Vec::new(),
            rev_dep: Expr::n(),
            weak_rev_dep: Expr::n(),
            direct_dep: Expr::n(),
            choice: None,
            env_var: None,
            is_allnoconfig_y: false,
            user_value: None,
            was_set: false,
            dependents: Vec::new(),
            visited: 0,
            cache: SymCache::default(),
        }
    }
}

#[derive(Debug)]
pub(crate) struct ChoiceData {
    pub name: Option<String>,
    pub orig_type: SymbolType,
    pub nodes: Vec<NodeId>,
    pub syms: Vec<SymId>,
    pub defaults: Vec<(Expr, Expr)>,
    pub direct_dep: Expr,
    pub is_optional: bool,
    pub user_value: Option<u8>,
    pub user_selection: Option<SymId>,
    pub was_set: bool,
    pub dependents: Vec<Sc>,
    pub visited: u8,
    pub cache: ChoiceCache,
}

impl ChoiceData {
    pub(crate) fn new(name: Option<String>) -> ChoiceData {
        ChoiceData {
            name,
            orig_type: SymbolType::Unknown,
            nodes: Vec::new(),
            syms: Vec::new(),
            defaults: Vec::new(),
            direct_dep: Expr::n(),
            is_optional: false,
            user_value: None,
            user_selection: None,
            was_set: false,
            dependents: Vec::new(),
            visited: 0,
            cache: ChoiceCache::default(),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub item: Item,
    pub next: Option<NodeId>,
    pub list: Option<NodeId>,
    pub parent: Option<NodeId>,
    pub prompt: Option<(String, Expr)>,
    /// The prompt condition as written, before dependencies were propagated.
    pub orig_prompt_cond: Option<Expr>,
    pub help: Option<String>,
    pub dep: Expr,
    /// `visible if` (menus only).
    pub visibility: Expr,
    pub defaults: Vec<(Expr, Expr)>,
    pub selects: Vec<(SymId, Expr)>,
    pub implies: Vec<(SymId, Expr)>,
    pub ranges: Vec<(SymId, SymId, Expr)>,
    /// The property conditions as written (before propagation).
    pub orig_defaults: Vec<(Expr, Expr)>,
    pub orig_selects: Vec<(SymId, Expr)>,
    pub orig_implies: Vec<(SymId, Expr)>,
    pub orig_ranges: Vec<(SymId, SymId, Expr)>,
    pub is_menuconfig: bool,
    pub filename: Arc<str>,
    pub linenr: usize,
    pub include_path: Arc<Vec<(Arc<str>, usize)>>,
}

impl Node {
    pub(crate) fn new(
        item: Item,
        filename: Arc<str>,
        linenr: usize,
        include_path: Arc<Vec<(Arc<str>, usize)>>,
    ) -> Node {
        Node {
            item,
            next: None,
            list: None,
            parent: None,
            prompt: None,
            orig_prompt_cond: None,
            help: None,
            dep: Expr::y(),
            visibility: Expr::y(),
            defaults: Vec::new(),
            selects: Vec::new(),
            implies: Vec::new(),
            ranges: Vec::new(),
            orig_defaults: Vec::new(),
            orig_selects: Vec::new(),
            orig_implies: Vec::new(),
            orig_ranges: Vec::new(),
            is_menuconfig: false,
            filename,
            linenr,
            include_path,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Variable {
    pub value: String,
    pub is_recursive: bool,
    pub n_expansions: usize,
}

/// A parsed Kconfig tree together with the current symbol values.
///
/// Create one with [`Kconfig::load`]; see the crate documentation for an
/// overview. Values are computed lazily and cached until the next change.
#[derive(Debug)]
pub struct Kconfig {
    pub(crate) syms: Vec<Sym>,
    pub(crate) sym_map: HashMap<String, SymId>,
    pub(crate) const_map: HashMap<String, SymId>,
    pub(crate) choices: Vec<ChoiceData>,
    pub(crate) named_choices: HashMap<String, ChoiceId>,
    pub(crate) nodes: Vec<Node>,
    pub(crate) top: NodeId,
    pub(crate) defined_syms: Vec<SymId>,
    pub(crate) unique_defined_syms: Vec<SymId>,
    pub(crate) choice_order: Vec<ChoiceId>,
    pub(crate) unique_choices: Vec<ChoiceId>,
    pub(crate) menus: Vec<NodeId>,
    pub(crate) comments: Vec<NodeId>,
    pub(crate) modules: SymId,
    pub(crate) defconfig_list: Option<SymId>,
    pub(crate) variables: HashMap<String, Variable>,
    pub(crate) srctree: String,
    pub(crate) srctree_prefix: String,
    pub(crate) top_filename: String,
    pub(crate) config_prefix: String,
    pub(crate) config_header: String,
    pub(crate) kconfig_filenames: Vec<String>,
    pub(crate) env_vars: BTreeSet<String>,
    pub(crate) env: Env,
    /// Whether `$(shell,...)` may run commands (off unless asked for).
    pub(crate) allow_shell: bool,
    /// Follow Linux's `conf` where kconfiglib differs (set by the `conf`
    /// front end; see README.md).
    pub(crate) linux_semantics: bool,
    pub(crate) missing_syms: Vec<(String, String)>,
    pub(crate) warn: Cell<bool>,
    pub(crate) warn_assign_undef: bool,
    pub(crate) warn_assign_override: bool,
    pub(crate) warn_assign_redun: bool,
    pub(crate) warn_assign_no_prompt: bool,
    pub(crate) warnings: RefCell<Vec<Warning>>,
    pub(crate) gen: Cell<u64>,
    /// False after parsing: names looked up then (`eval_string`) are not
    /// registered as symbols.
    pub(crate) parsing: bool,
}

impl Kconfig {
    pub(crate) fn empty(env: Env) -> Kconfig {
        let mut kc = Kconfig {
            syms: Vec::new(),
            sym_map: HashMap::new(),
            const_map: HashMap::new(),
            choices: Vec::new(),
            named_choices: HashMap::new(),
            nodes: Vec::new(),
            top: 0,
            defined_syms: Vec::new(),
            unique_defined_syms: Vec::new(),
            choice_order: Vec::new(),
            unique_choices: Vec::new(),
            menus: Vec::new(),
            comments: Vec::new(),
            modules: 0,
            defconfig_list: None,
            variables: HashMap::new(),
            srctree: String::new(),
            srctree_prefix: String::new(),
            top_filename: String::new(),
            config_prefix: "CONFIG_".to_string(),
            config_header: String::new(),
            kconfig_filenames: Vec::new(),
            env_vars: BTreeSet::new(),
            allow_shell: false,
            linux_semantics: false,
            env,
            missing_syms: Vec::new(),
            warn: Cell::new(true),
            warn_assign_undef: true,
            warn_assign_override: true,
            warn_assign_redun: true,
            warn_assign_no_prompt: true,
            warnings: RefCell::new(Vec::new()),
            gen: Cell::new(1),
            parsing: true,
        };
        for name in ["n", "m", "y"] {
            let mut s = Sym::new(name, true);
            s.orig_type = SymbolType::Tristate;
            let id = kc.syms.len();
            kc.syms.push(s);
            kc.const_map.insert(name.to_string(), id);
        }
        kc
    }

    pub(crate) fn lookup_sym(&mut self, name: &str) -> SymId {
        if let Some(&id) = self.sym_map.get(name) {
            return id;
        }
        let id = self.syms.len();
        self.syms.push(Sym::new(name, false));
        if self.parsing {
            self.sym_map.insert(name.to_string(), id);
        } else {
            self.warn_msg(format!("no symbol {} in configuration", name), None);
        }
        id
    }

    pub(crate) fn lookup_const_sym(&mut self, name: &str) -> SymId {
        if let Some(&id) = self.const_map.get(name) {
            return id;
        }
        let id = self.syms.len();
        self.syms.push(Sym::new(name, true));
        if self.parsing {
            self.const_map.insert(name.to_string(), id);
        }
        id
    }

    /// Records a warning (kconfiglib's `_warn`).
    pub(crate) fn warn_msg(&self, msg: String, loc: Option<(&str, usize)>) {
        if !self.warn.get() {
            return;
        }
        self.warnings
            .borrow_mut()
            .push(Warning { location: loc.map(|(f, l)| (f.to_string(), l)), message: msg });
    }

    /// Drops every cached value.
    pub(crate) fn invalidate(&self) {
        self.gen.set(self.gen.get() + 1);
    }

    pub(crate) fn locs(&self, nodes: &[NodeId]) -> String {
        if nodes.is_empty() {
            return "(undefined)".to_string();
        }
        let parts: Vec<String> =
            nodes.iter().map(|&n| format!("{}:{}", self.nodes[n].filename, self.nodes[n].linenr)).collect();
        format!("(defined at {})", parts.join(", "))
    }

    pub(crate) fn sym_name_and_loc(&self, s: SymId) -> String {
        format!("{} {}", self.syms[s].name, self.locs(&self.syms[s].nodes))
    }

    pub(crate) fn choice_name_and_loc(&self, c: ChoiceId) -> String {
        format!("{} {}", self.choice_expr_str(c), self.locs(&self.choices[c].nodes))
    }

    pub(crate) fn sc_name_and_loc(&self, sc: Sc) -> String {
        match sc {
            Sc::Sym(s) => self.sym_name_and_loc(s),
            Sc::Choice(c) => self.choice_name_and_loc(c),
        }
    }

    /// `name_and_loc` for the item of a menu node (menus and comments have
    /// no name in kconfiglib; use their title).
    pub(crate) fn node_item_name_and_loc(&self, node: NodeId) -> String {
        let n = &self.nodes[node];
        match n.item {
            Item::Sym(s) => self.sym_name_and_loc(s),
            Item::Choice(c) => self.choice_name_and_loc(c),
            Item::Menu | Item::Comment | Item::If => {
                let kind = match n.item {
                    Item::Menu => "menu",
                    Item::Comment => "comment",
                    _ => "if",
                };
                let title = n.prompt.as_ref().map(|p| p.0.as_str()).unwrap_or("");
                format!("{} \"{}\" (defined at {}:{})", kind, title, n.filename, n.linenr)
            }
        }
    }

    pub(crate) fn choice_expr_str(&self, c: ChoiceId) -> String {
        match &self.choices[c].name {
            Some(n) => format!("<choice {}>", n),
            None => "<choice>".to_string(),
        }
    }

    /// `standard_sc_expr_str`.
    pub(crate) fn sym_expr_str(&self, s: SymId) -> String {
        let sym = &self.syms[s];
        if sym.is_constant && !matches!(sym.name.as_str(), "n" | "m" | "y") {
            format!("\"{}\"", escape(&sym.name))
        } else {
            sym.name.clone()
        }
    }

    fn sc_str(&self, e: &Expr) -> Option<String> {
        match e {
            Expr::Sym(s) => Some(self.sym_expr_str(*s)),
            Expr::Choice(c) => Some(self.choice_expr_str(*c)),
            _ => None,
        }
    }

    /// `expr_str`: the expression in Kconfig syntax.
    pub(crate) fn expr_str(&self, e: &Expr) -> String {
        match e {
            Expr::Sym(_) | Expr::Choice(_) => self.sc_str(e).unwrap_or_default(),
            Expr::And(a, b) => format!("{} && {}", self.paren(a, true), self.paren(b, true)),
            Expr::Or(a, b) => format!("{} || {}", self.paren(a, false), self.paren(b, false)),
            Expr::Not(a) => match self.sc_str(a) {
                Some(s) => format!("!{}", s),
                None => format!("!({})", self.expr_str(a)),
            },
            Expr::Rel(op, a, b) => {
                format!("{} {} {}", self.sym_expr_str(*a), op.as_str(), self.sym_expr_str(*b))
            }
        }
    }

    /// Parenthesizes ORs inside ANDs (`in_and`) and ANDs inside ORs.
    fn paren(&self, e: &Expr, in_and: bool) -> String {
        match (e, in_and) {
            (Expr::Or(..), true) | (Expr::And(..), false) => format!("({})", self.expr_str(e)),
            _ => self.expr_str(e),
        }
    }

    /// `MenuNode._strip_dep`: removes the node's propagated dependency.
    fn strip_dep(&self, node: &Node, e: &Expr) -> Expr {
        if *e == node.dep {
            return Expr::y();
        }
        if let Expr::And(a, b) = e {
            if **b == node.dep {
                return (**a).clone();
            }
        }
        e.clone()
    }

    /// `MenuNode.__str__`: the node in Kconfig syntax, with parent
    /// dependencies folded into `depends on`.
    pub(crate) fn node_str(&self, id: NodeId) -> String {
        let node = &self.nodes[id];
        let y = Expr::y();
        match node.item {
            Item::Menu | Item::Comment | Item::If => {
                let kw = if node.item == Item::Menu { "menu" } else { "comment" };
                let mut s =
                    format!("{} \"{}\"", kw, node.prompt.as_ref().map(|p| p.0.as_str()).unwrap_or(""));
                if node.dep != y {
                    s += &format!("\n\tdepends on {}", self.expr_str(&node.dep));
                }
                if node.item == Item::Menu && node.visibility != y {
                    s += &format!("\n\tvisible if {}", self.expr_str(&node.visibility));
                }
                s
            }
            Item::Sym(_) | Item::Choice(_) => {
                let mut lines: Vec<String> = Vec::new();
                let add_cond = |lines: &mut Vec<String>, s: String, cond: &Expr| {
                    if *cond != y {
                        lines.push(format!("\t{} if {}", s, self.expr_str(cond)));
                    } else {
                        lines.push(format!("\t{}", s));
                    }
                };
                let orig_type = match node.item {
                    Item::Sym(s) => {
                        let kw = if node.is_menuconfig { "menuconfig " } else { "config " };
                        lines.push(format!("{}{}", kw, self.syms[s].name));
                        self.syms[s].orig_type
                    }
                    Item::Choice(c) => {
                        lines.push(match &self.choices[c].name {
                            Some(n) => format!("choice {}", n),
                            None => "choice".to_string(),
                        });
                        self.choices[c].orig_type
                    }
                    _ => SymbolType::Unknown,
                };
                if orig_type != SymbolType::Unknown && node.prompt.is_none() {
                    lines.push(format!("\t{}", orig_type.as_str()));
                }
                if let Some((text, cond)) = &node.prompt {
                    let prefix = if orig_type != SymbolType::Unknown { orig_type.as_str() } else { "prompt" };
                    let c = self.strip_dep(node, cond);
                    add_cond(&mut lines, format!("{} \"{}\"", prefix, escape(text)), &c);
                }
                if let Item::Sym(s) = node.item {
                    let sym = &self.syms[s];
                    if sym.is_allnoconfig_y {
                        lines.push("\toption allnoconfig_y".to_string());
                    }
                    if self.defconfig_list == Some(s) {
                        lines.push("\toption defconfig_list".to_string());
                    }
                    if let Some(ev) = &sym.env_var {
                        lines.push(format!("\toption env=\"{}\"", ev));
                    }
                    if s == self.modules {
                        lines.push("\toption modules".to_string());
                    }
                    for (lo, hi, cond) in &node.ranges {
                        let c = self.strip_dep(node, cond);
                        add_cond(
                            &mut lines,
                            format!("range {} {}", self.sym_expr_str(*lo), self.sym_expr_str(*hi)),
                            &c,
                        );
                    }
                }
                for (d, cond) in &node.defaults {
                    let c = self.strip_dep(node, cond);
                    add_cond(&mut lines, format!("default {}", self.expr_str(d)), &c);
                }
                if let Item::Choice(c) = node.item {
                    if self.choices[c].is_optional {
                        lines.push("\toptional".to_string());
                    }
                }
                if let Item::Sym(_) = node.item {
                    for (t, cond) in &node.selects {
                        let c = self.strip_dep(node, cond);
                        add_cond(&mut lines, format!("select {}", self.sym_expr_str(*t)), &c);
                    }
                    for (t, cond) in &node.implies {
                        let c = self.strip_dep(node, cond);
                        add_cond(&mut lines, format!("imply {}", self.sym_expr_str(*t)), &c);
                    }
                }
                if node.dep != y {
                    lines.push(format!("\tdepends on {}", self.expr_str(&node.dep)));
                }
                if let Some(h) = &node.help {
                    lines.push("\thelp".to_string());
                    for l in h.lines() {
                        lines.push(format!("\t  {}", l));
                    }
                }
                lines.join("\n")
            }
        }
    }

    /// The leaves (symbols and choices) of an expression, in order, without
    /// duplicates.
    pub(crate) fn expr_items(e: &Expr, out: &mut Vec<Sc>) {
        match e {
            Expr::Sym(s) => {
                if !out.contains(&Sc::Sym(*s)) {
                    out.push(Sc::Sym(*s))
                }
            }
            Expr::Choice(c) => {
                if !out.contains(&Sc::Choice(*c)) {
                    out.push(Sc::Choice(*c))
                }
            }
            Expr::Not(a) => Self::expr_items(a, out),
            Expr::And(a, b) | Expr::Or(a, b) => {
                Self::expr_items(a, out);
                Self::expr_items(b, out);
            }
            Expr::Rel(_, a, b) => {
                for s in [a, b] {
                    if !out.contains(&Sc::Sym(*s)) {
                        out.push(Sc::Sym(*s))
                    }
                }
            }
        }
    }
}
