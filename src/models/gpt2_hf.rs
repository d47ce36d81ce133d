//! Hugging Face GPT-2 folders (`config.json` + `model.safetensors`) in and
//! out. `transformers` stores the attention and MLP weights as `Conv1D`
//! ([in, out], the transpose of a Linear's), ties the head to `wte`, and
//! keeps the vocabulary unpadded; buffers `attn.bias`/`attn.masked_bias`
//! of old checkpoints are causal masks and are skipped.
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use super::gpt2::{Config, Gpt2};
use super::Model;

/// Suffixes of the weights stored transposed (`Conv1D`).
const CONV1D: &[&str] = &["attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"];

fn is_conv1d(name: &str) -> bool {
    CONV1D.iter().any(|s| name.ends_with(s))
}

/// The knlp configuration a Hugging Face `config.json` describes.
pub fn config_from_hf(v: &Value, path: &Path) -> Result<Config> {
    let p = path.display();
    let int = |k: &str| -> Result<i64> {
        v.get(k).and_then(Value::as_i64).ok_or_else(|| anyhow!("{p}: '{k}' missing or not an integer"))
    };
    if let Some(t) = v.get("model_type").and_then(Value::as_str) {
        if t != "gpt2" {
            bail!("{p}: model_type is '{t}', only 'gpt2' loads");
        }
    }
    // Options whose non-default values change the computation.
    let unsupported: &[(&str, Value)] = &[
        ("scale_attn_weights", json!(true)),
        ("scale_attn_by_inverse_layer_idx", json!(false)),
        ("reorder_and_upcast_attn", json!(false)),
        ("add_cross_attention", json!(false)),
    ];
    for (k, default) in unsupported {
        if let Some(x) = v.get(*k) {
            if x != default {
                bail!("{p}: {k} = {x} is not supported (only {default})");
            }
        }
    }
    let d = int("n_embd")?;
    if let Some(inner) = v.get("n_inner").and_then(Value::as_i64) {
        if inner != 4 * d {
            bail!("{p}: n_inner = {inner} is not supported (only 4 * n_embd = {})", 4 * d);
        }
    }
    let vocab = int("vocab_size")?;
    let cfg = Config {
        n_layer: Some(int("n_layer")?),
        n_head: Some(int("n_head")?),
        n_embd: Some(d),
        block_size: int("n_positions")?,
        vocab_size: vocab,
        padded_vocab_size: Some(vocab),
        bias: true,
        tie_weights: v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(true),
        activation: v.get("activation_function").and_then(Value::as_str).unwrap_or("gelu_new").to_string(),
        ln_eps: v.get("layer_norm_epsilon").and_then(Value::as_f64).unwrap_or(1e-5),
        ..Config::default()
    };
    cfg.resolve().with_context(|| format!("{p}"))?;
    Ok(cfg)
}

/// Load a Hugging Face GPT-2 folder into a knlp GPT-2 on `device`.
pub fn load_hf(dir: &Path, device: Device) -> Result<Gpt2> {
    let cfg_path = dir.join("config.json");
    let text =
        std::fs::read_to_string(&cfg_path).with_context(|| format!("{}: cannot read", cfg_path.display()))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", cfg_path.display()))?;
    let cfg = config_from_hf(&v, &cfg_path)?;
    let st = dir.join("model.safetensors");
    if !st.exists() {
        bail!(
            "{}: missing (only safetensors weights load; convert pytorch_model.bin with transformers)",
            st.display()
        );
    }
    let loaded = crate::safetensors::load(&st).map_err(|e| anyhow!(e))?;
    let mut model = Gpt2::new(cfg)?;
    let mut named = Vec::new();
    let mut tied_head: Option<Tensor> = None;
    for (name, t) in loaded.tensors {
        let bare = name.strip_prefix("transformer.").unwrap_or(&name);
        if bare.ends_with("attn.bias") && t.dim() == 4 || bare.ends_with("attn.masked_bias") {
            continue; // causal-mask buffers of old checkpoints
        }
        let ours =
            if bare.starts_with("lm_head.") { bare.to_string() } else { format!("transformer.{bare}") };
        if ours == "lm_head.weight" && model.cfg().tie_weights {
            tied_head = Some(t);
            continue;
        }
        let t = if is_conv1d(&ours) && t.dim() == 2 { t.f_transpose(0, 1)?.f_contiguous()? } else { t };
        named.push((ours, t.f_to_kind(Kind::Float)?));
    }
    // A tied config's head, when stored, must be the embedding itself.
    if let (Some(h), Some((_, wte))) = (&tied_head, named.iter().find(|(n, _)| n == "transformer.wte.weight"))
    {
        if h.size() != wte.size() || !h.f_to_kind(Kind::Float)?.f_equal(wte)? {
            bail!(
                "{}: lm_head.weight differs from transformer.wte.weight, but the config ties them",
                st.display()
            );
        }
    }
    model.store_mut().finalize(device)?;
    model.store().load_named(&named, &st.display().to_string())?;
    Ok(model)
}

/// Write `model` as a Hugging Face GPT-2 folder that `transformers` loads
/// (`GPT2LMHeadModel.from_pretrained(dir)`).
pub fn save_hf(model: &Gpt2, dir: &Path) -> Result<()> {
    let c = model.cfg();
    let plain = c.attention == "mha"
        && c.direction.is_none()
        && c.kv.is_none()
        && c.q.is_none()
        && !c.rope.is_some_and(|r| r.on())
        && c.mlp == "gelu"
        && c.embed_latent.is_none()
        && !c.golden_ratio
        && c.mlp_hidden.is_none_or(|h| h == 4 * c.n_embd.unwrap_or(768))
        && c.bias
        && !c.lm_head_bias;
    if !plain {
        bail!(
            "save_hf: only standard GPT-2 (mha attention, GELU MLP, biases, no latent embeddings) has a Hugging Face layout"
        );
    }
    if c.padded_vocab_size != Some(c.vocab_size) {
        bail!(
            "save_hf: the vocabulary is padded ({} rows for {} tokens); build the model with padded_vocab_size = vocab_size",
            c.padded_vocab_size.unwrap_or(0),
            c.vocab_size
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let mut tensors = Vec::new();
    for (name, t) in model.store().named_tensors() {
        let t = t.f_detach()?.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?;
        let t = if is_conv1d(&name) { t.f_transpose(0, 1)?.f_contiguous()? } else { t.f_contiguous()? };
        tensors.push((name, t));
    }
    let refs: Vec<(String, &Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    crate::safetensors::save(&dir.join("model.safetensors"), &refs, &meta, crate::safetensors::Target::OWNED)
        .map_err(|e| anyhow!(e))?;
    let d = c.n_embd.unwrap_or(768);
    let config = json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": c.activation,
        "n_embd": d,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_positions": c.block_size,
        "n_ctx": c.block_size,
        "n_inner": null,
        "vocab_size": c.vocab_size,
        "layer_norm_epsilon": c.ln_eps,
        "tie_word_embeddings": c.tie_weights,
        "attn_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "resid_pdrop": c.dropout,
        "scale_attn_weights": true,
        "initializer_range": 0.02,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "torch_dtype": "float32",
    });
    let cfg_path = dir.join("config.json");
    let tmp = crate::safetensors::temp_path(&cfg_path);
    std::fs::write(&tmp, serde_json::to_string_pretty(&config)? + "\n")
        .with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, &cfg_path).with_context(|| format!("{}: cannot write", cfg_path.display()))?;
    Ok(())
}
