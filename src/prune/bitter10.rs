//! The bitter10 family's trackers (knlp-spec.md 1.8): a per-tensor factor
//! from how each weight tensor has been moving, multiplied into the base
//! score `b = |w| sqrt(|m| + 1e-12)` of `score.rs`.
//!
//! `cos(a, b) = clamp(a b / ((|a| + ε)(|b| + ε)), -1, 1)` is the seed's
//! element-wise cosine surrogate; `mean` is over one tensor's elements; the
//! scalar EMAs use `ema` (0.9) and start at their first observation.
//!
//! - bitter10 (coherence): after every optimizer step, `Δw = w - w_prev`;
//!   against the EMA of Δw *before* this step enters it (the seed compared
//!   with an EMA that already held Δw: fixed, DECISIONS.md), EMAs of
//!   `cos_dir = mean cos(Δw, ema_dw)`, `flip = mean[sign Δw != sign ema_dw]`
//!   and `jitter = max(mean Δw² - (mean |Δw|)², 0)`. Factor
//!   `α (1 - flip)^βf max(cos_dir, 0)^βd max(cos_mw, 0)^βm / (1 + βj jitter)`,
//!   `cos_mw = mean cos(m, w)` at scoring time; `α` alone until the first
//!   comparison. `w_prev` is taken after the masks are applied, so pruning
//!   itself never shows up as movement. Memory: 3x the prunable weights.
//! - bitter10s (sketch): `k` (64) fixed elements per tensor; after every
//!   step, EMAs of `mean |cos(m, m_prev)|`, the sign-flip rate of m and
//!   `mean sqrt(v)` over them; factor `(1 - flip) cos / (1 + mean sqrt v)`.
//! - bitter10c (checkpoint Δw): a CPU snapshot of the weights at the first
//!   step and every `snapshot_every` steps; factor
//!   `clamp(mean cos(m, w - w_snap), 0, 1) / (1 + mean sqrt(v))`.
//!
//! Every mean is over the tensor's live (unpruned) elements: pruned weights
//! never move and have zero moments, and counting them (as the seed's code
//! would) would lower the factor of the tensors pruned most. Per-tensor
//! means are one
//! `segment_reduce` over a flat range (the tensors of a range are
//! contiguous), so an update is a few kernels per buffer.
use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::{te, Member};
use crate::params::ParamStore;

/// ε of the family's formulas.
pub const EPS: f64 = 1e-12;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Bitter10Config {
    /// bitter10's scale α and exponents of flip, direction, m-w alignment and jitter.
    pub alpha: f64,
    pub beta_flip: f64,
    pub beta_dir: f64,
    pub beta_mw: f64,
    pub beta_jitter: f64,
    /// Decay of every EMA.
    pub ema: f64,
    /// bitter10s: sampled elements per tensor.
    pub sketch: i64,
    /// bitter10c: steps between weight snapshots.
    pub snapshot_every: i64,
    /// bitter10 and bitter10c: align `-m` (the direction Adam moves w)
    /// instead of the seed's `m` with w and with Δw (docs/pruning.md).
    pub negate_m: bool,
}

impl Default for Bitter10Config {
    fn default() -> Self {
        Bitter10Config {
            alpha: 1.0,
            beta_flip: 1.0,
            beta_dir: 1.0,
            beta_mw: 1.0,
            beta_jitter: 1.0,
            ema: 0.9,
            sketch: 64,
            snapshot_every: 100,
            negate_m: false,
        }
    }
}

