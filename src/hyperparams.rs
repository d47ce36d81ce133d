//! HYPER_PARAM_AUTO (knlp-spec.md 7.8, adapted): the batch size and the
//! gradient accumulation of a cell from a target effective batch and the
//! device's free memory, then checked by a probe.
//!
//! The seed's rule, per model (target effective batch, scale):
//! gpt2 (1024, 1.0), resnet18 (512, 2.0), resnet50 (256, 1.5), lenet5
//! (512, 4.0). On CUDA, `usable = 0.8 × free memory` (GB of 1e9 bytes,
//! from NVML) picks a base batch: ≥ 128 → 128, ≥ 64 → 64, ≥ 32 → 16,
//! ≥ 16 → 8, ≥ 8 → 4, ≥ 4 → 2, else 1 (the seed's column without
//! torch.compile: knlp does not compile the model); `batch = ⌊base ×
//! scale⌋`, `grad_accum = max(1, ⌊⌊target / ranks⌋ / batch⌋)`. On the CPU,
//! `batch = ⌊16 × scale⌋`, `grad_accum = max(1, ⌊target / batch⌋)`.
//!
//! Unlike the seed, the table is not trusted: on CUDA one training step at
//! the chosen batch is tried, and on "out of memory" the batch halves
//! (accumulation recomputed) until a step fits. Every try is recorded with
//! the choice in the run's `config.json` (`hyperparams`).
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tch::Device;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AutoBatch {
    /// Target effective batch (0: the model's default).
    pub target: i64,
}

/// (model, default target effective batch, scale factor).
pub const MODELS: &[(&str, i64, f64)] =
    &[("gpt2", 1024, 1.0), ("resnet18", 512, 2.0), ("resnet50", 256, 1.5), ("lenet5", 512, 4.0)];

/// (usable GB at least, base batch).
pub const TIERS: &[(f64, i64)] = &[(128.0, 128), (64.0, 64), (32.0, 16), (16.0, 8), (8.0, 4), (4.0, 2)];

/// The base batch for `usable` GB.
pub fn tier(usable_gb: f64) -> i64 {
    TIERS.iter().find(|(gb, _)| usable_gb >= *gb).map_or(1, |t| t.1)
}

/// What was chosen and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    pub batch: i64,
    pub grad_accum: i64,
    /// Per-rank share of the target the accumulation aims at.
    pub per_rank: i64,
    pub record: Value,
}

fn model_defaults(model: &str) -> Result<(i64, f64)> {
    match MODELS.iter().find(|m| m.0 == model) {
        Some(&(_, t, s)) => Ok((t, s)),
        None => bail!("HYPER_PARAM_AUTO: no batch-size rule for model '{model}'"),
    }
}

fn accum(per_rank: i64, batch: i64) -> i64 {
    (per_rank / batch.max(1)).max(1)
}

/// The table's choice for `model` with `ranks` data-parallel ranks;
/// `free_gb` is the device's free memory (None: the CPU rule).
pub fn choose(model: &str, cfg: &AutoBatch, ranks: i64, free_gb: Option<f64>) -> Result<Choice> {
    let (default_target, scale) = model_defaults(model)?;
    let target = if cfg.target > 0 { cfg.target } else { default_target };
    let ranks = ranks.max(1);
    let (batch, per_rank, why) = match free_gb {
        None => {
            let b = ((16.0 * scale) as i64).max(1);
            (b, target, json!({ "rule": "cpu: batch = 16 x scale" }))
        }
        Some(free) => {
            let usable = 0.8 * free;
            let base = tier(usable);
            let b = ((base as f64 * scale) as i64).max(1);
            let why = json!({ "rule": "cuda: tier of 0.8 x free memory, x scale", "free_gb": free,
                              "usable_gb": usable, "tier_batch": base });
            (b, target / ranks, why)
        }
    };
    let grad_accum = accum(per_rank, batch);
    let mut record = json!({
        "mode": "auto", "model": model, "target_effective_batch": target, "scale": scale, "ranks": ranks,
        "table_batch": batch, "table_grad_accum": grad_accum,
    });
    if let (Some(r), Some(w)) = (record.as_object_mut(), why.as_object()) {
        r.extend(w.clone());
    }
    Ok(Choice { batch, grad_accum, per_rank, record })
}

/// Whether an error is the allocator running out of memory.
pub fn is_oom(e: &anyhow::Error) -> bool {
    let s = format!("{e:#}").to_ascii_lowercase();
    s.contains("out of memory")
}

