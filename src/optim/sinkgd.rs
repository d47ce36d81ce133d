//! SinkGD (knlp-spec.md 3.5): a stateless optimizer that normalises each
//! gradient matrix Sinkhorn-style, alternately by its rows and its columns,
//! squashes it with tanh and rescales it to the gradient's RMS.
//!
//! Per parameter `p` with gradient `g`, learning rate `lr`, weight decay `wd`:
//!
//! ```text
//! p <- p - lr wd p                        (decoupled, before the update)
//! p <- p - lr T(g)
//! T(g) = g / (mean|g| + ε)                                  n_iter = 0
//!      = tanh(u / max(ε, τ)),  u = g / max(Σ|g|, ε)        g.dim() < 2
//!      = u_n (rms(g) + ε) / (rms(u_n) + ε)                  otherwise, with
//!        u_0 = g;  u <- u / max(Σ_last |u|, ε);  u <- u / max(Σ_2nd-last |u|, ε);
//!        u_{k+1} = tanh(u / τ)                              (n_iter rounds)
//! ```
//!
//! The matrix branch runs in float32 and casts back, as the seed does.
//! There is no state: a checkpoint holds nothing for it but the step count.
use anyhow::{anyhow, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::groups::Seg;
use super::te;
use crate::params::{FlatGroup, ParamStore};

/// SinkGD's own hyper-parameters (lr, weight decay and ε are the optimizer's).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SinkConfig {
    /// Temperature of the tanh squashing.
    pub tau: f64,
    /// Row/column normalisation rounds; 0 is plain mean-|g| normalisation.
    pub n_iter: i64,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig { tau: 0.1, n_iter: 5 }
    }
}

impl SinkConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.tau.is_finite() && self.tau > 0.0) {
            anyhow::bail!("optimizer sinkgd: tau must be a finite number > 0, got {}", self.tau);
        }
        if !(0..=1000).contains(&self.n_iter) {
            anyhow::bail!("optimizer sinkgd: n_iter must be in 0..=1000, got {}", self.n_iter);
        }
        Ok(())
    }
}

/// Σ|u| over `dim`, kept, floored at ε.
fn abs_sum(u: &Tensor, dim: i64, eps: f64) -> Result<Tensor, tch::TchError> {
    u.f_abs()?.f_sum_dim_intlist([dim].as_slice(), true, Kind::Float)?.f_clamp_min(eps)
}

fn rms(t: &Tensor) -> Result<Tensor, tch::TchError> {
    t.f_square()?.f_mean(Kind::Float)?.f_sqrt()
}

/// The update direction T(g) of one parameter (shaped like it).
pub fn direction(g: &Tensor, c: &SinkConfig, eps: f64) -> Result<Tensor, tch::TchError> {
    if c.n_iter == 0 {
        let scale = g.f_abs()?.f_mean(Kind::Float)?.f_add_scalar(eps)?;
        return g.f_div(&scale.f_to_kind(g.kind())?);
    }
    if g.dim() < 2 {
        let total = g.f_abs()?.f_sum(Kind::Float)?.f_clamp_min(eps)?.f_to_kind(g.kind())?;
        return g.f_div(&total)?.f_div_scalar(eps.max(c.tau))?.f_tanh();
    }
    let g32 = g.f_to_kind(Kind::Float)?;
    let mut u = g32.shallow_clone();
    for _ in 0..c.n_iter {
        u = u.f_div(&abs_sum(&u, -1, eps)?)?;
        u = u.f_div(&abs_sum(&u, -2, eps)?)?;
        u = u.f_div_scalar(c.tau)?.f_tanh()?;
    }
    let scale = rms(&g32)?.f_add_scalar(eps)?.f_div(&rms(&u)?.f_add_scalar(eps)?)?;
    u.f_mul(&scale)?.f_to_kind(g.kind())
}

/// One SinkGD step over a flat buffer, parameter by parameter (T needs each
/// parameter's own shape).
pub fn step(store: &ParamStore, g: &FlatGroup, segs: &[Seg], c: &super::OptConfig, lr: f64) -> Result<()> {
    tch::no_grad(|| -> Result<()> {
        for &(pi, off, n) in &g.members {
            let seg = segs
                .iter()
                .find(|s| s.ranges.iter().any(|&(o, l)| off >= o && off < o + l))
                .ok_or_else(|| anyhow!("sinkgd: parameter {pi} is in no segment"))?;
            let shape = store.params()[pi].tensor.size();
            let view =
                |t: &Tensor| t.f_narrow(0, off, n).and_then(|v| v.f_view(shape.as_slice())).map_err(te);
            let (mut p, grad) = (view(&g.data)?, view(&g.grad)?);
            let lr = lr * seg.lr_scale;
            if seg.weight_decay > 0.0 {
                let _ = p.f_mul_scalar_(1.0 - lr * seg.weight_decay).map_err(te)?;
            }
            let d = direction(&grad, &c.sinkgd, c.eps).map_err(te)?;
            let _ = p.f_sub_(&d.f_mul_scalar(lr).map_err(te)?).map_err(te)?;
        }
        Ok(())
    })
}
