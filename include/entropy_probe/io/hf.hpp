// Hugging Face checkpoints, PEFT LoRA adapters, token batches and Adam state
// (DESIGN.md section 5).
//
// A checkpoint directory holds config.json (model_type gpt2 or qwen2), the
// base weights (model.safetensors, or shards listed by
// model.safetensors.index.json), optionally a PEFT adapter
// (adapter_config.json + adapter_model.safetensors) and optionally the Adam
// state (optimizer.safetensors). Every reader validates before it trusts:
// each error is an InputError naming the file, the key and the problem.
//
// Names. The model families' named_parameters() give PEFT names (prefix
// "base_model.model." with an adapter, "<module>.base_layer.weight" for an
// adapted linear's frozen weight). A base weight's Hugging Face key is that
// name without the prefix and without ".base_layer"; GPT-2 keys are accepted
// with or without the leading "transformer.". Adapter tensors (lora_A, lora_B
// and, with modules_to_save ["lm_head"], the trainable lm_head copy) are
// loaded by their registry name, which is the adapter file's key.
//
// Layout. Hugging Face GPT-2 keeps its Conv1D weights (attn.c_attn,
// attn.c_proj, mlp.c_fc, mlp.c_proj) as [in, out]; the models here keep every
// linear weight as [out, in], so those are transposed on load and on save.
// LoRA tensors are nn.Linear weights in PEFT whatever fan_in_fan_out says
// (lora_A [r, in], lora_B [out, r]) and are never transposed.
#pragma once

#include "entropy_probe/core/error.hpp"
#include "entropy_probe/core/log.hpp"
#include "entropy_probe/io/safetensors.hpp"
#include "entropy_probe/module/registry.hpp"
#include "entropy_probe/nn/gpt2.hpp"
#include "entropy_probe/nn/lora_config.hpp"
#include "entropy_probe/nn/qwen2.hpp"
#include "entropy_probe/probe/adam.hpp"
#include "entropy_probe/probe/batch.hpp"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <utility>
#include <variant>
#include <vector>

namespace entropy_probe::hf {

namespace detail {

using nlohmann::json;

inline std::string join_path(const std::string& dir, const std::string& file) {
  return (std::filesystem::path(dir) / file).string();
}

inline bool is_file(const std::string& path) {
  std::error_code ec;
  return std::filesystem::is_regular_file(path, ec);
}

inline bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
inline bool starts_with(const std::string& s, const std::string& prefix) { return s.rfind(prefix, 0) == 0; }

inline std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

// A JSON file whose top level is an object.
inline json read_json_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail<InputError>("{}: cannot open: {}", path, std::strerror(errno));
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    fail<InputError>("{}: not valid JSON: {}", path, e.what());
  }
  if (!j.is_object()) fail<InputError>("{}: the top level is a JSON {}, expected an object", path, j.type_name());
  return j;
}

inline void require_object(const json& j, const std::string& path) {
  if (!j.is_object()) fail<InputError>("{}: the top level is a JSON {}, expected an object", path, j.type_name());
}

// The value of `key`, or nullptr when it is absent or null.
inline const json* find_field(const json& j, const char* key) {
  auto it = j.find(key);
  return it == j.end() || it->is_null() ? nullptr : &*it;
}

[[noreturn]] inline void missing_field(const std::string& path, const char* key) {
  fail<InputError>("{}: missing field '{}'", path, key);
}

// An integer field >= `min`; absent or null gives `def` (required when none).
inline index_t get_int(const json& j, const std::string& path, const char* key, std::optional<index_t> def,
                       index_t min) {
  const json* v = find_field(j, key);
  if (!v) {
    if (!def) missing_field(path, key);
    return *def;
  }
  if (!v->is_number_integer())
    fail<InputError>("{}: field '{}' must be an integer, got {} {}", path, key, v->type_name(), v->dump());
  if (v->is_number_unsigned() &&
      v->get<std::uint64_t>() > static_cast<std::uint64_t>(std::numeric_limits<index_t>::max()))
    fail<InputError>("{}: field '{}' = {} is too large", path, key, v->dump());
  const auto x = v->get<index_t>();
  if (x < min) fail<InputError>("{}: field '{}' = {} must be at least {}", path, key, x, min);
  return x;
}

// A finite number (integer or floating point); absent or null gives `def`.
inline double get_number(const json& j, const std::string& path, const char* key, std::optional<double> def) {
  const json* v = find_field(j, key);
  if (!v) {
    if (!def) missing_field(path, key);
    return *def;
  }
  if (!v->is_number())
    fail<InputError>("{}: field '{}' must be a number, got {} {}", path, key, v->type_name(), v->dump());
  const double x = v->get<double>();
  if (!std::isfinite(x)) fail<InputError>("{}: field '{}' = {} is not finite", path, key, v->dump());
  return x;
}

inline bool get_bool(const json& j, const std::string& path, const char* key, std::optional<bool> def) {
  const json* v = find_field(j, key);
  if (!v) {
    if (!def) missing_field(path, key);
    return *def;
  }
  if (!v->is_boolean())
    fail<InputError>("{}: field '{}' must be true or false, got {} {}", path, key, v->type_name(), v->dump());
  return v->get<bool>();
}

inline std::optional<std::string> get_string(const json& j, const std::string& path, const char* key, bool required) {
  const json* v = find_field(j, key);
  if (!v) {
    if (required) missing_field(path, key);
    return std::nullopt;
  }
  if (!v->is_string())
    fail<InputError>("{}: field '{}' must be a string, got {} {}", path, key, v->type_name(), v->dump());
  return v->get<std::string>();
}

