// Teacher-forced sequence log-probabilities on the tape (docs/math.md, Notation):
//
//   S[b,g] = sum over t in gen(b,g) of log_softmax(z[b,g,t-1,:] / tau)[seq[b,g,t]]
//
// Token t is scored by the logits at position t-1 (the causal shift).
#pragma once

#include "entropy_probe/data/batch.hpp"
#include "entropy_probe/module/module.hpp"
#include "entropy_probe/tape/ops/gather.hpp"
#include "entropy_probe/tape/ops/lm_head_logprob.hpp"
#include "entropy_probe/tape/ops/logprob.hpp"

#include <span>

namespace entropy_probe {

// The model input for all B*G rows of `batch`: tokens, key mask, and the
// batch's position ids or the default 0..T-1 per row.
inline SequenceInput sequence_input(const TokenBatch& batch) {
  SequenceInput in;
  in.rows = batch.rows();
  in.length = batch.T;
  in.tokens = batch.sequences;
  in.key_mask = batch.attention_mask;
  if (batch.position_ids) {
    in.positions = *batch.position_ids;
  } else {
    in.positions.resize(batch.sequences.size());
    for (std::size_t i = 0; i < in.positions.size(); ++i)
      in.positions[i] = static_cast<std::int32_t>(static_cast<index_t>(i) % batch.T);
  }
  return in;
}

// Per flattened position (row, t-1): the token it scores (seq[row, t] when t
// is generated, else -1) and the weight 1/0 of the masked sum.
struct ScoredTargets {
  std::vector<std::int32_t> targets;
  std::vector<double> weights;
};

inline ScoredTargets scored_targets(const TokenBatch& batch) {
  ScoredTargets st;
  const auto n = static_cast<std::size_t>(batch.rows() * batch.T);
  st.targets.assign(n, -1);
  st.weights.assign(n, 0.0);
  for (index_t b = 0; b < batch.B; ++b)
    for (index_t g = 0; g < batch.G; ++g)
      for (index_t t = 1; t < batch.T; ++t)
        if (batch.generated(b, g, t)) {
          const auto at = static_cast<std::size_t>(batch.at(b, g, t - 1));
          st.targets[at] = batch.sequences[static_cast<std::size_t>(batch.at(b, g, t))];
          st.weights[at] = 1.0;
        }
  return st;
}

// Records S for every row of `batch` on `tape`; returns a Var of shape [B*G].
// With `entropy_sums`, also the Rao-Blackwellised entropy of every row
// (docs/math.md (k)): the sum over its scored positions of the entropy of
// the full next-token distribution there, from the same pass (a value, not
// on the tape).
//
// The model is asked for the scored positions only
// (SequenceInput::logit_positions); their log-probabilities are scattered
// back to [R*T] for the masked sum. A model that returns all R*T positions
// is scored the same way through the full target list. A model with
// forward_features() (CausalLMFeatures) is scored by lm_head_logprob, which
// never holds its [m, V] logits; any other through its logits.
template <CausalLM M, class T = typename M::scalar_type, class B = typename M::backend_type>
Var record_sequence_logprobs(Tape<T, B>& tape, M& model, const TokenBatch& batch, double temperature,
                             std::vector<double>* entropy_sums = nullptr) {
  SequenceInput in = sequence_input(batch);
  const ScoredTargets st = scored_targets(batch);
  std::vector<std::int32_t> scored, scored_targets_only;
  for (std::size_t i = 0; i < st.targets.size(); ++i)
    if (st.targets[i] >= 0) {
      scored.push_back(static_cast<std::int32_t>(i));
      scored_targets_only.push_back(st.targets[i]);
    }
  if (!scored.empty()) in.logit_positions = scored;  // none scored: the plain forward (S = 0)
  const index_t n = batch.rows() * batch.T;
  const auto m = static_cast<index_t>(scored.size());
  const TapeMark start = tape.mark();  // the model's intermediates end with tok

  // Token log-probs [R*T] from a model output `x` ([..., width]) whose rows
  // are all R*T positions or the m scored ones; score(targets, entropy)
  // gives one log-prob per row of x (and, with entropy, its entropy).
  Tensor<acc_t, B> entropy;
  Tensor<acc_t, B>* want_entropy = entropy_sums ? &entropy : nullptr;
  // Each row of x's entropy added to its batch row's sum; `position` maps
  // a row of x to its flattened position (row, t).
  auto sum_entropies = [&](auto position) {
    entropy_sums->assign(static_cast<std::size_t>(batch.rows()), 0.0);
    const std::vector<acc_t> e = entropy.to_host();
    for (std::size_t i = 0; i < e.size(); ++i) (*entropy_sums)[static_cast<std::size_t>(position(i) / batch.T)] += e[i];
  };
  auto per_position = [&](Var x, const char* what, const char* width_name, auto score) {
    const Shape& xs = tape.shape(x);
    const index_t width = xs.empty() ? 0 : xs.back();
    const index_t rows = width > 0 ? tape.value(x).numel() / width : -1;
    if (rows == n) {
      const Var lp = score(std::span<const std::int32_t>(st.targets), want_entropy);
      if (entropy_sums) sum_entropies([](std::size_t i) { return static_cast<index_t>(i); });
      return lp;
    }
    if (rows == m && in.logit_positions) {
      const Var lp = score(std::span<const std::int32_t>(scored_targets_only), want_entropy);
      if (entropy_sums) sum_entropies([&](std::size_t i) { return static_cast<index_t>(scored[i]); });
      return scatter_rows(tape, lp, std::span<const std::int32_t>(scored), n);
    }
    fail<UsageError>(
        "record_sequence_logprobs: the model returned {} of shape {}, expected [R, T, {}] = [{}, {}, {}] or, for the "
        "{} requested logit_positions, [{}, {}]",
        what, shape_str(xs), width_name, batch.rows(), batch.T, width_name, m, m, width_name);
  };
  Var tok;
  if constexpr (CausalLMFeatures<M>) {
    const LmHeadInput f = model.forward_features(tape, in);
    tok =
        per_position(f.hidden, "hidden states", "d", [&](std::span<const std::int32_t> targets, Tensor<acc_t, B>* ent) {
          return lm_head_logprob(tape, f.hidden, f.weight, targets, temperature, 0, ent);
        });
  } else {
    const Var logits = model.forward(tape, in);
    tok = per_position(logits, "logits", "V", [&](std::span<const std::int32_t> targets, Tensor<acc_t, B>* ent) {
      return log_softmax_gather(tape, logits, targets, temperature, ent);
    });
  }
  tape.release_since(start, {tok});
  return masked_seq_sum(tape, tok, std::span<const double>(st.weights), batch.rows());
}

// S and, with `entropy`, the Rao-Blackwellised entropy H of every row of
// `batch` (H empty without), from one forward pass without gradients: a
// forward-tangent tape without tangents keeps no nodes and frees each
// finished layer, so this costs inference memory. Phases that split a batch
// into microbatches go through ProbeComponents::for_each_microbatch.
struct SequenceStatistics {
  std::vector<double> S, H;
};

template <CausalLM M>
SequenceStatistics sequence_statistics(M& model, const TokenBatch& batch, double temperature, bool entropy) {
  using T = typename M::scalar_type;
  using B = typename M::backend_type;
  Tape<T, B> tape(forward_tangents, {});
  SequenceStatistics st;
  Var S = record_sequence_logprobs(tape, model, batch, temperature, entropy ? &st.H : nullptr);
  st.S.reserve(static_cast<std::size_t>(batch.rows()));
  for (T v : tape.value(S).to_host()) st.S.push_back(static_cast<double>(v));
  return st;
}

// S alone.
template <CausalLM M>
std::vector<double> sequence_logprobs(M& model, const TokenBatch& batch, double temperature) {
  return sequence_statistics(model, batch, temperature, /*entropy=*/false).S;
}

}  // namespace entropy_probe
