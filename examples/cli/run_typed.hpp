// The body of `entropy-probe run` once its arguments are parsed:
// run_typed<T, B> loads the checkpoint and the batches onto backend B, runs
// the probe, and reports (summary on stdout, JSON file) on rank 0. One
// template serves every backend: run_command.hpp instantiates it on
// CpuBackend; run_cuda.cu, compiled by nvcc, on CudaBackend. Tensors stay on
// B from load to the end; only the probe's scalar results (ProbeResult, a
// host struct) come back for the report.
#pragma once

#include "args.hpp"

#include <entropy_probe/entropy_probe.hpp>
#include <entropy_probe/io/hf.hpp>
#include <entropy_probe/io/result_json.hpp>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <variant>

namespace ep_run {

namespace ep = entropy_probe;
using ep_cli::kExitError;
using ep_cli::kExitInput;
using ep_cli::kExitNoDevice;
using ep_cli::kExitOk;
using ep_cli::kExitUsage;
using ep_cli::UsageFailure;

enum class Device { cpu, cuda };
inline const char* to_string(Device d) { return d == Device::cuda ? "cuda" : "cpu"; }

// `--device cuda` on a machine where CUDA finds no device (exit 4): not a
// usage mistake, and not the program failing either.
class DeviceUnavailable : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct RunOptions {
  std::string checkpoint, e_batch, u_batch;
  std::optional<double> lr;
  ep::Weighting weighting = ep::Weighting::dr_grpo;
  std::optional<ep::index_t> mb_size;       // unset: auto
  std::optional<std::uint64_t> max_memory;  // bytes; unset: the backend's default budget
  std::string dtype = "f32";
  Device device = Device::cpu;
  ep::VarianceMode variance = ep::VarianceMode::full;
  std::optional<ep::StepKind> ground_truth;
  ep::ISEstimator is = ep::ISEstimator::snis;
  double clip_c = 10.0;
  double temperature = 1.0;
  std::optional<std::string> json_out;
  ep::AlphaRoute alpha_route = ep::AlphaRoute::jvp;
  ep::LogLevel log_level = ep::LogLevel::info;
  bool help = false;
};

namespace detail {

// run_cuda.cu (only in a build with CUDA, where ENTROPY_PROBE_CLI_CUDA is
// defined): run_typed on CudaBackend, on CUDA device `local_rank` modulo
// the device count. Throws DeviceUnavailable when CUDA finds no device.
int run_on_cuda(const RunOptions& o, ep::Communicator& comm, int local_rank);

inline std::string optimizer_path(const RunOptions& o) {
  return (std::filesystem::path(o.checkpoint) / "optimizer.safetensors").string();
}

// Progress lines on stderr at info level, at most a few per second.
inline ep::ProgressCallback progress_printer() {
  using clock = std::chrono::steady_clock;
  auto last = std::make_shared<clock::time_point>(clock::now());
  return [last](std::string_view phase, ep::index_t done, ep::index_t total) {
    const auto now = clock::now();
    if (done < total && now - *last < std::chrono::milliseconds(500)) return;
    *last = now;
    ep::log_info("[probe] {} {}/{} prompts", phase, done, total);
  };
}

inline void print_summary(const ep::ProbeResult& r, const RunOptions& o, const std::string& model_type,
                          const ep::TokenBatch& E, const ep::TokenBatch& U, bool have_optimizer) {
  // The device only when it is not the default, so a CPU run prints what it always did.
  fmt::print("entropy-probe run: {} checkpoint {} ({}{})\n", model_type, o.checkpoint, o.dtype,
             o.device == Device::cpu ? "" : fmt::format(", {}", to_string(o.device)));
  fmt::print("  registry: {} trainable tensors ({} numbers), {} in the LoRA view\n", r.registry.trainable_tensors,
             r.registry.trainable_numel, r.registry.lora_tensors);
  fmt::print("  E batch: {} (B={} G={} T={})   U batch: {} (B={} G={} T={})\n", o.e_batch, E.B, E.G, E.T, o.u_batch,
             U.B, U.G, U.T);
  fmt::print("  learning rate: {:g} ({})\n", r.learning_rate,
             r.learning_rate_source == "config" ? "--lr" : "optimizer.safetensors");
  if (r.preconditioner_missing > 0)
    fmt::print("  Adam state: {} of {} parameters have none (identity preconditioner){}\n", r.preconditioner_missing,
               r.registry.trainable_tensors, have_optimizer ? "" : "; no optimizer.safetensors");
  fmt::print("\n");
  if (r.full)
    fmt::print("  deltaH1  = {:+.6e} +- {:.3e}  (SE_deltaH1, E and U sampling noise)\n", r.deltaH1, r.full->se_deltaH1);
  else if (r.conditional)
    fmt::print("  deltaH1  = {:+.6e} +- {:.3e}  (SE_conditional, E sampling noise given U)\n", r.deltaH1,
               r.conditional->se_conditional);
  else
    fmt::print("  deltaH1  = {:+.6e}  (no variance: --variance none)\n", r.deltaH1);
  fmt::print("  bars_dot = {:+.6e}  (mu_X . mu_Y; |mu_X| {:.3e}, |mu_Y| {:.3e})\n", r.bars_dot, r.mu_X_norm,
             r.mu_Y_norm);
  fmt::print("  B_E = {}, B_U = {}\n", r.B_E, r.B_U);
  if (r.conditional) fmt::print("  SE_conditional = {:.3e}\n", r.conditional->se_conditional);
  if (r.full) fmt::print("  V_X = {:.3e}, V_Y = {:.3e}\n", r.full->V_X, r.full->V_Y);
  if (r.truth) {
    const ep::GroundTruth& t = *r.truth;
    fmt::print(
        "  ground truth ({} step, {}): deltaH_true_tok = {:+.6e} (compare with deltaH1), deltaH_true = {:+.6e}\n",
        ep::to_string(*o.ground_truth), ep::to_string(o.is), t.deltaH_true_tok, t.deltaH_true);
    fmt::print("      H_orig_tok = {:.6f}, H_upd_tok = {:.6f}, ESS = {:.1f} of {}\n", t.H_orig_tok, t.H_upd_tok, t.ESS,
               E.rows());
  }
  std::string timing;
  for (const char* k : {"load", "sum_X", "sum_Y", "conditional_variance", "full_variance", "ground_truth", "total"})
    if (auto it = r.timing.find(k); it != r.timing.end())
      timing += fmt::format("{}{} {:.3f}", timing.empty() ? "" : ", ", k, it->second);
  fmt::print("  timing (s): {}\n", timing);
}

// The result as JSON (DESIGN.md section 5) with the command's own settings
// added to `config`. Returns false when the file cannot be written.
inline bool write_result_json(const ep::ProbeResult& r, const RunOptions& o, const std::string& model_type,
                              bool have_optimizer) {
  nlohmann::json j = ep::to_json(r);
  nlohmann::json& c = j["config"];
  c["checkpoint"] = o.checkpoint;
  c["model_type"] = model_type;
  c["dtype"] = o.dtype;
  c["device"] = to_string(o.device);
  c["e_batch"] = o.e_batch;
  c["u_batch"] = o.u_batch;
  c["optimizer_state"] = have_optimizer ? nlohmann::json(optimizer_path(o)) : nlohmann::json(nullptr);
  c["log_level"] = ep::to_string(o.log_level);
  std::ofstream out(*o.json_out);
  out << j.dump(2) << "\n";
  out.close();
  return static_cast<bool>(out);
}

// The probe in scalar type T on backend B. `comm` shards the prompts; only
// its rank 0 reports.
template <class T, class B>
int run_typed(const RunOptions& o, ep::Communicator& comm) {
  const bool root = comm.rank() == 0;
  using clock = std::chrono::steady_clock;
  const auto t_start = clock::now();
  auto models = ep::hf::load_model<T, B>(o.checkpoint);
  const std::string model_type = models.index() == 0 ? "gpt2" : "qwen2";
  const ep::TokenBatch E = ep::hf::load_batch(o.e_batch);
  const ep::TokenBatch U = ep::hf::load_batch(o.u_batch);
  return std::visit(
      [&](auto& model) -> int {
        E.validate(model.vocab_size(), o.e_batch);
        U.validate(model.vocab_size(), o.u_batch);
        ep::ProbeConfig pc;
        pc.learning_rate = o.lr;
        pc.weighting = o.weighting;
        pc.mb_size = o.mb_size;
        pc.memory_budget = o.max_memory;
        pc.temperature = o.temperature;
        pc.variance = o.variance;
        pc.alpha_route = o.alpha_route;
        pc.ground_truth = o.ground_truth;
        pc.is = o.is;
        pc.clip_c = o.clip_c;
        if (root) pc.progress = progress_printer();
        ep::OfflineEntropyProbe probe(model, pc, &comm);
        const std::string opt_path = optimizer_path(o);
        const bool have_optimizer = ep::hf::detail::is_file(opt_path);
        ep::AdamState<T, B> state = have_optimizer ? ep::hf::load_adam_state(opt_path, probe.registry())
                                                   : ep::AdamState<T, B>(probe.registry().info(), ep::AdamHyper{});
        if (!have_optimizer)
          ep::log_warning("{}: not found; no parameter has Adam state (identity preconditioner)", opt_path);
        if (!o.lr && !(state.hyper().lr > 0))
          ep::fail<ep::InputError>("{}: __metadata__ 'lr' = {} is not a usable learning rate; give --lr", opt_path,
                                   state.hyper().lr);
        const double load_s = std::chrono::duration<double>(clock::now() - t_start).count();
        ep::ProbeResult r = probe.run(E, U, state);
        r.timing["load"] = load_s;
        r.timing["total"] = std::chrono::duration<double>(clock::now() - t_start).count();
        if (!root) return kExitOk;
        if (comm.world() > 1) fmt::print("entropy-probe run: {} ranks\n", comm.world());
        print_summary(r, o, model_type, E, U, have_optimizer);
        if (o.json_out) {
          if (!write_result_json(r, o, model_type, have_optimizer)) {
            fmt::print(stderr, "entropy-probe run: error: cannot write {}\n", *o.json_out);
            return kExitError;
          }
          fmt::print("  wrote {}\n", *o.json_out);
        }
        return kExitOk;
      },
      models);
}

}  // namespace detail

}  // namespace ep_run