inline double positive(double x, const std::string& path, const char* key) {
  if (!(x > 0)) fail<InputError>("{}: field '{}' = {} must be positive", path, key, x);
  return x;
}

// Runs a config's validate(), naming the file in its message.
template <class Config>
void validate_config(const Config& c, const std::string& path) {
  try {
    c.validate();
  } catch (const InputError& e) {
    fail<InputError>("{}: {}", path, e.what());
  }
}

// Whether an optional setting is in effect: present and not null, false, 0,
// "" or an empty list or object.
inline bool is_set(const json& j, const char* key) {
  const json* v = find_field(j, key);
  if (!v) return false;
  if (v->is_boolean()) return v->get<bool>();
  if (v->is_number()) return v->get<double>() != 0;
  if (v->is_string() || v->is_array() || v->is_object()) return !v->empty();
  return true;
}

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

// ---- base weights and adapters ---------------------------------------------------------------

namespace detail {

enum class Family { gpt2, qwen2 };
inline const char* family_name(Family f) { return f == Family::gpt2 ? "gpt2" : "qwen2"; }

inline const std::vector<std::string>& family_modules(Family f) {
  static const std::vector<std::string> gpt2{"c_attn", "c_proj", "c_fc"};
  static const std::vector<std::string> qwen2{"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                              "gate_proj", "up_proj", "down_proj"};
  return f == Family::gpt2 ? gpt2 : qwen2;
}

inline const std::string kPeftPrefix = "base_model.model.";

// Where a model parameter comes from and under which key.
struct Placement {
  bool adapter = false;  // adapter_model.safetensors, key = registry name
  std::string key;       // the Hugging Face key (base) or the registry name (adapter)
  std::string alt_key;   // GPT-2: the same key without "transformer." (base only)
  bool transpose = false;
};

inline bool is_lora_tensor_name(const std::string& name) {
  return ends_with(name, ".lora_A.weight") || ends_with(name, ".lora_B.weight");
}

inline bool is_gpt2_conv1d_weight(const std::string& key) {
  for (const char* m : {".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight"})
    if (ends_with(key, m)) return true;
  return false;
}

inline Placement place(const std::string& name, const std::optional<nn::LoraConfig>& lora, Family family) {
  Placement p;
  std::string s = name;
  if (lora) {
    if (!starts_with(name, kPeftPrefix))
      fail<UsageError>("hf: parameter '{}' lacks the PEFT prefix '{}'", name, kPeftPrefix);
    s = name.substr(kPeftPrefix.size());
  }
  if (is_lora_tensor_name(s) || (lora && s == "lm_head.weight" && lora->saves("lm_head"))) {
    p.adapter = true;
    p.key = name;
    return p;
  }
  for (std::size_t at = s.find(".base_layer."); at != std::string::npos; at = s.find(".base_layer."))
    s.erase(at, std::string(".base_layer").size());
  p.key = s;
  if (family == Family::gpt2) {
    if (starts_with(s, "transformer.")) p.alt_key = s.substr(std::string("transformer.").size());
    p.transpose = is_gpt2_conv1d_weight(s);
  }
  return p;
}

// The base weights: one file or shards.
class BaseWeights {
 public:
  explicit BaseWeights(const std::string& dir) {
    const std::string single = join_path(dir, "model.safetensors");
    const std::string index = join_path(dir, "model.safetensors.index.json");
    if (is_file(single)) {
      label_ = single;
      files_.push_back(safetensors::File::open(single));
      for (const auto& t : files_[0].tensors()) where_[t.name] = 0;
    } else if (is_file(index)) {
      label_ = index;
      const json j = read_json_file(index);
      const json* wm = find_field(j, "weight_map");
      if (!wm) missing_field(index, "weight_map");
      if (!wm->is_object())
        fail<InputError>("{}: field 'weight_map' must be an object, got {}", index, wm->type_name());
      std::map<std::string, std::size_t> shard_of_file;
      for (auto it = wm->begin(); it != wm->end(); ++it) {
        if (!it.value().is_string())
          fail<InputError>("{}: weight_map['{}'] must be a file name, got {}", index, it.key(), it.value().dump());
        const std::string shard = it.value().get<std::string>();
        const std::filesystem::path sp(shard);
        if (shard.empty() || sp.is_absolute() || std::find(sp.begin(), sp.end(), "..") != sp.end())
          fail<InputError>("{}: weight_map['{}'] = '{}' is not a file name inside the checkpoint directory", index,
                           it.key(), shard);
        auto [pos, fresh] = shard_of_file.emplace(shard, files_.size());
        if (fresh) files_.push_back(safetensors::File::open(join_path(dir, shard)));
        const safetensors::File& f = files_[pos->second];
        if (!f.contains(it.key()))
          fail<InputError>("{}: weight_map names '{}' in {}, which has no such tensor", index, it.key(), f.path());
        where_[it.key()] = pos->second;
      }
    } else if (is_file(join_path(dir, "pytorch_model.bin")) ||
               is_file(join_path(dir, "pytorch_model.bin.index.json"))) {
      fail<InputError>(
          "{}: has only PyTorch pickle weights (pytorch_model.bin); save them as safetensors "
          "(save_pretrained(..., safe_serialization=True))",
          dir);
    } else {
      fail<InputError>("{}: no model.safetensors or model.safetensors.index.json", dir);
    }
    for (const auto& [key, file] : where_)
      if (lower(key).find("lora_a") != std::string::npos || lower(key).find("lora_b") != std::string::npos)
        fail<InputError>(
            "{}: tensor '{}' is a LoRA tensor; base weights must not hold adapters (they belong in "
            "adapter_model.safetensors)",
            files_[file].path(), key);
  }

  const std::string& label() const { return label_; }
  // The tensor `key` and the file holding it, or {nullptr, nullptr}.
  std::pair<const safetensors::File*, const safetensors::TensorView*> find(const std::string& key) const {
    auto it = where_.find(key);
    if (it == where_.end()) return {nullptr, nullptr};
    const safetensors::File& f = files_[it->second];
    return {&f, f.find(key)};
  }

 private:
  std::string label_;
  std::vector<safetensors::File> files_;
  std::map<std::string, std::size_t> where_;
};

// Loads `view` into `param`, checking dtype and shape (transposing a
// Hugging Face [in, out] Conv1D weight into [out, in]).
template <class T, class B>
void load_into(Parameter<T, B>& param, const safetensors::File& file, const safetensors::TensorView& view,
               bool transpose, const std::string& origin) {
  const Shape& want = param.value.shape();
  const Shape expected = transpose ? Shape{want.at(1), want.at(0)} : want;
  if (view.shape != expected)
    fail<InputError>("{}: tensor '{}' has shape {}, expected {}{} ({})", file.path(), view.name, shape_str(view.shape),
                     shape_str(expected), transpose ? " (Conv1D layout [in, out])" : "", origin);
  if (!safetensors::is_float(view.dtype))
    fail<InputError>("{}: tensor '{}' has dtype {}, expected F32, F16, BF16 or F64", file.path(), view.name,
                     safetensors::dtype_name(view.dtype));
  std::vector<T> v = view.template to_vector<T>();
  if (transpose) {
    const index_t out = want[0], in = want[1];
    std::vector<T> t(v.size());
    for (index_t i = 0; i < in; ++i)
      for (index_t o = 0; o < out; ++o)
        t[static_cast<std::size_t>(o * in + i)] = v[static_cast<std::size_t>(i * out + o)];
    v = std::move(t);
  }
  param.value = Tensor<T, B>::from_host(want, std::span<const T>(v));
}

// Every target module must be one of the family's (PEFT matches by suffix;
// dotted targets would select a subset this model cannot express).
inline void check_targets(const nn::LoraConfig& lora, Family family, const std::string& path) {
  const auto& known = family_modules(family);
  bool any = false;
  for (const std::string& t : lora.target_modules) {
    if (std::find(known.begin(), known.end(), t) != known.end()) {
      any = true;
    } else if (t.find('.') != std::string::npos) {
      fail<InputError>("{}: target_modules entry '{}' is not supported: use the module names [{}]", path, t,
                       fmt::join(known, ", "));
    } else {
      log_warning("{}: target_modules entry '{}' matches no module of a {} model; ignored", path, t,
                  family_name(family));
    }
  }
  if (!any)
    fail<InputError>("{}: target_modules [{}] match no module of a {} model ([{}])", path,
                     fmt::join(lora.target_modules, ", "), family_name(family), fmt::join(known, ", "));
}

// adapter_config.json of `dir`, when present.
inline std::optional<nn::LoraConfig> read_lora(const std::string& dir, Family family) {
  const std::string cfg = join_path(dir, "adapter_config.json");
  const std::string weights = join_path(dir, "adapter_model.safetensors");
  if (!is_file(cfg)) {
    if (is_file(weights))
      fail<InputError>("{}: found without adapter_config.json, so the adapter's r, lora_alpha and targets are unknown",
                       weights);
    return std::nullopt;
  }
  nn::LoraConfig lora = lora_config_from_json(read_json_file(cfg), cfg);
  check_targets(lora, family, cfg);
  return lora;
}

// Fills every parameter of `model` from the checkpoint in `dir`.
template <class Model>
void load_weights(Model& model, const std::string& dir, const std::optional<nn::LoraConfig>& lora, Family family) {
  using T = typename Model::scalar_type;
  using B = typename Model::backend_type;
  std::vector<std::pair<std::string, Parameter<T, B>*>> params;
  model.named_parameters(
      ParameterVisitor<T, B>([&](const std::string& name, Parameter<T, B>& p) { params.emplace_back(name, &p); }));

  const BaseWeights base(dir);
  const std::string config = join_path(dir, "config.json");
  std::map<std::string, Parameter<T, B>*> from_adapter;
  for (auto& [name, p] : params) {
    const Placement pl = place(name, lora, family);
    if (pl.adapter) {
      from_adapter.emplace(pl.key, p);
      continue;
    }
    auto [file, view] = base.find(pl.key);
    if (!view && !pl.alt_key.empty()) std::tie(file, view) = base.find(pl.alt_key);
    if (!view)
      fail<InputError>("{}: missing tensor '{}'{} (model parameter '{}')", base.label(), pl.key,
                       pl.alt_key.empty() ? std::string() : fmt::format(" (or '{}')", pl.alt_key), name);
    load_into(*p, *file, *view, pl.transpose, "from " + config);
  }
  if (!lora) return;

  const std::string path = join_path(dir, "adapter_model.safetensors");
  if (!is_file(path)) {
    if (is_file(join_path(dir, "adapter_model.bin")))
      fail<InputError>("{}: missing; the adapter is a PyTorch pickle (adapter_model.bin), save it as safetensors",
                       path);
    fail<InputError>("{}: missing (adapter_config.json is present)", path);
  }
  const safetensors::File adapter = safetensors::File::open(path);
  std::set<std::string> loaded;
  for (const auto& view : adapter.tensors()) {
    auto it = from_adapter.find(view.name);
    if (it == from_adapter.end()) {
      std::string why;
      std::string module_name = view.name;  // not `module`: nvcc reads that as the C++20 keyword and warns
      for (const char* suffix : {".lora_A.weight", ".lora_B.weight", ".weight"})
        if (ends_with(module_name, suffix)) {
          module_name.resize(module_name.size() - std::strlen(suffix));
          break;
        }
      const bool exists = std::any_of(params.begin(), params.end(),
                                      [&](const auto& np) { return starts_with(np.first, module_name + "."); });
      if (!exists)
        why = fmt::format("the model has no module '{}'", module_name);
      else if (is_lora_tensor_name(view.name))
        why = fmt::format("module '{}' has no adapter (target_modules [{}])", module_name,
                          fmt::join(lora->target_modules, ", "));
      else
        why = "it is not a LoRA parameter or a modules_to_save copy of the model";
      fail<InputError>("{}: tensor '{}' does not name a parameter the adapter can hold: {}", path, view.name, why);
    }
    load_into(*it->second, adapter, view, false, "from adapter_config.json and " + config);
    loaded.insert(view.name);
  }
  for (const auto& [name, p] : from_adapter)
    if (!loaded.count(name))
      fail<InputError>("{}: missing tensor '{}' (a LoRA parameter of the model: r {}, target_modules [{}]{})", path,
                       name, lora->r, fmt::join(lora->target_modules, ", "),
                       lora->modules_to_save.empty() ? "" : ", modules_to_save [lm_head]");
}

inline void check_directory(const std::string& dir) {
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) fail<InputError>("{}: not a checkpoint directory", dir);
}

inline std::string model_type_of(const json& j, const std::string& path) {
  return *get_string(j, path, "model_type", true);
}

template <class T, class B>
nn::Gpt2LMHeadModel<T, B> load_gpt2(const std::string& dir, const json& config, const std::string& config_path) {
  const nn::Gpt2Config cfg = gpt2_config_from_json(config, config_path);
  auto lora = read_lora(dir, Family::gpt2);
  nn::Gpt2LMHeadModel<T, B> model(cfg, lora, 0);
  load_weights(model, dir, lora, Family::gpt2);
  return model;
}

template <class T, class B>
nn::Qwen2ForCausalLM<T, B> load_qwen2(const std::string& dir, const json& config, const std::string& config_path) {
  const nn::Qwen2Config cfg = qwen2_config_from_json(config, config_path);
  auto lora = read_lora(dir, Family::qwen2);
  nn::Qwen2ForCausalLM<T, B> model(cfg, lora, 0);
  load_weights(model, dir, lora, Family::qwen2);
  return model;
}

inline json read_config(const std::string& dir, std::string& path, const char* want_type) {
  check_directory(dir);
  path = join_path(dir, "config.json");
  json j = read_json_file(path);
  if (want_type) {
    const std::string mt = model_type_of(j, path);
    if (mt != want_type)
      fail<InputError>("{}: model_type '{}', expected '{}' (load_model dispatches on model_type)", path, mt, want_type);
  }
  return j;
}

}  // namespace detail

