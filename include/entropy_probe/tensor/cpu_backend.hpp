// The CPU backend: host memory, Eigen for linear algebra, and a BLAS (cblas)
// for the large matrix products when ENTROPY_PROBE_USE_CBLAS is defined.
//
// A backend is a type with static primitives; ops are written once against
// them (gemm and its batched form, parallel_for / parallel_for_2d
// over a host/device functor, double-accumulated sums and row reductions),
// so a second backend (CUDA, tensor/cuda_backend.hpp) only has to supply the
// same primitives. Its SIMD forms of the unary and gated maps and of the
// log-softmax passes are optional overrides of the generic compositions
// (tensor/compositions.hpp).
#pragma once

#include "entropy_probe/core/config.hpp"
#include "entropy_probe/core/error.hpp"
#include "entropy_probe/tensor/backend.hpp"
#include "entropy_probe/tensor/batch_grid.hpp"
#include "entropy_probe/tensor/block_cache.hpp"
#include "entropy_probe/tensor/owned_buffer.hpp"
#include "entropy_probe/tensor/simd.hpp"
#include "entropy_probe/tensor/skinny_gemm.hpp"

#include <Eigen/Core>
#include <unsupported/Eigen/CXX11/ThreadPool>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(ENTROPY_PROBE_USE_CBLAS)
// OpenBLAS's thread count, weak: absent (null) with another BLAS.
extern "C" __attribute__((weak)) void openblas_set_num_threads(int);
extern "C" __attribute__((weak)) int openblas_get_num_threads(void);
#include <cblas.h>
#endif

namespace entropy_probe {

namespace cpu_detail {

// Host memory for tensors: 64-byte aligned (a cache line, an AVX-512
// vector), and blocks of at least kMinCachedBytes kept in a BlockCache when
// freed. Without the cache every large temporary of a forward pass is a fresh
// mmap that page-faults in and is zeroed by the kernel, then munmapped: 11-20%
// of a probe pass (docs/performance.md).
class HostAllocator {
 public:
  static constexpr std::size_t kAlign = 64;
  static constexpr std::size_t kMinCachedBytes = std::size_t(64) << 10;
  static constexpr std::size_t kDefaultLimit = std::size_t(2) << 30;

  static HostAllocator& instance() {
    static HostAllocator* a = new HostAllocator();  // never destroyed: buffers may outlive statics
    return *a;
  }

  void* allocate(std::size_t bytes) {
    if (bytes == 0) return nullptr;
    const std::size_t size = block_size(bytes);
    if (void* p = size >= kMinCachedBytes ? cache_.take(size) : nullptr) return p;
    void* p = std::aligned_alloc(kAlign, size);
    if (!p) {  // give the cached blocks back and try once more
      empty_cache();
      p = std::aligned_alloc(kAlign, size);
    }
    if (!p) fail<Error>("host allocation of {} bytes failed: out of memory", bytes);
    cache_.allocated(size);
    return p;
  }

  void release(void* p, std::size_t bytes) noexcept {
    if (!p) return;
    const std::size_t size = block_size(bytes);
    const std::size_t limit = limit_.load();
    if (!cache_.put(size, p, [&](std::size_t cached) { return size >= kMinCachedBytes && cached + size <= limit; }))
      std::free(p);
  }

  // Bytes of live blocks, and their high-water mark since reset_peak().
  std::size_t in_use() const { return cache_.in_use(); }
  std::size_t peak() const { return cache_.peak(); }
  void reset_peak() { cache_.reset_peak(); }

  void empty_cache() {
    cache_.drain([](void* p, std::size_t) { std::free(p); });
  }
  std::size_t cached_bytes() const { return cache_.cached_bytes(); }
  // At most `bytes` are kept cached (0: none); blocks beyond it are freed.
  void set_limit(std::size_t bytes) {
    limit_ = bytes;
    if (cached_bytes() > bytes) empty_cache();
  }
  std::size_t limit() const { return limit_.load(); }

 private:
  HostAllocator() = default;
  // What is actually allocated: a size class for cacheable blocks, else the
  // request rounded up to the alignment (aligned_alloc's requirement).
  static std::size_t block_size(std::size_t bytes) {
    const std::size_t c = detail::BlockCache::size_class(bytes);
    return c >= kMinCachedBytes ? c : (bytes + kAlign - 1) / kAlign * kAlign;
  }

