// The free list behind both backends' caching allocators: freed blocks kept
// by size class for the next request of the same class. A forward pass
// allocates the same shapes microbatch after microbatch, so after the first
// one nearly every request is a hit: no cudaMalloc (which synchronises the
// device) and, on the host, no fresh pages to fault in and zero.
//
// Not thread-safe by itself: the owner holds a lock around it.
#pragma once

#include <algorithm>
#include <bit>
#include <cstddef>
#include <map>
#include <mutex>

namespace entropy_probe::detail {

// Bytes of the blocks an allocator has handed out and not taken back (cached
// free blocks are not in use), and their high-water mark since the last
// reset: what the automatic microbatch size measures a prompt's cost with
// (ProbeComponents::for_each_microbatch). Not thread-safe by itself: the
// owner updates it under the same lock as its BlockCache.
class MemoryCounter {
 public:
  void allocated(std::size_t bytes) {
    in_use_ += bytes;
    peak_ = std::max(peak_, in_use_);
  }
  void released(std::size_t bytes) { in_use_ -= bytes; }
  void reset_peak() { peak_ = in_use_; }
  std::size_t in_use() const { return in_use_; }
  std::size_t peak() const { return peak_; }

 private:
  std::size_t in_use_ = 0, peak_ = 0;
};

class BlockCache {
 public:
  // A block's size class: kMinClass bytes, then four classes per power of two,
  // so a request wastes at most a quarter of its block.
  static constexpr std::size_t kMinClass = 512;
  static std::size_t size_class(std::size_t bytes) {
    if (bytes <= kMinClass) return kMinClass;
    const std::size_t step = std::max(kMinClass, std::bit_floor(bytes) / 4);
    return (bytes + step - 1) / step * step;
  }

  // A cached block of exactly `size` (a size class), or nullptr.
  void* take(std::size_t size) {
    auto it = free_.find(size);
    if (it == free_.end()) return nullptr;
    void* p = it->second;
    free_.erase(it);
    cached_bytes_ -= size;
    return p;
  }
  void put(std::size_t size, void* p) {
    free_.emplace(size, p);
    cached_bytes_ += size;
  }
  // Hands every cached block to release(p, size) and forgets them.
  template <class Release>
  void drain(Release&& release) {
    for (auto& [size, p] : free_) release(p, size);
    free_.clear();
    cached_bytes_ = 0;
  }
  std::size_t cached_bytes() const { return cached_bytes_; }

 private:
  std::multimap<std::size_t, void*> free_;
  std::size_t cached_bytes_ = 0;
};

// The part both caching allocators share: a BlockCache and a MemoryCounter
// behind one mutex. take() and put() count a block as handed out or taken
// back; the owner allocates from the system when take() misses and frees what
// put() refuses.
class CountingBlockCache {
 public:
  // A cached block of `size` (counted as in use), or nullptr.
  void* take(std::size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    void* p = cache_.take(size);
    if (p) counter_.allocated(size);
    return p;
  }
  // Counts a block the owner got from the system as in use.
  void allocated(std::size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    counter_.allocated(size);
  }
  // Counts a block as taken back and keeps it when `keep(cached_bytes)`
  // allows; false when the owner must free it.
  template <class Keep>
  bool put(std::size_t size, void* p, Keep&& keep) {
    std::lock_guard<std::mutex> lock(mutex_);
    counter_.released(size);
    if (!keep(cache_.cached_bytes())) return false;
    cache_.put(size, p);
    return true;
  }
  // Hands every cached block to release(p, size) under the lock.
  template <class Release>
  void drain(Release&& release) {
    std::lock_guard<std::mutex> lock(mutex_);
    cache_.drain(release);
  }

  // Bytes of live blocks, and their high-water mark since reset_peak().
  std::size_t in_use() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return counter_.in_use();
  }
  std::size_t peak() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return counter_.peak();
  }
  void reset_peak() {
    std::lock_guard<std::mutex> lock(mutex_);
    counter_.reset_peak();
  }
  std::size_t cached_bytes() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return cache_.cached_bytes();
  }

 private:
  mutable std::mutex mutex_;
  BlockCache cache_;
  MemoryCounter counter_;
};

}  // namespace entropy_probe::detail
