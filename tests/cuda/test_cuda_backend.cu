// CudaBackend's primitives against CpuBackend (gemm, sums, row reductions,
// storage), the buffers and the optimizer math, and its error paths: an
// allocation the device cannot hold, an invalid kernel launch and an invalid
// cuBLAS call each give an entropy_probe::Error that names the call, and the
// device keeps working afterwards.
#include "backend_parity.hpp"

#include <entropy_probe/tensor/cuda_backend.hpp>

using Catch::Matchers::Contains;
using entropy_probe::CudaBackend;
using entropy_probe::Error;
using entropy_probe::index_t;
using entropy_probe::Tensor;

EP_PARITY_PRIMITIVE_TESTS(entropy_probe::CudaBackend, "cuda: ")

namespace {
// Restores the backend's settings when a test changed them.
struct SettingsGuard {
  entropy_probe::CudaSettings saved = CudaBackend::settings();
  ~SettingsGuard() { CudaBackend::settings() = saved; }
};
}  // namespace

TEST_CASE("cuda: an allocation larger than the device is a clear error", "[cuda][errors]") {
  // 2^48 floats = 1 PiB
  CHECK_THROWS_WITH((Tensor<float, CudaBackend>({index_t(1) << 48})),
                    Contains("cudaMalloc(1.0 PiB) failed") && Contains("out of memory"));
  CHECK_THROWS_AS((Tensor<float, CudaBackend>({index_t(1) << 24, index_t(1) << 24})), Error);
  // the device still works, with and without the allocation cache
  Tensor<float, CudaBackend> ok({1000});
  CHECK(ok.to_host() == std::vector<float>(1000, 0.0f));
  SettingsGuard guard;
  CudaBackend::settings().cache_allocations = false;
  CudaBackend::empty_cache();
  const auto two = Tensor<double, CudaBackend>::full({7}, 2.0);
  CHECK(two.to_host() == std::vector<double>(7, 2.0));
}

TEST_CASE("cuda: an invalid kernel launch is a clear error", "[cuda][errors]") {
  const index_t n = index_t(1) << 22;  // enough elements for full-size blocks
  Tensor<float, CudaBackend> t({n});
  {
    SettingsGuard guard;
    CudaBackend::settings().block_size = 4096;  // more threads per block than any GPU allows
    // CUDA 13 says "invalid argument" here (older versions "invalid configuration argument")
    CHECK_THROWS_WITH(CudaBackend::fill(t.data(), t.numel(), 1.0f),
                      Contains("CUDA kernel launch (parallel_for") && Contains("x 4096 threads) failed: invalid"));
    CHECK_THROWS_WITH(CudaBackend::sum(t.numel(), [] EP_HOST_DEVICE(index_t) { return 1.0; }),
                      Contains("CUDA kernel launch (sum"));
    CudaBackend::settings().block_size = 100;
    CHECK_THROWS_WITH(CudaBackend::fill(t.data(), t.numel(), 1.0f), Contains("multiple of 32"));
  }
  // the error was not sticky: the next launch works
  CudaBackend::fill(t.data(), t.numel(), 3.0f);
  CHECK(t.to_host() == std::vector<float>(static_cast<std::size_t>(n), 3.0f));
  SettingsGuard guard;
  CudaBackend::settings().sync_after_launch = true;
  const float* p = t.data();
  CHECK(CudaBackend::sum(t.numel(), [=] EP_HOST_DEVICE(index_t i) { return p[i]; }) == 3.0 * double(n));
}

TEST_CASE("cuda: an invalid cuBLAS call is a clear error", "[cuda][errors]") {
  Tensor<float, CudaBackend> a({4, 4}), b({4, 4}), c({4, 4});
  // ldc = 2 is smaller than the 4 columns of C
  CHECK_THROWS_WITH(CudaBackend::gemm(false, false, 4, 4, 4, 1.0f, a.data(), 4, b.data(), 4, 0.0f, c.data(), 2),
                    Contains("cublasSgemm(m=4, n=4, k=4") && Contains("CUBLAS_STATUS_INVALID_VALUE"));
  CudaBackend::gemm(false, false, 4, 4, 4, 1.0f, a.data(), 4, b.data(), 4, 0.0f, c.data(), 4);
  CHECK(c.to_host() == std::vector<float>(16, 0.0f));
}

TEST_CASE("cuda: TF32 products are an opt-in and stay close to fp32", "[cuda][tf32]") {
  std::mt19937_64 rng(3);
  const index_t n = 256;
  const auto a = ep_parity::random_host({n, n}, rng), b = ep_parity::random_host({n, n}, rng);
  auto ac = ep_parity::on_backend<float, entropy_probe::CpuBackend>(a);
  auto bc = ep_parity::on_backend<float, entropy_probe::CpuBackend>(b);
  Tensor<float> cc({n, n});
  entropy_probe::CpuBackend::gemm(false, true, n, n, n, 1.0f, ac.data(), n, bc.data(), n, 0.0f, cc.data(), n);
  auto ad = ep_parity::on_backend<float, CudaBackend>(a), bd = ep_parity::on_backend<float, CudaBackend>(b);
  Tensor<float, CudaBackend> cd({n, n});
  CHECK_FALSE(CudaBackend::settings().allow_tf32);
  SettingsGuard guard;
  CudaBackend::settings().allow_tf32 = true;
  CudaBackend::gemm(false, true, n, n, n, 1.0f, ad.data(), n, bd.data(), n, 0.0f, cd.data(), n);
  const double e = ep_parity::rel_err(ep_parity::host_doubles(cd), ep_parity::host_doubles(cc));
  INFO("TF32 relative error " << e);
  CHECK(e < 1e-2);
}
