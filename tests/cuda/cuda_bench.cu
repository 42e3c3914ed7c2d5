// CUDA benchmark of the probe (tests/cuda/gpu_check.sh runs it; not a ctest test).
//
//   1. Probe phases on a Qwen2-0.5B-shaped random model (24 layers, width 896,
//      14 heads, 2 KV heads, vocab 151936, intermediate 4864, tied lm_head,
//      LoRA r = 16 on all seven projections), float storage, by default
//      8 prompts x 8 responses x 512 tokens in microbatches of one prompt:
//      sum X, sum Y, the alpha trick (forward-mode JVP) and the full variance,
//      timed by OfflineEntropyProbe after a warm-up microbatch.
//   2. GEMM rate: every matrix product of one sum-X microbatch, timed in place
//      with CUDA events, against the same list of products (shapes,
//      transposes, leading dimensions, batch counts) replayed back to back
//      through cuBLAS alone.
//
// usage: cuda_bench [--small] [--prompts B] [--responses G] [--tokens T]
//                   [--prompt-len P] [--mb PROMPTS] [--layers L]
//                   [--precisions fp32,tf32] [--no-variance] [--json FILE]
// The model is built once; the phases and the GEMM rate are measured for
// each precision of the float products in turn (fp32, or TF32 tensor cores).
#include <entropy_probe/nn/qwen2.hpp>
#include <entropy_probe/probe/probe.hpp>
#include <entropy_probe/tensor/cuda_backend.hpp>

#include <cuda_runtime.h>
#include <cxxabi.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <tuple>
#include <typeinfo>
#include <vector>

using namespace entropy_probe;

