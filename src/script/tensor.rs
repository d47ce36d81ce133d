//! `Tensor` in scripts: construction, properties, shape ops, arithmetic,
//! math, reductions, selection, autograd and files.
use std::collections::BTreeMap;
use std::ops::{Range, RangeInclusive};
use std::path::Path;

use rhai::{Array, Dynamic, Engine, FnPtr, Map, NativeCallContext, FLOAT, INT};
use tch::{Device, Kind, TchError, Tensor};

use super::api::{Api, DocEntry};
use super::value::*;
use crate::tensor::{device_name, format_tensor, kind_name, num, parse_device, parse_kind, Num, SizeChecked};

type T = RTensor;
type TR = RResult<RTensor>;
type Tch = Result<Tensor, TchError>;

pub fn register(engine: &mut Engine, docs: &mut Vec<DocEntry>) {
    engine.register_type_with_name::<RTensor>("Tensor");
    engine.register_fn("to_string", |t: &mut T| format_tensor(&t.0));
    engine.register_fn("to_debug", |t: &mut T| format_tensor(&t.0));
    let mut api = Api::new(engine, docs);
    creation(&mut api);
    properties(&mut api);
    shape_ops(&mut api);
    indexing(&mut api);
    arithmetic(&mut api);
    math(&mut api);
    reductions(&mut api);
    selection(&mut api);
    autograd(&mut api);
    files(&mut api);
}

fn shape_from(d: &Dynamic) -> RResult<Vec<i64>> {
    if let Ok(n) = d.as_int() {
        return shape_arg(&vec![Dynamic::from_int(n)], false);
    }
    match d.read_lock::<Array>() {
        Some(a) => shape_arg(&a, false),
        None => Err(rerr(format!("a shape must be an int or an array of ints, got {}", d.type_name()))),
    }
}

fn finish(t: Tensor, o: TensorOpts) -> TR {
    let t = if t.device() != o.device { t.f_to_device(o.device).rt()? } else { t };
    let t = if o.requires_grad { t.f_set_requires_grad(true).rt()? } else { t };
    Ok(RTensor(t))
}

/// Constructors that take a shape: (name, doc, builder).
type ShapeCtor = fn(&[i64], (Kind, Device)) -> Tch;
const SHAPE_CTORS: &[(&str, &str, ShapeCtor)] = &[
    ("zeros", "Tensor filled with 0.", |s, o| Tensor::f_zeros(s, o)),
    ("ones", "Tensor filled with 1.", |s, o| Tensor::f_ones(s, o)),
    ("randn", "Samples from the standard normal distribution.", |s, o| Tensor::f_randn(s, o)),
    ("rand", "Samples from the uniform distribution on [0, 1).", |s, o| Tensor::f_rand(s, o)),
    ("empty", "Uninitialised tensor (contents are arbitrary).", |s, o| Tensor::f_empty(s, o)),
];

fn creation(api: &mut Api) {
    api.group("Tensor creation");
    for &(name, doc, ctor) in SHAPE_CTORS {
        api.f(name, "shape: array|int", doc, move |shape: Dynamic| -> TR {
            finish(ctor(&shape_from(&shape)?, (Kind::Float, Device::Cpu)).rt()?, TensorOpts::default())
        });
        api.f(
            name,
            "shape: array|int, options: string|map",
            doc,
            move |shape: Dynamic, opts: Dynamic| -> TR {
                let o = tensor_opts(&opts, Kind::Float)?;
                finish(ctor(&shape_from(&shape)?, (o.kind, o.device)).rt()?, o)
            },
        );
    }
    api.f(
        "full",
        "shape: array|int, value: number",
        "Tensor filled with `value` (int64 for an int, float32 for a float).",
        |shape: Dynamic, v: Dynamic| -> TR {
            let (kind, n) = scalar_of(&v)?;
            filled(&shape_from(&shape)?, n, (kind, Device::Cpu)).map(RTensor).rt()
        },
    );
    api.f(
        "full",
        "shape: array|int, value: number, options: string|map",
        "Tensor filled with `value`, with dtype/device options.",
        |shape: Dynamic, v: Dynamic, opts: Dynamic| -> TR {
            let (kind, n) = scalar_of(&v)?;
            let o = tensor_opts(&opts, kind)?;
            finish(filled(&shape_from(&shape)?, n, (o.kind, o.device)).rt()?, o)
        },
    );
    api.f("tensor", "values: array|number", "Tensor from a number or a nested array of numbers or bools (float32 if any float, int64 for ints, bool for bools).", |v: Dynamic| -> TR {
        tensor_from_value(&v).map(RTensor)
    });
    api.f(
        "tensor",
        "values: array|number, options: string|map",
        "Tensor from a nested array, with a dtype string or `#{ dtype, device, requires_grad }`.",
        |v: Dynamic, opts: Dynamic| -> TR {
            let t = tensor_from_value(&v)?;
            let o = tensor_opts(&opts, t.kind())?;
            finish(t.f_to_kind(o.kind).rt()?, o)
        },
    );
    api.f(
        "arange",
        "end: number",
        "0, 1, ..., end-1 (int64 for an int, float32 for a float).",
        |end: Dynamic| -> TR { arange3(&Dynamic::from_int(0), &end, &Dynamic::from_int(1)) },
    );
    api.f(
        "arange",
        "start: number, end: number",
        "start, start+1, ..., up to but excluding end.",
        |start: Dynamic, end: Dynamic| -> TR { arange3(&start, &end, &Dynamic::from_int(1)) },
    );
    api.f(
        "arange",
        "start: number, end: number, step: number",
        "start, start+step, ..., up to but excluding end.",
        |start: Dynamic, end: Dynamic, step: Dynamic| -> TR { arange3(&start, &end, &step) },
    );
    api.f(
        "linspace",
        "start: number, end: number, steps",
        "`steps` evenly spaced float32 values from start to end inclusive.",
        |start: Dynamic, end: Dynamic, steps: INT| -> TR {
            let (a, b) = (as_number(&start, "start")?, as_number(&end, "end")?);
            // Checked here: linspace takes Scalars (see tensor::num).
            if steps < 0 {
                return Err(rerr(format!("linspace(): steps must be >= 0, got {steps}")));
            }
            Tensor::f_linspace(a, b, steps, (Kind::Float, Device::Cpu)).map(RTensor).rt()
        },
    );
    api.f("eye", "n", "n x n identity matrix (float32).", |n: INT| -> TR {
        Tensor::f_eye(n, (Kind::Float, Device::Cpu)).map(RTensor).rt()
    });
    api.f("eye", "n, m", "n x m matrix with ones on the diagonal (float32).", |n: INT, m: INT| -> TR {
        Tensor::f_eye_m(n, m, (Kind::Float, Device::Cpu)).map(RTensor).rt()
    });
    api.f(
        "randint",
        "low, high, shape: array|int",
        "Uniform random int64 values in [low, high).",
        |low: INT, high: INT, shape: Dynamic| -> TR {
            Tensor::f_randint_low(low, high, shape_from(&shape)?, (Kind::Int64, Device::Cpu))
                .map(RTensor)
                .rt()
        },
    );
    api.f("randperm", "n", "A random permutation of 0..n (int64).", |n: INT| -> TR {
        Tensor::f_randperm(n, (Kind::Int64, Device::Cpu)).map(RTensor).rt()
    });
    type Like = fn(&Tensor) -> Tch;
    const LIKE: &[(&str, &str, Like)] = &[
        ("zeros_like", "Zeros with the shape, dtype and device of `self`.", |t| t.f_zeros_like()),
        ("ones_like", "Ones with the shape, dtype and device of `self`.", |t| t.f_ones_like()),
        ("randn_like", "Standard normal samples shaped like `self`.", |t| t.f_randn_like()),
        ("rand_like", "Uniform [0, 1) samples shaped like `self`.", |t| t.f_rand_like()),
    ];
    for &(name, doc, f) in LIKE {
        api.f(name, "self", doc, move |t: &mut T| tensor_result(f(&t.0)));
    }
    api.f(
        "manual_seed",
        "seed",
        "Seed libtorch's random generators (CPU and every CUDA device).",
        |seed: INT| {
            tch::manual_seed(seed);
            if tch::Cuda::is_available() {
                tch::Cuda::manual_seed_all(seed as u64);
            }
        },
    );
}

