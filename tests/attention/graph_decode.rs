//! The CUDA-graphed decode step (`decode::graph`, docs/attention.md
//! "Graphed decode"): the static-shape step run eagerly gives the tokens and
//! logits of the eager cached decode and of full recomputation; without
//! CUDA a requested graph falls back with one warning. On a CUDA machine,
//! graph replay against the eager static step and the eager cached decode
//! (float32 and bf16 autocast); skipped with a message elsewhere.
use std::process::Command;

use knlp::attention::Rope;
use knlp::decode::{generate, GraphMode, Options};
use knlp::models::gpt2::{self, Gpt2};
use knlp::models::Model;
use knlp::shim::AutocastDtype;
use tch::{Device, Kind, Tensor};

// One lock for the whole test binary (tests/attention.rs): the generator
// is process-wide.
use crate::rng;

fn small(attention: &str, dev: Device) -> Gpt2 {
    small_rope(attention, None, dev)
}

fn small_rope(attention: &str, rope: Option<Rope>, dev: Device) -> Gpt2 {
    let c = gpt2::Config {
        block_size: 32,
        vocab_size: 61,
        attention: attention.into(),
        rope,
        d_latent: 24,
        ..gpt2::Config::custom(2, 4, 32)
    };
    let mut m = Gpt2::new(c).unwrap_or_else(|e| panic!("{attention}: {e}"));
    m.store_mut().finalize(dev).unwrap();
    m
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Tokens equal, and every step's logits within `tol`.
fn same(what: &str, a: &knlp::decode::Generated, b: &knlp::decode::Generated, tol: f64) {
    assert!(a.tokens.equal(&b.tokens), "{what}: tokens differ\n{}\n{}", a.tokens, b.tokens);
    assert_eq!(a.logits.len(), b.logits.len(), "{what}: logits kept");
    for (i, (x, y)) in a.logits.iter().zip(&b.logits).enumerate() {
        let d = max_diff(x, y);
        assert!(d <= tol, "{what}: step {i} logits differ by {d}");
    }
}

#[test]
fn static_step_matches_cached_decode_and_full_recomputation() {
    let _rng = rng();
    // The latent cases attend absorbed (`attention::absorb`).
    let cases = [
        ("mha", None),
        ("kv_tying", None),
        ("kv_tying_t", None),
        ("ra", None),
        ("mla_decoupled", None),
        ("mla", Some(Rope::Off)),
        ("mla_kvsplice", Some(Rope::Decoupled)),
    ];
    for (att, rope) in cases {
        tch::manual_seed(3);
        let m = small_rope(att, rope, Device::Cpu);
        assert!(m.static_unsupported().is_none(), "{att}: {:?}", m.static_unsupported());
        for b in [1, 3] {
            let prompt = Tensor::randint(61, [b, 5], (Kind::Int64, Device::Cpu));
            // Capacity 5 + 10 − 1 = 14: absorbed slots hold 16 rows, 2 of them padding.
            let o = Options { max_new_tokens: 10, keep_logits: true, ..Options::default() };
            let stat =
                generate(&m, &prompt, &Options { graph: GraphMode::StaticEager, ..o.clone() }).unwrap();
            let cached = generate(&m, &prompt, &Options { graph: GraphMode::Off, ..o.clone() }).unwrap();
            let full = generate(&m, &prompt, &Options { cache: false, ..o.clone() }).unwrap();
            let what = format!("{att} rope={rope:?} B={b}");
            assert!(!stat.graph && !cached.graph);
            assert_eq!(stat.tokens.size(), [b, 5 + 10]);
            assert_eq!(stat.logits.len(), 10);
            same(&format!("{what} static vs cached"), &stat, &cached, 1e-4);
            same(&format!("{what} static vs full"), &stat, &full, 1e-4);
            assert_eq!(stat.cache_bytes, cached.cache_bytes, "{what}: the same preallocated cache");
        }
    }
}

#[test]
fn static_step_refuses_what_it_cannot_run() {
    let _rng = rng();
    let prompt = Tensor::from_slice(&[1i64, 2, 3]).view([1, 3]);
    let st = Options { graph: GraphMode::StaticEager, max_new_tokens: 8, ..Options::default() };
    let e = generate(&small("mla", Device::Cpu), &prompt, &st).err().unwrap().to_string();
    assert!(e.contains("no static decode step") && e.contains("mla"), "{e}");
    let m = small("mha", Device::Cpu);
    let e = generate(&m, &prompt, &Options { temperature: 1.0, ..st.clone() }).err().unwrap().to_string();
    assert!(e.contains("temperature"), "{e}");
    let e = generate(&m, &prompt, &Options { cache: false, ..st }).err().unwrap().to_string();
    assert!(e.contains("cache: false"), "{e}");
    // The default on the CPU is eager; a requested graph falls back (stderr
    // is checked through the binary below).
    let o = Options { max_new_tokens: 8, ..Options::default() };
    let auto = generate(&m, &prompt, &o).unwrap();
    let on = generate(&m, &prompt, &Options { graph: GraphMode::On, ..o }).unwrap();
    assert!(!auto.graph && !on.graph);
    assert!(auto.tokens.equal(&on.tokens));
}

fn knlp_run(script: &str) -> std::process::Output {
    let dir = std::env::temp_dir().join(format!("knlp-graph-decode-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("g.rhai");
    std::fs::write(&path, script).unwrap();
    let out =
        Command::new(env!("CARGO_BIN_EXE_knlp")).arg("run").arg(&path).current_dir(&dir).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    out
}

#[test]
fn requested_graph_on_the_cpu_falls_back_with_one_warning() {
    let out = knlp_run(
        "let m = gpt2(#{ n_layer: 1, n_head: 2, n_embd: 16, block_size: 16, vocab_size: 31 });\n\
         let x = tensor([[1, 2, 3]]);\n\
         let r = m.generate(x, #{ max_new_tokens: 6, graph: true, details: true });\n\
         print(`graph=${r.graph} n=${r.tokens.shape[1]}`);\n\
         let r = m.generate(x, #{ max_new_tokens: 6, details: true });\n\
         print(`auto=${r.graph}`);\n\
         let r = m.generate(x, #{ max_new_tokens: 6, graph: false, details: true });\n\
         print(`off=${r.graph}`);\n",
    );
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{so}\n{se}");
    assert!(so.contains("graph=false n=9") && so.contains("auto=false") && so.contains("off=false"), "{so}");
    let warnings: Vec<&str> = se.lines().filter(|l| l.contains("graph: true ignored")).collect();
    assert_eq!(warnings.len(), 1, "one warning for the one explicit request:\n{se}");
    assert!(warnings[0].contains("not on a CUDA device"), "{}", warnings[0]);
}

#[test]
fn cuda_graph_replay_matches_eager_decoding() {
    if !tch::Cuda::is_available() {
        println!("cuda_graph_replay_matches_eager_decoding: skipped (no CUDA device)");
        return;
    }
    let _rng = rng();
    let dev = Device::Cuda(0);
    if !knlp::cudagraph::supported() {
        panic!("knlp was built without CUDA graph support on a CUDA machine");
    }
    for (att, b) in [("mha", 1), ("mha", 4), ("mla_decoupled", 1), ("mla_decoupled", 4)] {
        tch::manual_seed(7);
        let c = gpt2::Config {
            block_size: 256,
            vocab_size: 500,
            attention: att.into(),
            d_latent: 64,
            ..gpt2::Config::custom(3, 4, 128)
        };
        let mut m = Gpt2::new(c).unwrap();
        m.store_mut().finalize(dev).unwrap();
        let b = b as i64;
        let prompt = Tensor::randint(500, [b, 40], (Kind::Int64, dev));
        // float32: the replayed graph, the same step eagerly, the eager cached decode.
        let o = Options { max_new_tokens: 48, keep_logits: true, ..Options::default() };
        let graph = generate(&m, &prompt, &Options { graph: GraphMode::On, ..o.clone() }).unwrap();
        let stat = generate(&m, &prompt, &Options { graph: GraphMode::StaticEager, ..o.clone() }).unwrap();
        let eager = generate(&m, &prompt, &Options { graph: GraphMode::Off, ..o.clone() }).unwrap();
        let auto = generate(&m, &prompt, &o).unwrap();
        assert!(graph.graph && auto.graph && !stat.graph && !eager.graph, "{att} B={b}: graph flags");
        same(&format!("{att} B={b} fp32 graph vs static"), &graph, &stat, 1e-5);
        same(&format!("{att} B={b} fp32 graph vs eager"), &graph, &eager, 1e-4);
        // bf16 autocast: tokens may part at a near tie; logits agree up to there.
        let o = Options { amp: Some(AutocastDtype::BF16), ..o };
        let graph = generate(&m, &prompt, &Options { graph: GraphMode::On, ..o.clone() }).unwrap();
        let eager = generate(&m, &prompt, &Options { graph: GraphMode::Off, ..o.clone() }).unwrap();
        assert!(graph.graph);
        assert_eq!(graph.cache_elem, 2, "bf16 cache");
        let (gt, et) = (graph.tokens.to(Device::Cpu), eager.tokens.to(Device::Cpu));
        let mut compared = 0;
        for (i, (x, y)) in graph.logits.iter().zip(&eager.logits).enumerate() {
            let scale = y.abs().max().double_value(&[]).max(1.0);
            let d = max_diff(x, y);
            assert!(d <= 3e-2 * scale, "{att} B={b} bf16 step {i}: logits differ by {d} (scale {scale})");
            compared += 1;
            if !gt.narrow(1, 40 + i as i64, 1).equal(&et.narrow(1, 40 + i as i64, 1)) {
                break;
            }
        }
        println!("{att} B={b} bf16: {compared} steps compared");
        assert!(compared >= 1);
    }
}
