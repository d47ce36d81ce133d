// One way for every shim entry point to report a C++ exception: catch it,
// keep its message in a per-translation-unit, per-thread buffer, return 1.
// A libtorch error then never unwinds into Rust.
#pragma once
#include <exception>
#include <string>
#include <utility>

namespace knlp_shim {
template <typename F>
int guarded(std::string& error, F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    error = e.what();
  } catch (...) {
    error = "unknown C++ exception";
  }
  return 1;
}
}  // namespace knlp_shim
