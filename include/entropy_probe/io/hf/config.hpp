// config.json (gpt2, qwen2) and PEFT adapter_config.json parsing
// (docs/checkpoints.md). Settings that change the forward pass and are not
// implemented are rejected by name, never ignored.
#pragma once

#include "entropy_probe/core/error.hpp"
#include "entropy_probe/io/hf/json_fields.hpp"
#include "entropy_probe/nn/gpt2.hpp"
#include "entropy_probe/nn/lora_config.hpp"
#include "entropy_probe/nn/qwen2.hpp"

#include <nlohmann/json.hpp>

#include <cmath>
#include <optional>
#include <string>

namespace entropy_probe::hf {

namespace detail {

using nlohmann::json;

// rope_theta: top level (transformers 4) or inside rope_parameters
// (transformers 5; rope_scaling in some 4.x configs), default 10000 as in
// Qwen2Config. Any rope type other than "default" is rejected; two values
// that disagree are an error.
inline double rope_theta(const json& j, const std::string& path) {
  std::optional<double> theta;
  if (find_field(j, "rope_theta"))
    theta = positive(get_number(j, path, "rope_theta", std::nullopt), path, "rope_theta");
  for (const char* key : {"rope_parameters", "rope_scaling"}) {
    const json* rp = find_field(j, key);
    if (!rp) continue;
    if (!rp->is_object()) fail<InputError>("{}: field '{}' must be an object, got {}", path, key, rp->dump());
    for (const char* type_key : {"rope_type", "type"})
      if (const json* t = find_field(*rp, type_key); t && *t != "default")
        fail<InputError>("{}: field '{}.{}' = {} is not supported (only plain rotary embeddings, \"default\")", path,
                         key, type_key, t->dump());
    if (const json* t = find_field(*rp, "rope_theta")) {
      if (!t->is_number() || !(t->get<double>() > 0) || !std::isfinite(t->get<double>()))
        fail<InputError>("{}: field '{}.rope_theta' must be a positive number, got {}", path, key, t->dump());
      if (theta && *theta != t->get<double>())
        fail<InputError>("{}: rope_theta {} and {}.rope_theta {} disagree", path, *theta, key, t->get<double>());
      theta = t->get<double>();
    }
  }
  return theta.value_or(10000.0);
}

}  // namespace detail

// ---- config.json and adapter_config.json ---------------------------------------------------

// GPT-2 config.json. Required: vocab_size, n_positions, n_embd, n_layer,
// n_head; layer_norm_epsilon defaults to 1e-5 as in transformers. Settings
// this model does not implement (another activation, n_inner other than
// 4 n_embd, per-layer attention scaling) are rejected rather than ignored.
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
  if (find_field(j, "n_inner")) {
    const index_t inner = get_int(j, path, "n_inner", std::nullopt, 1);
    if (inner != 4 * c.n_embd)
      fail<InputError>("{}: field 'n_inner' = {} is not supported (this GPT-2 uses 4 * n_embd = {})", path, inner,
                       4 * c.n_embd);
  }
  if (auto act = get_string(j, path, "activation_function", false);
      act && *act != "gelu_new" && *act != "gelu_pytorch_tanh")
    fail<InputError>("{}: field 'activation_function' = '{}' is not supported (gelu_new, gelu_pytorch_tanh)", path,
                     *act);
  if (get_bool(j, path, "scale_attn_by_inverse_layer_idx", false))
    fail<InputError>("{}: field 'scale_attn_by_inverse_layer_idx' = true is not supported", path);
  if (!get_bool(j, path, "scale_attn_weights", true))
    fail<InputError>("{}: field 'scale_attn_weights' = false is not supported", path);
  validate_config(c, path);
  return c;
}

