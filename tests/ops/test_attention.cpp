#include "../support/attention_case.hpp"
#include "../support/gradcheck.hpp"

#include <entropy_probe/tape/ops/attention.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

using namespace entropy_probe;
using namespace ep_test;

namespace {

// Plain reference: for every row, query head and query position, the softmax
// of the scaled scores over the allowed keys, written out explicitly.
std::vector<double> naive_attention(const AttnCase& c, const std::vector<std::uint8_t>& mask,
                                    const std::vector<double>& q, const std::vector<double>& k,
                                    const std::vector<double>& v, double scale = 0.0) {
  const index_t qw = c.hq * c.dh, kw = c.hkv * c.dh;
  std::vector<double> out(static_cast<std::size_t>(c.r * c.t * qw), 0.0);
  if (scale == 0.0) scale = 1.0 / std::sqrt(static_cast<double>(c.dh));
  for (index_t r = 0; r < c.r; ++r) {
    for (index_t h = 0; h < c.hq; ++h) {
      const index_t g = h / (c.hq / c.hkv);  // KV head shared by this query head
      for (index_t t = 0; t < c.t; ++t) {
        std::vector<double> score, weight;
        std::vector<index_t> keys;
        for (index_t s = 0; s <= t; ++s) {
          if (!mask[static_cast<std::size_t>(r * c.t + s)]) continue;
          double dot = 0;
          for (index_t d = 0; d < c.dh; ++d)
            dot += q[static_cast<std::size_t>((r * c.t + t) * qw + h * c.dh + d)] *
                   k[static_cast<std::size_t>((r * c.t + s) * kw + g * c.dh + d)];
          score.push_back(scale * dot);
          keys.push_back(s);
        }
        if (keys.empty()) continue;  // no allowed key: output stays 0
        double mx = score[0], z = 0;
        for (double s : score) mx = std::max(mx, s);
        for (double s : score) z += std::exp(s - mx);
        for (std::size_t j = 0; j < keys.size(); ++j) {
          const double p = std::exp(score[j] - mx) / z;
          for (index_t d = 0; d < c.dh; ++d)
            out[static_cast<std::size_t>((r * c.t + t) * qw + h * c.dh + d)] +=
                p * v[static_cast<std::size_t>((r * c.t + keys[j]) * kw + g * c.dh + d)];
        }
      }
    }
  }
  return out;
}

std::vector<GradcheckInput> random_qkv(const AttnCase& c, std::mt19937_64& rng, bool dq = true, bool dk = true,
                                       bool dv = true) {
  return {{random_tensor({c.r, c.t, c.hq * c.dh}, rng), dq},
          {random_tensor({c.r, c.t, c.hkv * c.dh}, rng), dk},
          {random_tensor({c.r, c.t, c.hkv * c.dh}, rng), dv}};
}

// A mix: plain, T = 1, R = 1, Dh = 1, GQA with one KV head, Hq = Hkv, left and
// middle padding, a fully masked sequence.
std::vector<AttnCase> gradcheck_cases() {
  return {
      {2, 5, 4, 2, 3, {}},
      {2, 1, 2, 1, 2, {}},
      {3, 1, 2, 2, 2, {1, 0, 1}},                             // T = 1 with a masked row
      {1, 4, 2, 2, 3, {}},                                    // R = 1
      {2, 3, 3, 1, 1, {1, 1, 1, 0, 1, 1}},                    // Dh = 1
      {2, 4, 4, 1, 2, {0, 0, 1, 1, 1, 0, 1, 1}},              // GQA, one KV head; left and middle padding
      {2, 4, 3, 3, 2, {1, 1, 1, 1, 0, 1, 1, 1}},              // Hq = Hkv
      {3, 4, 2, 1, 2, {1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 1}},  // fully masked sequence 1
  };
}

}  // namespace

TEST_CASE("causal_attention: VJP and JVP against finite differences", "[ops][attention]") {
  std::mt19937_64 rng(11);
  for (const AttnCase& c : gradcheck_cases()) {
    CAPTURE(c.r, c.t, c.hq, c.hkv, c.dh);
    const std::vector<std::uint8_t> mask = mask_of(c);
    require_gradcheck(random_qkv(c, rng), [&](Tape<double>& t, const std::vector<Var>& v) {
      return causal_attention(t, v[0], v[1], v[2], mask, c.hq, c.hkv);
    });
  }
}

