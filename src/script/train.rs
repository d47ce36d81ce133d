//! `train()` and `evaluate()` in scripts, and the Run object they return.
use std::path::PathBuf;
use std::rc::Rc;

use rhai::{Array, Dynamic, Engine, FnPtr, Map, NativeCallContext, FLOAT, INT};
use serde_json::{json, Value};

use super::api::{Api, DocEntry};
use super::data::{RLoader, RTokens};
use super::models::RModel;
use super::optim::ROpt;
use super::prune::RPruner;
use super::value::*;
use crate::models::Task;
use crate::prune::PruneHook;
use crate::runs::RunDir;
use crate::train::feed::{ImageFeed, TextFeed};
use crate::train::{Data, Hook, Summary, TrainConfig, Trainer};

/// A finished (or failed) run: its directory and summary.
#[derive(Clone)]
pub struct RRun {
    pub dir: PathBuf,
    pub summary: Rc<Summary>,
}

/// Keys of `train()`'s option map besides TrainConfig's.
const EXTRA_KEYS: &[&str] = &[
    "run_dir",
    "name",
    "pruner",
    "test",
    "batch_size",
    "block_size",
    "eval_batches",
    "record",
    "on_step",
    "on_eval",
    "lr_schedule",
    "loss",
];

/// `train()`'s closures as a step hook: `lr_schedule(step)` sets the
/// learning rate before each step; `on_step(info)` and `on_eval(metrics)`
/// may return a map of numbers to log, `false` (or `#{ stop: true }`) to end
/// the run cleanly. They hold no checkpointed state: a resumed run calls
/// them afresh from its checkpoint's step.
struct Callbacks<'c> {
    ctx: &'c NativeCallContext<'c>,
    on_step: Option<FnPtr>,
    on_eval: Option<FnPtr>,
    lr_schedule: Option<FnPtr>,
    /// Metrics from on_step waiting for the next log record.
    pending: serde_json::Map<String, Value>,
    stop: Option<String>,
}

impl Callbacks<'_> {
    fn call(&self, f: &FnPtr, what: &str, arg: Dynamic) -> anyhow::Result<Dynamic> {
        f.call_within_context::<Dynamic>(self.ctx, (arg,))
            .map_err(|e| anyhow::anyhow!("train(): {what}: {e}"))
    }

    /// Numbers to log, or a request to stop, from a closure's result.
    fn take(&mut self, what: &str, out: Dynamic) -> anyhow::Result<serde_json::Map<String, Value>> {
        let mut logged = serde_json::Map::new();
        if out.is_unit() {
            return Ok(logged);
        }
        if let Ok(b) = out.as_bool() {
            if !b {
                self.stop = Some(format!("{what} returned false"));
            }
            return Ok(logged);
        }
        let Some(m) = out.read_lock::<Map>() else {
            anyhow::bail!(
                "train(): {what} must return (), a bool or a map of numbers, got {}",
                out.type_name()
            );
        };
        for (k, v) in m.iter() {
            if k.as_str() == "stop" {
                if v.as_bool().unwrap_or(false) {
                    self.stop = Some(format!("{what} asked to stop"));
                }
                continue;
            }
            let x = if let Ok(i) = v.as_int() {
                i as f64
            } else if let Ok(f) = v.as_float() {
                f
            } else if let Some(t) = v.read_lock::<RTensor>() {
                t.0.f_double_value(&[]).map_err(|e| anyhow::anyhow!("train(): {what}: {k}: {e}"))?
            } else {
                anyhow::bail!("train(): {what}: metric '{k}' must be a number, got {}", v.type_name());
            };
            logged.insert(k.to_string(), json!(x));
        }
        Ok(logged)
    }
}

