// The safetensors reader and writer (io/safetensors.hpp): a round trip for
// every dtype (through memory and through a file on disk), metadata, and
// every malformed input with the message it must give (docs/checkpoints.md:
// a bad file is a clear error naming the file, key and problem, never a
// crash or a silent default).
#include "../fuzz/fuzz_safetensors.hpp"
#include "../fuzz/seeds.hpp"
#include "../support/files.hpp"

#include <entropy_probe/io/safetensors.hpp>

#include <catch2/catch.hpp>

#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <string>
#include <vector>

using namespace entropy_probe;
using namespace entropy_probe::safetensors;
using Catch::Contains;

namespace {

const std::string kLabel = "mem.safetensors";

// 8-byte little-endian length, the header text as given (no padding), data.
std::vector<std::byte> raw_file(const std::string& header, std::size_t data_bytes = 0, std::uint64_t length = 0,
                                bool explicit_length = false) {
  const std::uint64_t n = explicit_length ? length : header.size();
  std::vector<std::byte> out(8);
  for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<std::byte>((n >> (8 * i)) & 0xff);
  for (char c : header) out.push_back(static_cast<std::byte>(c));
  out.resize(out.size() + data_bytes, std::byte{0x11});
  return out;
}

File parse(std::vector<std::byte> bytes) { return File::parse(std::move(bytes), kLabel); }

template <class T>
std::vector<std::byte> bytes_of(const std::vector<T>& v) {
  std::vector<std::byte> b(v.size() * sizeof(T));
  if (!v.empty()) std::memcpy(b.data(), v.data(), b.size());
  return b;
}

std::vector<std::byte> half_bytes(const std::vector<float>& v, bool bf16) {
  std::vector<std::uint16_t> bits;
  for (float x : v)
    bits.push_back(bf16 ? Eigen::numext::bit_cast<std::uint16_t>(Eigen::bfloat16(x))
                        : Eigen::numext::bit_cast<std::uint16_t>(Eigen::half(x)));
  return bytes_of(bits);
}

struct Case {
  Dtype dtype;
  Shape shape;
  std::vector<std::byte> bytes;
  std::vector<double> expect;  // element(k) of each element
};

// One tensor of every dtype, with extreme and negative values where the type has them.
std::map<std::string, Case> every_dtype() {
  std::map<std::string, Case> c;
  const std::vector<double> f64{1.5, -2.25, 1e300, -0.0, std::numeric_limits<double>::denorm_min(), 42};
  c["f64"] = {Dtype::F64, {2, 3}, bytes_of(f64), f64};
  const std::vector<float> f32{1.5f, -2.25f, 3.4e38f, 1e-45f};
  c["f32"] = {Dtype::F32, {4}, bytes_of(f32), {1.5, -2.25, double(3.4e38f), double(1e-45f)}};
  const std::vector<float> f16{1.0f, -2.5f, 65504.0f, 6.103515625e-05f, 0.0999755859375f, -0.0f};
  c["f16"] = {Dtype::F16, {3, 2}, half_bytes(f16, false), {1.0, -2.5, 65504.0, 6.103515625e-05, 0.0999755859375, 0.0}};
  const std::vector<float> bf16{1.0f, -2.5f, 3.3895313892515355e38f, 0.1015625f};
  c["bf16"] = {Dtype::BF16, {2, 2}, half_bytes(bf16, true), {1.0, -2.5, 3.3895313892515355e38, 0.1015625}};
  const std::vector<std::int64_t> i64{std::numeric_limits<std::int64_t>::min(), -1, std::int64_t{1} << 40, 7};
  c["i64"] = {Dtype::I64, {4}, bytes_of(i64), {-9223372036854775808.0, -1, 1099511627776.0, 7}};
  const std::vector<std::int32_t> i32{std::numeric_limits<std::int32_t>::min(),
                                      std::numeric_limits<std::int32_t>::max(), 0};
  c["i32"] = {Dtype::I32, {1, 3}, bytes_of(i32), {-2147483648.0, 2147483647.0, 0}};
  const std::vector<std::int16_t> i16{-32768, 32767, -5};
  c["i16"] = {Dtype::I16, {3}, bytes_of(i16), {-32768, 32767, -5}};
  const std::vector<std::int8_t> i8{-128, 127, 0, -1};
  c["i8"] = {Dtype::I8, {2, 2}, bytes_of(i8), {-128, 127, 0, -1}};
  const std::vector<std::uint8_t> u8{0, 255, 128};
  c["u8"] = {Dtype::U8, {3}, bytes_of(u8), {0, 255, 128}};
  const std::vector<std::uint8_t> b{0, 1, 1, 0};
  c["bool"] = {Dtype::BOOL, {4}, bytes_of(b), {0, 1, 1, 0}};
  c["scalar"] = {Dtype::F64, {}, bytes_of(std::vector<double>{3.25}), {3.25}};
  c["empty"] = {Dtype::F32, {0, 5}, {}, {}};
  return c;
}

void check_round_trip(const File& f, const std::map<std::string, Case>& cases) {
  REQUIRE(f.tensors().size() == cases.size());
  for (const auto& [name, c] : cases) {
    INFO("tensor " << name);
    REQUIRE(f.contains(name));
    const safetensors::TensorView& v = f.at(name);
    CHECK(v.name == name);
    CHECK(v.dtype == c.dtype);
    CHECK(v.shape == c.shape);
    CHECK(v.numel() == static_cast<index_t>(c.expect.size()));
    CHECK(v.bytes.size() == c.bytes.size());
    CHECK(std::equal(v.bytes.begin(), v.bytes.end(), c.bytes.begin()));
    for (std::size_t k = 0; k < c.expect.size(); ++k) CHECK(v.element(static_cast<index_t>(k)) == c.expect[k]);
    CHECK(v.to_vector<double>() == c.expect);
    if (is_float(c.dtype)) {
      const auto t = f.tensor<double>(name, c.shape);
      CHECK(t.shape() == c.shape);
      CHECK(t.to_host() == c.expect);
    }
  }
}

struct TempFile {
  std::string path;
  TempFile() {
    static int counter = 0;
    path = (std::filesystem::temp_directory_path() / fmt::format("ep_test_safetensors_{}_{}", ::getpid(), counter++))
               .string();
  }
  ~TempFile() { std::filesystem::remove(path); }
};

// A file with tensors a (F32 [2], 8 bytes) and b (F32 [2], 8 bytes) at the given offsets.
std::string two_tensors(const std::string& a_offsets, const std::string& b_offsets) {
  return R"({"a":{"dtype":"F32","shape":[2],"data_offsets":)" + a_offsets +
         R"(},"b":{"dtype":"F32","shape":[2],"data_offsets":)" + b_offsets + "}}";
}

}  // namespace

