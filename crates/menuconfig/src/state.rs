//! The interface as a pure state machine: keys in, screen (see
//! `render.rs`) and [`Action`]s out. No terminal involved.

use std::path::{Path, PathBuf};

use kconfig::{Kconfig, LoadOptions, NodeKind, SymbolType, Tristate};

use crate::info::{self, Lines, Tone};
use crate::tree::{is_bool_like, is_y_mode_choice_sym, snapshot, Tree, TOP};
use crate::{Error, Outcome};

/// A key press, independent of the terminal library.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    /// A printable character (`' '` for Space).
    Char(char),
    /// A character with Control held (lower case), e.g. `Ctrl('c')`.
    Ctrl(char),
    /// Enter / Return.
    Enter,
    /// Escape.
    Esc,
    /// Backspace.
    Backspace,
    /// Delete.
    Delete,
    /// Tab.
    Tab,
    /// Shift-Tab.
    BackTab,
    /// Arrow up.
    Up,
    /// Arrow down.
    Down,
    /// Arrow left.
    Left,
    /// Arrow right.
    Right,
    /// Home.
    Home,
    /// End.
    End,
    /// Page up.
    PageUp,
    /// Page down.
    PageDown,
    /// A function key, `F(1)` for F1.
    F(u8),
}

/// What the driver should do after a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Redraw and wait for the next key.
    Continue,
    /// Leave the interface.
    Quit(Outcome),
}

/// The kind of the message shown above the key hints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MsgKind {
    Info,
    Warn,
    Error,
}

/// One entry of the current menu.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub node: usize,
    pub text: String,
    /// False for entries shown although invisible (show-all mode, or an
    /// invisible symbol with visible children): drawn greyed out.
    pub visible: bool,
}

#[derive(Debug, Clone, Copy)]
struct Frame {
    menu: usize,
    node: usize,
    sel: usize,
    scroll: usize,
}

/// A one-line text field.
#[derive(Debug, Clone, Default)]
pub(crate) struct Input {
    pub chars: Vec<char>,
    pub cursor: usize,
}

impl Input {
    pub fn new(s: &str) -> Input {
        let chars: Vec<char> = s.chars().collect();
        let cursor = chars.len();
        Input { chars, cursor }
    }

    pub fn text(&self) -> String {
        self.chars.iter().collect()
    }

    /// Applies an editing key; true if the text changed.
    fn edit(&mut self, key: Key) -> bool {
        match key {
            Key::Char(c) if !c.is_control() => {
                self.chars.insert(self.cursor, c);
                self.cursor += 1;
                true
            }
            Key::Backspace | Key::Ctrl('h') if self.cursor > 0 => {
                self.cursor -= 1;
                self.chars.remove(self.cursor);
                true
            }
            Key::Delete | Key::Ctrl('d') if self.cursor < self.chars.len() => {
                self.chars.remove(self.cursor);
                true
            }
            Key::Left | Key::Ctrl('b') => {
                self.cursor = self.cursor.saturating_sub(1);
                false
            }
            Key::Right | Key::Ctrl('f') => {
                self.cursor = (self.cursor + 1).min(self.chars.len());
                false
            }
            Key::Home | Key::Ctrl('a') => {
                self.cursor = 0;
                false
            }
            Key::End | Key::Ctrl('e') => {
                self.cursor = self.chars.len();
                false
            }
            Key::Ctrl('u') => {
                let changed = self.cursor > 0;
                self.chars.drain(..self.cursor);
                self.cursor = 0;
                changed
            }
            Key::Ctrl('k') => {
                let changed = self.cursor < self.chars.len();
                self.chars.truncate(self.cursor);
                changed
            }
            _ => false,
        }
    }
}

/// What an input dialog edits.
#[derive(Debug, Clone)]
pub(crate) enum EditTarget {
    Symbol { name: String, ty: SymbolType },
    MinConfig,
}

