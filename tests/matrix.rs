//! The test matrix under crashes: start a small matrix, SIGKILL its whole
//! process group mid-cell, between cells and during a checkpoint write,
//! `knlp continue`, and check every cell finished exactly once with the
//! metrics of an uninterrupted run.
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const KNLP: &str = env!("CARGO_BIN_EXE_knlp");

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

const CONFIG: &str = "CONFIG_MODEL_LENET5=y
CONFIG_OPTIMIZER_ADAMW=y
CONFIG_OPTIMIZER_ADAMWPRUNE=y
CONFIG_PRUNING_NONE=y
CONFIG_PRUNING_MAGNITUDE=y
CONFIG_PRUNING_STATE=y
CONFIG_SPARSITY_50=y
# CONFIG_SPARSITY_70 is not set
CONFIG_ADAMWPRUNE_VARIANT_BITTER7=y
CONFIG_PRUNING_WARMUP=5
CONFIG_PRUNING_RAMP_END=20
CONFIG_PRUNING_FREQUENCY=5
CONFIG_BATCH_SIZE=32
CONFIG_TRAIN_STEPS=30
CONFIG_LOG_EVERY=5
CONFIG_EVAL_EVERY=10
CONFIG_CHECKPOINT_EVERY=10
CONFIG_DEVICE_CPU=y
CONFIG_AUTO_GRAPHS=n
";

/// A scratch folder with the test configuration.
fn workdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("knlp-matrix-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join(".config"), CONFIG).unwrap();
    d
}

fn knlp(dir: &Path) -> Command {
    let mut c = Command::new(KNLP);
    c.current_dir(dir)
        .env("srctree", root())
        .env("KCONFIG_CONFIG", dir.join(".config"))
        .env_remove("KNLP_TEST_PAUSE")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

fn train_args(project: &str) -> Vec<String> {
    vec![
        "train".into(),
        "--kconfig".into(),
        root().join("Kconfig").display().to_string(),
        "--set".into(),
        format!("PROJECT={project}"),
    ]
}

/// Metrics of a run without timing fields, which differ from run to run.
fn metrics(run: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            for k in ["elapsed_s", "step_ms", "samples_per_s"] {
                o.remove(k);
            }
            v
        })
        .collect()
}

const CELLS: &[&str] =
    &["lenet5_adamw_none", "lenet5_adamw_magnitude_50", "lenet5_adamwprune_state-bitter7_50"];

fn check_against(reference: &Path, project: &Path, what: &str) {
    for cell in CELLS {
        let (a, b) = (reference.join(cell), project.join(cell));
        let status: Value =
            serde_json::from_str(&std::fs::read_to_string(b.join("status.json")).unwrap()).unwrap();
        assert_eq!(status["status"], "done", "{what}: {cell}");
        let (ma, mb) = (metrics(&a), metrics(&b));
        let steps: Vec<i64> = mb
            .iter()
            .filter(|r| r.get("train_loss").is_some())
            .map(|r| r["step"].as_i64().unwrap())
            .collect();
        assert_eq!(steps, vec![5, 10, 15, 20, 25, 30], "{what}: {cell} logs every step once");
        assert_eq!(ma, mb, "{what}: {cell} has the metrics of an uninterrupted run");
        let sa: Value =
            serde_json::from_str(&std::fs::read_to_string(a.join("summary.json")).unwrap()).unwrap();
        let sb: Value =
            serde_json::from_str(&std::fs::read_to_string(b.join("summary.json")).unwrap()).unwrap();
        assert_eq!(sa["final_metrics"], sb["final_metrics"], "{what}: {cell}");
        assert_eq!(sb["steps"], 30);
    }
}

