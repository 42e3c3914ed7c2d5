// Ground truth: take the real step and measure the entropy change on E by
// importance sampling (docs/math.md, (e) Ground truth).
//
// Parameters and optimizer state are snapshotted and restored bit-exactly,
// also when anything in between throws.
#pragma once

#include "entropy_probe/optim/adam.hpp"
#include "entropy_probe/probe/components.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>

namespace entropy_probe {

enum class StepKind { adam, precond_sgd };
enum class ISEstimator { snis, clip };

inline const char* to_string(StepKind s) { return s == StepKind::adam ? "adam" : "precond_sgd"; }
inline const char* to_string(ISEstimator e) { return e == ISEstimator::snis ? "snis" : "clip"; }

// The entropy before and after the step from per-sequence entropy terms
// (docs/math.md (e), (k)), each with its delta-method standard error over
// the prompts.
struct EntropyEstimates {
  double H_orig = 0, H_upd = 0, deltaH_true = 0;
  double H_orig_tok = 0, H_upd_tok = 0, deltaH_true_tok = 0;
  double SE_H_orig = 0, SE_H_upd = 0, SE_deltaH_true = 0;
};

// The sampled estimate (terms -S) in the base, the Rao-Blackwellised one
// (terms H, the full next-token entropies) beside it; both under the same
// importance weights.
struct GroundTruth : EntropyEstimates {
  double ESS = 0;
  std::optional<EntropyEstimates> rao_blackwell;
};

// The importance weights of the N sequences from S0 = S(theta), S1 =
// S(theta+): exp(logw - max logw) (snis) or min(exp(logw), clip_c) (clip).
inline std::vector<double> importance_weights(const std::vector<double>& S0, const std::vector<double>& S1,
                                              ISEstimator est, double clip_c) {
  if (S1.size() != S0.size()) fail<UsageError>("importance_weights: sizes {} / {}", S0.size(), S1.size());
  if (est == ISEstimator::clip && !(clip_c > 0))
    fail<UsageError>("importance sampling: clip_c = {} must be positive", clip_c);
  double max_logw = -std::numeric_limits<double>::infinity();
  for (std::size_t i = 0; i < S0.size(); ++i) max_logw = std::max(max_logw, S1[i] - S0[i]);
  std::vector<double> w(S0.size());
  for (std::size_t i = 0; i < S0.size(); ++i) {
    const double logw = S1[i] - S0[i];
    w[i] = est == ISEstimator::snis ? std::exp(logw - max_logw) : std::min(std::exp(logw), clip_c);
  }
  return w;
}

// Plain mean of h0 for H_orig, w-weighted mean of h1 for H_upd, over N =
// B G sequences in prompt-major order (G per prompt); token counts L for
// the per-token variants. The standard errors treat the B prompts as the
// independent units: per prompt the linearised deviation of each estimate,
// summed as sum_b psi_b^2 / (B max(B - 1, 1)) like (d)'s V_X.
inline EntropyEstimates weighted_entropies(const std::vector<double>& w, const std::vector<double>& h0,
                                           const std::vector<double>& h1, const std::vector<double>& L, index_t G) {
  const std::size_t n = w.size();
  if (n == 0 || h0.size() != n || h1.size() != n || L.size() != n)
    fail<UsageError>("weighted_entropies: sizes w {} / h0 {} / h1 {} / L {}", n, h0.size(), h1.size(), L.size());
  if (G < 1 || n % static_cast<std::size_t>(G) != 0)
    fail<UsageError>("weighted_entropies: {} sequences are not whole prompts of G = {}", n, G);
  double sum_h0 = 0, sum_l = 0, sw = 0, sw_h1 = 0, sw_l = 0;
  for (std::size_t i = 0; i < n; ++i) {
    sum_h0 += h0[i];
    sum_l += L[i];
    sw += w[i];
    sw_h1 += w[i] * h1[i];
    sw_l += w[i] * L[i];
  }
  EntropyEstimates e;
  e.H_orig = sum_h0 / double(n);
  e.H_upd = sw_h1 / sw;
  e.deltaH_true = e.H_upd - e.H_orig;
  e.H_orig_tok = sum_h0 / std::max(sum_l, 1.0);
  e.H_upd_tok = sw_h1 / std::max(sw_l, std::numeric_limits<double>::min());
  e.deltaH_true_tok = e.H_upd_tok - e.H_orig_tok;
  const auto g = static_cast<std::size_t>(G);
  const std::size_t prompts = n / g;
  const double w_mean = sw / double(prompts);  // per prompt
  double ss_orig = 0, ss_upd = 0, ss_delta = 0;
  for (std::size_t b = 0; b < prompts; ++b) {
    double a = 0, psi = 0;
    for (std::size_t i = b * g; i < (b + 1) * g; ++i) {
      a += h0[i];
      psi += w[i] * (h1[i] - e.H_upd);
    }
    a = a / double(G) - e.H_orig;
    psi /= w_mean;
    ss_orig += a * a;
    ss_upd += psi * psi;
    ss_delta += (psi - a) * (psi - a);
  }
  const double denom = double(prompts) * std::max(double(prompts) - 1.0, 1.0);
  e.SE_H_orig = std::sqrt(ss_orig / denom);
  e.SE_H_upd = std::sqrt(ss_upd / denom);
  e.SE_deltaH_true = std::sqrt(ss_delta / denom);
  return e;
}

// Entropy estimates from S0 = S(theta), S1 = S(theta+) and token counts L on
// the same N sequences (G per prompt): the sampled terms -S0, -S1, and with
// H0, H1 (the Rao-Blackwellised terms at theta and theta+) rao_blackwell.
inline GroundTruth importance_sampled_entropies(const std::vector<double>& S0, const std::vector<double>& S1,
                                                const std::vector<double>& L, ISEstimator est, double clip_c,
                                                index_t G = 1, const std::vector<double>* H0 = nullptr,
                                                const std::vector<double>* H1 = nullptr) {
  if (S0.empty() || S1.size() != S0.size() || L.size() != S0.size())
    fail<UsageError>("importance_sampled_entropies: sizes {} / {} / {}", S0.size(), S1.size(), L.size());
  const std::vector<double> w = importance_weights(S0, S1, est, clip_c);
  std::vector<double> h0(S0.size()), h1(S1.size());
  double sw = 0, sw2 = 0;
  for (std::size_t i = 0; i < S0.size(); ++i) {
    h0[i] = -S0[i];
    h1[i] = -S1[i];
    sw += w[i];
    sw2 += w[i] * w[i];
  }
  GroundTruth gt;
  static_cast<EntropyEstimates&>(gt) = weighted_entropies(w, h0, h1, L, G);
  gt.ESS = sw * sw / sw2;
  if (H0 || H1) {
    if (!H0 || !H1) fail<UsageError>("importance_sampled_entropies: Rao-Blackwellised terms before and after, or none");
    gt.rao_blackwell = weighted_entropies(w, *H0, *H1, L, G);
  }
  return gt;
}

// Copies of every registry parameter's grad (and value, unless values is
// false); restore() puts them back bit for bit.
template <class T, class B>
class ParameterSnapshot {
 public:
  explicit ParameterSnapshot(const Registry<T, B>& reg, bool values = true) : reg_(&reg) {
    for (const auto& e : reg.entries()) {
      if (values) values_.push_back(e.param->value);
      grads_.push_back(e.param->grad);
    }
  }
  void restore() const {
    for (index_t i = 0; i < reg_->size(); ++i) {
      if (!values_.empty()) reg_->entry(i).param->value = values_[static_cast<std::size_t>(i)];
      reg_->entry(i).param->grad = grads_[static_cast<std::size_t>(i)];
    }
  }

