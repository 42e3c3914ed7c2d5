// Bad input and documented edge results of OfflineEntropyProbe::run and the
// probe components (docs/math.md, docs/checkpoints.md). Every failing run is checked
// to leave the model's parameters, their grads and the Adam state unchanged,
// bit for bit.
#include "../support/log_capture.hpp"
#include "../support/numeric.hpp"
#include "../support/tiny_models.hpp"

#include <entropy_probe/io/result_json.hpp>
#include <entropy_probe/probe/probe.hpp>
#include <entropy_probe/sample/sampling.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

using namespace entropy_probe;
using namespace ep_test;
using Catch::Contains;

namespace {

using Model = nn::Gpt2LMHeadModel<double>;

bool same_bits(const std::vector<double>& a, const std::vector<double>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0);
}

// Every parameter of the model (trainable or not): value and grad.
struct ModelState {
  std::vector<std::string> names;
  std::vector<std::vector<double>> values;
  std::vector<std::optional<std::vector<double>>> grads;
};

template <class M>
ModelState capture(M& model) {
  ModelState s;
  model.named_parameters(ParameterVisitor<double>([&](const std::string& name, Parameter<double>& p) {
    s.names.push_back(name);
    s.values.push_back(p.value.to_host());
    s.grads.push_back(p.grad ? std::optional<std::vector<double>>(p.grad->to_host()) : std::nullopt);
  }));
  return s;
}

void check_unchanged(const ModelState& before, const ModelState& after) {
  REQUIRE(before.names == after.names);
  for (std::size_t i = 0; i < before.names.size(); ++i) {
    CAPTURE(before.names[i]);
    CHECK(same_bits(before.values[i], after.values[i]));
    REQUIRE(before.grads[i].has_value() == after.grads[i].has_value());
    if (before.grads[i]) CHECK(same_bits(*before.grads[i], *after.grads[i]));
  }
}

struct AdamSnapshot {
  AdamHyper hyper;
  std::vector<std::optional<std::vector<double>>> m, v;
  std::vector<double> step;
};

AdamSnapshot capture(const AdamState<double>& st) {
  AdamSnapshot s;
  s.hyper = st.hyper();
  for (index_t i = 0; i < st.size(); ++i) {
    const auto* e = st.entry(i);
    s.m.push_back(e ? std::optional<std::vector<double>>(e->exp_avg.to_host()) : std::nullopt);
    s.v.push_back(e ? std::optional<std::vector<double>>(e->exp_avg_sq.to_host()) : std::nullopt);
    s.step.push_back(e ? e->step : -1.0);
  }
  return s;
}

void check_unchanged(const AdamSnapshot& a, const AdamSnapshot& b) {
  CHECK(a.hyper.lr == b.hyper.lr);
  CHECK(a.hyper.beta1 == b.hyper.beta1);
  CHECK(a.hyper.beta2 == b.hyper.beta2);
  CHECK(a.hyper.eps == b.hyper.eps);
  CHECK(a.hyper.weight_decay == b.hyper.weight_decay);
  REQUIRE(a.m.size() == b.m.size());
  for (std::size_t i = 0; i < a.m.size(); ++i) {
    CAPTURE(i);
    REQUIRE(a.m[i].has_value() == b.m[i].has_value());
    if (a.m[i]) {
      CHECK(same_bits(*a.m[i], *b.m[i]));
      CHECK(same_bits(*a.v[i], *b.v[i]));
    }
    CHECK(a.step[i] == b.step[i]);
  }
}

ProbeConfig base_config(VarianceMode variance = VarianceMode::full) {
  ProbeConfig cfg;
  cfg.learning_rate = 1e-2;
  cfg.variance = variance;
  return cfg;
}

// A run that must throw E with a message containing `needle`, and must leave
// everything as it found it.
template <class E, class M>
void check_run_fails(M& model, OfflineEntropyProbe<M>& probe, const TokenBatch& Eb, const TokenBatch& Ub,
                     const AdamState<double>& state, const std::string& needle) {
  const ModelState before = capture(model);
  const AdamSnapshot adam_before = capture(state);
  CHECK_THROWS_AS(probe.run(Eb, Ub, state), E);
  CHECK_THROWS_WITH(probe.run(Eb, Ub, state), Contains(needle));
  check_unchanged(before, capture(model));
  check_unchanged(adam_before, capture(state));
}

}  // namespace

TEST_CASE("probe edge: an invalid E or U batch is an InputError naming the batch", "[probe][edge]") {
  auto model = tiny_gpt2<double>(21);
  OfflineEntropyProbe probe(model, base_config());
  const auto state = random_adam_state(probe.registry(), 1);
  const TokenBatch E = random_batch(3, 2, 8, 11, 1), U = random_batch(3, 2, 8, 11, 2);
  REQUIRE_NOTHROW(probe.run(E, U, state));

  TokenBatch badE = E;
  badE.sequences[static_cast<std::size_t>(badE.at(2, 1, 7))] = 11;  // == vocabulary size
  badE.attention_mask[static_cast<std::size_t>(badE.at(2, 1, 7))] = 1;
  check_run_fails<InputError>(model, probe, badE, U, state, "E batch: sequences[2,1,7] = 11");

  TokenBatch badU = U;
  badU.advantages[3] = std::numeric_limits<double>::quiet_NaN();
  check_run_fails<InputError>(model, probe, E, badU, state, "U batch: advantages[1,1]");

  TokenBatch emptyU = U;
  emptyU.B = 0;
  check_run_fails<InputError>(model, probe, E, emptyU, state, "U batch: empty batch");

  TokenBatch badPrompt = E;
  badPrompt.prompt_lens[0] = 8;
  check_run_fails<InputError>(model, probe, badPrompt, U, state, "E batch: prompt_lens[0] = 8");
}

TEST_CASE("probe edge: B_E = 1 gives SE_conditional = 0 with a warning, and B = 1 variances are finite",
          "[probe][edge][variance]") {
  auto model = tiny_gpt2<double>(22);
  OfflineEntropyProbe probe(model, base_config(VarianceMode::full));
  const auto state = random_adam_state(probe.registry(), 2);
  const TokenBatch E = random_batch(1, 3, 8, 11, 3), U = random_batch(1, 2, 8, 11, 4);
  WarningCapture log;
  const ProbeResult r = probe.run(E, U, state);
  REQUIRE(log.warnings.size() == 1);
  CHECK_THAT(log.warnings[0], Contains("B_E = 1 < 2") && Contains("SE_conditional"));
  REQUIRE(r.conditional);
  CHECK(r.B_E == 1);
  CHECK(r.B_U == 1);
  REQUIRE(r.conditional->s_values.size() == 1);
  CHECK(r.conditional->se_conditional == 0.0);
  CHECK(r.conditional->var_s == 0.0);
  CHECK(r.conditional->sbar == r.conditional->s_values[0]);
  // With one prompt X_1 = mu_X and Y_1 = mu_Y, so both deviations are zero up
  // to rounding; max(B - 1, 1) keeps the quotient finite (B - 1 would give inf or NaN).
  REQUIRE(r.full);
  CHECK(std::isfinite(r.full->V_X));
  CHECK(std::isfinite(r.full->V_Y));
  CHECK(std::isfinite(r.full->se_deltaH1));
  CHECK(std::sqrt(r.full->V_X) <= 1e-12 * std::abs(r.bars_dot));
  CHECK(std::sqrt(r.full->V_Y) <= 1e-12 * std::abs(r.bars_dot));
  CHECK(r.conditional->s_values[0] == Approx(r.bars_dot).epsilon(1e-12));
}

