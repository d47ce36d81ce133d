//! Reading a project directory: one folder per run with `config.json`,
//! `status.json`, `metrics.jsonl` and `summary.json`. Every file may be
//! missing or malformed; problems become warnings naming the file (and the
//! line for JSON lines) and a note on the run, never an abort.
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use polars::prelude::*;
use serde_json::{Map, Value};

use crate::util::natural_cmp;

pub const CONFIG: &str = "config.json";
pub const STATUS: &str = "status.json";
pub const METRICS: &str = "metrics.jsonl";
pub const SUMMARY: &str = "summary.json";
/// Where graphs and report.md are written inside a project.
pub const GRAPHS_DIR: &str = "graphs";
/// The matrix's list of cells (`knlp train`), in the project folder.
pub const MATRIX: &str = "matrix.json";

const RUN_FILES: &[&str] = &[CONFIG, STATUS, METRICS, SUMMARY];

/// Evaluation keys: a metrics record with one of them is an evaluation.
pub const EVAL_KEYS: &[&str] = &["test_acc", "test_loss", "val_loss", "val_ppl"];

/// Everything known about one run, from its files.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunInfo {
    /// The run's folder name.
    pub run: String,
    /// The matrix cell id (`config.json` `cell.id`), else the folder name.
    pub cell: String,
    /// `pending`, `running`, `done`, `failed`, `interrupted` or `unknown`.
    pub status: String,
    pub reason: Option<String>,
    pub updated: Option<String>,
    pub model: Option<String>,
    pub optimizer: Option<String>,
    pub lr: Option<f64>,
    pub seed: Option<i64>,
    /// Pruning method, `none` for dense runs.
    pub pruning: String,
    pub variant: Option<String>,
    pub target_sparsity: Option<f64>,
    /// Achieved sparsity (summary, else the last logged value).
    pub sparsity: Option<f64>,
    pub best_acc: Option<f64>,
    pub final_acc: Option<f64>,
    pub best_ppl: Option<f64>,
    pub final_ppl: Option<f64>,
    /// Final evaluation loss (`test_loss` or `val_loss`).
    pub final_loss: Option<f64>,
    /// Its standard error (`val_loss_se`), where the run logged one.
    pub final_loss_se: Option<f64>,
    pub train_loss: Option<f64>,
    pub steps: Option<i64>,
    pub epochs: Option<f64>,
    pub time_s: Option<f64>,
    pub peak_mem_mb: Option<f64>,
    pub throughput: Option<f64>,
    pub throughput_unit: Option<String>,
    /// The inference test: latency at its smallest batch size, best throughput.
    pub infer_ms: Option<f64>,
    pub infer_per_s: Option<f64>,
    /// GPT-2's KV-pruning evaluation: the headline keep ratio, perplexity
    /// there, unpruned through the same cache, and with the V reconstructor.
    pub kv_keep: Option<f64>,
    pub kv_ppl: Option<f64>,
    pub kv_ppl_dense: Option<f64>,
    pub kv_ppl_recon: Option<f64>,
    /// GPU monitoring: mean utilisation (%) and power (W) over the run.
    pub gpu_util: Option<f64>,
    pub gpu_power_w: Option<f64>,
    /// Problems with this run's files, short.
    pub notes: Vec<String>,
}

impl RunInfo {
    /// `adamwprune state-bitter7`, `adamw magnitude`, `sgd dense`: the
    /// method a run stands for, without its sparsity.
    pub fn method(&self) -> String {
        let opt = self.optimizer.clone().unwrap_or_else(|| "?".into());
        if self.is_dense() {
            return format!("{opt} dense");
        }
        match &self.variant {
            Some(v) => format!("{opt} {}-{v}", self.pruning),
            None => format!("{opt} {}", self.pruning),
        }
    }

    /// A run without pruning.
    pub fn is_dense(&self) -> bool {
        self.pruning == "none" || self.pruning.is_empty()
    }
}

