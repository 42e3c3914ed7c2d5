// Control variates for the first-order estimate (docs/math.md (m)).
//
// bars_dot = (1/B_E) sum_b s_b with s_b = sum_g y[b,g], y[b,g] = W[b,g] Sdot[b,g]
// (W the X loss weights, Sdot = grad S . mu_Y). Per prompt, features Z_b whose
// expectation under the policy is exactly zero are subtracted with
// coefficients fitted on the other prompts (cross-fitting):
//
//   s_cv_b = s_b - beta_{-b}^T Z_b,   E[s_cv_b] = E[s_b]
//
// because beta_{-b} depends only on prompts b' != b, which are independent
// of Z_b, and E[Z_b] = 0. Pure functions over host arrays: the probe feeds
// them from one forward-tangent pass (ProbeComponents::sequence_tangents).
#pragma once

#include "entropy_probe/core/config.hpp"
#include "entropy_probe/core/error.hpp"
#include "entropy_probe/core/log.hpp"

#include <algorithm>
#include <cmath>
#include <optional>
#include <span>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace entropy_probe {

// Per-sequence terms of an E batch, row b*G + g: the log-probability S, the
// Rao-Blackwellised entropy sum RB over the same scored positions
// (docs/math.md (k)), Sdot = grad S . v, and the scored length L.
struct SequenceTerms {
  index_t B = 0, G = 0;
  std::vector<double> S, RB, Sdot, L;
};

// Per-prompt features, row-major [prompts, names.size()]:
// Z[b,k] = sum_g z_k[b,g].
struct ControlVariateFeatures {
  std::vector<std::string> names;
  index_t prompts = 0;
  std::vector<double> Z;

  index_t count() const { return static_cast<index_t>(names.size()); }
  double at(index_t b, index_t k) const { return Z[static_cast<std::size_t>(b * count() + k)]; }
};

// The zero-mean features of docs/math.md (m), per sequence (b, g):
//   score                           Sdot                      E[grad S] = 0
//   score_x_loo_length              Sdot * mean_{g'!=g} L      (G > 1)
//   score_x_loo_surprisal_per_token Sdot * mean_{g'!=g} -S / max(L, 1)
//   score_x_loo_entropy_per_token   Sdot * mean_{g'!=g} RB / max(L, 1)
//   surprisal_minus_entropy         -S - RB                   (tower property per position)
// The leave-one-out statistics depend only on the group's other responses,
// i.i.d. with response g, so each product has mean E[Sdot] E[phi] = 0; they
// are undefined for G = 1 and then not listed.
inline ControlVariateFeatures control_variate_features(const SequenceTerms& t) {
  if (t.B < 0 || t.G < 1) fail<UsageError>("control_variate_features: B = {}, G = {}", t.B, t.G);
  const auto rows = static_cast<std::size_t>(t.B * t.G);
  for (auto [name, v] :
       {std::pair{"S", &t.S}, std::pair{"RB", &t.RB}, std::pair{"Sdot", &t.Sdot}, std::pair{"L", &t.L}})
    if (v->size() != rows)
      fail<UsageError>("control_variate_features: {} has {} values for B * G = {} * {} sequences", name, v->size(), t.B,
                       t.G);
  ControlVariateFeatures f;
  f.prompts = t.B;
  f.names.push_back("score");
  if (t.G > 1)
    for (const char* n : {"score_x_loo_length", "score_x_loo_surprisal_per_token", "score_x_loo_entropy_per_token"})
      f.names.push_back(n);
  f.names.push_back("surprisal_minus_entropy");
  const index_t K = f.count();
  f.Z.assign(static_cast<std::size_t>(t.B * K), 0.0);
  const auto G = static_cast<std::size_t>(t.G);
  for (index_t b = 0; b < t.B; ++b) {
    const std::size_t r0 = static_cast<std::size_t>(b) * G;
    double len = 0, surprisal = 0, entropy = 0;  // group sums of the per-sequence statistics
    for (std::size_t g = 0; g < G; ++g) {
      const double per_token = 1.0 / std::max(t.L[r0 + g], 1.0);
      len += t.L[r0 + g];
      surprisal += -t.S[r0 + g] * per_token;
      entropy += t.RB[r0 + g] * per_token;
    }
    double* z = f.Z.data() + static_cast<std::size_t>(b * K);
    for (std::size_t g = 0; g < G; ++g) {
      const std::size_t r = r0 + g;
      const double sdot = t.Sdot[r];
      index_t k = 0;
      z[k++] += sdot;
      if (t.G > 1) {
        const double others = double(t.G - 1), per_token = 1.0 / std::max(t.L[r], 1.0);
        z[k++] += sdot * (len - t.L[r]) / others;
        z[k++] += sdot * (surprisal + t.S[r] * per_token) / others;
        z[k++] += sdot * (entropy - t.RB[r] * per_token) / others;
      }
      z[k++] += -t.S[r] - t.RB[r];
    }
  }
  return f;
}