#[derive(Debug, Clone)]
pub(crate) struct Edit {
    pub target: EditTarget,
    pub title: String,
    pub info: Option<String>,
    pub input: Input,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Search {
    pub input: Input,
    pub results: Vec<usize>,
    pub sel: usize,
    pub scroll: usize,
}

#[derive(Debug, Clone)]
pub(crate) struct TextView {
    pub title: String,
    pub lines: Lines,
    pub scroll: usize,
    /// The search to return to when closed.
    pub back: Option<Search>,
}

#[derive(Debug, Clone)]
pub(crate) enum Mode {
    Normal,
    Edit(Edit),
    Search(Search),
    Text(TextView),
    Quit { error: Option<String> },
}

/// The whole interface state: the configuration, the current menu, the
/// selection, and the dialog on top.
pub struct State {
    pub(crate) kc: Kconfig,
    pub(crate) tree: Tree,
    pub(crate) config_path: PathBuf,
    pub(crate) menu: usize,
    stack: Vec<Frame>,
    pub(crate) rows: Vec<Row>,
    pub(crate) sel: usize,
    pub(crate) scroll: usize,
    pub(crate) show_all: bool,
    pub(crate) show_name: bool,
    saved_text: Option<String>,
    pub(crate) dirty: bool,
    saved: bool,
    pub(crate) message: Option<(String, MsgKind)>,
    pub(crate) mode: Mode,
    pub(crate) width: u16,
    pub(crate) height: u16,
}

/// A file's text with line endings normalised like the engine compares
/// them, or `None` if it cannot be read.
fn read_normalized(path: &Path) -> Option<String> {
    let text = String::from_utf8(std::fs::read(path).ok()?).ok()?;
    Some(text.replace("\r\n", "\n").replace('\r', "\n"))
}

impl State {
    /// Loads the Kconfig tree (`srctree`: see [`Kconfig::load`]; `None`
    /// uses `$srctree`) and the configuration at `config_path`, like
    /// kconfiglib's menuconfig: when `config_path` is the standard name
    /// (`$KCONFIG_CONFIG`, else `.config`) and missing, the
    /// `defconfig_list` fallback applies; otherwise a missing file means
    /// default values. Warnings are shown in a window at start.
    pub fn load(kconfig_path: &Path, config_path: &Path, srctree: Option<&Path>) -> Result<State, Error> {
        let options = LoadOptions { srctree: srctree.map(Path::to_path_buf), ..Default::default() };
        State::load_with(kconfig_path, config_path, &options)
    }

    /// [`State::load`] with explicit options (environment, `$(shell,...)`).
    pub fn load_with(kconfig_path: &Path, config_path: &Path, options: &LoadOptions) -> Result<State, Error> {
        let mut kc = Kconfig::load_with(kconfig_path, options).map_err(Error::Kconfig)?;
        let mut warnings: Vec<String> = kc.take_warnings().iter().map(|w| w.to_string()).collect();
        let path_str = config_path.to_string_lossy().into_owned();
        let message = if path_str == kc.standard_config_filename() {
            let load = kc.load_default_config().map_err(Error::Kconfig)?;
            warnings.extend(load.warnings.iter().map(|w| w.to_string()));
            load.message
        } else if config_path.exists() {
            let load = kc.load_config(config_path).map_err(Error::Kconfig)?;
            warnings.extend(load.warnings.iter().map(|w| w.to_string()));
            load.message
        } else {
            format!("Using default symbol values (no '{}')", path_str)
        };
        warnings.extend(kc.take_warnings().iter().map(|w| w.to_string()));
        // Evaluation warnings would repeat on every change; the help view
        // explains unmet dependencies instead (kconfiglib's menuconfig also
        // turns warnings off once loaded).
        kc.set_warnings_enabled(false);
        let saved_text = read_normalized(config_path);
        let mut st = State::new(kc, config_path.to_path_buf(), saved_text);
        st.message = Some((message.clone(), MsgKind::Info));
        if !warnings.is_empty() {
            let mut lines: Lines = vec![(message, Tone::Heading), (String::new(), Tone::Normal)];
            lines.extend(warnings.into_iter().map(|w| (w, Tone::Warn)));
            st.mode =
                Mode::Text(TextView { title: "Warnings while loading".into(), lines, scroll: 0, back: None });
        }
        Ok(st)
    }

