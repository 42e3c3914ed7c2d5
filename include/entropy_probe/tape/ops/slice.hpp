// A contiguous slice of the last dimension, forward / VJP / JVP side by side.
//
//   y = x[..., offset : offset + width]         x [..., W] -> y [..., width]
//   VJP: dx[..., offset : offset + width] += dy  (the rest of dx untouched)
//   JVP: ty = tx[..., offset : offset + width]
//
// Used to split GPT-2's fused c_attn output [..., 3C] into q, k and v.
#pragma once

#include "entropy_probe/tape/tape.hpp"

namespace entropy_probe {

template <class T, class B>
Var slice_last(Tape<T, B>& tape, Var x, index_t offset, index_t width) {
  const Shape& s = tape.shape(x);
  if (s.empty()) fail<UsageError>("slice_last: cannot slice a scalar (shape [])");
  const index_t w = s.back();
  // written so that offset + width cannot overflow
  if (offset < 0 || width < 0 || offset > w || width > w - offset)
    fail<UsageError>("slice_last: [{}, {} + {}) is outside the last dimension [0, {}) of shape {}", offset, offset,
                     width, w, shape_str(s));
  const index_t rows = w == 0 ? 0 : tape.value(x).numel() / w;
  Shape ys = s;
  ys.back() = width;

  // forward
  auto y = Tensor<T, B>::uninitialized(ys);
  {
    const T* xp = tape.value(x).data();
    T* yp = y.data();
    B::parallel_for_2d(rows, width,
                       [=] EP_HOST_DEVICE(index_t r, index_t j) { yp[r * width + j] = xp[r * w + offset + j]; });
  }

  auto backward = [&tape, x, rows, w, offset, width](Var self) {  // scatter dy into the slice of dx
    if (!tape.requires_grad(x)) return;
    const T* gy = tape.grad_data(self);
    T* gx = tape.grad_into(x).zeroed();  // only the slice's columns are written
    B::parallel_for_2d(rows, width,
                       [=] EP_HOST_DEVICE(index_t r, index_t j) { gx[r * w + offset + j] += gy[r * width + j]; });
  };
  auto jvp = [&tape, x, rows, w, offset, width](Var self) {  // ty = the slice of tx
    const T* tx = tape.tangent_data(x);
    if (!tx) return;
    T* ty = tape.tangent_into(self).data;  // assigned in full
    B::parallel_for_2d(rows, width,
                       [=] EP_HOST_DEVICE(index_t r, index_t j) { ty[r * width + j] = tx[r * w + offset + j]; });
  };
  return tape.record("slice_last", std::move(y), {x}, backward, jvp);
}

}  // namespace entropy_probe
