// The hand-written tape: a forward pass records nodes; `backward` runs their
// VJP rules in reverse from any output cotangent, `jvp` pushes leaf tangents
// forward through the same nodes.
//
// A tape constructed with ForwardTangents keeps no nodes instead: each op's
// JVP rule runs as the op is recorded, so values and tangents flow forward
// together, and release_since() frees what a finished layer no longer needs.
// Peak memory is then that of inference plus one layer, not of training.
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
#include <memory>
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

// The one way a rule gets its output buffer (Tape::grad_into / tangent_into):
// `size` elements whose logical value starts at zero. When `fresh` the buffer
// was just allocated and holds no values yet, so the rule's first write to
// an element assigns it (beta() = 0 for a product, add() assigns); otherwise
// writes add (beta() = 1). This saves the zero fill for the first of an
// input's consumers, usually its only one. A rule that can only add (a
// scatter, operands aliasing one buffer, tiles written in no fixed order)
// asks for the fill with zeroed(), which fills only while the buffer is
// still fresh.
template <class T, class B = CpuBackend>
struct OutRef {
  T* data = nullptr;
  index_t size = 0;
  bool fresh = false;

  T beta() const { return fresh ? T(0) : T(1); }
  // data[i] (+)= v: assigns while fresh. For kernels that write each element once.
  EP_HOST_DEVICE void add(index_t i, T v) const { data[i] = fresh ? v : data[i] + v; }
  // Zero-fills a still-fresh buffer; from then on every write adds.
  T* zeroed() {
    if (fresh) B::fill(data, size, T(0));
    fresh = false;
    return data;
  }
};

// Writes a sum of terms into an OutRef: the first term takes the buffer's
// freshness (a product its beta(), a kernel an OutRef whose add() assigns),
// later terms add; zeroed() first zero-fills a still-fresh buffer, for a term
// that can only add and for a rule whose terms all vanished.
template <class T, class B>
class SumOut {
 public:
  explicit SumOut(OutRef<T, B> out) : out_(out) {}
  T* data() const { return out_.data; }
  T beta() { return term().beta(); }
  // The buffer as seen by the next term, which writes each element once.
  OutRef<T, B> term() {
    const OutRef<T, B> t = out_;
    out_.fresh = false;
    return t;
  }
  T* zeroed() { return out_.zeroed(); }

 private:
  OutRef<T, B> out_;
};

// out (+)= src over all of out: a copy while `out` is fresh, else an add.
template <class T, class B>
void add_into(OutRef<T, B> out, const T* src) {
  if (out.fresh)
    B::copy(out.data, src, out.size);
  else
    B::parallel_for(out.size, [=] EP_HOST_DEVICE(index_t i) { out.data[i] += src[i]; });
}

// State an op saves for its rules (tensors, masks, index vectors, row
// statistics): one object per op, built by the forward and then shared,
// immutable, by the backward and jvp closures, so copying a closure into a
// std::function never deep-copies a tensor. Small scalars (dims, flags) are
// captured by value instead.
template <class S>
std::shared_ptr<const S> save_for_rules(S state) {
  return std::make_shared<const S>(std::move(state));
}

using LeafKey = std::uint64_t;
inline constexpr LeafKey kNoLeafKey = 0;

// Selects the tape's forward-tangent mode (see the top of this file).
struct ForwardTangents {};
inline constexpr ForwardTangents forward_tangents{};

// The slots created after a point of a forward pass (Tape::mark).
struct TapeMark {
  index_t first_slot = 0;
};

template <class T, class B = CpuBackend>
class Tape {
 public:
  using TensorT = Tensor<T, B>;
  using GradSink = std::function<void(TensorT&&)>;
  // A tangent as the tape hands it out: a view of a tensor the tape owns (an
  // op's output tangent) or of one it borrows (a parameter's tangent, read
  // in place from a parameter buffer's storage).
  using TangentView = TensorView<const T, B>;
  // Looks a leaf's tangent up by key; nullopt means a zero tangent.
  using TangentSource = std::function<std::optional<TangentView>(LeafKey)>;

  Tape() = default;
  // Forward-tangent mode: keyed leaves borrow their tangent from `source` as
  // they are created (what its views point into must outlive the tape;
  // nullopt = zero tangent).
  Tape(ForwardTangents, TangentSource source) : eager_(true), source_(std::move(source)) {}
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
  // is set with set_tangent() (in forward-tangent mode before any op uses
  // it). Used by tests and by callers that differentiate w.r.t. inputs.
  Var input(TensorT value, bool requires_grad = true) {
    return add_slot(make_slot(std::move(value), nullptr, requires_grad));
  }