    /// A state over an already loaded configuration. `saved_text` is the
    /// current content of `config_path` (`None`: missing), against which
    /// unsaved changes are detected.
    pub fn new(kc: Kconfig, config_path: PathBuf, saved_text: Option<String>) -> State {
        let tree = Tree::build(&kc);
        let mut st = State {
            kc,
            tree,
            config_path,
            menu: TOP,
            stack: Vec::new(),
            rows: Vec::new(),
            sel: 0,
            scroll: 0,
            show_all: false,
            show_name: false,
            saved_text,
            dirty: false,
            saved: false,
            message: None,
            mode: Mode::Normal,
            width: 80,
            height: 24,
        };
        st.update_dirty();
        st.rebuild();
        if st.rows.is_empty() && st.tree.len() > 1 {
            // Nothing visible at all: show everything rather than nothing.
            st.show_all = true;
            st.rebuild();
        }
        st
    }

    /// The configuration.
    pub fn kconfig(&self) -> &Kconfig {
        &self.kc
    }

    /// Whether the configuration differs from the file on disk.
    pub fn has_unsaved_changes(&self) -> bool {
        self.dirty
    }

    /// Sets the screen size (call before the first render and on resize).
    pub fn resize(&mut self, width: u16, height: u16) {
        self.width = width;
        self.height = height;
        self.ensure_visible();
    }

    // ----- helpers -----

    fn update_dirty(&mut self) {
        self.dirty = self.saved_text.as_deref() != Some(self.kc.config_text().as_str());
    }

    fn info(&mut self, s: impl Into<String>) {
        self.message = Some((s.into(), MsgKind::Info));
    }

    fn warn(&mut self, s: impl Into<String>) {
        self.message = Some((s.into(), MsgKind::Warn));
    }

    fn error(&mut self, s: impl Into<String>) {
        self.message = Some((s.into(), MsgKind::Error));
    }

    /// Rows of the list area.
    pub(crate) fn list_height(&self) -> usize {
        crate::render::areas(ratatui::layout::Rect::new(0, 0, self.width, self.height)).list_height()
    }

    /// Recomputes the rows of the current menu.
    fn rebuild(&mut self) {
        let nodes = snapshot(&self.kc);
        let shown = self.tree.shown(&nodes, self.menu, self.show_all);
        self.rows = shown
            .into_iter()
            .map(|i| Row {
                node: i,
                text: self.tree.entry_text(&nodes, i, self.show_all, self.show_name),
                visible: nodes[i].is_visible(),
            })
            .collect();
        self.sel = self.sel.min(self.rows.len().saturating_sub(1));
    }

    /// Rebuilds after a change, keeping the selected entry where possible.
    fn refresh(&mut self) {
        let keep = self.rows.get(self.sel).map(|r| r.node);
        self.rebuild();
        if let Some(p) = keep.and_then(|k| self.rows.iter().position(|r| r.node == k)) {
            self.sel = p;
        }
        // A menu that became empty is left (kconfiglib does the same).
        while self.rows.is_empty() && !self.stack.is_empty() {
            self.leave_menu();
        }
        self.ensure_visible();
    }

    fn after_change(&mut self) {
        self.kc.take_warnings();
        self.update_dirty();
        self.refresh();
    }

    pub(crate) fn ensure_visible(&mut self) {
        let lh = self.list_height().max(1);
        self.sel = self.sel.min(self.rows.len().saturating_sub(1));
        if self.sel < self.scroll {
            self.scroll = self.sel;
        } else if self.sel >= self.scroll + lh {
            self.scroll = self.sel + 1 - lh;
        }
        self.scroll = self.scroll.min(self.rows.len().saturating_sub(lh));
        if let Mode::Search(s) = &mut self.mode {
            let lh = crate::render::areas(ratatui::layout::Rect::new(0, 0, self.width, self.height))
                .search_list_height()
                .max(1);
            s.sel = s.sel.min(s.results.len().saturating_sub(1));
            if s.sel < s.scroll {
                s.scroll = s.sel;
            } else if s.sel >= s.scroll + lh {
                s.scroll = s.sel + 1 - lh;
            }
        }
    }

    fn selected(&self) -> Option<usize> {
        self.rows.get(self.sel).map(|r| r.node)
    }

