//! Models in scripts: constructors with validated option maps, forward,
//! parameters, loss, evaluation, save and load.
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;

use rhai::{Array, Dynamic, Engine, Map, NativeCallContext, INT};
use serde::de::DeserializeOwned;
use tch::Device;

use super::api::{Api, DocEntry};
use super::value::*;
use crate::models::{gpt2, lenet5, resnet, Model, Task};
use crate::tensor::{device_name, parse_device_or_auto};

/// A model held by a script; clones share it.
#[derive(Clone)]
pub struct RModel(pub Rc<RefCell<Box<dyn Model>>>);

impl RModel {
    pub fn borrow(&self) -> RResult<std::cell::Ref<'_, Box<dyn Model>>> {
        self.0.try_borrow().map_err(|_| rerr("the model is busy"))
    }

    pub fn borrow_mut(&self) -> RResult<std::cell::RefMut<'_, Box<dyn Model>>> {
        self.0.try_borrow_mut().map_err(|_| rerr("the model is busy"))
    }
}

/// Options every constructor takes besides the architecture's own.
const COMMON: &[&str] = &["device", "seed"];

/// Split `device`/`seed` from an option map and deserialize the rest into
/// the architecture's config; unknown keys list the valid ones.
fn model_opts<C: DeserializeOwned + serde::Serialize + Default>(
    opts: &Map,
    what: &str,
) -> RResult<(C, Device)> {
    let mut rest = opts.clone();
    let device = match rest.remove("device") {
        Some(d) => parse_device_or_auto(&expect_str(&d, "device")?).rt()?,
        None => Device::Cpu,
    };
    if let Some(s) = rest.remove("seed") {
        let s = s.as_int().map_err(|_| rerr("seed must be an int"))?;
        tch::manual_seed(s);
    }
    let cfg: C = rhai::serde::from_dynamic(&Dynamic::from_map(rest)).map_err(|e| {
        let fields = serde_json::to_value(C::default())
            .ok()
            .and_then(|v| v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()))
            .unwrap_or_default();
        let mut valid: Vec<String> = fields.into_iter().chain(COMMON.iter().map(|s| s.to_string())).collect();
        valid.sort();
        rerr(format!("{what} options: {} (valid keys: {})", clean_serde(&e.to_string()), valid.join(", ")))
    })?;
    Ok((cfg, device))
}

/// serde's messages mention Rust; keep the part about the key.
fn clean_serde(msg: &str) -> String {
    msg.split(", expected one of").next().unwrap_or(msg).split(" (line").next().unwrap_or(msg).to_string()
}

fn finish(mut m: Box<dyn Model>, device: Device) -> RResult<RModel> {
    m.store_mut().finalize(device).rt()?;
    Ok(RModel(Rc::new(RefCell::new(m))))
}

