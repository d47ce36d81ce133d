//! The CUDA-graphed decode step: after the prefill, every greedy decode
//! step has the same shapes, so one step is recorded as a CUDA graph and
//! replayed once per token (one launch instead of a few hundred).
//!
//! The static-shape step ([`crate::models::gpt2::Gpt2::forward_static`]):
//!
//! ```text
//! tok [B, 1] int64, pos [1] int64, col [1] int64      device buffers
//! x = wte[tok] + wpe[pos]                           (index_select at pos)
//! mask[pos] = 0                     (mask: 0 before t0, -inf from t0 on)
//! per layer: q, k, v of the new token; K[:, :, pos] = k; V[:, :, pos] = v
//!            (index_copy_ into the cache preallocated to its full capacity)
//!            softmax(q·Kᵀ/√hs + mask) V over all cap slots
//!            (a latent layer that decodes absorbed writes its cache row
//!            at pos and attends absorbed over all its rows instead;
//!            `attention::absorb`)
//! next = argmax(logits[:, :vocab]); tok = next; out[:, col] = next
//! pos += 1; col += 1                                (in place)
//! ```
//!
//! The mask is therefore 0 exactly where `arange <= pos`, over the cap
//! slots rounded up to 16 (each layer reads the columns of its slot). It is one
//! additive tensor in the cache's dtype whose row stride is a multiple of
//! 16, so SDPA (the memory-efficient kernel on CUDA) takes it as it is:
//! a boolean mask would be converted, and an unaligned one padded, in
//! every layer of every step.
//!
//! Slots past `pos` hold zeros and are masked, so each step computes what
//! the eager cached step computes (`Gpt2::forward_cached_last`), reading
//! the whole capacity instead of the filled prefix.
//!
//! Capture: two warm-up steps run eagerly on a side stream (they populate
//! cuBLAS workspaces and autocast's cast cache), one step is captured there,
//! then the graph is replayed on the caller's stream for the remaining
//! steps. The whole decode runs inside one autocast scope, so the graph
//! reads the bf16 weight copies the warm-up cached and records no casts.
use std::time::Instant;

use anyhow::{anyhow, Result};
use tch::{Device, Kind, TchError, Tensor};

use super::{te, GraphMode, Options};
use crate::attention::Cache;
use crate::cudagraph;
use crate::models::gpt2::Gpt2;
use crate::shim::AutocastDtype;

/// Eager static steps before the capture.
pub const WARMUP: i64 = 2;

/// How [`super::generate`] runs the decode steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Eager steps through the growing cache.
    Eager,
    /// The static-shape step, eagerly.
    Static,
    /// The static-shape step, warmed up, captured and replayed.
    Capture,
}

/// Why the static-shape step cannot decode these options, or None.
fn static_unsupported(model: &Gpt2, o: &Options) -> Option<String> {
    if !o.cache {
        return Some("cache: false recomputes the window per token".into());
    }
    if o.kv_prune.is_some() {
        return Some("kv_prune reads a different cache subset at every step".into());
    }
    if o.temperature > 0.0 {
        return Some("sampling (temperature > 0) is decoded eagerly".into());
    }
    model.static_unsupported()
}

/// Why no CUDA graph can run on `dev`, or None.
fn capture_unsupported(dev: Device) -> Option<String> {
    if !dev.is_cuda() {
        return Some("the model is not on a CUDA device".into());
    }
    if !cudagraph::supported() {
        return Some("knlp was built without CUDA graph support".into());
    }
    // Capture and replay use the current device's streams: a model on
    // another device would run uncaptured and leave an empty graph.
    if let Device::Cuda(i) = dev {
        match cudagraph::current_device() {
            Ok(cur) if cur == i => {}
            Ok(cur) => {
                return Some(format!("the model is on cuda:{i} but the current CUDA device is cuda:{cur}"))
            }
            Err(e) => return Some(e),
        }
    }
    None
}

