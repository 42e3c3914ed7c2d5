// Control variates of the first-order estimate (docs/math.md (m)): the
// per-sequence decomposition, the features against a direct double
// computation, the cross-fitted least squares against normal equations, and
// the refusals. Unbiasedness by exact enumeration is in test_exactness.cpp.
#include "../support/log_capture.hpp"
#include "../support/numeric.hpp"
#include "../support/tiny_models.hpp"

#include <entropy_probe/probe/probe.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <random>

using namespace entropy_probe;
using namespace ep_test;
using Catch::Matchers::Contains;

namespace {

using Model = nn::Gpt2LMHeadModel<double>;

// Solves the normal equations (X^T X) (c, beta) = X^T s with X = [1, Z] over
// `rows` by Gaussian elimination with partial pivoting, and returns beta
// without the intercept c: the independent reference of the centred fit
// (full-rank features only).
std::vector<double> normal_equations(std::span<const double> s, const ControlVariateFeatures& f,
                                     const std::vector<index_t>& rows) {
  const auto K = static_cast<std::size_t>(f.count()) + 1;  // the intercept first
  auto x = [&](index_t b, std::size_t i) { return i == 0 ? 1.0 : f.at(b, index_t(i - 1)); };
  std::vector<std::vector<double>> a(K, std::vector<double>(K + 1, 0.0));
  for (index_t b : rows)
    for (std::size_t i = 0; i < K; ++i) {
      for (std::size_t j = 0; j < K; ++j) a[i][j] += x(b, i) * x(b, j);
      a[i][K] += x(b, i) * s[std::size_t(b)];
    }
  for (std::size_t c = 0; c < K; ++c) {
    std::size_t piv = c;
    for (std::size_t r = c + 1; r < K; ++r)
      if (std::abs(a[r][c]) > std::abs(a[piv][c])) piv = r;
    std::swap(a[c], a[piv]);
    for (std::size_t r = c + 1; r < K; ++r) {
      const double m = a[r][c] / a[c][c];
      for (std::size_t j = c; j <= K; ++j) a[r][j] -= m * a[c][j];
    }
  }
  std::vector<double> beta(K);
  for (std::size_t c = K; c-- > 0;) {
    double acc = a[c][K];
    for (std::size_t j = c + 1; j < K; ++j) acc -= a[c][j] * beta[j];
    beta[c] = acc / a[c][c];
  }
  return {beta.begin() + 1, beta.end()};
}

ControlVariateFeatures random_features(index_t B, index_t K, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0, 1);
  ControlVariateFeatures f;
  for (index_t k = 0; k < K; ++k) f.names.push_back("f" + std::to_string(k));
  f.prompts = B;
  for (index_t i = 0; i < B * K; ++i) f.Z.push_back(nd(rng));
  return f;
}

}  // namespace