impl Hook for Callbacks<'_> {
    fn name(&self) -> &str {
        "callbacks"
    }
    fn before_step(&mut self, ctx: &mut crate::train::StepCtx) -> anyhow::Result<()> {
        if let Some(f) = self.lr_schedule.clone() {
            let out = self.call(&f, "lr_schedule", Dynamic::from_int(ctx.step))?;
            let lr = out.as_float().or_else(|_| out.as_int().map(|i| i as f64)).map_err(|_| {
                anyhow::anyhow!("train(): lr_schedule must return a number, got {}", out.type_name())
            })?;
            anyhow::ensure!(lr.is_finite() && lr >= 0.0, "train(): lr_schedule({}) returned {lr}", ctx.step);
            ctx.opt.lr = lr;
        }
        Ok(())
    }
    fn after_step(&mut self, ctx: &mut crate::train::StepCtx) -> anyhow::Result<()> {
        let Some(f) = self.on_step.clone() else { return Ok(()) };
        let mut info = Map::new();
        info.insert("step".into(), Dynamic::from_int(ctx.step));
        info.insert("total_steps".into(), Dynamic::from_int(ctx.total_steps));
        info.insert("lr".into(), Dynamic::from_float(ctx.opt.lr));
        let loss = ctx.loss.map(|l| Dynamic::from(RTensor(l.shallow_clone()))).unwrap_or(Dynamic::UNIT);
        info.insert("loss".into(), loss);
        let out = self.call(&f, "on_step", Dynamic::from_map(info))?;
        let logged = self.take("on_step", out)?;
        self.pending.extend(logged);
        Ok(())
    }
    fn metrics(&mut self) -> anyhow::Result<serde_json::Map<String, Value>> {
        Ok(std::mem::take(&mut self.pending))
    }
    fn on_eval(
        &mut self,
        step: i64,
        record: &serde_json::Map<String, Value>,
    ) -> anyhow::Result<serde_json::Map<String, Value>> {
        let Some(f) = self.on_eval.clone() else { return Ok(serde_json::Map::new()) };
        let mut rec = record.clone();
        rec.insert("step".into(), json!(step));
        let arg = to_dyn(&Value::Object(rec)).map_err(|e| anyhow::anyhow!("{e}"))?;
        let out = self.call(&f, "on_eval", arg)?;
        self.take("on_eval", out)
    }
    fn stop(&mut self) -> Option<String> {
        self.stop.take()
    }
    fn state(&self) -> Value {
        Value::Null
    }
    fn tensors(&self) -> Vec<(String, tch::Tensor)> {
        Vec::new()
    }
    fn restore(&mut self, _state: &Value, _tensors: &[(String, tch::Tensor)]) -> anyhow::Result<()> {
        Ok(())
    }
}

fn closure_opt(opts: &Map, k: &str) -> RResult<Option<FnPtr>> {
    match opts.get(k) {
        None => Ok(None),
        Some(v) if v.is_unit() => Ok(None),
        Some(v) => v
            .read_lock::<FnPtr>()
            .map(|f| Some(f.clone()))
            .ok_or_else(|| rerr(format!("train(): {k} must be a closure, got {}", v.type_name()))),
    }
}

fn to_json(d: &Dynamic) -> RResult<Value> {
    rhai::serde::from_dynamic(d).map_err(|e| rerr(e.to_string()))
}

fn to_dyn(v: &Value) -> RResult<Dynamic> {
    rhai::serde::to_dynamic(v).map_err(|e| rerr(e.to_string()))
}

/// TrainConfig from the option map's known keys, validated.
fn train_config(opts: &Map) -> RResult<TrainConfig> {
    let base = serde_json::to_value(TrainConfig::default()).map_err(|e| rerr(e.to_string()))?;
    let fields: Vec<String> = base.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
    let mut obj = base.as_object().cloned().unwrap_or_default();
    for (k, v) in opts {
        if fields.iter().any(|f| f == k.as_str()) {
            obj.insert(k.to_string(), to_json(v)?);
        } else if !EXTRA_KEYS.contains(&k.as_str()) {
            let mut valid: Vec<String> =
                fields.iter().cloned().chain(EXTRA_KEYS.iter().map(|s| s.to_string())).collect();
            valid.sort();
            return Err(rerr(format!("unknown train option '{k}' (valid keys: {})", valid.join(", "))));
        }
    }
    let cfg: TrainConfig =
        serde_json::from_value(Value::Object(obj)).map_err(|e| rerr(format!("train options: {e}")))?;
    cfg.validate().rt()?;
    Ok(cfg)
}

fn int_opt(opts: &Map, k: &str, default: i64) -> RResult<i64> {
    match opts.get(k) {
        Some(v) => v.as_int().map_err(|_| rerr(format!("{k} must be an int"))),
        None => Ok(default),
    }
}

