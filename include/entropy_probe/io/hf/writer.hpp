// Writing a model as a Hugging Face checkpoint directory (tests, examples):
// config.json, model.safetensors and, with LoRA, adapter_config.json and
// adapter_model.safetensors, in the layouts the loader reads.
#pragma once

#include "entropy_probe/core/error.hpp"
#include "entropy_probe/io/hf/json_fields.hpp"
#include "entropy_probe/io/hf/weights.hpp"
#include "entropy_probe/io/safetensors.hpp"
#include "entropy_probe/module/registry.hpp"
#include "entropy_probe/nn/families.hpp"
#include "entropy_probe/nn/gpt2.hpp"
#include "entropy_probe/nn/lora_config.hpp"

#include <Eigen/Core>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace entropy_probe::hf {

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
  auto list_or_regex = [](const std::vector<std::string>& list, const std::optional<std::string>& regex) {
    return regex ? json(*regex) : list.empty() ? json(nullptr) : json(list);
  };
  auto patterns = [](const auto& ps) {
    json o = json::object();
    for (const auto& [k, v] : ps) o[k] = v;
    return o;
  };
  json j = {{"peft_type", "LORA"},
            {"task_type", "CAUSAL_LM"},
            {"r", l.r},
            {"lora_alpha", l.lora_alpha},
            {"lora_dropout", 0.0},
            {"target_modules", list_or_regex(l.target_modules, l.target_regex)},
            {"exclude_modules", list_or_regex(l.exclude_modules, l.exclude_regex)},
            {"rank_pattern", patterns(l.rank_pattern)},
            {"alpha_pattern", patterns(l.alpha_pattern)},
            {"use_rslora", l.use_rslora},
            {"fan_in_fan_out", family == Family::gpt2},
            {"bias", l.bias == nn::LoraBias::all         ? "all"
                     : l.bias == nn::LoraBias::lora_only ? "lora_only"
                                                         : "none"}};
  j["layers_to_transform"] = l.layers_to_transform.empty() ? json(nullptr) : json(l.layers_to_transform);
  j["layers_pattern"] = l.layers_pattern.empty() ? json(nullptr) : json(l.layers_pattern);
  j["modules_to_save"] = l.modules_to_save.empty() ? json(nullptr) : json(l.modules_to_save);
  return j;
}

