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
            fused.update_masks(&store, Some(&opt), s, None).unwrap();
            assert!(kernels::enabled(), "{what}: the fused path failed and switched itself off");
            kernels::set_enabled(false);
            torch.update_masks(&store, Some(&opt), s, None).unwrap();
            kernels::set_enabled(true);
            let (a, b) = (masks(&fused), masks(&torch));
            assert_eq!(a, b, "{what} at {s}: fused and libtorch masks differ");
            let pruned: usize = a.iter().flatten().filter(|k| !**k).count();
            assert_eq!(pruned as i64, (s * n as f64).floor() as i64, "{what} at {s}: not exactly k pruned");
        }
    }
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
    // A target outside the vocabulary is an error, not a stray read.
    let bad = y.copy();
    let _ = bad.narrow(1, 5, 1).fill_(5000);
    let e = knlp::shim::with_autocast(knlp::shim::AutocastDtype::BF16, || {
        knlp::loss::linear_cross_entropy(&h0, &w0, None, &bad, 1024)
    })
    .unwrap()
    .unwrap_err();
    assert!(e.to_string().contains("outside the vocabulary"), "{e}");
}
