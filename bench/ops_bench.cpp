// Microbenchmarks of the tape ops, each beside the floor of its own work
// measured in the same run (see docs/performance.md):
//
//   gemm/*   the LoRA linear's big product x W^T (and dy W) through the backend
//            gemm (cblas when configured), through CpuBackend::eigen_gemm, and
//            through cblas restricted to one thread; a FLOP/s counter
//   lora/*   fused LoRA linear forward, forward + VJP (W frozen; x, A, B need
//            gradients: the probe's case), forward + JVP (tangents on x, A, B),
//            beside floor_* = exactly the gemm calls the op makes, on
//            preallocated buffers
//   attn/*   causal attention (grouped KV heads, key padding) forward / + VJP /
//            + JVP beside the per-(row, head) gemms of the same mode
//   lsg/*    log_softmax_gather forward / + VJP beside memory-bandwidth floors:
//            one pass reading the logits (floor_read) and one pass reading
//            them and writing a same-sized gradient (floor_read_write)
//
// Every case exists in a "large" size (the numbers in docs/performance.md) and
// a "small" size (the ctest smoke test: --benchmark_filter=/small). All times
// are wall-clock (UseRealTime: OpenBLAS runs its own threads). After the runs
// a table prints each op's median time over its floor's median time, as wall
// time and as main-thread CPU time (the load-robust measure; it is all of the
// work when run with OPENBLAS_NUM_THREADS=1).
#include <entropy_probe/tape/ops/attention.hpp>
#include <entropy_probe/tape/ops/linear.hpp>
#include <entropy_probe/tape/ops/logprob.hpp>

#include "benchmark_main.hpp"

#include <benchmark/benchmark.h>
#include <fmt/format.h>
#include <Eigen/Core>

#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace ep = entropy_probe;
using ep::index_t;
using Backend = ep::CpuBackend;
using TensorF = ep::Tensor<float>;
using TapeF = ep::Tape<float>;

namespace {

using ep_bench::random_tensor;
using ep_bench::Times;

// ---- helpers -------------------------------------------------------------------

// One row-major backend gemm call, C = alpha op(A) op(B) + beta C, exactly as
// an op issues it (blas::mm_nn / mm_nt / mm_tn fix the leading dimensions).
struct Gemm {
  bool ta, tb;
  index_t m, n, k;
  float alpha;
  const float* a;
  index_t lda;
  const float* b;
  index_t ldb;
  float beta;
  float* c;
  index_t ldc;

  void run() const { Backend::gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc); }
  void run_eigen() const { Backend::eigen_gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc); }
  double flops() const { return 2.0 * double(m) * double(n) * double(k); }
};
Gemm mm_nn(index_t m, index_t n, index_t k, float alpha, const float* a, const float* b, float beta, float* c) {
  return {false, false, m, n, k, alpha, a, k, b, n, beta, c, n};
}
Gemm mm_nt(index_t m, index_t n, index_t k, float alpha, const float* a, const float* b, float beta, float* c) {
  return {false, true, m, n, k, alpha, a, k, b, k, beta, c, n};
}
Gemm mm_tn(index_t m, index_t n, index_t k, float alpha, const float* a, const float* b, float beta, float* c) {
  return {true, false, m, n, k, alpha, a, m, b, n, beta, c, n};
}

double total_flops(const std::vector<Gemm>& gemms) {
  double f = 0;
  for (const Gemm& g : gemms) f += g.flops();
  return f;
}
void set_gflops(benchmark::State& st, double flops_per_iteration) {
  st.counters["FLOP/s"] = benchmark::Counter(flops_per_iteration, benchmark::Counter::kIsIterationInvariantRate,
                                             benchmark::Counter::kIs1000);
}

// The floor of an op: its gemm calls, back to back, on preallocated buffers.
void run_gemms(benchmark::State& st, const std::vector<Gemm>& gemms) {
  for ([[maybe_unused]] auto _ : st) {
    for (const Gemm& g : gemms) g.run();
    benchmark::ClobberMemory();
  }
  set_gflops(st, total_flops(gemms));
}

void discard_grad(TensorF&&) {}

enum class Mode { fwd, fwd_vjp, fwd_jvp };