TEST_CASE("probe edge: full_variance denominators are B max(B - 1, 1)", "[probe][edge][variance]") {
  auto model = tiny_gpt2<double>(23);
  auto reg = Registry<double>::build(model);
  SingleProcess comm;
  ProbeComponents<Model> c(model, reg, ProbeSettings{}, comm);
  const TokenBatch E = random_batch(2, 2, 8, 11, 5);
  auto mu_X = c.accumulate_sum_X(E).sum;
  scale_param_buffer(mu_X, 0.5);
  auto identity = [](ParamBuffer<double>&) {};
  for (index_t B_U : {1, 3}) {
    CAPTURE(B_U);
    const TokenBatch U = random_batch(B_U, 2, 8, 11, 6);
    auto mu_Y = c.accumulate_sum_Y(U).sum;
    scale_param_buffer(mu_Y, 1.0 / double(B_U));
    // Y_u . mu_X one prompt at a time, by reverse mode.
    std::vector<double> yd;
    for (index_t u = 0; u < B_U; ++u) yd.push_back(c.dot_param_buffers(c.accumulate_sum_Y(U.select({u})).sum, mu_X));
    const double bars = 0.25;  // any centre: the formula subtracts what it is given
    double ss = 0;
    for (double y : yd) ss += (y - bars) * (y - bars);
    const double want_VY = ss / (double(B_U) * std::max(double(B_U) - 1.0, 1.0));

    // X side from given directional derivatives: B_E = 1 and B_E = 3.
    const std::vector<double> x1 = {3.0};
    FullVariance f1 = full_variance(c, E, U, mu_X, mu_Y, 1.0, 0.5, identity, &x1);
    CHECK(f1.V_X == 4.0);  // (3 - 1)^2 / (1 * max(0, 1))
    const std::vector<double> x3 = {1.0, 2.0, 6.0};
    FullVariance f3 = full_variance(c, E, U, mu_X, mu_Y, 3.0, 0.5, identity, &x3);
    CHECK(f3.V_X == Approx(14.0 / 6.0).epsilon(1e-15));  // (4 + 1 + 9) / (3 * 2)

    FullVariance fy = full_variance(c, E, U, mu_X, mu_Y, bars, 0.5, identity, &x1);
    CHECK(rel_diff(fy.V_Y, want_VY) < 1e-12);
    CHECK(fy.V_X == Approx((3.0 - bars) * (3.0 - bars)).epsilon(1e-15));
    CHECK(rel_diff(fy.se_deltaH1, 0.5 * std::sqrt(fy.V_X + fy.V_Y)) < 1e-15);
  }
}

TEST_CASE("probe edge: X loss weights by hand, G = 1 and G = 3, both weightings", "[probe][edge][weights]") {
  SECTION("G = 3: leave-one-out baseline; dr_grpo divides by Lmax, per_token_avg by max(L, 1)") {
    // One prompt, p = 2, T = 6: response lengths 3, 1 and 0 (all padding).
    TokenBatch b;
    b.B = 1;
    b.G = 3;
    b.T = 6;
    b.sequences.assign(18, 1);
    b.attention_mask = {1, 1, 1, 1, 1, 0,  //
                        1, 1, 1, 0, 0, 0,  //
                        1, 1, 0, 0, 0, 0};
    b.prompt_lens = {2};
    b.advantages = {1, 0, -1};
    REQUIRE(b.gen_length(0, 2) == 0);
    REQUIRE(b.lmax(0) == 3.0);
    const std::vector<double> S = {-6, -3, -1.5};
    // dr_grpo: Sw = S / 3 = {-2, -1, -0.5}; LOO = {-0.75, -1.25, -1.5}; c = {-1.25, 0.25, 1}; W = -c / 3.
    std::vector<double> W = x_loss_weights(b, S, Weighting::dr_grpo);
    REQUIRE(W.size() == 3);
    CHECK(W[0] == Approx(5.0 / 12).epsilon(1e-15));
    CHECK(W[1] == Approx(-1.0 / 12).epsilon(1e-15));
    CHECK(W[2] == Approx(-1.0 / 3).epsilon(1e-15));
    // per_token_avg: Sw = {-6/3, -3/1, -1.5/1} = {-2, -3, -1.5}; LOO = {-2.25, -1.75, -2.5};
    // c = {0.25, -1.25, 1}; W = -c / 3.
    W = x_loss_weights(b, S, Weighting::per_token_avg);
    CHECK(W[0] == Approx(-1.0 / 12).epsilon(1e-15));
    CHECK(W[1] == Approx(5.0 / 12).epsilon(1e-15));
    CHECK(W[2] == Approx(-1.0 / 3).epsilon(1e-15));
    // Explicit max_lengths change dr_grpo (Sw = S / 4 = {-1.5, -0.75, -0.375}), not per_token_avg.
    b.max_lengths = std::vector<double>{4.0};
    W = x_loss_weights(b, S, Weighting::dr_grpo);
    CHECK(W[0] == Approx(-(-1.5 + 0.5625) / 3).epsilon(1e-15));
    CHECK(W[1] == Approx(-(-0.75 + 0.9375) / 3).epsilon(1e-15));
    CHECK(W[2] == Approx(-(-0.375 + 1.125) / 3).epsilon(1e-15));
    W = x_loss_weights(b, S, Weighting::per_token_avg);
    CHECK(W[1] == Approx(5.0 / 12).epsilon(1e-15));
    // The Y weights: A / Lmax / G.
    const std::vector<double> Y = y_loss_weights(b);
    CHECK(Y == std::vector<double>{1.0 / 4 / 3, 0.0, -1.0 / 4 / 3});
  }
  SECTION("G = 1: the baseline is 0, W = -Sw") {
    // Two prompts, one response each: L = 2 and L = 0.
    TokenBatch b;
    b.B = 2;
    b.G = 1;
    b.T = 4;
    b.sequences.assign(8, 2);
    b.attention_mask = {1, 1, 1, 0,  //
                        1, 1, 0, 0};
    b.prompt_lens = {1, 2};
    b.advantages = {0.5, -2};
    const std::vector<double> S = {-4, -2};
    CHECK(x_loss_weights(b, S, Weighting::dr_grpo) == std::vector<double>{2.0, 2.0});  // Lmax = 2 and 1
    CHECK(x_loss_weights(b, S, Weighting::per_token_avg) == std::vector<double>{2.0, 2.0});
    b.max_lengths = std::vector<double>{4.0, 5.0};
    CHECK(x_loss_weights(b, S, Weighting::dr_grpo) == std::vector<double>{1.0, 0.4});
    CHECK(x_loss_weights(b, S, Weighting::per_token_avg) == std::vector<double>{2.0, 2.0});
    CHECK(y_loss_weights(b) == std::vector<double>{0.125, -0.4});
  }
  SECTION("G = 1 through the whole probe: finite results, nonzero X") {
    auto model = tiny_gpt2<double>(24);
    OfflineEntropyProbe probe(model, base_config());
    const auto state = random_adam_state(probe.registry(), 3);
    const ProbeResult r = probe.run(random_batch(3, 1, 8, 11, 7), random_batch(2, 1, 8, 11, 8), state);
    CHECK(r.mu_X_norm > 0);
    CHECK(std::isfinite(r.bars_dot));
    REQUIRE(r.conditional);
    CHECK(r.conditional->se_conditional > 0);
    REQUIRE(r.full);
    CHECK(std::isfinite(r.full->se_deltaH1));
  }
}

