// The Qwen2 model family (Hugging Face Qwen2ForCausalLM layout; the Llama
// family with q/k/v biases) as an ordinary Module: RMS norm, rotary position
// embeddings with rope_theta, grouped-query attention, SwiGLU MLP, tied or
// untied lm_head. With a LoRA config, names get PEFT's "base_model.model."
// prefix and the base weights are frozen.
#pragma once

#include "entropy_probe/nn/layers.hpp"
#include "entropy_probe/nn/lora_config.hpp"
#include "entropy_probe/nn/packing.hpp"
#include "entropy_probe/tape/ops/attention.hpp"
#include "entropy_probe/tape/ops/elementwise.hpp"
#include "entropy_probe/tape/ops/gather.hpp"
#include "entropy_probe/tape/ops/rotary.hpp"
#include "entropy_probe/tape/ops/view.hpp"

#include <fmt/format.h>

#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <vector>

namespace entropy_probe::nn {

struct Qwen2Config {
  index_t vocab_size = 151936;
  index_t hidden_size = 896;
  index_t intermediate_size = 4864;
  index_t num_hidden_layers = 24;
  index_t num_attention_heads = 14;
  index_t num_key_value_heads = 2;
  index_t max_position_embeddings = 32768;
  double rms_norm_eps = 1e-6;
  double rope_theta = 1000000.0;
  bool tie_word_embeddings = true;

  index_t head_dim() const { return hidden_size / num_attention_heads; }
  void validate() const {
    if (vocab_size < 1 || hidden_size < 1 || intermediate_size < 1 || num_hidden_layers < 0 ||
        num_attention_heads < 1 || num_key_value_heads < 1)
      fail<InputError>("qwen2 config: sizes must be positive");
    if (hidden_size % num_attention_heads != 0)
      fail<InputError>("qwen2 config: hidden_size {} is not divisible by num_attention_heads {}", hidden_size,
                       num_attention_heads);
    if (num_attention_heads % num_key_value_heads != 0)
      fail<InputError>("qwen2 config: num_attention_heads {} is not divisible by num_key_value_heads {}",
                       num_attention_heads, num_key_value_heads);
    if (head_dim() % 2 != 0) fail<InputError>("qwen2 config: head_dim {} must be even for rotary", head_dim());
  }
};

template <class T, class B = CpuBackend>
class Qwen2ForCausalLM {
 public:
  using scalar_type = T;
  using backend_type = B;

  struct Layer {
    RmsNorm<T, B> input_layernorm, post_attention_layernorm;
    LoraLinear<T, B> q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj;
  };

  // Random base weights (normal, std 0.02), seeded; with no seed the
  // storage is left for a checkpoint loader to fill (io/hf). A LoRA config
  // attaches adapters where PEFT would and sets what is trained.
  Qwen2ForCausalLM(const Qwen2Config& config, std::optional<LoraConfig> lora, std::optional<std::uint64_t> seed)
      : config_(config), lora_(std::move(lora)) {
    config_.validate();
    std::mt19937_64 gen(seed.value_or(0));
    std::mt19937_64* rng = seed ? &gen : nullptr;
    const index_t d = config_.hidden_size, v = config_.vocab_size, dh = config_.head_dim();
    const index_t q_out = config_.num_attention_heads * dh, kv_out = config_.num_key_value_heads * dh;
    const index_t im = config_.intermediate_size;
    embed_tokens_ = Parameter<T, B>(random_normal_or_unset<T, B>({v, d}, rng, 0.02));
    for (index_t i = 0; i < config_.num_hidden_layers; ++i) {
      Layer l;
      l.input_layernorm = RmsNorm<T, B>(d, config_.rms_norm_eps);
      l.post_attention_layernorm = RmsNorm<T, B>(d, config_.rms_norm_eps);
      l.q_proj = random_linear<T, B>(d, q_out, true, rng);
      l.k_proj = random_linear<T, B>(d, kv_out, true, rng);
      l.v_proj = random_linear<T, B>(d, kv_out, true, rng);
      l.o_proj = random_linear<T, B>(q_out, d, false, rng);
      l.gate_proj = random_linear<T, B>(d, im, false, rng);
      l.up_proj = random_linear<T, B>(d, im, false, rng);
      l.down_proj = random_linear<T, B>(im, d, false, rng);
      layers_.push_back(std::move(l));
    }
    norm_ = RmsNorm<T, B>(d, config_.rms_norm_eps);
    if (!config_.tie_word_embeddings) lm_head_.emplace(random_normal_or_unset<T, B>({v, d}, rng, 0.02));
    if (lora_) {
      for (std::size_t i = 0; i < layers_.size(); ++i)
        for (auto [name, lin] : linears(layers_[i])) attach_adapter(*lin, module_path(i, name), *lora_, rng);
      // A tied head: PEFT's copy of a saved lm_head is trained; a saved
      // embed_tokens leaves the head on the frozen original.
      if (!lm_head_ && (lora_->saves("lm_head") || lora_->saves("model.embed_tokens")))
        lm_head_.emplace(embed_tokens_.value);
      head_is_original_embedding_ =
          config_.tie_word_embeddings && !lora_->saves("lm_head") && lora_->saves("model.embed_tokens");
      set_peft_trainable(*this, *lora_);
    }
  }

