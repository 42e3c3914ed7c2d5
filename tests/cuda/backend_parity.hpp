// Backend parity: the same computation on CpuBackend and on a device backend
// DevB from the same host inputs, compared element by element. Used by the
// CUDA tests (DevB = CudaBackend, tests/cuda/test_cuda_*.cu) and, on any
// machine, by test_backend_emulated (DevB = EmulatedDeviceBackend).
//
// Tolerances (docs/cuda.md, Tests): 1e-10 relative in double, 1e-4 in float,
// each error taken relative to the largest magnitude of the CPU reference
// (so an element near zero is judged on the scale of its tensor).
#pragma once

#include "../support/op_cases.hpp"
#include "../support/tiny_models.hpp"

#include <entropy_probe/nn/qwen2.hpp>
#include <entropy_probe/probe/probe.hpp>
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

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace ep_parity {

using namespace entropy_probe;
using Cpu = CpuBackend;

template <class T>
constexpr double tolerance() {
  return std::is_same_v<T, double> ? 1e-10 : 1e-4;
}

// max |dev - ref| / max(max |ref|, floor)
inline double rel_err(const std::vector<double>& dev, const std::vector<double>& ref, double floor = 1e-300) {
  if (dev.size() != ref.size()) return INFINITY;
  double num = 0, den = floor;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    num = std::max(num, std::abs(dev[i] - ref[i]));
    den = std::max(den, std::abs(ref[i]));
  }
  return num / den;
}

// The elements of a tensor or a tensor view, as doubles on the host.
template <class Elements>
std::vector<double> host_doubles(const Elements& t) {
  const auto h = t.to_host();
  return std::vector<double>(h.begin(), h.end());
}

// A host tensor of doubles converted to T and placed on backend B.
template <class T, class B>
Tensor<T, B> on_backend(const Tensor<double>& x) {
  std::vector<T> h(static_cast<std::size_t>(x.numel()));
  for (index_t i = 0; i < x.numel(); ++i) h[static_cast<std::size_t>(i)] = static_cast<T>(x[i]);
  return Tensor<T, B>::from_host(x.shape(), h);
}
// A tensor of one backend copied to another (through the host).
template <class B, class T, class From>
Tensor<T, B> to_backend(const Tensor<T, From>& x) {
  return Tensor<T, B>::from_host(x.shape(), x.to_host());
}

inline Tensor<double> random_host(Shape shape, std::mt19937_64& rng, double scale = 1.0) {
  Tensor<double> t(std::move(shape));
  std::normal_distribution<double> nd(0.0, scale);
  for (index_t i = 0; i < t.numel(); ++i) t[i] = nd(rng);
  return t;
}

// With EP_PARITY_VERBOSE set, every comparison prints a line
// "parity: <error / tolerance> <what> ..." (gpu_check.sh lists the closest calls).
inline void report(const std::string& what, double e, double tol) {
  static const bool verbose = std::getenv("EP_PARITY_VERBOSE") != nullptr;
  if (verbose)
    std::printf("parity: %.3e %s: error %.3e, tolerance %.1e\n", tol > 0 ? e / tol : e, what.c_str(), e, tol);
}

// Checks |dev - ref| against the tolerance, with the error in the message.
inline void check_close(const std::string& what, const std::vector<double>& dev, const std::vector<double>& ref,
                        double tol) {
  const double e = rel_err(dev, ref);
  report(what, e, tol);
  INFO(what << ": relative error " << e << " (tolerance " << tol << ", " << ref.size() << " values)");
  CHECK(dev.size() == ref.size());
  CHECK(e <= tol);
}
// Scalars: relative to max(|ref|, scale), scale the size of what it derives from.
inline void check_scalar(const std::string& what, double dev, double ref, double tol, double scale = 0) {
  const double e = std::abs(dev - ref) / std::max({std::abs(ref), scale, 1e-300});
  report(what, e, tol);
  INFO(what << ": device " << dev << ", cpu " << ref << ", relative error " << e << " (tolerance " << tol << ")");
  CHECK(e <= tol);
}

// ---- ops -------------------------------------------------------------------------------

using OpInput = ep_test::OpInput;

struct OpResult {
  std::vector<double> value, tangent;
  std::vector<std::vector<double>> grads;  // of the differentiable inputs, in order
};