TEST_CASE("control variates: the cross-fitted least squares against normal equations, and the drop rule",
          "[probe][control_variates]") {
  const index_t B = 9, K = 3;
  const ControlVariateFeatures f = random_features(B, K, 1);
  std::mt19937_64 rng(2);
  std::normal_distribution<double> nd(0, 1);
  std::vector<double> s;
  for (index_t b = 0; b < B; ++b) s.push_back(1.0 + 0.7 * f.at(b, 0) - 0.3 * f.at(b, 2) + 0.1 * nd(rng));

  const auto cv = control_variate_estimate(s, f, 0.5);
  REQUIRE(cv);
  CHECK(cv->features == f.names);
  std::vector<index_t> all;
  for (index_t b = 0; b < B; ++b) all.push_back(b);
  const std::vector<double> beta_all = normal_equations(s, f, all);
  for (index_t k = 0; k < K; ++k) CHECK(rel_to(cv->beta[std::size_t(k)], beta_all[std::size_t(k)]) < 1e-10);
  std::vector<double> s_cv;
  for (index_t b = 0; b < B; ++b) {
    std::vector<index_t> others;
    for (index_t o = 0; o < B; ++o)
      if (o != b) others.push_back(o);
    const std::vector<double> beta = normal_equations(s, f, others);
    double c = s[std::size_t(b)];
    for (index_t k = 0; k < K; ++k) c -= beta[std::size_t(k)] * f.at(b, k);
    s_cv.push_back(c);
    CHECK(rel_to(cv->s_cv[std::size_t(b)], c) < 1e-10);
  }
  // Means and standard errors by hand, eta = 0.5.
  auto mean_se = [](const std::vector<double>& x) {
    double m = 0, ss = 0;
    for (double v : x) m += v / double(x.size());
    for (double v : x) ss += (v - m) * (v - m);
    return std::pair{0.5 * m, 0.5 * std::sqrt(ss / double(x.size() - 1) / double(x.size()))};
  };
  const auto [plain, se_plain] = mean_se(s);
  const auto [mean_cv, se_cv] = mean_se(s_cv);
  CHECK(rel_to(cv->deltaH1_plain, plain) < 1e-12);
  CHECK(rel_to(cv->SE_plain, se_plain) < 1e-12);
  CHECK(rel_to(cv->deltaH1, mean_cv) < 1e-10);
  CHECK(rel_to(cv->SE, se_cv) < 1e-9);
  CHECK(cv->SE < 0.5 * cv->SE_plain);  // s is mostly explained by the features here

  // The fit is centred: shifting every s_b by a constant shifts s_cv alike and leaves beta.
  std::vector<double> shifted = s;
  for (double& x : shifted) x += 100.0;
  const auto cs = control_variate_estimate(shifted, f, 0.5);
  REQUIRE(cs);
  for (index_t k = 0; k < K; ++k) CHECK(rel_to(cs->beta[std::size_t(k)], cv->beta[std::size_t(k)]) < 1e-10);
  for (index_t b = 0; b < B; ++b) CHECK(std::abs(cs->s_cv[std::size_t(b)] - 100.0 - cv->s_cv[std::size_t(b)]) < 1e-10);
  CHECK(rel_to(cs->SE, cv->SE) < 1e-8);

  SECTION("a feature that repeats an earlier one up to a factor and a shift, or is constant, gets coefficient 0") {
    ControlVariateFeatures g;
    g.names = {"f0", "twice_f0_plus_1", "constant", "f1", "f2"};
    g.prompts = B;
    for (index_t b = 0; b < B; ++b)
      for (double z : {f.at(b, 0), 2 * f.at(b, 0) + 1, 3.0, f.at(b, 1), f.at(b, 2)}) g.Z.push_back(z);
    const auto cg = control_variate_estimate(s, g, 0.5);
    REQUIRE(cg);
    CHECK(cg->beta[1] == 0.0);
    CHECK(cg->beta[2] == 0.0);
    const std::size_t kept[] = {0, 3, 4};
    for (std::size_t k = 0; k < 3; ++k) CHECK(rel_to(cg->beta[kept[k]], cv->beta[k]) < 1e-10);
    for (index_t b = 0; b < B; ++b) CHECK(rel_to(cg->s_cv[std::size_t(b)], cv->s_cv[std::size_t(b)]) < 1e-10);
  }
}

