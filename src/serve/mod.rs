//! `knlp serve`: a page of live training curves and a JSON API of the runs
//! under a runs folder (docs/serve.md). Read-only: it never writes into
//! the runs it shows. Every endpoint needs the token; it listens on
//! localhost unless told otherwise.
//!
//! ```text
//! GET /                          the page (HTML and JS, no outside requests)
//! GET /api/runs[?project=P]      every run: id, status, summary
//! GET /api/metrics?run=P/R[&since=N][&limit=L]   a run's records from line N
//! GET /api/events[?run=P/R[&since=N] | ?project=P]   server-sent events as lines are logged
//! ```
mod tail;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::runs::{self, RunDir, Status, StatusRecord};
use tail::{Line, Tail};

pub const DEFAULT_PORT: u16 = 6060;
/// The token when `--token` is not given.
pub const TOKEN_ENV: &str = "KNLP_SERVE_TOKEN";
/// How often a stream looks for new lines; new runs and status changes
/// are looked for every `RESCAN`.
const POLL: Duration = Duration::from_millis(250);
const RESCAN: Duration = Duration::from_secs(1);
/// The most of one file read at once, so a long history streams in parts.
const READ_CHUNK: usize = tail::MAX_LINE as usize;
/// The most one event stream reads in one poll, over all its runs; the
/// rest waits for the next poll (right after).
const POLL_BYTES: usize = 1 << 20;
/// Records one `/api/metrics` answer holds by default, and at most.
const METRICS_LIMIT: usize = 10_000;
const METRICS_LIMIT_MAX: usize = 100_000;
/// An idle stream sends a comment this often, so proxies keep it open and
/// a closed client is noticed.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
const PAGE: &str = include_str!("page.html");

pub struct Options {
    pub runs_dir: PathBuf,
    /// An IP address or `localhost`.
    pub host: String,
    /// 0: any free port (printed).
    pub port: u16,
    /// `--token`; None: `$KNLP_SERVE_TOKEN`, else a random one, printed
    /// with the URL.
    pub token: Option<String>,
}

struct App {
    runs_dir: PathBuf,
    token: String,
}

/// Listen and serve until the process is stopped. The first line on
/// stdout is the address (with the token when it was generated here).
pub fn serve(opts: &Options) -> Result<()> {
    let ip = parse_host(&opts.host)?;
    let given = match &opts.token {
        Some(t) => Some((t.clone(), "--token")),
        None => std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty()).map(|t| (t, TOKEN_ENV)),
    };
    let (token, generated) = match given {
        Some((t, from)) => (check_token(&t).with_context(|| format!("the token of {from}"))?, false),
        None => (uuid::Uuid::new_v4().simple().to_string(), true),
    };
    let listener = std::net::TcpListener::bind((ip, opts.port))
        .with_context(|| format!("cannot listen on {}", SocketAddr::new(ip, opts.port)))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    if !ip.is_loopback() {
        eprintln!(
            "knlp serve: warning: listening on {addr}, reachable from other machines: anyone with the \
             token reads every run, and plain HTTP carries the token unencrypted"
        );
    }
    if !opts.runs_dir.is_dir() {
        eprintln!("knlp serve: {} does not exist yet; runs show up as they start", opts.runs_dir.display());
    }
    let url = format!("http://{addr}/");
    // A reader that went away must not stop the server, so errors are ignored.
    let mut out = std::io::stdout();
    let _ = if generated {
        writeln!(out, "knlp serve: {url}?token={token}")
    } else {
        writeln!(out, "knlp serve: {url} (the token is the one given; open {url}?token=<token>)")
    };
    let _ = out.flush();
    eprintln!("knlp serve: showing {} (Ctrl-C stops)", opts.runs_dir.display());
    let app = Arc::new(App { runs_dir: opts.runs_dir.clone(), token });
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        axum::serve(listener, router(app)).await
    })
    .context("serving")
}

