//! KV feature-circuit discovery (spec 6.1, docs/kv-circuits.md): a learned
//! binary mask over the channels of every head's keys and values, trained
//! with a straight-through estimator on a frozen GPT-2 in eval mode, under a
//! sparsity budget that the schedule drives to the target exactly.
//!
//! Differences from the seed, on purpose: masks start on (logits at
//! `logit(init_keep_prob)`, hard mask all ones); the budget is enforced
//! (the hard mask keeps the `round((1 - s_t) N)` channels of highest logit,
//! so the achieved sparsity is the scheduled one to the channel); the data
//! is the named data set's validation split (the first 80 % of its tokens
//! to fit, the rest held out to evaluate), not random ids; the model is in
//! eval mode with every weight frozen; checkpoints load strictly; and the
//! report says how faithful the circuit is (loss with the circuit against
//! the full model and against no KV channels at all).
//!
//! Masks reach the model through the hook points `blocks.{i}.attn.hook_k`
//! and `blocks.{i}.attn.hook_v` ([batch, pos, head, d_head]); the model is
//! never modified.
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tch::{Device, Kind, TchError, Tensor};

use crate::data::{Rng, TokenFile};
use crate::mechint::hooks::{Hooks, Recorder};
use crate::models::{cross_entropy, Model};
use crate::tensor::torch_error;

/// libtorch errors as `anyhow` errors without the C++ backtrace.
trait Tch<T> {
    fn tch(self) -> Result<T>;
}

impl<T> Tch<T> for std::result::Result<T, TchError> {
    fn tch(self) -> Result<T> {
        self.map_err(|e| anyhow!(torch_error(&e)))
    }
}

// ---- schedules ---------------------------------------------------------------

/// Temperature interpolations by name: `f(start, end, t)` for t in [0, 1].
/// `f(start, end, t)`.
type TempFn = fn(f64, f64, f64) -> f64;
const TEMPERATURES: &[(&str, TempFn)] = &[
    ("constant", |a, _, _| a),
    ("linear", |a, b, t| a + t * (b - a)),
    ("exp", |a, b, t| a * (b / a).powf(t)),
];

/// The fraction of the target sparsity reached at progress t in [0, 1].
/// Each reaches exactly 1 at t = 1 (the seed's exponential stopped at
/// 1 - e^-5 of the target; it is normalised here).
/// Progress to fraction of the target.
type RampFn = fn(f64) -> f64;
const SPARSITY_SCHEDULES: &[(&str, RampFn)] = &[
    ("linear", |t| t),
    ("exponential", |t| (1.0 - (-5.0 * t).exp()) / (1.0 - (-5.0f64).exp())),
    ("cosine", |t| 1.0 - (std::f64::consts::FRAC_PI_2 * t).cos()),
];

fn names<T>(table: &[(&str, T)]) -> String {
    table.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}

/// A temperature schedule `type:start:end` (`constant:T` also accepted).
#[derive(Clone, Debug)]
pub struct TempSchedule {
    pub kind: String,
    pub start: f64,
    pub end: f64,
    f: TempFn,
}

impl TempSchedule {
    pub fn parse(s: &str) -> Result<TempSchedule> {
        let parts: Vec<&str> = s.trim().split(':').map(str::trim).collect();
        let bad = |why: &str| {
            anyhow!(
                "temperature schedule '{s}': {why} (expected type:start:end, type one of {})",
                names(TEMPERATURES)
            )
        };
        let (kind, start, end) = match parts.as_slice() {
            [k, a, b] => (*k, *a, *b),
            ["constant", a] => ("constant", *a, *a),
            _ => return Err(bad("wrong number of fields")),
        };
        let f = TEMPERATURES
            .iter()
            .find(|(n, _)| *n == kind)
            .map(|(_, f)| *f)
            .ok_or_else(|| bad("unknown type"))?;
        let num = |v: &str| -> Result<f64> {
            let x: f64 = v.parse().map_err(|_| bad(&format!("'{v}' is not a number")))?;
            if !(x.is_finite() && x > 0.0) {
                return Err(bad(&format!("temperatures must be positive, got {v}")));
            }
            Ok(x)
        };
        Ok(TempSchedule { kind: kind.to_string(), start: num(start)?, end: num(end)?, f })
    }

    /// The temperature at progress t in [0, 1].
    pub fn at(&self, t: f64) -> f64 {
        (self.f)(self.start, self.end, t.clamp(0.0, 1.0))
    }
}

/// The scheduled sparsity at progress t: `target · f(t)`.
pub fn scheduled_sparsity(schedule: &str, target: f64, t: f64) -> Result<f64> {
    let f = SPARSITY_SCHEDULES.iter().find(|(n, _)| *n == schedule).map(|(_, f)| *f).ok_or_else(|| {
        anyhow!("unknown sparsity schedule '{schedule}' (valid: {})", names(SPARSITY_SCHEDULES))
    })?;
    Ok(target * f(t.clamp(0.0, 1.0)))
}

// ---- configuration -------------------------------------------------------------

/// What one discovery run does (`kv_circuit(model, data, options)` in
/// scripts takes these names; unknown names are errors).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KvCircuitConfig {
    /// Fraction of all K/V channels (layers x heads x d_head) removed at the end.
    pub target_sparsity: f64,
    /// Optimisation steps (one batch each).
    pub steps: i64,
    /// Adam learning rate of the mask logits.
    pub lr: f64,
    /// `type:start:end`: constant, linear or exp (geometric).
    pub temperature: String,
    /// How the budget grows to the target: linear, exponential or cosine.
    pub sparsity_schedule: String,
    /// Share of the steps over which the budget grows; the rest hold the target.
    pub ramp_fraction: f64,
    /// σ of the initial logits; above 0.5, so every channel starts kept.
    pub init_keep_prob: f64,
    pub batch_size: i64,
    /// Tokens per window; 0: the model's block size.
    pub block_size: i64,
    /// Evaluate every N steps (0: only at the start and the end).
    pub eval_every: i64,
    /// Held-out batches per evaluation.
    pub eval_batches: i64,
    /// Seed of the fitting windows.
    pub seed: i64,
    /// Bytes per token for bits per byte (the seed's 4.8, GPT-2 BPE on English web text).
    pub bytes_per_token: f64,
}

impl Default for KvCircuitConfig {
    fn default() -> Self {
        KvCircuitConfig {
            target_sparsity: 0.95,
            steps: 500,
            lr: 0.01,
            temperature: "linear:1.0:0.1".into(),
            sparsity_schedule: "linear".into(),
            ramp_fraction: 0.8,
            init_keep_prob: 0.9,
            batch_size: 8,
            block_size: 0,
            eval_every: 50,
            eval_batches: 10,
            seed: 0,
            bytes_per_token: 4.8,
        }
    }
}

/// (name, check, what it must be): every field's rule in one table.
type Rule = (&'static str, fn(&KvCircuitConfig) -> bool, &'static str);
const RULES: &[Rule] = &[
    ("target_sparsity", |c| (0.0..1.0).contains(&c.target_sparsity), "in [0, 1)"),
    ("steps", |c| c.steps >= 1, "at least 1"),
    ("lr", |c| c.lr.is_finite() && c.lr > 0.0, "a positive number"),
    ("ramp_fraction", |c| c.ramp_fraction > 0.0 && c.ramp_fraction <= 1.0, "in (0, 1]"),
    (
        "init_keep_prob",
        |c| c.init_keep_prob > 0.5 && c.init_keep_prob < 1.0,
        "in (0.5, 1) so that masks start on",
    ),
    ("batch_size", |c| c.batch_size >= 1, "at least 1"),
    ("block_size", |c| c.block_size >= 0, "0 (the model's) or more"),
    ("eval_every", |c| c.eval_every >= 0, "0 (start and end only) or more"),
    ("eval_batches", |c| c.eval_batches >= 1, "at least 1"),
    ("seed", |c| c.seed >= 0, "0 or more"),
    ("bytes_per_token", |c| c.bytes_per_token.is_finite() && c.bytes_per_token > 0.0, "a positive number"),
];

impl KvCircuitConfig {
    /// Check every field; the error names the field, its value and the rule.
    pub fn validate(&self) -> Result<TempSchedule> {
        let v = serde_json::to_value(self)?;
        for (name, ok, rule) in RULES {
            if !ok(self) {
                bail!("kv circuit: {name} = {} must be {rule}", v[*name]);
            }
        }
        scheduled_sparsity(&self.sparsity_schedule, self.target_sparsity, 0.0)
            .map_err(|e| anyhow!("kv circuit: sparsity_schedule: {e}"))?;
        TempSchedule::parse(&self.temperature).map_err(|e| anyhow!("kv circuit: temperature: {e}"))
    }

