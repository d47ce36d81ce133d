//! Pruning: magnitude, movement and Adam-state ("bitter") methods behind one
//! schedule and one mask machinery.
//!
//! Prunable tensors are linear and convolution weights (embeddings and tied
//! output heads only if configured). [`ParamStore`] lays them out first in
//! each flat buffer, so the prunable weights are one contiguous range and a
//! mask update is a few whole-range kernels: score once, find the k-th
//! smallest score once (exact radix selection by default), compare. Masks are
//! re-applied to the weights after every optimizer step; with `mask_state`
//! (the default) gradients are masked before the step and the optimizer's
//! moments after it, so pruned weights stay exactly zero with zero moments.
pub mod bitter10;
pub mod score;
pub mod select;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tch::{Kind, Tensor};

use crate::params::{ParamStore, Role};
use crate::tensor::torch_error;
use crate::train::{Hook, StepCtx};

fn te(e: tch::TchError) -> anyhow::Error {
    anyhow!(torch_error(&e))
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PruneConfig {
    /// `magnitude`, `movement` or `state` (AdamWPrune).
    pub method: String,
    /// State pruning: `bitter0` ... `bitter9`, `bitter10`, `bitter10z`,
    /// `bitter10s`, `bitter10c`. Movement: `knlp` (W * (W - W0))
    /// or `sanh` (accumulated -W * grad).
    pub variant: String,
    /// Final fraction of prunable weights set to zero.
    pub target: f64,
    /// No pruning during the first `warmup` steps.
    pub warmup: i64,
    /// Step at which the target is reached (0: `ramp_end_epoch` epochs, else 3000).
    pub ramp_end: i64,
    /// Ramp end in epochs, converted with the steps per epoch.
    pub ramp_end_epoch: f64,
    /// Masks are recomputed every `frequency` steps.
    pub frequency: i64,
    /// `cubic` (default) or `linear` ramp.
    pub schedule: String,
    /// Layer-adaptive thresholds (bitter4's rule); default: only for bitter4.
    pub per_layer: Option<bool>,
    /// Estimate the threshold from this fraction of the scores (0 = exact).
    pub sample_fraction: f64,
    /// `fp32` or `fp16`: the precision scores are computed in.
    pub score_dtype: String,
    /// Also prune embeddings (and so a tied output head).
    pub prune_embeddings: bool,
    /// Mask gradients before and optimizer moments after each step.
    pub mask_state: bool,
    /// Recompute masks from scratch at every update, so pruned weights can
    /// come back (the Python knlp's behaviour). Off by default: pruned
    /// weights stay pruned, and the measured sparsity is the target.
    pub regrow: bool,
    /// The bitter10 trackers' settings.
    pub bitter10: bitter10::Bitter10Config,
}

impl Default for PruneConfig {
    fn default() -> Self {
        PruneConfig {
            method: "state".into(),
            variant: "bitter7".into(),
            target: 0.5,
            warmup: 100,
            ramp_end: 0,
            ramp_end_epoch: 0.0,
            frequency: 50,
            schedule: "cubic".into(),
            per_layer: None,
            sample_fraction: 0.0,
            score_dtype: "fp32".into(),
            prune_embeddings: false,
            mask_state: true,
            regrow: false,
            bitter10: Default::default(),
        }
    }
}

pub const METHODS: &[&str] = &["magnitude", "movement", "state"];
pub const MOVEMENT_VARIANTS: &[&str] = &["knlp", "sanh"];

/// The state-pruning variants: every scorer but plain magnitude.
pub fn state_variants() -> Vec<&'static str> {
    score::names().into_iter().filter(|n| *n != "magnitude").collect()
}