// A GPT-2 checkpoint directory (config.json model_type "gpt2"), with its PEFT
// adapter when adapter_config.json is present.
template <class T, class B = CpuBackend>
nn::Gpt2LMHeadModel<T, B> load_gpt2(const std::string& dir) {
  std::string path;
  const nlohmann::json j = detail::read_config(dir, path, "gpt2");
  return detail::load_gpt2<T, B>(dir, j, path);
}

// A Qwen2 checkpoint directory (model_type "qwen2"), with its PEFT adapter.
template <class T, class B = CpuBackend>
nn::Qwen2ForCausalLM<T, B> load_qwen2(const std::string& dir) {
  std::string path;
  const nlohmann::json j = detail::read_config(dir, path, "qwen2");
  return detail::load_qwen2<T, B>(dir, j, path);
}

template <class T, class B = CpuBackend>
using AnyModel = std::variant<nn::Gpt2LMHeadModel<T, B>, nn::Qwen2ForCausalLM<T, B>>;

// Either family, by config.json's model_type.
template <class T, class B = CpuBackend>
std::variant<nn::Gpt2LMHeadModel<T, B>, nn::Qwen2ForCausalLM<T, B>> load_model(const std::string& dir) {
  using V = std::variant<nn::Gpt2LMHeadModel<T, B>, nn::Qwen2ForCausalLM<T, B>>;
  std::string path;
  const nlohmann::json j = detail::read_config(dir, path, nullptr);
  const std::string mt = detail::model_type_of(j, path);
  if (mt == "gpt2") return V(std::in_place_index<0>, detail::load_gpt2<T, B>(dir, j, path));
  if (mt == "qwen2") return V(std::in_place_index<1>, detail::load_qwen2<T, B>(dir, j, path));
  fail<InputError>("{}: model_type '{}' is not supported (gpt2, qwen2)", path, mt);
}

