//! KV-cache pruning during decoding (src/attention/kvprune.rs,
//! docs/attention.md "KV-cache pruning"): causality, exactness at keep
//! ratio 1, the kept count and the recency window, importance and EMA
//! against hand-computed values, eviction, bad options, refused variants,
//! the script bindings. CPU only.
use knlp::attention::kvprune::{check_spec, Config, Mode, State};
use knlp::decode::{generate, score_cached, Options};
use knlp::models::gpt2::{self, Gpt2};
use knlp::models::Model;
use knlp::script::{Limits, Runtime};
use tch::{Device, Kind, Tensor};

const CPU: Device = Device::Cpu;

static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rng() -> std::sync::MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

fn small(attention: &str) -> Gpt2 {
    let c = gpt2::Config {
        block_size: 40,
        vocab_size: 61,
        attention: attention.into(),
        d_latent: 16,
        route_skip_warmup: true,
        ..gpt2::Config::custom(2, 4, 32)
    };
    let mut m = Gpt2::new(c).unwrap_or_else(|e| panic!("{attention}: {e}"));
    m.store_mut().finalize(CPU).unwrap();
    m
}

fn tokens(b: i64, t: i64) -> Tensor {
    Tensor::randint(61, [b, t], (Kind::Int64, CPU))
}

fn cfg(keep_ratio: f64, k_min: i64, recency: i64) -> Config {
    Config { keep_ratio, k_min, recency, ..Config::default() }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    a.f_sub(b).unwrap().abs().max().double_value(&[])
}

fn gen_logits(m: &Gpt2, p: &Tensor, prune: Option<Config>) -> Tensor {
    let o = Options { max_new_tokens: 20, keep_logits: true, kv_prune: prune, ..Options::default() };
    Tensor::stack(&generate(m, p, &o).unwrap().logits, 1)
}

fn t(v: &[f32], shape: &[i64]) -> Tensor {
    Tensor::from_slice(v).reshape(shape)
}

#[test]
fn kv_keep_ratio_one_gives_the_unpruned_logits() {
    let _rng = rng();
    tch::manual_seed(0);
    for att in ["mha", "ra", "kv_tying", "kv_tying_t"] {
        let m = small(att);
        let p = tokens(2, 6);
        let dense = gen_logits(&m, &p, None);
        for mode in [Mode::VOnly, Mode::ScoresReuse] {
            for evict in [false, true] {
                let full = Config { mode, evict, ..cfg(1.0, 1, 0) };
                let d = max_diff(&dense, &gen_logits(&m, &p, Some(full)));
                assert!(d < 1e-5, "{att} {mode:?} evict {evict}: keep_ratio 1 differs by {d}");
                // recency >= T keeps everything whatever the ratio.
                let recent = Config { mode, evict, ..cfg(0.1, 1, 64) };
                let d = max_diff(&dense, &gen_logits(&m, &p, Some(recent)));
                assert!(d < 1e-5, "{att} {mode:?} evict {evict}: recency >= T differs by {d}");
            }
        }
        // Teacher-forced scoring agrees too, and with the unpruned cache.
        let x = tokens(2, 30);
        let a = score_cached(&m, &x, 1, None).unwrap();
        let b = score_cached(&m, &x, 1, Some(&cfg(1.0, 1, 0))).unwrap();
        assert!(max_diff(&a.nll, &b.nll) < 1e-5, "{att}");
        assert_eq!(b.read_fraction, 1.0);
        assert_eq!(a.nll.size(), vec![2, 29]);
        // The unpruned cache's scoring is the full forward's loss.
        let logits = m.forward(&x, false).unwrap().narrow(-1, 0, 61).log_softmax(-1, Kind::Float);
        let want = logits
            .narrow(1, 0, 29)
            .gather(-1, &x.narrow(1, 1, 29).unsqueeze(-1), false)
            .squeeze_dim(-1)
            .neg();
        assert!(max_diff(&a.nll, &want) < 1e-4, "{att}: cached scoring != full forward");
    }
}

