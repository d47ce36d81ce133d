//! Read-only views of symbols, choices and menu nodes.

use crate::model::*;
use crate::util::py_int;

/// Where something is defined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// File name relative to `$srctree` where possible.
    pub file: String,
    /// 1-based line.
    pub line: usize,
}

/// A property (`default`, `select`, `imply`, `range`) as written in the
/// Kconfig file, without the dependencies inherited from menus and `if`s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Property {
    /// The value in Kconfig syntax: the default expression, the selected or
    /// implied (or selecting/implying) symbol, or `LOW HIGH` for ranges.
    pub value: String,
    /// The `if` condition, if any.
    pub condition: Option<String>,
    /// Where the property was written.
    pub location: Location,
}

/// A symbol's value, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// bool and tristate symbols.
    Tristate(Tristate),
    /// int symbols (`None` when the value is empty).
    Int(Option<i128>),
    /// hex symbols (`None` when the value is empty).
    Hex(Option<i128>),
    /// string symbols.
    String(String),
    /// Symbols without a type: their name.
    Unknown(String),
}

fn loc(kc: &Kconfig, n: NodeId) -> Location {
    Location { file: kc.nodes[n].filename.to_string(), line: kc.nodes[n].linenr }
}

fn cond_text(kc: &Kconfig, c: &Expr) -> Option<String> {
    (!c.is_sym(Y)).then(|| kc.expr_str(c))
}

/// A symbol. Cheap to copy; borrows the [`Kconfig`].
#[derive(Clone, Copy)]
pub struct Symbol<'a> {
    kc: &'a Kconfig,
    id: SymId,
}

impl std::fmt::Debug for Symbol<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Symbol({})", self.name())
    }
}

impl<'a> Symbol<'a> {
    pub(crate) fn new(kc: &'a Kconfig, id: SymId) -> Self {
        Symbol { kc, id }
    }

