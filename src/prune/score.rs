//! Importance scores: higher means keep. One table of small functions, each
//! an element-wise expression over whole tensors (or a whole flat buffer),
//! so every scorer runs as a few libtorch kernels.
//!
//! `w` is the weight, `m` Adam's first moment (`exp_avg`) and `v` its second
//! moment (`exp_avg_sq`), neither bias-corrected (`knlp-spec.md` 1.7).
use tch::{Kind, TchError, Tensor};

/// The state a scorer reads.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Needs {
    Weight,
    M,
    V,
    MV,
}

/// (w, m, v, ε) -> score.
type Scorer = fn(&Tensor, Option<&Tensor>, Option<&Tensor>, f64) -> Result<Tensor, TchError>;

/// ε of the formulas in float32, and in float16 (`PRUNING_SCORE_FP16`):
/// 1e-8 is below float16's smallest subnormal (6e-8) and rounds to 0, so the
/// seed's float16 path used 1e-5 (knlp-spec.md 1.7).
pub const EPS: f64 = 1e-8;
pub const EPS_FP16: f64 = 1e-5;

fn m_of(m: Option<&Tensor>) -> Result<&Tensor, TchError> {
    m.ok_or_else(|| TchError::Torch("optimizer moment missing".into()))
}

/// (name, needs, formula, scorer). bitter8/bitter9 get their structural
/// weight applied per tensor by the pruner (see `structure_weight`).
pub const METHODS: &[(&str, Needs, &str, Scorer)] = &[
    ("magnitude", Needs::Weight, "|w|", |w, _, _, _| w.f_abs()),
    ("bitter0", Needs::MV, "w^2 |m| / (sqrt(v) + ε)", |w, m, v, eps| {
        w.f_square()?.f_mul(&m_of(m)?.f_abs()?)?.f_div(&m_of(v)?.f_sqrt()?.f_add_scalar(eps)?)
    }),
    ("bitter1", Needs::Weight, "|w|", |w, _, _, _| w.f_abs()),
    ("bitter2", Needs::Weight, "|w|", |w, _, _, _| w.f_abs()),
    ("bitter3", Needs::M, "|w| sqrt(|m| + ε)", |w, m, _, eps| {
        w.f_abs()?.f_mul(&m_of(m)?.f_abs()?.f_add_scalar(eps)?.f_sqrt()?)
    }),
    ("bitter4", Needs::M, "|w| sqrt(|m| + ε), layer-adaptive threshold", |w, m, _, eps| {
        w.f_abs()?.f_mul(&m_of(m)?.f_abs()?.f_add_scalar(eps)?.f_sqrt()?)
    }),
    ("bitter5", Needs::MV, "sign(w) m / (sqrt(v) + ε) + 0.1 |w|", |w, m, v, eps| {
        let r = w.f_sign()?.f_mul(m_of(m)?)?.f_div(&m_of(v)?.f_sqrt()?.f_add_scalar(eps)?)?;
        r.f_add(&w.f_abs()?.f_mul_scalar(0.1)?)
    }),
    ("bitter6", Needs::MV, "|w| sqrt(|m| + ε) sqrt(m^2 / (v + ε))", |w, m, v, eps| {
        let m = m_of(m)?;
        let a = w.f_abs()?.f_mul(&m.f_abs()?.f_add_scalar(eps)?.f_sqrt()?)?;
        a.f_mul(&m.f_square()?.f_div(&m_of(v)?.f_add_scalar(eps)?)?.f_sqrt()?)
    }),
    ("bitter7", Needs::V, "|w| (|v| + ε)^0.25", |w, _, v, eps| {
        // In place after the first op: one temporary instead of four (this
        // runs over every prunable weight at each mask update).
        let mut t = m_of(v)?.f_abs()?;
        let _ = t.f_add_scalar_(eps)?;
        let _ = t.f_pow_(0.25)?;
        let _ = t.f_mul_(&w.f_abs()?)?;
        Ok(t)
    }),
    ("bitter8", Needs::M, "s |w| sqrt(|m| + ε), s = structural weight", |w, m, _, eps| {
        w.f_abs()?.f_mul(&m_of(m)?.f_abs()?.f_add_scalar(eps)?.f_sqrt()?)
    }),
    ("bitter9", Needs::V, "s |w| (|v|^0.25 + ε), s = structural weight", |w, _, v, eps| {
        w.f_abs()?.f_mul(&m_of(v)?.f_abs()?.f_pow_tensor_scalar(0.25)?.f_add_scalar(eps)?)
    }),
    // The bitter10 family: ε = 1e-12 (the seed's); the tracked ones get
    // their per-tensor factor from bitter10.rs.
    (
        "bitter10",
        Needs::M,
        "α b × coherence of Δw (per tensor), b = |w| sqrt(|m| + 1e-12)",
        |w, m, _, _| base10(w, m_of(m)?),
    ),
    ("bitter10z", Needs::MV, "b |m| / (sqrt(v) + 1e-12)", |w, m, v, _| {
        let m = m_of(m)?;
        base10(w, m)?.f_mul(&m.f_abs()?)?.f_div(&m_of(v)?.f_sqrt()?.f_add_scalar(super::bitter10::EPS)?)
    }),
    ("bitter10s", Needs::MV, "b × sketched m stability (per tensor)", |w, m, _, _| base10(w, m_of(m)?)),
    ("bitter10c", Needs::MV, "b × alignment of m with Δw since a snapshot (per tensor)", |w, m, _, _| {
        base10(w, m_of(m)?)
    }),
];

