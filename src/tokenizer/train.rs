//! The tokenizer as a matrix axis (`TOKENIZER_*`, docs/tokenizers.md,
//! "In the matrix"): an image model trains and is evaluated on each image's
//! projection onto the first k principal components of the training images,
//! `x̂ = inverse(transform(x))`, so the cells of the axis differ only in how
//! much of the image the network sees. The spline-PCA cell also records the
//! mean code of every training batch and, at the end, tiers the components
//! by the variance of their smoothed trajectories.
//!
//! Two halves share one [`Shared`] state: [`TokenizedFeed`] wraps the cell's
//! data (projects every batch, records codes) and [`TokenizerHook`] carries
//! the trajectory through checkpoints and reports the tokenizer's numbers in
//! the run's summary.
use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;

use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tch::{Kind, Tensor};

use super::{tiers_by_score, PcaTokenizer, Quality, SplinePcaTokenizer, DEFAULT_CPU, DEFAULT_HBM};
use crate::params::ParamStore;
use crate::train::{Data, Hook, StepCtx};

/// The axis values and their Kconfig suffixes (`TOKENIZER_<SUFFIX>`).
pub const METHODS: &[(&str, &str)] = &[("NONE", "none"), ("PCA", "pca"), ("SPLINE_PCA", "spline_pca")];

/// Settings shared by the tokenizer cells of a matrix.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Components kept (k).
    pub components: i64,
    /// Training images the basis is fitted on (the first ones of the
    /// cell's seeded order).
    pub fit_samples: i64,
    /// The spline's smoothing (docs/tokenizers.md).
    pub smoothing: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { components: 64, fit_samples: 10000, smoothing: 1.0 }
    }
}

impl Settings {
    pub fn validate(&self) -> Result<()> {
        if self.components < 1 {
            bail!("TOKENIZER_COMPONENTS must be at least 1, got {}", self.components);
        }
        if self.fit_samples < 2 || self.fit_samples < self.components {
            bail!(
                "TOKENIZER_FIT_SAMPLES must be at least 2 and at least TOKENIZER_COMPONENTS ({}), got {}",
                self.components,
                self.fit_samples
            );
        }
        if !(self.smoothing >= 0.0 && self.smoothing.is_finite()) {
            bail!("TOKENIZER_SMOOTHING must be a finite number >= 0, got {}", self.smoothing);
        }
        Ok(())
    }
}

/// What the feed and the hook share.
pub struct Shared {
    pub method: String,
    pub tok: SplinePcaTokenizer,
    /// Training batches drawn so far (the trajectory's step axis).
    batches: i64,
    pub fitted_on: i64,
    /// Reconstruction quality on the evaluation split.
    pub quality: Option<Quality>,
}

fn te(e: String) -> anyhow::Error {
    anyhow!("tokenizer: {e}")
}

impl Shared {
    /// Spline-PCA records code trajectories.
    fn records(&self) -> bool {
        self.method == "spline_pca"
    }

    /// `x̂ = inverse(transform(x))` in x's dtype and shape.
    fn project(&self, x: &Tensor) -> Result<Tensor> {
        self.decode(&self.tok.pca.transform(x).map_err(te)?, x)
    }

    /// `inverse(codes)` in the dtype and shape of the images `like`.
    fn decode(&self, codes: &Tensor, like: &Tensor) -> Result<Tensor> {
        let back = self.tok.pca.inverse(codes).map_err(te)?;
        Ok(back.f_to_kind(like.f_kind()?)?.f_reshape(like.size())?)
    }
}

/// The cell's data, every image projected.
pub struct TokenizedFeed {
    inner: Box<dyn Data>,
    shared: Rc<RefCell<Shared>>,
}

