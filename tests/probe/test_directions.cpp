// The adamw update direction, its decomposition, the per-sequence entropy
// influences and the zero-second-moment diagnostics (docs/math.md (g), (h)).
#include "../support/numeric.hpp"
#include "../support/tiny_models.hpp"

#include <entropy_probe/io/result_json.hpp>
#include <entropy_probe/probe/probe.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <string>

using namespace entropy_probe;
using namespace ep_test;

namespace {

// max_k |a_k - b_k| / max_k |b_k| over the entries present in b.
double max_rel_diff(const ParamBuffer<double>& a, const ParamBuffer<double>& b) {
  double diff = 0, scale = 0;
  for (index_t i = 0; i < b.size(); ++i) {
    const auto* y = b.entry(i);
    if (!y) continue;
    const auto* x = a.entry(i);
    REQUIRE(x);
    for (index_t k = 0; k < y->numel(); ++k) {
      diff = std::max(diff, std::abs((*x)[k] - (*y)[k]));
      scale = std::max(scale, std::abs((*y)[k]));
    }
  }
  REQUIRE(scale > 0);
  return diff / scale;
}

}  // namespace

TEST_CASE("directions: adamw is a real AdamW step per unit lr, and its parts sum to it", "[probe][adamw]") {
  auto model = tiny_gpt2<double>(40, /*lm_head=*/true);
  auto reg = Registry<double>::build(model);
  const TokenBatch U = random_batch(4, 3, 8, 11, 42);
  SingleProcess comm;
  ProbeComponents<decltype(model)> c(model, reg, ProbeSettings{Weighting::dr_grpo, 2, 1.0, {}}, comm);
  const AdamState<double> state = uneven_adam_state(reg, 41, 4);
  REQUIRE(state.missing_count() == 1);
  const auto sumY = c.accumulate_sum_Y(U);
  const auto d = adamw_direction(reg, state, sumY.sum, sumY.count);

  // The real step, on the same mean gradient, from a copy of the state.
  const double lr = 0.05;
  const auto before = params_to_buffer<double>(reg);
  const ParameterSnapshot<double, CpuBackend> snap(reg);
  AdamState<double> scratch = state;
  load_param_gradients(reg, sumY.sum, -1.0 / double(sumY.count));
  adamw_step(reg, scratch, lr);
  auto step = params_to_buffer<double>(reg);
  snap.restore();
  for (index_t i = 0; i < step.size(); ++i)
    for (index_t k = 0; k < step.entry(i)->numel(); ++k)
      (*step.entry(i))[k] = ((*step.entry(i))[k] - (*before.entry(i))[k]) / lr;
  const double step_err = max_rel_diff(d.total, step);
  CAPTURE(step_err);
  CHECK(step_err < 1e-12);
  CHECK(norm_param_buffer(d.momentum) > 0);
  CHECK(norm_param_buffer(d.decay) > 0);

  // momentum + decay + gradient_scale * sum_Y_raw / B_U = total.
  auto parts = sumY.sum;
  multiply_param_buffers(parts, d.gradient_scale);
  scale_param_buffer(parts, 1.0 / double(sumY.count));
  for (const auto* term : {&d.momentum, &d.decay})
    for (index_t i = 0; i < parts.size(); ++i)
      for (index_t k = 0; k < parts.entry(i)->numel(); ++k) (*parts.entry(i))[k] += (*term->entry(i))[k];
  const double parts_err = max_rel_diff(parts, d.total);
  CAPTURE(parts_err);
  CHECK(parts_err < 1e-12);
  std::printf("directions: adamw vs a real step %.3e, parts vs total %.3e (max-norm relative)\n", step_err, parts_err);
}

