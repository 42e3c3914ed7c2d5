#include "../cuda/emulated_backend.hpp"
#include "../support/attention_case.hpp"
#include "../support/gradcheck.hpp"

#include <entropy_probe/tape/ops/attention.hpp>
#include <entropy_probe/tape/ops/flash_attention.hpp>

#include <cmath>
#include <cstdint>
#include <vector>

using namespace entropy_probe;
using namespace ep_test;

namespace {

std::vector<TensorD> random_qkv_tensors(const AttnCase& c, std::mt19937_64& rng) {
  return {random_tensor({c.r, c.t, c.hq * c.dh}, rng), random_tensor({c.r, c.t, c.hkv * c.dh}, rng),
          random_tensor({c.r, c.t, c.hkv * c.dh}, rng)};
}

// Value, gradients of <cot, out> and the tangent of out along `tangents`,
// from one tape in T, all as double.
struct AttnResult {
  std::vector<double> out, gq, gk, gv, tout;
};

// A tensor's or a tangent view's elements as doubles.
template <class Elements>
std::vector<double> as_double(const Elements& t) {
  const auto h = t.to_host();
  return {h.begin(), h.end()};
}

// A host double tensor as a T tensor on backend B.
template <class T, class B>
Tensor<T, B> on(const TensorD& x) {
  const std::vector<double> h = x.to_host();
  const std::vector<T> c(h.begin(), h.end());
  return Tensor<T, B>::from_host(x.shape(), c);
}

template <class T, class B = CpuBackend, class Op>
AttnResult run(const std::vector<TensorD>& qkv, const TensorD& cot, const std::vector<TensorD>& tangents, Op op) {
  Tape<T, B> tape;
  std::vector<Var> x;
  for (std::size_t i = 0; i < 3; ++i) {
    x.push_back(tape.input(on<T, B>(qkv[i])));
    tape.set_tangent(x[i], on<T, B>(tangents[i]));
  }
  Var o = op(tape, x[0], x[1], x[2]);
  tape.backward(o, on<T, B>(cot));
  tape.jvp();
  REQUIRE(tape.grad(x[0]));
  REQUIRE(tape.grad(x[1]));
  REQUIRE(tape.grad(x[2]));
  REQUIRE(tape.tangent(o));
  return {as_double(tape.value(o)), as_double(*tape.grad(x[0])), as_double(*tape.grad(x[1])),
          as_double(*tape.grad(x[2])), as_double(*tape.tangent(o))};
}

struct AttnErrors {
  double out, gq, gk, gv, tout;
  double max() const { return std::max({out, gq, gk, gv, tout}); }
};
// Each quantity's error relative to its largest reference magnitude, or to
// `floor` when that is larger.
AttnErrors errors(const AttnResult& a, const AttnResult& ref, double floor = 1e-12) {
  return {rel_err(a.out, ref.out, floor), rel_err(a.gq, ref.gq, floor), rel_err(a.gk, ref.gk, floor),
          rel_err(a.gv, ref.gv, floor), rel_err(a.tout, ref.tout, floor)};
}
double max_abs(const std::vector<double>& x) {
  double m = 0;
  for (double v : x) m = std::max(m, std::abs(v));
  return m;
}

// Padded and grouped-KV shapes, T below, at and off multiples of the tiles.
std::vector<AttnCase> parity_cases() {
  std::vector<std::uint8_t> m0(3 * 13, 1);
  for (int s = 0; s < 3; ++s) m0[static_cast<std::size_t>(s)] = 0;                  // row 0: left padding by 3
  for (int s = 13; s < 26; ++s) m0[static_cast<std::size_t>(s)] = 0;                // row 1: fully masked
  m0[static_cast<std::size_t>(26 + 6)] = m0[static_cast<std::size_t>(26 + 7)] = 0;  // row 2: middle padding
  std::vector<std::uint8_t> m1(2 * 10, 1);
  for (int s = 0; s < 5; ++s) m1[static_cast<std::size_t>(10 + s)] = 0;  // row 1: left padding past a tile
  return {
      {3, 13, 4, 2, 8, m0},  // Hq = 4, Hkv = 2
      {2, 10, 4, 1, 5, m1},  // Hkv = 1
      {1, 9, 3, 3, 3, {}},   // Hq = Hkv
      {2, 16, 2, 1, 4, {}},  // T a multiple of tiles 4 and 16
      {2, 1, 2, 1, 2, {}},   // T = 1
  };
}

}  // namespace