fn parse_host(host: &str) -> Result<IpAddr> {
    if host == "localhost" {
        return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    host.parse().map_err(|_| {
        anyhow::anyhow!(
            "--host {host:?}: not an IP address (127.0.0.1, ::1, 0.0.0.0 for every interface) or localhost"
        )
    })
}

/// A configured token: long enough to guess at, and URL-safe so that
/// `?token=` needs no escaping.
fn check_token(t: &str) -> Result<String> {
    if t.len() < 16 {
        bail!("it must have at least 16 characters (got {})", t.len());
    }
    if let Some(c) = t.chars().find(|c| !(c.is_ascii_alphanumeric() || "-._~".contains(*c))) {
        bail!("it may hold letters, digits and - . _ ~ only (not {c:?})");
    }
    Ok(t.to_string())
}

/// Equal in a time that does not depend on where the first difference is.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && std::hint::black_box(a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y))) == 0
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/runs", get(list_runs))
        .route("/api/metrics", get(metrics))
        .route("/api/events", get(events))
        .fallback(|| async {
            ApiError(StatusCode::NOT_FOUND, "no such page or endpoint (see docs/serve.md)".into())
        })
        .layer(middleware::from_fn_with_state(app.clone(), auth))
        .layer(middleware::map_response(secure))
        .with_state(app)
}

/// The token of an `Authorization: Bearer <t>` header (the scheme in any
/// case, RFC 7235).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, t) = value.trim().split_once([' ', '\t'])?;
    scheme.eq_ignore_ascii_case("bearer").then(|| t.trim())
}

/// Every request, the page and unknown paths included, needs the token:
/// `Authorization: Bearer <t>` or `?token=<t>` (a page and EventSource
/// cannot set headers).
async fn auth(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
        .map(str::to_string);
    let query = Query::<HashMap<String, String>>::try_from_uri(req.uri())
        .ok()
        .and_then(|Query(mut q)| q.remove("token"));
    if [bearer, query].iter().flatten().any(|t| same(t.as_bytes(), app.token.as_bytes())) {
        return next.run(req).await;
    }
    let mut res = ApiError(
        StatusCode::UNAUTHORIZED,
        "missing or wrong token: send `Authorization: Bearer <token>` or add `?token=<token>` \
         (knlp serve prints it at start)"
            .into(),
    )
    .into_response();
    res.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    res
}

/// Nothing cached (answers carry run data), nothing framed, no token in a
/// referrer, and the page may only talk to this server.
async fn secure(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; frame-ancestors 'none'",
        ),
    );
    res
}

/// A 4xx answer: `{"error": "..."}`.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

/// The query's parameters; any but `allowed` (and `token`) is an error.
fn params(uri: &Uri, allowed: &[&str]) -> Result<HashMap<String, String>, ApiError> {
    let Query(q) = Query::<HashMap<String, String>>::try_from_uri(uri).map_err(|e| bad(format!("{e}")))?;
    if let Some(k) = q.keys().find(|k| *k != "token" && !allowed.contains(&k.as_str())) {
        return Err(bad(format!("unknown parameter {k:?} (this endpoint takes: {})", allowed.join(", "))));
    }
    Ok(q)
}

/// A project or run folder name: no separators, nothing hidden, no `..`.
fn check_name(n: &str) -> Result<&str, ApiError> {
    if n.is_empty() || n.starts_with('.') || n.contains(['/', '\\', '\0']) || n.len() > 255 {
        return Err(bad(format!("{n:?}: not a project or run name")));
    }
    Ok(n)
}

/// A folder of run files, as `runs.rs` lays them out.
fn is_run_dir(p: &Path) -> bool {
    [runs::CONFIG, runs::STATUS, runs::METRICS, runs::SUMMARY].iter().any(|f| p.join(f).is_file())
}

/// Names of the visible subfolders of `dir`, in natural order.
fn subdirs(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort_by(|a, b| report::util::natural_cmp(a, b));
    names
}

impl App {
    /// Every run, as `(id, folder)`: `project/run` for the runs of a
    /// project (`knlp train`), `run` for one directly in the runs folder
    /// (a script's `train()`).
    fn find_runs(&self, project: Option<&str>) -> Vec<(String, PathBuf)> {
        let mut out = Vec::new();
        let projects = match project {
            Some(p) => vec![p.to_string()],
            None => subdirs(&self.runs_dir),
        };
        for p in projects {
            let pdir = self.runs_dir.join(&p);
            if is_run_dir(&pdir) {
                if project.is_none() {
                    out.push((p, pdir));
                }
                continue;
            }
            for r in subdirs(&pdir) {
                let rdir = pdir.join(&r);
                if is_run_dir(&rdir) {
                    out.push((format!("{p}/{r}"), rdir));
                }
            }
        }
        out
    }

