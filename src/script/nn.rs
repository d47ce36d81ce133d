//! Layer functions over tensors, as `torch.nn.functional` defines them
//! (same argument order, defaults and semantics), for models written in
//! scripts. Each is one libtorch call (or a few), never a loop in Rhai.
use rhai::{Array, Dynamic, Engine, Map, FLOAT, INT};
use tch::{Reduction, Tensor};

use super::api::{Api, DocEntry};
use super::value::*;
use crate::tensor::num;

fn tensor_opt(o: &Map, k: &str) -> RResult<Option<Tensor>> {
    match o.get(k) {
        None => Ok(None),
        Some(v) if v.is_unit() => Ok(None),
        Some(v) => v
            .read_lock::<RTensor>()
            .map(|t| Some(t.0.shallow_clone()))
            .ok_or_else(|| rerr(format!("option {k} must be a Tensor, got {}", v.type_name()))),
    }
}

fn num_opt(o: &Map, k: &str, default: f64) -> RResult<f64> {
    o.get(k).map(|v| as_number(v, k)).transpose().map(|x| x.unwrap_or(default))
}

fn bool_opt(o: &Map, k: &str, default: bool) -> RResult<bool> {
    match o.get(k) {
        None => Ok(default),
        Some(v) => v.as_bool().map_err(|_| rerr(format!("option {k} must be true or false"))),
    }
}

/// An int or a pair `[h, w]` as two ints (PyTorch's `_pair`).
fn pair(v: &Dynamic, what: &str) -> RResult<Vec<i64>> {
    if let Ok(i) = v.as_int() {
        return Ok(vec![i, i]);
    }
    match v.read_lock::<Array>() {
        Some(a) if a.len() == 2 => a
            .iter()
            .map(|x| x.as_int().map_err(|_| rerr(format!("{what} must be an int or [int, int]"))))
            .collect(),
        _ => Err(rerr(format!("{what} must be an int or [int, int], got {}", v.type_name()))),
    }
}

fn pair_opt(o: &Map, k: &str, default: &[i64]) -> RResult<Vec<i64>> {
    o.get(k).map(|v| pair(v, k)).transpose().map(|x| x.unwrap_or_else(|| default.to_vec()))
}

fn ints(v: &Dynamic, what: &str) -> RResult<Vec<i64>> {
    if let Ok(i) = v.as_int() {
        return Ok(vec![i]);
    }
    match v.read_lock::<Array>() {
        Some(a) => dims_arg(&a),
        None => Err(rerr(format!("{what} must be an int or an array of ints"))),
    }
}

fn conv2d(x: &Tensor, w: &Tensor, o: &Map) -> RResult<RTensor> {
    check_keys(o, &["bias", "stride", "padding", "dilation", "groups"], "conv2d option")?;
    let groups =
        o.get("groups").map(|v| v.as_int().map_err(|_| rerr("groups must be an int"))).transpose()?;
    tensor_result(x.f_conv2d(
        w,
        tensor_opt(o, "bias")?.as_ref(),
        pair_opt(o, "stride", &[1, 1])?,
        pair_opt(o, "padding", &[0, 0])?,
        pair_opt(o, "dilation", &[1, 1])?,
        groups.unwrap_or(1),
    ))
}

fn max_pool2d(x: &Tensor, k: &Dynamic, o: &Map) -> RResult<RTensor> {
    check_keys(o, &["stride", "padding", "dilation", "ceil_mode"], "max_pool2d option")?;
    let kernel = pair(k, "kernel_size")?;
    tensor_result(x.f_max_pool2d(
        kernel.as_slice(),
        pair_opt(o, "stride", &kernel)?,
        pair_opt(o, "padding", &[0, 0])?,
        pair_opt(o, "dilation", &[1, 1])?,
        bool_opt(o, "ceil_mode", false)?,
    ))
}