#[test]
fn kv_pruned_decoding_is_causal_and_prunes() {
    let _rng = rng();
    tch::manual_seed(1);
    let m = small("mha");
    let x = tokens(2, 36);
    let c = cfg(0.25, 2, 2);
    let a = score_cached(&m, &x, 4, Some(&c)).unwrap();
    // Changing the last token changes no earlier prediction.
    let y = Tensor::cat(&[x.narrow(1, 0, 35), (x.narrow(1, 35, 1) + 1).remainder(61)], 1);
    let b = score_cached(&m, &y, 4, Some(&c)).unwrap();
    assert_eq!(max_diff(&a.nll.narrow(1, 0, 34), &b.nll.narrow(1, 0, 34)), 0.0);
    assert!(max_diff(&a.nll, &b.nll) > 0.0);
    // Pruning changed something, and read about a quarter of the positions.
    let dense = score_cached(&m, &x, 4, None).unwrap();
    assert!(max_diff(&a.nll, &dense.nll) > 1e-6);
    assert!(a.read_fraction < 0.5 && a.read_fraction > 0.2, "read {}", a.read_fraction);
    // A step never reads past its query: the state refuses keys beyond it.
    let mut st = State::new(cfg(0.5, 1, 1));
    let q = Tensor::randn([1, 2, 1, 4], (Kind::Float, CPU));
    let k = Tensor::randn([1, 2, 5, 4], (Kind::Float, CPU));
    assert!(st.attend(&q, &k, &k, None, 3, 8).is_err(), "keys after the query were read");
    // The prefill's importance is the column mass of the *causal* pattern.
    let mut st = State::new(Config { exposure: false, ema: 0.0, ..cfg(0.5, 1, 0) });
    let q = Tensor::randn([1, 2, 3, 4], (Kind::Float, CPU));
    let k = Tensor::randn([1, 2, 3, 4], (Kind::Float, CPU));
    let _ = st.attend(&q, &k, &k, None, 0, 8).unwrap();
    let imp = st.importance().unwrap();
    // Key 2 is seen only by query 2 (its own row): mass = A[2, 2] / 3, with
    // A from the causal softmax; the non-causal seed would add rows 0 and 1.
    let s = q.matmul(&k.transpose(-2, -1)) / 2.0;
    let a22 = s.narrow(2, 2, 1).softmax(-1, Kind::Float).narrow(3, 2, 1).squeeze();
    assert!(max_diff(&imp.narrow(2, 2, 1).squeeze(), &(a22 / 3.0)) < 1e-6);
}

#[test]
fn kv_importance_matches_a_hand_computed_example() {
    // One sequence, one head; the causal pattern of three queries.
    let a = t(&[1.0, 0.0, 0.0, 0.25, 0.75, 0.0, 0.5, 0.2, 0.3], &[1, 1, 3, 3]);
    let mut st = State::new(Config { ema: 0.0, ..cfg(0.34, 1, 0) });
    st.observe(&a, 0, 4).unwrap();
    // M = [1.75, 0.95, 0.3]; exposure L − j = [3, 2, 1].
    let want = t(&[1.75 / 3.0, 0.95 / 2.0, 0.3], &[1, 1, 3]);
    assert!(max_diff(&st.importance().unwrap(), &want) < 1e-6);
    // k = max(1, ⌊0.34·3⌋) = 1: the top position is 0.
    assert_eq!(Vec::<i64>::try_from(st.select().unwrap().flatten(0, -1)).unwrap(), vec![0]);
    let mut mean = State::new(Config { exposure: false, ema: 0.0, ..cfg(0.34, 1, 0) });
    mean.observe(&a, 0, 4).unwrap();
    let want = t(&[1.75 / 3.0, 0.95 / 3.0, 0.1], &[1, 1, 3]);
    assert!(max_diff(&mean.importance().unwrap(), &want) < 1e-6);
    // The recency window outranks everything (position 2 has the lowest importance).
    let mut rec = State::new(Config { ema: 0.0, ..cfg(0.34, 1, 1) });
    rec.observe(&a, 0, 4).unwrap();
    assert_eq!(Vec::<i64>::try_from(rec.select().unwrap().flatten(0, -1)).unwrap(), vec![2]);
    // A pattern that does not continue the observed positions is refused.
    assert!(rec.observe(&a, 0, 4).is_err());
}

