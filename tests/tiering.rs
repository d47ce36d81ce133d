//! Hierarchical memory tiering (docs/tiering.md): scores against PyTorch,
//! the cumulative rule, the hints file, the emulated delay, real staging,
//! the presets and bad thresholds.
use std::path::PathBuf;

use anyhow::Result;
use knlp::config::{self, Experiment, Reader};
use knlp::hooks::Hooks;
use knlp::models::gpt2::{self, Gpt2};
use knlp::models::{cross_entropy, Model};
use knlp::optim::{OptConfig, OptKind, Optimizer};
use knlp::tiering::{delay_s, due_rule, module_of, module_scores, Assignment, Tiering, TieringConfig};
use knlp::train::{Data, TrainConfig, Trainer};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

const CPU: Device = Device::Cpu;
const VOCAB: i64 = 61;
const BLOCK: i64 = 16;

/// Tests share libtorch's global seed.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("knlp-tiering-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Two blocks, 32 wide, untied head (so `lm_head` is a module of its own).
fn small(tie: bool) -> Gpt2 {
    small_on(tie, CPU)
}

fn small_on(tie: bool, dev: Device) -> Gpt2 {
    tch::manual_seed(7);
    let c = gpt2::Config {
        block_size: BLOCK,
        vocab_size: VOCAB,
        tie_weights: tie,
        dropout: 0.0,
        ..gpt2::Config::custom(2, 4, 32)
    };
    let mut m = Gpt2::new(c).unwrap();
    m.store_mut().finalize(dev).unwrap();
    m
}

fn adamw(m: &Gpt2) -> Optimizer {
    Optimizer::new(m.store(), OptConfig { lr: 1e-2, ..OptConfig::for_kind(OptKind::AdamW) }).unwrap()
}

fn batch(seed: i64) -> (Tensor, Tensor) {
    tch::manual_seed(seed);
    let x = Tensor::randint(VOCAB, [4, BLOCK + 1], (Kind::Int64, CPU));
    (x.narrow(1, 0, BLOCK), x.narrow(1, 1, BLOCK))
}

/// `n` optimizer steps by hand on the model's device, visiting `hooks` in
/// every forward.
fn steps(m: &Gpt2, opt: &mut Optimizer, n: i64, hooks: Option<&dyn Hooks>, tiering: Option<&Tiering>) -> f64 {
    let dev = m.store().device();
    let mut last = 0.0;
    for s in 0..n {
        let (x, y) = batch(100 + s);
        let (x, y) = (x.to_device(dev), y.to_device(dev));
        let logits = m.forward_hooked(&x, true, hooks).unwrap();
        if let Some(t) = tiering {
            t.end_forward().unwrap();
        }
        let loss = cross_entropy(&logits, &y).unwrap();
        loss.backward();
        last = loss.double_value(&[]);
        opt.step(m.store()).unwrap();
        if let Some(t) = tiering {
            t.refresh_host().unwrap();
        }
        m.store().zero_grad().unwrap();
    }
    last
}

struct Tokens {
    served: i64,
}

impl Data for Tokens {
    fn next_batch(&mut self) -> Result<Option<(Tensor, Tensor)>> {
        self.served += 1;
        Ok(Some(batch(1000 + self.served)))
    }
    fn new_epoch(&mut self) -> Result<()> {
        Ok(())
    }
    fn batches_per_epoch(&self) -> Option<i64> {
        None
    }
    fn for_each_eval(&mut self, f: &mut dyn FnMut(&Tensor, &Tensor) -> Result<()>) -> Result<()> {
        let (x, y) = batch(5);
        f(&x, &y)
    }
    fn state(&self) -> Value {
        json!({"served": self.served})
    }
    fn restore(&mut self, s: &Value) -> Result<()> {
        self.served = s["served"].as_i64().unwrap_or(0);
        Ok(())
    }
    fn rewind(&mut self) {
        self.served = 0;
    }
    fn describe(&self) -> Value {
        json!("random tokens")
    }
}

fn train(m: &mut Gpt2, opt: &mut Optimizer, cfg: TrainConfig, dir: &std::path::Path) -> knlp::train::Summary {
    try_train(m, opt, cfg, dir).unwrap()
}

