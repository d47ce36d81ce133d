//! Ctrl-C handling. The first Ctrl-C sets a flag that the script engine and
//! long native loops (training) check between operations, so work stops at
//! a safe point; a second Ctrl-C before the first is handled exits at once.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

static FLAG: AtomicBool = AtomicBool::new(false);
static PATIENT: AtomicBool = AtomicBool::new(false);
static INSTALL: Once = Once::new();

/// Install the process-wide handler (idempotent).
pub fn install() {
    INSTALL.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            if FLAG.swap(true, Ordering::SeqCst) && !PATIENT.load(Ordering::SeqCst) {
                eprintln!("\ninterrupted twice: exiting now");
                std::process::exit(130);
            }
        });
    });
}

/// Never exit on a repeated SIGINT: a notebook's kernel must outlive any
/// number of interrupts (Jupyter sends SIGINT for "interrupt kernel").
pub fn never_exit() {
    PATIENT.store(true, Ordering::SeqCst);
}

/// Whether Ctrl-C was pressed since the last [`clear`].
pub fn requested() -> bool {
    FLAG.load(Ordering::SeqCst)
}

/// Consume a pending interrupt.
pub fn take() -> bool {
    FLAG.swap(false, Ordering::SeqCst)
}

pub fn clear() {
    FLAG.store(false, Ordering::SeqCst);
}

/// Raise the flag as Ctrl-C would (tests, and stopping from code).
pub fn raise() {
    FLAG.store(true, Ordering::SeqCst);
}

thread_local! {
    static DEFERRED: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// While alive, the script engine on this thread leaves a Ctrl-C to the
/// native loop that polls it at a safe point (the training loop, whose
/// forward may run script closures): the flag is not consumed mid-step.
pub struct Defer(());

impl Defer {
    pub fn new() -> Defer {
        DEFERRED.with(|d| d.set(d.get() + 1));
        Defer(())
    }
}

impl Default for Defer {
    fn default() -> Self {
        Defer::new()
    }
}

impl Drop for Defer {
    fn drop(&mut self) {
        DEFERRED.with(|d| d.set(d.get().saturating_sub(1)));
    }
}

/// Whether a native loop on this thread handles Ctrl-C itself.
pub fn deferred() -> bool {
    DEFERRED.with(|d| d.get() > 0)
}
