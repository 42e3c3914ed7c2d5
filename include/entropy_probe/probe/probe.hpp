// OfflineEntropyProbe: runs the phases of docs/math.md on a model, an
// E batch, a U batch and the model's Adam state, and returns a result with a
// timing per phase. Phases that are not configured do not run, and their
// fields stay empty.
#pragma once

#include "entropy_probe/optim/adam.hpp"
#include "entropy_probe/probe/components.hpp"
#include "entropy_probe/probe/control_variates.hpp"
#include "entropy_probe/probe/ground_truth.hpp"
#include "entropy_probe/probe/variance.hpp"

#include <algorithm>
#include <chrono>
#include <map>
#include <optional>
#include <string>

namespace entropy_probe {

enum class VarianceMode { none, conditional, full };
inline const char* to_string(VarianceMode v) {
  return v == VarianceMode::none ? "none" : v == VarianceMode::conditional ? "conditional" : "full";
}

// The update direction v of a first-order prediction eta * mu_X . v
// (docs/math.md (g)): precond_sgd is mu_Y, adamw the next AdamW step per
// unit learning rate.
enum class Direction { precond_sgd, adamw };
inline const char* to_string(Direction d) { return d == Direction::adamw ? "adamw" : "precond_sgd"; }

// One sequence of a batch: prompt b (or u), completion g.
struct SequenceRef {
  index_t prompt = 0, completion = 0;
  auto operator<=>(const SequenceRef&) const = default;
};

// Which update sequences get the true change along their own share v_{u,g}
// of the influence direction (docs/math.md (h)): the `largest` by
// |influence| and the listed ones (the union; none when both are empty).
struct InfluenceTruth {
  index_t largest = 0;
  std::vector<SequenceRef> sequences;
  bool empty() const { return largest == 0 && sequences.empty(); }
};

// The influence matrix holds B_E G_E x B_U G_U doubles on the host; more
// than this is refused before any work.
inline constexpr double kInfluenceMatrixMaxEntries = 1e7;

struct ProbeConfig {
  std::optional<double> learning_rate;  // eta; else the optimizer state's lr
  Weighting weighting = Weighting::dr_grpo;
  // Prompts per microbatch: N, 0 = the whole batch at once, or unset (the
  // default) = sized per phase to fit memory_budget (ProbeSettings).
  std::optional<index_t> mb_size;
  std::optional<std::size_t> memory_budget;  // bytes; unset: default_memory_budget<B>()
  double temperature = 1.0;
  VarianceMode variance = VarianceMode::full;
  AlphaRoute alpha_route = AlphaRoute::jvp;
  std::optional<StepKind> ground_truth;  // none when empty
  ISEstimator is = ISEstimator::snis;
  double clip_c = 10.0;
  ProgressCallback progress;
  // The directions to predict along, in order; the first gives the
  // top-level bars_dot and deltaH1. The variance phases are along mu_Y
  // (precond_sgd) whatever is listed here.
  std::vector<Direction> directions{Direction::precond_sgd};
  // Per-sequence entropy influences along the adamw direction when it is
  // listed, else along precond_sgd.
  bool influence = false;
  // The influence matrix over (E sequence, U sequence) along the same
  // direction (docs/math.md (h)); implies influence.
  bool influence_matrix = false;
  // The ground truth along single update sequences' shares of the influence
  // direction; implies influence. The baseline on E is shared with the other
  // ground truths.
  InfluenceTruth influence_truth;
  // Learning rates of a sweep (docs/math.md (l)): for every listed direction
  // and every eta here, deltaH1 and the ground truth of that step; empty:
  // none. The baseline statistics on E are computed once for all of them.
  std::vector<double> lr_sweep;
  // The control-variate estimate of the first-order prediction along mu_Y
  // (docs/math.md (m)): S, the Rao-Blackwellised entropies and Sdot along
  // mu_Y on E from one forward-tangent pass, which also serves as full
  // variance's V_X pass.
  bool control_variates = false;
};

// The step kind whose ground truth measures a direction's prediction: the
// adamw direction is the real AdamW step per unit learning rate.
inline StepKind step_kind(Direction d) { return d == Direction::adamw ? StepKind::adam : StepKind::precond_sgd; }

// One direction's first-order prediction; the momentum and decay shares
// only for adamw (they are zero for precond_sgd by construction).
struct DirectionResult {
  Direction direction = Direction::precond_sgd;
  double bars_dot = 0, deltaH1 = 0;
  std::optional<double> momentum_share, decay_share;  // eta * mu_X . v_momentum, eta * mu_X . v_decay
};

// eta * mu_X . v_{u,g}: update sequence (prompt u, completion g)'s share
// of a direction's deltaH1 (docs/math.md (h)).
struct SequenceInfluence {
  index_t prompt = 0, completion = 0, length = 0;
  double advantage = 0;
  std::optional<double> reward;
  double influence = 0;
  // The ground truth (docs/math.md (e)) of the step theta + eta v_{u,g}
  // along this sequence's share only; for the sequences of
  // ProbeConfig::influence_truth.
  std::optional<GroundTruth> truth;
};

// M[(b,g'), (u,g)] = eta x_{b,g'} . v_{u,g} with x_{b,g'} = W_X[b,g'] grad
// S[b,g'] / B_E, E sequence (b,g')'s share of mu_X (docs/math.md (h)). Its
// column sums are the influences; all entries plus the momentum and decay
// shares make the direction's deltaH1.
struct InfluenceMatrix {
  Direction direction = Direction::precond_sgd;
  std::vector<SequenceRef> rows, columns;  // E sequences, U sequences, prompt-major
  std::vector<double> values;              // row-major, rows.size() x columns.size()
  // Per row: eta x_{b,g'} . v_momentum and eta x_{b,g'} . v_decay; adamw
  // only (empty for precond_sgd, whose shares are 0).
  std::vector<double> momentum, decay;
  double at(std::size_t row, std::size_t column) const { return values[row * columns.size() + column]; }
};

// One point of a learning-rate sweep: the first-order prediction and the
// measured change of the step eta along `direction`.
struct SweepPoint {
  Direction direction = Direction::precond_sgd;
  double learning_rate = 0, deltaH1 = 0;
  GroundTruth truth;
};

struct RegistrySummary {
  index_t trainable_tensors = 0, lora_tensors = 0, trainable_numel = 0;
  std::vector<std::string> names;
};

struct ProbeResult {
  double bars_dot = 0, deltaH1 = 0, learning_rate = 0;
  std::string learning_rate_source;  // "config" or "optimizer"
  index_t B_E = 0, B_U = 0;
  double mu_X_norm = 0, mu_Y_norm = 0;
  std::optional<ConditionalVariance> conditional;
  std::optional<FullVariance> full;
  std::optional<GroundTruth> truth;
  index_t preconditioner_missing = 0;
  ZeroSecondMoment zero_second_moment;
  std::vector<DirectionResult> directions;   // in the order of ProbeConfig::directions
  std::vector<SequenceInfluence> influence;  // U batch order (prompt-major); empty unless configured
  std::optional<Direction> influence_direction;
  std::vector<SweepPoint> lr_sweep;  // direction-major, in the order of ProbeConfig
  // With ProbeConfig::control_variates: y[b,g] = W[b,g] Sdot[b,g] per E
  // sequence (row b*G + g), (1/B_E) sum y = bars_dot of precond_sgd; and the
  // estimate, empty when B_E is too small for its features (a warning says so).
  std::vector<double> first_order_per_sequence;
  std::optional<ControlVariates> control_variates;
  std::optional<InfluenceMatrix> influence_matrix;  // along influence_direction; unless configured, empty
  RegistrySummary registry;
  std::map<std::string, double> timing;       // seconds per phase, and "total"
  std::map<std::string, index_t> microbatch;  // prompts per microbatch each phase ran with (rank 0's)
  ProbeConfig config;
};

template <CausalLM M>
class OfflineEntropyProbe {
 public:
  using T = typename M::scalar_type;
  using B = typename M::backend_type;
  using Components = ProbeComponents<M>;
  using Buffer = typename Components::Buffer;

