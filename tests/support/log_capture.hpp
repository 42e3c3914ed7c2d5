// Collects the library's log warnings while alive (tests that check a
// warning's text); the sink is removed again on destruction.
#pragma once

#include <entropy_probe/core/log.hpp>

#include <string>
#include <string_view>
#include <vector>

namespace ep_test {

struct WarningCapture {
  std::vector<std::string> warnings;
  WarningCapture() {
    entropy_probe::set_log_sink([this](entropy_probe::LogLevel l, std::string_view m) {
      if (l == entropy_probe::LogLevel::warning) warnings.emplace_back(m);
    });
  }
  ~WarningCapture() { entropy_probe::set_log_sink({}); }
  WarningCapture(const WarningCapture&) = delete;
  WarningCapture& operator=(const WarningCapture&) = delete;
};

}  // namespace ep_test