/// The plan for `o` on `dev`; with `graph: On` and no graph possible, one
/// warning on stderr naming the reason.
pub fn plan(model: &Gpt2, o: &Options, dev: Device) -> Result<Plan> {
    let why = static_unsupported(model, o);
    match o.graph {
        GraphMode::Off => Ok(Plan::Eager),
        GraphMode::StaticEager => match why {
            Some(w) => Err(anyhow!("generate: no static decode step: {w}")),
            None => Ok(Plan::Static),
        },
        GraphMode::Auto => Ok(match why.or_else(|| capture_unsupported(dev)) {
            Some(_) => Plan::Eager,
            None => Plan::Capture,
        }),
        GraphMode::On => {
            let why = why.or_else(|| capture_unsupported(dev)).or_else(|| {
                (o.max_new_tokens - 1 <= WARMUP).then(|| {
                    format!(
                        "max_new_tokens {} leaves no step to replay after {WARMUP} warm-up steps",
                        o.max_new_tokens
                    )
                })
            });
            Ok(match why {
                Some(w) => {
                    eprintln!("warning: generate: graph: true ignored, decoding eagerly: {w}");
                    Plan::Eager
                }
                None => Plan::Capture,
            })
        }
    }
}

/// What [`decode`] produced.
pub struct Run {
    /// The new tokens [B, max_new_tokens].
    pub tokens: Tensor,
    /// Per new token, its logits [B, vocab] (float32) when kept.
    pub logits: Vec<Tensor>,
    /// A graph was captured and replayed.
    pub graph: bool,
    /// Seconds of warm-up and capture.
    pub capture_s: f64,
}

/// The step's device state.
struct Step {
    tok: Tensor,
    pos: Tensor,
    col: Tensor,
    one: Tensor,
    /// [1, 1, 1, cap rounded up to 16]; each layer reads the columns of its slot.
    mask: Tensor,
    /// [1] zero in the mask's dtype.
    zero: Tensor,
    out: Tensor,
    vocab: i64,
}

impl Step {
    /// One static-shape decode step; returns its logits [B, vocab] (the
    /// tokens went to `tok` and `out`).
    fn run(&mut self, model: &Gpt2, cache: &Cache) -> Result<Tensor, TchError> {
        let _ = self.mask.f_index_copy_(3, &self.pos, &self.zero)?;
        let logits = model.forward_static(&self.tok, &self.pos, &self.mask, cache)?;
        let cur = logits.f_select(1, 0)?.f_narrow(-1, 0, self.vocab)?;
        let next = cur.f_argmax(-1, true)?;
        self.tok.f_copy_(&next)?;
        let _ = self.out.f_index_copy_(1, &self.col, &next)?;
        let _ = self.pos.f_add_(&self.one)?;
        let _ = self.col.f_add_(&self.one)?;
        Ok(cur)
    }
}

/// Greedy decoding after a prefill: `cache` holds the prompt (`cache.len`
/// tokens), `first` [B, vocab] are the logits of the first new token.
/// `capture`: warm up, capture and replay a CUDA graph (else every step
/// runs eagerly). The whole decode runs in one autocast scope when `amp`.
pub fn decode(
    model: &Gpt2,
    cache: &mut Cache,
    first: &Tensor,
    o: &Options,
    amp: Option<AutocastDtype>,
    capture: bool,
) -> Result<Run> {
    match amp {
        Some(d) => crate::shim::with_autocast(d, || decode_in(model, cache, first, o, capture))
            .map_err(|e| anyhow!(e))?,
        None => decode_in(model, cache, first, o, capture),
    }
}

