//! Experiment tracking: the tracker spec, the local sink's files, a run
//! logged to trackio and read back with trackio's own API, and remote sinks
//! that fail without failing the run (fast, CPU).
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use knlp::runs::{RunDir, LOG};
use knlp::track::trackio::{python, store_dir, TRACKIO_VERSION};
use knlp::track::{naming, parse_spec, run_names, RunInfo, Sink, Tracker, TrackioSink};
use serde_json::{json, Map, Value};

/// The tests that set process environment variables (`KNLP_PYTHON`,
/// `TRACKIO_DIR`, `HF_HOME`) or spawn the Python child run one at a time.
static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn env_lock() -> std::sync::MutexGuard<'static, ()> {
    ENV.lock().unwrap_or_else(|e| e.into_inner())
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("knlp-track-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn obj(v: Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap()
}

fn records() -> Vec<Map<String, Value>> {
    (0..4)
        .map(|i| {
            obj(json!({
                "step": i * 10,
                "epoch": 0,
                "train_loss": 2.0 / (i + 1) as f64,
                "lr": 1e-3 * (i + 1) as f64,
                "note": "text is not a metric",
                "flag": true,
            }))
        })
        .collect()
}

fn config(lr: f64) -> Value {
    json!({"arch": "mlp", "optimizer": {"kind": "adamw", "lr": lr}, "train": {"steps": 30}})
}

#[test]
fn spec_parsing() {
    let names = |s: &str| parse_spec(s).unwrap();
    assert_eq!(names(""), ["local"]);
    assert_eq!(names("local"), ["local"]);
    assert_eq!(names("none"), ["local"]);
    assert_eq!(names("trackio"), ["local", "trackio"]);
    assert_eq!(names("local,trackio"), ["local", "trackio"]);
    assert_eq!(names(" Trackio , local,trackio "), ["local", "trackio"]);
    let err = |s: &str| format!("{:#}", parse_spec(s).unwrap_err());
    let e = err("bogus");
    assert!(e.contains("unknown tracker 'bogus'") && e.contains("local, trackio, none"), "{e}");
    let e = err("both");
    assert!(e.contains("unknown tracker 'both'"), "{e}");
    let e = err("local,wandb");
    assert!(e.contains("'wandb' is not available in this build") && e.contains("trackio"), "{e}");
    let e = err("none,trackio");
    assert!(e.contains("cannot be combined"), "{e}");
    assert_eq!(Tracker::from_spec("trackio").unwrap().sinks(), ["local", "trackio"]);
    assert_eq!(Tracker::from_spec("none").unwrap().sinks(), ["local"]);
    assert!(Tracker::from_spec("wandb").is_err());

    assert_eq!(naming(Path::new("/x/runs/sweep/lr0.1-seed0")), ("sweep".into(), "lr0.1-seed0".into()));
    assert_eq!(naming(Path::new("/x/runs/lenet5-adamw")), ("knlp".into(), "lenet5-adamw".into()));
    assert_eq!(naming(Path::new("/tmp/scratch/run-1")), ("knlp".into(), "run-1".into()));
    let (p, r) = naming(Path::new("runs/gpt2-adamw"));
    assert_eq!((p.as_str(), r.as_str()), ("knlp", "gpt2-adamw"));
    // A matrix cell's record names its project and cell, wherever it lives.
    let rec = json!({"project": "sweep", "cell": {"id": "lenet5_adamw_none", "sparsity": 0.0}});
    assert_eq!(run_names(Path::new("/x/out/sweep/c1"), &rec), ("sweep".into(), "lenet5_adamw_none".into()));
    assert_eq!(run_names(Path::new("/x/runs/p/c"), &json!({"arch": "mlp"})), ("p".into(), "c".into()));
}

