// The op-case table: each tape op's cases declared once, as PyTorch's OpInfo
// does, and run by every harness that iterates them:
//   tests/ops/test_op_cases.cpp      VJP and JVP against finite differences
//                                    in double (gradcheck.hpp)
//   tests/cuda/backend_parity.hpp    forward, VJP and JVP on a device backend
//                                    against CpuBackend, in double and float
//                                    (CUDA, and the emulated device everywhere)
// A new op adds its cases here and is checked by both. Op-specific sweeps
// (many shapes, edge values, reference formulas) stay in tests/ops.
//
// A case is a name, its inputs (host doubles; `differentiable` false for a
// constant) and a generic recording `build(tape, vars) -> Var` that works on
// any Tape<T, B>. The inputs come from a fixed seed per group, so every
// harness sees the same values.
#pragma once

#include "gradcheck.hpp"

#include <entropy_probe/tape/ops/attention.hpp>
#include <entropy_probe/tape/ops/elementwise.hpp>
#include <entropy_probe/tape/ops/embedding.hpp>
#include <entropy_probe/tape/ops/flash_attention.hpp>
#include <entropy_probe/tape/ops/linear.hpp>
#include <entropy_probe/tape/ops/lm_head_logprob.hpp>
#include <entropy_probe/tape/ops/logprob.hpp>
#include <entropy_probe/tape/ops/norm.hpp>
#include <entropy_probe/tape/ops/rotary.hpp>
#include <entropy_probe/tape/ops/slice.hpp>
#include <entropy_probe/tape/ops/view.hpp>

#include <cstdint>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

