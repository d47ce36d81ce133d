//! The training loop, checkpoints, exact resume and pruning, on a tiny MLP
//! and synthetic data (fast, CPU).
mod dist;

use std::path::PathBuf;

use anyhow::Result;
use knlp::layers::{Linear, Path};
use knlp::models::{Model, Task};
use knlp::optim::{OptConfig, OptKind, Optimizer};
use knlp::params::ParamStore;
use knlp::prune::{PruneConfig, PruneHook, Pruner};
use knlp::runs::{RunDir, Status};
use knlp::train::{Data, TrainConfig, Trainer};
use serde_json::{json, Value};
use tch::{Device, Kind, TchError, Tensor};

/// libtorch's generator is process-global and the tests in this file seed
/// it; they run one at a time so another test cannot draw from it mid-run.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

struct Mlp {
    store: ParamStore,
    l1: Linear,
    l2: Linear,
    dropout: f64,
}

impl Mlp {
    fn new(seed: i64, dropout: f64) -> Mlp {
        tch::manual_seed(seed);
        let mut store = ParamStore::new();
        let l1 = Linear::new(&mut store, &Path::root("l1"), 16, 64, true, None).unwrap();
        let l2 = Linear::new(&mut store, &Path::root("l2"), 64, 4, true, None).unwrap();
        store.finalize(Device::Cpu).unwrap();
        Mlp { store, l1, l2, dropout }
    }
}

impl Model for Mlp {
    fn arch(&self) -> &'static str {
        "mlp"
    }
    fn task(&self) -> Task {
        Task::Classify { classes: 4 }
    }
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor, TchError> {
        let h = self.l1.forward(x)?.f_relu()?.f_dropout(self.dropout, train)?;
        self.l2.forward(&h)
    }
    fn store(&self) -> &ParamStore {
        &self.store
    }
    fn store_mut(&mut self) -> &mut ParamStore {
        &mut self.store
    }
    fn config(&self) -> Value {
        json!({"arch": "mlp"})
    }
}

/// Four Gaussian blobs; epoch-based with a seeded shuffle whose state is saved.
struct Blobs {
    x: Tensor,
    y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    batch: i64,
    pos: i64,
    epoch: i64,
    poison_at: Option<i64>,
    served: i64,
}

impl Blobs {
    fn new() -> Blobs {
        tch::manual_seed(99);
        let centers = Tensor::randn([4, 16], (Kind::Float, Device::Cpu)) * 1.5;
        let make = |n: i64| {
            let y = Tensor::randint(4, [n], (Kind::Int64, Device::Cpu));
            let x = centers.index_select(0, &y) + Tensor::randn([n, 16], (Kind::Float, Device::Cpu));
            (x, y)
        };
        let (x, y) = make(512);
        let (test_x, test_y) = make(256);
        Blobs { x, y, test_x, test_y, batch: 32, pos: 0, epoch: 0, poison_at: None, served: 0 }
    }

    fn order(&self) -> Tensor {
        // The permutation of an epoch is a function of the epoch number.
        let g = Tensor::arange(512, (Kind::Int64, Device::Cpu));
        let key = (&g * 7919 + self.epoch * 104729).remainder(512).argsort(0, false);
        g.index_select(0, &key)
    }
}

impl Data for Blobs {
    fn next_batch(&mut self) -> Result<Option<(Tensor, Tensor)>> {
        if self.pos + self.batch > 512 {
            return Ok(None);
        }
        let idx = self.order().narrow(0, self.pos, self.batch);
        self.pos += self.batch;
        self.served += 1;
        let mut x = self.x.index_select(0, &idx);
        if self.poison_at.is_some_and(|p| self.served >= p) {
            x *= f64::NAN;
        }
        Ok(Some((x, self.y.index_select(0, &idx))))
    }
    fn new_epoch(&mut self) -> Result<()> {
        self.epoch += 1;
        self.pos = 0;
        Ok(())
    }
    fn batches_per_epoch(&self) -> Option<i64> {
        Some(512 / self.batch)
    }
    fn for_each_eval(&mut self, f: &mut dyn FnMut(&Tensor, &Tensor) -> Result<()>) -> Result<()> {
        f(&self.test_x, &self.test_y)
    }
    fn state(&self) -> Value {
        json!({"pos": self.pos, "epoch": self.epoch, "served": self.served})
    }
    fn restore(&mut self, s: &Value) -> Result<()> {
        self.pos = s["pos"].as_i64().unwrap();
        self.epoch = s["epoch"].as_i64().unwrap();
        self.served = s["served"].as_i64().unwrap();
        Ok(())
    }
    fn rewind(&mut self) {
        (self.pos, self.epoch, self.served) = (0, 0, 0);
    }
    fn describe(&self) -> Value {
        json!("blobs")
    }
}

