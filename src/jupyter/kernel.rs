//! The kernel: ZeroMQ sockets on an I/O thread, one knlp runtime on the
//! main thread.
//!
//! The Rhai engine and every tch tensor stay on the main thread (the engine
//! is not `Send`), which takes shell requests one at a time from a channel,
//! as IPython does. The I/O thread runs the sockets under tokio: it checks
//! every signature, forwards shell requests, answers the control channel
//! itself (so that `interrupt_request` and `shutdown_request` work while a
//! cell runs) and echoes heartbeats.
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use zeromq::{PubSocket, RepSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use super::capture::{log_line, Capture};
use super::wire::{header, Connection, Message, Signer, PROTOCOL_VERSION};
use crate::output::{self, Progress};
use crate::script::errors::Ending;
use crate::script::{api, complete, display, Limits, Runtime, ScriptError};

/// A message for the I/O thread to send.
enum Out {
    Shell(Message),
    IoPub(Message),
}

/// What the interpreter's helpers (stream capture, display and progress
/// sinks) share: how to publish on IOPub, and the request being served.
struct Publisher {
    out: UnboundedSender<Out>,
    session: String,
    parent: Arc<Mutex<Value>>,
}

impl Publisher {
    fn publish(&self, msg_type: &str, content: Value) {
        let parent = self.parent.lock().map(|p| p.clone()).unwrap_or_else(|_| json!({}));
        let m = Message {
            ids: vec![Bytes::from(msg_type.to_string())],
            header: header(&self.session, msg_type),
            parent_header: parent,
            metadata: json!({}),
            content,
            buffers: Vec::new(),
        };
        let _ = self.out.send(Out::IoPub(m));
    }

    fn status(&self, state: &str) {
        self.publish("status", json!({ "execution_state": state }));
    }
}

pub fn kernel_info() -> Value {
    json!({
        "status": "ok",
        "protocol_version": PROTOCOL_VERSION,
        "implementation": "knlp",
        "implementation_version": env!("CARGO_PKG_VERSION"),
        "language_info": {
            "name": "rhai",
            "version": "1",
            "mimetype": "text/x-rhai",
            "file_extension": ".rhai",
            "pygments_lexer": "rust",
            "codemirror_mode": "rust",
        },
        "banner": format!("knlp {} (Rhai): kernel-style ML research over libtorch", env!("CARGO_PKG_VERSION")),
        "help_links": [],
        "debugger": false,
    })
}

/// Serve the kernel described by `connection_file` until shutdown.
pub fn run(connection_file: &Path) -> Result<()> {
    let conn = Connection::read(connection_file)?;
    let signer = Arc::new(Signer::new(&conn.key));
    let session = uuid::Uuid::new_v4().to_string();
    let (out_tx, out_rx) = unbounded_channel::<Out>();
    let (req_tx, req_rx) = mpsc::channel::<Message>();
    let parent = Arc::new(Mutex::new(json!({})));

    let fwd = Publisher { out: out_tx.clone(), session: session.clone(), parent: parent.clone() };
    let capture =
        Capture::start(move |name, text| fwd.publish("stream", json!({ "name": name, "text": text })))?;
    let log = capture.log_handle()?;
    crate::interrupt::install();
    crate::interrupt::never_exit();

    let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
    let io_session = session.clone();
    std::thread::Builder::new().name("jupyter-io".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready_tx.send(Err(anyhow!("cannot start the I/O runtime: {e}")));
                return;
            }
        };
        rt.block_on(io_main(conn, signer, io_session, req_tx, out_rx, ready_tx, log));
    })?;
    ready_rx.recv().map_err(|_| anyhow!("the I/O thread ended before binding its sockets"))??;
    capture
        .log(&format!("started, protocol {PROTOCOL_VERSION}, connection file {}", connection_file.display()));

    let publisher = Rc::new(Publisher { out: out_tx, session, parent });
    let mut interp = Interpreter::new(publisher, Rc::new(capture));
    interp.serve(req_rx);
    Ok(())
}

