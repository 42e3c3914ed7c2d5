// The probe's building blocks, in the Python original's vocabulary:
// zeros_like_params, add_into_param_buffer, scale_param_gradients,
// dot_param_buffers, iter_microbatches, accumulate_sum_X, accumulate_sum_Y,
// plus the per-prompt directional derivatives the variance phases need.
//
// Everything iterates the one registry the components were built with.
#pragma once

#include "entropy_probe/comm/comm.hpp"
#include "entropy_probe/core/log.hpp"
#include "entropy_probe/module/bind.hpp"
#include "entropy_probe/probe/sequence_logprob.hpp"
#include "entropy_probe/tensor/blas.hpp"

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace entropy_probe {

namespace detail {
// The number of nonzero elements of each entry of a parameter buffer (0 for
// an absent one), in one pass over its flat storage: each present entry is
// split into rows of kCountChunk elements, so a large entry spreads over many
// blocks on a device, and one row_sum over the rows of every entry (their
// starts in a small index table) writes one partial per row; the partials
// come back in one read. A free function: nvcc does not allow a device lambda
// inside a private member.
template <class U, class B>
std::vector<index_t> count_nonzero_entries(const ParamBuffer<U, B>& buf) {
  constexpr index_t kCountChunk = 4096;
  std::vector<index_t> counts(static_cast<std::size_t>(buf.size()), 0);
  std::vector<index_t> row_start, row_end, row_entry;  // flat ranges [start, end) and their entries
  for (index_t i = 0; i < buf.size(); ++i) {
    const auto* t = buf.entry(i);
    if (!t) continue;
    const index_t end = buf.offset(i) + t->numel();
    for (index_t at = buf.offset(i); at < end; at += kCountChunk) {
      row_start.push_back(at);
      row_end.push_back(std::min(at + kCountChunk, end));
      row_entry.push_back(i);
    }
  }
  const auto rows = static_cast<index_t>(row_start.size());
  if (rows == 0) return counts;
  auto bounds = Tensor<index_t, B>::uninitialized({2 * rows});  // starts, then ends
  B::upload(bounds.data(), row_start.data(), rows);
  B::upload(bounds.data() + rows, row_end.data(), rows);
  auto partial = Tensor<acc_t, B>::uninitialized({rows});  // row_sum writes every row
  const U* p = buf.flat().data();
  const index_t* starts = bounds.data();
  const index_t* ends = bounds.data() + rows;
  B::row_sum(
      rows, kCountChunk,
      [=] EP_HOST_DEVICE(index_t r, index_t k) {
        const index_t j = starts[r] + k;
        return j < ends[r] && p[j] != U(0) ? 1.0 : 0.0;
      },
      partial.data());
  const std::vector<acc_t> part = partial.to_host();
  for (std::size_t r = 0; r < part.size(); ++r)
    counts[static_cast<std::size_t>(row_entry[r])] += static_cast<index_t>(part[r]);
  return counts;
}
}  // namespace detail

// Sums a parameter buffer across ranks as one message: its flat storage,
// reduced in place. On a device backend it stays on the device, so a
// device-aware communicator (NCCL) reduces it where it lies and any other
// stages it through the host in one copy each way. Every rank must hold the
// same entries (the probe's sums start from zeros_like_params on every rank):
// an absent slot holds zeros on every rank, so it sums to zero and stays
// absent.
template <class B>
void allreduce_param_buffer(Communicator& comm, ParamBuffer<double, B>& buf) {
  const std::span<double> flat = buf.flat();
  if (buf.present_count() == 0 || flat.empty()) return;
  if constexpr (B::host_memory) {
    comm.allreduce_sum(flat);
  } else {
    comm.allreduce_sum_device(DeviceDoubles{
        flat.data(), flat.size(), B::name,
        [](double* host, const double* dev, std::size_t k) { B::download(host, dev, static_cast<index_t>(k)); },
        [](double* dev, const double* host, std::size_t k) { B::upload(dev, host, static_cast<index_t>(k)); }});
  }
}

enum class Weighting { dr_grpo, per_token_avg };

inline const char* to_string(Weighting w) { return w == Weighting::dr_grpo ? "dr_grpo" : "per_token_avg"; }

struct ProbeSettings {
  Weighting weighting = Weighting::dr_grpo;
  // Prompts per microbatch: N, 0 = all at once, or unset (the default) = the
  // most that fit memory_budget, measured per phase (for_each_microbatch).
  std::optional<index_t> mb_size{};
  double temperature = 1.0;     // tau
  ProgressCallback progress{};  // called after each microbatch of a long phase
  // Bytes the backend's live tensors may reach when mb_size is unset; unset:
  // default_memory_budget<B>() when the components are built.
  std::optional<std::size_t> memory_budget{};
};

// "1.50 GiB": a byte count for messages.
inline std::string bytes_text(std::size_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024 && u < 4) v /= 1024, ++u;
  return u == 0 ? fmt::format("{} B", bytes) : fmt::format("{:.2f} {}", v, units[u]);
}

