// The body of `entropy-probe run` once its arguments are parsed:
// run_typed<T, B> loads the checkpoint and the batches onto backend B, runs
// the probe, and reports (summary on stdout, JSON file) on rank 0. One
// template serves every backend: run_command.hpp instantiates it on
// CpuBackend; run_cuda.cu, compiled by nvcc, on CudaBackend. Tensors stay on
// B from load to the end; only the probe's scalar results (ProbeResult, a
// host struct) come back for the report.
#pragma once

#include "args.hpp"
#include "progress.hpp"

#include <entropy_probe/entropy_probe.hpp>
#include <entropy_probe/io/hf.hpp>
#include <entropy_probe/io/result_json.hpp>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <stdexcept>
#include <string>
#include <variant>
#include <vector>

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

// `run`'s settings: the probe's own, parsed straight into `probe` (its
// progress callback is set where the probe runs), and the command's.
struct RunOptions {
  ep::ProbeConfig probe;
  std::string checkpoint, e_batch, u_batch;
  std::string dtype = "f32";
  Device device = Device::cpu;
  std::optional<std::string> json_out, influence_csv, influence_matrix_csv;
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

// The update sequences that push the entropy hardest each way: up to five
// with a negative influence and up to five with a positive one.
inline void print_top_influences(const ep::ProbeResult& r) {
  constexpr std::size_t kTop = 5;
  std::vector<const ep::SequenceInfluence*> order;
  for (const auto& s : r.influence) order.push_back(&s);
  std::sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->influence < b->influence; });
  auto line = [](const ep::SequenceInfluence& s) {
    fmt::print("    prompt {:>4} completion {:>3}: {:+.3e}  (advantage {:+.3f}{}, length {})\n", s.prompt, s.completion,
               s.influence, s.advantage, s.reward ? fmt::format(", reward {:+.3f}", *s.reward) : "", s.length);
  };
  fmt::print("  influence along {} (eta * mu_X . v_(u,g), {} sequences); most negative:\n",
             ep::to_string(*r.influence_direction), r.influence.size());
  for (std::size_t i = 0; i < std::min(kTop, order.size()) && order[i]->influence < 0; ++i) line(*order[i]);
  fmt::print("  most positive:\n");
  for (std::size_t i = 0; i < std::min(kTop, order.size()) && order[order.size() - 1 - i]->influence > 0; ++i)
    line(*order[order.size() - 1 - i]);
  bool header = false;
  for (const auto& s : r.influence) {
    if (!s.truth) continue;
    if (!header) fmt::print("  true change along single sequences (compare deltaH_true_tok with the influence):\n");
    header = true;
    fmt::print(
        "    prompt {:>4} completion {:>3}: influence {:+.3e}, deltaH_true_tok {:+.3e}, deltaH_true {:+.3e} +- "
        "{:.2e}\n",
        s.prompt, s.completion, s.influence, s.truth->deltaH_true_tok, s.truth->deltaH_true, s.truth->SE_deltaH_true);
  }
  if (r.influence_matrix) {
    const ep::InfluenceMatrix& m = *r.influence_matrix;
    fmt::print("  influence matrix: {} E x {} U sequences{}\n", m.rows.size(), m.columns.size(),
               m.momentum.empty() ? "" : " (with momentum and decay shares per E sequence)");
  }
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
  if (r.directions.size() > 1 || r.directions.front().direction != ep::Direction::precond_sgd) {
    fmt::print("  directions (the SE above is along precond_sgd):\n");
    for (const ep::DirectionResult& d : r.directions) {
      fmt::print("    {:<11} deltaH1 = {:+.6e}", ep::to_string(d.direction), d.deltaH1);
      if (d.momentum_share)
        fmt::print("  (momentum {:+.3e}, decay {:+.3e}, gradient {:+.3e})", *d.momentum_share, *d.decay_share,
                   d.deltaH1 - *d.momentum_share - *d.decay_share);
      fmt::print("\n");
    }
  }
  fmt::print("  B_E = {}, B_U = {}\n", r.B_E, r.B_U);
  const ep::ZeroSecondMoment& z = r.zero_second_moment;
  if (z.all > 0)
    fmt::print("  exp_avg_sq = 0 with a nonzero U gradient: {} entries ({} LoRA), {:.3g} of |mu_Y|^2\n", z.all, z.lora,
               z.all_share);
  if (r.influence_direction) print_top_influences(r);
  if (r.control_variates) {
    const ep::ControlVariates& cv = *r.control_variates;
    fmt::print(
        "  control variates ({} features, cross-fitted): deltaH1 = {:+.6e} +- {:.3e}  (plain {:+.6e} +- {:.3e})\n",
        cv.features.size(), cv.deltaH1, cv.SE, cv.deltaH1_plain, cv.SE_plain);
  } else if (o.probe.control_variates) {
    fmt::print("  control variates: not computed (too few E prompts for the features; see the warning)\n");
  }
  if (r.conditional) fmt::print("  SE_conditional = {:.3e}\n", r.conditional->se_conditional);
  if (r.full) fmt::print("  V_X = {:.3e}, V_Y = {:.3e}\n", r.full->V_X, r.full->V_Y);
  if (r.truth) {
    const ep::GroundTruth& t = *r.truth;
    fmt::print(
        "  ground truth ({} step, {}): deltaH_true_tok = {:+.6e} (compare with deltaH1), deltaH_true = {:+.6e}\n",
        ep::to_string(*o.probe.ground_truth), ep::to_string(o.probe.is), t.deltaH_true_tok, t.deltaH_true);
    fmt::print("      H_orig_tok = {:.6f}, H_upd_tok = {:.6f}, ESS = {:.1f} of {}\n", t.H_orig_tok, t.H_upd_tok, t.ESS,
               E.rows());
    fmt::print("      per sequence: deltaH_true = {:+.6e} +- {:.2e} (sampled)", t.deltaH_true, t.SE_deltaH_true);
    if (t.rao_blackwell)
      fmt::print(", {:+.6e} +- {:.2e} (Rao-Blackwellised; H_orig = {:.6f} +- {:.2e})", t.rao_blackwell->deltaH_true,
                 t.rao_blackwell->SE_deltaH_true, t.rao_blackwell->H_orig, t.rao_blackwell->SE_H_orig);
    fmt::print("\n");
  }
  if (!r.lr_sweep.empty()) {
    fmt::print("  learning-rate sweep (deltaH1 against the per-token truth; linear regime: ratio near 1):\n");
    fmt::print("    {:<11} {:>10} {:>14} {:>14} {:>8} {:>14} {:>7}\n", "direction", "eta", "deltaH1", "deltaH_true_tok",
               "ratio", "RB truth_tok", "ESS");
    for (const ep::SweepPoint& p : r.lr_sweep) {
      const ep::GroundTruth& t = p.truth;
      fmt::print("    {:<11} {:>10.3e} {:>+14.6e} {:>+14.6e} {:>8.3f} {:>+14.6e} {:>7.1f}\n",
                 ep::to_string(p.direction), p.learning_rate, p.deltaH1, t.deltaH_true_tok,
                 t.deltaH_true_tok / p.deltaH1, t.rao_blackwell ? t.rao_blackwell->deltaH_true_tok : std::nan(""),
                 t.ESS);
    }
  }
  std::string timing;
  for (const char* k : {"load", "sum_X", "sum_Y", "conditional_variance", "full_variance", "control_variates",
                        "influence", "influence_matrix", "ground_truth", "lr_sweep", "influence_truth", "total"})
    if (auto it = r.timing.find(k); it != r.timing.end())
      timing += fmt::format("{}{} {:.3f}", timing.empty() ? "" : ", ", k, it->second);
  fmt::print("  timing (s): {}\n", timing);
}