    fn enter_menu(&mut self, i: usize) {
        self.stack.push(Frame { menu: self.menu, node: i, sel: self.sel, scroll: self.scroll });
        self.menu = i;
        self.sel = 0;
        self.scroll = 0;
        self.rebuild();
        // In a choice, start on the selected member.
        let sel = snapshot(&self.kc)[i].choice().and_then(|c| c.selection()).map(|s| s.name().to_string());
        if let Some(name) = sel {
            if let Some(p) = self.rows.iter().position(|r| self.tree.name[r.node].as_deref() == Some(&name)) {
                self.sel = p;
            }
        }
        self.scroll = self.sel.saturating_sub(self.list_height() / 2);
        self.ensure_visible();
    }

    fn leave_menu(&mut self) {
        if let Some(f) = self.stack.pop() {
            self.menu = f.menu;
            self.rebuild();
            self.sel = self.rows.iter().position(|r| r.node == f.node).unwrap_or(f.sel);
            self.scroll = f.scroll;
            self.ensure_visible();
        }
    }

    /// Shows node `target` in its menu; turns on show-all if it is
    /// invisible and then explains why in the help view.
    pub(crate) fn jump_to(&mut self, target: usize) {
        self.stack.clear();
        let mut prev = TOP;
        for m in self.tree.menu_chain(target) {
            self.stack.push(Frame { menu: prev, node: m, sel: 0, scroll: 0 });
            prev = m;
        }
        self.menu = prev;
        let reachable = self.tree.reachable(&snapshot(&self.kc), target);
        if !reachable && !self.show_all {
            self.show_all = true;
            self.warn("Show-all mode turned on to show an invisible entry (a: toggle)");
        }
        self.rebuild();
        if let Some(p) = self.rows.iter().position(|r| r.node == target) {
            self.sel = p;
            self.scroll = p.saturating_sub(self.list_height() / 2);
        }
        self.ensure_visible();
        if !reachable {
            self.open_help(target, None);
        }
    }

    fn open_help(&mut self, i: usize, back: Option<Search>) {
        let lines = info::node_info(&mut self.kc, &self.tree, i);
        let title = match &self.tree.name[i] {
            Some(n) if self.tree.kind[i] == NodeKind::Symbol => format!("Help: {}", n),
            _ => format!("Help: {}", self.tree.title(i)),
        };
        self.mode = Mode::Text(TextView { title, lines, scroll: 0, back });
    }

    fn quit_request(&mut self) -> Action {
        if self.dirty {
            self.mode = Mode::Quit { error: None };
            Action::Continue
        } else {
            Action::Quit(Outcome {
                saved: self.saved,
                message: format!("No changes to save (for '{}')", self.config_path.display()),
            })
        }
    }

    fn save(&mut self) -> Result<String, String> {
        match self.kc.write_config(&self.config_path) {
            Ok(msg) => {
                self.saved_text = Some(self.kc.config_text());
                self.saved = true;
                self.update_dirty();
                Ok(msg)
            }
            Err(e) => Err(e.message),
        }
    }

    /// Sets a symbol through the engine; shows the error if refused.
    fn set_symbol(&mut self, name: &str, value: &str) -> bool {
        if self.kc.symbol(name).is_some_and(|s| s.str_value() == value) {
            return true;
        }
        match self.kc.set_value(name, value) {
            Ok(()) => {
                self.after_change();
                true
            }
            Err(e) => {
                self.kc.take_warnings();
                self.error(e.message);
                false
            }
        }
    }

    fn set_choice(&mut self, index: usize, mode: Tristate) {
        if self.kc.set_choice_mode(index, mode) {
            self.after_change();
        } else {
            self.error(format!("the choice cannot be set to {}", mode.as_str()));
        }
    }

    /// Why the entry cannot be changed, for the message line.
    fn refusal(&mut self, i: usize) -> String {
        let what = self.tree.name[i].clone().unwrap_or_else(|| self.tree.title(i));
        let reasons = info::invisibility_reasons(&mut self.kc, &self.tree, i);
        if let Some(r) = reasons.first() {
            return format!("{} cannot be changed: {} (? for details)", what, r);
        }
        let nodes = snapshot(&self.kc);
        if let Some(sym) = nodes[i].symbol() {
            let (rev, v) = sym.selected_by_expr();
            if v != Tristate::N {
                return format!("{} is locked: selected by {} (? for details)", what, rev);
            }
        }
        format!("{} cannot be changed (? for details)", what)
    }