  // A borrowed leaf (a model parameter): `key` finds its tangent in jvp(),
  // `sink` receives its gradient at the end of backward().
  Var leaf_ref(const TensorT& value, LeafKey key, GradSink sink) {
    Slot s = make_slot({}, &value, true);
    s.key = key;
    s.sink = std::move(sink);
    if (eager_) s.tangent_view = leaf_tangent(key, value, "Tape (forward tangents)");
    return add_slot(std::move(s));
  }

  // ---- recording (used by op implementations) -------------------------------

  // Records a node producing `out` from `inputs`. `backward` reads the output
  // gradient (grad_data(result)) and adds into the inputs that need it
  // (grad_into); `jvp` reads input tangents (tangent_data, nullptr = zero)
  // and writes the output tangent (tangent_into). Both get their buffer as an
  // OutRef: assign while fresh, else add. Both are skipped when no input
  // needs a gradient or carries a tangent. Op state the rules need is saved
  // once (save_for_rules) and captured by both.
  //
  // In forward-tangent mode the jvp rule runs here, at once, and the node is
  // not kept: its closures, and the op state they saved, die on return.
  Var record(const char* name, TensorT out, std::initializer_list<Var> inputs, std::function<void(Var)> backward,
             std::function<void(Var)> jvp) {
    bool needs = false;
    for (Var v : inputs) {
      Slot& in = slot_mut(v);  // also refuses a released input
      in.consumed = true;
      // forward tangents: only an input carrying a tangent makes derivative work
      needs = needs || (eager_ ? in.tangent_view.has_value() : in.requires_grad);
    }
    Var result = add_slot(make_slot(std::move(out), nullptr, needs));
    if (eager_) {
      slot_mut(result).node = kEagerNode;
      if (needs) jvp(result);
      return result;
    }
    nodes_.push_back(Node{name, std::vector<Var>(inputs), result, std::move(backward), std::move(jvp)});
    slot_mut(result).node = static_cast<index_t>(nodes_.size()) - 1;
    return result;
  }

  // ---- lifetime (forward-tangent mode) --------------------------------------

  // Model code holds Var indices, so the tape cannot see when a value dies:
  // a layer loop marks where it starts and releases what it created but
  // returns no further.
  TapeMark mark() const { return {num_slots()}; }

  // Frees the values and tangents of every slot created since `m` except
  // `keep`; any later use of a released var is a UsageError. A no-op on a
  // recording tape, whose backward pass still needs them.
  void release_since(TapeMark m, std::initializer_list<Var> keep) {
    if (!eager_) return;
    for (index_t i = m.first_slot; i < num_slots(); ++i) {
      bool kept = false;
      for (Var v : keep) kept = kept || v.id == i;
      Slot& s = slots_[static_cast<std::size_t>(i)];
      if (kept || s.released) continue;
      s.owned = TensorT{};
      s.ref = nullptr;
      s.tangent.reset();
      s.input_tangent.reset();
      s.tangent_view.reset();
      s.released = true;
    }
  }

  bool forward_tangent_mode() const { return eager_; }

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
  // Gradient buffer of an input, to add the rule's term into (see OutRef):
  // fresh (unfilled) on the first call after backward() starts, shared and
  // not fresh on later calls for the same input.
  OutRef<T, B> grad_into(Var v) { return into(slot_mut(v).grad, v); }

