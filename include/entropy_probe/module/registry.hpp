// The canonical parameter registry (docs/architecture.md, "The registry rule").
//
// Built once from unwrap(model): the trainable parameters in declaration
// order, with names and ids, and the LoRA view. Every phase of the probe
// iterates this and nothing else. Buffers bind to the registry's identity
// (RegistryInfo), which outlives the registry object itself.
#pragma once

#include "entropy_probe/core/log.hpp"
#include "entropy_probe/module/module.hpp"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace entropy_probe {

// The immutable description of a registry: what buffers bind to.
struct RegistryInfo {
  std::uint64_t serial = 0;  // unique per registry built in this process
  std::vector<std::string> names;
  std::vector<ParamId> ids;
  std::vector<Shape> shapes;
  std::vector<bool> in_lora_view;
  std::unordered_map<std::uint64_t, index_t> index_of_id;

  index_t size() const { return static_cast<index_t>(ids.size()); }
  // Registry index of a parameter id, or -1.
  index_t find(ParamId id) const {
    auto it = index_of_id.find(id.value);
    return it == index_of_id.end() ? -1 : it->second;
  }
};

// The LoRA view rule: a lower-cased name containing "lora_a" or "lora_b", or
// a name ending with "lm_head.weight" (a trainable lm_head).
inline bool is_lora_view_name(const std::string& name) {
  std::string lower(name);
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  const std::string suffix = "lm_head.weight";
  const bool head =
      name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
  return lower.find("lora_a") != std::string::npos || lower.find("lora_b") != std::string::npos || head;
}

template <class T, class B = CpuBackend>
class Registry {
 public:
  using ParameterT = Parameter<T, B>;

  struct Entry {
    std::string name;
    ParamId id;
    ParameterT* param;
    bool lora;
  };

  // Builds the registry of unwrap(model). Parameters reached twice (a tied
  // weight listed under two names) appear once, under their first name.
  template <class M>
  static Registry build(M& model) {
    auto& m = unwrap(model);
    using U = std::remove_cvref_t<decltype(m)>;
    static_assert(std::is_same_v<typename U::scalar_type, T> && std::is_same_v<typename U::backend_type, B>,
                  "Registry<T, B>::build: model scalar type or backend differs from the registry's");
    Registry r;
    auto info = std::make_shared<RegistryInfo>();
    info->serial = next_serial();
    m.named_parameters(ParameterVisitor<T, B>([&](const std::string& name, ParameterT& p) {
      if (!p.requires_grad) return;
      if (p.id() == ParamId{}) fail<UsageError>("registry: parameter '{}' has no id (was it moved from?)", name);
      if (info->index_of_id.count(p.id().value)) return;
      const bool lora = is_lora_view_name(name);
      info->index_of_id.emplace(p.id().value, info->size());
      info->names.push_back(name);
      info->ids.push_back(p.id());
      info->shapes.push_back(p.value.shape());
      info->in_lora_view.push_back(lora);
      r.entries_.push_back(Entry{name, p.id(), &p, lora});
    }));
    r.info_ = std::move(info);
    log_debug("[REGISTRY] trainable_tensors={} lora_tensors={}", r.size(), r.lora_count());
    return r;
  }

  index_t size() const { return static_cast<index_t>(entries_.size()); }
  bool empty() const { return entries_.empty(); }
  const std::vector<Entry>& entries() const { return entries_; }
  const Entry& entry(index_t i) const { return entries_.at(static_cast<std::size_t>(i)); }
  const std::shared_ptr<const RegistryInfo>& info() const { return info_; }
  std::uint64_t serial() const { return info_ ? info_->serial : 0; }

  index_t lora_count() const {
    return static_cast<index_t>(std::count_if(entries_.begin(), entries_.end(), [](const Entry& e) { return e.lora; }));
  }
  // Registry indices of the LoRA view, in registry order.
  std::vector<index_t> lora_view() const {
    std::vector<index_t> v;
    for (index_t i = 0; i < size(); ++i)
      if (entries_[static_cast<std::size_t>(i)].lora) v.push_back(i);
    return v;
  }
  index_t numel() const {
    index_t n = 0;
    for (const Entry& e : entries_) n += e.param->value.numel();
    return n;
  }

  // Registry index of `id`, or -1.
  index_t find(ParamId id) const { return info_ ? info_->find(id) : -1; }
  const Entry& at(ParamId id) const {
    const index_t i = find(id);
    if (i < 0)
      fail<UsageError>("registry #{}: parameter id {} is not a registered trainable parameter", serial(), id.value);
    return entries_[static_cast<std::size_t>(i)];
  }

  // The probe needs something to differentiate: an empty registry is an error.
  void require_trainable(const char* who) const {
    if (empty())
      fail<UsageError>(
          "{}: the model has no trainable parameters (requires_grad == true); "
          "nothing to probe",
          who);
  }
  void require_lora_view(const char* who) const {
    if (lora_count() == 0)
      fail<UsageError>(
          "{}: the LoRA view is empty: no trainable parameter name contains 'lora_A'/'lora_B' "
          "(any case) or ends with 'lm_head.weight'",
          who);
  }

  // Checks that `model` still holds the registered parameters at the recorded
  // addresses (after the model was moved, rebuild or rebind).
  template <class M>
  void rebind(M& model) {
    Registry fresh = build(model);
    if (fresh.size() != size())
      fail<UsageError>("registry #{}: rebind found {} trainable parameters, expected {}", serial(), fresh.size(),
                       size());
    for (index_t i = 0; i < size(); ++i) {
      auto& e = entries_[static_cast<std::size_t>(i)];
      const auto& f = fresh.entries_[static_cast<std::size_t>(i)];
      if (f.id != e.id || f.name != e.name)
        fail<UsageError>("registry #{}: rebind: parameter {} is '{}' (id {}), expected '{}' (id {})", serial(), i,
                         f.name, f.id.value, e.name, e.id.value);
      e.param = f.param;
    }
  }

  void zero_grad() const {
    for (const Entry& e : entries_) e.param->zero_grad();
  }

 private:
  static std::uint64_t next_serial() {
    static std::atomic<std::uint64_t> counter{0};
    return ++counter;
  }

  std::vector<Entry> entries_;
  std::shared_ptr<const RegistryInfo> info_;
};

}  // namespace entropy_probe
