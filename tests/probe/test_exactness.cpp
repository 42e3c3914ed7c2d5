// The estimator against exact enumeration (docs/math.md, (a)):
// a LoRA LM with a vocabulary of 5 and fixed-length responses of 3 tokens has
// 125 responses, so expectations and the entropy are finite sums.
#include "../support/numeric.hpp"
#include "../support/tiny_models.hpp"

#include <entropy_probe/probe/probe.hpp>
#include <entropy_probe/sample/sampling.hpp>

#include <catch2/catch.hpp>

#include <cmath>

using namespace entropy_probe;
using namespace ep_test;

namespace {

constexpr index_t kVocab = 5, kLen = 3, kPrompt = 2;  // prompt token id 2

using Model = nn::Gpt2LMHeadModel<double>;

Model enumerable_model(std::uint64_t seed) {
  nn::Gpt2Config c = tiny_gpt2_config();
  c.vocab_size = kVocab;
  c.n_positions = 8;
  // Larger weights than GPT-2's init so the policy is far from uniform.
  Model m(c, tiny_lora(), seed);
  for (auto& b : m.blocks())
    for (auto* l : {&b.c_attn, &b.c_fc})
      for (index_t k = 0; k < l->lora_B->value.numel(); ++k) l->lora_B->value[k] *= 3;
  for (index_t k = 0; k < m.wte().value.numel(); ++k) m.wte().value[k] *= 20;
  return m;
}

// Every response y = (y1, y2, y3) after the one-token prompt, as G rows of a
// single-prompt batch.
TokenBatch all_responses() {
  TokenBatch b;
  b.B = 1;
  b.G = kVocab * kVocab * kVocab;
  b.T = 1 + kLen;
  for (index_t y = 0; y < b.G; ++y) {
    b.sequences.insert(b.sequences.end(),
                       {std::int32_t(kPrompt), std::int32_t(y / 25), std::int32_t(y / 5 % 5), std::int32_t(y % 5)});
  }
  b.attention_mask.assign(b.sequences.size(), 1);
  b.prompt_lens = {1};
  b.advantages.assign(static_cast<std::size_t>(b.G), 0.0);
  return b;
}

struct Exact {
  std::vector<double> S, p;
  double H = 0;
};

Exact exact_distribution(Model& m) {
  Exact e;
  e.S = sequence_logprobs(m, all_responses(), 1.0);
  double total = 0;
  for (double s : e.S) {
    e.p.push_back(std::exp(s));
    total += e.p.back();
    e.H -= e.p.back() * s;
  }
  REQUIRE(total == Approx(1.0).epsilon(1e-12));  // an autoregressive model normalises
  return e;
}

// grad H = -sum_y p_y (S_y + 1) grad S_y, from the tape.
ParamBuffer<double> exact_entropy_gradient(Model& m, const Registry<double>& reg) {
  const Exact e = exact_distribution(m);
  Tape<double> tape;
  Var S = record_sequence_logprobs(tape, m, all_responses(), 1.0);
  std::vector<double> w;
  for (std::size_t y = 0; y < e.S.size(); ++y) w.push_back(-e.p[y] * (e.S[y] + 1.0));
  reg.zero_grad();
  tape.backward(S, Tensor<double>::from_host({index_t(w.size())}, w));
  auto g = zeros_like_params<double>(reg);
  add_into_param_buffer(g, reg, 1.0);
  reg.zero_grad();
  return g;
}

}  // namespace

