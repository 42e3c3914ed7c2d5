// `entropy-probe run`: the offline entropy probe on a Hugging Face checkpoint
// directory (GPT-2 or Qwen2, with its PEFT LoRA adapter and Adam state) and
// two batch files (DESIGN.md section 5).
//
//   entropy-probe run CHECKPOINT_DIR --e-batch E.safetensors --u-batch U.safetensors [OPTIONS]
//
// run_command(argc, argv) takes the arguments after "run" (argv[0] is the
// first of them) and returns the exit status: 0 success, 1 an error while
// running, 2 a usage error (message and a pointer to --help on stderr), 3 a bad
// input file (the message names the file and the key).
//
// Under mpirun (built with MPI), the same command runs distributed with no
// other change: prompts are sharded by rank, results are identical on every
// rank, and only rank 0 prints and writes. An error on any rank ends the job
// with that rank's exit status.
#pragma once

#include <entropy_probe/entropy_probe.hpp>
#include <entropy_probe/io/hf.hpp>
#include <entropy_probe/io/result_json.hpp>
#if defined(ENTROPY_PROBE_HAVE_MPI)
#include <entropy_probe/dist/mpi.hpp>
#endif

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <new>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace ep_run {

namespace ep = entropy_probe;

inline constexpr int kExitOk = 0;
inline constexpr int kExitError = 1;
inline constexpr int kExitUsage = 2;
inline constexpr int kExitInput = 3;

// A mistake on the command line (exit 2).
class UsageFailure : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct RunOptions {
  std::string checkpoint, e_batch, u_batch;
  std::optional<double> lr;
  ep::Weighting weighting = ep::Weighting::dr_grpo;
  ep::index_t mb_size = 0;
  std::string dtype = "f32";
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

struct RunOption {
  const char* name;
  const char* value_name;
  const char* help;
};

inline const std::vector<RunOption>& run_options() {
  static const std::vector<RunOption> o{
      {"--e-batch", "FILE", "E batch (safetensors): estimates the entropy gradient X (required)"},
      {"--u-batch", "FILE", "U batch (safetensors): estimates the Adam-preconditioned update Y (required)"},
      {"--lr", "X", "learning rate eta (default: 'lr' of CHECKPOINT_DIR/optimizer.safetensors)"},
      {"--weighting", "W", "dr_grpo (default) or per_token_avg"},
      {"--mb-size", "N", "prompts per microbatch; 0 = the whole batch (default 0)"},
      {"--dtype", "D", "f32 (default) or f64: the scalar type the model runs in"},
      {"--variance", "V", "none, conditional or full (default full)"},
      {"--ground-truth", "G", "none (default), adam or precond_sgd: take the real step and measure"},
      {"--is", "E", "importance sampling for the ground truth: snis (default) or clip"},
      {"--clip-c", "C", "weight clip for --is clip (default 10)"},
      {"--temperature", "T", "sampling temperature of the log-probabilities (default 1)"},
      {"--json", "OUT", "write the result as JSON to OUT"},
      {"--alpha-route", "R", "conditional variance by jvp (default, forward mode) or reverse"},
      {"--log-level", "L", "debug, info (default) or warning, on stderr"},
  };
  return o;
}

inline std::string run_help() {
  std::string s =
      "usage: entropy-probe run CHECKPOINT_DIR --e-batch E.safetensors --u-batch U.safetensors [OPTIONS]\n\n"
      "Predicts how one optimizer step changes the policy's entropy: deltaH1 = eta * mu_X . mu_Y with its\n"
      "standard error, for a checkpoint and its Adam state, from two independent batches of sampled responses.\n\n"
      "arguments:\n"
      "  CHECKPOINT_DIR       config.json (model_type gpt2 or qwen2), model.safetensors (or sharded with\n"
      "                       model.safetensors.index.json), optionally adapter_config.json +\n"
      "                       adapter_model.safetensors (PEFT LoRA) and optimizer.safetensors (Adam state)\n\n"
      "options:\n";
  for (const auto& o : run_options())
    s += fmt::format("  {:<20} {}\n", fmt::format("{} {}", o.name, o.value_name), o.help);
  s += fmt::format("  {:<20} {}\n", "-h, --help", "show this help");
  s += "\nWithout optimizer.safetensors every parameter has no Adam state (identity preconditioner, with a\n"
       "warning) and --lr is required. Batch files hold sequences [B,G,T], attention_mask [B,G,T], prompt_lens [B]\n"
       "and advantages [B,G] (optional: max_lengths [B], rewards [B,G], position_ids [B,G,T]).\n"
       "Exit status: 0 success, 1 an error while running, 2 a usage error, 3 a bad input file.\n";
  return s;
}

namespace detail {

inline double parse_double(const std::string& option, const std::string& text) {
  double v = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (text.empty() || ec != std::errc() || end != text.data() + text.size() || !std::isfinite(v))
    throw UsageFailure(fmt::format("entropy-probe run: {} expects a number, got '{}'", option, text));
  return v;
}
inline double parse_positive(const std::string& option, const std::string& text) {
  const double v = parse_double(option, text);
  if (!(v > 0)) throw UsageFailure(fmt::format("entropy-probe run: {} must be positive, got '{}'", option, text));
  return v;
}

template <class E>
E parse_choice(const std::string& option, const std::string& text, const std::vector<std::pair<std::string, E>>& m) {
  std::string names;
  for (const auto& [name, value] : m) {
    if (name == text) return value;
    names += names.empty() ? name : ", " + name;
  }
  throw UsageFailure(fmt::format("entropy-probe run: {} must be one of {}, got '{}'", option, names, text));
}

}  // namespace detail

// The arguments after "run". Throws UsageFailure.
inline RunOptions parse_run_args(const std::vector<std::string>& args) {
  RunOptions o;
  std::map<std::string, std::string> values;
  std::vector<std::string> positionals;
  bool options_done = false;
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (!options_done && (a == "-h" || a == "--help")) {
      o.help = true;
      return o;
    }
    if (!options_done && a == "--") {
      options_done = true;
      continue;
    }
    if (!options_done && a.size() > 1 && a[0] == '-') {
      const auto eq = a.find('=');
      const std::string name = a.substr(0, eq);
      bool known = false;
      for (const auto& spec : run_options()) known = known || name == spec.name;
      if (!known) throw UsageFailure(fmt::format("entropy-probe run: unknown option '{}'", name));
      std::string value;
      if (eq != std::string::npos) {
        value = a.substr(eq + 1);
      } else if (i + 1 < args.size()) {
        value = args[++i];
      } else {
        throw UsageFailure(fmt::format("entropy-probe run: option '{}' needs a value", name));
      }
      if (!values.emplace(name, value).second)
        throw UsageFailure(fmt::format("entropy-probe run: option '{}' given twice", name));
      continue;
    }
    positionals.push_back(a);
  }
  if (positionals.empty()) throw UsageFailure("entropy-probe run: missing CHECKPOINT_DIR");
  if (positionals.size() > 1)
    throw UsageFailure(fmt::format("entropy-probe run: unexpected argument '{}'", positionals[1]));
  o.checkpoint = positionals[0];
  auto take = [&](const char* name) -> std::optional<std::string> {
    auto it = values.find(name);
    return it == values.end() ? std::nullopt : std::optional<std::string>(it->second);
  };
  auto file = [&](const char* name, bool required) -> std::optional<std::string> {
    auto v = take(name);
    if (!v && required) throw UsageFailure(fmt::format("entropy-probe run: missing required option {} FILE", name));
    if (v && v->empty()) throw UsageFailure(fmt::format("entropy-probe run: {} needs a file name", name));
    return v;
  };
  o.e_batch = *file("--e-batch", true);
  o.u_batch = *file("--u-batch", true);
  o.json_out = file("--json", false);
  if (auto v = take("--lr")) o.lr = detail::parse_positive("--lr", *v);
  if (auto v = take("--weighting"))
    o.weighting = detail::parse_choice<ep::Weighting>(
        "--weighting", *v, {{"dr_grpo", ep::Weighting::dr_grpo}, {"per_token_avg", ep::Weighting::per_token_avg}});
  if (auto v = take("--mb-size")) {
    std::uint64_t n = 0;
    const auto [end, ec] = std::from_chars(v->data(), v->data() + v->size(), n);
    if (v->empty() || ec != std::errc() || end != v->data() + v->size() || n > (std::uint64_t{1} << 40))
      throw UsageFailure(fmt::format("entropy-probe run: --mb-size expects a non-negative integer, got '{}'", *v));
    o.mb_size = static_cast<ep::index_t>(n);
  }
  if (auto v = take("--dtype"))
    o.dtype = detail::parse_choice<std::string>("--dtype", *v, {{"f32", "f32"}, {"f64", "f64"}});
  if (auto v = take("--variance"))
    o.variance = detail::parse_choice<ep::VarianceMode>("--variance", *v,
                                                        {{"none", ep::VarianceMode::none},
                                                         {"conditional", ep::VarianceMode::conditional},
                                                         {"full", ep::VarianceMode::full}});
  if (auto v = take("--ground-truth"))
    o.ground_truth = detail::parse_choice<std::optional<ep::StepKind>>(
        "--ground-truth", *v,
        {{"none", std::nullopt}, {"adam", ep::StepKind::adam}, {"precond_sgd", ep::StepKind::precond_sgd}});
  if (auto v = take("--is"))
    o.is = detail::parse_choice<ep::ISEstimator>("--is", *v,
                                                 {{"snis", ep::ISEstimator::snis}, {"clip", ep::ISEstimator::clip}});
  if (auto v = take("--clip-c")) o.clip_c = detail::parse_positive("--clip-c", *v);
  if (auto v = take("--temperature")) o.temperature = detail::parse_positive("--temperature", *v);
  if (auto v = take("--alpha-route"))
    o.alpha_route = detail::parse_choice<ep::AlphaRoute>(
        "--alpha-route", *v, {{"jvp", ep::AlphaRoute::jvp}, {"reverse", ep::AlphaRoute::reverse}});
  if (auto v = take("--log-level"))
    o.log_level = detail::parse_choice<ep::LogLevel>(
        "--log-level", *v,
        {{"debug", ep::LogLevel::debug}, {"info", ep::LogLevel::info}, {"warning", ep::LogLevel::warning}});
  if (o.json_out) {
    const auto parent = std::filesystem::path(*o.json_out).parent_path();
    std::error_code ec;
    if (!parent.empty() && !std::filesystem::is_directory(parent, ec))
      throw UsageFailure(
          fmt::format("entropy-probe run: --json {}: the directory '{}' does not exist", *o.json_out, parent.string()));
  }
  return o;
}

namespace detail {

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
  fmt::print("entropy-probe run: {} checkpoint {} ({})\n", model_type, o.checkpoint, o.dtype);
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

// `comm` shards the prompts; only its rank 0 reports.
template <class T>
int run_typed(const RunOptions& o, ep::Communicator& comm) {
  const bool root = comm.rank() == 0;
  using clock = std::chrono::steady_clock;
  const auto t_start = clock::now();
  auto models = ep::hf::load_model<T>(o.checkpoint);
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
        ep::AdamState<T> state = have_optimizer ? ep::hf::load_adam_state(opt_path, probe.registry())
                                                : ep::AdamState<T>(probe.registry().info(), ep::AdamHyper{});
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
          nlohmann::json j = ep::to_json(r);
          nlohmann::json& c = j["config"];
          c["checkpoint"] = o.checkpoint;
          c["model_type"] = model_type;
          c["dtype"] = o.dtype;
          c["e_batch"] = o.e_batch;
          c["u_batch"] = o.u_batch;
          c["optimizer_state"] = have_optimizer ? nlohmann::json(opt_path) : nlohmann::json(nullptr);
          c["log_level"] = ep::to_string(o.log_level);
          std::ofstream out(*o.json_out);
          out << j.dump(2) << "\n";
          out.close();
          if (!out) {
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

// Runs fn(); an exception becomes its message on stderr and an exit status:
// 2 usage, 3 bad input file, 1 anything else.
template <class F>
int guarded(F&& fn, const std::string& who) {
  try {
    return fn();
  } catch (const UsageFailure& e) {
    fmt::print(stderr, "{}\nsee 'entropy-probe run --help'\n", e.what());
    return kExitUsage;
  } catch (const ep::InputError& e) {
    fmt::print(stderr, "{}: bad input: {}\n", who, e.what());
    return kExitInput;
  } catch (const std::bad_alloc&) {
    fmt::print(stderr, "{}: error: out of memory\n", who);
    return kExitError;
  } catch (const std::exception& e) {
    fmt::print(stderr, "{}: error: {}\n", who, e.what());
    return kExitError;
  }
}

// Open MPI's launcher sets OMPI_COMM_WORLD_SIZE; PMIx-based ones PMIX_RANK.
inline bool launched_by_mpirun() { return std::getenv("OMPI_COMM_WORLD_SIZE") || std::getenv("PMIX_RANK"); }

// Parses and runs; never throws.
inline int run_command(int argc, char** argv) {
  std::vector<std::string> args;
  for (int i = 0; i < argc; ++i) args.emplace_back(argv[i]);
  RunOptions o;
  // Usage errors come first and identically on every rank: no collective has
  // started, so every rank simply exits 2.
  const int parsed = guarded(
      [&] {
        o = parse_run_args(args);
        if (o.help) return kExitOk;
        if (!o.lr && !ep::hf::detail::is_file(detail::optimizer_path(o)) &&
            ep::hf::detail::is_file((std::filesystem::path(o.checkpoint) / "config.json").string()))
          throw UsageFailure(fmt::format(
              "entropy-probe run: {} has no optimizer.safetensors, so the learning rate must be given with --lr",
              o.checkpoint));
        return kExitOk;
      },
      "entropy-probe run");
  if (parsed != kExitOk) return parsed;
  if (o.help) {
    std::fputs(run_help().c_str(), stdout);
    return kExitOk;
  }
  ep::log_to_stderr(o.log_level);
  auto run = [&](ep::Communicator& comm) {
    return o.dtype == "f64" ? detail::run_typed<double>(o, comm) : detail::run_typed<float>(o, comm);
  };
#if defined(ENTROPY_PROBE_HAVE_MPI)
  if (launched_by_mpirun()) {
    int mpi_argc = 0;
    char** mpi_argv = nullptr;
    ep::MpiSession session(mpi_argc, mpi_argv);
    ep::MpiCommunicator comm;
    const int code = guarded([&] { return run(comm); }, fmt::format("entropy-probe run [rank {}]", comm.rank()));
    // A failed rank must not leave the others waiting in a collective.
    if (code != kExitOk && comm.world() > 1) MPI_Abort(MPI_COMM_WORLD, code);
    return code;
  }
#endif
  ep::SingleProcess single;
  return guarded([&] { return run(single); }, "entropy-probe run");
}

}  // namespace ep_run

// The entry point the program's dispatcher calls with the arguments after "run".
inline int run_command(int argc, char** argv) { return ep_run::run_command(argc, argv); }
