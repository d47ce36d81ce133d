//! Models defined in scripts: a builder registers parameters in the same
//! flat [`ParamStore`] the built-in models use, and a forward closure maps a
//! batch to logits. The result is an ordinary `Model`, so optimizers (and
//! their parameter groups), pruners, `train()`, checkpoints, `matrix()` and
//! hooks treat it as they treat LeNet-5 (`docs/scripts.md`).
// rhai marks NativeCallContextStore (the `internals` feature) as volatile
// through `deprecated`; Cargo.lock pins the rhai version it was written for.
#![allow(deprecated)]
use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::rc::Rc;

use rhai::{
    Array, Dynamic, Engine, EvalAltResult, FnPtr, Map, NativeCallContext, NativeCallContextStore, INT,
};
use serde_json::{json, Value};
use tch::{Device, TchError, Tensor};

use super::api::{Api, DocEntry};
use super::models::RModel;
use super::reentry;
use super::value::*;
use crate::hooks::Hooks;
use crate::models::{Model, Task};
use crate::params::{default_bound, Init, ParamStore, Role};
use crate::tensor::parse_device_or_auto;

/// A model whose forward is a script closure `|x, train| ...` (or `|x|`).
pub struct ScriptModel {
    arch: &'static str,
    task: Task,
    store: ParamStore,
    forward: FnPtr,
    /// Where `build()` was called: the closure runs with its imports.
    at: NativeCallContextStore,
    /// Parameters the closure takes, learnt on the first call (0: unknown).
    arity: Cell<u8>,
    hook_names: Rc<[String]>,
    config: Value,
}

/// Architecture names live as long as the process (`Model::arch` is
/// `&'static str`); each distinct name is leaked once.
fn intern(name: &str) -> &'static str {
    thread_local!(static NAMES: RefCell<HashSet<&'static str>> = RefCell::new(HashSet::new()));
    NAMES.with(|n| {
        let mut n = n.borrow_mut();
        if let Some(s) = n.get(name) {
            return *s;
        }
        let s: &'static str = Box::leak(name.to_string().into_boxed_str());
        n.insert(s);
        s
    })
}

fn kind_err(arch: &str, msg: impl std::fmt::Display) -> TchError {
    TchError::Torch(format!("forward of script model '{arch}': {msg}"))
}

impl ScriptModel {
    fn call(&self, x: &Tensor, train: bool) -> Result<Dynamic, Box<EvalAltResult>> {
        let xd = || RTensor(x.shallow_clone());
        let missing = |e: &EvalAltResult| matches!(e, EvalAltResult::ErrorFunctionNotFound(sig, _) if sig.starts_with(self.forward.fn_name()));
        match self.arity.get() {
            2 => reentry::call(&self.forward, &self.at, (xd(), train)),
            1 => reentry::call(&self.forward, &self.at, (xd(),)),
            _ => match reentry::call(&self.forward, &self.at, (xd(), train)) {
                // The closure takes only the batch.
                Err(e) if missing(&e) => {
                    let r = reentry::call(&self.forward, &self.at, (xd(),));
                    if r.is_ok() {
                        self.arity.set(1);
                    }
                    r
                }
                r => {
                    self.arity.set(2);
                    r
                }
            },
        }
    }

    fn run(&self, x: &Tensor, train: bool, hooks: Option<&dyn Hooks>) -> Result<Tensor, TchError> {
        let _frame = reentry::push_frame(self.arch, self.hook_names.clone(), hooks);
        let out = self.call(x, train).map_err(|e| kind_err(self.arch, e))?;
        let Some(t) = out.read_lock::<RTensor>().map(|t| t.0.shallow_clone()) else {
            return Err(kind_err(
                self.arch,
                format!("the closure must return a Tensor, got {}", out.type_name()),
            ));
        };
        let (xs, ts) = (x.size(), t.size());
        let ok = match self.task {
            Task::Classify { classes } => ts.len() == 2 && ts[0] == xs[0] && ts[1] == classes,
            Task::LanguageModel { vocab, .. } => {
                ts.len() == 3 && ts[..2] == xs[..2.min(xs.len())] && ts[2] == vocab
            }
        };
        if !ok {
            let want = match self.task {
                Task::Classify { classes } => format!("[B, {classes}]"),
                Task::LanguageModel { vocab, .. } => format!("[B, T, {vocab}]"),
            };
            return Err(kind_err(
                self.arch,
                format!("logits have shape {ts:?} for input {xs:?}, expected {want}"),
            ));
        }
        Ok(t)
    }
}

