// The body of `entropy-probe sample` once its arguments are parsed:
// sample_typed<T, B> loads the checkpoint onto backend B, samples G responses
// per prompt with the KV-cached sampler (sample/sampling.hpp), sets GRPO
// advantages from a rewards file, and writes the batch file. One template
// serves every backend: sample_command.hpp instantiates it on CpuBackend,
// run_cuda.cu on CudaBackend.
//
// Input files (errors name the file and line, exit 3):
//   PROMPTS.jsonl   one JSON array of token ids per line
//   REWARDS.jsonl   one JSON array of G rewards per line, in prompt order
#pragma once

#include "run_typed.hpp"

#include <entropy_probe/entropy_probe.hpp>
#include <entropy_probe/io/hf.hpp>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

namespace ep_sample {

namespace ep = entropy_probe;
using ep_run::Device;

struct SampleOptions {
  std::string checkpoint, prompts, out;
  std::optional<std::string> rewards;
  ep::SamplingConfig sampling;
  std::string dtype = "f32";
  Device device = Device::cpu;
  ep::LogLevel log_level = ep::LogLevel::info;
  bool help = false;
};

// The JSON arrays of a .jsonl file, one per line; `what` names an element
// ("token id", "reward") in errors. A blank line is an error, not skipped.
inline std::vector<nlohmann::json> read_jsonl_arrays(const std::string& path, const char* what) {
  std::ifstream in(path);
  if (!in) ep::fail<ep::InputError>("{}: cannot open the file", path);
  std::vector<nlohmann::json> lines;
  std::string line;
  for (std::size_t n = 1; std::getline(in, line); ++n) {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::parse_error& e) {
      ep::fail<ep::InputError>("{} line {}: not JSON ({}); expected one array of {}s per line", path, n, e.what(),
                               what);
    }
    if (!j.is_array() || j.empty())
      ep::fail<ep::InputError>("{} line {}: expected a non-empty JSON array of {}s, got '{}'", path, n, what,
                               j.dump().substr(0, 60));
    lines.push_back(std::move(j));
  }
  if (lines.empty()) ep::fail<ep::InputError>("{}: no lines; expected one JSON array of {}s per line", path, what);
  return lines;
}

// Prompts of token ids in [0, vocab).
inline std::vector<std::vector<std::int32_t>> read_prompts(const std::string& path, ep::index_t vocab) {
  std::vector<std::vector<std::int32_t>> prompts;
  const auto lines = read_jsonl_arrays(path, "token id");
  for (std::size_t n = 0; n < lines.size(); ++n) {
    std::vector<std::int32_t> p;
    for (std::size_t t = 0; t < lines[n].size(); ++t) {
      const nlohmann::json& x = lines[n][t];
      if (!x.is_number_integer() || x.get<std::int64_t>() < 0 || x.get<std::int64_t>() >= vocab)
        ep::fail<ep::InputError>("{} line {}: token {} = {} is not a token id in the vocabulary [0, {})", path, n + 1,
                                 t, x.dump(), vocab);
      p.push_back(static_cast<std::int32_t>(x.get<std::int64_t>()));
    }
    prompts.push_back(std::move(p));
  }
  return prompts;
}

// Rewards [B * G], B lines of G finite numbers.
inline std::vector<double> read_rewards(const std::string& path, std::size_t B, ep::index_t G) {
  const auto lines = read_jsonl_arrays(path, "reward");
  if (lines.size() != B)
    ep::fail<ep::InputError>("{}: {} lines for {} prompts; one array of G rewards per prompt, in prompt order", path,
                             lines.size(), B);
  std::vector<double> rewards;
  for (std::size_t n = 0; n < lines.size(); ++n) {
    if (static_cast<ep::index_t>(lines[n].size()) != G)
      ep::fail<ep::InputError>("{} line {}: {} rewards, expected G = {}", path, n + 1, lines[n].size(), G);
    for (std::size_t g = 0; g < lines[n].size(); ++g) {
      const nlohmann::json& x = lines[n][g];
      if (!x.is_number() || !std::isfinite(x.get<double>()))
        ep::fail<ep::InputError>("{} line {}: reward {} = {} is not a finite number", path, n + 1, g, x.dump());
      rewards.push_back(x.get<double>());
    }
  }
  return rewards;
}

// run_cuda.cu (CUDA builds only): sample_typed on CudaBackend.
int sample_on_cuda(const SampleOptions& o);

template <class T, class B>
int sample_typed(const SampleOptions& o) {
  using clock = std::chrono::steady_clock;
  auto models = ep::hf::load_model<T, B>(o.checkpoint);
  return std::visit(
      [&](auto& model) -> int {
        const ep::SamplingConfig& c = o.sampling;
        const auto prompts = read_prompts(o.prompts, model.vocab_size());
        std::optional<std::vector<double>> rewards;
        if (o.rewards) rewards = read_rewards(*o.rewards, prompts.size(), c.G);
        const auto t0 = clock::now();
        ep::TokenBatch batch = ep::sample_responses(model, prompts, c);
        const double secs = std::chrono::duration<double>(clock::now() - t0).count();
        ep::index_t generated = 0;
        for (ep::index_t b = 0; b < batch.B; ++b)
          for (ep::index_t g = 0; g < batch.G; ++g) generated += batch.gen_length(b, g);
        if (rewards) {
          batch.advantages = ep::grpo_advantages(*rewards, batch.B, batch.G);
          batch.rewards = std::move(rewards);
        }
        ep::hf::save_batch(batch, o.out);
        fmt::print("entropy-probe sample: {} checkpoint {} ({}{})\n", model.model_type(), o.checkpoint, o.dtype,
                   o.device == Device::cpu ? "" : fmt::format(", {}", ep_run::to_string(o.device)));
        fmt::print("  {} prompts x G = {}, up to {} new tokens (temperature {:g}, top-k {}, top-p {:g}, seed {})\n",
                   batch.B, batch.G, c.max_new_tokens, c.temperature, c.top_k, c.top_p, c.seed);
        fmt::print("  sampled {} tokens in {:.3f} s: {:.1f} tokens/s\n", generated, secs,
                   secs > 0 ? static_cast<double>(generated) / secs : 0.0);
        if (batch.rewards)
          fmt::print("  advantages: GRPO (reward minus the group mean) from {}\n", *o.rewards);
        else
          fmt::print("  advantages: zero (no --rewards); score the responses and set them before probing\n");
        fmt::print("  wrote {} (B={} G={} T={})\n", o.out, batch.B, batch.G, batch.T);
        return ep_cli::kExitOk;
      },
      models);
}

}  // namespace ep_sample
