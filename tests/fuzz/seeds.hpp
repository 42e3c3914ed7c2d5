// Seed inputs for the safetensors fuzz target: small valid files that cover
// every dtype, metadata, scalars and empty tensors, an empty header, and a
// hand-laid-out header (unpadded, tensors out of order). Shared by the
// corpus generator (make_corpus/) and the replay test in fuzz_safetensors.cpp.
#pragma once

#include <entropy_probe/io/safetensors.hpp>

#include <fmt/format.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <vector>

namespace ep_fuzz {

namespace st = entropy_probe::safetensors;

inline std::vector<std::byte> raw(const std::string& header, std::size_t data_bytes) {
  std::vector<std::byte> out(8);
  const std::uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<std::byte>((n >> (8 * i)) & 0xff);
  for (char c : header) out.push_back(static_cast<std::byte>(c));
  for (std::size_t i = 0; i < data_bytes; ++i) out.push_back(static_cast<std::byte>(i * 37 + 1));
  return out;
}

// name -> file bytes
inline std::map<std::string, std::vector<std::byte>> seed_files() {
  std::map<std::string, std::vector<std::byte>> seeds;
  {
    std::map<std::string, st::OutTensor> t;
    const st::Dtype all[] = {st::Dtype::F64, st::Dtype::F32, st::Dtype::F16, st::Dtype::BF16, st::Dtype::I64,
                             st::Dtype::I32, st::Dtype::I16, st::Dtype::I8,  st::Dtype::U8,   st::Dtype::BOOL};
    int k = 0;
    for (st::Dtype d : all) {
      const entropy_probe::Shape shape{2, 1};
      std::vector<std::byte> bytes(2 * st::dtype_size(d));
      for (std::size_t i = 0; i < bytes.size(); ++i)
        bytes[i] = static_cast<std::byte>(d == st::Dtype::BOOL ? i % 2 : i + 3);
      t.emplace(fmt::format("t{}_{}", k++, st::dtype_name(d)), st::OutTensor{d, shape, bytes});
    }
    t.emplace("scalar", st::OutTensor{st::Dtype::F32, {}, std::vector<std::byte>(4, std::byte{0x3f})});
    t.emplace("empty", st::OutTensor{st::Dtype::F64, {0, 3}, {}});
    seeds["every_dtype.safetensors"] = st::serialize(t, {{"format", "pt"}, {"lr", "0.001"}});
  }
  seeds["empty_header.safetensors"] = st::serialize({});
  seeds["metadata_only.safetensors"] = st::serialize({}, {{"beta1", "0.9"}, {"beta2", "0.999"}, {"eps", "1e-08"}});
  seeds["hand_laid_out.safetensors"] =
      raw(R"({"b":{"dtype":"BF16","shape":[3],"data_offsets":[8,14]},)"
          R"("a":{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]},"__metadata__":{"k":"v"}})",
          14);
  return seeds;
}

}  // namespace ep_fuzz
