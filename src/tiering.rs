//! Hierarchical memory tiering (docs/tiering.md): modules ranked by their
//! Adam state and assigned to HBM, CPU or SSD, then either emulated (a
//! delay after each slow-tier module's forward) or staged for real (the
//! module's parameters brought from a host copy onto the compute device
//! before its forward and dropped after it).
//!
//! A module is a parameter-name prefix: `transformer.h.{i}.{ln_1,attn,ln_2,mlp}`
//! inside GPT-2's blocks, the name without its last part elsewhere
//! (`transformer.wte`, `fc1`, `layer1.0`). Scores and tiers work for every
//! model; the per-forward modes need hook points to time the modules by
//! (GPT-2's, `crate::hooks`). Nothing here knows Rhai (`script/tiering.rs`).
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tch::{Device, Kind, TchError, Tensor};

use crate::hooks::Hooks;
use crate::models::Model;
use crate::optim::Optimizer;
use crate::params::ParamStore;
use crate::tokenizer::{tier_counts, tiers_by_score, TIERS};

/// Tiering as a training option (`TrainConfig::tiering`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TieringConfig {
    /// `emulated` (delays) or `real` (parameters staged around forwards).
    pub mode: String,
    /// Fraction of modules in HBM (the highest scores).
    pub hbm: f64,
    /// Cumulative fraction in HBM or CPU (the seed's code; the rest is SSD).
    pub cpu: f64,
    /// Step after which tiers are assigned (0: the end of the warm-up, else
    /// the first evaluation, else step 1): Adam's moments are empty before.
    pub assign_step: i64,
    /// Re-assign every N steps after the first assignment (0: never).
    pub reassign_every: i64,
    /// File in the run folder with `{module: tier}` ("": none); the
    /// scores, thresholds and counts go to `tiering.json` beside it.
    pub json: String,
}

impl Default for TieringConfig {
    fn default() -> Self {
        TieringConfig {
            mode: "emulated".into(),
            hbm: crate::tokenizer::DEFAULT_HBM,
            cpu: crate::tokenizer::DEFAULT_CPU,
            assign_step: 0,
            reassign_every: 0,
            json: "tier_hints.json".into(),
        }
    }
}

/// Files of a run folder the hints must not overwrite.
pub const RESERVED: [&str; 9] = [
    "metrics.jsonl",
    "config.json",
    "summary.json",
    "status.json",
    "tiering.json",
    "tiering_history.jsonl",
    "train.log",
    "system.json",
    "inference.json",
];

/// Is step `step` (just taken) one where tiers are (re)assigned? `last`:
/// the step of the last assignment. The first comes at the first step at
/// or after `assign_at` that was taken (fp16 may skip the step itself);
/// then every `every` steps (0: never).
pub fn due_rule(last: Option<i64>, step: i64, assign_at: i64, every: i64) -> bool {
    match last {
        None => step >= assign_at,
        Some(l) => every > 0 && step - l >= every,
    }
}

/// The modes and what they do after assignment.
pub const MODES: [&str; 2] = ["emulated", "real"];

impl TieringConfig {
    /// Errors name the option as a script and as Kconfig spell it.
    pub fn validate(&self) -> Result<()> {
        if !MODES.contains(&self.mode.as_str()) {
            bail!("tiering: mode (TIERING_MODE) must be emulated or real, got '{}'", self.mode);
        }
        let frac = |key: &str, sym: &str, x: f64| -> Result<()> {
            if !(x.is_finite() && (0.0..=1.0).contains(&x)) {
                bail!("tiering: {key} ({sym}) must be a fraction in [0, 1], got {x}");
            }
            Ok(())
        };
        frac("hbm", "TIERING_HBM_THRESHOLD", self.hbm)?;
        frac("cpu", "TIERING_CPU_THRESHOLD", self.cpu)?;
        if self.cpu < self.hbm {
            bail!(
                "tiering: cpu (TIERING_CPU_THRESHOLD, {}) is below hbm (TIERING_HBM_THRESHOLD, {}); cpu is \
                 cumulative (the fraction in HBM or CPU), so it must be >= hbm",
                self.cpu,
                self.hbm
            );
        }
        if self.assign_step < 0 || self.reassign_every < 0 {
            bail!("tiering: assign_step and reassign_every (TIERING_ASSIGN_STEP, TIERING_REASSIGN_EVERY) must be >= 0");
        }
        if self.json.contains(['/', '\\']) || self.json == "." || self.json == ".." {
            bail!(
                "tiering: json (TIERING_JSON_OUTPUT) is a file name in the run folder, got '{}'",
                self.json
            );
        }
        if RESERVED.contains(&self.json.as_str()) {
            bail!(
                "tiering: json (TIERING_JSON_OUTPUT) '{}' would overwrite the run's own file; choose another \
                 name (reserved: {})",
                self.json,
                RESERVED.join(", ")
            );
        }
        Ok(())
    }