// The default memory budget: what backend B already holds plus a safe share
// (B::default_memory_share: 25% on the host, 80% on a GPU) of what it has free.
template <class B>
std::size_t default_memory_budget() {
  return B::memory_in_use() + static_cast<std::size_t>(B::default_memory_share * double(B::memory_available()));
}

// The automatic microbatch size of a phase, after its first prompt ran alone:
// that prompt raised the backend's peak bytes in use `per_prompt` above the
// `in_use` before it, so each microbatch of k prompts is taken to need at most
// k * per_prompt on top of in_use (its fixed costs counted once per prompt:
// an overestimate, never an underestimate). Returns the most prompts that fit
// `budget`, at least 1 and at most `prompts_left` (when any are left).
// Throws when the one prompt alone did not fit: a larger microbatch cannot.
inline index_t microbatch_size_for_budget(std::string_view phase, std::size_t per_prompt, std::size_t in_use,
                                          std::size_t budget, index_t prompts_left) {
  if (in_use > budget)
    fail<Error>(
        "{}: the {} already in use (the model, its optimizer state and the probe's buffers) exceed the memory "
        "budget of {} before any prompt runs; raise the budget (--max-memory, ProbeConfig::memory_budget)",
        phase, bytes_text(in_use), bytes_text(budget));
  if (per_prompt > budget - in_use)
    fail<Error>(
        "{}: one prompt needs {} of memory on top of the {} already in use, over the memory budget of {}; "
        "raise the budget (--max-memory, ProbeConfig::memory_budget) or use shorter sequences or fewer "
        "responses per prompt",
        phase, bytes_text(per_prompt), bytes_text(in_use), bytes_text(budget));
  const index_t most = std::max<index_t>(prompts_left, 1);
  if (per_prompt == 0) return most;
  const std::size_t fit = (budget - in_use) / per_prompt;
  return std::clamp<index_t>(static_cast<index_t>(std::min<std::size_t>(fit, std::size_t(most))), 1, most);
}

// The prompts per microbatch past which more buy no speed on backend B: the
// fewest whose rows (rows_per_prompt = G x T each) reach B::microbatch_rows,
// or 0 (no such size) where B declares none: a GPU takes the largest
// microbatch that fits.
template <class B>
index_t prompts_filling_products(index_t rows_per_prompt) {
  if constexpr (requires { B::microbatch_rows; }) {
    if (B::microbatch_rows > 0 && rows_per_prompt > 0)
      return (B::microbatch_rows + rows_per_prompt - 1) / rows_per_prompt;
  }
  return 0;
}

