#include <entropy_probe/module/bind.hpp>
#include <entropy_probe/module/registry.hpp>

#include <catch2/catch.hpp>

#include <string>
#include <vector>

using namespace entropy_probe;

namespace {

// A small module tree written the way a user would: a LoRA'd projection with
// mixed-case names, a frozen base weight, and an optional trainable lm_head.
struct Proj {
  using scalar_type = double;
  using backend_type = CpuBackend;
  Parameter<double> weight{Tensor<double>({3, 2}), false};
  Parameter<double> lora_a{Tensor<double>({1, 2})};
  Parameter<double> lora_b{Tensor<double>({3, 1})};
  void named_parameters(const ParameterVisitor<double>& v) {
    v("base_layer.weight", weight);
    v("lora_A.default.weight", lora_a);
    v("LoRA_B.default.weight", lora_b);
  }
};

struct Net {
  using scalar_type = double;
  using backend_type = CpuBackend;
  Proj q, k;
  Parameter<double> norm{Tensor<double>({2})};
  Parameter<double> lm_head{Tensor<double>({5, 2}), false};
  void named_parameters(const ParameterVisitor<double>& v) {
    visit_child(v, "model.q_proj", q);
    visit_child(v, "model.k_proj", k);
    v("model.norm.weight", norm);
    v("lm_head.weight", lm_head);
  }
};

struct Tied {
  using scalar_type = double;
  using backend_type = CpuBackend;
  Parameter<double> emb{Tensor<double>({4, 2})};
  void named_parameters(const ParameterVisitor<double>& v) {
    v("wte.weight", emb);
    v("lm_head.weight", emb);
  }
};

struct Ddp {
  Net inner;
  Net& module() { return inner; }
};

static_assert(Module<Net>);
static_assert(!Wrapper<Net>);
static_assert(Wrapper<Ddp>);

}  // namespace

TEST_CASE("registry: trainables in declaration order, frozen excluded", "[registry]") {
  Net net;
  auto reg = Registry<double>::build(net);
  std::vector<std::string> names;
  for (const auto& e : reg.entries()) names.push_back(e.name);
  CHECK(names == std::vector<std::string>{"model.q_proj.lora_A.default.weight", "model.q_proj.LoRA_B.default.weight",
                                          "model.k_proj.lora_A.default.weight", "model.k_proj.LoRA_B.default.weight",
                                          "model.norm.weight"});
  CHECK(reg.numel() == 2 + 3 + 2 + 3 + 2);
  // LoRA view: case-insensitive lora_a / lora_b; lm_head only when trainable.
  CHECK(reg.lora_count() == 4);
  CHECK(reg.lora_view() == std::vector<index_t>{0, 1, 2, 3});
  net.lm_head.requires_grad = true;
  auto reg2 = Registry<double>::build(net);
  CHECK(reg2.size() == 6);
  CHECK(reg2.lora_count() == 5);
  CHECK(reg2.entry(5).lora);
}

TEST_CASE("registry: the LoRA view name rule", "[registry]") {
  CHECK(is_lora_view_name("base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"));
  CHECK(is_lora_view_name("x.LORA_b.weight"));
  CHECK(is_lora_view_name("base_model.model.lm_head.weight"));
  CHECK_FALSE(is_lora_view_name("lm_head.weight.bias"));
  CHECK_FALSE(is_lora_view_name("model.norm.weight"));
  CHECK_FALSE(is_lora_view_name("lm_head.Weight"));  // suffix match is exact, as in the original
}

TEST_CASE("registry: a wrapper and its module give the same parameters and ids", "[registry]") {
  Ddp ddp;
  auto a = Registry<double>::build(ddp);
  auto b = Registry<double>::build(ddp.inner);
  REQUIRE(a.size() == b.size());
  for (index_t i = 0; i < a.size(); ++i) {
    CHECK(a.entry(i).name == b.entry(i).name);
    CHECK(a.entry(i).id == b.entry(i).id);
    CHECK(a.entry(i).param == b.entry(i).param);
  }
  CHECK(a.serial() != b.serial());  // two registries, even of one model
}

TEST_CASE("registry: ids survive a move of the owning module; rebind follows it", "[registry]") {
  Net net;
  auto reg = Registry<double>::build(net);
  const ParamId id0 = reg.entry(0).id;
  Net moved = std::move(net);
  CHECK(moved.q.lora_a.id() == id0);
  CHECK(net.q.lora_a.id() == ParamId{});  // the moved-from shell has no identity
  reg.rebind(moved);
  CHECK(reg.entry(0).param == &moved.q.lora_a);
  Net other;
  REQUIRE_THROWS_WITH(reg.rebind(other), Catch::Contains("rebind: parameter 0"));
}

TEST_CASE("registry: a tied parameter listed twice appears once", "[registry]") {
  Tied tied;
  auto reg = Registry<double>::build(tied);
  REQUIRE(reg.size() == 1);
  CHECK(reg.entry(0).name == "wte.weight");
}

TEST_CASE("registry: empty trainable set and empty LoRA view are clear errors", "[registry]") {
  Net net;
  net.q.lora_a.requires_grad = net.q.lora_b.requires_grad = false;
  net.k.lora_a.requires_grad = net.k.lora_b.requires_grad = false;
  auto reg = Registry<double>::build(net);
  REQUIRE_THROWS_WITH(reg.require_lora_view("probe"), Catch::Contains("LoRA view is empty"));
  net.norm.requires_grad = false;
  auto none = Registry<double>::build(net);
  REQUIRE_THROWS_WITH(none.require_trainable("probe"), Catch::Contains("no trainable parameters"));
  REQUIRE_THROWS_AS(none.at(net.norm.id()), UsageError);
}

TEST_CASE("registry: construction logs the debug line", "[registry][log]") {
  std::vector<std::string> lines;
  set_log_level(LogLevel::debug);
  set_log_sink([&](LogLevel, std::string_view m) { lines.emplace_back(m); });
  Net net;
  (void)Registry<double>::build(net);
  set_log_sink({});
  set_log_level(LogLevel::info);
  REQUIRE(lines.size() == 1);
  CHECK(lines[0] == "[REGISTRY] trainable_tensors=5 lora_tensors=4");
}

TEST_CASE("logging: nothing is emitted below the level or without a sink", "[log]") {
  std::vector<std::string> lines;
  set_log_level(LogLevel::warning);
  set_log_sink([&](LogLevel, std::string_view m) { lines.emplace_back(m); });
  log_info("hidden {}", 1);
  log_warning("shown {}", 2);
  set_log_sink({});
  log_warning("dropped");
  set_log_level(LogLevel::info);
  CHECK(lines == std::vector<std::string>{"shown 2"});
}
