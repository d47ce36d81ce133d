//! IDX files, the MNIST family's format: a big-endian header (magic number
//! `0x0000TTDD`, type `TT`, `DD` dimensions, then one u32 per dimension)
//! followed by the data. Files may be gzip-compressed (detected by the
//! gzip magic `1f 8b`, not by the file name). Only unsigned bytes (`TT` =
//! 0x08) are supported, which is what image and label files use.
use std::io::{Read, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Magic number of an image file: unsigned bytes, three dimensions.
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of a label file: unsigned bytes, one dimension.
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// The decoded contents of an IDX file of unsigned bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Idx {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// The bytes of a file, gunzipped if they start with the gzip magic.
pub fn read_maybe_gzip(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("{}: cannot read the file", path.display()))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(raw.len() * 2);
        flate2::read::MultiGzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .with_context(|| format!("{}: corrupt or truncated gzip data", path.display()))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parse IDX bytes; `path` names the file in errors.
pub fn parse(bytes: Vec<u8>, path: &Path) -> Result<Idx> {
    let p = path.display();
    if bytes.len() < 4 {
        bail!("{p}: truncated IDX file ({} bytes, the header alone needs at least 4)", bytes.len());
    }
    let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if bytes[0] != 0 || bytes[1] != 0 {
        bail!("{p}: not an IDX file (magic number {magic:#010x}, expected 0x000008NN)");
    }
    if bytes[2] != 0x08 {
        bail!("{p}: IDX element type {:#04x} is not supported (only unsigned bytes, 0x08)", bytes[2]);
    }
    let ndims = bytes[3] as usize;
    if ndims == 0 {
        bail!("{p}: IDX file with zero dimensions");
    }
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        bail!("{p}: truncated IDX header ({} bytes, {ndims} dimensions need {header})", bytes.len());
    }
    let dims: Vec<usize> = (0..ndims)
        .map(|i| {
            let o = 4 + 4 * i;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let expected = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    let Some(expected) = expected else {
        bail!("{p}: IDX dimensions {dims:?} are too large");
    };
    let have = bytes.len() - header;
    if have < expected {
        bail!("{p}: truncated IDX file: dimensions {dims:?} need {expected} data bytes, the file has {have}");
    }
    if have > expected {
        bail!("{p}: IDX file has {} bytes after the data that dimensions {dims:?} describe", have - expected);
    }
    let mut data = bytes;
    data.drain(..header);
    Ok(Idx { dims, data })
}

/// Read an IDX file (plain or gzip).
pub fn read(path: &Path) -> Result<Idx> {
    parse(read_maybe_gzip(path)?, path)
}

fn expect_magic(bytes: &[u8], magic: u32, what: &str, path: &Path) -> Result<()> {
    if bytes.len() >= 4 {
        let m = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        if m != magic {
            bail!(
                "{}: magic number {m:#010x} is not that of an IDX {what} file ({magic:#010x})",
                path.display()
            );
        }
    }
    Ok(())
}

/// Images: (count, rows, columns, pixels), from a file with magic 0x00000803.
pub fn read_images(path: &Path) -> Result<(usize, usize, usize, Vec<u8>)> {
    let bytes = read_maybe_gzip(path)?;
    expect_magic(&bytes, IMAGES_MAGIC, "image", path)?;
    let idx = parse(bytes, path)?;
    let (n, h, w) = (idx.dims[0], idx.dims[1], idx.dims[2]);
    if h == 0 || w == 0 {
        bail!("{}: images of size {h}x{w}", path.display());
    }
    Ok((n, h, w, idx.data))
}

/// Labels, from a file with magic 0x00000801.
pub fn read_labels(path: &Path) -> Result<Vec<u8>> {
    let bytes = read_maybe_gzip(path)?;
    expect_magic(&bytes, LABELS_MAGIC, "label", path)?;
    Ok(parse(bytes, path)?.data)
}

/// IDX bytes for unsigned-byte data of shape `dims` (for tools and tests).
pub fn encode(dims: &[usize], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for &d in dims {
        out.extend_from_slice(&(d as u32).to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

/// Write an IDX file, gzip-compressed when `gzip` is set.
pub fn write(path: &Path, dims: &[usize], data: &[u8], gzip: bool) -> Result<()> {
    let bytes = encode(dims, data);
    let bytes = if gzip {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&bytes)?;
        enc.finish()?
    } else {
        bytes
    };
    std::fs::write(path, bytes).with_context(|| format!("{}: cannot write the file", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        let p = Path::new("x.idx");
        let b = encode(&[2, 3], &[1, 2, 3, 4, 5, 6]);
        assert_eq!(parse(b.clone(), p).unwrap(), Idx { dims: vec![2, 3], data: vec![1, 2, 3, 4, 5, 6] });
        let e = parse(b[..b.len() - 1].to_vec(), p).unwrap_err().to_string();
        assert!(e.contains("x.idx") && e.contains("truncated"), "{e}");
        let mut extra = b.clone();
        extra.push(0);
        assert!(parse(extra, p).unwrap_err().to_string().contains("after the data"));
        assert!(parse(vec![0, 0, 8], p).unwrap_err().to_string().contains("truncated"));
        assert!(parse(vec![0, 0, 0x0d, 1, 0, 0, 0, 0], p).unwrap_err().to_string().contains("not supported"));
        assert!(parse(b"\x89PNG\r\n\x1a\n".to_vec(), p).unwrap_err().to_string().contains("not an IDX"));
        assert!(parse(vec![0, 0, 8, 2, 0, 0], p).unwrap_err().to_string().contains("header"));
    }
}