TEST_CASE("directions: per-sequence influences match brute force and sum to deltaH1", "[probe][influence]") {
  auto model = tiny_gpt2<double>(43, /*lm_head=*/true);
  const TokenBatch E = random_batch(4, 2, 8, 11, 44);
  TokenBatch U = random_batch(3, 3, 8, 11, 45);
  U.rewards = std::vector<double>{0.5, 1, 0, 1, 1, 0, 0, 0.25, 1};
  const double eta = 1e-2;
  for (Direction dir : {Direction::adamw, Direction::precond_sgd}) {
    CAPTURE(to_string(dir));
    ProbeConfig cfg;
    cfg.learning_rate = eta;
    cfg.variance = VarianceMode::none;
    cfg.mb_size = 2;
    cfg.influence = true;
    cfg.directions = dir == Direction::adamw ? std::vector{Direction::precond_sgd, Direction::adamw}
                                             : std::vector{Direction::precond_sgd};
    OfflineEntropyProbe probe(model, cfg);
    const auto& reg = probe.registry();
    const AdamState<double> state = uneven_adam_state(reg, 41, 4);
    set_log_sink([](LogLevel, std::string_view) {});  // the missing state's warning
    const ProbeResult r = probe.run(E, U, state);
    set_log_sink({});
    REQUIRE(r.influence_direction == dir);
    REQUIRE(r.influence.size() == 9);
    const DirectionResult& dr = r.directions.back();
    REQUIRE(dr.direction == dir);
    CHECK(r.deltaH1 == r.directions.front().deltaH1);  // the first direction is the top level's

    // The influences, with the momentum and decay shares, add up to deltaH1.
    double total = dr.momentum_share.value_or(0) + dr.decay_share.value_or(0);
    for (const auto& s : r.influence) total += s.influence;
    CAPTURE(total, dr.deltaH1);
    CHECK(rel_diff(total, dr.deltaH1) < 1e-12);
    double worst = 0;
    CHECK(dr.momentum_share.has_value() == (dir == Direction::adamw));

    // Brute force, independently of the probe: mu_X, and each sequence's own
    // Y gradient by a separate backward pass (the batch with every other
    // advantage zeroed), preconditioned as the direction does.
    SingleProcess comm;
    ProbeComponents<decltype(model)> c(model, reg, ProbeSettings{Weighting::dr_grpo, 0, 1.0, {}}, comm);
    auto mu_X = c.accumulate_sum_X(E).sum;
    scale_param_buffer(mu_X, 1.0 / double(E.B));
    const auto sumY = c.accumulate_sum_Y(U);
    const auto adamw = adamw_direction(reg, state, sumY.sum, sumY.count);
    for (const auto& s : r.influence) {
      CAPTURE(s.prompt, s.completion);
      TokenBatch one = U.select({s.prompt});
      for (index_t g = 0; g < U.G; ++g)
        if (g != s.completion) one.advantages[std::size_t(g)] = 0;
      auto v = c.accumulate_sum_Y(one).sum;  // (A/(G Lmax)) grad S[u,g]
      if (dir == Direction::adamw) {
        multiply_param_buffers(v, adamw.gradient_scale);
      } else {
        set_log_sink([](LogLevel, std::string_view) {});
        AdamPreconditioner<double> P(state);
        P.apply(v);
        set_log_sink({});
      }
      const double brute = eta * dot_param_buffers(mu_X, v) / double(U.B);
      CAPTURE(s.influence, brute);
      CHECK(rel_diff(s.influence, brute) < 1e-10);
      worst = std::max(worst, rel_diff(s.influence, brute));
      CHECK(s.advantage == U.advantage(s.prompt, s.completion));
      CHECK(s.length == U.gen_length(s.prompt, s.completion));
      CHECK(s.reward == (*U.rewards)[std::size_t(s.prompt * U.G + s.completion)]);
    }

    std::printf("directions: %s influences: sum vs deltaH1 %.3e, worst vs brute force %.3e\n", to_string(dir),
                rel_diff(total, dr.deltaH1), worst);
    const nlohmann::json j = to_json(r);
    CHECK(j["influence"].size() == 9);
    CHECK(j["influence"][4]["influence"] == r.influence[4].influence);
    CHECK(j["influence"][4]["reward"] == 1.0);
    CHECK(j["influence_direction"] == to_string(dir));
    CHECK(j["directions"][to_string(dir)]["deltaH1"] == dr.deltaH1);
    CHECK(j["directions"][to_string(dir)].contains("momentum_share") == (dir == Direction::adamw));
  }
}

TEST_CASE("directions: precond_sgd alone is the unchanged prediction", "[probe][adamw]") {
  auto model = tiny_gpt2<double>(46);
  const TokenBatch E = random_batch(3, 2, 8, 11, 47), U = random_batch(3, 2, 8, 11, 48);
  ProbeConfig cfg;
  cfg.learning_rate = 1e-2;
  cfg.variance = VarianceMode::none;
  OfflineEntropyProbe probe(model, cfg);
  const auto state = random_adam_state(probe.registry(), 49);
  const ProbeResult r = probe.run(E, U, state);
  REQUIRE(r.directions.size() == 1);
  CHECK(r.directions[0].direction == Direction::precond_sgd);
  CHECK(r.directions[0].deltaH1 == r.deltaH1);
  CHECK(r.deltaH1 == 1e-2 * r.bars_dot);
  CHECK_FALSE(r.influence_direction);
  CHECK_FALSE(to_json(r).contains("influence"));
  cfg.directions = {};
  OfflineEntropyProbe none(model, cfg);
  CHECK_THROWS_AS(none.run(E, U, random_adam_state(none.registry(), 49)), UsageError);
}

