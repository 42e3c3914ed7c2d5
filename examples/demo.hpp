// The `entropy-probe demo` showcase: train a small GPT-2-shaped LoRA policy
// for a few real GRPO steps on a synthetic task, then ask the probe how the
// next step changes its entropy, and check the prediction against the real
// step over a sweep of learning rates. Everything is seeded and built in
// memory; nothing is downloaded.
//
// Writes results.json (the probe result, the sweep, the training log) and
// calibration.svg (predicted against measured entropy change).
#pragma once

#include "cli/progress.hpp"

#include <entropy_probe/entropy_probe.hpp>
#include <entropy_probe/io/svg_plot.hpp>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace ep_demo {

namespace ep = entropy_probe;

struct DemoOptions {
  std::uint64_t seed = 1;
  std::string out_dir = ".";
  bool quick = false;  // smaller sizes (the test suite runs this)
};

// Every size the demo uses; quick() shrinks them.
struct DemoSizes {
  ep::index_t vocab = 24, n_embd = 32, n_layer = 2, n_head = 4, n_positions = 32;
  ep::index_t target_tokens = 6;  // reward counts response tokens with id < target_tokens
  ep::index_t prompt_min = 2, prompt_max = 4, response_len = 8;
  int train_steps = 8;
  ep::index_t train_prompts = 16, G = 4;
  // Batches large enough that the standard errors are several times smaller
  // than the predicted effect (both scale with eta, so their ratio does not).
  ep::index_t B_E = 256, B_U = 256, mb_size = 32;
  double lr = 1e-2, weight_decay = 0.01;
  double wte_std = 0.1;  // the frozen base model's token embedding scale
  // Two decades up to 3x the training lr: the linear regime and where it ends.
  std::vector<double> etas = {3e-4, 1e-3, 3e-3, 1e-2, 3e-2};

  static DemoSizes quick() {
    DemoSizes s;
    s.train_steps = 4;
    s.train_prompts = 8;
    s.response_len = 6;
    s.B_E = 48;
    s.B_U = 32;
    s.mb_size = 16;
    s.etas = {3e-4, 3e-3, 3e-2};
    return s;
  }
};

using Model = ep::nn::Gpt2LMHeadModel<double>;
using Registry = ep::Registry<double>;
using AdamState = ep::AdamState<double>;

