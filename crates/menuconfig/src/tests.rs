//! Unit tests of the state machine and the screen, without a terminal.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use kconfig::{Kconfig, Tristate};
use ratatui::backend::TestBackend;
use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::Terminal;

use crate::info::{annotate, split_and};
use crate::state::Mode;
use crate::{Action, Key, Outcome, State};

fn data(tree: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(tree)
}

/// A fresh scratch directory (removed when dropped).
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "menuconfig-unit-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    fn config(&self) -> PathBuf {
        self.0.join(".config")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn load_tree(tree: &str, config: Option<&str>) -> (State, Scratch) {
    let dir = Scratch::new();
    if let Some(text) = config {
        std::fs::write(dir.config(), text).unwrap();
    }
    let mut st = State::load(Path::new("Kconfig"), &dir.config(), Some(&data(tree))).unwrap();
    st.resize(100, 30);
    (st, dir)
}

fn load(config: Option<&str>) -> (State, Scratch) {
    load_tree("basic", config)
}

/// The engine alone on the same tree, for reference values and files.
fn reference(tree: &str) -> Kconfig {
    let mut kc = Kconfig::load(Path::new("Kconfig"), Some(&data(tree))).unwrap();
    kc.set_warnings_enabled(false);
    kc
}

fn screen(st: &State) -> String {
    let area = Rect::new(0, 0, st.width, st.height);
    let mut buf = Buffer::empty(area);
    st.render(area, &mut buf);
    buffer_text(&buf)
}

