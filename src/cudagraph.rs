//! CUDA graphs (`csrc/graph.cpp`): record a fixed sequence of kernels once
//! and launch all of them with one call.
//!
//! The recorded kernels read and write the same device addresses on every
//! replay, so everything they touch must outlive the graph and keep its
//! shape: inputs are copied into static buffers before a replay, outputs
//! read from the tensors the captured code returned. No host
//! synchronisation (`.item()`, a data-dependent shape) may happen while
//! capturing. A knlp built without the CUDA headers has no graphs:
//! [`Graph::new`] says so.
use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};

extern "C" {
    fn knlp_graph_last_error() -> *const c_char;
    fn knlp_graph_supported() -> c_int;
    fn knlp_graph_new(out: *mut *mut c_void) -> c_int;
    fn knlp_graph_enter_stream(g: *mut c_void) -> c_int;
    fn knlp_graph_exit_stream(g: *mut c_void) -> c_int;
    fn knlp_graph_capture_begin(g: *mut c_void) -> c_int;
    fn knlp_graph_capture_end(g: *mut c_void) -> c_int;
    fn knlp_graph_replay(g: *mut c_void) -> c_int;
    fn knlp_graph_stream_sync() -> c_int;
    fn knlp_graph_current_device(out: *mut c_int) -> c_int;
    fn knlp_graph_current_stream(device: c_int, out: *mut *mut c_void) -> c_int;
    fn knlp_graph_free(g: *mut c_void);
}

fn check(rc: c_int) -> Result<(), String> {
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: a pointer into a thread-local std::string, valid until the
    // next graph shim call on this thread.
    let msg = unsafe { CStr::from_ptr(knlp_graph_last_error()) };
    Err(crate::tensor::clean_torch_message(&msg.to_string_lossy()))
}

/// Was knlp built with CUDA graph support (the CUDA headers were found)?
pub fn supported() -> bool {
    // SAFETY: no arguments, no state.
    unsafe { knlp_graph_supported() != 0 }
}

/// The current CUDA device's index (where a graph captures and replays).
pub fn current_device() -> Result<usize, String> {
    let mut d: c_int = -1;
    // SAFETY: `d` outlives the call, which writes one int.
    check(unsafe { knlp_graph_current_device(&mut d) })?;
    Ok(d.max(0) as usize)
}

/// libtorch's current CUDA stream on `device` (a `cudaStream_t`).
pub fn current_stream(device: usize) -> Result<*mut c_void, String> {
    let mut s = std::ptr::null_mut();
    // SAFETY: `s` outlives the call, which writes one pointer.
    check(unsafe { knlp_graph_current_stream(device as c_int, &mut s) })?;
    Ok(s)
}

/// Wait for the current CUDA stream of the current device.
pub fn stream_sync() -> Result<(), String> {
    check(unsafe { knlp_graph_stream_sync() })
}

/// One CUDA graph: capture once, replay many times. Dropping it frees the
/// graph (ending a capture left open).
pub struct Graph {
    ptr: *mut c_void,
    captured: bool,
}

impl Graph {
    pub fn new() -> Result<Graph, String> {
        let mut ptr = std::ptr::null_mut();
        check(unsafe { knlp_graph_new(&mut ptr) })?;
        Ok(Graph { ptr, captured: false })
    }

    /// Make a side stream current (after the device finished its earlier
    /// work): warm-up iterations run there before [`Graph::capture`].
    pub fn enter_stream(&mut self) -> Result<(), String> {
        check(unsafe { knlp_graph_enter_stream(self.ptr) })
    }

    /// Back to the previous stream, the side stream's work done.
    pub fn exit_stream(&mut self) -> Result<(), String> {
        check(unsafe { knlp_graph_exit_stream(self.ptr) })
    }

    /// Record what `f` launches (on the side stream; nothing runs now),
    /// then return to the previous stream. The first error wins: `f`'s,
    /// else the capture's.
    pub fn capture<T>(&mut self, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
        check(unsafe { knlp_graph_capture_begin(self.ptr) })?;
        let out = f();
        let end = check(unsafe { knlp_graph_capture_end(self.ptr) });
        let out = out?;
        end?;
        self.captured = true;
        Ok(out)
    }

    pub fn captured(&self) -> bool {
        self.captured
    }

    /// Launch the recorded kernels on the current stream (asynchronously).
    pub fn replay(&self) -> Result<(), String> {
        check(unsafe { knlp_graph_replay(self.ptr) })
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from knlp_graph_new and is freed once.
        unsafe { knlp_graph_free(self.ptr) }
    }
}
