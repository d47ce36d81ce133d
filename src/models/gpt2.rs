//! GPT-2 in the nanoGPT architecture (`gpt2/model.py` of the Python knlp),
//! with Hugging Face parameter names.
//!
//! ```text
//! x = wte(tokens) + wpe[0..T]; dropout
//! n_layer × { x += attn(ln_1(x)); x += mlp(ln_2(x)) }        pre-LN blocks
//!   attn: c_attn Linear(d→3d) → q, k, v in n_head heads → causal SDPA
//!         → c_proj Linear(d→d) → dropout
//!   mlp:  c_fc Linear(d→4d) → GELU (exact) → c_proj Linear(4d→d) → dropout
//! logits = ln_f(x) · wteᵀ                                       (tied head)
//! ```
//!
//! Init (nanoGPT): Linear and Embedding weights N(0, 0.02), biases 0,
//! LayerNorm 1 and 0, then every `*.c_proj.weight` N(0, 0.02/√(2·n_layer)).
//! The 124M preset (bias, vocab padded to 50304) has 124,475,904 parameters.
use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, TchError, Tensor};

use super::{Model, Task};
use crate::layers::{Embedding, LayerNorm, Linear, Path};
use crate::params::{Init, ParamStore};
use crate::tensor::{kind_name, SizeChecked};

/// Standard deviation of every Linear and Embedding weight at init.
pub const INIT_STD: f64 = 0.02;
/// The vocabulary is padded up to a multiple of this (faster matmuls).
pub const VOCAB_MULTIPLE: i64 = 64;

/// Named sizes: (names, n_layer, n_head, n_embd).
pub const PRESETS: &[(&[&str], i64, i64, i64)] = &[
    (&["gpt2", "124M"], 12, 12, 768),
    (&["gpt2-medium", "350M"], 24, 16, 1024),
    (&["gpt2-large", "774M"], 36, 20, 1280),
    (&["gpt2-xl", "1558M"], 48, 25, 1600),
];

/// GPT-2 hyperparameters. Sizes come from `preset` or from `n_layer`,
/// `n_head` and `n_embd` (missing ones default to the 124M model's); a size
/// given together with a preset must agree with it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `gpt2`/`124M`, `gpt2-medium`/`350M`, `gpt2-large`/`774M`, `gpt2-xl`/`1558M`.
    pub preset: Option<String>,
    pub n_layer: Option<i64>,
    pub n_head: Option<i64>,
    pub n_embd: Option<i64>,
    /// Longest sequence (rows of `wpe`).
    pub block_size: i64,
    /// Tokens of the tokenizer (50257 for GPT-2's BPE).
    pub vocab_size: i64,
    /// Rows of `wte` and logits per position: `vocab_size` rounded up to a
    /// multiple of 64 unless given (give `vocab_size` itself for no padding,
    /// e.g. to load Hugging Face weights).
    pub padded_vocab_size: Option<i64>,
    pub dropout: f64,
    /// Biases in Linear and LayerNorm layers.
    pub bias: bool,
    /// Share `lm_head.weight` with `transformer.wte.weight`.
    pub tie_weights: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            preset: None,
            n_layer: None,
            n_head: None,
            n_embd: None,
            block_size: 1024,
            vocab_size: 50257,
            padded_vocab_size: None,
            dropout: 0.0,
            bias: true,
            tie_weights: true,
        }
    }
}

/// Look a preset up by any of its names (case-insensitive).
fn find_preset(name: &str) -> Result<(&'static str, i64, i64, i64)> {
    let lower = name.trim().to_ascii_lowercase();
    PRESETS
        .iter()
        .find(|(names, ..)| names.iter().any(|n| n.to_ascii_lowercase() == lower))
        .map(|(names, l, h, d)| (names[0], *l, *h, *d))
        .ok_or_else(|| {
            let valid: Vec<String> = PRESETS.iter().map(|(n, ..)| n.join("/")).collect();
            anyhow!("gpt2: unknown preset '{name}' (valid: {})", valid.join(", "))
        })
}

