//! Autoregressive generation for GPT-2 and its attention variants:
//! prefill the prompt into a preallocated cache, then one token per step
//! (or, without a cache, a full forward over the cropped window per step).
//!
//! Sampling: temperature 0 is greedy (argmax); otherwise logits / T, keep
//! the `top_k` largest, softmax, one multinomial draw. Only the tokenizer's
//! `vocab_size` ids are candidates (the padded rows never are).
//!
//! Greedy cached decoding on CUDA replays a CUDA graph of one static-shape
//! step by default ([`graph`], [`GraphMode`]).
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use tch::{Device, Kind, Tensor};

use crate::attention::kvprune;
use crate::models::gpt2::Gpt2;
use crate::models::Model;
use crate::shim::AutocastDtype;
use crate::tensor::torch_error;

pub mod graph;
pub mod kveval;
pub mod recon;

fn te(e: tch::TchError) -> anyhow::Error {
    anyhow!(torch_error(&e))
}

/// The most tokens one call generates (a sliding window allows more than
/// `block_size`; this bounds a mistyped count).
pub const MAX_NEW_TOKENS: i64 = 1 << 20;

#[derive(Clone, Debug)]
pub struct Options {
    pub max_new_tokens: i64,
    pub temperature: f64,
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    /// Decode through the KV cache (else recompute the window per token).
    pub cache: bool,
    /// Keep each step's logits [B, vocab] (tests, analysis).
    pub keep_logits: bool,
    /// Autocast dtype on CUDA (None: float32 throughout).
    pub amp: Option<AutocastDtype>,
    /// Prune what each decode step reads from the cache (`attention::kvprune`).
    pub kv_prune: Option<kvprune::Config>,
    /// Decode steps through a CUDA graph ([`graph`]).
    pub graph: GraphMode,
}

/// How the decode steps after the prefill run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GraphMode {
    /// A CUDA graph of the static-shape step where one can run (CUDA, a
    /// supported variant, greedy, cache on, no kv_prune); eager otherwise.
    #[default]
    Auto,
    /// Eager steps through the growing cache.
    Off,
    /// A CUDA graph; where none can run, eager with one warning on stderr.
    On,
    /// The static-shape step run eagerly, never captured (tests on any
    /// device; an error where the step cannot run).
    StaticEager,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_new_tokens: 32,
            temperature: 0.0,
            top_k: None,
            seed: None,
            cache: true,
            keep_logits: false,
            amp: None,
            kv_prune: None,
            graph: GraphMode::Auto,
        }
    }
}

pub struct Generated {
    /// Prompt and new tokens [B, T0 + max_new_tokens].
    pub tokens: Tensor,
    /// Per step, the logits the new token was drawn from [B, vocab_size].
    pub logits: Vec<Tensor>,
    /// Bytes of the cache generation allocated (0 without a cache).
    pub cache_bytes: i64,
    /// Tokens the cache was allocated for.
    pub cache_tokens: i64,
    /// Element size of the cache's activations (4 float32, 2 bf16).
    pub cache_elem: i64,
    /// Seconds: prompt forward (first token's logits), then the remaining steps.
    pub prefill_s: f64,
    pub decode_s: f64,
    /// Fraction of the cached positions the decode steps read (1.0 unpruned).
    pub read_fraction: f64,
    /// The decode steps replayed a CUDA graph.
    pub graph: bool,
    /// Seconds of `decode_s` spent on the graph's warm-up and capture.
    pub capture_s: f64,
}

fn sync(d: Device) {
    if let Device::Cuda(i) = d {
        tch::Cuda::synchronize(i as i64);
    }
}

fn with_amp<T>(amp: Option<AutocastDtype>, f: impl FnOnce() -> Result<T, tch::TchError>) -> Result<T> {
    match amp {
        Some(d) => crate::shim::with_autocast(d, f).map_err(|e| anyhow!(e))?.map_err(te),
        None => f().map_err(te),
    }
}