TEST_CASE("flash_causal_attention: equals causal_attention in double", "[ops][attention][flash]") {
  std::mt19937_64 rng(21);
  for (const AttnCase& c : parity_cases()) {
    const std::vector<std::uint8_t> mask = mask_of(c);
    const std::vector<TensorD> qkv = random_qkv_tensors(c, rng);
    const TensorD cot = random_tensor({c.r, c.t, c.hq * c.dh}, rng);
    const std::vector<TensorD> tan = random_qkv_tensors(c, rng);
    const AttnResult ref = run<double>(qkv, cot, tan, [&](Tape<double>& t, Var q, Var k, Var v) {
      return causal_attention(t, q, k, v, mask, c.hq, c.hkv);
    });
    for (index_t tile : {1, 3, 4, 5, 16, 128}) {
      CAPTURE(c.r, c.t, c.hq, c.hkv, c.dh, tile);
      const AttnErrors e = errors(run<double>(qkv, cot, tan,
                                              [&](Tape<double>& t, Var q, Var k, Var v) {
                                                return flash_causal_attention(t, q, k, v, mask, c.hq, c.hkv, 0.0, tile);
                                              }),
                                  ref);
      CAPTURE(e.out, e.gq, e.gk, e.gv, e.tout);
      CHECK(e.max() < 1e-12);
    }
  }
}

TEST_CASE("flash_causal_attention: all rows per batched call, as on a device", "[ops][attention][flash]") {
  // The emulated device backend (tests/cuda/emulated_backend.hpp) batches every
  // row of a tile pair into one call, in reverse item order, with blocked
  // reductions: the path CudaBackend takes.
  using Dev = ep_parity::EmulatedDeviceBackend;
  std::mt19937_64 rng(28);
  for (const AttnCase& c : parity_cases()) {
    const std::vector<std::uint8_t> mask = mask_of(c);
    const std::vector<TensorD> qkv = random_qkv_tensors(c, rng);
    const TensorD cot = random_tensor({c.r, c.t, c.hq * c.dh}, rng);
    const std::vector<TensorD> tan = random_qkv_tensors(c, rng);
    const AttnResult ref = run<double>(qkv, cot, tan, [&](Tape<double>& t, Var q, Var k, Var v) {
      return causal_attention(t, q, k, v, mask, c.hq, c.hkv);
    });
    for (index_t tile : {3, 16}) {
      CAPTURE(c.r, c.t, c.hq, c.hkv, c.dh, tile);
      const AttnErrors e =
          errors(run<double, Dev>(qkv, cot, tan,
                                  [&](Tape<double, Dev>& t, Var q, Var k, Var v) {
                                    return flash_causal_attention(t, q, k, v, mask, c.hq, c.hkv, 0.0, tile);
                                  }),
                 ref);
      CAPTURE(e.out, e.gq, e.gk, e.gv, e.tout);
      CHECK(e.max() < 1e-12);
    }
  }
}

TEST_CASE("flash_causal_attention: CPU results do not depend on the thread count", "[ops][attention][flash]") {
  // The CPU form hands tasks to whichever thread is free; each task writes
  // only its own rows, so 1 and 3 threads give the same bits. Tile 13 puts
  // a slot's scratch 338 floats after the last: unless each slot starts on a
  // cache line, the SIMD exp and sums peel differently per thread.
  std::mt19937_64 rng(29);
  const int saved_threads = CpuBackend::num_threads();
  std::vector<std::pair<AttnCase, index_t>> cases;
  for (const AttnCase& c : parity_cases()) cases.emplace_back(c, 3);
  cases.emplace_back(AttnCase{2, 40, 4, 2, 8, {}}, 13);
  for (const auto& [c, tile] : cases) {
    const std::vector<std::uint8_t> mask = mask_of(c);
    const std::vector<TensorD> qkv = random_qkv_tensors(c, rng);
    const TensorD cot = random_tensor({c.r, c.t, c.hq * c.dh}, rng);
    const std::vector<TensorD> tan = random_qkv_tensors(c, rng);
    auto flash = [&, tile = tile](Tape<float>& t, Var q, Var k, Var v) {
      return flash_causal_attention(t, q, k, v, mask, c.hq, c.hkv, 0.0, tile);
    };
    CpuBackend::set_num_threads(1);
    const AttnResult one = run<float>(qkv, cot, tan, flash);
    CpuBackend::set_num_threads(3);
    const AttnResult three = run<float>(qkv, cot, tan, flash);
    CAPTURE(c.r, c.t, c.hq, c.hkv, c.dh, tile);
    CHECK(one.out == three.out);
    CHECK(one.gq == three.gq);
    CHECK(one.gk == three.gk);
    CHECK(one.gv == three.gv);
    CHECK(one.tout == three.tout);
  }
  CpuBackend::set_num_threads(saved_threads);
}

