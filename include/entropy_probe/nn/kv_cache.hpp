// The key/value cache of incremental (KV-cached) decoding, forward only.
//
// A cached forward feeds n new tokens for each of R rows; row r's new tokens
// sit at slots start[r] .. start[r] + n - 1 of the row, and a slot is also
// the token's position. Each layer writes the keys and values of the new
// tokens into its [R, capacity, kv width] cache, then every new query
// attends causally to slots [0, its own slot] of its row. Slots past a row's
// tokens may hold stale entries from an earlier, longer chunk (a prefill over
// right-padded prompts); they are never read, since a query only sees slots
// up to its own and a row's later tokens overwrite them in order.
//
// Attention here has causal_attention's semantics (tape/ops/attention.hpp:
// grouped KV heads, the score scale) with every key up to the query allowed;
// the models' cached forward (DecoderForCausalLM::forward_cached,
// Gpt2LMHeadModel::forward_cached) wraps the result as a tape constant, so
// the layers around attention are the models' own.
#pragma once

#include "entropy_probe/core/config.hpp"
#include "entropy_probe/core/error.hpp"
#include "entropy_probe/tape/ops/attention.hpp"
#include "entropy_probe/tensor/tensor.hpp"

#include <cmath>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

namespace entropy_probe::nn {

// n new tokens for each of R rows (row-major [R, n]); start[r] is the slot
// (= position) of row r's first new token, read[r] which of its n tokens'
// logits the forward returns.
struct CachedInput {
  index_t rows = 0, length = 0;
  std::vector<std::int32_t> tokens;
  std::vector<std::int32_t> start;
  std::vector<std::int32_t> read;

  std::vector<std::int32_t> positions() const {
    std::vector<std::int32_t> p;
    p.reserve(static_cast<std::size_t>(rows * length));
    for (index_t r = 0; r < rows; ++r)
      for (index_t j = 0; j < length; ++j)
        p.push_back(static_cast<std::int32_t>(start[static_cast<std::size_t>(r)] + j));
    return p;
  }
  // The flattened r*n + read[r] rows whose logits are returned.
  std::vector<std::int32_t> read_rows() const {
    std::vector<std::int32_t> out;
    for (index_t r = 0; r < rows; ++r)
      out.push_back(static_cast<std::int32_t>(r * length + read[static_cast<std::size_t>(r)]));
    return out;
  }
  // One past the largest position (transformers' sequence length for dynamic rope).
  index_t end() const {
    index_t e = 0;
    for (std::int32_t s : start) e = std::max<index_t>(e, s + length);
    return e;
  }
  void check(const char* model, index_t capacity) const {
    if (rows < 1 || length < 1 || tokens.size() != static_cast<std::size_t>(rows * length) ||
        start.size() != static_cast<std::size_t>(rows) || read.size() != static_cast<std::size_t>(rows))
      fail<UsageError>("{} forward_cached: {} rows of {} tokens need rows*length tokens and one start and read per row",
                       model, rows, length);
    for (index_t r = 0; r < rows; ++r) {
      const auto i = static_cast<std::size_t>(r);
      if (start[i] < 0 || start[i] + length > capacity)
        fail<UsageError>("{} forward_cached: row {} slots [{}, {}) are outside the cache's [0, {})", model, r, start[i],
                         start[i] + length, capacity);
      if (read[i] < 0 || read[i] >= length)
        fail<UsageError>("{} forward_cached: row {} reads token {} of {}", model, r, read[i], length);
    }
  }
};

template <class T, class B = CpuBackend>
class KvCache {
 public:
  KvCache() = default;
  KvCache(index_t layers, index_t rows, index_t capacity, index_t kv_width)
      : rows_(rows), capacity_(capacity), width_(kv_width) {
    for (index_t l = 0; l < layers; ++l) {
      keys_.emplace_back(Tensor<T, B>::full({rows, capacity, kv_width}, T(0)));
      values_.emplace_back(Tensor<T, B>::full({rows, capacity, kv_width}, T(0)));
    }
  }
  index_t rows() const { return rows_; }
  index_t capacity() const { return capacity_; }