/// The logged records of one run, in file order.
#[derive(Clone, Debug, Default)]
pub struct History {
    pub cell: String,
    pub records: Vec<Map<String, Value>>,
}

impl History {
    /// `(step, value)` of every record that has `key` (a finite number).
    pub fn series(&self, key: &str) -> Vec<(f64, f64)> {
        self.records
            .iter()
            .filter_map(|r| {
                let v = r.get(key)?.as_f64()?;
                let s = r.get("step")?.as_f64()?;
                (v.is_finite() && s.is_finite()).then_some((s, v))
            })
            .collect()
    }

    pub fn has(&self, key: &str) -> bool {
        self.records.iter().any(|r| r.get(key).and_then(Value::as_f64).is_some())
    }
}

/// A loaded project: one row per run, their histories and what went wrong.
#[derive(Clone, Debug)]
pub struct Project {
    pub dir: PathBuf,
    pub name: String,
    /// Runs sorted by cell id (natural order); the same order as `histories`.
    pub runs: Vec<RunInfo>,
    pub histories: Vec<History>,
    /// `path: problem` or `path:line: problem`, one per problem found.
    pub warnings: Vec<String>,
    /// The runs as a DataFrame, every column (see [`crate::table::ALL_COLUMNS`]).
    pub frame: DataFrame,
}

impl Project {
    /// Every metrics record of every run as one long DataFrame: `cell`,
    /// `step`, `epoch`, then every numeric key seen (null where a record
    /// lacks it), in first-seen order.
    pub fn metrics_frame(&self) -> Result<DataFrame> {
        let mut rows = Vec::new();
        for h in &self.histories {
            for r in &h.records {
                let mut row = vec![("cell".to_string(), crate::frame::Cell::Str(h.cell.clone()))];
                for (k, v) in r {
                    row.push((k.clone(), crate::frame::Cell::from_json(v)));
                }
                rows.push(row);
            }
        }
        crate::frame::from_rows(&rows)
    }
}

fn is_run_dir(p: &Path) -> bool {
    RUN_FILES.iter().any(|f| p.join(f).is_file())
}

/// Load every run of the project at `dir`. A directory that is itself a run
/// loads as a project of one run.
pub fn load_project(dir: &Path) -> Result<Project> {
    if !dir.is_dir() {
        bail!("{}: no such project directory", dir.display());
    }
    let name = dir
        .canonicalize()
        .ok()
        .as_deref()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| dir.display().to_string());
    let mut warnings = Vec::new();
    let mut run_dirs: Vec<PathBuf> = Vec::new();
    if is_run_dir(dir) {
        run_dirs.push(dir.to_path_buf());
    } else {
        let entries = fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))?;
        for e in entries.flatten() {
            let p = e.path();
            let fname = e.file_name().to_string_lossy().to_string();
            if !p.is_dir() || fname.starts_with('.') || fname == GRAPHS_DIR {
                continue;
            }
            let empty = fs::read_dir(&p).map(|mut d| d.next().is_none()).unwrap_or(false);
            if is_run_dir(&p) || empty {
                run_dirs.push(p);
            }
        }
    }
    let mut loaded: Vec<(RunInfo, History)> = run_dirs.iter().map(|p| load_run(p, &mut warnings)).collect();
    // Cells of the matrix that have no folder yet are pending.
    for cell in matrix_cells(dir, &mut warnings) {
        let id = get_str(Some(&cell), "id");
        let Some(id) = id else { continue };
        if loaded.iter().any(|(r, _)| r.cell == id || r.run == id) {
            continue;
        }
        let c = Some(&cell);
        let pruning = get_str(c, "pruning").unwrap_or_else(|| "none".into());
        let info = RunInfo {
            run: id.clone(),
            cell: id.clone(),
            status: "pending".into(),
            model: cell_model(c),
            optimizer: get_str(c, "optimizer"),
            variant: get_str(c, "variant").filter(|_| pruning != "none"),
            target_sparsity: get_f64(c, "sparsity"),
            pruning,
            ..Default::default()
        };
        loaded.push((info, History { cell: id, records: Vec::new() }));
    }
    loaded.sort_by(|a, b| natural_cmp(&a.0.cell, &b.0.cell).then_with(|| natural_cmp(&a.0.run, &b.0.run)));
    let (runs, histories): (Vec<RunInfo>, Vec<History>) = loaded.into_iter().unzip();
    let frame = crate::table::runs_frame(&runs)?;
    Ok(Project { dir: dir.to_path_buf(), name, runs, histories, warnings, frame })
}

