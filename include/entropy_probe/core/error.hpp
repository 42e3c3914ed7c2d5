// Exceptions. Every error says what was wrong and where (file, field, index,
// parameter name); nothing in the library fails silently.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>
#include <utility>

namespace entropy_probe {

// Base of every error the library throws.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A shape, dtype or binding mistake made by the calling code.
class UsageError : public Error {
 public:
  using Error::Error;
};

// Bad data from outside: a batch, a file, a configuration value.
class InputError : public Error {
 public:
  using Error::Error;
};

template <class E = Error, class... Args>
[[noreturn]] void fail(fmt::format_string<Args...> f, Args&&... args) {
  throw E(fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace entropy_probe
