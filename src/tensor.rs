//! Tensor helpers shared by the library and the script layer: dtype and
//! device names, libtorch error clean-up, and PyTorch-style printing.
use std::path::Path;

use tch::{Device, Kind, Tensor};

/// Names accepted for each dtype; the first one is the canonical name.
const KINDS: &[(Kind, &[&str])] = &[
    (Kind::Float, &["float32", "float", "f32", "fp32"]),
    (Kind::Double, &["float64", "double", "f64", "fp64"]),
    (Kind::Half, &["float16", "half", "f16", "fp16"]),
    (Kind::BFloat16, &["bfloat16", "bf16"]),
    (Kind::Int64, &["int64", "long", "i64"]),
    (Kind::Int, &["int32", "int", "i32"]),
    (Kind::Int16, &["int16", "short", "i16"]),
    (Kind::Int8, &["int8", "i8"]),
    (Kind::Uint8, &["uint8", "u8", "byte"]),
    (Kind::Bool, &["bool"]),
];

/// Parse a dtype name such as `"float32"`, `"bf16"` or `"int64"`.
pub fn parse_kind(name: &str) -> Result<Kind, String> {
    let lower = name.trim().to_ascii_lowercase();
    KINDS.iter().find(|(_, names)| names.contains(&lower.as_str())).map(|(k, _)| *k).ok_or_else(|| {
        let valid: Vec<&str> = KINDS.iter().map(|(_, n)| n[0]).collect();
        format!("unknown dtype '{name}' (valid: {})", valid.join(", "))
    })
}

/// Canonical (PyTorch) name of a dtype.
pub fn kind_name(kind: Kind) -> &'static str {
    KINDS.iter().find(|(k, _)| *k == kind).map(|(_, n)| n[0]).unwrap_or(match kind {
        Kind::ComplexHalf => "complex32",
        Kind::ComplexFloat => "complex64",
        Kind::ComplexDouble => "complex128",
        _ => "other",
    })
}

pub fn is_floating(kind: Kind) -> bool {
    matches!(kind, Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16)
}

/// Parse `"cpu"`, `"cuda"` or `"cuda:N"`; CUDA devices must exist. Plain
/// `cuda` is the rank's own device in a distributed run (its local rank).
pub fn parse_device(name: &str) -> Result<Device, String> {
    let lower = name.trim().to_ascii_lowercase();
    let dev = match lower.as_str() {
        "cpu" => return Ok(Device::Cpu),
        "cuda" | "gpu" => Device::Cuda(crate::dist::default_cuda_index()),
        s if s.starts_with("cuda:") => {
            let idx: usize =
                s[5..].parse().map_err(|_| format!("bad device '{name}' (expected cpu, cuda or cuda:N)"))?;
            Device::Cuda(idx)
        }
        _ => return Err(format!("bad device '{name}' (expected cpu, cuda or cuda:N)")),
    };
    let n = tch::Cuda::device_count() as usize;
    if let Device::Cuda(i) = dev {
        if n == 0 {
            return Err(format!("device '{name}': CUDA is not available on this machine"));
        }
        if i >= n {
            return Err(format!("device '{name}': only {n} CUDA device(s) visible"));
        }
    }
    Ok(dev)
}

/// `"auto"` picks CUDA when available, else the CPU.
pub fn parse_device_or_auto(name: &str) -> Result<Device, String> {
    if name.trim().eq_ignore_ascii_case("auto") {
        return match Device::cuda_if_available() {
            Device::Cuda(_) => parse_device("cuda"),
            d => Ok(d),
        };
    }
    parse_device(name)
}

pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        Device::Mps => "mps".into(),
        Device::Vulkan => "vulkan".into(),
    }
}

/// libtorch messages carry a C++ backtrace; keep the part a user can act on.
/// Longest word (a path, a value) an error message shows in full.
const LONGEST_WORD: usize = 240;
/// Longest error message shown in full.
const LONGEST_MESSAGE: usize = 8192;

