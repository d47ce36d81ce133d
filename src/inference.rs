//! The inference test (knlp-spec.md 14): after training, an image model's
//! forward pass timed at several batch sizes on random inputs, with its
//! memory (CUDA) and sparsity, for the run folder and the results table.
//!
//! Per batch size `b`: `warmup` untimed forwards, then `runs` timed ones,
//! each between device synchronisations; latency mean/std/min/max in ms
//! (std over the runs, n - 1), throughput `b / mean latency`. On CUDA, the
//! allocated memory before and with the input, and the peak of each
//! forward (peak statistics reset before it). A batch size that fails
//! (out of memory) is recorded with its error and the others still run.
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tch::{Device, Kind, Tensor};

use crate::models::Model;
use crate::params::Role;
use crate::tensor::torch_error;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceConfig {
    pub batch_sizes: Vec<i64>,
    pub warmup: i64,
    pub runs: i64,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        InferenceConfig { batch_sizes: vec![1, 8, 32, 128], warmup: 3, runs: 10 }
    }
}

impl InferenceConfig {
    pub fn validate(&self) -> Result<()> {
        if self.batch_sizes.is_empty() || self.batch_sizes.iter().any(|&b| !(1..=1 << 20).contains(&b)) {
            bail!("inference batch sizes must be a non-empty list of integers in 1..=1048576");
        }
        if self.warmup < 0 || !(1..=100_000).contains(&self.runs) {
            bail!("inference: warmup must be >= 0 and runs in 1..=100000");
        }
        Ok(())
    }
}

/// `"1, 8,32"` -> [1, 8, 32] (INFERENCE_BATCH_SIZES).
pub fn parse_batch_sizes(s: &str) -> Result<Vec<i64>> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| {
            x.parse::<i64>()
                .map_err(|_| anyhow!("'{x}' is not a batch size (a comma-separated list of integers)"))
        })
        .collect()
}

