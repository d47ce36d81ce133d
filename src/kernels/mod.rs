//! Fused GPU kernels, compiled at run time with NVRTC and launched on
//! libtorch's current stream. knlp needs no CUDA toolkit: the torch wheel
//! ships NVRTC (`nvidia/cu13/lib/libnvrtc.so.13`) and the driver ships
//! `libcuda.so.1`; both are loaded with `dlopen` on first use. Compiled
//! modules are cached per device and source for the life of the process.
//!
//! Every kernel family has a libtorch path that computes the same thing
//! (the reference its GPU test compares against); callers fall back to it,
//! with one warning, wherever this runtime is unavailable.
pub mod check;
pub mod mla;
pub mod norm;
pub mod nvrtc;
pub mod prune;
pub mod xent;

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, Once, OnceLock};

use anyhow::{anyhow, bail, Result};
use tch::{Device, Kind, Tensor};

/// A libtorch error as an `anyhow` error, for the kernel families.
fn te(e: tch::TchError) -> anyhow::Error {
    anyhow!(crate::tensor::torch_error(&e))
}

/// `t` must be contiguous and of `kind` (what a kernel reads it as).
fn contiguous_of(t: &Tensor, kind: Kind, what: &str) -> Result<()> {
    if t.kind() != kind || !t.is_contiguous() {
        bail!("{what} must be a contiguous {kind:?} tensor, got {:?}", t.kind());
    }
    Ok(())
}

type CuResult = c_int;

/// The driver entry points knlp uses, with the signatures of `cuda.h`
/// (opaque handles as pointers, `CUdevice` as int).
struct Fns {
    cu_init: unsafe extern "C" fn(c_uint) -> CuResult,
    cu_device_get: unsafe extern "C" fn(*mut c_int, c_int) -> CuResult,
    cu_device_attr: unsafe extern "C" fn(*mut c_int, c_int, c_int) -> CuResult,
    cu_primary_ctx: unsafe extern "C" fn(*mut *mut c_void, c_int) -> CuResult,
    cu_ctx_push: unsafe extern "C" fn(*mut c_void) -> CuResult,
    cu_ctx_pop: unsafe extern "C" fn(*mut *mut c_void) -> CuResult,
    cu_ctx_current: unsafe extern "C" fn(*mut *mut c_void) -> CuResult,
    cu_module_load: unsafe extern "C" fn(*mut *mut c_void, *const c_void) -> CuResult,
    cu_module_fn: unsafe extern "C" fn(*mut *mut c_void, *mut c_void, *const c_char) -> CuResult,
    #[allow(clippy::type_complexity)]
    cu_launch: unsafe extern "C" fn(
        *mut c_void,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        *mut c_void,
        *mut *mut c_void,
        *mut *mut c_void,
    ) -> CuResult,
    cu_error_string: unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult,
}

/// The loaded driver and NVRTC.
struct Rtc {
    f: Fns,
    nvrtc: &'static nvrtc::Nvrtc,
    /// Per device: its primary context (retained once) and SM count.
    devices: Mutex<HashMap<c_int, (usize, i64)>>,
}

// SAFETY: the function pointers are plain C entry points, callable from any
// thread; the driver and NVRTC are thread-safe for the calls made here.
unsafe impl Send for Rtc {}
unsafe impl Sync for Rtc {}

/// A compiled kernel: a `CUfunction` of a module that stays loaded.
#[derive(Clone, Copy)]
pub struct Kernel {
    func: *mut c_void,
    device: c_int,
}

// SAFETY: a CUfunction handle may be launched from any thread of the
// process (with its context current, which `launch` ensures).
unsafe impl Send for Kernel {}

/// Keyed by source first, so a lookup borrows it instead of copying it.
struct Cache {
    /// source -> (device, entry) -> function.
    funcs: HashMap<String, HashMap<(c_int, String), Kernel>>,
    /// source -> device -> CUmodule, kept loaded for the process's life.
    modules: HashMap<String, HashMap<c_int, usize>>,
}

static RTC: OnceLock<std::result::Result<Rtc, String>> = OnceLock::new();
static ENABLED: AtomicBool = AtomicBool::new(true);
static LAUNCHES: AtomicU64 = AtomicU64::new(0);
static WARNED: Once = Once::new();
static CACHE: Mutex<Option<Cache>> = Mutex::new(None);

fn rtc() -> Result<&'static Rtc> {
    RTC.get_or_init(load).as_ref().map_err(|e| anyhow!("{e}"))
}

/// Whether run-time compiled kernels can run on `device` (a CUDA device,
/// NVRTC and the driver found, knlp built with the CUDA headers). The
/// reason they cannot, otherwise.
pub fn available(device: Device) -> std::result::Result<(), String> {
    if !matches!(device, Device::Cuda(_)) {
        return Err("not a CUDA device".into());
    }
    if !crate::cudagraph::supported() {
        return Err("knlp was built without the CUDA headers".into());
    }
    RTC.get_or_init(load).as_ref().map(|_| ()).map_err(|e| e.clone())
}

