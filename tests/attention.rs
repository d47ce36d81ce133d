//! Attention variants (docs/attention.md): for every preset, causality,
//! cached decoding against full recomputation, a training step, checkpoint
//! round trip, gradients into every learned gate, cache sizes; parameter
//! counts at the 124M shape. CPU only.
use knlp::attention::spec::PRESETS;
use knlp::decode::{generate, Options};
use knlp::models::gpt2::{self, Gpt2};
use knlp::models::{cross_entropy, Model};
use knlp::optim::{OptConfig, OptKind, Optimizer};
use knlp::params::Role;
use tch::{Device, Kind, Tensor};

const CPU: Device = Device::Cpu;

/// libtorch's default generator is process-wide: tests that seed it run one
/// at a time so another test's draws cannot interleave.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rng() -> std::sync::MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

/// A small model of `attention` (2 layers so alternation has both kinds).
fn small(attention: &str, extra: impl FnOnce(&mut gpt2::Config)) -> Gpt2 {
    let mut c = gpt2::Config {
        block_size: 24,
        vocab_size: 61,
        attention: attention.into(),
        d_latent: 16,
        route_skip_warmup: true,
        ..gpt2::Config::custom(2, 4, 32)
    };
    extra(&mut c);
    let mut m = Gpt2::new(c).unwrap_or_else(|e| panic!("{attention}: {e}"));
    m.store_mut().finalize(CPU).unwrap();
    m
}

fn every_preset() -> Vec<&'static str> {
    PRESETS.iter().map(|p| p.0).collect()
}

fn tokens(b: i64, t: i64, vocab: i64) -> Tensor {
    Tensor::randint(vocab, [b, t], (Kind::Int64, CPU))
}

#[test]
fn parameter_counts_at_the_124m_shape() {
    let _rng = rng();
    // (attention, extra options, expected); vocab unpadded as the seed's MLA models.
    let cases: &[(&str, i64)] = &[
        ("mha", 124_439_808),
        ("mla", 117_364_992),
        // + per layer rope_qk (768 → 13·32): 12 × 319,904 = 3,838,848.
        ("mla_decoupled", 121_203_840),
        ("ra_mla", 112_646_412),
        ("mla_kvsplice", 113_438_976),
        ("ra_mla_kvsplice", 113_438_988),
        ("kv_tying", 117_352_704),
    ];
    for &(att, want) in cases {
        let c = gpt2::Config {
            preset: Some("124M".into()),
            attention: att.into(),
            vocab_size: 50257,
            padded_vocab_size: Some(50257),
            ..Default::default()
        };
        assert_eq!(c.num_params(false).unwrap(), want, "{att} (analytic)");
        let m = Gpt2::new(c).unwrap();
        assert_eq!(m.store().numel(), want, "{att} (built)");
    }
    // KV tying with GPT-2's padded vocabulary: the seed's 117,388,800.
    let c = gpt2::Config { preset: Some("124M".into()), attention: "kv_tying".into(), ..Default::default() };
    assert_eq!(c.num_params(false).unwrap(), 117_388_800);
    assert_eq!(Gpt2::new(c).unwrap().store().numel(), 117_388_800);
}

#[test]
fn analytic_counts_match_every_built_variant_and_option() {
    let _rng = rng();
    for att in every_preset() {
        for golden in [false, true] {
            let m = small(att, |c| c.golden_ratio = golden);
            assert_eq!(m.cfg().num_params(false).unwrap(), m.store().numel(), "{att} golden={golden}");
        }
    }
    let m = small("ra_mla_kvsplice", |c| {
        c.mlp = "splice".into();
        c.mlp_latent = 8;
        c.embed_latent = Some(12);
    });
    assert_eq!(m.cfg().num_params(false).unwrap(), m.store().numel());
    // RATIO: MLP hidden 5d for standard attention (3840 at d = 768).
    let c = gpt2::Config { preset: Some("124M".into()), golden_ratio: true, ..Default::default() };
    assert_eq!(c.mlp_hidden().unwrap(), 3840);
}

