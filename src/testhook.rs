//! Pause points for crash tests. With `KNLP_TEST_PAUSE=<point>:<n>` the
//! n-th time the process reaches `<point>` it writes the file named by
//! `KNLP_TEST_PAUSE_FILE` and sleeps until killed, so a test can SIGKILL it
//! at exactly that moment (mid-cell, between cells, during a checkpoint
//! write). With `KNLP_TEST_PANIC=<point>` the process panics there instead,
//! for tests of what survives a bug. Without the variables these are no-ops.
use std::sync::atomic::{AtomicU64, Ordering};

static HITS: AtomicU64 = AtomicU64::new(0);

/// Points: `step` (after an optimizer step), `checkpoint` (a safetensors
/// file such as a checkpoint is written to its temporary name, not yet
/// renamed), `cell-done` (the runner, after a cell finished and before the
/// next starts).
pub fn point(name: &str) {
    if std::env::var("KNLP_TEST_PANIC").is_ok_and(|p| p == name) {
        panic!("KNLP_TEST_PANIC at {name}");
    }
    let Ok(spec) = std::env::var("KNLP_TEST_PAUSE") else { return };
    let Some((want, n)) = spec.split_once(':') else { return };
    if want != name {
        return;
    }
    let hit = HITS.fetch_add(1, Ordering::SeqCst) + 1;
    if n.parse::<u64>().ok() != Some(hit) {
        return;
    }
    if let Ok(path) = std::env::var("KNLP_TEST_PAUSE_FILE") {
        let _ = std::fs::write(path, format!("{name}:{hit} pid {}\n", std::process::id()));
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