TEST_CASE("causal_attention: rules with only some operands differentiable", "[ops][attention]") {
  // Frozen operands take the nullptr-tangent and no-gradient branches.
  std::mt19937_64 rng(12);
  const AttnCase c{2, 4, 4, 2, 2, {0, 1, 1, 1, 1, 1, 0, 1}};
  const std::vector<std::uint8_t> mask = mask_of(c);
  struct Which {
    bool q, k, v;
  };
  for (Which w : {Which{true, false, false}, Which{false, true, false}, Which{false, false, true},
                  Which{true, true, false}, Which{false, true, true}}) {
    CAPTURE(w.q, w.k, w.v);
    require_gradcheck(random_qkv(c, rng, w.q, w.k, w.v), [&](Tape<double>& t, const std::vector<Var>& v) {
      return causal_attention(t, v[0], v[1], v[2], mask, c.hq, c.hkv);
    });
  }
}

TEST_CASE("causal_attention: forward equals a naive per-head softmax", "[ops][attention]") {
  std::mt19937_64 rng(13);
  // Hq = 4, Hkv = 2 tells the GQA mapping h / (Hq/Hkv) from h % Hkv.
  for (const AttnCase& c : {AttnCase{2, 6, 4, 2, 3, {0, 0, 1, 1, 1, 1, 1, 1, 0, 1, 0, 1}}, AttnCase{1, 5, 6, 3, 2, {}},
                            AttnCase{2, 3, 2, 2, 4, {1, 1, 1, 0, 0, 0}}, AttnCase{2, 4, 4, 1, 1, {}}}) {
    CAPTURE(c.r, c.t, c.hq, c.hkv, c.dh);
    const std::vector<std::uint8_t> mask = mask_of(c);
    auto in = random_qkv(c, rng);
    Tape<double> tape;
    Var q = tape.input(in[0].value), k = tape.input(in[1].value), v = tape.input(in[2].value);
    Var o = causal_attention(tape, q, k, v, mask, c.hq, c.hkv);
    REQUIRE(tape.shape(o) == tape.shape(q));
    const std::vector<double> ref =
        naive_attention(c, mask, in[0].value.to_host(), in[1].value.to_host(), in[2].value.to_host());
    const std::vector<double> got = tape.value(o).to_host();
    CHECK(rel_err(got, ref) < 1e-13);
  }
}

TEST_CASE("causal_attention: an explicit score scale", "[ops][attention]") {
  // GPT-2's scale_attn_by_inverse_layer_idx (1/sqrt(Dh) / (layer + 1)) and
  // scale_attn_weights = false (1): forward against the naive softmax with the
  // same scale, rules against finite differences.
  std::mt19937_64 rng(16);
  const AttnCase c{2, 5, 4, 2, 3, {0, 1, 1, 1, 1, 1, 1, 1, 0, 1}};
  const std::vector<std::uint8_t> mask = mask_of(c);
  for (double scale : {1.0 / std::sqrt(3.0) / 3.0, 1.0, 2.5}) {
    CAPTURE(scale);
    auto in = random_qkv(c, rng);
    Tape<double> tape;
    Var q = tape.input(in[0].value), k = tape.input(in[1].value), v = tape.input(in[2].value);
    const std::vector<double> got = tape.value(causal_attention(tape, q, k, v, mask, c.hq, c.hkv, scale)).to_host();
    const std::vector<double> ref =
        naive_attention(c, mask, in[0].value.to_host(), in[1].value.to_host(), in[2].value.to_host(), scale);
    CHECK(rel_err(got, ref) < 1e-13);
    CHECK(rel_err(got, naive_attention(c, mask, in[0].value.to_host(), in[1].value.to_host(),
                                       in[2].value.to_host())) > 1e-3);  // the scale is really applied
    require_gradcheck(random_qkv(c, rng), [&](Tape<double>& t, const std::vector<Var>& vs) {
      return causal_attention(t, vs[0], vs[1], vs[2], mask, c.hq, c.hkv, scale);
    });
  }
  Tape<double> t;
  Var q = t.input(TensorD({1, 2, 4})), k = t.input(TensorD({1, 2, 4})), v = t.input(TensorD({1, 2, 4}));
  const std::vector<std::uint8_t> ones(2, 1);
  REQUIRE_THROWS_WITH(causal_attention(t, q, k, v, ones, 2, 2, -1.0), Catch::Contains("scale = -1"));
}