// The result as JSON (docs/checkpoints.md, "The result") with the command's own settings
// added to `config`; the Python package's Checkpoint.run returns the same.
inline nlohmann::json result_json(const ep::ProbeResult& r, const RunOptions& o, const std::string& model_type,
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
  return j;
}

// Returns false when the file cannot be written.
inline bool write_result_json(const ep::ProbeResult& r, const RunOptions& o, const std::string& model_type,
                              bool have_optimizer) {
  std::ofstream out(*o.json_out);
  out << result_json(r, o, model_type, have_optimizer).dump(2) << "\n";
  out.close();
  return static_cast<bool>(out);
}

// --influence-csv and --influence-matrix-csv, when given; returns the files
// written. The Python package's Checkpoint.run writes them the same way.
inline std::vector<std::string> write_influence_csvs(const ep::ProbeResult& r, const RunOptions& o) {
  std::vector<std::string> written;
  if (o.influence_csv) {
    ep::write_influence_csv(r, *o.influence_csv);
    written.push_back(*o.influence_csv);
  }
  if (o.influence_matrix_csv) {
    ep::write_influence_matrix_csv(r, *o.influence_matrix_csv);
    written.push_back(*o.influence_matrix_csv);
  }
  return written;
}

// What `run` does between loading and reporting, for a loaded model and
// validated-here batches: the probe configured from `o`, the Adam state of
// CHECKPOINT_DIR/optimizer.safetensors (or none, with a warning), the run.
// The Python package's Checkpoint.run calls this too, so both give the same
// numbers. `progress`: log the phases at info level.
struct ProbeOutcome {
  ep::ProbeResult result;
  bool have_optimizer = false;
};