fn try_train(
    m: &mut Gpt2,
    opt: &mut Optimizer,
    cfg: TrainConfig,
    dir: &std::path::Path,
) -> Result<knlp::train::Summary> {
    let mut data = Tokens { served: 0 };
    let t = Trainer {
        model: m,
        opt,
        data: &mut data,
        hooks: vec![],
        cfg: TrainConfig { progress: "off".into(), gpu_monitor_ms: 0, ..cfg },
        run: knlp::runs::RunDir::open(dir).unwrap(),
        record: json!({}),
        tracker: Some("local".into()),
        fwd_hooks: None,
        loss_fn: None,
    };
    t.run()
}

fn read_json(path: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn modules_are_parameter_prefixes() {
    let _g = serial();
    assert_eq!(module_of("transformer.h.3.attn.c_attn.weight"), "transformer.h.3.attn");
    assert_eq!(module_of("transformer.h.0.ln_1.weight"), "transformer.h.0.ln_1");
    assert_eq!(module_of("transformer.wte.weight"), "transformer.wte");
    assert_eq!(module_of("layer1.0.weight"), "layer1.0");
    assert_eq!(module_of("lm_head.weight"), "lm_head");
    let m = small(false);
    let names: Vec<String> = knlp::tiering::modules(m.store()).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), 2 + 2 * 4 + 2, "{names:?}");
    assert!(names.contains(&"lm_head".to_string()) && names.contains(&"transformer.ln_f".to_string()));
}