#[test]
fn every_variant_is_causal() {
    let _rng = rng();
    for att in every_preset() {
        tch::manual_seed(3);
        let m = small(att, |_| {});
        let x = tokens(2, 20, 61);
        for t in [0i64, 7, 18] {
            let y = x.copy();
            let tail = Tensor::randint(61, [2, 20 - t - 1], (Kind::Int64, CPU));
            y.narrow(1, t + 1, 20 - t - 1).copy_(&tail);
            for train in [false, true] {
                let a = tch::no_grad(|| m.forward(&x, train).unwrap()).narrow(1, 0, t + 1);
                let b = tch::no_grad(|| m.forward(&y, train).unwrap()).narrow(1, 0, t + 1);
                let _ = m.take_aux_loss();
                assert!(
                    a.equal(&b),
                    "{att}: logits at positions <= {t} changed with later tokens (train={train})"
                );
            }
        }
    }
}

/// Greedy decoding through the cache gives full recomputation's tokens,
/// with every step's logits within 1e-4; returns the cached run.
fn cached_matches_full(m: &Gpt2, prompt: &Tensor, new: i64, what: &str) -> knlp::decode::Generated {
    let o = Options { max_new_tokens: new, keep_logits: true, ..Options::default() };
    let cached = generate(m, prompt, &o).unwrap();
    let full = generate(m, prompt, &Options { cache: false, ..o.clone() }).unwrap();
    assert!(cached.tokens.equal(&full.tokens), "{what}: tokens differ");
    for (i, (a, b)) in cached.logits.iter().zip(&full.logits).enumerate() {
        let d = (a - b).abs().max().double_value(&[]);
        assert!(d <= 1e-4, "{what}: step {i} logits differ by {d}");
    }
    cached
}

#[test]
fn cached_greedy_decoding_matches_full_recomputation() {
    let _rng = rng();
    for att in every_preset() {
        for direction in [None, Some("reciprocal"), Some("alternate")] {
            if direction.is_some()
                && !matches!(att, "mha" | "ra_mla" | "kv_tying" | "kv_tying_t" | "mla_kvsplice")
            {
                continue;
            }
            tch::manual_seed(5);
            // ra_route decodes in its warm-up phase here (small() starts it routing elsewhere).
            let m = small(att, |c| {
                c.direction = direction.map(String::from);
                c.route_skip_warmup = direction.is_some();
            });
            let what = format!("{att} direction={direction:?}");
            let cached = cached_matches_full(&m, &tokens(3, 5, 61), 12, &what);
            // The cache holds exactly what the variant claims, preallocated once.
            assert_eq!(cached.cache_tokens, 5 + 12 - 1);
            let rows = m.cache_rows(cached.cache_tokens).unwrap();
            assert_eq!(cached.cache_bytes, m.kv_cache_bytes(3, rows, 4).unwrap(), "{what}");
        }
    }
}

#[test]
fn absorbed_latent_decoding_matches_expanded_attention() {
    use knlp::attention::Rope;
    let _rng = rng();
    // Axis combinations beyond the presets whose decode steps attend
    // absorbed: no RoPE, and the decoupled key with KVSplice and a token
    // latent's query. Full recomputation expands K and V.
    // mla and mla_decoupled decode on folded weights (`absorb::Folded`),
    // with and without biases; the others through `absorb::Fold`.
    let cases = [
        ("mla", Rope::Off, true),
        ("mla", Rope::Decoupled, false),
        ("mla_kvsplice", Rope::Decoupled, true),
        ("ra_mla", Rope::Off, true),
    ];
    for (att, rope, bias) in cases {
        tch::manual_seed(8);
        let m = small(att, |c| {
            c.rope = Some(rope);
            c.bias = bias;
            c.direction = (att == "ra_mla").then(|| "standard".into());
        });
        assert!(m.spec().absorbable(), "{att} {rope:?}");
        let what = format!("{att} rope={rope:?} bias={bias}");
        let cached = cached_matches_full(&m, &tokens(2, 4, 61), 10, &what);
        // The slot holds 4 + 10 − 1 = 13 tokens in 16 rows.
        let rows = m.cache_rows(cached.cache_tokens).unwrap();
        assert_eq!((cached.cache_tokens, rows), (13, 16));
        assert_eq!(cached.cache_bytes, m.kv_cache_bytes(2, rows, 4).unwrap(), "{what}");
    }
    // The decoupled cache row: latent plus a rotated key of hs/2 per token
    // and layer; slots allocate whole multiples of 16 rows.
    let m = small("mla_decoupled", |_| {});
    assert_eq!(m.kv_cache_bytes(1, 10, 4).unwrap(), 2 * 10 * (16 + 4) * 4);
    assert_eq!((m.cache_rows(10).unwrap(), m.cache_rows(17).unwrap()), (16, 32));
    assert_eq!(small("mha", |_| {}).cache_rows(17).unwrap(), 17);
    let e = Gpt2::new(gpt2::Config { attention: "mla_decoupled".into(), ..gpt2::Config::custom(2, 4, 24) })
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("divisible by 4"), "{e}");
}