// While a phase runs, lets backend B's allocator keep up to `room` bytes of
// freed blocks (never less than it already may), so that each microbatch
// reuses the blocks of the one before it instead of faulting in fresh pages;
// the cap it had comes back afterwards. A no-op where B has no such cap.
template <class B>
class CacheRoomScope {
 public:
  explicit CacheRoomScope(std::size_t room) {
    if constexpr (requires { B::set_cache_limit(room); }) {
      before_ = B::cache_limit();
      B::set_cache_limit(std::max(before_, room));
    }
  }
  ~CacheRoomScope() {
    if constexpr (requires { B::set_cache_limit(before_); }) B::set_cache_limit(before_);
  }
  CacheRoomScope(const CacheRoomScope&) = delete;
  CacheRoomScope& operator=(const CacheRoomScope&) = delete;

 private:
  std::size_t before_ = 0;
};

// Loss weights for one batch, given its S values (row-major [B, G]):
//   X: LX[b] = sum_g W[b,g] S[b,g] with W = -(1/G) c[b,g],
//      c = stopgrad(Sw - LOO), Sw = S / Lmax (dr_grpo) or S / max(L, 1);
//   Y: LY[u] = sum_g (1/G) (A[u,g] / Lmax[u]) S[u,g].
inline std::vector<double> x_loss_weights(const TokenBatch& batch, std::span<const double> S, Weighting w) {
  const index_t G = batch.G;
  std::vector<double> W(static_cast<std::size_t>(batch.rows()), 0.0), sw(static_cast<std::size_t>(G));
  for (index_t b = 0; b < batch.B; ++b) {
    const double lmax = batch.lmax(b);
    double total = 0;
    for (index_t g = 0; g < G; ++g) {
      const double denom = w == Weighting::dr_grpo ? lmax : std::max<double>(1.0, double(batch.gen_length(b, g)));
      sw[static_cast<std::size_t>(g)] = S[static_cast<std::size_t>(b * G + g)] / denom;
      total += sw[static_cast<std::size_t>(g)];
    }
    for (index_t g = 0; g < G; ++g) {
      const double swg = sw[static_cast<std::size_t>(g)];
      const double loo = G > 1 ? (total - swg) / double(G - 1) : 0.0;
      W[static_cast<std::size_t>(b * G + g)] = -(swg - loo) / double(G);
    }
  }
  return W;
}

inline std::vector<double> y_loss_weights(const TokenBatch& batch) {
  std::vector<double> W(static_cast<std::size_t>(batch.rows()));
  for (index_t b = 0; b < batch.B; ++b) {
    const double lmax = batch.lmax(b);
    for (index_t g = 0; g < batch.G; ++g)
      W[static_cast<std::size_t>(b * batch.G + g)] = batch.advantage(b, g) / lmax / double(batch.G);
  }
  return W;
}

// Which loss a phase differentiates: its per-row weights from (batch, S).
using LossWeightsFn = std::function<std::vector<double>(const TokenBatch&, std::span<const double>)>;

// Who runs a pass over a batch: `shard`, each rank its share of the prompts
// (comm.shard), results all-reduced, progress reported; `local`, this rank
// every prompt itself, nothing reduced or reported (a pass nested in a phase
// that shards and reports at its own level, e.g. the influence matrix).
enum class PassScope { shard, local };

template <CausalLM M>
class ProbeComponents {
 public:
  using T = typename M::scalar_type;
  using B = typename M::backend_type;
  using RegistryT = Registry<T, B>;
  using Buffer = ParamBuffer<double, B>;

  ProbeComponents(M& model, const RegistryT& registry, ProbeSettings settings, Communicator& comm)
      : model_(&model), registry_(&registry), settings_(std::move(settings)), comm_(&comm) {
    registry.require_trainable("ProbeComponents");
    if (!(settings_.temperature > 0) || !std::isfinite(settings_.temperature))
      fail<UsageError>("ProbeComponents: temperature {} must be positive and finite", settings_.temperature);
    if (settings_.mb_size && *settings_.mb_size < 0)
      fail<UsageError>("ProbeComponents: mb_size {} is negative", *settings_.mb_size);
    if (!settings_.mb_size) {
      budget_ = settings_.memory_budget ? *settings_.memory_budget : default_memory_budget<B>();
      log_debug("microbatches sized automatically within a memory budget of {}", bytes_text(budget_));
    }
  }