TEST_CASE("safetensors: round trip of every dtype, in memory and on disk", "[io][safetensors]") {
  const auto cases = every_dtype();
  std::map<std::string, OutTensor> out;
  for (const auto& [name, c] : cases) out.emplace(name, OutTensor{c.dtype, c.shape, c.bytes});
  const std::map<std::string, std::string> meta{{"format", "pt"}, {"lr", "0.001"}, {"empty", ""}};

  const std::vector<std::byte> bytes = serialize(out, meta);
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<std::uint8_t>(bytes[static_cast<std::size_t>(i)]);
  CHECK(n % 8 == 0);  // the header is padded, so the data starts 8-byte aligned
  {
    const File f = parse(bytes);
    CHECK(f.path() == kLabel);
    CHECK(f.metadata() == meta);
    check_round_trip(f, cases);
  }
  TempFile tmp;
  write_file(tmp.path, out, meta);
  const File g = File::open(tmp.path);
  CHECK(g.path() == tmp.path);
  CHECK(g.metadata() == meta);
  check_round_trip(g, cases);
}

TEST_CASE("safetensors: make_out for the element types it supports", "[io][safetensors]") {
  const std::vector<float> f{1, 2, 3, 4, 5, 6};
  const std::vector<double> d{0.5};
  const std::vector<std::int32_t> i32{-7, 8};
  const std::vector<std::int64_t> i64{std::int64_t{1} << 50};
  const std::vector<std::uint8_t> u8{9};
  std::map<std::string, OutTensor> out;
  out.emplace("f", make_out<float>({2, 3}, std::span<const float>(f)));
  out.emplace("d", make_out<double>({}, std::span<const double>(d)));
  out.emplace("i32", make_out<std::int32_t>({2}, std::span<const std::int32_t>(i32)));
  out.emplace("i64", make_out<std::int64_t>({1, 1}, std::span<const std::int64_t>(i64)));
  out.emplace("u8", make_out<std::uint8_t>({1}, std::span<const std::uint8_t>(u8)));
  const File file = parse(serialize(out));
  CHECK(file.at("f").dtype == Dtype::F32);
  CHECK(file.tensor<float>("f", Shape{2, 3}).to_host() == f);
  CHECK(file.at("d").dtype == Dtype::F64);
  CHECK(file.at("d").shape.empty());
  CHECK(file.at("d").element(0) == 0.5);
  CHECK(file.at("i32").dtype == Dtype::I32);
  CHECK(file.at("i32").to_vector<std::int32_t>() == i32);
  CHECK(file.at("i64").dtype == Dtype::I64);
  CHECK(file.at("i64").element(0) == double(std::int64_t{1} << 50));
  CHECK(file.at("u8").dtype == Dtype::U8);
  CHECK(file.metadata().empty());
  CHECK_THROWS_AS(make_out<float>({4}, std::span<const float>(f)), UsageError);
}

