//! Optimizers over flat parameter buffers, with state that can be read,
//! masked, saved and restored.
//!
//! Every state tensor (moments, AMSGrad maxima, momentum buffers) is one
//! flat buffer per parameter dtype, laid out exactly like the parameters in
//! [`ParamStore`], so a step is a handful of whole-buffer kernels and the
//! state of one parameter is a view (`Optimizer::state`). Adam-family steps
//! use ATen's fused Adam/AdamW kernel (`_fused_adamw_`, through the shim) by
//! default, on CPU and CUDA alike.
pub mod groups;
pub mod scaler;
pub mod schedule;
pub mod sinkgd;
pub mod spam;

use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::params::{FlatGroup, ParamStore};
use crate::tensor::torch_error;

pub use groups::ParamGroup;
use groups::Seg;
pub use sinkgd::SinkConfig;
pub use spam::{SpamConfig, SpamState};

fn te(e: tch::TchError) -> anyhow::Error {
    anyhow!(torch_error(&e))
}

/// The optimizers, as named in configurations and scripts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptKind {
    Sgd,
    Adam,
    AdamW,
    /// AdamW + AMSGrad, gradient-norm clipping at 1.0 and a cosine schedule.
    AdamWAdv,
    /// AdamWAdv + SPAM (spike-aware clipping, momentum reset).
    AdamWSpam,
    /// Sinkhorn-normalised gradient descent (stateless).
    SinkGd,
}

/// (name, kind, one-line description) for listings and errors.
pub const KINDS: &[(&str, OptKind, &str)] = &[
    ("sgd", OptKind::Sgd, "SGD with momentum (0.9), optional Nesterov, L2 weight decay"),
    ("adam", OptKind::Adam, "Adam (L2 weight decay, default 0)"),
    ("adamw", OptKind::AdamW, "AdamW (decoupled weight decay)"),
    ("adamwadv", OptKind::AdamWAdv, "AdamW + AMSGrad + clipping at 1.0 + cosine schedule"),
    ("adamwspam", OptKind::AdamWSpam, "AdamWAdv + SPAM spike-aware clipping and momentum resets"),
    (
        "sinkgd",
        OptKind::SinkGd,
        "SinkGD: Sinkhorn row/column-normalised gradients, tanh-squashed (stateless)",
    ),
];

impl OptKind {
    pub fn parse(name: &str) -> Result<Self> {
        let n = name.trim().to_ascii_lowercase();
        KINDS.iter().find(|(k, _, _)| *k == n).map(|(_, v, _)| *v).ok_or_else(|| {
            let names: Vec<&str> = KINDS.iter().map(|(k, _, _)| *k).collect();
            anyhow!("unknown optimizer '{name}' (valid: {})", names.join(", "))
        })
    }

    pub fn name(self) -> &'static str {
        KINDS.iter().find(|(_, k, _)| *k == self).map(|(n, _, _)| *n).unwrap_or("?")
    }

    fn adam_family(self) -> bool {
        !matches!(self, OptKind::Sgd | OptKind::SinkGd)
    }
}

/// Optimizer hyper-parameters. `Default` gives AdamW with PyTorch's defaults.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OptConfig {
    pub kind: OptKind,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Applied to the decay group only (tensors of 2+ dimensions).
    pub weight_decay: f64,
    /// SGD momentum and dampening; Nesterov momentum.
    pub momentum: f64,
    pub dampening: f64,
    pub nesterov: bool,
    /// AMSGrad (on by default for adamwadv and adamwspam).
    pub amsgrad: bool,
    /// Global gradient-norm clipping threshold; 0 disables.
    pub clip_norm: f64,
    /// Use ATen's fused Adam/AdamW kernel.
    pub fused: bool,
    pub spam: SpamConfig,
    pub sinkgd: SinkConfig,
    /// Parameter groups with their own lr factor and weight decay; the
    /// first group whose pattern matches a parameter's name takes it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<ParamGroup>,
}

impl Default for OptConfig {
    fn default() -> Self {
        OptConfig {
            kind: OptKind::AdamW,
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            momentum: 0.9,
            dampening: 0.0,
            nesterov: false,
            amsgrad: false,
            clip_norm: 0.0,
            fused: true,
            spam: SpamConfig::default(),
            sinkgd: SinkConfig::default(),
            groups: Vec::new(),
        }
    }
}

