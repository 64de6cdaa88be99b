// A C face for the parts of PyTorch's c10d that data-parallel pretraining uses: the TCPStore
// (rendezvous, heartbeats), and the Gloo process group (all-reduce, broadcast). These
// are the same objects torch.distributed and DDP use, taken from the libtorch_cpu.so tch
// already loads; nothing here is a home-made collective. Compiled by build.rs; called from
// src/train/dist.rs. Every function catches C++ exceptions and returns -1 (or NULL) with a
// one-line message in `err`.
#include "c10d.h"

#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include <chrono>

using ehm_c10d::guard;

extern "C" {

// Connect to (or, with is_server, host) the TCPStore at host:port. A server with port 0
// picks a free port (ehm_store_port). `workers` > 0: the server waits for that many clients
// (torch's rank-0-hosts-the-store mode); 0: it does not wait (an agent's store).
ehm_store* ehm_store_open(const char* host, uint16_t port, int is_server, int workers,
                          int64_t timeout_ms, char* err, size_t n) {
  ehm_store* out = nullptr;
  guard(err, n, [&] {
    c10d::TCPStoreOptions o;
    o.port = port;
    o.isServer = is_server != 0;
    if (workers > 0) {
      o.numWorkers = static_cast<size_t>(workers);
      o.waitWorkers = true;
    } else {
      o.waitWorkers = false;
    }
    o.timeout = std::chrono::milliseconds(timeout_ms);
    auto s = c10::make_intrusive<c10d::TCPStore>(std::string(host), o);
    out = new ehm_store{std::move(s)};
  });
  return out;
}

int ehm_store_port(const ehm_store* s) { return s->store->getPort(); }

// store.add(key, delta): the counter's new value into *value (delta 0 reads it).
int ehm_store_add(ehm_store* s, const char* key, int64_t delta, int64_t* value, char* err,
                  size_t n) {
  return guard(err, n, [&] { *value = s->store->add(std::string(key), delta); });
}

void ehm_store_free(ehm_store* s) { delete s; }

// A Gloo process group of `world` ranks over the store, every collective bounded by timeout.
ehm_pg* ehm_pg_new(ehm_store* s, int rank, int world, int64_t timeout_ms, char* err,
                   size_t n) {
  ehm_pg* out = nullptr;
  guard(err, n, [&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    auto opts = c10d::ProcessGroupGloo::Options::create_default(timeout);
    c10::intrusive_ptr<c10d::Store> store = s->store;
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, opts);
    out = new ehm_pg{c10::intrusive_ptr<c10d::Backend>(std::move(pg))};
  });
  return out;
}

// In-place sum over the ranks (the caller divides for a mean: Gloo has no AVG); timeout_ms > 0
// replaces the group's timeout for this call.
int ehm_pg_all_reduce_sum(ehm_pg* p, at::Tensor* t, int64_t timeout_ms, char* err, size_t n) {
  return guard(err, n, [&] {
    std::vector<at::Tensor> ts{*t};
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    if (timeout_ms > 0) o.timeout = std::chrono::milliseconds(timeout_ms);
    p->pg->allreduce(ts, o)->wait();
  });
}

// In place: every rank's `t` becomes root's.
int ehm_pg_broadcast(ehm_pg* p, at::Tensor* t, int root, char* err, size_t n) {
  return guard(err, n, [&] {
    std::vector<at::Tensor> ts{*t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    p->pg->broadcast(ts, o)->wait();
  });
}

void ehm_pg_free(ehm_pg* p) { delete p; }

}  // extern "C"