    /// The sparsity budget after `step` optimisation steps.
    fn sparsity_at(&self, step: i64) -> Result<f64> {
        let t = step as f64 / (self.ramp_fraction * self.steps as f64);
        scheduled_sparsity(&self.sparsity_schedule, self.target_sparsity, t)
    }
}

// ---- data ------------------------------------------------------------------------

/// Windows of the validation split: random ones from the first 80 % to fit
/// the masks, fixed evenly spaced ones from the last 20 % to evaluate.
pub struct Windows<'a> {
    file: &'a TokenFile,
    block: usize,
    fit_end: usize,
    eval_starts: Vec<usize>,
    batch: usize,
    rng: Rng,
    device: Device,
}

/// Share of the validation tokens used to fit; the rest is held out.
const FIT_SHARE: f64 = 0.8;

impl<'a> Windows<'a> {
    pub fn new(file: &'a TokenFile, cfg: &KvCircuitConfig, block: usize, device: Device) -> Result<Self> {
        let n = file.len();
        let fit_end = (n as f64 * FIT_SHARE) as usize;
        let need = block + 1;
        if fit_end < need || n - fit_end < need {
            bail!(
                "{}: {n} validation tokens are too few: fitting (80 %) and evaluation (20 %) each need a window of {need} tokens (lower block_size)",
                file.path().display()
            );
        }
        let batch = cfg.batch_size as usize;
        let span = n - fit_end - need;
        let count = (cfg.eval_batches as usize * batch).max(1);
        let eval_starts =
            (0..count).map(|i| fit_end + if count == 1 { 0 } else { i * span / (count - 1) }).collect();
        Ok(Windows { file, block, fit_end, eval_starts, batch, rng: Rng::new(cfg.seed as u64), device })
    }

    fn batch_of(&self, starts: &[usize]) -> Result<(Tensor, Tensor)> {
        let (mut xs, mut ys) = (Vec::new(), Vec::new());
        for &s in starts {
            let w = self.file.read(s, self.block + 1)?;
            xs.extend_from_slice(&w[..self.block]);
            ys.extend_from_slice(&w[1..]);
        }
        let shape = [starts.len() as i64, self.block as i64];
        let to = |v: &[i64]| {
            Tensor::f_from_slice(v).and_then(|t| t.f_view(shape)).and_then(|t| t.f_to_device(self.device))
        };
        Ok((to(&xs).tch()?, to(&ys).tch()?))
    }

    /// A random fitting batch.
    fn fit_batch(&mut self) -> Result<(Tensor, Tensor)> {
        let hi = (self.fit_end - self.block - 1 + 1) as u64;
        let starts: Vec<usize> = (0..self.batch).map(|_| self.rng.below(hi) as usize).collect();
        self.batch_of(&starts)
    }

    /// The held-out batches (the same every evaluation).
    fn eval_batches(&self) -> Result<Vec<(Tensor, Tensor)>> {
        self.eval_starts.chunks(self.batch).map(|c| self.batch_of(c)).collect()
    }

    /// Bytes per token of the held-out windows, measured by decoding them
    /// with GPT-2's BPE (None when the ids are not GPT-2's).
    fn measured_bytes_per_token(&self) -> Option<f64> {
        let mut bytes = 0usize;
        let mut tokens = 0usize;
        for &s in &self.eval_starts {
            let w = self.file.read(s, self.block).ok()?;
            let ids: Vec<u32> = w.iter().map(|&t| t as u32).collect();
            bytes += crate::data::bpe::decode(&ids).ok()?.len();
            tokens += ids.len();
        }
        (tokens > 0).then(|| bytes as f64 / tokens as f64)
    }
}

// ---- masks -----------------------------------------------------------------------

/// One layer's channels in the flat logit vector.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerShape {
    pub layer: i64,
    pub heads: i64,
    pub d_head: i64,
    pub offset: i64,
}

/// The mask logits of every layer in one flat leaf tensor, with Adam's state.
pub struct MaskSet {
    pub layers: Vec<LayerShape>,
    pub logits: Tensor,
    m: Tensor,
    v: Tensor,
    t: i64,
}

/// Masks of one step: per layer [H, D], and the threshold logit.
pub struct StepMasks {
    pub masks: Vec<Tensor>,
    pub tau: f64,
    pub kept: i64,
}

impl MaskSet {
    pub fn new(layers: Vec<LayerShape>, init_keep_prob: f64, device: Device) -> Result<MaskSet> {
        let n: i64 = layers.iter().map(|l| l.heads * l.d_head).sum();
        let init = (init_keep_prob / (1.0 - init_keep_prob)).ln();
        let logits =
            Tensor::f_full([n], init, (Kind::Float, device)).tch()?.f_set_requires_grad(true).tch()?;
        let zeros = || Tensor::f_zeros([n], (Kind::Float, device)).tch();
        Ok(MaskSet { layers, logits, m: zeros()?, v: zeros()?, t: 0 })
    }

    pub fn channels(&self) -> i64 {
        self.logits.numel() as i64
    }

    /// Channels kept at sparsity `s` (rounded to the nearest channel).
    pub fn keep_count(&self, s: f64) -> i64 {
        let n = self.channels();
        (n - (s * n as f64).round() as i64).clamp(0, n)
    }

    /// The hard top-k mask (exactly `keep` ones) and the threshold τ that
    /// separates kept from removed logits: 0 when the signs already agree
    /// with the budget (the seed's σ(ℓ)), else the midpoint of the two
    /// logits at the boundary, so σ(ℓ - τ) > 0.5 marks the kept channels
    /// (ties aside).
    fn hard(&self, keep: i64) -> Result<(Tensor, f64)> {
        let n = self.channels();
        let l = self.logits.f_detach().tch()?;
        let (sorted, _) = l.f_sort(0, true).tch()?;
        let at = |i: i64| sorted.f_double_value(&[i]).tch();
        let hi = if keep > 0 { at(keep - 1)? } else { f64::INFINITY };
        let lo = if keep < n { at(keep)? } else { f64::NEG_INFINITY };
        let tau = match (lo.is_finite(), hi.is_finite()) {
            _ if lo < 0.0 && 0.0 < hi => 0.0,
            (true, true) => (lo + hi) / 2.0,
            (false, _) => hi - 1.0,
            (_, false) => lo + 1.0,
        };
        let hard = if keep == n {
            l.f_ones_like().tch()?
        } else {
            let (_, idx) = l.f_topk(keep, 0, true, true).tch()?;
            l.f_zeros_like().tch()?.f_scatter_value(0, &idx, 1.0).tch()?
        };
        Ok((hard, tau))
    }

    /// Straight-through masks at sparsity `s` and temperature `temp`: the
    /// value is the hard mask, the gradient is that of σ((ℓ - τ)/T).
    pub fn step_masks(&self, s: f64, temp: f64, grad: bool) -> Result<StepMasks> {
        let keep = self.keep_count(s);
        let (hard, tau) = self.hard(keep)?;
        let flat = if grad {
            let p = self.logits.f_sub_scalar(tau).tch()?.f_div_scalar(temp).tch()?.f_sigmoid().tch()?;
            hard.f_add(&p).tch()?.f_sub(&p.f_detach().tch()?).tch()?
        } else {
            hard
        };
        Ok(StepMasks { masks: self.split(&flat)?, tau, kept: keep })
    }

    /// Per-layer [H, D] views of a flat vector.
    pub fn split(&self, flat: &Tensor) -> Result<Vec<Tensor>> {
        self.layers
            .iter()
            .map(|l| {
                flat.f_narrow(0, l.offset, l.heads * l.d_head)
                    .and_then(|t| t.f_view([l.heads, l.d_head]))
                    .tch()
            })
            .collect()
    }

