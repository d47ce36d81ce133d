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

/// Every kernel source, at every specialization knlp launches and at the
/// boundary of what the families accept, compiles with the torch wheel's
/// NVRTC for Ampere and Hopper on this machine (no GPU needed), declares
/// exactly the entry points the Rust side launches, does not spill, and
/// fits the register file at its block size. `make test` sets
/// KNLP_REQUIRE_NVRTC=1, so a missing NVRTC fails there instead of skipping.
#[test]
fn every_kernel_compiles_without_spills_for_ampere_and_hopper() {
    if let Err(e) = kernels::nvrtc::get() {
        assert!(std::env::var_os("KNLP_REQUIRE_NVRTC").is_none(), "KNLP_REQUIRE_NVRTC=1 but {e}");
        eprintln!("skipped: {e}");
        return;
    }
    let sources = kernels::check::sources(&knlp::prune::score::cuda_scorers());
    let families: std::collections::BTreeSet<_> = sources.iter().map(|s| s.family).collect();
    assert_eq!(families.into_iter().collect::<Vec<_>>(), ["mla", "norm", "prune", "xent"]);
    // The profiler's kind table names the same entry points.
    for (entry, _) in sources.iter().flat_map(|s| &s.entries) {
        assert_eq!(knlp::profile::kind(entry), "knlp fused (nvrtc)", "{entry}");
    }
    for arch in [80, 90] {
        let reports = kernels::check::run(&sources, arch).unwrap();
        assert_eq!(reports.len(), sources.len());
        for (r, s) in reports.iter().zip(&sources) {
            assert!(r.problems.is_empty(), "sm_{arch} {} {}: {:?}", r.family, r.variant, r.problems);
            assert_eq!(r.entries.len(), s.entries.len(), "{} {}", r.family, r.variant);
            assert!(r.entries.iter().all(|e| e.registers > 0 && e.threads > 0), "{} {}", r.family, r.variant);
        }
    }
    // A source NVRTC rejects is an error that carries its log.
    let bad = [kernels::check::Source {
        family: "broken",
        variant: String::new(),
        src: "extern \"C\" __global__ void k() { undeclared(); }".into(),
        entries: vec![("k", 32)],
    }];
    let e = format!("{:#}", kernels::check::run(&bad, 90).err().expect("an error"));
    assert!(e.contains("could not compile kernel broken") && e.contains("undeclared"), "{e}");
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

/// Largest absolute difference of two tensors, and the largest magnitude of
/// the second (as float64).
fn diff_scale(a: &Tensor, b: &Tensor) -> (f64, f64) {
    let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
    ((&a - &b).abs().max().double_value(&[]), b.abs().max().double_value(&[]))
}

/// `x + a` then a layer norm through the fused op (`knlp::fused`), or
/// through the plain ops; a loss that reaches `x1` (when `use_x1`) and `y`
/// (when `use_y`); returns the outputs and the gradients of x, a, w, b.
/// `probes` weigh `y` and `x1` in the loss; the caller draws them once so
/// both paths see the same ones.
fn add_ln_grads(
    fused: bool,
    inputs: &[Tensor; 4],
    probes: &[Tensor; 2],
    bias: bool,
    use_x1: bool,
    use_y: bool,
) -> Vec<Tensor> {
    let leaf = |t: &Tensor| t.copy().set_requires_grad(true);
    let (x, a, w, b) = (leaf(&inputs[0]), leaf(&inputs[1]), leaf(&inputs[2]), leaf(&inputs[3]));
    let c = *x.size().last().unwrap();
    let bo = if bias { Some(&b) } else { None };
    let (x1, y) = if fused {
        knlp::fused::add_layer_norm(&x, &a, &w, bo, 1e-5).unwrap()
    } else {
        let x1 = &x + &a;
        let y = x1.layer_norm([c], Some(&w), bo, 1e-5, false);
        (x1, y)
    };
    let r1 = probes[0].to_kind(y.kind());
    let r2 = probes[1].to_kind(x1.kind());
    let mut loss = Tensor::zeros([], (Kind::Double, x.device()));
    if use_y {
        loss += (&y * &r1).to_kind(Kind::Double).sum(Kind::Double);
    }
    if use_x1 {
        loss += (&x1 * &r2).to_kind(Kind::Double).sum(Kind::Double);
    }
    loss.backward();
    let g = |t: &Tensor| {
        let g = t.grad();
        if g.defined() {
            g
        } else {
            t.zeros_like()
        }
    };
    vec![x1.detach(), y.detach(), g(&x), g(&a), g(&w), if bias { g(&b) } else { b.zeros_like() }]
}

/// The fused residual add + layer norm's autograd Function
/// (csrc/fused.cpp) on the CPU, where its callbacks run the libtorch
/// reference, against autograd through the plain ops: outputs and the
/// gradients of x, a, w and b, with and without a bias, with the new
/// residual used further or not, with the normalised output used or not.
#[test]
fn add_layer_norm_function_matches_autograd_on_cpu() {
    // The generator and the fused-call counter are process-wide.
    let _g = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    for (bias, use_x1, use_y) in
        [(true, true, true), (false, true, true), (true, false, true), (true, true, false)]
    {
        tch::manual_seed(3);
        let o = (Kind::Double, Device::Cpu);
        let inputs = [
            Tensor::randn([2, 5, 12], o) * 3.0 + 1.0,
            Tensor::randn([2, 5, 12], o),
            Tensor::randn([12], o),
            Tensor::randn([12], o),
        ];
        let probes = [Tensor::randn([2, 5, 12], o), Tensor::randn([2, 5, 12], o)];
        let f = add_ln_grads(true, &inputs, &probes, bias, use_x1, use_y);
        let r = add_ln_grads(false, &inputs, &probes, bias, use_x1, use_y);
        for (what, a, b) in ["x1", "y", "grad x", "grad a", "grad w", "grad b"]
            .iter()
            .zip(&f)
            .zip(&r)
            .map(|((w, a), b)| (w, a, b))
        {
            let (d, s) = diff_scale(a, b);
            assert!(
                d <= 1e-10 * s.max(1.0),
                "bias {bias}, x1 used {use_x1}, y used {use_y}: {what} differs by {d} (scale {s})"
            );
        }
    }
}

fn small_gpt2(attention: &str, bias: bool, dev: Device) -> knlp::models::gpt2::Gpt2 {
    use knlp::models::gpt2::{self, Gpt2};
    use knlp::models::Model;
    let c = gpt2::Config {
        block_size: 24,
        vocab_size: 61,
        attention: attention.into(),
        d_latent: 16,
        bias,
        dropout: 0.0,
        ..gpt2::Config::custom(2, 4, 32)
    };
    let mut m = Gpt2::new(c).unwrap();
    m.store_mut().finalize(dev).unwrap();
    m
}

/// Loss and every flat gradient of one training forward and backward.
fn loss_and_grads(m: &knlp::models::gpt2::Gpt2, x: &Tensor, y: &Tensor, amp: bool) -> (f64, Vec<Tensor>) {
    use knlp::models::Model;
    m.store().zero_grad().unwrap();
    let l = if amp {
        knlp::shim::with_autocast(knlp::shim::AutocastDtype::BF16, || m.train_loss(x, y).unwrap())
            .unwrap()
            .unwrap()
    } else {
        m.train_loss(x, y).unwrap().unwrap()
    };
    l.backward();
    (l.double_value(&[]), m.store().groups().iter().map(|g| g.grad.copy()).collect())
}

/// GPT-2 with every residual add fused into the next layer norm
/// (`Gpt2::blocks_fused`) against the plain block loop, on the CPU through
/// the Function's reference callbacks: the same loss and gradients, for mha
/// with biases and mla without.
#[test]
fn gpt2_fused_add_layer_norm_matches_the_block_loop_on_cpu() {
    let _g = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    kernels::norm::set_enabled(true);
    for (att, bias) in [("mha", true), ("mla", false)] {
        tch::manual_seed(5);
        let m = small_gpt2(att, bias, Device::Cpu);
        let x = Tensor::randint(61, [3, 24], (Kind::Int64, Device::Cpu));
        let y = Tensor::randint(61, [3, 24], (Kind::Int64, Device::Cpu));
        knlp::fused::set_cpu_reference(false);
        let (l0, g0) = loss_and_grads(&m, &x, &y, false);
        knlp::fused::set_cpu_reference(true);
        let before = knlp::fused::calls();
        let (l1, g1) = loss_and_grads(&m, &x, &y, false);
        // ln_2 and the next block's ln_1 (ln_f for the last block) per layer.
        assert_eq!(knlp::fused::calls() - before, 4, "{att}: the fused path did not run");
        assert!((l0 - l1).abs() <= 1e-6 * l0.abs(), "{att}: loss {l1} vs {l0}");
        for (a, b) in g1.iter().zip(&g0) {
            let (d, s) = diff_scale(a, b);
            assert!(s > 0.0 && d <= 1e-5 * s, "{att}: gradients differ by {d} (scale {s})");
        }
    }
    knlp::fused::set_cpu_reference(false);
    kernels::norm::set_enabled(false);
}

/// The add + layer norm kernels against their libtorch reference on CUDA:
/// the new residual bit for bit, mean and rstd, the bf16 output within its
/// rounding; the backward's gradients with and without an incoming residual
/// gradient and a bias; widths 64, 768 (GPT-2) and 1020 (not a multiple of
/// 128: the last lane's columns are partly past the row). Then GPT-2 under bf16 autocast, fused against the block
/// loop.
#[test]
fn add_layer_norm_kernels_match_the_reference() {
    let Some(dev) = cuda() else { return };
    let _g = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    kernels::set_enabled(true);
    kernels::available(dev).expect("a CUDA machine must be able to run the fused kernels");
    use kernels::norm;
    for (rows, c) in [(5, 64), (1000, 768), (37, 1020)] {
        tch::manual_seed(rows);
        let f32o = (Kind::Float, dev);
        let x = Tensor::randn([rows, c], f32o) * 3.0 + 0.5;
        let a = Tensor::randn([rows, c], f32o).to_kind(Kind::BFloat16);
        let w = Tensor::randn([c], f32o);
        let b = Tensor::randn([c], f32o);
        for bias in [true, false] {
            let bo = if bias { Some(&b) } else { None };
            let f = norm::forward(&x, &a, &w, bo, 1e-5).unwrap();
            let r = norm::reference_forward(&x, &a, &w, bo, 1e-5, Kind::BFloat16).unwrap();
            assert!(f.x1.equal(&r.x1), "{rows}x{c}: x1 is not x + a");
            for (what, p, q, tol) in
                [("mean", &f.mean, &r.mean, 1e-5), ("rstd", &f.rstd, &r.rstd, 1e-5), ("y", &f.y, &r.y, 8e-3)]
            {
                let (d, s) = diff_scale(p, q);
                assert!(d <= tol * s.max(1.0), "{rows}x{c} bias {bias}: {what} differs by {d} (scale {s})");
            }
            let gy = Tensor::randn([rows, c], f32o).to_kind(Kind::BFloat16);
            let gx1 = Tensor::randn([rows, c], f32o);
            for incoming in [Some(&gx1), None] {
                let g = norm::backward(incoming, &gy, &f.x1, &w, bias, &f.mean, &f.rstd).unwrap();
                let q =
                    norm::reference_backward(incoming, &gy, &f.x1, &w, bo, &f.mean, &f.rstd, Kind::BFloat16)
                        .unwrap();
                let mut pairs =
                    vec![("gx", g.gx, q.gx, 1e-4), ("ga", g.ga, q.ga, 8e-3), ("gw", g.gw, q.gw, 1e-4)];
                if bias {
                    pairs.push(("gb", g.gb.unwrap(), q.gb.unwrap(), 1e-4));
                } else {
                    assert!(g.gb.is_none());
                }
                for (what, p, q, tol) in pairs {
                    let (d, s) = diff_scale(&p, &q);
                    assert!(d <= tol * s, "{rows}x{c} bias {bias}: {what} differs by {d} (scale {s})");
                }
            }
        }
    }
    assert!(kernels::enabled(), "a kernel failed and switched the fused kernels off");
    norm::set_enabled(true);
    tch::manual_seed(5);
    let m = small_gpt2("mha", true, dev);
    let x = Tensor::randint(61, [4, 24], (Kind::Int64, dev));
    let y = Tensor::randint(61, [4, 24], (Kind::Int64, dev));
    norm::set_enabled(false);
    let (l0, g0) = loss_and_grads(&m, &x, &y, true);
    norm::set_enabled(true);
    let (before, launched) = (knlp::fused::calls(), kernels::launches());
    let (l1, g1) = loss_and_grads(&m, &x, &y, true);
    norm::set_enabled(false);
    assert_eq!(knlp::fused::calls() - before, 4, "the fused path did not run");
    assert!(kernels::launches() - launched >= 8, "the fused path ran without its kernels");
    assert!((l0 - l1).abs() <= 2e-3 * l0.abs(), "loss {l1} vs {l0}");
    for (a, b) in g1.iter().zip(&g0) {
        let (d, s) = diff_scale(a, b);
        assert!(s > 0.0 && d <= 2e-2 * s, "gradients differ by {d} (scale {s})");
    }
}
