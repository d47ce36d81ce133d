//! NVIDIA's management library, loaded at run time (`libnvidia-ml.so.1`,
//! installed with the driver), so that machines without it are unaffected:
//! [`Nvml::open`] then says why it is unavailable.
//!
//! Only the calls knlp needs: device count, name, memory, utilisation,
//! temperature, power and clocks.
use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void, CStr};

type Ret = c_int;
type Dev = *mut c_void;

#[repr(C)]
#[derive(Default)]
struct Memory {
    total: c_ulonglong,
    free: c_ulonglong,
    used: c_ulonglong,
}

#[repr(C)]
#[derive(Default)]
struct Utilization {
    gpu: c_uint,
    memory: c_uint,
}

/// One device's state, as NVML reports it.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Sample {
    pub index: u32,
    pub name: String,
    pub mem_total_mb: f64,
    pub mem_free_mb: f64,
    pub mem_used_mb: f64,
    /// Percent of the last sample period with a kernel running / memory busy.
    pub util_gpu: Option<u32>,
    pub util_mem: Option<u32>,
    pub temperature_c: Option<u32>,
    pub power_w: Option<f64>,
    pub sm_clock_mhz: Option<u32>,
    pub mem_clock_mhz: Option<u32>,
}

impl Sample {
    /// One JSON line of this sample: `time` (Unix seconds), the fields of
    /// `extra`, then the sample's own fields.
    pub fn json_line(&self, extra: serde_json::Value) -> String {
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let mut v = serde_json::json!({ "time": time });
        if let (Some(o), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
            o.extend(e);
        }
        if let (Some(o), Ok(serde_json::Value::Object(f))) = (v.as_object_mut(), serde_json::to_value(self)) {
            o.extend(f);
        }
        v.to_string()
    }
}

struct Fns {
    get_count: unsafe extern "C" fn(*mut c_uint) -> Ret,
    get_handle: unsafe extern "C" fn(c_uint, *mut Dev) -> Ret,
    get_name: unsafe extern "C" fn(Dev, *mut c_char, c_uint) -> Ret,
    get_memory: unsafe extern "C" fn(Dev, *mut Memory) -> Ret,
    get_util: unsafe extern "C" fn(Dev, *mut Utilization) -> Ret,
    get_temp: unsafe extern "C" fn(Dev, c_int, *mut c_uint) -> Ret,
    get_power: unsafe extern "C" fn(Dev, *mut c_uint) -> Ret,
    get_clock: unsafe extern "C" fn(Dev, c_int, *mut c_uint) -> Ret,
}

/// A loaded, initialised NVML.
pub struct Nvml {
    lib: *mut c_void,
    f: Fns,
}

unsafe fn sym(lib: *mut c_void, name: &CStr) -> Result<*mut c_void, String> {
    let p = libc::dlsym(lib, name.as_ptr());
    if p.is_null() {
        Err(format!("libnvidia-ml.so.1 lacks {}", name.to_string_lossy()))
    } else {
        Ok(p)
    }
}

