// JSON helpers shared by the checkpoint readers and writer: paths, reading a
// JSON file, and typed field readers whose every error is an InputError
// naming the file, the field and the value (docs/checkpoints.md).
#pragma once

#include "entropy_probe/core/config.hpp"
#include "entropy_probe/core/error.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <optional>
#include <string>

namespace entropy_probe::hf {

namespace detail {

using nlohmann::json;

inline std::string join_path(const std::string& dir, const std::string& file) {
  return (std::filesystem::path(dir) / file).string();
}

inline bool is_file(const std::string& path) {
  std::error_code ec;
  return std::filesystem::is_regular_file(path, ec);
}

inline bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
inline bool starts_with(const std::string& s, const std::string& prefix) { return s.rfind(prefix, 0) == 0; }

inline std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

// A JSON file whose top level is an object.
inline json read_json_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail<InputError>("{}: cannot open: {}", path, std::strerror(errno));
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    fail<InputError>("{}: not valid JSON: {}", path, e.what());
  }
  if (!j.is_object()) fail<InputError>("{}: the top level is a JSON {}, expected an object", path, j.type_name());
  return j;
}

inline void require_object(const json& j, const std::string& path) {
  if (!j.is_object()) fail<InputError>("{}: the top level is a JSON {}, expected an object", path, j.type_name());
}

// The value of `key`, or nullptr when it is absent or null.
inline const json* find_field(const json& j, const char* key) {
  auto it = j.find(key);
  return it == j.end() || it->is_null() ? nullptr : &*it;
}

[[noreturn]] inline void missing_field(const std::string& path, const char* key) {
  fail<InputError>("{}: missing field '{}'", path, key);
}

// An integer field >= `min`; absent or null gives `def` (required when none).
inline index_t get_int(const json& j, const std::string& path, const char* key, std::optional<index_t> def,
                       index_t min) {
  const json* v = find_field(j, key);
  if (!v) {
    if (!def) missing_field(path, key);
    return *def;
  }
  if (!v->is_number_integer())
    fail<InputError>("{}: field '{}' must be an integer, got {} {}", path, key, v->type_name(), v->dump());
  if (v->is_number_unsigned() &&
      v->get<std::uint64_t>() > static_cast<std::uint64_t>(std::numeric_limits<index_t>::max()))
    fail<InputError>("{}: field '{}' = {} is too large", path, key, v->dump());
  const auto x = v->get<index_t>();
  if (x < min) fail<InputError>("{}: field '{}' = {} must be at least {}", path, key, x, min);
  return x;
}

// A finite number (integer or floating point); absent or null gives `def`.
inline double get_number(const json& j, const std::string& path, const char* key, std::optional<double> def) {
  const json* v = find_field(j, key);
  if (!v) {
    if (!def) missing_field(path, key);
    return *def;
  }
  if (!v->is_number())
    fail<InputError>("{}: field '{}' must be a number, got {} {}", path, key, v->type_name(), v->dump());
  const double x = v->get<double>();
  if (!std::isfinite(x)) fail<InputError>("{}: field '{}' = {} is not finite", path, key, v->dump());
  return x;
}

inline bool get_bool(const json& j, const std::string& path, const char* key, std::optional<bool> def) {
  const json* v = find_field(j, key);
  if (!v) {
    if (!def) missing_field(path, key);
    return *def;
  }
  if (!v->is_boolean())
    fail<InputError>("{}: field '{}' must be true or false, got {} {}", path, key, v->type_name(), v->dump());
  return v->get<bool>();
}

inline std::optional<std::string> get_string(const json& j, const std::string& path, const char* key, bool required) {
  const json* v = find_field(j, key);
  if (!v) {
    if (required) missing_field(path, key);
    return std::nullopt;
  }
  if (!v->is_string())
    fail<InputError>("{}: field '{}' must be a string, got {} {}", path, key, v->type_name(), v->dump());
  return v->get<std::string>();
}

inline double positive(double x, const std::string& path, const char* key) {
  if (!(x > 0)) fail<InputError>("{}: field '{}' = {} must be positive", path, key, x);
  return x;
}

// Runs a config's validate(), naming the file in its message.
template <class Config>
void validate_config(const Config& c, const std::string& path) {
  try {
    c.validate();
  } catch (const InputError& e) {
    fail<InputError>("{}: {}", path, e.what());
  }
}

// Whether an optional setting is in effect: present and not null, false, 0,
// "" or an empty list or object.
inline bool is_set(const json& j, const char* key) {
  const json* v = find_field(j, key);
  if (!v) return false;
  if (v->is_boolean()) return v->get<bool>();
  if (v->is_number()) return v->get<double>() != 0;
  if (v->is_string() || v->is_array() || v->is_object()) return !v->empty();
  return true;
}

}  // namespace detail

}  // namespace entropy_probe::hf
