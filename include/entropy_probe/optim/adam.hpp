// Adam state, the Adam preconditioner and an AdamW step with PyTorch's
// semantics (torch.optim.AdamW, foreach=False, amsgrad=False).
//
// State is keyed by registry index and bound to the registry like every
// parameter buffer; a parameter without state is representable (the
// preconditioner then uses the identity for it, with one warning).
#pragma once

#include "entropy_probe/core/log.hpp"
#include "entropy_probe/module/buffers.hpp"

#include <cmath>
#include <optional>
#include <string>
#include <vector>

namespace entropy_probe {

struct AdamHyper {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;
};

template <class T, class B = CpuBackend>
struct AdamParamState {
  Tensor<T, B> exp_avg;     // m
  Tensor<T, B> exp_avg_sq;  // v
  double step = 0;
};

template <class T, class B = CpuBackend>
class AdamState {
 public:
  using Entry = AdamParamState<T, B>;

  AdamState() = default;
  // No state for any parameter yet (a fresh optimizer).
  AdamState(std::shared_ptr<const RegistryInfo> info, AdamHyper hyper)
      : info_(std::move(info)), hyper_(hyper), entries_(static_cast<std::size_t>(info_->size())) {}

  const std::shared_ptr<const RegistryInfo>& info() const { return info_; }
  const AdamHyper& hyper() const { return hyper_; }
  AdamHyper& hyper() { return hyper_; }
  index_t size() const { return static_cast<index_t>(entries_.size()); }

  const Entry* entry(index_t i) const {
    const auto& e = entries_.at(static_cast<std::size_t>(i));
    return e ? &*e : nullptr;
  }
  Entry* entry(index_t i) {
    auto& e = entries_.at(static_cast<std::size_t>(i));
    return e ? &*e : nullptr;
  }
  // Sets the state of parameter `id`; shapes must match the parameter and the
  // step must be a finite count >= 0.
  void set(ParamId id, Entry e) {
    if (!info_) fail<UsageError>("AdamState::set: state is not bound to a registry");
    const index_t i = info_->find(id);
    if (i < 0) fail<UsageError>("AdamState: parameter id {} is not in registry #{}", id.value, info_->serial);
    const Shape& s = info_->shapes[static_cast<std::size_t>(i)];
    const std::string& name = info_->names[static_cast<std::size_t>(i)];
    if (e.exp_avg.shape() != s || e.exp_avg_sq.shape() != s)
      fail<InputError>("Adam state for '{}': exp_avg {} / exp_avg_sq {} do not match the parameter shape {}", name,
                       shape_str(e.exp_avg.shape()), shape_str(e.exp_avg_sq.shape()), shape_str(s));
    if (!(e.step >= 0) || !std::isfinite(e.step))
      fail<InputError>("Adam state for '{}': step {} is not a count >= 0", name, e.step);
    entries_[static_cast<std::size_t>(i)] = std::move(e);
  }
  index_t missing_count() const {
    index_t n = 0;
    for (const auto& e : entries_) n += !e.has_value();
    return n;
  }

 private:
  std::shared_ptr<const RegistryInfo> info_;
  AdamHyper hyper_;
  std::vector<std::optional<Entry>> entries_;
};

// P g = g / (sqrt(vhat) + eps), vhat = v / (1 - beta2^step) if step > 0 else v.
// A parameter with no state gets the identity, with one warning naming it
// (once per preconditioner), and is counted in missing().
template <class T, class B = CpuBackend>
class AdamPreconditioner {
 public:
  explicit AdamPreconditioner(const AdamState<T, B>& state) : state_(&state) {}

  template <class U>
  void apply(ParamBuffer<U, B>& buf) {
    buf.require_bound("AdamPreconditioner::apply");
    if (buf.info() != state_->info())
      fail<UsageError>("AdamPreconditioner: buffer bound to registry #{}, Adam state to registry #{}",
                       buf.info()->serial, state_->info() ? state_->info()->serial : 0);
    warned_.resize(static_cast<std::size_t>(buf.size()), false);
    const double beta2 = state_->hyper().beta2, eps = state_->hyper().eps;
    for (index_t i = 0; i < buf.size(); ++i) {
      const auto* g = buf.entry(i);
      if (!g) continue;
      const auto* st = state_->entry(i);
      if (!st) {
        if (!warned_[static_cast<std::size_t>(i)]) {
          log_warning("AdamPreconditioner: no optimizer state for '{}'; using the identity", buf.name(i));
          warned_[static_cast<std::size_t>(i)] = true;
        }
        continue;
      }
      const double bc2 = st->step > 0 ? 1.0 - std::pow(beta2, st->step) : 1.0;
      const T* v = st->exp_avg_sq.data();
      U* gp = g->data();
      B::parallel_for(g->numel(), [=] EP_HOST_DEVICE(index_t k) {
        const double vhat = static_cast<double>(v[k]) / bc2;
        gp[k] = static_cast<U>(static_cast<double>(gp[k]) / (std::sqrt(vhat) + eps));
      });
    }
  }