impl PruneConfig {
    pub fn validate(&self) -> Result<()> {
        if !METHODS.contains(&self.method.as_str()) {
            bail!("pruning method must be one of {}, got '{}'", METHODS.join(", "), self.method);
        }
        match self.method.as_str() {
            "state" if score::lookup(&self.variant).is_none() || self.variant == "magnitude" => {
                bail!(
                    "state pruning variant must be one of {}, got '{}'",
                    state_variants().join(", "),
                    self.variant
                )
            }
            "movement" if !MOVEMENT_VARIANTS.contains(&self.variant.as_str()) => {
                bail!(
                    "movement variant must be one of {}, got '{}'",
                    MOVEMENT_VARIANTS.join(", "),
                    self.variant
                )
            }
            _ => {}
        }
        if !(0.0..1.0).contains(&self.target) {
            bail!("pruning target must be in [0, 1), got {}", self.target);
        }
        if self.warmup < 0 || self.frequency < 1 || self.ramp_end < 0 || self.ramp_end_epoch < 0.0 {
            bail!("pruning: warmup and ramp_end must be >= 0 and frequency >= 1");
        }
        if !["cubic", "linear"].contains(&self.schedule.as_str()) {
            bail!("pruning schedule must be cubic or linear, got '{}'", self.schedule);
        }
        if !["fp32", "fp16"].contains(&self.score_dtype.as_str()) {
            bail!("score_dtype must be fp32 or fp16, got '{}'", self.score_dtype);
        }
        if !(0.0..=1.0).contains(&self.sample_fraction) {
            bail!("sample_fraction must be in [0, 1], got {}", self.sample_fraction);
        }
        self.bitter10.validate()
    }

    /// The element-wise scorer this configuration uses (None for movement).
    pub fn scorer(&self) -> Option<&str> {
        match self.method.as_str() {
            "magnitude" => Some("magnitude"),
            "state" => Some(&self.variant),
            _ => None,
        }
    }

    pub fn layer_adaptive(&self) -> bool {
        self.per_layer.unwrap_or(self.method == "state" && self.variant == "bitter4")
    }

    /// Ramp end in steps, given the steps per epoch when known.
    pub fn ramp_end_steps(&self, steps_per_epoch: Option<i64>) -> i64 {
        if self.ramp_end > 0 {
            return self.ramp_end;
        }
        match steps_per_epoch {
            Some(s) if self.ramp_end_epoch > 0.0 => (self.ramp_end_epoch * s as f64).round() as i64,
            _ => 3000,
        }
    }
}

/// Scheduled sparsity at `step`: 0 through warm-up, then
/// target * p^3 (or p), p = min(1, (step - warmup) / (ramp_end - warmup)).
pub fn sparsity_at(step: i64, warmup: i64, ramp_end: i64, target: f64, cubic: bool) -> f64 {
    if step <= warmup {
        return 0.0;
    }
    let span = (ramp_end - warmup).max(1) as f64;
    let p = ((step - warmup) as f64 / span).min(1.0);
    target * if cubic { p.powi(3) } else { p }
}

/// One prunable tensor.
#[derive(Clone, Debug)]
pub struct Member {
    pub name: String,
    pub group: usize,
    pub offset: i64,
    pub numel: i64,
    pub shape: Vec<i64>,
    /// Ordinal among prunable tensors in model order (bitter4's layer index).
    pub layer: usize,
}

/// A custom scorer from a script: (name, w, m, v) -> importance, per tensor.
pub type CustomScore<'a> = dyn FnMut(&str, &Tensor, Option<&Tensor>, Option<&Tensor>) -> Result<Tensor> + 'a;

pub struct Pruner {
    pub cfg: PruneConfig,
    pub members: Vec<Member>,
    /// Per flat buffer: prunable length and the bool mask over it.
    ranges: Vec<(usize, i64)>,
    masks: Vec<Tensor>,
    /// Movement: initial weights (knlp) or accumulated scores (sanh).
    movement: Vec<Tensor>,
    /// bitter10, bitter10s, bitter10c: their per-tensor tracker.
    tracker: Option<bitter10::Tracker>,
    pub updates: i64,
    pub last_update: i64,
    pub target_now: f64,
}

