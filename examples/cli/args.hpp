// The argument parser every subcommand of entropy-probe shares (`demo` in
// entropy_probe.cpp, `run` in run_command.hpp): a subcommand is a table of
// its positionals and options (CommandSpec); parse_args turns its arguments
// into ParsedArgs, whose typed readers name the option in every error;
// command_help prints the table as the subcommand's --help. The benches'
// programs parse with it too (bench/bench_common.hpp), as programs of their own.
//
// Accepted: --name VALUE, --name=VALUE, flags (no value), positionals, "--"
// to end the options, -h / --help anywhere before "--" (help wins over
// everything after it). A mistake is a UsageFailure: exit 2, with a pointer
// to the subcommand's --help.
#pragma once

#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <limits>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace ep_cli {

inline constexpr const char* kProgram = "entropy-probe";

// Exit status of the program and of every subcommand; what each means is
// kExitStatus below, the one table the --help texts are written from.
inline constexpr int kExitOk = 0;
inline constexpr int kExitError = 1;
inline constexpr int kExitUsage = 2;
inline constexpr int kExitInput = 3;
inline constexpr int kExitNoDevice = 4;

struct ExitStatus {
  int code;
  std::string_view meaning;
};
inline constexpr ExitStatus kExitStatus[] = {
    {kExitOk, "success"},
    {kExitError, "an error while running"},
    {kExitUsage, "a usage error"},
    {kExitInput, "a bad input file"},
    {kExitNoDevice, "--device cuda found no CUDA device"},
};

// "Exit status: 0 success, 1 ...", broken into lines of at most `width` characters.
inline std::string exit_status_help(std::size_t width = 100) {
  std::string s = "Exit status:";
  std::size_t line_start = 0;
  for (std::size_t i = 0; i < std::size(kExitStatus); ++i) {
    const std::string item =
        fmt::format("{} {}{}", kExitStatus[i].code, kExitStatus[i].meaning, i + 1 < std::size(kExitStatus) ? "," : ".");
    if (s.size() - line_start + 1 + item.size() > width) {
      s += "\n";
      line_start = s.size();
    } else {
      s += " ";
    }
    s += item;
  }
  return s;
}

// A mistake on the command line: reported with a pointer to --help, exit 2.
class UsageFailure : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct OptionSpec {
  std::string name;        // "--seed"
  std::string value_name;  // "N"; empty for a flag
  std::string help;
  bool repeated = false;  // may be given more than once (its values in order: ParsedArgs::list)
};

struct PositionalSpec {
  std::string name;  // "CHECKPOINT_DIR"
  std::string help;  // may span lines: continuation lines are indented to the help column
  bool required = true;
};

// Written with designated initializers; every member has a default (so
// -Wmissing-field-initializers accepts leaving one out).
struct CommandSpec {
  std::string name{};         // "run"
  std::string summary{};      // one line, in the program's list of commands
  std::string description{};  // the paragraph under the usage line; the summary when empty
  std::string synopsis{};     // the usage line after the name; "POSITIONALS [OPTIONS]" when empty
  std::vector<PositionalSpec> positionals{};
  std::vector<OptionSpec> options{};
  std::string details{};  // free text after the option list
  int help_column = 18;   // width of the names column of --help
  // The program's name; a program of its own (a bench) sets it and leaves `name` empty.
  std::string program = kProgram;

  const OptionSpec* option(std::string_view n) const {
    for (const auto& o : options)
      if (o.name == n) return &o;
    return nullptr;
  }
};

// A subcommand's arguments, parsed; the readers throw a UsageFailure that
// names the subcommand and the option.
class ParsedArgs {
 public:
  std::string program = kProgram;
  std::string command;                                    // "demo"; empty for a program of its own
  std::map<std::string, std::string> values;              // options with a value, by name
  std::map<std::string, std::vector<std::string>> lists;  // repeated options' values, in order
  std::vector<std::string> flags;                         // flags given
  std::vector<std::string> positionals;
  bool help = false;

  // "entropy-probe CMD", or the program alone.
  std::string invoked() const { return command.empty() ? program : program + " " + command; }
  // "entropy-probe CMD: what", to throw.
  UsageFailure failure(std::string_view what) const { return UsageFailure(fmt::format("{}: {}", invoked(), what)); }

  bool has_flag(std::string_view f) const { return std::find(flags.begin(), flags.end(), f) != flags.end(); }
  std::optional<std::string> value(const std::string& name) const {
    auto it = values.find(name);
    return it == values.end() ? std::nullopt : std::optional<std::string>(it->second);
  }

