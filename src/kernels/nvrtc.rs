//! NVRTC on its own: loaded without the driver, so kernel sources can be
//! compiled (and checked, [`super::check`]) on a machine with no GPU. The
//! launch path in `kernels/mod.rs` uses the same loader and compiler.
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};

type NvrtcResult = c_int;
type Prog = *mut c_void;

/// The NVRTC entry points knlp uses, with the signatures of `nvrtc.h`.
struct Fns {
    create: unsafe extern "C" fn(
        *mut Prog,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> NvrtcResult,
    compile: unsafe extern "C" fn(Prog, c_int, *const *const c_char) -> NvrtcResult,
    log_size: unsafe extern "C" fn(Prog, *mut usize) -> NvrtcResult,
    log: unsafe extern "C" fn(Prog, *mut c_char) -> NvrtcResult,
    cubin_size: unsafe extern "C" fn(Prog, *mut usize) -> NvrtcResult,
    cubin: unsafe extern "C" fn(Prog, *mut c_char) -> NvrtcResult,
    ptx_size: unsafe extern "C" fn(Prog, *mut usize) -> NvrtcResult,
    ptx: unsafe extern "C" fn(Prog, *mut c_char) -> NvrtcResult,
    destroy: unsafe extern "C" fn(*mut Prog) -> NvrtcResult,
    error_string: unsafe extern "C" fn(NvrtcResult) -> *const c_char,
    num_archs: unsafe extern "C" fn(*mut c_int) -> NvrtcResult,
    archs: unsafe extern "C" fn(*mut c_int) -> NvrtcResult,
    version: unsafe extern "C" fn(*mut c_int, *mut c_int) -> NvrtcResult,
}

/// The loaded NVRTC and where it came from.
pub struct Nvrtc {
    f: Fns,
    pub path: String,
}

// SAFETY: plain C entry points; NVRTC is thread-safe across programs.
unsafe impl Send for Nvrtc {}
unsafe impl Sync for Nvrtc {}

/// What NVRTC made of one source.
pub struct Compiled {
    /// A cubin, or NUL-terminated PTX when NVRTC does not know the
    /// architecture (the driver finishes it).
    pub image: Vec<u8>,
    pub cubin: bool,
    /// NVRTC's log (ptxas's report when asked for one).
    pub log: String,
}

static NVRTC: OnceLock<std::result::Result<Nvrtc, String>> = OnceLock::new();

/// NVRTC, loaded on first use.
pub fn get() -> std::result::Result<&'static Nvrtc, String> {
    NVRTC.get_or_init(load).as_ref().map_err(|e| e.clone())
}

/// The folder libtorch's libc10.so was loaded from (the wheel's
/// `torch/lib`), read from the process's own memory map.
fn torch_lib_dir() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libc10.so"))
        .and_then(|p| Path::new(p).parent().map(|d| d.to_path_buf()))
}

