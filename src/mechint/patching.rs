//! Activation patching (`transformer_lens.patching`) and its gradient
//! approximation, attribution patching.
//!
//! Both take a hook *kind* (`resid_pre`, `attn_out`, `z`, `pattern`, ...)
//! and sweep it over layers, positions and heads:
//! - residual-shaped kinds [B, T, d] give effects [n_layer, pos];
//! - head kinds (`q`, `k`, `v`, `z`) [B, T, H, d_head] give [n_layer, pos, head],
//!   or [n_layer, head] with `all_pos`;
//! - `pattern` / `attn_scores` [B, H, T, T] give [n_layer, head].
use anyhow::{anyhow, bail, Result};
use tch::{Kind, Tensor};

use crate::hooks::{Chain, FnHooks, Hooks, Recorder};
use crate::models::Model;

/// How a kind's activation is laid out.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Layout {
    Resid,
    Heads,
    Pattern,
}

/// (kind, hook name relative to `blocks.{l}.`, layout)
pub const KINDS: &[(&str, &str, Layout)] = &[
    ("resid_pre", "hook_resid_pre", Layout::Resid),
    ("resid_mid", "hook_resid_mid", Layout::Resid),
    ("resid_post", "hook_resid_post", Layout::Resid),
    ("attn_out", "hook_attn_out", Layout::Resid),
    ("mlp_out", "hook_mlp_out", Layout::Resid),
    ("q", "attn.hook_q", Layout::Heads),
    ("k", "attn.hook_k", Layout::Heads),
    ("v", "attn.hook_v", Layout::Heads),
    ("z", "attn.hook_z", Layout::Heads),
    ("pattern", "attn.hook_pattern", Layout::Pattern),
    ("attn_scores", "attn.hook_attn_scores", Layout::Pattern),
];

/// Resolve a kind given as `z`, `hook_z`, `attn.hook_z` or `blocks.3.attn.hook_z`.
pub fn resolve_kind(kind: &str) -> Result<(&'static str, Layout)> {
    let k = kind.trim();
    let k = match k.strip_prefix("blocks.") {
        Some(rest) => rest.split_once('.').map(|(_, r)| r).unwrap_or(rest),
        None => k,
    };
    let k = k.trim_start_matches("attn.").trim_start_matches("hook_");
    KINDS.iter().find(|(n, ..)| *n == k).map(|(_, rel, lay)| (*rel, *lay)).ok_or_else(|| {
        let valid: Vec<&str> = KINDS.iter().map(|(n, ..)| *n).collect();
        anyhow!("patching: unknown hook kind '{kind}' (valid: {})", valid.join(", "))
    })
}

/// Options of a sweep.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sweep {
    /// Head kinds: patch every position of a head at once.
    pub all_pos: bool,
}

fn shape_of(layout: Layout, act: &Tensor, all_pos: bool) -> Result<(i64, i64)> {
    let s = act.size();
    Ok(match (layout, all_pos) {
        (Layout::Resid, _) => (s[1], 0),
        (Layout::Heads, false) => (s[1], s[2]),
        (Layout::Heads, true) => (0, s[2]),
        (Layout::Pattern, _) => (0, s[1]),
    })
}

/// `dst` with the slice selected by (pos, head) copied from `src`.
fn splice(layout: Layout, dst: &Tensor, src: &Tensor, pos: Option<i64>, head: Option<i64>) -> Result<Tensor> {
    let out = dst.f_detach_copy()?;
    let pick = |t: &Tensor| -> Result<Tensor> {
        let mut v = t.shallow_clone();
        let head_dim = if layout == Layout::Pattern { 1 } else { 2 };
        if let Some(h) = head {
            v = v.f_narrow(head_dim, h, 1)?;
        }
        if let Some(p) = pos {
            v = v.f_narrow(1, p, 1)?;
        }
        Ok(v)
    };
    pick(&out)?.f_copy_(&pick(&src.f_to_device(out.device())?.f_to_kind(out.f_kind()?)?)?)?;
    Ok(out)
}

/// Run `corrupted` with the clean activation patched in at each layer ×
/// position (× head) and return `metric(logits)` for each: the effect tensor.
pub fn patch_activation(
    model: &dyn Model,
    clean: &Tensor,
    corrupted: &Tensor,
    kind: &str,
    sweep: Sweep,
    metric: &mut dyn FnMut(&Tensor) -> Result<f64>,
    extra: Option<&dyn Hooks>,
) -> Result<Tensor> {
    if clean.size() != corrupted.size() {
        bail!(
            "patching: clean {:?} and corrupted {:?} tokens must have one shape",
            clean.size(),
            corrupted.size()
        );
    }
    let (rel, layout) = resolve_kind(kind)?;
    let n_layer = n_layers(model)?;
    let names: Vec<String> = (0..n_layer).map(|l| format!("blocks.{l}.{rel}")).collect();
    let known = model.hook_names();
    if let Some(missing) = names.iter().find(|n| !known.contains(n)) {
        bail!("patching: this model has no hook point {missing}");
    }
    let dev = model.store().device();
    let clean = clean.f_to_device(dev)?;
    let corrupted = corrupted.f_to_device(dev)?;
    let rec = Recorder::new(|n| names.iter().any(|x| x == n), None);
    let _ = tch::no_grad(|| model.forward_hooked(&clean, false, Some(&with(extra, &rec))))?;
    let acts = rec.take();
    if acts.len() != names.len() {
        bail!("patching: {} of {} hook points were visited", acts.len(), names.len());
    }
    let (n_pos, n_head) = shape_of(layout, &acts[0].1, sweep.all_pos)?;
    let mut out = Vec::new();
    for (l, (name, clean_act)) in acts.iter().enumerate() {
        let _ = l;
        let cells: Vec<(Option<i64>, Option<i64>)> = match (n_pos, n_head) {
            (p, 0) => (0..p).map(|p| (Some(p), None)).collect(),
            (0, h) => (0..h).map(|h| (None, Some(h))).collect(),
            (p, h) => (0..p).flat_map(|p| (0..h).map(move |h| (Some(p), Some(h)))).collect(),
        };
        for (pos, head) in cells {
            let mut hooks = FnHooks::new();
            hooks
                .add(name.clone(), |_, act| Ok(Some(splice(layout, act, clean_act, pos, head).map_err(te)?)));
            let logits =
                tch::no_grad(|| model.forward_hooked(&corrupted, false, Some(&with(extra, &hooks))))?;
            out.push(metric(&logits)?);
        }
    }
    let dims: Vec<i64> = [n_layer, n_pos, n_head].into_iter().filter(|&d| d > 0).collect();
    Ok(Tensor::from_slice(&out).f_view(&dims[..])?)
}