  detail::CountingBlockCache cache_;
  std::atomic<std::size_t> limit_ = kDefaultLimit;
};

// Host memory for HostBuffer (tensor/owned_buffer.hpp): the caching
// allocator above; no context to hold.
struct HostMemory {
  struct Handle {};
  static constexpr const char* what = "host allocation";
  static Handle acquire() { return {}; }
  static void* allocate(Handle, std::size_t bytes) { return HostAllocator::instance().allocate(bytes); }
  static void release(Handle, void* p, std::size_t bytes) noexcept { HostAllocator::instance().release(p, bytes); }
  static void copy(Handle, void* dst, const void* src, std::size_t bytes) { std::memcpy(dst, src, bytes); }
};

// Host storage of n elements (like CudaBackend's DeviceBuffer, so Tensor
// holds either).
template <class T>
using HostBuffer = detail::OwnedBuffer<T, HostMemory>;

// The threads that share the backend's element and row loops (every op's
// non-GEMM work) with the calling thread, on Eigen's thread pool. Without
// them, half of a probe pass on two cores ran on one core while OpenBLAS's
// threads waited (docs/performance.md). A loop is split into one contiguous
// part per thread, so results do not depend on timing; bodies write
// disjoint outputs, as the CUDA backend already requires.
//
// They also split the matrix products (CpuBackend::gemm; OpenBLAS runs on
// one thread). Thread count: ENTROPY_PROBE_NUM_THREADS if set, else the
// hardware's; set it to 1 for one process per core, e.g. under mpirun on a
// full machine.
class HostThreads {
 public:
  static HostThreads& instance() {
    static HostThreads* t = new HostThreads();  // never destroyed: workers may outlive statics
    return *t;
  }

  int num_threads() const { return num_threads_; }
  // Not while a loop runs on the pool.
  void set_num_threads(int n) {
    if (n < 1) fail<UsageError>("CpuBackend::set_num_threads: {} threads; need at least 1", n);
    pool_.reset();
    num_threads_ = n;
    if (n > 1) pool_ = std::make_unique<Eigen::ThreadPool>(n - 1);
  }

  // f(begin, end) over [0, n) in num_threads() parts, the calling thread
  // taking the first; serial below `grain` items per part, and inside a part
  // (a body that itself loops in parallel runs that loop serially).
  template <class F>
  void run(index_t n, index_t grain, F&& f) {
    const index_t parts = std::min<index_t>(num_threads_, n / std::max<index_t>(grain, 1));
    if (parts < 2 || in_part()) {
      if (n > 0) f(index_t(0), n);
      return;
    }
    auto bound = [=](index_t p) { return n / parts * p + std::min(p, n % parts); };
    Eigen::Barrier done(static_cast<unsigned>(parts - 1));
    for (index_t p = 1; p < parts; ++p)
      pool_->Schedule([&f, &done, bound, p] {
        in_part() = true;
        f(bound(p), bound(p + 1));
        in_part() = false;
        done.Notify();
      });
    in_part() = true;
    f(index_t(0), bound(1));
    in_part() = false;
    done.Wait();
  }

 private:
  HostThreads() { set_num_threads(default_threads()); }

  static int default_threads() {
    if (const char* env = std::getenv("ENTROPY_PROBE_NUM_THREADS")) {
      char* end = nullptr;
      const long v = std::strtol(env, &end, 10);
      if (end == env || *end != '\0' || v < 1 || v > 4096)
        fail<UsageError>("ENTROPY_PROBE_NUM_THREADS='{}': expected a thread count from 1 to 4096", env);
      return static_cast<int>(v);
    }
    return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  }
  static bool& in_part() {
    thread_local bool inside = false;
    return inside;
  }

  int num_threads_ = 1;
  std::unique_ptr<Eigen::ThreadPool> pool_;
};

// The bytes /proc/meminfo's MemAvailable reports, or those left under the
// cgroup (v2) memory limit when that is less: in a container MemAvailable
// describes the whole machine.
inline std::size_t host_memory_available() {
  auto read_number = [](const char* path, const char* key) -> std::optional<std::size_t> {
    std::ifstream in(path);
    std::string word;
    if (!key) {  // the file holds one number (or "max")
      std::size_t n = 0;
      return in >> n ? std::optional<std::size_t>(n) : std::nullopt;
    }
    while (in >> word)
      if (word == key) {
        std::size_t kib = 0;
        return in >> kib ? std::optional<std::size_t>(kib * 1024) : std::nullopt;
      }
    return std::nullopt;
  };
  const auto available = read_number("/proc/meminfo", "MemAvailable:");
  if (!available) fail<Error>("cannot read MemAvailable from /proc/meminfo: give the memory budget explicitly");
  const auto limit = read_number("/sys/fs/cgroup/memory.max", nullptr);
  const auto current = read_number("/sys/fs/cgroup/memory.current", nullptr);
  if (limit && current) return std::min(*available, *limit > *current ? *limit - *current : std::size_t(0));
  return *available;
}

}  // namespace cpu_detail

struct CpuBackend {
  static constexpr const char* name = "cpu";
  // Tensor data is ordinary host memory (Tensor::operator[] works).
  static constexpr bool host_memory = true;
  // Elements of scratch an op may use to batch independent small products
  // into one call (attention's per-row products). 0: one at a time, which
  // keeps the scratch small and hot in cache.
  static constexpr index_t batch_scratch_elements = 0;

