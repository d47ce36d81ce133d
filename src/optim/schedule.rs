//! Learning-rate schedules, evaluated from the step (or epoch) number so a
//! resumed run continues on the same curve.
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Schedule {
    /// The base learning rate throughout.
    Constant,
    /// Linear warm-up from 0 over `warmup` steps, then cosine decay to
    /// `min_lr` at `total` steps, `min_lr` after (nanoGPT's schedule).
    WarmupCosine { warmup: i64, total: i64, min_lr: f64 },
    /// Cosine annealing per epoch to `min_lr` at `epochs`
    /// (torch's CosineAnnealingLR stepped once per epoch).
    CosineEpoch { epochs: i64, min_lr: f64 },
}

impl Schedule {
    pub fn validate(&self) -> Result<()> {
        match *self {
            Schedule::WarmupCosine { warmup, total, min_lr } => {
                if warmup < 0 || total <= 0 || min_lr < 0.0 {
                    bail!("warmup_cosine: warmup >= 0, total > 0 and min_lr >= 0 are required");
                }
            }
            Schedule::CosineEpoch { epochs, min_lr } => {
                if epochs <= 0 || min_lr < 0.0 {
                    bail!("cosine_epoch: epochs > 0 and min_lr >= 0 are required");
                }
            }
            Schedule::Constant => {}
        }
        Ok(())
    }

    /// Learning rate at optimizer step `step` (0-based) in epoch `epoch`.
    pub fn lr(&self, base: f64, step: i64, epoch: i64) -> f64 {
        match *self {
            Schedule::Constant => base,
            Schedule::WarmupCosine { warmup, total, min_lr } => {
                if step < warmup {
                    return base * step as f64 / warmup as f64;
                }
                if step > total {
                    return min_lr;
                }
                let span = (total - warmup).max(1) as f64;
                let ratio = (step - warmup) as f64 / span;
                min_lr + 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos()) * (base - min_lr)
            }
            Schedule::CosineEpoch { epochs, min_lr } => {
                let e = epoch.min(epochs) as f64;
                min_lr + (base - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * e / epochs as f64).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_cosine_matches_nanogpt() {
        let s = Schedule::WarmupCosine { warmup: 10, total: 110, min_lr: 0.1 };
        assert_eq!(s.lr(1.0, 0, 0), 0.0);
        assert!((s.lr(1.0, 5, 0) - 0.5).abs() < 1e-12);
        assert!((s.lr(1.0, 10, 0) - 1.0).abs() < 1e-12);
        assert!((s.lr(1.0, 60, 0) - 0.55).abs() < 1e-12);
        assert!((s.lr(1.0, 110, 0) - 0.1).abs() < 1e-12);
        assert_eq!(s.lr(1.0, 500, 0), 0.1);
    }

    #[test]
    fn cosine_epoch_matches_torch() {
        // torch: CosineAnnealingLR(T_max=4, eta_min=0) gives 1, .854, .5, .146, 0
        let s = Schedule::CosineEpoch { epochs: 4, min_lr: 0.0 };
        let v: Vec<f64> = (0..5).map(|e| s.lr(1.0, 0, e)).collect();
        let want = [1.0, 0.8535533905932737, 0.5, 0.14644660940672624, 0.0];
        for (a, b) in v.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{v:?}");
        }
    }
}
