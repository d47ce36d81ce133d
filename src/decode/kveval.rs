//! The KV-pruning evaluation of a trained GPT-2 (Kconfig `KV_PRUNE_EVAL`,
//! the train option `kv_prune_eval`, docs/attention.md "KV-cache pruning
//! in runs"): held-out sequences are scored by teacher-forced cached
//! decoding, unpruned and at every keep ratio, and optionally again with a
//! V reconstructor fitted on other held-out sequences.
//!
//! Δ loss is the mean over scored tokens of nll_pruned − nll_unpruned on
//! the same tokens, with its standard error sd/√n.
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tch::{Kind, Tensor};

use super::recon::{self, FitOptions};
use super::te;
use crate::attention::kvprune::{self, Mode, Recon};
use crate::decode::{self, Scored};
use crate::models::gpt2::Gpt2;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KvEvalConfig {
    /// Keep ratios scored, each in (0, 1]; the first is the headline.
    pub keep_ratios: Vec<f64>,
    /// 0: block_size / 16 (the seed's 64 of 1024).
    pub k_min: i64,
    /// 0: block_size / 16.
    pub recency: i64,
    pub exposure: bool,
    pub ema: f64,
    pub ema_every: i64,
    /// `v_only` or `scores_reuse`.
    pub mode: String,
    pub evict: bool,
    /// Held-out sequences scored.
    pub seqs: i64,
    /// Tokens of each sequence fed densely before the single-token steps.
    pub prefill: i64,
    /// Fit a V reconstructor per keep ratio and score with it too.
    pub recon: bool,
    pub recon_steps: i64,
    pub recon_lr: f64,
    /// Held-out sequences the reconstructor is fitted on (disjoint from
    /// the scored ones).
    pub recon_seqs: i64,
}

impl Default for KvEvalConfig {
    fn default() -> Self {
        let p = kvprune::Config::default();
        KvEvalConfig {
            keep_ratios: vec![0.5, 0.382, 0.25],
            k_min: 0,
            recency: 0,
            exposure: p.exposure,
            ema: p.ema,
            ema_every: p.ema_every,
            mode: p.mode.name().into(),
            evict: p.evict,
            seqs: 4,
            prefill: 1,
            recon: false,
            recon_steps: 200,
            recon_lr: 1e-3,
            recon_seqs: 8,
        }
    }
}

/// Parse "0.5, 0.382 0.25" (commas or spaces), each in (0, 1].
pub fn parse_ratios(s: &str) -> Result<Vec<f64>> {
    let v = s
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|x| !x.is_empty())
        .map(|x| x.parse::<f64>().map_err(|_| anyhow::anyhow!("'{x}' is not a number")))
        .collect::<Result<Vec<_>>>()?;
    if v.is_empty() {
        bail!("no keep ratio given");
    }
    if let Some(r) = v.iter().find(|r| !(**r > 0.0 && **r <= 1.0)) {
        bail!("keep ratio {r} is not in (0, 1]");
    }
    Ok(v)
}

impl KvEvalConfig {
    pub fn validate(&self) -> Result<()> {
        if self.keep_ratios.is_empty() {
            bail!("kv_prune_eval: keep_ratios is empty");
        }
        for &r in &self.keep_ratios {
            if !(r > 0.0 && r <= 1.0) {
                bail!("kv_prune_eval: every keep ratio must be in (0, 1], got {r}");
            }
        }
        if self.k_min < 0 || self.recency < 0 {
            bail!("kv_prune_eval: k_min and recency must be >= 0 (0: block_size / 16)");
        }
        Mode::parse(&self.mode)?;
        if self.seqs < 1 || self.prefill < 1 {
            bail!("kv_prune_eval: seqs and prefill must be at least 1");
        }
        if self.recon && (self.recon_seqs < 1 || self.recon_steps < 1) {
            bail!("kv_prune_eval: recon_seqs and recon_steps must be at least 1");
        }
        if !(self.recon_lr > 0.0 && self.recon_lr.is_finite()) {
            bail!("kv_prune_eval: recon_lr must be a positive number, got {}", self.recon_lr);
        }
        self.prune(self.keep_ratios[0], 64).validate()
    }

    /// Held-out rows the evaluation needs.
    pub fn rows_needed(&self) -> i64 {
        self.seqs + if self.recon { self.recon_seqs } else { 0 }
    }

    /// The pruning of one keep ratio for a model of `block` tokens.
    pub fn prune(&self, keep_ratio: f64, block: i64) -> kvprune::Config {
        let auto = (block / 16).max(1);
        kvprune::Config {
            keep_ratio,
            k_min: if self.k_min > 0 { self.k_min } else { auto },
            recency: if self.recency > 0 { self.recency } else { auto },
            exposure: self.exposure,
            ema: self.ema,
            ema_every: self.ema_every,
            mode: Mode::parse(&self.mode).unwrap_or(Mode::VOnly),
            evict: self.evict,
            recon: None,
        }
    }
}

