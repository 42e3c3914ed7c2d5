// What every bench program builds its inputs from, and parses its options
// with:
//
//   random_tensor      a float tensor of seeded normal draws (ops_bench, attention_memory)
//   ProbeShape         a GPT-2-shaped LoRA model and its batch sizes (kLarge: the
//                      configuration of docs/performance.md; kSmall: the smoke tests'),
//   make_model, random_batch, random_adam_state
//                      the model, E/U batches and Adam state of a shape (probe_bench, mpi_bench)
//   parse_options      a bench's own options, by the CLI's parser (examples/cli/args.hpp):
//                      --help, and a usage error naming the option (exit 2)
//
// probe_compare loads its inputs from a checkpoint directory instead; ops_bench
// and probe_bench take Google Benchmark's flags (benchmark_main.hpp).
#pragma once

#include "../examples/cli/args.hpp"

#include <entropy_probe/nn/gpt2.hpp>
#include <entropy_probe/tensor/tensor.hpp>
#include <tiny_models.hpp>

#include <fmt/format.h>

#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

namespace ep_bench {

namespace ep = entropy_probe;
using ep::index_t;

// Normal(0, stddev) draws from `seed`, one tensor per seed.
inline ep::Tensor<float> random_tensor(ep::Shape shape, std::uint64_t seed, double stddev = 1.0) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0.0, stddev);
  std::vector<float> host(static_cast<std::size_t>(ep::numel_of(shape)));
  for (float& v : host) v = static_cast<float>(nd(rng));
  return ep::Tensor<float>::from_host(std::move(shape), host);
}

// A GPT-2-shaped LoRA model in float (LoRA on c_attn, c_proj, c_fc, alpha
// 2 r, random B: a trained adapter, every LoRA gradient live) and its
// batches of B prompts x G responses x T tokens, in microbatches of mb_size.
struct ProbeShape {
  const char* name;
  index_t vocab, n_embd, n_layer, n_head, lora_r;
  index_t B, G, T, mb_size;
};
inline constexpr ProbeShape kLarge{"large", 2048, 128, 4, 4, 8, 8, 4, 64, 4};
inline constexpr ProbeShape kSmall{"small", 32, 8, 1, 2, 2, 2, 2, 8, 1};

using Model = ep::nn::Gpt2LMHeadModel<float>;

inline ep::nn::Gpt2Config model_config(const ProbeShape& s) {
  ep::nn::Gpt2Config c;
  c.vocab_size = s.vocab;
  c.n_positions = s.T;
  c.n_embd = s.n_embd;
  c.n_layer = s.n_layer;
  c.n_head = s.n_head;
  return c;
}

inline ep::nn::LoraConfig lora_config(const ProbeShape& s) {
  ep::nn::LoraConfig l;
  l.r = s.lora_r;
  l.lora_alpha = 2.0 * double(s.lora_r);
  l.target_modules = {"c_attn", "c_proj", "c_fc"};
  l.init_lora_b_zero = false;  // a trained adapter: every LoRA gradient is live
  return l;
}

inline Model make_model(const ProbeShape& s) { return Model(model_config(s), lora_config(s), 1); }

// A seeded batch of the shape (tests/support/tiny_models.hpp: random prompt
// and response lengths, some prompts left-padded, normal advantages).
inline ep::TokenBatch random_batch(const ProbeShape& s, std::uint64_t seed) {
  return ep_test::random_batch(s.B, s.G, s.T, s.vocab, seed);
}

using ep_test::random_adam_state;

// A bench program's options (spec.program its name, spec.name empty), parsed
// and read by read(const ParsedArgs&) -> Options (which throws a.failure(...)
// on a bad value): the options, or the exit status to return after --help
// (printed on stdout) or a usage error (on stderr, exit 2).
template <class Options, class Read>
std::variant<Options, int> parse_options(const ep_cli::CommandSpec& spec, int argc, char** argv, Read read) {
  try {
    const ep_cli::ParsedArgs a = ep_cli::parse_args(spec, std::vector<std::string>(argv + 1, argv + argc));
    if (!a.help) return read(a);
    std::fputs(ep_cli::command_help(spec).c_str(), stdout);
    return ep_cli::kExitOk;
  } catch (const ep_cli::UsageFailure& e) {
    fmt::print(stderr, "{}\nsee '{} --help'\n", e.what(), spec.program);
    return ep_cli::kExitUsage;
  }
}

// A count option of at least `least` (`fallback` when absent), or a usage error naming it.
inline index_t count_option(const ep_cli::ParsedArgs& a, const std::string& name, index_t fallback, index_t least = 1) {
  const auto n = a.integer(name, std::uint64_t{1} << 40);
  if (n && *n < std::uint64_t(least)) throw a.failure(fmt::format("{} must be at least {}, got {}", name, least, *n));
  return n ? index_t(*n) : fallback;
}

// --shape small|large (default large) of a bench on ProbeShape.
inline const ep_cli::OptionSpec kShapeOption{"--shape", "S",
                                             "large (default: docs/performance.md) or small (smoke test)"};
inline ProbeShape shape_option(const ep_cli::ParsedArgs& a) {
  return a.choice<ProbeShape>("--shape", {{"large", kLarge}, {"small", kSmall}}).value_or(kLarge);
}

}  // namespace ep_bench