/// Turn the fused kernels on or off for this process (`set_fused_kernels`
/// in scripts; `KNLP_FUSED_KERNELS=0` turns them off from the start).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether fused kernels are switched on (they may still be unavailable).
pub fn enabled() -> bool {
    static ENV: OnceLock<bool> = OnceLock::new();
    let env_on = *ENV.get_or_init(|| std::env::var("KNLP_FUSED_KERNELS").map(|v| v != "0").unwrap_or(true));
    env_on && ENABLED.load(Ordering::Relaxed)
}

/// The switch of a kernel family that is off until it has been measured on
/// a GPU: on when its environment variable is `1` at first use, or when
/// set. The global switch ([`enabled`], [`usable`]) applies on top.
pub struct OptIn {
    on: AtomicBool,
    env: Once,
    var: &'static str,
}

impl OptIn {
    pub const fn new(var: &'static str) -> Self {
        OptIn { on: AtomicBool::new(false), env: Once::new(), var }
    }

    pub fn enabled(&self) -> bool {
        self.env
            .call_once(|| self.on.store(std::env::var(self.var).is_ok_and(|v| v == "1"), Ordering::Relaxed));
        self.on.load(Ordering::Relaxed)
    }

    /// Overrides the environment variable from now on.
    pub fn set(&self, on: bool) {
        self.env.call_once(|| {});
        self.on.store(on, Ordering::Relaxed);
    }
}

/// Whether a caller on `device` should take its fused path: switched on,
/// a CUDA device, and the runtime loads. On a CUDA device where it does
/// not, says why once and returns false.
pub fn usable(device: Device) -> bool {
    if !enabled() || !matches!(device, Device::Cuda(_)) {
        return false;
    }
    match available(device) {
        Ok(()) => true,
        Err(e) => {
            WARNED
                .call_once(|| eprintln!("warning: fused GPU kernels unavailable ({e}); using libtorch ops"));
            false
        }
    }
}

/// A fused kernel failed: say so and use libtorch ops for the rest of the
/// process (its results never mix with a half-finished fused pass: callers
/// start over on the libtorch path).
pub fn disable(e: &anyhow::Error) {
    eprintln!("warning: fused GPU kernel failed, using libtorch ops from now on: {e:#}");
    set_enabled(false);
}

/// Where NVRTC was loaded from and its version, or why it was not.
pub fn describe() -> String {
    match RTC.get_or_init(load) {
        Ok(r) => {
            let (a, b) = r.nvrtc.version();
            format!("NVRTC {a}.{b} ({})", r.nvrtc.path)
        }
        Err(e) => e.clone(),
    }
}

// The target of each transmute is the field's declared signature.
#[allow(clippy::missing_transmute_annotations)]
fn load() -> std::result::Result<Rtc, String> {
    // SAFETY: dlopen/dlsym with NUL-terminated names; every symbol is cast to
    // the signature its header declares.
    unsafe {
        let cuda = nvrtc::open("libcuda.so.1", libc::RTLD_NOW | libc::RTLD_LOCAL);
        if cuda.is_null() {
            return Err("no NVIDIA driver here (libcuda.so.1 cannot be loaded)".into());
        }
        let nvrtc = nvrtc::get()?;
        let d = "libcuda.so.1";
        let f = Fns {
            cu_init: std::mem::transmute(nvrtc::sym(cuda, d, c"cuInit")?),
            cu_device_get: std::mem::transmute(nvrtc::sym(cuda, d, c"cuDeviceGet")?),
            cu_device_attr: std::mem::transmute(nvrtc::sym(cuda, d, c"cuDeviceGetAttribute")?),
            cu_primary_ctx: std::mem::transmute(nvrtc::sym(cuda, d, c"cuDevicePrimaryCtxRetain")?),
            cu_ctx_push: std::mem::transmute(nvrtc::sym(cuda, d, c"cuCtxPushCurrent_v2")?),
            cu_ctx_pop: std::mem::transmute(nvrtc::sym(cuda, d, c"cuCtxPopCurrent_v2")?),
            cu_ctx_current: std::mem::transmute(nvrtc::sym(cuda, d, c"cuCtxGetCurrent")?),
            cu_module_load: std::mem::transmute(nvrtc::sym(cuda, d, c"cuModuleLoadData")?),
            cu_module_fn: std::mem::transmute(nvrtc::sym(cuda, d, c"cuModuleGetFunction")?),
            cu_launch: std::mem::transmute(nvrtc::sym(cuda, d, c"cuLaunchKernel")?),
            cu_error_string: std::mem::transmute(nvrtc::sym(cuda, d, c"cuGetErrorString")?),
        };
        let r = (f.cu_init)(0);
        if r != 0 {
            return Err(format!("cuInit failed (CUDA error {r})"));
        }
        Ok(Rtc { f, nvrtc, devices: Mutex::new(HashMap::new()) })
    }
}