    /// The step after which tiers are first assigned.
    pub fn assign_at(&self, warmup: i64, eval_every: i64) -> i64 {
        [self.assign_step, warmup, eval_every].into_iter().find(|&s| s > 0).unwrap_or(1)
    }
}

/// What reaching a module's data costs in each tier: set-up seconds and
/// bytes per second (the seed's `lib/tiering.py`). HBM is where compute
/// runs, so it costs nothing.
pub const COSTS: [(f64, f64); 3] = [(1e-6, 800e9), (5e-6, 150e9), (30e-6, 10e9)];

/// The emulated delay for `bytes` of output from a module in `tier`.
pub fn delay_s(tier: usize, bytes: f64) -> f64 {
    match tier {
        0 => 0.0,
        t => COSTS[t.min(2)].0 + bytes / COSTS[t.min(2)].1,
    }
}

/// The module a parameter belongs to (see the module docs).
pub fn module_of(param: &str) -> String {
    let parts: Vec<&str> = param.split('.').collect();
    match parts.as_slice() {
        ["transformer", "h", i, child, _, ..] => format!("transformer.h.{i}.{child}"),
        [.., _] if parts.len() > 1 => parts[..parts.len() - 1].join("."),
        _ => param.to_string(),
    }
}

/// Modules in model order and their parameter indices in the store.
pub fn modules(store: &ParamStore) -> Vec<(String, Vec<usize>)> {
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    for (i, p) in store.params().iter().enumerate() {
        let m = module_of(&p.name);
        match out.iter_mut().find(|(n, _)| *n == m) {
            Some((_, v)) => v.push(i),
            None => out.push((m, vec![i])),
        }
    }
    out
}

fn te(e: TchError) -> anyhow::Error {
    anyhow!(crate::tensor::torch_error(&e))
}

fn mean_f64(t: &Tensor) -> Result<f64> {
    t.f_mean(Kind::Double).and_then(|m| m.f_double_value(&[])).map_err(te)
}

/// Each module's score: the mean over its parameters of
/// `mean(|m|) + mean(sqrt(v))` (Adam's first and second moments).
pub fn module_scores(store: &ParamStore, opt: &Optimizer) -> Result<Vec<(String, f64)>> {
    let mut out = Vec::new();
    for (name, idx) in modules(store) {
        let mut sum = 0.0;
        for &i in &idx {
            let pname = &store.params()[i].name;
            let st = opt.state(store, pname)?;
            let (Some(m), Some(v)) = (st.exp_avg, st.exp_avg_sq) else {
                bail!(
                    "tiering scores modules by Adam's moments; the optimizer ({}) has none",
                    opt.cfg.kind.name()
                );
            };
            let _g = tch::no_grad_guard();
            sum += mean_f64(&m.f_abs().map_err(te)?)? + mean_f64(&v.f_sqrt().map_err(te)?)?;
        }
        out.push((name, sum / idx.len().max(1) as f64));
    }
    Ok(out)
}

/// Refuse, before any step, an optimizer without Adam's moments.
pub fn check_optimizer(store: &ParamStore, opt: &Optimizer) -> Result<()> {
    if let Some(p) = store.params().first() {
        if opt.state(store, &p.name)?.exp_avg.is_none() {
            bail!(
                "tiering (ENABLE_HIERARCHICAL_TIERING) scores modules by Adam's moments; the optimizer ({}) has none",
                opt.cfg.kind.name()
            );
        }
    }
    Ok(())
}

/// One assignment of modules to tiers, and why.
#[derive(Clone, Debug, Serialize)]
pub struct Assignment {
    pub step: i64,
    pub hbm: f64,
    pub cpu: f64,
    /// Modules in model order, with their scores and tiers.
    pub modules: Vec<String>,
    pub scores: Vec<f64>,
    pub tiers: Vec<&'static str>,
    /// Modules per tier: HBM, CPU, SSD.
    pub counts: [usize; 3],
}

