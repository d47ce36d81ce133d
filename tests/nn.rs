//! Layer functions (`src/script/nn.rs`) against torch.nn.functional in
//! `.venv` as the oracle: tests/oracle/nn_ops.py writes inputs and PyTorch's
//! outputs, tests/scripts/nn_oracle.rhai recomputes them in knlp and compares.
use std::path::PathBuf;
use std::process::Command;

#[test]
fn layer_functions_match_torch_nn_functional() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let venv = std::env::var_os("KNLP_VENV").map(PathBuf::from).unwrap_or_else(|| root.join(".venv"));
    let py = venv.join("bin/python");
    assert!(py.exists(), "{} missing: `make setup` installs torch into .venv", py.display());
    let file = std::env::temp_dir().join(format!("knlp-nn-oracle-{}.safetensors", std::process::id()));
    let o = Command::new(&py).arg(root.join("tests/oracle/nn_ops.py")).arg(&file).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = Command::new(env!("CARGO_BIN_EXE_knlp"))
        .args(["run", "tests/scripts/nn_oracle.rhai"])
        .arg(&file)
        .current_dir(&root)
        .output()
        .unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success() && out.contains("nn: ok"), "stdout:\n{out}\nstderr:\n{err}");
    let _ = std::fs::remove_file(&file);
}
