#include "../support/gradcheck.hpp"

#include <entropy_probe/tape/ops/elementwise.hpp>
#include <entropy_probe/tape/ops/embedding.hpp>
#include <entropy_probe/tape/ops/linear.hpp>
#include <entropy_probe/tape/ops/lm_head_logprob.hpp>
#include <entropy_probe/tape/ops/logprob.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

using namespace entropy_probe;
using namespace ep_test;

namespace {

// Value, gradients of h and W for a cotangent, and the tangent for tangents
// of h and W, of one graph out = build(tape, h, W), in double.
struct Outcome {
  std::vector<double> value, grad_h, grad_w, tangent;
};

template <class V>
std::vector<double> to_double(const V& v) {
  return std::vector<double>(v.begin(), v.end());
}

struct Point {
  TensorD h, w, th, tw, cot;
};

template <class T, class Build>
Outcome run(const Point& p, Build build) {
  Tape<T> tape;
  Var h = tape.input(p.h.cast<T>());
  Var w = tape.input(p.w.cast<T>());
  Var out = build(tape, h, w);
  tape.set_tangent(h, p.th.cast<T>());
  tape.set_tangent(w, p.tw.cast<T>());
  tape.backward(out, p.cot.cast<T>());
  tape.jvp();
  Outcome o;
  o.value = to_double(tape.value(out).to_host());
  REQUIRE(tape.grad(h));
  REQUIRE(tape.grad(w));
  REQUIRE(tape.tangent(out));
  o.grad_h = to_double(tape.grad(h)->to_host());
  o.grad_w = to_double(tape.grad(w)->to_host());
  o.tangent = to_double(tape.tangent(out)->to_host());
  return o;
}

Point random_point(index_t m, index_t d, index_t vocab, std::mt19937_64& rng) {
  return {random_tensor({m, d}, rng), random_tensor({vocab, d}, rng, 0.7), random_tensor({m, d}, rng),
          random_tensor({vocab, d}, rng), random_tensor({m}, rng)};
}

// Largest relative error over the four quantities, each against the reference.
double max_err(const Outcome& a, const Outcome& ref) {
  return std::max({rel_err(a.value, ref.value), rel_err(a.grad_h, ref.grad_h), rel_err(a.grad_w, ref.grad_w),
                   rel_err(a.tangent, ref.tangent)});
}

}  // namespace

TEST_CASE("lm_head_logprob equals linear + log_softmax_gather in double, for every chunk size", "[ops][lm_head]") {
  std::mt19937_64 rng(41);
  const index_t m = 7, d = 6, vocab = 50;
  // Rows 0-1 (a whole chunk of 2) and row 5 are unscored.
  const std::vector<std::int32_t> targets{-1, -1, 3, 49, 0, -1, 17};
  for (double tau : {1.0, 0.7, 2.5}) {
    const Point p = random_point(m, d, vocab, rng);
    const Outcome ref = run<double>(
        p, [&](Tape<double>& t, Var h, Var w) { return log_softmax_gather(t, linear(t, h, w), targets, tau); });
    for (index_t chunk : {1, 2, 3, 4, 6, 7, 11, 0}) {
      CAPTURE(tau, chunk);
      const Outcome got =
          run<double>(p, [&](Tape<double>& t, Var h, Var w) { return lm_head_logprob(t, h, w, targets, tau, chunk); });
      CHECK(max_err(got, ref) < 1e-12);
      for (index_t i : {0, 1, 5}) {  // unscored: exactly zero value, gradient and tangent
        CHECK(got.value[static_cast<std::size_t>(i)] == 0.0);
        CHECK(got.tangent[static_cast<std::size_t>(i)] == 0.0);
        for (index_t j = 0; j < d; ++j) CHECK(got.grad_h[static_cast<std::size_t>(i * d + j)] == 0.0);
      }
    }
  }
}