TEST_CASE("probe edge: an all-zero gradient is an error, not a silent zero", "[probe][edge]") {
  auto model = tiny_gpt2<double>(25);
  OfflineEntropyProbe probe(model, base_config());
  const auto state = random_adam_state(probe.registry(), 4);
  const TokenBatch E = random_batch(3, 2, 8, 11, 9);
  SECTION("all advantages zero in U") {
    TokenBatch U = random_batch(3, 2, 8, 11, 10);
    std::fill(U.advantages.begin(), U.advantages.end(), 0.0);
    check_run_fails<Error>(model, probe, E, U, state, "[Y] raw nonzero param.grads = 0/");
  }
  SECTION("no generated token anywhere in E") {
    TokenBatch noGen = E;
    for (index_t b = 0; b < noGen.B; ++b)
      for (index_t g = 0; g < noGen.G; ++g)
        for (index_t t = noGen.prompt_lens[static_cast<std::size_t>(b)]; t < noGen.T; ++t)
          noGen.attention_mask[static_cast<std::size_t>(noGen.at(b, g, t))] = 0;
    REQUIRE_NOTHROW(noGen.validate(11, "E batch"));
    check_run_fails<Error>(model, probe, noGen, random_batch(3, 2, 8, 11, 10), state, "[X] nonzero param.grads = 0/");
  }
}

TEST_CASE("probe edge: Adam state binding and the learning rate", "[probe][edge][adam]") {
  auto model = tiny_gpt2<double>(26);
  const TokenBatch E = random_batch(3, 2, 8, 11, 11), U = random_batch(3, 2, 8, 11, 12);

  SECTION("a state bound to another registry of the same model, or to none") {
    OfflineEntropyProbe probe(model, base_config());
    const auto other = Registry<double>::build(model);
    const auto foreign = random_adam_state(other, 5);
    check_run_fails<UsageError>(model, probe, E, U, foreign, "Adam state is bound to registry");
    const AdamState<double> unbound;
    check_run_fails<UsageError>(model, probe, E, U, unbound, "Adam state is bound to registry #0");
  }
  SECTION("learning rate <= 0 or not finite, from the config") {
    for (double lr : {0.0, -1e-3, std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()}) {
      CAPTURE(lr);
      ProbeConfig cfg = base_config();
      cfg.learning_rate = lr;
      OfflineEntropyProbe probe(model, cfg);
      const auto state = random_adam_state(probe.registry(), 6);
      check_run_fails<UsageError>(model, probe, E, U, state, "(config) must be positive");
    }
  }
  SECTION("learning rate <= 0 from the optimizer") {
    ProbeConfig cfg = base_config();
    cfg.learning_rate.reset();
    OfflineEntropyProbe probe(model, cfg);
    auto state = random_adam_state(probe.registry(), 7);
    state.hyper().lr = 0.0;
    check_run_fails<UsageError>(model, probe, E, U, state, "learning rate 0 (optimizer) must be positive");
  }
  SECTION("config vs optimizer: the source is reported and only eta changes") {
    ProbeConfig from_opt = base_config();
    from_opt.learning_rate.reset();
    OfflineEntropyProbe p1(model, from_opt);
    auto s1 = random_adam_state(p1.registry(), 8);
    s1.hyper().lr = 2.5e-4;
    const ProbeResult r1 = p1.run(E, U, s1);
    CHECK(r1.learning_rate == 2.5e-4);
    CHECK(r1.learning_rate_source == "optimizer");
    CHECK(r1.deltaH1 == 2.5e-4 * r1.bars_dot);

    OfflineEntropyProbe p2(model, base_config());
    auto s2 = random_adam_state(p2.registry(), 8);
    s2.hyper().lr = 2.5e-4;
    const ProbeResult r2 = p2.run(E, U, s2);
    CHECK(r2.learning_rate == 1e-2);
    CHECK(r2.learning_rate_source == "config");
    CHECK(r2.deltaH1 == 1e-2 * r2.bars_dot);
    CHECK(r2.bars_dot == r1.bars_dot);
    REQUIRE(r1.conditional);
    REQUIRE(r2.conditional);
    CHECK(r2.conditional->se_conditional == Approx(r1.conditional->se_conditional * 40).epsilon(1e-13));
    CHECK(to_json(r1)["config"]["learning_rate_source"] == "optimizer");
    CHECK(to_json(r2)["config"]["learning_rate_source"] == "config");
    CHECK(to_json(r1)["learning_rate"] == 2.5e-4);
  }
}

TEST_CASE("probe edge: an empty LoRA view is an error for the conditional variance", "[probe][edge][lora]") {
  // GPT-2 without adapters: every parameter trainable, none in the LoRA view
  // (the lm_head is tied to transformer.wte.weight).
  Model model(tiny_gpt2_config(), std::nullopt, 27);
  const TokenBatch E = random_batch(3, 2, 8, 11, 13), U = random_batch(3, 2, 8, 11, 14);
  for (VarianceMode mode : {VarianceMode::conditional, VarianceMode::full}) {
    CAPTURE(to_string(mode));
    OfflineEntropyProbe probe(model, base_config(mode));
    REQUIRE(probe.registry().lora_count() == 0);
    REQUIRE(probe.registry().size() > 0);
    const auto state = random_adam_state(probe.registry(), 9);
    check_run_fails<UsageError>(model, probe, E, U, state, "LoRA view is empty");
  }
  // The first-order prediction itself does not need the view.
  OfflineEntropyProbe probe(model, base_config(VarianceMode::none));
  const auto state = random_adam_state(probe.registry(), 9);
  const ProbeResult r = probe.run(E, U, state);
  CHECK(r.registry.lora_tensors == 0);
  CHECK(r.registry.trainable_tensors == probe.registry().size());
  CHECK(r.mu_X_norm > 0);
  CHECK_FALSE(r.conditional);
}

