// probe_compare: the probe phases on a Hugging Face checkpoint directory, timed,
// for bench/compare_pytorch.py (the same phases with transformers + peft).
//
//   probe_compare CHECKPOINT_DIR [--E FILE] [--U FILE] [--phase sumxy|alpha|all]
//                 [--warmup N] [--repeats N] [--mb N] [--double]     (--help lists them)
//
// Loads the model (hf::load_model), the Adam state (optimizer.safetensors) and
// the batches (default CHECKPOINT_DIR/E.safetensors, U.safetensors), then runs
// `warmup` untimed and `repeats` timed rounds of the chosen phases:
//
//   sum_X   ProbeComponents::accumulate_sum_X(E)
//   sum_Y   accumulate_sum_Y(U), the Adam preconditioner, / B_U
//   alpha   ConditionalVarianceEstimator::estimate(E, mu_Y, eta, jvp): the
//           alpha trick (s_b = X_b . mu_Y over the LoRA view) by forward mode
//
// (`alpha` alone still computes mu_Y once, untimed, before the rounds.)
// Prints one JSON object on stdout: per-phase seconds (wall, and process CPU
// seconds as "cpu_<phase>") of every timed round,
// bars_dot / s_values of the last round (to cross-check the PyTorch side),
// and the resident set size after loading (VmRSS, kB).
#include "bench_common.hpp"

#include <entropy_probe/entropy_probe.hpp>
#include <entropy_probe/io/hf.hpp>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <exception>
#include <filesystem>
#include <fstream>
#include <string>
#include <variant>
#include <vector>

namespace {

namespace ep = entropy_probe;
using clock_type = std::chrono::steady_clock;

struct Options {
  std::string dir, E, U, phase = "all";
  int warmup = 1, repeats = 3;
  ep::index_t mb = 0;
  bool use_double = false;
};

const ep_cli::CommandSpec kSpec{
    .description =
        "The probe phases on a checkpoint directory, timed, for bench/compare_pytorch.py; one JSON object\n"
        "on stdout.",
    .positionals = {{"CHECKPOINT_DIR", "config.json, model.safetensors, the LoRA adapter, optimizer.safetensors"}},
    .options = {{"--E", "FILE", "the E batch (default CHECKPOINT_DIR/E.safetensors)"},
                {"--U", "FILE", "the U batch (default CHECKPOINT_DIR/U.safetensors)"},
                {"--phase", "P", "sumxy (sum_X, sum_Y), alpha or all (default)"},
                {"--warmup", "N", "untimed rounds first (default 1)"},
                {"--repeats", "N", "timed rounds (default 3)"},
                {"--mb", "N", "prompts per microbatch, 0 = the whole batch (default 0)"},
                {"--double", "", "run in float64 (default float32)"}},
    .help_column = 16,
    .program = "probe_compare"};

Options read_options(const ep_cli::ParsedArgs& a) {
  Options o;
  o.dir = a.positionals[0];
  o.phase =
      a.choice<std::string>("--phase", {{"sumxy", "sumxy"}, {"alpha", "alpha"}, {"all", "all"}}).value_or(o.phase);
  o.warmup = int(ep_bench::count_option(a, "--warmup", o.warmup, 0));
  o.repeats = int(ep_bench::count_option(a, "--repeats", o.repeats));
  o.mb = ep_bench::count_option(a, "--mb", o.mb, 0);
  o.use_double = a.has_flag("--double");
  o.E = a.path("--E", "a file name").value_or((std::filesystem::path(o.dir) / "E.safetensors").string());
  o.U = a.path("--U", "a file name").value_or((std::filesystem::path(o.dir) / "U.safetensors").string());
  return o;
}

long rss_kb(const char* field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(field, 0) == 0) return std::strtol(line.c_str() + std::string(field).size(), nullptr, 10);
  return -1;
}

