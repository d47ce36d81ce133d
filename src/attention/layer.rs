//! One attention layer over the axes of [`Spec`]: projections, RoPE,
//! direction, mixer, cache.
use std::cell::RefCell;

use anyhow::Result;
use tch::{Kind, TchError, Tensor};

use super::absorb::{Fold, Folded, Mask, MlaWeights};
use super::cache::{self, LayerCache};
use super::kvsplice::KvSplice;
use super::spec::{Direction, KvSource, Mixer, QSource, Rope, Spec};
use super::{rope, route, sba};
use crate::hooks::{self, Hooks};
use crate::layers::{Linear, Path};
use crate::params::{Init, ParamStore};

/// Sizes and knobs shared by every layer.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub n_layer: i64,
    pub n_head: i64,
    pub n_embd: i64,
    pub d_latent: i64,
    pub splice_ratio: f64,
    pub rope_theta: f64,
    pub route_frac: f64,
    pub bias: bool,
}

impl Dims {
    pub fn head_size(&self) -> i64 {
        self.n_embd / self.n_head
    }

    /// Width of the decoupled RoPE query and key (DeepSeek-V2's d_h/2).
    pub fn rope_dim(&self) -> i64 {
        self.head_size() / 2
    }
}

/// What one forward records for analysis (attention patterns, KVSplice
/// reconstruction, router statistics) when asked to.
#[derive(Default)]
pub struct Probe {
    /// Layers whose attention pattern [B, H, T, T] to keep.
    pub patterns_for: Vec<i64>,
    pub patterns: Vec<(i64, Tensor)>,
    /// Record per-layer statistics below.
    pub stats: bool,
    /// (layer, mean squared error of the KVSplice round trip).
    pub recon: Vec<(i64, Tensor)>,
    /// (layer, mean p_ra, fraction of tokens routed to the RA group).
    pub route: Vec<(i64, Tensor, Tensor)>,
}

/// Per-forward settings.
#[derive(Clone, Copy)]
pub struct Ctx<'a> {
    /// Dropout probability in effect (0 in eval mode).
    pub p: f64,
    /// Training forward (learned gates mix both directions).
    pub train: bool,
    /// RA routing past its warm-up.
    pub route_on: bool,
    pub route_penalty: f64,
    pub probe: Option<&'a RefCell<Probe>>,
    /// Auxiliary losses of this forward (routing compute penalty).
    pub aux: Option<&'a RefCell<Vec<Tensor>>>,
    /// Hook points to visit (full-sequence forwards only).
    pub hooks: Option<&'a dyn Hooks>,
}

impl Ctx<'_> {
    /// Run `f` on the probe when this forward records one.
    pub fn record(&self, f: impl FnOnce(&mut Probe) -> Result<(), TchError>) -> Result<(), TchError> {
        match self.probe.and_then(|p| p.try_borrow_mut().ok()) {
            Some(mut pr) => f(&mut pr),
            None => Ok(()),
        }
    }

    /// Visit hook point `name` with `act` [B, T, ...]; a replacement must
    /// keep the shape.
    pub fn hook(&self, name: impl FnOnce() -> String, act: Tensor) -> Result<Tensor, TchError> {
        let Some(h) = self.hooks else { return Ok(act) };
        let n = name();
        if !h.wants(&n) {
            return Ok(act);
        }
        match h.call(&n, &act)? {
            Some(new) => {
                let (want, got) = (act.size(), new.size());
                if want != got {
                    return Err(TchError::Shape(format!(
                        "hook {n}: the replacement has shape {got:?}, the activation {want:?}"
                    )));
                }
                Ok(new)
            }
            None => Ok(act),
        }
    }

    pub fn wants(&self, name: impl FnOnce() -> String) -> bool {
        hooks::wants(self.hooks, name)
    }

    /// Does this forward record per-layer statistics?
    pub fn stats(&self) -> bool {
        self.probe.is_some_and(|p| p.try_borrow().is_ok_and(|p| p.stats))
    }
}

enum Proj {
    /// x → Q, K, V (`c_attn`, d → 3d).
    Fused(Linear),
    /// x → Q, V (`c_attn`, d → 2d); K = V.
    Tied(Linear),
    /// x → Q, V (`c_attn`, d → 2d); K = x·W_v (W_v the value rows of `c_attn`).
    TiedT(Linear),
    /// Q = `q_proj` x; c = `to_kv_latent` x; K, V = `from_kv_latent` c.
    Mla { q_proj: Linear, down: Linear, up: Linear },
    /// c = `to_latent` x; Q, K, V = `from_latent` c.
    TokenLatent { down: Linear, up: Linear },
}

pub struct Attention {
    pub layer: i64,
    spec: Spec,
    dims: Dims,
    proj: Proj,
    splice: Option<KvSplice>,
    /// Decoupled RoPE: `rope_qk` (d → (H+1)·d_r): H query parts, then the shared key.
    rope_qk: Option<Linear>,
    c_proj: Linear,
    sba_alpha: Option<Tensor>,
    router: Option<route::Router>,
    /// The model's `alternation_logits` [n_layer] (learned direction).
    gate: Option<Tensor>,
}

fn te(msg: String) -> TchError {
    TchError::Shape(msg)
}

/// Rows `[from, from + n)` of a linear layer.
fn linear_rows(l: &Linear, x: &Tensor, from: i64, n: i64) -> Result<Tensor, TchError> {
    let w = l.weight.f_narrow(0, from, n)?;
    let b = match &l.bias {
        Some(b) => Some(b.f_narrow(0, from, n)?),
        None => None,
    };
    x.f_linear(&w, b.as_ref())
}