// Test data is built on first use, so a filtered run (the smoke test) never
// allocates the large cases.
template <class Data, class Shape>
Data& cached(const std::string& key, const Shape& shape) {
  static std::map<std::string, std::unique_ptr<Data>> cache;
  auto& slot = cache[key];
  if (!slot) slot = std::make_unique<Data>(shape);
  return *slot;
}

// ---- LoRA linear: y = x W^T + scale (x A^T) B^T ------------------------------------

struct LoraShape {
  const char* name;
  index_t n, in, out, r;
};
const LoraShape kLoraLarge{"large", 512, 1024, 1024, 16};
const LoraShape kLoraSmall{"small", 16, 32, 32, 4};

struct LoraData {
  LoraShape s;
  float scale = 2.0f;
  TensorF x, w, a, b, dy, tx, ta, tb;       // inputs, cotangent, tangents
  TensorF u, y, gu, gx, ga, gb, tu, ty, c;  // floor scratch (c: a second output for gemm/*)

  explicit LoraData(const LoraShape& sh)
      : s(sh),
        x(random_tensor({sh.n, sh.in}, 1)),
        w(random_tensor({sh.out, sh.in}, 2, 0.02)),
        a(random_tensor({sh.r, sh.in}, 3, 0.03)),
        b(random_tensor({sh.out, sh.r}, 4, 0.1)),
        dy(random_tensor({sh.n, sh.out}, 5)),
        tx(random_tensor({sh.n, sh.in}, 6)),
        ta(random_tensor({sh.r, sh.in}, 7, 0.03)),
        tb(random_tensor({sh.out, sh.r}, 8, 0.1)),
        u({sh.n, sh.r}),
        y({sh.n, sh.out}),
        gu({sh.n, sh.r}),
        gx({sh.n, sh.in}),
        ga({sh.r, sh.in}),
        gb({sh.out, sh.r}),
        tu({sh.n, sh.r}),
        ty({sh.n, sh.out}),
        c({sh.n, sh.in}) {}

  // The gemm calls of linear.hpp's lora_linear, in its order (no bias).
  std::vector<Gemm> forward() {
    const index_t n = s.n, in = s.in, out = s.out, r = s.r;
    return {mm_nt(n, r, in, 1, x.data(), a.data(), 0, u.data()),        // u = x A^T
            mm_nt(n, out, in, 1, x.data(), w.data(), 0, y.data()),      // y = x W^T
            mm_nt(n, out, r, scale, u.data(), b.data(), 1, y.data())};  // y += s u B^T
  }
  std::vector<Gemm> backward() {
    const index_t n = s.n, in = s.in, out = s.out, r = s.r;
    return {mm_nn(n, r, out, scale, dy.data(), b.data(), 0, gu.data()),   // gu = s dy B
            mm_nn(n, in, out, 1, dy.data(), w.data(), 1, gx.data()),      // dx += dy W
            mm_nn(n, in, r, 1, gu.data(), a.data(), 1, gx.data()),        // dx += gu A
            mm_tn(r, in, n, 1, gu.data(), x.data(), 1, ga.data()),        // dA += gu^T x
            mm_tn(out, r, n, scale, dy.data(), u.data(), 1, gb.data())};  // dB += s dy^T u
  }
  std::vector<Gemm> tangent() {
    const index_t n = s.n, in = s.in, out = s.out, r = s.r;
    return {mm_nt(n, out, in, 1, tx.data(), w.data(), 1, ty.data()),      // ty += tx W^T
            mm_nt(n, r, in, 1, tx.data(), a.data(), 1, tu.data()),        // tu = tx A^T
            mm_nt(n, r, in, 1, x.data(), ta.data(), 1, tu.data()),        // tu += x tA^T
            mm_nt(n, out, r, scale, tu.data(), b.data(), 1, ty.data()),   // ty += s tu B^T
            mm_nt(n, out, r, scale, u.data(), tb.data(), 1, ty.data())};  // ty += s u tB^T
  }
  std::vector<Gemm> floor(Mode m) {
    std::vector<Gemm> g = forward();
    const std::vector<Gemm> extra = m == Mode::fwd_vjp   ? backward()
                                    : m == Mode::fwd_jvp ? tangent()
                                                         : std::vector<Gemm>{};
    g.insert(g.end(), extra.begin(), extra.end());
    return g;
  }
};

LoraData& lora_data(const LoraShape& s) { return cached<LoraData>(s.name, s); }

