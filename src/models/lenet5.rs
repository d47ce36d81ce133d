//! LeNet-5 with batch norm, as in the Python knlp (`lenet5/model.py`).
//!
//! ```text
//! layer1  Conv2d(in→6, k5) + BatchNorm2d(6) + ReLU + MaxPool(2, 2)   → 6×14×14
//! layer2  Conv2d(6→16, k5) + BatchNorm2d(16) + ReLU + MaxPool(2, 2)  → 16×5×5
//! fc      Linear(400→120) + ReLU
//! fc1     Linear(120→84) + ReLU
//! fc2     Linear(84→classes)
//! ```
//!
//! Input [B, in_channels, 32, 32]; PyTorch default initialisation;
//! 61,750 parameters at 10 classes. Parameter names follow the Python
//! module (`layer1.0` is the convolution, `layer1.1` its batch norm).
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::{TchError, Tensor};

use super::{Model, Task};
use crate::layers::{BatchNorm2d, Conv2d, Linear, Path};
use crate::params::ParamStore;
use crate::tensor::SizeChecked;

/// Input side length the fully connected head is sized for.
pub const IMAGE_SIZE: i64 = 32;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Number of output classes.
    pub classes: i64,
    /// Channels of the input images (1 for MNIST).
    pub in_channels: i64,
}

impl Default for Config {
    fn default() -> Self {
        Config { classes: 10, in_channels: 1 }
    }
}

impl Config {
    /// Trainable parameters of a LeNet-5 built from this configuration.
    pub fn num_params(&self) -> i64 {
        let conv1 = self.in_channels * 6 * 25 + 6 + 2 * 6;
        let conv2 = 6 * 16 * 25 + 16 + 2 * 16;
        let fc = 400 * 120 + 120 + 120 * 84 + 84 + 84 * self.classes + self.classes;
        conv1 + conv2 + fc
    }

    fn validate(&self) -> Result<()> {
        if self.classes < 1 {
            bail!("lenet5: classes must be at least 1, got {}", self.classes);
        }
        if self.in_channels < 1 {
            bail!("lenet5: in_channels must be at least 1, got {}", self.in_channels);
        }
        Ok(())
    }
}

pub struct LeNet5 {
    cfg: Config,
    store: ParamStore,
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    fc: Linear,
    fc1: Linear,
    fc2: Linear,
}

impl LeNet5 {
    /// Build the parameters on the CPU; the caller finalizes the store.
    pub fn new(cfg: Config) -> Result<Self> {
        cfg.validate()?;
        let mut s = ParamStore::new();
        let root = Path::default();
        let (l1, l2) = (root.sub("layer1"), root.sub("layer2"));
        let conv1 = Conv2d::new(&mut s, &l1.sub(0), cfg.in_channels, 6, 5, 1, 0, true, None)?;
        let bn1 = BatchNorm2d::new(&mut s, &l1.sub(1), 6)?;
        let conv2 = Conv2d::new(&mut s, &l2.sub(0), 6, 16, 5, 1, 0, true, None)?;
        let bn2 = BatchNorm2d::new(&mut s, &l2.sub(1), 16)?;
        let fc = Linear::new(&mut s, &root.sub("fc"), 400, 120, true, None)?;
        let fc1 = Linear::new(&mut s, &root.sub("fc1"), 120, 84, true, None)?;
        let fc2 = Linear::new(&mut s, &root.sub("fc2"), 84, cfg.classes, true, None)?;
        Ok(LeNet5 { cfg, store: s, conv1, bn1, conv2, bn2, fc, fc1, fc2 })
    }

    pub fn cfg(&self) -> &Config {
        &self.cfg
    }

    fn check_input(&self, x: &Tensor) -> Result<(), TchError> {
        let shape = x.f_size_checked()?;
        let want = [self.cfg.in_channels, IMAGE_SIZE, IMAGE_SIZE];
        if shape.len() != 4 || shape[1..] != want || shape[0] < 1 {
            return Err(TchError::Shape(format!(
                "lenet5 expects images [B, {}, {IMAGE_SIZE}, {IMAGE_SIZE}] with B >= 1, got {shape:?}",
                self.cfg.in_channels
            )));
        }
        Ok(())
    }
}

impl Model for LeNet5 {
    fn arch(&self) -> &'static str {
        "lenet5"
    }

    fn task(&self) -> Task {
        Task::Classify { classes: self.cfg.classes }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor, TchError> {
        self.check_input(x)?;
        let mut h = self.bn1.forward(&self.conv1.forward(x)?, train)?;
        let h = h.f_relu_()?.f_max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)?;
        let mut h = self.bn2.forward(&self.conv2.forward(&h)?, train)?;
        let h = h.f_relu_()?.f_max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)?;
        let h = h.f_flatten(1, -1)?;
        let mut h = self.fc.forward(&h)?;
        let mut h = self.fc1.forward(&h.f_relu_()?)?;
        self.fc2.forward(&h.f_relu_()?)
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