#[test]
fn routing_phase_decodes_through_the_cache_too() {
    let _rng = rng();
    tch::manual_seed(6);
    let m = small("ra_route", |c| c.route_skip_warmup = true);
    let prompt = tokens(2, 4, 61);
    let o = Options { max_new_tokens: 10, keep_logits: true, ..Options::default() };
    let cached = generate(&m, &prompt, &o).unwrap();
    let full = generate(&m, &prompt, &Options { cache: false, ..o.clone() }).unwrap();
    assert!(cached.tokens.equal(&full.tokens));
    for (a, b) in cached.logits.iter().zip(&full.logits) {
        assert!((a - b).abs().max().double_value(&[]) <= 1e-4);
    }
    assert_eq!(cached.cache_bytes, m.kv_cache_bytes(2, cached.cache_tokens, 4).unwrap());
    // The router's statistics are reported in both phases.
    let met = m.attention_metrics(Some(&prompt), false).unwrap();
    assert!(met.contains_key("route/p_ra") && met.contains_key("kv_cache/bytes_per_sequence"));
    let w = small("ra_route", |c| c.route_skip_warmup = false);
    assert!(w.attention_metrics(Some(&prompt), false).unwrap().contains_key("route/ra_token_pct"));
}

#[test]
fn generate_refuses_bad_prompts_and_counts() {
    let _rng = rng();
    let m = small("mha", |_| {});
    let bad = |p: &Tensor, n: i64| {
        generate(&m, p, &Options { max_new_tokens: n, ..Options::default() }).err().unwrap().to_string()
    };
    assert!(bad(&Tensor::from_slice(&[1.5f32, 2.0]).view([1, 2]), 3).contains("integer ids"));
    assert!(bad(&Tensor::from_slice(&[1i64, 61]).view([1, 2]), 3).contains("[0, 61)"));
    assert!(bad(&Tensor::from_slice(&[-1i64, 3]).view([1, 2]), 3).contains("[0, 61)"));
    assert!(bad(&Tensor::from_slice(&[1i64, 2]), 3).contains("[B, T]"));
    assert!(bad(&tokens(1, 2, 61), 0).contains("max_new_tokens"));
    assert!(bad(&tokens(1, 2, 61), i64::MAX).contains("max_new_tokens"));
    // prompt + new − 1 tokens fill a block exactly.
    assert!(generate(&m, &tokens(1, 5, 61), &Options { max_new_tokens: 20, ..Options::default() }).is_ok());
    assert!(m.kv_cache_bytes(-1, 4, 4).is_err());
    assert!(m.kv_cache_bytes(1 << 40, 1 << 40, 4).unwrap_err().to_string().contains("overflow"));
}