    /// One Adam step on the logits (bias-corrected, no weight decay).
    fn adam(&mut self, grad: &Tensor, lr: f64) -> Result<()> {
        const B1: f64 = 0.9;
        const B2: f64 = 0.999;
        const EPS: f64 = 1e-8;
        self.t += 1;
        let g = grad.f_detach().tch()?;
        tch::no_grad(|| -> Result<(), TchError> {
            self.m = self.m.f_mul_scalar(B1)?.f_add(&g.f_mul_scalar(1.0 - B1)?)?;
            self.v = self.v.f_mul_scalar(B2)?.f_add(&g.f_square()?.f_mul_scalar(1.0 - B2)?)?;
            let mh = self.m.f_div_scalar(1.0 - B1.powi(self.t as i32))?;
            let vh = self.v.f_div_scalar(1.0 - B2.powi(self.t as i32))?;
            let upd = mh.f_div(&vh.f_sqrt()?.f_add_scalar(EPS)?)?.f_mul_scalar(lr)?;
            let mut l = self.logits.shallow_clone();
            let _ = l.f_sub_(&upd)?;
            Ok(())
        })
        .tch()
    }
}

// ---- hooks -------------------------------------------------------------------------

/// Multiplies `blocks.{i}.attn.hook_k` and `hook_v` by layer i's mask
/// (broadcast over batch and position), and notes which points it saw.
struct MaskHooks<'a> {
    masks: &'a [Tensor],
    names: BTreeMap<String, usize>,
    seen: RefCell<Vec<bool>>,
}

impl<'a> MaskHooks<'a> {
    fn new(layers: &[LayerShape], masks: &'a [Tensor]) -> Self {
        let mut names = BTreeMap::new();
        for (k, l) in layers.iter().enumerate() {
            for leaf in ["hook_k", "hook_v"] {
                names.insert(format!("blocks.{}.attn.{leaf}", l.layer), k);
            }
        }
        let n = names.len();
        MaskHooks { masks, names, seen: RefCell::new(vec![false; n]) }
    }

    /// Hook points the last forwards never reached.
    fn missed(&self) -> Vec<String> {
        let seen = self.seen.borrow();
        self.names.keys().zip(seen.iter()).filter(|(_, s)| !**s).map(|(n, _)| n.clone()).collect()
    }
}

impl Hooks for MaskHooks<'_> {
    fn wants(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    fn call(&self, name: &str, act: &Tensor) -> Result<Option<Tensor>, TchError> {
        let Some(&k) = self.names.get(name) else { return Ok(None) };
        if let Some(i) = self.names.keys().position(|n| n == name) {
            self.seen.borrow_mut()[i] = true;
        }
        let m = &self.masks[k];
        let m = if m.kind() == act.kind() { m.shallow_clone() } else { m.f_to_kind(act.kind())? };
        Ok(Some(act.f_mul(&m)?))
    }
}

/// The K/V shape of every layer, from one short forward that records the
/// hook points; K and V of a layer must agree (one mask covers both).
pub fn probe_layers(model: &dyn Model, x: &Tensor) -> Result<Vec<LayerShape>> {
    let rec = Recorder::new(|n: &str| n.ends_with(".attn.hook_k") || n.ends_with(".attn.hook_v"), None);
    let _ = tch::no_grad(|| model.forward_hooked(x, false, Some(&rec))).tch()?;
    type KV = (Option<Vec<i64>>, Option<Vec<i64>>);
    let mut shapes: BTreeMap<i64, KV> = BTreeMap::new();
    for (name, t) in rec.take() {
        let layer = name
            .strip_prefix("blocks.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<i64>().ok())
            .ok_or_else(|| anyhow!("unexpected hook point name '{name}'"))?;
        let e = shapes.entry(layer).or_default();
        if name.ends_with("hook_k") {
            e.0 = Some(t.size());
        } else {
            e.1 = Some(t.size());
        }
    }
    if shapes.is_empty() {
        bail!("the {} model has no blocks.*.attn.hook_k/hook_v points to mask", model.arch());
    }
    let mut out = Vec::new();
    let mut offset = 0;
    for (layer, (k, v)) in shapes {
        let (Some(k), Some(v)) = (k, v) else {
            bail!("layer {layer}: the attention visits only one of hook_k and hook_v; both are masked");
        };
        if k.len() != 4 || k[2..] != v[2..] {
            bail!(
                "layer {layer}: hook_k {k:?} and hook_v {v:?} differ in heads x d_head; one mask covers both"
            );
        }
        out.push(LayerShape { layer, heads: k[2], d_head: k[3], offset });
        offset += k[2] * k[3];
    }
    Ok(out)
}

// ---- evaluation ---------------------------------------------------------------------

/// Loss, perplexity and bits per byte of one evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Eval {
    pub loss: f64,
    /// exp(min(loss, 20)).
    pub ppl: f64,
    /// loss / ln 2 / bytes_per_token.
    pub bpb: f64,
}

impl Eval {
    fn of(loss: f64, bytes_per_token: f64) -> Eval {
        Eval { loss, ppl: loss.min(20.0).exp(), bpb: loss / std::f64::consts::LN_2 / bytes_per_token }
    }
}

/// Mean cross-entropy over `batches` with `masks` (None: the full model).
fn eval_loss(
    model: &dyn Model,
    batches: &[(Tensor, Tensor)],
    layers: &[LayerShape],
    masks: Option<&[Tensor]>,
) -> Result<f64> {
    let mut total = 0.0;
    for (x, y) in batches {
        let hooks = masks.map(|m| MaskHooks::new(layers, m));
        let h: Option<&dyn Hooks> = hooks.as_ref().map(|h| h as &dyn Hooks);
        let loss = tch::no_grad(|| model.forward_hooked(x, false, h).and_then(|l| cross_entropy(&l, y)))
            .and_then(|l| l.f_double_value(&[]))
            .tch()?;
        total += loss;
    }
    Ok(total / batches.len().max(1) as f64)
}

// ---- the run --------------------------------------------------------------------

/// One line of the metrics history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub step: i64,
    /// Fitting loss of this step's batch (None for evaluation-only records).
    pub loss: Option<f64>,
    /// Held-out loss with the hard masks of this step (evaluations only).
    pub eval_loss: Option<f64>,
    pub sparsity: f64,
    pub target_sparsity: f64,
    pub temperature: f64,
    pub tau: f64,
}

/// Per-layer result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerResult {
    pub layer: i64,
    pub name: String,
    pub heads: i64,
    pub d_head: i64,
    pub channels: i64,
    pub kept: i64,
    pub sparsity: f64,
    pub mean_importance: f64,
    pub std_importance: f64,
    /// Sparsity of each head.
    pub head_sparsity: Vec<f64>,
    /// σ(ℓ − τ) per head and channel.
    pub importance: Vec<Vec<f64>>,
    /// The hard mask (0 or 1) per head and channel.
    pub mask: Vec<Vec<f64>>,
}

/// What a discovery run found.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Circuit {
    pub config: KvCircuitConfig,
    /// The model's configuration (for the report and variant detection).
    pub model: Value,
    pub channels: i64,
    pub kept: i64,
    pub achieved_sparsity: f64,
    /// Held-out loss of the full model (no hooks).
    pub full: Eval,
    /// Held-out loss with every channel kept (the starting masks).
    pub initial: Eval,
    /// Held-out loss with the final circuit.
    pub final_: Eval,
    /// Held-out loss with every K and V channel removed.
    pub empty: Eval,
    /// (final − initial) / initial.
    pub loss_degradation: f64,
    /// (L_empty − L_circuit) / (L_empty − L_full): 1 = as good as the full
    /// model, 0 = no better than no K/V channels at all.
    pub faithfulness: f64,
    /// L_circuit / L_full.
    pub loss_ratio: f64,
    /// Bytes per token of the held-out text (GPT-2 BPE), when measurable.
    pub measured_bytes_per_token: Option<f64>,
    pub tau: f64,
    pub layers: Vec<LayerResult>,
    pub history: Vec<Record>,
    pub seconds: f64,
    /// Final logits, for the mask file (not serialised).
    #[serde(skip)]
    logits: Vec<f64>,
}

/// Sets every parameter's `requires_grad` and restores it when dropped, so
/// a script's model trains normally afterwards.
struct Frozen<'a> {
    params: Vec<(&'a Tensor, bool)>,
}

impl<'a> Frozen<'a> {
    fn new(model: &'a dyn Model) -> Result<Self> {
        let params: Vec<(&Tensor, bool)> =
            model.store().params().iter().map(|p| (&p.tensor, p.tensor.requires_grad())).collect();
        for (t, _) in &params {
            let _ = t.f_set_requires_grad(false).tch()?;
        }
        Ok(Frozen { params })
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        for (t, was) in &self.params {
            let _ = t.f_set_requires_grad(*was);
        }
    }
}

