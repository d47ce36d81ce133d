//! Attention research in scripts: generation with a KV cache, cache sizes,
//! attention patterns, Fisher metrics and the variants' own metrics.
use rhai::{Array, Dynamic, Engine, Map, INT};

use super::api::{Api, DocEntry};
use super::models::RModel;
use super::value::*;
use crate::attention::{fisher, kvprune, spec};
use crate::decode::{self, Options};
use crate::models::gpt2::Gpt2;
use crate::shim::AutocastDtype;

/// Run `f` on the GPT-2 behind a script model, or say that it is not one.
pub(super) fn with_gpt2<T>(m: &RModel, what: &str, f: impl FnOnce(&Gpt2) -> RResult<T>) -> RResult<T> {
    let b = m.borrow()?;
    let g = b
        .as_any()
        .and_then(|a| a.downcast_ref::<Gpt2>())
        .ok_or_else(|| rerr(format!("{what} needs a gpt2 model, got {}", b.arch())))?;
    f(g)
}

const GEN_KEYS: &[&str] =
    &["max_new_tokens", "temperature", "top_k", "seed", "cache", "details", "amp", "kv_prune", "graph"];

const PRUNE_KEYS: &[&str] =
    &["keep_ratio", "k_min", "recency", "exposure", "ema", "ema_every", "mode", "evict", "recon"];

/// KV-pruning options over the seed's defaults; `extra` keys are allowed
/// (and ignored) for callers that mix in their own.
pub(super) fn prune_options(o: &Map, what: &str, extra: &[&str]) -> RResult<kvprune::Config> {
    let valid: Vec<&str> = PRUNE_KEYS.iter().chain(extra).copied().collect();
    check_keys(o, &valid, what)?;
    let mut c = kvprune::Config::default();
    let int = |k: &str| -> RResult<Option<i64>> {
        o.get(k)
            .map(|v| v.as_int().map_err(|t| rerr(format!("{what}: {k} must be an int, got {t}"))))
            .transpose()
    };
    let boolean = |k: &str| -> RResult<Option<bool>> {
        o.get(k)
            .map(|v| v.as_bool().map_err(|t| rerr(format!("{what}: {k} must be a bool, got {t}"))))
            .transpose()
    };
    if let Some(v) = o.get("keep_ratio") {
        c.keep_ratio = as_number(v, "keep_ratio")?;
    }
    if let Some(v) = o.get("ema") {
        c.ema = as_number(v, "ema")?;
    }
    c.k_min = int("k_min")?.unwrap_or(c.k_min);
    c.recency = int("recency")?.unwrap_or(c.recency);
    c.ema_every = int("ema_every")?.unwrap_or(c.ema_every);
    c.exposure = boolean("exposure")?.unwrap_or(c.exposure);
    c.evict = boolean("evict")?.unwrap_or(c.evict);
    if let Some(m) = o.get("mode") {
        c.mode = kvprune::Mode::parse(&expect_str(m, "mode")?).rt()?;
    }
    if let Some(r) = o.get("recon") {
        if !r.is_unit() {
            let r = r.read_lock::<super::kvrecon::RRecon>().ok_or_else(|| {
                rerr(format!(
                    "{what}: recon must be a KvRecon (kv_recon_fit, kv_recon_load), got {}",
                    r.type_name()
                ))
            })?;
            c.recon = Some(r.0.clone());
        }
    }
    c.validate().rt()?;
    Ok(c)
}

