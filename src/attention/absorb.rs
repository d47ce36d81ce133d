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
    /// Width of the stored latent (r, or d_c with KVSplice).
    pub width: i64,
    /// Width of the decoupled RoPE key after it in each cache row (0: none).
    pub rope_dim: i64,
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
        let s = slot.size()[1];
        let (wk, _) = head_rows(self.up, self.k_off, h, hs)?;
        let (wv, bv) = head_rows(self.up, self.k_off + h * hs, h, hs)?;
        let mut a = per_head(q_c, &wk)?;
        if let Some(sp) = self.splice {
            let g = sp.scale.f_softplus()?.f_add_scalar(1e-6)?.f_to_kind(a.f_kind()?)?;
            a = a.f_div(&g)?.f_matmul(&sp.expand.f_to_kind(a.f_kind()?)?)?;
        }
        let qq = match (q_r, self.rope_dim) {
            (Some(r), dr) if dr > 0 => Tensor::f_cat(&[&a, &r.f_to_kind(a.f_kind()?)?], -1)?,
            (None, 0) => a,
            _ => return Err(TchError::Shape("absorbed attention: RoPE part and cache row disagree".into())),
        };
        let kind = slot.f_kind()?;
        let qq = qq.f_to_kind(kind)?.f_reshape([b, h * t, self.width + self.rope_dim])?;
        let scale = 1.0 / ((hs + self.rope_dim) as f64).sqrt();
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
        let mixed = p.f_to_kind(kind)?.f_view([b, h * t, s])?.f_bmm(&slot.f_narrow(2, 0, self.width)?)?;
        let mut mixed = mixed.f_view([b, h, t, self.width])?;
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
