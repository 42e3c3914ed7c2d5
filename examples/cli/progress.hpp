// The probe's progress lines, one definition for `entropy-probe run` (through
// the library's log, at info level) and the demo (on stderr):
// "[probe] PHASE DONE/TOTAL prompts", at most four a second and always each
// phase's last, so a long phase shows it is moving without flooding a log.
#pragma once

#include <entropy_probe/core/log.hpp>

#include <fmt/format.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>

namespace ep_cli {

// `emit` receives each line without a newline.
inline entropy_probe::ProgressCallback progress_printer(std::function<void(const std::string&)> emit) {
  using clock = std::chrono::steady_clock;
  auto last = std::make_shared<clock::time_point>(clock::now() - std::chrono::seconds(1));  // the first line shows
  return [last, emit = std::move(emit)](std::string_view phase, entropy_probe::index_t done,
                                        entropy_probe::index_t total) {
    const auto now = clock::now();
    if (done < total && now - *last < std::chrono::milliseconds(250)) return;
    *last = now;
    emit(fmt::format("[probe] {:<22} {:>4}/{} prompts", phase, done, total));
  };
}

}  // namespace ep_cli
