// The probe result as JSON with the keys of docs/checkpoints.md ("The result"). Keys of
// phases that did not run are absent.
#pragma once

#include "entropy_probe/probe/probe.hpp"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <fstream>
#include <string>

namespace entropy_probe {

inline nlohmann::json to_json(const ProbeResult& r) {
  nlohmann::json j;
  j["bars_dot"] = r.bars_dot;
  j["deltaH1"] = r.deltaH1;
  j["learning_rate"] = r.learning_rate;
  j["B_E"] = r.B_E;
  j["B_U"] = r.B_U;
  j["mu_X_norm"] = r.mu_X_norm;
  j["mu_Y_norm"] = r.mu_Y_norm;
  if (r.conditional) {
    j["SE_conditional"] = r.conditional->se_conditional;
    j["s_values"] = r.conditional->s_values;
  }
  if (r.full) {
    j["V_X"] = r.full->V_X;
    j["V_Y"] = r.full->V_Y;
    j["SE_deltaH1"] = r.full->se_deltaH1;
  }
  if (r.truth) {
    const GroundTruth& t = *r.truth;
    auto put = [](nlohmann::json& o, const EntropyEstimates& e) {
      o["H_orig"] = e.H_orig;
      o["H_upd"] = e.H_upd;
      o["deltaH_true"] = e.deltaH_true;
      o["H_orig_tok"] = e.H_orig_tok;
      o["H_upd_tok"] = e.H_upd_tok;
      o["deltaH_true_tok"] = e.deltaH_true_tok;
      o["SE_H_orig"] = e.SE_H_orig;
      o["SE_H_upd"] = e.SE_H_upd;
      o["SE_deltaH_true"] = e.SE_deltaH_true;
    };
    put(j, t);
    j["ESS"] = t.ESS;
    if (t.rao_blackwell) put(j["rao_blackwell"], *t.rao_blackwell);
  }
  if (!r.directions.empty()) {
    nlohmann::json dirs = nlohmann::json::object();
    for (const DirectionResult& d : r.directions) {
      nlohmann::json o{{"deltaH1", d.deltaH1}, {"bars_dot", d.bars_dot}};
      if (d.momentum_share) o["momentum_share"] = *d.momentum_share;
      if (d.decay_share) o["decay_share"] = *d.decay_share;
      // The ground truth beside the prediction it measures: the adam step is
      // the adamw direction's, precond_sgd's is its own.
      if (r.truth && r.config.ground_truth &&
          (*r.config.ground_truth == StepKind::adam) == (d.direction == Direction::adamw)) {
        o["deltaH_true"] = r.truth->deltaH_true;
        o["deltaH_true_tok"] = r.truth->deltaH_true_tok;
        o["ESS"] = r.truth->ESS;
      }
      dirs[to_string(d.direction)] = o;
    }
    j["directions"] = dirs;
  }
  if (r.influence_direction) {
    nlohmann::json inf = nlohmann::json::array();
    for (const SequenceInfluence& s : r.influence) {
      inf.push_back({{"prompt", s.prompt},
                     {"completion", s.completion},
                     {"advantage", s.advantage},
                     {"length", s.length},
                     {"influence", s.influence}});
      if (s.reward) inf.back()["reward"] = *s.reward;
      if (s.truth) {
        // deltaH and SE on the per-sequence scale of deltaH_true; deltaH_tok
        // on the per-token scale of the influence.
        const GroundTruth& t = *s.truth;
        nlohmann::json o{
            {"deltaH", t.deltaH_true}, {"SE", t.SE_deltaH_true}, {"deltaH_tok", t.deltaH_true_tok}, {"ESS", t.ESS}};
        if (t.rao_blackwell)
          o["rao_blackwell"] = {{"deltaH", t.rao_blackwell->deltaH_true},
                                {"SE", t.rao_blackwell->SE_deltaH_true},
                                {"deltaH_tok", t.rao_blackwell->deltaH_true_tok}};
        inf.back()["truth"] = o;
      }
    }
    j["influence"] = inf;
    j["influence_direction"] = to_string(*r.influence_direction);
  }
  if (r.control_variates) {
    const ControlVariates& cv = *r.control_variates;
    j["control_variates"] = {{"features", cv.features},           {"deltaH1", cv.deltaH1},   {"SE", cv.SE},
                             {"deltaH1_plain", cv.deltaH1_plain}, {"SE_plain", cv.SE_plain}, {"beta", cv.beta}};
  }
  if (r.influence_matrix) {
    const InfluenceMatrix& m = *r.influence_matrix;
    auto refs = [](const std::vector<SequenceRef>& v) {
      nlohmann::json a = nlohmann::json::array();
      for (const SequenceRef& s : v) a.push_back({{"prompt", s.prompt}, {"completion", s.completion}});
      return a;
    };
    nlohmann::json values = nlohmann::json::array();
    for (std::size_t i = 0; i < m.rows.size(); ++i)
      values.push_back(std::vector<double>(m.values.begin() + static_cast<std::ptrdiff_t>(i * m.columns.size()),
                                           m.values.begin() + static_cast<std::ptrdiff_t>((i + 1) * m.columns.size())));
    nlohmann::json o{{"direction", to_string(m.direction)},
                     {"rows", refs(m.rows)},
                     {"columns", refs(m.columns)},
                     {"values", values}};
    if (!m.momentum.empty()) o["momentum"] = m.momentum;
    if (!m.decay.empty()) o["decay"] = m.decay;
    j["influence_matrix"] = o;
  }
  if (!r.lr_sweep.empty()) {
    // Per point: deltaH1 is on the per-token scale of deltaH_true_tok (docs/math.md (e)).
    nlohmann::json sweep = nlohmann::json::array();
    for (const SweepPoint& p : r.lr_sweep) {
      const GroundTruth& t = p.truth;
      nlohmann::json o{{"direction", to_string(p.direction)},
                       {"learning_rate", p.learning_rate},
                       {"deltaH1", p.deltaH1},
                       {"deltaH_true", t.deltaH_true},
                       {"deltaH_true_tok", t.deltaH_true_tok},
                       {"SE_deltaH_true", t.SE_deltaH_true},
                       {"ESS", t.ESS}};
      if (t.rao_blackwell)
        o["rao_blackwell"] = {{"deltaH_true", t.rao_blackwell->deltaH_true},
                              {"deltaH_true_tok", t.rao_blackwell->deltaH_true_tok},
                              {"SE_deltaH_true", t.rao_blackwell->SE_deltaH_true}};
      sweep.push_back(o);
    }
    j["lr_sweep"] = sweep;
  }
  j["preconditioner_missing"] = r.preconditioner_missing;
  const ZeroSecondMoment& z = r.zero_second_moment;
  j["zero_second_moment"] = {
      {"lora", z.lora}, {"all", z.all}, {"lora_share", z.lora_share}, {"all_share", z.all_share}};
  j["registry"] = {{"trainable_tensors", r.registry.trainable_tensors},
                   {"lora_tensors", r.registry.lora_tensors},
                   {"trainable_numel", r.registry.trainable_numel},
                   {"names", r.registry.names}};
  j["timing"] = r.timing;
  j["microbatch"] = r.microbatch;
  const ProbeConfig& c = r.config;
  nlohmann::json cfg;
  cfg["learning_rate"] = r.learning_rate;
  cfg["learning_rate_source"] = r.learning_rate_source;
  cfg["weighting"] = to_string(c.weighting);
  cfg["mb_size"] = c.mb_size ? nlohmann::json(*c.mb_size) : nlohmann::json("auto");
  cfg["memory_budget"] = c.memory_budget ? nlohmann::json(*c.memory_budget) : nlohmann::json("default");
  cfg["temperature"] = c.temperature;
  cfg["variance"] = to_string(c.variance);
  cfg["alpha_route"] = to_string(c.alpha_route);
  cfg["ground_truth"] = c.ground_truth ? to_string(*c.ground_truth) : "none";
  cfg["is"] = to_string(c.is);
  cfg["clip_c"] = c.clip_c;
  cfg["directions"] = nlohmann::json::array();
  for (Direction d : c.directions) cfg["directions"].push_back(to_string(d));
  cfg["influence"] = c.influence;
  cfg["influence_matrix"] = c.influence_matrix;
  nlohmann::json picked = nlohmann::json::array();
  for (const SequenceRef& s : c.influence_truth.sequences) picked.push_back({s.prompt, s.completion});
  cfg["influence_truth"] = {{"largest", c.influence_truth.largest}, {"sequences", picked}};
  cfg["lr_sweep"] = c.lr_sweep;
  cfg["control_variates"] = c.control_variates;
  j["config"] = cfg;
  return j;
}

inline void write_json(const ProbeResult& r, const std::string& path) {
  std::ofstream out(path);
  if (!out) fail<InputError>("cannot open '{}' for writing", path);
  out << to_json(r).dump(2) << "\n";
  if (!out) fail<InputError>("writing '{}' failed", path);
}

// The per-sequence influences as CSV, one row per update sequence:
// prompt,completion,advantage,reward,length,influence (reward empty when the
// U batch has none), at full double precision.
inline void write_influence_csv(const ProbeResult& r, const std::string& path) {
  if (!r.influence_direction) fail<UsageError>("write_influence_csv: the result has no influences");
  std::ofstream out(path);
  if (!out) fail<InputError>("cannot open '{}' for writing", path);
  out << "prompt,completion,advantage,reward,length,influence\n";
  for (const SequenceInfluence& s : r.influence)
    out << fmt::format("{},{},{:.17g},{},{},{:.17g}\n", s.prompt, s.completion, s.advantage,
                       s.reward ? fmt::format("{:.17g}", *s.reward) : std::string(), s.length, s.influence);
  if (!out) fail<InputError>("writing '{}' failed", path);
}

// The influence matrix as CSV: one row per E sequence, `prompt,completion`
// then one column per U sequence headed `u<prompt>:g<completion>`, then (adamw)
// `momentum,decay`; full double precision.
inline void write_influence_matrix_csv(const ProbeResult& r, const std::string& path) {
  if (!r.influence_matrix) fail<UsageError>("write_influence_matrix_csv: the result has no influence matrix");
  const InfluenceMatrix& m = *r.influence_matrix;
  std::ofstream out(path);
  if (!out) fail<InputError>("cannot open '{}' for writing", path);
  out << "prompt,completion";
  for (const SequenceRef& c : m.columns) out << fmt::format(",u{}:g{}", c.prompt, c.completion);
  out << (m.momentum.empty() ? "\n" : ",momentum,decay\n");
  for (std::size_t i = 0; i < m.rows.size(); ++i) {
    out << m.rows[i].prompt << ',' << m.rows[i].completion;
    for (std::size_t c = 0; c < m.columns.size(); ++c) out << fmt::format(",{:.17g}", m.at(i, c));
    if (!m.momentum.empty()) out << fmt::format(",{:.17g},{:.17g}", m.momentum[i], m.decay[i]);
    out << '\n';
  }
  if (!out) fail<InputError>("writing '{}' failed", path);
}

}  // namespace entropy_probe
