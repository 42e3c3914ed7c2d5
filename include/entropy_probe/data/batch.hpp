// Token batches: B prompts x G responses x T tokens (docs/math.md, docs/checkpoints.md).
//
// The attention mask, never a token id, decides what is padding. Validation
// happens before anything trusts the data; every error names the batch, the
// field and the index.
#pragma once

#include "entropy_probe/core/config.hpp"
#include "entropy_probe/core/error.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace entropy_probe {

struct TokenBatch {
  index_t B = 0, G = 0, T = 0;
  std::vector<std::int32_t> sequences;                    // [B, G, T]
  std::vector<std::uint8_t> attention_mask;               // [B, G, T], 1 = real token
  std::vector<std::int32_t> prompt_lens;                  // [B]
  std::vector<double> advantages;                         // [B, G]
  std::optional<std::vector<double>> max_lengths;         // [B], > 0
  std::optional<std::vector<double>> rewards;             // [B, G]
  std::optional<std::vector<std::int32_t>> position_ids;  // [B, G, T]

  index_t rows() const { return B * G; }
  index_t at(index_t b, index_t g, index_t t) const { return (b * G + g) * T + t; }

  // gen(b, g) = { t : p[b] <= t < T and m[b,g,t] = 1 }; L = |gen|.
  bool generated(index_t b, index_t g, index_t t) const {
    return t >= prompt_lens[static_cast<std::size_t>(b)] && attention_mask[static_cast<std::size_t>(at(b, g, t))] != 0;
  }
  index_t gen_length(index_t b, index_t g) const {
    index_t n = 0;
    for (index_t t = 0; t < T; ++t) n += generated(b, g, t);
    return n;
  }
  // Lmax[b]: from the batch when given, else max_g L[b,g] (at least 1).
  double lmax(index_t b) const {
    if (max_lengths) return (*max_lengths)[static_cast<std::size_t>(b)];
    index_t m = 1;
    for (index_t g = 0; g < G; ++g) m = std::max(m, gen_length(b, g));
    return static_cast<double>(m);
  }
  double advantage(index_t b, index_t g) const { return advantages[static_cast<std::size_t>(b * G + g)]; }

  // Checks sizes, token ids against the vocabulary, masks, prompt lengths,
  // finite advantages and rewards, positive max lengths, and (when the model
  // has a position table of `max_positions` rows) every position id, given
  // or default. `what` names the batch in messages ("E batch", "U.safetensors").
  void validate(index_t vocab_size, const std::string& what,
                std::optional<index_t> max_positions = std::nullopt) const {
    if (B < 1) fail<InputError>("{}: empty batch (B = {})", what, B);
    if (G < 1) fail<InputError>("{}: G = {} responses per prompt; need at least 1", what, G);
    if (T < 2)
      fail<InputError>("{}: sequence length T = {}; need at least 2 (a prompt token and a response token)", what, T);
    const auto n = static_cast<std::size_t>(B * G * T);
    auto size_is = [&](const char* field, std::size_t got, std::size_t want, const char* shape) {
      if (got != want) fail<InputError>("{}: {} has {} entries, expected {} ({})", what, field, got, want, shape);
    };
    size_is("sequences", sequences.size(), n, "B*G*T");
    size_is("attention_mask", attention_mask.size(), n, "B*G*T");
    size_is("prompt_lens", prompt_lens.size(), static_cast<std::size_t>(B), "B");
    size_is("advantages", advantages.size(), static_cast<std::size_t>(B * G), "B*G");
    if (max_lengths) size_is("max_lengths", max_lengths->size(), static_cast<std::size_t>(B), "B");
    if (rewards) size_is("rewards", rewards->size(), static_cast<std::size_t>(B * G), "B*G");
    if (position_ids) size_is("position_ids", position_ids->size(), n, "B*G*T");
    for (index_t b = 0; b < B; ++b) {
      const index_t p = prompt_lens[static_cast<std::size_t>(b)];
      if (p < 1 || p >= T)
        fail<InputError>("{}: prompt_lens[{}] = {} is outside [1, {}) (a prompt token and room for a response)", what,
                         b, p, T);
      if (max_lengths) {
        const double m = (*max_lengths)[static_cast<std::size_t>(b)];
        if (!(m > 0) || !std::isfinite(m)) fail<InputError>("{}: max_lengths[{}] = {} must be positive", what, b, m);
      }
      for (index_t g = 0; g < G; ++g) {
        const double a = advantage(b, g);
        if (!std::isfinite(a)) fail<InputError>("{}: advantages[{},{}] = {} is not finite", what, b, g, a);
        if (rewards && !std::isfinite((*rewards)[static_cast<std::size_t>(b * G + g)]))
          fail<InputError>("{}: rewards[{},{}] = {} is not finite", what, b, g,
                           (*rewards)[static_cast<std::size_t>(b * G + g)]);
        for (index_t t = 0; t < T; ++t) {
          const auto i = static_cast<std::size_t>(at(b, g, t));
          const std::uint8_t m = attention_mask[i];
          if (m > 1) fail<InputError>("{}: attention_mask[{},{},{}] = {} is not 0 or 1", what, b, g, t, m);
          const std::int32_t tok = sequences[i];
          if (m && (tok < 0 || tok >= vocab_size))
            fail<InputError>("{}: sequences[{},{},{}] = {} is not below the vocabulary size {}", what, b, g, t, tok,
                             vocab_size);
          if (!m && (tok < 0 || tok >= vocab_size))  // padding ids are never read, but must still be embeddable
            fail<InputError>("{}: sequences[{},{},{}] = {} (padding) is outside the vocabulary [0, {})", what, b, g, t,
                             tok, vocab_size);
          if (position_ids && (*position_ids)[i] < 0)
            fail<InputError>("{}: position_ids[{},{},{}] = {} is negative", what, b, g, t, (*position_ids)[i]);
          if (max_positions) {
            const index_t pos = position_ids ? (*position_ids)[i] : t;
            if (pos >= *max_positions)
              fail<InputError>("{}: {}[{},{},{}] = {} is not below the model's {} positions", what,
                               position_ids ? "position_ids" : "default position (T too long)", b, g, t, pos,
                               *max_positions);
          }
        }
      }
    }
  }

