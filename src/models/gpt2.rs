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
use std::cell::RefCell;

use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tch::{Kind, TchError, Tensor};

use super::{Model, Task};
use crate::attention::cache::LayerCache;
use crate::attention::{Attention, Cache, Ctx, Dims, Direction, Mixer, Probe, Rope, Spec};
use crate::hooks::Hooks;
use crate::layers::{Embedding, LayerNorm, Linear, Path};
use crate::params::{Init, ParamStore, Role};
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
/// given together with a preset must agree with it. The attention fields
/// pick a variant (`docs/attention.md`); the defaults build nanoGPT's GPT-2.
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
    /// Attention preset: mha, ra, mla, mla_decoupled, ra_mla, mla_kvsplice,
    /// ra_mla_kvsplice, sba, ra_route, kv_tying, kv_tying_t.
    pub attention: String,
    /// Override the preset's direction: standard, reciprocal, alternate, learned.
    pub direction: Option<String>,
    /// Override the preset's K/V source: proj, latent, splice, tied, tied_t.
    pub kv: Option<String>,
    /// Override the preset's Q source: proj, latent.
    pub q: Option<String>,
    /// Override where RoPE acts: `false`, `true` (the whole head) or
    /// `"decoupled"` (a separate shared rotated key; latent K/V only).
    pub rope: Option<Rope>,
    pub rope_theta: f64,
    /// Width of the attention latent (MLA family).
    pub d_latent: i64,
    /// KVSplice keeps floor(d_latent · ratio) dimensions.
    pub splice_ratio: f64,
    /// Weight of the RA balance loss (Σ_l p_l − L/2)² (learned direction).
    pub ra_balance_weight: f64,
    /// Share of heads in the cheap RA group (ra_route).
    pub route_head_frac: f64,
    /// Weight of the routing compute penalty.
    pub route_penalty: f64,
    /// Routing switches on once the eval loss fell this fraction below the first eval's.
    pub route_warmup_drop: f64,
    /// Start routing at once (no warm-up phase).
    pub route_skip_warmup: bool,
    /// MLP: `gelu` (GPT-2's) or `splice` (a latent MLP, spec 5.6).
    pub mlp: String,
    /// Latent width of the `splice` MLP.
    pub mlp_latent: i64,
    /// Token embeddings of this width, projected to n_embd (spec 5.6); none by default.
    pub embed_latent: Option<i64>,
    /// RATIO shape: MLP hidden width chosen so MLP:attention parameters are
    /// 2.5:1, rounded to a multiple of 64.
    pub golden_ratio: bool,
    /// Hidden width of the GELU MLP; None: 4·n_embd (or the RATIO shape).
    /// Sets the MLP:attention ratio of a scaling sweep (docs/scaling.md).
    pub mlp_hidden: Option<i64>,
    /// Log Fisher metrics of layers 0, L/2 and L−1 at each evaluation.
    pub fisher_metrics: bool,
    /// The MLP's GELU: `gelu` (exact, nanoGPT's), `gelu_new` / `gelu_fast` /
    /// `gelu_pytorch_tanh` (the tanh approximation, OpenAI GPT-2's), `relu`.
    pub activation: String,
    /// Layer-norm epsilon (Hugging Face `layer_norm_epsilon`).
    pub ln_eps: f64,
    /// A bias on the output projection (`lm_head.bias`; folding `ln_f` into
    /// an untied head needs one).
    pub lm_head_bias: bool,
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
            attention: "mha".into(),
            direction: None,
            kv: None,
            q: None,
            rope: None,
            rope_theta: 10000.0,
            d_latent: 256,
            splice_ratio: 0.5,
            ra_balance_weight: 0.01,
            route_head_frac: 0.25,
            route_penalty: 0.01,
            route_warmup_drop: 0.05,
            route_skip_warmup: false,
            mlp: "gelu".into(),
            mlp_latent: 256,
            embed_latent: None,
            golden_ratio: false,
            mlp_hidden: None,
            fisher_metrics: false,
            activation: "gelu".into(),
            ln_eps: crate::layers::LayerNorm::EPS,
            lm_head_bias: false,
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
        let resolved = Config {
            preset,
            n_layer: Some(l),
            n_head: Some(h),
            n_embd: Some(d),
            padded_vocab_size: Some(padded),
            attention: self.attention.trim().to_ascii_lowercase(),
            ..self.clone()
        };
        let spec = resolved.spec()?;
        if spec.rope == Rope::Full && (d / h) % 2 != 0 {
            bail!("gpt2: RoPE needs an even head size, got {}", d / h);
        }
        if spec.rope == Rope::Decoupled && (d / h) % 4 != 0 {
            bail!(
                "gpt2: decoupled RoPE rotates hs/2 dims and needs a head size divisible by 4, got {}",
                d / h
            );
        }
        if spec.latent() && resolved.d_latent < 1 {
            bail!("gpt2: d_latent must be at least 1, got {}", resolved.d_latent);
        }
        if !(resolved.splice_ratio > 0.0 && resolved.splice_ratio <= 1.0) {
            bail!("gpt2: splice_ratio must be in (0, 1], got {}", resolved.splice_ratio);
        }
        if resolved.rope_theta.is_nan() || resolved.rope_theta <= 1.0 {
            bail!("gpt2: rope_theta must be above 1, got {}", resolved.rope_theta);
        }
        if spec.mixer == Mixer::Route && h < 2 {
            bail!("gpt2: ra_route needs at least 2 heads");
        }
        if !(0.0..1.0).contains(&resolved.route_head_frac) || resolved.route_head_frac == 0.0 {
            bail!("gpt2: route_head_frac must be in (0, 1), got {}", resolved.route_head_frac);
        }
        for (k, v) in [
            ("ra_balance_weight", resolved.ra_balance_weight),
            ("route_penalty", resolved.route_penalty),
            ("route_warmup_drop", resolved.route_warmup_drop),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                bail!("gpt2: {k} must be a finite number >= 0, got {v}");
            }
        }
        if !MLPS.contains(&resolved.mlp.as_str()) {
            bail!("gpt2: unknown mlp '{}' (valid: {})", resolved.mlp, MLPS.join(", "));
        }
        if !ACTIVATIONS.iter().any(|(n, _)| *n == resolved.activation) {
            let valid: Vec<&str> = ACTIVATIONS.iter().map(|(n, _)| *n).collect();
            bail!("gpt2: unknown activation '{}' (valid: {})", resolved.activation, valid.join(", "));
        }
        if !(resolved.ln_eps > 0.0 && resolved.ln_eps < 1.0) {
            bail!("gpt2: ln_eps must be in (0, 1), got {}", resolved.ln_eps);
        }
        if resolved.lm_head_bias && resolved.tie_weights {
            bail!("gpt2: lm_head_bias needs an untied head (tie_weights: false)");
        }
        if resolved.mlp_latent < 1 || resolved.embed_latent.is_some_and(|e| e < 1) {
            bail!("gpt2: mlp_latent and embed_latent must be at least 1");
        }
        if let Some(h) = resolved.mlp_hidden {
            if h < 1 {
                bail!("gpt2: mlp_hidden must be at least 1, got {h}");
            }
            if resolved.golden_ratio {
                bail!("gpt2: mlp_hidden and golden_ratio both set the MLP width; give one");
            }
            if resolved.mlp != "gelu" {
                bail!("gpt2: mlp_hidden sets the GELU MLP's width; mlp '{}' has none", resolved.mlp);
            }
        }
        Ok(resolved)
    }

    /// The attention layers' axes.
    pub fn spec(&self) -> Result<Spec> {
        Spec::resolve(
            &self.attention,
            self.direction.as_deref(),
            self.kv.as_deref(),
            self.q.as_deref(),
            self.rope,
        )
    }

    fn dims(&self) -> Dims {
        Dims {
            n_layer: self.n_layer.unwrap_or(12),
            n_head: self.n_head.unwrap_or(12),
            n_embd: self.n_embd.unwrap_or(768),
            d_latent: self.d_latent,
            splice_ratio: self.splice_ratio,
            rope_theta: self.rope_theta,
            route_frac: self.route_head_frac,
            bias: self.bias,
        }
    }

    /// Hidden width of the GELU MLP: 4d, or the RATIO shape.
    pub fn mlp_hidden(&self) -> Result<i64> {
        let r = self.resolve()?;
        let d = r.n_embd.unwrap_or(768);
        if let Some(h) = r.mlp_hidden {
            return Ok(h);
        }
        if !r.golden_ratio {
            return Ok(4 * d);
        }
        let attn = Attention::num_params(&r.spec()?, &r.dims()) as f64;
        let h = (2.5 * attn / (2.0 * d as f64) / 64.0).round() as i64 * 64;
        Ok(h.max(64))
    }

    /// Parameters of one block's attention and of its MLP (biases
    /// included, layer norms not): the MLP:attention ratio of the scaling
    /// report is `mlp / attention` (docs/scaling.md).
    pub fn block_params(&self) -> Result<(i64, i64)> {
        let r = self.resolve()?;
        let d = r.n_embd.unwrap_or(0);
        let b = r.bias as i64;
        let lin = |i: i64, o: i64, bias: i64| i * o + bias * o;
        let mlp = match r.mlp.as_str() {
            "none" => 0,
            "splice" => {
                let m = r.mlp_latent;
                d * m + lin(m, 4 * m, b) + lin(4 * m, m, b)
            }
            _ => {
                let h = r.mlp_hidden()?;
                lin(d, h, b) + lin(h, d, b)
            }
        };
        Ok((Attention::num_params(&r.spec()?, &r.dims()), mlp))
    }

    /// Trainable parameters of the model this configuration builds, tied
    /// weights counted once; `non_embedding` leaves out the position
    /// embeddings (nanoGPT's convention).
    pub fn num_params(&self, non_embedding: bool) -> Result<i64> {
        let r = self.resolve()?;
        let (l, d, v) = (r.n_layer.unwrap_or(0), r.n_embd.unwrap_or(0), r.padded_vocab_size.unwrap_or(0));
        let b = r.bias as i64;
        let ln = d + b * d;
        let spec = r.spec()?;
        let (attn, mlp) = r.block_params()?;
        let ln2 = if r.mlp == "none" { 0 } else { ln };
        let block = ln + ln2 + attn + mlp;
        let gate = if spec.direction == Direction::Learned { l } else { 0 };
        let wpe = if non_embedding { 0 } else { r.block_size * d };
        let e = r.embed_latent.unwrap_or(d);
        let emb = v * e + if r.embed_latent.is_some() { 2 * e * d } else { 0 };
        let head = if r.tie_weights { 0 } else { v * e + r.lm_head_bias as i64 * v };
        Ok(emb + wpe + l * block + gate + ln + head)
    }
}