TEST_CASE("safetensors: tensor<T>() checks the expected shape and refuses integers as floats", "[io][safetensors]") {
  const std::vector<float> f{1, 2, 3};
  const std::vector<std::int32_t> i{1, 2};
  std::map<std::string, OutTensor> out;
  out.emplace("w", make_out<float>({3}, std::span<const float>(f)));
  out.emplace("ids", make_out<std::int32_t>({2}, std::span<const std::int32_t>(i)));
  const File file = parse(serialize(out));
  CHECK(file.tensor<double>("w").to_host() == std::vector<double>{1, 2, 3});
  CHECK_INPUT_ERROR(file.tensor<double>("w", Shape{1, 3}),
                    Contains(kLabel) && Contains("'w'") && Contains("shape [3], expected [1, 3]"));
  CHECK_INPUT_ERROR(file.tensor<float>("ids"),
                    Contains("'ids'") && Contains("dtype I32") && Contains("floating-point"));
  CHECK(file.tensor<std::int32_t>("ids").to_host() == i);
}

TEST_CASE("safetensors: truncated files", "[io][safetensors][errors]") {
  CHECK_INPUT_ERROR(parse({}), Contains(kLabel) && Contains("truncated: 0 bytes"));
  CHECK_INPUT_ERROR(parse(std::vector<std::byte>(7)), Contains("truncated: 7 bytes, shorter than the 8-byte header"));
  // A valid file cut inside its header.
  std::map<std::string, OutTensor> out;
  const std::vector<float> f{1, 2};
  out.emplace("x", make_out<float>({2}, std::span<const float>(f)));
  std::vector<std::byte> bytes = serialize(out);
  bytes.resize(20);
  CHECK_INPUT_ERROR(parse(bytes), Contains(kLabel) && Contains("runs past the end of the file (20 bytes)"));
  // ... and cut inside its data.
  std::vector<std::byte> cut = serialize(out);
  cut.pop_back();
  CHECK_INPUT_ERROR(parse(cut), Contains("'x'") && Contains("outside the data buffer of 7 bytes"));
  // An empty file on disk goes through the mmap path.
  TempFile tmp;
  { std::ofstream(tmp.path, std::ios::binary); }
  CHECK_INPUT_ERROR(File::open(tmp.path), Contains(tmp.path) && Contains("truncated: 0 bytes"));
}

TEST_CASE("safetensors: header length past the end and over the cap", "[io][safetensors][errors]") {
  CHECK_INPUT_ERROR(parse(raw_file("{}", 0, 100, true)),
                    Contains("header length 100 runs past the end of the file (10 bytes)"));
  CHECK_INPUT_ERROR(parse(raw_file("{}", 0, kMaxHeaderSize + 1, true)),
                    Contains(kLabel) && Contains("header length 100000001 exceeds the limit 100000000"));
  CHECK_INPUT_ERROR(parse(raw_file("{}", 0, std::numeric_limits<std::uint64_t>::max(), true)),
                    Contains("exceeds the limit"));
}

