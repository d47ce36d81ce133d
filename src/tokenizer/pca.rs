//! The PCA image tokenizer: exact and incremental principal components of
//! flattened images, codes, reconstructions and their quality.
//!
//! All state is float64 on the CPU. `fit` is exact: one thin SVD of the
//! centred data `X - mean = U S Vᵀ`, components the first k rows of `Vᵀ`.
//! `partial_fit` is incremental PCA as in scikit-learn's IncrementalPCA
//! (Ross et al. 2008): with `n` samples seen (mean `m`, singular values `S`,
//! components `V`) and a batch `B` of `b` samples (mean `m_b`), the SVD of
//!
//! ```text
//!     [ diag(S) V                          ]   k rows
//!     [ B - m_b                            ]   b rows
//!     [ sqrt(n b / (n + b)) (m - m_b)      ]   1 row
//! ```
//!
//! gives the new `S` and `V` (first k), since its Gram matrix is the scatter
//! of all `n + b` samples about their new mean whenever `diag(S) V` holds
//! the old scatter exactly (k at least the rank of the data seen, e.g.
//! k = D); with fewer components it is the usual truncated approximation.
//! Signs follow scikit-learn's `svd_flip`: the largest-magnitude entry of
//! each component is positive.
use std::collections::BTreeMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::{tiers_by_score, OrString};
use crate::safetensors::{self, Loaded, Target};
use crate::tensor::{num, short_path, SizeChecked};

/// `format` metadata of a saved PCA tokenizer.
pub const FORMAT: &str = "knlp-pca-tokenizer";
const VERSION: &str = "1";

/// A fitted basis. Tensors are float64 on the CPU and never modified in
/// place (a fit replaces them), so copies may share them.
#[derive(Debug)]
pub struct Fitted {
    /// Shape of one sample, as first fitted (`[1, 28, 28]`).
    pub image_shape: Vec<i64>,
    /// Mean of the samples seen, `[D]`.
    pub mean: Tensor,
    /// Per-feature population variance of the samples seen, `[D]`.
    pub var: Tensor,
    /// Principal axes, `[k, D]`, orthonormal rows, by decreasing variance.
    pub components: Tensor,
    /// Singular values of the centred data, `[k]`.
    pub singular_values: Tensor,
    /// Variance along each component, `S² / (n - 1)`, `[k]`.
    pub explained_variance: Tensor,
    /// Share of the total variance along each component, `[k]`.
    pub explained_variance_ratio: Tensor,
    /// Samples seen.
    pub n_seen: i64,
    /// Whether `partial_fit` built (or extended) the basis.
    pub incremental: bool,
}

impl Fitted {
    fn copy(&self) -> Fitted {
        Fitted {
            image_shape: self.image_shape.clone(),
            mean: self.mean.shallow_clone(),
            var: self.var.shallow_clone(),
            components: self.components.shallow_clone(),
            singular_values: self.singular_values.shallow_clone(),
            explained_variance: self.explained_variance.shallow_clone(),
            explained_variance_ratio: self.explained_variance_ratio.shallow_clone(),
            n_seen: self.n_seen,
            incremental: self.incremental,
        }
    }

    /// Features per sample.
    pub fn n_features(&self) -> i64 {
        self.image_shape.iter().product()
    }

