//! Models: parameter counts and names, forward shapes, causality, gradients
//! (finite differences in float64), initialisation, weight tying, input
//! validation. CPU only; a few seconds in release.
use knlp::models::gpt2::{self, Gpt2};
use knlp::models::lenet5::{self, LeNet5};
use knlp::models::resnet::{self, ResNet, Stem};
use knlp::models::{cross_entropy, finalize, Model, Task};
use serde_json::json;
use tch::{Device, Kind, Tensor};

const CPU: Device = Device::Cpu;

/// libtorch's default generator is process-wide: the tests here seed it
/// and draw from it (model init, inputs), so they run one at a time.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rng() -> std::sync::MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

fn names(m: &dyn Model) -> Vec<String> {
    m.store().params().iter().map(|p| p.name.clone()).collect()
}

fn param(m: &dyn Model, name: &str) -> Tensor {
    m.store().get(name).unwrap_or_else(|| panic!("no parameter {name}")).tensor.shallow_clone()
}

fn std_mean(t: &Tensor) -> (f64, f64) {
    let t = t.detach().to_kind(Kind::Double);
    (t.std(true).double_value(&[]), t.mean(Kind::Double).double_value(&[]))
}

fn tiny_gpt2(tie: bool) -> gpt2::Config {
    gpt2::Config { block_size: 8, vocab_size: 11, tie_weights: tie, ..gpt2::Config::custom(2, 2, 8) }
}

fn tokens(shape: &[i64], vocab: i64) -> Tensor {
    Tensor::randint(vocab, shape, (Kind::Int64, CPU))
}

// ---- parameter counts --------------------------------------------------------

#[test]
fn lenet5_has_61750_parameters() {
    let _rng = rng();
    let m = LeNet5::new(lenet5::Config::default()).unwrap();
    assert_eq!(m.store().numel(), 61_750);
    assert_eq!(lenet5::Config::default().num_params(), 61_750);
    let c = lenet5::Config { classes: 100, in_channels: 3 };
    assert_eq!(LeNet5::new(c.clone()).unwrap().store().numel(), c.num_params());
}

#[test]
fn resnet_parameter_counts() {
    let _rng = rng();
    for (cfg, want) in [
        (resnet::Config::resnet18(10), 11_173_962),
        (resnet::Config::resnet50(100), 23_712_932),
        (resnet::Config::resnet50(1000), 25_557_032),
        // The CIFAR stem (3x3 conv) on ResNet-50: 7,680 fewer stem weights.
        (resnet::Config { stem: Some(Stem::Cifar), ..resnet::Config::resnet50(100) }, 23_705_252),
    ] {
        assert_eq!(cfg.num_params().unwrap(), want, "{cfg:?}");
        let m = ResNet::new(cfg.clone()).unwrap();
        assert_eq!(m.store().numel(), want, "{cfg:?}");
    }
    // torchvision's ImageNet models (1000 classes, 7x7 stem).
    for (depth, want) in [(18, 11_689_512), (34, 21_797_672), (101, 44_549_160), (152, 60_192_808)] {
        let cfg = resnet::Config { depth, classes: 1000, in_channels: 3, stem: Some(Stem::Imagenet) };
        assert_eq!(cfg.num_params().unwrap(), want, "resnet{depth}");
    }
    // The counting function agrees with construction for the other shapes.
    for cfg in [
        resnet::Config { depth: 34, classes: 7, in_channels: 1, stem: Some(Stem::Imagenet) },
        resnet::Config { depth: 50, classes: 10, in_channels: 3, stem: Some(Stem::Cifar) },
    ] {
        assert_eq!(ResNet::new(cfg.clone()).unwrap().store().numel(), cfg.num_params().unwrap());
    }
}