  template <class T>
  using Storage = cpu_detail::HostBuffer<T>;

  // Zero-initialised storage of n elements.
  template <class T>
  static Storage<T> allocate(index_t n) {
    Storage<T> s = allocate_uninitialized<T>(n);
    if (n > 0) std::memset(s.data(), 0, s.size() * sizeof(T));
    return s;
  }
  // Storage of n elements that the caller overwrites completely before any
  // read (an output every element of which a kernel or product assigns).
  template <class T>
  static Storage<T> allocate_uninitialized(index_t n) {
    if (n < 0) fail<UsageError>("CpuBackend::allocate: negative size {}", n);
    Storage<T> s(static_cast<std::size_t>(n));
    if constexpr (kPoisonUninitialized && std::is_floating_point_v<T>)
      std::fill(s.data(), s.data() + s.size(), std::numeric_limits<T>::quiet_NaN());
    return s;
  }

  // The allocator's cache of freed blocks: its size, a cap on it (0 turns
  // caching off; default 2 GiB) and a way to give it all back.
  static std::size_t cached_bytes() { return cpu_detail::HostAllocator::instance().cached_bytes(); }
  static std::size_t cache_limit() { return cpu_detail::HostAllocator::instance().limit(); }
  static void set_cache_limit(std::size_t bytes) { cpu_detail::HostAllocator::instance().set_limit(bytes); }
  // Rows (G x T per prompt) at which a microbatch's products already run near
  // the BLAS's rate on the host: the automatic microbatch size takes the
  // fewest prompts that reach them, since more buy no speed and cost memory
  // traffic (docs/performance.md, Microbatches and the memory budget).
  static constexpr index_t microbatch_rows = 1024;
  static void empty_cache() { cpu_detail::HostAllocator::instance().empty_cache(); }

  // Bytes of live tensor storage, and its high-water mark since the last
  // reset_peak_memory(): the automatic microbatch size measures with them.
  static std::size_t memory_in_use() { return cpu_detail::HostAllocator::instance().in_use(); }
  static std::size_t peak_memory() { return cpu_detail::HostAllocator::instance().peak(); }
  static void reset_peak_memory() { cpu_detail::HostAllocator::instance().reset_peak(); }
  // What more tensors could take: the kernel's MemAvailable (less when a
  // cgroup limit is nearer) plus the allocator's cached free blocks. The
  // default memory budget is default_memory_share of it: the host also holds
  // the process's other memory, the cache (up to 2 GiB) and its size-class
  // slack, and a microbatch larger than the products need buys no speed on
  // the CPU (docs/performance.md, Microbatches and the memory budget).
  static constexpr double default_memory_share = 0.25;
  static std::size_t memory_available() { return cpu_detail::host_memory_available() + cached_bytes(); }

  template <class T>
  static void fill(T* dst, index_t n, T value) {
    std::fill(dst, dst + n, value);
  }

  template <class T>
  static void copy(T* dst, const T* src, index_t n) {
    if (n > 0) std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(T));
  }

  template <class T>
  static void upload(T* dst, const T* host_src, index_t n) {
    copy(dst, host_src, n);
  }
  template <class T>
  static void download(T* host_dst, const T* src, index_t n) {
    copy(host_dst, src, n);
  }

  // Threads of the element and row loops (see cpu_detail::HostThreads).
  static int num_threads() { return cpu_detail::HostThreads::instance().num_threads(); }
  static void set_num_threads(int n) { cpu_detail::HostThreads::instance().set_num_threads(n); }

  // f(i) for i in [0, n). The body is a host/device functor; bodies for
  // different i may run on different threads.
  template <class F>
  static void parallel_for(index_t n, F&& f) {
    threads().run(n, kGrainIndices, [&](index_t lo, index_t hi) {
      for (index_t i = lo; i < hi; ++i) f(i);
    });
  }

  // f(slot, i) for i in [0, n), where each i is a large task (a tile of
  // products and its row passes): tasks are handed out one at a time, in
  // index order, to the calling thread and the pool's; slot in
  // [0, num_threads()) names the running thread's scratch. A product inside
  // a task runs whole on the task's thread (gemm does not split inside a
  // part): small products split across threads spent most of their time
  // waking and yielding them (docs/performance.md). Outputs of task i must
  // depend on i alone, so results do not depend on which thread ran it.
  template <class F>
  static void parallel_tasks(index_t n, F&& f) {
    [[maybe_unused]] const SerialBlas serial;  // an empty guard without OpenBLAS
    std::atomic<index_t> next{0};
    threads().run(std::min<index_t>(num_threads(), n), 1, [&](index_t lo, index_t hi) {
      for (index_t slot = lo; slot < hi; ++slot)
        for (index_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
             i = next.fetch_add(1, std::memory_order_relaxed))
          f(slot, i);
    });
  }