namespace {

using cuda_detail::check;

// ---- a CudaBackend whose products can be timed in place ----------------------------------

struct GemmCall {
  bool ta, tb;
  index_t m, n, k, lda, ldb, ldc;
  BatchGrid grid;
  cudaEvent_t start, stop;
  double flops() const { return 2.0 * double(m) * double(n) * double(k) * double(grid.count()); }
};

struct GemmLog {
  bool on = false;
  std::vector<GemmCall> calls;
};
GemmLog& gemm_log() {
  static GemmLog log;
  return log;
}

// Events for the logs, created ahead and reused, so that timing a call costs
// the host two cudaEventRecord calls and nothing more.
struct EventPool {
  std::vector<cudaEvent_t> events;
  std::size_t next = 0;
  cudaEvent_t get() {
    if (next == events.size()) {
      cudaEvent_t e;
      check(cudaEventCreate(&e), "cudaEventCreate");
      events.push_back(e);
    }
    return events[next++];
  }
  void reserve(std::size_t n) {
    while (events.size() < n) {
      cudaEvent_t e;
      check(cudaEventCreate(&e), "cudaEventCreate");
      events.push_back(e);
    }
  }
};
EventPool& event_pool() {
  static EventPool pool;
  return pool;
}

// Every other primitive call while the log is on: what it was (the primitive
// and the op whose functor it ran) and its two events.
struct KernelCall {
  std::string what;
  cudaEvent_t start, stop;
};
std::vector<KernelCall>& kernel_log() {
  static std::vector<KernelCall> log;
  return log;
}

// "ns::function#k" from the closure type of a __host__ __device__ lambda:
// nvcc names it __nv_hdl_wrapper_t<..., __nv_dl_tag<..., &(R ns::function<...>(args)), k>, ...>.
std::string closure_site(const char* mangled) {
  int status = 0;
  char* d = abi::__cxa_demangle(mangled, nullptr, nullptr, &status);
  std::string full = status == 0 && d ? d : mangled;
  std::free(d);
  const std::size_t at = full.find("&(");
  if (at == std::string::npos) return full.substr(0, 60);
  std::string sig = full.substr(at + 2);
  // drop the return type (up to the first space outside <>), then the template arguments and parameters
  int depth = 0;
  std::size_t start = 0;
  for (std::size_t i = 0; i < sig.size(); ++i) {
    if (sig[i] == '<') ++depth;
    if (sig[i] == '>') --depth;
    if (sig[i] == ' ' && depth == 0) {
      start = i + 1;
      break;
    }
  }
  std::string name;
  depth = 0;
  std::size_t i = start;
  for (; i < sig.size(); ++i) {
    const char c = sig[i];
    if (c == '<')
      ++depth;
    else if (c == '>')
      --depth;
    else if (depth == 0 && c == '(')
      break;
    else if (depth == 0)
      name += c;
  }
  const std::string prefix = "entropy_probe::";
  if (name.rfind(prefix, 0) == 0) name = name.substr(prefix.size());
  // the lambda's ordinal in its function: the number after the signature
  const std::size_t comma = full.find(", ", at + 2 + i);
  if (comma != std::string::npos) {
    std::size_t e = comma + 2;
    std::string k;
    while (e < full.size() && std::isdigit(static_cast<unsigned char>(full[e]))) k += full[e++];
    if (!k.empty()) name += "#" + k;
  }
  return name;
}

// Brackets one call with two events while the kernel log is on.
struct Timed {
  bool on;
  KernelCall call;
  Timed(bool enabled, std::string what) : on(enabled && gemm_log().on) {
    if (!on) return;
    call.what = std::move(what);
    call.start = event_pool().get();
    call.stop = event_pool().get();
    check(cudaEventRecord(call.start, CudaBackend::context().stream()), "cudaEventRecord");
  }
  ~Timed() {
    if (!on) return;
    (void)cudaEventRecord(call.stop, CudaBackend::context().stream());
    kernel_log().push_back(call);
  }
};
template <class F>
std::string site(const char* primitive) {
  if (!gemm_log().on) return {};
  static const std::string name = std::string(primitive) + " " + closure_site(typeid(std::decay_t<F>).name());
  return name;
}

// Same primitives as CudaBackend; while gemm_log().on, each product and each
// other primitive call is bracketed by two events on the backend's stream.
struct TimedCudaBackend : CudaBackend {
  template <class F>
  static void parallel_for(index_t n, F&& f) {
    Timed t(true, site<F>("parallel_for"));
    CudaBackend::parallel_for(n, std::forward<F>(f));
  }
  template <class F>
  static void parallel_for_2d(index_t rows, index_t cols, F&& f) {
    Timed t(true, site<F>("parallel_for_2d"));
    CudaBackend::parallel_for_2d(rows, cols, std::forward<F>(f));
  }
  template <class F>
  static void row_sum(index_t rows, index_t cols, F&& f, acc_t* out) {
    Timed t(true, site<F>("row_sum"));
    CudaBackend::row_sum(rows, cols, std::forward<F>(f), out);
  }
  template <class F>
  static void row_max(index_t rows, index_t cols, F&& f, acc_t* out) {
    Timed t(true, site<F>("row_max"));
    CudaBackend::row_max(rows, cols, std::forward<F>(f), out);
  }
  template <class L, class F, class Fin, class G>
  static void row_sum_apply(index_t rows, index_t cols, L&& len, F&& f, Fin&& fin, G&& g) {
    Timed t(true, site<G>("row_sum_apply"));
    CudaBackend::row_sum_apply(rows, cols, std::forward<L>(len), std::forward<F>(f), std::forward<Fin>(fin),
                               std::forward<G>(g));
  }
  template <class L, class FM, class FS, class G>
  static void row_max_sum_apply(index_t rows, index_t cols, L&& len, FM&& fm, FS&& fs, G&& g) {
    Timed t(true, site<G>("row_max_sum_apply"));
    CudaBackend::row_max_sum_apply(rows, cols, std::forward<L>(len), std::forward<FM>(fm), std::forward<FS>(fs),
                                   std::forward<G>(g));
  }
  template <class F>
  static acc_t sum(index_t n, F&& f) {
    Timed t(true, site<F>("sum (with its copy back)"));
    return CudaBackend::sum(n, std::forward<F>(f));
  }
  template <class T>
  static Storage<T> allocate(index_t n) {
    Timed t(true, "allocate (zero fill)");
    return CudaBackend::allocate<T>(n);
  }
  template <class T>
  static void copy(T* dst, const T* src, index_t n) {
    Timed t(true, "copy (device to device)");
    CudaBackend::copy(dst, src, n);
  }
  template <class T>
  static void upload(T* dst, const T* src, index_t n) {
    Timed t(true, "upload");
    CudaBackend::upload(dst, src, n);
  }
  template <class T>
  static void download(T* dst, const T* src, index_t n) {
    Timed t(true, "download");
    CudaBackend::download(dst, src, n);
  }

