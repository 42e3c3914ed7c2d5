// NcclCommunicator (dist/nccl.hpp) on CudaBackend: device buffers summed in
// place by ncclAllReduce, a parameter buffer reduced as one contiguous device
// message, the host values through the host communicator, and the full probe
// on a tiny GPT-2 over NCCL against one CPU process. Run with one GPU per
// rank (test_nccl under mpirun -np min(#GPUs, 2), test_nccl_single alone);
// with a single rank NCCL still initialises and reduces, over one device.
#include "backend_parity.hpp"
#include "emulated_backend.hpp"
#include "nccl_test.hpp"

#include "../support/result_compare.hpp"

#include <entropy_probe/dist/nccl.hpp>
#include <entropy_probe/tensor/cuda_backend.hpp>

#include <catch2/catch.hpp>

#include <cstdint>
#include <cstring>
#include <vector>

using namespace entropy_probe;
using ep_nccl_test::host;
using Cuda = CudaBackend;

namespace {

// Rank r contributes (r + 1) * x: the sum over W ranks is W (W + 1) / 2 * x.
double rank_weight_sum(int world) { return world * (world + 1) / 2.0; }

template <class T>
void sums_in_place(NcclCommunicator& comm, std::size_t n) {
  const int W = comm.world(), r = comm.rank();
  std::vector<T> h(n), want(n);
  for (std::size_t i = 0; i < n; ++i) {
    // small integers and quarters: every partial sum is exact in float and double
    h[i] = T(r + 1) * T(i % 1000) + T(0.25);
    want[i] = T(rank_weight_sum(W)) * T(i % 1000) + T(0.25) * T(W);
  }
  auto t = Tensor<T, Cuda>::from_host({static_cast<index_t>(n)}, h);
  const std::size_t calls = comm.device_allreduce_calls(), bytes = comm.device_bytes_reduced();
  comm.allreduce_sum_device(t.data(), n);
  CHECK(t.to_host() == want);
  CHECK(comm.device_allreduce_calls() == calls + 1);
  CHECK(comm.device_bytes_reduced() == bytes + n * sizeof(T));
}

}  // namespace

TEST_CASE("nccl: device buffers are summed in place over the ranks", "[nccl]") {
  NcclCommunicator comm(host());
  const int W = comm.world(), r = comm.rank();
  REQUIRE(W == host().world());
  REQUIRE(r == host().rank());
  sums_in_place<double>(comm, 4099);
  sums_in_place<float>(comm, 1 << 20);

  // Nothing to send: no collective at all.
  comm.allreduce_sum_device(static_cast<double*>(nullptr), 0);
  CHECK(comm.device_allreduce_calls() == 2);

  // Host values still go through the host communicator.
  CHECK(comm.allreduce_sum(double(r + 1)) == rank_weight_sum(W));
  std::vector<std::int64_t> idx(3, -1);
  if (r == 0) idx = {7, 1, 5};
  comm.broadcast(std::span<std::int64_t>(idx), 0);
  CHECK(idx == std::vector<std::int64_t>{7, 1, 5});
}

TEST_CASE("nccl: a parameter buffer travels as one contiguous device message", "[nccl]") {
  NcclCommunicator comm(host());
  const int W = comm.world(), r = comm.rank();
  nn::Gpt2LMHeadModel<double, Cuda> md(ep_test::tiny_gpt2_config(), ep_test::tiny_lora(true), 11);
  auto mc = ep_test::tiny_gpt2<double>(11, true);
  auto rd = Registry<double, Cuda>::build(md);
  auto rc = Registry<double>::build(mc);

  auto buf = params_to_buffer<double>(rd);
  scale_param_buffer(buf, r + 1);
  allreduce_param_buffer(comm, buf);
  auto want = params_to_buffer<double>(rc);
  scale_param_buffer(want, rank_weight_sum(W));
  ep_parity::check_close("all-reduced parameter buffer", ep_parity::flatten(buf), ep_parity::flatten(want), 1e-15);
  CHECK(comm.device_allreduce_calls() == 1);
  CHECK(comm.device_bytes_reduced() == static_cast<std::size_t>(rd.numel()) * sizeof(double));

  // Another backend's memory (here a CPU stand-in for a device) is staged
  // through the host communicator, never handed to NCCL.
  nn::Gpt2LMHeadModel<double, ep_parity::EmulatedDeviceBackend> me(ep_test::tiny_gpt2_config(),
                                                                   ep_test::tiny_lora(true), 11);
  auto re = Registry<double, ep_parity::EmulatedDeviceBackend>::build(me);
  auto be = params_to_buffer<double>(re);
  scale_param_buffer(be, r + 1);
  allreduce_param_buffer(comm, be);
  ep_parity::check_close("staged parameter buffer", ep_parity::flatten(be), ep_parity::flatten(want), 1e-15);
  CHECK(comm.device_allreduce_calls() == 1);
}

