//! The spline-PCA tokenizer: a PCA tokenizer that records how each
//! component's mean code moves over training steps, smooths each
//! trajectory with a cubic smoothing spline, and tiers components by the
//! variance of their smoothed trajectories.
//!
//! The spline is the natural cubic smoothing spline of Reinsch (1967), in
//! the value/second-derivative form of Green & Silverman (1994, ch. 2): for
//! recorded steps `t_1 < ... < t_n` and values `y`, it minimises
//!
//! ```text
//!     sum_i (y_i - f(t_i))^2 + lambda * integral f''(t)^2 dt
//! ```
//!
//! over all functions; the minimiser is a natural cubic spline with knots at
//! the steps, found from one banded (pentadiagonal) solve of
//! `(R + lambda QᵀQ) gamma = Qᵀ y`, `f(t_i) = y - lambda Q gamma`. Steps are
//! measured in units of their mean spacing `h` (`lambda = smoothing * h³` in
//! the steps' own units), so `smoothing` does not depend on whether steps
//! count iterations or epochs. 0 interpolates; otherwise, at evenly spaced
//! steps, each smoothed value is a weighted average by Silverman's (1984)
//! equivalent kernel of bandwidth `smoothing^(1/4)` steps, worth about
//! `3.8 * smoothing^(1/4)` recorded steps (1 / sum of squared weights): 4 for
//! the default 1, 8 for 16, 38 for 10^4 (checked against the dense smoother
//! matrix). Outside the recorded steps the spline continues as a straight
//! line.
use std::path::Path;

use tch::{Kind, Tensor};

use super::pca::{all_finite, to_vec, PcaTokenizer};
use super::{tiers_by_score, OrString};
use crate::safetensors::{self, Target};
use crate::tensor::{short_path, SizeChecked};

/// `format` metadata of a saved spline-PCA tokenizer.
pub const FORMAT: &str = "knlp-spline-pca-tokenizer";

/// The default smoothing (see the module documentation).
pub const DEFAULT_SMOOTHING: f64 = 1.0;

/// Steps strictly increasing and finite, smoothing finite and >= 0.
fn check_knots(t: &[f64], smoothing: f64) -> Result<(), String> {
    if !smoothing.is_finite() || smoothing < 0.0 {
        return Err(format!("smoothing must be a finite number >= 0, got {smoothing}"));
    }
    if let Some(i) = t.iter().position(|v| !v.is_finite()) {
        return Err(format!("step {} is {}; steps must be finite", i, t[i]));
    }
    if let Some(i) = (1..t.len()).find(|&i| t[i] <= t[i - 1]) {
        return Err(format!("steps must increase strictly: step {} follows {}", t[i], t[i - 1]));
    }
    Ok(())
}

/// The factorised smoothing system for one set of steps and one smoothing,
/// shared by every trajectory recorded at those steps.
#[derive(Debug)]
pub struct Smoother {
    t0: f64,
    scale: f64,
    /// Steps in units of the mean spacing, from 0.
    tn: Vec<f64>,
    h: Vec<f64>,
    lambda: f64,
    /// Cholesky factor of the (n-2)x(n-2) band: `[L(i,i-2), L(i,i-1), L(i,i)]`.
    chol: Vec<[f64; 3]>,
}

/// A natural cubic spline: values and second derivatives at its knots.
#[derive(Clone, Debug)]
pub struct CubicSpline {
    t0: f64,
    scale: f64,
    tn: Vec<f64>,
    /// Values at the knots.
    pub values: Vec<f64>,
    /// Second derivatives at the knots (in normalised step units), zero at
    /// both ends.
    pub second: Vec<f64>,
}

impl Smoother {
    pub fn new(t: &[f64], smoothing: f64) -> Result<Self, String> {
        if t.is_empty() {
            return Err("a spline needs at least one step".into());
        }
        check_knots(t, smoothing)?;
        let n = t.len();
        let t0 = t[0];
        let scale = if n >= 2 { (t[n - 1] - t0) / (n - 1) as f64 } else { 1.0 };
        let tn: Vec<f64> = t.iter().map(|v| (v - t0) / scale).collect();
        let h: Vec<f64> = tn.windows(2).map(|w| w[1] - w[0]).collect();
        let mut s = Smoother { t0, scale, tn, h, lambda: smoothing, chol: Vec::new() };
        if n >= 3 {
            s.factor()?;
        }
        Ok(s)
    }

