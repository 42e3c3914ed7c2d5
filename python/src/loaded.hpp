// A checkpoint the Python package has loaded, in one scalar type on one
// backend: bindings.cpp holds it behind Loaded, and cuda.cu (a build with
// ENTROPY_PROBE_CUDA, compiled by nvcc) makes the CudaBackend ones. The
// probe runs through the code of `entropy-probe run` (run_typed.hpp), the
// sampler through sample_responses, as the command's do.
#pragma once

#include "run_typed.hpp"

#include <entropy_probe/entropy_probe.hpp>
#include <entropy_probe/io/hf.hpp>
#include <entropy_probe/sample/sampling.hpp>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <variant>
#include <vector>

namespace ep_py {

namespace ep = entropy_probe;

// A TokenBatch with the name its errors use (the file, or "E batch").
struct Batch {
  ep::TokenBatch batch;
  std::string name;
};

class Loaded {
 public:
  virtual ~Loaded() = default;
  // `o`: `entropy-probe run`'s options, parsed from Checkpoint.run's (dtype and device are this checkpoint's).
  // Returns the result as JSON text.
  virtual std::string run(const Batch& E, const Batch& U, ep_run::RunOptions o) = 0;
  virtual Batch sample(const std::vector<std::vector<std::int32_t>>& prompts, const ep::SamplingConfig& c) = 0;
  virtual ep::index_t vocab_size() = 0;
  virtual std::string model_type() const = 0;
};

template <class T, class B>
class LoadedT final : public Loaded {
 public:
  LoadedT(const std::string& path, std::string dtype)
      : dtype_(std::move(dtype)), models_(ep::hf::load_model<T, B>(path)) {}

  std::string run(const Batch& E, const Batch& U, ep_run::RunOptions o) override {
    const auto t0 = std::chrono::steady_clock::now();
    o.dtype = dtype_;
    o.device = std::is_same_v<B, ep::CpuBackend> ? ep_run::Device::cpu : ep_run::Device::cuda;
    ep::SingleProcess single;
    return std::visit(
        [&](auto& model) {
          auto [r, have_optimizer] = ep_run::detail::probe_loaded(model, o, E.batch, U.batch, single, true);
          r.timing["total"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
          ep_run::detail::write_influence_csvs(r, o);
          return ep_run::detail::result_json(r, o, model_type(), have_optimizer).dump();
        },
        models_);
  }

  Batch sample(const std::vector<std::vector<std::int32_t>>& prompts, const ep::SamplingConfig& c) override {
    return std::visit(
        [&](auto& model) {
          return Batch{ep::sample_responses(model, prompts, c), "sampled batch"};
        },
        models_);
  }

  ep::index_t vocab_size() override {
    return std::visit([](auto& model) { return model.vocab_size(); }, models_);
  }
  std::string model_type() const override {
    return std::visit([](const auto& model) { return std::string(model.model_type()); }, models_);
  }

 private:
  std::string dtype_;
  decltype(ep::hf::load_model<T, B>(std::string())) models_;
};

// cuda.cu: the checkpoint on CUDA device 0 (throws ep_run::DeviceUnavailable
// when CUDA finds none). Declared in every build; defined in a CUDA one.
std::unique_ptr<Loaded> load_on_cuda(const std::string& path, const std::string& dtype);

}  // namespace ep_py
