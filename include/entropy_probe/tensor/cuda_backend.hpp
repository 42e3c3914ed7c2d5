// The CUDA backend: device memory (plain cudaMalloc behind a small caching
// allocator), cuBLAS for the matrix products, grid-stride kernels for
// everything else, all on one stream per device. It supplies the primitives
// of CpuBackend (tensor/cpu_backend.hpp), so every op, the probe and the
// reference models run on the device unchanged: Tensor<float, CudaBackend>,
// nn::Qwen2ForCausalLM<float, CudaBackend>, OfflineEntropyProbe over it.
// It overrides none of the compositions (elementwise and gated maps, the
// log-softmax passes): the ops run their generic forms over these
// primitives (tensor/compositions.hpp).
//
// Only for sources compiled by nvcc with --extended-lambda (the ops hand
// __host__ __device__ lambdas to parallel_for); see docs/cuda.md.
//
// Every CUDA runtime error and cuBLAS status is turned into an
// entropy_probe::Error naming the call, e.g.
//   "cudaMalloc(1.5 GiB) failed: out of memory".
// Kernels run asynchronously: an error inside one surfaces at the next
// synchronising call (a download, a sum); CudaSettings::sync_after_launch
// makes every launch synchronise so the error names its kernel.
#pragma once

#if !defined(__CUDACC__)
#error \
    "entropy_probe/tensor/cuda_backend.hpp needs the CUDA compiler: include it from a .cu source built by nvcc with --extended-lambda (docs/cuda.md)"
#endif
#if !defined(__CUDACC_EXTENDED_LAMBDA__)
#error \
    "entropy_probe/tensor/cuda_backend.hpp needs nvcc's --extended-lambda (the ops pass __host__ __device__ lambdas to kernels)"
#endif

#include "entropy_probe/core/config.hpp"
#include "entropy_probe/core/error.hpp"
#include "entropy_probe/tensor/backend.hpp"
#include "entropy_probe/tensor/batch_grid.hpp"
#include "entropy_probe/tensor/block_cache.hpp"
#include "entropy_probe/tensor/owned_buffer.hpp"

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>

namespace entropy_probe {

// Process-wide switches of the CUDA backend (CudaBackend::settings()).
struct CudaSettings {
  // float GEMMs on TF32 tensor cores (inputs rounded to a 10-bit mantissa,
  // accumulation in fp32): several times faster, about 1e-3 relative error.
  // Off by default: float products are full fp32. Double never changes.
  bool allow_tf32 = false;
  // Keep freed device blocks for reuse instead of cudaFree / cudaMalloc on
  // every temporary (both synchronise the device). Cached blocks are released
  // when an allocation fails and by CudaBackend::empty_cache().
  bool cache_allocations = true;
  // Threads per block of the backend's kernels: a multiple of 32, at most
  // what the device allows (1024 on current GPUs).
  int block_size = 256;
  // Synchronise and check after every kernel and product: slow, but an error
  // then names the kernel that caused it.
  bool sync_after_launch = false;
};

namespace cuda_detail {

inline std::string bytes_str(std::size_t n) {
  static constexpr const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  double v = static_cast<double>(n);
  int u = 0;
  while (v >= 1024.0 && u < 6) {
    v /= 1024.0;
    ++u;
  }
  return u == 0 ? fmt::format("{} B", n) : fmt::format("{:.1f} {}", v, units[u]);
}

// Throws an Error "<call> failed: <CUDA's description>" unless e is success.
// The error is read off the runtime, so a non-sticky one does not resurface
// at the next call.
template <class... Args>
void check(cudaError_t e, fmt::format_string<Args...> call, Args&&... args) {
  if (e == cudaSuccess) return;
  (void)cudaGetLastError();
  throw Error(fmt::format("{} failed: {}", fmt::format(call, std::forward<Args>(args)...), cudaGetErrorString(e)));
}

template <class... Args>
void check_cublas(cublasStatus_t s, fmt::format_string<Args...> call, Args&&... args) {
  if (s == CUBLAS_STATUS_SUCCESS) return;
  throw Error(fmt::format("{} failed: {} ({})", fmt::format(call, std::forward<Args>(args)...), cublasGetStatusName(s),
                          cublasGetStatusString(s)));
}

inline CudaSettings& settings() {
  static CudaSettings s;
  return s;
}

}  // namespace cuda_detail

// One per device, created on first use and never destroyed (device buffers
// may be released during static destruction): the stream everything runs on,
// the cuBLAS handle bound to it, the allocator's cache and the scratch of
// the reductions.
class CudaContext {
 public:
  // The context of the device current on this thread (looked up once per
  // thread and device: every primitive asks for it).
  static CudaContext& current() {
    int device = 0;
    cuda_detail::check(cudaGetDevice(&device), "cudaGetDevice");
    thread_local int cached_device = -1;
    thread_local CudaContext* cached = nullptr;
    if (cached && cached_device == device) return *cached;
    static std::mutex mutex;
    static std::map<int, CudaContext*> contexts;
    std::lock_guard<std::mutex> lock(mutex);
    CudaContext*& c = contexts[device];
    if (!c) c = new CudaContext(device);
    cached_device = device;
    cached = c;
    return *c;
  }

