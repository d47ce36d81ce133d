//! Fitting the V reconstructor of KV-cache pruning
//! (`attention::vrecon` has its math and parameters): the model runs
//! frozen with hooks on each layer's attention input, values and pattern,
//! and only the reconstructor learns, with Adam (docs/attention.md, "The V
//! reconstructor").
use anyhow::{anyhow, bail, Result};
use tch::{Kind, TchError, Tensor};

use super::te;
use crate::attention::kvprune;
use crate::attention::vrecon::{keep_mask, layer_errors, Acts, VRecon};
use crate::hooks::Recorder;
use crate::models::gpt2::Gpt2;
use crate::models::Model;

/// (layers, width, heads) of a built model (its configuration is resolved).
fn shape(model: &Gpt2) -> Result<(i64, i64, i64)> {
    let c = model.cfg();
    match (c.n_layer, c.n_embd, c.n_head) {
        (Some(l), Some(d), Some(h)) if h > 0 => Ok((l, d, h)),
        _ => bail!("vrecon: the model's configuration is not resolved"),
    }
}

/// Fresh reconstructor parameters for `model`'s shape, on its device.
pub fn new_for(model: &Gpt2, seed: i64) -> Result<VRecon> {
    let (l, d, h) = shape(model)?;
    VRecon::new(l, d, h, model.store().device(), seed)
}

/// Was `recon` made for `model`'s shape?
pub fn check(recon: &VRecon, model: &Gpt2) -> Result<()> {
    let (l, d, h) = shape(model)?;
    recon.check(l, d, h)
}

#[derive(Clone, Debug)]
pub struct FitOptions {
    pub steps: i64,
    pub lr: f64,
    /// Sequences per step.
    pub batch: i64,
    pub seed: i64,
}

impl Default for FitOptions {
    fn default() -> Self {
        FitOptions { steps: 200, lr: 1e-3, batch: 8, seed: 0 }
    }
}

/// What a fit did: the loss per step, and at the end, per layer, the
/// relative error ‖ŷ − y‖² / ‖y‖² without and with the reconstructor on
/// the first fitting batch (in-sample; [`output_errors`] on other rows).
#[derive(Clone, Debug, Default)]
pub struct FitReport {
    pub losses: Vec<f64>,
    pub rel_err_plain: Vec<f64>,
    pub rel_err_recon: Vec<f64>,
    pub mean_gate: Vec<f64>,
}

fn record(model: &Gpt2, x: &Tensor) -> Result<Acts> {
    let n = model.n_layer();
    let rec = Recorder::new(
        |name: &str| {
            name.ends_with(".ln1.hook_normalized")
                || name.ends_with(".attn.hook_v")
                || name.ends_with(".attn.hook_pattern")
        },
        None,
    );
    let _ = tch::no_grad(|| model.forward_hooked(x, false, Some(&rec))).map_err(te)?;
    let acts = rec.take();
    let find = |name: String| -> Result<Tensor> {
        acts.iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| t.shallow_clone())
            .ok_or_else(|| anyhow!("vrecon: the forward did not visit {name}"))
    };
    (0..n)
        .map(|l| {
            let x = find(format!("blocks.{l}.ln1.hook_normalized"))?;
            let v = find(format!("blocks.{l}.attn.hook_v"))?.f_transpose(1, 2).map_err(te)?;
            let a = find(format!("blocks.{l}.attn.hook_pattern"))?.f_to_kind(Kind::Float).map_err(te)?;
            Ok((x, v, a))
        })
        .collect()
}

/// Per layer, ‖ŷ − y‖² / ‖y‖² on `tokens` [N, T] without and with `recon`
/// (the errors a fit reports, here on rows of the caller's choosing).
pub fn output_errors(
    model: &Gpt2,
    recon: &VRecon,
    tokens: &Tensor,
    cfg: &kvprune::Config,
) -> Result<(Vec<f64>, Vec<f64>)> {
    check(recon, model)?;
    let x = tokens.f_to_device(model.store().device()).and_then(|x| x.f_to_kind(Kind::Int64)).map_err(te)?;
    let acts = record(model, &x)?;
    let masks = masks_of(&acts, cfg).map_err(te)?;
    errors_on(recon, &acts, &masks).map_err(te)
}

/// The keep mask of every layer's recorded pattern.
fn masks_of(acts: &Acts, cfg: &kvprune::Config) -> Result<Vec<Tensor>, TchError> {
    tch::no_grad(|| acts.iter().map(|(_, _, a)| keep_mask(a, cfg)).collect())
}

/// Per layer, the relative output errors with the true values and with `recon`.
fn errors_on(recon: &VRecon, acts: &Acts, masks: &[Tensor]) -> Result<(Vec<f64>, Vec<f64>), TchError> {
    tch::no_grad(|| Ok((layer_errors(None, acts, masks)?.1, layer_errors(Some(recon), acts, masks)?.1)))
}