/// Fit the basis of `method` on the first `fit_samples` training images of
/// `inner` (then rewound, so training sees the same order as the plain
/// cell), measure its quality on the evaluation split, and wrap `inner`.
pub fn wrap(inner: Box<dyn Data>, method: &str, s: &Settings) -> Result<(TokenizedFeed, TokenizerHook)> {
    s.validate()?;
    if method == "none" || !METHODS.iter().any(|(_, m)| *m == method) {
        bail!("tokenizer: unknown method '{method}' (pca, spline_pca)");
    }
    let mut inner = inner;
    let mut xs = Vec::new();
    let mut n = 0;
    while n < s.fit_samples {
        let Some((x, _)) = inner.next_batch()? else { break };
        n += x.size()[0];
        xs.push(x);
    }
    inner.rewind();
    if n < s.components.max(2) {
        bail!("tokenizer: the training split has {n} images, fewer than the {} components", s.components);
    }
    let x = Tensor::f_cat(&xs, 0)?.f_narrow(0, 0, n.min(s.fit_samples))?;
    let features: i64 = x.size().iter().skip(1).product();
    if s.components > features.min(x.size()[0]) {
        bail!(
            "TOKENIZER_COMPONENTS={} is more than the {} features of an image (or the {} images fitted on)",
            s.components,
            features,
            x.size()[0]
        );
    }
    let mut pca = PcaTokenizer::new(s.components).map_err(te)?;
    pca.fit(&x).map_err(te)?;
    let tok = SplinePcaTokenizer::from_pca(pca, s.smoothing).map_err(te)?;
    let mut eval = Vec::new();
    inner.for_each_eval(&mut |x, _| {
        eval.push(x.shallow_clone());
        Ok(())
    })?;
    let quality = match eval.is_empty() {
        true => None,
        false => Some(tok.pca.quality(&Tensor::f_cat(&eval, 0)?, s.components, None).map_err(te)?),
    };
    let shared = Rc::new(RefCell::new(Shared {
        method: method.to_string(),
        tok,
        batches: 0,
        fitted_on: x.size()[0],
        quality,
    }));
    Ok((TokenizedFeed { inner, shared: shared.clone() }, TokenizerHook { shared, save_to: None }))
}

impl Data for TokenizedFeed {
    fn next_batch(&mut self) -> Result<Option<(Tensor, Tensor)>> {
        let Some((x, y)) = self.inner.next_batch()? else { return Ok(None) };
        let mut s = self.shared.borrow_mut();
        s.batches += 1;
        // One encoding serves both the record and the projection.
        let codes = s.tok.pca.transform(&x).map_err(te)?;
        if s.records() {
            let step = s.batches as f64;
            s.tok.record(step, &codes).map_err(te)?;
        }
        Ok(Some((s.decode(&codes, &x)?, y)))
    }

    fn new_epoch(&mut self) -> Result<()> {
        self.inner.new_epoch()
    }

    fn batches_per_epoch(&self) -> Option<i64> {
        self.inner.batches_per_epoch()
    }

    fn for_each_eval(&mut self, f: &mut dyn FnMut(&Tensor, &Tensor) -> Result<()>) -> Result<()> {
        let shared = self.shared.clone();
        self.inner.for_each_eval(&mut |x, y| f(&shared.borrow().project(x)?, y))
    }

    fn state(&self) -> Value {
        json!({ "inner": self.inner.state(), "batches": self.shared.borrow().batches })
    }

    fn restore(&mut self, state: &Value) -> Result<()> {
        let batches = state.get("batches").and_then(Value::as_i64);
        let (Some(inner), Some(b)) = (state.get("inner"), batches) else {
            bail!("checkpoint: the data state has no tokenizer position (saved without a tokenizer?)");
        };
        self.inner.restore(inner)?;
        self.shared.borrow_mut().batches = b;
        Ok(())
    }

    fn rewind(&mut self) {
        self.inner.rewind();
        let mut s = self.shared.borrow_mut();
        s.batches = 0;
        s.tok.clear();
    }

    fn describe(&self) -> Value {
        let s = self.shared.borrow();
        let mut d = self.inner.describe();
        if let Some(o) = d.as_object_mut() {
            o.insert(
                "tokenizer".into(),
                json!({ "method": s.method, "components": s.tok.pca.n_components(), "fitted_on": s.fitted_on,
                        "smoothing": s.tok.smoothing() }),
            );
        }
        d
    }
}

/// Checkpoints the trajectory and reports the tokenizer in the summary.
pub struct TokenizerHook {
    shared: Rc<RefCell<Shared>>,
    /// Where to write `tokenizer.safetensors` at the end (the run folder).
    pub save_to: Option<PathBuf>,
}

impl Hook for TokenizerHook {
    fn name(&self) -> &str {
        "tokenizer"
    }

    fn before_step(&mut self, _ctx: &mut StepCtx) -> Result<()> {
        Ok(())
    }

    fn after_step(&mut self, _ctx: &mut StepCtx) -> Result<()> {
        Ok(())
    }

    fn metrics(&mut self) -> Result<Map<String, Value>> {
        Ok(Map::new())
    }

    fn state(&self) -> Value {
        json!({ "recorded": self.shared.borrow().tok.steps().len() })
    }