TEST_CASE("probe edge: phases that do not run leave their keys out of the result and the JSON", "[probe][edge][json]") {
  auto model = tiny_gpt2<double>(28, /*lm_head=*/true);
  const TokenBatch E = random_batch(4, 2, 8, 11, 15), U = random_batch(3, 2, 8, 11, 16);
  const std::set<std::string> always = {"bars_dot",  "deltaH1",    "learning_rate",          "B_E",       "B_U",
                                        "mu_X_norm", "mu_Y_norm",  "preconditioner_missing", "registry",  "timing",
                                        "config",    "directions", "zero_second_moment",     "microbatch"};
  const std::set<std::string> conditional_keys = {"SE_conditional", "s_values"};
  const std::set<std::string> full_keys = {"V_X", "V_Y", "SE_deltaH1"};
  const std::set<std::string> truth_keys = {"H_orig",    "H_upd",           "deltaH_true",  "H_orig_tok",
                                            "H_upd_tok", "deltaH_true_tok", "ESS",          "SE_H_orig",
                                            "SE_H_upd",  "SE_deltaH_true",  "rao_blackwell"};
  auto keys_of = [](const nlohmann::json& j) {
    std::set<std::string> k;
    for (auto it = j.begin(); it != j.end(); ++it) k.insert(it.key());
    return k;
  };
  auto unite = [](std::set<std::string> a, const std::set<std::string>& b) {
    a.insert(b.begin(), b.end());
    return a;
  };
  struct Case {
    VarianceMode variance;
    bool truth;
    std::set<std::string> extra, timing;
    bool control_variates = false;  // with B_E = 4 below its features + 2: the pass runs, no estimate
  };
  const std::vector<Case> cases = {
      {VarianceMode::none, false, {}, {"sum_X", "sum_Y", "total"}},
      {VarianceMode::conditional, false, conditional_keys, {"sum_X", "sum_Y", "conditional_variance", "total"}},
      {VarianceMode::none, true, truth_keys, {"sum_X", "sum_Y", "ground_truth", "total"}},
      {VarianceMode::full,
       true,
       unite(unite(conditional_keys, full_keys), truth_keys),
       {"sum_X", "sum_Y", "conditional_variance", "full_variance", "ground_truth", "total"}},
      {VarianceMode::none, false, {}, {"sum_X", "sum_Y", "control_variates", "total"}, true},
  };
  for (const Case& k : cases) {
    CAPTURE(to_string(k.variance), k.truth);
    ProbeConfig cfg = base_config(k.variance);
    if (k.truth) cfg.ground_truth = StepKind::precond_sgd;
    cfg.control_variates = k.control_variates;
    OfflineEntropyProbe probe(model, cfg);
    const auto state = random_adam_state(probe.registry(), 10);
    const ProbeResult r = probe.run(E, U, state);
    CHECK(r.conditional.has_value() == (k.variance != VarianceMode::none));
    CHECK(r.full.has_value() == (k.variance == VarianceMode::full));
    CHECK(r.truth.has_value() == k.truth);

    const nlohmann::json j = to_json(r);
    CHECK(keys_of(j) == unite(always, k.extra));
    CHECK(keys_of(j["timing"]) == k.timing);
    if (k.truth) {  // the Rao-Blackwellised estimates carry the sampled ones' keys
      std::set<std::string> rb = truth_keys;
      rb.erase("ESS");
      rb.erase("rao_blackwell");
      CHECK(keys_of(j["rao_blackwell"]) == rb);
    }
    CHECK(keys_of(j["registry"]) ==
          std::set<std::string>{"trainable_tensors", "lora_tensors", "trainable_numel", "names"});
    CHECK(keys_of(j["config"]) ==
          std::set<std::string>{"learning_rate", "learning_rate_source", "weighting", "mb_size", "memory_budget",
                                "temperature", "variance", "alpha_route", "ground_truth", "is", "clip_c", "directions",
                                "influence", "influence_matrix", "influence_truth", "lr_sweep", "control_variates"});
    CHECK(j["config"]["control_variates"] == k.control_variates);
    CHECK(r.first_order_per_sequence.size() == (k.control_variates ? 8u : 0u));
    // A microbatch size per loop that ran (full_variance_X only when the
    // alpha trick's values could not be reused).
    std::set<std::string> loops = {"sum_X", "sum_Y"};
    if (k.variance != VarianceMode::none) loops.insert("conditional_variance");
    if (k.variance == VarianceMode::full) loops.insert("full_variance_Y");
    if (k.truth) loops.insert({"ground_truth_baseline", "ground_truth"});
    if (k.control_variates) loops.insert("control_variates");
    std::set<std::string> ran = keys_of(j["microbatch"]);
    ran.erase("full_variance_X");
    CHECK(ran == loops);
    CHECK(j["microbatch"] == nlohmann::json(r.microbatch));
    CHECK(j["config"]["mb_size"] == "auto");
    CHECK(j["bars_dot"] == r.bars_dot);
    CHECK(j["deltaH1"] == r.deltaH1);
    CHECK(j["B_E"] == 4);
    CHECK(j["B_U"] == 3);
    CHECK(j["registry"]["names"] == nlohmann::json(r.registry.names));
    CHECK(j["registry"]["trainable_tensors"] == probe.registry().size());
    CHECK(j["registry"]["lora_tensors"] == probe.registry().lora_count());
    CHECK(j["config"]["variance"] == to_string(k.variance));
    CHECK(j["config"]["ground_truth"] == (k.truth ? "precond_sgd" : "none"));
    if (r.conditional) {
      CHECK(j["s_values"].size() == 4);
      CHECK(j["SE_conditional"] == r.conditional->se_conditional);
    }
    if (r.truth) CHECK(j["ESS"] == r.truth->ESS);
  }
}

