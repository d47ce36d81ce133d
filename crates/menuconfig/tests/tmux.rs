//! End to end: the `menuconfig` binary in a real terminal (a detached tmux
//! session). Keys are sent with `tmux send-keys`, the screen is read with
//! `tmux capture-pane -p`; afterwards the saved file and the terminal
//! settings (`stty -a` before and after) are checked.
//!
//! Skipped, with a message, when tmux is not installed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_menuconfig");
const TIMEOUT: Duration = Duration::from_secs(10);

fn tmux_available() -> bool {
    Command::new("tmux").arg("-V").output().map(|o| o.status.success()).unwrap_or(false)
}

/// A private tmux server with one session running a script.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(name: &str, script: &Path) -> Tmux {
        let t = Tmux { socket: format!("menuconfig-test-{}-{}", std::process::id(), name) };
        let cmd = format!("sh {}", script.display());
        let out = t.run(&["new-session", "-d", "-s", "mc", "-x", "100", "-y", "30", &cmd]);
        assert!(out.status.success(), "tmux new-session: {}", String::from_utf8_lossy(&out.stderr));
        // No delay after Escape (the program handles ESC+key anyway).
        t.run(&["set-option", "-g", "escape-time", "0"]);
        t
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .args(["-L", &self.socket, "-f", "/dev/null"])
            .args(args)
            .env_remove("TMUX")
            .output()
            .expect("tmux")
    }

    /// Named keys (`Down`, `Enter`, `Escape`, `C-u`, `Space`, `F12`).
    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "mc"];
        args.extend_from_slice(keys);
        assert!(self.run(&args).status.success());
    }

    /// Literal text.
    fn text(&self, text: &str) {
        assert!(self.run(&["send-keys", "-t", "mc", "-l", text]).status.success());
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "mc"]).stdout).into_owned()
    }

    /// Polls the pane until `pred` holds; panics with the screen after
    /// the timeout.
    fn wait(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let s = self.screen();
            if pred(&s) {
                return s;
            }
            if start.elapsed() > TIMEOUT {
                panic!("timed out waiting for {what}; screen:\n{s}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_for(&self, text: &str) -> String {
        self.wait(text, |s| s.contains(text))
    }

    fn wait_gone(&self, text: &str) -> String {
        self.wait(&format!("{text:?} to go away"), |s| !s.contains(text))
    }

    fn alternate_on(&self) -> String {
        let out = self.run(&["display-message", "-p", "-t", "mc", "#{alternate_on}"]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.run(&["kill-server"]);
    }
}

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("menuconfig-tmux-{}-{}", std::process::id(), name));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("src/sub")).unwrap();
        std::fs::create_dir_all(dir.join("work")).unwrap();
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/basic");
        for f in ["Kconfig", "sub/Kconfig"] {
            std::fs::copy(data.join(f), dir.join("src").join(f)).unwrap();
        }
        Scratch(dir)
    }

    fn work(&self) -> PathBuf {
        self.0.join("work")
    }

    /// A script that records `stty -a`, runs `command`, prints its exit
    /// status, records `stty -a` again and stays alive.
    fn script(&self, command: &str) -> PathBuf {
        let path = self.0.join("run.sh");
        let text = format!(
            "cd '{work}' || exit 1\nstty -a > stty-before.txt\n{command}\necho \"EXIT=$?\"\n\
             stty -a > stty-after.txt\necho DONE\nexec sleep 60\n",
            work = self.work().display()
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.work().join(name)).unwrap_or_default()
    }

    /// The terminal settings after the program are those from before it,
    /// with canonical mode and echo on.
    fn assert_terminal_restored(&self, tmux: &Tmux) {
        let before = self.read("stty-before.txt");
        let after = self.read("stty-after.txt");
        assert!(after.contains(" icanon") && !after.contains("-icanon"), "{after}");
        assert!(after.contains(" echo ") && !after.contains("-echo "), "{after}");
        assert_eq!(before, after, "stty -a differs after the program");
        assert_eq!(tmux.alternate_on(), "0", "still on the alternate screen");
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn edit_search_help_save_and_quit() {
    if !tmux_available() {
        println!("skipping the tmux end-to-end test: tmux is not installed");
        return;
    }
    let dir = Scratch::new("main");
    let script = dir.script(&format!(
        "srctree='{}' KCONFIG_CONFIG=my.config '{}' Kconfig",
        dir.0.join("src").display(),
        BIN
    ));
    let t = Tmux::start("main", &script);

    let s = t.wait_for("Using default symbol values (no 'my.config')");
    assert!(s.contains("my.config - Test Configuration"), "{s}");
    assert!(s.contains("[unsaved changes]"), "{s}");
    assert!(s.contains("[*] Feature A (NEW)"), "{s}");
    assert!(s.contains("Optimizer (Adam)  --->"), "{s}");
    assert_eq!(t.alternate_on(), "1");

    // Toggle a bool twice: its dependent entry disappears and comes back.
    t.keys(&["Down", "Space"]);
    let s = t.wait_for("[ ] Feature A");
    assert!(!s.contains("Extra for feature A"), "{s}");
    t.keys(&["Space"]);
    t.wait_for("[*] Feature A");
    t.wait_for("Extra for feature A");

    // Set a tristate with y.
    t.keys(&["Down", "Down", "y"]);
    t.wait_for("<*> Driver support");

    // Pick a choice member: back in the parent menu with the selection.
    t.keys(&["Down", "Down", "Down", "Down", "Enter"]);
    let s = t.wait_for("(Top) > Optimizer");
    assert!(s.contains("(X) Adam"), "{s}");
    t.keys(&["Down", "Enter"]);
    t.wait_for("Optimizer (Lion)  --->");

    // Save with s.
    t.keys(&["s"]);
    t.wait_for("Configuration saved to 'my.config'");
    t.wait_gone("[unsaved changes]");

    // Edit an int: out of range, error shown in the field, then a valid value.
    t.keys(&["Up", "Enter"]);
    t.wait_for("(Top) > Numbers and strings");
    t.keys(&["Enter"]);
    let s = t.wait_for("Number of workers (int)");
    assert!(s.contains("Range: 1-16"), "{s}");
    t.keys(&["C-u"]);
    t.text("99");
    t.keys(&["Enter"]);
    let s = t.wait_for("99 is outside the range 1-16");
    assert!(s.contains("> 99"), "still editing: {s}");
    t.keys(&["C-u"]);
    t.text("8");
    t.keys(&["Enter"]);
    t.wait_for("(8) Number of workers");
    t.wait_for("[unsaved changes]");
    t.keys(&["Escape"]);
    t.wait_gone("(Top) > Numbers");

    // Search an invisible symbol: the jump explains why it is invisible.
    t.keys(&["/"]);
    t.wait_for("Search symbols and prompts");
    t.text("needs_c");
    t.wait_for("NEEDS_C [=n] \"Needs feature C\"  in (Top)  (invisible)");
    t.keys(&["Enter"]);
    let s = t.wait_for("It is invisible because:");
    assert!(s.contains("it depends on FEATURE_C [=n], which is n"), "{s}");
    t.keys(&["Escape"]);
    t.wait_gone("It is invisible because");

    // Search a visible one and open its help.
    t.keys(&["/"]);
    t.wait_for("Search symbols and prompts");
    t.text("feature a");
    t.wait_for("FEATURE_A [=y] \"Feature A\"  in (Top)");
    t.keys(&["Enter"]);
    t.wait_gone("Search symbols and prompts");
    t.keys(&["?"]);
    let s = t.wait_for("Feature A enables the fast path.");
    assert!(s.contains("Type  : bool"), "{s}");
    assert!(s.contains("Selects:"), "{s}");
    assert!(s.contains("Defined at Kconfig:8"), "{s}");
    t.keys(&["Escape"]);
    t.wait_gone("Feature A enables");

    // Quit: prompted about the unsaved change; cancel, then save.
    t.keys(&["q"]);
    t.wait_for("Save changes? (y/n/c)");
    t.keys(&["c"]);
    t.wait_gone("Save changes?");
    t.keys(&["C-c"]);
    t.wait_for("Save changes? (y/n/c)");
    t.keys(&["y"]);
    let s = t.wait_for("DONE");
    assert!(s.contains("Configuration saved to 'my.config'"), "{s}");
    assert!(s.contains("EXIT=0"), "{s}");
    assert!(!s.contains("Test Configuration"), "the menu screen is gone: {s}");
    dir.assert_terminal_restored(&t);

    // The file is what the engine writes for the same values.
    let mut kc = kconfig::Kconfig::load(Path::new("Kconfig"), Some(&dir.0.join("src"))).unwrap();
    for (name, value) in [("DRIVER", "y"), ("OPT_LION", "y"), ("COUNT", "8")] {
        kc.set_value(name, value).unwrap();
    }
    let saved = dir.read("my.config");
    assert_eq!(saved, kc.config_text());
    assert!(saved.contains("CONFIG_COUNT=8\n") && saved.contains("CONFIG_OPT_LION=y\n"), "{saved}");
    assert!(!dir.read("my.config.old").is_empty(), "the first save is kept as .old");
}

#[test]
fn terminal_restored_on_signals_and_panic() {
    if !tmux_available() {
        println!("skipping the tmux end-to-end test: tmux is not installed");
        return;
    }
    // SIGTERM and SIGINT (from outside: Ctrl-C is a key in raw mode): the
    // program leaves cleanly, nothing saved.
    for (sig, code) in [("TERM", 143), ("INT", 130)] {
        let dir = Scratch::new(&format!("signal-{sig}"));
        let script = dir.script(&format!(
            "srctree='{}' sh -c 'echo $$ > pid; exec \"$0\" Kconfig' '{}'",
            dir.0.join("src").display(),
            BIN
        ));
        let t = Tmux::start(&format!("signal-{sig}"), &script);
        t.wait_for("Test Configuration");
        t.keys(&["Down", "Space"]);
        t.wait_for("[ ] Feature A");
        let pid = dir.read("pid").trim().to_string();
        assert!(Command::new("kill").args([&format!("-{sig}"), &pid]).status().unwrap().success());
        let s = t.wait_for("DONE");
        assert!(s.contains(&format!("EXIT={code}")), "{s}");
        assert!(
            s.contains(&format!("terminated by signal {}; unsaved changes were discarded", code - 128)),
            "{s}"
        );
        assert!(!dir.work().join(".config").exists());
        dir.assert_terminal_restored(&t);
    }

    // A panic: the hook restores the terminal before the message.
    let dir = Scratch::new("panic");
    let script = dir.script(&format!(
        "MENUCONFIG_TEST_PANIC_KEY=1 srctree='{}' '{}' Kconfig",
        dir.0.join("src").display(),
        BIN
    ));
    let t = Tmux::start("panic", &script);
    t.wait_for("Test Configuration");
    t.keys(&["F12"]);
    let s = t.wait_for("DONE");
    assert!(s.contains("test panic requested with F12"), "{s}");
    assert!(s.contains("menuconfig: internal error"), "{s}");
    assert!(s.contains("EXIT=1"), "{s}");
    dir.assert_terminal_restored(&t);
}

#[test]
fn refuses_without_a_terminal_and_reports_load_errors() {
    let dir = Scratch::new("noterm");
    let out = Command::new(BIN)
        .arg("Kconfig")
        .env("srctree", dir.0.join("src"))
        .current_dir(dir.work())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("menuconfig needs a terminal"), "{err}");

    let out = Command::new(BIN).arg("Missing").current_dir(dir.work()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("menuconfig: Missing:0: could not open"), "{err}");

    let out = Command::new(BIN).arg("--nope").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("usage: menuconfig [-h] [--allow-shell] [kconfig]")
    );
}

#[test]
fn exits_when_the_terminal_hangs_up() {
    if !tmux_available() {
        println!("skipping the tmux end-to-end test: tmux is not installed");
        return;
    }
    // Closing the terminal (here: killing the tmux server) must end the
    // program; it must not spin on a dead terminal.
    let dir = Scratch::new("hangup");
    let script = dir.script(&format!(
        "srctree='{}' sh -c 'echo $$ > pid; exec \"$0\" Kconfig' '{}'",
        dir.0.join("src").display(),
        BIN
    ));
    let t = Tmux::start("hangup", &script);
    t.wait_for("Test Configuration");
    let pid = dir.read("pid").trim().to_string();
    t.run(&["kill-server"]);
    let start = Instant::now();
    let alive = |p: &str| {
        Path::new(&format!("/proc/{p}")).exists()
            && !std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default().contains(") Z")
    };
    while alive(&pid) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "menuconfig still running 5 s after its terminal hung up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
