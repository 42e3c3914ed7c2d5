// Token batch files (load_batch / save_batch, docs/checkpoints.md).
#pragma once

#include "entropy_probe/core/error.hpp"
#include "entropy_probe/core/log.hpp"
#include "entropy_probe/data/batch.hpp"
#include "entropy_probe/io/safetensors.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <set>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace entropy_probe::hf {

namespace detail {

inline bool is_int_dtype(safetensors::Dtype d) {
  using safetensors::Dtype;
  return d == Dtype::I64 || d == Dtype::I32 || d == Dtype::I16 || d == Dtype::I8 || d == Dtype::U8;
}

// "[b,g,t]" for flat index k of `shape`.
inline std::string index_str(const Shape& shape, index_t k) {
  std::vector<index_t> idx(shape.size());
  for (std::size_t d = shape.size(); d-- > 0;) {
    const index_t n = std::max<index_t>(shape[d], 1);
    idx[d] = k % n;
    k /= n;
  }
  return fmt::format("[{}]", fmt::join(idx, ","));
}

class BatchReader {
 public:
  explicit BatchReader(const std::string& path) : f_(safetensors::File::open(path)) {}
  const safetensors::File& file() const { return f_; }
  const std::string& path() const { return f_.path(); }

  const safetensors::TensorView& required(const char* key) const {
    if (const auto* t = f_.find(key)) return *t;
    fail<InputError>(
        "{}: missing tensor '{}' (a batch file holds sequences [B,G,T], attention_mask [B,G,T], "
        "prompt_lens [B] and advantages [B,G])",
        path(), key);
  }
  void check_shape(const safetensors::TensorView& v, const Shape& want, const char* dims) const {
    if (v.shape != want)
      fail<InputError>("{}: tensor '{}' has shape {}, expected {} ({} from 'sequences' [B,G,T] = {})", path(), v.name,
                       shape_str(v.shape), shape_str(want), dims, shape_str(seq_shape_));
  }
  void set_seq_shape(Shape s) { seq_shape_ = std::move(s); }

  std::vector<std::int32_t> int32s(const safetensors::TensorView& v) const {
    if (!is_int_dtype(v.dtype))
      fail<InputError>("{}: tensor '{}' has dtype {}, expected an integer type (I64, I32, I16, I8, U8)", path(), v.name,
                       safetensors::dtype_name(v.dtype));
    std::vector<std::int32_t> out(static_cast<std::size_t>(v.numel()));
    for (index_t k = 0; k < v.numel(); ++k) {
      const std::int64_t x = v.integer(k);
      if (x < std::numeric_limits<std::int32_t>::min() || x > std::numeric_limits<std::int32_t>::max())
        fail<InputError>("{}: {}{} = {} is outside the int32 range", path(), v.name, index_str(v.shape, k), x);
      out[static_cast<std::size_t>(k)] = static_cast<std::int32_t>(x);
    }
    return out;
  }
  std::vector<std::uint8_t> mask(const safetensors::TensorView& v) const {
    if (!is_int_dtype(v.dtype) && v.dtype != safetensors::Dtype::BOOL)
      fail<InputError>("{}: tensor '{}' has dtype {}, expected an integer or BOOL type", path(), v.name,
                       safetensors::dtype_name(v.dtype));
    std::vector<std::uint8_t> out(static_cast<std::size_t>(v.numel()));
    for (index_t k = 0; k < v.numel(); ++k) {
      const std::int64_t x = v.integer(k);
      if (x != 0 && x != 1) fail<InputError>("{}: {}{} = {} is not 0 or 1", path(), v.name, index_str(v.shape, k), x);
      out[static_cast<std::size_t>(k)] = static_cast<std::uint8_t>(x);
    }
    return out;
  }
  std::vector<double> doubles(const safetensors::TensorView& v, bool allow_int) const {
    const bool ok = safetensors::is_float(v.dtype) || (allow_int && is_int_dtype(v.dtype));
    if (!ok)
      fail<InputError>("{}: tensor '{}' has dtype {}, expected {}", path(), v.name, safetensors::dtype_name(v.dtype),
                       allow_int ? "a number type" : "a floating-point type (F64, F32, F16, BF16)");
    return v.to_vector<double>();
  }

 private:
  safetensors::File f_;
  Shape seq_shape_;
};

}  // namespace detail

