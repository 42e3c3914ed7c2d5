// Logging through fmt with levels and a pluggable sink. Nothing prints unless a
// host installs a sink (set_log_sink) or asks for stderr (log_to_stderr).
#pragma once

#include "entropy_probe/core/config.hpp"

#include <fmt/format.h>

#include <atomic>
#include <cstdio>
#include <functional>
#include <mutex>
#include <string_view>
#include <utility>

namespace entropy_probe {

enum class LogLevel { debug = 0, info = 1, warning = 2, error = 3, off = 4 };

inline const char* to_string(LogLevel l) {
  switch (l) {
    case LogLevel::debug:
      return "debug";
    case LogLevel::info:
      return "info";
    case LogLevel::warning:
      return "warning";
    case LogLevel::error:
      return "error";
    case LogLevel::off:
      break;
  }
  return "off";
}

using LogSink = std::function<void(LogLevel, std::string_view)>;

namespace detail {
struct LogState {
  std::mutex mutex;
  LogSink sink;  // empty: messages are dropped
  std::atomic<int> level{static_cast<int>(LogLevel::info)};
};
inline LogState& log_state() {
  static LogState s;
  return s;
}
}  // namespace detail

// Route messages at `level` and above to `sink` (an empty sink silences).
inline void set_log_sink(LogSink sink) {
  auto& s = detail::log_state();
  std::lock_guard<std::mutex> lock(s.mutex);
  s.sink = std::move(sink);
}
inline void set_log_level(LogLevel level) { detail::log_state().level = static_cast<int>(level); }
inline LogLevel log_level() { return static_cast<LogLevel>(detail::log_state().level.load()); }

// Convenience sink: "[level] message" lines on stderr.
inline void log_to_stderr(LogLevel level = LogLevel::info) {
  set_log_level(level);
  set_log_sink([](LogLevel l, std::string_view msg) { fmt::print(stderr, "[{}] {}\n", to_string(l), msg); });
}

inline bool log_enabled(LogLevel level) {
  auto& s = detail::log_state();
  if (static_cast<int>(level) < s.level.load()) return false;
  std::lock_guard<std::mutex> lock(s.mutex);
  return static_cast<bool>(s.sink);
}

template <class... Args>
void log(LogLevel level, fmt::format_string<Args...> f, Args&&... args) {
  if (!log_enabled(level)) return;  // formatting costs nothing when silenced
  std::string msg = fmt::format(f, std::forward<Args>(args)...);
  auto& s = detail::log_state();
  std::lock_guard<std::mutex> lock(s.mutex);
  if (s.sink) s.sink(level, msg);
}

template <class... Args>
void log_debug(fmt::format_string<Args...> f, Args&&... args) {
  log(LogLevel::debug, f, std::forward<Args>(args)...);
}
template <class... Args>
void log_info(fmt::format_string<Args...> f, Args&&... args) {
  log(LogLevel::info, f, std::forward<Args>(args)...);
}
template <class... Args>
void log_warning(fmt::format_string<Args...> f, Args&&... args) {
  log(LogLevel::warning, f, std::forward<Args>(args)...);
}

// Progress of a long phase: phase name, items done, items total.
using ProgressCallback = std::function<void(std::string_view, index_t, index_t)>;

}  // namespace entropy_probe
