//! Numerics against libtorch's own optimizers (through tch) and against
//! hand-computed steps.
use super::*;
use crate::params::{Init, Role};
use tch::nn::OptimizerConfig;
use tch::{nn, Device};

const SHAPES: &[(&str, &[i64], Role)] =
    &[("w1", &[7, 5], Role::Weight), ("w2", &[3, 4, 2], Role::Weight), ("b", &[6], Role::Bias)];

/// A random, non-quadratic objective: sum(sin(p) * a) + sum(p^2 * b).
struct Problem {
    a: Vec<Tensor>,
    b: Vec<Tensor>,
    init: Vec<Tensor>,
}

impl Problem {
    fn new(seed: i64) -> Self {
        tch::manual_seed(seed);
        let opts = (Kind::Float, Device::Cpu);
        let mk = |s: &[i64]| Tensor::randn(s, opts);
        Problem {
            a: SHAPES.iter().map(|(_, s, _)| mk(s)).collect(),
            b: SHAPES.iter().map(|(_, s, _)| mk(s).abs()).collect(),
            init: SHAPES.iter().map(|(_, s, _)| mk(s)).collect(),
        }
    }

    fn loss(&self, ps: &[Tensor]) -> Tensor {
        let mut l = Tensor::zeros([], (Kind::Float, Device::Cpu));
        for ((p, a), b) in ps.iter().zip(&self.a).zip(&self.b) {
            l = l + (p.sin() * a).sum(Kind::Float) + (p.square() * b).sum(Kind::Float);
        }
        l
    }
}

/// Our optimizer on a ParamStore; returns the parameters after `steps`.
fn ours(prob: &Problem, cfg: OptConfig, steps: usize, all_decay: bool) -> Vec<Tensor> {
    let mut store = ParamStore::new();
    let mut ps = Vec::new();
    for ((name, shape, role), init) in SHAPES.iter().zip(&prob.init) {
        let role = if all_decay { Role::Weight } else { *role };
        let p = store.param(name, shape, Init::Zeros, role).unwrap();
        tch::no_grad(|| p.shallow_clone().copy_(init));
        ps.push(p);
    }
    store.finalize(Device::Cpu).unwrap();
    let mut opt = Optimizer::new(&store, cfg).unwrap();
    for _ in 0..steps {
        store.zero_grad().unwrap();
        prob.loss(&ps).backward();
        opt.step(&store).unwrap();
    }
    ps.iter().map(|p| p.detach().copy()).collect()
}

/// libtorch's optimizer (torch::optim through tch) on the same problem.
fn reference<C: OptimizerConfig + Clone>(prob: &Problem, c: &C, lr: f64, steps: usize) -> Vec<Tensor> {
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let ps: Vec<Tensor> =
        SHAPES.iter().zip(&prob.init).map(|((name, _, _), init)| root.var_copy(name, init)).collect();
    let mut opt = c.clone().build(&vs, lr).unwrap();
    for _ in 0..steps {
        opt.zero_grad();
        prob.loss(&ps).backward();
        opt.step();
    }
    ps.iter().map(|p| p.detach().copy()).collect()
}

/// Largest absolute difference; NaN anywhere counts as infinitely different.
fn max_diff(a: &[Tensor], b: &[Tensor]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs().max().double_value(&[])).fold(0.0, |m, d| {
        if d.is_nan() {
            f64::INFINITY
        } else {
            m.max(d)
        }
    })
}

#[test]
fn sgd_matches_libtorch() {
    let prob = Problem::new(1);
    for (nesterov, wd, damp) in [(false, 0.0, 0.0), (true, 1e-2, 0.0), (false, 5e-4, 0.1)] {
        let cfg = OptConfig {
            kind: OptKind::Sgd,
            lr: 0.01,
            momentum: 0.9,
            nesterov,
            weight_decay: wd,
            dampening: damp,
            ..OptConfig::for_kind(OptKind::Sgd)
        };
        let a = ours(&prob, cfg, 100, true);
        let b = reference(&prob, &nn::Sgd { momentum: 0.9, dampening: damp, wd, nesterov }, 0.01, 100);
        let d = max_diff(&a, &b);
        eprintln!("sgd nesterov={nesterov} wd={wd} dampening={damp}: max abs diff {d:e} after 100 steps");
        assert!(d < 1e-6, "sgd nesterov={nesterov} wd={wd}: max abs diff {d:e}");
    }
}

