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

// Every trainable parameter the forward pass used must be in the registry:
// one that named_parameters() does not list would receive gradients and
// tangents that no buffer ever sees (the silent-skip bug this library exists
// to rule out).
template <class T, class B>
void require_leaves_in_registry(const Tape<T, B>& tape, const RegistryInfo& info, const char* phase) {
  for (LeafKey key : tape.leaf_keys())
    if (info.find(ParamId{key}) < 0)
      fail<UsageError>(
          "{}: the forward pass used trainable parameter id {} that registry #{} does not hold; "
          "does the model's named_parameters() list every parameter its forward() uses?",
          phase, key, info.serial);
}

// Forward-mode pass with parameter tangents taken from `tangents` (absent
// entries are zero tangents). The buffer's element type converts to T. A
// trainable parameter of the forward pass outside the buffer's registry is an
// error, not a zero tangent.
template <class T, class B, class U>
void jvp(Tape<T, B>& tape, const ParamBuffer<U, B>& tangents) {
  tangents.require_bound("jvp");
  require_leaves_in_registry(tape, *tangents.info(), "jvp");
  if constexpr (std::is_same_v<T, U>) {
    tape.jvp([&](LeafKey key) -> const Tensor<T, B>* { return tangents.entry(tangents.info()->find(ParamId{key})); });
  } else {
    std::vector<std::optional<Tensor<T, B>>> converted(static_cast<std::size_t>(tangents.size()));
    for (index_t i = 0; i < tangents.size(); ++i)
      if (const auto* t = tangents.entry(i)) converted[static_cast<std::size_t>(i)] = t->template cast<T>();
    tape.jvp([&](LeafKey key) -> const Tensor<T, B>* {
      const auto& c = converted[static_cast<std::size_t>(tangents.info()->find(ParamId{key}))];
      return c ? &*c : nullptr;
    });
  }
}

}  // namespace entropy_probe