fn tensor_from_value(v: &Dynamic) -> RResult<Tensor> {
    if let Some(a) = v.read_lock::<Array>() {
        return tensor_from_array(&a);
    }
    if let Some(t) = v.read_lock::<RTensor>() {
        return crate::tensor::deep_copy(&t.0.f_detach().rt()?).rt();
    }
    let (kind, n) = scalar_of(v)?;
    filled(&[], n, (kind, Device::Cpu)).rt()
}

/// A new tensor of `shape` holding `n` (an ordinary tensor, not a wrapped number).
fn filled(shape: &[i64], n: Num, opts: (Kind, Device)) -> Result<Tensor, tch::TchError> {
    let mut t = Tensor::f_empty(shape, opts)?;
    t.f_fill_tensor_(&num(n)?)
}

/// A script number with PyTorch's default dtype for it.
fn scalar_of(v: &Dynamic) -> RResult<(Kind, Num)> {
    if let Ok(i) = v.as_int() {
        return Ok((Kind::Int64, Num::Int(i)));
    }
    if let Ok(f) = v.as_float() {
        return Ok((Kind::Float, Num::Float(f)));
    }
    if let Ok(b) = v.as_bool() {
        return Ok((Kind::Bool, Num::Bool(b)));
    }
    Err(rerr(format!("expected a number, got {}", v.type_name())))
}

/// A script number as the 0-d tensor libtorch's Scalar overloads use
/// (`tensor::num`: errors come back instead of panicking).
fn num_of(v: &Dynamic) -> RResult<Tensor> {
    num(scalar_of(v)?.1).rt()
}

fn arange3(start: &Dynamic, end: &Dynamic, step: &Dynamic) -> TR {
    let all_int = start.is_int() && end.is_int() && step.is_int();
    let kind = if all_int { Kind::Int64 } else { Kind::Float };
    let (a, b, s) = (as_number(start, "start")?, as_number(end, "end")?, as_number(step, "step")?);
    // Checked here, since libtorch's arange takes Scalars (whose errors
    // tch turns into panics, see tensor::num).
    if s == 0.0 {
        return Err(rerr("arange(): step must not be zero"));
    }
    let span = (b - a) / s;
    let n = span.ceil();
    if !n.is_finite() {
        return Err(rerr(format!("arange(): start {a}, end {b} and step {s} must be finite")));
    }
    // Not `n < 0`: ceil(-0.5) is -0.0.
    if span < 0.0 {
        return Err(rerr(format!("arange(): end {b} cannot be reached from start {a} with step {s}")));
    }
    if n > (1u64 << 40) as f64 {
        return Err(rerr(format!("arange(): {n} elements is too many")));
    }
    if all_int {
        Tensor::f_arange_start_step(a as i64, b as i64, s as i64, (kind, Device::Cpu))
    } else {
        Tensor::f_arange_start_step(a, b, s, (kind, Device::Cpu))
    }
    .map(RTensor)
    .rt()
}

fn properties(api: &mut Api) {
    api.group("Tensor properties");
    api.get("shape", "The shape as an array of ints.", |t: &mut T| -> RResult<Array> {
        Ok(shape_to_array(&t.0.f_size_checked().rt()?))
    });
    api.f("shape", "self", "The shape as an array of ints.", |t: &mut T| -> RResult<Array> {
        Ok(shape_to_array(&t.0.f_size_checked().rt()?))
    });
    api.f(
        "size",
        "self, dim",
        "Length of dimension `dim` (negative counts from the end).",
        |t: &mut T, dim: INT| -> RResult<INT> {
            let s = t.0.f_size_checked().rt()?;
            let d = norm_dim(dim, s.len())?;
            Ok(s[d])
        },
    );
    api.get("ndim", "Number of dimensions.", |t: &mut T| t.0.dim() as INT);
    api.f("dim", "self", "Number of dimensions.", |t: &mut T| t.0.dim() as INT);
    api.f("numel", "self", "Number of elements.", |t: &mut T| t.0.numel() as INT);
    api.get(
        "dtype",
        "The dtype name (`float32`, `bfloat16`, `int64`, ...).",
        |t: &mut T| -> RResult<String> { Ok(kind_name(t.0.f_kind().rt()?).to_string()) },
    );
    api.f("dtype", "self", "The dtype name.", |t: &mut T| -> RResult<String> {
        Ok(kind_name(t.0.f_kind().rt()?).to_string())
    });
    api.get("device", "The device name (`cpu`, `cuda:0`).", |t: &mut T| device_name(t.0.device()));
    api.f("device", "self", "The device name.", |t: &mut T| device_name(t.0.device()));
    api.get("is_cuda", "Whether the tensor lives on a CUDA device.", |t: &mut T| t.0.device().is_cuda());
    type Conv = (&'static str, &'static str, Kind);
    const CONVERSIONS: &[Conv] = &[
        ("float", "Convert to float32.", Kind::Float),
        ("double", "Convert to float64.", Kind::Double),
        ("half", "Convert to float16.", Kind::Half),
        ("bf16", "Convert to bfloat16.", Kind::BFloat16),
        ("long", "Convert to int64.", Kind::Int64),
        ("int", "Convert to int32.", Kind::Int),
        ("bool", "Convert to bool.", Kind::Bool),
    ];
    for &(name, doc, kind) in CONVERSIONS {
        api.f(name, "self", doc, move |t: &mut T| tensor_result(t.0.f_to_kind(kind)));
    }
    api.f(
        "to",
        "self, target",
        "Move to a device (`\"cpu\"`, `\"cuda\"`, `\"cuda:1\"`) or convert to a dtype (`\"bf16\"`, ...).",
        |t: &mut T, target: &str| -> TR {
            match parse_kind(target) {
                Ok(k) => tensor_result(t.0.f_to_kind(k)),
                Err(_) => {
                    let d = parse_device(target)
                        .map_err(|e| rerr(format!("to(\"{target}\"): not a dtype, and {e}")))?;
                    tensor_result(t.0.f_to_device(d))
                }
            }
        },
    );
    api.f(
        "to",
        "self, device, dtype",
        "Move to `device` and convert to `dtype` in one step.",
        |t: &mut T, device: &str, dtype: &str| -> TR {
            let d = parse_device(device).rt()?;
            let k = parse_kind(dtype).rt()?;
            tensor_result(t.0.f_to_device(d).and_then(|x| x.f_to_kind(k)))
        },
    );
    api.f("cuda", "self", "Move to the first CUDA device.", |t: &mut T| -> TR {
        let d = parse_device("cuda").rt()?;
        tensor_result(t.0.f_to_device(d))
    });
    api.f("cpu", "self", "Move to the CPU.", |t: &mut T| tensor_result(t.0.f_to_device(Device::Cpu)));
    api.f("item", "self", "The value of a one-element tensor as an int, float or bool.", |t: &mut T| {
        tensor_item(&t.0)
    });
    api.f("to_array", "self", "The values as nested arrays (a plain value for 0-d tensors).", |t: &mut T| {
        tensor_to_dynamic(&t.0)
    });
    api.f(
        "to_string",
        "self",
        "PyTorch-style text with shape, dtype and device (what `print` shows).",
        |t: &mut T| format_tensor(&t.0),
    );
    api.f("clone", "self", "A copy with its own storage.", |t: &mut T| {
        tensor_result(crate::tensor::deep_copy(&t.0))
    });
    api.f("contiguous", "self", "A contiguous tensor with the same values.", |t: &mut T| {
        tensor_result(t.0.f_contiguous())
    });
    api.f("is_contiguous", "self", "Whether the storage is contiguous in row-major order.", |t: &mut T| {
        t.0.is_contiguous()
    });
}