#[test]
fn adam_and_adamw_match_libtorch_fused_and_unfused() {
    let prob = Problem::new(2);
    for fused in [true, false] {
        for (kind, wd) in [(OptKind::Adam, 0.0), (OptKind::Adam, 0.01), (OptKind::AdamW, 0.1)] {
            let cfg = OptConfig { kind, lr: 3e-3, weight_decay: wd, fused, ..OptConfig::for_kind(kind) };
            let a = ours(&prob, cfg, 100, true);
            let b = match kind {
                OptKind::Adam => reference(
                    &prob,
                    &nn::Adam { beta1: 0.9, beta2: 0.999, wd, eps: 1e-8, amsgrad: false },
                    3e-3,
                    100,
                ),
                _ => reference(
                    &prob,
                    &nn::AdamW { beta1: 0.9, beta2: 0.999, wd, eps: 1e-8, amsgrad: false },
                    3e-3,
                    100,
                ),
            };
            let d = max_diff(&a, &b);
            eprintln!("{kind:?} wd={wd} fused={fused}: max abs diff {d:e} after 100 steps");
            assert!(d < 1e-6, "{kind:?} wd={wd} fused={fused}: max abs diff {d:e}");
        }
        // AMSGrad, as adamwadv uses it.
        let cfg = OptConfig { kind: OptKind::AdamW, lr: 3e-3, amsgrad: true, fused, ..Default::default() };
        let a = ours(&prob, cfg, 100, true);
        let b = reference(
            &prob,
            &nn::AdamW { beta1: 0.9, beta2: 0.999, wd: 0.01, eps: 1e-8, amsgrad: true },
            3e-3,
            100,
        );
        let d = max_diff(&a, &b);
        assert!(d < 1e-6, "amsgrad fused={fused}: max abs diff {d:e}");
    }
}

#[test]
fn weight_decay_skips_biases() {
    let prob = Problem::new(3);
    let cfg = OptConfig { kind: OptKind::AdamW, lr: 3e-3, weight_decay: 0.5, ..Default::default() };
    let ours_p = ours(&prob, cfg, 20, false);
    let decayed = reference(
        &prob,
        &nn::AdamW { beta1: 0.9, beta2: 0.999, wd: 0.5, eps: 1e-8, amsgrad: false },
        3e-3,
        20,
    );
    let plain = reference(
        &prob,
        &nn::AdamW { beta1: 0.9, beta2: 0.999, wd: 0.0, eps: 1e-8, amsgrad: false },
        3e-3,
        20,
    );
    assert!(max_diff(&ours_p[..2], &decayed[..2]) < 1e-6, "matrices decay");
    assert!(max_diff(&ours_p[2..], &plain[2..]) < 1e-6, "the bias does not");
}

/// libtorch's optimizer with one parameter group per tensor: (lr, wd) each.
fn reference_grouped<C: OptimizerConfig + Clone>(
    prob: &Problem,
    c: &C,
    per: &[(f64, f64)],
    steps: usize,
) -> Vec<Tensor> {
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let ps: Vec<Tensor> = SHAPES
        .iter()
        .zip(&prob.init)
        .enumerate()
        .map(|(i, ((name, _, _), init))| root.set_group(i).var_copy(name, init))
        .collect();
    let mut opt = c.clone().build(&vs, per[0].0).unwrap();
    for (i, &(lr, wd)) in per.iter().enumerate() {
        opt.set_lr_group(i, lr);
        opt.set_weight_decay_group(i, wd);
    }
    for _ in 0..steps {
        opt.zero_grad();
        prob.loss(&ps).backward();
        opt.step();
    }
    ps.iter().map(|p| p.detach().copy()).collect()
}

