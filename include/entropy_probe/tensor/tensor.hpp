// A dense, contiguous, row-major tensor owned by a backend. The element type
// and the backend are template parameters; nothing above this layer touches
// the storage except through data() and the backend's primitives.
#pragma once

#include "entropy_probe/core/config.hpp"
#include "entropy_probe/core/error.hpp"
#include "entropy_probe/tensor/cpu_backend.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <initializer_list>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace entropy_probe {

using Shape = std::vector<index_t>;

inline index_t numel_of(const Shape& s) {
  index_t n = 1;
  for (index_t d : s) {
    if (d < 0) fail<UsageError>("negative dimension in shape [{}]", fmt::join(s, ", "));
    n *= d;
  }
  return n;
}

inline std::string shape_str(const Shape& s) { return fmt::format("[{}]", fmt::join(s, ", ")); }

template <class T, class B>
class Tensor;

// dst[i] = U(src[i]) for i in [0, n), on the backend: the one element-type
// conversion (tensors, views, parameter buffers).
template <class B, class T, class U>
void convert_elements(index_t n, const T* src, U* dst) {
  B::parallel_for(n, [=] EP_HOST_DEVICE(index_t i) { dst[i] = static_cast<U>(src[i]); });
}

// A non-owning view of a tensor's elements: a data pointer, a borrowed shape
// and no storage, so many views can share one allocation (a parameter
// buffer's slots). T const-qualified gives a read-only view; a view of T
// converts to one of const T. Both the elements and the shape must outlive
// the view; copying a view copies the pointers, never the elements.
template <class T, class B = CpuBackend>
class TensorView {
 public:
  using value_type = std::remove_const_t<T>;
  using backend_type = B;

  TensorView() = default;
  TensorView(T* data, const Shape& shape) : data_(data), shape_(&shape), numel_(numel_of(shape)) {}
  template <class U>
  requires(std::is_same_v<const U, T> && !std::is_same_v<U, T>) TensorView(const TensorView<U, B>& v)
      : data_(v.data()), shape_(&v.shape()), numel_(v.numel()) {}

  T* data() const { return data_; }
  const Shape& shape() const { return shape_ ? *shape_ : empty_shape(); }
  int rank() const { return static_cast<int>(shape().size()); }
  index_t dim(int i) const { return shape().at(static_cast<std::size_t>(i < 0 ? rank() + i : i)); }
  index_t numel() const { return numel_; }

  // Host element access, only where the backend's memory is host memory.
  T& operator[](index_t i) const requires B::host_memory { return data_[i]; }

  std::vector<value_type> to_host() const {
    std::vector<value_type> out(static_cast<std::size_t>(numel_));
    B::download(out.data(), data_, numel_);
    return out;
  }

  // The elements converted to element type U, in a new tensor.
  template <class U>
  Tensor<U, B> cast() const {
    auto out = Tensor<U, B>::uninitialized(shape());  // every element converted below
    convert_elements<B>(numel_, data_, out.data());
    return out;
  }

 private:
  static const Shape& empty_shape() {
    static const Shape none;
    return none;
  }
  T* data_ = nullptr;
  const Shape* shape_ = nullptr;
  index_t numel_ = 0;
};

template <class T, class B = CpuBackend>
class Tensor {
 public:
  using value_type = T;
  using backend_type = B;

  Tensor() = default;
  // Zero-filled tensor of the given shape.
  explicit Tensor(Shape shape) : shape_(std::move(shape)), data_(B::template allocate<T>(numel_of(shape_))) {}
  Tensor(std::initializer_list<index_t> shape) : Tensor(Shape(shape)) {}

  // A tensor whose every element the caller assigns before reading any (an
  // op's output written by a kernel or by a product with beta = 0): skips
  // the zero fill.
  static Tensor uninitialized(Shape shape) {
    Tensor t;
    t.data_ = B::template allocate_uninitialized<T>(numel_of(shape));
    t.shape_ = std::move(shape);
    return t;
  }

  static Tensor from_host(Shape shape, std::span<const T> values) {
    Tensor t = uninitialized(std::move(shape));  // the upload writes all of it
    if (static_cast<index_t>(values.size()) != t.numel())
      fail<UsageError>("Tensor::from_host: {} values for shape {}", values.size(), shape_str(t.shape_));
    B::upload(t.data(), values.data(), t.numel());
    return t;
  }
  static Tensor full(Shape shape, T value) {
    Tensor t = uninitialized(std::move(shape));
    B::fill(t.data(), t.numel(), value);
    return t;
  }

  std::vector<T> to_host() const { return view().to_host(); }

  // A view of the elements and the shape, valid while this tensor lives and
  // keeps its shape.
  TensorView<T, B> view() { return {data(), shape_}; }
  TensorView<const T, B> view() const { return {data(), shape_}; }

  const Shape& shape() const { return shape_; }
  int rank() const { return static_cast<int>(shape_.size()); }
  index_t dim(int i) const { return shape_.at(static_cast<std::size_t>(i < 0 ? rank() + i : i)); }
  index_t numel() const { return static_cast<index_t>(data_.size()); }
  bool empty() const { return shape_.empty() && data_.empty(); }

  T* data() { return data_.data(); }
  const T* data() const { return data_.data(); }

  // Host element access, only on a backend whose memory is host memory (the
  // CPU backend): on a device it would not compile rather than crash. Device
  // tensors go through from_host() / to_host().
  T& operator[](index_t i) requires B::host_memory { return data_[static_cast<std::size_t>(i)]; }
  const T& operator[](index_t i) const requires B::host_memory { return data_[static_cast<std::size_t>(i)]; }

  // Same data, another shape with the same number of elements.
  Tensor reshaped(Shape shape) const& {
    Tensor t = *this;
    t.reshape(std::move(shape));
    return t;
  }
  Tensor reshaped(Shape shape) && {
    reshape(std::move(shape));
    return std::move(*this);
  }
  void reshape(Shape shape) {
    if (numel_of(shape) != numel())
      fail<UsageError>("reshape {} -> {}: element counts differ", shape_str(shape_), shape_str(shape));
    shape_ = std::move(shape);
  }

  // Element type conversion on the same backend.
  template <class U>
  Tensor<U, B> cast() const {
    return view().template cast<U>();
  }

 private:
  Shape shape_;
  typename B::template Storage<T> data_;
};

template <class T, class B>
bool same_shape(const Tensor<T, B>& a, const Tensor<T, B>& b) {
  return a.shape() == b.shape();
}

}  // namespace entropy_probe
