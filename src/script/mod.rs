//! The Rhai layer: an engine with knlp's bindings, limits, imports and error
//! rendering. The library modules know nothing of Rhai; everything
//! script-facing lives below this module.
pub mod api;
pub mod attention;
pub mod complete;
pub mod config;
pub mod data;
pub mod device;
pub mod display;
pub mod dist;
pub mod errors;
pub mod helpers;
pub mod kv_circuit;
pub mod kvrecon;
pub mod matrix;
pub mod mechint;
pub mod models;
pub mod nn;
pub mod optim;
pub mod profile;
pub mod prune;
pub mod reentry;
pub mod report;
pub mod resolver;
pub mod script_model;
pub mod tensor;
pub mod tiering;
pub mod tokenizer;
pub mod train;
pub mod value;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use rhai::{Array, Dynamic, Engine, EvalAltResult, OptimizationLevel, Scope, AST};

use api::DocEntry;
use errors::{Ending, ErrorContext};
use resolver::{Resolver, SharedResolver, Sources};

/// Resource limits of a script run. The defaults are generous; each is
/// configurable on the command line (`knlp run --help`).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Rhai operations per run (0 = unlimited).
    pub max_operations: u64,
    pub max_call_levels: usize,
    pub max_expr_depth: usize,
    pub max_string_size: usize,
    pub max_array_size: usize,
    pub max_map_size: usize,
    /// Wall-clock limit in seconds (0 = none).
    pub timeout_secs: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_operations: 1_000_000_000,
            max_call_levels: 256,
            max_expr_depth: 256,
            max_string_size: 64 << 20,
            max_array_size: 50_000_000,
            max_map_size: 10_000_000,
            timeout_secs: 0.0,
        }
    }
}

/// A script error, rendered for the terminal, and how the run ended.
#[derive(Debug)]
pub struct ScriptError {
    pub rendered: String,
    pub ending: Ending,
}

impl ScriptError {
    /// Process exit status for this ending.
    pub fn exit_code(&self) -> i32 {
        match self.ending {
            Ending::Exit(c) => c,
            Ending::Interrupted => 130,
            Ending::Failed => 1,
        }
    }
}

/// Register every binding into `engine`, recording docs.
pub fn register_all(engine: &mut Engine, docs: &mut Vec<DocEntry>) {
    tensor::register(engine, docs);
    device::register(engine, docs);
    profile::register(engine, docs);
    dist::register(engine, docs);
    helpers::register(engine, docs);
    display::register(engine, docs);
    data::register(engine, docs);
    models::register(engine, docs);
    script_model::register(engine, docs);
    nn::register(engine, docs);
    attention::register(engine, docs);
    kvrecon::register(engine, docs);
    mechint::register(engine, docs);
    kv_circuit::register(engine, docs);
    optim::register(engine, docs);
    prune::register(engine, docs);
    tokenizer::register(engine, docs);
    tiering::register(engine, docs);
    train::register(engine, docs);
    matrix::register(engine, docs);
    report::register(engine, docs);
    config::register(engine, docs);
}

/// The deepest call nesting `--max-call-levels` accepts.
pub const MAX_CALL_LEVELS: usize = 10_000;

/// Stack for a script thread: each nested Rhai call takes a few KiB of
/// native stack (8 MiB held about 1,500 levels of a small function), so
/// give each allowed level 128 KiB on top of a 16 MiB base. Only the pages
/// used are ever committed.
pub fn stack_bytes(limits: &Limits) -> usize {
    (16 << 20) + limits.max_call_levels.min(MAX_CALL_LEVELS) * (128 << 10)
}

/// Run `f` (which builds and drives a Runtime) on a thread whose stack fits
/// `limits.max_call_levels`, so deep recursion ends in a script error at the
/// limit instead of a stack overflow that aborts the process.
pub fn on_script_thread<R: Send>(limits: &Limits, f: impl FnOnce() -> R + Send) -> Result<R, String> {
    if limits.max_call_levels > MAX_CALL_LEVELS {
        return Err(format!(
            "--max-call-levels {} is above the largest allowed, {MAX_CALL_LEVELS}",
            limits.max_call_levels
        ));
    }
    std::thread::scope(|s| {
        let h = std::thread::Builder::new()
            .name("script".into())
            .stack_size(stack_bytes(limits))
            .spawn_scoped(s, f)
            .map_err(|e| format!("cannot start the script thread: {e}"))?;
        h.join().map_err(|_| "the script thread panicked".to_string())
    })
}