/// Halve the batch until `step(batch)` fits: `Ok(true)` fits, `Ok(false)`
/// ran out of memory; an `Err` is a real failure and stops. Records every try.
pub fn probe(c: &mut Choice, mut step: impl FnMut(i64) -> Result<bool>) -> Result<()> {
    let mut tries = Vec::new();
    loop {
        let fits = step(c.batch)?;
        tries.push(json!({ "batch": c.batch, "fits": fits }));
        if fits {
            break;
        }
        if c.batch == 1 {
            c.record["probe"] = json!(tries);
            bail!("HYPER_PARAM_AUTO: even a batch of 1 runs out of memory on this device");
        }
        c.batch = (c.batch / 2).max(1);
        c.grad_accum = accum(c.per_rank, c.batch);
    }
    c.record["probe"] = json!(tries);
    c.record["batch"] = json!(c.batch);
    c.record["grad_accum"] = json!(c.grad_accum);
    Ok(())
}

/// Free memory of CUDA device `d` in GB (1e9 bytes), from NVML.
pub fn free_gb(device: Device) -> Result<Option<f64>> {
    let Device::Cuda(d) = device else { return Ok(None) };
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    let idx = crate::nvml::nvml_index(d, visible.as_deref()).ok_or_else(|| {
        anyhow::anyhow!(
            "HYPER_PARAM_AUTO: cannot map cuda:{d} to an NVML device (CUDA_VISIBLE_DEVICES={visible:?})"
        )
    })?;
    let nvml = crate::nvml::Nvml::open().map_err(|e| anyhow::anyhow!("HYPER_PARAM_AUTO: {e}"))?;
    let s = nvml.sample(idx).map_err(|e| anyhow::anyhow!("HYPER_PARAM_AUTO: {e}"))?;
    Ok(Some(s.mem_free_mb * (1u64 << 20) as f64 / 1e9))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_table() {
        let got: Vec<i64> =
            [200.0, 128.0, 100.0, 40.0, 20.0, 10.0, 5.0, 3.0].iter().map(|&g| tier(g)).collect();
        assert_eq!(got, vec![128, 128, 64, 16, 8, 4, 2, 1]);
        // An 80 GB card with 79 GB free: usable 63.2 -> 16; GPT-2: 16 x 64 = 1024.
        let c = choose("gpt2", &AutoBatch::default(), 1, Some(79.0)).unwrap();
        assert_eq!((c.batch, c.grad_accum), (16, 64));
        // Four ranks share the target: 1024 / 4 / 16 = 16 each.
        let c = choose("gpt2", &AutoBatch::default(), 4, Some(79.0)).unwrap();
        assert_eq!((c.batch, c.grad_accum), (16, 16));
        // ResNet-18 scales by 2; a 141 GB card (usable 112.8) -> 64 x 2.
        let c = choose("resnet18", &AutoBatch::default(), 1, Some(141.0)).unwrap();
        assert_eq!((c.batch, c.grad_accum), (128, 4));
        // CPU: 16 x scale; LeNet-5 64 x 8 = 512, a custom target 100 -> 1.
        let c = choose("lenet5", &AutoBatch::default(), 1, None).unwrap();
        assert_eq!((c.batch, c.grad_accum), (64, 8));
        let c = choose("lenet5", &AutoBatch { target: 100 }, 1, None).unwrap();
        assert_eq!((c.batch, c.grad_accum), (64, 1));
        let c = choose("resnet50", &AutoBatch::default(), 1, None).unwrap();
        assert_eq!((c.batch, c.grad_accum), (24, 10));
        assert!(choose("mlp", &AutoBatch::default(), 1, None).is_err());
    }

    #[test]
    fn the_probe_halves_until_a_step_fits() {
        let mut c = choose("gpt2", &AutoBatch::default(), 1, Some(200.0)).unwrap();
        assert_eq!((c.batch, c.grad_accum), (128, 8));
        probe(&mut c, |b| Ok(b <= 40)).unwrap();
        assert_eq!((c.batch, c.grad_accum), (32, 32));
        assert_eq!(c.record["probe"].as_array().unwrap().len(), 3, "{}", c.record);
        let mut c = choose("gpt2", &AutoBatch::default(), 1, Some(200.0)).unwrap();
        assert!(probe(&mut c, |_| Ok(false)).unwrap_err().to_string().contains("batch of 1"));
        let mut c = choose("gpt2", &AutoBatch::default(), 1, Some(200.0)).unwrap();
        assert!(probe(&mut c, |_| bail!("CUDA error: an illegal memory access")).is_err());
        assert!(is_oom(&anyhow::anyhow!("CUDA out of memory. Tried to allocate 2.00 GiB")));
    }

    #[test]
    fn cuda_devices_map_to_nvml_indices() {
        assert_eq!(crate::nvml::nvml_index(1, None), Some(1));
        assert_eq!(crate::nvml::nvml_index(1, Some("3,5")), Some(5));
        assert_eq!(crate::nvml::nvml_index(2, Some("3,5")), None);
        assert_eq!(crate::nvml::nvml_index(0, Some("GPU-1234")), None);
        // Without a driver, NVML says so instead of failing later.
        if std::path::Path::new("/proc/driver/nvidia").exists() {
            return;
        }
        assert!(crate::nvml::Nvml::open().err().unwrap().contains("libnvidia-ml"));
    }
}