// ---- writing a checkpoint directory (tests, examples) ------------------------------------------

namespace detail {

template <class T>
safetensors::OutTensor out_tensor(const Shape& shape, const std::vector<T>& v, safetensors::Dtype dtype) {
  using safetensors::Dtype;
  switch (dtype) {
    case Dtype::F64: {
      std::vector<double> d(v.begin(), v.end());
      return safetensors::make_out<double>(shape, std::span<const double>(d));
    }
    case Dtype::F32: {
      std::vector<float> f(v.size());
      for (std::size_t i = 0; i < v.size(); ++i) f[i] = static_cast<float>(v[i]);
      return safetensors::make_out<float>(shape, std::span<const float>(f));
    }
    case Dtype::F16:
    case Dtype::BF16: {
      safetensors::OutTensor o{dtype, shape, std::vector<std::byte>(v.size() * 2)};
      for (std::size_t i = 0; i < v.size(); ++i) {
        const std::uint16_t bits =
            dtype == Dtype::F16 ? Eigen::numext::bit_cast<std::uint16_t>(Eigen::half(static_cast<float>(v[i])))
                                : Eigen::numext::bit_cast<std::uint16_t>(Eigen::bfloat16(static_cast<float>(v[i])));
        o.bytes[2 * i] = static_cast<std::byte>(bits & 0xff);
        o.bytes[2 * i + 1] = static_cast<std::byte>(bits >> 8);
      }
      return o;
    }
    default:
      break;
  }
  fail<UsageError>("hf: cannot write weights as {}", safetensors::dtype_name(dtype));
}

inline void write_json_file(const std::string& path, const json& j) {
  std::ofstream out(path, std::ios::binary);
  if (!out) fail<InputError>("{}: cannot open for writing", path);
  out << j.dump(2) << "\n";
  if (!out) fail<InputError>("{}: write failed", path);
}

inline json adapter_config_json(const nn::LoraConfig& l, Family family) {
  json j = {{"peft_type", "LORA"},
            {"task_type", "CAUSAL_LM"},
            {"r", l.r},
            {"lora_alpha", l.lora_alpha},
            {"lora_dropout", 0.0},
            {"target_modules", l.target_modules},
            {"use_rslora", l.use_rslora},
            {"fan_in_fan_out", family == Family::gpt2},
            {"bias", "none"}};
  j["modules_to_save"] = l.modules_to_save.empty() ? json(nullptr) : json(l.modules_to_save);
  return j;
}

template <class Model>
void save_weights(Model& model, const std::string& dir, const std::optional<nn::LoraConfig>& lora, Family family,
                  safetensors::Dtype dtype, bool write_lm_head_to_base) {
  using T = typename Model::scalar_type;
  using B = typename Model::backend_type;
  std::map<std::string, safetensors::OutTensor> base, adapter;
  model.named_parameters(ParameterVisitor<T, B>([&](const std::string& name, Parameter<T, B>& p) {
    const Placement pl = place(name, lora, family);
    std::vector<T> v = p.value.to_host();
    Shape shape = p.value.shape();
    if (pl.adapter) {
      adapter.emplace(pl.key, out_tensor(shape, v, dtype));
      // An untied lm_head (Qwen2) also lives in the base weights.
      if (write_lm_head_to_base && detail::ends_with(name, "lm_head.weight"))
        base.emplace("lm_head.weight", out_tensor(shape, v, dtype));
      return;
    }
    if (pl.transpose) {
      const index_t out = shape[0], in = shape[1];
      std::vector<T> t(v.size());
      for (index_t o = 0; o < out; ++o)
        for (index_t i = 0; i < in; ++i)
          t[static_cast<std::size_t>(i * out + o)] = v[static_cast<std::size_t>(o * in + i)];
      v = std::move(t);
      shape = {in, out};
    }
    base.emplace(pl.key, out_tensor(shape, v, dtype));
  }));
  safetensors::write_file(join_path(dir, "model.safetensors"), base, {{"format", "pt"}});
  if (lora) {
    write_json_file(join_path(dir, "adapter_config.json"), adapter_config_json(*lora, family));
    safetensors::write_file(join_path(dir, "adapter_model.safetensors"), adapter, {{"format", "pt"}});
  }
}

}  // namespace detail

