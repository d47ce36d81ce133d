//! The run-time compiled GPU kernels (src/kernels) against their libtorch
//! references: the fused radix selection against `kthvalue` and the
//! libtorch radix selection, and the fused mask update against the libtorch
//! mask update of the same pruner (masks bit-identical, exactly k pruned),
//! for scorers the kernel evaluates itself and for ready-made scores, with
//! ties at the threshold, pruned weights kept pruned, and regrowth. On a
//! machine without CUDA the GPU checks are skipped with a message; the CPU
//! check that the switch falls back runs everywhere.
use std::sync::Mutex;

use knlp::kernels;
use knlp::optim::{OptConfig, Optimizer};
use knlp::params::{Init, ParamStore, Role};
use knlp::prune::{select, PruneConfig, Pruner};
use tch::{Device, Kind, Tensor};

// The fused-kernel switch is process-wide: one test at a time touches it.
static SWITCH: Mutex<()> = Mutex::new(());

fn cuda() -> Option<Device> {
    if tch::Cuda::is_available() {
        Some(Device::Cuda(0))
    } else {
        eprintln!("skipped: no CUDA device (the fused kernels run only on CUDA)");
        None
    }
}

#[test]
fn cpu_selection_ignores_the_switch() {
    let _g = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    assert!(!kernels::usable(Device::Cpu));
    let x = Tensor::randn([1001], (Kind::Float, Device::Cpu));
    let want = x.kthvalue(500, 0, false).0.double_value(&[]);
    assert_eq!(select::kth_smallest(&x, 500).unwrap(), want);
}

/// Inputs with negatives, many ties, NaNs and both zeros.
fn inputs(n: i64, dev: Device) -> Vec<(&'static str, Tensor)> {
    let r = Tensor::randn([n], (Kind::Float, dev));
    let ties = (&r * 4.0).round();
    let nan = r.where_self(&r.abs().gt(1.5).logical_not(), &Tensor::from(f32::NAN).to_device(dev));
    let pz = r.zeros_like();
    let zeros = pz.where_self(&r.gt(0.0), &pz.neg()); // +0.0 and -0.0
    vec![("randn", r), ("ties", ties), ("nan", nan), ("zeros", zeros)]
}

#[test]
fn fused_selection_matches_kthvalue() {
    let Some(dev) = cuda() else { return };
    let _g = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    kernels::available(dev).expect("a CUDA machine must be able to run the fused kernels");
    for n in [1i64, 7, 1000, 257 * 1031, 3_000_001] {
        for (what, x) in inputs(n, dev) {
            for k in [1, (n / 3).max(1), (n / 2).max(1), n] {
                let got = kernels::prune::kth_smallest(&x, k).unwrap();
                let reference = select::kth_smallest_torch(&x, k).unwrap();
                let same = |a: f64, b: f64| a == b || (a.is_nan() && b.is_nan());
                assert!(
                    same(got, reference),
                    "{what} n={n} k={k}: fused {got} vs libtorch radix {reference}"
                );
                if n <= 300_000 {
                    let want = x.to_device(Device::Cpu).kthvalue(k, 0, false).0.double_value(&[]);
                    assert!(same(got, want), "{what} n={n} k={k}: fused {got} vs kthvalue {want}");
                }
            }
        }
    }
}