namespace ep_test {

using OpInput = GradcheckInput;

enum class OpGroup { elementwise, linear, norm, attention, logprob };
inline constexpr OpGroup kOpGroups[] = {OpGroup::elementwise, OpGroup::linear, OpGroup::norm, OpGroup::attention,
                                        OpGroup::logprob};

inline const char* to_string(OpGroup g) {
  switch (g) {
    case OpGroup::elementwise:
      return "elementwise, reshape and slice";
    case OpGroup::linear:
      return "linear, LoRA linear and embedding";
    case OpGroup::norm:
      return "norms and rotary";
    case OpGroup::attention:
      return "causal attention";
    default:
      return "log-softmax-gather, masked sums and a composite";
  }
}

// Calls visit(name, inputs, build) for every case of `group`.
template <class Visit>
void for_each_op_case(OpGroup group, Visit&& visit) {
  using entropy_probe::index_t;
  using entropy_probe::Var;
  namespace ep = entropy_probe;
  using Vars = std::vector<Var>;
  switch (group) {
    case OpGroup::elementwise: {
      std::mt19937_64 rng(1);
      const auto a = random_tensor({3, 5}, rng), b = random_tensor({3, 5}, rng);
      visit("add", std::vector<OpInput>{{a}, {b}}, [](auto& t, const Vars& v) { return ep::add(t, v[0], v[1]); });
      visit("add(x, x)", std::vector<OpInput>{{a}}, [](auto& t, const Vars& v) { return ep::add(t, v[0], v[0]); });
      visit("mul", std::vector<OpInput>{{a}, {b, false}},
            [](auto& t, const Vars& v) { return ep::mul(t, v[0], v[1]); });
      visit("mul(x, x)", std::vector<OpInput>{{a}}, [](auto& t, const Vars& v) { return ep::mul(t, v[0], v[0]); });
      const auto x = random_tensor({4, 7}, rng, 3.0);
      visit("gelu_tanh", std::vector<OpInput>{{x}}, [](auto& t, const Vars& v) { return ep::gelu_tanh(t, v[0]); });
      visit("silu", std::vector<OpInput>{{x}}, [](auto& t, const Vars& v) { return ep::silu(t, v[0]); });
      visit("reshape", std::vector<OpInput>{{x}}, [](auto& t, const Vars& v) {
        return ep::reshape(t, v[0], {7, 2, 2});
      });
      const auto s = random_tensor({2, 3, 7}, rng);
      visit("slice_last", std::vector<OpInput>{{s}},
            [](auto& t, const Vars& v) { return ep::slice_last(t, v[0], 2, 3); });
      // The gated MLP's act(gate) * up, for each activation of a family.
      const auto gate = random_tensor({4, 7}, rng, 3.0), up = random_tensor({4, 7}, rng);
      visit("gated_activation<Silu> (SwiGLU)", std::vector<OpInput>{{gate}, {up}},
            [](auto& t, const Vars& v) { return ep::gated_activation<ep::Silu>(t, v[0], v[1]); });
      visit("gated_activation<Silu> (frozen gate)", std::vector<OpInput>{{gate, false}, {up}},
            [](auto& t, const Vars& v) { return ep::gated_activation<ep::Silu>(t, v[0], v[1]); });
      visit("gated_activation<Silu> (frozen up)", std::vector<OpInput>{{gate}, {up, false}},
            [](auto& t, const Vars& v) { return ep::gated_activation<ep::Silu>(t, v[0], v[1]); });
      visit("gated_activation<Silu>(x, x)", std::vector<OpInput>{{gate}},
            [](auto& t, const Vars& v) { return ep::gated_activation<ep::Silu>(t, v[0], v[0]); });
      // mul, recorded later, writes both gradients first: the fused rule adds.
      visit("gated_activation<Silu> (gradients accumulate)", std::vector<OpInput>{{gate}, {up}},
            [](auto& t, const Vars& v) {
              const Var y = ep::gated_activation<ep::Silu>(t, v[0], v[1]);
              return ep::add(t, y, ep::mul(t, v[0], v[1]));
            });
      visit("gated_activation<GeluTanh>", std::vector<OpInput>{{gate}, {up}},
            [](auto& t, const Vars& v) { return ep::gated_activation<ep::GeluTanh>(t, v[0], v[1]); });
      visit("gated_activation<GeluErf>", std::vector<OpInput>{{gate}, {up}},
            [](auto& t, const Vars& v) { return ep::gated_activation<ep::GeluErf>(t, v[0], v[1]); });
      visit("gated_activation<Relu>", std::vector<OpInput>{{gate}, {up}},
            [](auto& t, const Vars& v) { return ep::gated_activation<ep::Relu>(t, v[0], v[1]); });
      break;
    }
    case OpGroup::linear: {
      std::mt19937_64 rng(2);
      const auto x = random_tensor({2, 3, 6}, rng), w = random_tensor({5, 6}, rng), bias = random_tensor({5}, rng);
      visit("linear", std::vector<OpInput>{{x}, {w}, {bias}},
            [](auto& t, const Vars& v) { return ep::linear(t, v[0], v[1], v[2]); });
      visit("linear (no bias, frozen W)", std::vector<OpInput>{{x}, {w, false}},
            [](auto& t, const Vars& v) { return ep::linear(t, v[0], v[1]); });
      const auto la = random_tensor({2, 6}, rng), lb = random_tensor({5, 2}, rng);
      visit("lora_linear", std::vector<OpInput>{{x}, {w}, {bias}, {la}, {lb}}, [](auto& t, const Vars& v) {
        using Tp = typename std::remove_reference_t<decltype(t)>::TensorT::value_type;
        return ep::lora_linear(t, v[0], v[1], v[2], v[3], v[4], Tp(0.75));
      });
      visit("lora_linear (frozen base, no bias)", std::vector<OpInput>{{x}, {w, false}, {la}, {lb}},
            [](auto& t, const Vars& v) {
              using Tp = typename std::remove_reference_t<decltype(t)>::TensorT::value_type;
              return ep::lora_linear(t, v[0], v[1], std::nullopt, v[2], v[3], Tp(2));
            });
      const auto table = random_tensor({7, 5}, rng);
      const std::vector<std::int32_t> ids = {1, 3, 1, 0, 6, 3, 3};
      visit("embedding (repeated ids)", std::vector<OpInput>{{table}},
            [&ids](auto& t, const Vars& v) { return ep::embedding(t, v[0], std::span<const std::int32_t>(ids)); });
      break;
    }
    case OpGroup::norm: {
      std::mt19937_64 rng(3);
      const auto x = random_tensor({3, 4, 9}, rng, 2.0), g = random_tensor({9}, rng), b = random_tensor({9}, rng);
      visit("layer_norm", std::vector<OpInput>{{x}, {g}, {b}},
            [](auto& t, const Vars& v) { return ep::layer_norm(t, v[0], v[1], v[2], 1e-5); });
      visit("rms_norm", std::vector<OpInput>{{x}, {g}},
            [](auto& t, const Vars& v) { return ep::rms_norm(t, v[0], v[1], 1e-6); });
      const auto q = random_tensor({2, 3, 2 * 4}, rng);
      const std::vector<std::int32_t> pos = {0, 1, 2, 5, 6, 40};
      visit("rotary", std::vector<OpInput>{{q}}, [&pos](auto& t, const Vars& v) {
        return ep::rotary(t, v[0], std::span<const std::int32_t>(pos), 2, 10000.0);
      });
      break;
    }
    case OpGroup::attention: {
      std::mt19937_64 rng(4);
      const index_t R = 3, Tn = 6, dh = 4;
      // row 0 full, row 1 left-padded (two pad keys), row 2 right-padded
      const std::vector<std::uint8_t> mask = {1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0};
      const auto q = random_tensor({R, Tn, 4 * dh}, rng), k = random_tensor({R, Tn, 2 * dh}, rng),
                 v = random_tensor({R, Tn, 2 * dh}, rng);
      visit("causal_attention (GQA 4/2, padding)", std::vector<OpInput>{{q}, {k}, {v}},
            [&mask](auto& t, const Vars& x) {
              return ep::causal_attention(t, x[0], x[1], x[2], std::span<const std::uint8_t>(mask), 4, 2);
            });
      const auto k4 = random_tensor({R, Tn, 4 * dh}, rng), v4 = random_tensor({R, Tn, 4 * dh}, rng);
      visit("causal_attention (MHA, frozen v)", std::vector<OpInput>{{q}, {k4}, {v4, false}},
            [&mask](auto& t, const Vars& x) {
              return ep::causal_attention(t, x[0], x[1], x[2], std::span<const std::uint8_t>(mask), 4, 4);
            });
      // Tiles of 4 over T = 6: a partial tile, a skipped one above the diagonal.
      visit("flash_causal_attention (GQA 4/2, padding, tile 4)", std::vector<OpInput>{{q}, {k}, {v}},
            [&mask](auto& t, const Vars& x) {
              return ep::flash_causal_attention(t, x[0], x[1], x[2], std::span<const std::uint8_t>(mask), 4, 2, 0.0, 4);
            });
      visit("flash_causal_attention (MHA, frozen v, scale 0.3)", std::vector<OpInput>{{q}, {k4}, {v4, false}},
            [&mask](auto& t, const Vars& x) {
              return ep::flash_causal_attention(t, x[0], x[1], x[2], std::span<const std::uint8_t>(mask), 4, 4, 0.3, 4);
            });
      break;
    }
    case OpGroup::logprob: {
      std::mt19937_64 rng(6);
      const auto z = random_tensor({2, 3, 9}, rng, 2.0);
      const std::vector<std::int32_t> targets = {2, -1, 0, 8, -1, 4};
      visit("log_softmax_gather (tau 0.7, unscored rows)", std::vector<OpInput>{{z}},
            [&targets](auto& t, const Vars& v) {
              return ep::log_softmax_gather(t, v[0], std::span<const std::int32_t>(targets), 0.7);
            });
      // Rows longer than a device block; three rows keep the element-wise
      // finite differences (two evaluations per input element) quick.
      const auto zl = random_tensor({3, 3000}, rng, 3.0);
      const std::vector<std::int32_t> tl = {17, -1, 2999};
      visit("log_softmax_gather (V = 3000)", std::vector<OpInput>{{zl}}, [&tl](auto& t, const Vars& v) {
        return ep::log_softmax_gather(t, v[0], std::span<const std::int32_t>(tl), 1.0);
      });
      // Chunks of 2 rows over 5 (the last one short, the second unscored).
      const auto hs = random_tensor({5, 6}, rng), ws = random_tensor({300, 6}, rng, 0.5);
      const std::vector<std::int32_t> ths = {17, 299, -1, -1, 150};
      visit("lm_head_logprob (V = 300, chunks of 2, tau 0.8)", std::vector<OpInput>{{hs}, {ws}},
            [&ths](auto& t, const Vars& v) {
              return ep::lm_head_logprob(t, v[0], v[1], std::span<const std::int32_t>(ths), 0.8, 2);
            });
      visit("lm_head_logprob (frozen W)", std::vector<OpInput>{{hs}, {ws, false}}, [&ths](auto& t, const Vars& v) {
        return ep::lm_head_logprob(t, v[0], v[1], std::span<const std::int32_t>(ths), 1.0);
      });
      const auto x = random_tensor({3, 4}, rng);
      const std::vector<double> w = {1, 0, 1, 1, 0, 0, 1, 0, 0.5, 1, 1, -2};
      visit("masked_seq_sum", std::vector<OpInput>{{x}},
            [&w](auto& t, const Vars& v) { return ep::masked_seq_sum(t, v[0], std::span<const double>(w), 3); });
      // A small network: every op's rules composed, as a probe forward uses them.
      const auto h = random_tensor({2, 4, 6}, rng), w1 = random_tensor({8, 6}, rng, 0.5),
                 w2 = random_tensor({5, 8}, rng, 0.5);
      const auto gm = random_tensor({8}, rng), bt = random_tensor({8}, rng);
      const std::vector<std::int32_t> tg = {1, 4, -1, 0, 2, 2, 3, -1};
      const std::vector<double> sw = {1, 1, 0, 1, 1, 1, 1, 0};
      visit("composite network", std::vector<OpInput>{{h}, {w1}, {gm}, {bt}, {w2}}, [&tg, &sw](auto& t, const Vars& v) {
        Var a = ep::gelu_tanh(t, ep::linear(t, v[0], v[1]));
        Var n = ep::layer_norm(t, a, v[2], v[3], 1e-5);
        Var z2 = ep::linear(t, ep::silu(t, n), v[4]);
        Var lp = ep::log_softmax_gather(t, z2, std::span<const std::int32_t>(tg), 1.3);
        return ep::masked_seq_sum(t, lp, std::span<const double>(sw), 2);
      });
      break;
    }
  }
}

}  // namespace ep_test