#[test]
fn kv_kept_count_and_recency_window() {
    let _rng = rng();
    for (r, k_min, rec, len, want) in [
        (0.382, 64, 64, 1024, 391),
        (0.5, 4, 2, 20, 10),
        (0.25, 8, 2, 20, 8),
        (0.1, 1, 6, 20, 6),
        (0.5, 30, 0, 20, 20),
    ] {
        assert_eq!(cfg(r, k_min, rec).kept(len), want, "{r} {k_min} {rec} {len}");
    }
    // Through the state: random attention over 40 positions, 2 heads.
    for evict in [false, true] {
        tch::manual_seed(3);
        let c = Config { evict, ..cfg(0.3, 4, 5) };
        let mut st = State::new(c.clone());
        let q = Tensor::randn([2, 2, 20, 8], (Kind::Float, CPU));
        let k = Tensor::randn([2, 2, 40, 8], (Kind::Float, CPU));
        let _ = st.attend(&q, &k.narrow(2, 0, 20), &k.narrow(2, 0, 20), None, 0, 40).unwrap();
        let mut read = 0;
        for pos in 20..40 {
            let q1 = Tensor::randn([2, 2, 1, 8], (Kind::Float, CPU));
            let kk = k.narrow(2, 0, pos + 1);
            let before = st.evicted();
            let _ = st.attend(&q1, &kk, &kk, None, pos, 40).unwrap();
            let len = pos + 1;
            read += c.kept(len);
            // k = max(k_min, ⌊r·L⌋, recency) positions stay alive, the window among them.
            if evict {
                let ev = st.evicted().unwrap();
                let alive = ev.logical_not().to_kind(Kind::Int64).sum_dim_intlist(-1, false, Kind::Int64);
                assert!(alive.eq(c.kept(len)).all().int64_value(&[]) == 1, "alive {alive} at {len}");
                let window = ev.narrow(2, len - 5, 5).any().int64_value(&[]);
                assert_eq!(window, 0, "a recency position was evicted");
                if let Some(b) = before {
                    // Once evicted, always evicted.
                    let still = ev.narrow(2, 0, len - 1).logical_or(&b.logical_not());
                    assert_eq!(still.all().int64_value(&[]), 1, "an evicted position came back");
                }
            }
        }
        assert_eq!(st.read, read);
        assert_eq!(st.cached, (21..=40).sum::<i64>());
    }
    // With a selection state: the window is in every step's selection.
    let mut st = State::new(Config { ema: 0.0, ..cfg(0.2, 2, 3) });
    let a = Tensor::rand([1, 3, 10, 10], (Kind::Float, CPU)).tril(0);
    st.observe(&a, 0, 16).unwrap();
    let idx = st.select().unwrap();
    assert_eq!(idx.size(), vec![1, 3, 3]);
    let mut got = Vec::<i64>::try_from(idx.flatten(0, -1)).unwrap();
    got.sort_unstable();
    assert_eq!(got, vec![7, 7, 7, 8, 8, 8, 9, 9, 9]);
}

