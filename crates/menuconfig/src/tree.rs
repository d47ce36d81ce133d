//! The static shape of the menu tree and the rules for what a menu shows.
//!
//! [`kconfig::MenuNode`] views have no identity of their own, so the tree is
//! indexed once at load: node `i` is the `i`-th node of a pre-order walk
//! (0 is the top node, then [`Kconfig::menu_nodes`] order). Values and
//! visibility change with the configuration and are always read from the
//! engine through a fresh [`snapshot`].

use std::collections::HashMap;

use kconfig::{Kconfig, MenuNode, NodeKind, SymbolType, Tristate};

/// Index of the top node.
pub(crate) const TOP: usize = 0;

/// Spaces per level of implicit submenu (entries that depend on the entry
/// before them are shown indented below it).
const SUBMENU_INDENT: usize = 4;

/// The menu nodes, indexed like the tree (see the module docs).
pub(crate) fn snapshot(kc: &Kconfig) -> Vec<MenuNode<'_>> {
    std::iter::once(kc.top_node()).chain(kc.menu_nodes()).collect()
}

/// Parent/child links and the texts that never change after loading.
pub(crate) struct Tree {
    pub parent: Vec<Option<usize>>,
    pub children: Vec<Vec<usize>>,
    pub kind: Vec<NodeKind>,
    /// Menus, choices and `menuconfig` symbols: children go to a separate
    /// screen.
    pub menuconfig: Vec<bool>,
    pub prompt: Vec<Option<String>>,
    /// Symbol name, or the name of a named choice.
    pub name: Vec<Option<String>>,
    /// For choice nodes, [`kconfig::Choice::index`].
    pub choice_of: Vec<Option<usize>>,
    /// Every node of each choice (a named choice can be defined in several
    /// places).
    pub choice_nodes: HashMap<usize, Vec<usize>>,
    /// Lower-case `name prompt`, for search.
    pub haystack: Vec<String>,
}

impl Tree {
    pub fn build(kc: &Kconfig) -> Tree {
        let nodes = snapshot(kc);
        let n = nodes.len();
        let mut tree = Tree {
            parent: vec![None; n],
            children: vec![Vec::new(); n],
            kind: Vec::with_capacity(n),
            menuconfig: Vec::with_capacity(n),
            prompt: Vec::with_capacity(n),
            name: Vec::with_capacity(n),
            choice_of: Vec::with_capacity(n),
            choice_nodes: HashMap::new(),
            haystack: Vec::with_capacity(n),
        };
        // In a pre-order walk the parent of a node at depth d is the last
        // node seen at depth d - 1.
        let mut last_at_depth: Vec<usize> = vec![TOP];
        for (i, node) in nodes.iter().enumerate() {
            if i > TOP {
                let d = node.depth().max(1);
                last_at_depth.truncate(d);
                let p = *last_at_depth.last().unwrap_or(&TOP);
                tree.parent[i] = Some(p);
                tree.children[p].push(i);
                last_at_depth.push(i);
            }
            let kind = node.kind();
            tree.kind.push(kind);
            tree.menuconfig.push(i == TOP || node.is_menuconfig());
            tree.prompt.push(node.prompt().map(str::to_string));
            let name = match kind {
                NodeKind::Symbol => node.symbol().map(|s| s.name().to_string()),
                NodeKind::Choice => node.choice().and_then(|c| c.name()).map(str::to_string),
                _ => None,
            };
            let choice = node.choice().map(|c| c.index());
            if let Some(c) = choice {
                tree.choice_nodes.entry(c).or_default().push(i);
            }
            tree.choice_of.push(choice);
            let hay = format!("{} {}", name.as_deref().unwrap_or(""), node.prompt().unwrap_or(""));
            tree.haystack.push(hay.to_lowercase());
            tree.name.push(name);
        }
        tree
    }

    pub fn len(&self) -> usize {
        self.kind.len()
    }

    /// The menu (in the interface's sense: menu, choice or `menuconfig`
    /// symbol) that lists node `i`.
    pub fn parent_menu(&self, i: usize) -> usize {
        let mut m = self.parent[i].unwrap_or(TOP);
        while m != TOP && !self.menuconfig[m] {
            m = self.parent[m].unwrap_or(TOP);
        }
        m
    }