#[test]
fn gpt2_parameter_counts() {
    let _rng = rng();
    let c = gpt2::Config::preset("gpt2").unwrap();
    assert_eq!(c.num_params(false).unwrap(), 124_475_904);
    assert_eq!(c.num_params(true).unwrap(), 123_689_472);
    assert_eq!(c.padded_vocab_size, Some(50304));
    assert_eq!(c.vocab_size, 50257);
    for (name, want) in [("gpt2-medium", 354_871_296), ("774M", 774_090_240), ("gpt2-xl", 1_557_686_400)] {
        assert_eq!(gpt2::Config::preset(name).unwrap().num_params(false).unwrap(), want, "{name}");
    }
    let untied = gpt2::Config { tie_weights: false, ..c.clone() };
    assert_eq!(untied.num_params(false).unwrap(), 163_109_376);
    let no_bias = gpt2::Config { bias: false, ..c.clone() };
    assert_eq!(no_bias.num_params(false).unwrap(), 124_373_760);
    // The counting function against real construction, tied and untied.
    for tie in [true, false] {
        for bias in [true, false] {
            let cfg = gpt2::Config { bias, ..tiny_gpt2(tie) };
            let m = Gpt2::new(cfg.clone()).unwrap();
            assert_eq!(m.num_params(false), cfg.num_params(false).unwrap());
            assert_eq!(m.num_params(true), cfg.num_params(true).unwrap());
        }
    }
    assert_eq!(Gpt2::new(tiny_gpt2(true)).unwrap().num_params(false), 2336);
}

#[test]
fn gpt2_124m_constructs_with_the_exact_count() {
    let _rng = rng();
    let m = Gpt2::new(gpt2::Config::preset("124M").unwrap()).unwrap();
    assert_eq!(m.num_params(false), 124_475_904);
    assert_eq!(m.num_params(true), 123_689_472);
    assert_eq!(m.task(), Task::LanguageModel { vocab: 50304, block_size: 1024 });
}

// ---- names --------------------------------------------------------------------

#[test]
fn gpt2_names_follow_hugging_face() {
    let _rng = rng();
    let m = Gpt2::new(tiny_gpt2(true)).unwrap();
    let mut want = vec!["transformer.wte.weight".to_string(), "transformer.wpe.weight".to_string()];
    for i in 0..2 {
        for leaf in [
            "ln_1.weight",
            "ln_1.bias",
            "attn.c_attn.weight",
            "attn.c_attn.bias",
            "attn.c_proj.weight",
            "attn.c_proj.bias",
            "ln_2.weight",
            "ln_2.bias",
            "mlp.c_fc.weight",
            "mlp.c_fc.bias",
            "mlp.c_proj.weight",
            "mlp.c_proj.bias",
        ] {
            want.push(format!("transformer.h.{i}.{leaf}"));
        }
    }
    want.push("transformer.ln_f.weight".into());
    want.push("transformer.ln_f.bias".into());
    assert_eq!(names(&m), want);
    assert_eq!(m.tied(), vec![("lm_head.weight".to_string(), "transformer.wte.weight".to_string())]);
    use knlp::params::Role;
    let role = |n: &str| m.store().get(n).unwrap().role;
    assert_eq!(role("transformer.wte.weight"), Role::Embedding);
    assert_eq!(role("transformer.wpe.weight"), Role::Embedding);
    assert_eq!(role("transformer.h.0.attn.c_attn.weight"), Role::Weight);
    assert_eq!(role("transformer.h.1.mlp.c_proj.bias"), Role::Bias);
    assert_eq!(role("transformer.h.0.ln_2.weight"), Role::Norm);
    // No bias: no bias tensors anywhere.
    let m = Gpt2::new(gpt2::Config { bias: false, ..tiny_gpt2(false) }).unwrap();
    assert!(names(&m).iter().all(|n| !n.ends_with(".bias")));
    assert_eq!(names(&m).last().unwrap(), "lm_head.weight");
    assert!(m.tied().is_empty());
}