TEST_CASE("flash_causal_attention: float agrees with double as closely as causal_attention",
          "[ops][attention][flash]") {
  // Both ops in float against causal_attention in double on the same
  // float-representable inputs. Float rounds each product term and partial
  // sum to ~6e-8 relative; over dot products of length Dh <= 8 and T <= 16
  // and the softmax VJP's difference dP - D, the reference op itself lands at
  // 0.3-2e-7 of the largest magnitude on these cases. The tiled op reorders
  // the same sums (online rescaling, per-tile partial products, D from
  // dO o O), so it must stay within a few times that: 1e-6, about 16 float
  // ulps of the largest magnitude. The
  // gradients of q and k are sums of P (dP - D), which cancel exactly where a
  // query sees one key (T = 1: they are 0); float leaves there a rounding of
  // dP's size, so errors are taken against at least the size of dP's terms,
  // that of dV = P^T dO.
  std::mt19937_64 rng(22);
  for (const AttnCase& c : parity_cases()) {
    const std::vector<std::uint8_t> mask = mask_of(c);
    std::vector<TensorD> qkv = random_qkv_tensors(c, rng);
    for (TensorD& x : qkv) x = x.cast<float>().cast<double>();
    const TensorD cot = random_tensor({c.r, c.t, c.hq * c.dh}, rng).cast<float>().cast<double>();
    std::vector<TensorD> tan = random_qkv_tensors(c, rng);
    for (TensorD& x : tan) x = x.cast<float>().cast<double>();
    auto reference = [&](auto& t, Var q, Var k, Var v) { return causal_attention(t, q, k, v, mask, c.hq, c.hkv); };
    const AttnResult exact = run<double>(qkv, cot, tan, reference);
    const double floor = max_abs(exact.gv);
    const AttnErrors ref_f = errors(run<float>(qkv, cot, tan, reference), exact, floor);
    for (index_t tile : {1, 4, 5, 128}) {
      CAPTURE(c.r, c.t, c.hq, c.hkv, c.dh, tile, ref_f.max());
      const AttnErrors e = errors(run<float>(qkv, cot, tan,
                                             [&](Tape<float>& t, Var q, Var k, Var v) {
                                               return flash_causal_attention(t, q, k, v, mask, c.hq, c.hkv, 0.0, tile);
                                             }),
                                  exact, floor);
      CAPTURE(e.out, e.gq, e.gk, e.gv, e.tout);
      CHECK(e.max() < 1e-6);
    }
  }
}

TEST_CASE("flash_causal_attention: VJP and JVP against finite differences", "[ops][attention][flash]") {
  std::mt19937_64 rng(23);
  const std::vector<AttnCase> cases = {
      {2, 5, 4, 2, 3, {}},
      {3, 1, 2, 2, 2, {1, 0, 1}},                             // T = 1 with a masked row
      {2, 3, 3, 1, 1, {1, 1, 1, 0, 1, 1}},                    // Dh = 1
      {2, 4, 4, 1, 2, {0, 0, 1, 1, 1, 0, 1, 1}},              // Hkv = 1; left and middle padding
      {3, 4, 2, 1, 2, {1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 1}},  // fully masked sequence 1
      {2, 7, 4, 2, 2, {0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1}},
  };
  for (const AttnCase& c : cases)
    for (index_t tile : {2, 3}) {
      CAPTURE(c.r, c.t, c.hq, c.hkv, c.dh, tile);
      const std::vector<std::uint8_t> mask = mask_of(c);
      std::vector<GradcheckInput> in;
      for (TensorD& x : random_qkv_tensors(c, rng)) in.push_back({x, true});
      require_gradcheck(in, [&](Tape<double>& t, const std::vector<Var>& v) {
        return flash_causal_attention(t, v[0], v[1], v[2], mask, c.hq, c.hkv, 0.0, tile);
      });
    }
}

