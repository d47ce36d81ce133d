//! RA compute routing (spec 5.8), per token and causal.
//!
//! The heads split into a FULL group (`n_head − n_ra`) and a cheap RA group
//! (`n_ra = clamp(round(frac·H), 1, H−1)`), each with its own output
//! projection. A router reads, for token t, features of its attention input
//! x_t and of the causal context mean E_t = mean(x_0..x_t) (stop-gradient):
//! `[‖x_t − E_t‖/√d, ‖x_t‖/√d, ‖E_t‖/√d, ⟨x_t, E_t⟩/d]` → Linear(4→16) →
//! GELU → Linear(16→2) → softmax → (p_full, p_ra); the FULL logit's bias
//! starts at −1.
//!
//! - Warm-up phase: `out = 0.75·out_full + 0.25·out_ra`.
//! - Routing phase: `h_t = [p_ra,t > 0.5]` with a straight-through gradient
//!   (`h + p_ra − stopgrad(p_ra)`), `out_t = out_full,t + h_t (out_ra,t − out_full,t)`,
//!   and the compute penalty `w · mean_t (p_full·n_full + p_ra·n_ra)/H` joins the loss.
//!
//! Every head is still computed (both groups feed the gradient); the router
//! is a learned per-token signal, not a speed-up in this implementation.
use anyhow::Result;
use tch::{Kind, TchError, Tensor};

use super::layer::{Ctx, Dims};
use crate::layers::{Linear, Path};
use crate::params::{Init, ParamStore};

pub const HIDDEN: i64 = 16;

pub fn ra_heads(n_head: i64, frac: f64) -> i64 {
    ((frac * n_head as f64).round() as i64).clamp(1, (n_head - 1).max(1))
}

pub struct Router {
    fc1: Linear,
    fc2: Linear,
    c_proj_ra: Linear,
    n_ra: i64,
    n_full: i64,
    hs: i64,
    d: i64,
}

impl Router {
    pub fn new(s: &mut ParamStore, p: &Path, dims: Dims, proj_init: Option<Init>) -> Result<Self> {
        let n_ra = ra_heads(dims.n_head, dims.route_frac);
        let hs = dims.head_size();
        let rp = p.sub("router");
        let fc1 = Linear::new(s, &rp.sub("fc1"), 4, HIDDEN, true, None)?;
        let fc2 = Linear::new(s, &rp.sub("fc2"), HIDDEN, 2, true, None)?;
        if let Some(b) = &fc2.bias {
            let mut b = b.shallow_clone();
            let init = Tensor::from_slice(&[-1.0f32, 0.0]);
            tch::no_grad(|| b.f_copy_(&init))?;
        }
        let c_proj_ra = Linear::new(s, &p.sub("c_proj_ra"), n_ra * hs, dims.n_embd, dims.bias, proj_init)?;
        Ok(Router { fc1, fc2, c_proj_ra, n_ra, n_full: dims.n_head - n_ra, hs, d: dims.n_embd })
    }

    /// Output projections and router (the layer's `c_proj` is the FULL one).
    pub fn num_params(dims: &Dims) -> i64 {
        let (hs, d, b) = (dims.head_size(), dims.n_embd, dims.bias as i64);
        let n_ra = ra_heads(dims.n_head, dims.route_frac);
        let full = (dims.n_head - n_ra) * hs * d + b * d;
        let ra = n_ra * hs * d + b * d;
        full + ra + (4 * HIDDEN + HIDDEN) + (HIDDEN * 2 + 2)
    }

