//! Named parameters and buffers of a model, stored in one flat buffer per
//! dtype so an optimizer step is a handful of whole-buffer kernels.
//!
//! Models create parameters on the CPU through [`ParamStore::param`] (so a
//! seed gives the same initial weights on every device), then
//! [`ParamStore::finalize`] moves everything to the target device: each
//! parameter becomes a view into a flat data buffer and its gradient a view
//! into a flat gradient buffer (autograd accumulates into it in place).
//! Within a buffer, parameters that take weight decay come first, so each
//! decay group is one contiguous range.
use anyhow::{anyhow, bail, Result};
use tch::{Device, Kind, Tensor};

use crate::tensor::torch_error;

/// What a parameter is, for weight decay and pruning decisions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Linear or convolution weight (prunable).
    Weight,
    /// Token or position embedding (not pruned unless asked).
    Embedding,
    Bias,
    /// LayerNorm / BatchNorm gain or shift.
    Norm,
    /// A learned gate, mixing logit or scale (attention direction, SBA
    /// alpha, KVSplice scale): never decayed, never pruned.
    Gate,
}

impl Role {
    /// Decoupled weight decay applies to tensors of 2+ dimensions only
    /// (matrices, kernels, embeddings), never to biases and norm gains.
    pub fn decays(self) -> bool {
        matches!(self, Role::Weight | Role::Embedding)
    }
}

/// How to draw a parameter's initial values.
#[derive(Clone, Copy, Debug)]
pub enum Init {
    Zeros,
    Ones,
    Normal {
        std: f64,
    },
    Uniform {
        bound: f64,
    },
    /// N(0, sqrt(2 / fan_out)), for ReLU convolutions (ResNet).
    KaimingNormalFanOut,
}

pub struct Param {
    pub name: String,
    pub tensor: Tensor,
    pub role: Role,
}

/// One flat buffer: a dtype's parameters and gradients.
pub struct FlatGroup {
    pub kind: Kind,
    pub data: Tensor,
    pub grad: Tensor,
    /// (parameter index, offset, numel), in buffer order.
    pub members: Vec<(usize, i64, i64)>,
    /// Elements [0, decay_len) take weight decay.
    pub decay_len: i64,
    /// Elements [0, weight_len) are linear/conv weights (what pruning targets);
    /// embeddings follow them inside the decay range.
    pub weight_len: i64,
}

impl FlatGroup {
    pub fn numel(&self) -> i64 {
        self.data.numel() as i64
    }

    /// The decaying and the non-decaying parts of a flat buffer.
    pub fn split(&self, t: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = self.numel();
        let d = t.f_narrow(0, 0, self.decay_len).map_err(te)?;
        let r = t.f_narrow(0, self.decay_len, n - self.decay_len).map_err(te)?;
        Ok((d, r))
    }
}

pub struct ParamStore {
    params: Vec<Param>,
    buffers: Vec<(String, Tensor)>,
    device: Device,
    groups: Vec<FlatGroup>,
    /// Memory for parameters, taken when `param` first runs (what is free
    /// then plus what earlier parameters hold): a model that does not fit is
    /// refused before the kernel's OOM killer ends the process.
    budget: Option<u64>,
    /// Bytes of parameters made so far.
    bytes: u64,
}

fn te(e: tch::TchError) -> anyhow::Error {
    anyhow!(torch_error(&e))
}

impl Default for ParamStore {
    fn default() -> Self {
        Self::new()
    }
}

