//! The terminal driver: raw mode and alternate screen, restored on every
//! way out (normal exit, error, panic, SIGTERM/SIGHUP/SIGINT/SIGQUIT).

use std::io::{self, IsTerminal, Stdout, Write};
use std::panic::{self, PanicHookInfo};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use crossterm::{cursor, execute, terminal};
use ratatui::backend::CrosstermBackend;
use ratatui::Terminal;

use crate::state::{Action, Key, State};
use crate::{Error, Outcome};

/// Whether this process has the terminal in raw mode / alternate screen.
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// Leaves raw mode and the alternate screen and shows the cursor. Safe to
/// call at any time and more than once.
pub(crate) fn restore_terminal() {
    if ACTIVE.swap(false, Ordering::SeqCst) {
        let _ = terminal::disable_raw_mode();
        let mut out = io::stdout();
        let _ = execute!(out, terminal::LeaveAlternateScreen, cursor::Show);
        let _ = out.flush();
    }
}

type Hook = Arc<dyn Fn(&PanicHookInfo<'_>) + Send + Sync + 'static>;

/// Owns the terminal set-up; dropping it restores the terminal and the
/// previous panic hook.
struct Guard {
    previous_hook: Option<Hook>,
}

impl Guard {
    fn enter() -> io::Result<Guard> {
        // The hook restores the terminal before the panic message is
        // printed, so the message lands on the normal screen.
        let previous: Hook = Arc::from(panic::take_hook());
        let chained = previous.clone();
        panic::set_hook(Box::new(move |info| {
            restore_terminal();
            chained(info);
        }));
        let guard = Guard { previous_hook: Some(previous) };
        ACTIVE.store(true, Ordering::SeqCst);
        terminal::enable_raw_mode()?;
        execute!(io::stdout(), terminal::EnterAlternateScreen, cursor::Hide)?;
        Ok(guard)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        restore_terminal();
        // Hooks cannot be changed while panicking; the chained hook stays
        // and is harmless (restoring twice does nothing).
        if !std::thread::panicking() {
            if let Some(prev) = self.previous_hook.take() {
                let _ = panic::take_hook();
                panic::set_hook(Box::new(move |info| prev(info)));
            }
        }
    }
}

/// Termination signals (SIGTERM, SIGHUP, SIGINT, SIGQUIT) while the
/// interface runs: caught so that the loop can restore the terminal and
/// exit; the previous dispositions are put back afterwards. Signals that
/// were ignored (e.g. SIGHUP under `nohup`) stay ignored.
#[cfg(unix)]
mod signals {
    use std::sync::atomic::{AtomicI32, Ordering};

    static RECEIVED: AtomicI32 = AtomicI32::new(0);
    const CAUGHT: [libc::c_int; 4] = [libc::SIGTERM, libc::SIGHUP, libc::SIGINT, libc::SIGQUIT];

    extern "C" fn on_signal(sig: libc::c_int) {
        // Async-signal-safe: one atomic store.
        RECEIVED.store(sig, Ordering::SeqCst);
    }

    /// Restores the previous handlers when dropped.
    pub(crate) struct Caught {
        previous: Vec<(libc::c_int, libc::sigaction)>,
    }

    pub(crate) fn catch() -> Caught {
        RECEIVED.store(0, Ordering::SeqCst);
        let mut previous = Vec::new();
        for sig in CAUGHT {
            // SAFETY: plain sigaction calls with zero-initialised structs
            // (valid for `sigaction`); the handler only stores an atomic.
            unsafe {
                let mut prev: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut prev) != 0
                    || prev.sa_sigaction == libc::SIG_IGN
                {
                    continue;
                }
                let mut act: libc::sigaction = std::mem::zeroed();
                act.sa_sigaction = on_signal as *const () as libc::sighandler_t;
                libc::sigemptyset(&mut act.sa_mask);
                act.sa_flags = libc::SA_RESTART;
                if libc::sigaction(sig, &act, &mut prev) == 0 {
                    previous.push((sig, prev));
                }
            }
        }
        Caught { previous }
    }

    /// The signal received since [`catch`], if any (0: none).
    pub(crate) fn take() -> i32 {
        RECEIVED.swap(0, Ordering::SeqCst)
    }

    impl Drop for Caught {
        fn drop(&mut self) {
            for (sig, prev) in &self.previous {
                // SAFETY: restores a disposition obtained from sigaction.
                unsafe {
                    libc::sigaction(*sig, prev, std::ptr::null_mut());
                }
            }
        }
    }
}

#[cfg(not(unix))]
mod signals {
    pub(crate) struct Caught;
    pub(crate) fn catch() -> Caught {
        Caught
    }
    pub(crate) fn take() -> i32 {
        0
    }
}

