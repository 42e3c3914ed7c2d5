// A host project's own model type, probed by entropy_probe.
//
// BigramMlpLM is not one of the library's nn layers: it owns its parameters,
// lists them in named_parameters(), and records its forward pass with the
// library's tape ops. That is all the probe needs (the CausalLM concept):
//
//   logits = lm_head( x + fc2(silu(fc1(x))) ),  x = tok_embed[token] + pos_embed[position]
//
// fc1 and fc2 are LoRA-adapted (frozen base weights, trainable A and B);
// fc1's bias and lm_head are trainable too. By the registry's rule the LoRA
// view holds the four adapter matrices and lm_head, not the bias.
//
// The program builds a registry, takes a few real AdamW steps, runs the probe
// (full variance, precond_sgd ground truth) and checks things that can fail.
// Exit status 0 when every check passes, 1 otherwise.
#include <entropy_probe/entropy_probe.hpp>

#include <fmt/format.h>

#include <cmath>
#include <cstdio>
#include <exception>
#include <random>
#include <string>
#include <vector>

namespace ep = entropy_probe;

namespace {

using T = double;
using Param = ep::Parameter<T>;

Param random_param(ep::Shape shape, std::mt19937_64& rng, double stddev, bool trainable) {
  std::vector<T> v(static_cast<std::size_t>(ep::numel_of(shape)));
  std::normal_distribution<double> nd(0.0, stddev);
  for (auto& x : v) x = nd(rng);
  return Param(ep::Tensor<T>::from_host(std::move(shape), v), trainable);
}

class BigramMlpLM {
 public:
  using scalar_type = T;
  using backend_type = ep::CpuBackend;

  BigramMlpLM(ep::index_t vocab, ep::index_t max_len, ep::index_t d, ep::index_t hidden, ep::index_t r, double alpha,
              std::uint64_t seed)
      : vocab_(vocab), max_len_(max_len), scale_(alpha / double(r)) {
    std::mt19937_64 rng(seed);
    tok_embed_ = random_param({vocab, d}, rng, 0.5, false);
    pos_embed_ = random_param({max_len, d}, rng, 0.1, false);
    fc1_w_ = random_param({hidden, d}, rng, 1.0 / std::sqrt(double(d)), false);
    fc1_b_ = random_param({hidden}, rng, 0.01, true);
    fc1_a_ = random_param({r, d}, rng, 1.0 / std::sqrt(double(d)), true);
    fc1_b_lora_ = Param(ep::Tensor<T>({hidden, r}), true);  // B = 0: PEFT's initialisation
    fc2_w_ = random_param({d, hidden}, rng, 1.0 / std::sqrt(double(hidden)), false);
    fc2_a_ = random_param({r, hidden}, rng, 1.0 / std::sqrt(double(hidden)), true);
    fc2_b_lora_ = Param(ep::Tensor<T>({d, r}), true);
    lm_head_ = random_param({vocab, d}, rng, 0.3, true);
  }

  ep::index_t vocab_size() const { return vocab_; }

  // Declaration order is registry order; names follow PyTorch / PEFT habits.
  void named_parameters(const ep::ParameterVisitor<T>& v) {
    v("tok_embed.weight", tok_embed_);
    v("pos_embed.weight", pos_embed_);
    v("mlp.fc1.weight", fc1_w_);
    v("mlp.fc1.bias", fc1_b_);
    v("mlp.fc1.lora_A.weight", fc1_a_);
    v("mlp.fc1.lora_B.weight", fc1_b_lora_);
    v("mlp.fc2.weight", fc2_w_);
    v("mlp.fc2.lora_A.weight", fc2_a_);
    v("mlp.fc2.lora_B.weight", fc2_b_lora_);
    v("lm_head.weight", lm_head_);
  }