// Forward, backward with a random cotangent and JVP with random tangents of
// build(tape, vars) on backend B; the random values come from `seed` on the
// host, so both backends see the same ones.
template <class T, class B, class Build>
OpResult run_op(const std::vector<OpInput>& inputs, Build& build, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  Tape<T, B> tape;
  std::vector<Var> vars;
  for (const OpInput& in : inputs) vars.push_back(tape.input(on_backend<T, B>(in.value), in.differentiable));
  const Var y = build(tape, vars);
  OpResult r;
  r.value = host_doubles(tape.value(y));
  tape.backward(y, on_backend<T, B>(random_host(tape.shape(y), rng)));
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    if (!inputs[i].differentiable) continue;
    const Tensor<T, B>* g = tape.grad(vars[i]);
    r.grads.push_back(g ? host_doubles(*g) : std::vector<double>(static_cast<std::size_t>(inputs[i].value.numel())));
  }
  for (std::size_t i = 0; i < inputs.size(); ++i)
    if (inputs[i].differentiable)
      tape.set_tangent(vars[i], on_backend<T, B>(random_host(inputs[i].value.shape(), rng)));
  tape.jvp();
  const auto* t = tape.tangent(y);
  r.tangent = t ? host_doubles(*t) : std::vector<double>(r.value.size());
  return r;
}

// The op's forward, VJP and JVP on DevB against CpuBackend, in T.
template <class T, class DevB, class Build>
void check_op(const std::string& name, const std::vector<OpInput>& inputs, Build build, std::uint64_t seed = 5) {
  const OpResult cpu = run_op<T, Cpu>(inputs, build, seed);
  const OpResult dev = run_op<T, DevB>(inputs, build, seed);
  const std::string tag = name + (std::is_same_v<T, double> ? " (double)" : " (float)");
  const double tol = tolerance<T>();
  check_close(tag + " forward", dev.value, cpu.value, tol);
  REQUIRE(dev.grads.size() == cpu.grads.size());
  for (std::size_t i = 0; i < cpu.grads.size(); ++i)
    check_close(tag + " VJP into differentiable input " + std::to_string(i), dev.grads[i], cpu.grads[i], tol);
  check_close(tag + " JVP", dev.tangent, cpu.tangent, tol);
}

// Every case of one group of the op-case table (tests/support/op_cases.hpp),
// which the finite-difference tests iterate too.
template <class T, class DevB>
void op_cases(ep_test::OpGroup group) {
  ep_test::for_each_op_case(group, [](const std::string& name, const std::vector<OpInput>& inputs, auto build) {
    check_op<T, DevB>(name, inputs, build);
  });
}

// ---- primitives --------------------------------------------------------------------------