impl Nvml {
    // The target of each transmute is the field's declared signature.
    #[allow(clippy::missing_transmute_annotations)]
    pub fn open() -> Result<Nvml, String> {
        // SAFETY: dlopen/dlsym with NUL-terminated names; every symbol is
        // cast to the signature NVML's header declares for it.
        unsafe {
            let lib = libc::dlopen(c"libnvidia-ml.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
            if lib.is_null() {
                return Err("no NVIDIA driver here (libnvidia-ml.so.1 cannot be loaded)".into());
            }
            let init: unsafe extern "C" fn() -> Ret = std::mem::transmute(sym(lib, c"nvmlInit_v2")?);
            let f = Fns {
                get_count: std::mem::transmute(sym(lib, c"nvmlDeviceGetCount_v2")?),
                get_handle: std::mem::transmute(sym(lib, c"nvmlDeviceGetHandleByIndex_v2")?),
                get_name: std::mem::transmute(sym(lib, c"nvmlDeviceGetName")?),
                get_memory: std::mem::transmute(sym(lib, c"nvmlDeviceGetMemoryInfo")?),
                get_util: std::mem::transmute(sym(lib, c"nvmlDeviceGetUtilizationRates")?),
                get_temp: std::mem::transmute(sym(lib, c"nvmlDeviceGetTemperature")?),
                get_power: std::mem::transmute(sym(lib, c"nvmlDeviceGetPowerUsage")?),
                get_clock: std::mem::transmute(sym(lib, c"nvmlDeviceGetClockInfo")?),
            };
            let r = init();
            if r != 0 {
                libc::dlclose(lib);
                return Err(format!("nvmlInit failed (NVML error {r})"));
            }
            Ok(Nvml { lib, f })
        }
    }

    pub fn count(&self) -> Result<u32, String> {
        let mut n: c_uint = 0;
        // SAFETY: a valid out-pointer.
        match unsafe { (self.f.get_count)(&mut n) } {
            0 => Ok(n),
            r => Err(format!("nvmlDeviceGetCount failed (NVML error {r})")),
        }
    }

    /// The state of device `index` (NVML's numbering: all devices, not
    /// those CUDA_VISIBLE_DEVICES leaves visible; see [`nvml_index`]).
    pub fn sample(&self, index: u32) -> Result<Sample, String> {
        let mut d: Dev = std::ptr::null_mut();
        // SAFETY: out-pointers to live locals; NVML writes at most `len` name bytes.
        unsafe {
            let r = (self.f.get_handle)(index, &mut d);
            if r != 0 {
                return Err(format!("no NVIDIA device {index} (NVML error {r})"));
            }
            let mut name = [0 as c_char; 96];
            let name = match (self.f.get_name)(d, name.as_mut_ptr(), name.len() as c_uint) {
                0 => CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned(),
                _ => String::new(),
            };
            let mut m = Memory::default();
            let r = (self.f.get_memory)(d, &mut m);
            if r != 0 {
                return Err(format!("nvmlDeviceGetMemoryInfo failed (NVML error {r})"));
            }
            let mb = |b: c_ulonglong| b as f64 / (1u64 << 20) as f64;
            let mut u = Utilization::default();
            let util = ((self.f.get_util)(d, &mut u) == 0).then_some((u.gpu, u.memory));
            let get = |f: &dyn Fn(*mut c_uint) -> Ret| {
                let mut v: c_uint = 0;
                (f(&mut v) == 0).then_some(v)
            };
            Ok(Sample {
                index,
                name,
                mem_total_mb: mb(m.total),
                mem_free_mb: mb(m.free),
                mem_used_mb: mb(m.used),
                util_gpu: util.map(|u| u.0),
                util_mem: util.map(|u| u.1),
                temperature_c: get(&|p| (self.f.get_temp)(d, 0, p)),
                power_w: get(&|p| (self.f.get_power)(d, p)).map(|mw| mw as f64 / 1000.0),
                sm_clock_mhz: get(&|p| (self.f.get_clock)(d, 1, p)),
                mem_clock_mhz: get(&|p| (self.f.get_clock)(d, 2, p)),
            })
        }
    }
}

impl Drop for Nvml {
    fn drop(&mut self) {
        // SAFETY: NVML was initialised by `open`; shutdown balances it.
        unsafe {
            if let Ok(p) = sym(self.lib, c"nvmlShutdown") {
                let shutdown: unsafe extern "C" fn() -> Ret = std::mem::transmute(p);
                shutdown();
            }
            libc::dlclose(self.lib);
        }
    }
}

/// NVML's index of CUDA device `cuda`: CUDA_VISIBLE_DEVICES renumbers the
/// devices CUDA sees, NVML's numbering does not. None when the variable
/// names devices by UUID (not resolved here).
pub fn nvml_index(cuda: usize, visible: Option<&str>) -> Option<u32> {
    match visible.map(str::trim).filter(|v| !v.is_empty()) {
        None => u32::try_from(cuda).ok(),
        Some(v) => v.split(',').nth(cuda).and_then(|x| x.trim().parse().ok()),
    }
}
