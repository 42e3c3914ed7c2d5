// Shared by the NCCL test program's main (test_nccl_main.cpp, built once with
// MPI for mpirun and once without, for a single rank) and its test cases.
#pragma once

#include <entropy_probe/comm/comm.hpp>

#include <string>

namespace entropy_probe {
struct ProbeResult;
}

namespace ep_nccl_test {

// The job's host communicator: MpiCommunicator under mpirun (test_nccl),
// SingleProcess in test_nccl_single. Every rank uses its own device.
entropy_probe::Communicator& host();

// Every field of `got` (the probe on CudaBackend over NCCL) against `want`
// (one CPU process), 1e-12 relative: nccl_compare.cpp, built by the host
// compiler (nlohmann::json stays out of nvcc).
void check_same_result(const entropy_probe::ProbeResult& got, const entropy_probe::ProbeResult& want,
                       const std::string& tag);

}  // namespace ep_nccl_test