    /// The basis (a resumed cell projects with the checkpoint's, not a
    /// refit that threads or LAPACK could change) and the trajectory with
    /// its steps as tensors, so the JSON state stays small.
    fn tensors(&self) -> Vec<(String, Tensor)> {
        let s = self.shared.borrow();
        let mut out: Vec<(String, Tensor)> = match s.tok.pca.fitted() {
            Ok(f) => f
                .tensors()
                .into_iter()
                .map(|(n, t)| (format!("tokenizer.basis.{n}"), t.shallow_clone()))
                .collect(),
            Err(_) => Vec::new(),
        };
        if !s.tok.steps().is_empty() {
            if let Ok(t) = s.tok.trajectory() {
                out.push(("tokenizer.trajectory".to_string(), t));
                out.push(("tokenizer.steps".to_string(), Tensor::from_slice(s.tok.steps())));
            }
        }
        out
    }

    fn restore(&mut self, state: &Value, tensors: &[(String, Tensor)]) -> Result<()> {
        let mut s = self.shared.borrow_mut();
        if tensors.iter().any(|(n, _)| n.starts_with("tokenizer.basis.")) {
            let f = s.tok.pca.fitted_mut().map_err(te)?;
            f.restore(tensors, "tokenizer.basis.")
                .map_err(|e| anyhow!("checkpoint: tokenizer basis: {e}"))?;
        }
        let recorded = state.get("recorded").and_then(Value::as_u64).unwrap_or(0) as usize;
        s.tok.clear();
        if recorded == 0 {
            return Ok(());
        }
        let steps: Vec<f64> = match tensors.iter().find(|(n, _)| n == "tokenizer.steps") {
            Some((_, t)) => Vec::<f64>::try_from(t.f_to_kind(Kind::Double)?.f_flatten(0, -1)?)
                .map_err(|e| anyhow!("checkpoint: tokenizer steps: {e}"))?,
            None => bail!("checkpoint: the tokenizer's steps are missing"),
        };
        if steps.len() != recorded {
            bail!("checkpoint: {} tokenizer steps, the state says {recorded}", steps.len());
        }
        let t = tensors
            .iter()
            .find(|(n, _)| n == "tokenizer.trajectory")
            .map(|(_, t)| t)
            .ok_or_else(|| anyhow!("checkpoint: the tokenizer's trajectory is missing"))?;
        let k = s.tok.pca.n_components();
        if t.size() != [steps.len() as i64, k] {
            bail!("checkpoint: tokenizer trajectory {:?}, expected [{}, {k}]", t.size(), steps.len());
        }
        for (i, &step) in steps.iter().enumerate() {
            s.tok.record(step, &t.f_get(i as i64)?.f_to_kind(Kind::Double)?).map_err(te)?;
        }
        Ok(())
    }

    fn summary(&mut self, _store: &ParamStore) -> Result<Map<String, Value>> {
        let s = self.shared.borrow();
        let imp = s.tok.pca.component_importance().map_err(te)?;
        let pca_tiers = tiers_by_score(&imp, DEFAULT_HBM, DEFAULT_CPU).map_err(te)?;
        let mut t = json!({
            "method": s.method,
            "components": s.tok.pca.n_components(),
            "fitted_on": s.fitted_on,
            "explained": imp.iter().sum::<f64>(),
            "tiers_by_variance": count(&pca_tiers),
        });
        if let Some(q) = &s.quality {
            t["eval_rel_mse"] = json!(q.rel_mse);
            t["eval_psnr"] = json!(q.psnr);
        }
        if s.records() {
            t["recorded_steps"] = json!(s.tok.steps().len());
            // A spline needs a few points; short runs report the count only.
            if s.tok.steps().len() >= 4 {
                t["tiers_by_trajectory"] = json!(count(&s.tok.tiers(DEFAULT_HBM, DEFAULT_CPU).map_err(te)?));
                t["trajectory_variance"] = json!(s.tok.trajectory_variance().map_err(te)?);
            }
        }
        // One file per run (rank 0); a failed write is reported, and the
        // finished run stays finished.
        if let Some(dir) = self.save_to.as_ref().filter(|_| crate::dist::rank() == 0) {
            let path = dir.join("tokenizer.safetensors");
            let target = crate::safetensors::Target::OWNED;
            let saved = if s.records() { s.tok.save(&path, target) } else { s.tok.pca.save(&path, target) };
            if let Err(e) = saved {
                eprintln!("warning: {}: {e}", path.display());
                t["save_error"] = json!(e);
            }
        }
        let mut m = Map::new();
        m.insert("tokenizer".into(), t);
        Ok(m)
    }
}

fn count(tiers: &[&str]) -> Value {
    let n = |name: &str| tiers.iter().filter(|t| **t == name).count();
    json!({ "hbm": n("hbm"), "cpu": n("cpu"), "ssd": n("ssd") })
}
