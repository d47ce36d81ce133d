// knlp C++ shim: the few libtorch switches and kernels that tch 0.24 does not bind.
// Every entry point catches C++ exceptions and reports them through an error
// buffer, so a libtorch error never unwinds into Rust.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/DeviceAccelerator.h>
#include <ATen/autocast_mode.h>
#include <torch/headeronly/version.h>
#include <cstring>
#include <string>

namespace {
thread_local std::string last_error;

template <typename F>
int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
  } catch (...) {
    last_error = "unknown C++ exception";
  }
  return 1;
}
}  // namespace

extern "C" {

const char* knlp_shim_last_error() { return last_error.c_str(); }

const char* knlp_torch_version() { return TORCH_VERSION; }

// TF32 for fp32 matmuls (cuBLAS) and convolutions (cuDNN).
int knlp_set_tf32(int on) {
  return guarded([&] {
    at::globalContext().setAllowTF32CuBLAS(on != 0);
    at::globalContext().setAllowTF32CuDNN(on != 0);
  });
}

int knlp_get_tf32(int* out) {
  return guarded([&] { *out = at::globalContext().allowTF32CuBLAS() ? 1 : 0; });
}

// Autocast on CUDA with the given dtype (0 = fp16, 1 = bf16). The state is
// thread-local in libtorch, like grad mode.
int knlp_set_autocast(int enabled, int dtype) {
  return guarded([&] {
    at::autocast::set_autocast_dtype(at::kCUDA, dtype == 1 ? at::kBFloat16 : at::kHalf);
    at::autocast::set_autocast_enabled(at::kCUDA, enabled != 0);
    if (!enabled) at::autocast::clear_cache();
  });
}

int knlp_get_autocast(int* enabled, int* dtype) {
  return guarded([&] {
    *enabled = at::autocast::is_autocast_enabled(at::kCUDA) ? 1 : 0;
    *dtype = at::autocast::get_autocast_dtype(at::kCUDA) == at::kBFloat16 ? 1 : 0;
  });
}

int knlp_set_deterministic(int on, int warn_only) {
  return guarded([&] {
    at::globalContext().setDeterministicAlgorithms(on != 0, warn_only != 0);
    at::globalContext().setDeterministicCuDNN(on != 0);
  });
}

int knlp_get_deterministic(int* out) {
  return guarded([&] { *out = at::globalContext().deterministicAlgorithms() ? 1 : 0; });
}

// Allocator statistics of the current accelerator (CUDA here), in bytes.
// out = [allocated, peak allocated, reserved, peak reserved]
int knlp_memory_stats(int device, int64_t* out) {
  return guarded([&] {
    auto s = at::accelerator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    const auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    out[0] = s.allocated_bytes[agg].current;
    out[1] = s.allocated_bytes[agg].peak;
    out[2] = s.reserved_bytes[agg].current;
    out[3] = s.reserved_bytes[agg].peak;
  });
}

int knlp_reset_peak_memory(int device) {
  return guarded([&] { at::accelerator::resetPeakStats(static_cast<c10::DeviceIndex>(device)); });
}

int knlp_empty_cache() {
  return guarded([&] { at::accelerator::emptyCache(); });
}

int knlp_has_accelerator(int* out) {
  return guarded([&] { *out = at::accelerator::getAccelerator(false).has_value() ? 1 : 0; });
}

}  // extern "C"
