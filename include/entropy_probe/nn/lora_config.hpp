// PEFT LoRA settings shared by the model families (adapter_config.json) and
// the per-module decisions PEFT derives from them: which modules get an
// adapter (with which r and scale), which modules are trained whole
// (modules_to_save) and which biases are trained (bias). Module paths are the
// base model's module names as PEFT sees them (named_modules() of the
// transformers model, e.g. "model.layers.1.self_attn.q_proj",
// "transformer.h.0.mlp.c_fc", "lm_head"), without "base_model.model.".
// The rules follow peft 0.17-0.21 (check_target_module_exists,
// get_pattern_key, _set_trainable); docs/checkpoints.md has the table.
// Python regular expressions are evaluated as ECMAScript (std::regex), which
// agrees on the syntax adapter configs use; io/hf/config.hpp compiles every
// pattern up front so a pattern std::regex cannot read is an input error.
#pragma once

#include "entropy_probe/core/config.hpp"
#include "entropy_probe/core/error.hpp"

#include <algorithm>
#include <cmath>
#include <optional>
#include <regex>
#include <string>
#include <utility>
#include <vector>

namespace entropy_probe::nn {

// LoRA scale: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA.
inline double lora_scale(double alpha, index_t r, bool use_rslora) {
  return use_rslora ? alpha / std::sqrt(static_cast<double>(r)) : alpha / static_cast<double>(r);
}

// The adapter of one module: rank and the scale applied to B A x.
struct AdapterSpec {
  index_t r = 0;
  double scale = 0;
};

enum class LoraBias { none, all, lora_only };

namespace lora_detail {
inline bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
// `key` equals `name` or ends with "." + name (PEFT's list rule).
inline bool names_module(const std::string& key, const std::string& name) {
  return key == name || ends_with(key, "." + name);
}
inline bool full_match(const std::string& pattern, const std::string& s) {
  return std::regex_match(s, std::regex(pattern, std::regex::ECMAScript));
}
}  // namespace lora_detail

// A registry name read as PEFT writes it: "base_model.model." + module path
// + (".base_layer" | ".lora_A" | ".lora_B" | ".original_module") + "." + leaf.
struct PeftName {
  std::string module;     // the module path PEFT's rules see
  std::string leaf;       // "weight", "bias"
  bool lora = false;      // a lora_A / lora_B tensor
  bool adapted = false;   // the frozen base of an adapted module (".base_layer.")
  bool original = false;  // the frozen original of a module PEFT copied
};

inline const std::string kPeftPrefix = "base_model.model.";

inline PeftName parse_peft_name(std::string name) {
  PeftName n;
  if (name.rfind(kPeftPrefix, 0) == 0) name.erase(0, kPeftPrefix.size());
  const auto dot = name.rfind('.');
  n.leaf = dot == std::string::npos ? name : name.substr(dot + 1);
  n.module = dot == std::string::npos ? std::string() : name.substr(0, dot);
  auto strip = [&](const char* part) {
    if (!lora_detail::ends_with(n.module, part)) return false;
    n.module.resize(n.module.size() - std::string(part).size());
    return true;
  };
  n.lora = strip(".lora_A") || strip(".lora_B");
  n.adapted = strip(".base_layer");
  n.original = strip(".original_module");
  return n;
}

struct LoraConfig {
  index_t r = 8;
  double lora_alpha = 16;
  bool use_rslora = false;
  // Names, suffixes or full module paths (list), or one regular expression
  // matched against the whole path (target_regex, set instead of the list).
  std::vector<std::string> target_modules;
  std::optional<std::string> target_regex;
  std::vector<std::string> exclude_modules;  // list rule as target_modules
  std::optional<std::string> exclude_regex;
  // Layer indices (empty: every layer) and the module-list names that
  // precede the index ("layers", "h"; empty: PEFT's default rule).
  std::vector<index_t> layers_to_transform;
  std::vector<std::string> layers_pattern;
  // Per-module r and lora_alpha: pattern (a regex for the end of the path,
  // after a dot) -> value. A module matched by two patterns with different
  // values is refused when the config is read (PEFT takes the first in file
  // order, which JSON objects here do not keep).
  std::vector<std::pair<std::string, index_t>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
  std::vector<std::string> modules_to_save;  // trained whole; PEFT's suffix rule (no dot)
  LoraBias bias = LoraBias::none;
  bool init_lora_b_zero = true;  // PEFT's default; tests use random B to avoid zero gradients

