// `entropy-probe run --device cuda` and `sample --device cuda`: run_typed and
// sample_typed on CudaBackend. Compiled by
// nvcc (--extended-lambda, through entropy_probe::cuda) and only in a build
// with CUDA, where examples/CMakeLists.txt defines ENTROPY_PROBE_CLI_CUDA so
// run_command.hpp calls this instead of refusing the option.
#include "cuda_device.hpp"
#include "run_typed.hpp"
#include "sample_typed.hpp"

#include <entropy_probe/tensor/cuda_backend.hpp>
#if defined(ENTROPY_PROBE_HAVE_NCCL)
#include <entropy_probe/dist/nccl.hpp>
#endif

#include <cuda_runtime.h>

#include <string>

namespace ep_run::detail {

int run_on_cuda(const RunOptions& o, ep::Communicator& comm, int local_rank) {
  const int count = use_cuda_device(local_rank);
  auto run = [&](ep::Communicator& c) {
    return o.dtype == "f64" ? run_typed<double, ep::CudaBackend>(o, c) : run_typed<float, ep::CudaBackend>(o, c);
  };
#if defined(ENTROPY_PROBE_HAVE_NCCL)
  // Parameter buffers reduce in device memory through NCCL, which needs a GPU
  // of its own per rank: used only when no rank on any node shares one
  // (decided by all ranks together, so they all take the same road).
  if (comm.world() > 1) {
    if (comm.allreduce_sum(local_rank >= count ? 1.0 : 0.0) == 0.0) {
      ep::NcclCommunicator nccl(comm);
      ep::log_info("[device] parameter buffers reduce through NCCL {}", ep::nccl_detail::version_str());
      return run(nccl);
    }
    ep::log_info("[device] ranks share a GPU: parameter buffers reduce through the host communicator");
  }
#endif
  return run(comm);
}

}  // namespace ep_run::detail

// `entropy-probe sample --device cuda`: the sampler on CudaBackend, on device 0.
int ep_sample::sample_on_cuda(const SampleOptions& o) {
  ep_run::detail::use_cuda_device(0);
  return o.dtype == "f64" ? sample_typed<double, ep::CudaBackend>(o) : sample_typed<float, ep::CudaBackend>(o);
}
