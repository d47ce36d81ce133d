//! Interpretability in scripts: hook points, activation caches, patching,
//! the logit lens, head detectors and Hugging Face GPT-2 import/export
//! (docs/mechint.md).
use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::path::Path;
use std::rc::{Rc, Weak};

use rhai::{Array, Dynamic, Engine, EvalAltResult, FnPtr, Map, NativeCallContext, INT};
use tch::{Device, TchError, Tensor};

use super::api::{Api, DocEntry};
use super::attention::with_gpt2;
use super::models::RModel;
use super::value::*;
use crate::mechint::{cache::ActivationCache, detect, lens, patching, weights, Hooks};
use crate::models::{gpt2_hf, Model};
use crate::tensor::parse_device_or_auto;

/// A hook added to a model: (the model, hook name, closure).
type Added = (Weak<RefCell<Box<dyn Model>>>, String, FnPtr);

thread_local! {
    /// Hooks added to models with `add_hook`, until `reset_hooks`.
    static MODEL_HOOKS: RefCell<Vec<Added>> = const { RefCell::new(Vec::new()) };
}

/// The hooks added to `m`, in the order added (entries of dropped models go).
pub fn model_hooks(m: &RModel) -> Vec<(String, FnPtr)> {
    MODEL_HOOKS.with(|h| {
        let mut h = h.borrow_mut();
        h.retain(|(w, ..)| w.strong_count() > 0);
        h.iter()
            .filter(|(w, ..)| w.as_ptr() == Rc::as_ptr(&m.0))
            .map(|(_, n, f)| (n.clone(), f.clone()))
            .collect()
    })
}

/// Script closures as hooks; each gets the activation (and the hook name
/// when it takes two parameters) and returns a tensor or `()`.
pub struct ScriptHooks<'a> {
    ctx: &'a NativeCallContext<'a>,
    fns: Vec<(String, FnPtr)>,
    /// Parameters each closure takes, learnt on its first call (0: unknown).
    arity: Vec<Cell<u8>>,
    /// An exit, interrupt or limit raised inside a hook, re-raised as itself
    /// after the forward (libtorch's error type cannot carry it).
    stop: RefCell<Option<Box<EvalAltResult>>>,
}

impl<'a> ScriptHooks<'a> {
    pub fn new(ctx: &'a NativeCallContext<'a>, fns: Vec<(String, FnPtr)>) -> Self {
        let arity = fns.iter().map(|_| Cell::new(0)).collect();
        ScriptHooks { ctx, fns, arity, stop: RefCell::new(None) }
    }

    /// The hooks of `m` (None when it has none).
    pub fn of_model(ctx: &'a NativeCallContext<'a>, m: &RModel) -> Option<Self> {
        let fns = model_hooks(m);
        if fns.is_empty() {
            None
        } else {
            Some(Self::new(ctx, fns))
        }
    }

    /// `r`, unless a hook stopped the script: then that, as raised.
    pub fn finish<T>(hooks: Option<&Self>, r: RResult<T>) -> RResult<T> {
        match hooks.and_then(|h| h.stop.borrow_mut().take()) {
            Some(e) => Err(e),
            None => r,
        }
    }

    fn call_one(&self, i: usize, act: &Tensor, name: &str) -> RResult<Dynamic> {
        let f = &self.fns[i].1;
        let one = || f.call_within_context::<Dynamic>(self.ctx, (RTensor(act.shallow_clone()),));
        let two =
            || f.call_within_context::<Dynamic>(self.ctx, (RTensor(act.shallow_clone()), name.to_string()));
        match self.arity[i].get() {
            1 => one(),
            2 => two(),
            _ => {
                let missing = |e: &EvalAltResult| matches!(e, EvalAltResult::ErrorFunctionNotFound(sig, _) if sig.starts_with(f.fn_name()));
                match one() {
                    // Its one-parameter form is missing: it takes (activation, name).
                    Err(e1) if missing(&e1) => match two() {
                        Err(e2) if missing(&e2) => Err(rerr(format!(
                            "a hook closure takes the activation, or the activation and the hook name: {e1}; {e2}"
                        ))),
                        r => {
                            self.arity[i].set(2);
                            r
                        }
                    },
                    r => {
                        self.arity[i].set(1);
                        r
                    }
                }
            }
        }
    }
}

impl Hooks for ScriptHooks<'_> {
    fn wants(&self, name: &str) -> bool {
        self.fns.iter().any(|(n, _)| n == name)
    }

    fn call(&self, name: &str, act: &Tensor) -> Result<Option<Tensor>, TchError> {
        let mut cur: Option<Tensor> = None;
        for i in 0..self.fns.len() {
            if self.fns[i].0 != name {
                continue;
            }
            let out = match self.call_one(i, cur.as_ref().unwrap_or(act), name) {
                Ok(v) => v,
                Err(e) => {
                    let msg = format!("hook {name}: {e}");
                    if e.is_system_exception() {
                        *self.stop.borrow_mut() = Some(e);
                    }
                    return Err(TchError::Kind(msg));
                }
            };
            if out.is_unit() {
                continue;
            }
            let t = out.read_lock::<RTensor>().map(|t| t.0.shallow_clone()).ok_or_else(|| {
                TchError::Kind(format!("hook {name}: must return a Tensor or (), got {}", out.type_name()))
            })?;
            cur = Some(t);
        }
        Ok(cur)
    }
}