// Independent, reproducible seeds for each use of randomness.
inline std::uint64_t derive_seed(std::uint64_t seed, std::uint64_t purpose, std::uint64_t index = 0) {
  std::uint64_t z = seed * 0x9E3779B97F4A7C15ull + purpose * 0xBF58476D1CE4E5B9ull + index * 0x94D049BB133111EBull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline std::vector<std::vector<std::int32_t>> make_prompts(const DemoSizes& s, ep::index_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<ep::index_t> len(s.prompt_min, s.prompt_max);
  std::uniform_int_distribution<std::int32_t> tok(0, static_cast<std::int32_t>(s.vocab - 1));
  std::vector<std::vector<std::int32_t>> prompts(static_cast<std::size_t>(n));
  for (auto& p : prompts) {
    p.resize(static_cast<std::size_t>(len(rng)));
    for (auto& t : p) t = tok(rng);
  }
  return prompts;
}

// The synthetic reward: the fraction of a response's tokens whose id is below
// target_tokens. A near-uniform policy scores about target_tokens / vocab.
inline std::vector<double> rewards_of(const ep::TokenBatch& b, const DemoSizes& s) {
  std::vector<double> r(static_cast<std::size_t>(b.rows()), 0.0);
  for (ep::index_t p = 0; p < b.B; ++p)
    for (ep::index_t g = 0; g < b.G; ++g) {
      ep::index_t hits = 0, n = 0;
      for (ep::index_t t = 0; t < b.T; ++t)
        if (b.generated(p, g, t)) {
          ++n;
          hits += b.sequences[static_cast<std::size_t>(b.at(p, g, t))] < s.target_tokens;
        }
      r[static_cast<std::size_t>(p * b.G + g)] = n > 0 ? double(hits) / double(n) : 0.0;
    }
  return r;
}

inline double mean(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return v.empty() ? 0.0 : s / double(v.size());
}

// Samples G responses per prompt and attaches rewards and GRPO advantages.
inline ep::TokenBatch sample_batch(Model& model, const DemoSizes& s, ep::index_t prompts, std::uint64_t seed) {
  ep::SamplingConfig sc;
  sc.G = s.G;
  sc.max_new_tokens = s.response_len;  // no end token: every response has the same length L (docs/math.md, Notation)
  sc.seed = derive_seed(seed, 1);
  ep::TokenBatch b = ep::sample_responses(model, make_prompts(s, prompts, derive_seed(seed, 2)), sc);
  b.rewards = rewards_of(b, s);
  b.advantages = ep::grpo_advantages(*b.rewards, b.B, b.G);
  return b;
}

// Mean over a batch's responses of -S / L: a per-token entropy estimate.
inline double entropy_per_token(Model& model, const ep::TokenBatch& b) {
  const std::vector<double> S = ep::sequence_logprobs(model, b, 1.0);
  double nll = 0, tokens = 0;
  for (ep::index_t p = 0; p < b.B; ++p)
    for (ep::index_t g = 0; g < b.G; ++g) {
      nll -= S[static_cast<std::size_t>(p * b.G + g)];
      tokens += double(b.gen_length(p, g));
    }
  return nll / std::max(tokens, 1.0);
}

// One eta of the sweep; [0] the adamw direction (its truth the real AdamW
// step), [1] precond_sgd (theta + eta mu_Y). The SEs are along precond_sgd.
struct SweepRow {
  double eta = 0, se_cond = 0, se_full = 0;
  double deltaH1[2] = {0, 0};
  ep::GroundTruth truth[2];
};

inline double ratio(double a, double b) { return b != 0 ? a / b : std::nan(""); }

inline void write_text(const std::filesystem::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  if (!out) ep::fail<ep::InputError>("cannot open '{}' for writing", path.string());
  out << text;
  out.close();
  if (!out) ep::fail<ep::InputError>("writing '{}' failed", path.string());
}

// Seconds per stage of the demo, each stage timed from the end of the last.
class StageClock {
 public:
  using clock = std::chrono::steady_clock;
  void done(const char* stage) {
    const auto now = clock::now();
    seconds[stage] = std::chrono::duration<double>(now - last_).count();
    last_ = now;
  }
  double since_start() const { return std::chrono::duration<double>(clock::now() - start_).count(); }
  std::map<std::string, double> seconds;

 private:
  clock::time_point start_ = clock::now(), last_ = start_;
};

// The output folder, made before the work: a bad --out fails first, not last.
inline std::filesystem::path make_out_dir(const std::string& dir) {
  const std::filesystem::path out_dir(dir);
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec || !std::filesystem::is_directory(out_dir))
    ep::fail<ep::InputError>("cannot create the output folder '{}': {}", out_dir.string(),
                             ec ? ec.message() : "a file of that name exists");
  return out_dir;
}

inline void print_task(const DemoOptions& opt, const DemoSizes& s) {
  fmt::print("entropy-probe demo{} (seed {})\n\n", opt.quick ? " --quick" : "", opt.seed);
  fmt::print("Synthetic task, built in memory (nothing downloaded): prompts of {}-{} random tokens, {} sampled\n",
             s.prompt_min, s.prompt_max, s.G);
  fmt::print("responses of {} tokens each; reward = fraction of response tokens with id < {} (of a {}-token\n",
             s.response_len, s.target_tokens, s.vocab);
  fmt::print("vocabulary; a uniform policy scores {:.2f}). After a few GRPO steps, the probe predicts how the next\n",
             double(s.target_tokens) / double(s.vocab));
  fmt::print("optimizer step changes the policy's entropy, and checks the prediction against the step itself.\n\n");
}

// ---- a. the model ----------------------------------------------------------------

inline ep::nn::Gpt2Config model_config(const DemoSizes& s) {
  ep::nn::Gpt2Config cfg;
  cfg.vocab_size = s.vocab;
  cfg.n_embd = s.n_embd;
  cfg.n_layer = s.n_layer;
  cfg.n_head = s.n_head;
  cfg.n_positions = s.n_positions;
  return cfg;
}

inline ep::nn::LoraConfig lora_config() {
  ep::nn::LoraConfig lora;
  lora.r = 4;
  lora.lora_alpha = 8;
  lora.target_modules = {"c_attn", "c_proj", "c_fc"};
  lora.init_lora_b_zero = true;  // PEFT's initialisation: the adapted model starts equal to the base
  return lora;
}

// A base model with larger token embeddings than GPT-2's fresh init (std
// 0.02): the tied lm_head then has logits of order one (a policy with
// structure, not a uniform one), and the adapters can move it within a few
// steps, as a pretrained base allows.
inline void widen_embeddings(Model& model, const DemoSizes& s, std::uint64_t seed) {
  std::mt19937_64 rng(derive_seed(seed, 4));
  model.wte().value = ep::nn::random_normal<double, ep::CpuBackend>({s.vocab, s.n_embd}, rng, s.wte_std);
}