    /// The basis's tensors by name, for a training checkpoint.
    pub fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        vec![
            ("mean", &self.mean),
            ("var", &self.var),
            ("components", &self.components),
            ("singular_values", &self.singular_values),
            ("explained_variance", &self.explained_variance),
            ("explained_variance_ratio", &self.explained_variance_ratio),
        ]
    }

    /// Put back tensors [`Self::tensors`] gave (a checkpoint of the same
    /// fit, so that a resumed run projects exactly as before); each must
    /// have the shape of the one it replaces.
    pub fn restore(&mut self, named: &[(String, Tensor)], prefix: &str) -> Result<(), String> {
        let mut next = self.copy();
        for (name, slot) in [
            ("mean", &mut next.mean),
            ("var", &mut next.var),
            ("components", &mut next.components),
            ("singular_values", &mut next.singular_values),
            ("explained_variance", &mut next.explained_variance),
            ("explained_variance_ratio", &mut next.explained_variance_ratio),
        ] {
            let key = format!("{prefix}{name}");
            let t = named
                .iter()
                .find(|(n, _)| *n == key)
                .map(|(_, t)| t)
                .ok_or_else(|| format!("no tensor '{key}'"))?;
            if t.size() != slot.size() {
                return Err(format!("'{key}' is {:?}, the basis needs {:?}", t.size(), slot.size()));
            }
            *slot = t.f_to_kind(Kind::Double).and_then(|t| t.f_to_device(tch::Device::Cpu)).ts()?;
        }
        *self = next;
        Ok(())
    }
}

/// Reconstruction quality of `inverse(transform(x))` with the first
/// `components` components (see [`PcaTokenizer::quality`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Quality {
    pub components: i64,
    /// Mean squared error per value.
    pub mse: f64,
    /// Squared error over the squared deviation of `x` from the fitted
    /// mean: 0 is perfect, 1 is the mean image alone.
    pub rel_mse: f64,
    /// `10 log10(peak² / mse)` in dB (infinite for a perfect reconstruction).
    pub psnr: f64,
    pub peak: f64,
    /// Cumulative explained-variance ratio of the components used.
    pub explained: f64,
}

/// Named tensors and string metadata of a tokenizer file.
pub(crate) type Parts = (Vec<(String, Tensor)>, BTreeMap<String, String>);

/// The PCA image tokenizer (see the module documentation).
#[derive(Debug)]
pub struct PcaTokenizer {
    n_components: i64,
    fitted: Option<Fitted>,
}

impl Clone for PcaTokenizer {
    fn clone(&self) -> Self {
        PcaTokenizer { n_components: self.n_components, fitted: self.fitted.as_ref().map(Fitted::copy) }
    }
}

/// `x` as `[N, D]` float64 on its own device, with the shape of one sample.
fn flat64(x: &Tensor, what: &str) -> Result<(Tensor, Vec<i64>), String> {
    let shape = x.f_size_checked().ts()?;
    if shape.len() < 2 {
        return Err(format!(
            "{what}: expected a batch [N, ...] of at least 2 dimensions, got shape {shape:?}"
        ));
    }
    let kind = x.f_kind().ts()?;
    if matches!(kind, Kind::ComplexHalf | Kind::ComplexFloat | Kind::ComplexDouble) {
        return Err(format!("{what}: expected real values, got {}", crate::tensor::kind_name(kind)));
    }
    let d: i64 = shape[1..].iter().product();
    if d == 0 {
        return Err(format!("{what}: samples of shape {:?} hold no values", &shape[1..]));
    }
    let xf =
        x.f_detach().and_then(|t| t.f_reshape([shape[0], d])).and_then(|t| t.f_to_kind(Kind::Double)).ts()?;
    if crate::tensor::is_floating(kind) && !all_finite(&xf)? {
        return Err(format!("{what}: the input holds NaN or infinite values"));
    }
    Ok((xf, shape[1..].to_vec()))
}

pub(crate) fn all_finite(t: &Tensor) -> Result<bool, String> {
    Ok(t.f_isfinite().and_then(|f| f.f_all()).and_then(|a| a.f_int64_value(&[])).ts()? != 0)
}

fn scalar(t: &Tensor) -> Result<f64, String> {
    t.f_double_value(&[]).ts()
}

pub(crate) fn to_vec(t: &Tensor) -> Result<Vec<f64>, String> {
    crate::tensor::to_vec_f64(t).ts()
}

/// The dtype codes and reconstructions are computed in for an input of
/// `kind`, and the dtype they are returned in.
fn kinds_for(kind: Kind) -> (Kind, Kind) {
    match kind {
        Kind::Double => (Kind::Double, Kind::Double),
        Kind::Float => (Kind::Float, Kind::Float),
        Kind::Half | Kind::BFloat16 => (Kind::Float, kind),
        _ => (Kind::Float, Kind::Float),
    }
}