TEST_CASE("control variates: too few prompts, mismatched sizes and non-finite values", "[probe][control_variates]") {
  const ControlVariateFeatures f = random_features(4, 3, 3);  // 3 features need 5 prompts
  const std::vector<double> s{1, 2, 3, 4};
  {
    WarningCapture log;
    CHECK_FALSE(control_variate_estimate(s, f, 1.0));
    REQUIRE(log.warnings.size() == 1);
    CHECK_THAT(log.warnings[0], Contains("B_E = 4 prompts for 3 features") && Contains("at least 5"));
  }
  CHECK_THROWS_AS(control_variate_estimate(std::vector<double>{1, 2, 3}, f, 1.0), UsageError);
  CHECK_THROWS_WITH(control_variate_estimate(std::vector<double>{1, 2, 3}, f, 1.0),
                    Contains("3 values s_b, 12 feature values for 4 prompts x 3 features"));
  CHECK_THROWS_WITH(control_variate_estimate(s, f, 0.0), Contains("eta = 0"));
  ControlVariateFeatures bad = f;
  bad.Z[7] = std::numeric_limits<double>::quiet_NaN();  // prompt 2, feature f1
  CHECK_THROWS_AS(control_variate_estimate(s, bad, 1.0), InputError);
  CHECK_THROWS_WITH(control_variate_estimate(s, bad, 1.0), Contains("feature f1 of prompt 2 is nan"));
  CHECK_THROWS_WITH(
      control_variate_estimate(std::vector<double>{1, 2, std::numeric_limits<double>::infinity(), 4}, f, 1.0),
      Contains("s_2 = inf"));
  CHECK_THROWS_WITH(control_variate_features(SequenceTerms{2, 2, {1, 2, 3, 4}, {1, 2, 3}, {1, 2, 3, 4}, {1, 1, 1, 1}}),
                    Contains("RB has 3 values for B * G = 2 * 2"));

  // The probe: B_E = 3 prompts of G = 2 (5 features need 7) warns and leaves
  // the estimate empty; the per-sequence decomposition is still there.
  auto model = tiny_gpt2<double>(31);
  ProbeConfig cfg;
  cfg.learning_rate = 1e-2;
  cfg.control_variates = true;
  OfflineEntropyProbe probe(model, cfg);
  const auto state = random_adam_state(probe.registry(), 1);
  WarningCapture log;
  const ProbeResult r = probe.run(random_batch(3, 2, 8, 11, 1), random_batch(3, 2, 8, 11, 2), state);
  REQUIRE(log.warnings.size() == 1);
  CHECK_THAT(log.warnings[0], Contains("B_E = 3 prompts for 5 features") && Contains("at least 7"));
  CHECK_FALSE(r.control_variates);
  CHECK(r.first_order_per_sequence.size() == 6);
}

TEST_CASE("control variates: S, RB and Sdot from one pass, and the features, against direct double computations",
          "[probe][control_variates]") {
  Model model = tiny_gpt2<double>(32);
  auto reg = Registry<double>::build(model);
  SingleProcess comm;
  const double tau = 1.2;
  ProbeComponents<Model> c(model, reg, ProbeSettings{.mb_size = 2, .temperature = tau}, comm);
  const TokenBatch E = random_batch(5, 3, 9, model.vocab_size(), 33);
  const auto v = random_direction(reg, 34);
  const auto st = c.sequence_tangents(E, v, "test", /*entropy=*/true);
  CHECK(c.sequence_tangents(E, v, "test").H.empty());

  // S and RB: the teacher-forced statistics (checked against plain loops over
  // all logits in test_probe_edge_cases.cpp); Sdot: reverse mode, one
  // backward per row with a one-hot cotangent, dotted with v.
  const SequenceStatistics ref = sequence_statistics(model, E, tau, /*entropy=*/true);
  Tape<double> tape;
  Var S = record_sequence_logprobs(tape, model, E, tau);
  std::vector<double> sdot;
  for (index_t row = 0; row < E.rows(); ++row) {
    std::vector<double> onehot(std::size_t(E.rows()), 0.0);
    onehot[std::size_t(row)] = 1.0;
    reg.zero_grad();
    tape.backward(S, Tensor<double>::from_host({E.rows()}, onehot));
    auto g = zeros_like_params<double>(reg);
    add_into_param_buffer(g, reg, 1.0);
    sdot.push_back(dot_param_buffers(g, v));
  }
  reg.zero_grad();
  for (std::size_t i = 0; i < sdot.size(); ++i) {
    CHECK(rel_to(st.S[i], ref.S[i]) < 1e-12);
    CHECK(rel_to(st.H[i], ref.H[i]) < 1e-12);
    CHECK(rel_to(st.Sdot[i], sdot[i]) < 1e-10);
  }

  // The features by plain loops: leave-one-out means over g' != g.
  SequenceTerms t{E.B, E.G, st.S, st.H, st.Sdot, {}};
  for (index_t b = 0; b < E.B; ++b)
    for (index_t g = 0; g < E.G; ++g) t.L.push_back(double(E.gen_length(b, g)));
  const ControlVariateFeatures f = control_variate_features(t);
  REQUIRE(f.count() == 5);
  for (index_t b = 0; b < E.B; ++b) {
    std::vector<double> want(5, 0.0);
    for (index_t g = 0; g < E.G; ++g) {
      const auto r = std::size_t(b * E.G + g);
      double len = 0, surprisal = 0, entropy = 0;
      for (index_t o = 0; o < E.G; ++o) {
        if (o == g) continue;
        const auto ro = std::size_t(b * E.G + o);
        len += t.L[ro] / double(E.G - 1);
        surprisal += -t.S[ro] / t.L[ro] / double(E.G - 1);  // random_batch: every response has L >= 1
        entropy += t.RB[ro] / t.L[ro] / double(E.G - 1);
      }
      want[0] += t.Sdot[r];
      want[1] += t.Sdot[r] * len;
      want[2] += t.Sdot[r] * surprisal;
      want[3] += t.Sdot[r] * entropy;
      want[4] += -t.S[r] - t.RB[r];
    }
    for (index_t k = 0; k < 5; ++k) {
      CAPTURE(b, f.names[std::size_t(k)]);
      CHECK(std::abs(f.at(b, k) - want[std::size_t(k)]) <= 1e-12 * std::max(1.0, std::abs(want[std::size_t(k)])));
    }
  }
}

