//! `mla_decoupled` against an outside implementation: its weights loaded
//! into the plain PyTorch latent-attention GPT of
//! benchmarks/attention_decode_torch.py (tests/oracle/mla_torch.py, run in
//! `.venv`). The full forward, and greedy cached decoding (absorbed on both
//! sides: knlp's eager step, its static step, and the oracle's), agree.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use knlp::decode::{generate, GraphMode, Options};
use knlp::models::gpt2::{self, Gpt2};
use knlp::models::Model;
use tch::{Device, Kind, Tensor};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn mla_decoupled_matches_the_pytorch_oracle() {
    let _rng = crate::rng();
    let py = std::env::var_os("KNLP_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv"))
        .join("bin/python");
    assert!(py.exists(), "{} missing: `make setup` installs torch into .venv", py.display());
    let (l, h, d, r, vocab, ctx, p, n) = (2, 4, 64, 32, 97, 40, 12, 20);
    tch::manual_seed(11);
    let c = gpt2::Config {
        block_size: ctx,
        vocab_size: vocab,
        padded_vocab_size: Some(vocab),
        attention: "mla_decoupled".into(),
        d_latent: r,
        dropout: 0.0,
        ..gpt2::Config::custom(l, h, d)
    };
    let mut m = Gpt2::new(c).unwrap();
    m.store_mut().finalize(Device::Cpu).unwrap();
    // Weights far from the initialisation: attention is not uniform, and
    // every bias and norm matters.
    tch::no_grad(|| {
        for p in m.store().params() {
            let t = &p.tensor;
            let s = t.size();
            let new = if s.len() == 2 {
                Tensor::randn(s.as_slice(), (Kind::Float, Device::Cpu)) / (s[1] as f64).sqrt()
            } else {
                t + Tensor::randn(s.as_slice(), (Kind::Float, Device::Cpu)) * 0.1
            };
            t.shallow_clone().copy_(&new);
        }
    });
    let dir = std::env::temp_dir().join(format!("knlp-mla-oracle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let named: Vec<(String, Tensor)> =
        m.store().params().iter().map(|p| (p.name.clone(), p.tensor.detach())).collect();
    let refs: Vec<(String, &Tensor)> = named.iter().map(|(n, t)| (n.clone(), t)).collect();
    knlp::safetensors::save(
        &dir.join("w.safetensors"),
        &refs,
        &BTreeMap::new(),
        knlp::safetensors::Target::STRICT,
    )
    .unwrap();
    let cfg = format!(
        r#"{{"n_layer": {l}, "n_head": {h}, "n_embd": {d}, "d_latent": {r}, "vocab": {vocab}, "context": {ctx}, "prompt_len": {p}, "new_tokens": {n}}}"#
    );
    std::fs::write(dir.join("c.json"), cfg).unwrap();
    let o = Command::new(&py)
        .arg(root().join("tests/oracle/mla_torch.py"))
        .args([dir.join("w.safetensors"), dir.join("c.json"), dir.join("out.safetensors")])
        .output()
        .unwrap();
    assert!(o.status.success(), "oracle failed: {}", String::from_utf8_lossy(&o.stderr));
    let out = knlp::safetensors::load(&dir.join("out.safetensors")).unwrap().tensors;
    let _ = std::fs::remove_dir_all(&dir);
    let get = |k: &str| out.iter().find(|(n, _)| n == k).unwrap().1.shallow_clone();
    let diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);

    let tokens = get("tokens");
    let full = tch::no_grad(|| m.forward(&tokens, false)).unwrap();
    let df = diff(&full, &get("full"));
    assert!(df < 1e-4, "full forward: logits differ from the oracle by {df}");

    let prompt = tokens.narrow(1, 0, p);
    let want = get("generated");
    let steps = get("steps");
    for mode in [GraphMode::Off, GraphMode::StaticEager] {
        let o = Options { max_new_tokens: n, keep_logits: true, graph: mode, ..Options::default() };
        let g = generate(&m, &prompt, &o).unwrap();
        assert!(g.tokens.narrow(1, p, n).equal(&want), "{mode:?}: greedy tokens differ from the oracle's");
        for (i, lg) in g.logits.iter().enumerate() {
            let ds = diff(lg, &steps.get(i as i64));
            assert!(ds < 1e-4, "{mode:?} step {i}: logits differ from the oracle by {ds}");
        }
    }
}
