// Downstream smoke test: a host program using the installed (or
// add_subdirectory'd) library. One LoRA linear with trainable A and B over a
// frozen W: forward, backward, and a check that A and B got the right
// gradients and W none. Exit status 0 on success, 1 otherwise.
//
// It includes only the umbrella header, which also checks that the installed
// tree is complete and self-contained.
#include <entropy_probe/entropy_probe.hpp>

#include <cmath>
#include <cstdio>
#include <exception>
#include <optional>
#include <vector>

namespace ep = entropy_probe;

namespace {

ep::Tensor<double> iota(ep::Shape shape, double scale, double offset) {
  ep::Tensor<double> t(std::move(shape));
  for (ep::index_t i = 0; i < t.numel(); ++i) t[i] = scale * static_cast<double>(i) + offset;
  return t;
}

bool close(double a, double b) { return std::abs(a - b) <= 1e-12 * (1.0 + std::abs(b)); }

int run() {
  constexpr ep::index_t n = 3, in = 4, out = 2, r = 2;
  constexpr double scale = 0.5;
  const ep::Tensor<double> x = iota({n, in}, 0.1, -0.3);
  ep::Parameter<double> w(iota({out, in}, 0.05, 0.2), /*requires_grad=*/false);
  ep::Parameter<double> a(iota({r, in}, -0.07, 0.4));
  ep::Parameter<double> b(iota({out, r}, 0.3, -0.1));

  ep::Tape<double> tape;
  const ep::Var xv = tape.constant(x);
  const ep::Var y =
      ep::lora_linear(tape, xv, ep::use(tape, w), std::nullopt, ep::use(tape, a), ep::use(tape, b), scale);
  tape.backward(y, ep::Tensor<double>::full(tape.shape(y), 1.0));

  // Reference by plain loops: u = x A^T, y = x W^T + scale u B^T, and with
  // dy = 1: dB = scale * 1^T u, dA = scale * (1 B)^T x.
  int failures = 0;
  auto expect = [&](bool ok, const char* what) {
    if (!ok) {
      std::fprintf(stderr, "consumer: FAILED: %s\n", what);
      ++failures;
    }
  };
  std::vector<double> u(n * r, 0.0);
  for (ep::index_t i = 0; i < n; ++i)
    for (ep::index_t k = 0; k < r; ++k)
      for (ep::index_t j = 0; j < in; ++j) u[i * r + k] += x[i * in + j] * a.value[k * in + j];
  bool y_ok = tape.shape(y) == ep::Shape{n, out};
  for (ep::index_t i = 0; y_ok && i < n; ++i)
    for (ep::index_t o = 0; o < out; ++o) {
      double ref = 0.0;
      for (ep::index_t j = 0; j < in; ++j) ref += x[i * in + j] * w.value[o * in + j];
      for (ep::index_t k = 0; k < r; ++k) ref += scale * u[i * r + k] * b.value[o * r + k];
      y_ok = y_ok && close(tape.value(y)[i * out + o], ref);
    }
  expect(y_ok, "forward value of lora_linear");

  expect(!w.grad.has_value(), "frozen W must not receive a gradient");
  expect(a.grad.has_value() && a.grad->shape() == a.value.shape(), "A has a gradient of A's shape");
  expect(b.grad.has_value() && b.grad->shape() == b.value.shape(), "B has a gradient of B's shape");
  if (failures) return 1;

  bool db_ok = true, da_ok = true, nonzero = false;
  for (ep::index_t o = 0; o < out; ++o)
    for (ep::index_t k = 0; k < r; ++k) {
      double ref = 0.0;
      for (ep::index_t i = 0; i < n; ++i) ref += scale * u[i * r + k];
      db_ok = db_ok && close((*b.grad)[o * r + k], ref);
      nonzero = nonzero || (*b.grad)[o * r + k] != 0.0;
    }
  for (ep::index_t k = 0; k < r; ++k)
    for (ep::index_t j = 0; j < in; ++j) {
      double ref = 0.0;
      for (ep::index_t i = 0; i < n; ++i)
        for (ep::index_t o = 0; o < out; ++o) ref += scale * b.value[o * r + k] * x[i * in + j];
      da_ok = da_ok && close((*a.grad)[k * in + j], ref);
      nonzero = nonzero || (*a.grad)[k * in + j] != 0.0;
    }
  expect(db_ok, "gradient of B");
  expect(da_ok, "gradient of A");
  expect(nonzero, "gradients are not all zero");
  if (failures) return 1;

  std::printf("consumer: lora_linear forward/backward OK (y %s, dA %s, dB %s)\n", ep::shape_str(tape.shape(y)).c_str(),
              ep::shape_str(a.grad->shape()).c_str(), ep::shape_str(b.grad->shape()).c_str());
  return 0;
}

}  // namespace

int main() {
  try {
    return run();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "consumer: FAILED with exception: %s\n", e.what());
    return 1;
  }
}