TEST_CASE("exactness: E[X_b] with G = 2 over all response pairs equals grad H / 3", "[probe][exact]") {
  Model m = enumerable_model(4);
  auto reg = Registry<double>::build(m);
  const Exact e = exact_distribution(m);
  auto gradH = exact_entropy_gradient(m, reg);
  scale_param_buffer(gradH, 1.0 / double(kLen));
  REQUIRE(norm_param_buffer(gradH) > 1e-3);  // the check is not vacuous
  INFO("H = " << e.H);
  REQUIRE(e.H > 0.5);
  REQUIRE(e.H < 0.9 * 3 * std::log(5.0));  // far from uniform

  // Every ordered pair (y1, y2) is one prompt with G = 2; its X_b is the
  // gradient of LX[b], so sum_b p(y1) p(y2) X_b is one backward pass seeded
  // with p_b times the X loss weights.
  const index_t n = kVocab * kVocab * kVocab;
  TokenBatch pairs;
  pairs.B = n * n;
  pairs.G = 2;
  pairs.T = 1 + kLen;
  const TokenBatch all = all_responses();
  std::vector<double> pb;
  for (index_t a = 0; a < n; ++a)
    for (index_t b = 0; b < n; ++b) {
      for (index_t y : {a, b})
        pairs.sequences.insert(pairs.sequences.end(), all.sequences.begin() + y * 4, all.sequences.begin() + y * 4 + 4);
      pairs.prompt_lens.push_back(1);
      pb.push_back(e.p[std::size_t(a)] * e.p[std::size_t(b)]);
    }
  pairs.attention_mask.assign(pairs.sequences.size(), 1);
  pairs.advantages.assign(static_cast<std::size_t>(pairs.rows()), 0.0);
  pairs.validate(kVocab, "pairs");

  Tape<double> tape;
  Var S = record_sequence_logprobs(tape, m, pairs, 1.0);
  std::vector<double> s = tape.value(S).to_host();
  std::vector<double> W = x_loss_weights(pairs, s, Weighting::dr_grpo);
  for (index_t b = 0; b < pairs.B; ++b)
    for (index_t g = 0; g < 2; ++g) W[std::size_t(b * 2 + g)] *= pb[std::size_t(b)];
  reg.zero_grad();
  tape.backward(S, Tensor<double>::from_host({index_t(W.size())}, W));
  auto EX = zeros_like_params<double>(reg);
  add_into_param_buffer(EX, reg, 1.0);
  reg.zero_grad();

  // Compare as whole vectors: |E[X] - grad H / 3| / |grad H / 3|.
  auto diff = EX;
  for (index_t i = 0; i < diff.size(); ++i)
    for (index_t k = 0; k < diff.entry(i)->numel(); ++k) (*diff.entry(i))[k] -= (*gradH.entry(i))[k];
  const double err = norm_param_buffer(diff) / norm_param_buffer(gradH);
  INFO("relative error " << err);
  CHECK(err < 1e-10);
}

TEST_CASE("exactness: mean of mu_X over sampled E batches is within 4 SE of grad H / 3", "[probe][exact]") {
  Model m = enumerable_model(4);
  auto reg = Registry<double>::build(m);
  auto gradH = exact_entropy_gradient(m, reg);
  scale_param_buffer(gradH, 1.0 / double(kLen));
  SingleProcess comm;
  ProbeComponents<Model> c(m, reg, ProbeSettings{.mb_size = 0}, comm);
  const std::vector<ParamBuffer<double>> dirs{random_direction(reg, 1), random_direction(reg, 2), gradH};
  const int batches = 150;
  const index_t B_E = 8;
  std::vector<std::vector<double>> proj(dirs.size());
  for (int k = 0; k < batches; ++k) {
    SamplingConfig sc;
    sc.G = 2;
    sc.max_new_tokens = kLen;  // fixed length: Lmax = 3 for every prompt
    sc.seed = 1000 + std::uint64_t(k);
    TokenBatch E = sample_responses(m, std::vector<std::vector<std::int32_t>>(B_E, {std::int32_t(kPrompt)}), sc);
    auto sum = c.accumulate_sum_X(E);
    scale_param_buffer(sum.sum, 1.0 / double(sum.count));
    for (std::size_t d = 0; d < dirs.size(); ++d) proj[d].push_back(dot_param_buffers(sum.sum, dirs[d]));
  }
  for (std::size_t d = 0; d < dirs.size(); ++d) {
    double mean = 0, ss = 0;
    for (double x : proj[d]) mean += x;
    mean /= batches;
    for (double x : proj[d]) ss += (x - mean) * (x - mean);
    const double se = std::sqrt(ss / (batches - 1) / batches);
    const double exact = dot_param_buffers(gradH, dirs[d]);
    INFO("direction " << d << ": mean " << mean << " exact " << exact << " SE " << se);
    CHECK(std::abs(mean - exact) < 4 * se);
    CHECK(se < 0.5 * std::abs(exact));  // the test has power: the effect is well resolved
  }
}