TEST_CASE("probe edge: the clip estimator needs clip_c > 0", "[probe][edge][truth]") {
  auto model = tiny_gpt2<double>(29);
  const TokenBatch E = random_batch(3, 2, 8, 11, 17), U = random_batch(3, 2, 8, 11, 18);
  for (double c : {0.0, -1.0, std::numeric_limits<double>::quiet_NaN()}) {
    for (StepKind kind : {StepKind::adam, StepKind::precond_sgd}) {
      CAPTURE(c, to_string(kind));
      ProbeConfig cfg = base_config();
      cfg.ground_truth = kind;
      cfg.is = ISEstimator::clip;
      cfg.clip_c = c;
      OfflineEntropyProbe probe(model, cfg);
      const auto state = random_adam_state(probe.registry(), 11);
      check_run_fails<UsageError>(model, probe, E, U, state, "clip_c");
    }
  }
  SECTION("a positive clip_c runs and leaves everything as it was") {
    ProbeConfig cfg = base_config();
    cfg.ground_truth = StepKind::adam;
    cfg.is = ISEstimator::clip;
    cfg.clip_c = 2.0;
    OfflineEntropyProbe probe(model, cfg);
    const auto state = random_adam_state(probe.registry(), 11);
    const ModelState before = capture(model);
    const AdamSnapshot adam_before = capture(state);
    const ProbeResult r = probe.run(E, U, state);
    REQUIRE(r.truth);
    CHECK(std::isfinite(r.truth->H_upd));
    check_unchanged(before, capture(model));
    check_unchanged(adam_before, capture(state));
  }
  SECTION("ground_truth before run is a usage error") {
    OfflineEntropyProbe probe(model, base_config());
    const auto state = random_adam_state(probe.registry(), 11);
    CHECK_THROWS_AS(probe.ground_truth(E, StepKind::adam, 1e-2, state), UsageError);
    CHECK_THROWS_WITH(probe.ground_truth(E, StepKind::adam, 1e-2, state), Contains("call run() first"));
  }
}

TEST_CASE("probe edge: ground_truth after run steps from the state it is given", "[probe][edge][truth][adam]") {
  auto model = tiny_gpt2<double>(29);
  const TokenBatch E = random_batch(3, 2, 8, 11, 17), U = random_batch(3, 2, 8, 11, 18);
  ProbeConfig cfg = base_config();
  cfg.ground_truth = StepKind::adam;
  OfflineEntropyProbe probe(model, cfg);
  const auto state = random_adam_state(probe.registry(), 11);
  const ProbeResult r = probe.run(E, U, state);
  REQUIRE(r.truth);
  // The same state and step size: the step run() took, bit for bit.
  const GroundTruth again = probe.ground_truth(E, StepKind::adam, r.learning_rate, state);
  CHECK(again.H_upd == r.truth->H_upd);
  CHECK(again.deltaH_true_tok == r.truth->deltaH_true_tok);
  // Another state's moments give another AdamW step, so the argument is used.
  const auto other_moments = random_adam_state(probe.registry(), 12);
  const GroundTruth other = probe.ground_truth(E, StepKind::adam, r.learning_rate, other_moments);
  CHECK(other.H_orig == r.truth->H_orig);
  CHECK(other.H_upd != r.truth->H_upd);
  // A state of another registry of the same model is refused before any work.
  const auto foreign_reg = Registry<double>::build(model);
  const auto foreign = random_adam_state(foreign_reg, 11);
  CHECK_THROWS_AS(probe.ground_truth(E, StepKind::adam, r.learning_rate, foreign), UsageError);
  CHECK_THROWS_WITH(probe.ground_truth(E, StepKind::adam, r.learning_rate, foreign),
                    Contains("Adam state is bound to registry"));
}

TEST_CASE("probe edge: importance-sampled entropies by hand on four sequences", "[probe][edge][truth]") {
  // logw = S1 - S0 = {0.5, -0.5, -0.25, 1}.
  const std::vector<double> S0 = {-2.0, -3.0, -1.0, -4.0};
  const std::vector<double> S1 = {-1.5, -3.5, -1.25, -3.0};
  const std::vector<double> L = {2.0, 3.0, 1.0, 4.0};
  auto check = [](const GroundTruth& g, const std::vector<double>& want) {
    CHECK(g.H_orig == Approx(want[0]).epsilon(1e-14));
    CHECK(g.H_upd == Approx(want[1]).epsilon(1e-14));
    CHECK(g.deltaH_true == Approx(want[2]).epsilon(1e-13));
    CHECK(g.H_orig_tok == Approx(want[3]).epsilon(1e-14));
    CHECK(g.H_upd_tok == Approx(want[4]).epsilon(1e-14));
    CHECK(g.deltaH_true_tok == Approx(want[5]).epsilon(1e-13));
    CHECK(g.ESS == Approx(want[6]).epsilon(1e-14));
  };
  SECTION("snis: w = exp(logw - max logw)") {
    check(importance_sampled_entropies(S0, S1, L, ISEstimator::snis, 10.0),
          {2.5, 2.3858636140144527, -0.11413638598554732, 1.0, 0.8184337929755187, -0.18156620702448134,
           2.9859325981794065});
  }
  SECTION("clip at 2: only the weight e^1 is clipped") {
    check(importance_sampled_entropies(S0, S1, L, ISEstimator::clip, 2.0),
          {2.5, 2.298235805694658, -0.20176419430534187, 1.0, 0.8325832842073484, -0.1674167157926516,
           3.294254723170908});
  }
  SECTION("clip at 0.5: every weight is clipped, so H_upd is the plain mean of -S1 and ESS = N") {
    check(importance_sampled_entropies(S0, S1, L, ISEstimator::clip, 0.5),
          {2.5, 2.3125, -0.1875, 1.0, 0.925, -0.075, 4.0});
  }
  SECTION("clip with a huge c is snis (the normalisation cancels)") {
    const GroundTruth a = importance_sampled_entropies(S0, S1, L, ISEstimator::clip, 1e300);
    const GroundTruth b = importance_sampled_entropies(S0, S1, L, ISEstimator::snis, 1e300);
    CHECK(rel_diff(a.H_upd, b.H_upd) < 1e-15);
    CHECK(rel_diff(a.H_upd_tok, b.H_upd_tok) < 1e-15);
    CHECK(rel_diff(a.ESS, b.ESS) < 1e-15);
  }
  SECTION("no step: H_upd = H_orig and ESS = N") {
    const GroundTruth g = importance_sampled_entropies(S0, S0, L, ISEstimator::snis, 10.0);
    CHECK(g.deltaH_true == 0.0);
    CHECK(g.deltaH_true_tok == 0.0);
    CHECK(g.ESS == 4.0);
  }
  SECTION("size mismatches and an empty batch are usage errors") {
    CHECK_THROWS_AS(importance_sampled_entropies({}, {}, {}, ISEstimator::snis, 1.0), UsageError);
    CHECK_THROWS_AS(importance_sampled_entropies(S0, {-1.0}, L, ISEstimator::snis, 1.0), UsageError);
    CHECK_THROWS_WITH(importance_sampled_entropies(S0, S1, {1.0}, ISEstimator::snis, 1.0), Contains("4 / 4 / 1"));
  }
}