impl Config {
    /// A preset's configuration with the remaining defaults.
    pub fn preset(name: &str) -> Result<Self> {
        Config { preset: Some(name.to_string()), ..Config::default() }.resolve()
    }

    /// A custom size with the remaining defaults.
    pub fn custom(n_layer: i64, n_head: i64, n_embd: i64) -> Self {
        Config { n_layer: Some(n_layer), n_head: Some(n_head), n_embd: Some(n_embd), ..Config::default() }
    }

    /// The fully specified, validated configuration: preset applied (and
    /// named canonically), every size and the padded vocabulary filled in.
    pub fn resolve(&self) -> Result<Config> {
        let mut sizes =
            [("n_layer", self.n_layer, 12), ("n_head", self.n_head, 12), ("n_embd", self.n_embd, 768)];
        let preset = match &self.preset {
            Some(name) => {
                let (canon, l, h, d) = find_preset(name)?;
                for ((field, given, default), value) in sizes.iter_mut().zip([l, h, d]) {
                    if let Some(g) = given.filter(|&g| g != value) {
                        bail!(
                            "gpt2: preset '{canon}' has {field} {value}; {field} {g} contradicts it \
                             (give one or the other)"
                        );
                    }
                    *default = value;
                }
                Some(canon.to_string())
            }
            None => None,
        };
        let [l, h, d] = sizes.map(|(_, given, default)| given.unwrap_or(default));
        let padded = self
            .padded_vocab_size
            .unwrap_or((self.vocab_size.max(1) + VOCAB_MULTIPLE - 1) / VOCAB_MULTIPLE * VOCAB_MULTIPLE);
        let positive = [("n_layer", l), ("n_head", h), ("n_embd", d), ("block_size", self.block_size)];
        for (field, v) in positive.into_iter().chain([("vocab_size", self.vocab_size)]) {
            if v < 1 {
                bail!("gpt2: {field} must be at least 1, got {v}");
            }
        }
        if d % h != 0 {
            bail!("gpt2: n_embd ({d}) must be a multiple of n_head ({h})");
        }
        if padded < self.vocab_size {
            bail!("gpt2: padded_vocab_size ({padded}) is smaller than vocab_size ({})", self.vocab_size);
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("gpt2: dropout must be in [0, 1), got {}", self.dropout);
        }
        Ok(Config {
            preset,
            n_layer: Some(l),
            n_head: Some(h),
            n_embd: Some(d),
            padded_vocab_size: Some(padded),
            ..self.clone()
        })
    }

    /// Trainable parameters of the model this configuration builds, tied
    /// weights counted once; `non_embedding` leaves out the position
    /// embeddings (nanoGPT's convention).
    pub fn num_params(&self, non_embedding: bool) -> Result<i64> {
        let r = self.resolve()?;
        let (l, d, v) = (r.n_layer.unwrap_or(0), r.n_embd.unwrap_or(0), r.padded_vocab_size.unwrap_or(0));
        let b = r.bias as i64;
        let ln = d + b * d;
        let block = 2 * ln
            + (3 * d * d + b * 3 * d)
            + (d * d + b * d)
            + (4 * d * d + b * 4 * d)
            + (4 * d * d + b * d);
        let wpe = if non_embedding { 0 } else { r.block_size * d };
        let head = if r.tie_weights { 0 } else { v * d };
        Ok(v * d + wpe + l * block + ln + head)
    }
}

struct Attention {
    c_attn: Linear,
    c_proj: Linear,
}

struct Mlp {
    c_fc: Linear,
    c_proj: Linear,
}

struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

/// What a forward pass needs besides the weights.
#[derive(Clone, Copy)]
struct Step {
    b: i64,
    t: i64,
    n_head: i64,
    n_embd: i64,
    /// Dropout probability in effect (0 in eval mode).
    p: f64,
}

