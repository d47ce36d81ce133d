//! The trackio sink (`TRACKER=trackio`): the run goes into trackio's local
//! SQLite store, so `trackio show` lists knlp runs beside the user's others.
//!
//! trackio is a Python package; the sink runs one Python child per run
//! (`python -u -c SCRIPT`) and writes it JSON lines on stdin:
//!
//! ```text
//! {"op":"init","project":..,"name":..,"config":{..}}  trackio.init(.., resume="allow")
//! {"op":"log","metrics":{..},"step":N}                 trackio.log(metrics, step=N)
//! {"op":"finish","status":".."}                        trackio.finish(), then exit
//! ```
//!
//! The child's output (trackio's messages, a traceback) goes to the run's
//! train.log; it ignores Ctrl-C (the trainer stops at a step boundary and
//! finishes the run). Lines are handed to a writer thread, so a slow child never
//! blocks training; `finish` waits for the child to flush and exit (with a
//! time-out). The store is trackio's: `TRACKIO_DIR`, else `$HF_HOME/trackio`,
//! else `~/.cache/huggingface/trackio`; nothing there is ever deleted.
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};

use super::{numeric, RunInfo, Sink};
use crate::runs::LOG;

/// The trackio release knlp is tested against (`make setup` installs it).
pub const TRACKIO_VERSION: &str = "0.43.0";
/// The environment variable naming the Python interpreter to run.
pub const PYTHON_ENV: &str = "KNLP_PYTHON";
/// How long `finish` waits for the child by default.
pub const FINISH_TIMEOUT: Duration = Duration::from_secs(60);

/// The child: a JSON-lines loop over trackio's API. Its stdout and stderr
/// are the run's train.log, line-prefixed and without colour codes.
const SCRIPT: &str = r#"
import json, re, signal, sys

# Ctrl-C is the trainer's to handle: it stops at a step boundary and then
# sends "finish"; dying here would lose the last records.
signal.signal(signal.SIGINT, signal.SIG_IGN)

class _Log:
    _ansi = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

    def __init__(self, f):
        self._f, self._buf = f, ""

    def write(self, s):
        self._buf += self._ansi.sub("", s)
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            self._f.write("trackio: " + line + "\n")
        self._f.flush()
        return len(s)

    def flush(self):
        self._f.flush()

    def isatty(self):
        return False

    def __getattr__(self, name):
        return getattr(self._f, name)

sys.stdout, sys.stderr = _Log(sys.__stdout__), _Log(sys.__stderr__)
try:
    import trackio
except Exception as e:
    print(f"cannot import trackio ({e}); install it with: {sys.executable} -m pip install trackio==" + sys.argv[1],
          file=sys.stderr)
    sys.exit(3)

active = False
for line in sys.stdin:
    if not line.strip():
        continue
    msg = json.loads(line)
    op = msg.get("op")
    if op == "init":
        trackio.init(project=msg["project"], name=msg["name"], config=msg.get("config") or {},
                     resume="allow", embed=False)
        active = True
    elif op == "log":
        if active:
            trackio.log(msg["metrics"], step=msg.get("step"))
    elif op == "finish":
        break
    else:
        raise ValueError(f"unknown op {op!r}")
if active:
    trackio.finish()
"#;

/// Where trackio keeps its databases, resolved as trackio does.
pub fn store_dir() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = var("TRACKIO_DIR") {
        return d;
    }
    let hf_home = var("HF_HOME").unwrap_or_else(|| {
        let cache = var("XDG_CACHE_HOME")
            .unwrap_or_else(|| var("HOME").unwrap_or_else(|| PathBuf::from("~")).join(".cache"));
        cache.join("huggingface")
    });
    hf_home.join("trackio")
}

/// The interpreter: `KNLP_PYTHON`, else the project's virtual environment
/// (found at run time, `crate::project`), else `python3` on the PATH.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os(PYTHON_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    crate::project::venv_python().unwrap_or_else(|| PathBuf::from("python3"))
}

struct Proc {
    child: Child,
    tx: Option<Sender<String>>,
    writer: Option<JoinHandle<()>>,
    /// The writer thread's error, if a write to the child failed.
    broken: Arc<Mutex<Option<String>>>,
}

pub struct TrackioSink {
    python: Option<PathBuf>,
    envs: Vec<(String, PathBuf)>,
    timeout: Duration,
    proc: Option<Proc>,
    /// Steps already in trackio's run (a resumed run replays them).
    skip_through: Option<i64>,
}

impl Default for TrackioSink {
    fn default() -> Self {
        Self::new()
    }
}

impl TrackioSink {
    pub fn new() -> Self {
        TrackioSink {
            python: None,
            envs: Vec::new(),
            timeout: FINISH_TIMEOUT,
            proc: None,
            skip_through: None,
        }
    }

    /// Run this interpreter instead of [`python()`]'s choice.
    pub fn with_python(mut self, python: impl Into<PathBuf>) -> Self {
        self.python = Some(python.into());
        self
    }