/// The cells listed in the project's `matrix.json` (none when there is no such file).
fn matrix_cells(dir: &Path, warnings: &mut Vec<String>) -> Vec<Value> {
    let path = dir.join(MATRIX);
    let mut notes = Vec::new();
    let Some(m) = read_json(&path, warnings, &mut notes) else { return Vec::new() };
    match m.get("cells") {
        Some(Value::Array(cells)) => cells.iter().filter(|c| c.is_object()).cloned().collect(),
        _ => {
            warnings.push(format!("{}: no \"cells\" list", path.display()));
            Vec::new()
        }
    }
}

/// Read a JSON file: `None` when missing; a warning and a note when malformed.
fn read_json(path: &Path, warnings: &mut Vec<String>, notes: &mut Vec<String>) -> Option<Value> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            warnings.push(format!("{}: cannot read: {e}", path.display()));
            notes.push(format!("{} unreadable", file_name(path)));
            return None;
        }
    };
    match serde_json::from_str::<Value>(&text) {
        Ok(v @ Value::Object(_)) => Some(v),
        Ok(_) => {
            warnings.push(format!("{}: not a JSON object", path.display()));
            notes.push(format!("{} malformed", file_name(path)));
            None
        }
        Err(e) => {
            warnings.push(format!("{}: not valid JSON: {e}", path.display()));
            notes.push(format!("{} malformed", file_name(path)));
            None
        }
    }
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default()
}

/// Read `metrics.jsonl`: a torn last line (no newline at the end) is
/// ignored; any other bad line is skipped with a warning naming its line.
pub fn read_metrics(
    path: &Path,
    warnings: &mut Vec<String>,
    notes: &mut Vec<String>,
) -> Vec<Map<String, Value>> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            warnings.push(format!("{}: cannot read: {e}", path.display()));
            notes.push(format!("{} unreadable", file_name(path)));
            return Vec::new();
        }
    };
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.split('\n').collect();
    let ends_with_newline = text.ends_with('\n');
    let mut out = Vec::new();
    let mut bad = 0;
    for (i, line) in lines.iter().enumerate() {
        let l = line.trim();
        if l.is_empty() {
            continue;
        }
        let last = i + 1 == lines.len();
        match serde_json::from_str::<Value>(l) {
            Ok(Value::Object(m)) if m.get("step").and_then(Value::as_f64).is_some() => out.push(m),
            Ok(_) => {
                bad += 1;
                warnings.push(format!(
                    "{}:{}: not a metrics record (an object with \"step\")",
                    path.display(),
                    i + 1
                ));
            }
            // A torn write: the final line without its newline.
            Err(_) if last && !ends_with_newline => {}
            Err(e) => {
                bad += 1;
                warnings.push(format!("{}:{}: not a JSON record: {e}", path.display(), i + 1));
            }
        }
    }
    if bad > 0 {
        notes.push(format!("{METRICS}: {bad} bad line{} skipped", if bad == 1 { "" } else { "s" }));
    }
    out
}