  // Logits [rows, length, vocab]. Each position sees only its own token and
  // position (a bigram model): no attention, so the key mask is not needed.
  ep::Var forward(ep::Tape<T>& tape, const ep::SequenceInput& in) {
    const auto n = static_cast<std::size_t>(in.rows * in.length);
    if (in.tokens.size() != n || in.positions.size() != n)
      ep::fail<ep::UsageError>("BigramMlpLM: {} tokens and {} positions for {} x {} inputs", in.tokens.size(),
                               in.positions.size(), in.rows, in.length);
    for (std::int32_t p : in.positions)
      if (p < 0 || p >= max_len_) ep::fail<ep::InputError>("BigramMlpLM: position {} outside [0, {})", p, max_len_);
    using ep::use;
    const ep::Var x =
        ep::add(tape, ep::embedding(tape, use(tape, tok_embed_), std::span<const std::int32_t>(in.tokens)),
                ep::embedding(tape, use(tape, pos_embed_), std::span<const std::int32_t>(in.positions)));
    const ep::Var h = ep::silu(tape, ep::lora_linear(tape, x, use(tape, fc1_w_), use(tape, fc1_b_), use(tape, fc1_a_),
                                                     use(tape, fc1_b_lora_), scale_));
    const ep::Var y =
        ep::lora_linear(tape, h, use(tape, fc2_w_), std::nullopt, use(tape, fc2_a_), use(tape, fc2_b_lora_), scale_);
    const ep::Var logits = ep::linear(tape, ep::add(tape, x, y), use(tape, lm_head_));
    return ep::reshape(tape, logits, {in.rows, in.length, vocab_});
  }

