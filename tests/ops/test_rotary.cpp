#include "../support/gradcheck.hpp"

#include <entropy_probe/tape/ops/rotary.hpp>

#include <cmath>
#include <complex>
#include <cstdint>
#include <vector>

using namespace entropy_probe;
using namespace ep_test;

namespace {

// Rotate-half RoPE as complex multiplication, written independently of the
// op: z_i = x_i + i x_{i + Dh/2} is multiplied by exp(i pos theta^(-2i/Dh)).
TensorD rotary_ref(const TensorD& x, const std::vector<std::int32_t>& pos, index_t heads, double theta) {
  const index_t rows = static_cast<index_t>(pos.size());
  const index_t dh = x.numel() / rows / heads, half = dh / 2;
  TensorD y(x.shape());
  for (index_t r = 0; r < rows; ++r)
    for (index_t h = 0; h < heads; ++h)
      for (index_t i = 0; i < half; ++i) {
        const index_t base = (r * heads + h) * dh;
        const double freq = std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(dh));
        const std::complex<double> z(x[base + i], x[base + i + half]);
        const std::complex<double> w = z * std::polar(1.0, pos[static_cast<std::size_t>(r)] * freq);
        y[base + i] = w.real();
        y[base + i + half] = w.imag();
      }
  return y;
}

}  // namespace

TEST_CASE("rotary: position 0 is the identity", "[ops][rotary]") {
  std::mt19937_64 rng(41);
  const TensorD x = random_tensor({3, 2, 8}, rng);
  Tape<double> t;
  const TensorD y = t.value(rotary(t, t.input(x), std::vector<std::int32_t>{0, 0, 0}, 2, 10000.0));
  REQUIRE(y.shape() == x.shape());
  for (index_t i = 0; i < x.numel(); ++i) CHECK(y[i] == x[i]);
}

TEST_CASE("rotary: agrees with complex rotation and preserves per-pair norms", "[ops][rotary]") {
  std::mt19937_64 rng(42);
  const index_t heads = 3, dh = 8, half = dh / 2;
  const std::vector<std::int32_t> pos{0, 1, 7, 100, 2047};
  for (double theta : {10000.0, 1000000.0, 3.0}) {
    CAPTURE(theta);
    const TensorD x = random_tensor({5, heads, dh}, rng);
    Tape<double> t;
    const TensorD y = t.value(rotary(t, t.input(x), pos, heads, theta));
    const TensorD ref = rotary_ref(x, pos, heads, theta);
    for (index_t i = 0; i < x.numel(); ++i) CHECK(y[i] == Approx(ref[i]).margin(1e-14));
    for (index_t p = 0; p < 5 * heads; ++p)
      for (index_t i = 0; i < half; ++i) {
        const double a = x[p * dh + i], b = x[p * dh + i + half];
        const double c = y[p * dh + i], d = y[p * dh + i + half];
        CHECK(c * c + d * d == Approx(a * a + b * b).epsilon(1e-14));
      }
  }
}

TEST_CASE("rotary: known angles (Dh = 4, theta = 10000: frequencies 1 and 0.01)", "[ops][rotary]") {
  Tape<double> t;
  const TensorD x = TensorD::from_host({1, 1, 4}, std::vector<double>{1.0, 2.0, 3.0, 4.0});
  const TensorD y = t.value(rotary(t, t.input(x), std::vector<std::int32_t>{3}, 1, 10000.0));
  // pair 0 = (x0, x2) by angle 3, pair 1 = (x1, x3) by angle 0.03
  CHECK(y[0] == Approx(1.0 * std::cos(3.0) - 3.0 * std::sin(3.0)).epsilon(1e-15));
  CHECK(y[2] == Approx(3.0 * std::cos(3.0) + 1.0 * std::sin(3.0)).epsilon(1e-15));
  CHECK(y[1] == Approx(2.0 * std::cos(0.03) - 4.0 * std::sin(0.03)).epsilon(1e-15));
  CHECK(y[3] == Approx(4.0 * std::cos(0.03) + 2.0 * std::sin(0.03)).epsilon(1e-15));
}