/// A script's exit code as a process status: its low byte, as a POSIX shell
/// takes it (`exit(-1)` is 255), except that a failure never reads as
/// success (`exit(256)` is 1, not 0).
pub fn exit_status(code: i32) -> u8 {
    match code.rem_euclid(256) as u8 {
        0 if code != 0 => 1,
        b => b,
    }
}

/// The documentation registry, for `knlp doc` (no runtime needed).
pub fn reference() -> Vec<DocEntry> {
    let mut engine = Engine::new_raw();
    let mut docs = Vec::new();
    register_all(&mut engine, &mut docs);
    docs
}

pub struct Runtime {
    pub engine: Engine,
    pub scope: Scope<'static>,
    /// Functions defined so far (the shell keeps them across inputs).
    functions: AST,
    pub docs: Rc<Vec<DocEntry>>,
    sources: Sources,
    resolver: Rc<Resolver>,
    pub limits: Limits,
    deadline: Rc<Cell<Option<Instant>>>,
    /// `import` aliases made permanent in the shell, with their members.
    pub imports: BTreeMap<String, Vec<String>>,
    inputs: usize,
}

impl Runtime {
    /// An engine whose `import`s resolve relative to `base_dir`.
    pub fn new(base_dir: PathBuf, limits: Limits) -> Self {
        crate::interrupt::install();
        let mut engine = Engine::new();
        engine
            .set_max_operations(limits.max_operations)
            .set_max_call_levels(limits.max_call_levels)
            .set_max_expr_depths(limits.max_expr_depth, limits.max_expr_depth)
            .set_max_string_size(limits.max_string_size)
            .set_max_array_size(limits.max_array_size)
            .set_max_map_size(limits.max_map_size)
            .set_fail_on_invalid_map_property(true)
            .set_strict_variables(true)
            .set_optimization_level(OptimizationLevel::Simple);
        let deadline: Rc<Cell<Option<Instant>>> = Rc::new(Cell::new(None));
        let dl = deadline.clone();
        engine.on_progress(move |ops| {
            if !crate::interrupt::deferred() && crate::interrupt::take() {
                return Some(Dynamic::from("interrupted".to_string()));
            }
            if ops % 1024 == 0 {
                if let Some(d) = dl.get() {
                    if Instant::now() > d {
                        return Some(Dynamic::from("timeout".to_string()));
                    }
                }
            }
            None
        });
        let mut docs = Vec::new();
        register_all(&mut engine, &mut docs);
        let sources: Sources = Rc::new(RefCell::new(HashMap::new()));
        let resolver = Rc::new(Resolver::new(base_dir, sources.clone()));
        engine.set_module_resolver(SharedResolver(resolver.clone()));
        Runtime {
            engine,
            scope: Scope::new(),
            functions: AST::empty(),
            docs: Rc::new(docs),
            sources,
            resolver,
            limits,
            deadline,
            imports: BTreeMap::new(),
            inputs: 0,
        }
    }

    fn arm_deadline(&self) {
        let t = self.limits.timeout_secs;
        self.deadline.set((t > 0.0).then(|| Instant::now() + Duration::from_secs_f64(t)));
    }

