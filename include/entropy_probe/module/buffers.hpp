// Parameter buffers ("mu-buffers"): one tensor per registry parameter, keyed
// by parameter id and bound to the registry they were made from.
//
// Binding is by registry identity: combining buffers of two registries, or
// touching a key the registry does not hold, is an error naming the
// parameter, never a silent skip. An entry may be absent (a parameter that
// received no gradient); absences are counted by the operations that meet them.
#pragma once

#include "entropy_probe/core/log.hpp"
#include "entropy_probe/module/registry.hpp"

#include <cmath>
#include <memory>
#include <optional>
#include <vector>

namespace entropy_probe {

template <class U, class B = CpuBackend>
class ParamBuffer {
 public:
  using scalar_type = U;
  using TensorT = Tensor<U, B>;

  ParamBuffer() = default;
  // An empty buffer (every entry absent) bound to `info`.
  explicit ParamBuffer(std::shared_ptr<const RegistryInfo> info)
      : info_(std::move(info)), entries_(static_cast<std::size_t>(info_->size())) {}

  const std::shared_ptr<const RegistryInfo>& info() const { return info_; }
  bool bound() const { return static_cast<bool>(info_); }
  index_t size() const { return static_cast<index_t>(entries_.size()); }
  const std::string& name(index_t i) const { return info_->names.at(static_cast<std::size_t>(i)); }
  ParamId id(index_t i) const { return info_->ids.at(static_cast<std::size_t>(i)); }

  // Entry by registry index; nullptr when absent.
  const TensorT* entry(index_t i) const {
    const auto& e = entries_.at(static_cast<std::size_t>(i));
    return e ? &*e : nullptr;
  }
  TensorT* entry(index_t i) {
    auto& e = entries_.at(static_cast<std::size_t>(i));
    return e ? &*e : nullptr;
  }
  index_t present_count() const {
    index_t n = 0;
    for (const auto& e : entries_) n += e.has_value();
    return n;
  }

  // Entry by parameter id; nullptr when absent. A foreign id is an error.
  const TensorT* find(ParamId id) const { return entry(index_of(id)); }
  TensorT* find(ParamId id) { return entry(index_of(id)); }
  const TensorT& at(ParamId id) const {
    const index_t i = index_of(id);
    const TensorT* t = entry(i);
    if (!t) fail<UsageError>("parameter buffer: no entry for '{}' (id {})", name(i), id.value);
    return *t;
  }

  // Stores `value` for `id`; the shape must be the parameter's.
  void set(ParamId id, TensorT value) {
    const index_t i = index_of(id);
    if (value.shape() != info_->shapes[static_cast<std::size_t>(i)])
      fail<UsageError>("parameter buffer: value for '{}' has shape {}, parameter has {}", name(i),
                       shape_str(value.shape()), shape_str(info_->shapes[static_cast<std::size_t>(i)]));
    entries_[static_cast<std::size_t>(i)] = std::move(value);
  }
  void erase(ParamId id) { entries_[static_cast<std::size_t>(index_of(id))].reset(); }

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
  std::shared_ptr<const RegistryInfo> info_;
  std::vector<std::optional<TensorT>> entries_;
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
  for (index_t i = 0; i < registry.size(); ++i)
    buf.set(registry.entry(i).id, Tensor<U, B>(registry.entry(i).param->value.shape()));
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
    Tensor<U, B>* dst = buf.entry(i);
    if (!dst) {
      buf.set(e.id, Tensor<U, B>(e.param->value.shape()));
      dst = buf.entry(i);
    }
    const T* g = e.param->grad->data();
    U* d = dst->data();
    const U s = static_cast<U>(scale);
    B::parallel_for(dst->numel(), [=] EP_HOST_DEVICE(index_t k) { d[k] += s * static_cast<U>(g[k]); });
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
    const Tensor<U, B>* src = buf.entry(i);
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

// buf *= scale (present entries).
template <class U, class B>
void scale_param_buffer(ParamBuffer<U, B>& buf, double scale) {
  for (index_t i = 0; i < buf.size(); ++i) {
    if (Tensor<U, B>* t = buf.entry(i)) {
      U* d = t->data();
      const U s = static_cast<U>(scale);
      B::parallel_for(t->numel(), [=] EP_HOST_DEVICE(index_t k) { d[k] *= s; });
    }
  }
}

// buf *= factor element by element; an entry absent from `factor` is
// erased from `buf` (a diagonal operator with no entry there has no output).
template <class U, class V, class B>
void multiply_param_buffers(ParamBuffer<U, B>& buf, const ParamBuffer<V, B>& factor) {
  buf.require_same_registry(factor, "multiply_param_buffers");
  for (index_t i = 0; i < buf.size(); ++i) {
    Tensor<U, B>* t = buf.entry(i);
    if (!t) continue;
    const Tensor<V, B>* f = factor.entry(i);
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

// a . b accumulated in double, over `indices` (registry indices; all when
// empty). Entries absent in either buffer contribute nothing and are counted.
template <class U, class V, class B>
DotStats dot_param_buffers_stats(const ParamBuffer<U, B>& a, const ParamBuffer<V, B>& b,
                                 const std::vector<index_t>& indices = {}) {
  a.require_same_registry(b, "dot_param_buffers");
  DotStats st;
  auto one = [&](index_t i) {
    const Tensor<U, B>* x = a.entry(i);
    const Tensor<V, B>* y = b.entry(i);
    if (!x || !y) {
      ++st.missing;
      return;
    }
    const U* xp = x->data();
    const V* yp = y->data();
    st.value += B::sum(x->numel(),
                       [=] EP_HOST_DEVICE(index_t k) { return static_cast<acc_t>(xp[k]) * static_cast<acc_t>(yp[k]); });
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
    if (const auto* t = buf.entry(i)) out.set(buf.id(i), t->template cast<V>());
  return out;
}

// A buffer of the registry parameters' current values (or gradients).
template <class U, class T, class B>
ParamBuffer<U, B> params_to_buffer(const Registry<T, B>& registry) {
  ParamBuffer<U, B> buf(registry.info());
  for (const auto& e : registry.entries()) buf.set(e.id, e.param->value.template cast<U>());
  return buf;
}

}  // namespace entropy_probe
