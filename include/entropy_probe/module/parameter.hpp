// A trainable (or frozen) tensor with a stable identity.
//
// The id is assigned once at construction and travels with the object when
// the owning module is moved, so buffers keyed by id stay valid. A copy would
// be a second parameter with the same identity, so copying is disabled; use
// clone() for a distinct parameter with equal values.
#pragma once

#include "entropy_probe/tensor/tensor.hpp"

#include <atomic>
#include <cstdint>
#include <optional>
#include <utility>

namespace entropy_probe {

struct ParamId {
  std::uint64_t value = 0;  // 0 = no parameter (moved-from)
  friend bool operator==(ParamId, ParamId) = default;
  friend auto operator<=>(ParamId, ParamId) = default;
};

namespace detail {
inline std::uint64_t next_param_id() {
  static std::atomic<std::uint64_t> counter{0};
  return ++counter;
}
}  // namespace detail

template <class T, class B = CpuBackend>
class Parameter {
 public:
  using scalar_type = T;
  using backend_type = B;
  using TensorT = Tensor<T, B>;

  explicit Parameter(TensorT value = {}, bool requires_grad = true)
      : value(std::move(value)), requires_grad(requires_grad), id_{detail::next_param_id()} {}

  Parameter(const Parameter&) = delete;
  Parameter& operator=(const Parameter&) = delete;
  Parameter(Parameter&& o) noexcept
      : value(std::move(o.value)), grad(std::move(o.grad)), requires_grad(o.requires_grad), id_(o.id_) {
    o.id_ = ParamId{};
  }
  Parameter& operator=(Parameter&& o) noexcept {
    if (this != &o) {
      value = std::move(o.value);
      grad = std::move(o.grad);
      requires_grad = o.requires_grad;
      id_ = o.id_;
      o.id_ = ParamId{};
    }
    return *this;
  }

  Parameter clone() const {
    Parameter p(value, requires_grad);
    p.grad = grad;
    return p;
  }

  ParamId id() const { return id_; }

  // Adds g into grad; grad stays empty until the first touch (PyTorch's
  // set_to_none convention), so "no gradient" and "zero gradient" differ.
  void accumulate_grad(TensorT&& g) {
    if (g.shape() != value.shape())
      fail<UsageError>("parameter {}: gradient shape {} does not match value shape {}", id_.value, shape_str(g.shape()),
                       shape_str(value.shape()));
    if (!grad) {
      grad = std::move(g);
      return;
    }
    T* dst = grad->data();
    const T* src = g.data();
    B::parallel_for(g.numel(), [=] EP_HOST_DEVICE(index_t i) { dst[i] += src[i]; });
  }
  void zero_grad() { grad.reset(); }

  TensorT value;
  std::optional<TensorT> grad;
  bool requires_grad = true;

 private:
  ParamId id_;
};

}  // namespace entropy_probe