  M& model() const { return *model_; }
  const RegistryT& registry() const { return *registry_; }
  const ProbeSettings& settings() const { return settings_; }
  Communicator& comm() const { return *comm_; }

  // ---- the buffer vocabulary, always over this registry ----------------------
  Buffer zeros_like_params() const { return entropy_probe::zeros_like_params<double>(*registry_); }
  AddIntoStats add_into_param_buffer(Buffer& buf, double scale) const {
    return entropy_probe::add_into_param_buffer(buf, *registry_, scale);
  }
  void scale_param_gradients(double scale) const { entropy_probe::scale_param_gradients(*registry_, scale); }
  double dot_param_buffers(const Buffer& a, const Buffer& b) const {
    require_bound_to(a, *registry_, "dot_param_buffers");
    const DotStats st = dot_param_buffers_stats(a, b);
    if (st.missing > 0)
      log_debug("dot_param_buffers: {} of {} parameters absent from one of the buffers contribute 0", st.missing,
                a.size());
    return st.value;
  }

  // [begin, end) ranges of at most `step` prompts covering [first, n)
  // (step 0: all at once).
  static std::vector<std::pair<index_t, index_t>> iter_microbatches(index_t n, index_t step, index_t first = 0) {
    std::vector<std::pair<index_t, index_t>> out;
    if (step <= 0) step = std::max<index_t>(n - first, 1);
    for (index_t b = first; b < n; b += step) out.emplace_back(b, std::min(n, b + step));
    return out;
  }

  // The one microbatch loop every phase runs: this rank's shard of `batch`
  // (comm.shard) in microbatches. For each, body(mb, prompts) gets the
  // selected TokenBatch and its prompts' indices in `batch` (mb's prompt j is
  // batch's prompts[j]); progress is reported for `phase` after each. Returns
  // the number of prompts this rank ran.
  //
  // With mb_size set, microbatches of mb_size prompts (0: one of all). Unset,
  // the first microbatch is one prompt, during which the backend's peak bytes
  // in use are measured; the rest run in microbatches of as many prompts as
  // that cost fits in the memory budget (microbatch_size_for_budget), which
  // fails before a second microbatch when even one prompt does not fit, and
  // no more than fill the backend's products (prompts_filling_products). The
  // allocator may then keep the budget's room of freed blocks through the
  // phase (CacheRoomScope), and empties its cache before a microbatch of
  // another size than the last, whose blocks would not fit it: so equal
  // microbatches reuse their memory and the cache never doubles it. The size
  // each phase ran with is kept in microbatch_sizes().
  //
  // With scope = PassScope::local every prompt runs on this rank and no
  // progress is reported.
  template <class Body>
  index_t for_each_microbatch(const TokenBatch& batch, const char* phase, Body&& body,
                              PassScope scope = PassScope::shard) const {
    std::vector<index_t> mine;
    if (scope == PassScope::shard) {
      mine = comm_->shard(batch.B);
    } else {
      for (index_t b = 0; b < batch.B; ++b) mine.push_back(b);
    }
    const auto total = static_cast<index_t>(mine.size());
    index_t done = 0, last = 0;  // last: the previous microbatch's prompts
    auto run = [&](index_t b0, index_t b1) {
      if (last != 0 && b1 - b0 != last) B::empty_cache();
      last = b1 - b0;
      const std::vector<index_t> prompts(mine.begin() + b0, mine.begin() + b1);
      const TokenBatch mb = batch.select(prompts);
      body(mb, std::span<const index_t>(prompts));
      done += mb.B;
      if (scope == PassScope::shard) report(phase, done, total);
    };
    index_t step = settings_.mb_size.value_or(1);
    std::optional<CacheRoomScope<B>> cache_room;
    if (!settings_.mb_size && total > 0) {
      B::reset_peak_memory();
      const std::size_t in_use = B::peak_memory();  // just reset: the bytes in use now
      if (in_use > budget_)                         // the model and the phase's buffers alone: no prompt can fit
        microbatch_size_for_budget(phase, 0, in_use, budget_, total);
      cache_room.emplace(budget_ - in_use);
      run(0, 1);
      const std::size_t per_prompt = B::peak_memory() - in_use;
      step = microbatch_size_for_budget(phase, per_prompt, in_use, budget_, total - 1);
      const index_t fill = prompts_filling_products<B>(batch.G * batch.T);
      const bool capped = fill > 0 && fill < step;
      if (capped) step = fill;
      // At info level when the phase's size is new: a phase run once per
      // sequence (the influence matrix) would repeat the same line each time.
      const auto seen = microbatch_sizes_.find(phase);
      log(seen == microbatch_sizes_.end() || seen->second != std::min(step, total) ? LogLevel::info : LogLevel::debug,
          "[{}] microbatches of {} prompt(s){}: one prompt ({} responses x {} tokens) took {} above the {} in use, "
          "budget {}",
          phase, step, capped ? fmt::format(" (they fill the products: {} rows)", step * batch.G * batch.T) : "",
          batch.G, batch.T, bytes_text(per_prompt), bytes_text(in_use), bytes_text(budget_));
    }
    microbatch_sizes_[phase] = step > 0 ? std::min(step, total) : total;
    for (auto [b0, b1] : iter_microbatches(total, step, done)) run(b0, b1);
    return total;
  }