fn run_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("knlp-train-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn cfg(steps: i64) -> TrainConfig {
    TrainConfig {
        steps,
        epochs: 0,
        log_every: 5,
        eval_every: 20,
        progress: "off".into(),
        ..Default::default()
    }
}

fn train(
    m: &mut Mlp,
    data: &mut Blobs,
    opt: &mut Optimizer,
    c: TrainConfig,
    dir: &std::path::Path,
    pruner: Option<&mut Pruner>,
) -> knlp::train::Summary {
    let mut hook = pruner.map(|p| PruneHook::new(p, None));
    let mut hooks: Vec<&mut dyn knlp::train::Hook> = Vec::new();
    if let Some(h) = hook.as_mut() {
        hooks.push(h);
    }
    Trainer {
        model: m,
        opt,
        data,
        hooks,
        cfg: c,
        run: RunDir::open(dir).unwrap(),
        record: json!({}),
        tracker: Some("local".into()),
        fwd_hooks: None,
        loss_fn: None,
    }
    .run()
    .unwrap()
}

fn adamw() -> OptConfig {
    OptConfig { kind: OptKind::AdamW, lr: 1e-2, ..OptConfig::for_kind(OptKind::AdamW) }
}

#[test]
fn trains_and_writes_the_run_directory() {
    let _serial = serial();
    let dir = run_dir("basic");
    let mut m = Mlp::new(0, 0.0);
    let mut data = Blobs::new();
    let mut opt = Optimizer::new(m.store(), adamw()).unwrap();
    let s = train(&mut m, &mut data, &mut opt, cfg(60), &dir, None);
    assert_eq!(s.status, Status::Done);
    assert_eq!(s.steps, 60);
    let acc = s.final_metrics["test_acc"].as_f64().unwrap();
    assert!(acc > 0.9, "blobs are separable: {acc}");
    let run = RunDir::open(&dir).unwrap();
    let recs = run.metrics().unwrap();
    let train_steps: Vec<i64> =
        recs.iter().filter(|r| r.get("train_loss").is_some()).map(|r| r["step"].as_i64().unwrap()).collect();
    assert_eq!(train_steps, (1..=12).map(|i| i * 5).collect::<Vec<_>>());
    let first = recs[0]["train_loss"].as_f64().unwrap();
    let last =
        recs.iter().rev().find(|r| r.get("train_loss").is_some()).unwrap()["train_loss"].as_f64().unwrap();
    assert!(last < first * 0.5, "loss falls: {first} -> {last}");
    for k in ["lr", "step_ms", "samples_per_s", "train_acc", "elapsed_s"] {
        assert!(recs[0].get(k).is_some(), "metric {k} logged");
    }
    for f in [
        "config.json",
        "status.json",
        "summary.json",
        "metrics.jsonl",
        "train.log",
        "checkpoints/last.safetensors",
        "checkpoints/best.safetensors",
        "checkpoints/last.json",
    ] {
        assert!(dir.join(f).exists(), "{f}");
    }
    assert_eq!(run.status().unwrap().status, Status::Done);
}

/// Weights as one flat vector, for exact comparison.
fn weights(m: &Mlp) -> Vec<f32> {
    Vec::<f32>::try_from(&m.store().groups()[0].data).unwrap()
}

