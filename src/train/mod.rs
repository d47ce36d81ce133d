//! The training loop: steps or epochs, gradient accumulation, evaluation,
//! a time budget, bf16 autocast and TF32 on CUDA, metrics to the run
//! directory as they happen, atomic checkpoints and exact resume.
use std::io::{IsTerminal, Write};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{self, State};
use crate::models::{cross_entropy, Model, Task};
use crate::optim::schedule::Schedule;
use crate::optim::{OptKind, Optimizer};
use crate::params::ParamStore;
use crate::runs::{RunDir, Status};
use crate::tensor::torch_error;
use crate::track::{RunInfo, Tracker};

pub mod feed;

fn te(e: tch::TchError) -> anyhow::Error {
    anyhow!(torch_error(&e))
}

/// A source of batches. Image data sets are epoch-based; token data is an
/// endless stream of random windows.
pub trait Data {
    /// Next training batch (x, y) on the CPU; `None` ends the epoch.
    fn next_batch(&mut self) -> Result<Option<(Tensor, Tensor)>>;
    /// Begin the next epoch (reshuffles).
    fn new_epoch(&mut self) -> Result<()>;
    /// Batches per epoch, for epoch-based data.
    fn batches_per_epoch(&self) -> Option<i64>;
    /// Call `f` on every evaluation batch. Evaluation data is the same at
    /// every call (the test split, or fixed validation windows).
    fn for_each_eval(&mut self, f: &mut dyn FnMut(&Tensor, &Tensor) -> Result<()>) -> Result<()>;
    /// Position and RNG state, to resume exactly.
    fn state(&self) -> Value;
    fn restore(&mut self, state: &Value) -> Result<()>;
    /// Back to the start of the data's seeded order (first batch, epoch 0).
    fn rewind(&mut self);
    /// What the data is, for run records.
    fn describe(&self) -> Value;
}

/// What a hook may touch around an optimizer step.
pub struct StepCtx<'a> {
    /// The optimizer step being taken (1-based).
    pub step: i64,
    pub total_steps: i64,
    pub steps_per_epoch: Option<i64>,
    pub store: &'a ParamStore,
    pub opt: &'a mut Optimizer,
    /// This step's training loss (mean over its micro-batches; a 0-d tensor
    /// on the device, read only if a hook asks: reading it synchronises).
    pub loss: Option<&'a Tensor>,
}

/// Work around the optimizer step: pruning masks gradients before it and
/// re-masks weights and moments (and updates masks) after it.
pub trait Hook {
    fn name(&self) -> &str;
    fn before_step(&mut self, ctx: &mut StepCtx) -> Result<()>;
    fn after_step(&mut self, ctx: &mut StepCtx) -> Result<()>;
    /// Metrics to log (e.g. achieved sparsity).
    fn metrics(&mut self) -> Result<Map<String, Value>>;
    /// Scalar state and tensors for checkpoints.
    fn state(&self) -> Value;
    fn tensors(&self) -> Vec<(String, Tensor)>;
    fn restore(&mut self, state: &Value, tensors: &[(String, Tensor)]) -> Result<()>;
    /// After an evaluation: extra entries for its record.
    fn on_eval(&mut self, step: i64, record: &Map<String, Value>) -> Result<Map<String, Value>> {
        let _ = (step, record);
        Ok(Map::new())
    }
    /// A reason to end the run now, cleanly (checked after every step):
    /// the final evaluation and checkpoint follow as at the end of a budget.
    fn stop(&mut self) -> Option<String> {
        None
    }
    /// Summary entries at the end of the run.
    fn summary(&mut self, store: &ParamStore) -> Result<Map<String, Value>> {
        let _ = store;
        self.metrics()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Optimizer steps to take (0: use `epochs`).
    pub steps: i64,
    /// Passes over epoch-based data (used when `steps` is 0).
    pub epochs: i64,
    /// Wall-clock budget in seconds (0 = none); the run stops cleanly.
    pub time_limit: f64,
    /// Micro-batches per optimizer step.
    pub grad_accum: i64,
    /// Evaluate every N steps (0: at the end of every epoch, or at the end).
    pub eval_every: i64,
    /// Log training metrics every N steps.
    pub log_every: i64,
    /// Write the `last` checkpoint every N steps (0: at every evaluation).
    pub checkpoint_every: i64,
    /// `auto`, `constant`, `warmup_cosine` or `cosine_epoch`.
    pub schedule: String,
    pub warmup: i64,
    /// Floor of cosine schedules (default lr / 10).
    pub min_lr: Option<f64>,
    /// `auto` (bf16 on CUDA, fp32 on CPU), `bf16`, `fp16` or `none`.
    pub amp: String,
    /// TF32 matmuls on CUDA.
    pub tf32: bool,
    /// Continue from the run directory's last checkpoint if there is one.
    pub resume: bool,
    /// `auto` (a bar on a terminal, lines otherwise), `bar`, `lines` or `off`.
    pub progress: String,
    /// Stop after this many steps, as if killed (tests of resume use it).
    pub stop_after: i64,
    /// Distributed runs: gradients are all-reduced in buckets of this many MB.
    pub bucket_mb: f64,
    /// Language models that can (GPT-2) compute the cross-entropy chunk by
    /// chunk without materialising the logits (`crate::loss`).
    pub fused_loss: bool,
    /// After a completed run of an image model, time its forward pass at
    /// these batch sizes ([`crate::inference`]); None: no inference test.
    pub inference: Option<crate::inference::InferenceConfig>,
    /// On CUDA, sample the GPU through NVML every this many ms into the
    /// run's gpu.jsonl and the logged metrics ([`crate::gpumon`]); 0: off.
    pub gpu_monitor_ms: i64,
    /// Hierarchical memory tiering of the model's modules
    /// ([`crate::tiering`], docs/tiering.md); None: off.
    pub tiering: Option<crate::tiering::TieringConfig>,
    /// After a completed GPT-2 run, score held-out sequences through a
    /// pruned KV cache ([`crate::decode::kveval`]); None: off.
    pub kv_prune_eval: Option<crate::decode::kveval::KvEvalConfig>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 0,
            epochs: 1,
            time_limit: 0.0,
            grad_accum: 1,
            eval_every: 0,
            log_every: 10,
            checkpoint_every: 0,
            schedule: "auto".into(),
            warmup: 0,
            min_lr: None,
            amp: "auto".into(),
            tf32: true,
            resume: false,
            progress: "auto".into(),
            stop_after: 0,
            bucket_mb: 25.0,
            fused_loss: true,
            inference: None,
            gpu_monitor_ms: 1000,
            tiering: None,
            kv_prune_eval: None,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        if self.steps < 0 || self.epochs < 0 || self.grad_accum < 1 || self.log_every < 1 {
            bail!("train: steps and epochs must be >= 0, grad_accum and log_every >= 1");
        }
        if !(0..=3_600_000).contains(&self.gpu_monitor_ms) {
            bail!("train: gpu_monitor_ms must be 0 (off) to 3600000 (an hour), got {}", self.gpu_monitor_ms);
        }
        if !(self.bucket_mb.is_finite() && self.bucket_mb > 0.0) {
            bail!("train: bucket_mb must be a positive number of MB, got {}", self.bucket_mb);
        }
        if self.steps == 0 && self.epochs == 0 && self.time_limit <= 0.0 {
            bail!("train: set steps, epochs or time_limit");
        }
        if let Some(i) = &self.inference {
            i.validate()?;
        }
        if let Some(t) = &self.tiering {
            t.validate()?;
        }
        if let Some(k) = &self.kv_prune_eval {
            k.validate()?;
        }
        let choices: [(&str, &str, &[&str]); 3] = [
            ("schedule", &self.schedule, &["auto", "constant", "warmup_cosine", "cosine_epoch"]),
            ("amp", &self.amp, &["auto", "bf16", "fp16", "none"]),
            ("progress", &self.progress, &["auto", "bar", "lines", "off"]),
        ];
        for (key, v, valid) in choices {
            if !valid.contains(&v) {
                bail!("train: {key} must be one of {}, got '{v}'", valid.join(", "));
            }
        }
        Ok(())
    }
}