  // The prompts per microbatch each phase (for_each_microbatch's `phase`) last
  // ran with on this rank.
  const std::map<std::string, index_t>& microbatch_sizes() const { return microbatch_sizes_; }
  // The memory budget of the automatic microbatch size (0 when mb_size is set).
  std::size_t memory_budget() const { return budget_; }

  struct Sum {
    Buffer sum;         // sum over prompts of the per-prompt gradient
    index_t count = 0;  // prompts summed, over all ranks
  };

  // sum_b X_b over the E batch (this rank's shard, then all-reduced).
  Sum accumulate_sum_X(const TokenBatch& E) const {
    const Weighting w = settings_.weighting;
    return accumulate("sum_X", "[X] nonzero param.grads", E,
                      [w](const TokenBatch& mb, std::span<const double> S) { return x_loss_weights(mb, S, w); });
  }
  // sum_u grad LY[u] over the U batch, raw (the preconditioner comes after).
  Sum accumulate_sum_Y(const TokenBatch& U) const {
    return accumulate("sum_Y", "[Y] raw nonzero param.grads", U,
                      [](const TokenBatch& mb, std::span<const double>) { return y_loss_weights(mb); });
  }

  // Per sequence of a batch (row b*G + g, batch order, all ranks): S, the
  // directional derivative Sdot = dS/dtheta . tangent and, when asked, the
  // Rao-Blackwellised entropy sum H (docs/math.md (k); empty without).
  struct SequenceTangents {
    std::vector<double> S, Sdot, H;
  };

