//! SPAM (spike-aware Adam with momentum reset), applied to the gradients
//! and moments before the Adam update.
//!
//! Per optimizer step, counted once (`knlp-spec.md` 3.3 counts twice; see
//! `DECISIONS.md`):
//! 1. Spike-aware clipping: where the second moment exists, gradients are
//!    clamped element-wise to ±sqrt(theta * (v + 1e-12)).
//! 2. The global gradient norm (after 1) joins a history of the last
//!    `history` finite norms. With at least 10 earlier norms, z = (norm - mean)
//!    / std (population std of the earlier norms); z > `spike_threshold`
//!    halves the first moment and scales the second by 0.9 (soft reset).
//! 3. Every `interval` steps both moments are zeroed and a warm-up of
//!    `warmup` steps begins, scaling the scheduled learning rate of each of
//!    those steps by max(1e-3, (1 - cos(pi t)) / 2), t = elapsed / warmup.
use std::collections::VecDeque;

use anyhow::{anyhow, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::params::FlatGroup;
use crate::tensor::torch_error;

fn te(e: tch::TchError) -> anyhow::Error {
    anyhow!(torch_error(&e))
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SpamConfig {
    pub theta: f64,
    /// Steps between moment resets (0 = never).
    pub interval: i64,
    /// Learning-rate warm-up steps after each reset.
    pub warmup: i64,
    pub enable_clip: bool,
    pub spike_threshold: f64,
    pub history: usize,
}

impl Default for SpamConfig {
    fn default() -> Self {
        SpamConfig {
            theta: 50.0,
            interval: 1000,
            warmup: 1000,
            enable_clip: true,
            spike_threshold: 2.0,
            history: 100,
        }
    }
}

/// SPAM's state between steps (saved in checkpoints).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SpamState {
    pub cfg: SpamConfig,
    pub norms: VecDeque<f64>,
    pub warmup_until: i64,
    pub spikes: i64,
    pub resets: i64,
    /// Steps at which spikes were detected (first 100).
    pub spike_steps: Vec<i64>,
}

pub struct SpamOutcome {
    pub lr_scale: f64,
    pub spike: bool,
    pub reset: bool,
    pub grad_norm: Tensor,
}

impl SpamState {
    pub fn new(cfg: SpamConfig) -> Self {
        SpamState {
            cfg,
            norms: VecDeque::new(),
            warmup_until: 0,
            spikes: 0,
            resets: 0,
            spike_steps: Vec::new(),
        }
    }

    /// Run SPAM for optimizer step `step` (1-based). `moments[i]` are the flat
    /// (exp_avg, exp_avg_sq) of buffer `i`, from the previous step.
    pub fn before_step(
        &mut self,
        groups: &[FlatGroup],
        moments: &mut [(&mut Tensor, &mut Tensor)],
        step: i64,
    ) -> Result<SpamOutcome> {
        let c = self.cfg.clone();
        tch::no_grad(|| -> Result<SpamOutcome> {
            // 1. element-wise clipping once a second moment exists
            if c.enable_clip && step > 1 {
                for (g, (_, v)) in groups.iter().zip(moments.iter()) {
                    let thr =
                        v.f_add_scalar(1e-12).and_then(|x| x.f_mul_scalar(c.theta)).and_then(|x| x.f_sqrt());
                    let thr = thr.map_err(te)?;
                    let neg = thr.f_neg().map_err(te)?;
                    let mut gr = g.grad.shallow_clone();
                    let _ = gr.f_clamp_tensor_(Some(&neg), Some(&thr)).map_err(te)?;
                }
            }
            // 2. spike detection on the global norm
            let mut sq = 0.0f64;
            let mut norm_t: Option<Tensor> = None;
            for g in groups {
                let s = g
                    .grad
                    .f_to_kind(Kind::Float)
                    .and_then(|x| x.f_square())
                    .and_then(|x| x.f_sum(Kind::Float));
                let s = s.map_err(te)?;
                sq += s.f_double_value(&[]).map_err(te)?;
                norm_t = Some(match norm_t {
                    None => s,
                    Some(a) => a.f_add(&s.f_to_device(a.device()).map_err(te)?).map_err(te)?,
                });
            }
            let norm = sq.sqrt();
            let grad_norm = match norm_t {
                Some(t) => t.f_sqrt().map_err(te)?,
                None => Tensor::from(0.0f32),
            };
            let mut spike = false;
            if self.norms.len() >= 10 && norm.is_finite() {
                let n = self.norms.len() as f64;
                let mean = self.norms.iter().sum::<f64>() / n;
                let std = (self.norms.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
                if std > 0.0 && (norm - mean) / std > c.spike_threshold {
                    spike = true;
                    self.spikes += 1;
                    if self.spike_steps.len() < 100 {
                        self.spike_steps.push(step);
                    }
                    for (m, v) in moments.iter_mut() {
                        let _ = m.f_mul_scalar_(0.5).map_err(te)?;
                        let _ = v.f_mul_scalar_(0.9).map_err(te)?;
                    }
                }
            }
            if norm.is_finite() {
                self.norms.push_back(norm);
                while self.norms.len() > c.history.max(1) {
                    self.norms.pop_front();
                }
            }
            // 3. periodic reset and learning-rate warm-up
            let mut reset = false;
            if c.interval > 0 && step % c.interval == 0 {
                reset = true;
                self.resets += 1;
                for (m, v) in moments.iter_mut() {
                    let _ = m.f_zero_().map_err(te)?;
                    let _ = v.f_zero_().map_err(te)?;
                }
                self.warmup_until = step + c.warmup;
            }
            let lr_scale = warmup_scale(step, self.warmup_until, c.warmup);
            Ok(SpamOutcome { lr_scale, spike, reset, grad_norm })
        })
    }
}

/// The learning-rate factor of `step` during a post-reset warm-up that ends
/// at `until`: max(1e-3, (1 - cos(pi t)) / 2), t = (warmup - remaining) / warmup.
pub fn warmup_scale(step: i64, until: i64, warmup: i64) -> f64 {
    if warmup <= 0 || step >= until {
        return 1.0;
    }
    let remaining = (until - step) as f64;
    let t = (warmup as f64 - remaining) / warmup as f64;
    (0.5 * (1.0 - (std::f64::consts::PI * t).cos())).max(1e-3)
}
