// libFuzzer target for the safetensors parser (File::parse); the checks are
// in fuzz_safetensors.hpp. Built by tests/fuzz/CMakeLists.txt when
// ENTROPY_PROBE_FUZZ=ON with clang; run by scripts/fuzz. The same body runs
// deterministically over the seeds and their mutations in
// tests/io/test_safetensors.cpp.
#include "fuzz_safetensors.hpp"

#include <cstddef>
#include <cstdint>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return ep_fuzz::parse_one(data, size);
}