/// Maps a crossterm key event to [`Key`]s. Alt+key is Esc then the key:
/// terminals send both as ESC followed by the key, and an Esc typed just
/// before another key must not be lost.
pub(crate) fn convert_key(k: KeyEvent) -> Vec<Key> {
    if k.kind == KeyEventKind::Release {
        return Vec::new();
    }
    let Some(key) = convert_code(k) else { return Vec::new() };
    if k.modifiers.contains(KeyModifiers::ALT) {
        vec![Key::Esc, key]
    } else {
        vec![key]
    }
}

fn convert_code(k: KeyEvent) -> Option<Key> {
    let ctrl = k.modifiers.contains(KeyModifiers::CONTROL);
    Some(match k.code {
        KeyCode::Char(c) if ctrl => Key::Ctrl(c.to_ascii_lowercase()),
        KeyCode::Char(c) => Key::Char(c),
        KeyCode::Enter => Key::Enter,
        KeyCode::Esc => Key::Esc,
        KeyCode::Backspace => Key::Backspace,
        KeyCode::Delete => Key::Delete,
        KeyCode::Tab => Key::Tab,
        KeyCode::BackTab => Key::BackTab,
        KeyCode::Up => Key::Up,
        KeyCode::Down => Key::Down,
        KeyCode::Left => Key::Left,
        KeyCode::Right => Key::Right,
        KeyCode::Home => Key::Home,
        KeyCode::End => Key::End,
        KeyCode::PageUp => Key::PageUp,
        KeyCode::PageDown => Key::PageDown,
        KeyCode::F(n) => Key::F(n),
        _ => return None,
    })
}

/// Runs the interface on the process's terminal until the user quits.
pub(crate) fn run_ui(state: &mut State) -> Result<Outcome, Error> {
    if !io::stdout().is_terminal() {
        return Err(Error::NotATerminal);
    }
    let caught = signals::catch();
    let result = panic::catch_unwind(panic::AssertUnwindSafe(|| -> Result<Outcome, Error> {
        let _guard = Guard::enter().map_err(Error::Terminal)?;
        let mut terminal = Terminal::new(CrosstermBackend::new(io::stdout())).map_err(Error::Terminal)?;
        terminal.clear().map_err(Error::Terminal)?;
        // Testing aid: lets the end-to-end test check the panic path.
        let panic_key = std::env::var_os("MENUCONFIG_TEST_PANIC_KEY").is_some();
        event_loop(state, &mut terminal, panic_key)
    }));
    restore_terminal();
    drop(caught);
    match result {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".to_string());
            Err(Error::Panic(msg))
        }
    }
}

/// SIGHUP's number, reported when the terminal goes away.
#[cfg(unix)]
const HANGUP: i32 = libc::SIGHUP;
#[cfg(not(unix))]
const HANGUP: i32 = 1;

enum TtyState {
    Readable,
    Idle,
    HungUp,
}

/// Wait up to `ms` for input on stdin; report a hang-up.
#[cfg(unix)]
fn wait_for_terminal(ms: i32) -> TtyState {
    let mut fd = libc::pollfd { fd: 0, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut fd, 1, ms) };
    if n < 0 {
        // EINTR (a signal): the caller checks the signal flag next.
        return TtyState::Idle;
    }
    if fd.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
        return TtyState::HungUp;
    }
    if fd.revents & libc::POLLIN != 0 {
        TtyState::Readable
    } else {
        TtyState::Idle
    }
}

#[cfg(not(unix))]
fn wait_for_terminal(ms: i32) -> TtyState {
    std::thread::sleep(Duration::from_millis(ms as u64));
    TtyState::Idle
}

fn event_loop(
    state: &mut State,
    terminal: &mut Terminal<CrosstermBackend<Stdout>>,
    panic_key: bool,
) -> Result<Outcome, Error> {
    loop {
        terminal
            .draw(|f| {
                let area = f.area();
                state.resize(area.width, area.height);
                state.render(area, f.buffer_mut());
            })
            .map_err(Error::Terminal)?;
        // Wait for input, checking for termination signals in between. The
        // wait on the terminal is our own poll(2): crossterm's poll spins
        // forever once the terminal hangs up (a closed tmux, a dropped ssh),
        // while poll(2) reports the hang-up and we exit as for SIGHUP.
        loop {
            let s = signals::take();
            if s != 0 {
                return Err(Error::Signal(s));
            }
            match wait_for_terminal(100) {
                TtyState::HungUp => return Err(Error::Signal(HANGUP)),
                TtyState::Readable | TtyState::Idle => {}
            }
            if event::poll(Duration::ZERO).map_err(Error::Terminal)? {
                break;
            }
        }
        match event::read().map_err(Error::Terminal)? {
            Event::Key(k) => {
                for key in convert_key(k) {
                    if key == Key::Ctrl('l') {
                        // Redraw everything (the screen may be garbled).
                        terminal.clear().map_err(Error::Terminal)?;
                    }
                    if panic_key && key == Key::F(12) {
                        panic!("test panic requested with F12");
                    }
                    if let Action::Quit(outcome) = state.handle(key) {
                        return Ok(outcome);
                    }
                }
            }
            Event::Resize(w, h) => state.resize(w, h),
            _ => {}
        }
    }
}