    /// The folder of run `id` (`project/run` or `run`), or why not.
    fn run(&self, id: Option<&String>) -> Result<(String, PathBuf), ApiError> {
        let id = id.ok_or_else(|| bad("the `run` parameter is missing (a run id from /api/runs)"))?;
        let parts: Vec<&str> = id.split('/').collect();
        if parts.len() > 2 {
            return Err(bad(format!("{id:?}: a run id is `project/run` or `run`")));
        }
        let mut dir = self.runs_dir.clone();
        for p in parts {
            dir.push(check_name(p)?);
        }
        if !is_run_dir(&dir) {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("no run {id:?} under {}", self.runs_dir.display()),
            ));
        }
        Ok((id.clone(), dir))
    }

    fn project(&self, p: Option<&String>) -> Result<Option<String>, ApiError> {
        let Some(p) = p else { return Ok(None) };
        if !self.runs_dir.join(check_name(p)?).is_dir() {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("no project {p:?} under {}", self.runs_dir.display()),
            ));
        }
        Ok(Some(p.clone()))
    }
}

/// A run's status, reason and time of the last change. A run recorded as
/// running whose process on this host is gone was killed without a chance
/// to say so (as `knlp results` shows it).
fn state(dir: &Path) -> (String, Option<String>, Option<String>) {
    match (RunDir { path: dir.to_path_buf() }).status() {
        Ok(rec) if rec.status == Status::Running && process_gone(&rec) => {
            ("interrupted".into(), Some("its process is gone".into()), Some(rec.updated))
        }
        Ok(rec) => (rec.status.to_string(), rec.reason, Some(rec.updated).filter(|u| !u.is_empty())),
        Err(e) => ("unknown".into(), Some(format!("{e:#}")), None),
    }
}

fn process_gone(rec: &StatusRecord) -> bool {
    match (rec.pid, &rec.host) {
        (Some(pid), Some(host)) => report::load::pid_gone(pid.into(), host),
        _ => false,
    }
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

/// `f` on a blocking thread: file reads must not hold up the one thread
/// that serves every connection.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("reading the runs: {e}")))?
}

async fn list_runs(State(app): State<Arc<App>>, uri: Uri) -> Result<Json<Value>, ApiError> {
    let q = params(&uri, &["project"])?;
    blocking(move || {
        let project = app.project(q.get("project"))?;
        let runs: Vec<Value> = app
            .find_runs(project.as_deref())
            .into_iter()
            .map(|(id, dir)| {
                let (status, reason, updated) = state(&dir);
                let (project, run) = id.split_once('/').map_or((None, id.as_str()), |(p, r)| (Some(p), r));
                let summary = RunDir { path: dir.clone() }.read_json(runs::SUMMARY).ok();
                json!({ "id": id, "project": project, "run": run, "status": status, "reason": reason,
                        "updated": updated, "summary": summary })
            })
            .collect();
        Ok(Json(json!({ "runs_dir": app.runs_dir.display().to_string(), "runs": runs })))
    })
    .await
}

fn since(q: &HashMap<String, String>) -> Result<u64, ApiError> {
    q.get("since").map_or(Ok(0), |s| {
        s.parse().map_err(|_| bad(format!("since={s:?}: not a line number (0, 1, 2, ...)")))
    })
}

fn limit(q: &HashMap<String, String>) -> Result<usize, ApiError> {
    q.get("limit").map_or(Ok(METRICS_LIMIT), |s| {
        s.parse()
            .ok()
            .filter(|n| (1..=METRICS_LIMIT_MAX).contains(n))
            .ok_or_else(|| bad(format!("limit={s:?}: not a number of records from 1 to {METRICS_LIMIT_MAX}")))
    })
}