pub fn register(engine: &mut Engine, docs: &mut Vec<DocEntry>) {
    engine.register_type_with_name::<RModel>("Model");
    engine.register_fn("to_string", |m: &mut RModel| describe(m));
    engine.register_fn("to_debug", |m: &mut RModel| describe(m));
    let mut api = Api::new(engine, docs);
    api.group("Models");
    api.f("lenet5", "options: map", "LeNet-5 with batch norm for 1x32x32 images: `#{ classes: 10, in_channels: 1, device: \"cpu\", seed }` (61,750 parameters at 10 classes).", |o: Map| -> RResult<RModel> {
        let (c, d): (lenet5::Config, _) = model_opts(&o, "lenet5")?;
        finish(Box::new(lenet5::LeNet5::new(c).rt()?), d)
    });
    api.f("lenet5", "", "LeNet-5 with 10 classes on the CPU.", || -> RResult<RModel> {
        finish(Box::new(lenet5::LeNet5::new(lenet5::Config::default()).rt()?), Device::Cpu)
    });
    api.f(
        "resnet18",
        "options: map",
        "ResNet-18 with the CIFAR stem: `#{ classes: 10, in_channels: 3, device, seed }`.",
        |o: Map| -> RResult<RModel> { resnet_with(o, 18, "resnet18") },
    );
    api.f(
        "resnet50",
        "options: map",
        "ResNet-50 (bottleneck, ImageNet stem): `#{ classes: 1000, in_channels: 3, device, seed }`.",
        |o: Map| -> RResult<RModel> { resnet_with(o, 50, "resnet50") },
    );
    api.f("resnet", "options: map", "Any ResNet: `#{ depth: 18|34|50|101|152, classes, in_channels, stem: \"cifar\"|\"imagenet\", device, seed }`.", |o: Map| -> RResult<RModel> {
        let (c, d): (resnet::Config, _) = model_opts(&o, "resnet")?;
        finish(Box::new(resnet::ResNet::new(c).rt()?), d)
    });
    api.f("gpt2", "options: map", "GPT-2 (nanoGPT): `#{ preset: \"124M\"|\"350M\"|\"774M\"|\"1558M\", n_layer, n_head, n_embd, block_size: 1024, vocab_size: 50257, padded_vocab_size, dropout: 0.0, bias: true, tie_weights: true, device, seed }`; attention variants: `attention: \"mha\"|\"ra\"|\"mla\"|\"mla_decoupled\"|\"ra_mla\"|\"mla_kvsplice\"|\"ra_mla_kvsplice\"|\"sba\"|\"ra_route\"|\"kv_tying\"|\"kv_tying_t\"`, axis overrides `direction`, `kv`, `q`, `rope` (false|true|\"decoupled\"), and `d_latent: 256, splice_ratio: 0.5, rope_theta, ra_balance_weight: 0.01, route_head_frac, route_penalty, route_warmup_drop, route_skip_warmup, mlp: \"gelu\"|\"splice\", mlp_hidden, mlp_latent, embed_latent, golden_ratio, fisher_metrics` (docs/attention.md).", |o: Map| -> RResult<RModel> {
        let (c, d): (gpt2::Config, _) = model_opts(&o, "gpt2")?;
        finish(Box::new(gpt2::Gpt2::new(c).rt()?), d)
    });
    api.get(
        "arch",
        "Architecture name (`lenet5`, `resnet18`, `gpt2`, ...).",
        |m: &mut RModel| -> RResult<String> { Ok(m.borrow()?.arch().to_string()) },
    );
    api.get(
        "num_params",
        "Number of trainable parameters (tied weights counted once).",
        |m: &mut RModel| -> RResult<INT> { Ok(m.borrow()?.store().numel()) },
    );
    api.get("device", "The device the model lives on.", |m: &mut RModel| -> RResult<String> {
        Ok(device_name(m.borrow()?.store().device()))
    });
    api.get(
        "config",
        "The configuration the model was built from, as a map.",
        |m: &mut RModel| -> RResult<Dynamic> {
            rhai::serde::to_dynamic(m.borrow()?.config()).map_err(|e| rerr(e.to_string()))
        },
    );
    api.f(
        "forward",
        "self, x",
        "Logits for a batch in evaluation mode (no dropout, batch-norm running statistics).",
        |ctx: NativeCallContext, m: &mut RModel, x: RTensor| -> RResult<RTensor> {
            forward(&ctx, m, &x, false)
        },
    );
    api.f(
        "forward",
        "self, x, train",
        "Logits for a batch; `train` turns on dropout and batch statistics.",
        |ctx: NativeCallContext, m: &mut RModel, x: RTensor, train: bool| -> RResult<RTensor> {
            forward(&ctx, m, &x, train)
        },
    );
    api.f(
        "loss",
        "logits, targets",
        "Mean cross-entropy of logits [B, C] or [B, T, V] against integer targets (-1 ignored).",
        |l: RTensor, t: RTensor| -> RResult<RTensor> {
            tensor_result(crate::models::cross_entropy(&l.0, &t.0.f_to_device(l.0.device()).rt()?))
        },
    );
    api.f(
        "train_loss",
        "self, x, targets",
        "Training-mode forward and mean cross-entropy against `targets` (-1 ignored), ready for `backward()`; GPT-2 computes it without materialising the logits (docs/gpu.md), other models and hooked ones through `forward(x, true)`.",
        |ctx: NativeCallContext, m: &mut RModel, x: RTensor, t: RTensor| -> RResult<RTensor> {
            if super::mechint::ScriptHooks::of_model(&ctx, m).is_none() {
                let model = m.borrow()?;
                let dev = model.store().device();
                let (x, t) = (x.0.f_to_device(dev).rt()?, t.0.f_to_device(dev).rt()?);
                if let Some(r) = model.train_loss(&x, &t) {
                    return tensor_result(r);
                }
            }
            let logits = forward(&ctx, m, &x, true)?;
            let t = t.0.f_to_device(logits.0.device()).rt()?;
            tensor_result(crate::models::cross_entropy(&logits.0.f_to_kind(tch::Kind::Float).rt()?, &t))
        },
    );
    api.f(
        "parameters",
        "self",
        "The parameters in model order: `[#{ name, shape, numel, role }]`.",
        |m: &mut RModel| -> RResult<Array> {
            let m = m.borrow()?;
            Ok(m.store()
                .params()
                .iter()
                .map(|p| {
                    Dynamic::from_map(map_of(vec![
                        ("name", Dynamic::from(p.name.clone())),
                        ("shape", Dynamic::from_array(shape_to_array(&p.tensor.size()))),
                        ("numel", Dynamic::from_int(p.tensor.numel() as INT)),
                        (
                            "role",
                            Dynamic::from(
                                serde_json::to_value(p.role)
                                    .ok()
                                    .and_then(|v| v.as_str().map(String::from))
                                    .unwrap_or_default(),
                            ),
                        ),
                    ]))
                })
                .collect())
        },
    );
    api.f(
        "param",
        "self, name",
        "The parameter `name` itself (changes to it change the model).",
        |m: &mut RModel, name: &str| -> RResult<RTensor> {
            let m = m.borrow()?;
            let p = m
                .store()
                .get(name)
                .ok_or_else(|| rerr(format!("no parameter '{name}' (see parameters())")))?;
            Ok(RTensor(p.tensor.shallow_clone()))
        },
    );
    api.f("task", "self", "`classify` or `language_model`.", |m: &mut RModel| -> RResult<String> {
        Ok(match m.borrow()?.task() {
            Task::Classify { .. } => "classify",
            Task::LanguageModel { .. } => "language_model",
        }
        .to_string())
    });
    api.group("Files");
    api.f(
        "save",
        "model, path",
        "Write a model's parameters and buffers to a safetensors file, atomically (an existing path must be a regular file, its folder must exist).",
        |m: RModel, path: &str| -> RResult<()> { save_model(&m, path, &Map::new()) },
    );
    api.f(
        "save",
        "model, path, options",
        "Write a model's weights with `#{ mkdir, follow_symlinks }` as save(tensor, path, options).",
        |m: RModel, path: &str, opts: Map| -> RResult<()> { save_model(&m, path, &opts) },
    );
    api.f("load", "model, path", "Load weights into a model from a safetensors file (or a knlp checkpoint); strict: every name and shape must match.", |m: RModel, path: &str| -> RResult<()> {
        let m = m.borrow()?;
        let p = Path::new(path);
        let l = crate::safetensors::load(p).rt()?;
        if l.metadata.contains_key("knlp_state") {
            let ck = crate::checkpoint::load(p).rt()?;
            return ck.restore_model(m.store()).rt();
        }
        m.store().load_named(&l.tensors, path).rt()
    });
}