  const T* tangent_data(Var v) const {
    const TangentView* t = tangent(v);
    return t ? t->data() : nullptr;
  }
  // Output tangent buffer of a jvp rule (see OutRef): fresh, since each node's
  // rule runs once per jvp() (in forward-tangent mode, once, as it is recorded).
  OutRef<T, B> tangent_into(Var v) {
    Slot& s = slot_mut(v);
    const OutRef<T, B> out = into(s.tangent, v);
    s.tangent_view = std::as_const(*s.tangent).view();
    return out;
  }

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
    if (eager_)
      fail<UsageError>(
          "Tape::backward: this tape is in forward-tangent mode, which keeps no nodes to run backward; record the "
          "forward on a default-constructed Tape for reverse mode");
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
    if (s.node != kLeaf) fail<UsageError>("Tape::set_tangent: var {} is not a leaf", v.id);
    if (tangent.shape() != value(v).shape())
      fail<UsageError>("Tape::set_tangent: tangent shape {} does not match value shape {}", shape_str(tangent.shape()),
                       shape_str(value(v).shape()));
    if (eager_) {
      if (s.key != kNoLeafKey || s.ref)
        fail<UsageError>("Tape::set_tangent: var {} is not an input leaf (keyed leaves take the tape's source)", v.id);
      if (!s.requires_grad)
        fail<UsageError>("Tape::set_tangent: input var {} was created with requires_grad = false", v.id);
      if (s.consumed)
        fail<UsageError>(
            "Tape::set_tangent: input var {} was already used by an op; in forward-tangent mode its tangent must be "
            "set before",
            v.id);
    }
    s.input_tangent = std::move(tangent);
    if (eager_) s.tangent_view = std::as_const(*s.input_tangent).view();
  }

  // Pushes tangents forward through every node. Keyed leaves take theirs from
  // `source` (nullptr = zero), input leaves from set_tangent. Afterwards
  // tangent(v) is the directional derivative of v (nullptr = exactly zero).
  void jvp(const TangentSource& source = {}) {
    if (eager_)
      fail<UsageError>(
          "Tape::jvp: this tape is in forward-tangent mode; its tangents were pushed as the forward ran (read them "
          "with tangent())");
    clear_tangents();
    for (Slot& s : slots_) {
      if (s.node != kLeaf || !s.requires_grad) continue;
      if (s.key != kNoLeafKey) {
        const std::optional<TangentView> t =
            source ? checked_tangent(source(s.key), s.key, s.ref ? *s.ref : s.owned, "Tape::jvp") : std::nullopt;
        // A copy: the tangents stay readable after the source has gone.
        if (t) s.tangent = t->template cast<T>();
      } else if (s.input_tangent) {
        s.tangent = *s.input_tangent;
      }
      if (s.tangent) s.tangent_view = std::as_const(*s.tangent).view();
    }
    for (Node& node : nodes_) {
      bool any = false;
      for (Var v : node.inputs) any = any || tangent(v) != nullptr;
      if (any) node.jvp(node.output);
    }
  }

  // The tangent of v; nullptr when it is exactly zero. Valid while v's slot
  // holds it (and, for a borrowed one, while its source's storage lives).
  const TangentView* tangent(Var v) const {
    const Slot& s = slot(v);
    return s.tangent_view ? &*s.tangent_view : nullptr;
  }

  // Frees all tangents (they double the activation memory while held).
  void clear_tangents() {
    for (Slot& s : slots_)
      if (s.tangent) {  // a forward-tangent leaf's borrowed view costs nothing and stays
        s.tangent.reset();
        s.tangent_view.reset();
      }
  }

 private:
  struct Slot {
    TensorT owned;
    const TensorT* ref = nullptr;
    bool requires_grad = false;
    LeafKey key = kNoLeafKey;
    GradSink sink;
    index_t node = kLeaf;  // producing node, kLeaf for leaves, kEagerNode when not kept
    std::optional<TensorT> grad;
    std::optional<TensorT> tangent;           // an op's output tangent, owned
    std::optional<TangentView> tangent_view;  // what tangent() returns: of `tangent`, or a leaf's, borrowed
    std::optional<TensorT> input_tangent;
    bool consumed = false;  // an op used it (forward-tangent mode: too late for set_tangent)
    bool released = false;  // release_since freed it
  };
  static constexpr index_t kLeaf = -1;
  static constexpr index_t kEagerNode = -2;
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
    const Slot& s = slots_[static_cast<std::size_t>(v.id)];
    if (s.released)
      fail<UsageError>(
          "Tape: var {} was released by release_since (its layer had finished); keep it in the release's keep list "
          "to use it later",
          v.id);
    return s;
  }
  // A keyed leaf's tangent from `t` (nullopt = zero), its shape checked.
  static std::optional<TangentView> checked_tangent(std::optional<TangentView> t, LeafKey key, const TensorT& value,
                                                    const char* who) {
    if (t && t->shape() != value.shape())
      fail<UsageError>("{}: tangent for leaf key {} has shape {}, value has {}", who, key, shape_str(t->shape()),
                       shape_str(value.shape()));
    return t;
  }
  std::optional<TangentView> leaf_tangent(LeafKey key, const TensorT& value, const char* who) const {
    return source_ ? checked_tangent(source_(key), key, value, who) : std::nullopt;
  }
  Slot& slot_mut(Var v) { return const_cast<Slot&>(std::as_const(*this).slot(v)); }
  // The buffer behind grad_into / tangent_into: allocated unfilled (fresh)
  // on first touch, shaped like v's value.
  OutRef<T, B> into(std::optional<TensorT>& buf, Var v) {
    const bool fresh = !buf;
    if (fresh) buf.emplace(TensorT::uninitialized(value(v).shape()));
    return {buf->data(), buf->numel(), fresh};
  }

  // A deque: references returned by value() stay valid while later ops add
  // slots (a vector would reallocate under them).
  std::deque<Slot> slots_;
  std::vector<Node> nodes_;
  bool eager_ = false;  // forward-tangent mode
  TangentSource source_;
};

}  // namespace entropy_probe
