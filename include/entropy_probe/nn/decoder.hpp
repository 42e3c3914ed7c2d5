// The Llama-style decoder shared by the Qwen2, Llama, Mistral and Qwen3
// families (Hugging Face *ForCausalLM layout) as an ordinary Module: RMS norm,
// rotary position embeddings (with transformers' rope scaling), grouped-query
// attention, SwiGLU MLP, tied or untied lm_head. What differs between the
// families is data: a DecoderFamily (nn/qwen2.hpp, nn/llama.hpp,
// nn/mistral.hpp, nn/qwen3.hpp) says which projections carry biases, whether
// q and k are RMS-normalised per head (Qwen3) and which config fields exist.
// With a LoRA config, names get PEFT's "base_model.model." prefix, adapters
// sit where PEFT puts them and only what PEFT trains is trainable.
#pragma once

#include "entropy_probe/nn/kv_cache.hpp"
#include "entropy_probe/nn/layers.hpp"
#include "entropy_probe/nn/lora_config.hpp"
#include "entropy_probe/nn/packing.hpp"
#include "entropy_probe/tape/ops/elementwise.hpp"
#include "entropy_probe/tape/ops/flash_attention.hpp"
#include "entropy_probe/tape/ops/gather.hpp"
#include "entropy_probe/tape/ops/rotary.hpp"
#include "entropy_probe/tape/ops/view.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <vector>

namespace entropy_probe::nn {

struct DecoderConfig;

// How a family's config maps onto the shared decoder. Bias rules: q/k/v and
// o biases are either fixed by the family (Qwen2: q/k/v always, o never) or
// follow the config's attention_bias (Llama, Qwen3: all four); the MLP biases
// follow mlp_bias where the family reads it (Llama).
struct DecoderFamily {
  enum class SlidingWindow {
    none,         // no sliding-window attention (Llama)
    all_layers,   // sliding_window applies to every layer when set (Mistral)
    qwen_layers,  // use_sliding_window, max_window_layers or layer_types (Qwen2, Qwen3)
  };
  const char* model_type;     // config.json model_type
  const char* architecture;   // config.json architectures[0]
  bool qkv_bias_always;       // Qwen2
  bool reads_attention_bias;  // attention_bias -> q, k, v and o biases
  bool reads_mlp_bias;        // mlp_bias -> gate, up and down biases
  bool qk_norm;               // RMS norm over head_dim of q and k, per head, before rotary (Qwen3)
  SlidingWindow sliding;
  DecoderConfig (*defaults)();  // transformers' defaults for fields config.json may omit
};

struct DecoderConfig {
  const DecoderFamily* family = nullptr;
  index_t vocab_size = 0;
  index_t hidden_size = 0;
  index_t intermediate_size = 0;
  index_t num_hidden_layers = 0;
  index_t num_attention_heads = 1;
  index_t num_key_value_heads = 1;
  index_t head_dim_override = 0;  // config.json head_dim; 0 = hidden_size / num_attention_heads
  index_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  Activation hidden_act = Activation::silu;  // the MLP's gate activation
  double rope_theta = 10000.0;
  RopeParameters rope_scaling;  // type and parameters (its theta and max_position_embeddings are set from above)
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // read by families with reads_attention_bias
  bool mlp_bias = false;        // read by families with reads_mlp_bias
  // Layers whose attention transformers restricts to the last sliding_window
  // keys (empty: none). Not implemented: a forward whose sequences are longer
  // than the window is refused; shorter ones are exact.
  index_t sliding_window = 0;
  std::vector<index_t> sliding_layers;

  index_t head_dim() const { return head_dim_override > 0 ? head_dim_override : hidden_size / num_attention_heads; }
  const char* model_type() const { return family ? family->model_type : "decoder"; }
  bool qkv_bias() const {
    return family && (family->qkv_bias_always || (family->reads_attention_bias && attention_bias));
  }
  bool o_bias() const { return family && family->reads_attention_bias && attention_bias; }
  bool mlp_has_bias() const { return family && family->reads_mlp_bias && mlp_bias; }
  bool qk_norm() const { return family && family->qk_norm; }
  RopeParameters rope() const {
    RopeParameters r = rope_scaling;
    r.theta = rope_theta;
    r.max_position_embeddings = max_position_embeddings;
    return r;
  }

