// Where parameters meet the tape: a parameter enters a forward pass with
// use(); its gradient flows back into Parameter::grad (accumulating, so a
// tied weight used twice gets both contributions), and jvp() takes parameter
// tangents from a keyed buffer.
#pragma once

#include "entropy_probe/module/buffers.hpp"

namespace entropy_probe {

// Puts `p` on the tape: frozen parameters are constants (no gradient or
// tangent work downstream of them), trainable ones are keyed leaves.
template <class T, class B>
Var use(Tape<T, B>& tape, Parameter<T, B>& p) {
  if (!p.requires_grad) return tape.constant_ref(p.value);
  Parameter<T, B>* ptr = &p;
  return tape.leaf_ref(p.value, p.id().value, [ptr](Tensor<T, B>&& g) { ptr->accumulate_grad(std::move(g)); });
}

// A trainable parameter the forward pass used that registry `info` lacks:
// one that named_parameters() does not list would receive gradients and
// tangents that no buffer ever sees (the silent-skip bug this library exists
// to rule out).
[[noreturn]] inline void fail_unregistered_leaf(LeafKey key, const RegistryInfo& info, const char* phase) {
  fail<UsageError>(
      "{}: the forward pass used trainable parameter id {} that registry #{} does not hold; "
      "does the model's named_parameters() list every parameter its forward() uses?",
      phase, key, info.serial);
}

// Every trainable parameter the forward pass used must be in the registry.
template <class T, class B>
void require_leaves_in_registry(const Tape<T, B>& tape, const RegistryInfo& info, const char* phase) {
  for (LeafKey key : tape.leaf_keys())
    if (info.find(ParamId{key}) < 0) fail_unregistered_leaf(key, info, phase);
}

// Parameter tangents from `tangents` (absent entries are zero tangents) as a
// tape's TangentSource: views of the buffer's entries, read in place from its
// storage. A trainable parameter outside the buffer's registry is an error,
// not a zero tangent. For a forward-tangent tape,
// Tape(forward_tangents, param_tangents(buf, phase)), the buffer must outlive
// the tape.
template <class T, class B>
typename Tape<T, B>::TangentSource param_tangents(const ParamBuffer<T, B>& tangents, const char* phase) {
  tangents.require_bound(phase);
  return [&tangents, phase](LeafKey key) -> std::optional<TensorView<const T, B>> {
    const RegistryInfo& info = *tangents.info();
    const index_t i = info.find(ParamId{key});
    if (i < 0) fail_unregistered_leaf(key, info, phase);
    if (const auto* t = tangents.entry(i)) return *t;
    return std::nullopt;
  };
}

// Forward-mode pass over a recorded tape with parameter tangents taken from
// `tangents` (as param_tangents). The buffer's element type converts to T.
template <class T, class B, class U>
void jvp(Tape<T, B>& tape, const ParamBuffer<U, B>& tangents) {
  tangents.require_bound("jvp");
  require_leaves_in_registry(tape, *tangents.info(), "jvp");
  if constexpr (std::is_same_v<T, U>) {
    tape.jvp(param_tangents(tangents, "jvp"));
  } else {
    const ParamBuffer<T, B> converted = cast_param_buffer<T>(tangents);
    tape.jvp(param_tangents(converted, "jvp"));
  }
}

}  // namespace entropy_probe
