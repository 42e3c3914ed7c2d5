// The automatic microbatch size (ProbeSettings::mb_size unset): the choice as
// a pure function, the allocator counters it measures with, the driver's
// sizes on a body of known cost, and whole probe runs that must not depend on
// it.
#include "../support/result_compare.hpp"
#include "../support/tiny_models.hpp"

#include <entropy_probe/io/result_json.hpp>
#include <entropy_probe/probe/probe.hpp>

#include <catch2/catch.hpp>

#include <cstddef>
#include <limits>
#include <map>
#include <vector>

using namespace entropy_probe;
using namespace ep_test;
using Catch::Contains;

namespace {

using Model = nn::Gpt2LMHeadModel<double>;
constexpr std::size_t MiB = std::size_t(1) << 20;

ProbeConfig config(std::optional<index_t> mb_size, VarianceMode variance = VarianceMode::full) {
  ProbeConfig cfg;
  cfg.learning_rate = 1e-2;
  cfg.variance = variance;
  cfg.mb_size = mb_size;
  cfg.ground_truth = StepKind::precond_sgd;
  return cfg;
}

}  // namespace

TEST_CASE("auto microbatch: the size that fits the budget", "[probe][microbatch]") {
  // 100 B per prompt above 1000 B in use.
  CHECK(microbatch_size_for_budget("sum_X", 100, 1000, 1550, 10) == 5);
  CHECK(microbatch_size_for_budget("sum_X", 100, 1000, 1300, 10) == 3);  // exactly three prompts' worth
  CHECK(microbatch_size_for_budget("sum_X", 100, 1000, 1299, 10) == 2);
  CHECK(microbatch_size_for_budget("sum_X", 100, 1000, 1100, 10) == 1);  // exactly one
  CHECK(microbatch_size_for_budget("sum_X", 100, 1000, 1199, 10) == 1);
  CHECK(microbatch_size_for_budget("sum_X", 100, 1000, 1 << 20, 4) == 4);  // never more than is left
  CHECK(microbatch_size_for_budget("sum_X", 100, 1000, 1 << 20, 0) == 1);  // nothing left: the one measured
  CHECK(microbatch_size_for_budget("sum_X", 0, 1000, 1000, 7) == 7);       // a prompt that costs nothing
  // A huge budget does not overflow into a small or negative size.
  CHECK(microbatch_size_for_budget("sum_X", 1, 0, std::numeric_limits<std::size_t>::max(), index_t(1) << 40) ==
        index_t(1) << 40);

  // One prompt over the budget, or the budget already spent: a clear error
  // naming the phase, the bytes, the budget and the way out.
  CHECK_THROWS_WITH(microbatch_size_for_budget("conditional_variance", 3 * MiB, 2 * MiB, 4 * MiB, 3),
                    Contains("conditional_variance") && Contains("3.00 MiB") && Contains("2.00 MiB") &&
                        Contains("4.00 MiB") && Contains("--max-memory") && Contains("shorter sequences"));
  CHECK_THROWS_WITH(microbatch_size_for_budget("sum_Y", 0, 5 * MiB, 4 * MiB, 3),
                    Contains("sum_Y: the 5.00 MiB already in use") && Contains("budget of 4.00 MiB before any") &&
                        Contains("--max-memory"));
  CHECK(bytes_text(512) == "512 B");
  CHECK(bytes_text(3 * (std::size_t(1) << 29)) == "1.50 GiB");
}

TEST_CASE("auto microbatch: the host allocator counts bytes in use and their peak", "[probe][microbatch][memory]") {
  using Cpu = CpuBackend;
  const std::size_t start = Cpu::memory_in_use();
  Cpu::reset_peak_memory();
  CHECK(Cpu::peak_memory() == start);
  {
    Tensor<double> a(Shape{index_t(1) << 20});  // 8 MiB, a size class of its own
    CHECK(Cpu::memory_in_use() == start + 8 * MiB);
    {
      Tensor<double> b(Shape{1000});  // small blocks count too (rounded to the alignment)
      CHECK(Cpu::memory_in_use() >= start + 8 * MiB + 8000);
    }
    CHECK(Cpu::memory_in_use() == start + 8 * MiB);
  }
  CHECK(Cpu::memory_in_use() == start);
  CHECK(Cpu::peak_memory() >= start + 8 * MiB + 8000);
  Cpu::reset_peak_memory();
  CHECK(Cpu::peak_memory() == start);

  // A whole forward and forward-mode pass: every byte its tape held comes
  // back when the tape is destroyed, and the peak saw at least the tape's values.
  auto model = tiny_gpt2<double>(3);
  const Registry<double> reg = Registry<double>::build(model);
  const auto tangent = zeros_like_params<double>(reg);
  const TokenBatch batch = random_batch(2, 2, 8, tiny_gpt2_config().vocab_size, 5);
  const std::size_t before = Cpu::memory_in_use();
  Cpu::reset_peak_memory();
  std::size_t during = 0;
  {
    Tape<double> tape;
    Var S = record_sequence_logprobs(tape, model, batch, 1.0);
    jvp(tape, tangent);
    during = Cpu::memory_in_use();
    CHECK(tape.value(S).numel() == 4);
  }
  CHECK(during > before);
  CHECK(Cpu::peak_memory() >= during);
  CHECK(Cpu::memory_in_use() == before);
  CHECK(Cpu::memory_available() > 0);
  CHECK(default_memory_budget<Cpu>() > Cpu::memory_in_use());
}

