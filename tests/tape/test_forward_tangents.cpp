// The tape's forward-tangent mode (Tape(forward_tangents, source)): tangents
// pushed as ops are recorded equal the recorded tape's jvp(), released slots
// refuse access, and the reverse-mode entry points refuse to run.
#include <entropy_probe/tape/ops/elementwise.hpp>
#include <entropy_probe/tape/ops/linear.hpp>

#include <catch2/catch.hpp>

#include <map>
#include <optional>
#include <random>

using namespace entropy_probe;
using Catch::Contains;

namespace {

Tensor<double> random(Shape s, std::mt19937_64& rng) {
  Tensor<double> t(std::move(s));
  std::normal_distribution<double> nd(0, 1);
  for (index_t i = 0; i < t.numel(); ++i) t[i] = nd(rng);
  return t;
}

// Two keyed weights (w1 with a tangent, w2 without), an input with a tangent
// and a constant: y = gelu(x w1^T) * (c w2^T) + x w1^T.
struct Chain {
  std::mt19937_64 rng{7};
  Tensor<double> x = random({3, 4}, rng), c = random({3, 4}, rng), w1 = random({5, 4}, rng), w2 = random({5, 4}, rng);
  Tensor<double> dx = random({3, 4}, rng), dw1 = random({5, 4}, rng);
  std::map<LeafKey, const Tensor<double>*> tangents{{1, &dw1}};
  Tape<double>::TangentSource source() const {
    return [this](LeafKey k) -> std::optional<TensorView<const double>> {
      auto it = tangents.find(k);
      if (it == tangents.end()) return std::nullopt;
      return it->second->view();
    };
  }
  Var forward(Tape<double>& t, Var xv) const {
    Var h = linear(t, xv, t.leaf_ref(w1, 1, {}));
    return add(t, mul(t, gelu_tanh(t, h), linear(t, t.constant(c), t.leaf_ref(w2, 2, {}))), h);
  }
};

}  // namespace

TEST_CASE("forward tangents: equal the recorded tape's jvp, with borrowed leaf tangents", "[tape][forward_tangents]") {
  const Chain ch;
  Tape<double> rec;
  Var xr = rec.input(ch.x);
  Var yr = ch.forward(rec, xr);
  rec.set_tangent(xr, ch.dx);
  rec.jvp(ch.source());

  Tape<double> eager(forward_tangents, ch.source());
  CHECK(eager.forward_tangent_mode());
  CHECK_FALSE(rec.forward_tangent_mode());
  Var xe = eager.input(ch.x);
  eager.set_tangent(xe, ch.dx);
  Var ye = ch.forward(eager, xe);
  CHECK(eager.num_nodes() == 0);  // nothing kept to run backward with
  REQUIRE(rec.tangent(yr) != nullptr);
  REQUIRE(eager.tangent(ye) != nullptr);
  const auto a = rec.tangent(yr)->to_host(), b = eager.tangent(ye)->to_host();
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i) CHECK(std::abs(a[i] - b[i]) <= 1e-12 * (1 + std::abs(a[i])));
  CHECK(eager.value(ye).to_host() == rec.value(yr).to_host());
  // The keyed leaf's tangent is the source's tensor itself, not a copy.
  CHECK(eager.tangent(Var{1})->data() == ch.dw1.data());

  // Without any tangent the mode is plain inference: no tangent anywhere.
  Tape<double> none(forward_tangents, {});
  Var yn = ch.forward(none, none.input(ch.x));
  CHECK(none.tangent(yn) == nullptr);
  CHECK(none.value(yn).to_host() == rec.value(yr).to_host());
}

TEST_CASE("forward tangents: backward, jvp and a late set_tangent are usage errors", "[tape][forward_tangents]") {
  const Chain ch;
  Tape<double> t(forward_tangents, ch.source());
  Var x = t.input(ch.x);
  Var y = ch.forward(t, x);
  CHECK_THROWS_WITH(t.backward(y, Tensor<double>(t.shape(y))),
                    Contains("forward-tangent mode") && Contains("default-constructed Tape"));
  CHECK_THROWS_WITH(t.jvp(ch.source()), Contains("forward-tangent mode") && Contains("tangent()"));
  CHECK_THROWS_WITH(t.set_tangent(x, ch.dx), Contains("input var 0 was already used"));
  Var z = t.input(ch.x, /*requires_grad=*/false);
  CHECK_THROWS_WITH(t.set_tangent(z, ch.dx), Contains("requires_grad = false"));
  CHECK_THROWS_WITH(t.set_tangent(y, ch.dx), Contains("not a leaf"));
  // A source tangent of the wrong shape is refused when the leaf is created.
  const Tensor<double> wrong({2, 2});
  Tape<double> bad(forward_tangents, [&](LeafKey) { return std::optional(wrong.view()); });
  CHECK_THROWS_WITH(bad.leaf_ref(ch.w1, 1, {}), Contains("leaf key 1 has shape [2, 2]"));
}

TEST_CASE("forward tangents: release_since frees all but the kept vars; a recorded tape keeps all",
          "[tape][forward_tangents]") {
  const Chain ch;
  Tape<double> t(forward_tangents, ch.source());
  Var x = t.input(ch.x);
  t.set_tangent(x, ch.dx);
  const TapeMark m = t.mark();
  Var h = linear(t, x, t.leaf_ref(ch.w1, 1, {}));
  Var y = add(t, h, h);
  const auto y_value = t.value(y).to_host();
  const auto y_tangent = t.tangent(y)->to_host();
  t.release_since(m, {y});
  CHECK(t.value(x).numel() == 12);  // before the mark: untouched
  CHECK(t.tangent(x) != nullptr);
  CHECK(t.value(y).to_host() == y_value);  // kept, with its tangent
  CHECK(t.tangent(y)->to_host() == y_tangent);
  CHECK_THROWS_WITH(t.value(h), Contains("var " + std::to_string(h.id) + " was released"));
  CHECK_THROWS_WITH(t.tangent(h), Contains("was released"));
  CHECK_THROWS_WITH(add(t, h, y), Contains("was released"));
  // A later release from the same mark frees what an earlier one kept.
  Var z = add(t, y, y);
  t.release_since(m, {z});
  CHECK_THROWS_WITH(t.value(y), Contains("var " + std::to_string(y.id) + " was released"));
  CHECK(t.value(z).numel() == 15);

  // Recording: a no-op, backward still reaches x through h.
  Tape<double> rec;
  Var xr = rec.input(ch.x);
  const TapeMark mr = rec.mark();
  Var hr = linear(rec, xr, rec.constant(ch.w1));
  Var yr = add(rec, hr, hr);
  rec.release_since(mr, {yr});
  CHECK(rec.value(hr).numel() == 15);
  rec.backward(yr, Tensor<double>::full(rec.shape(yr), 1.0));
  REQUIRE(rec.grad(xr) != nullptr);
}