TEST_CASE("exactness: the first-order prediction's error is O(eta^2) over three decades", "[probe][exact]") {
  Model m = enumerable_model(6);
  auto reg = Registry<double>::build(m);
  auto gradH = exact_entropy_gradient(m, reg);
  const double H0 = exact_distribution(m).H;
  // mu_Y from a sampled U batch with random advantages, Adam-preconditioned.
  SamplingConfig sc;
  sc.G = 4;
  sc.max_new_tokens = kLen;
  sc.seed = 77;
  TokenBatch U = sample_responses(m, std::vector<std::vector<std::int32_t>>(6, {std::int32_t(kPrompt)}), sc);
  std::mt19937_64 rng(5);
  std::normal_distribution<double> nd(0, 1);
  for (auto& a : U.advantages) a = nd(rng);
  SingleProcess comm;
  ProbeComponents<Model> c(m, reg, ProbeSettings{}, comm);
  const auto sum_Y = c.accumulate_sum_Y(U);
  auto state = random_adam_state(reg, 3);
  AdamPreconditioner<double> P(state);
  const auto mu_Y = preconditioned_mean(sum_Y.sum, sum_Y.count, P);
  const double slope = dot_param_buffers(gradH, mu_Y) / double(kLen);  // (grad H / 3) . mu_Y
  REQUIRE(std::abs(slope) > 0);

  // Step sizes relative to |mu_Y| (preconditioning makes it large): the step
  // theta -> theta + eta mu_Y has norm 1e-3 down to 1e-6.
  const double base = 1e-3 / norm_param_buffer(mu_Y);
  std::vector<double> gaps;
  for (double eta : {base, base * 1e-1, base * 1e-2, base * 1e-3}) {
    ParameterSnapshot<double, CpuBackend> snap(reg);
    for (index_t i = 0; i < reg.size(); ++i) {
      auto& v = reg.entry(i).param->value;
      for (index_t k = 0; k < v.numel(); ++k) v[k] += eta * (*mu_Y.entry(i))[k];
    }
    const double H1 = exact_distribution(m).H;
    snap.restore();
    const double predicted = eta * slope, actual = (H1 - H0) / double(kLen);
    gaps.push_back(rel_to(actual, predicted));
    INFO("eta " << eta << " predicted " << predicted << " actual " << actual << " rel gap " << gaps.back());
    CHECK(gaps.back() < 0.5);
  }
  // Linear shrinkage of the relative gap: each decade of eta divides it by ~10.
  for (std::size_t k = 0; k + 1 < gaps.size(); ++k) {
    const double ratio = gaps[k] / gaps[k + 1];
    INFO("gap ratio between decades " << k << " and " << k + 1 << ": " << ratio);
    CHECK(ratio > 8.0);
    CHECK(ratio < 12.0);
  }
}

