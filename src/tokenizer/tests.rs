//! Tokenizer tests against independent computations: the covariance's
//! eigendecomposition for PCA, dense solves of the spline's defining
//! systems, hand-counted tier splits.
use std::path::PathBuf;

use tch::{Device, Kind, Tensor};

use super::spline::Smoother;
use super::*;
use crate::safetensors::Target;

const F64: (Kind, Device) = (Kind::Double, Device::Cpu);

/// Deterministic normal draws (xorshift64* and Box-Muller).
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545F4914F6CDD1D) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    fn normals(&mut self, shape: &[i64]) -> Tensor {
        let n: i64 = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| self.normal()).collect();
        Tensor::from_slice(&v).reshape(shape)
    }
}

/// `n` samples of shape `image` whose covariance has distinct eigenvalues
/// `scales²` along a random orthonormal basis, plus an offset.
fn data(rng: &mut Rng, n: i64, image: &[i64], scales: &[f64]) -> Tensor {
    let d: i64 = image.iter().product();
    assert_eq!(scales.len() as i64, d);
    let (q, _) = Tensor::linalg_qr(&rng.normals(&[d, d]), "reduced");
    let z = rng.normals(&[n, d]) * Tensor::from_slice(scales);
    let offset = rng.normals(&[d]) * 3.0;
    let mut shape = vec![n];
    shape.extend_from_slice(image);
    (z.matmul(&q.tr()) + offset).reshape(shape)
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

fn vec_of(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.reshape([-1]).to_kind(Kind::Double)).unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("knlp-tok-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn scales(d: usize) -> Vec<f64> {
    (0..d).map(|i| 4.0 * 0.75f64.powi(i as i32)).collect()
}

#[test]
fn exact_pca_matches_the_covariance_eigendecomposition() {
    let mut rng = Rng(7);
    let x = data(&mut rng, 400, &[3, 4], &scales(12));
    let mut pca = PcaTokenizer::new(5).unwrap();
    pca.fit(&x).unwrap();
    let f = pca.fitted().unwrap();
    // Oracle: eigh of the sample covariance.
    let xf = x.reshape([400, 12]);
    let mean = xf.mean_dim(0, false, Kind::Double);
    let xc = &xf - &mean;
    let cov = xc.tr().matmul(&xc) / 399.0;
    let (evals, evecs) = cov.linalg_eigh("L");
    let evals = evals.flip([0]);
    let evecs = evecs.flip([1]);
    assert!(max_abs(&(&f.mean - &mean)) < 1e-12);
    let top = evals.narrow(0, 0, 5);
    let rel = max_abs(&((&f.explained_variance - &top) / &top));
    assert!(rel < 1e-10, "explained variance off by {rel:e}");
    let ratio = &top / evals.sum(Kind::Double);
    assert!(max_abs(&(&f.explained_variance_ratio - &ratio)) < 1e-12);
    // The same subspace (projectors), and the same axes up to sign, with
    // the largest-magnitude entry of each positive.
    let v_ref = evecs.narrow(1, 0, 5).tr();
    let proj = f.components.tr().matmul(&f.components);
    let proj_ref = v_ref.tr().matmul(&v_ref);
    assert!(max_abs(&(&proj - &proj_ref)) < 1e-9);
    for i in 0..5 {
        let (a, b) = (f.components.get(i), v_ref.get(i));
        let dot = a.dot(&b).double_value(&[]);
        assert!((dot.abs() - 1.0).abs() < 1e-9, "component {i}: |cos| = {}", dot.abs());
        let big = a.abs().argmax(0, false).int64_value(&[]);
        assert!(a.double_value(&[big]) > 0.0, "component {i} sign convention");
    }
    assert_eq!(f.image_shape, vec![3, 4]);
    assert_eq!(f.n_seen, 400);
    let imp = pca.component_importance().unwrap();
    assert!(imp.windows(2).all(|w| w[0] >= w[1]));
}

#[test]
fn partial_fit_with_all_components_equals_the_exact_fit() {
    let mut rng = Rng(11);
    let x = data(&mut rng, 500, &[10], &scales(10));
    let mut exact = PcaTokenizer::new(10).unwrap();
    exact.fit(&x).unwrap();
    let mut inc = PcaTokenizer::new(10).unwrap();
    // Uneven batches, the first at least k.
    for (start, len) in [(0, 60), (60, 140), (200, 7), (207, 193), (400, 100)] {
        inc.partial_fit(&x.narrow(0, start, len)).unwrap();
    }
    let (e, i) = (exact.fitted().unwrap(), inc.fitted().unwrap());
    assert_eq!(i.n_seen, 500);
    assert!(i.incremental && !e.incremental);
    assert!(max_abs(&(&e.mean - &i.mean)) < 1e-12);
    assert!(max_abs(&(&e.var - &i.var)) / max_abs(&e.var) < 1e-12);
    let rel = max_abs(&((&e.explained_variance - &i.explained_variance) / &e.explained_variance));
    assert!(rel < 1e-9, "explained variance off by {rel:e}");
    assert!(max_abs(&(&e.explained_variance_ratio - &i.explained_variance_ratio)) < 1e-12);
    // Same signs by the shared convention, so the axes agree outright.
    assert!(max_abs(&(&e.components - &i.components)) < 1e-8);
}

#[test]
fn partial_fit_with_fewer_components_finds_the_principal_subspace() {
    // Rank-4 signal plus small noise; k = 6 < D = 20.
    let mut rng = Rng(3);
    let mut s = vec![1e-3; 20];
    s[..4].copy_from_slice(&[5.0, 3.0, 2.0, 1.0]);
    let x = data(&mut rng, 1200, &[20], &s);
    let mut exact = PcaTokenizer::new(6).unwrap();
    exact.fit(&x).unwrap();
    let mut inc = PcaTokenizer::new(6).unwrap();
    for b in 0..12 {
        inc.partial_fit(&x.narrow(0, b * 100, 100)).unwrap();
    }
    let (e, i) = (exact.fitted().unwrap(), inc.fitted().unwrap());
    // Principal angles between the top-4 subspaces: the singular values of
    // V_e V_iᵀ are their cosines.
    let cross = e.components.narrow(0, 0, 4).matmul(&i.components.narrow(0, 0, 4).tr());
    let (_, cosines, _) = cross.svd(true, true);
    let cosines = vec_of(&cosines);
    let worst = cosines.iter().cloned().fold(1.0, f64::min);
    assert!(worst > 1.0 - 1e-9, "largest principal angle has cosine {worst}");
    let rel = max_abs(
        &((e.explained_variance.narrow(0, 0, 4) - i.explained_variance.narrow(0, 0, 4))
            / e.explained_variance.narrow(0, 0, 4)),
    );
    assert!(rel < 1e-6, "explained variance off by {rel:e}");
}

#[test]
fn transform_and_inverse_with_all_components_round_trip() {
    let mut rng = Rng(5);
    let x = data(&mut rng, 50, &[2, 3, 2], &scales(12));
    let mut pca = PcaTokenizer::new(12).unwrap();
    pca.fit(&x).unwrap();
    let codes = pca.transform(&x).unwrap();
    assert_eq!(codes.size(), [50, 12]);
    assert_eq!(codes.kind(), Kind::Double);
    let back = pca.inverse(&codes).unwrap();
    assert_eq!(back.size(), [50, 2, 3, 2]);
    assert!(max_abs(&(&back - &x)) < 1e-10);
    // float32 in, float32 out; uint8 in, float32 out.
    let x32 = x.to_kind(Kind::Float);
    let c32 = pca.transform(&x32).unwrap();
    assert_eq!(c32.kind(), Kind::Float);
    assert!(max_abs(&(pca.inverse(&c32).unwrap() - &x32)) < 1e-4);
    let bytes = x.abs().clamp(0.0, 255.0).to_kind(Kind::Uint8);
    assert_eq!(pca.transform(&bytes).unwrap().kind(), Kind::Float);
    // The first j codes reconstruct with the first j components.
    let three = pca.inverse(&codes.narrow(1, 0, 3)).unwrap();
    let v = pca.fitted().unwrap().components.narrow(0, 0, 3);
    let want = (codes.narrow(1, 0, 3).matmul(&v) + &pca.fitted().unwrap().mean).reshape([50, 2, 3, 2]);
    assert!(max_abs(&(three - want)) < 1e-12);
}

#[test]
fn quality_on_the_training_data_is_the_explained_variance() {
    let mut rng = Rng(9);
    let x = data(&mut rng, 300, &[16], &scales(16));
    let mut pca = PcaTokenizer::new(8).unwrap();
    pca.fit(&x).unwrap();
    let ratio = pca.component_importance().unwrap();
    let mut cum = 0.0;
    for j in 0..=8 {
        let q = pca.quality(&x, j, None).unwrap();
        assert!((1.0 - q.rel_mse - cum).abs() < 1e-10, "j={j}: 1 - rel_mse {} vs {cum}", 1.0 - q.rel_mse);
        assert!((q.explained - cum).abs() < 1e-12);
        let range = max_abs(&(x.max() - x.min()));
        assert!((q.peak - range).abs() < 1e-12);
        assert!((q.psnr - 10.0 * (range * range / q.mse).log10()).abs() < 1e-9);
        if j < 8 {
            cum += ratio[j as usize];
        }
    }
    let q0 = pca.quality(&x, 0, Some(1.0)).unwrap();
    assert!((q0.rel_mse - 1.0).abs() < 1e-12 && q0.peak == 1.0);
    // mse is the mean squared error per value.
    let rec = pca.inverse(&pca.transform(&x).unwrap().narrow(1, 0, 3)).unwrap();
    let mse = (rec - &x).square().mean(Kind::Double).double_value(&[]);
    assert!((pca.quality(&x, 3, None).unwrap().mse - mse).abs() < 1e-12);
}

#[test]
fn the_tier_rule_is_cumulative() {
    assert_eq!(tier_counts(10, 0.3, 0.5).unwrap(), [3, 2, 5]);
    assert_eq!(tier_counts(7, 0.3, 0.5).unwrap(), [2, 1, 4]); // floor(2.1), floor(3.5)
    assert_eq!(tier_counts(1, 0.3, 0.5).unwrap(), [0, 0, 1]);
    assert_eq!(tier_counts(784, 0.3, 0.5).unwrap(), [235, 157, 392]);
    // As Python's int(100 * 0.29) = 28: the product is 28.999999999999996.
    assert_eq!(tier_counts(100, 0.29, 0.5).unwrap(), [28, 22, 50]);
    assert_eq!(tier_counts(5, 0.0, 0.0).unwrap(), [0, 0, 5]);
    assert_eq!(tier_counts(5, 1.0, 1.0).unwrap(), [5, 0, 0]);
    assert_eq!(tier_counts(0, 0.3, 0.5).unwrap(), [0, 0, 0]);
    for (h, c) in [(0.5, 0.3), (-0.1, 0.5), (0.3, 1.5), (f64::NAN, 0.5)] {
        assert!(tier_counts(10, h, c).is_err(), "{h} {c}");
    }
    assert!(tier_counts(10, 0.5, 0.3).unwrap_err().contains("cumulative"));
    // Ranked by score, ties in item order, reported in item order.
    let t = tiers_by_score(&[0.1, 0.5, 0.3, 0.5], 0.25, 0.5).unwrap();
    assert_eq!(t, ["ssd", "hbm", "ssd", "cpu"]);
    assert!(tiers_by_score(&[0.1, f64::NAN], 0.3, 0.5).is_err());
    // PCA components are already ranked by importance.
    let mut rng = Rng(1);
    let x = data(&mut rng, 100, &[10], &scales(10));
    let mut pca = PcaTokenizer::new(10).unwrap();
    pca.fit(&x).unwrap();
    let t = pca.tiers(DEFAULT_HBM, DEFAULT_CPU).unwrap();
    assert_eq!(t, ["hbm", "hbm", "hbm", "cpu", "cpu", "ssd", "ssd", "ssd", "ssd", "ssd"]);
}

#[test]
fn save_and_load_round_trip() {
    let dir = scratch("save");
    let mut rng = Rng(21);
    let x = data(&mut rng, 120, &[1, 3, 3], &scales(9));
    let mut pca = PcaTokenizer::new(4).unwrap();
    pca.partial_fit(&x.narrow(0, 0, 60)).unwrap();
    let path = dir.join("pca.safetensors");
    pca.save(&path, Target::STRICT).unwrap();
    let mut back = PcaTokenizer::load(&path).unwrap();
    let (a, b) = (pca.fitted().unwrap(), back.fitted().unwrap());
    assert_eq!((back.n_components(), b.n_seen, &b.image_shape, b.incremental), (4, 60, &vec![1, 3, 3], true));
    for (s, t) in [(&a.mean, &b.mean), (&a.var, &b.var), (&a.components, &b.components)] {
        assert!(s.equal(t));
    }
    assert!(a.singular_values.equal(&b.singular_values));
    assert!(a.explained_variance_ratio.equal(&b.explained_variance_ratio));
    // Fitting continues from the file as from memory.
    pca.partial_fit(&x.narrow(0, 60, 60)).unwrap();
    back.partial_fit(&x.narrow(0, 60, 60)).unwrap();
    assert!(pca.fitted().unwrap().components.equal(&back.fitted().unwrap().components));
    let meta = crate::safetensors::load(&path).unwrap().metadata;
    assert_eq!(meta["format"], pca::FORMAT);
    assert_eq!(meta["n_components"], "4");
    assert_eq!(meta["image_shape"], "[1,3,3]");

    // The spline tokenizer keeps its trajectories and smoothing.
    let mut sp = SplinePcaTokenizer::from_pca(pca.clone(), 2.5).unwrap();
    for s in 0..5 {
        sp.record_images(10.0 * s as f64, &x.narrow(0, 20 * s, 20)).unwrap();
    }
    let spath = dir.join("spline.safetensors");
    sp.save(&spath, Target::STRICT).unwrap();
    let sb = SplinePcaTokenizer::load(&spath).unwrap();
    assert_eq!(sb.smoothing(), 2.5);
    assert_eq!(sb.steps(), sp.steps());
    assert!(sb.trajectory().unwrap().equal(&sp.trajectory().unwrap()));
    assert_eq!(sb.trajectory_variance().unwrap(), sp.trajectory_variance().unwrap());
    // Each reader refuses the other's file.
    assert!(PcaTokenizer::load(&spath).unwrap_err().contains("knlp-spline-pca-tokenizer"));
    assert!(SplinePcaTokenizer::load(&path).unwrap_err().contains("not a 'knlp-spline-pca-tokenizer'"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_input_and_corrupt_files_are_clear_errors() {
    let dir = scratch("errors");
    let mut rng = Rng(2);
    let x = data(&mut rng, 30, &[2, 4], &scales(8));
    assert!(PcaTokenizer::new(0).unwrap_err().contains("at least 1 component"));
    let mut pca = PcaTokenizer::new(4).unwrap();
    assert!(pca.transform(&x).unwrap_err().contains("not fitted"));
    assert!(pca.save(&dir.join("u.safetensors"), Target::STRICT).unwrap_err().contains("not fitted"));
    assert!(PcaTokenizer::new(9).unwrap().fit(&x).unwrap_err().contains("9 components"));
    assert!(PcaTokenizer::new(4).unwrap().fit(&x.narrow(0, 0, 3)).unwrap_err().contains("4 components"));
    assert!(PcaTokenizer::new(4)
        .unwrap()
        .partial_fit(&x.narrow(0, 0, 3))
        .unwrap_err()
        .contains("first batch"));
    assert!(pca.fit(&Tensor::ones([8], F64)).unwrap_err().contains("at least 2 dimensions"));
    let nan = x.copy();
    let _ = nan.get(3).get(1).fill_(f64::NAN);
    assert!(pca.fit(&nan).unwrap_err().contains("NaN"));
    pca.fit(&x).unwrap();
    let e = pca.transform(&x.reshape([30, 8, 1]).narrow(1, 0, 7)).unwrap_err();
    assert!(e.contains("8 values per sample") && e.contains("[30, 7, 1]"), "{e}");
    assert!(pca.transform(&x.get(0)).unwrap_err().contains("unsqueeze(0)"));
    assert!(pca.partial_fit(&Tensor::ones([4, 9], F64)).unwrap_err().contains("8 values per sample"));
    assert!(pca.inverse(&Tensor::ones([3, 5], F64)).unwrap_err().contains("j <= 4"));
    assert!(pca.inverse(&Tensor::ones([5], F64)).unwrap_err().contains("[N, j]"));
    assert!(pca.quality(&x, 5, None).unwrap_err().contains("0..=4"));
    assert!(pca.quality(&x, 2, Some(0.0)).unwrap_err().contains("peak"));
    assert!(pca.tiers(0.6, 0.5).unwrap_err().contains("cumulative"));
    // Files: missing, truncated, tampered, with a bad metadata value.
    let missing = dir.join("missing.safetensors");
    assert!(PcaTokenizer::load(&missing).unwrap_err().contains("missing.safetensors"));
    let path = dir.join("p.safetensors");
    pca.save(&path, Target::STRICT).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 8]).unwrap();
    let e = PcaTokenizer::load(&path).unwrap_err();
    assert!(e.contains("p.safetensors") && e.contains("truncated"), "{e}");
    std::fs::write(&path, &bytes).unwrap();
    let mut l = crate::safetensors::load(&path).unwrap();
    for (name, t) in l.tensors.iter_mut() {
        if name == "components" {
            *t = &*t * 1.5;
        }
    }
    let refs: Vec<(String, &Tensor)> = l.tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
    crate::safetensors::save(&path, &refs, &l.metadata, Target::STRICT).unwrap();
    let e = PcaTokenizer::load(&path).unwrap_err();
    assert!(e.contains("p.safetensors") && e.contains("orthonormal"), "{e}");
    let mut meta = l.metadata.clone();
    meta.insert("n_components".into(), "many".into());
    crate::safetensors::save(&path, &refs, &meta, Target::STRICT).unwrap();
    let e = PcaTokenizer::load(&path).unwrap_err();
    assert!(e.contains("p.safetensors") && e.contains("n_components"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The textbook natural cubic interpolating spline: second derivatives M
/// from the tridiagonal system, solved densely.
fn natural_interpolant(t: &[f64], y: &[f64]) -> impl Fn(f64) -> f64 {
    let n = t.len();
    let h: Vec<f64> = t.windows(2).map(|w| w[1] - w[0]).collect();
    let a = Tensor::zeros([n as i64, n as i64], F64);
    let b = Tensor::zeros([n as i64], F64);
    let set = |m: &Tensor, i: usize, j: usize, v: f64| {
        let _ = m.get(i as i64).get(j as i64).fill_(v);
    };
    set(&a, 0, 0, 1.0);
    set(&a, n - 1, n - 1, 1.0);
    for i in 1..n - 1 {
        set(&a, i, i - 1, h[i - 1]);
        set(&a, i, i, 2.0 * (h[i - 1] + h[i]));
        set(&a, i, i + 1, h[i]);
        let _ = b.get(i as i64).fill_(6.0 * ((y[i + 1] - y[i]) / h[i] - (y[i] - y[i - 1]) / h[i - 1]));
    }
    let m = vec_of(&Tensor::linalg_solve(&a, &b, true));
    let (t, y) = (t.to_vec(), y.to_vec());
    move |x: f64| {
        let i = (0..n - 1).rev().find(|&i| t[i] <= x).unwrap_or(0);
        let h = t[i + 1] - t[i];
        let (a, b) = ((t[i + 1] - x) / h, (x - t[i]) / h);
        a * y[i] + b * y[i + 1] + ((a * a * a - a) * m[i] + (b * b * b - b) * m[i + 1]) * h * h / 6.0
    }
}

#[test]
fn the_interpolating_spline_matches_the_textbook_system() {
    let t = [0.0, 1.0, 2.5, 3.0, 5.0, 8.0, 8.5, 10.0];
    let y = [1.0, -2.0, 0.5, 3.0, 2.0, -1.0, 0.0, 4.0];
    let s = CubicSpline::fit(&t, &y, 0.0).unwrap();
    let oracle = natural_interpolant(&t, &y);
    for (i, v) in y.iter().enumerate() {
        assert!((s.values[i] - v).abs() < 1e-12);
    }
    for k in 0..=200 {
        let x = 10.0 * k as f64 / 200.0;
        assert!((s.eval(x) - oracle(x)).abs() < 1e-9, "at {x}: {} vs {}", s.eval(x), oracle(x));
    }
    // Straight lines beyond the ends, continuing the end slope.
    let eps = 1e-6;
    let slope = (s.eval(10.0) - s.eval(10.0 - eps)) / eps;
    assert!((s.eval(12.0) - (s.eval(10.0) + 2.0 * slope)).abs() < 1e-4);
}

#[test]
fn the_smoothing_spline_is_the_penalised_minimiser() {
    // Dense closed form: g = (I + lambda Q R⁻¹ Qᵀ)⁻¹ y in normalised steps.
    let t: Vec<f64> = [0.0, 2.0, 3.0, 7.0, 8.0, 11.0, 12.0, 16.0, 17.0, 20.0].to_vec();
    let mut rng = Rng(4);
    let y: Vec<f64> = t.iter().map(|v| (v / 3.0).sin() + 0.3 * rng.normal()).collect();
    let n = t.len();
    let scale = (t[n - 1] - t[0]) / (n - 1) as f64;
    let tn: Vec<f64> = t.iter().map(|v| v / scale).collect();
    let h: Vec<f64> = tn.windows(2).map(|w| w[1] - w[0]).collect();
    let q = Tensor::zeros([n as i64, n as i64 - 2], F64);
    let r = Tensor::zeros([n as i64 - 2, n as i64 - 2], F64);
    let set = |m: &Tensor, i: usize, j: usize, v: f64| {
        let _ = m.get(i as i64).get(j as i64).fill_(v);
    };
    for j in 0..n - 2 {
        set(&q, j, j, 1.0 / h[j]);
        set(&q, j + 1, j, -1.0 / h[j] - 1.0 / h[j + 1]);
        set(&q, j + 2, j, 1.0 / h[j + 1]);
        set(&r, j, j, (h[j] + h[j + 1]) / 3.0);
        if j + 1 < n - 2 {
            set(&r, j, j + 1, h[j + 1] / 6.0);
            set(&r, j + 1, j, h[j + 1] / 6.0);
        }
    }
    let k = q.matmul(&Tensor::linalg_solve(&r, &q.tr(), true));
    let yt = Tensor::from_slice(&y);
    for lambda in [0.0, 0.3, 5.0, 1e3] {
        let a = Tensor::eye(n as i64, F64) + &k * lambda;
        let g = vec_of(&Tensor::linalg_solve(&a, &yt, true));
        let s = CubicSpline::fit(&t, &y, lambda).unwrap();
        for (i, (a, b)) in s.values.iter().zip(&g).enumerate() {
            assert!((a - b).abs() < 1e-10, "lambda {lambda}, knot {i}");
        }
        // Second derivatives satisfy Qᵀ g = R gamma.
        let gam = Tensor::from_slice(&s.second[1..n - 1]);
        let lhs = q.tr().mv(&Tensor::from_slice(&s.values));
        assert!(max_abs(&(lhs - r.mv(&gam))) < 1e-9);
        // The same fit whatever the unit of the steps.
        let t2: Vec<f64> = t.iter().map(|v| 1000.0 * v + 7.0).collect();
        let s2 = CubicSpline::fit(&t2, &y, lambda).unwrap();
        for i in 0..n {
            assert!((s2.values[i] - s.values[i]).abs() < 1e-9);
        }
        assert!((s2.eval(1000.0 * 4.5 + 7.0) - s.eval(4.5)).abs() < 1e-9);
    }
}

#[test]
fn smoothing_keeps_lines_and_tends_to_the_regression_line() {
    let t: Vec<f64> = (0..12).map(|i| (i * i) as f64).collect();
    let line: Vec<f64> = t.iter().map(|v| 2.0 - 0.5 * v).collect();
    for lambda in [0.0, 1.0, 1e6] {
        let s = CubicSpline::fit(&t, &line, lambda).unwrap();
        for (a, b) in s.values.iter().zip(&line) {
            assert!((a - b).abs() < 1e-8);
        }
        assert!((s.eval(200.0) - (2.0 - 100.0)).abs() < 1e-6);
    }
    let mut rng = Rng(8);
    let y: Vec<f64> = t.iter().map(|v| (v / 20.0).cos() + rng.normal()).collect();
    let s = CubicSpline::fit(&t, &y, 1e12).unwrap();
    let n = t.len() as f64;
    let (mt, my) = (t.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let sxy: f64 = t.iter().zip(&y).map(|(a, b)| (a - mt) * (b - my)).sum();
    let sxx: f64 = t.iter().map(|a| (a - mt) * (a - mt)).sum();
    let (slope, icpt) = (sxy / sxx, my - sxy / sxx * mt);
    for (i, v) in s.values.iter().enumerate() {
        assert!((v - (icpt + slope * t[i])).abs() < 1e-5, "knot {i}");
    }
    // One and two steps: a constant and a line.
    assert_eq!(CubicSpline::fit(&[3.0], &[2.0], 1.0).unwrap().eval(10.0), 2.0);
    assert!((CubicSpline::fit(&[0.0, 2.0], &[1.0, 3.0], 1.0).unwrap().eval(5.0) - 6.0).abs() < 1e-12);
    assert!(Smoother::new(&[0.0, 1.0, 1.0], 1.0).unwrap_err().contains("increase strictly"));
    assert!(Smoother::new(&[0.0, 1.0], -1.0).unwrap_err().contains("smoothing"));
}

#[test]
fn spline_tiers_rank_components_by_trajectory_variance() {
    let mut rng = Rng(6);
    let x = data(&mut rng, 40, &[4], &scales(4));
    let mut sp = SplinePcaTokenizer::new(4, 0.0).unwrap();
    assert!(sp.trajectory_variance().unwrap_err().contains("no trajectories"));
    sp.fit(&x).unwrap();
    // Component 2 moves most, then 0, then 3; 1 stays put.
    let amp = [1.0, 0.0, 3.0, 0.5];
    for s in 0..6 {
        let v: Vec<f64> = amp.iter().map(|a| a * (s as f64 * 0.7).sin()).collect();
        // A batch whose mean is v.
        let batch = Tensor::stack(&[Tensor::from_slice(&v) + 1.0, Tensor::from_slice(&v) - 1.0], 0);
        sp.record(100.0 * s as f64, &batch).unwrap();
    }
    assert_eq!(sp.trajectory().unwrap().size(), [6, 4]);
    let var = sp.trajectory_variance().unwrap();
    assert!(var[2] > var[0] && var[0] > var[3] && var[3] > var[1] && var[1] == 0.0, "{var:?}");
    assert_eq!(sp.tiers(0.25, 0.5).unwrap(), ["cpu", "ssd", "hbm", "ssd"]);
    // With smoothing 0 the splines interpolate: variance of the raw means.
    let raw = sp.trajectory().unwrap();
    let want = vec_of(&raw.var_dim(0, false, false));
    for c in 0..4 {
        assert!((var[c] - want[c]).abs() < 1e-12);
    }
    let at = sp.smoothed_at(&[0.0, 100.0, 150.0]).unwrap();
    assert_eq!(at.size(), [3, 4]);
    assert!(max_abs(&(at.narrow(0, 0, 2) - raw.narrow(0, 0, 2))) < 1e-12);
    // Smoothing lowers the variance of a wiggly trajectory.
    sp.set_smoothing(100.0).unwrap();
    assert!(sp.trajectory_variance().unwrap()[2] < var[2]);
    assert!(sp.record(500.0, &Tensor::zeros([4], F64)).unwrap_err().contains("increase strictly"));
    assert!(sp.record(600.0, &Tensor::zeros([2, 3], F64)).unwrap_err().contains("[B, 4]"));
    // A new fit starts the trajectories over.
    sp.fit(&x).unwrap();
    assert!(sp.steps().is_empty());
}