impl Pruner {
    pub fn new(store: &ParamStore, cfg: PruneConfig) -> Result<Self> {
        cfg.validate()?;
        if !store.is_finalized() {
            bail!("the model must be finalized before building a pruner");
        }
        let mut members = Vec::new();
        let mut ranges = Vec::new();
        for (gi, g) in store.groups().iter().enumerate() {
            let len = if cfg.prune_embeddings { g.decay_len } else { g.weight_len };
            if len == 0 {
                continue;
            }
            for &(pi, off, n) in &g.members {
                if off < len {
                    let p = &store.params()[pi];
                    debug_assert!(matches!(p.role, Role::Weight | Role::Embedding));
                    members.push((
                        pi,
                        Member {
                            name: p.name.clone(),
                            group: gi,
                            offset: off,
                            numel: n,
                            shape: p.tensor.size(),
                            layer: 0,
                        },
                    ));
                }
            }
            ranges.push((gi, len));
        }
        if members.is_empty() {
            bail!("this model has no prunable tensors");
        }
        members.sort_by_key(|(pi, _)| *pi);
        let members: Vec<Member> = members
            .into_iter()
            .enumerate()
            .map(|(l, (_, mut m))| {
                m.layer = l;
                m
            })
            .collect();
        let mut masks = Vec::new();
        let mut movement = Vec::new();
        for &(gi, len) in &ranges {
            let g = &store.groups()[gi];
            masks.push(Tensor::f_ones([len], (Kind::Bool, g.data.device())).map_err(te)?);
            if cfg.method == "movement" {
                let w = g.data.f_narrow(0, 0, len).map_err(te)?;
                let init =
                    if cfg.variant == "knlp" { crate::tensor::deep_copy(&w) } else { w.f_zeros_like() };
                movement.push(init.and_then(|t| t.f_to_kind(Kind::Float)).map_err(te)?);
            }
        }
        let tracker = match cfg.method.as_str() {
            "state" => bitter10::Tracker::new(&cfg.variant, &cfg.bitter10, store, &members, &ranges)?,
            _ => None,
        };
        Ok(Pruner {
            cfg,
            members,
            ranges,
            masks,
            movement,
            tracker,
            updates: 0,
            last_update: 0,
            target_now: 0.0,
        })
    }

    /// The mask of tensor `name` (a bool view), if it is prunable.
    pub fn mask(&self, name: &str) -> Option<Tensor> {
        let m = self.members.iter().find(|m| m.name == name)?;
        let ri = self.ranges.iter().position(|(g, _)| *g == m.group)?;
        self.masks[ri].f_narrow(0, m.offset, m.numel).and_then(|v| v.f_view(m.shape.as_slice())).ok()
    }

    /// Prunable elements.
    pub fn numel(&self) -> i64 {
        self.ranges.iter().map(|(_, l)| l).sum()
    }