  template <class T>
  static void gemm(bool ta, bool tb, index_t m, index_t n, index_t k, T alpha, const T* a, index_t lda, const T* b,
                   index_t ldb, T beta, T* c, index_t ldc) {
    gemm_batched(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, BatchGrid{});
  }
  template <class T>
  static void gemm_batched(bool ta, bool tb, index_t m, index_t n, index_t k, T alpha, const T* a, index_t lda,
                           const T* b, index_t ldb, T beta, T* c, index_t ldc, const BatchGrid& grid) {
    GemmLog& log = gemm_log();
    if (!log.on || m == 0 || n == 0 || k == 0 || grid.count() == 0) {
      CudaBackend::gemm_batched(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, grid);
      return;
    }
    GemmCall call{ta, tb, m, n, k, lda, ldb, ldc, grid, event_pool().get(), event_pool().get()};
    cudaStream_t s = context().stream();
    check(cudaEventRecord(call.start, s), "cudaEventRecord");
    CudaBackend::gemm_batched(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, grid);
    check(cudaEventRecord(call.stop, s), "cudaEventRecord");
    log.calls.push_back(call);
  }
};

using Backend = TimedCudaBackend;
using Model = nn::Qwen2ForCausalLM<float, Backend>;

struct Options {
  index_t prompts = 8, responses = 8, tokens = 512, prompt_len = 64, mb = 1, layers = 24;
  index_t hidden = 896, heads = 14, kv_heads = 2, intermediate = 4864, vocab = 151936, rank = 16;
  std::vector<std::string> precisions = {"fp32"};
  bool variance = true;
  std::string json;
};

Options parse(int argc, char** argv) {
  Options o;
  auto num = [&](int& i) {
    if (i + 1 >= argc) fail<UsageError>("cuda_bench: {} needs a value", argv[i]);
    return static_cast<index_t>(std::stoll(argv[++i]));
  };
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--small") {
      o.layers = 4, o.hidden = 256, o.heads = 4, o.kv_heads = 2, o.intermediate = 1024, o.vocab = 8192;
      o.prompts = 4, o.responses = 4, o.tokens = 128, o.prompt_len = 16, o.mb = 2;
    } else if (a == "--prompts") {
      o.prompts = num(i);
    } else if (a == "--responses") {
      o.responses = num(i);
    } else if (a == "--tokens") {
      o.tokens = num(i);
    } else if (a == "--prompt-len") {
      o.prompt_len = num(i);
    } else if (a == "--mb") {
      o.mb = num(i);
    } else if (a == "--layers") {
      o.layers = num(i);
    } else if (a == "--precisions" && i + 1 < argc) {
      o.precisions.clear();
      std::string list = argv[++i];
      for (std::size_t at = 0; at <= list.size();) {
        const std::size_t end = std::min(list.find(',', at), list.size());
        if (end > at) o.precisions.push_back(list.substr(at, end - at));
        at = end + 1;
      }
      for (const auto& p : o.precisions)
        if (p != "fp32" && p != "tf32") fail<UsageError>("cuda_bench: precision '{}' is not fp32 or tf32", p);
    } else if (a == "--no-variance") {
      o.variance = false;
    } else if (a == "--json" && i + 1 < argc) {
      o.json = argv[++i];
    } else {
      fail<UsageError>("cuda_bench: unknown argument '{}' (see the comment at the top of tests/cuda/cuda_bench.cu)", a);
    }
  }
  if (o.prompt_len < 1 || o.prompt_len >= o.tokens) fail<UsageError>("cuda_bench: --prompt-len must be in [1, T)");
  return o;
}

