#include <entropy_probe/module/bind.hpp>
#include <entropy_probe/tape/ops/linear.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

using namespace entropy_probe;

namespace {
template <class T>
struct Two {
  using scalar_type = T;
  using backend_type = CpuBackend;
  Parameter<T> a{Tensor<T>::full({2, 3}, T(1))};
  Parameter<T> b{Tensor<T>::full({3}, T(2))};
  Parameter<T> frozen{Tensor<T>::full({2}, T(5)), false};
  void named_parameters(const ParameterVisitor<T>& v) {
    v("a.lora_A.weight", a);
    v("b", b);
    v("frozen", frozen);
  }
};
}  // namespace

TEST_CASE("buffers: zeros_like_params is shaped like the registry, in the chosen dtype", "[buffers]") {
  Two<float> m;
  auto reg = Registry<float>::build(m);
  auto buf = zeros_like_params<double>(reg);
  static_assert(std::is_same_v<decltype(buf)::scalar_type, double>);
  REQUIRE(buf.size() == 2);
  CHECK(buf.at(m.a.id()).shape() == Shape{2, 3});
  CHECK(buf.at(m.b.id()).shape() == Shape{3});
  REQUIRE_THROWS_WITH(buf.at(m.frozen.id()), Catch::Contains("is not in that registry"));
}

TEST_CASE("buffers: cast_param_buffer converts every present entry and keeps the binding", "[buffers]") {
  Two<float> m;
  auto reg = Registry<float>::build(m);
  auto buf = zeros_like_params<double>(reg);
  buf.set(m.a.id(), Tensor<double>::full({2, 3}, 1.0 / 3.0));
  buf.erase(m.b.id());
  const auto f = cast_param_buffer<float>(buf);
  static_assert(std::is_same_v<decltype(f)::scalar_type, float>);
  CHECK(f.info() == buf.info());
  CHECK(f.at(m.a.id()).to_host() == std::vector<float>(6, static_cast<float>(1.0 / 3.0)));
  CHECK(f.entry(f.index_of(m.b.id())) == nullptr);  // absent stays absent
  REQUIRE_THROWS_WITH(cast_param_buffer<float>(ParamBuffer<double>{}), Catch::Contains("cast_param_buffer"));
}

TEST_CASE("buffers: add_into_param_buffer scales, converts and counts missing grads", "[buffers]") {
  Two<float> m;
  auto reg = Registry<float>::build(m);
  auto buf = zeros_like_params<double>(reg);
  m.a.grad = Tensor<float>::full({2, 3}, 0.1f);  // b has no gradient
  auto st = add_into_param_buffer(buf, reg, 3.0);
  CHECK(st.added == 1);
  CHECK(st.skipped_no_grad == 1);
  // float 0.1 converted to double, then scaled: exactly 3 * double(0.1f).
  CHECK(buf.at(m.a.id())[0] == 3.0 * static_cast<double>(0.1f));
  CHECK(buf.at(m.b.id())[0] == 0.0);
  scale_param_gradients(reg, 2.0);
  CHECK(m.a.grad->operator[](0) == 0.2f);
  CHECK_FALSE(m.b.grad.has_value());  // scaling does not create gradients
}

TEST_CASE("buffers: dot accumulates in double and counts absent entries", "[buffers]") {
  Two<float> m;
  auto reg = Registry<float>::build(m);
  // 1e8 + 1 - 1e8 in float loses the 1; accumulation in double keeps it.
  ParamBuffer<float> x(reg.info()), y(reg.info());
  x.set(m.a.id(), Tensor<float>::from_host({2, 3}, std::vector<float>{1e8f, 1.f, -1e8f, 0, 0, 0}));
  y.set(m.a.id(), Tensor<float>::full({2, 3}, 1.f));
  y.set(m.b.id(), Tensor<float>::full({3}, 1.f));
  auto st = dot_param_buffers_stats(x, y);
  CHECK(st.value == 1.0);
  CHECK(st.used == 1);
  CHECK(st.missing == 1);
  CHECK(dot_param_buffers(x, y, {1}) == 0.0);
  CHECK(norm_param_buffer(y) == Approx(std::sqrt(9.0)).epsilon(1e-15));
}

