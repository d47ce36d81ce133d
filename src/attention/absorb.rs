//! Absorbed latent decoding: attend over the cached latent without
//! expanding it into per-head K and V.
//!
//! With `k_jh = W_k,h c_j + b_k,h` and `v_jh = W_v,h c_j + b_v,h` (rows of
//! `from_kv_latent`), for query head h
//!
//! ```text
//! q·k_jh  = (W_k,hᵀ q)·c_j + q·b_k,h           the last term is the same for every j
//! Σ_j p_j v_jh = W_v,h (Σ_j p_j c_j) + b_v,h    because Σ_j p_j = 1
//! ```
//!
//! so a step scores the query `a = W_k,hᵀ q` (r wide) against the cached
//! latents and up-projects one mixed latent per head: it reads r numbers
//! per position instead of 2d, and multiplies by W once per query instead
//! of once per cached position. A softmax is unchanged by a per-row
//! constant, so dropping `q·b_k` is exact. KVSplice's decompression
//! `(E z − shift)/g` is affine as well and folds the same way
//! (`a' = (a/g)·E` against the cached z, decompressing the mixed z once).
//! The decoupled RoPE key (`spec::Rope::Decoupled`) sits in the same cache
//! row after the latent and adds `q_r·k_r` to every head's score, with
//! the scale `1/√(hs + d_r)` the full forward uses. RoPE over the whole
//! head (`Rope::Full`) puts a position-dependent rotation between W_k and
//! the score, so it cannot fold; such layers expand (`layer.rs`).
//!
//! For `mla` layers (Q from its own projection, no KVSplice) a cache also
//! folds the weights once ([`Folded`]): W_k,hᵀ W_q,h joins the RoPE and
//! latent projections in one input matrix, and W_o,h W_v,h (`c_proj` after
//! the value map) becomes one output matrix, so a decode step is one GEMM
//! in, the scores and mixing over the cache rows, and one GEMM out. A
//! graphed step at batch 1 costs its kernel count; this halves it.
use tch::{Kind, TchError, Tensor};

use super::kvsplice::KvSplice;
use crate::layers::Linear;

/// The maps that fold into the query and the mixed latent.
pub struct Fold<'a> {
    /// `from_kv_latent` (or `from_latent`): K rows at `k_off`, V rows after them.
    pub up: &'a Linear,
    pub k_off: i64,
    pub splice: Option<&'a KvSplice>,
    pub n_head: i64,
    pub head_size: i64,
    /// Width of the stored latent (r, or d_c with KVSplice); a decoupled
    /// RoPE key fills the rest of each cache row.
    pub width: i64,
}

/// Which cached positions a query reads.
pub enum Mask<'a> {
    /// New queries at `pos0..` over positions `0..S` (causal).
    Causal(i64),
    /// Added to the scores, broadcast over [B, H, T, S] (graphed decoding).
    Additive(&'a Tensor),
}

/// Rows `[off, off + n)` of `l` as [H, hs, r] weights and [H, hs] biases.
fn head_rows(l: &Linear, off: i64, h: i64, hs: i64) -> Result<(Tensor, Option<Tensor>), TchError> {
    let w = l.weight.f_narrow(0, off, h * hs)?;
    let r = w.size()[1];
    let b = match &l.bias {
        Some(b) => Some(b.f_narrow(0, off, h * hs)?.f_view([h, hs])?),
        None => None,
    };
    Ok((w.f_view([h, hs, r])?, b))
}

/// Per-head `x` [B, H, T, n] times `w` [H, n, m] → [B, H, T, m] (one bmm
/// over heads; never expands the weight per batch row).
fn per_head(x: &Tensor, w: &Tensor) -> Result<Tensor, TchError> {
    let s = x.size();
    let (b, h, t, n) = (s[0], s[1], s[2], s[3]);
    let m = w.size()[2];
    let xh = x.f_permute([1, 0, 2, 3])?.f_reshape([h, b * t, n])?;
    xh.f_bmm(w)?.f_view([h, b, t, m])?.f_permute([1, 0, 2, 3])
}

