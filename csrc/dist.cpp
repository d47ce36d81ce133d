// knlp distributed shim: libtorch's own c10d (TCPStore, ProcessGroupGloo and,
// when built with the CUDA headers, ProcessGroupNCCL) behind a C ABI.
// Every entry point catches C++ exceptions and reports them through an error
// buffer, so a c10d error (a peer gone, a timeout) never unwinds into Rust.
#include <ATen/ATen.h>
#include "guard.h"
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#ifdef KNLP_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef KNLP_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#include <chrono>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace {
thread_local std::string dist_error;

template <typename F>
int guarded(F&& f) {
  return knlp_shim::guarded(dist_error, std::forward<F>(f));
}

struct Store {
  c10::intrusive_ptr<c10d::Store> store;
};

// One process group: its store namespace and the backend.
struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  int64_t barriers = 0;
};

c10d::ReduceOp reduce_op(int op) {
  switch (op) {
    case 1: return c10d::ReduceOp::MAX;
    case 2: return c10d::ReduceOp::MIN;
    default: return c10d::ReduceOp::SUM;
  }
}

std::chrono::milliseconds ms(double seconds) {
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000.0));
}
}  // namespace

extern "C" {

const char* knlp_dist_last_error() { return dist_error.c_str(); }

int knlp_dist_has_gloo() {
#ifdef KNLP_GLOO
  return 1;
#else
  return 0;
#endif
}

int knlp_dist_has_nccl() {
#ifdef KNLP_NCCL
  return 1;
#else
  return 0;
#endif
}

// Connect to (rank 0 without torchrun's agent store: host) the TCPStore at
// host:port. prefix: a key namespace ("" for none; torchrun's ranks use
// /worker/attempt_<restart count>).
int knlp_dist_store_new(const char* host, int port, int world, int server, const char* prefix,
                        double timeout_s, void** out) {
  return guarded([&] {
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(port);
    so.isServer = server != 0;
    so.numWorkers = world;
    // The process groups' own rendezvous waits for every rank.
    so.waitWorkers = false;
    so.timeout = ms(timeout_s);
    c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::TCPStore>(std::string(host), so);
    if (prefix && *prefix) store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), store);
    *out = new Store{store};
  });
}

void knlp_dist_store_free(void* s) { delete static_cast<Store*>(s); }

// A process group over the store, its keys under `name` (one group per
// backend). backend: 0 Gloo, 1 NCCL. cuda_device: NCCL's device.
int knlp_dist_new(void* st, const char* name, int backend, int rank, int world, double timeout_s,
                  const char* host, const char* ifname, int cuda_device, void** out) {
  return guarded([&] {
    c10::intrusive_ptr<c10d::Store> store =
        c10::make_intrusive<c10d::PrefixStore>(std::string(name), static_cast<Store*>(st)->store);
    auto g = std::make_unique<Group>(Group{store, {}});
    if (backend == 1) {
#ifdef KNLP_NCCL
      c10::cuda::set_device(static_cast<c10::DeviceIndex>(cuda_device));
      auto o = c10d::ProcessGroupNCCL::Options::create();
      o->timeout = ms(timeout_s);
      g->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, o);
#else
      (void)cuda_device;
      throw std::runtime_error("this knlp was built without NCCL (the CUDA headers were missing at build time)");
#endif
    } else {
#ifdef KNLP_GLOO
      std::string h(host);
      c10::intrusive_ptr<c10d::ProcessGroupGloo::Options> o;
      if (ifname && *ifname) {
        o = c10d::ProcessGroupGloo::Options::create(ms(timeout_s));
        o->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
      } else if (h == "127.0.0.1" || h == "localhost" || h == "::1") {
        o = c10d::ProcessGroupGloo::Options::create(ms(timeout_s));
        o->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
      } else {
        o = c10d::ProcessGroupGloo::Options::create_default(ms(timeout_s));
      }
      g->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, o);
#else
      (void)host;
      (void)ifname;
      throw std::runtime_error("this knlp was built without Gloo (install libgloo-dev and rebuild)");
#endif
    }
    *out = g.release();
  });
}

void knlp_dist_free(void* g) { delete static_cast<Group*>(g); }

// In place over one contiguous tensor. op: 0 sum, 1 max, 2 min.
int knlp_dist_all_reduce(void* g, at::Tensor* t, int op) {
  return guarded([&] {
    std::vector<at::Tensor> ts{*t};
    c10d::AllreduceOptions o;
    o.reduceOp = reduce_op(op);
    static_cast<Group*>(g)->backend->allreduce(ts, o)->wait();
  });
}

int knlp_dist_broadcast(void* g, at::Tensor* t, int src) {
  return guarded([&] {
    std::vector<at::Tensor> ts{*t};
    c10d::BroadcastOptions o;
    o.rootRank = src;
    static_cast<Group*>(g)->backend->broadcast(ts, o)->wait();
  });
}

int knlp_dist_barrier(void* g) {
  return guarded([&] {
    // A barrier through the store: it works the same for every backend and
    // needs no device (NCCL's own barrier guesses one).
    auto* grp = static_cast<Group*>(g);
    std::string key = "knlp/barrier/" + std::to_string(grp->barriers++);
    // The last rank to arrive opens the gate; waiting has the store's timeout.
    if (grp->store->add(key, 1) == grp->backend->getSize()) grp->store->set(key + "/open", std::vector<uint8_t>{1});
    grp->store->wait({key + "/open"});
  });
}

}  // extern "C"
