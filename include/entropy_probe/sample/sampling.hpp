// Ancestral sampling of G responses per prompt from any CausalLM, into the
// batch layout the probe reads: prompt at positions [0, p), response from p
// on, the rest padding (mask 0). Reproducible from the seed. Top-k and top-p
// (nucleus) filtering as transformers' generate applies them: top-k first,
// then top-p on the renormalized rest.
//
// Models with a key/value cache (CachedCausalLM: the GPT-2 and decoder
// families) are sampled incrementally: one forward over the prompts, then one
// token per row per step. Any other CausalLM re-runs its forward over the
// prefix for every new token.
#pragma once

#include "entropy_probe/data/batch.hpp"
#include "entropy_probe/module/module.hpp"
#include "entropy_probe/nn/kv_cache.hpp"

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <optional>
#include <random>
#include <span>
#include <vector>

namespace entropy_probe {

// A CausalLM with a key/value-cached forward (nn/kv_cache.hpp).
template <class M>
concept CachedCausalLM = CausalLM<M> &&
    requires(M& m, Tape<typename M::scalar_type, typename M::backend_type>& tape,
             nn::KvCache<typename M::scalar_type, typename M::backend_type>& cache, const nn::CachedInput& in) {
  {
    m.make_cache(index_t{1}, index_t{1})
    } -> std::same_as<nn::KvCache<typename M::scalar_type, typename M::backend_type>>;
  { m.forward_cached(tape, cache, in) } -> std::same_as<Var>;
};

struct SamplingConfig {
  index_t G = 4;                          // responses per prompt
  index_t max_new_tokens = 8;             // response length limit
  double temperature = 1.0;               // logits / temperature before sampling
  index_t top_k = 0;                      // sample among the k most likely tokens only (0: all)
  double top_p = 1.0;                     // ... among the fewest most likely whose mass reaches top_p (1: all)
  std::vector<std::int32_t> stop_tokens;  // any of them ends a response (and is kept)
  std::uint64_t seed = 0;
};

// Sees each step's logits before a token is drawn from them: the batch so far
// and the logits [rows, V] (in double) of the token at prompt length + step
// of every row (rows already stopped included).
using SamplingObserver = std::function<void(index_t step, const TokenBatch& batch, std::span<const double> logits)>;

// Samples config.G responses for each prompt. Advantages are zero; set them
// (grpo_advantages) once rewards are known.
template <CausalLM M>
TokenBatch sample_responses(M& model, const std::vector<std::vector<std::int32_t>>& prompts,
                            const SamplingConfig& config, const SamplingObserver& observe = {}) {
  using T = typename M::scalar_type;
  using B = typename M::backend_type;
  if (prompts.empty()) fail<UsageError>("sample_responses: no prompts");
  if (config.G < 1 || config.max_new_tokens < 1)
    fail<UsageError>("sample_responses: G = {} and max_new_tokens = {} must be >= 1", config.G, config.max_new_tokens);
  if (!(config.temperature > 0) || !std::isfinite(config.temperature))
    fail<UsageError>("sample_responses: temperature {} must be positive", config.temperature);
  if (config.top_k < 0) fail<UsageError>("sample_responses: top_k = {} must be >= 0 (0: no top-k)", config.top_k);
  if (!(config.top_p > 0 && config.top_p <= 1))
    fail<UsageError>("sample_responses: top_p = {} must be in (0, 1]", config.top_p);
  const index_t V = model.vocab_size();
  for (std::size_t i = 0; i < config.stop_tokens.size(); ++i)
    if (config.stop_tokens[i] < 0 || config.stop_tokens[i] >= V)
      fail<UsageError>("sample_responses: stop_tokens[{}] = {} is outside the vocabulary [0, {})", i,
                       config.stop_tokens[i], V);
  index_t max_prompt = 0;
  for (std::size_t b = 0; b < prompts.size(); ++b) {
    if (prompts[b].empty()) fail<UsageError>("sample_responses: prompt {} is empty", b);
    for (std::size_t t = 0; t < prompts[b].size(); ++t)
      if (prompts[b][t] < 0 || prompts[b][t] >= V)
        fail<UsageError>("sample_responses: prompt {} token {} = {} is outside the vocabulary [0, {})", b, t,
                         prompts[b][t], V);
    max_prompt = std::max<index_t>(max_prompt, static_cast<index_t>(prompts[b].size()));
  }
  TokenBatch batch;
  batch.B = static_cast<index_t>(prompts.size());
  batch.G = config.G;
  batch.T = max_prompt + config.max_new_tokens;
  const auto n = static_cast<std::size_t>(batch.B * batch.G * batch.T);
  batch.sequences.assign(n, 0);
  batch.attention_mask.assign(n, 0);
  batch.advantages.assign(static_cast<std::size_t>(batch.B * batch.G), 0.0);
  for (index_t b = 0; b < batch.B; ++b) {
    const auto& p = prompts[static_cast<std::size_t>(b)];
    batch.prompt_lens.push_back(static_cast<std::int32_t>(p.size()));
    for (index_t g = 0; g < batch.G; ++g)
      for (std::size_t t = 0; t < p.size(); ++t) {
        batch.sequences[static_cast<std::size_t>(batch.at(b, g, static_cast<index_t>(t)))] = p[t];
        batch.attention_mask[static_cast<std::size_t>(batch.at(b, g, static_cast<index_t>(t)))] = 1;
      }
  }
  std::mt19937_64 rng(config.seed);
  std::uniform_real_distribution<double> unif(0.0, 1.0);
  std::vector<bool> done(static_cast<std::size_t>(batch.rows()), false);
  const bool filter = config.top_k > 0 || config.top_p < 1;
  const index_t rows = batch.rows();
  // The logits [rows, V] of the token at prompt length + step of every row.
  std::vector<T> logits(static_cast<std::size_t>(rows * V));
  std::optional<nn::KvCache<T, B>> cache;
  auto step_logits = [&](index_t step) {
    // Forward only: a forward-tangent tape without tangents keeps no nodes and
    // frees each finished layer (the prefill of long prompts costs one layer).
    Tape<T, B> tape(forward_tangents, {});
    if constexpr (CachedCausalLM<M>) {
      // Step 0 feeds each prompt once (right-padded to the longest) and gives
      // its cache and logits to the G rows sampled from it; later steps feed
      // each row's last token.
      nn::CachedInput in;
      const index_t stride = step == 0 ? batch.G : 1;  // rows of the batch per row fed
      in.rows = rows / stride;
      in.length = step == 0 ? max_prompt : 1;
      for (index_t i = 0; i < in.rows; ++i) {
        const index_t r = i * stride, p = batch.prompt_lens[static_cast<std::size_t>(r / batch.G)];
        const index_t first = step == 0 ? 0 : p + step - 1;
        for (index_t t = first; t < first + in.length; ++t)
          in.tokens.push_back(batch.sequences[static_cast<std::size_t>(r * batch.T + t)]);
        in.start.push_back(static_cast<std::int32_t>(first));
        in.read.push_back(static_cast<std::int32_t>(step == 0 ? p - 1 : 0));
      }
      if (step > 0) {  // into the step's buffer (a fresh vector per step cost page faults)
        const Tensor<T, B>& z = tape.value(model.forward_cached(tape, *cache, in));
        B::download(logits.data(), z.data(), z.numel());
      } else {
        nn::KvCache<T, B> prompts_cache = model.make_cache(in.rows, batch.T);
        const std::vector<T> z = tape.value(model.forward_cached(tape, prompts_cache, in)).to_host();
        cache.emplace(prompts_cache.repeat_rows(batch.G));
        for (index_t r = 0; r < rows; ++r) std::copy_n(z.begin() + (r / batch.G) * V, V, logits.begin() + r * V);
      }
    } else {
      const index_t len = max_prompt + step;  // forward over the longest prefix that matters
      SequenceInput in;
      in.rows = rows;
      in.length = len;
      for (index_t r = 0; r < rows; ++r)
        for (index_t t = 0; t < len; ++t) {
          const auto i = static_cast<std::size_t>(r * batch.T + t);
          in.tokens.push_back(batch.sequences[i]);
          in.key_mask.push_back(batch.attention_mask[i]);
          in.positions.push_back(static_cast<std::int32_t>(t));
        }
      const std::vector<T> all = tape.value(model.forward(tape, in)).to_host();
      for (index_t r = 0; r < rows; ++r) {
        const index_t pos = batch.prompt_lens[static_cast<std::size_t>(r / batch.G)] + step;
        std::copy_n(all.begin() + (r * len + pos - 1) * V, V, logits.begin() + r * V);
      }
    }
    if (observe) {
      const std::vector<double> z(logits.begin(), logits.end());
      observe(step, batch, std::span<const double>(z));
    }
  };
  // One row's draw from its logits z with the uniform u: the first token
  // where the running mass reaches u (probs and order are the row's scratch).
  auto draw = [&](const T* z, double u, std::vector<double>& probs, std::vector<index_t>& order) {
    double mx = -INFINITY, total = 0;
    for (index_t v = 0; v < V; ++v) mx = std::max(mx, double(z[v]) / config.temperature);
    for (index_t v = 0; v < V; ++v)
      total += probs[static_cast<std::size_t>(v)] = std::exp(double(z[v]) / config.temperature - mx);
    if (filter) {  // zero all but the kept tokens; ties at a cut go to the lower id (stable sort)
      std::iota(order.begin(), order.end(), index_t{0});
      std::stable_sort(order.begin(), order.end(), [&](index_t x, index_t y) {
        return probs[static_cast<std::size_t>(x)] > probs[static_cast<std::size_t>(y)];
      });
      index_t keep = config.top_k > 0 ? std::min(config.top_k, V) : V;
      double kept = 0;
      for (index_t i = 0; i < keep; ++i) kept += probs[static_cast<std::size_t>(order[static_cast<std::size_t>(i)])];
      // Top-p keeps a token when the tokens more likely than it hold less than top_p of the mass.
      double before = 0;
      for (index_t i = 0; i < keep; ++i) {
        if (before >= config.top_p * kept) {
          keep = i;
          break;
        }
        before += probs[static_cast<std::size_t>(order[static_cast<std::size_t>(i)])];
      }
      total = 0;
      for (index_t i = 0; i < V; ++i) {
        double& q = probs[static_cast<std::size_t>(order[static_cast<std::size_t>(i)])];
        if (i >= keep) q = 0;
        total += q;
      }
    }
    // A token of mass 0 (filtered out) is never picked, and the last one of positive mass absorbs rounding.
    u *= total;
    index_t pick = 0;
    for (index_t v = 0; v < V; ++v) {
      const double q = probs[static_cast<std::size_t>(v)];
      if (q == 0) continue;
      pick = v;
      u -= q;
      if (u <= 0) break;
    }
    return pick;
  };
  // Scratch per thread: the rows of a step are drawn in parallel, each from
  // its own uniform, drawn beforehand in row order, so a draw does not depend
  // on the thread that made it (the logits agree between thread counts to
  // rounding: CpuBackend::gemm).
  const auto slots =
      static_cast<std::size_t>(std::min<index_t>(CpuBackend::num_threads(), rows));  // parallel_tasks' slots
  std::vector<std::vector<double>> probs(slots, std::vector<double>(static_cast<std::size_t>(V)));
  std::vector<std::vector<index_t>> order(slots, std::vector<index_t>(filter ? static_cast<std::size_t>(V) : 0));
  std::vector<double> uniform(static_cast<std::size_t>(rows));
  std::vector<index_t> picks(static_cast<std::size_t>(rows));
  for (index_t step = 0; step < config.max_new_tokens; ++step) {
    if (std::all_of(done.begin(), done.end(), [](bool d) { return d; })) break;
    step_logits(step);
    for (index_t r = 0; r < rows; ++r)
      if (!done[static_cast<std::size_t>(r)]) uniform[static_cast<std::size_t>(r)] = unif(rng);
    CpuBackend::parallel_tasks(rows, [&](index_t slot, index_t r) {
      const auto i = static_cast<std::size_t>(r), k = static_cast<std::size_t>(slot);
      if (!done[i]) picks[i] = draw(logits.data() + r * V, uniform[i], probs[k], order[k]);
    });
    for (index_t r = 0; r < rows; ++r) {
      if (done[static_cast<std::size_t>(r)]) continue;
      const index_t pos = batch.prompt_lens[static_cast<std::size_t>(r / batch.G)] + step;  // the token sampled
      const auto i = static_cast<std::size_t>(r * batch.T + pos);
      const auto pick = static_cast<std::int32_t>(picks[static_cast<std::size_t>(r)]);
      batch.sequences[i] = pick;
      batch.attention_mask[i] = 1;
      if (std::find(config.stop_tokens.begin(), config.stop_tokens.end(), pick) != config.stop_tokens.end())
        done[static_cast<std::size_t>(r)] = true;
    }
  }
  return batch;
}

}  // namespace entropy_probe