TEST_CASE("buffers: buffers of two registries cannot be combined", "[buffers]") {
  Two<double> m;
  auto r1 = Registry<double>::build(m);
  auto r2 = Registry<double>::build(m);
  auto b1 = zeros_like_params<double>(r1);
  auto b2 = zeros_like_params<double>(r2);
  REQUIRE_THROWS_WITH(dot_param_buffers(b1, b2),
                      Catch::Contains("different registries") && Catch::Contains("a.lora_A.weight"));
  REQUIRE_THROWS_WITH(add_into_param_buffer(b2, r1), Catch::Contains("not to registry"));
  Two<double> other;
  REQUIRE_THROWS_WITH(b1.set(other.a.id(), Tensor<double>({2, 3})), Catch::Contains("not in that registry"));
  REQUIRE_THROWS_WITH(b1.set(m.a.id(), Tensor<double>({3, 2})), Catch::Contains("'a.lora_A.weight'"));
}

TEST_CASE("bind: tied weights accumulate both uses; grads start empty", "[bind]") {
  Parameter<double> w(Tensor<double>::from_host({2, 2}, std::vector<double>{1, 2, 3, 4}));
  REQUIRE_FALSE(w.grad.has_value());
  Tape<double> tape;
  Var x = tape.constant(Tensor<double>::from_host({1, 2}, std::vector<double>{1, 1}));
  Var h = linear(tape, x, use(tape, w));  // h = x W^T
  Var y = linear(tape, h, use(tape, w));  // y = h W^T
  tape.backward(y, Tensor<double>::full({1, 2}, 1.0));
  REQUIRE(w.grad.has_value());
  // y = x W^T W^T; d(sum y)/dW = 1 h^T ... computed by hand: h = [3, 7].
  // first use: dW += (dh)^T x with dh = [1,1] W = [4, 6]; second: dW += [1,1]^T h.
  std::vector<double> expect{4 + 3, 4 + 7, 6 + 3, 6 + 7};
  for (int i = 0; i < 4; ++i) CHECK((*w.grad)[i] == expect[static_cast<std::size_t>(i)]);
  // A second backward on a fresh tape accumulates into the same grad.
  Tape<double> t2;
  Var y2 = linear(t2, t2.constant(Tensor<double>::from_host({1, 2}, std::vector<double>{1, 1})), use(t2, w));
  t2.backward(y2, Tensor<double>::full({1, 2}, 1.0));
  CHECK((*w.grad)[0] == expect[0] + 1);
}

TEST_CASE("bind: jvp takes tangents from a keyed buffer; frozen params carry none", "[bind]") {
  Two<double> m;
  auto reg = Registry<double>::build(m);
  auto tangents = zeros_like_params<double>(reg);
  tangents.set(m.a.id(), Tensor<double>::full({2, 3}, 0.5));
  Tape<double> tape;
  Var x = tape.constant(Tensor<double>::full({1, 3}, 1.0));
  Var y = linear(tape, x, use(tape, m.a), use(tape, m.frozen));
  jvp(tape, tangents);
  REQUIRE(tape.tangent(y) != nullptr);
  CHECK((*tape.tangent(y))[0] == 1.5);  // x . tA row = 3 * 0.5; the frozen bias adds no tangent
  // float model, double tangents: converted.
  Two<float> mf;
  auto regf = Registry<float>::build(mf);
  auto tf = zeros_like_params<double>(regf);
  tf.set(mf.a.id(), Tensor<double>::full({2, 3}, 0.25));
  Tape<float> tape_f;
  Var yf = linear(tape_f, tape_f.constant(Tensor<float>::full({1, 3}, 1.f)), use(tape_f, mf.a));
  jvp(tape_f, tf);
  CHECK((*tape_f.tangent(yf))[1] == 0.75f);
}