TEST_CASE("auto microbatch: the driver sizes microbatches from one prompt's measured cost", "[probe][microbatch]") {
  auto model = tiny_gpt2<double>(4);
  const Registry<double> reg = Registry<double>::build(model);
  SingleProcess comm;
  const TokenBatch batch = random_batch(8, 2, 8, tiny_gpt2_config().vocab_size, 6);
  // A body holding 8 MiB per prompt while it runs: the measured cost.
  index_t chosen = 0;
  auto sizes_for = [&](std::size_t budget_above_in_use) {
    const std::size_t in_use = CpuBackend::memory_in_use();
    ProbeComponents<Model> c(model, reg, ProbeSettings{.memory_budget = in_use + budget_above_in_use}, comm);
    std::vector<index_t> sizes, seen;
    const index_t n = c.for_each_microbatch(batch, "test_phase", [&](const TokenBatch& mb, std::span<const index_t> p) {
      Tensor<double> held(Shape{mb.B, index_t(1) << 20});
      sizes.push_back(mb.B);
      seen.insert(seen.end(), p.begin(), p.end());
    });
    CHECK(n == 8);
    CHECK(seen == std::vector<index_t>{0, 1, 2, 3, 4, 5, 6, 7});  // every prompt once, in order
    chosen = c.microbatch_sizes().at("test_phase");
    return sizes;
  };
  CHECK(sizes_for(8 * MiB + 4 * MiB) == std::vector<index_t>{1, 1, 1, 1, 1, 1, 1, 1});  // room for one prompt
  CHECK(chosen == 1);
  CHECK(sizes_for(3 * 8 * MiB + 4 * MiB) == std::vector<index_t>{1, 3, 3, 1});
  CHECK(chosen == 3);
  CHECK(sizes_for(std::size_t(1) << 40) == std::vector<index_t>{1, 7});
  CHECK(chosen == 7);
  // Less than one prompt: the error comes after the measured prompt, before a second microbatch.
  index_t calls = 0;
  ProbeComponents<Model> tight(model, reg, ProbeSettings{.memory_budget = CpuBackend::memory_in_use() + 4 * MiB}, comm);
  CHECK_THROWS_WITH(tight.for_each_microbatch(batch, "test_phase",
                                              [&](const TokenBatch& mb, std::span<const index_t>) {
                                                Tensor<double> held(Shape{mb.B, index_t(1) << 20});
                                                ++calls;
                                              }),
                    Contains("test_phase") && Contains("8.00 MiB") && Contains("--max-memory"));
  CHECK(calls == 1);
  // A budget already spent fails before any prompt runs.
  calls = 0;
  ProbeComponents<Model> spent(model, reg, ProbeSettings{.memory_budget = 1}, comm);
  CHECK_THROWS_WITH(
      spent.for_each_microbatch(batch, "test_phase", [&](const TokenBatch&, std::span<const index_t>) { ++calls; }),
      Contains("test_phase") && Contains("exceed the memory budget of 1 B before any prompt runs"));
  CHECK(calls == 0);
  // Explicit sizes are kept: 0 the whole batch, N microbatches of N.
  ProbeComponents<Model> whole(model, reg, ProbeSettings{.mb_size = 0}, comm);
  whole.for_each_microbatch(batch, "whole", [](const TokenBatch& mb, std::span<const index_t>) { CHECK(mb.B == 8); });
  CHECK(whole.microbatch_sizes().at("whole") == 8);
}