impl Model for ScriptModel {
    fn arch(&self) -> &'static str {
        self.arch
    }
    fn task(&self) -> Task {
        self.task
    }
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor, TchError> {
        self.run(x, train, None)
    }
    fn forward_hooked(&self, x: &Tensor, train: bool, hooks: Option<&dyn Hooks>) -> Result<Tensor, TchError> {
        self.run(x, train, hooks)
    }
    fn hook_names(&self) -> Vec<String> {
        self.hook_names.to_vec()
    }
    fn store(&self) -> &ParamStore {
        &self.store
    }
    fn store_mut(&mut self) -> &mut ParamStore {
        &mut self.store
    }
    fn config(&self) -> Value {
        self.config.clone()
    }
}

/// A model under construction.
struct Building {
    arch: String,
    task: Task,
    device: Device,
    store: ParamStore,
    hooks: Vec<String>,
    config: Value,
}

/// `model_builder()`'s handle; empty once `build()` took the parameters.
#[derive(Clone)]
pub struct RBuilder(Rc<RefCell<Option<Building>>>);

impl RBuilder {
    fn with<T>(&self, f: impl FnOnce(&mut Building) -> RResult<T>) -> RResult<T> {
        let mut b = self.0.try_borrow_mut().map_err(|_| rerr("the model builder is busy"))?;
        match b.as_mut() {
            Some(b) => f(b),
            None => Err(rerr("this model builder was already built; make a new one with model_builder()")),
        }
    }
}

const BUILDER_KEYS: &[&str] =
    &["arch", "classes", "vocab", "block_size", "device", "seed", "hooks", "config"];
const PARAM_KEYS: &[&str] = &["init", "std", "bound", "fan_in", "role", "prunable"];

fn int_key(o: &Map, k: &str) -> RResult<Option<i64>> {
    o.get(k).map(|v| v.as_int().map_err(|_| rerr(format!("model_builder(): {k} must be an int")))).transpose()
}

fn names_arg(v: &Dynamic, what: &str) -> RResult<Vec<String>> {
    let a = v.read_lock::<Array>().ok_or_else(|| rerr(format!("{what} must be an array of strings")))?;
    a.iter().map(|s| expect_str(s, what)).collect()
}

fn new_builder(o: &Map) -> RResult<RBuilder> {
    check_keys(o, BUILDER_KEYS, "model_builder()")?;
    let arch = match o.get("arch") {
        Some(a) => expect_str(a, "arch")?,
        None => "script".into(),
    };
    if arch.is_empty() || !arch.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)) {
        return Err(rerr(format!("model_builder(): arch '{arch}' must be letters, digits, '_', '-' or '.'")));
    }
    let (classes, vocab, block) = (int_key(o, "classes")?, int_key(o, "vocab")?, int_key(o, "block_size")?);
    let task = match (classes, vocab, block) {
        (Some(c), None, None) if c >= 1 => Task::Classify { classes: c },
        (None, Some(v), Some(b)) if v >= 1 && b >= 1 => Task::LanguageModel { vocab: v, block_size: b },
        _ => {
            return Err(rerr(
                "model_builder(): give `classes` (>= 1) for a classifier, or `vocab` and `block_size` (>= 1) for a language model",
            ))
        }
    };
    let device = match o.get("device") {
        Some(d) => parse_device_or_auto(&expect_str(d, "device")?).rt()?,
        None => Device::Cpu,
    };
    if let Some(s) = o.get("seed") {
        tch::manual_seed(s.as_int().map_err(|_| rerr("model_builder(): seed must be an int"))?);
    }
    let hooks = match o.get("hooks") {
        Some(h) => names_arg(h, "model_builder(): hooks")?,
        None => Vec::new(),
    };
    let extra: Value = match o.get("config") {
        Some(c) => rhai::serde::from_dynamic(c).map_err(|e| rerr(format!("model_builder(): config: {e}")))?,
        None => Value::Null,
    };
    let config = match task {
        Task::Classify { classes } => json!({ "script": true, "classes": classes, "config": extra }),
        Task::LanguageModel { vocab, block_size } => {
            json!({ "script": true, "vocab": vocab, "block_size": block_size, "config": extra })
        }
    };
    Ok(RBuilder(Rc::new(RefCell::new(Some(Building {
        arch,
        task,
        device,
        store: ParamStore::new(),
        hooks,
        config,
    })))))
}

