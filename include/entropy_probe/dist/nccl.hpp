// The communicator seam on NCCL, for the CUDA backend (link entropy_probe::nccl;
// only for sources compiled by nvcc, like tensor/cuda_backend.hpp).
//
// Parameter buffers (Communicator::allreduce_sum_device) are summed by
// ncclAllReduce in device memory, on the CudaContext's stream, so they never
// cross the bus. Everything on the host (counts, per-prompt values,
// broadcasts) and the handing out of the ncclUniqueId go through a host
// communicator of the same ranks, normally an MpiCommunicator:
//
//   ep::MpiSession mpi(argc, argv);
//   ep::MpiCommunicator host;
//   cudaSetDevice(local_rank);             // one GPU per rank: NCCL refuses two ranks on one
//   ep::NcclCommunicator comm(host);       // collective: every rank constructs it
//   ep::OfflineEntropyProbe probe(model, config, &comm);
//
// Every ncclResult_t is checked and turned into an entropy_probe::Error naming
// the call, e.g. "ncclCommInitRank(rank 1 of 2, device 0) failed: invalid usage (...)".
#pragma once

#if !defined(__CUDACC__)
#error \
    "entropy_probe/dist/nccl.hpp needs the CUDA compiler: include it from a .cu source built by nvcc (docs/distributed.md)"
#endif

#include "entropy_probe/comm/comm.hpp"
#include "entropy_probe/core/error.hpp"
#include "entropy_probe/tensor/cuda_backend.hpp"

#include <cuda_runtime.h>
#include <fmt/format.h>
#include <nccl.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <utility>

namespace entropy_probe {

namespace nccl_detail {

// Throws an Error "<call> failed: <NCCL's description> (<NCCL's last message>)"
// unless r is success.
template <class... Args>
void check(ncclResult_t r, fmt::format_string<Args...> call, Args&&... args) {
  if (r == ncclSuccess) return;
  const char* last = ncclGetLastError(nullptr);
  throw Error(fmt::format("{} failed: {}{}", fmt::format(call, std::forward<Args>(args)...), ncclGetErrorString(r),
                          last && *last ? fmt::format(" ({})", last) : std::string()));
}

template <class T>
constexpr ncclDataType_t data_type() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "NCCL reductions here take float or double");
  return std::is_same_v<T, float> ? ncclFloat : ncclDouble;
}

inline std::string version_str() {
  int v = 0;
  if (ncclGetVersion(&v) != ncclSuccess) return "unknown";
  // NCCL_VERSION(X, Y, Z) = X * 10000 + Y * 100 + Z since 2.9
  return fmt::format("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100);
}

}  // namespace nccl_detail

