// What both Google Benchmark programs (ops_bench, probe_bench) share: a
// console reporter that keeps each benchmark's median (or mean of single
// runs), the threading context printed in the run's header, and the main()
// that runs them and prints a ratio table. Their options are Google
// Benchmark's own flags (--benchmark_filter=/small, ...).
#pragma once

#include "bench_common.hpp"

#include <entropy_probe/tensor/cpu_backend.hpp>

#include <benchmark/benchmark.h>
#include <fmt/format.h>

#include <functional>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#if defined(ENTROPY_PROBE_USE_CBLAS)
#include <cblas.h>
#endif

namespace ep_bench {

struct Times {
  double wall = 0, cpu = 0;
  double paired = 0;  // the x_baseline counter (0: none)
};

// Console output as usual, plus per benchmark (by registered name) the
// median wall and CPU time in seconds (the mean when run without repetitions).
// CPU time is the main thread's: all of the work only with OPENBLAS_NUM_THREADS=1.
class MedianCollector : public benchmark::ConsoleReporter {
 public:
  std::map<std::string, Times> times;

  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& r : runs) {
      if (r.error_occurred) continue;
      const double unit = benchmark::GetTimeUnitMultiplier(r.time_unit);
      const auto c = r.counters.find("x_baseline");
      const Times t{r.GetAdjustedRealTime() / unit, r.GetAdjustedCPUTime() / unit,
                    c == r.counters.end() ? 0.0 : double(c->second)};
      const std::string& name = r.run_name.function_name;
      if (r.run_type == Run::RT_Aggregate && r.aggregate_name == "median") {
        times[name] = t;
        medians_.insert(name);
      } else if (r.run_type == Run::RT_Iteration && !medians_.count(name)) {
        auto& [sum, n] = singles_[name];
        sum.wall += t.wall;
        sum.cpu += t.cpu;
        sum.paired += t.paired;
        ++n;
        times[name] = Times{sum.wall / n, sum.cpu / n, sum.paired / n};
      }
    }
  }

 private:
  std::set<std::string> medians_;
  std::map<std::string, std::pair<Times, int>> singles_;
};

// The threading layers in play, printed in the run's header (docs/performance.md, Threading:
// OpenBLAS's pthread pool must not compete with an OpenMP pool).
inline void add_threading_context() {
#if defined(ENTROPY_PROBE_USE_CBLAS) && defined(OPENBLAS_VERSION)
  benchmark::AddCustomContext("blas",
                              fmt::format("{} ({} threads)", openblas_get_config(), openblas_get_num_threads()));
#else
  benchmark::AddCustomContext("blas", "none (Eigen's GEMM)");
#endif
#if defined(_OPENMP)
  benchmark::AddCustomContext("openmp", "ON: check OMP_WAIT_POLICY=PASSIVE (docs/performance.md, Threading)");
#else
  benchmark::AddCustomContext("openmp", "off");
#endif
  benchmark::AddCustomContext("cpu_backend_threads", fmt::format("{} (Eigen thread pool; ENTROPY_PROBE_NUM_THREADS)",
                                                                 entropy_probe::CpuBackend::num_threads()));
}

// Registers the benchmarks, runs the selected ones, prints the ratio table.
inline int run_main(int argc, char** argv, const std::function<void()>& register_all,
                    const std::function<void(const std::map<std::string, Times>&)>& print_ratios) {
  add_threading_context();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  register_all();
  MedianCollector reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  print_ratios(reporter.times);
  benchmark::Shutdown();
  return 0;
}

}  // namespace ep_bench
