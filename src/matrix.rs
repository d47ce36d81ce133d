//! The test matrix: what `make` runs. The configuration's models x
//! optimizers x pruning methods x sparsities x variants become cells, each
//! with a stable id and a run directory under `runs/<project>/<cell-id>/`.
//! Cells run as child processes (`knlp cell ...`), so one cell's crash,
//! NaN or out-of-memory error fails that cell alone; `PARALLEL_JOBS` run at
//! once, one per GPU when there are several. `knlp continue` picks a matrix
//! up after a crash: done cells are skipped, interrupted cells resume from
//! their last checkpoint, cells never started run.
use std::collections::VecDeque;
use std::fs;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tch::Device;

use crate::config::Experiment;
use crate::data::{self, Loader, LoaderOptions, Split};
use crate::models::{self, Model};
use crate::optim::{OptConfig, OptKind, Optimizer};
use crate::prune::{PruneConfig, PruneHook, Pruner};
use crate::runs::{hostname, RunDir, Status};
use crate::train::feed::{ImageFeed, TextFeed};
use crate::train::{Data, Hook, Summary, TrainConfig, Trainer};

pub const MATRIX_FILE: &str = "matrix.json";
/// CPU threads of a cell when several run at once and `CPU_THREADS` is 0
/// (auto): the cores divided among the running cells.
pub const CELL_THREADS_ENV: &str = "KNLP_CELL_THREADS";

/// One run of the matrix.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Cell {
    pub id: String,
    pub model: String,
    pub optimizer: String,
    pub pruning: String,
    pub variant: Option<String>,
    pub sparsity: f64,
    /// GPT-2 attention variant or ablation step (the attention axis).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention: Option<String>,
    /// Image tokenizer (the tokenizer axis; None: the images as they are).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
    /// The cell's own experiment, when it differs from the matrix's (a
    /// sweep's cells each carry their configuration's); None: the matrix's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experiment: Option<Box<Experiment>>,
}

impl Cell {
    /// The experiment this cell runs: its own, else the matrix's `shared` one.
    pub fn experiment<'a>(&'a self, shared: &'a Experiment) -> &'a Experiment {
        self.experiment.as_deref().unwrap_or(shared)
    }
}

/// The stable id of a cell: `<model>_<optimizer>_<pruning>[-<variant>][_<pct>]`.
pub fn cell_id(model: &str, optimizer: &str, pruning: &str, variant: Option<&str>, sparsity: f64) -> String {
    let mut id = format!("{model}_{optimizer}_{pruning}");
    if let Some(v) = variant {
        id.push('-');
        id.push_str(v);
    }
    if pruning != "none" {
        id.push_str(&format!("_{}", (sparsity * 100.0).round() as i64));
    }
    id
}

/// Expand the configuration into cells. AdamWPrune pairs only with state
/// pruning, and state pruning only with AdamWPrune.
pub fn cells(exp: &Experiment) -> Result<Vec<Cell>> {
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for model in &exp.models {
        // GPT-2 cells multiply by the attention axis; a lone `mha` keeps the plain ids.
        let atts: Vec<Option<String>> = match exp.attentions.as_slice() {
            a if model != "gpt2"
                || a.is_empty()
                || (a.len() == 1 && a[0].id == "mha" && a[0].lr.is_none()) =>
            {
                vec![None]
            }
            a => a.iter().map(|x| Some(x.id.clone())).collect(),
        };
        // Image models multiply by the tokenizer axis; `none` alone keeps the plain ids.
        if let Some(t) =
            exp.tokenizers.iter().find(|t| !crate::tokenizer::train::METHODS.iter().any(|(_, m)| m == t))
        {
            bail!("unknown tokenizer '{t}' (none, pca, spline_pca)");
        }
        let toks: Vec<Option<String>> = match exp.tokenizers.as_slice() {
            t if model == "gpt2" || t.is_empty() || t == ["none"] => vec![None],
            t => t.iter().map(|x| (x != "none").then(|| x.clone())).collect(),
        };
        let axes = atts.iter().flat_map(|a| toks.iter().map(move |t| (a, t)));
        for (att, tok) in axes {
            let shown = match (att, tok) {
                (Some(a), None) => format!("{model}-{a}"),
                (Some(a), Some(t)) => format!("{model}-{a}-{t}"),
                (None, Some(t)) => format!("{model}-{t}"),
                (None, None) => model.clone(),
            };
            for opt in &exp.optimizers {
                for pr in &exp.pruning {
                    let prune_opt = opt == "adamwprune";
                    if prune_opt != (pr == "state") {
                        skipped.push(format!("{opt}+{pr}"));
                        continue;
                    }
                    let cell = |variant: Option<String>, sparsity: f64| Cell {
                        id: cell_id(&shown, opt, pr, variant.as_deref(), sparsity),
                        model: model.clone(),
                        optimizer: opt.clone(),
                        pruning: pr.clone(),
                        variant,
                        sparsity,
                        attention: att.clone(),
                        tokenizer: tok.clone(),
                        experiment: None,
                    };
                    if pr == "none" {
                        out.push(cell(None, 0.0));
                        continue;
                    }
                    let variants: Vec<Option<String>> = if pr == "state" {
                        exp.variants.iter().cloned().map(Some).collect()
                    } else {
                        vec![None]
                    };
                    for &s in &exp.sparsities {
                        for v in &variants {
                            out.push(cell(v.clone(), s));
                        }
                    }
                }
            }
        }
    }
    skipped.sort();
    skipped.dedup();
    if out.is_empty() {
        let mut why = vec!["the configuration gives no cells".to_string()];
        if exp.models.is_empty() {
            why.push("enable a model".into());
        }
        if exp.optimizers.is_empty() {
            why.push("enable an optimizer".into());
        }
        if exp.pruning.is_empty() {
            why.push("enable a pruning method (or none)".into());
        }
        if exp.pruning.iter().any(|p| p != "none") && exp.sparsities.is_empty() {
            why.push("pick a target sparsity".into());
        }
        if exp.pruning.iter().any(|p| p == "state") && exp.variants.is_empty() {
            why.push("pick an AdamWPrune variant".into());
        }
        if !skipped.is_empty() {
            why.push(format!("skipped pairs: {} (adamwprune runs only with state pruning, state pruning only with adamwprune)", skipped.join(", ")));
        }
        bail!("{}", why.join("; "));
    }
    Ok(out)
}

