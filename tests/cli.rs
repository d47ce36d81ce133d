//! End-to-end tests of the `knlp` and `knlp-shell` binaries.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const KNLP: &str = env!("CARGO_BIN_EXE_knlp");
const SHELL: &str = env!("CARGO_BIN_EXE_knlp-shell");

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh scratch folder for one test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("knlp-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&p, text).unwrap();
    p
}

fn knlp(dir: &Path, args: &[&str]) -> Output {
    Command::new(KNLP).args(args).current_dir(dir).output().unwrap()
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn version_and_help() {
    let o = Command::new(KNLP).arg("--version").output().unwrap();
    assert!(o.status.success());
    assert!(text(&o).0.starts_with("knlp "));
    let o = Command::new(KNLP).arg("--help").output().unwrap();
    assert!(o.status.success());
    assert!(text(&o).0.contains("run"));
    // A usage error is exit status 2, as for any clap tool.
    let o = Command::new(KNLP).arg("--bogus").output().unwrap();
    assert_eq!(o.status.code(), Some(2));
}

/// `knlp kernels` compiles every fused kernel with NVRTC (no GPU) and
/// prints ptxas's report; bad architectures are errors that say so.
#[test]
fn kernels_check_reports_every_entry_point() {
    if knlp::kernels::nvrtc::get().is_err() && std::env::var_os("KNLP_REQUIRE_NVRTC").is_none() {
        eprintln!("skipped: no NVRTC");
        return;
    }
    let o = knlp(&root(), &["kernels", "--arch", "90"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    for entry in
        ["score_keys", "radix_pass", "radix_find", "keep_above", "xent_bf16", "add_ln_fwd", "add_ln_bwd"]
    {
        assert!(out.lines().any(|l| l.starts_with("sm_90") && l.contains(entry)), "{entry} missing:\n{out}");
    }
    assert!(out.contains("H 12, R 256, DR 32") && !out.contains("problem"), "{out}");
    for (arch, want) in [("sm_9x", "expected an architecture such as 90"), ("sm_20", "has no sm_20")] {
        let o = knlp(&root(), &["kernels", "--arch", arch]);
        assert_eq!(o.status.code(), Some(1), "{arch}");
        assert!(text(&o).1.contains(want), "{arch}: {}", text(&o).1);
    }
}

#[test]
fn tensor_ops_script_passes() {
    let o = knlp(&root(), &["run", "tests/scripts/tensor_ops.rhai"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("tensor_ops: ok"));
}

#[test]
fn attention_bindings_script_passes() {
    let o = knlp(&root(), &["run", "tests/scripts/attention.rhai"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("attention bindings ok"));
}

#[test]
fn mechint_bindings_script_passes() {
    let d = scratch("mechint-bindings");
    let o = knlp(&root(), &["run", "tests/scripts/mechint.rhai", &d.display().to_string()]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("mechint bindings ok"));
    assert!(d.join("eff.png").exists() && d.join("pat.svg").exists());
}

#[test]
fn induction_heads_script_runs_small() {
    // scripts/induction-heads.rhai at a toy size: trains, scores, ablates, plots.
    let d = scratch("induction");
    let out_dir = d.join("out").display().to_string();
    let args = [
        "run",
        "scripts/induction-heads.rhai",
        "--steps",
        "4",
        "--probes",
        "2",
        "--n-embd",
        "16",
        "--n-head",
        "2",
        "--block-size",
        "64",
        "--batch-size",
        "2",
        "--n",
        "8",
        "--out",
        &out_dir,
    ];
    let o = knlp(&root(), &args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("| repeated text | trained |"), "{out}");
    for f in
        ["induction-head.png", "induction-scores.svg", "previous-token-scores.png", "induction-curve.png"]
    {
        assert!(d.join("out").join(f).exists(), "{f} missing");
    }
}

#[test]
fn lenet5_bitter_script_runs_every_method_small() {
    // Movement pruning used to fail: its default variant was the state pruner's.
    let d = scratch("lenet5-bitter");
    let out_dir = d.join("out").display().to_string();
    let args = [
        "run",
        "scripts/lenet5-bitter.rhai",
        "--methods",
        "dense,magnitude,movement,bitter7",
        "--steps",
        "3",
        "--prune_warmup",
        "1",
        "--frequency",
        "1",
        "--out",
        &out_dir,
    ];
    let o = knlp(&root(), &args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    for m in ["dense", "magnitude", "movement", "bitter7"] {
        assert!(out.contains(&format!("{m}: test_accuracy=")), "{m} missing:\n{out}");
    }
}

#[test]
fn attention_ablation_script_runs_small() {
    // scripts/attention.rhai at a toy size: every variant trains, decodes and plots.
    let d = scratch("attn-ablation");
    let out_dir = d.join("out").display().to_string();
    let args = [
        "run",
        "scripts/attention.rhai",
        "--variants",
        "mha,ra_mla_kvsplice",
        "--steps",
        "4",
        "--eval_every",
        "2",
        "--eval_batches",
        "1",
        "--n_layer",
        "1",
        "--n_head",
        "2",
        "--n_embd",
        "32",
        "--block_size",
        "32",
        "--d_latent",
        "16",
        "--batch_size",
        "2",
        "--warmup",
        "1",
        "--new_tokens",
        "4",
        "--out",
        &out_dir,
    ];
    let o = knlp(&root(), &args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("| ra_mla_kvsplice |"), "{out}");
    assert!(d.join("out/attention.png").exists() && d.join("out/attention-val-loss.png").exists());
}

#[test]
fn tensor_demo_runs() {
    let o = knlp(&root(), &["run", "scripts/tensors.rhai", "--steps", "20"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("fitted w"), "{out}");
}

#[test]
fn error_names_file_line_column_with_caret() {
    let d = scratch("errpos");
    write(&d, "bad.rhai", "let a = ones([2, 2]);\nlet b = 1;\nlet c = a.reshape([3]);\n");
    let o = knlp(&d, &["run", "bad.rhai"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.starts_with("bad.rhai:3:11: error: shape '[3]' is invalid for input of size 4"), "{err}");
    assert!(err.contains(" 3 | let c = a.reshape([3]);\n   |           ^"), "{err}");
    assert!(!err.contains("Exception raised from"), "backtrace leaked: {err}");
}

#[test]
fn errors_inside_functions_and_modules_show_the_chain() {
    let d = scratch("errmod");
    write(&d, "lib/m.rhai", "fn boom(t) {\n    t.matmul(t)\n}\n");
    write(&d, "main.rhai", "import \"lib/m\" as m;\nlet x = ones([2, 3]);\nm::boom(x);\n");
    let o = knlp(&d, &["run", "main.rhai"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.starts_with("lib/m.rhai:2:7: error:"), "{err}");
    assert!(err.contains("in function 'boom' called at main.rhai:3:4"), "{err}");
}

#[test]
fn syntax_errors_and_unknown_functions() {
    let d = scratch("syntax");
    write(&d, "s.rhai", "let x = (1 + ;\n");
    let (_, err) = text(&knlp(&d, &["run", "s.rhai"]));
    assert!(err.starts_with("s.rhai:1:14: error: syntax error"), "{err}");
    write(&d, "f.rhai", "let x = zeros([2]);\nx.sum(\"no\");\nx.nope(1);\n");
    let (_, err) = text(&knlp(&d, &["run", "f.rhai"]));
    assert!(err.starts_with("f.rhai:2:3: error: dim must be an int"), "{err}");
    write(&d, "g.rhai", "topk(1, 2, 3);\n");
    let (_, err) = text(&knlp(&d, &["run", "g.rhai"]));
    assert!(err.contains("no function matches topk (int, int, int)"), "{err}");
    assert!(err.contains("Tensor.topk(k: int)"), "the message lists the real signatures: {err}");
}

#[test]
fn limits_stop_runaway_scripts() {
    let d = scratch("limits");
    write(&d, "loop.rhai", "let i = 0;\nloop { i += 1; }\n");
    let o = knlp(&d, &["run", "--max-operations", "100000", "loop.rhai"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("script stopped after 100000 operations"), "{err}");
    let o = knlp(&d, &["run", "--max-operations", "0", "--timeout", "0.5", "loop.rhai"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("--timeout of 0.5 s"), "{err}");
    write(&d, "rec.rhai", "fn f(x) { f(x + 1) }\nf(0);\n");
    let (_, err) = text(&knlp(&d, &["run", "--max-call-levels", "50", "rec.rhai"]));
    assert!(err.contains("call stack too deep"), "{err}");
    write(&d, "big.rhai", "let a = [];\nfor i in 0..1000 { a.push(i); }\n");
    let (_, err) = text(&knlp(&d, &["run", "--max-array-size", "100", "big.rhai"]));
    assert!(err.contains("big.rhai:2:"), "{err}");
}

#[test]
fn ctrl_c_stops_a_script() {
    let d = scratch("sigint");
    write(&d, "spin.rhai", "print(\"started\");\nlet i = 0;\nloop { i += 1; }\n");
    let child = Command::new(KNLP)
        .args(["run", "--max-operations", "0", "spin.rhai"])
        .current_dir(&d)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let st = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(st.success());
    let o = child.wait_with_output().unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted (Ctrl-C)") && err.contains("spin.rhai:3:"), "{err}");
}

#[test]
fn imports_resolve_from_script_folder_then_stdlib() {
    let d = scratch("imports");
    write(&d, "proj/helper.rhai", "fn twice(x) { x * 2 }\nexport const K = 7;\n");
    write(&d, "proj/util.rhai", "fn mean(xs) { -1.0 }\n");
    write(
        &d,
        "proj/main.rhai",
        "import \"helper\" as h;\nimport \"util\" as u;\nprint(`${h::twice(h::K)} ${u::mean([1.0])}`);\n",
    );
    // Run from another folder: resolution follows the script, not the cwd.
    let o = knlp(&d, &["run", "proj/main.rhai"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(out.trim(), "14 -1.0", "the script's own util shadows stdlib's");
    write(&d, "std.rhai", "import \"util\" as u;\nprint(u::mean([1.0, 3.0]));\n");
    let (out, _) = text(&knlp(&d, &["run", "std.rhai"]));
    assert_eq!(out.trim(), "2.0", "stdlib/util.rhai is embedded");
    write(&d, "esc.rhai", "import \"../secret\" as s;\n");
    let (_, err) = text(&knlp(&d, &["run", "esc.rhai"]));
    assert!(err.starts_with("esc.rhai:1:8: error: import \"../secret\""), "{err}");
    write(&d, "missing.rhai", "import \"nothere\" as n;\n");
    let (_, err) = text(&knlp(&d, &["run", "missing.rhai"]));
    assert!(err.contains("module 'nothere' not found"), "{err}");
}

#[test]
fn exit_codes() {
    let d = scratch("exit");
    write(&d, "ok.rhai", "print(1);\n");
    assert_eq!(knlp(&d, &["run", "ok.rhai"]).status.code(), Some(0));
    write(&d, "three.rhai", "exit(3);\n");
    assert_eq!(knlp(&d, &["run", "three.rhai"]).status.code(), Some(3));
    write(&d, "throw.rhai", "throw \"no\";\n");
    assert_eq!(knlp(&d, &["run", "throw.rhai"]).status.code(), Some(1));
    let o = knlp(&d, &["run", "absent.rhai"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("cannot read the script"));
}

#[test]
fn script_arguments() {
    let d = scratch("args");
    write(&d, "a.rhai", "let o = parse_args(ARGS, #{ epochs: 1, lr: 0.5, name: \"x\", fast: false });\nprint(`${o.epochs} ${o.lr} ${o.name} ${o.fast} ${ARGS.len()}`);\n");
    let o = knlp(&d, &["run", "a.rhai", "--epochs", "4", "--lr=0.25", "--fast", "--name", "y"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(out.trim(), "4 0.25 y true 6");
    let o = knlp(&d, &["run", "a.rhai", "--epoch", "4"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("unknown option --epoch") && err.contains("--epochs"), "{err}");
    let o = knlp(&d, &["run", "a.rhai", "--help"]);
    assert!(o.status.success());
    assert!(text(&o).0.contains("--epochs"));
}

fn shell(input: &str) -> Output {
    let mut child = Command::new(SHELL)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .current_dir(root())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn shell_state_persists_and_errors_survive() {
    let input = "let a = ones([2, 2]);\nfn triple(x) { x * 3 }\ntriple(a).sum()\nlet b = a.reshape([5]);\nprint(\"after the error\");\n(a + 1).sum().item()\n";
    let o = shell(input);
    let (out, err) = text(&o);
    assert!(out.contains("tensor(12., shape=[], dtype=float32, device=cpu)"), "{out}");
    assert!(out.contains("after the error"), "{out}");
    assert!(out.trim_end().ends_with("8.0"), "{out}");
    assert!(err.contains("<input 4>:1:11: error: shape '[5]' is invalid"), "{err}");
    assert_eq!(o.status.code(), Some(1), "a piped session with errors exits 1");
}

/// A panic inside a binding (injected with KNLP_TEST_PANIC) ends neither the
/// shell session nor its variables (issue 20).
#[test]
fn shell_survives_a_panic_in_a_binding() {
    let d = scratch("shell-panic");
    let mut child = Command::new(SHELL)
        .env("KNLP_TEST_PANIC", "checkpoint")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .current_dir(&d)
        .spawn()
        .unwrap();
    let input = "let a = 5;\nsave(ones(3), \"x.safetensors\");\nprint(`a is ${a}`);\n";
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let o = child.wait_with_output().unwrap();
    let (out, err) = text(&o);
    assert!(out.contains("a is 5"), "the session went on: {out}\n{err}");
    assert!(err.contains("internal error") && err.contains("KNLP_TEST_PANIC at checkpoint"), "{err}");
    assert_eq!(o.status.code(), Some(1), "an input failed");
    let _ = std::fs::remove_dir_all(&d);
}

/// Deep recursion stops at --max-call-levels with a script error; the
/// script's thread has the stack for it (issue 20: it used to abort).
#[test]
fn deep_recursion_is_an_error_not_an_abort() {
    let d = scratch("deep");
    write(
        &d,
        "deep.rhai",
        "fn g(n, m) { let a = [n, #{ x: n }]; if n == 0 { m.len() } else { g(n - 1, m + #{ k: a }) + 1 } }\nprint(`depth ${g(parse_int(ARGS[0]), #{})}`);\n",
    );
    let o = knlp(&d, &["run", "--max-call-levels", "10000", "deep.rhai", "9990"]);
    let (out, err) = text(&o);
    assert!(o.status.success() && out.contains("depth 9991"), "{out}\n{err}");
    let o = knlp(&d, &["run", "--max-call-levels", "3000", "deep.rhai", "3500"]);
    let err = text(&o).1;
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("call stack too deep"), "{err}");
    let o = knlp(&d, &["run", "--max-call-levels", "1000000", "deep.rhai", "3"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("above the largest allowed, 10000"));
    let _ = std::fs::remove_dir_all(&d);
}

/// exit(n) ends `knlp run` and the shell with status n; a failure code
/// never reads as success (issue 20).
#[test]
fn exit_codes_keep_failures() {
    let d = scratch("exit-codes");
    for (code, want) in [("-1", 255), ("3", 3), ("256", 1), ("0", 0)] {
        write(&d, "e.rhai", &format!("print(\"before\");\nexit({code});\nprint(\"after\");\n"));
        let o = knlp(&d, &["run", "e.rhai"]);
        let out = text(&o).0;
        assert_eq!(o.status.code(), Some(want), "knlp run: exit({code})");
        assert!(out.contains("before") && !out.contains("after"), "{out}");
        let o = shell(&format!("print(\"before\");\nexit({code});\nprint(\"after\");\n"));
        let out = text(&o).0;
        assert_eq!(o.status.code(), Some(want), "knlp-shell: exit({code})");
        assert!(out.contains("before") && !out.contains("after"), "{out}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn shell_multiline_input_imports_and_commands() {
    let input = "let m = #{\n  a: 1,\n  b: [1,\n      2]\n};\nfn f(x) {\n  x + 1\n}\nf(m.a)\nimport \"util\" as u;\nu::mean([2.0, 4.0])\n:vars\n:help topk\n:quit\nprint(\"not reached\");\n";
    let o = shell(input);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "2");
    assert_eq!(lines[1], "3.0", "the import alias persists to the next input");
    assert!(out.contains("m ") && out.contains("map"), "{out}");
    assert!(out.contains("Tensor.topk(k: int) -> map"), "{out}");
    assert!(!out.contains("not reached"));
}

#[test]
fn shell_load_and_reset() {
    let d = scratch("load");
    let f = write(&d, "defs.rhai", "let loaded = 41;\nfn inc(x) { x + 1 }\n");
    let input = format!(":load {}\ninc(loaded)\n:reset\nloaded\n", f.display());
    let o = shell(&input);
    let (out, err) = text(&o);
    assert!(out.lines().next() == Some("42"), "{out}");
    assert!(err.contains("Variable not found: loaded"), "{err}");
}

#[test]
fn reference_docs_are_current() {
    let o = Command::new(KNLP).arg("doc").output().unwrap();
    assert!(o.status.success());
    let generated = String::from_utf8(o.stdout).unwrap();
    let committed = std::fs::read_to_string(root().join("docs/scripting.md")).unwrap_or_default();
    assert!(generated == committed, "docs/scripting.md is stale: run `make docs` and commit it");
}

#[test]
fn cuda_smoke_or_skip() {
    let d = scratch("cuda");
    write(
        &d,
        "c.rhai",
        "if !cuda_available() { print(\"skip\"); exit(0); }\nset_tf32(true);\nassert(tf32());\nlet a = randn([256, 256]).to(\"cuda\").bf16();\nlet b = autocast(\"bf16\", || a.matmul(a));\nassert_eq(b.dtype, \"bfloat16\");\nassert(cuda_memory().peak_allocated > 0);\nprint(\"cuda ok\");\n",
    );
    let o = knlp(&d, &["run", "c.rhai"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    if out.trim() == "skip" {
        eprintln!("cuda_smoke_or_skip: skipped, CUDA is not available on this machine");
    } else {
        assert!(out.contains("cuda ok"));
    }
}

#[test]
fn shell_shows_knlp_values_as_print_does() {
    let o =
        shell("let m = lenet5();\nm\nlet o = optimizer(m, #{ kind: \"sgd\", lr: 0.1 });\no\n[m]\n:vars\n");
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("Model(lenet5, 61750 parameters, cpu)"), "{out}");
    assert!(!out.contains("knlp::script"), "a Rust type name reached the user:\n{out}");
}

#[test]
fn shell_lists_hooks_and_the_last_cache() {
    let o = shell(
        "let m = gpt2(#{ n_layer: 1, n_head: 2, n_embd: 8, block_size: 8, vocab_size: 16 });\n:hooks m\n\
         let r = m.run_with_cache(randint(0, 16, [1, 4]), #{ names: [\"blocks.0.attn.hook_pattern\"] });\n:cache\n",
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("m: 21 hook points") && out.contains("  blocks.0.attn.hook_z"), "{out}");
    assert!(out.contains("blocks.0.attn.hook_pattern") && out.contains("[1, 2, 4, 4] float32"), "{out}");
}

/// Every script in scripts/ runs, at a small size, from a scratch folder
/// (attention, induction-heads, lenet5-bitter and tensors have their own
/// tests above; issue 16: "every script in scripts/ must run in make test").
#[test]
fn every_shipped_script_runs_small() {
    let d = scratch("scripts-small");
    let s = |name: &str| root().join("scripts").join(name).display().to_string();
    // Options split on spaces, then the output option's folder in the scratch dir.
    let args = |opts: &str, out: &str| -> Vec<String> {
        opts.split_whitespace().map(String::from).chain([d.join(out).display().to_string()]).collect()
    };
    let tiny_gpt2 = "--n_layer 1 --n_head 2 --n_embd 32 --block_size 32 --batch_size 2";
    let runs: Vec<(String, Vec<String>, &str)> = vec![
        (s("quickstart.rhai"), args("--steps 4 --out", "qs"), "lenet5 bitter7 test_accuracy="),
        (s("lenet5.rhai"), args("--steps 3 --run_dir", "l5"), "lenet5 optimizer=adamw"),
        (
            s("resnet18.rhai"),
            args("--steps 2 --batch_size 4 --test_samples 16 --run_dir", "r18"),
            "resnet18 params=",
        ),
        (
            s("gpt2.rhai"),
            args(
                &format!("{tiny_gpt2} --steps 4 --eval_every 2 --eval_batches 1 --warmup 1 --run_dir"),
                "g2",
            ),
            "gpt2 params=",
        ),
        (
            s("bitter7.rhai"),
            args(
                &format!(
                    "{tiny_gpt2} --steps 6 --warmup 1 --prune_warmup 1 --ramp_end 4 --frequency 1 \
                     --eval_every 3 --eval_batches 1 --out"
                ),
                "b7",
            ),
            "plot: ",
        ),
        (s("lenet5-script.rhai"), args("--steps 20 --out", "l5s"), "lenet5-script same_numbers=true"),
        (
            s("pca_tokenizer.rhai"),
            args("--train 900 --batch 800 --save", "pca.safetensors"),
            "| 100 % | 784 |",
        ),
        (s("mlp-fashion.rhai"), args("--steps 6 --sparsity 0.5 --out", "mlp"), "sparsity=0.500"),
        (
            s("transformer-block.rhai"),
            args("--steps 4 --n-layer 1 --n-head 2 --n-embd 16 --block-size 16 --batch-size 2 --out", "tb"),
            "transformer-block same_numbers=true",
        ),
        (
            s("kv_prune.rhai"),
            args(
                &format!(
                    "{tiny_gpt2} --steps 2 --warmup 1 --eval_batches 1 --eval_seqs 1 --ratios 1.0,0.5 \
                     --k_min 2 --recency 2 --out"
                ),
                "kvp",
            ),
            "| 0.5 |",
        ),
    ];
    // Every script in scripts/ runs here or in another test of this file.
    let this_file = include_str!("cli.rs");
    for e in std::fs::read_dir(root().join("scripts")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().to_string();
        assert!(
            this_file.contains(&format!("s(\"{name}\")"))
                || this_file.contains(&format!("\"scripts/{name}\"")),
            "scripts/{name} is run by no test"
        );
    }
    for (script, args, want) in runs {
        let mut argv = vec!["run".to_string(), script.clone()];
        argv.extend(args);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let o = knlp(&d, &argv);
        let (out, err) = text(&o);
        assert!(o.status.success() && out.contains(want), "{script}\nstdout:\n{out}\nstderr:\n{err}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// train()'s closures (issue 16): lr_schedule sets each step's rate,
/// on_step and on_eval log their numbers and can stop the run cleanly, a
/// custom loss replaces the cross-entropy, and a bad one fails the run
/// with a clear reason.
#[test]
fn train_closures_set_the_rate_log_metrics_stop_and_replace_the_loss() {
    let d = scratch("train-closures");
    write(
        &d,
        "t.rhai",
        r#"
let data = loader(fashion_mnist(#{ split: "test" }).slice(0, 640), #{ batch_size: 16, resize: 32, normalize: true });
let m = lenet5(#{ seed: 0 });
let run = train(m, sgd(m, #{ lr: 0.05 }), data, #{
    steps: 40, log_every: 5, eval_every: 10, progress: "off", run_dir: "a", test: data,
    lr_schedule: |step| 0.001 * step,
    on_step: |s| if s.step % 5 == 0 { #{ lr_seen: s.lr, half_loss: s.loss.item() / 2.0 } },
    on_eval: |r| #{ acc_pct: r.test_acc * 100.0, stop: r.step >= 20 },
});
print(`a ${run.status} ${run.summary.steps} ${run.summary.reason}`);
let m = lenet5(#{ seed: 0 });
let run = train(m, sgd(m, #{ lr: 0.05 }), data, #{ steps: 10, log_every: 5, progress: "off", run_dir: "b",
                                                   loss: |logits, y| logits.sum() * 0.0 });
print(`b ${run.status}`);
let m = lenet5(#{ seed: 0 });
let run = train(m, sgd(m, #{ lr: 0.05 }), data, #{ steps: 10, progress: "off", run_dir: "c",
                                                   loss: |logits, y| logits });
print(`c ${run.status} ${run.summary.reason}`);
"#,
    );
    let o = knlp(&d, &["run", "t.rhai"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("a done 20 on_eval asked to stop"), "{out}");
    let recs: Vec<serde_json::Value> = std::fs::read_to_string(d.join("a/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let at = |step: i64, key: &str| {
        recs.iter().find(|r| r["step"] == step && r.get(key).is_some()).map(|r| r[key].clone())
    };
    for step in [5i64, 10, 15, 20] {
        let lr = 0.001 * step as f64;
        assert!((at(step, "lr").unwrap().as_f64().unwrap() - lr).abs() < 1e-12, "step {step}: {recs:?}");
        assert!((at(step, "lr_seen").unwrap().as_f64().unwrap() - lr).abs() < 1e-12, "step {step}");
        assert!(at(step, "half_loss").unwrap().as_f64().unwrap() > 0.0);
    }
    let acc = at(20, "test_acc").unwrap().as_f64().unwrap();
    assert!((at(20, "acc_pct").unwrap().as_f64().unwrap() - acc * 100.0).abs() < 1e-9);
    assert!(at(25, "lr").is_none(), "the run went on after on_eval stopped it");
    // The custom loss was the objective: its value is what was logged.
    let b = std::fs::read_to_string(d.join("b/metrics.jsonl")).unwrap();
    assert!(out.contains("b done") && b.contains("\"train_loss\":0.0"), "{b}");
    assert!(out.contains("c failed") && out.contains("0-d tensor"), "{out}");
    let _ = std::fs::remove_dir_all(&d);
}

/// `save` writes regular files only: an existing FIFO, socket, device node,
/// folder or symbolic link is refused and left as it was, whatever form of
/// `save` is used; a missing folder is an error unless `mkdir: true`; a link
/// is written through only with `follow_symlinks: true`; a huge path is
/// shortened in the error.
#[test]
fn save_never_replaces_what_is_not_a_regular_file() {
    use std::os::unix::fs::FileTypeExt;
    let d = scratch("save-targets");
    let st = |p: &Path| std::fs::symlink_metadata(p).map(|m| m.file_type());
    assert!(Command::new("mkfifo").arg(d.join("fifo")).status().unwrap().success());
    std::fs::create_dir(d.join("folder")).unwrap();
    std::fs::write(d.join("real.safetensors"), "not yet").unwrap();
    std::os::unix::fs::symlink(d.join("real.safetensors"), d.join("link")).unwrap();
    std::os::unix::fs::symlink(d.join("nowhere"), d.join("dangling")).unwrap();
    std::os::unix::fs::symlink(d.join("fifo"), d.join("link-to-fifo")).unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(d.join("socket")).unwrap();
    // A device node of our own (a null device), when allowed to make one.
    let dev = Command::new("mknod")
        .arg(d.join("nulldev"))
        .args(["c", "1", "3"])
        .status()
        .is_ok_and(|s| s.success());
    let mut targets =
        vec!["fifo", "folder", "link", "dangling", "link-to-fifo", "socket", "missing/sub/x.safetensors"];
    if dev {
        targets.push("nulldev");
    }
    let forms = [
        "save(ones([3]), P)",
        "save(#{ a: ones([2]) }, P)",
        "save(#{ a: ones([2]) }, P, #{ k: \"v\" })",
        "save(lenet5(), P)",
        "save(ones([3]), P, #{})",
    ];
    let mut script = String::from("let refused = 0;\n");
    for t in &targets {
        for f in forms {
            let call = f.replace('P', &format!("{:?}", d.join(t).display().to_string()));
            script.push_str(&format!(
                "try {{ {call}; print(\"WROTE {t}\"); }} catch (e) {{ refused += 1; }}\n"
            ));
        }
    }
    script.push_str("print(`refused ${refused}`);\n");
    let s = write(&d, "hostile.rhai", &script);
    let o = knlp(&d, &["run", s.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(!out.contains("WROTE"), "{out}");
    assert!(out.contains(&format!("refused {}", targets.len() * forms.len())), "{out}");
    assert!(st(&d.join("fifo")).unwrap().is_fifo());
    assert!(st(&d.join("folder")).unwrap().is_dir());
    assert!(st(&d.join("socket")).unwrap().is_socket());
    for l in ["link", "dangling", "link-to-fifo"] {
        assert!(st(&d.join(l)).unwrap().is_symlink(), "{l}");
    }
    assert_eq!(std::fs::read_to_string(d.join("real.safetensors")).unwrap(), "not yet");
    assert!(!d.join("missing").exists() && !d.join("nowhere").exists());
    if dev {
        assert!(st(&d.join("nulldev")).unwrap().is_char_device());
    }
    // The messages say why; the options allow what they name.
    let ok = write(
        &d,
        "asked.rhai",
        &format!(
            r#"let e = ""; try {{ save(ones([3]), "{fifo}"); }} catch (x) {{ e = `${{x}}`; }}
if !e.contains("FIFO") {{ throw e; }}
try {{ save(ones([3]), "{missing}"); }} catch (x) {{ e = `${{x}}`; }}
if !e.contains("does not exist") || !e.contains("mkdir") {{ throw e; }}
try {{ save(ones([3]), "{link}"); }} catch (x) {{ e = `${{x}}`; }}
if !e.contains("symbolic link") {{ throw e; }}
try {{ save(ones([3]), "{link}", #{{ colour: true }}); }} catch (x) {{ e = `${{x}}`; }}
if !e.contains("unknown option 'colour'") {{ throw e; }}
save(ones([3]), "{missing}", #{{ mkdir: true }});
save(#{{ w: ones([2]) }}, "{link}", #{{}}, #{{ follow_symlinks: true }});
let long = "x"; for i in 0..17 {{ long += long; }}
try {{ save(ones([3]), `{dir}/${{long}}/y`); }} catch (x) {{ e = `${{x}}`; }}
print(`long error ${{e.len()}}`);
"#,
            fifo = d.join("fifo").display(),
            missing = d.join("missing/sub/x.safetensors").display(),
            link = d.join("link").display(),
            dir = d.display(),
        ),
    );
    let o = knlp(&d, &["run", ok.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(d.join("missing/sub/x.safetensors").is_file());
    assert!(st(&d.join("link")).unwrap().is_symlink());
    assert_eq!(knlp::safetensors::load(&d.join("real.safetensors")).unwrap().tensors[0].0, "w");
    let n: usize = out.trim().rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n < 2000, "a 131072-character path gave a {n}-character error");
    // The CLI shortens its errors the same way.
    let long = "y".repeat(100_000);
    let o = knlp(&d, &["results", &long]);
    let (_, err) = text(&o);
    assert!(!o.status.success() && err.len() < 2000, "{} bytes", err.len());
    let _ = std::fs::remove_dir_all(&d);
}

/// A model that does not fit in memory is refused before it is allocated
/// (not ended by the kernel's OOM killer), with its size in bytes.
#[test]
fn models_too_large_for_memory_are_refused() {
    let d = scratch("too-large");
    let s = write(
        &d,
        "big.rhai",
        r#"let e = "";
// One embedding of 50257 x 400000 floats: 80 GB, more than any test machine has.
try { gpt2(#{ n_layer: 1, n_head: 1, n_embd: 400000, block_size: 8 }); } catch (x) { e = `${x}`; }
if !e.contains("does not fit in memory") || !e.contains("wte") || !e.contains("bytes") { throw `huge: ${e}`; }
// Many moderate layers against a 64 MB limit.
e = "";
try { gpt2(#{ n_layer: 40, n_head: 4, n_embd: 256, block_size: 8 }); } catch (x) { e = `${x}`; }
if !e.contains("does not fit in memory") || !e.contains("KNLP_MEMORY_LIMIT") { throw `limited: ${e}`; }
let b = model_builder(#{ arch: "mlp", classes: 10 });
e = "";
try { b.param("w", [100000, 100000]); } catch (x) { e = `${x}`; }
if !e.contains("does not fit in memory") { throw `script: ${e}`; }
// What fits still builds.
let small = gpt2(#{ n_layer: 1, n_head: 2, n_embd: 32, block_size: 8 });
print(`ok ${small.num_params}`);
"#,
    );
    let o = Command::new(KNLP)
        .args(["run", s.to_str().unwrap()])
        .env("KNLP_MEMORY_LIMIT", "64M")
        .current_dir(&d)
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success() && out.contains("ok "), "{out}\n{err}");
    let _ = std::fs::remove_dir_all(&d);
}

/// `knlp doc | head -1`: a closed pipe ends the command quietly, never with
/// a panic.
#[test]
fn a_closed_pipe_is_not_a_panic() {
    let mut child = Command::new(KNLP)
        .arg("doc")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The reader goes away before knlp writes anything.
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
}

/// `profile(f)` on the CPU: the operators `f` ran are in `cpu_top` with
/// their call counts, the Chrome trace is a JSON file of trace events, the
/// profiler stops when `f` throws (the next profile() starts), and a bad
/// option is an error naming it.
#[test]
fn profile_reports_operators_and_writes_a_trace() {
    let d = scratch("profile");
    let s = write(
        &d,
        "p.rhai",
        r#"
let a = randn([64, 64]);
let r = profile(|| { for i in 0..3 { a.matmul(a); } 7 }, #{ trace: "t.json", per: 3 });
let mm = r.cpu_top.filter(|e| e.name == "aten::mm");
print(`result ${r.result} mm ${mm.len()} calls ${mm[0].calls}`);
try { profile(|| throw "boom"); } catch (e) { print(`caught ${e}`); }
let again = profile(|| a.sum(), #{ top: 2 });
print(`again ${again.cpu_top.len()}`);
profile(|| 1, #{ every: 2 });
"#,
    );
    let o = knlp(&d, &["run", s.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert!(out.contains("result 7 mm 1 calls 1.0"), "{out}\n{err}");
    assert!(out.contains("caught boom"), "{out}\n{err}");
    assert!(out.contains("again 2"), "{out}\n{err}");
    // The last line's bad option ends the script with an error naming it.
    assert!(!o.status.success() && err.contains("every"), "{out}\n{err}");
    let trace: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join("t.json")).unwrap()).unwrap();
    let events = trace["traceEvents"].as_array().expect("traceEvents");
    assert!(events.iter().any(|e| e["name"] == "aten::mm"), "no aten::mm in the trace");
    let _ = std::fs::remove_dir_all(&d);
}
