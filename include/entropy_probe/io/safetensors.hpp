// safetensors reader (memory-mapped, zero-copy views) and writer.
//
// Format: 8-byte little-endian header length N, N bytes of JSON header
// {"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
// {string: string}}, then the byte buffer the offsets index. The reader
// enforces every rule before anything is trusted: header size cap, valid
// JSON, known dtypes, shapes whose byte size equals the range, offsets inside
// the buffer, no overlaps and no holes, string metadata. Errors name the
// file, the key and the problem.
#pragma once

#include "entropy_probe/core/error.hpp"
#include "entropy_probe/tensor/tensor.hpp"

#include <Eigen/Core>
#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace entropy_probe::safetensors {

enum class Dtype { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL };

inline std::optional<Dtype> parse_dtype(const std::string& s) {
  static const std::map<std::string, Dtype> m{
      {"F64", Dtype::F64}, {"F32", Dtype::F32}, {"F16", Dtype::F16}, {"BF16", Dtype::BF16}, {"I64", Dtype::I64},
      {"I32", Dtype::I32}, {"I16", Dtype::I16}, {"I8", Dtype::I8},   {"U8", Dtype::U8},     {"BOOL", Dtype::BOOL}};
  auto it = m.find(s);
  return it == m.end() ? std::nullopt : std::optional<Dtype>(it->second);
}

inline const char* dtype_name(Dtype d) {
  switch (d) {
    case Dtype::F64:
      return "F64";
    case Dtype::F32:
      return "F32";
    case Dtype::F16:
      return "F16";
    case Dtype::BF16:
      return "BF16";
    case Dtype::I64:
      return "I64";
    case Dtype::I32:
      return "I32";
    case Dtype::I16:
      return "I16";
    case Dtype::I8:
      return "I8";
    case Dtype::U8:
      return "U8";
    case Dtype::BOOL:
      return "BOOL";
  }
  return "?";
}

inline std::size_t dtype_size(Dtype d) {
  switch (d) {
    case Dtype::F64:
    case Dtype::I64:
      return 8;
    case Dtype::F32:
    case Dtype::I32:
      return 4;
    case Dtype::F16:
    case Dtype::BF16:
    case Dtype::I16:
      return 2;
    case Dtype::I8:
    case Dtype::U8:
    case Dtype::BOOL:
      return 1;
  }
  return 0;
}

inline bool is_float(Dtype d) { return d == Dtype::F64 || d == Dtype::F32 || d == Dtype::F16 || d == Dtype::BF16; }

// The spec's cap on the JSON header (100 MB).
inline constexpr std::uint64_t kMaxHeaderSize = 100'000'000;

// One tensor of a file: a view into the mapped bytes.
struct TensorView {
  std::string name;
  Dtype dtype;
  Shape shape;
  std::span<const std::byte> bytes;

  index_t numel() const { return numel_of(shape); }

  // Element k as double, whatever the stored type (little-endian storage).
  double element(index_t k) const {
    switch (dtype) {
      case Dtype::F64:
        return load<double>(k);
      case Dtype::F32:
        return load<float>(k);
      case Dtype::F16:
        return static_cast<double>(Eigen::numext::bit_cast<Eigen::half>(load<std::uint16_t>(k)));
      case Dtype::BF16:
        return static_cast<double>(Eigen::numext::bit_cast<Eigen::bfloat16>(load<std::uint16_t>(k)));
      default:
        return static_cast<double>(integer(k));
    }
  }

  // Element k of an integer or BOOL tensor, exactly (a double would round
  // int64 beyond 2^53). A floating-point tensor is a usage error.
  std::int64_t integer(index_t k) const {
    switch (dtype) {
      case Dtype::I64:
        return load<std::int64_t>(k);
      case Dtype::I32:
        return load<std::int32_t>(k);
      case Dtype::I16:
        return load<std::int16_t>(k);
      case Dtype::I8:
        return load<std::int8_t>(k);
      case Dtype::U8:
        return load<std::uint8_t>(k);
      case Dtype::BOOL:
        return load<std::uint8_t>(k) != 0;
      default:
        break;
    }
    fail<UsageError>("tensor '{}': dtype {} is not an integer type", name, dtype_name(dtype));
  }