    /// Space / Enter on a value: toggle a bool/tristate, cycle a choice's
    /// mode, pick a choice member, or open the editor of an int/hex/string.
    fn change_node(&mut self, i: usize) {
        enum Change {
            Edit { name: String, ty: SymbolType, value: String, title: String },
            Set { name: String, value: Tristate, pick: bool },
            ChoiceMode { index: usize, mode: Tristate },
            Refuse,
            Nothing,
        }
        let change = {
            let nodes = snapshot(&self.kc);
            let node = &nodes[i];
            let prompt_on = node.prompt().is_some() && node.prompt_visibility() != Tristate::N;
            if let Some(sym) = node.symbol() {
                if !prompt_on {
                    Change::Refuse
                } else {
                    match sym.orig_type() {
                        SymbolType::Int | SymbolType::Hex | SymbolType::String => {
                            if sym.visibility() == Tristate::N {
                                Change::Refuse
                            } else {
                                Change::Edit {
                                    name: sym.name().to_string(),
                                    ty: sym.orig_type(),
                                    value: sym.str_value(),
                                    title: format!(
                                        "{} ({})",
                                        node.prompt().unwrap_or(sym.name()),
                                        sym.orig_type().as_str()
                                    ),
                                }
                            }
                        }
                        SymbolType::Bool | SymbolType::Tristate => {
                            let a = sym.assignable();
                            if is_y_mode_choice_sym(&sym) {
                                Change::Set { name: sym.name().to_string(), value: Tristate::Y, pick: true }
                            } else if a.len() >= 2 {
                                let next = match a.iter().position(|&v| v == sym.tri_value()) {
                                    Some(p) => a[(p + 1) % a.len()],
                                    None => a[0],
                                };
                                Change::Set { name: sym.name().to_string(), value: next, pick: false }
                            } else {
                                Change::Refuse
                            }
                        }
                        SymbolType::Unknown => Change::Refuse,
                    }
                }
            } else if let Some(c) = node.choice() {
                let a = c.assignable();
                if prompt_on && a.len() >= 2 {
                    let next = match a.iter().position(|&v| v == c.mode()) {
                        Some(p) => a[(p + 1) % a.len()],
                        None => a[0],
                    };
                    Change::ChoiceMode { index: c.index(), mode: next }
                } else {
                    Change::Refuse
                }
            } else {
                Change::Nothing
            }
        };
        match change {
            Change::Edit { name, ty, value, title } => {
                let info = match ty {
                    SymbolType::Int | SymbolType::Hex => info::active_range(&mut self.kc, &name)
                        .map(|(lo, hi)| format!("Range: {}-{}", lo, hi)),
                    _ => None,
                };
                self.mode = Mode::Edit(Edit {
                    target: EditTarget::Symbol { name, ty },
                    title,
                    info,
                    input: Input::new(&value),
                    error: None,
                });
            }
            Change::Set { name, value, pick } => {
                if self.set_symbol(&name, value.as_str()) && pick && self.tree.children[i].is_empty() {
                    // Picking a choice member goes back to the parent menu,
                    // like the kernel's menuconfig.
                    self.leave_menu();
                }
            }
            Change::ChoiceMode { index, mode } => self.set_choice(index, mode),
            Change::Refuse => {
                let msg = self.refusal(i);
                self.warn(msg);
            }
            Change::Nothing => {}
        }
    }