fn delta(s: &Scored, dense: &Scored) -> Result<(f64, f64)> {
    let d = s.nll.f_sub(&dense.nll).map_err(te)?.f_flatten(0, -1).map_err(te)?;
    let n = d.numel() as f64;
    let mean = d.f_mean(Kind::Double).and_then(|m| m.f_double_value(&[])).map_err(te)?;
    let sd = if n > 1.0 { d.f_std(true).and_then(|m| m.f_double_value(&[])).map_err(te)? } else { 0.0 };
    Ok((mean, sd / n.sqrt()))
}

fn scored_json(s: &Scored, dense: Option<&Scored>) -> Result<Value> {
    let mut m = Map::new();
    m.insert("ppl".into(), json!(s.ppl));
    m.insert("loss".into(), json!(s.loss));
    m.insert("read_fraction".into(), json!(s.read_fraction));
    m.insert(
        "tokens_per_s".into(),
        json!(if s.decode_s > 0.0 { s.decoded as f64 / s.decode_s } else { 0.0 }),
    );
    if let Some(d) = dense {
        let (mean, se) = delta(s, d)?;
        m.insert("delta_loss".into(), json!(mean));
        m.insert("delta_loss_se".into(), json!(se));
    }
    Ok(Value::Object(m))
}

/// Score `rows` [N, T] unpruned and at every keep ratio (with a
/// reconstructor fitted on `fit_rows` when `cfg.recon`); returns the
/// report written to the run's kv_prune.json.
pub fn run(model: &Gpt2, rows: &Tensor, fit_rows: Option<&Tensor>, cfg: &KvEvalConfig) -> Result<Value> {
    cfg.validate()?;
    kvprune::check_spec(model.spec(), &model.cfg().attention)?;
    let t = rows.size().get(1).copied().unwrap_or(0);
    if cfg.prefill >= t {
        bail!("kv_prune_eval: prefill {} leaves no decode step in sequences of {t} tokens", cfg.prefill);
    }
    if cfg.recon && fit_rows.is_none() {
        bail!("kv_prune_eval: recon needs held-out rows to fit on");
    }
    let block = model.cfg().block_size;
    let dense = decode::score_cached(model, rows, cfg.prefill, None)?;
    let mut results = Vec::new();
    for &r in &cfg.keep_ratios {
        let p = cfg.prune(r, block);
        let s = decode::score_cached(model, rows, cfg.prefill, Some(&p))?;
        let mut entry = scored_json(&s, Some(&dense))?;
        entry["keep_ratio"] = json!(r);
        entry["k_min"] = json!(p.k_min);
        entry["recency"] = json!(p.recency);
        if let (true, Some(fit)) = (cfg.recon, fit_rows) {
            let o = FitOptions { steps: cfg.recon_steps, lr: cfg.recon_lr, ..FitOptions::default() };
            let (rc, rep) = recon::fit(model, fit, &p, &o)?;
            // Output errors on the scored rows, which the fit never saw.
            let (plain, with) = recon::output_errors(model, &rc, rows, &p)?;
            let pr = kvprune::Config { recon: Some(Recon(std::rc::Rc::new(rc))), ..p.clone() };
            let s2 = decode::score_cached(model, rows, cfg.prefill, Some(&pr))?;
            let mut rj = scored_json(&s2, Some(&dense))?;
            rj["fit_loss_first"] = json!(rep.losses.first());
            rj["fit_loss_last"] = json!(rep.losses.last());
            rj["rel_err_plain"] = json!(plain);
            rj["rel_err_recon"] = json!(with);
            rj["fit_rel_err_plain"] = json!(rep.rel_err_plain);
            rj["fit_rel_err_recon"] = json!(rep.rel_err_recon);
            rj["mean_gate"] = json!(rep.mean_gate);
            entry["recon"] = rj;
        }
        results.push(entry);
    }
    Ok(json!({
        "sequences": rows.size()[0],
        "tokens_per_sequence": t,
        "prefill": cfg.prefill,
        "fit_sequences": fit_rows.map(|f| f.size()[0]),
        "config": cfg,
        "dense": scored_json(&dense, None)?,
        "results": results,
    }))
}

/// The summary's headline figures: the first keep ratio's perplexity,
/// the unpruned cache's, and with the reconstructor.
pub fn headline(report: &Value) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("kv_ppl_dense".into(), report["dense"]["ppl"].clone());
    if let Some(first) = report["results"].get(0) {
        m.insert("kv_keep".into(), first["keep_ratio"].clone());
        m.insert("kv_ppl".into(), first["ppl"].clone());
        if let Some(p) = first.get("recon").map(|r| r["ppl"].clone()) {
            m.insert("kv_ppl_recon".into(), p);
        }
    }
    m
}
