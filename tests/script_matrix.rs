//! `matrix()` in scripts: every cell runs once under runs/<project>/<id>/,
//! in-process or in child processes with identical results, a cut-short
//! cell resumes on the next run, and a failing cell leaves the others.
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const KNLP: &str = env!("CARGO_BIN_EXE_knlp");

const SCRIPT: &str = r#"
let jobs = parse_int(ARGS[1]);
let stop = parse_int(ARGS[2]);
let fail = ARGS[3];
let ds = text_dataset(ARGS[0], #{ vocab_size: 64 });
let res = matrix(#{ optimizer: ["sgd", "adamw"], seed: [0, 1] }, #{ project: "m", jobs: jobs }, |c| {
    if c.id == fail { throw "cell " + c.id + " refuses"; }
    let m = gpt2(#{ n_layer: 1, n_head: 2, n_embd: 16, block_size: 16, vocab_size: 64, seed: c.seed });
    let o = optimizer(m, #{ kind: c.optimizer, lr: 3e-3 });
    train(m, o, ds, #{ steps: 8, batch_size: 4, eval_every: 4, eval_batches: 2, log_every: 2,
                       checkpoint_every: 2, stop_after: stop, progress: "off" });
});
for r in res { print("cell " + r.id + " " + r.status); }
"#;

const IDS: &[&str] = &["sgd_seed-0", "sgd_seed-1", "adamw_seed-0", "adamw_seed-1"];

fn workdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("knlp-smatrix-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("tok")).unwrap();
    // Token files: a repeating pattern, so the model has something to learn.
    for (split, n) in [("train", 4000usize), ("val", 800)] {
        let bytes: Vec<u8> = (0..n).flat_map(|i| (((i * 7) % 64) as u16).to_le_bytes()).collect();
        std::fs::write(d.join("tok").join(format!("{split}.bin")), bytes).unwrap();
    }
    std::fs::write(d.join("m.rhai"), SCRIPT).unwrap();
    d
}

/// Run the script; returns (success, stdout, stderr). Every run uses the
/// CPU threads a cell gets when two run at once (the cores halved), since
/// the thread count changes the order of floating-point sums.
fn run(dir: &Path, jobs: i64, stop: i64, fail: &str) -> (bool, String, String) {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let o = Command::new(KNLP)
        .current_dir(dir)
        .env("OMP_NUM_THREADS", (cores / 2).max(1).to_string())
        .env_remove("KNLP_MATRIX_CELL")
        .args(["run", "m.rhai", "tok", &jobs.to_string(), &stop.to_string(), fail])
        .output()
        .unwrap();
    (o.status.success(), String::from_utf8_lossy(&o.stdout).into(), String::from_utf8_lossy(&o.stderr).into())
}

fn json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Logged records without wall-clock fields.
fn metrics(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            for k in ["elapsed_s", "step_ms", "tokens_per_s", "samples_per_s"] {
                v.as_object_mut().unwrap().remove(k);
            }
            v
        })
        .collect()
}

#[test]
fn cells_run_once_in_process_and_in_children_alike() {
    let one = workdir("one");
    let (ok, out, err) = run(&one, 1, 0, "");
    assert!(ok, "{out}\n{err}");
    for id in IDS {
        assert!(out.contains(&format!("cell {id} done")), "{id}: {out}");
        let run = one.join("runs/m").join(id);
        assert_eq!(json(&run.join("status.json"))["status"], "done");
        let cfg = json(&run.join("config.json"));
        assert_eq!(cfg["cell"]["id"], *id, "config.json records the cell");
        assert_eq!(metrics(&run).iter().filter(|r| r.get("train_loss").is_some()).count(), 4);
    }
    // Seeds differ, so cells differ: the closure really got its cell.
    assert_ne!(metrics(&one.join("runs/m/sgd_seed-0")), metrics(&one.join("runs/m/sgd_seed-1")));
    // A second run finds everything done and trains nothing.
    let (ok, out, _) = run(&one, 1, 0, "");
    assert!(ok && out.contains("4 cells, 0 to run"), "{out}");

    let two = workdir("two");
    let (ok, out, err) = run(&two, 2, 0, "");
    assert!(ok, "{out}\n{err}");
    for id in IDS {
        let (a, b) = (one.join("runs/m").join(id), two.join("runs/m").join(id));
        assert_eq!(json(&b.join("status.json"))["status"], "done", "{id}");
        assert_eq!(metrics(&a), metrics(&b), "{id}: a child process trains as the parent does");
        assert!(b.join("output.log").exists(), "{id}: the child's output is kept");
    }
}

#[test]
fn a_cut_short_cell_resumes_and_a_failing_one_is_recorded() {
    let reference = workdir("ref");
    assert!(run(&reference, 1, 0, "").0);
    let dir = workdir("resume");
    // Every cell stops after 4 steps, as if the process died there.
    let (ok, out, err) = run(&dir, 1, 4, "");
    assert!(ok, "{out}\n{err}");
    for id in IDS {
        assert_eq!(json(&dir.join("runs/m").join(id).join("status.json"))["status"], "running");
    }
    // The next run resumes each cell from its checkpoint; one cell now fails.
    let (ok, out, err) = run(&dir, 1, 0, "adamw_seed-0");
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("4 cells, 4 to run"), "{out}");
    for id in IDS {
        let run = dir.join("runs/m").join(id);
        let st = json(&run.join("status.json"));
        if *id == "adamw_seed-0" {
            assert_eq!(st["status"], "failed");
            assert!(st["reason"].as_str().unwrap().contains("refuses"), "{st}");
        } else {
            assert_eq!(st["status"], "done", "{id}");
            assert_eq!(metrics(&run), metrics(&reference.join("runs/m").join(id)), "{id}: resumed exactly");
        }
    }
    // Only the failed cell runs again.
    let (ok, out, _) = run(&dir, 1, 0, "");
    assert!(ok && out.contains("4 cells, 1 to run"), "{out}");
    assert_eq!(json(&dir.join("runs/m/adamw_seed-0/status.json"))["status"], "done");
}