fn decode_in(model: &Gpt2, cache: &mut Cache, first: &Tensor, o: &Options, capture: bool) -> Result<Run> {
    let n = o.max_new_tokens;
    let (b, vocab) = (first.size()[0], first.size()[1]);
    let dev = first.device();
    let t0 = cache.len;
    let keep = |l: &Tensor| l.f_to_dtype(Kind::Float, false, true).map_err(te);
    let mut kept = Vec::new();
    if o.keep_logits {
        kept.push(keep(first)?);
    }
    let next = first.f_argmax(-1, true).map_err(te)?;
    let out = Tensor::f_zeros([b, n], (Kind::Int64, dev)).map_err(te)?;
    out.f_narrow(1, 0, 1).and_then(|mut c| c.f_copy_(&next)).map_err(te)?;
    let steps = n - 1;
    if steps == 0 {
        return Ok(Run { tokens: out, logits: kept, graph: false, capture_s: 0.0 });
    }
    let on = |v: &[i64]| Tensor::f_from_slice(v).and_then(|t| t.f_to_device(dev)).map_err(te);
    // The attention's dtype: what the prefill wrote into the cache.
    let kind = cache
        .layers
        .first()
        .and_then(|l| l.value.as_ref().or(l.latent.as_ref()))
        .map(|v| v.kind())
        .ok_or_else(|| anyhow!("generate: the static decode step needs a filled cache"))?;
    let cap = cache.capacity;
    // SDPA wants the mask's row stride a multiple of 16; absorbed latent
    // slots hold `cache_rows(cap)` rows, and the mask must cover them.
    let rows = model.cache_rows(cap).map_err(te)?;
    let padded = (rows + 15) / 16 * 16;
    let m: Vec<f32> = (0..padded).map(|j| if j < t0 { 0.0 } else { f32::NEG_INFINITY }).collect();
    let mask = Tensor::f_from_slice(&m)
        .and_then(|m| m.f_to_kind(kind))
        .and_then(|m| m.f_to_device(dev))
        .and_then(|m| m.f_view([1, 1, 1, padded]))
        .map_err(te)?;
    let zero = Tensor::f_zeros([1, 1, 1, 1], (kind, dev)).map_err(te)?;
    let mut st = Step {
        tok: next.f_to_dtype(Kind::Int64, false, true).map_err(te)?,
        pos: on(&[t0])?,
        col: on(&[1])?,
        one: on(&[1])?,
        mask,
        zero,
        out,
        vocab,
    };
    let mut done = 0;
    let mut graph = None;
    let mut capture_s = 0.0;
    if capture && steps > WARMUP {
        let t = Instant::now();
        let mut g = cudagraph::Graph::new().map_err(|e| anyhow!("generate: {e}"))?;
        g.enter_stream().map_err(|e| anyhow!("generate: {e}"))?;
        let mut warm_up = || -> Result<()> {
            for _ in 0..WARMUP {
                let cur = st.run(model, cache).map_err(te)?;
                if o.keep_logits {
                    kept.push(keep(&cur)?);
                }
                done += 1;
            }
            Ok(())
        };
        if let Err(e) = warm_up() {
            let _ = g.exit_stream();
            return Err(e);
        }
        match g.capture(|| st.run(model, cache).map_err(|e| crate::tensor::torch_error(&e))) {
            Ok(cur) => graph = Some((g, cur)),
            Err(e) => eprintln!("warning: generate: CUDA graph capture failed, decoding eagerly: {e}"),
        }
        capture_s = t.elapsed().as_secs_f64();
    }
    let mut rest = || -> Result<()> {
        while done < steps {
            let cur = match &graph {
                Some((g, cur)) => {
                    g.replay().map_err(|e| anyhow!("generate: {e}"))?;
                    cur.shallow_clone()
                }
                None => st.run(model, cache).map_err(te)?,
            };
            if o.keep_logits {
                kept.push(keep(&cur)?);
            }
            done += 1;
        }
        Ok(())
    };
    let result = rest();
    // The replays read autocast's cached weights: finish them inside the
    // scope, also when a step failed with replays still queued.
    super::sync(dev);
    result?;
    cache.len = t0 + steps;
    Ok(Run { tokens: st.out, logits: kept, graph: graph.is_some(), capture_s })
}
