//! What a GPT-2's attention variant reports at each evaluation: RA
//! direction balance, SBA mixing, KVSplice compression and reconstruction,
//! routing statistics and phase, Fisher metrics (spec 5.5, 5.7, 5.8, 5.14).
use anyhow::{anyhow, Result};
use serde_json::{json, Map, Value};
use tch::{Kind, Tensor};

use super::gpt2::Gpt2;
use crate::attention::{fisher, kvsplice, Direction, KvSource, Mixer};
use crate::tensor::torch_error;

fn te(e: tch::TchError) -> anyhow::Error {
    anyhow!(torch_error(&e))
}

/// Sequences and positions of the evaluation sample the probes use (the
/// seed's batch 4 × 128): patterns are [B, H, T, T].
pub const SAMPLE_BATCH: i64 = 4;
pub const SAMPLE_LEN: i64 = 128;

fn stats(prefix: &str, v: &[f64], out: &mut Map<String, Value>) {
    if v.is_empty() {
        return;
    }
    let (mean, std) = fisher::mean_std(v);
    out.insert(format!("{prefix}_mean"), json!(mean));
    out.insert(format!("{prefix}_std"), json!(std));
    out.insert(format!("{prefix}_min"), json!(v.iter().cloned().fold(f64::INFINITY, f64::min)));
    out.insert(format!("{prefix}_max"), json!(v.iter().cloned().fold(f64::NEG_INFINITY, f64::max)));
}

pub fn collect(m: &Gpt2, sample: Option<&Tensor>, fisher_on: bool) -> Result<Map<String, Value>> {
    let mut out = Map::new();
    let spec = *m.spec();
    let l = m.n_layer();
    if let Some(ps) = m.direction_probs().map_err(te)? {
        for (i, p) in ps.iter().enumerate() {
            out.insert(format!("ra/p_layer{i}"), json!(p));
        }
        let rec = ps.iter().filter(|&&p| p > 0.5).count();
        out.insert("ra/reciprocal_layers".into(), json!(rec));
        out.insert("ra/standard_layers".into(), json!(ps.len() - rec));
        out.insert("ra/alternation_balance".into(), json!(ps.iter().sum::<f64>() / ps.len().max(1) as f64));
    } else if spec.direction == Direction::Alternate {
        out.insert("ra/reciprocal_layers".into(), json!(l / 2));
    }
    if spec.mixer == Mixer::Sba {
        let mut alphas = Vec::new();
        for a in m.blocks_attn() {
            if let Some(t) = a.sba_alpha() {
                alphas.push(t.f_sigmoid().and_then(|s| s.f_double_value(&[0])).map_err(te)?);
            }
        }
        for (i, a) in alphas.iter().enumerate() {
            out.insert(format!("sba/alpha_layer_{i}"), json!(a));
        }
        stats("sba/alpha", &alphas, &mut out);
        out.insert("sba/forward_dominant_layers".into(), json!(alphas.iter().filter(|&&a| a > 0.7).count()));
        out.insert("sba/reverse_dominant_layers".into(), json!(alphas.iter().filter(|&&a| a < 0.3).count()));
        out.insert(
            "sba/mixed_layers".into(),
            json!(alphas.iter().filter(|&&a| (0.3..=0.7).contains(&a)).count()),
        );
    }
    if spec.kv == KvSource::Splice {
        let cfg = m.cfg();
        let dc = kvsplice::compressed_dim(cfg.d_latent, cfg.splice_ratio);
        out.insert("kvsplice/compression_ratio".into(), json!(cfg.splice_ratio));
        out.insert("kvsplice/d_latent".into(), json!(cfg.d_latent));
        out.insert("kvsplice/d_compressed".into(), json!(dc));
        out.insert(
            "kvsplice/memory_reduction_pct".into(),
            json!((1.0 - dc as f64 / cfg.d_latent as f64) * 100.0),
        );
    }
    if let Some(s) = m.route_state() {
        out.insert("route/phase".into(), json!(s.f_double_value(&[0]).map_err(te)?));
    }
    let (one, two) = (m.kv_cache_bytes(1, 1, 2).map_err(te)?, m.kv_cache_bytes(1, 2, 2).map_err(te)?);
    out.insert("kv_cache/bytes_per_token_bf16".into(), json!(two - one));
    if 2 * one != two {
        out.insert("kv_cache/bytes_per_sequence".into(), json!(2 * one - two));
    }
    let Some(x) = sample else { return Ok(out) };
    let sz = x.size();
    if sz.len() != 2 {
        return Ok(out);
    }
    let x = x
        .f_narrow(0, 0, sz[0].min(SAMPLE_BATCH))
        .and_then(|x| x.f_narrow(1, 0, sz[1].min(SAMPLE_LEN)))
        .and_then(|x| x.f_to_device(m_device(m)))
        .map_err(te)?;
    let layers: Vec<i64> = if fisher_on { fisher::default_layers(l) } else { Vec::new() };
    let needs = spec.kv == KvSource::Splice || spec.mixer == Mixer::Route || !layers.is_empty();
    if !needs {
        return Ok(out);
    }
    let probe = m.probe(&x, &layers).map_err(te)?;
    let val = |t: &Tensor| t.f_double_value(&[]).map_err(te);
    if !probe.recon.is_empty() {
        let mut errs = Vec::new();
        for (layer, e) in &probe.recon {
            let e = val(e)?;
            out.insert(format!("kvsplice/layer_{layer}_recon_error"), json!(e));
            errs.push(e);
        }
        out.insert(
            "kvsplice/avg_reconstruction_error".into(),
            json!(errs.iter().sum::<f64>() / errs.len() as f64),
        );
        out.insert(
            "kvsplice/max_reconstruction_error".into(),
            json!(errs.iter().cloned().fold(f64::MIN, f64::max)),
        );
        out.insert(
            "kvsplice/min_reconstruction_error".into(),
            json!(errs.iter().cloned().fold(f64::MAX, f64::min)),
        );
    }
    if !probe.route.is_empty() {
        let n = probe.route.len() as f64;
        let (mut p, mut f) = (0.0, 0.0);
        for (_, pr, fr) in &probe.route {
            p += val(pr)?;
            f += val(fr)?;
        }
        out.insert("route/p_ra".into(), json!(p / n));
        out.insert("route/p_full".into(), json!(1.0 - p / n));
        out.insert("route/ra_token_pct".into(), json!(100.0 * f / n));
    }
    for (layer, pattern) in &probe.patterns {
        out.extend(fisher::layer_metrics(*layer, pattern, 64, 0).map_err(te)?);
    }
    Ok(out)
}