/// scikit-learn's `svd_flip` on the rows of `vh`: the largest-magnitude
/// entry of each row becomes positive.
fn flip_signs(vh: &Tensor) -> Result<Tensor, String> {
    let idx = vh.f_abs().and_then(|a| a.f_argmax(1, true)).ts()?;
    let picked = vh.f_gather(1, &idx, false).ts()?;
    // An all-zero row has sign 0: it keeps its (zero) entries.
    let zero = picked.f_eq_tensor(&num(0.0).ts()?).and_then(|z| z.f_to_kind(Kind::Double)).ts()?;
    let signs = picked.f_sign().and_then(|s| s.f_add(&zero)).ts()?;
    vh.f_mul(&signs).ts()
}

impl PcaTokenizer {
    /// An unfitted tokenizer keeping `n_components` components.
    pub fn new(n_components: i64) -> Result<Self, String> {
        if n_components < 1 {
            return Err(format!("a PCA tokenizer needs at least 1 component, got {n_components}"));
        }
        Ok(PcaTokenizer { n_components, fitted: None })
    }

    pub fn n_components(&self) -> i64 {
        self.n_components
    }

    pub fn is_fitted(&self) -> bool {
        self.fitted.is_some()
    }

    /// The fitted state, mutable (a training checkpoint's restore).
    pub fn fitted_mut(&mut self) -> Result<&mut Fitted, String> {
        self.fitted.as_mut().ok_or_else(|| "the PCA tokenizer is not fitted".to_string())
    }

    /// The fitted state, or an error saying how to get one.
    pub fn fitted(&self) -> Result<&Fitted, String> {
        self.fitted
            .as_ref()
            .ok_or_else(|| "the PCA tokenizer is not fitted: call fit(x) or partial_fit(x) first".to_string())
    }

    /// Exact PCA of `x` (`[N, ...]`, any real dtype, any device), replacing
    /// any earlier fit: the thin SVD of the centred data in float64.
    pub fn fit(&mut self, x: &Tensor) -> Result<(), String> {
        let (xf, image_shape) = flat64(x, "fit")?;
        self.fitted = Some(self.exact(&xf, image_shape, "fit", false)?);
        Ok(())
    }

    /// The exact fit of flattened samples `xf` `[N, D]` (float64).
    fn exact(
        &self,
        xf: &Tensor,
        image_shape: Vec<i64>,
        what: &str,
        incremental: bool,
    ) -> Result<Fitted, String> {
        let (n, d) = (xf.size()[0], xf.size()[1]);
        let k = self.n_components;
        if n < 2 {
            return Err(format!("{what}: needs at least 2 samples, got {n}"));
        }
        if k > d.min(n) {
            return Err(format!(
                "{what}: {k} components need at least {k} samples and {k} features per sample; got {n} samples of {d} values"
            ));
        }
        let mean = xf.f_mean_dim(0, false, Kind::Double).ts()?;
        let xc = xf.f_sub(&mean).ts()?;
        let var = xc.f_square().and_then(|s| s.f_mean_dim(0, false, Kind::Double)).ts()?;
        let (_, s, v) = xc.f_svd(true, true).ts()?;
        let vh = flip_signs(&v.f_tr().ts()?.f_narrow(0, 0, k).ts()?)?;
        finish(image_shape, mean, var, vh, s.f_narrow(0, 0, k).ts()?, n, incremental)
    }