/// The defaults of every image preset (no eval or checkpoint interval, an
/// epoch budget): a run killed mid-epoch resumes from the last epoch end.
#[test]
fn epoch_runs_checkpoint_at_epoch_ends_by_default() {
    let _serial = serial();
    let defaults = || TrainConfig { epochs: 3, progress: "off".into(), ..Default::default() };
    assert_eq!((defaults().eval_every, defaults().checkpoint_every, defaults().steps), (0, 0, 0));
    let dir_a = run_dir("epoch-ck-a");
    let mut m = Mlp::new(1, 0.0);
    let mut data = Blobs::new();
    let mut opt = Optimizer::new(m.store(), adamw()).unwrap();
    let a = train(&mut m, &mut data, &mut opt, defaults(), &dir_a, None);
    assert_eq!(a.steps, 48);
    let wa = weights(&m);
    // Killed 5 steps into the second epoch (16 steps each).
    let dir_b = run_dir("epoch-ck-b");
    let mut m = Mlp::new(1, 0.0);
    let mut data = Blobs::new();
    let mut opt = Optimizer::new(m.store(), adamw()).unwrap();
    let half = train(&mut m, &mut data, &mut opt, TrainConfig { stop_after: 21, ..defaults() }, &dir_b, None);
    assert_eq!(half.steps, 21);
    let ck =
        knlp::checkpoint::load(&dir_b.join("checkpoints/last.safetensors")).expect("an epoch-end checkpoint");
    assert_eq!((ck.state.step, ck.state.epoch), (16, 1), "the last checkpoint is the end of epoch 1");
    tch::manual_seed(4321);
    let mut m = Mlp::new(7, 0.0);
    let mut data = Blobs::new();
    let mut opt = Optimizer::new(m.store(), adamw()).unwrap();
    let b = train(&mut m, &mut data, &mut opt, TrainConfig { resume: true, ..defaults() }, &dir_b, None);
    assert_eq!(b.status, Status::Done);
    assert_eq!(b.steps, 48);
    assert_eq!(weights(&m), wa, "resumed from the epoch end, the run ends where the uninterrupted one did");
}

/// A time-only budget starts at the full learning rate, not at min_lr
/// while the step count is still being estimated.
#[test]
fn time_budgets_start_at_the_full_learning_rate() {
    let _serial = serial();
    let dir = run_dir("time-lr");
    let mut m = Mlp::new(1, 0.0);
    let mut data = Blobs::new();
    let mut opt = Optimizer::new(m.store(), adamw()).unwrap();
    let c = TrainConfig {
        steps: 0,
        epochs: 0,
        time_limit: 1.0,
        log_every: 1,
        eval_every: 0,
        schedule: "warmup_cosine".into(),
        min_lr: Some(0.0),
        progress: "off".into(),
        ..Default::default()
    };
    let s = train(&mut m, &mut data, &mut opt, c, &dir, None);
    assert!(s.steps > 5, "{} steps", s.steps);
    let recs = RunDir::open(&dir).unwrap().metrics().unwrap();
    let lr_at = |step: i64| {
        recs.iter()
            .find(|r| r["step"] == step && r.get("lr").is_some())
            .map(|r| r["lr"].as_f64().unwrap())
            .unwrap()
    };
    for step in 1..=4 {
        assert!(
            (lr_at(step) - 1e-2).abs() < 1e-4,
            "step {step}: lr {} (before the budget's step count is known)",
            lr_at(step)
        );
    }
}

/// SGD's momentum buffer is a moment too: pruned weights keep none.
#[test]
fn sgd_momentum_of_pruned_weights_is_zero() {
    let _serial = serial();
    let dir = run_dir("sgd-momentum-mask");
    let mut m = Mlp::new(4, 0.0);
    let mut data = Blobs::new();
    let sgd = OptConfig { lr: 0.05, momentum: 0.9, ..OptConfig::for_kind(OptKind::Sgd) };
    let mut opt = Optimizer::new(m.store(), sgd).unwrap();
    let pc = PruneConfig {
        method: "magnitude".into(),
        target: 0.7,
        warmup: 5,
        ramp_end: 40,
        frequency: 5,
        ..Default::default()
    };
    let mut pr = Pruner::new(m.store(), pc).unwrap();
    let s = train(&mut m, &mut data, &mut opt, cfg(60), &dir, Some(&mut pr));
    assert_eq!(s.status, Status::Done);
    let dead = pr.mask("l1.weight").unwrap().logical_not();
    assert!(dead.sum(Kind::Int64).int64_value(&[]) > 0);
    let buf = opt.state(m.store(), "l1.weight").unwrap().momentum.expect("a momentum buffer");
    assert_eq!(buf.masked_select(&dead).abs().sum(Kind::Float).double_value(&[]), 0.0);
    assert!(buf.abs().sum(Kind::Float).double_value(&[]) > 0.0, "kept weights keep their momentum");
}