// Qwen2 config.json. Required: vocab_size, hidden_size, intermediate_size,
// num_hidden_layers, num_attention_heads; the rest default as in
// transformers' Qwen2Config (num_key_value_heads = num_attention_heads,
// max_position_embeddings 32768, rms_norm_eps 1e-6, rope_theta 10000,
// tie_word_embeddings false). rope_theta is read at the top level
// (transformers 4) or from rope_parameters (transformers 5). A rope type
// other than "default", a sliding window (use_sliding_window, layer_types
// other than full_attention), another activation or a head_dim other than
// hidden_size / heads are rejected.
inline nn::Qwen2Config qwen2_config_from_json(const nlohmann::json& j, const std::string& path) {
  using namespace detail;
  require_object(j, path);
  nn::Qwen2Config c;
  c.vocab_size = get_int(j, path, "vocab_size", std::nullopt, 1);
  c.hidden_size = get_int(j, path, "hidden_size", std::nullopt, 1);
  c.intermediate_size = get_int(j, path, "intermediate_size", std::nullopt, 1);
  c.num_hidden_layers = get_int(j, path, "num_hidden_layers", std::nullopt, 0);
  c.num_attention_heads = get_int(j, path, "num_attention_heads", std::nullopt, 1);
  c.num_key_value_heads = get_int(j, path, "num_key_value_heads", c.num_attention_heads, 1);
  c.max_position_embeddings = get_int(j, path, "max_position_embeddings", index_t{32768}, 1);
  c.rms_norm_eps = positive(get_number(j, path, "rms_norm_eps", 1e-6), path, "rms_norm_eps");
  c.rope_theta = rope_theta(j, path);
  c.tie_word_embeddings = get_bool(j, path, "tie_word_embeddings", false);
  if (auto act = get_string(j, path, "hidden_act", false); act && *act != "silu")
    fail<InputError>("{}: field 'hidden_act' = '{}' is not supported (silu)", path, *act);
  if (const json* lt = find_field(j, "layer_types")) {
    if (!lt->is_array()) fail<InputError>("{}: field 'layer_types' must be a list, got {}", path, lt->dump());
    for (const auto& t : *lt)
      if (t != "full_attention")
        fail<InputError>("{}: field 'layer_types' has {}, which is not supported (only \"full_attention\")", path,
                         t.dump());
  }
  if (get_bool(j, path, "use_sliding_window", false))
    fail<InputError>("{}: field 'use_sliding_window' = true is not supported", path);
  validate_config(c, path);
  if (find_field(j, "head_dim")) {
    const index_t hd = get_int(j, path, "head_dim", std::nullopt, 1);
    if (hd != c.head_dim())
      fail<InputError>("{}: field 'head_dim' = {} is not supported (hidden_size / num_attention_heads = {})", path, hd,
                       c.head_dim());
  }
  return c;
}

// PEFT adapter_config.json: peft_type "LORA", r, lora_alpha, target_modules
// (a list of module names; PEFT reads a string as a regular expression, which
// is not supported), use_rslora, fan_in_fan_out (checked, not needed: LoRA
// tensors are stored [r, in] / [out, r] either way), modules_to_save (null or
// a list; only "lm_head" is supported). Settings that change the adapted
// computation and are not implemented (bias other than "none", DoRA, rank or
// alpha patterns, layers_to_transform) are rejected.
inline nn::LoraConfig lora_config_from_json(const nlohmann::json& j, const std::string& path) {
  using namespace detail;
  require_object(j, path);
  const std::string peft_type = *get_string(j, path, "peft_type", true);
  if (peft_type != "LORA") fail<InputError>("{}: field 'peft_type' = '{}' is not supported (LORA)", path, peft_type);
  nn::LoraConfig c;
  c.r = get_int(j, path, "r", std::nullopt, 1);
  c.lora_alpha = get_number(j, path, "lora_alpha", std::nullopt);
  c.use_rslora = get_bool(j, path, "use_rslora", false);
  (void)get_bool(j, path, "fan_in_fan_out", false);
  c.init_lora_b_zero = true;  // irrelevant: the adapter's weights are loaded

  const json* tm = find_field(j, "target_modules");
  if (!tm) missing_field(path, "target_modules");
  if (tm->is_string())
    fail<InputError>(
        "{}: field 'target_modules' = {} is a string, which PEFT reads as a regular expression (or "
        "'all-linear'); only a list of module names is supported",
        path, tm->dump());
  if (!tm->is_array() || tm->empty())
    fail<InputError>("{}: field 'target_modules' must be a non-empty list of module names, got {}", path, tm->dump());
  for (const auto& t : *tm) {
    if (!t.is_string() || t.get<std::string>().empty())
      fail<InputError>("{}: field 'target_modules' has entry {}, expected a module name", path, t.dump());
    c.target_modules.push_back(t.get<std::string>());
  }

  if (const json* ms = find_field(j, "modules_to_save")) {
    if (!ms->is_array())
      fail<InputError>("{}: field 'modules_to_save' must be null or a list, got {}", path, ms->dump());
    for (const auto& m : *ms) {
      if (!m.is_string())
        fail<InputError>("{}: field 'modules_to_save' has entry {}, expected a module name", path, m.dump());
      if (m.get<std::string>() != "lm_head")
        fail<InputError>("{}: field 'modules_to_save' entry '{}' is not supported (only \"lm_head\")", path,
                         m.get<std::string>());
      c.modules_to_save.push_back(m.get<std::string>());
    }
  }
  if (auto bias = get_string(j, path, "bias", false); bias && *bias != "none")
    fail<InputError>("{}: field 'bias' = '{}' is not supported (\"none\": biases stay frozen)", path, *bias);
  // Variants that change what the adapter computes or where it sits.
  for (const char* key : {"use_dora", "lora_bias", "use_qalora", "rank_pattern", "alpha_pattern", "layers_to_transform",
                          "exclude_modules", "layer_replication", "target_parameters", "alora_invocation_tokens",
                          "trainable_token_indices"})
    if (is_set(j, key))
      fail<InputError>(
          "{}: field '{}' = {} is not supported (plain LoRA: one r and lora_alpha on every targeted "
          "module of every layer)",
          path, key, j[key].dump());
  return c;
}

}  // namespace entropy_probe::hf