/// Scores recomputed by PyTorch from the same moments, saved to safetensors.
#[test]
fn scores_match_pytorch() {
    let _g = serial();
    let m = small(false);
    let mut opt = adamw(&m);
    steps(&m, &mut opt, 3, None, None);
    let scores = module_scores(m.store(), &opt).unwrap();
    let mut tensors = Vec::new();
    for p in m.store().params() {
        let st = opt.state(m.store(), &p.name).unwrap();
        tensors.push((format!("{}|m", p.name), st.exp_avg.unwrap().contiguous()));
        tensors.push((format!("{}|v", p.name), st.exp_avg_sq.unwrap().contiguous()));
    }
    let dir = tmp("scores");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("state.safetensors");
    Tensor::write_safetensors(&tensors, &file).unwrap();
    let py = r#"
import json, sys
from safetensors.torch import load_file
t = load_file(sys.argv[1])
mods = {}
for k, x in t.items():
    name, what = k.split("|")
    parts = name.split(".")
    mod = ".".join(parts[:4]) if parts[:2] == ["transformer", "h"] and len(parts) > 4 else ".".join(parts[:-1])
    mods.setdefault(mod, {}).setdefault(name, {})[what] = x.double()
out = {}
for mod, ps in mods.items():
    s = [p["m"].abs().mean().item() + p["v"].sqrt().mean().item() for p in ps.values()]
    out[mod] = sum(s) / len(s)
print(json.dumps(out))
"#;
    let venv = std::env::var_os("KNLP_VENV").map(PathBuf::from).unwrap_or_else(|| root().join(".venv"));
    let python = venv.join("bin/python");
    let out = std::process::Command::new(&python).args(["-c", py]).arg(&file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let want: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(want.as_object().unwrap().len(), scores.len());
    for (name, s) in &scores {
        let w = want[name].as_f64().unwrap_or_else(|| panic!("{name} missing in PyTorch's"));
        // Same f32 moments, summed in another order.
        assert!((s - w).abs() <= 1e-7 * w.abs().max(1e-12), "{name}: {s} vs PyTorch {w}");
        assert!(*s > 0.0);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cumulative_rule_and_hints() {
    let scores: Vec<(String, f64)> = (0..10).map(|i| (format!("m{i}"), (i * 7 % 10) as f64)).collect();
    let a = Assignment::new(scores, 0.3, 0.5, 4).unwrap();
    assert_eq!(a.counts, [3, 2, 5], "0.3 / 0.5 cumulative: 30 % HBM, 20 % CPU, 50 % SSD");
    // Scores 0,7,4,1,8,5,2,9,6,3: ranks 9,8,7 -> HBM; 6,5 -> CPU.
    let hints = a.hints();
    for (m, t) in [("m7", "hbm"), ("m4", "hbm"), ("m1", "hbm"), ("m8", "cpu"), ("m5", "cpu"), ("m2", "ssd")] {
        assert_eq!(hints[m], json!(t), "{m}");
    }
    assert_eq!(hints["m9"], json!("ssd"));
    let d = a.details();
    assert_eq!(d["counts"], json!({"hbm": 3, "cpu": 2, "ssd": 5}));
    assert_eq!(d["modules"][0]["score"], json!(9.0));
    assert_eq!(
        Assignment::new(vec![("a".into(), 1.0)], 0.3, 0.5, 1).unwrap().counts,
        [0, 0, 1],
        "floor(1 * 0.5) = 0"
    );
    let seven: Vec<(String, f64)> = (0..7).map(|i| (format!("m{i}"), i as f64)).collect();
    assert_eq!(
        Assignment::new(seven, 0.2, 0.6, 1).unwrap().counts,
        [1, 3, 3],
        "floor(1.4) = 1, floor(4.2) = 4"
    );
}

#[test]
fn assignment_steps() {
    let _g = serial();
    let c = TieringConfig::default();
    assert_eq!(c.assign_at(100, 500), 100, "after the warm-up");
    assert_eq!(c.assign_at(0, 50), 50, "else the first evaluation");
    assert_eq!(c.assign_at(0, 0), 1, "else after step 1");
    assert_eq!(TieringConfig { assign_step: 7, ..c.clone() }.assign_at(100, 50), 7);
    // Steps taken in order, some skipped (fp16 overflow): which assign?
    let run = |skipped: &[i64], every: i64| {
        let mut last = None;
        let mut out = Vec::new();
        for s in (1..12).filter(|s| !skipped.contains(s)) {
            if due_rule(last, s, 3, every) {
                last = Some(s);
                out.push(s);
            }
        }
        out
    };
    assert_eq!(run(&[], 2), vec![3, 5, 7, 9, 11]);
    assert_eq!(run(&[], 0), vec![3], "once");
    assert_eq!(run(&[3], 0), vec![4], "the assignment step skipped: the next step taken");
    assert_eq!(run(&[2, 3, 4], 0), vec![5]);
    assert_eq!(run(&[3, 7], 3), vec![4, 8, 11]);
    let m = small(true);
    let t = Tiering::new(&c, &m).unwrap();
    assert!(!t.due(2, 3) && t.due(3, 3) && t.due(9, 3), "unassigned: due from the step on");
}

#[test]
fn bad_thresholds_name_the_option() {
    let bad = |hbm: f64, cpu: f64| {
        TieringConfig { hbm, cpu, ..Default::default() }.validate().unwrap_err().to_string()
    };
    assert!(bad(0.6, 0.5).contains("TIERING_CPU_THRESHOLD") && bad(0.6, 0.5).contains("cumulative"));
    assert!(bad(-0.1, 0.5).contains("hbm (TIERING_HBM_THRESHOLD)"));
    assert!(bad(0.3, 1.5).contains("cpu (TIERING_CPU_THRESHOLD)"));
    assert!(bad(f64::NAN, 0.5).contains("TIERING_HBM_THRESHOLD"));
    for name in
        ["metrics.jsonl", "summary.json", "status.json", "tiering.json", "train.log", "a/b.json", "a\\b"]
    {
        let e = TieringConfig { json: name.into(), ..Default::default() }.validate().unwrap_err().to_string();
        assert!(e.contains("TIERING_JSON_OUTPUT"), "{name}: {e}");
    }
    let e = TieringConfig { mode: "fast".into(), ..Default::default() }.validate().unwrap_err().to_string();
    assert!(e.contains("TIERING_MODE"), "{e}");
    // Through Kconfig: the preset with one threshold changed.
    let base = std::fs::read_to_string(root().join("defconfigs/gpt2-adam-tier-emulated")).unwrap();
    for (from, to, want) in [
        ("HBM_THRESHOLD=\"0.3\"", "HBM_THRESHOLD=\"1.5\"", "CONFIG_TIERING_HBM_THRESHOLD"),
        ("HBM_THRESHOLD=\"0.3\"", "HBM_THRESHOLD=\"0.7\"", "TIERING_CPU_THRESHOLD"),
        ("CPU_THRESHOLD=\"0.5\"", "CPU_THRESHOLD=\"-1\"", "CONFIG_TIERING_CPU_THRESHOLD"),
    ] {
        let f = tmp(&format!("cfg-{}", to.len()));
        std::fs::write(&f, base.replace(from, to)).unwrap();
        let (kc, _) = config::load(&root().join("Kconfig"), &f, &[]).unwrap();
        let e = format!("{:#}", Experiment::read(&Reader::new(&kc)).unwrap_err());
        assert!(e.contains(want), "{to}: {e}");
        let _ = std::fs::remove_file(&f);
    }
    // A matrix with a model or optimizer tiering cannot serve.
    for (extra, want) in [("CONFIG_MODEL_LENET5=y\n", "lenet5"), ("CONFIG_OPTIMIZER_SGD=y\n", "sgd")] {
        let f = tmp(&format!("matrix-{want}"));
        std::fs::write(&f, base.clone() + extra).unwrap();
        // Kconfig turns the option off (it depends on the matrix); one set
        // to y is refused, not dropped silently.
        let (kc, _) = config::load(&root().join("Kconfig"), &f, &[]).unwrap();
        let e = format!("{:#}", Experiment::read(&Reader::new(&kc)).unwrap_err());
        assert!(e.contains("ENABLE_HIERARCHICAL_TIERING") && e.contains(want), "{extra}: {e}");
        let _ = std::fs::remove_file(&f);
    }
    // Train options are checked before any work.
    let cfg = TrainConfig {
        steps: 1,
        tiering: Some(TieringConfig { hbm: 2.0, ..Default::default() }),
        ..Default::default()
    };
    assert!(cfg.validate().unwrap_err().to_string().contains("TIERING_HBM_THRESHOLD"));
}

#[test]
fn presets_read_into_the_training_options() {
    for (name, mode, hbm, cpu) in
        [("gpt2-adam-tier-emulated", "emulated", 0.3, 0.5), ("gpt2-adam-tier-offload", "real", 0.2, 0.6)]
    {
        let (kc, _) =
            config::load(&root().join("Kconfig"), &root().join("defconfigs").join(name), &[]).unwrap();
        let exp = Experiment::read(&Reader::new(&kc)).unwrap();
        let t = exp.train.tiering.clone().unwrap_or_else(|| panic!("{name}: tiering off"));
        assert_eq!(
            (t.mode.as_str(), t.hbm, t.cpu, t.json.as_str()),
            (mode, hbm, cpu, "tier_hints.json"),
            "{name}"
        );
        assert_eq!(t.assign_at(exp.train.warmup, exp.train.eval_every), 100, "{name}: after the warm-up");
        assert_eq!(exp.optimizers, vec!["adamw".to_string()], "{name}");
    }
    // Off by default; the Kconfig defaults are TieringConfig's.
    let (kc, _) =
        config::load(&root().join("Kconfig"), &root().join("defconfigs/gpt2-brown-small"), &[]).unwrap();
    assert!(Experiment::read(&Reader::new(&kc)).unwrap().train.tiering.is_none());
    let on = std::fs::read_to_string(root().join("defconfigs/gpt2-brown-small")).unwrap()
        + "CONFIG_ENABLE_HIERARCHICAL_TIERING=y\n";
    let f = tmp("defaults");
    std::fs::write(&f, on).unwrap();
    let (kc, _) = config::load(&root().join("Kconfig"), &f, &[]).unwrap();
    let t = Experiment::read(&Reader::new(&kc)).unwrap().train.tiering.unwrap();
    assert_eq!(t, TieringConfig::default());
    let _ = std::fs::remove_file(&f);
}

#[test]
fn emulated_delay_follows_the_formula() {
    let _g = serial();
    assert_eq!(delay_s(0, 1e9), 0.0);
    assert!((delay_s(1, 150e3) - (5e-6 + 1e-6)).abs() < 1e-15);
    assert!((delay_s(2, 10e6) - (30e-6 + 1e-3)).abs() < 1e-15);
    let m = small(false);
    let mut opt = adamw(&m);
    steps(&m, &mut opt, 2, None, None);
    // Every module off HBM (half CPU, half SSD): each charge is checked.
    let t = Tiering::new(&TieringConfig { hbm: 0.0, cpu: 0.5, ..Default::default() }, &m).unwrap();
    assert!(!t.active() && !t.wants("blocks.0.hook_attn_out"), "nothing hooked before assignment");
    t.assign(m.store(), &opt, 2, None).unwrap();
    t.trace(true);
    let (x, _) = batch(1);
    let _ = m.forward_hooked(&x, false, Some(&t)).unwrap();
    t.end_forward().unwrap();
    let trace = t.take_trace();
    let a = t.assignment().unwrap();
    assert!(a.tiers.iter().all(|&t| t != "hbm"));
    assert_eq!(trace.len(), a.modules.len(), "one delay per CPU/SSD module: {trace:?}");
    let resid = (4 * BLOCK * 32 * 4) as f64;
    let mut want = 0.0;
    for line in &trace {
        let p: Vec<&str> = line.split(' ').collect();
        let (module, tier, bytes): (&str, &str, f64) = (p[1], p[2], p[3].parse().unwrap());
        let i = a.modules.iter().position(|n| n == module).unwrap();
        assert_eq!(a.tiers[i], tier);
        let expect = match module {
            // The head's output is as wide as its (padded) vocabulary.
            "lm_head" => resid * m.store().get("lm_head.weight").unwrap().tensor.size()[0] as f64 / 32.0,
            // [T, C] rows, not the hook's copy expanded over the batch.
            "transformer.wpe" => (BLOCK * 32 * 4) as f64,
            _ => resid,
        };
        assert_eq!(bytes, expect, "{module}: bytes of its output");
        want += delay_s(if tier == "cpu" { 1 } else { 2 }, bytes);
    }
    let s = t.summary();
    let got = s["delay_requested_s"].as_f64().unwrap();
    assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    assert!(s["delay_slept_s"].as_f64().unwrap() >= got, "a sleep is never shorter than asked");
}

/// Real mode on the CPU: staged around each block's forward in order, the
/// parameters' own data back afterwards, training unchanged.
#[test]
fn real_mode_stages_and_restores() {
    let _g = serial();
    let cfg = TieringConfig { mode: "real".into(), hbm: 0.0, cpu: 0.5, ..Default::default() };
    let m = small(true);
    let mut opt = adamw(&m);
    steps(&m, &mut opt, 2, None, None);
    let t = Tiering::new(&cfg, &m).unwrap();
    t.assign(m.store(), &opt, 2, None).unwrap();
    t.trace(true);
    let ptrs = |m: &Gpt2| m.store().params().iter().map(|p| p.tensor.data_ptr() as usize).collect::<Vec<_>>();
    let before = ptrs(&m);
    let (x, y) = batch(3);
    let plain = cross_entropy(&m.forward(&x, true).unwrap(), &y).unwrap().double_value(&[]);
    let logits = m.forward_hooked(&x, true, Some(&t)).unwrap();
    t.end_forward().unwrap();
    assert_eq!(ptrs(&m), before, "every parameter is back on its flat buffer");
    assert_eq!(cross_entropy(&logits, &y).unwrap().double_value(&[]), plain, "same values staged");
    let trace = t.take_trace();
    let a = t.assignment().unwrap();
    let offloaded: Vec<&String> =
        a.modules.iter().zip(&a.tiers).filter(|(_, t)| **t != "hbm").map(|(n, _)| n).collect();
    for n in &offloaded {
        let st = trace.iter().position(|l| *l == format!("stage {n}"));
        let un = trace.iter().position(|l| *l == format!("unstage {n}"));
        match n.as_str() {
            "transformer.wte" | "transformer.wpe" => {
                assert!(st.is_none(), "no point precedes the embeddings")
            }
            _ => assert!(st.unwrap() < un.unwrap(), "{n}: {trace:?}"),
        }
    }
    // Blocks in forward order.
    let blocks: Vec<&str> =
        trace.iter().filter_map(|l| l.strip_prefix("stage transformer.h.")?.split('.').next()).collect();
    assert!(!blocks.is_empty() && blocks.windows(2).all(|w| w[0] <= w[1]), "{trace:?}");
    // Training with real staging is training without it.
    let m2 = small(true);
    let mut opt2 = adamw(&m2);
    let t2 = Tiering::new(&cfg, &m2).unwrap();
    steps(&m2, &mut opt2, 2, None, None);
    t2.assign(m2.store(), &opt2, 2, None).unwrap();
    let l_real = steps(&m2, &mut opt2, 3, Some(&t2), Some(&t2));
    let m3 = small(true);
    let mut opt3 = adamw(&m3);
    steps(&m3, &mut opt3, 2, None, None);
    let l_plain = steps(&m3, &mut opt3, 3, None, None);
    assert_eq!(l_real, l_plain);
    for (p, q) in m2.store().params().iter().zip(m3.store().params()) {
        assert!(p.tensor.equal(&q.tensor), "{}", p.name);
    }
    assert!(t2.summary()["staged"].as_u64().unwrap() > 0);
}

#[test]
fn models_without_block_hooks_are_refused() {
    let _g = serial();
    let mut m = knlp::models::lenet5::LeNet5::new(Default::default()).unwrap();
    m.store_mut().finalize(CPU).unwrap();
    let e = Tiering::new(&TieringConfig::default(), &m).err().unwrap().to_string();
    assert!(e.contains("lenet5") && e.contains("hook points"), "{e}");
    // Scores and tiers alone work for any model with Adam's moments.
    let opt = Optimizer::new(m.store(), OptConfig::for_kind(OptKind::AdamW)).unwrap();
    assert_eq!(module_scores(m.store(), &opt).unwrap().len(), 7);
    let sgd = Optimizer::new(m.store(), OptConfig::for_kind(OptKind::Sgd)).unwrap();
    assert!(module_scores(m.store(), &sgd).unwrap_err().to_string().contains("Adam"));
}

/// What a user gets by default: TieringConfig's defaults (the Kconfig
/// menu's), assigned at the end of the warm-up, hints in the run folder.
#[test]
fn default_training_run_writes_hints_and_delays() {
    let _g = serial();
    let dir = tmp("run");
    let mut m = small(true);
    let mut opt = adamw(&m);
    let cfg = TrainConfig {
        steps: 8,
        warmup: 3,
        eval_every: 4,
        log_every: 2,
        tiering: Some(TieringConfig::default()),
        ..TrainConfig::default()
    };
    let s = train(&mut m, &mut opt, cfg, &dir);
    let hints: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tier_hints.json")).unwrap()).unwrap();
    let hints = hints.as_object().unwrap();
    assert_eq!(hints.len(), 1 + 1 + 2 * 4 + 1, "wte, wpe, 2 x (ln_1, attn, ln_2, mlp), ln_f");
    let count = |t: &str| hints.values().filter(|v| *v == t).count();
    assert_eq!((count("hbm"), count("cpu"), count("ssd")), (3, 2, 6), "floor(11 * 0.3), floor(11 * 0.5)");
    let why: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tiering.json")).unwrap()).unwrap();
    assert_eq!(why["step"], json!(3), "assigned at the end of the warm-up");
    assert_eq!((why["hbm_threshold"].as_f64(), why["cpu_threshold"].as_f64()), (Some(0.3), Some(0.5)));
    assert_eq!(why["mode"], json!("emulated"));
    let recs = knlp::runs::RunDir::open(&dir).unwrap().metrics().unwrap();
    let at =
        |step: i64| recs.iter().find(|r| r["step"] == json!(step) && r.get("train_loss").is_some()).unwrap();
    assert!(at(2).get("tier_delay_ms").is_none(), "no tiers before step 3");
    assert_eq!(at(4)["tier_ssd"], json!(6));
    assert!(at(6)["tier_delay_ms"].as_f64().unwrap() > 0.0);
    let t = &s.extra["tiering"];
    assert!(t["delay_requested_s"].as_f64().unwrap() > 0.0);
    assert!(t["delay_slept_s"].as_f64().unwrap() >= t["delay_requested_s"].as_f64().unwrap());
    assert_eq!(t["assigned_at"], json!([3]));
    assert!(why.get("history").is_some_and(|h| h == "tiering_history.jsonl"), "{why}");
    let hist = std::fs::read_to_string(dir.join("tiering_history.jsonl")).unwrap();
    assert_eq!(hist.lines().count(), 1, "one line per assignment: {hist}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A resumed run keeps the tiers of the run it continues, not a new
/// scoring of the checkpoint's moments.
#[test]
fn resume_keeps_the_tiers() {
    let _g = serial();
    let cfg = TrainConfig {
        steps: 7,
        warmup: 2,
        eval_every: 0,
        log_every: 1,
        checkpoint_every: 4,
        tiering: Some(TieringConfig::default()),
        ..TrainConfig::default()
    };
    let whole = tmp("whole");
    let mut m = small(true);
    let mut o = adamw(&m);
    let s_whole = train(&mut m, &mut o, cfg.clone(), &whole);
    let parts = tmp("parts");
    let mut m2 = small(true);
    let mut o2 = adamw(&m2);
    let first = train(&mut m2, &mut o2, TrainConfig { stop_after: 4, ..cfg.clone() }, &parts);
    assert_eq!(first.extra.get("tiering"), None, "stopped as if killed");
    let mut m3 = small(true);
    let mut o3 = adamw(&m3);
    std::fs::remove_file(parts.join("tier_hints.json")).unwrap();
    let s_parts = train(&mut m3, &mut o3, TrainConfig { resume: true, ..cfg }, &parts);
    assert_eq!(s_parts.extra["tiering"]["assigned_at"], json!([2]));
    assert_eq!(s_parts.extra["tiering"]["assigned_at"], s_whole.extra["tiering"]["assigned_at"]);
    assert_eq!(s_parts.extra["tiering"]["counts"], s_whole.extra["tiering"]["counts"]);
    assert!(!parts.join("tier_hints.json").exists(), "not re-assigned on resume");
    let recs = knlp::runs::RunDir::open(&parts).unwrap().metrics().unwrap();
    let last = recs.iter().rfind(|r| r.get("train_loss").is_some()).unwrap();
    assert_eq!((last["step"].clone(), last["tier_ssd"].clone()), (json!(7), json!(6)), "tiers after resume");
    // The checkpoint's tiers are the uninterrupted run's.
    let hints = read_json(&whole.join("tier_hints.json"));
    let ck = knlp::checkpoint::load(&knlp::runs::RunDir::open(&parts).unwrap().checkpoint("last")).unwrap();
    let st = &ck.state.progress["tiering"]["assignment"];
    for (n, t) in st["modules"].as_array().unwrap().iter().zip(st["tiers"].as_array().unwrap()) {
        assert_eq!(&hints[n.as_str().unwrap()], t, "{n}");
    }
    let _ = std::fs::remove_dir_all(&whole);
    let _ = std::fs::remove_dir_all(&parts);
}

/// Real mode through the trainer trains exactly as without tiering: the
/// host copies follow every update (remove refresh_host and this fails).
#[test]
fn real_mode_training_is_bitwise_plain() {
    let _g = serial();
    let run = |tiering: Option<TieringConfig>, name: &str| {
        let dir = tmp(name);
        let mut m = small(true);
        let mut o = adamw(&m);
        let cfg = TrainConfig {
            steps: 6,
            warmup: 2,
            eval_every: 3,
            log_every: 3,
            fused_loss: false,
            tiering,
            ..TrainConfig::default()
        };
        let s = train(&mut m, &mut o, cfg, &dir);
        let _ = std::fs::remove_dir_all(&dir);
        (m, s)
    };
    let cfg = TieringConfig { mode: "real".into(), hbm: 0.0, cpu: 0.5, ..Default::default() };
    let (real, s) = run(Some(cfg), "real-trainer");
    let (plain, _) = run(None, "plain-trainer");
    for (p, q) in real.store().params().iter().zip(plain.store().params()) {
        assert!(p.tensor.equal(&q.tensor), "{}", p.name);
    }
    let t = &s.extra["tiering"];
    assert!(t["staged"].as_u64().unwrap() > 0 && t["refreshed_mb"].as_f64().unwrap() > 0.0, "{t}");
}

#[test]
fn bad_runs_fail_early_and_say_why() {
    let _g = serial();
    // SGD keeps no moments: refused before step 1.
    let dir = tmp("sgd");
    let mut m = small(true);
    let mut sgd = Optimizer::new(m.store(), OptConfig::for_kind(OptKind::Sgd)).unwrap();
    let cfg = TrainConfig { steps: 3, tiering: Some(TieringConfig::default()), ..TrainConfig::default() };
    let e = try_train(&mut m, &mut sgd, cfg, &dir).err().unwrap().to_string();
    assert!(e.contains("ENABLE_HIERARCHICAL_TIERING") && e.contains("sgd"), "{e}");
    assert!(!dir.join("metrics.jsonl").exists(), "no step taken");
    let _ = std::fs::remove_dir_all(&dir);
    // A run that ends before the assignment says so.
    let dir = tmp("short");
    let mut m = small(true);
    let mut o = adamw(&m);
    let cfg = TrainConfig {
        steps: 2,
        warmup: 5,
        tiering: Some(TieringConfig::default()),
        ..TrainConfig::default()
    };
    let s = train(&mut m, &mut o, cfg, &dir);
    let why = s.extra["tiering"]["never_assigned"].as_str().unwrap().to_string();
    assert!(why.contains("ended at step 2 before step 5"), "{why}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn scripts_reach_tiering() {
    let _g = serial();
    let mut rt = knlp::script::Runtime::new(std::env::temp_dir(), Default::default());
    let dir = tmp("script");
    let code = format!(
        r#"
        let m = gpt2(#{{ n_layer: 2, n_head: 4, n_embd: 32, block_size: 16, vocab_size: 61 }});
        let o = adamw(m, #{{ lr: 0.01 }});
        let x = randint(0, 61, [2, 16]);
        let l = m.forward(x).sum(); l.backward(); o.step();
        let t = module_tiers(o, #{{ hbm: 0.3, cpu: 0.5 }});
        [t.counts.hbm, t.counts.cpu, t.counts.ssd, t.tiers.len(), tier_delay("ssd", 10000000.0), "{}"]
        "#,
        dir.display()
    );
    let out = rt.eval_input(&code).unwrap_or_else(|e| panic!("{}", e.rendered)).into_array().unwrap();
    let ints: Vec<i64> = out[..4].iter().map(|v| v.as_int().unwrap()).collect();
    assert_eq!(ints, vec![3, 2, 6, 11]);
    // The tiers follow the scores' ranking.
    let got = rt
        .eval_input(&format!("{}\n[t.tiers, t.scores]", code.rsplit_once('[').unwrap().0))
        .unwrap_or_else(|e| panic!("{}", e.rendered))
        .into_array()
        .unwrap();
    let tiers = got[0].clone().cast::<rhai::Map>();
    let scores = got[1].clone().cast::<rhai::Map>();
    let mut ranked: Vec<(String, f64)> =
        scores.iter().map(|(k, v)| (k.to_string(), v.as_float().unwrap())).collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    let order = |t: &str| ["hbm", "cpu", "ssd"].iter().position(|x| *x == t).unwrap();
    let seq: Vec<usize> =
        ranked.iter().map(|(k, _)| order(&tiers[k.as_str()].clone().into_string().unwrap())).collect();
    assert!(seq.windows(2).all(|w| w[0] <= w[1]), "tiers by descending score: {seq:?}");
    assert_eq!(seq.iter().filter(|&&t| t == 0).count(), 3);
    assert!((out[4].as_float().unwrap() - 0.00103).abs() < 1e-12);
    let e = rt.eval_input(r#"module_tiers(adamw(lenet5()), #{ hbm: 0.9 })"#).err().unwrap().rendered;
    assert!(e.contains("TIERING_CPU_THRESHOLD"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Real staging on a GPU: skipped without CUDA.
#[test]
fn real_mode_on_cuda() {
    if !tch::Cuda::is_available() {
        eprintln!("skipped: no CUDA device");
        return;
    }
    let _g = serial();
    let dev = Device::Cuda(0);
    let build = || {
        let m = small_on(true, dev);
        let opt = adamw(&m);
        (m, opt)
    };
    let run =
        |m: &Gpt2, opt: &mut Optimizer, t: Option<&Tiering>| steps(m, opt, 3, t.map(|t| t as &dyn Hooks), t);
    let cfg = TieringConfig { mode: "real".into(), hbm: 0.0, cpu: 0.5, ..Default::default() };
    let (m, mut opt) = build();
    run(&m, &mut opt, None);
    let t = Tiering::new(&cfg, &m).unwrap();
    t.assign(m.store(), &opt, 3, None).unwrap();
    let real = run(&m, &mut opt, Some(&t));
    let (m2, mut opt2) = build();
    run(&m2, &mut opt2, None);
    let plain = run(&m2, &mut opt2, None);
    assert!((real - plain).abs() < 1e-5, "{real} vs {plain}");
    for p in m.store().params() {
        assert_eq!(p.tensor.device(), dev, "{} back on the device", p.name);
    }
    let s = t.summary();
    assert!(s["moved_mb"].as_f64().unwrap() > 0.0, "{s}");
    eprintln!("cuda real staging: {s}");
}

/// Learned RA's `transformer.alternation_logits` is a module of its own,
/// staged before the blocks and charged its own bytes, not timed as if it
/// came after them.
#[test]
fn learned_ra_gate_is_mapped() {
    let _g = serial();
    tch::manual_seed(7);
    let c = gpt2::Config {
        block_size: BLOCK,
        vocab_size: VOCAB,
        dropout: 0.0,
        attention: "ra".into(),
        direction: Some("learned".into()),
        ..gpt2::Config::custom(2, 4, 32)
    };
    let mut m = Gpt2::new(c).unwrap();
    m.store_mut().finalize(CPU).unwrap();
    let mut opt = adamw(&m);
    steps(&m, &mut opt, 1, None, None);
    for (mode, want) in [("emulated", "charge transformer ssd 8"), ("real", "stage transformer")] {
        let cfg = TieringConfig { mode: mode.into(), hbm: 0.0, cpu: 0.0, ..Default::default() };
        let t = Tiering::new(&cfg, &m).unwrap();
        t.assign(m.store(), &opt, 1, None).unwrap();
        t.trace(true);
        let (x, _) = batch(1);
        let _ = m.forward_hooked(&x, false, Some(&t)).unwrap();
        t.end_forward().unwrap();
        let trace = t.take_trace();
        assert_eq!(trace.iter().filter(|l| *l == want).count(), 1, "{mode}: {trace:?}");
        if mode == "real" {
            let first = trace.iter().position(|l| l.starts_with("stage transformer.h.0")).unwrap();
            assert!(trace.iter().position(|l| l == "stage transformer").unwrap() < first, "{trace:?}");
        }
    }
}