impl Bitter10Config {
    pub fn validate(&self) -> Result<()> {
        let finite = [self.alpha, self.beta_flip, self.beta_dir, self.beta_mw, self.beta_jitter];
        if finite.iter().any(|x| !x.is_finite() || *x < 0.0) {
            bail!("bitter10: alpha and the beta exponents must be finite numbers >= 0");
        }
        if !(0.0..1.0).contains(&self.ema) {
            bail!("bitter10: ema must be in [0, 1), got {}", self.ema);
        }
        if !(1..=1_000_000).contains(&self.sketch) || self.snapshot_every < 1 {
            bail!("bitter10: sketch must be in 1..=1000000 and snapshot_every >= 1");
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind10 {
    Coherence,
    Sketch,
    Checkpoint,
}

/// The variants with a tracker.
pub fn is_tracked(variant: &str) -> bool {
    kind_of(variant).is_some()
}

fn kind_of(variant: &str) -> Option<Kind10> {
    match variant {
        "bitter10" => Some(Kind10::Coherence),
        "bitter10s" => Some(Kind10::Sketch),
        "bitter10c" => Some(Kind10::Checkpoint),
        _ => None,
    }
}

/// Element-wise cosine surrogate.
pub fn ecos(a: &Tensor, b: &Tensor) -> Result<Tensor, tch::TchError> {
    let den = a.f_abs()?.f_add_scalar(EPS)?.f_mul(&b.f_abs()?.f_add_scalar(EPS)?)?;
    a.f_mul(b)?.f_div(&den)?.f_clamp(-1.0, 1.0)
}

fn sign_flips(a: &Tensor, b: &Tensor) -> Result<Tensor, tch::TchError> {
    a.f_sign()?.f_ne_tensor(&b.f_sign()?)?.f_to_kind(Kind::Float)
}

/// The tensors of one flat range, in offset order.
struct Segs {
    /// Their lengths (int64, on the range's device).
    lengths: Tensor,
    len: i64,
}

impl Segs {
    /// Per-tensor means of `x` (flat over the range) over the live
    /// (unpruned) elements, `live` being 1.0 or 0.0 per element.
    fn mean(&self, x: &Tensor, live: &Tensor) -> Result<Tensor> {
        let sum =
            |t: &Tensor| Tensor::f_segment_reduce(t, "sum", Some(&self.lengths), None, None, 0, false, 0.0);
        let n = sum(live).and_then(|n| n.f_clamp_min(1.0)).map_err(te)?;
        sum(&x.f_mul(live).map_err(te)?).and_then(|s| s.f_div(&n)).map_err(te)
    }

    /// A per-tensor value repeated over each tensor's elements.
    fn expand(&self, f: &Tensor) -> Result<Tensor> {
        f.f_repeat_interleave_self_tensor(&self.lengths, Some(0), Some(self.len)).map_err(te)
    }
}

/// A deterministic sample of `k` element indices of a tensor of `n`
/// elements, seeded by `n` (distinct when `n >= k`).
pub(crate) fn sample(n: i64, k: i64) -> Vec<i64> {
    if n <= k {
        return (0..k).map(|i| i % n).collect();
    }
    let mut state = n as u64 ^ 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        // splitmix64
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::with_capacity(k as usize);
    while (out.len() as i64) < k {
        let i = (next() % n as u64) as i64;
        if seen.insert(i) {
            out.push(i);
        }
    }
    out
}

/// Per flat range: what the variant tracks. Empty tensors until set.
struct RangeState {
    group: usize,
    segs: Segs,
    /// Coherence: w after the last step. Sketch: the sampled m of the last step.
    prev: Tensor,
    /// Coherence: EMAs of Δw and Δw².
    ema_dw: Tensor,
    ema_dw2: Tensor,
    /// Per-tensor scalar EMAs, `[tensors, 3]`.
    stats: Tensor,
    /// Sketch: element indices into the range, `[tensors * k]`.
    idx: Tensor,
    /// Checkpoint: the weights' snapshot (CPU).
    snap: Tensor,
}

pub struct Tracker {
    kind: Kind10,
    cfg: Bitter10Config,
    ranges: Vec<RangeState>,
}

fn empty(device: Device) -> Result<Tensor> {
    Tensor::f_empty([0], (Kind::Float, device)).map_err(te)
}

impl Tracker {
    /// The tracker of `variant` over the pruner's ranges (None: stateless).
    pub fn new(
        variant: &str,
        cfg: &Bitter10Config,
        store: &ParamStore,
        members: &[Member],
        ranges: &[(usize, i64)],
    ) -> Result<Option<Self>> {
        let Some(kind) = kind_of(variant) else { return Ok(None) };
        let mut out = Vec::new();
        for &(gi, len) in ranges {
            let device = store.groups()[gi].data.device();
            let mut mine: Vec<&Member> = members.iter().filter(|m| m.group == gi).collect();
            mine.sort_by_key(|m| m.offset);
            let mut at = 0;
            for m in &mine {
                if m.offset != at {
                    bail!("bitter10: the prunable tensors of buffer {gi} are not contiguous");
                }
                at += m.numel;
            }
            if at != len {
                bail!("bitter10: the prunable tensors of buffer {gi} cover {at} of {len} elements");
            }
            let lengths: Vec<i64> = mine.iter().map(|m| m.numel).collect();
            let lengths = Tensor::from_slice(&lengths).f_to_device(device).map_err(te)?;
            let idx = if kind == Kind10::Sketch {
                let all: Vec<i64> = mine
                    .iter()
                    .flat_map(|m| sample(m.numel, cfg.sketch).into_iter().map(|i| m.offset + i))
                    .collect();
                Tensor::from_slice(&all).f_to_device(device).map_err(te)?
            } else {
                Tensor::f_empty([0], (Kind::Int64, device)).map_err(te)?
            };
            out.push(RangeState {
                group: gi,
                segs: Segs { lengths, len },
                prev: empty(device)?,
                ema_dw: empty(device)?,
                ema_dw2: empty(device)?,
                stats: empty(device)?,
                idx,
                snap: empty(Device::Cpu)?,
            });
        }
        Ok(Some(Tracker { kind, cfg: cfg.clone(), ranges: out }))
    }

    fn n_tensors(r: &RangeState) -> i64 {
        r.segs.lengths.size()[0]
    }

    /// Fold one observation `[tensors, 3]` into the scalar EMAs.
    fn fold(r: &mut RangeState, row: Tensor, ema: f64) -> Result<()> {
        if r.stats.numel() == 0 {
            r.stats = row;
        } else {
            let _ = r.stats.f_lerp_(&row, 1.0 - ema).map_err(te)?;
        }
        Ok(())
    }

    /// After the optimizer step, before any mask update.
    pub fn observe(
        &mut self,
        store: &ParamStore,
        opt: &crate::optim::Optimizer,
        masks: &[Tensor],
    ) -> Result<()> {
        let ema = self.cfg.ema;
        tch::no_grad(|| -> Result<()> {
            for (r, mask) in self.ranges.iter_mut().zip(masks) {
                let g = &store.groups()[r.group];
                let live = mask.f_to_kind(Kind::Float).map_err(te)?;
                match self.kind {
                    Kind10::Coherence => {
                        if r.prev.numel() == 0 {
                            continue;
                        }
                        let w = g.data.f_narrow(0, 0, r.segs.len).and_then(|w| w.f_to_kind(Kind::Float));
                        let dw = w.and_then(|w| w.f_sub(&r.prev)).map_err(te)?;
                        let dw2 = dw.f_square().map_err(te)?;
                        if r.ema_dw.numel() == 0 {
                            r.ema_dw = dw;
                            r.ema_dw2 = dw2;
                            continue;
                        }
                        let cos = r.segs.mean(&ecos(&dw, &r.ema_dw).map_err(te)?, &live)?;
                        let flip = r.segs.mean(&sign_flips(&dw, &r.ema_dw).map_err(te)?, &live)?;
                        let mean_abs = r.segs.mean(&dw.f_abs().map_err(te)?, &live)?;
                        let jitter = r.segs.mean(&dw2, &live)?.f_sub(&mean_abs.f_square().map_err(te)?);
                        let jitter = jitter.and_then(|j| j.f_clamp_min(0.0)).map_err(te)?;
                        let row = Tensor::f_stack(&[cos, flip, jitter], 1).map_err(te)?;
                        Self::fold(r, row, ema)?;
                        let _ = r.ema_dw.f_lerp_(&dw, 1.0 - ema).map_err(te)?;
                        let _ = r.ema_dw2.f_lerp_(&dw2, 1.0 - ema).map_err(te)?;
                    }
                    Kind10::Sketch => {
                        let Some((m, v)) = opt.moments(r.group) else { continue };
                        let k = self.cfg.sketch;
                        let pick = |t: &Tensor| {
                            t.f_index_select(0, &r.idx)
                                .and_then(|x| x.f_to_kind(Kind::Float))
                                .and_then(|x| x.f_view([Self::n_tensors(r), k]))
                                .map_err(te)
                        };
                        let (ms, vs, ls) = (pick(m)?, pick(v)?, pick(&live)?);
                        if r.prev.numel() == 0 {
                            r.prev = ms;
                            continue;
                        }
                        let n = ls.f_sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
                        let n = n.and_then(|n| n.f_clamp_min(1.0)).map_err(te)?;
                        let mean = |t: Tensor| {
                            t.f_mul(&ls)
                                .and_then(|t| t.f_sum_dim_intlist([1i64].as_slice(), false, Kind::Float))
                                .and_then(|t| t.f_div(&n))
                                .map_err(te)
                        };
                        let cos = mean(ecos(&ms, &r.prev).and_then(|c| c.f_abs()).map_err(te)?)?;
                        let flip = mean(sign_flips(&ms, &r.prev).map_err(te)?)?;
                        let sv = mean(vs.f_abs().and_then(|x| x.f_sqrt()).map_err(te)?)?;
                        Self::fold(r, Tensor::f_stack(&[cos, flip, sv], 1).map_err(te)?, ema)?;
                        r.prev = ms;
                    }
                    Kind10::Checkpoint => {}
                }
            }
            Ok(())
        })
    }

    /// After the masks were applied at step `step`.
    pub fn settle(&mut self, store: &ParamStore, step: i64) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            for r in self.ranges.iter_mut() {
                let w = store.groups()[r.group].data.f_narrow(0, 0, r.segs.len).map_err(te)?;
                match self.kind {
                    Kind10::Coherence if r.prev.numel() > 0 => {
                        r.prev.f_copy_(&w).map_err(te)?;
                    }
                    Kind10::Coherence => {
                        r.prev = w
                            .f_to_kind(Kind::Float)
                            .and_then(|t| crate::tensor::deep_copy(&t))
                            .map_err(te)?;
                    }
                    Kind10::Checkpoint if r.snap.numel() == 0 || step % self.cfg.snapshot_every == 0 => {
                        r.snap =
                            w.f_to_device(Device::Cpu).and_then(|t| t.f_to_kind(Kind::Float)).map_err(te)?;
                        r.snap = crate::tensor::deep_copy(&r.snap).map_err(te)?;
                    }
                    _ => {}
                }
            }
            Ok(())
        })
    }

