//! The documentation registry: every function a script can call is
//! registered through [`Api`], which records its signature and one-line doc.
//! `knlp doc`, `:help` in the shell, tab completion and `docs/scripting.md`
//! are all generated from it, so the reference cannot drift from the code.
use std::collections::BTreeMap;

use rhai::{Engine, FuncRegistration, RhaiNativeFunc};

/// One documented signature.
#[derive(Clone, Debug)]
pub struct DocEntry {
    pub group: &'static str,
    pub name: String,
    pub signature: String,
    pub doc: &'static str,
}

/// Groups in the order the reference presents them, with a sentence each.
pub const GROUPS: &[(&str, &str)] = &[
    ("Tensor creation", "Build tensors from arrays, constants and random draws."),
    ("Tensor properties", "Shape, dtype, device and conversions."),
    ("Shape and indexing", "Reshape, combine, slice and index tensors. Indices may be negative."),
    ("Arithmetic", "Element-wise operators between tensors and with `int`/`float` on either side (broadcasting as in PyTorch)."),
    ("Math", "Element-wise functions, activations and matrix products."),
    ("Reductions", "Reductions over all elements or along a dimension; `keepdim` keeps the reduced dimension with size 1."),
    ("Sorting and selection", "Top-k, k-th value and sorting. These return a map `#{ values, indices }`."),
    ("Autograd", "Gradients of scalar results with respect to tensors that require them."),
    ("Files", "safetensors files. Paths are the ones the script names; nothing else on disk is touched."),
    ("Data", "Data sets and loaders: Fashion-MNIST, CIFAR and IDX images, nanoGPT token files, the Brown corpus and GPT-2 BPE. Paths are those the script names or the documented defaults; nothing else on disk is read."),
    ("Layers", "Layer functions over tensors for models written in scripts, with torch.nn.functional's arguments, defaults and semantics. Parameters are ordinary tensors (`requires_grad`)."),
    ("Models", "LeNet-5, ResNet and GPT-2, built on the CPU from a seed and moved to their device. Parameter names are documented in docs/models.md."),
    ("Script models", "Models defined in the script: a builder registers parameters in the flat store the built-in models use, and a closure is the forward. The result is a Model like any other (docs/scripts.md; layers in the nn standard library, docs/stdlib.md)."),
    ("Attention", "GPT-2 attention variants: decoding through the KV cache, cache sizes, attention patterns, Fisher metrics and the variants' own metrics. The math and cache layouts are in docs/attention.md."),
    ("Interpretability", "Hook points with TransformerLens's names, activation caches and their analyses, activation and attribution patching, the logit lens, head detectors, and Hugging Face GPT-2 import and export (docs/mechint.md)."),
    ("Optimizers", "SGD, Adam, AdamW, AdamWAdv and AdamWSpam over flat parameter buffers, with readable state (docs/optim.md)."),
    ("Pruning", "Magnitude, movement and Adam-state (bitter) pruning, the scorers and the schedule (docs/pruning.md)."),
    ("Memory tiering", "Modules scored by Adam's state and assigned to HBM, CPU and SSD by the cumulative rule; `train()`'s `tiering` option delays or stages their forwards (docs/tiering.md)."),
    ("Training", "The training loop: run directories, metrics, checkpoints and resume (docs/training.md)."),
    ("Device and precision", "CUDA, TF32, autocast and determinism switches, and CUDA memory statistics."),
    ("Profiling", "Where a closure's time goes: libtorch's profiler, device time by kernel kind (docs/gpu.md \"Profiling\")."),
    ("Distributed", "Data-parallel ranks (`knlp run --nproc N`, torchrun): the rank's place and the collectives over libtorch's process groups, Gloo for CPU tensors and NCCL for CUDA tensors. `train()` splits each batch over the ranks by itself (docs/distributed.md)."),
    ("Results and graphs", "A project's runs as a data frame (`runs(project)`, the table of `knlp results`) to filter, sort, group and export, and line and bar charts in the style of `knlp graphs` (docs/workflow.md)."),
    ("Script helpers", "Arguments, configuration and utilities for scripts."),
];

pub struct Api<'a> {
    pub engine: &'a mut Engine,
    pub docs: &'a mut Vec<DocEntry>,
    pub group: &'static str,
}