fn frames(m: ZmqMessage) -> Vec<Bytes> {
    m.into_vec()
}

fn zmq(frames: Vec<Bytes>) -> Option<ZmqMessage> {
    ZmqMessage::try_from(frames).ok()
}

async fn bind<S: Socket>(s: &mut S, conn: &Connection, port: u16, what: &str) -> Result<()> {
    s.bind(&conn.endpoint(port))
        .await
        .with_context(|| format!("cannot bind the {what} socket to port {port}"))?;
    Ok(())
}

async fn io_main(
    conn: Connection,
    signer: Arc<Signer>,
    session: String,
    requests: mpsc::Sender<Message>,
    mut out: UnboundedReceiver<Out>,
    ready: mpsc::Sender<Result<()>>,
    log: std::fs::File,
) {
    let (mut shell, mut control, mut stdin) = (RouterSocket::new(), RouterSocket::new(), RouterSocket::new());
    let (mut iopub, mut hb) = (PubSocket::new(), RepSocket::new());
    let bound = async {
        bind(&mut shell, &conn, conn.shell_port, "shell").await?;
        bind(&mut control, &conn, conn.control_port, "control").await?;
        bind(&mut stdin, &conn, conn.stdin_port, "stdin").await?;
        bind(&mut iopub, &conn, conn.iopub_port, "iopub").await?;
        bind(&mut hb, &conn, conn.hb_port, "heartbeat").await
    }
    .await;
    let failed = bound.is_err();
    let _ = ready.send(bound);
    if failed {
        return;
    }
    let log = Arc::new(log);

    tokio::spawn(async move {
        while let Ok(m) = hb.recv().await {
            if hb.send(m).await.is_err() {
                break;
            }
        }
    });

    let (mut shell_tx, mut shell_rx) = shell.split();
    let (sg, lg) = (signer.clone(), log.clone());
    tokio::spawn(async move {
        loop {
            match shell_rx.recv().await {
                Ok(m) => match Message::parse(frames(m), &sg) {
                    Ok(msg) => {
                        if requests.send(msg).is_err() {
                            break;
                        }
                    }
                    Err(e) => log_line(&lg, &format!("dropped a shell message: {e}")),
                },
                Err(e) => {
                    log_line(&lg, &format!("shell socket: {e}"));
                    break;
                }
            }
        }
    });

    let (sg, lg) = (signer.clone(), log.clone());
    tokio::spawn(async move { control_loop(control, sg, session, lg).await });

    // Keep the stdin socket bound (clients connect to it); input_request is
    // not supported, so nothing is read from it.
    let _stdin = stdin;
    while let Some(o) = out.recv().await {
        let (m, to_shell) = match o {
            Out::Shell(m) => (m, true),
            Out::IoPub(m) => (m, false),
        };
        let Some(z) = zmq(m.frames(&signer)) else { continue };
        let sent = if to_shell { shell_tx.send(z).await } else { iopub.send(z).await };
        if let Err(e) = sent {
            log_line(&log, &format!("cannot send {}: {e}", m.msg_type()));
        }
    }
}

async fn control_loop(
    mut control: RouterSocket,
    signer: Arc<Signer>,
    session: String,
    log: Arc<std::fs::File>,
) {
    loop {
        let m = match control.recv().await {
            Ok(m) => m,
            Err(e) => {
                log_line(&log, &format!("control socket: {e}"));
                return;
            }
        };
        let msg = match Message::parse(frames(m), &signer) {
            Ok(msg) => msg,
            Err(e) => {
                log_line(&log, &format!("dropped a control message: {e}"));
                continue;
            }
        };
        let (reply_type, content, exit) = match msg.msg_type() {
            "interrupt_request" => {
                crate::interrupt::raise();
                ("interrupt_reply", json!({ "status": "ok" }), false)
            }
            "shutdown_request" => {
                let restart = msg.content.get("restart").and_then(Value::as_bool).unwrap_or(false);
                ("shutdown_reply", json!({ "status": "ok", "restart": restart }), true)
            }
            "kernel_info_request" => ("kernel_info_reply", kernel_info(), false),
            other => {
                log_line(&log, &format!("ignored control message {other:?}"));
                continue;
            }
        };
        let reply = msg.child(&session, reply_type, content);
        if let Some(z) = zmq(reply.frames(&signer)) {
            let _ = control.send(z).await;
        }
        if exit {
            log_line(&log, "shutting down");
            tokio::time::sleep(Duration::from_millis(100)).await;
            std::process::exit(0);
        }
    }
}

