//! Fused ops with their own backward inside libtorch's autograd graph: a
//! C++ autograd Function (`csrc/fused.cpp`) whose forward and backward call
//! back into Rust, which runs a run-time compiled kernel (`kernels::norm`)
//! or, where that does not apply, the same computation in libtorch ops.
//!
//! [`add_layer_norm`] is GPT-2's `x + branch` followed by a layer norm
//! whose output feeds a linear.
use std::cell::RefCell;
use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tch::{Kind, TchError, Tensor};
use torch_sys::C_tensor;

use crate::kernels::{self, norm};

extern "C" {
    fn knlp_fused_last_error() -> *const c_char;
    #[allow(clippy::too_many_arguments)]
    fn knlp_add_layer_norm(
        x: *mut C_tensor,
        a: *mut C_tensor,
        w: *mut C_tensor,
        b: *mut C_tensor,
        eps: f64,
        y_kind: c_int,
        fwd: *mut c_void,
        bwd: *mut c_void,
        x1: *mut *mut C_tensor,
        y: *mut *mut C_tensor,
    ) -> c_int;
}

static CPU_REFERENCE: AtomicBool = AtomicBool::new(false);
static CALLS: AtomicU64 = AtomicU64::new(0);

/// Calls of [`add_layer_norm`] so far (tests check that a model took it).
pub fn calls() -> u64 {
    CALLS.load(Ordering::Relaxed)
}

/// Tests: take the fused-op path on the CPU too, where the callbacks run
/// the libtorch reference (so the autograd plumbing is tested without a GPU).
pub fn set_cpu_reference(on: bool) {
    CPU_REFERENCE.store(on, Ordering::Relaxed);
}

/// Whether a model should route `x + a` and its layer norm through
/// [`add_layer_norm`]: the switch is on (`KNLP_FUSED_LN=1`) and either the
/// kernel takes rows of this width under bf16 autocast, or the CPU
/// reference mode of the tests is on.
pub fn add_layer_norm_applies(x: &Tensor) -> bool {
    if !norm::enabled() {
        return false;
    }
    if x.device() == tch::Device::Cpu {
        return CPU_REFERENCE.load(Ordering::Relaxed);
    }
    x.kind() == Kind::Float
        && norm::takes_width(x.size().last().copied().unwrap_or(0))
        && matches!(crate::shim::autocast(), Ok((true, crate::shim::AutocastDtype::BF16)))
        && kernels::usable(x.device())
}

/// `(x + a, layer_norm(x + a))`, differentiable, in one kernel each way on
/// CUDA with bf16 autocast (`y` then bf16, what the next linear would cast
/// it to); elsewhere the same in libtorch ops (`y` in `x`'s dtype, or bf16
/// under autocast).
pub fn add_layer_norm(
    x: &Tensor,
    a: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    eps: f64,
) -> Result<(Tensor, Tensor), TchError> {
    let y_kind = match crate::shim::autocast() {
        Ok((true, crate::shim::AutocastDtype::BF16)) if x.device() != tch::Device::Cpu => Kind::BFloat16,
        _ => x.kind(),
    };
    CALLS.fetch_add(1, Ordering::Relaxed);
    let (mut x1, mut y) = (std::ptr::null_mut(), std::ptr::null_mut());
    let p = |t: &Tensor| t.as_ptr() as *mut C_tensor;
    // SAFETY: the tensors outlive the call; the callbacks have the
    // signatures csrc/fused.cpp casts them to; on success the shim hands
    // over two new heap tensors.
    let rc = unsafe {
        knlp_add_layer_norm(
            p(x),
            p(a),
            p(w),
            b.map_or(std::ptr::null_mut(), p),
            eps,
            code_of(y_kind)?,
            add_ln_fwd as *mut c_void,
            add_ln_bwd as *mut c_void,
            &mut x1,
            &mut y,
        )
    };
    if rc != 0 {
        // SAFETY: the shim's thread-local error string.
        let msg = unsafe { CStr::from_ptr(knlp_fused_last_error()) }.to_string_lossy().into_owned();
        return Err(TchError::Torch(crate::tensor::clean_torch_message(&msg)));
    }
    // SAFETY: two tensors the shim allocated for us.
    Ok(unsafe { (Tensor::from_ptr(x1), Tensor::from_ptr(y)) })
}

thread_local! {
    static ERROR: RefCell<std::ffi::CString> = RefCell::new(std::ffi::CString::default());
}

/// A callback's failure as the C string the shim reads (valid until the
/// next failure on this thread).
fn fail(msg: String) -> *const c_char {
    let c = std::ffi::CString::new(msg.replace('\0', " ")).unwrap_or_default();
    ERROR.with(|e| {
        *e.borrow_mut() = c;
        e.borrow().as_ptr()
    })
}