    /// `y`, `n`, `m` on the selected entry.
    fn set_selected_tri(&mut self, value: Tristate) {
        let Some(i) = self.selected() else { return };
        enum Op {
            Sym(String, bool),
            Choice(usize),
            Refuse(String),
            Locked,
            Nothing,
        }
        let op = {
            let nodes = snapshot(&self.kc);
            let node = &nodes[i];
            let prompt_on = node.prompt().is_some() && node.prompt_visibility() != Tristate::N;
            if let Some(sym) = node.symbol() {
                let pick = is_y_mode_choice_sym(&sym);
                if !is_bool_like(sym.orig_type()) {
                    Op::Nothing
                } else if prompt_on && (sym.assignable().contains(&value) || (pick && value == Tristate::Y)) {
                    Op::Sym(sym.name().to_string(), pick)
                } else if prompt_on && pick {
                    Op::Refuse(format!(
                        "{} is a member of a choice: pick another member to deselect it",
                        sym.name()
                    ))
                } else if prompt_on && sym.assignable().len() >= 2 {
                    Op::Refuse(format!(
                        "{} cannot be set to {} (possible: {})",
                        sym.name(),
                        value.as_str(),
                        sym.assignable().iter().map(|v| v.as_str()).collect::<Vec<_>>().join(", ")
                    ))
                } else {
                    Op::Locked
                }
            } else if let Some(c) = node.choice() {
                if prompt_on && c.assignable().contains(&value) {
                    Op::Choice(c.index())
                } else {
                    Op::Refuse(format!("the choice cannot be set to {}", value.as_str()))
                }
            } else {
                Op::Nothing
            }
        };
        match op {
            Op::Sym(name, pick) => {
                if self.set_symbol(&name, value.as_str()) && pick && self.tree.children[i].is_empty() {
                    self.leave_menu();
                }
            }
            Op::Choice(index) => self.set_choice(index, value),
            Op::Locked => {
                let msg = self.refusal(i);
                self.warn(msg);
            }
            Op::Refuse(msg) => self.warn(msg),
            Op::Nothing => {}
        }
    }

    fn toggle_show_all(&mut self) {
        let keep = self.selected();
        self.show_all = !self.show_all;
        self.rebuild();
        if self.rows.is_empty() && !self.show_all {
            self.show_all = true;
            self.rebuild();
            self.warn("Nothing is visible in this menu without show-all");
        } else if self.show_all {
            self.info("Show-all mode on: invisible entries are greyed out");
        } else {
            self.info("Show-all mode off");
        }
        self.sel = keep.and_then(|k| self.rows.iter().position(|r| r.node == k)).unwrap_or(0);
        self.ensure_visible();
    }

    // ----- keys -----

    /// Handles one key.
    pub fn handle(&mut self, key: Key) -> Action {
        let mode = std::mem::replace(&mut self.mode, Mode::Normal);
        let action = match mode {
            Mode::Normal => self.handle_normal(key),
            Mode::Edit(e) => self.handle_edit(e, key),
            Mode::Search(s) => self.handle_search(s, key),
            Mode::Text(t) => self.handle_text(t, key),
            Mode::Quit { error } => self.handle_quit(error, key),
        };
        self.ensure_visible();
        action
    }

    fn handle_normal(&mut self, key: Key) -> Action {
        self.message = None;
        let page = self.list_height().max(1);
        let last = self.rows.len().saturating_sub(1);
        match key {
            Key::Up | Key::Char('k') | Key::Ctrl('p') => self.sel = self.sel.saturating_sub(1),
            Key::Down | Key::Char('j') | Key::Ctrl('n') => self.sel = (self.sel + 1).min(last),
            Key::PageUp | Key::Ctrl('b') => self.sel = self.sel.saturating_sub(page),
            Key::PageDown | Key::Ctrl('f') => self.sel = (self.sel + page).min(last),
            Key::Home | Key::Char('g') => self.sel = 0,
            Key::End | Key::Char('G') => self.sel = last,
            Key::Enter | Key::Right | Key::Char('l') | Key::Char(' ') => {
                let Some(i) = self.selected() else { return Action::Continue };
                let nodes = snapshot(&self.kc);
                let node = &nodes[i];
                let prefer_toggle = node.symbol().is_some()
                    || node.choice().is_some_and(|c| c.assignable().len() > 1 && node.is_visible());
                let enter = self.tree.menuconfig[i]
                    && !(key == Key::Char(' ') && prefer_toggle)
                    && self.tree.any_shown(&nodes, i, self.show_all);
                if enter {
                    self.enter_menu(i);
                } else {
                    self.change_node(i);
                }
            }
            Key::Char('y') | Key::Char('Y') => self.set_selected_tri(Tristate::Y),
            Key::Char('n') | Key::Char('N') => self.set_selected_tri(Tristate::N),
            Key::Char('m') | Key::Char('M') => self.set_selected_tri(Tristate::M),
            Key::Esc | Key::Left | Key::Char('h') | Key::Backspace => {
                if !self.stack.is_empty() {
                    self.leave_menu();
                } else if key == Key::Esc {
                    return self.quit_request();
                }
            }
            Key::Char('q') | Key::Char('Q') | Key::Ctrl('c') => return self.quit_request(),
            Key::Char('s') | Key::Char('S') => match self.save() {
                Ok(msg) => self.info(msg),
                Err(e) => self.error(e),
            },
            Key::Char('d') | Key::Char('D') => {
                self.mode = Mode::Edit(Edit {
                    target: EditTarget::MinConfig,
                    title: "Save minimal configuration to".into(),
                    info: Some("Only values that differ from the defaults (savedefconfig)".into()),
                    input: Input::new("defconfig"),
                    error: None,
                });
            }
            Key::Char('/') => self.mode = Mode::Search(Search::default()),
            Key::Char('?') | Key::F(1) => {
                if let Some(i) = self.selected() {
                    self.open_help(i, None);
                } else {
                    self.open_help(self.menu, None);
                }
            }
            Key::Char('a') | Key::Char('A') => self.toggle_show_all(),
            Key::Char('c') | Key::Char('C') => {
                self.show_name = !self.show_name;
                self.refresh();
                self.info(if self.show_name { "Symbol names shown" } else { "Symbol names hidden" });
            }
            _ => {}
        }
        Action::Continue
    }

