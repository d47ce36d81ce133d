//! `knlp serve` (docs/serve.md), over real sockets: the token on every
//! endpoint, bad requests, a run's metrics streamed while it trains, and
//! the page drawn by headless Chromium (required by `make test`).
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

const KNLP: &str = env!("CARGO_BIN_EXE_knlp");
const TOKEN: &str = "test-token-0123456789";

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("knlp-serve-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A finished run `project/run` whose train_loss falls over `steps` steps,
/// with a val_loss every 10 steps.
fn finished_run(runs: &Path, id: &str, steps: i64) -> PathBuf {
    let d = runs.join(id);
    std::fs::create_dir_all(&d).unwrap();
    let mut m = String::new();
    for s in 1..=steps {
        m += &format!("{{\"step\":{s},\"train_loss\":{}}}\n", 3.0 / (1.0 + s as f64 * 0.1));
        if s % 10 == 0 {
            m += &format!("{{\"step\":{s},\"val_loss\":{}}}\n", 3.2 / (1.0 + s as f64 * 0.08));
        }
    }
    std::fs::write(d.join("metrics.jsonl"), m).unwrap();
    std::fs::write(d.join("config.json"), "{\"model\":\"lenet5\"}\n").unwrap();
    std::fs::write(d.join("status.json"), "{\"status\":\"done\",\"updated\":\"2026-01-01T00:00:00Z\"}\n")
        .unwrap();
    std::fs::write(d.join("summary.json"), format!("{{\"status\":\"done\",\"steps\":{steps}}}\n")).unwrap();
    d
}

/// A running `knlp serve`, stopped when dropped.
struct Server {
    child: Child,
    port: u16,
    /// The token printed at start (None when it was given).
    printed: Option<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(runs: &Path, token: Option<&str>) -> Server {
    let mut cmd = Command::new(KNLP);
    cmd.args(["serve", "--port", "0", "--runs-dir"]).arg(runs).env_remove("KNLP_SERVE_TOKEN");
    if let Some(t) = token {
        cmd.env("KNLP_SERVE_TOKEN", t);
    }
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    // knlp serve: http://127.0.0.1:PORT/?token=T (the token only when generated)
    let url = line.split_whitespace().nth(2).unwrap_or_else(|| panic!("{line:?}"));
    let rest = url.strip_prefix("http://127.0.0.1:").unwrap_or_else(|| panic!("{line:?}"));
    let port = rest.split('/').next().unwrap().parse().unwrap();
    let printed = rest.split_once("/?token=").map(|(_, t)| t.to_string());
    Server { child, port, printed }
}

/// One HTTP/1.1 request: status, lower-cased head, body.
fn get(port: u16, target: &str, headers: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{headers}\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let head = head.to_ascii_lowercase();
    let body = if head.contains("transfer-encoding: chunked") {
        let mut r = BufReader::new(body.as_bytes());
        let mut out = Vec::new();
        while let Some(chunk) = read_chunk(&mut r) {
            out.extend(chunk);
        }
        String::from_utf8(out).unwrap()
    } else {
        body.to_string()
    };
    (status, head, body)
}

fn read_chunk(r: &mut impl BufRead) -> Option<Vec<u8>> {
    let mut size = String::new();
    r.read_line(&mut size).ok()?;
    let n = usize::from_str_radix(size.trim(), 16).ok().filter(|n| *n > 0)?;
    let mut buf = vec![0; n + 2];
    r.read_exact(&mut buf).ok()?;
    buf.truncate(n);
    Some(buf)
}

fn json(port: u16, target: &str, headers: &str) -> (u16, Value) {
    let (status, _, body) = get(port, target, headers);
    (status, serde_json::from_str(&body).unwrap_or_else(|e| panic!("{target}: {e}: {body}")))
}

/// Server-sent events of `target` as (event, data), on a thread.
fn events(port: u16, target: &str) -> mpsc::Receiver<(String, Value)> {
    let (tx, rx) = mpsc::channel();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {target} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    std::thread::spawn(move || {
        let mut r = BufReader::new(s);
        let mut line = String::new();
        while r.read_line(&mut line).is_ok_and(|n| n > 2) {
            line.clear();
        }
        let (mut kind, mut pending) = (String::new(), String::new());
        while let Some(chunk) = read_chunk(&mut r) {
            pending += &String::from_utf8(chunk).unwrap();
            while let Some((l, rest)) = pending.split_once('\n') {
                let l = l.to_string();
                pending = rest.to_string();
                if let Some(k) = l.strip_prefix("event: ") {
                    kind = k.to_string();
                } else if let Some(d) = l.strip_prefix("data: ") {
                    let v = serde_json::from_str(d).unwrap();
                    if tx.send((std::mem::take(&mut kind), v)).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

fn files(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().is_dir() {
            out.extend(files(&e.path()));
        } else {
            out.push((e.path(), e.metadata().unwrap().len()));
        }
    }
    out.sort();
    out
}

/// Without the token (or with a wrong one) every endpoint answers 401;
/// with it in the header or the query the API answers, and bad requests
/// are 4xx JSON errors. Serving writes nothing into the runs.
#[test]
fn api_needs_the_token_and_refuses_bad_requests() {
    let d = scratch("api");
    let runs = d.join("runs");
    let a = finished_run(&runs, "proj/a", 30);
    let mut f = std::fs::OpenOptions::new().append(true).open(a.join("metrics.jsonl")).unwrap();
    f.write_all(b"not json\n{\"step\":31,\"train_loss\":0.5}\n{\"step\":32,\"tr").unwrap();
    finished_run(&runs, "top", 3);
    let before = files(&runs);
    let srv = serve(&runs, None);
    let token = srv.printed.clone().expect("a generated token is printed");
    assert!(token.len() >= 32, "{token}");
    let p = srv.port;
    let targets =
        ["/", "/api/runs", "/api/metrics?run=proj/a", "/api/events", "/api/events?run=proj/a", "/nope"];
    for t in targets {
        let q = if t.contains('?') { '&' } else { '?' };
        for (target, header) in [
            (t.to_string(), String::new()),
            (t.to_string(), "Authorization: Bearer wrong-token-0123456789\r\n".into()),
            (format!("{t}{q}token=wrong"), String::new()),
            (format!("{t}{q}token="), String::new()),
            (t.to_string(), format!("Authorization: Basic {token}\r\n")),
        ] {
            let (status, head, body) = get(p, &target, &header);
            assert_eq!(status, 401, "{target} {header}: {body}");
            assert!(head.contains("www-authenticate: bearer") && body.contains("token"), "{head}{body}");
        }
    }
    let bearer = format!("Authorization: Bearer {token}\r\n");
    let (status, v) = json(p, "/api/runs", &bearer);
    assert_eq!(status, 200);
    // The scheme in any case (RFC 7235).
    assert_eq!(get(p, "/api/runs", &format!("authorization: bEARER {token}\r\n")).0, 200);
    let ids: Vec<&str> = v["runs"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["proj/a", "top"]);
    assert_eq!(v["runs"][0]["status"], "done");
    assert_eq!(v["runs"][0]["summary"]["steps"], 30);
    let (status, v) = json(p, &format!("/api/metrics?run=proj/a&token={token}"), "");
    assert_eq!(status, 200);
    // 30 train records, 3 val records, the appended one; the bad line is
    // counted, the torn last one waits for its newline.
    assert_eq!(v["records"].as_array().unwrap().len(), 34);
    assert_eq!((v["next"].as_u64(), v["skipped"].as_u64()), (Some(35), Some(1)));
    let (_, v) = json(p, &format!("/api/metrics?run=proj/a&since=33&token={token}"), "");
    assert_eq!(v["records"].as_array().unwrap().len(), 1);
    assert_eq!(v["records"][0]["step"], 31);
    // Pages of `limit` records: `next` and `more` lead through the file.
    let (mut since, mut steps) = (0, Vec::new());
    loop {
        let (status, v) =
            json(p, &format!("/api/metrics?run=proj/a&since={since}&limit=10&token={token}"), "");
        assert_eq!(status, 200, "{v}");
        let recs = v["records"].as_array().unwrap();
        steps.extend(recs.iter().map(|r| r["step"].as_i64().unwrap()));
        since = v["next"].as_u64().unwrap();
        if v["more"] == false {
            break;
        }
        assert_eq!(recs.len(), 10, "{v}");
    }
    assert_eq!((steps.len(), since), (34, 35));
    assert!(steps.windows(2).all(|w| w[0] <= w[1]) && steps.last() == Some(&31), "{steps:?}");
    let (status, head, body) = get(p, &format!("/?token={token}"), "");
    assert_eq!(status, 200);
    assert!(head.contains("text/html") && body.contains("<canvas"), "{head}");
    assert!(head.contains("cache-control: no-store") && head.contains("content-security-policy"));
    for (target, want) in [
        ("/api/metrics", 400),
        ("/api/metrics?run=../proj/a", 400),
        ("/api/metrics?run=..%2F..%2Fetc", 400),
        ("/api/metrics?run=proj/a/b", 400),
        ("/api/metrics?run=proj/.a", 400),
        ("/api/metrics?run=proj/nope", 404),
        ("/api/metrics?run=proj", 404),
        ("/api/metrics?run=proj/a&since=-1", 400),
        ("/api/metrics?run=proj/a&since=x", 400),
        ("/api/metrics?run=proj/a&bogus=1", 400),
        ("/api/metrics?run=proj/a&limit=0", 400),
        ("/api/metrics?run=proj/a&limit=100001", 400),
        ("/api/metrics?run=proj/a&limit=x", 400),
        ("/api/runs?project=..", 400),
        ("/api/runs?project=nope", 404),
        ("/api/events?project=proj&run=proj/a", 400),
        ("/api/events?since=3", 400),
        ("/api/events?run=proj/zzz", 404),
        ("/api/nope", 404),
        ("/api/runs/../../etc/passwd", 404),
    ] {
        let (status, v) = json(p, target, &bearer);
        assert_eq!(status, want, "{target}: {v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{target}: {v}");
    }
    drop(srv);
    assert_eq!(files(&runs), before, "serving changed the runs folder");
    // A configured token is not printed; a weak one is refused.
    let srv = serve(&runs, Some(TOKEN));
    assert!(srv.printed.is_none());
    assert_eq!(get(srv.port, &format!("/api/runs?token={TOKEN}"), "").0, 200);
    assert_eq!(get(srv.port, &format!("/api/runs?token={token}"), "").0, 401);
    // A run whose folder goes is dropped from the stream.
    let rx = events(srv.port, &format!("/api/events?token={TOKEN}"));
    let mut seen = Vec::new();
    while seen.iter().filter(|(k, _)| k == "status").count() < 2 {
        seen.push(rx.recv_timeout(Duration::from_secs(30)).expect("no status of the two runs"));
    }
    std::fs::remove_dir_all(runs.join("top")).unwrap();
    loop {
        let (kind, v) = rx.recv_timeout(Duration::from_secs(30)).expect("no removed event");
        if kind == "removed" {
            assert_eq!(v["run"], "top");
            break;
        }
    }
    // A weak token is refused, naming where it came from.
    for (arg, env, from) in [(Some("short"), TOKEN, "--token"), (None, "short", "KNLP_SERVE_TOKEN")] {
        let mut cmd = Command::new(KNLP);
        cmd.args(["serve", "--port", "0"]).args(arg.map(|t| ["--token", t]).into_iter().flatten());
        let o = cmd.env("KNLP_SERVE_TOKEN", env).output().unwrap();
        assert_eq!(o.status.code(), Some(1));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("at least 16") && err.contains(from), "{err}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// A child process killed when dropped (a failed assertion included).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A real LeNet-5 run: its records arrive over the event stream while it
/// trains, in order, and match what ends in its metrics.jsonl. No timing:
/// the run waits at step 3 until the test has seen it running and its
/// first record, then the rest must follow.
#[test]
fn metrics_arrive_while_a_run_trains() {
    let d = scratch("live");
    std::fs::create_dir_all(d.join("runs")).unwrap();
    // The script has no sleep: opening a FIFO for reading blocks, without
    // spinning, until the test opens it for writing.
    let go = d.join("go");
    let c = std::ffi::CString::new(go.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo {}", go.display());
    std::fs::write(
        d.join("t.rhai"),
        r#"
let set = fashion_mnist(#{ split: "test" });
let data = loader(set.slice(0, 192), #{ batch_size: 16, resize: 32, normalize: true });
let test = loader(set.slice(192, 256), #{ batch_size: 64, resize: 32, normalize: true });
let m = lenet5(#{ seed: 0 });
// At step 3 (step 2 is logged) wait for the test: `go` is a FIFO, and
// reading it (not a safetensors file: an error) waits for its writer.
train(m, sgd(m, #{ lr: 0.05 }), data, #{ steps: 12, log_every: 2, eval_every: 6, progress: "off",
    run_dir: "runs/live/lenet", test: test,
    on_step: |s| { if s.step == 3 { try { load_metadata("go"); } catch {} } } });
"#,
    )
    .unwrap();
    let srv = serve(&d.join("runs"), Some(TOKEN));
    let rx = events(srv.port, &format!("/api/events?token={TOKEN}"));
    let mut train = Killed(
        Command::new(KNLP)
            .args(["run", "t.rhai"])
            .current_dir(&d)
            .env("OMP_NUM_THREADS", "1")
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got: Vec<(String, Value)> = Vec::new();
    let metrics = |got: &[(String, Value)]| got.iter().filter(|e| e.0 == "metrics").count();
    let running = |got: &[(String, Value)]| got.iter().any(|e| e.0 == "status" && e.1["status"] == "running");
    // The run is held at step 3: running, with a record or more.
    while !(running(&got) && metrics(&got) > 0) {
        if let Ok(e) = rx.recv_timeout(Duration::from_millis(100)) {
            got.push(e);
        }
        assert!(train.0.try_wait().unwrap().is_none(), "training ended before it was let go: {got:?}");
        assert!(Instant::now() < deadline, "no running status and record in 60 s: {got:?}");
    }
    let before = metrics(&got);
    // Let it go: a non-blocking open for writing succeeds once the
    // script has the FIFO open for reading.
    loop {
        use std::os::unix::fs::OpenOptionsExt;
        match std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(&go) {
            Ok(_) => break,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {}
            Err(e) => panic!("{}: {e}", go.display()),
        }
        assert!(train.0.try_wait().unwrap().is_none(), "training ended before it was let go");
        assert!(Instant::now() < deadline, "the run never waited at step 3");
        std::thread::sleep(Duration::from_millis(20));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while train.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "training took more than 60 s after it was let go");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(train.0.wait().unwrap().success(), "training failed");
    let file: Vec<Value> = std::fs::read_to_string(d.join("runs/live/lenet/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // The rest of the records, then done (statuses are looked at once a second).
    while metrics(&got) < file.len() || !got.iter().any(|e| e.0 == "status" && e.1["status"] == "done") {
        let e = rx.recv_timeout(Duration::from_secs(30)).expect("the stream stopped short");
        got.push(e);
    }
    assert!(before < file.len(), "{before} of {} records before the run went on", file.len());
    let streamed: Vec<&Value> = got.iter().filter(|e| e.0 == "metrics").map(|e| &e.1).collect();
    assert_eq!(streamed.len(), file.len());
    for (i, (e, rec)) in streamed.iter().zip(&file).enumerate() {
        assert_eq!((&e["run"], e["line"].as_u64()), (&Value::from("live/lenet"), Some(i as u64)));
        assert_eq!(&e["record"], rec, "line {i}");
    }
    assert!(
        file.iter().any(|r| r.get("test_acc").is_some())
            && file.iter().any(|r| r.get("train_loss").is_some())
    );
    let states: Vec<&str> =
        got.iter().filter(|e| e.0 == "status").map(|e| e.1["status"].as_str().unwrap()).collect();
    assert!(states.contains(&"running"), "{states:?}");
    assert_eq!(states.last(), Some(&"done"), "{states:?}");
    drop(srv);
    let _ = std::fs::remove_dir_all(&d);
}

/// Pixels of the first run's colour (#d62728) in the left `part` of a PNG.
fn red_pixels(png_bytes: &[u8], part: f64) -> usize {
    let mut reader = png::Decoder::new(png_bytes).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let px = info.color_type.samples();
    let left = (info.width as f64 * part) as usize;
    buf[..info.buffer_size()]
        .chunks(px)
        .enumerate()
        .filter(|(i, p)| i % info.width as usize <= left && p.len() >= 3)
        .filter(|(_, p)| p[0].abs_diff(214) < 12 && p[1].abs_diff(39) < 12 && p[2].abs_diff(40) < 12)
        .count()
}

/// Headless Chromium driven over the DevTools protocol on a pipe (fds 3
/// and 4, NUL-terminated JSON), so the test waits for the page's own
/// state rather than guessing a delay: the event stream never ends, so
/// `--screenshot` alone would shoot before the data arrives.
struct Browser {
    child: Child,
    to: std::io::PipeWriter,
    from: BufReader<std::io::PipeReader>,
    id: u64,
    session: String,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    fn open(exe: &Path, url: &str, profile: &Path) -> Browser {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let (their_in, to) = std::io::pipe().unwrap();
        let (from, their_out) = std::io::pipe().unwrap();
        let (i, o) = (their_in.as_raw_fd(), their_out.as_raw_fd());
        let mut cmd = Command::new(exe);
        cmd.args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run"])
            .args(["--remote-debugging-pipe", "--disable-dev-shm-usage", "--window-size=1000,700"])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: only async-signal-safe calls between fork and exec. The
        // copies above 10 keep dup2 from clobbering a pipe already on 3 or 4.
        unsafe {
            cmd.pre_exec(move || {
                let (a, b) = (libc::fcntl(i, libc::F_DUPFD, 10), libc::fcntl(o, libc::F_DUPFD, 10));
                if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        drop((their_in, their_out));
        let mut b = Browser { child, to, from: BufReader::new(from), id: 0, session: String::new() };
        let start = Instant::now();
        let target = loop {
            let t = b.call("Target.getTargets", serde_json::json!({}));
            let page = t["targetInfos"].as_array().unwrap().iter().find(|t| t["type"] == "page").cloned();
            if let Some(p) = page {
                break p["targetId"].clone();
            }
            assert!(start.elapsed() < Duration::from_secs(20), "chromium opened no page");
            std::thread::sleep(Duration::from_millis(100));
        };
        let s = b.call("Target.attachToTarget", serde_json::json!({ "targetId": target, "flatten": true }));
        b.session = s["sessionId"].as_str().unwrap().to_string();
        b
    }

    /// Send one command (to the page once attached); its result.
    fn call(&mut self, method: &str, params: Value) -> Value {
        let v = self.send(method, params);
        assert!(v.get("error").is_none(), "{method}: {v}");
        v["result"].clone()
    }

    /// Send one command; its answer, result or error.
    fn send(&mut self, method: &str, params: Value) -> Value {
        self.id += 1;
        let mut msg = serde_json::json!({ "id": self.id, "method": method, "params": params });
        if !self.session.is_empty() {
            msg["sessionId"] = Value::from(self.session.clone());
        }
        self.to.write_all(format!("{msg}\0").as_bytes()).unwrap();
        loop {
            let mut raw = Vec::new();
            self.from.read_until(0, &mut raw).unwrap();
            assert!(raw.pop() == Some(0), "chromium closed the pipe");
            let v: Value = serde_json::from_slice(&raw).unwrap();
            if v["id"] == self.id {
                return v;
            }
        }
    }

    /// Evaluate `expr` in the page until it is true (20 s at most); an
    /// error (no document yet, while navigating) is false.
    fn wait_for(&mut self, expr: &str) {
        let start = Instant::now();
        loop {
            let r = self
                .send("Runtime.evaluate", serde_json::json!({ "expression": expr, "returnByValue": true }));
            if r["result"]["result"]["value"] == true {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "the page never had {expr}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn screenshot(&mut self) -> Vec<u8> {
        use base64::Engine;
        let r = self.call("Page.captureScreenshot", serde_json::json!({ "format": "png" }));
        base64::engine::general_purpose::STANDARD.decode(r["data"].as_str().unwrap()).unwrap()
    }
}

fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"].iter().map(PathBuf::from).find(|p| p.exists())
}

/// The page in headless Chromium draws the curves of a finished run,
/// follows a line appended to it, and without the token draws nothing.
#[test]
fn chromium_shows_the_curves() {
    let Some(exe) = chromium() else {
        assert!(
            std::env::var_os("KNLP_REQUIRE_CHROMIUM").is_none(),
            "KNLP_REQUIRE_CHROMIUM=1 but chromium is not installed"
        );
        eprintln!("skipped: chromium is not installed (make test installs it)");
        return;
    };
    let d = scratch("chromium");
    let run = finished_run(&d.join("runs"), "proj/a", 80);
    let srv = serve(&d.join("runs"), Some(TOKEN));
    let base = format!("http://127.0.0.1:{}/", srv.port);
    let mut b = Browser::open(&exe, &format!("{base}?token={TOKEN}"), &d.join("profile"));
    // 80 train_loss and 8 val_loss points.
    b.wait_for("document.body && document.body.dataset.points === '88'");
    let shot = b.screenshot();
    std::fs::write(d.join("page.png"), &shot).unwrap();
    // Two curves across the chart (the left two thirds; the legend is right).
    let drawn = red_pixels(&shot, 0.66);
    assert!(drawn > 800, "{drawn} pixels of the curves' colour (see {})", d.join("page.png").display());
    let mut f = std::fs::OpenOptions::new().append(true).open(run.join("metrics.jsonl")).unwrap();
    f.write_all(b"{\"step\":81,\"train_loss\":0.3}\n").unwrap();
    b.wait_for("document.body.dataset.points === '89'");
    // The same browser, without the token.
    b.call("Page.navigate", serde_json::json!({ "url": base }));
    b.wait_for(
        "location.search === '' && document.readyState === 'complete' && document.body.innerText.includes('token')",
    );
    assert_eq!(red_pixels(&b.screenshot(), 1.0), 0);
    drop(b);
    let _ = std::fs::remove_dir_all(&d);
}