inline void print_model(const DemoSizes& s, const ep::nn::LoraConfig& lora, const Registry& reg) {
  fmt::print(
      "Model: GPT-2 layout in double, vocab {}, n_embd {}, {} layers, {} heads; LoRA r {} alpha {} on "
      "c_attn, c_proj, c_fc\n",
      s.vocab, s.n_embd, s.n_layer, s.n_head, lora.r, lora.lora_alpha);
  fmt::print("       {} trainable tensors ({} numbers), all in the LoRA view\n\n", reg.size(), reg.numel());
}

// ---- b. a few real GRPO steps with AdamW --------------------------------------------

struct Training {
  AdamState state;                               // the optimizer state after the last step
  nlohmann::json log = nlohmann::json::array();  // per step: mean reward, entropy per token
};

// A sampled batch's mean reward and entropy per token, added to the training log under `step`.
inline std::pair<double, double> log_batch(Training& t, Model& model, const ep::TokenBatch& b,
                                           const nlohmann::json& step) {
  const double reward = mean(*b.rewards), h_tok = entropy_per_token(model, b);
  t.log.push_back({{"step", step}, {"mean_reward", reward}, {"entropy_per_token", h_tok}});
  return {reward, h_tok};
}

inline Training train(Model& model, const Registry& reg, const DemoSizes& s, std::uint64_t seed) {
  ep::AdamHyper hyper;
  hyper.lr = s.lr;
  hyper.weight_decay = s.weight_decay;
  Training t{AdamState(reg.info(), hyper)};
  ep::SingleProcess comm;
  ep::ProbeComponents<Model> trainer(model, reg, ep::ProbeSettings{}, comm);
  fmt::print("Training: {} GRPO steps, {} prompts x G {}, AdamW lr {:g}, weight decay {:g}\n", s.train_steps,
             s.train_prompts, s.G, s.lr, s.weight_decay);
  fmt::print("  step  mean reward  entropy/token (sampled batch)\n");
  for (int step = 1; step <= s.train_steps; ++step) {
    const ep::TokenBatch U = sample_batch(model, s, s.train_prompts, derive_seed(seed, 10, std::uint64_t(step)));
    const auto [reward, h_tok] = log_batch(t, model, U, step);
    fmt::print("  {:>4}  {:>11.3f}  {:>13.4f}\n", step, reward, h_tok);
    bool any = false;
    for (double a : U.advantages) any |= a != 0;
    if (!any) {  // every group tied: the RL gradient is exactly zero, nothing to step on
      fmt::print("        (every group tied: zero advantages, step skipped)\n");
      continue;
    }
    const auto sum = trainer.accumulate_sum_Y(U);
    // The loss is -(1/B) sum_u LY[u]; its gradient goes to the optimizer.
    ep::load_param_gradients(reg, sum.sum, -1.0 / double(sum.count));
    ep::adamw_step(reg, t.state, s.lr);
    reg.zero_grad();
  }
  const ep::TokenBatch after = sample_batch(model, s, s.train_prompts, derive_seed(seed, 11));
  const auto [reward, h_tok] = log_batch(t, model, after, "after");
  fmt::print("  after {:>11.3f}  {:>13.4f}\n\n", reward, h_tok);
  return t;
}

// ---- c. the probe -------------------------------------------------------------------

// Full variance and the Adam ground truth at the training lr; both directions
// over the sweep, each against the step it linearises (the baseline on E is
// computed once for all of them).
inline ep::ProbeConfig probe_config(const DemoSizes& s) {
  ep::ProbeConfig pc;
  pc.learning_rate = s.lr;
  pc.variance = ep::VarianceMode::full;
  pc.ground_truth = ep::StepKind::adam;
  pc.mb_size = s.mb_size;
  pc.directions = {ep::Direction::precond_sgd, ep::Direction::adamw};
  pc.lr_sweep = s.etas;
  pc.control_variates = true;  // the cross-fitted estimate beside the plain one (docs/math.md (m))
  pc.progress = ep_cli::progress_printer([](const std::string& line) {
    std::fflush(stdout);  // keep the report and the progress lines in order on a shared terminal
    fmt::print(stderr, "  {}\n", line);
  });
  return pc;
}