fn te(e: tch::TchError) -> anyhow::Error {
    anyhow!(torch_error(&e))
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

fn mib(bytes: i64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// Zero counts of the model's parameters, and of its prunable weights.
pub fn sparsity_counts(model: &dyn Model) -> Result<Value> {
    let (mut total, mut zeros, mut wtotal, mut wzeros) = (0i64, 0i64, 0i64, 0i64);
    for p in model.store().params() {
        let n = p.tensor.numel() as i64;
        let z = p.tensor.f_eq(0.0).and_then(|z| z.f_sum(Kind::Int64)).and_then(|s| s.f_int64_value(&[]));
        let z = z.map_err(te)?;
        total += n;
        zeros += z;
        if p.role == Role::Weight {
            wtotal += n;
            wzeros += z;
        }
    }
    let frac = |z: i64, n: i64| if n > 0 { z as f64 / n as f64 } else { 0.0 };
    Ok(json!({
        "params": total, "zero_params": zeros, "sparsity": frac(zeros, total),
        "weights": wtotal, "zero_weights": wzeros, "weight_sparsity": frac(wzeros, wtotal),
    }))
}

fn stats(ms: &[f64]) -> (f64, f64, f64, f64) {
    let n = ms.len() as f64;
    let mean = ms.iter().sum::<f64>() / n;
    let var = if ms.len() > 1 { ms.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    let min = ms.iter().copied().fold(f64::INFINITY, f64::min);
    let max = ms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (mean, var.sqrt(), min, max)
}

fn one_size(model: &dyn Model, sample: &[i64], b: i64, cfg: &InferenceConfig) -> Result<Map<String, Value>> {
    let device = model.store().device();
    let cuda = match device {
        Device::Cuda(i) => Some(i),
        _ => None,
    };
    let mem = |what: &str| -> Result<i64> {
        let s = crate::shim::memory_stats(cuda.unwrap_or(0)).map_err(|e| anyhow!("{what}: {e}"))?;
        Ok(s.allocated)
    };
    let mut out = Map::new();
    out.insert("batch_size".into(), json!(b));
    let baseline = cuda.map(|_| mem("memory")).transpose()?;
    let shape: Vec<i64> = std::iter::once(b).chain(sample.iter().copied()).collect();
    let x = Tensor::f_randn(shape.as_slice(), (Kind::Float, device)).map_err(te)?;
    let with_input = cuda.map(|_| mem("memory")).transpose()?;
    let mut times = Vec::new();
    let mut peaks = Vec::new();
    tch::no_grad(|| -> Result<()> {
        for i in 0..cfg.warmup + cfg.runs {
            if let Some(d) = cuda {
                crate::shim::reset_peak_memory(d).map_err(|e| anyhow!(e))?;
            }
            sync(device);
            let t = Instant::now();
            let y = model.forward(&x, false).map_err(te)?;
            sync(device);
            let ms = t.elapsed().as_secs_f64() * 1e3;
            drop(y);
            if i >= cfg.warmup {
                times.push(ms);
                if let Some(d) = cuda {
                    let s = crate::shim::memory_stats(d).map_err(|e| anyhow!(e))?;
                    peaks.push(s.peak_allocated);
                }
            }
        }
        Ok(())
    })?;
    let (mean, std, min, max) = stats(&times);
    out.insert("latency_ms_mean".into(), json!(mean));
    out.insert("latency_ms_std".into(), json!(std));
    out.insert("latency_ms_min".into(), json!(min));
    out.insert("latency_ms_max".into(), json!(max));
    out.insert("throughput_per_s".into(), json!(b as f64 / (mean / 1e3)));
    if let (Some(base), Some(inp)) = (baseline, with_input) {
        let p: Vec<f64> = peaks.iter().map(|&p| mib(p)).collect();
        let (pm, ps, pmin, pmax) = stats(&p);
        out.insert("mem_baseline_mb".into(), json!(mib(base)));
        out.insert("mem_with_input_mb".into(), json!(mib(inp)));
        out.insert("mem_peak_mb_mean".into(), json!(pm));
        out.insert("mem_peak_mb_std".into(), json!(ps));
        out.insert("mem_peak_mb_min".into(), json!(pmin));
        out.insert("mem_peak_mb_max".into(), json!(pmax));
        out.insert("mem_overhead_mb".into(), json!(pm - mib(inp)));
    }
    Ok(out)
}

/// The inference test of `model` on inputs of per-sample shape `sample`:
/// `{ device, sample_shape, warmup, runs, sparsity: {...}, results: [...] }`.
pub fn measure(model: &dyn Model, sample: &[i64], cfg: &InferenceConfig) -> Result<Value> {
    cfg.validate()?;
    let mut results = Vec::new();
    for &b in &cfg.batch_sizes {
        match one_size(model, sample, b, cfg) {
            Ok(m) => results.push(Value::Object(m)),
            Err(e) => results.push(json!({ "batch_size": b, "error": e.to_string() })),
        }
        if let Device::Cuda(_) = model.store().device() {
            let _ = crate::shim::empty_cache();
        }
    }
    Ok(json!({
        "device": crate::tensor::device_name(model.store().device()),
        "sample_shape": sample,
        "warmup": cfg.warmup,
        "runs": cfg.runs,
        "sparsity": sparsity_counts(model)?,
        "results": results,
    }))
}

/// Headline numbers for a summary: latency at the smallest batch size that
/// ran, and the best throughput.
pub fn headline(report: &Value) -> Map<String, Value> {
    let ok: Vec<&Value> = report["results"]
        .as_array()
        .map(|r| r.iter().filter(|x| x.get("error").is_none()).collect())
        .unwrap_or_default();
    let mut m = Map::new();
    if let Some(first) = ok.iter().min_by_key(|x| x["batch_size"].as_i64().unwrap_or(i64::MAX)) {
        m.insert("infer_ms".into(), first["latency_ms_mean"].clone());
        m.insert("infer_ms_batch".into(), first["batch_size"].clone());
    }
    let best = ok
        .iter()
        .filter_map(|x| x["throughput_per_s"].as_f64())
        .fold(None, |a: Option<f64>, t| Some(a.map_or(t, |a| a.max(t))));
    if let Some(t) = best {
        m.insert("infer_per_s".into(), json!(t));
    }
    m
}