template <class T, class DevB>
void gemm_primitives() {
  std::mt19937_64 rng(7);
  const double tol = tolerance<T>();
  for (bool ta : {false, true})
    for (bool tb : {false, true})
      for (double beta : {0.0, 1.0, -0.5}) {
        const index_t m = 37, n = 19, k = 45, pad = 3;  // leading dimensions with padding: sub-matrices
        const index_t lda = (ta ? m : k) + pad, ldb = (tb ? k : n) + pad, ldc = n + pad;
        const auto a = random_host({(ta ? k : m) * lda}, rng), b = random_host({(tb ? n : k) * ldb}, rng),
                   c = random_host({m * ldc}, rng);
        auto ac = on_backend<T, Cpu>(a), bc = on_backend<T, Cpu>(b), cc = on_backend<T, Cpu>(c);
        auto ad = on_backend<T, DevB>(a), bd = on_backend<T, DevB>(b), cd = on_backend<T, DevB>(c);
        Cpu::gemm(ta, tb, m, n, k, T(1.5), ac.data(), lda, bc.data(), ldb, T(beta), cc.data(), ldc);
        DevB::gemm(ta, tb, m, n, k, T(1.5), ad.data(), lda, bd.data(), ldb, T(beta), cd.data(), ldc);
        check_close("gemm ta=" + std::to_string(ta) + " tb=" + std::to_string(tb) + " beta=" + std::to_string(beta),
                    host_doubles(cd), host_doubles(cc), tol);
      }
  // batched: a strided batch, then a three-level grid whose B is shared
  // along the last level (attention's KV heads), against one gemm per item;
  // and k = 0 (C = beta C)
  const index_t m = 8, n = 5, k = 6, batch = 12;
  const auto a = random_host({batch, m, k}, rng), b = random_host({batch, n, k}, rng),
             c = random_host({batch, m, n}, rng);
  auto ac = on_backend<T, Cpu>(a), bc = on_backend<T, Cpu>(b), cc = on_backend<T, Cpu>(c);
  auto ad = on_backend<T, DevB>(a), bd = on_backend<T, DevB>(b), cd = on_backend<T, DevB>(c);
  const BatchGrid strided = BatchGrid::strided(batch, m * k, n * k, m * n);
  Cpu::gemm_batched(false, true, m, n, k, T(1), ac.data(), k, bc.data(), k, T(1), cc.data(), n, strided);
  DevB::gemm_batched(false, true, m, n, k, T(1), ad.data(), k, bd.data(), k, T(1), cd.data(), n, strided);
  check_close("gemm_batched, strided", host_doubles(cd), host_doubles(cc), tol);
  BatchGrid grid;
  grid.n[0] = 2, grid.n[1] = 2, grid.n[2] = 3;
  grid.sa[0] = 6 * m * k, grid.sa[1] = 3 * m * k, grid.sa[2] = m * k;
  grid.sb[0] = 2 * n * k, grid.sb[1] = n * k, grid.sb[2] = 0;
  grid.sc[0] = 6 * m * n, grid.sc[1] = 3 * m * n, grid.sc[2] = m * n;
  auto ref = to_backend<Cpu>(cc);
  for (index_t i0 = 0; i0 < 2; ++i0)
    for (index_t i1 = 0; i1 < 2; ++i1)
      for (index_t i2 = 0; i2 < 3; ++i2)
        Cpu::gemm(false, true, m, n, k, T(0.5), ac.data() + (6 * i0 + 3 * i1 + i2) * m * k, k,
                  bc.data() + (2 * i0 + i1) * n * k, k, T(-1), ref.data() + (6 * i0 + 3 * i1 + i2) * m * n, n);
  Cpu::gemm_batched(false, true, m, n, k, T(0.5), ac.data(), k, bc.data(), k, T(-1), cc.data(), n, grid);
  DevB::gemm_batched(false, true, m, n, k, T(0.5), ad.data(), k, bd.data(), k, T(-1), cd.data(), n, grid);
  CHECK(host_doubles(cc) == host_doubles(ref));  // the CPU backend runs exactly these products
  check_close("gemm_batched, three-level grid with a shared B", host_doubles(cd), host_doubles(cc), tol);
  Cpu::gemm_batched(false, true, m, n, 0, T(1), ac.data(), 1, bc.data(), 1, T(0.5), cc.data(), n, grid);
  DevB::gemm_batched(false, true, m, n, 0, T(1), ad.data(), 1, bd.data(), 1, T(0.5), cd.data(), n, grid);
  check_close("gemm_batched with k = 0", host_doubles(cd), host_doubles(cc), tol);
  Cpu::gemm(false, false, m, n, 0, T(1), ac.data(), 1, bc.data(), n, T(0.5), cc.data(), n);
  DevB::gemm(false, false, m, n, 0, T(1), ad.data(), 1, bd.data(), n, T(0.5), cd.data(), n);
  check_close("gemm with k = 0", host_doubles(cd), host_doubles(cc), tol);
}