    /// The per-element factor over range `ri` (None: 1 everywhere), given
    /// the range's weights and moments.
    pub fn factor(
        &self,
        ri: usize,
        w: &Tensor,
        m: &Tensor,
        v: &Tensor,
        mask: &Tensor,
    ) -> Result<Option<Tensor>> {
        let r = self.ranges.get(ri).ok_or_else(|| anyhow!("bitter10: no range {ri}"))?;
        let live = mask.f_to_kind(Kind::Float).map_err(te)?;
        let c = &self.cfg;
        let col = |i: i64| r.stats.f_select(1, i);
        let per_tensor = match self.kind {
            Kind10::Coherence if r.stats.numel() == 0 => {
                if c.alpha == 1.0 {
                    return Ok(None);
                }
                let ones = Tensor::f_ones([Self::n_tensors(r)], (Kind::Float, w.device())).map_err(te)?;
                ones.f_mul_scalar(c.alpha).map_err(te)?
            }
            Kind10::Coherence => {
                let (w, m) = (w.f_to_kind(Kind::Float).map_err(te)?, self.aligned_m(m)?);
                let cos_mw = r.segs.mean(&ecos(&m, &w).map_err(te)?, &live)?;
                let pos = |t: Tensor, beta: f64| t.f_clamp_min(0.0)?.f_pow_tensor_scalar(beta);
                (|| -> Result<Tensor, tch::TchError> {
                    let stable = pos(col(1)?.f_neg()?.f_add_scalar(1.0)?, c.beta_flip)?;
                    let f = stable.f_mul(&pos(col(0)?, c.beta_dir)?)?.f_mul(&pos(cos_mw, c.beta_mw)?)?;
                    f.f_div(&col(2)?.f_mul_scalar(c.beta_jitter)?.f_add_scalar(1.0)?)?.f_mul_scalar(c.alpha)
                })()
                .map_err(te)?
            }
            Kind10::Sketch if r.stats.numel() == 0 => return Ok(None),
            Kind10::Sketch => (|| -> Result<Tensor, tch::TchError> {
                let f = col(1)?.f_neg()?.f_add_scalar(1.0)?.f_mul(&col(0)?)?;
                f.f_div(&col(2)?.f_add_scalar(1.0)?)
            })()
            .map_err(te)?,
            Kind10::Checkpoint if r.snap.numel() == 0 => return Ok(None),
            Kind10::Checkpoint => {
                let w = w.f_to_kind(Kind::Float).map_err(te)?;
                let dw = w.f_sub(&r.snap.f_to_device(w.device()).map_err(te)?).map_err(te)?;
                let m = self.aligned_m(m)?;
                let cos = r.segs.mean(&ecos(&m, &dw).map_err(te)?, &live)?.f_clamp(0.0, 1.0).map_err(te)?;
                let sv = r
                    .segs
                    .mean(&v.f_to_kind(Kind::Float).and_then(|v| v.f_abs()?.f_sqrt()).map_err(te)?, &live)?;
                cos.f_div(&sv.f_add_scalar(1.0).map_err(te)?).map_err(te)?
            }
        };
        Ok(Some(r.segs.expand(&per_tensor)?))
    }