 private:
  template <class V>
  V load(index_t k) const {
    V v;
    std::memcpy(&v, bytes.data() + static_cast<std::size_t>(k) * dtype_size(dtype), sizeof v);
    return v;
  }

 public:
  // All elements converted to T (f16 and bf16 widen exactly; integers convert).
  template <class T>
  std::vector<T> to_vector() const {
    std::vector<T> out(static_cast<std::size_t>(numel()));
    if ((dtype == Dtype::F32 && std::is_same_v<T, float>) || (dtype == Dtype::F64 && std::is_same_v<T, double>)) {
      if (!out.empty()) std::memcpy(out.data(), bytes.data(), bytes.size());  // zero conversion
      return out;
    }
    for (index_t k = 0; k < numel(); ++k) out[static_cast<std::size_t>(k)] = static_cast<T>(element(k));
    return out;
  }
};

namespace detail {
// The file's bytes: memory-mapped when possible, or owned (for in-memory parsing).
class Bytes {
 public:
  static std::shared_ptr<Bytes> map_file(const std::string& path) {
    auto b = std::shared_ptr<Bytes>(new Bytes);
    const int fd = ::open(path.c_str(), O_RDONLY);
    if (fd < 0) fail<InputError>("{}: cannot open: {}", path, std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      ::close(fd);
      fail<InputError>("{}: cannot stat: {}", path, std::strerror(errno));
    }
    b->size_ = static_cast<std::size_t>(st.st_size);
    if (b->size_ > 0) {
      void* p = ::mmap(nullptr, b->size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        ::close(fd);
        fail<InputError>("{}: cannot map: {}", path, std::strerror(errno));
      }
      b->map_ = p;
      b->data_ = static_cast<const std::byte*>(p);
    }
    ::close(fd);
    return b;
  }
  static std::shared_ptr<Bytes> own(std::vector<std::byte> v) {
    auto b = std::shared_ptr<Bytes>(new Bytes);
    b->owned_ = std::move(v);
    b->data_ = b->owned_.data();
    b->size_ = b->owned_.size();
    return b;
  }
  ~Bytes() {
    if (map_) ::munmap(map_, size_);
  }
  Bytes(const Bytes&) = delete;
  Bytes& operator=(const Bytes&) = delete;
  const std::byte* data() const { return data_; }
  std::size_t size() const { return size_; }

 private:
  Bytes() = default;
  void* map_ = nullptr;
  std::vector<std::byte> owned_;
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};
}  // namespace detail

// A parsed safetensors file; views stay valid while the File lives.
class File {
 public:
  static File open(const std::string& path) { return File(path, detail::Bytes::map_file(path)); }
  // Parses bytes already in memory (`label` names them in errors).
  static File parse(std::vector<std::byte> bytes, const std::string& label) {
    return File(label, detail::Bytes::own(std::move(bytes)));
  }