// The fused row passes on backend Bk against plain loops: a reduction over
// the first len(r) entries (0 and all included), its statistic, then a pass
// over the whole row that reads what an earlier pass wrote.
template <class Bk>
void fused_row_primitives(const std::string& name) {
  std::mt19937_64 rng(12);
  for (index_t cols : {1, 33, 700, 5000}) {
    const index_t rows = 301;
    const auto x = random_host({rows, cols}, rng, 4.0);
    const auto xd = on_backend<double, Bk>(x);
    const double* p = xd.data();
    auto len = [=] EP_HOST_DEVICE(index_t r) { return (r * 7) % (cols + 1); };
    Tensor<double, Bk> y({rows, cols}), e({rows, cols}), stat({rows});
    double* yp = y.data();
    double* ep = e.data();
    double* sp = stat.data();
    Bk::row_sum_apply(
        rows, cols, len, [=] EP_HOST_DEVICE(index_t r, index_t j) { return p[r * cols + j] * p[r * cols + j]; },
        [=] EP_HOST_DEVICE(index_t r, acc_t s) { return sp[r] = s + double(r); },
        [=] EP_HOST_DEVICE(index_t r, index_t j, acc_t a) { yp[r * cols + j] = p[r * cols + j] * a; });
    std::vector<double> ys(static_cast<std::size_t>(rows * cols)), ss(static_cast<std::size_t>(rows));
    std::vector<double> es(ys.size()), ms(ss.size());
    for (index_t r = 0; r < rows; ++r) {
      const index_t n = (r * 7) % (cols + 1);
      double s = 0, m = -INFINITY;
      for (index_t j = 0; j < n; ++j) {
        s += x[r * cols + j] * x[r * cols + j];
        m = std::max(m, x[r * cols + j]);
      }
      ss[static_cast<std::size_t>(r)] = s + double(r);
      double z = 0;
      for (index_t j = 0; j < n; ++j) z += std::exp(x[r * cols + j] - m);
      ms[static_cast<std::size_t>(r)] = n > 0 ? m + std::log(z) : -1.0;
      for (index_t j = 0; j < cols; ++j) {
        const auto k = static_cast<std::size_t>(r * cols + j);
        ys[k] = x[r * cols + j] * ss[static_cast<std::size_t>(r)];
        es[k] = j < n ? std::exp(x[r * cols + j] - m) / z : -2.0;
      }
    }
    const std::string c = ", cols = " + std::to_string(cols);
    check_close(name + " row_sum_apply statistic" + c, stat.to_host(), ss, 1e-12);
    check_close(name + " row_sum_apply rows" + c, y.to_host(), ys, 1e-12);
    // softmax over the first len(r) entries: the exponentials written by the
    // sum pass are read back by the last pass; -2 past len(r)
    Tensor<double, Bk> lse({rows});
    double* lp = lse.data();
    Bk::row_max_sum_apply(
        rows, cols, len, [=] EP_HOST_DEVICE(index_t r, index_t j) { return p[r * cols + j]; },
        [=] EP_HOST_DEVICE(index_t r, index_t j, acc_t m) { return ep[r * cols + j] = std::exp(p[r * cols + j] - m); },
        [=] EP_HOST_DEVICE(index_t r, index_t j, acc_t m, acc_t z) {
          if (j == 0) lp[r] = z > 0 ? m + std::log(z) : -1.0;
          ep[r * cols + j] = j < (r * 7) % (cols + 1) ? ep[r * cols + j] / z : -2.0;
        });
    check_close(name + " row_max_sum_apply log-sum-exp" + c, lse.to_host(), ms, 1e-12);
    check_close(name + " row_max_sum_apply rows" + c, e.to_host(), es, 1e-12);
  }
}

template <class DevB>
void reduction_primitives() {
  std::mt19937_64 rng(8);
  for (index_t n : {1, 7, 1000, 300001}) {
    const auto x = random_host({n}, rng);
    const auto xd = on_backend<double, DevB>(x);
    const double* p = xd.data();
    const double dev = DevB::sum(n, [=] EP_HOST_DEVICE(index_t i) { return p[i] * p[i]; });
    double ref = 0;
    for (index_t i = 0; i < n; ++i) ref += x[i] * x[i];
    check_scalar("sum of squares, n = " + std::to_string(n), dev, ref, 1e-12);
  }
  CHECK(DevB::sum(0, [] EP_HOST_DEVICE(index_t) { return 1.0; }) == 0.0);
  for (index_t cols : {1, 33, 5000}) {
    const index_t rows = 6;
    const auto x = random_host({rows, cols}, rng, 4.0);
    const auto xd = on_backend<double, DevB>(x);
    const double* p = xd.data();
    Tensor<double, DevB> s({rows}), mx({rows});
    DevB::row_sum(
        rows, cols, [=] EP_HOST_DEVICE(index_t r, index_t j) { return p[r * cols + j]; }, s.data());
    DevB::row_max(
        rows, cols, [=] EP_HOST_DEVICE(index_t r, index_t j) { return p[r * cols + j]; }, mx.data());
    std::vector<double> rs(static_cast<std::size_t>(rows)), rm(rs.size(), -INFINITY);
    for (index_t r = 0; r < rows; ++r)
      for (index_t j = 0; j < cols; ++j) {
        rs[static_cast<std::size_t>(r)] += x[r * cols + j];
        rm[static_cast<std::size_t>(r)] = std::max(rm[static_cast<std::size_t>(r)], x[r * cols + j]);
      }
    check_close("row_sum, cols = " + std::to_string(cols), s.to_host(), rs, 1e-12);
    check_close("row_max, cols = " + std::to_string(cols), mx.to_host(), rm, 0.0);
    Tensor<double, DevB> y({rows, cols});
    double* yp = y.data();
    DevB::parallel_for_2d(rows, cols,
                          [=] EP_HOST_DEVICE(index_t r, index_t j) { yp[r * cols + j] = double(r * 100000 + j); });
    const std::vector<double> yh = y.to_host();
    bool ok = true;
    for (index_t r = 0; r < rows; ++r)
      for (index_t j = 0; j < cols; ++j)
        ok = ok && yh[static_cast<std::size_t>(r * cols + j)] == double(r * 100000 + j);
    CHECK(ok);
  }
  fused_row_primitives<Cpu>("cpu");
  fused_row_primitives<DevB>(DevB::name);
}