/// The model's own hooks (when any) before `h`.
fn with<'a>(extra: Option<&'a dyn Hooks>, h: &'a dyn Hooks) -> Chain<'a> {
    Chain(extra.into_iter().chain([h]).collect())
}

fn te(e: anyhow::Error) -> tch::TchError {
    tch::TchError::Shape(format!("{e:#}"))
}

fn n_layers(model: &dyn Model) -> Result<i64> {
    let names = model.hook_names();
    let n = names.iter().filter(|n| n.ends_with(".hook_resid_pre")).count() as i64;
    if n == 0 {
        bail!("patching needs a model with hook points (GPT-2)");
    }
    Ok(n)
}

/// Attribution patching: one forward and backward on `corrupted` gives
/// `(clean_act − corrupted_act) · ∂metric/∂act`, summed over batch and the
/// feature axis, in the same layout as [`patch_activation`]. `metric` must
/// return a differentiable scalar tensor.
pub fn attribution_patch(
    model: &dyn Model,
    clean: &Tensor,
    corrupted: &Tensor,
    kind: &str,
    sweep: Sweep,
    metric: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    extra: Option<&dyn Hooks>,
) -> Result<Tensor> {
    if clean.size() != corrupted.size() {
        bail!(
            "patching: clean {:?} and corrupted {:?} tokens must have one shape",
            clean.size(),
            corrupted.size()
        );
    }
    let (rel, layout) = resolve_kind(kind)?;
    let n_layer = n_layers(model)?;
    let names: Vec<String> = (0..n_layer).map(|l| format!("blocks.{l}.{rel}")).collect();
    let dev = model.store().device();
    let clean = clean.f_to_device(dev)?;
    let corrupted = corrupted.f_to_device(dev)?;
    let rec = Recorder::new(|n| names.iter().any(|x| x == n), None);
    let _ = tch::no_grad(|| model.forward_hooked(&clean, false, Some(&with(extra, &rec))))?;
    let clean_acts = rec.take();
    // A zero leaf added at each point: its gradient is the activation's,
    // and the graph upstream stays whole.
    let leaves = std::cell::RefCell::new(Vec::<(Tensor, Tensor)>::new());
    let mut hooks = FnHooks::new();
    for name in &names {
        hooks.add(name.clone(), |_, act| {
            let z = act.f_zeros_like()?.f_set_requires_grad(true)?;
            leaves.borrow_mut().push((act.f_detach()?, z.shallow_clone()));
            Ok(Some(act.f_add(&z)?))
        });
    }
    let logits = model.forward_hooked(&corrupted, false, Some(&with(extra, &hooks)))?;
    let m = metric(&logits)?;
    if m.numel() != 1 {
        bail!("attribution patching: the metric must return a scalar tensor, got shape {:?}", m.size());
    }
    if !m.requires_grad() {
        bail!("attribution patching: the metric's result does not depend on the logits (no gradient)");
    }
    drop(hooks);
    let leaves = leaves.into_inner();
    if leaves.len() != names.len() {
        bail!("attribution patching: {} of {} hook points were visited", leaves.len(), names.len());
    }
    let zs: Vec<&Tensor> = leaves.iter().map(|(_, z)| z).collect();
    let grads = Tensor::f_run_backward(&[m.f_reshape([])?], &zs, false, false)?;
    let mut out = Vec::new();
    for ((corr, _), (grad, (_, clean_act))) in leaves.iter().zip(grads.iter().zip(clean_acts.iter())) {
        // Masked scores are -inf in both runs: their difference is 0, not NaN.
        let diff = clean_act.f_to_kind(Kind::Float)?.f_sub(&corr.f_to_kind(Kind::Float)?)?;
        let e = diff.f_nan_to_num(0.0, 0.0, 0.0)?.f_mul(&grad.f_to_kind(Kind::Float)?)?;
        let e = match (layout, sweep.all_pos) {
            (Layout::Resid, _) => e.f_sum_dim_intlist(&[0i64, 2][..], false, Kind::Float)?,
            (Layout::Heads, false) => e.f_sum_dim_intlist(&[0i64, 3][..], false, Kind::Float)?,
            (Layout::Heads, true) => e.f_sum_dim_intlist(&[0i64, 1, 3][..], false, Kind::Float)?,
            (Layout::Pattern, _) => e.f_sum_dim_intlist(&[0i64, 2, 3][..], false, Kind::Float)?,
        };
        out.push(e.f_detach()?.f_to_device(tch::Device::Cpu)?);
    }
    Ok(Tensor::f_stack(&out, 0)?)
}
