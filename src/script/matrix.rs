//! `matrix()` in scripts: run a closure for every cell of a cross product,
//! with the run directories, parallelism and continuation of `make`.
//!
//! Cells run in this process one after another, or with `jobs > 1` in child
//! processes that run the same script with `KNLP_MATRIX_CELL=<id>`: there
//! `matrix()` runs only that cell's closure and ends the script. A cell whose
//! run is done is skipped; an interrupted one resumes from its checkpoint
//! (`train()` inside a cell resumes by default).
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rhai::{Array, Dynamic, Engine, FnPtr, Map, NativeCallContext};

use super::api::{Api, DocEntry};
use super::errors::{ending, Ending};
use super::value::*;
use crate::runs::{RunDir, Status};

// The script being run (path and arguments), for `matrix()`'s children.
thread_local! {
    pub static SCRIPT: RefCell<Option<(PathBuf, Vec<String>)>> = const { RefCell::new(None) };
    /// The cell a `train()` call belongs to: (run dir, cell map).
    pub static CELL: RefCell<Option<(PathBuf, Map)>> = const { RefCell::new(None) };
}

/// Keys named like make's cells, in make's order.
const STANDARD: &[&str] = &["model", "optimizer", "pruning", "variant", "sparsity"];

fn value_text(key: &str, v: &Dynamic) -> String {
    if let Ok(f) = v.as_float() {
        // Sparsities as percentages, like make's cell ids; other numbers as
        // written (a learning rate of 0.001 is not "0").
        if key == "sparsity" && (0.0..=1.0).contains(&f) {
            return format!("{}", (f * 100.0).round() as i64);
        }
        return format!("{f}");
    }
    v.to_string()
}

/// The id of a cell: make's `<model>_<optimizer>_<pruning>[-<variant>][_<pct>]`
/// for the standard keys, then `key-value` for the others.
fn cell_id(cell: &Map) -> String {
    let mut parts: Vec<String> = Vec::new();
    for k in STANDARD {
        if let Some(v) = cell.get(*k) {
            let t = value_text(k, v);
            if *k == "variant" && !parts.is_empty() {
                let last = parts.pop().unwrap_or_default();
                parts.push(format!("{last}-{t}"));
            } else if *k == "sparsity" && cell.get("pruning").is_some_and(|p| p.to_string() == "none") {
                continue;
            } else {
                parts.push(t);
            }
        }
    }
    for (k, v) in cell {
        if !STANDARD.contains(&k.as_str()) {
            parts.push(format!("{k}-{}", value_text(k, v)));
        }
    }
    let id = parts.join("_");
    id.chars().map(|c| if c.is_alphanumeric() || "-_.".contains(c) { c } else { '-' }).collect()
}

/// The cross product of a spec map of arrays, in key order.
fn cells(spec: &Map) -> RResult<Vec<Map>> {
    let mut out: Vec<Map> = vec![Map::new()];
    for (k, vals) in spec {
        let vals = vals
            .read_lock::<Array>()
            .map(|a| a.clone())
            .ok_or_else(|| rerr(format!("matrix(): '{k}' must be an array of values")))?;
        if vals.is_empty() {
            return Err(rerr(format!("matrix(): '{k}' has no values")));
        }
        let mut next = Vec::with_capacity(out.len() * vals.len());
        for base in &out {
            for v in &vals {
                let mut c = base.clone();
                c.insert(k.clone(), v.clone());
                next.push(c);
            }
        }
        out = next;
    }
    Ok(out)
}

fn status_of(dir: &Path) -> Status {
    RunDir { path: dir.to_path_buf() }.status().map(|s| s.status).unwrap_or(Status::Pending)
}

fn result_of(id: &str, dir: &Path) -> Dynamic {
    let run = RunDir { path: dir.to_path_buf() };
    let st = run.status().ok();
    let summary = run.read_json(crate::runs::SUMMARY).ok().and_then(|v| rhai::serde::to_dynamic(v).ok());
    let status = st.as_ref().map(|s| s.status.to_string()).unwrap_or_else(|| "pending".into());
    Dynamic::from_map(map_of(vec![
        ("id", Dynamic::from(id.to_string())),
        ("status", Dynamic::from(status)),
        ("reason", st.and_then(|s| s.reason).map(Dynamic::from).unwrap_or(Dynamic::UNIT)),
        ("dir", Dynamic::from(dir.display().to_string())),
        ("summary", summary.unwrap_or(Dynamic::UNIT)),
    ]))
}