fn norm_dim(dim: INT, ndim: usize) -> RResult<usize> {
    let n = ndim as i64;
    let d = if dim < 0 { dim + n } else { dim };
    if d < 0 || d >= n.max(1) {
        return Err(rerr(format!("dimension {dim} is out of range for a tensor of {ndim} dimension(s)")));
    }
    Ok(d as usize)
}

fn shape_ops(api: &mut Api) {
    api.group("Shape and indexing");
    api.f(
        "reshape",
        "self, shape",
        "Same values in a new shape (one entry may be -1).",
        |t: &mut T, s: Array| tensor_result(t.0.f_reshape(shape_arg(&s, true)?)),
    );
    api.f(
        "view",
        "self, shape",
        "A view with a new shape, sharing storage (needs compatible strides).",
        |t: &mut T, s: Array| tensor_result(t.0.f_view(shape_arg(&s, true)?.as_slice())),
    );
    api.f("transpose", "self, dim0, dim1", "Swap two dimensions (a view).", |t: &mut T, a: INT, b: INT| {
        tensor_result(t.0.f_transpose(a, b))
    });
    api.f("t", "self", "Transpose of a matrix (at most 2 dimensions).", |t: &mut T| {
        if t.0.dim() > 2 {
            return Err(rerr(format!(
                "t(): expects at most 2 dimensions, got {} (use transpose)",
                t.0.dim()
            )));
        }
        tensor_result(t.0.f_numpy_t())
    });
    api.f("permute", "self, dims", "Reorder the dimensions (a view).", |t: &mut T, d: Array| {
        tensor_result(t.0.f_permute(dims_arg(&d)?))
    });
    api.f("flatten", "self", "All dimensions flattened into one.", |t: &mut T| {
        tensor_result(t.0.f_flatten(0, -1))
    });
    api.f(
        "flatten",
        "self, start",
        "Dimensions start..=-1 flattened into one (`x.flatten(1)`: [B, C, H, W] to [B, C·H·W]).",
        |t: &mut T, d: INT| tensor_result(t.0.f_flatten(d, -1)),
    );
    api.f(
        "flatten",
        "self, start, end",
        "Dimensions start..=end flattened into one.",
        |t: &mut T, s: INT, e: INT| tensor_result(t.0.f_flatten(s, e)),
    );
    api.f("squeeze", "self", "Remove all dimensions of size 1.", |t: &mut T| tensor_result(t.0.f_squeeze()));
    api.f("squeeze", "self, dim", "Remove dimension `dim` if its size is 1.", |t: &mut T, d: INT| {
        tensor_result(t.0.f_squeeze_dim(d))
    });
    api.f("unsqueeze", "self, dim", "Insert a dimension of size 1 at `dim`.", |t: &mut T, d: INT| {
        tensor_result(t.0.f_unsqueeze(d))
    });
    api.f(
        "expand",
        "self, shape",
        "Broadcast to a larger shape without copying (-1 keeps a size).",
        |t: &mut T, s: Array| tensor_result(t.0.f_expand(shape_arg(&s, true)?, false)),
    );
    api.f(
        "repeat",
        "self, repeats",
        "Tile the tensor `repeats[i]` times along each dimension.",
        |t: &mut T, s: Array| tensor_result(t.0.f_repeat(shape_arg(&s, false)?)),
    );
    api.f("cat", "tensors", "Concatenate an array of tensors along dimension 0.", |a: Array| {
        tensor_result(Tensor::f_cat(&tensors_arg(&a, "cat")?, 0))
    });
    api.f("cat", "tensors, dim", "Concatenate an array of tensors along `dim`.", |a: Array, d: INT| {
        tensor_result(Tensor::f_cat(&tensors_arg(&a, "cat")?, d))
    });
    api.f(
        "stack",
        "tensors",
        "Stack an array of equally shaped tensors along a new dimension 0.",
        |a: Array| tensor_result(Tensor::f_stack(&tensors_arg(&a, "stack")?, 0)),
    );
    api.f(
        "stack",
        "tensors, dim",
        "Stack an array of equally shaped tensors along a new dimension `dim`.",
        |a: Array, d: INT| tensor_result(Tensor::f_stack(&tensors_arg(&a, "stack")?, d)),
    );
    api.f(
        "chunk",
        "self, chunks, dim",
        "Split into `chunks` nearly equal pieces along `dim` (an array of views).",
        |t: &mut T, n: INT, d: INT| -> RResult<Array> {
            Ok(t.0.f_chunk(n, d).rt()?.into_iter().map(|x| Dynamic::from(RTensor(x))).collect())
        },
    );
    api.f(
        "split",
        "self, size, dim",
        "Split into pieces of `size` along `dim` (the last may be smaller).",
        |t: &mut T, n: INT, d: INT| -> RResult<Array> {
            Ok(t.0.f_split(n, d).rt()?.into_iter().map(|x| Dynamic::from(RTensor(x))).collect())
        },
    );
    api.f(
        "narrow",
        "self, dim, start, length",
        "`length` elements of `dim` from `start` (a view).",
        |t: &mut T, d: INT, s: INT, l: INT| tensor_result(t.0.f_narrow(d, s, l)),
    );
    api.f(
        "slice",
        "self, dim, start, end",
        "Elements start..end of `dim` (a view; negative bounds count from the end).",
        |t: &mut T, d: INT, s: INT, e: INT| tensor_result(t.0.f_slice(d, s, e, 1)),
    );
    api.f(
        "slice",
        "self, dim, start, end, step",
        "Every `step`-th element of start..end along `dim` (a view).",
        |t: &mut T, d: INT, s: INT, e: INT, st: INT| tensor_result(t.0.f_slice(d, s, e, st)),
    );
    api.f(
        "select",
        "self, dim, index",
        "The slice at `index` of `dim`, removing that dimension (a view).",
        |t: &mut T, d: INT, i: INT| tensor_result(t.0.f_select(d, i)),
    );
    api.f(
        "index_select",
        "self, dim, indices",
        "Rows of `dim` picked by an int64 index tensor (a copy).",
        |t: &mut T, d: INT, i: T| tensor_result(t.0.f_index_select(d, &i.0)),
    );
    api.f(
        "gather",
        "self, dim, indices",
        "Values along `dim` at `indices` (same shape as `indices`).",
        |t: &mut T, d: INT, i: T| tensor_result(t.0.f_gather(d, &i.0, false)),
    );
    api.f(
        "masked_fill",
        "self, mask, value: number",
        "Copy with `value` wherever the bool `mask` is true.",
        |t: &mut T, m: T, v: Dynamic| -> TR { tensor_result(t.0.f_masked_fill_tensor(&m.0, &num_of(&v)?)) },
    );
    api.f(
        "masked_select",
        "self, mask",
        "1-D tensor of the values where the bool `mask` is true.",
        |t: &mut T, m: T| tensor_result(t.0.f_masked_select(&m.0)),
    );
    api.f(
        "where",
        "condition, a: Tensor|number, b: Tensor|number",
        "Element-wise `a` where `condition` is true, else `b` (tensors or numbers).",
        |c: T, a: Dynamic, b: Dynamic| -> TR {
            let shape_of = |v: &Dynamic| v.read_lock::<RTensor>().map(|t| t.0.shallow_clone());
            let (ta, tb) = (shape_of(&a), shape_of(&b));
            match (ta, tb) {
                (Some(x), Some(y)) => tensor_result(x.f_where_self(&c.0, &y)),
                (Some(x), None) => tensor_result(x.f_where_self(&c.0, &num_of(&b)?)),
                (None, Some(y)) => tensor_result(num_of(&a)?.f_where_self(&c.0, &y)),
                (None, None) => tensor_result(num_of(&a)?.f_where_self(&c.0, &num_of(&b)?)),
            }
        },
    );
    api.f(
        "tril",
        "self, diagonal",
        "Lower triangle (entries above `diagonal` set to 0).",
        |t: &mut T, d: INT| tensor_result(t.0.f_tril(d)),
    );
    api.f(
        "triu",
        "self, diagonal",
        "Upper triangle (entries below `diagonal` set to 0).",
        |t: &mut T, d: INT| tensor_result(t.0.f_triu(d)),
    );
    api.f("flip", "self, dims", "Reverse the order of elements along `dims`.", |t: &mut T, d: Array| {
        tensor_result(t.0.f_flip(dims_arg(&d)?))
    });
}