#[test]
fn local_sink_writes_metrics_summary_and_system() {
    let root = scratch("local");
    let dir = root.join("runs").join("proj").join("cell");
    let run = RunDir::open(&dir).unwrap();
    // Leftovers of an earlier run in the same directory.
    run.append_metrics(&json!({"step": 99, "train_loss": 9.0})).unwrap();
    run.write_json(knlp::runs::SUMMARY, &json!({"status": "failed"})).unwrap();

    let mut t = Tracker::from_spec("local").unwrap();
    let info = RunInfo::new(&dir, config(0.1), false);
    assert_eq!((info.project.as_str(), info.run_name.as_str()), ("proj", "cell"));
    t.start(&info).unwrap();
    assert!(!run.file(knlp::runs::SUMMARY).exists(), "a fresh start drops the stale summary");
    for r in records() {
        t.log(&r).unwrap();
    }
    let summary = json!({"status": "done", "steps": 30, "final_metrics": {"test_acc": 0.5}});
    t.finish(&summary, "done").unwrap();
    assert!(t.warnings().is_empty());

    let got = run.metrics().unwrap();
    let want: Vec<Value> = records().into_iter().map(Value::Object).collect();
    assert_eq!(got, want);
    assert_eq!(run.read_json(knlp::runs::SUMMARY).unwrap(), summary);
    assert_eq!(run.read_json(knlp::runs::CONFIG).unwrap(), config(0.1));

    let sys = run.read_json(knlp::track::local::SYSTEM).unwrap();
    for key in [
        "devices",
        "cuda_device_count",
        "cpu_model",
        "cpu_cores",
        "hostname",
        "os",
        "knlp_version",
        "libtorch_version",
        "config_hash",
        "created",
    ] {
        assert!(sys.get(key).is_some(), "system.json lacks {key}: {sys}");
    }
    let devices = sys["devices"].as_array().unwrap();
    assert!(!devices.is_empty() && devices.iter().all(|d| d["name"].is_string()), "{sys}");
    assert!(sys["cpu_cores"].as_u64().unwrap() >= 1);
    assert_eq!(sys["knlp_version"], env!("CARGO_PKG_VERSION"));
    assert!(sys["libtorch_version"].as_str().unwrap().starts_with('2'), "{sys}");
    assert_eq!(sys["cuda_device_count"], tch::Cuda::device_count());
    let hash = sys["config_hash"].as_str().unwrap().to_string();
    assert_eq!(hash.len(), 16);
    assert!(hash.chars().all(|c| c.is_ascii_hexdigit()));
    // The git commit of the working directory, when it is a git work tree.
    let head = Command::new("git").args(["rev-parse", "HEAD"]).output().ok().filter(|o| o.status.success());
    match head {
        Some(o) => {
            let commit = String::from_utf8_lossy(&o.stdout).trim().to_string();
            assert_eq!(sys["git"]["commit"], commit.as_str(), "{sys}");
            assert!(sys["git"]["dirty"].is_boolean(), "{sys}");
        }
        None => assert!(sys.get("git").is_none(), "{sys}"),
    }

    // Same configuration (keys in another order): same hash; another one: not.
    let same = json!({"train": {"steps": 30}, "optimizer": {"lr": 0.1, "kind": "adamw"}, "arch": "mlp"});
    assert_eq!(RunInfo::new(&dir, same, false).system.config_hash, hash);
    assert_eq!(knlp::track::config_hash(&config(0.1)), hash);
    assert_ne!(knlp::track::config_hash(&config(0.2)), hash);

    // A resumed start keeps metrics.jsonl and config.json.
    let mut t = Tracker::from_spec("local").unwrap();
    t.start(&RunInfo::new(&dir, config(0.3), true)).unwrap();
    t.log(&obj(json!({"step": 40, "train_loss": 0.1}))).unwrap();
    assert_eq!(run.metrics().unwrap().len(), 5);
    assert_eq!(run.read_json(knlp::runs::CONFIG).unwrap(), config(0.1));
    let _ = std::fs::remove_dir_all(&root);
}

/// Fail (not skip) without trackio in the interpreter the sink will run.
fn require_trackio(py: &Path) {
    let ok = Command::new(py).args(["-c", "import trackio"]).output().is_ok_and(|o| o.status.success());
    if !ok {
        panic!(
            "trackio is not importable by {}; install it with: {} -m pip install trackio=={TRACKIO_VERSION} \
             (make setup does)",
            py.display(),
            py.display()
        );
    }
}