TEST_CASE("rotary: [N, H, Dh] and [R, T, H*Dh] layouts and a shared table give the same result", "[ops][rotary]") {
  std::mt19937_64 rng(43);
  const index_t r = 2, tt = 3, heads = 2, dh = 6;
  const std::vector<std::int32_t> pos{0, 1, 2, 5, 6, 7};
  const TensorD x = random_tensor({r * tt, heads, dh}, rng);
  Tape<double> t;
  const TensorD a = t.value(rotary(t, t.input(x), pos, heads, 500.0));
  const TensorD b = t.value(rotary(t, t.input(x.reshaped({r, tt, heads * dh})), pos, heads, 500.0));
  auto table = make_rotary_table<double>(pos, dh, 500.0);
  REQUIRE(table->cos.shape() == Shape{6, 3});
  const TensorD c = t.value(rotary(t, t.input(x), table, heads));
  const TensorD d = t.value(rotary(t, t.input(x.reshaped({r, tt, heads, dh})), table, heads));
  CHECK(b.shape() == Shape{r, tt, heads * dh});
  for (index_t i = 0; i < x.numel(); ++i) {
    CHECK(a[i] == b[i]);
    CHECK(a[i] == c[i]);
    CHECK(a[i] == d[i]);
  }
}

TEST_CASE("rotary: the VJP is the rotation by the negated angle", "[ops][rotary]") {
  std::mt19937_64 rng(44);
  const std::vector<std::int32_t> pos{3, 11, 40}, neg{-3, -11, -40};
  Tape<double> t;
  Var x = t.input(random_tensor({3, 2, 4}, rng));
  Var y = rotary(t, x, pos, 2, 10000.0);
  const TensorD cot = random_tensor({3, 2, 4}, rng);
  t.backward(y, cot);
  REQUIRE(t.grad(x) != nullptr);
  const TensorD g = *t.grad(x);
  const TensorD back = rotary_ref(cot, neg, 2, 10000.0);
  for (index_t i = 0; i < cot.numel(); ++i) CHECK(g[i] == Approx(back[i]).margin(1e-14));
}

TEST_CASE("rotary: VJP and JVP against finite differences", "[ops][rotary]") {
  std::mt19937_64 rng(45);
  struct Case {
    Shape x;
    std::vector<std::int32_t> pos;
    index_t heads;
    double theta;
  };
  for (const Case& c : {Case{{3, 2, 4}, {0, 5, 17}, 2, 10000.0}, Case{{4, 1, 2}, {0, 1, 2, 3}, 1, 10000.0},
                        Case{{1, 3, 6}, {9}, 3, 10000.0}, Case{{2, 3, 12}, {0, 1, 2, 0, 1, 2}, 2, 100.0},
                        Case{{1, 1, 2}, {1}, 1, 10000.0}, Case{{2, 4, 2}, {1000, 2}, 4, 1e6}}) {
    CAPTURE(shape_str(c.x), c.pos, c.heads, c.theta);
    require_gradcheck({{random_tensor(c.x, rng)}}, [&](Tape<double>& t, const std::vector<Var>& v) {
      return rotary(t, v[0], c.pos, c.heads, c.theta);
    });
  }
}

TEST_CASE("rotary: float forward agrees with double", "[ops][rotary][float]") {
  std::mt19937_64 rng(46);
  std::vector<std::int32_t> pos(16);
  for (std::size_t i = 0; i < pos.size(); ++i) pos[i] = static_cast<std::int32_t>(7 * i);
  CHECK(float_vs_double({random_tensor({16, 4, 16}, rng)},
                        [&](auto& t, const std::vector<Var>& v) { return rotary(t, v[0], pos, 4, 10000.0); }) < 1e-5);
}