namespace {
// Sizes that leave padding after most slots: 15, 7, 1 and 18 elements.
struct Odd {
  using scalar_type = double;
  using backend_type = CpuBackend;
  Parameter<double> a{Tensor<double>({3, 5})};
  Parameter<double> b{Tensor<double>({7})};
  Parameter<double> c{Tensor<double>({1})};
  Parameter<double> d{Tensor<double>({2, 9})};
  void named_parameters(const ParameterVisitor<double>& v) {
    v("a", a);
    v("b", b);
    v("c", c);
    v("d", d);
  }
};

// Every element of every present entry set to a distinct value.
template <class U>
void fill_distinct(ParamBuffer<U>& buf, double base) {
  for (index_t i = 0; i < buf.size(); ++i)
    if (const auto* t = buf.entry(i))
      for (index_t k = 0; k < t->numel(); ++k) (*t)[k] = static_cast<U>(base + 100.0 * double(i) + double(k));
}

template <class U>
std::vector<std::vector<U>> entries_of(const ParamBuffer<U>& buf) {
  std::vector<std::vector<U>> out;
  for (index_t i = 0; i < buf.size(); ++i) out.push_back(buf.entry(i) ? buf.entry(i)->to_host() : std::vector<U>{});
  return out;
}
}  // namespace

TEST_CASE("buffers: the entries are views into one allocation, slots 64-byte aligned in registry order", "[buffers]") {
  Odd m;
  auto reg = Registry<double>::build(m);
  ParamBuffer<double> empty(reg.info());
  CHECK(empty.flat().empty());  // nothing allocated before the first entry
  CHECK(empty.entry(0) == nullptr);

  auto buf = zeros_like_params<double>(reg);
  // 15, 7, 1, 18 doubles, each slot rounded up to 8 doubles (64 bytes).
  const std::vector<index_t> want_offsets{0, 16, 24, 32};
  REQUIRE(buf.flat().size() == 56);
  for (index_t i = 0; i < buf.size(); ++i) {
    CAPTURE(i);
    CHECK(buf.offset(i) == want_offsets[static_cast<std::size_t>(i)]);
    REQUIRE(buf.entry(i) != nullptr);
    CHECK(buf.entry(i)->data() == buf.flat().data() + want_offsets[static_cast<std::size_t>(i)]);
    CHECK(reinterpret_cast<std::uintptr_t>(buf.entry(i)->data()) % 64 == 0);
    CHECK(buf.entry(i)->shape() == reg.entry(i).param->value.shape());
  }
  // float: slots of 16 elements.
  auto f = zeros_like_params<float>(reg);
  REQUIRE(f.flat().size() == 80);  // 16 + 16 + 16 + 32
  for (index_t i = 0; i < f.size(); ++i) {
    CHECK(f.entry(i)->data() == f.flat().data() + 16 * i);
    CHECK(reinterpret_cast<std::uintptr_t>(f.entry(i)->data()) % 64 == 0);
  }
  // set writes into the slot; at() and find() see the same view.
  buf.set(m.b.id(), Tensor<double>::full({7}, 4.0));
  CHECK(buf.flat()[16] == 4.0);
  CHECK(buf.flat()[22] == 4.0);
  CHECK(buf.flat()[23] == 0.0);  // padding
  CHECK(&buf.at(m.b.id()) == buf.find(m.b.id()));
  CHECK(buf.at(m.b.id()).data() == buf.flat().data() + 16);
  const auto& cbuf = buf;
  CHECK(cbuf.at(m.b.id()).to_host() == std::vector<double>(7, 4.0));
}