/// Outcome of a run, also written to `summary.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    pub status: Status,
    pub reason: Option<String>,
    pub steps: i64,
    pub epochs: f64,
    pub elapsed_s: f64,
    /// Final and best evaluation metrics (`val_loss`, `val_ppl` or `test_loss`, `test_acc`).
    pub final_metrics: Map<String, Value>,
    pub best_metrics: Map<String, Value>,
    pub train_loss: Option<f64>,
    /// Tokens (LM) or samples (images) per second over the run.
    pub throughput: f64,
    pub throughput_unit: String,
    pub peak_mem_mb: Option<f64>,
    pub extra: Map<String, Value>,
}

/// Runs `f` under autocast to `amp` when given.
fn with_amp<T>(amp: Option<crate::shim::AutocastDtype>, f: impl FnOnce() -> T) -> Result<T> {
    match amp {
        Some(d) => crate::shim::with_autocast(d, f).map_err(|e| anyhow!(e)),
        None => Ok(f()),
    }
}

/// A custom loss's value as the loop needs it: one float element.
fn scalar_loss(l: Tensor) -> Result<Tensor> {
    if l.numel() != 1 || !matches!(l.kind(), Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16) {
        bail!("it must return one floating-point value (a 0-d tensor), got {:?} {:?}", l.kind(), l.size());
    }
    l.f_reshape([]).and_then(|t| t.f_to_kind(Kind::Float)).map_err(te)
}

/// Perplexity as reported everywhere: exp(min(loss, 20)).
pub fn perplexity(loss: f64) -> f64 {
    loss.min(20.0).exp()
}

struct Progress {
    mode: &'static str,
    last_len: usize,
    /// Ranks other than 0 of a distributed run: no output, no train.log.
    quiet: bool,
}

impl Progress {
    fn new(cfg: &str) -> Self {
        let mode = match cfg {
            // A notebook (crate::output) shows the bar as one updated display.
            "off" => "off",
            "auto" | "bar" if crate::output::captured() => "sink",
            "auto" if std::io::stderr().is_terminal() => "bar",
            "auto" => "lines",
            "bar" => "bar",
            "lines" => "lines",
            _ => "off",
        };
        Progress { mode, last_len: 0, quiet: false }
    }

    fn bar(&mut self, step: i64, total: i64, text: &str) {
        if self.quiet {
            return;
        }
        if self.mode == "sink" {
            crate::output::report(crate::output::Progress::Bar { step, total, text });
            return;
        }
        if self.mode != "bar" {
            return;
        }
        let width = 24usize;
        let frac = if total > 0 { (step as f64 / total as f64).clamp(0.0, 1.0) } else { 0.0 };
        let filled = (frac * width as f64) as usize;
        let line = format!("\r[{}{}] {step}/{total} {text}", "=".repeat(filled), " ".repeat(width - filled));
        let pad = self.last_len.saturating_sub(line.len());
        eprint!("{line}{}", " ".repeat(pad));
        let _ = std::io::stderr().flush();
        self.last_len = line.len();
    }

    /// A permanent line (log records, evaluations, messages).
    fn line(&mut self, run: &RunDir, text: &str) {
        if self.quiet {
            return;
        }
        run.log(text);
        match self.mode {
            "off" => {}
            "sink" => {
                crate::output::report(crate::output::Progress::Line(text));
            }
            "bar" => {
                eprint!("\r{}\r", " ".repeat(self.last_len));
                self.last_len = 0;
                println!("{text}");
            }
            _ => println!("{text}"),
        }
    }

    fn finish(&mut self) {
        if self.mode == "sink" {
            crate::output::report(crate::output::Progress::Done);
        }
        if self.mode == "bar" && self.last_len > 0 {
            eprintln!();
        }
    }
}

/// Mean loss and metric over the evaluation data, in eval mode:
/// `test_loss`/`test_acc` for classifiers, `val_loss`/`val_ppl` for language models.
pub fn evaluate(
    model: &dyn Model,
    data: &mut dyn Data,
    amp: Option<crate::shim::AutocastDtype>,
) -> Result<Map<String, Value>> {
    evaluate_sampled(model, data, amp, &mut None)
}

/// [`evaluate`], keeping the first evaluation batch's inputs in `sample`
/// (the model's per-evaluation analysis runs on them).
pub fn evaluate_sampled(
    model: &dyn Model,
    data: &mut dyn Data,
    amp: Option<crate::shim::AutocastDtype>,
    sample: &mut Option<Tensor>,
) -> Result<Map<String, Value>> {
    evaluate_hooked(model, data, amp, sample, None)
}

/// [`evaluate_sampled`] with hook points visited (hooks added to a model
/// for training act in its evaluations too).
pub fn evaluate_hooked(
    model: &dyn Model,
    data: &mut dyn Data,
    amp: Option<crate::shim::AutocastDtype>,
    sample: &mut Option<Tensor>,
    hooks: Option<&dyn crate::hooks::Hooks>,
) -> Result<Map<String, Value>> {
    let sums = eval_sums(model, data, amp, sample, hooks, (0, 1))?;
    Ok(eval_metrics(model.task(), &sums))
}

/// Sums over evaluation batches: [loss, correct, count, batches, loss²]
/// (loss² per batch, for language models' standard error). A rank of
/// `shard = (rank, world)` takes every world-th batch from its rank on, so
/// the ranks' sums add up to one process's.
fn eval_sums(
    model: &dyn Model,
    data: &mut dyn Data,
    amp: Option<crate::shim::AutocastDtype>,
    sample: &mut Option<Tensor>,
    hooks: Option<&dyn crate::hooks::Hooks>,
    shard: (i64, i64),
) -> Result<[f64; 5]> {
    let device = model.store().device();
    let (mut loss_sum, mut correct, mut count, mut batches) = (0.0f64, 0i64, 0i64, 0i64);
    let mut loss_sq = 0.0f64;
    let task = model.task();
    let _guard = tch::no_grad_guard();
    let mut index = -1i64;
    data.for_each_eval(&mut |x, y| {
        index += 1;
        if index % shard.1 != shard.0 {
            return Ok(());
        }
        let x = x.f_to_device(device).map_err(te)?;
        let y = y.f_to_device(device).map_err(te)?;
        if sample.is_none() {
            *sample = Some(x.shallow_clone());
        }
        let logits = with_amp(amp, || model.forward_hooked(&x, false, hooks))?.map_err(te)?;
        let logits = logits.f_to_kind(Kind::Float).map_err(te)?;
        let loss = cross_entropy(&logits, &y).map_err(te)?.f_double_value(&[]).map_err(te)?;
        let n = y.size()[0];
        if let Task::Classify { .. } = task {
            let pred = logits.f_argmax(-1, false).map_err(te)?;
            correct += pred
                .f_eq_tensor(&y)
                .and_then(|e| e.f_sum(Kind::Int64))
                .and_then(|s| s.f_int64_value(&[]))
                .map_err(te)?;
            loss_sum += loss * n as f64;
        } else {
            loss_sum += loss;
            loss_sq += loss * loss;
        }
        count += n;
        batches += 1;
        Ok(())
    })?;
    Ok([loss_sum, correct as f64, count as f64, batches as f64, loss_sq])
}