// A feature is dropped from a least-squares fit when its component
// orthogonal to the constant and to the features kept before it (in the
// listed order), over the fit's prompts, has at most this fraction of its
// own norm (a feature that is constant over them always): its coefficient
// is then 0.
inline constexpr double kControlVariateDropTolerance = 1e-9;

// Least squares of s on an intercept and the columns of Z over the prompts
// `rows` (a centred fit: s and every column centred at their means over
// `rows`), by Gram-Schmidt with reorthogonalisation in the listed column
// order and the drop rule above. Returns one coefficient per feature; the
// intercept is not returned (only beta^T Z is ever subtracted).
inline std::vector<double> control_variate_fit(std::span<const double> s, const ControlVariateFeatures& f,
                                               std::span<const index_t> rows) {
  const index_t K = f.count();
  const std::size_t n = rows.size();
  std::vector<std::vector<double>> q;  // orthonormal centred columns over `rows`, one per kept feature
  std::vector<std::vector<double>> r;  // r[j][l]: upper triangular, row j of the kept features
  std::vector<index_t> kept;
  for (index_t k = 0; k < K; ++k) {
    std::vector<double> a(n);
    double mean = 0;
    for (std::size_t i = 0; i < n; ++i) mean += f.at(rows[i], k) / double(n);
    double norm0 = 0;
    for (std::size_t i = 0; i < n; ++i) {
      a[i] = f.at(rows[i], k);
      norm0 += a[i] * a[i];
      a[i] -= mean;
    }
    norm0 = std::sqrt(norm0);
    if (norm0 == 0) continue;
    std::vector<double> coef(q.size(), 0.0);
    for (int pass = 0; pass < 2; ++pass)  // twice is enough (Kahan / Parlett)
      for (std::size_t j = 0; j < q.size(); ++j) {
        double d = 0;
        for (std::size_t i = 0; i < n; ++i) d += q[j][i] * a[i];
        for (std::size_t i = 0; i < n; ++i) a[i] -= d * q[j][i];
        coef[j] += d;
      }
    double norm = 0;
    for (double x : a) norm += x * x;
    norm = std::sqrt(norm);
    if (norm <= kControlVariateDropTolerance * norm0) continue;
    for (double& x : a) x /= norm;
    for (std::size_t j = 0; j < q.size(); ++j) r[j].push_back(coef[j]);
    r.emplace_back(q.size(), 0.0);
    r.back().push_back(norm);
    q.push_back(std::move(a));
    kept.push_back(k);
  }
  // R beta = Q^T s by back substitution (the q are centred, so Q^T s is Q^T
  // of the centred s).
  const std::size_t m = kept.size();
  std::vector<double> c(m, 0.0), beta_kept(m, 0.0);
  for (std::size_t j = 0; j < m; ++j)
    for (std::size_t i = 0; i < n; ++i) c[j] += q[j][i] * s[static_cast<std::size_t>(rows[i])];
  for (std::size_t j = m; j-- > 0;) {
    double acc = c[j];
    for (std::size_t l = j + 1; l < m; ++l) acc -= r[j][l] * beta_kept[l];
    beta_kept[j] = acc / r[j][j];
  }
  std::vector<double> beta(static_cast<std::size_t>(K), 0.0);
  for (std::size_t j = 0; j < m; ++j) beta[static_cast<std::size_t>(kept[j])] = beta_kept[j];
  return beta;
}

