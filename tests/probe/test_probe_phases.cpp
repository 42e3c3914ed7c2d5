#include "../support/numeric.hpp"
#include "../support/tiny_models.hpp"

#include <entropy_probe/probe/probe.hpp>

#include <catch2/catch.hpp>

#include <cmath>

using namespace entropy_probe;
using namespace ep_test;

namespace {}  // namespace

TEST_CASE("probe: sums do not depend on the microbatch size", "[probe][microbatch]") {
  auto model = tiny_gpt2<double>(3);
  auto reg = Registry<double>::build(model);
  const TokenBatch E = random_batch(5, 3, 9, 11, 11);
  SingleProcess comm;
  std::vector<ParamBuffer<double>> sums;
  for (index_t mb : {1, 2, 0}) {
    ProbeComponents<decltype(model)> c(model, reg, ProbeSettings{.mb_size = mb}, comm);
    auto s = c.accumulate_sum_X(E);
    CHECK(s.count == 5);
    sums.push_back(s.sum);
  }
  const double n0 = dot_param_buffers(sums[2], sums[2]);
  REQUIRE(n0 > 0);
  for (int k = 0; k < 2; ++k) {
    auto d = sums[static_cast<std::size_t>(k)];
    for (index_t i = 0; i < d.size(); ++i) {
      auto* a = d.entry(i);
      const auto* b = sums[2].entry(i);
      for (index_t j = 0; j < a->numel(); ++j) (*a)[j] -= (*b)[j];
    }
    CHECK(std::sqrt(dot_param_buffers(d, d) / n0) < 1e-12);
  }
}

TEST_CASE("probe: the alpha-trick routes agree with each other and with brute force", "[probe][alpha]") {
  auto model = tiny_gpt2<double>(5);
  auto reg = Registry<double>::build(model);
  const TokenBatch E = random_batch(4, 3, 8, 11, 21);
  const TokenBatch U = random_batch(3, 2, 8, 11, 22);
  SingleProcess comm;
  ProbeComponents<decltype(model)> c(model, reg, ProbeSettings{.mb_size = 2}, comm);
  auto state = random_adam_state(reg, 9);
  auto sumY = c.accumulate_sum_Y(U);
  AdamPreconditioner<double> P(state);
  const auto mu_Y = preconditioned_mean(sumY.sum, sumY.count, P);
  ConditionalVarianceEstimator<decltype(model)> est(c);
  auto fwd = est.estimate(E, mu_Y, 0.1, AlphaRoute::jvp);
  auto rev = est.estimate(E, mu_Y, 0.1, AlphaRoute::reverse);
  REQUIRE(fwd.s_values.size() == 4);
  // Brute force: one full gradient per prompt on its own, dotted with mu_Y.
  for (index_t b = 0; b < 4; ++b) {
    ProbeComponents<decltype(model)> one(model, reg, ProbeSettings{.mb_size = 0}, comm);
    auto Xb = one.accumulate_sum_X(E.select({b}));
    const double brute = dot_param_buffers(Xb.sum, mu_Y, reg.lora_view());
    CAPTURE(b, fwd.s_values[std::size_t(b)], rev.s_values[std::size_t(b)], brute);
    CHECK(rel_diff(fwd.s_values[std::size_t(b)], rev.s_values[std::size_t(b)]) < 1e-12);
    CHECK(rel_diff(fwd.s_values[std::size_t(b)], brute) < 1e-12);
  }
  CHECK(rel_diff(fwd.se_conditional, rev.se_conditional) < 1e-12);
  CHECK(fwd.se_conditional > 0);
}

TEST_CASE("probe: preconditioner fallback is the identity, one warning, counted", "[probe][adam]") {
  auto model = tiny_gpt2<double>(7);
  auto reg = Registry<double>::build(model);
  auto state = random_adam_state(reg, 1, "h.1.mlp.c_fc.lora_A");
  REQUIRE(state.missing_count() == 1);
  std::vector<std::string> warnings;
  set_log_sink([&](LogLevel l, std::string_view m) {
    if (l == LogLevel::warning) warnings.emplace_back(m);
  });
  AdamPreconditioner<double> P(state);
  auto buf = zeros_like_params<double>(reg);
  for (index_t i = 0; i < buf.size(); ++i) buf.entry(i)->operator[](0) = 1.0;
  P.apply(buf);
  P.apply(buf);  // second application: no second warning
  set_log_sink({});
  REQUIRE(warnings.size() == 1);
  CHECK_THAT(warnings[0], Catch::Contains("h.1.mlp.c_fc.lora_A.weight"));
  CHECK(P.missing() == 1);
  for (index_t i = 0; i < reg.size(); ++i) {
    const double v = (*buf.entry(i))[0];
    if (reg.entry(i).name.find("h.1.mlp.c_fc.lora_A") != std::string::npos) {
      CHECK(v == 1.0);
    } else {
      const auto* st = state.entry(i);
      const double vhat = st->exp_avg_sq[0] / (1 - std::pow(0.999, 3));
      const double once = 1.0 / (std::sqrt(vhat) + 1e-8);
      CHECK(v == Approx(once * once).epsilon(1e-12));
    }
  }
}

