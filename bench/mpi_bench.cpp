// Distributed cost of the probe's accumulation, under mpirun -np N:
// the all-reduce of the summed parameter buffer against the accumulation it
// follows, on the benchmark model; and a projection of the all-reduce to 8
// and 64 ranks on a 100 Gb/s network from the measured message size.
//
//   mpirun -np 2 build/bench/mpi_bench [--shape large|small]
#include "bench_common.hpp"

#include <entropy_probe/dist/mpi.hpp>
#include <entropy_probe/nn/gpt2.hpp>
#include <entropy_probe/probe/components.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <vector>

using namespace entropy_probe;

namespace {

const ep_cli::CommandSpec kSpec{
    .description =
        "The all-reduce of the summed parameter buffer against the accumulation it follows, under\n"
        "mpirun -np N, on the model and batch of bench/probe_bench.",
    .options = {ep_bench::kShapeOption},
    .program = "mpi_bench"};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  MpiSession mpi(argc, argv);
  // Every rank parses the same arguments: a usage error ends them all alike.
  const auto parsed = ep_bench::parse_options<ep_bench::ProbeShape>(kSpec, argc, argv, ep_bench::shape_option);
  if (const int* code = std::get_if<int>(&parsed)) return *code;
  const ep_bench::ProbeShape shape = std::get<ep_bench::ProbeShape>(parsed);
  return run_or_abort([&] {
    MpiCommunicator comm;
    auto model = ep_bench::make_model(shape);
    auto reg = Registry<float>::build(model);
    const TokenBatch E = ep_bench::random_batch(shape, 7);
    ProbeComponents<decltype(model)> c(model, reg, ProbeSettings{.mb_size = shape.mb_size}, comm);
    using clock = std::chrono::steady_clock;
    const int reps = 7;
    std::vector<double> t_acc, t_red;
    std::size_t bytes = 0;
    for (int r = 0; r < reps; ++r) {
      comm.barrier();
      auto t0 = clock::now();
      auto sum = c.accumulate_sum_X(E);  // includes its own all-reduce
      comm.barrier();
      t_acc.push_back(std::chrono::duration<double>(clock::now() - t0).count());
      // The all-reduce alone, on a buffer of the same size (one message).
      std::vector<double> flat(static_cast<std::size_t>(reg.numel()), 1.0);
      bytes = flat.size() * sizeof(double);
      comm.barrier();
      t0 = clock::now();
      comm.allreduce_sum(std::span<double>(flat));
      t_red.push_back(std::chrono::duration<double>(clock::now() - t0).count());
    }
    if (comm.rank() == 0) {
      const double acc = median(t_acc), red = median(t_red);
      fmt::print(
          "model: GPT-2 shaped, {} layers, width {}, vocab {}, LoRA r {} (c_attn, c_proj, c_fc); "
          "E: {} prompts x {} x {} tokens, f32\n",
          shape.n_layer, shape.n_embd, shape.vocab, shape.lora_r, shape.B, shape.G, shape.T);
      fmt::print("ranks {}  trainable numel {}  message {:.2f} MiB (double)\n", comm.world(), reg.numel(),
                 bytes / 1048576.0);
      fmt::print("accumulate_sum_X (incl. all-reduce): median {:.4f} s\n", acc);
      fmt::print("all-reduce of one buffer:             median {:.6f} s  ({:.3f}% of the accumulation)\n", red,
                 100.0 * red / acc);
      // Ring all-reduce: each rank sends and receives 2 (N-1)/N of the
      // message, in 2 (N-1) steps with a per-step latency.
      const double bw = 100e9 / 8, alpha = 5e-6;
      for (int n : {8, 64}) {
        const double t = 2.0 * (n - 1) / n * double(bytes) / bw + 2.0 * (n - 1) * alpha;
        fmt::print("projected ring all-reduce, {:>2} ranks, 100 Gb/s, 5 us/step: {:.6f} s\n", n, t);
      }
    }
    return 0;
  });
}
