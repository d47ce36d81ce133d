//! Where core code's progress goes when a front end captures it.
//!
//! A terminal gets training progress as a `\r`-redrawn bar on stderr. A
//! notebook cannot redraw text, so the Jupyter kernel installs a sink here
//! and shows the bar as one display that it updates in place. The sink is
//! per thread: all tch and script work runs on the interpreter thread.
use std::cell::RefCell;

/// One progress report.
pub enum Progress<'a> {
    /// The current state of a running loop (replaces the previous one).
    Bar { step: i64, total: i64, text: &'a str },
    /// A permanent line (log records, evaluations).
    Line(&'a str),
    /// The loop ended; the next `Bar` starts a new display.
    Done,
}

type Sink = Box<dyn FnMut(Progress<'_>)>;

thread_local! {
    static SINK: RefCell<Option<Sink>> = const { RefCell::new(None) };
}

/// Send this thread's progress to `sink` from now on.
pub fn set_progress_sink(sink: impl FnMut(Progress<'_>) + 'static) {
    SINK.with(|s| *s.borrow_mut() = Some(Box::new(sink)));
}

/// Whether a sink is installed on this thread.
pub fn captured() -> bool {
    SINK.with(|s| s.borrow().is_some())
}

/// Report `p` to the sink; false when there is none.
pub fn report(p: Progress<'_>) -> bool {
    SINK.with(|s| match s.borrow_mut().as_mut() {
        Some(f) => {
            f(p);
            true
        }
        None => false,
    })
}