template <class DevB>
void storage_primitives() {
  // Element types the ops keep on the backend: ids, masks, double statistics.
  const std::vector<std::int32_t> ids = {3, -1, 7, 2147483647};
  CHECK(Tensor<std::int32_t, DevB>::from_host({4}, ids).to_host() == ids);
  const std::vector<std::uint8_t> mask = {0, 1, 1, 0, 255};
  CHECK(Tensor<std::uint8_t, DevB>::from_host({5}, mask).to_host() == mask);
  Tensor<float, DevB> z({3, 4});
  CHECK(z.to_host() == std::vector<float>(12, 0.0f));  // allocate zero-fills
  auto f = Tensor<double, DevB>::full({5}, 2.5);
  CHECK(f.to_host() == std::vector<double>(5, 2.5));
  auto copy = f;  // deep copy
  DevB::fill(f.data(), f.numel(), -1.0);
  CHECK(copy.to_host() == std::vector<double>(5, 2.5));
  CHECK(f.to_host() == std::vector<double>(5, -1.0));
  Tensor<double, DevB> moved = std::move(copy);
  CHECK(moved.to_host() == std::vector<double>(5, 2.5));
  const auto cast = f.template cast<float>();
  CHECK(cast.to_host() == std::vector<float>(5, -1.0f));
  Tensor<double, DevB> empty({0});
  CHECK(empty.to_host().empty());
  DevB::copy(moved.data(), f.data(), 2);
  CHECK(moved.to_host() == std::vector<double>{-1, -1, 2.5, 2.5, 2.5});
}

// ---- buffers and the optimizer ----------------------------------------------------------

inline nn::LoraConfig tiny_qwen2_lora() {
  nn::LoraConfig l;
  l.r = 2;
  l.lora_alpha = 4;
  l.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  l.init_lora_b_zero = false;
  return l;
}

// The CPU Adam state `cpu` (bound to a CPU registry) for the registry `reg`
// of the same model on backend B (same order of parameters).
template <class T, class B>
AdamState<T, B> adam_state_on(const AdamState<T>& cpu, const Registry<T, B>& reg) {
  AdamState<T, B> st(reg.info(), cpu.hyper());
  for (index_t i = 0; i < reg.size(); ++i)
    if (const auto* e = cpu.entry(i))
      st.set(reg.entry(i).id, AdamParamState<T, B>{to_backend<B>(e->exp_avg), to_backend<B>(e->exp_avg_sq), e->step});
  return st;
}

template <class U, class B>
std::vector<double> flatten(const ParamBuffer<U, B>& buf) {
  std::vector<double> out;
  for (index_t i = 0; i < buf.size(); ++i)
    if (const auto* t = buf.entry(i)) {
      const auto h = host_doubles(*t);
      out.insert(out.end(), h.begin(), h.end());
    }
  return out;
}
template <class T, class B>
std::vector<double> flatten_values(const Registry<T, B>& reg) {
  std::vector<double> out;
  for (const auto& e : reg.entries()) {
    const auto h = host_doubles(e.param->value);
    out.insert(out.end(), h.begin(), h.end());
  }
  return out;
}