  // A non-empty value (a file or directory name); `what` says what it names.
  std::optional<std::string> path(const std::string& name, std::string_view what) const {
    auto v = value(name);
    if (v && v->empty()) throw failure(fmt::format("{} needs {}", name, what));
    return v;
  }
  std::optional<std::uint64_t> integer(const std::string& name,
                                       std::uint64_t max = std::numeric_limits<std::uint64_t>::max()) const {
    auto v = value(name);
    if (!v) return std::nullopt;
    std::uint64_t n = 0;
    const auto [end, ec] = std::from_chars(v->data(), v->data() + v->size(), n);
    if (v->empty() || ec != std::errc() || end != v->data() + v->size() || n > max)
      throw failure(fmt::format("{} expects a non-negative integer, got '{}'", name, *v));
    return n;
  }
  // Every value of a repeated option, each a non-negative integer.
  std::vector<std::uint64_t> integers(const std::string& name,
                                      std::uint64_t max = std::numeric_limits<std::uint64_t>::max()) const {
    std::vector<std::uint64_t> out;
    auto it = lists.find(name);
    if (it == lists.end()) return out;
    for (const std::string& v : it->second) {
      std::uint64_t n = 0;
      const auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), n);
      if (v.empty() || ec != std::errc() || end != v.data() + v.size() || n > max)
        throw failure(fmt::format("{} expects a non-negative integer, got '{}'", name, v));
      out.push_back(n);
    }
    return out;
  }
  std::optional<double> number(const std::string& name) const {
    auto v = value(name);
    if (!v) return std::nullopt;
    double x = 0;
    const auto [end, ec] = std::from_chars(v->data(), v->data() + v->size(), x);
    if (v->empty() || ec != std::errc() || end != v->data() + v->size() || !std::isfinite(x))
      throw failure(fmt::format("{} expects a number, got '{}'", name, *v));
    return x;
  }
  std::optional<double> positive(const std::string& name) const {
    auto x = number(name);
    if (x && !(*x > 0)) throw failure(fmt::format("{} must be positive, got '{}'", name, *value(name)));
    return x;
  }
  // Positive numbers: a comma-separated list "1e-5,3e-5,1e-4", or a grid
  // "START:STOP:N" of N >= 2 log-spaced values from START to STOP.
  std::optional<std::vector<double>> positive_list(const std::string& name) const {
    auto v = value(name);
    if (!v) return std::nullopt;
    auto bad = [&](std::string_view why) {
      return failure(fmt::format("{} expects a list X,Y,... or a grid START:STOP:N of positive numbers ({}), got '{}'",
                                 name, why, *v));
    };
    auto parse = [&](std::string_view s) {
      double x = 0;
      const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), x);
      if (s.empty() || ec != std::errc() || end != s.data() + s.size() || !std::isfinite(x) || !(x > 0))
        throw bad(fmt::format("'{}' is not a positive number", s));
      return x;
    };
    const bool grid = v->find(':') != std::string::npos;
    std::vector<double> parts;
    std::size_t pos = 0;
    while (true) {
      const std::size_t end = v->find(grid ? ':' : ',', pos);
      parts.push_back(parse(std::string_view(*v).substr(pos, end == std::string::npos ? end : end - pos)));
      if (end == std::string::npos) break;
      pos = end + 1;
    }
    if (!grid) return parts;
    if (parts.size() != 3 || parts[2] != std::floor(parts[2]) || parts[2] < 2)
      throw bad("a grid is START:STOP:N with a whole N >= 2");
    const auto n = static_cast<std::size_t>(parts[2]);
    std::vector<double> out(n);
    for (std::size_t k = 0; k < n; ++k) out[k] = parts[0] * std::pow(parts[1] / parts[0], double(k) / double(n - 1));
    out.back() = parts[1];  // the end point as written
    return out;
  }
  // A byte count: a number with an optional 1024-based suffix K, M, G, T
  // (or KiB, MiB, GiB, TiB): "8589934592", "512M", "1.5GiB"; at least 1 byte.
  std::optional<std::uint64_t> bytes(const std::string& name) const {
    auto v = value(name);
    if (!v) return std::nullopt;
    double x = 0;
    const char* const last = v->data() + v->size();
    const auto [end, ec] = std::from_chars(v->data(), last, x);
    const std::string_view suffix(end, static_cast<std::size_t>(last - end));
    double unit = 0;
    const char* const units[] = {"", "K", "M", "G", "T"};
    for (int i = 0; i < 5; ++i)
      if (suffix == units[i] || (i > 0 && suffix == std::string(units[i]) + "iB")) unit = std::ldexp(1.0, 10 * i);
    const double n = std::floor(x * unit);
    if (v->empty() || ec != std::errc() || unit == 0 || !(n >= 1) || !(n < 0x1p63))
      throw failure(fmt::format("{} expects a size in bytes such as 8589934592, 512M or 1.5GiB, got '{}'", name, *v));
    return static_cast<std::uint64_t>(n);
  }
  // One of the named values of `choices`, listed in that order in the error.
  template <class E>
  std::optional<E> choice(const std::string& name, const std::vector<std::pair<std::string, E>>& choices) const {
    auto v = value(name);
    if (!v) return std::nullopt;
    std::string names;
    for (const auto& [n, e] : choices) {
      if (n == *v) return e;
      names += names.empty() ? n : ", " + n;
    }
    throw failure(fmt::format("{} must be one of {}, got '{}'", name, names, *v));
  }
};

