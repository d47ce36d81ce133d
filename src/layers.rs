//! Building blocks over [`ParamStore`]: each layer registers its parameters
//! under a dotted name and runs with fallible libtorch calls.
use anyhow::Result;
use tch::{Kind, TchError, Tensor};

use crate::params::{default_bound, Init, ParamStore, Role};

/// A dotted name prefix (`transformer.h.0.attn`).
#[derive(Clone, Debug, Default)]
pub struct Path(String);

impl Path {
    pub fn root(name: &str) -> Self {
        Path(name.to_string())
    }

    pub fn sub(&self, part: impl std::fmt::Display) -> Self {
        if self.0.is_empty() {
            Path(part.to_string())
        } else {
            Path(format!("{}.{part}", self.0))
        }
    }

    pub fn name(&self, leaf: &str) -> String {
        self.sub(leaf).0
    }
}

pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// PyTorch's default initialisation unless `init` is given for the weight.
    pub fn new(
        s: &mut ParamStore,
        p: &Path,
        din: i64,
        dout: i64,
        bias: bool,
        init: Option<Init>,
    ) -> Result<Self> {
        let bound = default_bound(din);
        let w_init = init.unwrap_or(Init::Uniform { bound });
        let weight = s.param(&p.name("weight"), &[dout, din], w_init, Role::Weight)?;
        let b_init = if init.is_some() { Init::Zeros } else { Init::Uniform { bound } };
        let bias = if bias { Some(s.param(&p.name("bias"), &[dout], b_init, Role::Bias)?) } else { None };
        Ok(Linear { weight, bias })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        x.f_linear(&self.weight, self.bias.as_ref())
    }
}

pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: i64,
    pub padding: i64,
}

impl Conv2d {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        s: &mut ParamStore,
        p: &Path,
        cin: i64,
        cout: i64,
        k: i64,
        stride: i64,
        padding: i64,
        bias: bool,
        init: Option<Init>,
    ) -> Result<Self> {
        let fan_in = cin * k * k;
        let bound = default_bound(fan_in);
        let weight = s.param(
            &p.name("weight"),
            &[cout, cin, k, k],
            init.unwrap_or(Init::Uniform { bound }),
            Role::Weight,
        )?;
        let bias = if bias {
            Some(s.param(&p.name("bias"), &[cout], Init::Uniform { bound }, Role::Bias)?)
        } else {
            None
        };
        Ok(Conv2d { weight, bias, stride, padding })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        x.f_conv2d(&self.weight, self.bias.as_ref(), [self.stride; 2], [self.padding; 2], [1, 1], 1)
    }
}

pub struct BatchNorm2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub num_batches_tracked: Tensor,
}

impl BatchNorm2d {
    pub const MOMENTUM: f64 = 0.1;
    pub const EPS: f64 = 1e-5;

    pub fn new(s: &mut ParamStore, p: &Path, c: i64) -> Result<Self> {
        let cpu = (Kind::Float, tch::Device::Cpu);
        Ok(BatchNorm2d {
            weight: s.param(&p.name("weight"), &[c], Init::Ones, Role::Norm)?,
            bias: s.param(&p.name("bias"), &[c], Init::Zeros, Role::Norm)?,
            running_mean: s.buffer(&p.name("running_mean"), Tensor::zeros([c], cpu))?,
            running_var: s.buffer(&p.name("running_var"), Tensor::ones([c], cpu))?,
            num_batches_tracked: s
                .buffer(&p.name("num_batches_tracked"), Tensor::zeros([], (Kind::Int64, tch::Device::Cpu)))?,
        })
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor, TchError> {
        if train {
            let mut n = self.num_batches_tracked.shallow_clone();
            let _ = tch::no_grad(|| n.f_add_scalar_(1))?;
        }
        Tensor::f_batch_norm(
            x,
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            train,
            Self::MOMENTUM,
            Self::EPS,
            true,
        )
    }
}

pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub dim: i64,
    pub eps: f64,
}

impl LayerNorm {
    pub const EPS: f64 = 1e-5;

    pub fn new(s: &mut ParamStore, p: &Path, dim: i64, bias: bool) -> Result<Self> {
        let weight = s.param(&p.name("weight"), &[dim], Init::Ones, Role::Norm)?;
        let bias = if bias { Some(s.param(&p.name("bias"), &[dim], Init::Zeros, Role::Norm)?) } else { None };
        Ok(LayerNorm { weight, bias, dim, eps: Self::EPS })
    }

    pub fn with_eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        x.f_layer_norm([self.dim], Some(&self.weight), self.bias.as_ref(), self.eps, true)
    }

    /// The same computation step by step, as TransformerLens writes it, so
    /// that its intermediate `scale` [.., 1] can be seen and replaced:
    /// `scale = sqrt(mean((x - mean x)^2) + eps)`, `y = (x - mean x) / scale * w + b`.
    pub fn forward_parts(
        &self,
        x: &Tensor,
        on_scale: impl FnOnce(Tensor) -> Result<Tensor, TchError>,
    ) -> Result<Tensor, TchError> {
        let k = x.f_kind()?;
        let xc = x.f_sub(&x.f_mean_dim(-1, true, k)?)?;
        let scale = on_scale(xc.f_square()?.f_mean_dim(-1, true, k)?.f_add_scalar(self.eps)?.f_sqrt()?)?;
        let y = xc.f_div(&scale)?.f_mul(&self.weight)?;
        match &self.bias {
            Some(b) => y.f_add(b),
            None => Ok(y),
        }
    }
}

pub struct Embedding {
    pub weight: Tensor,
}

impl Embedding {
    pub fn new(s: &mut ParamStore, p: &Path, n: i64, dim: i64, std: f64) -> Result<Self> {
        Ok(Embedding {
            weight: s.param(&p.name("weight"), &[n, dim], Init::Normal { std }, Role::Embedding)?,
        })
    }

    pub fn forward(&self, ids: &Tensor) -> Result<Tensor, TchError> {
        Tensor::f_embedding(&self.weight, ids, -1, false, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_shapes() {
        let mut s = ParamStore::new();
        let p = Path::root("net").sub("fc").sub(0);
        let l = Linear::new(&mut s, &p, 4, 3, true, None).unwrap();
        assert_eq!(s.params()[0].name, "net.fc.0.weight");
        assert_eq!(s.params()[1].name, "net.fc.0.bias");
        s.finalize(tch::Device::Cpu).unwrap();
        let y = l.forward(&Tensor::ones([2, 4], (Kind::Float, tch::Device::Cpu))).unwrap();
        assert_eq!(y.size(), vec![2, 3]);
        // Default init stays within PyTorch's bound 1/sqrt(fan_in).
        assert!(l.weight.abs().max().double_value(&[]) <= 0.5);
    }
}