#[test]
fn kv_ema_updates_every_n_steps() {
    let c = Config { exposure: false, ema: 0.5, ema_every: 2, ..cfg(1.0, 1, 0) };
    let mut st = State::new(c);
    st.observe(&t(&[1.0, 0.0, 0.5, 0.5], &[1, 1, 2, 2]), 0, 4).unwrap();
    // Step 0 updates: the EMA starts at I = M / L = [0.75, 0.25].
    assert!(max_diff(&st.score().unwrap(), &t(&[0.75, 0.25], &[1, 1, 2])) < 1e-6);
    st.steps += 1;
    st.observe(&t(&[0.2, 0.2, 0.6], &[1, 1, 1, 3]), 2, 4).unwrap();
    // Step 1 does not: the covered positions keep the EMA, the new one its importance 0.6/3.
    assert!(max_diff(&st.score().unwrap(), &t(&[0.75, 0.25, 0.2], &[1, 1, 3])) < 1e-6);
    st.steps += 1;
    st.observe(&t(&[0.1, 0.1, 0.1, 0.7], &[1, 1, 1, 4]), 3, 4).unwrap();
    // Step 2 updates: E = 0.5·E + 0.5·I on [0, 2), I on [2, 4); I = [1.8, 0.8, 0.7, 0.7] / 4.
    let want = t(&[0.5 * 0.75 + 0.5 * 0.45, 0.5 * 0.25 + 0.5 * 0.2, 0.175, 0.175], &[1, 1, 4]);
    assert!(max_diff(&st.score().unwrap(), &want) < 1e-6);
}

#[test]
fn kv_modes_agree_and_pruning_degrades_gracefully() {
    let _rng = rng();
    tch::manual_seed(2);
    let m = small("mha");
    let x = tokens(2, 38);
    let v = score_cached(&m, &x, 2, Some(&cfg(0.5, 2, 2))).unwrap();
    let s = score_cached(&m, &x, 2, Some(&Config { mode: Mode::ScoresReuse, ..cfg(0.5, 2, 2) })).unwrap();
    assert!(max_diff(&v.nll, &s.nll) < 1e-4, "v_only and scores_reuse differ");
    assert!(v.loss.is_finite() && v.ppl > 1.0);
}

#[test]
fn kv_bad_options_and_variants_are_refused() {
    let _rng = rng();
    let bad = [
        (Config { keep_ratio: 0.0, ..Config::default() }, "keep_ratio"),
        (Config { keep_ratio: 1.5, ..Config::default() }, "keep_ratio"),
        (Config { keep_ratio: f64::NAN, ..Config::default() }, "keep_ratio"),
        (Config { k_min: 0, ..Config::default() }, "k_min"),
        (Config { recency: -1, ..Config::default() }, "recency"),
        (Config { ema: 1.0, ..Config::default() }, "ema"),
        (Config { ema_every: 0, ..Config::default() }, "ema_every"),
    ];
    let m = small("mha");
    let p = tokens(1, 4);
    for (c, what) in bad {
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains(what), "{e}");
        let o = Options { kv_prune: Some(c.clone()), ..Options::default() };
        assert!(generate(&m, &p, &o).err().unwrap().to_string().contains(what));
        assert!(score_cached(&m, &tokens(1, 8), 1, Some(&c)).err().unwrap().to_string().contains(what));
    }
    assert!(Mode::parse("both").unwrap_err().to_string().contains("v_only"));
    let o = Options { kv_prune: Some(Config::default()), cache: false, ..Options::default() };
    assert!(generate(&m, &p, &o).err().unwrap().to_string().contains("cache: true"));
    for (prefill, n) in [(0, 8), (8, 8)] {
        let e = score_cached(&m, &tokens(1, n), prefill, None).err().unwrap().to_string();
        assert!(e.contains("prefill"), "{e}");
    }
    assert!(score_cached(&m, &tokens(1, 42), 1, None).err().unwrap().to_string().contains("block_size"));
    for (att, what) in
        [("mla", "latent"), ("ra_mla_kvsplice", "latent"), ("sba", "sba mixer"), ("ra_route", "route mixer")]
    {
        let v = small(att);
        let o = Options { kv_prune: Some(Config::default()), ..Options::default() };
        let e = generate(&v, &p, &o).err().unwrap().to_string();
        assert!(e.contains(&format!("'{att}'")) && e.contains(what), "{att}: {e}");
        let e = score_cached(&v, &tokens(1, 8), 1, Some(&Config::default())).err().unwrap().to_string();
        assert!(e.contains(&format!("'{att}'")), "{att}: {e}");
        assert!(check_spec(v.spec(), att).is_err());
    }
}

