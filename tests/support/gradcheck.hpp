// Finite-difference checks of an op's VJP and JVP rules, in double.
//
// For a function f built on a tape from inputs x_i, with a random cotangent c
// and random tangents t_i:
//   VJP: every element of grad_i <c, f> against the central difference of
//        <c, f(x)> in that element;
//   JVP: the output tangent against the central difference of f along t;
//   and <c, J t> = sum_i <grad_i, t_i>, which must hold to rounding.
// Errors are relative to the largest magnitude of the quantity compared.
#pragma once

#include <entropy_probe/tape/tape.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>
#include <vector>

namespace ep_test {

using entropy_probe::index_t;
using entropy_probe::Shape;
using entropy_probe::Tape;
using entropy_probe::Var;
using TensorD = entropy_probe::Tensor<double>;

inline TensorD random_tensor(Shape shape, std::mt19937_64& rng, double scale = 1.0) {
  TensorD t(std::move(shape));
  std::normal_distribution<double> nd(0.0, scale);
  for (index_t i = 0; i < t.numel(); ++i) t[i] = nd(rng);
  return t;
}

struct GradcheckInput {
  TensorD value;
  bool differentiable = true;
};

using BuildFn = std::function<Var(Tape<double>&, const std::vector<Var>&)>;

struct GradcheckResult {
  double vjp_rel_err = 0;
  double jvp_rel_err = 0;
  double dual_rel_err = 0;  // <c, J t> vs sum <g, t>
};

// Relative error of a against reference b: max|a - b| / max(max|b|, floor).
inline double rel_err(const std::vector<double>& a, const std::vector<double>& b, double floor = 1e-12) {
  double num = 0, den = floor;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::abs(a[i] - b[i]));
    den = std::max(den, std::abs(b[i]));
  }
  return num / den;
}

inline GradcheckResult gradcheck(const std::vector<GradcheckInput>& inputs, const BuildFn& build,
                                 std::uint64_t seed = 7, double h = 1e-5) {
  std::mt19937_64 rng(seed);
  auto eval = [&](const std::vector<TensorD>& xs) {
    Tape<double> tape;
    std::vector<Var> vars;
    for (std::size_t i = 0; i < xs.size(); ++i) vars.push_back(tape.input(xs[i], inputs[i].differentiable));
    Var y = build(tape, vars);
    return tape.value(y);
  };
  std::vector<TensorD> xs;
  for (const auto& in : inputs) xs.push_back(in.value);

  // Analytic VJP and JVP on one tape.
  Tape<double> tape;
  std::vector<Var> vars;
  for (std::size_t i = 0; i < xs.size(); ++i) vars.push_back(tape.input(xs[i], inputs[i].differentiable));
  Var y = build(tape, vars);
  const TensorD y0 = tape.value(y);
  const TensorD cot = random_tensor(y0.shape(), rng);
  std::vector<TensorD> tangents;
  for (std::size_t i = 0; i < xs.size(); ++i) {
    tangents.push_back(random_tensor(xs[i].shape(), rng));
    if (inputs[i].differentiable) tape.set_tangent(vars[i], tangents[i]);
  }
  tape.backward(y, cot);
  tape.jvp();

  GradcheckResult res;
  double dual_lhs = 0, dual_rhs = 0, dual_scale = 0;
  // VJP, element by element.
  std::vector<double> ana_all, fd_all;
  for (std::size_t i = 0; i < xs.size(); ++i) {
    if (!inputs[i].differentiable) continue;
    const TensorD* g = tape.grad(vars[i]);
    for (index_t k = 0; k < xs[i].numel(); ++k) {
      std::vector<TensorD> xp = xs, xm = xs;
      xp[i][k] += h;
      xm[i][k] -= h;
      const TensorD fp = eval(xp), fm = eval(xm);
      double d = 0;
      for (index_t j = 0; j < cot.numel(); ++j) d += cot[j] * (fp[j] - fm[j]);
      fd_all.push_back(d / (2 * h));
      ana_all.push_back(g ? (*g)[k] : 0.0);
      const double gt = (g ? (*g)[k] : 0.0) * tangents[i][k];
      dual_rhs += gt;
      dual_scale += std::abs(gt);
    }
  }
  res.vjp_rel_err = rel_err(ana_all, fd_all);

  // JVP along all tangents at once.
  std::vector<TensorD> xp = xs, xm = xs;
  for (std::size_t i = 0; i < xs.size(); ++i) {
    if (!inputs[i].differentiable) continue;
    for (index_t k = 0; k < xs[i].numel(); ++k) {
      xp[i][k] += h * tangents[i][k];
      xm[i][k] -= h * tangents[i][k];
    }
  }
  const TensorD fp = eval(xp), fm = eval(xm);
  const auto* ty = tape.tangent(y);
  std::vector<double> jvp_ana, jvp_fd;
  for (index_t j = 0; j < y0.numel(); ++j) {
    jvp_fd.push_back((fp[j] - fm[j]) / (2 * h));
    jvp_ana.push_back(ty ? (*ty)[j] : 0.0);
    dual_lhs += cot[j] * jvp_ana.back();
    dual_scale += std::abs(cot[j] * jvp_ana.back());
  }
  res.jvp_rel_err = rel_err(jvp_ana, jvp_fd);
  res.dual_rel_err = std::abs(dual_lhs - dual_rhs) / std::max(dual_scale, 1e-300);
  return res;
}

// The bound every op test uses (double, central differences, h = 1e-5):
// truncation ~h^2 and rounding ~1e-16/h both sit near 1e-10, so 1e-7 leaves
// margin for ill-conditioned elements without hiding a wrong rule (a wrong
// rule is off by O(1)). The duality check is exact up to rounding.
inline constexpr double kFdTol = 1e-7;
inline constexpr double kDualTol = 1e-12;

inline void require_gradcheck(const std::vector<GradcheckInput>& inputs, const BuildFn& build, std::uint64_t seed = 7) {
  const GradcheckResult r = gradcheck(inputs, build, seed);
  INFO("vjp_rel_err=" << r.vjp_rel_err << " jvp_rel_err=" << r.jvp_rel_err << " dual_rel_err=" << r.dual_rel_err);
  CHECK(r.vjp_rel_err < kFdTol);
  CHECK(r.jvp_rel_err < kFdTol);
  CHECK(r.dual_rel_err < kDualTol);
}

// Max |y_float - y_double| / max |y_double| of one op's forward, both run on
// the same float-representable inputs so only the op's own rounding shows.
template <class Build>
inline double float_vs_double(const std::vector<TensorD>& xs, Build build) {
  Tape<double> td;
  Tape<float> tf;
  std::vector<Var> vd, vf;
  for (const TensorD& x : xs) {
    const entropy_probe::Tensor<float> xf = x.template cast<float>();
    vf.push_back(tf.input(xf));
    vd.push_back(td.input(xf.cast<double>()));
  }
  const TensorD yd = td.value(build(td, vd));
  const entropy_probe::Tensor<float> yf = tf.value(build(tf, vf));
  REQUIRE(yd.shape() == yf.shape());
  double num = 0, den = 1e-300;
  for (index_t i = 0; i < yd.numel(); ++i) {
    num = std::max(num, std::abs(static_cast<double>(yf[i]) - yd[i]));
    den = std::max(den, std::abs(yd[i]));
  }
  return num / den;
}

}  // namespace ep_test
