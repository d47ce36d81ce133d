//! A synthetic project: run folders as knlp's trainer writes them, with the
//! usual problems (failed, still running, torn and malformed lines, a
//! malformed summary, a pending cell, a run without a matrix cell).
#![allow(dead_code)]
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

pub fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("knlp-report-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

fn write(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

fn write_json(path: &Path, v: &Value) {
    write(path, &(serde_json::to_string_pretty(v).unwrap() + "\n"));
}

/// One cell of the matrix.
#[derive(Clone)]
pub struct Spec {
    pub model: &'static str,
    pub optimizer: &'static str,
    pub pruning: &'static str,
    pub variant: Option<&'static str>,
    pub sparsity: f64,
    /// done, failed, running, pending
    pub status: &'static str,
    /// Final accuracy (classifier) or perplexity (LM).
    pub metric: f64,
    pub seed: u64,
}

impl Spec {
    pub fn id(&self) -> String {
        let p = match self.variant {
            Some(v) => format!("{}-{v}", self.pruning),
            None => self.pruning.to_string(),
        };
        if self.pruning == "none" {
            format!("{}_{}_{}", self.model, self.optimizer, p)
        } else {
            format!("{}_{}_{}_{}", self.model, self.optimizer, p, (self.sparsity * 100.0).round())
        }
    }

    fn lm(&self) -> bool {
        self.model == "gpt2"
    }
}

fn noise(seed: u64, i: u64) -> f64 {
    let x = (seed.wrapping_mul(6364136223846793005).wrapping_add(i.wrapping_mul(1442695040888963407))) >> 33;
    (x % 1000) as f64 / 1000.0 - 0.5
}

/// Write one run; `steps` logged every 50, evaluations every 250.
pub fn write_run(project: &Path, s: &Spec, steps: i64) -> PathBuf {
    let dir = project.join(s.id());
    fs::create_dir_all(&dir).unwrap();
    let pruning = if s.pruning == "none" {
        Value::Null
    } else {
        json!({"method": s.pruning, "variant": s.variant.unwrap_or("bitter7"), "target": s.sparsity, "warmup": 100})
    };
    write_json(
        &dir.join("config.json"),
        &json!({
            "arch": s.model,
            "model": {},
            "optimizer": {"kind": if s.optimizer == "adamwprune" { "adamw" } else { s.optimizer }, "lr": 0.002},
            "train": {"steps": steps},
            "data": {},
            "pruning": pruning,
            "extra": null,
            "cell": {"id": s.id(), "model": s.model, "optimizer": s.optimizer, "pruning": s.pruning,
                     "variant": s.variant, "sparsity": s.sparsity},
        }),
    );
    if s.status == "pending" {
        return dir;
    }
    let last_step = if s.status == "done" { steps } else { steps * 3 / 5 };
    let mut lines = String::new();
    let (unit, rate) = if s.lm() { ("tokens_per_s", 52_000.0) } else { ("samples_per_s", 9_500.0) };
    let mut evals = Vec::new();
    for step in (50..=last_step).step_by(50) {
        let t = step as f64 / steps as f64;
        let speed = 1.0 + 0.6 * noise(s.seed, 999);
        let loss =
            if s.lm() { 3.3 + 4.0 * (-4.0 * speed * t).exp() } else { 0.25 + 1.2 * (-5.0 * speed * t).exp() }
                + 0.03 * noise(s.seed, step as u64);
        let sp = if s.pruning == "none" { None } else { Some(s.sparsity * (t / 0.6).min(1.0).powi(3)) };
        let mut rec = json!({"step": step, "epoch": (t * 2.0) as i64, "train_loss": loss,
            "lr": 0.002 * (0.5 + 0.5 * (std::f64::consts::PI * t).cos()),
            "grad_norm": 1.0, "step_ms": 2.5, unit: rate * (1.0 + 0.05 * noise(s.seed, 7)),
            "elapsed_s": step as f64 * 0.0025 * (1.0 + s.sparsity)});
        if s.lm() {
            rec["train_ppl"] = json!(loss.exp());
            rec["peak_mem_mb"] = json!(2100.0 + 300.0 * s.sparsity);
        } else {
            rec["train_acc"] = json!(0.9 - 0.4 * (-5.0 * t).exp());
        }
        if let Some(sp) = sp {
            rec["sparsity"] = json!(sp);
            rec["target_sparsity"] = json!(sp);
        }
        lines.push_str(&rec.to_string());
        lines.push('\n');
        if step % 250 == 0 {
            let frac = t.min(1.0);
            let mut ev = if s.lm() {
                let ppl = s.metric * (1.0 + 2.0 * (1.0 - frac));
                json!({"step": step, "epoch": (t * 2.0) as i64, "val_loss": ppl.ln(), "val_ppl": ppl})
            } else {
                let acc = s.metric - 0.1 * (1.0 - frac);
                json!({"step": step, "epoch": (t * 2.0) as i64, "test_loss": 1.0 - acc, "test_acc": acc})
            };
            if let Some(sp) = sp {
                ev["sparsity"] = json!(sp);
            }
            lines.push_str(&ev.to_string());
            lines.push('\n');
            evals.push(ev);
        }
    }
    write(&dir.join("metrics.jsonl"), &lines);
    let reason = if s.status == "failed" { Some(format!("loss is NaN at step {last_step}")) } else { None };
    write_json(
        &dir.join("status.json"),
        &json!({"status": s.status, "reason": reason, "updated": "2026-11-26T10:00:00Z"}),
    );
    if s.status == "done" || s.status == "failed" {
        let fin = evals.last().cloned().unwrap_or(json!({}));
        let best = if s.lm() {
            evals
                .iter()
                .min_by(|a, b| a["val_ppl"].as_f64().unwrap().total_cmp(&b["val_ppl"].as_f64().unwrap()))
        } else {
            evals
                .iter()
                .max_by(|a, b| a["test_acc"].as_f64().unwrap().total_cmp(&b["test_acc"].as_f64().unwrap()))
        }
        .cloned()
        .unwrap_or(json!({}));
        let mut extra = json!({});
        if s.pruning != "none" {
            extra = json!({"pruning_method": s.pruning, "pruning_variant": s.variant.unwrap_or("bitter7"),
                "target_sparsity": s.sparsity, "sparsity": s.sparsity + 0.001, "layer_sparsity": {"fc1.weight": s.sparsity}});
        }
        write_json(
            &dir.join("summary.json"),
            &json!({"status": s.status, "reason": reason, "steps": last_step, "epochs": 2.0,
                "elapsed_s": last_step as f64 * 0.0025 * (1.0 + s.sparsity),
                "final_metrics": fin, "best_metrics": best, "train_loss": 0.3,
                "throughput": rate, "throughput_unit": unit,
                "peak_mem_mb": if s.lm() { json!(2100.0 + 300.0 * s.sparsity) } else { Value::Null },
                "extra": extra}),
        );
    }
    dir
}

pub fn spec(
    model: &'static str,
    optimizer: &'static str,
    pruning: &'static str,
    variant: Option<&'static str>,
    sparsity: f64,
    status: &'static str,
    metric: f64,
) -> Spec {
    Spec { model, optimizer, pruning, variant, sparsity, status, metric, seed: 1 }
}

/// The test project (classifier and language-model runs, every problem).
/// Returns the project directory.
pub fn build(root: &Path, name: &str) -> PathBuf {
    let p = root.join(name);
    let specs = vec![
        spec("lenet5", "adamw", "none", None, 0.0, "done", 0.90),
        spec("lenet5", "adamwprune", "state", Some("bitter7"), 0.5, "done", 0.895),
        spec("lenet5", "adamwprune", "state", Some("bitter7"), 0.7, "done", 0.885),
        spec("lenet5", "sgd", "magnitude", None, 0.5, "done", 0.87),
        spec("lenet5", "sgd", "magnitude", None, 0.7, "failed", 0.80),
        spec("lenet5", "adamw", "movement", Some("knlp"), 0.7, "running", 0.86),
        spec("lenet5", "adamw", "magnitude", None, 0.9, "done", 0.84),
        spec("lenet5", "adamw", "magnitude", None, 0.95, "pending", 0.0),
        spec("gpt2", "adamw", "none", None, 0.0, "done", 42.5),
        spec("gpt2", "adamwprune", "state", Some("bitter7"), 0.5, "done", 45.25),
    ];
    let specs: Vec<Spec> = specs
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            s.seed = i as u64 + 1;
            s
        })
        .collect();
    for s in &specs {
        write_run(&p, s, 500);
    }
    // A torn last line in the running cell (the writer is mid-line).
    let running = p.join(specs[5].id()).join("metrics.jsonl");
    let mut text = fs::read_to_string(&running).unwrap();
    text.push_str("{\"step\": 350, \"train_lo");
    fs::write(&running, text).unwrap();
    // A malformed line in the middle of a finished run's metrics.
    let m = p.join(specs[3].id()).join("metrics.jsonl");
    let text = fs::read_to_string(&m).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.insert(2, "this is not json");
    fs::write(&m, lines.join("\n") + "\n").unwrap();
    // A malformed summary.
    fs::write(p.join(specs[6].id()).join("summary.json"), "{\"status\": \"done\", \"steps\": ").unwrap();
    // A run that is not a matrix cell (no "cell" key), as `train()` writes it.
    let plain = p.join("lenet5-adamw-seed0");
    write_run(&p, &spec("lenet5", "adamw", "none", None, 0.0, "done", 0.8917), 500);
    fs::rename(p.join("lenet5_adamw_none"), &plain).unwrap();
    let cfg: Value = serde_json::from_str(&fs::read_to_string(plain.join("config.json")).unwrap()).unwrap();
    let mut cfg = cfg.as_object().unwrap().clone();
    cfg.remove("cell");
    write_json(&plain.join("config.json"), &Value::Object(cfg));
    // Put the dense matrix cell back.
    write_run(&p, &specs[0], 500);
    // The matrix file lists the cells, one of them not started (no folder).
    let mut cells: Vec<Value> = specs
        .iter()
        .map(|s| {
            json!({"id": s.id(), "model": s.model, "optimizer": s.optimizer, "pruning": s.pruning,
                        "variant": s.variant, "sparsity": s.sparsity})
        })
        .collect();
    cells.push(json!({"id": "gpt2_adamw_magnitude_50", "model": "gpt2", "optimizer": "adamw",
                      "pruning": "magnitude", "variant": null, "sparsity": 0.5}));
    write_json(&p.join("matrix.json"), &json!({"project": name, "cells": cells}));
    // Not runs: graphs/ and a stray folder.
    fs::create_dir_all(p.join("graphs")).unwrap();
    fs::create_dir_all(p.join("notes")).unwrap();
    fs::write(p.join("notes").join("todo.txt"), "x").unwrap();
    p
}

