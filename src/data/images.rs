//! Image classification data sets held in memory: one uint8 tensor of
//! shape [N, C, H, W] and one int64 tensor of labels [N]. Readers for the
//! MNIST family (IDX files) and CIFAR live in [`super::idx`] and
//! [`super::cifar`]; batching and augmentation in [`super::loader`].
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use super::{idx, Tch};

/// Where Debian's `dataset-fashion-mnist` package puts the files.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Per-channel mean and standard deviation of Fashion-MNIST's training
/// split (pixels scaled to [0, 1]); the test split is normalised with them too.
pub const FASHION_MNIST_STATS: ([f64; 1], [f64; 1]) = ([0.2860], [0.3530]);

/// Which part of a data set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    pub fn parse(name: &str) -> Result<Split> {
        match name.trim().to_ascii_lowercase().as_str() {
            "train" => Ok(Split::Train),
            "test" => Ok(Split::Test),
            _ => bail!("unknown split '{name}' (valid: train, test)"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

/// A labelled image data set, decoded into memory.
#[derive(Debug)]
pub struct ImageDataset {
    /// `fashion-mnist`, `cifar10`, `cifar100`, or `idx` for other IDX files.
    pub name: String,
    pub split: String,
    /// uint8 [N, C, H, W] on the CPU.
    pub images: Tensor,
    /// int64 [N] on the CPU, each in `0..classes`.
    pub labels: Tensor,
    pub classes: usize,
    /// One name per class (the class number as text where none is known).
    pub class_names: Vec<String>,
    /// Per-channel normalisation statistics (of pixels in [0, 1]).
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

impl Clone for ImageDataset {
    fn clone(&self) -> Self {
        ImageDataset {
            name: self.name.clone(),
            split: self.split.clone(),
            images: self.images.shallow_clone(),
            labels: self.labels.shallow_clone(),
            classes: self.classes,
            class_names: self.class_names.clone(),
            mean: self.mean.clone(),
            std: self.std.clone(),
        }
    }
}

impl ImageDataset {
    /// A data set from raw pixels (N*C*H*W bytes) and labels (one byte
    /// each). `stats` gives the normalisation statistics; without it they
    /// are computed from the pixels.
    #[allow(clippy::too_many_arguments)]
    pub fn from_bytes(
        name: &str,
        split: &str,
        shape: [usize; 4],
        pixels: &[u8],
        labels: &[u8],
        classes: usize,
        class_names: Vec<String>,
        stats: Option<(Vec<f64>, Vec<f64>)>,
    ) -> Result<ImageDataset> {
        let [n, c, h, w] = shape;
        if pixels.len() != n * c * h * w {
            bail!("{name}: {} pixel bytes for {n} images of {c}x{h}x{w}", pixels.len());
        }
        if labels.len() != n {
            bail!("{name}: {} labels for {n} images", labels.len());
        }
        if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= classes) {
            bail!("{name}: label {l} of image {i} is outside 0..{classes}");
        }
        let dims = [n as i64, c as i64, h as i64, w as i64];
        let images = Tensor::f_from_slice(pixels).and_then(|t| t.f_view(dims)).tch()?;
        let labels = Tensor::f_from_slice(labels).and_then(|t| t.f_to_kind(Kind::Int64)).tch()?;
        let class_names = if class_names.len() == classes {
            class_names
        } else {
            (0..classes).map(|i| i.to_string()).collect()
        };
        let mut ds = ImageDataset {
            name: name.to_string(),
            split: split.to_string(),
            images,
            labels,
            classes,
            class_names,
            mean: vec![],
            std: vec![],
        };
        let (mean, std) = match stats {
            Some(s) => s,
            None => ds.compute_stats()?,
        };
        ds.mean = mean;
        ds.std = std;
        Ok(ds)
    }

    /// Images and labels from a pair of IDX files (plain or gzip). The
    /// number of classes is the largest label plus one.
    pub fn from_idx(images: &Path, labels: &Path) -> Result<ImageDataset> {
        let (n, h, w, pixels) = idx::read_images(images)?;
        let ys = idx::read_labels(labels)?;
        if ys.len() != n {
            bail!("{} holds {} labels but {} holds {n} images", labels.display(), ys.len(), images.display());
        }
        let classes = ys.iter().copied().max().map_or(0, |m| m as usize + 1);
        ImageDataset::from_bytes("idx", "", [n, 1, h, w], &pixels, &ys, classes, vec![], None)
    }

    pub fn len(&self) -> usize {
        self.images.size().first().copied().unwrap_or(0) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// [C, H, W] of one image.
    pub fn shape(&self) -> [i64; 3] {
        let s = self.images.size();
        [s[1], s[2], s[3]]
    }

    /// Images `start..end` (sharing storage with this data set).
    pub fn slice(&self, start: usize, end: usize) -> Result<ImageDataset> {
        let n = self.len();
        if start > end || end > n {
            bail!("{}: slice {start}..{end} is outside 0..{n}", self.name);
        }
        let len = (end - start) as i64;
        Ok(ImageDataset {
            images: self.images.f_narrow(0, start as i64, len).tch()?,
            labels: self.labels.f_narrow(0, start as i64, len).tch()?,
            ..self.clone()
        })
    }

    /// Per-channel mean and standard deviation of the pixels (scaled to
    /// [0, 1]), accumulated in float64 over chunks.
    pub fn compute_stats(&self) -> Result<(Vec<f64>, Vec<f64>)> {
        let c = self.shape()[0];
        let n = self.len() as i64;
        let mut sum = Tensor::f_zeros([c], (Kind::Double, Device::Cpu)).tch()?;
        let mut sq = Tensor::f_zeros([c], (Kind::Double, Device::Cpu)).tch()?;
        let chunk = 4096;
        let mut start = 0;
        while start < n {
            let len = chunk.min(n - start);
            let x = self.images.f_narrow(0, start, len).and_then(|t| t.f_to_kind(Kind::Double)).tch()?;
            sum = sum.f_add(&x.f_sum_dim_intlist(&[0i64, 2, 3][..], false, Kind::Double).tch()?).tch()?;
            let x2 = x.f_square().tch()?;
            sq = sq.f_add(&x2.f_sum_dim_intlist(&[0i64, 2, 3][..], false, Kind::Double).tch()?).tch()?;
            start += len;
        }
        let [_, h, w] = self.shape();
        let count = (n * h * w).max(1) as f64;
        let sum = Vec::<f64>::try_from(&sum).tch()?;
        let sq = Vec::<f64>::try_from(&sq).tch()?;
        let mean: Vec<f64> = sum.iter().map(|s| s / count / 255.0).collect();
        let std: Vec<f64> = sq
            .iter()
            .zip(&mean)
            .map(|(q, m)| (q / count / (255.0 * 255.0) - m * m).max(0.0).sqrt())
            .collect();
        Ok((mean, std))
    }
}

impl fmt::Display for ImageDataset {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let [c, h, w] = self.shape();
        let split = if self.split.is_empty() { String::new() } else { format!(" {}", self.split) };
        write!(
            f,
            "ImageDataset({}{split}: {} images of {c}x{h}x{w}, {} classes)",
            self.name,
            self.len(),
            self.classes
        )
    }
}

/// The file paths of Fashion-MNIST's `split` under `root`.
pub fn fashion_mnist_files(root: &Path, split: Split) -> (PathBuf, PathBuf) {
    let prefix = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    (root.join(format!("{prefix}-images-idx3-ubyte.gz")), root.join(format!("{prefix}-labels-idx1-ubyte.gz")))
}

/// Fashion-MNIST (60000 training / 10000 test images of 1x28x28, 10
/// classes) from the IDX files under `root` (usually [`FASHION_MNIST_DIR`]).
/// Files without the `.gz` suffix are used when the compressed ones are absent.
pub fn fashion_mnist(root: &Path, split: Split) -> Result<ImageDataset> {
    let (mut images, mut labels) = fashion_mnist_files(root, split);
    for p in [&mut images, &mut labels] {
        if !p.exists() {
            let plain = p.with_extension("");
            if plain.exists() {
                *p = plain;
            }
        }
    }
    if !images.exists() {
        bail!(
            "{}: Fashion-MNIST is not installed (on Debian: apt-get install dataset-fashion-mnist)",
            images.display()
        );
    }
    let (n, h, w, pixels) = idx::read_images(&images)?;
    let ys = idx::read_labels(&labels)?;
    if ys.len() != n {
        bail!("{} holds {} labels but {} holds {n} images", labels.display(), ys.len(), images.display());
    }
    check_labels(&ys, 10, 1, &labels)?;
    let names = FASHION_MNIST_CLASSES.iter().map(|s| s.to_string()).collect();
    let (m, s) = FASHION_MNIST_STATS;
    ImageDataset::from_bytes(
        "fashion-mnist",
        split.name(),
        [n, 1, h, w],
        &pixels,
        &ys,
        10,
        names,
        Some((m.to_vec(), s.to_vec())),
    )
    .with_context(|| format!("{}", images.display()))
}

/// Refuse labels outside `0..classes`; `stride` steps over records where
/// labels are interleaved with other bytes.
pub(crate) fn check_labels(labels: &[u8], classes: usize, stride: usize, path: &Path) -> Result<()> {
    let bad = labels.iter().step_by(stride.max(1)).enumerate().find(|(_, &l)| l as usize >= classes);
    if let Some((i, l)) = bad {
        bail!("{}: label {l} of record {i} is outside 0..{classes}", path.display());
    }
    Ok(())
}
