//! Batches of an [`ImageDataset`]: seeded shuffling, resize or padding
//! (once, when the loader is made), random crops and flips (per sample,
//! from the loader's own [`Rng`]) and normalisation (on the batch). The
//! loader's position and generator state serialise into a [`LoaderState`]
//! so a resumed run sees exactly the batches an uninterrupted one would.
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use super::images::ImageDataset;
use super::transforms::{crop_flip, pad_to, resize_bilinear, Normalize};
use super::{Rng, Tch};

/// The stream of the augmentation generator (epochs use streams 0, 1, ...).
const AUG_STREAM: u64 = u64::MAX;

#[derive(Clone, Debug)]
pub struct LoaderOptions {
    pub batch_size: usize,
    /// Reshuffle every epoch (a permutation derived from `seed` and the epoch).
    pub shuffle: bool,
    pub seed: u64,
    /// Leave out the last batch of an epoch when it is smaller than `batch_size`.
    pub drop_last: bool,
    /// Bilinear resize to `n` x `n` (as torchvision's `Resize(n)`).
    pub resize: Option<i64>,
    /// Zero-pad (centred) to `n` x `n`.
    pub pad_to: Option<i64>,
    /// Random crop of the image size after zero padding of this many pixels.
    pub crop_padding: i64,
    /// Random horizontal flip with probability 1/2.
    pub hflip: bool,
    /// (mean, std) per channel of pixels in [0, 1]; none gives x / 255.
    pub normalize: Option<(Vec<f64>, Vec<f64>)>,
    /// Where batches are delivered (augmentation runs on the CPU, on uint8).
    pub device: Device,
}

impl Default for LoaderOptions {
    fn default() -> Self {
        LoaderOptions {
            batch_size: 64,
            shuffle: true,
            seed: 0,
            drop_last: false,
            resize: None,
            pad_to: None,
            crop_padding: 0,
            hflip: false,
            normalize: None,
            device: Device::Cpu,
        }
    }
}

/// Everything needed to continue a loader where it was: serialise it with
/// a checkpoint (serde, e.g. JSON) and pass it to [`Loader::restore`].
/// The shuffle order is not stored; it is regenerated from `seed` and `epoch`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    /// Epochs completed.
    pub epoch: u64,
    /// Batches already delivered in the current epoch.
    pub position: u64,
    /// State of the augmentation generator.
    pub rng: u64,
    pub seed: u64,
    pub shuffle: bool,
    pub drop_last: bool,
    pub batch_size: u64,
    /// Samples in the data set (a restore onto another data set is refused).
    pub samples: u64,
}

/// One batch: `x` float32 [B, C, H, W], `y` int64 [B].
#[derive(Debug)]
pub struct Batch {
    pub x: Tensor,
    pub y: Tensor,
}

#[derive(Debug)]
pub struct Loader {
    /// The data set's name and split, for messages.
    name: String,
    images: Tensor,
    labels: Tensor,
    opts: LoaderOptions,
    norm: Normalize,
    epoch: u64,
    position: u64,
    order: Vec<i64>,
    rng: Rng,
}

impl Loader {
    pub fn new(ds: &ImageDataset, opts: LoaderOptions) -> Result<Loader> {
        let name = &ds.name;
        if opts.batch_size == 0 {
            bail!("loader: batch_size must be at least 1");
        }
        if opts.crop_padding < 0 {
            bail!("loader: crop_padding must be non-negative, got {}", opts.crop_padding);
        }
        let images = match (opts.resize, opts.pad_to) {
            (Some(_), Some(_)) => bail!("loader: resize and pad_to exclude each other"),
            (Some(n), None) if n != ds.shape()[1] || n != ds.shape()[2] => resize_bilinear(&ds.images, n)?,
            (None, Some(n)) => pad_to(&ds.images, n)?,
            _ => ds.images.shallow_clone(),
        };
        let channels = ds.shape()[0];
        let norm = match &opts.normalize {
            Some((m, s)) => Normalize::new(m, s, channels, opts.device)?,
            None => Normalize::new(&[0.0], &[1.0], channels, opts.device)?,
        };
        let mut l = Loader {
            name: if ds.split.is_empty() { ds.name.clone() } else { format!("{} {}", ds.name, ds.split) },
            images,
            labels: ds.labels.shallow_clone(),
            opts,
            norm,
            epoch: 0,
            position: 0,
            order: vec![],
            rng: Rng::new(0),
        };
        if l.is_empty() {
            bail!(
                "loader: {name} has {} samples, which leaves no batch of {} (drop_last is {})",
                l.samples(),
                l.opts.batch_size,
                l.opts.drop_last
            );
        }
        l.reset();
        Ok(l)
    }