    /// Merge a batch into the basis (incremental PCA; see the module
    /// documentation). The first batch needs at least max(k, 2) samples.
    pub fn partial_fit(&mut self, x: &Tensor) -> Result<(), String> {
        let (xf, image_shape) = flat64(x, "partial_fit")?;
        let (b, d) = (xf.size()[0], xf.size()[1]);
        let k = self.n_components;
        let Some(f) = &self.fitted else {
            if b < k.max(2) {
                return Err(format!(
                    "partial_fit: the first batch needs at least {} samples for {k} components, got {b}",
                    k.max(2)
                ));
            }
            // The first batch: its exact PCA.
            self.fitted = Some(self.exact(&xf, image_shape, "partial_fit", true)?);
            return Ok(());
        };
        if d != f.n_features() {
            return Err(shape_error("partial_fit", f, &x.size()));
        }
        if b == 0 {
            return Ok(());
        }
        let xf = xf.f_to_device(Device::Cpu).ts()?;
        let n = f.n_seen;
        let total = n + b;
        let mean_b = xf.f_mean_dim(0, false, Kind::Double).ts()?;
        let xc = xf.f_sub(&mean_b).ts()?;
        let var_b = xc.f_square().and_then(|s| s.f_mean_dim(0, false, Kind::Double)).ts()?;
        // Chan et al.: mean and population variance of old and new together.
        let delta = mean_b.f_sub(&f.mean).ts()?;
        let mean = f.mean.f_add(&delta.f_mul(&num(b as f64 / total as f64).ts()?).ts()?).ts()?;
        let m2 = f
            .var
            .f_mul(&num(n as f64).ts()?)
            .and_then(|a| a.f_add(&var_b.f_mul(&num(b as f64)?)?))
            .and_then(|a| a.f_add(&delta.f_square()?.f_mul(&num(n as f64 * b as f64 / total as f64)?)?))
            .ts()?;
        let var = m2.f_div(&num(total as f64).ts()?).ts()?;
        let correction = f
            .mean
            .f_sub(&mean_b)
            .and_then(|c| c.f_mul(&num((n as f64 * b as f64 / total as f64).sqrt())?))
            .and_then(|c| c.f_unsqueeze(0))
            .ts()?;
        let old = f.components.f_mul(&f.singular_values.f_unsqueeze(1).ts()?).ts()?;
        let stacked = Tensor::f_cat(&[old, xc, correction], 0).ts()?;
        let (_, s, v) = stacked.f_svd(true, true).ts()?;
        let vh = flip_signs(&v.f_tr().ts()?.f_narrow(0, 0, k).ts()?)?;
        let shape = f.image_shape.clone();
        self.fitted = Some(finish(shape, mean, var, vh, s.f_narrow(0, 0, k).ts()?, total, true)?);
        Ok(())
    }

    /// Codes `[N, k]` of `x` (`[N, ...]` with D values per sample):
    /// `(x - mean) Vᵀ`, in float64 for float64 input, else float32 (returned
    /// as the input's dtype when it is a float type).
    pub fn transform(&self, x: &Tensor) -> Result<Tensor, String> {
        let f = self.fitted()?;
        let (xf, _) = checked_input(f, x, "transform")?;
        let (calc, out) = kinds_for(x.f_kind().ts()?);
        let dev = xf.device();
        let mean = f.mean.f_to_device(dev).and_then(|m| m.f_to_kind(calc)).ts()?;
        let comps = f.components.f_to_device(dev).and_then(|c| c.f_to_kind(calc)).ts()?;
        xf.f_to_kind(calc)
            .and_then(|t| t.f_sub(&mean))
            .and_then(|t| t.f_matmul(&comps.f_tr()?))
            .and_then(|t| t.f_to_kind(out))
            .ts()
    }

