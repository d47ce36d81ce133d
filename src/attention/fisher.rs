//! Fisher-information metrics of attention distributions (spec 5.14),
//! computed on the pattern the forward pass really used.
//!
//! For one head, take N query rows p_i (distributions over keys; a seeded
//! subsample of at most `rows` of the B·T rows) and form
//! `F = diag(mean_i p_i) − (1/N) Σ_i p_i p_iᵀ` (the mean of the softmax
//! Jacobians `diag(p) − p pᵀ`). From its eigenvalues λ (ascending):
//! `eigmax = λ_max`, `trace = Σλ`, `cond = λ_max/(|λ_min| + 1e-8)`,
//! `eig_top0..7` (the 8 largest, ascending), `energy_r8 = Σ top8 / trace`,
//! `energy_r16 = Σ top16 / trace` (1 when trace ≤ 1e-8),
//! `decay = λ_max/(|λ_5th largest| + 1e-8)`.
//! Per layer: the mean of eigmax, trace, cond, energy_r8, energy_r16, decay
//! over heads, and the (unbiased) std of eigmax, trace, cond when H > 1.
use serde_json::{json, Map, Value};
use tch::{Kind, TchError, Tensor};

pub const LAYER_MEANS: &[&str] = &["eigmax", "trace", "cond", "energy_r8", "energy_r16", "decay"];
pub const LAYER_STDS: &[&str] = &["eigmax", "trace", "cond"];

/// The layers analysed when none are named: first, middle and last (spec 5.14).
pub fn default_layers(n_layer: i64) -> Vec<i64> {
    let mut v = vec![0, n_layer / 2, n_layer - 1];
    v.dedup();
    v
}

/// Mean and unbiased standard deviation (0 for fewer than two values).
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let std = if v.len() > 1 {
        (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (mean, std)
}

/// A small deterministic generator for the row subsample (keeps the global
/// torch RNG, and so training, untouched).
fn pick(n: i64, k: i64, seed: u64) -> Vec<i64> {
    let mut idx: Vec<i64> = (0..n).collect();
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for i in 0..(k.min(n) as usize) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let j = i + (x % (n as u64 - i as u64)) as usize;
        idx.swap(i, j);
    }
    idx.truncate(k.min(n) as usize);
    idx.sort_unstable();
    idx
}

/// Metrics of one head from its rows p [N, T].
pub fn head_metrics(p: &Tensor) -> Result<Map<String, Value>, TchError> {
    let p = p.f_to_kind(Kind::Double)?;
    let n = p.size()[0] as f64;
    let f = p.f_mean_dim(Some(&[0i64][..]), false, Kind::Double)?.f_diag_embed(0, -2, -1)?;
    let f = f.f_sub(&p.f_transpose(0, 1)?.f_matmul(&p)?.f_div_scalar(n)?)?;
    let lam: Vec<f64> = Vec::<f64>::try_from(f.f_linalg_eigvalsh("L")?.f_contiguous()?)?;
    let m = lam.len();
    let max = lam[m - 1];
    let trace: f64 = lam.iter().sum();
    let top = |k: usize| lam[m.saturating_sub(k)..].iter().sum::<f64>();
    let energy = |k: usize| if trace <= 1e-8 { 1.0 } else { top(k) / trace };
    let fifth = lam[m.saturating_sub(5)];
    let mut out = Map::new();
    out.insert("eigmax".into(), json!(max));
    out.insert("trace".into(), json!(trace));
    out.insert("cond".into(), json!(max / (lam[0].abs() + 1e-8)));
    for (i, v) in lam[m.saturating_sub(8)..].iter().enumerate() {
        out.insert(format!("eig_top{i}"), json!(v));
    }
    out.insert("energy_r8".into(), json!(energy(8)));
    out.insert("energy_r16".into(), json!(energy(16)));
    out.insert("decay".into(), json!(max / (fifth.abs() + 1e-8)));
    Ok(out)
}

/// Metrics of a layer's pattern [B, H, T, T] under `fisher/layer{L}/...`.
pub fn layer_metrics(
    layer: i64,
    pattern: &Tensor,
    rows: i64,
    seed: u64,
) -> Result<Map<String, Value>, TchError> {
    let s = pattern.size();
    let (b, h, t) = (s[0], s[1], s[2]);
    let idx = Tensor::from_slice(&pick(b * t, rows, seed ^ layer as u64)).f_to_device(pattern.device())?;
    let mut out = Map::new();
    let mut per: Vec<Map<String, Value>> = Vec::new();
    for head in 0..h {
        let p = pattern.f_select(1, head)?.f_reshape([b * t, s[3]])?.f_index_select(0, &idx)?;
        let m = head_metrics(&p)?;
        for (k, v) in &m {
            out.insert(format!("fisher/layer{layer}/head{head}/{k}"), v.clone());
        }
        per.push(m);
    }
    let col = |k: &str| per.iter().filter_map(|m| m.get(k).and_then(Value::as_f64)).collect::<Vec<_>>();
    for k in LAYER_MEANS {
        out.insert(format!("fisher/layer{layer}/{k}_mean"), json!(mean_std(&col(k)).0));
    }
    if h > 1 {
        for k in LAYER_STDS {
            out.insert(format!("fisher/layer{layer}/{k}_std"), json!(mean_std(&col(k)).1));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_hot_rows_have_zero_fisher_and_uniform_rows_known_spectrum() {
        // Rows that are one-hot: diag(p) - p pᵀ = 0 for each, so F = 0.
        let p = Tensor::eye(4, (Kind::Float, tch::Device::Cpu));
        let m = head_metrics(&p).unwrap();
        assert!(m["trace"].as_f64().unwrap().abs() < 1e-12);
        assert_eq!(m["energy_r8"].as_f64().unwrap(), 1.0);
        // Uniform rows over n keys: F = I/n − J/n², eigenvalues 0 (once) and 1/n (n−1 times).
        let n = 4;
        let p = Tensor::full([3, n], 1.0 / n as f64, (Kind::Float, tch::Device::Cpu));
        let m = head_metrics(&p).unwrap();
        assert!((m["eigmax"].as_f64().unwrap() - 0.25).abs() < 1e-9);
        assert!((m["trace"].as_f64().unwrap() - 0.75).abs() < 1e-9);
        assert!((m["eig_top0"].as_f64().unwrap()).abs() < 1e-9);
    }

    #[test]
    fn subsample_is_seeded_and_distinct() {
        let a = pick(100, 10, 3);
        assert_eq!(a, pick(100, 10, 3));
        assert_ne!(a, pick(100, 10, 4));
        let mut d = a.clone();
        d.dedup();
        assert_eq!(d.len(), 10);
        assert_eq!(pick(5, 64, 1), vec![0, 1, 2, 3, 4]);
    }
}
