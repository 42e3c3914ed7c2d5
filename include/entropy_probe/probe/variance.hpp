// The alpha trick (conditional variance of the prediction over E given U) and
// the delta-method full standard error (docs/math.md, (c) and (d)).
//
//   s_b = X_b . mu_Y over the LoRA view (keys present in mu_Y)
//       = sum_g W[b,g] * (dS[b,g]/dtheta . mu_Y),   W = -(1/G) c
//
// Forward mode gets every s_b of a microbatch from one forward and one JVP
// pass; the reverse-only route (one VJP per prompt, contracted with mu_Y) is
// kept as a cross-check.
#pragma once

#include "entropy_probe/probe/components.hpp"
#include "entropy_probe/tensor/blas.hpp"

#include <cmath>

namespace entropy_probe {

enum class AlphaRoute { jvp, reverse };

inline const char* to_string(AlphaRoute r) { return r == AlphaRoute::jvp ? "jvp" : "reverse"; }

struct ConditionalVariance {
  std::vector<double> s_values;  // per E prompt, batch order
  double sbar = 0;
  double var_s = 0;
  double se_conditional = 0;  // eta * sqrt(var_s / B_E); 0 when B_E < 2
  index_t lora_used = 0;      // LoRA-view entries present in mu_Y
  index_t lora_absent = 0;    // LoRA-view entries absent from mu_Y
};

// Sample mean and variance (B - 1 denominator) of the s values; SE as above.
inline void finish_conditional(ConditionalVariance& cv, double eta) {
  const auto n = static_cast<index_t>(cv.s_values.size());
  double sum = 0;
  for (double s : cv.s_values) sum += s;
  cv.sbar = n > 0 ? sum / double(n) : 0.0;
  if (n < 2) {
    log_warning("conditional variance: B_E = {} < 2, SE_conditional is reported as 0", n);
    cv.var_s = 0;
    cv.se_conditional = 0;
    return;
  }
  double ss = 0;
  for (double s : cv.s_values) ss += (s - cv.sbar) * (s - cv.sbar);
  cv.var_s = ss / double(n - 1);
  cv.se_conditional = eta * std::sqrt(cv.var_s / double(n));
}

template <CausalLM M>
class ConditionalVarianceEstimator {
 public:
  using Components = ProbeComponents<M>;
  using Buffer = typename Components::Buffer;
  using T = typename Components::T;
  using B = typename Components::B;

  explicit ConditionalVarianceEstimator(const Components& c) : c_(&c) {}

  // mu_Y restricted to the LoRA view: entries absent from mu_Y are counted
  // and stay absent (contraction only over keys present in mu_Y).
  Buffer lora_restricted(const Buffer& mu_Y, index_t& used, index_t& absent) const {
    const auto& reg = c_->registry();
    reg.require_lora_view("ConditionalVarianceEstimator");
    require_bound_to(mu_Y, reg, "ConditionalVarianceEstimator");
    Buffer out(reg.info());
    used = absent = 0;
    for (index_t i : reg.lora_view()) {
      if (const auto* t = mu_Y.entry(i)) {
        out.set(reg.entry(i).id, *t);
        ++used;
      } else {
        ++absent;
      }
    }
    if (absent > 0) log_debug("[ALPHA] {} LoRA-view parameters absent from mu_Y are skipped", absent);
    if (used == 0) fail<Error>("[ALPHA] no LoRA-view parameter is present in mu_Y: nothing to contract");
    return out;
  }

  ConditionalVariance estimate(const TokenBatch& E, const Buffer& mu_Y, double eta,
                               AlphaRoute route = AlphaRoute::jvp) const {
    ConditionalVariance cv;
    const Buffer v = lora_restricted(mu_Y, cv.lora_used, cv.lora_absent);
    const Weighting w = c_->settings().weighting;
    const LossWeightsFn weights = [w](const TokenBatch& mb, std::span<const double> S) {
      return x_loss_weights(mb, S, w);
    };
    cv.s_values = route == AlphaRoute::jvp ? c_->per_prompt_directional(E, v, weights, "conditional_variance")
                                           : reverse_route(E, v, weights);
    finish_conditional(cv, eta);
    return cv;
  }