  index_t missing() const { return state_->missing_count(); }

 private:
  const AdamState<T, B>* state_;
  std::vector<bool> warned_;
};

// mu_Y = P sum_Y / B_U: the mean over the U prompts of the preconditioned
// update direction (docs/math.md). `sum_Y` is the raw sum over `count`
// prompts; P is applied before the division, as the probe always has.
template <class T, class B>
ParamBuffer<double, B> preconditioned_mean(const ParamBuffer<double, B>& sum_Y, index_t count,
                                           AdamPreconditioner<T, B>& precond) {
  if (count <= 0) fail<UsageError>("preconditioned_mean: the sum is over {} prompts; need at least one", count);
  ParamBuffer<double, B> mu_Y = sum_Y;
  precond.apply(mu_Y);
  scale_param_buffer(mu_Y, 1.0 / double(count));
  return mu_Y;
}

// The bias corrections of an AdamW step that brings the count to `step`:
// bc1 = 1 - beta1^step, bc2_sqrt = sqrt(1 - beta2^step).
struct AdamWBiasCorrections {
  double bc1, bc2_sqrt;
};
inline AdamWBiasCorrections adamw_bias_corrections(const AdamHyper& h, double step) {
  return {1.0 - std::pow(h.beta1, step), std::sqrt(1.0 - std::pow(h.beta2, step))};
}

// One AdamW step on the registry's parameters that have a gradient, as
// torch.optim.AdamW does it: decoupled weight decay p *= 1 - lr*wd, then
// m, v moving averages and p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps).
// Parameters without state start from zero state (step 0), as PyTorch's lazy
// initialisation does; parameters without a gradient are left alone.
template <class T, class B>
void adamw_step(const Registry<T, B>& registry, AdamState<T, B>& state, double lr) {
  if (state.info() != registry.info())
    fail<UsageError>("adamw_step: Adam state is bound to registry #{}, not #{}",
                     state.info() ? state.info()->serial : 0, registry.serial());
  const AdamHyper h = state.hyper();
  for (index_t i = 0; i < registry.size(); ++i) {
    auto& e = registry.entry(i);
    if (!e.param->grad) continue;
    if (!state.entry(i)) {
      AdamParamState<T, B> fresh{Tensor<T, B>(e.param->value.shape()), Tensor<T, B>(e.param->value.shape()), 0};
      state.set(e.id, std::move(fresh));
    }
    auto* st = state.entry(i);
    st->step += 1;
    // Plain locals, not a structured binding: the device lambda below captures them.
    const AdamWBiasCorrections bc = adamw_bias_corrections(h, st->step);
    const double bc1 = bc.bc1, bc2_sqrt = bc.bc2_sqrt;
    const double step_size = lr / bc1, decay = 1.0 - lr * h.weight_decay;
    const double b1 = h.beta1, b2 = h.beta2, eps = h.eps;
    T* p = e.param->value.data();
    const T* g = e.param->grad->data();
    T* m = st->exp_avg.data();
    T* v = st->exp_avg_sq.data();
    B::parallel_for(e.param->value.numel(), [=] EP_HOST_DEVICE(index_t k) {
      p[k] = static_cast<T>(p[k] * decay);
      m[k] = static_cast<T>(b1 * m[k] + (1 - b1) * g[k]);
      v[k] = static_cast<T>(b2 * v[k] + (1 - b2) * static_cast<double>(g[k]) * g[k]);
      const double denom = std::sqrt(static_cast<double>(v[k])) / bc2_sqrt + eps;
      p[k] = static_cast<T>(p[k] - step_size * m[k] / denom);
    });
  }
}

// The next AdamW step per unit learning rate, from the saved state and the
// gradient g = -sum_Y_raw / B_U that the ground truth hands to adamw_step
// (docs/math.md (g)). Per element, with m' = b1 m + (1-b1) g,
// v' = b2 v + (1-b2) g^2, D = sqrt(v') / bc2_sqrt + eps and the bias
// corrections of step + 1:
//   total    = (theta' - theta) / lr = -wd theta - m' / (bc1 D)
//   momentum = -b1 m / (bc1 D)
//   decay    = -wd theta
//   gradient_scale = (1-b1) / (bc1 D)
// so total = momentum + decay + gradient_scale * sum_Y_raw / B_U, and the
// gradient part splits over the update sequences with one shared D (the
// whole batch's). Entries absent from sum_Y_raw get no step (adamw_step
// skips parameters without a gradient) and stay absent; a parameter
// without state starts from zero state, as in adamw_step. Computed in
// double from the stored (type T) state; in T = float the real step rounds
// m' and v' to float first.
template <class B>
struct AdamWDirection {
  ParamBuffer<double, B> total, momentum, decay, gradient_scale;
};

template <class T, class B>
AdamWDirection<B> adamw_direction(const Registry<T, B>& registry, const AdamState<T, B>& state,
                                  const ParamBuffer<double, B>& sum_Y_raw, index_t B_U) {
  if (state.info() != registry.info())
    fail<UsageError>("adamw_direction: Adam state is bound to registry #{}, not #{}",
                     state.info() ? state.info()->serial : 0, registry.serial());
  require_bound_to(sum_Y_raw, registry, "adamw_direction");
  if (B_U <= 0) fail<UsageError>("adamw_direction: the sum is over {} prompts; need at least one", B_U);
  const AdamHyper h = state.hyper();
  AdamWDirection<B> d{ParamBuffer<double, B>(registry.info()), ParamBuffer<double, B>(registry.info()),
                      ParamBuffer<double, B>(registry.info()), ParamBuffer<double, B>(registry.info())};
  for (index_t i = 0; i < registry.size(); ++i) {
    const auto* sum = sum_Y_raw.entry(i);
    if (!sum) continue;
    const auto& e = registry.entry(i);
    const auto* st = state.entry(i);
    const AdamWBiasCorrections bc = adamw_bias_corrections(h, (st ? st->step : 0.0) + 1);
    const double bc1 = bc.bc1, bc2_sqrt = bc.bc2_sqrt;
    const T* p = e.param->value.data();
    const T* m = st ? st->exp_avg.data() : nullptr;
    const T* v = st ? st->exp_avg_sq.data() : nullptr;
    const double* s = sum->data();
    // written in place into the four buffers' slots
    double *tp = d.total.set_zero(e.id).data(), *mp = d.momentum.set_zero(e.id).data(),
           *dp = d.decay.set_zero(e.id).data(), *sp = d.gradient_scale.set_zero(e.id).data();
    const double b1 = h.beta1, b2 = h.beta2, eps = h.eps, wd = h.weight_decay, inv_count = 1.0 / double(B_U);
    B::parallel_for(sum->numel(), [=] EP_HOST_DEVICE(index_t k) {
      const double g = -s[k] * inv_count;
      const double m0 = m ? static_cast<double>(m[k]) : 0.0, v0 = v ? static_cast<double>(v[k]) : 0.0;
      const double m1 = b1 * m0 + (1 - b1) * g, v1 = b2 * v0 + (1 - b2) * g * g;
      const double denom = bc1 * (std::sqrt(v1) / bc2_sqrt + eps);
      dp[k] = -wd * static_cast<double>(p[k]);
      tp[k] = dp[k] - m1 / denom;
      mp[k] = -b1 * m0 / denom;
      sp[k] = (1 - b1) / denom;
    });
  }
  return d;
}

// Entries whose saved second moment is exactly zero while the U gradient
// sum_Y_raw is not (e.g. an embedding row no training batch touched): the
// preconditioner divides them by eps alone. Counted over the parameters with
// state, in the LoRA view and over all trainables, with the share of
// |mu_Y|^2 (over all trainables) that these entries carry.
struct ZeroSecondMoment {
  index_t lora = 0, all = 0;
  double lora_share = 0, all_share = 0;
};

template <class T, class B>
ZeroSecondMoment zero_second_moment_entries(const Registry<T, B>& registry, const AdamState<T, B>& state,
                                            const ParamBuffer<double, B>& sum_Y_raw,
                                            const ParamBuffer<double, B>& mu_Y) {
  require_bound_to(sum_Y_raw, registry, "zero_second_moment_entries");
  require_bound_to(mu_Y, registry, "zero_second_moment_entries");
  ZeroSecondMoment z;
  double flagged_lora = 0, flagged_all = 0;
  const double total = dot_param_buffers(mu_Y, mu_Y);
  for (index_t i = 0; i < registry.size(); ++i) {
    const auto* st = state.entry(i);
    const auto* sum = sum_Y_raw.entry(i);
    const auto* mu = mu_Y.entry(i);
    if (!st || !sum || !mu) continue;
    const T* v = st->exp_avg_sq.data();
    const double* s = sum->data();
    const double* u = mu->data();
    const index_t n = sum->numel();
    const auto count = static_cast<index_t>(
        B::sum(n, [=] EP_HOST_DEVICE(index_t k) { return v[k] == T(0) && s[k] != 0.0 ? acc_t(1) : acc_t(0); }));
    if (count == 0) continue;
    const double sq = B::sum(
        n, [=] EP_HOST_DEVICE(index_t k) { return v[k] == T(0) && s[k] != 0.0 ? acc_t(u[k] * u[k]) : acc_t(0); });
    z.all += count;
    flagged_all += sq;
    if (registry.entry(i).lora) {
      z.lora += count;
      flagged_lora += sq;
    }
  }
  if (total > 0) {
    z.all_share = flagged_all / total;
    z.lora_share = flagged_lora / total;
  }
  return z;
}

}  // namespace entropy_probe