/// `none` builds an attention-only transformer (no MLP, no `ln_2`).
pub const MLPS: &[&str] = &["gelu", "splice", "none"];

/// Activations by Hugging Face name.
#[allow(clippy::type_complexity)]
pub const ACTIVATIONS: &[(&str, fn(&Tensor) -> Result<Tensor, TchError>)] = &[
    ("gelu", |x| x.f_gelu("none")),
    ("gelu_new", |x| x.f_gelu("tanh")),
    ("gelu_fast", |x| x.f_gelu("tanh")),
    ("gelu_pytorch_tanh", |x| x.f_gelu("tanh")),
    ("relu", |x| x.f_relu()),
];

fn activation(name: &str) -> fn(&Tensor) -> Result<Tensor, TchError> {
    ACTIVATIONS.iter().find(|(n, _)| *n == name).map_or(ACTIVATIONS[0].1, |(_, f)| *f)
}

enum Mlp {
    Gelu {
        c_fc: Linear,
        c_proj: Linear,
    },
    /// `proj_in` (d→m, no bias) → fc1 (m→4m) → GELU → fc2 (4m→m) → back to d
    /// through `proj_in`'s transpose.
    Splice {
        proj_in: Linear,
        fc1: Linear,
        fc2: Linear,
    },
}

impl Mlp {
    /// `hook(leaf, act)` visits `mlp.hook_pre` (before the activation) and
    /// `mlp.hook_post` (after it).
    fn forward(
        &self,
        x: &Tensor,
        p: f64,
        act: fn(&Tensor) -> Result<Tensor, TchError>,
        hook: impl Fn(&str, Tensor) -> Result<Tensor, TchError>,
    ) -> Result<Tensor, TchError> {
        let y = match self {
            Mlp::Gelu { c_fc, c_proj } => {
                let pre = hook("hook_pre", c_fc.forward(x)?)?;
                c_proj.forward(&hook("hook_post", act(&pre)?)?)?
            }
            Mlp::Splice { proj_in, fc1, fc2 } => {
                let pre = hook("hook_pre", fc1.forward(&proj_in.forward(x)?)?)?;
                let h = fc2.forward(&hook("hook_post", act(&pre)?)?)?;
                h.f_linear::<Tensor>(&proj_in.weight.f_transpose(0, 1)?, None)?
            }
        };
        dropout(y, p)
    }
}

struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    /// None in an attention-only model.
    ln_2: Option<LayerNorm>,
    mlp: Option<Mlp>,
}

/// A layer norm visiting `{prefix}.hook_scale` and `{prefix}.hook_normalized`;
/// written out only when one of them is hooked.
fn ln_hooked(ln: &LayerNorm, x: &Tensor, ctx: &Ctx, prefix: &dyn Fn() -> String) -> Result<Tensor, TchError> {
    if ctx.hooks.is_none() {
        return ln.forward(x);
    }
    let y = if ctx.wants(|| format!("{}.hook_scale", prefix())) {
        ln.forward_parts(x, |scale| ctx.hook(|| format!("{}.hook_scale", prefix()), scale))?
    } else {
        ln.forward(x)?
    };
    ctx.hook(|| format!("{}.hook_normalized", prefix()), y)
}

fn dropout(x: Tensor, p: f64) -> Result<Tensor, TchError> {
    if p > 0.0 {
        x.f_dropout(p, true)
    } else {
        Ok(x)
    }
}

impl Block {
    fn forward(
        &self,
        i: usize,
        x: &Tensor,
        pos0: i64,
        cache: Option<(&mut LayerCache, i64)>,
        ctx: &Ctx,
        act: fn(&Tensor) -> Result<Tensor, TchError>,
    ) -> Result<Tensor, TchError> {
        let x = ctx.hook(|| format!("blocks.{i}.hook_resid_pre"), x.shallow_clone())?;
        let h = ln_hooked(&self.ln_1, &x, ctx, &|| format!("blocks.{i}.ln1"))?;
        let a = ctx.hook(|| format!("blocks.{i}.hook_attn_out"), self.attn.forward(&h, pos0, cache, ctx)?)?;
        // Out of place: `x` is saved by the layer norm for backward, and the
        // branch output may be a view (`linear` folds [B, T] into one dim),
        // which in-place autograd would make copy in backward.
        let x = x.f_add(&a)?;
        let (Some(ln_2), Some(mlp)) = (&self.ln_2, &self.mlp) else {
            return ctx.hook(|| format!("blocks.{i}.hook_resid_post"), x);
        };
        let x = ctx.hook(|| format!("blocks.{i}.hook_resid_mid"), x)?;
        let h = ln_hooked(ln_2, &x, ctx, &|| format!("blocks.{i}.ln2"))?;
        let m = mlp.forward(&h, ctx.p, act, |leaf, t| ctx.hook(|| format!("blocks.{i}.mlp.{leaf}"), t))?;
        let m = ctx.hook(|| format!("blocks.{i}.hook_mlp_out"), m)?;
        ctx.hook(|| format!("blocks.{i}.hook_resid_post"), x.f_add(&m)?)
    }
}