fn dropout(x: Tensor, p: f64) -> Result<Tensor, TchError> {
    if p > 0.0 {
        x.f_dropout(p, true)
    } else {
        Ok(x)
    }
}

impl Attention {
    fn forward(&self, x: &Tensor, s: Step) -> Result<Tensor, TchError> {
        let hs = s.n_embd / s.n_head;
        let qkv = self.c_attn.forward(x)?.f_split(s.n_embd, 2)?;
        // Views only: [B, T, C] slices → [B, n_head, T, hs].
        let heads = |t: &Tensor| t.f_view([s.b, s.t, s.n_head, hs])?.f_transpose(1, 2);
        let (q, k, v) = (heads(&qkv[0])?, heads(&qkv[1])?, heads(&qkv[2])?);
        let y = Tensor::f_scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, s.p, true, None, false)?;
        // The one copy: heads back side by side for the output projection.
        let y = y.f_transpose(1, 2)?.f_contiguous()?.f_view([s.b, s.t, s.n_embd])?;
        dropout(self.c_proj.forward(&y)?, s.p)
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor, s: Step) -> Result<Tensor, TchError> {
        let h = self.c_fc.forward(x)?.f_gelu("none")?;
        dropout(self.c_proj.forward(&h)?, s.p)
    }
}

impl Block {
    fn forward(&self, x: &Tensor, s: Step) -> Result<Tensor, TchError> {
        // Out of place: `x` is saved by the layer norm for backward, and the
        // branch output may be a view (`linear` folds [B, T] into one dim),
        // which in-place autograd would make copy in backward.
        let x = x.f_add(&self.attn.forward(&self.ln_1.forward(x)?, s)?)?;
        x.f_add(&self.mlp.forward(&self.ln_2.forward(&x)?, s)?)
    }
}

pub struct Gpt2 {
    cfg: Config,
    n_layer: i64,
    n_head: i64,
    n_embd: i64,
    vocab: i64,
    store: ParamStore,
    wte: Embedding,
    wpe: Embedding,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    /// `wte.weight` itself when tied.
    lm_head: Tensor,
}

impl Gpt2 {
    /// Build the parameters on the CPU; the caller finalizes the store.
    pub fn new(cfg: Config) -> Result<Self> {
        let cfg = cfg.resolve()?;
        let (l, h, d) = (cfg.n_layer.unwrap_or(0), cfg.n_head.unwrap_or(0), cfg.n_embd.unwrap_or(0));
        let vocab = cfg.padded_vocab_size.unwrap_or(0);
        let mut s = ParamStore::new();
        let tr = Path::root("transformer");
        let wte = Embedding::new(&mut s, &tr.sub("wte"), vocab, d, INIT_STD)?;
        let wpe = Embedding::new(&mut s, &tr.sub("wpe"), cfg.block_size, d, INIT_STD)?;
        let normal = Some(Init::Normal { std: INIT_STD });
        let proj = Some(Init::Normal { std: INIT_STD / (2.0 * l as f64).sqrt() });
        let mut blocks = Vec::with_capacity(l as usize);
        for i in 0..l {
            let p = tr.sub("h").sub(i);
            let (pa, pm) = (p.sub("attn"), p.sub("mlp"));
            blocks.push(Block {
                ln_1: LayerNorm::new(&mut s, &p.sub("ln_1"), d, cfg.bias)?,
                attn: Attention {
                    c_attn: Linear::new(&mut s, &pa.sub("c_attn"), d, 3 * d, cfg.bias, normal)?,
                    c_proj: Linear::new(&mut s, &pa.sub("c_proj"), d, d, cfg.bias, proj)?,
                },
                ln_2: LayerNorm::new(&mut s, &p.sub("ln_2"), d, cfg.bias)?,
                mlp: Mlp {
                    c_fc: Linear::new(&mut s, &pm.sub("c_fc"), d, 4 * d, cfg.bias, normal)?,
                    c_proj: Linear::new(&mut s, &pm.sub("c_proj"), 4 * d, d, cfg.bias, proj)?,
                },
            });
        }
        let ln_f = LayerNorm::new(&mut s, &tr.sub("ln_f"), d, cfg.bias)?;
        let lm_head = if cfg.tie_weights {
            wte.weight.shallow_clone()
        } else {
            Linear::new(&mut s, &Path::root("lm_head"), d, vocab, false, normal)?.weight
        };
        Ok(Gpt2 { cfg, n_layer: l, n_head: h, n_embd: d, vocab, store: s, wte, wpe, blocks, ln_f, lm_head })
    }