/// The matrix as recorded in `runs/<project>/matrix.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MatrixFile {
    pub project: String,
    pub created: String,
    /// The `.config` the matrix was made from.
    pub dot_config: String,
    pub experiment: Experiment,
    pub cells: Vec<Cell>,
}

impl MatrixFile {
    pub fn read(project_dir: &Path) -> Result<MatrixFile> {
        let p = project_dir.join(MATRIX_FILE);
        let text = fs::read_to_string(&p).with_context(|| format!("{}: no matrix here", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: not a knlp matrix file", p.display()))
    }

    pub fn write(&self, project_dir: &Path) -> Result<()> {
        let text = serde_json::to_vec_pretty(self)?;
        crate::runs::write_atomic(&project_dir.join(MATRIX_FILE), &text)
    }

    pub fn cell(&self, id: &str) -> Result<&Cell> {
        self.cells.iter().find(|c| c.id == id).ok_or_else(|| {
            let ids: Vec<&str> = self.cells.iter().map(|c| c.id.as_str()).collect();
            anyhow!("no cell '{id}' in project {} (cells: {})", self.project, ids.join(", "))
        })
    }
}

/// One line of what a cell trains and how long (`make dry-run`).
pub fn describe_cell(exp: &Experiment, c: &Cell) -> String {
    let mut what = vec![c.model.clone()];
    if let Some(a) = &c.attention {
        what.push(format!("attention {a}"));
    }
    if let Some(t) = &c.tokenizer {
        what.push(format!("tokenizer {t} (k = {})", exp.tokenizer.components));
    }
    what.push(c.optimizer.clone());
    match (c.pruning.as_str(), &c.variant) {
        ("none", _) => what.push("dense".into()),
        (p, Some(v)) => what.push(format!("{p} pruning ({v}) to {:.0}%", c.sparsity * 100.0)),
        (p, None) => what.push(format!("{p} pruning to {:.0}%", c.sparsity * 100.0)),
    }
    let t = &exp.train;
    let budget = match (t.steps, t.epochs, t.time_limit) {
        (s, _, _) if s > 0 => format!("{s} steps"),
        (_, e, _) if e > 0 => format!("{e} epoch(s)"),
        (_, _, l) => format!("{l} s"),
    };
    let limit = if t.time_limit > 0.0 && (t.steps > 0 || t.epochs > 0) {
        format!(" (at most {} s)", t.time_limit)
    } else {
        String::new()
    };
    format!("{}; {budget}{limit}, batch {}", what.join(", "), exp.data.batch_size)
}

/// The device a cell runs on (CUDA_VISIBLE_DEVICES already narrowed it).
fn device(exp: &Experiment) -> Result<Device> {
    crate::tensor::parse_device_or_auto(&exp.device).map_err(|e| anyhow!(e))
}

/// An image data set and its classes/channels, for image models.
fn image_feed(exp: &Experiment, seed: u64, batch: usize) -> Result<(ImageFeed, i64, i64)> {
    let dir = |default: &str| {
        if exp.data.image_dir.is_empty() {
            PathBuf::from(default)
        } else {
            PathBuf::from(&exp.data.image_dir)
        }
    };
    let (train, test, cifar) = match exp.data.image_dataset.as_str() {
        "fashion_mnist" => {
            let d = dir(data::FASHION_MNIST_DIR);
            (data::fashion_mnist(&d, Split::Train)?, data::fashion_mnist(&d, Split::Test)?, false)
        }
        "cifar10" => {
            let d = dir("data/cifar10");
            (data::cifar10(&d, Split::Train)?, data::cifar10(&d, Split::Test)?, true)
        }
        "cifar100" => {
            let d = dir("data/cifar100");
            let l = data::Cifar100Label::Fine;
            (data::cifar100(&d, Split::Train, l)?, data::cifar100(&d, Split::Test, l)?, true)
        }
        other => bail!("unknown image data set '{other}'"),
    };
    let norm = Some((train.mean.clone(), train.std.clone()));
    let resize = if cifar { None } else { Some(32) };
    let aug = cifar && exp.data.augment;
    let train_opts = LoaderOptions {
        batch_size: batch,
        shuffle: true,
        seed,
        resize,
        crop_padding: if aug { 4 } else { 0 },
        hflip: aug,
        normalize: norm.clone(),
        ..LoaderOptions::default()
    };
    let test_opts = LoaderOptions {
        batch_size: 1000,
        shuffle: false,
        seed,
        resize,
        normalize: norm,
        ..LoaderOptions::default()
    };
    let (classes, channels) = (train.classes as i64, train.shape()[0]);
    let tl = Loader::new(&train, train_opts)?;
    let el = Loader::new(&test, test_opts)?;
    use std::cell::RefCell;
    use std::rc::Rc;
    Ok((
        ImageFeed { train: Rc::new(RefCell::new(tl)), eval: Some(Rc::new(RefCell::new(el))) },
        classes,
        channels,
    ))
}

/// Build the model of `cell` (on the CPU, not finalized).
pub fn build_model(exp: &Experiment, cell: &Cell, classes: i64, channels: i64) -> Result<Box<dyn Model>> {
    let opts = match cell.model.as_str() {
        "gpt2" => {
            let mut o = exp.gpt2.clone();
            if let Some(axis) = attention_axis(exp, cell)? {
                if let (Some(o), Some(extra)) = (o.as_object_mut(), axis.gpt2.as_object()) {
                    o.extend(extra.clone());
                }
            }
            o
        }
        // The matrix feeds 32x32 images: every ResNet gets the CIFAR stem.
        // ResNet-50's default ImageNet stem would reach layer1 at 8x8.
        m if m.starts_with("resnet") => {
            json!({ "classes": classes, "in_channels": channels, "stem": "cifar" })
        }
        _ => json!({ "classes": classes, "in_channels": channels }),
    };
    models::build(&cell.model, opts)
}

/// The attention axis value of a GPT-2 cell (None for plain cells).
pub fn attention_axis<'a>(
    exp: &'a Experiment,
    cell: &Cell,
) -> Result<Option<&'a crate::config::AttentionAxis>> {
    match &cell.attention {
        None => Ok(None),
        Some(id) => {
            exp.attentions.iter().find(|a| &a.id == id).map(Some).ok_or_else(|| {
                anyhow::anyhow!("cell {}: attention '{id}' is not in the configuration", cell.id)
            })
        }
    }
}

