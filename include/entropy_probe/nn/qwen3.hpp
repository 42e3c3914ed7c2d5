// The Qwen3 family (Hugging Face Qwen3ForCausalLM): the shared decoder
// (nn/decoder.hpp) with q_norm and k_norm (RMS norm over head_dim, per head,
// before rotary), an explicit head_dim (128 when config.json omits it),
// attention_bias on q, k, v and o, and Qwen2's sliding-window fields.
#pragma once

#include "entropy_probe/nn/decoder.hpp"

namespace entropy_probe::nn {

inline DecoderConfig qwen3_defaults();

inline constexpr DecoderFamily kQwen3Family{
    .model_type = "qwen3",
    .architecture = "Qwen3ForCausalLM",
    .qkv_bias_always = false,
    .reads_attention_bias = true,
    .reads_mlp_bias = false,
    .qk_norm = true,
    .sliding = DecoderFamily::SlidingWindow::qwen_layers,
    .defaults = &qwen3_defaults,
};

// transformers' Qwen3Config defaults of the fields config.json may omit.
inline DecoderConfig qwen3_defaults() {
  DecoderConfig c;
  c.family = &kQwen3Family;
  c.num_key_value_heads = 32;
  c.head_dim_override = 128;
  c.max_position_embeddings = 32768;
  c.rms_norm_eps = 1e-6;
  c.rope_theta = 10000.0;
  c.tie_word_embeddings = false;
  c.sliding_window = 4096;  // used only when use_sliding_window is true
  return c;
}

template <class T, class B = CpuBackend>
using Qwen3ForCausalLM = DecoderForCausalLM<T, B>;

}  // namespace entropy_probe::nn