/// Bytes of memory the process may still use: `KNLP_MEMORY_LIMIT` (bytes,
/// or with a K, M or G suffix) when set, else the kernel's `MemAvailable`.
pub fn available_memory() -> Option<u64> {
    if let Ok(v) = std::env::var("KNLP_MEMORY_LIMIT") {
        let v = v.trim();
        let (num, mult) = match v.chars().last().map(|c| c.to_ascii_uppercase()) {
            Some('K') => (&v[..v.len() - 1], 1u64 << 10),
            Some('M') => (&v[..v.len() - 1], 1 << 20),
            Some('G') => (&v[..v.len() - 1], 1 << 30),
            _ => (v, 1),
        };
        if let Ok(n) = num.trim().parse::<u64>() {
            return Some(n.saturating_mul(mult));
        }
    }
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// `1.50 GB (1610612736 bytes)`.
pub fn show_bytes(b: u64) -> String {
    format!("{:.2} GB ({b} bytes)", b as f64 / 1e9)
}

impl ParamStore {
    pub fn new() -> Self {
        ParamStore {
            params: Vec::new(),
            buffers: Vec::new(),
            device: Device::Cpu,
            groups: Vec::new(),
            budget: None,
            bytes: 0,
        }
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Create a float32 parameter on the CPU. Names must be unique.
    pub fn param(&mut self, name: &str, shape: &[i64], init: Init, role: Role) -> Result<Tensor> {
        let numel = shape.iter().try_fold(1u64, |a, &d| u64::try_from(d).ok().and_then(|d| a.checked_mul(d)));
        let need = numel.and_then(|n| n.checked_mul(4)).unwrap_or(u64::MAX);
        // What is free now plus what earlier parameters (made here or
        // handed in) already hold.
        if self.budget.is_none() {
            self.budget = available_memory().map(|a| a.saturating_add(self.bytes));
        }
        if let Some(avail) = self.budget {
            let total = self.bytes.saturating_add(need);
            if total > avail {
                bail!(
                    "the model does not fit in memory: its parameters need more than {} (parameter '{name}', shape {shape:?}), \
                     and {} are available (KNLP_MEMORY_LIMIT sets the limit)",
                    show_bytes(total),
                    show_bytes(avail)
                );
            }
        }
        let t = tch::no_grad(|| init_tensor(shape, init))?;
        self.param_value(name, t, role)
    }

    /// Register a parameter whose initial value the model computed itself
    /// (a float32 CPU tensor), e.g. a weight tied to another's transpose at init.
    pub fn param_value(&mut self, name: &str, value: Tensor, role: Role) -> Result<Tensor> {
        if !self.groups.is_empty() {
            bail!("parameter '{name}' added after the store was finalized");
        }
        if self.params.iter().any(|p| p.name == name) {
            bail!("duplicate parameter name '{name}'");
        }
        let t = value.f_detach().and_then(|t| t.f_contiguous()).map_err(te)?;
        let t = t.f_set_requires_grad(true).map_err(te)?;
        self.bytes = self.bytes.saturating_add((t.numel() * t.kind().elt_size_in_bytes()) as u64);
        self.params.push(Param { name: name.to_string(), tensor: t.shallow_clone(), role });
        Ok(t)
    }

    /// A non-trained tensor that is saved with the model (BatchNorm statistics).
    pub fn buffer(&mut self, name: &str, value: Tensor) -> Result<Tensor> {
        if self.buffers.iter().any(|(n, _)| n == name) {
            bail!("duplicate buffer name '{name}'");
        }
        self.buffers.push((name.to_string(), value.shallow_clone()));
        Ok(value)
    }

    /// Move to `device` and lay parameters out in flat buffers. Every alias
    /// a model holds sees the move (storage is swapped in place).
    pub fn finalize(&mut self, device: Device) -> Result<()> {
        if !self.groups.is_empty() {
            bail!("the parameter store is already finalized");
        }
        // The flat weights and gradients come on top of the parameters made.
        if device == Device::Cpu {
            if let Some(avail) = available_memory() {
                let need = self.bytes.saturating_mul(2);
                if need > avail {
                    bail!(
                        "the model does not fit in memory: its {} of parameters need {} more for the flat weights and \
                         gradients, and {} are available",
                        show_bytes(self.bytes),
                        show_bytes(need),
                        show_bytes(avail)
                    );
                }
            }
        }
        let mut kinds: Vec<Kind> = Vec::new();
        for p in &self.params {
            let k = p.tensor.f_kind().map_err(te)?;
            if !kinds.contains(&k) {
                kinds.push(k);
            }
        }
        for kind in kinds {
            let mut order: Vec<usize> =
                (0..self.params.len()).filter(|&i| self.params[i].tensor.kind() == kind).collect();
            // Weights, then embeddings (both decay), then the rest; stable, so
            // model order is kept within each part.
            order.sort_by_key(|&i| match self.params[i].role {
                Role::Weight => 0,
                Role::Embedding => 1,
                _ => 2,
            });
            let total: i64 = order.iter().map(|&i| self.params[i].tensor.numel() as i64).sum();
            let data = Tensor::f_zeros([total], (kind, device)).map_err(te)?;
            let grad = Tensor::f_zeros([total], (kind, device)).map_err(te)?;
            let mut members = Vec::with_capacity(order.len());
            let (mut off, mut decay_len, mut weight_len) = (0i64, 0i64, 0i64);
            for &i in &order {
                let p = &self.params[i];
                let n = p.tensor.numel() as i64;
                let shape = p.tensor.size();
                let mut view =
                    data.f_narrow(0, off, n).and_then(|v| v.f_view(shape.as_slice())).map_err(te)?;
                tch::no_grad(|| view.f_copy_(&p.tensor)).map_err(te)?;
                crate::shim::set_data(&p.tensor, &view).map_err(|e| anyhow!("{}: {e}", p.name))?;
                let gview = grad.f_narrow(0, off, n).and_then(|v| v.f_view(shape.as_slice())).map_err(te)?;
                crate::shim::set_grad(&p.tensor, &gview).map_err(|e| anyhow!("{}: {e}", p.name))?;
                members.push((i, off, n));
                if p.role.decays() {
                    decay_len = off + n;
                }
                if p.role == Role::Weight {
                    weight_len = off + n;
                }
                off += n;
            }
            self.groups.push(FlatGroup { kind, data, grad, members, decay_len, weight_len });
        }
        for (name, b) in &self.buffers {
            let moved = b.f_to_device(device).map_err(te)?;
            crate::shim::set_data(b, &moved).map_err(|e| anyhow!("{name}: {e}"))?;
        }
        self.device = device;
        Ok(())
    }

    pub fn is_finalized(&self) -> bool {
        !self.groups.is_empty() || self.params.is_empty()
    }

    pub fn params(&self) -> &[Param] {
        &self.params
    }

    pub fn buffers(&self) -> &[(String, Tensor)] {
        &self.buffers
    }

    pub fn groups(&self) -> &[FlatGroup] {
        &self.groups
    }

    pub fn get(&self, name: &str) -> Option<&Param> {
        self.params.iter().find(|p| p.name == name)
    }

    /// Number of trainable scalars.
    pub fn numel(&self) -> i64 {
        self.params.iter().map(|p| p.tensor.numel() as i64).sum()
    }

    /// Zero every gradient in place (one kernel per flat buffer).
    pub fn zero_grad(&self) -> Result<()> {
        for g in &self.groups {
            let mut gr = g.grad.shallow_clone();
            let _ = gr.f_zero_().map_err(te)?;
        }
        Ok(())
    }

    /// Parameters then buffers, by name, for checkpoints.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.tensor.shallow_clone()))
            .chain(self.buffers.iter().map(|(n, t)| (n.clone(), t.shallow_clone())))
            .collect()
    }

    /// Copy values from named tensors into the model. Strict: a missing,
    /// unexpected or mis-shaped tensor is an error that names it.
    pub fn load_named(&self, tensors: &[(String, Tensor)], source: &str) -> Result<()> {
        let expected: Vec<(String, Tensor)> = self.named_tensors();
        for (name, _) in tensors {
            if !expected.iter().any(|(n, _)| n == name) {
                bail!("{source}: unexpected tensor '{name}' (not part of this model)");
            }
        }
        for (name, dst) in &expected {
            let Some((_, src)) = tensors.iter().find(|(n, _)| n == name) else {
                bail!("{source}: missing tensor '{name}'");
            };
            if src.size() != dst.size() {
                bail!(
                    "{source}: tensor '{name}' has shape {:?}, the model expects {:?}",
                    src.size(),
                    dst.size()
                );
            }
            let mut dst = dst.shallow_clone();
            tch::no_grad(|| dst.f_copy_(src))
                .map_err(|e| anyhow!("{source}: tensor '{name}': {}", torch_error(&e)))?;
        }
        Ok(())
    }
}

fn init_tensor(shape: &[i64], init: Init) -> Result<Tensor> {
    let opts = (Kind::Float, Device::Cpu);
    let t = match init {
        Init::Zeros => Tensor::f_zeros(shape, opts),
        Init::Ones => Tensor::f_ones(shape, opts),
        Init::Normal { std } => Tensor::f_randn(shape, opts).and_then(|t| t.f_mul_scalar(std)),
        Init::Uniform { bound } => Tensor::f_rand(shape, opts)
            .and_then(|t| t.f_mul_scalar(2.0 * bound))
            .and_then(|t| t.f_sub_scalar(bound)),
        Init::KaimingNormalFanOut => {
            let fan_out = shape.first().copied().unwrap_or(1) * shape.iter().skip(2).product::<i64>();
            let std = (2.0 / fan_out.max(1) as f64).sqrt();
            Tensor::f_randn(shape, opts).and_then(|t| t.f_mul_scalar(std))
        }
    };
    t.map_err(te)
}

/// PyTorch's default bound for Linear/Conv weights and biases:
/// U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform with a = sqrt(5)).
pub fn default_bound(fan_in: i64) -> f64 {
    1.0 / (fan_in.max(1) as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_buffers_hold_params_and_grads() {
        tch::manual_seed(0);
        let mut s = ParamStore::new();
        let mut w = s.param("w", &[3, 2], Init::Normal { std: 1.0 }, Role::Weight).unwrap();
        let b = s.param("b", &[3], Init::Zeros, Role::Bias).unwrap();
        let e = s.param("e", &[4, 2], Init::Ones, Role::Embedding).unwrap();
        let before = w.copy();
        s.finalize(Device::Cpu).unwrap();
        let g = &s.groups()[0];
        assert_eq!(g.numel(), 6 + 3 + 8);
        assert_eq!(g.decay_len, 14, "weight and embedding first, bias last");
        assert_eq!(g.weight_len, 6);
        assert_eq!(g.members.iter().map(|m| m.0).collect::<Vec<_>>(), vec![0, 2, 1]);
        assert!(w.equal(&before), "values survive the move");
        // The model's aliases now live in the flat buffer.
        let _ = tch::no_grad(|| w.f_fill_(2.0).unwrap());
        assert_eq!(g.data.narrow(0, 0, 6).sum(Kind::Float).double_value(&[]), 12.0);
        // Backward accumulates into the flat gradient buffer.
        let x = Tensor::ones([5, 2], (Kind::Float, Device::Cpu));
        let loss = (x.matmul(&w.tr()) + &b).sum(Kind::Float) + e.sum(Kind::Float);
        loss.backward();
        assert_eq!(g.grad.sum(Kind::Float).double_value(&[]), 5.0 * 6.0 + 15.0 + 8.0);
        let loss = w.sum(Kind::Float);
        loss.backward();
        assert_eq!(g.grad.narrow(0, 0, 6).sum(Kind::Float).double_value(&[]), 30.0 + 6.0, "accumulates");
        s.zero_grad().unwrap();
        assert_eq!(g.grad.abs().sum(Kind::Float).double_value(&[]), 0.0);
        assert!(w.grad().equal(&g.grad.narrow(0, 0, 6).view([3, 2])));
    }

    #[test]
    fn strict_loading_names_the_tensor() {
        let mut s = ParamStore::new();
        let _ = s.param("a", &[2], Init::Zeros, Role::Bias).unwrap();
        s.finalize(Device::Cpu).unwrap();
        let ok = vec![("a".to_string(), Tensor::ones([2], (Kind::Float, Device::Cpu)))];
        s.load_named(&ok, "ck").unwrap();
        assert_eq!(s.get("a").unwrap().tensor.sum(Kind::Float).double_value(&[]), 2.0);
        let bad = vec![("a".to_string(), Tensor::ones([3], (Kind::Float, Device::Cpu)))];
        assert!(s.load_named(&bad, "ck").unwrap_err().to_string().contains("'a' has shape [3]"));
        let extra = vec![
            ("a".to_string(), Tensor::ones([2], (Kind::Float, Device::Cpu))),
            ("zz".to_string(), Tensor::ones([1], (Kind::Float, Device::Cpu))),
        ];
        assert!(s.load_named(&extra, "ck").unwrap_err().to_string().contains("unexpected tensor 'zz'"));
        assert!(s.load_named(&[], "ck").unwrap_err().to_string().contains("missing tensor 'a'"));
    }
}
