// `entropy-probe sample`: G responses per prompt from a Hugging Face
// checkpoint directory with the KV-cached sampler, written as a batch file
// (docs/checkpoints.md) that `run` reads as --e-batch or --u-batch.
//
//   entropy-probe sample CHECKPOINT_DIR --prompts PROMPTS.jsonl --G N --max-new-tokens M
//                        [--temperature T] [--top-p P] [--top-k K] [--stop-token ID]... [--seed S]
//                        [--rewards REWARDS.jsonl] [--device cpu|cuda] --out BATCH.safetensors
//
// Exit status as `run` (ep_cli::kExitStatus); a bad input file's message
// names the file and line.
#pragma once

#include "args.hpp"
#include "run_command.hpp"
#include "sample_typed.hpp"

#include <filesystem>
#include <string>
#include <system_error>
#include <vector>

namespace ep_sample {

inline const ep_cli::CommandSpec& sample_spec() {
  static const ep_cli::CommandSpec spec{
      .name = "sample",
      .summary = "sample G responses per prompt from a checkpoint (KV-cached) into a batch file",
      .description =
          "Samples G responses for each prompt from the checkpoint's policy (prefill, then one token per step\n"
          "with a key/value cache) and writes them in the batch layout `run` reads. Prints tokens per second.",
      .synopsis =
          "CHECKPOINT_DIR --prompts PROMPTS.jsonl --G N --max-new-tokens M --out BATCH.safetensors "
          "[OPTIONS]",
      .positionals = {{"CHECKPOINT_DIR",
                       "as for `run`: config.json, model.safetensors, optionally the PEFT LoRA adapter"}},
      .options =
          {
              {"--prompts", "FILE", "one JSON array of token ids per line (required)"},
              {"--G", "N", "responses per prompt (required)"},
              {"--max-new-tokens", "M", "response length limit (required)"},
              {"--out", "FILE", "the batch file to write (safetensors, required)"},
              {"--temperature", "T", "sampling temperature (default 1)"},
              {"--top-p", "P", "nucleus sampling: the most likely tokens holding P of the mass (default 1: all)"},
              {"--top-k", "K", "sample among the K most likely tokens (default 0: all)"},
              {"--stop-token", "ID", "a token that ends a response (kept); may be repeated", true},
              {"--seed", "S", "seed of the sampler (default 0): the same seed, the same batch"},
              {"--rewards", "FILE",
               "one JSON array of G rewards per line, in prompt order: GRPO advantages\n"
               "(reward minus the group mean); without it the advantages are zero"},
              {"--dtype", "D", "f32 (default) or f64: the scalar type the model runs in"},
              {"--device", "DEV", "cpu (default) or cuda (a CUDA build)"},
              {"--log-level", "L", "debug, info (default) or warning, on stderr"},
          },
      .details = ep_cli::exit_status_help(),
      .help_column = 22};
  return spec;
}

// The arguments after "sample". Throws UsageFailure.
inline SampleOptions parse_sample_args(const std::vector<std::string>& args) {
  const ep_cli::ParsedArgs a = ep_cli::parse_args(sample_spec(), args);
  SampleOptions o;
  if (a.help) {
    o.help = true;
    return o;
  }
  o.checkpoint = a.positionals[0];
  auto required = [&](const char* name, const char* what) {
    if (!a.value(name)) throw a.failure(fmt::format("missing required option {} {}", name, what));
  };
  required("--prompts", "FILE");
  required("--G", "N");
  required("--max-new-tokens", "M");
  required("--out", "FILE");
  o.prompts = *a.path("--prompts", "a file name");
  o.out = *a.path("--out", "a file name");
  o.rewards = a.path("--rewards", "a file name");
  ep::SamplingConfig& c = o.sampling;
  constexpr std::uint64_t kMaxCount = std::uint64_t{1} << 31;
  c.G = static_cast<ep::index_t>(*a.integer("--G", kMaxCount));
  c.max_new_tokens = static_cast<ep::index_t>(*a.integer("--max-new-tokens", kMaxCount));
  if (c.G < 1) throw a.failure("--G must be at least 1");
  if (c.max_new_tokens < 1) throw a.failure("--max-new-tokens must be at least 1");
  c.temperature = a.positive("--temperature").value_or(c.temperature);
  c.top_p = a.positive("--top-p").value_or(c.top_p);
  if (c.top_p > 1) throw a.failure(fmt::format("--top-p must be in (0, 1], got '{}'", *a.value("--top-p")));
  c.top_k = static_cast<ep::index_t>(a.integer("--top-k", kMaxCount).value_or(0));
  for (std::uint64_t id : a.integers("--stop-token", kMaxCount)) c.stop_tokens.push_back(static_cast<std::int32_t>(id));
  c.seed = a.integer("--seed").value_or(0);
  o.dtype = a.choice<std::string>("--dtype", {{"f32", "f32"}, {"f64", "f64"}}).value_or(o.dtype);
  o.device = a.choice<Device>("--device", {{"cpu", Device::cpu}, {"cuda", Device::cuda}}).value_or(o.device);
  if (o.device == Device::cuda && !ep_run::kHaveCuda)
    throw a.failure(
        "--device cuda: this build of entropy-probe has no CUDA support (rebuild with "
        "-DENTROPY_PROBE_CUDA=ON, see docs/cuda.md), or use --device cpu");
  o.log_level = a.choice<ep::LogLevel>(
                     "--log-level",
                     {{"debug", ep::LogLevel::debug}, {"info", ep::LogLevel::info}, {"warning", ep::LogLevel::warning}})
                    .value_or(o.log_level);
  const auto parent = std::filesystem::path(o.out).parent_path();
  std::error_code ec;
  if (!parent.empty() && !std::filesystem::is_directory(parent, ec))
    throw a.failure(fmt::format("--out {}: the directory '{}' does not exist", o.out, parent.string()));
  return o;
}

// Parses and samples; never throws.
inline int sample_command(const std::vector<std::string>& args) {
  SampleOptions o;
  const int parsed = ep_run::guarded(
      [&] {
        o = parse_sample_args(args);
        return ep_cli::kExitOk;
      },
      "entropy-probe sample", "sample");
  if (parsed != ep_cli::kExitOk) return parsed;
  if (o.help) {
    std::fputs(ep_cli::command_help(sample_spec()).c_str(), stdout);
    return ep_cli::kExitOk;
  }
  ep::log_to_stderr(o.log_level);
  return ep_run::guarded(
      [&] {
        if (o.device == Device::cuda) {
#if defined(ENTROPY_PROBE_CLI_CUDA)
          return sample_on_cuda(o);
#endif
        }
        return o.dtype == "f64" ? sample_typed<double, ep::CpuBackend>(o) : sample_typed<float, ep::CpuBackend>(o);
      },
      "entropy-probe sample", "sample");
}

}  // namespace ep_sample