    /// The resolved configuration.
    pub fn cfg(&self) -> &Config {
        &self.cfg
    }

    pub fn n_layer(&self) -> i64 {
        self.n_layer
    }

    /// Logits per position (the padded vocabulary).
    pub fn vocab(&self) -> i64 {
        self.vocab
    }

    /// The output projection [vocab, n_embd]: `wte.weight` when tied.
    pub fn lm_head_weight(&self) -> &Tensor {
        &self.lm_head
    }

    /// Trainable parameters, tied weights counted once; `non_embedding`
    /// leaves out the position embeddings, as nanoGPT reports.
    pub fn num_params(&self, non_embedding: bool) -> i64 {
        let wpe = if non_embedding { self.wpe.weight.numel() as i64 } else { 0 };
        self.store.numel() - wpe
    }

    fn check_input(&self, idx: &Tensor) -> Result<(i64, i64), TchError> {
        let shape = idx.f_size_checked()?;
        let kind = idx.f_kind()?;
        let block = self.cfg.block_size;
        if !matches!(kind, Kind::Int64 | Kind::Int) {
            return Err(TchError::Kind(format!(
                "gpt2 expects integer token ids (int64 or int32), got {}",
                kind_name(kind)
            )));
        }
        match shape[..] {
            [b, t] if b >= 1 && (1..=block).contains(&t) => Ok((b, t)),
            [_, t] if t > block => Err(TchError::Shape(format!(
                "gpt2: sequence length {t} exceeds block_size {block} (tokens {shape:?})"
            ))),
            _ => Err(TchError::Shape(format!(
                "gpt2 expects tokens [B, T] with B >= 1 and 1 <= T <= {block}, got {shape:?}"
            ))),
        }
    }
}

impl Model for Gpt2 {
    fn arch(&self) -> &'static str {
        "gpt2"
    }

    fn task(&self) -> Task {
        Task::LanguageModel { vocab: self.vocab, block_size: self.cfg.block_size }
    }

    /// Token ids [B, T] to logits [B, T, padded vocab]. Ids must lie in
    /// [0, padded vocab): the CPU reports others as an error, CUDA as a
    /// device-side assert.
    fn forward(&self, idx: &Tensor, train: bool) -> Result<Tensor, TchError> {
        let (b, t) = self.check_input(idx)?;
        let p = if train { self.cfg.dropout } else { 0.0 };
        let s = Step { b, t, n_head: self.n_head, n_embd: self.n_embd, p };
        // Position embeddings of 0..T are the first T rows of wpe.
        let pos = self.wpe.weight.f_narrow(0, 0, t)?;
        let mut x = dropout(self.wte.forward(idx)?.f_add(&pos)?, p)?;
        for block in &self.blocks {
            x = block.forward(&x, s)?;
        }
        self.ln_f.forward(&x)?.f_linear::<Tensor>(&self.lm_head, None)
    }

    fn store(&self) -> &ParamStore {
        &self.store
    }

    fn store_mut(&mut self) -> &mut ParamStore {
        &mut self.store
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.cfg).unwrap_or(serde_json::Value::Null)
    }

    fn tied(&self) -> Vec<(String, String)> {
        if self.cfg.tie_weights {
            vec![("lm_head.weight".into(), "transformer.wte.weight".into())]
        } else {
            Vec::new()
        }
    }
}