/// Discover the KV circuit of `model` on the validation tokens `val`.
/// `progress` gets a line per evaluation.
pub fn discover(
    model: &dyn Model,
    val: &TokenFile,
    cfg: &KvCircuitConfig,
    device: Device,
    progress: &mut dyn FnMut(&str),
) -> Result<Circuit> {
    let temp = cfg.validate()?;
    let started = std::time::Instant::now();
    let block = match (model.task(), cfg.block_size) {
        (crate::models::Task::LanguageModel { block_size, .. }, 0) => block_size,
        (crate::models::Task::LanguageModel { block_size, .. }, b) if b > block_size => {
            bail!("kv circuit: block_size {b} exceeds the model's {block_size}")
        }
        (crate::models::Task::LanguageModel { .. }, b) => b,
        _ => bail!("kv circuit needs a language model (GPT-2), got {}", model.arch()),
    };
    let decoupled = model.arch() == "gpt2"
        && serde_json::from_value::<crate::models::gpt2::Config>(model.config())
            .ok()
            .and_then(|c| c.spec().ok())
            .is_some_and(|s| s.rope == crate::attention::Rope::Decoupled);
    if decoupled {
        bail!(
            "kv circuit: this model's decoupled RoPE adds a shared rotated key (k_r) to every score, and \
             the masks on hook_k/hook_v do not reach it"
        );
    }
    if let crate::models::Task::LanguageModel { vocab, .. } = model.task() {
        val.check_vocab(vocab as u32)?;
    }
    let _frozen = Frozen::new(model)?;
    let mut data = Windows::new(val, cfg, block as usize, device)?;
    let held_out = data.eval_batches()?;
    let layers = probe_layers(model, &held_out[0].0.f_narrow(0, 0, 1).tch()?)?;
    let mut set = MaskSet::new(layers.clone(), cfg.init_keep_prob, device)?;
    let bpt = cfg.bytes_per_token;

    let eval_masks = |set: &MaskSet, s: f64| -> Result<(f64, StepMasks)> {
        let sm = set.step_masks(s, 1.0, false)?;
        let hooks_check = MaskHooks::new(&set.layers, &sm.masks);
        let loss = eval_loss(model, &held_out, &set.layers, Some(&sm.masks))?;
        // One probe forward with a visible hook set proves every point is reached.
        let x0 = held_out[0].0.f_narrow(0, 0, 1).tch()?;
        let _ = tch::no_grad(|| model.forward_hooked(&x0, false, Some(&hooks_check))).tch()?;
        let missed = hooks_check.missed();
        if !missed.is_empty() {
            bail!("kv circuit: the model never visits {}", missed.join(", "));
        }
        Ok((loss, sm))
    };
    let full = eval_loss(model, &held_out, &layers, None)?;
    let (initial, _) = eval_masks(&set, 0.0)?;
    let zeros: Vec<Tensor> = set.split(&set.logits.f_zeros_like().tch()?)?;
    let empty = eval_loss(model, &held_out, &layers, Some(&zeros))?;
    progress(&format!(
        "kv circuit: {} channels in {} layers; held-out loss full {full:.4}, all kept {initial:.4}, none kept {empty:.4}",
        set.channels(),
        layers.len()
    ));
    let n = set.channels() as f64;
    let mut history = vec![Record {
        step: 0,
        loss: None,
        eval_loss: Some(initial),
        sparsity: 0.0,
        target_sparsity: 0.0,
        temperature: temp.at(0.0),
        tau: 0.0,
    }];
    for step in 1..=cfg.steps {
        if crate::interrupt::requested() {
            bail!("kv circuit: interrupted at step {step}");
        }
        let s = cfg.sparsity_at(step)?;
        let t = temp.at(step as f64 / cfg.steps as f64);
        let sm = set.step_masks(s, t, true)?;
        let (x, y) = data.fit_batch()?;
        let hooks = MaskHooks::new(&set.layers, &sm.masks);
        let loss = model.forward_hooked(&x, false, Some(&hooks)).and_then(|l| cross_entropy(&l, &y)).tch()?;
        let grads = Tensor::f_run_backward(&[&loss], &[&set.logits], false, false).tch()?;
        let grad = grads.into_iter().next().ok_or_else(|| anyhow!("no gradient for the mask logits"))?;
        set.adam(&grad, cfg.lr)?;
        let sparsity = (n - sm.kept as f64) / n;
        let mut rec = Record {
            step,
            loss: Some(loss.f_double_value(&[]).tch()?),
            eval_loss: None,
            sparsity,
            target_sparsity: s,
            temperature: t,
            tau: sm.tau,
        };
        if (cfg.eval_every > 0 && step % cfg.eval_every == 0) || step == cfg.steps {
            let (l, _) = eval_masks(&set, s)?;
            rec.eval_loss = Some(l);
            progress(&format!(
                "step {step}/{}: fit loss {:.4}, held-out loss {l:.4}, sparsity {:.4} (target {s:.4}), T {t:.3}",
                cfg.steps,
                rec.loss.unwrap_or(f64::NAN),
                sparsity
            ));
        }
        history.push(rec);
    }
    // The final circuit: exactly the target budget.
    let (final_loss, sm) = eval_masks(&set, cfg.target_sparsity)?;
    let logits =
        crate::tensor::to_vec_f64(&set.logits.f_detach().tch()?.f_to_device(Device::Cpu).tch()?).tch()?;
    let layer_results = layer_results(&set, &sm, &logits)?;
    let kept = sm.kept;
    let loss_gap = empty - full;
    Ok(Circuit {
        config: cfg.clone(),
        model: model.config(),
        channels: set.channels(),
        kept,
        achieved_sparsity: (n - kept as f64) / n,
        full: Eval::of(full, bpt),
        initial: Eval::of(initial, bpt),
        final_: Eval::of(final_loss, bpt),
        empty: Eval::of(empty, bpt),
        loss_degradation: (final_loss - initial) / initial,
        faithfulness: if loss_gap.abs() > 1e-12 { (empty - final_loss) / loss_gap } else { f64::NAN },
        loss_ratio: final_loss / full,
        measured_bytes_per_token: data.measured_bytes_per_token(),
        tau: sm.tau,
        layers: layer_results,
        history,
        seconds: started.elapsed().as_secs_f64(),
        logits,
    })
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    (m, (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n).sqrt())
}

fn layer_results(set: &MaskSet, sm: &StepMasks, logits: &[f64]) -> Result<Vec<LayerResult>> {
    let mut out = Vec::new();
    for (l, mask) in set.layers.iter().zip(&sm.masks) {
        let mask =
            crate::tensor::to_vec_f64(&mask.f_to_device(Device::Cpu).tch()?.f_reshape([-1]).tch()?).tch()?;
        let (o, c) = (l.offset as usize, (l.heads * l.d_head) as usize);
        let imp: Vec<f64> = logits[o..o + c].iter().map(|x| sigmoid(x - sm.tau)).collect();
        let kept = mask.iter().filter(|m| **m > 0.5).count() as i64;
        let (mean, std) = mean_std(&imp);
        let d = l.d_head as usize;
        let head_sparsity =
            mask.chunks(d).map(|h| h.iter().filter(|m| **m <= 0.5).count() as f64 / d as f64).collect();
        out.push(LayerResult {
            layer: l.layer,
            name: format!("blocks.{}.attn", l.layer),
            heads: l.heads,
            d_head: l.d_head,
            channels: c as i64,
            kept,
            sparsity: (c as i64 - kept) as f64 / c as f64,
            mean_importance: mean,
            std_importance: std,
            head_sparsity,
            importance: imp.chunks(d).map(<[f64]>::to_vec).collect(),
            mask: mask.chunks(d).map(<[f64]>::to_vec).collect(),
        });
    }
    Ok(out)
}

// ---- outputs ----------------------------------------------------------------------

impl Circuit {
    /// The hard mask of every layer ([H, D] rows of 0/1).
    pub fn masks(&self) -> Vec<Vec<Vec<f64>>> {
        self.layers.iter().map(|l| l.mask.clone()).collect()
    }

