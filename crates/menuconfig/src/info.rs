//! The help view (`?`): everything about an entry, including why it is
//! invisible or locked, and the range check of the value editor.

use std::cell::RefCell;
use std::collections::HashMap;

use kconfig::{Kconfig, MenuNode, NodeKind, Property, SymbolType, Tristate};

use crate::tree::{is_bool_like, is_y_mode_choice_sym, snapshot, Tree, TOP};

/// How a line of the help view is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tone {
    Normal,
    Heading,
    Warn,
}

pub(crate) type Lines = Vec<(String, Tone)>;

/// Evaluates a condition in Kconfig syntax (`None`: not evaluable, e.g. a
/// `<choice>` reference).
pub(crate) fn eval(kc: &mut Kconfig, expr: &str) -> Option<Tristate> {
    if expr.contains("<choice") {
        return None;
    }
    let r = kc.eval_string(expr).ok();
    kc.take_warnings();
    r
}

/// `FOO && BAR = "x"` -> `FOO [=y] && BAR [=x] = "x"`: each symbol with its
/// current value, like the kernel's help screens.
pub(crate) fn annotate(kc: &Kconfig, expr: &str) -> String {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' {
            // A literal: copy it whole (backslash escapes included).
            out.push(c);
            i += 1;
            while i < chars.len() {
                out.push(chars[i]);
                if chars[i] == '\\' && i + 1 < chars.len() {
                    out.push(chars[i + 1]);
                    i += 2;
                    continue;
                }
                i += 1;
                if chars[i - 1] == c {
                    break;
                }
            }
        } else if c == '<' && chars[i..].iter().take(7).collect::<String>() == "<choice" {
            while i < chars.len() {
                out.push(chars[i]);
                i += 1;
                if chars[i - 1] == '>' {
                    break;
                }
            }
        } else if c.is_ascii_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == '-')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            out.push_str(&word);
            let is_const =
                matches!(word.as_str(), "y" | "m" | "n") || word.starts_with(|c: char| c.is_ascii_digit());
            if !is_const {
                if let Some(sym) = kc.symbol(&word) {
                    out.push_str(&format!(" [={}]", sym.str_value()));
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// Splits an expression at its top-level `&&`s.
pub(crate) fn split_and(expr: &str) -> Vec<String> {
    let expr = strip_parens(expr.trim());
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut quote: Option<char> = None;
    let mut cur = String::new();
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match quote {
            Some(q) => {
                cur.push(c);
                if c == '\\' && i + 1 < chars.len() {
                    cur.push(chars[i + 1]);
                    i += 1;
                } else if c == q {
                    quote = None;
                }
            }
            None => match c {
                '"' | '\'' => {
                    quote = Some(c);
                    cur.push(c);
                }
                '(' => {
                    depth += 1;
                    cur.push(c);
                }
                ')' => {
                    depth -= 1;
                    cur.push(c);
                }
                '&' if depth == 0 && chars.get(i + 1) == Some(&'&') => {
                    parts.push(std::mem::take(&mut cur));
                    i += 1;
                }
                _ => cur.push(c),
            },
        }
        i += 1;
    }
    parts.push(cur);
    parts.into_iter().map(|p| strip_parens(p.trim()).to_string()).filter(|p| !p.is_empty()).collect()
}

/// `(A || B)` -> `A || B` when the parentheses enclose everything.
fn strip_parens(s: &str) -> &str {
    let mut s = s;
    while s.starts_with('(') && s.ends_with(')') {
        let inner = &s[1..s.len() - 1];
        let mut depth = 0i32;
        let mut ok = true;
        for c in inner.chars() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth < 0 {
                        ok = false;
                        break;
                    }
                }
                _ => {}
            }
        }
        if !ok || depth != 0 {
            break;
        }
        s = inner.trim();
    }
    s
}

/// The `if` condition of the prompt in a node's Kconfig text
/// ([`MenuNode::definition`]: `\tbool "Prompt" if COND`).
fn prompt_condition(definition: &str) -> Option<String> {
    const KEYWORDS: [&str; 6] = ["bool", "tristate", "int", "hex", "string", "prompt"];
    for line in definition.lines() {
        let t = line.trim_start();
        let Some((kw, rest)) = t.split_once(' ') else { continue };
        if !KEYWORDS.contains(&kw) || !rest.starts_with('"') {
            continue;
        }
        let mut chars = rest.char_indices().skip(1);
        let mut end = None;
        while let Some((k, c)) = chars.next() {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => {
                    end = Some(k);
                    break;
                }
                _ => {}
            }
        }
        let after = rest[end? + 1..].trim_start();
        return after.strip_prefix("if ").map(|c| c.trim().to_string());
    }
    None
}

