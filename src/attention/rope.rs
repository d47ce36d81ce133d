//! Rotary position embedding (spec 5.3), "rotate_half" convention over the
//! whole head: `inv_freq_i = θ^(-2i/hs)`, angle `pos · inv_freq`, cos/sin
//! tiled twice along the head, `rope(x) = x·cos + rotate_half(x)·sin` with
//! `rotate_half([x1, x2]) = [-x2, x1]`. Used in addition to GPT-2's `wpe`.
//! The cos/sin tables are computed once per (device, dtype, θ, head size)
//! and sliced per call, so a decode step rotates at its true position with
//! a handful of kernels.
use std::cell::RefCell;

use tch::{Device, Kind, TchError, Tensor};

struct Table {
    key: (Device, Kind, u64, i64),
    cos: Tensor,
    sin: Tensor,
    /// [len, 2, hs]: cos, and sin with the first half negated (one gather
    /// per decode step; `apply_at`).
    cos_sin: Tensor,
}

thread_local! {
    static TABLES: RefCell<Vec<Table>> = const { RefCell::new(Vec::new()) };
}

/// cos, sin [len ≥ upto, hs] and cos_sin [len, 2, hs] for positions 0..
/// (grown in powers of two).
fn tables(
    dev: Device,
    kind: Kind,
    theta: f64,
    hs: i64,
    upto: i64,
) -> Result<(Tensor, Tensor, Tensor), TchError> {
    let key = (dev, kind, theta.to_bits(), hs);
    TABLES.with(|cell| {
        let mut all = cell.borrow_mut();
        if let Some(t) = all.iter().find(|t| t.key == key && t.cos.size()[0] >= upto) {
            return Ok((t.cos.shallow_clone(), t.sin.shallow_clone(), t.cos_sin.shallow_clone()));
        }
        let len = (upto.max(64) as u64).next_power_of_two() as i64;
        let half = hs / 2;
        // θ^(-2i/hs) = exp(-ln θ · 2i/hs), in float64 on the CPU for accuracy.
        let idx = Tensor::f_arange(half, (Kind::Double, Device::Cpu))?;
        let inv_freq = idx.f_mul_scalar(-2.0 * theta.ln() / hs as f64)?.f_exp()?;
        let pos = Tensor::f_arange(len, (Kind::Double, Device::Cpu))?;
        let ang = pos.f_unsqueeze(1)?.f_mul(&inv_freq.f_unsqueeze(0)?)?;
        let ang = Tensor::f_cat(&[&ang, &ang], 1)?;
        let (cos, sin) = (ang.f_cos()?, ang.f_sin()?);
        let sign = Tensor::f_cat(
            &[
                Tensor::f_full([half], -1.0, (Kind::Double, Device::Cpu))?,
                Tensor::f_ones([hs - half], (Kind::Double, Device::Cpu))?,
            ],
            0,
        )?;
        let cos_sin = Tensor::f_stack(&[&cos, &sin.f_mul(&sign)?], 1)?.f_to_kind(kind)?.f_to_device(dev)?;
        let cos = cos.f_to_kind(kind)?.f_to_device(dev)?;
        let sin = sin.f_to_kind(kind)?.f_to_device(dev)?;
        all.retain(|t| t.key != key);
        let t = Table {
            key,
            cos: cos.shallow_clone(),
            sin: sin.shallow_clone(),
            cos_sin: cos_sin.shallow_clone(),
        };
        all.push(t);
        Ok((cos, sin, cos_sin))
    })
}

/// The [len ≥ `cap`, 2, hs] table [`apply_at`] reads (cos, and sin with
/// its first half negated), made on first use; the fused absorbed decode
/// step (`kernels::mla`) reads the same one.
pub fn cos_sin(dev: Device, kind: Kind, theta: f64, hs: i64, cap: i64) -> Result<Tensor, TchError> {
    Ok(tables(dev, kind, theta, hs, cap)?.2)
}

/// Rotate `x` [B, H, T, hs] whose rows sit at positions `start..start+T`.
pub fn apply(x: &Tensor, start: i64, theta: f64) -> Result<Tensor, TchError> {
    let size = x.size();
    let (t, hs) = (size[2], size[3]);
    let half = hs / 2;
    let (cos, sin, _) = tables(x.device(), x.f_kind()?, theta, hs, start + t)?;
    let (cos, sin) = (cos.f_narrow(0, start, t)?, sin.f_narrow(0, start, t)?);
    let x1 = x.f_narrow(3, 0, half)?;
    let x2 = x.f_narrow(3, half, hs - half)?;
    let rot = Tensor::f_cat(&[&x2.f_neg()?, &x1], 3)?;
    x.f_mul(&cos)?.f_add(&rot.f_mul(&sin)?)
}

/// Rotate `x` [.., 1, hs] (one token) at the device position `pos` ([1]
/// int64), reading the tables grown to `cap` positions. No host read, so a
/// CUDA graph can record it once the tables exist (an eager call with the
/// same `cap` creates them; inside a capture none is allocated). Four
/// kernels: `rotate_half(x)·sin = roll(x, hs/2)·[−sin, sin]`.
pub fn apply_at(x: &Tensor, pos: &Tensor, cap: i64, theta: f64) -> Result<Tensor, TchError> {
    let hs = *x.size().last().ok_or_else(|| TchError::Shape("rope of a scalar".into()))?;
    let (_, _, cos_sin) = tables(x.device(), x.f_kind()?, theta, hs, cap)?;
    let cs = cos_sin.f_index_select(0, pos)?;
    let (cos, sin) = (cs.f_select(1, 0)?, cs.f_select(1, 1)?);
    let rolled = x.f_roll([hs / 2], [-1])?;
    x.f_mul(&cos)?.f_addcmul(&rolled, &sin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_norms_and_makes_scores_relative() {
        tch::manual_seed(1);
        let q = Tensor::randn([1, 1, 1, 8], (Kind::Float, tch::Device::Cpu));
        let k = Tensor::randn([1, 1, 1, 8], (Kind::Float, tch::Device::Cpu));
        let dot = |a: i64, b: i64| {
            let qa = apply(&q, a, 10000.0).unwrap();
            let kb = apply(&k, b, 10000.0).unwrap();
            (&qa * &kb).sum(Kind::Float).double_value(&[])
        };
        // q_m · k_n depends on m - n only.
        assert!((dot(5, 2) - dot(13, 10)).abs() < 1e-4);
        assert!((dot(0, 0) - (&q * &k).sum(Kind::Float).double_value(&[])).abs() < 1e-5);
        let r = apply(&q, 7, 10000.0).unwrap();
        assert!((r.norm().double_value(&[]) - q.norm().double_value(&[])).abs() < 1e-4);
        // The device-position form rotates the same way.
        let at = apply_at(&q, &Tensor::from_slice(&[7i64]), 100, 10000.0).unwrap();
        assert!(at.allclose(&r, 1e-6, 1e-6, false));
    }
}
