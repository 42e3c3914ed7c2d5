// Distributed cost of the probe's accumulation, under mpirun -np N:
// the all-reduce of the summed parameter buffer against the accumulation it
// follows, on the benchmark model; and a projection of the all-reduce to 8
// and 64 ranks on a 100 Gb/s network from the measured message size.
//
//   mpirun -np 2 build/bench/mpi_bench
#include <entropy_probe/dist/mpi.hpp>
#include <entropy_probe/nn/gpt2.hpp>
#include <entropy_probe/probe/components.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <random>
#include <vector>

using namespace entropy_probe;

namespace {

// The model and batch of bench/probe_bench (GPT-2 shaped, float).
nn::Gpt2LMHeadModel<float> bench_model() {
  nn::Gpt2Config c;
  c.vocab_size = 2048;
  c.n_positions = 128;
  c.n_embd = 128;
  c.n_layer = 4;
  c.n_head = 4;
  nn::LoraConfig l;
  l.r = 8;
  l.lora_alpha = 16;
  l.target_modules = {"c_attn", "c_proj", "c_fc"};
  l.init_lora_b_zero = false;
  return nn::Gpt2LMHeadModel<float>(c, l, 1);
}

TokenBatch bench_batch(index_t B, index_t G, index_t T, index_t V) {
  std::mt19937_64 rng(7);
  TokenBatch b;
  b.B = B;
  b.G = G;
  b.T = T;
  for (index_t i = 0; i < B * G * T; ++i) b.sequences.push_back(std::int32_t(rng() % std::uint64_t(V)));
  b.attention_mask.assign(b.sequences.size(), 1);
  b.prompt_lens.assign(std::size_t(B), std::int32_t(T / 4));
  std::normal_distribution<double> nd;
  for (index_t i = 0; i < B * G; ++i) b.advantages.push_back(nd(rng));
  return b;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  MpiSession mpi(argc, argv);
  return run_or_abort([&] {
    MpiCommunicator comm;
    auto model = bench_model();
    auto reg = Registry<float>::build(model);
    const TokenBatch E = bench_batch(8, 4, 64, model.vocab_size());
    ProbeComponents<decltype(model)> c(model, reg, ProbeSettings{.mb_size = 4}, comm);
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
          "model: GPT-2 shaped, 4 layers, width 128, vocab 2048, LoRA r 8 (c_attn, c_proj, c_fc); "
          "E: 8 prompts x 4 x 64 tokens, f32\n");
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
