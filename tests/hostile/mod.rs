//! Every tensor function, method, operator, property and indexer a script
//! can call (enumerated from the documentation registry, so a new binding
//! is covered the day it is registered), called with hostile arguments:
//! wrong dtypes, mismatched and empty shapes, zero, NaN, infinities,
//! negative sizes, strings, unit, maps. Each call must return a value or a
//! script error; none may panic (issue 20: a panic ends a shell session and
//! everything in it).
//!
//! Compiled into the script_models test binary (tests/script_models.rs):
//! every test binary links libtorch, which costs `make test` time.
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use knlp::script::{reference, Limits, Runtime};

/// The groups of docs/scripting.md whose functions work on tensors.
const GROUPS: &[&str] = &[
    "Tensor creation",
    "Tensor properties",
    "Shape and indexing",
    "Arithmetic",
    "Math",
    "Reductions",
    "Sorting and selection",
    "Autograd",
    "Layers",
];

const TENSORS: &[&str] = &[
    "tensor([1, 2, 3])",
    "tensor([1.5, 0.0 / 0.0, -2.0])",
    "ones([2, 3])",
    "tensor([true, false])",
    "zeros([0])",
    "randn([2, 1, 4, 4])",
    "ones([3, 3]).bool()",
    "ones(2, \"bfloat16\")",
];

const OTHERS: &[&str] = &[
    "0",
    "-1",
    "3",
    "0.5",
    "0.0 / 0.0",
    "-1.0 / 0.0",
    "\"x\"",
    "[]",
    "[2, -1]",
    "[1, 2]",
    "#{}",
    "()",
    "true",
    "false",
    "1..2",
];

/// The shape of a call, parsed from its documented signature.
enum Call {
    Function { name: String, arity: usize },
    Method { name: String, arity: usize },
    Getter(String),
    Binary(String),
    Unary(String),
    Index,
    IndexSet,
}

fn arity(params: &str) -> usize {
    if params.trim().is_empty() {
        0
    } else {
        params.split(", ").count()
    }
}

fn parse(sig: &str) -> Option<Call> {
    let head = sig.split(" -> ").next().unwrap_or(sig).trim();
    if let Some(rest) = head.strip_prefix("Tensor") {
        if rest.starts_with('[') {
            return Some(if head.contains(" = ") { Call::IndexSet } else { Call::Index });
        }
        let rest = rest.strip_prefix('.')?;
        return Some(match rest.split_once('(') {
            Some((name, params)) => {
                Call::Method { name: name.to_string(), arity: arity(params.trim_end_matches(')')) }
            }
            None => Call::Getter(rest.to_string()),
        });
    }
    if head.starts_with("a: ") {
        // "a: Tensor + b: int"
        let op = head.split_whitespace().nth(2)?;
        return Some(Call::Binary(op.to_string()));
    }
    let (name, params) = head.split_once('(')?;
    if name.chars().all(|c| !c.is_alphanumeric() && c != '_') {
        return Some(Call::Unary(name.to_string()));
    }
    if name.contains('.') {
        return None; // a method of another type
    }
    Some(Call::Function { name: name.to_string(), arity: arity(params.trim_end_matches(')')) })
}

/// Deterministic choices (no rand crate needed).
struct Lcg(u64);

impl Lcg {
    fn pick(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

/// Argument lists: every combination when there are few, else a sample.
fn arg_lists(arity: usize, rng: &mut Lcg) -> Vec<Vec<String>> {
    let pool: Vec<&str> = TENSORS.iter().chain(OTHERS).copied().collect();
    let n = pool.len();
    if arity == 0 {
        return vec![vec![]];
    }
    if n.pow(arity as u32) <= 500 {
        let mut out = vec![vec![]];
        for _ in 0..arity {
            out = out
                .into_iter()
                .flat_map(|pre: Vec<String>| {
                    pool.iter().map(move |v| {
                        let mut p = pre.clone();
                        p.push(v.to_string());
                        p
                    })
                })
                .collect();
        }
        return out;
    }
    (0..200).map(|_| (0..arity).map(|_| pool[rng.pick(n)].to_string()).collect()).collect()
}

fn expressions(call: &Call, rng: &mut Lcg) -> Vec<String> {
    let tensors = || TENSORS.iter().map(|s| s.to_string());
    match call {
        Call::Function { name, arity } => {
            arg_lists(*arity, rng).into_iter().map(|a| format!("{name}({})", a.join(", "))).collect()
        }
        Call::Method { name, arity } => tensors()
            .flat_map(|t| {
                arg_lists(*arity, rng)
                    .into_iter()
                    .take(24)
                    .map(move |a| format!("({t}).{name}({})", a.join(", ")))
                    .collect::<Vec<_>>()
            })
            .collect(),
        Call::Getter(p) => tensors().map(|t| format!("({t}).{p}")).collect(),
        Call::Binary(op) => {
            arg_lists(2, rng).into_iter().map(|a| format!("({}) {op} ({})", a[0], a[1])).collect()
        }
        Call::Unary(op) => arg_lists(1, rng).into_iter().map(|a| format!("{op}({})", a[0])).collect(),
        Call::Index => tensors()
            .flat_map(|t| arg_lists(1, rng).into_iter().map(move |a| format!("({t})[{}]", a[0])))
            .collect(),
        Call::IndexSet => tensors()
            .flat_map(|t| {
                arg_lists(2, rng)
                    .into_iter()
                    .take(40)
                    .map(move |a| format!("{{ let s = {t}; s[{}] = {}; s }}", a[0], a[1]))
            })
            .collect(),
    }
}

#[test]
fn no_tensor_binding_panics_on_hostile_arguments() {
    let base = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let fresh = || Runtime::new(base.clone(), Limits::default());
    let mut rt = fresh();
    let mut rng = Lcg(20261204);
    let (mut tried, mut failed_cleanly, mut signatures) = (0usize, 0usize, 0usize);
    let mut panics: Vec<String> = Vec::new();
    let docs = reference();
    let mut seen = std::collections::BTreeSet::new();
    for e in docs.iter().filter(|e| GROUPS.contains(&e.group)) {
        let Some(call) = parse(&e.signature) else { continue };
        if !seen.insert(e.signature.clone()) {
            continue;
        }
        signatures += 1;
        for code in expressions(&call, &mut rng) {
            tried += 1;
            match catch_unwind(AssertUnwindSafe(|| rt.eval_input(&code))) {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => failed_cleanly += 1,
                Err(_) => {
                    panics.push(format!("{}: {code}", e.signature));
                    rt = fresh();
                }
            }
        }
    }
    eprintln!(
        "{signatures} signatures, {tried} hostile calls: {} returned a value, {failed_cleanly} a clear error, {} panicked",
        tried - failed_cleanly - panics.len(),
        panics.len()
    );
    assert!(signatures > 150, "only {signatures} tensor signatures found: is the registry intact?");
    // One example per signature that panicked.
    let mut by_sig: std::collections::BTreeMap<&str, (usize, &str)> = std::collections::BTreeMap::new();
    for p in &panics {
        let (sig, code) = p.split_once(": ").unwrap_or((p, ""));
        by_sig.entry(sig).or_insert((0, code)).0 += 1;
    }
    let list: Vec<String> = by_sig.iter().map(|(s, (n, c))| format!("{n:>4} x {s}   e.g. {c}")).collect();
    assert!(panics.is_empty(), "{} calls panicked:\n{}", panics.len(), list.join("\n"));
}