TEST_CASE("probe edge: the first-order prediction and its bookkeeping", "[probe][edge]") {
  auto model = tiny_gpt2<double>(30, /*lm_head=*/true);
  ProbeConfig cfg = base_config(VarianceMode::full);
  cfg.learning_rate = 3e-3;
  OfflineEntropyProbe probe(model, cfg);
  const auto state = random_adam_state(probe.registry(), 12);
  const TokenBatch E = random_batch(5, 3, 8, 11, 19), U = random_batch(4, 2, 8, 11, 20);
  const ModelState before = capture(model);
  const ProbeResult r = probe.run(E, U, state);
  check_unchanged(before, capture(model));  // no phase leaves a grad or a changed value behind
  CHECK(r.deltaH1 == 3e-3 * r.bars_dot);
  CHECK(r.bars_dot != 0.0);
  CHECK(r.mu_X_norm > 0);
  CHECK(r.mu_Y_norm > 0);
  CHECK(r.B_E == 5);
  CHECK(r.B_U == 4);
  REQUIRE(r.conditional);
  CHECK(r.conditional->s_values.size() == 5);
  CHECK(r.conditional->lora_used == probe.registry().lora_count());
  CHECK(r.conditional->lora_absent == 0);
  CHECK(r.preconditioner_missing == 0);
  CHECK(r.registry.trainable_tensors == probe.registry().size());
  CHECK(r.registry.lora_tensors == probe.registry().lora_count());
  CHECK(r.registry.trainable_numel == probe.registry().numel());
  REQUIRE(r.registry.names.size() == static_cast<std::size_t>(probe.registry().size()));
  CHECK(r.registry.names.back() == "base_model.model.lm_head.weight");

  // Independently: mu_X = sum_X / B_E, mu_Y = P sum_Y / B_U, their norms and dot.
  const auto& c = probe.components();
  auto mu_X = c.accumulate_sum_X(E).sum;
  scale_param_buffer(mu_X, 1.0 / 5);
  auto mu_Y = c.accumulate_sum_Y(U).sum;
  AdamPreconditioner<double> P(state);
  P.apply(mu_Y);
  scale_param_buffer(mu_Y, 1.0 / 4);
  CHECK(rel_diff(r.mu_X_norm, norm_param_buffer(mu_X)) < 1e-14);
  CHECK(rel_diff(r.mu_Y_norm, norm_param_buffer(mu_Y)) < 1e-14);
  CHECK(rel_diff(r.bars_dot, dot_param_buffers(mu_X, mu_Y)) < 1e-14);
  // The s values average to bars_dot when the LoRA view holds every trainable.
  REQUIRE(probe.registry().lora_count() == probe.registry().size());
  CHECK(rel_diff(r.conditional->sbar, r.bars_dot) < 1e-12);
}

TEST_CASE("edge: position ids beyond the model's table name the batch and field", "[probe][edge][positions]") {
  auto model = ep_test::tiny_gpt2<double>(3);
  TokenBatch E = ep_test::random_batch(2, 2, 8, 11, 1), U = ep_test::random_batch(2, 2, 8, 11, 2);
  E.position_ids = std::vector<std::int32_t>(E.sequences.size(), 3);
  (*E.position_ids)[5] = 16;  // n_positions = 16
  OfflineEntropyProbe probe(model, ProbeConfig{});
  auto st = ep_test::random_adam_state(probe.registry(), 1);
  REQUIRE_THROWS_WITH(probe.run(E, U, st),
                      Catch::Contains("E batch: position_ids[0,0,5] = 16") && Catch::Contains("16 positions"));
  TokenBatch long_u = ep_test::random_batch(1, 2, 17, 11, 3);  // default positions 0..16
  REQUIRE_THROWS_WITH(probe.run(ep_test::random_batch(2, 2, 8, 11, 1), long_u, st),
                      Catch::Contains("U batch: default position (T too long)[0,0,16] = 16"));
}

TEST_CASE("edge: gradients the caller had survive a run, also a failing one", "[probe][edge][grads]") {
  auto model = ep_test::tiny_gpt2<double>(3);
  const TokenBatch E = ep_test::random_batch(3, 2, 8, 11, 1), U = ep_test::random_batch(3, 2, 8, 11, 2);
  ProbeConfig cfg;
  cfg.ground_truth = StepKind::adam;
  OfflineEntropyProbe probe(model, cfg);
  auto st = ep_test::random_adam_state(probe.registry(), 1);
  for (const auto& e : probe.registry().entries()) e.param->grad = Tensor<double>::full(e.param->value.shape(), 0.5);
  probe.run(E, U, st);
  TokenBatch zero_adv = U;
  std::fill(zero_adv.advantages.begin(), zero_adv.advantages.end(), 0.0);
  REQUIRE_THROWS(probe.run(E, zero_adv, st));
  for (const auto& e : probe.registry().entries()) {
    REQUIRE(e.param->grad.has_value());
    for (index_t k = 0; k < e.param->grad->numel(); ++k) REQUIRE((*e.param->grad)[k] == 0.5);
  }
}

TEST_CASE("edge: non-finite rewards, bad clip_c and an out-of-range end token are errors", "[probe][edge]") {
  TokenBatch b = ep_test::random_batch(2, 2, 6, 11, 4);
  b.rewards = std::vector<double>(4, 1.0);
  (*b.rewards)[3] = std::nan("");
  REQUIRE_THROWS_WITH(b.validate(11, "U batch"), Catch::Contains("U batch: rewards[1,1]"));
  REQUIRE_THROWS_WITH(importance_sampled_entropies({-1, -2}, {-1.5, -2.5}, {1, 1}, ISEstimator::clip, 0.0),
                      Catch::Contains("clip_c"));
  auto model = ep_test::tiny_gpt2<double>(3);
  SamplingConfig sc;
  sc.stop_tokens = {3, 11};
  REQUIRE_THROWS_WITH(sample_responses(model, {{1, 2}}, sc), Catch::Contains("stop_tokens[1] = 11"));
}

