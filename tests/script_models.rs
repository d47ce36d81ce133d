//! Models defined in scripts (issue 16): an MLP against PyTorch as the
//! oracle, a script model in every place a built-in one goes, matrix()
//! cells in child processes, and the nn/ablate standard library.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod hostile;

const KNLP: &str = env!("CARGO_BIN_EXE_knlp");

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("knlp-smodels-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn knlp(dir: &Path, args: &[&str]) -> Output {
    Command::new(KNLP).current_dir(dir).env_remove("KNLP_MATRIX_CELL").args(args).output().unwrap()
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into(), String::from_utf8_lossy(&o.stderr).into())
}

/// Forward, label-smoothed loss, gradients and three AdamW steps with
/// parameter groups of a script MLP, recomputed by torch from its weights.
#[test]
fn script_mlp_matches_pytorch() {
    let d = scratch("mlp");
    let venv = std::env::var_os("KNLP_VENV").map(PathBuf::from).unwrap_or_else(|| root().join(".venv"));
    let py = venv.join("bin/python");
    assert!(py.exists(), "{} missing: `make setup` installs torch into .venv", py.display());
    let file = d.join("mlp.safetensors");
    let script = root().join("tests/scripts/mlp_oracle.rhai");
    let o = knlp(&d, &["run", script.to_str().unwrap(), file.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert!(o.status.success() && out.contains("saved"), "stdout:\n{out}\nstderr:\n{err}");
    let o = Command::new(&py).arg(root().join("tests/oracle/mlp_torch.py")).arg(&file).output().unwrap();
    let (out, err) = text(&o);
    eprintln!("{out}");
    assert!(o.status.success(), "torch disagrees:\n{out}\n{err}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn script_models_work_wherever_built_in_models_do() {
    let d = scratch("everywhere");
    let script = root().join("tests/scripts/script_models.rhai");
    let o = knlp(&d, &["run", script.to_str().unwrap(), d.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert!(o.status.success() && out.contains("script models: ok"), "stdout:\n{out}\nstderr:\n{err}");
    let _ = std::fs::remove_dir_all(&d);
}

/// Cells in child processes rebuild the script model from the script and
/// compute what the same cells compute in-process.
#[test]
fn script_models_in_matrix_child_processes() {
    let d = scratch("matrix-jobs");
    let script = r#"
import "nn" as nn;
let jobs = parse_int(ARGS[0]);
let images = fashion_mnist(#{ split: "test" }).slice(0, 128);
let res = matrix(#{ seed: [0, 1] }, #{ project: `p${jobs}`, jobs: jobs }, |c| {
    let b = model_builder(#{ arch: "mlp", classes: 10, seed: c.seed });
    let net = nn::mlp(b, "net", [784, 16, 10]);
    let m = b.build(|x| nn::apply(net, x.flatten(1)));
    train(m, sgd(m, #{ lr: 0.05 }), loader(images, #{ batch_size: 32, seed: 0 }), #{ steps: 4, progress: "off" })
});
for r in res { print(`${r.id} ${r.status} ${r.summary.train_loss}`); }
"#;
    std::fs::write(d.join("m.rhai"), script).unwrap();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let run = |jobs: &str| {
        let o = Command::new(KNLP)
            .current_dir(&d)
            .env("OMP_NUM_THREADS", (cores / 2).max(1).to_string())
            .env_remove("KNLP_MATRIX_CELL")
            .args(["run", "m.rhai", jobs])
            .output()
            .unwrap();
        let (out, err) = text(&o);
        assert!(o.status.success(), "jobs {jobs}\nstdout:\n{out}\nstderr:\n{err}");
        out.lines().filter(|l| l.starts_with("seed-")).map(String::from).collect::<Vec<_>>()
    };
    let one = run("1");
    let two = run("2");
    assert_eq!(one.len(), 2, "{one:?}");
    assert!(one.iter().all(|l| l.contains(" done ")), "{one:?}");
    assert_eq!(one, two, "in-process and child-process cells differ");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn stdlib_modules_behave_as_documented() {
    let d = scratch("stdlib");
    let script = root().join("tests/scripts/stdlib.rhai");
    let o = knlp(&d, &["run", script.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert!(o.status.success() && out.contains("stdlib: ok"), "stdout:\n{out}\nstderr:\n{err}");
    let _ = std::fs::remove_dir_all(&d);
}

/// PCA and spline-PCA image tokenizers from a script (issue 18): fit,
/// partial fit, codes, quality, tiers, files and errors on Fashion-MNIST.
#[test]
fn pca_tokenizers_from_scripts() {
    let d = scratch("tokenizer");
    let script = root().join("tests/scripts/tokenizer.rhai");
    let o = knlp(&d, &["run", script.to_str().unwrap(), d.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert!(o.status.success() && out.contains("tokenizer: ok"), "stdout:\n{out}\nstderr:\n{err}");
    let _ = std::fs::remove_dir_all(&d);
}

/// Every function of every stdlib module has a `///` comment and a line in
/// docs/stdlib.md.
#[test]
fn stdlib_functions_are_documented() {
    let doc = std::fs::read_to_string(root().join("docs/stdlib.md")).unwrap();
    let mut missing = Vec::new();
    for e in std::fs::read_dir(root().join("stdlib")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "rhai") {
            continue;
        }
        let module = p.file_stem().unwrap().to_string_lossy().to_string();
        let src = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = src.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            let Some(rest) = l.strip_prefix("fn ") else { continue };
            let name = rest.split('(').next().unwrap().trim();
            if i == 0 || !lines[i - 1].starts_with("///") {
                missing.push(format!("{module}::{name} has no /// comment"));
            }
            if !doc.contains(&format!("`{module}::{name}(")) {
                missing.push(format!("{module}::{name} is not in docs/stdlib.md"));
            }
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}