/// Check that every name is a hook point of the model.
fn check_names<'a>(m: &dyn Model, names: impl IntoIterator<Item = &'a str>) -> RResult<()> {
    let known = m.hook_names();
    if known.is_empty() {
        return Err(rerr(format!("{} has no hook points (GPT-2 has)", m.arch())));
    }
    for n in names {
        if !known.iter().any(|k| k == n) {
            let leaf = n.rsplit('.').next().unwrap_or(n);
            let near: Vec<&String> = known.iter().filter(|k| k.ends_with(leaf)).take(4).collect();
            let hint = if near.is_empty() {
                "see model.hook_names()".to_string()
            } else {
                format!("e.g. {}", near.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "))
            };
            return Err(rerr(format!("unknown hook point '{n}' ({hint})")));
        }
    }
    Ok(())
}

/// A cache held by a script, with the model it came from.
#[derive(Clone)]
pub struct RCache {
    pub cache: Rc<ActivationCache>,
    pub model: RModel,
}

fn int_opt(o: &Map, k: &str) -> RResult<Option<i64>> {
    o.get(k).map(|v| v.as_int().map_err(|t| rerr(format!("{k} must be an int, got {t}")))).transpose()
}

fn bool_opt(o: &Map, k: &str) -> RResult<bool> {
    match o.get(k) {
        Some(v) => v.as_bool().map_err(|t| rerr(format!("{k} must be a bool, got {t}"))),
        None => Ok(false),
    }
}

fn tokens_of(v: &Dynamic, what: &str) -> RResult<Tensor> {
    if let Ok(i) = v.as_int() {
        return Ok(Tensor::from(i));
    }
    v.read_lock::<RTensor>()
        .map(|t| t.0.shallow_clone())
        .ok_or_else(|| rerr(format!("{what} must be a token id or a Tensor of ids, got {}", v.type_name())))
}

fn stack_out(s: crate::mechint::Stack, labels: bool) -> Dynamic {
    if labels {
        Dynamic::from_map(map_of(vec![
            ("tensor", Dynamic::from(RTensor(s.tensor))),
            ("labels", Dynamic::from_array(s.labels.into_iter().map(Dynamic::from).collect())),
        ]))
    } else {
        Dynamic::from(RTensor(s.tensor))
    }
}

const STACK_KEYS: &[&str] = &["incl_mid", "apply_ln", "pos", "labels", "mlp_input", "incl_embeds"];

/// A stack, optionally at one position and scaled by the reading norm.
fn finish_stack(
    c: &RCache,
    s: crate::mechint::Stack,
    o: &Map,
    ln_layer: i64,
    mlp_input: bool,
) -> RResult<Dynamic> {
    let pos = int_opt(o, "pos")?;
    let mut t = s.tensor;
    if let Some(p) = pos {
        let n = t.size()[2];
        let q = if p < 0 { p + n } else { p };
        if !(0..n).contains(&q) {
            return Err(rerr(format!("pos {p} out of range for {n} positions")));
        }
        t = t.f_select(2, q).rt()?;
    }
    if bool_opt(o, "apply_ln")? {
        t = with_gpt2(&c.model, "apply_ln", |g| {
            c.cache.apply_ln_to_stack(g, &t, ln_layer, mlp_input, pos).rt()
        })?;
    }
    Ok(stack_out(crate::mechint::Stack { tensor: t, labels: s.labels }, bool_opt(o, "labels")?))
}

fn device_opt(o: &Map) -> RResult<Option<Device>> {
    o.get("device").map(|d| parse_device_or_auto(&expect_str(d, "device")?).rt()).transpose()
}

/// Which hook points a `names` option keeps.
fn names_filter(ctx: &NativeCallContext, m: &dyn Model, v: Option<&Dynamic>) -> RResult<BTreeSet<String>> {
    let all = m.hook_names();
    let Some(v) = v else { return Ok(all.into_iter().collect()) };
    if let Some(f) = v.read_lock::<FnPtr>().map(|f| f.clone()) {
        let mut keep = BTreeSet::new();
        for n in all {
            let r: Dynamic = f.call_within_context(ctx, (n.clone(),))?;
            if r.as_bool().map_err(|t| rerr(format!("the names filter must return a bool, got {t}")))? {
                keep.insert(n);
            }
        }
        return Ok(keep);
    }
    let list: Vec<String> = if let Ok(s) = expect_str(v, "names") {
        vec![s]
    } else {
        let a = v
            .read_lock::<Array>()
            .ok_or_else(|| rerr("names must be an array of hook names, a name or a closure |name| bool"))?;
        a.iter().map(|x| expect_str(x, "names")).collect::<RResult<_>>()?
    };
    check_names(m, list.iter().map(|s| s.as_str()))?;
    Ok(list.into_iter().collect())
}

fn run_with_cache(ctx: &NativeCallContext, m: &RModel, tokens: &RTensor, o: &Map) -> RResult<Map> {
    check_keys(o, &["names", "device"], "run_with_cache option")?;
    let model = m.borrow()?;
    let keep = names_filter(ctx, &**model, o.get("names"))?;
    let extra = ScriptHooks::of_model(ctx, m);
    let r = lens::run_with_cache(
        &**model,
        &tokens.0,
        &|n| keep.contains(n),
        device_opt(o)?,
        extra.as_ref().map(|h| h as &dyn Hooks),
    )
    .rt();
    let (logits, cache) = ScriptHooks::finish(extra.as_ref(), r)?;
    drop(model);
    let cache = RCache { cache: Rc::new(cache), model: m.clone() };
    LAST_CACHE.with(|c| *c.borrow_mut() = Some(cache.cache.clone()));
    Ok(map_of(vec![("logits", Dynamic::from(RTensor(logits))), ("cache", Dynamic::from(cache))]))
}

thread_local! {
    /// The last cache a script made (`:cache` in the shell shows it).
    pub static LAST_CACHE: RefCell<Option<Rc<ActivationCache>>> = const { RefCell::new(None) };
}

fn metric_value(ctx: &NativeCallContext, f: &FnPtr, logits: &Tensor) -> anyhow::Result<f64> {
    let r: Dynamic = f
        .call_within_context(ctx, (RTensor(logits.shallow_clone()),))
        .map_err(|e| anyhow::anyhow!("metric: {e}"))?;
    if let Ok(x) = as_number(&r, "metric") {
        return Ok(x);
    }
    let t = r.read_lock::<RTensor>().map(|t| t.0.shallow_clone()).ok_or_else(|| {
        anyhow::anyhow!("metric must return a number or a one-element Tensor, got {}", r.type_name())
    })?;
    if t.numel() != 1 {
        anyhow::bail!("metric must return one value, got a tensor of shape {:?}", t.size());
    }
    Ok(t.f_reshape([1])?.f_double_value(&[0])?)
}

fn metric_tensor(ctx: &NativeCallContext, f: &FnPtr, logits: &Tensor) -> anyhow::Result<Tensor> {
    let r: Dynamic = f
        .call_within_context(ctx, (RTensor(logits.shallow_clone()),))
        .map_err(|e| anyhow::anyhow!("metric: {e}"))?;
    r.read_lock::<RTensor>().map(|t| t.0.shallow_clone()).ok_or_else(|| {
        anyhow::anyhow!(
            "attribution patching needs a metric returning a scalar Tensor, got {}",
            r.type_name()
        )
    })
}

fn sweep(o: &Map) -> RResult<patching::Sweep> {
    check_keys(o, &["all_pos"], "patching option")?;
    Ok(patching::Sweep { all_pos: bool_opt(o, "all_pos")? })
}

#[allow(clippy::too_many_arguments)]
fn patch(
    ctx: &NativeCallContext,
    m: &RModel,
    clean: &RTensor,
    corr: &RTensor,
    kind: &str,
    metric: &FnPtr,
    o: &Map,
    attribution: bool,
) -> RResult<RTensor> {
    let s = sweep(o)?;
    let extra = ScriptHooks::of_model(ctx, m);
    let extra = extra.as_ref().map(|h| h as &dyn Hooks);
    let model = m.borrow()?;
    let out = if attribution {
        patching::attribution_patch(
            &**model,
            &clean.0,
            &corr.0,
            kind,
            s,
            &mut |l| metric_tensor(ctx, metric, l),
            extra,
        )
    } else {
        patching::patch_activation(
            &**model,
            &clean.0,
            &corr.0,
            kind,
            s,
            &mut |l| metric_value(ctx, metric, l),
            extra,
        )
    };
    Ok(RTensor(out.rt()?))
}

const PROCESS_KEYS: &[&str] = &["fold_ln", "center_writing_weights", "center_unembed", "device"];

fn process_opts(o: &Map) -> RResult<weights::Process> {
    Ok(weights::Process {
        fold_ln: bool_opt(o, "fold_ln")?,
        center_writing_weights: bool_opt(o, "center_writing_weights")?,
        center_unembed: bool_opt(o, "center_unembed")?,
    })
}

fn wrap(g: crate::models::gpt2::Gpt2) -> RModel {
    RModel(Rc::new(RefCell::new(Box::new(g) as Box<dyn Model>)))
}

fn from_hf(dir: &str, o: &Map) -> RResult<RModel> {
    check_keys(o, PROCESS_KEYS, "gpt2_from_hf option")?;
    let dev = device_opt(o)?.unwrap_or(Device::Cpu);
    let g = gpt2_hf::load_hf(Path::new(dir), dev).rt()?;
    let p = process_opts(o)?;
    if p.fold_ln || p.center_writing_weights || p.center_unembed {
        return Ok(wrap(weights::process(&g, p).rt()?));
    }
    Ok(wrap(g))
}

const HEAD_KEYS: &[&str] = &["n", "batch", "lo", "hi", "bos", "seed", "tokens"];

fn head_scores(ctx: &NativeCallContext, m: &RModel, detector: &str, o: &Map) -> RResult<RTensor> {
    check_keys(o, HEAD_KEYS, "head_scores option")?;
    let model = m.borrow()?;
    let n = int_opt(o, "n")?.unwrap_or(50);
    let bos = int_opt(o, "bos")?;
    let tokens = match o.get("tokens") {
        Some(t) => tokens_of(t, "tokens")?,
        None => {
            // The tokenizer's ids (not the padded rows, which never train).
            let vocab = match model.task() {
                crate::models::Task::LanguageModel { vocab, .. } => {
                    model.config().get("vocab_size").and_then(|v| v.as_i64()).unwrap_or(vocab).min(vocab)
                }
                _ => return Err(rerr("head_scores needs a language model")),
            };
            let hi = int_opt(o, "hi")?.unwrap_or(vocab);
            detect::repeated_tokens(
                int_opt(o, "batch")?.unwrap_or(8),
                n,
                int_opt(o, "lo")?.unwrap_or(0),
                hi,
                bos,
                int_opt(o, "seed")?.unwrap_or(0),
            )
            .rt()?
        }
    };
    let extra = ScriptHooks::of_model(ctx, m);
    let extra = extra.as_ref().map(|h| h as &dyn Hooks);
    Ok(RTensor(detect::head_scores(&**model, &tokens, detector, n, bos.is_some() as i64, extra).rt()?))
}

pub fn register(engine: &mut Engine, docs: &mut Vec<DocEntry>) {
    engine.register_type_with_name::<RCache>("ActivationCache");
    engine.register_fn("to_string", |c: &mut RCache| {
        format!("ActivationCache({} activations)", c.cache.acts.len())
    });
    engine.register_fn("to_debug", |c: &mut RCache| {
        format!("ActivationCache({} activations)", c.cache.acts.len())
    });
    let mut api = Api::new(engine, docs);
    api.group("Interpretability");
    api.f("hook_names", "self", "Every hook point of the model in forward order, with TransformerLens's names (`hook_embed`, `blocks.0.attn.hook_pattern`, ...).", |m: &mut RModel| -> RResult<Array> {
        Ok(m.borrow()?.hook_names().into_iter().map(Dynamic::from).collect())
    });
    api.f("run_with_cache", "self, tokens", "Logits and every activation of one forward (eval mode, no gradients): `#{ logits, cache }`; `cache[name]` is a Tensor.", |ctx: NativeCallContext, m: &mut RModel, t: RTensor| -> RResult<Map> {
        run_with_cache(&ctx, m, &t, &Map::new())
    });
    api.f("run_with_cache", "self, tokens, options: map", "`run_with_cache` keeping only `names` (an array of hook names, one name, or a closure `|name| bool`), on `device` (e.g. \"cpu\").", |ctx: NativeCallContext, m: &mut RModel, t: RTensor, o: Map| -> RResult<Map> {
        run_with_cache(&ctx, m, &t, &o)
    });
    api.f("run_with_hooks", "self, tokens, hooks: map", "Logits of a forward in which each hook `#{ \"blocks.0.hook_resid_pre\": |act| ... }` sees its activation (and the hook name, if it takes two parameters) and returns the tensor to use instead, or `()` to keep it. The model's own hooks (add_hook) run first.", |ctx: NativeCallContext, m: &mut RModel, t: RTensor, hooks: Map| -> RResult<RTensor> {
        let model = m.borrow()?;
        let mut fns = model_hooks(m);
        let mut names = Vec::new();
        for (k, v) in &hooks {
            let f = v.read_lock::<FnPtr>().map(|f| f.clone()).ok_or_else(|| rerr(format!("hook '{k}' must be a closure |act| ..., got {}", v.type_name())))?;
            names.push(k.to_string());
            fns.push((k.to_string(), f));
        }
        check_names(&**model, names.iter().map(|s| s.as_str()))?;
        let h = ScriptHooks::new(&ctx, fns);
        let x = t.0.f_to_device(model.store().device()).rt()?;
        ScriptHooks::finish(Some(&h), tensor_result(model.forward_hooked(&x, false, Some(&h))))
    });
    api.f("add_hook", "self, name, f", "Keep hook `f` on the model: it acts in every later forward, run_with_cache, run_with_hooks and train() (training and evaluation) until reset_hooks(). Decoding through the KV cache (generate) does not visit hooks.", |m: &mut RModel, name: &str, f: FnPtr| -> RResult<()> {
        check_names(&**m.borrow()?, [name])?;
        MODEL_HOOKS.with(|h| h.borrow_mut().push((Rc::downgrade(&m.0), name.to_string(), f)));
        Ok(())
    });
    api.f("reset_hooks", "self", "Remove every hook added with add_hook.", |m: &mut RModel| {
        let p = Rc::as_ptr(&m.0);
        MODEL_HOOKS.with(|h| h.borrow_mut().retain(|(w, ..)| w.strong_count() > 0 && w.as_ptr() != p));
    });
    api.f(
        "hooks",
        "self",
        "The names of the hooks added with add_hook, in order.",
        |m: &mut RModel| -> Array { model_hooks(m).into_iter().map(|(n, _)| Dynamic::from(n)).collect() },
    );
    api.index_get(
        "The activation recorded at a hook point.",
        |c: &mut RCache, name: &str| -> RResult<RTensor> {
            Ok(RTensor(c.cache.need(name).rt()?.shallow_clone()))
        },
    );
    api.f("keys", "self", "The hook names the cache holds, in forward order.", |c: &mut RCache| -> Array {
        c.cache.keys().into_iter().map(Dynamic::from).collect()
    });
    api.f(
        "contains",
        "self, name",
        "Whether the cache holds this hook point.",
        |c: &mut RCache, name: &str| c.cache.get(name).is_some(),
    );
    api.f("accumulated_resid", "self, layer", "The residual stream before blocks 0..=layer (layer -1 or n_layer: ending with the final residual): [components, batch, pos, d_model].", |c: &mut RCache, layer: INT| -> RResult<Dynamic> {
        let s = with_gpt2(&c.model, "accumulated_resid", |g| c.cache.accumulated_resid(g, layer, false).rt())?;
        Ok(Dynamic::from(RTensor(s.tensor)))
    });
    api.f("accumulated_resid", "self, layer, options: map", "`accumulated_resid` with `#{ incl_mid, apply_ln, pos, labels }`: `pos` keeps one position, `apply_ln` scales by the layer norm reading layer `layer`, `labels: true` returns `#{ tensor, labels }`.", |c: &mut RCache, layer: INT, o: Map| -> RResult<Dynamic> {
        check_keys(&o, STACK_KEYS, "accumulated_resid option")?;
        let s = with_gpt2(&c.model, "accumulated_resid", |g| c.cache.accumulated_resid(g, layer, bool_opt(&o, "incl_mid")?).rt())?;
        finish_stack(c, s, &o, layer, false)
    });
    api.f("decompose_resid", "self, layer", "The residual stream entering block `layer` (-1: the final one) split into embed, pos_embed and each earlier attention and MLP output: [components, batch, pos, d_model].", |c: &mut RCache, layer: INT| -> RResult<Dynamic> {
        let s = with_gpt2(&c.model, "decompose_resid", |g| c.cache.decompose_resid(g, layer, false, true).rt())?;
        Ok(Dynamic::from(RTensor(s.tensor)))
    });
    api.f(
        "decompose_resid",
        "self, layer, options: map",
        "`decompose_resid` with `#{ mlp_input, incl_embeds: true, apply_ln, pos, labels }`.",
        |c: &mut RCache, layer: INT, o: Map| -> RResult<Dynamic> {
            check_keys(&o, STACK_KEYS, "decompose_resid option")?;
            let mlp = bool_opt(&o, "mlp_input")?;
            let emb = !o.contains_key("incl_embeds") || bool_opt(&o, "incl_embeds")?;
            let s =
                with_gpt2(&c.model, "decompose_resid", |g| c.cache.decompose_resid(g, layer, mlp, emb).rt())?;
            finish_stack(c, s, &o, layer, mlp)
        },
    );
    api.f("stack_head_results", "self, layer", "Each head's output `z_h · W_O[h]` (no bias) for blocks before `layer` (-1: all): [layer·n_head, batch, pos, d_model], labelled `L{l}H{h}`.", |c: &mut RCache, layer: INT| -> RResult<Dynamic> {
        let s = with_gpt2(&c.model, "stack_head_results", |g| c.cache.stack_head_results(g, layer).rt())?;
        Ok(Dynamic::from(RTensor(s.tensor)))
    });
    api.f(
        "stack_head_results",
        "self, layer, options: map",
        "`stack_head_results` with `#{ apply_ln, pos, labels }` (apply_ln uses ln_final's scale).",
        |c: &mut RCache, layer: INT, o: Map| -> RResult<Dynamic> {
            check_keys(&o, STACK_KEYS, "stack_head_results option")?;
            let s = with_gpt2(&c.model, "stack_head_results", |g| c.cache.stack_head_results(g, layer).rt())?;
            finish_stack(c, s, &o, -1, false)
        },
    );
    api.f("apply_ln_to_stack", "self, stack, layer", "Centre each component and divide by the cached scale of the norm reading `layer` (-1: ln_final): TransformerLens's apply_ln_to_stack.", |c: &mut RCache, s: RTensor, layer: INT| -> RResult<RTensor> {
        with_gpt2(&c.model, "apply_ln_to_stack", |g| Ok(RTensor(c.cache.apply_ln_to_stack(g, &s.0, layer, false, None).rt()?)))
    });
    api.f(
        "apply_ln_to_stack",
        "self, stack, layer, options: map",
        "`apply_ln_to_stack` with `#{ mlp_input, pos }` (`pos`: the stack was taken at one position).",
        |c: &mut RCache, s: RTensor, layer: INT, o: Map| -> RResult<RTensor> {
            check_keys(&o, &["mlp_input", "pos"], "apply_ln_to_stack option")?;
            let (mlp, pos) = (bool_opt(&o, "mlp_input")?, int_opt(&o, "pos")?);
            with_gpt2(&c.model, "apply_ln_to_stack", |g| {
                Ok(RTensor(c.cache.apply_ln_to_stack(g, &s.0, layer, mlp, pos).rt()?))
            })
        },
    );
    api.f("logit_attrs", "self, stack, tokens", "Each component's dot product with the unembedding of `tokens` (an id, or ids shaped like the stack's batch/pos axes): [components, ...].", |c: &mut RCache, s: RTensor, tokens: Dynamic| -> RResult<RTensor> {
        let t = tokens_of(&tokens, "tokens")?;
        with_gpt2(&c.model, "logit_attrs", |g| Ok(RTensor(ActivationCache::logit_attrs(g, &s.0, &t, None).rt()?)))
    });
    api.f(
        "logit_attrs",
        "self, stack, tokens, incorrect",
        "`logit_attrs` of the logit difference `tokens` − `incorrect`.",
        |c: &mut RCache, s: RTensor, tokens: Dynamic, bad: Dynamic| -> RResult<RTensor> {
            let (t, b) = (tokens_of(&tokens, "tokens")?, tokens_of(&bad, "incorrect")?);
            with_gpt2(&c.model, "logit_attrs", |g| {
                Ok(RTensor(ActivationCache::logit_attrs(g, &s.0, &t, Some(&b)).rt()?))
            })
        },
    );
    api.f("patch_activation", "model, clean, corrupted, hook, metric", "Activation patching: run `corrupted` with the clean activation of `hook` (`resid_pre`, `resid_mid`, `resid_post`, `attn_out`, `mlp_out`, `q`, `k`, `v`, `z`, `pattern`, `attn_scores`) patched in at each layer x position (x head for q/k/v/z; layer x head for patterns) and return `metric(logits)` for each: [n_layer, pos(, head)].", |ctx: NativeCallContext, m: RModel, c: RTensor, k: RTensor, hook: &str, f: FnPtr| -> RResult<RTensor> {
        patch(&ctx, &m, &c, &k, hook, &f, &Map::new(), false)
    });
    api.f("patch_activation", "model, clean, corrupted, hook, metric, options: map", "`patch_activation` with `#{ all_pos }`: head hooks patched at every position at once, giving [n_layer, head].", |ctx: NativeCallContext, m: RModel, c: RTensor, k: RTensor, hook: &str, f: FnPtr, o: Map| -> RResult<RTensor> {
        patch(&ctx, &m, &c, &k, hook, &f, &o, false)
    });
    api.f("attribution_patch", "model, clean, corrupted, hook, metric", "Attribution patching, the first-order estimate of patch_activation from one forward and backward on `corrupted`: (clean − corrupted activation) · ∂metric/∂activation, in patch_activation's layout. `metric` must return a scalar Tensor computed from the logits.", |ctx: NativeCallContext, m: RModel, c: RTensor, k: RTensor, hook: &str, f: FnPtr| -> RResult<RTensor> {
        patch(&ctx, &m, &c, &k, hook, &f, &Map::new(), true)
    });
    api.f(
        "attribution_patch",
        "model, clean, corrupted, hook, metric, options: map",
        "`attribution_patch` with `#{ all_pos }`.",
        |ctx: NativeCallContext,
         m: RModel,
         c: RTensor,
         k: RTensor,
         hook: &str,
         f: FnPtr,
         o: Map|
         -> RResult<RTensor> { patch(&ctx, &m, &c, &k, hook, &f, &o, true) },
    );
    api.f("logit_lens", "model, tokens", "Log-probabilities [n_layer + 1, batch, pos, vocab] read from the residual stream before each block and after the last, through ln_f and the unembedding.", |ctx: NativeCallContext, m: RModel, t: RTensor| -> RResult<RTensor> {
        let extra = ScriptHooks::of_model(&ctx, &m);
        let extra = extra.as_ref().map(|h| h as &dyn Hooks);
        with_gpt2(&m, "logit_lens", |g| Ok(RTensor(lens::logit_lens(g, &t.0, extra).rt()?)))
    });
    api.f("logit_lens_table", "model, tokens, options: map", "The logit lens as a markdown table: the `top` (5) most likely next tokens and their probabilities read from the residual stream before each block and at the end, at position `pos` (-1) of batch row `batch` (0); `decode`: \"ids\", \"gpt2\" (BPE text) or \"bytes\".", |ctx: NativeCallContext, m: RModel, t: RTensor, o: Map| -> RResult<String> {
        lens_table(&ctx, &m, &t, &o)
    });
    api.f("direct_logit_attr", "model, tokens, answer", "Direct logit attribution to `answer` (an id, or one per batch row) at the last position: `#{ heads: [n_layer, n_head, batch], components: [components, batch], labels }` (embeddings, each attention and MLP output), scaled by ln_final as the model applied it.", |ctx: NativeCallContext, m: RModel, t: RTensor, a: Dynamic| -> RResult<Map> {
        dla(&ctx, &m, &t, &a, &Map::new())
    });
    api.f(
        "direct_logit_attr",
        "model, tokens, answer, options: map",
        "`direct_logit_attr` with `#{ pos: -1, incorrect }` (incorrect: attribute the logit difference).",
        |ctx: NativeCallContext, m: RModel, t: RTensor, a: Dynamic, o: Map| -> RResult<Map> {
            dla(&ctx, &m, &t, &a, &o)
        },
    );
    api.f("repeated_tokens", "batch, n", "`batch` sequences of `n` random ids, each repeated twice: [batch, 2n] (re-seeds the global generator with seed 0).", |b: INT, n: INT| -> RResult<RTensor> {
        Ok(RTensor(detect::repeated_tokens(b, n, 0, 50257, None, 0).rt()?))
    });
    api.f("repeated_tokens", "batch, n, options: map", "`repeated_tokens` with `#{ lo: 0, hi: 50257, bos, seed: 0 }` (ids in [lo, hi); `bos` prepends that id).", |b: INT, n: INT, o: Map| -> RResult<RTensor> {
        check_keys(&o, &["lo", "hi", "bos", "seed"], "repeated_tokens option")?;
        Ok(RTensor(detect::repeated_tokens(b, n, int_opt(&o, "lo")?.unwrap_or(0), int_opt(&o, "hi")?.unwrap_or(50257), int_opt(&o, "bos")?, int_opt(&o, "seed")?.unwrap_or(0)).rt()?))
    });
    api.f("head_scores", "model, detector", "Each head's score [n_layer, n_head] for `induction`, `duplicate_token` or `previous_token` on 8 repeated random sequences of 50 tokens: the mean attention paid to the position that mechanism reads.", |ctx: NativeCallContext, m: RModel, d: &str| -> RResult<RTensor> {
        head_scores(&ctx, &m, d, &Map::new())
    });
    api.f("head_scores", "model, detector, options: map", "`head_scores` with `#{ n: 50, batch: 8, lo, hi, bos, seed, tokens }` (`tokens`: your own repeated sequences of period n, after bos when given).", |ctx: NativeCallContext, m: RModel, d: &str, o: Map| -> RResult<RTensor> {
        head_scores(&ctx, &m, d, &o)
    });
    api.f("gpt2_from_hf", "dir", "Load a Hugging Face GPT-2 folder (config.json + model.safetensors) as a knlp GPT-2 that computes what transformers computes.", |dir: &str| -> RResult<RModel> {
        from_hf(dir, &Map::new())
    });
    api.f("gpt2_from_hf", "dir, options: map", "`gpt2_from_hf` with `#{ fold_ln, center_writing_weights, center_unembed, device }` (TransformerLens's weight processing; docs/mechint.md).", |dir: &str, o: Map| -> RResult<RModel> {
        from_hf(dir, &o)
    });
    api.f("save_hf", "model, dir", "Write a standard GPT-2 as a Hugging Face folder (config.json + model.safetensors, Conv1D layout) that GPT2LMHeadModel.from_pretrained loads.", |m: RModel, dir: &str| -> RResult<()> {
        with_gpt2(&m, "save_hf", |g| gpt2_hf::save_hf(g, Path::new(dir)).rt())
    });
    api.f("process_weights", "model, options: map", "A copy of a GPT-2 with `#{ fold_ln, center_writing_weights, center_unembed }` applied (the head becomes untied); logits are unchanged (log-probs for center_unembed).", |m: RModel, o: Map| -> RResult<RModel> {
        check_keys(&o, &PROCESS_KEYS[..3], "process_weights option")?;
        let p = process_opts(&o)?;
        with_gpt2(&m, "process_weights", |g| Ok(wrap(weights::process(g, p).rt()?)))
    });
    register_plots(&mut api);
}

const HEAT_KEYS: &[&str] = &["title", "x_labels", "y_labels", "x_label", "y_label", "cmap", "range", "cols"];

fn labels_opt(o: &Map, k: &str) -> RResult<Vec<String>> {
    match o.get(k) {
        None => Ok(Vec::new()),
        Some(v) => {
            let a = v.read_lock::<Array>().ok_or_else(|| rerr(format!("{k} must be an array of strings")))?;
            a.iter()
                .map(|x| if let Ok(i) = x.as_int() { Ok(i.to_string()) } else { expect_str(x, k) })
                .collect()
        }
    }
}

/// Rows of a 2-D tensor as f64.
fn rows_of(t: &Tensor, what: &str) -> RResult<Vec<Vec<f64>>> {
    let s = t.size();
    if s.len() != 2 {
        return Err(rerr(format!("{what} needs a 2-D tensor, got shape {s:?}")));
    }
    let flat = crate::tensor::to_vec_f64(&t.f_to_device(Device::Cpu).rt()?).rt()?;
    Ok(flat.chunks(s[1].max(1) as usize).map(|c| c.to_vec()).collect())
}

fn heatmap_of(t: &Tensor, o: &Map, title: String) -> RResult<report::heatmap::Heatmap> {
    check_keys(o, HEAT_KEYS, "plot_heatmap option")?;
    let cmap = match o.get("cmap").map(|c| expect_str(c, "cmap")).transpose()?.as_deref() {
        None | Some("viridis") => report::heatmap::Cmap::Viridis,
        Some("rdylgn") | Some("RdYlGn") => report::heatmap::Cmap::RdYlGn,
        Some("rdbu") | Some("RdBu") => report::heatmap::Cmap::RdBu,
        Some(other) => return Err(rerr(format!("unknown cmap '{other}' (valid: viridis, rdylgn, rdbu)"))),
    };
    let range = match o.get("range") {
        None => None,
        Some(v) => {
            let a = v.read_lock::<Array>().ok_or_else(|| rerr("range must be [lo, hi]"))?;
            if a.len() != 2 {
                return Err(rerr("range must be [lo, hi]"));
            }
            Some((as_number(&a[0], "range")?, as_number(&a[1], "range")?))
        }
    };
    let text = |k: &str| -> RResult<String> {
        o.get(k).map(|v| expect_str(v, k)).transpose().map(|s| s.unwrap_or_default())
    };
    Ok(report::heatmap::Heatmap {
        title,
        values: rows_of(t, "plot_heatmap")?,
        row_labels: labels_opt(o, "y_labels")?,
        col_labels: labels_opt(o, "x_labels")?,
        x_label: text("x_label")?,
        y_label: text("y_label")?,
        range,
        cmap,
    })
}

/// The files a plot wrote, as script strings; a notebook shows them inline.
fn paths_out(v: Vec<std::path::PathBuf>) -> Array {
    super::display::show_files(&v);
    v.into_iter().map(|p| Dynamic::from(p.display().to_string())).collect()
}

/// Strip a .png/.svg extension: the heatmap writes both.
fn stem(path: &str) -> std::path::PathBuf {
    let p = Path::new(path);
    match p.extension().and_then(|e| e.to_str()) {
        Some("png") | Some("svg") => p.with_extension(""),
        _ => p.to_path_buf(),
    }
}

fn register_plots(api: &mut Api) {
    api.f("plot_heatmap", "path, values, options: map", "Draw a 2-D tensor as a heatmap (PNG and SVG at `path` without its extension; shown inline in a notebook) with `#{ title, x_labels, y_labels, x_label, y_label, cmap: \"viridis\"|\"rdylgn\"|\"rdbu\", range: [lo, hi] }`: patching results (layer x position, layer x head), head scores. Returns the files written.", |path: &str, t: RTensor, o: Map| -> RResult<Array> {
        let title = o.get("title").map(|v| expect_str(v, "title")).transpose()?.unwrap_or_default();
        let h = heatmap_of(&t.0, &o, title)?;
        Ok(paths_out(report::heatmap::draw_heatmap(&h, &stem(path)).rt()?))
    });
    api.f("plot_attention", "path, pattern, tokens: array, options: map", "Draw attention patterns with token labels: `pattern` [T, T] (one head) or [H, T, T] (one panel per head), query rows and key columns labelled by `tokens` (strings); options as plot_heatmap plus `cols` (panels per row). Returns the files written.", |path: &str, t: RTensor, tokens: Array, o: Map| -> RResult<Array> {
        let labels: Vec<Dynamic> = tokens;
        let mut o = o;
        o.insert("x_labels".into(), Dynamic::from_array(labels.clone()));
        o.insert("y_labels".into(), Dynamic::from_array(labels));
        o.entry("x_label".into()).or_insert_with(|| Dynamic::from("key"));
        o.entry("y_label".into()).or_insert_with(|| Dynamic::from("query"));
        o.entry("range".into()).or_insert_with(|| Dynamic::from_array(vec![Dynamic::from_float(0.0), Dynamic::from_float(1.0)]));
        let title = o.get("title").map(|v| expect_str(v, "title")).transpose()?.unwrap_or_default();
        let cols = int_opt(&o, "cols")?.unwrap_or(4).max(1) as usize;
        o.remove("cols");
        let p = t.0.f_to_kind(tch::Kind::Float).rt()?;
        match p.dim() {
            2 => Ok(paths_out(report::heatmap::draw_heatmap(&heatmap_of(&p, &o, title)?, &stem(path)).rt()?)),
            3 => {
                let mut hs = Vec::new();
                for h in 0..p.size()[0] {
                    hs.push(heatmap_of(&p.f_select(0, h).rt()?, &o, format!("head {h}"))?);
                }
                Ok(paths_out(report::heatmap::draw_heatmap_grid(&hs, cols, &title, &stem(path)).rt()?))
            }
            _ => Err(rerr(format!("plot_attention needs a pattern [T, T] or [H, T, T], got {:?}", p.size()))),
        }
    });
}

/// Text of one token id for a table: GPT-2 BPE, a byte, or the id.
fn token_text(id: i64, how: &str) -> String {
    let text = match how {
        "gpt2" => crate::data::bpe::decode(&[id as u32]).unwrap_or_else(|_| format!("<{id}>")),
        "bytes" if (32..127).contains(&id) => (id as u8 as char).to_string(),
        _ => format!("<{id}>"),
    };
    format!("{text:?}")
}

fn lens_table(ctx: &NativeCallContext, m: &RModel, t: &RTensor, o: &Map) -> RResult<String> {
    check_keys(o, &["pos", "top", "batch", "decode"], "logit_lens_table option")?;
    let how = o.get("decode").map(|v| expect_str(v, "decode")).transpose()?.unwrap_or_else(|| "ids".into());
    if !["ids", "gpt2", "bytes"].contains(&how.as_str()) {
        return Err(rerr(format!("decode must be \"ids\", \"gpt2\" or \"bytes\", got \"{how}\"")));
    }
    let top = int_opt(o, "top")?.unwrap_or(5).clamp(1, 50);
    let extra = ScriptHooks::of_model(ctx, m);
    let extra = extra.as_ref().map(|h| h as &dyn Hooks);
    let lp = with_gpt2(m, "logit_lens_table", |g| lens::logit_lens(g, &t.0, extra).rt())?;
    let (l, b, tt) = (lp.size()[0], lp.size()[1], lp.size()[2]);
    let bi = int_opt(o, "batch")?.unwrap_or(0);
    let p = int_opt(o, "pos")?.unwrap_or(-1);
    let pi = if p < 0 { p + tt } else { p };
    if !(0..b).contains(&bi) || !(0..tt).contains(&pi) {
        return Err(rerr(format!(
            "logit_lens_table: batch {bi} / pos {p} out of range for {b} x {tt} tokens"
        )));
    }
    let rows = lp.f_select(1, bi).rt()?.f_select(1, pi).rt()?.f_exp().rt()?.f_to_device(Device::Cpu).rt()?;
    let (vals, idx) = rows.f_topk(top, -1, true, true).rt()?;
    let (vals, idx) = (crate::tensor::to_vec_f64(&vals).rt()?, crate::tensor::to_vec_i64(&idx).rt()?);
    let mut out = format!("| layer | top {top} next tokens at position {pi} (probability) |\n|---|---|\n");
    for r in 0..l as usize {
        let label = if r + 1 == l as usize { "final".to_string() } else { format!("{r}_pre") };
        let cells: Vec<String> = (0..top as usize)
            .map(|k| {
                format!("{} {:.3}", token_text(idx[r * top as usize + k], &how), vals[r * top as usize + k])
            })
            .collect();
        out += &format!("| {label} | {} |\n", cells.join(", "));
    }
    Ok(out)
}

fn dla(ctx: &NativeCallContext, m: &RModel, t: &RTensor, a: &Dynamic, o: &Map) -> RResult<Map> {
    let extra = ScriptHooks::of_model(ctx, m);
    let extra = extra.as_ref().map(|h| h as &dyn Hooks);
    check_keys(o, &["pos", "incorrect"], "direct_logit_attr option")?;
    let ans = tokens_of(a, "answer")?;
    let bad = o.get("incorrect").map(|v| tokens_of(v, "incorrect")).transpose()?;
    let pos = int_opt(o, "pos")?.unwrap_or(-1);
    let d = with_gpt2(m, "direct_logit_attr", |g| {
        lens::direct_logit_attr(g, &t.0, &ans, bad.as_ref(), pos, extra).rt()
    })?;
    Ok(map_of(vec![
        ("heads", Dynamic::from(RTensor(d.heads))),
        ("components", Dynamic::from(RTensor(d.components.tensor))),
        ("labels", Dynamic::from_array(d.components.labels.into_iter().map(Dynamic::from).collect())),
    ]))
}