// Trained parameters go to the adapter file under their registry names; the
// base file holds every base weight (a trained module's too, as in a real
// base checkpoint), a frozen original taking precedence over its trained copy.
template <class Model>
void save_weights(Model& model, const std::string& dir, const std::optional<nn::LoraConfig>& lora, Family family,
                  safetensors::Dtype dtype, bool write_lm_head_to_base) {
  using T = typename Model::scalar_type;
  using B = typename Model::backend_type;
  std::map<std::string, safetensors::OutTensor> base, adapter;
  model.named_parameters(ParameterVisitor<T, B>([&](const std::string& name, Parameter<T, B>& p) {
    const Placement pl = place(name, lora.has_value(), p.requires_grad, family);
    std::vector<T> v = p.value.to_host();
    Shape shape = p.value.shape();
    if (pl.transpose) {
      const index_t out = shape[0], in = shape[1];
      std::vector<T> t(v.size());
      for (index_t o = 0; o < out; ++o)
        for (index_t i = 0; i < in; ++i)
          t[static_cast<std::size_t>(i * out + o)] = v[static_cast<std::size_t>(o * in + i)];
      v = std::move(t);
      shape = {in, out};
    }
    if (!pl.adapter) {
      base.insert_or_assign(pl.key, out_tensor(shape, v, dtype));
      return;
    }
    adapter.emplace(pl.key, out_tensor(shape, v, dtype));
    const nn::PeftName n = nn::parse_peft_name(name);
    const std::string hf_key = n.module + "." + n.leaf;
    // A tied head has no base tensor of its own.
    if (!n.lora && (hf_key != "lm_head.weight" || write_lm_head_to_base))
      base.emplace(hf_key, out_tensor(shape, v, dtype));
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
  detail::write_json_file(detail::join_path(dir, "config.json"),
                          {{"model_type", "gpt2"},
                           {"architectures", {"GPT2LMHeadModel"}},
                           {"vocab_size", c.vocab_size},
                           {"n_positions", c.n_positions},
                           {"n_embd", c.n_embd},
                           {"n_layer", c.n_layer},
                           {"n_head", c.n_head},
                           {"n_inner", c.n_inner > 0 ? nlohmann::json(c.n_inner) : nlohmann::json(nullptr)},
                           {"layer_norm_epsilon", c.layer_norm_epsilon},
                           {"activation_function", nn::activation_name(c.activation)},
                           {"scale_attn_weights", c.scale_attn_weights},
                           {"scale_attn_by_inverse_layer_idx", c.scale_attn_by_inverse_layer_idx},
                           {"tie_word_embeddings", true}});
  detail::save_weights(model, dir, model.lora(), detail::Family::gpt2, dtype, false);
}

namespace detail {

// rope_parameters as transformers 5 writes them.
inline json rope_parameters_json(const nn::DecoderConfig& c) {
  using Type = RopeParameters::Type;
  const RopeParameters& r = c.rope_scaling;
  json j = {{"rope_type", RopeParameters::type_name(r.type)}, {"rope_theta", c.rope_theta}};
  if (r.type != Type::plain) j["factor"] = r.factor;
  if (r.type == Type::yarn || r.type == Type::llama3)
    j["original_max_position_embeddings"] = r.original_max_position_embeddings;
  if (r.type == Type::llama3) {
    j["low_freq_factor"] = r.low_freq_factor;
    j["high_freq_factor"] = r.high_freq_factor;
  }
  if (r.type == Type::yarn) {
    j["beta_fast"] = r.beta_fast;
    j["beta_slow"] = r.beta_slow;
    j["truncate"] = r.truncate;
    if (r.attention_factor > 0) j["attention_factor"] = r.attention_factor;
    if (r.mscale != 0) j["mscale"] = r.mscale;
    if (r.mscale_all_dim != 0) j["mscale_all_dim"] = r.mscale_all_dim;
  }
  return j;
}

inline json decoder_config_json(const nn::DecoderConfig& c) {
  const nn::DecoderFamily& f = *c.family;
  json j = {{"model_type", f.model_type},
            {"architectures", {f.architecture}},
            {"vocab_size", c.vocab_size},
            {"hidden_size", c.hidden_size},
            {"intermediate_size", c.intermediate_size},
            {"num_hidden_layers", c.num_hidden_layers},
            {"num_attention_heads", c.num_attention_heads},
            {"num_key_value_heads", c.num_key_value_heads},
            {"head_dim", c.head_dim()},
            {"max_position_embeddings", c.max_position_embeddings},
            {"rms_norm_eps", c.rms_norm_eps},
            {"rope_parameters", rope_parameters_json(c)},
            {"hidden_act", nn::activation_name(c.hidden_act)},
            {"tie_word_embeddings", c.tie_word_embeddings}};
  if (f.reads_attention_bias) j["attention_bias"] = c.attention_bias;
  if (f.reads_mlp_bias) j["mlp_bias"] = c.mlp_bias;
  using SW = nn::DecoderFamily::SlidingWindow;
  const bool sliding = !c.sliding_layers.empty();
  if (f.sliding == SW::all_layers) {
    if (sliding && static_cast<index_t>(c.sliding_layers.size()) != c.num_hidden_layers)
      fail<UsageError>("hf: a {} model slides on every layer or none, not on [{}]", f.model_type,
                       fmt::join(c.sliding_layers, ", "));
    j["sliding_window"] = sliding ? json(c.sliding_window) : json(nullptr);
  } else if (f.sliding == SW::qwen_layers) {
    j["use_sliding_window"] = sliding;
    j["sliding_window"] = sliding ? json(c.sliding_window) : json(nullptr);
    json types = json::array();
    for (index_t l = 0; l < c.num_hidden_layers; ++l)
      types.push_back(std::find(c.sliding_layers.begin(), c.sliding_layers.end(), l) != c.sliding_layers.end()
                          ? "sliding_attention"
                          : "full_attention");
    j["layer_types"] = types;
  } else if (sliding) {
    fail<UsageError>("hf: a {} model has no sliding-window attention", f.model_type);
  }
  return j;
}

}  // namespace detail

// A decoder family's checkpoint (Qwen2, Llama, Mistral, Qwen3): config.json
// as transformers 5 writes it (rope_parameters), weights under "model.".
template <class T, class B>
void save_pretrained(nn::DecoderForCausalLM<T, B>& model, const std::string& dir,
                     safetensors::Dtype dtype = safetensors::Dtype::F32) {
  std::filesystem::create_directories(dir);
  const nn::DecoderConfig& c = model.config();
  detail::write_json_file(detail::join_path(dir, "config.json"), detail::decoder_config_json(c));
  detail::save_weights(model, dir, model.lora(), detail::Family::decoder, dtype, !c.tie_word_embeddings);
}

}  // namespace entropy_probe::hf