/// A cell's model, with its GPT-2 attention variant when the matrix has
/// that axis (`gpt2-mla`), so tables and graphs tell the variants apart.
fn cell_model(cell: Option<&Value>) -> Option<String> {
    let model = get_str(cell, "model")?;
    // The matrix's axes of the model: attention variant, image tokenizer.
    Some(match (get_str(cell, "attention"), get_str(cell, "tokenizer")) {
        (Some(a), _) => format!("{model}-{a}"),
        (None, Some(t)) => format!("{model}-{t}"),
        (None, None) => model,
    })
}

fn get_str(v: Option<&Value>, key: &str) -> Option<String> {
    match v?.get(key)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn get_f64(v: Option<&Value>, key: &str) -> Option<f64> {
    v?.get(key)?.as_f64().filter(|x| x.is_finite())
}

fn last_of(records: &[Map<String, Value>], key: &str) -> Option<f64> {
    records.iter().rev().find_map(|r| r.get(key).and_then(Value::as_f64).filter(|x| x.is_finite()))
}

/// The mean of `key` over the records that logged it.
fn mean_of(records: &[Map<String, Value>], key: &str) -> Option<f64> {
    let v: Vec<f64> =
        records.iter().filter_map(|r| r.get(key).and_then(Value::as_f64).filter(|x| x.is_finite())).collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn load_run(dir: &Path, warnings: &mut Vec<String>) -> (RunInfo, History) {
    let mut notes = Vec::new();
    let run = file_name(dir);
    let config = read_json(&dir.join(CONFIG), warnings, &mut notes);
    let status = read_json(&dir.join(STATUS), warnings, &mut notes);
    let summary = read_json(&dir.join(SUMMARY), warnings, &mut notes);
    let records = read_metrics(&dir.join(METRICS), warnings, &mut notes);
    if config.is_none() && !dir.join(CONFIG).exists() && (summary.is_some() || !records.is_empty()) {
        notes.push(format!("{CONFIG} missing"));
    }
    let cfg = config.as_ref();
    let cell = cfg.and_then(|c| c.get("cell")).filter(|c| c.is_object());
    let pruning_cfg = cfg.and_then(|c| c.get("pruning")).filter(|p| p.is_object());
    let extra = summary.as_ref().and_then(|s| s.get("extra")).filter(|e| e.is_object());

    let mut info = RunInfo { run: run.clone(), ..Default::default() };
    info.cell = get_str(cell, "id").unwrap_or_else(|| run.clone());

    // Status: status.json, else the summary's, else pending.
    let status_path = dir.join(STATUS);
    info.status = match (get_str(status.as_ref(), "status"), get_str(summary.as_ref(), "status")) {
        (Some(s), _) => s,
        (None, Some(s)) => s,
        (None, None) if status_path.exists() => "unknown".into(),
        (None, None) => "pending".into(),
    };
    if status.is_some() && get_str(status.as_ref(), "status").is_none() {
        warnings.push(format!("{}: no \"status\" field", status_path.display()));
        notes.push(format!("{STATUS} malformed"));
    }
    if info.status == "running" && process_gone(status.as_ref()) {
        // Killed without a chance to say so (SIGKILL, power loss).
        info.status = "interrupted".into();
        notes.push("its process is gone".into());
    }
    info.reason = get_str(status.as_ref(), "reason").or_else(|| get_str(summary.as_ref(), "reason"));
    info.updated = get_str(status.as_ref(), "updated");

    // What the run is.
    info.model = cell_model(cell).or_else(|| get_str(cfg, "arch"));
    let opt_cfg = cfg.and_then(|c| c.get("optimizer"));
    info.optimizer = get_str(cell, "optimizer").or_else(|| get_str(opt_cfg, "kind"));
    info.lr = get_f64(opt_cfg, "lr");
    info.seed = cfg.and_then(|c| c.get("seed")).and_then(Value::as_i64);
    let method = get_str(cell, "pruning")
        .or_else(|| get_str(pruning_cfg, "method"))
        .or_else(|| get_str(extra, "pruning_method"));
    info.pruning = method.clone().unwrap_or_else(|| "none".into());
    info.variant = if cell.is_some() && get_str(cell, "pruning").is_some() {
        get_str(cell, "variant")
    } else {
        // The pruner records a variant for every method; it means something
        // only for state and movement pruning.
        let v = get_str(pruning_cfg, "variant").or_else(|| get_str(extra, "pruning_variant"));
        v.filter(|_| matches!(method.as_deref(), Some("state") | Some("movement")))
    };
    if info.is_dense() {
        info.variant = None;
    }
    info.target_sparsity = get_f64(cell, "sparsity")
        .or_else(|| get_f64(pruning_cfg, "target"))
        .or_else(|| get_f64(extra, "target_sparsity"));
    info.sparsity = get_f64(extra, "sparsity").or_else(|| last_of(&records, "sparsity"));
    info.infer_ms = get_f64(extra, "infer_ms");
    info.infer_per_s = get_f64(extra, "infer_per_s");
    info.kv_keep = get_f64(extra, "kv_keep");
    info.kv_ppl = get_f64(extra, "kv_ppl");
    info.kv_ppl_dense = get_f64(extra, "kv_ppl_dense");
    info.kv_ppl_recon = get_f64(extra, "kv_ppl_recon");
    info.gpu_util = get_f64(extra, "gpu_util_mean").or_else(|| mean_of(&records, "gpu_util"));
    info.gpu_power_w = get_f64(extra, "gpu_power_mean_w").or_else(|| mean_of(&records, "gpu_power_w"));

    // Metrics: the summary when there is one, else what was logged so far.
    let evals: Vec<&Map<String, Value>> =
        records.iter().filter(|r| EVAL_KEYS.iter().any(|k| r.contains_key(*k))).collect();
    let fin = summary.as_ref().and_then(|s| s.get("final_metrics"));
    let best = summary.as_ref().and_then(|s| s.get("best_metrics"));
    let last_eval = evals.last().map(|m| Value::Object((*m).clone()));
    let fin = fin.filter(|f| f.as_object().is_some_and(|o| !o.is_empty())).or(last_eval.as_ref());
    let logged = |key: &str, max: bool| {
        let vals = evals.iter().filter_map(|r| r.get(key).and_then(Value::as_f64)).filter(|x| x.is_finite());
        if max {
            vals.reduce(f64::max)
        } else {
            vals.reduce(f64::min)
        }
    };
    info.final_acc = get_f64(fin, "test_acc");
    info.best_acc = get_f64(best, "test_acc").or_else(|| logged("test_acc", true));
    info.final_ppl = get_f64(fin, "val_ppl");
    info.best_ppl = get_f64(best, "val_ppl").or_else(|| logged("val_ppl", false));
    info.final_loss = get_f64(fin, "test_loss").or_else(|| get_f64(fin, "val_loss"));
    info.final_loss_se = get_f64(fin, "val_loss_se");
    let s = summary.as_ref();
    info.train_loss = get_f64(s, "train_loss").or_else(|| last_of(&records, "train_loss"));
    info.steps = s
        .and_then(|s| s.get("steps"))
        .and_then(Value::as_i64)
        .or_else(|| last_of(&records, "step").map(|x| x as i64));
    info.epochs = get_f64(s, "epochs").or_else(|| last_of(&records, "epoch"));
    info.time_s = get_f64(s, "elapsed_s").or_else(|| last_of(&records, "elapsed_s"));
    let logged_peak = records
        .iter()
        .filter_map(|r| r.get("peak_mem_mb").and_then(Value::as_f64))
        .filter(|x| x.is_finite())
        .reduce(f64::max);
    info.peak_mem_mb = get_f64(s, "peak_mem_mb").or(logged_peak);
    info.throughput = get_f64(s, "throughput").filter(|x| *x > 0.0);
    info.throughput_unit = get_str(s, "throughput_unit");
    if info.throughput.is_none() {
        for unit in ["samples_per_s", "tokens_per_s"] {
            let v: Vec<f64> = records.iter().filter_map(|r| r.get(unit).and_then(Value::as_f64)).collect();
            if !v.is_empty() {
                info.throughput = Some(v.iter().sum::<f64>() / v.len() as f64);
                info.throughput_unit = Some(unit.into());
            }
        }
    }
    if info.throughput.is_some() && info.throughput_unit.is_none() {
        info.throughput_unit =
            Some(if info.final_ppl.is_some() { "tokens_per_s" } else { "samples_per_s" }.into());
    }
    info.notes = notes;
    let history = History { cell: info.cell.clone(), records };
    (info, history)
}

/// Projects under `root` (directories holding run folders), newest first by
/// the last change to any of their runs' files.
pub fn list_projects(root: &Path) -> Vec<(PathBuf, std::time::SystemTime)> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(root) else { return out };
    for e in entries.flatten() {
        let p = e.path();
        if !p.is_dir() || e.file_name().to_string_lossy().starts_with('.') || is_run_dir(&p) {
            continue;
        }
        let mut newest = fs::metadata(p.join(MATRIX)).and_then(|m| m.modified()).ok();
        if let Ok(runs) = fs::read_dir(&p) {
            for r in runs.flatten() {
                let rp = r.path();
                if !rp.is_dir() || !is_run_dir(&rp) {
                    continue;
                }
                for f in RUN_FILES {
                    if let Ok(t) = fs::metadata(rp.join(f)).and_then(|m| m.modified()) {
                        newest = Some(newest.map_or(t, |n: std::time::SystemTime| n.max(t)));
                    }
                }
            }
        }
        if let Some(t) = newest {
            out.push((p, t));
        }
    }
    out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    out
}

/// The project a command means: `arg` as a path, else as a name under
/// `root`; without `arg`, the most recently modified project under `root`
/// (or `root` itself when it holds runs directly).
pub fn resolve_project(arg: Option<&str>, root: &Path) -> Result<PathBuf> {
    if let Some(a) = arg {
        let p = PathBuf::from(a);
        if p.is_dir() {
            return Ok(p);
        }
        let under = root.join(a);
        if under.is_dir() {
            return Ok(under);
        }
        let names: Vec<String> = list_projects(root)
            .iter()
            .filter_map(|(p, _)| p.file_name().map(|n| n.to_string_lossy().to_string()))
            .collect();
        if names.is_empty() {
            bail!("no project '{a}' (not a directory, and {} has no projects)", root.display());
        }
        bail!("no project '{a}' (projects under {}: {})", root.display(), names.join(", "));
    }
    if let Some((p, _)) = list_projects(root).into_iter().next() {
        return Ok(p);
    }
    let has_runs = fs::read_dir(root)
        .map(|d| d.flatten().any(|e| e.path().is_dir() && is_run_dir(&e.path())))
        .unwrap_or(false);
    if has_runs {
        return Ok(root.to_path_buf());
    }
    bail!("no projects under {} (a project is a directory of run folders)", root.display())
}

/// A running run whose recorded process (on this host) no longer exists.
fn process_gone(status: Option<&Value>) -> bool {
    let Some(st) = status else { return false };
    match (st.get("pid").and_then(|p| p.as_u64()), st.get("host").and_then(|h| h.as_str())) {
        (Some(pid), Some(host)) => pid_gone(pid, host),
        _ => false,
    }
}

/// Whether process `pid` of machine `host`, as a status file records them,
/// is gone; false when that cannot be told (another host, no /proc).
pub fn pid_gone(pid: u64, host: &str) -> bool {
    let here = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string());
    match here {
        Ok(h) if h == host => !Path::new(&format!("/proc/{pid}")).exists(),
        _ => false, // another machine's run, or no /proc: cannot tell
    }
}
