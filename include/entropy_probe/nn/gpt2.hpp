// The GPT-2 model family (Hugging Face GPT2LMHeadModel layout) as an ordinary
// Module: token and position embeddings, pre-norm blocks with fused c_attn,
// MLP (width n_inner, activation_function), final layer norm, lm_head tied to the token embedding
// (or a trainable copy when PEFT's modules_to_save names lm_head).
//
// Hugging Face stores Conv1D weights as [in, out]; this class keeps linear
// weights as [out, in] like nn.Linear, so a loader transposes them once.
// With a LoRA config every name gets PEFT's "base_model.model." prefix and the
// base weights are frozen.
#pragma once

#include "entropy_probe/nn/kv_cache.hpp"
#include "entropy_probe/nn/layers.hpp"
#include "entropy_probe/nn/lora_config.hpp"
#include "entropy_probe/nn/packing.hpp"
#include "entropy_probe/tape/ops/elementwise.hpp"
#include "entropy_probe/tape/ops/flash_attention.hpp"
#include "entropy_probe/tape/ops/gather.hpp"
#include "entropy_probe/tape/ops/slice.hpp"
#include "entropy_probe/tape/ops/view.hpp"

#include <fmt/format.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace entropy_probe::nn {

struct Gpt2Config {
  index_t vocab_size = 50257;
  index_t n_positions = 1024;
  index_t n_embd = 768;
  index_t n_layer = 12;
  index_t n_head = 12;
  double layer_norm_epsilon = 1e-5;
  index_t n_inner = 0;  // MLP width; 0 = 4 * n_embd (transformers' None)
  Activation activation = Activation::gelu_tanh;
  bool scale_attn_weights = true;                // scores / sqrt(head_dim)
  bool scale_attn_by_inverse_layer_idx = false;  // scores / (layer_idx + 1) as well

  index_t inner_dim() const { return n_inner > 0 ? n_inner : 4 * n_embd; }
  // The attention score scale of layer `layer_idx` (transformers' GPT2Attention.scaling).
  double attention_scale(index_t layer_idx) const {
    double s = scale_attn_weights ? 1.0 / std::sqrt(static_cast<double>(n_embd / n_head)) : 1.0;
    if (scale_attn_by_inverse_layer_idx) s /= static_cast<double>(layer_idx + 1);
    return s;
  }

  void validate() const {
    if (vocab_size < 1 || n_positions < 1 || n_embd < 1 || n_layer < 0 || n_head < 1 || n_inner < 0)
      fail<InputError>("gpt2 config: sizes must be positive (vocab {}, positions {}, n_embd {}, n_layer {}, n_head {})",
                       vocab_size, n_positions, n_embd, n_layer, n_head);
    if (n_embd % n_head != 0) fail<InputError>("gpt2 config: n_embd {} is not divisible by n_head {}", n_embd, n_head);
  }
};

template <class T, class B = CpuBackend>
class Gpt2LMHeadModel {
 public:
  using scalar_type = T;
  using backend_type = B;

  struct Block {
    LayerNorm<T, B> ln_1, ln_2;
    LoraLinear<T, B> c_attn, attn_c_proj, c_fc, mlp_c_proj;
  };

  // Random base weights (normal, std 0.02, as GPT-2 initialises), seeded;
  // with no seed the storage is allocated and left for a checkpoint loader
  // to fill (io/hf). A LoRA config attaches adapters where PEFT would
  // (LoraConfig::adapter_for on each linear's module path) and sets what is
  // trained (set_peft_trainable).
  Gpt2LMHeadModel(const Gpt2Config& config, std::optional<LoraConfig> lora, std::optional<std::uint64_t> seed)
      : config_(config), lora_(std::move(lora)) {
    config_.validate();
    std::mt19937_64 gen(seed.value_or(0));
    std::mt19937_64* rng = seed ? &gen : nullptr;
    const index_t d = config_.n_embd, v = config_.vocab_size;
    wte_ = Parameter<T, B>(random_normal_or_unset<T, B>({v, d}, rng, 0.02));
    wpe_ = Parameter<T, B>(random_normal_or_unset<T, B>({config_.n_positions, d}, rng, 0.01));
    for (index_t i = 0; i < config_.n_layer; ++i) {
      Block b;
      b.ln_1 = LayerNorm<T, B>(d, config_.layer_norm_epsilon);
      b.ln_2 = LayerNorm<T, B>(d, config_.layer_norm_epsilon);
      b.c_attn = random_linear<T, B>(d, 3 * d, true, rng);
      b.attn_c_proj = random_linear<T, B>(d, d, true, rng);
      b.c_fc = random_linear<T, B>(d, config_.inner_dim(), true, rng);
      b.mlp_c_proj = random_linear<T, B>(config_.inner_dim(), d, true, rng);
      blocks_.push_back(std::move(b));
    }
    ln_f_ = LayerNorm<T, B>(d, config_.layer_norm_epsilon);
    if (lora_) {
      for (std::size_t i = 0; i < blocks_.size(); ++i)
        for (auto [path, lin] : linears(i)) attach_adapter(*lin, path, *lora_, rng);
      // The head is tied to wte. PEFT's copy of a saved lm_head is trained;
      // a saved wte leaves the head on the frozen original.
      if (lora_->saves("lm_head") || lora_->saves("transformer.wte")) lm_head_.emplace(wte_.value);
      head_is_original_wte_ = !lora_->saves("lm_head") && lora_->saves("transformer.wte");
      set_peft_trainable(*this, *lora_);
    }
  }