/// [B, T, n·hs] → [B, n, T, hs] (a view).
fn heads(y: &Tensor, n: i64, hs: i64) -> Result<Tensor, TchError> {
    let s = y.size();
    y.f_view([s[0], s[1], n, hs])?.f_transpose(1, 2)
}

/// Causal softmax attention of new queries (at `pos0..`) over `S` keys.
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, pos0: i64, p: f64) -> Result<Tensor, TchError> {
    let (t, s) = (q.size()[2], k.size()[2]);
    if t == s && pos0 == 0 {
        Tensor::f_scaled_dot_product_attention::<Tensor>(q, k, v, None, p, true, None, false)
    } else if t == 1 {
        Tensor::f_scaled_dot_product_attention::<Tensor>(q, k, v, None, p, false, None, false)
    } else {
        let mask = causal_allowed(t, s, pos0, q.device())?;
        Tensor::f_scaled_dot_product_attention(q, k, v, Some(mask), p, false, None, false)
    }
}

/// [T, S] booleans: query i (at position pos0 + i) may read key j.
pub fn causal_allowed(t: i64, s: i64, pos0: i64, dev: tch::Device) -> Result<Tensor, TchError> {
    let j = Tensor::f_arange(s, (Kind::Int64, dev))?.f_unsqueeze(0)?;
    let i = Tensor::f_arange_start(pos0, pos0 + t, (Kind::Int64, dev))?.f_unsqueeze(1)?;
    j.f_le_tensor(&i)
}

/// The explicit causal softmax pattern [B, H, T, S] (what SDPA computes inside).
pub fn pattern(q: &Tensor, k: &Tensor, pos0: i64) -> Result<Tensor, TchError> {
    let (t, s, hs) = (q.size()[2], k.size()[2], q.size()[3]);
    let scores = q.f_to_kind(Kind::Float)?.f_matmul(&k.f_to_kind(Kind::Float)?.f_transpose(-2, -1)?)?;
    let scores = scores.f_mul_scalar(1.0 / (hs as f64).sqrt())?;
    let allowed = causal_allowed(t, s, pos0, q.device())?;
    scores.f_masked_fill(&allowed.f_logical_not()?, f64::NEG_INFINITY)?.f_softmax(-1, Kind::Float)
}

/// Decoupled RoPE: Q = [q_c; q_r] and K = [k_c; k_r] with the rotated
/// shared key `kr` [B, 1, S, d_r] repeated over the heads.
fn join_rope(q: &Tensor, k: &Tensor, qr: &Tensor, kr: &Tensor) -> Result<(Tensor, Tensor), TchError> {
    let ks = k.size();
    let kr = kr.f_to_kind(k.f_kind()?)?.f_expand([ks[0], ks[1], ks[2], kr.size()[3]], false)?;
    let q = Tensor::f_cat(&[q, &qr.f_to_kind(q.f_kind()?)?], 3)?;
    Ok((q, Tensor::f_cat(&[k, &kr], 3)?))
}

/// Where a decode step's RoPE reads its position: a host index, or a
/// device tensor ([1] int64) over tables of this many rows (graphed steps).
enum At<'a> {
    Start(i64),
    Device(&'a Tensor, i64),
}

/// New-token projections before direction and mixing.
struct Fresh {
    q: Option<Tensor>,
    k: Option<Tensor>,
    v: Option<Tensor>,
    /// The latent every Q/K/V of these tokens comes from (after KVSplice).
    c: Option<Tensor>,
    /// The compressed latent (what a splice cache stores).
    z: Option<Tensor>,
    /// Decoupled RoPE, unrotated: H query parts, then the shared key [B, H+1, T, d_r].
    qkr: Option<Tensor>,
}