template <class Model>
ProbeOutcome probe_loaded(Model& model, const RunOptions& o, const ep::TokenBatch& E, const ep::TokenBatch& U,
                          ep::Communicator& comm, bool progress) {
  using T = typename Model::scalar_type;
  using B = typename Model::backend_type;
  E.validate(model.vocab_size(), o.e_batch);
  U.validate(model.vocab_size(), o.u_batch);
  ep::ProbeConfig pc = o.probe;
  if (progress) pc.progress = ep_cli::progress_printer([](const std::string& line) { ep::log_info("{}", line); });
  ep::OfflineEntropyProbe probe(model, pc, &comm);
  const std::string opt_path = optimizer_path(o);
  ProbeOutcome out;
  out.have_optimizer = ep::hf::detail::is_file(opt_path);
  ep::AdamState<T, B> state = out.have_optimizer ? ep::hf::load_adam_state(opt_path, probe.registry())
                                                 : ep::AdamState<T, B>(probe.registry().info(), ep::AdamHyper{});
  if (!out.have_optimizer)
    ep::log_warning("{}: not found; no parameter has Adam state (identity preconditioner)", opt_path);
  if (!o.probe.learning_rate && !(state.hyper().lr > 0))
    ep::fail<ep::InputError>("{}: __metadata__ 'lr' = {} is not a usable learning rate; give --lr", opt_path,
                             state.hyper().lr);
  out.result = probe.run(E, U, state);
  return out;
}

// The probe in scalar type T on backend B. `comm` shards the prompts; only
// its rank 0 reports.
template <class T, class B>
int run_typed(const RunOptions& o, ep::Communicator& comm) {
  const bool root = comm.rank() == 0;
  using clock = std::chrono::steady_clock;
  const auto t_start = clock::now();
  auto models = ep::hf::load_model<T, B>(o.checkpoint);
  const std::string model_type = std::visit([](const auto& m) { return std::string(m.model_type()); }, models);
  const ep::TokenBatch E = ep::hf::load_batch(o.e_batch);
  const ep::TokenBatch U = ep::hf::load_batch(o.u_batch);
  return std::visit(
      [&](auto& model) -> int {
        const double load_s = std::chrono::duration<double>(clock::now() - t_start).count();
        auto [r, have_optimizer] = probe_loaded(model, o, E, U, comm, root);
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
        for (const std::string& path : write_influence_csvs(r, o)) fmt::print("  wrote {}\n", path);
        return kExitOk;
      },
      models);
}

}  // namespace detail

}  // namespace ep_run