/// A forward visiting the hooks added to the model (add_hook).
fn forward(ctx: &NativeCallContext, m: &RModel, x: &RTensor, train: bool) -> RResult<RTensor> {
    let hooks = super::mechint::ScriptHooks::of_model(ctx, m);
    let model = m.borrow()?;
    let x = x.0.f_to_device(model.store().device()).rt()?;
    let r =
        tensor_result(model.forward_hooked(&x, train, hooks.as_ref().map(|h| h as &dyn crate::hooks::Hooks)));
    super::mechint::ScriptHooks::finish(hooks.as_ref(), r)
}

fn resnet_with(o: Map, depth: i64, what: &str) -> RResult<RModel> {
    let mut o = o;
    if o.contains_key("depth") {
        return Err(rerr(format!("{what}: depth is fixed ({depth}); use resnet(#{{ depth }}) for others")));
    }
    o.insert("depth".into(), Dynamic::from_int(depth));
    if !o.contains_key("classes") && depth >= 50 {
        o.insert("classes".into(), Dynamic::from_int(1000));
    }
    let (c, d): (resnet::Config, _) = model_opts(&o, what)?;
    finish(Box::new(resnet::ResNet::new(c).rt()?), d)
}

fn describe(m: &RModel) -> String {
    match m.0.try_borrow() {
        Ok(m) => format!(
            "Model({}, {} parameters, {})",
            m.arch(),
            m.store().numel(),
            device_name(m.store().device())
        ),
        Err(_) => "Model(<busy>)".into(),
    }
}

fn save_model(m: &RModel, path: &str, opts: &Map) -> RResult<()> {
    let target = super::tensor::save_target(opts)?;
    let m = m.borrow()?;
    let named = m.store().named_tensors();
    let refs: Vec<(String, &tch::Tensor)> = named.iter().map(|(n, t)| (n.clone(), t)).collect();
    let mut meta = BTreeMap::new();
    meta.insert("arch".to_string(), m.arch().to_string());
    meta.insert("config".to_string(), m.config().to_string());
    crate::safetensors::save(Path::new(path), &refs, &meta, target).rt()
}