fn eval_metrics(task: Task, sums: &[f64; 5]) -> Map<String, Value> {
    let [loss_sum, correct, count, batches, loss_sq] = *sums;
    let mut m = Map::new();
    if batches == 0.0 {
        return m;
    }
    match task {
        Task::Classify { .. } => {
            let n = count.max(1.0);
            m.insert("test_loss".into(), json!(loss_sum / n));
            m.insert("test_acc".into(), json!(correct / n));
        }
        Task::LanguageModel { .. } => {
            let l = loss_sum / batches;
            m.insert("val_loss".into(), json!(l));
            m.insert("val_ppl".into(), json!(perplexity(l)));
            // Standard error of val_loss over its batches (windows are
            // independent draws): how far another draw could move it.
            if batches > 1.0 {
                let var = ((loss_sq - loss_sum * l) / (batches - 1.0)).max(0.0);
                m.insert("val_loss_se".into(), json!((var / batches).sqrt()));
            }
        }
    }
    m
}

/// Everything the loop needs, borrowed from the caller.
pub struct Trainer<'a> {
    pub model: &'a mut dyn Model,
    pub opt: &'a mut Optimizer,
    pub data: &'a mut dyn Data,
    pub hooks: Vec<&'a mut dyn Hook>,
    pub cfg: TrainConfig,
    pub run: RunDir,
    /// The full configuration recorded with the run (model, optimizer, ...).
    pub record: Value,
    /// Tracker sinks (`local`, `trackio`); None reads `$TRACKER`.
    pub tracker: Option<String>,
    /// Hook points visited in every forward (hooks added to the model).
    pub fwd_hooks: Option<&'a dyn crate::hooks::Hooks>,
    /// The training objective from (logits, targets), replacing the
    /// cross-entropy (evaluation keeps the cross-entropy).
    pub loss_fn: Option<&'a LossFn<'a>>,
}

/// A custom training loss: (logits, targets) -> a 0-d tensor.
pub type LossFn<'a> = dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + 'a;

fn amp_dtype(cfg: &TrainConfig, device: Device) -> Option<crate::shim::AutocastDtype> {
    use crate::shim::AutocastDtype::*;
    match (cfg.amp.as_str(), device.is_cuda()) {
        (_, false) | ("none", _) => None,
        ("fp16", true) => Some(F16),
        _ => Some(BF16),
    }
}

