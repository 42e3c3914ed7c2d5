// Run under mpirun -np 2: every result field of the distributed probe equals
// the single-process result to 1e-12 relative in double, on every rank, for
// uneven shards and for a rank that owns no prompts, and on a stand-in for a
// device backend, whose parameter buffers take the device route of the
// communicator seam (staged through the host by MpiCommunicator).
#define CATCH_CONFIG_RUNNER
#include "../cuda/backend_parity.hpp"
#include "../cuda/emulated_backend.hpp"
#include "../support/result_compare.hpp"
#include "../support/tiny_models.hpp"

#include "../../examples/cli/run_command.hpp"

#include <entropy_probe/dist/mpi.hpp>
#include <entropy_probe/io/result_json.hpp>
#include <entropy_probe/probe/probe.hpp>

#include <catch2/catch.hpp>

using namespace entropy_probe;
using namespace ep_test;

namespace {

void compare(index_t B_E, index_t B_U, StepKind kind, AlphaRoute route) {
  MpiCommunicator comm;
  REQUIRE(comm.world() == 2);
  auto model = tiny_gpt2<double>(11, /*lm_head=*/true);
  const TokenBatch E = random_batch(B_E, 3, 8, 11, 100 + std::uint64_t(B_E));
  const TokenBatch U = random_batch(B_U, 2, 8, 11, 200 + std::uint64_t(B_U));
  ProbeConfig cfg;
  cfg.mb_size = 2;
  cfg.ground_truth = kind;
  cfg.alpha_route = route;
  OfflineEntropyProbe dist(model, cfg, &comm);
  auto st = random_adam_state(dist.registry(), 5);
  const auto rd = to_json(dist.run(E, U, st));
  SingleProcess one;
  OfflineEntropyProbe single(model, cfg, &one);
  auto st1 = random_adam_state(single.registry(), 5);
  const auto rs = to_json(single.run(E, U, st1));
  ep_test::require_results_close(rd, rs, "result");
  check_same_on_every_rank(comm, rd["deltaH1"].get<double>(), rd["SE_deltaH1"].get<double>());
}

}  // namespace

TEST_CASE("mpi: uneven shards (B_E = 5, B_U = 3) match one process", "[mpi]") {
  compare(5, 3, StepKind::adam, AlphaRoute::jvp);
  compare(5, 3, StepKind::precond_sgd, AlphaRoute::reverse);
}

TEST_CASE("mpi: a rank with no U prompts and no E prompts beyond the first", "[mpi]") {
  compare(3, 1, StepKind::adam, AlphaRoute::jvp);
}

TEST_CASE("mpi: the influence matrix and single-sequence truths match one process", "[mpi][influence]") {
  // E prompts are sharded for the matrix rows (B_E = 5: uneven; B_E = 1: a
  // rank without rows), U is run whole on each rank; the truths step the same
  // on every rank.
  for (index_t B_E : {index_t(5), index_t(1)}) {
    MpiCommunicator comm;
    auto model = tiny_gpt2<double>(12, /*lm_head=*/true);
    const TokenBatch E = random_batch(B_E, 2, 8, 11, 300 + std::uint64_t(B_E));
    const TokenBatch U = random_batch(3, 2, 8, 11, 400);
    ProbeConfig cfg;
    cfg.mb_size = 2;
    cfg.variance = VarianceMode::none;
    cfg.directions = {Direction::precond_sgd, Direction::adamw};
    cfg.influence_matrix = true;
    cfg.influence_truth.largest = 2;
    cfg.influence_truth.sequences = {{1, 0}};
    OfflineEntropyProbe dist(model, cfg, &comm);
    auto st = random_adam_state(dist.registry(), 6);
    const ProbeResult pd = dist.run(E, U, st);
    SingleProcess one;
    OfflineEntropyProbe single(model, cfg, &one);
    auto st1 = random_adam_state(single.registry(), 6);
    const ProbeResult ps = single.run(E, U, st1);
    // The per-token truths are differences of two ratios near H_orig_tok:
    // compared on that scale, the rest of the JSON on its own.
    for (std::size_t k = 0; k < ps.influence.size(); ++k) {
      REQUIRE(pd.influence[k].truth.has_value() == ps.influence[k].truth.has_value());
      if (!ps.influence[k].truth) continue;
      const GroundTruth &a = *pd.influence[k].truth, &b = *ps.influence[k].truth;
      CHECK(std::abs(a.deltaH_true_tok - b.deltaH_true_tok) <= 1e-12 * b.H_orig_tok);
      CHECK(std::abs(a.rao_blackwell->deltaH_true_tok - b.rao_blackwell->deltaH_true_tok) <=
            1e-12 * b.rao_blackwell->H_orig_tok);
    }
    auto rd = to_json(pd), rs = to_json(ps);
    for (auto* j : {&rd, &rs})
      for (auto& e : (*j)["influence"])
        if (e.contains("truth")) {
          e["truth"].erase("deltaH_tok");
          e["truth"]["rao_blackwell"].erase("deltaH_tok");
        }
    REQUIRE(rs["influence_matrix"]["values"].size() == std::size_t(2 * B_E));
    REQUIRE(rs["influence"][2].contains("truth"));
    ep_test::require_results_close(rd, rs, "influence");
    check_same_on_every_rank(comm, rd["influence_matrix"]["values"][0][3].get<double>(),
                             rd["influence"][2]["truth"]["deltaH"].get<double>());
  }
}