  CudaContext(const CudaContext&) = delete;
  CudaContext& operator=(const CudaContext&) = delete;

  int device() const { return device_; }
  cudaStream_t stream() const { return stream_; }
  cublasHandle_t cublas() const { return cublas_; }
  const cudaDeviceProp& properties() const { return props_; }

  // Device memory of at least `bytes` (uninitialised). On cudaMalloc running
  // out of memory the cache is released and the allocation tried once more.
  void* allocate(std::size_t bytes) {
    if (bytes == 0) return nullptr;
    const std::size_t size = detail::BlockCache::size_class(bytes);
    if (cuda_detail::settings().cache_allocations)
      if (void* p = cache_.take(size)) return p;
    void* p = nullptr;
    cudaError_t e = cudaMalloc(&p, size);
    if (e == cudaErrorMemoryAllocation) {
      (void)cudaGetLastError();
      empty_cache();
      e = cudaMalloc(&p, size);
    }
    cuda_detail::check(e, "cudaMalloc({})", cuda_detail::bytes_str(bytes));
    cache_.allocated(size);
    return p;
  }

  // Returns a block from allocate(). Work already queued on the stream may
  // still use it; a later allocation that reuses it is queued after that work
  // on the same stream, so reuse is safe without synchronising.
  void release(void* p, std::size_t bytes) noexcept {
    if (!p) return;
    const std::size_t size = detail::BlockCache::size_class(bytes);
    const bool keep = cuda_detail::settings().cache_allocations;
    if (!cache_.put(size, p, [&](std::size_t) { return keep; }))
      (void)cudaFree(p);  // synchronises with the device; errors here cannot be reported
  }

  // Bytes of live blocks on this device, and their high-water mark since reset_peak().
  std::size_t in_use() const { return cache_.in_use(); }
  std::size_t peak() const { return cache_.peak(); }
  void reset_peak() { cache_.reset_peak(); }

  // Frees every cached block.
  void empty_cache() {
    (void)cudaStreamSynchronize(stream_);  // cudaFree synchronises too; this makes the order explicit
    cache_.drain([](void* p, std::size_t) { (void)cudaFree(p); });
  }
  std::size_t cached_bytes() const { return cache_.cached_bytes(); }

  // Scratch of CudaBackend::sum: kMaxSumBlocks partial sums and the total on
  // the device, the total again in pinned host memory; sum_mutex() guards it.
  static constexpr int kMaxSumBlocks = 1024;
  acc_t* sum_scratch() const { return sum_scratch_; }
  acc_t* sum_host() const { return sum_host_; }
  std::mutex& sum_mutex() { return sum_mutex_; }