impl Trainer<'_> {
    fn device(&self) -> Device {
        self.model.store().device()
    }

    /// Ranks 1.. of a distributed run keep quiet and write nothing.
    fn lead(&self) -> bool {
        crate::dist::rank() == 0
    }

    /// Every rank starts from rank 0's parameters and buffers.
    fn sync_start(&mut self) -> Result<()> {
        for g in self.model.store().groups() {
            crate::dist::broadcast(&g.data, 0)?;
        }
        self.sync_buffers()
    }

    /// Buffers (BatchNorm's running statistics) are updated on each rank's
    /// slice; rank 0's are the model's, as with PyTorch DDP's buffer
    /// broadcast. Boolean and byte buffers are derived, never trained.
    fn sync_buffers(&self) -> Result<()> {
        if crate::dist::world_size() < 2 {
            return Ok(());
        }
        for (_, b) in self.model.store().buffers() {
            if matches!(
                b.kind(),
                Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16 | Kind::Int64 | Kind::Int
            ) {
                crate::dist::broadcast(b, 0)?;
            }
        }
        Ok(())
    }

    /// Sum the ranks' gradients (each rank's loss is already weighted by its
    /// share of the global batch, so the sum is the global mean's gradient).
    fn all_reduce_grads(&self) -> Result<()> {
        let bucket = (self.cfg.bucket_mb * (1 << 20) as f64) as i64;
        for g in self.model.store().groups() {
            crate::dist::all_reduce_buckets(&g.grad, bucket)?;
        }
        Ok(())
    }

    fn schedule(&self, total: i64) -> Schedule {
        let base = self.opt.cfg.lr;
        let min_lr = self.cfg.min_lr.unwrap_or(base / 10.0);
        let epochs = if self.cfg.steps == 0 { self.cfg.epochs } else { 0 };
        let cosine_kind = matches!(self.opt.cfg.kind, OptKind::AdamWAdv | OptKind::AdamWSpam);
        let lm = matches!(self.model.task(), Task::LanguageModel { .. });
        match self.cfg.schedule.as_str() {
            "constant" => Schedule::Constant,
            "cosine_epoch" => Schedule::CosineEpoch { epochs: epochs.max(1), min_lr },
            "warmup_cosine" => Schedule::WarmupCosine { warmup: self.cfg.warmup, total, min_lr },
            // auto: nanoGPT's warm-up + cosine for language models; the
            // optimizers that carry a cosine schedule get it; else constant.
            _ if lm => Schedule::WarmupCosine { warmup: self.cfg.warmup, total, min_lr },
            _ if cosine_kind && epochs > 0 => Schedule::CosineEpoch { epochs, min_lr: 1e-6 },
            _ if cosine_kind => Schedule::WarmupCosine { warmup: self.cfg.warmup, total, min_lr: 1e-6 },
            _ => Schedule::Constant,
        }
    }

    /// Evaluate, then let the model add its own analysis of a sample batch.
    fn evaluate(&mut self, tiering: Option<&crate::tiering::Tiering>) -> Result<Map<String, Value>> {
        let amp = amp_dtype(&self.cfg, self.device());
        let mut sample = None;
        let shard =
            if crate::dist::is_active() { (crate::dist::rank(), crate::dist::world_size()) } else { (0, 1) };
        self.sync_buffers()?;
        let hooks = fwd_chain(self.fwd_hooks, tiering);
        let hooks_ref = hooks.as_ref().map(|c| c as &dyn crate::hooks::Hooks);
        let sums = eval_sums(&*self.model, &mut *self.data, amp, &mut sample, hooks_ref, shard);
        if let Some(t) = tiering {
            t.end_forward()?;
        }
        let mut sums = sums?;
        if shard.1 > 1 {
            crate::dist::all_reduce_f64(&mut sums, crate::dist::Op::Sum)?;
        }
        let mut m = eval_metrics(self.model.task(), &sums);
        let extra = {
            let _g = tch::no_grad_guard();
            let model = &mut *self.model;
            with_amp(amp, || model.on_eval(&m, sample.as_ref())).and_then(|r| r)
        };
        // The model's own analysis must not end a run: report it and go on.
        match extra {
            Ok(extra) => m.extend(extra),
            Err(e) => eprintln!("warning: the model's evaluation analysis failed: {e:#}"),
        }
        // The analysis may change weights: real mode's host copies follow.
        if let Some(t) = tiering {
            t.refresh_host()?;
        }
        Ok(m)
    }

    /// Is `new` better than `best` (accuracy up, loss down)?
    fn better(&self, new: &Map<String, Value>, best: &Map<String, Value>) -> bool {
        let get = |m: &Map<String, Value>, k: &str| m.get(k).and_then(Value::as_f64);
        match (get(new, "test_acc"), get(best, "test_acc")) {
            (Some(a), Some(b)) => return a > b,
            (Some(_), None) => return true,
            _ => {}
        }
        match (get(new, "val_loss"), get(best, "val_loss")) {
            (Some(a), Some(b)) => a < b,
            (Some(_), None) => true,
            _ => false,
        }
    }

    fn save(&mut self, which: &str, step: i64, epoch: i64, progress: &Value) -> Result<()> {
        self.sync_buffers()?;
        if !self.lead() {
            return Ok(());
        }
        let mut extra = Vec::new();
        let mut hook_state = Map::new();
        for h in self.hooks.iter() {
            hook_state.insert(h.name().to_string(), h.state());
            for (n, t) in h.tensors() {
                extra.push((format!("hook.{}.{n}", h.name()), t));
            }
        }
        let state = State {
            format: checkpoint::FORMAT,
            arch: self.model.arch().to_string(),
            step,
            epoch,
            optimizer: json!({
                "lr": self.opt.lr, "step": self.opt.step, "spam": self.opt.spam, "scaler": self.opt.scaler,
            }),
            data: self.data.state(),
            hooks: Value::Object(hook_state),
            config: self.record.clone(),
            progress: progress.clone(),
        };
        checkpoint::save(&self.run.checkpoint(which), self.model.store(), self.opt, &extra, &state)
    }

    fn resume_from(&mut self, ck: &checkpoint::Loaded) -> Result<()> {
        if ck.state.arch != self.model.arch() {
            bail!(
                "{}: checkpoint of a {} model, this run builds a {}",
                ck.path.display(),
                ck.state.arch,
                self.model.arch()
            );
        }
        ck.restore_model(self.model.store())?;
        ck.restore_optimizer(self.opt)?;
        let o = &ck.state.optimizer;
        self.opt.lr = o.get("lr").and_then(Value::as_f64).unwrap_or(self.opt.lr);
        self.opt.step = o.get("step").and_then(Value::as_i64).unwrap_or(0);
        if let Some(s) = o.get("spam").filter(|s| !s.is_null()) {
            self.opt.spam = Some(serde_json::from_value(s.clone()).context("checkpoint: SPAM state")?);
        }
        if let Some(s) = o.get("scaler").filter(|s| !s.is_null()) {
            let sc: crate::optim::scaler::GradScaler =
                serde_json::from_value(s.clone()).context("checkpoint: loss scaler state")?;
            sc.validate().with_context(|| format!("{}", ck.path.display()))?;
            self.opt.scaler = Some(sc);
        }
        self.data.restore(&ck.state.data)?;
        for h in self.hooks.iter_mut() {
            let name = h.name().to_string();
            let st = ck.state.hooks.get(&name).cloned().unwrap_or(Value::Null);
            let prefix = format!("hook.{name}.");
            let ts: Vec<(String, Tensor)> = ck
                .tensors
                .iter()
                .filter_map(|(n, t)| n.strip_prefix(&prefix).map(|s| (s.to_string(), t.shallow_clone())))
                .collect();
            h.restore(&st, &ts).with_context(|| format!("{}: hook '{name}'", ck.path.display()))?;
        }
        ck.restore_rng()
    }

    /// Run to completion (or failure). Errors in set-up return `Err`; a
    /// failure during training (NaN, out of memory) is a `Summary` with
    /// status `failed` and the run directory says why.
    pub fn run(mut self) -> Result<Summary> {
        self.cfg.validate()?;
        // Tiering needs the model's hook points and Adam's moments:
        // refused before any work.
        let tiering = match &self.cfg.tiering {
            Some(c) => {
                crate::tiering::check_optimizer(self.model.store(), self.opt)?;
                Some(crate::tiering::Tiering::new(c, &*self.model)?)
            }
            None => None,
        };
        let assign_at =
            self.cfg.tiering.as_ref().map_or(0, |c| c.assign_at(self.cfg.warmup, self.cfg.eval_every));
        // Ctrl-C stops this loop at a step boundary, even while a script
        // closure (a script model's forward) is running.
        let _defer = crate::interrupt::Defer::new();
        let device = self.device();
        if device.is_cuda() {
            crate::shim::set_tf32(self.cfg.tf32).map_err(|e| anyhow!(e))?;
            let _ = crate::shim::reset_peak_memory(match device {
                Device::Cuda(i) => i,
                _ => 0,
            });
        }
        let amp = amp_dtype(&self.cfg, device);
        // float16 needs loss scaling (bfloat16 has float32's range). A
        // scaler restored from a checkpoint or set by the caller is kept.
        if self.cfg.amp == "fp16" && self.opt.scaler.is_none() {
            self.opt.scaler = Some(crate::optim::scaler::GradScaler::default());
        }
        if let Some(sc) = &self.opt.scaler {
            sc.validate()?;
        }
        let task = self.model.task();
        let per_epoch = self.data.batches_per_epoch().map(|b| (b / self.cfg.grad_accum).max(1));
        let mut total = match (self.cfg.steps, per_epoch) {
            (s, _) if s > 0 => s,
            (_, Some(b)) if self.cfg.epochs > 0 => b * self.cfg.epochs,
            // A time budget alone: estimated once the step time is known.
            _ if self.cfg.time_limit > 0.0 => 0,
            _ => bail!("train: token data has no epochs; set steps or time_limit"),
        };
        // A bad tracker spec fails before any work.
        let mut tracker = match &self.tracker {
            Some(spec) => Tracker::from_spec(spec)?,
            None => Tracker::from_env()?,
        };
        let lead = self.lead();
        let (dist, world) = (crate::dist::is_active(), crate::dist::world_size());
        let multi = world > 1;
        if !lead {
            tracker = Tracker::silent();
        }
        let mut progress = Progress::new(&self.cfg.progress);
        progress.quiet = !lead;
        let (mut step, mut epoch) = (0i64, 0i64);
        let mut best: Map<String, Value> = Map::new();
        let mut last_eval: Map<String, Value> = Map::new();
        let mut elapsed_before = 0.0f64;
        let mut items_done = 0f64;
        let last = self.run.checkpoint("last");
        let resumed = self.cfg.resume && last.exists();
        let mut replayed_through = None;
        if resumed {
            let ck = checkpoint::load(&last)?;
            self.resume_from(&ck)?;
            step = ck.state.step;
            epoch = ck.state.epoch;
            let p = &ck.state.progress;
            best = p.get("best").and_then(Value::as_object).cloned().unwrap_or_default();
            last_eval = p.get("last_eval").and_then(Value::as_object).cloned().unwrap_or_default();
            elapsed_before = p.get("elapsed_s").and_then(Value::as_f64).unwrap_or(0.0);
            items_done = p.get("items").and_then(Value::as_f64).unwrap_or(0.0);
            if let Some(t) = p.get("total_steps").and_then(Value::as_i64).filter(|t| *t > 0) {
                total = t;
            }
            // Steps after the checkpoint were logged once already.
            let logged = self
                .run
                .metrics()
                .ok()
                .and_then(|rs| rs.iter().filter_map(|r| r.get("step")?.as_i64()).max());
            replayed_through = logged.filter(|&s| s > step);
            if lead {
                self.run.truncate_metrics_after(step)?;
            }
            progress.line(&self.run, &format!("resumed from {} at step {step}", last.display()));
            // The checkpoint's tiers, not a new scoring of its moments.
            if let Some(t) = &tiering {
                t.restore(p.get("tiering").unwrap_or(&Value::Null))
                    .with_context(|| format!("{}: tiering", last.display()))?;
            }
        }
        // The local sink writes config.json and starts a new metrics.jsonl
        // unless resumed; it writes system.json either way.
        let mut info = RunInfo::new(&self.run.path, self.record.clone(), resumed);
        info.logged_through = replayed_through;
        tracker.start(&info)?;
        if lead {
            self.run.set_status(Status::Running, None)?;
        }
        let mut monitor = if lead { self.gpu_monitor(device, &mut progress) } else { None };
        if dist {
            // After every rank has read the checkpoint: rank 0's state wins.
            self.sync_start()?;
            if multi {
                // Dropout differs per rank (as each rank's slice does); the
                // data order, drawn from the loaders' own generators, does not.
                let base = Tensor::f_randint(i64::MAX, [1], (Kind::Int64, Device::Cpu))
                    .and_then(|t| t.f_int64_value(&[0]))
                    .map_err(te)?;
                tch::manual_seed(base.wrapping_add(crate::dist::rank()));
            }
        }
        // A time budget's length is unknown until the step time is measured:
        // until then the schedule runs as if the budget were endless (the
        // warm-up, then the full rate), not as if it were one step long.
        let mut schedule = self.schedule(if total > 0 { total } else { i64::MAX });
        let start = Instant::now();
        let elapsed = |s: &Instant| elapsed_before + s.elapsed().as_secs_f64();
        let mut window_start = Instant::now();
        let (mut window_items, mut window_steps) = (0f64, 0i64);
        let mut loss_acc: Option<Tensor> = None;
        let mut acc_hits: Option<Tensor> = None;
        let mut acc_count = 0i64;
        let mut last_train_loss: Option<f64> = None;
        let mut sample_shape: Option<Vec<i64>> = None;
        let mut failure: Option<String> = None;
        let unit = if matches!(task, Task::LanguageModel { .. }) { "tokens_per_s" } else { "samples_per_s" };
        let eval_every = self.cfg.eval_every;
        let mut stopped_early = false;
        let mut stop_reason: Option<String> = None;
        // Step budgets stop here; epoch budgets stop at the end of an epoch.
        let step_budget = self.cfg.steps > 0 || per_epoch.is_none();
        'outer: loop {
            if (step_budget || self.cfg.epochs == 0) && total > 0 && step >= total {
                break;
            }
            // Ranks stop together: a Ctrl-C on any rank and rank 0's clock
            // are agreed on before each step (a host all-reduce, no device sync).
            let mut flags = [
                f64::from(u8::from(crate::interrupt::requested())),
                f64::from(u8::from(
                    lead && self.cfg.time_limit > 0.0 && elapsed(&start) >= self.cfg.time_limit,
                )),
            ];
            if multi {
                crate::dist::all_reduce_f64(&mut flags, crate::dist::Op::Max)?;
            }
            if flags[1] > 0.0 {
                progress.line(
                    &self.run,
                    &format!("time budget of {} s reached at step {step}", self.cfg.time_limit),
                );
                break;
            }
            if flags[0] > 0.0 {
                failure = Some("interrupted (Ctrl-C)".into());
                break;
            }
            let lr = schedule.lr(self.opt.cfg.lr, step, epoch);
            self.opt.lr = lr;
            let mut step_loss: Option<Tensor> = None;
            // Forward and backward over the micro-batches of this step.
            let mut micro = 0;
            while micro < self.cfg.grad_accum {
                let batch = self.data.next_batch()?;
                if let (None, Some((x, _))) = (&sample_shape, &batch) {
                    sample_shape = Some(x.size()[1..].to_vec());
                }
                let Some((x, y)) = batch else {
                    // End of an epoch (epoch-based data).
                    epoch += 1;
                    if eval_every == 0 {
                        let m = self.evaluate(tiering.as_ref())?;
                        self.record_eval(
                            &mut tracker,
                            &mut progress,
                            step,
                            epoch,
                            &m,
                            &mut best,
                            &mut last_eval,
                            &start,
                            elapsed_before,
                            items_done,
                            total,
                        )?;
                    }
                    if self.cfg.steps == 0 && self.cfg.epochs > 0 && epoch >= self.cfg.epochs {
                        break 'outer;
                    }
                    self.data.new_epoch()?;
                    if micro == 0 {
                        // Epoch schedules change at epoch boundaries.
                        self.opt.lr = schedule.lr(self.opt.cfg.lr, step, epoch);
                        // Without a step interval, every epoch end is a
                        // checkpoint: a killed epoch-based run resumes there.
                        if self.cfg.checkpoint_every == 0 && step > 0 {
                            let p = progress_state(&best, &last_eval, elapsed(&start), items_done, total);
                            let p = with_tiering(p, tiering.as_ref());
                            self.save("last", step, epoch, &p)?;
                        }
                    }
                    continue;
                };
                let n_items = match task {
                    Task::LanguageModel { .. } => x.numel() as f64,
                    Task::Classify { .. } => x.size()[0] as f64,
                };
                // Each rank trains on its rows of the global batch, its loss
                // weighted by its share, so the summed gradient is the mean's.
                let (x, y, share) = if multi {
                    let n = x.size()[0];
                    if n < world {
                        bail!("train: a batch of {n} cannot be split over {world} ranks (batch size < world size)");
                    }
                    let (lo, len) = crate::dist::shard(n, crate::dist::rank(), world);
                    let x = x.f_narrow(0, lo, len).map_err(te)?;
                    let y = y.f_narrow(0, lo, len).map_err(te)?;
                    (x, y, len as f64 / n as f64)
                } else {
                    (x, y, 1.0)
                };
                let x = x.f_to_device(device).map_err(te)?;
                let y = y.f_to_device(device).map_err(te)?;
                // The cross-entropy without logits where the model has it
                // (crate::loss); a custom loss or forward hooks need them.
                let hooks = fwd_chain(self.fwd_hooks, tiering.as_ref());
                let fused = self.cfg.fused_loss && self.loss_fn.is_none() && hooks.is_none();
                let fused_loss = match fused {
                    true => with_amp(amp, || self.model.train_loss(&x, &y))?,
                    false => None,
                };
                let (logits, loss) = match fused_loss {
                    Some(Ok(l)) => (None, l),
                    Some(Err(e)) => {
                        failure = Some(torch_error(&e));
                        break 'outer;
                    }
                    None => {
                        let hooks = hooks.as_ref().map(|c| c as &dyn crate::hooks::Hooks);
                        let out = with_amp(amp, || self.model.forward_hooked(&x, true, hooks))?;
                        if let Some(t) = &tiering {
                            t.end_forward()?;
                        }
                        let logits = match out {
                            Ok(l) => l,
                            Err(e) => {
                                failure = Some(torch_error(&e));
                                break 'outer;
                            }
                        };
                        let loss = match self.loss_fn {
                            Some(f) => match f(&logits, &y).and_then(scalar_loss) {
                                Ok(l) => l,
                                Err(e) => {
                                    failure =
                                        Some(format!("the loss function failed at step {}: {e:#}", step + 1));
                                    break 'outer;
                                }
                            },
                            None => {
                                cross_entropy(&logits.f_to_kind(Kind::Float).map_err(te)?, &y).map_err(te)?
                            }
                        };
                        (Some(logits), loss)
                    }
                };
                let scaled = loss.f_div_scalar(self.cfg.grad_accum as f64).map_err(te)?;
                let scaled = if multi { scaled.f_mul_scalar(share).map_err(te)? } else { scaled };
                // Auxiliary terms (RA balance, routing penalty) train the
                // model; the logged train loss stays the cross-entropy.
                let objective = match self.model.take_aux_loss() {
                    Some(aux) => scaled
                        .f_add(&aux.f_div_scalar(self.cfg.grad_accum as f64 / share).map_err(te)?)
                        .map_err(te)?,
                    None => scaled.shallow_clone(),
                };
                let objective = match &self.opt.scaler {
                    Some(sc) => sc.scale_loss(&objective).map_err(te)?,
                    None => objective,
                };
                if let Err(e) = objective.f_backward() {
                    failure = Some(torch_error(&e));
                    break 'outer;
                }
                let l = scaled.f_detach().map_err(te)?;
                step_loss = Some(match step_loss.take() {
                    None => l.shallow_clone(),
                    Some(a) => a.f_add(&l).map_err(te)?,
                });
                loss_acc = Some(match loss_acc {
                    None => l,
                    Some(a) => a.f_add(&l).map_err(te)?,
                });
                if let (Task::Classify { .. }, Some(logits)) = (task, &logits) {
                    let hits = tch::no_grad(|| {
                        logits
                            .f_argmax(-1, false)
                            .and_then(|p| p.f_eq_tensor(&y))
                            .and_then(|e| e.f_sum(Kind::Int64))
                    });
                    let hits = hits.map_err(te)?;
                    acc_hits = Some(match acc_hits {
                        None => hits,
                        Some(a) => a.f_add(&hits).map_err(te)?,
                    });
                    acc_count += y.size()[0];
                }
                window_items += n_items;
                items_done += n_items;
                micro += 1;
            }
            // Only the last micro-step's gradients travel between ranks.
            if dist {
                self.all_reduce_grads()?;
            }
            // The optimizer step, with hooks around it; skipped (as
            // GradScaler does) when scaled float16 gradients overflowed.
            step += 1;
            let stepped = match &self.opt.scaler {
                Some(sc) => sc.unscale(self.model.store()).map_err(te)?,
                None => true,
            };
            let report = if stepped {
                let mut ctx = StepCtx {
                    step,
                    total_steps: total,
                    steps_per_epoch: per_epoch,
                    store: self.model.store(),
                    opt: self.opt,
                    loss: step_loss.as_ref(),
                };
                for h in self.hooks.iter_mut() {
                    h.before_step(&mut ctx)?;
                }
                let report = ctx.opt.step(ctx.store)?;
                for h in self.hooks.iter_mut() {
                    h.after_step(&mut ctx)?;
                }
                if let Some(t) = &tiering {
                    // Tiers come from the moments once the warm-up filled
                    // them, at the first step taken from then on (fp16
                    // may skip one); real mode's host copies follow the
                    // update (an assignment refreshes them itself).
                    if t.due(step, assign_at) {
                        let dir = lead.then_some(self.run.path.as_path());
                        if let Err(e) = t.assign(ctx.store, ctx.opt, step, dir) {
                            failure = Some(format!("tiering at step {step}: {e:#}"));
                            break 'outer;
                        }
                        if let Some(a) = t.assignment() {
                            let [h, c, d] = a.counts;
                            let msg = format!("tiering at step {step}: {h} modules in HBM, {c} CPU, {d} SSD");
                            progress.line(&self.run, &msg);
                        }
                    } else if let Err(e) = t.refresh_host() {
                        failure = Some(format!("tiering at step {step}: {e:#}"));
                        break 'outer;
                    }
                }
                report
            } else {
                crate::optim::StepReport { grad_norm: None, lr: self.opt.lr, spike: false, reset: false }
            };
            if let Some(sc) = self.opt.scaler.as_mut() {
                sc.update(stepped);
            }
            self.model.store().zero_grad()?;
            window_steps += 1;
            crate::testhook::point("step");
            // Budget in time only: fix the schedule's length once step time is known.
            if total == 0 && step == 20.min((self.cfg.time_limit / 10.0).max(1.0) as i64).max(5) {
                let per_step = start.elapsed().as_secs_f64() / step as f64;
                let remaining = (self.cfg.time_limit - elapsed(&start)).max(0.0);
                total = step + (remaining / per_step) as i64;
                if multi {
                    // One schedule for all ranks: the slowest rank's estimate.
                    let mut t = [total as f64];
                    crate::dist::all_reduce_f64(&mut t, crate::dist::Op::Min)?;
                    total = t[0] as i64;
                }
                schedule = self.schedule(total.max(1));
                progress.line(
                    &self.run,
                    &format!("time budget: about {total} steps at {:.1} ms/step", per_step * 1e3),
                );
            }
            // Logging (the only host synchronisation in the loop).
            if step % self.cfg.log_every == 0 || step == total {
                if multi {
                    // Every rank logged its weighted share: the sums are global.
                    for t in [loss_acc.as_ref(), acc_hits.as_ref()].into_iter().flatten() {
                        crate::dist::all_reduce(t, crate::dist::Op::Sum)?;
                    }
                    let mut c = [acc_count as f64];
                    crate::dist::all_reduce_f64(&mut c, crate::dist::Op::Sum)?;
                    acc_count = c[0] as i64;
                }
                let train_loss = loss_acc.take().map(|t| t.f_double_value(&[])).transpose().map_err(te)?;
                let train_loss = train_loss.map(|l| l * 1.0 / window_steps.max(1) as f64);
                if let Some(l) = train_loss {
                    if !l.is_finite() {
                        failure = Some(format!(
                            "loss is {l} at step {step}; stopped (the last good checkpoint is kept)"
                        ));
                        break;
                    }
                }
                last_train_loss = train_loss;
                let secs = window_start.elapsed().as_secs_f64();
                let mut rec = Map::new();
                rec.insert("step".into(), json!(step));
                rec.insert("epoch".into(), json!(epoch));
                if let Some(l) = train_loss {
                    rec.insert("train_loss".into(), json!(l));
                    if let Task::LanguageModel { .. } = task {
                        rec.insert("train_ppl".into(), json!(perplexity(l)));
                    }
                }
                if let Some(h) = acc_hits.take() {
                    let hits = h.f_int64_value(&[]).map_err(te)?;
                    rec.insert("train_acc".into(), json!(hits as f64 / acc_count.max(1) as f64));
                    acc_count = 0;
                }
                rec.insert("lr".into(), json!(report.lr));
                if let Some(sc) = &self.opt.scaler {
                    rec.insert("loss_scale".into(), json!(sc.scale));
                    rec.insert("skipped_steps".into(), json!(sc.skipped));
                }
                if let Some(g) = &report.grad_norm {
                    rec.insert("grad_norm".into(), json!(g.f_double_value(&[]).map_err(te)?));
                }
                rec.insert("step_ms".into(), json!(secs * 1e3 / window_steps.max(1) as f64));
                rec.insert(unit.into(), json!(window_items / secs.max(1e-9)));
                if let Some(mb) = peak_mem_mb(device) {
                    rec.insert("peak_mem_mb".into(), json!(mb));
                }
                rec.insert("elapsed_s".into(), json!(elapsed(&start)));
                if let Some(m) = &monitor {
                    rec.extend(m.take_window());
                }
                for h in self.hooks.iter_mut() {
                    rec.extend(h.metrics()?);
                }
                if let Some(t) = &tiering {
                    rec.extend(t.take_window(window_steps));
                }
                tracker.log(&rec)?;
                let line = format_record(&rec);
                if matches!(progress.mode, "bar" | "sink") {
                    progress.bar(step, total, &line);
                } else {
                    progress.line(&self.run, &line);
                }
                window_start = Instant::now();
                window_items = 0.0;
                window_steps = 0;
            }
            let at_eval = eval_every > 0 && step % eval_every == 0;
            if at_eval {
                let m = self.evaluate(tiering.as_ref())?;
                self.record_eval(
                    &mut tracker,
                    &mut progress,
                    step,
                    epoch,
                    &m,
                    &mut best,
                    &mut last_eval,
                    &start,
                    elapsed_before,
                    items_done,
                    total,
                )?;
            }
            let ck_every = self.cfg.checkpoint_every;
            if (ck_every > 0 && step % ck_every == 0) || (ck_every == 0 && at_eval) {
                let p = progress_state(&best, &last_eval, elapsed(&start), items_done, total);
                let p = with_tiering(p, tiering.as_ref());
                self.save("last", step, epoch, &p)?;
            }
            if self.cfg.stop_after > 0 && step >= self.cfg.stop_after {
                stopped_early = true;
                break;
            }
            if let Some(why) = self.hooks.iter_mut().find_map(|h| h.stop()) {
                progress.line(&self.run, &format!("stopped at step {step}: {why}"));
                stop_reason = Some(why);
                break;
            }
        }
        progress.finish();
        let secs = elapsed(&start);
        if stopped_early {
            // Simulated crash: leave the run as a killed process would.
            return self.summary(
                Status::Running,
                Some("stopped early".into()),
                step,
                epoch,
                secs,
                items_done,
                &last_eval,
                &best,
                last_train_loss,
                device,
            );
        }
        if let Some(reason) = failure {
            let status = if reason.starts_with("interrupted") { Status::Interrupted } else { Status::Failed };
            progress.line(
                &self.run,
                &format!("run {}: {reason}", if status == Status::Failed { "failed" } else { "interrupted" }),
            );
            if status == Status::Interrupted && step > 0 {
                let p = progress_state(&best, &last_eval, secs, items_done, total);
                let p = with_tiering(p, tiering.as_ref());
                self.save("last", step, epoch, &p)?;
            }
            if lead {
                self.run.set_status(status, Some(&reason))?;
            }
            let mut s = self.summary(
                status,
                Some(reason),
                step,
                epoch,
                secs,
                items_done,
                &last_eval,
                &best,
                last_train_loss,
                device,
            )?;
            if let Some(m) = monitor.take() {
                finish_monitor(m, &mut progress, &self.run, &mut s.extra);
            }
            if let Some(t) = &tiering {
                s.extra
                    .insert("tiering".into(), tiering_summary(t, step, assign_at, &mut progress, &self.run));
            }
            let name = if status == Status::Failed { "failed" } else { "interrupted" };
            tracker.finish(&serde_json::to_value(&s)?, name)?;
            return Ok(s);
        }
        // Final evaluation unless the last step just had one.
        let evaluated_now = last_eval.get("step").and_then(Value::as_i64) == Some(step);
        if !evaluated_now {
            let m = self.evaluate(tiering.as_ref())?;
            self.record_eval(
                &mut tracker,
                &mut progress,
                step,
                epoch,
                &m,
                &mut best,
                &mut last_eval,
                &start,
                elapsed_before,
                items_done,
                total,
            )?;
        }
        let p = progress_state(&best, &last_eval, secs, items_done, total);
        let p = with_tiering(p, tiering.as_ref());
        self.save("last", step, epoch, &p)?;
        let inference = self.inference_test(sample_shape, &mut progress);
        let kv_eval = self.kv_prune_eval(&mut progress);
        let mut s = self.summary(
            Status::Done,
            stop_reason,
            step,
            epoch,
            secs,
            items_done,
            &last_eval,
            &best,
            last_train_loss,
            device,
        )?;
        if let Some(m) = monitor.take() {
            finish_monitor(m, &mut progress, &self.run, &mut s.extra);
        }
        if let Some(t) = &tiering {
            s.extra.insert("tiering".into(), tiering_summary(t, step, assign_at, &mut progress, &self.run));
        }
        if let Some(report) = inference {
            s.extra.extend(crate::inference::headline(&report));
            if lead {
                crate::runs::write_atomic(
                    &self.run.path.join("inference.json"),
                    &serde_json::to_vec_pretty(&report)?,
                )?;
            }
        }
        if let Some(report) = kv_eval {
            s.extra.extend(crate::decode::kveval::headline(&report));
            if lead {
                crate::runs::write_atomic(
                    &self.run.path.join("kv_prune.json"),
                    &serde_json::to_vec_pretty(&report)?,
                )?;
            }
        }
        tracker.finish(&serde_json::to_value(&s)?, "done")?;
        if lead {
            self.run.set_status(Status::Done, None)?;
        }
        progress.line(&self.run, &format!("done: {}", format_record(&s.final_metrics)));
        Ok(s)
    }

    /// The inference test of a completed image-model run, if configured;
    /// its failure is reported but does not fail the trained run.
    fn inference_test(&mut self, sample: Option<Vec<i64>>, progress: &mut Progress) -> Option<Value> {
        let cfg = self.cfg.inference.clone()?;
        if !matches!(self.model.task(), Task::Classify { .. }) {
            progress.line(&self.run, "inference test: image models only (GPT-2: the decode benchmark)");
            return None;
        }
        let sample = match sample {
            Some(s) => Some(s),
            None => {
                // A resumed run that had no step left: the evaluation data's shape.
                let mut first = None;
                let _ = self.data.for_each_eval(&mut |x, _| {
                    first.get_or_insert_with(|| x.size()[1..].to_vec());
                    Ok(())
                });
                first
            }
        };
        let report = sample
            .ok_or_else(|| anyhow!("no input to take the sample shape from"))
            .and_then(|s| crate::inference::measure(&*self.model, &s, &cfg));
        match report {
            Ok(r) => {
                let h = crate::inference::headline(&r);
                progress.line(&self.run, &format!("inference test: {}", format_record(&h)));
                Some(r)
            }
            Err(e) => {
                progress.line(&self.run, &format!("inference test failed: {e:#}"));
                None
            }
        }
    }

    /// The KV-pruning evaluation of a completed GPT-2 run, if configured;
    /// like the inference test, its failure is reported but does not fail
    /// the trained run.
    fn kv_prune_eval(&mut self, progress: &mut Progress) -> Option<Value> {
        let cfg = self.cfg.kv_prune_eval.clone()?;
        let report = (|| -> Result<Value> {
            let g = self
                .model
                .as_any()
                .and_then(|a| a.downcast_ref::<crate::models::gpt2::Gpt2>())
                .ok_or_else(|| anyhow!("GPT-2 models only"))?;
            // Held-out rows: the scored ones first, then those the
            // reconstructor is fitted on (disjoint).
            let need = cfg.rows_needed();
            let mut rows: Vec<Tensor> = Vec::new();
            let mut have = 0;
            self.data.for_each_eval(&mut |x, _| {
                if have < need {
                    let take = (need - have).min(x.size()[0]);
                    rows.push(x.f_narrow(0, 0, take).map_err(|e| anyhow!(torch_error(&e)))?);
                    have += take;
                }
                Ok(())
            })?;
            if have < need {
                bail!(
                    "{need} held-out sequences needed ({} scored{}), the evaluation data has {have}",
                    cfg.seqs,
                    if cfg.recon { format!(" + {} to fit on", cfg.recon_seqs) } else { String::new() }
                );
            }
            let all = Tensor::f_cat(&rows, 0).map_err(|e| anyhow!(torch_error(&e)))?;
            let scored = all.f_narrow(0, 0, cfg.seqs).map_err(|e| anyhow!(torch_error(&e)))?;
            let fit = if cfg.recon {
                Some(all.f_narrow(0, cfg.seqs, cfg.recon_seqs).map_err(|e| anyhow!(torch_error(&e)))?)
            } else {
                None
            };
            crate::decode::kveval::run(g, &scored, fit.as_ref(), &cfg)
        })();
        match report {
            Ok(r) => {
                let h = crate::decode::kveval::headline(&r);
                progress.line(&self.run, &format!("kv prune eval: {}", format_record(&h)));
                Some(r)
            }
            Err(e) => {
                progress.line(&self.run, &format!("kv prune eval skipped: {e:#}"));
                None
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn record_eval(
        &mut self,
        tracker: &mut Tracker,
        progress: &mut Progress,
        step: i64,
        epoch: i64,
        m: &Map<String, Value>,
        best: &mut Map<String, Value>,
        last_eval: &mut Map<String, Value>,
        start: &Instant,
        elapsed_before: f64,
        items: f64,
        total: i64,
    ) -> Result<()> {
        let mut rec = Map::new();
        rec.insert("step".into(), json!(step));
        rec.insert("epoch".into(), json!(epoch));
        rec.extend(m.clone());
        for h in self.hooks.iter_mut() {
            rec.extend(h.metrics()?);
        }
        for h in self.hooks.iter_mut() {
            let extra = h.on_eval(step, &rec)?;
            rec.extend(extra);
        }
        tracker.log(&rec)?;
        progress.line(&self.run, &format!("eval {}", format_record(&rec)));
        *last_eval = rec.clone();
        if self.better(m, best) {
            *best = rec;
            let p =
                progress_state(best, last_eval, elapsed_before + start.elapsed().as_secs_f64(), items, total);
            self.save("best", step, epoch, &p)?;
        }
        Ok(())
    }

    /// A GPU monitor into the run folder on CUDA (`gpu_monitor_ms` > 0),
    /// or None, saying why where a GPU should have been monitored.
    fn gpu_monitor(&self, device: Device, progress: &mut Progress) -> Option<crate::gpumon::Monitor> {
        let Device::Cuda(i) = device else { return None };
        if self.cfg.gpu_monitor_ms <= 0 {
            return None;
        }
        let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
        let started = match crate::nvml::nvml_index(i, visible.as_deref()) {
            Some(idx) => crate::gpumon::Monitor::start_nvml(
                &self.run.path,
                idx,
                std::time::Duration::from_millis(self.cfg.gpu_monitor_ms as u64),
            ),
            None => Err(format!("CUDA_VISIBLE_DEVICES={} names no NVML index", visible.unwrap_or_default())),
        };
        started.map_err(|e| progress.line(&self.run, &format!("warning: GPU not monitored: {e}"))).ok()
    }

    #[allow(clippy::too_many_arguments)]
    fn summary(
        &mut self,
        status: Status,
        reason: Option<String>,
        step: i64,
        epoch: i64,
        secs: f64,
        items: f64,
        last_eval: &Map<String, Value>,
        best: &Map<String, Value>,
        train_loss: Option<f64>,
        device: Device,
    ) -> Result<Summary> {
        let mut extra = Map::new();
        for h in self.hooks.iter_mut() {
            extra.extend(h.summary(self.model.store())?);
        }
        let per_epoch = self.data.batches_per_epoch().map(|b| (b / self.cfg.grad_accum).max(1));
        let epochs = match per_epoch {
            Some(b) if self.cfg.steps > 0 => step as f64 / b as f64,
            _ => epoch as f64,
        };
        let unit = if matches!(self.model.task(), Task::LanguageModel { .. }) {
            "tokens_per_s"
        } else {
            "samples_per_s"
        };
        Ok(Summary {
            status,
            reason,
            steps: step,
            epochs,
            elapsed_s: secs,
            final_metrics: last_eval.clone(),
            best_metrics: best.clone(),
            train_loss,
            throughput: items / secs.max(1e-9),
            throughput_unit: unit.into(),
            peak_mem_mb: peak_mem_mb(device),
            extra,
        })
    }
}

/// The tiers in a checkpoint's progress state, so a resumed run keeps them.
fn with_tiering(mut p: Value, t: Option<&crate::tiering::Tiering>) -> Value {
    if let (Some(t), Some(o)) = (t, p.as_object_mut()) {
        o.insert("tiering".into(), t.state());
    }
    p
}

/// Tiering's summary; a run that ended before the assignment says so.
fn tiering_summary(
    t: &crate::tiering::Tiering,
    step: i64,
    assign_at: i64,
    progress: &mut Progress,
    run: &RunDir,
) -> Value {
    let mut s = t.summary();
    if !t.active() {
        let msg = format!("tiering never assigned: the run ended at step {step} before step {assign_at}");
        progress.line(run, &msg);
        s["never_assigned"] = json!(msg);
    }
    s
}

fn progress_state(
    best: &Map<String, Value>,
    last_eval: &Map<String, Value>,
    elapsed: f64,
    items: f64,
    total: i64,
) -> Value {
    json!({ "best": best, "last_eval": last_eval, "elapsed_s": elapsed, "items": items, "total_steps": total })
}

/// Stop the GPU monitor: its summary into `extra`, and its first error
/// (a failed sample or write) reported and kept as `gpu_monitor_error`.
fn finish_monitor(
    m: crate::gpumon::Monitor,
    progress: &mut Progress,
    run: &RunDir,
    extra: &mut Map<String, Value>,
) {
    if let Some(e) = m.error() {
        progress.line(run, &format!("warning: GPU monitoring: {e}"));
        extra.insert("gpu_monitor_error".into(), json!(e));
    }
    extra.extend(m.stop());
}

fn peak_mem_mb(device: Device) -> Option<f64> {
    match device {
        Device::Cuda(i) => {
            crate::shim::memory_stats(i).ok().map(|s| s.peak_allocated as f64 / (1 << 20) as f64)
        }
        _ => None,
    }
}

/// The caller's hook points and tiering's (once tiers are assigned), or
/// None when neither is there (the fused loss needs no hooks).
fn fwd_chain<'h>(
    user: Option<&'h dyn crate::hooks::Hooks>,
    tiering: Option<&'h crate::tiering::Tiering>,
) -> Option<crate::hooks::Chain<'h>> {
    let tier = tiering.filter(|t| t.active()).map(|t| t as &dyn crate::hooks::Hooks);
    let all: Vec<&dyn crate::hooks::Hooks> = user.into_iter().chain(tier).collect();
    (!all.is_empty()).then_some(crate::hooks::Chain(all))
}

/// `step 120 | train_loss 2.3456 | lr 3.0e-4 | ...` for logs and the bar.
pub fn format_record(rec: &Map<String, Value>) -> String {
    rec.iter()
        .map(|(k, v)| match v {
            Value::Number(n) if n.is_f64() => {
                let x = n.as_f64().unwrap_or(0.0);
                let s = if x != 0.0 && (x.abs() < 1e-3 || x.abs() >= 1e5) {
                    format!("{x:.3e}")
                } else {
                    format!("{x:.4}")
                };
                format!("{k} {s}")
            }
            other => format!("{k} {other}"),
        })
        .collect::<Vec<_>>()
        .join(" | ")
}