impl Block {
    /// [`Self::forward`] for one decode token through
    /// [`Attention::forward_static`] (no hooks, no dropout).
    fn forward_static(
        &self,
        x: &Tensor,
        pos: &Tensor,
        mask: &Tensor,
        lc: &LayerCache,
        ctx: &Ctx,
        act: fn(&Tensor) -> Result<Tensor, TchError>,
    ) -> Result<Tensor, TchError> {
        let h = self.ln_1.forward(x)?;
        let x = x.f_add(&self.attn.forward_static(&h, pos, mask, lc, ctx)?)?;
        let (Some(ln_2), Some(mlp)) = (&self.ln_2, &self.mlp) else { return Ok(x) };
        let m = mlp.forward(&ln_2.forward(&x)?, 0.0, act, |_, t| Ok(t))?;
        x.f_add(&m)
    }
}

pub struct Gpt2 {
    cfg: Config,
    spec: Spec,
    n_layer: i64,
    vocab: i64,
    store: ParamStore,
    wte: Embedding,
    wpe: Embedding,
    /// Latent embeddings: `emb_proj` (e→d) in, `out_proj` (d→e) out.
    emb_proj: Option<Linear>,
    out_proj: Option<Linear>,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    /// `wte.weight` itself when tied.
    lm_head: Tensor,
    lm_head_bias: Option<Tensor>,
    act: fn(&Tensor) -> Result<Tensor, TchError>,
    /// `transformer.alternation_logits` [n_layer] (learned direction).
    gate: Option<Tensor>,
    /// `transformer.route_state` [3]: phase (1 = routing), first eval loss, evals seen.
    route_state: Option<Tensor>,
    aux: RefCell<Vec<Tensor>>,
    probe: RefCell<Probe>,
}

