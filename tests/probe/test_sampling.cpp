// sample_responses: layout, reproducibility, stop tokens, top-k/top-p, and the sampled
// distribution against softmax(logits / temperature) of an independent forward.
#include "../support/tiny_models.hpp"

#include <entropy_probe/sample/sampling.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

using namespace entropy_probe;
using namespace ep_test;
using Catch::Contains;

namespace {

using Model = nn::Gpt2LMHeadModel<double>;

// A model with spread-out logits over a vocabulary of 5: the embedding is
// scaled up so that the next-token distribution is far from uniform.
Model spread_model(std::uint64_t seed) {
  nn::Gpt2Config c;
  c.vocab_size = 5;
  c.n_positions = 8;
  c.n_embd = 8;
  c.n_layer = 1;
  c.n_head = 2;
  Model m(c, std::nullopt, seed);
  for (index_t k = 0; k < m.wte().value.numel(); ++k) m.wte().value[k] *= 15.0;
  return m;
}

// A model whose logits are the same at every position: ln_f has weight 0 and
// bias e_0, so the logits are column 0 of the (tied) embedding.
Model constant_logit_model(const std::vector<double>& logits) {
  Model m(tiny_gpt2_config(), std::nullopt, 4);
  const index_t d = m.config().n_embd;
  for (index_t k = 0; k < d; ++k) {
    m.ln_f().weight.value[k] = 0.0;
    m.ln_f().bias.value[k] = k == 0 ? 1.0 : 0.0;
  }
  for (index_t v = 0; v < m.vocab_size(); ++v) m.wte().value[v * d] = logits[static_cast<std::size_t>(v)];
  return m;
}

// softmax(z / tau) of the logits that score the token after `prompt`, from a
// forward pass over the prompt alone.
std::vector<double> next_token_probs(Model& m, const std::vector<std::int32_t>& prompt, double tau) {
  SequenceInput in;
  in.rows = 1;
  in.length = static_cast<index_t>(prompt.size());
  in.tokens = prompt;
  in.key_mask.assign(prompt.size(), 1);
  for (std::size_t t = 0; t < prompt.size(); ++t) in.positions.push_back(static_cast<std::int32_t>(t));
  Tape<double> tape;
  const std::vector<double> z = tape.value(m.forward(tape, in)).to_host();
  const index_t V = m.vocab_size();
  const double* last = z.data() + (in.length - 1) * V;
  double mx = -std::numeric_limits<double>::infinity(), total = 0;
  for (index_t v = 0; v < V; ++v) mx = std::max(mx, last[v] / tau);
  std::vector<double> p(static_cast<std::size_t>(V));
  for (index_t v = 0; v < V; ++v) total += p[static_cast<std::size_t>(v)] = std::exp(last[v] / tau - mx);
  for (double& x : p) x /= total;
  return p;
}

// Frequencies of the first response token of prompt b.
std::vector<double> first_token_freqs(const TokenBatch& batch, index_t b, index_t V) {
  std::vector<double> f(static_cast<std::size_t>(V), 0.0);
  const index_t p = batch.prompt_lens[static_cast<std::size_t>(b)];
  for (index_t g = 0; g < batch.G; ++g)
    f[static_cast<std::size_t>(batch.sequences[static_cast<std::size_t>(batch.at(b, g, p))])] += 1.0;
  for (double& x : f) x /= double(batch.G);
  return f;
}

double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

}  // namespace

TEST_CASE("sampling: layout of the sampled batch", "[sampling]") {
  auto model = tiny_gpt2<double>(2);
  const std::vector<std::vector<std::int32_t>> prompts = {{3, 1, 4}, {9}, {2, 7}};
  SamplingConfig cfg;
  cfg.G = 3;
  cfg.max_new_tokens = 5;
  cfg.seed = 17;
  const TokenBatch b = sample_responses(model, prompts, cfg);
  CHECK(b.B == 3);
  CHECK(b.G == 3);
  CHECK(b.T == 3 + 5);
  CHECK(b.prompt_lens == std::vector<std::int32_t>{3, 1, 2});
  CHECK(b.advantages == std::vector<double>(9, 0.0));
  CHECK_FALSE(b.max_lengths);
  CHECK_FALSE(b.rewards);
  CHECK_FALSE(b.position_ids);
  CHECK_NOTHROW(b.validate(model.vocab_size(), "sampled"));
  for (index_t p = 0; p < b.B; ++p) {
    const auto& prompt = prompts[static_cast<std::size_t>(p)];
    const auto plen = static_cast<index_t>(prompt.size());
    for (index_t g = 0; g < b.G; ++g) {
      CAPTURE(p, g);
      for (index_t t = 0; t < plen; ++t) {
        CHECK(b.sequences[static_cast<std::size_t>(b.at(p, g, t))] == prompt[static_cast<std::size_t>(t)]);
        CHECK(b.attention_mask[static_cast<std::size_t>(b.at(p, g, t))] == 1);
      }
      // No end token: every response runs to max_new_tokens, then padding 0.
      CHECK(b.gen_length(p, g) == 5);
      for (index_t t = plen + 5; t < b.T; ++t) {
        CHECK(b.attention_mask[static_cast<std::size_t>(b.at(p, g, t))] == 0);
        CHECK(b.sequences[static_cast<std::size_t>(b.at(p, g, t))] == 0);
      }
    }
  }
}

