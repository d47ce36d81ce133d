//! Safe wrappers over the C++ shim (`csrc/shim.cpp`): global libtorch switches
//! and CUDA allocator statistics that tch 0.24 does not bind.
//!
//! Every call returns `Err` with libtorch's message instead of throwing.
use std::ffi::CStr;
use std::os::raw::{c_char, c_int};

use tch::Tensor;
use torch_sys::C_tensor;

extern "C" {
    fn knlp_shim_last_error() -> *const c_char;
    fn knlp_torch_version() -> *const c_char;
    fn knlp_set_tf32(on: c_int) -> c_int;
    fn knlp_get_tf32(out: *mut c_int) -> c_int;
    fn knlp_set_autocast(enabled: c_int, dtype: c_int) -> c_int;
    fn knlp_get_autocast(enabled: *mut c_int, dtype: *mut c_int) -> c_int;
    fn knlp_set_deterministic(on: c_int, warn_only: c_int) -> c_int;
    fn knlp_get_deterministic(out: *mut c_int) -> c_int;
    fn knlp_memory_stats(device: c_int, out: *mut i64) -> c_int;
    fn knlp_reset_peak_memory(device: c_int) -> c_int;
    fn knlp_empty_cache() -> c_int;
    fn knlp_set_data(t: *mut C_tensor, src: *mut C_tensor) -> c_int;
    fn knlp_get_rng_state(device: c_int, out: *mut *mut C_tensor) -> c_int;
    fn knlp_set_rng_state(device: c_int, state: *mut C_tensor) -> c_int;
    fn knlp_set_grad(t: *mut C_tensor, g: *mut C_tensor) -> c_int;
    fn knlp_wrapped_number(kind: c_int, i: i64, f: f64, out: *mut *mut C_tensor) -> c_int;
    fn knlp_fused_adamw(
        params: *const *mut C_tensor,
        grads: *const *mut C_tensor,
        exp_avgs: *const *mut C_tensor,
        exp_avg_sqs: *const *mut C_tensor,
        max_exp_avg_sqs: *const *mut C_tensor,
        steps: *const *mut C_tensor,
        n: c_int,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        amsgrad: c_int,
        adam_w: c_int,
    ) -> c_int;
}

fn check(rc: c_int) -> Result<(), String> {
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: the shim returns a pointer into a thread-local std::string that
    // stays valid until the next shim call on this thread.
    let msg = unsafe { CStr::from_ptr(knlp_shim_last_error()) };
    Err(crate::tensor::clean_torch_message(&msg.to_string_lossy()))
}

/// The libtorch version the binary runs against, e.g. `2.11.0`.
pub fn torch_version() -> String {
    // SAFETY: a pointer to a static string literal.
    unsafe { CStr::from_ptr(knlp_torch_version()) }.to_string_lossy().into_owned()
}

/// Allow TF32 tensor cores for fp32 matmuls and convolutions on CUDA.
pub fn set_tf32(on: bool) -> Result<(), String> {
    check(unsafe { knlp_set_tf32(on as c_int) })
}

pub fn tf32() -> Result<bool, String> {
    let mut v = 0;
    check(unsafe { knlp_get_tf32(&mut v) })?;
    Ok(v != 0)
}

/// Autocast precision for CUDA regions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AutocastDtype {
    F16,
    BF16,
}

/// Enable or disable CUDA autocast on the calling thread with the given dtype.
pub fn set_autocast(enabled: bool, dtype: AutocastDtype) -> Result<(), String> {
    let d = matches!(dtype, AutocastDtype::BF16) as c_int;
    check(unsafe { knlp_set_autocast(enabled as c_int, d) })
}

/// Current CUDA autocast state of the calling thread.
pub fn autocast() -> Result<(bool, AutocastDtype), String> {
    let (mut e, mut d) = (0, 0);
    check(unsafe { knlp_get_autocast(&mut e, &mut d) })?;
    let dtype = if d == 1 { AutocastDtype::BF16 } else { AutocastDtype::F16 };
    Ok((e != 0, dtype))
}

/// Run `f` with CUDA autocast in `dtype`, restoring the previous state after.
pub fn with_autocast<T>(dtype: AutocastDtype, f: impl FnOnce() -> T) -> Result<T, String> {
    let (was, prev) = autocast()?;
    set_autocast(true, dtype)?;
    let out = f();
    set_autocast(was, prev)?;
    Ok(out)
}

/// Run `f` with CUDA autocast off (float32 where the math needs it),
/// restoring the previous state after.
pub fn without_autocast<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    let (was, prev) = autocast()?;
    if !was {
        return Ok(f());
    }
    set_autocast(false, prev)?;
    let out = f();
    set_autocast(was, prev)?;
    Ok(out)
}

/// `torch.use_deterministic_algorithms(on)` plus deterministic cuDNN.
pub fn set_deterministic(on: bool) -> Result<(), String> {
    check(unsafe { knlp_set_deterministic(on as c_int, 0) })
}

pub fn deterministic() -> Result<bool, String> {
    let mut v = 0;
    check(unsafe { knlp_get_deterministic(&mut v) })?;
    Ok(v != 0)
}

/// CUDA caching-allocator statistics in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MemoryStats {
    pub allocated: i64,
    pub peak_allocated: i64,
    pub reserved: i64,
    pub peak_reserved: i64,
}

