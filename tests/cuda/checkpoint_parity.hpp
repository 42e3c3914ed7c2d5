// Backend parity on the golden checkpoints of tests/data/golden (tiny GPT-2
// and Qwen2 with PEFT adapters, their E / U batches and Adam state, written
// by tools/make_golden.py): each loaded through entropy_probe::hf, put on
// CpuBackend and on DevB, then the full probe (both variances, an AdamW
// ground-truth step) compared phase by phase.
//
// The loading itself is in golden_io.cpp, compiled by the host compiler:
// nvcc 13.0's front end mistranslates a loop in hf::load_adam_state (a range
// over a braced list inside a structured-binding loop), so CUDA sources take
// the CPU model and copy it to the device by parameter name.
#pragma once

#include "backend_parity.hpp"

#include <entropy_probe/nn/gpt2.hpp>
#include <entropy_probe/nn/qwen2.hpp>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <utility>
#include <variant>
#include <vector>

namespace ep_parity {

template <class T>
using GoldenModel = std::variant<nn::Gpt2LMHeadModel<T>, nn::Qwen2ForCausalLM<T>>;

// golden_io.cpp (T = float, double)
template <class T>
GoldenModel<T> golden_model(const std::string& dir);
template <class T>
AdamState<T> golden_adam_state(const std::string& path, const Registry<T>& registry);
TokenBatch golden_batch(const std::string& path);

// tests/data/golden of this checkout, or of $EP_TEST_DATA_DIR (a binary run
// from another copy of the repository, as gpu_check.sh --prebuilt does).
inline std::filesystem::path golden_dir() {
  if (const char* d = std::getenv("EP_TEST_DATA_DIR")) return std::filesystem::path(d) / "golden";
  return std::filesystem::path(__FILE__).parent_path().parent_path() / "data/golden";
}

// Every parameter value (and requires_grad) of `src` into `dst`, matched by name.
template <class Src, class Dst>
void copy_parameters(Src& src, Dst& dst) {
  using T = typename Src::scalar_type;
  using DB = typename Dst::backend_type;
  std::vector<std::pair<std::string, Parameter<T>*>> s;
  std::vector<std::pair<std::string, Parameter<T, DB>*>> d;
  src.named_parameters(ParameterVisitor<T>([&](const std::string& n, Parameter<T>& p) { s.emplace_back(n, &p); }));
  dst.named_parameters(
      ParameterVisitor<T, DB>([&](const std::string& n, Parameter<T, DB>& p) { d.emplace_back(n, &p); }));
  REQUIRE(s.size() == d.size());
  for (std::size_t i = 0; i < s.size(); ++i) {
    REQUIRE(s[i].first == d[i].first);
    d[i].second->value = to_backend<DB>(s[i].second->value);
    d[i].second->requires_grad = s[i].second->requires_grad;
  }
}

template <class DevB, class T>
nn::Gpt2LMHeadModel<T, DevB> on_device(nn::Gpt2LMHeadModel<T>& m) {
  nn::Gpt2LMHeadModel<T, DevB> d(m.config(), m.lora(), 0);
  copy_parameters(m, d);
  return d;
}
template <class DevB, class T>
nn::Qwen2ForCausalLM<T, DevB> on_device(nn::Qwen2ForCausalLM<T>& m) {
  nn::Qwen2ForCausalLM<T, DevB> d(m.config(), m.lora(), 0);
  copy_parameters(m, d);
  return d;
}

template <class T, class DevB>
void checkpoint_parity(const std::string& name) {
  const std::filesystem::path dir = golden_dir() / name;
  if (!std::filesystem::exists(dir / "config.json")) {
    WARN("no golden checkpoint " << dir.string() << ": skipped");
    return;
  }
  const TokenBatch E = golden_batch((dir / "E.safetensors").string());
  const TokenBatch U = golden_batch((dir / "U.safetensors").string());
  const std::string opt = (dir / "optimizer.safetensors").string();
  GoldenModel<T> loaded = golden_model<T>(dir.string());
  ProbeConfig cfg;
  cfg.ground_truth = StepKind::adam;
  cfg.mb_size = 2;
  std::visit(
      [&](auto& mc) {
        auto md = on_device<DevB>(mc);
        OfflineEntropyProbe pc(mc, cfg);
        OfflineEntropyProbe pd(md, cfg);
        const AdamState<T> sc = golden_adam_state<T>(opt, pc.registry());
        const ProbeResult rc = pc.run(E, U, sc);
        const ProbeResult rd = pd.run(E, U, adam_state_on(sc, pd.registry()));
        check_results(name + (std::is_same_v<T, double> ? " checkpoint (double)" : " checkpoint (float)"), rd, rc,
                      tolerance<T>());
      },
      loaded);
}

}  // namespace ep_parity

#define EP_PARITY_CHECKPOINT_TESTS(DevB, prefix)                                                       \
  TEST_CASE(prefix "the full probe on the golden GPT-2 and Qwen2 checkpoints matches the CPU backend", \
            "[parity][probe][checkpoint]") {                                                           \
    for (const char* name : {"gpt2_lora", "gpt2_lmhead", "qwen2_lora", "qwen2_rslora"}) {              \
      ep_parity::checkpoint_parity<double, DevB>(name);                                                \
      ep_parity::checkpoint_parity<float, DevB>(name);                                                 \
    }                                                                                                  \
  }