TEST_CASE("directions: entries with exp_avg_sq = 0 and a live gradient are counted, with their share",
          "[probe][adam]") {
  auto model = tiny_gpt2<double>(50, /*lm_head=*/true);
  auto reg = Registry<double>::build(model);
  const TokenBatch U = random_batch(3, 2, 8, 11, 51);
  SingleProcess comm;
  ProbeComponents<decltype(model)> c(model, reg, ProbeSettings{Weighting::dr_grpo, 0, 1.0, {}}, comm);
  auto state = random_adam_state(reg, 52);
  const auto sumY = c.accumulate_sum_Y(U);
  // Zero a few second moments in a LoRA tensor and in the position table (not
  // in the LoRA view, and trainable here); one of them where the gradient is 0.
  index_t lora = -1, other = -1;
  for (index_t i = 0; i < reg.size(); ++i) {
    if (lora < 0 && reg.entry(i).lora) lora = i;
    if (other < 0 && !reg.entry(i).lora) other = i;
  }
  REQUIRE(lora >= 0);
  std::vector<std::pair<index_t, index_t>> zeroed{{lora, 0}, {lora, 3}};
  if (other >= 0) zeroed.push_back({other, 1});
  auto g_at = [&](index_t i, index_t k) { return (*sumY.sum.entry(i))[k]; };
  for (auto [i, k] : zeroed) state.entry(i)->exp_avg_sq[k] = 0;
  const auto sum_with_zero = [&] {
    auto s = sumY.sum;
    (*s.entry(lora))[3] = 0;  // the second zeroed LoRA entry has no gradient: not counted
    return s;
  }();
  AdamPreconditioner<double> P(state);
  const auto mu_Y = preconditioned_mean(sum_with_zero, sumY.count, P);
  const ZeroSecondMoment z = zero_second_moment_entries(reg, state, sum_with_zero, mu_Y);
  REQUIRE(g_at(lora, 0) != 0);
  CHECK(z.lora == 1);
  CHECK(z.all == (other >= 0 ? 2 : 1));
  // By hand: the flagged entries' share of |mu_Y|^2.
  const double total = dot_param_buffers(mu_Y, mu_Y);
  const double lora_sq = std::pow((*mu_Y.entry(lora))[0], 2);
  const double other_sq = other >= 0 ? std::pow((*mu_Y.entry(other))[1], 2) : 0.0;
  CHECK(rel_diff(z.lora_share, lora_sq / total) < 1e-12);
  CHECK(rel_diff(z.all_share, (lora_sq + other_sq) / total) < 1e-12);
  CHECK(z.all_share > 0.5);  // divided by eps = 1e-8, they dominate
}