impl Rtc {
    fn cu(&self, r: CuResult, what: &str) -> Result<()> {
        if r == 0 {
            return Ok(());
        }
        let mut s: *const c_char = std::ptr::null();
        // SAFETY: the driver writes a pointer to a static string (or nothing).
        unsafe { (self.f.cu_error_string)(r, &mut s) };
        let msg = if s.is_null() {
            format!("CUDA error {r}")
        } else {
            // SAFETY: a NUL-terminated static string from the driver.
            unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
        };
        bail!("{what}: {msg}")
    }

    /// `device`'s primary context (the one libtorch's runtime uses,
    /// retained once per process) and its number of SMs.
    fn device(&self, device: c_int) -> Result<(*mut c_void, i64)> {
        let mut known = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&(ctx, sms)) = known.get(&device) {
            return Ok((ctx as *mut c_void, sms));
        }
        let (mut dev, mut ctx, mut sms) = (0, std::ptr::null_mut(), 0);
        // SAFETY: out-pointers to locals; 16 is CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT.
        unsafe {
            self.cu((self.f.cu_device_get)(&mut dev, device), "cuDeviceGet")?;
            self.cu((self.f.cu_primary_ctx)(&mut ctx, dev), "cuDevicePrimaryCtxRetain")?;
            self.cu((self.f.cu_device_attr)(&mut sms, 16, dev), "cuDeviceGetAttribute")?;
        }
        known.insert(device, (ctx as usize, sms as i64));
        Ok((ctx, sms as i64))
    }

    /// Run `f` with `device`'s primary context current: as it is already
    /// on a thread where libtorch ran CUDA work on that device, else pushed
    /// for the call and popped after it (also when `f` panics).
    fn with_ctx<T>(&self, device: c_int, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let (ctx, _) = self.device(device)?;
        let mut cur = std::ptr::null_mut();
        // SAFETY: an out-pointer to a local.
        unsafe { (self.f.cu_ctx_current)(&mut cur) };
        if cur == ctx {
            return f();
        }
        struct Pop<'a>(&'a Rtc);
        impl Drop for Pop<'_> {
            fn drop(&mut self) {
                let mut old = std::ptr::null_mut();
                // SAFETY: pops the context pushed below, once.
                unsafe { (self.0.f.cu_ctx_pop)(&mut old) };
            }
        }
        // SAFETY: a context retained for the process's life.
        self.cu(unsafe { (self.f.cu_ctx_push)(ctx) }, "cuCtxPushCurrent")?;
        let _pop = Pop(self);
        f()
    }

    /// The compute capability of `device` as `major * 10 + minor`.
    fn capability(&self, device: c_int) -> Result<c_int> {
        let (mut major, mut minor, mut dev) = (0, 0, 0);
        // SAFETY: out-pointers to locals; 75/76 are CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_{MAJOR,MINOR}.
        unsafe {
            self.cu((self.f.cu_device_get)(&mut dev, device), "cuDeviceGet")?;
            self.cu((self.f.cu_device_attr)(&mut major, 75, dev), "cuDeviceGetAttribute")?;
            self.cu((self.f.cu_device_attr)(&mut minor, 76, dev), "cuDeviceGetAttribute")?;
        }
        Ok(major * 10 + minor)
    }
}

/// The kernel `entry` (an `extern "C" __global__` function) of `src`,
/// compiled for `device` on first use and cached.
pub fn kernel(device: Device, name: &str, src: &str, entry: &str) -> Result<Kernel> {
    let Device::Cuda(d) = device else { bail!("kernel {name}: {device:?} is not a CUDA device") };
    let d = d as c_int;
    let r = rtc()?;
    let mut guard = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    let cache = guard.get_or_insert_with(|| Cache { funcs: HashMap::new(), modules: HashMap::new() });
    if let Some(k) = cache.funcs.get(src).and_then(|f| f.get(&(d, entry.to_string()))) {
        return Ok(*k);
    }
    let loaded = cache.modules.get(src).and_then(|m| m.get(&d)).copied();
    let image = match loaded {
        Some(_) => None,
        None => Some(r.nvrtc.compile(name, src, r.capability(d)?, false)?.image),
    };
    let cname = CString::new(entry).map_err(|_| anyhow!("bad kernel name {entry}"))?;
    let (module, func) = r.with_ctx(d, || {
        let module = match (loaded, &image) {
            (Some(m), _) => m as *mut c_void,
            (None, Some(image)) => {
                let mut m = std::ptr::null_mut();
                // SAFETY: `image` is a complete cubin or NUL-terminated PTX.
                r.cu(
                    unsafe { (r.f.cu_module_load)(&mut m, image.as_ptr() as *const c_void) },
                    "cuModuleLoadData",
                )?;
                m
            }
            (None, None) => bail!("internal: kernel {name} neither cached nor compiled"),
        };
        let mut func = std::ptr::null_mut();
        // SAFETY: `module` is loaded; the name is NUL-terminated.
        r.cu(
            unsafe { (r.f.cu_module_fn)(&mut func, module, cname.as_ptr()) },
            &format!("kernel {name}: {entry}"),
        )?;
        Ok((module, func))
    })?;
    cache.modules.entry(src.to_string()).or_default().insert(d, module as usize);
    let k = Kernel { func, device: d };
    cache.funcs.entry(src.to_string()).or_default().insert((d, entry.to_string()), k);
    Ok(k)
}

