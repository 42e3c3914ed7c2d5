// config.json (gpt2 and the decoder families of nn/families.hpp) and PEFT adapter_config.json parsing
// (docs/checkpoints.md). Settings that change the forward pass and are not
// implemented are rejected by name, never ignored.
#pragma once

#include "entropy_probe/core/error.hpp"
#include "entropy_probe/io/hf/json_fields.hpp"
#include "entropy_probe/nn/families.hpp"
#include "entropy_probe/nn/gpt2.hpp"
#include "entropy_probe/nn/lora_config.hpp"

#include <nlohmann/json.hpp>

#include <fmt/format.h>

#include <cmath>
#include <optional>
#include <regex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace entropy_probe::hf {

namespace detail {

using nlohmann::json;

// transformers' ACT2FN names of the activations this library implements.
inline nn::Activation activation_from_name(const std::string& name, const std::string& path, const char* key) {
  if (name == "gelu_new" || name == "gelu_pytorch_tanh" || name == "gelu_python_tanh") return nn::Activation::gelu_tanh;
  if (name == "gelu" || name == "gelu_python") return nn::Activation::gelu_erf;
  if (name == "relu") return nn::Activation::relu;
  if (name == "silu" || name == "swish") return nn::Activation::silu;
  fail<InputError>(
      "{}: field '{}' = '{}' is not supported (gelu_new, gelu_pytorch_tanh, gelu_python_tanh, gelu, gelu_python, "
      "relu, silu, swish)",
      path, key, name);
}

// A number field of a rope dictionary named `where` (for messages).
inline std::optional<double> rope_number(const json& rp, const std::string& path, const std::string& where,
                                         const char* key) {
  const json* v = find_field(rp, key);
  if (!v) return std::nullopt;
  if (!v->is_number() || !std::isfinite(v->get<double>()))
    fail<InputError>("{}: field '{}.{}' must be a finite number, got {}", path, where, key, v->dump());
  return v->get<double>();
}

// rope_theta and the rope scaling of a decoder config: rope_theta at the top
// level (transformers 4) or inside rope_parameters (transformers 5; also
// rope_scaling in some 4.x configs); the rope type and its parameters from
// rope_parameters or rope_scaling ("rope_type", or "type" in older files).
// Values given twice must agree. Types other than default, linear, dynamic,
// yarn and llama3, a partial_rotary_factor other than 1 and per-layer-type
// rope parameters are refused by name.
inline void read_rope(const json& j, const std::string& path, nn::DecoderConfig& c) {
  std::optional<double> theta;
  if (find_field(j, "rope_theta"))
    theta = positive(get_number(j, path, "rope_theta", std::nullopt), path, "rope_theta");
  if (find_field(j, "partial_rotary_factor") && get_number(j, path, "partial_rotary_factor", std::nullopt) != 1.0)
    fail<InputError>("{}: field 'partial_rotary_factor' = {} is not supported (rotary over the whole head)", path,
                     j["partial_rotary_factor"].dump());
  std::optional<std::string> type;
  std::string type_from;
  const json* scaling = nullptr;  // the dictionary that sets a non-default type
  std::string scaling_key;
  for (const char* key : {"rope_parameters", "rope_scaling"}) {
    const json* rp = find_field(j, key);
    if (!rp) continue;
    if (!rp->is_object()) fail<InputError>("{}: field '{}' must be an object, got {}", path, key, rp->dump());
    for (const char* layer_type : {"full_attention", "sliding_attention"})
      if (rp->contains(layer_type))
        fail<InputError>("{}: field '{}' has per-layer-type entries ('{}'), which are not supported", path, key,
                         layer_type);
    for (const char* type_key : {"rope_type", "type"}) {
      const json* t = find_field(*rp, type_key);
      if (!t) continue;
      if (!t->is_string())
        fail<InputError>("{}: field '{}.{}' must be a string, got {}", path, key, type_key, t->dump());
      const std::string where = std::string(key) + "." + type_key;
      if (type && *type != t->get<std::string>())
        fail<InputError>("{}: field '{}' = \"{}\" and '{}' = \"{}\" disagree", path, type_from, *type, where,
                         t->get<std::string>());
      type = t->get<std::string>();
      type_from = where;
      if (*type != "default") {
        scaling = rp;
        scaling_key = key;
      }
    }
    if (const json* t = find_field(*rp, "rope_theta")) {
      if (!t->is_number() || !(t->get<double>() > 0) || !std::isfinite(t->get<double>()))
        fail<InputError>("{}: field '{}.rope_theta' must be a positive number, got {}", path, key, t->dump());
      if (theta && *theta != t->get<double>())
        fail<InputError>("{}: rope_theta {} and {}.rope_theta {} disagree", path, *theta, key, t->get<double>());
      theta = t->get<double>();
    }
    if (auto prf = rope_number(*rp, path, key, "partial_rotary_factor"); prf && *prf != 1.0)
      fail<InputError>("{}: field '{}.partial_rotary_factor' = {} is not supported (rotary over the whole head)", path,
                       key, *prf);
  }
  if (theta) c.rope_theta = *theta;
  using Type = RopeParameters::Type;
  RopeParameters& r = c.rope_scaling;
  r = RopeParameters{};
  if (!scaling) return;
  const std::string& t = *type;
  if (t == "linear") {
    r.type = Type::linear;
  } else if (t == "dynamic") {
    r.type = Type::dynamic;
  } else if (t == "yarn") {
    r.type = Type::yarn;
  } else if (t == "llama3") {
    r.type = Type::llama3;
  } else {
    fail<InputError>("{}: field '{}' = \"{}\" is not supported (default, linear, dynamic, yarn, llama3)", path,
                     type_from, t);
  }
  const json& rp = *scaling;
  auto number = [&](const char* key) { return rope_number(rp, path, scaling_key, key); };
  auto required = [&](const char* key) {
    const auto v = number(key);
    if (!v) fail<InputError>("{}: missing field '{}.{}' (rope type \"{}\")", path, scaling_key, key, t);
    return *v;
  };
  auto check_positive = [&](double v, const char* key) {
    if (!(v > 0)) fail<InputError>("{}: field '{}.{}' = {} must be positive", path, scaling_key, key, v);
    return v;
  };
  if (r.type == Type::yarn || r.type == Type::llama3) {
    // a top-level original_max_position_embeddings wins (transformers' standardize_rope_params)
    index_t orig = c.max_position_embeddings;
    if (find_field(j, "original_max_position_embeddings"))
      orig = get_int(j, path, "original_max_position_embeddings", std::nullopt, 1);
    else if (auto v = number("original_max_position_embeddings"))
      orig = static_cast<index_t>(check_positive(*v, "original_max_position_embeddings"));
    r.original_max_position_embeddings = orig;
  }
  if (r.type == Type::yarn) {  // factor null: max_position_embeddings / original
    r.factor = number("factor").value_or(static_cast<double>(c.max_position_embeddings) /
                                         static_cast<double>(r.original_max_position_embeddings));
    if (auto v = number("attention_factor")) r.attention_factor = check_positive(*v, "attention_factor");
    // transformers reads `get("beta_fast") or 32`: 0 and null give the default
    if (auto v = number("beta_fast"); v && *v != 0) r.beta_fast = *v;
    if (auto v = number("beta_slow"); v && *v != 0) r.beta_slow = *v;
    r.mscale = number("mscale").value_or(0.0);
    r.mscale_all_dim = number("mscale_all_dim").value_or(0.0);
    if (const json* v = find_field(rp, "truncate")) {
      if (!v->is_boolean())
        fail<InputError>("{}: field '{}.truncate' must be true or false, got {}", path, scaling_key, v->dump());
      r.truncate = v->get<bool>();
    }
  } else {
    r.factor = required("factor");
  }
  check_positive(r.factor, "factor");
  if (r.type == Type::llama3) {
    r.low_freq_factor = required("low_freq_factor");
    r.high_freq_factor = required("high_freq_factor");
  }
}

}  // namespace detail

