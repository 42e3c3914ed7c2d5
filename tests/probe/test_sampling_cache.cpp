// The KV-cached sampler (CachedCausalLM): every step's next-token logits
// against a full forward over the same prefix, for GPT-2 and each decoder
// family; the same batches as the uncached sampler; a chi-square test of
// sampled token pairs against exact probabilities; the window refusals.
#include "../support/tiny_models.hpp"

#include <entropy_probe/nn/families.hpp>
#include <entropy_probe/sample/sampling.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <vector>

using namespace entropy_probe;
using namespace ep_test;
using Catch::Contains;

namespace {

// The model seen only through forward(): sample_responses then re-runs the
// full forward over the prefix for every token (the uncached path).
template <class M>
struct FullForwardOnly {
  using scalar_type = typename M::scalar_type;
  using backend_type = typename M::backend_type;
  M& m;
  void named_parameters(const ParameterVisitor<scalar_type, backend_type>& v) { m.named_parameters(v); }
  Var forward(Tape<scalar_type, backend_type>& tape, const SequenceInput& in) { return m.forward(tape, in); }
  index_t vocab_size() const { return m.vocab_size(); }
};
static_assert(CachedCausalLM<nn::Gpt2LMHeadModel<double>>);
static_assert(CachedCausalLM<nn::DecoderForCausalLM<double>>);
static_assert(!CachedCausalLM<FullForwardOnly<nn::Gpt2LMHeadModel<double>>>);

// A tiny decoder of a family, with what makes it differ from the others
// switched on: biases, GQA (4 query heads over 2 KV heads), an explicit
// head_dim for Qwen3, a sliding window longer than the sequences for Mistral,
// llama3 rope scaling for Llama.
nn::DecoderForCausalLM<double> tiny_decoder(const nn::DecoderFamily& f, std::uint64_t seed) {
  nn::DecoderConfig c = f.defaults();
  c.vocab_size = 13;
  c.hidden_size = 16;
  c.intermediate_size = 20;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim_override = f.qk_norm ? 6 : 0;
  c.max_position_embeddings = 64;
  c.attention_bias = true;
  c.mlp_bias = true;
  if (f.sliding == nn::DecoderFamily::SlidingWindow::all_layers) {
    c.sliding_window = 32;
    c.sliding_layers = {0, 1};
  }
  if (f.sliding == nn::DecoderFamily::SlidingWindow::none) {
    c.rope_scaling.type = RopeParameters::Type::llama3;
    c.rope_scaling.factor = 8.0;
    c.rope_scaling.original_max_position_embeddings = 8;
  }
  nn::LoraConfig lora;
  lora.r = 2;
  lora.lora_alpha = 4;
  lora.target_modules = {"q_proj", "v_proj", "down_proj"};
  lora.init_lora_b_zero = false;
  nn::DecoderForCausalLM<double> m(c, lora, seed);
  // Scaled-up embeddings: next-token distributions far from uniform.
  for (index_t k = 0; k < m.embed_tokens().value.numel(); ++k) m.embed_tokens().value[k] *= 20.0;
  return m;
}

std::vector<double> log_softmax(const double* z, index_t V) {
  double mx = -std::numeric_limits<double>::infinity(), total = 0;
  for (index_t v = 0; v < V; ++v) mx = std::max(mx, z[v]);
  for (index_t v = 0; v < V; ++v) total += std::exp(z[v] - mx);
  std::vector<double> out(static_cast<std::size_t>(V));
  for (index_t v = 0; v < V; ++v) out[static_cast<std::size_t>(v)] = z[v] - mx - std::log(total);
  return out;
}

// Samples with an observer that compares each step's cached log-probs, for
// every row still generating, with a full forward over the batch so far.
// Returns the largest difference and counts the compared rows.
template <class M>
double cached_vs_full(M& model, const std::vector<std::vector<std::int32_t>>& prompts, const SamplingConfig& cfg,
                      index_t& compared, TokenBatch* out = nullptr) {
  const index_t V = model.vocab_size();
  double worst = 0;
  compared = 0;
  auto observe = [&](index_t step, const TokenBatch& b, std::span<const double> z) {
    index_t max_prompt = 0;
    for (std::int32_t p : b.prompt_lens) max_prompt = std::max<index_t>(max_prompt, p);
    SequenceInput in;
    in.rows = b.rows();
    in.length = max_prompt + step;
    for (index_t r = 0; r < in.rows; ++r)
      for (index_t t = 0; t < in.length; ++t) {
        in.tokens.push_back(b.sequences[static_cast<std::size_t>(r * b.T + t)]);
        in.key_mask.push_back(b.attention_mask[static_cast<std::size_t>(r * b.T + t)]);
        in.positions.push_back(static_cast<std::int32_t>(t));
      }
    Tape<typename M::scalar_type, typename M::backend_type> tape;
    const auto logits = tape.value(model.forward(tape, in)).to_host();
    const std::vector<double> full(logits.begin(), logits.end());
    for (index_t r = 0; r < in.rows; ++r) {
      const index_t pos = b.prompt_lens[static_cast<std::size_t>(r / b.G)] + step;
      if (!b.attention_mask[static_cast<std::size_t>(r * b.T + pos - 1)]) continue;  // stopped
      const std::vector<double> want = log_softmax(full.data() + (r * in.length + pos - 1) * V, V);
      const std::vector<double> got = log_softmax(z.data() + r * V, V);
      for (index_t v = 0; v < V; ++v)
        worst = std::max(worst, std::abs(got[static_cast<std::size_t>(v)] - want[static_cast<std::size_t>(v)]));
      ++compared;
    }
  };
  TokenBatch b = sample_responses(model, prompts, cfg, observe);
  if (out) *out = std::move(b);
  return worst;
}

const std::vector<std::vector<std::int32_t>> kPrompts = {{3, 1, 4, 1, 5}, {9}, {2, 6, 5}};

SamplingConfig step_config() {
  SamplingConfig cfg;
  cfg.G = 2;
  cfg.max_new_tokens = 7;
  cfg.seed = 5;
  return cfg;
}

}  // namespace