/// Next tokens [B, 1] from last-position logits [B, vocab].
fn pick(logits: &Tensor, o: &Options) -> Result<Tensor> {
    if o.temperature <= 0.0 {
        return logits.f_argmax(-1, true).map_err(te);
    }
    let mut l = logits.f_to_kind(Kind::Float).and_then(|l| l.f_div_scalar(o.temperature)).map_err(te)?;
    if let Some(k) = o.top_k {
        let k = k.min(l.size()[1]);
        let (top, _) = l.f_topk(k, -1, true, true).map_err(te)?;
        let kth = top.f_narrow(1, k - 1, 1).map_err(te)?;
        let below = l.f_lt_tensor(&kth).map_err(te)?;
        l = l.f_masked_fill(&below, f64::NEG_INFINITY).map_err(te)?;
    }
    l.f_softmax(-1, Kind::Float).and_then(|p| p.f_multinomial(1, true)).map_err(te)
}

/// Can `model` decode with pruning `p`: valid options, a prunable
/// attention, and a reconstructor (if any) made for this model's shape?
fn check_prune(model: &Gpt2, p: &kvprune::Config) -> Result<()> {
    p.validate()?;
    kvprune::check_spec(model.spec(), &model.cfg().attention)?;
    match &p.recon {
        Some(r) => recon::check(&r.0, model),
        None => Ok(()),
    }
}

/// `tokens` as int64 ids on `dev`, refused unless they are integer ids in
/// [0, vocab_size); errors start with `what`.
pub(crate) fn token_ids(what: &str, model: &Gpt2, tokens: &Tensor, dev: Device) -> Result<Tensor> {
    let kind = tokens.f_kind().map_err(te)?;
    if !matches!(kind, Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8) {
        bail!("{what}: tokens must be integer ids, got {}", crate::tensor::kind_name(kind));
    }
    let vocab = model.cfg().vocab_size;
    // The range is checked where the tokens are (a prompt from a script is
    // on the CPU), in one reduction and one read.
    let (lo, hi) = tch::no_grad(|| -> Result<(i64, i64), tch::TchError> {
        let (lo, hi) = tokens.f_aminmax(None::<i64>, false)?;
        let both = Tensor::f_stack(&[lo.f_to_kind(Kind::Int64)?, hi.f_to_kind(Kind::Int64)?], 0)?
            .f_to_device(Device::Cpu)?;
        Ok((both.f_int64_value(&[0])?, both.f_int64_value(&[1])?))
    })
    .map_err(te)?;
    let ids = tokens.f_to_device(dev).and_then(|p| p.f_to_kind(Kind::Int64)).map_err(te)?;
    if lo < 0 || hi >= vocab {
        bail!("{what}: token ids must lie in [0, {vocab}), got ids from {lo} to {hi}");
    }
    Ok(ids)
}