/// One kernel argument: a device pointer, or an integer or float passed by
/// value. The driver copies as many bytes as the kernel's parameter has
/// from the start of each 8-byte slot (little-endian, so an `int`
/// parameter reads the low half).
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Ptr(*mut c_void),
    I64(i64),
    I32(i32),
    F32(f32),
}

impl Arg {
    fn slot(self) -> u64 {
        match self {
            Arg::Ptr(p) => p as u64,
            Arg::I64(v) => v as u64,
            Arg::I32(v) => v as u32 as u64,
            Arg::F32(v) => v.to_bits() as u64,
        }
    }

    /// The data pointer of `t` at element `offset` (at most its length),
    /// checking that `t` is contiguous. Callers check devices
    /// ([`same_device`]).
    pub fn tensor(t: &Tensor, offset: i64) -> Result<Arg> {
        if !t.is_contiguous() {
            bail!("kernel argument is not contiguous");
        }
        if offset < 0 || offset > t.numel() as i64 {
            bail!("kernel argument offset {offset} outside a tensor of {}", t.numel());
        }
        let size = t.kind().elt_size_in_bytes() as i64;
        // A device address: plain integer arithmetic, never dereferenced here.
        Ok(Arg::Ptr((t.data_ptr() as usize).wrapping_add((offset * size) as usize) as *mut c_void))
    }

    /// A null pointer (an optional input the kernel checks).
    pub fn null() -> Arg {
        Arg::Ptr(std::ptr::null_mut())
    }
}

/// Launch `k` on libtorch's current stream of its device (asynchronously).
pub fn launch(k: Kernel, grid: u32, block: u32, shared: u32, args: &[Arg]) -> Result<()> {
    launch_grid(k, [grid, 1, 1], block, shared, args)
}

/// [`launch`] over a 3-D grid.
pub fn launch_grid(k: Kernel, grid: [u32; 3], block: u32, shared: u32, args: &[Arg]) -> Result<()> {
    if grid.contains(&0) {
        return Ok(());
    }
    let r = rtc()?;
    LAUNCHES.fetch_add(1, Ordering::Relaxed);
    let stream = crate::cudagraph::current_stream(k.device as usize).map_err(|e| anyhow!(e))?;
    let mut slots: Vec<u64> = args.iter().map(|a| a.slot()).collect();
    let mut ptrs: Vec<*mut c_void> = slots.iter_mut().map(|s| s as *mut u64 as *mut c_void).collect();
    r.with_ctx(k.device, || {
        // SAFETY: one pointer per kernel parameter, each to an 8-byte slot
        // that outlives the call (the driver copies the values at launch).
        r.cu(
            unsafe {
                (r.f.cu_launch)(
                    k.func,
                    grid[0],
                    grid[1],
                    grid[2],
                    block,
                    1,
                    1,
                    shared,
                    stream,
                    ptrs.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            },
            "cuLaunchKernel",
        )
    })
}

/// Kernel launches so far in this process (tests check that a fused path
/// ran rather than fell back).
pub fn launches() -> u64 {
    LAUNCHES.load(Ordering::Relaxed)
}

/// Blocks for a grid-stride kernel over `n` elements on `device`: eight
/// per SM, never more than the elements need.
pub fn grid_for(device: Device, n: i64, block: u32) -> Result<u32> {
    let Device::Cuda(d) = device else { bail!("{device:?} is not a CUDA device") };
    let (_, sms) = rtc()?.device(d as c_int)?;
    let need = (n.max(0) as u64).div_ceil(block as u64);
    Ok(need.clamp(1, (sms.max(1) * 8) as u64) as u32)
}

/// Tensors passed to kernels must be on the kernel's device.
pub fn same_device(ts: &[&Tensor], device: Device) -> Result<()> {
    for t in ts {
        if t.device() != device {
            bail!("kernel argument on {:?}, expected {device:?}", t.device());
        }
    }
    Ok(())
}