impl Gpt2 {
    /// Build the parameters on the CPU; the caller finalizes the store.
    pub fn new(cfg: Config) -> Result<Self> {
        let cfg = cfg.resolve()?;
        let spec = cfg.spec()?;
        let dims = cfg.dims();
        let (l, d) = (dims.n_layer, dims.n_embd);
        let vocab = cfg.padded_vocab_size.unwrap_or(0);
        let mut s = ParamStore::new();
        let tr = Path::root("transformer");
        let e = cfg.embed_latent.unwrap_or(d);
        let wte = Embedding::new(&mut s, &tr.sub("wte"), vocab, e, INIT_STD)?;
        let wpe = Embedding::new(&mut s, &tr.sub("wpe"), cfg.block_size, d, INIT_STD)?;
        let normal = Some(Init::Normal { std: INIT_STD });
        let proj = Some(Init::Normal { std: INIT_STD / (2.0 * l as f64).sqrt() });
        let emb_proj = match cfg.embed_latent {
            Some(e) => Some(Linear::new(&mut s, &tr.sub("emb_proj"), e, d, false, normal)?),
            None => None,
        };
        let gate = if spec.direction == Direction::Learned {
            // The seed's RA+MLA start: odd layers lean reciprocal (p = 0.73),
            // even ones standard (p = 0.27), so Σp = L/2 when L is even.
            let init: Vec<f32> = (0..l).map(|i| if i % 2 == 1 { 1.0 } else { -1.0 }).collect();
            Some(s.param_value(&tr.name("alternation_logits"), Tensor::from_slice(&init), Role::Gate)?)
        } else {
            None
        };
        let hidden = cfg.mlp_hidden()?;
        let mut blocks = Vec::with_capacity(l as usize);
        for i in 0..l {
            let p = tr.sub("h").sub(i);
            let pm = p.sub("mlp");
            // Creation order is nanoGPT's (ln_1, attn, ln_2, mlp): the seeded
            // initial values depend on it.
            let ln_1 = LayerNorm::new(&mut s, &p.sub("ln_1"), d, cfg.bias)?.with_eps(cfg.ln_eps);
            let gate_i = gate.as_ref().map(|g| g.shallow_clone());
            let attn = Attention::new(&mut s, &p.sub("attn"), i, spec, dims, gate_i, normal, proj)?;
            let ln_2 = if cfg.mlp == "none" {
                None
            } else {
                Some(LayerNorm::new(&mut s, &p.sub("ln_2"), d, cfg.bias)?.with_eps(cfg.ln_eps))
            };
            let mlp = match cfg.mlp.as_str() {
                "none" => None,
                "splice" => {
                    let m = cfg.mlp_latent;
                    Some(Mlp::Splice {
                        proj_in: Linear::new(&mut s, &pm.sub("proj_in"), d, m, false, normal)?,
                        fc1: Linear::new(&mut s, &pm.sub("fc1"), m, 4 * m, cfg.bias, normal)?,
                        fc2: Linear::new(&mut s, &pm.sub("fc2"), 4 * m, m, cfg.bias, proj)?,
                    })
                }
                _ => Some(Mlp::Gelu {
                    c_fc: Linear::new(&mut s, &pm.sub("c_fc"), d, hidden, cfg.bias, normal)?,
                    c_proj: Linear::new(&mut s, &pm.sub("c_proj"), hidden, d, cfg.bias, proj)?,
                }),
            };
            blocks.push(Block { ln_1, attn, ln_2, mlp });
        }
        let ln_f = LayerNorm::new(&mut s, &tr.sub("ln_f"), d, cfg.bias)?.with_eps(cfg.ln_eps);
        let out_proj = match cfg.embed_latent {
            Some(e) => Some(Linear::new(&mut s, &tr.sub("out_proj"), d, e, false, normal)?),
            None => None,
        };
        let (lm_head, lm_head_bias) = if cfg.tie_weights {
            (wte.weight.shallow_clone(), None)
        } else {
            let l = Linear::new(&mut s, &Path::root("lm_head"), e, vocab, cfg.lm_head_bias, normal)?;
            (l.weight, l.bias)
        };
        let act = activation(&cfg.activation);
        let route_state = if spec.mixer == Mixer::Route {
            let phase = if cfg.route_skip_warmup { 1.0 } else { 0.0 };
            Some(s.buffer(&tr.name("route_state"), Tensor::from_slice(&[phase, 0.0f64, 0.0]))?)
        } else {
            None
        };
        Ok(Gpt2 {
            cfg,
            spec,
            n_layer: l,
            vocab,
            store: s,
            wte,
            wpe,
            emb_proj,
            out_proj,
            blocks,
            ln_f,
            lm_head,
            lm_head_bias,
            act,
            gate,
            route_state,
            aux: RefCell::new(Vec::new()),
            probe: RefCell::new(Probe::default()),
        })
    }

    /// The resolved configuration.
    pub fn cfg(&self) -> &Config {
        &self.cfg
    }

    pub fn spec(&self) -> &Spec {
        &self.spec
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

    fn check_input(&self, idx: &Tensor, pos0: i64) -> Result<(i64, i64), TchError> {
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
            [b, t] if b >= 1 && t >= 1 && pos0 + t <= block => Ok((b, t)),
            [_, t] if pos0 + t > block => Err(TchError::Shape(format!(
                "gpt2: sequence length {} exceeds block_size {block} (tokens {shape:?})",
                pos0 + t
            ))),
            _ => Err(TchError::Shape(format!(
                "gpt2 expects tokens [B, T] with B >= 1 and 1 <= T <= {block}, got {shape:?}"
            ))),
        }
    }

    fn route_on(&self) -> Result<bool, TchError> {
        match &self.route_state {
            Some(s) => Ok(s.f_double_value(&[0])? > 0.5),
            None => Ok(false),
        }
    }

    /// Logits of tokens at positions `pos0..` (only the last position's when
    /// `last_only`), through the cache when given.
    fn run(
        &self,
        idx: &Tensor,
        train: bool,
        cache: Option<&mut Cache>,
        last_only: bool,
        hooks: Option<&dyn Hooks>,
    ) -> Result<Tensor, TchError> {
        let h = self.hidden(idx, train, cache, last_only, hooks)?;
        h.f_linear(&self.lm_head, self.lm_head_bias.as_ref())
    }