/// The role a parameter gets from its options; the default is "weight" for
/// 2+ dimensions and "bias" for fewer.
fn param_role(o: &Map, dims: usize) -> RResult<Role> {
    let role = match o.get("role") {
        Some(r) => {
            let s = expect_str(r, "role")?;
            serde_json::from_value::<Role>(json!(s)).map_err(|_| {
                rerr(format!("unknown role '{s}' (valid: weight, embedding, bias, norm, gate)"))
            })?
        }
        None if dims >= 2 => Role::Weight,
        None => Role::Bias,
    };
    let prunable = match o.get("prunable") {
        Some(p) => Some(p.as_bool().map_err(|_| rerr("prunable must be a bool"))?),
        None => None,
    };
    match (role, prunable) {
        // A weight kept from pruning still decays: the flat layout's
        // embedding range is exactly that.
        (Role::Weight, Some(false)) => Ok(Role::Embedding),
        (Role::Weight, _) | (_, None) | (_, Some(false)) => Ok(role),
        (r, Some(true)) => Err(rerr(format!(
            "only role \"weight\" parameters can be pruned (this one is {:?})",
            format!("{r:?}").to_lowercase()
        ))),
    }
}

/// The initial values of a parameter from its options.
fn param_init(o: &Map, shape: &[i64]) -> RResult<Result<Init, Tensor>> {
    let num = |k: &str| o.get(k).map(|v| as_number(v, k)).transpose();
    let fan_in = match num("fan_in")? {
        Some(f) => f,
        None => shape.iter().skip(1).product::<i64>().max(1) as f64,
    };
    let init = match o.get("init") {
        Some(v) if v.is::<RTensor>() => {
            let t = v.read_lock::<RTensor>().map(|t| t.0.shallow_clone()).unwrap_or_else(Tensor::new);
            if t.size() != shape {
                return Err(rerr(format!("init tensor has shape {:?}, the parameter {shape:?}", t.size())));
            }
            if !t.f_is_floating_point().rt()? {
                return Err(rerr("init tensor must be floating point"));
            }
            let t = t
                .f_detach()
                .and_then(|t| t.f_to_device(Device::Cpu))
                .and_then(|t| crate::tensor::deep_copy(&t))
                .rt()?;
            return Ok(Err(t));
        }
        Some(v) => expect_str(v, "init")?,
        None if shape.len() >= 2 => "default".into(),
        None => "zeros".into(),
    };
    let std = num("std")?;
    let bound = num("bound")?;
    let need = |what: Option<f64>, k: &str| {
        what.filter(|x| x.is_finite() && *x >= 0.0)
            .ok_or_else(|| rerr(format!("init \"{init}\" needs `{k}` (a number >= 0)")))
    };
    Ok(Ok(match init.as_str() {
        "zeros" => Init::Zeros,
        "ones" => Init::Ones,
        "normal" => Init::Normal { std: need(std, "std")? },
        "uniform" => Init::Uniform { bound: need(bound, "bound")? },
        // PyTorch's default for Linear/Conv weights and their biases.
        "default" => Init::Uniform { bound: default_bound(fan_in as i64) },
        "kaiming_normal_fan_out" => Init::KaimingNormalFanOut,
        other => {
            return Err(rerr(format!(
                "unknown init '{other}' (valid: default, zeros, ones, normal, uniform, kaiming_normal_fan_out, or a Tensor)"
            )))
        }
    }))
}

