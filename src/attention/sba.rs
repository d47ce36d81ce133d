//! Symmetric bidirectional attention (spec 5.7), made causal.
//!
//! With scores `s_ij = q_i·k_j/√hs` over j ≤ i:
//! ```text
//! A_fwd[i,j] = exp(s_ij) / Σ_{j'≤i} exp(s_ij')                       row softmax
//! R[i,j]     = exp(s_ij) / Σ_{i'=j..i} exp(s_i'j)                    column softmax over the
//!                                                                   queries seen so far
//! A_rev[i,j] = R[i,j] / Σ_{j'≤i} R[i,j']                             rows renormalised
//! A          = α A_fwd + (1 − α) A_rev,   α = σ(alpha_logit)        per layer
//! y_i        = Σ_{j≤i} A[i,j] v_j
//! ```
//! The seed's column softmax normalised over *all* queries, so position i
//! read future tokens; here the column normaliser only covers queries up to
//! i. A cache keeps `D[j] = log Σ_{i'=j..i} exp(s_i'j)` per key and updates
//! it with one `logaddexp` per step. Computed in float32.
use tch::{Kind, TchError, Tensor};

use super::cache;
use super::layer::causal_allowed;

/// A finite stand-in for −∞ in the column normaliser, so that masked
/// entries never produce ∞ − ∞ in the forward or the backward pass.
const FAR: f64 = -1e30;

/// Run SBA's math in float32 even inside a CUDA autocast region (the
/// layer wraps every call in this).
pub fn f32_only<T>(f: impl FnOnce() -> Result<T, TchError>) -> Result<T, TchError> {
    crate::shim::without_autocast(f).map_err(TchError::Kind)?
}

/// Whole sequence: (output in `v`'s dtype, pattern A [B,H,T,T], last row of D [B,H,T]).
pub fn full_with_norm(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alpha: &Tensor,
    p: f64,
) -> Result<(Tensor, Tensor, Tensor), TchError> {
    let kind = v.f_kind()?;
    let (t, hs) = (q.size()[2], q.size()[3]);
    let qf = q.f_to_kind(Kind::Float)?;
    let kf = k.f_to_kind(Kind::Float)?;
    let s = qf.f_matmul(&kf.f_transpose(-2, -1)?)?.f_mul_scalar(1.0 / (hs as f64).sqrt())?;
    let blocked = causal_allowed(t, t, 0, q.device())?.f_logical_not()?;
    let a_fwd = s.f_masked_fill(&blocked, f64::NEG_INFINITY)?.f_softmax(-1, Kind::Float)?;
    let sm = s.f_masked_fill(&blocked, FAR)?;
    let dn = sm.f_logcumsumexp(-2)?;
    let a_rev = sm.f_sub(&dn)?.f_masked_fill(&blocked, f64::NEG_INFINITY)?.f_softmax(-1, Kind::Float)?;
    let a = a_rev.f_add(&a_fwd.f_sub(&a_rev)?.f_mul(&alpha.f_to_kind(Kind::Float)?)?)?;
    let a = if p > 0.0 { a.f_dropout(p, true)? } else { a };
    let y = a.f_matmul(&v.f_to_kind(Kind::Float)?)?.f_to_kind(kind)?;
    let last = dn.f_select(2, t - 1)?;
    Ok((y, a, last))
}

pub fn full(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alpha: &Tensor,
    p: f64,
) -> Result<(Tensor, Tensor), TchError> {
    let (y, a, _) = full_with_norm(q, k, v, alpha, p)?;
    Ok((y, a))
}

/// New queries at `pos0..` over cached keys/values `[0, pos0 + T)`.
pub fn cached(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    alpha: &Tensor,
    pos0: i64,
    col_norm: &mut Option<Tensor>,
    cap: i64,
) -> Result<Tensor, TchError> {
    let sz = query.size();
    let (b, h, t, hs) = (sz[0], sz[1], sz[2], sz[3]);
    if pos0 == 0 && t > 1 {
        let (y, _, last) = full_with_norm(query, key, value, alpha, 0.0)?;
        let _ = cache::write(col_norm, &[b, h, cap], 2, 0, &last)?;
        return Ok(y);
    }
    let kind = value.f_kind()?;
    let alpha = alpha.f_to_kind(Kind::Float)?;
    let mut outs = Vec::with_capacity(t as usize);
    for i in 0..t {
        let pos = pos0 + i;
        let qi = query.f_narrow(2, i, 1)?.f_to_kind(Kind::Float)?;
        let ks = key.f_narrow(2, 0, pos + 1)?.f_to_kind(Kind::Float)?;
        let s = qi.f_matmul(&ks.f_transpose(-2, -1)?)?.f_mul_scalar(1.0 / (hs as f64).sqrt())?; // [B,H,1,pos+1]
        let s_row = s.f_squeeze_dim(2)?;
        let d_new = if pos == 0 {
            s_row.shallow_clone()
        } else {
            let prev = col_norm
                .as_ref()
                .ok_or_else(|| TchError::Shape("sba cache has no column normaliser".into()))?
                .f_narrow(2, 0, pos)?;
            let past = prev.f_logaddexp(&s_row.f_narrow(2, 0, pos)?)?;
            Tensor::f_cat(&[&past, &s_row.f_narrow(2, pos, 1)?], 2)?
        };
        let _ = cache::write(col_norm, &[b, h, cap], 2, 0, &d_new)?;
        let a_fwd = s.f_softmax(-1, Kind::Float)?;
        let a_rev = s.f_sub(&d_new.f_unsqueeze(2)?)?.f_softmax(-1, Kind::Float)?;
        let a = a_rev.f_add(&a_fwd.f_sub(&a_rev)?.f_mul(&alpha)?)?;
        let vs = value.f_narrow(2, 0, pos + 1)?.f_to_kind(Kind::Float)?;
        outs.push(a.f_matmul(&vs)?);
    }
    Tensor::f_cat(&outs, 2)?.f_to_kind(kind)
}
