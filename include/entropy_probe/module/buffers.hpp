// Parameter buffers ("mu-buffers"): one tensor per registry parameter, keyed
// by parameter id and bound to the registry they were made from. The entries
// are views into one allocation holding every parameter back to back, so an
// all-reduce, a dot product or a nonzero count is one pass over flat().
//
// Binding is by registry identity: combining buffers of two registries, or
// touching a key the registry does not hold, is an error naming the
// parameter, never a silent skip. An entry may be absent (a parameter that
// received no gradient); absences are counted by the operations that meet them.
#pragma once

#include "entropy_probe/core/log.hpp"
#include "entropy_probe/module/registry.hpp"

#include <cmath>
#include <cstddef>
#include <memory>
#include <span>
#include <utility>
#include <vector>

namespace entropy_probe {

template <class U, class B = CpuBackend>
class ParamBuffer {
 public:
  using scalar_type = U;
  using TensorT = Tensor<U, B>;
  using View = TensorView<U, B>;
  using ConstView = TensorView<const U, B>;
  // Every slot starts on this boundary of the (64-byte aligned) storage, so
  // a SIMD kernel sees aligned rows in each entry.
  static constexpr std::size_t kSlotAlignment = 64;
  static_assert(kSlotAlignment % sizeof(U) == 0, "a slot boundary must fall on an element boundary");

  ParamBuffer() = default;
  // An empty buffer (every entry absent) bound to `info`. The storage is
  // allocated by the first entry set.
  explicit ParamBuffer(std::shared_ptr<const RegistryInfo> info) : info_(std::move(info)) {
    constexpr auto align = static_cast<index_t>(kSlotAlignment / sizeof(U));
    const auto n = static_cast<std::size_t>(info_->size());
    offsets_.reserve(n + 1);
    index_t at = 0;
    for (const Shape& s : info_->shapes) {
      offsets_.push_back(at);
      at += (numel_of(s) + align - 1) / align * align;
    }
    offsets_.push_back(at);
    present_.assign(n, false);
    rebuild_views();
  }
  // A copy has storage of its own; its views point into it.
  ParamBuffer(const ParamBuffer& o) : info_(o.info_), offsets_(o.offsets_), present_(o.present_), storage_(o.storage_) {
    rebuild_views();
  }
  // A move hands the storage over; the views move with it and stay valid.
  ParamBuffer(ParamBuffer&& o) noexcept { swap(o); }
  ParamBuffer& operator=(ParamBuffer o) noexcept {
    swap(o);
    return *this;
  }
  void swap(ParamBuffer& o) noexcept {
    std::swap(info_, o.info_);
    std::swap(offsets_, o.offsets_);
    std::swap(present_, o.present_);
    storage_.swap(o.storage_);
    std::swap(views_, o.views_);
    std::swap(const_views_, o.const_views_);
  }

  const std::shared_ptr<const RegistryInfo>& info() const { return info_; }
  bool bound() const { return static_cast<bool>(info_); }
  index_t size() const { return static_cast<index_t>(present_.size()); }
  const std::string& name(index_t i) const { return info_->names.at(static_cast<std::size_t>(i)); }
  ParamId id(index_t i) const { return info_->ids.at(static_cast<std::size_t>(i)); }

  // Entry by registry index, a view into the storage; nullptr when absent.
  // The view stays valid while the buffer lives (a move takes it along).
  const ConstView* entry(index_t i) const {
    return present_.at(static_cast<std::size_t>(i)) ? &const_views_[static_cast<std::size_t>(i)] : nullptr;
  }
  const View* entry(index_t i) {
    return present_.at(static_cast<std::size_t>(i)) ? &views_[static_cast<std::size_t>(i)] : nullptr;
  }
  bool present(index_t i) const { return present_.at(static_cast<std::size_t>(i)); }
  index_t present_count() const {
    index_t n = 0;
    for (bool p : present_) n += p;
    return n;
  }
  // Whether both buffers hold the same entries (they are bound to one registry).
  template <class V>
  bool same_presence(const ParamBuffer<V, B>& other) const {
    for (index_t i = 0; i < size(); ++i)
      if (present(i) != other.present(i)) return false;
    return true;
  }

  // Entry by parameter id; nullptr when absent. A foreign id is an error.
  const ConstView* find(ParamId id) const { return entry(index_of(id)); }
  const View* find(ParamId id) { return entry(index_of(id)); }
  const ConstView& at(ParamId id) const { return *require_entry(index_of(id)); }
  const View& at(ParamId id) { return *require_entry(index_of(id)); }

