//! Run directories: one folder per run with its resolved configuration,
//! status, metrics, summary, checkpoints and log. One naming scheme that
//! training, continuation and reporting all read.
//!
//! ```text
//! <run>/config.json        resolved configuration (written at start)
//! <run>/status.json        {"status": pending|running|done|failed|interrupted, "reason", "updated"}
//! <run>/metrics.jsonl      one JSON object per logged step, appended as it happens
//! <run>/summary.json       final metrics (written at the end)
//! <run>/train.log          what the run printed
//! <run>/checkpoints/last.safetensors, best.safetensors (+ .json copies of their state)
//! ```
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pending,
    Running,
    Done,
    Failed,
    /// Stopped by Ctrl-C at a step boundary, with a checkpoint to resume from.
    Interrupted,
}

impl std::fmt::Display for Status {
    /// The name status.json uses.
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.pad(match self {
            Status::Pending => "pending",
            Status::Running => "running",
            Status::Done => "done",
            Status::Failed => "failed",
            Status::Interrupted => "interrupted",
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusRecord {
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub updated: String,
    /// The process and host of a running run, so readers can tell a run
    /// still going from one whose process died.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

pub struct RunDir {
    pub path: PathBuf,
}

pub const CONFIG: &str = "config.json";
pub const STATUS: &str = "status.json";
pub const METRICS: &str = "metrics.jsonl";
pub const SUMMARY: &str = "summary.json";
pub const LOG: &str = "train.log";
pub const CHECKPOINTS: &str = "checkpoints";

/// Write `text` to `path` atomically (temporary file, fsync, rename).
pub fn write_atomic(path: &Path, text: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    }
    let tmp = crate::safetensors::temp_path(path);
    let res = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(text)?;
        f.sync_all()
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("{}", path.display()));
    }
    fs::rename(&tmp, path).with_context(|| format!("{}", path.display()))?;
    crate::safetensors::sync_dir(path);
    Ok(())
}

/// UTC timestamp `YYYY-MM-DDTHH:MM:SSZ` (one implementation, in the report crate).
pub use report::util::now_iso;

impl RunDir {
    /// Open (creating if needed) the run directory at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        fs::create_dir_all(path.join(CHECKPOINTS))
            .with_context(|| format!("cannot create run directory {}", path.display()))?;
        Ok(RunDir { path: path.to_path_buf() })
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn checkpoint(&self, which: &str) -> PathBuf {
        self.path.join(CHECKPOINTS).join(format!("{which}.safetensors"))
    }

    pub fn write_json(&self, name: &str, value: &serde_json::Value) -> Result<()> {
        let mut text = serde_json::to_vec_pretty(value)?;
        text.push(b'\n');
        write_atomic(&self.file(name), &text)
    }

    pub fn read_json(&self, name: &str) -> Result<serde_json::Value> {
        let p = self.file(name);
        let text = fs::read_to_string(&p).with_context(|| format!("{}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", p.display()))
    }

    pub fn set_status(&self, status: Status, reason: Option<&str>) -> Result<()> {
        let running = status == Status::Running;
        let rec = StatusRecord {
            status,
            reason: reason.map(String::from),
            updated: now_iso(),
            pid: running.then(std::process::id),
            host: running.then(hostname),
        };
        self.write_json(STATUS, &serde_json::to_value(rec)?)
    }

    /// The recorded status; a missing file means the run never started.
    pub fn status(&self) -> Result<StatusRecord> {
        let p = self.file(STATUS);
        if !p.exists() {
            return Ok(StatusRecord {
                status: Status::Pending,
                reason: None,
                updated: String::new(),
                pid: None,
                host: None,
            });
        }
        let v = self.read_json(STATUS)?;
        serde_json::from_value(v).with_context(|| format!("{}: not a status record", p.display()))
    }

    /// Append one metrics record and flush it, so a crash loses nothing
    /// already logged.
    pub fn append_metrics(&self, rec: &serde_json::Value) -> Result<()> {
        append_jsonl(&self.file(METRICS), rec)
    }

    /// All metrics records, skipping a torn last line from a crash.
    pub fn metrics(&self) -> Result<Vec<serde_json::Value>> {
        read_jsonl(&self.file(METRICS))
    }

    /// Drop metrics records logged after `step` (a resumed run logs them again).
    pub fn truncate_metrics_after(&self, step: i64) -> Result<()> {
        let recs = self.metrics()?;
        let keep: Vec<&serde_json::Value> = recs
            .iter()
            .filter(|r| r.get("step").and_then(|s| s.as_i64()).is_none_or(|s| s <= step))
            .collect();
        let mut text = Vec::new();
        for r in keep {
            text.extend(serde_json::to_vec(r)?);
            text.push(b'\n');
        }
        write_atomic(&self.file(METRICS), &text)
    }

    /// Append a line to the run's log.
    pub fn log(&self, line: &str) {
        if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(self.file(LOG)) {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// Read a JSON-lines file; a malformed final line (torn write) is ignored,
/// a malformed line elsewhere is an error naming file and line.
pub fn read_jsonl(path: &Path) -> Result<Vec<serde_json::Value>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, l) in lines.iter().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(l) {
            Ok(v) => out.push(v),
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => break,
            Err(e) => bail!("{}:{}: not a JSON record: {e}", path.display(), i + 1),
        }
    }
    Ok(out)
}

/// Append one JSON record as a line of `path` (created if missing), in one
/// write.
pub fn append_jsonl(path: &Path, rec: &serde_json::Value) -> Result<()> {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("{}", path.display()))?;
    let mut line = serde_json::to_vec(rec)?;
    line.push(b'\n');
    f.write_all(&line).with_context(|| format!("{}", path.display()))?;
    Ok(())
}

/// This machine's name, as status files, locks and system.json record it.
pub fn hostname() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()))
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_survive_torn_lines_and_truncate() {
        let d = std::env::temp_dir().join(format!("knlp-runs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        let r = RunDir::open(&d).unwrap();
        for s in 0..5 {
            r.append_metrics(&serde_json::json!({"step": s, "loss": 1.0})).unwrap();
        }
        let mut f = OpenOptions::new().append(true).open(r.file(METRICS)).unwrap();
        f.write_all(b"{\"step\": 5, \"lo").unwrap();
        assert_eq!(r.metrics().unwrap().len(), 5);
        r.truncate_metrics_after(2).unwrap();
        assert_eq!(r.metrics().unwrap().len(), 3);
        r.set_status(Status::Failed, Some("nan")).unwrap();
        let st = r.status().unwrap();
        assert_eq!(st.status, Status::Failed);
        assert_eq!(st.reason.as_deref(), Some("nan"));
        assert_eq!(now_iso().len(), 20);
    }
}
