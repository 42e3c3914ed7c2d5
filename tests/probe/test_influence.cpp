// The influence matrix over (E sequence, U sequence) and the true change
// along single update sequences' shares of a direction (docs/math.md (h)).
#include "../support/numeric.hpp"
#include "../support/tiny_models.hpp"

#include <entropy_probe/io/result_json.hpp>
#include <entropy_probe/probe/probe.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>

using namespace entropy_probe;
using namespace ep_test;

namespace {

template <class Model>
ProbeComponents<Model> brute_components(Model& model, const Registry<double>& reg, Communicator& comm) {
  return ProbeComponents<Model>(model, reg, ProbeSettings{Weighting::dr_grpo, 0, 1.0, {}}, comm);
}

// v_{u,g} by hand: the Y gradient of the batch with every other advantage
// zeroed (W_Y[u,g] grad S[u,g]), times the direction's diagonal, over B_U.
template <class Model>
ParamBuffer<double> sequence_direction_by_hand(const ProbeComponents<Model>& c, const TokenBatch& U, index_t u,
                                               index_t g, Direction dir, const AdamState<double>& state,
                                               const AdamWDirection<CpuBackend>& adamw) {
  TokenBatch one = U.select({u});
  for (index_t k = 0; k < U.G; ++k)
    if (k != g) one.advantages[std::size_t(k)] = 0;
  auto v = c.accumulate_sum_Y(one).sum;
  if (dir == Direction::adamw) {
    multiply_param_buffers(v, adamw.gradient_scale);
  } else {
    set_log_sink([](LogLevel, std::string_view) {});  // the missing state's warning
    AdamPreconditioner<double> P(state);
    P.apply(v);
    set_log_sink({});
  }
  scale_param_buffer(v, 1.0 / double(U.B));
  return v;
}

}  // namespace

