//! Unit tests of Kconfig semantics: expressions, tristate arithmetic,
//! choices, select/imply, ranges, strings, errors and the query API.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use kconfig::{
    escape, unescape, Env, ErrorKind, Kconfig, KconfigError, LoadOptions, NodeKind, Tristate, Value,
};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn scratch_root() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() && std::fs::metadata(shm).map(|m| !m.permissions().readonly()).unwrap_or(false) {
        return shm.to_path_buf();
    }
    std::env::temp_dir()
}

/// A fresh directory holding `files`.
fn tree(files: &[(&str, &str)]) -> PathBuf {
    let dir = scratch_root().join(format!(
        "kconfig-sem-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    for (name, text) in files {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    dir
}

fn try_load_env(files: &[(&str, &str)], env: &[(&str, &str)]) -> Result<Kconfig, KconfigError> {
    let dir = tree(files);
    let env = Env::fixed(env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>());
    let r = Kconfig::load_with(
        Path::new("Kconfig"),
        &LoadOptions { srctree: Some(dir.clone()), env, ..Default::default() },
    );
    let _ = std::fs::remove_dir_all(&dir);
    r
}

fn load(text: &str) -> Kconfig {
    try_load_env(&[("Kconfig", text)], &[]).unwrap_or_else(|e| panic!("{}", e))
}

fn val(kc: &Kconfig, name: &str) -> String {
    kc.symbol(name).unwrap_or_else(|| panic!("no symbol {}", name)).str_value()
}

fn load_config_text(kc: &mut Kconfig, text: &str) -> kconfig::ConfigLoad {
    let dir = tree(&[(".config", text)]);
    let r = kc.load_config(&dir.join(".config")).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    r
}

const MODULES: &str = "config MODULES\n\tbool \"modules\"\n\toption modules\n\tdefault y\n";

#[test]
fn expressions() {
    let kc = load(
        r#"
config A
	def_bool y
config B
	bool "b"
config N
	def_int 10
config H
	def_hex 0x1f
config S
	def_string "abc"
config E_AND
	def_bool A && !B
config E_OR
	def_bool B || A
config E_NOT
	def_bool !(A && B)
config E_NUM
	def_bool N > 9 && N <= 10 && N >= 10 && N < 11
config E_HEX
	def_bool H = 31
config E_STRCMP
	def_bool S < "abd"
config E_QUOTED_NUM
	def_bool N = "10"
config E_NE
	def_bool S != "abc"
config E_UNDEF
	def_bool UNDEFINED_SYM
config E_UNDEF_NAME
	def_bool UNDEFINED_SYM = "UNDEFINED_SYM"
config E_PAREN
	def_bool (A || B) && (B || !B)
"#,
    );
    for (name, want) in [
        ("E_AND", "y"),
        ("E_OR", "y"),
        ("E_NOT", "y"),
        ("E_NUM", "y"),
        ("E_HEX", "y"),
        ("E_STRCMP", "y"),
        ("E_QUOTED_NUM", "y"),
        ("E_NE", "n"),
        ("E_UNDEF", "n"),
        ("E_UNDEF_NAME", "y"),
        ("E_PAREN", "y"),
    ] {
        assert_eq!(val(&kc, name), want, "{}", name);
    }
}

#[test]
fn eval_string_uses_current_values() {
    let mut kc = load("config A\n\tbool \"a\"\nconfig N\n\tint \"n\"\n\tdefault 3\n");
    assert_eq!(kc.eval_string("!A && N = 3").unwrap(), Tristate::Y);
    kc.set_value("A", "y").unwrap();
    assert_eq!(kc.eval_string("A || N > 5").unwrap(), Tristate::Y);
    assert_eq!(kc.eval_string("N > 5").unwrap(), Tristate::N);
    // m means "m && MODULES": n without modules.
    assert_eq!(kc.eval_string("m").unwrap(), Tristate::N);
    let e = kc.eval_string("A &&").unwrap_err();
    assert!(e.to_string().starts_with("<expression>:1: "), "{}", e);
    // Unknown names are not added to the configuration.
    let _ = kc.eval_string("NOT_A_SYMBOL").unwrap();
    assert!(kc.symbol("NOT_A_SYMBOL").is_none());
}

#[test]
fn tristate_arithmetic() {
    let text = format!(
        "{}{}",
        MODULES,
        r#"
config M1
	tristate "m1"
	default m
config T_AND
	def_tristate M1 && y
config T_OR
	def_tristate M1 || n
config T_NOT
	def_tristate !M1
config T_NOT_Y
	def_tristate !y
config T_MAX
	def_tristate M1 || y
config BOOL_M
	bool "promoted"
	default m
config DEP_M
	tristate "depends on m"
	depends on M1
	default y
"#
    );
    let mut kc = load(&text);
    assert_eq!(val(&kc, "M1"), "m");
    assert_eq!(val(&kc, "T_AND"), "m");
    assert_eq!(val(&kc, "T_OR"), "m");
    assert_eq!(val(&kc, "T_NOT"), "m");
    assert_eq!(val(&kc, "T_NOT_Y"), "n");
    assert_eq!(val(&kc, "T_MAX"), "y");
    assert_eq!(val(&kc, "BOOL_M"), "y", "m is promoted to y for bool");
    assert_eq!(val(&kc, "DEP_M"), "m", "value limited by the dependency");
    assert_eq!(kc.symbol("DEP_M").unwrap().assignable(), vec![Tristate::N, Tristate::M]);

    // Without modules, tristates act as bools.
    kc.set_value("MODULES", "n").unwrap();
    assert_eq!(val(&kc, "M1"), "y");
    assert_eq!(kc.symbol("M1").unwrap().symbol_type(), kconfig::SymbolType::Bool);
    assert_eq!(kc.symbol("M1").unwrap().orig_type(), kconfig::SymbolType::Tristate);
    assert_eq!(val(&kc, "T_NOT"), "n");
    assert!(kc.set_value("M1", "m").is_err(), "m is not a value once modules are off");
}

#[test]
fn choices_follow_kconfig_rules() {
    let mut kc = load(
        r#"
config FOO
	bool "foo"
	default y
choice
	prompt "c"
	default C_B if FOO
	default C_C
config C_A
	bool "a"
config C_B
	bool "b"
	depends on FOO
config C_C
	bool "c"
endchoice
choice
	prompt "optional"
	optional
config O_A
	bool "oa"
endchoice
choice
	prompt "no default"
config F_A
	bool "fa"
	depends on !FOO
config F_B
	bool "fb"
endchoice
"#,
    );
    // Default selection, then the first visible symbol.
    assert_eq!(val(&kc, "C_B"), "y");
    assert_eq!(val(&kc, "C_A"), "n");
    assert_eq!(val(&kc, "F_B"), "y", "first visible member when F_A is invisible");
    assert_eq!(val(&kc, "O_A"), "n", "optional choices start in n mode");
    // The user's selection wins while visible.
    kc.set_value("C_A", "y").unwrap();
    assert_eq!(val(&kc, "C_A"), "y");
    assert_eq!(val(&kc, "C_B"), "n");
    let ch = kc.symbol("C_A").unwrap().choice().unwrap();
    assert_eq!(ch.selection().unwrap().name(), "C_A");
    assert_eq!(ch.mode(), Tristate::Y);
    // An invisible user selection falls back to the defaults.
    kc.set_value("C_B", "y").unwrap();
    kc.set_value("FOO", "n").unwrap();
    assert_eq!(val(&kc, "C_B"), "n");
    assert_eq!(val(&kc, "C_C"), "y", "second default");
    assert_eq!(val(&kc, "F_A"), "y", "F_A became visible and is first");
    // An optional choice is off until its mode is set (as in kconfiglib's
    // setconfig; a .config assignment of a member sets the mode too).
    assert!(kc.set_value("O_A", "y").is_err());
    let opt = kc.choices().find(|c| c.is_optional()).unwrap().index();
    assert!(kc.set_choice_mode(opt, Tristate::Y));
    assert_eq!(val(&kc, "O_A"), "y");
    load_config_text(&mut kc, "CONFIG_O_A=y\n");
    assert_eq!(val(&kc, "O_A"), "y");
    // Choice members cannot be set to n directly in y mode.
    assert!(kc.set_value("O_A", "n").is_err());
}

#[test]
fn tristate_choice_in_m_mode() {
    let text = format!(
        "{}{}",
        MODULES,
        r#"
choice
	tristate "t"
config T_A
	tristate "a"
config T_B
	tristate "b"
config T_BOOL
	bool "bool member"
endchoice
"#
    );
    let mut kc = load(&text);
    let mode = |kc: &Kconfig| kc.choices().next().unwrap().mode();
    assert_eq!(mode(&kc), Tristate::M, "non-optional tristate choices start in m mode");
    assert_eq!(val(&kc, "T_A"), "n");
    assert_eq!(kc.symbol("T_BOOL").unwrap().visibility(), Tristate::N, "bool members only in y mode");
    load_config_text(&mut kc, "CONFIG_T_A=m\nCONFIG_T_B=m\n");
    assert_eq!((val(&kc, "T_A"), val(&kc, "T_B")), ("m".to_string(), "m".to_string()));
    let l = load_config_text(&mut kc, "CONFIG_T_A=y\nCONFIG_T_B=m\n");
    assert!(l.warnings.iter().any(|w| w.message.contains("both m and y assigned")), "{:?}", l.warnings);
    load_config_text(&mut kc, "CONFIG_T_B=y\n");
    assert_eq!(mode(&kc), Tristate::Y);
    assert_eq!((val(&kc, "T_A"), val(&kc, "T_B")), ("n".to_string(), "y".to_string()));
}

#[test]
fn select_and_imply() {
    let text = format!(
        "{}{}",
        MODULES,
        r#"
config DEP
	bool "dep"
config TARGET
	bool "target"
	depends on DEP
config SELECTOR
	bool "selector"
	default y
	select TARGET
	imply WEAK
	imply WEAK_UNMET
config WEAK
	tristate "weak"
config WEAK_UNMET
	bool "weak unmet"
	depends on DEP
config TRI_SEL
	tristate "tri sel"
	default m
	select TRI_TGT
config TRI_TGT
	tristate "tri tgt"
"#
    );
    let mut kc = load(&text);
    assert_eq!(val(&kc, "TARGET"), "y", "select ignores unmet dependencies");
    let w: Vec<String> = kc.take_warnings().iter().map(|w| w.to_string()).collect();
    assert!(
        w.iter().any(|w| w.contains(
            "TARGET (defined at Kconfig:8) has direct dependencies DEP with value n, but is currently being \
             y-selected by the following symbols:\n - SELECTOR (defined at Kconfig:11), with value y"
        )),
        "{:#?}",
        w
    );
    assert_eq!(val(&kc, "WEAK"), "y", "imply acts as a default");
    assert_eq!(val(&kc, "WEAK_UNMET"), "n", "imply respects dependencies");
    // The user can lower an implied symbol, not a selected one.
    kc.set_value("WEAK", "n").unwrap();
    assert!(kc.set_value("TARGET", "n").is_err());
    assert_eq!(kc.symbol("TARGET").unwrap().assignable(), Vec::<Tristate>::new(), "invisible: deps unmet");
    kc.set_value("DEP", "y").unwrap();
    assert_eq!(kc.symbol("TARGET").unwrap().assignable(), vec![Tristate::Y], "locked by select");
    // A select from an m symbol gives at least m.
    assert_eq!(val(&kc, "TRI_TGT"), "m");
    assert_eq!(kc.symbol("TRI_TGT").unwrap().assignable(), vec![Tristate::M, Tristate::Y]);
    let by = kc.symbol("TRI_TGT").unwrap().selected_by();
    assert_eq!(by.len(), 1);
    assert_eq!(by[0].value, "TRI_SEL");
}

#[test]
fn ranges_clamp_and_fall_back() {
    let mut kc = load(
        r#"
config SMALL
	bool "small"
config I
	int "i"
	range 1 5 if SMALL
	range 1 100
	default 50
config H
	hex "h"
	range 0x10 0x20
	default 0x40
config NODEF
	int "no default"
	range 10 20
"#,
    );
    assert_eq!(val(&kc, "I"), "50");
    assert_eq!(val(&kc, "H"), "0x20", "default clamped, written in hex");
    assert_eq!(val(&kc, "NODEF"), "10", "clamped even without a default");
    kc.set_value("SMALL", "y").unwrap();
    assert_eq!(val(&kc, "I"), "5", "default clamped by the active range");
    let e = kc.set_value("I", "7").unwrap_err();
    assert_eq!(e.kind, ErrorKind::ValueNotTaken);
    assert!(
        e.to_string().starts_with("Kconfig:4: I was assigned the value '7', but got the value '5'"),
        "{}",
        e
    );
    assert_eq!(kc.symbol("I").unwrap().user_value(), None, "a failed set changes nothing");
    kc.set_value("I", "3").unwrap();
    assert_eq!(kc.symbol("I").unwrap().value(), Value::Int(Some(3)));
    // Out-of-range values in .config fall back on the default with a warning.
    let l = load_config_text(&mut kc, "CONFIG_SMALL=y\nCONFIG_I=9\nCONFIG_H=0x18\n");
    assert!(l.warnings.is_empty());
    assert_eq!(val(&kc, "I"), "5");
    let w: Vec<String> = kc.take_warnings().iter().map(|w| w.to_string()).collect();
    assert!(w.iter().any(|w| w.contains("user value 9 on the int symbol I")), "{:?}", w);
    assert_eq!(val(&kc, "H"), "0x18");
    assert_eq!(kc.set_value("I", "x").unwrap_err().kind, ErrorKind::InvalidValue);
    assert_eq!(kc.set_value("H", "-0x1").unwrap_err().kind, ErrorKind::InvalidValue);
    assert_eq!(kc.set_value("NOPE", "1").unwrap_err().kind, ErrorKind::UnknownSymbol);
}

#[test]
fn strings_escape_round_trip() {
    assert_eq!(escape(r#"a "b" \c"#), r#"a \"b\" \\c"#);
    assert_eq!(unescape(r#"a \"b\" \\c \x"#), r#"a "b" \c x"#);
    let mut kc = load("config S\n\tstring \"s\"\n\tdefault \"d\\\"q\\\\\"\n");
    assert_eq!(val(&kc, "S"), "d\"q\\");
    let tricky = "quote \" backslash \\ tab\t end\\";
    kc.set_value("S", tricky).unwrap();
    let text = kc.config_text();
    assert!(text.contains(r#"CONFIG_S="quote \" backslash \\ tab	 end\\""#), "{}", text);
    let mut kc2 = load("config S\n\tstring \"s\"\n");
    load_config_text(&mut kc2, &text);
    assert_eq!(val(&kc2, "S"), tricky);
}

#[test]
fn config_reader_warns_with_locations() {
    let mut kc = load("config B\n\tbool \"b\"\nconfig S\n\tstring \"s\"\nconfig I\n\tint \"i\"\n");
    let l = load_config_text(
        &mut kc,
        "CONFIG_B=maybe\nCONFIG_S=unquoted\ngarbage\nCONFIG_UNKNOWN=y\nCONFIG_I=abc\nCONFIG_B=y\nCONFIG_B=n\n",
    );
    let w: Vec<String> = l.warnings.iter().map(|w| w.to_string()).collect();
    let has = |s: &str| w.iter().any(|x| x.contains(s));
    assert!(has(".config:1: warning: 'maybe' is not a valid value for the bool symbol B"), "{:#?}", w);
    assert!(has(".config:2: warning: malformed string literal in assignment to S"), "{:#?}", w);
    assert!(has(".config:3: warning: ignoring malformed line 'garbage'"), "{:#?}", w);
    assert!(
        has(".config:4: warning: attempt to assign the value 'y' to the undefined symbol UNKNOWN"),
        "{:#?}",
        w
    );
    assert!(has("the value 'abc' is invalid for I"), "{:#?}", w);
    assert!(has(".config:7: warning: B (defined at Kconfig:1) set more than once."), "{:#?}", w);
    assert_eq!(val(&kc, "B"), "n", "last assignment wins");
    assert_eq!(kc.missing_symbols(), &[("UNKNOWN".to_string(), "y".to_string())]);
}

#[test]
fn write_and_minimal_config() {
    let mut kc = load(
        r#"
mainmenu "Test"
menu "Menu"
config A
	bool "a"
	default y
config B
	int "b"
	default 4
comment "note"
endmenu
config C
	bool "c"
"#,
    );
    assert_eq!(kc.mainmenu_text(), "Test");
    assert_eq!(
        kc.config_text(),
        "\n#\n# Menu\n#\nCONFIG_A=y\nCONFIG_B=4\n\n#\n# note\n#\n# end of Menu\n\n# CONFIG_C is not set\n"
    );
    assert_eq!(kc.min_config_text(), "");
    kc.set_value("B", "5").unwrap();
    kc.set_value("C", "y").unwrap();
    assert_eq!(kc.min_config_text(), "CONFIG_B=5\nCONFIG_C=y\n");
    let new: Vec<String> = kc.list_new_config().into_iter().map(|e| e.line).collect();
    assert_eq!(new, vec!["CONFIG_A=y"]);

    let dir = tree(&[]);
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(".config");
    assert_eq!(kc.write_config(&p).unwrap(), format!("Configuration saved to '{}'", p.display()));
    assert_eq!(kc.write_config(&p).unwrap(), format!("No change to configuration in '{}'", p.display()));
    kc.set_value("C", "n").unwrap();
    kc.write_config(&p).unwrap();
    assert!(dir.join(".config.old").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn help_text_follows_indentation() {
    let kc = load(
        "config A\n\tbool \"a\"\n\thelp\n\t  First line.\n\n\t    Indented.\n\t  Last.\nconfig B\n\tbool\n",
    );
    assert_eq!(kc.symbol("A").unwrap().help(), Some("First line.\n\n  Indented.\nLast."));
    assert!(kc.symbol("B").unwrap().is_defined());
    assert_eq!(kc.symbol("B").unwrap().locations()[0].line, 8);
}

#[test]
fn menu_tree_for_interfaces() {
    let kc = load(
        r#"
config SHOW
	bool "show"
menu "Top menu"
	visible if SHOW
config P
	bool "parent"
config CHILD
	bool "child"
	depends on P
endmenu
choice
	prompt "pick"
config X
	bool "x"
endchoice
comment "hello"
"#,
    );
    let top = kc.top_node();
    assert!(top.is_top());
    let kids = top.children();
    let kinds: Vec<NodeKind> = kids.iter().map(|n| n.kind()).collect();
    assert_eq!(kinds, vec![NodeKind::Symbol, NodeKind::Menu, NodeKind::Choice, NodeKind::Comment]);
    let menu = kids[1];
    assert_eq!(menu.prompt(), Some("Top menu"));
    assert_eq!(menu.visible_if().as_deref(), Some("SHOW"));
    assert!(!menu.is_visible());
    assert_eq!(menu.depth(), 1);
    let inner = menu.children();
    assert_eq!(inner.len(), 1, "CHILD is in P's implicit submenu");
    let p = inner[0];
    assert_eq!(p.symbol().unwrap().name(), "P");
    let child = p.children()[0];
    assert_eq!(child.symbol().unwrap().name(), "CHILD");
    assert_eq!(child.depth(), 3);
    assert_eq!(child.parent().unwrap().symbol().unwrap().name(), "P");
    assert_eq!(child.dependencies(), "P");
    assert_eq!(kids[2].choice().unwrap().symbols()[0].name(), "X");
    assert_eq!(kc.menu_nodes().count(), 7);
    let sym = kc.symbol("CHILD").unwrap();
    assert_eq!(sym.prompt(), Some("child"));
    assert_eq!(sym.direct_deps(), "P");
    // The menu's `visible if` shows up as a prompt condition, as in kconfiglib.
    assert_eq!(sym.definition(), "config CHILD\n\tbool \"child\" if SHOW\n\tdepends on P");
}

fn load_err(files: &[(&str, &str)]) -> KconfigError {
    match try_load_env(files, &[("VAR", "x")]) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

#[test]
fn errors_name_file_and_line() {
    let e = load_err(&[("Kconfig", "config A\n\tbool \"a\"\n\tdepends on (A\n")]);
    assert_eq!(e.to_string(), "Kconfig:3: error: couldn't parse 'depends on (A': malformed expression");
    let e = load_err(&[("Kconfig", "if A\nconfig B\n\tbool\n")]);
    assert_eq!(e.to_string(), "Kconfig:3: error: expected 'endif' at end of 'Kconfig'");
    let e = load_err(&[("Kconfig", "source \"sub/Kconfig\"\n"), ("sub/Kconfig", "\n\nconfig\n")]);
    assert_eq!(e.to_string(), "sub/Kconfig:3: error: couldn't parse 'config': missing or bad symbol name");
    let e = load_err(&[("Kconfig", "\nsource \"missing/Kconfig\"\n")]);
    assert!(e.to_string().starts_with("Kconfig:2: 'missing/Kconfig' not found"), "{}", e);
    let e = load_err(&[("Kconfig", "source \"Kconfig\"\n")]);
    assert!(e.to_string().starts_with("Kconfig:1: recursive 'source' of 'Kconfig' detected"), "{}", e);
    let e = load_err(&[("Kconfig", "config A\n\tbool \"a\"\n\toption bogus\n")]);
    assert_eq!(e.to_string(), "Kconfig:3: error: couldn't parse 'option bogus': unrecognized option");
    let e = load_err(&[("Kconfig", "config A\n\tbool\n\tdepends on B\nconfig B\n\tbool\n\tdepends on A\n")]);
    assert_eq!(e.kind, ErrorKind::Parse);
    assert!(e.to_string().starts_with("Kconfig:1: Dependency loop"), "{}", e);
    let dir = tree(&[("Kconfig", "")]);
    std::fs::write(dir.join("Kconfig"), b"config A\n\tbool \"\xff\"\n").unwrap();
    let opts =
        LoadOptions { srctree: Some(dir.clone()), env: Env::fixed(HashMap::new()), ..Default::default() };
    let e = Kconfig::load_with(Path::new("Kconfig"), &opts).unwrap_err();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(e.kind, ErrorKind::Encoding);
    assert_eq!(e.line, 2);
    let e = try_load_env(&[("Other", "")], &[]).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Io);
    assert!(e.to_string().starts_with("Kconfig:0: could not open"), "{}", e);
}

fn load_shell(text: &str, env: &[(&str, &str)]) -> Result<Kconfig, KconfigError> {
    let dir = tree(&[("Kconfig", text)]);
    let env = Env::fixed(env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>());
    let opts = LoadOptions { srctree: Some(dir.clone()), env, allow_shell: true };
    let r = Kconfig::load_with(Path::new("Kconfig"), &opts);
    let _ = std::fs::remove_dir_all(&dir);
    r
}

#[test]
fn shell_needs_the_opt_in() {
    let text = "config A\n\tstring \"a\"\n\tdefault \"$(shell,printf 'x\\ny\\n\\n')\"\n";
    let e = load_err(&[("Kconfig", text)]);
    assert_eq!(e.kind, ErrorKind::Preprocessor);
    assert_eq!(
        e.to_string(),
        "Kconfig:3: $(shell,...) is not allowed: running commands needs --allow-shell (or KCONFIG_ALLOW_SHELL=1)"
    );
    // Trailing newlines dropped, inner ones become spaces (Linux's do_shell).
    let kc = load_shell(text, &[]).unwrap();
    assert_eq!(val(&kc, "A"), "x y");
    let kc = try_load_env(&[("Kconfig", text)], &[("KCONFIG_ALLOW_SHELL", "1")]).unwrap();
    assert_eq!(val(&kc, "A"), "x y");
    // The command sees the fixed environment, nothing else.
    let kc = load_shell("config A\n\tstring \"a\"\n\tdefault \"$(shell,echo $FOO$HOME)\"\n", &[("FOO", "f")])
        .unwrap();
    assert_eq!(val(&kc, "A"), "f");
}

#[test]
fn preprocessor_functions_as_in_linux() {
    // scripts/Kconfig.include's own definitions, called with arguments.
    let include = "if-success = $(shell,{ $(1); } >/dev/null 2>&1 && echo \"$(2)\" || echo \"$(3)\")\n\
                   success = $(if-success,$(1),y,n)\nfailure = $(if-success,$(1),n,y)\n\
                   comma := ,\n";
    let text = format!(
        "{}$(error-if,$(failure,true),never)\nconfig T\n\tdef_bool $(success,true)\nconfig F\n\tdef_bool $(success,false)\n\
         config W\n\tstring\n\tdefault \"$(filename):$(lineno) $(if,$(comma),yes,no)$(if,,yes,no)$(if,,x)\"\n$(info,hello)\n$(warning-if,n,never)\n",
        include
    );
    let kc = load_shell(&text, &[]).unwrap();
    assert_eq!(val(&kc, "T"), "y");
    assert_eq!(val(&kc, "F"), "n");
    assert_eq!(val(&kc, "W"), "Kconfig:12 yesno");
    let e =
        load_shell(&format!("{}\n$(error-if,$(success,true),Sorry$(comma) no)\n", include), &[]).unwrap_err();
    assert_eq!(e.to_string(), "Kconfig:6: Sorry, no");
    let e = load_shell("$(error-if,y)\n", &[]).unwrap_err();
    assert_eq!(e.to_string(), "Kconfig:1: bad number of arguments in call to error-if, expected 2, got 1");
    let e = load_shell("f = $(f,$(1))\nX := $(f,a)\n", &[]).unwrap_err();
    assert!(e.to_string().contains("Preprocessor function f seems stuck in infinite recursion"), "{}", e);
    let e = load_err(&[("Kconfig", "A = $(A)\nB := $(A)\n")]);
    assert!(e.to_string().contains("Preprocessor variable A recursively references itself"), "{}", e);
}

#[test]
fn preprocessor_variables() {
    let kc = try_load_env(
        &[(
            "Kconfig",
            "P := pre\nQ = $(P)-$(VAR)\nQ += more\nconfig $(P)_SYM\n\tstring \"$(Q)\"\n\tdefault \"$(Q)|$(UNSET)\"\n",
        )],
        &[("VAR", "env")],
    )
    .unwrap();
    let s = kc.symbol("pre_SYM").unwrap();
    assert_eq!(s.prompt(), Some("pre-env more"));
    assert_eq!(s.str_value(), "pre-env more|");
    assert_eq!(kc.env_vars(), vec!["VAR".to_string()]);
}

#[test]
fn all_config_operations() {
    let text = format!(
        "{}{}",
        MODULES,
        r#"
config A
	bool "a"
	default y
config T
	tristate "t"
config FORCED
	bool "forced"
	option allnoconfig_y
choice
	prompt "c"
	default C_B
config C_A
	bool "c a"
config C_B
	bool "c b"
endchoice
"#
    );
    let mut kc = load(&text);
    kc.all_no();
    assert_eq!((val(&kc, "A"), val(&kc, "T"), val(&kc, "FORCED")), ("n".into(), "n".into(), "y".into()));
    assert_eq!(val(&kc, "C_B"), "y", "choices keep their default selection");
    kc.all_yes();
    assert_eq!((val(&kc, "A"), val(&kc, "T")), ("y".into(), "y".into()));
    kc.all_mod();
    assert_eq!((val(&kc, "A"), val(&kc, "T")), ("y".into(), "m".into()));
    kc.all_defconfig();
    assert_eq!((val(&kc, "A"), val(&kc, "T"), val(&kc, "FORCED")), ("y".into(), "n".into(), "n".into()));
}

#[test]
fn kconfig_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<Kconfig>();
}

#[test]
fn modules_attribute() {
    // `option modules` and the newer bare `modules` both mark MODULES; only
    // the symbol named MODULES can be the modules symbol (as in kconfiglib).
    let kc = load(
        "config MODULES\n\tbool \"m\"\n\tmodules\n\tdefault y\nconfig T\n\ttristate \"t\"\n\tdefault m\n",
    );
    assert!(kc.symbol("MODULES").unwrap().is_modules());
    assert_eq!(val(&kc, "T"), "m");
    assert!(kc.take_warnings().is_empty());
    let kc =
        load("config MY_MODULES\n\tbool \"m\"\n\toption modules\nconfig T\n\ttristate \"t\"\n\tdefault m\n");
    assert_eq!(val(&kc, "T"), "y", "no MODULES symbol: tristates act as bool");
    assert!(kc.take_warnings()[0].message.starts_with("the 'modules' option is not supported"));
}