 private:
  const Registry<T, B>* reg_;
  std::vector<Tensor<T, B>> values_;
  std::vector<std::optional<Tensor<T, B>>> grads_;
};

// S and the Rao-Blackwellised entropies H of all rows of `batch` on this
// rank's shard, gathered in batch order.
template <CausalLM M>
SequenceStatistics gathered_sequence_statistics(const ProbeComponents<M>& c, const TokenBatch& batch,
                                                const char* phase) {
  const auto rows = static_cast<std::size_t>(batch.rows());
  std::vector<double> both(2 * rows, 0.0);  // S, then H: one allreduce
  c.for_each_microbatch(batch, phase, [&](const TokenBatch& mb, std::span<const index_t> prompts) {
    const SequenceStatistics part = sequence_statistics(c.model(), mb, c.settings().temperature, /*entropy=*/true);
    for (std::size_t j = 0; j < prompts.size(); ++j)
      for (index_t g = 0; g < batch.G; ++g) {
        const auto at = static_cast<std::size_t>(prompts[j] * batch.G + g);
        const std::size_t k = j * static_cast<std::size_t>(batch.G) + static_cast<std::size_t>(g);
        both[at] = part.S[k];
        both[rows + at] = part.H[k];
      }
  });
  c.comm().allreduce_sum(std::span<double>(both));
  return {{both.begin(), both.begin() + static_cast<std::ptrdiff_t>(rows)},
          {both.begin() + static_cast<std::ptrdiff_t>(rows), both.end()}};
}

// The step: `adam` applies AdamW with lr eta to the loss -(1/B_U) sum_u LY[u]
// (its gradient is -sum_Y_raw / B_U) on a copy of the optimizer state;
// `precond_sgd` sets theta += eta * mu_Y. `baseline` is S and the
// Rao-Blackwellised entropies on E at theta (ground_truth_baseline); they do
// not depend on the step, so a sweep over learning rates and directions
// computes them once. Without it they are computed here.
template <CausalLM M>
SequenceStatistics ground_truth_baseline(const ProbeComponents<M>& c, const TokenBatch& E) {
  return gathered_sequence_statistics(c, E, "ground_truth_baseline");
}

// The ground truth of any step: `step()` moves the registry parameters from
// theta to theta+; they (values and grads) are restored afterwards, also when
// anything throws. S1 on E is phase `phase`; S0 is `baseline` when given.
template <CausalLM M, class Step>
GroundTruth ground_truth_of_step(const ProbeComponents<M>& c, const TokenBatch& E, Step&& step, ISEstimator est,
                                 double clip_c, const SequenceStatistics* baseline = nullptr,
                                 const char* phase = "ground_truth") {
  using T = typename M::scalar_type;
  using B = typename M::backend_type;
  if (est == ISEstimator::clip && !(clip_c > 0))  // checked before any work, not only at the end
    fail<UsageError>("importance sampling: clip_c = {} must be positive", clip_c);
  if (baseline &&
      (baseline->S.size() != static_cast<std::size_t>(E.rows()) || baseline->H.size() != baseline->S.size()))
    fail<UsageError>("ground_truth: a baseline of {} / {} sequences for an E batch of {}", baseline->S.size(),
                     baseline->H.size(), E.rows());
  const SequenceStatistics before = baseline ? *baseline : ground_truth_baseline(c, E);
  const ParameterSnapshot<T, B> snapshot(c.registry());
  SequenceStatistics after;
  try {
    step();
    after = gathered_sequence_statistics(c, E, phase);
  } catch (...) {
    snapshot.restore();
    throw;
  }
  snapshot.restore();

  std::vector<double> L(before.S.size());
  for (index_t b = 0; b < E.B; ++b)
    for (index_t g = 0; g < E.G; ++g) L[static_cast<std::size_t>(b * E.G + g)] = double(E.gen_length(b, g));
  return importance_sampled_entropies(before.S, after.S, L, est, clip_c, E.G, &before.H, &after.H);
}

// theta += eta * v for the entries present in v (the others stay).
template <class T, class B>
void step_along(const Registry<T, B>& reg, const ParamBuffer<double, B>& v, double eta) {
  require_bound_to(v, reg, "step_along");
  for (index_t i = 0; i < reg.size(); ++i) {
    const auto* m = v.entry(i);
    if (!m) continue;
    T* p = reg.entry(i).param->value.data();
    const double* mp = m->data();
    B::parallel_for(m->numel(), [=] EP_HOST_DEVICE(index_t k) { p[k] = static_cast<T>(p[k] + eta * mp[k]); });
  }
}

// The ground truth of the step theta+ = theta + eta * v along any direction
// v (the precond_sgd kind is v = mu_Y; a single sequence's share v_{u,g} of
// a direction, docs/math.md (h)).
template <CausalLM M>
GroundTruth ground_truth_along(const ProbeComponents<M>& c, const TokenBatch& E,
                               const typename ProbeComponents<M>::Buffer& v, double eta, ISEstimator est, double clip_c,
                               const SequenceStatistics* baseline = nullptr, const char* phase = "ground_truth") {
  require_bound_to(v, c.registry(), "ground_truth_along");
  return ground_truth_of_step(
      c, E, [&] { step_along(c.registry(), v, eta); }, est, clip_c, baseline, phase);
}

template <CausalLM M>
GroundTruth ground_truth(const ProbeComponents<M>& c, const TokenBatch& E, StepKind kind, double eta,
                         const typename ProbeComponents<M>::Buffer& sum_Y_raw, index_t B_U,
                         const typename ProbeComponents<M>::Buffer& mu_Y,
                         const AdamState<typename M::scalar_type, typename M::backend_type>& state, ISEstimator est,
                         double clip_c, const SequenceStatistics* baseline = nullptr) {
  using T = typename M::scalar_type;
  using B = typename M::backend_type;
  const auto& reg = c.registry();
  require_bound_to(sum_Y_raw, reg, "ground_truth");
  require_bound_to(mu_Y, reg, "ground_truth");
  if (kind == StepKind::precond_sgd) return ground_truth_along(c, E, mu_Y, eta, est, clip_c, baseline);
  return ground_truth_of_step(
      c, E,
      [&] {
        AdamState<T, B> scratch = state;  // the loaded state itself is never touched
        load_param_gradients(reg, sum_Y_raw, -1.0 / double(B_U));
        adamw_step(reg, scratch, eta);
      },
      est, clip_c, baseline);
}

}  // namespace entropy_probe