TEST_CASE("buffers: erase zeroes the slot; set_zero makes an entry present and zero", "[buffers]") {
  Odd m;
  auto reg = Registry<double>::build(m);
  auto buf = zeros_like_params<double>(reg);
  fill_distinct(buf, 1.0);
  buf.erase(m.a.id());
  CHECK(buf.entry(0) == nullptr);
  CHECK(buf.present_count() == 3);
  for (std::size_t k = 0; k < 16; ++k) CHECK(buf.flat()[k] == 0.0);
  CHECK(buf.flat()[16] == 101.0);  // the next slot untouched
  const auto& z = buf.set_zero(m.b.id());
  CHECK(z.to_host() == std::vector<double>(7, 0.0));
  const auto& a = buf.set_zero(m.a.id());
  CHECK(buf.entry(0) == &a);
  CHECK(a.to_host() == std::vector<double>(15, 0.0));
}

TEST_CASE("buffers: a copy has storage of its own with valid views; a move keeps the views", "[buffers]") {
  Odd m;
  auto reg = Registry<double>::build(m);
  auto buf = zeros_like_params<double>(reg);
  buf.erase(m.c.id());
  fill_distinct(buf, 0.5);
  const auto before = entries_of(buf);

  ParamBuffer<double> copy = buf;
  REQUIRE(copy.flat().data() != buf.flat().data());
  for (index_t i = 0; i < copy.size(); ++i) {
    CHECK((copy.entry(i) != nullptr) == (buf.entry(i) != nullptr));
    if (copy.entry(i)) CHECK(copy.entry(i)->data() == copy.flat().data() + copy.offset(i));
  }
  CHECK(entries_of(copy) == before);
  (*copy.entry(0))[3] = -7.0;  // independent
  CHECK((*buf.entry(0))[3] == before[0][3]);

  ParamBuffer<double> assigned(reg.info());
  assigned = copy;
  CHECK(assigned.entry(0)->data() == assigned.flat().data());
  CHECK((*assigned.entry(0))[3] == -7.0);
  assigned = buf;  // over an allocated buffer
  CHECK(entries_of(assigned) == before);
  CHECK(assigned.entry(3)->data() == assigned.flat().data() + 32);

  const double* storage = buf.flat().data();
  ParamBuffer<double> moved = std::move(buf);
  CHECK(moved.flat().data() == storage);
  CHECK(moved.entry(0)->data() == storage);
  CHECK(entries_of(moved) == before);
  ParamBuffer<double> move_assigned;
  move_assigned = std::move(moved);
  CHECK(move_assigned.entry(3)->data() == storage + 32);
  CHECK(entries_of(move_assigned) == before);
}

TEST_CASE("buffers: a failed set leaves the buffer unchanged", "[buffers]") {
  Odd m;
  auto reg = Registry<double>::build(m);
  ParamBuffer<double> fresh(reg.info());
  REQUIRE_THROWS_WITH(fresh.set(m.a.id(), Tensor<double>({5, 3})), Catch::Contains("'a'") && Catch::Contains("[3, 5]"));
  CHECK(fresh.flat().empty());  // not even allocated
  CHECK(fresh.present_count() == 0);

  auto buf = zeros_like_params<double>(reg);
  buf.erase(m.b.id());
  fill_distinct(buf, 2.0);
  const std::vector<double> flat_before(buf.flat().begin(), buf.flat().end());
  REQUIRE_THROWS_WITH(buf.set(m.b.id(), Tensor<double>({8})), Catch::Contains("'b'"));
  REQUIRE_THROWS_WITH(buf.set(m.d.id(), Tensor<double>({9, 2})), Catch::Contains("'d'"));
  CHECK(std::vector<double>(buf.flat().begin(), buf.flat().end()) == flat_before);
  CHECK(buf.entry(1) == nullptr);
  CHECK(buf.present_count() == 3);
}