fn avg_pool2d(x: &Tensor, k: &Dynamic, o: &Map) -> RResult<RTensor> {
    check_keys(o, &["stride", "padding", "ceil_mode", "count_include_pad"], "avg_pool2d option")?;
    let kernel = pair(k, "kernel_size")?;
    tensor_result(x.f_avg_pool2d(
        kernel.as_slice(),
        pair_opt(o, "stride", &kernel)?,
        pair_opt(o, "padding", &[0, 0])?,
        bool_opt(o, "ceil_mode", false)?,
        bool_opt(o, "count_include_pad", true)?,
        None,
    ))
}

fn batch_norm(x: &Tensor, o: &Map) -> RResult<RTensor> {
    check_keys(
        o,
        &["running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"],
        "batch_norm option",
    )?;
    let (rm, rv) = (tensor_opt(o, "running_mean")?, tensor_opt(o, "running_var")?);
    let training = bool_opt(o, "training", false)?;
    if !training && (rm.is_none() || rv.is_none()) {
        return Err(rerr("batch_norm: without training: true, running_mean and running_var are needed"));
    }
    tensor_result(Tensor::f_batch_norm(
        x,
        tensor_opt(o, "weight")?.as_ref(),
        tensor_opt(o, "bias")?.as_ref(),
        rm.as_ref(),
        rv.as_ref(),
        training,
        num_opt(o, "momentum", 0.1)?,
        num_opt(o, "eps", 1e-5)?,
        false,
    ))
}

fn layer_norm(x: &Tensor, shape: &Dynamic, o: &Map) -> RResult<RTensor> {
    check_keys(o, &["weight", "bias", "eps"], "layer_norm option")?;
    let shape = ints(shape, "normalized_shape")?;
    tensor_result(x.f_layer_norm(
        shape.as_slice(),
        tensor_opt(o, "weight")?.as_ref(),
        tensor_opt(o, "bias")?.as_ref(),
        num_opt(o, "eps", 1e-5)?,
        false,
    ))
}

/// Attention with the pattern made explicit: softmax(q kᵀ · scale + mask).
fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, o: &Map) -> RResult<Dynamic> {
    check_keys(
        o,
        &["causal", "scale", "mask", "dropout", "pattern", "train"],
        "scaled_dot_product_attention option",
    )?;
    let causal = bool_opt(o, "causal", false)?;
    let mask = tensor_opt(o, "mask")?;
    let p = num_opt(o, "dropout", 0.0)?;
    let scale = o.get("scale").map(|s| as_number(s, "scale")).transpose()?;
    if !bool_opt(o, "pattern", false)? {
        let train = bool_opt(o, "train", true)?;
        let p = if train { p } else { 0.0 };
        return Ok(Dynamic::from(tensor_result(Tensor::f_scaled_dot_product_attention(
            q,
            k,
            v,
            mask.as_ref(),
            p,
            causal,
            scale,
            false,
        ))?));
    }
    let d = *q.size().last().unwrap_or(&1);
    let scale = scale.unwrap_or(1.0 / (d as f64).sqrt());
    let go = || -> Result<(Tensor, Tensor), tch::TchError> {
        let mut s = q.f_matmul(&k.f_transpose(-2, -1)?)?.f_mul_scalar(scale)?;
        let (lq, lk) = (q.size()[q.dim() - 2], k.size()[k.dim() - 2]);
        if causal {
            let keep = Tensor::f_ones([lq, lk], (tch::Kind::Bool, q.device()))?.f_tril(0)?;
            s = s.f_masked_fill_tensor(&keep.f_logical_not()?, &num(f64::NEG_INFINITY)?)?;
        }
        if let Some(m) = &mask {
            s = if m.kind() == tch::Kind::Bool {
                s.f_masked_fill_tensor(&m.f_logical_not()?, &num(f64::NEG_INFINITY)?)?
            } else {
                s.f_add(m)?
            };
        }
        let pattern = s.f_softmax(-1, s.kind())?;
        let out = pattern.f_dropout(p, p > 0.0 && bool_opt(o, "train", true).unwrap_or(true))?.f_matmul(v)?;
        Ok((out, pattern))
    };
    let (out, pattern) = go().rt()?;
    Ok(Dynamic::from_map(map_of(vec![
        ("out", Dynamic::from(RTensor(out))),
        ("pattern", Dynamic::from(RTensor(pattern))),
    ])))
}

