//! Conversions between Rhai values and library types, and the one error type
//! every binding returns. Bindings never panic: libtorch errors become script
//! errors that Rhai tags with the caller's file, line and column.
use rhai::{Array, Dynamic, EvalAltResult, ImmutableString, Map, Position, FLOAT, INT};
use tch::{Device, Kind, Tensor};

use crate::tensor::{parse_device, parse_kind, torch_error, SizeChecked};

pub type RResult<T> = Result<T, Box<EvalAltResult>>;

/// A tensor held by a script. Cloning aliases the same storage, as
/// assignment does in PyTorch.
#[derive(Debug)]
pub struct RTensor(pub Tensor);

impl Clone for RTensor {
    fn clone(&self) -> Self {
        RTensor(self.0.shallow_clone())
    }
}

impl From<Tensor> for RTensor {
    fn from(t: Tensor) -> Self {
        RTensor(t)
    }
}

/// A script runtime error; Rhai fills in the position of the call.
pub fn rerr(msg: impl Into<String>) -> Box<EvalAltResult> {
    Box::new(EvalAltResult::ErrorRuntime(Dynamic::from(msg.into()), Position::NONE))
}

pub trait OrScript<T> {
    /// Turn a library or libtorch error into a script error.
    fn rt(self) -> RResult<T>;
}

impl<T> OrScript<T> for Result<T, tch::TchError> {
    fn rt(self) -> RResult<T> {
        self.map_err(|e| rerr(torch_error(&e)))
    }
}

impl<T> OrScript<T> for Result<T, String> {
    fn rt(self) -> RResult<T> {
        self.map_err(rerr)
    }
}

impl<T> OrScript<T> for std::io::Result<T> {
    fn rt(self) -> RResult<T> {
        self.map_err(|e| rerr(e.to_string()))
    }
}

impl<T> OrScript<T> for anyhow::Result<T> {
    fn rt(self) -> RResult<T> {
        self.map_err(|e| rerr(format!("{e:#}")))
    }
}

pub fn tensor_result(r: Result<Tensor, tch::TchError>) -> RResult<RTensor> {
    r.map(RTensor).rt()
}

/// A shape from an array of ints (`-1` allowed where `allow_infer`).
pub fn shape_arg(a: &Array, allow_infer: bool) -> RResult<Vec<i64>> {
    a.iter()
        .map(|d| match d.as_int() {
            Ok(v) if v >= 0 || (allow_infer && v == -1) => Ok(v),
            Ok(v) => Err(rerr(format!("shape entries must be non-negative, got {v}"))),
            Err(t) => Err(rerr(format!("shape entries must be int, got {t}"))),
        })
        .collect()
}

/// A list of dimensions from an array of ints.
pub fn dims_arg(a: &Array) -> RResult<Vec<i64>> {
    a.iter().map(|d| d.as_int().map_err(|t| rerr(format!("dimensions must be int, got {t}")))).collect()
}

pub fn shape_to_array(shape: &[i64]) -> Array {
    shape.iter().map(|&d| Dynamic::from_int(d)).collect()
}

/// Options accepted by the tensor constructors.
#[derive(Clone, Copy)]
pub struct TensorOpts {
    pub kind: Kind,
    pub device: Device,
    pub requires_grad: bool,
}

impl Default for TensorOpts {
    fn default() -> Self {
        TensorOpts { kind: Kind::Float, device: Device::Cpu, requires_grad: false }
    }
}

const OPT_KEYS: &[&str] = &["dtype", "device", "requires_grad"];

