// Main of the CUDA tests. Without a CUDA device (a CI machine with nvcc but
// no GPU) it prints why and exits 0 before any test case runs; ctest marks
// the test skipped (SKIP_REGULAR_EXPRESSION) and prints the same line after
// the run (tests/cuda/print_status.cmake). With a device, Catch2 runs every
// test case.
#define CATCH_CONFIG_RUNNER
#include <cuda_runtime.h>
#include <catch2/catch.hpp>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

namespace {
// One line for the log, and for ctest's summary when it asked for it.
void report(const std::string& line) {
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
  if (const char* path = std::getenv("EP_CUDA_TEST_STATUS_FILE")) std::ofstream(path) << line << '\n';
}
}  // namespace

int main(int argc, char** argv) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count == 0) {
    const std::string why = e != cudaSuccess ? cudaGetErrorString(e) : "cudaGetDeviceCount found 0 devices";
    report("CUDA tests skipped: no CUDA device found (" + why + ")");
    return 0;
  }
  cudaDeviceProp p{};
  if (cudaGetDeviceProperties(&p, 0) == cudaSuccess)
    std::printf("CUDA device 0 of %d: %s, compute capability %d.%d, %.1f GiB\n", count, p.name, p.major, p.minor,
                static_cast<double>(p.totalGlobalMem) / (1024.0 * 1024.0 * 1024.0));
  const int rc = Catch::Session().run(argc, argv);
  report(std::string("CUDA tests ran on ") + p.name + (rc == 0 ? ": all passed" : ": FAILED"));
  return rc;
}
