//! Image tokenizers: images as codes over a PCA basis (docs/tokenizers.md).
//!
//! [`PcaTokenizer`] flattens images to vectors and fits a principal
//! component basis, exactly (one SVD of the centred data) or incrementally
//! (batches merged through an SVD, as in Ross et al. 2008 and scikit-learn's
//! IncrementalPCA). [`SplinePcaTokenizer`] wraps one and records how the mean
//! code of each component moves over training steps, smoothed by a cubic
//! smoothing spline per component. Both assign components to memory tiers
//! (HBM, CPU, SSD) with the cumulative rule of [`tiers_by_score`], and save
//! to and load from safetensors files with their hyper-parameters in the
//! metadata. Nothing here knows Rhai (`script/tokenizer.rs` binds it).
pub mod pca;
pub mod spline;
pub mod train;

pub use pca::{PcaTokenizer, Quality};
pub use spline::{CubicSpline, SplinePcaTokenizer};

use tch::TchError;

use crate::tensor::torch_error;

/// Default HBM threshold of the tier rule (the seed's Kconfig default).
pub const DEFAULT_HBM: f64 = 0.3;
/// Default CPU threshold (cumulative: HBM and CPU together).
pub const DEFAULT_CPU: f64 = 0.5;

/// The tier names, fastest first.
pub const TIERS: [&str; 3] = ["hbm", "cpu", "ssd"];

/// libtorch errors as this module's error strings.
pub(crate) trait OrString<T> {
    fn ts(self) -> Result<T, String>;
}

impl<T> OrString<T> for Result<T, TchError> {
    fn ts(self) -> Result<T, String> {
        self.map_err(|e| torch_error(&e))
    }
}

/// How many of `n` ranked items go to HBM, CPU and SSD. The thresholds are
/// cumulative fractions, as in the seed's code (`lib/tiering.py`): rank
/// `i < floor(n * hbm)` is HBM, `i < floor(n * cpu)` is CPU, the rest SSD,
/// so 0.3/0.5 puts 30 % in HBM, 20 % in CPU and 50 % on SSD (the seed's
/// docs read 0.5 as the CPU share; we follow its code).
pub fn tier_counts(n: usize, hbm: f64, cpu: f64) -> Result<[usize; 3], String> {
    if !hbm.is_finite() || !cpu.is_finite() || !(0.0..=1.0).contains(&hbm) || !(0.0..=1.0).contains(&cpu) {
        return Err(format!("tier thresholds must be fractions in [0, 1], got hbm {hbm} and cpu {cpu}"));
    }
    if cpu < hbm {
        return Err(format!(
            "the cpu threshold ({cpu}) is below the hbm threshold ({hbm}); it is cumulative (the fraction in \
             HBM or CPU), so it must be >= hbm (hbm 0.3, cpu 0.5: 30 % HBM, 20 % CPU, 50 % SSD)"
        ));
    }
    // Python's int(n * t): truncation of the product as computed in f64.
    let h = (n as f64 * hbm).floor() as usize;
    let c = ((n as f64 * cpu).floor() as usize).max(h);
    Ok([h, c - h, n - c])
}

/// The tier of each item, in item order, when items are ranked by `scores`
/// (largest first; ties keep item order) and split by [`tier_counts`].
pub fn tiers_by_score(scores: &[f64], hbm: f64, cpu: f64) -> Result<Vec<&'static str>, String> {
    if let Some(i) = scores.iter().position(|s| s.is_nan()) {
        return Err(format!("score {i} is NaN; tiers need comparable scores"));
    }
    let [h, c, _] = tier_counts(scores.len(), hbm, cpu)?;
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut out = vec![TIERS[2]; scores.len()];
    for (rank, &i) in order.iter().enumerate() {
        out[i] = if rank < h {
            TIERS[0]
        } else if rank < h + c {
            TIERS[1]
        } else {
            TIERS[2]
        };
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