    /// Importance scores over each buffer's prunable range, computed once.
    fn scores(
        &mut self,
        store: &ParamStore,
        opt: Option<&crate::optim::Optimizer>,
        custom: Option<&mut CustomScore>,
    ) -> Result<Vec<Tensor>> {
        let fp16 = self.cfg.score_dtype == "fp16";
        let mut out = Vec::new();
        let mut custom = custom;
        for (ri, &(gi, len)) in self.ranges.iter().enumerate() {
            let g = &store.groups()[gi];
            let w = g.data.f_narrow(0, 0, len).map_err(te)?;
            let mv =
                opt.and_then(|o| o.moments(gi)).map(|(m, v)| (m.f_narrow(0, 0, len), v.f_narrow(0, 0, len)));
            let (m, v) = match mv {
                Some((Ok(m), Ok(v))) => (Some(m), Some(v)),
                _ => (None, None),
            };
            let mut s = if let Some(f) = custom.as_deref_mut() {
                // A script scorer: called once per tensor, with tensors.
                let s = Tensor::f_zeros([len], (Kind::Float, g.data.device())).map_err(te)?;
                for mem in self.members.iter().filter(|mm| mm.group == gi) {
                    let view = |t: &Tensor| {
                        t.f_narrow(0, mem.offset, mem.numel).and_then(|x| x.f_view(mem.shape.as_slice()))
                    };
                    let wv = view(&w).map_err(te)?;
                    let (mv, vv) = match (&m, &v) {
                        (Some(m), Some(v)) => (Some(view(m).map_err(te)?), Some(view(v).map_err(te)?)),
                        _ => (None, None),
                    };
                    let imp = f(&mem.name, &wv, mv.as_ref(), vv.as_ref())?;
                    if imp.size() != mem.shape {
                        bail!(
                            "custom score for '{}' has shape {:?}, expected {:?}",
                            mem.name,
                            imp.size(),
                            mem.shape
                        );
                    }
                    let mut dst = s.f_narrow(0, mem.offset, mem.numel).map_err(te)?;
                    dst.f_copy_(&imp.f_reshape([-1]).and_then(|t| t.f_to_kind(Kind::Float)).map_err(te)?)
                        .map_err(te)?;
                }
                s
            } else if let Some(name) = self.cfg.scorer() {
                if self.cfg.method == "state" && m.is_none() {
                    bail!("state pruning needs an Adam-family optimizer (its moments are the scores' input)");
                }
                let mut s = score::score(name, &w, m.as_ref(), v.as_ref(), fp16).map_err(te)?;
                if let (Some(t), Some(m), Some(v)) = (&self.tracker, &m, &v) {
                    if let Some(f) = t.factor(ri, &w, m, v, &self.masks[ri])? {
                        let _ = s.f_mul_(&f).map_err(te)?;
                    }
                }
                s
            } else if self.cfg.variant == "knlp" {
                // Movement (knlp): W * (W - W0); positive = moving away from zero.
                let w0 = &self.movement[ri];
                w.f_sub(w0).and_then(|d| d.f_mul(&w)).map_err(te)?
            } else {
                crate::tensor::deep_copy(&self.movement[ri]).map_err(te)?
            };
            if self.cfg.scorer().is_some_and(score::is_structural) {
                for mem in self.members.iter().filter(|mm| mm.group == gi) {
                    let sw = score::structure_weight(&mem.name);
                    if sw != 1.0 {
                        let mut part = s.f_narrow(0, mem.offset, mem.numel).map_err(te)?;
                        let _ = part.f_mul_scalar_(sw).map_err(te)?;
                    }
                }
            }
            if !self.cfg.regrow && self.updates > 0 {
                // Pruned weights stay pruned: they rank below every live weight.
                let dead = self.masks[ri].f_logical_not().map_err(te)?;
                let _ = s.f_masked_fill_(&dead, f64::NEG_INFINITY).map_err(te)?;
            }
            out.push(s);
        }
        Ok(out)
    }

    /// Keep-mask for pruning the `k` lowest scores. Exact selection prunes
    /// exactly `k` weights: everything below the k-th smallest score, then
    /// ties at it in index order (with many equal scores, such as the zeros of
    /// already-pruned weights, "score > threshold" alone would over-prune).
    /// A sampled threshold is an estimate: everything at or below it is pruned.
    fn keep_mask(&self, scores: &Tensor, k: i64) -> Result<Tensor> {
        if self.cfg.sample_fraction > 0.0 {
            let mut t = [select::kth_smallest_sampled(scores, k, self.cfg.sample_fraction)?];
            // The sample is random: under DDP every rank takes rank 0's
            // estimate, so the masks agree.
            if crate::dist::world_size() > 1 {
                let all = crate::dist::rank() == 0;
                let mut v = [if all { t[0] } else { f64::NEG_INFINITY }];
                crate::dist::all_reduce_f64(&mut v, crate::dist::Op::Max)?;
                t = v;
            }
            return scores.f_gt(t[0]).map_err(te);
        }
        let t = select::kth_smallest(scores, k)?;
        let keep = scores.f_gt(t).map_err(te)?;
        let at_or_below =
            scores.numel() as i64 - keep.f_sum(Kind::Int64).and_then(|s| s.f_int64_value(&[])).map_err(te)?;
        if at_or_below == k {
            return Ok(keep);
        }
        let below = scores
            .f_lt(t)
            .and_then(|b| b.f_sum(Kind::Int64))
            .and_then(|s| s.f_int64_value(&[]))
            .map_err(te)?;
        let ties = scores.f_eq(t).map_err(te)?;
        // Ties ranked past the k - below that must go are kept.
        let keep_ties = crate::kernels::prune::ties_kept(&ties, k - below)?;
        keep.f_logical_or(&keep_ties).map_err(te)
    }