  // f(r, j) for r in [0, rows), j in [0, cols): element-parallel work on
  // rows (no index division on either backend).
  template <class F>
  static void parallel_for_2d(index_t rows, index_t cols, F&& f) {
    threads().run(rows, row_grain(cols), [&](index_t lo, index_t hi) {
      for (index_t r = lo; r < hi; ++r)
        for (index_t j = 0; j < cols; ++j) f(r, j);
    });
  }

  // Overrides of the compositions of tensor/compositions.hpp (the contracts
  // are there; the ops reach these through its dispatch, unary_map<F, B>(...)
  // and so on; a backend without them runs the generic forms, F's scalar
  // forms one element per index).
  //
  // Elementwise maps of a functor F of tensor/functors.hpp: here F's array
  // forms run on cache-sized chunks, so exp and tanh are SIMD. A functor
  // with float kernels (f_simd / df_simd) runs those on float.
  template <class F, class T>
  static void unary_map(index_t n, const T* x, T* y) {
    if constexpr (has_simd<F, T>)
      for_chunks(n, [=](index_t i, index_t len) { F::f_simd(len, x + i, y + i); });
    else
      for_chunks(n, [=](index_t i, index_t len) { vec(y + i, len) = F::f_array(vec(x + i, len)); });
  }
  template <class F, class T>
  static void unary_vjp(index_t n, const T* x, const T* gy, T* gx, bool assign = false) {
    for_chunks(n, [=](index_t i, index_t len) {
      with_df<F>(x + i, len, [&](const auto& d) {
        if (assign)
          vec(gx + i, len) = vec(gy + i, len) * d;
        else
          vec(gx + i, len) += vec(gy + i, len) * d;
      });
    });
  }
  template <class F, class T>
  static void unary_jvp(index_t n, const T* x, const T* tx, T* ty) {
    for_chunks(n, [=](index_t i, index_t len) {
      with_df<F>(x + i, len, [&](const auto& d) { vec(ty + i, len) = d * vec(tx + i, len); });
    });
  }

  // Gated maps of a functor F, y = F(g) * u (a gated MLP: SwiGLU for Silu),
  // each one pass over the elements, in the order of operations of unary_map
  // followed by a product. A functor with float kernels (gated_simd, ...)
  // runs those on float; otherwise F's array forms run on chunks, as in
  // unary_map.
  template <class F, class T>
  static void gated_map(index_t n, const T* g, const T* u, T* y) {
    if constexpr (has_gated_simd<F, T>)
      for_chunks(n, [=](index_t i, index_t len) { F::gated_simd(len, g + i, u + i, y + i); });
    else
      for_chunks(n, [=](index_t i, index_t len) { vec(y + i, len) = F::f_array(vec(g + i, len)) * vec(u + i, len); });
  }
  template <class F, class T>
  static void gated_vjp(index_t n, const T* g, const T* u, const T* gy, T* gg, bool assign_g, T* gu, bool assign_u) {
    if constexpr (has_gated_simd<F, T>) {
      for_chunks(n, [=](index_t i, index_t len) {
        F::gated_vjp_simd(len, g + i, u + i, gy + i, gg ? gg + i : nullptr, assign_g, gu ? gu + i : nullptr, assign_u);
      });
    } else {
      for_chunks(n, [=](index_t i, index_t len) {
        if (gg)
          with_df<F>(g + i, len, [&](const auto& d) {
            if (assign_g)
              vec(gg + i, len) = vec(gy + i, len) * vec(u + i, len) * d;
            else
              vec(gg + i, len) += vec(gy + i, len) * vec(u + i, len) * d;
          });
        if (gu) {
          if (assign_u)
            vec(gu + i, len) = vec(gy + i, len) * F::f_array(vec(g + i, len));
          else
            vec(gu + i, len) += vec(gy + i, len) * F::f_array(vec(g + i, len));
        }
      });
    }
  }
  template <class F, class T>
  static void gated_jvp(index_t n, const T* g, const T* u, const T* tg, const T* tu, T* ty) {
    if constexpr (has_gated_simd<F, T>) {
      for_chunks(n, [=](index_t i, index_t len) {
        F::gated_jvp_simd(len, g + i, u + i, tg ? tg + i : nullptr, tu ? tu + i : nullptr, ty + i);
      });
    } else {
      for_chunks(n, [=](index_t i, index_t len) {
        if (tg)
          with_df<F>(g + i, len, [&](const auto& d) {
            if (tu)
              vec(ty + i, len) =
                  d * vec(tg + i, len) * vec(u + i, len) + F::f_array(vec(g + i, len)) * vec(tu + i, len);
            else
              vec(ty + i, len) = d * vec(tg + i, len) * vec(u + i, len);
          });
        else
          vec(ty + i, len) = F::f_array(vec(g + i, len)) * vec(tu + i, len);
      });
    }
  }