/// One step of an index expression, applied at dimension `dim`.
enum Step {
    Select(i64),
    Slice(i64, i64),
    All,
}

fn step_of(v: &Dynamic) -> RResult<Step> {
    if let Ok(i) = v.as_int() {
        return Ok(Step::Select(i));
    }
    if v.is_unit() {
        return Ok(Step::All);
    }
    if let Some(r) = v.read_lock::<Range<INT>>() {
        return Ok(Step::Slice(r.start, r.end));
    }
    if let Some(r) = v.read_lock::<RangeInclusive<INT>>() {
        return Ok(Step::Slice(*r.start(), inclusive_end(*r.end())));
    }
    Err(rerr(format!(
        "index entries must be int, a range or () for a whole dimension, got {}",
        v.type_name()
    )))
}

/// `a..=-1` means "through the last element".
fn inclusive_end(e: INT) -> INT {
    if e == -1 {
        i64::MAX
    } else {
        e + 1
    }
}

fn apply_steps(t: &Tensor, steps: &[Step]) -> RResult<Tensor> {
    let mut out = t.shallow_clone();
    let mut dim = 0i64;
    for s in steps {
        if dim >= out.dim() as i64 {
            return Err(rerr(format!("too many indices for a tensor of {} dimension(s)", t.dim())));
        }
        out = match *s {
            Step::Select(i) => out.f_select(dim, i).rt()?,
            Step::Slice(a, b) => {
                dim += 1;
                out.f_slice(dim - 1, a, b, 1).rt()?
            }
            Step::All => {
                dim += 1;
                out
            }
        };
    }
    Ok(out)
}

fn view_at(t: &Tensor, index: &Dynamic) -> RResult<Tensor> {
    if let Some(a) = index.read_lock::<Array>() {
        let steps = a.iter().map(step_of).collect::<RResult<Vec<_>>>()?;
        return apply_steps(t, &steps);
    }
    apply_steps(t, &[step_of(index)?])
}

fn assign(view: &mut Tensor, value: &Dynamic) -> RResult<()> {
    if let Some(v) = value.read_lock::<RTensor>() {
        view.f_copy_(&v.0).rt()?;
    } else {
        let _ = view.f_fill_tensor_(&num_of(value)?).rt()?;
    }
    Ok(())
}

fn indexing(api: &mut Api) {
    api.group("Shape and indexing");
    api.index_get("`t[i]` selects along dimension 0 (negative counts from the end).", |t: &mut T, i: INT| {
        tensor_result(t.0.f_select(0, i))
    });
    api.index_get("`t[a..b]` slices dimension 0 (a view).", |t: &mut T, r: Range<INT>| {
        tensor_result(t.0.f_slice(0, r.start, r.end, 1))
    });
    api.index_get(
        "`t[a..=b]` slices dimension 0 inclusively (a view).",
        |t: &mut T, r: RangeInclusive<INT>| {
            tensor_result(t.0.f_slice(0, *r.start(), inclusive_end(*r.end()), 1))
        },
    );
    api.index_get("`t[[i, a..b, (), j]]` indexes several dimensions: ints select, ranges slice, `()` keeps a whole dimension.", |t: &mut T, a: Array| -> TR {
        Ok(RTensor(view_at(&t.0, &Dynamic::from_array(a))?))
    });
    api.index_get(
        "`t[mask]` with a bool tensor, as PyTorch: the mask's shape must equal t's leading dimensions, and the result is [matches, remaining dimensions...] (a copy); with an int64 tensor picks rows.",
        |t: &mut T, i: T| -> TR {
            if i.0.kind() == Kind::Bool {
                // Not masked_select: that broadcasts the mask, PyTorch's t[mask] does not.
                tensor_result(t.0.f_index(&[Some(i.0.shallow_clone())]))
            } else {
                tensor_result(t.0.f_index_select(0, &i.0.f_reshape([-1]).rt()?))
            }
        },
    );
    api.index_set(
        "`t[i] = v` writes a number or a (broadcast) tensor into the selected part, in place.",
        |t: &mut T, i: INT, v: Dynamic| -> RResult<()> { assign(&mut t.0.f_select(0, i).rt()?, &v) },
    );
    api.index_set(
        "`t[a..b] = v` writes into a slice of dimension 0, in place.",
        |t: &mut T, r: Range<INT>, v: Dynamic| -> RResult<()> {
            assign(&mut t.0.f_slice(0, r.start, r.end, 1).rt()?, &v)
        },
    );
    api.index_set(
        "`t[a..=b] = v` writes into an inclusive slice of dimension 0, in place.",
        |t: &mut T, r: RangeInclusive<INT>, v: Dynamic| -> RResult<()> {
            assign(&mut t.0.f_slice(0, *r.start(), inclusive_end(*r.end()), 1).rt()?, &v)
        },
    );
    api.index_set(
        "`t[[i, a..b]] = v` writes into a multi-dimensional selection, in place.",
        |t: &mut T, a: Array, v: Dynamic| -> RResult<()> {
            assign(&mut view_at(&t.0, &Dynamic::from_array(a))?, &v)
        },
    );
    api.index_set(
        "`t[mask] = v` writes a number or a tensor where the bool mask is true, in place (the mask's shape must equal t's leading dimensions, as in PyTorch).",
        |t: &mut T, m: T, v: Dynamic| -> RResult<()> {
            let idx = [Some(m.0.shallow_clone())];
            match v.read_lock::<RTensor>() {
                Some(src) => t.0.f_index_put_(&idx, &src.0, false).map(|_| ()).rt(),
                None => {
                    let value = num_of(&v)?.f_to_kind(t.0.kind()).rt()?;
                    t.0.f_index_put_(&idx, &value, false).map(|_| ()).rt()
                }
            }
        },
    );
}

