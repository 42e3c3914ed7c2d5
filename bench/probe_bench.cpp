// The probe's phases on a fixed GPT-2-shaped LoRA model, each reported as a
// ratio to one plain forward + backward of the same batch measured in the same
// run (see docs/performance.md):
//
//   probe/fwd_bwd       the baseline: per microbatch, record_sequence_logprobs
//                       and tape.backward seeded with ones on S, on E
//   probe/fwd_bwd_U     the same on U (the baseline of sum_Y: the two batches
//                       score different numbers of tokens)
//   probe/fwd           the forward alone on E (for reading the others)
//   probe/sum_X         ProbeComponents::accumulate_sum_X(E)
//   probe/sum_Y         ProbeComponents::accumulate_sum_Y(U)
//   probe/alpha_jvp     ConditionalVarianceEstimator::estimate(E, mu_Y, eta, AlphaRoute::jvp)
//   probe/alpha_reverse the same by AlphaRoute::reverse (one VJP per prompt)
//   probe/ground_truth  ground_truth(..., StepKind::precond_sgd, ...): two
//                       forwards of E around a step, snapshot and restore
//
// Each phase benchmark also runs its baseline right before every timed
// iteration (untimed) and reports x_baseline = phase / baseline over those
// back-to-back pairs: on a loaded machine that ratio is far steadier than a
// ratio of two benchmarks run minutes apart. The table printed at the end
// shows both, plus the ratio of main-thread CPU times.
//
// "large" is the configuration of docs/performance.md (vocab 2048, n_embd 128,
// 4 layers, 4 heads, LoRA r 8 on c_attn, c_proj, c_fc with random B; B = 8
// prompts, G = 4, T = 64, mb_size 4, f32); "small" is a tiny model for the
// ctest smoke test (--benchmark_filter=/small).
#include "benchmark_main.hpp"

#include <entropy_probe/probe/probe.hpp>

#include <benchmark/benchmark.h>
#include <fmt/format.h>

#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace ep = entropy_probe;
using ep::index_t;
using ep_bench::Model;

namespace {

using ep_bench::kLarge;
using ep_bench::kSmall;
using ep_bench::ProbeShape;
using ep_bench::Times;

// Model, registry, batches, Adam state and mu_Y, built once per shape.
struct Fixture {
  static constexpr double kEta = 1e-3;

  ProbeShape s;
  Model model;
  ep::Registry<float> registry;
  ep::SingleProcess comm;
  ep::ProbeComponents<Model> components;
  ep::TokenBatch E, U;
  ep::AdamState<float> state;
  ep::ProbeComponents<Model>::Sum sum_Y;
  ep::ProbeComponents<Model>::Buffer mu_Y;