/// float16 loss scaling (GradScaler, issue 16 bug 2). Powers of two scale
/// exactly, so with no overflow a scaled run is bit-identical to an
/// unscaled one while the scale grows; an overflow skips the optimizer
/// step and halves the scale; the state survives a checkpoint. On the CPU
/// `amp: "fp16"` has no autocast, so only the scaler acts.
#[test]
fn fp16_loss_scaling_is_exact_and_skips_overflowing_steps() {
    use knlp::optim::scaler::GradScaler;
    let _serial = serial();
    let run = |name: &str, amp: &str, scaler: Option<GradScaler>| {
        let dir = run_dir(name);
        let mut m = Mlp::new(3, 0.0);
        let mut data = Blobs::new();
        let mut opt = Optimizer::new(m.store(), adamw()).unwrap();
        opt.scaler = scaler;
        let s = train(&mut m, &mut data, &mut opt, TrainConfig { amp: amp.into(), ..cfg(40) }, &dir, None);
        assert_eq!(s.status, Status::Done, "{name}: {:?}", s.reason);
        (weights(&m), opt, dir)
    };
    let (want, _, _) = run("scaler-ref", "none", None);
    let (got, opt, dir) =
        run("scaler-exact", "fp16", Some(GradScaler { growth_interval: 5, ..Default::default() }));
    assert_eq!(got, want, "loss scaling changed the weights");
    let sc = opt.scaler.clone().unwrap();
    assert_eq!((sc.scale, sc.skipped, opt.step), (65536.0 * 256.0, 0, 40));
    let log = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert!(log.contains("\"loss_scale\""), "the scale is logged");
    // amp fp16 alone brings PyTorch's default scaler.
    let (_, opt, _) = run("scaler-default", "fp16", None);
    assert_eq!(opt.scaler.clone().unwrap().scale, 65536.0);
    // Scaled by 2^135 the float32 loss overflows, and every gradient with
    // it: steps are skipped and the scale halves until they are finite
    // (below about 2^127); the optimizer steps only then.
    let (w, opt, _) =
        run("scaler-overflow", "fp16", Some(GradScaler { scale: 2f64.powi(135), ..Default::default() }));
    let sc = opt.scaler.clone().unwrap();
    assert!(sc.skipped >= 8 && sc.scale <= 2f64.powi(127), "{sc:?}");
    assert_eq!(opt.step, 40 - sc.skipped, "skipped steps took no optimizer step");
    assert!(w.iter().all(|x| x.is_finite()));
    // The scaler's state is in the checkpoint and comes back on resume.
    let ck =
        knlp::checkpoint::load(&dir.join("checkpoints/last.safetensors")).unwrap_or_else(|e| panic!("{e:#}"));
    let saved: GradScaler = serde_json::from_value(ck.state.optimizer["scaler"].clone()).unwrap();
    assert_eq!(saved.scale, 65536.0 * 256.0);
}