  // The passes of a log-softmax over rows of logits (log_softmax_gather,
  // lm_head_logprob). Sums and lse in double. Here a row at a time, exp on
  // Eigen arrays in T (SIMD), a chunk at a time; the generic forms (CUDA's)
  // reduce rows in double with one thread per element.
  template <class T>
  static void softmax_lse(index_t m, index_t V, const T* z, const std::int32_t* rows, acc_t s, acc_t* lse) {
    threads().run(m, row_grain(V), [=](index_t lo, index_t hi) {
      for (index_t k = lo; k < hi; ++k) {
        const T* zr = z + rows[k] * V;
        const T mx = V > 0 ? vec(zr, V).maxCoeff() : -std::numeric_limits<T>::infinity();
        acc_t sum = 0;
        alignas(64) T p[kChunk];
        for (index_t j = 0; j < V; j += kChunk) {
          const index_t len = std::min(kChunk, V - j);
          exp_affine(len, zr + j, p, T(s), mx, T(0));
          sum += vec(p, len).template cast<acc_t>().sum();
        }
        lse[k] = static_cast<acc_t>(mx) * s + std::log(sum);
      }
    });
  }
  template <class T>
  static void softmax_vjp(index_t m, index_t V, const T* z, const std::int32_t* rows, const std::int32_t* targets,
                          const acc_t* lse, const T* g, acc_t s, T* gz, bool assign) {
    threads().run(m, row_grain(V), [=](index_t lo, index_t hi) {
      for (index_t k = lo; k < hi; ++k) {
        const T* zr = z + rows[k] * V;
        T* gr = gz + rows[k] * V;
        const acc_t c = static_cast<acc_t>(g[rows[k]]) * s;
        alignas(64) T p[kChunk];
        for (index_t j = 0; j < V; j += kChunk) {  // p is read from z before gz is written: gz may be z
          const index_t len = std::min(kChunk, V - j);
          exp_scaled(len, zr + j, p, s, lse[k]);
          if (assign)
            vec(gr + j, len) = -T(c) * vec(p, len);
          else
            vec(gr + j, len) -= T(c) * vec(p, len);
        }
        gr[targets[k]] += static_cast<T>(c);
      }
    });
  }
  template <class T>
  static void softmax_dot(index_t m, index_t V, const T* z, const std::int32_t* rows, const acc_t* lse, acc_t s,
                          const T* t, acc_t* out) {
    threads().run(m, row_grain(V), [=](index_t lo, index_t hi) {
      for (index_t k = lo; k < hi; ++k) {
        const T* zr = z + rows[k] * V;
        const T* tr = t + rows[k] * V;
        acc_t sum = 0;
        alignas(64) T p[kChunk];
        for (index_t j = 0; j < V; j += kChunk) {
          const index_t len = std::min(kChunk, V - j);
          exp_scaled(len, zr + j, p, s, lse[k]);
          sum += (vec(p, len) * vec(tr + j, len)).template cast<acc_t>().sum();
        }
        out[k] = sum;
      }
    });
  }

  // y[i] = exp(((x[i] - b) * a - c) - d) over [0, n) (y may be x): the exp
  // of the softmax's lse pass and of attention, a shift c + d given in two
  // parts (attention's hi + lo of a double shift). Float runs the dispatched SIMD kernel of tensor/simd.hpp,
  // double Eigen's exp.
  template <class T>
  static void exp_affine(index_t n, const T* x, T* y, T a, T b, T c, T d = T(0)) {
    if constexpr (std::is_same_v<T, float>) {
      if (x == y)
        simd::exp_affine_inplace(n, y, a, b, c, d);
      else
        simd::exp_affine(n, x, y, a, b, c, d);
    } else {
      vec(y, n) = (((vec(x, n) - b) * a - c) - d).exp();
    }
  }
  // y[i] = exp(x[i] a - c) with a and c in acc_t (simd::exp_scaled: the
  // argument in double): the softmax's p = exp(z s - lse).
  template <class T>
  static void exp_scaled(index_t n, const T* x, T* y, acc_t a, acc_t c) {
    if constexpr (std::is_same_v<T, float>)
      simd::exp_scaled(n, x, y, a, c);
    else
      vec(y, n) = (vec(x, n) * T(a) - T(c)).exp();
  }