    /// The menus from the top (excluded) down to the one listing `i`.
    pub fn menu_chain(&self, i: usize) -> Vec<usize> {
        let mut out = Vec::new();
        let mut m = if i == TOP { TOP } else { self.parent_menu(i) };
        while m != TOP {
            out.push(m);
            m = self.parent_menu(m);
        }
        out.reverse();
        out
    }

    /// Implicit-submenu depth of `i` below the menu that lists it.
    pub fn indent(&self, i: usize) -> usize {
        let mut indent = 0;
        let mut p = self.parent[i];
        while let Some(pp) = p {
            if self.menuconfig[pp] {
                break;
            }
            indent += 1;
            p = self.parent[pp];
        }
        indent
    }

    /// A short title: the prompt, else the name, else the kind.
    pub fn title(&self, i: usize) -> String {
        if let Some(p) = &self.prompt[i] {
            return p.clone();
        }
        if let Some(n) = &self.name[i] {
            return n.clone();
        }
        match self.kind[i] {
            NodeKind::Menu => "menu".into(),
            NodeKind::Comment => "comment".into(),
            NodeKind::Symbol => "symbol".into(),
            NodeKind::Choice => "choice".into(),
        }
    }

    /// `(Top) > Menu > Submenu` for the menu `m` itself.
    pub fn breadcrumb(&self, m: usize) -> String {
        let mut s = String::from("(Top)");
        let mut chain = self.menu_chain(m);
        if m != TOP {
            chain.push(m);
        }
        for c in chain {
            s.push_str(" > ");
            s.push_str(&self.title(c));
        }
        s
    }

    /// The child lists a menu shows: a choice shows the members of all its
    /// definitions.
    fn menu_lists(&self, menu: usize) -> Vec<&[usize]> {
        if self.kind[menu] == NodeKind::Choice {
            if let Some(nodes) = self.choice_of[menu].and_then(|c| self.choice_nodes.get(&c)) {
                return nodes.iter().map(|&n| self.children[n].as_slice()).collect();
            }
        }
        vec![self.children[menu].as_slice()]
    }