#[test]
fn cnn_names_follow_python_and_torchvision() {
    let _rng = rng();
    let m = LeNet5::new(lenet5::Config::default()).unwrap();
    let want = [
        "layer1.0.weight",
        "layer1.0.bias",
        "layer1.1.weight",
        "layer1.1.bias",
        "layer2.0.weight",
        "layer2.0.bias",
        "layer2.1.weight",
        "layer2.1.bias",
        "fc.weight",
        "fc.bias",
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
    ];
    assert_eq!(names(&m), want);
    let buffers: Vec<&str> = m.store().buffers().iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        &buffers[..3],
        ["layer1.1.running_mean", "layer1.1.running_var", "layer1.1.num_batches_tracked"]
    );
    let m = ResNet::new(resnet::Config::resnet50(10)).unwrap();
    let n = names(&m);
    assert_eq!(&n[..3], ["conv1.weight", "bn1.weight", "bn1.bias"]);
    for name in [
        "layer1.0.conv3.weight",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.bias",
        "layer4.2.bn3.weight",
        "fc.weight",
    ] {
        assert!(n.iter().any(|x| x == name), "{name}");
    }
    assert!(!n.iter().any(|x| x == "layer1.1.downsample.0.weight"));
    assert_eq!(param(&m, "conv1.weight").size(), [64, 3, 7, 7]);
    assert_eq!(param(&m, "layer2.0.conv2.weight").size(), [128, 128, 3, 3], "stride on the 3x3 (v1.5)");
    let m = ResNet::new(resnet::Config::resnet18(10)).unwrap();
    assert_eq!(param(&m, "conv1.weight").size(), [64, 3, 3, 3]);
    assert!(!names(&m).iter().any(|x| x.starts_with("layer1.0.downsample")));
    assert_eq!(param(&m, "layer2.0.downsample.0.weight").size(), [128, 64, 1, 1]);
    assert_eq!(m.arch(), "resnet18");
}

// ---- forward --------------------------------------------------------------------

#[test]
fn forward_shapes() {
    let _rng = rng();
    tch::manual_seed(1);
    let mut m = LeNet5::new(lenet5::Config::default()).unwrap();
    finalize(&mut m, CPU).unwrap();
    let x = Tensor::randn([3, 1, 32, 32], (Kind::Float, CPU));
    for train in [true, false] {
        assert_eq!(m.forward(&x, train).unwrap().size(), [3, 10]);
    }
    assert_eq!(m.task(), Task::Classify { classes: 10 });

    let mut m = ResNet::new(resnet::Config::resnet18(10)).unwrap();
    finalize(&mut m, CPU).unwrap();
    let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, CPU));
    for train in [true, false] {
        assert_eq!(m.forward(&x, train).unwrap().size(), [2, 10]);
    }

    let mut m = ResNet::new(resnet::Config::resnet50(100)).unwrap();
    finalize(&mut m, CPU).unwrap();
    let x = Tensor::randn([2, 3, 64, 64], (Kind::Float, CPU));
    let y = tch::no_grad(|| m.forward(&x, false)).unwrap();
    assert_eq!(y.size(), [2, 100]);
    assert_eq!(m.arch(), "resnet50");

    let mut m = Gpt2::new(tiny_gpt2(true)).unwrap();
    finalize(&mut m, CPU).unwrap();
    for t in [1, 5, 8] {
        let y = m.forward(&tokens(&[2, t], 11), true).unwrap();
        assert_eq!(y.size(), [2, t, 64]);
    }
    // int32 ids work too.
    let y = m.forward(&tokens(&[1, 3], 11).to_kind(Kind::Int), false).unwrap();
    assert_eq!(y.size(), [1, 3, 64]);
}

