// Every decoder family the loader knows, by model_type. A new family is a
// traits header like nn/llama.hpp plus one entry here.
#pragma once

#include "entropy_probe/nn/llama.hpp"
#include "entropy_probe/nn/mistral.hpp"
#include "entropy_probe/nn/qwen2.hpp"
#include "entropy_probe/nn/qwen3.hpp"

#include <array>
#include <string_view>

namespace entropy_probe::nn {

inline constexpr std::array<const DecoderFamily*, 4> kDecoderFamilies{&kQwen2Family, &kLlamaFamily, &kMistralFamily,
                                                                      &kQwen3Family};

// The family of a model_type, or nullptr.
inline const DecoderFamily* decoder_family(std::string_view model_type) {
  for (const DecoderFamily* f : kDecoderFamilies)
    if (model_type == f->model_type) return f;
  return nullptr;
}

}  // namespace entropy_probe::nn
