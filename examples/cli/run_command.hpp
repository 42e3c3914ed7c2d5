// `entropy-probe run`: the offline entropy probe on a Hugging Face checkpoint
// directory (GPT-2 or Qwen2, with its PEFT LoRA adapter and Adam state) and
// two batch files (docs/checkpoints.md).
//
//   entropy-probe run CHECKPOINT_DIR --e-batch E.safetensors --u-batch U.safetensors [OPTIONS]
//
// run_command(argc, argv) takes the arguments after "run" (argv[0] is the
// first of them) and returns the exit status (ep_cli::kExitStatus, args.hpp):
// a usage error prints its message and a pointer to --help on stderr, a bad
// input file names the file and the key.
//
// The arguments go through the parser every subcommand shares (args.hpp);
// the probe itself is run_typed<T, B> (run_typed.hpp), on CpuBackend here
// and on CudaBackend in run_cuda.cu when the program is built with CUDA
// (ENTROPY_PROBE_CLI_CUDA). Without CUDA, `--device cuda` is a usage error.
//
// Under mpirun (built with MPI), the same command runs distributed with no
// other change: prompts are sharded by rank, results are identical on every
// rank, and only rank 0 prints and writes. An error on any rank ends the job
// with that rank's exit status. With --device cuda each rank takes the GPU of
// its rank on its node (modulo the node's GPU count); the reductions stay on
// the host communicator (device buffers are staged through host memory).
#pragma once

#include "args.hpp"
#include "run_typed.hpp"

#include <entropy_probe/entropy_probe.hpp>
#include <entropy_probe/io/hf.hpp>
#if defined(ENTROPY_PROBE_HAVE_MPI)
#include <entropy_probe/dist/mpi.hpp>
#endif

#include <fmt/format.h>

#include <charconv>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <new>
#include <string>
#include <system_error>
#include <vector>

