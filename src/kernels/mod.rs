//! Fused GPU kernels, compiled at run time with NVRTC and launched on
//! libtorch's current stream. knlp needs no CUDA toolkit: the torch wheel
//! ships NVRTC (`nvidia/cu13/lib/libnvrtc.so.13`) and the driver ships
//! `libcuda.so.1`; both are loaded with `dlopen` on first use. Compiled
//! modules are cached per device and source for the life of the process.
//!
//! Every kernel family has a libtorch path that computes the same thing
//! (the reference its GPU test compares against); callers fall back to it,
//! with one warning, wherever this runtime is unavailable.
pub mod mla;
pub mod norm;
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
type NvrtcResult = c_int;
type Prog = *mut c_void;

/// The driver and NVRTC entry points knlp uses, with the signatures of
/// `cuda.h` and `nvrtc.h` (opaque handles as pointers, `CUdevice` as int).
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
    rtc_create: unsafe extern "C" fn(
        *mut Prog,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> NvrtcResult,
    rtc_compile: unsafe extern "C" fn(Prog, c_int, *const *const c_char) -> NvrtcResult,
    rtc_log_size: unsafe extern "C" fn(Prog, *mut usize) -> NvrtcResult,
    rtc_log: unsafe extern "C" fn(Prog, *mut c_char) -> NvrtcResult,
    rtc_cubin_size: unsafe extern "C" fn(Prog, *mut usize) -> NvrtcResult,
    rtc_cubin: unsafe extern "C" fn(Prog, *mut c_char) -> NvrtcResult,
    rtc_ptx_size: unsafe extern "C" fn(Prog, *mut usize) -> NvrtcResult,
    rtc_ptx: unsafe extern "C" fn(Prog, *mut c_char) -> NvrtcResult,
    rtc_destroy: unsafe extern "C" fn(*mut Prog) -> NvrtcResult,
    rtc_error_string: unsafe extern "C" fn(NvrtcResult) -> *const c_char,
    rtc_num_archs: unsafe extern "C" fn(*mut c_int) -> NvrtcResult,
    rtc_archs: unsafe extern "C" fn(*mut c_int) -> NvrtcResult,
    rtc_version: unsafe extern "C" fn(*mut c_int, *mut c_int) -> NvrtcResult,
}

/// The loaded libraries and where NVRTC came from.
struct Rtc {
    f: Fns,
    nvrtc_path: String,
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
            let (mut a, mut b) = (0, 0);
            // SAFETY: two out-pointers to locals.
            unsafe { (r.f.rtc_version)(&mut a, &mut b) };
            format!("NVRTC {a}.{b} ({})", r.nvrtc_path)
        }
        Err(e) => e.clone(),
    }
}

/// The folder libtorch's libc10.so was loaded from (the wheel's
/// `torch/lib`), read from the process's own memory map.
fn torch_lib_dir() -> Option<std::path::PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libc10.so"))
        .and_then(|p| std::path::Path::new(p).parent().map(|d| d.to_path_buf()))
}

/// NVRTC candidates, most specific first: `KNLP_NVRTC`, the wheels beside
/// the loaded libtorch (CUDA 13 and 12 layouts), then the loader's search
/// path.
fn nvrtc_candidates() -> Vec<String> {
    let mut c = Vec::new();
    if let Ok(p) = std::env::var("KNLP_NVRTC") {
        c.push(p);
    }
    if let Some(lib) = torch_lib_dir() {
        let site = lib.join("../..");
        for rel in ["nvidia/cu13/lib/libnvrtc.so.13", "nvidia/cuda_nvrtc/lib/libnvrtc.so.12"] {
            let p = site.join(rel);
            if p.exists() {
                c.push(p.display().to_string());
            }
        }
    }
    c.extend(["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"].map(String::from));
    c
}

unsafe fn open(name: &str) -> *mut c_void {
    let Ok(c) = CString::new(name) else { return std::ptr::null_mut() };
    libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL)
}