    /// Run a script file with `ARGS` set to `args`. Returns the exit status
    /// the script asked for (`exit(n)`), 0 by default.
    pub fn run_file(&mut self, path: &Path, args: &[String]) -> Result<i32, ScriptError> {
        let name = path.to_string_lossy().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ScriptError {
            rendered: format!("{name}: error: cannot read the script: {e}\n"),
            ending: Ending::Failed,
        })?;
        let argv: Array = args.iter().map(|a| Dynamic::from(a.clone())).collect();
        self.scope.push_constant("ARGS", argv);
        self.scope.push_constant("SCRIPT", name.clone());
        matrix::SCRIPT.with(|s| *s.borrow_mut() = Some((path.to_path_buf(), args.to_vec())));
        match self.run_text(&text, &name) {
            // A Ctrl-C that a native loop (train()) honoured at its last
            // statement still ends the run as interrupted.
            Ok(_) if crate::interrupt::requested() => Ok(130),
            Ok(_) => Ok(0),
            Err(e) if matches!(e.ending, Ending::Exit(_)) => Ok(e.exit_code()),
            Err(e) => Err(e),
        }
    }

    fn run_text(&mut self, text: &str, name: &str) -> Result<Dynamic, ScriptError> {
        self.sources.borrow_mut().insert(name.to_string(), text.to_string());
        let mut ast =
            self.engine.compile_with_scope(&self.scope, text).map_err(|e| self.error(&e.into(), name))?;
        ast.set_source(name);
        let merged = self.functions.merge(&ast);
        self.arm_deadline();
        crate::interrupt::clear();
        let result = {
            let _engine = reentry::enter(&self.engine);
            self.engine.eval_ast_with_scope::<Dynamic>(&mut self.scope, &merged)
        };
        self.functions = merged;
        self.functions.clear_statements();
        result.map_err(|e| self.error(&e, name))
    }

    /// Run source text named `name` in this session (the shell's `:load`).
    pub fn load_source(&mut self, text: &str, name: &str) -> Result<Dynamic, ScriptError> {
        let out = self.run_text(text, name)?;
        self.keep_imports(text, name);
        Ok(out)
    }

    /// Evaluate one shell input; functions, variables and `import` aliases
    /// persist for later inputs.
    pub fn eval_input(&mut self, code: &str) -> Result<Dynamic, ScriptError> {
        self.inputs += 1;
        let name = format!("<input {}>", self.inputs);
        self.eval_cell(code, &name)
    }

    /// [`Runtime::eval_input`] with errors naming the input `name` (a
    /// notebook's `cell[3]`).
    pub fn eval_cell(&mut self, code: &str, name: &str) -> Result<Dynamic, ScriptError> {
        let out = self.run_text(code, name)?;
        self.keep_imports(code, name);
        Ok(out)
    }

    /// A runtime for inputs that arrive one at a time (the shell, notebooks):
    /// later inputs may redefine constants and add new variables.
    pub fn interactive(base_dir: PathBuf, limits: Limits) -> Self {
        let mut rt = Runtime::new(base_dir, limits);
        rt.engine.set_optimization_level(OptimizationLevel::None);
        rt.engine.set_strict_variables(false);
        rt
    }

    /// Make `import "x" as y;` statements of a shell input permanent.
    fn keep_imports(&mut self, code: &str, source: &str) {
        for (path, alias) in parse_imports(code) {
            if let Ok(m) = self.resolver.load(&self.engine, Some(source), &path, rhai::Position::NONE) {
                let members: Vec<String> = m
                    .gen_fn_signatures_with_mapper(|s| s.into())
                    .filter_map(|s| s.split('(').next().map(|n| n.trim().to_string()))
                    .chain(m.iter_var().map(|(n, _)| n.to_string()))
                    .collect();
                self.engine.register_static_module(alias.as_str(), m);
                self.imports.insert(alias, members);
            }
        }
    }

    /// Compile `code` and report whether it is incomplete (open brackets,
    /// strings, a trailing operator), for multi-line shell input.
    pub fn is_incomplete(&self, code: &str) -> bool {
        use rhai::{LexError, ParseErrorType as P};
        match self.engine.compile_with_scope(&self.scope, code) {
            Ok(_) => false,
            Err(e) => {
                let at_end = e.1.line().is_none_or(|l| l >= code.lines().count().max(1));
                match *e.0 {
                    P::UnexpectedEOF => true,
                    P::BadInput(LexError::UnterminatedString) => true,
                    P::MissingToken(..) => at_end,
                    _ => false,
                }
            }
        }
    }

    /// Forget variables, functions and imports.
    pub fn reset(&mut self) {
        self.scope.clear();
        self.functions = AST::empty();
        for alias in self.imports.keys() {
            self.engine.register_static_module(alias.as_str(), rhai::Module::new().into());
        }
        self.imports.clear();
        self.resolver.clear_cache();
    }

    /// Variables in scope: (name, type, first line of the value).
    /// A value as `print` shows it: knlp's types through their registered
    /// `to_string` (`Model(lenet5, 61750 parameters, cpu)`), not their Rust names.
    pub fn display(&self, v: &Dynamic) -> String {
        display_with(v, &|x| {
            // Rhai names registered Rust types by their paths.
            if !x.type_name().contains("::") {
                return None;
            }
            let mut scope = Scope::new();
            scope.push_dynamic("__shown", x.clone());
            self.engine.eval_with_scope::<String>(&mut scope, "to_string(__shown)").ok()
        })
    }

    /// Script variables holding models: (name, hook points).
    pub fn model_hooks(&self) -> Vec<(String, Vec<String>)> {
        self.scope
            .iter()
            .filter_map(|(name, _, value)| {
                let m = value.read_lock::<models::RModel>()?.clone();
                let names = m.borrow().ok()?.hook_names();
                Some((name.to_string(), names))
            })
            .collect()
    }

    pub fn variables(&self) -> Vec<(String, String, String)> {
        self.scope
            .iter()
            .map(|(name, _, value)| {
                let ty = errors::script_type_names(self.engine.map_type_name(value.type_name()));
                let mut text = self.display(&value).lines().next().unwrap_or("").to_string();
                if text.chars().count() > 60 {
                    text = text.chars().take(57).collect::<String>() + "...";
                }
                (name.to_string(), ty, text)
            })
            .collect()
    }

    /// Names of script-defined functions.
    pub fn function_names(&self) -> Vec<String> {
        self.functions.iter_functions().map(|f| f.name.to_string()).collect()
    }

    /// Render an error against the sources seen so far.
    pub fn error(&self, err: &EvalAltResult, source: &str) -> ScriptError {
        let sources = self.sources.borrow();
        let ctx = ErrorContext {
            sources: &sources,
            docs: &self.docs,
            max_operations: self.limits.max_operations,
            timeout_secs: self.limits.timeout_secs,
        };
        let loc = errors::locate(err, source, &ctx);
        ScriptError { rendered: errors::render(&loc, &sources), ending: errors::ending(err) }
    }
}