TEST_CASE("auto microbatch: no more prompts than fill the host's products", "[probe][microbatch]") {
  CHECK(prompts_filling_products<CpuBackend>(CpuBackend::microbatch_rows) == 1);
  CHECK(prompts_filling_products<CpuBackend>(5000) == 1);
  CHECK(prompts_filling_products<CpuBackend>(512) == 2);
  CHECK(prompts_filling_products<CpuBackend>(100) == 11);  // 1100 rows: the fewest reaching 1024
  struct NoFillSize {};
  CHECK(prompts_filling_products<NoFillSize>(100) == 0);  // no cap

  auto model = tiny_gpt2<double>(4);
  const Registry<double> reg = Registry<double>::build(model);
  SingleProcess comm;
  const TokenBatch batch = random_batch(8, 2, 256, tiny_gpt2_config().vocab_size, 6);  // 512 rows per prompt
  const std::size_t in_use = CpuBackend::memory_in_use(), limit = CpuBackend::cache_limit();
  const std::size_t room = limit + 64 * MiB;  // the budget's room, above the cache's own cap
  ProbeComponents<Model> c(model, reg, ProbeSettings{.memory_budget = in_use + room}, comm);
  std::vector<index_t> sizes;
  std::vector<std::size_t> cached_at_start, limit_during;
  c.for_each_microbatch(batch, "fill", [&](const TokenBatch& mb, std::span<const index_t>) {
    cached_at_start.push_back(CpuBackend::cached_bytes());
    limit_during.push_back(CpuBackend::cache_limit());
    Tensor<double> held(Shape{mb.B, index_t(1) << 20});  // 8 MiB per prompt
    sizes.push_back(mb.B);
  });
  // The budget fits all 7 after the measured one; 2 prompts fill the products.
  CHECK(sizes == std::vector<index_t>{1, 2, 2, 2, 1});
  CHECK(c.microbatch_sizes().at("fill") == 2);
  // Through the phase the cache may hold the budget's room; it is emptied
  // before a microbatch of another size, and an equal one finds the last
  // one's freed block.
  CHECK(limit_during == std::vector<std::size_t>(5, room));
  CHECK(cached_at_start[1] == 0);
  CHECK(cached_at_start[2] >= 16 * MiB);
  CHECK(cached_at_start[3] >= 16 * MiB);
  CHECK(cached_at_start[4] == 0);
  CHECK(CpuBackend::cache_limit() == limit);  // restored after the phase
}

TEST_CASE("auto microbatch: a probe run gives the results of mb_size 1 and 0", "[probe][microbatch]") {
  auto model = tiny_gpt2<double>(7, /*lm_head=*/true);
  const index_t V = tiny_gpt2_config().vocab_size;
  const TokenBatch E = random_batch(5, 3, 9, V, 21), U = random_batch(4, 2, 9, V, 22);
  auto run = [&](ProbeConfig cfg) {
    OfflineEntropyProbe probe(model, cfg);
    const auto state = random_adam_state(probe.registry(), 8);
    return probe.run(E, U, state);
  };
  const ProbeResult one = run(config(1)), whole = run(config(0)), automatic = run(config(std::nullopt));
  CHECK(one.microbatch.at("sum_X") == 1);
  CHECK(whole.microbatch.at("sum_X") == 5);
  // The default budget holds the rest of a tiny batch at once.
  CHECK(automatic.microbatch.at("sum_X") == 4);
  CHECK(automatic.microbatch.at("sum_Y") == 3);
  CHECK(automatic.microbatch.at("ground_truth") == 4);
  nlohmann::json a = to_json(automatic), b1 = to_json(one), b0 = to_json(whole);
  for (auto* j : {&a, &b1, &b0}) {  // only the configuration and the sizes differ
    j->erase("config");
    j->erase("microbatch");
  }
  require_results_close(a, b1, "auto vs mb_size 1");
  require_results_close(a, b0, "auto vs mb_size 0");

  // A budget one prompt above what the probe holds before it starts: both
  // sums (batches of one shape) run one prompt at a time, with the same
  // results. The budget is the peak of a run with mb_size 1: its larger
  // phase's one prompt and the buffers the first sum leaves to the second.
  const TokenBatch U5 = random_batch(5, 3, 9, V, 23);
  auto sums = [&](ProbeConfig cfg) {
    cfg.variance = VarianceMode::none;
    cfg.ground_truth.reset();
    OfflineEntropyProbe probe(model, cfg);
    const auto state = random_adam_state(probe.registry(), 8);
    return probe.run(E, U5, state);
  };
  const std::size_t in_use = CpuBackend::memory_in_use();
  CpuBackend::reset_peak_memory();
  const ProbeResult sums_one = sums(config(1));
  ProbeConfig tight = config(std::nullopt);
  tight.memory_budget = CpuBackend::peak_memory();
  REQUIRE(CpuBackend::memory_in_use() == in_use);
  const ProbeResult small = sums(tight);
  CHECK(small.microbatch == std::map<std::string, index_t>{{"sum_X", 1}, {"sum_Y", 1}});
  nlohmann::json s = to_json(small), s1 = to_json(sums_one);
  for (auto* j : {&s, &s1}) {
    j->erase("config");
    j->erase("microbatch");
  }
  require_results_close(s, s1, "auto with a tight budget vs mb_size 1");

  // Below one prompt's cost (1 KiB above what sum_X holds before its first
  // prompt: the model and its sum buffer): the clear error, naming the phase.
  const Registry<double> reg = Registry<double>::build(model);
  SingleProcess comm;
  const std::size_t before = CpuBackend::memory_in_use();
  std::size_t buffer_bytes = 0;
  {
    const auto buffer = zeros_like_params<double>(reg);
    buffer_bytes = CpuBackend::memory_in_use() - before;
  }
  ProbeComponents<Model> c(model, reg, ProbeSettings{.memory_budget = before + buffer_bytes + 1024}, comm);
  CHECK_THROWS_WITH(c.accumulate_sum_X(E), Contains("sum_X: one prompt needs") && Contains("--max-memory"));
}