TEST_CASE("flash_causal_attention: rules with only some operands differentiable, or one Var twice",
          "[ops][attention][flash]") {
  std::mt19937_64 rng(24);
  const AttnCase c{2, 5, 2, 2, 2, {0, 1, 1, 1, 1, 1, 1, 0, 1, 1}};
  const std::vector<std::uint8_t> mask = mask_of(c);
  struct Which {
    bool q, k, v;
  };
  for (Which w : {Which{true, false, false}, Which{false, true, false}, Which{false, false, true},
                  Which{true, true, false}, Which{false, true, true}}) {
    CAPTURE(w.q, w.k, w.v);
    const std::vector<TensorD> x = random_qkv_tensors(c, rng);
    require_gradcheck({{x[0], w.q}, {x[1], w.k}, {x[2], w.v}}, [&](Tape<double>& t, const std::vector<Var>& v) {
      return flash_causal_attention(t, v[0], v[1], v[2], mask, c.hq, c.hkv, 0.0, 2);
    });
  }
  // Self-attention on one tensor (Hq = Hkv): q, k and v share one gradient
  // buffer, written by all three products.
  for (int pattern = 0; pattern < 3; ++pattern) {
    CAPTURE(pattern);
    const std::vector<TensorD> x = random_qkv_tensors(c, rng);
    require_gradcheck({{x[0], true}, {x[1], true}}, [&](Tape<double>& t, const std::vector<Var>& v) {
      if (pattern == 0) return flash_causal_attention(t, v[0], v[1], v[1], mask, c.hq, c.hkv, 0.0, 2);
      if (pattern == 1) return flash_causal_attention(t, v[0], v[0], v[1], mask, c.hq, c.hkv, 0.0, 2);
      return flash_causal_attention(t, v[0], v[1], v[0], mask, c.hq, c.hkv, 0.0, 2);
    });
  }
}

TEST_CASE("flash_causal_attention: an explicit scale multiplies the scores", "[ops][attention][flash]") {
  // scale s on q equals the default 1/sqrt(Dh) on q * s sqrt(Dh): checked
  // against causal_attention, whose scale is the default.
  std::mt19937_64 rng(25);
  const AttnCase c{2, 6, 4, 2, 4, {0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1}};
  const std::vector<std::uint8_t> mask = mask_of(c);
  const double s = 0.37;
  const std::vector<TensorD> x = random_qkv_tensors(c, rng);
  TensorD q_scaled = x[0];
  for (index_t i = 0; i < q_scaled.numel(); ++i) q_scaled[i] *= s * std::sqrt(static_cast<double>(c.dh));
  Tape<double> ta, tb;
  Var a = flash_causal_attention(ta, ta.input(x[0]), ta.input(x[1]), ta.input(x[2]), mask, c.hq, c.hkv, s, 4);
  Var b = causal_attention(tb, tb.input(q_scaled), tb.input(x[1]), tb.input(x[2]), mask, c.hq, c.hkv);
  CHECK(rel_err(ta.value(a).to_host(), tb.value(b).to_host()) < 1e-13);
  std::vector<GradcheckInput> in;
  for (const TensorD& t : x) in.push_back({t, true});
  require_gradcheck(in, [&](Tape<double>& t, const std::vector<Var>& v) {
    return flash_causal_attention(t, v[0], v[1], v[2], mask, c.hq, c.hkv, s, 4);
  });
}

