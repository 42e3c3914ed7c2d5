// The Qwen2 family (Hugging Face Qwen2ForCausalLM): the shared decoder
// (nn/decoder.hpp) with q/k/v biases, no o_proj or MLP bias, sliding window
// through use_sliding_window / max_window_layers / layer_types.
#pragma once

#include "entropy_probe/nn/decoder.hpp"

namespace entropy_probe::nn {

inline DecoderConfig qwen2_defaults();

inline constexpr DecoderFamily kQwen2Family{
    .model_type = "qwen2",
    .architecture = "Qwen2ForCausalLM",
    .qkv_bias_always = true,
    .reads_attention_bias = false,
    .reads_mlp_bias = false,
    .qk_norm = false,
    .sliding = DecoderFamily::SlidingWindow::qwen_layers,
    .defaults = &qwen2_defaults,
};

// Qwen2-0.5B's shapes, for code that builds a model by hand (a loaded
// config starts from qwen2_defaults()).
struct Qwen2Config : DecoderConfig {
  Qwen2Config() {
    family = &kQwen2Family;
    vocab_size = 151936;
    hidden_size = 896;
    intermediate_size = 4864;
    num_hidden_layers = 24;
    num_attention_heads = 14;
    num_key_value_heads = 2;
    max_position_embeddings = 32768;
    rms_norm_eps = 1e-6;
    rope_theta = 1000000.0;
    tie_word_embeddings = true;
  }
};

// transformers' Qwen2Config defaults of the fields config.json may omit.
inline DecoderConfig qwen2_defaults() {
  DecoderConfig c;
  c.family = &kQwen2Family;
  c.num_key_value_heads = 32;
  c.max_position_embeddings = 32768;
  c.rms_norm_eps = 1e-6;
  c.rope_theta = 10000.0;
  c.tie_word_embeddings = false;
  c.sliding_window = 4096;  // used only when use_sliding_window is true
  return c;
}

// Every decoder family is this one class; the family lives in the config.
template <class T, class B = CpuBackend>
using Qwen2ForCausalLM = DecoderForCausalLM<T, B>;

}  // namespace entropy_probe::nn