    /// Set an environment variable of the child (e.g. `TRACKIO_DIR`).
    pub fn with_env(mut self, key: &str, value: impl Into<PathBuf>) -> Self {
        self.envs.push((key.to_string(), value.into()));
        self
    }

    /// How long `finish` waits for the child to flush and exit.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The Python child's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.child.id())
    }

    fn send(&mut self, msg: &Value) -> Result<()> {
        let Some(p) = self.proc.as_mut() else { bail!("trackio: start() was not called") };
        if let Some(e) = p.broken.lock().map(|b| b.clone()).unwrap_or(None) {
            bail!("trackio: writing to the Python child failed: {e} (its output is in {LOG})");
        }
        if let Some(st) = p.child.try_wait().context("trackio: cannot poll the Python child")? {
            bail!("trackio: the Python child exited ({st}) before the run finished (its output is in {LOG})");
        }
        let tx = p.tx.as_ref().ok_or_else(|| anyhow!("trackio: already finished"))?;
        tx.send(format!("{msg}\n")).map_err(|_| anyhow!("trackio: the writer thread has stopped"))
    }
}

fn writer(mut stdin: ChildStdin, rx: Receiver<String>, broken: Arc<Mutex<Option<String>>>) {
    for line in rx {
        if let Err(e) = stdin.write_all(line.as_bytes()).and_then(|_| stdin.flush()) {
            if let Ok(mut b) = broken.lock() {
                *b = Some(e.to_string());
            }
            return;
        }
    }
    // Dropping stdin closes the pipe: the child sees EOF.
}

/// Wait for the child until `deadline`; kill it after.
fn wait_until(child: &mut Child, deadline: Instant) -> Result<ExitStatus> {
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("did not exit in time and was killed");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Sink for TrackioSink {
    fn start(&mut self, run: &RunInfo) -> Result<()> {
        if let Some(p) = self.proc.take() {
            release(p);
        }
        self.skip_through = run.logged_through;
        let python = self.python.clone().unwrap_or_else(python);
        let log_path = run.run_dir.join(LOG);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("trackio: {}", log_path.display()))?;
        let log2: File = log.try_clone()?;
        let mut cmd = Command::new(&python);
        // Its own process group: a terminal's Ctrl-C reaches the trainer only.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.arg("-u").arg("-c").arg(SCRIPT).arg(TRACKIO_VERSION);
        cmd.stdin(Stdio::piped()).stdout(Stdio::from(log)).stderr(Stdio::from(log2));
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().with_context(|| format!("trackio: cannot run {}", python.display()))?;
        let stdin = child.stdin.take().ok_or_else(|| anyhow!("trackio: no stdin pipe"))?;
        let (tx, rx) = mpsc::channel();
        let broken = Arc::new(Mutex::new(None));
        let b = broken.clone();
        let writer = std::thread::Builder::new()
            .name("knlp-trackio".into())
            .spawn(move || writer(stdin, rx, b))
            .context("trackio: cannot start the writer thread")?;
        self.proc = Some(Proc { child, tx: Some(tx), writer: Some(writer), broken });
        self.send(&json!({
            "op": "init",
            "project": run.project,
            "name": run.run_name,
            "config": run.config,
        }))
    }

    fn log(&mut self, record: &Map<String, Value>) -> Result<()> {
        let mut metrics = numeric(record);
        let step = metrics.remove("step").and_then(|s| s.as_i64());
        let replayed = matches!((step, self.skip_through), (Some(s), Some(t)) if s <= t);
        if metrics.is_empty() || replayed {
            return Ok(());
        }
        self.send(&json!({ "op": "log", "metrics": metrics, "step": step }))
    }

    fn finish(&mut self, _summary: &Value, status: &str) -> Result<()> {
        let sent = self.send(&json!({ "op": "finish", "status": status }));
        let Some(mut p) = self.proc.take() else { return sent };
        drop(p.tx.take());
        let deadline = Instant::now() + self.timeout;
        let waited = wait_until(&mut p.child, deadline);
        if let Some(w) = p.writer.take() {
            let _ = w.join();
        }
        sent?;
        let st = waited.map_err(|e| anyhow!("trackio: the Python child {e} after {:?}", self.timeout))?;
        if !st.success() {
            bail!("trackio: the Python child failed ({st}); its output is in {LOG}");
        }
        Ok(())
    }

    fn name(&self) -> &str {
        "trackio"
    }
}

/// Let go of a child without waiting: close its stdin so it finishes the
/// trackio run on its own, and reap it in the background.
fn release(mut p: Proc) {
    drop(p.tx.take());
    let _ = std::thread::Builder::new().name("knlp-trackio-reap".into()).spawn(move || {
        let _ = p.child.wait();
        if let Some(w) = p.writer.take() {
            let _ = w.join();
        }
    });
}

impl Drop for TrackioSink {
    /// A run that ends without `finish` (an error, a simulated crash).
    fn drop(&mut self) {
        if let Some(p) = self.proc.take() {
            release(p);
        }
    }
}