/// Text of a value for the shell: tensors print PyTorch-style, also inside
/// arrays and maps; strings are quoted.
pub fn display_value(v: &Dynamic) -> String {
    display_with(v, &|_| None)
}

/// [`display_value`] with `custom` asked first for values of knlp's types.
pub(crate) fn display_with(v: &Dynamic, custom: &dyn Fn(&Dynamic) -> Option<String>) -> String {
    if let Some(t) = v.read_lock::<value::RTensor>() {
        return crate::tensor::format_tensor(&t.0);
    }
    if let Some(a) = v.read_lock::<Array>() {
        let items: Vec<String> = a.iter().map(|x| display_with(x, custom)).collect();
        return format!("[{}]", items.join(", "));
    }
    if let Some(m) = v.read_lock::<rhai::Map>() {
        let items: Vec<String> = m.iter().map(|(k, v)| format!("{k}: {}", display_with(v, custom))).collect();
        return format!("#{{{}}}", items.join(", "));
    }
    if let Some(s) = custom(v) {
        return s;
    }
    if v.is_string() {
        return format!("{:?}", v.to_string());
    }
    v.to_string()
}

/// `import "path" as alias;` statements at the start of lines.
fn parse_imports(code: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for stmt in code.split(';') {
        let s = stmt.trim();
        let Some(rest) = s.strip_prefix("import") else { continue };
        let rest = rest.trim_start();
        let Some(rest) = rest.strip_prefix('"') else { continue };
        let Some((path, tail)) = rest.split_once('"') else { continue };
        let Some(alias) = tail.trim().strip_prefix("as") else { continue };
        let alias = alias.trim();
        if !alias.is_empty() && alias.chars().all(|c| c.is_alphanumeric() || c == '_') {
            out.push((path.to_string(), alias.to_string()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_registered_function_is_documented() {
        let mut engine = Engine::new_raw();
        let mut docs = Vec::new();
        register_all(&mut engine, &mut docs);
        let documented: std::collections::HashSet<String> = docs
            .iter()
            .map(|d| match d.name.as_str() {
                "[]" => "index$get$".to_string(),
                "[]=" => "index$set$".to_string(),
                n if d.signature.contains('.') && !d.signature.contains('(') => format!("get${n}"),
                n => n.to_string(),
            })
            .collect();
        for sig in engine.gen_fn_signatures(false) {
            let name = sig.split('(').next().unwrap().trim();
            if name == "to_string" || name == "to_debug" {
                continue;
            }
            assert!(documented.contains(name), "{sig} has no documentation entry");
        }
        let mut seen = std::collections::HashSet::new();
        for d in &docs {
            assert!(!d.doc.is_empty() && d.doc.ends_with('.'), "{}: doc should be a sentence", d.signature);
            assert!(seen.insert(d.signature.clone()), "{} is registered twice", d.signature);
            // The reference shows only the listed groups.
            assert!(
                api::GROUPS.iter().any(|(g, _)| *g == d.group),
                "{}: group '{}' is missing from api::GROUPS",
                d.signature,
                d.group
            );
        }
    }

    #[test]
    fn finds_imports() {
        let code = "import \"util\" as u; let x = 1;\nimport \"lib/stats\" as st;";
        assert_eq!(parse_imports(code), vec![("util".into(), "u".into()), ("lib/stats".into(), "st".into())]);
    }
}
