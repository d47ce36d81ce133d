//! `knlp scaling` (`make scaling-curves`, docs/scaling.md): measured curves
//! from GPT-2 runs where a project has two or more distinct x, the seed's
//! analytic parabola otherwise. The ratio of each run is recomputed here
//! from the GPT-2 layer shapes, independently of the model code.
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::{json, Value};

const KNLP: &str = env!("CARGO_BIN_EXE_knlp");

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("knlp-scaling-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn knlp(dir: &Path, args: &[&str]) -> Output {
    Command::new(KNLP)
        .current_dir(dir)
        .env("srctree", root())
        .env_remove("KCONFIG_CONFIG")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// MLP over attention parameters of one biased GPT-2 block of width d and
/// MLP width h: c_fc + c_proj over c_attn + c_proj.
fn ratio(d: f64, h: f64) -> f64 {
    (d * h + h + h * d + d) / (d * 3.0 * d + 3.0 * d + d * d + d)
}

/// A finished GPT-2 run folder as the matrix writes it (the files the
/// report reads).
fn run(dir: &Path, name: &str, model: Value, val_loss: f64, tokens_per_s: f64) {
    let r = dir.join(name);
    std::fs::create_dir_all(&r).unwrap();
    let config = json!({ "arch": "gpt2", "model": model, "cell": { "id": name, "model": "gpt2",
        "optimizer": "adamw", "pruning": "none", "variant": null, "sparsity": 0.0 } });
    std::fs::write(r.join("config.json"), config.to_string()).unwrap();
    std::fs::write(r.join("status.json"), json!({ "status": "done" }).to_string()).unwrap();
    let summary = json!({ "status": "done", "steps": 10, "final_metrics": { "step": 10, "val_loss": val_loss },
        "throughput": tokens_per_s, "throughput_unit": "tokens_per_s" });
    std::fs::write(r.join("summary.json"), summary.to_string()).unwrap();
    std::fs::write(r.join("metrics.jsonl"), json!({ "step": 10, "val_loss": val_loss }).to_string() + "\n")
        .unwrap();
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap()
}

fn curve<'a>(rep: &'a Value, key: &str) -> &'a Value {
    rep["curves"].as_array().unwrap().iter().find(|c| c["key"] == key).unwrap()
}

fn assert_png(p: &Path) {
    let b = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(b.len() > 1000 && b.starts_with(b"\x89PNG\r\n\x1a\n"), "{} is not a drawn PNG", p.display());
}

