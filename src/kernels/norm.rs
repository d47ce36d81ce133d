//! Residual add + layer norm under bf16 autocast in one kernel each way
//! (`norm.cu`), for GPT-2's `x + branch` followed by a layer norm whose
//! output feeds a linear. libtorch runs that as four kernels forward (the
//! add, the float32 layer norm, the cast to bf16 the linear makes, and the
//! branch's cast) and more backward; these read the residual once and write
//! the bf16 input of the linear directly. [`reference_forward`] and
//! [`reference_backward`] compute the same with libtorch ops: the CPU path,
//! the fallback, and what the GPU test compares against.
//!
//! Off unless asked for (`KNLP_FUSED_LN=1`, or [`set_enabled`]) until it has
//! been measured on a GPU.
use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use super::{contiguous_of, grid_for, kernel, launch, same_device, te, Arg, OptIn};

const SOURCE: &str = include_str!("norm.cu");
/// Rows per forward block (one warp each).
const FWD_WARPS: i64 = 8;
/// Warps per backward block: `WARPS` in norm.cu.
const BWD_WARPS: i64 = 4;
/// The widest row the kernels take, GPT-2 medium's 1024: a row lives in
/// registers, and the backward needs 212 per thread at 1024 on sm_90;
/// 1280 would need 246 (255 on sm_80) and 1600 spills (`knlp kernels`).
pub const MAX_COLS: i64 = 1024;

/// Whether the kernels take rows of `c` floats: a positive multiple of 4
/// (float4 loads) up to [`MAX_COLS`].
pub fn takes_width(c: i64) -> bool {
    c > 0 && c % 4 == 0 && c <= MAX_COLS
}

static SWITCH: OptIn = OptIn::new("KNLP_FUSED_LN");

/// Whether models use the fused residual add + layer norm where it applies.
pub fn enabled() -> bool {
    SWITCH.enabled()
}

pub fn set_enabled(on: bool) {
    SWITCH.set(on);
}

/// The kernel source for rows of `cols` floats (compiled once per width).
fn source(cols: i64) -> &'static str {
    static SOURCES: Mutex<Option<HashMap<i64, &'static str>>> = Mutex::new(None);
    let mut g = SOURCES.lock().unwrap_or_else(|e| e.into_inner());
    g.get_or_insert_with(HashMap::new)
        .entry(cols)
        .or_insert_with(|| Box::leak(format!("#define COLS {cols}\n{SOURCE}").into_boxed_str()))
}

/// The sources [`super::check`] compiles: the test widths, GPT-2 124M's
/// 768, and the widest row taken.
pub fn check_sources() -> Vec<super::check::Source> {
    [64, 768, 1020, MAX_COLS]
        .into_iter()
        .map(|c| super::check::Source {
            family: "norm",
            variant: format!("COLS {c}"),
            src: source(c).to_string(),
            entries: vec![("add_ln_fwd", (32 * FWD_WARPS) as u32), ("add_ln_bwd", (32 * BWD_WARPS) as u32)],
        })
        .collect()
}

fn aligned(t: &Tensor, bytes: usize) -> bool {
    (t.data_ptr() as usize).is_multiple_of(bytes)
}

/// Whether the kernels take `x` (float32 residual) and `a` (bf16 branch):
/// CUDA, contiguous, the same shape, a row width that is a multiple of 4
/// and at most [`MAX_COLS`], rows aligned for 16- and 8-byte loads.
pub fn fits(x: &Tensor, a: &Tensor) -> bool {
    let s = x.size();
    let Some(&c) = s.last() else { return false };
    matches!(x.device(), Device::Cuda(_))
        && a.device() == x.device()
        && x.kind() == Kind::Float
        && a.kind() == Kind::BFloat16
        && a.size() == s
        && takes_width(c)
        && x.is_contiguous()
        && a.is_contiguous()
        && aligned(x, 16)
        && aligned(a, 8)
}

/// A parameter vector as the kernels read it: float32, contiguous, 16-byte
/// aligned (a view into a flat parameter buffer may not be; then a copy).
fn param(t: &Tensor, c: i64, what: &str) -> Result<Tensor> {
    if t.kind() != Kind::Float || t.size() != [c] {
        bail!("add_ln: {what} must be float32 [{c}], got {:?} {:?}", t.kind(), t.size());
    }
    if t.is_contiguous() && aligned(t, 16) {
        Ok(t.shallow_clone())
    } else {
        t.f_detach_copy().map_err(te)
    }
}