    /// Merge the head groups of `y` [B, H, T, hs] for inputs `x` [B, T, d]
    /// at positions `pos0..`; `ctx_sum` carries Σx over earlier tokens when decoding.
    #[allow(clippy::too_many_arguments)]
    pub fn combine(
        &self,
        x: &Tensor,
        y: &Tensor,
        pos0: i64,
        ctx_sum: Option<&mut Option<Tensor>>,
        c_proj_full: &Linear,
        ctx: &Ctx,
        layer: i64,
    ) -> Result<Tensor, TchError> {
        let s = x.size();
        let (b, t) = (s[0], s[1]);
        let yt = y.f_transpose(1, 2)?;
        let group = |from: i64, n: i64| yt.f_narrow(2, from, n)?.f_contiguous()?.f_view([b, t, n * self.hs]);
        let out_full = c_proj_full.forward(&group(0, self.n_full)?)?;
        let out_ra = self.c_proj_ra.forward(&group(self.n_full, self.n_ra)?)?;
        // The context sum is kept in both phases, so a cache's contents do
        // not depend on the phase it was filled in.
        let xf = x.f_to_kind(Kind::Float)?;
        let mut cs = xf.f_detach()?.f_cumsum(1, Kind::Float)?;
        if let Some(slot) = ctx_sum {
            if let Some(prev) = slot.as_ref() {
                cs = cs.f_add(&prev.f_unsqueeze(1)?)?;
            }
            *slot = Some(cs.f_select(1, t - 1)?.f_contiguous()?);
        }
        if !ctx.route_on && !ctx.stats() {
            return out_full.f_mul_scalar(0.75)?.f_add(&out_ra.f_mul_scalar(0.25)?);
        }
        let count =
            Tensor::f_arange_start(pos0 + 1, pos0 + t + 1, (Kind::Float, x.device()))?.f_view([1, t, 1])?;
        let e = cs.f_div(&count)?;
        let sd = (self.d as f64).sqrt();
        let shift = xf
            .f_sub(&e)?
            .f_square()?
            .f_sum_dim_intlist(-1, false, Kind::Float)?
            .f_add_scalar(1e-6)?
            .f_sqrt()?;
        let norm = |z: &Tensor| z.f_square()?.f_sum_dim_intlist(-1, false, Kind::Float)?.f_sqrt();
        let dot = xf.f_mul(&e)?.f_sum_dim_intlist(-1, false, Kind::Float)?;
        let feats = Tensor::f_stack(
            &[
                shift.f_div_scalar(sd)?,
                norm(&xf)?.f_div_scalar(sd)?,
                norm(&e)?.f_div_scalar(sd)?,
                dot.f_div_scalar(self.d as f64)?,
            ],
            -1,
        )?;
        let w1 = self.fc1.weight.f_to_kind(Kind::Float)?;
        let b1 = self.fc1.bias.as_ref().map(|b| b.f_to_kind(Kind::Float)).transpose()?;
        let w2 = self.fc2.weight.f_to_kind(Kind::Float)?;
        let b2 = self.fc2.bias.as_ref().map(|b| b.f_to_kind(Kind::Float)).transpose()?;
        let logits = feats.f_linear(&w1, b1.as_ref())?.f_gelu("none")?.f_linear(&w2, b2.as_ref())?;
        let probs = logits.f_softmax(-1, Kind::Float)?;
        let p_full = probs.f_select(-1, 0)?;
        let p_ra = probs.f_select(-1, 1)?;
        let hard = p_ra.f_gt(0.5)?.f_to_kind(Kind::Float)?;
        let st =
            hard.f_add(&p_ra)?.f_sub(&p_ra.f_detach()?)?.f_unsqueeze(-1)?.f_to_kind(out_full.f_kind()?)?;
        let out = if ctx.route_on {
            out_full.f_add(&st.f_mul(&out_ra.f_sub(&out_full)?)?)?
        } else {
            // Warm-up: the router only reports its statistics; it does not route.
            out_full.f_mul_scalar(0.75)?.f_add(&out_ra.f_mul_scalar(0.25)?)?
        };
        if ctx.train && ctx.route_on {
            if let Some(aux) = ctx.aux {
                let h = (self.n_full + self.n_ra) as f64;
                let cost = p_full
                    .f_mul_scalar(self.n_full as f64 / h)?
                    .f_add(&p_ra.f_mul_scalar(self.n_ra as f64 / h)?)?
                    .f_mean(Kind::Float)?
                    .f_mul_scalar(ctx.route_penalty)?;
                if let Ok(mut a) = aux.try_borrow_mut() {
                    a.push(cost);
                }
            }
        }
        ctx.record(|pr| {
            if pr.stats {
                let m = tch::no_grad(|| p_ra.f_mean(Kind::Float))?;
                let f = tch::no_grad(|| hard.f_mean(Kind::Float))?;
                pr.route.push((layer, m, f));
            }
            Ok(())
        })?;
        Ok(out)
    }
}