/// A progress bar shown as one display that later reports update.
#[derive(Default)]
struct Bar {
    id: Option<String>,
    last: Option<Instant>,
    /// The newest state not yet shown (updates are at most 4 per second).
    pending: Option<Value>,
}

fn bar_data(step: i64, total: i64, text: &str) -> Value {
    let frac = if total > 0 { (step as f64 / total as f64).clamp(0.0, 1.0) } else { 0.0 };
    let filled = (frac * 24.0) as usize;
    let esc = report::util::html_escape;
    json!({
        "text/plain": format!("[{}{}] {step}/{total} {text}", "=".repeat(filled), " ".repeat(24 - filled)),
        "text/html": format!(
            "<progress value=\"{step}\" max=\"{}\" style=\"width:20em\"></progress> <code>{step}/{total} {}</code>",
            total.max(1),
            esc(text)
        ),
    })
}

struct Interpreter {
    rt: Runtime,
    publisher: Rc<Publisher>,
    capture: Rc<Capture>,
    count: i64,
    backlog: VecDeque<Message>,
}

impl Interpreter {
    fn new(publisher: Rc<Publisher>, capture: Rc<Capture>) -> Self {
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        let rt = Runtime::interactive(cwd, Limits::default());
        let (p, c) = (publisher.clone(), capture.clone());
        display::set_sink(move |b| {
            c.sync();
            p.publish("display_data", json!({ "data": b.data, "metadata": b.metadata, "transient": {} }));
        });
        // The bar's state lives in the sink; Progress::Done (sent after
        // every cell) resets it.
        let mut st = Bar::default();
        let (p, c) = (publisher.clone(), capture.clone());
        output::set_progress_sink(move |ev| match ev {
            Progress::Bar { step, total, text } => {
                let data = bar_data(step, total, text);
                let due = st.last.is_none_or(|t| t.elapsed() >= Duration::from_millis(250));
                if st.id.is_none() {
                    c.sync();
                    let id = uuid::Uuid::new_v4().to_string();
                    p.publish(
                        "display_data",
                        json!({ "data": data, "metadata": {}, "transient": { "display_id": id } }),
                    );
                    st.id = Some(id);
                    st.last = Some(Instant::now());
                } else if due {
                    let id = st.id.clone();
                    p.publish(
                        "update_display_data",
                        json!({ "data": data, "metadata": {}, "transient": { "display_id": id } }),
                    );
                    st.last = Some(Instant::now());
                    st.pending = None;
                } else {
                    st.pending = Some(data);
                }
            }
            Progress::Line(text) => {
                c.sync();
                p.publish("stream", json!({ "name": "stdout", "text": format!("{text}\n") }));
            }
            Progress::Done => {
                if let (Some(id), Some(data)) = (st.id.take(), st.pending.take()) {
                    p.publish(
                        "update_display_data",
                        json!({ "data": data, "metadata": {}, "transient": { "display_id": id } }),
                    );
                }
                st = Bar::default();
            }
        });
        Interpreter { rt, publisher, capture, count: 0, backlog: VecDeque::new() }
    }

    fn serve(&mut self, requests: mpsc::Receiver<Message>) {
        loop {
            let msg = match self.backlog.pop_front() {
                Some(m) => m,
                None => match requests.recv() {
                    Ok(m) => m,
                    Err(_) => return,
                },
            };
            self.handle(&msg, &requests);
        }
    }

