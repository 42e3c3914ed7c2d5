// Layers as ordinary Modules, written the way a user would write their own:
// parameters as members, named_parameters() listing them, forward() calling
// tape ops. Names follow PyTorch / PEFT so registry names match checkpoints.
#pragma once

#include "entropy_probe/module/bind.hpp"
#include "entropy_probe/module/module.hpp"
#include "entropy_probe/nn/lora_config.hpp"
#include "entropy_probe/tape/ops/elementwise.hpp"
#include "entropy_probe/tape/ops/embedding.hpp"
#include "entropy_probe/tape/ops/linear.hpp"
#include "entropy_probe/tape/ops/norm.hpp"

#include <cmath>
#include <optional>
#include <random>

namespace entropy_probe::nn {

template <class T, class B>
Tensor<T, B> random_normal(Shape shape, std::mt19937_64& rng, double stddev) {
  std::vector<T> host(static_cast<std::size_t>(numel_of(shape)));
  std::normal_distribution<double> nd(0.0, stddev);
  for (auto& x : host) x = static_cast<T>(nd(rng));
  return Tensor<T, B>::from_host(std::move(shape), host);
}

template <class T, class B>
Tensor<T, B> random_uniform(Shape shape, std::mt19937_64& rng, double bound) {
  std::vector<T> host(static_cast<std::size_t>(numel_of(shape)));
  std::uniform_real_distribution<double> ud(-bound, bound);
  for (auto& x : host) x = static_cast<T>(ud(rng));
  return Tensor<T, B>::from_host(std::move(shape), host);
}

// Random N(0, stddev^2) values, or, without a generator, storage the
// checkpoint loader fills (a model built to be loaded is never initialised).
template <class T, class B>
Tensor<T, B> random_normal_or_unset(Shape shape, std::mt19937_64* rng, double stddev) {
  return rng ? random_normal<T, B>(std::move(shape), *rng, stddev) : Tensor<T, B>::uninitialized(std::move(shape));
}

// A linear layer y = x W^T + b, optionally LoRA-adapted:
// y += scale * (x A^T) B^T. The base weight and bias are frozen once an
// adapter is attached (PEFT's behaviour); names then follow PEFT
// ("base_layer.weight", "lora_A.weight", "lora_B.weight").
template <class T, class B = CpuBackend>
struct LoraLinear {
  using scalar_type = T;
  using backend_type = B;

  LoraLinear() = default;
  LoraLinear(index_t in, index_t out, bool with_bias)
      : weight(Tensor<T, B>({out, in})), in_features(in), out_features(out) {
    if (with_bias) bias.emplace(Tensor<T, B>({out}));
  }

  // Attaches an adapter of rank r. PEFT's default initialisation: A
  // Kaiming-uniform (bound 1/sqrt(in)), B zero, so the adapted layer starts
  // equal to the base layer.
  // Without a generator A and B are left for the loader to fill.
  void add_lora(index_t r, double scale_value, std::mt19937_64* rng, bool zero_b = true) {
    if (r < 1) fail<UsageError>("LoraLinear::add_lora: rank {} < 1", r);
    if (!rng) {
      lora_A.emplace(Tensor<T, B>::uninitialized({r, in_features}));
      lora_B.emplace(Tensor<T, B>::uninitialized({out_features, r}));
    } else {
      lora_A.emplace(random_uniform<T, B>({r, in_features}, *rng, 1.0 / std::sqrt(double(in_features))));
      lora_B.emplace(zero_b ? Tensor<T, B>({out_features, r})
                            : random_uniform<T, B>({out_features, r}, *rng, 1.0 / std::sqrt(double(r))));
    }
    scale = static_cast<T>(scale_value);
    weight.requires_grad = false;
    if (bias) bias->requires_grad = false;
  }
  bool has_lora() const { return lora_A.has_value(); }

  void named_parameters(const ParameterVisitor<T, B>& v) {
    const std::string base = has_lora() ? "base_layer." : "";
    v(base + "weight", weight);
    if (bias) v(base + "bias", *bias);
    if (lora_A) v("lora_A.weight", *lora_A);
    if (lora_B) v("lora_B.weight", *lora_B);
  }

  Var forward(Tape<T, B>& tape, Var x) {
    std::optional<Var> b;
    if (bias) b = use(tape, *bias);
    if (!has_lora()) return linear(tape, x, use(tape, weight), b);
    return lora_linear(tape, x, use(tape, weight), b, use(tape, *lora_A), use(tape, *lora_B), scale);
  }