  void validate() const {
    const char* mt = model_type();
    if (!family) fail<UsageError>("decoder config: no model family set");
    if (vocab_size < 1 || hidden_size < 1 || intermediate_size < 1 || num_hidden_layers < 0 ||
        num_attention_heads < 1 || num_key_value_heads < 1 || head_dim_override < 0)
      fail<InputError>("{} config: sizes must be positive", mt);
    if (head_dim_override == 0 && hidden_size % num_attention_heads != 0)
      fail<InputError>("{} config: hidden_size {} is not divisible by num_attention_heads {}", mt, hidden_size,
                       num_attention_heads);
    if (num_attention_heads % num_key_value_heads != 0)
      fail<InputError>("{} config: num_attention_heads {} is not divisible by num_key_value_heads {}", mt,
                       num_attention_heads, num_key_value_heads);
    if (head_dim() % 2 != 0) fail<InputError>("{} config: head_dim {} must be even for rotary", mt, head_dim());
    if (!sliding_layers.empty() && sliding_window < 1)
      fail<InputError>("{} config: sliding_window {} must be positive", mt, sliding_window);
    for (index_t l : sliding_layers)
      if (l < 0 || l >= num_hidden_layers)
        fail<InputError>("{} config: sliding-window layer {} is not a layer (num_hidden_layers {})", mt, l,
                         num_hidden_layers);
    try {  // the rope parameters are usable
      rotary_frequencies(head_dim(), rope(), 1);
    } catch (const UsageError& e) {
      fail<InputError>("{} config: {}", mt, e.what());
    }
  }
};

template <class T, class B = CpuBackend>
class DecoderForCausalLM {
 public:
  using scalar_type = T;
  using backend_type = B;

  struct Layer {
    RmsNorm<T, B> input_layernorm, post_attention_layernorm;
    LoraLinear<T, B> q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj;
    std::optional<RmsNorm<T, B>> q_norm, k_norm;  // [head_dim], Qwen3
  };