class NcclCommunicator final : public Communicator {
 public:
  // Collective over the ranks of `host`: rank 0 makes the ncclUniqueId and
  // broadcasts it through `host`, then every rank joins on the device of
  // `ctx` (the current device's context by default). `host` must outlive this.
  explicit NcclCommunicator(Communicator& host, CudaContext& ctx = CudaContext::current()) : host_(&host), ctx_(&ctx) {
    ncclUniqueId id{};
    if (host.rank() == 0) nccl_detail::check(ncclGetUniqueId(&id), "ncclGetUniqueId");
    // The id is an opaque 128-byte blob: it travels as int64 words.
    static_assert(sizeof(ncclUniqueId) % sizeof(std::int64_t) == 0);
    std::int64_t words[sizeof(ncclUniqueId) / sizeof(std::int64_t)];
    std::memcpy(words, &id, sizeof id);
    host.broadcast(std::span<std::int64_t>(words), 0);
    std::memcpy(&id, words, sizeof id);
    // ncclCommInitRank binds the communicator to the current device.
    int current = 0;
    cuda_detail::check(cudaGetDevice(&current), "cudaGetDevice");
    if (current != ctx.device()) cuda_detail::check(cudaSetDevice(ctx.device()), "cudaSetDevice({})", ctx.device());
    const ncclResult_t r = ncclCommInitRank(&comm_, host.world(), id, host.rank());
    if (current != ctx.device()) (void)cudaSetDevice(current);
    nccl_detail::check(r, "ncclCommInitRank(rank {} of {}, device {}; NCCL {})", host.rank(), host.world(),
                       ctx.device(), nccl_detail::version_str());
  }
  ~NcclCommunicator() override {
    // Errors cannot be reported from here; finalize flushes pending work first.
    if (!comm_) return;
    (void)ncclCommFinalize(comm_);
    (void)ncclCommDestroy(comm_);
  }
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return host_->rank(); }
  int world() const override { return host_->world(); }
  // Host values: through the host communicator (NCCL reduces device memory only).
  void allreduce_sum(std::span<double> values) override { host_->allreduce_sum(values); }
  using Communicator::allreduce_sum;
  void broadcast(std::span<std::int64_t> values, int root) override { host_->broadcast(values, root); }

  // CudaBackend memory: ncclAllReduce in place. Another backend's "device"
  // memory (a CPU stand-in) is staged through the host as by default.
  void allreduce_sum_device(const DeviceDoubles& values) override {
    if (std::string_view(values.backend) != CudaBackend::name) {
      Communicator::allreduce_sum_device(values);
      return;
    }
    allreduce_sum_device(values.data, values.size);
  }

  // In-place sum over ranks of n elements of device memory (float or double)
  // on the context's stream, after the work already queued there. Waits for
  // it: an error then names the collective, and a rank that lost its peers
  // fails here instead of hanging in whatever synchronises next. The probe
  // calls it once per parameter buffer, so the wait costs nothing measurable.
  template <class T>
  void allreduce_sum_device(T* device_data, std::size_t n) {
    if (n == 0) return;
    if (!comm_) fail<Error>("ncclAllReduce: the NCCL communicator was aborted after an earlier error");
    nccl_detail::check(
        ncclAllReduce(device_data, device_data, n, nccl_detail::data_type<T>(), ncclSum, comm_, ctx_->stream()),
        "ncclAllReduce({} elements of {} bytes, rank {} of {})", n, sizeof(T), rank(), world());
    synchronize("ncclAllReduce");
    device_bytes_reduced_ += n * sizeof(T);
    ++device_allreduce_calls_;
  }

  ncclComm_t nccl_comm() const { return comm_; }
  cudaStream_t stream() const { return ctx_->stream(); }
  Communicator& host() const { return *host_; }

  // Traffic counters of the device reductions (one call per parameter buffer).
  std::size_t device_bytes_reduced() const { return device_bytes_reduced_; }
  std::size_t device_allreduce_calls() const { return device_allreduce_calls_; }

 private:
  // Waits for the stream like cudaStreamSynchronize, but polls NCCL's
  // asynchronous error meanwhile: a collective whose peer or network failed
  // would otherwise block the stream for ever. On such an error the
  // communicator is aborted (it cannot be used again) and the error thrown.
  void synchronize(const char* after) {
    for (;;) {
      const cudaError_t q = cudaStreamQuery(ctx_->stream());
      ncclResult_t async = ncclSuccess;
      nccl_detail::check(ncclCommGetAsyncError(comm_, &async), "ncclCommGetAsyncError after {}", after);
      if (async != ncclSuccess && async != ncclInProgress) {
        (void)ncclCommAbort(comm_);
        comm_ = nullptr;
        nccl_detail::check(async, "{} (asynchronous error; the NCCL communicator was aborted)", after);
      }
      if (q == cudaSuccess) return;
      if (q != cudaErrorNotReady) cuda_detail::check(q, "cudaStreamQuery after {}", after);
      std::this_thread::yield();
    }
  }

  Communicator* host_;
  CudaContext* ctx_;
  ncclComm_t comm_ = nullptr;
  std::size_t device_bytes_reduced_ = 0, device_allreduce_calls_ = 0;
};

}  // namespace entropy_probe