TEST_CASE("safetensors: the header must be a JSON object", "[io][safetensors][errors]") {
  CHECK_INPUT_ERROR(parse(raw_file("{\"a\": ")), Contains(kLabel) && Contains("header is not valid JSON"));
  CHECK_INPUT_ERROR(parse(raw_file("not json at all")), Contains("header is not valid JSON"));
  CHECK_INPUT_ERROR(parse(raw_file("[1, 2, 3]")), Contains(kLabel) && Contains("header is not a JSON object"));
  CHECK_INPUT_ERROR(parse(raw_file("\"text\"")), Contains("header is not a JSON object"));
  // An empty object is a valid file with no tensors; trailing spaces are padding.
  const File f = parse(raw_file("{}      "));
  CHECK(f.tensors().empty());
}

TEST_CASE("safetensors: malformed tensor entries", "[io][safetensors][errors]") {
  CHECK_INPUT_ERROR(parse(raw_file(R"({"x": [1]})")), Contains("tensor 'x': entry is not an object"));
  CHECK_INPUT_ERROR(parse(raw_file(R"({"x": {"shape": [1], "data_offsets": [0, 4]}})", 4)),
                    Contains("tensor 'x': missing string field 'dtype'"));
  CHECK_INPUT_ERROR(parse(raw_file(R"({"x": {"dtype": "F8", "shape": [1], "data_offsets": [0, 1]}})", 1)),
                    Contains(kLabel) && Contains("tensor 'x': unknown dtype 'F8'"));
  CHECK_INPUT_ERROR(parse(raw_file(R"({"x": {"dtype": "f32", "shape": [1], "data_offsets": [0, 4]}})", 4)),
                    Contains("unknown dtype 'f32'"));
  CHECK_INPUT_ERROR(parse(raw_file(R"({"x": {"dtype": "F32", "data_offsets": [0, 4]}})", 4)),
                    Contains("tensor 'x': missing array field 'shape'"));
  CHECK_INPUT_ERROR(parse(raw_file(R"({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", 4)),
                    Contains("tensor 'x': shape entry -1 is not a count"));
  CHECK_INPUT_ERROR(parse(raw_file(R"({"x": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}})", 4)),
                    Contains("shape entry 1.5 is not a count"));
  CHECK_INPUT_ERROR(parse(raw_file(R"({"x": {"dtype": "F32", "shape": [1099511627777], "data_offsets": [0, 4]}})", 4)),
                    Contains("tensor 'x': shape [1099511627777] is too large"));
  CHECK_INPUT_ERROR(parse(raw_file(R"({"x": {"dtype": "F32", "shape": [1]}})", 4)),
                    Contains("tensor 'x': data_offsets must be [begin, end]"));
  CHECK_INPUT_ERROR(parse(raw_file(R"({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0]}})", 4)),
                    Contains("data_offsets must be [begin, end]"));
  CHECK_INPUT_ERROR(parse(raw_file(R"({"x": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}})", 4)),
                    Contains("data_offsets must be [begin, end] with non-negative integers"));
}

TEST_CASE("safetensors: a shape that disagrees with its bytes", "[io][safetensors][errors]") {
  CHECK_INPUT_ERROR(
      parse(raw_file(R"({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}})", 12)),
      Contains(kLabel) && Contains("tensor 'w': shape [2,2] of F32 needs 16 bytes, data_offsets give 12"));
  CHECK_INPUT_ERROR(parse(raw_file(R"({"w": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 4]}})", 4)),
                    Contains("shape [3] of BF16 needs 6 bytes, data_offsets give 4"));
  CHECK_INPUT_ERROR(parse(raw_file(R"({"w": {"dtype": "F64", "shape": [], "data_offsets": [0, 0]}})", 0)),
                    Contains("shape [] of F64 needs 8 bytes, data_offsets give 0"));
}

// Found by reading the parser for the fuzz target: numel used to be capped at 2^62,
// but numel * dtype size is computed in 64 bits, so [2^31, 2^31] of F64 needs
// 2^65 bytes, which wraps to 0 and matches data_offsets [0, 0]. The view then
// claims 2^62 elements over zero bytes (element() reads out of bounds).
TEST_CASE("safetensors: a shape whose byte size overflows 64 bits", "[io][safetensors][errors]") {
  CHECK_INPUT_ERROR(
      parse(raw_file(R"({"w": {"dtype": "F64", "shape": [2147483648, 2147483648], "data_offsets": [0, 0]}})")),
      Contains("'w'"));
  CHECK_INPUT_ERROR(
      parse(raw_file(R"({"w": {"dtype": "F32", "shape": [1099511627776, 4194304], "data_offsets": [0, 0]}})")),
      Contains("'w'"));
}

