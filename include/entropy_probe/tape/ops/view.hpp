// reshape: the same elements under another shape. The tape keeps values
// immutable, so this is a copy whose VJP and JVP are copies too.
#pragma once

#include "entropy_probe/tape/tape.hpp"
#include "entropy_probe/tensor/blas.hpp"

namespace entropy_probe {

template <class T, class B>
Var reshape(Tape<T, B>& tape, Var x, Shape shape) {
  Tensor<T, B> y = tape.value(x).reshaped(std::move(shape));  // checks the element count
  const index_t n = y.numel();
  return tape.record(
      "reshape", std::move(y), {x},
      [&tape, x, n](Var self) {
        if (!tape.requires_grad(x)) return;
        const OutRef<T> gx = tape.grad_into(x);
        if (gx.fresh)
          B::copy(gx.data, tape.grad_data(self), n);
        else
          blas::axpy<B>(n, T(1), tape.grad_data(self), gx.data);
      },
      [&tape, x, n](Var self) { B::copy(tape.tangent_into(self).data, tape.tangent_data(x), n); });
}

}  // namespace entropy_probe