// Gradients from one backward pass, then the buffer vocabulary, the Adam
// preconditioner and an AdamW step on both backends.
template <class T, class DevB>
void buffers_and_adam() {
  const double tol = tolerance<T>();
  auto mc = ep_test::tiny_gpt2<T>(11, true);
  nn::Gpt2LMHeadModel<T, DevB> md(ep_test::tiny_gpt2_config(), ep_test::tiny_lora(true), 11);
  auto rc = Registry<T>::build(mc);
  auto rd = Registry<T, DevB>::build(md);
  REQUIRE(rc.size() == rd.size());
  const TokenBatch E = ep_test::random_batch(3, 2, 8, 11, 12);
  SingleProcess comm;
  ProbeComponents<decltype(mc)> cc(mc, rc, ProbeSettings{}, comm);
  ProbeComponents<decltype(md)> cd(md, rd, ProbeSettings{}, comm);
  const auto sc = cc.accumulate_sum_X(E);
  const auto sd = cd.accumulate_sum_X(E);
  check_close("sum_X buffer", flatten(sd.sum), flatten(sc.sum), tol);
  check_scalar("dot_param_buffers", cd.dot_param_buffers(sd.sum, sd.sum), cc.dot_param_buffers(sc.sum, sc.sum), tol);
  check_scalar("norm_param_buffer", norm_param_buffer(sd.sum), norm_param_buffer(sc.sum), tol);

  // grads -> buffer -> grads
  load_param_gradients(rc, sc.sum, -0.5);
  load_param_gradients(rd, sd.sum, -0.5);
  scale_param_gradients(rc, 3.0);
  scale_param_gradients(rd, 3.0);
  auto bc = cc.zeros_like_params();
  auto bd = cd.zeros_like_params();
  cc.add_into_param_buffer(bc, 2.0);
  cd.add_into_param_buffer(bd, 2.0);
  check_close("grads through load / scale / add_into", flatten(bd), flatten(bc), tol);

  // Adam: preconditioner on a buffer, then one AdamW step on the parameters.
  const AdamState<T> state_c = ep_test::random_adam_state(rc, 13, "lora_B");  // some parameters without state
  const AdamState<T, DevB> state_d = adam_state_on(state_c, rd);
  AdamPreconditioner<T> pc(state_c);
  AdamPreconditioner<T, DevB> pd(state_d);
  pc.apply(bc);
  pd.apply(bd);
  CHECK(pd.missing() == pc.missing());
  check_close("AdamPreconditioner::apply", flatten(bd), flatten(bc), tol);
  AdamState<T> step_c = state_c;
  AdamState<T, DevB> step_d = state_d;
  adamw_step(rc, step_c, 1e-2);
  adamw_step(rd, step_d, 1e-2);
  check_close("adamw_step parameters", flatten_values(rd), flatten_values(rc), tol);
  std::vector<double> mvc, mvd;
  for (index_t i = 0; i < rc.size(); ++i) {
    REQUIRE((step_c.entry(i) != nullptr) == (step_d.entry(i) != nullptr));
    if (!step_c.entry(i)) continue;
    CHECK(step_c.entry(i)->step == step_d.entry(i)->step);
    for (const auto* t : {&step_c.entry(i)->exp_avg, &step_c.entry(i)->exp_avg_sq}) {
      const auto h = host_doubles(*t);
      mvc.insert(mvc.end(), h.begin(), h.end());
    }
    for (const auto* t : {&step_d.entry(i)->exp_avg, &step_d.entry(i)->exp_avg_sq}) {
      const auto h = host_doubles(*t);
      mvd.insert(mvd.end(), h.begin(), h.end());
    }
  }
  check_close("adamw_step moments", mvd, mvc, tol);
}

// ---- the full probe -------------------------------------------------------------------------