    /// Images `[N, *image_shape]` from codes `[N, j]`, `j <= k`, using the
    /// first j components: `codes V[:j] + mean`.
    pub fn inverse(&self, codes: &Tensor) -> Result<Tensor, String> {
        let f = self.fitted()?;
        let shape = codes.f_size_checked().ts()?;
        let k = self.n_components;
        if shape.len() != 2 || shape[1] > k {
            return Err(format!(
                "inverse: expected codes [N, j] with j <= {k} (the tokenizer's components), got shape {shape:?}"
            ));
        }
        let kind = codes.f_kind().ts()?;
        if matches!(kind, Kind::ComplexHalf | Kind::ComplexFloat | Kind::ComplexDouble | Kind::Bool) {
            return Err(format!(
                "inverse: codes must be real numbers, got {}",
                crate::tensor::kind_name(kind)
            ));
        }
        let (calc, out) = kinds_for(kind);
        let dev = codes.device();
        let mean = f.mean.f_to_device(dev).and_then(|m| m.f_to_kind(calc)).ts()?;
        let comps = f
            .components
            .f_narrow(0, 0, shape[1])
            .and_then(|c| c.f_to_device(dev))
            .and_then(|c| c.f_to_kind(calc))
            .ts()?;
        let mut dims = vec![shape[0]];
        dims.extend_from_slice(&f.image_shape);
        codes
            .f_detach()
            .and_then(|c| c.f_to_kind(calc))
            .and_then(|c| c.f_matmul(&comps))
            .and_then(|t| t.f_add(&mean))
            .and_then(|t| t.f_reshape(&dims))
            .and_then(|t| t.f_to_kind(out))
            .ts()
    }

    /// Explained-variance ratio of each component (its importance), `[k]`.
    pub fn component_importance(&self) -> Result<Vec<f64>, String> {
        to_vec(&self.fitted()?.explained_variance_ratio)
    }

