// The Python package's checkpoints on CudaBackend (Checkpoint(path, device="cuda")):
// compiled by nvcc in a build with ENTROPY_PROBE_CUDA (python/CMakeLists.txt),
// where bindings.cpp calls load_on_cuda instead of refusing the device.
#include "cuda_device.hpp"
#include "loaded.hpp"

#include <entropy_probe/tensor/cuda_backend.hpp>

namespace ep_py {

std::unique_ptr<Loaded> load_on_cuda(const std::string& path, const std::string& dtype) {
  ep_run::detail::use_cuda_device(0, "Checkpoint: device 'cuda'", "device='cpu'");
  if (dtype == "f64") return std::make_unique<LoadedT<double, ep::CudaBackend>>(path, dtype);
  return std::make_unique<LoadedT<float, ep::CudaBackend>>(path, dtype);
}

}  // namespace ep_py
