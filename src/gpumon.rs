//! GPU monitoring: a background thread samples a device through NVML
//! (utilisation, memory, temperature, power, clocks) at a fixed interval,
//! appends every sample to `<run>/gpu.jsonl`, and hands the training loop
//! a summary of each logging window and of the whole run.
//!
//! NVML is loaded at run time ([`crate::nvml`]); where it cannot be, the
//! monitor says why once and the run goes on unmonitored. A failing sample
//! or write never stops a run either.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::nvml::{Nvml, Sample};

/// Where samples come from: NVML, or a fake in tests.
pub trait Source {
    fn sample(&mut self) -> Result<Sample, String>;
}

/// One device of a loaded NVML.
pub struct NvmlSource {
    nvml: Nvml,
    index: u32,
}

impl NvmlSource {
    pub fn open(index: u32) -> Result<NvmlSource, String> {
        let nvml = Nvml::open()?;
        nvml.sample(index)?;
        Ok(NvmlSource { nvml, index })
    }
}

impl Source for NvmlSource {
    fn sample(&mut self) -> Result<Sample, String> {
        self.nvml.sample(self.index)
    }
}

/// Running sums of one quantity: mean and max.
#[derive(Clone, Copy, Debug, Default)]
struct Acc {
    sum: f64,
    n: u64,
    max: f64,
}

impl Acc {
    fn add(&mut self, v: Option<f64>) {
        if let Some(v) = v {
            self.max = if self.n == 0 { v } else { self.max.max(v) };
            self.sum += v;
            self.n += 1;
        }
    }

    fn mean(&self) -> Option<f64> {
        (self.n > 0).then(|| self.sum / self.n as f64)
    }

    fn max(&self) -> Option<f64> {
        (self.n > 0).then_some(self.max)
    }
}

/// Means and maxima over a span of samples.
#[derive(Clone, Debug, Default)]
struct Stats {
    samples: u64,
    util: Acc,
    util_mem: Acc,
    mem_used: Acc,
    power: Acc,
    temp: Acc,
    sm_clock: Acc,
}

impl Stats {
    fn add(&mut self, s: &Sample) {
        let f = |v: Option<u32>| v.map(f64::from);
        self.samples += 1;
        self.util.add(f(s.util_gpu));
        self.util_mem.add(f(s.util_mem));
        self.mem_used.add(Some(s.mem_used_mb));
        self.power.add(s.power_w);
        self.temp.add(f(s.temperature_c));
        self.sm_clock.add(f(s.sm_clock_mhz));
    }

    /// A logging window's metrics: means, except memory and temperature
    /// (their maxima, the figures that matter for headroom).
    fn window(&self) -> Map<String, Value> {
        let table: [(&str, Option<f64>); 5] = [
            ("gpu_util", self.util.mean()),
            ("gpu_mem_mb", self.mem_used.max()),
            ("gpu_power_w", self.power.mean()),
            ("gpu_temp_c", self.temp.max()),
            ("gpu_sm_mhz", self.sm_clock.mean()),
        ];
        table.into_iter().filter_map(|(k, v)| v.map(|v| (k.to_string(), json!(v)))).collect()
    }

    fn summary(&self) -> Map<String, Value> {
        let table: [(&str, Option<f64>); 8] = [
            ("gpu_util_mean", self.util.mean()),
            ("gpu_util_mem_mean", self.util_mem.mean()),
            ("gpu_mem_max_mb", self.mem_used.max()),
            ("gpu_power_mean_w", self.power.mean()),
            ("gpu_power_max_w", self.power.max()),
            ("gpu_temp_max_c", self.temp.max()),
            ("gpu_sm_mhz_mean", self.sm_clock.mean()),
            ("gpu_samples", Some(self.samples as f64)),
        ];
        table.into_iter().filter_map(|(k, v)| v.map(|v| (k.to_string(), json!(v)))).collect()
    }
}

#[derive(Default)]
struct Shared {
    window: Stats,
    total: Stats,
    name: String,
    error: Option<String>,
}

/// A running monitor; [`Monitor::stop`] (or drop) ends its thread.
pub struct Monitor {
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub path: PathBuf,
}

impl Monitor {
    /// Monitor NVML device `index` into `dir/gpu.jsonl` every `interval`.
    /// Err says why there is nothing to monitor (no driver, no device).
    pub fn start_nvml(dir: &Path, index: u32, interval: Duration) -> Result<Monitor, String> {
        // Open in the caller to report failures at once; NVML handles are
        // not Send, so the thread opens its own.
        NvmlSource::open(index)?;
        Ok(Monitor::start(dir, interval, move || {
            NvmlSource::open(index).map(|s| Box::new(s) as Box<dyn Source>)
        }))
    }

    /// Monitor what `open` (called on the sampling thread) gives.
    pub fn start<F>(dir: &Path, interval: Duration, open: F) -> Monitor
    where
        F: FnOnce() -> Result<Box<dyn Source>, String> + Send + 'static,
    {
        let path = dir.join("gpu.jsonl");
        let shared = Arc::new(Mutex::new(Shared::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (sh, st, p) = (shared.clone(), stop.clone(), path.clone());
        let thread = std::thread::Builder::new()
            .name("knlp-gpumon".into())
            .spawn(move || sample_loop(open, &p, interval, &sh, &st))
            .ok();
        Monitor { shared, stop, thread, path }
    }

    /// Metrics of the samples since the last call (empty if none).
    pub fn take_window(&self) -> Map<String, Value> {
        let mut s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let w = s.window.window();
        s.window = Stats::default();
        w
    }

    /// Metrics of every sample so far, with the device's name.
    pub fn summary(&self) -> Map<String, Value> {
        let s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let mut m = s.total.summary();
        if !s.name.is_empty() {
            m.insert("gpu_name".into(), json!(s.name));
        }
        m
    }

    /// The first sampling or writing error, if any.
    pub fn error(&self) -> Option<String> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner()).error.clone()
    }