  // sum of f(i) over [0, n), accumulated in double.
  template <class F>
  static acc_t sum(index_t n, F&& f) {
    acc_t s = 0;
    for (index_t i = 0; i < n; ++i) s += static_cast<acc_t>(f(i));
    return s;
  }

  // Row reductions in double into backend memory: out[r] = sum_j f(r, j) or
  // max_j f(r, j) (std::fmax, so NaN is skipped; -inf when cols == 0).
  template <class F>
  static void row_sum(index_t rows, index_t cols, F&& f, acc_t* out) {
    threads().run(rows, row_grain(cols), [&](index_t lo, index_t hi) {
      for (index_t r = lo; r < hi; ++r) {
        acc_t s = 0;
        for (index_t j = 0; j < cols; ++j) s += static_cast<acc_t>(f(r, j));
        out[r] = s;
      }
    });
  }
  template <class F>
  static void row_max(index_t rows, index_t cols, F&& f, acc_t* out) {
    threads().run(rows, row_grain(cols), [&](index_t lo, index_t hi) {
      for (index_t r = lo; r < hi; ++r) {
        acc_t m = -std::numeric_limits<acc_t>::infinity();
        for (index_t j = 0; j < cols; ++j) m = std::fmax(m, static_cast<acc_t>(f(r, j)));
        out[r] = m;
      }
    });
  }

  // Fused row passes, for the ops that normalise a row by a statistic of it
  // (norms, attention's softmax and its VJP / JVP). For each row r:
  //   row_sum_apply:      a = fin(r, sum_{j < len(r)} f(r, j)),  then g(r, j, a) for j < cols
  //   row_max_sum_apply:  m = max_{j < len(r)} fm(r, j),
  //                       s = sum_{j < len(r)} fs(r, j, m),        then g(r, j, m, s) for j < cols
  // all in double. Each pass ends before the next begins, so a pass may write
  // the element (r, j) it is given and a later pass reads it. Here a row at
  // a time, so it stays in cache between passes; on a device a block per row.
  template <class L, class F, class Fin, class G>
  static void row_sum_apply(index_t rows, index_t cols, L&& len, F&& f, Fin&& fin, G&& g) {
    threads().run(rows, row_grain(cols), [&](index_t lo, index_t hi) {
      for (index_t r = lo; r < hi; ++r) {
        const index_t n = len(r);
        acc_t s = 0;
        for (index_t j = 0; j < n; ++j) s += static_cast<acc_t>(f(r, j));
        const acc_t a = fin(r, s);
        for (index_t j = 0; j < cols; ++j) g(r, j, a);
      }
    });
  }
  template <class L, class FM, class FS, class G>
  static void row_max_sum_apply(index_t rows, index_t cols, L&& len, FM&& fm, FS&& fs, G&& g) {
    threads().run(rows, row_grain(cols), [&](index_t lo, index_t hi) {
      for (index_t r = lo; r < hi; ++r) {
        const index_t n = len(r);
        acc_t m = -std::numeric_limits<acc_t>::infinity();
        for (index_t j = 0; j < n; ++j) m = std::fmax(m, static_cast<acc_t>(fm(r, j)));
        acc_t s = 0;
        for (index_t j = 0; j < n; ++j) s += static_cast<acc_t>(fs(r, j, m));
        for (index_t j = 0; j < cols; ++j) g(r, j, m, s);
      }
    });
  }