/// The forward's outputs: the new residual `x1 = x + a` (float32), the
/// normalised `y` (bf16 from the kernel), and each row's mean and
/// 1/sqrt(var + eps) (float32 [rows]).
pub struct Forward {
    pub x1: Tensor,
    pub y: Tensor,
    pub mean: Tensor,
    pub rstd: Tensor,
}

/// The backward's outputs: the gradient of `x` (float32, the incoming
/// `gx1` included), of `a` (in `a`'s dtype), of the weight and of the bias.
pub struct Backward {
    pub gx: Tensor,
    pub ga: Tensor,
    pub gw: Tensor,
    pub gb: Option<Tensor>,
}

/// The fused forward on CUDA ([`fits`] must hold).
pub fn forward(x: &Tensor, a: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64) -> Result<Forward> {
    if !fits(x, a) {
        bail!("add_ln: the kernel does not take {:?} {:?} + {:?}", x.kind(), x.size(), a.kind());
    }
    let dev = x.device();
    let c = *x.size().last().unwrap_or(&1);
    let rows = x.numel() as i64 / c;
    let w = param(w, c, "the weight")?;
    let b = b.map(|b| param(b, c, "the bias")).transpose()?;
    same_device(&[&w], dev)?;
    if let Some(b) = &b {
        same_device(&[b], dev)?;
    }
    let x1 = x.f_empty_like().map_err(te)?;
    let y = Tensor::f_empty(x.size(), (Kind::BFloat16, dev)).map_err(te)?;
    let mean = Tensor::f_empty([rows], (Kind::Float, dev)).map_err(te)?;
    let rstd = Tensor::f_empty([rows], (Kind::Float, dev)).map_err(te)?;
    let k = kernel(dev, "norm", source(c), "add_ln_fwd")?;
    let grid = u32::try_from((rows + FWD_WARPS - 1) / FWD_WARPS)?;
    launch(
        k,
        grid,
        (32 * FWD_WARPS) as u32,
        0,
        &[
            Arg::tensor(x, 0)?,
            Arg::tensor(a, 0)?,
            Arg::tensor(&w, 0)?,
            b.as_ref().map_or(Ok(Arg::null()), |b| Arg::tensor(b, 0))?,
            Arg::F32(eps as f32),
            Arg::I64(rows),
            Arg::tensor(&x1, 0)?,
            Arg::tensor(&y, 0)?,
            Arg::tensor(&mean, 0)?,
            Arg::tensor(&rstd, 0)?,
        ],
    )?;
    Ok(Forward { x1, y, mean, rstd })
}

/// The fused backward on CUDA: `gy` the gradient of `y` (bf16), `gx1` that
/// of `x1` from its other uses (None: zero). `a`'s gradient is bf16.
pub fn backward(
    gx1: Option<&Tensor>,
    gy: &Tensor,
    x1: &Tensor,
    w: &Tensor,
    has_bias: bool,
    mean: &Tensor,
    rstd: &Tensor,
) -> Result<Backward> {
    let dev = x1.device();
    let gy = gy.f_to_kind(Kind::BFloat16).map_err(te)?.f_contiguous().map_err(te)?;
    if !fits(x1, &gy) {
        bail!("add_ln: the backward kernel does not take {:?} {:?}", x1.kind(), x1.size());
    }
    let gx1 = match gx1 {
        Some(g)
            if g.kind() == Kind::Float && g.is_contiguous() && aligned(g, 16) && g.size() == x1.size() =>
        {
            Some(g.shallow_clone())
        }
        Some(g) => Some(
            g.f_to_kind(Kind::Float).map_err(te)?.f_contiguous().map_err(te)?.f_detach_copy().map_err(te)?,
        ),
        None => None,
    };
    let c = *x1.size().last().unwrap_or(&1);
    let rows = x1.numel() as i64 / c;
    let w = param(w, c, "the weight")?;
    same_device(&[&w, mean, rstd], dev)?;
    contiguous_of(mean, Kind::Float, "add_ln: the row means")?;
    contiguous_of(rstd, Kind::Float, "add_ln: the row rstd")?;
    if mean.numel() as i64 != rows || rstd.numel() as i64 != rows {
        bail!("add_ln: need one mean and rstd per row ({rows})");
    }
    let grid = grid_for(dev, rows, BWD_WARPS as u32)?;
    let gx = x1.f_empty_like().map_err(te)?;
    let ga = gy.f_empty_like().map_err(te)?;
    let parts = Tensor::f_empty([2, grid as i64, c], (Kind::Float, dev)).map_err(te)?;
    let k = kernel(dev, "norm", source(c), "add_ln_bwd")?;
    launch(
        k,
        grid,
        (32 * BWD_WARPS) as u32,
        0,
        &[
            gx1.as_ref().map_or(Ok(Arg::null()), |g| Arg::tensor(g, 0))?,
            Arg::tensor(&gy, 0)?,
            Arg::tensor(x1, 0)?,
            Arg::tensor(&w, 0)?,
            Arg::tensor(mean, 0)?,
            Arg::tensor(rstd, 0)?,
            Arg::I64(rows),
            Arg::tensor(&gx, 0)?,
            Arg::tensor(&ga, 0)?,
            Arg::tensor(&parts, 0)?,
            Arg::tensor(&parts, grid as i64 * c)?,
        ],
    )?;
    let sums = parts.f_sum_dim_intlist(1, false, Kind::Float).map_err(te)?;
    let gw = sums.f_get(0).map_err(te)?;
    let gb = if has_bias { Some(sums.f_get(1).map_err(te)?) } else { None };
    Ok(Backward { gx, ga, gw, gb })
}