impl Attention {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        s: &mut ParamStore,
        p: &Path,
        layer: i64,
        spec: Spec,
        dims: Dims,
        gate: Option<Tensor>,
        normal: Option<Init>,
        proj_init: Option<Init>,
    ) -> Result<Self> {
        let (d, r, b) = (dims.n_embd, dims.d_latent, dims.bias);
        let lin = |s: &mut ParamStore, name: &str, i: i64, o: i64, bias: bool| {
            Linear::new(s, &p.sub(name), i, o, bias, normal)
        };
        let proj = match (spec.kv, spec.q) {
            (KvSource::Proj, _) => Proj::Fused(lin(s, "c_attn", d, 3 * d, b)?),
            (KvSource::Tied, _) => Proj::Tied(lin(s, "c_attn", d, 2 * d, b)?),
            (KvSource::TiedT, _) => Proj::TiedT(lin(s, "c_attn", d, 2 * d, b)?),
            (_, QSource::Proj) => Proj::Mla {
                q_proj: lin(s, "q_proj", d, d, b)?,
                down: lin(s, "to_kv_latent", d, r, b)?,
                up: lin(s, "from_kv_latent", r, 2 * d, b)?,
            },
            (_, QSource::Latent) => Proj::TokenLatent {
                down: lin(s, "to_latent", d, r, b)?,
                up: lin(s, "from_latent", r, 3 * d, b)?,
            },
        };
        let splice = if spec.kv == KvSource::Splice {
            Some(KvSplice::new(s, &p.sub("kvsplice"), r, dims.splice_ratio)?)
        } else {
            None
        };
        let (c_proj, router) = if spec.mixer == Mixer::Route {
            let n_ra = route::ra_heads(dims.n_head, dims.route_frac);
            let hs = dims.head_size();
            let full = Linear::new(s, &p.sub("c_proj"), (dims.n_head - n_ra) * hs, d, b, proj_init)?;
            (full, Some(route::Router::new(s, p, dims, proj_init)?))
        } else {
            (Linear::new(s, &p.sub("c_proj"), d, d, b, proj_init)?, None)
        };
        let rope_qk = if spec.rope == Rope::Decoupled {
            Some(lin(s, "rope_qk", d, (dims.n_head + 1) * dims.rope_dim(), b)?)
        } else {
            None
        };
        let sba_alpha = if spec.mixer == Mixer::Sba {
            Some(s.param(&p.name("alpha_logit"), &[1], Init::Zeros, crate::params::Role::Gate)?)
        } else {
            None
        };
        Ok(Attention { layer, spec, dims, proj, splice, rope_qk, c_proj, sba_alpha, router, gate })
    }

    /// Trainable parameters of one layer (excluding the model-level gate).
    pub fn num_params(spec: &Spec, dims: &Dims) -> i64 {
        let (d, r, b) = (dims.n_embd, dims.d_latent, dims.bias as i64);
        let lin = |i: i64, o: i64| i * o + b * o;
        let proj = match (spec.kv, spec.q) {
            (KvSource::Proj, _) => lin(d, 3 * d),
            (KvSource::Tied | KvSource::TiedT, _) => lin(d, 2 * d),
            (_, QSource::Proj) => lin(d, d) + lin(d, r) + lin(r, 2 * d),
            (_, QSource::Latent) => lin(d, r) + lin(r, 3 * d),
        };
        let splice = if spec.kv == KvSource::Splice { KvSplice::params(r, dims.splice_ratio) } else { 0 };
        let dr = dims.rope_dim();
        let rope = if spec.rope == Rope::Decoupled { lin(d, (dims.n_head + 1) * dr) } else { 0 };
        let out = match spec.mixer {
            Mixer::Route => route::Router::num_params(dims),
            Mixer::Sba => lin(d, d) + 1,
            Mixer::Softmax => lin(d, d),
        };
        proj + splice + rope + out
    }

    /// Cache elements per token in the activation dtype, and float32 ones.
    pub fn cache_elems(spec: &Spec, dims: &Dims, reciprocal: bool) -> (i64, i64) {
        let (h, d) = (dims.n_head, dims.n_embd);
        let main = match spec.kv {
            KvSource::Proj | KvSource::TiedT => 2 * d,
            KvSource::Tied => {
                if reciprocal {
                    2 * d
                } else {
                    d
                }
            }
            KvSource::Latent => dims.d_latent,
            KvSource::Splice => super::kvsplice::compressed_dim(dims.d_latent, dims.splice_ratio),
        };
        let main = main + if spec.rope == Rope::Decoupled { dims.rope_dim() } else { 0 };
        let f32s = if spec.mixer == Mixer::Sba { h } else { 0 };
        (main, f32s)
    }

    /// Per-sequence float32 elements (the router's running context sum).
    pub fn cache_elems_per_seq(spec: &Spec, dims: &Dims) -> i64 {
        if spec.mixer == Mixer::Route {
            dims.n_embd
        } else {
            0
        }
    }

    /// Is this layer reciprocal at inference (learned: σ(logit) > 0.5)?
    pub fn reciprocal_now(&self) -> Result<bool, TchError> {
        Ok(match self.spec.direction {
            Direction::Standard => false,
            Direction::Reciprocal => true,
            Direction::Alternate => self.layer % 2 == 1,
            Direction::Learned => match &self.gate {
                Some(g) => g.f_select(0, self.layer)?.f_double_value(&[])? > 0.0,
                None => false,
            },
        })
    }

    /// σ(logit) of the learned direction gate (as a 0-d tensor).
    fn gate_p(&self) -> Result<Option<Tensor>, TchError> {
        match (&self.gate, self.spec.direction) {
            (Some(g), Direction::Learned) => Ok(Some(g.f_select(0, self.layer)?.f_sigmoid()?)),
            _ => Ok(None),
        }
    }

    fn fresh(&self, x: &Tensor, ctx: &Ctx) -> Result<Fresh, TchError> {
        let (d, h, hs) = (self.dims.n_embd, self.dims.n_head, self.dims.head_size());
        let none = Fresh { q: None, k: None, v: None, c: None, z: None, qkr: None };
        let qkr = match &self.rope_qk {
            Some(l) => Some(heads(&l.forward(x)?, h + 1, self.dims.rope_dim())?),
            None => None,
        };
        Ok(match &self.proj {
            Proj::Fused(l) => {
                let qkv = l.forward(x)?.f_split(d, 2)?;
                Fresh {
                    q: Some(heads(&qkv[0], h, hs)?),
                    k: Some(heads(&qkv[1], h, hs)?),
                    v: Some(heads(&qkv[2], h, hs)?),
                    ..none
                }
            }
            Proj::Tied(l) => {
                let qv = l.forward(x)?.f_split(d, 2)?;
                let v = heads(&qv[1], h, hs)?;
                Fresh { q: Some(heads(&qv[0], h, hs)?), k: Some(v.shallow_clone()), v: Some(v), ..none }
            }
            Proj::TiedT(l) => {
                let qv = l.forward(x)?.f_split(d, 2)?;
                // K = x·W_v: the value map's weight used transposed (no bias).
                let wv = l.weight.f_narrow(0, d, d)?;
                let k = x.f_linear::<Tensor>(&wv.f_transpose(0, 1)?, None)?;
                Fresh {
                    q: Some(heads(&qv[0], h, hs)?),
                    k: Some(heads(&k, h, hs)?),
                    v: Some(heads(&qv[1], h, hs)?),
                    ..none
                }
            }
            Proj::Mla { q_proj, down, .. } => {
                let (c, z) = self.latent(&down.forward(x)?, ctx)?;
                Fresh { q: Some(heads(&q_proj.forward(x)?, h, hs)?), c: Some(c), z, qkr, ..none }
            }
            Proj::TokenLatent { down, .. } => {
                let (c, z) = self.latent(&down.forward(x)?, ctx)?;
                Fresh { c: Some(c), z, qkr, ..none }
            }
        })
    }

    /// The latent the layer uses (through KVSplice when present) and its
    /// compressed form.
    fn latent(&self, c: &Tensor, ctx: &Ctx) -> Result<(Tensor, Option<Tensor>), TchError> {
        let Some(sp) = &self.splice else { return Ok((c.shallow_clone(), None)) };
        let z = sp.compress(c)?;
        let back = sp.decompress(&z)?;
        ctx.record(|pr| {
            if pr.stats {
                let err =
                    tch::no_grad(|| back.f_sub(c)?.f_to_kind(Kind::Float)?.f_square()?.f_mean(Kind::Float))?;
                pr.recon.push((self.layer, err));
            }
            Ok(())
        })?;
        Ok((back, Some(z)))
    }

    /// K, V (and Q when asked) of every position from latents `c_all`.
    fn qkv_of_latent(
        &self,
        c_all: &Tensor,
        want_q: bool,
    ) -> Result<(Option<Tensor>, Tensor, Tensor), TchError> {
        let (d, h, hs) = (self.dims.n_embd, self.dims.n_head, self.dims.head_size());
        let (up, q_rows) = match &self.proj {
            Proj::Mla { up, .. } => (up, false),
            Proj::TokenLatent { up, .. } => (up, true),
            _ => return Err(te("from_latent on a projection layer".into())),
        };
        let off = if q_rows { d } else { 0 };
        let kv = linear_rows(up, c_all, off, 2 * d)?.f_split(d, 2)?;
        let q = if want_q && q_rows { Some(heads(&linear_rows(up, c_all, 0, d)?, h, hs)?) } else { None };
        Ok((q, heads(&kv[0], h, hs)?, heads(&kv[1], h, hs)?))
    }

    /// Visit `blocks.{layer}.attn.{leaf}` with heads [B, H, T, hs] shown as
    /// [B, T, H, hs] (TransformerLens's layout).
    fn hook_heads(&self, ctx: &Ctx, leaf: &str, t: Tensor) -> Result<Tensor, TchError> {
        if ctx.hooks.is_none() {
            return Ok(t);
        }
        let name = || format!("blocks.{}.attn.{leaf}", self.layer);
        if !ctx.wants(name) {
            return Ok(t);
        }
        ctx.hook(name, t.f_transpose(1, 2)?)?.f_transpose(1, 2)
    }

    fn hook_attn(&self, ctx: &Ctx, leaf: &str, t: Tensor) -> Result<Tensor, TchError> {
        ctx.hook(|| format!("blocks.{}.attn.{leaf}", self.layer), t)
    }

    /// Does a hook read or replace the scores or pattern of this layer?
    fn explicit_pattern(&self, ctx: &Ctx) -> bool {
        ctx.hooks.is_some()
            && ["hook_attn_scores", "hook_pattern"]
                .iter()
                .any(|leaf| ctx.wants(|| format!("blocks.{}.attn.{leaf}", self.layer)))
    }

    /// Softmax attention written out (what fused SDPA computes), so the
    /// scores and pattern can be hooked.
    fn attend_explicit(&self, q: &Tensor, k: &Tensor, v: &Tensor, ctx: &Ctx) -> Result<Tensor, TchError> {
        let (t, hs) = (q.size()[2], q.size()[3]);
        let scores = q.f_matmul(&k.f_transpose(-2, -1)?)?.f_mul_scalar(1.0 / (hs as f64).sqrt())?;
        let masked = causal_allowed(t, t, 0, q.device())?.f_logical_not()?;
        let scores =
            self.hook_attn(ctx, "hook_attn_scores", scores.f_masked_fill(&masked, f64::NEG_INFINITY)?)?;
        let pat = scores.f_softmax(-1, scores.f_kind()?)?;
        let pat = self.hook_attn(ctx, "hook_pattern", pat)?;
        pat.f_dropout(ctx.p, ctx.p > 0.0)?.f_matmul(&v.f_to_kind(pat.f_kind()?)?)
    }

    fn rope(&self, x: Tensor, start: i64) -> Result<Tensor, TchError> {
        if self.spec.rope == Rope::Full {
            rope::apply(&x, start, self.dims.rope_theta)
        } else {
            Ok(x)
        }
    }

    /// Attention output for `x` [B, T, d] at positions `pos0..`; with a
    /// cache, past tokens come from it and the new ones are written to it.
    pub fn forward(
        &self,
        x: &Tensor,
        pos0: i64,
        cache: Option<(&mut LayerCache, i64)>,
        ctx: &Ctx,
    ) -> Result<Tensor, TchError> {
        let size = x.size();
        let (b, t, d) = (size[0], size[1], size[2]);
        let cache = match cache {
            Some((lc, cap)) if t == 1 && self.foldable() && lc.prune.is_none() && lc.latent.is_some() => {
                return self.folded_cached(x, pos0, lc, cap, ctx)?.f_dropout(ctx.p, ctx.p > 0.0);
            }
            other => other,
        };
        let f = self.fresh(x, ctx)?;
        let (y, ctx_sum) = match cache {
            None => (self.hook_heads(ctx, "hook_z", self.attend_full(f, ctx)?)?, None),
            Some((lc, cap)) => {
                let y = self.attend_cached(x, f, pos0, lc, cap, ctx)?;
                (y, Some(&mut lc.ctx_sum))
            }
        };
        let y = match &self.router {
            Some(r) => r.combine(x, &y, pos0, ctx_sum, &self.c_proj, ctx, self.layer)?,
            None => {
                let y = y.f_transpose(1, 2)?.f_contiguous()?.f_view([b, t, d])?;
                self.c_proj.forward(&y)?
            }
        };
        y.f_dropout(ctx.p, ctx.p > 0.0)
    }

    /// Whole-sequence attention (training and evaluation without a cache).
    fn attend_full(&self, mut f: Fresh, ctx: &Ctx) -> Result<Tensor, TchError> {
        // A learned direction in training mixes both (straight-through);
        // otherwise the layer's direction is fixed now.
        let mixed = self.spec.direction == Direction::Learned && ctx.train;
        let recip_now = !mixed && self.reciprocal_now()?;
        let qkr = f.qkr.take();
        let (q, k, v) = match (&f.c, f.q) {
            (Some(c), q) => {
                let (ql, k, v) = self.qkv_of_latent(c, q.is_none())?;
                let q = q.or(ql).ok_or_else(|| te("no query".into()))?;
                (q, k, v)
            }
            (None, q) => (
                q.ok_or_else(|| te("no query".into()))?,
                f.k.ok_or_else(|| te("no key".into()))?,
                f.v.ok_or_else(|| te("no value".into()))?,
            ),
        };
        let q = self.hook_heads(ctx, "hook_q", q)?;
        let k = self.hook_heads(ctx, "hook_k", k)?;
        let v = self.hook_heads(ctx, "hook_v", v)?;
        let mut q = self.rope(q, 0)?;
        let mut k = self.rope(k, 0)?;
        if let Some(qkr) = qkr {
            let (qr, kr) = self.split_rope(rope::apply(&qkr, 0, self.dims.rope_theta)?)?;
            (q, k) = join_rope(&q, &k, &qr, &kr.f_unsqueeze(1)?)?;
        }
        if self.spec.rope.on() {
            q = self.hook_heads(ctx, "hook_rot_q", q)?;
            k = self.hook_heads(ctx, "hook_rot_k", k)?;
        }
        if self.spec.mixer == Mixer::Sba {
            let alpha = self.sba_alpha.as_ref().ok_or_else(|| te("sba without alpha".into()))?.f_sigmoid()?;
            let (y, a) = sba::f32_only(|| sba::full(&q, &k, &v, &alpha, ctx.p))?;
            self.keep_pattern(ctx, || Ok(a.shallow_clone()))?;
            return Ok(y);
        }
        if mixed {
            // Straight-through: the value is the hard choice, the gradient
            // reaches the logit through p.
            let p = self.gate_p()?.ok_or_else(|| te("learned direction without a gate".into()))?;
            let hard = p.f_gt(0.5)?.f_to_kind(p.f_kind()?)?;
            let st = hard.f_add(&p)?.f_sub(&p.f_detach()?)?;
            let ys = sdpa(&q, &k, &v, 0, ctx.p)?;
            let yr = sdpa(&k, &q, &v, 0, ctx.p)?;
            let st = st.f_to_kind(ys.f_kind()?)?;
            self.keep_pattern(ctx, || {
                let ps = pattern(&q, &k, 0)?;
                let pr = pattern(&k, &q, 0)?;
                ps.f_add(&hard.f_to_kind(Kind::Float)?.f_mul(&pr.f_sub(&ps)?)?)
            })?;
            return ys.f_add(&st.f_mul(&yr.f_sub(&ys)?)?);
        }
        let (q, k) = if recip_now { (k, q) } else { (q, k) };
        self.keep_pattern(ctx, || pattern(&q, &k, 0))?;
        if self.explicit_pattern(ctx) {
            return self.attend_explicit(&q, &k, &v, ctx);
        }
        sdpa(&q, &k, &v, 0, ctx.p)
    }

    fn keep_pattern(&self, ctx: &Ctx, f: impl FnOnce() -> Result<Tensor, TchError>) -> Result<(), TchError> {
        ctx.record(|pr| {
            if pr.patterns_for.contains(&self.layer) {
                let a = tch::no_grad(f)?;
                pr.patterns.push((self.layer, a));
            }
            Ok(())
        })
    }

    /// Attention of new tokens over the cache (decoding, chunked prefill).
    fn attend_cached(
        &self,
        x: &Tensor,
        f: Fresh,
        pos0: i64,
        lc: &mut LayerCache,
        cap: i64,
        ctx: &Ctx,
    ) -> Result<Tensor, TchError> {
        let (h, hs) = (self.dims.n_head, self.dims.head_size());
        let b = match (&f.q, &f.c) {
            (Some(q), _) => q.size()[0],
            (_, Some(c)) => c.size()[0],
            _ => return Err(te("nothing projected".into())),
        };
        let recip = lc.reciprocal;
        if lc.prune.is_some() {
            let axes = format!("kv {:?}, mixer {:?}", self.spec.kv, self.spec.mixer).to_lowercase();
            super::kvprune::check_spec(&self.spec, &axes).map_err(|e| te(e.to_string()))?;
        }
        let mut value_eff = None;
        let (query, key, value) = if let Some(c_new) = &f.c {
            let t = c_new.size()[1];
            let stored = f.z.as_ref().unwrap_or(c_new);
            let width = stored.size()[2];
            let (q_rot, row) = self.cache_row(stored, f.qkr.as_ref(), At::Start(pos0))?;
            let all = self.write_latent(&mut lc.latent, &row, pos0, cap)?;
            if t == 1 && !recip && self.spec.absorbable() {
                let q_c = self.content_query(f.q.as_ref(), c_new)?;
                let rows = self.aligned_rows(lc, pos0)?;
                let (y, p) = self.fold()?.attend(&q_c, q_rot.as_ref(), &rows, Mask::Causal(pos0))?;
                self.keep_pattern(ctx, || p.f_narrow(3, 0, pos0 + 1))?;
                return Ok(y);
            }
            let lat = all.f_narrow(2, 0, width)?;
            let c_all = match &self.splice {
                Some(sp) => sp.decompress(&lat)?,
                None => lat,
            };
            let (q_all, k_all, v_all) = self.qkv_of_latent(&c_all, recip)?;
            let k_all = self.rope(k_all, 0)?;
            if recip {
                let q_all = self.rope(q_all.ok_or_else(|| te("reciprocal needs queries".into()))?, 0)?;
                let k_new = k_all.f_narrow(2, pos0, t)?;
                (k_new, q_all, v_all)
            } else {
                let q_new = self.rope(self.content_query(f.q.as_ref(), c_new)?, pos0)?;
                match q_rot {
                    Some(qr) => {
                        let kr = all.f_narrow(2, width, row.size()[2] - width)?.f_unsqueeze(1)?;
                        let (q, k) = join_rope(&q_new, &k_all, &qr, &kr)?;
                        (q, k, v_all)
                    }
                    None => (q_new, k_all, v_all),
                }
            }
        } else {
            let q = self.rope(f.q.ok_or_else(|| te("no query".into()))?, pos0)?;
            let v = f.v.ok_or_else(|| te("no value".into()))?;
            let shape = [b, h, cap, hs];
            if let Some(r) = lc.prune.as_ref().and_then(|st| st.cfg.recon.clone()) {
                // ṽ of the new positions, from their own attention input.
                let ve = r.0.veff(self.layer as usize, x, &v)?;
                value_eff = Some(cache::write(&mut lc.value_eff, &shape, 2, pos0, &ve)?);
            }
            if self.spec.kv == KvSource::Tied && !recip {
                // K = V: keep the values once; keys are the (rotated) values.
                let v_all = cache::write(&mut lc.value, &shape, 2, pos0, &v)?;
                let k_all = self.rope(v_all.shallow_clone(), 0)?;
                (q, k_all, v_all)
            } else {
                let k = self.rope(f.k.ok_or_else(|| te("no key".into()))?, pos0)?;
                let (query, key_new) = if recip { (k, q) } else { (q, k) };
                let key_all = cache::write(&mut lc.key, &shape, 2, pos0, &key_new)?;
                let v_all = cache::write(&mut lc.value, &shape, 2, pos0, &v)?;
                (query, key_all, v_all)
            }
        };
        if self.spec.mixer == Mixer::Sba {
            let alpha = self.sba_alpha.as_ref().ok_or_else(|| te("sba without alpha".into()))?.f_sigmoid()?;
            return sba::f32_only(|| sba::cached(&query, &key, &value, &alpha, pos0, &mut lc.col_norm, cap));
        }
        if let Some(st) = lc.prune.as_mut() {
            return st.attend(&query, &key, &value, value_eff.as_ref(), pos0, cap);
        }
        self.keep_pattern(ctx, || pattern(&query, &key, pos0))?;
        sdpa(&query, &key, &value, pos0, 0.0)
    }

    /// Rotated decoupled RoPE parts [B, H+1, T, d_r] split into the queries
    /// [B, H, T, d_r] and the shared key [B, T, d_r].
    fn split_rope(&self, rotated: Tensor) -> Result<(Tensor, Tensor), TchError> {
        let h = self.dims.n_head;
        Ok((rotated.f_narrow(1, 0, h)?, rotated.f_select(1, h)?))
    }

    /// Rows a cache slot of `n` tokens allocates. An absorbed latent rounds
    /// up to a multiple of 16: its score and mixing matmuls run over the
    /// rows, and a row count that is not a multiple of 8 keeps cuBLAS off
    /// its bf16 tensor-core kernels (docs/benchmarks.md, "absorbed latent
    /// decoding"). The extra rows are masked and never written.
    pub fn slot_tokens(spec: &Spec, n: i64) -> Result<i64, TchError> {
        if !spec.absorbable() {
            return Ok(n);
        }
        n.checked_add(15)
            .map(|m| m / 16 * 16)
            .ok_or_else(|| te(format!("a cache of {n} tokens overflows 64 bits")))
    }

    /// The cache row of new tokens, `stored` [B, T, w] (c, or z with
    /// KVSplice) followed by the rotated decoupled RoPE key when there is
    /// one, and the rotated RoPE query parts [B, H, T, d_r].
    fn cache_row(
        &self,
        stored: &Tensor,
        qkr: Option<&Tensor>,
        at: At,
    ) -> Result<(Option<Tensor>, Tensor), TchError> {
        let Some(qkr) = qkr else { return Ok((None, stored.shallow_clone())) };
        let theta = self.dims.rope_theta;
        let rotated = match at {
            At::Start(pos0) => rope::apply(qkr, pos0, theta)?,
            At::Device(pos, rows) => rope::apply_at(qkr, pos, rows, theta)?,
        };
        let (qr, kr) = self.split_rope(rotated)?;
        Ok((Some(qr), Tensor::f_cat(&[stored, &kr.f_to_kind(stored.f_kind()?)?], 2)?))
    }

    /// Write `row` [B, T, w] at `pos0` into the latent `slot` (allocated
    /// with [`Self::slot_tokens`] rows) and return its filled rows; writes
    /// past the capacity are refused even where padding rows exist.
    fn write_latent(
        &self,
        slot: &mut Option<Tensor>,
        row: &Tensor,
        pos0: i64,
        cap: i64,
    ) -> Result<Tensor, TchError> {
        let s = row.size();
        if pos0 + s[1] > cap {
            return Err(te(format!(
                "kv cache full: {cap} tokens allocated, writing {} at position {pos0}",
                s[1]
            )));
        }
        cache::write(slot, &[s[0], Self::slot_tokens(&self.spec, cap)?, s[2]], 1, pos0, row)
    }

    /// The latent slot's rows an absorbed step at `pos0` reads: the filled
    /// ones rounded up to 16, the rest masked by the step.
    fn aligned_rows(&self, lc: &LayerCache, pos0: i64) -> Result<Tensor, TchError> {
        let slot = lc.latent.as_ref().ok_or_else(|| te("latent slot".into()))?;
        slot.f_narrow(1, 0, Self::slot_tokens(&self.spec, pos0 + 1)?.min(slot.size()[1]))
    }

    /// The content query of latent-layer tokens: their own projection, or
    /// the rows of the token latent `c`.
    fn content_query(&self, q: Option<&Tensor>, c: &Tensor) -> Result<Tensor, TchError> {
        match q {
            Some(q) => Ok(q.shallow_clone()),
            None => self.q_of_latent(c),
        }
    }

    /// Does a decode step of this layer run on [`Folded`] weights? `mla`
    /// layers (Q from its own projection, no KVSplice) that attend absorbed.
    fn foldable(&self) -> bool {
        self.spec.absorbable() && self.splice.is_none() && matches!(self.proj, Proj::Mla { .. })
    }

    /// The cache's folded weights, made on first use in the cache's dtype.
    fn folded<'c>(&self, cell: &'c std::cell::OnceCell<Folded>, kind: Kind) -> Result<&'c Folded, TchError> {
        if let Some(f) = cell.get() {
            return Ok(f);
        }
        let Proj::Mla { q_proj, down, up } = &self.proj else {
            return Err(te("folded weights on a layer without an MLA projection".into()));
        };
        let w = MlaWeights { q_proj, down, up, rope_qk: self.rope_qk.as_ref(), c_proj: &self.c_proj };
        let _ = cell.set(Folded::new(&w, self.dims.n_head, self.dims.head_size(), kind)?);
        cell.get().ok_or_else(|| te("folded weights".into()))
    }

    fn rope_dim_or_0(&self) -> i64 {
        if self.rope_qk.is_some() {
            self.dims.rope_dim()
        } else {
            0
        }
    }

    /// One eager decode token `x` [B, 1, d] at `pos0` on folded weights:
    /// the attention output after `c_proj`.
    fn folded_cached(
        &self,
        x: &Tensor,
        pos0: i64,
        lc: &mut LayerCache,
        cap: i64,
        ctx: &Ctx,
    ) -> Result<Tensor, TchError> {
        let kind = lc.latent.as_ref().ok_or_else(|| te("latent slot".into()))?.f_kind()?;
        let fd = self.folded(&lc.folded, kind)?;
        let (a, qkr, c) = fd.project(x, self.dims.n_head, self.rope_dim_or_0())?;
        let (q_r, row) = self.cache_row(&c, qkr.as_ref(), At::Start(pos0))?;
        let _ = self.write_latent(&mut lc.latent, &row, pos0, cap)?;
        let rows = self.aligned_rows(lc, pos0)?;
        let q_r = q_r.map(|q| q.f_squeeze_dim(2)).transpose()?;
        let (y, p) = fd.attend(&a, q_r.as_ref(), &rows, self.dims.head_size(), Mask::Causal(pos0))?;
        self.keep_pattern(ctx, || p.f_narrow(3, 0, pos0 + 1))?;
        Ok(y)
    }

    /// The folded static step through `kernels::mla` (a bf16 cache on a
    /// GPU, when `KNLP_FUSED_MLA_DECODE=1`): three kernels from the input
    /// projection to the mixed latent instead of about a dozen. None where
    /// they are off, do not apply or fail (the libtorch path then runs; it
    /// rewrites the same cache row).
    fn fused_static(
        &self,
        fd: &Folded,
        x: &Tensor,
        pos: &Tensor,
        all: &Tensor,
    ) -> Result<Option<Tensor>, TchError> {
        use crate::kernels::mla;
        let (h, dr) = (self.dims.n_head, self.rope_dim_or_0());
        let sh = mla::Shape { heads: h, r: fd.w_out.size()[1] / h, dr };
        let dev = all.device();
        if !mla::enabled()
            || all.f_kind()? != Kind::BFloat16
            || !sh.fits()
            || x.size()[1] != 1
            || !crate::kernels::usable(dev)
        {
            return Ok(None);
        }
        let out = x.f_linear(&fd.w_in, Some(&fd.b_in))?.f_contiguous()?;
        if out.f_kind()? != Kind::BFloat16 {
            return Ok(None);
        }
        let n = all.size()[1];
        // The table `rope::apply_at` would read for this slot (the same one).
        let cs = match dr {
            0 => None,
            _ => Some(rope::cos_sin(dev, Kind::BFloat16, self.dims.rope_theta, dr, n)?),
        };
        let scale = 1.0 / ((self.dims.head_size() + dr) as f64).sqrt();
        let mixed =
            mla::row(sh, &out, cs.as_ref(), pos, all).and_then(|qq| mla::attend(sh, &qq, all, pos, scale));
        match mixed {
            Ok(m) => Ok(Some(m.f_reshape([x.size()[0], 1, h * sh.r])?.f_linear(&fd.w_out, Some(&fd.b_out))?)),
            Err(e) => {
                crate::kernels::disable(&e);
                Ok(None)
            }
        }
    }

    /// The maps an absorbed step folds (`absorb`); latent layers only.
    fn fold(&self) -> Result<Fold<'_>, TchError> {
        let d = self.dims.n_embd;
        let (up, k_off) = match &self.proj {
            Proj::Mla { up, .. } => (up, 0),
            Proj::TokenLatent { up, .. } => (up, d),
            _ => return Err(te("absorbed attention on a layer without a latent".into())),
        };
        let width = self.splice.as_ref().map_or(self.dims.d_latent, |sp| sp.d_c);
        Ok(Fold {
            up,
            k_off,
            splice: self.splice.as_ref(),
            n_head: self.dims.n_head,
            head_size: self.dims.head_size(),
            width,
        })
    }

    fn q_of_latent(&self, c: &Tensor) -> Result<Tensor, TchError> {
        let (d, h, hs) = (self.dims.n_embd, self.dims.n_head, self.dims.head_size());
        match &self.proj {
            Proj::TokenLatent { up, .. } => heads(&linear_rows(up, c, 0, d)?, h, hs),
            _ => Err(te("query from latent on a layer without one".into())),
        }
    }

    pub fn sba_alpha(&self) -> Option<&Tensor> {
        self.sba_alpha.as_ref()
    }

    /// Why this layer has no static-shape decode step ([`Self::forward_static`]);
    /// None when it has one: per-token K/V projections (or K = V), softmax
    /// mixing, no RoPE; or a latent the step attends to absorbed (`absorb`).
    pub fn static_unsupported(spec: &Spec) -> Option<String> {
        if spec.latent() {
            return (!spec.absorbable()).then(|| {
                "the static decode step reads a latent only absorbed: it needs direction standard, softmax \
                 mixing and RoPE off or decoupled (RoPE over the whole head expands every cached latent)"
                    .into()
            });
        }
        if !matches!(spec.kv, KvSource::Proj | KvSource::Tied | KvSource::TiedT) {
            return Some(format!("the static decode step needs per-token K/V, not kv {:?}", spec.kv));
        }
        if spec.mixer != Mixer::Softmax {
            return Some(format!("the static decode step needs softmax mixing, not mixer {:?}", spec.mixer));
        }
        if spec.rope.on() {
            return Some("the static decode step has no RoPE over per-token K/V".into());
        }
        None
    }

    /// One decode token `x` [B, 1, d] at the device position `pos` ([1]
    /// int64) over the whole preallocated cache: the new K/V are written
    /// with `index_copy_` at `pos`; `mask` [1, 1, 1, ≥ slot rows] is added
    /// to the scores over the slot's rows (0 for rows `<= pos`, -inf for
    /// those not yet written), in the attention's dtype. Every shape is the same at every
    /// step and nothing reads back to the host, so a CUDA graph can record
    /// it. The projections and the output are [`Self::forward`]'s.
    pub fn forward_static(
        &self,
        x: &Tensor,
        pos: &Tensor,
        mask: &Tensor,
        lc: &LayerCache,
        ctx: &Ctx,
    ) -> Result<Tensor, TchError> {
        if let Some(why) = Self::static_unsupported(&self.spec) {
            return Err(te(why));
        }
        let size = x.size();
        let (b, t, d) = (size[0], size[1], size[2]);
        let slot = |s: &Option<Tensor>| {
            s.as_ref()
                .map(|t| t.shallow_clone())
                .ok_or_else(|| te("static decode: the cache slot is empty (prefill first)".into()))
        };
        if self.spec.latent() {
            // Absorbed: write this token's cache row at `pos`, attend over all rows.
            let mut all = slot(&lc.latent)?;
            let n = all.size()[1];
            let mask = mask.f_narrow(3, 0, n)?;
            let at = At::Device(pos, n);
            if self.foldable() {
                // Folded weights (made by the eager warm-up, before any capture).
                let fd = self.folded(&lc.folded, all.f_kind()?)?;
                if let Some(y) = self.fused_static(fd, x, pos, &all)? {
                    return Ok(y);
                }
                let (a, qkr, c) = fd.project(x, self.dims.n_head, self.rope_dim_or_0())?;
                let (q_r, row) = self.cache_row(&c, qkr.as_ref(), at)?;
                let _ = all.f_index_copy_(1, pos, &row)?;
                let q_r = q_r.map(|q| q.f_squeeze_dim(2)).transpose()?;
                let hs = self.dims.head_size();
                return Ok(fd.attend(&a, q_r.as_ref(), &all, hs, Mask::Additive(&mask))?.0);
            }
            let f = self.fresh(x, ctx)?;
            let c = f.c.as_ref().ok_or_else(|| te("no latent".into()))?;
            let (q_rot, row) = self.cache_row(f.z.as_ref().unwrap_or(c), f.qkr.as_ref(), at)?;
            let _ = all.f_index_copy_(1, pos, &row)?;
            let q_c = self.content_query(f.q.as_ref(), c)?;
            let (y, _) = self.fold()?.attend(&q_c, q_rot.as_ref(), &all, Mask::Additive(&mask))?;
            let y = y.f_transpose(1, 2)?.f_contiguous()?.f_view([b, t, d])?;
            return self.c_proj.forward(&y);
        }
        let f = self.fresh(x, ctx)?;
        let q = f.q.ok_or_else(|| te("no query".into()))?;
        let v = f.v.ok_or_else(|| te("no value".into()))?;
        let (query, key, value) = if self.spec.kv == KvSource::Tied && !lc.reciprocal {
            let mut v_all = slot(&lc.value)?;
            let _ = v_all.f_index_copy_(2, pos, &v)?;
            (q, v_all.shallow_clone(), v_all)
        } else {
            let k = f.k.ok_or_else(|| te("no key".into()))?;
            let (query, key_new) = if lc.reciprocal { (k, q) } else { (q, k) };
            let mut key_all = slot(&lc.key)?;
            let mut v_all = slot(&lc.value)?;
            let _ = key_all.f_index_copy_(2, pos, &key_new)?;
            let _ = v_all.f_index_copy_(2, pos, &v)?;
            (query, key_all, v_all)
        };
        let y = Tensor::f_scaled_dot_product_attention(
            &query,
            &key,
            &value,
            Some(mask.f_narrow(3, 0, key.size()[2])?),
            0.0,
            false,
            None,
            false,
        )?;
        let y = y.f_transpose(1, 2)?.f_contiguous()?.f_view([b, t, d])?;
        self.c_proj.forward(&y)
    }
}