TEST_CASE("lr sweep: every point is a single-eta run, and the baseline forward runs once", "[probe][lr_sweep]") {
  auto model = tiny_gpt2<double>(52, /*lm_head=*/true);
  const TokenBatch E = random_batch(4, 2, 8, 11, 53), U = random_batch(3, 2, 8, 11, 54);
  std::map<std::string, int> finished;  // phases run to their last microbatch
  ProbeConfig cfg;
  cfg.learning_rate = 1e-2;
  cfg.variance = VarianceMode::none;
  cfg.mb_size = 0;  // one microbatch per phase: one report per forward over E
  cfg.directions = {Direction::precond_sgd, Direction::adamw};
  cfg.ground_truth = StepKind::adam;
  cfg.lr_sweep = {1e-3, 1e-2, 3e-2};
  cfg.progress = [&](std::string_view phase, index_t done, index_t total) {
    if (done == total) ++finished[std::string(phase)];
  };
  OfflineEntropyProbe probe(model, cfg);
  const auto state = random_adam_state(probe.registry(), 55);
  const ProbeResult r = probe.run(E, U, state);
  CHECK(finished["ground_truth_baseline"] == 1);
  CHECK(finished["ground_truth"] == 1 + 6);  // the configured truth and the six sweep steps
  REQUIRE(r.lr_sweep.size() == 6);

  auto close = [](double a, double b, double scale) { return std::abs(a - b) <= 1e-12 * scale; };
  ProbeConfig single = cfg;
  single.lr_sweep.clear();
  single.ground_truth.reset();
  single.progress = {};
  for (std::size_t k = 0; k < r.lr_sweep.size(); ++k) {
    const SweepPoint& p = r.lr_sweep[k];
    CAPTURE(k, to_string(p.direction), p.learning_rate);
    CHECK(p.direction == cfg.directions[k / 3]);
    CHECK(p.learning_rate == cfg.lr_sweep[k % 3]);
    // The prediction of a run at this eta.
    single.learning_rate = p.learning_rate;
    OfflineEntropyProbe at_eta(model, single);
    const ProbeResult s = at_eta.run(E, U, random_adam_state(at_eta.registry(), 55));
    CHECK(close(p.deltaH1, s.directions[k / 3].deltaH1, std::abs(s.directions[k / 3].deltaH1)));
    // The truth of a ground truth run of its own (its own baseline forward).
    const GroundTruth t = probe.ground_truth(E, step_kind(p.direction), p.learning_rate, state);
    REQUIRE(t.rao_blackwell);
    REQUIRE(p.truth.rao_blackwell);
    REQUIRE(std::abs(t.deltaH_true) > 0);
    for (const auto& [got, want] :
         {std::pair<EntropyEstimates, EntropyEstimates>{p.truth, t},
          std::pair<EntropyEstimates, EntropyEstimates>{*p.truth.rao_blackwell, *t.rao_blackwell}}) {
      CHECK(close(got.H_orig, want.H_orig, want.H_orig));
      CHECK(close(got.H_upd, want.H_upd, want.H_orig));
      CHECK(close(got.deltaH_true, want.deltaH_true, want.H_orig));
      CHECK(close(got.deltaH_true_tok, want.deltaH_true_tok, want.H_orig_tok));
      CHECK(close(got.SE_deltaH_true, want.SE_deltaH_true, want.SE_deltaH_true));
    }
    CHECK(close(p.truth.ESS, t.ESS, t.ESS));
  }
  // The configured truth (adam at eta = 1e-2) is the adamw sweep point there.
  CHECK(r.truth->deltaH_true == r.lr_sweep[4].truth.deltaH_true);
  const nlohmann::json j = to_json(r);
  REQUIRE(j["lr_sweep"].size() == 6);
  CHECK(j["lr_sweep"][4]["direction"] == "adamw");
  CHECK(j["lr_sweep"][4]["deltaH_true_tok"] == r.lr_sweep[4].truth.deltaH_true_tok);
  CHECK(j["config"]["lr_sweep"] == nlohmann::json(cfg.lr_sweep));

  cfg.lr_sweep = {1e-3, -1.0};
  cfg.progress = {};
  OfflineEntropyProbe bad(model, cfg);
  CHECK_THROWS_WITH(bad.run(E, U, random_adam_state(bad.registry(), 55)),
                    Catch::Contains("lr_sweep[1] = -1 must be positive"));
}

TEST_CASE("lr sweep: a step whose importance weights collapse is warned about", "[probe][lr_sweep]") {
  auto model = tiny_gpt2<double>(52, /*lm_head=*/true);
  const TokenBatch E = random_batch(4, 8, 8, 11, 56), U = random_batch(3, 2, 8, 11, 57);
  ProbeConfig cfg;
  cfg.learning_rate = 1e-3;
  cfg.variance = VarianceMode::none;
  cfg.lr_sweep = {1e-4, 30.0};
  std::vector<std::string> warnings;
  set_log_sink([&](LogLevel level, std::string_view msg) {
    if (level == LogLevel::warning) warnings.emplace_back(msg);
  });
  OfflineEntropyProbe probe(model, cfg);
  const ProbeResult r = probe.run(E, U, random_adam_state(probe.registry(), 58));
  set_log_sink({});
  REQUIRE(r.lr_sweep.size() == 2);
  CAPTURE(r.lr_sweep[0].truth.ESS, r.lr_sweep[1].truth.ESS, warnings);
  CHECK(r.lr_sweep[0].truth.ESS > 0.9 * 32);  // a small step barely moves the weights
  CHECK(r.lr_sweep[1].truth.ESS < 0.1 * 32);
  REQUIRE(warnings.size() == 1);
  CHECK_THAT(warnings[0], Catch::Contains("eta 30") && Catch::Contains("ESS") && Catch::Contains("of 32 E responses"));
}
