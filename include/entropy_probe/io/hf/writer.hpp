// Writing a model as a Hugging Face checkpoint directory (tests, examples):
// config.json, model.safetensors and, with LoRA, adapter_config.json and
// adapter_model.safetensors, in the layouts the loader reads.
#pragma once

#include "entropy_probe/core/error.hpp"
#include "entropy_probe/io/hf/json_fields.hpp"
#include "entropy_probe/io/hf/weights.hpp"
#include "entropy_probe/io/safetensors.hpp"
#include "entropy_probe/module/registry.hpp"
#include "entropy_probe/nn/gpt2.hpp"
#include "entropy_probe/nn/lora_config.hpp"
#include "entropy_probe/nn/qwen2.hpp"

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

}  // namespace entropy_probe::hf