TEST_CASE("flash_causal_attention: queries with no allowed key give exact zeros", "[ops][attention][flash]") {
  // Row 0 is left-padded past the first tile (queries 0..4 see no key); row 1 is all padding.
  std::mt19937_64 rng(26);
  const AttnCase c{2, 8, 2, 1, 3, {0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0}};
  const std::vector<std::uint8_t> mask = mask_of(c);
  const std::vector<TensorD> qkv = random_qkv_tensors(c, rng);
  const AttnResult r = run<double>(qkv, random_tensor({c.r, c.t, c.hq * c.dh}, rng), random_qkv_tensors(c, rng),
                                   [&](Tape<double>& t, Var q, Var k, Var v) {
                                     return flash_causal_attention(t, q, k, v, mask, c.hq, c.hkv, 0.0, 3);
                                   });
  const index_t qw = c.hq * c.dh, kw = c.hkv * c.dh;
  for (std::size_t i = 0; i < r.out.size(); ++i) {
    REQUIRE(std::isfinite(r.out[i]));
    REQUIRE(std::isfinite(r.gq[i]));
    REQUIRE(std::isfinite(r.tout[i]));
    const index_t row = static_cast<index_t>(i) / (c.t * qw), t = (static_cast<index_t>(i) / qw) % c.t;
    if (row == 1 || t < 5) {
      CHECK(r.out[i] == 0.0);
      CHECK(r.gq[i] == 0.0);
      CHECK(r.tout[i] == 0.0);
    } else {
      CHECK(r.out[i] != 0.0);
    }
  }
  // Padding keys are never attended to, so they receive no gradient.
  for (std::size_t i = 0; i < r.gk.size(); ++i) {
    REQUIRE(std::isfinite(r.gk[i]));
    REQUIRE(std::isfinite(r.gv[i]));
    const index_t row = static_cast<index_t>(i) / (c.t * kw), s = (static_cast<index_t>(i) / kw) % c.t;
    if (!mask[static_cast<std::size_t>(row * c.t + s)]) {
      CHECK(r.gk[i] == 0.0);
      CHECK(r.gv[i] == 0.0);
    } else {
      CHECK(r.gv[i] != 0.0);
    }
  }
}

TEST_CASE("flash_causal_attention: usage errors name the problem", "[ops][attention][flash]") {
  std::mt19937_64 rng(27);
  Tape<double> t;
  Var q = t.input(random_tensor({2, 3, 8}, rng));
  Var k = t.input(random_tensor({2, 3, 4}, rng));
  Var v = t.input(random_tensor({2, 3, 4}, rng));
  Var k_bad = t.input(random_tensor({2, 3, 6}, rng));
  Var q_flat = t.input(random_tensor({6, 8}, rng));
  const std::vector<std::uint8_t> mask(6, 1), short_mask(5, 1);

  CHECK_NOTHROW(flash_causal_attention(t, q, k, v, mask, 4, 2));
  CHECK_THROWS_WITH(flash_causal_attention(t, q, k, v, mask, 4, 3), Catch::Contains("not a multiple of n_kv_heads"));
  CHECK_THROWS_WITH(flash_causal_attention(t, q_flat, k, v, mask, 4, 2), Catch::Contains("expected [R, T, Hq*Dh]"));
  CHECK_THROWS_WITH(flash_causal_attention(t, q, k_bad, v, mask, 4, 2), Catch::Contains("k has shape [2, 3, 6]"));
  CHECK_THROWS_WITH(flash_causal_attention(t, q, k, k_bad, mask, 4, 2), Catch::Contains("v has shape [2, 3, 6]"));
  CHECK_THROWS_WITH(flash_causal_attention(t, q, k, v, short_mask, 4, 2), Catch::Contains("key_mask has 5 entries"));
  CHECK_THROWS_WITH(flash_causal_attention(t, q, k, v, mask, 3, 1),
                    Catch::Contains("not a positive multiple of n_heads"));
  CHECK_THROWS_WITH(flash_causal_attention(t, q, k, v, mask, 0, 1), Catch::Contains("must be positive"));
  CHECK_THROWS_WITH(flash_causal_attention(t, q, k, v, mask, 4, 2, 0.0, 0), Catch::Contains("tile 0 must be positive"));
  CHECK_THROWS_WITH(flash_causal_attention(t, q, k, v, mask, 4, 2, HUGE_VAL),
                    Catch::Contains("must be finite and positive"));
  CHECK_THROWS_AS(flash_causal_attention(t, q, k, v, short_mask, 4, 2), UsageError);
}
