// The objects both shims share (this file and the optional NCCL plugin, c10d_nccl.cpp).
#pragma once
#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <cstring>
#include <string>

namespace ehm_c10d {

// Copy the first line of a message into err (C string, truncated to n bytes).
inline void put(char* err, size_t n, const std::string& msg) {
  if (err == nullptr || n == 0) return;
  std::string line = msg.substr(0, msg.find('\n'));
  size_t len = std::min(line.size(), n - 1);
  std::memcpy(err, line.data(), len);
  err[len] = '\0';
}

// Run f; a C++ exception becomes -1 and its message's first line in err.
template <typename F>
int guard(char* err, size_t n, F&& f) {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    put(err, n, e.what_without_backtrace());
  } catch (const std::exception& e) {
    put(err, n, e.what());
  } catch (...) {
    put(err, n, "unknown C++ exception");
  }
  return -1;
}

}  // namespace ehm_c10d

struct ehm_store {
  c10::intrusive_ptr<c10d::TCPStore> store;
};

// A process group of either engine (Gloo here, NCCL from the plugin): collectives are
// virtual on c10d::Backend.
struct ehm_pg {
  c10::intrusive_ptr<c10d::Backend> pg;
};