  // `model` may be a wrapper; the probe works on unwrap(model) and its registry.
  template <class Model>
  OfflineEntropyProbe(Model& model, ProbeConfig config, Communicator* comm = nullptr)
      : model_(&unwrap(model)),
        registry_(Registry<T, B>::build(*model_)),
        config_(std::move(config)),
        comm_(comm ? comm : &single_),
        components_(*model_, registry_,
                    ProbeSettings{.weighting = config_.weighting,
                                  .mb_size = config_.mb_size,
                                  .temperature = config_.temperature,
                                  .progress = config_.progress,
                                  .memory_budget = config_.memory_budget},
                    *comm_) {}

  // The registry and the components point into this object.
  OfflineEntropyProbe(const OfflineEntropyProbe&) = delete;
  OfflineEntropyProbe& operator=(const OfflineEntropyProbe&) = delete;

  const Registry<T, B>& registry() const { return registry_; }
  const Components& components() const { return components_; }

  // The state must be bound to registry() (AdamState(probe.registry().info(), ...)).
  ProbeResult run(const TokenBatch& E, const TokenBatch& U, const AdamState<T, B>& state) {
    using clock = std::chrono::steady_clock;
    const auto t_start = clock::now();
    auto seconds_since = [](clock::time_point t0) { return std::chrono::duration<double>(clock::now() - t0).count(); };
    require_state_bound(state, "OfflineEntropyProbe::run");
    std::optional<index_t> max_pos;
    if constexpr (requires { model_->max_positions(); }) max_pos = model_->max_positions();
    E.validate(model_->vocab_size(), "E batch", max_pos);
    U.validate(model_->vocab_size(), "U batch", max_pos);
    // Gradients the caller had on the trainable parameters come back
    // afterwards, also when a phase throws: the probe leaves nothing modified.
    const ParameterSnapshot<T, B> grads_before(registry_, /*values=*/false);
    struct Restore {
      const ParameterSnapshot<T, B>& s;
      ~Restore() { s.restore(); }
    } restore{grads_before};

    ProbeResult r;
    r.config = config_;
    r.learning_rate = config_.learning_rate.value_or(state.hyper().lr);
    r.learning_rate_source = config_.learning_rate ? "config" : "optimizer";
    if (!(r.learning_rate > 0) || !std::isfinite(r.learning_rate))
      fail<UsageError>("OfflineEntropyProbe: learning rate {} ({}) must be positive", r.learning_rate,
                       r.learning_rate_source);
    const double eta = r.learning_rate;
    if (config_.directions.empty()) fail<UsageError>("OfflineEntropyProbe: no update direction configured");
    for (std::size_t k = 0; k < config_.lr_sweep.size(); ++k)
      if (!(config_.lr_sweep[k] > 0) || !std::isfinite(config_.lr_sweep[k]))
        fail<UsageError>("OfflineEntropyProbe: lr_sweep[{}] = {} must be positive and finite", k, config_.lr_sweep[k]);
    if (config_.influence_matrix && double(E.rows()) * double(U.rows()) > kInfluenceMatrixMaxEntries)
      fail<UsageError>(
          "OfflineEntropyProbe: influence_matrix (--influence-matrix) of {} E x {} U sequences would hold {:.3g} "
          "entries, over the limit of {:.0e}; use smaller batches",
          E.rows(), U.rows(), double(E.rows()) * double(U.rows()), kInfluenceMatrixMaxEntries);
    validate_influence_truth(config_.influence_truth, U);
    const bool want_influence = config_.influence || config_.influence_matrix || !config_.influence_truth.empty();
    r.registry = summary();

    auto t0 = clock::now();
    auto sum_X = components_.accumulate_sum_X(E);
    r.B_E = sum_X.count;
    Buffer mu_X = sum_X.sum;
    scale_param_buffer(mu_X, 1.0 / double(r.B_E));
    r.timing["sum_X"] = seconds_since(t0);

    t0 = clock::now();
    auto sum_Y = components_.accumulate_sum_Y(U);
    r.B_U = sum_Y.count;
    AdamPreconditioner<T, B> precond(state);
    const Buffer mu_Y = preconditioned_mean(sum_Y.sum, r.B_U, precond);
    r.preconditioner_missing = precond.missing();
    r.zero_second_moment = zero_second_moment_entries(registry_, state, sum_Y.sum, mu_Y);
    warn_zero_second_moment(r.zero_second_moment);
    r.timing["sum_Y"] = seconds_since(t0);

    // precond_sgd's bars_dot also centres the variance phases below.
    const double bars_dot_precond = components_.dot_param_buffers(mu_X, mu_Y);
    const bool want_adamw =
        std::find(config_.directions.begin(), config_.directions.end(), Direction::adamw) != config_.directions.end();
    std::optional<AdamWDirection<B>> adamw;
    if (want_adamw) adamw = adamw_direction(registry_, state, sum_Y.sum, r.B_U);
    for (Direction d : config_.directions) {
      DirectionResult dr{d, bars_dot_precond, eta * bars_dot_precond, std::nullopt, std::nullopt};
      if (d == Direction::adamw) {
        dr.bars_dot = components_.dot_param_buffers(mu_X, adamw->total);
        dr.deltaH1 = eta * dr.bars_dot;
        dr.momentum_share = eta * components_.dot_param_buffers(mu_X, adamw->momentum);
        dr.decay_share = eta * components_.dot_param_buffers(mu_X, adamw->decay);
      }
      r.directions.push_back(dr);
    }
    r.bars_dot = r.directions.front().bars_dot;
    r.deltaH1 = r.directions.front().deltaH1;
    // The diagonal D of the influence direction: v_{u,g} = D W[u,g] grad
    // S[u,g] / B_U with D = P (precond_sgd) or gradient_scale (adamw).
    auto apply_direction_diagonal = [&](Buffer& b) {
      if (adamw) {
        multiply_param_buffers(b, adamw->gradient_scale);
      } else {
        precond.apply(b);
      }
    };
    if (want_influence) {
      t0 = clock::now();
      // v_{u,g} . mu_X = (W[u,g] / B_U) grad S[u,g] . tangent with one tangent
      // for the whole batch, D mu_X (D is diagonal, so symmetric).
      Buffer tangent = mu_X;
      apply_direction_diagonal(tangent);
      r.influence_direction = adamw ? Direction::adamw : Direction::precond_sgd;
      r.influence = sequence_influences(U, tangent, eta / double(r.B_U));
      r.timing["influence"] = seconds_since(t0);
    }
    if (config_.influence_matrix) {
      t0 = clock::now();
      r.influence_matrix =
          influence_matrix(E, U, *r.influence_direction, apply_direction_diagonal, adamw ? &*adamw : nullptr, eta);
      r.timing["influence_matrix"] = seconds_since(t0);
    }
    r.mu_X_norm = norm_param_buffer(mu_X);
    r.mu_Y_norm = norm_param_buffer(mu_Y);
    log_debug("[PROBE] bars_dot={:.6e} deltaH1={:.6e} |mu_X|={:.4e} |mu_Y|={:.4e}", r.bars_dot, r.deltaH1, r.mu_X_norm,
              r.mu_Y_norm);

    if (config_.variance != VarianceMode::none) {
      t0 = clock::now();
      ConditionalVarianceEstimator<M> est(components_);
      r.conditional = est.estimate(E, mu_Y, eta, config_.alpha_route);
      r.timing["conditional_variance"] = seconds_since(t0);
    }
    // X_b . mu_Y over all trainables, when the control-variate pass gave it.
    std::vector<double> x_directional;
    if (config_.control_variates) {
      t0 = clock::now();
      x_directional = control_variate_phase(E, mu_Y, eta, r);
      r.timing["control_variates"] = seconds_since(t0);
    }
    if (config_.variance == VarianceMode::full) {
      t0 = clock::now();
      const bool reuse = r.conditional && r.conditional->lora_used == mu_Y.present_count();
      r.full = full_variance(
          components_, E, U, mu_X, mu_Y, bars_dot_precond, eta, [&](Buffer& b) { precond.apply(b); },
          reuse                   ? &r.conditional->s_values
          : x_directional.empty() ? nullptr
                                  : &x_directional);
      r.timing["full_variance"] = seconds_since(t0);
    }
    last_ = Cached{sum_Y.sum, mu_Y, r.B_U};
    // The statistics on E at theta, by the first phase that needs them (and
    // timed with it); every step after reuses them.
    std::optional<SequenceStatistics> baseline;
    auto baseline_stats = [&]() -> const SequenceStatistics* {
      if (!baseline) baseline = this->baseline(E);
      return &*baseline;
    };
    if (config_.ground_truth) {
      t0 = clock::now();
      r.truth = ground_truth(E, *config_.ground_truth, eta, state, baseline_stats());
      warn_collapsed_weights(*r.truth, E, *config_.ground_truth, eta);
      r.timing["ground_truth"] = seconds_since(t0);
    }
    if (!config_.lr_sweep.empty()) {
      t0 = clock::now();
      for (const DirectionResult& d : r.directions)
        for (double eta_k : config_.lr_sweep) {
          r.lr_sweep.push_back({d.direction, eta_k, eta_k * d.bars_dot,
                                ground_truth(E, step_kind(d.direction), eta_k, state, baseline_stats())});
          warn_collapsed_weights(r.lr_sweep.back().truth, E, step_kind(d.direction), eta_k);
        }
      r.timing["lr_sweep"] = seconds_since(t0);
    }
    if (!config_.influence_truth.empty()) {
      t0 = clock::now();
      influence_truths(E, U, apply_direction_diagonal, eta, *baseline_stats(), r.influence);
      r.timing["influence_truth"] = seconds_since(t0);
    }
    r.timing["total"] = seconds_since(t_start);
    r.microbatch = components_.microbatch_sizes();
    return r;
  }