impl Assignment {
    /// Rank modules by score and split them with the cumulative rule
    /// (`crate::tokenizer::tier_counts`).
    pub fn new(scores: Vec<(String, f64)>, hbm: f64, cpu: f64, step: i64) -> Result<Assignment> {
        let (modules, scores): (Vec<String>, Vec<f64>) = scores.into_iter().unzip();
        let tiers = tiers_by_score(&scores, hbm, cpu).map_err(|e| anyhow!("tiering: {e}"))?;
        let counts = tier_counts(scores.len(), hbm, cpu).map_err(|e| anyhow!("tiering: {e}"))?;
        Ok(Assignment { step, hbm, cpu, modules, scores, tiers, counts })
    }

    /// The seed's `tier_hints.json`: `{module: tier}`.
    pub fn hints(&self) -> Value {
        let m: Map<String, Value> =
            self.modules.iter().zip(&self.tiers).map(|(n, t)| (n.clone(), json!(t))).collect();
        Value::Object(m)
    }

    /// Everything behind the hints, for `tiering.json`.
    pub fn details(&self) -> Value {
        let mut order: Vec<usize> = (0..self.modules.len()).collect();
        order.sort_by(|&a, &b| self.scores[b].total_cmp(&self.scores[a]).then(a.cmp(&b)));
        let ranked: Vec<Value> = order
            .iter()
            .enumerate()
            .map(|(rank, &i)| json!({"rank": rank, "module": self.modules[i], "score": self.scores[i], "tier": self.tiers[i]}))
            .collect();
        json!({
            "step": self.step,
            "rule": "score = mean over the module's parameters of mean|m| + mean sqrt(v); modules ranked by score \
                     (descending); rank < floor(n*hbm): hbm, rank < floor(n*cpu): cpu (cumulative), else ssd",
            "hbm_threshold": self.hbm,
            "cpu_threshold": self.cpu,
            "counts": {"hbm": self.counts[0], "cpu": self.counts[1], "ssd": self.counts[2]},
            "modules": ranked,
        })
    }
}

/// What happens at a hook point, in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Action {
    /// Real mode: give the module back its device parameters.
    Unstage,
    /// Emulated mode: sleep for the module's output.
    Charge,
    /// Real mode: put the module's parameters in from the host copy.
    Stage,
}

/// Where a module's forward starts and ends in GPT-2's hook points.
struct Points {
    /// Staged here (real mode); None: no point precedes it, it stays.
    stage: Option<String>,
    /// Unstaged here; None: at the end of the forward.
    unstage: Option<String>,
    /// Its delay is charged here, for `bytes` of the point's activation.
    charge: String,
    bytes: Bytes,
}

/// What a module's charge counts.
#[derive(Clone, Copy, Debug)]
enum Bytes {
    /// The activation's bytes times this (a head widens the residual).
    Output(f64),
    /// One batch row of the activation: `wpe`'s [T, C] rows, which the
    /// hook sees expanded over the batch.
    Row,
    /// The module's own parameters (a gate read by every block).
    Params,
}

/// Inside a block: (child, point before it, point after it).
const BLOCK_POINTS: [(&str, &str, &str); 4] = [
    ("ln_1", "hook_resid_pre", "hook_attn_out"),
    ("attn", "hook_resid_pre", "hook_attn_out"),
    ("ln_2", "hook_resid_mid", "hook_mlp_out"),
    ("mlp", "hook_resid_mid", "hook_mlp_out"),
];

/// Before the blocks: embeddings, timed by the point after their lookup.
const HEAD_POINTS: [(&str, &str, Bytes); 3] = [
    ("transformer.wte", "hook_embed", Bytes::Output(1.0)),
    ("transformer.wpe", "hook_pos_embed", Bytes::Row),
    ("transformer.emb_proj", "hook_pos_embed", Bytes::Output(1.0)),
];

/// After the blocks: from the last residual to the end of the forward.
const TAIL_MODULES: [&str; 3] = ["transformer.ln_f", "transformer.out_proj", "lm_head"];

/// `transformer.alternation_logits` (learned RA's direction), read by
/// every block: staged before the first, charged for its own bytes.
const GATE_MODULE: &str = "transformer";