    /// [`Self::run`] up to the input of the output projection: ln_f's
    /// output (through `out_proj` when there is one).
    fn hidden(
        &self,
        idx: &Tensor,
        train: bool,
        mut cache: Option<&mut Cache>,
        last_only: bool,
        hooks: Option<&dyn Hooks>,
    ) -> Result<Tensor, TchError> {
        let pos0 = cache.as_ref().map_or(0, |c| c.len);
        let (_, t) = self.check_input(idx, pos0)?;
        let p = if train { self.cfg.dropout } else { 0.0 };
        if train {
            self.aux.borrow_mut().clear();
        }
        let probe = if cache.is_none() && !train { Some(&self.probe) } else { None };
        let ctx = Ctx {
            p,
            train,
            route_on: self.route_on()?,
            route_penalty: self.cfg.route_penalty,
            probe,
            aux: if train { Some(&self.aux) } else { None },
            hooks: if cache.is_none() { hooks } else { None },
        };
        let mut pos = self.wpe.weight.f_narrow(0, pos0, t)?;
        let mut tok = self.wte.forward(idx)?;
        if let Some(ep) = &self.emb_proj {
            tok = ep.forward(&tok)?;
        }
        if ctx.hooks.is_some() {
            tok = ctx.hook(|| "hook_embed".into(), tok)?;
            if ctx.wants(|| "hook_pos_embed".into()) {
                let shape = tok.size();
                // A copy: the rows of `wpe` itself must not reach a hook or a cache.
                let rows = pos.f_unsqueeze(0)?.f_expand(&shape, false)?.f_contiguous()?;
                pos = ctx.hook(|| "hook_pos_embed".into(), rows)?;
            }
        }
        let mut x = dropout(tok.f_add(&pos)?, p)?;
        // Not for routed attention: its router reads the layer norm's output
        // as float32 features, which the fused op would round to bf16 first.
        if cache.is_none()
            && ctx.hooks.is_none()
            && !last_only
            && self.spec.mixer != Mixer::Route
            && crate::fused::add_layer_norm_applies(&x)
        {
            let mut h = self.blocks_fused(x, &ctx)?;
            if let Some(op) = &self.out_proj {
                h = op.forward(&h)?;
            }
            return self.finish_train(train, h);
        }
        for (i, block) in self.blocks.iter().enumerate() {
            let lc = match cache.as_deref_mut() {
                Some(c) => {
                    let cap = c.capacity;
                    Some((&mut c.layers[i], cap))
                }
                None => None,
            };
            x = block.forward(i, &x, pos0, lc, &ctx, self.act)?;
        }
        if last_only && t > 1 {
            // Decoding needs the next token's logits only: [B, 1, vocab]
            // instead of [B, T, vocab] (52 GB at 32 × 16k tokens in bf16).
            x = x.f_narrow(1, t - 1, 1)?;
        }
        let mut h = ln_hooked(&self.ln_f, &x, &ctx, &|| "ln_final".into())?;
        if let Some(op) = &self.out_proj {
            h = op.forward(&h)?;
        }
        if let Some(c) = cache {
            c.len += t;
        }
        self.finish_train(train, h)
    }

    /// The RA balance loss of a training forward, then `h` back.
    fn finish_train(&self, train: bool, h: Tensor) -> Result<Tensor, TchError> {
        if train {
            if let (Some(g), Direction::Learned) = (&self.gate, self.spec.direction) {
                if self.cfg.ra_balance_weight > 0.0 {
                    let half = self.n_layer as f64 / 2.0;
                    let bal = g.f_sigmoid()?.f_sum(Kind::Float)?.f_sub_scalar(half)?.f_square()?;
                    self.aux.borrow_mut().push(bal.f_mul_scalar(self.cfg.ra_balance_weight)?);
                }
            }
        }
        Ok(h)
    }

    /// The blocks and ln_f with every residual add fused into the layer norm
    /// that follows it (`fused::add_layer_norm`): a block's branch output is
    /// added by the next layer norm, the last one by ln_f. The same
    /// computation as the block loop of [`Self::hidden`] without hooks or a
    /// cache; returns ln_f's output.
    fn blocks_fused(&self, mut x: Tensor, ctx: &Ctx) -> Result<Tensor, TchError> {
        let add_ln = |x: &Tensor, a: &Tensor, ln: &LayerNorm| {
            crate::fused::add_layer_norm(x, a, &ln.weight, ln.bias.as_ref(), ln.eps)
        };
        let mut pending: Option<Tensor> = None;
        for block in &self.blocks {
            let h = match pending.take() {
                Some(m) => {
                    let (x1, h) = add_ln(&x, &m, &block.ln_1)?;
                    x = x1;
                    h
                }
                None => block.ln_1.forward(&x)?,
            };
            let a = block.attn.forward(&h, 0, None, ctx)?;
            pending = Some(match (&block.ln_2, &block.mlp) {
                (Some(ln_2), Some(mlp)) => {
                    let (x1, h2) = add_ln(&x, &a, ln_2)?;
                    x = x1;
                    mlp.forward(&h2, ctx.p, self.act, |_, t| Ok(t))?
                }
                _ => a,
            });
        }
        match pending {
            Some(m) => Ok(add_ln(&x, &m, &self.ln_f)?.1),
            None => self.ln_f.forward(&x),
        }
    }

    /// A cache for `batch` sequences of up to `capacity` tokens; each layer's
    /// direction is fixed at its value now.
    pub fn new_cache(&self, batch: i64, capacity: i64) -> Result<Cache, TchError> {
        if capacity > self.cfg.block_size {
            return Err(TchError::Shape(format!(
                "gpt2: a cache of {capacity} tokens exceeds block_size {}",
                self.cfg.block_size
            )));
        }
        let rec = self.blocks.iter().map(|b| b.attn.reciprocal_now()).collect::<Result<Vec<_>, _>>()?;
        Ok(Cache::new(rec, batch, capacity))
    }