 private:
  explicit CudaContext(int device) : device_(device) {
    using cuda_detail::check;
    check(cudaGetDeviceProperties(&props_, device), "cudaGetDeviceProperties(device {})", device);
    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    cuda_detail::check_cublas(cublasCreate(&cublas_), "cublasCreate");
    cuda_detail::check_cublas(cublasSetStream(cublas_, stream_), "cublasSetStream");
    check(cudaMalloc(&sum_scratch_, (kMaxSumBlocks + 1) * sizeof(acc_t)), "cudaMalloc({})",
          cuda_detail::bytes_str((kMaxSumBlocks + 1) * sizeof(acc_t)));
    check(cudaMallocHost(&sum_host_, sizeof(acc_t)), "cudaMallocHost({} B)", sizeof(acc_t));
  }

  int device_;
  cudaDeviceProp props_{};
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  detail::CountingBlockCache cache_;  // blocks by size class (tensor/block_cache.hpp)
  acc_t* sum_scratch_ = nullptr;
  acc_t* sum_host_ = nullptr;
  std::mutex sum_mutex_;
};

// Device memory for DeviceBuffer (tensor/owned_buffer.hpp): the current
// device's CudaContext and its caching allocator; copies queue on its stream.
struct DeviceMemory {
  using Handle = CudaContext*;
  static constexpr const char* what = "cudaMalloc";
  static Handle acquire() { return &CudaContext::current(); }
  static void* allocate(Handle ctx, std::size_t bytes) { return ctx->allocate(bytes); }
  static void release(Handle ctx, void* p, std::size_t bytes) noexcept { ctx->release(p, bytes); }
  static void copy(Handle ctx, void* dst, const void* src, std::size_t bytes) {
    cuda_detail::check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, ctx->stream()),
                       "cudaMemcpyAsync(device to device, {})", cuda_detail::bytes_str(bytes));
  }
};

// Device storage of n elements: plain device memory (no managed memory), so
// the host never dereferences data().
template <class T>
using DeviceBuffer = detail::OwnedBuffer<T, DeviceMemory>;

namespace cuda_detail {

struct SumOp {
  __device__ static acc_t identity() { return 0.0; }
  __device__ acc_t operator()(acc_t a, acc_t b) const { return a + b; }
};
struct MaxOp {
  __device__ static acc_t identity() { return -INFINITY; }
  __device__ acc_t operator()(acc_t a, acc_t b) const { return fmax(a, b); }
};

// Reduces one value per thread over the block; the result is valid in
// thread 0. `warp_part` is shared memory for 32 values; the caller
// synchronises before reusing it.
template <class Op>
__device__ acc_t block_reduce(acc_t a, Op op, acc_t* warp_part) {
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = (blockDim.x + 31) / 32;
  for (int o = 16; o > 0; o /= 2) a = op(a, __shfl_down_sync(0xffffffffu, a, o));
  if (lane == 0) warp_part[warp] = a;
  __syncthreads();
  if (warp == 0) {
    a = lane < n_warps ? warp_part[lane] : Op::identity();
    for (int o = 16; o > 0; o /= 2) a = op(a, __shfl_down_sync(0xffffffffu, a, o));
  }
  return a;
}

template <class F>
__global__ void parallel_for_kernel(index_t n, F f) {
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) f(i);
}

template <class F>
__global__ void parallel_for_2d_kernel(index_t rows, index_t cols, F f) {
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t r = blockIdx.y; r < rows; r += gridDim.y)
    for (index_t j = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < cols; j += stride) f(r, j);
}

// One block per row (grid-stride over rows), the block's threads across it.
template <class F, class Op>
__global__ void row_reduce_kernel(index_t rows, index_t cols, F f, Op op, acc_t* out) {
  __shared__ acc_t warp_part[32];
  for (index_t r = blockIdx.x; r < rows; r += gridDim.x) {
    acc_t a = Op::identity();
    for (index_t j = threadIdx.x; j < cols; j += blockDim.x) a = op(a, static_cast<acc_t>(f(r, j)));
    a = block_reduce(a, op, warp_part);
    if (threadIdx.x == 0) out[r] = a;
    __syncthreads();
  }
}