    fn reply(&self, req: &Message, msg_type: &str, content: Value) {
        let _ = self.publisher.out.send(Out::Shell(req.child(&self.publisher.session, msg_type, content)));
    }

    fn handle(&mut self, msg: &Message, requests: &mpsc::Receiver<Message>) {
        if let Ok(mut p) = self.publisher.parent.lock() {
            *p = msg.header.clone();
        }
        self.publisher.status("busy");
        match msg.msg_type() {
            "execute_request" => self.execute(msg, requests),
            "complete_request" => self.complete(msg),
            "inspect_request" => self.inspect(msg),
            "is_complete_request" => self.is_complete(msg),
            "kernel_info_request" => self.reply(msg, "kernel_info_reply", kernel_info()),
            "comm_info_request" => self.reply(msg, "comm_info_reply", json!({ "status": "ok", "comms": {} })),
            "history_request" => self.reply(msg, "history_reply", json!({ "status": "ok", "history": [] })),
            "shutdown_request" => {
                let restart = msg.content.get("restart").and_then(Value::as_bool).unwrap_or(false);
                self.reply(msg, "shutdown_reply", json!({ "status": "ok", "restart": restart }));
                self.publisher.status("idle");
                std::thread::sleep(Duration::from_millis(200));
                std::process::exit(0);
            }
            // No comm targets are registered: opening one is a no-op.
            "comm_open" | "comm_msg" | "comm_close" => {}
            other => self.capture.log(&format!("ignored shell message {other:?}")),
        }
        self.capture.sync();
        self.publisher.status("idle");
    }