#[test]
fn kv_script_bindings() {
    let _rng = rng();
    let mut rt = Runtime::new(std::env::temp_dir(), Limits::default());
    let code = r#"
        let m = gpt2(#{ n_layer: 1, n_head: 2, n_embd: 16, block_size: 32, vocab_size: 61 });
        let x = randint(0, 61, [2, 24]);
        let d = kv_prune_eval(m, x, #{ prune: false });
        let f = kv_prune_eval(m, x, #{ keep_ratio: 1.0, k_min: 1, recency: 0 });
        let p = kv_prune_eval(m, x, #{ keep_ratio: 0.25, k_min: 2, recency: 2, mode: "scores_reuse", evict: true, ema: 0.0 });
        let g = m.generate(randint(0, 61, [1, 4]), #{ max_new_tokens: 8, details: true, kv_prune: #{ keep_ratio: 0.5, k_min: 2, recency: 2 } });
        [d.ppl, f.ppl, p.read_fraction, d.tokens, g.kv_read_fraction, g.tokens.shape[1]]
    "#;
    let r = rt.eval_input(code).unwrap_or_else(|e| panic!("{}", e.rendered)).into_array().unwrap();
    let (d, f) = (r[0].as_float().unwrap(), r[1].as_float().unwrap());
    assert!((d - f).abs() < 1e-3 * d, "{d} {f}");
    assert!(r[2].as_float().unwrap() < 0.6);
    assert_eq!(r[3].as_int().unwrap(), 2 * 22);
    assert!(r[4].as_float().unwrap() <= 1.0);
    assert_eq!(r[5].as_int().unwrap(), 12);
    for (opts, want) in [
        ("#{ keep_ratio: 2.0 }", "keep_ratio must be in (0, 1]"),
        ("#{ keep: 0.5 }", "unknown kv_prune_eval key 'keep'"),
        ("#{ mode: \"x\" }", "mode must be"),
        ("#{ k_min: 1.5 }", "k_min must be an int"),
        ("#{ prefill: 0 }", "prefill must be in"),
    ] {
        let code = format!(
            "let m = gpt2(#{{ n_layer: 1, n_head: 2, n_embd: 16, block_size: 32, vocab_size: 61 }}); kv_prune_eval(m, randint(0, 61, [1, 8]), {opts})"
        );
        let e = rt.eval_input(&code).err().unwrap().rendered;
        assert!(e.contains(want), "{opts}: {e}");
    }
    let e = rt
        .eval_input(r#"let m = gpt2(#{ n_layer: 1, n_head: 2, n_embd: 16, block_size: 32, vocab_size: 61, attention: "mla", d_latent: 8 }); m.generate(randint(0, 61, [1, 4]), #{ max_new_tokens: 8, kv_prune: #{} })"#)
        .err()
        .unwrap()
        .rendered;
    assert!(e.contains("'mla'") && e.contains("per-head K and V"), "{e}");
}

/// A fresh scratch folder, removed when dropped.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("knlp-kvprune-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// K_i by brute force: the decode step's selection at query i with no EMA.
fn brute_keep(a: &[Vec<f64>], c: &Config, i: usize) -> Vec<bool> {
    let len = i + 1;
    let score: Vec<f64> = (0..len)
        .map(|j| {
            if j + (c.recency as usize) > i {
                return f64::INFINITY;
            }
            let mass: f64 = (j..=i).map(|q| a[q][j]).sum();
            mass / if c.exposure { (len - j) as f64 } else { len as f64 }
        })
        .collect();
    let k = c.kept(len as i64) as usize;
    let mut order: Vec<usize> = (0..len).collect();
    order.sort_by(|&x, &y| score[y].partial_cmp(&score[x]).unwrap());
    let mut keep = vec![false; a.len()];
    for &j in &order[..k] {
        keep[j] = true;
    }
    keep
}

#[test]
fn kv_recon_keep_mask_is_the_decode_selection() {
    let _rng = rng();
    tch::manual_seed(3);
    let t = 24;
    let s = Tensor::randn([1, 2, t, t], (Kind::Float, CPU)).f_mul_scalar(2.0).unwrap();
    let causal = Tensor::ones([t, t], (Kind::Bool, CPU)).tril(0);
    let a = s.masked_fill(&causal.logical_not(), f64::NEG_INFINITY).softmax(-1, Kind::Float);
    for c in [cfg(0.3, 2, 3), Config { exposure: false, ..cfg(0.5, 1, 0) }, cfg(0.1, 5, 1)] {
        let got = knlp::attention::vrecon::keep_mask(&a, &c).unwrap();
        for h in 0..2 {
            let rows: Vec<Vec<f64>> =
                (0..t).map(|i| Vec::<f64>::try_from(a.get(0).get(h).get(i)).unwrap()).collect();
            for i in 0..t as usize {
                let want = brute_keep(&rows, &c, i);
                let have = Vec::<bool>::try_from(got.get(0).get(h).get(i as i64)).unwrap();
                assert_eq!(have, want, "{c:?} head {h} query {i}");
            }
        }
    }
}

#[test]
fn kv_recon_fits_is_used_by_decoding_and_round_trips() {
    use knlp::attention::kvprune::Recon;
    use knlp::attention::vrecon::VRecon;
    use knlp::decode::recon::{check, fit, new_for, FitOptions};
    use std::rc::Rc;
    let _rng = rng();
    tch::manual_seed(5);
    let m = small("mha");
    let held = tokens(6, 40);
    let fit_rows = tokens(8, 40);
    let c = Config { ema: 0.0, ..cfg(0.25, 2, 2) };
    let (r, rep) = fit(&m, &fit_rows, &c, &FitOptions { steps: 40, lr: 3e-3, batch: 4, seed: 0 }).unwrap();
    // The loss falls, and on the fixed batch the reconstructor beats the plain values in every layer.
    let (first, last) = (rep.losses[0], *rep.losses.last().unwrap());
    assert!(last < 0.8 * first, "fit loss {first} -> {last}");
    for (p, q) in rep.rel_err_plain.iter().zip(&rep.rel_err_recon) {
        assert!(q < p, "relative error plain {p}, recon {q}");
    }
    let with = |r: &Rc<VRecon>| Config { recon: Some(Recon(r.clone())), ..c.clone() };
    let r = Rc::new(r);
    let plain = score_cached(&m, &held, 1, Some(&c)).unwrap();
    let rec = score_cached(&m, &held, 1, Some(&with(&r))).unwrap();
    assert!((plain.loss - rec.loss).abs() > 1e-6, "the reconstructor changed nothing");
    // The cache's ṽ slot holds ṽ of each position's own attention input
    // (ln_1's output) and values, as the fit computed them.
    let mut cache = m.new_cache(2, 40).unwrap();
    cache.set_prune(&with(&r));
    let x = held.narrow(0, 0, 2).narrow(1, 0, 30);
    let _ = m.forward_cached(&x, &mut cache).unwrap();
    let rec_hooks = knlp::hooks::Recorder::new(
        |n: &str| n.ends_with(".ln1.hook_normalized") || n.ends_with(".attn.hook_v"),
        None,
    );
    let _ = tch::no_grad(|| m.forward_hooked(&x, false, Some(&rec_hooks))).unwrap();
    let acts = rec_hooks.take();
    for l in 0..2usize {
        let get = |n: String| acts.iter().find(|(k, _)| *k == n).unwrap().1.shallow_clone();
        let xl = get(format!("blocks.{l}.ln1.hook_normalized"));
        let vl = get(format!("blocks.{l}.attn.hook_v")).transpose(1, 2);
        let want = r.veff(l, &xl, &vl).unwrap();
        let slot = cache.layers[l].value_eff.as_ref().unwrap().narrow(2, 0, 30);
        assert!(max_diff(&slot, &want) < 1e-5, "layer {l}: ṽ slot differs by {}", max_diff(&slot, &want));
    }
    // Output errors on rows the fit never saw: the reconstructor still helps.
    let (p_err, r_err) = knlp::decode::recon::output_errors(&m, &r, &held, &c).unwrap();
    assert!(p_err.iter().zip(&r_err).all(|(p, q)| q < p), "held-out errors {p_err:?} -> {r_err:?}");
    // A gate pinned at 1 reads the true values: the plain pruned result.
    let mut ident = new_for(&m, 1).unwrap();
    for l in &mut ident.layers {
        l.g_b = l.g_b.f_fill(50.0).unwrap();
    }
    let one = score_cached(&m, &held, 1, Some(&with(&Rc::new(ident)))).unwrap();
    assert!(max_diff(&one.nll, &plain.nll) < 1e-5);
    // Saved and loaded: the same decode; a wrong shape and a wrong file are refused.
    let dir = Scratch::new("recon");
    let path = dir.path().join("recon.safetensors");
    r.save(&path).unwrap();
    let back = VRecon::load(&path, CPU).unwrap();
    check(&back, &m).unwrap();
    let again = score_cached(&m, &held, 1, Some(&with(&Rc::new(back)))).unwrap();
    assert_eq!(max_diff(&again.nll, &rec.nll), 0.0);
    let other = small("kv_tying");
    let bigger =
        Gpt2::new(gpt2::Config { block_size: 40, vocab_size: 61, ..gpt2::Config::custom(3, 4, 32) }).unwrap();
    assert!(check(&VRecon::load(&path, CPU).unwrap(), &other).is_ok());
    let e = check(&VRecon::load(&path, CPU).unwrap(), &bigger).unwrap_err().to_string();
    assert!(e.contains("2 layers") && e.contains("3"), "{e}");
    std::fs::write(dir.path().join("bad.safetensors"), b"not a file at all").unwrap();
    let e = VRecon::load(&dir.path().join("bad.safetensors"), CPU).unwrap_err().to_string();
    assert!(e.contains("bad.safetensors"), "{e}");
    let e = fit(&m, &tokens(2, 60), &c, &FitOptions::default()).unwrap_err().to_string();
    assert!(e.contains("block_size"), "{e}");
}

#[test]
fn kv_prune_eval_runs_from_train_kconfig_and_the_results_table() {
    let _rng = rng();
    let dir = Scratch::new("train");
    // nanoGPT token files of random ids below 61.
    let toks = dir.path().join("toks");
    std::fs::create_dir(&toks).unwrap();
    let ids = Vec::<i64>::try_from(tokens(1, 6000).view([-1])).unwrap();
    for (name, part) in [("train.bin", &ids[..4000]), ("val.bin", &ids[4000..])] {
        let bytes: Vec<u8> = part.iter().flat_map(|&i| (i as u16).to_le_bytes()).collect();
        std::fs::write(toks.join(name), bytes).unwrap();
    }
    let mut rt = Runtime::new(dir.path().to_path_buf(), Limits::default());
    let d = dir.path().display().to_string();
    let code = r#"
        let m = gpt2(#{ n_layer: 2, n_head: 2, n_embd: 32, block_size: 32, vocab_size: 61, seed: 1 });
        let data = text_dataset("DIR/toks", #{ vocab_size: 61 });
        let opt = optimizer(m, #{ kind: "adamw", lr: 3e-3 });
        let run = train(m, opt, data, #{ steps: 12, batch_size: 4, block_size: 32, eval_batches: 4, progress: "off",
            run_dir: "DIR/runs/kvp/mha", kv_prune_eval: #{ keep_ratios: [0.5, 0.25], k_min: 2, recency: 2, seqs: 3,
            recon: true, recon_steps: 4, recon_seqs: 4 } });
        let r = kv_recon_fit(m, randint(0, 61, [4, 32]), #{ keep_ratio: 0.25, k_min: 2, recency: 2, steps: 3 });
        r.save("DIR/r.safetensors");
        let back = kv_recon_load(m, "DIR/r.safetensors");
        let a = kv_prune_eval(m, randint(0, 61, [2, 32]), #{ keep_ratio: 0.25, k_min: 2, recency: 2, recon: back });
        [run.summary.extra.kv_ppl, run.summary.extra.kv_ppl_dense, run.summary.extra.kv_ppl_recon, run.summary.extra.kv_keep,
         r.report.losses.len(), back.layers, a.ppl]
    "#
    .replace("DIR", &d);
    let r = rt.eval_input(&code).unwrap_or_else(|e| panic!("{}", e.rendered)).into_array().unwrap();
    for v in [&r[0], &r[1], &r[2], &r[6]] {
        let p = v.as_float().unwrap();
        assert!(p.is_finite() && p > 1.0, "{r:?}");
    }
    assert_eq!(r[3].as_float().unwrap(), 0.5);
    assert_eq!(r[4].as_int().unwrap(), 3);
    assert_eq!(r[5].as_int().unwrap(), 2);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("runs/kvp/mha/kv_prune.json")).unwrap())
            .unwrap();
    assert_eq!(report["sequences"], 3);
    assert_eq!(report["fit_sequences"], 4);
    let res = report["results"].as_array().unwrap();
    assert_eq!(res.len(), 2);
    assert!(res[1]["read_fraction"].as_f64().unwrap() < res[0]["read_fraction"].as_f64().unwrap());
    assert_eq!(res[0]["recon"]["rel_err_recon"].as_array().unwrap().len(), 2);
    // The results table of the project shows the headline columns.
    let p = report::load_project(&dir.path().join("runs/kvp")).unwrap();
    let t = report::results_table(&p, &Default::default()).unwrap();
    for col in ["kv_keep", "kv_ppl", "kv_ppl_dense", "kv_ppl_recon"] {
        assert!(t.column(col).is_ok(), "{col} missing from {:?}", t.get_column_names());
    }
    // Bad options are refused before training.
    let e = rt
        .eval_input(&r#"let m = gpt2(#{ n_layer: 1, n_head: 2, n_embd: 16, block_size: 32, vocab_size: 61 }); train(m, optimizer(m, #{ kind: "adamw" }), text_dataset("DIR/toks", #{ vocab_size: 61 }), #{ steps: 1, batch_size: 2, block_size: 32, kv_prune_eval: #{ keep_ratios: [1.5] } })"#.replace("DIR", &d))
        .err()
        .unwrap()
        .rendered;
    assert!(e.contains("keep ratio must be in (0, 1]"), "{e}");
    let e = rt
        .eval_input(&r#"let m = gpt2(#{ n_layer: 1, n_head: 2, n_embd: 16, block_size: 32, vocab_size: 61 }); train(m, optimizer(m, #{ kind: "adamw" }), text_dataset("DIR/toks", #{ vocab_size: 61 }), #{ steps: 1, batch_size: 2, block_size: 32, kv_prune_eval: #{ keep: 0.5 } })"#.replace("DIR", &d))
        .err()
        .unwrap()
        .rendered;
    assert!(e.contains("unknown field `keep`"), "{e}");
    // The preset reads into the same options, off by default.
    use knlp::config::{self, Experiment, Reader};
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let read = |name: &str| {
        let (kc, _) = config::load(&root.join("Kconfig"), &root.join("defconfigs").join(name), &[]).unwrap();
        Experiment::read(&Reader::new(&kc)).unwrap()
    };
    let exp = read("gpt2-brown-kv-prune");
    let k = exp.train.kv_prune_eval.clone().unwrap();
    assert_eq!(k.keep_ratios, vec![0.5, 0.382, 0.25]);
    assert_eq!(
        (k.seqs, k.recon, k.recon_seqs, k.recon_steps, k.mode.as_str()),
        (16, true, 16, 200, "v_only")
    );
    assert_eq!(knlp::matrix::cells(&exp).unwrap().len(), 4);
    assert!(read("gpt2-brown-small").train.kv_prune_eval.is_none());
}