#[test]
fn parameter_groups_match_libtorch_param_groups() {
    // w1 keeps the defaults; w2 a tenth of the lr and no decay; the bias
    // three times the lr and an explicit decay (which biases never get by role).
    let groups = vec![
        ParamGroup { params: vec!["w2".into()], lr_scale: 0.1, weight_decay: Some(0.0) },
        ParamGroup { params: vec!["?".into()], lr_scale: 3.0, weight_decay: Some(0.2) },
    ];
    let prob = Problem::new(4);
    let (lr, wd) = (3e-3, 0.05);
    let per = [(lr, wd), (lr * 0.1, 0.0), (lr * 3.0, 0.2)];
    for fused in [true, false] {
        for kind in [OptKind::AdamW, OptKind::Adam] {
            let cfg = OptConfig {
                kind,
                lr,
                weight_decay: wd,
                fused,
                groups: groups.clone(),
                ..OptConfig::for_kind(kind)
            };
            let a = ours(&prob, cfg, 50, false);
            let b = match kind {
                OptKind::Adam => reference_grouped(
                    &prob,
                    &nn::Adam { beta1: 0.9, beta2: 0.999, wd, eps: 1e-8, amsgrad: false },
                    &per,
                    50,
                ),
                _ => reference_grouped(
                    &prob,
                    &nn::AdamW { beta1: 0.9, beta2: 0.999, wd, eps: 1e-8, amsgrad: false },
                    &per,
                    50,
                ),
            };
            let d = max_diff(&a, &b);
            eprintln!("{kind:?} groups fused={fused}: max abs diff {d:e}");
            assert!(d < 1e-6, "{kind:?} groups fused={fused}: max abs diff {d:e}");
        }
    }
    let lr = 0.01;
    let per = [(lr, wd), (lr * 0.1, 0.0), (lr * 3.0, 0.2)];
    let cfg =
        OptConfig { kind: OptKind::Sgd, lr, weight_decay: wd, groups, ..OptConfig::for_kind(OptKind::Sgd) };
    let a = ours(&prob, cfg, 50, false);
    let b =
        reference_grouped(&prob, &nn::Sgd { momentum: 0.9, dampening: 0.0, wd, nesterov: false }, &per, 50);
    let d = max_diff(&a, &b);
    assert!(d < 1e-6, "sgd groups: max abs diff {d:e}");
}