impl OptConfig {
    /// The defaults of each optimizer kind: AMSGrad and clipping at 1.0 for
    /// adamwadv/adamwspam, no weight decay for plain Adam.
    pub fn for_kind(kind: OptKind) -> Self {
        let mut c = OptConfig { kind, ..Default::default() };
        match kind {
            OptKind::Sgd => {
                c.lr = 0.1;
                c.weight_decay = 5e-4;
            }
            OptKind::Adam => c.weight_decay = 0.0,
            OptKind::AdamW => {}
            OptKind::AdamWAdv | OptKind::AdamWSpam => {
                c.amsgrad = true;
                c.clip_norm = 1.0;
            }
            // The seed's SinkGD defaults (knlp-spec.md 3.5).
            OptKind::SinkGd => {
                c.lr = 3e-4;
                c.weight_decay = 0.1;
            }
        }
        c
    }

    pub fn validate(&self) -> Result<()> {
        let checks: [(&str, bool); 6] = [
            ("lr must be >= 0", self.lr >= 0.0),
            ("beta1 must be in [0, 1)", (0.0..1.0).contains(&self.beta1)),
            ("beta2 must be in [0, 1)", (0.0..1.0).contains(&self.beta2)),
            ("eps must be > 0", self.eps > 0.0),
            ("weight_decay must be >= 0", self.weight_decay >= 0.0),
            ("clip_norm must be >= 0", self.clip_norm >= 0.0),
        ];
        for (msg, ok) in checks {
            if !ok {
                bail!("optimizer {}: {msg}", self.kind.name());
            }
        }
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            bail!("optimizer sgd: Nesterov momentum needs momentum > 0 and dampening 0");
        }
        self.sinkgd.validate()?;
        groups::validate(&self.groups).map_err(|e| anyhow!("optimizer {}: {e}", self.kind.name()))
    }
}

/// State of one flat buffer.
struct GroupState {
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor,
    momentum: Tensor,
    /// Step counters for the fused kernel: one for the decaying part of the
    /// layout, one for the rest.
    steps: [Tensor; 2],
    /// Ranges sharing an lr factor and a weight decay.
    segs: Vec<Seg>,
}

/// What a step did, for logging.
#[derive(Debug)]
pub struct StepReport {
    /// Global gradient norm before clipping (a 0-d tensor; read lazily).
    pub grad_norm: Option<Tensor>,
    /// The learning rate actually used (after any SPAM warm-up scaling).
    pub lr: f64,
    /// SPAM detected a gradient-norm spike this step.
    pub spike: bool,
    /// SPAM reset the moments this step.
    pub reset: bool,
}

pub struct Optimizer {
    pub cfg: OptConfig,
    /// Learning rate set by the schedule for the next step.
    pub lr: f64,
    /// Optimizer steps taken.
    pub step: i64,
    groups: Vec<GroupState>,
    pub spam: Option<SpamState>,
    /// Loss scaling for float16 autocast (set by the training loop).
    pub scaler: Option<scaler::GradScaler>,
}

/// Per-parameter views of the optimizer state.
pub struct ParamState {
    pub exp_avg: Option<Tensor>,
    pub exp_avg_sq: Option<Tensor>,
    pub max_exp_avg_sq: Option<Tensor>,
    pub momentum: Option<Tensor>,
}

impl Optimizer {
    pub fn new(store: &ParamStore, cfg: OptConfig) -> Result<Self> {
        cfg.validate()?;
        if !store.is_finalized() {
            bail!("the model's parameters must be finalized (moved to their device) before building an optimizer");
        }
        let mut segs = groups::segments(store, &cfg.groups, cfg.weight_decay)
            .map_err(|e| anyhow!("optimizer {}: {e}", cfg.kind.name()))?
            .into_iter();
        let mut groups = Vec::new();
        for g in store.groups() {
            let z = || g.data.f_zeros_like().map_err(te);
            let scalar = || Tensor::f_zeros([], (Kind::Float, g.data.device())).map_err(te);
            let adam = cfg.kind.adam_family();
            let empty = || Tensor::f_empty([0], (g.kind, g.data.device())).map_err(te);
            groups.push(GroupState {
                exp_avg: if adam { z()? } else { empty()? },
                exp_avg_sq: if adam { z()? } else { empty()? },
                max_exp_avg_sq: if adam && cfg.amsgrad { z()? } else { empty()? },
                momentum: empty()?,
                steps: [scalar()?, scalar()?],
                segs: segs.next().unwrap_or_default(),
            });
        }
        let spam = matches!(cfg.kind, OptKind::AdamWSpam).then(|| SpamState::new(cfg.spam.clone()));
        Ok(Optimizer { lr: cfg.lr, cfg, step: 0, groups, spam, scaler: None })
    }