// Prompt of P tokens shared by a group, response b*G+g of length
// (T-P) - ((b*G+g)*37 mod ((T-P)/4 + 1)), right padding: the same lengths as
// compare_torch_cuda.py uses.
TokenBatch make_batch(const Options& o, index_t n_prompts, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> tok(0, int(o.vocab) - 1);
  std::normal_distribution<double> nd(0, 1);
  TokenBatch b;
  b.B = n_prompts;
  b.G = o.responses;
  b.T = o.tokens;
  b.sequences.assign(static_cast<std::size_t>(b.B * b.G * b.T), 0);
  b.attention_mask.assign(b.sequences.size(), 0);
  const index_t room = o.tokens - o.prompt_len;
  for (index_t p = 0; p < b.B; ++p) {
    b.prompt_lens.push_back(static_cast<std::int32_t>(o.prompt_len));
    std::vector<std::int32_t> prompt(static_cast<std::size_t>(o.prompt_len));
    for (auto& t : prompt) t = tok(rng);
    for (index_t g = 0; g < b.G; ++g) {
      const index_t len = room - ((p * b.G + g) * 37 % (room / 4 + 1));
      for (index_t t = 0; t < o.prompt_len + len; ++t) {
        const auto i = static_cast<std::size_t>(b.at(p, g, t));
        b.sequences[i] = t < o.prompt_len ? prompt[static_cast<std::size_t>(t)] : tok(rng);
        b.attention_mask[i] = 1;
      }
      b.advantages.push_back(nd(rng));
    }
  }
  return b;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::string shape_key(const GemmCall& c) {
  const index_t batch = c.grid.count();
  return fmt::format("{}{} m={} n={} k={}{}{}", c.ta ? 'T' : 'N', c.tb ? 'T' : 'N', c.m, c.n, c.k,
                     batch > 1 ? fmt::format(" x{}", batch) : "", c.grid.single_level() < 0 ? " (grid)" : "");
}

struct GemmStats {
  double probe_seconds = 0, replay_seconds = 0, flops = 0;
  index_t calls = 0;
};

// Times the recorded products, then replays them through cuBLAS alone on
// scratch operands of the same extents and reports both rates.
GemmStats gemm_rates(std::vector<GemmCall>& calls) {
  GemmStats st;
  st.calls = static_cast<index_t>(calls.size());
  std::map<std::string, std::tuple<int, double, double>> by_shape;  // count, seconds, flops
  index_t ea = 0, eb = 0, ec = 0;
  for (GemmCall& c : calls) {
    check(cudaEventSynchronize(c.stop), "cudaEventSynchronize");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, c.start, c.stop), "cudaEventElapsedTime");
    st.probe_seconds += ms * 1e-3;
    st.flops += c.flops();
    auto& [count, sec, fl] = by_shape[shape_key(c)];
    ++count, sec += ms * 1e-3, fl += c.flops();
    index_t oa, ob, oc;  // the last item lies furthest out (strides are non-negative)
    c.grid.offsets(c.grid.count() - 1, oa, ob, oc);
    ea = std::max(ea, oa + (c.ta ? c.k : c.m) * c.lda);
    eb = std::max(eb, ob + (c.tb ? c.n : c.k) * c.ldb);
    ec = std::max(ec, oc + c.m * c.ldc);
  }
  std::vector<std::pair<std::string, std::tuple<int, double, double>>> rows(by_shape.begin(), by_shape.end());
  std::sort(rows.begin(), rows.end(),
            [](const auto& x, const auto& y) { return std::get<1>(x.second) > std::get<1>(y.second); });
  fmt::print("  products of one sum-X microbatch by time (in place, event-timed):\n");
  for (std::size_t i = 0; i < std::min<std::size_t>(rows.size(), 12); ++i) {
    const auto& [key, v] = rows[i];
    fmt::print("    {:<34} {:>5} calls {:>9.3f} ms {:>8.1f} TFLOP/s\n", key, std::get<0>(v), std::get<1>(v) * 1e3,
               std::get<2>(v) / std::get<1>(v) * 1e-12);
  }
  Tensor<float, CudaBackend> A({ea}), B({eb}), C({ec});
  cudaEvent_t t0, t1;
  check(cudaEventCreate(&t0), "cudaEventCreate");
  check(cudaEventCreate(&t1), "cudaEventCreate");
  cudaStream_t s = CudaBackend::context().stream();
  double best = 1e30;
  for (int rep = 0; rep < 3; ++rep) {
    check(cudaEventRecord(t0, s), "cudaEventRecord");
    for (const GemmCall& c : calls)
      CudaBackend::gemm_batched(c.ta, c.tb, c.m, c.n, c.k, 1.0f, A.data(), c.lda, B.data(), c.ldb, 0.0f, C.data(),
                                c.ldc, c.grid);
    check(cudaEventRecord(t1, s), "cudaEventRecord");
    check(cudaEventSynchronize(t1), "cudaEventSynchronize");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, t0, t1), "cudaEventElapsedTime");
    if (rep > 0) best = std::min(best, ms * 1e-3);
  }
  st.replay_seconds = best;
  (void)cudaEventDestroy(t0);
  (void)cudaEventDestroy(t1);
  return st;
}

