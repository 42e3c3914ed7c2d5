// Adam state files, optimizer.safetensors (load_adam_state /
// save_adam_state, docs/checkpoints.md).
#pragma once

#include "entropy_probe/core/error.hpp"
#include "entropy_probe/core/log.hpp"
#include "entropy_probe/io/hf/json_fields.hpp"
#include "entropy_probe/io/safetensors.hpp"
#include "entropy_probe/module/registry.hpp"
#include "entropy_probe/optim/adam.hpp"

#include <fmt/format.h>

#include <charconv>
#include <cmath>
#include <cstring>
#include <map>
#include <span>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

namespace entropy_probe::hf {

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

// optimizer.safetensors (docs/checkpoints.md): `<name>.exp_avg`,
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