    /// summary.json: everything but the history and the per-channel values.
    pub fn summary(&self) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Some(o) = v.as_object_mut() {
            o.remove("history");
            if let Some(Value::Array(ls)) = o.get_mut("layers") {
                for l in ls.iter_mut().filter_map(Value::as_object_mut) {
                    l.remove("importance");
                    l.remove("mask");
                }
            }
        }
        v
    }

    /// Write the outputs into `dir` (created); returns the files written.
    /// `source` names what was analysed (a checkpoint) in the report.
    pub fn write_outputs(&self, dir: &Path, source: &str, save_masks: bool) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
        let mut files = Vec::new();
        if save_masks {
            files.push(self.write_masks(&dir.join("final_masks.safetensors"), source)?);
        }
        let mut lines = String::new();
        for r in &self.history {
            lines.push_str(&serde_json::to_string(r)?);
            lines.push('\n');
        }
        let p = dir.join("metrics.jsonl");
        crate::runs::write_atomic(&p, lines.as_bytes())?;
        files.push(p);
        let p = dir.join("summary.json");
        let mut s = serde_json::to_string_pretty(&json!({ "source": source, "circuit": self.summary() }))?;
        s.push('\n');
        crate::runs::write_atomic(&p, s.as_bytes())?;
        files.push(p);
        files.extend(self.draw(dir)?);
        let p = dir.join("circuit_analysis_report.md");
        crate::runs::write_atomic(&p, self.report_markdown(source).as_bytes())?;
        files.push(p);
        Ok(files)
    }

    fn write_masks(&self, path: &Path, source: &str) -> Result<PathBuf> {
        let mut named: Vec<(String, Tensor)> = Vec::new();
        for l in &self.layers {
            let o = self.layers_offset(l.layer);
            let c = l.channels as usize;
            let shape = [l.heads, l.d_head];
            let t = |v: &[f64]| {
                Tensor::f_from_slice(v)
                    .and_then(|t| t.f_view(shape))
                    .and_then(|t| t.f_to_kind(Kind::Float))
                    .tch()
            };
            let imp: Vec<f64> = l.importance.concat();
            let mask: Vec<f64> = l.mask.concat();
            named.push((format!("{}.logits", l.name), t(&self.logits[o..o + c])?));
            named.push((format!("{}.mask", l.name), t(&mask)?));
            named.push((format!("{}.importance", l.name), t(&imp)?));
            named.push((format!("{}.sparsity", l.name), Tensor::f_from_slice(&[l.sparsity as f32]).tch()?));
        }
        let refs: Vec<(String, &Tensor)> = named.iter().map(|(n, t)| (n.clone(), t)).collect();
        let mut meta = BTreeMap::new();
        meta.insert(
            "knlp_kv_circuit".to_string(),
            serde_json::to_string(&json!({ "source": source, "circuit": self.summary() }))?,
        );
        crate::safetensors::save(path, &refs, &meta, crate::safetensors::Target::OWNED)
            .map_err(|e| anyhow!(e))?;
        Ok(path.to_path_buf())
    }

    fn layers_offset(&self, layer: i64) -> usize {
        self.layers.iter().take_while(|l| l.layer != layer).map(|l| l.channels as usize).sum()
    }

    fn draw(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        use report::heatmap::{draw_heatmap, draw_heatmap_grid, Cmap, Heatmap};
        use report::plot::{save, Line, LinePlot, Style};
        let panel = |l: &LayerResult, cmap: Cmap, title: String| Heatmap {
            title,
            values: l.importance.clone(),
            row_labels: (0..l.heads).map(|h| format!("h{h}")).collect(),
            col_labels: Vec::new(),
            x_label: "channel".into(),
            y_label: "head".into(),
            range: Some((0.0, 1.0)),
            cmap,
        };
        let mut files = Vec::new();
        let panels: Vec<Heatmap> = self
            .layers
            .iter()
            .map(|l| {
                panel(l, Cmap::Viridis, format!("layer {} ({:.1}% pruned)", l.layer, 100.0 * l.sparsity))
            })
            .collect();
        let cols = (panels.len() as f64).sqrt().ceil() as usize;
        let title = format!("K/V channel importance (sparsity {:.1}%)", 100.0 * self.achieved_sparsity);
        files.extend(draw_heatmap_grid(&panels, cols.max(1), &title, &dir.join("kv_channel_importance"))?);
        for l in &self.layers {
            let h = panel(l, Cmap::RdYlGn, format!("{} importance", l.name));
            files.extend(draw_heatmap(&h, &dir.join(format!("layer{}_importance", l.layer)))?);
        }
        let pts = |f: &dyn Fn(&Record) -> Option<f64>| -> Vec<(f64, f64)> {
            self.history.iter().filter_map(|r| f(r).map(|v| (r.step as f64, v))).collect()
        };
        let line = |name: &str, i: usize, points: Vec<(f64, f64)>| Line {
            name: name.into(),
            points,
            style: Style::nth(i),
        };
        let curves = LinePlot {
            title: "Sparsity and temperature".into(),
            x_label: "step".into(),
            y_label: "value".into(),
            lines: vec![
                line("achieved sparsity", 0, pts(&|r| Some(r.sparsity))),
                line("target sparsity", 1, pts(&|r| Some(r.target_sparsity))),
                line("temperature", 2, pts(&|r| Some(r.temperature))),
            ],
            ..LinePlot::default()
        };
        let losses = LinePlot {
            title: "Loss with the circuit".into(),
            x_label: "step".into(),
            y_label: "cross-entropy (nats)".into(),
            lines: vec![line("fit batch", 0, pts(&|r| r.loss)), line("held-out", 1, pts(&|r| r.eval_loss))],
            hlines: vec![("full model (held-out)".into(), self.full.loss, Style::nth(3))],
            ..LinePlot::default()
        };
        for (plot, stem) in [(&curves, "sparsity_curves"), (&losses, "loss_curves")] {
            for ext in ["png", "svg"] {
                let p = dir.join(format!("{stem}.{ext}"));
                save(plot, &p)?;
                files.push(p);
            }
        }
        Ok(files)
    }

    /// circuit_analysis_report.md.
    pub fn report_markdown(&self, source: &str) -> String {
        let c = &self.config;
        let mut s = String::new();
        let mut w = |line: String| {
            s.push_str(&line);
            s.push('\n');
        };
        w("# KV circuit analysis".into());
        w(String::new());
        w(format!("Source: `{source}`  "));
        w(format!("Model: {}  ", serde_json::to_string(&self.model).unwrap_or_default()));
        w(format!("Time: {:.1} s", self.seconds));
        w(String::new());
        w("## Configuration".into());
        w(String::new());
        w("| option | value |".into());
        w("|---|---|".into());
        if let Value::Object(m) = serde_json::to_value(c).unwrap_or(Value::Null) {
            for (k, v) in m {
                w(format!("| {k} | {v} |"));
            }
        }
        w(String::new());
        w("## Results (held-out 20 % of the validation split)".into());
        w(String::new());
        w("| | loss | perplexity | bits per byte |".into());
        w("|---|---|---|---|".into());
        for (name, e) in [
            ("full model", self.full),
            ("initial (all channels kept)", self.initial),
            ("final circuit", self.final_),
            ("no K/V channels", self.empty),
        ] {
            w(format!("| {name} | {:.4} | {:.2} | {:.4} |", e.loss, e.ppl, e.bpb));
        }
        w(String::new());
        w(format!(
            "- sparsity: {:.4} achieved, {:.4} targeted ({} of {} channels kept)",
            self.achieved_sparsity, c.target_sparsity, self.kept, self.channels
        ));
        w(format!("- loss degradation (final − initial) / initial: {:+.4}", self.loss_degradation));
        w(format!(
            "- faithfulness (L_none − L_circuit) / (L_none − L_full): {:.4}; loss ratio circuit / full: {:.4}",
            self.faithfulness, self.loss_ratio
        ));
        let bpt = self.measured_bytes_per_token.map(|b| format!("{b:.3}")).unwrap_or_else(|| "n/a".into());
        w(format!(
            "- bits per byte assume {} bytes per token; the held-out text measures {bpt} bytes per token",
            c.bytes_per_token
        ));
        w(String::new());
        w("## Layers".into());
        w(String::new());
        w("| layer | sparsity | mean importance | std importance | channels kept | per-head sparsity |"
            .into());
        w("|---|---|---|---|---|---|".into());
        for l in &self.layers {
            let heads: Vec<String> = l.head_sparsity.iter().map(|h| format!("{h:.2}")).collect();
            w(format!(
                "| {} | {:.4} | {:.4} | {:.4} | {}/{} | {} |",
                l.name,
                l.sparsity,
                l.mean_importance,
                l.std_importance,
                l.kept,
                l.channels,
                heads.join(" ")
            ));
        }
        w(String::new());
        w("Graphs: kv_channel_importance.png, layer*_importance.png, sparsity_curves.png, loss_curves.png."
            .into());
        s
    }
}

