// knlp C++ shim: the few libtorch switches and kernels that tch 0.24 does not bind.
// Every entry point catches C++ exceptions and reports them through an error
// buffer, so a libtorch error never unwinds into Rust.
#include <ATen/ATen.h>
#include "guard.h"
#include <ATen/Context.h>
#include <ATen/DeviceAccelerator.h>
#include <ATen/autocast_mode.h>
#include <torch/headeronly/version.h>
#include <cstring>
#include <mutex>
#include <vector>
#include <string>

namespace {
thread_local std::string last_error;

template <typename F>
int guarded(F&& f) {
  return knlp_shim::guarded(last_error, std::forward<F>(f));
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

// Point `t` at the storage of `src` (PyTorch's `t.data = src`): every alias
// of `t` sees the new storage. Used to move parameters into flat buffers.
int knlp_set_data(at::Tensor* t, at::Tensor* src) {
  return guarded([&] { t->set_data(*src); });
}

// Give `t` a pre-allocated gradient tensor; autograd then accumulates into
// it in place (AccumulateGrad adds into a defined grad when grad mode is
// off), so gradients land in one flat buffer.
int knlp_set_grad(at::Tensor* t, at::Tensor* g) {
  return guarded([&] { t->mutable_grad() = *g; });
}

// ATen's fused AdamW over lists of tensors (one launch per list). `step` is
// a float32 scalar tensor per parameter tensor, as torch.optim keeps it.
int knlp_fused_adamw(at::Tensor** params, at::Tensor** grads, at::Tensor** exp_avgs,
                     at::Tensor** exp_avg_sqs, at::Tensor** max_exp_avg_sqs, at::Tensor** steps,
                     int n, double lr, double beta1, double beta2, double weight_decay, double eps,
                     int amsgrad, int adam_w) {
  return guarded([&] {
    std::vector<at::Tensor> p, g, m, v, mx, st;
    for (int i = 0; i < n; ++i) {
      p.push_back(*params[i]);
      g.push_back(*grads[i]);
      m.push_back(*exp_avgs[i]);
      v.push_back(*exp_avg_sqs[i]);
      if (amsgrad) mx.push_back(*max_exp_avg_sqs[i]);
      st.push_back(*steps[i]);
    }
    if (adam_w) {
      at::_fused_adamw_(p, g, m, v, mx, st, lr, beta1, beta2, weight_decay, eps, amsgrad != 0, false);
    } else {
      at::_fused_adam_(p, g, m, v, mx, st, lr, beta1, beta2, weight_decay, eps, amsgrad != 0, false);
    }
  });
}

// State of libtorch's default generator on `device` (-1 = CPU, else the
// CUDA device index), as the uint8 tensor torch.get_rng_state() returns.
int knlp_get_rng_state(int device, at::Tensor** out) {
  return guarded([&] {
    c10::Device d = device < 0 ? c10::Device(c10::kCPU) : c10::Device(c10::kCUDA, device);
    auto gen = at::globalContext().defaultGenerator(d);
    std::lock_guard<std::mutex> lock(gen.mutex());
    *out = new at::Tensor(gen.get_state());
  });
}

int knlp_set_rng_state(int device, at::Tensor* state) {
  return guarded([&] {
    c10::Device d = device < 0 ? c10::Device(c10::kCPU) : c10::Device(c10::kCUDA, device);
    auto gen = at::globalContext().defaultGenerator(d);
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(*state);
  });
}

// A number as the 0-d tensor ATen's Scalar overloads build internally (a
// "wrapped number": it takes part in type promotion as a Python scalar does,
// never widening a tensor within its category). Tensor ops given this
// instead of a tch::Scalar report errors as Results: tch checks libtorch's
// error flag when a temporary Scalar is freed, and panics on an error the
// operation itself left there.
// kind: 0 float (double), 1 int (int64), 2 bool.
int knlp_wrapped_number(int kind, int64_t i, double f, at::Tensor** out) {
  return guarded([&] {
    at::Tensor t = kind == 1   ? at::scalar_tensor(at::Scalar(i), at::kLong)
                   : kind == 2 ? at::scalar_tensor(at::Scalar(i != 0), at::kBool)
                               : at::scalar_tensor(at::Scalar(f), at::kDouble);
    t.unsafeGetTensorImpl()->set_wrapped_number(true);
    *out = new at::Tensor(std::move(t));
  });
}

int knlp_has_accelerator(int* out) {
  return guarded([&] { *out = at::accelerator::getAccelerator(false).has_value() ? 1 : 0; });
}

}  // extern "C"
