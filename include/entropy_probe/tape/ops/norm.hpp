// Layer norm and RMS norm over the last dimension D, forward / VJP / JVP side
// by side. x is [..., D], viewed as N rows; gamma and beta are [D].
//
//   layer_norm (PyTorch semantics: biased variance, eps inside the sqrt):
//     mu = mean_j x_j,  var = mean_j (x_j - mu)^2,  rstd = 1 / sqrt(var + eps)
//     xhat = (x - mu) rstd,  y = xhat * gamma + beta
//   rms_norm (Llama/Qwen2):
//     rstd = 1 / sqrt(mean_j x_j^2 + eps),  xhat = x rstd,  y = xhat * gamma
//
// Per row, with g = dy * gamma (the cotangent of xhat) and <.> the row mean:
//   layer_norm  dx = rstd (g - <g> - xhat <g xhat>)
//   rms_norm    dx = rstd (g - xhat <g xhat>)
//   both        dgamma += sum_rows dy * xhat,   dbeta += sum_rows dy
// The linearisation xhat -> txhat is the same (self-adjoint) projection:
//   layer_norm  txhat = rstd (tx - <tx> - xhat <xhat tx>)
//   rms_norm    txhat = rstd (tx - xhat <xhat tx>)
//   ty = gamma * txhat + xhat * tgamma (+ tbeta)
//
// Row statistics are accumulated and saved in acc_t (double) whatever T is;
// the forward saves per-row mean and rstd so backward and JVP rebuild xhat
// without another reduction. A row's reduction and the pass that uses it go
// through the backend's fused row_sum_apply (a block per row on a device, a
// row at a time on the CPU); layer norm's second statistic is a row_sum
// before it. Parameter gradients are column sums: one parallel index per
// feature, rows summed inside (deterministic, no atomics).
#pragma once

#include "entropy_probe/tape/tape.hpp"
#include "entropy_probe/tensor/blas.hpp"

#include <cmath>