/// Allocator statistics of CUDA device `device`; an error without CUDA.
pub fn memory_stats(device: usize) -> Result<MemoryStats, String> {
    ensure_cuda(device)?;
    let mut out = [0i64; 4];
    check(unsafe { knlp_memory_stats(device as c_int, out.as_mut_ptr()) })?;
    Ok(MemoryStats { allocated: out[0], peak_allocated: out[1], reserved: out[2], peak_reserved: out[3] })
}

pub fn reset_peak_memory(device: usize) -> Result<(), String> {
    ensure_cuda(device)?;
    check(unsafe { knlp_reset_peak_memory(device as c_int) })
}

/// Release cached, unused CUDA memory back to the driver.
pub fn empty_cache() -> Result<(), String> {
    ensure_cuda(0)?;
    check(unsafe { knlp_empty_cache() })
}

fn ensure_cuda(device: usize) -> Result<(), String> {
    let n = tch::Cuda::device_count() as usize;
    if n == 0 {
        return Err("CUDA is not available on this machine".into());
    }
    if device >= n {
        return Err(format!("CUDA device {device} does not exist ({n} visible)"));
    }
    Ok(())
}

/// Point `t` (and every alias of it) at the storage of `src`, like
/// `t.data = src` in PyTorch. Shapes may differ; autograd metadata stays.
pub fn set_data(t: &Tensor, src: &Tensor) -> Result<(), String> {
    check(unsafe { knlp_set_data(t.as_ptr() as *mut C_tensor, src.as_ptr() as *mut C_tensor) })
}

/// libtorch's default generator state on the CPU (`None`) or a CUDA device,
/// like `torch.get_rng_state()`: a uint8 tensor.
pub fn rng_state(cuda: Option<usize>) -> Result<Tensor, String> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    check(unsafe { knlp_get_rng_state(cuda.map_or(-1, |d| d as c_int), &mut out) })?;
    // SAFETY: the shim returned a heap-allocated at::Tensor that we now own.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// Restore a generator state saved by [`rng_state`].
pub fn set_rng_state(cuda: Option<usize>, state: &Tensor) -> Result<(), String> {
    check(unsafe { knlp_set_rng_state(cuda.map_or(-1, |d| d as c_int), state.as_ptr() as *mut C_tensor) })
}

/// A number as a 0-d "wrapped number" tensor: a tensor op given it computes
/// exactly what the op's Scalar overload computes (ATen converts the Scalar
/// the same way), but a failure comes back as an error instead of a panic
/// in tch's Scalar destructor (`tensor::num`).
pub fn wrapped_number(n: crate::tensor::Num) -> Result<Tensor, String> {
    let (kind, i, f) = match n {
        crate::tensor::Num::Float(f) => (0, 0, f),
        crate::tensor::Num::Int(i) => (1, i, 0.0),
        crate::tensor::Num::Bool(b) => (2, b as i64, 0.0),
    };
    let mut out: *mut C_tensor = std::ptr::null_mut();
    check(unsafe { knlp_wrapped_number(kind, i, f, &mut out) })?;
    // SAFETY: the shim returned a heap-allocated at::Tensor that we now own.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// Install `g` as the gradient of `t`; backward passes then accumulate into
/// `g` in place.
pub fn set_grad(t: &Tensor, g: &Tensor) -> Result<(), String> {
    check(unsafe { knlp_set_grad(t.as_ptr() as *mut C_tensor, g.as_ptr() as *mut C_tensor) })
}

/// Hyper-parameters of one fused Adam/AdamW call.
#[derive(Clone, Copy, Debug)]
pub struct FusedAdam {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
    pub amsgrad: bool,
    /// Decoupled weight decay (AdamW) instead of L2 in the gradient (Adam).
    pub decoupled: bool,
}

/// ATen's `_fused_adamw_` / `_fused_adam_` over parallel lists. `steps` are
/// float32 scalar tensors on the parameters' device, counting this step
/// (the caller increments them before the call, as torch.optim does).
pub fn fused_adam(
    params: &[&Tensor],
    grads: &[&Tensor],
    exp_avgs: &[&Tensor],
    exp_avg_sqs: &[&Tensor],
    max_exp_avg_sqs: &[&Tensor],
    steps: &[&Tensor],
    h: FusedAdam,
) -> Result<(), String> {
    let n = params.len();
    let same = [grads.len(), exp_avgs.len(), exp_avg_sqs.len(), steps.len()].iter().all(|&l| l == n);
    if !same || (h.amsgrad && max_exp_avg_sqs.len() != n) {
        return Err("fused_adam: tensor lists differ in length".into());
    }
    let ptrs = |v: &[&Tensor]| v.iter().map(|t| t.as_ptr() as *mut C_tensor).collect::<Vec<_>>();
    let (p, g, m, v, mx, st) =
        (ptrs(params), ptrs(grads), ptrs(exp_avgs), ptrs(exp_avg_sqs), ptrs(max_exp_avg_sqs), ptrs(steps));
    check(unsafe {
        knlp_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            mx.as_ptr(),
            st.as_ptr(),
            n as c_int,
            h.lr,
            h.beta1,
            h.beta2,
            h.weight_decay,
            h.eps,
            h.amsgrad as c_int,
            h.decoupled as c_int,
        )
    })
}