TEST_CASE("sampling: reproducible for a seed, different for another", "[sampling]") {
  auto model = tiny_gpt2<double>(3);
  const std::vector<std::vector<std::int32_t>> prompts = {{1, 2}, {5, 6, 7}};
  SamplingConfig cfg;
  cfg.G = 4;
  cfg.max_new_tokens = 6;
  cfg.stop_tokens = {10};
  cfg.seed = 123;
  const TokenBatch a = sample_responses(model, prompts, cfg);
  const TokenBatch a2 = sample_responses(model, prompts, cfg);
  CHECK(a.sequences == a2.sequences);
  CHECK(a.attention_mask == a2.attention_mask);
  CHECK(a.prompt_lens == a2.prompt_lens);
  cfg.seed = 124;
  const TokenBatch c = sample_responses(model, prompts, cfg);
  CHECK(a.sequences != c.sequences);
  CHECK(a.prompt_lens == c.prompt_lens);
}

TEST_CASE("sampling: a forced end token stops every response after itself", "[sampling][end_token]") {
  // Logit 40 for the end token, 0 for the rest: p(end) = 1 - 10 e^-40.
  std::vector<double> logits(11, 0.0);
  logits[6] = 40.0;
  auto model = constant_logit_model(logits);
  SamplingConfig cfg;
  cfg.G = 5;
  cfg.max_new_tokens = 4;
  cfg.stop_tokens = {6};
  cfg.seed = 1;
  const TokenBatch b = sample_responses(model, {{1, 2, 3}, {4}}, cfg);
  CHECK_NOTHROW(b.validate(model.vocab_size(), "sampled"));
  for (index_t p = 0; p < b.B; ++p)
    for (index_t g = 0; g < b.G; ++g) {
      CAPTURE(p, g);
      const index_t plen = b.prompt_lens[static_cast<std::size_t>(p)];
      CHECK(b.gen_length(p, g) == 1);
      CHECK(b.sequences[static_cast<std::size_t>(b.at(p, g, plen))] == 6);  // kept, mask 1
      CHECK(b.attention_mask[static_cast<std::size_t>(b.at(p, g, plen))] == 1);
      for (index_t t = plen + 1; t < b.T; ++t) CHECK(b.attention_mask[static_cast<std::size_t>(b.at(p, g, t))] == 0);
    }
  SECTION("without stop tokens the same model keeps sampling it") {
    cfg.stop_tokens.clear();
    const TokenBatch c = sample_responses(model, {{1, 2, 3}}, cfg);
    for (index_t g = 0; g < c.G; ++g) {
      CHECK(c.gen_length(0, g) == 4);
      for (index_t t = 3; t < 7; ++t) CHECK(c.sequences[static_cast<std::size_t>(c.at(0, g, t))] == 6);
    }
  }
}

TEST_CASE("sampling: with a likely end token nothing follows it, and lengths are geometric", "[sampling][end_token]") {
  // p(end = 6) = 1/4, the other ten tokens 3/40 each; the logits are the same at every position.
  std::vector<double> logits(11, 0.0);
  logits[6] = std::log(10.0 / 3.0);
  auto model = constant_logit_model(logits);
  SamplingConfig cfg;
  cfg.G = 2000;
  cfg.max_new_tokens = 4;
  cfg.stop_tokens = {6};
  cfg.seed = 99;
  const TokenBatch b = sample_responses(model, {{2, 5}}, cfg);
  CHECK_NOTHROW(b.validate(model.vocab_size(), "sampled"));
  std::vector<double> length_count(5, 0.0);
  for (index_t g = 0; g < b.G; ++g) {
    const index_t L = b.gen_length(0, g);
    REQUIRE(L >= 1);
    REQUIRE(L <= 4);
    length_count[static_cast<std::size_t>(L)] += 1;
    for (index_t t = 2; t < 2 + L; ++t) REQUIRE(b.attention_mask[static_cast<std::size_t>(b.at(0, g, t))] == 1);
    for (index_t t = 2 + L; t < b.T; ++t) REQUIRE(b.attention_mask[static_cast<std::size_t>(b.at(0, g, t))] == 0);
    // Only the last token of a response may be the end token; it must be, unless the response hit the limit.
    for (index_t t = 2; t < 1 + L; ++t) REQUIRE(b.sequences[static_cast<std::size_t>(b.at(0, g, t))] != 6);
    if (L < 4) REQUIRE(b.sequences[static_cast<std::size_t>(b.at(0, g, 1 + L))] == 6);
  }
  // P(L = k) = (3/4)^(k-1) / 4 for k < 4, P(L = 4) = (3/4)^3.
  const double n = double(b.G);
  for (index_t k = 1; k <= 4; ++k) {
    const double p = k < 4 ? std::pow(0.75, double(k - 1)) * 0.25 : std::pow(0.75, 3.0);
    const double se = std::sqrt(p * (1 - p) / n);
    CAPTURE(k, length_count[static_cast<std::size_t>(k)] / n, p, se);
    CHECK(std::abs(length_count[static_cast<std::size_t>(k)] / n - p) < 4 * se);
  }
}

