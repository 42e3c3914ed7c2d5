// The Mistral family (Hugging Face MistralForCausalLM): the shared decoder
// (nn/decoder.hpp) without biases (transformers' Mistral has none, whatever
// attention_bias says) and with sliding_window on every layer when set.
#pragma once

#include "entropy_probe/nn/decoder.hpp"

namespace entropy_probe::nn {

inline DecoderConfig mistral_defaults();

inline constexpr DecoderFamily kMistralFamily{
    .model_type = "mistral",
    .architecture = "MistralForCausalLM",
    .qkv_bias_always = false,
    .reads_attention_bias = false,
    .reads_mlp_bias = false,
    .qk_norm = false,
    .sliding = DecoderFamily::SlidingWindow::all_layers,
    .defaults = &mistral_defaults,
};

// transformers' MistralConfig defaults of the fields config.json may omit
// (a missing sliding_window is 4096; null turns it off).
inline DecoderConfig mistral_defaults() {
  DecoderConfig c;
  c.family = &kMistralFamily;
  c.num_key_value_heads = 8;
  c.max_position_embeddings = 4096 * 32;
  c.rms_norm_eps = 1e-6;
  c.rope_theta = 10000.0;
  c.tie_word_embeddings = false;
  c.sliding_window = 4096;
  return c;
}

template <class T, class B = CpuBackend>
using MistralForCausalLM = DecoderForCausalLM<T, B>;

}  // namespace entropy_probe::nn