    /// Logits [B, T, vocab] of `idx` [B, T] following what `cache` holds,
    /// which then holds these tokens too.
    pub fn forward_cached(&self, idx: &Tensor, cache: &mut Cache) -> Result<Tensor, TchError> {
        self.cached(idx, cache, false)
    }

    /// [`Self::forward_cached`] returning only the last position's logits [B, 1, vocab].
    pub fn forward_cached_last(&self, idx: &Tensor, cache: &mut Cache) -> Result<Tensor, TchError> {
        self.cached(idx, cache, true)
    }

    fn cached(&self, idx: &Tensor, cache: &mut Cache, last_only: bool) -> Result<Tensor, TchError> {
        let b = idx.f_size_checked()?.first().copied().unwrap_or(0);
        if b != cache.batch {
            return Err(TchError::Shape(format!("gpt2: cache holds {} sequences, got {b}", cache.batch)));
        }
        if cache.layers.len() != self.blocks.len() {
            return Err(TchError::Shape(format!(
                "gpt2: cache has {} layers, the model {}",
                cache.layers.len(),
                self.blocks.len()
            )));
        }
        if cache.poisoned {
            return Err(TchError::Shape(
                "gpt2: this cache was left half-written by a failed step; start a new one".into(),
            ));
        }
        let out = self.run(idx, false, Some(&mut *cache), last_only, None);
        if out.is_err() {
            // Cumulative slots (SBA normaliser, routing sums) may hold part of the step.
            cache.poisoned = true;
        }
        out
    }

    /// Bytes a cache of `batch` × `seq_len` tokens holds when activations
    /// have `elem` bytes (4 float32, 2 bf16/fp16); SBA's normaliser and the
    /// router's context sum are float32. These are the bytes of `seq_len`
    /// tokens: a latent that decodes absorbed allocates its slot rows in
    /// whole multiples of 16 ([`Self::cache_rows`]), so `generate`'s
    /// `cache_bytes` is this at `cache_rows(seq_len)`.
    pub fn kv_cache_bytes(&self, batch: i64, seq_len: i64, elem: i64) -> Result<i64, TchError> {
        if batch < 1 || seq_len < 0 || !(1..=8).contains(&elem) {
            return Err(TchError::Shape(format!(
                "kv_cache_bytes: batch must be >= 1 and seq_len >= 0, got batch {batch}, seq_len {seq_len}"
            )));
        }
        let dims = self.cfg.dims();
        let mut per_token = 0;
        let mut per_seq = 0;
        for b in &self.blocks {
            let (main, f32s) = Attention::cache_elems(&self.spec, &dims, b.attn.reciprocal_now()?);
            per_token += main * elem + f32s * 4;
            per_seq += Attention::cache_elems_per_seq(&self.spec, &dims) * 4;
        }
        seq_len
            .checked_mul(per_token)
            .and_then(|n| n.checked_add(per_seq))
            .and_then(|n| n.checked_mul(batch))
            .ok_or_else(|| {
                TchError::Shape(format!("kv_cache_bytes: {batch} x {seq_len} tokens overflow 64 bits"))
            })
    }

    /// Rows a cache for `tokens` tokens allocates per slot: `tokens`, or
    /// for a latent that decodes absorbed, `tokens` rounded up to 16 (the
    /// score and mixing matmuls stay on cuBLAS's tensor-core kernels).
    pub fn cache_rows(&self, tokens: i64) -> Result<i64, TchError> {
        Attention::slot_tokens(&self.spec, tokens)
    }

    /// Run an evaluation forward that records attention patterns of
    /// `layers` and the per-layer statistics; returns the probe's contents.
    pub fn probe(&self, idx: &Tensor, layers: &[i64]) -> Result<Probe, TchError> {
        *self.probe.borrow_mut() = Probe { patterns_for: layers.to_vec(), stats: true, ..Default::default() };
        let r = tch::no_grad(|| self.run(idx, false, None, true, None));
        let p = std::mem::take(&mut *self.probe.borrow_mut());
        r.map(|_| p)
    }

    /// The learned direction probabilities σ(logit) per layer.
    pub fn direction_probs(&self) -> Result<Option<Vec<f64>>, TchError> {
        match &self.gate {
            Some(g) => Ok(Some(Vec::<f64>::try_from(g.f_sigmoid()?.f_to_kind(Kind::Double)?)?)),
            None => Ok(None),
        }
    }

    /// Attention metrics the seed logged (RA balance, SBA alpha, KVSplice
    /// reconstruction, router statistics, Fisher when `fisher`), on `sample`.
    pub fn attention_metrics(&self, sample: Option<&Tensor>, fisher: bool) -> Result<Map<String, Value>> {
        super::gpt2_metrics::collect(self, sample, fisher)
    }

    /// Why this model has no static-shape decode step ([`Self::forward_static`]),
    /// or None when it has one.
    pub fn static_unsupported(&self) -> Option<String> {
        let why = Attention::static_unsupported(&self.spec)?;
        Some(format!("attention '{}': {why}", self.cfg.attention))
    }