    /// One update from the gradients in the store's flat gradient buffers.
    pub fn step(&mut self, store: &ParamStore) -> Result<StepReport> {
        if store.groups().len() != self.groups.len() {
            bail!("the optimizer was built for a different model");
        }
        self.step += 1;
        let mut lr = self.lr;
        let (mut spike, mut reset, mut grad_norm) = (false, false, None);
        if let Some(spam) = self.spam.as_mut() {
            let mut moments: Vec<(&mut Tensor, &mut Tensor)> =
                self.groups.iter_mut().map(|g| (&mut g.exp_avg, &mut g.exp_avg_sq)).collect();
            let out = spam.before_step(store.groups(), &mut moments, self.step)?;
            lr *= out.lr_scale;
            spike = out.spike;
            reset = out.reset;
            grad_norm = Some(out.grad_norm);
        }
        if self.cfg.clip_norm > 0.0 {
            let n = clip_grad_norm(store, self.cfg.clip_norm)?;
            // SPAM's norm is taken after its element-wise clipping; report
            // the norm the global clip saw.
            grad_norm = Some(n);
        }
        for (g, st) in store.groups().iter().zip(self.groups.iter_mut()) {
            match self.cfg.kind {
                OptKind::Sgd => sgd_step(g, st, &self.cfg, lr, self.step)?,
                OptKind::SinkGd => sinkgd::step(store, g, &st.segs, &self.cfg, lr)?,
                _ => adam_step(g, st, &self.cfg, lr)?,
            }
        }
        Ok(StepReport { grad_norm, lr, spike, reset })
    }

    /// Flat first and second moments of buffer `i` (for pruning masks).
    pub fn moments(&self, i: usize) -> Option<(&Tensor, &Tensor)> {
        let g = self.groups.get(i)?;
        (g.exp_avg.numel() > 0).then_some((&g.exp_avg, &g.exp_avg_sq))
    }

    /// Flat SGD momentum buffer of buffer `i`, once the first step made it.
    pub fn momentum_buffer(&self, i: usize) -> Option<&Tensor> {
        self.groups.get(i).map(|g| &g.momentum).filter(|t| t.numel() > 0)
    }

    /// Flat AMSGrad maxima of buffer `i`, when AMSGrad is on.
    pub fn max_moment(&self, i: usize) -> Option<&Tensor> {
        self.groups.get(i).map(|g| &g.max_exp_avg_sq).filter(|t| t.numel() > 0)
    }

    /// Views of the state of parameter `name` (None before it exists).
    pub fn state(&self, store: &ParamStore, name: &str) -> Result<ParamState> {
        let idx = store
            .params()
            .iter()
            .position(|p| p.name == name)
            .ok_or_else(|| anyhow!("no parameter '{name}' in this model"))?;
        for (g, st) in store.groups().iter().zip(self.groups.iter()) {
            if let Some(&(_, off, n)) = g.members.iter().find(|m| m.0 == idx) {
                let shape = store.params()[idx].tensor.size();
                let view = |t: &Tensor| -> Result<Option<Tensor>> {
                    if t.numel() == 0 {
                        return Ok(None);
                    }
                    Ok(Some(t.f_narrow(0, off, n).and_then(|v| v.f_view(shape.as_slice())).map_err(te)?))
                };
                return Ok(ParamState {
                    exp_avg: view(&st.exp_avg)?,
                    exp_avg_sq: view(&st.exp_avg_sq)?,
                    max_exp_avg_sq: view(&st.max_exp_avg_sq)?,
                    momentum: view(&st.momentum)?,
                });
            }
        }
        bail!("parameter '{name}' is not in the optimizer's buffers")
    }