/// The range in force for an int/hex symbol: the first `range` whose
/// condition holds, with symbol bounds replaced by their values.
pub(crate) fn active_range(kc: &mut Kconfig, name: &str) -> Option<(String, String)> {
    let ranges = kc.symbol(name)?.ranges();
    for r in ranges {
        let active = match &r.condition {
            None => true,
            Some(c) => eval(kc, c)? != Tristate::N,
        };
        if active {
            let mut it = r.value.split_whitespace().map(|t| bound_value(kc, t));
            return Some((it.next()?, it.next()?));
        }
    }
    None
}

fn bound_value(kc: &Kconfig, token: &str) -> String {
    if let Some(s) = token.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        return s.to_string();
    }
    match kc.symbol(token) {
        Some(sym) if sym.is_defined() => sym.str_value(),
        _ => token.to_string(),
    }
}

/// Parses an int (base 10) or hex (base 16, optional `0x`) value.
pub(crate) fn parse_num(s: &str, ty: SymbolType) -> Option<i128> {
    let s = s.trim();
    let (neg, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let v = if ty == SymbolType::Hex {
        let d = digits.strip_prefix("0x").or_else(|| digits.strip_prefix("0X")).unwrap_or(digits);
        i128::from_str_radix(d, 16).ok()?
    } else {
        if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        digits.parse::<i128>().ok()?
    };
    Some(if neg { -v } else { v })
}

/// The help view lines for node `i`.
pub(crate) fn node_info(kc: &mut Kconfig, tree: &Tree, i: usize) -> Lines {
    // Evaluating needs `&mut Kconfig` while the views borrow it: first
    // collect the conditions the text needs, evaluate them, then build
    // the text with the results.
    let wanted = RefCell::new(Vec::new());
    build(kc, tree, i, &|e| {
        wanted.borrow_mut().push(e.to_string());
        None
    });
    let mut values = HashMap::new();
    for e in wanted.into_inner() {
        if let std::collections::hash_map::Entry::Vacant(slot) = values.entry(e) {
            let v = eval(kc, slot.key());
            slot.insert(v);
        }
    }
    build(kc, tree, i, &|e| values.get(e).copied().flatten())
}

/// Why node `i` is not on screen (empty when it is), one reason a line.
pub(crate) fn invisibility_reasons(kc: &mut Kconfig, tree: &Tree, i: usize) -> Vec<String> {
    let wanted = RefCell::new(Vec::new());
    {
        let nodes = snapshot(kc);
        reasons(kc, tree, &nodes, i, &|e| {
            wanted.borrow_mut().push(e.to_string());
            None
        });
    }
    let mut values = HashMap::new();
    for e in wanted.into_inner() {
        let v = eval(kc, &e);
        values.insert(e, v);
    }
    let nodes = snapshot(kc);
    reasons(kc, tree, &nodes, i, &|e| values.get(e).copied().flatten())
}

type Eval<'e> = &'e dyn Fn(&str) -> Option<Tristate>;

fn tri_name(v: Option<Tristate>) -> &'static str {
    v.map(Tristate::as_str).unwrap_or("?")
}