inline void check_results(const std::string& tag, const ProbeResult& d, const ProbeResult& c, double tol) {
  // A dot product's rounding is bounded on the scale |mu_X| |mu_Y| (Cauchy-Schwarz), not |mu_X . mu_Y|.
  const double dot_scale = c.mu_X_norm * c.mu_Y_norm;
  check_scalar(tag + " bars_dot", d.bars_dot, c.bars_dot, tol, dot_scale);
  check_scalar(tag + " deltaH1", d.deltaH1, c.deltaH1, tol, c.learning_rate * dot_scale);
  check_scalar(tag + " mu_X_norm", d.mu_X_norm, c.mu_X_norm, tol);
  check_scalar(tag + " mu_Y_norm", d.mu_Y_norm, c.mu_Y_norm, tol);
  CHECK(d.B_E == c.B_E);
  CHECK(d.B_U == c.B_U);
  CHECK(d.preconditioner_missing == c.preconditioner_missing);
  REQUIRE(d.conditional.has_value() == c.conditional.has_value());
  if (c.conditional) {
    check_close(tag + " s_values", d.conditional->s_values, c.conditional->s_values, tol);
    check_scalar(tag + " SE_conditional", d.conditional->se_conditional, c.conditional->se_conditional, tol);
  }
  REQUIRE(d.full.has_value() == c.full.has_value());
  if (c.full) {
    check_scalar(tag + " V_X", d.full->V_X, c.full->V_X, tol);
    check_scalar(tag + " V_Y", d.full->V_Y, c.full->V_Y, tol);
    check_scalar(tag + " SE_deltaH1", d.full->se_deltaH1, c.full->se_deltaH1, tol);
  }
  REQUIRE(d.truth.has_value() == c.truth.has_value());
  if (c.truth) {
    const auto &a = *d.truth, &b = *c.truth;
    check_scalar(tag + " H_orig", a.H_orig, b.H_orig, tol);
    check_scalar(tag + " H_upd", a.H_upd, b.H_upd, tol);
    // a difference of two nearby entropies: judged on the entropies' scale
    check_scalar(tag + " deltaH_true", a.deltaH_true, b.deltaH_true, tol, std::abs(b.H_orig));
    check_scalar(tag + " H_orig_tok", a.H_orig_tok, b.H_orig_tok, tol);
    check_scalar(tag + " H_upd_tok", a.H_upd_tok, b.H_upd_tok, tol);
    check_scalar(tag + " deltaH_true_tok", a.deltaH_true_tok, b.deltaH_true_tok, tol, std::abs(b.H_orig_tok));
    check_scalar(tag + " ESS", a.ESS, b.ESS, tol);
  }
}

// OfflineEntropyProbe on the same model built on both backends from one seed.
template <class T, class DevB, class CpuModel, class DevModel>
void probe_parity(const std::string& tag, CpuModel& mc, DevModel& md, index_t vocab, ProbeConfig config) {
  const TokenBatch E = ep_test::random_batch(5, 3, 10, vocab, 31);
  const TokenBatch U = ep_test::random_batch(4, 3, 10, vocab, 32);
  OfflineEntropyProbe pc(mc, config);
  OfflineEntropyProbe pd(md, config);
  const AdamState<T> sc = ep_test::random_adam_state(pc.registry(), 33);
  const AdamState<T, DevB> sd = adam_state_on(sc, pd.registry());
  const std::vector<double> before = flatten_values(pd.registry());
  const ProbeResult rc = pc.run(E, U, sc);
  const ProbeResult rd = pd.run(E, U, sd);
  check_results(tag + (std::is_same_v<T, double> ? " (double)" : " (float)"), rd, rc, tolerance<T>());
  CHECK(flatten_values(pd.registry()) == before);  // restored bit-exactly after the ground-truth step
}

template <class T, class DevB>
void probe_gpt2() {
  ProbeConfig cfg;
  cfg.mb_size = 2;
  cfg.ground_truth = StepKind::adam;
  auto mc = ep_test::tiny_gpt2<T>(21, true);
  nn::Gpt2LMHeadModel<T, DevB> md(ep_test::tiny_gpt2_config(), ep_test::tiny_lora(true), 21);
  probe_parity<T, DevB>("gpt2, adam ground truth", mc, md, 11, cfg);
  cfg.ground_truth = StepKind::precond_sgd;
  cfg.alpha_route = AlphaRoute::reverse;
  cfg.weighting = Weighting::per_token_avg;
  cfg.temperature = 0.8;
  cfg.mb_size = 0;
  probe_parity<T, DevB>("gpt2, precond_sgd, reverse route, per_token_avg, tau 0.8", mc, md, 11, cfg);
}