TEST_CASE("sampling: first-token frequencies match softmax(logits / temperature)", "[sampling][distribution]") {
  auto model = spread_model(11);
  const index_t V = model.vocab_size();
  const std::vector<std::vector<std::int32_t>> prompts = {{3, 1, 4}, {2}};
  SamplingConfig cfg;
  cfg.G = 4000;
  cfg.max_new_tokens = 1;
  const double n = double(cfg.G);
  std::vector<double> max_freq;
  for (double tau : {0.5, 1.0, 2.0}) {
    cfg.temperature = tau;
    cfg.seed = static_cast<std::uint64_t>(1000 * tau);
    const TokenBatch b = sample_responses(model, prompts, cfg);
    for (index_t p = 0; p < b.B; ++p) {
      const std::vector<double> want = next_token_probs(model, prompts[static_cast<std::size_t>(p)], tau);
      const std::vector<double> got = first_token_freqs(b, p, V);
      for (index_t v = 0; v < V; ++v) {
        const double pv = want[static_cast<std::size_t>(v)];
        const double se = std::sqrt(pv * (1 - pv) / n);
        CAPTURE(tau, p, v, got[static_cast<std::size_t>(v)], pv, se);
        CHECK(std::abs(got[static_cast<std::size_t>(v)] - pv) < 4 * se);
      }
      // The check can fail: another temperature's distribution is far outside the tolerance.
      const std::vector<double> other = next_token_probs(model, prompts[static_cast<std::size_t>(p)], tau * 2);
      CHECK(max_abs_diff(want, other) > 8 * std::sqrt(0.25 / n));
      if (p == 0) max_freq.push_back(*std::max_element(got.begin(), got.end()));
    }
    // The two prompts' distributions differ as much (so the prompt's position matters).
    CHECK(max_abs_diff(next_token_probs(model, prompts[0], tau), next_token_probs(model, prompts[1], tau)) >
          8 * std::sqrt(0.25 / n));
  }
  // Lower temperature: a more peaked distribution.
  REQUIRE(max_freq.size() == 3);
  CHECK(max_freq[0] > max_freq[1]);
  CHECK(max_freq[1] > max_freq[2]);
}

TEST_CASE("sampling: bad arguments are usage errors", "[sampling]") {
  auto model = tiny_gpt2<double>(5);
  SamplingConfig cfg;
  const std::vector<std::vector<std::int32_t>> ok = {{1, 2}};
  CHECK_NOTHROW(sample_responses(model, ok, cfg));
  CHECK_THROWS_AS(sample_responses(model, {}, cfg), UsageError);
  CHECK_THROWS_WITH(sample_responses(model, {}, cfg), Contains("no prompts"));
  CHECK_THROWS_AS(sample_responses(model, {{1}, {}}, cfg), UsageError);
  CHECK_THROWS_WITH(sample_responses(model, {{1}, {}}, cfg), Contains("prompt 1 is empty"));
  CHECK_THROWS_AS(sample_responses(model, {{1, 11}}, cfg), UsageError);
  CHECK_THROWS_WITH(sample_responses(model, {{1, 11}}, cfg), Contains("prompt 0 token 1 = 11") && Contains("[0, 11)"));
  CHECK_THROWS_AS(sample_responses(model, {{2}, {-1, 3}}, cfg), UsageError);
  CHECK_THROWS_WITH(sample_responses(model, {{2}, {-1, 3}}, cfg), Contains("prompt 1 token 0 = -1"));
  SamplingConfig g0 = cfg;
  g0.G = 0;
  CHECK_THROWS_AS(sample_responses(model, ok, g0), UsageError);
  CHECK_THROWS_WITH(sample_responses(model, ok, g0), Contains("G = 0"));
  SamplingConfig n0 = cfg;
  n0.max_new_tokens = 0;
  CHECK_THROWS_AS(sample_responses(model, ok, n0), UsageError);
  for (double tau : {0.0, -1.0, std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()}) {
    CAPTURE(tau);
    SamplingConfig t = cfg;
    t.temperature = tau;
    CHECK_THROWS_AS(sample_responses(model, ok, t), UsageError);
    CHECK_THROWS_WITH(sample_responses(model, ok, t), Contains("temperature"));
  }
}