// ---- config.json and adapter_config.json ---------------------------------------------------

// GPT-2 config.json. Required: vocab_size, n_positions, n_embd, n_layer,
// n_head; the rest default as in transformers' GPT2Config: layer_norm_epsilon
// 1e-5, n_inner null (4 n_embd), activation_function "gelu_new",
// scale_attn_weights true, scale_attn_by_inverse_layer_idx false.
inline nn::Gpt2Config gpt2_config_from_json(const nlohmann::json& j, const std::string& path) {
  using namespace detail;
  require_object(j, path);
  nn::Gpt2Config c;
  c.vocab_size = get_int(j, path, "vocab_size", std::nullopt, 1);
  c.n_positions = get_int(j, path, "n_positions", std::nullopt, 1);
  c.n_embd = get_int(j, path, "n_embd", std::nullopt, 1);
  c.n_layer = get_int(j, path, "n_layer", std::nullopt, 0);
  c.n_head = get_int(j, path, "n_head", std::nullopt, 1);
  c.layer_norm_epsilon = positive(get_number(j, path, "layer_norm_epsilon", 1e-5), path, "layer_norm_epsilon");
  c.n_inner = get_int(j, path, "n_inner", index_t{0}, 1);
  c.activation = activation_from_name(get_string(j, path, "activation_function", false).value_or("gelu_new"), path,
                                      "activation_function");
  c.scale_attn_weights = get_bool(j, path, "scale_attn_weights", true);
  c.scale_attn_by_inverse_layer_idx = get_bool(j, path, "scale_attn_by_inverse_layer_idx", false);
  validate_config(c, path);
  return c;
}

