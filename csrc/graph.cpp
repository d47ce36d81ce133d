// knlp CUDA graph shim: one at::cuda::CUDAGraph behind an opaque pointer.
// Capture runs on a side stream from the pool (never the legacy default
// stream) that a CUDAStreamGuard keeps current from enter_stream (warm-up)
// until capture_end or exit_stream; replays run on the caller's stream.
// build.rs compiles this file when the CUDA headers are found, and
// graph_none.cpp (the same entry points, reporting that) otherwise.
// Every entry point catches C++ exceptions and reports them through an error
// buffer, so a libtorch error never unwinds into Rust.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/core/StreamGuard.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <optional>
#include <stdexcept>
#include <string>

#include "guard.h"

namespace {
thread_local std::string graph_error;

template <typename F>
int guarded(F&& f) {
  return knlp_shim::guarded(graph_error, std::forward<F>(f));
}

struct Graph {
  at::cuda::CUDAGraph graph;
  // Holds the side stream current between enter_stream and capture_end / exit_stream.
  // The generic guard (through the CUDA guard registered by libc10_cuda):
  // c10::cuda::CUDAStreamGuard's inline implementation would call the CUDA
  // runtime from here, which knlp does not link.
  std::optional<c10::StreamGuard> guard;
  bool capturing = false;
  bool captured = false;
};

// Switch the calling thread to a pool side stream on the current device,
// after every earlier kernel on the device finished (the side stream must
// see the prefill's writes).
void enter(Graph* g) {
  if (g->guard) return;
  c10::cuda::device_synchronize();
  g->guard.emplace(c10::cuda::getStreamFromPool().unwrap());
}

// Back to the previous stream once the side stream's work is done.
void leave(Graph* g) {
  if (!g->guard) return;
  g->guard->current_stream().synchronize();
  g->guard.reset();
}
}  // namespace

extern "C" {

const char* knlp_graph_last_error() { return graph_error.c_str(); }

int knlp_graph_supported() { return 1; }

int knlp_graph_new(void** out) {
  return guarded([&] {
    *out = new Graph();
  });
}

// Make a pool side stream current (warm-up runs there before capture).
int knlp_graph_enter_stream(void* p) {
  return guarded([&] {
    enter(static_cast<Graph*>(p));
  });
}

// Leave the side stream without capturing (after its work finished).
int knlp_graph_exit_stream(void* p) {
  return guarded([&] {
    auto* g = static_cast<Graph*>(p);
    if (g->capturing) throw std::runtime_error("cuda graph: exit_stream during capture");
    leave(g);
  });
}

// Start capturing on the side stream (entered here if it is not yet).
int knlp_graph_capture_begin(void* p) {
  return guarded([&] {
    auto* g = static_cast<Graph*>(p);
    if (g->captured || g->capturing) throw std::runtime_error("cuda graph: already captured");
    enter(g);
    g->guard->current_stream().synchronize();
    // Thread-local: CUDA calls of other threads (loaders, monitors) stay legal.
    g->graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
    g->capturing = true;
  });
}

// End the capture (instantiating the graph) and leave the side stream,
// also when the capture failed.
int knlp_graph_capture_end(void* p) {
  return guarded([&] {
    auto* g = static_cast<Graph*>(p);
    if (!g->capturing) throw std::runtime_error("cuda graph: capture_end without capture_begin");
    g->capturing = false;
    try {
      g->graph.capture_end();
    } catch (...) {
      g->guard.reset();
      throw;
    }
    g->captured = true;
    leave(g);
  });
}

// Launch the captured work on the current stream.
int knlp_graph_replay(void* p) {
  return guarded([&] {
    auto* g = static_cast<Graph*>(p);
    if (!g->captured) throw std::runtime_error("cuda graph: replay before a completed capture");
    g->graph.replay();
  });
}

// The current CUDA device (graphs capture and replay there).
int knlp_graph_current_device(int* out) {
  return guarded([&] {
    *out = static_cast<int>(c10::cuda::current_device());
  });
}

// The current CUDA stream of `device` (a cudaStream_t, which is a driver
// CUstream): the run-time compiled kernels (src/kernels) launch on it, so
// they are ordered with libtorch's work and captured into graphs.
int knlp_graph_current_stream(int device, void** out) {
  return guarded([&] {
    *out = static_cast<void*>(c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream());
  });
}

// Wait for the current CUDA stream of the current device.
int knlp_graph_stream_sync() {
  return guarded([&] {
    c10::cuda::getCurrentCUDAStream().unwrap().synchronize();
  });
}

void knlp_graph_free(void* p) {
  auto* g = static_cast<Graph*>(p);
  if (g == nullptr) return;
  try {
    if (g->capturing) {
      g->capturing = false;
      g->graph.capture_end();
    }
  } catch (...) {
  }
  try {
    g->guard.reset();
  } catch (...) {
  }
  delete g;
}

}  // extern "C"