TEST_CASE("sampling: top-k, then top-p on the renormalized rest", "[sampling][top_k][top_p]") {
  // Weights 1,1,1,1,1,16,8,4,2,1,1 (total 37) at every position, so the kept sets are known by hand:
  //   top_k 3           -> {5, 6, 7} with 16:8:4
  //   top_p 0.6         -> {5, 6} (16/37 < 0.6 <= 24/37) with 16:8
  //   top_k 2, top_p 0.6 -> {5} (16/24 >= 0.6 after top-k renormalizes)
  //   top_p 1e-9        -> {5}; top_k 0, top_p 1 -> everything, unfiltered
  const std::vector<double> w = {1, 1, 1, 1, 1, 16, 8, 4, 2, 1, 1};
  std::vector<double> logits;
  for (double x : w) logits.push_back(std::log(x));
  auto model = constant_logit_model(logits);
  struct Case {
    index_t top_k;
    double top_p;
    std::vector<double> want;  // unnormalized
  };
  const std::vector<Case> cases = {
      {3, 1.0, {0, 0, 0, 0, 0, 16, 8, 4, 0, 0, 0}},
      {0, 0.6, {0, 0, 0, 0, 0, 16, 8, 0, 0, 0, 0}},
      {2, 0.6, {0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0}},
      {0, 1e-9, {0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0}},
      {0, 1.0, w},
      {20, 1.0, w},
  };
  for (const Case& c : cases) {
    CAPTURE(c.top_k, c.top_p);
    SamplingConfig cfg;
    cfg.G = 4000;
    cfg.max_new_tokens = 1;
    cfg.top_k = c.top_k;
    cfg.top_p = c.top_p;
    cfg.seed = 7;
    const TokenBatch b = sample_responses(model, {{2, 5}}, cfg);
    const std::vector<double> f = first_token_freqs(b, 0, model.vocab_size());
    const double total = std::accumulate(c.want.begin(), c.want.end(), 0.0);
    for (std::size_t v = 0; v < c.want.size(); ++v) {
      CAPTURE(v, f[v]);
      const double p = c.want[v] / total;
      if (p == 0) {
        CHECK(f[v] == 0);  // filtered out: never sampled
      } else {
        CHECK(std::abs(f[v] - p) < 5 * std::sqrt(p * (1 - p) / double(cfg.G)) + 1e-12);
      }
    }
  }
}

TEST_CASE("sampling: bad top_k and top_p are usage errors", "[sampling][top_k][top_p]") {
  auto model = tiny_gpt2<double>(2);
  SamplingConfig cfg;
  cfg.top_k = -1;
  CHECK_THROWS_WITH(sample_responses(model, {{1}}, cfg), Contains("top_k = -1 must be >= 0"));
  cfg.top_k = 0;
  for (double p : {0.0, -0.5, 1.5, std::nan("")}) {
    cfg.top_p = p;
    CHECK_THROWS_WITH(sample_responses(model, {{1}}, cfg), Contains("must be in (0, 1]"));
  }
}

TEST_CASE("sampling: any of several stop tokens ends a response", "[sampling][end_token]") {
  // Tokens 6 and 7 have weight 1.5 each, the other nine 1: p(stop) = 3 / 12 = 1/4 per step.
  std::vector<double> logits(11, 0.0);
  logits[6] = logits[7] = std::log(1.5);
  auto model = constant_logit_model(logits);
  SamplingConfig cfg;
  cfg.G = 2000;
  cfg.max_new_tokens = 4;
  cfg.stop_tokens = {7, 6};
  cfg.seed = 5;
  const TokenBatch b = sample_responses(model, {{2, 5}}, cfg);
  std::vector<double> ended_by(11, 0.0);
  double length_one = 0;
  for (index_t g = 0; g < b.G; ++g) {
    const index_t L = b.gen_length(0, g);
    REQUIRE(L >= 1);
    for (index_t t = 2; t < 1 + L; ++t) {
      const auto tok = b.sequences[static_cast<std::size_t>(b.at(0, g, t))];
      REQUIRE((tok != 6 && tok != 7));
    }
    const auto last = b.sequences[static_cast<std::size_t>(b.at(0, g, 1 + L))];
    if (L < 4) REQUIRE((last == 6 || last == 7));
    if (L < 4) ended_by[static_cast<std::size_t>(last)] += 1;
    length_one += L == 1;
  }
  CHECK(ended_by[6] > 0);
  CHECK(ended_by[7] > 0);
  CHECK(std::abs(length_one / double(b.G) - 0.25) < 5 * std::sqrt(0.25 * 0.75 / double(b.G)));
}