/// Scores of the absorbed queries `a` [B, H, (T,) width], joined with the
/// rotated RoPE parts `q_r` [B, H, (T,) d_r] when the cache rows carry a
/// key, against the cache rows `slot` [B, S, width + d_r] (scaled by
/// 1/√(hs + d_r); masked); their softmax [B, H, T, S] (float32) and the
/// mixed first `width` columns [B, H, T, width].
fn mix(
    a: &Tensor,
    q_r: Option<&Tensor>,
    slot: &Tensor,
    (width, head_size): (i64, i64),
    mask: Mask,
    (b, h, t): (i64, i64, i64),
) -> Result<(Tensor, Tensor), TchError> {
    let kind = slot.f_kind()?;
    let (s, k) = (slot.size()[1], slot.size()[2]);
    let qq = match q_r {
        Some(q) => Tensor::f_cat(&[&a.f_to_kind(kind)?, &q.f_to_kind(kind)?], -1)?,
        None => a.f_to_kind(kind)?,
    };
    let cols = *qq.size().last().unwrap_or(&0);
    if cols != k {
        return Err(TchError::Shape(format!(
            "absorbed attention: the query has {cols} columns, the cache rows {k}"
        )));
    }
    let qq = qq.f_reshape([b, h * t, k])?;
    let scale = 1.0 / ((head_size + k - width) as f64).sqrt();
    let keys = slot.f_transpose(1, 2)?;
    let scores = match mask {
        // scale·(qq·keys) + mask in one kernel (the graphed step).
        Mask::Additive(m) => {
            let m = m.f_reshape([1, 1, s])?.f_to_kind(kind)?;
            m.f_baddbmm(&qq, &keys, 1.0, scale)?.f_view([b, h, t, s])?
        }
        Mask::Causal(pos0) => {
            let scores = qq.f_bmm(&keys)?.f_view([b, h, t, s])?.f_mul_scalar(scale)?;
            if t > 1 || pos0 + 1 < s {
                let allowed = super::layer::causal_allowed(t, s, pos0, slot.device())?;
                scores.f_masked_fill(&allowed.f_logical_not()?, f64::NEG_INFINITY)?
            } else {
                scores
            }
        }
    };
    let p = scores.f_softmax(-1, Kind::Float)?;
    // In bf16 the rounded weights sum to 1 only within bf16 precision, so
    // adding b_v (or KVSplice's shift) after mixing is exact only up to that.
    let mixed = p.f_to_kind(kind)?.f_view([b, h * t, s])?.f_bmm(&slot.f_narrow(2, 0, width)?)?;
    Ok((mixed.f_view([b, h, t, width])?, p))
}

/// An `mla` layer's weights folded for decoding (float32 math, stored in
/// the cache's dtype). Rows of `w_in`: per head W_k,hᵀ W_q,h (r each), then
/// `rope_qk` ((H+1)·d_r, when decoupled), then `to_kv_latent` (r). Columns
/// of `w_out`: per head W_o,h W_v,h (r each); `b_out = b_o + W_o b_v`.
pub struct Folded {
    pub w_in: Tensor,
    pub b_in: Tensor,
    pub w_out: Tensor,
    pub b_out: Tensor,
}

/// The parts of an `mla` layer [`Folded`] combines.
pub struct MlaWeights<'a> {
    pub q_proj: &'a Linear,
    pub down: &'a Linear,
    pub up: &'a Linear,
    pub rope_qk: Option<&'a Linear>,
    pub c_proj: &'a Linear,
}

fn bias_or_zeros(l: &Linear, off: i64, n: i64) -> Result<Tensor, TchError> {
    match &l.bias {
        Some(b) => b.f_narrow(0, off, n)?.f_to_kind(Kind::Float),
        None => Tensor::f_zeros([n], (Kind::Float, l.weight.device())),
    }
}

impl Folded {
    pub fn new(w: &MlaWeights, n_head: i64, head_size: i64, kind: Kind) -> Result<Folded, TchError> {
        tch::no_grad(|| {
            let (h, hs) = (n_head, head_size);
            let d = h * hs;
            let f = |t: &Tensor| t.f_to_kind(Kind::Float);
            let r = w.up.weight.size()[1];
            let wq = f(&w.q_proj.weight)?.f_view([h, hs, -1])?; // [H, hs, d_in]
            let bq = bias_or_zeros(w.q_proj, 0, d)?.f_view([h, hs, 1])?;
            let wk = f(&w.up.weight.f_narrow(0, 0, d)?)?.f_view([h, hs, r])?;
            let wv = f(&w.up.weight.f_narrow(0, d, d)?)?.f_view([h, hs, r])?;
            let wk_t = wk.f_transpose(1, 2)?; // [H, r, hs]
            let w_a = wk_t.f_bmm(&wq)?.f_reshape([h * r, -1])?;
            let b_a = wk_t.f_bmm(&bq)?.f_reshape([h * r])?;
            let mut ws = vec![w_a];
            let mut bs = vec![b_a];
            if let Some(l) = w.rope_qk {
                ws.push(f(&l.weight)?);
                bs.push(bias_or_zeros(l, 0, l.weight.size()[0])?);
            }
            ws.push(f(&w.down.weight)?);
            bs.push(bias_or_zeros(w.down, 0, r)?);
            let w_in = Tensor::f_cat(&ws, 0)?.f_to_kind(kind)?;
            let b_in = Tensor::f_cat(&bs, 0)?.f_to_kind(kind)?;
            // W_o [d_out, H·hs] → per head [H, d_out, hs] · W_v,h [H, hs, r].
            let wo = f(&w.c_proj.weight)?;
            let d_out = wo.size()[0];
            let wo_h = wo.f_view([d_out, h, hs])?.f_permute([1, 0, 2])?;
            let w_out = wo_h.f_bmm(&wv)?.f_permute([1, 0, 2])?.f_reshape([d_out, h * r])?;
            let bv = bias_or_zeros(w.up, d, d)?;
            let b_out = bias_or_zeros(w.c_proj, 0, d_out)?.f_add(&wo.f_mv(&bv)?)?;
            Ok(Folded { w_in, b_in, w_out: w_out.f_to_kind(kind)?, b_out: b_out.f_to_kind(kind)? })
        })
    }