// The config.json of a Llama-style decoder family (nn/families.hpp).
// Required: vocab_size, hidden_size, intermediate_size, num_hidden_layers,
// num_attention_heads; the rest default as in the family's transformers
// config (nn/qwen2.hpp, nn/llama.hpp, ...). Honoured: num_key_value_heads,
// head_dim, max_position_embeddings, rms_norm_eps, hidden_act, rope_theta and
// rope scaling (read_rope), tie_word_embeddings, attention_bias and mlp_bias
// where the family reads them, and the sliding window: Mistral's
// sliding_window on every layer; Qwen2/Qwen3's use_sliding_window with
// max_window_layers, or layer_types. A sliding window is accepted; the model
// refuses a sequence longer than it.
inline nn::DecoderConfig decoder_config_from_json(const nlohmann::json& j, const std::string& path,
                                                  const nn::DecoderFamily& family) {
  using namespace detail;
  require_object(j, path);
  nn::DecoderConfig c = family.defaults();  // num_key_value_heads 0: num_attention_heads (Llama)
  c.vocab_size = get_int(j, path, "vocab_size", std::nullopt, 1);
  c.hidden_size = get_int(j, path, "hidden_size", std::nullopt, 1);
  c.intermediate_size = get_int(j, path, "intermediate_size", std::nullopt, 1);
  c.num_hidden_layers = get_int(j, path, "num_hidden_layers", std::nullopt, 0);
  c.num_attention_heads = get_int(j, path, "num_attention_heads", std::nullopt, 1);
  c.num_key_value_heads = get_int(j, path, "num_key_value_heads",
                                  c.num_key_value_heads > 0 ? c.num_key_value_heads : c.num_attention_heads, 1);
  c.head_dim_override = get_int(j, path, "head_dim", c.head_dim_override, 1);
  c.max_position_embeddings = get_int(j, path, "max_position_embeddings", c.max_position_embeddings, 1);
  c.rms_norm_eps = positive(get_number(j, path, "rms_norm_eps", c.rms_norm_eps), path, "rms_norm_eps");
  c.tie_word_embeddings = get_bool(j, path, "tie_word_embeddings", c.tie_word_embeddings);
  c.hidden_act = activation_from_name(get_string(j, path, "hidden_act", false).value_or("silu"), path, "hidden_act");
  if (family.reads_attention_bias) c.attention_bias = get_bool(j, path, "attention_bias", false);
  if (family.reads_mlp_bias) c.mlp_bias = get_bool(j, path, "mlp_bias", false);
  read_rope(j, path, c);

  using SW = nn::DecoderFamily::SlidingWindow;
  c.sliding_layers.clear();
  if (family.sliding == SW::all_layers) {
    // absent: the family's default window; null: none
    const bool present = j.contains("sliding_window");
    if (!present || find_field(j, "sliding_window")) {
      c.sliding_window = get_int(j, path, "sliding_window", c.sliding_window, 1);
      for (index_t l = 0; l < c.num_hidden_layers; ++l) c.sliding_layers.push_back(l);
    }
  } else if (family.sliding == SW::qwen_layers) {
    // transformers: sliding_window is None unless use_sliding_window; layer_types, when given,
    // name each layer's attention, else layers from max_window_layers on slide
    const bool use = get_bool(j, path, "use_sliding_window", false);
    const bool has_window = j.contains("sliding_window") ? find_field(j, "sliding_window") != nullptr : true;
    if (has_window) c.sliding_window = get_int(j, path, "sliding_window", c.sliding_window, 1);
    const index_t max_window_layers = get_int(j, path, "max_window_layers", index_t{28}, 0);
    if (const json* lt = find_field(j, "layer_types")) {
      if (!lt->is_array() || static_cast<index_t>(lt->size()) != c.num_hidden_layers)
        fail<InputError>("{}: field 'layer_types' must be a list of num_hidden_layers = {} entries, got {}", path,
                         c.num_hidden_layers, lt->dump());
      for (std::size_t l = 0; l < lt->size(); ++l) {
        const json& t = (*lt)[l];
        if (t == "sliding_attention") {
          if (use && has_window) c.sliding_layers.push_back(static_cast<index_t>(l));
        } else if (t != "full_attention") {
          fail<InputError>(
              "{}: field 'layer_types' has {} at index {}, which is not supported (full_attention, "
              "sliding_attention)",
              path, t.dump(), l);
        }
      }
    } else if (use && has_window) {
      for (index_t l = max_window_layers; l < c.num_hidden_layers; ++l) c.sliding_layers.push_back(l);
    }
  }
  validate_config(c, path);
  return c;
}