/// Three prunable weights (one of them quantised so that magnitudes tie)
/// and a bias, after two AdamW steps, so that both moments exist.
fn model(dev: Device) -> (ParamStore, Optimizer) {
    let mut store = ParamStore::new();
    let _ = store.param("a.weight", &[257, 129], Init::Normal { std: 0.02 }, Role::Weight).unwrap();
    let _ = store.param("a.bias", &[257], Init::Zeros, Role::Bias).unwrap();
    let _ = store.param("b.attn.weight", &[1000], Init::Normal { std: 0.02 }, Role::Weight).unwrap();
    let _ = store.param("c.weight", &[33, 7], Init::Normal { std: 1.0 }, Role::Weight).unwrap();
    store.finalize(dev).unwrap();
    tch::no_grad(|| {
        let c = &store.params()[3].tensor;
        c.shallow_clone().copy_(&(c * 2.0).round().f_div_scalar(2.0).unwrap());
    });
    let mut opt = Optimizer::new(&store, OptConfig::default()).unwrap();
    for _ in 0..2 {
        let loss = store
            .params()
            .iter()
            .map(|p| (&p.tensor * Tensor::randn(p.tensor.size(), (Kind::Float, dev))).sum(Kind::Float))
            .reduce(|a, b| a + b)
            .unwrap();
        loss.backward();
        opt.step(&store).unwrap();
        for p in store.params() {
            let mut g = p.tensor.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }
    tch::no_grad(|| {
        // 5000 magnitudes of exactly 0.0135, about the median |w|: the 50%
        // magnitude threshold falls inside them, so ties are broken there.
        let _ = store.params()[0].tensor.view([-1]).narrow(0, 0, 5000).fill_(0.0135);
    });
    (store, opt)
}

fn masks(p: &Pruner) -> Vec<Vec<bool>> {
    p.members
        .iter()
        .map(|m| Vec::<bool>::try_from(p.mask(&m.name).unwrap().flatten(0, -1)).unwrap())
        .collect()
}

#[test]
fn fused_mask_updates_equal_libtorch_ones() {
    // Without CUDA both pruners take the libtorch path: the harness and the
    // exact count still run.
    let dev = cuda().unwrap_or(Device::Cpu);
    let _g = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    if dev != Device::Cpu {
        kernels::available(dev).expect("a CUDA machine must be able to run the fused kernels");
    }
    let (store, opt) = model(dev);
    let cfgs = [
        ("bitter7 (scored in the kernel)", "state", "bitter7", false),
        ("bitter3 (scored in the kernel)", "state", "bitter3", false),
        ("magnitude (ties)", "magnitude", "", false),
        ("bitter0 (ready scores)", "state", "bitter0", false),
        ("bitter9 (structural weights, ready scores)", "state", "bitter9", false),
        ("movement (ready scores)", "movement", "knlp", false),
        ("bitter7, regrow", "state", "bitter7", true),
        ("magnitude, regrow (ties)", "magnitude", "", true),
    ];
    for (what, method, variant, regrow) in cfgs {
        let cfg =
            PruneConfig { method: method.into(), variant: variant.into(), regrow, ..Default::default() };
        let mut fused = Pruner::new(&store, cfg.clone()).unwrap();
        let mut torch = Pruner::new(&store, cfg).unwrap();
        let n = fused.numel();
        for s in [0.3, 0.5, 0.8] {
            kernels::set_enabled(true);
            let before = kernels::launches();
            fused.update_masks(&store, Some(&opt), s, None).unwrap();
            assert!(kernels::enabled(), "{what}: the fused path failed and switched itself off");
            if dev != Device::Cpu {
                assert!(kernels::launches() > before, "{what}: the fused path did not run");
            }
            kernels::set_enabled(false);
            torch.update_masks(&store, Some(&opt), s, None).unwrap();
            kernels::set_enabled(true);
            let (a, b) = (masks(&fused), masks(&torch));
            assert_eq!(a, b, "{what} at {s}: fused and libtorch masks differ");
            let pruned: usize = a.iter().flatten().filter(|k| !**k).count();
            assert_eq!(pruned as i64, (s * n as f64).floor() as i64, "{what} at {s}: not exactly k pruned");
        }
    }
    // A NaN weight: "score > threshold" never keeps it, on either path.
    tch::no_grad(|| {
        let _ = store.params()[2].tensor.view([-1]).narrow(0, 3, 1).fill_(f64::NAN);
    });
    let cfg = PruneConfig { method: "magnitude".into(), regrow: true, ..Default::default() };
    let (mut fused, mut torch) =
        (Pruner::new(&store, cfg.clone()).unwrap(), Pruner::new(&store, cfg).unwrap());
    kernels::set_enabled(true);
    fused.update_masks(&store, Some(&opt), 0.5, None).unwrap();
    kernels::set_enabled(false);
    torch.update_masks(&store, Some(&opt), 0.5, None).unwrap();
    kernels::set_enabled(true);
    assert_eq!(masks(&fused), masks(&torch), "a NaN score: fused and libtorch masks differ");
    assert!(!masks(&fused)[1][3], "the NaN weight is pruned");
}

/// The chunked language-model loss under bf16 autocast with the fused
/// softmax cross-entropy kernel against its libtorch path: the same loss
/// (fp32 sums of the same bf16 logits) and gradients within bf16 rounding,
/// with ignored targets, a bias and a last chunk shorter than the others.
#[test]
fn fused_cross_entropy_matches_libtorch() {
    let Some(dev) = cuda() else { return };
    let _g = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    kernels::available(dev).expect("a CUDA machine must be able to run the fused kernels");
    tch::manual_seed(0);
    let h0 = Tensor::randn([3, 1000, 64], (Kind::Float, dev));
    let w0 = Tensor::randn([1002, 64], (Kind::Float, dev)) * 0.3;
    let b0 = Tensor::randn([1002], (Kind::Float, dev));
    let y = Tensor::randint(1002, [3, 1000], (Kind::Int64, dev));
    let _ = y.narrow(1, 0, 17).fill_(-1);
    let run = |on: bool| {
        kernels::set_enabled(on);
        let h = h0.copy().set_requires_grad(true);
        let w = w0.copy().set_requires_grad(true);
        let b = b0.copy().set_requires_grad(true);
        let loss = knlp::shim::with_autocast(knlp::shim::AutocastDtype::BF16, || {
            knlp::loss::linear_cross_entropy(&h, &w, Some(&b), &y, 1024)
        })
        .unwrap()
        .unwrap();
        loss.backward();
        kernels::set_enabled(true);
        (loss.double_value(&[]), h.grad(), w.grad(), b.grad())
    };
    let (l1, gh1, gw1, gb1) = run(true);
    assert!(kernels::enabled(), "the fused loss failed and switched the kernels off");
    let (l2, gh2, gw2, gb2) = run(false);
    assert!((l1 - l2).abs() <= 1e-5 * l2.abs(), "loss: fused {l1} vs libtorch {l2}");
    for (what, a, b) in [("h", gh1, gh2), ("W", gw1, gw2), ("b", gb1, gb2)] {
        let scale = b.abs().max().double_value(&[]);
        let diff = (&a - &b).abs().max().double_value(&[]);
        assert!(scale > 0.0 && diff <= 1e-2 * scale, "grad of {what}: max diff {diff} vs max {scale}");
    }
    // A target outside the vocabulary is an error, not a stray read; so is
    // PyTorch's usual ignore index, which here is -1.
    for id in [5000, -100] {
        let bad = y.copy();
        let _ = bad.narrow(1, 5, 1).fill_(id);
        let e = knlp::shim::with_autocast(knlp::shim::AutocastDtype::BF16, || {
            knlp::loss::linear_cross_entropy(&h0, &w0, None, &bad, 1024)
        })
        .unwrap()
        .unwrap_err();
        assert!(e.to_string().contains(&format!("target id {id} is outside")), "{e}");
    }
}

/// The cross-entropy kernel alone against libtorch's log-softmax in fp32
/// over the same bf16 logits, with -inf logits (a masked vocabulary) at the
/// start of every row, an ignored row and an out-of-range id (NaN loss).
#[test]
fn cross_entropy_kernel_matches_log_softmax() {
    let Some(dev) = cuda() else { return };
    let _g = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(1);
    let (rows, v) = (64i64, 1000i64);
    let z = (Tensor::randn([rows, v], (Kind::Float, dev)) * 3.0).to_kind(Kind::BFloat16);
    let _ = z.narrow(1, 0, 5).fill_(f64::NEG_INFINITY);
    let y = Tensor::randint_low(5, v, [rows], (Kind::Int64, dev));
    let _ = y.narrow(0, 7, 1).fill_(-1);
    let w = Tensor::full([rows], 1.0 / 63.0, (Kind::Float, dev));
    let _ = w.narrow(0, 7, 1).fill_(0.0);
    let zf = z.to_kind(Kind::Float);
    let logp = zf.log_softmax(-1, Kind::Float);
    let ys = y.clamp_min(5); // the ignored row points at a finite logit (its weight is 0)
    let want_loss = -(logp.gather(1, &ys.unsqueeze(1), false).squeeze_dim(1) * &w);
    let onehot = Tensor::zeros([rows, v], (Kind::Float, dev)).scatter_value(1, &ys.unsqueeze(1), 1.0);
    let want_g = (logp.exp() - onehot) * w.unsqueeze(1);
    let mut g = z.copy();
    let loss = kernels::xent::xent_(&mut g, &y, &w).unwrap();
    let dl = (&loss - &want_loss).abs().max().double_value(&[]);
    assert!(dl < 1e-5, "row losses differ by {dl}");
    let dg = (g.to_kind(Kind::Float) - want_g).abs().max().double_value(&[]);
    assert!(dg < 1e-4, "gradients differ by {dg} (bf16 of values below 1/63)");
    assert!(
        g.narrow(1, 0, 5).to_kind(Kind::Float).abs().max().double_value(&[]) == 0.0,
        "-inf logits get no gradient"
    );
    let _ = y.narrow(0, 9, 1).fill_(v + 3);
    let loss = kernels::xent::xent_(&mut z.copy(), &y, &w).unwrap();
    assert!(
        loss.double_value(&[9]).is_nan() && !loss.double_value(&[8]).is_nan(),
        "an id past the row: NaN loss"
    );
}

/// The graphed absorbed decode step of `mla_decoupled` (and a latent with
/// RoPE off) through the fused kernels (`kernels::mla`) against the same
/// step in libtorch ops, bf16: logits within bf16 rounding up to the first
/// near tie that parts the tokens, and the kernels ran.
#[test]
fn fused_absorbed_decode_matches_libtorch() {
    use knlp::attention::Rope;
    use knlp::decode::{generate, GraphMode, Options};
    use knlp::models::gpt2::{self, Gpt2};
    use knlp::models::Model;
    let Some(dev) = cuda() else { return };
    let _g = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    kernels::mla::set_enabled(true); // off by default until measured on a GPU
    for (att, rope, b) in
        [("mla_decoupled", None, 1), ("mla_decoupled", None, 5), ("mla", Some(Rope::Off), 2)]
    {
        tch::manual_seed(7);
        let c = gpt2::Config {
            block_size: 300,
            vocab_size: 500,
            attention: att.into(),
            rope,
            d_latent: 64,
            ..gpt2::Config::custom(3, 4, 128)
        };
        let mut m = Gpt2::new(c).unwrap();
        m.store_mut().finalize(dev).unwrap();
        let prompt = Tensor::randint(500, [b, 200], (Kind::Int64, dev));
        let o = Options {
            max_new_tokens: 40,
            keep_logits: true,
            amp: Some(knlp::shim::AutocastDtype::BF16),
            ..Options::default()
        };
        kernels::set_enabled(true);
        let before = kernels::launches();
        let fused = generate(&m, &prompt, &Options { graph: GraphMode::On, ..o.clone() }).unwrap();
        assert!(
            kernels::enabled() && kernels::launches() > before,
            "{att} B={b}: the fused step did not run"
        );
        kernels::set_enabled(false);
        let plain = generate(&m, &prompt, &Options { graph: GraphMode::StaticEager, ..o.clone() }).unwrap();
        kernels::set_enabled(true);
        let (ft, pt) = (fused.tokens.to(Device::Cpu), plain.tokens.to(Device::Cpu));
        let mut compared = 0;
        for (i, (x, y)) in fused.logits.iter().zip(&plain.logits).enumerate() {
            let scale = y.abs().max().double_value(&[]).max(1.0);
            let d = (x - y).abs().max().double_value(&[]);
            assert!(d <= 3e-2 * scale, "{att} B={b} step {i}: logits differ by {d} (scale {scale})");
            compared += 1;
            if !ft.narrow(1, 200 + i as i64, 1).equal(&pt.narrow(1, 200 + i as i64, 1)) {
                break;
            }
        }
        println!("{att} B={b}: {compared} steps compared");
        assert!(compared >= 1);
    }
    kernels::mla::set_enabled(false);
}

/// The profiler sees CUDA kernels, knlp's NVRTC ones among them under their
/// own kind (what `profile()` and `gpt2_gpu.rhai --profile` report).
#[test]
fn profiler_records_the_fused_kernels() {
    let _g = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = cuda() else { return };
    kernels::set_enabled(true);
    let x = Tensor::rand([1 << 20], (Kind::Float, dev));
    select::kth_smallest(&x, 1000).unwrap(); // compile outside the profile
    let (v, rep) = knlp::profile::run(None, || {
        let v = select::kth_smallest(&x, 1000).unwrap();
        tch::Cuda::synchronize(0);
        v
    })
    .unwrap();
    assert_eq!(v, x.kthvalue(1000, 0, false).0.double_value(&[]));
    assert!(rep.gpu_ms() > 0.0 && rep.kernel_calls() > 0, "no device events: {rep:?}");
    let fused: Vec<_> =
        rep.kernels.iter().filter(|e| knlp::profile::kind(&e.name) == "knlp fused (nvrtc)").collect();
    assert!(fused.iter().any(|e| e.name.contains("score_keys")), "{:?}", rep.kernels);
}