// Writes `model` as a Hugging Face checkpoint directory: config.json,
// model.safetensors (Hugging Face names and layouts, in `dtype`) and, with a
// LoRA config, adapter_config.json and adapter_model.safetensors keyed by
// registry name. The directory is created when missing.
template <class T, class B>
void save_pretrained(nn::Gpt2LMHeadModel<T, B>& model, const std::string& dir,
                     safetensors::Dtype dtype = safetensors::Dtype::F32) {
  std::filesystem::create_directories(dir);
  const nn::Gpt2Config& c = model.config();
  detail::write_json_file(detail::join_path(dir, "config.json"), {{"model_type", "gpt2"},
                                                                  {"architectures", {"GPT2LMHeadModel"}},
                                                                  {"vocab_size", c.vocab_size},
                                                                  {"n_positions", c.n_positions},
                                                                  {"n_embd", c.n_embd},
                                                                  {"n_layer", c.n_layer},
                                                                  {"n_head", c.n_head},
                                                                  {"n_inner", nullptr},
                                                                  {"layer_norm_epsilon", c.layer_norm_epsilon},
                                                                  {"activation_function", "gelu_new"},
                                                                  {"tie_word_embeddings", true}});
  detail::save_weights(model, dir, model.lora(), detail::Family::gpt2, dtype, false);
}

template <class T, class B>
void save_pretrained(nn::Qwen2ForCausalLM<T, B>& model, const std::string& dir,
                     safetensors::Dtype dtype = safetensors::Dtype::F32) {
  std::filesystem::create_directories(dir);
  const nn::Qwen2Config& c = model.config();
  detail::write_json_file(detail::join_path(dir, "config.json"),
                          {{"model_type", "qwen2"},
                           {"architectures", {"Qwen2ForCausalLM"}},
                           {"vocab_size", c.vocab_size},
                           {"hidden_size", c.hidden_size},
                           {"intermediate_size", c.intermediate_size},
                           {"num_hidden_layers", c.num_hidden_layers},
                           {"num_attention_heads", c.num_attention_heads},
                           {"num_key_value_heads", c.num_key_value_heads},
                           {"max_position_embeddings", c.max_position_embeddings},
                           {"rms_norm_eps", c.rms_norm_eps},
                           {"rope_theta", c.rope_theta},
                           {"hidden_act", "silu"},
                           {"tie_word_embeddings", c.tie_word_embeddings}});
  detail::save_weights(model, dir, model.lora(), detail::Family::qwen2, dtype, !c.tie_word_embeddings);
}