TEST_CASE("exactness: Rao-Blackwellised and sampled entropies have the same expectation, before and after a step",
          "[probe][exact][rao_blackwell]") {
  // Over all 125 responses y with p = exp(S): E_p[-S] = E_p[H_RB] = H at
  // theta, and E_p[w (-S1)] = E_p[w H1_RB] = H(theta+) with w = exp(S1 - S0)
  // (docs/math.md (k)). The temperature tempers every step's softmax, so the
  // tempered sequence distribution normalises as well.
  Model m = enumerable_model(4);
  auto reg = Registry<double>::build(m);
  const TokenBatch all = all_responses();
  const auto dir = random_direction(reg, 9);
  const double eta = 0.3 / norm_param_buffer(dir);
  for (double tau : {1.0, 1.3}) {
    CAPTURE(tau);
    const SequenceStatistics before = sequence_statistics(m, all, tau, /*entropy=*/true);
    SequenceStatistics after;
    {
      ParameterSnapshot<double, CpuBackend> snap(reg);
      for (index_t i = 0; i < reg.size(); ++i) {
        auto& v = reg.entry(i).param->value;
        for (index_t k = 0; k < v.numel(); ++k) v[k] += eta * (*dir.entry(i))[k];
      }
      after = sequence_statistics(m, all, tau, /*entropy=*/true);
      snap.restore();
    }
    REQUIRE(before.H.size() == before.S.size());
    double total0 = 0, total1 = 0, H0 = 0, H1 = 0, rb0 = 0, is_sampled1 = 0, is_rb1 = 0;
    double var_sampled = 0, var_rb = 0;
    for (std::size_t y = 0; y < before.S.size(); ++y) {
      const double p0 = std::exp(before.S[y]), p1 = std::exp(after.S[y]), w = std::exp(after.S[y] - before.S[y]);
      total0 += p0;
      total1 += p1;
      H0 -= p0 * before.S[y];  // the exact entropies, by definition
      H1 -= p1 * after.S[y];
      rb0 += p0 * before.H[y];
      is_sampled1 += p0 * w * -after.S[y];
      is_rb1 += p0 * w * after.H[y];
    }
    for (std::size_t y = 0; y < before.S.size(); ++y) {
      const double p0 = std::exp(before.S[y]);
      var_sampled += p0 * (before.S[y] + H0) * (before.S[y] + H0);
      var_rb += p0 * (before.H[y] - H0) * (before.H[y] - H0);
    }
    REQUIRE(total0 == Approx(1.0).epsilon(1e-12));
    REQUIRE(total1 == Approx(1.0).epsilon(1e-12));
    INFO("H0 " << H0 << " H1 " << H1 << " Var sampled " << var_sampled << " Var RB " << var_rb);
    REQUIRE(std::abs(H1 - H0) > 1e-2 * H0);  // the step moves the entropy
    REQUIRE(var_rb < 0.5 * var_sampled);     // the estimators differ per sequence
    CHECK(std::abs(rb0 - H0) < 1e-12 * H0);
    CHECK(std::abs(is_sampled1 - H1) < 1e-12 * H0);
    CHECK(std::abs(is_rb1 - H1) < 1e-12 * H0);
    CHECK(std::abs((is_rb1 - rb0) - (H1 - H0)) < 1e-12 * H0);
  }
}