fn m_device(m: &Gpt2) -> tch::Device {
    use super::Model;
    m.store().device()
}

/// After an evaluation: advance the routing warm-up (switch routing on once
/// the eval loss fell `route_warmup_drop` below the first eval's, from the
/// second eval on), then report the metrics.
pub fn on_eval(
    m: &mut Gpt2,
    eval: &Map<String, Value>,
    sample: Option<&Tensor>,
) -> Result<Map<String, Value>> {
    let mut extra = Map::new();
    if let (Some(state), Some(loss)) = (m.route_state(), eval.get("val_loss").and_then(Value::as_f64)) {
        let v = Vec::<f64>::try_from(state.f_to_kind(Kind::Double).map_err(te)?).map_err(te)?;
        let (mut phase, mut first, evals) = (v[0], v[1], v[2] + 1.0);
        if evals == 1.0 {
            first = loss;
        } else if phase < 0.5 && first > 0.0 && (first - loss) / first >= m.cfg().route_warmup_drop {
            phase = 1.0;
            extra.insert("route/switched".into(), json!(1));
        }
        let mut s = state.shallow_clone();
        let new = Tensor::from_slice(&[phase, first, evals]).f_to_device(s.device()).map_err(te)?;
        tch::no_grad(|| s.f_copy_(&new)).map_err(te)?;
    }
    let fisher_on = m.cfg().fisher_metrics;
    let mut out = collect(m, sample, fisher_on)?;
    out.extend(extra);
    Ok(out)
}