TEST_CASE("causal_attention: queries with no allowed key give exact zeros", "[ops][attention]") {
  // Row 0 is left-padded by two (queries 0 and 1 see no key); row 1 is all padding.
  std::mt19937_64 rng(14);
  const AttnCase c{2, 4, 2, 1, 3, {0, 0, 1, 1, 0, 0, 0, 0}};
  const std::vector<std::uint8_t> mask = mask_of(c);
  auto in = random_qkv(c, rng);
  Tape<double> tape;
  Var q = tape.input(in[0].value), k = tape.input(in[1].value), v = tape.input(in[2].value);
  Var o = causal_attention(tape, q, k, v, mask, c.hq, c.hkv);
  tape.set_tangent(q, random_tensor(in[0].value.shape(), rng));
  tape.set_tangent(k, random_tensor(in[1].value.shape(), rng));
  tape.set_tangent(v, random_tensor(in[2].value.shape(), rng));
  tape.backward(o, random_tensor(tape.shape(o), rng));
  tape.jvp();

  const index_t qw = c.hq * c.dh, kw = c.hkv * c.dh;
  auto dead_query = [&](index_t r, index_t t) { return r == 1 || t < 2; };
  const TensorD& out = tape.value(o);
  const TensorD* gq = tape.grad(q);
  const TensorD* gk = tape.grad(k);
  const TensorD* gv = tape.grad(v);
  const auto* to = tape.tangent(o);
  REQUIRE(gq);
  REQUIRE(gk);
  REQUIRE(gv);
  REQUIRE(to);
  for (index_t i = 0; i < out.numel(); ++i) {
    REQUIRE(std::isfinite(out[i]));
    REQUIRE(std::isfinite((*gq)[i]));
    REQUIRE(std::isfinite((*to)[i]));
    const index_t r = i / (c.t * qw), t = (i / qw) % c.t;
    if (dead_query(r, t)) {
      CHECK(out[i] == 0.0);
      CHECK((*gq)[i] == 0.0);
      CHECK((*to)[i] == 0.0);
    } else {
      CHECK(out[i] != 0.0);
    }
  }
  // Padding keys are never attended to, so they receive no gradient.
  for (index_t i = 0; i < gk->numel(); ++i) {
    REQUIRE(std::isfinite((*gk)[i]));
    REQUIRE(std::isfinite((*gv)[i]));
    const index_t r = i / (c.t * kw), s = (i / kw) % c.t;
    if (!mask[static_cast<std::size_t>(r * c.t + s)]) {
      CHECK((*gk)[i] == 0.0);
      CHECK((*gv)[i] == 0.0);
    } else {
      CHECK((*gv)[i] != 0.0);
    }
  }
}

TEST_CASE("causal_attention: float forward agrees with double", "[ops][attention]") {
  std::mt19937_64 rng(15);
  const AttnCase c{2, 7, 4, 2, 8, {0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1}};
  const std::vector<std::uint8_t> mask = mask_of(c);
  auto in = random_qkv(c, rng);
  Tape<double> td;
  Var od = causal_attention(td, td.input(in[0].value), td.input(in[1].value), td.input(in[2].value), mask, c.hq, c.hkv);
  Tape<float> tf;
  Var of = causal_attention(tf, tf.input(in[0].value.cast<float>()), tf.input(in[1].value.cast<float>()),
                            tf.input(in[2].value.cast<float>()), mask, c.hq, c.hkv);
  const std::vector<float> f = tf.value(of).to_host();
  const std::vector<double> fd(f.begin(), f.end());
  const double err = rel_err(fd, td.value(od).to_host());
  CAPTURE(err);
  CHECK(err < 1e-5);
}

TEST_CASE("causal_attention: usage errors name the problem", "[ops][attention]") {
  std::mt19937_64 rng(16);
  Tape<double> t;
  Var q = t.input(random_tensor({2, 3, 8}, rng));
  Var k = t.input(random_tensor({2, 3, 4}, rng));
  Var v = t.input(random_tensor({2, 3, 4}, rng));
  Var k_bad = t.input(random_tensor({2, 3, 6}, rng));
  Var q_flat = t.input(random_tensor({6, 8}, rng));
  const std::vector<std::uint8_t> mask(6, 1), short_mask(5, 1);

  CHECK_NOTHROW(causal_attention(t, q, k, v, mask, 4, 2));
  CHECK_THROWS_AS(causal_attention(t, q, k, v, mask, 4, 3), UsageError);
  CHECK_THROWS_WITH(causal_attention(t, q, k, v, mask, 4, 3), Catch::Contains("not a multiple of n_kv_heads"));
  CHECK_THROWS_WITH(causal_attention(t, q_flat, k, v, mask, 4, 2), Catch::Contains("expected [R, T, Hq*Dh]"));
  CHECK_THROWS_WITH(causal_attention(t, q, k_bad, v, mask, 4, 2), Catch::Contains("k has shape [2, 3, 6]"));
  CHECK_THROWS_WITH(causal_attention(t, q, k, k_bad, mask, 4, 2), Catch::Contains("v has shape [2, 3, 6]"));
  CHECK_THROWS_WITH(causal_attention(t, q, k, v, short_mask, 4, 2), Catch::Contains("key_mask has 5 entries"));
  CHECK_THROWS_WITH(causal_attention(t, q, k, v, mask, 3, 1), Catch::Contains("not a positive multiple of n_heads"));
  CHECK_THROWS_WITH(causal_attention(t, q, k, v, mask, 0, 1), Catch::Contains("must be positive"));
  CHECK_THROWS_AS(causal_attention(t, q, k, v, short_mask, 4, 2), UsageError);
}