double seconds_since(clock_type::time_point t0) {
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

// Process CPU seconds (all threads).
double cpu_seconds() { return static_cast<double>(std::clock()) / CLOCKS_PER_SEC; }

template <class T, class M>
nlohmann::json run(M& model, const Options& o, const ep::TokenBatch& E, const ep::TokenBatch& U, long rss_load) {
  ep::SingleProcess comm;
  const auto registry = ep::Registry<T>::build(model);
  ep::ProbeComponents<M> comp(model, registry, ep::ProbeSettings{.mb_size = o.mb}, comm);
  const auto state =
      ep::hf::load_adam_state<T>((std::filesystem::path(o.dir) / "optimizer.safetensors").string(), registry);
  const double eta = state.hyper().lr;
  E.validate(model.vocab_size(), "E batch");
  U.validate(model.vocab_size(), "U batch");
  const bool do_sum = o.phase == "sumxy" || o.phase == "all";
  const bool do_alpha = o.phase == "alpha" || o.phase == "all";

  auto compute_mu_Y = [&] {
    const auto sy = comp.accumulate_sum_Y(U);
    ep::AdamPreconditioner<T> pre(state);
    return ep::preconditioned_mean(sy.sum, sy.count, pre);
  };
  typename ep::ProbeComponents<M>::Buffer mu_Y = do_sum ? comp.zeros_like_params() : compute_mu_Y();

  nlohmann::json out;
  out["registry"] = {{"trainable_tensors", registry.size()},
                     {"lora_tensors", registry.lora_count()},
                     {"trainable_numel", registry.numel()}};
  out["rss_after_load_kb"] = rss_load;
  std::vector<double> t_x, t_y, t_a, c_x, c_y, c_a;
  double bars_dot = 0;
  std::vector<double> s_values;
  const ep::ConditionalVarianceEstimator<M> est(comp);
  for (int round = 0; round < o.warmup + o.repeats; ++round) {
    const bool timed = round >= o.warmup;
    if (do_sum) {
      auto t0 = clock_type::now();
      double p0 = cpu_seconds();
      auto sx = comp.accumulate_sum_X(E);
      ep::scale_param_buffer(sx.sum, 1.0 / double(sx.count));
      const double dx = seconds_since(t0), px = cpu_seconds() - p0;
      t0 = clock_type::now();
      p0 = cpu_seconds();
      mu_Y = compute_mu_Y();
      const double dy = seconds_since(t0), py = cpu_seconds() - p0;
      bars_dot = comp.dot_param_buffers(sx.sum, mu_Y);
      if (timed) {
        t_x.push_back(dx);
        t_y.push_back(dy);
        c_x.push_back(px);
        c_y.push_back(py);
      }
    }
    if (do_alpha) {
      const auto t0 = clock_type::now();
      const double p0 = cpu_seconds();
      const auto cv = est.estimate(E, mu_Y, eta, ep::AlphaRoute::jvp);
      const double da = seconds_since(t0), pa = cpu_seconds() - p0;
      s_values = cv.s_values;
      if (timed) {
        t_a.push_back(da);
        c_a.push_back(pa);
      }
    }
  }
  if (do_sum) {
    out["sum_X"] = t_x;
    out["sum_Y"] = t_y;
    out["cpu_sum_X"] = c_x;
    out["cpu_sum_Y"] = c_y;
    out["bars_dot"] = bars_dot;
  }
  if (do_alpha) {
    out["alpha"] = t_a;
    out["cpu_alpha"] = c_a;
    out["s_values"] = s_values;
  }
  out["peak_rss_kb"] = rss_kb("VmHWM:");
  return out;
}

template <class T>
int main_t(const Options& o) {
  const auto t0 = clock_type::now();
  auto any = ep::hf::load_model<T>(o.dir);
  const auto E = ep::hf::load_batch(o.E);
  const auto U = ep::hf::load_batch(o.U);
  const double load_s = seconds_since(t0);
  const long rss_load = rss_kb("VmRSS:");
  nlohmann::json out = std::visit([&](auto& model) { return run<T>(model, o, E, U, rss_load); }, any);
  out["load"] = load_s;
  out["dtype"] = std::is_same_v<T, float> ? "float32" : "float64";
  out["E"] = {{"B", E.B}, {"G", E.G}, {"T", E.T}};
  out["U"] = {{"B", U.B}, {"G", U.G}, {"T", U.T}};
  std::puts(out.dump().c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const auto parsed = ep_bench::parse_options<Options>(kSpec, argc, argv, read_options);
  if (const int* code = std::get_if<int>(&parsed)) return *code;
  const Options& o = std::get<Options>(parsed);
  try {
    return o.use_double ? main_t<double>(o) : main_t<float>(o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "probe_compare: %s\n", e.what());
    return 1;
  }
}