TEST_CASE("control variates: the per-sequence terms sum to bars_dot, and the probe's estimate is the cross-fit",
          "[probe][control_variates]") {
  Model model = tiny_gpt2<double>(35);
  ProbeConfig cfg;
  cfg.learning_rate = 2e-2;
  cfg.mb_size = 3;
  ProbeConfig with_cv = cfg;
  with_cv.control_variates = true;
  OfflineEntropyProbe plain(model, cfg), probe(model, with_cv);
  const auto state = random_adam_state(probe.registry(), 5);
  const auto plain_state = random_adam_state(plain.registry(), 5);
  const TokenBatch E = random_batch(9, 3, 9, model.vocab_size(), 36), U = random_batch(4, 3, 9, model.vocab_size(), 37);
  const ProbeResult r = probe.run(E, U, state), r0 = plain.run(E, U, plain_state);
  REQUIRE(r.control_variates);
  REQUIRE(r.first_order_per_sequence.size() == std::size_t(E.rows()));
  double total = 0;
  for (double y : r.first_order_per_sequence) total += y;
  CHECK(rel_to(total / double(E.B), r.bars_dot) < 1e-12);
  CHECK(r.bars_dot == r0.bars_dot);
  const ControlVariates& cv = *r.control_variates;
  CHECK(cv.features.size() == 5);
  CHECK(rel_to(cv.deltaH1_plain, r.deltaH1) < 1e-12);
  // SE_plain is eta sqrt(V_X) of (d), whose pass the control-variate pass replaces.
  REQUIRE(r.full);
  REQUIRE(r0.full);
  CHECK(rel_to(r.full->V_X, r0.full->V_X) < 1e-12);
  CHECK(rel_to(cv.SE_plain, r.learning_rate * std::sqrt(r0.full->V_X)) < 1e-10);
  for (index_t b = 0; b < E.B; ++b) {
    double s = 0;
    for (index_t g = 0; g < E.G; ++g) s += r.first_order_per_sequence[std::size_t(b * E.G + g)];
    CHECK(rel_to(cv.s[std::size_t(b)], s) < 1e-12);
  }
  CHECK(r.timing.count("control_variates") == 1);
  INFO("deltaH1 " << cv.deltaH1_plain << " SE " << cv.SE_plain << " -> " << cv.deltaH1 << " SE " << cv.SE);
  CHECK(std::isfinite(cv.SE));
  CHECK(cv.SE > 0);
}