namespace {

// Every response of `len` tokens after `prefix`, each its own prompt (G = 1),
// so one pass gives the per-response terms the enumerations combine.
TokenBatch responses_as_prompts(const std::vector<std::int32_t>& prefix, index_t len) {
  TokenBatch b;
  b.G = 1;
  b.T = static_cast<index_t>(prefix.size()) + len;
  b.B = 1;
  for (index_t k = 0; k < len; ++k) b.B *= kVocab;
  for (index_t y = 0; y < b.B; ++y) {
    b.sequences.insert(b.sequences.end(), prefix.begin(), prefix.end());
    b.sequences.resize(b.sequences.size() + static_cast<std::size_t>(len));
    index_t rest = y;  // the response's tokens are y's base-5 digits, most significant first
    for (std::size_t k = 1; k <= static_cast<std::size_t>(len); ++k, rest /= kVocab)
      b.sequences[b.sequences.size() - k] = std::int32_t(rest % kVocab);
    b.prompt_lens.push_back(std::int32_t(prefix.size()));
  }
  b.attention_mask.assign(b.sequences.size(), 1);
  b.advantages.assign(static_cast<std::size_t>(b.B), 0.0);
  b.validate(kVocab, "responses");
  return b;
}

// Per response y of responses_as_prompts: probability, s_y = X . v (G = 1:
// the X loss weight -S / L times Sdot) and the features of a one-response
// group, all through the library's pass and functions.
struct ResponseTerms {
  std::vector<double> p, s;
  SequenceTerms terms;
  ControlVariateFeatures features;  // per response (G = 1)
};

ResponseTerms response_terms(Model& m, const Registry<double>& reg, const TokenBatch& all,
                             const ParamBuffer<double>& v) {
  SingleProcess comm;
  ProbeComponents<Model> c(m, reg, ProbeSettings{.mb_size = 0}, comm);
  const auto st = c.sequence_tangents(all, v, "enumeration", /*entropy=*/true);
  ResponseTerms r;
  const std::vector<double> W = x_loss_weights(all, st.S, Weighting::dr_grpo);
  r.terms = {all.B, 1, st.S, st.H, st.Sdot, {}};
  double total = 0;
  for (index_t y = 0; y < all.B; ++y) {
    r.p.push_back(std::exp(st.S[std::size_t(y)]));
    total += r.p.back();
    r.s.push_back(W[std::size_t(y)] * st.Sdot[std::size_t(y)]);
    r.terms.L.push_back(double(all.gen_length(y, 0)));
  }
  REQUIRE(total == Approx(1.0).epsilon(1e-12));
  r.features = control_variate_features(r.terms);
  return r;
}

// E[mean_b s_cv_b] over every batch of `n` i.i.d. prompts drawn from the
// responses, by enumerating multisets (the estimate is symmetric in the
// prompts) weighted by their probability; `columns` picks the features. Also
// E of the in-sample version (beta fitted on all prompts, the one reported),
// which is biased: the contrast shows the enumeration can see a bias.
struct EnumeratedMeans {
  double cross_fitted = 0, in_sample = 0, plain = 0, var_plain = 0, var_cv = 0;
};

EnumeratedMeans enumerate_batches(const ResponseTerms& r, index_t n, const std::vector<index_t>& columns) {
  const auto N = static_cast<index_t>(r.p.size());
  ControlVariateFeatures f;
  for (index_t k : columns) f.names.push_back(r.features.names[std::size_t(k)]);
  f.prompts = n;
  const auto K = static_cast<index_t>(columns.size());
  f.Z.assign(static_cast<std::size_t>(n * K), 0.0);
  std::vector<index_t> pick(static_cast<std::size_t>(n), 0);
  std::vector<double> s(static_cast<std::size_t>(n));
  std::vector<double> factorial{1};
  for (index_t k = 1; k <= n; ++k) factorial.push_back(factorial.back() * double(k));
  EnumeratedMeans e;
  while (true) {
    double w = factorial[std::size_t(n)];  // distinct orderings of the multiset, times its probability
    index_t run = 1;
    for (index_t b = 0; b < n; ++b) {
      const index_t y = pick[std::size_t(b)];
      w *= r.p[std::size_t(y)];
      s[std::size_t(b)] = r.s[std::size_t(y)];
      for (index_t k = 0; k < K; ++k) f.Z[std::size_t(b * K + k)] = r.features.at(y, columns[std::size_t(k)]);
      if (b > 0 && y == pick[std::size_t(b - 1)]) {
        ++run;
      } else {
        run = 1;
      }
      w /= double(run);
    }
    const auto cv = control_variate_estimate(s, f, 1.0);
    if (!cv) FAIL("no control-variate estimate for a batch of " << n << " prompts and " << K << " features");
    double in_sample = 0;
    for (index_t b = 0; b < n; ++b) {
      double c = s[std::size_t(b)];
      for (index_t k = 0; k < K; ++k) c -= cv->beta[std::size_t(k)] * f.at(b, k);
      in_sample += c / double(n);
    }
    e.cross_fitted += w * cv->deltaH1;
    e.in_sample += w * in_sample;
    e.plain += w * cv->deltaH1_plain;
    e.var_plain += w * cv->SE_plain * cv->SE_plain;
    e.var_cv += w * cv->SE * cv->SE;
    // Next multiset: nondecreasing picks.
    index_t b = n - 1;
    while (b >= 0 && pick[std::size_t(b)] == N - 1) --b;
    if (b < 0) break;
    ++pick[std::size_t(b)];
    for (index_t j = b + 1; j < n; ++j) pick[std::size_t(j)] = pick[std::size_t(b)];
  }
  return e;
}

}  // namespace