#[test]
fn chunked_prefill_through_the_cache_matches_one_forward() {
    let _rng = rng();
    for att in ["mha", "ra_mla", "mla_kvsplice", "sba", "ra_route", "kv_tying"] {
        tch::manual_seed(9);
        let m = small(att, |c| c.direction = if att == "mha" { Some("alternate".into()) } else { None });
        let x = tokens(2, 14, 61);
        let full = tch::no_grad(|| m.forward(&x, false).unwrap());
        let mut cache = m.new_cache(2, 14).unwrap();
        let mut parts = Vec::new();
        for (from, n) in [(0, 6), (6, 1), (7, 5), (12, 2)] {
            parts.push(tch::no_grad(|| m.forward_cached(&x.narrow(1, from, n), &mut cache).unwrap()));
        }
        let chunked = Tensor::cat(&parts, 1);
        let d = (chunked - full).abs().max().double_value(&[]);
        assert!(d <= 1e-4, "{att}: chunked cache forward differs by {d}");
    }
}

#[test]
fn sampling_is_seeded_and_respects_top_k() {
    let _rng = rng();
    let m = small("mla", |_| {});
    let p = tokens(2, 3, 61);
    let o =
        Options { max_new_tokens: 10, temperature: 1.0, top_k: Some(1), seed: Some(1), ..Options::default() };
    let greedy = generate(&m, &p, &Options { max_new_tokens: 10, ..Options::default() }).unwrap();
    assert!(generate(&m, &p, &o).unwrap().tokens.equal(&greedy.tokens), "top_k 1 is greedy");
    let o = Options { top_k: None, temperature: 2.0, ..o };
    let a = generate(&m, &p, &o).unwrap().tokens;
    assert!(a.equal(&generate(&m, &p, &o).unwrap().tokens), "same seed, same tokens");
    assert!(a.max().int64_value(&[]) < 61, "never a padded vocabulary id");
    let e = generate(&m, &p, &Options { max_new_tokens: 30, ..Options::default() }).err().unwrap();
    assert!(e.to_string().contains("exceeds block_size 24"), "{e}");
}

/// Loss on a fixed batch, with the model's auxiliary terms in the objective.
fn objective(m: &Gpt2, x: &Tensor, y: &Tensor) -> (Tensor, f64) {
    let logits = m.forward(x, true).unwrap();
    let ce = cross_entropy(&logits, y).unwrap();
    let v = ce.double_value(&[]);
    let obj = match m.take_aux_loss() {
        Some(a) => ce + a,
        None => ce,
    };
    (obj, v)
}

#[test]
fn a_training_step_lowers_the_loss_and_every_gate_learns() {
    let _rng = rng();
    for att in every_preset() {
        tch::manual_seed(11);
        let m = small(att, |c| c.mlp = if att == "sba" { "splice".into() } else { "gelu".into() });
        let x = tokens(4, 16, 61);
        let y = tokens(4, 16, 61);
        let (obj, before) = objective(&m, &x, &y);
        obj.backward();
        // Every gate-role parameter (direction logits, SBA alpha, KVSplice
        // scale, ...) and every router weight gets a gradient.
        for p in m.store().params() {
            let gated = p.role == Role::Gate || p.name.contains("router");
            if gated {
                let g = p.tensor.grad().abs().sum(Kind::Float).double_value(&[]);
                assert!(g > 0.0, "{att}: no gradient reaches {}", p.name);
            }
        }
        m.store().zero_grad().unwrap();
        let cfg = OptConfig { lr: 3e-3, ..OptConfig::for_kind(OptKind::AdamW) };
        let mut opt = Optimizer::new(m.store(), cfg).unwrap();
        for _ in 0..8 {
            let (obj, _) = objective(&m, &x, &y);
            obj.backward();
            opt.step(m.store()).unwrap();
            m.store().zero_grad().unwrap();
        }
        let (_, after) = objective(&m, &x, &y);
        assert!(after < before - 0.05, "{att}: loss {before} -> {after}");
    }
}

