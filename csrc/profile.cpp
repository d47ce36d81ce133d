// knlp profiler shim: libtorch's Kineto profiler (what torch.profiler runs)
// for Rust. start() enables it on the calling thread, with CUDA activity when
// asked; stop() disables it, keeps every event's name, device and duration
// for knlp_profile_event(), and optionally writes a Chrome trace.
#include <torch/csrc/autograd/profiler_kineto.h>
#include "guard.h"
#include <cstdint>
#include <set>
#include <string>
#include <vector>

namespace {
thread_local std::string last_error;

template <typename F>
int guarded(F&& f) {
  return knlp_shim::guarded(last_error, std::forward<F>(f));
}

struct Row {
  std::string name;
  int device;  // 0: a CPU operator, 1: device work (kernel, copy, memset)
  int64_t dur_ns;
};
thread_local std::vector<Row> rows;

namespace prof = torch::profiler::impl;
namespace ap = torch::autograd::profiler;

std::set<prof::ActivityType> activities(int cuda) {
  std::set<prof::ActivityType> a{prof::ActivityType::CPU};
  if (cuda) a.insert(prof::ActivityType::CUDA);
  return a;
}
}  // namespace

extern "C" {

const char* knlp_profile_last_error() { return last_error.c_str(); }

int knlp_profile_start(int cuda) {
  return guarded([&] {
    if (prof::profilerEnabled()) throw std::runtime_error("a profiler is already running on this thread");
    prof::ProfilerConfig cfg(prof::ProfilerState::KINETO);
    ap::prepareProfiler(cfg, activities(cuda));
    ap::enableProfiler(cfg, activities(cuda));
  });
}

// Stops the profiler, keeps its events and writes the Chrome trace to
// `trace` when it is not null. *n gets the number of events.
int knlp_profile_stop(const char* trace, int64_t* n) {
  return guarded([&] {
    rows.clear();
    auto result = ap::disableProfiler();
    for (const auto& e : result->events()) {
      rows.push_back(Row{e.name(), e.deviceType() == c10::DeviceType::CPU ? 0 : 1,
                         static_cast<int64_t>(e.durationNs())});
    }
    *n = static_cast<int64_t>(rows.size());
    if (trace) result->save(trace);
  });
}

// Event i of the last stop(): its name (valid until the next stop on this
// thread), whether it ran on the device, and its duration in ns.
int knlp_profile_event(int64_t i, const char** name, int* device, int64_t* dur_ns) {
  return guarded([&] {
    const auto& r = rows.at(static_cast<size_t>(i));
    *name = r.name.c_str();
    *device = r.device;
    *dur_ns = r.dur_ns;
  });
}
}