/// `s` with its middle elided when longer than `max` characters.
fn elide(s: &str, max: usize) -> String {
    let n = s.chars().count();
    if n <= max {
        return s.to_string();
    }
    let keep = max / 2;
    let head: String = s.chars().take(keep).collect();
    let tail: String = s.chars().skip(n - keep).collect();
    format!("{head}...({} characters)...{tail}", n - 2 * keep)
}

/// A path as error messages show it: in full unless very long.
pub fn short_path(p: &Path) -> String {
    elide(&p.display().to_string(), LONGEST_WORD)
}

/// An error message with over-long words (a 1 MB path or value) and an
/// over-long whole shortened, so an error stays readable.
pub fn shorten_message(msg: &str) -> String {
    if msg.len() <= LONGEST_WORD {
        return msg.to_string();
    }
    let words: String = msg
        .split_inclusive(char::is_whitespace)
        .map(|w| {
            let t = w.trim_end();
            if t.chars().count() > LONGEST_WORD {
                format!("{}{}", elide(t, LONGEST_WORD), &w[t.len()..])
            } else {
                w.to_string()
            }
        })
        .collect();
    elide(&words, LONGEST_MESSAGE)
}

pub fn clean_torch_message(msg: &str) -> String {
    let msg = msg.trim();
    let msg = msg.strip_prefix("Torch(\"").unwrap_or(msg);
    let cut = ["\nException raised from", "Exception raised from", "\nframe #0"]
        .iter()
        .filter_map(|p| msg.find(p))
        .min()
        .unwrap_or(msg.len());
    let first = msg[..cut].trim();
    first.trim_end_matches("\")").trim().to_string()
}

/// Message of a tch error without the C++ backtrace.
pub fn torch_error(e: &tch::TchError) -> String {
    match e {
        tch::TchError::Torch(m) => clean_torch_message(m),
        other => clean_torch_message(&other.to_string()),
    }
}