TEST_CASE("probe: preconditioned_mean is P sum / count, element by element", "[probe][adam]") {
  auto model = tiny_gpt2<double>(7);
  auto reg = Registry<double>::build(model);
  auto state = random_adam_state(reg, 2, "h.0.attn.c_attn.lora_B");  // one parameter keeps the identity
  auto sum = zeros_like_params<double>(reg);
  for (index_t i = 0; i < sum.size(); ++i)
    for (index_t k = 0; k < sum.entry(i)->numel(); ++k) (*sum.entry(i))[k] = 0.25 * double(k % 7) - 0.5;
  const auto before = sum;
  set_log_sink([](LogLevel, std::string_view) {});  // the identity's warning
  AdamPreconditioner<double> P(state);
  const auto mu = preconditioned_mean(sum, 3, P);
  set_log_sink({});
  CHECK(P.missing() == 1);
  for (index_t i = 0; i < reg.size(); ++i) {
    CAPTURE(reg.entry(i).name);
    const auto* st = state.entry(i);
    for (index_t k = 0; k < sum.entry(i)->numel(); ++k) {
      // random_adam_state's step is 3; the hyper-parameters are AdamHyper's defaults.
      const double denom = st ? std::sqrt(st->exp_avg_sq[k] / (1 - std::pow(0.999, 3))) + 1e-8 : 1.0;
      const double want = (*sum.entry(i))[k] / denom / 3.0;
      REQUIRE(rel_diff((*mu.entry(i))[k], want) < 1e-15);
      REQUIRE((*sum.entry(i))[k] == (*before.entry(i))[k]);  // the sum itself is left alone
    }
  }
  CHECK_THROWS_AS(preconditioned_mean(sum, 0, P), UsageError);
}

TEST_CASE("probe: ground truth restores parameters and optimizer state bit-exactly", "[probe][truth]") {
  auto model = tiny_gpt2<double>(8, /*lm_head=*/true);
  auto reg = Registry<double>::build(model);
  auto state = random_adam_state(reg, 2);
  const AdamState<double> state_before = state;
  std::vector<std::vector<double>> before;
  for (const auto& e : reg.entries()) before.push_back(e.param->value.to_host());
  const TokenBatch E = random_batch(3, 2, 8, 11, 31), U = random_batch(3, 2, 8, 11, 32);
  for (StepKind kind : {StepKind::adam, StepKind::precond_sgd}) {
    ProbeConfig cfg;
    cfg.learning_rate = 1e-2;
    cfg.ground_truth = kind;
    OfflineEntropyProbe probe(model, cfg);
    auto st = random_adam_state(probe.registry(), 2);
    auto r = probe.run(E, U, st);
    REQUIRE(r.truth);
    CHECK(std::isfinite(r.truth->deltaH_true));
    CHECK(r.truth->ESS > 0);
    CHECK(r.truth->ESS <= double(E.rows()) + 1e-9);
    CHECK(std::abs(r.truth->deltaH_true) > 0);  // the step changed the policy
    for (std::size_t i = 0; i < before.size(); ++i) CHECK(reg.entry(index_t(i)).param->value.to_host() == before[i]);
    for (index_t i = 0; i < st.size(); ++i) {
      CHECK(st.entry(i)->step == 3);
      CHECK(st.entry(i)->exp_avg.to_host() == state_before.entry(i)->exp_avg.to_host());
      CHECK(st.entry(i)->exp_avg_sq.to_host() == state_before.entry(i)->exp_avg_sq.to_host());
    }
    for (const auto& e : reg.entries()) CHECK_FALSE(e.param->grad.has_value());
  }
}