#[test]
fn learned_direction_forward_is_the_hard_choice_and_balance_loss_is_added() {
    let _rng = rng();
    tch::manual_seed(2);
    let m = small("ra", |c| c.ra_balance_weight = 0.5);
    let x = tokens(2, 10, 61);
    let train = tch::no_grad(|| m.forward(&x, true).unwrap());
    let aux = m.take_aux_loss().expect("the balance loss joins the objective");
    let eval = tch::no_grad(|| m.forward(&x, false).unwrap());
    let d = (train - eval).abs().max().double_value(&[]);
    assert!(d < 1e-5, "straight-through forward equals the hard direction ({d})");
    // Logits ±1 alternate: Σσ = L/2, balance 0. Push one gate and it is not.
    assert!(aux.double_value(&[]).abs() < 1e-10);
    let mut g = m.store().get("transformer.alternation_logits").unwrap().tensor.shallow_clone();
    let _ = tch::no_grad(|| g.fill_(2.0));
    let _ = tch::no_grad(|| m.forward(&x, true).unwrap());
    let p = 1.0 / (1.0 + (-2.0f64).exp());
    let want = 0.5 * (2.0 * p - 1.0).powi(2);
    assert!((m.take_aux_loss().unwrap().double_value(&[]) - want).abs() < 1e-6);
    // A reciprocal layer attends softmax(k_i·q_j): its pattern is not the standard one.
    assert_eq!(m.direction_probs().unwrap().unwrap().len(), 2);
}