  // Ground truth for another step size or step kind, reusing the U sums of
  // the last run() (a learning-rate sweep needs X and Y only once). `state`
  // is the Adam state the step starts from (the adam kind copies it; it is
  // never modified); it must be bound to registry(). `baseline`, when given,
  // is baseline(E): the statistics at theta, which no step changes.
  GroundTruth ground_truth(const TokenBatch& E, StepKind kind, double eta, const AdamState<T, B>& state,
                           const SequenceStatistics* baseline = nullptr) {
    if (!last_) fail<UsageError>("OfflineEntropyProbe::ground_truth: call run() first");
    require_state_bound(state, "OfflineEntropyProbe::ground_truth");
    return entropy_probe::ground_truth(components_, E, kind, eta, last_->sum_Y_raw, last_->B_U, last_->mu_Y, state,
                                       config_.is, config_.clip_c, baseline);
  }

  // S and the Rao-Blackwellised entropies on E at the current parameters.
  SequenceStatistics baseline(const TokenBatch& E) { return ground_truth_baseline(components_, E); }

 private:
  struct Cached {
    Buffer sum_Y_raw, mu_Y;
    index_t B_U;
  };

  // The control-variate phase (docs/math.md (m)): one forward-tangent pass
  // over E along mu_Y gives S, Sdot and the Rao-Blackwellised entropies per
  // sequence; y = W Sdot with the X loss weights; s_b = sum_g y[b,g] is
  // X_b . mu_Y over all trainables (returned for full variance's V_X).
  std::vector<double> control_variate_phase(const TokenBatch& E, const Buffer& mu_Y, double eta, ProbeResult& r) const {
    const auto st = components_.sequence_tangents(E, mu_Y, "control_variates", /*entropy=*/true);
    const std::vector<double> W = x_loss_weights(E, st.S, config_.weighting);
    SequenceTerms terms{E.B, E.G, st.S, st.H, st.Sdot, {}};
    std::vector<double> s(static_cast<std::size_t>(E.B), 0.0);
    r.first_order_per_sequence.resize(st.S.size());
    for (index_t b = 0; b < E.B; ++b)
      for (index_t g = 0; g < E.G; ++g) {
        const auto row = static_cast<std::size_t>(b * E.G + g);
        r.first_order_per_sequence[row] = W[row] * st.Sdot[row];
        s[static_cast<std::size_t>(b)] += r.first_order_per_sequence[row];
        terms.L.push_back(static_cast<double>(E.gen_length(b, g)));
      }
    r.control_variates = control_variate_estimate(s, control_variate_features(terms), eta);
    return s;
  }