/// How a registered function is shown in the reference.
enum Form<'a> {
    Function(&'a str),
    Getter(&'a str),
    Indexer,
    IndexSetter,
}

impl<'a> Api<'a> {
    pub fn new(engine: &'a mut Engine, docs: &'a mut Vec<DocEntry>) -> Self {
        Api { engine, docs, group: GROUPS[0].0 }
    }

    pub fn group(&mut self, group: &'static str) -> &mut Self {
        debug_assert!(GROUPS.iter().any(|(g, _)| *g == group), "undeclared group {group}");
        self.group = group;
        self
    }

    /// Register a function. `params` names the parameters in order, comma
    /// separated; the first one named `self` marks a method; `name: type`
    /// sets the type shown where the Rust type is a dynamic value.
    pub fn f<A: 'static, const N: usize, const X: bool, R, const F: bool, FUNC>(
        &mut self,
        name: &str,
        params: &str,
        doc: &'static str,
        func: FUNC,
    ) -> &mut Self
    where
        R: Clone + 'static,
        FUNC: RhaiNativeFunc<A, N, X, R, F> + 'static,
    {
        let info = self.params_info::<A, N, X, R, F, FUNC>(params);
        self.record(Form::Function(name), &info, doc);
        FuncRegistration::new(name)
            .with_params_info(&info)
            .with_comments([format!("/// {doc}")])
            .register_into_engine(self.engine, func);
        self
    }

    /// Register a property getter (`t.shape`).
    pub fn get<A: 'static, const N: usize, const X: bool, R, const F: bool, FUNC>(
        &mut self,
        prop: &str,
        doc: &'static str,
        func: FUNC,
    ) -> &mut Self
    where
        R: Clone + 'static,
        FUNC: RhaiNativeFunc<A, N, X, R, F> + 'static,
    {
        let info = self.params_info::<A, N, X, R, F, FUNC>("self");
        self.record(Form::Getter(prop), &info, doc);
        FuncRegistration::new_getter(prop)
            .with_params_info(&info)
            .with_comments([format!("/// {doc}")])
            .register_into_engine(self.engine, func);
        self
    }

    /// Register an indexer (`t[i]`).
    pub fn index_get<A: 'static, const N: usize, const X: bool, R, const F: bool, FUNC>(
        &mut self,
        doc: &'static str,
        func: FUNC,
    ) -> &mut Self
    where
        R: Clone + 'static,
        FUNC: RhaiNativeFunc<A, N, X, R, F> + 'static,
    {
        let info = self.params_info::<A, N, X, R, F, FUNC>("self, index");
        self.record(Form::Indexer, &info, doc);
        FuncRegistration::new_index_getter()
            .with_params_info(&info)
            .with_comments([format!("/// {doc}")])
            .register_into_engine(self.engine, func);
        self
    }

    /// Register an index setter (`t[i] = v`).
    pub fn index_set<A: 'static, const N: usize, const X: bool, R, const F: bool, FUNC>(
        &mut self,
        doc: &'static str,
        func: FUNC,
    ) -> &mut Self
    where
        R: Clone + 'static,
        FUNC: RhaiNativeFunc<A, N, X, R, F> + 'static,
    {
        let info = self.params_info::<A, N, X, R, F, FUNC>("self, index, value: Tensor|number");
        self.record(Form::IndexSetter, &info, doc);
        FuncRegistration::new_index_setter()
            .with_params_info(&info)
            .with_comments([format!("/// {doc}")])
            .register_into_engine(self.engine, func);
        self
    }

    fn params_info<A: 'static, const N: usize, const X: bool, R, const F: bool, FUNC>(
        &self,
        params: &str,
    ) -> Vec<String>
    where
        FUNC: RhaiNativeFunc<A, N, X, R, F>,
        R: 'static,
    {
        let names: Vec<&str> = params.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
        let types = FUNC::param_names();
        assert_eq!(
            names.len(),
            types.len(),
            "parameter names '{params}' do not match the {} parameters",
            types.len()
        );
        let mut info: Vec<String> = names
            .iter()
            .zip(types.iter())
            .map(|(n, t)| match n.split_once(':') {
                // "name: type" overrides the type shown (for `any` parameters).
                Some((n, shown)) => format!("{}: {}", n.trim(), shown.trim()),
                None => format!("{n}: {}", script_type(self.engine, t)),
            })
            .collect();
        info.push(script_type(self.engine, FUNC::return_type_name()));
        info
    }

    fn record(&mut self, form: Form, info: &[String], doc: &'static str) {
        let (params, ret) = info.split_at(info.len() - 1);
        let ret = &ret[0];
        let arrow = if ret == "()" { String::new() } else { format!(" -> {ret}") };
        let self_ty = params.first().and_then(|p| p.strip_prefix("self: "));
        let rest = |skip: usize| params[skip..].join(", ");
        let (name, signature) = match form {
            Form::Function(name) => match self_ty {
                Some(t) => (name.to_string(), format!("{t}.{name}({}){arrow}", rest(1))),
                None if is_operator(name) && params.len() == 2 => {
                    (name.to_string(), format!("{} {name} {}{arrow}", params[0], params[1]))
                }
                None if is_operator(name) && params.len() == 1 => {
                    (name.to_string(), format!("{name}({}){arrow}", params[0]))
                }
                None => (name.to_string(), format!("{name}({}){arrow}", rest(0))),
            },
            Form::Getter(prop) => (prop.to_string(), format!("{}.{prop}{arrow}", self_ty.unwrap_or("?"))),
            Form::Indexer => ("[]".into(), format!("{}[{}]{arrow}", self_ty.unwrap_or("?"), rest(1))),
            Form::IndexSetter => {
                ("[]=".into(), format!("{}[{}] = {}", self_ty.unwrap_or("?"), params[1], params[2]))
            }
        };
        self.docs.push(DocEntry { group: self.group, name, signature, doc });
    }
}