#[test]
fn resume_is_bit_identical_on_cpu() {
    let _serial = serial();
    for (name, dropout, opt_cfg, variant) in [
        ("adamw", 0.1, adamw(), None),
        (
            "spam",
            0.0,
            OptConfig {
                lr: 1e-2,
                spam: knlp::optim::SpamConfig { interval: 13, warmup: 5, ..Default::default() },
                ..OptConfig::for_kind(OptKind::AdamWSpam)
            },
            None,
        ),
        ("pruned", 0.0, adamw(), Some("bitter7")),
        // The trackers' state (previous weights, EMAs, snapshots) resumes too.
        ("pruned-bitter10", 0.0, adamw(), Some("bitter10")),
        ("pruned-bitter10c", 0.0, adamw(), Some("bitter10c")),
    ] {
        let prune = variant.is_some();
        let pcfg = PruneConfig {
            method: "state".into(),
            variant: variant.unwrap_or("bitter7").into(),
            bitter10: knlp::prune::bitter10::Bitter10Config { snapshot_every: 7, ..Default::default() },
            target: 0.5,
            warmup: 5,
            // Past the resume point (30), so the masks still move after it.
            ramp_end: 45,
            frequency: 5,
            ..Default::default()
        };
        // Uninterrupted.
        let dir_a = run_dir(&format!("resume-a-{name}"));
        let mut m = Mlp::new(1, dropout);
        let mut data = Blobs::new();
        let mut opt = Optimizer::new(m.store(), opt_cfg.clone()).unwrap();
        let mut pr = prune.then(|| Pruner::new(m.store(), pcfg.clone()).unwrap());
        let a = train(
            &mut m,
            &mut data,
            &mut opt,
            TrainConfig { checkpoint_every: 10, ..cfg(50) },
            &dir_a,
            pr.as_mut(),
        );
        let wa = weights(&m);
        let state = |pr: &Option<Pruner>| -> Vec<(String, Vec<f32>)> {
            let ts = pr.as_ref().map(|p| p.tensors()).unwrap_or_default();
            ts.iter()
                .map(|(n, t)| {
                    (n.clone(), Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).unwrap())
                })
                .collect()
        };
        let sa = state(&pr);
        // Stopped at step 30 as if killed, then resumed in a fresh process state.
        let dir_b = run_dir(&format!("resume-b-{name}"));
        let mut m = Mlp::new(1, dropout);
        let mut data = Blobs::new();
        let mut opt = Optimizer::new(m.store(), opt_cfg.clone()).unwrap();
        let mut pr = prune.then(|| Pruner::new(m.store(), pcfg.clone()).unwrap());
        let c = TrainConfig { checkpoint_every: 10, stop_after: 33, ..cfg(50) };
        let half = train(&mut m, &mut data, &mut opt, c, &dir_b, pr.as_mut());
        assert_eq!(half.steps, 33);
        tch::manual_seed(12345); // disturb the global RNG: resume must restore it
        let mut m = Mlp::new(7, dropout);
        let mut data = Blobs::new();
        let mut opt = Optimizer::new(m.store(), opt_cfg.clone()).unwrap();
        let mut pr = prune.then(|| Pruner::new(m.store(), pcfg.clone()).unwrap());
        let b = train(
            &mut m,
            &mut data,
            &mut opt,
            TrainConfig { checkpoint_every: 10, resume: true, ..cfg(50) },
            &dir_b,
            pr.as_mut(),
        );
        assert_eq!(b.status, Status::Done);
        let ra = RunDir::open(&dir_a).unwrap().metrics().unwrap();
        let rb = RunDir::open(&dir_b).unwrap().metrics().unwrap();
        assert_eq!(weights(&m), wa, "{name}: final weights are bit-identical");
        let sb = state(&pr);
        let differ: Vec<&str> =
            sa.iter().zip(&sb).filter(|(a, b)| a != b).map(|(a, _)| a.0.as_str()).collect();
        assert!(
            sa.len() == sb.len() && differ.is_empty(),
            "{name}: pruner tensors (masks, trackers) differ after resuming: {differ:?}, {} vs {} tensors",
            sa.len(),
            sb.len()
        );
        let keys = ["step", "train_loss", "test_loss", "lr", "sparsity"];
        let pick = |r: &Vec<Value>| -> Vec<Vec<Value>> {
            r.iter()
                .map(|x| keys.iter().map(|k| x.get(*k).cloned().unwrap_or(Value::Null)).collect())
                .collect()
        };
        assert_eq!(pick(&ra), pick(&rb), "{name}: the same metrics, each step logged once");
        assert_eq!(a.final_metrics["test_loss"], b.final_metrics["test_loss"]);
    }
}

#[test]
fn nan_loss_fails_the_run_and_keeps_the_last_good_checkpoint() {
    let _serial = serial();
    let dir = run_dir("nan");
    let mut m = Mlp::new(2, 0.0);
    let mut data = Blobs::new();
    data.poison_at = Some(33);
    let mut opt = Optimizer::new(m.store(), adamw()).unwrap();
    let s = train(&mut m, &mut data, &mut opt, TrainConfig { checkpoint_every: 10, ..cfg(60) }, &dir, None);
    assert_eq!(s.status, Status::Failed);
    assert!(s.reason.as_deref().unwrap().contains("loss is NaN"), "{:?}", s.reason);
    let run = RunDir::open(&dir).unwrap();
    assert_eq!(run.status().unwrap().status, Status::Failed);
    let ck = knlp::checkpoint::load(&run.checkpoint("last")).unwrap();
    assert_eq!(ck.state.step, 30, "the checkpoint before the NaN survives");
    let w = ck.get("model.l1.weight").unwrap();
    assert!(w.isfinite().all().int64_value(&[]) == 1);
}

