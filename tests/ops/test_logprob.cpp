#include "../support/gradcheck.hpp"

#include <entropy_probe/tape/ops/logprob.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

using namespace entropy_probe;
using namespace ep_test;

namespace {

// log_softmax(z[i, :] / tau)[target] written out directly (no max shift:
// callers keep the logits small).
double direct_log_softmax(const TensorD& z, index_t i, index_t vocab, index_t target, double tau) {
  double denom = 0;
  for (index_t j = 0; j < vocab; ++j) denom += std::exp(z[i * vocab + j] / tau);
  return std::log(std::exp(z[i * vocab + target] / tau) / denom);
}

}  // namespace

TEST_CASE("log_softmax_gather: VJP and JVP against finite differences", "[ops][logprob]") {
  std::mt19937_64 rng(21);
  struct Case {
    Shape shape;
    std::vector<std::int32_t> targets;
    double tau;
  };
  for (const Case& c :
       {Case{{4, 7}, {3, 6, 0, 2}, 1.0}, Case{{4, 7}, {3, -1, 0, 6}, 0.7}, Case{{2, 3, 5}, {4, -1, -1, 0, 2, 1}, 2.5},
        Case{{1, 9}, {8}, 1.3}, Case{{3, 1}, {0, -1, 0}, 0.5}, Case{{5}, {2}, 1.0}}) {
    CAPTURE(shape_str(c.shape), c.tau);
    require_gradcheck({{random_tensor(c.shape, rng, 2.0)}}, [&](Tape<double>& t, const std::vector<Var>& v) {
      return log_softmax_gather(t, v[0], c.targets, c.tau);
    });
  }
}

TEST_CASE("log_softmax_gather: values equal a direct computation", "[ops][logprob]") {
  std::mt19937_64 rng(22);
  const index_t n = 5, vocab = 11;
  const std::vector<std::int32_t> targets{0, 10, 4, -1, 7};
  for (double tau : {1.0, 0.6, 3.0}) {
    CAPTURE(tau);
    const TensorD z = random_tensor({n, vocab}, rng, 1.5);
    Tape<double> tape;
    Var out = log_softmax_gather(tape, tape.input(z), targets, tau);
    REQUIRE(tape.shape(out) == Shape{n});
    for (index_t i = 0; i < n; ++i) {
      CAPTURE(i);
      const double ref = targets[static_cast<std::size_t>(i)] < 0
                             ? 0.0
                             : direct_log_softmax(z, i, vocab, targets[static_cast<std::size_t>(i)], tau);
      CHECK(tape.value(out)[i] == Approx(ref).epsilon(1e-14).margin(1e-14));
    }
  }
}

TEST_CASE("log_softmax_gather: exp of each row sums to 1, even for huge logits", "[ops][logprob]") {
  std::mt19937_64 rng(23);
  const index_t n = 3, vocab = 6;
  TensorD z = random_tensor({n, vocab}, rng, 1.0);
  for (index_t j = 0; j < vocab; ++j) z[2 * vocab + j] += 900.0;  // exp would overflow unshifted
  for (double tau : {1.0, 0.25}) {
    std::vector<double> total(static_cast<std::size_t>(n), 0.0);
    for (std::int32_t j = 0; j < vocab; ++j) {
      Tape<double> tape;
      const std::vector<std::int32_t> targets(static_cast<std::size_t>(n), j);
      Var out = log_softmax_gather(tape, tape.input(z), targets, tau);
      for (index_t i = 0; i < n; ++i) {
        REQUIRE(std::isfinite(tape.value(out)[i]));
        CHECK(tape.value(out)[i] <= 0.0);
        total[static_cast<std::size_t>(i)] += std::exp(tape.value(out)[i]);
      }
    }
    // Log-probs carry an absolute rounding error of order eps * |z / tau|
    // (here ~4e3), so the sum is 1 to ~1e-12, not to the last bit.
    for (double s : total) {
      CAPTURE(tau, s - 1.0);
      CHECK(std::abs(s - 1.0) < 1e-11);
    }
  }
}