fn is_operator(name: &str) -> bool {
    name.chars().all(|c| "+-*/%<>=!&|^".contains(c))
}

/// Script-level name of a Rust parameter type.
pub fn script_type(engine: &Engine, rust: &str) -> String {
    let t = rust.trim().trim_start_matches("&mut ").trim_start_matches('&');
    // Result<T, Box<EvalAltResult>> -> T
    let t = t
        .strip_prefix("core::result::Result<")
        .and_then(|s| s.split_once(", alloc::boxed::Box<rhai::"))
        .map(|(inner, _)| inner)
        .unwrap_or(t);
    match t {
        "i64" | "i32" | "usize" => "int".into(),
        "f64" | "f32" => "float".into(),
        "bool" => "bool".into(),
        "()" => "()".into(),
        _ if t.contains("ImmutableString") || t == "alloc::string::String" || t == "&str" => "string".into(),
        _ if t.contains("Vec<rhai::types::dynamic::Dynamic>") || t.ends_with("Array") => "array".into(),
        _ if t.contains("BTreeMap<") || t.ends_with("::Map") => "map".into(),
        _ if t.ends_with("Dynamic") => "any".into(),
        _ if t.ends_with("FnPtr") => "Fn".into(),
        _ if t.contains("RangeInclusive<i64>") => "inclusive_range".into(),
        _ if t.contains("Range<i64>") => "range".into(),
        _ => {
            let mapped = engine.map_type_name(t);
            mapped.rsplit("::").next().unwrap_or(mapped).to_string()
        }
    }
}

/// The reference as markdown: grouped, sorted by name within a group.
pub fn reference_markdown(docs: &[DocEntry]) -> String {
    let mut out = String::new();
    out.push_str("# knlp scripting reference\n\n");
    out.push_str(
        "Generated by `knlp doc` from the registry in `src/script/`; `make docs` rewrites this \
         file and `make test` fails when it is stale. Do not edit by hand.\n\n",
    );
    out.push_str(
        "Types: `int` (i64), `float` (f64), `bool`, `string`, `array`, `map`, `range` \
         (`a..b`), `inclusive_range` (`a..=b`), `Fn` (a function pointer or closure), `any`, and the knlp \
         types (`Tensor`, ...). `Type.name(...)` is a method: call it as `x.name(...)` or \
         `name(x, ...)`. Every function reports libtorch errors as script errors with the \
         file, line and column of the call.\n\n",
    );
    for (group, intro) in GROUPS {
        let mut entries: Vec<&DocEntry> = docs.iter().filter(|d| d.group == *group).collect();
        if entries.is_empty() {
            continue;
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name).then(a.signature.cmp(&b.signature)));
        out.push_str(&format!("## {group}\n\n{intro}\n\n"));
        for e in entries {
            out.push_str(&format!("- `{}`: {}\n", e.signature, e.doc));
        }
        out.push('\n');
    }
    out
}

/// Entries whose name is `name`, for `:help` and `knlp doc NAME`.
pub fn lookup<'d>(docs: &'d [DocEntry], name: &str) -> Vec<&'d DocEntry> {
    docs.iter().filter(|d| d.name == name).collect()
}

/// Distinct function names, for completion.
pub fn names(docs: &[DocEntry]) -> Vec<String> {
    let set: BTreeMap<&str, ()> = docs
        .iter()
        .filter(|d| d.name.chars().next().is_some_and(|c| c.is_alphabetic() || c == '_'))
        .map(|d| (d.name.as_str(), ()))
        .collect();
    set.into_keys().map(String::from).collect()
}