/// The entries `live` of `v`.
fn pick<'a>(v: &[&'a Tensor], live: &[usize]) -> Vec<&'a Tensor> {
    live.iter().map(|&i| v[i]).collect()
}

/// Fit a reconstructor for `model` under pruning `cfg` on held-out token
/// rows `tokens` [N, T] (the model is not changed).
pub fn fit(
    model: &Gpt2,
    tokens: &Tensor,
    cfg: &kvprune::Config,
    o: &FitOptions,
) -> Result<(VRecon, FitReport)> {
    cfg.validate()?;
    kvprune::check_spec(model.spec(), &model.cfg().attention)?;
    let shape = tokens.size();
    let [n, t] = shape[..] else { bail!("kv_recon_fit: tokens must be [N, T], got {shape:?}") };
    if n < 1 || t < 2 || t > model.cfg().block_size {
        bail!(
            "kv_recon_fit: tokens must be [N, T] with N >= 1 and 2 <= T <= block_size {}, got {shape:?}",
            model.cfg().block_size
        );
    }
    if o.steps < 0 || o.batch < 1 || !(o.lr > 0.0 && o.lr.is_finite()) {
        bail!(
            "kv_recon_fit: steps must be >= 0, batch >= 1 and lr a positive number (got {}, {}, {})",
            o.steps,
            o.batch,
            o.lr
        );
    }
    let dev = model.store().device();
    let toks = super::token_ids("kv_recon_fit", model, tokens, dev)?;
    let recon = new_for(model, o.seed)?;
    let params = recon.params();
    for p in &params {
        let _ = p.f_set_requires_grad(true).map_err(te)?;
    }
    let zeros = |p: &&Tensor| p.f_zeros_like();
    let m: Vec<Tensor> = params.iter().map(zeros).collect::<Result<_, _>>().map_err(te)?;
    let s: Vec<Tensor> = params.iter().map(zeros).collect::<Result<_, _>>().map_err(te)?;
    // torch.optim.Adam's defaults, through the fused kernel `optim` uses;
    // the step counter goes up before each call, as torch.optim does it.
    let adam = crate::shim::FusedAdam {
        lr: o.lr,
        beta1: 0.9,
        beta2: 0.999,
        weight_decay: 0.0,
        eps: 1e-8,
        amsgrad: false,
        decoupled: false,
    };
    let mut count = Tensor::f_zeros([], (Kind::Float, dev)).map_err(te)?;
    let mut report = FitReport::default();
    let batch = o.batch.min(n);
    let rows = |step: i64| -> Result<Tensor, TchError> {
        let idx: Vec<i64> = (0..batch).map(|k| (step * batch + k) % n).collect();
        toks.f_index_select(0, &Tensor::f_from_slice(&idx)?.f_to_device(dev)?)
    };
    for step in 0..o.steps {
        let acts = record(model, &rows(step).map_err(te)?)?;
        let masks = masks_of(&acts, cfg).map_err(te)?;
        for p in &params {
            let mut g = p.f_grad().map_err(te)?;
            if g.defined() {
                let _ = g.f_zero_().map_err(te)?;
            }
        }
        let (loss, _) = layer_errors(Some(&recon), &acts, &masks).map_err(te)?;
        let lv = loss.f_double_value(&[]).map_err(te)?;
        if !lv.is_finite() {
            bail!("kv_recon_fit: the loss became {lv} at step {step}; lower lr (now {})", o.lr);
        }
        report.losses.push(lv);
        loss.f_backward().map_err(te)?;
        let grads = params.iter().map(|p| p.f_grad()).collect::<Result<Vec<_>, _>>().map_err(te)?;
        // Tensors without a gradient this step are left alone.
        let live: Vec<usize> = (0..params.len()).filter(|&i| grads[i].defined()).collect();
        let (g, mr, sr): (Vec<&Tensor>, Vec<&Tensor>, Vec<&Tensor>) =
            (grads.iter().collect(), m.iter().collect(), s.iter().collect());
        let _ = tch::no_grad(|| count.f_add_scalar_(1)).map_err(te)?;
        let steps = vec![&count; live.len()];
        let (p, g, mr, sr) = (pick(&params, &live), pick(&g, &live), pick(&mr, &live), pick(&sr, &live));
        crate::shim::fused_adam(&p, &g, &mr, &sr, &[], &steps, adam).map_err(|e| anyhow!(e))?;
    }
    for p in &params {
        let _ = p.f_set_requires_grad(false).map_err(te)?;
    }
    // Final report on the first batch (held fixed, comparable across fits).
    let acts = record(model, &rows(0).map_err(te)?)?;
    let masks = masks_of(&acts, cfg).map_err(te)?;
    (report.rel_err_plain, report.rel_err_recon) = errors_on(&recon, &acts, &masks).map_err(te)?;
    report.mean_gate = tch::no_grad(|| {
        acts.iter().enumerate().map(|(l, (x, _, _))| recon.mean_gate(l, x)).collect::<Result<_, _>>()
    })
    .map_err(te)?;
    Ok((recon, report))
}