  explicit Fixture(const ProbeShape& sh)
      : s(sh),
        model(ep_bench::make_model(sh)),
        registry(ep::Registry<float>::build(model)),
        components(model, registry, ep::ProbeSettings{.mb_size = sh.mb_size}, comm),
        E(ep_bench::random_batch(sh, 2)),
        U(ep_bench::random_batch(sh, 3)),
        state(ep_bench::random_adam_state(registry, 4)),
        sum_Y(components.accumulate_sum_Y(U)),
        mu_Y([this] {
          ep::AdamPreconditioner<float> precond(state);
          return ep::preconditioned_mean(sum_Y.sum, sum_Y.count, precond);
        }()) {}
};

Fixture& fixture(const ProbeShape& s) {
  static std::map<std::string, std::unique_ptr<Fixture>> cache;  // built on first use
  auto& slot = cache[s.name];
  if (!slot) slot = std::make_unique<Fixture>(s);
  return *slot;
}

// The baseline: one plain forward + backward of the batch, microbatch by
// microbatch like the phases, the backward seeded with ones on S.
void fwd_bwd(Fixture& f, const ep::TokenBatch& batch, bool backward) {
  f.components.for_each_microbatch(batch, "fwd_bwd", [&](const ep::TokenBatch& mb, std::span<const ep::index_t>) {
    f.registry.zero_grad();
    ep::Tape<float> tape;
    const ep::Var S = ep::record_sequence_logprobs(tape, f.model, mb, 1.0);
    if (backward) tape.backward(S, ep::Tensor<float>::full({mb.rows()}, 1.0f));
    benchmark::DoNotOptimize(tape.value(S).data());
  });
  f.registry.zero_grad();
}

enum class Phase { fwd_bwd, fwd_bwd_U, fwd, sum_X, sum_Y, alpha_jvp, alpha_reverse, ground_truth };

void run_phase(Fixture& f, const ep::ConditionalVarianceEstimator<Model>& est, Phase phase) {
  switch (phase) {
    case Phase::fwd_bwd:
      fwd_bwd(f, f.E, true);
      break;
    case Phase::fwd_bwd_U:
      fwd_bwd(f, f.U, true);
      break;
    case Phase::fwd:
      fwd_bwd(f, f.E, false);
      break;
    case Phase::sum_X:
      benchmark::DoNotOptimize(f.components.accumulate_sum_X(f.E));
      break;
    case Phase::sum_Y:
      benchmark::DoNotOptimize(f.components.accumulate_sum_Y(f.U));
      break;
    case Phase::alpha_jvp:
      benchmark::DoNotOptimize(est.estimate(f.E, f.mu_Y, f.kEta, ep::AlphaRoute::jvp));
      break;
    case Phase::alpha_reverse:
      benchmark::DoNotOptimize(est.estimate(f.E, f.mu_Y, f.kEta, ep::AlphaRoute::reverse));
      break;
    case Phase::ground_truth:
      benchmark::DoNotOptimize(ep::ground_truth(f.components, f.E, ep::StepKind::precond_sgd, f.kEta, f.sum_Y.sum,
                                                f.sum_Y.count, f.mu_Y, f.state, ep::ISEstimator::snis, 10.0));
      break;
  }
}

// The baseline a phase is compared with: forward + backward of its own batch.
Phase baseline_of(Phase p) { return p == Phase::sum_Y ? Phase::fwd_bwd_U : Phase::fwd_bwd; }

// Times the phase. Unless it is a baseline itself, every iteration also runs
// its baseline (untimed, just before) and the counter x_baseline = phase time
// / baseline time over the same iterations: a ratio from back-to-back pairs,
// robust to load that changes between benchmarks on a shared machine.
void bm_phase(benchmark::State& st, ProbeShape s, Phase phase) {
  using clock = std::chrono::steady_clock;
  Fixture& f = fixture(s);
  const ep::ConditionalVarianceEstimator<Model> est(f.components);
  const bool paired = phase != Phase::fwd_bwd && phase != Phase::fwd_bwd_U;
  double phase_s = 0, base_s = 0;
  for ([[maybe_unused]] auto _ : st) {
    if (paired) {
      st.PauseTiming();
      const auto t0 = clock::now();
      run_phase(f, est, baseline_of(phase));
      base_s += std::chrono::duration<double>(clock::now() - t0).count();
      st.ResumeTiming();
    }
    const auto t0 = clock::now();
    run_phase(f, est, phase);
    phase_s += std::chrono::duration<double>(clock::now() - t0).count();
  }
  if (paired) st.counters["x_baseline"] = phase_s / base_s;
}

const std::vector<std::pair<Phase, const char*>> kPhases{
    {Phase::fwd_bwd, "fwd_bwd"},
    {Phase::fwd_bwd_U, "fwd_bwd_U"},
    {Phase::fwd, "fwd"},
    {Phase::sum_X, "sum_X"},
    {Phase::sum_Y, "sum_Y"},
    {Phase::alpha_jvp, "alpha_jvp"},
    {Phase::alpha_reverse, "alpha_reverse"},
    {Phase::ground_truth, "ground_truth"},
};

void register_all() {
  for (const ProbeShape& s : {kLarge, kSmall})
    for (const auto& [phase, name] : kPhases)
      benchmark::RegisterBenchmark(fmt::format("probe/{}/{}", name, s.name).c_str(), bm_phase, s, phase)
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
}

void print_ratios(const std::map<std::string, Times>& t) {
  struct Row {
    const char* phase;
    const char* base;
    double target;  // 0 = none
  };
  const std::vector<Row> rows{
      {"fwd", "fwd_bwd", 0},
      {"sum_X", "fwd_bwd", 1.2},
      {"sum_Y", "fwd_bwd_U", 1.2},
      {"alpha_jvp", "fwd_bwd", 1.5},
      {"alpha_reverse", "fwd_bwd", 0},
      {"ground_truth", "fwd_bwd", 0},
      {"alpha_reverse", "alpha_jvp", 0},
  };
  // paired: median of the back-to-back x_baseline counter (the measure the
  // targets are checked on); wall, cpu: ratios of the separate medians.
  auto paired = [&](const std::string& phase, const std::string& base) {
    const double p = t.count(phase) ? t.at(phase).paired : 0.0;
    if (base.find("/fwd_bwd") != std::string::npos) return p;
    const double q = t.count(base) ? t.at(base).paired : 0.0;  // a phase over a phase: ratio of their pairs
    return p > 0 && q > 0 ? p / q : 0.0;
  };
  fmt::print("\nMedian times, phase / baseline (paired: back-to-back wall; wall, cpu: separate medians):\n");
  fmt::print("{:<26} {:<22} {:>9} {:>9} {:>6} {:>6} {:>6}  {}\n", "phase", "baseline", "phase ms", "base ms", "paired",
             "wall", "cpu", "target");
  for (const char* size : {"large", "small"}) {
    for (const Row& r : rows) {
      const std::string a = fmt::format("probe/{}/{}", r.phase, size), b = fmt::format("probe/{}/{}", r.base, size);
      if (!t.count(a)) continue;
      const double pr = paired(a, b);
      const bool have_b = t.count(b) > 0;
      const double wall = have_b ? t.at(a).wall / t.at(b).wall : 0.0, cpu = have_b ? t.at(a).cpu / t.at(b).cpu : 0.0;
      const double checked = pr > 0 ? pr : wall;
      const std::string target =
          r.target > 0 && std::string(size) == "large"  // the targets are stated for the large case
              ? fmt::format("<= {:.2f} {}", r.target, checked <= r.target ? "met" : "MISSED")
              : "";
      fmt::print("{:<26} {:<22} {:>9.2f} {:>9.2f} {:>6.2f} {:>6.2f} {:>6.2f}  {}\n", a, b, t.at(a).wall * 1e3,
                 have_b ? t.at(b).wall * 1e3 : 0.0, pr, wall, cpu, target);
    }
  }
}

}  // namespace

int main(int argc, char** argv) { return ep_bench::run_main(argc, argv, register_all, print_ratios); }