TEST_CASE("mpi: a device backend's parameter buffers (staged through the host) match one process", "[mpi]") {
  using Emulated = ep_parity::EmulatedDeviceBackend;
  MpiCommunicator comm;
  REQUIRE(comm.world() == 2);
  nn::Gpt2LMHeadModel<double, Emulated> model(tiny_gpt2_config(), tiny_lora(true), 11);
  const TokenBatch E = random_batch(5, 3, 8, 11, 105);
  const TokenBatch U = random_batch(3, 2, 8, 11, 203);
  ProbeConfig cfg;
  cfg.mb_size = 2;
  cfg.ground_truth = StepKind::adam;
  auto cpu_model = tiny_gpt2<double>(11, true);
  const auto cpu_state = random_adam_state(Registry<double>::build(cpu_model), 5);
  OfflineEntropyProbe dist(model, cfg, &comm);
  auto st = ep_parity::adam_state_on(cpu_state, dist.registry());
  const std::size_t bytes_before = comm.bytes_reduced();
  const auto rd = to_json(dist.run(E, U, st));
  // Sum X and sum Y: each one message of every buffer back to back.
  CHECK(comm.bytes_reduced() - bytes_before >= 2 * sizeof(double) * static_cast<std::size_t>(dist.registry().numel()));
  SingleProcess one;
  OfflineEntropyProbe single(model, cfg, &one);
  auto st1 = ep_parity::adam_state_on(cpu_state, single.registry());
  ep_test::require_results_close(rd, to_json(single.run(E, U, st1)), "emulated device");
}

TEST_CASE("mpi: broadcast of sampled prompt indices from rank 0", "[mpi]") {
  MpiCommunicator comm;
  std::vector<std::int64_t> idx(4, -1);
  if (comm.rank() == 0) idx = {3, 1, 4, 1};
  comm.broadcast(std::span<std::int64_t>(idx), 0);
  CHECK(idx == std::vector<std::int64_t>{3, 1, 4, 1});
  CHECK(comm.shard(5) == (comm.rank() == 0 ? std::vector<index_t>{0, 2, 4} : std::vector<index_t>{1, 3}));
}

TEST_CASE("mpi: entropy-probe run under mpirun equals the single-process library result", "[mpi][cli]") {
  MpiCommunicator comm;
  const std::filesystem::path golden = std::filesystem::path(__FILE__).parent_path().parent_path() / "data/golden";
  const std::string ckpt = (golden / "gpt2_lora").string();
  const std::string out = (std::filesystem::temp_directory_path() / "ep_mpi_cli_result.json").string();
  std::vector<std::string> args{ckpt,
                                "--e-batch",
                                ckpt + "/E.safetensors",
                                "--u-batch",
                                ckpt + "/U.safetensors",
                                "--dtype",
                                "f64",
                                "--ground-truth",
                                "adam",
                                "--mb-size",
                                "1",
                                "--json",
                                out,
                                "--log-level",
                                "warning"};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  REQUIRE(ep_run::run_command(static_cast<int>(argv.size()), argv.data()) == 0);
  comm.barrier();  // rank 0 has written the file

  auto model = hf::load_gpt2<double>(ckpt);
  ProbeConfig cfg;
  cfg.mb_size = 1;
  cfg.ground_truth = StepKind::adam;
  SingleProcess one;
  OfflineEntropyProbe single(model, cfg, &one);
  auto st = hf::load_adam_state(ckpt + "/optimizer.safetensors", single.registry());
  auto rs = to_json(single.run(hf::load_batch(ckpt + "/E.safetensors"), hf::load_batch(ckpt + "/U.safetensors"), st));
  std::ifstream in(out);
  REQUIRE(in.good());
  nlohmann::json rd = nlohmann::json::parse(in);
  rd["config"] = rs["config"];  // the CLI records its own options there
  ep_test::require_results_close(rd, rs, "cli");
}

int main(int argc, char** argv) {
  MpiSession mpi(argc, argv);
  return Catch::Session().run(argc, argv);
}