#[test]
fn batch_norm_statistics_move_only_in_training() {
    let _rng = rng();
    tch::manual_seed(2);
    let mut m = LeNet5::new(lenet5::Config::default()).unwrap();
    finalize(&mut m, CPU).unwrap();
    let buf = |n: &str| m.store().buffers().iter().find(|(b, _)| b == n).unwrap().1.shallow_clone();
    let x = Tensor::randn([4, 1, 32, 32], (Kind::Float, CPU)) * 3.0 + 1.0;
    let before = buf("layer1.1.running_mean").copy();
    let _ = m.forward(&x, false).unwrap();
    assert!(buf("layer1.1.running_mean").equal(&before));
    let _ = m.forward(&x, true).unwrap();
    assert!(!buf("layer1.1.running_mean").equal(&before));
    assert_eq!(buf("layer2.1.num_batches_tracked").int64_value(&[]), 1);
}

#[test]
fn gpt2_is_causal() {
    let _rng = rng();
    tch::manual_seed(3);
    // Dropout is configured but off in eval mode.
    let mut m = Gpt2::new(gpt2::Config { dropout: 0.1, ..gpt2::Config::custom(2, 4, 32) }.resolve().unwrap())
        .unwrap();
    finalize(&mut m, CPU).unwrap();
    let _ = m.cfg();
    let (b, t) = (3, 24);
    let x = Tensor::randint(50257, [b, t], (Kind::Int64, CPU));
    let y = tch::no_grad(|| m.forward(&x, false)).unwrap();
    for k in [0, 1, 7, 16, 23] {
        let x2 = x.copy();
        let _ = x2.narrow(1, k, t - k).random_from_(0, Some(50257));
        let y2 = tch::no_grad(|| m.forward(&x2, false)).unwrap();
        assert!(y2.narrow(1, 0, k).equal(&y.narrow(1, 0, k)), "logits before {k} changed");
        if k < t {
            assert!(!y2.narrow(1, k, t - k).equal(&y.narrow(1, k, t - k)), "later logits must change");
        }
    }
    // A prefix on its own gives the same logits as inside a longer sequence.
    let y5 = tch::no_grad(|| m.forward(&x.narrow(1, 0, 5), false)).unwrap();
    assert!(y5.allclose(&y.narrow(1, 0, 5), 1e-5, 1e-6, false));
}

#[test]
fn gpt2_dropout_is_active_only_in_training() {
    let _rng = rng();
    tch::manual_seed(4);
    let mut m = Gpt2::new(gpt2::Config { dropout: 0.5, ..tiny_gpt2(true) }).unwrap();
    finalize(&mut m, CPU).unwrap();
    let x = tokens(&[2, 8], 11);
    let e1 = m.forward(&x, false).unwrap();
    let e2 = m.forward(&x, false).unwrap();
    assert!(e1.equal(&e2));
    let t1 = m.forward(&x, true).unwrap();
    let t2 = m.forward(&x, true).unwrap();
    assert!(!t1.equal(&t2));
}

// ---- gradients (float64 finite differences) ---------------------------------------

/// Switch every parameter and buffer to float64 in place (aliases follow).
fn to_double(m: &dyn Model) {
    for p in m.store().params() {
        knlp::shim::set_data(&p.tensor, &p.tensor.detach().to_kind(Kind::Double)).unwrap();
    }
    for (_, b) in m.store().buffers() {
        if b.kind() == Kind::Float {
            knlp::shim::set_data(b, &b.to_kind(Kind::Double)).unwrap();
        }
    }
}