unsafe fn sym(lib: *mut c_void, what: &str, name: &CStr) -> std::result::Result<*mut c_void, String> {
    let p = libc::dlsym(lib, name.as_ptr());
    if p.is_null() {
        Err(format!("{what} lacks {}", name.to_string_lossy()))
    } else {
        Ok(p)
    }
}

// The target of each transmute is the field's declared signature.
#[allow(clippy::missing_transmute_annotations)]
fn load() -> std::result::Result<Rtc, String> {
    // SAFETY: dlopen/dlsym with NUL-terminated names; every symbol is cast to
    // the signature its header declares.
    unsafe {
        let cuda = open("libcuda.so.1");
        if cuda.is_null() {
            return Err("no NVIDIA driver here (libcuda.so.1 cannot be loaded)".into());
        }
        let tried = nvrtc_candidates();
        let Some((nvrtc, nvrtc_path)) =
            tried.iter().map(|p| (open(p), p.clone())).find(|(h, _)| !h.is_null())
        else {
            return Err(format!("NVRTC not found (tried {}; set KNLP_NVRTC)", tried.join(", ")));
        };
        let d = "libcuda.so.1";
        let n = nvrtc_path.as_str();
        let f = Fns {
            cu_init: std::mem::transmute(sym(cuda, d, c"cuInit")?),
            cu_device_get: std::mem::transmute(sym(cuda, d, c"cuDeviceGet")?),
            cu_device_attr: std::mem::transmute(sym(cuda, d, c"cuDeviceGetAttribute")?),
            cu_primary_ctx: std::mem::transmute(sym(cuda, d, c"cuDevicePrimaryCtxRetain")?),
            cu_ctx_push: std::mem::transmute(sym(cuda, d, c"cuCtxPushCurrent_v2")?),
            cu_ctx_pop: std::mem::transmute(sym(cuda, d, c"cuCtxPopCurrent_v2")?),
            cu_ctx_current: std::mem::transmute(sym(cuda, d, c"cuCtxGetCurrent")?),
            cu_module_load: std::mem::transmute(sym(cuda, d, c"cuModuleLoadData")?),
            cu_module_fn: std::mem::transmute(sym(cuda, d, c"cuModuleGetFunction")?),
            cu_launch: std::mem::transmute(sym(cuda, d, c"cuLaunchKernel")?),
            cu_error_string: std::mem::transmute(sym(cuda, d, c"cuGetErrorString")?),
            rtc_create: std::mem::transmute(sym(nvrtc, n, c"nvrtcCreateProgram")?),
            rtc_compile: std::mem::transmute(sym(nvrtc, n, c"nvrtcCompileProgram")?),
            rtc_log_size: std::mem::transmute(sym(nvrtc, n, c"nvrtcGetProgramLogSize")?),
            rtc_log: std::mem::transmute(sym(nvrtc, n, c"nvrtcGetProgramLog")?),
            rtc_cubin_size: std::mem::transmute(sym(nvrtc, n, c"nvrtcGetCUBINSize")?),
            rtc_cubin: std::mem::transmute(sym(nvrtc, n, c"nvrtcGetCUBIN")?),
            rtc_ptx_size: std::mem::transmute(sym(nvrtc, n, c"nvrtcGetPTXSize")?),
            rtc_ptx: std::mem::transmute(sym(nvrtc, n, c"nvrtcGetPTX")?),
            rtc_destroy: std::mem::transmute(sym(nvrtc, n, c"nvrtcDestroyProgram")?),
            rtc_error_string: std::mem::transmute(sym(nvrtc, n, c"nvrtcGetErrorString")?),
            rtc_num_archs: std::mem::transmute(sym(nvrtc, n, c"nvrtcGetNumSupportedArchs")?),
            rtc_archs: std::mem::transmute(sym(nvrtc, n, c"nvrtcGetSupportedArchs")?),
            rtc_version: std::mem::transmute(sym(nvrtc, n, c"nvrtcVersion")?),
        };
        let r = (f.cu_init)(0);
        if r != 0 {
            return Err(format!("cuInit failed (CUDA error {r})"));
        }
        Ok(Rtc { f, nvrtc_path, devices: Mutex::new(HashMap::new()) })
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

    fn rtc(&self, r: NvrtcResult, what: &str) -> Result<()> {
        if r == 0 {
            return Ok(());
        }
        // SAFETY: NVRTC returns a static NUL-terminated string.
        let msg = unsafe { CStr::from_ptr((self.f.rtc_error_string)(r)) }.to_string_lossy().into_owned();
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

    /// Compile `src` for compute capability `cc`: a cubin when this NVRTC
    /// knows the architecture, else PTX for the newest one it knows below
    /// it (the driver finishes the compilation).
    fn compile(&self, name: &str, src: &str, cc: c_int) -> Result<Vec<u8>> {
        let mut count = 0;
        // SAFETY: out-pointer, then a buffer of the reported length.
        let archs = unsafe {
            self.rtc((self.f.rtc_num_archs)(&mut count), "nvrtcGetNumSupportedArchs")?;
            let mut a = vec![0; count.max(0) as usize];
            self.rtc((self.f.rtc_archs)(a.as_mut_ptr()), "nvrtcGetSupportedArchs")?;
            a
        };
        let cubin = archs.contains(&cc);
        let arch = if cubin {
            format!("--gpu-architecture=sm_{cc}")
        } else {
            let below = archs.iter().copied().filter(|a| *a <= cc).max();
            let Some(a) = below else { bail!("NVRTC supports no architecture at or below sm_{cc}") };
            format!("--gpu-architecture=compute_{a}")
        };
        let opts: Vec<CString> = [arch.as_str(), "--std=c++17", "-default-device"]
            .iter()
            .map(|o| CString::new(*o).unwrap())
            .collect();
        let optp: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
        let csrc = CString::new(src).map_err(|_| anyhow!("kernel source {name} contains NUL"))?;
        let cname = CString::new(format!("{name}.cu")).unwrap();
        let mut prog: Prog = std::ptr::null_mut();
        // SAFETY: NVRTC copies the source; the program is destroyed below.
        unsafe {
            self.rtc(
                (self.f.rtc_create)(
                    &mut prog,
                    csrc.as_ptr(),
                    cname.as_ptr(),
                    0,
                    std::ptr::null(),
                    std::ptr::null(),
                ),
                "nvrtcCreateProgram",
            )?;
        }
        let out = (|| {
            // SAFETY: `prog` is live; buffers are sized by NVRTC's own answers.
            unsafe {
                let r = (self.f.rtc_compile)(prog, optp.len() as c_int, optp.as_ptr());
                if r != 0 {
                    let mut n = 0usize;
                    (self.f.rtc_log_size)(prog, &mut n);
                    let mut log = vec![0u8; n.max(1)];
                    (self.f.rtc_log)(prog, log.as_mut_ptr() as *mut c_char);
                    let log = String::from_utf8_lossy(&log).trim_end_matches('\0').trim().to_string();
                    bail!("NVRTC could not compile kernel {name} for sm_{cc}:\n{log}");
                }
                let (size, get) = if cubin {
                    (self.f.rtc_cubin_size, self.f.rtc_cubin)
                } else {
                    (self.f.rtc_ptx_size, self.f.rtc_ptx)
                };
                let mut n = 0usize;
                self.rtc(size(prog, &mut n), "nvrtcGet{CUBIN,PTX}Size")?;
                let mut image = vec![0u8; n];
                self.rtc(get(prog, image.as_mut_ptr() as *mut c_char), "nvrtcGet{CUBIN,PTX}")?;
                Ok(image)
            }
        })();
        // SAFETY: destroys the program created above, once.
        unsafe { (self.f.rtc_destroy)(&mut prog) };
        out
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
        None => Some(r.compile(name, src, r.capability(d)?)?),
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