// ---- checkpoints, runs and the command line -------------------------------------

/// A model loaded strictly from a knlp checkpoint, with the token folder it
/// was trained on (from the run record), if any.
pub struct LoadedModel {
    pub model: Box<dyn Model>,
    pub data_dir: Option<PathBuf>,
}

/// Build the checkpoint's model from its recorded configuration and load
/// its weights strictly (a missing or unexpected tensor is an error naming it).
pub fn load_checkpoint(path: &Path, device: Device) -> Result<LoadedModel> {
    let ck = crate::checkpoint::load(path)?;
    if ck.state.arch != "gpt2" {
        bail!("{}: a {} checkpoint; KV circuits need gpt2", path.display(), ck.state.arch);
    }
    let cfg = ck.state.config.get("model").cloned().unwrap_or(Value::Null);
    let mut model = crate::models::build("gpt2", cfg)
        .with_context(|| format!("{}: model configuration", path.display()))?;
    model.store_mut().finalize(device)?;
    ck.restore_model(model.store())?;
    let data_dir = ck.state.config.pointer("/data/dir").and_then(Value::as_str).map(PathBuf::from);
    Ok(LoadedModel { model, data_dir })
}

/// How checkpoints are found (Kconfig `MECHINT_KV_POSTTRAIN` / `_FROM_RUNS`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Mode {
    /// A checkpoint file, a glob of them, or a folder (its run's checkpoint).
    Posttrain(String),
    /// Every run of a project folder (empty: the most recent under `runs`).
    FromRuns(String),
}

/// Everything `knlp mechint` needs, from `.config` or the command line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// `MECHINT`: the menu's master switch (`knlp mechint` refuses when off).
    pub enabled: bool,
    pub mode: Mode,
    /// A token folder, `brown` or empty (the checkpoint's own data, else Brown).
    pub dataset: String,
    pub output_dir: PathBuf,
    pub save_masks: bool,
    pub device: String,
    pub circuit: KvCircuitConfig,
}

impl Settings {
    /// The defaults of kconfig/Kconfig.mechint for `mode` (no `.config`).
    pub fn defaults(mode: Mode) -> Settings {
        Settings {
            enabled: true,
            mode,
            dataset: String::new(),
            output_dir: PathBuf::from("runs/mechint"),
            save_masks: true,
            device: "auto".into(),
            circuit: KvCircuitConfig::default(),
        }
    }

    /// Read the `MECHINT*` symbols (kconfig/Kconfig.mechint), whether or not
    /// the menu is on (every symbol is read, as `Experiment::read` does).
    pub fn read(r: &crate::config::Reader) -> Result<Settings> {
        let from_runs = r.bool("MECHINT_KV_FROM_RUNS")?;
        let posttrain = r.bool("MECHINT_KV_POSTTRAIN")?;
        let checkpoint = r.string("MECHINT_KV_CHECKPOINT")?;
        let run_dir = r.string("MECHINT_KV_RUN_DIR")?;
        let on = r.bool("MECHINT")?;
        let d = KvCircuitConfig::default();
        let circuit = KvCircuitConfig {
            target_sparsity: r.float_opt("MECHINT_KV_TARGET_SPARSITY")?.unwrap_or(d.target_sparsity),
            steps: r.int_opt("MECHINT_KV_STEPS")?.unwrap_or(d.steps),
            lr: r.float_opt("MECHINT_KV_LR")?.unwrap_or(d.lr),
            temperature: Some(r.string("MECHINT_KV_TEMP_SCHEDULE")?)
                .filter(|s| !s.is_empty())
                .unwrap_or(d.temperature),
            sparsity_schedule: [("LINEAR", "linear"), ("EXPONENTIAL", "exponential"), ("COSINE", "cosine")]
                .iter()
                .map(|(k, v)| Ok((r.bool(&format!("MECHINT_KV_SPARSITY_SCHEDULE_{k}"))?, *v)))
                .collect::<Result<Vec<_>>>()?
                .into_iter()
                .find(|(on, _)| *on)
                .map(|(_, v)| v.to_string())
                .unwrap_or(d.sparsity_schedule),
            init_keep_prob: r.float_opt("MECHINT_KV_INIT_KEEP_PROB")?.unwrap_or(d.init_keep_prob),
            eval_every: r.int_opt("MECHINT_KV_EVAL_EVERY")?.unwrap_or(d.eval_every),
            batch_size: r.int_opt("MECHINT_KV_BATCH_SIZE")?.unwrap_or(d.batch_size),
            block_size: r.int_opt("MECHINT_KV_BLOCK_SIZE")?.unwrap_or(d.block_size),
            seed: r.int("SEED")?.max(0),
            ..d
        };
        let mode =
            if from_runs && !posttrain { Mode::FromRuns(run_dir) } else { Mode::Posttrain(checkpoint) };
        Ok(Settings {
            enabled: on,
            mode,
            dataset: r.string("MECHINT_KV_DATASET")?,
            output_dir: PathBuf::from(
                Some(r.string("MECHINT_OUTPUT_DIR")?)
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "runs/mechint".into()),
            ),
            save_masks: r.bool("MECHINT_SAVE_MASKS")?,
            device: ["AUTO", "CPU", "CUDA"]
                .iter()
                .map(|k| Ok((r.bool(&format!("DEVICE_{k}"))?, k.to_ascii_lowercase())))
                .collect::<Result<Vec<_>>>()?
                .into_iter()
                .find(|(on, _)| *on)
                .map(|(_, v)| v)
                .unwrap_or_else(|| "auto".into()),
            circuit,
        })
    }
}

/// Expand a path pattern with `*` and `?` in any component, sorted.
pub fn expand_glob(pattern: &str) -> Vec<PathBuf> {
    let p = Path::new(pattern);
    let mut cur: Vec<PathBuf> = vec![if p.is_absolute() { PathBuf::from("/") } else { PathBuf::new() }];
    for comp in p.components() {
        let c = comp.as_os_str().to_string_lossy().to_string();
        if matches!(comp, std::path::Component::RootDir | std::path::Component::Prefix(_)) {
            continue;
        }
        if !c.contains(['*', '?']) {
            cur = cur.into_iter().map(|d| d.join(&c)).filter(|d| d.exists()).collect();
            continue;
        }
        let mut next = Vec::new();
        for d in &cur {
            let dir = if d.as_os_str().is_empty() { Path::new(".") } else { d.as_path() };
            let Ok(rd) = std::fs::read_dir(dir) else { continue };
            for e in rd.flatten() {
                if crate::glob::matches(&c, &e.file_name().to_string_lossy()) {
                    next.push(d.join(e.file_name()));
                }
            }
        }
        cur = next;
    }
    cur.sort();
    cur
}

/// The checkpoint of a run folder: best, else last.
fn run_checkpoint(run: &Path) -> Option<PathBuf> {
    ["best", "last"]
        .iter()
        .map(|w| run.join(crate::runs::CHECKPOINTS).join(format!("{w}.safetensors")))
        .find(|p| p.is_file())
}

/// A result folder name for a checkpoint: its run's name, else its stem.
fn result_name(ck: &Path) -> String {
    let parent = ck.parent();
    if parent.and_then(Path::file_name).is_some_and(|n| n == crate::runs::CHECKPOINTS) {
        if let Some(run) = parent.and_then(Path::parent).and_then(Path::file_name) {
            return run.to_string_lossy().into_owned();
        }
    }
    ck.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "checkpoint".into())
}

/// The (result name, checkpoint) pairs `mode` selects; none is an error.
pub fn checkpoints(mode: &Mode) -> Result<Vec<(String, PathBuf)>> {
    let found: Vec<PathBuf> = match mode {
        Mode::Posttrain(pat) if pat.trim().is_empty() => {
            bail!("no checkpoint configured (MECHINT_KV_CHECKPOINT)")
        }
        Mode::Posttrain(pat) => {
            let p = Path::new(pat.trim());
            if p.is_dir() {
                vec![run_checkpoint(p).ok_or_else(|| {
                    anyhow!("{}: no checkpoints/best or last.safetensors in it", p.display())
                })?]
            } else if p.is_file() {
                vec![p.to_path_buf()]
            } else {
                expand_glob(pat.trim()).into_iter().filter(|p| p.is_file()).collect()
            }
        }
        Mode::FromRuns(dir) => {
            let project = if dir.trim().is_empty() {
                crate::matrix::latest_project(Path::new("runs"))?
            } else {
                PathBuf::from(dir.trim())
            };
            let mut runs: Vec<PathBuf> = std::fs::read_dir(&project)
                .with_context(|| format!("{}: not a project folder", project.display()))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect();
            runs.sort();
            runs.iter().filter_map(|r| run_checkpoint(r)).collect()
        }
    };
    if found.is_empty() {
        bail!("no checkpoints found for {mode:?}");
    }
    Ok(found.into_iter().map(|p| (result_name(&p), p)).collect())
}