  // The linear layers of block i under their module paths (in the order
  // seeded models draw their adapters).
  std::vector<std::pair<std::string, LoraLinear<T, B>*>> linears(std::size_t i) {
    const std::string h = fmt::format("transformer.h.{}.", i);
    Block& b = blocks_[i];
    return {{h + "attn.c_attn", &b.c_attn},
            {h + "attn.c_proj", &b.attn_c_proj},
            {h + "mlp.c_proj", &b.mlp_c_proj},
            {h + "mlp.c_fc", &b.c_fc}};
  }

  const Gpt2Config& config() const { return config_; }
  const char* model_type() const { return "gpt2"; }
  const std::optional<LoraConfig>& lora() const { return lora_; }
  index_t vocab_size() const { return config_.vocab_size; }
  index_t max_positions() const { return config_.n_positions; }  // rows of the learned position table
  std::vector<Block>& blocks() { return blocks_; }
  Parameter<T, B>& wte() { return wte_; }
  Parameter<T, B>& wpe() { return wpe_; }
  LayerNorm<T, B>& ln_f() { return ln_f_; }
  std::optional<Parameter<T, B>>& lm_head() { return lm_head_; }

  void named_parameters(const ParameterVisitor<T, B>& v) {
    const std::string p = lora_ ? "base_model.model." : "";
    v(p + "transformer.wte.weight", wte_);
    v(p + "transformer.wpe.weight", wpe_);
    for (std::size_t i = 0; i < blocks_.size(); ++i) {
      const std::string h = fmt::format("{}transformer.h.{}.", p, i);
      Block& b = blocks_[i];
      visit_child(v, h + "ln_1", b.ln_1);
      visit_child(v, h + "attn.c_attn", b.c_attn);
      visit_child(v, h + "attn.c_proj", b.attn_c_proj);
      visit_child(v, h + "ln_2", b.ln_2);
      visit_child(v, h + "mlp.c_fc", b.c_fc);
      visit_child(v, h + "mlp.c_proj", b.mlp_c_proj);
    }
    visit_child(v, p + "transformer.ln_f", ln_f_);
    if (lm_head_)
      v(p + (head_is_original_wte_ ? "transformer.wte.original_module.weight" : "lm_head.weight"), *lm_head_);
  }

  // Logits [R, T, V] for the rows of `in`, or [m, V] for in.logit_positions.
  // Then only the needed positions are computed (nn/packing.hpp: real tokens
  // and the read positions; attention on the [R, T] grid), and after the last
  // attention, where all work is per position, only the m read positions.
  Var forward(Tape<T, B>& tape, const SequenceInput& in) {
    const LmHeadInput f = forward_features(tape, in);
    return linear(tape, f.hidden, f.weight);
  }

  // forward() up to lm_head: the hidden states after ln_f and the lm_head
  // weight (module/module.hpp).
  LmHeadInput forward_features(Tape<T, B>& tape, const SequenceInput& in) {
    const index_t r = in.rows, t = in.length, d = config_.n_embd;
    check_input(in);
    const std::optional<PackedPositions> pack = pack_positions(in);
    const std::vector<std::int32_t> tokens = pack ? pack->select(in.tokens) : in.tokens;
    const std::vector<std::int32_t> positions = pack ? pack->select(in.positions) : in.positions;
    // A forward-tangent tape frees each finished layer's values and tangents
    // but h (a no-op when recording): the pass holds about one layer.
    const TapeMark start = tape.mark();
    Var h = add(tape, embedding(tape, use(tape, wte_), std::span<const std::int32_t>(tokens)),
                embedding(tape, use(tape, wpe_), std::span<const std::int32_t>(positions)));
    if (!pack) h = reshape(tape, h, {r, t, d});
    const std::span<const std::uint8_t> mask(in.key_mask);
    // The rows of h whose logits are read, once past the last attention.
    bool selected = !in.logit_positions;
    auto select_read = [&](Var x) {
      return gather_rows(tape, x, std::span<const std::int32_t>(pack ? pack->logits : *in.logit_positions));
    };
    for (std::size_t layer = 0; layer < blocks_.size(); ++layer) {
      Block& b = blocks_[layer];
      Var a = b.ln_1.forward(tape, h);
      Var qkv = b.c_attn.forward(tape, a);
      if (pack) qkv = pack->to_grid(tape, qkv);
      Var att = flash_causal_attention(tape, slice_last(tape, qkv, 0, d), slice_last(tape, qkv, d, d),
                                       slice_last(tape, qkv, 2 * d, d), mask, config_.n_head, config_.n_head,
                                       config_.attention_scale(static_cast<index_t>(layer)));
      if (pack) att = pack->from_grid(tape, att);
      if (&b == &blocks_.back() && !selected) {
        att = select_read(att);
        h = select_read(h);
        selected = true;
      }
      h = block_output(tape, b, h, att);
      tape.release_since(start, {h});
    }
    if (!selected) h = select_read(h);
    return {ln_f_.forward(tape, h), use(tape, lm_head_ ? *lm_head_ : wte_)};
  }