fn points(module: &str, weight: Option<&[i64]>, last_block: usize) -> Result<Points> {
    let parts: Vec<&str> = module.split('.').collect();
    if let ["transformer", "h", i, child] = parts.as_slice() {
        if let Some((_, pre, post)) = BLOCK_POINTS.iter().find(|(c, ..)| c == child) {
            let (pre, post) = (format!("blocks.{i}.{pre}"), format!("blocks.{i}.{post}"));
            return Ok(Points {
                stage: Some(pre),
                unstage: Some(post.clone()),
                charge: post,
                bytes: Bytes::Output(1.0),
            });
        }
    }
    if let Some((_, at, bytes)) = HEAD_POINTS.iter().find(|(m, ..)| *m == module) {
        return Ok(Points { stage: None, unstage: None, charge: at.to_string(), bytes: *bytes });
    }
    if module == GATE_MODULE {
        let at = "hook_embed".to_string();
        return Ok(Points { stage: Some(at.clone()), unstage: None, charge: at, bytes: Bytes::Params });
    }
    if TAIL_MODULES.contains(&module) {
        // A [out, in] weight widens the residual's bytes to its output's.
        let scale = match weight {
            Some([o, i]) if *i > 0 => *o as f64 / *i as f64,
            _ => 1.0,
        };
        let at = format!("blocks.{last_block}.hook_resid_post");
        return Ok(Points {
            stage: Some(at.clone()),
            unstage: None,
            charge: at,
            bytes: Bytes::Output(scale),
        });
    }
    bail!(
        "tiering: module {module} is not one tiering knows where to time (GPT-2's embeddings, blocks' \
         ln_1/attn/ln_2/mlp, {GATE_MODULE}.alternation_logits, {})",
        TAIL_MODULES.join(", ")
    )
}

struct Unit {
    name: String,
    params: Vec<Tensor>,
    points: Points,
}

/// Running totals: since the last `take_window` and over the run.
#[derive(Default, Clone, Copy)]
struct Totals {
    requested_s: f64,
    slept_s: f64,
    staged: u64,
    moved_bytes: f64,
    /// Real mode: bytes copied back to the host copies after updates.
    refreshed_bytes: f64,
}

impl Totals {
    fn add(&mut self, o: &Totals) {
        self.requested_s += o.requested_s;
        self.slept_s += o.slept_s;
        self.staged += o.staged;
        self.moved_bytes += o.moved_bytes;
        self.refreshed_bytes += o.refreshed_bytes;
    }
}

#[derive(Default)]
struct State {
    assignment: Option<Assignment>,
    /// Tier index per unit.
    tier: Vec<usize>,
    /// Hook point -> (action, unit), sorted by action.
    actions: HashMap<String, Vec<(Action, usize)>>,
    /// Real mode: host copies of the offloaded units' parameters.
    host: HashMap<usize, Vec<Tensor>>,
    /// Units staged now, with their parameters' device data.
    staged: Vec<(usize, Vec<Tensor>)>,
    window: Totals,
    total: Totals,
    history: Vec<Value>,
    /// Every action taken, when tracing (tests).
    trace: Option<Vec<String>>,
}

/// Tiering of one model during training: the step-side work (assignment)
/// and the forward-side work (its [`Hooks`]).
pub struct Tiering {
    pub cfg: TieringConfig,
    device: Device,
    units: Vec<Unit>,
    state: RefCell<State>,
}

impl Tiering {
    /// Modules of `model` and their hook points; refused for a model
    /// without GPT-2's block hook points.
    pub fn new(cfg: &TieringConfig, model: &dyn Model) -> Result<Tiering> {
        cfg.validate()?;
        let names = model.hook_names();
        let last_block = names
            .iter()
            .filter_map(|n| {
                n.strip_prefix("blocks.")?.strip_suffix(".hook_resid_post")?.parse::<usize>().ok()
            })
            .max()
            .ok_or_else(|| {
                anyhow!(
                    "tiering: {} has no block hook points to time its modules by (GPT-2 has); \
                     scores and tiers alone: module_tiers() in scripts",
                    model.arch()
                )
            })?;
        let store = model.store();
        let units = modules(store)
            .into_iter()
            .map(|(name, idx)| {
                let params: Vec<Tensor> =
                    idx.iter().map(|&i| store.params()[i].tensor.shallow_clone()).collect();
                let weight = params.iter().map(|t| t.size()).find(|s| s.len() == 2);
                let points = points(&name, weight.as_deref(), last_block)?;
                Ok(Unit { name, params, points })
            })
            .collect::<Result<Vec<_>>>()?;
        for u in &units {
            for p in [Some(&u.points.charge), u.points.stage.as_ref(), u.points.unstage.as_ref()]
                .into_iter()
                .flatten()
            {
                if !names.contains(p) {
                    bail!(
                        "tiering: module {} would be timed at hook point {p}, which {} lacks",
                        u.name,
                        model.arch()
                    );
                }
            }
        }
        Ok(Tiering { cfg: cfg.clone(), device: store.device(), units, state: RefCell::new(State::default()) })
    }