    /// Memory tier of each component by importance rank, with the
    /// cumulative rule of [`super::tier_counts`].
    pub fn tiers(&self, hbm: f64, cpu: f64) -> Result<Vec<&'static str>, String> {
        tiers_by_score(&self.component_importance()?, hbm, cpu)
    }

    /// Quality of `inverse(transform(x))` with the first `j` components
    /// (`0 <= j <= k`), computed in float64. `peak` for the PSNR defaults
    /// to the range of `x` (max - min: 1 for images in [0, 1], 255 for
    /// uint8). On the training data of an exact fit, `1 - rel_mse` is the
    /// cumulative explained-variance ratio of the first j components.
    pub fn quality(&self, x: &Tensor, j: i64, peak: Option<f64>) -> Result<Quality, String> {
        let f = self.fitted()?;
        let k = self.n_components;
        if !(0..=k).contains(&j) {
            return Err(format!("quality: the number of components must be in 0..={k}, got {j}"));
        }
        if let Some(p) = peak {
            if !p.is_finite() || p <= 0.0 {
                return Err(format!("quality: peak must be a positive number, got {p}"));
            }
        }
        let (xf, _) = checked_input(f, x, "quality")?;
        let n = xf.size()[0];
        if n == 0 {
            return Err("quality: needs at least one sample".into());
        }
        let dev = xf.device();
        let mean = f.mean.f_to_device(dev).ts()?;
        let v = f.components.f_narrow(0, 0, j).and_then(|c| c.f_to_device(dev)).ts()?;
        let xc = xf.f_sub(&mean).ts()?;
        let rec = xc.f_matmul(&v.f_tr().ts()?).and_then(|c| c.f_matmul(&v)).ts()?;
        let sse =
            scalar(&xc.f_sub(&rec).and_then(|e| e.f_square()).and_then(|e| e.f_sum(Kind::Double)).ts()?)?;
        let energy = scalar(&xc.f_square().and_then(|e| e.f_sum(Kind::Double)).ts()?)?;
        let mse = sse / (n * f.n_features()) as f64;
        let rel_mse = if energy > 0.0 {
            sse / energy
        } else if sse == 0.0 {
            0.0
        } else {
            f64::INFINITY
        };
        let peak = match peak {
            Some(p) => p,
            None => scalar(&xf.f_max().ts()?)? - scalar(&xf.f_min().ts()?)?,
        };
        let psnr = if mse == 0.0 { f64::INFINITY } else { 10.0 * (peak * peak / mse).log10() };
        let explained = to_vec(&f.explained_variance_ratio)?.iter().take(j as usize).sum();
        Ok(Quality { components: j, mse, rel_mse, psnr, peak, explained })
    }

    /// Tensors and metadata of the fitted state, for [`Self::save`] and the
    /// spline tokenizer's file.
    pub(crate) fn parts(&self, format: &str) -> Result<Parts, String> {
        let f = self.fitted()?;
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), format.to_string());
        meta.insert("version".to_string(), VERSION.to_string());
        meta.insert("n_components".to_string(), self.n_components.to_string());
        meta.insert("n_features".to_string(), f.n_features().to_string());
        meta.insert("n_samples_seen".to_string(), f.n_seen.to_string());
        meta.insert("image_shape".to_string(), serde_json::to_string(&f.image_shape).unwrap_or_default());
        meta.insert("fitted_by".to_string(), if f.incremental { "partial_fit" } else { "fit" }.to_string());
        let tensors = vec![
            ("mean".to_string(), f.mean.shallow_clone()),
            ("var".to_string(), f.var.shallow_clone()),
            ("components".to_string(), f.components.shallow_clone()),
            ("singular_values".to_string(), f.singular_values.shallow_clone()),
            ("explained_variance".to_string(), f.explained_variance.shallow_clone()),
            ("explained_variance_ratio".to_string(), f.explained_variance_ratio.shallow_clone()),
        ];
        Ok((tensors, meta))
    }

    /// Write the fitted tokenizer to a safetensors file (atomically), with
    /// its hyper-parameters in the metadata.
    pub fn save(&self, path: &Path, target: Target) -> Result<(), String> {
        let (tensors, meta) = self.parts(FORMAT)?;
        let refs: Vec<(String, &Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
        safetensors::save(path, &refs, &meta, target)
    }

    /// Read a tokenizer [`Self::save`] wrote; every inconsistency is an
    /// error naming the file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let l = safetensors::load(path)?;
        Self::from_parts(path, &l, FORMAT, &[])
    }

    /// Rebuild from a loaded file whose `format` must be `format`; `extra`
    /// names further tensors the caller reads.
    pub(crate) fn from_parts(path: &Path, l: &Loaded, format: &str, extra: &[&str]) -> Result<Self, String> {
        let p = short_path(path);
        let bad = |what: String| format!("{p}: {what}");
        let meta = |key: &str| -> Result<&String, String> {
            l.metadata
                .get(key)
                .ok_or_else(|| bad(format!("no '{key}' in the metadata; not a saved {format} file")))
        };
        let found = meta("format")?;
        if found != format {
            return Err(bad(format!("holds a '{found}', not a '{format}'")));
        }
        let version = meta("version")?;
        if version != VERSION {
            return Err(bad(format!("version {version} is not one this knlp reads ({VERSION})")));
        }
        let int = |key: &str, min: i64| -> Result<i64, String> {
            let s = meta(key)?;
            s.parse::<i64>()
                .ok()
                .filter(|v| *v >= min)
                .ok_or_else(|| bad(format!("metadata '{key}' must be an integer >= {min}, got '{s}'")))
        };
        let k = int("n_components", 1)?;
        let d = int("n_features", 1)?;
        let n = int("n_samples_seen", 2)?;
        let shape_s = meta("image_shape")?;
        let image_shape: Vec<i64> = serde_json::from_str(shape_s)
            .ok()
            .filter(|s: &Vec<i64>| {
                !s.is_empty() && s.iter().all(|v| *v > 0) && s.iter().product::<i64>() == d
            })
            .ok_or_else(|| bad(format!("metadata image_shape '{shape_s}' does not hold {d} values")))?;
        let incremental = match meta("fitted_by")?.as_str() {
            "fit" => false,
            "partial_fit" => true,
            other => {
                return Err(bad(format!("metadata fitted_by must be fit or partial_fit, got '{other}'")))
            }
        };
        if k > d {
            return Err(bad(format!("{k} components exceed the {d} features")));
        }
        let names = [
            "mean",
            "var",
            "components",
            "singular_values",
            "explained_variance",
            "explained_variance_ratio",
        ];
        for (name, _) in &l.tensors {
            if !names.contains(&name.as_str()) && !extra.contains(&name.as_str()) {
                return Err(bad(format!("unexpected tensor '{name}'")));
            }
        }
        let get = |name: &str, shape: &[i64]| -> Result<Tensor, String> {
            let t = l.get(name).ok_or_else(|| bad(format!("tensor '{name}' is missing")))?;
            if t.kind() != Kind::Double || t.size() != shape {
                return Err(bad(format!(
                    "tensor '{name}' is {} {:?}, expected float64 {shape:?}",
                    crate::tensor::kind_name(t.kind()),
                    t.size()
                )));
            }
            if !all_finite(t)? {
                return Err(bad(format!("tensor '{name}' holds NaN or infinite values")));
            }
            Ok(t.shallow_clone())
        };
        let f = Fitted {
            image_shape,
            mean: get("mean", &[d])?,
            var: get("var", &[d])?,
            components: get("components", &[k, d])?,
            singular_values: get("singular_values", &[k])?,
            explained_variance: get("explained_variance", &[k])?,
            explained_variance_ratio: get("explained_variance_ratio", &[k])?,
            n_seen: n,
            incremental,
        };
        // The components must be orthonormal: a cheap check that the bytes
        // are the ones written.
        let gram = f.components.f_matmul(&f.components.f_tr().ts()?).ts()?;
        let eye = Tensor::f_eye(k, (Kind::Double, Device::Cpu)).ts()?;
        let off = scalar(&gram.f_sub(&eye).and_then(|g| g.f_abs()).and_then(|g| g.f_max()).ts()?)?;
        if off > 1e-6 {
            return Err(bad(format!(
                "the components are not orthonormal (off by {off:e}); the file is corrupt"
            )));
        }
        if scalar(&f.var.f_min().ts()?)? < 0.0 || scalar(&f.singular_values.f_min().ts()?)? < 0.0 {
            return Err(bad("negative variances or singular values; the file is corrupt".into()));
        }
        Ok(PcaTokenizer { n_components: k, fitted: Some(f) })
    }
}