    /// Entries of Q's interior column j: rows j, j+1, j+2.
    fn q(&self, j: usize) -> [f64; 3] {
        let (a, c) = (1.0 / self.h[j], 1.0 / self.h[j + 1]);
        [a, -(a + c), c]
    }

    fn factor(&mut self) -> Result<(), String> {
        let m = self.tn.len() - 2;
        let lam = self.lambda;
        let mut chol = vec![[0.0f64; 3]; m];
        for i in 0..m {
            let qi = self.q(i);
            let d = (self.h[i] + self.h[i + 1]) / 3.0 + lam * (qi[0] * qi[0] + qi[1] * qi[1] + qi[2] * qi[2]);
            let mut l0 = 0.0;
            let mut l1 = 0.0;
            if i >= 2 {
                let qa = self.q(i - 2);
                // A(i, i-2) = lambda * c_{i-2} a_i
                l0 = lam * qa[2] * qi[0] / chol[i - 2][2];
            }
            if i >= 1 {
                let qb = self.q(i - 1);
                // A(i, i-1) = h_i / 6 + lambda (b_{i-1} a_i + c_{i-1} b_i)
                let e = self.h[i] / 6.0 + lam * (qb[1] * qi[0] + qb[2] * qi[1]);
                l1 = (e - l0 * chol[i - 1][1]) / chol[i - 1][2];
            }
            let p = d - l0 * l0 - l1 * l1;
            if p.is_nan() || p <= 0.0 {
                return Err(format!("the spline system is not positive definite at knot {} ({p})", i + 1));
            }
            chol[i] = [l0, l1, p.sqrt()];
        }
        self.chol = chol;
        Ok(())
    }

    /// The smoothing spline through `y` (one value per step).
    pub fn smooth(&self, y: &[f64]) -> Result<CubicSpline, String> {
        let n = self.tn.len();
        if y.len() != n {
            return Err(format!("{} values for {n} steps", y.len()));
        }
        if let Some(i) = y.iter().position(|v| !v.is_finite()) {
            return Err(format!("value {i} is {}; values must be finite", y[i]));
        }
        let mut values = y.to_vec();
        let mut second = vec![0.0; n];
        if n >= 3 {
            let m = n - 2;
            // Qᵀ y, then L z = Qᵀ y, then Lᵀ gamma = z.
            let mut z = vec![0.0; m];
            for i in 0..m {
                let q = self.q(i);
                let mut r = q[0] * y[i] + q[1] * y[i + 1] + q[2] * y[i + 2];
                if i >= 1 {
                    r -= self.chol[i][1] * z[i - 1];
                }
                if i >= 2 {
                    r -= self.chol[i][0] * z[i - 2];
                }
                z[i] = r / self.chol[i][2];
            }
            let mut g = vec![0.0; m];
            for i in (0..m).rev() {
                let mut r = z[i];
                if i + 1 < m {
                    r -= self.chol[i + 1][1] * g[i + 1];
                }
                if i + 2 < m {
                    r -= self.chol[i + 2][0] * g[i + 2];
                }
                g[i] = r / self.chol[i][2];
            }
            for (j, gj) in g.iter().enumerate() {
                let q = self.q(j);
                for (r, qr) in q.iter().enumerate() {
                    values[j + r] -= self.lambda * qr * gj;
                }
                second[j + 1] = *gj;
            }
        }
        Ok(CubicSpline { t0: self.t0, scale: self.scale, tn: self.tn.clone(), values, second })
    }
}

impl CubicSpline {
    /// The smoothing spline of `y` over steps `t` (see the module docs).
    pub fn fit(t: &[f64], y: &[f64], smoothing: f64) -> Result<Self, String> {
        Smoother::new(t, smoothing)?.smooth(y)
    }