fn add_param(b: &RBuilder, name: &str, shape: &Array, o: &Map) -> RResult<RTensor> {
    check_keys(o, PARAM_KEYS, "param()")?;
    let shape = shape_arg(shape, false)?;
    let role = param_role(o, shape.len())?;
    let init = param_init(o, &shape)?;
    b.with(|b| {
        let t = match init {
            Ok(init) => b.store.param(name, &shape, init, role),
            Err(value) => b.store.param_value(name, value, role),
        };
        t.map(RTensor).map_err(|e| rerr(format!("param(): {e}")))
    })
}

fn build(ctx: &NativeCallContext, b: &RBuilder, forward: FnPtr) -> RResult<RModel> {
    let mut slot = b.0.try_borrow_mut().map_err(|_| rerr("the model builder is busy"))?;
    let Some(bd) = slot.take() else {
        return Err(rerr("this model builder was already built; make a new one with model_builder()"));
    };
    if bd.store.params().is_empty() {
        *slot = Some(bd);
        return Err(rerr("build(): the model has no parameters (add them with param())"));
    }
    let Building { arch, task, device, mut store, hooks, config } = bd;
    store.finalize(device).rt()?;
    let m = ScriptModel {
        arch: intern(&arch),
        task,
        store,
        forward,
        at: ctx.store_data(),
        arity: Cell::new(0),
        hook_names: hooks.into(),
        config,
    };
    Ok(RModel(Rc::new(RefCell::new(Box::new(m)))))
}

/// `hook(name, x)` inside a script model's forward.
fn hook_point(name: &str, x: RTensor) -> RResult<RTensor> {
    let Some(frame) = reentry::current_frame() else {
        // Outside a script model's forward (a block tried on its own).
        return Ok(x);
    };
    if !frame.names.iter().any(|n| n == name) {
        return Err(rerr(format!(
            "hook('{name}'): not a hook point of script model '{}' (declared: {}; add it to model_builder's `hooks`)",
            frame.arch,
            if frame.names.is_empty() { "none".to_string() } else { frame.names.join(", ") }
        )));
    }
    match frame.hooks() {
        Some(h) if h.wants(name) => Ok(h.call(name, &x.0).rt()?.map(RTensor).unwrap_or(x)),
        _ => Ok(x),
    }
}

fn describe(b: &RBuilder) -> String {
    match b.0.try_borrow().ok().as_deref() {
        Some(Some(b)) => format!("ModelBuilder({}, {} parameters)", b.arch, b.store.numel()),
        Some(None) => "ModelBuilder(<built>)".into(),
        None => "ModelBuilder(<busy>)".into(),
    }
}