/// Parse constructor options: a dtype name, or `#{ dtype, device, requires_grad }`.
pub fn tensor_opts(d: &Dynamic, default_kind: Kind) -> RResult<TensorOpts> {
    let mut o = TensorOpts { kind: default_kind, ..Default::default() };
    if let Some(s) = d.read_lock::<ImmutableString>() {
        o.kind = parse_kind(&s).rt()?;
        return Ok(o);
    }
    let Some(map) = d.read_lock::<Map>() else {
        return Err(rerr(format!(
            "tensor options must be a dtype string or a map with keys {}",
            OPT_KEYS.join(", ")
        )));
    };
    check_keys(&map, OPT_KEYS, "tensor options")?;
    if let Some(v) = map.get("dtype") {
        o.kind = parse_kind(&expect_str(v, "dtype")?).rt()?;
    }
    if let Some(v) = map.get("device") {
        o.device = parse_device(&expect_str(v, "device")?).rt()?;
    }
    if let Some(v) = map.get("requires_grad") {
        o.requires_grad = v.as_bool().map_err(|_| rerr("requires_grad must be a bool"))?;
    }
    Ok(o)
}

/// Refuse keys outside `valid`, naming the valid ones.
pub fn check_keys(map: &Map, valid: &[&str], what: &str) -> RResult<()> {
    for k in map.keys() {
        if !valid.contains(&k.as_str()) {
            let mut v: Vec<&str> = valid.to_vec();
            v.sort_unstable();
            return Err(rerr(format!("unknown {what} key '{k}' (valid keys: {})", v.join(", "))));
        }
    }
    Ok(())
}

pub fn expect_str(v: &Dynamic, what: &str) -> RResult<String> {
    v.read_lock::<ImmutableString>()
        .map(|s| s.to_string())
        .ok_or_else(|| rerr(format!("{what} must be a string, got {}", v.type_name())))
}

/// An int or float as f64.
pub fn as_number(v: &Dynamic, what: &str) -> RResult<f64> {
    if let Ok(i) = v.as_int() {
        return Ok(i as f64);
    }
    v.as_float().map_err(|t| rerr(format!("{what} must be a number, got {t}")))
}

enum Leaves {
    Float(Vec<f64>),
    Int(Vec<i64>),
    Bool(Vec<bool>),
    Empty,
}

/// Build a tensor from a (nested) array of numbers or bools. The dtype is
/// float32 if any element is a float, int64 for ints, bool for bools.
pub fn tensor_from_array(a: &Array) -> RResult<Tensor> {
    let mut shape = Vec::new();
    let mut leaves = Leaves::Empty;
    walk(a, 0, &mut shape, &mut leaves)?;
    let t = match leaves {
        Leaves::Empty => Tensor::f_zeros(&shape, (Kind::Float, Device::Cpu)),
        Leaves::Float(v) => Tensor::f_from_slice(&v).and_then(|t| t.f_to_kind(Kind::Float)),
        Leaves::Int(v) => Tensor::f_from_slice(&v),
        Leaves::Bool(v) => Tensor::f_from_slice(&v),
    }
    .rt()?;
    t.f_reshape(&shape).rt()
}

fn walk(a: &Array, depth: usize, shape: &mut Vec<i64>, leaves: &mut Leaves) -> RResult<()> {
    if shape.len() == depth {
        shape.push(a.len() as i64);
    } else if shape[depth] != a.len() as i64 {
        return Err(rerr(format!(
            "ragged nested array: length {} at depth {depth}, expected {}",
            a.len(),
            shape[depth]
        )));
    }
    for v in a {
        if let Some(inner) = v.read_lock::<Array>() {
            walk(&inner, depth + 1, shape, leaves)?;
            continue;
        }
        if shape.len() != depth + 1 {
            return Err(rerr(format!(
                "ragged nested array: a number where an array was expected at depth {}",
                depth + 1
            )));
        }
        push_leaf(v, leaves)?;
    }
    Ok(())
}