namespace {

// The matrix of `model` on E (3 x 2 sequences) and U (3 x 3) against brute
// force, both directions; `stateless` names a parameter without Adam state.
template <class Model>
void check_influence_matrix(Model& model, const std::string& family, const std::string& stateless) {
  const index_t vocab = model.vocab_size();
  const TokenBatch E = random_batch(3, 2, 8, vocab, 63);
  const TokenBatch U = random_batch(3, 3, 8, vocab, 64);
  const double eta = 1e-2;
  for (Direction dir : {Direction::adamw, Direction::precond_sgd}) {
    CAPTURE(family, to_string(dir));
    ProbeConfig cfg;
    cfg.learning_rate = eta;
    cfg.variance = VarianceMode::none;
    cfg.mb_size = 2;
    cfg.influence_matrix = true;  // implies influence
    cfg.directions = dir == Direction::adamw ? std::vector{Direction::precond_sgd, Direction::adamw}
                                             : std::vector{Direction::precond_sgd};
    OfflineEntropyProbe probe(model, cfg);
    const auto& reg = probe.registry();
    const AdamState<double> state = uneven_adam_state(reg, 61, 3, stateless);
    REQUIRE(state.missing_count() == 1);
    set_log_sink([](LogLevel, std::string_view) {});
    const ProbeResult r = probe.run(E, U, state);
    set_log_sink({});
    REQUIRE(r.influence_matrix);
    const InfluenceMatrix& m = *r.influence_matrix;
    REQUIRE(m.direction == dir);
    REQUIRE(r.influence_direction == dir);
    REQUIRE(m.rows.size() == 6);
    REQUIRE(m.columns.size() == 9);
    REQUIRE(m.values.size() == 54);
    CHECK(m.momentum.size() == (dir == Direction::adamw ? 6u : 0u));
    const DirectionResult& dr = r.directions.back();

    // Brute force in double: each E sequence's grad S by a backward pass of
    // its own over the whole E batch (one-hot cotangent), W_X from that
    // batch's S, each U sequence's v_{u,g} by its own Y backward pass, and
    // explicit dots.
    SingleProcess comm;
    auto c = brute_components(model, reg, comm);
    const auto sumY = c.accumulate_sum_Y(U);
    const auto adamw = adamw_direction(reg, state, sumY.sum, sumY.count);
    std::vector<ParamBuffer<double>> v;
    for (index_t u = 0; u < U.B; ++u)
      for (index_t g = 0; g < U.G; ++g) v.push_back(sequence_direction_by_hand(c, U, u, g, dir, state, adamw));
    double worst_entry = 0, worst_momentum = 0;
    for (index_t i = 0; i < E.rows(); ++i) {
      CAPTURE(i);
      CHECK(m.rows[std::size_t(i)].prompt == i / E.G);
      CHECK(m.rows[std::size_t(i)].completion == i % E.G);
      Tape<double> tape;
      Var S = record_sequence_logprobs(tape, model, E, 1.0);
      const auto s_values = ProbeComponents<Model>::to_double(tape.value(S));
      const double w_x = x_loss_weights(E, s_values, Weighting::dr_grpo)[std::size_t(i)];
      std::vector<double> one_hot(std::size_t(E.rows()), 0.0);
      one_hot[std::size_t(i)] = 1;
      reg.zero_grad();
      tape.backward(S, ProbeComponents<Model>::from_double(one_hot));
      auto x = zeros_like_params<double>(reg);
      add_into_param_buffer(x, reg, w_x / double(E.B));  // x_i = W_X grad S_i / B_E
      reg.zero_grad();
      for (std::size_t j = 0; j < v.size(); ++j) {
        const double brute = eta * dot_param_buffers(x, v[j]);
        CAPTURE(j, m.at(std::size_t(i), j), brute);
        CHECK(rel_diff(m.at(std::size_t(i), j), brute) < 1e-12);
        worst_entry = std::max(worst_entry, rel_diff(m.at(std::size_t(i), j), brute));
      }
      if (dir == Direction::adamw) {
        const double mom = eta * dot_param_buffers(x, adamw.momentum), dec = eta * dot_param_buffers(x, adamw.decay);
        CHECK(rel_diff(m.momentum[std::size_t(i)], mom) < 1e-12);
        CHECK(rel_diff(m.decay[std::size_t(i)], dec) < 1e-12);
        worst_momentum = std::max(
            {worst_momentum, rel_diff(m.momentum[std::size_t(i)], mom), rel_diff(m.decay[std::size_t(i)], dec)});
      }
    }

    // Sums over rows are the per-sequence influences; everything with the
    // shares is deltaH1.
    double worst_column = 0, total = 0, momentum = 0, decay = 0;
    for (std::size_t j = 0; j < m.columns.size(); ++j) {
      double column = 0;
      for (std::size_t i = 0; i < m.rows.size(); ++i) column += m.at(i, j);
      CAPTURE(j, column, r.influence[j].influence);
      CHECK(m.columns[j].prompt == r.influence[j].prompt);
      CHECK(m.columns[j].completion == r.influence[j].completion);
      CHECK(rel_diff(column, r.influence[j].influence) < 1e-12);
      worst_column = std::max(worst_column, rel_diff(column, r.influence[j].influence));
      total += column;
    }
    for (double x : m.momentum) momentum += x;
    for (double x : m.decay) decay += x;
    if (dir == Direction::adamw) {
      CHECK(rel_diff(momentum, *dr.momentum_share) < 1e-12);
      CHECK(rel_diff(decay, *dr.decay_share) < 1e-12);
    }
    const double all = total + momentum + decay;
    CAPTURE(all, dr.deltaH1);
    CHECK(rel_diff(all, dr.deltaH1) < 1e-12);
    std::printf(
        "influence matrix %s %s: entries vs brute force %.3e, momentum/decay rows %.3e, column sums vs influences "
        "%.3e, total vs deltaH1 %.3e\n",
        family.c_str(), to_string(dir), worst_entry, worst_momentum, worst_column, rel_diff(all, dr.deltaH1));

    const nlohmann::json j = to_json(r);
    const auto& jm = j["influence_matrix"];
    CHECK(jm["direction"] == to_string(dir));
    REQUIRE(jm["values"].size() == 6);
    REQUIRE(jm["values"][4].size() == 9);
    CHECK(jm["values"][4][7] == m.at(4, 7));
    CHECK(jm["rows"][5] == nlohmann::json{{"prompt", 2}, {"completion", 1}});
    CHECK(jm["columns"][7] == nlohmann::json{{"prompt", 2}, {"completion", 1}});
    CHECK(jm.contains("momentum") == (dir == Direction::adamw));
    CHECK(j["config"]["influence_matrix"] == true);

    const auto csv = (std::filesystem::temp_directory_path() / "ep_influence_matrix.csv").string();
    write_influence_matrix_csv(r, csv);
    std::ifstream in(csv);
    std::string header, first;
    std::getline(in, header);
    std::getline(in, first);
    CHECK(header.rfind("prompt,completion,u0:g0,u0:g1,u0:g2,u1:g0,", 0) == 0);
    CHECK((header.find(",momentum,decay") != std::string::npos) == (dir == Direction::adamw));
    CHECK(first.rfind(fmt::format("0,0,{:.17g},", m.at(0, 0)), 0) == 0);
    std::filesystem::remove(csv);
  }
}

}  // namespace

