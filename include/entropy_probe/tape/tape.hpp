// The hand-written tape: a forward pass records nodes; `backward` runs their
// VJP rules in reverse from any output cotangent, `jvp` pushes leaf tangents
// forward through the same nodes.
//
// The tape knows nothing of parameters or registries (those live one layer
// up): a leaf carries an opaque key, used to look its tangent up in `jvp`, and
// an optional gradient sink that receives its gradient after `backward`.
#pragma once

#include "entropy_probe/core/config.hpp"
#include "entropy_probe/core/error.hpp"
#include "entropy_probe/tensor/tensor.hpp"

#include <cstdint>
#include <deque>
#include <functional>
#include <initializer_list>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace entropy_probe {

// A value recorded on a tape: an index into the tape's slots.
struct Var {
  index_t id = -1;
  bool valid() const { return id >= 0; }
};

// A gradient or tangent buffer handed to an op's rule. When `fresh` it was
// just allocated and holds no values yet: the rule assigns every element
// (beta() = 0 for a product); otherwise it adds (beta() = 1).
template <class T>
struct OutRef {
  T* data;
  bool fresh;
  T beta() const { return fresh ? T(0) : T(1); }
};

// Writes a sum of terms into an OutRef of n elements: the first assigning
// term takes beta() = its beta (0 when fresh), later ones 1; zeroed() first
// zero-fills a still-fresh buffer, for a term that can only add and for a
// rule whose terms all vanished.
template <class T, class B>
class SumOut {
 public:
  SumOut(OutRef<T> out, index_t n) : out_(out), n_(n) {}
  T* data() const { return out_.data; }
  T beta() {
    const T b = out_.beta();
    out_.fresh = false;
    return b;
  }
  T* zeroed() {
    if (out_.fresh) B::fill(out_.data, n_, T(0));
    out_.fresh = false;
    return out_.data;
  }

 private:
  OutRef<T> out_;
  index_t n_;
};

// out (+)= src over n elements: a copy while `out` is fresh, else an add.
template <class B, class T>
void add_into(OutRef<T> out, const T* src, index_t n) {
  T* d = out.data;
  if (out.fresh)
    B::copy(d, src, n);
  else
    B::parallel_for(n, [=] EP_HOST_DEVICE(index_t i) { d[i] += src[i]; });
}

using LeafKey = std::uint64_t;
inline constexpr LeafKey kNoLeafKey = 0;

template <class T, class B = CpuBackend>
class Tape {
 public:
  using TensorT = Tensor<T, B>;
  using GradSink = std::function<void(TensorT&&)>;
  // Looks a leaf's tangent up by key; nullptr means a zero tangent.
  using TangentSource = std::function<const TensorT*(LeafKey)>;

  Tape() = default;
  Tape(const Tape&) = delete;
  Tape& operator=(const Tape&) = delete;
  Tape(Tape&&) = delete;  // nodes capture the tape's address
  Tape& operator=(Tape&&) = delete;

  // ---- leaves --------------------------------------------------------------

  // A value that never receives a gradient or a tangent.
  Var constant(TensorT value) { return add_slot(make_slot(std::move(value), nullptr, false)); }
  // Same, borrowing a tensor that must outlive the tape.
  Var constant_ref(const TensorT& value) { return add_slot(make_slot({}, &value, false)); }

  // A leaf whose gradient stays on the tape (read it with grad()); its tangent
  // is set with set_tangent(). Used by tests and by callers that differentiate
  // with respect to inputs.
  Var input(TensorT value, bool requires_grad = true) {
    return add_slot(make_slot(std::move(value), nullptr, requires_grad));
  }

  // A borrowed leaf (a model parameter): `key` finds its tangent in jvp(),
  // `sink` receives its gradient at the end of backward().
  Var leaf_ref(const TensorT& value, LeafKey key, GradSink sink) {
    Slot s = make_slot({}, &value, true);
    s.key = key;
    s.sink = std::move(sink);
    return add_slot(std::move(s));
  }

  // ---- recording (used by op implementations) -------------------------------