    /// Record every action (stage, unstage, charge) for inspection.
    pub fn trace(&self, on: bool) {
        self.state.borrow_mut().trace = on.then(Vec::new);
    }

    pub fn take_trace(&self) -> Vec<String> {
        self.state.borrow_mut().trace.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Tiers are assigned: forwards are hooked.
    pub fn active(&self) -> bool {
        self.state.borrow().assignment.is_some()
    }

    pub fn assignment(&self) -> Option<Assignment> {
        self.state.borrow().assignment.clone()
    }

    /// Is step `step` (just taken) one where tiers are (re)assigned
    /// ([`due_rule`])?
    pub fn due(&self, step: i64, assign_at: i64) -> bool {
        let last = self.state.borrow().assignment.as_ref().map(|a| a.step);
        due_rule(last, step, assign_at, self.cfg.reassign_every)
    }

    /// Score the modules from `opt`'s moments and assign tiers; writes the
    /// hints and details into `run_dir` when given.
    pub fn assign(
        &self,
        store: &ParamStore,
        opt: &Optimizer,
        step: i64,
        run_dir: Option<&Path>,
    ) -> Result<&'static str> {
        self.end_forward()?;
        let a = Assignment::new(module_scores(store, opt)?, self.cfg.hbm, self.cfg.cpu, step)?;
        let mut entry = a.details();
        entry.as_object_mut().map(|o| o.remove("modules"));
        if let Some(dir) = run_dir.filter(|_| !self.cfg.json.is_empty()) {
            let mut details = a.details();
            if let Some(o) = details.as_object_mut() {
                o.insert("mode".into(), json!(self.cfg.mode));
                o.insert("json".into(), json!(self.cfg.json));
                o.insert("history".into(), json!("tiering_history.jsonl"));
            }
            write_json(&dir.join(&self.cfg.json), &a.hints())?;
            write_json(&dir.join("tiering.json"), &details)?;
            crate::runs::append_jsonl(&dir.join("tiering_history.jsonl"), &entry)?;
        }
        self.state.borrow_mut().history.push(entry);
        self.install(a)?;
        Ok("assigned")
    }

    /// The assignment and its history, for a checkpoint (Null: none yet).
    pub fn state(&self) -> Value {
        let st = self.state.borrow();
        match &st.assignment {
            None => Value::Null,
            Some(a) => json!({"assignment": a, "history": st.history}),
        }
    }

    /// Put back what [`Tiering::state`] saved: the same tiers, not a new
    /// scoring of the restored moments. Null: nothing assigned yet.
    pub fn restore(&self, v: &Value) -> Result<()> {
        if v.is_null() {
            return Ok(());
        }
        let a = &v["assignment"];
        let modules: Vec<String> = serde_json::from_value(a["modules"].clone())?;
        let scores: Vec<f64> = serde_json::from_value(a["scores"].clone())?;
        let tiers: Vec<String> = serde_json::from_value(a["tiers"].clone())?;
        let counts: [usize; 3] = serde_json::from_value(a["counts"].clone())?;
        let names: Vec<&String> = self.units.iter().map(|u| &u.name).collect();
        if modules.iter().collect::<Vec<_>>() != names || scores.len() != modules.len() {
            bail!("tiering: the checkpoint's modules are not this model's");
        }
        let tiers = tiers
            .iter()
            .map(|t| TIERS.iter().find(|x| **x == t.as_str()).copied())
            .collect::<Option<Vec<&'static str>>>()
            .ok_or_else(|| anyhow!("tiering: the checkpoint's tiers are not hbm, cpu or ssd"))?;
        let num = |k: &str| a[k].as_f64().ok_or_else(|| anyhow!("tiering: the checkpoint lacks {k}"));
        let step = a["step"].as_i64().ok_or_else(|| anyhow!("tiering: the checkpoint lacks step"))?;
        let a = Assignment { step, hbm: num("hbm")?, cpu: num("cpu")?, modules, scores, tiers, counts };
        self.state.borrow_mut().history = v["history"].as_array().cloned().unwrap_or_default();
        self.install(a)
    }