const OPTION_KEYS: &[&str] = &["project", "jobs", "runs_dir"];

fn run_matrix(ctx: &NativeCallContext, spec: Map, opts: Map, f: FnPtr) -> RResult<Array> {
    check_keys(&opts, OPTION_KEYS, "matrix()")?;
    let script = SCRIPT.with(|s| s.borrow().clone());
    let (script_path, args) = script.clone().unwrap_or_else(|| (PathBuf::from("<shell>"), Vec::new()));
    let project = match opts.get("project") {
        Some(p) => {
            let p = expect_str(p, "project")?;
            crate::config::check_project_name(&p).map_err(|e| rerr(format!("matrix(): {e}")))?;
            p
        }
        None => {
            let stem = script_path
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_else(|| "matrix".into());
            let spec_text = format!("{spec:?}");
            format!("{stem}-{}", &crate::config::checksum(&[&spec_text, &args.join(" ")])[..5])
        }
    };
    let runs_dir = match opts.get("runs_dir") {
        Some(d) => PathBuf::from(expect_str(d, "runs_dir")?),
        None => PathBuf::from("runs"),
    };
    let jobs = match opts.get("jobs") {
        Some(j) => j.as_int().map_err(|_| rerr("jobs must be an int"))?.max(1) as usize,
        None => 1,
    };
    let project_dir = runs_dir.join(&project);
    let cells = cells(&spec)?;
    let ids: Vec<String> = cells.iter().map(cell_id).collect();
    for (i, id) in ids.iter().enumerate() {
        if ids[..i].contains(id) {
            return Err(rerr(format!("matrix(): two cells share the id '{id}'")));
        }
    }
    // In a child: run just our cell, then end the script.
    if let Ok(mine) = std::env::var("KNLP_MATRIX_CELL") {
        crate::matrix::set_cell_threads(0);
        let i = ids
            .iter()
            .position(|id| *id == mine)
            .ok_or_else(|| rerr(format!("matrix(): no cell '{mine}'")))?;
        if let Err(e) = run_one(ctx, &f, &cells[i], &ids[i], &project_dir) {
            mark_failed(&project_dir.join(&ids[i]), &e.to_string())?;
            return Err(e);
        }
        return Err(super::helpers::exit_with(0));
    }
    let todo: Vec<usize> =
        (0..cells.len()).filter(|&i| status_of(&project_dir.join(&ids[i])) != Status::Done).collect();
    println!("matrix {project}: {} cells, {} to run ({})", cells.len(), todo.len(), project_dir.display());
    if jobs <= 1 || script.is_none() {
        for &i in &todo {
            println!("=== cell {}: {}", i + 1, ids[i]);
            if let Err(e) = run_one(ctx, &f, &cells[i], &ids[i], &project_dir) {
                // An interrupt ends the matrix; the cell resumes next time.
                if ending(&e) != Ending::Failed
                    || status_of(&project_dir.join(&ids[i])) == Status::Interrupted
                {
                    return Err(e);
                }
                let msg = e.to_string();
                mark_failed(&project_dir.join(&ids[i]), &msg)?;
                println!("cell {} failed: {msg}", ids[i]);
            }
        }
    } else {
        run_children(&script_path, &args, &ids, &todo, &project_dir, jobs)?;
    }
    Ok(ids.iter().map(|id| result_of(id, &project_dir.join(id))).collect())
}

/// Record a cell's failure unless its run already says why it stopped.
fn mark_failed(dir: &Path, msg: &str) -> RResult<()> {
    let run = RunDir::open(dir).rt()?;
    if !matches!(status_of(dir), Status::Failed | Status::Interrupted) {
        run.set_status(Status::Failed, Some(msg)).rt()?;
    }
    Ok(())
}

/// The global RNG's seed at the start of a cell: its `seed` value if it
/// has one, else a hash of its id, so a cell draws the same numbers in this
/// process as in a child process, whichever cells ran before it.
fn cell_seed(cell: &Map, id: &str) -> i64 {
    if let Some(s) = cell.get("seed").and_then(|s| s.as_int().ok()) {
        return s;
    }
    // The project's checksum (FNV-1a): stable across builds and platforms.
    let h = u64::from_str_radix(&crate::config::checksum(&[id]), 16).unwrap_or(0);
    (h >> 1) as i64
}