    fn handle_edit(&mut self, mut e: Edit, key: Key) -> Action {
        match key {
            Key::Esc | Key::Ctrl('c') => {
                self.message = None;
                return Action::Continue;
            }
            Key::Enter => {
                let text = e.input.text();
                let result = match &e.target {
                    EditTarget::Symbol { name, ty } => self.commit_value(name, *ty, &text),
                    EditTarget::MinConfig => match self.kc.write_min_config(Path::new(text.trim())) {
                        Ok(msg) => {
                            self.info(msg);
                            Ok(())
                        }
                        Err(err) => Err(err.message),
                    },
                };
                match result {
                    Ok(()) => return Action::Continue,
                    Err(msg) => e.error = Some(msg),
                }
            }
            k => {
                if e.input.edit(k) {
                    e.error = None;
                }
            }
        }
        self.mode = Mode::Edit(e);
        Action::Continue
    }

    /// Validates and sets an int/hex/string value.
    fn commit_value(&mut self, name: &str, ty: SymbolType, text: &str) -> Result<(), String> {
        let mut value = text.to_string();
        if matches!(ty, SymbolType::Int | SymbolType::Hex) {
            value = value.trim().to_string();
            // Like the kernel's menuconfig: hex values get their 0x.
            if ty == SymbolType::Hex
                && !value.is_empty()
                && !value.starts_with("0x")
                && !value.starts_with("0X")
            {
                value = format!("0x{}", value);
            }
            if value.is_empty() {
                return Err(format!("an empty value is not a valid {} value", ty.as_str()));
            }
            match info::parse_num(&value, ty) {
                None => return Err(format!("'{}' is a malformed {} value", value, ty.as_str())),
                Some(v) => {
                    if let Some((lo, hi)) = info::active_range(&mut self.kc, name) {
                        if let (Some(l), Some(h)) = (info::parse_num(&lo, ty), info::parse_num(&hi, ty)) {
                            if v < l || v > h {
                                return Err(format!("{} is outside the range {}-{}", value, lo, hi));
                            }
                        }
                    }
                }
            }
        }
        if self.kc.symbol(name).is_some_and(|s| s.str_value() == value) {
            return Ok(());
        }
        match self.kc.set_value(name, &value) {
            Ok(()) => {
                self.after_change();
                Ok(())
            }
            Err(err) => {
                self.kc.take_warnings();
                Err(err.message)
            }
        }
    }