// The trained optimizer state on the probe's own registry, moved over
// parameter by parameter (same parameters, same ids), as a checkpoint's
// optimizer.safetensors would be loaded by registry name.
inline AdamState state_on(const Registry& probe_reg, const Registry& train_reg, const AdamState& train_state) {
  AdamState state(probe_reg.info(), train_state.hyper());
  for (ep::index_t i = 0; i < train_reg.size(); ++i)
    if (const auto* e = train_state.entry(i)) state.set(train_reg.entry(i).id, *e);
  return state;
}

struct ProbeRun {
  ep::ProbeResult result;
  ep::index_t E_responses = 0;  // the importance-sampled responses of the ground truth
};

// Samples E and U from the trained policy (stage "sampling") and runs the probe on them (stage "probe").
inline ProbeRun probe_trained(Model& model, const Registry& train_reg, const AdamState& train_state, const DemoSizes& s,
                              std::uint64_t seed, StageClock& clock) {
  ep::OfflineEntropyProbe probe(model, probe_config(s));
  const AdamState state = state_on(probe.registry(), train_reg, train_state);
  const ep::TokenBatch E = sample_batch(model, s, s.B_E, derive_seed(seed, 20));
  const ep::TokenBatch U = sample_batch(model, s, s.B_U, derive_seed(seed, 21));
  clock.done("sampling");
  fmt::print(
      "Probe: E batch {} prompts x G {} (entropy gradient X), U batch {} prompts x G {} (update Y), "
      "microbatches of {}\n",
      E.B, E.G, U.B, U.G, s.mb_size);
  ProbeRun run{probe.run(E, U, state), E.rows()};
  clock.done("probe");
  return run;
}

// ---- the report ---------------------------------------------------------------------

// The standard errors at eta = 1: the prediction and both SEs scale with eta.
struct UnitSE {
  double conditional = 0, full = 0;
};
inline UnitSE unit_se(const ep::ProbeResult& r) {
  return {std::sqrt(r.conditional->var_s / double(r.B_E)), std::sqrt(r.full->V_X + r.full->V_Y)};
}

inline void print_probe(const ep::ProbeResult& r) {
  fmt::print("  bars_dot = mu_X . mu_Y = {:+.4e}   |mu_X| = {:.3e}   |mu_Y| = {:.3e}\n", r.bars_dot, r.mu_X_norm,
             r.mu_Y_norm);
  fmt::print(
      "  at the training lr {:g}: deltaH1 = {:+.4e}, SE_conditional = {:.3e}, SE_deltaH1 = {:.3e}, "
      "deltaH_true_tok (adam) = {:+.4e}\n",
      r.learning_rate, r.deltaH1, r.conditional->se_conditional, r.full->se_deltaH1, r.truth->deltaH_true_tok);
  fmt::print(
      "  H_orig_tok = {:.4f} nats/token on E; probe time {:.2f} s (sum_X {:.2f}, sum_Y {:.2f}, variance {:.2f}, "
      "ground truth {:.2f})\n\n",
      r.truth->H_orig_tok, r.timing.at("total"), r.timing.at("sum_X"), r.timing.at("sum_Y"),
      r.timing.at("conditional_variance") + r.timing.at("full_variance"), r.timing.at("ground_truth"));
}

// The sweep (ProbeConfig::lr_sweep, run by probe.run) as one row per eta of `etas`:
// the ground truth took the step at each eta along each direction.
inline std::vector<SweepRow> sweep_rows(const ep::ProbeResult& r, const std::vector<double>& etas, UnitSE se) {
  std::vector<SweepRow> rows(etas.size());
  for (const ep::SweepPoint& p : r.lr_sweep) {
    const auto k = static_cast<std::size_t>(std::find(etas.begin(), etas.end(), p.learning_rate) - etas.begin());
    const int d = p.direction == ep::Direction::adamw ? 0 : 1;
    rows[k].eta = p.learning_rate;
    rows[k].se_cond = p.learning_rate * se.conditional;
    rows[k].se_full = p.learning_rate * se.full;
    rows[k].deltaH1[d] = p.deltaH1;
    rows[k].truth[d] = p.truth;
  }
  return rows;
}