TEST_CASE("cached sampling: each step's log-probs equal a full forward's (GPT-2)", "[sampling][cache]") {
  auto model = tiny_gpt2<double>(7);
  index_t compared = 0;
  TokenBatch b;
  const double worst = cached_vs_full(model, kPrompts, step_config(), compared, &b);
  CAPTURE(worst);
  CHECK(compared == 3 * 2 * 7);
  CHECK(worst < 1e-12);
  // Identical to the uncached sampler's batch, token for token.
  FullForwardOnly<nn::Gpt2LMHeadModel<double>> full{model};
  const TokenBatch u = sample_responses(full, kPrompts, step_config());
  CHECK(b.sequences == u.sequences);
  CHECK(b.attention_mask == u.attention_mask);
}

TEST_CASE("cached sampling: each step's log-probs equal a full forward's (decoder families)", "[sampling][cache]") {
  for (const nn::DecoderFamily* f : nn::kDecoderFamilies) {
    CAPTURE(f->model_type);
    auto model = tiny_decoder(*f, 11);
    SamplingConfig cfg = step_config();
    cfg.stop_tokens = {4, 8};  // some rows stop early: padding after the stop token, the rest go on
    index_t compared = 0;
    TokenBatch b;
    const double worst = cached_vs_full(model, kPrompts, cfg, compared, &b);
    CAPTURE(worst, compared);
    CHECK(compared > 3 * 2);
    CHECK(worst < 1e-12);
    CHECK_NOTHROW(b.validate(model.vocab_size(), "sampled"));
    FullForwardOnly<nn::DecoderForCausalLM<double>> full{model};
    const TokenBatch u = sample_responses(full, kPrompts, cfg);
    CHECK(b.sequences == u.sequences);
    CHECK(b.attention_mask == u.attention_mask);
    // Reproducible from the seed; another seed draws other tokens.
    CHECK(sample_responses(model, kPrompts, cfg).sequences == b.sequences);
    cfg.seed = 6;
    CHECK(sample_responses(model, kPrompts, cfg).sequences != b.sequences);
  }
}

