// Base weights and PEFT adapters: which file and key each model parameter
// comes from, reading model.safetensors (or its shards) and
// adapter_model.safetensors, and load_gpt2 / load_qwen2 / load_decoder / load_model
// (docs/checkpoints.md).
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
#include "entropy_probe/io/hf/config.hpp"
#include "entropy_probe/io/hf/json_fields.hpp"
#include "entropy_probe/io/safetensors.hpp"
#include "entropy_probe/module/registry.hpp"
#include "entropy_probe/nn/families.hpp"
#include "entropy_probe/nn/gpt2.hpp"
#include "entropy_probe/nn/lora_config.hpp"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <tuple>
#include <utility>
#include <variant>
#include <vector>

namespace entropy_probe::hf {

namespace detail {

// Weight layout and LoRA module names: GPT-2, or the decoder families of
// nn/families.hpp, which share Qwen2's names ("qwen2").
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
nn::DecoderForCausalLM<T, B> load_decoder(const std::string& dir, const json& config, const std::string& config_path,
                                          const nn::DecoderFamily& family) {
  const nn::DecoderConfig cfg = decoder_config_from_json(config, config_path, family);
  auto lora = read_lora(dir, Family::qwen2);
  nn::DecoderForCausalLM<T, B> model(cfg, lora, 0);
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
  return detail::load_decoder<T, B>(dir, j, path, nn::kQwen2Family);
}

// A checkpoint of a decoder family (model_type llama, mistral, qwen2, qwen3).
template <class T, class B = CpuBackend>
nn::DecoderForCausalLM<T, B> load_decoder(const std::string& dir) {
  std::string path;
  const nlohmann::json j = detail::read_config(dir, path, nullptr);
  const std::string mt = detail::model_type_of(j, path);
  const nn::DecoderFamily* family = nn::decoder_family(mt);
  if (!family) fail<InputError>("{}: model_type '{}' is not a decoder family (llama, mistral, qwen2, qwen3)", path, mt);
  return detail::load_decoder<T, B>(dir, j, path, *family);
}

// GPT-2, or one decoder class for every family of nn/families.hpp (the
// family is in its config; model_type() names it).
template <class T, class B = CpuBackend>
using AnyModel = std::variant<nn::Gpt2LMHeadModel<T, B>, nn::DecoderForCausalLM<T, B>>;

// Any supported family, by config.json's model_type.
template <class T, class B = CpuBackend>
AnyModel<T, B> load_model(const std::string& dir) {
  using V = AnyModel<T, B>;
  std::string path;
  const nlohmann::json j = detail::read_config(dir, path, nullptr);
  const std::string mt = detail::model_type_of(j, path);
  if (mt == "gpt2") return V(std::in_place_index<0>, detail::load_gpt2<T, B>(dir, j, path));
  if (const nn::DecoderFamily* family = nn::decoder_family(mt))
    return V(std::in_place_index<1>, detail::load_decoder<T, B>(dir, j, path, *family));
  std::vector<std::string> known{"gpt2"};
  for (const nn::DecoderFamily* f : nn::kDecoderFamilies) known.emplace_back(f->model_type);
  fail<InputError>("{}: model_type '{}' is not supported ({})", path, mt, fmt::join(known, ", "));
}

}  // namespace entropy_probe::hf
