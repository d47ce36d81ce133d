//! `knlp sweep` (`make sweep SWEEP=file`): a sweep file expands to
//! configurations over the base `.config`, each checked by Kconfig before
//! anything runs, run as cells of one project through the matrix runner,
//! then ranked in `sweep_summary.{json,md,txt}`. Runs are LeNet-5 on the
//! CPU, 10 to 30 steps, with the defaults otherwise (one job, graphs on).
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const KNLP: &str = env!("CARGO_BIN_EXE_knlp");

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The base `.config`: a dense LeNet-5 run of 10 steps.
const BASE: &str = "CONFIG_MODEL_LENET5=y
CONFIG_OPTIMIZER_ADAMW=y
CONFIG_PRUNING_NONE=y
CONFIG_BATCH_SIZE=32
CONFIG_TRAIN_STEPS=10
CONFIG_LOG_EVERY=5
CONFIG_EVAL_EVERY=10
CONFIG_CHECKPOINT_EVERY=10
CONFIG_DEVICE_CPU=y
";

/// A scratch folder holding `.config` (the base) and `s.sweep`.
fn workdir(name: &str, sweep: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("knlp-sweep-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join(".config"), BASE).unwrap();
    std::fs::write(d.join("s.sweep"), sweep).unwrap();
    d
}

/// `knlp ARGS` in `dir`, as a user runs it there (the base is ./.config).
fn knlp(dir: &Path) -> Command {
    let mut c = Command::new(KNLP);
    c.current_dir(dir)
        .env("srctree", root())
        .env_remove("KCONFIG_CONFIG")
        .env_remove("KNLP_TEST_PAUSE")
        .env_remove("YES")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn sweep(dir: &Path, extra: &[&str]) -> Output {
    let kconfig = root().join("Kconfig");
    let mut args = vec!["sweep", "s.sweep", "--kconfig", kconfig.to_str().unwrap()];
    args.extend(extra);
    knlp(dir).args(&args).output().unwrap()
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

fn json(p: &Path) -> Value {
    let t = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&t).unwrap()
}

/// The project folders of sweeps under `dir/runs`.
fn sweep_projects(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("runs"))
        .map(|r| r.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.retain(|p| p.join("sweep.json").exists());
    v.sort();
    v
}

#[test]
fn dry_run_checks_and_lists_every_configuration_in_order() {
    let dir = workdir(
        "dry",
        "# learning rate x SGD on or off\n\
         CONFIG_OPTIMIZER_SGD=y|n   # choices\n\
         \n\
         CONFIG_LEARNING_RATE=1e-3:1e-3:3e-3   # an inclusive range: three values\n\
         CONFIG_SEED=7\n",
    );
    let o = sweep(&dir, &["--dry-run"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("6 configuration(s), 9 cell(s) in project sweep-s-"), "{out}");
    assert!(out.contains("CONFIG_LEARNING_RATE = 1e-3 | 2e-3 | 3e-3 (line 4)"), "{out}");
    // Keys sorted (LEARNING_RATE, OPTIMIZER_SGD, SEED), the last varying fastest;
    // each configuration is one or more numbered cells.
    let want = [
        "config_001: CONFIG_LEARNING_RATE=1e-3, CONFIG_OPTIMIZER_SGD=y, CONFIG_SEED=7",
        "   1. config_001_lenet5_sgd_none ",
        "   2. config_001_lenet5_adamw_none ",
        "config_002: CONFIG_LEARNING_RATE=1e-3, CONFIG_OPTIMIZER_SGD=n, CONFIG_SEED=7",
        "   3. config_002_lenet5_adamw_none ",
        "config_003: CONFIG_LEARNING_RATE=2e-3, CONFIG_OPTIMIZER_SGD=y",
        "config_006: CONFIG_LEARNING_RATE=3e-3, CONFIG_OPTIMIZER_SGD=n",
        "   9. config_006_lenet5_adamw_none                     lenet5, adamw, dense; 10 steps, batch 32",
        "6 configuration(s) checked by Kconfig; 9 of 9 cell(s) would run; nothing was started",
    ];
    let mut at = 0;
    for w in want {
        let i = out[at..].find(w).unwrap_or_else(|| panic!("'{w}' not in order in:\n{out}"));
        at += i + w.len();
    }
    assert!(!dir.join("runs").exists(), "a dry run wrote {}", dir.join("runs").display());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_invalid_configuration_stops_the_sweep_before_anything_runs() {
    let dir = workdir("invalid", "");
    let cases = [
        // Out of its range in the second configuration.
        ("\nCONFIG_BATCH_SIZE=32|0\n", "s.sweep:2: config_002 (CONFIG_BATCH_SIZE=0): CONFIG_BATCH_SIZE=0 does not hold (value is '64'; allowed range 1 to 65536)"),
        // A symbol whose dependency (GPT-2) the base does not enable.
        ("CONFIG_GPT2_N_LAYER=2:2:4\n", "s.sweep:1: config_001 (CONFIG_GPT2_N_LAYER=2): CONFIG_GPT2_N_LAYER=2 does not hold (value is ''; unmet dependencies: GPT2_SIZE_CUSTOM && MODEL_GPT2)"),
        // A value the experiment rejects.
        ("CONFIG_SEED=1\nCONFIG_LEARNING_RATE=\"1e-3\"|\"-1\"\n", "s.sweep:2: config_002 (CONFIG_LEARNING_RATE=-1, CONFIG_SEED=1): CONFIG_LEARNING_RATE=\"-1\": must be > 0"),
        // A configuration without cells.
        ("CONFIG_MODEL_LENET5=y|n\n", "s.sweep: config_002 (CONFIG_MODEL_LENET5=n): the configuration gives no cells; enable a model"),
        ("CONFIG_NO_SUCH_THING=1|2\n", "s.sweep:1: CONFIG_NO_SUCH_THING: the Kconfig tree defines no such symbol"),
        ("CONFIG_TRAIN_STEPS=10|1.5\n", "s.sweep:1: CONFIG_TRAIN_STEPS: '1.5' is not a value of this int symbol (it takes an integer)"),
        ("CONFIG_PARALLEL_JOBS=1|2\n", "s.sweep:1: CONFIG_PARALLEL_JOBS is a setting of the whole sweep"),
        ("# steps\nCONFIG_TRAIN_STEPS=10:0:20\n", "s.sweep:2: CONFIG_TRAIN_STEPS=10:0:20: the step 0 must be > 0"),
        ("CONFIG_LEARNING_RATE=0.3:0.1:0.1\n", "s.sweep:1: CONFIG_LEARNING_RATE=0.3:0.1:0.1: the start 0.3 is after the end 0.1"),
        ("CONFIG_SEED=1:1:200\nCONFIG_BATCH_SIZE=1:1:100\n", "s.sweep: 100 x 200 value(s) give 20000 configurations, more than 10000; narrow the ranges or pass --force"),
    ];
    for (spec, want) in cases {
        std::fs::write(dir.join("s.sweep"), spec).unwrap();
        // A real run, not a dry run: the checks come before anything is written.
        let o = sweep(&dir, &[]);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{spec}: {out}\n{err}");
        assert!(err.contains(want), "{spec}: want\n  {want}\ngot\n  {err}");
        assert!(!dir.join("runs").exists(), "{spec}: the sweep wrote {}", dir.join("runs").display());
    }
    // An override may not change what the sweep varies.
    std::fs::write(dir.join("s.sweep"), "CONFIG_LEARNING_RATE=1e-3|2e-3\n").unwrap();
    let o = sweep(&dir, &["--dry-run", "--set", "LR=0.1"]);
    let err = text(&o).1;
    assert!(
        err.contains("the override LR=0.1 changes CONFIG_LEARNING_RATE, which the sweep varies"),
        "{err}"
    );
    let o = sweep(&dir, &["--dry-run", "--base", "nothere"]);
    assert!(text(&o).1.contains("nothere: no base configuration"), "{}", text(&o).1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A sweep runs every configuration as cells of one project; the ranked
/// summary agrees with the cells' own results; results, check-config,
/// continue and BASELINE work on it as on any matrix.
#[test]
fn a_sweep_runs_and_ranks_its_configurations() {
    let dir = workdir("run", "CONFIG_LEARNING_RATE=\"1e-3\"|\"3e-3\"|\"1e30\"   # the last diverges\n");
    let t0 = Instant::now();
    let o = sweep(&dir, &[]);
    let (out, err) = text(&o);
    eprintln!("sweep of 3 cells: {:.1}s", t0.elapsed().as_secs_f64());
    assert_eq!(o.status.code(), Some(1), "a sweep with a failed cell exits 1: {out}\n{err}");
    let projects = sweep_projects(&dir);
    assert_eq!(projects.len(), 1, "{projects:?}");
    let proj = &projects[0];
    assert!(proj.file_name().unwrap().to_str().unwrap().starts_with("sweep-s-"), "{}", proj.display());
    assert!(out.contains("ranked by final test accuracy (higher is better):"), "{out}");
    assert!(proj.join("graphs/report.md").exists(), "the graphs are drawn as for any matrix");

    // Each cell ran its own configuration.
    let lrs = [("config_001", 1e-3, "1e-3"), ("config_002", 3e-3, "3e-3"), ("config_003", 1e30, "1e30")];
    for (c, lr, written) in lrs {
        let cfg = json(&proj.join(format!("{c}_lenet5_adamw_none/config.json")));
        assert_eq!(cfg["optimizer"]["lr"].as_f64(), Some(lr), "{c}");
        assert_eq!(cfg["cell"]["id"], format!("{c}_lenet5_adamw_none"));
        let frozen = std::fs::read_to_string(proj.join(format!("configs/{c}.config"))).unwrap();
        let lr_line = format!("CONFIG_LEARNING_RATE=\"{written}\"");
        assert!(frozen.lines().any(|l| l == lr_line), "{c}: {lr_line} in\n{frozen}");
    }
    // The frozen configurations pass `make check-config`.
    let kconfig = root().join("Kconfig");
    let mut args = vec!["check-config".to_string(), "--kconfig".into(), kconfig.display().to_string()];
    for (c, _, _) in lrs {
        args.push(proj.join(format!("configs/{c}.config")).display().to_string());
    }
    let o = knlp(&dir).args(&args).output().unwrap();
    assert!(o.status.success(), "{}", text(&o).0);

    // The ranked summary: best first, values from the cells' own summaries.
    let s = json(&proj.join("sweep_summary.json"));
    let ranked = s["ranked"].as_array().unwrap();
    assert_eq!(ranked.len(), 2, "{s:#}");
    let mut last = f64::INFINITY;
    for (i, r) in ranked.iter().enumerate() {
        assert_eq!(r["rank"], i + 1);
        assert_eq!(r["status"], "done");
        assert_eq!(r["metric"], "test_acc");
        let cell = r["cell"].as_str().unwrap();
        let own = json(&proj.join(cell).join("summary.json"));
        let acc = own["final_metrics"]["test_acc"].as_f64().unwrap();
        assert_eq!(r["value"].as_f64(), Some(acc), "{cell}");
        assert!(acc <= last, "ranked best first: {s:#}");
        last = acc;
        let lr = r["values"]["LEARNING_RATE"].as_str().unwrap();
        assert_eq!(cell.starts_with("config_001"), lr == "1e-3", "{cell}: {lr}");
    }
    let failed = s["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{s:#}");
    assert_eq!(failed[0]["cell"], "config_003_lenet5_adamw_none");
    assert_eq!(failed[0]["values"]["LEARNING_RATE"], "1e30");
    assert!(failed[0]["reason"].as_str().unwrap().contains("loss is NaN"), "{s:#}");
    // The markdown and text tables say the same, in the same order.
    let order: Vec<&str> = ranked.iter().map(|r| r["cell"].as_str().unwrap()).collect();
    for f in ["sweep_summary.md", "sweep_summary.txt"] {
        let t = std::fs::read_to_string(proj.join(f)).unwrap();
        let (a, b) = (t.find(order[0]).unwrap(), t.find(order[1]).unwrap());
        assert!(a < b, "{f}:\n{t}");
        let fail = t.lines().find(|l| l.contains("config_003_lenet5_adamw_none")).unwrap();
        assert!(
            fail.contains("1e30") && fail.contains("failed") && fail.contains("loss is NaN"),
            "{f}: {fail}"
        );
    }

    // `knlp results` (make results) and `knlp continue` (make continue) treat it as a matrix.
    let o = knlp(&dir).args(["results"]).output().unwrap();
    let (table, _) = text(&o);
    assert!(o.status.success() && table.contains("3 runs: 2 done, 1 failed"), "{table}");
    let o = knlp(&dir).args(["continue"]).output().unwrap();
    let (out, _) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("config_001_lenet5_adamw_none                     done, skipped"), "{out}");
    assert!(out.contains("sweep summary:"), "continue rewrites the summary: {out}");

    // BASELINE: a finished run is reused by the configuration that trains
    // the same thing, and refused, before anything is written, by a sweep
    // that has none.
    let base_run = format!("{}/config_001_lenet5_adamw_none", proj.file_name().unwrap().to_str().unwrap());
    std::fs::write(dir.join("s.sweep"), "CONFIG_LEARNING_RATE=\"2e-3\"|\"1e-3\"\n").unwrap();
    let o =
        sweep(&dir, &["--set", &format!("BASELINE={base_run}"), "--set", "STEPS=5", "--set", "PROJECT=b"]);
    let err = text(&o).1;
    assert!(err.contains("no configuration of the sweep trains what its cell"), "{err}");
    assert!(err.contains("(config_001_lenet5_adamw_none differs in opt.lr, train.steps)"), "{err}");
    assert!(!dir.join("runs/b").exists());
    let o = sweep(&dir, &["--dry-run", "--set", &format!("BASELINE={base_run}"), "--set", "PROJECT=b"]);
    let out = text(&o).0;
    assert!(out.contains("would be reused as 1 cell(s): config_002_lenet5_adamw_none"), "{out}");
    // Run, one configuration: its cell is the copied run, nothing trains.
    std::fs::write(dir.join("s.sweep"), "CONFIG_LEARNING_RATE=1e-3\n").unwrap();
    let o = sweep(&dir, &["--set", &format!("BASELINE={base_run}"), "--set", "PROJECT=b"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("reused as 1 cell(s): config_001_lenet5_adamw_none"), "{out}");
    assert!(out.contains("config_001_lenet5_adamw_none                     done, skipped"), "{out}");
    let (a, b) = (proj.join("config_001_lenet5_adamw_none"), dir.join("runs/b/config_001_lenet5_adamw_none"));
    assert_eq!(
        std::fs::read(a.join("metrics.jsonl")).unwrap(),
        std::fs::read(b.join("metrics.jsonl")).unwrap()
    );
    let s = json(&dir.join("runs/b/sweep_summary.json"));
    let ranked = s["ranked"].as_array().unwrap();
    assert_eq!(ranked.len(), 1, "{s:#}");
    assert_eq!(ranked[0]["cell"], "config_001_lenet5_adamw_none");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A sweep killed mid-cell continues with `knlp continue` (two jobs at
/// once here): every cell finishes, each step logged once, and the summary
/// is written.
#[test]
fn a_killed_sweep_continues() {
    let dir = workdir("continue", "CONFIG_LEARNING_RATE=1e-3:1e-3:2e-3\n");
    let cfg = BASE.replace("CONFIG_TRAIN_STEPS=10", "CONFIG_TRAIN_STEPS=20");
    std::fs::write(dir.join(".config"), cfg).unwrap();
    let marker = dir.join("paused");
    let kconfig = root().join("Kconfig");
    let mut child = knlp(&dir)
        .args(["sweep", "s.sweep", "--kconfig", kconfig.to_str().unwrap()])
        .env("KNLP_TEST_PAUSE", "step:15")
        .env("KNLP_TEST_PAUSE_FILE", &marker)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !marker.exists() {
        assert!(t0.elapsed() < Duration::from_secs(120), "never reached step 15");
        if let Some(st) = child.try_wait().unwrap() {
            panic!("finished ({st}) before the pause point");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let pgid = child.id() as i32;
    assert!(Command::new("kill").args(["-KILL", "--", &format!("-{pgid}")]).status().unwrap().success());
    let _ = child.wait();
    let projects = sweep_projects(&dir);
    assert_eq!(projects.len(), 1);
    let proj = &projects[0];
    assert!(!proj.join("sweep_summary.json").exists());
    let o = knlp(&dir).args(["continue", "--jobs", "2"]).output().unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("interrupted, resumes"), "{out}");
    for c in ["config_001_lenet5_adamw_none", "config_002_lenet5_adamw_none"] {
        let steps: Vec<i64> = std::fs::read_to_string(proj.join(c).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|r| r.get("train_loss").is_some())
            .map(|r| r["step"].as_i64().unwrap())
            .collect();
        assert_eq!(steps, [5, 10, 15, 20], "{c}");
    }
    let s = json(&proj.join("sweep_summary.json"));
    assert_eq!(s["ranked"].as_array().unwrap().len(), 2, "{s:#}");
    assert!(s["failed"].as_array().unwrap().is_empty() && s["unfinished"].as_array().unwrap().is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}