#[test]
fn checkpoints_that_do_not_match_are_refused() {
    let _serial = serial();
    let dir = run_dir("mismatch");
    let mut m = Mlp::new(3, 0.0);
    let mut data = Blobs::new();
    let mut opt = Optimizer::new(m.store(), adamw()).unwrap();
    train(&mut m, &mut data, &mut opt, cfg(20), &dir, None);
    let path = RunDir::open(&dir).unwrap().checkpoint("last");
    let ck = knlp::checkpoint::load(&path).unwrap();
    // A model of another shape: the error names the tensor.
    let mut store = ParamStore::new();
    let _l1 = Linear::new(&mut store, &Path::root("l1"), 16, 32, true, None).unwrap();
    let _l2 = Linear::new(&mut store, &Path::root("l2"), 32, 4, true, None).unwrap();
    store.finalize(Device::Cpu).unwrap();
    let e = ck.restore_model(&store).unwrap_err().to_string();
    assert!(e.contains("'l1.weight' has shape [64, 16]"), "{e}");
    // A truncated file is refused with the file named.
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = knlp::checkpoint::load(&cut).err().unwrap().to_string();
    assert!(e.contains("cut.safetensors") && e.contains("truncated"), "{e}");
}

#[test]
fn every_method_reaches_its_target_with_dead_weights() {
    let _serial = serial();
    let variants: Vec<(&str, &str)> = vec![
        ("magnitude", "bitter0"),
        ("movement", "knlp"),
        ("movement", "sanh"),
        ("state", "bitter0"),
        ("state", "bitter1"),
        ("state", "bitter2"),
        ("state", "bitter3"),
        ("state", "bitter4"),
        ("state", "bitter5"),
        ("state", "bitter6"),
        ("state", "bitter7"),
        ("state", "bitter8"),
        ("state", "bitter9"),
        ("state", "bitter10"),
        ("state", "bitter10z"),
        ("state", "bitter10s"),
        ("state", "bitter10c"),
    ];
    for (method, variant) in variants {
        let dir = run_dir(&format!("prune-{method}-{variant}"));
        let mut m = Mlp::new(4, 0.0);
        let mut data = Blobs::new();
        let mut opt = Optimizer::new(m.store(), adamw()).unwrap();
        let pc = PruneConfig {
            method: method.into(),
            variant: variant.into(),
            target: 0.7,
            warmup: 5,
            ramp_end: 40,
            frequency: 5,
            ..Default::default()
        };
        let mut pr = Pruner::new(m.store(), pc).unwrap();
        let s = train(&mut m, &mut data, &mut opt, cfg(60), &dir, Some(&mut pr));
        assert_eq!(s.status, Status::Done);
        let achieved = pr.weight_sparsity(m.store()).unwrap();
        // bitter4's layer-adaptive rule targets 0.7x..1.3x of the sparsity from
        // the first to the last layer, so its global sparsity is the
        // size-weighted mean: here l1 (1024 weights) at 0.49, l2 (256) at 0.91.
        let want = if variant == "bitter4" {
            (0.49f64 * 1024.0).floor() / 1280.0 + (0.91f64 * 256.0).floor() / 1280.0
        } else {
            0.7
        };
        assert!((achieved - want).abs() <= 0.005, "{method}/{variant}: achieved {achieved}, want {want}");
        assert_eq!(s.extra["sparsity"].as_f64().unwrap(), achieved, "the summary reports what was measured");
        // Pruned weights are exactly zero and get zero gradient and zero moments.
        let mask = pr.mask("l1.weight").unwrap();
        let w = &m.store().get("l1.weight").unwrap().tensor;
        let dead = mask.logical_not();
        assert_eq!(w.masked_select(&dead).abs().sum(Kind::Float).double_value(&[]), 0.0);
        let st = opt.state(m.store(), "l1.weight").unwrap();
        assert_eq!(st.exp_avg.unwrap().masked_select(&dead).abs().sum(Kind::Float).double_value(&[]), 0.0);
        assert_eq!(st.exp_avg_sq.unwrap().masked_select(&dead).abs().sum(Kind::Float).double_value(&[]), 0.0);
        // One more backward + the pruner's gradient masking: zero gradient.
        let (x, y) = data
            .next_batch()
            .unwrap()
            .unwrap_or_else(|| (data.test_x.narrow(0, 0, 8), data.test_y.narrow(0, 0, 8)));
        knlp::models::cross_entropy(&m.forward(&x, true).unwrap(), &y).unwrap().backward();
        pr.before_step(m.store()).unwrap();
        let g = m.store().get("l1.weight").unwrap().tensor.grad();
        assert_eq!(g.masked_select(&dead).abs().sum(Kind::Float).double_value(&[]), 0.0);
        m.store().zero_grad().unwrap();
    }
}

