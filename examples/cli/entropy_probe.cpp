// entropy-probe: the command-line program.
//
//   entropy-probe demo [--seed N] [--out DIR] [--quick]
//   entropy-probe run CHECKPOINT_DIR --e-batch E --u-batch U [OPTIONS]   (run_command.hpp)
//   entropy-probe sample CHECKPOINT_DIR --prompts P --G N --max-new-tokens M --out OUT [OPTIONS]
//                                                                         (sample_command.hpp)
//
// Subcommands are entries of one table (spec, entry point); each parses its
// arguments with the parser they share (args.hpp), so a new subcommand is one
// more spec and one more entry.
//
// Exit status: ep_cli::kExitStatus (args.hpp), listed by --help.
#include "../demo.hpp"
#include "args.hpp"
#include "run_command.hpp"
#include "sample_command.hpp"

#include <entropy_probe/entropy_probe.hpp>

#include <fmt/format.h>

#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#ifndef ENTROPY_PROBE_VERSION
#define ENTROPY_PROBE_VERSION "unknown"
#endif

namespace {

namespace ep = entropy_probe;

using ep_cli::CommandSpec;
using ep_cli::kExitError;
using ep_cli::kExitOk;
using ep_cli::kExitUsage;
using ep_cli::kProgram;
using ep_cli::ParsedArgs;
using ep_cli::UsageFailure;

// ---- the subcommands ------------------------------------------------------------------

const CommandSpec kDemo{
    .name = "demo",
    .summary = "train a small LoRA policy on a synthetic task, probe it, check the prediction against the real step",
    .options = {{"--seed", "N", "seed for everything random (default 1)"},
                {"--out", "DIR", "where results.json and calibration.svg go (default: the current directory)"},
                {"--quick", "", "smaller sizes, a few seconds (the test suite's run)"},
                {"--verbose", "", "the library's debug log on stderr ([REGISTRY], [X], [Y] invariants)"}},
    .details =
        "Builds a GPT-2-shaped model in double with LoRA adapters, trains it for a few GRPO steps with AdamW,\n"
        "then runs the offline entropy probe (full variance, Adam ground truth) and a learning-rate sweep\n"
        "comparing the first-order prediction deltaH1 with the measured per-token entropy change for both\n"
        "step kinds (adam, precond_sgd). Seeded; nothing is downloaded. Well under a minute on 2 cores."};

int run_demo(const ParsedArgs& a) {
  ep_demo::DemoOptions opt;
  if (auto n = a.integer("--seed")) opt.seed = *n;
  if (auto d = a.path("--out", "a directory")) opt.out_dir = *d;
  opt.quick = a.has_flag("--quick");
  ep::log_to_stderr(a.has_flag("--verbose") ? ep::LogLevel::debug : ep::LogLevel::warning);
  return ep_demo::run_demo(opt);
}

// `demo ARGS...`: parse, --help, run; a usage error points at demo's own help.
int demo_main(const std::vector<std::string>& args) {
  try {
    const ParsedArgs parsed = ep_cli::parse_args(kDemo, args);
    if (parsed.help) {
      std::fputs(ep_cli::command_help(kDemo).c_str(), stdout);
      return kExitOk;
    }
    return run_demo(parsed);
  } catch (const UsageFailure& u) {
    fmt::print(stderr, "{}\nsee '{} {} --help'\n", u.what(), kProgram, kDemo.name);
    return kExitUsage;
  }
}

// `run` parses with the same parser but keeps its own error handling (exit 3
// for a bad file, MPI), all in run_command.hpp.
int run_main(const std::vector<std::string>& args) { return ep_run::run_command(args); }
int sample_main(const std::vector<std::string>& args) { return ep_sample::sample_command(args); }

struct Entry {
  const CommandSpec* spec;
  int (*run)(const std::vector<std::string>& args);  // the arguments after the command's name
};

const std::vector<Entry>& subcommands() {
  static const std::vector<Entry> table{
      {&kDemo, demo_main}, {&ep_run::run_spec(), run_main}, {&ep_sample::sample_spec(), sample_main}};
  return table;
}

std::string program_help() {
  std::string s = fmt::format(
      "usage: {} COMMAND [ARGS...]\n\n"
      "Predicts how one optimizer step changes a LoRA policy's entropy (entropy_probe {}).\n\n"
      "commands:\n",
      kProgram, ENTROPY_PROBE_VERSION);
  for (const auto& e : subcommands()) s += fmt::format("  {:<10} {}\n", e.spec->name, e.spec->summary);
  s += fmt::format(
      "\noptions:\n  -h, --help   show this help\n  --version    print the version\n\n"
      "'{} COMMAND --help' describes a command's arguments and options.\n"
      "{}\n",
      kProgram, ep_cli::exit_status_help());
  return s;
}

int dispatch(const std::vector<std::string>& argv) {
  if (argv.empty()) {
    std::fputs(program_help().c_str(), stderr);
    return kExitUsage;
  }
  const std::string& first = argv[0];
  if (first == "-h" || first == "--help") {
    std::fputs(program_help().c_str(), stdout);
    return kExitOk;
  }
  if (first == "--version") {
    fmt::print("{} {}\n", kProgram, ENTROPY_PROBE_VERSION);
    return kExitOk;
  }
  if (first == "help") {  // "help COMMAND" = "COMMAND --help"
    if (argv.size() == 1) {
      std::fputs(program_help().c_str(), stdout);
      return kExitOk;
    }
    for (const auto& e : subcommands())
      if (e.spec->name == argv[1]) {
        std::fputs(ep_cli::command_help(*e.spec).c_str(), stdout);
        return kExitOk;
      }
    throw UsageFailure(fmt::format("{} help: unknown command '{}'", kProgram, argv[1]));
  }
  for (const auto& e : subcommands())
    if (e.spec->name == first) return e.run(std::vector<std::string>(argv.begin() + 1, argv.end()));
  if (first.size() > 1 && first[0] == '-') throw UsageFailure(fmt::format("{}: unknown option '{}'", kProgram, first));
  throw UsageFailure(fmt::format("{}: unknown command '{}'", kProgram, first));
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  try {
    return dispatch(args);
  } catch (const UsageFailure& u) {
    fmt::print(stderr, "{}\nsee '{} --help'\n", u.what(), kProgram);
    return kExitUsage;
  } catch (const ep::Error& e) {
    fmt::print(stderr, "{}: error: {}\n", kProgram, e.what());
    return kExitError;
  } catch (const std::exception& e) {
    fmt::print(stderr, "{}: unexpected error: {}\n", kProgram, e.what());
    return kExitError;
  }
}
