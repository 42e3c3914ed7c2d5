// The Module, Wrapper and CausalLM concepts, and unwrap().
//
// A Module enumerates its named parameters, in declaration order, through a
// visitor. Nested modules forward to their children with a name prefix
// (visit_child), so names come out as dotted paths like PyTorch's.
#pragma once

#include "entropy_probe/module/parameter.hpp"
#include "entropy_probe/tape/tape.hpp"

#include <concepts>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>

namespace entropy_probe {

template <class T, class B = CpuBackend>
using ParameterVisitor = std::function<void(const std::string& name, Parameter<T, B>& param)>;

template <class M>
concept Module = requires(M& m, const ParameterVisitor<typename M::scalar_type, typename M::backend_type>& v) {
  typename M::scalar_type;
  typename M::backend_type;
  { m.named_parameters(v) } -> std::same_as<void>;
};

// A wrapper (DDP-like) exposes the module that performs the forward pass.
template <class W>
concept Wrapper = requires(W& w) {
  w.module();
}
&&std::is_lvalue_reference_v<decltype(std::declval<W&>().module())> &&
    (Module<std::remove_cvref_t<decltype(std::declval<W&>().module())>> ||
     requires(std::remove_cvref_t<decltype(std::declval<W&>().module())> & inner) { inner.module(); });

// The Python original's `model.module if hasattr(model, "module") else model`,
// applied until a non-wrapper is reached.
template <class M>
decltype(auto) unwrap(M& m) {
  if constexpr (Wrapper<M>) {
    return unwrap(m.module());
  } else {
    static_assert(Module<M>, "unwrap: the type is neither a Module nor a Wrapper of one");
    return (m);
  }
}

template <class M>
using unwrapped_t = std::remove_cvref_t<decltype(unwrap(std::declval<M&>()))>;

// Visits `child`'s parameters with names prefixed by "prefix.".
template <class T, class B, class Child>
void visit_child(const ParameterVisitor<T, B>& visit, const std::string& prefix, Child& child) {
  child.named_parameters(
      ParameterVisitor<T, B>([&](const std::string& name, Parameter<T, B>& p) { visit(prefix + "." + name, p); }));
}

// What a causal LM sees of a batch: R rows of T tokens, row-major [R, T].
// `key_mask` (1 = real token) decides which keys attention may use;
// `positions` are the position ids (default 0..T-1 per row).
//
// `logit_positions`, when set, lists the flattened positions r*T + t
// (strictly increasing) whose logits the caller will read. A model may then
// return logits [m, V] for exactly those positions, in that order, and skip
// lm_head (and any per-position work after the last attention) elsewhere; a
// model that ignores the hint returns [R, T, V] as always. In an RL batch
// only the response positions score a token, often under half of R*T.
struct SequenceInput {
  index_t rows = 0;
  index_t length = 0;
  std::vector<std::int32_t> tokens;
  std::vector<std::uint8_t> key_mask;
  std::vector<std::int32_t> positions;
  std::optional<std::vector<std::int32_t>> logit_positions;
};

// A Module whose forward records logits on a tape: [R, T, V], or [m, V] for
// the requested SequenceInput::logit_positions.
template <class M>
concept CausalLM = Module<M> &&
    requires(M& m, Tape<typename M::scalar_type, typename M::backend_type>& tape, const SequenceInput& in) {
  { m.forward(tape, in) } -> std::same_as<Var>;
  { m.vocab_size() } -> std::convertible_to<index_t>;
};

// What a CausalLM may return in place of its logits: the hidden states after
// the final norm, [R, T, d] or [m, d] for SequenceInput::logit_positions as
// forward() would, and the lm_head weight [V, d], so that logits = hidden
// weight^T. The caller can then fuse lm_head with the log-softmax
// (tape/ops/lm_head_logprob.hpp) and never hold [m, V] logits.
struct LmHeadInput {
  Var hidden;
  Var weight;
};

// A CausalLM that also offers forward_features(); optional; models without it
// are scored through their logits.
template <class M>
concept CausalLMFeatures = CausalLM<M> &&
    requires(M& m, Tape<typename M::scalar_type, typename M::backend_type>& tape, const SequenceInput& in) {
  { m.forward_features(tape, in) } -> std::same_as<LmHeadInput>;
};

}  // namespace entropy_probe
