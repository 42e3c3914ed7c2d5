// The probe result as JSON with the keys of DESIGN.md section 5. Keys of
// phases that did not run are absent.
#pragma once

#include "entropy_probe/probe/probe.hpp"

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
    j["H_orig"] = t.H_orig;
    j["H_upd"] = t.H_upd;
    j["deltaH_true"] = t.deltaH_true;
    j["H_orig_tok"] = t.H_orig_tok;
    j["H_upd_tok"] = t.H_upd_tok;
    j["deltaH_true_tok"] = t.deltaH_true_tok;
    j["ESS"] = t.ESS;
  }
  j["preconditioner_missing"] = r.preconditioner_missing;
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
  j["config"] = cfg;
  return j;
}

inline void write_json(const ProbeResult& r, const std::string& path) {
  std::ofstream out(path);
  if (!out) fail<InputError>("cannot open '{}' for writing", path);
  out << to_json(r).dump(2) << "\n";
  if (!out) fail<InputError>("writing '{}' failed", path);
}

}  // namespace entropy_probe
