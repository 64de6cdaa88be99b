// The optional NCCL engine for data-parallel pretraining on GPUs: libtorch's own
// ProcessGroupNCCL (libtorch_cuda.so) behind the same C face as the Gloo group (c10d.h), built
// as a plugin (tools/build_nccl_plugin.sh, on a machine with the CUDA headers) and dlopened by
// src/train/dist.rs only where CUDA is, so the CPU build needs none of it.
#include "c10d.h"

#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include <chrono>

extern "C" {

// An NCCL group of `world` ranks over the store; this rank's GPU is `device`.
ehm_pg* ehm_pg_nccl_new(ehm_store* s, int rank, int world, int64_t timeout_ms, int device,
                        char* err, size_t n) {
  ehm_pg* out = nullptr;
  ehm_c10d::guard(err, n, [&] {
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = std::chrono::milliseconds(timeout_ms);
    c10::intrusive_ptr<c10d::Store> store = s->store;
    auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, opts);
    out = new ehm_pg{c10::intrusive_ptr<c10d::Backend>(std::move(pg))};
  });
  return out;
}

}  // extern "C"
