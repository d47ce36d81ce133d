//! Optimizers in scripts: built over a model, stepped by `train()` or by
//! hand (`loss.backward(); opt.step(); opt.zero_grad()`), with readable state.
use std::cell::RefCell;
use std::rc::Rc;

use rhai::{Dynamic, Engine, Map, FLOAT, INT};

use super::api::{Api, DocEntry};
use super::models::RModel;
use super::value::*;
use crate::optim::{OptConfig, OptKind, Optimizer, KINDS};

/// An optimizer held by a script, with the model it updates.
#[derive(Clone)]
pub struct ROpt {
    pub opt: Rc<RefCell<Optimizer>>,
    pub model: RModel,
}

impl ROpt {
    pub fn borrow_mut(&self) -> RResult<std::cell::RefMut<'_, Optimizer>> {
        self.opt.try_borrow_mut().map_err(|_| rerr("the optimizer is busy"))
    }
}

/// Build an optimizer config from a kind's defaults and an option map.
pub fn opt_config(kind: OptKind, opts: &Map) -> RResult<OptConfig> {
    let mut base = serde_json::to_value(OptConfig::for_kind(kind)).map_err(|e| rerr(e.to_string()))?;
    let mut over: serde_json::Value =
        rhai::serde::from_dynamic(&Dynamic::from_map(opts.clone())).map_err(|e| rerr(e.to_string()))?;
    let base_lr = over.get("lr").and_then(|v| v.as_f64()).unwrap_or(OptConfig::for_kind(kind).lr);
    if let Some(g) = over.get_mut("groups") {
        script_groups(g, base_lr)?;
    }
    // `groups` is left out of the serialized defaults while empty.
    let valid: Vec<String> = base
        .as_object()
        .map(|o| o.keys().cloned().chain(["groups".to_string()]).collect())
        .unwrap_or_default();
    if let (Some(b), Some(o)) = (base.as_object_mut(), over.as_object()) {
        for (k, v) in o {
            if !valid.contains(k) {
                return Err(rerr(format!(
                    "unknown optimizer option '{k}' (valid keys: {})",
                    valid.join(", ")
                )));
            }
            if k == "spam" || k == "sinkgd" {
                // Merge sub-options over their defaults.
                if let (Some(bs), Some(os)) =
                    (b.get_mut(k.as_str()).and_then(|s| s.as_object_mut()), v.as_object())
                {
                    for (sk, sv) in os {
                        bs.insert(sk.clone(), sv.clone());
                    }
                    continue;
                }
            }
            b.insert(k.clone(), v.clone());
        }
    }
    let cfg: OptConfig = serde_json::from_value(base).map_err(|e| rerr(format!("optimizer options: {e}")))?;
    cfg.validate().rt()?;
    Ok(cfg)
}

/// Script spellings of parameter groups: `params` may be one string, and
/// `lr` (an absolute learning rate) becomes `lr_scale` relative to the
/// optimizer's, so that schedules scale every group alike (as torch's do).
fn script_groups(groups: &mut serde_json::Value, base_lr: f64) -> RResult<()> {
    let Some(arr) = groups.as_array_mut() else {
        return Err(rerr("optimizer groups must be an array of maps"));
    };
    for (i, g) in arr.iter_mut().enumerate() {
        let Some(m) = g.as_object_mut() else {
            return Err(rerr(format!("optimizer groups[{i}] must be a map")));
        };
        if let Some(p) = m.get("params").filter(|p| p.is_string()).cloned() {
            m.insert("params".into(), serde_json::json!([p]));
        }
        if let Some(lr) = m.remove("lr") {
            if m.contains_key("lr_scale") {
                return Err(rerr(format!("optimizer groups[{i}]: give lr or lr_scale, not both")));
            }
            let lr =
                lr.as_f64().ok_or_else(|| rerr(format!("optimizer groups[{i}]: lr must be a number")))?;
            if base_lr <= 0.0 {
                return Err(rerr(format!("optimizer groups[{i}]: lr needs a base lr > 0 (use lr_scale)")));
            }
            m.insert("lr_scale".into(), serde_json::json!(lr / base_lr));
        }
    }
    Ok(())
}

fn build(model: &RModel, cfg: OptConfig) -> RResult<ROpt> {
    let m = model.borrow()?;
    let opt = Optimizer::new(m.store(), cfg).rt()?;
    Ok(ROpt { opt: Rc::new(RefCell::new(opt)), model: model.clone() })
}