inline void print_sweep(const std::vector<SweepRow>& rows, const ep::ProbeResult& r, UnitSE se,
                        ep::index_t E_responses) {
  fmt::print("Learning-rate sweep (ratio = deltaH_true_tok / deltaH1; ESS of {} importance-sampled responses):\n",
             E_responses);
  fmt::print("  {:>8} | {:^40} | {:^60}\n", "", "adamw: the real AdamW step", "precond_sgd: theta + eta mu_Y");
  fmt::print("  {:>8} | {:>11} {:>13} {:>7} {:>6} | {:>11} {:>9} {:>9} {:>13} {:>7} {:>6}\n", "eta", "deltaH1",
             "dH_true_tok", "ratio", "ESS", "deltaH1", "SE_cond", "SE_full", "dH_true_tok", "ratio", "ESS");
  for (const SweepRow& row : rows)
    fmt::print(
        "  {:>8.1e} | {:>+11.3e} {:>+13.3e} {:>7.3f} {:>6.1f} | {:>+11.3e} {:>9.2e} {:>9.2e} {:>+13.3e} {:>7.3f} "
        "{:>6.1f}\n",
        row.eta, row.deltaH1[0], row.truth[0].deltaH_true_tok, ratio(row.truth[0].deltaH_true_tok, row.deltaH1[0]),
        row.truth[0].ESS, row.deltaH1[1], row.se_cond, row.se_full, row.truth[1].deltaH_true_tok,
        ratio(row.truth[1].deltaH_true_tok, row.deltaH1[1]), row.truth[1].ESS);
  fmt::print(
      "deltaH1 is a per-token change (dr_grpo scale, docs/math.md), compared with deltaH_true_tok, "
      "importance-sampled on the same E batch.\n"
      "Each direction's deltaH1 linearises its own step (ratio -> 1 as eta -> 0): adamw carries momentum, bias "
      "corrections and weight decay.\n");
  fmt::print(
      "Signal to noise |deltaH1| / SE_full = {:.1f} (|deltaH1| / SE_cond = {:.1f}), the same at every eta: "
      "both scale with eta.\n\n",
      std::abs(r.bars_dot) / se.full, std::abs(r.bars_dot) / se.conditional);
  if (r.control_variates) {
    const ep::ControlVariates& cv = *r.control_variates;
    fmt::print(
        "Control variates ({} zero-mean features, cross-fitted): deltaH1 = {:+.4e} +- {:.3e} against the plain "
        "{:+.4e} +- {:.3e} (E sampling noise only; SE ratio {:.3f})\n\n",
        cv.features.size(), cv.deltaH1, cv.SE, cv.deltaH1_plain, cv.SE_plain, cv.SE / cv.SE_plain);
  }
}

// ---- d. results.json and calibration.svg ----------------------------------------------

inline nlohmann::json results_json(const ep::ProbeResult& r, const std::vector<SweepRow>& rows,
                                   const Training& training, const DemoOptions& opt, const DemoSizes& s,
                                   const ep::nn::LoraConfig& lora, const std::map<std::string, double>& timing) {
  nlohmann::json j = ep::to_json(r);
  nlohmann::json sweep = nlohmann::json::array();
  for (const SweepRow& row : rows)
    for (int k = 0; k < 2; ++k) {
      const ep::GroundTruth& t = row.truth[k];
      sweep.push_back({{"eta", row.eta},
                       {"step_kind", k == 0 ? "adam" : "precond_sgd"},
                       {"direction", k == 0 ? "adamw" : "precond_sgd"},
                       {"deltaH1", row.deltaH1[k]},
                       {"SE_conditional", row.se_cond},
                       {"SE_deltaH1", row.se_full},
                       {"H_orig", t.H_orig},
                       {"H_upd", t.H_upd},
                       {"deltaH_true", t.deltaH_true},
                       {"H_orig_tok", t.H_orig_tok},
                       {"H_upd_tok", t.H_upd_tok},
                       {"deltaH_true_tok", t.deltaH_true_tok},
                       {"ESS", t.ESS},
                       {"ratio", ratio(t.deltaH_true_tok, row.deltaH1[k])}});
    }
  j["sweep"] = sweep;
  j["training"] = training.log;
  j["demo"] = {{"seed", opt.seed},
               {"quick", opt.quick},
               {"task", fmt::format("synthetic: reward = fraction of response tokens with id < {} (vocabulary {})",
                                    s.target_tokens, s.vocab)},
               {"model",
                {{"family", "gpt2"},
                 {"dtype", "double"},
                 {"vocab_size", s.vocab},
                 {"n_embd", s.n_embd},
                 {"n_layer", s.n_layer},
                 {"n_head", s.n_head},
                 {"n_positions", s.n_positions}}},
               {"lora", {{"r", lora.r}, {"lora_alpha", lora.lora_alpha}, {"target_modules", lora.target_modules}}},
               {"train",
                {{"steps", s.train_steps},
                 {"prompts", s.train_prompts},
                 {"G", s.G},
                 {"lr", s.lr},
                 {"weight_decay", s.weight_decay},
                 {"response_len", s.response_len}}}};
  j["demo"]["timing"] = timing;  // up to the sweep; writing the files is not included
  return j;
}