    /// The spline at step `x` (a straight line beyond the end knots).
    pub fn eval(&self, x: f64) -> f64 {
        let n = self.tn.len();
        let (g, gam, t) = (&self.values, &self.second, &self.tn);
        if n == 1 {
            return g[0];
        }
        let x = (x - self.t0) / self.scale;
        if x <= t[0] {
            let h = t[1] - t[0];
            let slope = (g[1] - g[0]) / h - h * gam[1] / 6.0;
            return g[0] + (x - t[0]) * slope;
        }
        if x >= t[n - 1] {
            let h = t[n - 1] - t[n - 2];
            let slope = (g[n - 1] - g[n - 2]) / h + h * gam[n - 2] / 6.0;
            return g[n - 1] + (x - t[n - 1]) * slope;
        }
        let i = t.partition_point(|&v| v <= x).saturating_sub(1).min(n - 2);
        let h = t[i + 1] - t[i];
        let (a, b) = (x - t[i], t[i + 1] - x);
        (a * g[i + 1] + b * g[i]) / h - a * b / 6.0 * ((1.0 + a / h) * gam[i + 1] + (1.0 + b / h) * gam[i])
    }
}

/// The spline-PCA tokenizer (see the module documentation).
#[derive(Clone, Debug)]
pub struct SplinePcaTokenizer {
    pub pca: PcaTokenizer,
    smoothing: f64,
    steps: Vec<f64>,
    /// Mean code per recorded step, k values each.
    codes: Vec<Vec<f64>>,
}

impl SplinePcaTokenizer {
    pub fn new(n_components: i64, smoothing: f64) -> Result<Self, String> {
        Self::from_pca(PcaTokenizer::new(n_components)?, smoothing)
    }

    /// Wrap a PCA tokenizer (fitted or not).
    pub fn from_pca(pca: PcaTokenizer, smoothing: f64) -> Result<Self, String> {
        check_knots(&[], smoothing)?;
        Ok(SplinePcaTokenizer { pca, smoothing, steps: Vec::new(), codes: Vec::new() })
    }

    pub fn smoothing(&self) -> f64 {
        self.smoothing
    }

    pub fn set_smoothing(&mut self, smoothing: f64) -> Result<(), String> {
        check_knots(&[], smoothing)?;
        self.smoothing = smoothing;
        Ok(())
    }

    /// Exact PCA; clears the recorded trajectories (their codes were in the
    /// old basis).
    pub fn fit(&mut self, x: &Tensor) -> Result<(), String> {
        self.pca.fit(x)?;
        self.clear();
        Ok(())
    }

    /// Incremental PCA; clears the recorded trajectories as `fit` does.
    pub fn partial_fit(&mut self, x: &Tensor) -> Result<(), String> {
        self.pca.partial_fit(x)?;
        self.clear();
        Ok(())
    }

    pub fn clear(&mut self) {
        self.steps.clear();
        self.codes.clear();
    }

    /// Record the codes of `step`: `[k]` or a batch `[B, k]` (its mean is
    /// recorded). Steps must increase strictly.
    pub fn record(&mut self, step: f64, codes: &Tensor) -> Result<(), String> {
        let k = self.pca.n_components();
        let shape = codes.f_size_checked().ts()?;
        let ok = match shape.as_slice() {
            [j] => *j == k,
            [b, j] => *j == k && *b >= 1,
            _ => false,
        };
        if !ok {
            return Err(format!("record: expected codes [{k}] or [B, {k}] with B >= 1, got shape {shape:?}"));
        }
        if !step.is_finite() {
            return Err(format!("record: step must be finite, got {step}"));
        }
        if let Some(&last) = self.steps.last() {
            if step <= last {
                return Err(format!("record: steps must increase strictly; step {step} follows {last}"));
            }
        }
        let flat = codes
            .f_detach()
            .and_then(|c| c.f_to_kind(Kind::Double))
            .and_then(|c| c.f_reshape([-1, k]))
            .ts()?;
        let mean = flat.f_mean_dim(0, false, Kind::Double).ts()?;
        if !all_finite(&mean)? {
            return Err("record: the codes hold NaN or infinite values".into());
        }
        self.codes.push(to_vec(&mean)?);
        self.steps.push(step);
        Ok(())
    }

    /// Record the codes of images `x` at `step` (`record(step, transform(x))`).
    pub fn record_images(&mut self, step: f64, x: &Tensor) -> Result<(), String> {
        let codes = self.pca.transform(x)?;
        self.record(step, &codes)
    }

    pub fn steps(&self) -> &[f64] {
        &self.steps
    }

    /// The recorded mean codes, `[S, k]` float64.
    pub fn trajectory(&self) -> Result<Tensor, String> {
        let k = self.pca.n_components();
        let flat: Vec<f64> = self.codes.iter().flatten().copied().collect();
        Tensor::f_from_slice(&flat).and_then(|t| t.f_reshape([self.steps.len() as i64, k])).ts()
    }