fn buffer_text(buf: &Buffer) -> String {
    let mut out = String::new();
    for y in 0..buf.area.height {
        let mut line = String::new();
        for x in 0..buf.area.width {
            line.push_str(buf[(x, y)].symbol());
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn press(st: &mut State, keys: &[Key]) -> Action {
    let mut last = Action::Continue;
    for &k in keys {
        last = st.handle(k);
    }
    last
}

fn typ(st: &mut State, text: &str) {
    for c in text.chars() {
        assert_eq!(st.handle(Key::Char(c)), Action::Continue);
    }
}

/// Moves the selection to the first row containing `text` with the arrow
/// keys.
fn select(st: &mut State, text: &str) {
    st.handle(Key::Home);
    for _ in 0..st.rows.len() {
        if st.rows[st.sel].text.contains(text) {
            return;
        }
        st.handle(Key::Down);
    }
    panic!("no row containing {:?} in\n{}", text, screen(st));
}

fn value(st: &State, name: &str) -> String {
    st.kconfig().symbol(name).unwrap().str_value()
}

fn help_text(st: &State) -> String {
    match &st.mode {
        Mode::Text(t) => t.lines.iter().map(|(l, _)| l.as_str()).collect::<Vec<_>>().join("\n"),
        _ => panic!("not in the help view"),
    }
}

// ----- screen -----

#[test]
fn top_menu_shows_kernel_style_markers() {
    let (st, _d) = load(None);
    let s = screen(&st);
    assert!(s.starts_with(" "), "{s}");
    let first = s.lines().next().unwrap();
    assert!(first.contains(".config - Test Configuration"), "{first}");
    assert!(first.contains("[unsaved changes]"), "no .config yet: {first}");
    assert!(s.lines().nth(1).unwrap().contains("(Top)"));
    for expected in [
        "[*] Enable loadable module support (NEW)",
        "[*] Feature A (NEW)",
        "[ ]     Extra for feature A (NEW)",
        "<M> Driver support (NEW)",
        "-*- Locked by select (NEW)",
        "[ ] Feature C (NEW)",
        "    Numbers and strings  --->",
        "    Optimizer (Adam)  --->",
        "[*] Networking (NEW)  --->",
        "    *** End of options ***",
        "Using default symbol values (no '",
        "?:help",
    ] {
        assert!(s.contains(expected), "missing {expected:?} in\n{s}");
    }
    // Invisible entries are not listed.
    assert!(!s.contains("Needs feature C"), "{s}");
    assert!(!s.contains("Hidden menu"), "{s}");
}

#[test]
fn renders_through_a_ratatui_terminal() {
    let (mut st, _d) = load(None);
    let mut term = Terminal::new(TestBackend::new(80, 24)).unwrap();
    term.draw(|f| {
        let a = f.area();
        st.resize(a.width, a.height);
        st.render(a, f.buffer_mut());
    })
    .unwrap();
    let text = buffer_text(term.backend().buffer());
    assert!(text.contains("Test Configuration"), "{text}");
    assert!(text.contains("[*] Feature A"), "{text}");
}

#[test]
fn tiny_terminal_does_not_panic() {
    let (mut st, _d) = load(None);
    for (w, h) in [(0, 0), (1, 1), (10, 3), (29, 7), (30, 8), (200, 3), (31, 60)] {
        st.resize(w, h);
        let _ = screen(&st);
        press(&mut st, &[Key::Down, Key::PageDown, Key::Char('/'), Key::Char('x'), Key::Esc]);
        let _ = screen(&st);
    }
    st.resize(20, 5);
    assert!(screen(&st).contains("Terminal too small"));
}

// ----- navigation -----

#[test]
fn moves_and_enters_menus() {
    let (mut st, _d) = load(None);
    assert_eq!(st.sel, 0);
    press(&mut st, &[Key::Down, Key::Char('j')]);
    assert_eq!(st.sel, 2);
    press(&mut st, &[Key::Up]);
    assert_eq!(st.sel, 1);
    press(&mut st, &[Key::Char('k'), Key::Char('k')]);
    assert_eq!(st.sel, 0);
    press(&mut st, &[Key::End]);
    assert_eq!(st.sel, st.rows.len() - 1);
    press(&mut st, &[Key::Home]);
    assert_eq!(st.sel, 0);
    press(&mut st, &[Key::PageDown]);
    assert_eq!(st.sel, st.rows.len() - 1);
    press(&mut st, &[Key::PageUp]);
    assert_eq!(st.sel, 0);

    for enter in [Key::Enter, Key::Right, Key::Char('l')] {
        for back in [Key::Esc, Key::Left, Key::Char('h'), Key::Backspace] {
            select(&mut st, "Numbers and strings");
            let at = st.sel;
            st.handle(enter);
            let s = screen(&st);
            assert!(s.contains("(Top) > Numbers and strings"), "{s}");
            assert!(s.contains("(4) Number of workers (NEW)"), "{s}");
            assert!(s.contains("(0x1000) Base address (NEW)"), "{s}");
            assert!(s.contains("(knlp) Name (NEW)"), "{s}");
            st.handle(back);
            assert_eq!(st.sel, at, "selection restored after leaving");
            assert!(screen(&st).contains("Feature A"));
        }
    }
    // Left at the top does nothing; Esc at the top quits (no changes here
    // would prompt, as there is no .config yet).
    press(&mut st, &[Key::Left, Key::Char('h')]);
    assert_eq!(st.handle(Key::Esc), Action::Continue);
    assert!(matches!(st.mode, Mode::Quit { .. }));
}

#[test]
fn long_menus_scroll() {
    let dir = Scratch::new();
    let mut k = String::from("mainmenu \"Long\"\n");
    for i in 0..100 {
        k.push_str(&format!("config OPT{i}\n\tbool \"Option {i}\"\n\n"));
    }
    std::fs::write(dir.0.join("Kconfig"), k).unwrap();
    let mut st = State::load(Path::new("Kconfig"), &dir.config(), Some(&dir.0)).unwrap();
    st.resize(80, 20);
    let lh = st.list_height();
    assert_eq!(lh, 14);
    press(&mut st, &[Key::PageDown]);
    assert_eq!(st.sel, lh);
    let s = screen(&st);
    assert!(s.contains(&format!("Option {}", lh)), "{s}");
    assert!(!s.contains("Option 0 "), "{s}");
    assert!(s.contains(&format!(" {}/100 ", lh + 1)), "{s}");
    press(&mut st, &[Key::End]);
    let s = screen(&st);
    assert!(s.contains("Option 99"), "{s}");
    assert_eq!(st.scroll, 100 - lh);
    press(&mut st, &[Key::Home]);
    assert_eq!(st.scroll, 0);
    // Shrinking the terminal keeps the selection on screen.
    press(&mut st, &[Key::Char('G')]);
    st.resize(80, 10);
    assert!(st.sel >= st.scroll && st.sel < st.scroll + st.list_height());
    assert!(screen(&st).contains("Option 99"));
}

// ----- values -----

#[test]
fn toggles_bools_and_tristates() {
    let (mut st, _d) = load(None);
    select(&mut st, "Feature A");
    st.handle(Key::Char(' '));
    assert_eq!(value(&st, "FEATURE_A"), "n");
    let s = screen(&st);
    assert!(s.contains("[ ] Feature A"), "{s}");
    assert!(!s.contains("Extra for feature A"), "dependent entry hidden: {s}");
    assert!(s.contains("[ ] Locked by select"), "no longer forced: {s}");
    // Selection stays on the toggled entry.
    assert!(st.rows[st.sel].text.contains("Feature A"));
    st.handle(Key::Char('y'));
    assert_eq!(value(&st, "FEATURE_A"), "y");
    st.handle(Key::Char('n'));
    assert_eq!(value(&st, "FEATURE_A"), "n");
    st.handle(Key::Enter);
    assert_eq!(value(&st, "FEATURE_A"), "y", "Enter toggles a bool");

    select(&mut st, "Driver support");
    st.handle(Key::Char('y'));
    assert!(screen(&st).contains("<*> Driver support"));
    st.handle(Key::Char('m'));
    assert!(screen(&st).contains("<M> Driver support"));
    st.handle(Key::Char('n'));
    assert!(screen(&st).contains("< > Driver support"));
    st.handle(Key::Char(' '));
    assert_eq!(value(&st, "DRIVER"), "m");
    st.handle(Key::Char(' '));
    assert_eq!(value(&st, "DRIVER"), "y");
    st.handle(Key::Char(' '));
    assert_eq!(value(&st, "DRIVER"), "n");

    // m on a bool is refused with a message.
    select(&mut st, "Feature C");
    st.handle(Key::Char('m'));
    assert_eq!(value(&st, "FEATURE_C"), "n");
    assert!(screen(&st).contains("FEATURE_C cannot be set to m"), "{}", screen(&st));

    // Without modules, tristates are bools.
    select(&mut st, "Enable loadable module support");
    st.handle(Key::Char('n'));
    let s = screen(&st);
    assert!(s.contains("[ ] Driver support"), "{s}");
}

#[test]
fn locked_values_explain_themselves() {
    let (mut st, _d) = load(None);
    select(&mut st, "Locked by select");
    st.handle(Key::Char(' '));
    assert_eq!(value(&st, "LOCKED"), "y");
    let s = screen(&st);
    assert!(s.contains("LOCKED is locked: selected by FEATURE_A"), "{s}");
    st.handle(Key::Char('n'));
    assert_eq!(value(&st, "LOCKED"), "y");
    st.handle(Key::Char('?'));
    let h = help_text(&st);
    assert!(h.contains("Selected by [y]:"), "{h}");
    assert!(h.contains("  - FEATURE_A [=y]"), "{h}");
    assert!(
        h.contains("Locked: the value cannot go below y because it is selected by FEATURE_A [=y]"),
        "{h}"
    );
}

#[test]
fn picks_choice_members() {
    let (mut st, _d) = load(None);
    select(&mut st, "Optimizer (Adam)");
    st.handle(Key::Enter);
    let s = screen(&st);
    assert!(s.contains("(Top) > Optimizer"), "{s}");
    assert!(s.contains("( ) SGD"), "{s}");
    assert!(s.contains("(X) Adam"), "{s}");
    assert!(s.contains("( ) Lion"), "{s}");
    assert!(st.rows[st.sel].text.contains("Adam"), "starts on the selection");
    st.handle(Key::Down);
    st.handle(Key::Char(' '));
    // Back in the parent menu, on the choice, with the new selection.
    let s = screen(&st);
    assert!(s.contains("    Optimizer (Lion)  --->"), "{s}");
    assert!(st.rows[st.sel].text.contains("Optimizer"));
    assert_eq!(value(&st, "OPT_LION"), "y");
    assert_eq!(value(&st, "OPT_ADAM"), "n");
    // y on a member picks it too.
    st.handle(Key::Enter);
    select(&mut st, "SGD");
    st.handle(Key::Char('y'));
    assert_eq!(value(&st, "OPT_SGD"), "y");
    assert!(screen(&st).contains("Optimizer (SGD)"));
    // n on a member says how to deselect it.
    st.handle(Key::Enter);
    select(&mut st, "SGD");
    st.handle(Key::Char('n'));
    assert_eq!(value(&st, "OPT_SGD"), "y");
    assert!(screen(&st).contains("OPT_SGD is a member of a choice: pick another member to deselect it"));
}

#[test]
fn optional_and_tristate_choices() {
    let (mut st, _d) = load_tree("extra", None);
    let s = screen(&st);
    // An optional choice that is off has nothing to show (kconfiglib).
    assert!(s.contains("[ ] Optional choice  ----"), "{s}");
    assert!(s.contains("{M} Tristate choice  --->"), "{s}");
    // Space toggles a choice that has several modes instead of entering it.
    select(&mut st, "Optional choice");
    st.handle(Key::Char(' '));
    let s = screen(&st);
    assert!(s.contains("[*] Optional choice (OC A)  --->"), "{s}");
    st.handle(Key::Char(' '));
    assert!(screen(&st).contains("[ ] Optional choice"));
    // Enter goes in; members of an m-mode tristate choice are tristates.
    select(&mut st, "Tristate choice");
    st.handle(Key::Enter);
    let s = screen(&st);
    assert!(s.contains("(Top) > Tristate choice"), "{s}");
    assert!(s.contains("< > TC A"), "{s}");
    select(&mut st, "TC B");
    st.handle(Key::Char('m'));
    assert_eq!(value(&st, "TC_B"), "m");
    st.handle(Key::Esc);
    st.handle(Key::Char('y'));
    let s = screen(&st);
    assert!(s.contains("{*} Tristate choice (TC "), "{s}");
}

#[test]
fn menuconfig_symbols_toggle_with_space_and_open_with_enter() {
    let (mut st, _d) = load(None);
    select(&mut st, "Networking");
    st.handle(Key::Enter);
    let s = screen(&st);
    assert!(s.contains("(Top) > Networking"), "{s}");
    assert!(s.contains("[*] IPv6 (NEW)"), "{s}");
    st.handle(Key::Esc);
    st.handle(Key::Char(' '));
    assert_eq!(value(&st, "NET"), "n");
    let s = screen(&st);
    assert!(s.contains("[ ] Networking  ----"), "empty menu: {s}");
    // Enter on an empty menuconfig symbol toggles it.
    st.handle(Key::Enter);
    assert_eq!(value(&st, "NET"), "y");
}

#[test]
fn edits_int_with_range_errors() {
    let (mut st, _d) = load(None);
    select(&mut st, "Numbers and strings");
    st.handle(Key::Enter);
    select(&mut st, "Number of workers");
    st.handle(Key::Enter);
    assert!(matches!(st.mode, Mode::Edit(_)));
    let s = screen(&st);
    assert!(s.contains("Number of workers (int)"), "{s}");
    assert!(s.contains("Range: 1-16"), "{s}");
    assert!(s.contains("> 4"), "{s}");

    press(&mut st, &[Key::Ctrl('u')]);
    typ(&mut st, "99");
    st.handle(Key::Enter);
    assert!(matches!(st.mode, Mode::Edit(_)), "stays in the field");
    let s = screen(&st);
    assert!(s.contains("99 is outside the range 1-16"), "{s}");
    assert_eq!(value(&st, "COUNT"), "4");

    press(&mut st, &[Key::Backspace, Key::Backspace]);
    typ(&mut st, "abc");
    st.handle(Key::Enter);
    assert!(screen(&st).contains("'abc' is a malformed int value"));
    press(&mut st, &[Key::Ctrl('u')]);
    typ(&mut st, "-3");
    st.handle(Key::Enter);
    assert!(screen(&st).contains("-3 is outside the range 1-16"));

    // Esc cancels.
    st.handle(Key::Esc);
    assert!(matches!(st.mode, Mode::Normal));
    assert_eq!(value(&st, "COUNT"), "4");

    st.handle(Key::Enter);
    press(&mut st, &[Key::Ctrl('u')]);
    typ(&mut st, " 12 ");
    st.handle(Key::Enter);
    assert!(matches!(st.mode, Mode::Normal));
    assert_eq!(value(&st, "COUNT"), "12");
    assert!(screen(&st).contains("(12) Number of workers"));
}

#[test]
fn symbol_ranges_and_engine_errors() {
    let (mut st, _d) = load_tree("extra", None);
    select(&mut st, "Value");
    st.handle(Key::Enter);
    assert!(screen(&st).contains("Range: 2-10"));
    press(&mut st, &[Key::Ctrl('u')]);
    typ(&mut st, "11");
    st.handle(Key::Enter);
    assert!(screen(&st).contains("11 is outside the range 2-10"));
    st.handle(Key::Esc);
    // Raising MAX moves the range.
    select(&mut st, "Maximum");
    st.handle(Key::Enter);
    press(&mut st, &[Key::Ctrl('u')]);
    typ(&mut st, "20");
    st.handle(Key::Enter);
    select(&mut st, "Value");
    st.handle(Key::Enter);
    press(&mut st, &[Key::Ctrl('u')]);
    typ(&mut st, "11");
    st.handle(Key::Enter);
    assert_eq!(value(&st, "VALUE"), "11");
}

#[test]
fn edits_hex_and_string_values() {
    let (mut st, _d) = load(None);
    select(&mut st, "Numbers and strings");
    st.handle(Key::Enter);
    select(&mut st, "Base address");
    st.handle(Key::Enter);
    press(&mut st, &[Key::Ctrl('u')]);
    typ(&mut st, "2000");
    st.handle(Key::Enter);
    assert_eq!(value(&st, "BASE_ADDR"), "0x2000", "0x is added");
    st.handle(Key::Enter);
    press(&mut st, &[Key::Ctrl('u')]);
    typ(&mut st, "xyz");
    st.handle(Key::Enter);
    assert!(screen(&st).contains("'0xxyz' is a malformed hex value"), "{}", screen(&st));
    st.handle(Key::Esc);

    select(&mut st, "Name");
    st.handle(Key::Enter);
    // Cursor editing: Home, insert, End, Backspace.
    press(&mut st, &[Key::Home]);
    typ(&mut st, "my ");
    press(&mut st, &[Key::End, Key::Backspace]);
    typ(&mut st, "P \"q\"");
    st.handle(Key::Enter);
    assert_eq!(value(&st, "NAME"), "my knlP \"q\"");
    assert!(st.kconfig().config_text().contains("CONFIG_NAME=\"my knlP \\\"q\\\"\"\n"));
    assert!(screen(&st).contains("(my knlP \"q\") Name"));
}

// ----- search -----

#[test]
fn searches_names_and_prompts() {
    let (mut st, _d) = load(None);
    st.handle(Key::Char('/'));
    typ(&mut st, "WORKERS");
    let s = screen(&st);
    assert!(s.contains("1 match"), "{s}");
    assert!(s.contains("COUNT [=4] \"Number of workers\"  in (Top) > Numbers and strings"), "{s}");
    assert!(s.contains("Defined at Kconfig:38"), "{s}");
    st.handle(Key::Enter);
    assert!(matches!(st.mode, Mode::Normal));
    let s = screen(&st);
    assert!(s.contains("(Top) > Numbers and strings"), "{s}");
    assert!(st.rows[st.sel].text.contains("Number of workers"));
    // Going up from a jump goes through the real menu path.
    st.handle(Key::Esc);
    assert!(st.rows[st.sel].text.contains("Numbers and strings"));

    // All words must match, in names or prompts.
    assert_eq!(st.search("base addr").len(), 1);
    assert_eq!(st.search("opt_").len(), 3);
    assert!(st.search("zzz").is_empty());
    assert!(st.search("  ").is_empty());
    assert_eq!(st.search("CONFIG_COUNT"), st.search("count"));
    // Exact name matches come first.
    let r = st.search("feature_a");
    assert_eq!(st.tree.name[r[0]].as_deref(), Some("FEATURE_A"));
    // Menus, choices and comments are found by prompt.
    assert_eq!(st.search("end of options").len(), 1);
    assert_eq!(st.search("optimizer").len(), 1);

    // Up/Down move through the results; Esc closes.
    st.handle(Key::Char('/'));
    typ(&mut st, "feature");
    press(&mut st, &[Key::Down, Key::Down]);
    if let Mode::Search(s) = &st.mode {
        assert_eq!(s.sel, 2);
    } else {
        panic!("not searching");
    }
    press(&mut st, &[Key::Backspace, Key::Backspace]);
    if let Mode::Search(s) = &st.mode {
        assert_eq!(s.input.text(), "featu");
        assert_eq!(s.sel, 0);
    }
    st.handle(Key::Esc);
    assert!(matches!(st.mode, Mode::Normal));
}

#[test]
fn jumping_to_invisible_entries_explains_why() {
    let (mut st, _d) = load(None);
    st.handle(Key::Char('/'));
    typ(&mut st, "needs_c");
    let s = screen(&st);
    assert!(s.contains("NEEDS_C [=n] \"Needs feature C\"  in (Top)  (invisible)"), "{s}");
    st.handle(Key::Enter);
    let h = help_text(&st);
    assert!(h.contains("Visible: no. It is invisible because:"), "{h}");
    assert!(h.contains("  - it depends on FEATURE_C [=n], which is n"), "{h}");
    assert!(!h.contains("FEATURE_A [=y], which"), "met dependencies are not blamed: {h}");
    assert!(h.contains("Depends on: FEATURE_C [=n] && FEATURE_A [=y] (=n)"), "{h}");
    assert!(h.contains("Only visible with feature C."), "{h}");
    st.handle(Key::Esc);
    // Show-all was turned on to show it, greyed out, selected.
    assert!(st.show_all);
    assert!(st.rows[st.sel].text.contains("Needs feature C"));
    assert!(!st.rows[st.sel].visible);
    let s = screen(&st);
    assert!(s.contains("show-all"), "{s}");
    // Trying to change it says why not.
    st.handle(Key::Char(' '));
    let s = screen(&st);
    assert!(s.contains("NEEDS_C cannot be changed: it depends on FEATURE_C [=n], which is n"), "{s}");

    // An entry inside a menu hidden by `visible if`.
    st.handle(Key::Char('/'));
    typ(&mut st, "hidden_opt");
    st.handle(Key::Enter);
    let h = help_text(&st);
    assert!(
        h.contains("it is inside the menu 'Hidden menu', which is invisible because its 'visible if FEATURE_C [=n]' is n"),
        "{h}"
    );
    assert!(h.contains("Defined at sub/Kconfig:4 (included from Kconfig:80)"), "{h}");
    assert!(h.contains("  -> Hidden menu\n    -> Hidden option (HIDDEN_OPT [=n])"), "{h}");
    st.handle(Key::Esc);
    assert!(screen(&st).contains("(Top) > Hidden menu"));
}

#[test]
fn search_help_returns_to_search() {
    let (mut st, _d) = load(None);
    st.handle(Key::Char('/'));
    typ(&mut st, "lion");
    st.handle(Key::Tab);
    assert!(help_text(&st).contains("CONFIG_OPT_LION: Lion"));
    st.handle(Key::Esc);
    match &st.mode {
        Mode::Search(s) => assert_eq!(s.input.text(), "lion"),
        _ => panic!("expected the search back"),
    }
}

// ----- help -----

#[test]
fn help_shows_everything_about_a_symbol() {
    let (mut st, _d) = load(None);
    select(&mut st, "Feature A");
    st.handle(Key::Char('?'));
    let s = screen(&st);
    assert!(s.contains("Help: FEATURE_A"), "{s}");
    let h = help_text(&st);
    for expected in [
        "CONFIG_FEATURE_A: Feature A",
        "Feature A enables the fast path.\nIt selects LOCKED.",
        "Symbol: FEATURE_A [=y]",
        "Type  : bool",
        "Value : y (default; not set by the user)",
        "Prompt: Feature A",
        "Visible: yes",
        "Defined at Kconfig:8",
        "Location:\n  -> Feature A (FEATURE_A [=y])",
        "Defaults:\n  - y   (Kconfig:8)",
        "Selects:\n  - LOCKED [=y]",
    ] {
        assert!(h.contains(expected), "missing {expected:?} in\n{h}");
    }
    st.handle(Key::Esc);
    assert!(matches!(st.mode, Mode::Normal));
    for k in [Key::Esc, Key::Char('q'), Key::Char('?'), Key::Enter, Key::Left] {
        st.handle(Key::Char('?'));
        st.handle(k);
        assert!(matches!(st.mode, Mode::Normal));
    }

    select(&mut st, "Numbers and strings");
    st.handle(Key::Enter);
    st.handle(Key::Char('?'));
    let h = help_text(&st);
    assert!(h.contains("Type  : int"), "{h}");
    assert!(h.contains("Range:\n  - 1 16   (Kconfig:38)  <- in force"), "{h}");
    assert!(h.contains("There is no help available for this option."), "{h}");
    assert!(h.contains("  -> Numbers and strings\n    -> Number of workers (COUNT [=4])"), "{h}");
}

#[test]
fn help_on_choices_menus_and_prompt_conditions() {
    let (mut st, _d) = load(None);
    select(&mut st, "Optimizer");
    st.handle(Key::Char('?'));
    let h = help_text(&st);
    assert!(h.contains("choice OPTIMIZER: Optimizer"), "{h}");
    assert!(h.contains("Mode  : y"), "{h}");
    assert!(h.contains("Selection: OPT_ADAM (Adam)"), "{h}");
    assert!(h.contains("  - OPT_LION [=n] Lion"), "{h}");
    assert!(h.contains("Defaults:\n  - OPT_ADAM [=y]"), "{h}");
    st.handle(Key::Esc);
    select(&mut st, "Numbers and strings");
    st.handle(Key::Char('?'));
    assert!(help_text(&st).contains("Menu: Numbers and strings"));
    st.handle(Key::Esc);

    let (mut st, _d) = load_tree("extra", None);
    for (query, reason) in [
        ("tuning", "its prompt is shown only if ADVANCED [=n], which is n"),
        ("noprompt", "it has no prompt"),
        ("adv_opt", "it depends on ADVANCED [=n], which is n"),
        ("advanced menu", "it depends on ADVANCED [=n], which is n"),
    ] {
        st.handle(Key::Char('/'));
        typ(&mut st, query);
        st.handle(Key::Enter);
        let h = help_text(&st);
        assert!(h.contains(reason), "{query}: {h}");
        st.handle(Key::Esc);
    }
    // Symbol bounds are shown with their values.
    st.handle(Key::Char('/'));
    typ(&mut st, "value");
    st.handle(Key::Enter);
    st.handle(Key::Char('?'));
    let h = help_text(&st);
    assert!(h.contains("  - 2 MAX [=10]   (Kconfig:12)  <- in force"), "{h}");
}

#[test]
fn help_scrolls() {
    let (mut st, _d) = load(None);
    st.resize(60, 10);
    select(&mut st, "Feature A");
    st.handle(Key::Char('?'));
    let top = screen(&st);
    assert!(top.contains("CONFIG_FEATURE_A"), "{top}");
    press(&mut st, &[Key::PageDown, Key::PageDown, Key::PageDown, Key::PageDown, Key::PageDown]);
    let s = screen(&st);
    assert!(!s.contains("CONFIG_FEATURE_A"), "{s}");
    assert!(s.contains("LOCKED [=y]"), "the end is reachable: {s}");
    press(&mut st, &[Key::Home]);
    assert!(screen(&st).contains("CONFIG_FEATURE_A"));
}

#[test]
fn show_all_and_show_names() {
    let (mut st, _d) = load(None);
    st.handle(Key::Char('a'));
    let s = screen(&st);
    assert!(s.contains("- - Needs feature C (NEW)"), "{s}");
    assert!(s.contains("    Hidden menu  --->"), "{s}");
    assert!(s.contains("show-all"), "{s}");
    st.handle(Key::Char('a'));
    assert!(!screen(&st).contains("Needs feature C"));
    st.handle(Key::Char('c'));
    let s = screen(&st);
    assert!(s.contains("[*] <FEATURE_A> Feature A (NEW)"), "{s}");
    assert!(s.contains("    <choice OPTIMIZER> Optimizer (Adam)  --->"), "{s}");
}

// ----- loading, saving, quitting -----

#[test]
fn loads_existing_config_and_shows_warnings() {
    let (mut st, _d) = load(Some(
        "CONFIG_FEATURE_A=n\nCONFIG_BOGUS=y\nCONFIG_COUNT=5\nCONFIG_NAME=\"x\"\nCONFIG_OPT_SGD=y\n",
    ));
    let s = screen(&st);
    assert!(s.contains("Warnings while loading"), "{s}");
    assert!(s.contains("Loaded configuration '"), "{s}");
    assert!(s.contains("BOGUS"), "{s}");
    st.handle(Key::Esc);
    let s = screen(&st);
    assert!(s.contains("[ ] Feature A"), "{s}");
    assert!(!s.contains("Feature A (NEW)"), "{s}");
    assert!(s.contains("Optimizer (SGD)"), "{s}");
    assert_eq!(value(&st, "COUNT"), "5");
    assert!(st.has_unsaved_changes(), "the file lacks symbols, saving would change it");
}

#[test]
fn save_writes_what_write_config_writes() {
    let (mut st, d) = load(None);
    select(&mut st, "Feature C");
    st.handle(Key::Char('y'));
    select(&mut st, "Driver support");
    st.handle(Key::Char('y'));
    select(&mut st, "Numbers and strings");
    st.handle(Key::Enter);
    select(&mut st, "Number of workers");
    st.handle(Key::Enter);
    press(&mut st, &[Key::Ctrl('u')]);
    typ(&mut st, "7");
    st.handle(Key::Enter);
    st.handle(Key::Esc);
    assert!(screen(&st).contains("[unsaved changes]"));
    st.handle(Key::Char('s'));
    let s = screen(&st);
    assert!(s.contains("Configuration saved to '"), "{s}");
    assert!(!s.contains("[unsaved changes]"), "{s}");
    assert!(!st.has_unsaved_changes());

    let mut kc = reference("basic");
    kc.set_value("FEATURE_C", "y").unwrap();
    kc.set_value("DRIVER", "y").unwrap();
    kc.set_value("COUNT", "7").unwrap();
    let expected = d.0.join("expected");
    kc.write_config(&expected).unwrap();
    assert_eq!(std::fs::read_to_string(d.config()).unwrap(), std::fs::read_to_string(expected).unwrap());

    // Quitting now needs no prompt.
    match st.handle(Key::Char('q')) {
        Action::Quit(Outcome { saved, message }) => {
            assert!(saved);
            assert!(message.starts_with("No changes to save (for '"), "{message}");
        }
        a => panic!("{a:?}"),
    }
}

#[test]
fn changes_undone_are_not_unsaved() {
    let (mut st, _d) = load(None);
    st.handle(Key::Char('s'));
    assert!(!st.has_unsaved_changes());
    select(&mut st, "Feature C");
    st.handle(Key::Char(' '));
    assert!(st.has_unsaved_changes());
    st.handle(Key::Char(' '));
    assert!(!st.has_unsaved_changes(), "same file content as on disk");
}

#[test]
fn quit_prompt_about_unsaved_changes() {
    // Cancel, then quit without saving.
    let (mut st, d) = load(None);
    st.handle(Key::Char('s'));
    let saved = std::fs::read_to_string(d.config()).unwrap();
    select(&mut st, "Feature C");
    st.handle(Key::Char('y'));
    for quit in [Key::Char('q'), Key::Ctrl('c'), Key::Esc] {
        assert_eq!(st.handle(quit), Action::Continue);
        let s = screen(&st);
        assert!(s.contains("Save changes? (y/n/c)"), "{s}");
        for cancel in [Key::Char('c'), Key::Esc, Key::Ctrl('c')] {
            st.handle(cancel);
            assert!(matches!(st.mode, Mode::Normal));
            st.handle(quit);
        }
        // Other keys keep the prompt.
        st.handle(Key::Char('x'));
        assert!(matches!(st.mode, Mode::Quit { .. }));
        st.handle(Key::Char('c'));
    }
    st.handle(Key::Char('q'));
    match st.handle(Key::Char('n')) {
        Action::Quit(o) => {
            assert!(o.saved, "saved earlier in the session");
            assert!(o.message.contains("was not saved"), "{}", o.message);
        }
        a => panic!("{a:?}"),
    }
    assert_eq!(std::fs::read_to_string(d.config()).unwrap(), saved);

    // Save at the prompt.
    let (mut st, d) = load(None);
    select(&mut st, "Feature C");
    st.handle(Key::Char('y'));
    st.handle(Key::Char('q'));
    match st.handle(Key::Char('y')) {
        Action::Quit(o) => {
            assert!(o.saved);
            assert!(o.message.starts_with("Configuration saved to '"), "{}", o.message);
        }
        a => panic!("{a:?}"),
    }
    let text = std::fs::read_to_string(d.config()).unwrap();
    assert!(text.contains("CONFIG_FEATURE_C=y\n"), "{text}");
    assert_eq!(text, st.kconfig().config_text());

    // A config with nothing to change quits at once.
    let (mut st, _d) = load(Some(&text));
    match st.handle(Key::Char('q')) {
        Action::Quit(o) => assert!(!o.saved),
        a => panic!("{a:?}"),
    }
}

#[test]
fn save_errors_are_shown() {
    let dir = Scratch::new();
    let config = dir.0.join("missing-dir").join(".config");
    let mut st = State::load(Path::new("Kconfig"), &config, Some(&data("basic"))).unwrap();
    st.resize(100, 30);
    st.handle(Key::Char('s'));
    let s = screen(&st);
    assert!(s.contains("could not write"), "{s}");
    st.handle(Key::Char('q'));
    st.handle(Key::Char('y'));
    let s = screen(&st);
    assert!(s.contains("Save changes? (y/n/c)"), "{s}");
    assert!(s.contains("could not write"), "{s}");
    assert!(matches!(st.handle(Key::Char('n')), Action::Quit(_)));
}

#[test]
fn saves_minimal_config() {
    let (mut st, d) = load(None);
    select(&mut st, "Feature C");
    st.handle(Key::Char('y'));
    st.handle(Key::Char('d'));
    assert!(screen(&st).contains("> defconfig"));
    let target = d.0.join("defconfig");
    press(&mut st, &[Key::Ctrl('u')]);
    typ(&mut st, &target.to_string_lossy());
    st.handle(Key::Enter);
    assert!(matches!(st.mode, Mode::Normal));
    assert!(screen(&st).contains("Minimal configuration saved to '"));
    assert_eq!(std::fs::read_to_string(&target).unwrap(), st.kconfig().min_config_text());
    assert!(st.kconfig().min_config_text().contains("CONFIG_FEATURE_C=y"));
}

#[test]
fn load_errors_name_the_location() {
    let dir = Scratch::new();
    std::fs::write(dir.0.join("Kconfig"), "config A\n\tbool \"a\"\nendmenu\n").unwrap();
    let e = State::load(Path::new("Kconfig"), &dir.config(), Some(&dir.0)).err().unwrap();
    assert!(e.to_string().starts_with("Kconfig:3: "), "{e}");
    let e = State::load(Path::new("Nope"), &dir.config(), Some(&dir.0)).err().unwrap();
    assert!(e.to_string().starts_with("Nope:0: could not open"), "{e}");
}

#[test]
fn command_line_usage() {
    assert_eq!(crate::main_from_args(&["-h".into()]), 0);
    assert_eq!(crate::main_from_args(&["--bogus".into()]), 2);
    assert_eq!(crate::main_from_args(&["a".into(), "b".into()]), 2);
}

// ----- helpers -----

#[test]
fn expression_helpers() {
    assert_eq!(split_and("A && (B || C) && !D"), vec!["A", "B || C", "!D"]);
    assert_eq!(split_and("(A && B)"), vec!["A", "B"]);
    assert_eq!(split_and("A = \"x && y\" && B"), vec!["A = \"x && y\"", "B"]);
    assert_eq!(split_and("y"), vec!["y"]);
    let kc = reference("basic");
    assert_eq!(
        annotate(&kc, "FEATURE_A && !FEATURE_C || COUNT > \"3\" && m"),
        "FEATURE_A [=y] && !FEATURE_C [=n] || COUNT [=4] > \"3\" && m"
    );
    assert_eq!(annotate(&kc, "NAME = \"FEATURE_A\""), "NAME [=knlp] = \"FEATURE_A\"");
    assert_eq!(annotate(&kc, "<choice OPTIMIZER> && UNDEFINED_X"), "<choice OPTIMIZER> && UNDEFINED_X");
    let _ = Tristate::N;
}

#[test]
#[ignore]
fn perf_big_tree() {
    let dir = Scratch::new();
    let mut k =
        String::from("mainmenu \"Big\"\nconfig MODULES\n\tbool \"m\"\n\toption modules\n\tdefault y\n");
    for m in 0..200 {
        k.push_str(&format!("menu \"Menu {m}\"\nconfig M{m}\n\tbool \"Enable {m}\"\n\tdefault y\n"));
        k.push_str(&format!("config S{m}_100\n\ttristate \"Last {m}\"\n"));
        for i in 0..100 {
            k.push_str(&format!(
                "config S{m}_{i}\n\ttristate \"Sym {m} {i}\"\n\tdepends on M{m}\n\tselect S{m}_{}\n\thelp\n\t  help text\n\n",
                i + 1
            ));
        }
        k.push_str("endmenu\n");
    }
    std::fs::write(dir.0.join("Kconfig"), k).unwrap();
    let t = std::time::Instant::now();
    let mut st = State::load(Path::new("Kconfig"), &dir.config(), Some(&dir.0)).unwrap();
    eprintln!("load {:?}", t.elapsed());
    st.resize(100, 40);
    let t = std::time::Instant::now();
    st.handle(Key::Down);
    eprintln!("down {:?}", t.elapsed());
    let t = std::time::Instant::now();
    st.handle(Key::Char(' '));
    eprintln!("toggle M0 {:?}", t.elapsed());
    let t = std::time::Instant::now();
    st.handle(Key::Enter);
    eprintln!("enter {:?}", t.elapsed());
    let t = std::time::Instant::now();
    st.handle(Key::Char('m'));
    eprintln!("set m {:?}", t.elapsed());
    let t = std::time::Instant::now();
    let _ = screen(&st);
    eprintln!("render {:?}", t.elapsed());
    st.handle(Key::Char('/'));
    let t = std::time::Instant::now();
    typ(&mut st, "s1");
    eprintln!("search 2 keys {:?}", t.elapsed());
    let t = std::time::Instant::now();
    let _ = screen(&st);
    eprintln!("render search {:?}", t.elapsed());
    st.handle(Key::Esc);
    let t = std::time::Instant::now();
    st.handle(Key::Char('?'));
    eprintln!("help {:?}", t.elapsed());
}

// ----- the Linux kernel's tree -----

/// Linux 6.1's x86 tree (`make test` sets KNLP_LINUX_SRC), loaded with the
/// environment the kernel's Makefile exports and `$(shell,...)` allowed.
fn linux_state(dir: &Scratch) -> Option<State> {
    let src = std::env::var_os("KNLP_LINUX_SRC")?;
    let env: std::collections::HashMap<String, String> = [
        ("srctree", src.to_str().unwrap()),
        ("SRCARCH", "x86"),
        ("ARCH", "x86_64"),
        ("KERNELVERSION", "6.1"),
        ("CC", "gcc"),
        ("LD", "ld"),
        ("PATH", &std::env::var("PATH").unwrap_or_default()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let options = kconfig::LoadOptions { srctree: None, env: kconfig::Env::fixed(env), allow_shell: true };
    let mut st = State::load_with(Path::new("Kconfig"), &dir.config(), &options).unwrap();
    st.resize(120, 40);
    // kconfiglib's sanity warnings about the tree open in a window first.
    assert!(help_text(&st).contains("warning: "));
    st.handle(Key::Esc);
    Some(st)
}

#[test]
fn linux_tree_search_jump_and_help() {
    let dir = Scratch::new();
    let Some(mut st) = linux_state(&dir) else {
        eprintln!("skipped: KNLP_LINUX_SRC is not set (make test sets it)");
        return;
    };
    assert!(screen(&st).contains("Linux/x86_64 6.1 Kernel Configuration"), "{}", screen(&st));
    st.handle(Key::Char('/'));
    typ(&mut st, "usb4");
    let s = screen(&st);
    assert!(s.contains("USB4 [=n] \"Unified support for USB4 and Thunderbolt\""), "{s}");
    // Invisible without PCI: Enter explains why, then shows it greyed out.
    st.handle(Key::Enter);
    let h = help_text(&st);
    assert!(h.contains("CONFIG_USB4: Unified support for USB4 and Thunderbolt"), "{h}");
    assert!(h.contains("Visible: no. It is invisible because:"), "{h}");
    assert!(h.contains("Defined at drivers/thunderbolt/Kconfig"), "{h}");
    st.handle(Key::Esc);
    assert!(st.show_all);
    assert!(st.rows[st.sel].text.contains("Unified support for USB4 and Thunderbolt"));
    assert!(screen(&st).contains("(Top) > Device Drivers"), "{}", screen(&st));
}

/// Timings on the Linux tree for docs/config.md (run by
/// benchmarks/kconfig_linux.sh; not asserted).
#[test]
#[ignore]
fn perf_linux_tree() {
    let dir = Scratch::new();
    let t = std::time::Instant::now();
    let Some(mut st) = linux_state(&dir) else { return };
    let load = t.elapsed();
    st.handle(Key::Char('/'));
    let t = std::time::Instant::now();
    typ(&mut st, "usb");
    let search = t.elapsed() / 3;
    let t = std::time::Instant::now();
    let _ = screen(&st);
    let render = t.elapsed();
    let t = std::time::Instant::now();
    st.handle(Key::Enter);
    let jump = t.elapsed();
    let t = std::time::Instant::now();
    st.handle(Key::Char('?'));
    let help = t.elapsed();
    st.handle(Key::Esc);
    let t = std::time::Instant::now();
    st.handle(Key::Down);
    let down = t.elapsed();
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    println!(
        "{{\"what\": \"menuconfig_linux_x86_64\", \"load_ms\": {:.0}, \"search_key_ms\": {:.1}, \"render_ms\": {:.1}, \"jump_ms\": {:.1}, \"help_ms\": {:.1}, \"down_ms\": {:.1}}}",
        ms(load), ms(search), ms(render), ms(jump), ms(help), ms(down)
    );
}