TEST_CASE("nccl: the probe on CudaBackend over NCCL equals one CPU process", "[nccl][probe]") {
  struct Case {
    index_t B_E, B_U;
    StepKind step;
    AlphaRoute route;
  };
  // As tests/distributed/mpi_parity.cpp: uneven shards, both ground-truth
  // steps and both alpha routes, and a rank that owns no U prompt.
  for (const Case& c :
       {Case{5, 3, StepKind::adam, AlphaRoute::jvp}, Case{5, 3, StepKind::precond_sgd, AlphaRoute::reverse},
        Case{3, 1, StepKind::adam, AlphaRoute::jvp}}) {
    const std::string tag = "B_E " + std::to_string(c.B_E) + ", B_U " + std::to_string(c.B_U) + ", " +
                            to_string(c.step) + ", " + to_string(c.route);
    INFO(tag);
    const TokenBatch E = ep_test::random_batch(c.B_E, 3, 8, 11, 100 + std::uint64_t(c.B_E));
    const TokenBatch U = ep_test::random_batch(c.B_U, 2, 8, 11, 200 + std::uint64_t(c.B_U));
    ProbeConfig cfg;
    cfg.mb_size = 2;
    cfg.ground_truth = c.step;
    cfg.alpha_route = c.route;

    auto mc = ep_test::tiny_gpt2<double>(11, true);
    SingleProcess one;
    OfflineEntropyProbe single(mc, cfg, &one);
    auto sc = ep_test::random_adam_state(single.registry(), 5);
    const ProbeResult want = single.run(E, U, sc);

    nn::Gpt2LMHeadModel<double, Cuda> md(ep_test::tiny_gpt2_config(), ep_test::tiny_lora(true), 11);
    NcclCommunicator comm(host());
    OfflineEntropyProbe dist(md, cfg, &comm);
    auto sd = ep_parity::adam_state_on(ep_test::random_adam_state(single.registry(), 5), dist.registry());
    const ProbeResult got = dist.run(E, U, sd);
    ep_nccl_test::check_same_result(got, want, tag);

    // Sum X and sum Y each reduced once on the device; one process reduces nothing.
    if (comm.world() > 1)
      CHECK(comm.device_allreduce_calls() >= 2);
    else
      CHECK(comm.device_allreduce_calls() == 0);

    ep_test::check_same_on_every_rank(comm, got.deltaH1, got.full ? got.full->se_deltaH1 : 0.0);
  }
}

TEST_CASE("nccl: a failed NCCL call is an Error naming the call and NCCL's reason", "[nccl]") {
  using Catch::Matchers::Contains;
  CHECK_THROWS_AS(nccl_detail::check(ncclInvalidArgument, "ncclAllReduce({} elements)", 3), Error);
  CHECK_THROWS_WITH(nccl_detail::check(ncclInvalidArgument, "ncclAllReduce({} elements)", 3),
                    Contains("ncclAllReduce(3 elements) failed: ") && Contains("invalid argument"));
  // The reason is NCCL's text for the code it got, not a fixed one.
  CHECK_THROWS_WITH(nccl_detail::check(ncclInternalError, "ncclBroadcast"),
                    Contains("ncclBroadcast failed: ") && Contains(ncclGetErrorString(ncclInternalError)));
}
