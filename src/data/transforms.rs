//! Image transforms on whole uint8 batches [B, C, H, W]: resizing and
//! padding (done once per data set by the loader), random crops and
//! horizontal flips (row copies per sample, offsets drawn from [`Rng`]),
//! and normalisation (one multiply-add on the float batch).
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use super::{Rng, Tch};

/// Images per chunk when resizing a whole data set (bounds the float
/// temporaries to a few tens of MB).
const CHUNK: i64 = 4096;

/// Bilinear resize of uint8 images to `size` x `size`, as torchvision's
/// `Resize(size)` on PIL images for square inputs: bilinear filtering with
/// half-pixel centres, antialiased when shrinking. libtorch's uint8 kernel
/// does it in Pillow's fixed-point arithmetic; where that kernel is
/// unavailable, float32 filtering rounded back to uint8 (within 1 of it).
pub fn resize_bilinear(images: &Tensor, size: i64) -> Result<Tensor> {
    if size <= 0 {
        bail!("resize: size must be positive, got {size}");
    }
    if let Ok(y) = images.f_internal_upsample_bilinear2d_aa([size, size], false, None, None) {
        return y.f_contiguous().tch();
    }
    let n = images.size()[0];
    let mut parts = Vec::new();
    let mut start = 0;
    while start < n {
        let len = CHUNK.min(n - start);
        let x = images.f_narrow(0, start, len).and_then(|t| t.f_to_kind(Kind::Float)).tch()?;
        let y = x
            .f_internal_upsample_bilinear2d_aa([size, size], false, None, None)
            .and_then(|t| t.f_round())
            .and_then(|t| t.f_clamp(0.0, 255.0))
            .and_then(|t| t.f_to_kind(Kind::Uint8))
            .tch()?;
        parts.push(y);
        start += len;
    }
    if parts.is_empty() {
        let s = images.size();
        return Tensor::f_zeros([0, s[1], size, size], (Kind::Uint8, Device::Cpu)).tch();
    }
    Tensor::f_cat(&parts, 0).tch()
}

/// Zero-pad images (centred) to `size` x `size`, as LeNet-5's 28 -> 32.
pub fn pad_to(images: &Tensor, size: i64) -> Result<Tensor> {
    let s = images.size();
    let (h, w) = (s[2], s[3]);
    if size < h || size < w {
        bail!("pad_to: images of {h}x{w} are larger than {size}x{size}");
    }
    let (top, left) = ((size - h) / 2, (size - w) / 2);
    images.f_constant_pad_nd([left, size - w - left, top, size - h - top]).tch()
}

/// Random crops of the original size from images zero-padded by `padding`
/// on each side, and horizontal flips with probability 1/2 where `hflip`,
/// for a uint8 batch [B, C, H, W] on the CPU. Offsets and flips are drawn
/// per sample, in batch order (crop rows, crop columns, then the flip).
///
/// The batch is assembled by copying row segments (a memcpy each, B*C*H of
/// them; the padding is never materialised): about ten times faster than
/// one libtorch gather over precomputed indices, and independent of
/// libtorch's thread pool.
pub fn crop_flip(batch: &Tensor, padding: i64, hflip: bool, rng: &mut Rng) -> Result<Tensor> {
    let s = batch.size();
    if s.len() != 4 || batch.kind() != Kind::Uint8 || batch.device() != Device::Cpu {
        bail!("crop_flip: expected a uint8 batch [B, C, H, W] on the CPU, got shape {s:?}");
    }
    if padding < 0 {
        bail!("crop_flip: padding must be non-negative, got {padding}");
    }
    let (b, c, h, w) = (s[0] as usize, s[1] as usize, s[2] as usize, s[3] as usize);
    if b == 0 || (padding == 0 && !hflip) {
        return Ok(batch.shallow_clone());
    }
    let src: Vec<u8> =
        Vec::<u8>::try_from(&batch.f_contiguous().and_then(|t| t.f_view([-1])).tch()?).tch()?;
    let mut out = vec![0u8; src.len()];
    let p = padding as isize;
    for i in 0..b {
        let (dy, dx) = if padding > 0 {
            let span = (2 * padding + 1) as u64;
            (rng.below(span) as isize - p, rng.below(span) as isize - p)
        } else {
            (0, 0)
        };
        let flip = hflip && rng.coin();
        // Output column x reads source column x + dx; the valid ones are a
        // contiguous run, the rest stay zero (the padding).
        let x0 = (-dx).clamp(0, w as isize) as usize;
        let x1 = (w as isize - dx).clamp(0, w as isize) as usize;
        for ch in 0..c {
            let plane = (i * c + ch) * h * w;
            for y in 0..h {
                let sy = y as isize + dy;
                let row = &mut out[plane + y * w..plane + (y + 1) * w];
                if sy >= 0 && (sy as usize) < h && x0 < x1 {
                    let from = plane + sy as usize * w;
                    let sx0 = (x0 as isize + dx) as usize;
                    row[x0..x1].copy_from_slice(&src[from + sx0..from + sx0 + (x1 - x0)]);
                }
                if flip {
                    row.reverse();
                }
            }
        }
    }
    let dims = [b as i64, c as i64, h as i64, w as i64];
    Tensor::f_from_slice(&out).and_then(|t| t.f_view(dims)).tch()
}

/// Per-channel normalisation folded into one multiply-add:
/// `x_u8 * (1 / (255 std)) - mean / std`, i.e. `(x / 255 - mean) / std`.
#[derive(Debug)]
pub struct Normalize {
    scale: Tensor,
    shift: Tensor,
}

impl Normalize {
    /// `mean` and `std` have one entry per channel, or one for all.
    pub fn new(mean: &[f64], std: &[f64], channels: i64, device: Device) -> Result<Normalize> {
        let expand = |v: &[f64], what: &str| -> Result<Vec<f64>> {
            match v.len() {
                1 => Ok(vec![v[0]; channels as usize]),
                n if n == channels as usize => Ok(v.to_vec()),
                n => bail!("normalize: {n} {what} values for images of {channels} channel(s)"),
            }
        };
        let (mean, std) = (expand(mean, "mean")?, expand(std, "std")?);
        if let Some(s) = std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            bail!("normalize: std must be positive, got {s}");
        }
        if let Some(m) = mean.iter().find(|m| !m.is_finite()) {
            bail!("normalize: mean must be finite, got {m}");
        }
        let scale: Vec<f32> = std.iter().map(|s| (1.0 / (255.0 * s)) as f32).collect();
        let shift: Vec<f32> = mean.iter().zip(&std).map(|(m, s)| (-m / s) as f32).collect();
        let shape = [1, channels, 1, 1];
        let t = |v: &[f32]| {
            Tensor::f_from_slice(v).and_then(|t| t.f_view(shape)).and_then(|t| t.f_to_device(device))
        };
        Ok(Normalize { scale: t(&scale).tch()?, shift: t(&shift).tch()? })
    }

    /// float32 batch from a uint8 batch on the same device as the statistics.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        x.f_to_kind(Kind::Float).and_then(|t| t.f_mul(&self.scale)).and_then(|t| t.f_add(&self.shift)).tch()
    }
}

/// float32 pixels in [0, 1] from uint8.
pub fn to_unit_float(x: &Tensor) -> Result<Tensor> {
    x.f_to_kind(Kind::Float).and_then(|t| t.f_div_scalar(255.0)).tch()
}
