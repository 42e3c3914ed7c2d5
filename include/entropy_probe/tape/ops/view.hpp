// reshape: the same elements under another shape. The tape keeps values
// immutable, so this is a copy whose VJP and JVP are copies too.
#pragma once

#include "entropy_probe/tape/tape.hpp"

namespace entropy_probe {

template <class T, class B>
Var reshape(Tape<T, B>& tape, Var x, Shape shape) {
  Tensor<T, B> y = tape.value(x).reshaped(std::move(shape));  // checks the element count
  const index_t n = y.numel();
  return tape.record(
      "reshape", std::move(y), {x},
      [&tape, x](Var self) {
        if (tape.requires_grad(x)) add_into(tape.grad_into(x), tape.grad_data(self));
      },
      [&tape, x, n](Var self) { B::copy(tape.tangent_into(self).data, tape.tangent_data(x), n); });
}

}  // namespace entropy_probe
