// The CUDA device a process runs on, for the code compiled by nvcc that
// puts the command's work on CudaBackend (run_cuda.cu) and the Python
// package's (python/src/cuda.cu).
#pragma once

#include "run_typed.hpp"

#include <cuda_runtime.h>

#include <string>

namespace ep_run::detail {

// Selects CUDA device local_rank modulo the device count; returns the count.
// Throws DeviceUnavailable when CUDA finds no device; `asked` and `instead`
// name the setting that asked for it and the CPU one, as the caller spells them.
inline int use_cuda_device(int local_rank, const char* asked = "--device cuda", const char* instead = "--device cpu") {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count == 0)
    throw DeviceUnavailable(fmt::format(
        "{}: no CUDA device found ({}); run on a machine with an NVIDIA GPU, or use {}", asked,
        e != cudaSuccess ? std::string(cudaGetErrorString(e)) : std::string("cudaGetDeviceCount found 0 devices"),
        instead));
  // One device per process (docs/cuda.md): ranks sharing a node take turns over its GPUs.
  const int device = local_rank % count;
  if (const cudaError_t s = cudaSetDevice(device); s != cudaSuccess)
    ep::fail<ep::Error>("cudaSetDevice({}) failed: {}", device, cudaGetErrorString(s));
  cudaDeviceProp p{};
  if (cudaGetDeviceProperties(&p, device) == cudaSuccess)
    ep::log_info("[device] CUDA device {} of {}: {}, compute capability {}.{}, {:.1f} GiB", device, count, p.name,
                 p.major, p.minor, static_cast<double>(p.totalGlobalMem) / (1024.0 * 1024.0 * 1024.0));
  return count;
}

}  // namespace ep_run::detail
