"""Drive the knlp Jupyter kernel with jupyter_client, a real client.

Usage: jupyter_kernel.py KNLP_BINARY WORKDIR

Installs the kernelspec into WORKDIR/prefix, checks that jupyter_client's
KernelSpecManager lists it, starts the kernel through KernelManager and
checks every message type the kernel supports. Prints one line per check
and exits non-zero (with the failed assertion) on the first failure.
"""
import base64
import os
import queue
import re
import signal
import subprocess
import sys
import time

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import start_new_kernel
from jupyter_client.session import Session

knlp, work = sys.argv[1], sys.argv[2]
prefix = os.path.join(work, "prefix")
subprocess.run([knlp, "jupyter", "install", "--prefix", prefix], check=True)
os.environ["JUPYTER_PATH"] = os.path.join(prefix, "share", "jupyter")
specs = KernelSpecManager().find_kernel_specs()
assert "knlp" in specs, specs
spec = KernelSpecManager().get_kernel_spec("knlp")
assert spec.language == "rhai" and spec.argv[1:3] == ["jupyter", "kernel"], spec.to_dict()
print("ok kernelspec listed:", specs["knlp"])

km, kc = start_new_kernel(kernel_name="knlp", cwd=work, startup_timeout=60)


def run(code, timeout=60, **kw):
    """Execute code; return (reply content, iopub messages of this request)."""
    out = []
    reply = kc.execute_interactive(code, output_hook=out.append, timeout=timeout, **kw)
    return reply["content"], out


def of(msgs, kind):
    return [m["content"] for m in msgs if m["msg_type"] == kind]


def check(name, cond, detail=""):
    assert cond, f"{name}: {detail}"
    print("ok", name)


