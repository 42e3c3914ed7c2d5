// The golden tiny GPT-2 and Qwen2 checkpoints loaded through entropy_probe::hf
// onto CudaBackend and CpuBackend, and the full probe compared.
#include "checkpoint_parity.hpp"

#include <entropy_probe/tensor/cuda_backend.hpp>

EP_PARITY_CHECKPOINT_TESTS(entropy_probe::CudaBackend, "cuda: ")
