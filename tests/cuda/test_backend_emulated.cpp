// The CUDA parity tests' harness run against EmulatedDeviceBackend on the CPU:
// on a machine without a GPU this checks that every op and probe phase is
// written without host access to tensor data, that the device-shaped code
// paths (all-row batched attention, row reductions) agree with the CPU
// backend, and that the tolerances the GPU tests use hold under a change of
// summation order and GEMM implementation. The emulated device runs the
// generic compositions that CudaBackend runs (checked at the end).
#include "backend_parity.hpp"
#include "checkpoint_parity.hpp"
#include "emulated_backend.hpp"

#include <entropy_probe/tensor/compositions.hpp>

#include <atomic>
#include <cstdint>
#include <random>
#include <vector>

EP_PARITY_OP_TESTS(ep_parity::EmulatedDeviceBackend, "emulated: ")
EP_PARITY_PRIMITIVE_TESTS(ep_parity::EmulatedDeviceBackend, "emulated: ")
EP_PARITY_PROBE_TESTS(ep_parity::EmulatedDeviceBackend, "emulated: ")
EP_PARITY_CHECKPOINT_TESTS(ep_parity::EmulatedDeviceBackend, "emulated: ")

// The emulated device runs the generic compositions (CUDA's forms), not the
// SIMD overrides it inherits from CpuBackend: otherwise the parity tests
// above would not cover the code CudaBackend runs.
namespace {

using entropy_probe::CpuBackend;
using entropy_probe::index_t;
using ep_parity::EmulatedDeviceBackend;

static_assert(!entropy_probe::uses_own_compositions<EmulatedDeviceBackend>);
static_assert(entropy_probe::uses_own_compositions<CpuBackend>);

// f(x) = x^2 with f'(x) = 2x; counts evaluations of the scalar forms, which
// only the generic compositions call (CpuBackend runs the array forms).
struct CountingSquare {
  static inline std::atomic<long> scalar_calls{0};
  template <class T>
  static T f(T x) {
    ++scalar_calls;
    return x * x;
  }
  template <class T>
  static T df(T x) {
    ++scalar_calls;
    return T(2) * x;
  }
  template <class A>
  static auto f_array(const Eigen::ArrayBase<A>& x) {
    return x.square();
  }
  template <class A>
  static auto df_array(const Eigen::ArrayBase<A>& x) {
    return typename A::Scalar(2) * x;
  }
};

// Scalar evaluations of CountingSquare in each unary and gated map on B, and
// their results against x^2 and 2x.
template <class B>
std::vector<long> count_scalar_calls() {
  using entropy_probe::gated_jvp, entropy_probe::gated_map, entropy_probe::gated_vjp;
  using entropy_probe::unary_jvp, entropy_probe::unary_map, entropy_probe::unary_vjp;
  const index_t n = 100;
  std::vector<double> x(n), u(n), y(n), gx(n), gu(n), ty(n);
  for (index_t i = 0; i < n; ++i) {
    x[i] = 0.25 * double(i) - 3;
    u[i] = 1.5 - 0.125 * double(i);
  }
  std::vector<long> calls;
  auto count = [&](auto&& run) {
    CountingSquare::scalar_calls = 0;
    run();
    calls.push_back(CountingSquare::scalar_calls);
  };
  count([&] { unary_map<CountingSquare, B>(n, x.data(), y.data()); });
  for (index_t i = 0; i < n; ++i) CHECK(y[i] == x[i] * x[i]);
  count([&] { unary_vjp<CountingSquare, B>(n, x.data(), u.data(), gx.data(), true); });
  for (index_t i = 0; i < n; ++i) CHECK(gx[i] == u[i] * 2 * x[i]);
  count([&] { unary_jvp<CountingSquare, B>(n, x.data(), u.data(), ty.data()); });
  for (index_t i = 0; i < n; ++i) CHECK(ty[i] == 2 * x[i] * u[i]);
  count([&] { gated_map<CountingSquare, B>(n, x.data(), u.data(), y.data()); });
  for (index_t i = 0; i < n; ++i) CHECK(y[i] == x[i] * x[i] * u[i]);
  count([&] { gated_vjp<CountingSquare, B>(n, x.data(), u.data(), u.data(), gx.data(), true, gu.data(), true); });
  for (index_t i = 0; i < n; ++i) CHECK((gx[i] == u[i] * u[i] * 2 * x[i] && gu[i] == u[i] * x[i] * x[i]));
  count([&] { gated_jvp<CountingSquare, B>(n, x.data(), u.data(), u.data(), u.data(), ty.data()); });
  for (index_t i = 0; i < n; ++i) CHECK(ty[i] == 2 * x[i] * u[i] * u[i] + x[i] * x[i] * u[i]);
  return calls;
}

}  // namespace

