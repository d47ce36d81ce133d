//! The V reconstructor of KV-cache pruning in scripts
//! (`crate::attention::vrecon`, `crate::decode::recon`): fit, save, load, and pass it to
//! `generate`/`kv_prune_eval` as `kv_prune: #{ ..., recon: r }`.
use std::path::Path;
use std::rc::Rc;

use rhai::{Array, Dynamic, Engine, Map, INT};

use super::api::{Api, DocEntry};
use super::attention::{prune_options, with_gpt2};
use super::models::RModel;
use super::value::*;
use crate::attention::kvprune::Recon;
use crate::attention::vrecon::VRecon;
use crate::decode::recon::{self, FitOptions, FitReport};
use crate::models::Model;

/// A fitted reconstructor and what its fit reported.
#[derive(Clone)]
pub struct RRecon(pub Recon, pub Rc<FitReport>);

fn floats(v: &[f64]) -> Dynamic {
    Dynamic::from_array(v.iter().map(|&x| Dynamic::from_float(x)).collect::<Array>())
}

fn report_map(r: &FitReport) -> Map {
    map_of(vec![
        ("losses", floats(&r.losses)),
        ("rel_err_plain", floats(&r.rel_err_plain)),
        ("rel_err_recon", floats(&r.rel_err_recon)),
        ("mean_gate", floats(&r.mean_gate)),
    ])
}

const FIT_KEYS: &[&str] = &["steps", "lr", "batch", "seed"];

fn fit(m: &RModel, tokens: &RTensor, o: &Map) -> RResult<RRecon> {
    let cfg = prune_options(o, "kv_recon_fit", FIT_KEYS)?;
    let d = FitOptions::default();
    let int = |k: &str, dv: i64| -> RResult<i64> {
        o.get(k).map_or(Ok(dv), |v| {
            v.as_int().map_err(|t| rerr(format!("kv_recon_fit: {k} must be an int, got {t}")))
        })
    };
    let fo = FitOptions {
        steps: int("steps", d.steps)?,
        batch: int("batch", d.batch)?,
        seed: int("seed", d.seed)?,
        lr: o.get("lr").map_or(Ok(d.lr), |v| as_number(v, "lr"))?,
    };
    with_gpt2(m, "kv_recon_fit", |g| {
        let (r, rep) = recon::fit(g, &tokens.0, &cfg, &fo).rt()?;
        Ok(RRecon(Recon(Rc::new(r)), Rc::new(rep)))
    })
}

pub fn register(engine: &mut Engine, docs: &mut Vec<DocEntry>) {
    engine.register_type_with_name::<RRecon>("KvRecon");
    let mut api = Api::new(engine, docs);
    api.group("Attention");
    api.f(
        "kv_recon_fit",
        "model, tokens, options: map",
        "Fit the seed's V reconstructor for KV-cache pruning (docs/attention.md, \"V reconstructor\"): the model frozen, per layer ṽ = g·v + (1 − g)·(W x + b), g = σ(G x + c) from the attention input x, trained with Adam so that each query's output over its top-k kept positions matches the dense output on held-out ids [N, T]. Options: the pruning of `kv_prune_eval` (`keep_ratio`, `k_min`, `recency`, `exposure`, ...) and `steps: 200, lr: 1e-3, batch: 8, seed: 0`. Returns a KvRecon; pass it as `kv_prune: #{ ..., recon: r }`.",
        |m: RModel, tokens: RTensor, o: Map| -> RResult<RRecon> { fit(&m, &tokens, &o) },
    );
    api.f(
        "kv_recon_load",
        "model, path",
        "Load a reconstructor `save` wrote, onto `model`'s device; its shape must match the model's.",
        |m: RModel, path: &str| -> RResult<RRecon> {
            with_gpt2(&m, "kv_recon_load", |g| {
                let r = VRecon::load(Path::new(path), g.store().device()).rt()?;
                recon::check(&r, g).rt()?;
                Ok(RRecon(Recon(Rc::new(r)), Rc::new(FitReport::default())))
            })
        },
    );
    api.f(
        "save",
        "self, path",
        "Write the reconstructor to a safetensors file (atomically).",
        |r: &mut RRecon, path: &str| -> RResult<()> { r.0 .0.save(Path::new(path)).rt() },
    );
    api.get(
        "report",
        "The fit: `#{ losses (per step), rel_err_plain, rel_err_recon, mean_gate (per layer) }` (empty after kv_recon_load).",
        |r: &mut RRecon| report_map(&r.1),
    );
    api.get("layers", "Layers the reconstructor has.", |r: &mut RRecon| r.0 .0.layers.len() as INT);
}