TEST_CASE("lm_head_logprob and log_softmax_gather: row entropies against a direct double computation",
          "[ops][lm_head][entropy]") {
  std::mt19937_64 rng(43);
  const index_t m = 7, d = 6, vocab = 50;
  const std::vector<std::int32_t> targets{-1, -1, 3, 49, 0, -1, 17};
  for (double tau : {1.0, 0.7, 2.5}) {
    const Point p = random_point(m, d, vocab, rng);
    // -sum_v p_v log p_v with p = softmax(h W^T / tau), by plain loops.
    std::vector<double> want(static_cast<std::size_t>(m), 0.0);
    for (index_t i = 0; i < m; ++i) {
      if (targets[static_cast<std::size_t>(i)] < 0) continue;
      std::vector<double> z(static_cast<std::size_t>(vocab));
      double mx = -std::numeric_limits<double>::infinity();
      for (index_t v = 0; v < vocab; ++v) {
        double s = 0;
        for (index_t k = 0; k < d; ++k) s += p.h[i * d + k] * p.w[v * d + k];
        z[static_cast<std::size_t>(v)] = s / tau;
        mx = std::max(mx, s / tau);
      }
      double total = 0;
      for (double zv : z) total += std::exp(zv - mx);
      for (double zv : z) {
        const double logp = zv - mx - std::log(total);
        want[static_cast<std::size_t>(i)] -= std::exp(logp) * logp;
      }
    }
    REQUIRE(*std::min_element(want.begin() + 2, want.begin() + 5) > 0.1);  // not a degenerate distribution
    auto check = [&](const Tensor<acc_t, CpuBackend>& got) {
      REQUIRE(got.numel() == m);
      const std::vector<double> g = got.to_host();
      CHECK(rel_err(g, want) < 1e-12);
      for (index_t i : {0, 1, 5}) CHECK(g[static_cast<std::size_t>(i)] == 0.0);  // unscored rows
    };
    for (index_t chunk : {1, 2, 3, 7, 0}) {
      CAPTURE(tau, chunk);
      Tensor<acc_t, CpuBackend> ent;
      Tape<double> t;
      const Var out = lm_head_logprob(t, t.input(p.h), t.input(p.w), targets, tau, chunk, &ent);
      check(ent);
      // The log-probabilities are the op's without the entropy.
      Tape<double> t2;
      const Var plain = lm_head_logprob(t2, t2.input(p.h), t2.input(p.w), targets, tau, chunk);
      CHECK(t.value(out).to_host() == t2.value(plain).to_host());
    }
    Tensor<acc_t, CpuBackend> ent;
    Tape<double> t;
    log_softmax_gather(t, linear(t, t.input(p.h), t.input(p.w)), targets, tau, &ent);
    CAPTURE(tau);
    check(ent);
  }
}

TEST_CASE("lm_head_logprob with a tied weight: W is also the embedding table", "[ops][lm_head]") {
  std::mt19937_64 rng(42);
  const index_t m = 5, d = 4, vocab = 9;
  const std::vector<std::int32_t> tokens{2, 8, 0, 2, 5};
  const std::vector<std::int32_t> targets{8, 2, -1, 0, 5};
  const double tau = 0.8;
  // x = embedding(W, tokens) + h: W reaches the output through both uses.
  auto features = [&](Tape<double>& t, Var h, Var w) { return add(t, embedding(t, w, tokens), h); };
  const Point p = random_point(m, d, vocab, rng);
  const Outcome ref = run<double>(p, [&](Tape<double>& t, Var h, Var w) {
    return log_softmax_gather(t, linear(t, features(t, h, w), w), targets, tau);
  });
  for (index_t chunk : {1, 2, 3, 0}) {
    CAPTURE(chunk);
    auto build = [&](Tape<double>& t, Var h, Var w) {
      return lm_head_logprob(t, features(t, h, w), w, targets, tau, chunk);
    };
    CHECK(max_err(run<double>(p, build), ref) < 1e-12);
    require_gradcheck({{p.h}, {p.w}}, [&](Tape<double>& t, const std::vector<Var>& v) { return build(t, v[0], v[1]); });
  }
}

TEST_CASE("lm_head_logprob: VJP and JVP against finite differences", "[ops][lm_head]") {
  std::mt19937_64 rng(43);
  struct Case {
    Shape h_shape;
    index_t vocab;
    std::vector<std::int32_t> targets;
    double tau;
    index_t chunk;
  };
  for (const Case& c : {Case{{5, 4}, 9, {3, 8, 0, 2, 1}, 1.0, 2}, Case{{5, 4}, 9, {-1, 8, -1, -1, 4}, 0.6, 2},
                        Case{{2, 3, 3}, 7, {6, -1, 0, 1, -1, 2}, 1.7, 4}, Case{{3, 2}, 1, {0, -1, 0}, 1.0, 0},
                        Case{{4, 3}, 6, {-1, -1, -1, -1}, 1.0, 3}, Case{{1, 5}, 8, {7}, 0.9, 1}}) {
    CAPTURE(shape_str(c.h_shape), c.vocab, c.tau, c.chunk);
    const index_t d = c.h_shape.back();
    auto build = [&](Tape<double>& t, const std::vector<Var>& v) {
      return lm_head_logprob(t, v[0], v[1], c.targets, c.tau, c.chunk);
    };
    const TensorD h = random_tensor(c.h_shape, rng), w = random_tensor({c.vocab, d}, rng);
    require_gradcheck({{h}, {w}}, build);
    require_gradcheck({{h}, {w, false}}, build);  // frozen lm_head: no dW work
    require_gradcheck({{h, false}, {w}}, build);
  }
}