/// At most `limit` records from line `since`; `next` is the line to ask
/// from next time, `more` whether records wait there already.
async fn metrics(State(app): State<Arc<App>>, uri: Uri) -> Result<Json<Value>, ApiError> {
    let q = params(&uri, &["run", "since", "limit"])?;
    let (since, limit) = (since(&q)?, limit(&q)?);
    blocking(move || {
        let (id, dir) = app.run(q.get("run"))?;
        let mut tail = Tail::new(&dir.join(runs::METRICS));
        tail.from = since;
        let (mut records, mut skipped) = (Vec::new(), 0u64);
        loop {
            let (lines, more) = tail.poll(READ_CHUNK);
            for l in lines {
                match l {
                    Line::Record(n, _) if n >= since && records.len() == limit => {
                        return Ok(Json(json!({ "run": id, "since": since, "next": n, "more": true,
                                               "skipped": skipped, "records": records })));
                    }
                    Line::Record(n, m) if n >= since => records.push(Value::Object(m)),
                    Line::Skipped(n) if n >= since => skipped += 1,
                    Line::Reset => {
                        (records, skipped) = (Vec::new(), 0);
                        tail.from = since;
                    }
                    _ => {}
                }
            }
            if !more {
                return Ok(Json(json!({ "run": id, "since": since, "next": tail.lines, "more": false,
                                       "skipped": skipped, "records": records })));
            }
        }
    })
    .await
}

async fn events(State(app): State<Arc<App>>, uri: Uri) -> Result<Response, ApiError> {
    let q = params(&uri, &["run", "project", "since"])?;
    let scope = match (q.contains_key("run"), q.contains_key("project")) {
        (true, true) => return Err(bad("give `run` or `project`, not both")),
        (true, false) => Scope::Run(app.run(q.get("run"))?),
        (false, true) => Scope::Project(app.project(q.get("project"))?.unwrap_or_default()),
        (false, false) => Scope::All,
    };
    if q.contains_key("since") && !matches!(scope, Scope::Run(_)) {
        return Err(bad("`since` needs `run` (one run's line numbers)"));
    }
    let watch = Watch::new(app, scope, since(&q)?);
    let stream = futures_util::stream::unfold(watch, |w| async move {
        w.next().await.map(|(piece, w)| (Ok::<_, Infallible>(piece), w))
    });
    let headers = [(header::CONTENT_TYPE, "text/event-stream")];
    Ok((headers, axum::body::Body::from_stream(stream)).into_response())
}

enum Scope {
    All,
    Project(String),
    Run((String, PathBuf)),
}

/// One followed run: its metrics position and the status last sent.
struct Followed {
    dir: PathBuf,
    tail: Tail,
    since: u64,
    sent: Option<(String, Option<String>)>,
}

/// One event stream: the runs in its scope, each replayed from its first
/// line (or `since`) and then followed.
struct Watch {
    app: Arc<App>,
    scope: Scope,
    runs: BTreeMap<String, Followed>,
    /// Events not sent yet, in the event-stream format.
    queue: String,
    scanned: Option<Instant>,
    /// The run read first at the next poll (an index into `runs`), so
    /// that a long history does not hold up the others.
    cursor: usize,
}

impl Watch {
    fn new(app: Arc<App>, scope: Scope, since: u64) -> Watch {
        let mut runs = BTreeMap::new();
        if let Scope::Run((id, dir)) = &scope {
            let mut tail = Tail::new(&dir.join(runs::METRICS));
            tail.from = since;
            runs.insert(id.clone(), Followed { dir: dir.clone(), tail, since, sent: None });
        }
        Watch { app, scope, runs, queue: String::new(), scanned: None, cursor: 0 }
    }

    /// The next piece of the stream: every event one poll found (one
    /// write for many lines of a long history), or a keep-alive comment.
    /// Polls run on a blocking thread; None ends the stream (a poll
    /// panicked).
    async fn next(mut self) -> Option<(String, Watch)> {
        let idle = Instant::now();
        loop {
            let more;
            (self, more) = tokio::task::spawn_blocking(move || {
                let more = self.poll();
                (self, more)
            })
            .await
            .ok()?;
            if !self.queue.is_empty() {
                return Some((std::mem::take(&mut self.queue), self));
            }
            if idle.elapsed() >= KEEP_ALIVE {
                return Some((": keep-alive\n\n".into(), self));
            }
            if !more {
                tokio::time::sleep(POLL).await;
            }
        }
    }