TEST_CASE("influence matrix: entries match brute force, column sums are the influences, the total is deltaH1",
          "[probe][influence]") {
  auto gpt2 = tiny_gpt2<double>(62, /*lm_head=*/true);
  check_influence_matrix(gpt2, "gpt2", "h.1.mlp.c_fc.lora_A");
  nn::LoraConfig lora = tiny_lora();
  lora.target_modules = {"q_proj", "v_proj", "up_proj", "down_proj"};
  nn::Qwen2ForCausalLM<double> qwen2(tiny_qwen2_config(/*tie=*/false), lora, 69);
  check_influence_matrix(qwen2, "qwen2", "layers.1.mlp.up_proj.lora_A");
}

TEST_CASE("influence matrix: refused by name when too large", "[probe][influence]") {
  auto model = tiny_gpt2<double>(65);
  ProbeConfig cfg;
  cfg.learning_rate = 1e-2;
  cfg.influence_matrix = true;
  std::map<std::string, int> phases;
  cfg.progress = [&](std::string_view phase, index_t, index_t) { ++phases[std::string(phase)]; };
  OfflineEntropyProbe probe(model, cfg);
  // 4000 x 2600 sequences: over 1e7 entries, refused before any phase runs.
  const TokenBatch E = random_batch(100, 40, 6, 11, 66), U = random_batch(100, 26, 6, 11, 67);
  CHECK_THROWS_WITH(probe.run(E, U, random_adam_state(probe.registry(), 68)),
                    Catch::Contains("influence_matrix (--influence-matrix) of 4000 E x 2600 U sequences") &&
                        Catch::Contains("over the limit of 1e+07"));
  CHECK(phases.empty());
}