  // influence[u,g] = scale * W[u,g] * (grad S[u,g] . tangent) with the Y
  // loss weights W, for every row of U.
  std::vector<SequenceInfluence> sequence_influences(const TokenBatch& U, const Buffer& tangent, double scale) const {
    const std::vector<double> d = components_.per_sequence_directional(
        U, tangent, [](const TokenBatch& mb, std::span<const double>) { return y_loss_weights(mb); }, "influence");
    std::vector<SequenceInfluence> out;
    for (index_t u = 0; u < U.B; ++u)
      for (index_t g = 0; g < U.G; ++g) {
        const auto row = static_cast<std::size_t>(u * U.G + g);
        SequenceInfluence s{u, g, U.gen_length(u, g), U.advantage(u, g), std::nullopt, scale * d[row], std::nullopt};
        if (U.rewards) s.reward = (*U.rewards)[row];
        out.push_back(s);
      }
    return out;
  }

  // A step so large that a few E responses carry all the importance weight
  // leaves a truth with a meaningless standard error: say so where it happens.
  static void warn_collapsed_weights(const GroundTruth& t, const TokenBatch& E, StepKind kind, double eta) {
    const double n = double(E.B * E.G);
    if (t.ESS < kCollapsedESSShare * n)
      log_warning(
          "ground truth ({} step, eta {:.3g}): the importance weights collapsed, ESS {:.1f} of {} E responses "
          "(under {:.0f}%); its deltaH_true and SE are unreliable at this step size",
          to_string(kind), eta, t.ESS, E.B * E.G, 100 * kCollapsedESSShare);
  }
  static constexpr double kCollapsedESSShare = 0.1;
  // The influence matrix (docs/math.md (h)): per E sequence i = (b, g') of
  // this rank's prompts, grad S_i by one reverse pass, then one forward-
  // tangent pass over all of U along D grad S_i gives W_Y[u,g] grad S[u,g] .
  // D grad S_i for every column at once. One parameter-sized buffer (the
  // tangent) besides the registry's grads; rows are all-reduced at the end.
  template <class ApplyDiagonal>
  InfluenceMatrix influence_matrix(const TokenBatch& E, const TokenBatch& U, Direction direction,
                                   ApplyDiagonal&& apply_diagonal, const AdamWDirection<B>* adamw, double eta) const {
    InfluenceMatrix m;
    m.direction = direction;
    for (index_t b = 0; b < E.B; ++b)
      for (index_t g = 0; g < E.G; ++g) m.rows.push_back({b, g});
    for (index_t u = 0; u < U.B; ++u)
      for (index_t g = 0; g < U.G; ++g) m.columns.push_back({u, g});
    const std::size_t columns = m.columns.size();
    m.values.assign(m.rows.size() * columns, 0.0);
    if (adamw) m.momentum.assign(m.rows.size(), 0.0), m.decay.assign(m.rows.size(), 0.0);
    const Weighting w = config_.weighting;
    const LossWeightsFn x_weights = [w](const TokenBatch& mb, std::span<const double> S) {
      return x_loss_weights(mb, S, w);
    };
    const LossWeightsFn y_weights = [](const TokenBatch& mb, std::span<const double>) { return y_loss_weights(mb); };
    const double B_E = double(E.B), scale = eta / (B_E * double(U.B));
    const std::vector<index_t> mine = comm_->shard(E.B);
    index_t done = 0;
    for (index_t b : mine) {
      for (index_t g = 0; g < E.G; ++g) {
        const auto row = static_cast<std::size_t>(b * E.G + g);
        const double w_x = components_.sequence_gradient(E, b, g, x_weights, "influence_matrix_E");
        Buffer tangent(registry_.info());
        components_.add_into_param_buffer(tangent, 1.0);  // grad S_i
        registry_.zero_grad();
        if (adamw) {
          m.momentum[row] = eta * w_x / B_E * components_.dot_param_buffers(tangent, adamw->momentum);
          m.decay[row] = eta * w_x / B_E * components_.dot_param_buffers(tangent, adamw->decay);
        }
        apply_diagonal(tangent);
        const std::vector<double> d =
            components_.per_sequence_directional(U, tangent, y_weights, "influence_matrix_U", PassScope::local);
        for (std::size_t col = 0; col < columns; ++col) m.values[row * columns + col] = scale * w_x * d[col];
      }
      components_.report("influence_matrix", ++done, static_cast<index_t>(mine.size()));
    }
    for (std::vector<double>* v : {&m.values, &m.momentum, &m.decay})
      if (!v->empty()) comm_->allreduce_sum(std::span<double>(*v));
    return m;
  }