/// Read a run back with trackio's own storage API.
fn read_back(py: &Path, store: &Path, project: &str, run: &str) -> Value {
    let script = r#"
import json, sys
from trackio.sqlite_storage import SQLiteStorage as S
project, run = sys.argv[1], sys.argv[2]
print(json.dumps({
    "projects": S.get_projects(),
    "runs": S.get_runs(project),
    "logs": S.get_logs(project, run),
    "config": S.get_run_config(project, run),
}, default=str))
"#;
    let out = Command::new(py)
        .args(["-c", script, project, run])
        .env("TRACKIO_DIR", store)
        .env("HF_HOME", store.join("hf"))
        .output()
        .unwrap();
    assert!(out.status.success(), "read-back failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn trackio_run_reads_back_with_trackios_api() {
    let _g = env_lock();
    std::env::remove_var("KNLP_PYTHON");
    let py = python();
    require_trackio(&py);
    let root = scratch("trackio");
    let store = root.join("trackio-store");
    // trackio's store for this test only; the user's is never touched.
    std::env::set_var("TRACKIO_DIR", &store);
    std::env::set_var("HF_HOME", root.join("hf"));
    assert_eq!(store_dir(), store);
    let dir = root.join("runs").join("knlp-track-test").join("cell-lr0.1");
    RunDir::open(&dir).unwrap();

    let mut t = Tracker::from_spec("local,trackio").unwrap();
    t.start(&RunInfo::new(&dir, config(0.1), false)).unwrap();
    for r in records() {
        t.log(&r).unwrap();
    }
    t.finish(&json!({"status": "done"}), "done").unwrap();
    assert!(t.warnings().is_empty(), "{:?}", t.warnings());
    assert_eq!(t.sinks(), ["local", "trackio"]);

    // A resumed run with the same name continues the same trackio run, and
    // the child outlives a Ctrl-C (the trainer finishes the run after one).
    // Steps 20 and 30 were logged before the interruption and are replayed
    // from an earlier checkpoint: trackio must not get them twice.
    let mut sink = TrackioSink::new();
    let mut info = RunInfo::new(&dir, config(0.1), true);
    info.logged_through = Some(30);
    sink.start(&info).unwrap();
    let pid = sink.pid().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(300));
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    for replayed in &records()[2..] {
        sink.log(replayed).unwrap();
    }
    sink.log(&obj(json!({"step": 40, "train_loss": 0.25, "lr": 5e-3}))).unwrap();
    sink.finish(&json!({"status": "interrupted"}), "interrupted").unwrap();
    std::env::remove_var("TRACKIO_DIR");
    std::env::remove_var("HF_HOME");

    let got = read_back(&py, &store, "knlp-track-test", "cell-lr0.1");
    assert!(got["projects"].as_array().unwrap().contains(&json!("knlp-track-test")), "{got}");
    assert_eq!(got["runs"], json!(["cell-lr0.1"]), "{got}");
    let logs = got["logs"].as_array().unwrap();
    let mut want = records();
    want.push(obj(json!({"step": 40, "train_loss": 0.25, "lr": 5e-3})));
    assert_eq!(logs.len(), want.len(), "{got}");
    for (l, w) in logs.iter().zip(&want) {
        assert_eq!(l["step"], w["step"], "{got}");
        for key in ["train_loss", "lr"] {
            let (a, b) = (l[key].as_f64().unwrap(), w[key].as_f64().unwrap());
            assert!((a - b).abs() < 1e-12, "{key} at step {}: {a} vs {b}", w["step"]);
        }
        assert!(l.get("note").is_none() && l.get("flag").is_none(), "only numbers are logged: {l}");
    }
    assert_eq!(got["config"]["optimizer"]["lr"], 0.1, "{got}");
    let log = std::fs::read_to_string(dir.join(LOG)).unwrap();
    assert!(log.contains("trackio: ") && !log.contains('\u{1b}'), "{log}");
    let _ = std::fs::remove_dir_all(&root);
}

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn a_crashing_trackio_child_does_not_fail_the_run() {
    let _g = env_lock();
    let root = scratch("crash");
    let dir = root.join("runs").join("p").join("crashing");
    RunDir::open(&dir).unwrap();
    let crash = script(&root, "python-crash", "echo 'simulated crash' >&2; exit 7");
    std::env::set_var("KNLP_PYTHON", &crash);
    let mut t = Tracker::from_spec("local,trackio").unwrap();
    t.start(&RunInfo::new(&dir, config(0.1), false)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    for r in records() {
        t.log(&r).unwrap();
    }
    t.finish(&json!({"status": "done"}), "done").unwrap();
    std::env::remove_var("KNLP_PYTHON");
    assert_eq!(t.sinks(), ["local"]);
    assert_eq!(t.warnings().len(), 1, "warned once: {:?}", t.warnings());
    assert!(t.warnings()[0].contains("trackio"), "{:?}", t.warnings());
    let run = RunDir::open(&dir).unwrap();
    assert_eq!(run.metrics().unwrap().len(), records().len());
    assert_eq!(run.read_json(knlp::runs::SUMMARY).unwrap()["status"], "done");
    let log = std::fs::read_to_string(run.file(LOG)).unwrap();
    assert!(log.contains("simulated crash") && log.contains("tracker 'trackio' disabled"), "{log}");

    // A missing interpreter: the same.
    let mut t = Tracker::from_spec("local").unwrap();
    t.add(Box::new(TrackioSink::new().with_python(root.join("no-such-python"))));
    t.start(&RunInfo::new(&dir, config(0.1), true)).unwrap();
    t.log(&records()[0]).unwrap();
    t.finish(&json!({"status": "done"}), "done").unwrap();
    assert_eq!((t.sinks(), t.warnings().len()), (vec!["local"], 1));

    // A child that hangs: finish gives up after its time-out.
    let hang = script(&root, "python-hang", "exec sleep 30");
    let mut t = Tracker::from_spec("local").unwrap();
    t.add(Box::new(TrackioSink::new().with_python(hang).with_timeout(Duration::from_millis(500))));
    t.start(&RunInfo::new(&dir, config(0.1), true)).unwrap();
    t.log(&records()[0]).unwrap();
    let t0 = Instant::now();
    t.finish(&json!({"status": "done"}), "done").unwrap();
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert_eq!(t.warnings().len(), 1);
    assert!(t.warnings()[0].contains("killed"), "{:?}", t.warnings());
    let _ = std::fs::remove_dir_all(&root);
}