/// Run `knlp args` until it reaches the pause point `pause`, then SIGKILL
/// its whole process group (the runner, and with it its cells).
fn kill_at_pause(dir: &Path, args: &[String], pause: &str, marker: &Path, within: Duration) {
    let mut child = knlp(dir)
        .args(args)
        .env("KNLP_TEST_PAUSE", pause)
        .env("KNLP_TEST_PAUSE_FILE", marker)
        .process_group(0)
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !marker.exists() {
        assert!(t0.elapsed() < within, "{pause}: never reached");
        if let Some(st) = child.try_wait().unwrap() {
            panic!("{pause}: finished ({st}) before the pause point");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let pgid = child.id() as i32;
    let st = Command::new("kill").args(["-KILL", "--", &format!("-{pgid}")]).status().unwrap();
    assert!(st.success());
    let _ = child.wait();
}

#[test]
fn sigkill_anywhere_then_continue_completes_every_cell_once() {
    // The reference: the same matrix, never interrupted.
    let dir = workdir("sigkill");
    let o = knlp(&dir).args(train_args("reference")).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let reference = dir.join("runs/reference");

    for (n, pause) in ["step:15", "cell-done:1", "checkpoint:3", "step:28"].iter().enumerate() {
        let project = format!("crash{n}");
        kill_at_pause(
            &dir,
            &train_args(&project),
            pause,
            &dir.join(format!("paused-{n}")),
            Duration::from_secs(240),
        );
        let proj = dir.join("runs").join(&project);
        let done_before: Vec<&&str> = CELLS
            .iter()
            .filter(|c| {
                std::fs::read_to_string(proj.join(c).join("status.json"))
                    .is_ok_and(|s| s.contains("\"done\""))
            })
            .collect();
        assert!(done_before.len() < CELLS.len(), "{pause}: the kill left work to do");
        let o = knlp(&dir).args(["continue", &project]).output().unwrap();
        assert!(o.status.success(), "{pause}: continue failed: {}", String::from_utf8_lossy(&o.stderr));
        check_against(&reference, &proj, pause);
    }
}

#[test]
fn a_failing_cell_does_not_stop_the_others() {
    let dir = workdir("failing");
    // A learning rate that overflows: the dense cell diverges to NaN.
    let cfg =
        CONFIG.replace("CONFIG_TRAIN_STEPS=30", "CONFIG_TRAIN_STEPS=10") + "CONFIG_LEARNING_RATE=\"1e30\"\n";
    std::fs::write(dir.join(".config"), cfg).unwrap();
    let o = knlp(&dir).args(train_args("failing")).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "a matrix with failed cells exits 1");
    let proj = dir.join("runs/failing");
    let mut statuses = Vec::new();
    for cell in CELLS {
        let s: Value =
            serde_json::from_str(&std::fs::read_to_string(proj.join(cell).join("status.json")).unwrap())
                .unwrap();
        statuses.push((
            cell,
            s["status"].as_str().unwrap().to_string(),
            s["reason"].as_str().unwrap_or("").to_string(),
        ));
    }
    assert!(statuses.iter().all(|(_, st, _)| st == "failed"), "{statuses:?}");
    assert!(statuses.iter().all(|(_, _, r)| r.contains("loss is")), "{statuses:?}");
    // A bad option fails its cell with a reason; `continue` skips failed cells.
    let o = knlp(&dir).args(["continue", "failing"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn a_baseline_is_reused_and_the_graphs_and_table_follow() {
    let dir = workdir("graphs");
    let cfg =
        CONFIG.replace("CONFIG_TRAIN_STEPS=30", "CONFIG_TRAIN_STEPS=10").replace("CONFIG_AUTO_GRAPHS=n", "");
    std::fs::write(dir.join(".config"), cfg).unwrap();
    let o = knlp(&dir).args(train_args("first")).stdout(Stdio::piped()).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", String::from_utf8_lossy(&o.stderr));
    let report = dir.join("runs/first/graphs/report.md");
    assert!(report.exists(), "AUTO_GRAPHS draws the graphs: {out}");
    let md = std::fs::read_to_string(&report).unwrap();
    for cell in CELLS {
        assert!(md.contains(cell), "report.md lists {cell}");
    }
    assert!(dir.join("runs/first/graphs/curve_train_loss.png").exists());

    // The dense cell of `first` is adopted by `second` instead of trained.
    let mut args = train_args("second");
    args.extend(["--set".into(), "BASELINE=first/lenet5_adamw_none".into()]);
    let o = knlp(&dir).args(&args).stdout(Stdio::piped()).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("reused as cell lenet5_adamw_none"), "{out}");
    let (a, b) = (dir.join("runs/first/lenet5_adamw_none"), dir.join("runs/second/lenet5_adamw_none"));
    assert_eq!(
        std::fs::read(a.join("metrics.jsonl")).unwrap(),
        std::fs::read(b.join("metrics.jsonl")).unwrap()
    );
    assert!(out.contains("lenet5_adamw_none") && out.contains("done, skipped"), "{out}");

    // The results table: every cell, and filters that select rows.
    let o = knlp(&dir).args(["results", "second"]).stdout(Stdio::piped()).output().unwrap();
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{table}");
    for cell in CELLS {
        assert!(table.contains(cell), "{cell} in {table}");
    }
    let o = knlp(&dir)
        .args(["results", "second", "--filter", "pruning=state", "--columns", "cell,final_acc"])
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{table}");
    assert!(
        table.contains("lenet5_adamwprune_state-bitter7_50") && !table.contains("lenet5_adamw_none"),
        "{table}"
    );
    let o = knlp(&dir).args(["results", "second", "--sort", "nonsense"]).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("nonsense"));
}

/// GPT-2 attention variants as matrix cells: each cell builds its variant,
/// trains, and logs the variant's analysis at every evaluation.
#[test]
fn attention_variants_run_as_cells_and_log_their_metrics() {
    let d = std::env::temp_dir().join(format!("knlp-matrix-{}-attention", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join(".config"),
        "# CONFIG_MODEL_LENET5 is not set
CONFIG_MODEL_GPT2=y
CONFIG_GPT2_N_LAYER=2
CONFIG_GPT2_N_HEAD=2
CONFIG_GPT2_N_EMBD=32
CONFIG_GPT2_BLOCK_SIZE=32
# CONFIG_ATTENTION_MHA is not set
CONFIG_ATTENTION_RA=y
CONFIG_ATTENTION_MLA_KVSPLICE=y
CONFIG_MLA_D_LATENT=16
CONFIG_FISHER_METRICS=y
CONFIG_BATCH_SIZE=4
CONFIG_EVAL_BATCHES=1
CONFIG_TRAIN_STEPS=6
CONFIG_LOG_EVERY=3
CONFIG_EVAL_EVERY=3
CONFIG_DEVICE_CPU=y
CONFIG_AUTO_GRAPHS=n
",
    )
    .unwrap();
    let o = knlp(&d).args(train_args("attn")).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let keys = |cell: &str| -> Vec<String> {
        let run = d.join("runs/attn").join(cell);
        let status: Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("status.json")).unwrap()).unwrap();
        assert_eq!(status["status"], "done", "{cell}");
        metrics(&run)
            .iter()
            .flat_map(|r| r.as_object().unwrap().keys().cloned().collect::<Vec<_>>())
            .collect()
    };
    let ra = keys("gpt2-ra_adamw_none");
    for k in [
        "ra/p_layer1",
        "ra/alternation_balance",
        "fisher/layer0/eigmax_mean",
        "kv_cache/bytes_per_token_bf16",
    ] {
        assert!(ra.iter().any(|x| x == k), "ra cell logs {k}: {ra:?}");
    }
    let ks = keys("gpt2-mla_kvsplice_adamw_none");
    assert!(ks.iter().any(|x| x == "kvsplice/avg_reconstruction_error"), "{ks:?}");
    let _ = std::fs::remove_dir_all(&d);
}

/// Ctrl-C at a terminal reaches `knlp train` (the whole foreground process
/// group): each running cell stops at a step boundary with a checkpoint and
/// `interrupted`, the lock is released, the exit status is 130, and no cell
/// process is left.
#[test]
fn ctrl_c_interrupts_cells_cleanly() {
    let dir = workdir("ctrlc");
    let mut args = train_args("ctrlc");
    args.extend(["--set".into(), "STEPS=100000".into(), "--set".into(), "MODELS=lenet5".into()]);
    let mut child = knlp(&dir).args(&args).process_group(0).spawn().unwrap();
    let proj = dir.join("runs/ctrlc");
    let first = proj.join(CELLS[0]);
    let t0 = Instant::now();
    while !first.join("metrics.jsonl").exists() {
        assert!(t0.elapsed() < Duration::from_secs(120), "training never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pgid = child.id() as i32;
    assert!(Command::new("kill").args(["-INT", "--", &format!("-{pgid}")]).status().unwrap().success());
    let sent = Instant::now();
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(sent.elapsed() < Duration::from_secs(30), "knlp train did not stop after Ctrl-C");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(st.code(), Some(130));
    let status: Value =
        serde_json::from_str(&std::fs::read_to_string(first.join("status.json")).unwrap()).unwrap();
    assert_eq!(status["status"], "interrupted", "{status}");
    let ck: Value =
        serde_json::from_str(&std::fs::read_to_string(first.join("checkpoints/last.json")).unwrap()).unwrap();
    let logged = metrics(&first).iter().filter_map(|r| r["step"].as_i64()).max().unwrap_or(0);
    let at = ck["step"].as_i64().unwrap_or(0);
    assert!(at >= logged && at > 0, "checkpoint at step {at}, logged through {logged}: {ck}");
    assert!(!proj.join(".lock").exists(), "the lock is released");
    for c in &CELLS[1..] {
        assert!(!proj.join(c).join("status.json").exists(), "{c} was started after the interrupt");
    }
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("cmdline")).ok())
        .filter(|c| c.contains(proj.to_str().unwrap()) || c.contains("runs/ctrlc"))
        .collect();
    assert!(left.is_empty(), "processes left: {left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--fresh` never moves a project another process holds; a checkpoint that
/// cannot be read is the cell's recorded failure reason, naming the file.
#[test]
fn fresh_respects_the_lock_and_failures_name_their_cause() {
    let dir = workdir("fresh");
    let proj = dir.join("runs/fresh");
    std::fs::create_dir_all(&proj).unwrap();
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    std::fs::write(proj.join(".lock"), format!("{}\n", sleeper.id())).unwrap();
    let mut args = train_args("fresh");
    args.push("--fresh".into());
    let o = knlp(&dir).args(&args).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains(&format!("is being run by process {}", sleeper.id())),
        "{err}"
    );
    let moved = std::fs::read_dir(dir.join("runs"))
        .unwrap()
        .filter(|e| e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().starts_with("fresh.old")));
    assert_eq!(moved.count(), 0, "the project was moved while locked");
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    std::fs::remove_file(proj.join(".lock")).unwrap();

    // Stop the first cell mid-run, damage its checkpoint, continue.
    let mut args = train_args("fresh");
    args.extend(["--set".into(), "MODELS=lenet5".into()]);
    kill_at_pause(&dir, &args, "step:15", &dir.join("paused"), Duration::from_secs(120));
    let ck = proj.join(CELLS[0]).join("checkpoints/last.safetensors");
    let bytes = std::fs::read(&ck).unwrap();
    std::fs::write(&ck, &bytes[..bytes.len() / 2]).unwrap();
    let o = knlp(&dir).args(["continue", "fresh"]).output().unwrap();
    assert!(!o.status.success());
    let status: Value =
        serde_json::from_str(&std::fs::read_to_string(proj.join(CELLS[0]).join("status.json")).unwrap())
            .unwrap();
    assert_eq!(status["status"], "failed", "{status}");
    let reason = status["reason"].as_str().unwrap_or("");
    assert!(reason.contains("last.safetensors") && !reason.contains("exited with status"), "{reason}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `knlp train --dry-run` (`make dry-run`) lists the numbered cells with
/// what each computes and its state, and starts nothing.
#[test]
fn dry_run_lists_cells_and_starts_nothing() {
    let dir = workdir("dry");
    let mut args = train_args("dry");
    args.push("--dry-run".into());
    let o = knlp(&dir).args(&args).stdout(Stdio::piped()).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", String::from_utf8_lossy(&o.stderr));
    for (i, c) in CELLS.iter().enumerate() {
        assert!(out.contains(&format!("{}. {c}", i + 1)), "{out}");
    }
    assert!(out.contains("lenet5, adamwprune, state pruning (bitter7) to 50%; 30 steps, batch 32"), "{out}");
    assert!(out.contains("3 of 3 cell(s) would run; nothing was started"), "{out}");
    assert!(!dir.join("runs").exists(), "a dry run wrote {}", dir.join("runs").display());
    // A finished cell would be skipped, an interrupted one resumed.
    let run = knlp::runs::RunDir::open(&dir.join("runs/dry").join(CELLS[0])).unwrap();
    run.set_status(knlp::runs::Status::Done, None).unwrap();
    let run = knlp::runs::RunDir::open(&dir.join("runs/dry").join(CELLS[1])).unwrap();
    run.set_status(knlp::runs::Status::Interrupted, None).unwrap();
    let o = knlp(&dir).args(&args).stdout(Stdio::piped()).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("done, would be skipped") && out.contains("would resume from its checkpoint"),
        "{out}"
    );
    assert!(out.contains("2 of 3 cell(s) would run"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// HYPER_PARAM_AUTO and INFERENCE_TEST as a user sets them in .config: the
/// cell trains with the table's batch and accumulation (BATCH_SIZE and
/// GRAD_ACCUM ignored), records why, and its inference test reaches the
/// run folder and the results table.
#[test]
fn auto_batch_and_inference_test_reach_the_run_and_the_table() {
    let dir = workdir("auto");
    let cfg = "CONFIG_MODEL_LENET5=y
CONFIG_OPTIMIZER_ADAMW=y
CONFIG_PRUNING_NONE=y
CONFIG_BATCH_SIZE=32
CONFIG_GRAD_ACCUM=3
CONFIG_HYPER_PARAM_AUTO=y
CONFIG_TARGET_EFFECTIVE_BATCH=256
CONFIG_INFERENCE_TEST=y
CONFIG_INFERENCE_BATCH_SIZES=\"2,1\"
CONFIG_INFERENCE_RUNS=3
CONFIG_TRAIN_STEPS=2
CONFIG_DEVICE_CPU=y
CONFIG_AUTO_GRAPHS=n
";
    std::fs::write(dir.join(".config"), cfg).unwrap();
    let o = knlp(&dir).args(train_args("auto")).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let run = dir.join("runs/auto/lenet5_adamw_none");
    let c: Value = serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    // CPU rule: 16 x LeNet-5's scale 4 = 64; 256 / 64 = 4 micro-batches.
    assert_eq!((c["data"]["batch_size"].as_i64(), c["train"]["grad_accum"].as_i64()), (Some(64), Some(4)));
    assert_eq!(c["hyperparams"]["target_effective_batch"], 256);
    assert!(c["hyperparams"]["probe"].as_str().unwrap().starts_with("none"), "{}", c["hyperparams"]);
    let inf: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("inference.json")).unwrap()).unwrap();
    assert_eq!(inf["sample_shape"], serde_json::json!([1, 32, 32]));
    assert_eq!(inf["results"].as_array().unwrap().len(), 2);
    let o = Command::new(KNLP).args(["results"]).arg(dir.join("runs/auto")).output().unwrap();
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("infer_ms") && table.contains("infer_per_s"), "{table}");
}

/// The image tokenizer axis (`TOKENIZER_*`, docs/tokenizers.md "In the
/// matrix"): one cell per tokenizer, each trained on its projection, the
/// spline cell's code trajectory carried through a crash exactly.
#[test]
fn tokenizer_axis_trains_on_projections_and_resumes_the_trajectory() {
    const TOK: &str = "CONFIG_TOKENIZER_PCA=y
CONFIG_TOKENIZER_SPLINE_PCA=y
CONFIG_TOKENIZER_COMPONENTS=16
CONFIG_TOKENIZER_FIT_SAMPLES=1000
CONFIG_BATCH_SIZE=32
CONFIG_TRAIN_STEPS=24
CONFIG_EVAL_EVERY=10
CONFIG_DEVICE_CPU=y
CONFIG_AUTO_GRAPHS=n
";
    let dir = workdir("tokenizer");
    std::fs::write(dir.join(".config"), TOK).unwrap();
    let o = knlp(&dir).args(train_args("tok")).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let proj = dir.join("runs/tok");
    let read = |p: &Path| -> Value { serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() };
    let ids = ["lenet5_adamw_none", "lenet5-pca_adamw_none", "lenet5-spline_pca_adamw_none"];
    let sums: Vec<Value> = ids.iter().map(|c| read(&proj.join(c).join("summary.json"))).collect();
    assert!(sums[0]["extra"].get("tokenizer").is_none(), "{}", sums[0]);
    for s in &sums[1..] {
        let t = &s["extra"]["tokenizer"];
        assert_eq!((t["components"].as_i64(), t["fitted_on"].as_i64()), (Some(16), Some(1000)), "{t}");
        let explained = t["explained"].as_f64().unwrap();
        let rel = t["eval_rel_mse"].as_f64().unwrap();
        assert!(explained > 0.3 && explained < 1.0 && rel > 0.0 && rel < 1.0, "{t}");
        // The cumulative rule at 0.3 / 0.5 over 16 components: 4, 4, 8.
        assert_eq!(t["tiers_by_variance"], serde_json::json!({ "hbm": 4, "cpu": 4, "ssd": 8 }));
    }
    // A network that sees 16 components learns something else than one
    // that sees the image; the two PCA cells see the same projection.
    let acc = |s: &Value| s["final_metrics"]["test_loss"].as_f64().unwrap();
    assert_ne!(acc(&sums[0]), acc(&sums[1]));
    assert_eq!(acc(&sums[1]), acc(&sums[2]));
    let spline = &sums[2]["extra"]["tokenizer"];
    assert_eq!(spline["recorded_steps"], 24, "{spline}");
    assert_eq!(spline["trajectory_variance"].as_array().map(Vec::len), Some(16));
    assert!(proj.join(ids[1]).join("tokenizer.safetensors").is_file());
    assert!(proj.join(ids[2]).join("tokenizer.safetensors").is_file());
    let config = read(&proj.join(ids[2]).join("config.json"));
    assert_eq!(config["data"]["tokenizer"]["method"], "spline_pca", "{config}");

    // The spline cell alone, killed after step 15 (last checkpoint: the
    // evaluation at step 10), then continued: the same trajectory and run.
    let dir2 = workdir("tokenizer-resume");
    std::fs::write(
        dir2.join(".config"),
        format!("{TOK}# CONFIG_TOKENIZER_NONE is not set\n# CONFIG_TOKENIZER_PCA is not set\n"),
    )
    .unwrap();
    kill_at_pause(&dir2, &train_args("tok"), "step:15", &dir2.join("paused"), Duration::from_secs(120));
    let o = knlp(&dir2).args(["continue", "tok"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let resumed = read(&dir2.join("runs/tok").join(ids[2]).join("summary.json"));
    assert_eq!(resumed["extra"]["tokenizer"], *spline);
    assert_eq!(resumed["final_metrics"], sums[2]["final_metrics"]);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&dir2);
}