    fn sym(&self) -> &'a Sym {
        &self.kc.syms[self.id]
    }

    /// The name, without `CONFIG_`.
    pub fn name(&self) -> &'a str {
        &self.sym().name
    }

    /// Whether the symbol has a `config` entry (referenced-only symbols
    /// do not).
    pub fn is_defined(&self) -> bool {
        !self.sym().nodes.is_empty()
    }

    /// The effective type: tristate acts as bool when modules are off or in
    /// a y-mode choice.
    pub fn symbol_type(&self) -> SymbolType {
        self.kc.sym_type(self.id)
    }

    /// The type as written.
    pub fn orig_type(&self) -> SymbolType {
        self.sym().orig_type
    }

    /// The value as a string: `n`/`m`/`y`, the number as written, or the
    /// string (unescaped).
    pub fn str_value(&self) -> String {
        self.kc.sym_str(self.id)
    }

    /// The tristate value (n for non-bool/tristate symbols).
    pub fn tri_value(&self) -> Tristate {
        Tristate::from_u8(self.kc.sym_tri(self.id))
    }

    /// The value, typed.
    pub fn value(&self) -> Value {
        match self.sym().orig_type {
            SymbolType::Bool | SymbolType::Tristate => Value::Tristate(self.tri_value()),
            SymbolType::Int => Value::Int(py_int(&self.str_value(), 10)),
            SymbolType::Hex => Value::Hex(py_int(&self.str_value(), 16)),
            SymbolType::String => Value::String(self.str_value()),
            SymbolType::Unknown => Value::Unknown(self.str_value()),
        }
    }

    /// The user value (from a `.config` file or a set), if any.
    pub fn user_value(&self) -> Option<String> {
        match &self.sym().user_value {
            Some(UserValue::Tri(v)) => Some(tri_str(*v).to_string()),
            Some(UserValue::Str(s)) => Some(s.clone()),
            None => None,
        }
    }

    /// How far the user can set it: n means invisible (no prompt or unmet
    /// prompt conditions).
    pub fn visibility(&self) -> Tristate {
        Tristate::from_u8(self.kc.sym_vis(self.id))
    }

    /// The values a user can give a bool/tristate symbol right now (empty
    /// when invisible; one value when locked by `select`).
    pub fn assignable(&self) -> Vec<Tristate> {
        self.kc.sym_assignable(self.id).into_iter().map(Tristate::from_u8).collect()
    }

    /// The first prompt text.
    pub fn prompt(&self) -> Option<&'a str> {
        self.prompts().into_iter().next()
    }

    /// Prompt texts of all definitions.
    pub fn prompts(&self) -> Vec<&'a str> {
        self.sym()
            .nodes
            .iter()
            .filter_map(|&n| self.kc.nodes[n].prompt.as_ref().map(|p| p.0.as_str()))
            .collect()
    }

    /// The first help text.
    pub fn help(&self) -> Option<&'a str> {
        self.sym().nodes.iter().find_map(|&n| self.kc.nodes[n].help.as_deref())
    }

    /// The direct dependencies (`depends on`, enclosing menus and ifs) in
    /// Kconfig syntax; `y` when none (`n` for undefined symbols).
    pub fn direct_deps(&self) -> String {
        self.kc.expr_str(&self.sym().direct_dep)
    }

    /// The value of the direct dependencies.
    pub fn direct_deps_value(&self) -> Tristate {
        Tristate::from_u8(self.kc.eval(&self.sym().direct_dep))
    }

    fn node_props<F>(&self, f: F) -> Vec<Property>
    where
        F: Fn(&'a Node) -> Vec<(String, Expr)>,
    {
        let mut out = Vec::new();
        for &n in &self.sym().nodes {
            for (value, cond) in f(&self.kc.nodes[n]) {
                out.push(Property { value, condition: cond_text(self.kc, &cond), location: loc(self.kc, n) });
            }
        }
        out
    }

    /// `default` properties, in evaluation order.
    pub fn defaults(&self) -> Vec<Property> {
        let kc = self.kc;
        self.node_props(|n| n.orig_defaults.iter().map(|(d, c)| (kc.expr_str(d), c.clone())).collect())
    }

    /// Symbols this one selects.
    pub fn selects(&self) -> Vec<Property> {
        let kc = self.kc;
        self.node_props(|n| {
            n.orig_selects.iter().map(|(t, c)| (kc.syms[*t].name.clone(), c.clone())).collect()
        })
    }

    /// Symbols this one implies.
    pub fn implies(&self) -> Vec<Property> {
        let kc = self.kc;
        self.node_props(|n| {
            n.orig_implies.iter().map(|(t, c)| (kc.syms[*t].name.clone(), c.clone())).collect()
        })
    }

    /// `range` properties (`value` is `LOW HIGH`).
    pub fn ranges(&self) -> Vec<Property> {
        let kc = self.kc;
        self.node_props(|n| {
            n.orig_ranges
                .iter()
                .map(|(lo, hi, c)| (format!("{} {}", kc.sym_expr_str(*lo), kc.sym_expr_str(*hi)), c.clone()))
                .collect()
        })
    }

    fn reverse(&self, selects: bool) -> Vec<Property> {
        let mut out = Vec::new();
        for &s in &self.kc.unique_defined_syms {
            for &n in &self.kc.syms[s].nodes {
                let node = &self.kc.nodes[n];
                let list = if selects { &node.orig_selects } else { &node.orig_implies };
                for (t, c) in list {
                    if *t == self.id {
                        out.push(Property {
                            value: self.kc.syms[s].name.clone(),
                            condition: cond_text(self.kc, c),
                            location: loc(self.kc, n),
                        });
                    }
                }
            }
        }
        out
    }

    /// Symbols that select this one (`value` is the selecting symbol).
    pub fn selected_by(&self) -> Vec<Property> {
        self.reverse(true)
    }

    /// Symbols that imply this one.
    pub fn implied_by(&self) -> Vec<Property> {
        self.reverse(false)
    }

    /// The full reverse dependency from `select`s as an expression (`n`
    /// when nothing selects it), and its value.
    pub fn selected_by_expr(&self) -> (String, Tristate) {
        (self.kc.expr_str(&self.sym().rev_dep), Tristate::from_u8(self.kc.eval(&self.sym().rev_dep)))
    }

    /// The same for `imply`.
    pub fn implied_by_expr(&self) -> (String, Tristate) {
        (
            self.kc.expr_str(&self.sym().weak_rev_dep),
            Tristate::from_u8(self.kc.eval(&self.sym().weak_rev_dep)),
        )
    }

    /// Where the symbol is defined (one entry per `config` statement).
    pub fn locations(&self) -> Vec<Location> {
        self.sym().nodes.iter().map(|&n| loc(self.kc, n)).collect()
    }

    /// The menu nodes of the symbol's definitions.
    pub fn nodes(&self) -> Vec<MenuNode<'a>> {
        self.sym().nodes.iter().map(|&n| MenuNode::new(self.kc, n)).collect()
    }

    /// The choice the symbol belongs to.
    pub fn choice(&self) -> Option<Choice<'a>> {
        self.sym().choice.map(|c| Choice::new(self.kc, c))
    }

    /// The `.config` line written for it (with newline), or empty.
    pub fn config_string(&self) -> String {
        self.kc.config_string(self.id)
    }

    /// The definitions in Kconfig syntax, with inherited dependencies
    /// folded into `depends on` (kconfiglib's `str(sym)`).
    pub fn definition(&self) -> String {
        self.sym().nodes.iter().map(|&n| self.kc.node_str(n)).collect::<Vec<_>>().join("\n\n")
    }

    /// `option allnoconfig_y`.
    pub fn is_allnoconfig_y(&self) -> bool {
        self.sym().is_allnoconfig_y
    }

    /// The variable of `option env=...`, if any.
    pub fn env_var(&self) -> Option<&'a str> {
        self.sym().env_var.as_deref()
    }

    /// Whether this is the modules symbol (MODULES).
    pub fn is_modules(&self) -> bool {
        self.id == self.kc.modules
    }
}