#[test]
fn checkpoints_round_trip_every_variant() {
    let _rng = rng();
    let dir = std::env::temp_dir().join(format!("knlp-attn-ck-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for att in every_preset() {
        tch::manual_seed(4);
        let a = small(att, |_| {});
        let path = dir.join(format!("{att}.safetensors"));
        let named = a.store().named_tensors();
        let refs: Vec<(String, &Tensor)> = named.iter().map(|(n, t)| (n.clone(), t)).collect();
        knlp::safetensors::save(&path, &refs, &Default::default(), knlp::safetensors::Target::OWNED).unwrap();
        tch::manual_seed(99);
        let b = small(att, |_| {});
        let loaded = knlp::safetensors::load(&path).unwrap();
        b.store().load_named(&loaded.tensors, "ck").unwrap();
        let x = tokens(2, 9, 61);
        let (la, lb) = tch::no_grad(|| (a.forward(&x, false).unwrap(), b.forward(&x, false).unwrap()));
        assert!(la.equal(&lb), "{att}: reloaded model differs");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn mha_is_nanogpt_attention() {
    let _rng = rng();
    // The default keeps GPT-2's numerics: compare one layer with explicit math.
    tch::manual_seed(7);
    let m = small("mha", |c| c.n_layer = Some(1));
    let x = tokens(2, 11, 61);
    let p = |n: &str| m.store().get(n).unwrap().tensor.shallow_clone();
    let h = p("transformer.wte.weight").index_select(0, &x.view([-1])).view([2, 11, 32])
        + p("transformer.wpe.weight").narrow(0, 0, 11);
    let ln = |z: &Tensor, pre: &str| {
        z.layer_norm([32], Some(&p(&format!("{pre}.weight"))), Some(&p(&format!("{pre}.bias"))), 1e-5, false)
    };
    let a = ln(&h, "transformer.h.0.ln_1")
        .linear(&p("transformer.h.0.attn.c_attn.weight"), Some(&p("transformer.h.0.attn.c_attn.bias")));
    let qkv = a.split(32, 2);
    let heads = |t: &Tensor| t.view([2, 11, 4, 8]).transpose(1, 2);
    let (q, k, v) = (heads(&qkv[0]), heads(&qkv[1]), heads(&qkv[2]));
    let s = q.matmul(&k.transpose(-2, -1)) / 8f64.sqrt();
    let mask = Tensor::ones([11, 11], (Kind::Bool, CPU)).triu(1);
    let att = s.masked_fill(&mask, f64::NEG_INFINITY).softmax(-1, Kind::Float).matmul(&v);
    let y = att.transpose(1, 2).contiguous().view([2, 11, 32]);
    let h =
        &h + y.linear(&p("transformer.h.0.attn.c_proj.weight"), Some(&p("transformer.h.0.attn.c_proj.bias")));
    let f = ln(&h, "transformer.h.0.ln_2")
        .linear(&p("transformer.h.0.mlp.c_fc.weight"), Some(&p("transformer.h.0.mlp.c_fc.bias")))
        .gelu("none");
    let h =
        &h + f.linear(&p("transformer.h.0.mlp.c_proj.weight"), Some(&p("transformer.h.0.mlp.c_proj.bias")));
    let logits = ln(&h, "transformer.ln_f").linear::<Tensor>(&p("transformer.wte.weight"), None);
    let got = tch::no_grad(|| m.forward(&x, false).unwrap());
    let d = (got - logits).abs().max().double_value(&[]);
    assert!(d < 1e-4, "mha differs from nanoGPT's math by {d}");
}

#[test]
fn attention_patterns_fisher_and_variant_metrics() {
    let _rng = rng();
    tch::manual_seed(8);
    let m = small("ra_mla_kvsplice", |c| c.fisher_metrics = true);
    let x = tokens(2, 12, 61);
    let pr = m.probe(&x, &[0, 1]).unwrap();
    assert_eq!(pr.patterns.len(), 2);
    for (l, p) in &pr.patterns {
        assert_eq!(p.size(), vec![2, 4, 12, 12]);
        let rows = p.sum_dim_intlist(-1, false, Kind::Float);
        assert!(rows.allclose(&Tensor::ones_like(&rows), 1e-5, 1e-5, false), "layer {l}: rows sum to 1");
        assert_eq!(p.triu(1).abs().sum(Kind::Float).double_value(&[]), 0.0, "layer {l}: causal");
    }
    let met = m.attention_metrics(Some(&x), true).unwrap();
    for k in [
        "ra/alternation_balance",
        "kvsplice/avg_reconstruction_error",
        "kvsplice/d_compressed",
        "fisher/layer0/eigmax_mean",
        "fisher/layer1/head3/energy_r8",
    ] {
        assert!(met.contains_key(k), "missing {k}: {:?}", met.keys().collect::<Vec<_>>());
    }
    assert_eq!(met["kvsplice/d_compressed"], 8);
    let sba = small("sba", |_| {});
    let met = sba.attention_metrics(None, false).unwrap();
    assert!((met["sba/alpha_mean"].as_f64().unwrap() - 0.5).abs() < 1e-6);
}

#[test]
fn route_warm_up_switches_on_a_loss_drop_and_survives_a_reload() {
    let _rng = rng();
    let mut m = small("ra_route", |c| c.route_skip_warmup = false);
    let eval = |l: f64| serde_json::json!({ "val_loss": l }).as_object().unwrap().clone();
    assert_eq!(m.on_eval(&eval(4.0), None).unwrap()["route/phase"], 0.0);
    assert_eq!(m.on_eval(&eval(3.9), None).unwrap()["route/phase"], 0.0, "2.5% drop is not 5%");
    let out = m.on_eval(&eval(3.7), None).unwrap();
    assert_eq!(out["route/switched"], 1);
    // The phase lives in a buffer, so checkpoints carry it.
    let st = m.store().named_tensors().into_iter().find(|(n, _)| n == "transformer.route_state").unwrap().1;
    assert_eq!(st.double_value(&[0]), 1.0);
}

#[test]
fn bad_options_are_named() {
    let _rng = rng();
    for (opts, want) in [
        (serde_json::json!({ "attention": "flash" }), "unknown attention 'flash'"),
        (serde_json::json!({ "attention": "mla", "direction": "learned" }), "q: \"latent\""),
        (serde_json::json!({ "attention": "mla", "splice_ratio": 0.0 }), "splice_ratio"),
        (serde_json::json!({ "attention": "mla", "n_embd": 36, "n_head": 4 }), "even head size"),
        (serde_json::json!({ "mlp": "swiglu" }), "unknown mlp 'swiglu'"),
        (serde_json::json!({ "attention": "ra_route", "n_head": 1, "n_embd": 8 }), "at least 2 heads"),
    ] {
        let e = knlp::models::build("gpt2", opts.clone()).err().unwrap_or_else(|| panic!("{opts} built"));
        assert!(e.to_string().contains(want), "{opts}: {e}");
    }
}

// The CUDA-graphed decode step; a module here so it shares this test binary.
#[path = "attention/graph_decode.rs"]
mod graph_decode;
#[path = "attention/mla_oracle.rs"]
mod mla_oracle;