    /// State tensors for checkpoints, named `optim.<buffer>.<what>`.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, st) in self.groups.iter().enumerate() {
            let items = [
                ("exp_avg", &st.exp_avg),
                ("exp_avg_sq", &st.exp_avg_sq),
                ("max_exp_avg_sq", &st.max_exp_avg_sq),
                ("momentum", &st.momentum),
                ("step0", &st.steps[0]),
                ("step1", &st.steps[1]),
            ];
            for (what, t) in items {
                if t.dim() == 0 || t.numel() > 0 {
                    out.push((format!("optim.{i}.{what}"), t.shallow_clone()));
                }
            }
        }
        out
    }

    /// Restore state saved by [`Optimizer::state_tensors`]; shapes must match.
    pub fn load_state_tensors(&mut self, tensors: &[(String, Tensor)], source: &str) -> Result<()> {
        for (i, st) in self.groups.iter_mut().enumerate() {
            let [s0, s1] = &mut st.steps;
            let slots: [(&str, &mut Tensor); 6] = [
                ("exp_avg", &mut st.exp_avg),
                ("exp_avg_sq", &mut st.exp_avg_sq),
                ("max_exp_avg_sq", &mut st.max_exp_avg_sq),
                ("momentum", &mut st.momentum),
                ("step0", s0),
                ("step1", s1),
            ];
            for (what, slot) in slots {
                let name = format!("optim.{i}.{what}");
                match tensors.iter().find(|(n, _)| *n == name) {
                    Some((_, t)) => {
                        if slot.numel() > 0 && t.size() != slot.size() {
                            bail!(
                                "{source}: tensor '{name}' has shape {:?}, expected {:?}",
                                t.size(),
                                slot.size()
                            );
                        }
                        *slot = t
                            .f_to_device(slot.device())
                            .and_then(|t| t.f_to_kind(slot.kind()))
                            .map_err(te)?;
                    }
                    None if slot.numel() > 0 && slot.dim() > 0 => {
                        bail!("{source}: missing optimizer tensor '{name}'")
                    }
                    None => {}
                }
            }
        }
        Ok(())
    }
}

/// Scale all gradients so their global L2 norm is at most `max_norm`
/// (`torch.nn.utils.clip_grad_norm_`). Returns the norm before clipping as
/// a 0-d tensor, without a host synchronisation.
pub fn clip_grad_norm(store: &ParamStore, max_norm: f64) -> Result<Tensor> {
    let total = global_grad_norm(store)?;
    let coef = total.f_add_scalar(1e-6).and_then(|n| n.f_reciprocal()).and_then(|r| r.f_mul_scalar(max_norm));
    let coef = coef.and_then(|c| c.f_clamp_max(1.0)).map_err(te)?;
    for g in store.groups() {
        let mut gr = g.grad.shallow_clone();
        let c = coef.f_to_kind(g.kind).map_err(te)?;
        let _ = gr.f_mul_(&c).map_err(te)?;
    }
    Ok(total)
}

/// Global L2 norm of all gradients (0-d float32 tensor).
pub fn global_grad_norm(store: &ParamStore) -> Result<Tensor> {
    let mut sq: Option<Tensor> = None;
    for g in store.groups() {
        let s = g
            .grad
            .f_to_kind(Kind::Float)
            .and_then(|x| x.f_square())
            .and_then(|x| x.f_sum(Kind::Float))
            .map_err(te)?;
        sq = Some(match sq {
            None => s,
            Some(a) => a.f_add(&s.f_to_device(a.device()).map_err(te)?).map_err(te)?,
        });
    }
    match sq {
        Some(s) => s.f_sqrt().map_err(te),
        None => Tensor::f_zeros([], (Kind::Float, store.device())).map_err(te),
    }
}

fn sgd_step(g: &FlatGroup, st: &mut GroupState, c: &OptConfig, lr: f64, step: i64) -> Result<()> {
    let narrow = |t: &Tensor, (off, len): (i64, i64)| t.f_narrow(0, off, len).map_err(te);
    tch::no_grad(|| -> Result<()> {
        let mut grad = g.grad.shallow_clone();
        for s in st.segs.iter().filter(|s| s.weight_decay > 0.0) {
            // Coupled L2: g += wd * p.
            for &r in &s.ranges {
                let mut gd = narrow(&g.grad, r)?;
                let _ =
                    gd.f_add_(&narrow(&g.data, r)?.f_mul_scalar(s.weight_decay).map_err(te)?).map_err(te)?;
            }
        }
        if c.momentum > 0.0 {
            if step == 1 || st.momentum.numel() == 0 {
                st.momentum = crate::tensor::deep_copy(&grad).map_err(te)?;
            } else {
                let _ = st.momentum.f_mul_scalar_(c.momentum).map_err(te)?;
                let _ = st.momentum.f_add_(&grad.f_mul_scalar(1.0 - c.dampening).map_err(te)?).map_err(te)?;
            }
            grad = if c.nesterov {
                grad.f_add(&st.momentum.f_mul_scalar(c.momentum).map_err(te)?).map_err(te)?
            } else {
                st.momentum.shallow_clone()
            };
        }
        if st.segs.iter().all(|s| s.lr_scale == 1.0) {
            let mut p = g.data.shallow_clone();
            let _ = p.f_sub_(&grad.f_mul_scalar(lr).map_err(te)?).map_err(te)?;
            return Ok(());
        }
        for s in &st.segs {
            for &r in &s.ranges {
                let mut p = narrow(&g.data, r)?;
                let _ =
                    p.f_sub_(&narrow(&grad, r)?.f_mul_scalar(lr * s.lr_scale).map_err(te)?).map_err(te)?;
            }
        }
        Ok(())
    })
}