fn gen_options(o: &Map) -> RResult<(Options, bool)> {
    check_keys(o, GEN_KEYS, "generate")?;
    let mut g = Options { amp: Some(AutocastDtype::BF16), ..Options::default() };
    let int = |k: &str| -> RResult<Option<i64>> {
        o.get(k).map(|v| v.as_int().map_err(|t| rerr(format!("{k} must be an int, got {t}")))).transpose()
    };
    if let Some(n) = int("max_new_tokens")? {
        g.max_new_tokens = n;
    }
    if let Some(t) = o.get("temperature") {
        g.temperature = as_number(t, "temperature")?;
    }
    g.top_k = int("top_k")?;
    g.seed = int("seed")?;
    if let Some(c) = o.get("cache") {
        g.cache = c.as_bool().map_err(|t| rerr(format!("cache must be a bool, got {t}")))?;
    }
    let details = match o.get("details") {
        Some(d) => d.as_bool().map_err(|t| rerr(format!("details must be a bool, got {t}")))?,
        None => false,
    };
    if let Some(a) = o.get("amp") {
        g.amp = match expect_str(a, "amp")?.as_str() {
            "bf16" => Some(AutocastDtype::BF16),
            "fp16" => Some(AutocastDtype::F16),
            "none" => None,
            other => return Err(rerr(format!("amp must be bf16, fp16 or none, got '{other}'"))),
        };
    }
    if let Some(p) = o.get("kv_prune") {
        if !p.is_unit() {
            let m = p
                .read_lock::<Map>()
                .ok_or_else(|| rerr(format!("kv_prune must be a map, got {}", p.type_name())))?;
            g.kv_prune = Some(prune_options(&m, "kv_prune", &[])?);
        }
    }
    if let Some(v) = o.get("graph") {
        let on = v.as_bool().map_err(|t| rerr(format!("graph must be a bool, got {t}")))?;
        g.graph = if on { decode::GraphMode::On } else { decode::GraphMode::Off };
    }
    g.keep_logits = details;
    Ok((g, details))
}

fn run_generate(m: &RModel, tokens: &RTensor, o: &Map) -> RResult<Dynamic> {
    let (opts, details) = gen_options(o)?;
    with_gpt2(m, "generate", |g| {
        let out = decode::generate(g, &tokens.0, &opts).rt()?;
        if !details {
            return Ok(Dynamic::from(RTensor(out.tokens)));
        }
        let b = out.tokens.size()[0] as f64;
        // The first new token comes from the prefill; the rest are decode steps.
        let decoded = b * (opts.max_new_tokens - 1) as f64;
        let logits = if out.logits.is_empty() {
            Dynamic::UNIT
        } else {
            Dynamic::from(RTensor(tch::Tensor::f_stack(&out.logits, 1).rt()?))
        };
        Ok(Dynamic::from_map(map_of(vec![
            ("tokens", Dynamic::from(RTensor(out.tokens))),
            ("logits", logits),
            ("cache_bytes", Dynamic::from_int(out.cache_bytes)),
            ("cache_tokens", Dynamic::from_int(out.cache_tokens)),
            ("cache_elem_bytes", Dynamic::from_int(out.cache_elem)),
            ("prefill_ms", Dynamic::from_float(out.prefill_s * 1e3)),
            ("decode_ms", Dynamic::from_float(out.decode_s * 1e3)),
            ("kv_read_fraction", Dynamic::from_float(out.read_fraction)),
            ("graph", Dynamic::from_bool(out.graph)),
            ("capture_ms", Dynamic::from_float(out.capture_s * 1e3)),
            (
                "decode_tokens_per_s",
                Dynamic::from_float(if out.decode_s > 0.0 { decoded / out.decode_s } else { 0.0 }),
            ),
        ])))
    })
}

fn layers_arg(a: &Array, n_layer: i64) -> RResult<Vec<i64>> {
    a.iter()
        .map(|v| {
            let l = v.as_int().map_err(|t| rerr(format!("layers must be ints, got {t}")))?;
            let l = if l < 0 { n_layer + l } else { l };
            if !(0..n_layer).contains(&l) {
                return Err(rerr(format!("layer {l} out of range (the model has {n_layer})")));
            }
            Ok(l)
        })
        .collect()
}

fn json_map(m: serde_json::Map<String, serde_json::Value>) -> RResult<Dynamic> {
    rhai::serde::to_dynamic(serde_json::Value::Object(m)).map_err(|e| rerr(e.to_string()))
}

fn dtype_bytes(name: &str) -> RResult<i64> {
    match name {
        "fp32" | "float32" | "float" => Ok(4),
        "bf16" | "bfloat16" | "fp16" | "float16" | "half" => Ok(2),
        other => Err(rerr(format!("dtype must be fp32, bf16 or fp16, got '{other}'"))),
    }
}