namespace {
// A model seen only through forward(), as a user's own model may be: it
// keeps SequenceInput::logit_positions or ignores it, and may return `drop`
// logit rows too few.
template <class Inner>
struct LogitsOnlyModel {
  using scalar_type = double;
  using backend_type = CpuBackend;
  Inner& inner;
  bool keep_hint = false;
  index_t drop = 0;
  void named_parameters(const ParameterVisitor<double>& v) { inner.named_parameters(v); }
  index_t vocab_size() const { return inner.vocab_size(); }
  Var forward(Tape<double>& tape, const SequenceInput& in) {
    SequenceInput plain = in;
    if (!keep_hint) plain.logit_positions.reset();
    Var z = inner.forward(tape, plain);
    if (drop == 0) return z;
    std::vector<std::int32_t> keep;
    for (index_t i = 0; i + drop < in.rows * in.length; ++i) keep.push_back(static_cast<std::int32_t>(i));
    return gather_rows(tape, z, keep);
  }
};
static_assert(!CausalLMFeatures<LogitsOnlyModel<Model>> && CausalLMFeatures<Model>);

// S, the gradient of sum S for every parameter, and the tangent of S along a
// seeded random tangent of every trainable parameter, concatenated.
template <class M, class Inner>
std::vector<double> s_grads_tangents(M& m, Inner& inner, const TokenBatch& batch, double tau) {
  const Registry<double> reg = Registry<double>::build(inner);
  std::mt19937_64 rng(5);
  std::normal_distribution<double> normal;
  std::map<LeafKey, Tensor<double>> tangents;
  for (auto& e : reg.entries()) {
    e.param->grad.reset();
    Tensor<double> t(e.param->value.shape());
    for (index_t i = 0; i < t.numel(); ++i) t[i] = normal(rng);
    tangents.emplace(e.param->id().value, std::move(t));
  }
  Tape<double> tape;
  Var S = record_sequence_logprobs(tape, m, batch, tau);
  std::vector<double> out = tape.value(S).to_host();
  tape.backward(S, Tensor<double>::full({batch.rows()}, 1.0));
  for (auto& e : reg.entries())
    if (e.param->grad)
      for (double v : e.param->grad->to_host()) out.push_back(v);
  for (auto& e : reg.entries()) e.param->grad.reset();
  tape.jvp([&](LeafKey k) { return std::optional(tangents.at(k).view()); });
  REQUIRE(tape.tangent(S));
  for (double v : tape.tangent(S)->to_host()) out.push_back(v);
  return out;
}
}  // namespace

TEST_CASE("sequence log-probs: the fused lm_head path equals the logits path", "[probe][logit_positions][lm_head]") {
  // Tied and untied heads, frozen and trainable (modules_to_save), so the
  // head weight is also the embedding table in some of them.
  auto check = [](auto& model) {
    using Inner = std::remove_reference_t<decltype(model)>;
    const TokenBatch batch = random_batch(3, 2, 9, model.vocab_size(), 19);
    LogitsOnlyModel<Inner> scored{model, true}, full{model, false};
    for (double tau : {1.0, 0.7}) {
      CAPTURE(tau);
      const std::vector<double> fused = s_grads_tangents(model, model, batch, tau);
      for (auto* reference : {&scored, &full}) {
        const std::vector<double> ref = s_grads_tangents(*reference, model, batch, tau);
        REQUIRE(fused.size() == ref.size());
        double worst = 0, scale = 0;
        for (std::size_t i = 0; i < ref.size(); ++i) {
          worst = std::max(worst, std::abs(fused[i] - ref[i]));
          scale = std::max(scale, std::abs(ref[i]));
        }
        CAPTURE(worst, scale);
        CHECK(worst <= 1e-13 * scale);
      }
    }
  };
  for (bool lm_head : {false, true}) {
    CAPTURE(lm_head);
    Model gpt2 = tiny_gpt2<double>(4, lm_head);
    check(gpt2);
    for (bool tie : {false, true}) {
      CAPTURE(tie);
      nn::LoraConfig lora = tiny_lora(lm_head);
      lora.target_modules = {"q_proj", "v_proj", "down_proj"};
      nn::Qwen2ForCausalLM<double> qwen2(tiny_qwen2_config(tie), lora, 6);
      check(qwen2);
    }
  }
}

TEST_CASE("sequence log-probs: scored positions only, or all logits from a model that ignores the hint",
          "[probe][logit_positions]") {
  Model model = tiny_gpt2<double>(3);
  TokenBatch batch = random_batch(3, 2, 9, model.vocab_size(), 17);
  // A read position that is itself padding: the last prompt token of one row
  // masked out (its logits still score the first response token).
  const auto hole = static_cast<std::size_t>(batch.at(1, 1, batch.prompt_lens[1] - 1));
  REQUIRE(batch.attention_mask[hole] == 1);
  batch.attention_mask[hole] = 0;
  LogitsOnlyModel<Model> full{model};
  const std::vector<double> s_scored = sequence_logprobs(model, batch, 1.3);
  const std::vector<double> s_full = sequence_logprobs(full, batch, 1.3);
  REQUIRE(s_scored.size() == s_full.size());
  for (std::size_t i = 0; i < s_full.size(); ++i) CHECK(rel_diff(s_scored[i], s_full[i]) < 1e-13);

  // The gradients through either path agree too.
  auto grads = [&](auto& m) {
    Tape<double> tape;
    Var S = record_sequence_logprobs(tape, m, batch, 1.3);
    const Registry<double> reg = Registry<double>::build(model);
    for (auto& e : reg.entries()) e.param->grad.reset();
    tape.backward(S, Tensor<double>::full({batch.rows()}, 1.0));
    std::vector<double> g;
    for (auto& e : reg.entries())
      if (e.param->grad)
        for (double v : e.param->grad->to_host()) g.push_back(v);
    for (auto& e : reg.entries()) e.param->grad.reset();
    return g;
  };
  const std::vector<double> g_scored = grads(model), g_full = grads(full);
  REQUIRE(g_scored.size() == g_full.size());
  REQUIRE(!g_full.empty());
  double worst = 0, scale = 0;
  for (std::size_t i = 0; i < g_full.size(); ++i) {
    worst = std::max(worst, std::abs(g_scored[i] - g_full[i]));
    scale = std::max(scale, std::abs(g_full[i]));
  }
  CHECK(worst <= 1e-13 * scale);

  LogitsOnlyModel<Model> broken{model, false, 1};
  REQUIRE_THROWS_WITH(sequence_logprobs(broken, batch, 1.0),
                      Contains("the model returned logits of shape [53, 11], expected [R, T, V] = [6, 9, V]"));
}

namespace {

// S and the Rao-Blackwellised entropy H of every row straight from all R*T
// logits, by plain loops in double: the reference for sequence_statistics.
SequenceStatistics direct_statistics(Model& model, const TokenBatch& batch, double tau) {
  LogitsOnlyModel<Model> full{model};
  Tape<double> tape;
  const std::vector<double> z = tape.value(full.forward(tape, sequence_input(batch))).to_host();
  const index_t V = model.vocab_size();
  REQUIRE(static_cast<index_t>(z.size()) == batch.rows() * batch.T * V);
  SequenceStatistics st;
  st.S.assign(static_cast<std::size_t>(batch.rows()), 0.0);
  st.H.assign(static_cast<std::size_t>(batch.rows()), 0.0);
  for (index_t b = 0; b < batch.B; ++b)
    for (index_t g = 0; g < batch.G; ++g)
      for (index_t t = 1; t < batch.T; ++t) {
        if (!batch.generated(b, g, t)) continue;
        const double* zr = z.data() + batch.at(b, g, t - 1) * V;  // the logits before token t
        double mx = -std::numeric_limits<double>::infinity(), total = 0;
        for (index_t v = 0; v < V; ++v) mx = std::max(mx, zr[v] / tau);
        for (index_t v = 0; v < V; ++v) total += std::exp(zr[v] / tau - mx);
        const auto row = static_cast<std::size_t>(b * batch.G + g);
        for (index_t v = 0; v < V; ++v) {
          const double logp = zr[v] / tau - mx - std::log(total);
          st.H[row] -= std::exp(logp) * logp;
        }
        st.S[row] += zr[batch.sequences[static_cast<std::size_t>(batch.at(b, g, t))]] / tau - mx - std::log(total);
      }
  return st;
}

}  // namespace

