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

namespace entropy_probe {

enum class StepKind { adam, precond_sgd };
enum class ISEstimator { snis, clip };

inline const char* to_string(StepKind s) { return s == StepKind::adam ? "adam" : "precond_sgd"; }
inline const char* to_string(ISEstimator e) { return e == ISEstimator::snis ? "snis" : "clip"; }

struct GroundTruth {
  double H_orig = 0, H_upd = 0, deltaH_true = 0;
  double H_orig_tok = 0, H_upd_tok = 0, deltaH_true_tok = 0;
  double ESS = 0;
};

// Entropy estimates from S0 = S(theta), S1 = S(theta+) and token counts L on
// the same N sequences: plain mean for H_orig, importance-weighted for H_upd.
inline GroundTruth importance_sampled_entropies(const std::vector<double>& S0, const std::vector<double>& S1,
                                                const std::vector<double>& L, ISEstimator est, double clip_c) {
  const std::size_t n = S0.size();
  if (n == 0 || S1.size() != n || L.size() != n)
    fail<UsageError>("importance_sampled_entropies: sizes {} / {} / {}", S0.size(), S1.size(), L.size());
  if (est == ISEstimator::clip && !(clip_c > 0))
    fail<UsageError>("importance sampling: clip_c = {} must be positive", clip_c);
  double max_logw = -std::numeric_limits<double>::infinity();
  for (std::size_t i = 0; i < n; ++i) max_logw = std::max(max_logw, S1[i] - S0[i]);
  double sum_s0 = 0, sum_l = 0, sw = 0, sw2 = 0, sw_s1 = 0, sw_l = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double logw = S1[i] - S0[i];
    const double w = est == ISEstimator::snis ? std::exp(logw - max_logw) : std::min(std::exp(logw), clip_c);
    sum_s0 += S0[i];
    sum_l += L[i];
    sw += w;
    sw2 += w * w;
    sw_s1 += w * S1[i];
    sw_l += w * L[i];
  }
  GroundTruth gt;
  gt.H_orig = -sum_s0 / double(n);
  gt.H_upd = -sw_s1 / sw;
  gt.deltaH_true = gt.H_upd - gt.H_orig;
  gt.H_orig_tok = -sum_s0 / std::max(sum_l, 1.0);
  gt.H_upd_tok = -sw_s1 / std::max(sw_l, std::numeric_limits<double>::min());
  gt.deltaH_true_tok = gt.H_upd_tok - gt.H_orig_tok;
  gt.ESS = sw * sw / sw2;
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

// S values of all rows of `batch` on this rank's shard, gathered in batch order.
template <CausalLM M>
std::vector<double> gathered_sequence_logprobs(const ProbeComponents<M>& c, const TokenBatch& batch) {
  std::vector<double> s(static_cast<std::size_t>(batch.rows()), 0.0);
  c.for_each_microbatch(batch, "ground_truth", [&](const TokenBatch& mb, std::span<const index_t> prompts) {
    const std::vector<double> part = sequence_logprobs(c.model(), mb, c.settings().temperature);
    for (std::size_t j = 0; j < prompts.size(); ++j)
      for (index_t g = 0; g < batch.G; ++g)
        s[static_cast<std::size_t>(prompts[j] * batch.G + g)] =
            part[j * static_cast<std::size_t>(batch.G) + static_cast<std::size_t>(g)];
  });
  c.comm().allreduce_sum(std::span<double>(s));
  return s;
}

// The step: `adam` applies AdamW with lr eta to the loss -(1/B_U) sum_u LY[u]
// (its gradient is -sum_Y_raw / B_U) on a copy of the optimizer state;
// `precond_sgd` sets theta += eta * mu_Y.
template <CausalLM M>
GroundTruth ground_truth(const ProbeComponents<M>& c, const TokenBatch& E, StepKind kind, double eta,
                         const typename ProbeComponents<M>::Buffer& sum_Y_raw, index_t B_U,
                         const typename ProbeComponents<M>::Buffer& mu_Y,
                         const AdamState<typename M::scalar_type, typename M::backend_type>& state, ISEstimator est,
                         double clip_c) {
  using T = typename M::scalar_type;
  using B = typename M::backend_type;
  const auto& reg = c.registry();
  require_bound_to(sum_Y_raw, reg, "ground_truth");
  require_bound_to(mu_Y, reg, "ground_truth");
  if (est == ISEstimator::clip && !(clip_c > 0))  // checked before any work, not only at the end
    fail<UsageError>("importance sampling: clip_c = {} must be positive", clip_c);

  const std::vector<double> S0 = gathered_sequence_logprobs(c, E);
  const ParameterSnapshot<T, B> snapshot(reg);
  std::vector<double> S1;
  try {
    if (kind == StepKind::adam) {
      AdamState<T, B> scratch = state;  // the loaded state itself is never touched
      load_param_gradients(reg, sum_Y_raw, -1.0 / double(B_U));
      adamw_step(reg, scratch, eta);
    } else {
      for (index_t i = 0; i < reg.size(); ++i) {
        const auto* m = mu_Y.entry(i);
        if (!m) continue;
        T* p = reg.entry(i).param->value.data();
        const double* mp = m->data();
        B::parallel_for(m->numel(), [=] EP_HOST_DEVICE(index_t k) { p[k] = static_cast<T>(p[k] + eta * mp[k]); });
      }
    }
    S1 = gathered_sequence_logprobs(c, E);
  } catch (...) {
    snapshot.restore();
    throw;
  }
  snapshot.restore();

  std::vector<double> L(S0.size());
  for (index_t b = 0; b < E.B; ++b)
    for (index_t g = 0; g < E.G; ++g) L[static_cast<std::size_t>(b * E.G + g)] = double(E.gen_length(b, g));
  return importance_sampled_entropies(S0, S1, L, est, clip_c);
}

}  // namespace entropy_probe