// ---- batch files -----------------------------------------------------------------------------

namespace detail {

inline bool is_int_dtype(safetensors::Dtype d) {
  using safetensors::Dtype;
  return d == Dtype::I64 || d == Dtype::I32 || d == Dtype::I16 || d == Dtype::I8 || d == Dtype::U8;
}

// "[b,g,t]" for flat index k of `shape`.
inline std::string index_str(const Shape& shape, index_t k) {
  std::vector<index_t> idx(shape.size());
  for (std::size_t d = shape.size(); d-- > 0;) {
    const index_t n = std::max<index_t>(shape[d], 1);
    idx[d] = k % n;
    k /= n;
  }
  return fmt::format("[{}]", fmt::join(idx, ","));
}

class BatchReader {
 public:
  explicit BatchReader(const std::string& path) : f_(safetensors::File::open(path)) {}
  const safetensors::File& file() const { return f_; }
  const std::string& path() const { return f_.path(); }

  const safetensors::TensorView& required(const char* key) const {
    if (const auto* t = f_.find(key)) return *t;
    fail<InputError>(
        "{}: missing tensor '{}' (a batch file holds sequences [B,G,T], attention_mask [B,G,T], "
        "prompt_lens [B] and advantages [B,G])",
        path(), key);
  }
  void check_shape(const safetensors::TensorView& v, const Shape& want, const char* dims) const {
    if (v.shape != want)
      fail<InputError>("{}: tensor '{}' has shape {}, expected {} ({} from 'sequences' [B,G,T] = {})", path(), v.name,
                       shape_str(v.shape), shape_str(want), dims, shape_str(seq_shape_));
  }
  void set_seq_shape(Shape s) { seq_shape_ = std::move(s); }

  std::vector<std::int32_t> int32s(const safetensors::TensorView& v) const {
    if (!is_int_dtype(v.dtype))
      fail<InputError>("{}: tensor '{}' has dtype {}, expected an integer type (I64, I32, I16, I8, U8)", path(), v.name,
                       safetensors::dtype_name(v.dtype));
    std::vector<std::int32_t> out(static_cast<std::size_t>(v.numel()));
    for (index_t k = 0; k < v.numel(); ++k) {
      const std::int64_t x = v.integer(k);
      if (x < std::numeric_limits<std::int32_t>::min() || x > std::numeric_limits<std::int32_t>::max())
        fail<InputError>("{}: {}{} = {} is outside the int32 range", path(), v.name, index_str(v.shape, k), x);
      out[static_cast<std::size_t>(k)] = static_cast<std::int32_t>(x);
    }
    return out;
  }
  std::vector<std::uint8_t> mask(const safetensors::TensorView& v) const {
    if (!is_int_dtype(v.dtype) && v.dtype != safetensors::Dtype::BOOL)
      fail<InputError>("{}: tensor '{}' has dtype {}, expected an integer or BOOL type", path(), v.name,
                       safetensors::dtype_name(v.dtype));
    std::vector<std::uint8_t> out(static_cast<std::size_t>(v.numel()));
    for (index_t k = 0; k < v.numel(); ++k) {
      const std::int64_t x = v.integer(k);
      if (x != 0 && x != 1) fail<InputError>("{}: {}{} = {} is not 0 or 1", path(), v.name, index_str(v.shape, k), x);
      out[static_cast<std::size_t>(k)] = static_cast<std::uint8_t>(x);
    }
    return out;
  }
  std::vector<double> doubles(const safetensors::TensorView& v, bool allow_int) const {
    const bool ok = safetensors::is_float(v.dtype) || (allow_int && is_int_dtype(v.dtype));
    if (!ok)
      fail<InputError>("{}: tensor '{}' has dtype {}, expected {}", path(), v.name, safetensors::dtype_name(v.dtype),
                       allow_int ? "a number type" : "a floating-point type (F64, F32, F16, BF16)");
    return v.to_vector<double>();
  }

 private:
  safetensors::File f_;
  Shape seq_shape_;
};

}  // namespace detail