    /// Hook the forwards for `a`'s tiers; real mode copies the offloaded
    /// parameters to the host.
    fn install(&self, a: Assignment) -> Result<()> {
        self.end_forward()?;
        let mut st = self.state.borrow_mut();
        st.tier = a.tiers.iter().map(|t| TIERS.iter().position(|x| x == t).unwrap_or(2)).collect();
        st.actions.clear();
        let offloaded: Vec<usize> = (0..self.units.len()).filter(|&u| st.tier[u] > 0).collect();
        for u in offloaded {
            let unit = &self.units[u];
            let p = &unit.points;
            let acts: Vec<(Action, Option<&String>)> = match self.cfg.mode.as_str() {
                "real" => vec![(Action::Stage, p.stage.as_ref()), (Action::Unstage, p.unstage.as_ref())],
                _ => vec![(Action::Charge, Some(&p.charge))],
            };
            for (act, at) in acts {
                if let (Some(at), true) = (at, act != Action::Unstage || p.stage.is_some()) {
                    st.actions.entry(at.clone()).or_default().push((act, u));
                }
            }
        }
        for v in st.actions.values_mut() {
            v.sort();
        }
        st.assignment = Some(a);
        drop(st);
        self.refresh_host()
    }

    /// Real mode: the host copies of offloaded parameters follow the
    /// optimizer (the move back to host memory after each update).
    pub fn refresh_host(&self) -> Result<()> {
        if self.cfg.mode != "real" {
            return Ok(());
        }
        let mut st = self.state.borrow_mut();
        let offloaded: Vec<usize> =
            (0..self.units.len()).filter(|&u| st.tier.get(u).is_some_and(|&t| t > 0)).collect();
        let _g = tch::no_grad_guard();
        st.host.retain(|u, _| offloaded.contains(u));
        for u in offloaded {
            let mut copies = Vec::new();
            for (k, p) in self.units[u].params.iter().enumerate() {
                let h = match st.host.get(&u).and_then(|v| v.get(k)) {
                    Some(h) => h.shallow_clone(),
                    None => {
                        let h = Tensor::f_empty(p.size(), (p.kind(), Device::Cpu)).map_err(te)?;
                        if self.device.is_cuda() {
                            h.f_pin_memory(self.device).map_err(te)?
                        } else {
                            h
                        }
                    }
                };
                let mut hm = h.shallow_clone();
                hm.f_copy_(p).map_err(te)?;
                st.window.refreshed_bytes += (p.numel() * p.kind().elt_size_in_bytes()) as f64;
                copies.push(h);
            }
            st.host.insert(u, copies);
        }
        Ok(())
    }

    fn stage(&self, st: &mut State, u: usize) -> Result<(), TchError> {
        if st.staged.iter().any(|(s, _)| *s == u) {
            return Ok(());
        }
        let Some(host) = st.host.get(&u).map(|v| v.iter().map(|h| h.shallow_clone()).collect::<Vec<_>>())
        else {
            return Ok(());
        };
        let params = &self.units[u].params;
        let saved = params.iter().map(|p| p.f_detach()).collect::<Result<Vec<_>, _>>()?;
        // Recorded before any parameter changes: a failed copy (out of
        // memory) gives every parameter staged so far its data back.
        st.staged.push((u, saved));
        let mut bytes = 0.0;
        for (p, h) in params.iter().zip(&host) {
            let r =
                h.f_to_device(self.device).and_then(|d| crate::shim::set_data(p, &d).map_err(TchError::Kind));
            if let Err(e) = r {
                self.unstage(st, u)?;
                return Err(e);
            }
            bytes += (h.numel() * h.kind().elt_size_in_bytes()) as f64;
        }
        st.window.staged += 1;
        st.window.moved_bytes += bytes;
        if let Some(t) = st.trace.as_mut() {
            t.push(format!("stage {}", self.units[u].name));
        }
        Ok(())
    }