TEST_CASE("lm_head_logprob in float agrees with the double reference", "[ops][lm_head]") {
  std::mt19937_64 rng(44);
  const index_t m = 9, d = 32;
  std::vector<std::int32_t> targets{0, 999, 123, -1, 500, 42, 7, -1, 998};
  // A vocabulary of Qwen2's size too: J's product sums over all of it in float.
  for (auto [vocab, tau] : {std::pair<index_t, double>{1000, 1.0}, {1000, 0.7}, {151936, 1.0}}) {
    Point p = random_point(m, d, vocab, rng);
    // Float-representable inputs, so the comparison sees only the op's own rounding.
    for (TensorD* x : {&p.h, &p.w, &p.th, &p.tw, &p.cot}) *x = x->cast<float>().cast<double>();
    const Outcome ref = run<double>(
        p, [&](Tape<double>& t, Var h, Var w) { return log_softmax_gather(t, linear(t, h, w), targets, tau); });
    const Outcome unfused = run<float>(
        p, [&](Tape<float>& t, Var h, Var w) { return log_softmax_gather(t, linear(t, h, w), targets, tau); });
    for (index_t chunk : {1, 4, 0}) {
      const Outcome got =
          run<float>(p, [&](Tape<float>& t, Var h, Var w) { return lm_head_logprob(t, h, w, targets, tau, chunk); });
      const double err = max_err(got, ref), err_unfused = max_err(unfused, ref);
      CAPTURE(vocab, tau, chunk, err, err_unfused);
      // Float logits of a d = 32 product carry ~sqrt(d) eps_f |z| ~ 1e-6 of
      // error relative to the largest entry, and so do p and the products
      // back through W (the products over V in float, the softmax sums in
      // double). 1e-5 is that with margin, and the fused path must be as
      // accurate as the one it replaces.
      CHECK(err < 1e-5);
      CHECK(err < 2 * err_unfused);
    }
  }
}

TEST_CASE("lm_head_logprob: the default chunk holds at most kLmHeadChunkBytes of logits", "[ops][lm_head]") {
  CHECK(lm_head_chunk_rows(151936, sizeof(float)) == 441);
  CHECK(lm_head_chunk_rows(151936, sizeof(double)) == 220);
  CHECK(static_cast<std::size_t>(lm_head_chunk_rows(1000, sizeof(float))) * 1000 * sizeof(float) <= kLmHeadChunkBytes);
  CHECK(lm_head_chunk_rows(std::int64_t{1} << 40, sizeof(float)) == 1);  // a row too large still makes a chunk
  CHECK(lm_head_chunk_rows(151936, sizeof(float), 3) == 3);
}

TEST_CASE("lm_head_logprob: usage errors name the problem", "[ops][lm_head]") {
  std::mt19937_64 rng(45);
  Tape<double> t;
  Var h = t.input(random_tensor({3, 4}, rng));
  Var w = t.input(random_tensor({6, 4}, rng));
  Var w5 = t.input(random_tensor({6, 5}, rng));
  Var w1 = t.input(random_tensor({6}, rng));
  const std::vector<std::int32_t> ok{0, 5, -1}, bad{0, 1, 6}, short_targets{0, 1};
  const double inf = std::numeric_limits<double>::infinity();
  CHECK_NOTHROW(lm_head_logprob(t, h, w, ok));
  CHECK_THROWS_WITH(lm_head_logprob(t, h, w, bad),
                    Catch::Contains("target[2] = 6 is out of range") && Catch::Contains("vocabulary size 6"));
  CHECK_THROWS_WITH(lm_head_logprob(t, h, w, short_targets), Catch::Contains("2 targets for 3 rows"));
  CHECK_THROWS_WITH(lm_head_logprob(t, h, w5, ok), Catch::Contains("expected [..., 5]"));
  CHECK_THROWS_WITH(lm_head_logprob(t, h, w1, ok), Catch::Contains("expected [V, d]"));
  for (double tau : {0.0, -1.0, inf, std::numeric_limits<double>::quiet_NaN()}) {
    CAPTURE(tau);
    CHECK_THROWS_AS(lm_head_logprob(t, h, w, ok, tau), UsageError);
    CHECK_THROWS_WITH(lm_head_logprob(t, h, w, ok, tau), Catch::Contains("temperature must be positive and finite"));
  }
}
