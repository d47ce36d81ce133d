// knlp fused-op shim: libtorch autograd Functions whose forward and backward
// are Rust callbacks (src/fused.rs), so that a fused kernel compiled at run
// time has its own backward inside libtorch's autograd graph. A callback
// returns null on success or an error message, which becomes a C++
// exception here: in forward it reaches Rust as this shim's error, in
// backward it ends the backward pass with that message.
#include <torch/csrc/autograd/custom_function.h>
#include "guard.h"
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>

namespace {
thread_local std::string last_error;

template <typename F>
int guarded(F&& f) {
  return knlp_shim::guarded(last_error, std::forward<F>(f));
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// x, a, w, b (may be null), eps, y dtype -> out[4] = x1, y, mean, rstd
using AddLnFwd = const char* (*)(at::Tensor*, at::Tensor*, at::Tensor*, at::Tensor*, double, int, at::Tensor**);
// gx1 (may be null), gy (may be null), x1, w, b (may be null), mean, rstd,
// a dtype -> out[4] = gx, ga, gw, gb (gb null without a bias)
using AddLnBwd = const char* (*)(at::Tensor*, at::Tensor*, at::Tensor*, at::Tensor*, at::Tensor*, at::Tensor*,
                                 at::Tensor*, int, at::Tensor**);

at::Tensor* ptr(const at::Tensor& t) { return t.defined() ? const_cast<at::Tensor*>(&t) : nullptr; }

// Takes ownership of the callbacks' heap tensors (null: undefined).
at::Tensor take(at::Tensor*& p) {
  if (!p) return at::Tensor();
  at::Tensor t = std::move(*p);
  delete p;
  p = nullptr;
  return t;
}

struct AddLayerNorm : public torch::autograd::Function<AddLayerNorm> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& a, const at::Tensor& w,
                               const std::optional<at::Tensor>& b, double eps, int64_t y_kind, int64_t fwd, int64_t bwd) {
    at::Tensor* out[4] = {nullptr, nullptr, nullptr, nullptr};
    const char* err = reinterpret_cast<AddLnFwd>(fwd)(ptr(x), ptr(a), ptr(w), b ? ptr(*b) : nullptr, eps,
                                                        static_cast<int>(y_kind), out);
    at::Tensor x1 = take(out[0]), y = take(out[1]), mean = take(out[2]), rstd = take(out[3]);
    if (err) throw std::runtime_error(err);
    ctx->set_materialize_grads(false);
    ctx->saved_data["mean"] = mean;
    ctx->saved_data["rstd"] = rstd;
    ctx->saved_data["bwd"] = bwd;
    ctx->saved_data["a_kind"] = static_cast<int64_t>(a.scalar_type());
    ctx->save_for_backward({x1, w, b ? *b : at::Tensor()});
    return {x1, y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // The kernel path records no graph and the fallback treats mean and rstd
    // as constants: a second derivative would be silently wrong.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "fused add + layer norm: double backward (create_graph) is not supported; "
                "turn it off with set_fused_add_layer_norm(false)");
    auto saved = ctx->get_saved_variables();
    at::Tensor mean = ctx->saved_data["mean"].toTensor(), rstd = ctx->saved_data["rstd"].toTensor();
    auto bwd = reinterpret_cast<AddLnBwd>(ctx->saved_data["bwd"].toInt());
    const int a_kind = static_cast<int>(ctx->saved_data["a_kind"].toInt());
    at::Tensor* out[4] = {nullptr, nullptr, nullptr, nullptr};
    const char* err = bwd(ptr(grads[0]), ptr(grads[1]), ptr(saved[0]), ptr(saved[1]), ptr(saved[2]), ptr(mean),
                          ptr(rstd), a_kind, out);
    at::Tensor gx = take(out[0]), ga = take(out[1]), gw = take(out[2]), gb = take(out[3]);
    if (err) throw std::runtime_error(std::string("fused add + layer norm backward: ") + err);
    return {gx, ga, gw, gb, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};
}  // namespace

extern "C" {

const char* knlp_fused_last_error() { return last_error.c_str(); }

// (x1, y) = AddLayerNorm(x, a, w, b): x1 = x + a, y = layer_norm(x1) in
// dtype y_kind, differentiable through the callbacks.
int knlp_add_layer_norm(at::Tensor* x, at::Tensor* a, at::Tensor* w, at::Tensor* b, double eps, int y_kind,
                        void* fwd, void* bwd, at::Tensor** x1, at::Tensor** y) {
  return guarded([&] {
    auto out = AddLayerNorm::apply(*x, *a, *w, b ? std::optional<at::Tensor>(*b) : std::nullopt, eps, static_cast<int64_t>(y_kind),
                                   reinterpret_cast<int64_t>(fwd), reinterpret_cast<int64_t>(bwd));
    *x1 = new at::Tensor(out[0]);
    *y = new at::Tensor(out[1]);
  });
}
}