// Qwen2 config.json (decoder_config_from_json with the Qwen2 family).
inline nn::DecoderConfig qwen2_config_from_json(const nlohmann::json& j, const std::string& path) {
  return decoder_config_from_json(j, path, nn::kQwen2Family);
}

namespace detail {

// A regular expression from `field`, compiled here so that a pattern
// std::regex cannot read is an input error naming it.
inline std::string regex_field(const std::string& pattern, const std::string& path, const std::string& field) {
  try {
    (void)std::regex(pattern, std::regex::ECMAScript);
  } catch (const std::regex_error& e) {
    fail<InputError>("{}: field '{}' = \"{}\" is not a regular expression this reader can evaluate: {}", path, field,
                     pattern, e.what());
  }
  return pattern;
}

// A list of module names (target_modules, exclude_modules) or one regular
// expression, PEFT's two forms.
inline void module_list_or_regex(const json& j, const std::string& path, const char* key,
                                 std::vector<std::string>& list, std::optional<std::string>& regex) {
  const json* v = find_field(j, key);
  if (!v) return;
  if (v->is_string()) {
    regex = regex_field(v->get<std::string>(), path, key);
    return;
  }
  if (!v->is_array())
    fail<InputError>("{}: field '{}' must be a list of module names or a regular expression, got {}", path, key,
                     v->dump());
  for (const auto& t : *v) {
    if (!t.is_string() || t.get<std::string>().empty())
      fail<InputError>("{}: field '{}' has entry {}, expected a module name", path, key, t.dump());
    list.push_back(t.get<std::string>());
  }
}

// rank_pattern / alpha_pattern: an object of pattern -> value.
template <class V>
std::vector<std::pair<std::string, V>> pattern_field(const json& j, const std::string& path, const char* key) {
  std::vector<std::pair<std::string, V>> out;
  const json* v = find_field(j, key);
  if (!v) return out;
  if (!v->is_object()) fail<InputError>("{}: field '{}' must be an object, got {}", path, key, v->dump());
  for (auto it = v->begin(); it != v->end(); ++it) {
    const std::string field = fmt::format("{}.{}", key, it.key());
    regex_field("(.*\\.)?(" + it.key() + ")", path, field);
    const json& x = it.value();
    if constexpr (std::is_same_v<V, index_t>) {
      if (!x.is_number_integer() || x.get<index_t>() < 1)
        fail<InputError>("{}: field '{}' = {} must be an integer rank >= 1", path, field, x.dump());
    } else {
      if (!x.is_number() || !std::isfinite(x.get<double>()))
        fail<InputError>("{}: field '{}' = {} must be a finite number", path, field, x.dump());
    }
    out.emplace_back(it.key(), x.get<V>());
  }
  return out;
}

}  // namespace detail