/// [`forward`] with libtorch ops, for any device and dtypes: `y` in
/// `y_kind`.
pub fn reference_forward(
    x: &Tensor,
    a: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    eps: f64,
    y_kind: Kind,
) -> Result<Forward> {
    let c = *x.size().last().unwrap_or(&1);
    let x1 = x.f_add(a).map_err(te)?;
    let (y, mean, rstd) = Tensor::f_native_layer_norm(&x1, [c], Some(w), b, eps).map_err(te)?;
    let rows = x1.numel() as i64 / c.max(1);
    Ok(Forward {
        x1,
        y: y.f_to_kind(y_kind).map_err(te)?,
        mean: mean.f_reshape([rows]).map_err(te)?,
        rstd: rstd.f_reshape([rows]).map_err(te)?,
    })
}

/// [`backward`] with libtorch ops; `a`'s gradient in `a_kind`. With
/// `xhat = (x1 − mean)·rstd` and `g = gy·w`:
/// `dx = rstd·(g − mean(g) − xhat·mean(g·xhat))` over each row,
/// `gw = Σ_rows gy·xhat`, `gb = Σ_rows gy`.
#[allow(clippy::too_many_arguments)]
pub fn reference_backward(
    gx1: Option<&Tensor>,
    gy: &Tensor,
    x1: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    mean: &Tensor,
    rstd: &Tensor,
    a_kind: Kind,
) -> Result<Backward> {
    let s = x1.size();
    let c = *s.last().unwrap_or(&1);
    let rows = x1.numel() as i64 / c.max(1);
    let x = x1.f_reshape([rows, c]).map_err(te)?;
    let gy = gy.f_to_kind(x1.kind()).map_err(te)?.f_reshape([rows, c]).map_err(te)?;
    let mean = mean.f_reshape([rows, 1]).map_err(te)?;
    let rstd = rstd.f_reshape([rows, 1]).map_err(te)?;
    let xhat = x.f_sub(&mean).map_err(te)?.f_mul(&rstd).map_err(te)?;
    let g = gy.f_mul(w).map_err(te)?;
    let c1 = g.f_mean_dim(-1, true, x1.kind()).map_err(te)?;
    let c2 = g.f_mul(&xhat).map_err(te)?.f_mean_dim(-1, true, x1.kind()).map_err(te)?;
    let dx = g
        .f_sub(&c1)
        .map_err(te)?
        .f_sub(&xhat.f_mul(&c2).map_err(te)?)
        .map_err(te)?
        .f_mul(&rstd)
        .map_err(te)?
        .f_reshape(&s)
        .map_err(te)?;
    let gw = gy.f_mul(&xhat).map_err(te)?.f_sum_dim_intlist(0, false, x1.kind()).map_err(te)?;
    let gb = match b {
        Some(_) => Some(gy.f_sum_dim_intlist(0, false, x1.kind()).map_err(te)?),
        None => None,
    };
    let gx = match gx1 {
        Some(g) => dx.f_add(g).map_err(te)?,
        None => dx,
    };
    let ga = gx.f_to_kind(a_kind).map_err(te)?;
    Ok(Backward { gx, ga, gw, gb })
}