  // Random base weights (normal, std 0.02), seeded; with no seed the
  // storage is left for a checkpoint loader to fill (io/hf). A LoRA config
  // attaches adapters where PEFT would (LoraConfig::adapter_for on each
  // projection's module path) and sets what is trained (set_peft_trainable).
  DecoderForCausalLM(const DecoderConfig& config, std::optional<LoraConfig> lora, std::optional<std::uint64_t> seed)
      : config_(config), lora_(std::move(lora)) {
    config_.validate();
    std::mt19937_64 gen(seed.value_or(0));
    std::mt19937_64* rng = seed ? &gen : nullptr;
    const index_t d = config_.hidden_size, v = config_.vocab_size, dh = config_.head_dim();
    const index_t q_out = config_.num_attention_heads * dh, kv_out = config_.num_key_value_heads * dh;
    const index_t im = config_.intermediate_size;
    const bool qkv_b = config_.qkv_bias(), o_b = config_.o_bias(), mlp_b = config_.mlp_has_bias();
    embed_tokens_ = Parameter<T, B>(random_normal_or_unset<T, B>({v, d}, rng, 0.02));
    for (index_t i = 0; i < config_.num_hidden_layers; ++i) {
      Layer l;
      l.input_layernorm = RmsNorm<T, B>(d, config_.rms_norm_eps);
      l.post_attention_layernorm = RmsNorm<T, B>(d, config_.rms_norm_eps);
      l.q_proj = random_linear<T, B>(d, q_out, qkv_b, rng);
      l.k_proj = random_linear<T, B>(d, kv_out, qkv_b, rng);
      l.v_proj = random_linear<T, B>(d, kv_out, qkv_b, rng);
      l.o_proj = random_linear<T, B>(q_out, d, o_b, rng);
      l.gate_proj = random_linear<T, B>(d, im, mlp_b, rng);
      l.up_proj = random_linear<T, B>(d, im, mlp_b, rng);
      l.down_proj = random_linear<T, B>(im, d, mlp_b, rng);
      if (config_.qk_norm()) {
        l.q_norm.emplace(dh, config_.rms_norm_eps);
        l.k_norm.emplace(dh, config_.rms_norm_eps);
      }
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

  const DecoderConfig& config() const { return config_; }
  const std::optional<LoraConfig>& lora() const { return lora_; }
  const char* model_type() const { return config_.model_type(); }
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
      if (l.q_norm) visit_child(v, h + "self_attn.q_norm", *l.q_norm);
      if (l.k_norm) visit_child(v, h + "self_attn.k_norm", *l.k_norm);
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

  // What forward() feeds lm_head: the final hidden states (after the norm,
  // the rows forward() would read) and the head weight, for the probe's
  // fused lm_head_logprob (no [m, V] logits).
  LmHeadInput forward_features(Tape<T, B>& tape, const SequenceInput& in) {
    const index_t r = in.rows, t = in.length, d = config_.hidden_size;
    const auto n = static_cast<std::size_t>(r * t);
    if (in.tokens.size() != n || in.key_mask.size() != n || in.positions.size() != n)
      fail<UsageError>("{} forward: input arrays must hold rows*length = {} entries", model_type(), n);
    check_sliding_window(in);
    // transformers' dynamic rope reads max(position_ids) + 1 of the whole batch, padding included
    index_t seq_len = 0;
    for (std::int32_t p : in.positions) seq_len = std::max<index_t>(seq_len, index_t{p} + 1);
    const std::optional<PackedPositions> pack = pack_positions(in);
    const std::vector<std::int32_t> tokens = pack ? pack->select(in.tokens) : in.tokens;
    const std::vector<std::int32_t> positions = pack ? pack->select(in.positions) : in.positions;
    const index_t dh = config_.head_dim();
    const auto table = make_rotary_table<T, B>(std::span<const std::int32_t>(positions), dh, config_.rope(), seq_len);
    const index_t hq = config_.num_attention_heads, hkv = config_.num_key_value_heads;
    const std::span<const std::uint8_t> mask(in.key_mask);
    // A forward-tangent tape frees each finished layer's values and tangents
    // but h (a no-op when recording): the pass holds about one layer.
    const TapeMark start = tape.mark();
    Var h = embedding(tape, use(tape, embed_tokens_), std::span<const std::int32_t>(tokens));
    if (!pack) h = reshape(tape, h, {r, t, d});
    auto grid = [&](Var x) { return pack ? pack->to_grid(tape, x) : x; };
    // The rows of h whose logits are read, once past the last attention.
    bool selected = !in.logit_positions;
    auto select_read = [&](Var x) {
      return gather_rows(tape, x, std::span<const std::int32_t>(pack ? pack->logits : *in.logit_positions));
    };
    for (Layer& l : layers_) {
      const AttentionInputs x = attention_inputs(tape, l, h, table);
      Var att = flash_causal_attention(tape, grid(x.q), grid(x.k), grid(x.v), mask, hq, hkv);
      if (pack) att = pack->from_grid(tape, att);
      if (&l == &layers_.back() && !selected) {
        att = select_read(att);
        h = select_read(h);
        selected = true;
      }
      h = layer_output(tape, l, h, att);
      tape.release_since(start, {h});
    }
    if (!selected) h = select_read(h);
    return {norm_.forward(tape, h), use(tape, lm_head_ ? *lm_head_ : embed_tokens_)};
  }

  // Logits [R, V] of the tokens in.read after feeding in's new tokens through
  // the layers with a key/value cache (nn/kv_cache.hpp): the same layer
  // pieces as forward(), attention over the cache. Forward only; the tape
  // holds one call's activations. A cache comes from make_cache().
  KvCache<T, B> make_cache(index_t rows, index_t capacity) const {
    return KvCache<T, B>(config_.num_hidden_layers, rows, capacity, config_.num_key_value_heads * config_.head_dim());
  }
  Var forward_cached(Tape<T, B>& tape, KvCache<T, B>& cache, const CachedInput& in) {
    in.check(model_type(), cache.capacity());
    const index_t end = in.end();
    // Within the window every key is seen, as in forward(); beyond it both refuse.
    for (std::size_t row = 0; row < in.start.size(); ++row)
      check_window_span("forward_cached", static_cast<index_t>(row), 0, in.start[row] + in.length - 1);
    const RopeParameters rope = config_.rope();
    // Dynamic rope rescales every position once the sequence outgrows max_position_embeddings; cached keys cannot.
    if (rope.type == RopeParameters::Type::dynamic && end > rope.max_position_embeddings)
      fail<InputError>(
          "{} forward_cached: position {} exceeds max_position_embeddings {} under dynamic rope "
          "scaling, which rescales the cached keys",
          model_type(), end - 1, rope.max_position_embeddings);
    const std::vector<std::int32_t> positions = in.positions();
    const auto table = make_rotary_table<T, B>(std::span<const std::int32_t>(positions), config_.head_dim(), rope);
    const index_t hq = config_.num_attention_heads, hkv = config_.num_key_value_heads;
    const std::vector<std::int32_t> read = in.read_rows();
    const TapeMark start = tape.mark();  // each finished layer is freed on a forward-tangent tape
    Var h = embedding(tape, use(tape, embed_tokens_), std::span<const std::int32_t>(in.tokens));
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      Layer& l = layers_[i];
      const AttentionInputs x = attention_inputs(tape, l, h, table);
      Var att = tape.constant(
          cache.attend(static_cast<index_t>(i), in, tape.value(x.q), tape.value(x.k), tape.value(x.v), hq, hkv));
      if (i + 1 == layers_.size()) {  // past the last attention only the read rows matter
        att = gather_rows(tape, att, std::span<const std::int32_t>(read));
        h = gather_rows(tape, h, std::span<const std::int32_t>(read));
      }
      h = layer_output(tape, l, h, att);
      tape.release_since(start, {h});
    }
    if (layers_.empty()) h = gather_rows(tape, h, std::span<const std::int32_t>(read));
    return linear(tape, norm_.forward(tape, h), use(tape, lm_head_ ? *lm_head_ : embed_tokens_));
  }

 private:
  struct AttentionInputs {
    Var q, k, v;
  };
  // A layer up to attention: the normed input's q, k (per-head normed for
  // Qwen3, then rotated) and v, as [N, heads * head_dim].
  AttentionInputs attention_inputs(Tape<T, B>& tape, Layer& l, Var h,
                                   const std::shared_ptr<const RotaryTable<T, B>>& table) {
    const index_t dh = config_.head_dim();
    // Qwen3: RMS norm of each head's head_dim features (rows of [N * heads, Dh])
    auto head_norm = [&](std::optional<RmsNorm<T, B>>& norm, Var x) {
      if (!norm) return x;
      const Shape s = tape.shape(x);
      return reshape(tape, norm->forward(tape, reshape(tape, x, {numel_of(s) / dh, dh})), s);
    };
    Var a = l.input_layernorm.forward(tape, h);
    return {rotary(tape, head_norm(l.q_norm, l.q_proj.forward(tape, a)), table, config_.num_attention_heads),
            rotary(tape, head_norm(l.k_norm, l.k_proj.forward(tape, a)), table, config_.num_key_value_heads),
            l.v_proj.forward(tape, a)};
  }
  // A layer after attention: the residual of o_proj, then the SwiGLU MLP's.
  Var layer_output(Tape<T, B>& tape, Layer& l, Var h, Var att) {
    h = add(tape, h, l.o_proj.forward(tape, att));
    Var m = l.post_attention_layernorm.forward(tape, h);
    Var gated = gated_activate(tape, l.gate_proj.forward(tape, m), l.up_proj.forward(tape, m), config_.hidden_act);
    return add(tape, h, l.down_proj.forward(tape, gated));
  }

  // A sliding window changes attention only when a real query sees a real key
  // at least `sliding_window` positions back (transformers masks key s for
  // query t when t - s >= sliding_window); that is refused, since these
  // layers attend causally over the whole sequence.
  void check_sliding_window(const SequenceInput& in) const {
    if (config_.sliding_layers.empty()) return;
    for (index_t row = 0; row < in.rows; ++row) {
      index_t first = -1, last = -1;
      for (index_t s = 0; s < in.length; ++s)
        if (in.key_mask[static_cast<std::size_t>(row * in.length + s)]) {
          if (first < 0) first = s;
          last = s;
        }
      if (first >= 0) check_window_span("forward", row, first, last);
    }
  }
  // The one refusal of both forwards: a row whose real tokens span the window
  // or more (positions first..last) would need the window mask.
  void check_window_span(const char* pass, index_t row, index_t first, index_t last) const {
    if (config_.sliding_layers.empty() || last - first < config_.sliding_window) return;
    fail<InputError>(
        "{} {}: row {} spans {} tokens (positions {}..{}), longer than sliding_window {} of layers [{}]; "
        "sliding-window attention is not implemented, only sequences within the window are exact",
        model_type(), pass, row, last - first + 1, first, last, config_.sliding_window,
        fmt::join(config_.sliding_layers, ", "));
  }

  DecoderConfig config_;
  std::optional<LoraConfig> lora_;
  Parameter<T, B> embed_tokens_;
  std::vector<Layer> layers_;
  RmsNorm<T, B> norm_;
  std::optional<Parameter<T, B>> lm_head_;
  bool head_is_original_embedding_ = false;  // a saved embed_tokens untied the head (PEFT's original_module)
};

}  // namespace entropy_probe::nn