  // All three from one forward-mode pass per microbatch on a forward-tangent
  // tape, so values and tangents flow together and each finished layer is
  // freed; the entropies come from the same chunked lm-head pass as S. With
  // scope = PassScope::local this rank runs every row and nothing is
  // all-reduced.
  SequenceTangents sequence_tangents(const TokenBatch& batch, const Buffer& tangent, const char* phase,
                                     bool entropy = false, PassScope scope = PassScope::shard) const {
    require_bound_to(tangent, *registry_, phase);
    // The tangent in T, converted once for every microbatch; the tape
    // borrows its entries.
    std::optional<ParamBuffer<T, B>> converted;
    if constexpr (!std::is_same_v<T, double>) converted = cast_param_buffer<T>(tangent);
    const auto& tangent_t = [&]() -> const auto& {
      if constexpr (std::is_same_v<T, double>)
        return tangent;
      else
        return *converted;
    }
    ();
    const auto rows = static_cast<std::size_t>(batch.rows());
    const std::size_t parts = entropy ? 3 : 2;
    std::vector<double> all(parts * rows, 0.0);  // S, Sdot[, H]: one allreduce
    for_each_microbatch(
        batch, phase,
        [&](const TokenBatch& mb, std::span<const index_t> prompts) {
          Tape<T, B> tape(forward_tangents, param_tangents(tangent_t, phase));
          std::vector<double> h;
          Var S = record_sequence_logprobs(tape, *model_, mb, settings_.temperature, entropy ? &h : nullptr);
          const std::vector<double> s = to_double(tape.value(S));
          const auto* sdot = tape.tangent(S);
          if (!sdot)
            fail<Error>(
                "[JVP] {}: the tangent reached no sequence log-probability (no parameter of the forward pass "
                "has an entry in the tangent buffer)",
                phase);
          const std::vector<double> sd = to_double(*sdot);
          for (index_t j = 0; j < mb.B; ++j)
            for (index_t g = 0; g < mb.G; ++g) {
              const auto row = static_cast<std::size_t>(j * mb.G + g);
              const auto at = static_cast<std::size_t>(prompts[static_cast<std::size_t>(j)] * batch.G + g);
              all[at] = s[row];
              all[rows + at] = sd[row];
              if (entropy) all[2 * rows + at] = h[row];
            }
        },
        scope);
    if (scope == PassScope::shard) comm_->allreduce_sum(std::span<double>(all));
    const auto part = [&](std::size_t k) {
      return std::vector<double>(all.begin() + static_cast<std::ptrdiff_t>(k * rows),
                                 all.begin() + static_cast<std::ptrdiff_t>((k + 1) * rows));
    };
    SequenceTangents out;
    out.S = part(0);
    out.Sdot = part(1);
    if (entropy) out.H = part(2);
    return out;
  }

  // For every sequence (b, g) of `batch` (row b*G + g, all ranks): the
  // directional derivative of its term of the loss along `tangent`,
  //   d[b,g] = W[b,g] * (dS[b,g]/dtheta . tangent),
  // with W the phase's loss weights of the whole batch (they are per prompt,
  // so the same as per microbatch). scope as for sequence_tangents.
  std::vector<double> per_sequence_directional(const TokenBatch& batch, const Buffer& tangent,
                                               const LossWeightsFn& weights, const char* phase,
                                               PassScope scope = PassScope::shard) const {
    const SequenceTangents st = sequence_tangents(batch, tangent, phase, false, scope);
    const std::vector<double> W = weights(batch, st.S);
    std::vector<double> d(st.S.size());
    for (std::size_t i = 0; i < d.size(); ++i) d[i] = W[i] * st.Sdot[i];
    return d;
  }

  // grad S[b,g] of the one sequence (b, g) of `batch`, left in the
  // registry's grads (zeroed first): one forward of prompt b through the
  // microbatch driver (PassScope::local: on this rank, whoever shards), one
  // backward seeded with the one-hot cotangent of row (b, g). Returns that
  // row's loss weight W[b,g] of `weights`, from the prompt's S values. The
  // per-row reverse pass of the influence matrix and of the truth along a
  // single sequence (docs/math.md (h)); no gradient of another row is held.
  double sequence_gradient(const TokenBatch& batch, index_t b, index_t g, const LossWeightsFn& weights,
                           const char* phase) const {
    if (b < 0 || b >= batch.B || g < 0 || g >= batch.G)
      fail<UsageError>("{}: sequence ({}, {}) is outside a batch of {} prompts x {} completions", phase, b, g, batch.B,
                       batch.G);
    double w = 0;
    for_each_microbatch(
        batch.select({b}), phase,
        [&](const TokenBatch& mb, std::span<const index_t>) {
          registry_->zero_grad();
          Tape<T, B> tape;
          Var S = record_sequence_logprobs(tape, *model_, mb, settings_.temperature);
          require_leaves_in_registry(tape, *registry_->info(), phase);
          w = weights(mb, to_double(tape.value(S)))[static_cast<std::size_t>(g)];
          std::vector<double> one_hot(static_cast<std::size_t>(mb.rows()), 0.0);
          one_hot[static_cast<std::size_t>(g)] = 1.0;
          tape.backward(S, from_double(one_hot));
        },
        PassScope::local);
    return w;
  }