  // The selection of ProbeConfig::influence_truth, checked against U before
  // any work.
  static void validate_influence_truth(const InfluenceTruth& t, const TokenBatch& U) {
    if (t.largest < 0 || t.largest > U.rows())
      fail<UsageError>(
          "OfflineEntropyProbe: influence_truth.largest (--influence-truth) = {} must be between 0 and the U "
          "batch's {} sequences",
          t.largest, U.rows());
    for (std::size_t k = 0; k < t.sequences.size(); ++k) {
      const SequenceRef& s = t.sequences[k];
      if (s.prompt < 0 || s.prompt >= U.B || s.completion < 0 || s.completion >= U.G)
        fail<UsageError>(
            "OfflineEntropyProbe: influence_truth.sequences (--influence-truth-seq) {}:{} is outside the U batch "
            "of {} prompts x {} completions",
            s.prompt, s.completion, U.B, U.G);
      if (std::find(t.sequences.begin(), t.sequences.begin() + static_cast<std::ptrdiff_t>(k), s) !=
          t.sequences.begin() + static_cast<std::ptrdiff_t>(k))
        fail<UsageError>("OfflineEntropyProbe: influence_truth.sequences (--influence-truth-seq) lists {}:{} twice",
                         s.prompt, s.completion);
    }
  }

