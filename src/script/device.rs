//! Device and precision switches for scripts (through the C++ shim).
use rhai::{Dynamic, Engine, FnPtr, Map, NativeCallContext, INT};

use super::api::{Api, DocEntry};
use super::value::{map_of, rerr, OrScript, RResult};
use crate::shim::{self, AutocastDtype};

pub fn register(engine: &mut Engine, docs: &mut Vec<DocEntry>) {
    let mut api = Api::new(engine, docs);
    api.group("Device and precision");
    api.f("cuda_available", "", "True when libtorch sees at least one CUDA device.", tch::Cuda::is_available);
    api.f("cuda_device_count", "", "Number of visible CUDA devices.", || tch::Cuda::device_count() as INT);
    api.f(
        "cuda_synchronize",
        "",
        "Wait for all queued CUDA work on device 0 (for timing).",
        || -> RResult<()> {
            if !tch::Cuda::is_available() {
                return Err(rerr("cuda_synchronize(): CUDA is not available on this machine"));
            }
            tch::Cuda::synchronize(0);
            Ok(())
        },
    );
    api.f(
        "set_tf32",
        "on",
        "Allow TF32 tensor cores for fp32 matmuls and convolutions on CUDA (PyTorch's default is off).",
        |on: bool| shim::set_tf32(on).rt(),
    );
    api.f("tf32", "", "Whether TF32 is allowed for fp32 matmuls.", || shim::tf32().rt());
    api.f(
        "set_fused_kernels",
        "on",
        "Use knlp's run-time compiled (NVRTC) GPU kernels where it has them, such as the exact pruning mask update (on by default; `KNLP_FUSED_KERNELS=0` starts with them off). Off: libtorch ops only.",
        crate::kernels::set_enabled,
    );
    api.f(
        "set_fused_add_layer_norm",
        "on",
        "Route GPT-2's residual add and the layer norm after it through one run-time compiled kernel each way (CUDA, bf16 autocast, training forwards without hooks; docs/gpu.md). Off by default until measured on a GPU; `KNLP_FUSED_LN=1` starts with it on.",
        crate::kernels::norm::set_enabled,
    );
    api.f(
        "fused_kernels",
        "",
        "The fused GPU kernels' state: `#{ enabled, add_layer_norm, available, runtime }` (available: CUDA device 0 can run them; runtime: NVRTC's version and path, or why it is missing).",
        || -> Map {
            let dev = tch::Device::Cuda(0);
            let avail = tch::Cuda::is_available() && crate::kernels::available(dev).is_ok();
            let runtime = if tch::Cuda::is_available() {
                crate::kernels::describe()
            } else {
                "no CUDA device".to_string()
            };
            map_of(vec![
                ("enabled", Dynamic::from_bool(crate::kernels::enabled())),
                ("add_layer_norm", Dynamic::from_bool(crate::kernels::norm::enabled())),
                ("available", Dynamic::from_bool(avail)),
                ("runtime", Dynamic::from(runtime)),
            ])
        },
    );
    api.f(
        "set_deterministic",
        "on",
        "torch.use_deterministic_algorithms(on), plus deterministic cuDNN.",
        |on: bool| shim::set_deterministic(on).rt(),
    );
    api.f("deterministic", "", "Whether deterministic algorithms are enforced.", || {
        shim::deterministic().rt()
    });
    api.f("autocast", "dtype, f", "Call `f` with CUDA autocast in `\"bf16\"` or `\"fp16\"`; returns its result (no effect on CPU tensors).", |ctx: NativeCallContext, dtype: &str, f: FnPtr| -> RResult<Dynamic> {
        let d = match dtype.to_ascii_lowercase().as_str() {
            "bf16" | "bfloat16" => AutocastDtype::BF16,
            "fp16" | "f16" | "half" | "float16" => AutocastDtype::F16,
            other => return Err(rerr(format!("autocast(): dtype must be \"bf16\" or \"fp16\", got \"{other}\""))),
        };
        shim::with_autocast(d, || f.call_within_context::<Dynamic>(&ctx, ())).rt()?
    });
    api.f(
        "autocast_enabled",
        "",
        "Whether CUDA autocast is on for this thread, and its dtype: `#{ enabled, dtype }`.",
        || -> RResult<Map> {
            let (on, d) = shim::autocast().rt()?;
            let name = if d == AutocastDtype::BF16 { "bfloat16" } else { "float16" };
            Ok(map_of(vec![("enabled", Dynamic::from_bool(on)), ("dtype", Dynamic::from(name.to_string()))]))
        },
    );
    api.f("cuda_memory", "", "CUDA allocator statistics of device 0 in bytes: `#{ allocated, peak_allocated, reserved, peak_reserved }`.", || cuda_memory(0));
    api.f("cuda_memory", "device", "CUDA allocator statistics of a device in bytes.", |d: INT| {
        cuda_memory(d)
    });
    api.f("cuda_reset_peak_memory", "", "Reset the peak statistics of device 0.", || {
        shim::reset_peak_memory(0).rt()
    });
    api.f("cuda_empty_cache", "", "Return cached, unused CUDA memory to the driver.", || {
        shim::empty_cache().rt()
    });
    api.f(
        "set_num_threads",
        "n",
        "Number of CPU threads libtorch uses for intra-op parallelism.",
        |n: INT| -> RResult<()> {
            if n < 1 {
                return Err(rerr("set_num_threads(): n must be at least 1"));
            }
            tch::set_num_threads(n as i32);
            Ok(())
        },
    );
    api.f("num_threads", "", "Number of CPU threads libtorch uses.", || tch::get_num_threads() as INT);
}

fn cuda_memory(device: INT) -> RResult<Map> {
    if device < 0 {
        return Err(rerr("cuda_memory(): device must be non-negative"));
    }
    let s = shim::memory_stats(device as usize).rt()?;
    Ok(map_of(vec![
        ("allocated", Dynamic::from_int(s.allocated)),
        ("peak_allocated", Dynamic::from_int(s.peak_allocated)),
        ("reserved", Dynamic::from_int(s.reserved)),
        ("peak_reserved", Dynamic::from_int(s.peak_reserved)),
    ]))
}