TEST_CASE("buffers: the flat dot equals the per-entry dot, with absent entries", "[buffers]") {
  Odd m;
  auto reg = Registry<double>::build(m);
  std::mt19937 rng(17);
  std::normal_distribution<double> nd;
  auto random_buffer = [&](std::initializer_list<ParamId> absent) {
    auto b = zeros_like_params<double>(reg);
    for (index_t i = 0; i < b.size(); ++i)
      for (index_t k = 0; k < b.entry(i)->numel(); ++k) (*b.entry(i))[k] = nd(rng);
    for (ParamId id : absent) b.erase(id);
    return b;
  };
  // Independent reference: long double over the entries present in both.
  auto reference = [](const ParamBuffer<double>& x, const ParamBuffer<double>& y, long double& magnitude) {
    long double s = 0;
    magnitude = 0;
    for (index_t i = 0; i < x.size(); ++i) {
      if (!x.entry(i) || !y.entry(i)) continue;
      const auto xv = x.entry(i)->to_host(), yv = y.entry(i)->to_host();
      for (std::size_t k = 0; k < xv.size(); ++k) {
        s += static_cast<long double>(xv[k]) * yv[k];
        magnitude += std::fabs(static_cast<long double>(xv[k]) * yv[k]);
      }
    }
    return static_cast<double>(s);
  };
  SECTION("same presence: one flat sum") {
    const auto x = random_buffer({m.c.id()}), y = random_buffer({m.c.id()});
    long double mag = 0;
    const double want = reference(x, y, mag);
    const DotStats st = dot_param_buffers_stats(x, y);
    CHECK(st.used == 3);
    CHECK(st.missing == 1);
    CHECK(std::fabs(st.value - want) <= 1e-15 * static_cast<double>(mag));
  }
  SECTION("different presence: entry by entry") {
    const auto x = random_buffer({m.a.id()}), y = random_buffer({m.d.id()});
    long double mag = 0;
    const double want = reference(x, y, mag);
    const DotStats st = dot_param_buffers_stats(x, y);
    CHECK(st.used == 2);
    CHECK(st.missing == 2);
    CHECK(std::fabs(st.value - want) <= 1e-15 * static_cast<double>(mag));
  }
  SECTION("float with double (another layout): entry by entry") {
    const auto x = random_buffer({}), y = random_buffer({m.b.id()});
    const auto xf = cast_param_buffer<float>(x);
    long double mag = 0;
    const double want = reference(cast_param_buffer<double>(xf), y, mag);
    const DotStats st = dot_param_buffers_stats(xf, y);
    CHECK(st.used == 3);
    CHECK(st.missing == 1);
    CHECK(std::fabs(st.value - want) <= 1e-15 * static_cast<double>(mag));
  }
}

TEST_CASE("buffers: scaling over the flat storage leaves padding and absent slots zero", "[buffers]") {
  Odd m;
  auto reg = Registry<double>::build(m);
  auto buf = zeros_like_params<double>(reg);
  fill_distinct(buf, 1.0);
  buf.erase(m.b.id());
  const auto before = entries_of(buf);
  scale_param_buffer(buf, -0.5);
  const auto after = entries_of(buf);
  for (std::size_t i = 0; i < before.size(); ++i)
    for (std::size_t k = 0; k < before[i].size(); ++k) CHECK(after[i][k] == -0.5 * before[i][k]);
  // an infinite scale: present entries become +-inf, nothing else changes
  scale_param_buffer(buf, std::numeric_limits<double>::infinity());
  for (std::size_t k = 0; k < buf.flat().size(); ++k) {
    CAPTURE(k);
    const bool in_entry = k < 15 || k == 24 || (k >= 32 && k < 50);
    CHECK(std::isinf(buf.flat()[k]) == in_entry);
  }
}

TEST_CASE("bind: a forward-tangent tape reads parameter tangents in place from the buffer", "[bind]") {
  Two<double> m;
  auto reg = Registry<double>::build(m);
  auto tangents = zeros_like_params<double>(reg);
  tangents.set(m.a.id(), Tensor<double>::full({2, 3}, 0.5));
  Tape<double> tape(forward_tangents, param_tangents(tangents, "test"));
  Var wa = use(tape, m.a);
  REQUIRE(tape.tangent(wa) != nullptr);
  CHECK(tape.tangent(wa)->data() == tangents.entry(0)->data());  // borrowed, not copied
  Var y = linear(tape, tape.constant(Tensor<double>::full({1, 3}, 1.0)), wa);
  CHECK((*tape.tangent(y))[1] == 1.5);
}