    /// Stop sampling (after a last sample) and return the run's summary.
    pub fn stop(mut self) -> Map<String, Value> {
        self.halt();
        self.summary()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.halt();
    }
}

fn sample_loop<F>(open: F, path: &Path, interval: Duration, shared: &Mutex<Shared>, stop: &AtomicBool)
where
    F: FnOnce() -> Result<Box<dyn Source>, String>,
{
    let fail = |e: String| {
        let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
        s.error.get_or_insert(e);
    };
    let mut source = match open() {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let mut file = match std::fs::OpenOptions::new().create(true).append(true).open(path) {
        Ok(f) => Some(f),
        Err(e) => {
            fail(format!("{}: cannot write ({e})", path.display()));
            None
        }
    };
    let t0 = Instant::now();
    let mut next = t0;
    loop {
        let last = stop.load(Ordering::SeqCst);
        match source.sample() {
            Ok(s) => {
                let line = s.json_line(json!({ "elapsed_s": t0.elapsed().as_secs_f64() }));
                if let Some(f) = file.as_mut() {
                    if let Err(e) = writeln!(f, "{line}") {
                        fail(format!("{}: cannot write ({e})", path.display()));
                        file = None;
                    }
                }
                let mut sh = shared.lock().unwrap_or_else(|e| e.into_inner());
                sh.window.add(&s);
                sh.total.add(&s);
                if sh.name.is_empty() {
                    sh.name = s.name.clone();
                }
            }
            Err(e) => fail(e),
        }
        if last {
            return;
        }
        next += interval;
        let now = Instant::now();
        if next > now {
            std::thread::park_timeout(next - now);
        } else {
            next = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Utilisation 10, 20, 30, ...; memory 1000 + 10 i; power 100 + i.
    struct Fake(u32);

    impl Source for Fake {
        fn sample(&mut self) -> Result<Sample, String> {
            self.0 += 1;
            let i = self.0;
            Ok(Sample {
                index: 0,
                name: "Fake GPU".into(),
                mem_total_mb: 80000.0,
                mem_free_mb: 80000.0 - (1000.0 + 10.0 * i as f64),
                mem_used_mb: 1000.0 + 10.0 * i as f64,
                util_gpu: Some(10 * i),
                util_mem: Some(i),
                temperature_c: Some(40 + i),
                power_w: Some(100.0 + i as f64),
                sm_clock_mhz: Some(1980),
                mem_clock_mhz: None,
            })
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("knlp-gpumon-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn samples_go_to_the_file_the_windows_and_the_summary() {
        let dir = scratch("fake");
        let m = Monitor::start(&dir, Duration::from_millis(5), || Ok(Box::new(Fake(0)) as Box<dyn Source>));
        while m.summary().get("gpu_samples").and_then(Value::as_f64).unwrap_or(0.0) < 4.0 {
            std::thread::sleep(Duration::from_millis(2));
        }
        let w = m.take_window();
        assert!(w["gpu_util"].as_f64().unwrap() >= 20.0, "{w:?}");
        let s = m.stop();
        let n = s["gpu_samples"].as_f64().unwrap() as u32;
        // Samples i = 1..=n: means and maxima of the fake's formulas.
        let mean = |f: &dyn Fn(f64) -> f64| (1..=n).map(|i| f(i as f64)).sum::<f64>() / n as f64;
        assert!((s["gpu_util_mean"].as_f64().unwrap() - mean(&|i| 10.0 * i)).abs() < 1e-9);
        assert!((s["gpu_power_mean_w"].as_f64().unwrap() - mean(&|i| 100.0 + i)).abs() < 1e-9);
        assert_eq!(s["gpu_mem_max_mb"].as_f64().unwrap(), 1000.0 + 10.0 * n as f64);
        assert_eq!(s["gpu_temp_max_c"].as_f64().unwrap(), 40.0 + n as f64);
        assert_eq!(s["gpu_name"], "Fake GPU");
        let lines: Vec<Value> = std::fs::read_to_string(dir.join("gpu.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len() as u32, n, "one line per sample");
        assert_eq!(lines[2]["util_gpu"], 30);
        assert!(lines[1]["elapsed_s"].as_f64().unwrap() >= lines[0]["elapsed_s"].as_f64().unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn failures_are_reported_not_fatal() {
        let dir = scratch("fail");
        let m = Monitor::start(&dir, Duration::from_millis(5), || Err("no NVIDIA driver here".into()));
        let t = Instant::now();
        while m.error().is_none() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(m.error().as_deref(), Some("no NVIDIA driver here"));
        assert!(m.take_window().is_empty());
        assert_eq!(m.stop()["gpu_samples"], 0.0);
        // Without NVML (this machine, CI) the real monitor says why.
        if Nvml::open().is_err() {
            let e = Monitor::start_nvml(&dir, 0, Duration::from_secs(1)).err().unwrap();
            assert!(e.contains("libnvidia-ml"), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
