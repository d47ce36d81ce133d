//! Reading the residual stream through the unembedding: the logit lens and
//! direct logit attribution (per head and per component).
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

use super::cache::{unembed_dirs, ActivationCache, Stack};
use crate::hooks::{Chain, Hooks, Recorder};
use crate::models::gpt2::Gpt2;
use crate::models::Model;

/// Logits and the activations `filter` accepts, from one forward without
/// gradients; `extra` hooks (the model's own) run first, so the cache
/// holds what the model really computed.
pub fn run_with_cache(
    model: &dyn Model,
    tokens: &Tensor,
    filter: &dyn Fn(&str) -> bool,
    device: Option<tch::Device>,
    extra: Option<&dyn Hooks>,
) -> Result<(Tensor, ActivationCache)> {
    let rec = Recorder::new(filter, device);
    let chain;
    let hooks: &dyn Hooks = match extra {
        Some(e) => {
            chain = Chain(vec![e, &rec]);
            &chain
        }
        None => &rec,
    };
    let x = tokens.f_to_device(model.store().device())?;
    let logits = tch::no_grad(|| model.forward_hooked(&x, false, Some(hooks)))?;
    Ok((logits, ActivationCache::new(rec.take())))
}

/// Apply ln_f (with its own statistics per component) and the unembedding
/// to a stack [.., d_model]: logits [.., vocab].
pub fn unembed(model: &Gpt2, stack: &Tensor) -> Result<Tensor> {
    if model.cfg().embed_latent.is_some() {
        bail!("the logit lens needs a model without latent embeddings");
    }
    let s = model.store();
    let w = s.get("transformer.ln_f.weight").map(|p| p.tensor.shallow_clone());
    let b = s.get("transformer.ln_f.bias").map(|p| p.tensor.shallow_clone());
    let d = stack.size().last().copied().unwrap_or(0);
    let h = stack.f_layer_norm([d], w.as_ref(), b.as_ref(), model.cfg().ln_eps, true)?;
    let bias = s.get("lm_head.bias").map(|p| p.tensor.shallow_clone());
    Ok(h.f_linear(model.lm_head_weight(), bias.as_ref())?)
}

/// The logit lens: log-probabilities [n_layer + 1, batch, pos, vocab] read
/// from the residual stream before each block and after the last.
pub fn logit_lens(model: &Gpt2, tokens: &Tensor, extra: Option<&dyn Hooks>) -> Result<Tensor> {
    let keep = |n: &str| n.ends_with("hook_resid_pre") || n.ends_with("hook_resid_post");
    let (_, cache) = run_with_cache(model, tokens, &keep, None, extra)?;
    let stack = cache.accumulated_resid(model, -1, false)?;
    Ok(tch::no_grad(|| unembed(model, &stack.tensor))?.f_log_softmax(-1, Kind::Float)?)
}

/// Direct logit attribution at position `pos` to `answer` (minus
/// `incorrect` when given): each head's result and each residual
/// component, scaled by ln_final as the model applied it.
pub struct Dla {
    /// [n_layer, n_head, batch]
    pub heads: Tensor,
    /// [components, batch] with `labels`.
    pub components: Stack,
}

pub fn direct_logit_attr(
    model: &Gpt2,
    tokens: &Tensor,
    answer: &Tensor,
    incorrect: Option<&Tensor>,
    pos: i64,
    extra: Option<&dyn Hooks>,
) -> Result<Dla> {
    let (_, cache) = run_with_cache(model, tokens, &|_| true, None, extra)?;
    let t = tokens.size().get(1).copied().unwrap_or(0);
    let p = if pos < 0 { pos + t } else { pos };
    if !(0..t).contains(&p) {
        bail!("direct_logit_attr: pos {pos} out of range for {t} positions");
    }
    let heads = cache.stack_head_results(model, -1)?;
    let hs = cache.apply_ln_to_stack(model, &heads.tensor.f_select(2, p)?, -1, false, Some(p))?;
    let ha = ActivationCache::logit_attrs(model, &hs, answer, incorrect)?;
    let (l, h) = (model.n_layer(), model.cfg().n_head.unwrap_or(1));
    let b = ha.size()[1];
    let comps = cache.decompose_resid(model, -1, false, true)?;
    let cs = cache.apply_ln_to_stack(model, &comps.tensor.f_select(2, p)?, -1, false, Some(p))?;
    let ca = ActivationCache::logit_attrs(model, &cs, answer, incorrect)?;
    let _ = unembed_dirs;
    Ok(Dla { heads: ha.f_view([l, h, b])?, components: Stack { tensor: ca, labels: comps.labels } })
}