    /// The CUDA expression that scores this configuration straight from
    /// the float32 weights and moments, if the fused kernel can: a scorer
    /// with an exact CUDA form, no tracker factor, no structural weight, no
    /// float16 rounding, and every moment it reads present.
    fn direct_expr(&self, store: &ParamStore, opt: Option<&crate::optim::Optimizer>) -> Option<String> {
        let name = self.cfg.scorer()?;
        if self.tracker.is_some() || self.cfg.score_dtype == "fp16" || score::is_structural(name) {
            return None;
        }
        let needs = score::lookup(name)?.1;
        for &(gi, _) in &self.ranges {
            if store.groups()[gi].data.kind() != Kind::Float {
                return None;
            }
            if needs != score::Needs::Weight {
                let (m, v) = opt?.moments(gi)?;
                if m.kind() != Kind::Float || v.kind() != Kind::Float {
                    return None;
                }
            }
        }
        score::cuda_expr(name, score::EPS)
    }

    /// Exact masks through `kernels::prune`: scored by `direct` from the
    /// weights and moments, or from ready `scores`. Written into new masks
    /// first, so a failure leaves the old ones intact for the libtorch path.
    fn fused_masks(
        &mut self,
        store: &ParamStore,
        opt: Option<&crate::optim::Optimizer>,
        direct: Option<&str>,
        scores: Option<&[Tensor]>,
        k: i64,
    ) -> Result<()> {
        use crate::kernels::prune::{keep_masks, Part};
        let keep_dead = !self.cfg.regrow && self.updates > 0;
        let mut views = Vec::new();
        for (ri, &(gi, len)) in self.ranges.iter().enumerate() {
            let (w, m, v) = match (direct, scores) {
                (Some(_), _) => {
                    let w = store.groups()[gi].data.f_narrow(0, 0, len).map_err(te)?;
                    let mv = opt.and_then(|o| o.moments(gi));
                    let m = mv.map(|(m, _)| m.f_narrow(0, 0, len)).transpose().map_err(te)?;
                    let v = mv.map(|(_, v)| v.f_narrow(0, 0, len)).transpose().map_err(te)?;
                    (w, m, v)
                }
                (None, Some(sc)) => (sc[ri].f_contiguous().map_err(te)?, None, None),
                (None, None) => bail!("internal: neither a scorer nor scores"),
            };
            views.push((w, m, v));
        }
        let parts: Vec<Part> = views
            .iter()
            .enumerate()
            .map(|(ri, (w, m, v))| Part {
                w,
                m: m.as_ref(),
                v: v.as_ref(),
                // Ready scores already rank pruned weights at -inf.
                live: (keep_dead && direct.is_some()).then(|| &self.masks[ri]),
            })
            .collect();
        let mut keep =
            self.masks.iter().map(|m| m.f_empty_like()).collect::<Result<Vec<_>, _>>().map_err(te)?;
        keep_masks(direct.unwrap_or("w"), &parts, &mut keep, k)?;
        drop(parts);
        for (m, new) in self.masks.iter_mut().zip(&keep) {
            m.f_copy_(new).map_err(te)?;
        }
        Ok(())
    }

