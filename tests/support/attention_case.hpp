// One attention problem's shape and key mask, shared by the attention and
// flash-attention op tests.
#pragma once

#include <entropy_probe/core/config.hpp>

#include <cstdint>
#include <vector>

namespace ep_test {

struct AttnCase {
  entropy_probe::index_t r, t, hq, hkv, dh;
  std::vector<std::uint8_t> mask;  // R*T entries; empty = all ones
};

inline std::vector<std::uint8_t> mask_of(const AttnCase& c) {
  return c.mask.empty() ? std::vector<std::uint8_t>(static_cast<std::size_t>(c.r * c.t), 1) : c.mask;
}

}  // namespace ep_test