/// The validation token file for a run: `dataset` (a folder, or `brown`),
/// else the checkpoint's own training data, else the Brown corpus.
pub fn open_dataset(dataset: &str, recorded: Option<&Path>, vocab: u32) -> Result<crate::data::TokenDataset> {
    let dir = match dataset.trim() {
        "" => match recorded.filter(|d| d.is_dir()) {
            Some(d) => d.to_path_buf(),
            None => crate::data::default_text_dataset(&crate::data::default_cache_dir())?,
        },
        "brown" => crate::data::default_text_dataset(&crate::data::default_cache_dir())?,
        d => PathBuf::from(d),
    };
    crate::data::TokenDataset::open(&dir, Some(vocab), 0)
}

/// Analyse one checkpoint into `<output_dir>/<name>`; returns that folder.
pub fn run_one(name: &str, ck: &Path, s: &Settings, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let device = crate::tensor::parse_device_or_auto(&s.device).map_err(|e| anyhow!(e))?;
    let lm = load_checkpoint(ck, device)?;
    let vocab = match lm.model.task() {
        crate::models::Task::LanguageModel { vocab, .. } => vocab as u32,
        _ => bail!("{}: not a language model", ck.display()),
    };
    let ds = open_dataset(&s.dataset, lm.data_dir.as_deref(), vocab)?;
    progress(&format!(
        "{name}: {} on {} (validation split of {})",
        ck.display(),
        crate::tensor::device_name(device),
        ds.dir.display()
    ));
    let c = discover(lm.model.as_ref(), &ds.val, &s.circuit, device, progress)?;
    let out = s.output_dir.join(name);
    c.write_outputs(&out, &ck.display().to_string(), s.save_masks)?;
    progress(&format!(
        "{name}: sparsity {:.4}, loss {:.4} -> {:.4} (full {:.4}), faithfulness {:.4}; wrote {}",
        c.achieved_sparsity,
        c.initial.loss,
        c.final_.loss,
        c.full.loss,
        c.faithfulness,
        out.display()
    ));
    Ok(out)
}

/// Analyse every checkpoint `s` selects, then compare the V0/V1 pairs
/// among the results. Failures are reported and skipped; returns the
/// number of failures.
pub fn run_all(s: &Settings, progress: &mut dyn FnMut(&str)) -> Result<usize> {
    let mut failed = 0;
    for (name, ck) in checkpoints(&s.mode)? {
        if let Err(e) = run_one(&name, &ck, s, progress) {
            progress(&format!("{name}: failed: {e:#}"));
            failed += 1;
        }
    }
    failed += compare_pairs(&s.output_dir, progress)?;
    Ok(failed)
}

/// Compare each V0/V1 pair of results under `output_dir` into
/// `<output_dir>/compare_<v0>_vs_<v1>`; returns the number of failures.
pub fn compare_pairs(output_dir: &Path, progress: &mut dyn FnMut(&str)) -> Result<usize> {
    let mut failed = 0;
    for (a, b) in variant_pairs(output_dir)? {
        let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let out = output_dir.join(format!("compare_{}_vs_{}", name(&a), name(&b)));
        match compare_variants(&a, &b, &out) {
            Ok(_) => progress(&format!("V0 {} vs V1 {}: wrote {}", name(&a), name(&b), out.display())),
            Err(e) => {
                progress(&format!("comparison of {} and {} failed: {e:#}", a.display(), b.display()));
                failed += 1;
            }
        }
    }
    Ok(failed)
}

// ---- V0 / V1 comparison ---------------------------------------------------------

/// The KV-tying variant of a result: its name's `V0`/`V1` token, else the
/// model's attention (`mha` is V0, `kv_tying` V1).
fn variant_of(name: &str, summary: &Value) -> Option<&'static str> {
    let tokens: Vec<&str> = name.split(|c: char| !c.is_ascii_alphanumeric()).collect();
    for (tok, v) in [("V0", "V0"), ("stepV0", "V0"), ("V1", "V1"), ("stepV1", "V1")] {
        if tokens.iter().any(|t| *t == tok || t.ends_with(tok)) {
            return Some(v);
        }
    }
    match summary.pointer("/circuit/model/attention").and_then(Value::as_str) {
        Some("mha") => Some("V0"),
        Some("kv_tying") => Some("V1"),
        _ => None,
    }
}

fn read_summary(dir: &Path) -> Result<Value> {
    let p = dir.join("summary.json");
    let t = std::fs::read_to_string(&p).with_context(|| format!("{}: no KV circuit results", p.display()))?;
    serde_json::from_str(&t).with_context(|| format!("{}: not valid JSON", p.display()))
}

/// Result folders under `output_dir` paired V0 with V1 (by name with the
/// variant removed; a lone pair pairs regardless).
pub fn variant_pairs(output_dir: &Path) -> Result<Vec<(PathBuf, PathBuf)>> {
    let mut v0 = Vec::new();
    let mut v1 = Vec::new();
    let Ok(rd) = std::fs::read_dir(output_dir) else { return Ok(Vec::new()) };
    let mut dirs: Vec<PathBuf> =
        rd.flatten().map(|e| e.path()).filter(|p| p.join("summary.json").is_file()).collect();
    dirs.sort();
    for d in dirs {
        let name = d.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let key = ["stepV0", "stepV1", "V0", "V1", "kv_tying", "mha"]
            .iter()
            .fold(name.clone(), |k, t| k.replace(t, "*"));
        match variant_of(&name, &read_summary(&d)?) {
            Some("V0") => v0.push((key, d)),
            Some("V1") => v1.push((key, d)),
            _ => {}
        }
    }
    if v0.len() == 1 && v1.len() == 1 {
        return Ok(vec![(v0.remove(0).1, v1.remove(0).1)]);
    }
    Ok(v0
        .into_iter()
        .filter_map(|(k, a)| v1.iter().find(|(k1, _)| *k1 == k).map(|(_, b)| (a, b.clone())))
        .collect())
}

/// One layer of a result.
struct Row {
    sparsity: f64,
    importance: f64,
    kept: f64,
    /// Sparsity per head.
    heads: Vec<f64>,
}

/// Per-layer numbers of one result.
struct Side {
    name: String,
    degradation: f64,
    sparsity: f64,
    faithfulness: f64,
    layers: Vec<Row>,
}