#[test]
fn measured_ratio_curve_fits_the_parabola_the_runs_lie_on() {
    let d = scratch("ratio");
    let proj = d.join("runs/sw");
    // Width 64: h = 64..384 gives ratios 0.5 .. 3.0; the loss lies on
    // 0.5 (x − 1.7)² + 2, so the fit must find 1.7, not the seed's 1.4.
    let hs = [64, 128, 192, 256, 320, 384];
    for (i, h) in hs.iter().enumerate() {
        let x = ratio(64.0, *h as f64);
        let model = json!({ "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32, "mlp_hidden": h });
        run(
            &proj,
            &format!("config_{:03}_gpt2_adamw_none", i + 1),
            model,
            0.5 * (x - 1.7f64).powi(2) + 2.0,
            5e4,
        );
    }
    // What the report must leave out, and say why.
    let lenet = proj.join("lenet");
    std::fs::create_dir_all(&lenet).unwrap();
    std::fs::write(lenet.join("config.json"), json!({ "arch": "lenet5", "model": {} }).to_string()).unwrap();
    std::fs::write(lenet.join("status.json"), json!({ "status": "done" }).to_string()).unwrap();
    run(&proj, "broken", json!({ "n_layer": 2 }), 1.0, 1.0);
    std::fs::write(proj.join("broken/config.json"), "{ not json").unwrap();
    run(&proj, "failed", json!({ "n_embd": 64, "mlp_hidden": 999 }), 1.0, 1.0);
    std::fs::write(proj.join("failed/status.json"), json!({ "status": "failed" }).to_string()).unwrap();

    let o = knlp(&d, &["scaling", "sw"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = proj.join("graphs");
    let rep = read_json(&out.join("scaling.json"));
    let c = curve(&rep, "ratio");
    assert_eq!(c["source"], "measured");
    let pts = c["points"].as_array().unwrap();
    assert_eq!(pts.len(), hs.len(), "{c}");
    for (p, h) in pts.iter().zip(hs) {
        let x = ratio(64.0, h as f64);
        assert!((p["x"].as_f64().unwrap() - x).abs() < 1e-12, "{p} vs {x}");
    }
    let fit = &c["fits"]["sw"];
    assert!((fit["x_min"].as_f64().unwrap() - 1.7).abs() < 1e-6, "{fit}");
    assert!((fit["y_min"].as_f64().unwrap() - 2.0).abs() < 1e-6, "{fit}");
    assert_eq!(fit["extrapolated"], false);
    // One depth (2) only: the depth curve is the seed's analytic one, with
    // the sweep's runs marked where they sit.
    let dc = curve(&rep, "depth");
    assert_eq!(dc["source"], "analytic");
    assert!(dc["points"].as_array().unwrap().is_empty());
    let pos = dc["positions"].as_array().unwrap();
    assert_eq!(pos.len(), hs.len());
    assert!(pos.iter().all(|p| p["x"] == 2.0 && p["y"] == 26.0 * 26.0), "{dc}");
    let skipped: Vec<&str> = rep["skipped"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    assert_eq!(skipped.len(), 3, "{skipped:?}");
    assert!(skipped.iter().any(|s| s.contains("lenet") && s.contains("not a GPT-2 run")), "{skipped:?}");
    assert!(skipped.iter().any(|s| s.contains("broken") && s.contains("config.json")), "{skipped:?}");
    assert!(skipped.iter().any(|s| s.contains("failed: failed")), "{skipped:?}");
    for f in ["scaling_ratio.png", "scaling_depth.png"] {
        assert_png(&out.join(f));
    }
    let md = std::fs::read_to_string(out.join("scaling.md")).unwrap();
    assert!(
        md.contains("(measured)") && md.contains("(analytic)") && md.contains("minimum 2.0000 at x = 1.700"),
        "{md}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn measured_depth_curve_is_time_per_token_and_projects_combine() {
    let d = scratch("depth");
    for (proj, scale) in [("a", 1.0), ("b", 2.0)] {
        for l in [2, 4, 8] {
            let model = json!({ "n_layer": l, "n_head": 2, "n_embd": 32, "block_size": 32 });
            run(&d.join("runs").join(proj), &format!("l{l}"), model, 3.0, 1e5 / (l as f64 * scale));
        }
    }
    let o = knlp(&d, &["scaling", "a", "b", "--out", "rep"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rep = read_json(&d.join("rep/scaling.json"));
    let c = curve(&rep, "depth");
    assert_eq!(c["source"], "measured");
    // µs per token = 1e6 / tokens/s = 10 l scale.
    for (proj, scale) in [("a", 1.0), ("b", 2.0)] {
        let m = c["means"][proj].as_array().unwrap();
        let got: Vec<(f64, f64)> =
            m.iter().map(|p| (p[0].as_f64().unwrap(), p[1].as_f64().unwrap())).collect();
        let want: Vec<(f64, f64)> = [2.0, 4.0, 8.0].iter().map(|&l| (l, 10.0 * l * scale)).collect();
        for (g, w) in got.iter().zip(&want) {
            assert!((g.0 - w.0).abs() < 1e-9 && (g.1 - w.1).abs() < 1e-6, "{proj}: {got:?} vs {want:?}");
        }
    }
    // Every run has GPT-2's 4d MLP: one ratio, so that curve is analytic.
    assert_eq!(curve(&rep, "ratio")["source"], "analytic");
    assert_png(&d.join("rep/scaling_depth.png"));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn unknown_project_is_a_clear_error() {
    let d = scratch("err");
    std::fs::create_dir_all(d.join("runs/real")).unwrap();
    let o = knlp(&d, &["scaling", "nope"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no project 'nope'"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

/// The shipped sweep file end to end on a tiny base: six real GPT-2 runs
/// on Brown, then the report measures the ratio curve from them.
#[test]
fn shipped_ratio_sweep_gives_a_measured_curve() {
    let d = scratch("sweep");
    std::fs::write(
        d.join("base.config"),
        "# CONFIG_MODEL_LENET5 is not set
CONFIG_MODEL_GPT2=y
CONFIG_GPT2_N_LAYER=1
CONFIG_GPT2_N_HEAD=2
CONFIG_GPT2_N_EMBD=32
CONFIG_GPT2_BLOCK_SIZE=16
CONFIG_BATCH_SIZE=2
CONFIG_EVAL_BATCHES=1
CONFIG_TRAIN_STEPS=2
CONFIG_EVAL_EVERY=2
CONFIG_LOG_EVERY=1
CONFIG_DEVICE_CPU=y
CONFIG_CPU_THREADS=1
CONFIG_AUTO_GRAPHS=n
",
    )
    .unwrap();
    let sweep = root().join("sweeps/scaling-ratio.sweep");
    let kconfig = root().join("Kconfig");
    let o = knlp(
        &d,
        &[
            "sweep",
            sweep.to_str().unwrap(),
            "--base",
            "base.config",
            "--kconfig",
            kconfig.to_str().unwrap(),
            "--set",
            "PROJECT=sr",
            "--set",
            "PARALLEL_JOBS=2",
            "--yes",
        ],
    );
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let o = knlp(&d, &["scaling", "sr"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rep = read_json(&d.join("runs/sr/graphs/scaling.json"));
    let c = curve(&rep, "ratio");
    assert_eq!(c["source"], "measured", "{c}");
    let mut xs: Vec<f64> = c["points"].as_array().unwrap().iter().map(|p| p["x"].as_f64().unwrap()).collect();
    xs.sort_by(f64::total_cmp);
    let want: Vec<f64> = (1..=6).map(|k| ratio(32.0, 128.0 * k as f64)).collect();
    assert_eq!(xs.len(), 6, "{c}");
    for (g, w) in xs.iter().zip(&want) {
        assert!((g - w).abs() < 1e-12, "{xs:?} vs {want:?}");
    }
    assert!(c["points"].as_array().unwrap().iter().all(|p| p["y"].as_f64().unwrap().is_finite()));
    let _ = std::fs::remove_dir_all(&d);
}