  const std::string& path() const { return path_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::vector<TensorView>& tensors() const { return tensors_; }
  bool contains(const std::string& name) const { return index_.count(name) > 0; }
  const TensorView* find(const std::string& name) const {
    auto it = index_.find(name);
    return it == index_.end() ? nullptr : &tensors_[it->second];
  }
  const TensorView& at(const std::string& name) const {
    if (const TensorView* t = find(name)) return *t;
    fail<InputError>("{}: missing tensor '{}'", path_, name);
  }

  // The tensor `name` as Tensor<T, B>, checking its shape when `expected` is given.
  template <class T, class B = CpuBackend>
  Tensor<T, B> tensor(const std::string& name, const std::optional<Shape>& expected = std::nullopt) const {
    const TensorView& v = at(name);
    if (expected && v.shape != *expected)
      fail<InputError>("{}: tensor '{}' has shape {}, expected {}", path_, name, shape_str(v.shape),
                       shape_str(*expected));
    if (!is_float(v.dtype) && !std::is_integral_v<T>)
      fail<InputError>("{}: tensor '{}' has dtype {}, expected a floating-point type", path_, name,
                       dtype_name(v.dtype));
    return Tensor<T, B>::from_host(v.shape, v.to_vector<T>());
  }

 private:
  File(std::string path, std::shared_ptr<detail::Bytes> bytes) : path_(std::move(path)), bytes_(std::move(bytes)) {
    parse_header();
  }

  void parse_header() {
    const std::size_t size = bytes_->size();
    if (size < 8) fail<InputError>("{}: truncated: {} bytes, shorter than the 8-byte header length", path_, size);
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<std::uint8_t>(bytes_->data()[i]);
    if (n > kMaxHeaderSize) fail<InputError>("{}: header length {} exceeds the limit {}", path_, n, kMaxHeaderSize);
    if (n > size - 8) fail<InputError>("{}: header length {} runs past the end of the file ({} bytes)", path_, n, size);
    const char* h = reinterpret_cast<const char*>(bytes_->data() + 8);
    nlohmann::json header;
    try {
      header = nlohmann::json::parse(h, h + n);
    } catch (const nlohmann::json::exception& e) {
      fail<InputError>("{}: header is not valid JSON: {}", path_, e.what());
    }
    if (!header.is_object()) fail<InputError>("{}: header is not a JSON object", path_);
    const std::size_t data_start = 8 + static_cast<std::size_t>(n);
    const std::size_t data_size = size - data_start;
    struct Range {
      std::uint64_t begin, end;
      std::string name;
    };
    std::vector<Range> ranges;
    for (auto it = header.begin(); it != header.end(); ++it) {
      const std::string& key = it.key();
      const auto& v = it.value();
      if (key == "__metadata__") {
        if (!v.is_object()) fail<InputError>("{}: __metadata__ is not an object", path_);
        for (auto m = v.begin(); m != v.end(); ++m) {
          if (!m.value().is_string()) fail<InputError>("{}: __metadata__ key '{}' is not a string", path_, m.key());
          metadata_[m.key()] = m.value().get<std::string>();
        }
        continue;
      }
      if (!v.is_object()) fail<InputError>("{}: tensor '{}': entry is not an object", path_, key);
      if (!v.contains("dtype") || !v["dtype"].is_string())
        fail<InputError>("{}: tensor '{}': missing string field 'dtype'", path_, key);
      const auto dt = parse_dtype(v["dtype"].get<std::string>());
      if (!dt) fail<InputError>("{}: tensor '{}': unknown dtype '{}'", path_, key, v["dtype"].get<std::string>());
      if (!v.contains("shape") || !v["shape"].is_array())
        fail<InputError>("{}: tensor '{}': missing array field 'shape'", path_, key);
      Shape shape;
      std::uint64_t numel = 1;
      for (const auto& d : v["shape"]) {
        if (!d.is_number_unsigned())
          fail<InputError>("{}: tensor '{}': shape entry {} is not a count", path_, key, d.dump());
        const std::uint64_t x = d.get<std::uint64_t>();
        if (x > (1ull << 40) || (x > 0 && numel > (1ull << 60) / x))  // numel * 8 bytes stays below 2^63
          fail<InputError>("{}: tensor '{}': shape {} is too large", path_, key, v["shape"].dump());
        numel *= x;
        shape.push_back(static_cast<index_t>(x));
      }
      if (!v.contains("data_offsets") || !v["data_offsets"].is_array() || v["data_offsets"].size() != 2 ||
          !v["data_offsets"][0].is_number_unsigned() || !v["data_offsets"][1].is_number_unsigned())
        fail<InputError>("{}: tensor '{}': data_offsets must be [begin, end] with non-negative integers", path_, key);
      const auto b = v["data_offsets"][0].get<std::uint64_t>(), e = v["data_offsets"][1].get<std::uint64_t>();
      if (b > e || e > data_size)
        fail<InputError>("{}: tensor '{}': data_offsets [{}, {}] outside the data buffer of {} bytes", path_, key, b, e,
                         data_size);
      if (e - b != numel * dtype_size(*dt))
        fail<InputError>("{}: tensor '{}': shape {} of {} needs {} bytes, data_offsets give {}", path_, key,
                         v["shape"].dump(), dtype_name(*dt), numel * dtype_size(*dt), e - b);
      ranges.push_back({b, e, key});
      tensors_.push_back(
          TensorView{key, *dt, std::move(shape), std::span<const std::byte>(bytes_->data() + data_start + b, e - b)});
    }
    std::sort(ranges.begin(), ranges.end(), [](const Range& x, const Range& y) { return x.begin < y.begin; });
    std::uint64_t expect = 0;
    for (const Range& r : ranges) {
      if (r.begin < expect)
        fail<InputError>("{}: tensor '{}': data_offsets [{}, {}] overlap the previous tensor", path_, r.name, r.begin,
                         r.end);
      if (r.begin > expect)
        fail<InputError>("{}: tensor '{}': a hole of {} bytes precedes its data (offset {})", path_, r.name,
                         r.begin - expect, r.begin);
      expect = r.end;
    }
    if (expect != data_size)
      fail<InputError>("{}: the data buffer has {} bytes but the tensors cover {}", path_, data_size, expect);
    for (std::size_t i = 0; i < tensors_.size(); ++i) index_[tensors_[i].name] = i;
  }

  std::string path_;
  std::shared_ptr<detail::Bytes> bytes_;
  std::map<std::string, std::string> metadata_;
  std::vector<TensorView> tensors_;
  std::map<std::string, std::size_t> index_;
};

// A tensor to write: dtype, shape and the raw little-endian bytes.
struct OutTensor {
  Dtype dtype;
  Shape shape;
  std::vector<std::byte> bytes;
};

template <class T>
OutTensor make_out(const Shape& shape, std::span<const T> values) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, std::int32_t> ||
                    std::is_same_v<T, std::int64_t> || std::is_same_v<T, std::uint8_t>,
                "make_out: unsupported element type");
  OutTensor o;
  o.dtype = std::is_same_v<T, float>          ? Dtype::F32
            : std::is_same_v<T, double>       ? Dtype::F64
            : std::is_same_v<T, std::int32_t> ? Dtype::I32
            : std::is_same_v<T, std::int64_t> ? Dtype::I64
                                              : Dtype::U8;
  o.shape = shape;
  if (numel_of(shape) != static_cast<index_t>(values.size()))
    fail<UsageError>("safetensors::make_out: {} values for shape {}", values.size(), shape_str(shape));
  o.bytes.resize(values.size() * sizeof(T));
  if (!values.empty()) std::memcpy(o.bytes.data(), values.data(), o.bytes.size());
  return o;
}