/// Binary operators: (name, doc, tensor∘tensor, tensor∘number, number∘tensor).
/// Numbers arrive as wrapped-number 0-d tensors (`tensor::num`), so the
/// tensor overloads compute what the Scalar ones would and fail cleanly.
type BinTT = fn(&Tensor, &Tensor) -> Tch;
const BINOPS: &[(&str, &str, BinTT, BinTT, BinTT)] = &[
    ("+", "Element-wise sum.", |a, b| a.f_add(b), |a, s| a.f_add(s), |a, s| a.f_add(s)),
    ("-", "Element-wise difference.", |a, b| a.f_sub(b), |a, s| a.f_sub(s), |a, s| s.f_sub(a)),
    ("*", "Element-wise product.", |a, b| a.f_mul(b), |a, s| a.f_mul(s), |a, s| a.f_mul(s)),
    (
        "/",
        "Element-wise true division (always floating point).",
        |a, b| a.f_div(b),
        |a, s| a.f_div(s),
        |a, s| s.f_div(a),
    ),
    (
        "%",
        "Element-wise remainder with the sign of the divisor (Python's `%`).",
        |a, b| a.f_remainder_tensor(b),
        |a, s| a.f_remainder_tensor(s),
        |a, s| s.f_remainder_tensor(a),
    ),
    (
        "==",
        "Element-wise equality (a bool tensor).",
        |a, b| a.f_eq_tensor(b),
        |a, s| a.f_eq_tensor(s),
        |a, s| a.f_eq_tensor(s),
    ),
    (
        "!=",
        "Element-wise inequality (a bool tensor).",
        |a, b| a.f_ne_tensor(b),
        |a, s| a.f_ne_tensor(s),
        |a, s| a.f_ne_tensor(s),
    ),
    (
        "<",
        "Element-wise less-than (a bool tensor).",
        |a, b| a.f_lt_tensor(b),
        |a, s| a.f_lt_tensor(s),
        |a, s| a.f_gt_tensor(s),
    ),
    (
        "<=",
        "Element-wise less-or-equal (a bool tensor).",
        |a, b| a.f_le_tensor(b),
        |a, s| a.f_le_tensor(s),
        |a, s| a.f_ge_tensor(s),
    ),
    (
        ">",
        "Element-wise greater-than (a bool tensor).",
        |a, b| a.f_gt_tensor(b),
        |a, s| a.f_gt_tensor(s),
        |a, s| a.f_lt_tensor(s),
    ),
    (
        ">=",
        "Element-wise greater-or-equal (a bool tensor).",
        |a, b| a.f_ge_tensor(b),
        |a, s| a.f_ge_tensor(s),
        |a, s| a.f_le_tensor(s),
    ),
];

/// Named comparison methods mirroring the operators.
const COMPARISONS: &[(&str, &str)] =
    &[("eq", "=="), ("ne", "!="), ("lt", "<"), ("le", "<="), ("gt", ">"), ("ge", ">=")];

fn binop(name: &str) -> &'static (&'static str, &'static str, BinTT, BinTT, BinTT) {
    BINOPS.iter().find(|o| o.0 == name).expect("known operator")
}

fn arithmetic(api: &mut Api) {
    api.group("Arithmetic");
    for &(name, doc, tt, ts, st) in BINOPS {
        api.f(name, "a, b", doc, move |a: &mut T, b: T| tensor_result(tt(&a.0, &b.0)));
        api.f(name, "a, b", doc, move |a: &mut T, b: INT| tensor_result(num(b).and_then(|s| ts(&a.0, &s))));
        api.f(name, "a, b", doc, move |a: &mut T, b: FLOAT| tensor_result(num(b).and_then(|s| ts(&a.0, &s))));
        api.f(name, "a, b", doc, move |a: INT, b: T| tensor_result(num(a).and_then(|s| st(&b.0, &s))));
        api.f(name, "a, b", doc, move |a: FLOAT, b: T| tensor_result(num(a).and_then(|s| st(&b.0, &s))));
    }
    api.f("-", "a", "Element-wise negation.", |a: &mut T| tensor_result(a.0.f_neg()));
    type InPlace = fn(&mut Tensor, &Tensor) -> Tch;
    const IN_PLACE: &[(&str, &str, InPlace)] = &[
        ("add_", "In place: self += other; returns self.", |a, b| a.f_add_(b)),
        ("sub_", "In place: self -= other; returns self.", |a, b| a.f_sub_(b)),
        ("mul_", "In place: self *= other; returns self.", |a, b| a.f_mul_(b)),
        ("div_", "In place: self /= other; returns self.", |a, b| a.f_div_(b)),
    ];
    api.f(
        "relu_",
        "self",
        "In place: max(x, 0); returns self. Saves a copy when nothing else needs the input (a fresh layer output), as torch's `inplace=True`.",
        |a: &mut T| tensor_result(a.0.f_relu_()),
    );
    for &(name, doc, tt) in IN_PLACE {
        api.f(name, "self, other", doc, move |a: &mut T, b: T| tensor_result(tt(&mut a.0, &b.0)));
        api.f(name, "self, other", doc, move |a: &mut T, b: FLOAT| {
            tensor_result(num(b).and_then(|s| tt(&mut a.0, &s)))
        });
        api.f(name, "self, other", doc, move |a: &mut T, b: INT| {
            tensor_result(num(b).and_then(|s| tt(&mut a.0, &s)))
        });
    }
    api.f(
        "copy_",
        "self, src",
        "In place: copy (broadcast) `src` into self; returns self.",
        |a: &mut T, b: T| -> TR {
            a.0.f_copy_(&b.0).rt()?;
            Ok(a.clone())
        },
    );
    api.f(
        "fill_",
        "self, value: number",
        "In place: set every element to `value`; returns self.",
        |a: &mut T, v: Dynamic| -> TR { tensor_result(a.0.f_fill_tensor_(&num_of(&v)?)) },
    );
    api.f("zero_", "self", "In place: set every element to 0; returns self.", |a: &mut T| {
        tensor_result(a.0.f_zero_())
    });
    for &(name, op) in COMPARISONS {
        let (_, doc, tt, ts, _) = *binop(op);
        api.f(name, "self, other", doc, move |a: &mut T, b: T| tensor_result(tt(&a.0, &b.0)));
        api.f(name, "self, other", doc, move |a: &mut T, b: FLOAT| {
            tensor_result(num(b).and_then(|s| ts(&a.0, &s)))
        });
        api.f(name, "self, other", doc, move |a: &mut T, b: INT| {
            tensor_result(num(b).and_then(|s| ts(&a.0, &s)))
        });
    }
    api.f(
        "equal",
        "a, b",
        "True when both tensors have the same shape and values.",
        |a: T, b: T| -> RResult<bool> {
            Ok(a.0.f_size_checked().rt()? == b.0.f_size_checked().rt()? && a.0.f_equal(&b.0).rt()?)
        },
    );
    api.f(
        "allclose",
        "a, b, rtol, atol",
        "True when |a - b| <= atol + rtol * |b| everywhere.",
        |a: T, b: T, rtol: FLOAT, atol: FLOAT| -> RResult<bool> {
            a.0.f_allclose(&b.0, rtol, atol, false).rt()
        },
    );
}