// The control-variate estimate next to the plain one, both from the same
// per-prompt values s_b. deltaH1 values and standard errors carry the
// factor eta; beta is the fit over all prompts (reported only: each s_cv_b
// uses its own beta_{-b}).
struct ControlVariates {
  std::vector<std::string> features;
  std::vector<double> beta;
  std::vector<double> s, s_cv;             // per prompt
  double deltaH1_plain = 0, SE_plain = 0;  // eta mean(s), eta sqrt(var(s) / B_E)
  double deltaH1 = 0, SE = 0;              // eta mean(s_cv), eta sqrt(var(s_cv) / B_E)
};

// Sample mean and eta * sqrt(var / n), var with the n - 1 denominator.
inline std::pair<double, double> mean_and_standard_error(std::span<const double> x, double eta) {
  const double n = static_cast<double>(x.size());
  double sum = 0;
  for (double v : x) sum += v;
  const double mean = sum / n;
  double ss = 0;
  for (double v : x) ss += (v - mean) * (v - mean);
  return {eta * mean, eta * std::sqrt(ss / (n - 1.0) / n)};
}

// The cross-fitted estimate of docs/math.md (m). With fewer than K + 2
// prompts (K features: a fold of B_E - 1 prompts then has fewer than the
// K + 1 needed to determine an intercept and K coefficients) it is not
// computed: a warning names the counts and the result is empty.
inline std::optional<ControlVariates> control_variate_estimate(std::span<const double> s,
                                                               const ControlVariateFeatures& f, double eta) {
  const index_t B = f.prompts, K = f.count();
  if (static_cast<index_t>(s.size()) != B || f.Z.size() != static_cast<std::size_t>(B * K))
    fail<UsageError>("control_variate_estimate: {} values s_b, {} feature values for {} prompts x {} features",
                     s.size(), f.Z.size(), B, K);
  if (!(eta > 0) || !std::isfinite(eta))
    fail<UsageError>("control_variate_estimate: eta = {} must be positive and finite", eta);
  for (index_t b = 0; b < B; ++b) {
    if (!std::isfinite(s[static_cast<std::size_t>(b)]))
      fail<InputError>("control_variate_estimate: s_{} = {} is not finite", b, s[static_cast<std::size_t>(b)]);
    for (index_t k = 0; k < K; ++k)
      if (!std::isfinite(f.at(b, k)))
        fail<InputError>("control_variate_estimate: feature {} of prompt {} is {}",
                         f.names[static_cast<std::size_t>(k)], b, f.at(b, k));
  }
  if (B < K + 2) {
    log_warning(
        "control variates: B_E = {} prompts for {} features; the cross-fitted estimate needs at least {} (features "
        "+ 2), not computed",
        B, K, K + 2);
    return std::nullopt;
  }
  ControlVariates cv;
  cv.features = f.names;
  cv.s.assign(s.begin(), s.end());
  cv.s_cv.resize(static_cast<std::size_t>(B));
  std::vector<index_t> all(static_cast<std::size_t>(B)), others;
  for (index_t b = 0; b < B; ++b) all[static_cast<std::size_t>(b)] = b;
  for (index_t b = 0; b < B; ++b) {
    others.clear();
    for (index_t o : all)
      if (o != b) others.push_back(o);
    const std::vector<double> beta = control_variate_fit(s, f, others);
    double correction = 0;
    for (index_t k = 0; k < K; ++k) correction += beta[static_cast<std::size_t>(k)] * f.at(b, k);
    cv.s_cv[static_cast<std::size_t>(b)] = s[static_cast<std::size_t>(b)] - correction;
  }
  cv.beta = control_variate_fit(s, f, all);
  std::tie(cv.deltaH1_plain, cv.SE_plain) = mean_and_standard_error(cv.s, eta);
  std::tie(cv.deltaH1, cv.SE) = mean_and_standard_error(cv.s_cv, eta);
  return cv;
}

}  // namespace entropy_probe