// The op on a fresh tape per iteration, as a model forward records it: W a
// frozen constant, x, A and B leaves that need gradients (their gradients
// are dropped by the sink) and carry tangents keyed 1, 2, 3.
void bm_lora_op(benchmark::State& st, LoraShape s, Mode mode) {
  LoraData& d = lora_data(s);
  const auto source = [&d](ep::LeafKey k) -> std::optional<ep::TensorView<const float>> {
    const TensorF* t = k == 1 ? &d.tx : k == 2 ? &d.ta : k == 3 ? &d.tb : nullptr;
    if (!t) return std::nullopt;
    return t->view();
  };
  for ([[maybe_unused]] auto _ : st) {
    TapeF tape;
    const ep::Var x = tape.leaf_ref(d.x, 1, discard_grad);
    const ep::Var w = tape.constant_ref(d.w);
    const ep::Var a = tape.leaf_ref(d.a, 2, discard_grad);
    const ep::Var b = tape.leaf_ref(d.b, 3, discard_grad);
    const ep::Var y = ep::lora_linear(tape, x, w, std::nullopt, a, b, d.scale);
    if (mode == Mode::fwd_vjp) tape.backward(y, d.dy);
    if (mode == Mode::fwd_jvp) tape.jvp(source);
    benchmark::DoNotOptimize(tape.value(y).data());
  }
  set_gflops(st, total_flops(d.floor(mode)));
}

void bm_lora_floor(benchmark::State& st, LoraShape s, Mode mode) { run_gemms(st, lora_data(s).floor(mode)); }

// The GEMM floor: y = x W^T (and dx = dy W), three ways.
enum class GemmImpl { blas, eigen, blas_1thread };
void bm_gemm(benchmark::State& st, LoraShape s, GemmImpl impl, bool dy_w) {
  LoraData& d = lora_data(s);
  const Gemm g = dy_w ? mm_nn(s.n, s.in, s.out, 1, d.dy.data(), d.w.data(), 0, d.c.data())
                      : mm_nt(s.n, s.out, s.in, 1, d.x.data(), d.w.data(), 0, d.y.data());
#if defined(ENTROPY_PROBE_USE_CBLAS) && defined(OPENBLAS_VERSION)
  const int threads = openblas_get_num_threads();
  if (impl == GemmImpl::blas_1thread) openblas_set_num_threads(1);
#else
  if (impl == GemmImpl::blas_1thread) {
    st.SkipWithError("needs OpenBLAS");
    return;
  }
#endif
  for ([[maybe_unused]] auto _ : st) {
    if (impl == GemmImpl::eigen)
      g.run_eigen();
    else
      g.run();
    benchmark::ClobberMemory();
  }
#if defined(ENTROPY_PROBE_USE_CBLAS) && defined(OPENBLAS_VERSION)
  openblas_set_num_threads(threads);
#endif
  set_gflops(st, g.flops());
}

// ---- causal attention ------------------------------------------------------------------

struct AttnShape {
  const char* name;
  index_t rows, tok, hq, hkv, dh;
};
const AttnShape kAttnLarge{"large", 4, 128, 8, 2, 64};
const AttnShape kAttnSmall{"small", 1, 8, 2, 1, 4};

struct AttnData {
  AttnShape s;
  index_t ldq, ldk;
  float scale;
  TensorF q, k, v, dout, tq, tk, tv;   // inputs, cotangent, tangents
  TensorF p, out, ds, gq, gk, gv, to;  // floor scratch
  std::vector<std::uint8_t> mask;      // row 1 (when present) starts with 3 padding keys

