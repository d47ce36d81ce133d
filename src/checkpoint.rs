//! Checkpoints: one safetensors file holding the model, optimizer state,
//! pruning masks and RNG states, with the run state (step, data position,
//! configuration, metrics so far) as JSON in its metadata. One file, written
//! atomically, so a crash mid-write leaves the previous checkpoint intact and
//! tensors and state can never disagree. A `.json` copy of the state sits
//! beside it for people to read.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::optim::Optimizer;
use crate::params::ParamStore;

pub const FORMAT: u32 = 1;
const STATE_KEY: &str = "knlp_state";

/// Everything about a run that is not a tensor.
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
pub struct State {
    pub format: u32,
    pub arch: String,
    /// Optimizer steps completed.
    pub step: i64,
    pub epoch: i64,
    /// Learning rate, step counter and SPAM state of the optimizer.
    pub optimizer: serde_json::Value,
    /// Loader position and RNG state.
    pub data: serde_json::Value,
    /// Scalar state of step hooks (pruning schedule position, ...).
    pub hooks: serde_json::Value,
    pub config: serde_json::Value,
    /// Best metric so far and bookkeeping the loop needs to continue.
    pub progress: serde_json::Value,
}

/// Gather model, optimizer and extra tensors plus RNG states, and write
/// them with `state` to `path` atomically.
pub fn save(
    path: &Path,
    store: &ParamStore,
    opt: &Optimizer,
    extra: &[(String, Tensor)],
    state: &State,
) -> Result<()> {
    let mut named: Vec<(String, Tensor)> = Vec::new();
    for (n, t) in store.named_tensors() {
        named.push((format!("model.{n}"), t));
    }
    named.extend(opt.state_tensors());
    named.extend(extra.iter().map(|(n, t)| (n.clone(), t.shallow_clone())));
    named.push(("rng.cpu".into(), crate::shim::rng_state(None).map_err(|e| anyhow!(e))?));
    for d in 0..tch::Cuda::device_count() as usize {
        named.push((format!("rng.cuda.{d}"), crate::shim::rng_state(Some(d)).map_err(|e| anyhow!(e))?));
    }
    let refs: Vec<(String, &Tensor)> = named.iter().map(|(n, t)| (n.clone(), t)).collect();
    let json = serde_json::to_string(state)?;
    let mut meta = BTreeMap::new();
    meta.insert(STATE_KEY.to_string(), json.clone());
    crate::safetensors::save(path, &refs, &meta, crate::safetensors::Target::OWNED)
        .map_err(|e| anyhow!(e))?;
    let copy = path.with_extension("json");
    crate::runs::write_atomic(&copy, serde_json::to_string_pretty(state)?.as_bytes())?;
    Ok(())
}

/// A checkpoint read back from disk.
pub struct Loaded {
    pub path: PathBuf,
    pub state: State,
    pub tensors: Vec<(String, Tensor)>,
}

impl Loaded {
    /// Tensors under `prefix.`, with the prefix removed.
    pub fn with_prefix(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let p = format!("{prefix}.");
        self.tensors
            .iter()
            .filter_map(|(n, t)| n.strip_prefix(&p).map(|s| (s.to_string(), t.shallow_clone())))
            .collect()
    }

    /// Tensors whose name starts with `prefix` (names kept).
    pub fn starting(&self, prefix: &str) -> Vec<(String, Tensor)> {
        self.tensors
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// Copy the weights into `store`; refuses missing, unexpected or
    /// mis-shaped tensors, naming them.
    pub fn restore_model(&self, store: &ParamStore) -> Result<()> {
        store.load_named(&self.with_prefix("model"), &self.path.display().to_string())
    }

    pub fn restore_optimizer(&self, opt: &mut Optimizer) -> Result<()> {
        opt.load_state_tensors(&self.starting("optim."), &self.path.display().to_string())
    }

    /// Restore libtorch's generators (dropout, random init) as saved.
    pub fn restore_rng(&self) -> Result<()> {
        if let Some(t) = self.get("rng.cpu") {
            crate::shim::set_rng_state(None, t)
                .map_err(|e| anyhow!("{}: rng.cpu: {e}", self.path.display()))?;
        }
        for d in 0..tch::Cuda::device_count() as usize {
            if let Some(t) = self.get(&format!("rng.cuda.{d}")) {
                crate::shim::set_rng_state(Some(d), t)
                    .map_err(|e| anyhow!("{}: rng.cuda.{d}: {e}", self.path.display()))?;
            }
        }
        Ok(())
    }
}

/// Read and validate a checkpoint (tensors land on the CPU).
pub fn load(path: &Path) -> Result<Loaded> {
    let l = crate::safetensors::load(path).map_err(|e| anyhow!(e))?;
    let text = l
        .metadata
        .get(STATE_KEY)
        .ok_or_else(|| anyhow!("{}: not a knlp checkpoint (no '{STATE_KEY}' metadata)", path.display()))?;
    let state: State =
        serde_json::from_str(text).with_context(|| format!("{}: run state is not valid", path.display()))?;
    if state.format != FORMAT {
        bail!(
            "{}: checkpoint format {} is not supported (this knlp reads format {FORMAT})",
            path.display(),
            state.format
        );
    }
    Ok(Loaded { path: path.to_path_buf(), state, tensors: l.tensors })
}

/// Move a loaded tensor to `device` (helper for callers restoring state).
pub fn to_device(t: &Tensor, device: Device) -> Result<Tensor> {
    t.f_to_device(device).map_err(|e| anyhow!(crate::tensor::torch_error(&e)))
}
