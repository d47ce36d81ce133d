//! Experiment tracking: the training loop reports a run's start, its metric
//! records and its summary to a [`Tracker`], which fans them out to sinks.
//!
//! ```text
//! local     always on: config.json, system.json, metrics.jsonl, summary.json
//!           in the run directory (the source of truth)
//! trackio   TRACKER=trackio: the run in trackio's local store, beside the
//!           user's other runs in `trackio show`
//! ```
//!
//! The spec (`TRACKER`) is a comma-separated list: `local`, `trackio`,
//! `local,trackio`, `none` (local only). A sink other than the local one
//! never stops training: its first error is written to the run's train.log
//! and stderr, and the sink is disabled for the rest of the run. New sinks
//! (W&B, ...) implement [`Sink`] and get a name in [`Tracker::from_spec`].
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde_json::{Map, Value};

use crate::runs::RunDir;

pub mod local;
pub mod sysinfo;
pub mod trackio;

pub use local::LocalSink;
pub use sysinfo::{config_hash, SystemInfo};
pub use trackio::TrackioSink;

/// The environment variable holding the tracker spec.
pub const ENV: &str = "TRACKER";
/// Sink names a spec may list (`none` means the local sink only).
pub const VALID: &[&str] = &["local", "trackio", "none"];
/// Trackers known to knlp that this build does not provide.
const NOT_BUILT: &[&str] = &["wandb"];

/// What a sink learns when a run starts.
#[derive(Clone, Debug)]
pub struct RunInfo {
    /// The tracker's project: the knlp project (`runs/<project>/<cell>`).
    pub project: String,
    /// The run's name: the cell id of a matrix, or the run directory's name.
    pub run_name: String,
    pub run_dir: PathBuf,
    /// The resolved configuration record of the run.
    pub config: Value,
    pub system: SystemInfo,
    /// Continuing from a checkpoint: the run directory already holds this
    /// run's configuration and metrics up to the checkpoint.
    pub resumed: bool,
    /// On resume, the last step logged before the interruption: steps up to
    /// it are replayed from the checkpoint, and sinks that cannot take back
    /// a logged point (trackio) skip them.
    pub logged_through: Option<i64>,
}

impl RunInfo {
    /// Names from the record or the run directory (see [`run_names`]) and
    /// the machine's description (see [`SystemInfo::collect`]).
    pub fn new(run_dir: &Path, config: Value, resumed: bool) -> RunInfo {
        let (project, run_name) = run_names(run_dir, &config);
        let system = SystemInfo::collect(&config);
        RunInfo {
            project,
            run_name,
            run_dir: run_dir.to_path_buf(),
            config,
            system,
            resumed,
            logged_through: None,
        }
    }
}

/// `(project, run name)` of a run directory: `runs/<project>/<cell>` gives
/// `(<project>, <cell>)`; any other directory (`runs/<name>`, a temporary
/// one) belongs to the project `knlp` under its own name.
pub fn naming(run_dir: &Path) -> (String, String) {
    let abs = if run_dir.is_absolute() {
        run_dir.to_path_buf()
    } else {
        std::env::current_dir().map(|d| d.join(run_dir)).unwrap_or_else(|_| run_dir.to_path_buf())
    };
    let name_of = |p: Option<&Path>| p.and_then(Path::file_name).map(|n| n.to_string_lossy().into_owned());
    let run = name_of(Some(&abs)).unwrap_or_else(|| "run".into());
    let parent = abs.parent();
    let project = match (name_of(parent), name_of(parent.and_then(Path::parent))) {
        (Some(p), Some(g)) if g == "runs" && p != "runs" => p,
        _ => "knlp".into(),
    };
    (project, run)
}

/// `(project, run name)` of a run: a matrix cell's record names both
/// (`"project": "<name>"`, `"cell": {"id": "<cell id>", ..}`); any other run
/// is named by its directory (see [`naming`]).
pub fn run_names(run_dir: &Path, config: &Value) -> (String, String) {
    let (mut project, mut run) = naming(run_dir);
    let text = |v: Option<&Value>| v.and_then(Value::as_str).filter(|s| !s.is_empty()).map(String::from);
    if let Some(p) = text(config.get("project")) {
        project = p;
    }
    let cell = config.get("cell");
    if let Some(id) = text(cell).or_else(|| text(cell.and_then(|c| c.get("id")))) {
        run = id;
    }
    (project, run)
}