TEST_CASE("log_softmax_gather: unscored rows give 0, no gradient, no tangent", "[ops][logprob]") {
  std::mt19937_64 rng(24);
  const index_t vocab = 5;
  const std::vector<std::int32_t> targets{-1, 2, -7};
  Tape<double> tape;
  Var z = tape.input(random_tensor({3, vocab}, rng));
  Var out = log_softmax_gather(tape, z, targets, 0.8);
  tape.set_tangent(z, random_tensor({3, vocab}, rng));
  tape.backward(out, TensorD::full({3}, 1.0));
  tape.jvp();
  const TensorD* g = tape.grad(z);
  const auto* t = tape.tangent(out);
  REQUIRE(g);
  REQUIRE(t);
  CHECK(tape.value(out)[0] == 0.0);
  CHECK(tape.value(out)[2] == 0.0);
  CHECK(tape.value(out)[1] < 0.0);
  CHECK((*t)[0] == 0.0);
  CHECK((*t)[2] == 0.0);
  CHECK((*t)[1] != 0.0);
  double row_sum = 0;
  for (index_t j = 0; j < vocab; ++j) {
    CHECK((*g)[0 * vocab + j] == 0.0);
    CHECK((*g)[2 * vocab + j] == 0.0);
    CHECK((*g)[1 * vocab + j] != 0.0);
    row_sum += (*g)[1 * vocab + j];
  }
  CHECK(row_sum == Approx(0.0).margin(1e-15));  // onehot - p sums to zero
}

TEST_CASE("log_softmax_gather: float forward agrees with double", "[ops][logprob]") {
  std::mt19937_64 rng(25);
  const index_t n = 6, vocab = 1000;
  std::vector<std::int32_t> targets{0, 999, 123, -1, 500, 42};
  const TensorD z = random_tensor({n, vocab}, rng, 3.0);
  for (double tau : {1.0, 0.7}) {
    Tape<double> td;
    Var od = log_softmax_gather(td, td.input(z), targets, tau);
    Tape<float> tf;
    Var of = log_softmax_gather(tf, tf.input(z.cast<float>()), targets, tau);
    const std::vector<float> f = tf.value(of).to_host();
    const std::vector<double> fd(f.begin(), f.end());
    const double err = rel_err(fd, td.value(od).to_host());
    CAPTURE(tau, err);
    CHECK(err < 1e-5);
  }
}

TEST_CASE("log_softmax_gather: usage errors name the problem", "[ops][logprob]") {
  std::mt19937_64 rng(26);
  Tape<double> t;
  Var z = t.input(random_tensor({3, 4}, rng));
  Var empty_vocab = t.input(TensorD({3, 0}));
  const std::vector<std::int32_t> ok{0, 3, -1}, bad{0, 1, 4}, short_targets{0, 1};
  const double inf = std::numeric_limits<double>::infinity();

  CHECK_NOTHROW(log_softmax_gather(t, z, ok));
  CHECK_THROWS_AS(log_softmax_gather(t, z, bad), UsageError);
  CHECK_THROWS_WITH(log_softmax_gather(t, z, bad),
                    Catch::Contains("target[2] = 4 is out of range") && Catch::Contains("vocabulary size 4"));
  CHECK_THROWS_WITH(log_softmax_gather(t, z, short_targets), Catch::Contains("2 targets for 3 rows"));
  CHECK_THROWS_WITH(log_softmax_gather(t, empty_vocab, ok), Catch::Contains("V >= 1"));
  for (double tau : {0.0, -1.0, inf, std::numeric_limits<double>::quiet_NaN()}) {
    CAPTURE(tau);
    CHECK_THROWS_AS(log_softmax_gather(t, z, ok, tau), UsageError);
    CHECK_THROWS_WITH(log_softmax_gather(t, z, ok, tau), Catch::Contains("temperature must be positive and finite"));
  }
}

TEST_CASE("masked_seq_sum: VJP and JVP against finite differences", "[ops][logprob]") {
  std::mt19937_64 rng(27);
  struct Case {
    Shape shape;
    index_t rows;
  };
  for (const Case& c : {Case{{3, 5}, 3}, Case{{12}, 4}, Case{{1, 1}, 1}, Case{{2, 1}, 2}, Case{{6}, 1}}) {
    CAPTURE(shape_str(c.shape), c.rows);
    const TensorD w = random_tensor({numel_of(c.shape)}, rng);
    const std::vector<double> weights = w.to_host();
    require_gradcheck({{random_tensor(c.shape, rng)}}, [&](Tape<double>& t, const std::vector<Var>& v) {
      return masked_seq_sum(t, v[0], weights, c.rows);
    });
  }
}