fn shape_error(what: &str, f: &Fitted, got: &[i64]) -> String {
    let d = f.n_features();
    let hint = if got == f.image_shape.as_slice() {
        " (one image: add a batch dimension, x.unsqueeze(0))"
    } else {
        ""
    };
    format!(
        "{what}: expected [N, ...] with {d} values per sample (fitted on samples of shape {:?}), got shape {got:?}{hint}",
        f.image_shape
    )
}

/// `x` flattened and checked against the fitted feature count.
fn checked_input(f: &Fitted, x: &Tensor, what: &str) -> Result<(Tensor, Vec<i64>), String> {
    let shape = x.f_size_checked().ts()?;
    if shape.len() < 2 || shape[1..].iter().product::<i64>() != f.n_features() {
        return Err(shape_error(what, f, &shape));
    }
    flat64(x, what)
}

/// The fitted state from the thin SVD's leading `k` rows.
fn finish(
    image_shape: Vec<i64>,
    mean: Tensor,
    var: Tensor,
    components: Tensor,
    singular_values: Tensor,
    n: i64,
    incremental: bool,
) -> Result<Fitted, String> {
    let cpu = |t: Tensor| t.f_to_device(Device::Cpu).and_then(|t| t.f_contiguous()).ts();
    let (mean, var, components, singular_values) =
        (cpu(mean)?, cpu(var)?, cpu(components)?, cpu(singular_values)?);
    let s2 = singular_values.f_square().ts()?;
    let explained_variance = s2.f_div(&num((n - 1) as f64).ts()?).ts()?;
    let total = scalar(&var.f_sum(Kind::Double).ts()?)? * n as f64;
    let explained_variance_ratio =
        if total > 0.0 { s2.f_div(&num(total).ts()?).ts()? } else { s2.f_zeros_like().ts()? };
    Ok(Fitted {
        image_shape,
        mean,
        var,
        components,
        singular_values,
        explained_variance,
        explained_variance_ratio,
        n_seen: n,
        incremental,
    })
}
