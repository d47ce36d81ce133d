//! Dynamic loss scaling for float16 autocast, as `torch.amp.GradScaler`:
//! the loss is multiplied by `scale` before backward so that small float16
//! gradients do not flush to zero; before the optimizer step the gradients
//! are divided by it again (so clipping sees true norms), and a step whose
//! gradients hold an inf or NaN is skipped. The scale halves after every
//! skipped step and doubles after `growth_interval` clean steps in a row.
//!
//! Scales are powers of two, so scaling and unscaling are exact in float32:
//! with no overflow, training is bit-identical to training without a scaler.
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::params::ParamStore;

/// The scaler's state, saved in checkpoints with the optimizer's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GradScaler {
    pub scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: i64,
    /// Clean steps since the scale last changed.
    pub growth_tracker: i64,
    /// Steps skipped for non-finite gradients, over the run.
    pub skipped: i64,
}

impl Default for GradScaler {
    /// PyTorch's defaults.
    fn default() -> Self {
        GradScaler {
            scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            growth_tracker: 0,
            skipped: 0,
        }
    }
}

impl GradScaler {
    /// `loss` times the current scale.
    pub fn scale_loss(&self, loss: &Tensor) -> Result<Tensor, tch::TchError> {
        loss.f_mul_scalar(self.scale)
    }

    /// Divide every gradient by the scale; true when all of them are finite
    /// (one host synchronisation for all buffers: the decision to step needs it).
    pub fn unscale(&self, store: &ParamStore) -> Result<bool, tch::TchError> {
        let inv = 1.0 / self.scale;
        let mut bad: Option<Tensor> = None;
        for g in store.groups() {
            let mut gr = g.grad.shallow_clone();
            let _ = gr.f_mul_scalar_(inv)?;
            let here = gr.f_isfinite()?.f_logical_not()?.f_any()?;
            bad = Some(match bad {
                None => here,
                Some(b) => b.f_logical_or(&here)?,
            });
        }
        match bad {
            Some(b) => Ok(b.f_to_kind(Kind::Int64)?.f_int64_value(&[])? == 0),
            None => Ok(true),
        }
    }

    /// Adjust the scale after a step (`stepped` false: it was skipped).
    pub fn update(&mut self, stepped: bool) {
        if stepped {
            self.growth_tracker += 1;
            if self.growth_tracker >= self.growth_interval {
                self.scale *= self.growth_factor;
                self.growth_tracker = 0;
            }
        } else {
            self.scale *= self.backoff_factor;
            self.growth_tracker = 0;
            self.skipped += 1;
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        let ok = self.scale.is_finite()
            && self.scale > 0.0
            && self.growth_factor > 1.0
            && self.backoff_factor > 0.0
            && self.backoff_factor < 1.0
            && self.growth_interval > 0;
        anyhow::ensure!(ok, "loss scaler: scale > 0, growth_factor > 1, 0 < backoff_factor < 1 and growth_interval > 0 needed, got {self:?}");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_after_clean_steps_and_backs_off_on_overflow() {
        let mut s = GradScaler { growth_interval: 3, ..Default::default() };
        for _ in 0..3 {
            s.update(true);
        }
        assert_eq!((s.scale, s.growth_tracker), (131072.0, 0));
        s.update(true);
        s.update(false);
        assert_eq!((s.scale, s.growth_tracker, s.skipped), (65536.0, 0, 1));
        assert!(s.validate().is_ok());
        assert!(GradScaler { backoff_factor: 1.5, ..Default::default() }.validate().is_err());
    }
}