fn adam_step(g: &FlatGroup, st: &mut GroupState, c: &OptConfig, lr: f64) -> Result<()> {
    let decoupled = !matches!(c.kind, OptKind::Adam);
    tch::no_grad(|| -> Result<()> {
        // torch.optim increments the step before the (fused) kernel; each
        // counter once, however many segments share it.
        for k in 0..2 {
            if st.segs.iter().any(|s| s.counter == k && s.numel() > 0) {
                let _ = st.steps[k].f_add_scalar_(1).map_err(te)?;
            }
        }
        for s in st.segs.iter().filter(|s| s.numel() > 0) {
            let views = |t: &Tensor| -> Result<Vec<Tensor>> {
                s.ranges.iter().map(|&(off, len)| t.f_narrow(0, off, len).map_err(te)).collect()
            };
            let (p, gr, m, v) =
                (views(&g.data)?, views(&g.grad)?, views(&st.exp_avg)?, views(&st.exp_avg_sq)?);
            let vmax = if c.amsgrad { views(&st.max_exp_avg_sq)? } else { Vec::new() };
            let (lr, wd) = (lr * s.lr_scale, s.weight_decay);
            let step = &st.steps[s.counter];
            if c.fused {
                let h = crate::shim::FusedAdam {
                    lr,
                    beta1: c.beta1,
                    beta2: c.beta2,
                    weight_decay: wd,
                    eps: c.eps,
                    amsgrad: c.amsgrad,
                    decoupled,
                };
                let steps = vec![step; p.len()];
                crate::shim::fused_adam(&refs(&p), &refs(&gr), &refs(&m), &refs(&v), &refs(&vmax), &steps, h)
                    .map_err(|e| anyhow!(e))?;
            } else {
                let n = step.f_double_value(&[]).map_err(te)?;
                let none = Tensor::f_empty([0], (g.kind, g.data.device())).map_err(te)?;
                for i in 0..p.len() {
                    let mx = vmax.get(i).unwrap_or(&none);
                    unfused_adam(&p[i], &gr[i], &m[i], &v[i], mx, c, lr, wd, decoupled, n)?;
                }
            }
        }
        Ok(())
    })
}

fn refs(v: &[Tensor]) -> Vec<&Tensor> {
    v.iter().collect()
}

/// The reference formulation of one Adam/AdamW step (torch.optim's
/// single-tensor path), used when the fused kernel is switched off.
#[allow(clippy::too_many_arguments)]
fn unfused_adam(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    vmax: &Tensor,
    c: &OptConfig,
    lr: f64,
    wd: f64,
    decoupled: bool,
    step: f64,
) -> Result<()> {
    let (mut p, mut m, mut v) = (p.shallow_clone(), m.shallow_clone(), v.shallow_clone());
    let mut g = g.shallow_clone();
    if wd > 0.0 {
        if decoupled {
            let _ = p.f_mul_scalar_(1.0 - lr * wd).map_err(te)?;
        } else {
            g = g.f_add(&p.f_mul_scalar(wd).map_err(te)?).map_err(te)?;
        }
    }
    let _ = m.f_lerp_(&g, 1.0 - c.beta1).map_err(te)?;
    let _ = v.f_mul_scalar_(c.beta2).map_err(te)?;
    let _ = v.f_add_(&g.f_square().and_then(|s| s.f_mul_scalar(1.0 - c.beta2)).map_err(te)?).map_err(te)?;
    let bc1 = 1.0 - c.beta1.powf(step);
    let bc2_sqrt = (1.0 - c.beta2.powf(step)).sqrt();
    let second = if vmax.numel() > 0 {
        let mut mx = vmax.shallow_clone();
        mx.f_copy_(&mx.f_maximum(&v).map_err(te)?).map_err(te)?;
        mx
    } else {
        v.shallow_clone()
    };
    let denom = second
        .f_sqrt()
        .and_then(|s| s.f_div_scalar(bc2_sqrt))
        .and_then(|s| s.f_add_scalar(c.eps))
        .map_err(te)?;
    let upd = m.f_div(&denom).and_then(|u| u.f_mul_scalar(lr / bc1)).map_err(te)?;
    let _ = p.f_sub_(&upd).map_err(te)?;
    Ok(())
}

#[cfg(test)]
mod tests;