/// Generate `o.max_new_tokens` tokens after `prompt` [B, T0] (int64 ids).
pub fn generate(model: &Gpt2, prompt: &Tensor, o: &Options) -> Result<Generated> {
    let shape = prompt.size();
    let [b, t0] = shape[..] else { bail!("generate: tokens must be [B, T], got {shape:?}") };
    if b < 1 || t0 < 1 {
        bail!("generate: the prompt needs at least one token per sequence, got {shape:?}");
    }
    if !(1..=MAX_NEW_TOKENS).contains(&o.max_new_tokens) {
        bail!("generate: max_new_tokens must be in 1..={MAX_NEW_TOKENS}, got {}", o.max_new_tokens);
    }
    let dev = model.store().device();
    let prompt = token_ids("generate", model, prompt, dev)?;
    let vocab = model.cfg().vocab_size;
    if !(o.temperature >= 0.0 && o.temperature.is_finite()) {
        bail!("generate: temperature must be a finite number >= 0, got {}", o.temperature);
    }
    if o.top_k.is_some_and(|k| k < 1) {
        bail!("generate: top_k must be at least 1");
    }
    let block = model.cfg().block_size;
    let total = t0 + o.max_new_tokens;
    // The last new token is never fed back, so the cache holds total − 1.
    if o.cache && total - 1 > block {
        bail!(
            "generate: prompt ({t0}) + max_new_tokens ({}) = {total} exceeds block_size {block}; \
             shorten them, or pass cache: false to slide a {block}-token window",
            o.max_new_tokens
        );
    }
    if let Some(p) = &o.kv_prune {
        if !o.cache {
            bail!("generate: kv_prune prunes the KV cache; it needs cache: true");
        }
        check_prune(model, p)?;
    }
    if let Some(s) = o.seed {
        tch::manual_seed(s);
    }
    let amp = if dev.is_cuda() { o.amp } else { None };
    let _guard = tch::no_grad_guard();
    let mut out = vec![prompt.shallow_clone()];
    let mut kept = Vec::new();
    let plan = graph::plan(model, o, dev)?;
    let (mut graph_used, mut capture_s) = (false, 0.0);
    let last = |l: &Tensor| -> Result<Tensor> {
        let t = l.size()[1];
        l.f_select(1, t - 1).and_then(|x| x.f_narrow(-1, 0, vocab)).map_err(te)
    };
    sync(dev);
    let start = Instant::now();
    let (cache_bytes, cache_tokens, cache_elem, prefill_s, read_fraction);
    if o.cache {
        // The last generated token is never fed back: the cache needs total − 1.
        let mut cache = model.new_cache(b, total - 1).map_err(te)?;
        if let Some(p) = &o.kv_prune {
            cache.set_prune(p);
        }
        let logits = with_amp(amp, || model.forward_cached_last(&prompt, &mut cache))?;
        let mut cur = last(&logits)?;
        sync(dev);
        prefill_s = start.elapsed().as_secs_f64();
        let steps = if plan == graph::Plan::Eager { o.max_new_tokens } else { 0 };
        if plan != graph::Plan::Eager {
            let r = graph::decode(model, &mut cache, &cur, o, amp, plan == graph::Plan::Capture)?;
            out.push(r.tokens);
            kept = r.logits;
            graph_used = r.graph;
            capture_s = r.capture_s;
        }
        for step in 0..steps {
            let next = pick(&cur, o)?;
            if o.keep_logits {
                kept.push(cur.f_to_kind(Kind::Float).map_err(te)?);
            }
            out.push(next.shallow_clone());
            if step + 1 == o.max_new_tokens {
                break;
            }
            let logits = with_amp(amp, || model.forward_cached_last(&next, &mut cache))?;
            cur = last(&logits)?;
        }
        read_fraction = cache.prune_read_fraction();
        cache_bytes = cache.bytes();
        cache_tokens = cache.capacity;
        cache_elem = cache
            .layers
            .iter()
            .find_map(|l| l.key.as_ref().or(l.value.as_ref()).or(l.latent.as_ref()))
            .map_or(4, |t| crate::attention::cache::elem_size(t.kind()));
    } else {
        let mut seq = prompt.shallow_clone();
        let mut first = true;
        let mut pre = 0.0;
        for _ in 0..o.max_new_tokens {
            let t = seq.size()[1];
            let window = seq.f_narrow(1, (t - block).max(0), t.min(block)).map_err(te)?;
            let logits = with_amp(amp, || model.forward(&window, false))?;
            let cur = last(&logits)?;
            let next = pick(&cur, o)?;
            if first {
                sync(dev);
                pre = start.elapsed().as_secs_f64();
                first = false;
            }
            if o.keep_logits {
                kept.push(cur.f_to_kind(Kind::Float).map_err(te)?);
            }
            seq = Tensor::f_cat(&[&seq, &next], 1).map_err(te)?;
            out.push(next);
        }
        prefill_s = pre;
        cache_bytes = 0;
        cache_tokens = 0;
        cache_elem = 0;
        read_fraction = 1.0;
    }
    sync(dev);
    let decode_s = start.elapsed().as_secs_f64() - prefill_s;
    let tokens = Tensor::f_cat(&out, 1).map_err(te)?;
    Ok(Generated {
        tokens,
        logits: kept,
        cache_bytes,
        cache_tokens,
        cache_elem,
        prefill_s,
        decode_s,
        read_fraction,
        graph: graph_used,
        capture_s,
    })
}

