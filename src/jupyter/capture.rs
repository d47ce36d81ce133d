//! Capture the process's stdout and stderr (file descriptors 1 and 2) so
//! that everything a cell prints reaches the notebook: Rhai's `print`, Rust
//! `println!` in the library (training lines, `show()`), and libtorch's own
//! C++ output.
//!
//! Each descriptor becomes the write end of a pipe; a reader thread turns
//! what arrives into `stream` messages. To keep text in order with the
//! messages the interpreter sends itself (results, displays), [`Capture::sync`]
//! writes a NUL byte into each pipe and waits until the readers have passed
//! it: everything written before is then published. A NUL byte in a
//! program's own output is therefore dropped.
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::Duration;

use anyhow::{bail, Result};

pub struct Capture {
    acks: Receiver<()>,
    log: File,
}

fn pipe() -> Result<(RawFd, RawFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a valid array of two descriptors for pipe(2) to fill.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        bail!("cannot create a pipe: {}", std::io::Error::last_os_error());
    }
    Ok((fds[0], fds[1]))
}

impl Capture {
    /// Redirect fds 1 and 2 into pipes read by threads that call `forward`.
    /// The kernel's own log keeps the original stderr (`log`).
    pub fn start(forward: impl Fn(&'static str, String) + Send + Sync + 'static) -> Result<Capture> {
        let forward = std::sync::Arc::new(forward);
        // SAFETY: dup(2) of an open descriptor; the new one is owned by `log`.
        let log_fd = unsafe { libc::dup(2) };
        if log_fd < 0 {
            bail!("cannot duplicate stderr: {}", std::io::Error::last_os_error());
        }
        // SAFETY: log_fd was just returned by dup and is owned by nobody else.
        let log = unsafe { File::from_raw_fd(log_fd) };
        let (ack_tx, acks) = channel();
        for (fd, name) in [(1, "stdout"), (2, "stderr")] {
            let (r, w) = pipe()?;
            let _ = std::io::stdout().flush();
            // SAFETY: w is a fresh pipe end; dup2 makes `fd` refer to it.
            if unsafe { libc::dup2(w, fd) } < 0 {
                bail!("cannot redirect fd {fd}: {}", std::io::Error::last_os_error());
            }
            // SAFETY: w is ours to close: fd now refers to the pipe.
            unsafe { libc::close(w) };
            // SAFETY: r is a fresh pipe end owned by the reader thread.
            let reader = unsafe { File::from_raw_fd(r) };
            let (f, tx) = (forward.clone(), ack_tx.clone());
            std::thread::Builder::new()
                .name(format!("capture-{name}"))
                .spawn(move || read_loop(reader, name, &*f, &tx))?;
        }
        Ok(Capture { acks, log })
    }

    /// Publish everything written to stdout and stderr so far.
    pub fn sync(&self) {
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        // SAFETY: fflush(NULL) flushes every C stdio stream (libtorch's printf).
        unsafe { libc::fflush(std::ptr::null_mut()) };
        while self.acks.try_recv().is_ok() {}
        let mut sent = 0;
        for fd in [1, 2] {
            let nul = [0u8; 1];
            // SAFETY: writes one byte from a valid buffer to an open descriptor.
            if unsafe { libc::write(fd, nul.as_ptr().cast(), 1) } == 1 {
                sent += 1;
            }
        }
        for _ in 0..sent {
            if self.acks.recv_timeout(Duration::from_secs(2)).is_err() {
                break;
            }
        }
    }

    /// A line in the kernel's log (the original stderr, which Jupyter shows
    /// in the server's console).
    pub fn log(&self, msg: &str) {
        log_line(&self.log, msg);
    }

    /// A handle to the log for other threads.
    pub fn log_handle(&self) -> Result<File> {
        Ok(self.log.try_clone()?)
    }
}

/// One line of the kernel's log on `log` (see [`Capture::log_handle`]).
pub fn log_line(log: &File, msg: &str) {
    let _ = writeln!(&*log, "[knlp kernel] {msg}");
}

fn read_loop(
    mut reader: File,
    name: &'static str,
    forward: &(dyn Fn(&'static str, String) + Send + Sync),
    acks: &Sender<()>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut rest = &buf[..n];
        loop {
            let (chunk, marker) = match rest.iter().position(|&b| b == 0) {
                Some(i) => (&rest[..i], true),
                None => (rest, false),
            };
            pending.extend_from_slice(chunk);
            // Forward whole UTF-8 characters; keep a split one for later,
            // unless a sync asks for everything.
            let cut = match std::str::from_utf8(&pending) {
                Ok(_) => pending.len(),
                Err(e) if e.error_len().is_none() && !marker => e.valid_up_to(),
                Err(_) => pending.len(),
            };
            if cut > 0 {
                let text = String::from_utf8_lossy(&pending[..cut]).into_owned();
                pending.drain(..cut);
                forward(name, text);
            }
            if !marker {
                break;
            }
            let _ = acks.send(());
            rest = &rest[chunk.len() + 1..];
        }
    }
}