    /// One smoothing spline per component.
    pub fn splines(&self) -> Result<Vec<CubicSpline>, String> {
        if self.steps.is_empty() {
            return Err("no trajectories recorded: call record(step, codes) first".into());
        }
        let s = Smoother::new(&self.steps, self.smoothing)?;
        let k = self.pca.n_components() as usize;
        (0..k)
            .map(|c| {
                let y: Vec<f64> = self.codes.iter().map(|v| v[c]).collect();
                s.smooth(&y)
            })
            .collect()
    }

    /// The splines at `at`, `[len, k]` float64.
    pub fn smoothed_at(&self, at: &[f64]) -> Result<Tensor, String> {
        if let Some(v) = at.iter().find(|v| !v.is_finite()) {
            return Err(format!("smoothed: steps must be finite, got {v}"));
        }
        let splines = self.splines()?;
        let flat: Vec<f64> = at.iter().flat_map(|&x| splines.iter().map(move |s| s.eval(x))).collect();
        Tensor::f_from_slice(&flat).and_then(|t| t.f_reshape([at.len() as i64, splines.len() as i64])).ts()
    }

    /// Population variance over the recorded steps of each component's
    /// smoothed trajectory, `[k]`.
    pub fn trajectory_variance(&self) -> Result<Vec<f64>, String> {
        Ok(self
            .splines()?
            .iter()
            .map(|s| {
                let n = s.values.len() as f64;
                let mean = s.values.iter().sum::<f64>() / n;
                s.values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n
            })
            .collect())
    }

    /// Memory tier of each component by trajectory-variance rank, with the
    /// cumulative rule of [`super::tier_counts`].
    pub fn tiers(&self, hbm: f64, cpu: f64) -> Result<Vec<&'static str>, String> {
        tiers_by_score(&self.trajectory_variance()?, hbm, cpu)
    }

    /// Write the PCA, the smoothing and the recorded trajectories.
    pub fn save(&self, path: &Path, target: Target) -> Result<(), String> {
        let (mut tensors, mut meta) = self.pca.parts(FORMAT)?;
        meta.insert("smoothing".to_string(), format!("{:?}", self.smoothing));
        let steps = Tensor::f_from_slice(&self.steps).ts()?;
        tensors.push(("steps".to_string(), steps));
        tensors.push(("trajectory".to_string(), self.trajectory()?));
        let refs: Vec<(String, &Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
        safetensors::save(path, &refs, &meta, target)
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let l = safetensors::load(path)?;
        let pca = PcaTokenizer::from_parts(path, &l, FORMAT, &["steps", "trajectory"])?;
        let p = short_path(path);
        let s = l.metadata.get("smoothing").ok_or_else(|| format!("{p}: no 'smoothing' in the metadata"))?;
        let smoothing: f64 = s
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite() && *v >= 0.0)
            .ok_or_else(|| format!("{p}: metadata smoothing must be a number >= 0, got '{s}'"))?;
        let k = pca.n_components();
        let steps_t = l.get("steps").ok_or_else(|| format!("{p}: tensor 'steps' is missing"))?;
        let traj = l.get("trajectory").ok_or_else(|| format!("{p}: tensor 'trajectory' is missing"))?;
        let ns = steps_t.size();
        if steps_t.kind() != Kind::Double || ns.len() != 1 {
            return Err(format!("{p}: tensor 'steps' must be float64 [S], got {:?} {ns:?}", steps_t.kind()));
        }
        if traj.kind() != Kind::Double || traj.size() != [ns[0], k] {
            return Err(format!(
                "{p}: tensor 'trajectory' must be float64 [{}, {k}], got {:?} {:?}",
                ns[0],
                traj.kind(),
                traj.size()
            ));
        }
        let steps = to_vec(steps_t)?;
        check_knots(&steps, smoothing).map_err(|e| format!("{p}: {e}"))?;
        let flat = to_vec(traj)?;
        if flat.iter().any(|v| !v.is_finite()) {
            return Err(format!("{p}: tensor 'trajectory' holds NaN or infinite values"));
        }
        let codes = flat.chunks(k as usize).map(<[f64]>::to_vec).collect();
        Ok(SplinePcaTokenizer { pca, smoothing, steps, codes })
    }
}