    /// The entries a menu shows, like kconfiglib's menuconfig: visible
    /// nodes (all nodes with `show_all`), implicit submenus inline, and
    /// invisible symbols that have shown children.
    pub fn shown(&self, nodes: &[MenuNode<'_>], menu: usize, show_all: bool) -> Vec<usize> {
        let mut out = Vec::new();
        for list in self.menu_lists(menu) {
            self.rec_shown(nodes, list, show_all, &mut out);
        }
        out
    }

    fn rec_shown(&self, nodes: &[MenuNode<'_>], list: &[usize], show_all: bool, out: &mut Vec<usize>) {
        for &c in list {
            let has_children = !self.children[c].is_empty();
            if show_all || nodes[c].is_visible() {
                out.push(c);
                if has_children && !self.menuconfig[c] {
                    self.rec_shown(nodes, &self.children[c], show_all, out);
                }
            } else if has_children && self.kind[c] == NodeKind::Symbol {
                let mut sub = Vec::new();
                self.rec_shown(nodes, &self.children[c], show_all, &mut sub);
                if !sub.is_empty() {
                    out.push(c);
                    if !self.menuconfig[c] {
                        out.extend(sub);
                    }
                }
            }
        }
    }

    /// Whether entering `menu` would show anything.
    pub fn any_shown(&self, nodes: &[MenuNode<'_>], menu: usize, show_all: bool) -> bool {
        self.menu_lists(menu).into_iter().any(|l| self.rec_any(nodes, l, show_all))
    }

    fn rec_any(&self, nodes: &[MenuNode<'_>], list: &[usize], show_all: bool) -> bool {
        list.iter().any(|&c| {
            show_all
                || nodes[c].is_visible()
                || (self.kind[c] == NodeKind::Symbol && self.rec_any(nodes, &self.children[c], show_all))
        })
    }

    /// Whether `i` is on screen in normal mode: visible, inside visible
    /// menus and choices.
    pub fn reachable(&self, nodes: &[MenuNode<'_>], i: usize) -> bool {
        if i != TOP && !nodes[i].is_visible() {
            return false;
        }
        self.menu_chain(i)
            .into_iter()
            .filter(|&m| matches!(self.kind[m], NodeKind::Menu | NodeKind::Choice))
            .all(|m| nodes[m].is_visible())
    }

    /// The text of a menu entry (kconfiglib's `_node_str`).
    pub fn entry_text(&self, nodes: &[MenuNode<'_>], i: usize, show_all: bool, show_name: bool) -> String {
        let node = &nodes[i];
        let mut s = format!("{:w$}", value_str(node), w = 3 + SUBMENU_INDENT * self.indent(i));
        let prompt = node.prompt();
        if prompt.is_none() || show_name {
            if let Some(sym) = node.symbol() {
                s.push_str(&format!(" <{}>", sym.name()));
            } else if let Some(c) = node.choice() {
                match c.name() {
                    Some(n) => s.push_str(&format!(" <choice {}>", n)),
                    None => s.push_str(" <choice>"),
                }
            }
        }
        if let Some(p) = prompt {
            if node.kind() == NodeKind::Comment {
                s.push_str(&format!(" *** {} ***", p));
            } else {
                s.push(' ');
                s.push_str(p);
            }
            if let Some(sym) = node.symbol() {
                let y_choice = sym.choice().is_some_and(|c| c.mode() == Tristate::Y);
                if sym.user_value().is_none() && sym.orig_type() != SymbolType::Unknown && !y_choice {
                    s.push_str(" (NEW)");
                }
            }
        }
        if let Some(c) = node.choice() {
            if c.mode() == Tristate::Y {
                if let Some(sel) = c.selection() {
                    let here = sel.nodes().into_iter().find(|n| {
                        n.prompt().is_some() && n.parent().is_some_and(|p| p.location() == node.location())
                    });
                    let any = || sel.nodes().into_iter().find_map(|n| n.prompt());
                    if let Some(p) = here.and_then(|n| n.prompt()).or_else(any) {
                        s.push_str(&format!(" ({})", p));
                    }
                }
            }
        }
        if self.menuconfig[i] {
            s.push_str(if self.any_shown(nodes, i, show_all) { "  --->" } else { "  ----" });
        }
        s
    }
}

fn tri_char(t: Tristate) -> char {
    match t {
        Tristate::N => ' ',
        Tristate::M => 'M',
        Tristate::Y => '*',
    }
}

/// bool or tristate.
pub(crate) fn is_bool_like(t: SymbolType) -> bool {
    matches!(t, SymbolType::Bool | SymbolType::Tristate)
}

/// Whether `sym` is a member of a choice in y mode (shown as a radio button).
pub(crate) fn is_y_mode_choice_sym(sym: &kconfig::Symbol<'_>) -> bool {
    sym.choice().is_some() && sym.visibility() == Tristate::Y
}

/// The value part of an entry: `[*]`, `<M>`, `{*}`, `-*-`, `(X)`, `(42)`.
pub(crate) fn value_str(node: &MenuNode<'_>) -> String {
    if let Some(sym) = node.symbol() {
        match sym.orig_type() {
            SymbolType::Unknown => String::new(),
            SymbolType::Int | SymbolType::Hex | SymbolType::String => format!("({})", sym.str_value()),
            SymbolType::Bool | SymbolType::Tristate => {
                if is_y_mode_choice_sym(&sym) {
                    let selected =
                        sym.choice().and_then(|c| c.selection()).is_some_and(|s| s.name() == sym.name());
                    return if selected { "(X)" } else { "( )" }.to_string();
                }
                let t = tri_char(sym.tri_value());
                let a = sym.assignable();
                if a.len() <= 1 {
                    format!("-{}-", t)
                } else if sym.symbol_type() == SymbolType::Bool {
                    format!("[{}]", t)
                } else if a == [Tristate::M, Tristate::Y] {
                    format!("{{{}}}", t)
                } else {
                    format!("<{}>", t)
                }
            }
        }
    } else if let Some(c) = node.choice() {
        let a = c.assignable();
        let t = tri_char(c.mode());
        if a.len() <= 1 {
            String::new()
        } else if c.choice_type() == SymbolType::Bool {
            format!("[{}]", t)
        } else if a == [Tristate::M, Tristate::Y] {
            format!("{{{}}}", t)
        } else {
            format!("<{}>", t)
        }
    } else {
        String::new()
    }
}
