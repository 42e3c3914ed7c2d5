// Main of the NCCL tests, built twice: test_nccl (EP_NCCL_TEST_MPI: the ranks
// of mpirun, an MpiCommunicator as the host communicator) and
// test_nccl_single (one rank, SingleProcess; runs where MPI is absent, as on
// the GPU check's machine). Each rank takes the device of its rank on its
// node: NCCL refuses two ranks on one device.
//
// Without a CUDA device, or with fewer devices on a node than ranks on it,
// every rank prints why and exits 0 before any test case runs; ctest marks
// the test skipped (SKIP_REGULAR_EXPRESSION "NCCL tests skipped").
//
// `--device-count` prints the number of CUDA devices (and, when 0, CUDA's
// reason on a second line) without starting MPI: run_nccl_mpi.cmake asks it
// how many ranks to start.
#define CATCH_CONFIG_RUNNER
#include "nccl_test.hpp"

#include <cuda_runtime.h>
#include <nccl.h>
#include <catch2/catch.hpp>

#if defined(EP_NCCL_TEST_MPI)
#include <entropy_probe/dist/mpi.hpp>
#endif

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

namespace {

entropy_probe::Communicator* g_host = nullptr;

// One line for the log, and for ctest's summary when it asked for it.
void report(const std::string& line) {
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
  if (const char* path = std::getenv("EP_NCCL_TEST_STATUS_FILE")) std::ofstream(path) << line << '\n';
}

// The CUDA device count, or 0 with CUDA's reason.
int device_count(std::string& why) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    why = cudaGetErrorString(e);
    return 0;
  }
  if (count == 0) why = "cudaGetDeviceCount found 0 devices";
  return count;
}

int run(int argc, char** argv, entropy_probe::Communicator& host, int local_rank, int local_size) {
  g_host = &host;
  std::string why;
  const int count = device_count(why);
  std::string skip;
  if (count == 0)
    skip = "no CUDA device found (" + why + ")";
  else if (local_size > count)
    skip = std::to_string(local_size) + " ranks on one node but " + std::to_string(count) +
           " CUDA device(s): NCCL needs a device per rank";
  // Every rank skips or none does, so that no rank waits in a collective alone.
  const bool any_skip = host.allreduce_sum(skip.empty() ? 0.0 : 1.0) > 0;
  if (any_skip) {
    if (host.rank() == 0) report("NCCL tests skipped: " + (skip.empty() ? "another rank lacks a CUDA device" : skip));
    return 0;
  }
  if (cudaSetDevice(local_rank) != cudaSuccess) {
    std::fprintf(stderr, "[rank %d] cudaSetDevice(%d) failed\n", host.rank(), local_rank);
    return 1;
  }
  cudaDeviceProp p{};
  (void)cudaGetDeviceProperties(&p, local_rank);
  int v = 0;
  (void)ncclGetVersion(&v);
  if (host.rank() == 0)
    std::printf("NCCL tests: NCCL %d.%d.%d, %d rank(s), rank 0 on CUDA device %d of %d: %s\n", v / 10000,
                (v / 100) % 100, v % 100, host.world(), local_rank, count, p.name);
  const int rc = Catch::Session().run(argc, argv);
  const bool all_passed = host.allreduce_sum(rc == 0 ? 0.0 : 1.0) == 0;
  if (host.rank() == 0)
    report(std::string("NCCL tests ran with ") + std::to_string(host.world()) + " rank(s) on " + p.name +
           (all_passed ? ": all passed" : ": FAILED"));
  return rc;
}

}  // namespace

entropy_probe::Communicator& ep_nccl_test::host() { return *g_host; }

int main(int argc, char** argv) {
  if (argc == 2 && std::string(argv[1]) == "--device-count") {
    std::string why;
    const int n = device_count(why);
    std::printf("%d\n%s\n", n, why.c_str());
    return 0;
  }
#if defined(EP_NCCL_TEST_MPI)
  entropy_probe::MpiSession mpi(argc, argv);
  entropy_probe::MpiCommunicator host;
  // The rank and rank count on this node pick the device.
  MPI_Comm node;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node);
  int local_rank = 0, local_size = 1;
  MPI_Comm_rank(node, &local_rank);
  MPI_Comm_size(node, &local_size);
  MPI_Comm_free(&node);
  return run(argc, argv, host, local_rank, local_size);
#else
  entropy_probe::SingleProcess host;
  return run(argc, argv, host, 0, 1);
#endif
}