/// INFERENCE_TEST: after the run, the model's forward pass timed at each
/// batch size, with its sparsity counted, in inference.json and the summary.
#[test]
fn inference_test_times_the_trained_model() {
    use knlp::inference::InferenceConfig;
    let _serial = serial();
    let dir = run_dir("inference");
    let mut m = Mlp::new(3, 0.0);
    let mut data = Blobs::new();
    let mut opt = Optimizer::new(m.store(), adamw()).unwrap();
    let pc = PruneConfig { target: 0.5, warmup: 2, ramp_end: 10, frequency: 2, ..Default::default() };
    let mut pr = Pruner::new(m.store(), pc).unwrap();
    let ic = InferenceConfig { batch_sizes: vec![4, 1, 16], warmup: 1, runs: 5 };
    let c = TrainConfig { inference: Some(ic), ..cfg(20) };
    let s = train(&mut m, &mut data, &mut opt, c, &dir, Some(&mut pr));
    let rep: Value = serde_json::from_slice(&std::fs::read(dir.join("inference.json")).unwrap()).unwrap();
    assert_eq!(rep["sample_shape"], json!([16]), "the shape of one training input");
    let res = rep["results"].as_array().unwrap();
    assert_eq!(res.iter().map(|r| r["batch_size"].as_i64().unwrap()).collect::<Vec<_>>(), vec![4, 1, 16]);
    for r in res {
        let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} missing in {r}"));
        let (mean, lo, hi) = (f("latency_ms_mean"), f("latency_ms_min"), f("latency_ms_max"));
        assert!(lo > 0.0 && lo <= mean && mean <= hi && f("latency_ms_std") >= 0.0, "{r}");
        let b = r["batch_size"].as_f64().unwrap();
        assert!((f("throughput_per_s") - b / (mean / 1e3)).abs() < 1e-6 * f("throughput_per_s"));
        assert!(r.get("mem_peak_mb_mean").is_none(), "memory is measured on CUDA only");
    }
    // Sparsity counted from the weights themselves.
    let zeros: i64 =
        m.store().params().iter().map(|p| p.tensor.eq(0.0).sum(Kind::Int64).int64_value(&[])).sum();
    let total: i64 = m.store().params().iter().map(|p| p.tensor.numel() as i64).sum();
    assert_eq!(
        (rep["sparsity"]["zero_params"].as_i64(), rep["sparsity"]["params"].as_i64()),
        (Some(zeros), Some(total))
    );
    let wz = rep["sparsity"]["weight_sparsity"].as_f64().unwrap();
    assert!((wz - pr.weight_sparsity(m.store()).unwrap()).abs() < 1e-9 && wz > 0.45, "{wz}");
    // The summary's headline: latency at the smallest batch, best throughput.
    let bs1 = res.iter().find(|r| r["batch_size"] == 1).unwrap();
    // (inference.json is read back: serde_json's parsing may be 1 ulp off.)
    let near = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs();
    assert!(near(s.extra["infer_ms"].as_f64().unwrap(), bs1["latency_ms_mean"].as_f64().unwrap()));
    let best = res.iter().map(|r| r["throughput_per_s"].as_f64().unwrap()).fold(0.0, f64::max);
    assert!(near(s.extra["infer_per_s"].as_f64().unwrap(), best), "{} vs {best}", s.extra["infer_per_s"]);
    let bad = TrainConfig {
        inference: Some(InferenceConfig { batch_sizes: vec![0], ..Default::default() }),
        ..cfg(5)
    };
    assert!(bad.validate().unwrap_err().to_string().contains("batch sizes"));
}