  // The prompts `idx` (in that order) as a batch of their own: microbatches
  // and rank shards.
  TokenBatch select(const std::vector<index_t>& idx) const {
    TokenBatch s;
    s.B = static_cast<index_t>(idx.size());
    s.G = G;
    s.T = T;
    auto take = [&](const auto& v, index_t per) {
      std::decay_t<decltype(v)> out;
      out.reserve(idx.size() * static_cast<std::size_t>(per));
      for (index_t b : idx) {
        if (b < 0 || b >= B) fail<UsageError>("TokenBatch::select: prompt {} outside [0, {})", b, B);
        out.insert(out.end(), v.begin() + b * per, v.begin() + (b + 1) * per);
      }
      return out;
    };
    s.sequences = take(sequences, G * T);
    s.attention_mask = take(attention_mask, G * T);
    s.prompt_lens = take(prompt_lens, 1);
    s.advantages = take(advantages, G);
    if (max_lengths) s.max_lengths = take(*max_lengths, 1);
    if (rewards) s.rewards = take(*rewards, G);
    if (position_ids) s.position_ids = take(*position_ids, G * T);
    return s;
  }
  TokenBatch slice(index_t b0, index_t b1) const {
    std::vector<index_t> idx;
    for (index_t b = b0; b < b1; ++b) idx.push_back(b);
    return select(idx);
  }
};

// GRPO advantages: reward minus the group mean, optionally divided by the
// group's standard deviation (unbiased, as torch.std, plus eps), per prompt.
inline std::vector<double> grpo_advantages(const std::vector<double>& rewards, index_t B, index_t G,
                                           bool scale_by_std = false, double eps = 1e-6) {
  if (static_cast<index_t>(rewards.size()) != B * G)
    fail<UsageError>("grpo_advantages: {} rewards for B*G = {}", rewards.size(), B * G);
  std::vector<double> adv(rewards.size());
  for (index_t b = 0; b < B; ++b) {
    double mean = 0;
    for (index_t g = 0; g < G; ++g) mean += rewards[static_cast<std::size_t>(b * G + g)];
    mean /= static_cast<double>(G);
    double var = 0;
    for (index_t g = 0; g < G; ++g) {
      const double d = rewards[static_cast<std::size_t>(b * G + g)] - mean;
      var += d * d;
    }
    const double sd = G > 1 ? std::sqrt(var / static_cast<double>(G - 1)) : 0.0;
    for (index_t g = 0; g < G; ++g) {
      const auto i = static_cast<std::size_t>(b * G + g);
      adv[i] = (rewards[i] - mean) / (scale_by_std ? sd + eps : 1.0);
    }
  }
  return adv;
}

}  // namespace entropy_probe