/// The optimizer configuration of a cell: the kind's defaults, then the
/// experiment's shared settings (an ablation step fixes its own learning rate).
pub fn opt_config(exp: &Experiment, cell: &Cell) -> Result<OptConfig> {
    let kind =
        if cell.optimizer == "adamwprune" { exp.adamwprune_base } else { OptKind::parse(&cell.optimizer)? };
    let base = OptConfig::for_kind(kind);
    let e = &exp.opt;
    let lr = attention_axis(exp, cell)?.and_then(|a| a.lr).unwrap_or(e.lr);
    // The seed clipped GPT-2 at 1.0 under every optimizer but SGD (spec 3.6).
    let clip_norm = match exp.clip_norm {
        Some(c) => c,
        None if cell.model == "gpt2" && kind != OptKind::Sgd => 1.0,
        None => base.clip_norm,
    };
    let cfg = OptConfig {
        lr,
        clip_norm,
        weight_decay: e.weight_decay,
        beta1: e.beta1,
        beta2: e.beta2,
        eps: e.eps,
        momentum: e.momentum,
        nesterov: e.nesterov,
        fused: e.fused,
        spam: e.spam.clone(),
        sinkgd: e.sinkgd.clone(),
        ..base
    };
    cfg.validate()?;
    Ok(cfg)
}

/// The pruning configuration of a cell (None for dense cells).
pub fn prune_config(exp: &Experiment, cell: &Cell) -> Option<PruneConfig> {
    if cell.pruning == "none" {
        return None;
    }
    let mut p = exp.prune.clone();
    p.method = cell.pruning.clone();
    p.target = cell.sparsity;
    // Magnitude pruning has no variant: record none (not the default
    // state variant, which made magnitude cells look like bitter7).
    p.variant = match cell.pruning.as_str() {
        "state" => cell.variant.clone().unwrap_or_else(|| "bitter7".into()),
        "movement" => exp.prune.variant.clone(),
        _ => String::new(),
    };
    Some(p)
}

/// What a cell needs at run time: data, model, optimizer and pruner.
pub struct Built {
    pub data: Box<dyn Data>,
    pub model: Box<dyn Model>,
    pub opt: Optimizer,
    pub pruner: Option<Pruner>,
    /// The tokenizer axis's hook (checkpointed trajectory, summary).
    pub tokenizer: Option<crate::tokenizer::train::TokenizerHook>,
}

/// Build everything for `cell`; `tiny` shrinks the batch (for `knlp check`).
pub fn build(exp: &Experiment, cell: &Cell, device: Device, tiny: bool) -> Result<Built> {
    tch::manual_seed(exp.seed);
    let batch = if tiny { 2 } else { exp.data.batch_size as usize };
    let (data, classes, channels): (Box<dyn Data>, i64, i64) = if cell.model == "gpt2" {
        let ds = if exp.data.text_dir.is_empty() {
            data::default_text_dataset(&data::default_cache_dir())?
        } else {
            PathBuf::from(&exp.data.text_dir)
        };
        let tokens =
            data::TokenDataset::open(&ds, None, exp.seed as u64).map_err(
                |e| match data::corpus::make_hint(&ds).filter(|_| !ds.join("train.bin").exists()) {
                    Some(hint) => anyhow::anyhow!("{e:#}; {hint}"),
                    None => e,
                },
            )?;
        let block = exp.gpt2.get("block_size").and_then(Value::as_i64).unwrap_or(1024) as usize;
        let block = if tiny { block.min(16) } else { block };
        let evals = if tiny { 1 } else { exp.data.eval_batches as usize };
        let feed = TextFeed::new(std::rc::Rc::new(std::cell::RefCell::new(tokens)), batch, block, evals)?;
        (Box::new(feed), 0, 0)
    } else {
        let (feed, classes, channels) = image_feed(exp, exp.seed as u64, batch)?;
        (Box::new(feed), classes, channels)
    };
    let (data, tokenizer) = match &cell.tokenizer {
        Some(t) => {
            let mut s = exp.tokenizer.clone();
            if tiny {
                s.fit_samples = s.fit_samples.min(s.components.max(2) * 4);
            }
            let (feed, hook) = crate::tokenizer::train::wrap(data, t, &s)?;
            (Box::new(feed) as Box<dyn Data>, Some(hook))
        }
        None => (data, None),
    };
    let mut model = build_model(exp, cell, classes, channels)?;
    model.store_mut().finalize(device)?;
    let opt = Optimizer::new(model.store(), opt_config(exp, cell)?)?;
    let pruner = match prune_config(exp, cell) {
        Some(p) => Some(Pruner::new(model.store(), p)?),
        None => None,
    };
    Ok(Built { data, model, opt, pruner, tokenizer })
}