  // Records a node producing `out` from `inputs`. `backward` reads the output
  // gradient (grad_data(result)) and accumulates into the inputs that need it
  // (grad_accum); `jvp` reads input tangents (tangent_data, nullptr = zero)
  // and writes the output tangent (tangent_out). Both are skipped when no
  // input needs a gradient or carries a tangent.
  Var record(const char* name, TensorT out, std::initializer_list<Var> inputs, std::function<void(Var)> backward,
             std::function<void(Var)> jvp) {
    bool needs = false;
    for (Var v : inputs) needs = needs || slot(v).requires_grad;
    Var result = add_slot(make_slot(std::move(out), nullptr, needs));
    nodes_.push_back(Node{name, std::vector<Var>(inputs), result, std::move(backward), std::move(jvp)});
    slot_mut(result).node = static_cast<index_t>(nodes_.size()) - 1;
    return result;
  }

  const TensorT& value(Var v) const {
    const Slot& s = slot(v);
    return s.ref ? *s.ref : s.owned;
  }
  const Shape& shape(Var v) const { return value(v).shape(); }
  bool requires_grad(Var v) const { return slot(v).requires_grad; }

  // Output gradient of a node during backward (never null when the node runs).
  const T* grad_data(Var v) const {
    const Slot& s = slot(v);
    return s.grad ? s.grad->data() : nullptr;
  }
  // Gradient buffer of an input, zero-filled on first touch, to accumulate into.
  T* grad_accum(Var v) {
    Slot& s = slot_mut(v);
    if (!s.grad) s.grad.emplace(value(v).shape());
    return s.grad->data();
  }
  // Same buffer for a writer that can assign instead of add: on first touch
  // it is left unfilled and `fresh`, and the caller must then assign every
  // element (a product with beta = 0, or g[i] = ...); later calls add. Saves
  // the zero fill for the first of an input's consumers, usually its only one.
  OutRef<T> grad_into(Var v) { return into(slot_mut(v).grad, v); }

  const T* tangent_data(Var v) const {
    const Slot& s = slot(v);
    return s.tangent ? s.tangent->data() : nullptr;
  }
  // Output tangent buffer, zero-filled.
  T* tangent_out(Var v) {
    Slot& s = slot_mut(v);
    if (!s.tangent) s.tangent.emplace(value(v).shape());
    return s.tangent->data();
  }
  // Output tangent buffer, unfilled, for a jvp rule that assigns every
  // element (its first product with beta = 0, or t[i] = ...).
  OutRef<T> tangent_into(Var v) { return into(slot_mut(v).tangent, v); }

  // Keys of the keyed (parameter) leaves recorded so far, in order of use.
  std::vector<LeafKey> leaf_keys() const {
    std::vector<LeafKey> keys;
    for (const Slot& s : slots_)
      if (s.key != kNoLeafKey) keys.push_back(s.key);
    return keys;
  }

  index_t num_nodes() const { return static_cast<index_t>(nodes_.size()); }
  index_t num_slots() const { return static_cast<index_t>(slots_.size()); }

  // ---- reverse mode -----------------------------------------------------------

  // Seeds d(out) = cotangent and propagates to every leaf that needs a
  // gradient: input leaves keep theirs on the tape (grad()), parameter leaves
  // hand theirs to their sink, which accumulates. May be called repeatedly on
  // one forward with different cotangents; each call starts from zero.
  void backward(Var out, const TensorT& cotangent) {
    const TensorT& y = value(out);
    if (cotangent.shape() != y.shape())
      fail<UsageError>("Tape::backward: cotangent shape {} does not match output shape {}",
                       shape_str(cotangent.shape()), shape_str(y.shape()));
    for (Slot& s : slots_) s.grad.reset();
    if (!slot(out).requires_grad) return;  // nothing upstream needs a gradient
    slot_mut(out).grad = cotangent;
    const index_t last = slot(out).node;
    for (index_t n = last; n >= 0; --n) {
      Node& node = nodes_[static_cast<std::size_t>(n)];
      Slot& os = slot_mut(node.output);
      if (!os.grad || !os.requires_grad) continue;
      node.backward(node.output);
      os.grad.reset();  // consumed: release early to bound peak memory
    }
    for (Slot& s : slots_) {
      if (s.sink && s.grad) {
        s.sink(std::move(*s.grad));
        s.grad.reset();
      }
    }
  }