/// NVRTC candidates, most specific first: `KNLP_NVRTC`, the wheels beside
/// the loaded libtorch (CUDA 13 and 12 layouts), then the loader's search
/// path.
fn candidates() -> Vec<String> {
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

pub(super) unsafe fn open(name: &str, flags: c_int) -> *mut c_void {
    let Ok(c) = CString::new(name) else { return std::ptr::null_mut() };
    libc::dlopen(c.as_ptr(), flags)
}

pub(super) unsafe fn sym(
    lib: *mut c_void,
    what: &str,
    name: &CStr,
) -> std::result::Result<*mut c_void, String> {
    let p = libc::dlsym(lib, name.as_ptr());
    if p.is_null() {
        Err(format!("{what} lacks {}", name.to_string_lossy()))
    } else {
        Ok(p)
    }
}

/// NVRTC opens its builtins library (`libnvrtc-builtins.so.MAJOR.MINOR`)
/// by name at the first compile, through the loader's search path, which
/// does not include the wheel's folder unless libtorch's CUDA libraries
/// happen to have loaded it already. Loading it from NVRTC's own folder
/// first makes the compile independent of that (a CPU-only process
/// compiles too). `anchor` is any symbol of the loaded NVRTC: its folder
/// comes from the loader, also when NVRTC was found by bare name.
fn preload_builtins(anchor: *mut c_void, (major, minor): (i32, i32)) {
    // SAFETY: dladdr fills `info` for an address inside a loaded object;
    // dli_fname is then a NUL-terminated path owned by the loader.
    let file = unsafe {
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(anchor as *const c_void, &mut info) == 0 || info.dli_fname.is_null() {
            return;
        }
        CStr::from_ptr(info.dli_fname).to_string_lossy().into_owned()
    };
    let Some(dir) = Path::new(&file).parent() else { return };
    let builtins = dir.join(format!("libnvrtc-builtins.so.{major}.{minor}"));
    if builtins.exists() {
        // SAFETY: dlopen of a library file; the handle stays open.
        unsafe { open(&builtins.display().to_string(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    }
}

// The target of each transmute is the field's declared signature.
#[allow(clippy::missing_transmute_annotations)]
fn load() -> std::result::Result<Nvrtc, String> {
    let tried = candidates();
    // SAFETY: dlopen/dlsym with NUL-terminated names; every symbol is cast
    // to the signature nvrtc.h declares.
    unsafe {
        let Some((lib, path)) = tried
            .iter()
            .map(|p| (open(p, libc::RTLD_NOW | libc::RTLD_LOCAL), p.clone()))
            .find(|(h, _)| !h.is_null())
        else {
            return Err(format!("NVRTC not found (tried {}; set KNLP_NVRTC)", tried.join(", ")));
        };
        let n = path.as_str();
        let f = Fns {
            create: std::mem::transmute(sym(lib, n, c"nvrtcCreateProgram")?),
            compile: std::mem::transmute(sym(lib, n, c"nvrtcCompileProgram")?),
            log_size: std::mem::transmute(sym(lib, n, c"nvrtcGetProgramLogSize")?),
            log: std::mem::transmute(sym(lib, n, c"nvrtcGetProgramLog")?),
            cubin_size: std::mem::transmute(sym(lib, n, c"nvrtcGetCUBINSize")?),
            cubin: std::mem::transmute(sym(lib, n, c"nvrtcGetCUBIN")?),
            ptx_size: std::mem::transmute(sym(lib, n, c"nvrtcGetPTXSize")?),
            ptx: std::mem::transmute(sym(lib, n, c"nvrtcGetPTX")?),
            destroy: std::mem::transmute(sym(lib, n, c"nvrtcDestroyProgram")?),
            error_string: std::mem::transmute(sym(lib, n, c"nvrtcGetErrorString")?),
            num_archs: std::mem::transmute(sym(lib, n, c"nvrtcGetNumSupportedArchs")?),
            archs: std::mem::transmute(sym(lib, n, c"nvrtcGetSupportedArchs")?),
            version: std::mem::transmute(sym(lib, n, c"nvrtcVersion")?),
        };
        let anchor = f.version as *mut c_void;
        let rtc = Nvrtc { f, path };
        preload_builtins(anchor, rtc.version());
        Ok(rtc)
    }
}

impl Nvrtc {
    fn check(&self, r: NvrtcResult, what: &str) -> Result<()> {
        if r == 0 {
            return Ok(());
        }
        // SAFETY: NVRTC returns a static NUL-terminated string.
        let msg = unsafe { CStr::from_ptr((self.f.error_string)(r)) }.to_string_lossy().into_owned();
        bail!("{what}: {msg}")
    }

    /// NVRTC's version as (major, minor).
    pub fn version(&self) -> (i32, i32) {
        let (mut a, mut b) = (0, 0);
        // SAFETY: two out-pointers to locals.
        unsafe { (self.f.version)(&mut a, &mut b) };
        (a, b)
    }

    /// The real architectures (`sm_XY` as XY) this NVRTC compiles cubins for.
    pub fn archs(&self) -> Result<Vec<c_int>> {
        let mut count = 0;
        // SAFETY: out-pointer, then a buffer of the reported length.
        unsafe {
            self.check((self.f.num_archs)(&mut count), "nvrtcGetNumSupportedArchs")?;
            let mut a = vec![0; count.max(0) as usize];
            self.check((self.f.archs)(a.as_mut_ptr()), "nvrtcGetSupportedArchs")?;
            Ok(a)
        }
    }

    /// Compile `src` for compute capability `cc`: a cubin when this NVRTC
    /// knows the architecture, else PTX for the newest one it knows below
    /// it. `verbose` asks ptxas for its register and spill report (in the
    /// log; cubins only).
    pub fn compile(&self, name: &str, src: &str, cc: c_int, verbose: bool) -> Result<Compiled> {
        let archs = self.archs()?;
        let cubin = archs.contains(&cc);
        let arch = if cubin {
            format!("--gpu-architecture=sm_{cc}")
        } else {
            let below = archs.iter().copied().filter(|a| *a <= cc).max();
            let Some(a) = below else { bail!("NVRTC supports no architecture at or below sm_{cc}") };
            format!("--gpu-architecture=compute_{a}")
        };
        let mut opts = vec![arch.as_str(), "--std=c++17", "-default-device"];
        if verbose && cubin {
            opts.push("--ptxas-options=-v");
        }
        let opts: Vec<CString> = opts.iter().map(|o| CString::new(*o).unwrap()).collect();
        let optp: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
        let csrc = CString::new(src).map_err(|_| anyhow!("kernel source {name} contains NUL"))?;
        let cname =
            CString::new(format!("{name}.cu")).map_err(|_| anyhow!("bad kernel source name {name}"))?;
        let mut prog: Prog = std::ptr::null_mut();
        // SAFETY: NVRTC copies the source; the program is destroyed below.
        unsafe {
            self.check(
                (self.f.create)(
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
                let r = (self.f.compile)(prog, optp.len() as c_int, optp.as_ptr());
                let mut n = 0usize;
                (self.f.log_size)(prog, &mut n);
                let mut log = vec![0u8; n.max(1)];
                (self.f.log)(prog, log.as_mut_ptr() as *mut c_char);
                let log = String::from_utf8_lossy(&log).trim_end_matches('\0').trim().to_string();
                if r != 0 {
                    bail!("NVRTC could not compile kernel {name} for sm_{cc}:\n{log}");
                }
                let (size, get) =
                    if cubin { (self.f.cubin_size, self.f.cubin) } else { (self.f.ptx_size, self.f.ptx) };
                let mut n = 0usize;
                self.check(size(prog, &mut n), "nvrtcGet{CUBIN,PTX}Size")?;
                let mut image = vec![0u8; n];
                self.check(get(prog, image.as_mut_ptr() as *mut c_char), "nvrtcGet{CUBIN,PTX}")?;
                Ok(Compiled { image, cubin, log })
            }
        })();
        // SAFETY: destroys the program created above, once.
        unsafe { (self.f.destroy)(&mut prog) };
        out
    }
}