/// A borrowed handle on a tensor the shim passed (null: None).
unsafe fn arg(p: *mut C_tensor) -> Option<Tensor> {
    if p.is_null() {
        None
    } else {
        Some(Tensor::clone_from_ptr(p))
    }
}

/// Hand `t` to the shim, which frees it.
fn give(t: Tensor) -> *mut C_tensor {
    let p = t.as_ptr() as *mut C_tensor;
    std::mem::forget(t);
    p
}

/// Runs a callback body; a panic or error becomes the shim's error string.
fn callback(
    f: impl FnOnce() -> anyhow::Result<Vec<Option<Tensor>>>,
    out: *mut *mut C_tensor,
) -> *const c_char {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(ts)) => {
            for (i, t) in ts.into_iter().enumerate() {
                // SAFETY: the shim passes room for four outputs.
                unsafe { *out.add(i) = t.map_or(std::ptr::null_mut(), give) };
            }
            std::ptr::null()
        }
        Ok(Err(e)) => fail(format!("{e:#}")),
        Err(_) => fail("internal error: a fused-op callback panicked".into()),
    }
}

/// The floating dtypes as `at::ScalarType` numbers (tch keeps its own
/// conversion private).
const KINDS: &[(c_int, Kind)] = &[(5, Kind::Half), (6, Kind::Float), (7, Kind::Double), (15, Kind::BFloat16)];

fn code_of(kind: Kind) -> Result<c_int, TchError> {
    KINDS
        .iter()
        .find(|(_, k)| *k == kind)
        .map(|(c, _)| *c)
        .ok_or_else(|| TchError::Kind(format!("add_layer_norm: {kind:?} is not a floating dtype it takes")))
}

fn kind_of(code: c_int) -> anyhow::Result<Kind> {
    KINDS
        .iter()
        .find(|(c, _)| *c == code)
        .map(|(_, k)| *k)
        .ok_or_else(|| anyhow::anyhow!("fused op: unknown dtype code {code}"))
}

/// The kernel where it applies; on a kernel failure the fused kernels are
/// switched off (one warning) and the reference computes this call.
fn kernel_or_reference<T>(
    use_kernel: bool,
    kernel: impl FnOnce() -> anyhow::Result<T>,
    reference: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    if use_kernel {
        match kernel() {
            Ok(v) => return Ok(v),
            Err(e) => kernels::disable(&e),
        }
    }
    reference()
}

unsafe extern "C" fn add_ln_fwd(
    x: *mut C_tensor,
    a: *mut C_tensor,
    w: *mut C_tensor,
    b: *mut C_tensor,
    eps: f64,
    y_kind: c_int,
    out: *mut *mut C_tensor,
) -> *const c_char {
    callback(
        || {
            let (x, a, w, b) = (arg(x).unwrap(), arg(a).unwrap(), arg(w).unwrap(), arg(b));
            let y_kind = kind_of(y_kind)?;
            let fast = y_kind == Kind::BFloat16 && kernels::usable(x.device()) && norm::fits(&x, &a);
            let f = kernel_or_reference(
                fast,
                || norm::forward(&x, &a, &w, b.as_ref(), eps),
                || norm::reference_forward(&x, &a, &w, b.as_ref(), eps, y_kind),
            )?;
            Ok(vec![Some(f.x1), Some(f.y), Some(f.mean), Some(f.rstd)])
        },
        out,
    )
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn add_ln_bwd(
    gx1: *mut C_tensor,
    gy: *mut C_tensor,
    x1: *mut C_tensor,
    w: *mut C_tensor,
    b: *mut C_tensor,
    mean: *mut C_tensor,
    rstd: *mut C_tensor,
    a_kind: c_int,
    out: *mut *mut C_tensor,
) -> *const c_char {
    callback(
        || {
            let (gx1, x1, w, b) = (arg(gx1), arg(x1).unwrap(), arg(w).unwrap(), arg(b));
            let (mean, rstd) = (arg(mean).unwrap(), arg(rstd).unwrap());
            let a_kind = kind_of(a_kind)?;
            // An unused y has no gradient: zeros in its place.
            let gy = match arg(gy) {
                Some(g) => g,
                None => x1.f_zeros_like()?,
            };
            let fast = a_kind == Kind::BFloat16 && kernels::usable(x1.device()) && norm::fits(&x1, &gy);
            let g = kernel_or_reference(
                fast,
                || norm::backward(gx1.as_ref(), &gy, &x1, &w, b.is_some(), &mean, &rstd),
                || norm::reference_backward(gx1.as_ref(), &gy, &x1, &w, b.as_ref(), &mean, &rstd, a_kind),
            )?;
            Ok(vec![Some(g.gx), Some(g.ga), Some(g.gw), g.gb])
        },
        out,
    )
}