// Device time of the logged non-product calls by call site, and what is left
// of the wall time once every logged call (products too) is subtracted: the
// GPU idle, waiting for the host.
double kernel_breakdown(const char* what, double wall_s, double gemm_s) {
  std::map<std::string, std::pair<int, double>> by_site;
  double total = 0;
  for (KernelCall& c : kernel_log()) {
    check(cudaEventSynchronize(c.stop), "cudaEventSynchronize");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, c.start, c.stop), "cudaEventElapsedTime");
    auto& [count, sec] = by_site[c.what];
    ++count, sec += ms * 1e-3;
    total += ms * 1e-3;
  }
  kernel_log().clear();
  std::vector<std::pair<std::string, std::pair<int, double>>> rows(by_site.begin(), by_site.end());
  std::sort(rows.begin(), rows.end(), [](const auto& x, const auto& y) { return x.second.second > y.second.second; });
  fmt::print("  {}: wall {:.1f} ms = products {:.1f} ms + other device calls {:.1f} ms + idle {:.1f} ms\n", what,
             wall_s * 1e3, gemm_s * 1e3, total * 1e3, (wall_s - gemm_s - total) * 1e3);
  for (std::size_t i = 0; i < std::min<std::size_t>(rows.size(), 14); ++i)
    fmt::print("    {:<58} {:>5} calls {:>9.3f} ms\n", rows[i].first, rows[i].second.first,
               rows[i].second.second * 1e3);
  return total;
}

}  // namespace