 private:
  ep::index_t vocab_, max_len_;
  T scale_;
  Param tok_embed_, pos_embed_, fc1_w_, fc1_b_, fc1_a_, fc1_b_lora_, fc2_w_, fc2_a_, fc2_b_lora_, lm_head_;
};

static_assert(ep::CausalLM<BigramMlpLM>, "BigramMlpLM must satisfy the CausalLM concept");

// A synthetic reward: the fraction of even token ids in the response.
ep::TokenBatch sampled_batch(BigramMlpLM& model, ep::index_t prompts, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<std::int32_t> tok(0, static_cast<std::int32_t>(model.vocab_size() - 1));
  std::vector<std::vector<std::int32_t>> p(static_cast<std::size_t>(prompts));
  for (auto& pr : p) pr = {tok(rng), tok(rng), tok(rng)};
  ep::SamplingConfig sc;
  sc.G = 4;
  sc.max_new_tokens = 6;
  sc.seed = seed + 1;
  ep::TokenBatch b = ep::sample_responses(model, p, sc);
  std::vector<double> rewards(static_cast<std::size_t>(b.rows()), 0.0);
  for (ep::index_t i = 0; i < b.B; ++i)
    for (ep::index_t g = 0; g < b.G; ++g) {
      double even = 0, n = 0;
      for (ep::index_t t = 0; t < b.T; ++t)
        if (b.generated(i, g, t)) {
          n += 1;
          even += b.sequences[static_cast<std::size_t>(b.at(i, g, t))] % 2 == 0;
        }
      rewards[static_cast<std::size_t>(i * b.G + g)] = n > 0 ? even / n : 0.0;
    }
  b.advantages = ep::grpo_advantages(rewards, b.B, b.G);
  b.rewards = std::move(rewards);
  return b;
}

int failures = 0;
void check(bool ok, const std::string& what) {
  fmt::print("  [{}] {}\n", ok ? "ok" : "FAILED", what);
  failures += !ok;
}

int run() {
  ep::log_to_stderr(ep::LogLevel::warning);
  BigramMlpLM model(/*vocab=*/16, /*max_len=*/16, /*d=*/16, /*hidden=*/32, /*r=*/4, /*alpha=*/8, /*seed=*/7);

  ep::ProbeConfig cfg;
  cfg.learning_rate = 1e-3;
  cfg.variance = ep::VarianceMode::full;
  cfg.ground_truth = ep::StepKind::precond_sgd;
  cfg.mb_size = 4;
  ep::OfflineEntropyProbe probe(model, cfg);
  const auto& reg = probe.registry();

  fmt::print("Registry of BigramMlpLM: {} trainable tensors ({} numbers), {} in the LoRA view\n", reg.size(),
             reg.numel(), reg.lora_count());
  for (const auto& e : reg.entries())
    fmt::print("  {:<24} {:<8}{}\n", e.name, ep::shape_str(e.param->value.shape()), e.lora ? " LoRA view" : "");
  const std::vector<std::string> expected = {"mlp.fc1.bias",          "mlp.fc1.lora_A.weight", "mlp.fc1.lora_B.weight",
                                             "mlp.fc2.lora_A.weight", "mlp.fc2.lora_B.weight", "lm_head.weight"};
  std::vector<std::string> names, lora;
  for (const auto& e : reg.entries()) names.push_back(e.name);
  for (ep::index_t i : reg.lora_view()) lora.push_back(reg.entry(i).name);
  fmt::print("\nChecks:\n");
  check(names == expected, "the registry holds exactly the trainable parameters, in declaration order");
  check(lora == std::vector<std::string>(expected.begin() + 1, expected.end()),
        "the LoRA view is the adapter matrices and lm_head, not the bias");

  // A few real AdamW steps on sampled batches (the registry's components do
  // the accumulation), so the probe sees a live adapter and a real Adam state.
  ep::AdamHyper hyper;
  hyper.lr = 1e-2;
  ep::AdamState<T> state(reg.info(), hyper);
  for (int step = 0; step < 3; ++step) {
    const ep::TokenBatch U = sampled_batch(model, 8, 100 + std::uint64_t(step));
    const auto sum = probe.components().accumulate_sum_Y(U);
    ep::load_param_gradients(reg, sum.sum, -1.0 / double(sum.count));
    ep::adamw_step(reg, state, hyper.lr);
    reg.zero_grad();
  }

  const ep::TokenBatch E = sampled_batch(model, 12, 200), U = sampled_batch(model, 8, 300);
  std::vector<std::vector<T>> before;
  for (const auto& e : reg.entries()) before.push_back(e.param->value.to_host());
  const ep::ProbeResult r = probe.run(E, U, state);

  fmt::print("\nProbe (E {} prompts, U {} prompts, G {}, eta {:g}):\n", r.B_E, r.B_U, E.G, r.learning_rate);
  fmt::print("  bars_dot         {:+.6e}\n", r.bars_dot);
  fmt::print("  deltaH1          {:+.6e}\n", r.deltaH1);
  fmt::print("  SE_conditional   {:.6e}   (over the LoRA view)\n", r.conditional->se_conditional);
  fmt::print("  SE_deltaH1       {:.6e}   (V_X {:.3e}, V_Y {:.3e})\n", r.full->se_deltaH1, r.full->V_X, r.full->V_Y);
  fmt::print("  deltaH_true_tok  {:+.6e}   (precond_sgd step, ESS {:.1f} of {})\n", r.truth->deltaH_true_tok,
             r.truth->ESS, E.rows());
  fmt::print("  time             {:.3f} s\n", r.timing.at("total"));

  fmt::print("\nChecks:\n");
  check(std::isfinite(r.deltaH1) && r.bars_dot != 0, "the prediction is finite and nonzero");
  check(r.conditional->se_conditional > 0 && r.full->se_deltaH1 > 0, "both standard errors are positive");
  check(r.preconditioner_missing == 0, "every trainable parameter has Adam state");
  bool restored = true;
  for (std::size_t i = 0; i < before.size(); ++i)
    restored &= reg.entry(static_cast<ep::index_t>(i)).param->value.to_host() == before[i];
  check(restored, "the ground-truth step left every parameter bit-exactly as it was");

  // The alpha trick two ways: forward-mode JVP (what run() used) and per-prompt
  // reverse-mode VJPs contracted with mu_Y. Same numbers up to rounding.
  ep::ProbeConfig rev_cfg = cfg;
  rev_cfg.variance = ep::VarianceMode::conditional;
  rev_cfg.alpha_route = ep::AlphaRoute::reverse;
  rev_cfg.ground_truth.reset();
  ep::OfflineEntropyProbe rev_probe(model, rev_cfg);
  // The same Adam state, bound to the second probe's registry (same parameters, same ids).
  ep::AdamState<T> rev_state(rev_probe.registry().info(), state.hyper());
  for (ep::index_t i = 0; i < reg.size(); ++i) rev_state.set(reg.entry(i).id, *state.entry(i));
  const ep::ProbeResult rr = rev_probe.run(E, U, rev_state);
  double worst = 0, scale = 0;
  for (double s : r.conditional->s_values) scale = std::max(scale, std::abs(s));
  for (std::size_t b = 0; b < r.conditional->s_values.size(); ++b)
    worst = std::max(worst, std::abs(r.conditional->s_values[b] - rr.conditional->s_values.at(b)));
  fmt::print("  alpha trick: max |s_jvp - s_reverse| = {:.3e} (max |s| = {:.3e})\n", worst, scale);
  check(scale > 0 && worst <= 1e-10 * scale, "the JVP and reverse alpha-trick routes agree to 1e-10 (relative)");

  fmt::print("\n{}\n", failures == 0 ? "All checks passed." : fmt::format("{} check(s) FAILED.", failures));
  return failures == 0 ? 0 : 1;
}

}  // namespace

int main() {
  try {
    return run();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "custom_module: error: %s\n", e.what());
    return 1;
  }
}
