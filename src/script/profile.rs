//! `profile(f)`: where a closure's time goes (crate::profile).
use std::path::PathBuf;

use rhai::{Array, Dynamic, Engine, FnPtr, Map, NativeCallContext, INT};

use super::api::{Api, DocEntry};
use super::value::{as_number, check_keys, expect_str, map_of, rerr, RResult};
use crate::profile::{self, Entry};

const KEYS: &[&str] = &["trace", "top", "per"];

fn entries(v: &[Entry], top: usize, per: f64, with_kind: bool) -> Array {
    v.iter()
        .take(top)
        .map(|e| {
            let mut m = map_of(vec![
                ("name", Dynamic::from(e.name.clone())),
                ("ms", Dynamic::from_float(e.ms / per)),
                ("calls", Dynamic::from_float(e.calls as f64 / per)),
            ]);
            if with_kind {
                m.insert("kind".into(), Dynamic::from(profile::kind(&e.name).to_string()));
            }
            Dynamic::from_map(m)
        })
        .collect()
}

/// Option `key` of `opts` as a number satisfying `ok` (NaN never does),
/// else `default`.
fn number(opts: &Map, key: &str, default: f64, ok: fn(f64) -> bool, rule: &str) -> RResult<f64> {
    let Some(v) = opts.get(key) else { return Ok(default) };
    let n = as_number(v, &format!("profile(): {key}"))?;
    if !ok(n) {
        return Err(rerr(format!("profile(): {key} must be {rule}, got {n}")));
    }
    Ok(n)
}

fn run(ctx: &NativeCallContext, f: &FnPtr, opts: &Map) -> RResult<Map> {
    check_keys(opts, KEYS, "profile()")?;
    let trace = match opts.get("trace") {
        Some(v) => Some(PathBuf::from(expect_str(v, "profile(): trace")?)),
        None => None,
    };
    let top = number(opts, "top", 20.0, |n| n >= 0.0, ">= 0")? as usize;
    // Per-call figures: divide by the number of steps the closure ran.
    let per = number(opts, "per", 1.0, |n| n > 0.0, "> 0")?;
    let (out, rep) = profile::run(trace.as_deref(), || {
        let r = f.call_within_context::<Dynamic>(ctx, ());
        // The last kernels are recorded only once they have finished.
        if tch::Cuda::is_available() {
            for d in 0..tch::Cuda::device_count() {
                tch::Cuda::synchronize(d);
            }
        }
        r
    })
    .map_err(rerr)?;
    let out = out?;
    let by_kind: Map =
        rep.by_kind().into_iter().map(|(k, ms)| (k.into(), Dynamic::from_float(ms / per))).collect();
    Ok(map_of(vec![
        ("result", out),
        ("gpu_ms", Dynamic::from_float(rep.gpu_ms() / per)),
        ("kernel_calls", Dynamic::from_float(rep.kernel_calls() as f64 / per)),
        ("by_kind", Dynamic::from_map(by_kind)),
        ("top", Dynamic::from_array(entries(&rep.kernels, top, per, true))),
        ("cpu_top", Dynamic::from_array(entries(&rep.cpu_ops, top, per, false))),
        ("distinct_kernels", Dynamic::from_int(rep.kernels.len() as INT)),
    ]))
}

pub fn register(engine: &mut Engine, docs: &mut Vec<DocEntry>) {
    let mut api = Api::new(engine, docs);
    api.group("Profiling");
    api.f(
        "profile",
        "f",
        "Run `f` under libtorch's profiler (the one behind torch.profiler) and return `#{ result, gpu_ms, kernel_calls, by_kind, top, cpu_top, distinct_kernels }`: device time in ms summed over every kernel, copy and memset; `by_kind` groups it as `benchmarks/profile_gpt2_torch.py` does (matmul, attention, norm, loss, optimizer, embedding, knlp fused (nvrtc), other elementwise/copy); `top` the 20 longest kernels `#{ name, ms, calls, kind }`; `cpu_top` the CPU operators by inclusive time. CUDA devices are synchronised before the profiler stops.",
        |ctx: NativeCallContext, f: FnPtr| run(&ctx, &f, &Map::new()),
    );
    api.f(
        "profile",
        "f, opts",
        "`profile(f)` with options: `trace` (write a Chrome trace there, for chrome://tracing or Perfetto), `top` (entries in `top` and `cpu_top`, default 20), `per` (divide every time and call count by this, e.g. the number of steps `f` ran).",
        |ctx: NativeCallContext, f: FnPtr, opts: Map| run(&ctx, &f, &opts),
    );
}