  // The ground truth along v_{u,g} = D W_Y[u,g] grad S[u,g] / B_U for each
  // selected sequence, in U order, from the shared baseline on E: one reverse
  // pass for grad S[u,g] (every rank: the step must be the same on all),
  // one forward over E after the step.
  template <class ApplyDiagonal>
  void influence_truths(const TokenBatch& E, const TokenBatch& U, ApplyDiagonal&& apply_diagonal, double eta,
                        const SequenceStatistics& baseline, std::vector<SequenceInfluence>& influence) const {
    const InfluenceTruth& sel = config_.influence_truth;
    std::vector<bool> chosen(influence.size(), false);
    for (const SequenceRef& s : sel.sequences) chosen[static_cast<std::size_t>(s.prompt * U.G + s.completion)] = true;
    std::vector<std::size_t> order(influence.size());
    for (std::size_t k = 0; k < order.size(); ++k) order[k] = k;
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      return std::abs(influence[a].influence) > std::abs(influence[b].influence);
    });
    for (index_t k = 0; k < sel.largest; ++k) chosen[order[static_cast<std::size_t>(k)]] = true;
    const LossWeightsFn y_weights = [](const TokenBatch& mb, std::span<const double>) { return y_loss_weights(mb); };
    for (std::size_t row = 0; row < influence.size(); ++row) {
      if (!chosen[row]) continue;
      SequenceInfluence& s = influence[row];
      const double w_y = components_.sequence_gradient(U, s.prompt, s.completion, y_weights, "influence_truth_U");
      Buffer v(registry_.info());
      components_.add_into_param_buffer(v, w_y / double(U.B));
      registry_.zero_grad();
      apply_diagonal(v);
      s.truth = entropy_probe::ground_truth_along(components_, E, v, eta, config_.is, config_.clip_c, &baseline,
                                                  "influence_truth");
    }
  }

  static void warn_zero_second_moment(const ZeroSecondMoment& z) {
    if (z.all == 0) return;
    log_warning(
        "Adam state: {} entries ({} in the LoRA view) have exp_avg_sq = 0 but a nonzero U gradient; the "
        "preconditioner divides them by eps alone. They carry {:.3g} of |mu_Y|^2 ({:.3g} in the LoRA view)",
        z.all, z.lora, z.all_share, z.lora_share);
  }

  void require_state_bound(const AdamState<T, B>& state, const char* what) const {
    if (state.info() != registry_.info())
      fail<UsageError>("{}: the Adam state is bound to registry #{}, the probe's is #{}", what,
                       state.info() ? state.info()->serial : 0, registry_.serial());
  }

  RegistrySummary summary() const {
    RegistrySummary s;
    s.trainable_tensors = registry_.size();
    s.lora_tensors = registry_.lora_count();
    s.trainable_numel = registry_.numel();
    for (const auto& e : registry_.entries()) s.names.push_back(e.name);
    return s;
  }

  M* model_;
  Registry<T, B> registry_;
  ProbeConfig config_;
  SingleProcess single_;
  Communicator* comm_;
  Components components_;
  std::optional<Cached> last_;
};

template <class Model>
OfflineEntropyProbe(Model&, ProbeConfig, Communicator* = nullptr) -> OfflineEntropyProbe<unwrapped_t<Model>>;

}  // namespace entropy_probe