    /// Recompute the masks for sparsity `s` (from scratch, as the seed does).
    pub fn update_masks(
        &mut self,
        store: &ParamStore,
        opt: Option<&crate::optim::Optimizer>,
        s: f64,
        custom: Option<&mut CustomScore>,
    ) -> Result<()> {
        // Pruned weights stay pruned unless `regrow`: once as many weights
        // are pruned as the schedule asks for (from the ramp's end on), an
        // update would change nothing, so skip the scoring.
        if !self.cfg.regrow && !self.cfg.layer_adaptive() && self.updates > 0 {
            let k = (s * self.numel() as f64).floor() as i64;
            let dead = (self.sparsity()? * self.numel() as f64).round() as i64;
            if k <= dead {
                self.updates += 1;
                self.target_now = s;
                return Ok(());
            }
        }
        // One global exact threshold on a GPU: the fused kernels score (when
        // they know the scorer), select and write the masks.
        let k = (s * self.numel() as f64).floor() as i64;
        let fused = !self.cfg.layer_adaptive()
            && self.cfg.sample_fraction == 0.0
            && k > 0
            && self.masks.iter().all(|m| crate::kernels::usable(m.device()));
        let direct = if fused && custom.is_none() { self.direct_expr(store, opt) } else { None };
        let scores = match direct {
            Some(_) => None,
            None => Some(self.scores(store, opt, custom)?),
        };
        if fused {
            match self.fused_masks(store, opt, direct.as_deref(), scores.as_deref(), k) {
                Ok(()) => {
                    self.updates += 1;
                    self.target_now = s;
                    return Ok(());
                }
                Err(e) => crate::kernels::disable(&e),
            }
        }
        let scores = match scores {
            Some(sc) => sc,
            None => self.scores(store, opt, None)?,
        };
        if self.cfg.layer_adaptive() {
            let layers = self.members.len().max(1);
            for mem in &self.members {
                let ri = self
                    .ranges
                    .iter()
                    .position(|(g, _)| *g == mem.group)
                    .ok_or_else(|| anyhow!("internal: no range"))?;
                let pos = mem.layer as f64 / (layers - 1).max(1) as f64;
                let sl = (s * (0.7 + 0.6 * pos)).min(0.95);
                let k = (sl * mem.numel as f64).floor() as i64;
                let sc = scores[ri].f_narrow(0, mem.offset, mem.numel).map_err(te)?;
                let mut dst = self.masks[ri].f_narrow(0, mem.offset, mem.numel).map_err(te)?;
                if k > 0 && k < mem.numel {
                    dst.f_copy_(&self.keep_mask(&sc, k)?).map_err(te)?;
                } else {
                    let _ = dst.f_fill_(1).map_err(te)?;
                }
            }
        } else {
            // One global threshold over every prunable weight.
            let all = if scores.len() == 1 {
                scores[0].shallow_clone()
            } else {
                Tensor::f_cat(
                    &scores
                        .iter()
                        .map(|t| t.f_to_device(scores[0].device()))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(te)?,
                    0,
                )
                .map_err(te)?
            };
            let k = (s * all.numel() as f64).floor() as i64;
            if k == 0 {
                for m in self.masks.iter_mut() {
                    let _ = m.f_fill_(1).map_err(te)?;
                }
            } else {
                let keep = self.keep_mask(&all, k)?;
                let mut off = 0;
                for m in self.masks.iter_mut() {
                    let n = m.numel() as i64;
                    m.f_copy_(&keep.f_narrow(0, off, n).map_err(te)?).map_err(te)?;
                    off += n;
                }
            }
        }
        self.updates += 1;
        self.target_now = s;
        Ok(())
    }

    /// Multiply buffer `buf` of flat group `gi` by its mask (prunable range).
    fn mask_range(&self, gi: usize, buf: &Tensor) -> Result<()> {
        let Some(ri) = self.ranges.iter().position(|(g, _)| *g == gi) else { return Ok(()) };
        if buf.numel() == 0 {
            return Ok(());
        }
        let mut part = buf.f_narrow(0, 0, self.ranges[ri].1).map_err(te)?;
        let _ = part.f_mul_(&self.masks[ri]).map_err(te)?;
        Ok(())
    }

    /// Zero pruned weights, and (with `mask_state`) their moments.
    pub fn apply_all(&self, store: &ParamStore, opt: Option<&crate::optim::Optimizer>) -> Result<()> {
        self.apply(store)?;
        let Some(opt) = opt.filter(|_| self.cfg.mask_state) else { return Ok(()) };
        tch::no_grad(|| -> Result<()> {
            for gi in 0..store.groups().len() {
                if let Some((m, v)) = opt.moments(gi) {
                    self.mask_range(gi, m)?;
                    self.mask_range(gi, v)?;
                }
                if let Some(mx) = opt.max_moment(gi) {
                    self.mask_range(gi, mx)?;
                }
                if let Some(b) = opt.momentum_buffer(gi) {
                    self.mask_range(gi, b)?;
                }
            }
            Ok(())
        })
    }