namespace entropy_probe {

namespace detail {
// What a norm's rules share: the per-row statistics of the forward, in acc_t
// (layer norm's mean; rms norm leaves it empty).
template <class B>
struct NormRowStats {
  Tensor<acc_t, B> mean;  // [N]
  Tensor<acc_t, B> rstd;  // [N]
};

// Number of features D (the last dimension, at least 1) of a normalised input.
template <class T, class B>
index_t norm_features(const Tape<T, B>& tape, Var x, const char* op) {
  const Shape& s = tape.shape(x);
  if (s.empty() || s.back() < 1)
    fail<UsageError>("{}: input shape {} has no feature dimension to normalise over", op, shape_str(s));
  return s.back();
}
template <class T, class B>
void norm_check_param(const Tape<T, B>& tape, Var p, index_t d, const char* op, const char* what) {
  if (tape.shape(p) != Shape{d})
    fail<UsageError>("{}: {} has shape {}, expected [{}] to match the input's last dimension", op, what,
                     shape_str(tape.shape(p)), d);
}
inline void norm_check_eps(double eps, const char* op) {
  if (!(eps >= 0.0) || !std::isfinite(eps)) fail<UsageError>("{}: eps = {} must be finite and non-negative", op, eps);
}
}  // namespace detail

// y = (x - mean) / sqrt(var + eps) * gamma + beta over the last dimension.
template <class T, class B>
Var layer_norm(Tape<T, B>& tape, Var x, Var gamma, Var beta, double eps) {
  const index_t d = detail::norm_features(tape, x, "layer_norm");
  detail::norm_check_param(tape, gamma, d, "layer_norm", "gamma");
  detail::norm_check_param(tape, beta, d, "layer_norm", "beta");
  detail::norm_check_eps(eps, "layer_norm");
  const index_t n = tape.value(x).numel() / d;

  // forward: two-pass mean / variance per row in double
  auto y = Tensor<T, B>::uninitialized(tape.shape(x));  // all three written in full below
  auto mean = Tensor<acc_t, B>::uninitialized({n}), rstd = Tensor<acc_t, B>::uninitialized({n});
  {
    const T* xp = tape.value(x).data();
    const T* gp = tape.value(gamma).data();
    const T* bp = tape.value(beta).data();
    T* yp = y.data();
    acc_t* mp = mean.data();
    acc_t* rp = rstd.data();
    const acc_t e = eps;
    // the row sums into `mean`, then the variance pass, whose statistic step
    // turns the sum into the mean (before the pass that reads it)
    B::row_sum(
        n, d, [=] EP_HOST_DEVICE(index_t r, index_t j) { return static_cast<acc_t>(xp[r * d + j]); }, mp);
    B::row_sum_apply(
        n, d, [=] EP_HOST_DEVICE(index_t) { return d; },
        [=] EP_HOST_DEVICE(index_t r, index_t j) {
          const acc_t c = static_cast<acc_t>(xp[r * d + j]) - mp[r] / static_cast<acc_t>(d);
          return c * c;
        },
        [=] EP_HOST_DEVICE(index_t r, acc_t v) {
          mp[r] = mp[r] / static_cast<acc_t>(d);
          return rp[r] = 1.0 / std::sqrt(v / static_cast<acc_t>(d) + e);
        },
        [=] EP_HOST_DEVICE(index_t r, index_t j, acc_t rs) {
          const acc_t xh = (static_cast<acc_t>(xp[r * d + j]) - mp[r]) * rs;
          yp[r * d + j] = static_cast<T>(xh * static_cast<acc_t>(gp[j]) + static_cast<acc_t>(bp[j]));
        });
  }
  const auto stats = save_for_rules(detail::NormRowStats<B>{std::move(mean), std::move(rstd)});

  auto backward = [&tape, x, gamma, beta, n, d, stats](Var self) {
    const T* gy = tape.grad_data(self);
    const T* xp = tape.value(x).data();
    const T* gp = tape.value(gamma).data();
    const acc_t* mp = stats->mean.data();
    const acc_t* rp = stats->rstd.data();
    if (tape.requires_grad(x)) {                          // dx = rstd (g - <g> - xhat <g xhat>),  g = dy * gamma
      const OutRef<T, B> gx = tape.grad_into(x);          // each element written once: assigns when fresh
      auto sum_g = Tensor<acc_t, B>::uninitialized({n});  // sum_j g, then <g xhat> in the fused pass
      acc_t* sg = sum_g.data();
      B::row_sum(
          n, d,
          [=] EP_HOST_DEVICE(index_t r, index_t j) {
            return static_cast<acc_t>(gy[r * d + j]) * static_cast<acc_t>(gp[j]);
          },
          sg);
      B::row_sum_apply(
          n, d, [=] EP_HOST_DEVICE(index_t) { return d; },
          [=] EP_HOST_DEVICE(index_t r, index_t j) {
            const index_t i = r * d + j;
            const acc_t g = static_cast<acc_t>(gy[i]) * static_cast<acc_t>(gp[j]);
            return g * (static_cast<acc_t>(xp[i]) - mp[r]) * rp[r];
          },
          [=] EP_HOST_DEVICE(index_t, acc_t s) { return s / static_cast<acc_t>(d); },
          [=] EP_HOST_DEVICE(index_t r, index_t j, acc_t sgx) {
            const index_t i = r * d + j;
            const acc_t rs = rp[r], g = static_cast<acc_t>(gy[i]) * static_cast<acc_t>(gp[j]);
            const acc_t xh = (static_cast<acc_t>(xp[i]) - mp[r]) * rs;
            gx.add(i, static_cast<T>(rs * (g - sg[r] / static_cast<acc_t>(d) - xh * sgx)));
          });
    }
    if (tape.requires_grad(gamma)) {                  // dgamma_j += sum_r dy[r, j] xhat[r, j]
      const OutRef<T, B> gg = tape.grad_into(gamma);  // each column written once: assigns when fresh
      B::parallel_for(d, [=] EP_HOST_DEVICE(index_t j) {
        acc_t s = 0;
        for (index_t r = 0; r < n; ++r)
          s += static_cast<acc_t>(gy[r * d + j]) * (static_cast<acc_t>(xp[r * d + j]) - mp[r]) * rp[r];
        gg.add(j, static_cast<T>(s));
      });
    }
    if (tape.requires_grad(beta)) blas::add_column_sums<B>(n, d, T(1), gy, tape.grad_into(beta).zeroed());
  };

  auto jvp = [&tape, x, gamma, beta, n, d, stats](Var self) {
    SumOut<T, B> ty(tape.tangent_into(self));  // the first term assigns
    const T* xp = tape.value(x).data();
    const T* gp = tape.value(gamma).data();
    const acc_t* mp = stats->mean.data();
    const acc_t* rp = stats->rstd.data();
    if (const T* tx = tape.tangent_data(x)) {  // ty += gamma * rstd (tx - <tx> - xhat <xhat tx>)
      const OutRef<T, B> to = ty.term();
      auto sum_t = Tensor<acc_t, B>::uninitialized({n});  // sum_j tx, then <xhat tx> in the fused pass
      acc_t* st = sum_t.data();
      B::row_sum(
          n, d, [=] EP_HOST_DEVICE(index_t r, index_t j) { return static_cast<acc_t>(tx[r * d + j]); }, st);
      B::row_sum_apply(
          n, d, [=] EP_HOST_DEVICE(index_t) { return d; },
          [=] EP_HOST_DEVICE(index_t r, index_t j) {
            const index_t i = r * d + j;
            return (static_cast<acc_t>(xp[i]) - mp[r]) * rp[r] * static_cast<acc_t>(tx[i]);
          },
          [=] EP_HOST_DEVICE(index_t, acc_t s) { return s / static_cast<acc_t>(d); },
          [=] EP_HOST_DEVICE(index_t r, index_t j, acc_t sxt) {
            const index_t i = r * d + j;
            const acc_t rs = rp[r], xh = (static_cast<acc_t>(xp[i]) - mp[r]) * rs;
            const acc_t txh = rs * (static_cast<acc_t>(tx[i]) - st[r] / static_cast<acc_t>(d) - xh * sxt);
            to.add(i, static_cast<T>(static_cast<acc_t>(gp[j]) * txh));
          });
    }
    if (const T* tg = tape.tangent_data(gamma)) {  // ty += xhat * tgamma
      const OutRef<T, B> to = ty.term();
      B::parallel_for(n * d, [=] EP_HOST_DEVICE(index_t i) {
        const index_t r = i / d;
        const acc_t xh = (static_cast<acc_t>(xp[i]) - mp[r]) * rp[r];
        to.add(i, static_cast<T>(xh * static_cast<acc_t>(tg[i - r * d])));
      });
    }
    if (const T* tb = tape.tangent_data(beta)) blas::add_row_vector<B>(n, d, tb, ty.zeroed());  // ty += tbeta
    ty.zeroed();  // no term: a zero tangent
  };
  return tape.record("layer_norm", std::move(y), {x, gamma, beta}, std::move(backward), std::move(jvp));
}

// y = x / sqrt(mean(x^2) + eps) * gamma over the last dimension.
template <class T, class B>
Var rms_norm(Tape<T, B>& tape, Var x, Var gamma, double eps) {
  const index_t d = detail::norm_features(tape, x, "rms_norm");
  detail::norm_check_param(tape, gamma, d, "rms_norm", "gamma");
  detail::norm_check_eps(eps, "rms_norm");
  const index_t n = tape.value(x).numel() / d;

  // forward
  auto y = Tensor<T, B>::uninitialized(tape.shape(x));  // both written in full below
  auto rstd = Tensor<acc_t, B>::uninitialized({n});
  {
    const T* xp = tape.value(x).data();
    const T* gp = tape.value(gamma).data();
    T* yp = y.data();
    acc_t* rp = rstd.data();
    const acc_t e = eps;
    B::row_sum_apply(
        n, d, [=] EP_HOST_DEVICE(index_t) { return d; },
        [=] EP_HOST_DEVICE(index_t r, index_t j) {
          const acc_t v = static_cast<acc_t>(xp[r * d + j]);
          return v * v;
        },
        [=] EP_HOST_DEVICE(index_t r, acc_t ss) { return rp[r] = 1.0 / std::sqrt(ss / static_cast<acc_t>(d) + e); },
        [=] EP_HOST_DEVICE(index_t r, index_t j, acc_t rs) {
          yp[r * d + j] = static_cast<T>(static_cast<acc_t>(xp[r * d + j]) * rs * static_cast<acc_t>(gp[j]));
        });
  }
  const auto stats = save_for_rules(detail::NormRowStats<B>{{}, std::move(rstd)});

  auto backward = [&tape, x, gamma, n, d, stats](Var self) {
    const T* gy = tape.grad_data(self);
    const T* xp = tape.value(x).data();
    const T* gp = tape.value(gamma).data();
    const acc_t* rp = stats->rstd.data();
    if (tape.requires_grad(x)) {                  // dx = rstd (g - xhat <g xhat>),  g = dy * gamma
      const OutRef<T, B> gx = tape.grad_into(x);  // each element written once: assigns when fresh
      B::row_sum_apply(
          n, d, [=] EP_HOST_DEVICE(index_t) { return d; },
          [=] EP_HOST_DEVICE(index_t r, index_t j) {
            const index_t i = r * d + j;
            return static_cast<acc_t>(gy[i]) * static_cast<acc_t>(gp[j]) * static_cast<acc_t>(xp[i]) * rp[r];
          },
          [=] EP_HOST_DEVICE(index_t, acc_t s) { return s / static_cast<acc_t>(d); },
          [=] EP_HOST_DEVICE(index_t r, index_t j, acc_t sgx) {
            const index_t i = r * d + j;
            const acc_t rs = rp[r], g = static_cast<acc_t>(gy[i]) * static_cast<acc_t>(gp[j]);
            gx.add(i, static_cast<T>(rs * (g - static_cast<acc_t>(xp[i]) * rs * sgx)));
          });
    }
    if (tape.requires_grad(gamma)) {                  // dgamma_j += sum_r dy[r, j] xhat[r, j]
      const OutRef<T, B> gg = tape.grad_into(gamma);  // each column written once: assigns when fresh
      B::parallel_for(d, [=] EP_HOST_DEVICE(index_t j) {
        acc_t s = 0;
        for (index_t r = 0; r < n; ++r)
          s += static_cast<acc_t>(gy[r * d + j]) * static_cast<acc_t>(xp[r * d + j]) * rp[r];
        gg.add(j, static_cast<T>(s));
      });
    }
  };

  auto jvp = [&tape, x, gamma, n, d, stats](Var self) {
    SumOut<T, B> ty(tape.tangent_into(self));  // the first term assigns
    const T* xp = tape.value(x).data();
    const T* gp = tape.value(gamma).data();
    const acc_t* rp = stats->rstd.data();
    if (const T* tx = tape.tangent_data(x)) {  // ty += gamma * rstd (tx - xhat <xhat tx>)
      const OutRef<T, B> to = ty.term();
      B::row_sum_apply(
          n, d, [=] EP_HOST_DEVICE(index_t) { return d; },
          [=] EP_HOST_DEVICE(index_t r, index_t j) {
            const index_t i = r * d + j;
            return static_cast<acc_t>(xp[i]) * rp[r] * static_cast<acc_t>(tx[i]);
          },
          [=] EP_HOST_DEVICE(index_t, acc_t s) { return s / static_cast<acc_t>(d); },
          [=] EP_HOST_DEVICE(index_t r, index_t j, acc_t sxt) {
            const index_t i = r * d + j;
            const acc_t rs = rp[r], xh = static_cast<acc_t>(xp[i]) * rs;
            const acc_t txh = rs * (static_cast<acc_t>(tx[i]) - xh * sxt);
            to.add(i, static_cast<T>(static_cast<acc_t>(gp[j]) * txh));
          });
    }
    if (const T* tg = tape.tangent_data(gamma)) {  // ty += xhat * tgamma
      const OutRef<T, B> to = ty.term();
      B::parallel_for(n * d, [=] EP_HOST_DEVICE(index_t i) {
        const index_t r = i / d;
        to.add(i, static_cast<T>(static_cast<acc_t>(xp[i]) * rp[r] * static_cast<acc_t>(tg[i - r * d])));
      });
    }
    ty.zeroed();  // no term: a zero tangent
  };
  return tape.record("rms_norm", std::move(y), {x, gamma}, std::move(backward), std::move(jvp));
}

}  // namespace entropy_probe