type Unary = fn(&Tensor) -> Tch;
const UNARY: &[(&str, &str, Unary)] = &[
    ("abs", "Absolute value.", |t| t.f_abs()),
    ("sqrt", "Square root.", |t| t.f_sqrt()),
    ("rsqrt", "1 / sqrt(x).", |t| t.f_rsqrt()),
    ("exp", "e^x.", |t| t.f_exp()),
    ("log", "Natural logarithm.", |t| t.f_log()),
    ("log1p", "log(1 + x), accurate for small x.", |t| t.f_log1p()),
    ("sin", "Sine.", |t| t.f_sin()),
    ("cos", "Cosine.", |t| t.f_cos()),
    ("tanh", "Hyperbolic tangent.", |t| t.f_tanh()),
    ("sigmoid", "1 / (1 + e^-x).", |t| t.f_sigmoid()),
    ("relu", "max(x, 0).", |t| t.f_relu()),
    ("gelu", "GELU with the exact erf form.", |t| t.f_gelu("none")),
    ("silu", "x * sigmoid(x).", |t| t.f_silu()),
    ("square", "x * x.", |t| t.f_square()),
    ("sign", "-1, 0 or 1 by sign.", |t| t.f_sign()),
    ("floor", "Round down.", |t| t.f_floor()),
    ("ceil", "Round up.", |t| t.f_ceil()),
    ("round", "Round half to even.", |t| t.f_round()),
    ("reciprocal", "1 / x.", |t| t.f_reciprocal()),
    ("isnan", "True where the value is NaN.", |t| t.f_isnan()),
    ("isfinite", "True where the value is finite.", |t| t.f_isfinite()),
    ("logical_not", "Element-wise not (a bool tensor).", |t| t.f_logical_not()),
];

fn math(api: &mut Api) {
    api.group("Math");
    for &(name, doc, f) in UNARY {
        api.f(name, "self", doc, move |t: &mut T| tensor_result(f(&t.0)));
    }
    api.f(
        "gelu",
        "self, approximate",
        "GELU; `approximate` is `\"none\"` (exact) or `\"tanh\"`.",
        |t: &mut T, a: &str| tensor_result(t.0.f_gelu(a)),
    );
    api.f("pow", "self, exponent", "x raised to a float power.", |t: &mut T, e: FLOAT| {
        tensor_result(num(e).and_then(|s| t.0.f_pow(&s)))
    });
    api.f("pow", "self, exponent", "x raised to an int power.", |t: &mut T, e: INT| -> TR {
        // As pow(Tensor, Scalar): integers to negative integer powers are an error.
        if e < 0 && !t.0.f_is_floating_point().rt()? && !t.0.f_is_complex().rt()? {
            return Err(rerr("integers to negative integer powers are not allowed"));
        }
        tensor_result(num(e).and_then(|s| t.0.f_pow(&s)))
    });
    api.f("pow", "self, exponent", "x raised element-wise to a tensor of powers.", |t: &mut T, e: T| {
        tensor_result(t.0.f_pow(&e.0))
    });
    api.f(
        "clamp",
        "self, min: number, max: number",
        "Limit values to [min, max].",
        |t: &mut T, lo: Dynamic, hi: Dynamic| -> TR {
            tensor_result(t.0.f_clamp_tensor(Some(&num_of(&lo)?), Some(&num_of(&hi)?)))
        },
    );
    api.f("clamp_min", "self, min: number", "Limit values from below.", |t: &mut T, lo: Dynamic| -> TR {
        tensor_result(t.0.f_clamp_min_tensor(&num_of(&lo)?))
    });
    api.f("clamp_max", "self, max: number", "Limit values from above.", |t: &mut T, hi: Dynamic| -> TR {
        tensor_result(t.0.f_clamp_max_tensor(&num_of(&hi)?))
    });
    api.f("maximum", "a, b", "Element-wise maximum of two tensors.", |a: T, b: T| {
        tensor_result(a.0.f_maximum(&b.0))
    });
    api.f("minimum", "a, b", "Element-wise minimum of two tensors.", |a: T, b: T| {
        tensor_result(a.0.f_minimum(&b.0))
    });
    api.f("softmax", "self, dim", "Softmax along `dim`.", |t: &mut T, d: INT| {
        tensor_result(t.0.f_softmax(d, None::<Kind>))
    });
    api.f("log_softmax", "self, dim", "Log-softmax along `dim`.", |t: &mut T, d: INT| {
        tensor_result(t.0.f_log_softmax(d, None::<Kind>))
    });
    api.f(
        "matmul",
        "self, other",
        "Matrix product with broadcasting over batch dimensions.",
        |a: &mut T, b: T| tensor_result(a.0.f_matmul(&b.0)),
    );
    api.f("outer", "self, other", "Outer product of two vectors.", |a: &mut T, b: T| {
        tensor_result(a.0.f_outer(&b.0))
    });
    api.f("cumsum", "self, dim", "Cumulative sum along `dim`.", |t: &mut T, d: INT| {
        tensor_result(t.0.f_cumsum(d, None::<Kind>))
    });
    api.f("lerp", "self, end, weight", "self + weight * (end - self).", |t: &mut T, e: T, w: FLOAT| {
        // lerp's tensor weight must have the input's dtype.
        tensor_result(num(w).and_then(|w| w.f_to_kind(t.0.kind())).and_then(|w| t.0.f_lerp_tensor(&e.0, &w)))
    });
}

/// What libtorch's norm would refuse, refused first: norm takes its order as
/// a Scalar, and tch turns errors of Scalar-taking calls into panics
/// (`tensor::num`).
fn norm_checks(t: &Tensor, p: f64, dims: &[i64]) -> RResult<()> {
    if !t.f_is_floating_point().rt()? && !t.f_is_complex().rt()? {
        return Err(rerr(format!(
            "norm(): needs a floating-point tensor, got {}",
            kind_name(t.f_kind().rt()?)
        )));
    }
    let n = t.dim() as i64;
    let span = n.max(1);
    let mut seen = Vec::new();
    for &d in dims {
        if d < -span || d >= span {
            return Err(rerr(format!("norm(): dimension {d} out of range for a {n}-d tensor")));
        }
        let d = if d < 0 { d + span } else { d };
        if seen.contains(&d) {
            return Err(rerr(format!("norm(): dimension {d} appears more than once")));
        }
        seen.push(d);
    }
    // Negative and infinite orders have no identity over an empty reduction.
    let size = t.size();
    let empty =
        if dims.is_empty() { t.numel() == 0 } else { seen.iter().any(|&d| size.get(d as usize) == Some(&0)) };
    if empty && (p < 0.0 || p.is_infinite()) {
        return Err(rerr(format!("norm(): the {p} norm of an empty reduction is undefined")));
    }
    Ok(())
}