/// Analytic gradients against central differences of the loss, for `k`
/// entries of each named parameter, evenly spaced over its first `limit`
/// entries (0: all of them).
fn grad_check(m: &dyn Model, x: &Tensor, y: &Tensor, train: bool, picks: &[(&str, i64, i64)]) {
    to_double(m);
    for p in m.store().params() {
        let mut g = p.tensor.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    let loss = || cross_entropy(&m.forward(x, train).unwrap(), y).unwrap();
    loss().backward();
    let eps = 1e-6;
    let mut nonzero = 0;
    for &(name, k, limit) in picks {
        let p = param(m, name);
        assert_eq!(p.kind(), Kind::Double);
        let flat = p.view([-1]);
        let grad = p.grad().view([-1]);
        let n = if limit > 0 { limit.min(flat.size()[0]) } else { flat.size()[0] };
        for j in 0..k {
            let i = (2 * j + 1) * n / (2 * k);
            let orig = flat.double_value(&[i]);
            let set = |v: f64| {
                tch::no_grad(|| {
                    let _ = flat.narrow(0, i, 1).fill_(v);
                })
            };
            set(orig + eps);
            let lp = loss().double_value(&[]);
            set(orig - eps);
            let lm = loss().double_value(&[]);
            set(orig);
            let fd = (lp - lm) / (2.0 * eps);
            let an = grad.double_value(&[i]);
            // Round-off of the difference quotient is about 1e-16 * loss / eps.
            assert!(
                (fd - an).abs() <= 1e-8 + 1e-5 * an.abs(),
                "{name}[{i}]: analytic {an:e}, numeric {fd:e}"
            );
            nonzero += (an.abs() > 1e-6) as usize;
        }
    }
    assert!(nonzero >= picks.len(), "too few informative entries ({nonzero})");
}

#[test]
fn lenet5_gradients_match_finite_differences() {
    let _rng = rng();
    tch::manual_seed(5);
    let m = LeNet5::new(lenet5::Config::default()).unwrap();
    let x = Tensor::randn([4, 1, 32, 32], (Kind::Double, CPU));
    let y = Tensor::from_slice(&[0i64, 3, 9, 3]);
    let picks = [
        ("layer1.0.weight", 4, 0),
        ("layer1.1.weight", 2, 0),
        ("layer2.1.bias", 2, 0),
        ("layer2.0.weight", 4, 0),
        ("fc.weight", 4, 0),
        ("fc1.bias", 4, 0),
        ("fc2.weight", 4, 0),
    ];
    // Training mode: batch statistics are part of the graph (and make the
    // convolution biases' gradients exactly zero, so they are checked in
    // evaluation mode below).
    grad_check(&m, &x, &y, true, &picks);
    grad_check(&m, &x, &y, false, &[("layer1.0.bias", 3, 0), ("layer2.0.bias", 3, 0), ("fc.weight", 4, 0)]);
}

#[test]
fn gpt2_gradients_match_finite_differences() {
    let _rng = rng();
    tch::manual_seed(6);
    let m = Gpt2::new(tiny_gpt2(true)).unwrap();
    // Every id appears, so every used wte row gets both gradients.
    let x = Tensor::arange(16, (Kind::Int64, CPU)).remainder(11).view([2, 8]);
    let y = tokens(&[2, 8], 11);
    let picks = [
        ("transformer.wte.weight", 4, 88),
        ("transformer.wte.weight", 2, 0),
        ("transformer.wpe.weight", 4, 0),
        ("transformer.h.0.ln_1.weight", 2, 0),
        ("transformer.h.0.ln_1.bias", 2, 0),
        ("transformer.h.0.attn.c_attn.weight", 6, 0),
        // q and v biases (the k bias has an exactly zero gradient).
        ("transformer.h.1.attn.c_attn.bias", 2, 8),
        ("transformer.h.1.attn.c_attn.bias", 1, 0),
        ("transformer.h.0.attn.c_proj.weight", 3, 0),
        ("transformer.h.1.mlp.c_fc.weight", 3, 0),
        ("transformer.h.1.mlp.c_proj.weight", 3, 0),
        ("transformer.h.1.mlp.c_proj.bias", 2, 0),
        ("transformer.ln_f.weight", 2, 0),
        ("transformer.ln_f.bias", 2, 0),
    ];
    grad_check(&m, &x, &y, false, &picks);
    let m = Gpt2::new(tiny_gpt2(false)).unwrap();
    grad_check(&m, &x, &y, true, &[("lm_head.weight", 6, 0), ("transformer.wte.weight", 4, 88)]);
}

// ---- initialisation -----------------------------------------------------------------

#[test]
fn gpt2_init_statistics() {
    let _rng = rng();
    tch::manual_seed(7);
    let cfg = gpt2::Config { vocab_size: 512, block_size: 256, ..gpt2::Config::custom(4, 4, 256) };
    let m = Gpt2::new(cfg).unwrap();
    let proj = 0.02 / (2.0f64 * 4.0).sqrt();
    for (name, want) in [
        ("transformer.wte.weight", 0.02),
        ("transformer.wpe.weight", 0.02),
        ("transformer.h.0.attn.c_attn.weight", 0.02),
        ("transformer.h.3.mlp.c_fc.weight", 0.02),
        ("transformer.h.0.attn.c_proj.weight", proj),
        ("transformer.h.2.mlp.c_proj.weight", proj),
    ] {
        let (std, mean) = std_mean(&param(&m, name));
        assert!((std / want - 1.0).abs() < 0.03, "{name}: std {std}, want {want}");
        assert!(mean.abs() < 0.1 * want, "{name}: mean {mean}");
    }
    for name in
        ["transformer.h.1.attn.c_attn.bias", "transformer.h.1.mlp.c_proj.bias", "transformer.ln_f.bias"]
    {
        assert_eq!(param(&m, name).abs().max().double_value(&[]), 0.0, "{name}");
    }
    let g = param(&m, "transformer.h.0.ln_1.weight");
    assert!(g.eq(1.0).all().int64_value(&[]) == 1);
}

#[test]
fn cnn_init_statistics() {
    let _rng = rng();
    tch::manual_seed(8);
    let m = ResNet::new(resnet::Config::resnet18(10)).unwrap();
    for (name, fan_out) in [("layer4.0.conv2.weight", 512 * 9), ("layer3.1.conv1.weight", 256 * 9)] {
        let (std, _) = std_mean(&param(&m, name));
        let want = (2.0 / fan_out as f64).sqrt();
        assert!((std / want - 1.0).abs() < 0.03, "{name}: std {std}, want {want}");
    }
    assert!(param(&m, "layer2.0.bn1.weight").eq(1.0).all().int64_value(&[]) == 1);
    assert_eq!(param(&m, "layer2.0.bn1.bias").abs().max().double_value(&[]), 0.0);
    // Linear: PyTorch default U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    let w = param(&m, "fc.weight");
    let bound = 1.0 / 512f64.sqrt();
    assert!(w.abs().max().double_value(&[]) <= bound);
    let (std, _) = std_mean(&w);
    assert!((std / (bound / 3f64.sqrt()) - 1.0).abs() < 0.1);
    let m = LeNet5::new(lenet5::Config::default()).unwrap();
    assert!(param(&m, "layer1.0.weight").abs().max().double_value(&[]) <= 1.0 / 5.0);
    assert!(param(&m, "layer1.0.bias").abs().max().double_value(&[]) > 0.0, "conv bias is drawn, not zero");
}

// ---- weight tying ---------------------------------------------------------------------

#[test]
fn tied_head_shares_storage_with_wte() {
    let _rng = rng();
    tch::manual_seed(9);
    let mut m = Gpt2::new(tiny_gpt2(true)).unwrap();
    assert!(m.store().get("lm_head.weight").is_none());
    finalize(&mut m, CPU).unwrap();
    let wte = param(&m, "transformer.wte.weight");
    assert_eq!(m.lm_head_weight().data_ptr(), wte.data_ptr());
    // Ids 0..5 in the input; row 40 is only used by the head.
    let x = Tensor::arange(5, (Kind::Int64, CPU)).view([1, 5]);
    let before = tch::no_grad(|| m.forward(&x, false)).unwrap();
    tch::no_grad(|| {
        let _ = wte.narrow(0, 40, 1).f_mul_scalar_(2.0).unwrap();
    });
    let after = tch::no_grad(|| m.forward(&x, false)).unwrap();
    let col = |t: &Tensor| t.narrow(2, 40, 1);
    assert!(col(&after).equal(&(col(&before) * 2.0)), "logit 40 doubles with its wte row");
    assert!(after.narrow(2, 0, 40).equal(&before.narrow(2, 0, 40)));
    // Training updates through both uses land in the one gradient.
    let loss = cross_entropy(&m.forward(&x, true).unwrap(), &x).unwrap();
    loss.backward();
    let g = wte.grad();
    assert!(g.narrow(0, 40, 1).abs().sum(Kind::Float).double_value(&[]) > 0.0, "head gradient");
    assert_eq!(m.store().groups()[0].grad.size()[0], m.num_params(false));
}

#[test]
fn untied_head_is_its_own_parameter() {
    let _rng = rng();
    tch::manual_seed(10);
    let mut m = Gpt2::new(tiny_gpt2(false)).unwrap();
    finalize(&mut m, CPU).unwrap();
    let head = param(&m, "lm_head.weight");
    assert_eq!(head.size(), [64, 8]);
    let wte = param(&m, "transformer.wte.weight");
    assert_ne!(head.data_ptr(), wte.data_ptr());
    let x = Tensor::arange(5, (Kind::Int64, CPU)).view([1, 5]);
    let before = tch::no_grad(|| m.forward(&x, false)).unwrap();
    tch::no_grad(|| {
        let _ = wte.narrow(0, 40, 1).f_mul_scalar_(2.0).unwrap();
    });
    assert!(tch::no_grad(|| m.forward(&x, false)).unwrap().equal(&before));
}

// ---- configuration ------------------------------------------------------------------------

#[test]
fn configs_reject_unknown_keys_and_round_trip() {
    let _rng = rng();
    let e = serde_json::from_value::<gpt2::Config>(json!({"n_layers": 4})).unwrap_err().to_string();
    assert!(e.contains("unknown field `n_layers`") && e.contains("`n_layer`"), "{e}");
    let e = serde_json::from_value::<lenet5::Config>(json!({"class": 4})).unwrap_err().to_string();
    assert!(e.contains("`classes`"), "{e}");
    let e = serde_json::from_value::<resnet::Config>(json!({"layers": 4})).unwrap_err().to_string();
    assert!(e.contains("`depth`"), "{e}");
    let c: resnet::Config = serde_json::from_value(json!({"depth": 50, "stem": "cifar"})).unwrap();
    assert_eq!(c.stem(), Stem::Cifar);

    // Partial maps take defaults; the model records the resolved config,
    // which builds the same model again.
    let c: gpt2::Config =
        serde_json::from_value(json!({"n_layer": 2, "n_head": 2, "n_embd": 8, "block_size": 16})).unwrap();
    let m = Gpt2::new(c).unwrap();
    let rec = m.config();
    assert_eq!(rec["padded_vocab_size"], 50304);
    assert_eq!(rec["vocab_size"], 50257);
    let again = Gpt2::new(serde_json::from_value(rec.clone()).unwrap()).unwrap();
    assert_eq!(again.config(), rec);
    let r = ResNet::new(resnet::Config::resnet50(100)).unwrap();
    assert_eq!(r.config()["stem"], "imagenet");
    let r2 = ResNet::new(serde_json::from_value(r.config()).unwrap()).unwrap();
    assert_eq!(r2.config(), r.config());
}

#[test]
fn gpt2_presets() {
    let _rng = rng();
    let c = gpt2::Config::preset("124M").unwrap();
    assert_eq!(
        (c.preset.as_deref(), c.n_layer, c.n_head, c.n_embd),
        (Some("gpt2"), Some(12), Some(12), Some(768))
    );
    let c: gpt2::Config = serde_json::from_value(json!({"preset": "gpt2-xl", "n_head": 25})).unwrap();
    assert_eq!(c.resolve().unwrap().n_embd, Some(1600));
    let c: gpt2::Config = serde_json::from_value(json!({"preset": "gpt2-medium", "n_layer": 12})).unwrap();
    let e = c.resolve().unwrap_err().to_string();
    assert!(e.contains("n_layer 24") && e.contains("contradicts"), "{e}");
    let e = gpt2::Config::preset("gpt3").unwrap_err().to_string();
    assert!(e.contains("gpt2-medium/350M"), "{e}");
    let e = Gpt2::new(gpt2::Config::custom(2, 3, 8)).err().unwrap().to_string();
    assert!(e.contains("multiple of n_head"), "{e}");
    let c = gpt2::Config { padded_vocab_size: Some(50257), ..gpt2::Config::default() }.resolve().unwrap();
    assert_eq!(c.padded_vocab_size, Some(50257), "no padding on request (Hugging Face weights)");
    assert!(gpt2::Config { padded_vocab_size: Some(100), ..Default::default() }.resolve().is_err());
    assert!(gpt2::Config { dropout: 1.0, ..Default::default() }.resolve().is_err());
}

// ---- bad inputs ----------------------------------------------------------------------------

#[test]
fn bad_inputs_are_errors() {
    let _rng = rng();
    let msg = |r: Result<Tensor, tch::TchError>| knlp::tensor::torch_error(&r.expect_err("an error"));
    let m = LeNet5::new(lenet5::Config::default()).unwrap();
    let e = msg(m.forward(&Tensor::zeros([2, 1, 28, 28], (Kind::Float, CPU)), false));
    assert!(e.contains("lenet5 expects images [B, 1, 32, 32]") && e.contains("[2, 1, 28, 28]"), "{e}");
    assert!(msg(m.forward(&Tensor::zeros([1, 32, 32], (Kind::Float, CPU)), false)).contains("lenet5"));
    assert!(msg(m.forward(&Tensor::zeros([0, 1, 32, 32], (Kind::Float, CPU)), false)).contains("lenet5"));
    assert!(m.forward(&Tensor::new(), false).is_err());
    assert!(m.forward(&Tensor::zeros([2, 1, 32, 32], (Kind::Int64, CPU)), false).is_err());
    assert!(m.forward(&Tensor::zeros([2, 1, 32, 32], (Kind::Double, CPU)), false).is_err());

    let r = ResNet::new(resnet::Config::resnet18(10)).unwrap();
    let e = msg(r.forward(&Tensor::zeros([2, 1, 32, 32], (Kind::Float, CPU)), false));
    assert!(e.contains("resnet18 expects images [B, 3, H, W]"), "{e}");
    assert!(r.forward(&Tensor::zeros([3, 32, 32], (Kind::Float, CPU)), false).is_err());
    assert!(ResNet::new(resnet::Config { depth: 20, ..Default::default() }).is_err());

    let g = Gpt2::new(tiny_gpt2(true)).unwrap();
    let e = msg(g.forward(&tokens(&[2, 9], 11), false));
    assert!(e.contains("sequence length 9 exceeds block_size 8"), "{e}");
    let e = msg(g.forward(&Tensor::zeros([2, 4], (Kind::Float, CPU)), false));
    assert!(e.contains("integer token ids"), "{e}");
    assert!(msg(g.forward(&tokens(&[2, 4, 1], 11), false)).contains("gpt2 expects tokens [B, T]"));
    assert!(msg(g.forward(&tokens(&[8], 11), false)).contains("gpt2 expects tokens [B, T]"));
    assert!(g.forward(&tokens(&[2, 0], 11), false).is_err());
    assert!(g.forward(&Tensor::new(), false).is_err());
    // Ids outside the (padded) vocabulary: an error on the CPU.
    assert!(g.forward(&Tensor::from_slice(&[1i64, 64]).view([1, 2]), false).is_err());
    assert!(g.forward(&Tensor::from_slice(&[-1i64, 2]).view([1, 2]), false).is_err());
}