/// A larger matrix for looking at crowded graphs: `n_methods` x sparsities.
pub fn build_large(root: &Path, name: &str) -> PathBuf {
    let p = root.join(name);
    let methods: &[(&str, &str, Option<&str>)] = &[
        ("adamwprune", "state", Some("bitter0")),
        ("adamwprune", "state", Some("bitter3")),
        ("adamwprune", "state", Some("bitter7")),
        ("adamw", "magnitude", None),
        ("adamw", "movement", Some("knlp")),
        ("sgd", "magnitude", None),
        ("sgd", "movement", Some("sanh")),
    ];
    let mut k = 0;
    for (mi, (opt, pr, var)) in methods.iter().enumerate() {
        for sp in [0.5, 0.7, 0.9] {
            k += 1;
            let mut s = spec("lenet5", opt, pr, *var, sp, "done", 0.9 - 0.06 * sp * sp - 0.005 * mi as f64);
            s.seed = k;
            write_run(&p, &s, 2000);
        }
    }
    for opt in ["adamw", "sgd"] {
        write_run(
            &p,
            &spec("lenet5", opt, "none", None, 0.0, "done", if opt == "sgd" { 0.885 } else { 0.9 }),
            2000,
        );
    }
    p
}

/// Remove a test's directory, unless KNLP_REPORT_KEEP is set (to look at it).
pub fn cleanup(dir: &Path) {
    if std::env::var_os("KNLP_REPORT_KEEP").is_none() {
        let _ = fs::remove_dir_all(dir);
    } else {
        eprintln!("kept {}", dir.display());
    }
}