// A batch file (DESIGN.md section 5): sequences [B,G,T] int, attention_mask
// [B,G,T] (int, U8 or BOOL; values 0/1), prompt_lens [B] int, advantages
// [B,G] float; optional max_lengths [B], rewards [B,G], position_ids
// [B,G,T]. Integer values must fit int32. Token ids against the vocabulary
// are TokenBatch::validate's check (it needs the model).
inline TokenBatch load_batch(const std::string& path) {
  detail::BatchReader r(path);
  const auto& seq = r.required("sequences");
  if (seq.shape.size() != 3)
    fail<InputError>("{}: tensor 'sequences' has shape {}, expected [B, G, T]", path, shape_str(seq.shape));
  r.set_seq_shape(seq.shape);
  TokenBatch b;
  b.B = seq.shape[0];
  b.G = seq.shape[1];
  b.T = seq.shape[2];
  const Shape bgt{b.B, b.G, b.T}, bg{b.B, b.G}, bs{b.B};
  const auto& mask = r.required("attention_mask");
  const auto& plens = r.required("prompt_lens");
  const auto& adv = r.required("advantages");
  r.check_shape(mask, bgt, "[B, G, T]");
  r.check_shape(plens, bs, "[B]");
  r.check_shape(adv, bg, "[B, G]");
  b.sequences = r.int32s(seq);
  b.attention_mask = r.mask(mask);
  b.prompt_lens = r.int32s(plens);
  b.advantages = r.doubles(adv, false);
  if (const auto* v = r.file().find("max_lengths")) {
    r.check_shape(*v, bs, "[B]");
    b.max_lengths = r.doubles(*v, true);
  }
  if (const auto* v = r.file().find("rewards")) {
    r.check_shape(*v, bg, "[B, G]");
    b.rewards = r.doubles(*v, true);
  }
  if (const auto* v = r.file().find("position_ids")) {
    r.check_shape(*v, bgt, "[B, G, T]");
    b.position_ids = r.int32s(*v);
  }
  static const std::set<std::string> known{"sequences",   "attention_mask", "prompt_lens", "advantages",
                                           "max_lengths", "rewards",        "position_ids"};
  for (const auto& t : r.file().tensors())
    if (!known.count(t.name)) log_warning("{}: ignoring unknown tensor '{}'", path, t.name);
  return b;
}

// Writes `batch` in the format load_batch reads (integers as I64, floats as F64).
inline void save_batch(const TokenBatch& batch, const std::string& path) {
  using safetensors::make_out;
  const auto n = static_cast<std::size_t>(batch.B * batch.G * batch.T);
  auto size_is = [&](const char* key, std::size_t got, std::size_t want) {
    if (got != want) fail<UsageError>("save_batch: {} has {} entries, expected {}", key, got, want);
  };
  size_is("sequences", batch.sequences.size(), n);
  size_is("attention_mask", batch.attention_mask.size(), n);
  size_is("prompt_lens", batch.prompt_lens.size(), static_cast<std::size_t>(batch.B));
  size_is("advantages", batch.advantages.size(), static_cast<std::size_t>(batch.B * batch.G));
  auto ints = [](const auto& v) { return std::vector<std::int64_t>(v.begin(), v.end()); };
  auto i64 = [](const Shape& s, const std::vector<std::int64_t>& v) {
    return make_out<std::int64_t>(s, std::span<const std::int64_t>(v));
  };
  auto f64 = [](const Shape& s, const std::vector<double>& v) {
    return make_out<double>(s, std::span<const double>(v));
  };
  const Shape bgt{batch.B, batch.G, batch.T}, bg{batch.B, batch.G}, bs{batch.B};
  std::map<std::string, safetensors::OutTensor> t;
  t.emplace("sequences", i64(bgt, ints(batch.sequences)));
  t.emplace("attention_mask", i64(bgt, ints(batch.attention_mask)));
  t.emplace("prompt_lens", i64(bs, ints(batch.prompt_lens)));
  t.emplace("advantages", f64(bg, batch.advantages));
  if (batch.max_lengths) t.emplace("max_lengths", f64(bs, *batch.max_lengths));
  if (batch.rewards) t.emplace("rewards", f64(bg, *batch.rewards));
  if (batch.position_ids) t.emplace("position_ids", i64(bgt, ints(*batch.position_ids)));
  safetensors::write_file(path, t);
}

// ---- optimizer state ---------------------------------------------------------------------------

namespace detail {

inline double metadata_number(const safetensors::File& f, const char* key) {
  auto it = f.metadata().find(key);
  if (it == f.metadata().end())
    fail<InputError>("{}: __metadata__ has no '{}' (Adam state needs lr, beta1, beta2, eps, weight_decay)", f.path(),
                     key);
  std::string s = it->second;
  const auto b = s.find_first_not_of(" \t\n\r"), e = s.find_last_not_of(" \t\n\r");
  s = b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
  double x = 0;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), x);
  if (s.empty() || ec != std::errc() || end != s.data() + s.size() || !std::isfinite(x))
    fail<InputError>("{}: __metadata__ '{}' = '{}' is not a finite decimal number", f.path(), key, it->second);
  return x;
}

}  // namespace detail

