//! CIFAR-10 and CIFAR-100 in their binary format ("CIFAR-10 binary
//! version"): fixed-size records of label byte(s) followed by 3072 pixel
//! bytes (1024 red, 1024 green, 1024 blue, each row-major 32x32).
//!
//! - CIFAR-10: 1 label byte; `data_batch_1.bin` .. `data_batch_5.bin`
//!   (10000 records each) and `test_batch.bin`.
//! - CIFAR-100: a coarse (20 classes) and a fine (100 classes) label byte;
//!   `train.bin` (50000 records) and `test.bin` (10000).
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::images::{check_labels, ImageDataset, Split};

pub const PIXELS: usize = 3 * 32 * 32;

pub const CIFAR10_CLASSES: [&str; 10] =
    ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];

/// Commonly used training-split statistics (pixels in [0, 1]).
pub const CIFAR10_STATS: ([f64; 3], [f64; 3]) = ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]);
pub const CIFAR100_STATS: ([f64; 3], [f64; 3]) = ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]);

/// Which CIFAR-100 label becomes the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cifar100Label {
    /// 100 classes.
    Fine,
    /// 20 super-classes.
    Coarse,
}

impl Cifar100Label {
    pub fn parse(name: &str) -> Result<Self> {
        match name.trim().to_ascii_lowercase().as_str() {
            "fine" => Ok(Cifar100Label::Fine),
            "coarse" => Ok(Cifar100Label::Coarse),
            _ => bail!("unknown CIFAR-100 label kind '{name}' (valid: coarse, fine)"),
        }
    }
}

/// The records of one file: (labels at `label_offset`, pixels).
fn read_records(path: &Path, label_bytes: usize, label_offset: usize) -> Result<(Vec<u8>, Vec<u8>)> {
    let raw =
        std::fs::read(path).with_context(|| format!("{}: cannot read the CIFAR file", path.display()))?;
    let record = label_bytes + PIXELS;
    if raw.is_empty() {
        bail!("{}: the CIFAR file is empty", path.display());
    }
    if raw.len() % record != 0 {
        bail!(
            "{}: {} bytes is not a whole number of {record}-byte records (truncated or not CIFAR binary)",
            path.display(),
            raw.len()
        );
    }
    let n = raw.len() / record;
    let mut labels = Vec::with_capacity(n);
    let mut pixels = Vec::with_capacity(n * PIXELS);
    for r in raw.chunks_exact(record) {
        labels.push(r[label_offset]);
        pixels.extend_from_slice(&r[label_bytes..]);
    }
    Ok((labels, pixels))
}

/// The files of a split, in order.
pub fn cifar10_files(dir: &Path, split: Split) -> Vec<PathBuf> {
    match split {
        Split::Train => (1..=5).map(|i| dir.join(format!("data_batch_{i}.bin"))).collect(),
        Split::Test => vec![dir.join("test_batch.bin")],
    }
}

pub fn cifar100_file(dir: &Path, split: Split) -> PathBuf {
    dir.join(match split {
        Split::Train => "train.bin",
        Split::Test => "test.bin",
    })
}

/// CIFAR-10 from the folder holding the `.bin` files (usually
/// `cifar-10-batches-bin`).
pub fn cifar10(dir: &Path, split: Split) -> Result<ImageDataset> {
    let mut labels = Vec::new();
    let mut pixels = Vec::new();
    for f in cifar10_files(dir, split) {
        let (l, p) = read_records(&f, 1, 0)?;
        check_labels(&l, 10, 1, &f)?;
        labels.extend(l);
        pixels.extend(p);
    }
    let n = labels.len();
    let names = CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect();
    let (m, s) = CIFAR10_STATS;
    let stats = Some((m.to_vec(), s.to_vec()));
    ImageDataset::from_bytes("cifar10", split.name(), [n, 3, 32, 32], &pixels, &labels, 10, names, stats)
}

/// CIFAR-100 from the folder holding `train.bin` and `test.bin` (usually
/// `cifar-100-binary`). Class names come from `fine_label_names.txt` or
/// `coarse_label_names.txt` in that folder when present.
pub fn cifar100(dir: &Path, split: Split, label: Cifar100Label) -> Result<ImageDataset> {
    let (offset, classes, names_file) = match label {
        Cifar100Label::Coarse => (0, 20, "coarse_label_names.txt"),
        Cifar100Label::Fine => (1, 100, "fine_label_names.txt"),
    };
    let f = cifar100_file(dir, split);
    let (labels, pixels) = read_records(&f, 2, offset)?;
    check_labels(&labels, classes, 1, &f)?;
    let names: Vec<String> = std::fs::read_to_string(dir.join(names_file))
        .map(|t| t.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect())
        .unwrap_or_default();
    let n = labels.len();
    let (m, s) = CIFAR100_STATS;
    let stats = Some((m.to_vec(), s.to_vec()));
    ImageDataset::from_bytes(
        "cifar100",
        split.name(),
        [n, 3, 32, 32],
        &pixels,
        &labels,
        classes,
        names,
        stats,
    )
}
