//! Pruning in scripts: pruners for `train()`, the scorers as functions, the
//! schedule, and scorers written as script closures.
use std::cell::RefCell;
use std::rc::Rc;

use rhai::{Array, Dynamic, Engine, FnPtr, Map, FLOAT, INT};

use super::api::{Api, DocEntry};
use super::models::RModel;
use super::optim::ROpt;
use super::value::*;
use crate::prune::{score, sparsity_at, PruneConfig, Pruner};

/// A pruner held by a script: its masks persist across `train()` calls.
#[derive(Clone)]
pub struct RPruner {
    pub pruner: Rc<RefCell<Pruner>>,
    pub model: RModel,
    /// For state pruning: the optimizer whose moments are scored.
    pub opt: Option<ROpt>,
    /// A script scorer `|w, m, v| ...`, called once per tensor per update.
    pub score: Option<FnPtr>,
}

impl RPruner {
    pub fn borrow_mut(&self) -> RResult<std::cell::RefMut<'_, Pruner>> {
        self.pruner.try_borrow_mut().map_err(|_| rerr("the pruner is busy"))
    }
}

fn prune_config(opts: &Map) -> RResult<(PruneConfig, Option<FnPtr>)> {
    let mut rest = opts.clone();
    let score = match rest.remove("score") {
        Some(f) => Some(f.try_cast::<FnPtr>().ok_or_else(|| rerr("score must be a function |w, m, v| ..."))?),
        None => None,
    };
    let base = serde_json::to_value(PruneConfig::default()).map_err(|e| rerr(e.to_string()))?;
    let valid: Vec<String> = base
        .as_object()
        .map(|o| o.keys().cloned().chain(["score".to_string()]).collect())
        .unwrap_or_default();
    for k in rest.keys() {
        if !valid.iter().any(|v| v == k.as_str()) {
            let mut v = valid.clone();
            v.sort();
            return Err(rerr(format!("unknown pruning option '{k}' (valid keys: {})", v.join(", "))));
        }
    }
    // The default variant is the state pruner's (bitter7); movement's is
    // knlp, and magnitude has none (runs record it as such).
    let method = rest.get("method").and_then(|m| m.clone().into_string().ok());
    if !rest.contains_key("variant") {
        match method.as_deref() {
            Some("movement") => {
                rest.insert("variant".into(), Dynamic::from("knlp"));
            }
            Some("magnitude") => {
                rest.insert("variant".into(), Dynamic::from(""));
            }
            _ => {}
        }
    }
    let cfg: PruneConfig = rhai::serde::from_dynamic(&Dynamic::from_map(rest))
        .map_err(|e| rerr(format!("pruning options: {e}")))?;
    cfg.validate().rt()?;
    Ok((cfg, score))
}

fn build(model: &RModel, opt: Option<ROpt>, cfg: PruneConfig, score: Option<FnPtr>) -> RResult<RPruner> {
    let p = Pruner::new(model.borrow()?.store(), cfg).rt()?;
    Ok(RPruner { pruner: Rc::new(RefCell::new(p)), model: model.clone(), opt, score })
}

/// `()` or a tensor, for the optional moments of `importance`.
fn opt_tensor(d: &Dynamic, what: &str) -> RResult<Option<tch::Tensor>> {
    if d.is_unit() {
        return Ok(None);
    }
    d.read_lock::<RTensor>()
        .map(|t| Some(t.0.shallow_clone()))
        .ok_or_else(|| rerr(format!("{what} must be a Tensor or ()")))
}