    /// The layer's input projections of `x` [B, 1, d]: the absorbed queries
    /// a [B, H, r], the RoPE parts [B, H+1, 1, d_r] (unrotated) when there
    /// are any, and the latent c [B, 1, r].
    pub fn project(
        &self,
        x: &Tensor,
        n_head: i64,
        rope_dim: i64,
    ) -> Result<(Tensor, Option<Tensor>, Tensor), TchError> {
        let out = x.f_linear(&self.w_in, Some(&self.b_in))?;
        let b = out.size()[0];
        let r = self.w_out.size()[1] / n_head;
        let a = out.f_narrow(-1, 0, n_head * r)?.f_view([b, n_head, r])?;
        let qkr = if rope_dim > 0 {
            let q = out.f_narrow(-1, n_head * r, (n_head + 1) * rope_dim)?;
            Some(q.f_view([b, n_head + 1, 1, rope_dim])?)
        } else {
            None
        };
        let c = out.f_narrow(-1, n_head * r + (n_head + 1) * rope_dim, r)?;
        Ok((a, qkr, c))
    }

    /// Attention output [B, 1, d] (after `c_proj`) of absorbed queries `a`
    /// [B, H, r] with rotated RoPE parts `q_r` [B, H, d_r] over `slot`
    /// [B, S, r + d_r]; also the pattern [B, H, 1, S].
    pub fn attend(
        &self,
        a: &Tensor,
        q_r: Option<&Tensor>,
        slot: &Tensor,
        head_size: i64,
        mask: Mask,
    ) -> Result<(Tensor, Tensor), TchError> {
        let s = a.size();
        let (b, h, r) = (s[0], s[1], s[2]);
        let (mixed, p) = mix(a, q_r, slot, (r, head_size), mask, (b, h, 1))?;
        let y = mixed.f_reshape([b, 1, h * r])?.f_linear(&self.w_out, Some(&self.b_out))?;
        Ok((y, p))
    }
}

impl Fold<'_> {
    /// Output heads [B, H, T, hs] and the pattern [B, H, T, S] of queries
    /// `q_c` [B, H, T, hs] (content part) and `q_r` [B, H, T, d_r] (rotated
    /// RoPE part, when the cache has one) over the cache rows `slot`
    /// [B, S, width + d_r].
    pub fn attend(
        &self,
        q_c: &Tensor,
        q_r: Option<&Tensor>,
        slot: &Tensor,
        mask: Mask,
    ) -> Result<(Tensor, Tensor), TchError> {
        let (h, hs) = (self.n_head, self.head_size);
        let qs = q_c.size();
        let (b, t) = (qs[0], qs[2]);
        let (wk, _) = head_rows(self.up, self.k_off, h, hs)?;
        let (wv, bv) = head_rows(self.up, self.k_off + h * hs, h, hs)?;
        let mut a = per_head(q_c, &wk)?;
        if let Some(sp) = self.splice {
            let g = sp.scale.f_softplus()?.f_add_scalar(1e-6)?.f_to_kind(a.f_kind()?)?;
            a = a.f_div(&g)?.f_matmul(&sp.expand.f_to_kind(a.f_kind()?)?)?;
        }
        let (mut mixed, p) = mix(&a, q_r, slot, (self.width, hs), mask, (b, h, t))?;
        if let Some(sp) = self.splice {
            mixed = sp.decompress(&mixed)?;
        }
        // [B, H, T, r] · W_v,hᵀ → [B, H, T, hs]
        let y = per_head(&mixed, &wv.f_transpose(1, 2)?.f_to_kind(mixed.f_kind()?)?)?;
        let y = match bv {
            Some(bv) => y.f_add(&bv.f_unsqueeze(1)?.f_to_kind(y.f_kind()?)?)?,
            None => y,
        };
        Ok((y, p))
    }
}