  // Row-major C[m,n] = alpha * op(A)[m,k] * op(B)[k,n] + beta * C.
  // op(A) = A (A is [m,k], leading dim lda) or A^T (A is [k,m]).
  template <class T>
  static void gemm(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, T alpha, const T* a, index_t lda,
                   const T* b, index_t ldb, T beta, T* c, index_t ldc) {
    if (m == 0 || n == 0) return;
    if (k == 0) {
      scale_matrix(m, n, beta, c, ldc);
      return;
    }
    single_threaded_blas();
    if constexpr (std::is_same_v<T, float>) {
      // A decode step's X W^T (few rows against a whole weight matrix):
      // W read in place (tensor/skinny_gemm.hpp), its rows split across the threads.
      const simd::SkinnyIsa isa = simd::skinny_gemm_isa();
      if (isa != simd::SkinnyIsa::none && !trans_a && trans_b && m <= simd::kSkinnyMaxRows &&
          n * k >= kSkinnyMinWeights) {
        constexpr index_t rows = simd::kSkinnyTileRows;
        threads().run((n + rows - 1) / rows, kSkinnyGrainTiles, [&](index_t lo, index_t hi) {
          simd::skinny_gemm(isa, m, lo * rows, std::min(hi * rows, n), k, alpha, a, lda, b, ldb, beta, c, ldc);
        });
        return;
      }
    }
    // One thread's share: rows [i0, i1) or columns [j0, j1) of C.
    auto part = [&](index_t mm, index_t nn, const T* aa, const T* bb, T* cc) {
#if defined(ENTROPY_PROBE_USE_CBLAS)
      if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
        const auto ta = trans_a ? CblasTrans : CblasNoTrans;
        const auto tb = trans_b ? CblasTrans : CblasNoTrans;
        if constexpr (std::is_same_v<T, float>) {
          cblas_sgemm(CblasRowMajor, ta, tb, int(mm), int(nn), int(k), alpha, aa, int(lda), bb, int(ldb), beta, cc,
                      int(ldc));
        } else {
          cblas_dgemm(CblasRowMajor, ta, tb, int(mm), int(nn), int(k), alpha, aa, int(lda), bb, int(ldb), beta, cc,
                      int(ldc));
        }
        return;
      }
#endif
      eigen_gemm(trans_a, trans_b, mm, nn, k, alpha, aa, lda, bb, ldb, beta, cc, ldc);
    };
#if defined(ENTROPY_PROBE_USE_CBLAS)
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>)
      detail::check_blas_sizes(std::is_same_v<T, float> ? "cblas_sgemm" : "cblas_dgemm", m, n, k, lda, ldb, ldc);
