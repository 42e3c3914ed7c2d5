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
#include <fmt/ranges.h>
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
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

namespace entropy_probe::hf {

namespace detail {

// Weight layout and LoRA module names: GPT-2, or the decoder families of
// nn/families.hpp, which share Qwen2's names ("qwen2").
// GPT-2 (Conv1D weights, transformer.* keys) or the Llama-style decoder of
// every other family (nn/decoder.hpp).
enum class Family { gpt2, decoder };
inline const char* family_name(Family f) { return f == Family::gpt2 ? "gpt2" : "Llama-style decoder"; }

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

// With an adapter every trained parameter (LoRA tensors, modules_to_save,
// trained biases) is in the adapter file under its registry name, which is
// PEFT's key; every frozen one is a base weight under its Hugging Face key
// (the module path and leaf, without ".base_layer" or ".original_module").
inline Placement place(const std::string& name, bool with_adapter, bool trained, Family family) {
  Placement p;
  if (with_adapter && !starts_with(name, nn::kPeftPrefix))
    fail<UsageError>("hf: parameter '{}' lacks the PEFT prefix '{}'", name, nn::kPeftPrefix);
  const nn::PeftName n = nn::parse_peft_name(name);
  const std::string hf_key = n.module + "." + n.leaf;
  p.adapter = with_adapter && trained;
  p.key = p.adapter ? name : hf_key;
  if (family == Family::gpt2) {
    if (!p.adapter && starts_with(hf_key, "transformer."))
      p.alt_key = hf_key.substr(std::string("transformer.").size());
    p.transpose = !n.lora && is_gpt2_conv1d_weight(hf_key);  // a saved Conv1D keeps its layout in the adapter too
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
  // Every tensor key of the base weights.
  const std::map<std::string, std::size_t>& keys() const { return where_; }
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

// Loads `view` into `param`'s storage, checking dtype and shape (transposing
// a Hugging Face [in, out] Conv1D weight into [out, in]). Each element is
// converted once, straight into the parameter on the CPU (through one host
// buffer on a device).
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
  const index_t n = param.value.numel();
  auto convert = [&](T* dst) {
    const bool same = (view.dtype == safetensors::Dtype::F32 && std::is_same_v<T, float>) ||
                      (view.dtype == safetensors::Dtype::F64 && std::is_same_v<T, double>);
    if (!transpose && same) {
      if (n > 0) std::memcpy(dst, view.bytes.data(), static_cast<std::size_t>(n) * sizeof(T));
    } else if (!transpose) {
      for (index_t k = 0; k < n; ++k) dst[k] = static_cast<T>(view.element(k));
    } else {
      const index_t out = want[0], in = want[1];
      for (index_t i = 0; i < in; ++i)
        for (index_t o = 0; o < out; ++o) dst[o * in + i] = static_cast<T>(view.element(i * out + o));
    }
  };
  if constexpr (std::is_same_v<B, CpuBackend>) {
    convert(param.value.data());
  } else {
    std::vector<T> host(static_cast<std::size_t>(n));
    convert(host.data());
    B::upload(param.value.data(), host.data(), n);
  }
}

// adapter_config.json of `dir`, when present.
inline std::optional<nn::LoraConfig> read_lora(const std::string& dir) {
  const std::string cfg = join_path(dir, "adapter_config.json");
  const std::string weights = join_path(dir, "adapter_model.safetensors");
  if (!is_file(cfg)) {
    if (is_file(weights))
      fail<InputError>("{}: found without adapter_config.json, so the adapter's r, lora_alpha and targets are unknown",
                       weights);
    return std::nullopt;
  }
  return lora_config_from_json(read_json_file(cfg), cfg);
}

inline std::string targets_str(const nn::LoraConfig& l) {
  return l.target_regex ? fmt::format("\"{}\"", *l.target_regex)
                        : fmt::format("[{}]", fmt::join(l.target_modules, ", "));
}

// rank_pattern and alpha_pattern must give module `m` one value each.
inline void check_one_pattern_value(const nn::LoraConfig& lora, const std::string& m, const std::string& path) {
  auto one_value = [&](const auto& patterns, const char* field) {
    const auto hits = nn::LoraConfig::pattern_hits(patterns, m);
    for (const auto* h : hits)
      if (h->second != hits.front()->second)
        fail<InputError>(
            "{}: field '{}' has patterns '{}' and '{}' that both match module '{}' with different values ({} and "
            "{}); PEFT takes the first in file order, which this reader does not keep",
            path, field, hits.front()->first, h->first, m, hits.front()->second, h->second);
  };
  one_value(lora.rank_pattern, "rank_pattern");
  one_value(lora.alpha_pattern, "alpha_pattern");
}

// A checkpoint directory's files, opened (headers only: the tensors stay
// memory-mapped) before any model memory is allocated.
struct CheckpointFiles {
  std::string dir, config_path, adapter_config_path, adapter_path;
  BaseWeights base;
  std::optional<nn::LoraConfig> lora;
  std::optional<safetensors::File> adapter;

  CheckpointFiles(const std::string& d, const std::string& config)
      : dir(d),
        config_path(config),
        adapter_config_path(join_path(d, "adapter_config.json")),
        adapter_path(join_path(d, "adapter_model.safetensors")),
        base(d),
        lora(read_lora(d)) {
    if (!lora) return;
    if (!is_file(adapter_path)) {
      if (is_file(join_path(dir, "adapter_model.bin")))
        fail<InputError>("{}: missing; the adapter is a PyTorch pickle (adapter_model.bin), save it as safetensors",
                         adapter_path);
      fail<InputError>("{}: missing (adapter_config.json is present)", adapter_path);
    }
    adapter.emplace(safetensors::File::open(adapter_path));
    // A LoRA rank the adapter file contradicts is refused before the model
    // allocates adapters of that rank.
    for (const auto& t : adapter->tensors()) {
      if (!ends_with(t.name, ".lora_A.weight") || t.shape.size() != 2) continue;
      const nn::PeftName n = nn::parse_peft_name(t.name);
      check_one_pattern_value(*lora, n.module, adapter_config_path);
      if (const auto a = lora->adapter_for(n.module); a && a->r != t.shape[0])
        fail<InputError>("{}: tensor '{}' has rank {}, but {} gives module '{}' r = {} (r, rank_pattern)", adapter_path,
                         t.name, t.shape[0], adapter_config_path, n.module, a->r);
    }
  }

  // The base tensor `key` (GPT-2: with or without "transformer.").
  const safetensors::TensorView* find_base(const std::string& key) const {
    auto [file, view] = base.find(key);
    if (!view && starts_with(key, "transformer.")) std::tie(file, view) = base.find(key.substr(12));
    return view;
  }
};

// What config.json implies about the base weights, compared with the
// safetensors headers before the model is built, so a config that
// disagrees with its weights is refused by name and never allocates (a
// family lists one entry per size its config sets).
struct ImpliedDim {
  const char* field;  // the config.json field
  index_t value;
  std::string key;  // a base tensor whose dimension `dim` is that size
  std::size_t dim;
};

inline void check_config_against_weights(const CheckpointFiles& f, const std::vector<ImpliedDim>& dims,
                                         const char* layers_field, index_t layers,
                                         const std::vector<std::string>& layer_prefixes) {
  for (const ImpliedDim& d : dims) {
    const safetensors::TensorView* v = f.find_base(d.key);
    if (!v) continue;  // the per-parameter load names a missing tensor
    if (v->shape.size() <= d.dim || v->shape[d.dim] != d.value)
      fail<InputError>("{}: field '{}' = {} disagrees with {}: tensor '{}' has shape {} (dimension {} is '{}')",
                       f.config_path, d.field, d.value, f.base.label(), v->name, shape_str(v->shape), d.dim, d.field);
  }
  std::set<index_t> found;
  for (const auto& entry : f.base.keys())
    for (const std::string& prefix : layer_prefixes) {
      if (!starts_with(entry.first, prefix)) continue;
      const std::string rest = entry.first.substr(prefix.size());
      const auto dot = rest.find('.');
      const std::string idx = rest.substr(0, dot);
      if (dot == std::string::npos || idx.empty() || idx.size() > 12 ||
          !std::all_of(idx.begin(), idx.end(), [](char c) { return c >= '0' && c <= '9'; }))
        continue;
      found.insert(std::stoll(idx));
    }
  const bool contiguous = found.empty() || (*found.begin() == 0 && *found.rbegin() == index_t(found.size()) - 1);
  if (index_t(found.size()) != layers || !contiguous)
    fail<InputError>("{}: field '{}' = {} disagrees with {}: it holds {} layers{}", f.config_path, layers_field, layers,
                     f.base.label(), found.size(),
                     found.empty() ? std::string()
                                   : fmt::format(" (indices {} to {} under '{}')", *found.begin(), *found.rbegin(),
                                                 layer_prefixes.front()));
}

// The modules PEFT's settings select must be modules this model can treat
// as PEFT does: adapters on linear layers, modules_to_save on modules with
// their own parameters, and a rank_pattern / alpha_pattern that gives each
// module one value.
template <class Model>
void check_peft_selection(Model& model, const nn::LoraConfig& lora, const std::string& path, Family family) {
  using T = typename Model::scalar_type;
  using B = typename Model::backend_type;
  std::set<std::string> owners{"lm_head"}, containers, adapted, biased;
  model.named_parameters(ParameterVisitor<T, B>([&](const std::string& name, Parameter<T, B>&) {
    const nn::PeftName n = nn::parse_peft_name(name);
    owners.insert(n.module);
    if (n.lora) adapted.insert(n.module);
    if (n.leaf == "bias") biased.insert(n.module);
    for (auto dot = n.module.rfind('.'); dot != std::string::npos; dot = n.module.rfind('.', dot - 1)) {
      containers.insert(n.module.substr(0, dot));
      if (dot == 0) break;
    }
  }));
  for (const auto* set : {&owners, &containers})
    for (const std::string& m : *set)
      if (lora.targets(m) && !adapted.count(m))
        fail<InputError>(
            "{}: field 'target_modules' = {} selects module '{}', which is {}; LoRA is supported on the linear "
            "layers of a {} model",
            path, targets_str(lora), m,
            set == &containers ? "a container of other modules"
            : m == "lm_head"   ? "the output head"
                               : "an embedding or a norm",
            family_name(family));
  if (adapted.empty())
    fail<InputError>("{}: field 'target_modules' = {} selects no linear layer of this {} model{}", path,
                     targets_str(lora), family_name(family),
                     lora.layers_to_transform.empty()
                         ? ""
                         : fmt::format(" (layers_to_transform [{}])", fmt::join(lora.layers_to_transform, ", ")));
  for (const std::string& m : adapted) check_one_pattern_value(lora, m, path);
  for (const std::string& e : lora.modules_to_save) {
    bool any = false;
    for (const std::string& m : containers)
      if (ends_with(m, e) && !owners.count(m))
        fail<InputError>(
            "{}: field 'modules_to_save' entry '{}' names '{}', a container of other modules; only modules with "
            "their own parameters (embeddings, norms, linear layers, lm_head) are supported",
            path, e, m);
    for (const std::string& m : owners) any = any || ends_with(m, e);
    // peft 0.21 saves such a bias three times under keys that name its
    // wrapper (modules_to_save.bias, original_module.bias), not one parameter.
    if (lora.bias == nn::LoraBias::all)
      for (const std::string& m : biased)
        if (ends_with(m, e))
          fail<InputError>(
              "{}: field 'bias' = 'all' together with modules_to_save entry '{}' (module '{}', which has a bias) is "
              "not supported: peft saves that bias under wrapper keys that name no single parameter",
              path, e, m);
    if (!any)
      fail<InputError>("{}: field 'modules_to_save' entry '{}' names no module of this {} model", path, e,
                       family_name(family));
  }
}

// Fills every parameter of `model` from the checkpoint's files.
template <class Model>
void load_weights(Model& model, const CheckpointFiles& f, Family family) {
  using T = typename Model::scalar_type;
  using B = typename Model::backend_type;
  const std::optional<nn::LoraConfig>& lora = f.lora;
  std::vector<std::pair<std::string, Parameter<T, B>*>> params;
  model.named_parameters(
      ParameterVisitor<T, B>([&](const std::string& name, Parameter<T, B>& p) { params.emplace_back(name, &p); }));

  std::map<std::string, std::pair<Parameter<T, B>*, bool>> from_adapter;  // key -> parameter, transpose
  for (auto& [name, p] : params) {
    const Placement pl = place(name, lora.has_value(), p->requires_grad, family);
    if (pl.adapter) {
      from_adapter.emplace(pl.key, std::pair{p, pl.transpose});
      continue;
    }
    auto [file, view] = f.base.find(pl.key);
    if (!view && !pl.alt_key.empty()) std::tie(file, view) = f.base.find(pl.alt_key);
    if (!view)
      fail<InputError>("{}: missing tensor '{}'{} (model parameter '{}')", f.base.label(), pl.key,
                       pl.alt_key.empty() ? std::string() : fmt::format(" (or '{}')", pl.alt_key), name);
    load_into(*p, *file, *view, pl.transpose, "from " + f.config_path);
  }
  if (!lora) return;

  const std::string& path = f.adapter_path;
  const std::string settings = fmt::format("target_modules {}, modules_to_save [{}], bias '{}'", targets_str(*lora),
                                           fmt::join(lora->modules_to_save, ", "),
                                           lora->bias == nn::LoraBias::all         ? "all"
                                           : lora->bias == nn::LoraBias::lora_only ? "lora_only"
                                                                                   : "none");
  std::set<std::string> loaded;
  for (const auto& view : f.adapter->tensors()) {
    auto it = from_adapter.find(view.name);
    if (it == from_adapter.end()) {
      const nn::PeftName n = nn::parse_peft_name(view.name);
      const bool exists = std::any_of(params.begin(), params.end(),
                                      [&](const auto& np) { return nn::parse_peft_name(np.first).module == n.module; });
      std::string why;
      if (!exists)
        why = fmt::format("the model has no module '{}'", n.module);
      else if (n.lora)
        why = fmt::format("module '{}' has no adapter ({})", n.module, settings);
      else
        why = fmt::format("it is not a parameter the adapter trains ({})", settings);
      fail<InputError>("{}: tensor '{}' does not name a parameter the adapter can hold: {}", path, view.name, why);
    }
    load_into(*it->second.first, *f.adapter, view, it->second.second,
              "from " + f.adapter_config_path + " and " + f.config_path);
    loaded.insert(view.name);
  }
  for (const auto& [name, p] : from_adapter)
    if (!loaded.count(name))
      fail<InputError>("{}: missing tensor '{}' (a parameter the adapter trains: r {}, {})", path, name, lora->r,
                       settings);
}

inline void check_directory(const std::string& dir) {
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) fail<InputError>("{}: not a checkpoint directory", dir);
}

inline std::string model_type_of(const json& j, const std::string& path) {
  return *get_string(j, path, "model_type", true);
}

// Builds the model from the files: sizes checked against the weight headers,
// storage allocated without initialisation, then filled.
template <class Model, class Config>
Model build_from_files(const Config& cfg, const CheckpointFiles& f, Family family) {
  Model model(cfg, f.lora, std::nullopt);
  if (f.lora) check_peft_selection(model, *f.lora, f.adapter_config_path, family);
  load_weights(model, f, family);
  return model;
}

template <class T, class B>
nn::Gpt2LMHeadModel<T, B> load_gpt2(const std::string& dir, const json& config, const std::string& config_path) {
  const nn::Gpt2Config c = gpt2_config_from_json(config, config_path);
  const CheckpointFiles f(dir, config_path);
  check_config_against_weights(f,
                               {{"vocab_size", c.vocab_size, "transformer.wte.weight", 0},
                                {"n_embd", c.n_embd, "transformer.wte.weight", 1},
                                {"n_positions", c.n_positions, "transformer.wpe.weight", 0},
                                {"n_embd", c.n_embd, "transformer.h.0.mlp.c_fc.weight", 0}},
                               "n_layer", c.n_layer, {"transformer.h.", "h."});
  return build_from_files<nn::Gpt2LMHeadModel<T, B>>(c, f, Family::gpt2);
}

template <class T, class B>
nn::DecoderForCausalLM<T, B> load_decoder(const std::string& dir, const json& config, const std::string& config_path,
                                          const nn::DecoderFamily& family) {
  const nn::DecoderConfig c = decoder_config_from_json(config, config_path, family);
  const CheckpointFiles f(dir, config_path);
  check_config_against_weights(f,
                               {{"vocab_size", c.vocab_size, "model.embed_tokens.weight", 0},
                                {"hidden_size", c.hidden_size, "model.embed_tokens.weight", 1},
                                {"vocab_size", c.vocab_size, "lm_head.weight", 0},
                                {"hidden_size", c.hidden_size, "lm_head.weight", 1},
                                {"intermediate_size", c.intermediate_size, "model.layers.0.mlp.up_proj.weight", 0}},
                               "num_hidden_layers", c.num_hidden_layers, {"model.layers."});
  return build_from_files<nn::DecoderForCausalLM<T, B>>(c, f, Family::decoder);
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
