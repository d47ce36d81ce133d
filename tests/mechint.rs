//! Interpretability: hook points, caches, weight processing and patching,
//! against Hugging Face transformers as the oracle (tests/oracle/hf_gpt2.py
//! builds small random GPT-2s in `.venv`; no network).
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};

use knlp::mechint::{cache::ActivationCache, detect, lens, patching, weights, FnHooks, Recorder};
use knlp::models::gpt2::{Config, Gpt2};
use knlp::models::{gpt2_hf, Model};
use tch::{Device, Kind, Tensor};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> PathBuf {
    let venv = std::env::var_os("KNLP_VENV").map(PathBuf::from).unwrap_or_else(|| root().join(".venv"));
    let py = venv.join("bin/python");
    assert!(py.exists(), "{} missing: `make setup` installs transformers into .venv", py.display());
    py
}

/// libtorch's global generator is shared: tests that seed it run one at a time.
fn rng() -> MutexGuard<'static, ()> {
    static M: Mutex<()> = Mutex::new(());
    M.lock().unwrap_or_else(|e| e.into_inner())
}

/// The oracle's folders and expected outputs, made once per test process.
fn oracle() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("knlp-hf-oracle-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let o = Command::new(python())
            .arg(root().join("tests/oracle/hf_gpt2.py"))
            .arg("make")
            .arg(&d)
            .output()
            .unwrap();
        assert!(o.status.success(), "oracle failed: {}", String::from_utf8_lossy(&o.stderr));
        d
    })
}