TEST_CASE("rotary: bad shapes, head counts and theta are usage errors", "[ops][rotary][errors]") {
  Tape<double> t;
  const std::vector<std::int32_t> pos3{0, 1, 2};
  Var x = t.input(TensorD({3, 2, 6}));
  Var odd = t.input(TensorD({3, 2, 5}));
  REQUIRE_THROWS_AS(rotary(t, odd, pos3, 2, 10000.0), UsageError);
  REQUIRE_THROWS_WITH(rotary(t, odd, pos3, 2, 10000.0), Catch::Contains("head dimension 5 must be even"));
  REQUIRE_THROWS_WITH(rotary(t, x, std::vector<std::int32_t>{0, 1}, 2, 1e4),
                      Catch::Contains("rotary: x of shape [3, 2, 6] does not split into 2 rows"));
  REQUIRE_THROWS_WITH(rotary(t, x, pos3, 5, 1e4), Catch::Contains("not divisible by n_heads = 5"));
  REQUIRE_THROWS_WITH(rotary(t, x, pos3, 0, 1e4), Catch::Contains("n_heads = 0 must be positive"));
  REQUIRE_THROWS_WITH(rotary(t, x, pos3, 2, 0.0), Catch::Contains("theta = 0 must be positive"));
  auto table = make_rotary_table<double>(pos3, 4, 1e4);
  REQUIRE_THROWS_AS(rotary(t, x, table, 2), UsageError);
  REQUIRE_THROWS_WITH(rotary(t, x, table, 2), Catch::Contains("expected 2 heads x head_dim 4 = 8"));
  auto short_table = make_rotary_table<double>(std::vector<std::int32_t>{0, 1}, 6, 1e4);
  REQUIRE_THROWS_WITH(rotary(t, x, short_table, 2), Catch::Contains("does not split into 2 rows"));
  REQUIRE_THROWS_WITH(make_rotary_table<double>(pos3, 3, 1e4), Catch::Contains("head dimension 3 must be even"));
  CHECK(t.num_nodes() == 0);
}

namespace {
void check_frequencies(const RotaryFrequencies& got, const std::vector<double>& inv_freq, double attention_factor) {
  REQUIRE(got.inv_freq.size() == inv_freq.size());
  for (std::size_t i = 0; i < inv_freq.size(); ++i) {
    CAPTURE(i);
    CHECK(got.inv_freq[i] == Approx(inv_freq[i]).epsilon(1e-13));
  }
  CHECK(got.attention_factor == Approx(attention_factor).epsilon(1e-14));
}
}  // namespace

// Reference values: transformers 5.25 modeling_rope_utils.ROPE_INIT_FUNCTIONS
// on a LlamaConfig(hidden_size=64, num_attention_heads=4,
// max_position_embeddings=64, rope_parameters=...) (head_dim 16), evaluated in
// float64 (the module's torch.float / torch.float32 read as torch.float64; in
// float32 they agree to 1e-7), printed with repr().
TEST_CASE("rotary: scaled frequencies match transformers' rope types", "[ops][rotary][rope_scaling]") {
  using Type = RopeParameters::Type;
  RopeParameters r;
  r.type = Type::linear;
  r.theta = 5000.0;
  r.factor = 2.5;
  check_frequencies(rotary_frequencies(16, r, 12),
                    {0.4, 0.13793952964992862, 0.04756828460010885, 0.01640386700998239, 0.00565685424949238,
                     0.0019507595361829473, 0.0006727171322029716, 0.00023198571200881688},
                    1.0);

  r = RopeParameters{};
  r.type = Type::dynamic;
  r.factor = 3.0;
  r.max_position_embeddings = 64;
  // up to max_position_embeddings: the plain frequencies (seq_len = None in transformers)
  for (index_t len : {1, 12, 64})
    check_frequencies(
        rotary_frequencies(16, r, len),
        {1.0, 0.31622776601683794, 0.1, 0.03162277660168379, 0.01, 0.003162277660168379, 0.001, 0.00031622776601683794},
        1.0);
  check_frequencies(rotary_frequencies(16, r, 100),  // seq_len=100
                    {1.0, 0.27457722015265046, 0.07539264982675707, 0.02070110420937316, 0.005684051647900012,
                     0.001560711100684477, 0.0004285357154873271, 0.00011766614549463738},
                    1.0);

  r = RopeParameters{};
  r.type = Type::yarn;
  r.theta = 20000.0;
  r.factor = 4.0;
  r.original_max_position_embeddings = 4096;
  check_frequencies(rotary_frequencies(16, r, 12),
                    {1.0, 0.28998214001102113, 0.08408964152537146, 0.01981240153935806, 0.004419417382415922,
                     0.0008970864771084121, 0.00014865088937534015, 4.31061030156027e-05},
                    1.138629436111989);
  r.mscale = 0.8;
  r.mscale_all_dim = 0.5;
  r.truncate = false;
  check_frequencies(rotary_frequencies(16, r, 12),
                    {1.0, 0.28998214001102113, 0.08408964152537146, 0.02069248083304003, 0.004106148940747786,
                     0.000641396418563105, 0.00014865088937534015, 4.31061030156027e-05},
                    1.0388929752217428);
  r.attention_factor = 0.75;  // an explicit attention_factor wins over mscale
  CHECK(rotary_frequencies(16, r, 12).attention_factor == 0.75);

  r = RopeParameters{};
  r.type = Type::llama3;
  r.theta = 500000.0;
  r.factor = 8.0;
  r.original_max_position_embeddings = 64;
  r.low_freq_factor = 1.0;
  r.high_freq_factor = 4.0;
  check_frequencies(rotary_frequencies(16, r, 12),
                    {1.0, 0.0794030091792082, 0.004700753866357992, 0.0009115830921521386, 0.00017677669529663688,
                     3.428102195952591e-05, 6.647869871181236e-06, 1.2891731721515574e-06},
                    1.0);
}