pub fn register(engine: &mut Engine, docs: &mut Vec<DocEntry>) {
    engine.register_type_with_name::<RBuilder>("ModelBuilder");
    engine.register_fn("to_string", |b: &mut RBuilder| describe(b));
    engine.register_fn("to_debug", |b: &mut RBuilder| describe(b));
    let mut api = Api::new(engine, docs);
    api.group("Script models");
    api.f("model_builder", "options: map", "Start a model defined in the script: `#{ arch: \"script\", classes }` for a classifier or `#{ arch, vocab, block_size }` for a language model, with `device` (default cpu), `seed` (seeds the initial weights), `hooks` (names `hook()` may visit) and `config` (a map kept in run records). Add parameters with `param()`, then `build(forward)` (docs/scripts.md).", |o: Map| new_builder(&o));
    api.f(
        "param",
        "self, name, shape: array",
        "Register a trainable float32 parameter and return it: \"default\" init (PyTorch's uniform ±1/sqrt(fan_in)) and role \"weight\" for 2+ dimensions, zeros and role \"bias\" otherwise.",
        |b: &mut RBuilder, name: &str, shape: Array| add_param(b, name, &shape, &Map::new()),
    );
    api.f("param", "self, name, shape: array, options: map", "Register a parameter with `#{ init: \"default\"|\"zeros\"|\"ones\"|\"normal\"|\"uniform\"|\"kaiming_normal_fan_out\"|Tensor, std, bound, fan_in, role: \"weight\"|\"embedding\"|\"bias\"|\"norm\"|\"gate\", prunable }`: weights and embeddings take weight decay, only prunable weights are pruned (`prunable: false` keeps a weight from pruning).", |b: &mut RBuilder, name: &str, shape: Array, o: Map| add_param(b, name, &shape, &o));
    api.f(
        "buffer",
        "self, name, value: Tensor",
        "Register a tensor saved with the model but not trained (running statistics); returns it.",
        |b: &mut RBuilder, name: &str, v: RTensor| -> RResult<RTensor> {
            let t =
                v.0.f_detach()
                    .and_then(|t| t.f_to_device(Device::Cpu))
                    .and_then(|t| crate::tensor::deep_copy(&t))
                    .rt()?;
            b.with(|b| b.store.buffer(name, t).map(RTensor).map_err(|e| rerr(format!("buffer(): {e}"))))
        },
    );
    api.f(
        "hook_point",
        "self, name",
        "Declare a hook point the forward visits with `hook(name, x)` (as the `hooks` option does).",
        |b: &mut RBuilder, name: &str| -> RResult<()> {
            b.with(|b| {
                if !b.hooks.iter().any(|h| h == name) {
                    b.hooks.push(name.to_string());
                }
                Ok(())
            })
        },
    );
    api.get("num_params", "Parameters registered so far.", |b: &mut RBuilder| -> RResult<INT> {
        b.with(|b| Ok(b.store.numel()))
    });
    api.f("build", "self, forward: closure", "Finish the model: parameters move to the device into flat buffers (every tensor `param()` returned follows), and `forward` — `|x, train| logits` or `|x| logits` — becomes the model's forward. The Model works with optimizers, pruners, train(), checkpoints, matrix() and hooks.", |ctx: NativeCallContext, b: &mut RBuilder, f: FnPtr| build(&ctx, b, f));
    api.f("hook", "name, x", "Inside a script model's forward: the activation `x` at hook point `name`, or what a hook put in its place (run_with_cache, add_hook, patching). Elsewhere returns `x`.", |name: &str, x: RTensor| hook_point(name, x));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_follow_shape_and_prunable() {
        let m = |pairs: Vec<(&str, Dynamic)>| map_of(pairs);
        assert_eq!(param_role(&Map::new(), 2).unwrap(), Role::Weight);
        assert_eq!(param_role(&Map::new(), 1).unwrap(), Role::Bias);
        assert_eq!(param_role(&m(vec![("prunable", Dynamic::FALSE)]), 2).unwrap(), Role::Embedding);
        assert_eq!(param_role(&m(vec![("role", Dynamic::from("norm"))]), 1).unwrap(), Role::Norm);
        let e = param_role(&m(vec![("role", Dynamic::from("bias")), ("prunable", Dynamic::TRUE)]), 1);
        assert!(e.unwrap_err().to_string().contains("only role \"weight\""));
        let e = param_role(&m(vec![("role", Dynamic::from("wieght"))]), 2);
        assert!(e.unwrap_err().to_string().contains("unknown role 'wieght'"));
    }

    #[test]
    fn inits_need_their_numbers() {
        let m = |pairs: Vec<(&str, Dynamic)>| map_of(pairs);
        let e = param_init(&m(vec![("init", Dynamic::from("normal"))]), &[2, 2]).err().unwrap();
        assert!(e.to_string().contains("needs `std`"), "{e}");
        match param_init(&Map::new(), &[4, 9]).unwrap() {
            Ok(Init::Uniform { bound }) => assert!((bound - 1.0 / 3.0).abs() < 1e-12),
            _ => panic!("default init of a matrix is uniform ±1/sqrt(fan_in)"),
        }
    }
}