// optimizer.safetensors (DESIGN.md section 5): `<name>.exp_avg`,
// `<name>.exp_avg_sq` (the parameter's shape) and `<name>.step` (shape [] or
// [1], float or int) per registry name; __metadata__ lr, beta1, beta2, eps,
// weight_decay as decimal strings. A registry parameter without entries is
// left without state (the preconditioner warns and counts it); an entry for
// a name the registry lacks is an error.
template <class T, class B = CpuBackend>
AdamState<T, B> load_adam_state(const std::string& path, const Registry<T, B>& registry) {
  const safetensors::File f = safetensors::File::open(path);
  AdamHyper h;
  h.lr = detail::metadata_number(f, "lr");
  h.beta1 = detail::metadata_number(f, "beta1");
  h.beta2 = detail::metadata_number(f, "beta2");
  h.eps = detail::metadata_number(f, "eps");
  h.weight_decay = detail::metadata_number(f, "weight_decay");
  if (h.lr < 0) fail<InputError>("{}: __metadata__ 'lr' = {} is negative", path, h.lr);
  for (auto [key, v] : {std::pair{"beta1", h.beta1}, std::pair{"beta2", h.beta2}})
    if (!(v >= 0 && v < 1)) fail<InputError>("{}: __metadata__ '{}' = {} is outside [0, 1)", path, key, v);
  if (h.eps < 0) fail<InputError>("{}: __metadata__ 'eps' = {} is negative", path, h.eps);
  if (h.weight_decay < 0) fail<InputError>("{}: __metadata__ 'weight_decay' = {} is negative", path, h.weight_decay);

  std::map<std::string, index_t> index_of;
  for (index_t i = 0; i < registry.size(); ++i) index_of.emplace(registry.entry(i).name, i);
  struct Parts {
    const safetensors::TensorView *avg = nullptr, *sq = nullptr, *step = nullptr;
  };
  std::map<std::string, Parts> parts;
  for (const auto& t : f.tensors()) {
    static constexpr std::pair<const char*, const safetensors::TensorView * Parts::*> kinds[] = {
        {".exp_avg_sq", &Parts::sq}, {".exp_avg", &Parts::avg}, {".step", &Parts::step}};
    std::string name;
    using Slot = const safetensors::TensorView* Parts::*;  // named: nvcc's output of the plain declarator warns
    Slot member = nullptr;
    for (const auto& [suffix, m] : kinds)
      if (detail::ends_with(t.name, suffix) && t.name.size() > std::strlen(suffix)) {
        name = t.name.substr(0, t.name.size() - std::strlen(suffix));
        member = m;
        break;
      }
    if (!member)
      fail<InputError>("{}: tensor '{}' is not '<parameter>.exp_avg', '<parameter>.exp_avg_sq' or '<parameter>.step'",
                       path, t.name);
    if (!index_of.count(name))
      fail<InputError>(
          "{}: tensor '{}' is state for '{}', which is not a trainable parameter of the model ({} in the "
          "registry)",
          path, t.name, name, registry.size());
    parts[name].*member = &t;
  }
  AdamState<T, B> state(registry.info(), h);
  // Named arrays, not braced lists, in this loop: nvcc 13.0 mistranslates a
  // range-for over a braced list nested in another loop (docs/cuda.md).
  for (const auto& entry : parts) {
    const std::string& name = entry.first;
    const auto& p = entry.second;
    const index_t i = index_of.at(name);
    const Shape& shape = registry.entry(i).param->value.shape();
    const std::pair<const char*, const safetensors::TensorView*> expected[] = {
        {"exp_avg", p.avg}, {"exp_avg_sq", p.sq}, {"step", p.step}};
    for (const auto& [part, v] : expected)
      if (!v)
        fail<InputError>("{}: missing tensor '{}.{}' (the file has other state for '{}')", path, name, part, name);
    const safetensors::TensorView* const moments[] = {p.avg, p.sq};
    for (const auto* v : moments) {
      if (v->shape != shape)
        fail<InputError>("{}: tensor '{}' has shape {}, expected {} (the parameter's shape)", path, v->name,
                         shape_str(v->shape), shape_str(shape));
      if (!safetensors::is_float(v->dtype))
        fail<InputError>("{}: tensor '{}' has dtype {}, expected a floating-point type", path, v->name,
                         safetensors::dtype_name(v->dtype));
    }
    if (!(p.step->shape.empty() || p.step->shape == Shape{1}))
      fail<InputError>("{}: tensor '{}' has shape {}, expected [] or [1]", path, p.step->name,
                       shape_str(p.step->shape));
    if (p.step->dtype == safetensors::Dtype::BOOL)
      fail<InputError>("{}: tensor '{}' has dtype BOOL, expected a number", path, p.step->name);
    const double step = p.step->element(0);
    if (!std::isfinite(step) || step < 0)
      fail<InputError>("{}: tensor '{}' = {} is not a step count >= 0", path, p.step->name, step);
    AdamParamState<T, B> e{Tensor<T, B>::from_host(shape, p.avg->template to_vector<T>()),
                           Tensor<T, B>::from_host(shape, p.sq->template to_vector<T>()), step};
    state.set(registry.entry(i).id, std::move(e));
  }
  log_debug("{}: Adam state for {} of {} trainable parameters", path, registry.size() - state.missing_count(),
            registry.size());
  return state;
}

// Writes `state` in the format load_adam_state reads (step as an F64 scalar,
// hyperparameters as shortest round-trip decimal strings).
template <class T, class B = CpuBackend>
void save_adam_state(const AdamState<T, B>& state, const std::string& path) {
  if (!state.info()) fail<UsageError>("save_adam_state: the state is not bound to a registry");
  const RegistryInfo& info = *state.info();
  std::map<std::string, safetensors::OutTensor> t;
  for (index_t i = 0; i < state.size(); ++i) {
    const auto* e = state.entry(i);
    if (!e) continue;
    const std::string& name = info.names[static_cast<std::size_t>(i)];
    const std::vector<T> m = e->exp_avg.to_host(), v = e->exp_avg_sq.to_host();
    t.emplace(name + ".exp_avg", safetensors::make_out<T>(e->exp_avg.shape(), std::span<const T>(m)));
    t.emplace(name + ".exp_avg_sq", safetensors::make_out<T>(e->exp_avg_sq.shape(), std::span<const T>(v)));
    const double step = e->step;
    t.emplace(name + ".step", safetensors::make_out<double>(Shape{}, std::span<const double>(&step, 1)));
  }
  const AdamHyper& h = state.hyper();
  safetensors::write_file(path, t,
                          {{"lr", fmt::format("{}", h.lr)},
                           {"beta1", fmt::format("{}", h.beta1)},
                           {"beta2", fmt::format("{}", h.beta2)},
                           {"eps", fmt::format("{}", h.eps)},
                           {"weight_decay", fmt::format("{}", h.weight_decay)}});
}

}  // namespace entropy_probe::hf
