//! Models over [`ParamStore`]: LeNet-5, ResNet-18/50 and GPT-2.
//!
//! Every model registers its parameters with stable, documented names
//! (`docs/models.md`), creates them on the CPU (seeded initialisation is the
//! same on every device) and is moved to its device by
//! [`ParamStore::finalize`].
use anyhow::Result;
use tch::{Device, TchError, Tensor};

use crate::params::ParamStore;

pub mod gpt2;
pub mod gpt2_hf;
pub mod gpt2_metrics;
pub mod lenet5;
pub mod resnet;

/// What a model predicts, which decides its loss and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// Images [B, C, H, W] to class logits [B, classes].
    Classify { classes: i64 },
    /// Token ids [B, T] to next-token logits [B, T, vocab].
    LanguageModel { vocab: i64, block_size: i64 },
}

pub trait Model {
    /// Short architecture name (`lenet5`, `resnet18`, `resnet50`, `gpt2`).
    fn arch(&self) -> &'static str;
    fn task(&self) -> Task;
    /// Logits for a batch; `train` selects dropout and batch-norm behaviour.
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor, TchError>;
    /// [`Self::forward`] visiting hook points (`docs/mechint.md`); models
    /// without hook points refuse hooks.
    fn forward_hooked(
        &self,
        x: &Tensor,
        train: bool,
        hooks: Option<&dyn crate::hooks::Hooks>,
    ) -> Result<Tensor, TchError> {
        match hooks {
            None => self.forward(x, train),
            Some(_) => Err(TchError::Kind(format!("{} has no hook points (GPT-2 has)", self.arch()))),
        }
    }
    /// The mean training cross-entropy of `x` against `y` computed without
    /// materialising the logits ([`crate::loss`]), where the model can;
    /// `None`: the caller runs `forward` and [`cross_entropy`].
    fn train_loss(&self, x: &Tensor, y: &Tensor) -> Option<Result<Tensor, TchError>> {
        let _ = (x, y);
        None
    }
    /// Every hook point of the model, in forward order.
    fn hook_names(&self) -> Vec<String> {
        Vec::new()
    }
    fn store(&self) -> &ParamStore;
    fn store_mut(&mut self) -> &mut ParamStore;
    /// The configuration the model was built from, for run records.
    fn config(&self) -> serde_json::Value;
    /// Names of parameters tied to another name (GPT-2's `lm_head.weight`
    /// is `transformer.wte.weight`): (alias, owner).
    fn tied(&self) -> Vec<(String, String)> {
        Vec::new()
    }
    /// Auxiliary losses of the last training forward (RA balance, routing
    /// compute penalty), taken once; the training loop adds them to the loss.
    fn take_aux_loss(&self) -> Option<Tensor> {
        None
    }
    /// Called after each evaluation with its metrics and a sample of the
    /// evaluation inputs; returns extra metrics to log (attention analysis).
    fn on_eval(
        &mut self,
        _eval: &serde_json::Map<String, serde_json::Value>,
        _sample: Option<&Tensor>,
    ) -> Result<serde_json::Map<String, serde_json::Value>> {
        Ok(serde_json::Map::new())
    }
    /// The concrete model, for bindings that need one architecture's methods.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
}

/// Mean cross-entropy of logits against integer targets; language-model
/// logits [B, T, V] are flattened, targets of -1 are ignored.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor, TchError> {
    let v = *logits.size().last().unwrap_or(&1);
    let l = logits.f_reshape([-1, v])?;
    let t = targets.f_reshape([-1])?;
    l.f_cross_entropy_loss::<Tensor>(&t, None, tch::Reduction::Mean, -1, 0.0)
}

/// Move a freshly built model to `device` with flat parameter buffers.
pub fn finalize<M: Model + ?Sized>(m: &mut M, device: Device) -> Result<()> {
    m.store_mut().finalize(device)
}

/// Architecture names [`build`] accepts (`resnet` alone takes `depth`).
pub const ARCHS: &str = "lenet5, resnet18, resnet34, resnet50, resnet101, resnet152, gpt2";

/// Build a model from its architecture name and an option map (a run
/// record's `config`, or a configuration's model options). Unknown keys are
/// errors that list the valid fields; `resnet18`/`resnet50`/... fix the depth.
pub fn build(arch: &str, options: serde_json::Value) -> Result<Box<dyn Model>> {
    let opts = if options.is_null() { serde_json::json!({}) } else { options };
    let bad = |e: serde_json::Error| anyhow::anyhow!("{arch}: {e}");
    Ok(match arch {
        "lenet5" => Box::new(lenet5::LeNet5::new(serde_json::from_value(opts).map_err(bad)?)?),
        "gpt2" => Box::new(gpt2::Gpt2::new(serde_json::from_value(opts).map_err(bad)?)?),
        _ if arch.starts_with("resnet") => {
            let given_depth = opts.get("depth").is_some();
            let mut cfg: resnet::Config = serde_json::from_value(opts).map_err(bad)?;
            if let Ok(depth) = arch["resnet".len()..].parse::<i64>() {
                if given_depth && cfg.depth != depth {
                    anyhow::bail!("{arch}: depth {} contradicts the architecture name", cfg.depth);
                }
                cfg.depth = depth;
            } else if arch != "resnet" {
                anyhow::bail!("unknown model '{arch}' (valid: {ARCHS})");
            }
            Box::new(resnet::ResNet::new(cfg)?)
        }
        _ => anyhow::bail!("unknown model '{arch}' (valid: {ARCHS})"),
    })
}