    fn handle_search(&mut self, mut s: Search, key: Key) -> Action {
        let page = crate::render::areas(ratatui::layout::Rect::new(0, 0, self.width, self.height))
            .search_list_height()
            .max(1);
        let last = s.results.len().saturating_sub(1);
        match key {
            Key::Esc | Key::Ctrl('c') => return Action::Continue,
            Key::Enter => {
                if let Some(&target) = s.results.get(s.sel) {
                    self.message = None;
                    self.jump_to(target);
                    return Action::Continue;
                }
            }
            Key::Up | Key::Ctrl('p') => s.sel = s.sel.saturating_sub(1),
            Key::Down | Key::Ctrl('n') => s.sel = (s.sel + 1).min(last),
            Key::PageUp => s.sel = s.sel.saturating_sub(page),
            Key::PageDown => s.sel = (s.sel + page).min(last),
            Key::Tab | Key::F(1) => {
                if let Some(&target) = s.results.get(s.sel) {
                    self.open_help(target, Some(s));
                    return Action::Continue;
                }
            }
            k => {
                if s.input.edit(k) {
                    s.results = self.search(&s.input.text());
                    s.sel = 0;
                    s.scroll = 0;
                }
            }
        }
        self.mode = Mode::Search(s);
        Action::Continue
    }

    /// Nodes whose symbol name or prompt contains every word of `query`
    /// (case-insensitive): exact name matches first, then names starting
    /// with the first word, then the rest, each in menu order.
    pub(crate) fn search(&self, query: &str) -> Vec<usize> {
        let q = query.trim().to_lowercase();
        // `CONFIG_FOO` finds FOO, as in the kernel's search.
        let prefix = self.kc.config_prefix().to_lowercase();
        let q = match q.strip_prefix(prefix.as_str()) {
            Some(rest) if !prefix.is_empty() && !rest.is_empty() => rest.to_string(),
            _ => q,
        };
        let terms: Vec<&str> = q.split_whitespace().collect();
        if terms.is_empty() {
            return Vec::new();
        }
        let mut hits: Vec<(u8, usize)> = (1..self.tree.len())
            .filter(|&i| terms.iter().all(|t| self.tree.haystack[i].contains(t)))
            .map(|i| {
                let name = self.tree.name[i].as_deref().map(str::to_lowercase);
                let rank = match name {
                    Some(n) if n == q => 0,
                    Some(n) if n.starts_with(terms[0]) => 1,
                    _ => 2,
                };
                (rank, i)
            })
            .collect();
        hits.sort();
        hits.into_iter().map(|(_, i)| i).collect()
    }

    fn handle_text(&mut self, mut t: TextView, key: Key) -> Action {
        let page = crate::render::areas(ratatui::layout::Rect::new(0, 0, self.width, self.height))
            .text_height()
            .max(1);
        let max = crate::render::text_line_count(&t.lines, self.width).saturating_sub(page);
        match key {
            Key::Esc
            | Key::Char('q')
            | Key::Char('?')
            | Key::Enter
            | Key::Left
            | Key::Char('h')
            | Key::Backspace
            | Key::Ctrl('c') => {
                if let Some(s) = t.back {
                    self.mode = Mode::Search(s);
                }
                return Action::Continue;
            }
            Key::Up | Key::Char('k') => t.scroll = t.scroll.saturating_sub(1),
            Key::Down | Key::Char('j') => t.scroll = (t.scroll + 1).min(max),
            Key::PageUp | Key::Char('b') => t.scroll = t.scroll.saturating_sub(page),
            Key::PageDown | Key::Char(' ') => t.scroll = (t.scroll + page).min(max),
            Key::Home | Key::Char('g') => t.scroll = 0,
            Key::End | Key::Char('G') => t.scroll = max,
            _ => {}
        }
        self.mode = Mode::Text(t);
        Action::Continue
    }

    fn handle_quit(&mut self, error: Option<String>, key: Key) -> Action {
        match key {
            Key::Char('y') | Key::Char('Y') => match self.save() {
                Ok(msg) => return Action::Quit(Outcome { saved: true, message: msg }),
                Err(e) => {
                    self.mode = Mode::Quit { error: Some(e) };
                }
            },
            Key::Char('n') | Key::Char('N') => {
                return Action::Quit(Outcome {
                    saved: self.saved,
                    message: format!("Configuration ({}) was not saved", self.config_path.display()),
                })
            }
            Key::Char('c') | Key::Char('C') | Key::Esc | Key::Ctrl('c') => {}
            _ => self.mode = Mode::Quit { error },
        }
        Action::Continue
    }
}