TEST_CASE("exactness: control variates have mean zero and keep the estimate unbiased, by enumeration",
          "[probe][exact][control_variates]") {
  // docs/math.md (m). All 125 responses after the prompt (2), and all 25
  // after the prompt (2, 0) (the same model, a second prompt with fewer
  // responses, so that batches of four are enumerable).
  Model m = enumerable_model(4);
  auto reg = Registry<double>::build(m);
  const auto v = random_direction(reg, 12);
  const ResponseTerms r3 = response_terms(m, reg, responses_as_prompts({kPrompt}, kLen), v);
  REQUIRE(r3.features.names == std::vector<std::string>{"score", "surprisal_minus_entropy"});

  // E[s] = (grad H / 3) . v exactly (G = 1: X = -(S / 3) grad S).
  auto gradH = exact_entropy_gradient(m, reg);
  const double exact = dot_param_buffers(gradH, v) / double(kLen);
  double Es = 0;
  for (std::size_t y = 0; y < r3.p.size(); ++y) Es += r3.p[y] * r3.s[y];
  REQUIRE(std::abs(exact) > 1e-3);
  CHECK(rel_to(Es, exact) < 1e-10);

  SECTION("every feature has expectation zero, the leave-one-out ones over all G = 2 pairs") {
    // G = 1: score and surprisal_minus_entropy, over the 125 responses.
    for (index_t k = 0; k < r3.features.count(); ++k) {
      double mean = 0, scale = 0;
      for (std::size_t y = 0; y < r3.p.size(); ++y) {
        mean += r3.p[y] * r3.features.at(index_t(y), k);
        scale += r3.p[y] * std::abs(r3.features.at(index_t(y), k));
      }
      INFO(r3.features.names[std::size_t(k)] << ": E = " << mean << ", E|z| = " << scale);
      REQUIRE(scale > 1e-2);
      CHECK(std::abs(mean) < 1e-12 * scale);
    }
    // G = 2: every ordered pair (y1, y2) as one group.
    const auto n = static_cast<index_t>(r3.p.size());
    std::vector<double> mean, scale;
    std::vector<std::string> names;
    for (index_t a = 0; a < n; ++a)
      for (index_t b = 0; b < n; ++b) {
        SequenceTerms t{1, 2, {}, {}, {}, {}};
        for (index_t y : {a, b}) {
          t.S.push_back(r3.terms.S[std::size_t(y)]);
          t.RB.push_back(r3.terms.RB[std::size_t(y)]);
          t.Sdot.push_back(r3.terms.Sdot[std::size_t(y)]);
          t.L.push_back(r3.terms.L[std::size_t(y)]);
        }
        const ControlVariateFeatures f = control_variate_features(t);
        if (names.empty()) {
          names = f.names;
          mean.assign(names.size(), 0.0);
          scale.assign(names.size(), 0.0);
        }
        const double w = r3.p[std::size_t(a)] * r3.p[std::size_t(b)];
        for (index_t k = 0; k < f.count(); ++k) {
          mean[std::size_t(k)] += w * f.at(0, k);
          scale[std::size_t(k)] += w * std::abs(f.at(0, k));
        }
      }
    REQUIRE(names == std::vector<std::string>{"score", "score_x_loo_length", "score_x_loo_surprisal_per_token",
                                              "score_x_loo_entropy_per_token", "surprisal_minus_entropy"});
    for (std::size_t k = 0; k < names.size(); ++k) {
      INFO(names[k] << ": E = " << mean[k] << ", E|Z| = " << scale[k]);
      REQUIRE(scale[k] > 1e-2);
      CHECK(std::abs(mean[k]) < 1e-12 * scale[k]);
    }
  }

  SECTION("the cross-fitted estimate is unbiased over all batches of three prompts, one feature each") {
    for (index_t k = 0; k < r3.features.count(); ++k) {
      const EnumeratedMeans e = enumerate_batches(r3, 3, {k});
      INFO(r3.features.names[std::size_t(k)] << ": E[deltaH1_cv] = " << e.cross_fitted << ", E[plain] = " << e.plain
                                             << ", in-sample " << e.in_sample << ", exact " << exact);
      CHECK(rel_to(e.plain, exact) < 1e-10);
      CHECK(rel_to(e.cross_fitted, exact) < 1e-10);
      CHECK(rel_to(e.in_sample, exact) > 1e-4);  // fitting on the prompt itself is biased: the check has power
    }
  }

  SECTION("both features over all batches of four prompts after the prompt (2, 0)") {
    const ResponseTerms r2 = response_terms(m, reg, responses_as_prompts({kPrompt, 0}, 2), v);
    double Es2 = 0;
    for (std::size_t y = 0; y < r2.p.size(); ++y) Es2 += r2.p[y] * r2.s[y];
    REQUIRE(std::abs(Es2) > 1e-4);
    const EnumeratedMeans e = enumerate_batches(r2, 4, {0, 1});
    INFO("E[s] = " << Es2 << ", E[deltaH1_cv] = " << e.cross_fitted << ", in-sample " << e.in_sample
                   << ", E[SE_plain^2] = " << e.var_plain << ", E[SE_cv^2] = " << e.var_cv);
    CHECK(rel_to(e.plain, Es2) < 1e-10);
    CHECK(rel_to(e.cross_fitted, Es2) < 1e-10);
    CHECK(rel_to(e.in_sample, Es2) > 1e-4);
  }
}