/// The training data as the loop wants it.
fn feed(model: &RModel, data: &Dynamic, opts: &Map) -> RResult<Box<dyn Data>> {
    if let Some(l) = data.read_lock::<RLoader>() {
        let eval = match opts.get("test") {
            Some(e) => Some(
                e.read_lock::<RLoader>().map(|x| x.0.clone()).ok_or_else(|| rerr("test must be a Loader"))?,
            ),
            None => None,
        };
        return Ok(Box::new(ImageFeed { train: l.0.clone(), eval }));
    }
    if let Some(t) = data.read_lock::<RTokens>() {
        let block = match model.borrow()?.task() {
            Task::LanguageModel { block_size, .. } => block_size,
            Task::Classify { .. } => return Err(rerr("token data needs a language model (gpt2)")),
        };
        let b = int_opt(opts, "batch_size", 8)?;
        let t_len = int_opt(opts, "block_size", block)?;
        if t_len > block {
            return Err(rerr(format!("block_size {t_len} exceeds the model's block_size {block}")));
        }
        let ev = int_opt(opts, "eval_batches", 20)?;
        if b < 1 || t_len < 1 || ev < 0 {
            return Err(rerr("batch_size and block_size must be >= 1, eval_batches >= 0"));
        }
        return Ok(Box::new(TextFeed::new(t.0.clone(), b as usize, t_len as usize, ev as usize).rt()?));
    }
    Err(rerr(format!("train(): data must be a Loader or a TokenDataset, got {}", data.type_name())))
}

fn default_run_dir(arch: &str) -> PathBuf {
    let stamp =
        crate::runs::now_iso().replace([':', '-'], "").replace('T', "-").trim_end_matches('Z').to_string();
    PathBuf::from("runs").join(format!("{arch}-{stamp}"))
}

fn run_train(ctx: &NativeCallContext, model: RModel, opt: ROpt, data: Dynamic, opts: Map) -> RResult<RRun> {
    let mut cfg = train_config(&opts)?;
    // Inside matrix(): the cell's folder, resumed if a run was cut short.
    let cell = super::matrix::CELL.with(|c| c.borrow().clone());
    if cell.is_some() && !opts.contains_key("resume") {
        cfg.resume = true;
    }
    if !Rc::ptr_eq(&opt.model.0, &model.0) {
        return Err(rerr("train(): the optimizer was built for a different model"));
    }
    let pruner: Option<RPruner> = match opts.get("pruner") {
        Some(p) if !p.is_unit() => {
            Some(p.read_lock::<RPruner>().map(|p| p.clone()).ok_or_else(|| rerr("pruner must be a Pruner"))?)
        }
        _ => None,
    };
    if let Some(p) = &pruner {
        if !Rc::ptr_eq(&p.model.0, &model.0) {
            return Err(rerr("train(): the pruner was built for a different model"));
        }
        if let Some(po) = &p.opt {
            if !Rc::ptr_eq(&po.opt, &opt.opt) {
                return Err(rerr("train(): the state pruner scores another optimizer's moments"));
            }
        }
    }
    let mut data = feed(&model, &data, &opts)?;
    if cell.is_some() {
        // A cell computes the same whether it runs in this process after
        // other cells or alone in a child process: its data starts afresh.
        data.rewind();
    }
    let arch = model.borrow()?.arch().to_string();
    let dir = match opts.get("run_dir") {
        Some(d) => PathBuf::from(expect_str(d, "run_dir")?),
        None => match opts.get("name") {
            Some(n) => PathBuf::from("runs").join(expect_str(n, "name")?),
            None => match &cell {
                Some((d, _)) => d.clone(),
                None => default_run_dir(&arch),
            },
        },
    };
    let run = RunDir::open(&dir).rt()?;
    let tracker = match opts.get("tracker") {
        Some(t) => Some(expect_str(t, "tracker")?),
        None => None,
    };
    let mut m = model.borrow_mut()?;
    let mut o = opt.borrow_mut()?;
    let record = json!({
        "arch": arch,
        "model": m.config(),
        "optimizer": o.cfg,
        "train": cfg,
        "data": data.describe(),
        "pruning": pruner.as_ref().and_then(|p| p.pruner.try_borrow().ok().map(|x| json!(x.cfg))),
        "extra": match opts.get("record") { Some(r) => to_json(r)?, None => Value::Null },
        "cell": match &cell { Some((_, c)) => to_json(&Dynamic::from_map(c.clone()))?, None => Value::Null },
    });
    // A script scorer is called once per prunable tensor per mask update.
    let score_fn = pruner.as_ref().and_then(|p| p.score.clone());
    let mut custom = score_fn.map(|f| {
        move |_name: &str,
              w: &tch::Tensor,
              mm: Option<&tch::Tensor>,
              vv: Option<&tch::Tensor>|
              -> anyhow::Result<tch::Tensor> {
            let arg = |t: Option<&tch::Tensor>| {
                t.map(|t| Dynamic::from(RTensor(t.shallow_clone()))).unwrap_or(Dynamic::UNIT)
            };
            let out: Dynamic = f
                .call_within_context(ctx, (RTensor(w.shallow_clone()), arg(mm), arg(vv)))
                .map_err(|e| anyhow::anyhow!("score closure: {e}"))?;
            out.read_lock::<RTensor>()
                .map(|t| t.0.shallow_clone())
                .ok_or_else(|| anyhow::anyhow!("score closure must return a Tensor, got {}", out.type_name()))
        }
    });
    let mut pguard = match &pruner {
        Some(p) => Some(p.borrow_mut()?),
        None => None,
    };
    let mut hook = pguard
        .as_deref_mut()
        .map(|p| PruneHook::new(p, custom.as_mut().map(|c| c as &mut crate::prune::CustomScore)));
    let mut hooks: Vec<&mut dyn Hook> = Vec::new();
    if let Some(h) = hook.as_mut() {
        hooks.push(h);
    }
    let (on_step, on_eval, lr_schedule) =
        (closure_opt(&opts, "on_step")?, closure_opt(&opts, "on_eval")?, closure_opt(&opts, "lr_schedule")?);
    let mut callbacks = (on_step.is_some() || on_eval.is_some() || lr_schedule.is_some()).then(|| {
        Callbacks { ctx, on_step, on_eval, lr_schedule, pending: serde_json::Map::new(), stop: None }
    });
    if let Some(c) = callbacks.as_mut() {
        hooks.push(c);
    }
    let loss_closure = closure_opt(&opts, "loss")?;
    let loss_fn = loss_closure.map(|f| {
        move |logits: &tch::Tensor, y: &tch::Tensor| -> anyhow::Result<tch::Tensor> {
            let out: Dynamic = f
                .call_within_context(ctx, (RTensor(logits.shallow_clone()), RTensor(y.shallow_clone())))
                .map_err(|e| anyhow::anyhow!("loss closure: {e}"))?;
            out.read_lock::<RTensor>()
                .map(|t| t.0.shallow_clone())
                .ok_or_else(|| anyhow::anyhow!("loss closure must return a Tensor, got {}", out.type_name()))
        }
    });
    // Hooks added with add_hook act in training and evaluation forwards.
    let script_hooks = super::mechint::ScriptHooks::of_model(ctx, &model);
    let fwd_hooks = script_hooks.as_ref().map(|h| h as &dyn crate::hooks::Hooks);
    let summary = Trainer {
        model: &mut **m,
        opt: &mut o,
        data: &mut *data,
        hooks,
        cfg,
        run,
        record,
        tracker,
        fwd_hooks,
        loss_fn: loss_fn.as_ref().map(|f| f as &crate::train::LossFn),
    }
    .run()
    .rt();
    let summary = super::mechint::ScriptHooks::finish(script_hooks.as_ref(), summary)?;
    Ok(RRun { dir, summary: Rc::new(summary) })
}