/// A choice.
#[derive(Clone, Copy)]
pub struct Choice<'a> {
    kc: &'a Kconfig,
    id: ChoiceId,
}

impl std::fmt::Debug for Choice<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Choice({})", self.kc.choice_expr_str(self.id))
    }
}

impl<'a> Choice<'a> {
    pub(crate) fn new(kc: &'a Kconfig, id: ChoiceId) -> Self {
        Choice { kc, id }
    }

    fn ch(&self) -> &'a ChoiceData {
        &self.kc.choices[self.id]
    }

    /// Identifies the choice for [`Kconfig::set_choice_mode`].
    pub fn index(&self) -> usize {
        self.id
    }

    /// The name of a named choice (`choice NAME`).
    pub fn name(&self) -> Option<&'a str> {
        self.ch().name.as_deref()
    }

    /// The first prompt.
    pub fn prompt(&self) -> Option<&'a str> {
        self.ch().nodes.iter().find_map(|&n| self.kc.nodes[n].prompt.as_ref().map(|p| p.0.as_str()))
    }

    /// The first help text.
    pub fn help(&self) -> Option<&'a str> {
        self.ch().nodes.iter().find_map(|&n| self.kc.nodes[n].help.as_deref())
    }

    /// The effective type (tristate acts as bool without modules).
    pub fn choice_type(&self) -> SymbolType {
        self.kc.choice_type(self.id)
    }

    /// The type as written or inferred from the first typed member.
    pub fn orig_type(&self) -> SymbolType {
        self.ch().orig_type
    }

    /// The mode: y (exactly one member y), m (members m or n), n (optional
    /// choice switched off or invisible).
    pub fn mode(&self) -> Tristate {
        Tristate::from_u8(self.kc.choice_tri(self.id))
    }

    /// The mode the user asked for, if any.
    pub fn user_mode(&self) -> Option<Tristate> {
        self.ch().user_value.map(Tristate::from_u8)
    }

    /// The selected member in y mode.
    pub fn selection(&self) -> Option<Symbol<'a>> {
        self.kc.choice_selection(self.id).map(|s| Symbol::new(self.kc, s))
    }

    /// The member the user picked (it may be overridden when invisible).
    pub fn user_selection(&self) -> Option<Symbol<'a>> {
        self.ch().user_selection.map(|s| Symbol::new(self.kc, s))
    }

    /// The members.
    pub fn symbols(&self) -> Vec<Symbol<'a>> {
        self.ch().syms.iter().map(|&s| Symbol::new(self.kc, s)).collect()
    }

    /// Visibility of the choice's prompt.
    pub fn visibility(&self) -> Tristate {
        Tristate::from_u8(self.kc.choice_vis(self.id))
    }

    /// Modes the user can set now.
    pub fn assignable(&self) -> Vec<Tristate> {
        self.kc.choice_assignable(self.id).into_iter().map(Tristate::from_u8).collect()
    }

    /// `optional`.
    pub fn is_optional(&self) -> bool {
        self.ch().is_optional
    }

    /// `default` properties (the default selection).
    pub fn defaults(&self) -> Vec<Property> {
        let mut out = Vec::new();
        for &n in &self.ch().nodes {
            for (d, c) in &self.kc.nodes[n].orig_defaults {
                out.push(Property {
                    value: self.kc.expr_str(d),
                    condition: cond_text(self.kc, c),
                    location: loc(self.kc, n),
                });
            }
        }
        out
    }

    /// Where the choice is defined.
    pub fn locations(&self) -> Vec<Location> {
        self.ch().nodes.iter().map(|&n| loc(self.kc, n)).collect()
    }
}

/// What a menu node shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// `menu` (and the implicit top-level menu).
    Menu,
    /// `comment`.
    Comment,
    /// `config` / `menuconfig`.
    Symbol,
    /// `choice`.
    Choice,
}