    /// Zero pruned weights.
    pub fn apply(&self, store: &ParamStore) -> Result<()> {
        tch::no_grad(|| {
            for (gi, g) in store.groups().iter().enumerate() {
                self.mask_range(gi, &g.data)?;
            }
            Ok(())
        })
    }

    /// Measured fraction of prunable weights whose mask is off.
    pub fn sparsity(&self) -> Result<f64> {
        let mut kept = 0i64;
        for m in &self.masks {
            kept += m.f_sum(Kind::Int64).and_then(|s| s.f_int64_value(&[])).map_err(te)?;
        }
        Ok(1.0 - kept as f64 / self.numel().max(1) as f64)
    }

    /// Measured sparsity of each prunable tensor's weights (zeros / size).
    pub fn layer_sparsity(&self, store: &ParamStore) -> Result<Vec<(String, f64)>> {
        let mut out = Vec::new();
        for mem in &self.members {
            let g = &store.groups()[mem.group];
            let w = g.data.f_narrow(0, mem.offset, mem.numel).map_err(te)?;
            let zeros = w
                .f_eq(0.0)
                .and_then(|z| z.f_sum(Kind::Int64))
                .and_then(|s| s.f_int64_value(&[]))
                .map_err(te)?;
            out.push((mem.name.clone(), zeros as f64 / mem.numel as f64));
        }
        Ok(out)
    }

    /// Global measured sparsity of the prunable weights (exact zeros).
    pub fn weight_sparsity(&self, store: &ParamStore) -> Result<f64> {
        let mut zeros = 0i64;
        for &(gi, len) in &self.ranges {
            let w = store.groups()[gi].data.f_narrow(0, 0, len).map_err(te)?;
            zeros += w
                .f_eq(0.0)
                .and_then(|z| z.f_sum(Kind::Int64))
                .and_then(|s| s.f_int64_value(&[]))
                .map_err(te)?;
        }
        Ok(zeros as f64 / self.numel().max(1) as f64)
    }