/// Teacher-forced decoding of `tokens` [B, T] through the cache.
pub struct Scored {
    /// Per-position negative log-likelihood [B, T − 1] of tokens 1..T.
    pub nll: Tensor,
    /// Mean of `nll`, and exp of it.
    pub loss: f64,
    pub ppl: f64,
    /// Tokens predicted by single-token decode steps, and their seconds.
    pub decoded: i64,
    pub decode_s: f64,
    /// Fraction of the cached positions the decode steps read (1.0 unpruned).
    pub read_fraction: f64,
}

/// Perplexity of `tokens` [B, T] under cached decoding: the first `prefill`
/// tokens go in one forward (dense), then every later token is fed alone,
/// as generation feeds its own tokens, and the next token's log-likelihood
/// is scored. With `prune`, every single-token step reads only what
/// `attention::kvprune` selects. Float32, no autocast.
pub fn score_cached(
    model: &Gpt2,
    tokens: &Tensor,
    prefill: i64,
    prune: Option<&kvprune::Config>,
) -> Result<Scored> {
    let shape = tokens.size();
    let [b, t] = shape[..] else { bail!("kv_prune_eval: tokens must be [B, T], got {shape:?}") };
    if b < 1 || t < 2 {
        bail!("kv_prune_eval: tokens must be [B, T] with T >= 2, got {shape:?}");
    }
    let block = model.cfg().block_size;
    if t - 1 > block {
        bail!("kv_prune_eval: {t} tokens need a cache of {} > block_size {block}", t - 1);
    }
    if !(1..t).contains(&prefill) {
        bail!("kv_prune_eval: prefill must be in 1..{} (T − 1), got {prefill}", t - 1);
    }
    if let Some(p) = prune {
        check_prune(model, p)?;
    }
    let _guard = tch::no_grad_guard();
    let dev = model.store().device();
    let x = token_ids("kv_prune_eval", model, tokens, dev)?;
    let vocab = model.cfg().vocab_size;
    let mut cache = model.new_cache(b, t - 1).map_err(te)?;
    if let Some(p) = prune {
        cache.set_prune(p);
    }
    // Log-likelihood of the targets of logits [B, n, vocab+pad].
    let nll_of = |logits: &Tensor, targets: &Tensor| -> Result<Tensor> {
        let lp = logits
            .f_narrow(-1, 0, vocab)
            .and_then(|l| l.f_to_kind(Kind::Float))
            .and_then(|l| l.f_log_softmax(-1, Kind::Float))
            .map_err(te)?;
        lp.f_gather(-1, &targets.f_unsqueeze(-1).map_err(te)?, false)
            .and_then(|g| g.f_squeeze_dim(-1))
            .and_then(|g| g.f_neg())
            .map_err(te)
    };
    let logits = model.forward_cached(&x.f_narrow(1, 0, prefill).map_err(te)?, &mut cache).map_err(te)?;
    let mut parts = vec![nll_of(&logits, &x.f_narrow(1, 1, prefill).map_err(te)?)?];
    sync(dev);
    let start = Instant::now();
    for i in prefill..t - 1 {
        let logits = model.forward_cached(&x.f_narrow(1, i, 1).map_err(te)?, &mut cache).map_err(te)?;
        parts.push(nll_of(&logits, &x.f_narrow(1, i + 1, 1).map_err(te)?)?);
    }
    sync(dev);
    let decode_s = start.elapsed().as_secs_f64();
    let nll = Tensor::f_cat(&parts, 1).map_err(te)?;
    let loss = nll.f_mean(Kind::Float).and_then(|m| m.f_double_value(&[])).map_err(te)?;
    Ok(Scored {
        nll,
        loss,
        ppl: loss.exp(),
        decoded: b * (t - 1 - prefill),
        decode_s,
        read_fraction: cache.prune_read_fraction(),
    })
}