pub fn register(engine: &mut Engine, docs: &mut Vec<DocEntry>) {
    engine.register_type_with_name::<RRun>("Run");
    engine.register_fn("to_string", |r: &mut RRun| describe(r));
    engine.register_fn("to_debug", |r: &mut RRun| describe(r));
    let mut api = Api::new(engine, docs);
    api.group("Training");
    api.f("train", "model, opt, data: Loader|TokenDataset, options: map", "Train and return the Run. Options: `steps`, `epochs`, `time_limit` (s), `grad_accum`, `eval_every`, `log_every`, `checkpoint_every`, `schedule` (\"auto\", \"constant\", \"warmup_cosine\", \"cosine_epoch\"), `warmup`, `min_lr`, `amp` (\"auto\", \"bf16\", \"fp16\", \"none\"), `tf32`, `resume`, `progress`, `stop_after`, `bucket_mb`, `fused_loss` (GPT-2's loss without the logits, default true), `inference` (image models: `#{ batch_sizes: [1, 8, 32, 128], warmup: 3, runs: 10 }` times the trained model into the run's inference.json, docs/workflow.md), `gpu_monitor_ms` (CUDA: sample the GPU through NVML every N ms into gpu.jsonl and the logged metrics, default 1000, 0 off), `tiering` (GPT-2: `#{ mode: \"emulated\"|\"real\", hbm: 0.3, cpu: 0.5, assign_step: 0, reassign_every: 0, json: \"tier_hints.json\" }` assigns modules to HBM/CPU/SSD from Adam's state after the warm-up and delays or stages their forwards, docs/tiering.md), `kv_prune_eval` (GPT-2: `#{ keep_ratios: [0.5, 0.382, 0.25], k_min: 0, recency: 0 (0: block_size / 16), exposure: true, ema: 0.9, ema_every: 8, mode: \"v_only\", evict: false, seqs: 4, prefill: 1, recon: false, recon_steps: 200, recon_lr: 1e-3, recon_seqs: 8 }` scores held-out sequences through a pruned KV cache when the run completes, into kv_prune.json and the summary's kv_ppl, kv_ppl_dense, kv_ppl_recon, docs/attention.md); `test` (a Loader over the test split, for evaluation) for images; `batch_size`, `block_size`, `eval_batches` for tokens; `pruner`; `run_dir` or `name` (default runs/<arch>-<time>); `tracker` (\"local\", \"trackio\"; default $TRACKER); `record` (extra map kept with the run); closures: `loss: |logits, y| ...` (a 0-d Tensor replacing the cross-entropy in training), `lr_schedule: |step| ...` (the learning rate of each step), `on_step: |s| ...` (`s = #{ step, total_steps, lr, loss }`, loss a 0-d Tensor) and `on_eval: |m| ...` (the evaluation record), each returning (), a map of numbers to log, or `false`/`#{ stop: true }` to end the run cleanly (docs/training.md).", |ctx: NativeCallContext, m: RModel, o: ROpt, d: Dynamic, opts: Map| -> RResult<RRun> {
        run_train(&ctx, m, o, d, opts)
    });
    api.f("evaluate", "model, data: Loader|TokenDataset, options: map", "Evaluation metrics without training: `#{ test_loss, test_acc }` over a whole Loader, or `#{ val_loss, val_ppl }` over `eval_batches` fixed validation windows (`batch_size`, `block_size`).", |m: RModel, d: Dynamic, opts: Map| -> RResult<Map> {
        check_keys(&opts, &["batch_size", "block_size", "eval_batches"], "evaluate")?;
        let mut feed_opts = opts.clone();
        if let Some(l) = d.read_lock::<RLoader>() {
            feed_opts.insert("test".into(), Dynamic::from(l.clone()));
        }
        let mut data = feed(&m, &d, &feed_opts)?;
        let mm = m.borrow()?;
        let metrics = crate::train::evaluate(&**mm, &mut *data, None).rt()?;
        Ok(metrics.into_iter().map(|(k, v)| (k.into(), to_dyn(&v).unwrap_or(Dynamic::UNIT))).collect())
    });
    api.get("summary", "Final status and metrics: `#{ status, steps, epochs, elapsed_s, final_metrics, best_metrics, throughput, ... }`.", |r: &mut RRun| -> RResult<Dynamic> {
        rhai::serde::to_dynamic(&*r.summary).map_err(|e| rerr(e.to_string()))
    });
    api.get("dir", "The run directory.", |r: &mut RRun| r.dir.display().to_string());
    api.get(
        "status",
        "`done`, `failed`, `interrupted` or `running` (stopped early).",
        |r: &mut RRun| -> RResult<String> {
            Ok(serde_json::to_value(r.summary.status)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default())
        },
    );
    api.f(
        "metrics",
        "self",
        "Every logged record of the run (metrics.jsonl) as an array of maps.",
        |r: &mut RRun| -> RResult<Array> {
            let recs = RunDir::open(&r.dir).rt()?.metrics().rt()?;
            recs.iter().map(to_dyn).collect()
        },
    );
    api.f(
        "metric",
        "self, name",
        "The values of one metric as `[[step, value], ...]`, in logging order.",
        |r: &mut RRun, name: &str| -> RResult<Array> {
            let recs = RunDir::open(&r.dir).rt()?.metrics().rt()?;
            Ok(recs
                .iter()
                .filter_map(|x| {
                    let v = x.get(name)?.as_f64()?;
                    let s = x.get("step")?.as_i64()?;
                    Some(Dynamic::from_array(vec![
                        Dynamic::from_int(s as INT),
                        Dynamic::from_float(v as FLOAT),
                    ]))
                })
                .collect())
        },
    );
}

fn describe(r: &RRun) -> String {
    format!("Run({}, {:?}, {} steps)", r.dir.display(), r.summary.status, r.summary.steps)
}