template <class T, class DevB>
void probe_qwen2() {
  ProbeConfig cfg;
  cfg.mb_size = 3;
  cfg.ground_truth = StepKind::adam;
  nn::Qwen2ForCausalLM<T> mc(ep_test::tiny_qwen2_config(/*tie=*/true), tiny_qwen2_lora(), 41);
  nn::Qwen2ForCausalLM<T, DevB> md(ep_test::tiny_qwen2_config(/*tie=*/true), tiny_qwen2_lora(), 41);
  probe_parity<T, DevB>("qwen2, adam ground truth", mc, md, 13, cfg);
}

}  // namespace ep_parity

// The parity test cases for a device backend, in groups so that the CUDA
// tests can spread them over several translation units.
#define EP_PARITY_OP_TESTS(DevB, prefix)                                                                       \
  TEST_CASE(prefix "elementwise, reshape and slice ops match the CPU backend", "[parity][ops]") {              \
    ep_parity::op_cases<double, DevB>(ep_test::OpGroup::elementwise);                                          \
    ep_parity::op_cases<float, DevB>(ep_test::OpGroup::elementwise);                                           \
  }                                                                                                            \
  TEST_CASE(prefix "linear, LoRA linear and embedding match the CPU backend", "[parity][ops]") {               \
    ep_parity::op_cases<double, DevB>(ep_test::OpGroup::linear);                                               \
    ep_parity::op_cases<float, DevB>(ep_test::OpGroup::linear);                                                \
  }                                                                                                            \
  TEST_CASE(prefix "norms and rotary match the CPU backend", "[parity][ops]") {                                \
    ep_parity::op_cases<double, DevB>(ep_test::OpGroup::norm);                                                 \
    ep_parity::op_cases<float, DevB>(ep_test::OpGroup::norm);                                                  \
  }                                                                                                            \
  TEST_CASE(prefix "causal attention (GQA, padding) matches the CPU backend", "[parity][ops]") {               \
    ep_parity::op_cases<double, DevB>(ep_test::OpGroup::attention);                                            \
    ep_parity::op_cases<float, DevB>(ep_test::OpGroup::attention);                                             \
  }                                                                                                            \
  TEST_CASE(prefix "log-softmax-gather, masked sums and a composite match the CPU backend", "[parity][ops]") { \
    ep_parity::op_cases<double, DevB>(ep_test::OpGroup::logprob);                                              \
    ep_parity::op_cases<float, DevB>(ep_test::OpGroup::logprob);                                               \
  }

#define EP_PARITY_PRIMITIVE_TESTS(DevB, prefix)                                                              \
  TEST_CASE(prefix "gemm (transposes, leading dimensions, batched, k = 0) matches the CPU backend",          \
            "[parity][primitives]") {                                                                        \
    ep_parity::gemm_primitives<double, DevB>();                                                              \
    ep_parity::gemm_primitives<float, DevB>();                                                               \
  }                                                                                                          \
  TEST_CASE(prefix "sums, row reductions and 2-d loops", "[parity][primitives]") {                           \
    ep_parity::reduction_primitives<DevB>();                                                                 \
  }                                                                                                          \
  TEST_CASE(prefix "storage of float, double, int32 and uint8", "[parity][primitives]") {                    \
    ep_parity::storage_primitives<DevB>();                                                                   \
  }                                                                                                          \
  TEST_CASE(prefix "buffers, Adam preconditioner and AdamW step match the CPU backend", "[parity][probe]") { \
    ep_parity::buffers_and_adam<double, DevB>();                                                             \
    ep_parity::buffers_and_adam<float, DevB>();                                                              \
  }

#define EP_PARITY_PROBE_TESTS(DevB, prefix)                                                       \
  TEST_CASE(prefix "the full probe on a tiny GPT-2 matches the CPU backend", "[parity][probe]") { \
    ep_parity::probe_gpt2<double, DevB>();                                                        \
    ep_parity::probe_gpt2<float, DevB>();                                                         \
  }                                                                                               \
  TEST_CASE(prefix "the full probe on a tiny Qwen2 matches the CPU backend", "[parity][probe]") { \
    ep_parity::probe_qwen2<double, DevB>();                                                       \
    ep_parity::probe_qwen2<float, DevB>();                                                        \
  }