  // Copies `value` into the slot of `id`, which becomes present; the shape
  // must be the parameter's. On error the buffer is unchanged.
  void set(ParamId id, ConstView value) {
    const index_t i = index_of(id);
    const Shape& want = info_->shapes[static_cast<std::size_t>(i)];
    if (value.shape() != want)
      fail<UsageError>("parameter buffer: value for '{}' has shape {}, parameter has {}", name(i),
                       shape_str(value.shape()), shape_str(want));
    allocate_storage();
    U* dst = views_[static_cast<std::size_t>(i)].data();
    if (dst != value.data()) B::copy(dst, value.data(), value.numel());
    present_[static_cast<std::size_t>(i)] = true;
  }
  void set(ParamId id, const TensorT& value) { set(id, value.view()); }
  // Makes the entry of `id` present and zero; returns it.
  const View& set_zero(ParamId id) {
    const index_t i = index_of(id);
    allocate_storage();
    const View& v = views_[static_cast<std::size_t>(i)];
    if (present(i)) B::fill(v.data(), v.numel(), U(0));  // an absent slot already holds zeros
    present_[static_cast<std::size_t>(i)] = true;
    return v;
  }
  void erase(ParamId id) {
    const index_t i = index_of(id);
    if (!present(i)) return;
    const View& v = views_[static_cast<std::size_t>(i)];
    B::fill(v.data(), v.numel(), U(0));  // keeps flat()'s zeros outside present entries
    present_[static_cast<std::size_t>(i)] = false;
  }

  // The whole storage, every slot back to back in registry order (slot i
  // starts at offset(i)); empty before the first entry is set. Every element
  // outside a present entry (alignment padding, absent slots) is zero, so a
  // sum, dot product or nonzero count over it equals the one over the
  // present entries; writers keep it so.
  std::span<U> flat() { return {storage_.data(), storage_.size()}; }
  std::span<const U> flat() const { return {storage_.data(), storage_.size()}; }
  index_t offset(index_t i) const { return offsets_.at(static_cast<std::size_t>(i)); }

  // Registry index of `id`; throws naming the id when the registry lacks it.
  index_t index_of(ParamId id) const {
    require_bound("parameter buffer");
    const index_t i = info_->find(id);
    if (i < 0)
      fail<UsageError>("parameter buffer bound to registry #{}: parameter id {} is not in that registry", info_->serial,
                       id.value);
    return i;
  }

  // Throws unless `other` is bound to the same registry.
  template <class V>
  void require_same_registry(const ParamBuffer<V, B>& other, const char* op) const {
    require_bound(op);
    other.require_bound(op);
    if (info_ != other.info())
      fail<UsageError>("{}: buffers are bound to different registries (#{} and #{}); first parameter '{}' vs '{}'", op,
                       info_->serial, other.info()->serial, info_->names.empty() ? "" : info_->names[0],
                       other.info()->names.empty() ? "" : other.info()->names[0]);
  }
  void require_bound(const char* op) const {
    if (!info_) fail<UsageError>("{}: parameter buffer is not bound to a registry", op);
  }

 private:
  const ConstView* require_entry(index_t i) const {
    const ConstView* t = entry(i);
    if (!t) fail<UsageError>("parameter buffer: no entry for '{}' (id {})", name(i), id(i).value);
    return t;
  }
  const View* require_entry(index_t i) {
    std::as_const(*this).require_entry(i);
    return &views_[static_cast<std::size_t>(i)];
  }
  // The one allocation, zero-filled, on first use.
  void allocate_storage() {
    const auto total = static_cast<std::size_t>(offsets_.back());
    if (storage_.size() == total) return;
    storage_ = B::template allocate<U>(static_cast<index_t>(total));
    rebuild_views();
  }
  void rebuild_views() {
    views_.clear();
    const_views_.clear();
    if (!info_) return;
    views_.reserve(present_.size());
    const_views_.reserve(present_.size());
    for (std::size_t i = 0; i < present_.size(); ++i) {
      U* p = storage_.size() > 0 ? storage_.data() + offsets_[i] : nullptr;
      views_.emplace_back(p, info_->shapes[i]);
      const_views_.emplace_back(p, info_->shapes[i]);
    }
  }

