//! ResNets: ResNet-18 with the CIFAR stem and ResNet-50 with the ImageNet
//! stem, as in the Python knlp (`resnet18/model.py`, `resnet50/model.py`);
//! depths 34, 101 and 152 come for free from the same code.
//!
//! ```text
//! stem    cifar:    Conv3×3(in→64, s1, p1, no bias) + BN + ReLU
//!         imagenet: Conv7×7(in→64, s2, p3, no bias) + BN + ReLU + MaxPool(3, s2, p1)
//! layer1..layer4    planes 64/128/256/512, strides 1/2/2/2
//!         basic (18, 34):       conv3×3(stride)–BN–ReLU–conv3×3–BN
//!         bottleneck (50+):     conv1×1–BN–ReLU–conv3×3(stride)–BN–ReLU–conv1×1(×4)–BN
//!         + shortcut (identity, or Conv1×1(stride, no bias)+BN when the stride
//!           or the channel count changes), then ReLU
//! head    AdaptiveAvgPool(1) → Linear(512·expansion → classes)
//! ```
//!
//! Init: convolutions Kaiming-normal (fan_out, ReLU gain), BN γ = 1, β = 0,
//! Linear PyTorch default. Names follow torchvision (`layer1.0.conv1`,
//! `layer1.0.downsample.0`, `fc`), which is also the Python ResNet-18's
//! layout (the Python ResNet-50 calls the shortcut `shortcut.0/1`).
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::{TchError, Tensor};

use super::{Model, Task};
use crate::layers::{BatchNorm2d, Conv2d, Linear, Path};
use crate::params::{Init, ParamStore};
use crate::tensor::SizeChecked;

/// The first layers, before the residual stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stem {
    /// Conv3×3 stride 1, no max-pool (32×32 images).
    Cifar,
    /// Conv7×7 stride 2 and a 3×3 stride-2 max-pool (224×224 images).
    Imagenet,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// 18 or 34 (basic blocks), 50, 101 or 152 (bottleneck blocks).
    pub depth: i64,
    pub classes: i64,
    pub in_channels: i64,
    /// Defaults to `cifar` for depths 18 and 34 and `imagenet` for deeper
    /// networks, as in the Python knlp.
    pub stem: Option<Stem>,
}

impl Default for Config {
    fn default() -> Self {
        Config { depth: 18, classes: 10, in_channels: 3, stem: None }
    }
}

const PLANES: [i64; 4] = [64, 128, 256, 512];
const STRIDES: [i64; 4] = [1, 2, 2, 2];

/// Blocks per stage and whether they are bottlenecks.
fn layout(depth: i64) -> Option<([i64; 4], bool)> {
    Some(match depth {
        18 => ([2, 2, 2, 2], false),
        34 => ([3, 4, 6, 3], false),
        50 => ([3, 4, 6, 3], true),
        101 => ([3, 4, 23, 3], true),
        152 => ([3, 8, 36, 3], true),
        _ => return None,
    })
}

impl Config {
    pub fn resnet18(classes: i64) -> Self {
        Config { depth: 18, classes, ..Config::default() }
    }

    pub fn resnet50(classes: i64) -> Self {
        Config { depth: 50, classes, ..Config::default() }
    }

    /// The stem in effect (explicit, or the depth's default).
    pub fn stem(&self) -> Stem {
        self.stem.unwrap_or(if self.depth < 50 { Stem::Cifar } else { Stem::Imagenet })
    }

    fn validate(&self) -> Result<([i64; 4], bool)> {
        let Some(l) = layout(self.depth) else {
            bail!("resnet: depth must be one of 18, 34, 50, 101, 152, got {}", self.depth);
        };
        if self.classes < 1 {
            bail!("resnet: classes must be at least 1, got {}", self.classes);
        }
        if self.in_channels < 1 {
            bail!("resnet: in_channels must be at least 1, got {}", self.in_channels);
        }
        Ok(l)
    }

    /// Trainable parameters of a network built from this configuration
    /// (without building it).
    pub fn num_params(&self) -> Result<i64> {
        let (counts, bottleneck) = self.validate()?;
        let k = if self.stem() == Stem::Cifar { 3 } else { 7 };
        let bn = |c: i64| 2 * c;
        let mut n = self.in_channels * 64 * k * k + bn(64);
        let mut cin = 64;
        for ((&planes, &blocks), &stride) in PLANES.iter().zip(&counts).zip(&STRIDES) {
            for b in 0..blocks {
                let s = if b == 0 { stride } else { 1 };
                let cout = if bottleneck { 4 * planes } else { planes };
                n += if bottleneck {
                    cin * planes + bn(planes) + planes * planes * 9 + bn(planes) + planes * cout + bn(cout)
                } else {
                    cin * planes * 9 + bn(planes) + planes * planes * 9 + bn(planes)
                };
                if s != 1 || cin != cout {
                    n += cin * cout + bn(cout);
                }
                cin = cout;
            }
        }
        Ok(n + cin * self.classes + self.classes)
    }
}

/// A convolution followed by batch norm.
struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm2d,
}