// The arguments after the subcommand's name. Throws UsageFailure; with
// -h / --help it returns at once with `help` set and nothing checked.
inline ParsedArgs parse_args(const CommandSpec& cmd, const std::vector<std::string>& args) {
  ParsedArgs out;
  out.program = cmd.program;
  out.command = cmd.name;
  bool options_done = false;
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (!options_done && (a == "-h" || a == "--help")) {
      out.help = true;
      return out;
    }
    if (!options_done && a == "--") {
      options_done = true;
      continue;
    }
    if (!options_done && a.size() > 1 && a[0] == '-') {
      const auto eq = a.find('=');
      const std::string name = a.substr(0, eq);
      const OptionSpec* spec = cmd.option(name);
      if (!spec) throw out.failure(fmt::format("unknown option '{}'", name));
      // A repeated option is a mistake, never a silent choice of one of them.
      if (out.has_flag(name) || out.values.count(name)) throw out.failure(fmt::format("option '{}' given twice", name));
      auto slot = [&]() -> std::string& {
        if (!spec->repeated) return out.values[name];
        return out.lists[name].emplace_back();
      };
      if (spec->value_name.empty()) {
        if (eq != std::string::npos) throw out.failure(fmt::format("option '{}' takes no value", name));
        out.flags.push_back(name);
      } else if (eq != std::string::npos) {
        slot() = a.substr(eq + 1);
      } else if (i + 1 < args.size()) {
        slot() = args[++i];
      } else {
        throw out.failure(fmt::format("option '{}' needs a value ({})", name, spec->value_name));
      }
      continue;
    }
    out.positionals.push_back(a);
  }
  std::size_t required = 0;
  for (const auto& p : cmd.positionals) required += p.required;
  if (out.positionals.size() > cmd.positionals.size())
    throw out.failure(fmt::format("unexpected argument '{}'", out.positionals[cmd.positionals.size()]));
  if (out.positionals.size() < required)
    throw out.failure(fmt::format("missing {}", cmd.positionals[out.positionals.size()].name));
  return out;
}

// The subcommand's --help.
inline std::string command_help(const CommandSpec& c) {
  const int w = c.help_column;
  // Continuation lines of a help text start under its first line.
  // (Appended in place: GCC 12 misreports `"\n" + std::string(...)` here under -Wrestrict.)
  auto indented = [&](const std::string& help) {
    std::string s;
    for (char ch : help) {
      s += ch;
      if (ch == '\n') s.append(static_cast<std::size_t>(w + 3), ' ');
    }
    return s;
  };
  std::string s = "usage: " + (c.name.empty() ? c.program : c.program + " " + c.name);
  if (!c.synopsis.empty()) {
    s += " " + c.synopsis;
  } else {
    for (const auto& p : c.positionals) s += p.required ? " " + p.name : " [" + p.name + "]";
    if (!c.options.empty()) s += " [OPTIONS]";
  }
  s += fmt::format("\n\n{}\n", c.description.empty() ? c.summary : c.description);
  if (!c.positionals.empty()) {
    s += "\narguments:\n";
    for (const auto& p : c.positionals) s += fmt::format("  {:<{}} {}\n", p.name, w, indented(p.help));
  }
  s += "\noptions:\n";
  for (const auto& o : c.options) {
    const std::string left = o.value_name.empty() ? o.name : o.name + " " + o.value_name;
    s += fmt::format("  {:<{}} {}\n", left, w, indented(o.help));
  }
  s += fmt::format("  {:<{}} {}\n", "-h, --help", w, "show this help");
  if (!c.details.empty()) s += "\n" + c.details + "\n";
  return s;
}

}  // namespace ep_cli