  std::shared_ptr<const RegistryInfo> info_;
  std::vector<index_t> offsets_;  // slot starts in storage_, and its size
  std::vector<bool> present_;
  typename B::template Storage<U> storage_;
  // One view per slot, present or not (their shapes are the registry's);
  // const_views_ hands out read-only ones from a const buffer.
  std::vector<View> views_;
  std::vector<ConstView> const_views_;
};

// Checks that a buffer belongs to `registry`.
template <class U, class T, class B>
void require_bound_to(const ParamBuffer<U, B>& buf, const Registry<T, B>& registry, const char* op) {
  buf.require_bound(op);
  if (buf.info() != registry.info())
    fail<UsageError>("{}: buffer is bound to registry #{}, not to registry #{} (first parameter '{}')", op,
                     buf.info()->serial, registry.serial(), registry.empty() ? "" : registry.entry(0).name);
}

// A buffer of zeros shaped like every registry parameter, element type U.
template <class U, class T, class B>
ParamBuffer<U, B> zeros_like_params(const Registry<T, B>& registry) {
  ParamBuffer<U, B> buf(registry.info());
  for (index_t i = 0; i < registry.size(); ++i) buf.set_zero(registry.entry(i).id);
  return buf;
}

struct AddIntoStats {
  index_t added = 0;
  index_t skipped_no_grad = 0;  // registry parameters whose grad was empty
};

// buf[p] += scale * p.grad for every registry parameter with a gradient (the
// element type converts); parameters without one are skipped and counted.
template <class U, class T, class B>
AddIntoStats add_into_param_buffer(ParamBuffer<U, B>& buf, const Registry<T, B>& registry, double scale = 1.0) {
  require_bound_to(buf, registry, "add_into_param_buffer");
  AddIntoStats stats;
  for (index_t i = 0; i < registry.size(); ++i) {
    const auto& e = registry.entry(i);
    if (!e.param->grad) {
      ++stats.skipped_no_grad;
      continue;
    }
    const TensorView<U, B>& dst = buf.entry(i) ? *buf.entry(i) : buf.set_zero(e.id);
    const T* g = e.param->grad->data();
    U* d = dst.data();
    const U s = static_cast<U>(scale);
    B::parallel_for(dst.numel(), [=] EP_HOST_DEVICE(index_t k) { d[k] += s * static_cast<U>(g[k]); });
    ++stats.added;
  }
  if (stats.skipped_no_grad > 0)
    log_debug("add_into_param_buffer: {} of {} parameters had no gradient", stats.skipped_no_grad, registry.size());
  return stats;
}

// p.grad *= scale for every registry parameter that has a gradient.
template <class T, class B>
void scale_param_gradients(const Registry<T, B>& registry, double scale) {
  for (const auto& e : registry.entries()) {
    if (!e.param->grad) continue;
    T* g = e.param->grad->data();
    const T s = static_cast<T>(scale);
    B::parallel_for(e.param->grad->numel(), [=] EP_HOST_DEVICE(index_t k) { g[k] *= s; });
  }
}

// p.grad = scale * buf[p] (converted to the parameter's type) for entries
// present in `buf`; parameters whose entry is absent get no gradient. Used to
// hand an accumulated gradient to an optimizer step.
template <class U, class T, class B>
void load_param_gradients(const Registry<T, B>& registry, const ParamBuffer<U, B>& buf, double scale = 1.0) {
  require_bound_to(buf, registry, "load_param_gradients");
  for (index_t i = 0; i < registry.size(); ++i) {
    auto* p = registry.entry(i).param;
    const TensorView<const U, B>* src = buf.entry(i);
    if (!src) {
      p->grad.reset();
      continue;
    }
    Tensor<T, B> g(src->shape());
    const U* sp = src->data();
    T* gp = g.data();
    B::parallel_for(g.numel(),
                    [=] EP_HOST_DEVICE(index_t k) { gp[k] = static_cast<T>(scale * static_cast<double>(sp[k])); });
    p->grad = std::move(g);
  }
}

// buf *= scale (present entries). A finite scale keeps the zeros outside
// the entries, so it runs over the flat storage in one pass; an infinite or
// NaN one would not (0 * inf), so it goes entry by entry.
namespace detail {
template <class B, class U>
void scale_run(U* d, index_t n, U s) {
  B::parallel_for(n, [=] EP_HOST_DEVICE(index_t k) { d[k] *= s; });
}
}  // namespace detail

template <class U, class B>
void scale_param_buffer(ParamBuffer<U, B>& buf, double scale) {
  const U s = static_cast<U>(scale);
  if (std::isfinite(static_cast<double>(s))) {
    detail::scale_run<B>(buf.flat().data(), static_cast<index_t>(buf.flat().size()), s);
    return;
  }
  for (index_t i = 0; i < buf.size(); ++i)
    if (const auto* t = buf.entry(i)) detail::scale_run<B>(t->data(), t->numel(), s);
}

// buf *= factor element by element; an entry absent from `factor` is
// erased from `buf` (a diagonal operator with no entry there has no output).
template <class U, class V, class B>
void multiply_param_buffers(ParamBuffer<U, B>& buf, const ParamBuffer<V, B>& factor) {
  buf.require_same_registry(factor, "multiply_param_buffers");
  for (index_t i = 0; i < buf.size(); ++i) {
    const TensorView<U, B>* t = buf.entry(i);
    if (!t) continue;
    const TensorView<const V, B>* f = factor.entry(i);
    if (!f) {
      buf.erase(buf.id(i));
      continue;
    }
    U* d = t->data();
    const V* fp = f->data();
    B::parallel_for(t->numel(), [=] EP_HOST_DEVICE(index_t k) {
      d[k] = static_cast<U>(static_cast<double>(d[k]) * static_cast<double>(fp[k]));
    });
  }
}

struct DotStats {
  double value = 0;
  index_t used = 0;     // entries present in both
  index_t missing = 0;  // entries considered but absent in one of the two
};

namespace detail {
// sum_k x[k] y[k] in acc_t on the backend.
template <class B, class U, class V>
double dot_run(const U* xp, const V* yp, index_t n) {
  return B::sum(n, [=] EP_HOST_DEVICE(index_t k) { return static_cast<acc_t>(xp[k]) * static_cast<acc_t>(yp[k]); });
}
}  // namespace detail

// a . b accumulated in double, over `indices` (registry indices; all when
// empty). Entries absent in either buffer contribute nothing and are counted.
// Over all entries of two buffers that hold the same entries in the same
// layout it is one sum over the flat storage (the zeros outside the entries
// add nothing).
template <class U, class V, class B>
DotStats dot_param_buffers_stats(const ParamBuffer<U, B>& a, const ParamBuffer<V, B>& b,
                                 const std::vector<index_t>& indices = {}) {
  a.require_same_registry(b, "dot_param_buffers");
  DotStats st;
  if constexpr (sizeof(U) == sizeof(V)) {  // the same slot offsets
    if (indices.empty() && a.same_presence(b)) {
      st.used = a.present_count();
      st.missing = a.size() - st.used;
      if (st.used > 0)
        st.value = detail::dot_run<B>(a.flat().data(), b.flat().data(), static_cast<index_t>(a.flat().size()));
      return st;
    }
  }
  auto one = [&](index_t i) {
    const auto* x = a.entry(i);
    const auto* y = b.entry(i);
    if (!x || !y) {
      ++st.missing;
      return;
    }
    st.value += detail::dot_run<B>(x->data(), y->data(), x->numel());
    ++st.used;
  };
  if (indices.empty()) {
    for (index_t i = 0; i < a.size(); ++i) one(i);
  } else {
    for (index_t i : indices) one(i);
  }
  return st;
}

template <class U, class V, class B>
double dot_param_buffers(const ParamBuffer<U, B>& a, const ParamBuffer<V, B>& b,
                         const std::vector<index_t>& indices = {}) {
  return dot_param_buffers_stats(a, b, indices).value;
}

template <class U, class B>
double norm_param_buffer(const ParamBuffer<U, B>& a) {
  return std::sqrt(dot_param_buffers(a, a));
}

// The same entries converted to element type V, bound to the same registry.
template <class V, class U, class B>
ParamBuffer<V, B> cast_param_buffer(const ParamBuffer<U, B>& buf) {
  buf.require_bound("cast_param_buffer");
  ParamBuffer<V, B> out(buf.info());
  for (index_t i = 0; i < buf.size(); ++i)
    if (const auto* t = buf.entry(i)) convert_elements<B>(t->numel(), t->data(), out.set_zero(buf.id(i)).data());
  return out;
}

// A buffer of the registry parameters' current values (or gradients).
template <class U, class T, class B>
ParamBuffer<U, B> params_to_buffer(const Registry<T, B>& registry) {
  ParamBuffer<U, B> buf(registry.info());
  for (const auto& e : registry.entries())
    convert_elements<B>(e.param->value.numel(), e.param->value.data(), buf.set_zero(e.id).data());
  return buf;
}

}  // namespace entropy_probe