 private:
  // One forward per microbatch, then one VJP per prompt (the cotangent is the
  // prompt's weights, zero elsewhere), each contracted with v over the LoRA view.
  std::vector<double> reverse_route(const TokenBatch& E, const Buffer& v, const LossWeightsFn& weights) const {
    const auto& reg = c_->registry();
    const std::vector<index_t> view = reg.lora_view();
    std::vector<double> s(static_cast<std::size_t>(E.B), 0.0);
    index_t reached_total = 0;
    const index_t mine =
        c_->for_each_microbatch(E, "conditional_variance", [&](const TokenBatch& mb, std::span<const index_t> prompts) {
          Tape<T, B> tape;
          Var S = record_sequence_logprobs(tape, c_->model(), mb, c_->settings().temperature);
          const std::vector<double> W = weights(mb, Components::to_double(tape.value(S)));
          for (index_t j = 0; j < mb.B; ++j) {
            std::vector<double> wj(W.size(), 0.0);
            for (index_t g = 0; g < mb.G; ++g)
              wj[static_cast<std::size_t>(j * mb.G + g)] = W[static_cast<std::size_t>(j * mb.G + g)];
            reg.zero_grad();
            tape.backward(S, Components::from_double(wj));
            double acc = 0;
            index_t reached = 0;
            for (index_t i : view) {
              const auto& g = reg.entry(i).param->grad;
              const auto* vi = v.entry(i);
              if (!g || !vi) continue;
              ++reached;
              acc += blas::dot<B>(g->numel(), g->data(), vi->data());
            }
            if (reached == 0)
              fail<Error>("[VJP] the VJP of prompt {} reached no LoRA parameter present in mu_Y",
                          prompts[static_cast<std::size_t>(j)]);
            reached_total += reached;
            s[static_cast<std::size_t>(prompts[static_cast<std::size_t>(j)])] = acc;
          }
        });
    reg.zero_grad();
    log_debug("[VJP] {} per-prompt VJPs reached {} LoRA parameter gradients", mine, reached_total);
    c_->comm().allreduce_sum(std::span<double>(s));
    return s;
  }

  const Components* c_;
};

struct FullVariance {
  double V_X = 0, V_Y = 0;
  double se_deltaH1 = 0;  // eta * sqrt(V_X + V_Y)
};

// V_X = sum_b (X_b . mu_Y - bars_dot)^2 / (B_E max(B_E - 1, 1))   [X_b . mu_Y: JVP along mu_Y]
// V_Y = sum_u (Y_u . mu_X - bars_dot)^2 / (B_U max(B_U - 1, 1))   [Y_u . mu_X = grad LY[u] . P mu_X]
template <CausalLM M, class Precondition>
FullVariance full_variance(const ProbeComponents<M>& c, const TokenBatch& E, const TokenBatch& U,
                           const typename ProbeComponents<M>::Buffer& mu_X,
                           const typename ProbeComponents<M>::Buffer& mu_Y, double bars_dot, double eta,
                           Precondition&& precondition, const std::vector<double>* x_directional = nullptr) {
  const Weighting w = c.settings().weighting;
  // X_b . mu_Y is exactly the alpha trick's s_b when the LoRA view holds every
  // entry of mu_Y; the caller passes those to save a pass.
  const std::vector<double> xd =
      x_directional
          ? *x_directional
          : c.per_prompt_directional(
                E, mu_Y, [w](const TokenBatch& mb, std::span<const double> S) { return x_loss_weights(mb, S, w); },
                "full_variance_X");
  auto p_mu_X = mu_X;
  precondition(p_mu_X);
  const std::vector<double> yd = c.per_prompt_directional(
      U, p_mu_X, [](const TokenBatch& mb, std::span<const double>) { return y_loss_weights(mb); }, "full_variance_Y");
  auto v = [&](const std::vector<double>& d) {
    const double n = static_cast<double>(d.size());
    double ss = 0;
    for (double x : d) ss += (x - bars_dot) * (x - bars_dot);
    return ss / (n * std::max(n - 1.0, 1.0));
  };
  FullVariance fv;
  fv.V_X = v(xd);
  fv.V_Y = v(yd);
  fv.se_deltaH1 = eta * std::sqrt(fv.V_X + fv.V_Y);
  return fv;
}

}  // namespace entropy_probe