  // Gradient of an input leaf after backward(); nullptr when it received none.
  const TensorT* grad(Var v) const {
    const Slot& s = slot(v);
    return s.grad ? &*s.grad : nullptr;
  }

  // ---- forward mode -----------------------------------------------------------

  // Sets the tangent of an input leaf (for jvp); shapes must agree.
  void set_tangent(Var v, TensorT tangent) {
    Slot& s = slot_mut(v);
    if (s.node >= 0) fail<UsageError>("Tape::set_tangent: var {} is not a leaf", v.id);
    if (tangent.shape() != value(v).shape())
      fail<UsageError>("Tape::set_tangent: tangent shape {} does not match value shape {}", shape_str(tangent.shape()),
                       shape_str(value(v).shape()));
    s.input_tangent = std::move(tangent);
  }

  // Pushes tangents forward through every node. Keyed leaves take theirs from
  // `source` (nullptr = zero), input leaves from set_tangent. Afterwards
  // tangent(v) is the directional derivative of v (nullptr = exactly zero).
  void jvp(const TangentSource& source = {}) {
    for (Slot& s : slots_) s.tangent.reset();
    for (Slot& s : slots_) {
      if (s.node >= 0 || !s.requires_grad) continue;
      if (s.key != kNoLeafKey) {
        const TensorT* t = source ? source(s.key) : nullptr;
        if (t) {
          const TensorT& v = s.ref ? *s.ref : s.owned;
          if (t->shape() != v.shape())
            fail<UsageError>("Tape::jvp: tangent for leaf key {} has shape {}, value has {}", s.key,
                             shape_str(t->shape()), shape_str(v.shape()));
          s.tangent = *t;
        }
      } else if (s.input_tangent) {
        s.tangent = *s.input_tangent;
      }
    }
    for (Node& node : nodes_) {
      bool any = false;
      for (Var v : node.inputs) any = any || slot(v).tangent.has_value();
      if (any) node.jvp(node.output);
    }
  }

  const TensorT* tangent(Var v) const {
    const Slot& s = slot(v);
    return s.tangent ? &*s.tangent : nullptr;
  }

  // Frees all tangents (they double the activation memory while held).
  void clear_tangents() {
    for (Slot& s : slots_) s.tangent.reset();
  }

 private:
  struct Slot {
    TensorT owned;
    const TensorT* ref = nullptr;
    bool requires_grad = false;
    LeafKey key = kNoLeafKey;
    GradSink sink;
    index_t node = -1;  // producing node, -1 for leaves
    std::optional<TensorT> grad;
    std::optional<TensorT> tangent;
    std::optional<TensorT> input_tangent;
  };
  struct Node {
    const char* name;
    std::vector<Var> inputs;
    Var output;
    std::function<void(Var)> backward;
    std::function<void(Var)> jvp;
  };

  static Slot make_slot(TensorT owned, const TensorT* ref, bool requires_grad) {
    Slot s;
    s.owned = std::move(owned);
    s.ref = ref;
    s.requires_grad = requires_grad;
    return s;
  }
  Var add_slot(Slot s) {
    slots_.push_back(std::move(s));
    return Var{static_cast<index_t>(slots_.size()) - 1};
  }
  const Slot& slot(Var v) const {
    if (v.id < 0 || v.id >= static_cast<index_t>(slots_.size()))
      fail<UsageError>("Tape: var {} does not belong to this tape ({} values)", v.id, slots_.size());
    return slots_[static_cast<std::size_t>(v.id)];
  }
  Slot& slot_mut(Var v) { return const_cast<Slot&>(std::as_const(*this).slot(v)); }
  // The buffer behind grad_into / tangent_into: allocated unfilled (fresh)
  // on first touch, shaped like v's value.
  OutRef<T> into(std::optional<TensorT>& buf, Var v) {
    if (buf) return {buf->data(), false};
    buf.emplace(TensorT::uninitialized(value(v).shape()));
    return {buf->data(), true};
  }

  // A deque: references returned by value() stay valid while later ops add
  // slots (a vector would reallocate under them).
  std::deque<Slot> slots_;
  std::vector<Node> nodes_;
};

}  // namespace entropy_probe
