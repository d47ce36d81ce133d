//! The local sink: the run directory's own records, always on and the
//! source of truth for reports and resume.
//!
//! ```text
//! start    config.json (fresh runs), system.json; a fresh run starts a new
//!          metrics.jsonl and drops a stale summary.json
//! log      one line appended to metrics.jsonl
//! finish   summary.json
//! ```
use anyhow::{bail, Result};
use serde_json::{Map, Value};

use super::{RunInfo, Sink};
use crate::runs::{RunDir, CONFIG, METRICS, SUMMARY};

/// The file `start` writes the machine's description to.
pub const SYSTEM: &str = "system.json";

#[derive(Default)]
pub struct LocalSink {
    run: Option<RunDir>,
}

impl LocalSink {
    pub fn new() -> Self {
        LocalSink { run: None }
    }

    fn run(&self) -> Result<&RunDir> {
        match &self.run {
            Some(r) => Ok(r),
            None => bail!("local tracker: start() was not called"),
        }
    }
}

impl Sink for LocalSink {
    fn start(&mut self, info: &RunInfo) -> Result<()> {
        let run = RunDir::open(&info.run_dir)?;
        if !info.resumed {
            run.write_json(CONFIG, &info.config)?;
            for stale in [METRICS, SUMMARY] {
                match std::fs::remove_file(run.file(stale)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        bail!("{}: {e}", run.file(stale).display())
                    }
                    _ => {}
                }
            }
        }
        run.write_json(SYSTEM, &serde_json::to_value(&info.system)?)?;
        self.run = Some(run);
        Ok(())
    }

    fn log(&mut self, record: &Map<String, Value>) -> Result<()> {
        self.run()?.append_metrics(&Value::Object(record.clone()))
    }

    fn finish(&mut self, summary: &Value, _status: &str) -> Result<()> {
        self.run()?.write_json(SUMMARY, summary)
    }

    fn name(&self) -> &str {
        "local"
    }

    fn required(&self) -> bool {
        true
    }
}
