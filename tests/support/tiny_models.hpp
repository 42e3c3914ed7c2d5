// Small seeded models and batches shared by the probe tests.
#pragma once

#include <entropy_probe/data/batch.hpp>
#include <entropy_probe/nn/gpt2.hpp>
#include <entropy_probe/nn/qwen2.hpp>
#include <entropy_probe/optim/adam.hpp>

#include <map>
#include <random>
#include <string>
#include <vector>

namespace ep_test {

using namespace entropy_probe;

inline nn::Gpt2Config tiny_gpt2_config() {
  nn::Gpt2Config c;
  c.vocab_size = 11;
  c.n_positions = 16;
  c.n_embd = 8;
  c.n_layer = 2;
  c.n_head = 2;
  return c;
}

// A tiny Qwen2 (GQA: 2 query heads, 1 KV head), tied or untied lm_head.
// max_position_embeddings only travels through config.json (the model never
// reads it); 64 keeps the checkpoint tests' files small and explicit.
inline nn::Qwen2Config tiny_qwen2_config(bool tie) {
  nn::Qwen2Config c;
  c.vocab_size = 13;
  c.hidden_size = 8;
  c.intermediate_size = 12;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 1;
  c.max_position_embeddings = 64;
  c.rms_norm_eps = 1e-6;
  c.rope_theta = 10000.0;
  c.tie_word_embeddings = tie;
  return c;
}

inline nn::LoraConfig tiny_lora(bool lm_head = false) {
  nn::LoraConfig l;
  l.r = 2;
  l.lora_alpha = 4;
  l.target_modules = {"c_attn", "c_proj", "c_fc"};
  if (lm_head) l.modules_to_save = {"lm_head"};
  l.init_lora_b_zero = false;  // a trained adapter: B != 0, so every LoRA gradient is live
  return l;
}

template <class T>
nn::Gpt2LMHeadModel<T> tiny_gpt2(std::uint64_t seed = 1, bool lm_head = false) {
  return nn::Gpt2LMHeadModel<T>(tiny_gpt2_config(), tiny_lora(lm_head), seed);
}

// A batch with unequal prompt lengths, left padding inside some prompts,
// responses of unequal length and right padding, random advantages.
inline TokenBatch random_batch(index_t B, index_t G, index_t T, index_t vocab, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  TokenBatch b;
  b.B = B;
  b.G = G;
  b.T = T;
  b.sequences.assign(static_cast<std::size_t>(B * G * T), 0);
  b.attention_mask.assign(b.sequences.size(), 0);
  std::uniform_int_distribution<int> tok(0, int(vocab) - 1);
  std::normal_distribution<double> nd(0, 1);
  for (index_t p = 0; p < B; ++p) {
    const index_t plen = 1 + index_t(rng() % std::uint64_t(std::max<index_t>(T / 2, 1)));
    const index_t lpad = plen > 2 ? index_t(rng() % 2) : 0;  // some prompts left-padded
    b.prompt_lens.push_back(std::int32_t(plen));
    for (index_t g = 0; g < G; ++g) {
      const index_t glen = 1 + index_t(rng() % std::uint64_t(T - plen));
      for (index_t t = 0; t < T; ++t) {
        const auto i = static_cast<std::size_t>(b.at(p, g, t));
        const bool real = (t >= lpad && t < plen) || (t >= plen && t < plen + glen);
        b.attention_mask[i] = real ? 1 : 0;
        b.sequences[i] = real ? tok(rng) : 0;
      }
      // Prompts are shared by the group.
      if (g > 0)
        for (index_t t = 0; t < plen; ++t)
          b.sequences[static_cast<std::size_t>(b.at(p, g, t))] = b.sequences[static_cast<std::size_t>(b.at(p, 0, t))];
      b.advantages.push_back(nd(rng));
    }
  }
  return b;
}

// Adam state with positive second moments and a few steps, for every
// registry parameter except those whose name contains `skip` (when given).
template <class T>
AdamState<T> random_adam_state(const Registry<T>& reg, std::uint64_t seed, const std::string& skip = "") {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(0.5, 2.0);
  AdamHyper h;
  h.lr = 1e-3;
  AdamState<T> st(reg.info(), h);
  for (const auto& e : reg.entries()) {
    if (!skip.empty() && e.name.find(skip) != std::string::npos) continue;
    AdamParamState<T> ps{Tensor<T>(e.param->value.shape()), Tensor<T>(e.param->value.shape()), 3};
    for (index_t k = 0; k < ps.exp_avg.numel(); ++k) {
      ps.exp_avg[k] = T(1e-3 * (u(rng) - 1.25));
      ps.exp_avg_sq[k] = T(1e-6 * u(rng));
    }
    st.set(e.id, std::move(ps));
  }
  return st;
}

// A state with unequal step counts (1 + i % step_cycle: per-parameter bias
// corrections), weight decay 0.1 and no state for the parameters named by
// `stateless` (AdamW's lazy zero initialisation), as the direction and
// influence tests use.
inline AdamState<double> uneven_adam_state(const Registry<double>& reg, std::uint64_t seed, int step_cycle,
                                           const std::string& stateless = "h.1.mlp.c_fc.lora_A") {
  auto state = random_adam_state(reg, seed, stateless);
  state.hyper().weight_decay = 0.1;
  for (index_t i = 0; i < state.size(); ++i)
    if (auto* e = state.entry(i)) e->step = double(1 + i % step_cycle);
  return state;
}

// A buffer with a standard normal entry for every registry parameter: a
// direction to contract gradients with.
inline ParamBuffer<double> random_direction(const Registry<double>& reg, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0, 1);
  auto v = zeros_like_params<double>(reg);
  for (index_t i = 0; i < v.size(); ++i)
    for (index_t k = 0; k < v.entry(i)->numel(); ++k) (*v.entry(i))[k] = nd(rng);
  return v;
}

// Every parameter of a model by name: its values (as double), shape and
// trainability, for comparing two models (a save / load round trip).
struct ParamInfo {
  std::vector<double> values;
  entropy_probe::Shape shape;
  bool requires_grad;
};
template <class M>
std::map<std::string, ParamInfo> params_of(M& m) {
  using T = typename M::scalar_type;
  std::map<std::string, ParamInfo> out;
  m.named_parameters(entropy_probe::ParameterVisitor<T>([&](const std::string& name, entropy_probe::Parameter<T>& p) {
    const auto h = p.value.to_host();
    out[name] = ParamInfo{std::vector<double>(h.begin(), h.end()), p.value.shape(), p.requires_grad};
  }));
  return out;
}

}  // namespace ep_test