TEST_CASE("safetensors: offsets out of range, overlapping, with holes or uncovered bytes",
          "[io][safetensors][errors]") {
  CHECK_INPUT_ERROR(
      parse(raw_file(R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", 8)),
      Contains(kLabel) && Contains("tensor 'w': data_offsets [0, 16] outside the data buffer of 8 bytes"));
  CHECK_INPUT_ERROR(parse(raw_file(R"({"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}})", 8)),
                    Contains("data_offsets [8, 4] outside the data buffer"));
  CHECK_INPUT_ERROR(parse(raw_file(two_tensors("[0, 8]", "[4, 12]"), 12)),
                    Contains(kLabel) && Contains("tensor 'b': data_offsets [4, 12] overlap the previous tensor"));
  CHECK_INPUT_ERROR(parse(raw_file(two_tensors("[0, 8]", "[0, 8]"), 8)), Contains("overlap the previous tensor"));
  CHECK_INPUT_ERROR(parse(raw_file(two_tensors("[0, 8]", "[12, 20]"), 20)),
                    Contains(kLabel) && Contains("tensor 'b': a hole of 4 bytes precedes its data (offset 12)"));
  CHECK_INPUT_ERROR(parse(raw_file(two_tensors("[4, 12]", "[12, 20]"), 20)),
                    Contains("tensor 'a': a hole of 4 bytes precedes its data (offset 4)"));
  CHECK_INPUT_ERROR(parse(raw_file(two_tensors("[0, 8]", "[8, 16]"), 20)),
                    Contains(kLabel) && Contains("the data buffer has 20 bytes but the tensors cover 16"));
  // Out of order in the header, contiguous in the buffer: fine.
  const File f = parse(raw_file(two_tensors("[8, 16]", "[0, 8]"), 16));
  CHECK(f.at("a").bytes.data() == f.at("b").bytes.data() + 8);
}

TEST_CASE("safetensors: metadata must map strings to strings", "[io][safetensors][errors]") {
  CHECK_INPUT_ERROR(parse(raw_file(R"({"__metadata__": {"lr": 0.001}})")),
                    Contains(kLabel) && Contains("__metadata__ key 'lr' is not a string"));
  CHECK_INPUT_ERROR(parse(raw_file(R"({"__metadata__": {"a": "x", "b": null}})")),
                    Contains("__metadata__ key 'b' is not a string"));
  CHECK_INPUT_ERROR(parse(raw_file(R"({"__metadata__": ["lr", "0.1"]})")), Contains("__metadata__ is not an object"));
  const File f = parse(raw_file(R"({"__metadata__": {"lr": "0.001", "format": "pt"}})"));
  CHECK(f.metadata().at("lr") == "0.001");
  CHECK(f.tensors().empty());
  std::map<std::string, OutTensor> bad;
  bad.emplace("__metadata__", OutTensor{Dtype::U8, {1}, {std::byte{1}}});
  CHECK_THROWS_AS(serialize(bad), UsageError);
}

TEST_CASE("safetensors: a missing tensor and a missing file", "[io][safetensors][errors]") {
  const std::vector<float> f{1};
  std::map<std::string, OutTensor> out;
  out.emplace("present", make_out<float>({1}, std::span<const float>(f)));
  const File file = parse(serialize(out));
  CHECK(file.find("absent") == nullptr);
  CHECK_FALSE(file.contains("absent"));
  CHECK_INPUT_ERROR(file.at("absent"), Contains(kLabel) && Contains("missing tensor 'absent'"));
  CHECK_INPUT_ERROR(file.tensor<float>("absent"), Contains("missing tensor 'absent'"));
  const std::string nowhere = "/nonexistent/dir/model.safetensors";
  CHECK_INPUT_ERROR(File::open(nowhere), Contains(nowhere) && Contains("cannot open"));
}

namespace {

// The fuzz target's body (tests/fuzz) over the seed corpus, every truncation
// and many single-byte changes of it, and crafted headers: a quick,
// deterministic share of what scripts/fuzz does with libFuzzer.
ep_fuzz::Outcome run_one(const std::vector<std::byte>& b) {
  return ep_fuzz::parse_checked(reinterpret_cast<const std::uint8_t*>(b.data()), b.size());
}
}  // namespace

TEST_CASE("safetensors: fuzz replay: seeds parse, and their truncations and byte changes fail cleanly",
          "[io][safetensors][fuzz]") {
  const auto seeds = ep_fuzz::seed_files();
  REQUIRE(seeds.size() >= 3);
  std::size_t inputs = 0;
  for (const auto& [name, bytes] : seeds) {
    INFO("seed " << name);
    CHECK_NOTHROW(entropy_probe::safetensors::File::parse(bytes, name));
    CHECK(run_one(bytes).parsed);
    // A file cut short loses header or data bytes its header accounts for.
    std::size_t refused = 0;
    for (std::size_t n = 0; n < bytes.size(); ++n, ++inputs)
      refused += !run_one(std::vector<std::byte>(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(n))).parsed;
    CHECK(refused == bytes.size());
    for (std::size_t i = 0; i < bytes.size(); ++i)
      for (std::uint8_t x : {std::uint8_t{0x00}, std::uint8_t{0xff}, std::uint8_t{'9'}, std::uint8_t{'"'},
                             std::uint8_t{'['}, std::uint8_t{'-'}}) {
        std::vector<std::byte> m = bytes;
        m[i] = static_cast<std::byte>(x);
        run_one(m);
        ++inputs;
      }
  }
  CHECK(inputs > 1000);
}

TEST_CASE("safetensors: fuzz replay: crafted headers", "[io][safetensors][fuzz]") {
  // Each header over 4 data bytes, and what the parser must make of it: the
  // tensor count it parses to, or the InputError it must name.
  struct Case {
    std::string header;
    std::size_t tensors;  // when parsed
    std::string error;    // empty: must parse
  };
  const std::vector<Case> cases{
      {"{}", 0, "the data buffer has 4 bytes but the tensors cover 0"},
      {"[]", 0, "header is not a JSON object"},
      {"null", 0, "header is not a JSON object"},
      {"{\"__metadata__\":{}}", 0, "the data buffer has 4 bytes but the tensors cover 0"},
      {"{\"x\":{}}", 0, "tensor 'x': missing string field 'dtype'"},
      {R"({"x":{"dtype":"F32","shape":[],"data_offsets":[0,4]}})", 1, ""},
      {R"({"x":{"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,4]}})", 0,
       "tensor 'x': shape [18446744073709551615] is too large"},
      {R"({"x":{"dtype":"F32","shape":[1099511627776,1099511627776],"data_offsets":[0,4]}})", 0,
       "tensor 'x': shape [1099511627776,1099511627776] is too large"},
      {R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[18446744073709551615,4]}})", 0,
       "data_offsets [18446744073709551615, 4] outside the data buffer of 4 bytes"},
      {R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,18446744073709551615]}})", 0,
       "data_offsets [0, 18446744073709551615] outside the data buffer of 4 bytes"},
      {R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}})", 0,
       "data_offsets must be [begin, end] with non-negative integers"},
      {R"({"x":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"y":{"dtype":"U8","shape":[0],"data_offsets":[4,4]}})",
       2, ""},
      {R"({"x":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"y":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}})",
       0, "the data buffer has 4 bytes but the tensors cover 0"},
      {std::string(5000, '[') + std::string(5000, ']'), 0, "header is not a JSON object"}};
  for (const auto& c : cases) {
    INFO(c.header.substr(0, 120));
    const std::vector<std::byte> b = ep_fuzz::raw(c.header, 4);
    const ep_fuzz::Outcome got = ep_fuzz::parse_checked(reinterpret_cast<const std::uint8_t*>(b.data()), b.size());
    if (c.error.empty()) {
      CHECK(got.parsed);
      CHECK(got.error == "");
      CHECK(got.tensors == c.tensors);
    } else {
      CHECK_FALSE(got.parsed);
      CHECK_THAT(got.error, Contains(c.error));
    }
  }
}