fn side(dir: &Path) -> Result<Side> {
    let s = read_summary(dir)?;
    let c = &s["circuit"];
    let num = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    let layers = c["layers"]
        .as_array()
        .ok_or_else(|| anyhow!("{}: summary.json has no layers", dir.display()))?
        .iter()
        .map(|l| {
            let heads = l["head_sparsity"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default();
            Row {
                sparsity: num(l, "sparsity"),
                importance: num(l, "mean_importance"),
                kept: num(l, "kept"),
                heads,
            }
        })
        .collect();
    Ok(Side {
        name: dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        degradation: num(c, "loss_degradation"),
        sparsity: num(c, "achieved_sparsity"),
        faithfulness: num(c, "faithfulness"),
        layers,
    })
}

/// Compare a V0 and a V1 result into `out`: delta heatmap (V1 − V0 head
/// sparsity per layer), bars and variant_comparison.md. Returns the files.
pub fn compare_variants(v0: &Path, v1: &Path, out: &Path) -> Result<Vec<PathBuf>> {
    use report::heatmap::{draw_heatmap, Cmap, Heatmap};
    use report::plot::{save, BarPlot, Bars, Style};
    let (a, b) = (side(v0)?, side(v1)?);
    if a.layers.len() != b.layers.len() {
        bail!("{} has {} layers, {} has {}: not comparable", a.name, a.layers.len(), b.name, b.layers.len());
    }
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let mut files = Vec::new();
    let n = a.layers.len();
    let delta: Vec<Vec<f64>> = a
        .layers
        .iter()
        .zip(&b.layers)
        .map(|(x, y)| x.heads.iter().zip(&y.heads).map(|(p, q)| q - p).collect())
        .collect();
    let hm = Heatmap {
        title: "Head sparsity V1 − V0".into(),
        values: delta,
        row_labels: (0..n).map(|i| format!("L{i}")).collect(),
        col_labels: Vec::new(),
        x_label: "head".into(),
        y_label: "layer".into(),
        range: None,
        cmap: Cmap::RdBu,
    };
    files.extend(draw_heatmap(&hm, &out.join("delta_heatmap"))?);
    let groups: Vec<String> = (0..n).map(|i| format!("L{i}")).collect();
    let bars = |title: &str, y: &str, f: fn(&Row) -> f64| BarPlot {
        title: title.into(),
        x_label: "layer".into(),
        y_label: y.into(),
        groups: groups.clone(),
        bars: vec![
            Bars {
                name: format!("V0 {}", a.name),
                values: a.layers.iter().map(|l| Some(f(l))).collect(),
                ranges: vec![],
                style: Style::nth(0),
            },
            Bars {
                name: format!("V1 {}", b.name),
                values: b.layers.iter().map(|l| Some(f(l))).collect(),
                ranges: vec![],
                style: Style::nth(1),
            },
        ],
        ..BarPlot::default()
    };
    let overall = BarPlot {
        title: "Overall".into(),
        x_label: "".into(),
        y_label: "value".into(),
        groups: vec!["loss degradation".into(), "sparsity".into(), "faithfulness".into()],
        bars: vec![
            Bars {
                name: "V0".into(),
                values: vec![Some(a.degradation), Some(a.sparsity), Some(a.faithfulness)],
                ranges: vec![],
                style: Style::nth(0),
            },
            Bars {
                name: "V1".into(),
                values: vec![Some(b.degradation), Some(b.sparsity), Some(b.faithfulness)],
                ranges: vec![],
                style: Style::nth(1),
            },
        ],
        value_fmt: Some(|v| format!("{v:.3}")),
        ..BarPlot::default()
    };
    let plots = [
        (overall, "overall_summary"),
        (bars("Sparsity per layer", "sparsity", |l| l.sparsity), "sparsity_comparison"),
        (bars("Mean importance per layer", "mean importance", |l| l.importance), "importance_comparison"),
        (bars("Channels kept per layer", "channels", |l| l.kept), "channels_comparison"),
    ];
    for (p, stem) in &plots {
        for ext in ["png", "svg"] {
            let f = out.join(format!("{stem}.{ext}"));
            save(p, &f)?;
            files.push(f);
        }
    }
    let md = out.join("variant_comparison.md");
    crate::runs::write_atomic(&md, comparison_markdown(&a, &b, v0, v1).as_bytes())?;
    files.push(md);
    Ok(files)
}

fn comparison_markdown(a: &Side, b: &Side, v0: &Path, v1: &Path) -> String {
    let n = a.layers.len();
    let d: Vec<f64> = a.layers.iter().zip(&b.layers).map(|(x, y)| y.sparsity - x.sparsity).collect();
    let third = |lo: usize, hi: usize| {
        let s = &d[lo.min(n)..hi.min(n)];
        if s.is_empty() {
            f64::NAN
        } else {
            s.iter().sum::<f64>() / s.len() as f64
        }
    };
    let (t1, t2) = (n / 3, 2 * n / 3);
    let mut top: Vec<(usize, f64)> = d.iter().copied().enumerate().collect();
    top.sort_by(|x, y| y.1.abs().total_cmp(&x.1.abs()));
    let worse = if b.degradation > a.degradation { "V1 (KV tying)" } else { "V0 (standard)" };
    let mut s = format!(
        "# KV circuits: V0 vs V1\n\nV0: `{}`  \nV1: `{}`\n\n| | V0 | V1 |\n|---|---|---|\n| loss degradation | {:+.4} | {:+.4} |\n| sparsity | {:.4} | {:.4} |\n| faithfulness | {:.4} | {:.4} |\n\n",
        v0.display(), v1.display(), a.degradation, b.degradation, a.sparsity, b.sparsity, a.faithfulness, b.faithfulness
    );
    s.push_str(&format!("## Key findings\n\n- {worse} degrades more at its circuit.\n"));
    s.push_str(&format!(
        "- mean sparsity delta (V1 − V0): early layers 0–{} {:+.4}, middle {}–{} {:+.4}, late {}–{} {:+.4}\n",
        t1.saturating_sub(1),
        third(0, t1),
        t1,
        t2.saturating_sub(1),
        third(t1, t2),
        t2,
        n.saturating_sub(1),
        third(t2, n)
    ));
    let tops: Vec<String> = top.iter().take(3).map(|(i, v)| format!("layer {i} {v:+.4}")).collect();
    s.push_str(&format!("- largest layer deltas: {}\n\n", tops.join(", ")));
    s.push_str("## Per layer\n\n| layer | V0 sparsity | V1 sparsity | delta | V0 importance | V1 importance |\n|---|---|---|---|---|---|\n");
    for (i, (x, y)) in a.layers.iter().zip(&b.layers).enumerate() {
        s.push_str(&format!(
            "| {i} | {:.4} | {:.4} | {:+.4} | {:.4} | {:.4} |\n",
            x.sparsity,
            y.sparsity,
            y.sparsity - x.sparsity,
            x.importance,
            y.importance
        ));
    }
    s.push_str("\nGraphs: delta_heatmap.png, overall_summary.png, sparsity_comparison.png, importance_comparison.png, channels_comparison.png.\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        let t = TempSchedule::parse("linear:1.0:0.1").unwrap();
        assert!((t.at(0.5) - 0.55).abs() < 1e-12);
        let e = TempSchedule::parse("exp:1:0.01").unwrap();
        assert!((e.at(0.5) - 0.1).abs() < 1e-12);
        assert_eq!(TempSchedule::parse("constant:2").unwrap().at(0.7), 2.0);
        for bad in ["cubic:1:0.1", "linear:1", "linear:a:1", "linear:1:-1", ""] {
            assert!(TempSchedule::parse(bad).is_err(), "{bad}");
        }
        for (name, _) in SPARSITY_SCHEDULES {
            assert_eq!(scheduled_sparsity(name, 0.9, 0.0).unwrap(), 0.0);
            assert!((scheduled_sparsity(name, 0.9, 1.0).unwrap() - 0.9).abs() < 1e-12, "{name}");
        }
        assert!(scheduled_sparsity("cubic", 0.9, 0.5).unwrap_err().to_string().contains("valid: linear"));
    }

    #[test]
    fn validation_names_the_field() {
        let c = KvCircuitConfig { init_keep_prob: 0.5, ..KvCircuitConfig::default() };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("init_keep_prob = 0.5"), "{e}");
        let c = KvCircuitConfig { target_sparsity: 1.0, ..KvCircuitConfig::default() };
        assert!(c.validate().unwrap_err().to_string().contains("target_sparsity"));
        assert!(KvCircuitConfig::default().validate().is_ok());
    }

    #[test]
    fn masks_keep_exactly_the_budget() {
        let layers = vec![
            LayerShape { layer: 0, heads: 2, d_head: 4, offset: 0 },
            LayerShape { layer: 1, heads: 2, d_head: 4, offset: 8 },
        ];
        let set = MaskSet::new(layers, 0.9, Device::Cpu).unwrap();
        let sm = set.step_masks(0.0, 1.0, true).unwrap();
        assert_eq!(sm.kept, 16);
        assert!(sm.masks.iter().all(|m| m.min().double_value(&[]) == 1.0));
        let sm = set.step_masks(0.5, 1.0, false).unwrap();
        let kept: f64 = sm.masks.iter().map(|m| m.sum(Kind::Float).double_value(&[])).sum();
        assert_eq!((sm.kept, kept), (8, 8.0));
        assert_eq!(set.keep_count(0.95), 1);
    }

    #[test]
    fn globs() {
        let m = crate::glob::matches;
        assert!(m("final_model_step*.pt", "final_model_step100.pt"));
        assert!(m("?.x", "a.x") && !m("?.x", "ab.x"));
        assert_eq!(variant_of("gpt2-V1_adamw_none", &Value::Null), Some("V1"));
        assert_eq!(variant_of("x_stepV0", &Value::Null), Some("V0"));
        let s = json!({"circuit": {"model": {"attention": "kv_tying"}}});
        assert_eq!(variant_of("gpt2-kv_tying_adamw_none", &s), Some("V1"));
    }
}