/// The bitter10 family's base score `|w| sqrt(|m| + 1e-12)`.
fn base10(w: &Tensor, m: &Tensor) -> Result<Tensor, TchError> {
    w.f_abs()?.f_mul(&m.f_abs()?.f_add_scalar(super::bitter10::EPS)?.f_sqrt()?)
}

pub fn names() -> Vec<&'static str> {
    METHODS.iter().map(|m| m.0).collect()
}

pub fn lookup(name: &str) -> Option<&'static (&'static str, Needs, &'static str, Scorer)> {
    METHODS.iter().find(|m| m.0 == name)
}

/// Importance of `w` by `method`; falls back to |w| when a moment the method
/// needs does not exist yet. With `fp16`, w, m and v are rounded to float16
/// (the seed's bitter8 precision trick, for any scorer) and the formula is
/// evaluated in float32 with ε = [`EPS_FP16`]: evaluated in float16, products
/// of small moments underflow and quotients by a flushed v overflow.
pub fn score(
    method: &str,
    w: &Tensor,
    m: Option<&Tensor>,
    v: Option<&Tensor>,
    fp16: bool,
) -> Result<Tensor, TchError> {
    let Some(&(_, needs, _, f)) = lookup(method) else {
        return Err(TchError::Torch(format!("unknown scorer '{method}' (valid: {})", names().join(", "))));
    };
    let missing = match needs {
        Needs::Weight => false,
        Needs::M => m.is_none(),
        Needs::V => v.is_none(),
        Needs::MV => m.is_none() || v.is_none(),
    };
    let cast = |t: &Tensor| match fp16 {
        true => t.f_to_kind(Kind::Half)?.f_to_kind(Kind::Float),
        false => t.f_to_kind(Kind::Float),
    };
    let (w, m, v) = (cast(w)?, m.map(cast).transpose()?, v.map(cast).transpose()?);
    let eps = if fp16 { EPS_FP16 } else { EPS };
    let s = if missing { w.f_abs()? } else { f(&w, m.as_ref(), v.as_ref(), eps)? };
    s.f_to_kind(Kind::Float)
}

/// (name, CUDA expression in `w`, `m`, `v` and `EPS`): the scorers the fused
/// mask update (`kernels::prune`) evaluates itself, written to round
/// exactly as the libtorch ops above do in float32 (each op rounds once,
/// no fused multiply-add, ε rounded to float32 first). The others are
/// computed by libtorch and handed to the fused selection as ready scores.
const CUDA: &[(&str, &str)] = &[
    ("magnitude", "fabsf(w)"),
    ("bitter1", "fabsf(w)"),
    ("bitter2", "fabsf(w)"),
    ("bitter3", "__fmul_rn(fabsf(w), sqrtf(__fadd_rn(fabsf(m), EPS)))"),
    ("bitter7", "__fmul_rn(powf(__fadd_rn(fabsf(v), EPS), 0.25f), fabsf(w))"),
];

/// The CUDA expression of scorer `name` at ε = `eps` (float32 evaluation).
pub fn cuda_expr(name: &str, eps: f64) -> Option<String> {
    let e = CUDA.iter().find(|(n, _)| *n == name)?.1;
    Some(e.replace("EPS", &format!("{:e}f", eps as f32)))
}

/// Every scorer the fused mask update evaluates, as (name, CUDA
/// expression at ε = [`EPS`]): what `kernels::check` compiles.
pub fn cuda_scorers() -> Vec<(String, String)> {
    CUDA.iter().filter_map(|(n, _)| Some((n.to_string(), cuda_expr(n, EPS)?))).collect()
}

/// RATIO structural weight of a GPT-2 tensor for bitter8/bitter9: attention
/// 2.5, MLP 1.0, coupling 3.0, anything else 1.0 (DECISIONS.md). Vanilla
/// GPT-2 has no coupling tensors; names containing `coupling` or R-MLP's
/// `up_low` count as coupling.
pub fn structure_weight(name: &str) -> f64 {
    if name.contains("coupling") || name.contains("up_low") {
        3.0
    } else if name.contains(".attn.") {
        2.5
    } else {
        1.0
    }
}

/// Whether a method applies a structural weight.
pub fn is_structural(method: &str) -> bool {
    matches!(method, "bitter8" | "bitter9")
}
