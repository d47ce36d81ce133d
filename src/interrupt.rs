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