TEST_CASE("masked_seq_sum: values equal a direct sum", "[ops][logprob]") {
  const TensorD x = TensorD::from_host({2, 4}, std::vector<double>{1, 2, 3, 4, 10, 20, 30, 40});
  const std::vector<double> w{0, 1, 1, 0, 1, 0, 0.5, -2};
  Tape<double> tape;
  Var out = masked_seq_sum(tape, tape.input(x), w, 2);
  REQUIRE(tape.shape(out) == Shape{2});
  CHECK(tape.value(out)[0] == 5.0);
  CHECK(tape.value(out)[1] == 10.0 + 15.0 - 80.0);
}

TEST_CASE("masked_seq_sum: usage errors name the problem", "[ops][logprob]") {
  std::mt19937_64 rng(28);
  Tape<double> t;
  Var x = t.input(random_tensor({3, 4}, rng));
  Var x3 = t.input(random_tensor({3, 2, 2}, rng));
  const std::vector<double> w12(12, 1.0), w11(11, 1.0);
  CHECK_NOTHROW(masked_seq_sum(t, x, w12, 3));
  CHECK_THROWS_AS(masked_seq_sum(t, x, w11, 3), UsageError);
  CHECK_THROWS_WITH(masked_seq_sum(t, x, w11, 3), Catch::Contains("11 weights for x of shape [3, 4]"));
  CHECK_THROWS_WITH(masked_seq_sum(t, x, w12, 4), Catch::Contains("x has shape [3, 4], expected [4, T]"));
  CHECK_THROWS_WITH(masked_seq_sum(t, x, w12, 5), Catch::Contains("expected [5, T] or [5*T]"));
  CHECK_THROWS_WITH(masked_seq_sum(t, x3, w12, 3), Catch::Contains("x has shape [3, 2, 2]"));
  CHECK_THROWS_WITH(masked_seq_sum(t, x, w12, 0), Catch::Contains("rows must be positive"));
}

TEST_CASE("log_softmax_gather + masked_seq_sum give the sequence log-probability", "[ops][logprob]") {
  // docs/math.md: S[r] = sum over t in gen(r) of log_softmax(z[r, t-1] / tau)[seq[r, t]],
  // gen(r) = { t : p <= t < T, m[r, t] = 1 }. Row 1 is left-padded.
  std::mt19937_64 rng(29);
  const index_t rows = 2, len = 6, vocab = 5, prompt = 3;
  const double tau = 0.9;
  const std::vector<std::int32_t> seq{1, 4, 2, 0, 3, 3, /**/ 0, 0, 2, 1, 4, 0};
  const std::vector<std::uint8_t> m{1, 1, 1, 1, 1, 1, /**/ 0, 1, 1, 1, 1, 0};
  auto gen = [&](index_t r, index_t t) { return t >= prompt && t < len && m[static_cast<std::size_t>(r * len + t)]; };

  // The caller's side of the causal shift: position t scores the token at t+1.
  std::vector<std::int32_t> targets(static_cast<std::size_t>(rows * len), -1);
  std::vector<double> weights(static_cast<std::size_t>(rows * len), 0.0);
  for (index_t r = 0; r < rows; ++r)
    for (index_t t = 0; t + 1 < len; ++t)
      if (gen(r, t + 1)) {
        targets[static_cast<std::size_t>(r * len + t)] = seq[static_cast<std::size_t>(r * len + t + 1)];
        weights[static_cast<std::size_t>(r * len + t)] = 1.0;
      }

  const TensorD z = random_tensor({rows, len, vocab}, rng);
  Tape<double> tape;
  Var s = masked_seq_sum(tape, log_softmax_gather(tape, tape.input(z), targets, tau), weights, rows);
  REQUIRE(tape.shape(s) == Shape{rows});
  for (index_t r = 0; r < rows; ++r) {
    double ref = 0;
    for (index_t t = 0; t < len; ++t)
      if (gen(r, t))
        ref += direct_log_softmax(z, r * len + t - 1, vocab, seq[static_cast<std::size_t>(r * len + t)], tau);
    CHECK(tape.value(s)[r] == Approx(ref).epsilon(1e-14));
  }

  require_gradcheck({{z}}, [&](Tape<double>& t, const std::vector<Var>& v) {
    return masked_seq_sum(t, log_softmax_gather(t, v[0], targets, tau), weights, rows);
  });
}