    fn execute(&mut self, msg: &Message, requests: &mpsc::Receiver<Message>) {
        let code = msg.str_field("code").to_string();
        let flag = |k: &str, d: bool| msg.content.get(k).and_then(Value::as_bool).unwrap_or(d);
        let (silent, store) = (flag("silent", false), flag("store_history", true));
        if !silent && store {
            self.count += 1;
        }
        let n = self.count;
        if !silent {
            self.publisher.publish("execute_input", json!({ "code": code, "execution_count": n }));
        }
        let name = format!("cell[{n}]");
        // A bug in a binding must not take the session down with it.
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.rt.eval_cell(&code, &name)))
                .unwrap_or_else(|p| {
                    let what = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    Err(ScriptError {
                        rendered: format!(
                            "{name}: error: internal error (a knlp bug; please report it): {what}\n"
                        ),
                        ending: Ending::Failed,
                    })
                });
        crate::interrupt::clear();
        output::report(Progress::Done);
        self.capture.sync();
        let err = match result {
            Ok(v) => {
                // As in IPython, a cell ending in `;` shows no result.
                let quiet = code.trim_end().ends_with(';');
                if !silent && !quiet && !v.is_unit() {
                    let b = display::bundle(&v, self.rt.display(&v));
                    self.publisher.publish(
                        "execute_result",
                        json!({ "execution_count": n, "data": b.data, "metadata": b.metadata }),
                    );
                }
                None
            }
            Err(e) if e.ending == Ending::Exit(0) => None,
            Err(e) => Some(e),
        };
        let Some(e) = err else {
            let user = self.user_expressions(msg);
            self.reply(
                msg,
                "execute_reply",
                json!({ "status": "ok", "execution_count": n, "payload": [], "user_expressions": user }),
            );
            return;
        };
        let ename = match e.ending {
            Ending::Interrupted => "Interrupted",
            Ending::Exit(_) => "Exit",
            Ending::Failed => "ScriptError",
        };
        let traceback: Vec<String> = e.rendered.trim_end().lines().map(String::from).collect();
        let evalue = traceback.first().cloned().unwrap_or_default();
        let error = json!({ "ename": ename, "evalue": evalue, "traceback": traceback });
        if !silent {
            self.publisher.publish("error", error.clone());
        }
        let mut reply = error;
        reply["status"] = json!("error");
        reply["execution_count"] = json!(n);
        self.reply(msg, "execute_reply", reply);
        if flag("stop_on_error", true) {
            self.abort_queued(requests);
        }
    }

    /// After an error, answer executions already queued with `aborted`, as
    /// IPython does; other queued requests are served normally.
    fn abort_queued(&mut self, requests: &mpsc::Receiver<Message>) {
        while let Ok(m) = requests.try_recv() {
            if m.msg_type() == "execute_request" {
                if let Ok(mut p) = self.publisher.parent.lock() {
                    *p = m.header.clone();
                }
                self.publisher.status("busy");
                self.reply(
                    &m,
                    "execute_reply",
                    json!({ "status": "aborted", "execution_count": self.count }),
                );
                self.publisher.status("idle");
            } else {
                self.backlog.push_back(m);
            }
        }
    }

    fn user_expressions(&mut self, msg: &Message) -> Value {
        let mut out = Map::new();
        let Some(exprs) = msg.content.get("user_expressions").and_then(Value::as_object) else {
            return Value::Object(out);
        };
        for (k, expr) in exprs {
            let code = expr.as_str().unwrap_or("");
            let v = match self.rt.eval_cell(code, &format!("user_expressions[{k}]")) {
                Ok(v) => {
                    let b = display::bundle(&v, self.rt.display(&v));
                    json!({ "status": "ok", "data": b.data, "metadata": b.metadata })
                }
                Err(e) => json!({
                    "status": "error",
                    "ename": "ScriptError",
                    "evalue": e.rendered.lines().next().unwrap_or(""),
                    "traceback": e.rendered.lines().collect::<Vec<_>>(),
                }),
            };
            out.insert(k.clone(), v);
        }
        Value::Object(out)
    }

    fn complete(&self, msg: &Message) {
        let code = msg.str_field("code");
        let pos = cursor(msg, code);
        let (start, matches) = complete::complete(&self.rt, &code[..pos]);
        let chars = |b: usize| code[..b].chars().count();
        self.reply(
            msg,
            "complete_reply",
            json!({
                "status": "ok",
                "matches": matches,
                "cursor_start": chars(start),
                "cursor_end": chars(pos),
                "metadata": {},
            }),
        );
    }

    fn inspect(&self, msg: &Message) {
        let code = msg.str_field("code");
        let pos = cursor(msg, code);
        let mut text = String::new();
        if let Some(word) = complete::word_at(code, pos) {
            let name = word.rsplit("::").next().unwrap_or(word);
            for (var, ty, value) in self.rt.variables() {
                if var == name {
                    text.push_str(&format!("{var}: {ty} = {value}\n\n"));
                }
            }
            for d in api::lookup(&self.rt.docs, name) {
                text.push_str(&format!("{}\n    {}\n\n", d.signature, d.doc));
            }
        }
        let found = !text.is_empty();
        let data = if found { json!({ "text/plain": text.trim_end() }) } else { json!({}) };
        self.reply(
            msg,
            "inspect_reply",
            json!({ "status": "ok", "found": found, "data": data, "metadata": {} }),
        );
    }

    fn is_complete(&self, msg: &Message) {
        let code = msg.str_field("code");
        let status = if self.rt.is_incomplete(code) {
            "incomplete"
        } else if self.rt.engine.compile_with_scope(&self.rt.scope, code).is_err() {
            "invalid"
        } else {
            "complete"
        };
        let mut content = json!({ "status": status });
        if status == "incomplete" {
            content["indent"] = json!("");
        }
        self.reply(msg, "is_complete_reply", content);
    }
}

/// The request's `cursor_pos` (in characters, protocol 5.2+) as a byte
/// offset into `code`; the end of the code when absent.
fn cursor(msg: &Message, code: &str) -> usize {
    match msg.content.get("cursor_pos").and_then(Value::as_u64) {
        Some(c) => code.char_indices().nth(c as usize).map_or(code.len(), |(i, _)| i),
        None => code.len(),
    }
}
