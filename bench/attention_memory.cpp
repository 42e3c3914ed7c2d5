// Peak memory and time of causal_attention (saves P [R, Hq, T, T]) and
// flash_causal_attention (saves the output and [R, Hq, T] log-sum-exp) on one
// forward + VJP, then one JVP, in float on the CPU backend; see
// docs/performance.md.
//
//   attention_memory [--heads HQ] [--kv-heads HKV] [--rows R] [--head-dim DH] [--tok T]...
//
// Each (op, T) case runs in a fresh process (this program re-executed), so
// its peak RSS (VmHWM) is its own: `peak` is the process's high-water mark,
// `op peak` that minus the mark reached once the inputs and the cotangent
// existed. Defaults: R 2, Hq 14, Hkv 2 (Qwen2.5-0.5B's heads), Dh 64,
// T 512 1024 2048. Times are the best of 3 after a warm-up.
#include "bench_common.hpp"

#include <entropy_probe/tape/ops/attention.hpp>
#include <entropy_probe/tape/ops/flash_attention.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

using namespace entropy_probe;

namespace {

// The process's peak resident set so far, in MiB (VmHWM of /proc/self/status).
double peak_rss_mib() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::strtod(line.c_str() + 6, nullptr) / 1024.0;
  return -1;
}

using ep_bench::random_tensor;

struct Config {
  index_t rows = 2, hq = 14, hkv = 2, dh = 64;
  std::vector<index_t> toks = {512, 1024, 2048};
  std::string child_op;  // run this one case in this process
};

const ep_cli::CommandSpec kSpec{
    .description =
        "Peak memory and time of causal_attention against flash_causal_attention (forward + VJP, then\n"
        "JVP, float), each (op, T) case in a fresh process.",
    .options = {{"--heads", "HQ", "query heads (default 14)"},
                {"--kv-heads", "HKV", "key/value heads, dividing HQ (default 2)"},
                {"--rows", "R", "rows of the batch (default 2)"},
                {"--head-dim", "DH", "head dimension (default 64)"},
                {"--tok", "T", "a sequence length; may be repeated (default 512, 1024 and 2048)", true},
                {"--child", "OP", "causal or flash: run the one case (one --tok) in this process"}},
    .help_column = 15,
    .program = "attention_memory"};

Config read_config(const ep_cli::ParsedArgs& a) {
  Config c;
  c.hq = ep_bench::count_option(a, "--heads", c.hq);
  c.hkv = ep_bench::count_option(a, "--kv-heads", c.hkv);
  if (c.hq % c.hkv != 0) throw a.failure(fmt::format("--kv-heads {} does not divide --heads {}", c.hkv, c.hq));
  c.rows = ep_bench::count_option(a, "--rows", c.rows);
  c.dh = ep_bench::count_option(a, "--head-dim", c.dh);
  if (a.lists.count("--tok")) {
    c.toks.clear();
    for (std::uint64_t t : a.integers("--tok", std::uint64_t{1} << 31)) {
      if (t < 1) throw a.failure("--tok must be at least 1, got 0");
      c.toks.push_back(index_t(t));
    }
  }
  c.child_op = a.choice<std::string>("--child", {{"causal", "causal"}, {"flash", "flash"}}).value_or("");
  if (!c.child_op.empty() && c.toks.size() != 1) throw a.failure("--child runs one case: give one --tok");
  return c;
}

// One case, in this process: prints "op T peak op_peak fwd_ms vjp_ms jvp_ms".
int run_case(const Config& c, const std::string& op, index_t n_tok) {
  const Tensor<float> q = random_tensor({c.rows, n_tok, c.hq * c.dh}, 1);
  const Tensor<float> k = random_tensor({c.rows, n_tok, c.hkv * c.dh}, 2);
  const Tensor<float> v = random_tensor({c.rows, n_tok, c.hkv * c.dh}, 3);
  const Tensor<float> cot = random_tensor({c.rows, n_tok, c.hq * c.dh}, 4);
  std::vector<std::uint8_t> mask(static_cast<std::size_t>(c.rows * n_tok), 1);
  std::fill(mask.begin(), mask.begin() + n_tok / 8, 0);  // row 0 left-padded by T/8
  const double base = peak_rss_mib();

  using Clock = std::chrono::steady_clock;
  auto ms = [](Clock::time_point a, Clock::time_point b) {
    return std::chrono::duration<double, std::milli>(b - a).count();
  };
  double fwd = 1e300, vjp = 1e300, jvp = 1e300, peak = 0;
  for (int rep = 0; rep < 4; ++rep) {  // rep 0 warms up
    Tape<float> tape;
    Var xq = tape.input(q), xk = tape.input(k), xv = tape.input(v);
    const auto t0 = Clock::now();
    Var o = op == "flash" ? flash_causal_attention(tape, xq, xk, xv, mask, c.hq, c.hkv)
                          : causal_attention(tape, xq, xk, xv, mask, c.hq, c.hkv);
    const auto t1 = Clock::now();
    tape.backward(o, cot);
    const auto t2 = Clock::now();
    peak = std::max(peak, peak_rss_mib());  // forward + VJP only
    tape.set_tangent(xq, q);
    tape.set_tangent(xk, k);
    tape.set_tangent(xv, v);
    const auto t3 = Clock::now();
    tape.jvp();
    const auto t4 = Clock::now();
    if (rep == 0) continue;
    fwd = std::min(fwd, ms(t0, t1));
    vjp = std::min(vjp, ms(t1, t2));
    jvp = std::min(jvp, ms(t3, t4));
  }
  std::printf("%-6s %6lld %10.1f %10.1f %10.1f %10.1f %10.1f\n", op.c_str(), static_cast<long long>(n_tok), peak,
              peak - base, fwd, vjp, jvp);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const auto parsed = ep_bench::parse_options<Config>(kSpec, argc, argv, read_config);
  if (const int* code = std::get_if<int>(&parsed)) return *code;
  const Config& c = std::get<Config>(parsed);
  if (!c.child_op.empty()) return run_case(c, c.child_op, c.toks.front());

  std::printf("R %lld, Hq %lld, Hkv %lld, Dh %lld, float, forward + VJP (peak), then JVP; %d threads\n",
              static_cast<long long>(c.rows), static_cast<long long>(c.hq), static_cast<long long>(c.hkv),
              static_cast<long long>(c.dh), CpuBackend::num_threads());
  std::printf("%-6s %6s %10s %10s %10s %10s %10s\n", "op", "T", "peak MiB", "op MiB", "fwd ms", "vjp ms", "jvp ms");
  std::fflush(stdout);
  for (index_t n_tok : c.toks)
    for (const char* op : {"causal", "flash"}) {
      // A fresh process per case: its VmHWM starts from nothing.
      std::vector<std::string> args = {"/proc/self/exe",
                                       "--heads",
                                       std::to_string(c.hq),
                                       "--kv-heads",
                                       std::to_string(c.hkv),
                                       "--rows",
                                       std::to_string(c.rows),
                                       "--head-dim",
                                       std::to_string(c.dh),
                                       "--tok",
                                       std::to_string(n_tok),
                                       "--child",
                                       op};
      std::vector<char*> argp;
      for (std::string& s : args) argp.push_back(s.data());
      argp.push_back(nullptr);
      const pid_t pid = fork();
      if (pid == 0) {
        execv(argp[0], argp.data());
        std::perror("attention_memory: execv");
        _exit(127);
      }
      int status = 0;
      if (pid < 0 || waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        std::fprintf(stderr, "attention_memory: case %s T=%lld failed\n", op, static_cast<long long>(n_tok));
        return 1;
      }
    }
  return 0;
}
