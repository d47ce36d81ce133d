//! Memory tiering in scripts: module scores and tiers from an optimizer's
//! Adam state (`crate::tiering`); `train()` takes `tiering: #{ ... }`.
use rhai::{Dynamic, Engine, Map, FLOAT};

use super::api::{Api, DocEntry};
use super::optim::ROpt;
use super::value::*;
use crate::tiering::{delay_s, module_scores, Assignment, TieringConfig};
use crate::tokenizer::TIERS;

/// The tiers of `opt`'s model for `#{ hbm, cpu }`, with scores and counts.
fn module_tiers(o: &ROpt, opts: &Map) -> RResult<Map> {
    check_keys(opts, &["hbm", "cpu"], "module_tiers")?;
    let d = TieringConfig::default();
    let get = |k: &str, dv: f64| opts.get(k).map(|v| as_number(v, k)).unwrap_or(Ok(dv));
    let cfg = TieringConfig { hbm: get("hbm", d.hbm)?, cpu: get("cpu", d.cpu)?, ..d };
    cfg.validate().rt()?;
    let model = o.model.borrow()?;
    let opt = o.opt.try_borrow().map_err(|_| rerr("the optimizer is busy"))?;
    let a = Assignment::new(module_scores(model.store(), &opt).rt()?, cfg.hbm, cfg.cpu, opt.step).rt()?;
    let mut tiers = Map::new();
    let mut scores = Map::new();
    for ((m, t), s) in a.modules.iter().zip(&a.tiers).zip(&a.scores) {
        tiers.insert(m.as_str().into(), Dynamic::from(t.to_string()));
        scores.insert(m.as_str().into(), Dynamic::from_float(*s as FLOAT));
    }
    let counts: Map =
        TIERS.iter().zip(a.counts).map(|(t, c)| ((*t).into(), Dynamic::from_int(c as i64))).collect();
    let mut out = Map::new();
    out.insert("tiers".into(), Dynamic::from_map(tiers));
    out.insert("scores".into(), Dynamic::from_map(scores));
    out.insert("counts".into(), Dynamic::from_map(counts));
    out.insert("hbm".into(), Dynamic::from_float(cfg.hbm));
    out.insert("cpu".into(), Dynamic::from_float(cfg.cpu));
    Ok(out)
}

pub fn register(engine: &mut Engine, docs: &mut Vec<DocEntry>) {
    let mut api = Api::new(engine, docs);
    api.group("Memory tiering");
    api.f("module_tiers", "opt, options: map", "The modules of `opt`'s model (parameter-name prefixes) scored by Adam's state, mean over their parameters of mean|m| + mean sqrt(v), and assigned to tiers by the cumulative rule for `#{ hbm: 0.3, cpu: 0.5 }` (rank < floor(n*hbm): \"hbm\", < floor(n*cpu): \"cpu\", else \"ssd\"): `#{ tiers: #{module: tier}, scores: #{module: score}, counts: #{hbm, cpu, ssd}, hbm, cpu }` (docs/tiering.md).", |o: ROpt, opts: Map| -> RResult<Map> {
        module_tiers(&o, &opts)
    });
    api.f("tier_delay", "tier: string, bytes", "The emulated delay in seconds after a module's forward that produced `bytes` of output in tier \"hbm\" (0), \"cpu\" (5 us + bytes / 150 GB/s) or \"ssd\" (30 us + bytes / 10 GB/s).", |tier: &str, bytes: FLOAT| -> RResult<FLOAT> {
        let t = TIERS.iter().position(|x| *x == tier).ok_or_else(|| rerr(format!("tier must be hbm, cpu or ssd, got '{tier}'")))?;
        if !(bytes.is_finite() && bytes >= 0.0) {
            return Err(rerr(format!("bytes must be >= 0, got {bytes}")));
        }
        Ok(delay_s(t, bytes))
    });
}