TEST_CASE("influence truth: each is a ground truth along the sequence's share, from one baseline",
          "[probe][influence][lr_sweep]") {
  auto model = tiny_gpt2<double>(70, /*lm_head=*/true);
  const TokenBatch E = random_batch(4, 2, 8, 11, 71), U = random_batch(3, 2, 8, 11, 72);
  const double eta = 3e-2;
  for (Direction dir : {Direction::adamw, Direction::precond_sgd}) {
    CAPTURE(to_string(dir));
    std::map<std::string, int> finished;
    ProbeConfig cfg;
    cfg.learning_rate = eta;
    cfg.variance = VarianceMode::none;
    cfg.mb_size = 0;  // one microbatch per phase: one report per forward over E
    cfg.directions = {dir};
    cfg.ground_truth = step_kind(dir);
    cfg.lr_sweep = {1e-2};
    cfg.influence_truth.largest = 2;
    cfg.influence_truth.sequences = {{2, 1}, {0, 0}};
    cfg.progress = [&](std::string_view phase, index_t done, index_t total) {
      if (done == total) ++finished[std::string(phase)];
    };
    OfflineEntropyProbe probe(model, cfg);
    const auto& reg = probe.registry();
    const AdamState<double> state = uneven_adam_state(reg, 61, 3);
    set_log_sink([](LogLevel, std::string_view) {});
    const ProbeResult r = probe.run(E, U, state);
    set_log_sink({});
    REQUIRE(r.influence_direction == dir);  // influence_truth implies influence
    REQUIRE(r.influence.size() == 6);

    // The chosen: the two largest |influence| and the two listed.
    std::vector<std::size_t> by_size(6);
    for (std::size_t k = 0; k < 6; ++k) by_size[k] = k;
    std::sort(by_size.begin(), by_size.end(), [&](std::size_t a, std::size_t b) {
      return std::abs(r.influence[a].influence) > std::abs(r.influence[b].influence);
    });
    std::vector<bool> want(6, false);
    want[by_size[0]] = want[by_size[1]] = want[5] = want[0] = true;
    const auto n_chosen = std::count(want.begin(), want.end(), true);

    // One baseline forward over E for the configured truth, the sweep and
    // every single-sequence truth; one step forward each.
    CHECK(finished["ground_truth_baseline"] == 1);
    CHECK(finished["ground_truth"] == 2);
    CHECK(finished["influence_truth"] == n_chosen);

    SingleProcess comm;
    auto c = brute_components(model, reg, comm);
    const auto sumY = c.accumulate_sum_Y(U);
    const auto adamw = adamw_direction(reg, state, sumY.sum, sumY.count);
    auto close = [](double a, double b, double scale) { return std::abs(a - b) <= 1e-12 * std::abs(scale); };
    double worst = 0;
    for (std::size_t k = 0; k < 6; ++k) {
      const SequenceInfluence& s = r.influence[k];
      CAPTURE(s.prompt, s.completion);
      REQUIRE(s.truth.has_value() == want[k]);
      if (!want[k]) continue;
      // A ground truth run of its own (own baseline) along v_{u,g} built by hand.
      const auto v = sequence_direction_by_hand(c, U, s.prompt, s.completion, dir, state, adamw);
      const GroundTruth t = ground_truth_along(c, E, v, eta, cfg.is, cfg.clip_c);
      REQUIRE(t.rao_blackwell);
      REQUIRE(s.truth->rao_blackwell);
      REQUIRE(std::abs(t.deltaH_true) > 0);
      for (const auto& [got, ref] :
           {std::pair<EntropyEstimates, EntropyEstimates>{*s.truth, t},
            std::pair<EntropyEstimates, EntropyEstimates>{*s.truth->rao_blackwell, *t.rao_blackwell}}) {
        CHECK(close(got.H_orig, ref.H_orig, ref.H_orig));
        CHECK(close(got.H_upd, ref.H_upd, ref.H_orig));
        CHECK(close(got.deltaH_true, ref.deltaH_true, ref.deltaH_true));
        // The per-token change is a difference of two ratios near H_orig_tok
        // that cancel to 1e-5 of it here: its rounding is on that scale (as
        // in the lr sweep test).
        CHECK(close(got.deltaH_true_tok, ref.deltaH_true_tok, ref.H_orig_tok));
        CHECK(close(got.SE_deltaH_true, ref.SE_deltaH_true, ref.SE_deltaH_true));
        worst = std::max(
            {worst, rel_diff(got.deltaH_true, ref.deltaH_true), rel_diff(got.SE_deltaH_true, ref.SE_deltaH_true)});
      }
      CHECK(close(s.truth->ESS, t.ESS, t.ESS));
      // The step is v_{u,g} alone: its first order is the influence (per
      // token), its truth is not the whole direction's.
      CHECK(s.truth->deltaH_true != r.truth->deltaH_true);
    }
    std::printf("influence truth %s: %ld sequences, worst vs separate ground truth runs %.3e\n", to_string(dir),
                static_cast<long>(n_chosen), worst);

    const nlohmann::json j = to_json(r);
    CHECK(j["influence"][5]["truth"]["deltaH"] == r.influence[5].truth->deltaH_true);
    CHECK(j["influence"][5]["truth"]["SE"] == r.influence[5].truth->SE_deltaH_true);
    CHECK(j["influence"][5]["truth"]["deltaH_tok"] == r.influence[5].truth->deltaH_true_tok);
    CHECK(j["config"]["influence_truth"]["largest"] == 2);
    CHECK(j["config"]["influence_truth"]["sequences"] == nlohmann::json::array({{2, 1}, {0, 0}}));
    for (std::size_t k = 0; k < 6; ++k) CHECK(j["influence"][k].contains("truth") == want[k]);
  }
}

TEST_CASE("influence truth: a bad selection is refused by name before any work", "[probe][influence]") {
  auto model = tiny_gpt2<double>(73);
  const TokenBatch E = random_batch(2, 2, 8, 11, 74), U = random_batch(3, 2, 8, 11, 75);
  auto refused = [&](InfluenceTruth t, const std::string& what) {
    ProbeConfig cfg;
    cfg.learning_rate = 1e-2;
    cfg.influence_truth = std::move(t);
    std::map<std::string, int> phases;
    cfg.progress = [&](std::string_view phase, index_t, index_t) { ++phases[std::string(phase)]; };
    OfflineEntropyProbe probe(model, cfg);
    CHECK_THROWS_WITH(probe.run(E, U, random_adam_state(probe.registry(), 76)), Catch::Contains(what));
    CHECK(phases.empty());
  };
  refused({7, {}}, "influence_truth.largest (--influence-truth) = 7 must be between 0 and the U batch's 6 sequences");
  refused({-1, {}}, "influence_truth.largest (--influence-truth) = -1");
  refused({0, {{3, 0}}},
          "influence_truth.sequences (--influence-truth-seq) 3:0 is outside the U batch of 3 prompts x 2");
  refused({0, {{0, 2}}}, "(--influence-truth-seq) 0:2 is outside");
  refused({1, {{1, 1}, {0, 1}, {1, 1}}}, "(--influence-truth-seq) lists 1:1 twice");
}