// A batch file (docs/checkpoints.md): sequences [B,G,T] int, attention_mask
// [B,G,T] (int, U8 or BOOL; values 0/1), prompt_lens [B] int, advantages
// [B,G] float; optional max_lengths [B], rewards [B,G], position_ids
// [B,G,T]. Integer values must fit int32. Token ids against the vocabulary
// are TokenBatch::validate's check (it needs the model).
inline TokenBatch load_batch(const std::string& path) {
  detail::BatchReader r(path);
  const auto& seq = r.required("sequences");
  if (seq.shape.size() != 3)
    fail<InputError>("{}: tensor 'sequences' has shape {}, expected [B, G, T]", path, shape_str(seq.shape));
  r.set_seq_shape(seq.shape);
  TokenBatch b;
  b.B = seq.shape[0];
  b.G = seq.shape[1];
  b.T = seq.shape[2];
  const Shape bgt{b.B, b.G, b.T}, bg{b.B, b.G}, bs{b.B};
  const auto& mask = r.required("attention_mask");
  const auto& plens = r.required("prompt_lens");
  const auto& adv = r.required("advantages");
  r.check_shape(mask, bgt, "[B, G, T]");
  r.check_shape(plens, bs, "[B]");
  r.check_shape(adv, bg, "[B, G]");
  b.sequences = r.int32s(seq);
  b.attention_mask = r.mask(mask);
  b.prompt_lens = r.int32s(plens);
  b.advantages = r.doubles(adv, false);
  if (const auto* v = r.file().find("max_lengths")) {
    r.check_shape(*v, bs, "[B]");
    b.max_lengths = r.doubles(*v, true);
  }
  if (const auto* v = r.file().find("rewards")) {
    r.check_shape(*v, bg, "[B, G]");
    b.rewards = r.doubles(*v, true);
  }
  if (const auto* v = r.file().find("position_ids")) {
    r.check_shape(*v, bgt, "[B, G, T]");
    b.position_ids = r.int32s(*v);
  }
  static const std::set<std::string> known{"sequences",   "attention_mask", "prompt_lens", "advantages",
                                           "max_lengths", "rewards",        "position_ids"};
  for (const auto& t : r.file().tensors())
    if (!known.count(t.name)) log_warning("{}: ignoring unknown tensor '{}'", path, t.name);
  return b;
}

// Writes `batch` in the format load_batch reads (integers as I64, floats as F64).
inline void save_batch(const TokenBatch& batch, const std::string& path) {
  using safetensors::make_out;
  const auto n = static_cast<std::size_t>(batch.B * batch.G * batch.T);
  auto size_is = [&](const char* key, std::size_t got, std::size_t want) {
    if (got != want) fail<UsageError>("save_batch: {} has {} entries, expected {}", key, got, want);
  };
  size_is("sequences", batch.sequences.size(), n);
  size_is("attention_mask", batch.attention_mask.size(), n);
  size_is("prompt_lens", batch.prompt_lens.size(), static_cast<std::size_t>(batch.B));
  size_is("advantages", batch.advantages.size(), static_cast<std::size_t>(batch.B * batch.G));
  auto ints = [](const auto& v) { return std::vector<std::int64_t>(v.begin(), v.end()); };
  auto i64 = [](const Shape& s, const std::vector<std::int64_t>& v) {
    return make_out<std::int64_t>(s, std::span<const std::int64_t>(v));
  };
  auto f64 = [](const Shape& s, const std::vector<double>& v) {
    return make_out<double>(s, std::span<const double>(v));
  };
  const Shape bgt{batch.B, batch.G, batch.T}, bg{batch.B, batch.G}, bs{batch.B};
  std::map<std::string, safetensors::OutTensor> t;
  t.emplace("sequences", i64(bgt, ints(batch.sequences)));
  t.emplace("attention_mask", i64(bgt, ints(batch.attention_mask)));
  t.emplace("prompt_lens", i64(bs, ints(batch.prompt_lens)));
  t.emplace("advantages", f64(bg, batch.advantages));
  if (batch.max_lengths) t.emplace("max_lengths", f64(bs, *batch.max_lengths));
  if (batch.rewards) t.emplace("rewards", f64(bg, *batch.rewards));
  if (batch.position_ids) t.emplace("position_ids", i64(bgt, ints(*batch.position_ids)));
  safetensors::write_file(path, t);
}

}  // namespace entropy_probe::hf