    /// Before the optimizer step: movement accumulation, gradient masking.
    pub fn before_step(&mut self, store: &ParamStore) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            if self.cfg.method == "movement" && self.cfg.variant == "sanh" {
                for (ri, &(gi, len)) in self.ranges.iter().enumerate() {
                    let g = &store.groups()[gi];
                    let w = g.data.f_narrow(0, 0, len).map_err(te)?;
                    let gr = g.grad.f_narrow(0, 0, len).map_err(te)?;
                    let _ = self.movement[ri].f_sub_(&w.f_mul(&gr).map_err(te)?).map_err(te)?;
                }
            }
            if self.cfg.mask_state && self.updates > 0 {
                for (gi, g) in store.groups().iter().enumerate() {
                    self.mask_range(gi, &g.grad)?;
                }
            }
            Ok(())
        })
    }

    /// After the optimizer step `step`: update masks on schedule, re-mask
    /// weights (and moments).
    pub fn after_step(
        &mut self,
        store: &ParamStore,
        opt: &crate::optim::Optimizer,
        step: i64,
        steps_per_epoch: Option<i64>,
        custom: Option<&mut CustomScore>,
    ) -> Result<()> {
        let ramp = self.cfg.ramp_end_steps(steps_per_epoch);
        let s = sparsity_at(step, self.cfg.warmup, ramp, self.cfg.target, self.cfg.schedule == "cubic");
        if let Some(t) = self.tracker.as_mut() {
            t.observe(store, opt, &self.masks)?;
        }
        if step > self.cfg.warmup && step % self.cfg.frequency == 0 {
            tch::no_grad(|| self.update_masks(store, Some(opt), s, custom))?;
            self.last_update = step;
        }
        if self.updates > 0 {
            self.apply_all(store, Some(opt))?;
        }
        if let Some(t) = self.tracker.as_mut() {
            t.settle(store, step)?;
        }
        Ok(())
    }

    pub fn state(&self) -> Value {
        json!({
            "updates": self.updates,
            "last_update": self.last_update,
            "target_now": self.target_now,
            "achieved": self.sparsity().unwrap_or(f64::NAN),
            "config": self.cfg,
        })
    }

    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, m) in self.masks.iter().enumerate() {
            out.push((format!("mask.{i}"), m.shallow_clone()));
        }
        for (i, t) in self.movement.iter().enumerate() {
            out.push((format!("movement.{i}"), t.shallow_clone()));
        }
        if let Some(t) = &self.tracker {
            out.extend(t.tensors());
        }
        out
    }

    pub fn restore(&mut self, state: &Value, tensors: &[(String, Tensor)]) -> Result<()> {
        let get = |k: &str| state.get(k).ok_or_else(|| anyhow!("pruner state lacks '{k}'"));
        self.updates = get("updates")?.as_i64().unwrap_or(0);
        self.last_update = get("last_update")?.as_i64().unwrap_or(0);
        self.target_now = get("target_now")?.as_f64().unwrap_or(0.0);
        let slots = self
            .masks
            .iter_mut()
            .enumerate()
            .map(|(i, t)| (format!("mask.{i}"), t))
            .chain(self.movement.iter_mut().enumerate().map(|(i, t)| (format!("movement.{i}"), t)));
        for (name, slot) in slots {
            let (_, src) = tensors
                .iter()
                .find(|(n, _)| *n == name)
                .ok_or_else(|| anyhow!("missing pruner tensor '{name}'"))?;
            if src.size() != slot.size() {
                bail!("pruner tensor '{name}' has shape {:?}, expected {:?}", src.size(), slot.size());
            }
            *slot = src.f_to_device(slot.device()).and_then(|t| t.f_to_kind(slot.kind())).map_err(te)?;
        }
        if let Some(t) = self.tracker.as_mut() {
            t.restore(tensors)?;
        }
        Ok(())
    }

    pub fn summary(&self, store: &ParamStore) -> Result<Map<String, Value>> {
        let mut m = Map::new();
        m.insert("pruning_method".into(), json!(self.cfg.method));
        m.insert("pruning_variant".into(), json!(self.cfg.variant));
        m.insert("target_sparsity".into(), json!(self.cfg.target));
        m.insert("sparsity".into(), json!(self.weight_sparsity(store)?));
        m.insert("mask_sparsity".into(), json!(self.sparsity()?));
        m.insert("prunable_params".into(), json!(self.numel()));
        let layers: Map<String, Value> =
            self.layer_sparsity(store)?.into_iter().map(|(n, s)| (n, json!(s))).collect();
        m.insert("layer_sparsity".into(), Value::Object(layers));
        Ok(m)
    }
}

/// The training-loop hook for a pruner, with an optional script scorer.
pub struct PruneHook<'p, 'c> {
    pub pruner: &'p mut Pruner,
    pub custom: Option<&'c mut CustomScore<'c>>,
}

impl<'p, 'c> PruneHook<'p, 'c> {
    pub fn new(pruner: &'p mut Pruner, custom: Option<&'c mut CustomScore<'c>>) -> Self {
        PruneHook { pruner, custom }
    }
}

impl Hook for PruneHook<'_, '_> {
    fn name(&self) -> &str {
        "prune"
    }

    fn before_step(&mut self, ctx: &mut StepCtx) -> Result<()> {
        self.pruner.before_step(ctx.store)
    }

    fn after_step(&mut self, ctx: &mut StepCtx) -> Result<()> {
        let custom = self.custom.as_deref_mut();
        self.pruner.after_step(ctx.store, ctx.opt, ctx.step, ctx.steps_per_epoch, custom).context("pruning")
    }

    fn metrics(&mut self) -> Result<Map<String, Value>> {
        let mut m = Map::new();
        m.insert("sparsity".into(), json!(self.pruner.sparsity()?));
        m.insert("target_sparsity".into(), json!(self.pruner.target_now));
        Ok(m)
    }

    fn state(&self) -> Value {
        self.pruner.state()
    }

    fn tensors(&self) -> Vec<(String, Tensor)> {
        self.pruner.tensors()
    }

    fn restore(&mut self, state: &Value, tensors: &[(String, Tensor)]) -> Result<()> {
        self.pruner.restore(state, tensors)
    }

    fn summary(&mut self, store: &ParamStore) -> Result<Map<String, Value>> {
        self.pruner.summary(store)
    }
}

#[cfg(test)]
mod tests;
