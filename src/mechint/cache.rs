//! An activation cache and TransformerLens's analyses over it: the residual
//! stream accumulated or decomposed by component, per-head results, layer
//! norm applied to a stack, and logit attributions.
use anyhow::{anyhow, bail, Result};
use tch::{Kind, Tensor};

use crate::models::gpt2::Gpt2;
use crate::models::Model;

/// Activations by hook name, in forward order.
#[derive(Default)]
pub struct ActivationCache {
    pub acts: Vec<(String, Tensor)>,
}

/// A stack of residual components [components, ...] and their labels.
pub struct Stack {
    pub tensor: Tensor,
    pub labels: Vec<String>,
}

impl ActivationCache {
    pub fn new(acts: Vec<(String, Tensor)>) -> Self {
        ActivationCache { acts }
    }

    pub fn keys(&self) -> Vec<String> {
        self.acts.iter().map(|(n, _)| n.clone()).collect()
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.acts.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// The activation `name`, or an error saying how to get it.
    pub fn need(&self, name: &str) -> Result<&Tensor> {
        self.get(name).ok_or_else(|| {
            anyhow!(
                "the cache has no '{name}' (run_with_cache without a names filter keeps every hook point)"
            )
        })
    }

    /// Resolve TransformerLens's `layer` argument: `-1` or `n_layer` mean
    /// "after the last block".
    fn layer_or_all(layer: i64, n_layer: i64) -> Result<i64> {
        match layer {
            -1 => Ok(n_layer),
            l if (0..=n_layer).contains(&l) => Ok(l),
            l => bail!("layer {l} is out of range (0..={n_layer}, or -1 for all)"),
        }
    }

    /// The residual stream before block 0, 1, ..., `layer` (the final
    /// residual when `layer` is n_layer or -1), with `blocks.{l}.hook_resid_mid`
    /// between them when `incl_mid`: [components, batch, pos, d_model].
    pub fn accumulated_resid(&self, model: &Gpt2, layer: i64, incl_mid: bool) -> Result<Stack> {
        let n = model.n_layer();
        let layer = Self::layer_or_all(layer, n)?;
        let mut parts = Vec::new();
        let mut labels = Vec::new();
        for l in 0..=layer {
            if l == n {
                parts.push(self.need(&format!("blocks.{}.hook_resid_post", n - 1))?.shallow_clone());
                labels.push("final_post".to_string());
                continue;
            }
            parts.push(self.need(&format!("blocks.{l}.hook_resid_pre"))?.shallow_clone());
            labels.push(format!("{l}_pre"));
            if incl_mid && l < layer {
                if let Some(t) = self.get(&format!("blocks.{l}.hook_resid_mid")) {
                    parts.push(t.shallow_clone());
                    labels.push(format!("{l}_mid"));
                }
            }
        }
        Ok(Stack { tensor: Tensor::f_stack(&parts, 0)?, labels })
    }

    /// The residual stream entering block `layer` (its MLP when `mlp_input`)
    /// split into what wrote it: embeddings, then each earlier block's
    /// attention and MLP outputs: [components, batch, pos, d_model].
    pub fn decompose_resid(
        &self,
        model: &Gpt2,
        layer: i64,
        mlp_input: bool,
        incl_embeds: bool,
    ) -> Result<Stack> {
        let layer = Self::layer_or_all(layer, model.n_layer())?;
        if mlp_input && layer == model.n_layer() {
            bail!(
                "decompose_resid: mlp_input needs a block's layer (0..{}), not the final residual",
                model.n_layer()
            );
        }
        let mut parts = Vec::new();
        let mut labels = Vec::new();
        let mut push = |name: String, label: String| -> Result<()> {
            parts.push(self.need(&name)?.shallow_clone());
            labels.push(label);
            Ok(())
        };
        if incl_embeds {
            push("hook_embed".into(), "embed".into())?;
            push("hook_pos_embed".into(), "pos_embed".into())?;
        }
        for l in 0..layer {
            push(format!("blocks.{l}.hook_attn_out"), format!("{l}_attn_out"))?;
            if self.get(&format!("blocks.{l}.hook_mlp_out")).is_some() || model.cfg().mlp != "none" {
                push(format!("blocks.{l}.hook_mlp_out"), format!("{l}_mlp_out"))?;
            }
        }
        if mlp_input && layer < model.n_layer() {
            push(format!("blocks.{layer}.hook_attn_out"), format!("{layer}_attn_out"))?;
        }
        Ok(Stack { tensor: Tensor::f_stack(&parts, 0)?, labels })
    }

    /// Each head's output written to the residual stream, `z_h · W_O[h]ᵀ`
    /// (the output bias left out, as in TransformerLens), for every head of
    /// blocks before `layer`: [layer·n_head, batch, pos, d_model], labels `L{l}H{h}`.
    pub fn stack_head_results(&self, model: &Gpt2, layer: i64) -> Result<Stack> {
        let layer = Self::layer_or_all(layer, model.n_layer())?;
        let mut parts = Vec::new();
        let mut labels = Vec::new();
        for l in 0..layer {
            let z = self.need(&format!("blocks.{l}.attn.hook_z"))?;
            let w_o = head_w_o(model, l)?;
            let z = z.f_to_kind(w_o.f_kind()?)?;
            // [B, T, H, hs] x [d, H, hs] -> [H, B, T, d]
            let r = Tensor::f_einsum(
                "bthk,dhk->hbtd",
                &[z.shallow_clone(), w_o.f_to_device(z.device())?],
                None::<i64>,
            )?;
            for h in 0..r.size()[0] {
                labels.push(format!("L{l}H{h}"));
            }
            parts.push(r);
        }
        if parts.is_empty() {
            bail!("stack_head_results: layer 0 has no earlier heads");
        }
        Ok(Stack { tensor: Tensor::f_cat(&parts, 0)?, labels })
    }

    /// Scale a stack of residual components by the cached layer-norm scale
    /// of the norm that reads them (`ln_final` when `layer` is n_layer or -1,
    /// else block `layer`'s ln1, or ln2 when `mlp_input`), after centering
    /// each component, as TransformerLens does. `pos` picks one position of
    /// the scale when the stack has no position axis.
    pub fn apply_ln_to_stack(
        &self,
        model: &Gpt2,
        stack: &Tensor,
        layer: i64,
        mlp_input: bool,
        pos: Option<i64>,
    ) -> Result<Tensor> {
        let n = model.n_layer();
        let layer = Self::layer_or_all(layer, n)?;
        if mlp_input && layer == n {
            bail!("apply_ln_to_stack: mlp_input needs a block's layer (0..{n}), not the final norm");
        }
        let name = match (layer == n, mlp_input) {
            (true, _) => "ln_final.hook_scale".to_string(),
            (false, false) => format!("blocks.{layer}.ln1.hook_scale"),
            (false, true) => format!("blocks.{layer}.ln2.hook_scale"),
        };
        let mut scale = self.need(&name)?.shallow_clone();
        if let Some(p) = pos {
            let t = scale.size()[1];
            let p = if p < 0 { p + t } else { p };
            if !(0..t).contains(&p) {
                bail!("apply_ln_to_stack: pos out of range for {t} positions");
            }
            scale = scale.f_select(1, p)?;
        }
        let sd = scale.dim();
        let st = stack.size();
        if st.len() < sd || st[st.len() - sd..st.len() - 1] != scale.size()[..sd - 1] {
            bail!(
                "apply_ln_to_stack: the stack {:?} does not end in the cached scale's batch/pos shape {:?}{}",
                st,
                &scale.size()[..sd - 1],
                if pos.is_none() { " (give pos to pick one position)" } else { "" }
            );
        }
        let centred = stack.f_sub(&stack.f_mean_dim(-1, true, stack.f_kind()?)?)?;
        Ok(centred.f_div(&scale.f_to_device(stack.device())?)?)
    }

    /// Logit attribution of each component: its dot product with the
    /// unembedding direction of `tokens` (minus `incorrect`'s when given).
    /// `tokens` is one id, or ids shaped like the stack's batch (and pos) axes.
    pub fn logit_attrs(
        model: &Gpt2,
        stack: &Tensor,
        tokens: &Tensor,
        incorrect: Option<&Tensor>,
    ) -> Result<Tensor> {
        let mut dirs = unembed_dirs(model, tokens)?;
        if let Some(bad) = incorrect {
            dirs = dirs.f_sub(&unembed_dirs(model, bad)?)?;
        }
        let dirs = dirs.f_to_device(stack.device())?.f_to_kind(stack.f_kind()?)?;
        let (sd, dd) = (stack.dim(), dirs.dim());
        if dd > sd || stack.size()[sd - dd..] != dirs.size()[..] {
            bail!(
                "logit_attrs: tokens {:?} do not match the stack {:?} (give one id, or ids shaped like its batch/pos axes)",
                tokens.size(),
                stack.size()
            );
        }
        Ok(stack.f_mul(&dirs)?.f_sum_dim_intlist(-1, false, stack.f_kind()?)?)
    }
}

/// W_O of layer `l` as [d_model, n_head, d_head].
pub fn head_w_o(model: &Gpt2, l: i64) -> Result<Tensor> {
    let name = format!("transformer.h.{l}.attn.c_proj.weight");
    let w = &model
        .store()
        .get(&name)
        .ok_or_else(|| anyhow!("no {name}: per-head results need a single output projection"))?
        .tensor;
    let (h, d) = (model.cfg().n_head.unwrap_or(1), model.cfg().n_embd.unwrap_or(1));
    if w.size() != [d, d] {
        bail!(
            "per-head results need c_proj [d, d]; this attention variant ({}) has {:?}",
            model.cfg().attention,
            w.size()
        );
    }
    Ok(w.f_view([d, h, d / h])?)
}

/// Rows of the unembedding for `tokens`: [..tokens shape, d_model].
pub fn unembed_dirs(model: &Gpt2, tokens: &Tensor) -> Result<Tensor> {
    if model.cfg().embed_latent.is_some() {
        bail!("logit attribution needs a model without latent embeddings");
    }
    let w = model.lm_head_weight();
    let v = model.vocab();
    let ids = tokens.f_to_kind(Kind::Int64)?.f_to_device(w.device())?;
    if ids.numel() > 0 {
        let (lo, hi) = (ids.f_min()?.f_int64_value(&[])?, ids.f_max()?.f_int64_value(&[])?);
        if lo < 0 || hi >= v {
            bail!("token ids must be in [0, {v}), got {lo}..={hi}");
        }
    }
    Ok(Tensor::f_embedding(w, &ids, -1, false, false)?)
}