  // For every prompt b of `batch` (batch order, all ranks): the directional
  // derivative of its loss along `tangent`, d_b = sum_g d[b,g] of
  // per_sequence_directional.
  std::vector<double> per_prompt_directional(const TokenBatch& batch, const Buffer& tangent,
                                             const LossWeightsFn& weights, const char* phase) const {
    const std::vector<double> rows = per_sequence_directional(batch, tangent, weights, phase);
    std::vector<double> d(static_cast<std::size_t>(batch.B), 0.0);
    for (index_t b = 0; b < batch.B; ++b)
      for (index_t g = 0; g < batch.G; ++g)
        d[static_cast<std::size_t>(b)] += rows[static_cast<std::size_t>(b * batch.G + g)];
    return d;
  }

  static std::vector<double> to_double(const Tensor<T, B>& t) { return to_double(t.view()); }
  static std::vector<double> to_double(const TensorView<const T, B>& t) {
    std::vector<double> out;
    for (T v : t.to_host()) out.push_back(static_cast<double>(v));
    return out;
  }
  static Tensor<T, B> from_double(const std::vector<double>& v) {
    std::vector<T> h(v.begin(), v.end());
    return Tensor<T, B>::from_host({static_cast<index_t>(v.size())}, h);
  }

  // Sums each parameter buffer across ranks as one contiguous message.
  void allreduce(Buffer& buf) const {
    if (comm_->world() == 1) return;
    allreduce_param_buffer(*comm_, buf);
  }

  void report(const char* phase, index_t done, index_t total) const {
    if (settings_.progress) settings_.progress(phase, done, total);
  }

 private:
  // The shared loop of both accumulations: per microbatch, zero the grads,
  // record S, seed the backward pass with the phase's loss weights, add the
  // gradients into the running sum.
  Sum accumulate(const char* phase, const char* nonzero_label, const TokenBatch& batch,
                 const LossWeightsFn& weights) const {
    Sum out{zeros_like_params(), batch.B};
    for_each_microbatch(batch, phase, [&](const TokenBatch& mb, std::span<const index_t>) {
      registry_->zero_grad();
      Tape<T, B> tape;
      Var S = record_sequence_logprobs(tape, *model_, mb, settings_.temperature);
      require_leaves_in_registry(tape, *registry_->info(), phase);
      const std::vector<double> W = weights(mb, to_double(tape.value(S)));
      tape.backward(S, from_double(W));
      add_into_param_buffer(out.sum, 1.0);
    });
    registry_->zero_grad();
    allreduce(out.sum);
    // Parameters whose summed gradient over the phase (all ranks) has a
    // nonzero entry: counted on the backend, read back once.
    index_t k = 0;
    for (index_t c : detail::count_nonzero_entries(out.sum)) k += c > 0;
    log_debug("{} = {}/{}", nonzero_label, k, registry_->size());
    if (log_enabled(LogLevel::debug))  // the norm reads every entry back: only when it is shown
      log_debug("[{}] ||{}|| = {:.6e} over {} prompts", phase, phase, norm_param_buffer(out.sum), out.count);
    if (k == 0)
      fail<Error>(
          "{} = 0/{}: every trainable parameter's gradient sums to zero over the whole {} phase "
          "(all advantages zero, no generated tokens, or a LoRA B initialised to zero with nothing else "
          "trainable); refusing to report a silent zero",
          nonzero_label, registry_->size(), phase);
    return out;
  }

  M* model_;
  const RegistryT* registry_;
  ProbeSettings settings_;
  Communicator* comm_;
  std::size_t budget_ = 0;
  mutable std::map<std::string, index_t> microbatch_sizes_;
};

}  // namespace entropy_probe
