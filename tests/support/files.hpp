// What the tests that read and write files share: a temporary directory that
// removes itself, a JSON file's contents, and the check that an expression
// throws an InputError whose message matches.
#pragma once

#include <entropy_probe/core/error.hpp>

#include <fmt/format.h>
#include <unistd.h>
#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <string>
#include <system_error>

// The exception type and the message, in one check.
#define CHECK_INPUT_ERROR(expr, matcher)                \
  do {                                                  \
    CHECK_THROWS_AS(expr, ::entropy_probe::InputError); \
    CHECK_THROWS_WITH(expr, matcher);                   \
  } while (0)

namespace ep_test {

// A fresh, empty directory under the system's temporary directory, unique
// to this process and object, removed with everything in it at the end.
struct TempDir {
  std::filesystem::path path;
  TempDir() {
    static int counter = 0;
    path = std::filesystem::temp_directory_path() / fmt::format("ep_test_{}_{}", ::getpid(), counter++);
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string str() const { return path.string(); }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

// The JSON document in the file at `path`.
inline nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

}  // namespace ep_test