TEST_CASE("cached sampling in float: decode steps through the skinny product; the batch does not depend on threads",
          "[sampling][cache][float]") {
  // Wide enough that lm_head and the MLP's products of a decode step (6 rows)
  // take CpuBackend::gemm's skinny product (over 65536 weights).
  nn::DecoderConfig c = nn::kQwen2Family.defaults();
  c.vocab_size = 1100;
  c.hidden_size = 64;
  c.intermediate_size = 1024;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.max_position_embeddings = 64;
  nn::LoraConfig lora;
  lora.r = 4;
  lora.lora_alpha = 8;
  lora.target_modules = {"q_proj", "v_proj", "gate_proj", "down_proj"};
  lora.init_lora_b_zero = false;
  nn::DecoderForCausalLM<float> model(c, lora, 21);
  for (index_t k = 0; k < model.embed_tokens().value.numel(); ++k) model.embed_tokens().value[k] *= 20.0f;
  INFO("skinny product body: " << int(simd::skinny_gemm_isa()) << " (0: none, the BLAS)");
  index_t compared = 0;
  TokenBatch b;
  const double worst = cached_vs_full(model, kPrompts, step_config(), compared, &b);
  CAPTURE(worst);
  CHECK(compared == 3 * 2 * 7);
  // Float log-probs of a width-64 model: the two paths sum in other orders
  // (the full forward's products go to the BLAS), a few float ulps of the logits.
  CHECK(worst < 1e-5);
  // Rows are drawn in parallel and the products split across threads: one
  // thread, the same batch (the logits agree to rounding, far from any draw's cut).
  const int saved = CpuBackend::num_threads();
  CpuBackend::set_num_threads(1);
  const TokenBatch one = sample_responses(model, kPrompts, step_config());
  CpuBackend::set_num_threads(saved);
  CHECK(one.sequences == b.sequences);
  CHECK(one.attention_mask == b.attention_mask);
}

TEST_CASE("cached sampling: stopped rows end with the stop token, then padding", "[sampling][cache][end_token]") {
  auto model = tiny_decoder(nn::kQwen2Family, 3);
  SamplingConfig cfg;
  cfg.G = 40;
  cfg.max_new_tokens = 6;
  cfg.stop_tokens = {1, 2, 3};
  cfg.seed = 8;
  const TokenBatch b = sample_responses(model, kPrompts, cfg);
  index_t stopped = 0;
  for (index_t p = 0; p < b.B; ++p)
    for (index_t g = 0; g < b.G; ++g) {
      CAPTURE(p, g);
      const index_t plen = b.prompt_lens[static_cast<std::size_t>(p)], L = b.gen_length(p, g);
      REQUIRE(L >= 1);
      for (index_t t = plen; t < plen + L - 1; ++t) {
        const std::int32_t x = b.sequences[static_cast<std::size_t>(b.at(p, g, t))];
        CHECK((x != 1 && x != 2 && x != 3));
      }
      const std::int32_t last = b.sequences[static_cast<std::size_t>(b.at(p, g, plen + L - 1))];
      if (L < 6) {
        CHECK((last == 1 || last == 2 || last == 3));
        ++stopped;
      }
      for (index_t t = plen + L; t < b.T; ++t) {
        CHECK(b.attention_mask[static_cast<std::size_t>(b.at(p, g, t))] == 0);
        CHECK(b.sequences[static_cast<std::size_t>(b.at(p, g, t))] == 0);
      }
    }
  CHECK(stopped > 0);
  CHECK(stopped < b.rows());
}