// The fused row passes of CudaBackend::row_sum_apply / row_max_sum_apply:
// one block per row (grid-stride over rows), the block's threads across it;
// a block reduction (with its barrier) separates the passes.
template <class L, class F, class Fin, class G>
__global__ void row_sum_apply_kernel(index_t rows, index_t cols, L len, F f, Fin fin, G g) {
  __shared__ acc_t warp_part[32];
  __shared__ acc_t stat;
  for (index_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const index_t n = len(r);
    acc_t a = 0;
    for (index_t j = threadIdx.x; j < n; j += blockDim.x) a += static_cast<acc_t>(f(r, j));
    a = block_reduce(a, SumOp{}, warp_part);
    if (threadIdx.x == 0) stat = fin(r, a);
    __syncthreads();
    const acc_t s = stat;
    for (index_t j = threadIdx.x; j < cols; j += blockDim.x) g(r, j, s);
    __syncthreads();  // every thread has read stat before the next row's
  }
}
template <class L, class FM, class FS, class G>
__global__ void row_max_sum_apply_kernel(index_t rows, index_t cols, L len, FM fm, FS fs, G g) {
  __shared__ acc_t warp_part[32];
  __shared__ acc_t stat[2];
  for (index_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const index_t n = len(r);
    acc_t a = MaxOp::identity();
    for (index_t j = threadIdx.x; j < n; j += blockDim.x) a = fmax(a, static_cast<acc_t>(fm(r, j)));
    a = block_reduce(a, MaxOp{}, warp_part);
    if (threadIdx.x == 0) stat[0] = a;
    __syncthreads();
    const acc_t m = stat[0];
    a = 0;
    for (index_t j = threadIdx.x; j < n; j += blockDim.x) a += static_cast<acc_t>(fs(r, j, m));
    a = block_reduce(a, SumOp{}, warp_part);
    if (threadIdx.x == 0) stat[1] = a;
    __syncthreads();
    const acc_t s = stat[1];
    for (index_t j = threadIdx.x; j < cols; j += blockDim.x) g(r, j, m, s);
    __syncthreads();
  }
}

// Per-block partial sums of f over [0, n); then one block adds the partials.
template <class F>
__global__ void sum_kernel(index_t n, F f, acc_t* partial) {
  __shared__ acc_t warp_part[32];
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x;
  acc_t a = 0;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    a += static_cast<acc_t>(f(i));
  a = block_reduce(a, SumOp{}, warp_part);
  if (threadIdx.x == 0) partial[blockIdx.x] = a;
}
inline __global__ void sum_partials_kernel(int n, const acc_t* partial, acc_t* out) {
  __shared__ acc_t warp_part[32];
  acc_t a = 0;
  for (int i = static_cast<int>(threadIdx.x); i < n; i += static_cast<int>(blockDim.x)) a += partial[i];
  a = block_reduce(a, SumOp{}, warp_part);
  if (threadIdx.x == 0) *out = a;
}

}  // namespace cuda_detail

struct CudaBackend {
  static constexpr const char* name = "cuda";
  // Tensor data is device memory: no Tensor::operator[], use to_host().
  static constexpr bool host_memory = false;
  // Scratch an op may use to batch small products (see CpuBackend): 64 Mi
  // elements, so attention handles all rows of a microbatch per call.
  static constexpr index_t batch_scratch_elements = index_t(1) << 26;

  template <class T>
  using Storage = DeviceBuffer<T>;

  static CudaSettings& settings() { return cuda_detail::settings(); }
  static CudaContext& context() { return CudaContext::current(); }

  // Waits for all queued work; throws if any of it failed.
  static void synchronize() { cuda_detail::check(cudaStreamSynchronize(context().stream()), "cudaStreamSynchronize"); }
  // Frees the cached device blocks (cudaFree), e.g. before handing the GPU
  // to another library.
  static void empty_cache() { context().empty_cache(); }

  // Bytes of live tensor storage on the current device, and its high-water
  // mark since the last reset_peak_memory() (the automatic microbatch size).
  static std::size_t memory_in_use() { return context().in_use(); }
  static std::size_t peak_memory() { return context().peak(); }
  static void reset_peak_memory() { context().reset_peak(); }
  // What more tensors could take: the device's free memory (cudaMemGetInfo)
  // plus the allocator's cached blocks; the default budget is
  // default_memory_share of it (the rest: cuBLAS workspaces, fragmentation).
  static constexpr double default_memory_share = 0.8;
  static std::size_t memory_available() {
    CudaContext& ctx = context();
    std::size_t free = 0, total = 0;
    cuda_detail::check(cudaMemGetInfo(&free, &total), "cudaMemGetInfo");
    return free + ctx.cached_bytes();
  }

