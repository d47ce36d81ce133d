//! Where a piece of work spends its time: libtorch's Kineto profiler (the
//! one behind torch.profiler) through the C++ shim (`csrc/profile.cpp`),
//! summarised the way `benchmarks/profile_gpt2_torch.py` summarises
//! PyTorch's step, so that knlp's kernels and PyTorch's can be compared
//! kind by kind.
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_int};
use std::path::Path;

extern "C" {
    fn knlp_profile_last_error() -> *const c_char;
    fn knlp_profile_start(cuda: c_int) -> c_int;
    fn knlp_profile_stop(trace: *const c_char, n: *mut i64) -> c_int;
    fn knlp_profile_event(i: i64, name: *mut *const c_char, device: *mut c_int, dur_ns: *mut i64) -> c_int;
}

fn check(rc: c_int) -> Result<(), String> {
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: a pointer into the shim's thread-local error string.
    let msg = unsafe { CStr::from_ptr(knlp_profile_last_error()) };
    Err(format!("profiler: {}", crate::tensor::clean_torch_message(&msg.to_string_lossy())))
}

/// Kernel kinds, first match wins (the table of
/// `benchmarks/profile_gpt2_torch.py`, plus knlp's own NVRTC kernels).
const KINDS: &[(&str, &[&str])] = &[
    (
        "knlp fused (nvrtc)",
        &[
            "add_ln_",
            "keep_above",
            "mla_attend",
            "mla_combine",
            "mla_row",
            "radix_",
            "score_keys",
            "xent_bf16",
        ],
    ),
    ("attention", &["flash", "fmha", "attention"]),
    ("matmul", &["gemm", "nvjet", "cutlass", "sm90_", "sm80_", "xmma"]),
    ("optimizer", &["adam", "multi_tensor", "foreach"]),
    ("loss", &["cross_entropy", "log_softmax", "nll"]),
    ("norm", &["layer_norm", "layernorm"]),
    ("embedding", &["embedding", "index"]),
];

/// The kind of a device kernel, by its name.
pub fn kind(name: &str) -> &'static str {
    let n = name.to_ascii_lowercase();
    KINDS
        .iter()
        .find(|(_, keys)| keys.iter().any(|k| n.contains(k)))
        .map(|(k, _)| *k)
        .unwrap_or(if n.starts_with("triton") { "triton (fused)" } else { "other elementwise/copy" })
}

/// Time and calls of one name.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub name: String,
    pub ms: f64,
    pub calls: u64,
}

/// A profiled region, summed over its events.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Device work (kernels, copies, memsets) by name, longest first.
    pub kernels: Vec<Entry>,
    /// CPU operators (`aten::mm`, ...) by name, longest first. Their times
    /// include the operators they call.
    pub cpu_ops: Vec<Entry>,
}

impl Report {
    pub fn gpu_ms(&self) -> f64 {
        self.kernels.iter().fold(0.0, |s, e| s + e.ms)
    }

    pub fn kernel_calls(&self) -> u64 {
        self.kernels.iter().map(|e| e.calls).sum()
    }

    /// Device time by [`kind`], longest first.
    pub fn by_kind(&self) -> Vec<(&'static str, f64)> {
        let mut m: HashMap<&'static str, f64> = HashMap::new();
        for e in &self.kernels {
            *m.entry(kind(&e.name)).or_default() += e.ms;
        }
        let mut v: Vec<_> = m.into_iter().collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    }
}

fn summarise(rows: impl Iterator<Item = (String, bool, i64)>) -> Report {
    let (mut dev, mut cpu): (HashMap<String, Entry>, HashMap<String, Entry>) = Default::default();
    for (name, on_device, ns) in rows {
        let m = if on_device { &mut dev } else { &mut cpu };
        let e = m.entry(name.clone()).or_insert(Entry { name, ms: 0.0, calls: 0 });
        e.ms += ns.max(0) as f64 / 1e6;
        e.calls += 1;
    }
    let sorted = |m: HashMap<String, Entry>| {
        let mut v: Vec<Entry> = m.into_values().collect();
        v.sort_by(|a, b| b.ms.total_cmp(&a.ms).then_with(|| a.name.cmp(&b.name)));
        v
    };
    Report { kernels: sorted(dev), cpu_ops: sorted(cpu) }
}

/// Runs `f` under the profiler (CPU operators, and CUDA kernels when CUDA is
/// available) and returns its result with the report; with `trace`, the
/// Chrome trace (chrome://tracing, Perfetto) is written there too. The
/// profiler is stopped whether or not `f` succeeds. Synchronise inside `f`
/// (`tch::Cuda::synchronize`) so that its last kernels are recorded.
pub fn run<T>(trace: Option<&Path>, f: impl FnOnce() -> T) -> Result<(T, Report), String> {
    let trace = match trace {
        Some(p) => Some(
            CString::new(p.to_string_lossy().as_bytes())
                .map_err(|_| format!("profiler: trace path {} contains a NUL byte", p.display()))?,
        ),
        None => None,
    };
    check(unsafe { knlp_profile_start(tch::Cuda::is_available() as c_int) })?;
    // Stops the profiler if `f` panics, so that the next profile can start.
    struct Running(bool);
    impl Drop for Running {
        fn drop(&mut self) {
            if self.0 {
                let mut n = 0i64;
                // SAFETY: a null trace path writes nothing.
                let _ = unsafe { knlp_profile_stop(std::ptr::null(), &mut n) };
            }
        }
    }
    let mut running = Running(true);
    let out = f();
    running.0 = false;
    let mut n = 0i64;
    let ptr = trace.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    check(unsafe { knlp_profile_stop(ptr, &mut n) })?;
    let mut rows = Vec::with_capacity(n.max(0) as usize);
    for i in 0..n {
        let (mut name, mut device, mut ns) = (std::ptr::null(), 0, 0i64);
        check(unsafe { knlp_profile_event(i, &mut name, &mut device, &mut ns) })?;
        // SAFETY: the shim keeps the names alive until the next stop.
        let name = unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned();
        rows.push((name, device != 0, ns));
    }
    Ok((out, summarise(rows.into_iter())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_the_table_in_order() {
        assert_eq!(kind("nvjet_sm90_tst_256x128"), "matmul");
        assert_eq!(kind("cudnn_generated_fort_native_sdpa_sm90_flash_bprop"), "attention");
        assert_eq!(kind("void at::native::vectorized_layer_norm_kernel<float>"), "norm");
        assert_eq!(kind("xent_bf16"), "knlp fused (nvrtc)");
        assert_eq!(kind("add_ln_bwd"), "knlp fused (nvrtc)");
        assert_eq!(kind("triton_poi_fused_gelu"), "triton (fused)");
        assert_eq!(kind("void at::native::direct_copy_kernel_cuda"), "other elementwise/copy");
    }

    #[test]
    fn summary_sums_per_name_and_sorts() {
        let rows = vec![
            ("a".to_string(), true, 1_000_000),
            ("b".to_string(), true, 3_000_000),
            ("a".to_string(), true, 1_500_000),
            ("aten::mm".to_string(), false, 2_000_000),
        ];
        let r = summarise(rows.into_iter());
        assert_eq!(r.kernels[0], Entry { name: "b".into(), ms: 3.0, calls: 1 });
        assert_eq!(r.kernels[1], Entry { name: "a".into(), ms: 2.5, calls: 2 });
        assert_eq!(r.kernel_calls(), 3);
        assert!((r.gpu_ms() - 5.5).abs() < 1e-12);
        assert_eq!(r.cpu_ops.len(), 1);
    }
}
