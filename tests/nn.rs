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

/// SinkGD against tests/oracle/sinkgd.py, the spec's formulas in PyTorch:
/// matrices, a convolution kernel, a 3-D tensor and a bias (no decay), four
/// steps, for the seed's S1-S3 settings and the n_iter = 0 path.
#[test]
fn sinkgd_matches_the_spec_in_pytorch() {
    use knlp::optim::{OptConfig, OptKind, Optimizer, SinkConfig};
    use knlp::params::{Init, ParamStore, Role};
    use tch::{Device, Kind, Tensor};

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let venv = std::env::var_os("KNLP_VENV").map(PathBuf::from).unwrap_or_else(|| root.join(".venv"));
    let file = std::env::temp_dir().join(format!("knlp-sinkgd-oracle-{}.safetensors", std::process::id()));
    let o = Command::new(venv.join("bin/python"))
        .arg(root.join("tests/oracle/sinkgd.py"))
        .arg(&file)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = knlp::safetensors::load(&file).unwrap();
    let _ = std::fs::remove_file(&file);
    let get = |n: &str| t.get(n).unwrap_or_else(|| panic!("oracle lacks {n}")).shallow_clone();
    let names = [("w", Role::Weight), ("conv", Role::Weight), ("e", Role::Weight), ("b", Role::Bias)];
    for (cfg_name, tau, n_iter) in [("s1", 0.1, 5), ("s2", 0.05, 10), ("s3", 0.2, 3), ("plain", 0.1, 0)] {
        let mut store = ParamStore::new();
        let ps: Vec<Tensor> = names
            .iter()
            .map(|(n, role)| {
                let init = get(&format!("init.{n}"));
                let p = store.param(n, &init.size(), Init::Zeros, *role).unwrap();
                tch::no_grad(|| p.shallow_clone().copy_(&init));
                p
            })
            .collect();
        store.finalize(Device::Cpu).unwrap();
        let cfg = OptConfig {
            lr: 0.05,
            weight_decay: 0.1,
            sinkgd: SinkConfig { tau, n_iter },
            ..OptConfig::for_kind(OptKind::SinkGd)
        };
        let mut opt = Optimizer::new(&store, cfg).unwrap();
        for step in 0..4 {
            store.zero_grad().unwrap();
            // d/dp sum(p * G) = G: the oracle's gradient, exactly.
            let loss = names
                .iter()
                .zip(&ps)
                .fold(Tensor::zeros([], (Kind::Float, Device::Cpu)), |l, ((n, _), p)| {
                    l + (p * get(&format!("grad{step}.{n}"))).sum(Kind::Float)
                });
            loss.backward();
            opt.step(&store).unwrap();
        }
        for ((n, _), p) in names.iter().zip(&ps) {
            let d = (p - get(&format!("{cfg_name}.{n}"))).abs().max().double_value(&[]);
            assert!(d < 1e-6, "{cfg_name}: parameter {n} differs from PyTorch by {d}");
        }
    }
}