  Parameter<T, B> weight;  // [out, in]
  std::optional<Parameter<T, B>> bias;
  std::optional<Parameter<T, B>> lora_A;  // [r, in]
  std::optional<Parameter<T, B>> lora_B;  // [out, r]
  T scale = T(0);
  index_t in_features = 0;
  index_t out_features = 0;
};

// A linear layer with base weights drawn from N(0, 0.02^2) and zero bias,
// or, without a generator, left for the loader to fill.
template <class T, class B>
LoraLinear<T, B> random_linear(index_t in, index_t out, bool with_bias, std::mt19937_64* rng) {
  LoraLinear<T, B> l;
  l.in_features = in;
  l.out_features = out;
  l.weight = Parameter<T, B>(random_normal_or_unset<T, B>({out, in}, rng, 0.02));
  if (with_bias) l.bias.emplace(rng ? Tensor<T, B>({out}) : Tensor<T, B>::uninitialized({out}));
  return l;
}

// Attaches the adapter `lora` gives the linear module at `path`, if any
// (PEFT's target rules, rank_pattern and alpha_pattern).
template <class T, class B>
void attach_adapter(LoraLinear<T, B>& lin, const std::string& path, const LoraConfig& lora, std::mt19937_64* rng) {
  if (const auto a = lora.adapter_for(path)) lin.add_lora(a->r, a->scale, rng, lora.init_lora_b_zero);
}

// PEFT's get_peft_model trainability, from the registry names alone: LoRA
// tensors, every parameter of a modules_to_save module and the biases
// `bias` names are trained; everything else (and the frozen original of a
// module PEFT copied, "<path>.original_module.weight") is frozen.
template <class M>
void set_peft_trainable(M& model, const LoraConfig& lora) {
  using T = typename M::scalar_type;
  using B = typename M::backend_type;
  model.named_parameters(ParameterVisitor<T, B>([&](const std::string& name, Parameter<T, B>& p) {
    const PeftName n = parse_peft_name(name);
    p.requires_grad =
        n.lora || (!n.original && (lora.saves(n.module) || (n.leaf == "bias" && lora.trains_bias(n.adapted))));
  }));
}

// The MLP activations of transformers' ACT2FN that the families use:
// gelu_tanh ("gelu_new", "gelu_pytorch_tanh"), gelu_erf ("gelu"), relu, silu.
enum class Activation { gelu_tanh, gelu_erf, relu, silu };

inline const char* activation_name(Activation a) {
  switch (a) {
    case Activation::gelu_tanh:
      return "gelu_new";
    case Activation::gelu_erf:
      return "gelu";
    case Activation::relu:
      return "relu";
    case Activation::silu:
      return "silu";
  }
  return "?";
}

template <class T, class B>
Var activate(Tape<T, B>& tape, Var x, Activation a) {
  switch (a) {
    case Activation::gelu_tanh:
      return gelu_tanh(tape, x);
    case Activation::gelu_erf:
      return gelu_erf(tape, x);
    case Activation::relu:
      return relu(tape, x);
    case Activation::silu:
      return silu(tape, x);
  }
  fail<UsageError>("activate: unknown activation {}", static_cast<int>(a));
}

// act(gate) * up as one op (gated_activation): a gated MLP's product
// (SwiGLU for silu), the same values as mul(activate(gate, a), up).
template <class T, class B>
Var gated_activate(Tape<T, B>& tape, Var gate, Var up, Activation a) {
  switch (a) {
    case Activation::gelu_tanh:
      return gated_activation<GeluTanh>(tape, gate, up);
    case Activation::gelu_erf:
      return gated_activation<GeluErf>(tape, gate, up);
    case Activation::relu:
      return gated_activation<Relu>(tape, gate, up);
    case Activation::silu:
      return gated_activation<Silu>(tape, gate, up);
  }
  fail<UsageError>("gated_activate: unknown activation {}", static_cast<int>(a));
}

template <class T, class B = CpuBackend>
struct LayerNorm {
  using scalar_type = T;
  using backend_type = B;
  LayerNorm() = default;
  LayerNorm(index_t d, double eps_value)
      : weight(Tensor<T, B>::full({d}, T(1))), bias(Tensor<T, B>({d})), eps(eps_value) {}
  void named_parameters(const ParameterVisitor<T, B>& v) {
    v("weight", weight);
    v("bias", bias);
  }
  Var forward(Tape<T, B>& tape, Var x) { return layer_norm(tape, x, use(tape, weight), use(tape, bias), eps); }
  Parameter<T, B> weight, bias;
  double eps = 1e-5;
};

template <class T, class B = CpuBackend>
struct RmsNorm {
  using scalar_type = T;
  using backend_type = B;
  RmsNorm() = default;
  RmsNorm(index_t d, double eps_value) : weight(Tensor<T, B>::full({d}, T(1))), eps(eps_value) {}
  void named_parameters(const ParameterVisitor<T, B>& v) { v("weight", weight); }
  Var forward(Tape<T, B>& tape, Var x) { return rms_norm(tape, x, use(tape, weight), eps); }
  Parameter<T, B> weight;
  double eps = 1e-6;
};

}  // namespace entropy_probe::nn