/// A number a tensor operation takes as its other operand.
#[derive(Clone, Copy, Debug)]
pub enum Num {
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl From<i64> for Num {
    fn from(v: i64) -> Self {
        Num::Int(v)
    }
}

impl From<f64> for Num {
    fn from(v: f64) -> Self {
        Num::Float(v)
    }
}

/// `n` as the 0-d tensor the Scalar overloads of libtorch's operators use.
/// Anything reachable from user input passes numbers this way: tch's
/// Scalar-taking `f_*` functions panic when the operation fails (the
/// temporary Scalar's destructor finds the operation's error), while the
/// tensor overloads return it.
pub fn num(n: impl Into<Num>) -> Result<Tensor, tch::TchError> {
    crate::shim::wrapped_number(n.into()).map_err(tch::TchError::Torch)
}

/// Shape without panicking on undefined tensors.
pub trait SizeChecked {
    fn f_size_checked(&self) -> Result<Vec<i64>, tch::TchError>;
}

impl SizeChecked for Tensor {
    fn f_size_checked(&self) -> Result<Vec<i64>, tch::TchError> {
        if !self.defined() {
            return Err(tch::TchError::Torch("the tensor is undefined".into()));
        }
        Ok(self.size())
    }
}

/// All values as f64, flattened (any device, any dtype).
pub fn to_vec_f64(t: &Tensor) -> Result<Vec<f64>, tch::TchError> {
    let flat = t.f_detach()?.f_to_device(Device::Cpu)?.f_reshape([-1])?.f_to_kind(Kind::Double)?;
    Vec::<f64>::try_from(&flat)
}

/// All values as i64, flattened (any device, any dtype; bools become 0/1).
pub fn to_vec_i64(t: &Tensor) -> Result<Vec<i64>, tch::TchError> {
    let flat = t.f_detach()?.f_to_device(Device::Cpu)?.f_reshape([-1])?.f_to_kind(Kind::Int64)?;
    Vec::<i64>::try_from(&flat)
}

/// A copy with its own storage (`torch.clone`).
pub fn deep_copy(t: &Tensor) -> Result<Tensor, tch::TchError> {
    let mut out = t.f_empty_like()?;
    out.f_copy_(t)?;
    Ok(out)
}

const SUMMARY_THRESHOLD: i64 = 1000;
const EDGE_ITEMS: i64 = 3;

enum Values {
    Float(Vec<f64>),
    Int(Vec<i64>),
    Bool(Vec<bool>),
}

/// PyTorch-style text of a tensor, with shape, dtype and device appended.
pub fn format_tensor(t: &Tensor) -> String {
    match format_tensor_inner(t) {
        Ok(s) => s,
        Err(e) => format!("tensor(<unprintable: {e}>)"),
    }
}

fn format_tensor_inner(t: &Tensor) -> Result<String, String> {
    if !t.defined() {
        return Ok("tensor(<undefined>)".into());
    }
    let te = |e: tch::TchError| torch_error(&e);
    let shape = t.f_size_checked().map_err(te)?;
    let kind = t.f_kind().map_err(te)?;
    let device = t.device();
    let summarize = t.numel() as i64 > SUMMARY_THRESHOLD;
    // Gather only the elements that will be shown.
    let mut shown = t.f_detach().map_err(te)?;
    if summarize {
        for (d, &n) in shape.iter().enumerate() {
            if n > 2 * EDGE_ITEMS {
                let head = shown.f_narrow(d as i64, 0, EDGE_ITEMS).map_err(te)?;
                let tail = shown.f_narrow(d as i64, n - EDGE_ITEMS, EDGE_ITEMS).map_err(te)?;
                shown = Tensor::f_cat(&[head, tail], d as i64).map_err(te)?;
            }
        }
    }
    let values = match kind {
        Kind::Bool => Values::Bool(to_vec_i64(&shown).map_err(te)?.into_iter().map(|x| x != 0).collect()),
        k if is_floating(k) => Values::Float(to_vec_f64(&shown).map_err(te)?),
        _ => Values::Int(to_vec_i64(&shown).map_err(te)?),
    };
    let cells = format_cells(&values);
    let width = cells.iter().map(|c| c.len()).max().unwrap_or(0);
    let shown_shape = shown.f_size_checked().map_err(te)?;
    let mut body = String::new();
    if shape.is_empty() {
        body.push_str(cells.first().map(|s| s.as_str()).unwrap_or(""));
    } else {
        let mut idx = 0usize;
        let ctx = Layout { shape: &shape, shown: &shown_shape, cells: &cells, width, summarize };
        ctx.write(&mut body, 0, &mut idx, "tensor(".len());
    }
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    Ok(format!(
        "tensor({body}, shape=[{}], dtype={}, device={})",
        dims.join(", "),
        kind_name(kind),
        device_name(device)
    ))
}

struct Layout<'a> {
    shape: &'a [i64],
    shown: &'a [i64],
    cells: &'a [String],
    width: usize,
    summarize: bool,
}

impl Layout<'_> {
    fn write(&self, out: &mut String, dim: usize, idx: &mut usize, indent: usize) {
        out.push('[');
        let n = self.shown[dim];
        let cut = self.summarize && self.shape[dim] > 2 * EDGE_ITEMS;
        let last = dim + 1 == self.shape.len();
        for i in 0..n {
            if i > 0 {
                if last {
                    out.push_str(", ");
                } else {
                    out.push(',');
                    // A blank line between blocks of rank >= 3, as PyTorch prints.
                    for _ in 0..(self.shape.len() - dim - 1) {
                        out.push('\n');
                    }
                    out.push_str(&" ".repeat(indent + dim + 1));
                }
            }
            if cut && i == EDGE_ITEMS {
                if last {
                    out.push_str("..., ");
                } else {
                    out.push_str("...,\n");
                    out.push_str(&" ".repeat(indent + dim + 1));
                }
            }
            if last {
                out.push_str(&format!("{:>w$}", self.cells[*idx], w = self.width));
                *idx += 1;
            } else {
                self.write(out, dim + 1, idx, indent);
            }
        }
        out.push(']');
    }
}