TEST_CASE("Rao-Blackwellised entropy: every scoring path and the ground truth against a direct double computation",
          "[probe][rao_blackwell]") {
  Model model = tiny_gpt2<double>(3);
  const TokenBatch E = random_batch(3, 2, 9, model.vocab_size(), 21);
  const double tau = 1.3;
  const SequenceStatistics want = direct_statistics(model, E, tau);
  auto check_rows = [](const std::vector<double>& got, const std::vector<double>& ref) {
    REQUIRE(got.size() == ref.size());
    for (std::size_t i = 0; i < ref.size(); ++i) CHECK(rel_diff(got[i], ref[i]) < 1e-12);
  };
  for (double h : want.H) REQUIRE(h > 0.1);  // every row scores at least one position
  LogitsOnlyModel<Model> scored{model, true}, full{model, false};
  check_rows(sequence_statistics(model, E, tau, true).H, want.H);   // fused lm head, scored rows
  check_rows(sequence_statistics(scored, E, tau, true).H, want.H);  // logits of the scored rows
  check_rows(sequence_statistics(full, E, tau, true).H, want.H);    // logits of all R*T rows
  CHECK(sequence_statistics(model, E, tau, false).H.empty());

  // The ground truth, one prompt per microbatch, along a random direction:
  // both estimates from the direct statistics before and after the step.
  auto reg = Registry<double>::build(model);
  SingleProcess comm;
  ProbeComponents<Model> c(model, reg, ProbeSettings{.mb_size = 1, .temperature = tau}, comm);
  auto dir = zeros_like_params<double>(reg);
  std::mt19937_64 rng(3);
  std::normal_distribution<double> nd(0, 1);
  for (index_t i = 0; i < dir.size(); ++i)
    for (index_t k = 0; k < dir.entry(i)->numel(); ++k) (*dir.entry(i))[k] = nd(rng);
  const double eta = 0.2 / norm_param_buffer(dir);
  const auto state = random_adam_state(reg, 3);
  const GroundTruth gt = ground_truth(c, E, StepKind::precond_sgd, eta, dir, 1, dir, state, ISEstimator::snis, 10.0);
  SequenceStatistics want_after;
  {
    ParameterSnapshot<double, CpuBackend> snap(reg);
    for (index_t i = 0; i < reg.size(); ++i) {
      auto& v = reg.entry(i).param->value;
      for (index_t k = 0; k < v.numel(); ++k) v[k] += eta * (*dir.entry(i))[k];
    }
    want_after = direct_statistics(model, E, tau);
    snap.restore();
  }
  std::vector<double> L;
  for (index_t b = 0; b < E.B; ++b)
    for (index_t g = 0; g < E.G; ++g) L.push_back(double(E.gen_length(b, g)));
  const std::vector<double> w = importance_weights(want.S, want_after.S, ISEstimator::snis, 10.0);
  std::vector<double> minus_S0, minus_S1;
  for (std::size_t i = 0; i < w.size(); ++i) {
    minus_S0.push_back(-want.S[i]);
    minus_S1.push_back(-want_after.S[i]);
  }
  REQUIRE(gt.rao_blackwell);
  const std::pair<EntropyEstimates, EntropyEstimates> cases[] = {
      {gt, weighted_entropies(w, minus_S0, minus_S1, L, E.G)},
      {*gt.rao_blackwell, weighted_entropies(w, want.H, want_after.H, L, E.G)}};
  for (const auto& [got, ref] : cases) {
    REQUIRE(std::abs(ref.deltaH_true) > 1e-3 * ref.H_orig);  // the step moves the entropy
    CHECK(rel_diff(got.H_orig, ref.H_orig) < 1e-12);
    CHECK(rel_diff(got.H_upd, ref.H_upd) < 1e-12);
    CHECK(std::abs(got.deltaH_true - ref.deltaH_true) < 1e-12 * ref.H_orig);
    CHECK(rel_diff(got.H_upd_tok, ref.H_upd_tok) < 1e-12);
    CHECK(rel_diff(got.SE_deltaH_true, ref.SE_deltaH_true) < 1e-9);
    CHECK(ref.SE_deltaH_true > 0);
  }
}

TEST_CASE("importance-sampled entropies: standard errors by hand, prompts as the units", "[probe][edge][truth]") {
  // Two prompts of G = 2; w = {1, 1, 2, 0}, h0 = {1, 3, 2, 6}, h1 = {2, 4, 1, 5}.
  // H_orig = 3, per prompt a - H_orig = {-1, +1}: SE_H_orig^2 = 2 / (2 * 1) = 1.
  // H_upd = (2 + 4 + 2) / 4 = 2, mean weight per prompt 2:
  //   psi = {(0 + 2) / 2, (2 (-1) + 0) / 2} = {1, -1}: SE_H_upd = 1;
  //   psi - a = {2, -2}: SE_deltaH_true^2 = 8 / 2 = 4.
  const EntropyEstimates e = weighted_entropies({1, 1, 2, 0}, {1, 3, 2, 6}, {2, 4, 1, 5}, {1, 1, 1, 1}, 2);
  CHECK(e.H_orig == 3.0);
  CHECK(e.H_upd == 2.0);
  CHECK(e.SE_H_orig == 1.0);
  CHECK(e.SE_H_upd == 1.0);
  CHECK(e.SE_deltaH_true == 2.0);
  CHECK_THROWS_WITH(weighted_entropies({1, 1, 1}, {1, 1, 1}, {1, 1, 1}, {1, 1, 1}, 2),
                    Contains("weighted_entropies: 3 sequences are not whole prompts of G = 2"));
  CHECK_THROWS_WITH(weighted_entropies({1, 1}, {1, 1}, {1, 1}, {1}, 1), Contains("sizes w 2 / h0 2 / h1 2 / L 1"));
  // Rao-Blackwellised terms come before and after, or not at all.
  const std::vector<double> S = {-1, -2}, H = {1, 2};
  CHECK_THROWS_WITH(importance_sampled_entropies(S, S, {1, 1}, ISEstimator::snis, 1.0, 1, &H, nullptr),
                    Contains("before and after"));
  CHECK_FALSE(importance_sampled_entropies(S, S, {1, 1}, ISEstimator::snis, 1.0).rao_blackwell);
}