  explicit AttnData(const AttnShape& sh)
      : s(sh),
        ldq(sh.hq * sh.dh),
        ldk(sh.hkv * sh.dh),
        scale(1.0f / std::sqrt(float(sh.dh))),
        q(random_tensor({sh.rows, sh.tok, sh.hq * sh.dh}, 11)),
        k(random_tensor({sh.rows, sh.tok, sh.hkv * sh.dh}, 12)),
        v(random_tensor({sh.rows, sh.tok, sh.hkv * sh.dh}, 13)),
        dout(random_tensor({sh.rows, sh.tok, sh.hq * sh.dh}, 14)),
        tq(random_tensor({sh.rows, sh.tok, sh.hq * sh.dh}, 15)),
        tk(random_tensor({sh.rows, sh.tok, sh.hkv * sh.dh}, 16)),
        tv(random_tensor({sh.rows, sh.tok, sh.hkv * sh.dh}, 17)),
        p({sh.rows, sh.hq, sh.tok, sh.tok}),
        out({sh.rows, sh.tok, sh.hq * sh.dh}),
        ds({sh.tok, sh.tok}),
        gq({sh.rows, sh.tok, sh.hq * sh.dh}),
        gk({sh.rows, sh.tok, sh.hkv * sh.dh}),
        gv({sh.rows, sh.tok, sh.hkv * sh.dh}),
        to({sh.rows, sh.tok, sh.hq * sh.dh}),
        mask(static_cast<std::size_t>(sh.rows * sh.tok), 1) {
    if (sh.rows > 1)
      for (index_t t = 0; t < 3; ++t) mask[static_cast<std::size_t>(sh.tok + t)] = 0;
  }

  // The gemm calls of attention.hpp, per (row, head), in its order.
  std::vector<Gemm> floor(Mode mode) {
    const index_t T = s.tok, dh = s.dh, group = s.hq / s.hkv;
    std::vector<Gemm> g;
    auto qo = [&](index_t r, index_t h) { return r * T * ldq + h * dh; };
    auto ko = [&](index_t r, index_t h) { return r * T * ldk + (h / group) * dh; };
    auto po = [&](index_t r, index_t h) { return (r * s.hq + h) * T * T; };
    for (index_t r = 0; r < s.rows; ++r)  // S = scale Q K^T
      for (index_t h = 0; h < s.hq; ++h)
        g.push_back({false, true, T, T, dh, scale, q.data() + qo(r, h), ldq, k.data() + ko(r, h), ldk, 0,
                     p.data() + po(r, h), T});
    for (index_t r = 0; r < s.rows; ++r)  // O = P V
      for (index_t h = 0; h < s.hq; ++h)
        g.push_back({false, false, T, dh, T, 1, p.data() + po(r, h), T, v.data() + ko(r, h), ldk, 0,
                     out.data() + qo(r, h), ldq});
    for (index_t r = 0; r < s.rows && mode == Mode::fwd_vjp; ++r)
      for (index_t h = 0; h < s.hq; ++h) {
        const float* ph = p.data() + po(r, h);
        const float* goh = dout.data() + qo(r, h);
        g.push_back({true, false, T, dh, T, 1, ph, T, goh, ldq, 1, gv.data() + ko(r, h), ldk});        // dV += P^T dO
        g.push_back({false, true, T, T, dh, 1, goh, ldq, v.data() + ko(r, h), ldk, 0, ds.data(), T});  // dP
        g.push_back({false, false, T, dh, T, scale, ds.data(), T, k.data() + ko(r, h), ldk, 1, gq.data() + qo(r, h),
                     ldq});  // dQ += s dS K
        g.push_back({true, false, T, dh, T, scale, ds.data(), T, q.data() + qo(r, h), ldq, 1, gk.data() + ko(r, h),
                     ldk});  // dK += s dS^T Q
      }
    for (index_t r = 0; r < s.rows && mode == Mode::fwd_jvp; ++r)
      for (index_t h = 0; h < s.hq; ++h) {
        const float* ph = p.data() + po(r, h);
        float* toh = to.data() + qo(r, h);
        g.push_back({false, false, T, dh, T, 1, ph, T, tv.data() + ko(r, h), ldk, 1, toh, ldq});  // tO += P tV
        g.push_back({false, true, T, T, dh, scale, tq.data() + qo(r, h), ldq, k.data() + ko(r, h), ldk, 0, ds.data(),
                     T});  // tS = s tQ K^T
        g.push_back({false, true, T, T, dh, scale, q.data() + qo(r, h), ldq, tk.data() + ko(r, h), ldk, 1, ds.data(),
                     T});  // tS += s Q tK^T
        g.push_back({false, false, T, dh, T, 1, ds.data(), T, v.data() + ko(r, h), ldk, 1, toh, ldq});  // tO += tP V
      }
    return g;
  }
};

AttnData& attn_data(const AttnShape& s) { return cached<AttnData>(s.name, s); }

