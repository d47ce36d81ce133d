//! The Jupyter kernel, driven by real clients installed in `.venv`:
//! jupyter_client checks every message type (tests/oracle/jupyter_kernel.py)
//! and nbclient executes every notebook in notebooks/ headlessly.
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> PathBuf {
    let venv = std::env::var_os("KNLP_VENV").map(PathBuf::from).unwrap_or_else(|| root().join(".venv"));
    let py = venv.join("bin/python");
    assert!(py.exists(), "{} missing: `make setup` installs jupyter_client into .venv", py.display());
    py
}

fn workdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("knlp-jupyter-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run_py(args: &[&Path]) -> String {
    let o = Command::new(python()).args(args).output().expect("python runs");
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{out}");
    out
}

#[test]
fn kernel_speaks_the_protocol_to_jupyter_client() {
    let work = workdir("kernel");
    let out = run_py(&[
        &root().join("tests/oracle/jupyter_kernel.py"),
        Path::new(env!("CARGO_BIN_EXE_knlp")),
        &work,
    ]);
    assert!(out.contains("all kernel checks passed"), "{out}");
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn every_notebook_runs_headless() {
    let work = workdir("notebooks");
    let out = run_py(&[
        &root().join("tests/oracle/run_notebooks.py"),
        Path::new(env!("CARGO_BIN_EXE_knlp")),
        &root().join("notebooks"),
        &work,
    ]);
    assert!(out.contains("notebooks ran: 3"), "{out}");
    let _ = std::fs::remove_dir_all(&work);
}

fn knlp(args: &[&str]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_knlp")).args(args).output().expect("knlp runs");
    (
        o.status.success(),
        format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)),
    )
}

#[test]
fn a_bad_connection_file_is_a_clear_error() {
    let work = workdir("badconn");
    let missing = work.join("missing.json");
    let (ok, out) = knlp(&["jupyter", "kernel", "-f", missing.to_str().unwrap()]);
    assert!(!ok && out.contains("missing.json: cannot read"), "{out}");
    let cases = [
        ("garbage.json", "{ not json", "not a Jupyter connection file"),
        (
            "ipc.json",
            r#"{"ip": "127.0.0.1", "transport": "ipc", "shell_port": 1, "iopub_port": 2, "stdin_port": 3, "control_port": 4, "hb_port": 5, "key": "k"}"#,
            "transport \"ipc\" is not supported",
        ),
        (
            "md5.json",
            r#"{"ip": "127.0.0.1", "transport": "tcp", "shell_port": 1, "iopub_port": 2, "stdin_port": 3, "control_port": 4, "hb_port": 5, "key": "k", "signature_scheme": "hmac-md5"}"#,
            "signature scheme \"hmac-md5\" is not supported",
        ),
    ];
    for (name, body, want) in cases {
        let f = work.join(name);
        std::fs::write(&f, body).unwrap();
        let (ok, out) = knlp(&["jupyter", "kernel", "-f", f.to_str().unwrap()]);
        assert!(!ok && out.contains(name) && out.contains(want), "{name}: {out}");
    }
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn install_and_uninstall_a_kernelspec() {
    let work = workdir("install");
    let prefix = work.join("p");
    let p = prefix.to_str().unwrap();
    let (ok, out) =
        knlp(&["jupyter", "install", "--prefix", p, "--name", "knlp-test", "--display-name", "knlp test"]);
    assert!(ok, "{out}");
    let dir = prefix.join("share/jupyter/kernels/knlp-test");
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("kernel.json")).unwrap()).unwrap();
    assert_eq!(spec["display_name"], "knlp test");
    assert_eq!(spec["argv"][1], "jupyter");
    assert!(Path::new(spec["argv"][0].as_str().unwrap()).is_absolute());
    let logo = std::fs::read(dir.join("logo-64x64.png")).unwrap();
    assert!(logo.starts_with(b"\x89PNG"));
    let (ok, out) = knlp(&["jupyter", "install", "--prefix", p, "--name", "../evil"]);
    assert!(!ok && out.contains("kernel names are"), "{out}");
    let (ok, out) = knlp(&["jupyter", "uninstall", "--prefix", p, "--name", "knlp-test"]);
    assert!(ok && !dir.exists(), "{out}");
    let (ok, out) = knlp(&["jupyter", "uninstall", "--prefix", p, "--name", "knlp-test"]);
    assert!(!ok && out.contains("no kernelspec here"), "{out}");
    let _ = std::fs::remove_dir_all(&work);
}