int main(int argc, char** argv) try {
  const Options o = parse(argc, argv);
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, dev), "cudaGetDeviceProperties");
  fmt::print("cuda_bench on {} ({} SMs, {:.0f} GiB), float storage\n", prop.name, prop.multiProcessorCount,
             double(prop.totalGlobalMem) / double(1 << 30));

  nn::Qwen2Config cfg;
  cfg.num_hidden_layers = o.layers;
  cfg.hidden_size = o.hidden;
  cfg.num_attention_heads = o.heads;
  cfg.num_key_value_heads = o.kv_heads;
  cfg.intermediate_size = o.intermediate;
  cfg.vocab_size = o.vocab;
  nn::LoraConfig lora;
  lora.r = o.rank;
  lora.lora_alpha = 2.0 * double(o.rank);
  lora.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  lora.init_lora_b_zero = false;
  fmt::print(
      "model: {} layers, width {}, {} heads / {} KV heads, intermediate {}, vocab {}, LoRA r {} on all "
      "projections\nbatch: {} prompts x {} responses x {} tokens (prompt {}), microbatches of {} prompt(s)\n",
      o.layers, o.hidden, o.heads, o.kv_heads, o.intermediate, o.vocab, o.rank, o.prompts, o.responses, o.tokens,
      o.prompt_len, o.mb);

  auto t0 = std::chrono::steady_clock::now();
  Model model(cfg, lora, 7);
  Backend::synchronize();
  const double init_s = seconds_since(t0);

  ProbeConfig pc;
  pc.mb_size = o.mb;
  pc.variance = o.variance ? VarianceMode::full : VarianceMode::none;
  OfflineEntropyProbe probe(model, pc);
  const auto& reg = probe.registry();
  AdamHyper hyper;
  hyper.lr = 1e-5;
  AdamState<float, Backend> state(reg.info(), hyper);
  for (const auto& e : reg.entries())
    state.set(e.id, AdamParamState<float, Backend>{Tensor<float, Backend>(e.param->value.shape()),
                                                   Tensor<float, Backend>::full(e.param->value.shape(), 1e-6f), 10});
  fmt::print("model built in {:.1f} s (host random init): {} trainable tensors, {} trainable parameters\n", init_s,
             reg.size(), reg.numel());

  const TokenBatch E = make_batch(o, o.prompts, 1), U = make_batch(o, o.prompts, 2);
  const TokenBatch W = make_batch(o, std::min(o.mb, o.prompts), 3);  // one microbatch

  nlohmann::json out;
  out["device"] = prop.name;
  out["config"] = {{"layers", o.layers},     {"hidden", o.hidden},         {"heads", o.heads},
                   {"kv_heads", o.kv_heads}, {"vocab", o.vocab},           {"intermediate", o.intermediate},
                   {"rank", o.rank},         {"prompts", o.prompts},       {"responses", o.responses},
                   {"tokens", o.tokens},     {"prompt_len", o.prompt_len}, {"mb", o.mb}};
  out["init_seconds"] = init_s;
  for (const std::string& precision : o.precisions) {
    CudaBackend::settings().allow_tf32 = precision == "tf32";
    fmt::print("\n==== {} products ====\n", precision);
    // Warm-up on one microbatch of the same shape (cuBLAS heuristics, the allocator's cache).
    t0 = std::chrono::steady_clock::now();
    (void)probe.run(W, W, state);
    Backend::synchronize();
    const double warm_s = seconds_since(t0);

    t0 = std::chrono::steady_clock::now();
    const ProbeResult r = probe.run(E, U, state);
    Backend::synchronize();
    const double wall_s = seconds_since(t0);
    std::size_t free_b = 0, total_b = 0;
    check(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
    fmt::print("warm-up (one microbatch, every phase) {:.2f} s\n", warm_s);
    fmt::print("bars_dot {:.6e}  SE_conditional {:.6e}  SE_deltaH1 {:.6e}\n", r.bars_dot,
               r.conditional ? r.conditional->se_conditional : 0.0, r.full ? r.full->se_deltaH1 : 0.0);
    fmt::print("phase times (s):\n");
    for (const char* k : {"sum_X", "sum_Y", "conditional_variance", "full_variance", "total"})
      if (r.timing.count(k)) fmt::print("  {:<22} {:8.3f}\n", k, r.timing.at(k));
    fmt::print("  {:<22} {:8.3f}  (to the last device operation)\n", "wall", wall_s);
    fmt::print("device memory in use after the run, allocator cache included: {:.1f} GiB of {:.1f}\n",
               double(total_b - free_b) / double(1 << 30), double(total_b) / double(1 << 30));

    // GEMM rate: one sum-X microbatch with every product timed, then the same
    // products through cuBLAS alone.
    event_pool().reserve(40000);
    event_pool().next = 0;
    kernel_log().clear();
    gemm_log().calls.clear();
    gemm_log().on = true;
    t0 = std::chrono::steady_clock::now();
    (void)probe.components().accumulate_sum_X(W);
    Backend::synchronize();
    const double mb_s = seconds_since(t0);
    gemm_log().on = false;
    const GemmStats g = gemm_rates(gemm_log().calls);
    const double probe_rate = g.flops / g.probe_seconds, cublas_rate = g.flops / g.replay_seconds;
    fmt::print("GEMM, one sum-X microbatch: {} products, {:.2f} TFLOP\n", g.calls, g.flops * 1e-12);
    fmt::print("  in the probe     {:8.3f} ms  {:7.1f} TFLOP/s  ({:.0f}% of the microbatch's {:.3f} s)\n",
               g.probe_seconds * 1e3, probe_rate * 1e-12, 100.0 * g.probe_seconds / mb_s, mb_s);
    fmt::print("  cuBLAS alone     {:8.3f} ms  {:7.1f} TFLOP/s\n", g.replay_seconds * 1e3, cublas_rate * 1e-12);
    fmt::print("  probe / cuBLAS rate: {:.3f}\n", probe_rate / cublas_rate);
    fmt::print("where the time of one microbatch goes (event-timed, {} products):\n", precision);
    const double other_x = kernel_breakdown("sum X microbatch", mb_s, g.probe_seconds);

    // The same for one alpha-trick microbatch (forward + JVP along a LoRA-view tangent).
    const auto tangent = probe.components().zeros_like_params();
    event_pool().next = 0;
    gemm_log().calls.clear();
    gemm_log().on = true;
    t0 = std::chrono::steady_clock::now();
    (void)probe.components().per_prompt_directional(
        W, tangent,
        [](const TokenBatch& mb, std::span<const double> S) { return x_loss_weights(mb, S, Weighting::dr_grpo); },
        "profile");
    Backend::synchronize();
    const double alpha_mb_s = seconds_since(t0);
    gemm_log().on = false;
    double alpha_gemm_s = 0;
    for (GemmCall& c : gemm_log().calls) {
      check(cudaEventSynchronize(c.stop), "cudaEventSynchronize");
      float ms = 0;
      check(cudaEventElapsedTime(&ms, c.start, c.stop), "cudaEventElapsedTime");
      alpha_gemm_s += ms * 1e-3;
    }
    gemm_log().calls.clear();
    const double other_a = kernel_breakdown("alpha-trick microbatch", alpha_mb_s, alpha_gemm_s);

    nlohmann::json run;
    run["precision"] = precision;
    for (const auto& [k, v] : r.timing) run["phases"][k] = v;
    run["phases"]["wall"] = wall_s;
    run["gemm"] = {{"calls", g.calls},
                   {"tflop", g.flops * 1e-12},
                   {"probe_tflops", probe_rate * 1e-12},
                   {"cublas_tflops", cublas_rate * 1e-12},
                   {"ratio", probe_rate / cublas_rate},
                   {"fraction_of_microbatch", g.probe_seconds / mb_s}};
    run["profile"] = {{"sum_X_microbatch_s", mb_s},       {"sum_X_products_s", g.probe_seconds},
                      {"sum_X_other_device_s", other_x},  {"alpha_microbatch_s", alpha_mb_s},
                      {"alpha_products_s", alpha_gemm_s}, {"alpha_other_device_s", other_a}};
    run["memory_gib"] = double(total_b - free_b) / double(1 << 30);
    out["runs"].push_back(run);
    if (!o.json.empty()) std::ofstream(o.json) << out.dump(2) << '\n';  // after each run: a crash keeps the rest
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "cuda_bench: %s\n", e.what());
  return 1;
}
