//! TransformerLens's weight processing, each leaving what the model
//! computes unchanged (logits, or log-probabilities for `center_unembed`):
//!
//! - `fold_ln`: a layer norm's weight w and bias b move into the layers
//!   that read it, `W' = W·diag(w)`, `c' = c + W·b`, and the norm keeps only
//!   centering and scaling (w = 1, b = 0). The reading weights are then
//!   centred over their input axis, which changes nothing because the
//!   normalised input has zero mean.
//! - `center_writing_weights`: every weight writing to the residual stream
//!   (W_E, W_pos, each W_O and W_out with their biases) is centred over
//!   d_model; every reader normalises first, which removes the mean anyway.
//! - `center_unembed`: W_U and b_U are centred over the vocabulary, which
//!   shifts every logit of a position by one constant (softmax ignores it).
//!
//! The processed model has an untied head (W_U stops equalling W_Eᵀ) with a
//! bias when `fold_ln` moved ln_f's bias into it.
use anyhow::{anyhow, bail, Result};
use tch::{Kind, Tensor};

use crate::models::gpt2::{Config, Gpt2};
use crate::models::Model;

#[derive(Clone, Copy, Debug, Default)]
pub struct Process {
    pub fold_ln: bool,
    pub center_writing_weights: bool,
    pub center_unembed: bool,
}

fn param(m: &Gpt2, name: &str) -> Result<Tensor> {
    Ok(m.store()
        .get(name)
        .ok_or_else(|| anyhow!("weight processing: no parameter {name}"))?
        .tensor
        .shallow_clone())
}

fn set(dst: &Tensor, value: &Tensor) -> Result<()> {
    let mut d = dst.shallow_clone();
    tch::no_grad(|| d.f_copy_(value))?;
    Ok(())
}

/// Subtract the mean over `dim` in place.
fn center(t: &Tensor, dim: i64) -> Result<()> {
    set(t, &t.f_sub(&t.f_mean_dim(dim, true, Kind::Float)?)?)
}

/// Fold the norm `ln` into the linear map (`w`, `b`) reading it.
fn fold_into(m: &Gpt2, ln: &str, w: &str, b: Option<&str>) -> Result<()> {
    let (lw, weight) = (param(m, &format!("{ln}.weight"))?, param(m, w)?);
    if let (Some(lb), Some(b)) = (m.store().get(&format!("{ln}.bias")), b) {
        let bias = param(m, b)?;
        set(&bias, &bias.f_add(&weight.f_mv(&lb.tensor)?)?)?;
    }
    set(&weight, &weight.f_mul(&lw.f_unsqueeze(0)?)?)?;
    center(&weight, 1)
}

fn reset_ln(m: &Gpt2, ln: &str) -> Result<()> {
    set(&param(m, &format!("{ln}.weight"))?, &Tensor::f_ones([1], (Kind::Float, m.store().device()))?)?;
    if let Some(b) = m.store().get(&format!("{ln}.bias")) {
        set(&b.tensor, &Tensor::f_zeros([1], (Kind::Float, m.store().device()))?)?;
    }
    Ok(())
}

/// A processed copy of `model` (the original is left as it is).
pub fn process(model: &Gpt2, opts: Process) -> Result<Gpt2> {
    let c = model.cfg();
    let supported = c.attention == "mha"
        && c.kv.is_none()
        && c.q.is_none()
        && !c.rope.is_some_and(|r| r.on())
        && matches!(c.mlp.as_str(), "gelu" | "none")
        && c.embed_latent.is_none();
    if !supported {
        bail!(
            "weight processing supports standard GPT-2 attention and MLPs (this model: attention {}, mlp {})",
            c.attention,
            c.mlp
        );
    }
    let cfg =
        Config { tie_weights: false, lm_head_bias: c.lm_head_bias || (opts.fold_ln && c.bias), ..c.clone() };
    let mut out = Gpt2::new(cfg)?;
    out.store_mut().finalize(model.store().device())?;
    // Copy every tensor; the head starts as W_E when the source was tied.
    let mut src = model.store().named_tensors();
    if c.tie_weights {
        src.push(("lm_head.weight".into(), model.lm_head_weight().shallow_clone()));
    }
    for (name, dst) in out.store().named_tensors() {
        match src.iter().find(|(n, _)| *n == name) {
            Some((_, t)) => set(&dst, t)?,
            None if name == "lm_head.bias" => set(&dst, &dst.f_zeros_like()?)?,
            None => bail!("weight processing: {name} has no source"),
        }
    }
    let l = c.n_layer.unwrap_or(0);
    let h = |i: i64, rest: &str| format!("transformer.h.{i}.{rest}");
    let has_mlp = c.mlp != "none";
    let bias = |n: String| if c.bias { Some(n) } else { None };
    if opts.fold_ln {
        for i in 0..l {
            fold_into(
                &out,
                &h(i, "ln_1"),
                &h(i, "attn.c_attn.weight"),
                bias(h(i, "attn.c_attn.bias")).as_deref(),
            )?;
            reset_ln(&out, &h(i, "ln_1"))?;
            if has_mlp {
                fold_into(
                    &out,
                    &h(i, "ln_2"),
                    &h(i, "mlp.c_fc.weight"),
                    bias(h(i, "mlp.c_fc.bias")).as_deref(),
                )?;
                reset_ln(&out, &h(i, "ln_2"))?;
            }
        }
        fold_into(&out, "transformer.ln_f", "lm_head.weight", bias("lm_head.bias".into()).as_deref())?;
        reset_ln(&out, "transformer.ln_f")?;
    }
    if opts.center_writing_weights {
        center(&param(&out, "transformer.wte.weight")?, 1)?;
        center(&param(&out, "transformer.wpe.weight")?, 1)?;
        let mut writers = vec!["attn.c_proj"];
        if has_mlp {
            writers.push("mlp.c_proj");
        }
        for i in 0..l {
            for w in &writers {
                center(&param(&out, &h(i, &format!("{w}.weight")))?, 0)?;
                if c.bias {
                    center(&param(&out, &h(i, &format!("{w}.bias")))?, 0)?;
                }
            }
        }
    }
    if opts.center_unembed {
        center(&param(&out, "lm_head.weight")?, 0)?;
        if let Some(b) = out.store().get("lm_head.bias") {
            center(&b.tensor, 0)?;
        }
    }
    Ok(out)
}