  // Logits [R, V] of the tokens in.read after feeding in's new tokens through
  // the blocks with a key/value cache (nn/kv_cache.hpp): the same block
  // pieces as forward(), attention over the cache. Forward only; the tape
  // holds one call's activations. A cache comes from make_cache().
  KvCache<T, B> make_cache(index_t rows, index_t capacity) const {
    return KvCache<T, B>(config_.n_layer, rows, capacity, config_.n_embd);
  }
  Var forward_cached(Tape<T, B>& tape, KvCache<T, B>& cache, const CachedInput& in) {
    in.check("gpt2", cache.capacity());
    if (in.end() > config_.n_positions)
      fail<InputError>("gpt2 forward_cached: position {} exceeds n_positions {}", in.end() - 1, config_.n_positions);
    const index_t d = config_.n_embd;
    const std::vector<std::int32_t> positions = in.positions(), read = in.read_rows();
    const TapeMark start = tape.mark();  // each finished block is freed on a forward-tangent tape
    Var h = add(tape, embedding(tape, use(tape, wte_), std::span<const std::int32_t>(in.tokens)),
                embedding(tape, use(tape, wpe_), std::span<const std::int32_t>(positions)));
    for (std::size_t layer = 0; layer < blocks_.size(); ++layer) {
      Block& b = blocks_[layer];
      Var qkv = b.c_attn.forward(tape, b.ln_1.forward(tape, h));
      Var att = tape.constant(cache.attend(static_cast<index_t>(layer), in, tape.value(slice_last(tape, qkv, 0, d)),
                                           tape.value(slice_last(tape, qkv, d, d)),
                                           tape.value(slice_last(tape, qkv, 2 * d, d)), config_.n_head, config_.n_head,
                                           config_.attention_scale(static_cast<index_t>(layer))));
      if (layer + 1 == blocks_.size()) {  // past the last attention only the read rows matter
        att = gather_rows(tape, att, std::span<const std::int32_t>(read));
        h = gather_rows(tape, h, std::span<const std::int32_t>(read));
      }
      h = block_output(tape, b, h, att);
      tape.release_since(start, {h});
    }
    if (blocks_.empty()) h = gather_rows(tape, h, std::span<const std::int32_t>(read));
    return linear(tape, ln_f_.forward(tape, h), use(tape, lm_head_ ? *lm_head_ : wte_));
  }

 private:
  // A block after attention: the residual of attn.c_proj, then the MLP's.
  Var block_output(Tape<T, B>& tape, Block& b, Var h, Var att) {
    h = add(tape, h, b.attn_c_proj.forward(tape, att));
    Var m = b.ln_2.forward(tape, h);
    return add(tape, h, b.mlp_c_proj.forward(tape, activate(tape, b.c_fc.forward(tape, m), config_.activation)));
  }

  void check_input(const SequenceInput& in) const {
    const auto n = static_cast<std::size_t>(in.rows * in.length);
    if (in.tokens.size() != n || in.key_mask.size() != n || in.positions.size() != n)
      fail<UsageError>(
          "gpt2 forward: input arrays must hold rows*length = {} entries (tokens {}, mask {}, positions {})", n,
          in.tokens.size(), in.key_mask.size(), in.positions.size());
    if (in.length > config_.n_positions)
      fail<InputError>("gpt2 forward: sequence length {} exceeds n_positions {}", in.length, config_.n_positions);
  }

  Gpt2Config config_;
  std::optional<LoraConfig> lora_;
  Parameter<T, B> wte_, wpe_;
  std::vector<Block> blocks_;
  LayerNorm<T, B> ln_f_;
  std::optional<Parameter<T, B>> lm_head_;
  bool head_is_original_wte_ = false;
};

}  // namespace entropy_probe::nn
