//! Head detectors on repeated random sequences (Olsson et al. 2022): the
//! average attention each head pays to the position a known mechanism
//! would read.
//!
//! With tokens `[bos?] r_0 .. r_{n-1} r_0 .. r_{n-1}` (offset `o` = 1 with a
//! BOS token, else 0), for query i = o + n + j in the repeated half:
//! - induction: key i − n + 1 (the token after the earlier copy);
//! - duplicate token: key i − n (the earlier copy itself);
//! - previous token: key i − 1 (over every query after the first token).
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use crate::hooks::{Chain, Hooks, Recorder};
use crate::models::Model;

/// The detectors by name.
pub const DETECTORS: &[(&str, Offset)] = &[
    ("induction", Offset::Induction),
    ("duplicate_token", Offset::Duplicate),
    ("previous_token", Offset::Previous),
];

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Offset {
    Induction,
    Duplicate,
    Previous,
}

/// `batch` sequences of `n` random ids in [lo, hi), each repeated twice,
/// after `bos` when given: [batch, (bos) + 2n].
pub fn repeated_tokens(batch: i64, n: i64, lo: i64, hi: i64, bos: Option<i64>, seed: i64) -> Result<Tensor> {
    if batch < 1 || n < 2 || lo < 0 || hi <= lo {
        bail!("repeated_tokens: need batch >= 1, n >= 2 and 0 <= lo < hi, got batch {batch}, n {n}, [{lo}, {hi})");
    }
    tch::manual_seed(seed);
    let r = Tensor::f_randint_low(lo, hi, [batch, n], (Kind::Int64, Device::Cpu))?;
    let mut parts = Vec::new();
    if let Some(b) = bos {
        parts.push(Tensor::f_full([batch, 1], b, (Kind::Int64, Device::Cpu))?);
    }
    parts.push(r.shallow_clone());
    parts.push(r);
    Ok(Tensor::f_cat(&parts, 1)?)
}

/// Score of each head [n_layer, n_head] for `detector` on `tokens`
/// (repeated sequences of period `n` after `offset` leading tokens).
/// `extra` hooks (the model's own) run before the patterns are read.
pub fn head_scores(
    model: &dyn Model,
    tokens: &Tensor,
    detector: &str,
    n: i64,
    offset: i64,
    extra: Option<&dyn Hooks>,
) -> Result<Tensor> {
    let which = DETECTORS.iter().find(|(name, _)| *name == detector).map(|(_, o)| *o).ok_or_else(|| {
        let valid: Vec<&str> = DETECTORS.iter().map(|(n, _)| *n).collect();
        anyhow::anyhow!("unknown head detector '{detector}' (valid: {})", valid.join(", "))
    })?;
    let t = tokens.size().get(1).copied().unwrap_or(0);
    if n < 2 || offset < 0 || offset + 2 * n > t {
        bail!("head_scores: {t} tokens cannot hold {offset} leading tokens and two copies of {n}");
    }
    if let crate::models::Task::LanguageModel { vocab, .. } = model.task() {
        let (lo, hi) = (tokens.f_min()?.f_int64_value(&[])?, tokens.f_max()?.f_int64_value(&[])?);
        if lo < 0 || hi >= vocab {
            bail!("head_scores: token ids must be in [0, {vocab}), got {lo}..={hi}");
        }
    }
    let rec = Recorder::new(|name: &str| name.ends_with(".attn.hook_pattern"), Some(Device::Cpu));
    let x = tokens.f_to_device(model.store().device())?;
    let chain = Chain(extra.into_iter().chain([&rec as &dyn Hooks]).collect());
    let hooks: &dyn Hooks = &chain;
    let _ = tch::no_grad(|| model.forward_hooked(&x, false, Some(hooks)))?;
    let pats = rec.take();
    if pats.is_empty() {
        bail!("head_scores: this model exposes no attention pattern (hook_pattern)");
    }
    let (queries, keys): (Vec<i64>, Vec<i64>) = match which {
        Offset::Induction => (offset + n..offset + 2 * n).map(|i| (i, i - n + 1)).unzip(),
        Offset::Duplicate => (offset + n..offset + 2 * n).map(|i| (i, i - n)).unzip(),
        Offset::Previous => (1..offset + 2 * n).map(|i| (i, i - 1)).unzip(),
    };
    let qi = Tensor::from_slice(&queries);
    let ki = Tensor::from_slice(&keys);
    let mut rows = Vec::new();
    for (_, p) in &pats {
        // p [B, H, T, T] -> p[:, :, q_k, k_k] averaged over batch and pairs.
        let p = p.f_to_kind(Kind::Float)?;
        let sel = p.f_index_select(2, &qi)?; // [B, H, P, T]
        let picked = sel.f_gather(
            3,
            &ki.f_view([1, 1, -1, 1])?.f_expand([sel.size()[0], sel.size()[1], -1, 1], false)?,
            false,
        )?;
        rows.push(picked.f_mean_dim(&[0i64, 2, 3][..], false, Kind::Float)?);
    }
    Ok(Tensor::f_stack(&rows, 0)?)
}