fn push_leaf(v: &Dynamic, leaves: &mut Leaves) -> RResult<()> {
    let mixed = || rerr("tensor(): cannot mix bools with numbers");
    if let Ok(b) = v.as_bool() {
        match leaves {
            Leaves::Empty => *leaves = Leaves::Bool(vec![b]),
            Leaves::Bool(x) => x.push(b),
            _ => return Err(mixed()),
        }
    } else if let Ok(i) = v.as_int() {
        match leaves {
            Leaves::Empty => *leaves = Leaves::Int(vec![i]),
            Leaves::Int(x) => x.push(i),
            Leaves::Float(x) => x.push(i as f64),
            Leaves::Bool(_) => return Err(mixed()),
        }
    } else if let Ok(f) = v.as_float() {
        match leaves {
            Leaves::Empty => *leaves = Leaves::Float(vec![f]),
            Leaves::Float(x) => x.push(f),
            Leaves::Int(x) => {
                let mut fl: Vec<f64> = x.iter().map(|&i| i as f64).collect();
                fl.push(f);
                *leaves = Leaves::Float(fl);
            }
            Leaves::Bool(_) => return Err(mixed()),
        }
    } else {
        return Err(rerr(format!("tensor(): elements must be numbers or bools, got {}", v.type_name())));
    }
    Ok(())
}

/// Nested Rhai arrays with a tensor's values (ints, floats or bools).
pub fn tensor_to_dynamic(t: &Tensor) -> RResult<Dynamic> {
    let shape = t.f_size_checked().rt()?;
    let kind = t.f_kind().rt()?;
    use crate::tensor::{to_vec_f64, to_vec_i64};
    let leaves: Vec<Dynamic> = match kind {
        Kind::Bool => to_vec_i64(t).rt()?.into_iter().map(|x| Dynamic::from_bool(x != 0)).collect(),
        k if crate::tensor::is_floating(k) => {
            to_vec_f64(t).rt()?.into_iter().map(|x| Dynamic::from_float(x as FLOAT)).collect()
        }
        _ => to_vec_i64(t).rt()?.into_iter().map(|x| Dynamic::from_int(x as INT)).collect(),
    };
    if shape.is_empty() {
        return Ok(leaves.into_iter().next().unwrap_or(Dynamic::UNIT));
    }
    Ok(nest(&leaves, &shape))
}

fn nest(leaves: &[Dynamic], shape: &[i64]) -> Dynamic {
    if shape.len() == 1 {
        return Dynamic::from_array(leaves.to_vec());
    }
    let inner: i64 = shape[1..].iter().product();
    let n = shape[0] as usize;
    let arr: Array = (0..n)
        .map(|i| {
            let s = i * inner as usize;
            nest(&leaves[s..s + inner as usize], &shape[1..])
        })
        .collect();
    Dynamic::from_array(arr)
}

/// The single value of a one-element tensor.
pub fn tensor_item(t: &Tensor) -> RResult<Dynamic> {
    let n = t.numel();
    if n != 1 {
        return Err(rerr(format!("item(): the tensor has {n} elements, expected exactly one")));
    }
    let kind = t.f_kind().rt()?;
    let flat = t.f_reshape([1]).rt()?;
    Ok(match kind {
        Kind::Bool => Dynamic::from_bool(flat.f_int64_value(&[0]).rt()? != 0),
        k if crate::tensor::is_floating(k) => Dynamic::from_float(flat.f_double_value(&[0]).rt()?),
        _ => Dynamic::from_int(flat.f_int64_value(&[0]).rt()?),
    })
}

/// Read an array of tensors.
pub fn tensors_arg(a: &Array, what: &str) -> RResult<Vec<Tensor>> {
    a.iter()
        .map(|v| {
            v.read_lock::<RTensor>()
                .map(|t| t.0.shallow_clone())
                .ok_or_else(|| rerr(format!("{what}: expected an array of tensors, found {}", v.type_name())))
        })
        .collect()
}

pub fn map_of(pairs: Vec<(&str, Dynamic)>) -> Map {
    pairs.into_iter().map(|(k, v)| (k.into(), v)).collect()
}

pub fn values_indices(v: Tensor, i: Tensor) -> Map {
    map_of(vec![("values", Dynamic::from(RTensor(v))), ("indices", Dynamic::from(RTensor(i)))])
}