fn cross_entropy(logits: &Tensor, y: &Tensor, o: &Map) -> RResult<RTensor> {
    check_keys(o, &["ignore_index", "label_smoothing", "reduction", "weight"], "cross_entropy option")?;
    let reduction = match o.get("reduction").map(|r| expect_str(r, "reduction")).transpose()?.as_deref() {
        None | Some("mean") => Reduction::Mean,
        Some("sum") => Reduction::Sum,
        Some("none") => Reduction::None,
        Some(r) => return Err(rerr(format!("reduction must be mean, sum or none, got {r:?}"))),
    };
    let ignore = o
        .get("ignore_index")
        .map(|v| v.as_int().map_err(|_| rerr("ignore_index must be an int")))
        .transpose()?;
    let smoothing = num_opt(o, "label_smoothing", 0.0)?;
    if !(0.0..=1.0).contains(&smoothing) {
        return Err(rerr(format!("label_smoothing must be in [0, 1], got {smoothing}")));
    }
    tensor_result(logits.f_cross_entropy_loss(
        y,
        tensor_opt(o, "weight")?.as_ref(),
        reduction,
        ignore.unwrap_or(-100),
        smoothing,
    ))
}

pub fn register(engine: &mut Engine, docs: &mut Vec<DocEntry>) {
    let mut api = Api::new(engine, docs);
    api.group("Layers");
    api.f(
        "linear",
        "x, weight",
        "x · weightᵀ (weight [out, in]), as F.linear.",
        |x: RTensor, w: RTensor| tensor_result(x.0.f_linear::<&Tensor>(&w.0, None)),
    );
    api.f(
        "linear",
        "x, weight, bias",
        "x · weightᵀ + bias, as F.linear.",
        |x: RTensor, w: RTensor, b: RTensor| tensor_result(x.0.f_linear(&w.0, Some(&b.0))),
    );
    api.f("conv2d", "x, weight", "2-D convolution of x [B, C, H, W] by weight [out, C/groups, kh, kw], stride 1, no padding, as F.conv2d.", |x: RTensor, w: RTensor| {
        conv2d(&x.0, &w.0, &Map::new())
    });
    api.f(
        "conv2d",
        "x, weight, options: map",
        "F.conv2d with `#{ bias, stride, padding, dilation, groups }` (ints or [h, w]).",
        |x: RTensor, w: RTensor, o: Map| conv2d(&x.0, &w.0, &o),
    );
    api.f(
        "max_pool2d",
        "x, kernel_size",
        "Max pooling with stride = kernel_size, as F.max_pool2d.",
        |x: RTensor, k: Dynamic| max_pool2d(&x.0, &k, &Map::new()),
    );
    api.f(
        "max_pool2d",
        "x, kernel_size, options: map",
        "F.max_pool2d with `#{ stride, padding, dilation, ceil_mode }`.",
        |x: RTensor, k: Dynamic, o: Map| max_pool2d(&x.0, &k, &o),
    );
    api.f(
        "avg_pool2d",
        "x, kernel_size",
        "Average pooling with stride = kernel_size, as F.avg_pool2d.",
        |x: RTensor, k: Dynamic| avg_pool2d(&x.0, &k, &Map::new()),
    );
    api.f(
        "avg_pool2d",
        "x, kernel_size, options: map",
        "F.avg_pool2d with `#{ stride, padding, ceil_mode, count_include_pad }`.",
        |x: RTensor, k: Dynamic, o: Map| avg_pool2d(&x.0, &k, &o),
    );
    api.f("batch_norm", "x, options: map", "F.batch_norm with `#{ running_mean, running_var, weight, bias, training: false, momentum: 0.1, eps: 1e-5 }`; in training the running statistics (if given) are updated in place with the unbiased batch variance, as PyTorch does.", |x: RTensor, o: Map| {
        batch_norm(&x.0, &o)
    });
    api.f(
        "layer_norm",
        "x, normalized_shape: int|array",
        "F.layer_norm over the trailing dimensions (biased variance, eps 1e-5).",
        |x: RTensor, s: Dynamic| layer_norm(&x.0, &s, &Map::new()),
    );
    api.f(
        "layer_norm",
        "x, normalized_shape: int|array, options: map",
        "F.layer_norm with `#{ weight, bias, eps }`.",
        |x: RTensor, s: Dynamic, o: Map| layer_norm(&x.0, &s, &o),
    );
    api.f(
        "embedding",
        "ids, weight",
        "Rows of weight [V, D] picked by integer ids, as F.embedding.",
        |ids: RTensor, w: RTensor| tensor_result(Tensor::f_embedding(&w.0, &ids.0, -1, false, false)),
    );
    api.f("dropout", "x, p: float, train: bool", "F.dropout: zeroes elements with probability p and scales the rest by 1/(1-p) when `train`, the identity otherwise.", |x: RTensor, p: FLOAT, train: bool| -> RResult<RTensor> {
        if !(0.0..=1.0).contains(&p) {
            return Err(rerr(format!("dropout: p must be in [0, 1], got {p}")));
        }
        tensor_result(x.0.f_dropout(p, train))
    });
    api.f(
        "scaled_dot_product_attention",
        "q, k, v",
        "softmax(q kᵀ / sqrt(d)) v over the last two dimensions, fused (F.scaled_dot_product_attention).",
        |q: RTensor, k: RTensor, v: RTensor| sdpa(&q.0, &k.0, &v.0, &Map::new()),
    );
    api.f("scaled_dot_product_attention", "q, k, v, options: map", "Attention with `#{ causal, scale, mask (bool: true keeps; float: added), dropout, train }`; with `pattern: true` computed explicitly and returned as `#{ out, pattern }` (the attention probabilities, for interpretability).", |q: RTensor, k: RTensor, v: RTensor, o: Map| {
        sdpa(&q.0, &k.0, &v.0, &o)
    });
    api.f(
        "einsum",
        "equation: str, tensors: array",
        "Einstein summation, as torch.einsum (`\"bij,bjk->bik\"`).",
        |eq: &str, ts: Array| -> RResult<RTensor> {
            let ts = tensors_arg(&ts, "einsum")?;
            tensor_result(Tensor::f_einsum(eq, &ts, None::<&[i64]>))
        },
    );
    api.f("multinomial", "probs, n: int", "n draws per row of non-negative weights, without replacement, as torch.multinomial (uses the global generator: `manual_seed`).", |p: RTensor, n: INT| {
        tensor_result(p.0.f_multinomial(n, false))
    });
    api.f(
        "multinomial",
        "probs, n: int, replacement: bool",
        "torch.multinomial with or without replacement.",
        |p: RTensor, n: INT, r: bool| tensor_result(p.0.f_multinomial(n, r)),
    );
    api.f("cross_entropy", "logits, targets", "Mean cross-entropy of logits [N, C] (or [N, C, d...]) against class ids, as F.cross_entropy (ignore_index -100).", |l: RTensor, y: RTensor| {
        cross_entropy(&l.0, &y.0, &Map::new())
    });
    api.f("cross_entropy", "logits, targets, options: map", "F.cross_entropy with `#{ ignore_index, label_smoothing, reduction: \"mean\"|\"sum\"|\"none\", weight }`.", |l: RTensor, y: RTensor, o: Map| {
        cross_entropy(&l.0, &y.0, &o)
    });
}