  // The layer index PEFT reads from a module path, if any.
  std::optional<index_t> layer_index(const std::string& path) const {
    std::smatch m;
    auto search = [&](const std::string& re) {
      return std::regex_search(path, m, std::regex(re, std::regex::ECMAScript), std::regex_constants::match_continuous);
    };
    bool found = false;
    if (layers_pattern.empty()) {
      found = search(R"(.*?\.[^.]*\.(\d+)\.)");  // the first numbered segment
    } else {
      for (const auto& p : layers_pattern) {
        found = search("(?:.*?\\.)?" + p + R"(\.(\d+)\.)");
        if (found) break;
      }
    }
    if (!found) return std::nullopt;
    return static_cast<index_t>(std::stoll(m[1].str()));
  }

  // Whether PEFT gives the module at `path` a LoRA adapter (ignoring whether
  // the module is a kind LoRA can adapt).
  bool targets(const std::string& path) const {
    using namespace lora_detail;
    if (exclude_regex ? full_match(*exclude_regex, path)
                      : std::any_of(exclude_modules.begin(), exclude_modules.end(),
                                    [&](const std::string& e) { return names_module(path, e); }))
      return false;
    // Adapters never sit inside a modules_to_save module.
    for (const auto& m : modules_to_save)
      if (full_match("(|.*\\.)" + m + "(|\\..*)", path)) return false;
    if (target_regex) return full_match(*target_regex, path);
    if (std::find(target_modules.begin(), target_modules.end(), path) != target_modules.end()) return true;
    const bool found = std::any_of(target_modules.begin(), target_modules.end(),
                                   [&](const std::string& t) { return ends_with(path, "." + t); });
    if (!found || layers_to_transform.empty()) return found;
    const auto layer = layer_index(path);
    return layer &&
           std::find(layers_to_transform.begin(), layers_to_transform.end(), *layer) != layers_to_transform.end();
  }

  // The patterns of `patterns` that match `path` (get_pattern_key's rule).
  template <class V>
  static std::vector<const std::pair<std::string, V>*> pattern_hits(
      const std::vector<std::pair<std::string, V>>& patterns, const std::string& path) {
    std::vector<const std::pair<std::string, V>*> hits;
    for (const auto& p : patterns)
      if (lora_detail::full_match("(.*\\.)?(" + p.first + ")", path)) hits.push_back(&p);
    return hits;
  }

  // The adapter PEFT puts on the linear module at `path`: r and alpha from
  // the first matching rank_pattern / alpha_pattern entry, else r and
  // lora_alpha; nullopt when the module is not targeted.
  std::optional<AdapterSpec> adapter_for(const std::string& path) const {
    if (!targets(path)) return std::nullopt;
    const auto rh = pattern_hits(rank_pattern, path);
    const auto ah = pattern_hits(alpha_pattern, path);
    const index_t rr = rh.empty() ? r : rh.front()->second;
    const double alpha = ah.empty() ? lora_alpha : ah.front()->second;
    return AdapterSpec{rr, lora_scale(alpha, rr, use_rslora)};
  }

  // Whether the module at `path` is trained whole (PEFT's _set_trainable:
  // the path ends with the entry, no dot needed, so "norm" also names
  // "model.layers.0.input_layernorm").
  bool saves(const std::string& path) const {
    return std::any_of(modules_to_save.begin(), modules_to_save.end(),
                       [&](const std::string& m) { return lora_detail::ends_with(path, m); });
  }

  // Whether the bias of the module at `path` is trained.
  bool trains_bias(bool module_has_adapter) const {
    return bias == LoraBias::all || (bias == LoraBias::lora_only && module_has_adapter);
  }
};

}  // namespace entropy_probe::nn