TEST_CASE("emulated: the unary and gated maps run the generic compositions", "[emulated][compositions]") {
  // one scalar f or f' per element, two in the gated VJP and JVP
  CHECK(count_scalar_calls<EmulatedDeviceBackend>() == std::vector<long>{100, 100, 100, 100, 200, 200});
  // the CPU's overrides call none: the count tells the two paths apart
  CHECK(count_scalar_calls<CpuBackend>() == std::vector<long>(6, 0));
}

TEST_CASE("emulated: the softmax passes run the generic compositions", "[emulated][compositions]") {
  namespace ep = entropy_probe;
  using Emu = EmulatedDeviceBackend;
  const index_t V = 3000;
  const std::vector<std::int32_t> rows{3, 0, 2}, targets{7, 2999, 0};
  const auto m = static_cast<index_t>(rows.size());
  std::mt19937_64 rng(21);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  std::vector<float> z(4 * V), t(4 * V), g{0.5f, 0.0f, -1.25f, 2.0f};
  for (auto& v : z) v = nd(rng);
  for (auto& v : t) v = nd(rng);
  const double s = 1.0 / 0.7;

  struct Passes {
    std::vector<double> lse, dot;
    std::vector<float> gz;
  };
  // dispatch: 0 = the ops' dispatch on Emu, 1 = generic::...<Emu>, 2 = the ops' dispatch on CpuBackend
  auto run = [&](int dispatch) {
    Passes p{std::vector<double>(m), std::vector<double>(m), std::vector<float>(z.size(), 0.5f)};
    if (dispatch == 0) {
      ep::softmax_lse<Emu>(m, V, z.data(), rows.data(), s, p.lse.data());
      ep::softmax_dot<Emu>(m, V, z.data(), rows.data(), p.lse.data(), s, t.data(), p.dot.data());
      ep::softmax_vjp<Emu>(m, V, z.data(), rows.data(), targets.data(), p.lse.data(), g.data(), s, p.gz.data());
    } else if (dispatch == 1) {
      ep::generic::softmax_lse<Emu>(m, V, z.data(), rows.data(), s, p.lse.data());
      ep::generic::softmax_dot<Emu>(m, V, z.data(), rows.data(), p.lse.data(), s, t.data(), p.dot.data());
      ep::generic::softmax_vjp<Emu>(m, V, z.data(), rows.data(), targets.data(), p.lse.data(), g.data(), s, p.gz.data(),
                                    false);
    } else {
      ep::softmax_lse<CpuBackend>(m, V, z.data(), rows.data(), s, p.lse.data());
      ep::softmax_dot<CpuBackend>(m, V, z.data(), rows.data(), p.lse.data(), s, t.data(), p.dot.data());
      ep::softmax_vjp<CpuBackend>(m, V, z.data(), rows.data(), targets.data(), p.lse.data(), g.data(), s, p.gz.data());
    }
    return p;
  };
  const Passes emu = run(0), gen = run(1), cpu = run(2);
  CHECK(emu.lse == gen.lse);  // bit for bit: the same code
  CHECK(emu.dot == gen.dot);
  CHECK(emu.gz == gen.gz);
  // The CPU's override sums float exps, the generic form double ones: lse
  // differs in the last digits, so the checks above tell the paths apart.
  CHECK(emu.lse != cpu.lse);
  ep_parity::check_close("softmax_lse, emulated vs cpu", emu.lse, cpu.lse, ep_parity::tolerance<float>());
  ep_parity::check_close("softmax_dot, emulated vs cpu", emu.dot, cpu.dot, ep_parity::tolerance<float>());
  ep_parity::check_close("softmax_vjp, emulated vs cpu", std::vector<double>(emu.gz.begin(), emu.gz.end()),
                         std::vector<double>(cpu.gz.begin(), cpu.gz.end()), ep_parity::tolerance<float>());
}