    fn unstage(&self, st: &mut State, u: usize) -> Result<(), TchError> {
        let Some(k) = st.staged.iter().position(|(s, _)| *s == u) else { return Ok(()) };
        let (_, saved) = st.staged.remove(k);
        for (p, d) in self.units[u].params.iter().zip(&saved) {
            crate::shim::set_data(p, d).map_err(TchError::Kind)?;
        }
        if let Some(t) = st.trace.as_mut() {
            t.push(format!("unstage {}", self.units[u].name));
        }
        Ok(())
    }

    fn charge(&self, st: &mut State, u: usize, act: &Tensor) {
        let out = (act.numel() * act.kind().elt_size_in_bytes()) as f64;
        let bytes = match self.units[u].points.bytes {
            Bytes::Output(scale) => out * scale,
            Bytes::Row => out / act.size().first().copied().unwrap_or(1).max(1) as f64,
            Bytes::Params => {
                self.units[u].params.iter().map(|p| (p.numel() * p.kind().elt_size_in_bytes()) as f64).sum()
            }
        };
        let d = delay_s(st.tier[u], bytes);
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(d));
        st.window.requested_s += d;
        st.window.slept_s += t0.elapsed().as_secs_f64();
        if let Some(t) = st.trace.as_mut() {
            t.push(format!("charge {} {} {bytes}", self.units[u].name, TIERS[st.tier[u]]));
        }
    }

    /// After a forward: every unit still staged gets its device data back
    /// (the units after the blocks, and any forward that failed midway).
    pub fn end_forward(&self) -> Result<()> {
        let mut st = self.state.borrow_mut();
        let staged: Vec<usize> = st.staged.iter().map(|(u, _)| *u).collect();
        for u in staged {
            self.unstage(&mut st, u).map_err(te)?;
        }
        Ok(())
    }

    /// Per-step means since the last call, for a log record.
    pub fn take_window(&self, steps: i64) -> Map<String, Value> {
        let mut st = self.state.borrow_mut();
        let w = std::mem::take(&mut st.window);
        st.total.add(&w);
        let mut m = Map::new();
        let Some(a) = &st.assignment else { return m };
        let n = steps.max(1) as f64;
        for (t, c) in TIERS.iter().zip(a.counts) {
            m.insert(format!("tier_{t}"), json!(c));
        }
        match self.cfg.mode.as_str() {
            "real" => {
                m.insert("tier_staged".into(), json!(w.staged as f64 / n));
                m.insert("tier_moved_mb".into(), json!(w.moved_bytes / n / 1e6));
                m.insert("tier_refreshed_mb".into(), json!(w.refreshed_bytes / n / 1e6));
            }
            _ => {
                m.insert("tier_delay_ms".into(), json!(w.requested_s / n * 1e3));
                m.insert("tier_slept_ms".into(), json!(w.slept_s / n * 1e3));
            }
        }
        m
    }

    /// The run's totals, for its summary.
    pub fn summary(&self) -> Value {
        let _ = self.take_window(1);
        let st = self.state.borrow();
        let t = st.total;
        json!({
            "mode": self.cfg.mode,
            "hbm_threshold": self.cfg.hbm,
            "cpu_threshold": self.cfg.cpu,
            "assigned_at": st.history.iter().filter_map(|h| h.get("step").cloned()).collect::<Vec<_>>(),
            "counts": st.assignment.as_ref().map(|a| json!({"hbm": a.counts[0], "cpu": a.counts[1], "ssd": a.counts[2]})),
            "delay_requested_s": t.requested_s,
            "delay_slept_s": t.slept_s,
            "staged": t.staged,
            "moved_mb": t.moved_bytes / 1e6,
            "refreshed_mb": t.refreshed_bytes / 1e6,
        })
    }
}

impl Hooks for Tiering {
    fn wants(&self, name: &str) -> bool {
        self.state.borrow().actions.contains_key(name)
    }

    fn call(&self, name: &str, act: &Tensor) -> Result<Option<Tensor>, TchError> {
        let mut st = self.state.borrow_mut();
        let acts = st.actions.get(name).cloned().unwrap_or_default();
        for (a, u) in acts {
            match a {
                Action::Unstage => self.unstage(&mut st, u)?,
                Action::Charge => self.charge(&mut st, u, act),
                Action::Stage => self.stage(&mut st, u)?,
            }
        }
        Ok(None)
    }
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    crate::runs::write_atomic(path, (serde_json::to_string_pretty(v)? + "\n").as_bytes())
}