  // The module path of projection `name` of layer i ("model.layers.1.self_attn.q_proj").
  static std::string module_path(std::size_t i, const std::string& name) {
    const bool attn = name == "q_proj" || name == "k_proj" || name == "v_proj" || name == "o_proj";
    return fmt::format("model.layers.{}.{}{}", i, attn ? "self_attn." : "mlp.", name);
  }

  const Qwen2Config& config() const { return config_; }
  const std::optional<LoraConfig>& lora() const { return lora_; }
  index_t vocab_size() const { return config_.vocab_size; }
  std::vector<Layer>& layers() { return layers_; }
  Parameter<T, B>& embed_tokens() { return embed_tokens_; }
  RmsNorm<T, B>& norm() { return norm_; }
  std::optional<Parameter<T, B>>& lm_head() { return lm_head_; }

  // The projections of a layer under the names PEFT's target_modules match.
  static std::vector<std::pair<std::string, LoraLinear<T, B>*>> linears(Layer& l) {
    return {{"q_proj", &l.q_proj},       {"k_proj", &l.k_proj},   {"v_proj", &l.v_proj},      {"o_proj", &l.o_proj},
            {"gate_proj", &l.gate_proj}, {"up_proj", &l.up_proj}, {"down_proj", &l.down_proj}};
  }

  void named_parameters(const ParameterVisitor<T, B>& v) {
    const std::string p = lora_ ? "base_model.model." : "";
    v(p + "model.embed_tokens.weight", embed_tokens_);
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      const std::string h = fmt::format("{}model.layers.{}.", p, i);
      Layer& l = layers_[i];
      visit_child(v, h + "input_layernorm", l.input_layernorm);
      for (auto [name, lin] : linears(l)) visit_child(v, p + module_path(i, name), *lin);
      visit_child(v, h + "post_attention_layernorm", l.post_attention_layernorm);
    }
    visit_child(v, p + "model.norm", norm_);
    if (lm_head_)
      v(p + (head_is_original_embedding_ ? "model.embed_tokens.original_module.weight" : "lm_head.weight"), *lm_head_);
  }

  // Logits [R, T, V], or [m, V] for in.logit_positions. Then only the
  // needed positions are computed (nn/packing.hpp: real tokens and the read
  // positions; attention on the [R, T] grid), and after the last attention,
  // where all work is per position, only the m read positions.
  Var forward(Tape<T, B>& tape, const SequenceInput& in) {
    const LmHeadInput f = forward_features(tape, in);
    return linear(tape, f.hidden, f.weight);
  }

  // forward() up to lm_head: the hidden states after the final norm and the
  // lm_head weight (module/module.hpp).
  LmHeadInput forward_features(Tape<T, B>& tape, const SequenceInput& in) {
    const index_t r = in.rows, t = in.length, d = config_.hidden_size;
    const auto n = static_cast<std::size_t>(r * t);
    if (in.tokens.size() != n || in.key_mask.size() != n || in.positions.size() != n)
      fail<UsageError>("qwen2 forward: input arrays must hold rows*length = {} entries", n);
    const std::optional<PackedPositions> pack = pack_positions(in);
    const std::vector<std::int32_t> tokens = pack ? pack->select(in.tokens) : in.tokens;
    const std::vector<std::int32_t> positions = pack ? pack->select(in.positions) : in.positions;
    const auto table =
        make_rotary_table<T, B>(std::span<const std::int32_t>(positions), config_.head_dim(), config_.rope_theta);
    const index_t hq = config_.num_attention_heads, hkv = config_.num_key_value_heads;
    const std::span<const std::uint8_t> mask(in.key_mask);
    Var h = embedding(tape, use(tape, embed_tokens_), std::span<const std::int32_t>(tokens));
    if (!pack) h = reshape(tape, h, {r, t, d});
    auto grid = [&](Var x) { return pack ? pack->to_grid(tape, x) : x; };
    // The rows of h whose logits are read, once past the last attention.
    bool selected = !in.logit_positions;
    auto select_read = [&](Var x) {
      return gather_rows(tape, x, std::span<const std::int32_t>(pack ? pack->logits : *in.logit_positions));
    };
    for (Layer& l : layers_) {
      Var a = l.input_layernorm.forward(tape, h);
      Var q = rotary(tape, l.q_proj.forward(tape, a), table, hq);
      Var k = rotary(tape, l.k_proj.forward(tape, a), table, hkv);
      Var att = causal_attention(tape, grid(q), grid(k), grid(l.v_proj.forward(tape, a)), mask, hq, hkv);
      if (pack) att = pack->from_grid(tape, att);
      if (&l == &layers_.back() && !selected) {
        att = select_read(att);
        h = select_read(h);
        selected = true;
      }
      h = add(tape, h, l.o_proj.forward(tape, att));
      Var m = l.post_attention_layernorm.forward(tape, h);
      Var gated = mul(tape, silu(tape, l.gate_proj.forward(tape, m)), l.up_proj.forward(tape, m));
      h = add(tape, h, l.down_proj.forward(tape, gated));
    }
    if (!selected) h = select_read(h);
    return {norm_.forward(tape, h), use(tape, lm_head_ ? *lm_head_ : embed_tokens_)};
  }

 private:
  Qwen2Config config_;
  std::optional<LoraConfig> lora_;
  Parameter<T, B> embed_tokens_;
  std::vector<Layer> layers_;
  RmsNorm<T, B> norm_;
  std::optional<Parameter<T, B>> lm_head_;
  bool head_is_original_embedding_ = false;
};

}  // namespace entropy_probe::nn
