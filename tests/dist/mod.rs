//! Distributed data parallel on Gloo CPU ranks (docs/distributed.md):
//! `knlp run --nproc N` and torchrun against one process with the same
//! global batch, a rank that dies, and a matrix cell resumed on another
//! number of ranks. Included by tests/train.rs (one test binary less).
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tch::{Kind, Tensor};

const KNLP: &str = env!("CARGO_BIN_EXE_knlp");

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("knlp-dist-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn knlp(dir: &Path) -> Command {
    let mut c = Command::new(KNLP);
    c.current_dir(dir)
        .env("srctree", root())
        .env("KCONFIG_CONFIG", dir.join(".config"))
        .env_remove("KNLP_TEST_PAUSE")
        .env_remove("WORLD_SIZE")
        .env_remove("RANK")
        .env_remove("MASTER_PORT")
        .env("KNLP_DIST_TIMEOUT", "60");
    c
}

fn ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what}: {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn tensors(path: &Path) -> Vec<(String, Tensor)> {
    knlp::safetensors::load(path).unwrap_or_else(|e| panic!("{e}")).tensors
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

fn metrics(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_else(|e| panic!("{}: {e}", run.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The logged values of `key`, by step.
fn series(run: &Path, key: &str) -> Vec<(i64, f64)> {
    metrics(run).iter().filter_map(|r| Some((r["step"].as_i64()?, r.get(key)?.as_f64()?))).collect()
}

fn close_series(a: &[(i64, f64)], b: &[(i64, f64)], tol: f64, what: &str) {
    assert!(!a.is_empty(), "{what}: nothing logged");
    assert_eq!(
        a.iter().map(|x| x.0).collect::<Vec<_>>(),
        b.iter().map(|x| x.0).collect::<Vec<_>>(),
        "{what}: steps"
    );
    for ((s, x), (_, y)) in a.iter().zip(b) {
        assert!((x - y).abs() <= tol * x.abs().max(1.0), "{what} at step {s}: {x} against {y}");
    }
}

/// Every rank ends with the same parameters and masks, bit for bit, and
/// they are the single process's to 1e-6 (masks exactly).
fn check_job(out: &Path, world: usize, label: &str) {
    for kind in ["adamw", "bitter7"] {
        let reference = tensors(&out.join(format!("{kind}-single.safetensors")));
        let r0 = tensors(&out.join(format!("{kind}-w{world}-r0.safetensors")));
        assert_eq!(r0.len(), reference.len());
        for r in 1..world {
            let other = tensors(&out.join(format!("{kind}-w{world}-r{r}.safetensors")));
            for ((n, a), (_, b)) in r0.iter().zip(&other) {
                assert_eq!(max_diff(a, b), 0.0, "{label} {kind}: rank {r}'s {n} differs from rank 0's");
            }
        }
        for ((n, a), (m, b)) in r0.iter().zip(&reference) {
            assert_eq!(n, m);
            let d = max_diff(a, b);
            let tol = if n.starts_with("mask.") { 0.0 } else { 1e-6 };
            assert!(d <= tol, "{label} {kind}: {n} is {d} from the single process's");
        }
        let (a, b) = (out.join(format!("{kind}-w{world}-r0")), out.join(format!("{kind}-single")));
        close_series(
            &series(&a, "train_loss"),
            &series(&b, "train_loss"),
            1e-5,
            &format!("{label} {kind} loss"),
        );
        close_series(
            &series(&a, "test_acc"),
            &series(&b, "test_acc"),
            0.0,
            &format!("{label} {kind} accuracy"),
        );
        // Only rank 0 writes the run.
        let r1 = out.join(format!("{kind}-w{world}-r1"));
        assert!(
            !r1.join("metrics.jsonl").exists() && !r1.join("status.json").exists(),
            "{label}: rank 1 wrote its run"
        );
    }
}

fn ddp_script() -> String {
    root().join("tests/scripts/ddp.rhai").display().to_string()
}

#[test]
fn ddp_on_two_and_three_ranks_matches_one_process() {
    let d = scratch("equal");
    let out = d.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let o = knlp(&d).args(["run", &ddp_script(), out.to_str().unwrap()]).output().unwrap();
    ok(&o, "single process");
    for world in [2usize, 3] {
        let o = knlp(&d)
            .args(["run", "--nproc", &world.to_string(), &ddp_script(), out.to_str().unwrap()])
            .output()
            .unwrap();
        ok(&o, &format!("--nproc {world}"));
        let text = String::from_utf8_lossy(&o.stdout);
        for r in 0..world {
            assert!(text.contains(&format!("rank {r}: sparsity")), "rank {r} did not finish:\n{text}");
        }
        check_job(&out, world, &format!("--nproc {world}"));
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn torchrun_launches_knlp_ranks() {
    let torchrun = root().join(".venv/bin/torchrun");
    if !torchrun.exists() {
        eprintln!("skipped: {} is not installed (make setup installs it)", torchrun.display());
        return;
    }
    let d = scratch("torchrun");
    let out = d.join("out");
    std::fs::create_dir_all(&out).unwrap();
    ok(&knlp(&d).args(["run", &ddp_script(), out.to_str().unwrap()]).output().unwrap(), "single process");
    let o = Command::new(&torchrun)
        .current_dir(&d)
        .env_remove("WORLD_SIZE")
        .env("KNLP_DIST_TIMEOUT", "60")
        .args(["--standalone", "--nproc-per-node", "2", "--no-python", KNLP, "run", &ddp_script()])
        .arg(&out)
        .output()
        .unwrap();
    ok(&o, "torchrun");
    check_job(&out, 2, "torchrun");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_failing_rank_ends_the_job_within_seconds() {
    let d = scratch("dead");
    let script = d.join("dead.rhai");
    std::fs::write(
        &script,
        "barrier();\nif dist_rank() == 1 { exit(9); }\nlet t = zeros([4]);\nall_reduce(t, \"sum\");\nprint(\"never\");\n",
    )
    .unwrap();
    let t0 = Instant::now();
    let o = knlp(&d).args(["run", "--nproc", "3"]).arg(&script).output().unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(9), "the job ends with the rank's status: {err}");
    assert!(err.contains("rank 1 exited with status 9; stopping the other 2 rank(s)"), "{err}");
    assert!(!String::from_utf8_lossy(&o.stdout).contains("never"));
    assert!(secs < 15.0, "took {secs:.1} s");
    // A bad launch is refused with the variable's name.
    let o = knlp(&d).env("WORLD_SIZE", "2").env("RANK", "5").arg("run").arg(&script).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("RANK=5"), "{}", String::from_utf8_lossy(&o.stderr));
    let o = knlp(&d).args(["run", "--nproc", "0"]).arg(&script).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--nproc must be at least 1"));
    let _ = std::fs::remove_dir_all(&d);
}

const GPT2_CONFIG: &str = "# CONFIG_MODEL_LENET5 is not set
CONFIG_MODEL_GPT2=y
CONFIG_GPT2_N_LAYER=2
CONFIG_GPT2_N_HEAD=2
CONFIG_GPT2_N_EMBD=32
CONFIG_GPT2_BLOCK_SIZE=32
CONFIG_OPTIMIZER_ADAMWPRUNE=y
# CONFIG_OPTIMIZER_ADAMW is not set
# CONFIG_PRUNING_NONE is not set
CONFIG_PRUNING_STATE=y
CONFIG_SPARSITY_50=y
# CONFIG_SPARSITY_70 is not set
CONFIG_ADAMWPRUNE_VARIANT_BITTER7=y
CONFIG_PRUNING_WARMUP=2
CONFIG_PRUNING_RAMP_END=10
CONFIG_PRUNING_FREQUENCY=2
CONFIG_BATCH_SIZE=6
CONFIG_EVAL_BATCHES=2
CONFIG_TRAIN_STEPS=12
CONFIG_LOG_EVERY=2
CONFIG_EVAL_EVERY=4
CONFIG_CHECKPOINT_EVERY=4
CONFIG_DEVICE_CPU=y
CONFIG_AUTO_GRAPHS=n
";

/// A rank SIGKILLed mid-run: the launcher ends the job within seconds, the
/// cell is left interrupted, and `knlp continue` finishes it on 1 or 3
/// ranks with the metrics of an uninterrupted single process.
#[test]
fn a_killed_rank_leaves_the_cell_to_continue_on_any_number_of_ranks() {
    let d = scratch("continue");
    std::fs::write(d.join(".config"), GPT2_CONFIG).unwrap();
    let kconfig = root().join("Kconfig").display().to_string();
    let train = |project: &str| -> Vec<String> {
        vec![
            "train".into(),
            "--kconfig".into(),
            kconfig.clone(),
            "--set".into(),
            format!("PROJECT={project}"),
        ]
    };
    let o = knlp(&d).args(train("reference")).output().unwrap();
    ok(&o, "reference");
    let cell = "gpt2_adamwprune_state-bitter7_50";
    let reference = d.join("runs/reference").join(cell);
    for resume_on in [1usize, 3] {
        let project = format!("ddp{resume_on}");
        let marker = d.join(format!("paused-{resume_on}"));
        let mut args = train(&project);
        args.extend(["--nproc".into(), "2".into()]);
        let child = knlp(&d)
            .args(&args)
            .env("KNLP_TEST_PAUSE", "step:6")
            .env("KNLP_TEST_PAUSE_FILE", &marker)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        let pid = loop {
            assert!(t0.elapsed() < Duration::from_secs(120), "never reached step 6");
            if let Some(pid) = std::fs::read_to_string(&marker)
                .ok()
                .and_then(|s| s.split("pid ").nth(1).and_then(|p| p.trim().parse::<i32>().ok()))
            {
                break pid;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let killed = Instant::now();
        assert!(Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap().success());
        let o = child.wait_with_output().unwrap();
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "the job outlived its rank by {:?}",
            killed.elapsed()
        );
        assert!(!o.status.success());
        let status: Value = serde_json::from_str(
            &std::fs::read_to_string(d.join("runs").join(&project).join(cell).join("status.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(status["status"], "interrupted", "{status}");
        assert!(status["reason"].as_str().unwrap_or("").contains("killed by signal 9"), "{status}");
        let o = knlp(&d).args(["continue", &project, "--nproc", &resume_on.to_string()]).output().unwrap();
        ok(&o, &format!("continue on {resume_on}"));
        let run = d.join("runs").join(&project).join(cell);
        for key in ["train_loss", "val_loss", "sparsity"] {
            let (a, b) = (series(&run, key), series(&reference, key));
            if key == "sparsity" && b.is_empty() {
                continue;
            }
            close_series(&a, &b, 2e-5, &format!("2 ranks, then {resume_on}: {key}"));
        }
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// Ctrl-C reaches the launcher once; it forwards it, the ranks agree on the
/// step to stop at, rank 0 checkpoints there and no rank is left running.
#[test]
fn ctrl_c_stops_every_rank_at_one_checkpointed_step() {
    let d = scratch("ctrlc");
    let script = d.join("long.rhai");
    std::fs::write(
        &script,
        r#"import "nn" as nn;
let b = model_builder(#{ arch: "mlp", classes: 10, seed: 0 });
let net = nn::mlp(b, "net", [784, 32, 10]);
let m = b.build(|x| nn::apply(net, x.flatten(1)));
let images = fashion_mnist(#{ split: "test" }).slice(0, 640);
train(m, sgd(m, #{ lr: 0.01 }), loader(images, #{ batch_size: 32, shuffle: true, seed: 1 }),
      #{ steps: 1000000, progress: "off", run_dir: ARGS[0] });
"#,
    )
    .unwrap();
    let run = d.join("run");
    let mut child = knlp(&d)
        .args(["run", "--nproc", "2"])
        .arg(&script)
        .arg(&run)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !run.join("metrics.jsonl").exists() {
        assert!(t0.elapsed() < Duration::from_secs(60), "training never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let sent = Instant::now();
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    let launcher = child.id();
    let o = {
        let t = Instant::now();
        loop {
            if child.try_wait().unwrap().is_some() {
                break child.wait_with_output().unwrap();
            }
            assert!(t.elapsed() < Duration::from_secs(20), "the job did not stop after Ctrl-C");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    assert!(sent.elapsed() < Duration::from_secs(20), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.status.code(), Some(130), "{}", String::from_utf8_lossy(&o.stderr));
    let status: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("status.json")).unwrap()).unwrap();
    assert_eq!(status["status"], "interrupted", "{status}");
    assert!(run.join("checkpoints/last.safetensors").exists());
    // No rank outlives the launcher.
    let orphans: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("cmdline")).ok())
        .filter(|c| c.contains(run.to_str().unwrap()))
        .collect();
    assert!(orphans.is_empty(), "ranks of launcher {launcher} still running: {orphans:?}");
    let _ = std::fs::remove_dir_all(&d);
}