  // A cache of rows() * g rows, row r a copy of row r / g: a prompt
  // prefilled once serves the g responses sampled from it.
  KvCache repeat_rows(index_t g) const {
    KvCache out;
    out.rows_ = rows_ * g;
    out.capacity_ = capacity_;
    out.width_ = width_;
    const index_t per_row = capacity_ * width_;
    auto repeat = [&](const Tensor<T, B>& src) {
      auto dst = Tensor<T, B>::uninitialized({rows_ * g, capacity_, width_});
      for (index_t r = 0; r < rows_ * g; ++r)
        B::copy(dst.data() + r * per_row, src.data() + (r / g) * per_row, per_row);
      return dst;
    };
    for (std::size_t l = 0; l < keys_.size(); ++l) {
      out.keys_.push_back(repeat(keys_[l]));
      out.values_.push_back(repeat(values_[l]));
    }
    return out;
  }

  // Stores k and v ([R*n, kv width], the new tokens of `in`) in `layer`'s
  // cache and returns the attention output [R*n, hq*dh] of q ([R*n, hq*dh]).
  Tensor<T, B> attend(index_t layer, const CachedInput& in, const Tensor<T, B>& q, const Tensor<T, B>& k,
                      const Tensor<T, B>& v, index_t hq, index_t hkv, double scale = 0.0) {
    const index_t n = in.length, nq = in.rows * n, w = width_, cap = capacity_;
    const index_t dh = w / hkv, group = hq / hkv, qw = hq * dh;
    if (in.rows != rows_ || layer < 0 || layer >= static_cast<index_t>(keys_.size()) || hkv * dh != w ||
        hq % hkv != 0 || q.numel() != nq * qw || k.numel() != nq * w || v.numel() != nq * w)
      fail<UsageError>(
          "KvCache::attend: layer {}, {} rows, q {} / k {} / v {} elements do not fit the cache "
          "({} layers, {} rows, kv width {}, {} query heads over {} kv heads)",
          layer, in.rows, q.numel(), k.numel(), v.numel(), keys_.size(), rows_, w, hq, hkv);
    const acc_t s = detail::attention_scale("KvCache::attend", scale, dh);
    const auto start_t = Tensor<std::int32_t, B>::from_host({in.rows}, std::span<const std::int32_t>(in.start));
    const std::int32_t* start = start_t.data();
    T* kc = keys_[static_cast<std::size_t>(layer)].data();
    T* vc = values_[static_cast<std::size_t>(layer)].data();
    {
      const T *kp = k.data(), *vp = v.data();
      B::parallel_for_2d(nq, w, [=] EP_HOST_DEVICE(index_t i, index_t c) {
        const index_t r = i / n, slot = start[r] + i % n;
        kc[(r * cap + slot) * w + c] = kp[i * w + c];
        vc[(r * cap + slot) * w + c] = vp[i * w + c];
      });
    }
    auto out = Tensor<T, B>::full({nq, qw}, T(0));
    const T* qp = q.data();
    T* op = out.data();
    // One (query, head) per index: the score max, then the softmax-weighted
    // sum of values and its normaliser, recomputing the scores (no scratch).
    auto one = [=] EP_HOST_DEVICE(index_t ih) {
      const index_t i = ih / hq, h = ih % hq, r = i / n, len = start[r] + i % n + 1;
      const T* qh = qp + i * qw + h * dh;
      const T* kb = kc + r * cap * w + (h / group) * dh;
      const T* vb = vc + r * cap * w + (h / group) * dh;
      T* o = op + i * qw + h * dh;
      auto score = [=](index_t t) {
        acc_t d = 0;
        for (index_t c = 0; c < dh; ++c) d += static_cast<acc_t>(qh[c]) * static_cast<acc_t>(kb[t * w + c]);
        return d * s;
      };
      acc_t mx = score(0);
      for (index_t t = 1; t < len; ++t) mx = std::fmax(mx, score(t));
      acc_t sum = 0;
      for (index_t t = 0; t < len; ++t) {
        const acc_t p = std::exp(score(t) - mx);
        sum += p;
        for (index_t c = 0; c < dh; ++c) o[c] += static_cast<T>(p * static_cast<acc_t>(vb[t * w + c]));
      }
      for (index_t c = 0; c < dh; ++c) o[c] = static_cast<T>(static_cast<acc_t>(o[c]) / sum);
    };
    // On the CPU an index is a large task (a decode step has rows * heads of
    // them, fewer than parallel_for's grain, which left one core idle).
    if constexpr (std::is_same_v<B, CpuBackend>)
      CpuBackend::parallel_tasks(nq * hq, [&](index_t, index_t ih) { one(ih); });
    else
      B::parallel_for(nq * hq, one);
    return out;
  }

 private:
  index_t rows_ = 0, capacity_ = 0, width_ = 0;
  std::vector<Tensor<T, B>> keys_, values_;
};

}  // namespace entropy_probe::nn
