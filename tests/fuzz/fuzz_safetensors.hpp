// The body of the safetensors fuzz target, shared by the libFuzzer entry
// point (fuzz_safetensors.cpp) and the deterministic replay in
// tests/io/test_safetensors.cpp.
//
// An InputError is the expected outcome for bad input. Anything else is a
// finding: another exception escapes, a sanitizer fires, or a parsed file
// breaks an invariant the rest of the library relies on (each tensor's bytes
// are exactly numel * dtype size, lookups agree), which aborts.
#pragma once

#include <entropy_probe/io/safetensors.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace ep_fuzz {

[[noreturn]] inline void broken(const char* what, const std::string& name) {
  std::fprintf(stderr, "fuzz_safetensors: invariant broken: %s (tensor '%s')\n", what, name.c_str());
  std::abort();
}

inline void check_parsed(const entropy_probe::safetensors::File& f) {
  namespace st = entropy_probe::safetensors;
  for (const st::TensorView& t : f.tensors()) {
    // numel * dtype size without overflow (a zero dimension makes it 0).
    std::uint64_t need = st::dtype_size(t.dtype);
    bool overflow = false;
    for (entropy_probe::index_t d : t.shape)
      if (d < 0) broken("negative dimension", t.name);
    if (std::find(t.shape.begin(), t.shape.end(), 0) != t.shape.end()) {
      need = 0;
    } else {
      for (entropy_probe::index_t d : t.shape)
        overflow = overflow || __builtin_mul_overflow(need, static_cast<std::uint64_t>(d), &need);
    }
    if (overflow || need != t.bytes.size()) broken("byte count differs from numel * dtype size", t.name);
    if (f.find(t.name) != &t) broken("find() does not return the tensor", t.name);
    if (t.bytes.size() <= (1u << 20)) {
      // The two ways of reading elements agree (NaN payloads aside).
      const std::vector<double> v = t.to_vector<double>();
      if (static_cast<entropy_probe::index_t>(v.size()) != t.numel()) broken("to_vector size", t.name);
      for (entropy_probe::index_t k = 0; k < t.numel(); ++k) {
        const double a = t.element(k), b = v[static_cast<std::size_t>(k)];
        if (!(a == b || (std::isnan(a) && std::isnan(b)))) broken("element() and to_vector() disagree", t.name);
      }
    }
  }
  // The non-empty tensors tile their bytes: in memory order each starts
  // where the previous one ends (the parser refuses holes and overlaps).
  std::vector<const st::TensorView*> by_address;
  for (const st::TensorView& t : f.tensors())
    if (!t.bytes.empty()) by_address.push_back(&t);
  std::sort(by_address.begin(), by_address.end(),
            [](const st::TensorView* a, const st::TensorView* b) { return a->bytes.data() < b->bytes.data(); });
  for (std::size_t i = 1; i < by_address.size(); ++i)
    if (by_address[i]->bytes.data() != by_address[i - 1]->bytes.data() + by_address[i - 1]->bytes.size())
      broken("tensor bytes leave a hole or overlap the previous tensor", by_address[i]->name);
  if (f.find("__metadata__") != nullptr) broken("__metadata__ is listed as a tensor", "__metadata__");
}

// What parsing one input did: it parsed (every invariant above held) into
// `tensors` tensors, or it was refused with an InputError saying `error`.
struct Outcome {
  bool parsed = false;
  std::size_t tensors = 0;
  std::string error;
};

inline Outcome parse_checked(const std::uint8_t* data, std::size_t size) {
  std::vector<std::byte> bytes(size);
  if (size > 0) std::memcpy(bytes.data(), data, size);
  try {
    const auto f = entropy_probe::safetensors::File::parse(std::move(bytes), "fuzz-input");
    check_parsed(f);
    return Outcome{true, f.tensors().size(), {}};
  } catch (const entropy_probe::InputError& e) {
    return Outcome{false, 0, e.what()};  // the expected outcome for a bad file
  }
}

// Parses `size` bytes; returns 0 (libFuzzer's convention).
inline int parse_one(const std::uint8_t* data, std::size_t size) {
  parse_checked(data, size);
  return 0;
}

}  // namespace ep_fuzz