/// Reductions with a `sum(dims, keepdim)` form.
type DimReduce = fn(&Tensor, &[i64], bool) -> Tch;
type AllReduce = fn(&Tensor) -> Tch;
const REDUCTIONS: &[(&str, &str, AllReduce, DimReduce)] = &[
    ("sum", "Sum", |t| t.f_sum(None::<Kind>), |t, d, k| t.f_sum_dim_intlist(d, k, None::<Kind>)),
    (
        "mean",
        "Mean (floating-point tensors)",
        |t| t.f_mean(None::<Kind>),
        |t, d, k| t.f_mean_dim(d, k, None::<Kind>),
    ),
    (
        "std",
        "Standard deviation with Bessel's correction (like torch.std)",
        |t| t.f_std(true),
        |t, d, k| t.f_std_dim(d, true, k),
    ),
    (
        "variance",
        "Variance (`var` is a reserved word in Rhai) with Bessel's correction (like torch.var)",
        |t| t.f_var(true),
        |t, d, k| t.f_var_dim(d, true, k),
    ),
    (
        "logsumexp",
        "log(sum(exp(x)))",
        |t| t.f_reshape([-1])?.f_logsumexp([0i64].as_slice(), false),
        |t, d, k| t.f_logsumexp(d, k),
    ),
];

fn dims_of(v: &Dynamic) -> RResult<Vec<i64>> {
    if let Ok(d) = v.as_int() {
        return Ok(vec![d]);
    }
    match v.read_lock::<Array>() {
        Some(a) => dims_arg(&a),
        None => Err(rerr(format!("dim must be an int or an array of ints, got {}", v.type_name()))),
    }
}