// Both directions over the sweep and, beside each precond_sgd point, the
// control-variate estimate of the same deltaH1 (docs/math.md (m)): the probe
// fits it at the training lr, and it and its SE scale with eta as deltaH1 does.
inline ep::ScatterPlot calibration_plot(const std::vector<SweepRow>& rows, const ep::ProbeResult& r, const DemoSizes& s,
                                        std::uint64_t seed) {
  ep::ScatterPlot plot;
  plot.title = fmt::format("Entropy probe calibration, \u03b7 = {:g} \u2026 {:g} (seed {})", s.etas.front(),
                           s.etas.back(), seed);
  plot.x_label = "measured \u0394H per token (deltaH_true_tok, importance-sampled on E)";
  plot.scale = ep::AxisScale::symlog;  // the sweep spans two decades: on linear axes the small steps would merge
  plot.y_label = "predicted \u0394H1 = \u03b7 \u03bcX\u00b7v  (bars: \u00b12 SE_deltaH1, along \u03bcY)";
  for (int k = 0; k < 2; ++k) {
    ep::PlotSeries series;
    series.label = k == 0 ? "adamw: real AdamW step" : "precond_sgd: \u03b8 + \u03b7 \u03bcY";
    for (const SweepRow& row : rows)  // SE_deltaH1 is along mu_Y only: no bar for adamw
      series.points.push_back({row.truth[k].deltaH_true_tok, row.deltaH1[k], k == 0 ? 0.0 : 2 * row.se_full});
    plot.series.push_back(std::move(series));
  }
  if (r.control_variates) {
    const ep::ControlVariates& cv = *r.control_variates;
    ep::PlotSeries series;
    series.label = "control variates along \u03bcY (bars: \u00b12 SE, E noise only)";
    series.marker = ep::Marker::diamond;
    series.dodge_px = 9;  // beside its precond_sgd point, which has the same measured x
    for (const SweepRow& row : rows) {
      const double scale = row.eta / r.learning_rate;
      series.points.push_back({row.truth[1].deltaH_true_tok, scale * cv.deltaH1, 2 * scale * cv.SE});
    }
    plot.series.push_back(std::move(series));
  }
  return plot;
}

// ---- the demo: make the data, probe, report, plot ----------------------------------------

inline int run_demo(const DemoOptions& opt) {
  StageClock clock;
  const DemoSizes s = opt.quick ? DemoSizes::quick() : DemoSizes{};
  const std::filesystem::path out_dir = make_out_dir(opt.out_dir);
  print_task(opt, s);

  const ep::nn::LoraConfig lora = lora_config();
  Model model(model_config(s), lora, derive_seed(opt.seed, 3));
  widen_embeddings(model, s, opt.seed);
  const Registry train_reg = Registry::build(model);
  print_model(s, lora, train_reg);
  const Training training = train(model, train_reg, s, opt.seed);
  clock.done("training");

  const ProbeRun run = probe_trained(model, train_reg, training.state, s, opt.seed, clock);
  const ep::ProbeResult& r = run.result;
  const UnitSE se = unit_se(r);
  print_probe(r);
  const std::vector<SweepRow> rows = sweep_rows(r, s.etas, se);
  clock.seconds["sweep"] = r.timing.at("lr_sweep");  // inside the probe stage
  print_sweep(rows, r, se, run.E_responses);

  const auto json_path = out_dir / "results.json";
  write_text(json_path, results_json(r, rows, training, opt, s, lora, clock.seconds).dump(2) + "\n");
  const auto svg_path = out_dir / "calibration.svg";
  ep::write_svg(svg_path.string(), calibration_plot(rows, r, s, opt.seed));
  clock.done("output");
  fmt::print("Wrote {} and {}\n", json_path.string(), svg_path.string());
  std::map<std::string, double>& t = clock.seconds;
  fmt::print("Done in {:.1f} s (training {:.1f}, sampling E and U {:.1f}, probe {:.1f} of which the sweep {:.1f}).\n",
             clock.since_start(), t["training"], t["sampling"], t["probe"], t["sweep"]);
  return 0;
}

}  // namespace ep_demo