/// Reasons why the node itself is invisible (not its menus).
fn own_reasons(kc: &Kconfig, tree: &Tree, nodes: &[MenuNode<'_>], i: usize, ev: Eval<'_>) -> Vec<String> {
    let node = &nodes[i];
    if i == TOP || node.is_visible() {
        return Vec::new();
    }
    if node.prompt().is_none() {
        return vec![
            "it has no prompt: its value comes only from defaults, select and imply, and it cannot be set here"
                .to_string(),
        ];
    }
    let mut out = Vec::new();
    if node.prompt_visibility() != Tristate::N {
        // The prompt is on, so the menu's own `visible if` hides it.
        if let Some(vif) = node.visible_if() {
            out.push(format!("its 'visible if {}' is {}", annotate(kc, &vif), tri_name(ev(&vif))));
        }
        return out;
    }
    let dep = node.dependencies();
    let dep_value = ev(&dep);
    if dep_value != Some(Tristate::Y) {
        for c in split_and(&dep) {
            if c.starts_with("<choice") {
                let choice = tree.menu_chain(i).into_iter().rev().find(|&m| tree.kind[m] == NodeKind::Choice);
                if let Some(m) = choice {
                    if let Some(ch) = nodes[m].choice() {
                        if ch.mode() == Tristate::N {
                            out.push(format!(
                                "it is a member of the choice '{}', which is switched off (mode n)",
                                tree.title(m)
                            ));
                        }
                    }
                }
            } else if ev(&c) == Some(Tristate::N) {
                out.push(format!("it depends on {}, which is n", annotate(kc, &c)));
            }
        }
        if out.is_empty() && dep_value == Some(Tristate::N) {
            out.push(format!("its dependencies are not met: {} is n", annotate(kc, &dep)));
        }
    }
    if out.is_empty() {
        // Dependencies hold: either a `visible if` of an enclosing menu (the
        // caller reports the menu) or the prompt's own `if` is false.
        let hidden_by_menu = tree
            .menu_chain(i)
            .into_iter()
            .any(|m| nodes[m].visible_if().is_some_and(|v| ev(&v) != Some(Tristate::Y)));
        if !hidden_by_menu {
            match prompt_condition(&node.definition()) {
                Some(cond) => {
                    let unmet: Vec<String> = split_and(&cond)
                        .into_iter()
                        .filter(|c| ev(c) == Some(Tristate::N))
                        .map(|c| annotate(kc, &c))
                        .collect();
                    let detail = if unmet.is_empty() { annotate(kc, &cond) } else { unmet.join(" && ") };
                    out.push(format!("its prompt is shown only if {}, which is n", detail));
                }
                None => out.push("the condition of its prompt is n".to_string()),
            }
        }
    }
    out
}

fn reasons(kc: &Kconfig, tree: &Tree, nodes: &[MenuNode<'_>], i: usize, ev: Eval<'_>) -> Vec<String> {
    let mut out = own_reasons(kc, tree, nodes, i, ev);
    for m in tree.menu_chain(i) {
        if matches!(tree.kind[m], NodeKind::Menu | NodeKind::Choice) && !nodes[m].is_visible() {
            let kind = if tree.kind[m] == NodeKind::Menu { "menu" } else { "choice" };
            let why = own_reasons(kc, tree, nodes, m, ev);
            if why.is_empty() {
                out.push(format!("it is inside the {} '{}', which is invisible", kind, tree.title(m)));
            } else {
                out.push(format!(
                    "it is inside the {} '{}', which is invisible because {}",
                    kind,
                    tree.title(m),
                    why.join("; ")
                ));
            }
        }
    }
    out
}

struct Out(Lines);

impl Out {
    fn line(&mut self, s: impl Into<String>) {
        self.0.push((s.into(), Tone::Normal));
    }
    fn heading(&mut self, s: impl Into<String>) {
        self.0.push((s.into(), Tone::Heading));
    }
    fn warn(&mut self, s: impl Into<String>) {
        self.0.push((s.into(), Tone::Warn));
    }
    fn blank(&mut self) {
        if self.0.last().is_some_and(|(l, _)| !l.is_empty()) {
            self.0.push((String::new(), Tone::Normal));
        }
    }
}

fn build(kc: &Kconfig, tree: &Tree, i: usize, ev: Eval<'_>) -> Lines {
    let nodes = snapshot(kc);
    let node = nodes[i];
    let mut out = Out(Vec::new());
    match node.kind() {
        NodeKind::Symbol => symbol_info(kc, tree, &nodes, i, ev, &mut out),
        NodeKind::Choice => choice_info(kc, tree, &nodes, i, ev, &mut out),
        NodeKind::Menu | NodeKind::Comment => menu_info(kc, tree, &nodes, i, ev, &mut out),
    }
    while out.0.last().is_some_and(|(l, _)| l.is_empty()) {
        out.0.pop();
    }
    out.0
}

fn help_text(out: &mut Out, help: Option<&str>) {
    match help {
        Some(h) if !h.trim().is_empty() => {
            for l in h.trim_end().lines() {
                out.line(l);
            }
        }
        _ => out.line("There is no help available for this option."),
    }
    out.blank();
}

fn visibility_block(
    kc: &Kconfig,
    tree: &Tree,
    nodes: &[MenuNode<'_>],
    i: usize,
    ev: Eval<'_>,
    out: &mut Out,
) {
    let why = reasons(kc, tree, nodes, i, ev);
    if why.is_empty() {
        out.line("Visible: yes");
    } else {
        out.warn("Visible: no. It is invisible because:");
        for r in why {
            out.warn(format!("  - {}", r));
        }
    }
}

fn cond_suffix(kc: &Kconfig, cond: &Option<String>, ev: Eval<'_>) -> String {
    match cond {
        Some(c) => format!(" if {} (={})", annotate(kc, c), tri_name(ev(c))),
        None => String::new(),
    }
}

fn prop_list(kc: &Kconfig, out: &mut Out, title: &str, props: &[Property], ev: Eval<'_>, with_loc: bool) {
    if props.is_empty() {
        return;
    }
    out.line(title);
    for p in props {
        let loc =
            if with_loc { format!("   ({}:{})", p.location.file, p.location.line) } else { String::new() };
        out.line(format!("  - {}{}{}", annotate(kc, &p.value), cond_suffix(kc, &p.condition, ev), loc));
    }
}

fn location_block(tree: &Tree, nodes: &[MenuNode<'_>], i: usize, out: &mut Out) {
    let node = &nodes[i];
    let loc = node.location();
    let mut defined = format!("Defined at {}:{}", loc.file, loc.line);
    let inc = node.include_path();
    if !inc.is_empty() {
        let chain: Vec<String> = inc.iter().map(|l| format!("{}:{}", l.file, l.line)).collect();
        defined.push_str(&format!(" (included from {})", chain.join(" > ")));
    }
    out.line(defined);
    out.line("Location:");
    let mut depth = 1;
    for m in tree.menu_chain(i) {
        out.line(format!("{}-> {}", "  ".repeat(depth), tree.title(m)));
        depth += 1;
    }
    let last = match node.symbol() {
        Some(sym) => format!("{} ({} [={}])", tree.title(i), sym.name(), sym.str_value()),
        None => tree.title(i),
    };
    out.line(format!("{}-> {}", "  ".repeat(depth), last));
}

fn deps_line(kc: &Kconfig, node: &MenuNode<'_>, ev: Eval<'_>, out: &mut Out) {
    let dep = node.dependencies();
    if dep != "y" {
        out.line(format!("Depends on: {} (={})", annotate(kc, &dep), tri_name(ev(&dep))));
    }
}

fn symbol_info(kc: &Kconfig, tree: &Tree, nodes: &[MenuNode<'_>], i: usize, ev: Eval<'_>, out: &mut Out) {
    let node = &nodes[i];
    let Some(sym) = node.symbol() else { return };
    let prefix = kc.config_prefix();
    out.heading(format!("{}{}: {}", prefix, sym.name(), node.prompt().unwrap_or("(no prompt)")));
    out.blank();
    help_text(out, node.help().or_else(|| sym.help()));

    out.line(format!("Symbol: {} [={}]", sym.name(), sym.str_value()));
    let ty = sym.symbol_type();
    let orig = sym.orig_type();
    if ty != orig {
        out.line(format!("Type  : {} (acts as {} here)", orig.as_str(), ty.as_str()));
    } else {
        out.line(format!("Type  : {}", orig.as_str()));
    }
    let value = sym.str_value();
    match sym.user_value() {
        Some(u) if u == value => out.line(format!("Value : {} (set by the user or the .config)", value)),
        Some(u) => out.line(format!("Value : {} (the user value {} does not take effect)", value, u)),
        None => out.line(format!("Value : {} (default; not set by the user)", value)),
    }
    if let Some(p) = node.prompt() {
        out.line(format!("Prompt: {}", p));
    }
    visibility_block(kc, tree, nodes, i, ev, out);

    // Locked values: `-*-` / `-M-`.
    if node.is_visible() && is_bool_like(ty) && !is_y_mode_choice_sym(&sym) {
        let a = sym.assignable();
        if a.len() == 1 {
            let (rev, rev_v) = sym.selected_by_expr();
            if rev_v != Tristate::N {
                out.warn(format!(
                    "Locked: the value cannot go below {} because it is selected by {} (={})",
                    rev_v.as_str(),
                    annotate(kc, &rev),
                    rev_v.as_str()
                ));
            } else {
                out.warn(format!("Locked: {} is the only value its dependencies allow", a[0].as_str()));
            }
        }
    }
    if let Some(c) = sym.choice() {
        out.line(format!(
            "Choice: member of '{}' (mode {}{})",
            c.prompt().unwrap_or("choice"),
            c.mode().as_str(),
            match c.selection() {
                Some(s) => format!(", selection {}", s.name()),
                None => String::new(),
            }
        ));
    }
    out.blank();

    deps_line(kc, node, ev, out);
    if sym.locations().len() > 1 {
        let dd = sym.direct_deps();
        out.line(format!(
            "Depends on (all definitions): {} (={})",
            annotate(kc, &dd),
            sym.direct_deps_value().as_str()
        ));
    }
    location_block(tree, nodes, i, out);
    let others: Vec<String> = sym
        .locations()
        .into_iter()
        .filter(|l| *l != node.location())
        .map(|l| format!("{}:{}", l.file, l.line))
        .collect();
    if !others.is_empty() {
        out.line(format!("Also defined at {}", others.join(", ")));
    }
    if let Some(env) = sym.env_var() {
        out.line(format!("Environment variable: {}", env));
    }
    out.blank();

    let ranges = sym.ranges();
    if !ranges.is_empty() {
        out.line("Range:");
        let mut found = false;
        for r in &ranges {
            let on = !found && r.condition.as_ref().is_none_or(|c| ev(c) != Some(Tristate::N));
            found |= on;
            let bounds: Vec<String> = r
                .value
                .split_whitespace()
                .map(|t| match t.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
                    Some(lit) => lit.to_string(),
                    None => annotate(kc, t),
                })
                .collect();
            out.line(format!(
                "  - {}{}   ({}:{}){}",
                bounds.join(" "),
                cond_suffix(kc, &r.condition, ev),
                r.location.file,
                r.location.line,
                if on { "  <- in force" } else { "" }
            ));
        }
    }
    prop_list(kc, out, "Defaults:", &sym.defaults(), ev, true);
    prop_list(kc, out, "Selects:", &sym.selects(), ev, false);
    let sel_by = sym.selected_by();
    if !sel_by.is_empty() {
        let (_, v) = sym.selected_by_expr();
        prop_list(kc, out, &format!("Selected by [{}]:", v.as_str()), &sel_by, ev, false);
    }
    prop_list(kc, out, "Implies:", &sym.implies(), ev, false);
    let imp_by = sym.implied_by();
    if !imp_by.is_empty() {
        let (_, v) = sym.implied_by_expr();
        prop_list(kc, out, &format!("Implied by [{}]:", v.as_str()), &imp_by, ev, false);
    }
}

fn choice_info(kc: &Kconfig, tree: &Tree, nodes: &[MenuNode<'_>], i: usize, ev: Eval<'_>, out: &mut Out) {
    let node = &nodes[i];
    let Some(c) = node.choice() else { return };
    let name = c.name().map(|n| format!(" {}", n)).unwrap_or_default();
    out.heading(format!("choice{}: {}", name, node.prompt().unwrap_or("(no prompt)")));
    out.blank();
    help_text(out, node.help().or_else(|| c.help()));
    out.line(format!("Type  : {}", c.choice_type().as_str()));
    out.line(format!("Mode  : {}{}", c.mode().as_str(), if c.is_optional() { " (optional)" } else { "" }));
    match c.selection() {
        Some(s) => out.line(format!("Selection: {} ({})", s.name(), s.prompt().unwrap_or("no prompt"))),
        None => out.line("Selection: none"),
    }
    if let Some(u) = c.user_selection() {
        out.line(format!("User selection: {}", u.name()));
    }
    visibility_block(kc, tree, nodes, i, ev, out);
    out.line("Members:");
    for s in c.symbols() {
        out.line(format!("  - {} [={}] {}", s.name(), s.str_value(), s.prompt().unwrap_or("")));
    }
    out.blank();
    deps_line(kc, node, ev, out);
    location_block(tree, nodes, i, out);
    out.blank();
    prop_list(kc, out, "Defaults:", &c.defaults(), ev, true);
}

fn menu_info(kc: &Kconfig, tree: &Tree, nodes: &[MenuNode<'_>], i: usize, ev: Eval<'_>, out: &mut Out) {
    let node = &nodes[i];
    let what = if node.kind() == NodeKind::Menu { "Menu" } else { "Comment" };
    if i == TOP {
        out.heading(format!("Main menu: {}", kc.mainmenu_text()));
    } else {
        out.heading(format!("{}: {}", what, node.prompt().unwrap_or("")));
    }
    out.blank();
    if let Some(h) = node.help() {
        help_text(out, Some(h));
    }
    if i != TOP {
        visibility_block(kc, tree, nodes, i, ev, out);
        deps_line(kc, node, ev, out);
        if let Some(v) = node.visible_if() {
            out.line(format!("Visible if: {} (={})", annotate(kc, &v), tri_name(ev(&v))));
        }
        location_block(tree, nodes, i, out);
    }
}
