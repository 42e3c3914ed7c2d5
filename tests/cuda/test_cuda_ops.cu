// Every tape op's forward, VJP and JVP on CudaBackend against CpuBackend.
#include "backend_parity.hpp"

#include <entropy_probe/tensor/cuda_backend.hpp>

EP_PARITY_OP_TESTS(entropy_probe::CudaBackend, "cuda: ")