#endif
    // The threads split C along its longer side in blocks of kSplitBlock,
    // each part a single-threaded BLAS call (see SerialBlas).
    if (2.0 * double(m) * double(n) * double(k) < kSplitFlops || num_threads() < 2) return part(m, n, a, b, c);
    [[maybe_unused]] const SerialBlas serial;
    if (m >= n) {
      threads().run((m + kSplitBlock - 1) / kSplitBlock, 1, [&](index_t lo, index_t hi) {
        const index_t i0 = lo * kSplitBlock, i1 = std::min(hi * kSplitBlock, m);
        part(i1 - i0, n, trans_a ? a + i0 : a + i0 * lda, b, c + i0 * ldc);
      });
    } else {
      threads().run((n + kSplitBlock - 1) / kSplitBlock, 1, [&](index_t lo, index_t hi) {
        const index_t j0 = lo * kSplitBlock, j1 = std::min(hi * kSplitBlock, n);
        part(m, j1 - j0, a, trans_b ? b + j0 * ldb : b + j0, c + j0);
      });
    }
  }

  // Independent products C_i = alpha op(A_i) op(B_i) + beta C_i over the
  // items of a BatchGrid (tensor/batch_grid.hpp; leading dimensions as in
  // gemm), here one after another in item order.
  template <class T>
  static void gemm_batched(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, T alpha, const T* a,
                           index_t lda, const T* b, index_t ldb, T beta, T* c, index_t ldc, const BatchGrid& grid) {
    for (index_t i = 0, items = grid.count(); i < items; ++i) {
      index_t oa, ob, oc;
      grid.offsets(i, oa, ob, oc);
      gemm(trans_a, trans_b, m, n, k, alpha, a + oa, lda, b + ob, ldb, beta, c + oc, ldc);
    }
  }

  // Eigen's own product, used when no BLAS is configured (and by the
  // benchmark that compares the two).
  template <class T>
  static void eigen_gemm(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, T alpha, const T* a, index_t lda,
                         const T* b, index_t ldb, T beta, T* c, index_t ldc) {
    using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    using Stride = Eigen::OuterStride<>;
    using CMap = Eigen::Map<const Mat, 0, Stride>;
    using MMap = Eigen::Map<Mat, 0, Stride>;
    MMap C(c, m, n, Stride(ldc));
    if (beta == T(0)) {
      C.setZero();
    } else if (beta != T(1)) {
      C *= beta;
    }
    CMap A(a, trans_a ? k : m, trans_a ? m : k, Stride(lda));
    CMap Bm(b, trans_b ? n : k, trans_b ? k : n, Stride(ldb));
    if (!trans_a && !trans_b) {
      C.noalias() += alpha * (A * Bm);
    } else if (!trans_a && trans_b) {
      C.noalias() += alpha * (A * Bm.transpose());
    } else if (trans_a && !trans_b) {
      C.noalias() += alpha * (A.transpose() * Bm);
    } else {
      C.noalias() += alpha * (A.transpose() * Bm.transpose());
    }
  }

 private:
  // OpenBLAS's own threads stay idle: gemm splits the products across the
  // backend's threads instead. OpenBLAS's workers wait for the next product
  // spinning in sched_yield, and between products they took the cores from
  // the element loops (on 2 cores, a fifth of a probe pass's samples; the
  // split made the small benchmark's sums 20% faster, docs/performance.md,
  // Threading). Set once, at the first product; OPENBLAS_NUM_THREADS is
  // therefore not read for the library's products.
  static void single_threaded_blas() {
#if defined(ENTROPY_PROBE_USE_CBLAS)
    [[maybe_unused]] static const bool once = [] {
      if (openblas_set_num_threads) openblas_set_num_threads(1);
      return true;
    }();
#endif
  }
  // OpenBLAS on one thread for the guard's lifetime, should a host program
  // have raised its count again (nothing with another BLAS).
  struct SerialBlas {
    int saved = 0;
#if defined(ENTROPY_PROBE_USE_CBLAS)
    SerialBlas() {
      if (openblas_set_num_threads && openblas_get_num_threads) {
        saved = openblas_get_num_threads();
        if (saved > 1) openblas_set_num_threads(1);
      }
    }
    ~SerialBlas() {
      if (saved > 1) openblas_set_num_threads(saved);
    }
#else
    SerialBlas() = default;
#endif
    SerialBlas(const SerialBlas&) = delete;
    SerialBlas& operator=(const SerialBlas&) = delete;
  };

  // Chunks small enough that a chunk's inputs, outputs and array temporaries
  // stay in L1/L2 between the passes an array expression makes.
  static constexpr index_t kChunk = 2048;
  template <class F, class T>
  static constexpr bool has_simd = std::is_same_v<T, float>&& requires(const float* a, float* b) {
    F::f_simd(index_t{}, a, b);
    F::df_simd(index_t{}, a, b);
  };
  template <class F, class T>
  static constexpr bool has_gated_simd = std::is_same_v<T, float>&& requires(const float* a, float* b) {
    F::gated_simd(index_t{}, a, a, b);
    F::gated_vjp_simd(index_t{}, a, a, a, b, true, b, true);
    F::gated_jvp_simd(index_t{}, a, a, a, a, b);
  };
  // body(d) with d the array f'(x) over one chunk (len <= kChunk): through
  // the float kernel into a stack buffer, else Eigen's expression.
  template <class F, class T, class Body>
  static void with_df(const T* x, index_t len, Body&& body) {
    if constexpr (has_simd<F, T>) {
      alignas(64) float d[kChunk];
      F::df_simd(len, x, d);
      body(vec(static_cast<const float*>(d), len));
    } else {
      body(F::df_array(vec(x, len)));
    }
  }

  template <class F>
  static void for_chunks(index_t n, F f) {
    const index_t chunks = (n + kChunk - 1) / kChunk;
    threads().run(chunks, kGrainItems / kChunk, [&](index_t lo, index_t hi) {
      for (index_t c = lo; c < hi; ++c) f(c * kChunk, std::min(kChunk, n - c * kChunk));
    });
  }

  // Work per thread below which a loop stays on the calling thread: waking a
  // worker costs a few microseconds, about this many simple element updates.
  static constexpr index_t kGrainItems = 16384;
  // parallel_for does not know what one index costs (an element, or a whole
  // attention row): a smaller grain.
  static constexpr index_t kGrainIndices = 4096;
  // The skinny product: weights below this many elements stay with the BLAS
  // (cache-resident, where its packing costs little); a thread takes at
  // least this many 4-row tiles of W (a few microseconds of work each part).
  static constexpr index_t kSkinnyMinWeights = index_t{1} << 16;
  static constexpr index_t kSkinnyGrainTiles = 16;
  // Products of fewer FLOPs than this run whole on the calling thread (a
  // part's wake-up costs a few microseconds; this is about 10 of work);
  // larger ones split C into parts of whole kSplitBlock-row (or column)
  // blocks, a multiple of the BLAS kernels' register tiles.
  static constexpr double kSplitFlops = 4e6;
  static constexpr index_t kSplitBlock = 16;
  static index_t row_grain(index_t cols) { return std::max<index_t>(1, kGrainItems / std::max<index_t>(cols, 1)); }
  static cpu_detail::HostThreads& threads() { return cpu_detail::HostThreads::instance(); }
  template <class T>
  static Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>> vec(T* p, index_t n) {
    return {p, n};
  }
  template <class T>
  static Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>> vec(const T* p, index_t n) {
    return {p, n};
  }

  template <class T>
  static void scale_matrix(index_t m, index_t n, T beta, T* c, index_t ldc) {
    for (index_t i = 0; i < m; ++i)
      for (index_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
  }
};

static_assert(TensorBackend<CpuBackend>, "CpuBackend must meet the backend contract (tensor/backend.hpp)");

}  // namespace entropy_probe