/// An entry of the menu tree, as a menuconfig interface shows it. Symbols
/// defined in several places have one node per definition.
#[derive(Clone, Copy)]
pub struct MenuNode<'a> {
    kc: &'a Kconfig,
    id: NodeId,
}

impl std::fmt::Debug for MenuNode<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MenuNode({:?}, {:?})", self.kind(), self.prompt())
    }
}

impl<'a> MenuNode<'a> {
    pub(crate) fn new(kc: &'a Kconfig, id: NodeId) -> Self {
        MenuNode { kc, id }
    }

    fn node(&self) -> &'a Node {
        &self.kc.nodes[self.id]
    }

    /// The kind of entry.
    pub fn kind(&self) -> NodeKind {
        match self.node().item {
            Item::Sym(_) => NodeKind::Symbol,
            Item::Choice(_) => NodeKind::Choice,
            Item::Comment => NodeKind::Comment,
            Item::Menu | Item::If => NodeKind::Menu,
        }
    }

    /// The symbol of a symbol node.
    pub fn symbol(&self) -> Option<Symbol<'a>> {
        match self.node().item {
            Item::Sym(s) => Some(Symbol::new(self.kc, s)),
            _ => None,
        }
    }

    /// The choice of a choice node.
    pub fn choice(&self) -> Option<Choice<'a>> {
        match self.node().item {
            Item::Choice(c) => Some(Choice::new(self.kc, c)),
            _ => None,
        }
    }

    /// The prompt (menu title, comment text).
    pub fn prompt(&self) -> Option<&'a str> {
        self.node().prompt.as_ref().map(|p| p.0.as_str())
    }

    /// The value of the prompt's condition (n without a prompt).
    pub fn prompt_visibility(&self) -> Tristate {
        Tristate::from_u8(self.node().prompt.as_ref().map(|p| self.kc.eval(&p.1)).unwrap_or(0))
    }

    /// Whether a menuconfig would show it: it has a prompt whose condition
    /// holds and, for menus, `visible if` holds.
    pub fn is_visible(&self) -> bool {
        let n = self.node();
        let Some((_, cond)) = &n.prompt else { return false };
        self.kc.eval(cond) != 0 && !(n.item == Item::Menu && self.kc.eval(&n.visibility) == 0)
    }

    /// The help text.
    pub fn help(&self) -> Option<&'a str> {
        self.node().help.as_deref()
    }

    /// The node's dependencies (its own `depends on` and everything
    /// inherited) in Kconfig syntax.
    pub fn dependencies(&self) -> String {
        self.kc.expr_str(&self.node().dep)
    }

    /// `visible if` of a menu, if any.
    pub fn visible_if(&self) -> Option<String> {
        let n = self.node();
        (n.item == Item::Menu && !n.visibility.is_sym(Y)).then(|| self.kc.expr_str(&n.visibility))
    }

    /// True for menus, choices and `menuconfig` symbols: children go in a
    /// separate screen rather than indented below.
    pub fn is_menuconfig(&self) -> bool {
        self.node().is_menuconfig
    }

    /// Child nodes (menu contents, choice members, and the implicit submenu
    /// of symbols that depend on the one before them).
    pub fn children(&self) -> Vec<MenuNode<'a>> {
        let mut out = Vec::new();
        let mut cur = self.node().list;
        while let Some(c) = cur {
            out.push(MenuNode::new(self.kc, c));
            cur = self.kc.nodes[c].next;
        }
        out
    }

    /// The parent node (None for the top node).
    pub fn parent(&self) -> Option<MenuNode<'a>> {
        self.node().parent.map(|p| MenuNode::new(self.kc, p))
    }

    /// Nesting depth: 0 for the top node, 1 for top-level entries.
    pub fn depth(&self) -> usize {
        let mut d = 0;
        let mut p = self.node().parent;
        while let Some(pp) = p {
            d += 1;
            p = self.kc.nodes[pp].parent;
        }
        d
    }

    /// Whether this is the implicit top-level menu.
    pub fn is_top(&self) -> bool {
        self.id == self.kc.top
    }

    /// Where the entry is written.
    pub fn location(&self) -> Location {
        loc(self.kc, self.id)
    }

    /// The `source` statements through which its file was included, outermost
    /// first.
    pub fn include_path(&self) -> Vec<Location> {
        self.node().include_path.iter().map(|(f, l)| Location { file: f.to_string(), line: *l }).collect()
    }

    /// The entry in Kconfig syntax.
    pub fn definition(&self) -> String {
        self.kc.node_str(self.id)
    }
}