// PEFT adapter_config.json as peft 0.17-0.21 writes it (docs/checkpoints.md
// has the table): peft_type "LORA", r, lora_alpha, use_rslora,
// target_modules (names, suffixes, full module paths, or a regular
// expression), exclude_modules, layers_to_transform with layers_pattern,
// rank_pattern, alpha_pattern, modules_to_save, bias ("none", "all",
// "lora_only"), fan_in_fan_out (checked, not needed: LoRA tensors are stored
// [r, in] / [out, r] either way). Settings that change the adapted
// computation and are not implemented (DoRA, lora_bias, other LoRA
// variants) are refused by name; fields that do not change the forward pass
// (dropout, init settings, task type, inference_mode, fields added later)
// are accepted. Which modules the settings select is checked against the
// model by the loader (io/hf/weights.hpp).
inline nn::LoraConfig lora_config_from_json(const nlohmann::json& j, const std::string& path) {
  using namespace detail;
  require_object(j, path);
  const std::string peft_type = *get_string(j, path, "peft_type", true);
  if (peft_type != "LORA") fail<InputError>("{}: field 'peft_type' = '{}' is not supported (LORA)", path, peft_type);
  // Variants that change what the adapter computes or where it sits.
  for (const char* key :
       {"use_dora", "lora_bias", "use_qalora", "layer_replication", "target_parameters", "alora_invocation_tokens",
        "trainable_token_indices", "velora_config", "monteclora_config", "use_bdlora", "arrow_config", "kasa_config"})
    if (is_set(j, key))
      fail<InputError>("{}: field '{}' = {} is not supported ({} is not implemented; plain LoRA only)", path, key,
                       j[key].dump(), std::string(key) == "use_dora" ? "DoRA" : "this LoRA variant");
  nn::LoraConfig c;
  c.r = get_int(j, path, "r", std::nullopt, 1);
  c.lora_alpha = get_number(j, path, "lora_alpha", std::nullopt);
  c.use_rslora = get_bool(j, path, "use_rslora", false);
  (void)get_bool(j, path, "fan_in_fan_out", false);
  c.init_lora_b_zero = true;  // irrelevant: the adapter's weights are loaded

  if (!find_field(j, "target_modules")) missing_field(path, "target_modules");
  module_list_or_regex(j, path, "target_modules", c.target_modules, c.target_regex);
  if (!c.target_regex && c.target_modules.empty())
    fail<InputError>("{}: field 'target_modules' = [] selects no module", path);
  module_list_or_regex(j, path, "exclude_modules", c.exclude_modules, c.exclude_regex);

  if (const json* lt = find_field(j, "layers_to_transform")) {
    if (c.target_regex)  // PEFT's LoraConfig refuses this too
      fail<InputError>(
          "{}: field 'layers_to_transform' = {} cannot be used with a regular expression in "
          "'target_modules'",
          path, lt->dump());
    const json list = lt->is_array() ? *lt : json::array({*lt});
    for (std::size_t i = 0; i < list.size(); ++i) {
      if (!list[i].is_number_integer() || list[i].get<index_t>() < 0)
        fail<InputError>("{}: field 'layers_to_transform' has entry {}, expected a layer index >= 0", path,
                         list[i].dump());
      c.layers_to_transform.push_back(list[i].get<index_t>());
    }
  }
  if (const json* lp = find_field(j, "layers_pattern")) {
    const json list = lp->is_array() ? *lp : json::array({*lp});
    for (const auto& p : list) {
      if (!p.is_string()) fail<InputError>("{}: field 'layers_pattern' has entry {}, expected a name", path, p.dump());
      c.layers_pattern.push_back(regex_field(p.get<std::string>(), path, "layers_pattern"));
    }
    if (!c.layers_pattern.empty() && (c.target_regex || !find_field(j, "layers_to_transform")))
      fail<InputError>("{}: field 'layers_pattern' = {} needs 'layers_to_transform' and a list in 'target_modules'",
                       path, lp->dump());
  }
  c.rank_pattern = pattern_field<index_t>(j, path, "rank_pattern");
  c.alpha_pattern = pattern_field<double>(j, path, "alpha_pattern");

  if (const json* ms = find_field(j, "modules_to_save")) {
    if (!ms->is_array())
      fail<InputError>("{}: field 'modules_to_save' must be null or a list, got {}", path, ms->dump());
    for (const auto& m : *ms) {
      if (!m.is_string() || m.get<std::string>().empty())
        fail<InputError>("{}: field 'modules_to_save' has entry {}, expected a module name", path, m.dump());
      c.modules_to_save.push_back(m.get<std::string>());
    }
  }
  // PEFT's ensure_weight_tying keeps a saved embedding and the head tied;
  // here a saved embedding always unties them (PEFT's default).
  if (get_bool(j, path, "ensure_weight_tying", false) && !c.modules_to_save.empty())
    fail<InputError>("{}: field 'ensure_weight_tying' = true is not supported with modules_to_save {}", path,
                     find_field(j, "modules_to_save")->dump());
  const std::string bias = get_string(j, path, "bias", false).value_or("none");
  if (bias == "none") {
    c.bias = nn::LoraBias::none;
  } else if (bias == "all") {
    c.bias = nn::LoraBias::all;
  } else if (bias == "lora_only") {
    c.bias = nn::LoraBias::lora_only;
  } else {
    fail<InputError>("{}: field 'bias' = '{}' is not supported (\"none\", \"all\", \"lora_only\")", path, bias);
  }
  return c;
}

}  // namespace entropy_probe::hf