TEST_CASE("rotary: the table carries the attention factor and the dynamic length", "[ops][rotary][rope_scaling]") {
  RopeParameters r;
  r.type = RopeParameters::Type::yarn;
  r.factor = 4.0;
  r.original_max_position_embeddings = 32;
  const std::vector<std::int32_t> pos{0, 3, 7};
  const auto table = make_rotary_table<double>(std::span<const std::int32_t>(pos), 8, r);
  const RotaryFrequencies fr = rotary_frequencies(8, r, 8);
  REQUIRE(fr.attention_factor > 1.1);
  for (index_t row = 0; row < 3; ++row)
    for (index_t i = 0; i < 4; ++i) {
      const double a = pos[static_cast<std::size_t>(row)] * fr.inv_freq[static_cast<std::size_t>(i)];
      CHECK(table->cos[row * 4 + i] == Approx(fr.attention_factor * std::cos(a)).epsilon(1e-15));
      CHECK(table->sin[row * 4 + i] == Approx(fr.attention_factor * std::sin(a)).margin(1e-15));
    }
  // a scaled table is m R(a), no longer an isometry: the rules still hold
  std::mt19937_64 rng(21);
  require_gradcheck({{random_tensor({3, 2 * 8}, rng)}},
                    [&](Tape<double>& t, const std::vector<Var>& v) { return rotary(t, v[0], table, 2); });
  // dynamic: the length is max(position) + 1 unless given; beyond
  // max_position_embeddings the frequencies change
  RopeParameters d;
  d.type = RopeParameters::Type::dynamic;
  d.factor = 2.0;
  d.max_position_embeddings = 4;
  const auto own = make_rotary_table<double>(std::span<const std::int32_t>(pos), 8, d);  // length 8
  const auto given = make_rotary_table<double>(std::span<const std::int32_t>(pos), 8, d, 8);
  const auto plain = make_rotary_table<double>(std::span<const std::int32_t>(pos), 8, d, 4);
  CHECK(own->cos.to_host() == given->cos.to_host());
  CHECK(std::abs(own->cos[4 + 1] - plain->cos[4 + 1]) > 1e-3);
  REQUIRE_THROWS_WITH(rotary_frequencies(8, RopeParameters{RopeParameters::Type::yarn}, 8),
                      Catch::Contains("original_max_position_embeddings = 0"));
}