pub fn register(engine: &mut Engine, docs: &mut Vec<DocEntry>) {
    engine.register_type_with_name::<ROpt>("Optimizer");
    engine.register_fn("to_string", |o: &mut ROpt| describe(o));
    engine.register_fn("to_debug", |o: &mut ROpt| describe(o));
    let mut api = Api::new(engine, docs);
    api.group("Optimizers");
    api.f("optimizer", "model, options: map", "An optimizer over a model's parameters: `#{ kind: \"sgd\"|\"adam\"|\"adamw\"|\"adamwadv\"|\"adamwspam\"|\"sinkgd\", lr, beta1, beta2, eps, weight_decay, momentum, nesterov, amsgrad, clip_norm, fused, spam: #{ theta, interval, warmup, enable_clip, spike_threshold }, sinkgd: #{ tau, n_iter }, groups: [#{ params: \"glob\"|[globs], lr | lr_scale, weight_decay }] }`; unset keys take the kind's defaults. A parameter group's `lr` is scaled by the schedule like the base lr; its `weight_decay` applies to every parameter it holds (docs/optim.md).", |m: RModel, o: Map| -> RResult<ROpt> {
        let kind = match o.get("kind") {
            Some(k) => OptKind::parse(&expect_str(k, "kind")?).rt()?,
            None => OptKind::AdamW,
        };
        let mut rest = o.clone();
        rest.remove("kind");
        build(&m, opt_config(kind, &rest)?)
    });
    for &(name, kind, what) in KINDS {
        let doc: &'static str =
            Box::leak(format!("{what}; options as for optimizer() without `kind`.").into_boxed_str());
        api.f(name, "model, options: map", doc, move |m: RModel, o: Map| -> RResult<ROpt> {
            build(&m, opt_config(kind, &o)?)
        });
        let doc0: &'static str =
            Box::leak(format!("{what}, with its default hyper-parameters.").into_boxed_str());
        api.f(name, "model", doc0, move |m: RModel| -> RResult<ROpt> {
            build(&m, OptConfig::for_kind(kind))
        });
    }
    api.f(
        "step",
        "self",
        "One update from the gradients of the last backward(); returns `#{ lr, grad_norm }`.",
        |o: &mut ROpt| -> RResult<Map> {
            let m = o.model.borrow()?;
            let rep = o.borrow_mut()?.step(m.store()).rt()?;
            let norm = match rep.grad_norm {
                Some(t) => Dynamic::from_float(t.f_double_value(&[]).rt()?),
                None => Dynamic::UNIT,
            };
            Ok(map_of(vec![
                ("lr", Dynamic::from_float(rep.lr)),
                ("grad_norm", norm),
                ("spike", Dynamic::from_bool(rep.spike)),
            ]))
        },
    );
    api.f(
        "zero_grad",
        "self",
        "Zero the model's gradients (one kernel per flat buffer).",
        |o: &mut ROpt| -> RResult<()> { o.model.borrow()?.store().zero_grad().rt() },
    );
    api.f("state", "self, name", "Optimizer state of parameter `name` as views: `#{ exp_avg, exp_avg_sq, max_exp_avg_sq, momentum }` (absent entries are left out).", |o: &mut ROpt, name: &str| -> RResult<Map> {
        let m = o.model.borrow()?;
        let st = o.opt.try_borrow().map_err(|_| rerr("the optimizer is busy"))?.state(m.store(), name).rt()?;
        let mut out = Map::new();
        for (k, t) in [("exp_avg", st.exp_avg), ("exp_avg_sq", st.exp_avg_sq), ("max_exp_avg_sq", st.max_exp_avg_sq), ("momentum", st.momentum)] {
            if let Some(t) = t {
                out.insert(k.into(), Dynamic::from(RTensor(t)));
            }
        }
        Ok(out)
    });
    api.get(
        "lr",
        "Learning rate of the next step (the schedule sets it during train()).",
        |o: &mut ROpt| -> RResult<FLOAT> { Ok(o.borrow_mut()?.lr) },
    );
    api.f(
        "set_lr",
        "self, lr",
        "Set the learning rate of the next step.",
        |o: &mut ROpt, lr: FLOAT| -> RResult<()> {
            if lr.is_nan() || lr < 0.0 {
                return Err(rerr("set_lr(): lr must be >= 0"));
            }
            o.borrow_mut()?.lr = lr;
            Ok(())
        },
    );
    api.get("steps", "Optimizer steps taken.", |o: &mut ROpt| -> RResult<INT> { Ok(o.borrow_mut()?.step) });
    api.get("kind", "The optimizer's name.", |o: &mut ROpt| -> RResult<String> {
        Ok(o.borrow_mut()?.cfg.kind.name().to_string())
    });
    api.get("options", "The full configuration, as a map.", |o: &mut ROpt| -> RResult<Dynamic> {
        rhai::serde::to_dynamic(&o.borrow_mut()?.cfg).map_err(|e| rerr(e.to_string()))
    });
}

fn describe(o: &ROpt) -> String {
    match o.opt.try_borrow() {
        Ok(x) => format!("Optimizer({}, lr {}, {} steps)", x.cfg.kind.name(), x.lr, x.step),
        Err(_) => "Optimizer(<busy>)".into(),
    }
}