try:
    # kernel_info
    kc.kernel_info()
    info = kc.get_shell_msg(timeout=10)["content"]
    check("kernel_info", info["language_info"]["name"] == "rhai" and info["protocol_version"] == "5.3", info)
    check("heartbeat", kc.hb_channel.is_beating())

    # execute: scope kept across cells, execution_count, execute_result, streams
    r1, _ = run("let x = 40;")
    r2, msgs = run("x + 2")
    res = of(msgs, "execute_result")
    check("scope kept across executes", r2["status"] == "ok" and res and res[0]["data"]["text/plain"] == "42", (r2, res))
    check("execution_count counts cells", r2["execution_count"] == r1["execution_count"] + 1, (r1, r2))
    inputs = of(msgs, "execute_input")
    check("execute_input broadcast", inputs and inputs[0]["code"] == "x + 2", inputs)
    states = [m["content"]["execution_state"] for m in msgs if m["msg_type"] == "status"]
    check("busy then idle", states[:1] == ["busy"] and states[-1:] == ["idle"], states)
    _, msgs = run('print("hello"); print(`x is ${x}`);')
    text = "".join(s["text"] for s in of(msgs, "stream") if s["name"] == "stdout")
    check("print streams stdout", text == "hello\nx is 40\n", repr(text))
    r, msgs = run("fn twice(v) { v * 2 }")
    r, msgs = run("twice(x)")
    check("functions kept across cells", of(msgs, "execute_result")[0]["data"]["text/plain"] == "80", msgs)

    # errors: line:col, same rendering as knlp run, kernel alive after
    r, msgs = run("let a = 1;\nlet b = a.no_such_method();")
    err = of(msgs, "error")
    check("error reply", r["status"] == "error" and r["ename"] == "ScriptError", r)
    where = re.search(r"cell\[(\d+)\]:2:(\d+): error:", r["evalue"])
    check("error names cell line:col", where is not None, r["evalue"])
    check("error published on iopub", err and err[0]["traceback"] == r["traceback"], err)
    check("traceback shows the source line", any("a.no_such_method()" in t for t in r["traceback"]), r["traceback"])
    r, msgs = run("x")
    check("alive after an error", of(msgs, "execute_result")[0]["data"]["text/plain"] == "40", msgs)
    r, _ = run("let broken = ;")
    check("syntax error reply", r["status"] == "error" and re.search(r":1:\d+", r["evalue"]), r)

    # interrupt: an infinite loop stops within 2 s, by message and by SIGINT
    for how in ["message", "SIGINT"]:
        mid = kc.execute("let i = 0; loop { i += 1; }")
        time.sleep(1.0)
        t0 = time.time()
        if how == "message":
            km.interrupt_kernel()
        else:
            km.signal_kernel(signal.SIGINT)
        while True:
            m = kc.get_shell_msg(timeout=5)
            if m["parent_header"].get("msg_id") == mid:
                break
        dt = time.time() - t0
        c = m["content"]
        check(f"interrupt by {how} within 2 s ({dt:.2f} s)", c["status"] == "error" and c["ename"] == "Interrupted" and dt < 2.0, c)
        while True:  # drain this request's iopub
            m = kc.get_iopub_msg(timeout=5)
            if m["parent_header"].get("msg_id") == mid and m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                break
        r, msgs = run("[x, i > 0]")
        check(f"scope kept after interrupt by {how}", of(msgs, "execute_result")[0]["data"]["text/plain"] == "[40, true]", msgs)

    # complete, inspect, is_complete
    kc.complete("let t = zer", 11)
    c = kc.get_shell_msg(timeout=10)["content"]
    check("complete functions", "zeros" in c["matches"] and c["cursor_start"] == 8 and c["cursor_end"] == 11, c)
    kc.complete("tw", 2)
    c = kc.get_shell_msg(timeout=10)["content"]
    check("complete script functions", "twice" in c["matches"], c)
    run('let m = gpt2(#{ n_layer: 1, n_head: 2, n_embd: 8, block_size: 8, vocab_size: 16 });')
    code = 'm.run_with_cache(t, #{ names: ["blocks.0.attn.hook_pat'
    kc.complete(code, len(code))
    c = kc.get_shell_msg(timeout=10)["content"]
    check("complete hook names", c["matches"] == ["blocks.0.attn.hook_pattern"], c)
    kc.inspect("let y = zeros([2]);", 10)
    c = kc.get_shell_msg(timeout=10)["content"]
    check("inspect shows the reference", c["found"] and "zeros(" in c["data"]["text/plain"], c)
    kc.inspect("x", 1)
    c = kc.get_shell_msg(timeout=10)["content"]
    check("inspect shows a variable", c["found"] and "x: int = 40" in c["data"]["text/plain"], c)
    for code, want in [("let a = (1 +", "incomplete"), ("fn f() {", "incomplete"), ("let a = 1;", "complete"), ("let a = );", "invalid")]:
        kc.is_complete(code)
        c = kc.get_shell_msg(timeout=10)["content"]
        check(f"is_complete {code!r}", c["status"] == want, c)
    kc.comm_info()
    c = kc.get_shell_msg(timeout=10)["content"]
    check("comm_info is empty", c["status"] == "ok" and c["comms"] == {}, c)

    # rich display
    png = os.path.join(work, "plot.png")
    _, msgs = run(f'plot_lines("{png}", #{{ title: "t", series: #{{ a: [[0, 1.0], [1, 2.0]] }} }});')
    d = of(msgs, "display_data")
    check("plot as image/png display_data", d and base64.b64decode(d[0]["data"]["image/png"]).startswith(b"\x89PNG"), d)
    check("the plot file is written too", os.path.exists(png))
    _, msgs = run("display(zeros([2, 3]))")
    d = of(msgs, "display_data")
    check("display(tensor) as an HTML table", d and "shape [2, 3]" in d[0]["data"]["text/html"] and "text/plain" in d[0]["data"], d)
    _, msgs = run("rand([3])")
    res = of(msgs, "execute_result")[0]["data"]
    check("a tensor result has HTML and text", "<table>" in res["text/html"] and "tensor" in res["text/plain"].lower(), res)
    _, msgs = run('frame([#{ cell: "a", val_loss: 1.5 }, #{ cell: "b", val_loss: 2.0 }])')
    res = of(msgs, "execute_result")[0]["data"]
    check("a Frame result as an HTML table", "<table>" in res["text/html"] and "val_loss" in res["text/html"], res)
    _, msgs = run(f'image("{png}")')
    res = of(msgs, "execute_result")[0]["data"]
    check("image(path) shows inline", base64.b64decode(res["image/png"]).startswith(b"\x89PNG"), list(res))
    _, msgs = run('display("text")')
    d = of(msgs, "display_data")
    check("display(string)", d and d[0]["data"]["text/plain"] == "text", d)

    # progress: one display, updated in place
    _, msgs = run(
        'let net = lenet5(#{ seed: 1 }); let opt = sgd(net, #{ lr: 0.01 });'
        ' let data = loader(fashion_mnist(#{ split: "test" }), #{ batch_size: 32, resize: 32, normalize: true });'
        f' let run = train(net, opt, data, #{{ steps: 60, log_every: 30, run_dir: "{work}/run1" }}); run.summary.steps',
        timeout=300,
    )
    shown = [m for m in msgs if m["msg_type"] in ("display_data", "update_display_data") and m["content"].get("transient", {}).get("display_id")]
    ids = {m["content"]["transient"]["display_id"] for m in shown}
    kinds = [m["msg_type"] for m in shown]
    check("training progress is one display, updated", len(ids) == 1 and kinds[0] == "display_data" and "update_display_data" in kinds, kinds)

    # a message signed with the wrong key is dropped, never executed
    bad = Session(key=b"not-the-key", username="intruder")
    bad.send(kc.shell_channel.socket, "execute_request", content={"code": "let pwned = 1;", "silent": False, "store_history": True, "user_expressions": {}, "allow_stdin": False, "stop_on_error": True})
    try:
        m = kc.get_shell_msg(timeout=2)
        raise AssertionError(f"a reply to a badly signed message: {m}")
    except queue.Empty:
        pass
    r, _ = run("pwned")
    check("bad signature ignored", r["status"] == "error", r)

    # restart keeps the kernel usable and forgets the scope
    km.restart_kernel(now=False)
    kc.wait_for_ready(timeout=60)
    r, msgs = run("x")
    check("restart forgets the scope", r["status"] == "error", r)
    r, msgs = run("1 + 1")
    check("alive after restart", of(msgs, "execute_result")[0]["data"]["text/plain"] == "2", msgs)
finally:
    kc.stop_channels()
    pid_alive = km.is_alive()
    km.shutdown_kernel(now=False)
check("shutdown ends the process", not km.is_alive())
print("all kernel checks passed")