void bm_attn_op(benchmark::State& st, AttnShape s, Mode mode) {
  AttnData& d = attn_data(s);
  const auto source = [&d](ep::LeafKey k) -> std::optional<ep::TensorView<const float>> {
    const TensorF* t = k == 1 ? &d.tq : k == 2 ? &d.tk : k == 3 ? &d.tv : nullptr;
    if (!t) return std::nullopt;
    return t->view();
  };
  for ([[maybe_unused]] auto _ : st) {
    TapeF tape;
    const ep::Var q = tape.leaf_ref(d.q, 1, discard_grad);
    const ep::Var k = tape.leaf_ref(d.k, 2, discard_grad);
    const ep::Var v = tape.leaf_ref(d.v, 3, discard_grad);
    const ep::Var o = ep::causal_attention(tape, q, k, v, std::span<const std::uint8_t>(d.mask), s.hq, s.hkv);
    if (mode == Mode::fwd_vjp) tape.backward(o, d.dout);
    if (mode == Mode::fwd_jvp) tape.jvp(source);
    benchmark::DoNotOptimize(tape.value(o).data());
  }
  set_gflops(st, total_flops(d.floor(mode)));
}

void bm_attn_floor(benchmark::State& st, AttnShape s, Mode mode) { run_gemms(st, attn_data(s).floor(mode)); }

// ---- log_softmax_gather ------------------------------------------------------------------

struct LsgShape {
  const char* name;
  index_t n, vocab;
};
const LsgShape kLsgLarge{"large", 512, 32000};
const LsgShape kLsgSmall{"small", 4, 64};

struct LsgData {
  LsgShape s;
  TensorF z, g, gz;  // logits, cotangent of the output, floor scratch
  std::vector<std::int32_t> targets;

  explicit LsgData(const LsgShape& sh)
      : s(sh), z(random_tensor({sh.n, sh.vocab}, 21, 2.0)), g(random_tensor({sh.n}, 22)), gz({sh.n, sh.vocab}) {
    std::mt19937_64 rng(23);
    for (index_t i = 0; i < sh.n; ++i) targets.push_back(static_cast<std::int32_t>(rng() % std::uint64_t(sh.vocab)));
  }
};

LsgData& lsg_data(const LsgShape& s) { return cached<LsgData>(s.name, s); }

void bm_lsg_op(benchmark::State& st, LsgShape s, Mode mode) {
  LsgData& d = lsg_data(s);
  for ([[maybe_unused]] auto _ : st) {
    TapeF tape;
    const ep::Var z = tape.leaf_ref(d.z, 1, discard_grad);
    const ep::Var lp = ep::log_softmax_gather(tape, z, std::span<const std::int32_t>(d.targets), 1.0);
    if (mode == Mode::fwd_vjp) tape.backward(lp, d.g);
    benchmark::DoNotOptimize(tape.value(lp).data());
  }
  st.SetBytesProcessed(st.iterations() * d.z.numel() * index_t(sizeof(float)));
}

// Memory floors: one vectorised pass reading the logits, and one reading them
// while writing a same-sized output (what a backward into dz must do at least).
void bm_lsg_floor(benchmark::State& st, LsgShape s, bool write) {
  LsgData& d = lsg_data(s);
  const Eigen::Map<const Eigen::ArrayXf> z(d.z.data(), d.z.numel());
  Eigen::Map<Eigen::ArrayXf> gz(d.gz.data(), d.gz.numel());
  for ([[maybe_unused]] auto _ : st) {
    if (write) {
      gz = z * 0.5f;
      benchmark::ClobberMemory();
    } else {
      float sum = z.sum();
      benchmark::DoNotOptimize(sum);
    }
  }
  st.SetBytesProcessed(st.iterations() * d.z.numel() * index_t(sizeof(float)));
}

// ---- registration and the ratio table ------------------------------------------------------

const char* mode_name(Mode m) { return m == Mode::fwd ? "fwd" : m == Mode::fwd_vjp ? "fwd_vjp" : "fwd_jvp"; }

template <class Fn, class... Args>
void add(const std::string& name, Fn fn, Args... args) {
  benchmark::RegisterBenchmark(name.c_str(), fn, args...)->UseRealTime()->Unit(benchmark::kMillisecond);
}