fn expected(name: &str) -> Tensor {
    let e = knlp::safetensors::load(&oracle().join("expected.safetensors")).unwrap().tensors;
    e.into_iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no {name}")).1
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

fn load(name: &str) -> Gpt2 {
    gpt2_hf::load_hf(&oracle().join(name), Device::Cpu).unwrap()
}

fn cache_of(m: &dyn Model, tokens: &Tensor) -> (Tensor, ActivationCache) {
    lens::run_with_cache(m, tokens, &|_| true, None, None).unwrap()
}

#[test]
fn hf_import_matches_transformers() {
    let tokens = expected("tokens");
    for name in ["gelu_new", "gelu_untied"] {
        let m = load(name);
        let logits = tch::no_grad(|| m.forward(&tokens, false)).unwrap();
        assert_eq!(logits.size(), [2, 16, 97], "logits have the config's vocabulary, no padding");
        let d = max_diff(&logits, &expected(&format!("{name}.logits")));
        assert!(d < 1e-4, "{name}: logits differ by {d}");
        let (cached_logits, c) = cache_of(&m, &tokens);
        assert!(max_diff(&cached_logits, &logits) < 1e-5, "{name}: the explicit pattern path changes logits");
        for i in 0..2 {
            let d = max_diff(
                c.get(&format!("blocks.{i}.hook_resid_pre")).unwrap(),
                &expected(&format!("{name}.hidden.{i}")),
            );
            assert!(d < 1e-4, "{name}: hook_resid_pre {i} differs by {d}");
            let d = max_diff(
                c.get(&format!("blocks.{i}.attn.hook_pattern")).unwrap(),
                &expected(&format!("{name}.attn.{i}")),
            );
            assert!(d < 1e-4, "{name}: hook_pattern {i} differs by {d}");
        }
        // transformers' last hidden state is after ln_f.
        let d = max_diff(c.get("ln_final.hook_normalized").unwrap(), &expected(&format!("{name}.hidden.2")));
        assert!(d < 1e-4, "{name}: ln_final.hook_normalized differs by {d}");
        // Zeroing head 2 of layer 1 at hook_z, as the oracle did before c_proj.
        let mut h = FnHooks::new();
        h.add("blocks.1.attn.hook_z", |_, z| {
            let out = z.copy();
            let _ = out.narrow(2, 2, 1).zero_();
            Ok(Some(out))
        });
        let ablated = tch::no_grad(|| m.forward_hooked(&tokens, false, Some(&h))).unwrap();
        let d = max_diff(&ablated, &expected(&format!("{name}.ablated")));
        assert!(d < 1e-4, "{name}: head ablation differs by {d}");
        assert!(max_diff(&ablated, &logits) > 1e-3, "{name}: the ablation changed nothing");
    }
}

#[test]
fn save_hf_round_trips_through_transformers() {
    let _g = rng();
    tch::manual_seed(7);
    let cfg = Config {
        n_layer: Some(2),
        n_head: Some(2),
        n_embd: Some(16),
        block_size: 16,
        vocab_size: 50,
        padded_vocab_size: Some(50),
        activation: "gelu_new".into(),
        ..Config::default()
    };
    let mut m = Gpt2::new(cfg.clone()).unwrap();
    m.store_mut().finalize(Device::Cpu).unwrap();
    let dir = std::env::temp_dir().join(format!("knlp-save-hf-{}", std::process::id()));
    gpt2_hf::save_hf(&m, &dir).unwrap();
    let tokens = Tensor::randint(50, [2, 10], (Kind::Int64, Device::Cpu));
    let tok_file = dir.join("tokens.safetensors");
    knlp::safetensors::save(
        &tok_file,
        &[("tokens".into(), &tokens)],
        &Default::default(),
        knlp::safetensors::Target::OWNED,
    )
    .unwrap();
    let out = dir.join("logits.safetensors");
    let o = Command::new(python())
        .arg(root().join("tests/oracle/hf_gpt2.py"))
        .args(["run".as_ref(), dir.as_os_str(), tok_file.as_os_str(), out.as_os_str()])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "transformers could not load save_hf's folder: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let theirs = knlp::safetensors::load(&out).unwrap().tensors.remove(0).1;
    let ours = tch::no_grad(|| m.forward(&tokens, false)).unwrap();
    let d = max_diff(&ours, &theirs);
    assert!(d < 1e-4, "logits after save_hf differ by {d}");
    // And back: the folder loads into the same model.
    let back = gpt2_hf::load_hf(&dir, Device::Cpu).unwrap();
    assert!(max_diff(&tch::no_grad(|| back.forward(&tokens, false)).unwrap(), &ours) < 1e-6);
    // A padded vocabulary has no Hugging Face layout.
    let mut padded = Gpt2::new(Config { padded_vocab_size: None, ..cfg }).unwrap();
    padded.store_mut().finalize(Device::Cpu).unwrap();
    let e = gpt2_hf::save_hf(&padded, &dir.join("padded")).unwrap_err().to_string();
    assert!(e.contains("padded"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_hf_folders_are_clear_errors() {
    let d = std::env::temp_dir().join(format!("knlp-bad-hf-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let err = |d: &Path| format!("{:#}", gpt2_hf::load_hf(d, Device::Cpu).err().expect("should fail"));
    assert!(err(&d).contains("config.json"), "{}", err(&d));
    std::fs::write(d.join("config.json"), "{ not json").unwrap();
    assert!(err(&d).contains("not valid JSON"), "{}", err(&d));
    let src = oracle().join("gelu_new");
    let cfg = std::fs::read_to_string(src.join("config.json")).unwrap();
    std::fs::write(
        d.join("config.json"),
        cfg.replace("\"scale_attn_weights\": true", "\"scale_attn_weights\": false"),
    )
    .unwrap();
    assert!(err(&d).contains("scale_attn_weights"), "{}", err(&d));
    std::fs::write(d.join("config.json"), &cfg).unwrap();
    assert!(err(&d).contains("model.safetensors"), "{}", err(&d));
    // A renamed tensor is named in the error (strict load).
    let mut t = knlp::safetensors::load(&src.join("model.safetensors")).unwrap().tensors;
    t[0].0 = "transformer.h.0.attn.c_attn.wrong".into();
    let refs: Vec<(String, &Tensor)> = t.iter().map(|(n, x)| (n.clone(), x)).collect();
    knlp::safetensors::save(
        &d.join("model.safetensors"),
        &refs,
        &Default::default(),
        knlp::safetensors::Target::OWNED,
    )
    .unwrap();
    assert!(err(&d).contains("c_attn.wrong"), "{}", err(&d));
    std::fs::write(d.join("model.safetensors"), b"garbage").unwrap();
    assert!(err(&d).contains("model.safetensors"), "{}", err(&d));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn weight_processing_leaves_outputs_unchanged() {
    let tokens = expected("tokens");
    for name in ["gelu_new", "gelu_untied"] {
        let m = load(name);
        let base = tch::no_grad(|| m.forward(&tokens, false)).unwrap();
        let lp = |t: &Tensor| t.log_softmax(-1, Kind::Float);
        let run = |p: weights::Process| {
            let q = weights::process(&m, p).unwrap();
            tch::no_grad(|| q.forward(&tokens, false)).unwrap()
        };
        let fold = weights::Process { fold_ln: true, ..Default::default() };
        let d = max_diff(&run(fold), &base);
        assert!(d < 1e-4, "{name}: fold_ln changed logits by {d}");
        let cw = weights::Process { center_writing_weights: true, ..Default::default() };
        let d = max_diff(&run(cw), &base);
        assert!(d < 1e-4, "{name}: center_writing_weights changed logits by {d}");
        let cu = weights::Process { center_unembed: true, ..Default::default() };
        let shifted = run(cu);
        assert!(max_diff(&lp(&shifted), &lp(&base)) < 1e-4, "{name}: center_unembed changed log-probs");
        assert!(max_diff(&shifted, &base) > 1e-4, "{name}: center_unembed should shift logits by a constant");
        let all = weights::Process { fold_ln: true, center_writing_weights: true, center_unembed: true };
        let d = max_diff(&lp(&run(all)), &lp(&base));
        assert!(d < 1e-4, "{name}: all three changed log-probs by {d}");
        // Folded norms are pure normalisation; the original is untouched.
        let q = weights::process(&m, fold).unwrap();
        let w = &q.store().get("transformer.h.0.ln_1.weight").unwrap().tensor;
        assert!(max_diff(w, &w.ones_like()) == 0.0);
        assert!(max_diff(&tch::no_grad(|| m.forward(&tokens, false)).unwrap(), &base) == 0.0);
    }
}

#[test]
fn hook_names_shapes_and_replacement() {
    let m = load("gelu_new");
    let tokens = expected("tokens");
    let names = m.hook_names();
    assert_eq!(names.len(), 2 + 2 * 17 + 2, "{names:?}");
    let (_, c) = cache_of(&m, &tokens);
    assert_eq!(c.keys(), names, "the cache holds every hook point in forward order");
    let shape = |n: &str| c.get(n).unwrap().size();
    assert_eq!(shape("hook_embed"), [2, 16, 32]);
    assert_eq!(shape("hook_pos_embed"), [2, 16, 32]);
    assert_eq!(shape("blocks.0.attn.hook_q"), [2, 16, 4, 8]);
    assert_eq!(shape("blocks.0.attn.hook_z"), [2, 16, 4, 8]);
    assert_eq!(shape("blocks.0.attn.hook_attn_scores"), [2, 4, 16, 16]);
    assert_eq!(shape("blocks.0.ln1.hook_scale"), [2, 16, 1]);
    assert_eq!(shape("blocks.1.mlp.hook_pre"), [2, 16, 128]);
    // Scores are masked with -inf above the diagonal; patterns rows sum to 1.
    let s = c.get("blocks.0.attn.hook_attn_scores").unwrap();
    assert!(s.double_value(&[0, 0, 0, 1]).is_infinite());
    let p = c.get("blocks.1.attn.hook_pattern").unwrap();
    assert!(
        max_diff(
            &p.sum_dim_intlist(-1, false, Kind::Float),
            &Tensor::ones([2, 4, 16], (Kind::Float, Device::Cpu))
        ) < 1e-5
    );
    // A replacement of the wrong shape names the hook.
    let mut h = FnHooks::new();
    h.add("blocks.0.hook_resid_mid", |_, x| Ok(Some(x.narrow(1, 0, 3))));
    let e = m.forward_hooked(&tokens, false, Some(&h)).unwrap_err().to_string();
    assert!(e.contains("blocks.0.hook_resid_mid"), "{e}");
    // Replacing resid_pre of block 1 with block 0's changes what follows.
    let r0 = c.get("blocks.0.hook_resid_pre").unwrap().shallow_clone();
    let mut h = FnHooks::new();
    h.add("blocks.1.hook_resid_pre", move |_, _| Ok(Some(r0.shallow_clone())));
    let rec = Recorder::new(|n| n == "blocks.1.hook_resid_pre", None);
    let chain = knlp::mechint::Chain(vec![&h, &rec]);
    let _ = tch::no_grad(|| m.forward_hooked(&tokens, false, Some(&chain))).unwrap();
    assert!(max_diff(&rec.take()[0].1, c.get("blocks.0.hook_resid_pre").unwrap()) == 0.0);
}

#[test]
fn cache_analyses_add_up() {
    let m = weights::process(&load("gelu_new"), weights::Process { fold_ln: true, ..Default::default() })
        .unwrap();
    let tokens = expected("tokens");
    let (logits, c) = cache_of(&m, &tokens);
    let last = c.get("blocks.1.hook_resid_post").unwrap();
    let dec = c.decompose_resid(&m, -1, false, true).unwrap();
    assert_eq!(dec.labels, ["embed", "pos_embed", "0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out"]);
    assert!(max_diff(&dec.tensor.sum_dim_intlist(0, false, Kind::Float), last) < 1e-4);
    let acc = c.accumulated_resid(&m, -1, false).unwrap();
    assert_eq!(acc.labels, ["0_pre", "1_pre", "final_post"]);
    assert!(max_diff(&acc.tensor.get(2), last) == 0.0);
    // Head results of layer 1 plus the output bias are its attention output.
    let heads = c.stack_head_results(&m, 2).unwrap();
    assert_eq!(heads.tensor.size(), [8, 2, 16, 32]);
    assert_eq!(heads.labels[5], "L1H1");
    let b_o = &m.store().get("transformer.h.1.attn.c_proj.bias").unwrap().tensor;
    let l1 = heads.tensor.narrow(0, 4, 4).sum_dim_intlist(0, false, Kind::Float) + b_o;
    assert!(max_diff(&l1, c.get("blocks.1.hook_attn_out").unwrap()) < 1e-4);
    // With ln_f folded, the components' logit attributions plus b_U are the logits.
    let pos = 9;
    let stack = c.apply_ln_to_stack(&m, &dec.tensor.select(2, pos), -1, false, Some(pos)).unwrap();
    let answer = tokens.select(1, pos);
    let attrs = ActivationCache::logit_attrs(&m, &stack, &answer, None).unwrap();
    let b_u = m.store().get("lm_head.bias").unwrap().tensor.index_select(0, &answer);
    let total = attrs.sum_dim_intlist(0, false, Kind::Float) + &b_u;
    let want = logits.select(1, pos).gather(1, &answer.unsqueeze(1), false).squeeze_dim(1);
    assert!(max_diff(&total, &want) < 1e-4, "attributions do not add up to the logits");
    // Bad arguments are errors, not panics.
    assert!(c.accumulated_resid(&m, 7, false).is_err());
    assert!(ActivationCache::logit_attrs(&m, &stack, &Tensor::from(500i64), None).is_err());
    let dla = lens::direct_logit_attr(&m, &tokens, &answer, None, pos, None).unwrap();
    assert_eq!(dla.heads.size(), [2, 4, 2]);
    let lensed = lens::logit_lens(&m, &tokens, None).unwrap();
    assert_eq!(lensed.size(), [3, 2, 16, 97]);
    assert!(
        max_diff(&lensed.get(2), &logits.log_softmax(-1, Kind::Float)) < 1e-4,
        "the lens's last layer is the model"
    );
}

#[test]
fn patching_recovers_the_clean_run() {
    let m = load("gelu_new");
    // Random-init weights (std 0.02) barely mix positions; larger ones do.
    for p in m.store().params() {
        if p.tensor.dim() == 2 {
            let mut t = p.tensor.shallow_clone();
            let _ = tch::no_grad(|| t.f_mul_scalar_(8.0)).unwrap();
        }
    }
    let clean = expected("tokens").narrow(0, 0, 1);
    let corrupted = clean.copy();
    let _ = corrupted.narrow(1, 5, 1).fill_(3);
    let tgt = clean.int64_value(&[0, 15]);
    let metric = |l: &Tensor| -> anyhow::Result<f64> { Ok(l.double_value(&[0, 15, tgt])) };
    let clean_m = metric(&tch::no_grad(|| m.forward(&clean, false)).unwrap()).unwrap();
    let corr_m = metric(&tch::no_grad(|| m.forward(&corrupted, false)).unwrap()).unwrap();
    assert!((clean_m - corr_m).abs() > 1e-3);
    let mut f = metric;
    let e = patching::patch_activation(&m, &clean, &corrupted, "resid_pre", Default::default(), &mut f, None)
        .unwrap();
    assert_eq!(e.size(), [2, 16]);
    // Block 0's input differs only at position 5: patching it restores the clean run.
    assert!((e.double_value(&[0, 5]) - clean_m).abs() < 1e-4);
    assert!((e.double_value(&[0, 4]) - corr_m).abs() < 1e-4);
    let z =
        patching::patch_activation(&m, &clean, &corrupted, "z", Default::default(), &mut f, None).unwrap();
    assert_eq!(z.size(), [2, 16, 4]);
    let zall = patching::patch_activation(
        &m,
        &clean,
        &corrupted,
        "hook_z",
        patching::Sweep { all_pos: true },
        &mut f,
        None,
    )
    .unwrap();
    assert_eq!(zall.size(), [2, 4]);
    let pat = patching::patch_activation(
        &m,
        &clean,
        &corrupted,
        "blocks.0.attn.hook_pattern",
        Default::default(),
        &mut f,
        None,
    )
    .unwrap();
    assert_eq!(pat.size(), [2, 4]);
    assert!(
        patching::patch_activation(&m, &clean, &corrupted, "nope", Default::default(), &mut f, None).is_err()
    );
    // Attribution patching: nothing where clean and corrupted agree; for the
    // last block, (clean - corrupted) · ∂metric/∂act with the gradient taken
    // independently (the activation made a leaf).
    let mut g = |l: &Tensor| -> anyhow::Result<Tensor> { Ok(l.get(0).get(15).get(tgt)) };
    let a =
        patching::attribution_patch(&m, &clean, &corrupted, "resid_pre", Default::default(), &mut g, None)
            .unwrap();
    assert_eq!(a.size(), [2, 16]);
    assert!(a.get(0).narrow(0, 0, 5).abs().max().double_value(&[]) == 0.0);
    let (_, cc) = cache_of(&m, &clean);
    let (_, kc) = cache_of(&m, &corrupted);
    let leaf = std::cell::RefCell::new(None);
    let mut h = FnHooks::new();
    h.add("blocks.1.hook_resid_pre", |_, x| {
        let l = x.detach().set_requires_grad(true);
        *leaf.borrow_mut() = Some(l.shallow_clone());
        Ok(Some(l))
    });
    let out = m.forward_hooked(&corrupted, false, Some(&h)).unwrap();
    drop(h);
    let leaf = leaf.into_inner().unwrap();
    let grad = Tensor::run_backward(&[out.get(0).get(15).get(tgt)], &[&leaf], false, false).remove(0);
    let name = "blocks.1.hook_resid_pre";
    let want = ((cc.get(name).unwrap() - kc.get(name).unwrap()) * &grad).sum_dim_intlist(
        &[0i64, 2][..],
        false,
        Kind::Float,
    );
    assert!(max_diff(&a.get(1), &want) < 1e-5, "attribution row 1: {} vs {}", a.get(1), want);
    assert!(a.get(1).abs().max().double_value(&[]) > 0.0);
    // Masked scores (-inf in both runs) contribute 0, not NaN.
    let sc =
        patching::attribution_patch(&m, &clean, &corrupted, "attn_scores", Default::default(), &mut g, None)
            .unwrap();
    assert_eq!(sc.size(), [2, 4]);
    assert!(sc.isfinite().all().int64_value(&[]) == 1, "{sc}");
}

#[test]
fn head_detectors_find_planted_heads() {
    let m = load("gelu_new");
    let n = 6;
    let tokens = {
        let _g = rng();
        detect::repeated_tokens(2, n, 0, 97, None, 3).unwrap()
    };
    let t = 2 * n;
    // Plant an exact induction pattern in L1H2 and a previous-token one in L0H1.
    let plant = |offset: i64| {
        move |_: &str, p: &Tensor| -> Result<Option<Tensor>, tch::TchError> {
            let out = p.copy();
            let mut rows = Vec::new();
            for i in 0..t {
                let j = if offset == 1 { (i - n + 1).max(0) } else { (i - 1).max(0) };
                rows.push(Tensor::zeros([t], (Kind::Float, Device::Cpu)).index_fill(
                    0,
                    &Tensor::from_slice(&[j]),
                    1.0,
                ));
            }
            out.narrow(1, if offset == 1 { 2 } else { 1 }, 1)
                .copy_(&Tensor::stack(&rows, 0).view([1, 1, t, t]));
            Ok(Some(out))
        }
    };
    let mut h = FnHooks::new();
    h.add("blocks.1.attn.hook_pattern", plant(1));
    h.add("blocks.0.attn.hook_pattern", plant(0));
    let ind = detect::head_scores(&m, &tokens, "induction", n, 0, Some(&h)).unwrap();
    assert_eq!(ind.size(), [2, 4]);
    assert!((ind.double_value(&[1, 2]) - 1.0).abs() < 1e-6, "{ind}");
    assert!(ind.double_value(&[1, 1]) < 0.9);
    let prev = detect::head_scores(&m, &tokens, "previous_token", n, 0, Some(&h)).unwrap();
    assert!((prev.double_value(&[0, 1]) - 1.0).abs() < 1e-6, "{prev}");
    assert!(detect::head_scores(&m, &tokens, "nonsense", n, 0, None).is_err());
    assert!(detect::head_scores(&m, &tokens, "induction", 20, 0, None).is_err());
}
