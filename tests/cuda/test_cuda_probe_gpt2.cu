// OfflineEntropyProbe on a tiny GPT-2 built on CudaBackend and CpuBackend.
#include "backend_parity.hpp"

#include <entropy_probe/tensor/cuda_backend.hpp>

TEST_CASE("cuda: the full probe on a tiny GPT-2 matches the CPU backend", "[parity][probe]") {
  ep_parity::probe_gpt2<double, entropy_probe::CudaBackend>();
  ep_parity::probe_gpt2<float, entropy_probe::CudaBackend>();
}