void register_all() {
  for (const LoraShape& s : {kLoraLarge, kLoraSmall}) {
    for (auto [impl, label] : {std::pair{GemmImpl::blas, "blas"}, std::pair{GemmImpl::eigen, "eigen"},
                               std::pair{GemmImpl::blas_1thread, "blas_1thread"}}) {
      add(fmt::format("gemm/{}_xWt/{}", label, s.name), bm_gemm, s, impl, false);
      add(fmt::format("gemm/{}_dyW/{}", label, s.name), bm_gemm, s, impl, true);
    }
  }
  for (Mode m : {Mode::fwd, Mode::fwd_vjp, Mode::fwd_jvp}) {
    for (const LoraShape& s : {kLoraLarge, kLoraSmall}) {
      add(fmt::format("lora/{}/{}", mode_name(m), s.name), bm_lora_op, s, m);
      add(fmt::format("lora/floor_{}/{}", mode_name(m), s.name), bm_lora_floor, s, m);
    }
  }
  for (Mode m : {Mode::fwd, Mode::fwd_vjp, Mode::fwd_jvp}) {
    for (const AttnShape& s : {kAttnLarge, kAttnSmall}) {
      add(fmt::format("attn/{}/{}", mode_name(m), s.name), bm_attn_op, s, m);
      add(fmt::format("attn/floor_{}/{}", mode_name(m), s.name), bm_attn_floor, s, m);
    }
  }
  for (const LsgShape& s : {kLsgLarge, kLsgSmall}) {
    add(fmt::format("lsg/fwd/{}", s.name), bm_lsg_op, s, Mode::fwd);
    add(fmt::format("lsg/fwd_vjp/{}", s.name), bm_lsg_op, s, Mode::fwd_vjp);
    add(fmt::format("lsg/floor_read/{}", s.name), bm_lsg_floor, s, false);
    add(fmt::format("lsg/floor_read_write/{}", s.name), bm_lsg_floor, s, true);
  }
}

struct Ratio {
  std::string op, floor;
  double target;  // 0 = none
};

void print_ratios(const std::map<std::string, Times>& t) {
  const std::vector<Ratio> rows{
      {"gemm/eigen_xWt", "gemm/blas_xWt", 0},
      {"gemm/eigen_dyW", "gemm/blas_dyW", 0},
      {"gemm/blas_1thread_xWt", "gemm/blas_xWt", 0},
      {"gemm/eigen_xWt", "gemm/blas_1thread_xWt", 0},
      {"lora/fwd", "lora/floor_fwd", 0},
      {"lora/fwd_vjp", "lora/floor_fwd_vjp", 1.3},
      {"lora/fwd_jvp", "lora/floor_fwd_jvp", 0},
      {"attn/fwd", "attn/floor_fwd", 0},
      {"attn/fwd_vjp", "attn/floor_fwd_vjp", 0},
      {"attn/fwd_jvp", "attn/floor_fwd_jvp", 0},
      {"attn/fwd_vjp", "attn/floor_fwd", 0},
      {"lsg/fwd", "lsg/floor_read", 0},
      {"lsg/fwd_vjp", "lsg/floor_read_write", 0},
      {"lsg/fwd_vjp", "lsg/floor_read", 0},
  };
  fmt::print("\nMedian times, op / floor (wall: elapsed; cpu: main-thread CPU, see above):\n");
  fmt::print("{:<28} {:<28} {:>9} {:>9} {:>6} {:>6}  {}\n", "op", "floor", "op ms", "floor ms", "wall", "cpu",
             "target (wall)");
  for (const char* size : {"large", "small"}) {
    for (const Ratio& r : rows) {
      const auto a = t.find(r.op + "/" + size), b = t.find(r.floor + "/" + size);
      if (a == t.end() || b == t.end()) continue;
      const double wall = a->second.wall / b->second.wall, cpu = a->second.cpu / b->second.cpu;
      const std::string target =
          r.target > 0 ? fmt::format("<= {:.2f} {}", r.target, wall <= r.target ? "met" : "MISSED") : "";
      fmt::print("{:<28} {:<28} {:>9.3f} {:>9.3f} {:>6.2f} {:>6.2f}  {}\n", r.op + "/" + size, r.floor + "/" + size,
                 a->second.wall * 1e3, b->second.wall * 1e3, wall, cpu, target);
    }
  }
}

}  // namespace

int main(int argc, char** argv) { return ep_bench::run_main(argc, argv, register_all, print_ratios); }
