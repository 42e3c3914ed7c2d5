// Storage of n elements owned through a memory policy: RAII, a deep copy on
// copy, size() / data() / operator[] like std::vector. CpuBackend's
// HostBuffer and CudaBackend's DeviceBuffer are this class over their
// memory (a Memory supplies Handle, acquire, allocate, release, copy and
// `what`, the allocator's name in errors); operator[] is for host memory.
#pragma once

#include "entropy_probe/core/error.hpp"

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

namespace entropy_probe::detail {

template <class T, class Memory>
class OwnedBuffer {
  static_assert(std::is_trivially_copyable_v<T>, "a tensor buffer holds trivially copyable elements");

 public:
  OwnedBuffer() = default;
  // n uninitialised elements.
  explicit OwnedBuffer(std::size_t n) : size_(n) {
    if (n == 0) return;
    if (n > SIZE_MAX / sizeof(T))
      fail<Error>("{} of {} elements of {} bytes failed: the size overflows", Memory::what, n, sizeof(T));
    handle_ = Memory::acquire();
    data_ = static_cast<T*>(Memory::allocate(handle_, n * sizeof(T)));
  }
  OwnedBuffer(const OwnedBuffer& o) : OwnedBuffer(o.size_) {
    if (size_ > 0) Memory::copy(handle_, data_, o.data_, size_ * sizeof(T));
  }
  OwnedBuffer(OwnedBuffer&& o) noexcept { swap(o); }
  OwnedBuffer& operator=(const OwnedBuffer& o) {
    if (this != &o) {
      OwnedBuffer copy(o);
      swap(copy);
    }
    return *this;
  }
  OwnedBuffer& operator=(OwnedBuffer&& o) noexcept {
    OwnedBuffer moved(std::move(o));
    swap(moved);
    return *this;
  }
  ~OwnedBuffer() {
    if (data_) Memory::release(handle_, data_, size_ * sizeof(T));
  }

  void swap(OwnedBuffer& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(size_, o.size_);
    std::swap(handle_, o.handle_);
  }

  T* data() { return data_; }
  const T* data() const { return data_; }
  std::size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  T& operator[](std::size_t i) { return data_[i]; }
  const T& operator[](std::size_t i) const { return data_[i]; }

 private:
  T* data_ = nullptr;
  std::size_t size_ = 0;
  typename Memory::Handle handle_{};
};

}  // namespace entropy_probe::detail
