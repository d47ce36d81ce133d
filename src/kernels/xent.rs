//! The softmax cross-entropy of one chunk of bf16 logits in one kernel
//! (`xent.cu`): the row's loss and, in place of its logits, its weighted
//! gradient `w · (softmax − onehot)`. It replaces the four passes of
//! `loss::linear_cross_entropy`'s libtorch path (to fp32, log-softmax, exp,
//! back to bf16) plus its gather and scatter; that path is the reference.
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

use super::{kernel, launch, same_device, te, Arg};

const SOURCE: &str = include_str!("xent.cu");
const BLOCK: u32 = 512;

/// The source [`super::check`] compiles.
pub fn check_sources() -> Vec<super::check::Source> {
    vec![super::check::Source {
        family: "xent",
        variant: String::new(),
        src: SOURCE.to_string(),
        entries: vec![("xent_bf16", BLOCK)],
    }]
}

/// Whether [`xent_`] takes `logits`: contiguous bf16 rows of even length
/// starting 4-byte aligned (the kernel reads pairs).
pub fn fits(logits: &Tensor) -> bool {
    let s = logits.size();
    logits.kind() == Kind::BFloat16
        && s.len() == 2
        && s[1] % 2 == 0
        && s[1] > 0
        && logits.is_contiguous()
        && (logits.data_ptr() as usize).is_multiple_of(4)
}

/// Overwrite `logits` [R, V] (bf16) with `w_r · (softmax(z_r) − onehot(y_r))`
/// and return the per-row losses `−w_r · log_softmax(z_r)[y_r]` (float32
/// [R]). `y` holds ids (int64 [R]; -1 = ignored, weight 0 expected; any
/// other id outside the row gives that row a NaN loss and is never read),
/// `w` the row weights (float32 [R]).
pub fn xent_(logits: &mut Tensor, y: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !fits(logits) {
        bail!(
            "xent: logits must be contiguous bf16 [rows, even width], got {:?} {:?}",
            logits.kind(),
            logits.size()
        );
    }
    let (rows, v) = (logits.size()[0], logits.size()[1]);
    if y.kind() != Kind::Int64
        || w.kind() != Kind::Float
        || y.numel() as i64 != rows
        || w.numel() as i64 != rows
    {
        bail!("xent: need int64 targets and float32 weights, one per row");
    }
    if rows >= i32::MAX as i64 {
        bail!("xent: {rows} rows are more than one launch takes");
    }
    let dev = logits.device();
    let y = y.f_contiguous().map_err(te)?;
    let w = w.f_contiguous().map_err(te)?;
    same_device(&[&y, &w], dev)?;
    let loss = Tensor::f_empty([rows], (Kind::Float, dev)).map_err(te)?;
    let k = kernel(dev, "xent", SOURCE, "xent_bf16")?;
    launch(
        k,
        rows as u32,
        BLOCK,
        0,
        &[
            Arg::tensor(logits, 0)?,
            Arg::I64(v / 2),
            Arg::tensor(&y, 0)?,
            Arg::tensor(&w, 0)?,
            Arg::tensor(&loss, 0)?,
        ],
    )?;
    Ok(loss)
}
