#include <entropy_probe/module/bind.hpp>
#include <entropy_probe/tape/ops/linear.hpp>

#include <catch2/catch.hpp>

#include <cmath>

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