/// Run one cell's closure with its run directory set for train().
fn run_one(ctx: &NativeCallContext, f: &FnPtr, cell: &Map, id: &str, project_dir: &Path) -> RResult<Dynamic> {
    let dir = project_dir.join(id);
    let mut c = cell.clone();
    c.insert("id".into(), Dynamic::from(id.to_string()));
    c.insert("run_dir".into(), Dynamic::from(dir.display().to_string()));
    tch::manual_seed(cell_seed(&c, id));
    CELL.with(|x| *x.borrow_mut() = Some((dir.clone(), c.clone())));
    let out = f.call_within_context::<Dynamic>(ctx, (Dynamic::from_map(c),));
    CELL.with(|x| *x.borrow_mut() = None);
    let out = out?;
    // A closure that trained nothing still leaves a finished cell.
    let run = RunDir::open(&dir).rt()?;
    if run.status().map(|s| s.status).unwrap_or(Status::Pending) == Status::Pending {
        run.set_status(Status::Done, None).rt()?;
    }
    Ok(out)
}

fn run_children(
    script: &Path,
    args: &[String],
    ids: &[String],
    todo: &[usize],
    project_dir: &Path,
    jobs: usize,
) -> RResult<()> {
    let exe = std::env::current_exe().rt()?;
    let gpus = tch::Cuda::device_count() as usize;
    let mut queue: std::collections::VecDeque<usize> = todo.iter().copied().collect();
    let mut running: Vec<(usize, usize, Child)> = Vec::new();
    while !queue.is_empty() || !running.is_empty() {
        while running.len() < jobs && !queue.is_empty() {
            let i = queue.pop_front().unwrap_or(0);
            let slot = (0..jobs).find(|s| !running.iter().any(|r| r.1 == *s)).unwrap_or(0);
            let dir = project_dir.join(&ids[i]);
            std::fs::create_dir_all(&dir).rt()?;
            let log = std::fs::File::create(dir.join("output.log")).rt()?;
            let mut cmd = Command::new(&exe);
            cmd.arg("run").arg(script).args(args).env("KNLP_MATRIX_CELL", &ids[i]);
            crate::matrix::place_worker(&mut cmd, slot, jobs, gpus, 1);
            cmd.stdout(Stdio::from(log.try_clone().rt()?)).stderr(Stdio::from(log));
            println!("started {}", ids[i]);
            running.push((i, slot, cmd.spawn().rt()?));
        }
        std::thread::sleep(Duration::from_millis(200));
        let mut k = 0;
        while k < running.len() {
            if let Some(st) = running[k].2.try_wait().rt()? {
                let (i, _, _) = running.remove(k);
                let dir = project_dir.join(&ids[i]);
                if !st.success() && status_of(&dir) != Status::Failed {
                    let run = RunDir::open(&dir).rt()?;
                    let _ =
                        run.set_status(Status::Failed, Some(&format!("the cell's process exited with {st}")));
                }
                println!("finished {}: {}", ids[i], status_of(&dir));
            } else {
                k += 1;
            }
        }
    }
    Ok(())
}

pub fn register(engine: &mut Engine, docs: &mut Vec<DocEntry>) {
    let mut api = Api::new(engine, docs);
    api.group("Training");
    api.f("matrix", "spec: map, f", "Run `f(cell)` for every cell of the cross product of `spec`'s arrays (e.g. `#{ optimizer: [...], pruning: [...], sparsity: [...] }`); see the form with options.", |ctx: NativeCallContext, spec: Map, f: FnPtr| -> RResult<Array> {
        run_matrix(&ctx, spec, Map::new(), f)
    });
    api.f("matrix", "spec: map, options: map, f", "Run a matrix with `#{ project, jobs, runs_dir }`: each cell gets `#{ ...its values, id, run_dir }` and runs under runs/<project>/<cell id>/ (train() inside uses that folder and resumes); done cells are skipped; `jobs > 1` runs cells in child processes (one GPU each when there are several). Returns `[#{ id, status, reason, dir, summary }]`.", |ctx: NativeCallContext, spec: Map, opts: Map, f: FnPtr| -> RResult<Array> {
        run_matrix(&ctx, spec, opts, f)
    });
    api.f(
        "matrix_cells",
        "spec: map",
        "The cells of a spec, with their ids, without running anything.",
        |spec: Map| -> RResult<Array> {
            Ok(cells(&spec)?
                .into_iter()
                .map(|mut c| {
                    let id = cell_id(&c);
                    c.insert("id".into(), Dynamic::from(id));
                    Dynamic::from_map(c)
                })
                .collect())
        },
    );
}