  // Zero-initialised storage of n elements.
  template <class T>
  static Storage<T> allocate(index_t n) {
    if (n < 0) fail<UsageError>("CudaBackend::allocate: negative size {}", n);
    Storage<T> s(static_cast<std::size_t>(n));
    if (n > 0)
      cuda_detail::check(cudaMemsetAsync(s.data(), 0, s.size() * sizeof(T), context().stream()), "cudaMemsetAsync({})",
                         cuda_detail::bytes_str(s.size() * sizeof(T)));
    return s;
  }

  // Storage of n elements that the caller overwrites completely before any
  // read (no memset queued).
  template <class T>
  static Storage<T> allocate_uninitialized(index_t n) {
    if (n < 0) fail<UsageError>("CudaBackend::allocate: negative size {}", n);
    Storage<T> s(static_cast<std::size_t>(n));
    if constexpr (kPoisonUninitialized && std::is_floating_point_v<T>)
      fill(s.data(), n, std::numeric_limits<T>::quiet_NaN());
    return s;
  }

  template <class T>
  static void fill(T* dst, index_t n, T value) {
    parallel_for(n, [=] EP_HOST_DEVICE(index_t i) { dst[i] = value; });
  }

  template <class T>
  static void copy(T* dst, const T* src, index_t n) {
    if (n <= 0) return;
    const std::size_t bytes = static_cast<std::size_t>(n) * sizeof(T);
    cuda_detail::check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, context().stream()),
                       "cudaMemcpyAsync(device to device, {})", cuda_detail::bytes_str(bytes));
    after_launch("copy");
  }

  // Host to device. From pageable memory cudaMemcpyAsync returns once the
  // source has been staged, so the caller may reuse it at once.
  template <class T>
  static void upload(T* dst, const T* host_src, index_t n) {
    if (n <= 0) return;
    const std::size_t bytes = static_cast<std::size_t>(n) * sizeof(T);
    cuda_detail::check(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, context().stream()),
                       "cudaMemcpyAsync(host to device, {})", cuda_detail::bytes_str(bytes));
    after_launch("upload");
  }
  // Device to host; waits for the copy (and everything queued before it).
  template <class T>
  static void download(T* host_dst, const T* src, index_t n) {
    if (n <= 0) return;
    const std::size_t bytes = static_cast<std::size_t>(n) * sizeof(T);
    cudaStream_t s = context().stream();
    cuda_detail::check(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, s),
                       "cudaMemcpyAsync(device to host, {})", cuda_detail::bytes_str(bytes));
    cuda_detail::check(cudaStreamSynchronize(s), "cudaStreamSynchronize after a {} device-to-host copy",
                       cuda_detail::bytes_str(bytes));
  }

  // f(i) for i in [0, n): a grid-stride kernel calling the host/device functor.
  // Small n gets smaller blocks (down to one warp), so that a loop over a few
  // thousand long rows, one thread each, spreads over every multiprocessor
  // instead of filling a handful of them.
  template <class F>
  static void parallel_for(index_t n, F&& f) {
    if (n <= 0) return;
    const index_t sms = context().properties().multiProcessorCount;
    const int block =
        static_cast<int>(std::min<index_t>(block_size(), std::max<index_t>(32, ((n + sms - 1) / sms + 31) / 32 * 32)));
    const auto grid = static_cast<unsigned>(std::min<index_t>((n + block - 1) / block, max_grid()));
    cuda_detail::parallel_for_kernel<<<grid, block, 0, context().stream()>>>(n, std::forward<F>(f));
    after_launch("parallel_for", grid, block);
  }

  // f(r, j) over [0, rows) x [0, cols): grid y over rows, x across a row.
  template <class F>
  static void parallel_for_2d(index_t rows, index_t cols, F&& f) {
    if (rows <= 0 || cols <= 0) return;
    const int block = block_size();
    const dim3 grid(static_cast<unsigned>(std::min<index_t>((cols + block - 1) / block, 1024)),
                    static_cast<unsigned>(std::min<index_t>(rows, 65535)));
    cuda_detail::parallel_for_2d_kernel<<<grid, block, 0, context().stream()>>>(rows, cols, std::forward<F>(f));
    after_launch("parallel_for_2d", grid.x * grid.y, block);
  }

  // Sum of f(i) over [0, n) in double: per-block partials, one block over
  // those, one 8-byte copy back (synchronising). Deterministic for a given n.
  template <class F>
  static acc_t sum(index_t n, F&& f) {
    if (n <= 0) return 0.0;
    CudaContext& ctx = context();
    std::lock_guard<std::mutex> lock(ctx.sum_mutex());
    const int block = block_size();
    const auto grid = static_cast<int>(std::min<index_t>((n + block - 1) / block, CudaContext::kMaxSumBlocks));
    acc_t* partial = ctx.sum_scratch();
    cuda_detail::sum_kernel<<<grid, block, 0, ctx.stream()>>>(n, std::forward<F>(f), partial);
    after_launch("sum", grid, block);
    cuda_detail::sum_partials_kernel<<<1, block, 0, ctx.stream()>>>(grid, partial, partial + grid);
    after_launch("sum (partials)", 1, block);
    download(ctx.sum_host(), partial + grid, 1);
    return *ctx.sum_host();
  }

  // out[r] = sum_j f(r, j) / max_j f(r, j) in double, one block per row.
  template <class F>
  static void row_sum(index_t rows, index_t cols, F&& f, acc_t* out) {
    row_reduce(rows, cols, std::forward<F>(f), cuda_detail::SumOp{}, out, "row_sum");
  }
  template <class F>
  static void row_max(index_t rows, index_t cols, F&& f, acc_t* out) {
    row_reduce(rows, cols, std::forward<F>(f), cuda_detail::MaxOp{}, out, "row_max");
  }

  // The fused row passes of CpuBackend (same contract): one block per row,
  // sized to the row (a quarter of its length in threads, 32 to block_size).
  template <class L, class F, class Fin, class G>
  static void row_sum_apply(index_t rows, index_t cols, L&& len, F&& f, Fin&& fin, G&& g) {
    if (rows <= 0) return;
    const int block = row_block(cols);
    const auto grid = static_cast<unsigned>(std::min<index_t>(rows, index_t(1) << 30));
    cuda_detail::row_sum_apply_kernel<<<grid, block, 0, context().stream()>>>(
        rows, cols, std::forward<L>(len), std::forward<F>(f), std::forward<Fin>(fin), std::forward<G>(g));
    after_launch("row_sum_apply", grid, block);
  }
  template <class L, class FM, class FS, class G>
  static void row_max_sum_apply(index_t rows, index_t cols, L&& len, FM&& fm, FS&& fs, G&& g) {
    if (rows <= 0) return;
    const int block = row_block(cols);
    const auto grid = static_cast<unsigned>(std::min<index_t>(rows, index_t(1) << 30));
    cuda_detail::row_max_sum_apply_kernel<<<grid, block, 0, context().stream()>>>(
        rows, cols, std::forward<L>(len), std::forward<FM>(fm), std::forward<FS>(fs), std::forward<G>(g));
    after_launch("row_max_sum_apply", grid, block);
  }

  // Row-major C[m,n] = alpha * op(A)[m,k] * op(B)[k,n] + beta * C through
  // cuBLAS (column-major), using C^T = op(B)^T op(A)^T: the row-major
  // operands are the column-major transposes, so swapping A and B is all it
  // takes. beta = 0 never reads C.
  template <class T>
  static void gemm(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, T alpha, const T* a, index_t lda,
                   const T* b, index_t ldb, T beta, T* c, index_t ldc) {
    gemm_strided(trans_a, trans_b, m, n, k, alpha, a, lda, 0, b, ldb, 0, beta, c, ldc, 0, 1);
  }

  // The products of a BatchGrid (tensor/batch_grid.hpp): one cuBLAS call.
  // A grid of one level is a strided batch (cublas<t>gemmStridedBatched);
  // otherwise a kernel writes the items' operand pointers into device
  // memory for cublas<t>gemmBatched.
  template <class T>
  static void gemm_batched(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, T alpha, const T* a,
                           index_t lda, const T* b, index_t ldb, T beta, T* c, index_t ldc, const BatchGrid& grid) {
    const index_t items = grid.count();
    if (m == 0 || n == 0 || items == 0) return;
    if (const int l = grid.single_level(); l >= 0 || k == 0) {
      if (l >= 0) {
        gemm_strided(trans_a, trans_b, m, n, k, alpha, a, lda, grid.sa[l], b, ldb, grid.sb[l], beta, c, ldc, grid.sc[l],
                     grid.n[l]);
        return;
      }
      for (index_t i = 0; i < items; ++i) {  // k = 0: C = beta C per item
        index_t oa, ob, oc;
        grid.offsets(i, oa, ob, oc);
        scale_matrix(m, n, beta, c + oc, ldc);
      }
      return;
    }
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "CudaBackend::gemm: float or double");
    const char* fn = std::is_same_v<T, float> ? "cublasSgemmBatched" : "cublasDgemmBatched";
    detail::check_blas_sizes(fn, m, n, k, lda, ldb, ldc, items);
    Storage<T*> ptrs = allocate_uninitialized<T*>(3 * items);  // A, B, C pointers of every item
    T** p = ptrs.data();
    T* ma = const_cast<T*>(a);
    T* mb = const_cast<T*>(b);
    parallel_for(items, [=] EP_HOST_DEVICE(index_t i) {
      index_t oa, ob, oc;
      grid.offsets(i, oa, ob, oc);
      p[i] = ma + oa;
      p[items + i] = mb + ob;
      p[2 * items + i] = c + oc;
    });
    cublasHandle_t h = set_math_mode<T>();
    const cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
    const int ia = static_cast<int>(lda), ib = static_cast<int>(ldb), ic = static_cast<int>(ldc);
    const int count = static_cast<int>(items);
    cublasStatus_t st;  // C^T = op(B)^T op(A)^T, as in gemm_strided
    if constexpr (std::is_same_v<T, float>) {
      st = cublasSgemmBatched(h, op_b, op_a, in, im, ik, &alpha, p + items, ib, p, ia, &beta, p + 2 * items, ic, count);
    } else {
      st = cublasDgemmBatched(h, op_b, op_a, in, im, ik, &alpha, p + items, ib, p, ia, &beta, p + 2 * items, ic, count);
    }
    cuda_detail::check_cublas(st, "{}(m={}, n={}, k={}, trans_a={}, trans_b={}, lda={}, ldb={}, ldc={}, batch={})", fn,
                              m, n, k, trans_a, trans_b, lda, ldb, ldc, items);
    after_launch(fn);
  }

  // C = beta C for a [m, n] block with leading dimension ldc (beta = 0 writes zeros).
  template <class T>
  static void scale_matrix(index_t m, index_t n, T beta, T* c, index_t ldc) {
    parallel_for_2d(m, n, [=] EP_HOST_DEVICE(index_t i, index_t j) {
      c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    });
  }

 private:
  static int block_size() {
    const int b = settings().block_size;
    if (b < 32 || b % 32 != 0) fail<UsageError>("CudaSettings::block_size = {} must be a positive multiple of 32", b);
    return b;
  }
  // `batch` products C_i = alpha op(A_i) op(B_i) + beta C_i, X_i = x + i * stride_x,
  // in one cuBLAS call (a plain gemm when batch = 1).
  template <class T>
  static void gemm_strided(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, T alpha, const T* a,
                           index_t lda, index_t stride_a, const T* b, index_t ldb, index_t stride_b, T beta, T* c,
                           index_t ldc, index_t stride_c, index_t batch) {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "CudaBackend::gemm: float or double");
    if (m == 0 || n == 0 || batch == 0) return;
    if (k == 0) {  // C = beta C (cuBLAS rejects the leading dimensions of empty operands)
      for (index_t i = 0; i < batch; ++i) scale_matrix(m, n, beta, c + i * stride_c, ldc);
      return;
    }
    const char* fn = std::is_same_v<T, float> ? (batch == 1 ? "cublasSgemm" : "cublasSgemmStridedBatched")
                                              : (batch == 1 ? "cublasDgemm" : "cublasDgemmStridedBatched");
    detail::check_blas_sizes(fn, m, n, k, lda, ldb, ldc, batch);
    cublasHandle_t h = set_math_mode<T>();
    const cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
    const int ia = static_cast<int>(lda), ib = static_cast<int>(ldb), ic = static_cast<int>(ldc);
    cublasStatus_t st;
    if constexpr (std::is_same_v<T, float>) {
      st = batch == 1 ? cublasSgemm(h, op_b, op_a, in, im, ik, &alpha, b, ib, a, ia, &beta, c, ic)
                      : cublasSgemmStridedBatched(h, op_b, op_a, in, im, ik, &alpha, b, ib, stride_b, a, ia, stride_a,
                                                  &beta, c, ic, stride_c, static_cast<int>(batch));
    } else {
      st = batch == 1 ? cublasDgemm(h, op_b, op_a, in, im, ik, &alpha, b, ib, a, ia, &beta, c, ic)
                      : cublasDgemmStridedBatched(h, op_b, op_a, in, im, ik, &alpha, b, ib, stride_b, a, ia, stride_a,
                                                  &beta, c, ic, stride_c, static_cast<int>(batch));
    }
    cuda_detail::check_cublas(st, "{}(m={}, n={}, k={}, trans_a={}, trans_b={}, lda={}, ldb={}, ldc={}, batch={})", fn,
                              m, n, k, trans_a, trans_b, lda, ldb, ldc, batch);
    after_launch(fn);
  }

  // The cuBLAS handle with the math mode of T's products (TF32 only for float, on request).
  template <class T>
  static cublasHandle_t set_math_mode() {
    cublasHandle_t h = context().cublas();
    const cublasMath_t math =
        std::is_same_v<T, float> && settings().allow_tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH;
    cuda_detail::check_cublas(cublasSetMathMode(h, math), "cublasSetMathMode");
    return h;
  }

  // Threads for a block that works across one row of `cols` entries: about
  // four entries each, at least a warp, at most block_size().
  static int row_block(index_t cols) {
    return static_cast<int>(std::clamp<index_t>((cols / 4 + 31) / 32 * 32, 32, block_size()));
  }
  // Grid-stride kernels need no more blocks than keep every multiprocessor busy.
  static index_t max_grid() { return static_cast<index_t>(context().properties().multiProcessorCount) * 32; }

  template <class F, class Op>
  static void row_reduce(index_t rows, index_t cols, F&& f, Op op, acc_t* out, const char* what) {
    if (rows <= 0) return;
    const int block = block_size();
    const auto grid = static_cast<unsigned>(std::min<index_t>(rows, index_t(1) << 20));
    cuda_detail::row_reduce_kernel<<<grid, block, 0, context().stream()>>>(rows, cols, std::forward<F>(f), op, out);
    after_launch(what, grid, block);
  }

  // Checks a launch (or an enqueued call); with sync_after_launch also waits
  // for it, so an error inside names it.
  static void after_launch(const char* what, index_t blocks = 0, int threads = 0) {
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) {
      if (threads > 0) cuda_detail::check(e, "CUDA kernel launch ({}, {} blocks x {} threads)", what, blocks, threads);
      cuda_detail::check(e, "CUDA {}", what);
    }
    if (settings().sync_after_launch)
      cuda_detail::check(cudaStreamSynchronize(context().stream()), "CUDA {} (synchronised after launch)", what);
  }
};

static_assert(TensorBackend<CudaBackend>, "CudaBackend must meet the backend contract (tensor/backend.hpp)");

}  // namespace entropy_probe