TEST_CASE("cached sampling: sampled token pairs pass a chi-square test against exact probabilities",
          "[sampling][cache][distribution]") {
  // Vocabulary 5: the (first, second) response token pairs have 25 cells.
  nn::Gpt2Config c = tiny_gpt2_config();
  c.vocab_size = 5;
  c.n_positions = 8;
  nn::Gpt2LMHeadModel<double> model(c, std::nullopt, 21);
  for (index_t k = 0; k < model.wte().value.numel(); ++k) model.wte().value[k] *= 6.0;
  const std::vector<std::int32_t> prompt = {3, 1};
  SamplingConfig cfg;
  cfg.G = 20000;
  cfg.max_new_tokens = 2;
  cfg.seed = 77;
  const TokenBatch b = sample_responses(model, {prompt}, cfg);
  const index_t V = 5;
  // Exact p(a) p(b | a) from full forwards over the prefixes, at temperature tau.
  auto pair_probs = [&](double tau) {
    std::vector<double> p(25);
    SequenceInput in;
    in.rows = V;
    in.length = 3;
    for (index_t a = 0; a < V; ++a)
      for (std::int32_t x : {prompt[0], prompt[1], static_cast<std::int32_t>(a)}) {
        in.tokens.push_back(x);
        in.key_mask.push_back(1);
        in.positions.push_back(static_cast<std::int32_t>(in.positions.size() % 3));
      }
    Tape<double> tape;
    const std::vector<double> z = tape.value(model.forward(tape, in)).to_host();
    std::vector<double> scaled(static_cast<std::size_t>(V));
    for (index_t a = 0; a < V; ++a) {
      for (index_t v = 0; v < V; ++v)
        scaled[static_cast<std::size_t>(v)] = z[static_cast<std::size_t>(1 * V + v)] / tau;
      const double first = std::exp(log_softmax(scaled.data(), V)[static_cast<std::size_t>(a)]);
      for (index_t v = 0; v < V; ++v)
        scaled[static_cast<std::size_t>(v)] = z[static_cast<std::size_t>((a * 3 + 2) * V + v)] / tau;
      const std::vector<double> second = log_softmax(scaled.data(), V);
      for (index_t s = 0; s < V; ++s)
        p[static_cast<std::size_t>(a * V + s)] = first * std::exp(second[static_cast<std::size_t>(s)]);
    }
    return p;
  };
  std::vector<double> count(25, 0.0);
  for (index_t g = 0; g < b.G; ++g)
    count[static_cast<std::size_t>(b.sequences[static_cast<std::size_t>(b.at(0, g, 2))] * V +
                                   b.sequences[static_cast<std::size_t>(b.at(0, g, 3))])] += 1;
  // Cells expected below 5 are pooled into one; the statistic's degrees of freedom are cells - 1.
  auto chi_square = [&](const std::vector<double>& p, index_t& dof) {
    double stat = 0, pooled_e = 0, pooled_o = 0;
    index_t cells = 0;
    for (std::size_t i = 0; i < 25; ++i) {
      const double e = p[i] * double(b.G);
      if (e < 5) {
        pooled_e += e;
        pooled_o += count[i];
        continue;
      }
      stat += (count[i] - e) * (count[i] - e) / e;
      ++cells;
    }
    if (pooled_e > 0) {
      stat += (pooled_o - pooled_e) * (pooled_o - pooled_e) / pooled_e;
      ++cells;
    }
    dof = cells - 1;
    return stat;
  };
  index_t dof = 0;
  const double stat = chi_square(pair_probs(1.0), dof);
  // The 0.999 quantile of chi-square(k), Wilson-Hilferty: k (1 - 2/(9k) + 3.09 sqrt(2/(9k)))^3.
  auto critical = [](index_t k) {
    const double x = 2.0 / (9.0 * double(k));
    return double(k) * std::pow(1 - x + 3.090232 * std::sqrt(x), 3);
  };
  CAPTURE(stat, dof, critical(dof));
  REQUIRE(dof >= 8);
  CHECK(stat < critical(dof));
  // The test can fail: against the temperature-1.3 probabilities the same counts are far off.
  index_t dof_other = 0;
  const double other = chi_square(pair_probs(1.3), dof_other);
  CAPTURE(other, dof_other);
  CHECK(other > 3 * critical(dof_other));
}

TEST_CASE("cached sampling: refuses what the full forward refuses", "[sampling][cache]") {
  SECTION("a sliding window shorter than the sequence") {
    nn::DecoderConfig c = nn::kMistralFamily.defaults();
    c.vocab_size = 13;
    c.hidden_size = 8;
    c.intermediate_size = 12;
    c.num_hidden_layers = 1;
    c.num_attention_heads = 2;
    c.num_key_value_heads = 1;
    c.sliding_window = 6;
    c.sliding_layers = {0};
    nn::DecoderForCausalLM<double> model(c, std::nullopt, 1);
    SamplingConfig cfg;
    cfg.G = 1;
    cfg.max_new_tokens = 2;
    CHECK_NOTHROW(sample_responses(model, {{1, 2, 3, 4, 5}}, cfg));  // last fed position 5: within the window
    cfg.max_new_tokens = 3;
    CHECK_THROWS_AS(sample_responses(model, {{1, 2, 3, 4, 5}}, cfg), InputError);
    CHECK_THROWS_WITH(sample_responses(model, {{1, 2, 3, 4, 5}}, cfg), Contains("sliding_window 6"));
  }
  SECTION("GPT-2 positions past n_positions") {
    auto model = tiny_gpt2<double>(1);  // n_positions 16
    SamplingConfig cfg;
    cfg.G = 1;
    cfg.max_new_tokens = 12;
    CHECK_NOTHROW(sample_responses(model, {{1, 2, 3, 4, 5}}, cfg));
    cfg.max_new_tokens = 13;
    CHECK_THROWS_AS(sample_responses(model, {{1, 2, 3, 4, 5}}, cfg), InputError);
    CHECK_THROWS_WITH(sample_responses(model, {{1, 2, 3, 4, 5}}, cfg), Contains("n_positions 16"));
  }
}