    /// m in float32, negated with `negate_m`.
    fn aligned_m(&self, m: &Tensor) -> Result<Tensor> {
        let m = m.f_to_kind(Kind::Float).map_err(te)?;
        if self.cfg.negate_m {
            m.f_neg().map_err(te)
        } else {
            Ok(m)
        }
    }

    /// Checkpoint tensors: whatever has been set.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, r) in self.ranges.iter().enumerate() {
            for (what, t) in [
                ("prev", &r.prev),
                ("ema_dw", &r.ema_dw),
                ("ema_dw2", &r.ema_dw2),
                ("stats", &r.stats),
                ("snap", &r.snap),
            ] {
                if t.numel() > 0 {
                    out.push((format!("bitter10.{what}.{i}"), t.shallow_clone()));
                }
            }
        }
        out
    }

    /// Restore what [`Tracker::tensors`] saved, checking shapes.
    pub fn restore(&mut self, tensors: &[(String, Tensor)]) -> Result<()> {
        let (kind, k) = (self.kind, self.cfg.sketch);
        for (i, r) in self.ranges.iter_mut().enumerate() {
            let (len, n) = (r.segs.len, Self::n_tensors(r));
            let prev_shape = if kind == Kind10::Sketch { vec![n, k] } else { vec![len] };
            let device = r.prev.device();
            let slots: [(&str, &mut Tensor, Vec<i64>, Device); 5] = [
                ("prev", &mut r.prev, prev_shape, device),
                ("ema_dw", &mut r.ema_dw, vec![len], device),
                ("ema_dw2", &mut r.ema_dw2, vec![len], device),
                ("stats", &mut r.stats, vec![n, 3], device),
                ("snap", &mut r.snap, vec![len], Device::Cpu),
            ];
            for (what, slot, shape, device) in slots {
                let name = format!("bitter10.{what}.{i}");
                let Some((_, t)) = tensors.iter().find(|(n, _)| *n == name) else { continue };
                if t.size() != shape {
                    bail!("pruner tensor '{name}' has shape {:?}, expected {shape:?}", t.size());
                }
                *slot = t.f_to_device(device).and_then(|t| t.f_to_kind(Kind::Float)).map_err(te)?;
            }
        }
        Ok(())
    }
}