    /// The data set's name and split.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn options(&self) -> &LoaderOptions {
        &self.opts
    }

    pub fn samples(&self) -> usize {
        self.labels.size()[0] as usize
    }

    /// Batches per epoch.
    pub fn len(&self) -> usize {
        let (n, b) = (self.samples(), self.opts.batch_size);
        if self.opts.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Epochs completed (the index of the current epoch).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Batches delivered in the current epoch.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// [C, H, W] of the delivered images (after resize or padding).
    pub fn image_shape(&self) -> [i64; 3] {
        let s = self.images.size();
        [s[1], s[2], s[3]]
    }

    fn order_for(&self, epoch: u64) -> Vec<i64> {
        let n = self.samples();
        if self.opts.shuffle {
            Rng::stream(self.opts.seed, epoch).permutation(n)
        } else {
            (0..n as i64).collect()
        }
    }

    /// Back to the first batch of epoch 0 with a freshly seeded generator.
    pub fn reset(&mut self) {
        self.epoch = 0;
        self.position = 0;
        self.rng = Rng::stream(self.opts.seed, AUG_STREAM);
        self.order = self.order_for(0);
    }

    /// The next batch, or `None` once at the end of each epoch (the next
    /// call starts the following epoch, reshuffled).
    pub fn next_batch(&mut self) -> Result<Option<Batch>> {
        if self.position as usize >= self.len() {
            self.epoch += 1;
            self.position = 0;
            self.order = self.order_for(self.epoch);
            return Ok(None);
        }
        let b = self.opts.batch_size;
        let start = self.position as usize * b;
        let end = (start + b).min(self.samples());
        let idx = Tensor::f_from_slice(&self.order[start..end]).tch()?;
        let x = self.images.f_index_select(0, &idx).tch()?;
        let x = crop_flip(&x, self.opts.crop_padding, self.opts.hflip, &mut self.rng)?;
        let y = self.labels.f_index_select(0, &idx).tch()?;
        let (x, y) = if self.opts.device != Device::Cpu {
            (x.f_to_device(self.opts.device).tch()?, y.f_to_device(self.opts.device).tch()?)
        } else {
            (x, y)
        };
        let x = self.norm.apply(&x)?;
        self.position += 1;
        Ok(Some(Batch { x, y }))
    }

    pub fn state(&self) -> LoaderState {
        LoaderState {
            epoch: self.epoch,
            position: self.position,
            rng: self.rng.state(),
            seed: self.opts.seed,
            shuffle: self.opts.shuffle,
            drop_last: self.opts.drop_last,
            batch_size: self.opts.batch_size as u64,
            samples: self.samples() as u64,
        }
    }

    /// Continue from `state`; the loader must have been made with the same
    /// data set size, batch size, seed, shuffle and drop_last.
    pub fn restore(&mut self, state: &LoaderState) -> Result<()> {
        let mine = self.state();
        let mut diffs = Vec::new();
        if state.samples != mine.samples {
            diffs.push(format!("samples {} (this loader: {})", state.samples, mine.samples));
        }
        if state.batch_size != mine.batch_size {
            diffs.push(format!("batch_size {} (this loader: {})", state.batch_size, mine.batch_size));
        }
        if state.seed != mine.seed {
            diffs.push(format!("seed {} (this loader: {})", state.seed, mine.seed));
        }
        if state.shuffle != mine.shuffle {
            diffs.push(format!("shuffle {} (this loader: {})", state.shuffle, mine.shuffle));
        }
        if state.drop_last != mine.drop_last {
            diffs.push(format!("drop_last {} (this loader: {})", state.drop_last, mine.drop_last));
        }
        if !diffs.is_empty() {
            bail!("loader state does not fit this loader: {}", diffs.join(", "));
        }
        if state.position > self.len() as u64 {
            bail!("loader state: position {} is past the {} batches of an epoch", state.position, self.len());
        }
        self.epoch = state.epoch;
        self.position = state.position;
        self.rng = Rng::from_state(state.rng);
        self.order = self.order_for(state.epoch);
        Ok(())
    }
}