/// The full record of a cell's configuration (config.json).
fn record(exp: &Experiment, cell: &Cell, b: &Built, train: &TrainConfig, project: &str) -> Value {
    // The experiment is recorded whole in matrix.json; config.json has the resolved parts.
    let cell = Cell { experiment: None, ..cell.clone() };
    json!({
        "arch": b.model.arch(),
        "model": b.model.config(),
        "optimizer": b.opt.cfg,
        "train": train,
        "data": b.data.describe(),
        "pruning": b.pruner.as_ref().map(|p| json!(p.cfg)),
        "cell": cell,
        "project": project,
        "seed": exp.seed,
        "device": exp.device,
    })
}

/// Give a worker process its share of the machine: with several cells at
/// once, the CPU cores divided among them (libtorch's OpenMP pools spin, and
/// processes that each take every core run tens of times slower), and one
/// GPU per cell when there are several (within `CUDA_VISIBLE_DEVICES`).
pub fn place_worker(cmd: &mut Command, slot: usize, jobs: usize, gpus: usize, ranks: usize) {
    if jobs * ranks <= 1 {
        return;
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let per = (cores / (jobs * ranks)).max(1).to_string();
    cmd.env(CELL_THREADS_ENV, &per).env("OMP_NUM_THREADS", &per);
    if gpus > 1 && jobs > 1 {
        // Each running cell gets `ranks` devices of its own (wrapping
        // around when there are fewer).
        let ids: Vec<String> = match std::env::var("CUDA_VISIBLE_DEVICES") {
            Ok(v) if !v.trim().is_empty() => v.split(',').map(|s| s.trim().to_string()).collect(),
            _ => (0..gpus).map(|g| g.to_string()).collect(),
        };
        let mine: Vec<String> = (0..ranks).map(|r| ids[(slot * ranks + r) % ids.len()].clone()).collect();
        cmd.env("CUDA_VISIBLE_DEVICES", mine.join(","));
    }
}

/// libtorch's CPU threads in a worker: `CPU_THREADS` when set, else the
/// share [`place_worker`] gave it, else libtorch's default.
pub fn set_cell_threads(configured: i64) {
    let shared = std::env::var(CELL_THREADS_ENV).ok().and_then(|v| v.parse::<i64>().ok());
    match (configured, shared) {
        (n, _) if n > 0 => tch::set_num_threads(n as i32),
        (_, Some(n)) if n > 0 => tch::set_num_threads(n as i32),
        _ => {}
    }
}

/// `knlp check-config` for one file: it checks out ([`crate::config::check_file`])
/// and describes at least one cell. Returns the number of cells.
pub fn check_file(kconfig: &Path, file: &Path) -> Result<usize> {
    Ok(cells(&crate::config::check_file(kconfig, file)?)?.len())
}

/// Run one cell in this process (what `knlp cell` does).
pub fn run_cell(project_dir: &Path, cell_id: &str, resume: bool) -> Result<Summary> {
    let m = MatrixFile::read(project_dir)?;
    let cell = m.cell(cell_id)?.clone();
    let exp = cell.experiment(&m.experiment);
    set_cell_threads(exp.cpu_threads);
    if exp.deterministic {
        crate::shim::set_deterministic(true).map_err(|e| anyhow!(e))?;
    }
    let dev = device(exp)?;
    let run = RunDir::open(&project_dir.join(&cell.id))?;
    // HYPER_PARAM_AUTO: this cell's batch and accumulation, tried on the device.
    let auto = exp.auto_batch.as_ref().map(|a| auto_batch(exp, &cell, dev, a)).transpose();
    let auto = match auto {
        Ok(a) => a,
        Err(e) => {
            let reason = format!("{e:#}");
            run.log(&format!("cell {}: {reason}", cell.id));
            run.set_status(Status::Failed, Some(&reason))?;
            return Err(e);
        }
    };
    let exp = auto.as_ref().map_or(exp, |a| &a.0);
    let mut b = match build(exp, &cell, dev, false) {
        Ok(b) => b,
        Err(e) => {
            let reason = format!("{e:#}");
            run.log(&format!("cell {}: {reason}", cell.id));
            run.set_status(Status::Failed, Some(&reason))?;
            return Err(e);
        }
    };
    let train = TrainConfig { resume, progress: "lines".into(), ..exp.train.clone() };
    let mut rec = record(exp, &cell, &b, &train, &m.project);
    if let (Some(r), Some((_, why))) = (rec.as_object_mut(), &auto) {
        r.insert("hyperparams".into(), why.clone());
    }
    let mut hook = b.pruner.as_mut().map(|p| PruneHook::new(p, None));
    let mut hooks: Vec<&mut dyn Hook> = Vec::new();
    if let Some(h) = hook.as_mut() {
        hooks.push(h);
    }
    if let Some(t) = b.tokenizer.as_mut() {
        t.save_to = Some(run.path.clone());
        hooks.push(t);
    }
    let tracker = Some(if exp.trackio { "local,trackio" } else { "local" }.to_string());
    let t = Trainer {
        model: &mut *b.model,
        opt: &mut b.opt,
        data: &mut *b.data,
        hooks,
        cfg: train,
        run,
        record: rec,
        tracker,
        fwd_hooks: None,
        loss_fn: None,
    };
    let res = t.run();
    // A set-up error inside the loop (a truncated checkpoint, a bad data
    // file) is the cell's recorded reason, not "exited with status 1".
    if let Err(e) = &res {
        if crate::dist::rank() == 0 {
            let run = RunDir { path: project_dir.join(&cell.id) };
            let reason = format!("{e:#}");
            run.log(&format!("cell {}: {reason}", cell.id));
            let _ = run.set_status(Status::Failed, Some(&reason));
        }
    }
    res
}

/// HYPER_PARAM_AUTO for one cell (`crate::hyperparams`): the experiment
/// with the chosen batch and accumulation, and the record of the choice.
/// On CUDA a training step at the table's batch is tried, halving on out
/// of memory; every rank then takes the smallest batch any rank fits.
fn auto_batch(
    exp: &Experiment,
    cell: &Cell,
    dev: Device,
    a: &crate::hyperparams::AutoBatch,
) -> Result<(Experiment, Value)> {
    use crate::hyperparams as hp;
    let ranks = crate::dist::world_size().max(1);
    let mut c = hp::choose(&cell.model, a, ranks, hp::free_gb(dev)?)?;
    let with = |b: i64, g: i64| {
        let mut e = exp.clone();
        e.data.batch_size = b;
        e.train.grad_accum = g;
        e
    };
    if dev.is_cuda() {
        let amp = match exp.train.amp.as_str() {
            "none" => None,
            "fp16" => Some(crate::shim::AutocastDtype::F16),
            _ => Some(crate::shim::AutocastDtype::BF16),
        };
        hp::probe(&mut c, |batch| {
            let step = (|| -> Result<()> {
                // A projection does not change shapes: probe without the tokenizer's fit.
                let plain = Cell { tokenizer: None, ..cell.clone() };
                let b = build(&with(batch, 1), &plain, dev, false)?;
                let mut data = b.data;
                let (x, y) = data.next_batch()?.ok_or_else(|| anyhow!("no training batch to probe with"))?;
                let te = |e: tch::TchError| anyhow!(crate::tensor::torch_error(&e));
                // Feeds give host tensors; the training loop moves them too.
                let (x, y) = (x.f_to_device(dev).map_err(te)?, y.f_to_device(dev).map_err(te)?);
                let loss = || -> Result<tch::Tensor> {
                    let logits = b.model.forward(&x, true).map_err(te)?;
                    crate::models::cross_entropy(&logits, &y).map_err(te)
                };
                let loss = match amp {
                    Some(d) => crate::shim::with_autocast(d, loss).map_err(|e| anyhow!(e))??,
                    None => loss()?,
                };
                loss.f_backward().map_err(te)?;
                Ok(())
            })();
            let _ = crate::shim::empty_cache();
            match step {
                Ok(()) => Ok(true),
                Err(e) if hp::is_oom(&e) => Ok(false),
                Err(e) => Err(e),
            }
        })?;
        if ranks > 1 {
            let mut v = [c.batch as f64];
            crate::dist::all_reduce_f64(&mut v, crate::dist::Op::Min)?;
            c.batch = v[0] as i64;
            c.grad_accum = (c.per_rank / c.batch).max(1);
            c.record["batch"] = json!(c.batch);
            c.record["grad_accum"] = json!(c.grad_accum);
        }
    } else {
        c.record["probe"] =
            json!("none: the CPU has no allocator limit to find (an OOM would kill the process)");
        c.record["batch"] = json!(c.batch);
        c.record["grad_accum"] = json!(c.grad_accum);
    }
    Ok((with(c.batch, c.grad_accum), c.record))
}

/// `knlp check`: build every cell's model, optimizer and pruner and take one
/// forward/backward/optimizer step with a tiny batch on the CPU.
pub fn check(exp: &Experiment) -> Result<Vec<(String, Result<f64>)>> {
    let mut out = Vec::new();
    for cell in cells(exp)? {
        let res = (|| -> Result<f64> {
            let mut b = build(exp, &cell, Device::Cpu, true)?;
            let (x, y) = b.data.next_batch()?.ok_or_else(|| anyhow!("no training batch"))?;
            let logits = b.model.forward(&x, true).map_err(|e| anyhow!(crate::tensor::torch_error(&e)))?;
            let loss = crate::models::cross_entropy(&logits, &y)
                .map_err(|e| anyhow!(crate::tensor::torch_error(&e)))?;
            loss.f_backward().map_err(|e| anyhow!(crate::tensor::torch_error(&e)))?;
            if let Some(p) = b.pruner.as_mut() {
                p.before_step(b.model.store())?;
            }
            b.opt.step(b.model.store())?;
            if let Some(p) = b.pruner.as_mut() {
                // Exercise scoring and selection on the real shapes.
                let target = p.cfg.target;
                p.update_masks(b.model.store(), Some(&b.opt), target, None)?;
                p.apply(b.model.store())?;
            }
            let l = loss.f_double_value(&[]).map_err(|e| anyhow!(crate::tensor::torch_error(&e)))?;
            if !l.is_finite() {
                bail!("loss is {l}");
            }
            Ok(l)
        })();
        out.push((cell.id, res));
    }
    Ok(out)
}

/// Runs cells as child processes with a bounded number at once.
pub struct Runner {
    pub exe: PathBuf,
    pub project_dir: PathBuf,
    pub jobs: usize,
    pub resume: bool,
    /// Ranks per cell (0: one plain process).
    pub nproc: usize,
    /// Seconds a rank waits for the others (`KNLP_DIST_TIMEOUT` of the ranks).
    pub dist_timeout: i64,
}

struct Running {
    cell: String,
    child: Child,
    slot: usize,
    started: Instant,
}

/// Outcome of one cell as seen by the runner.
#[derive(Debug, Clone)]
pub struct CellResult {
    pub id: String,
    pub status: Status,
    pub reason: Option<String>,
    pub seconds: f64,
}

impl Runner {
    /// Run `ids` (in order), at most `jobs` at once.
    pub fn run(&self, ids: &[String]) -> Result<Vec<CellResult>> {
        let gpus = tch::Cuda::device_count() as usize;
        let mut queue: VecDeque<String> = ids.iter().cloned().collect();
        let mut running: Vec<Running> = Vec::new();
        let mut results = Vec::new();
        let table = self.jobs > 1;
        let tty = std::io::stdout().is_terminal();
        let mut drawn = 0usize;
        let total = ids.len();
        // Cells run in process groups of their own, so the runner alone
        // sees a terminal's Ctrl-C and passes it on once (a second one at a
        // cell would abort it without a checkpoint).
        crate::interrupt::install();
        let mut forwarded = false;
        while !queue.is_empty() || !running.is_empty() {
            if crate::interrupt::requested() {
                if !forwarded {
                    for r in &running {
                        // SAFETY: kill(2) on a child we have not reaped.
                        unsafe {
                            libc::kill(r.child.id() as libc::pid_t, libc::SIGINT);
                        }
                    }
                    forwarded = true;
                }
                queue.clear();
            }
            while running.len() < self.jobs && !queue.is_empty() {
                let id = queue.pop_front().unwrap_or_default();
                let slot = (0..self.jobs).find(|s| !running.iter().any(|r| r.slot == *s)).unwrap_or(0);
                let child = self.spawn(&id, slot, gpus, table)?;
                if !table {
                    println!("=== cell {}/{}: {id}", results.len() + 1, total);
                } else if !tty {
                    println!("started {id}");
                }
                running.push(Running { cell: id, child, slot, started: Instant::now() });
            }
            std::thread::sleep(Duration::from_millis(if table { 500 } else { 100 }));
            let mut i = 0;
            while i < running.len() {
                if let Some(st) = running[i].child.try_wait()? {
                    let r = running.remove(i);
                    let res = self.finished(&r, st);
                    if table && !tty {
                        println!(
                            "{} {}: {}{}",
                            if res.status == Status::Done { "finished" } else { "stopped" },
                            res.id,
                            res.status,
                            res.reason.as_ref().map(|x| format!(" ({x})")).unwrap_or_default()
                        );
                    }
                    results.push(res);
                    crate::testhook::point("cell-done");
                } else {
                    i += 1;
                }
            }
            if table && tty {
                drawn = self.draw(&running, results.len(), total, drawn);
            }
        }
        Ok(results)
    }

    fn spawn(&self, id: &str, slot: usize, gpus: usize, quiet: bool) -> Result<Child> {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("cell").arg(&self.project_dir).arg(id);
        // The runner forwards Ctrl-C; a cell never outlives its runner.
        crate::dist::launch::tie_to_parent(&mut cmd);
        if self.resume {
            cmd.arg("--resume");
        }
        if self.nproc > 0 {
            cmd.arg("--nproc").arg(self.nproc.to_string());
            cmd.env("KNLP_DIST_TIMEOUT", self.dist_timeout.max(1).to_string());
        }
        place_worker(&mut cmd, slot, self.jobs, gpus, self.nproc.max(1));
        if quiet {
            let dir = self.project_dir.join(id);
            fs::create_dir_all(&dir)?;
            let log = fs::File::create(dir.join("output.log"))?;
            cmd.stdout(Stdio::from(log.try_clone()?)).stderr(Stdio::from(log));
        }
        cmd.spawn().with_context(|| format!("cannot start {}", self.exe.display()))
    }

    fn finished(&self, r: &Running, st: std::process::ExitStatus) -> CellResult {
        let run = RunDir { path: self.project_dir.join(&r.cell) };
        let rec = run.status().ok();
        let (mut status, mut reason) = match &rec {
            Some(s) => (s.status, s.reason.clone()),
            None => (Status::Failed, Some("no status".into())),
        };
        if !st.success() && !matches!(status, Status::Failed | Status::Interrupted) {
            // Killed (OOM killer, a signal) before it could record why.
            use std::os::unix::process::ExitStatusExt;
            let (why, st_new) = match (st.signal(), st.code()) {
                (Some(sig), _) => (format!("the cell's process was killed by signal {sig}"), Status::Failed),
                // The launcher passes on 128 + the signal that killed a rank
                // (preemption, the OOM killer): `continue` resumes the cell.
                (None, Some(c)) if self.nproc > 0 && (129..=192).contains(&c) => (
                    format!("a rank was killed by signal {}; `knlp continue` resumes it", c - 128),
                    Status::Interrupted,
                ),
                (None, c) => {
                    (format!("the cell's process exited with status {}", c.unwrap_or(-1)), Status::Failed)
                }
            };
            let _ = run.set_status(st_new, Some(&why));
            status = st_new;
            reason = Some(why);
        }
        CellResult { id: r.cell.clone(), status, reason, seconds: r.started.elapsed().as_secs_f64() }
    }

    /// A status table, one line per running cell, redrawn in place.
    fn draw(&self, running: &[Running], done: usize, total: usize, drawn: usize) -> usize {
        let mut out = String::new();
        if drawn > 0 {
            out.push_str(&format!("\x1b[{drawn}F\x1b[J"));
        }
        out.push_str(&format!("matrix: {done}/{total} cells finished, {} running\n", running.len()));
        for r in running {
            let run = RunDir { path: self.project_dir.join(&r.cell) };
            let last =
                run.metrics().ok().and_then(|m| m.into_iter().rev().find(|x| x.get("train_loss").is_some()));
            let progress = match last {
                Some(x) => format!(
                    "step {} loss {:.4}",
                    x.get("step").and_then(Value::as_i64).unwrap_or(0),
                    x.get("train_loss").and_then(Value::as_f64).unwrap_or(f64::NAN)
                ),
                None => "starting".into(),
            };
            out.push_str(&format!(
                "  {:<44} {:<28} {:>6.0}s\n",
                r.cell,
                progress,
                r.started.elapsed().as_secs_f64()
            ));
        }
        print!("{out}");
        let _ = std::io::stdout().flush();
        running.len() + 1
    }
}

/// Hold `runs/<project>/.lock` while a matrix runs there: one writer per
/// project. The lock names its owner (host, pid and the pid's start time,
/// so a pid reused by an unrelated process is not mistaken for the owner);
/// it is created atomically and removed only by the process that owns it.
pub struct Lock {
    path: PathBuf,
    token: String,
}

/// Start time of a process in clock ticks since boot (`/proc/<pid>/stat`
/// field 22), None when it is gone.
fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn own_token() -> String {
    let pid = std::process::id() as i32;
    format!("pid {pid} start {} host {}\n", start_time(pid).unwrap_or(0), hostname())
}

/// Who holds a lock file: (pid, start time, host); an older lock holds only a pid.
fn parse_token(text: &str) -> Option<(i32, Option<u64>, Option<String>)> {
    let t = text.trim();
    if let Ok(pid) = t.parse::<i32>() {
        return Some((pid, None, None));
    }
    let f: Vec<&str> = t.split_whitespace().collect();
    match f.as_slice() {
        ["pid", pid, "start", st, "host", host] => {
            Some((pid.parse().ok()?, st.parse().ok(), Some(host.to_string())))
        }
        ["pid", pid, "start", st, "host"] => Some((pid.parse().ok()?, st.parse().ok(), Some(String::new()))),
        _ => None,
    }
}

impl Lock {
    pub fn take(project_dir: &Path) -> Result<Lock> {
        fs::create_dir_all(project_dir)?;
        let path = project_dir.join(".lock");
        let token = own_token();
        for _ in 0..3 {
            match fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    f.write_all(token.as_bytes()).with_context(|| format!("{}", path.display()))?;
                    return Ok(Lock { path, token });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e).with_context(|| format!("{}", path.display())),
            }
            let text = fs::read_to_string(&path).unwrap_or_default();
            if text == token {
                // Already ours (a second take by the same process).
                return Ok(Lock { path, token });
            }
            let clear = format!("if no knlp runs there, remove it: rm {}", path.display());
            let Some((pid, start, host)) = parse_token(&text) else {
                bail!(
                    "{}: a lock this knlp cannot read ({:?}); {clear}",
                    path.display(),
                    text.chars().take(80).collect::<String>()
                );
            };
            if let Some(h) = host.as_ref().filter(|h| !h.is_empty() && **h != hostname()) {
                bail!("{} is locked by process {pid} on host {h}; {clear}", project_dir.display());
            }
            let alive = start_time(pid);
            let owner_alive = match (alive, start) {
                (None, _) => false,
                (Some(now), Some(then)) => now == then,
                (Some(_), None) => true,
            };
            if owner_alive {
                bail!(
                    "{} is being run by process {pid}; wait for it to finish or stop it (Ctrl-C, or kill {pid})",
                    project_dir.display()
                );
            }
            eprintln!(
                "knlp: {}: process {pid} that held the lock is gone{}; taking it over",
                project_dir.display(),
                if alive.is_some() { " (its pid now belongs to another process)" } else { "" }
            );
            // Remove only the stale lock we read, not one taken meanwhile.
            if fs::read_to_string(&path).is_ok_and(|t| t == text) {
                let _ = fs::remove_file(&path);
            }
        }
        bail!("{}: could not take the lock (others keep taking it)", path.display())
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // Never remove a lock another process owns (after a move, a takeover).
        if fs::read_to_string(&self.path).is_ok_and(|t| t == self.token) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// What to do with each cell when (re)starting a matrix.
pub fn plan(project_dir: &Path, cells: &[Cell], retry_failed: bool) -> Vec<(String, Status, bool)> {
    cells
        .iter()
        .map(|c| {
            let run = RunDir { path: project_dir.join(&c.id) };
            let st = run.status().map(|s| s.status).unwrap_or(Status::Pending);
            let run_it = match st {
                Status::Done => false,
                Status::Failed => retry_failed,
                _ => true,
            };
            (c.id.clone(), st, run_it)
        })
        .collect()
}

/// A finished baseline run named by `BASELINE=` (`project/cell` under
/// `runs_dir`, or a run folder): its folder and its cell id.
pub fn baseline_run(runs_dir: &Path, spec: &str) -> Result<(PathBuf, String)> {
    let src = {
        let direct = PathBuf::from(spec);
        if direct.join("summary.json").exists() {
            direct
        } else {
            runs_dir.join(spec)
        }
    };
    let run = RunDir { path: src.clone() };
    if !src.join("config.json").exists() {
        bail!("BASELINE={spec}: {} is not a run folder (no config.json)", src.display());
    }
    if run.status()?.status != Status::Done {
        bail!("BASELINE={spec}: the run at {} has not finished", src.display());
    }
    let cfg = run.read_json(crate::runs::CONFIG)?;
    let id = cfg
        .get("cell")
        .and_then(|c| c.get("id"))
        .and_then(Value::as_str)
        .map(String::from)
        .or_else(|| src.file_name().map(|n| n.to_string_lossy().to_string()))
        .ok_or_else(|| anyhow!("BASELINE={spec}: cannot tell its cell"))?;
    Ok((src, id))
}

/// Copy a finished baseline run into the project as `cell`'s run.
pub fn adopt_baseline(runs_dir: &Path, spec: &str, project_dir: &Path, cells: &[Cell]) -> Result<String> {
    let (src, id) = baseline_run(runs_dir, spec)?;
    if !cells.iter().any(|c| c.id == id) {
        let ids: Vec<&str> = cells.iter().map(|c| c.id.as_str()).collect();
        bail!("BASELINE={spec}: its cell '{id}' is not in this matrix (cells: {})", ids.join(", "));
    }
    let dst = project_dir.join(&id);
    if dst.exists() {
        fs::remove_dir_all(&dst)?;
    }
    copy_dir(&src, &dst)?;
    let note = RunDir { path: dst };
    note.log(&format!("copied from baseline {}", src.display()));
    Ok(id)
}

/// Copy a folder recursively.
pub fn copy_dir(src: &Path, dst: &Path) -> Result<()> {
    fs::create_dir_all(dst)?;
    for e in fs::read_dir(src)? {
        let e = e?;
        let to = dst.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &to)?;
        } else {
            fs::copy(e.path(), &to).with_context(|| format!("copying {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// The most recently changed matrix under `runs_dir`.
pub fn latest_project(runs_dir: &Path) -> Result<PathBuf> {
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for e in fs::read_dir(runs_dir).with_context(|| format!("{}: no runs yet", runs_dir.display()))? {
        let p = e?.path();
        let f = p.join(MATRIX_FILE);
        if let Ok(meta) = fs::metadata(&f) {
            let t = meta.modified()?;
            if best.as_ref().is_none_or(|(bt, _)| t > *bt) {
                best = Some((t, p));
            }
        }
    }
    best.map(|(_, p)| p).ok_or_else(|| anyhow!("{}: no matrix has run here yet", runs_dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable() {
        assert_eq!(
            cell_id("lenet5", "adamwprune", "state", Some("bitter7"), 0.7),
            "lenet5_adamwprune_state-bitter7_70"
        );
        assert_eq!(cell_id("lenet5", "adamw", "none", None, 0.0), "lenet5_adamw_none");
        assert_eq!(cell_id("gpt2", "adamw", "magnitude", None, 0.5), "gpt2_adamw_magnitude_50");
    }

    fn lock_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("knlp-lock-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    /// One writer per project: a live owner (by pid and start time) keeps
    /// its lock; a dead one, a reused pid and an old pid-only lock of a dead
    /// process are taken over; nobody removes a lock it does not own.
    #[test]
    fn locks_know_their_owner() {
        let d = lock_dir("owner");
        let lock = d.join(".lock");
        let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = sleeper.id() as i32;
        let start = start_time(pid).unwrap();
        let host = hostname();
        let cases = [
            (format!("pid {pid} start {start} host {host}\n"), false, "a live owner"),
            (format!("{pid}\n"), false, "an old lock of a live pid"),
            (format!("pid {pid} start {} host {host}\n", start + 1), true, "a reused pid"),
            ("pid 2147483646 start 1 host x\n".replace(" x", &format!(" {host}")), true, "a dead owner"),
            ("2147483646\n".to_string(), true, "an old lock of a dead pid"),
            (format!("pid {pid} start {start} host another-host\n"), false, "another host"),
            ("garbage".to_string(), false, "an unreadable lock"),
        ];
        for (text, taken, what) in cases {
            fs::create_dir_all(&d).unwrap();
            fs::write(&lock, &text).unwrap();
            match Lock::take(&d) {
                Ok(l) => {
                    assert!(taken, "{what}: taken over");
                    assert_eq!(fs::read_to_string(&lock).unwrap(), own_token(), "{what}");
                    drop(l);
                    assert!(!lock.exists(), "{what}: released");
                }
                Err(e) => {
                    assert!(!taken, "{what}: refused: {e}");
                    let msg = e.to_string();
                    assert!(msg.contains("rm ") || msg.contains(&pid.to_string()), "{what}: {msg}");
                    assert_eq!(fs::read_to_string(&lock).unwrap(), text, "{what}: the lock is untouched");
                }
            }
        }
        // A lock replaced under its holder is not removed by it.
        fs::remove_file(&lock).unwrap();
        let l = Lock::take(&d).unwrap();
        let theirs = format!("pid {pid} start {start} host {host}\n");
        fs::write(&lock, &theirs).unwrap();
        drop(l);
        assert_eq!(fs::read_to_string(&lock).unwrap(), theirs);
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        let _ = fs::remove_dir_all(&d);
    }
}