impl ConvBn {
    #[allow(clippy::too_many_arguments)]
    fn new(
        s: &mut ParamStore,
        conv: &Path,
        bn: &Path,
        cin: i64,
        cout: i64,
        k: i64,
        stride: i64,
        padding: i64,
    ) -> Result<Self> {
        Ok(ConvBn {
            conv: Conv2d::new(
                s,
                conv,
                cin,
                cout,
                k,
                stride,
                padding,
                false,
                Some(Init::KaimingNormalFanOut),
            )?,
            bn: BatchNorm2d::new(s, bn, cout)?,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor, TchError> {
        self.bn.forward(&self.conv.forward(x)?, train)
    }
}

/// A residual block: 2 (basic) or 3 (bottleneck) conv–BN pairs with ReLU
/// between them, the shortcut added before the last ReLU.
struct Block {
    convs: Vec<ConvBn>,
    downsample: Option<ConvBn>,
}

impl Block {
    fn new(
        s: &mut ParamStore,
        p: &Path,
        cin: i64,
        planes: i64,
        stride: i64,
        bottleneck: bool,
    ) -> Result<Self> {
        let cb = |s: &mut ParamStore, i: usize, cin, cout, k, stride, pad| {
            ConvBn::new(s, &p.sub(format!("conv{i}")), &p.sub(format!("bn{i}")), cin, cout, k, stride, pad)
        };
        let (convs, cout) = if bottleneck {
            let cout = 4 * planes;
            let c1 = cb(s, 1, cin, planes, 1, 1, 0)?;
            let c2 = cb(s, 2, planes, planes, 3, stride, 1)?;
            let c3 = cb(s, 3, planes, cout, 1, 1, 0)?;
            (vec![c1, c2, c3], cout)
        } else {
            let c1 = cb(s, 1, cin, planes, 3, stride, 1)?;
            let c2 = cb(s, 2, planes, planes, 3, 1, 1)?;
            (vec![c1, c2], planes)
        };
        let downsample = if stride != 1 || cin != cout {
            let d = p.sub("downsample");
            Some(ConvBn::new(s, &d.sub(0), &d.sub(1), cin, cout, 1, stride, 0)?)
        } else {
            None
        };
        Ok(Block { convs, downsample })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor, TchError> {
        let last = self.convs.len() - 1;
        let mut h = x.shallow_clone();
        for (i, c) in self.convs.iter().enumerate() {
            h = c.forward(&h, train)?;
            if i < last {
                h = h.f_relu_()?;
            }
        }
        // In place: batch norm's backward needs its input, not its output.
        let mut h = match &self.downsample {
            Some(d) => h.f_add_(&d.forward(x, train)?)?,
            None => h.f_add_(x)?,
        };
        h.f_relu_()
    }
}

pub struct ResNet {
    cfg: Config,
    arch: &'static str,
    store: ParamStore,
    stem: ConvBn,
    blocks: Vec<Block>,
    fc: Linear,
}

impl ResNet {
    /// Build the parameters on the CPU; the caller finalizes the store.
    pub fn new(cfg: Config) -> Result<Self> {
        let (counts, bottleneck) = cfg.validate()?;
        let cfg = Config { stem: Some(cfg.stem()), ..cfg };
        let arch = match cfg.depth {
            18 => "resnet18",
            34 => "resnet34",
            50 => "resnet50",
            101 => "resnet101",
            _ => "resnet152",
        };
        let mut s = ParamStore::new();
        let root = Path::default();
        let stem = match cfg.stem() {
            Stem::Cifar => {
                ConvBn::new(&mut s, &root.sub("conv1"), &root.sub("bn1"), cfg.in_channels, 64, 3, 1, 1)?
            }
            Stem::Imagenet => {
                ConvBn::new(&mut s, &root.sub("conv1"), &root.sub("bn1"), cfg.in_channels, 64, 7, 2, 3)?
            }
        };
        let mut blocks = Vec::new();
        let mut cin = 64;
        for (stage, ((&planes, &n), &stride)) in PLANES.iter().zip(&counts).zip(&STRIDES).enumerate() {
            let layer = root.sub(format!("layer{}", stage + 1));
            for b in 0..n {
                let s1 = if b == 0 { stride } else { 1 };
                blocks.push(Block::new(&mut s, &layer.sub(b), cin, planes, s1, bottleneck)?);
                cin = if bottleneck { 4 * planes } else { planes };
            }
        }
        let fc = Linear::new(&mut s, &root.sub("fc"), cin, cfg.classes, true, None)?;
        Ok(ResNet { cfg, arch, store: s, stem, blocks, fc })
    }

    pub fn cfg(&self) -> &Config {
        &self.cfg
    }

    fn check_input(&self, x: &Tensor) -> Result<(), TchError> {
        let shape = x.f_size_checked()?;
        if shape.len() != 4 || shape[1] != self.cfg.in_channels || shape.iter().any(|&d| d < 1) {
            return Err(TchError::Shape(format!(
                "{} expects images [B, {}, H, W] (all sizes >= 1), got {shape:?}",
                self.arch, self.cfg.in_channels
            )));
        }
        Ok(())
    }
}

impl Model for ResNet {
    fn arch(&self) -> &'static str {
        self.arch
    }

    fn task(&self) -> Task {
        Task::Classify { classes: self.cfg.classes }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor, TchError> {
        self.check_input(x)?;
        let mut h = self.stem.forward(x, train)?;
        let mut h = h.f_relu_()?;
        if self.cfg.stem() == Stem::Imagenet {
            h = h.f_max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false)?;
        }
        for b in &self.blocks {
            h = b.forward(&h, train)?;
        }
        let h = h.f_adaptive_avg_pool2d([1, 1])?.f_flatten(1, -1)?;
        self.fc.forward(&h)
    }

    fn store(&self) -> &ParamStore {
        &self.store
    }

    fn store_mut(&mut self) -> &mut ParamStore {
        &mut self.store
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.cfg).unwrap_or(serde_json::Value::Null)
    }
}
