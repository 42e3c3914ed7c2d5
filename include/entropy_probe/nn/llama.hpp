// The Llama family (Hugging Face LlamaForCausalLM, Llama 2 and 3.x): the
// shared decoder (nn/decoder.hpp); attention_bias puts biases on q, k, v and
// o, mlp_bias on gate, up and down; Llama 3.1+ use rope type "llama3".
#pragma once

#include "entropy_probe/nn/decoder.hpp"

namespace entropy_probe::nn {

inline DecoderConfig llama_defaults();

inline constexpr DecoderFamily kLlamaFamily{
    .model_type = "llama",
    .architecture = "LlamaForCausalLM",
    .qkv_bias_always = false,
    .reads_attention_bias = true,
    .reads_mlp_bias = true,
    .qk_norm = false,
    .sliding = DecoderFamily::SlidingWindow::none,
    .defaults = &llama_defaults,
};

// transformers' LlamaConfig defaults of the fields config.json may omit.
inline DecoderConfig llama_defaults() {
  DecoderConfig c;
  c.family = &kLlamaFamily;
  c.num_key_value_heads = 0;  // None: num_attention_heads
  c.max_position_embeddings = 2048;
  c.rms_norm_eps = 1e-6;
  c.rope_theta = 10000.0;
  c.tie_word_embeddings = false;
  return c;
}

template <class T, class B = CpuBackend>
using LlamaForCausalLM = DecoderForCausalLM<T, B>;

}  // namespace entropy_probe::nn