// The file's bytes: tensors laid out in name order, header padded with spaces
// to a multiple of 8 bytes (as the reference implementation does).
inline std::vector<std::byte> serialize(const std::map<std::string, OutTensor>& tensors,
                                        const std::map<std::string, std::string>& metadata = {}) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    if (name == "__metadata__") fail<UsageError>("safetensors: '__metadata__' is not a tensor name");
    if (t.bytes.size() != static_cast<std::size_t>(numel_of(t.shape)) * dtype_size(t.dtype))
      fail<UsageError>("safetensors: tensor '{}' has {} bytes for shape {} of {}", name, t.bytes.size(),
                       shape_str(t.shape), dtype_name(t.dtype));
    header[name] = {
        {"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.bytes.size()}}};
    offset += t.bytes.size();
  }
  std::string h = header.dump();
  while (h.size() % 8 != 0) h.push_back(' ');
  std::vector<std::byte> out(8 + h.size());
  std::uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<std::byte>((n >> (8 * i)) & 0xff);
  std::memcpy(out.data() + 8, h.data(), h.size());
  for (const auto& [name, t] : tensors) out.insert(out.end(), t.bytes.begin(), t.bytes.end());
  return out;
}

inline void write_file(const std::string& path, const std::map<std::string, OutTensor>& tensors,
                       const std::map<std::string, std::string>& metadata = {}) {
  const std::vector<std::byte> bytes = serialize(tensors, metadata);
  std::ofstream out(path, std::ios::binary);
  if (!out) fail<InputError>("{}: cannot open for writing", path);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  if (!out) fail<InputError>("{}: write failed", path);
}

}  // namespace entropy_probe::safetensors