namespace ep_run {

inline const ep_cli::CommandSpec& run_spec() {
  static const ep_cli::CommandSpec spec{
      .name = "run",
      .summary =
          "probe a Hugging Face checkpoint (GPT-2/Llama/Mistral/Qwen2/Qwen3 + PEFT LoRA + Adam state) on two batches",
      .description =
          "Predicts how one optimizer step changes the policy's entropy: deltaH1 = eta * mu_X . mu_Y with its\n"
          "standard error, for a checkpoint and its Adam state, from two independent batches of sampled responses.",
      .synopsis = "CHECKPOINT_DIR --e-batch E.safetensors --u-batch U.safetensors [OPTIONS]",
      .positionals =
          {{"CHECKPOINT_DIR",
            "config.json (model_type gpt2, llama, mistral, qwen2 or qwen3), model.safetensors (or sharded with\n"
            "model.safetensors.index.json), optionally adapter_config.json +\n"
            "adapter_model.safetensors (PEFT LoRA) and optimizer.safetensors (Adam state)"}},
      .options =
          {
              {"--e-batch", "FILE", "E batch (safetensors): estimates the entropy gradient X (required)"},
              {"--u-batch", "FILE", "U batch (safetensors): estimates the Adam-preconditioned update Y (required)"},
              {"--lr", "X", "learning rate eta (default: 'lr' of CHECKPOINT_DIR/optimizer.safetensors)"},
              {"--weighting", "W", "dr_grpo (default) or per_token_avg"},
              {"--mb-size", "N",
               "prompts per microbatch: auto (default: the most that fit --max-memory, on\n"
               "the CPU no more than fill 1024 rows), N, or 0 = the whole batch"},
              {"--max-memory", "BYTES",
               "memory budget of --mb-size auto, e.g. 6G or 512MiB (default: what is in\n"
               "use plus 25% of the host's available memory, 80% of the GPU's free memory)"},
              {"--dtype", "D", "f32 (default) or f64: the scalar type the model runs in"},
              {"--device", "DEV", "cpu (default) or cuda: where the model and the probe run (cuda: a CUDA build)"},
              {"--variance", "V", "none, conditional or full (default full)"},
              {"--ground-truth", "G",
               "none (default), adam (alias adamw) or precond_sgd: take the real step and measure"},
              {"--direction", "D",
               "precond_sgd (default), adamw (the next AdamW step, with momentum and weight decay)\n"
               "or both: the update direction(s) deltaH1 is predicted along"},
              {"--influence", "", "per-sequence entropy influence of every U sequence (adamw when computed)"},
              {"--influence-csv", "OUT", "write the per-sequence influences as CSV to OUT (implies --influence)"},
              {"--control-variates", "",
               "also the control-variate estimate of deltaH1 along precond_sgd, with its SE beside\n"
               "the plain one (one more forward-tangent pass over E)"},
              {"--influence-matrix", "",
               "the influence matrix over (E sequence, U sequence), eta * x_(b,g') . v_(u,g), along the\n"
               "influence direction (implies --influence; refused beyond 1e7 entries)"},
              {"--influence-matrix-csv", "OUT",
               "write the influence matrix as CSV to OUT (implies --influence-matrix)"},
              {"--influence-truth", "K",
               "the ground truth of the step along each of the K update sequences of largest\n"
               "|influence| alone (implies --influence; the baseline on E computed once)"},
              {"--influence-truth-seq", "LIST",
               "the same for the listed update sequences U:G,U:G,... (prompt:completion)"},
              {"--lr-sweep", "LIST",
               "learning rates X,Y,... or a log grid START:STOP:N: deltaH1 and the ground truth\n"
               "of each along every --direction (the baseline on E computed once)"},
              {"--is", "E", "importance sampling for the ground truth: snis (default) or clip"},
              {"--clip-c", "C", "weight clip for --is clip (default 10)"},
              {"--temperature", "T", "sampling temperature of the log-probabilities (default 1)"},
              {"--json", "OUT", "write the result as JSON to OUT"},
              {"--alpha-route", "R", "conditional variance by jvp (default, forward mode) or reverse"},
              {"--log-level", "L", "debug, info (default) or warning, on stderr"},
          },
      .details =
          "Without optimizer.safetensors every parameter has no Adam state (identity preconditioner, with a\n"
          "warning) and --lr is required. Batch files hold sequences [B,G,T], attention_mask [B,G,T], prompt_lens [B]\n"
          "and advantages [B,G] (optional: max_lengths [B], rewards [B,G], position_ids [B,G,T]).\n" +
          ep_cli::exit_status_help(),
      .help_column = 20};
  return spec;
}

inline std::string run_help() { return ep_cli::command_help(run_spec()); }

// Whether this program can run on a CUDA device (built with nvcc and run_cuda.cu).
inline constexpr bool kHaveCuda =
#if defined(ENTROPY_PROBE_CLI_CUDA)
    true;
#else
    false;
#endif

// --influence-truth-seq's value: U:G pairs (prompt:completion), comma-separated.
// Whether they lie in the U batch is checked by the probe, which has it.
inline std::vector<ep::SequenceRef> parse_sequence_list(const ep_cli::ParsedArgs& a, const std::string& list) {
  std::vector<ep::SequenceRef> out;
  std::size_t pos = 0;
  while (true) {
    const std::size_t end = list.find(',', pos);
    const std::string item = list.substr(pos, end == std::string::npos ? end : end - pos);
    const std::size_t colon = item.find(':');
    std::uint64_t part[2] = {0, 0};
    bool ok = colon != std::string::npos;
    for (int k = 0; ok && k < 2; ++k) {
      const std::string_view s =
          k == 0 ? std::string_view(item).substr(0, colon) : std::string_view(item).substr(colon + 1);
      const auto [e, ec] = std::from_chars(s.data(), s.data() + s.size(), part[k]);
      ok = !s.empty() && ec == std::errc() && e == s.data() + s.size() && part[k] < (std::uint64_t{1} << 40);
    }
    if (!ok)
      throw a.failure(fmt::format(
          "--influence-truth-seq expects U:G,U:G,... (prompt:completion, non-negative integers), got '{}' in '{}'",
          item, list));
    out.push_back({static_cast<ep::index_t>(part[0]), static_cast<ep::index_t>(part[1])});
    if (end == std::string::npos) break;
    pos = end + 1;
  }
  return out;
}

// The arguments after "run". Throws UsageFailure.
inline RunOptions parse_run_args(const std::vector<std::string>& args) {
  const ep_cli::ParsedArgs a = ep_cli::parse_args(run_spec(), args);
  RunOptions o;
  if (a.help) {
    o.help = true;
    return o;
  }
  o.checkpoint = a.positionals[0];
  auto required_file = [&](const char* name) {
    auto v = a.path(name, "a file name");
    if (!v) throw a.failure(fmt::format("missing required option {} FILE", name));
    return *v;
  };
  o.e_batch = required_file("--e-batch");
  o.u_batch = required_file("--u-batch");
  o.json_out = a.path("--json", "a file name");
  ep::ProbeConfig& p = o.probe;
  p.learning_rate = a.positive("--lr");
  p.weighting = a.choice<ep::Weighting>("--weighting", {{"dr_grpo", ep::Weighting::dr_grpo},
                                                        {"per_token_avg", ep::Weighting::per_token_avg}})
                    .value_or(p.weighting);
  if (a.value("--mb-size") != "auto")
    if (auto n = a.integer("--mb-size", std::uint64_t{1} << 40)) p.mb_size = static_cast<ep::index_t>(*n);
  p.memory_budget = a.bytes("--max-memory");
  if (p.memory_budget && p.mb_size)
    throw a.failure(fmt::format("--max-memory sizes --mb-size auto; it has no effect with --mb-size {}", *p.mb_size));
  o.dtype = a.choice<std::string>("--dtype", {{"f32", "f32"}, {"f64", "f64"}}).value_or(o.dtype);
  o.device = a.choice<Device>("--device", {{"cpu", Device::cpu}, {"cuda", Device::cuda}}).value_or(o.device);
  if (o.device == Device::cuda && !kHaveCuda)
    throw a.failure(
        "--device cuda: this build of entropy-probe has no CUDA support (rebuild with -DENTROPY_PROBE_CUDA=ON "
        "and a CUDA compiler, see docs/cuda.md), or use --device cpu");
  p.variance = a.choice<ep::VarianceMode>("--variance", {{"none", ep::VarianceMode::none},
                                                         {"conditional", ep::VarianceMode::conditional},
                                                         {"full", ep::VarianceMode::full}})
                   .value_or(p.variance);
  if (auto g = a.choice<std::optional<ep::StepKind>>("--ground-truth", {{"none", std::nullopt},
                                                                        {"adam", ep::StepKind::adam},
                                                                        {"adamw", ep::StepKind::adam},
                                                                        {"precond_sgd", ep::StepKind::precond_sgd}}))
    p.ground_truth = *g;
  p.is = a.choice<ep::ISEstimator>("--is", {{"snis", ep::ISEstimator::snis}, {"clip", ep::ISEstimator::clip}})
             .value_or(p.is);
  p.clip_c = a.positive("--clip-c").value_or(p.clip_c);
  p.temperature = a.positive("--temperature").value_or(p.temperature);
  p.alpha_route =
      a.choice<ep::AlphaRoute>("--alpha-route", {{"jvp", ep::AlphaRoute::jvp}, {"reverse", ep::AlphaRoute::reverse}})
          .value_or(p.alpha_route);
  o.log_level = a.choice<ep::LogLevel>(
                     "--log-level",
                     {{"debug", ep::LogLevel::debug}, {"info", ep::LogLevel::info}, {"warning", ep::LogLevel::warning}})
                    .value_or(o.log_level);
  using Dirs = std::vector<ep::Direction>;
  p.directions = a.choice<Dirs>("--direction", {{"precond_sgd", Dirs{ep::Direction::precond_sgd}},
                                                {"adamw", Dirs{ep::Direction::adamw}},
                                                {"both", Dirs{ep::Direction::precond_sgd, ep::Direction::adamw}}})
                     .value_or(p.directions);
  p.lr_sweep = a.positive_list("--lr-sweep").value_or(p.lr_sweep);
  o.influence_csv = a.path("--influence-csv", "a file name");
  o.influence_matrix_csv = a.path("--influence-matrix-csv", "a file name");
  p.influence_matrix = a.has_flag("--influence-matrix") || o.influence_matrix_csv.has_value();
  if (auto k = a.integer("--influence-truth", std::uint64_t{1} << 40)) {
    if (*k == 0) throw a.failure("--influence-truth expects a count of at least 1, got '0'");
    p.influence_truth.largest = static_cast<ep::index_t>(*k);
  }
  if (auto list = a.value("--influence-truth-seq")) p.influence_truth.sequences = parse_sequence_list(a, *list);
  p.influence = a.has_flag("--influence") || o.influence_csv.has_value();
  p.control_variates = a.has_flag("--control-variates");
  for (const auto& [name, out] : {std::pair{"--json", o.json_out}, std::pair{"--influence-csv", o.influence_csv},
                                  std::pair{"--influence-matrix-csv", o.influence_matrix_csv}}) {
    if (!out) continue;
    const auto parent = std::filesystem::path(*out).parent_path();
    std::error_code ec;
    if (!parent.empty() && !std::filesystem::is_directory(parent, ec))
      throw a.failure(fmt::format("{} {}: the directory '{}' does not exist", name, *out, parent.string()));
  }
  return o;
}

// Runs fn(); an exception becomes its message on stderr and the exit status
// of its kind (a usage error also points at `entropy-probe COMMAND --help`).
template <class F>
int guarded(F&& fn, const std::string& who, const char* command = "run") {
  try {
    return fn();
  } catch (const UsageFailure& e) {
    fmt::print(stderr, "{}\nsee 'entropy-probe {} --help'\n", e.what(), command);
    return kExitUsage;
  } catch (const ep::InputError& e) {
    fmt::print(stderr, "{}: bad input: {}\n", who, e.what());
    return kExitInput;
  } catch (const DeviceUnavailable& e) {
    fmt::print(stderr, "{}: error: {}\n", who, e.what());
    return kExitNoDevice;
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

namespace detail {

// The probe on the chosen device; `local_rank` (this process's rank among
// those on its node) picks the GPU.
inline int run_on_device(const RunOptions& o, ep::Communicator& comm, [[maybe_unused]] int local_rank) {
  if (o.device == Device::cuda) {
#if defined(ENTROPY_PROBE_CLI_CUDA)
    return run_on_cuda(o, comm, local_rank);
#else
    throw UsageFailure("entropy-probe run: --device cuda: this build of entropy-probe has no CUDA support");
#endif
  }
  return o.dtype == "f64" ? run_typed<double, ep::CpuBackend>(o, comm) : run_typed<float, ep::CpuBackend>(o, comm);
}

#if defined(ENTROPY_PROBE_HAVE_MPI)
// This rank's index among the ranks sharing its node (MPI-3 shared-memory split).
inline int mpi_local_rank() {
  MPI_Comm node;
  ep::detail::mpi_check(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node),
                        "MPI_Comm_split_type");
  int r = 0;
  MPI_Comm_rank(node, &r);
  MPI_Comm_free(&node);
  return r;
}
#endif

}  // namespace detail

// Parses and runs; never throws.
inline int run_command(const std::vector<std::string>& args) {
  RunOptions o;
  // Usage errors come first and identically on every rank: no collective has
  // started, so every rank simply exits 2.
  const int parsed = guarded(
      [&] {
        o = parse_run_args(args);
        if (o.help) return kExitOk;
        if (!o.probe.learning_rate && !ep::hf::detail::is_file(detail::optimizer_path(o)) &&
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
#if defined(ENTROPY_PROBE_HAVE_MPI)
  if (launched_by_mpirun()) {
    int mpi_argc = 0;
    char** mpi_argv = nullptr;
    ep::MpiSession session(mpi_argc, mpi_argv);
    ep::MpiCommunicator comm;
    const int code =
        guarded([&] { return detail::run_on_device(o, comm, o.device == Device::cuda ? detail::mpi_local_rank() : 0); },
                fmt::format("entropy-probe run [rank {}]", comm.rank()));
    // A failed rank must not leave the others waiting in a collective.
    if (code != kExitOk && comm.world() > 1) MPI_Abort(MPI_COMM_WORLD, code);
    return code;
  }
#endif
  ep::SingleProcess single;
  return guarded([&] { return detail::run_on_device(o, single, 0); }, "entropy-probe run");
}

inline int run_command(int argc, char** argv) { return run_command(std::vector<std::string>(argv, argv + argc)); }

}  // namespace ep_run

// The entry point the program's dispatcher calls with the arguments after "run".
inline int run_command(int argc, char** argv) { return ep_run::run_command(argc, argv); }