    /// Logits [B, 1, vocab] of the decode tokens `tok` [B, 1] at the device
    /// position `pos` ([1] int64), following the `pos` tokens `cache` holds
    /// (filled by a prefill through [`Self::forward_cached`]); their K/V are
    /// written at `pos`. `mask` [1, 1, 1, cap rounded up to 16] is added to
    /// the attention scores over each slot's rows: 0 where `arange <= pos`,
    /// -inf elsewhere, in the cache's dtype (SDPA then needs no conversion
    /// or padding per layer). Static
    /// shapes and no host reads: the step a CUDA graph records
    /// (`decode::graph`). `cache.len` is left to the caller.
    pub fn forward_static(
        &self,
        tok: &Tensor,
        pos: &Tensor,
        mask: &Tensor,
        cache: &Cache,
    ) -> Result<Tensor, TchError> {
        if let Some(why) = self.static_unsupported() {
            return Err(TchError::Shape(why));
        }
        if cache.layers.len() != self.blocks.len() {
            return Err(TchError::Shape(format!(
                "gpt2: cache has {} layers, the model {}",
                cache.layers.len(),
                self.blocks.len()
            )));
        }
        let ctx = Ctx {
            p: 0.0,
            train: false,
            route_on: false,
            route_penalty: 0.0,
            probe: None,
            aux: None,
            hooks: None,
        };
        let mut x = self.wte.forward(tok)?;
        if let Some(ep) = &self.emb_proj {
            x = ep.forward(&x)?;
        }
        let mut x = x.f_add(&self.wpe.weight.f_index_select(0, pos)?)?;
        for (block, lc) in self.blocks.iter().zip(&cache.layers) {
            x = block.forward_static(&x, pos, mask, lc, &ctx, self.act)?;
        }
        let mut h = self.ln_f.forward(&x)?;
        if let Some(op) = &self.out_proj {
            h = op.forward(&h)?;
        }
        h.f_linear(&self.lm_head, self.lm_head_bias.as_ref())
    }

    pub(crate) fn blocks_attn(&self) -> impl Iterator<Item = &Attention> {
        self.blocks.iter().map(|b| &b.attn)
    }

    pub(crate) fn route_state(&self) -> Option<&Tensor> {
        self.route_state.as_ref()
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
        self.run(idx, train, None, false, None)
    }

    fn forward_hooked(
        &self,
        idx: &Tensor,
        train: bool,
        hooks: Option<&dyn Hooks>,
    ) -> Result<Tensor, TchError> {
        self.run(idx, train, None, false, hooks)
    }

    fn train_loss(&self, idx: &Tensor, targets: &Tensor) -> Option<Result<Tensor, TchError>> {
        Some(self.hidden(idx, true, None, false, None).and_then(|h| {
            crate::loss::linear_cross_entropy(
                &h,
                &self.lm_head,
                self.lm_head_bias.as_ref(),
                targets,
                crate::loss::CHUNK_ROWS,
            )
        }))
    }

    fn hook_names(&self) -> Vec<String> {
        let mut v = vec!["hook_embed".to_string(), "hook_pos_embed".to_string()];
        let mut attn = vec!["hook_q", "hook_k", "hook_v"];
        if self.spec.rope.on() {
            attn.extend(["hook_rot_q", "hook_rot_k"]);
        }
        if self.spec.mixer != Mixer::Sba {
            attn.extend(["hook_attn_scores", "hook_pattern"]);
        }
        attn.push("hook_z");
        for (i, b) in self.blocks.iter().enumerate() {
            v.extend(
                ["hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized"]
                    .into_iter()
                    .map(|n| format!("blocks.{i}.{n}")),
            );
            v.extend(attn.iter().map(|n| format!("blocks.{i}.attn.{n}")));
            v.push(format!("blocks.{i}.hook_attn_out"));
            if b.mlp.is_some() {
                v.extend(
                    [
                        "hook_resid_mid",
                        "ln2.hook_scale",
                        "ln2.hook_normalized",
                        "mlp.hook_pre",
                        "mlp.hook_post",
                        "hook_mlp_out",
                    ]
                    .into_iter()
                    .map(|n| format!("blocks.{i}.{n}")),
                );
            }
            v.push(format!("blocks.{i}.hook_resid_post"));
        }
        v.extend(["ln_final.hook_scale".to_string(), "ln_final.hook_normalized".to_string()]);
        v
    }

    fn take_aux_loss(&self) -> Option<Tensor> {
        let terms = std::mem::take(&mut *self.aux.borrow_mut());
        let mut it = terms.into_iter();
        let first = it.next()?;
        it.try_fold(first, |a, t| a.f_add(&t)).ok()
    }

    fn on_eval(&mut self, eval: &Map<String, Value>, sample: Option<&Tensor>) -> Result<Map<String, Value>> {
        super::gpt2_metrics::on_eval(self, eval, sample)
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
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