pub fn register(engine: &mut Engine, docs: &mut Vec<DocEntry>) {
    engine.register_type_with_name::<RPruner>("Pruner");
    engine.register_fn("to_string", |p: &mut RPruner| describe(p));
    engine.register_fn("to_debug", |p: &mut RPruner| describe(p));
    let mut api = Api::new(engine, docs);
    api.group("Pruning");
    api.f("pruner", "model, options: map", "A magnitude or movement pruner for train(): `#{ method: \"magnitude\"|\"movement\", variant: \"knlp\"|\"sanh\", target, warmup, ramp_end, ramp_end_epoch, frequency, schedule: \"cubic\"|\"linear\", per_layer, sample_fraction, score_dtype: \"fp32\"|\"fp16\", prune_embeddings, mask_state, regrow, score }`.", |m: RModel, o: Map| -> RResult<RPruner> {
        let (cfg, score) = prune_config(&o)?;
        if cfg.method == "state" {
            return Err(rerr("state pruning scores the optimizer's moments: use state_pruner(opt, ...)"));
        }
        build(&m, None, cfg, score)
    });
    api.f("state_pruner", "opt, options: map", "AdamWPrune's state pruner over `opt`'s moments: `#{ variant: \"bitter0\" ... \"bitter9\"|\"bitter10\"|\"bitter10z\"|\"bitter10s\"|\"bitter10c\", target, warmup, ramp_end, frequency, ..., bitter10: #{ alpha, beta_flip, beta_dir, beta_mw, beta_jitter, ema, sketch, snapshot_every, negate_m }, score: |w, m, v| ... }`; a `score` closure replaces the variant and is called once per tensor per update.", |o: ROpt, opts: Map| -> RResult<RPruner> {
        let (mut cfg, score) = prune_config(&opts)?;
        if opts.get("method").is_some_and(|m| m.to_string() != "state") {
            return Err(rerr("state_pruner(): method is always \"state\""));
        }
        cfg.method = "state".into();
        cfg.validate().rt()?;
        let model = o.model.clone();
        build(&model, Some(o), cfg, score)
    });
    api.f(
        "sparsity",
        "self",
        "Measured fraction of prunable weights that are exactly zero.",
        |p: &mut RPruner| -> RResult<FLOAT> {
            let m = p.model.borrow()?;
            p.borrow_mut()?.weight_sparsity(m.store()).rt()
        },
    );
    api.f(
        "layer_sparsity",
        "self",
        "Measured sparsity of each prunable tensor: `#{ name: fraction }`.",
        |p: &mut RPruner| -> RResult<Map> {
            let m = p.model.borrow()?;
            let v = p.borrow_mut()?.layer_sparsity(m.store()).rt()?;
            Ok(v.into_iter().map(|(n, s)| (n.into(), Dynamic::from_float(s))).collect())
        },
    );
    api.f(
        "mask",
        "self, name",
        "The bool mask of prunable tensor `name` (true = kept).",
        |p: &mut RPruner, name: &str| -> RResult<RTensor> {
            p.borrow_mut()?
                .mask(name)
                .map(RTensor)
                .ok_or_else(|| rerr(format!("'{name}' is not a prunable tensor")))
        },
    );
    api.f("update", "self, sparsity", "Recompute the masks now for `sparsity` (scores computed once, exact threshold unless sample_fraction) and zero the pruned weights and, with mask_state, their optimizer moments (sparsity() measures the result). For timing and manual schedules; train() updates on its schedule.", |p: &mut RPruner, s: FLOAT| -> RResult<()> {
        let m = p.model.borrow()?;
        let opt = match &p.opt {
            Some(o) => Some(o.opt.try_borrow().map_err(|_| rerr("the optimizer is busy"))?),
            None => None,
        };
        let mut pr = p.borrow_mut()?;
        tch::no_grad(|| pr.update_masks(m.store(), opt.as_deref(), s, None)).rt()?;
        pr.apply_all(m.store(), opt.as_deref()).rt()
    });
    api.f(
        "prunable",
        "self",
        "Names of the prunable tensors, in model order.",
        |p: &mut RPruner| -> RResult<Array> {
            Ok(p.borrow_mut()?.members.iter().map(|m| Dynamic::from(m.name.clone())).collect())
        },
    );
    api.get("options", "The pruning configuration, as a map.", |p: &mut RPruner| -> RResult<Dynamic> {
        rhai::serde::to_dynamic(&p.borrow_mut()?.cfg).map_err(|e| rerr(e.to_string()))
    });
    api.f("importance", "method, w, m: Tensor|(), v: Tensor|()", "Importance of one weight tensor by `\"magnitude\"` or `\"bitter0\"` ... `\"bitter10c\"` (bitter8/9 without their structural weight, bitter10/10s/10c without their tracked per-tensor factor); with `()` for a missing moment the methods that need it fall back to |w|.", |method: &str, w: RTensor, m: Dynamic, v: Dynamic| -> RResult<RTensor> {
        let (m, v) = (opt_tensor(&m, "m")?, opt_tensor(&v, "v")?);
        tensor_result(score::score(method, &w.0, m.as_ref(), v.as_ref(), false))
    });
    api.f("sparsity_at", "step, options: map", "Scheduled sparsity at `step` for `#{ warmup, ramp_end, target, schedule: \"cubic\"|\"linear\" }`: 0 through warm-up, then target * p^3 (or p), p = min(1, (step - warmup) / (ramp_end - warmup)).", |step: INT, o: Map| -> RResult<FLOAT> {
        check_keys(&o, &["warmup", "ramp_end", "target", "schedule"], "sparsity_at")?;
        let int = |k: &str, d: i64| o.get(k).map(|v| v.as_int().map_err(|_| rerr(format!("{k} must be an int")))).unwrap_or(Ok(d));
        let target = o.get("target").map(|v| as_number(v, "target")).unwrap_or(Ok(0.5))?;
        let sched = o.get("schedule").map(|v| expect_str(v, "schedule")).unwrap_or(Ok("cubic".into()))?;
        if sched != "cubic" && sched != "linear" {
            return Err(rerr(format!("schedule must be cubic or linear, got '{sched}'")));
        }
        Ok(sparsity_at(step, int("warmup", 100)?, int("ramp_end", 3000)?, target, sched == "cubic"))
    });
    api.f("kth_smallest", "x, k", "The k-th smallest value (1-based) of a tensor, exactly, by three passes of radix counting (11, 11 and 10 bits) over the floats' order-preserving bit patterns (the pruners' threshold; compare Tensor.kthvalue).", |x: RTensor, k: INT| -> RResult<FLOAT> {
        crate::prune::select::kth_smallest(&x.0, k).rt()
    });
    api.f("scorers", "", "Names of the built-in element-wise scorers.", || -> Array {
        score::names().into_iter().map(|n| Dynamic::from(n.to_string())).collect()
    });
}

fn describe(p: &RPruner) -> String {
    match p.pruner.try_borrow() {
        Ok(x) => {
            let name = [x.cfg.method.as_str(), x.cfg.variant.as_str()].join(" ");
            format!("Pruner({}, target {}, {} prunable weights)", name.trim_end(), x.cfg.target, x.numel())
        }
        Err(_) => "Pruner(<busy>)".into(),
    }
}