    /// Queue what changed; true when a file has more to read right away.
    fn poll(&mut self) -> bool {
        let rescan = self.scanned.is_none_or(|t| t.elapsed() >= RESCAN);
        if rescan {
            self.scanned = Some(Instant::now());
            self.rescan();
        }
        let ids: Vec<String> = self.runs.keys().cloned().collect();
        let start = if self.cursor < ids.len() { self.cursor } else { 0 };
        let mut budget = POLL_BYTES;
        let mut more = false;
        for i in (start..ids.len()).chain(0..start) {
            if budget == 0 {
                self.cursor = i;
                return true;
            }
            let (id, f) = (&ids[i], self.runs.get_mut(&ids[i]).expect("a listed run"));
            let (lines, m) = f.tail.poll(budget);
            more |= m;
            let cut = f.tail.read == budget && budget < POLL_BYTES;
            budget -= f.tail.read;
            for l in lines {
                match l {
                    Line::Record(n, rec) if n >= f.since => {
                        event(&mut self.queue, "metrics", json!({ "run": id, "line": n, "record": rec }))
                    }
                    Line::Record(..) => {}
                    Line::Skipped(n) => event(
                        &mut self.queue,
                        "skipped",
                        json!({ "run": id, "line": n, "skipped": f.tail.skipped }),
                    ),
                    Line::Reset => {
                        f.since = 0;
                        event(&mut self.queue, "reset", json!({ "run": id }));
                    }
                }
            }
            if cut {
                // Read only part of the budget's worth: first, with all
                // of it, next time.
                self.cursor = i;
                return true;
            }
        }
        more
    }

    /// Follow the runs that appeared, drop those that went, and queue
    /// the status of each that changed.
    fn rescan(&mut self) {
        let found: Option<BTreeMap<String, PathBuf>> = match &self.scope {
            Scope::All => Some(self.app.find_runs(None).into_iter().collect()),
            Scope::Project(p) => Some(self.app.find_runs(Some(p)).into_iter().collect()),
            Scope::Run(_) => None,
        };
        if let Some(found) = found {
            let queue = &mut self.queue;
            self.runs.retain(|id, _| {
                let keep = found.contains_key(id);
                if !keep {
                    event(queue, "removed", json!({ "run": id }));
                }
                keep
            });
            for (id, dir) in found {
                self.runs.entry(id).or_insert_with(|| Followed {
                    tail: Tail::new(&dir.join(runs::METRICS)),
                    dir,
                    since: 0,
                    sent: None,
                });
            }
        }
        for (id, f) in &mut self.runs {
            let (status, reason, _) = state(&f.dir);
            let now = Some((status, reason));
            if f.sent != now {
                let (status, reason) = now.clone().unwrap_or_default();
                event(&mut self.queue, "status", json!({ "run": id, "status": status, "reason": reason }));
                f.sent = now;
            }
        }
    }
}

/// One server-sent event; compact JSON has no newline to split `data` on.
fn event(out: &mut String, kind: &str, data: Value) {
    use std::fmt::Write;
    let _ = write!(out, "event: {kind}\ndata: {data}\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_tokens_and_hosts_are_checked() {
        for n in ["..", ".", ".hidden", "a/b", "a\\b", "", "x\0"] {
            assert!(check_name(n).is_err(), "{n:?}");
        }
        assert!(check_name("gpt2-adamw_70").is_ok());
        assert!(check_token("short").is_err());
        assert!(check_token("with space in the token").is_err());
        assert!(check_token("0123456789abcdef").is_ok());
        for h in ["Bearer t", "bearer t", "BEARER  t ", " BeArEr\tt"] {
            assert_eq!(bearer(h), Some("t"), "{h:?}");
        }
        assert_eq!(bearer("Basic t"), None);
        assert_eq!(bearer("Bearert"), None);
        assert!(same(b"abc", b"abc") && !same(b"abc", b"abd") && !same(b"abc", b"abcd"));
        assert!(parse_host("localhost").unwrap().is_loopback());
        assert!(!parse_host("0.0.0.0").unwrap().is_loopback());
        assert!(parse_host("example.com").is_err());
    }
}