pub fn register(engine: &mut Engine, docs: &mut Vec<DocEntry>) {
    let mut api = Api::new(engine, docs);
    api.group("Attention");
    api.f(
        "attention_presets",
        "",
        "The GPT-2 attention presets: `[#{ name, direction, kv, q, mixer, rope, about }]` (docs/attention.md).",
        || -> RResult<Array> {
            Ok(spec::PRESETS
                .iter()
                .map(|p| {
                    let s = |v: &dyn SerdeName| Dynamic::from(v.name());
                    Dynamic::from_map(map_of(vec![
                        ("name", Dynamic::from(p.0.to_string())),
                        ("direction", s(&p.1)),
                        ("kv", s(&p.2)),
                        ("q", s(&p.3)),
                        ("mixer", s(&p.4)),
                        ("rope", rhai::serde::to_dynamic(p.5).unwrap_or(Dynamic::UNIT)),
                        ("about", Dynamic::from(p.6.to_string())),
                    ]))
                })
                .collect())
        },
    );
    api.f(
        "generate",
        "self, tokens, options: map",
        "Continue token ids [B, T]: `#{ max_new_tokens: 32, temperature: 0.0 (greedy), top_k, seed, cache: true, amp: \"bf16\"|\"fp16\"|\"none\" (CUDA), kv_prune: #{ keep_ratio, k_min, recency, ... } (see kv_prune_eval), graph, details: false }`. `graph`: decode through a CUDA graph of one static-shape step (docs/attention.md \"Graphed decode\"); by default on where it can run (CUDA, greedy, cache on, no kv_prune, mha/ra/kv_tying-style attention without RoPE, or a latent that decodes absorbed such as mla_decoupled), `false` decodes eagerly, `true` warns on stderr and decodes eagerly where it cannot run. Returns the ids [B, T + new]; with `details: true` a map `#{ tokens, logits [B, new, vocab], cache_bytes, cache_tokens, cache_elem_bytes, prefill_ms, decode_ms (includes the graph's warm-up and capture), capture_ms, graph (a graph was replayed), decode_tokens_per_s, kv_read_fraction }`.",
        |m: &mut RModel, tokens: RTensor, o: Map| -> RResult<Dynamic> { run_generate(m, &tokens, &o) },
    );
    api.f(
        "generate",
        "self, tokens",
        "Greedy continuation of token ids [B, T] by 32 tokens through the KV cache.",
        |m: &mut RModel, tokens: RTensor| -> RResult<Dynamic> { run_generate(m, &tokens, &Map::new()) },
    );
    api.f(
        "generate_text",
        "model, prompt, options: map",
        "Encode `prompt` with the GPT-2 BPE, generate (options as `generate`), decode the new tokens to text.",
        |m: RModel, prompt: &str, o: Map| -> RResult<String> {
            let mut o = o;
            o.remove("details");
            let ids = crate::data::bpe::encode(prompt).rt()?;
            if ids.is_empty() {
                return Err(rerr("generate_text: the prompt encodes to no tokens"));
            }
            let t = tch::Tensor::from_slice(&ids.iter().map(|&i| i as i64).collect::<Vec<_>>()).f_unsqueeze(0).rt()?;
            let out = run_generate(&m, &RTensor(t), &o)?;
            let toks = out.try_cast::<RTensor>().ok_or_else(|| rerr("generate returned no tokens"))?;
            let new: Vec<i64> = Vec::<i64>::try_from(toks.0.f_select(0, 0).rt()?.f_narrow(0, ids.len() as i64, toks.0.size()[1] - ids.len() as i64).rt()?).rt()?;
            crate::data::bpe::decode(&new.iter().map(|&i| i as u32).collect::<Vec<_>>()).rt()
        },
    );
    api.f(
        "kv_prune_eval",
        "model, tokens, options: map",
        "Perplexity of held-out ids [B, T] under teacher-forced cached decoding with KV pruning (docs/attention.md): the first `prefill` tokens in one dense forward, then one token per step, each step reading only the selected cached positions. Options `#{ keep_ratio: 0.382, k_min: 64, recency: 64, exposure: true, ema: 0.9 (0 = off), ema_every: 8, mode: \"v_only\"|\"scores_reuse\", evict: false, recon: a KvRecon (kv_recon_fit), prefill: 1, prune: true (false: the unpruned cache) }` -> `#{ loss, ppl, tokens, decode_ms, tokens_per_s, read_fraction, nll [B, T-1] }`.",
        |m: RModel, tokens: RTensor, o: Map| -> RResult<Dynamic> {
            let cfg = prune_options(&o, "kv_prune_eval", &["prefill", "prune"])?;
            let prefill = match o.get("prefill") {
                Some(v) => v.as_int().map_err(|t| rerr(format!("kv_prune_eval: prefill must be an int, got {t}")))?,
                None => 1,
            };
            let prune = match o.get("prune") {
                Some(v) => v.as_bool().map_err(|t| rerr(format!("kv_prune_eval: prune must be a bool, got {t}")))?,
                None => true,
            };
            with_gpt2(&m, "kv_prune_eval", |g| {
                let s = decode::score_cached(g, &tokens.0, prefill, prune.then_some(&cfg)).rt()?;
                Ok(Dynamic::from_map(map_of(vec![
                    ("loss", Dynamic::from_float(s.loss)),
                    ("ppl", Dynamic::from_float(s.ppl)),
                    ("tokens", Dynamic::from_int(s.decoded)),
                    ("decode_ms", Dynamic::from_float(s.decode_s * 1e3)),
                    (
                        "tokens_per_s",
                        Dynamic::from_float(if s.decode_s > 0.0 { s.decoded as f64 / s.decode_s } else { 0.0 }),
                    ),
                    ("read_fraction", Dynamic::from_float(s.read_fraction)),
                    ("nll", Dynamic::from(RTensor(s.nll))),
                ])))
            })
        },
    );
    api.f(
        "kv_cache_bytes",
        "self, batch, seq_len",
        "Bytes of the decoding cache for `batch` sequences of `seq_len` tokens with float32 activations (`generate`'s cache_bytes on the CPU). `generate`'s cache_bytes can exceed it by up to 15 tokens' worth: latents that decode absorbed allocate rows in multiples of 16.",
        |m: &mut RModel, batch: INT, seq: INT| -> RResult<INT> {
            with_gpt2(m, "kv_cache_bytes", |g| g.kv_cache_bytes(batch, seq, 4).rt())
        },
    );
    api.f(
        "kv_cache_bytes",
        "self, batch, seq_len, dtype",
        "Bytes of the decoding cache at activation dtype `fp32`, `bf16` or `fp16` (bf16 is what `generate` uses on CUDA). `generate`'s cache_bytes can exceed it by up to 15 tokens' worth: latents that decode absorbed allocate rows in multiples of 16.",
        |m: &mut RModel, batch: INT, seq: INT, dtype: &str| -> RResult<INT> {
            let e = dtype_bytes(dtype)?;
            with_gpt2(m, "kv_cache_bytes", |g| g.kv_cache_bytes(batch, seq, e).rt())
        },
    );
    api.f(
        "attention_patterns",
        "self, tokens, layers: array",
        "The attention pattern [B, H, T, T] each listed layer used on `tokens` (eval mode; rows sum to 1; reciprocal layers give the pattern they really applied, SBA its causal mixture).",
        |m: &mut RModel, tokens: RTensor, layers: Array| -> RResult<Array> {
            with_gpt2(m, "attention_patterns", |g| {
                let ls = layers_arg(&layers, g.n_layer())?;
                let x = tokens.0.f_to_device(crate::models::Model::store(g).device()).rt()?;
                let p = g.probe(&x, &ls).rt()?;
                Ok(ls
                    .iter()
                    .map(|l| {
                        p.patterns
                            .iter()
                            .find(|(k, _)| k == l)
                            .map(|(_, t)| Dynamic::from(RTensor(t.shallow_clone())))
                            .unwrap_or(Dynamic::UNIT)
                    })
                    .collect())
            })
        },
    );
    api.f(
        "fisher_metrics",
        "model, tokens, options: map",
        "Fisher-information metrics of the real attention distributions on `tokens`: `#{ layers: [0, L/2, L-1], rows: 64, seed: 0 }` -> map `fisher/layer{L}/head{h}/eigmax`, `..._mean`, ... (docs/attention.md).",
        |m: RModel, tokens: RTensor, o: Map| -> RResult<Dynamic> {
            check_keys(&o, &["layers", "rows", "seed"], "fisher_metrics")?;
            with_gpt2(&m, "fisher_metrics", |g| {
                let l = g.n_layer();
                let ls = match o.get("layers") {
                    Some(a) => layers_arg(
                        &a.clone().into_array().map_err(|t| rerr(format!("layers must be an array, got {t}")))?,
                        l,
                    )?,
                    None => fisher::default_layers(l),
                };
                let rows = o.get("rows").map(|v| v.as_int()).transpose().map_err(|t| rerr(format!("rows must be an int, got {t}")))?.unwrap_or(64);
                if rows < 1 {
                    return Err(rerr("rows must be at least 1"));
                }
                let seed = o.get("seed").map(|v| v.as_int()).transpose().map_err(|t| rerr(format!("seed must be an int, got {t}")))?.unwrap_or(0);
                let x = tokens.0.f_to_device(crate::models::Model::store(g).device()).rt()?;
                let p = g.probe(&x, &ls).rt()?;
                let mut out = serde_json::Map::new();
                for (layer, pat) in &p.patterns {
                    out.extend(fisher::layer_metrics(*layer, pat, rows, seed as u64).rt()?);
                }
                json_map(out)
            })
        },
    );
    api.f(
        "aux_loss",
        "model",
        "The auxiliary loss of the model's last training forward (RA balance loss, routing compute penalty; a 0-d tensor, 0 when none), taken once: add it to the loss in a hand-written training loop (`train()` does this itself).",
        |m: RModel| -> RResult<RTensor> {
            let b = m.borrow()?;
            match b.take_aux_loss() {
                Some(a) => Ok(RTensor(a)),
                None => {
                    let dev = b.store().device();
                    Ok(RTensor(tch::Tensor::f_zeros([], (tch::Kind::Float, dev)).rt()?))
                }
            }
        },
    );
    api.f(
        "observe_eval",
        "model, metrics: map",
        "Tell the model an evaluation's result (`#{ val_loss }`) as `train()` does after each evaluation: advances ra_route's warm-up; returns the metrics the model logs.",
        |m: RModel, metrics: Map| -> RResult<Dynamic> {
            let v = rhai::serde::from_dynamic::<serde_json::Value>(&Dynamic::from_map(metrics))
                .map_err(|e| rerr(e.to_string()))?;
            let obj = v.as_object().cloned().unwrap_or_default();
            let out = m.borrow_mut()?.on_eval(&obj, None).rt()?;
            json_map(out)
        },
    );
    api.f(
        "attention_metrics",
        "model, tokens",
        "What the variant logs at each evaluation, on `tokens`: RA direction probabilities and balance, SBA alphas, KVSplice compression and reconstruction error, routing statistics, cache bytes per token.",
        |m: RModel, tokens: RTensor| -> RResult<Dynamic> {
            if tokens.0.dim() != 2 {
                return Err(rerr(format!("attention_metrics: tokens must be [B, T], got {:?}", tokens.0.size())));
            }
            with_gpt2(&m, "attention_metrics", |g| json_map(g.attention_metrics(Some(&tokens.0), false).rt()?))
        },
    );
}

/// Serde names of the axis enums (`learned`, `splice`, ...).
trait SerdeName {
    fn name(&self) -> String;
}

impl<T: serde::Serialize> SerdeName for T {
    fn name(&self) -> String {
        serde_json::to_value(self).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
    }
}