fn format_cells(values: &Values) -> Vec<String> {
    match values {
        Values::Bool(v) => v.iter().map(|b| if *b { "True" } else { "False" }.to_string()).collect(),
        Values::Int(v) => v.iter().map(|x| x.to_string()).collect(),
        Values::Float(v) => {
            let finite: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
            let all_int = finite.iter().all(|x| x.fract() == 0.0);
            let abs_nonzero: Vec<f64> = finite.iter().map(|x| x.abs()).filter(|x| *x > 0.0).collect();
            let max = abs_nonzero.iter().cloned().fold(0.0f64, f64::max);
            let min = abs_nonzero.iter().cloned().fold(f64::INFINITY, f64::min);
            let sci =
                !abs_nonzero.is_empty() && (max >= 1e8 || (!all_int && (min < 1e-4 || max / min > 1e3)));
            v.iter()
                .map(|&x| {
                    if x.is_nan() {
                        "nan".to_string()
                    } else if x.is_infinite() {
                        if x > 0.0 { "inf" } else { "-inf" }.to_string()
                    } else if sci {
                        format_sci(x)
                    } else if all_int {
                        format!("{x:.0}.")
                    } else {
                        format!("{x:.4}")
                    }
                })
                .collect()
        }
    }
}

/// `1.2346e+05`, the way PyTorch prints scientific values.
fn format_sci(x: f64) -> String {
    let s = format!("{x:.4e}");
    match s.split_once('e') {
        Some((m, e)) => {
            let (sign, digits) = match e.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', e),
            };
            format!("{m}e{sign}{digits:0>2}")
        }
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip() {
        for (k, names) in KINDS {
            for n in names.iter() {
                assert_eq!(parse_kind(n).unwrap(), *k);
            }
            assert_eq!(kind_name(*k), names[0]);
        }
        assert!(parse_kind("float128").unwrap_err().contains("valid"));
    }

    #[test]
    fn devices() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert!(parse_device("tpu").is_err());
        if tch::Cuda::device_count() == 0 {
            assert!(parse_device("cuda").unwrap_err().contains("not available"));
        }
    }

    #[test]
    fn cleans_backtraces() {
        let m = "shape '[3]' is invalid for input of size 4\nException raised from foo at bar.cpp:1";
        assert_eq!(clean_torch_message(m), "shape '[3]' is invalid for input of size 4");
    }

    #[test]
    fn prints_like_pytorch() {
        let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).reshape([2, 2]);
        assert_eq!(
            format_tensor(&t),
            "tensor([[1., 2.],\n        [3., 4.]], shape=[2, 2], dtype=float32, device=cpu)"
        );
        let t = Tensor::from_slice(&[0.5f64, -1.25]);
        assert_eq!(format_tensor(&t), "tensor([ 0.5000, -1.2500], shape=[2], dtype=float64, device=cpu)");
        let t = Tensor::from_slice(&[1e-6f32, 1.0]);
        assert!(format_tensor(&t).contains("1.0000e-06"));
        let t = Tensor::from(7i64);
        assert_eq!(format_tensor(&t), "tensor(7, shape=[], dtype=int64, device=cpu)");
    }

    #[test]
    fn summarizes_large_tensors() {
        let t = Tensor::arange(2000, (Kind::Int64, Device::Cpu));
        let s = format_tensor(&t);
        assert!(s.starts_with("tensor([   0,    1,    2, ..., 1997, 1998, 1999]"), "{s}");
        let t = Tensor::arange(40 * 40, (Kind::Int64, Device::Cpu)).reshape([40, 40]);
        let s = format_tensor(&t);
        assert_eq!(s.matches("...").count(), 7, "{s}");
    }
}