#[test]
fn parameter_groups_reject_bad_patterns() {
    let mut store = ParamStore::new();
    let _ = store.param("a.weight", &[2, 2], Init::Zeros, Role::Weight).unwrap();
    let _ = store.param("a.bias", &[2], Init::Zeros, Role::Bias).unwrap();
    store.finalize(Device::Cpu).unwrap();
    let g = |p: &[&str]| ParamGroup {
        params: p.iter().map(|s| s.to_string()).collect(),
        lr_scale: 1.0,
        weight_decay: None,
    };
    let err = |groups: Vec<ParamGroup>| {
        Optimizer::new(&store, OptConfig { groups, ..Default::default() })
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert!(err(vec![g(&["b.*"])]).contains("'b.*' matches no parameter"), "{}", err(vec![g(&["b.*"])]));
    assert!(err(vec![g(&["a.*"]), g(&["*.bias"])]).contains("'a.bias' is in parameter groups 0 and 1"));
    assert!(err(vec![g(&[])]).contains("params is empty"));
    let neg = ParamGroup { lr_scale: -1.0, ..g(&["a.*"]) };
    assert!(err(vec![neg]).contains("lr_scale"));
    assert!(err(vec![g(&["a.*"])]).is_empty());
}

#[test]
fn adamwadv_step_by_hand() {
    // One parameter, two steps, AMSGrad + clipping at 1.0, computed by hand.
    let mut store = ParamStore::new();
    let p = store.param("w", &[2, 1], Init::Zeros, Role::Weight).unwrap();
    tch::no_grad(|| p.shallow_clone().copy_(&Tensor::from_slice(&[1.0f32, -2.0]).view([2, 1])));
    store.finalize(Device::Cpu).unwrap();
    let cfg = OptConfig { lr: 0.1, weight_decay: 0.0, ..OptConfig::for_kind(OptKind::AdamWAdv) };
    let mut opt = Optimizer::new(&store, cfg).unwrap();
    let grads = [[3.0f64, 4.0], [0.3, -0.4]];
    let (mut w, mut m, mut v, mut vmax) = ([1.0f64, -2.0], [0.0f64; 2], [0.0f64; 2], [0.0f64; 2]);
    for (t, g) in grads.iter().enumerate() {
        store.zero_grad().unwrap();
        let gt = Tensor::from_slice(&[g[0] as f32, g[1] as f32]).view([2, 1]);
        (&p * &gt).sum(Kind::Float).backward();
        let rep = opt.step(&store).unwrap();
        let norm = (g[0] * g[0] + g[1] * g[1]).sqrt();
        assert!((rep.grad_norm.unwrap().double_value(&[]) - norm).abs() < 1e-5);
        let coef = (1.0 / (norm + 1e-6)).min(1.0);
        let step = (t + 1) as f64;
        for i in 0..2 {
            let gi = g[i] * coef;
            m[i] = 0.9 * m[i] + 0.1 * gi;
            v[i] = 0.999 * v[i] + 0.001 * gi * gi;
            vmax[i] = vmax[i].max(v[i]);
            let denom = vmax[i].sqrt() / (1.0 - 0.999f64.powf(step)).sqrt() + 1e-8;
            w[i] -= 0.1 / (1.0 - 0.9f64.powf(step)) * m[i] / denom;
        }
        let got: Vec<f64> = Vec::<f64>::try_from(p.flatten(0, -1).to_kind(Kind::Double)).unwrap();
        for i in 0..2 {
            assert!((got[i] - w[i]).abs() < 1e-6, "step {step}: {got:?} vs {w:?}");
        }
    }
}

#[test]
fn spam_clips_detects_spikes_and_resets() {
    let mut store = ParamStore::new();
    let p = store.param("w", &[4], Init::Zeros, Role::Weight).unwrap();
    store.finalize(Device::Cpu).unwrap();
    let spam = SpamConfig {
        theta: 1e6,
        interval: 15,
        warmup: 4,
        enable_clip: true,
        spike_threshold: 2.0,
        history: 100,
    };
    let cfg = OptConfig {
        kind: OptKind::AdamWSpam,
        lr: 0.01,
        weight_decay: 0.0,
        clip_norm: 0.0,
        spam,
        ..OptConfig::for_kind(OptKind::AdamWSpam)
    };
    let mut opt = Optimizer::new(&store, cfg).unwrap();
    let run = |opt: &mut Optimizer, g: [f32; 4]| {
        store.zero_grad().unwrap();
        (&p * Tensor::from_slice(&g)).sum(Kind::Float).backward();
        let v_before = opt.state(&store, "w").unwrap().exp_avg_sq.unwrap().copy();
        let rep = opt.step(&store).unwrap();
        (rep, v_before, store.groups()[0].grad.copy())
    };
    // Steps 1..11: ordinary gradients, under the threshold sqrt(theta * v).
    for i in 1..=11 {
        let gi = [1.0, 1.0, 1.0, 1.0 + 0.1 * (i % 2) as f32];
        let (rep, _, g) = run(&mut opt, gi);
        assert!(!rep.spike && !rep.reset, "step {i}");
        assert_eq!(Vec::<f32>::try_from(&g).unwrap(), gi.to_vec(), "step {i}: nothing clipped");
    }
    // Step 12: a huge gradient is clipped to sqrt(theta * (v + 1e-12)); the
    // clipped norm is still far above the history: a spike.
    let m_before = opt.state(&store, "w").unwrap().exp_avg.unwrap().copy();
    let (rep, v_before, g) = run(&mut opt, [1e4, 1.0, 1.0, 1.0]);
    let thr0 = (1e6 * (v_before.double_value(&[0]) + 1e-12)).sqrt();
    assert!(thr0 < 1e4);
    assert!((g.double_value(&[0]) - thr0).abs() < 1e-3 * thr0, "clipped to {thr0}");
    assert_eq!(g.double_value(&[1]), 1.0, "small gradients untouched");
    assert!(rep.spike, "a clipped norm far above the history is a spike");
    // After a spike the first moment was halved before the Adam update.
    let m_after = opt.state(&store, "w").unwrap().exp_avg.unwrap();
    let expect = 0.9 * 0.5 * m_before.double_value(&[1]) + 0.1 * 1.0;
    assert!((m_after.double_value(&[1]) - expect).abs() < 1e-6);
    // Steps 13, 14, then 15 resets the moments and starts a 4-step warm-up.
    let _ = run(&mut opt, [1.0; 4]);
    let _ = run(&mut opt, [1.0; 4]);
    let (rep, _, _) = run(&mut opt, [1.0; 4]);
    assert!(rep.reset);
    assert!((rep.lr - 0.01 * 1e-3).abs() < 1e-12, "t = 0 at the reset step: lr scaled by 1e-3");
    let (rep, _, _) = run(&mut opt, [1.0; 4]);
    assert!((rep.lr - 0.01 * spam::warmup_scale(16, 19, 4)).abs() < 1e-12);
    assert!(
        (spam::warmup_scale(16, 19, 4) - 0.5 * (1.0 - (std::f64::consts::PI * 0.25).cos())).abs() < 1e-12
    );
    for _ in 17..=19 {
        let _ = run(&mut opt, [1.0; 4]);
    }
    let (rep, _, _) = run(&mut opt, [1.0; 4]);
    assert_eq!(rep.lr, 0.01, "warm-up over: the scheduled rate, not compounded");
}

#[test]
fn state_views_and_round_trip() {
    let prob = Problem::new(4);
    let mut store = ParamStore::new();
    let mut ps = Vec::new();
    for ((name, shape, role), init) in SHAPES.iter().zip(&prob.init) {
        let p = store.param(name, shape, Init::Zeros, *role).unwrap();
        tch::no_grad(|| p.shallow_clone().copy_(init));
        ps.push(p);
    }
    store.finalize(Device::Cpu).unwrap();
    let mut opt = Optimizer::new(&store, OptConfig::default()).unwrap();
    store.zero_grad().unwrap();
    prob.loss(&ps).backward();
    opt.step(&store).unwrap();
    let st = opt.state(&store, "w2").unwrap();
    let m = st.exp_avg.unwrap();
    assert_eq!(m.size(), vec![3, 4, 2]);
    // After one step exp_avg = 0.1 * grad.
    assert!((&m - ps[1].grad() * 0.1).abs().max().double_value(&[]) < 1e-7);
    // Masking through the view changes the flat state.
    let _ = tch::no_grad(|| m.shallow_clone().zero_());
    assert_eq!(
        opt.state(&store, "w2").unwrap().exp_avg.unwrap().abs().sum(Kind::Float).double_value(&[]),
        0.0
    );
    let saved: Vec<(String, Tensor)> = opt.state_tensors().into_iter().map(|(n, t)| (n, t.copy())).collect();
    let mut opt2 = Optimizer::new(&store, OptConfig::default()).unwrap();
    opt2.load_state_tensors(&saved, "test").unwrap();
    for ((n1, a), (n2, b)) in opt.state_tensors().iter().zip(opt2.state_tensors().iter()) {
        assert_eq!(n1, n2);
        assert!(a.equal(b), "{n1}");
    }
    assert!(opt.state(&store, "nope").is_err());
}

#[test]
fn bad_configs_are_refused() {
    assert!(OptKind::parse("adamw").is_ok());
    assert!(OptKind::parse("lion").unwrap_err().to_string().contains("valid: sgd"));
    let c = OptConfig { beta1: 1.5, ..Default::default() };
    assert!(c.validate().unwrap_err().to_string().contains("beta1"));
}