/// A destination for a run's records.
pub trait Sink {
    fn start(&mut self, run: &RunInfo) -> Result<()>;
    /// One metrics record (`step`, `epoch`, losses, ...), as the loop logs it.
    fn log(&mut self, record: &Map<String, Value>) -> Result<()>;
    /// The run's summary and final status (`done`, `failed`, `interrupted`).
    fn finish(&mut self, summary: &Value, status: &str) -> Result<()>;
    fn name(&self) -> &str;
    /// A required sink's errors stop the run; any other sink is disabled
    /// with a warning instead.
    fn required(&self) -> bool {
        false
    }
}

struct Slot {
    sink: Box<dyn Sink>,
    enabled: bool,
}

/// Fans a run out to its sinks; the local sink is always the first.
pub struct Tracker {
    slots: Vec<Slot>,
    run_dir: Option<PathBuf>,
    warnings: Vec<String>,
}

/// The sink names of a spec, deduplicated, `local` first.
pub fn parse_spec(spec: &str) -> Result<Vec<String>> {
    let mut names = vec!["local".to_string()];
    let mut none = false;
    for part in spec.split(',').map(|p| p.trim().to_ascii_lowercase()).filter(|p| !p.is_empty()) {
        match part.as_str() {
            "none" => none = true,
            n if VALID.contains(&n) => {
                if !names.iter().any(|x| x == n) {
                    names.push(n.to_string());
                }
            }
            n if NOT_BUILT.contains(&n) => {
                bail!("tracker '{n}' is not available in this build (valid: {})", VALID.join(", "))
            }
            n => bail!("unknown tracker '{n}' in '{spec}' (valid: {})", VALID.join(", ")),
        }
    }
    if none && names.len() > 1 {
        bail!("tracker 'none' cannot be combined with {} in '{spec}'", names[1..].join(", "));
    }
    Ok(names)
}

impl Tracker {
    /// The sinks of a spec (see [`parse_spec`]); the local sink is always on.
    pub fn from_spec(spec: &str) -> Result<Tracker> {
        let mut t = Tracker { slots: Vec::new(), run_dir: None, warnings: Vec::new() };
        for name in parse_spec(spec)? {
            let sink: Box<dyn Sink> = match name.as_str() {
                "local" => Box::new(LocalSink::new()),
                "trackio" => Box::new(TrackioSink::new()),
                other => bail!("tracker '{other}' has no sink"),
            };
            t.add(sink);
        }
        Ok(t)
    }

    /// No sinks at all: the ranks of a distributed run other than rank 0.
    pub fn silent() -> Tracker {
        Tracker { slots: Vec::new(), run_dir: None, warnings: Vec::new() }
    }

    /// The spec in `TRACKER` (unset or empty: local only).
    pub fn from_env() -> Result<Tracker> {
        let spec = std::env::var(ENV).unwrap_or_default();
        Tracker::from_spec(&spec).map_err(|e| anyhow::anyhow!("{ENV}: {e:#}"))
    }

    /// Add a sink (one a spec cannot name, or one configured by hand).
    pub fn add(&mut self, sink: Box<dyn Sink>) {
        self.slots.push(Slot { sink, enabled: true });
    }

    /// Names of the sinks still enabled.
    pub fn sinks(&self) -> Vec<&str> {
        self.slots.iter().filter(|s| s.enabled).map(|s| s.sink.name()).collect()
    }

    /// The warnings of sinks disabled so far.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    pub fn start(&mut self, run: &RunInfo) -> Result<()> {
        self.run_dir = Some(run.run_dir.clone());
        self.each(|s| s.start(run))
    }

    pub fn log(&mut self, record: &Map<String, Value>) -> Result<()> {
        self.each(|s| s.log(record))
    }

    pub fn finish(&mut self, summary: &Value, status: &str) -> Result<()> {
        self.each(|s| s.finish(summary, status))
    }

    fn each(&mut self, mut f: impl FnMut(&mut dyn Sink) -> Result<()>) -> Result<()> {
        for i in 0..self.slots.len() {
            if !self.slots[i].enabled {
                continue;
            }
            if let Err(e) = f(&mut *self.slots[i].sink) {
                if self.slots[i].sink.required() {
                    return Err(e);
                }
                self.slots[i].enabled = false;
                let name = self.slots[i].sink.name();
                let msg = format!("warning: {e:#}; tracker '{name}' disabled for the rest of the run");
                self.warn(msg);
            }
        }
        Ok(())
    }

    fn warn(&mut self, msg: String) {
        eprintln!("{msg}");
        if let Some(dir) = &self.run_dir {
            RunDir { path: dir.clone() }.log(&msg);
        }
        self.warnings.push(msg);
    }
}

/// The numeric entries of a record (booleans, strings and nulls dropped).
pub fn numeric(record: &Map<String, Value>) -> Map<String, Value> {
    record.iter().filter(|(_, v)| v.is_number()).map(|(k, v)| (k.clone(), v.clone())).collect()
}