fn reductions(api: &mut Api) {
    api.group("Reductions");
    for &(name, what, all, by_dim) in REDUCTIONS {
        let doc_all: &'static str =
            Box::leak(format!("{what} of all elements (a 0-d tensor).").into_boxed_str());
        let doc_dim: &'static str =
            Box::leak(format!("{what} along `dim` (an int or an array of ints).").into_boxed_str());
        let doc_keep: &'static str =
            Box::leak(format!("{what} along `dim`, keeping it with size 1 when `keepdim`.").into_boxed_str());
        api.f(name, "self", doc_all, move |t: &mut T| tensor_result(all(&t.0)));
        api.f(name, "self, dim: int|array", doc_dim, move |t: &mut T, d: Dynamic| {
            tensor_result(by_dim(&t.0, &dims_of(&d)?, false))
        });
        api.f(name, "self, dim: int|array, keepdim", doc_keep, move |t: &mut T, d: Dynamic, k: bool| {
            tensor_result(by_dim(&t.0, &dims_of(&d)?, k))
        });
    }
    type MaxMin =
        (&'static str, fn(&Tensor) -> Tch, fn(&Tensor, i64, bool) -> Result<(Tensor, Tensor), TchError>);
    const EXTREMA: &[MaxMin] = &[
        ("max", |t| t.f_max(), |t, d, k| t.f_max_dim(d, k)),
        ("min", |t| t.f_min(), |t, d, k| t.f_min_dim(d, k)),
    ];
    for &(name, all, by_dim) in EXTREMA {
        api.f(name, "self", "Largest (max) or smallest (min) element (a 0-d tensor).", move |t: &mut T| {
            tensor_result(all(&t.0))
        });
        api.f(
            name,
            "self, dim",
            "Extremum along `dim`: `#{ values, indices }`.",
            move |t: &mut T, d: INT| -> RResult<Map> {
                let (v, i) = by_dim(&t.0, d, false).rt()?;
                Ok(values_indices(v, i))
            },
        );
        api.f(
            name,
            "self, dim, keepdim",
            "Extremum along `dim`, keeping it when `keepdim`: `#{ values, indices }`.",
            move |t: &mut T, d: INT, k: bool| -> RResult<Map> {
                let (v, i) = by_dim(&t.0, d, k).rt()?;
                Ok(values_indices(v, i))
            },
        );
    }
    type Arg = (&'static str, fn(&Tensor, Option<i64>, bool) -> Tch);
    const ARGS: &[Arg] = &[("argmax", |t, d, k| t.f_argmax(d, k)), ("argmin", |t, d, k| t.f_argmin(d, k))];
    for &(name, f) in ARGS {
        api.f(name, "self", "Index of the extremum in the flattened tensor.", move |t: &mut T| {
            tensor_result(f(&t.0, None, false))
        });
        api.f(name, "self, dim", "Index of the extremum along `dim`.", move |t: &mut T, d: INT| {
            tensor_result(f(&t.0, Some(d), false))
        });
        api.f(
            name,
            "self, dim, keepdim",
            "Index of the extremum along `dim`, keeping it when `keepdim`.",
            move |t: &mut T, d: INT, k: bool| tensor_result(f(&t.0, Some(d), k)),
        );
    }
    api.f("norm", "self", "Euclidean (L2) norm of all elements.", |t: &mut T| tensor_result(t.0.f_norm()));
    api.f(
        "norm",
        "self, p: number",
        "p-norm of all elements (p = 1, 2, ...; use a float for other p).",
        |t: &mut T, p: Dynamic| -> TR {
            let p = as_number(&p, "p")?;
            norm_checks(&t.0, p, &[])?;
            tensor_result(
                t.0.f_reshape([-1]).and_then(|f| f.f_norm_scalaropt_dim(p, [0i64].as_slice(), false)),
            )
        },
    );
    api.f(
        "norm",
        "self, p: number, dim: int|array, keepdim",
        "p-norm along `dim`.",
        |t: &mut T, p: Dynamic, d: Dynamic, k: bool| -> TR {
            let p = as_number(&p, "p")?;
            let dims = dims_of(&d)?;
            norm_checks(&t.0, p, &dims)?;
            tensor_result(t.0.f_norm_scalaropt_dim(p, dims.as_slice(), k))
        },
    );
    api.f("all", "self", "True if every element is true (non-zero).", |t: &mut T| tensor_result(t.0.f_all()));
    api.f("any", "self", "True if any element is true (non-zero).", |t: &mut T| tensor_result(t.0.f_any()));
    api.f("count_nonzero", "self", "Number of non-zero elements (an int).", |t: &mut T| -> RResult<INT> {
        t.0.f_count_nonzero(None::<i64>).and_then(|c| c.f_int64_value(&[])).rt()
    });
}

fn selection(api: &mut Api) {
    api.group("Sorting and selection");
    api.f(
        "topk",
        "self, k",
        "The `k` largest values along the last dimension, sorted.",
        |t: &mut T, k: INT| -> RResult<Map> {
            let (v, i) = t.0.f_topk(k, -1, true, true).rt()?;
            Ok(values_indices(v, i))
        },
    );
    api.f(
        "topk",
        "self, k, dim, largest",
        "The `k` largest (or smallest) values along `dim`, sorted.",
        |t: &mut T, k: INT, d: INT, l: bool| -> RResult<Map> {
            let (v, i) = t.0.f_topk(k, d, l, true).rt()?;
            Ok(values_indices(v, i))
        },
    );
    api.f(
        "kthvalue",
        "self, k",
        "The k-th smallest value (1-based) along the last dimension.",
        |t: &mut T, k: INT| -> RResult<Map> {
            let (v, i) = t.0.f_kthvalue(k, -1, false).rt()?;
            Ok(values_indices(v, i))
        },
    );
    api.f(
        "kthvalue",
        "self, k, dim, keepdim",
        "The k-th smallest value (1-based) along `dim`.",
        |t: &mut T, k: INT, d: INT, kd: bool| -> RResult<Map> {
            let (v, i) = t.0.f_kthvalue(k, d, kd).rt()?;
            Ok(values_indices(v, i))
        },
    );
    api.f("sort", "self", "Ascending sort along the last dimension.", |t: &mut T| -> RResult<Map> {
        let (v, i) = t.0.f_sort(-1, false).rt()?;
        Ok(values_indices(v, i))
    });
    api.f(
        "sort",
        "self, dim, descending",
        "Sort along `dim`.",
        |t: &mut T, d: INT, desc: bool| -> RResult<Map> {
            let (v, i) = t.0.f_sort(d, desc).rt()?;
            Ok(values_indices(v, i))
        },
    );
    api.f(
        "argsort",
        "self, dim, descending",
        "Indices that sort along `dim` (stable).",
        |t: &mut T, d: INT, desc: bool| tensor_result(t.0.f_argsort_stable(true, d, desc)),
    );
}

fn autograd(api: &mut Api) {
    api.group("Autograd");
    api.f(
        "requires_grad",
        "self, on",
        "Start (or stop) recording operations on this tensor for gradients; returns it.",
        |t: &mut T, on: bool| tensor_result(t.0.f_set_requires_grad(on)),
    );
    api.get("requires_grad", "Whether gradients are recorded for this tensor.", |t: &mut T| {
        t.0.requires_grad()
    });
    api.get(
        "grad",
        "The accumulated gradient, or () before any backward().",
        |t: &mut T| -> RResult<Dynamic> {
            let g = t.0.f_grad().rt()?;
            Ok(if g.defined() { Dynamic::from(RTensor(g)) } else { Dynamic::UNIT })
        },
    );
    api.f("backward", "self", "Back-propagate from a one-element tensor.", |t: &mut T| -> RResult<()> {
        if t.0.numel() != 1 {
            return Err(rerr(format!(
                "backward() needs a one-element tensor, this one has {} elements",
                t.0.numel()
            )));
        }
        if !t.0.requires_grad() {
            return Err(rerr(
                "backward(): the tensor does not require grad (no input had requires_grad(true))",
            ));
        }
        t.0.f_backward().rt()
    });
    api.f("zero_grad", "self", "Reset the accumulated gradient to zero.", |t: &mut T| {
        let mut g = t.0.grad();
        if g.defined() {
            let _ = g.f_zero_();
        }
    });
    api.f("detach", "self", "The same values, cut from the gradient graph.", |t: &mut T| {
        tensor_result(t.0.f_detach())
    });
    api.f(
        "no_grad",
        "f",
        "Call `f` without recording gradients; returns its result.",
        |ctx: NativeCallContext, f: FnPtr| -> RResult<Dynamic> {
            let _guard = tch::no_grad_guard();
            f.call_within_context(&ctx, ())
        },
    );
}

fn files(api: &mut Api) {
    api.group("Files");
    api.f(
        "save",
        "tensor, path",
        "Write one tensor (named `tensor`) to a safetensors file, atomically. An existing path must be a regular file; a symbolic link or a missing folder is an error (see the form with options).",
        |t: T, path: &str| -> RResult<()> { save_tensor(&t, path, &Map::new()) },
    );
    api.f(
        "save",
        "tensor, path, options",
        "Write one tensor with `#{ mkdir: true }` (create missing folders) and/or `#{ follow_symlinks: true }` (write to the file a symbolic link names).",
        |t: T, path: &str, opts: Map| -> RResult<()> { save_tensor(&t, path, &opts) },
    );
    api.f(
        "save",
        "tensors, path",
        "Write a map of named tensors to a safetensors file, atomically.",
        |m: Map, path: &str| -> RResult<()> { save_map(&m, path, &Map::new(), &Map::new()) },
    );
    api.f(
        "save",
        "tensors, path, metadata",
        "Write named tensors and string metadata to a safetensors file.",
        |m: Map, path: &str, meta: Map| -> RResult<()> { save_map(&m, path, &meta, &Map::new()) },
    );
    api.f(
        "save",
        "tensors, path, metadata, options",
        "Write named tensors and metadata with `#{ mkdir, follow_symlinks }` as for a tensor.",
        |m: Map, path: &str, meta: Map, opts: Map| -> RResult<()> { save_map(&m, path, &meta, &opts) },
    );
    api.f(
        "load",
        "path",
        "Read a safetensors file into a map of tensors (on the CPU).",
        |path: &str| -> RResult<Map> {
            let l = crate::safetensors::load(Path::new(path)).rt()?;
            Ok(l.tensors.into_iter().map(|(n, t)| (n.into(), Dynamic::from(RTensor(t)))).collect())
        },
    );
    api.f(
        "load_tensor",
        "path",
        "Read a safetensors file that holds exactly one tensor.",
        |path: &str| -> TR {
            let mut l = crate::safetensors::load(Path::new(path)).rt()?;
            if l.tensors.len() != 1 {
                return Err(rerr(format!("{path}: holds {} tensors; use load() for a map", l.tensors.len())));
            }
            Ok(RTensor(l.tensors.remove(0).1))
        },
    );
    api.f(
        "load_metadata",
        "path",
        "The string metadata of a safetensors file.",
        |path: &str| -> RResult<Map> {
            let l = crate::safetensors::load(Path::new(path)).rt()?;
            Ok(l.metadata.into_iter().map(|(k, v)| (k.into(), Dynamic::from(v))).collect())
        },
    );
}

/// Where `save` may write: `#{ mkdir, follow_symlinks }` (both false by default).
pub fn save_target(opts: &Map) -> RResult<crate::safetensors::Target> {
    let mut t = crate::safetensors::Target::STRICT;
    for (k, v) in opts {
        let on = v.as_bool().map_err(|_| rerr(format!("save(): option '{k}' must be true or false")))?;
        match k.as_str() {
            "mkdir" => t.create_dirs = on,
            "follow_symlinks" => t.follow_symlinks = on,
            _ => return Err(rerr(format!("save(): unknown option '{k}' (valid: mkdir, follow_symlinks)"))),
        }
    }
    Ok(t)
}

fn save_tensor(t: &T, path: &str, opts: &Map) -> RResult<()> {
    let target = save_target(opts)?;
    crate::safetensors::save(Path::new(path), &[("tensor".into(), &t.0)], &BTreeMap::new(), target).rt()
}

fn save_map(m: &Map, path: &str, meta: &Map, opts: &Map) -> RResult<()> {
    let target = save_target(opts)?;
    let mut named = Vec::with_capacity(m.len());
    for (k, v) in m {
        let t = v
            .read_lock::<RTensor>()
            .map(|t| t.0.shallow_clone())
            .ok_or_else(|| rerr(format!("save(): entry '{k}' is {}, not a Tensor", v.type_name())))?;
        named.push((k.to_string(), t));
    }
    let refs: Vec<(String, &Tensor)> = named.iter().map(|(k, t)| (k.clone(), t)).collect();
    let meta: BTreeMap<String, String> = meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    crate::safetensors::save(Path::new(path), &refs, &meta, target).rt()
}
