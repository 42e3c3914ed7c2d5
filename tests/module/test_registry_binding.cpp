// The silent-skip bug class: a parameter the forward pass uses but the
// registry does not hold must be an error in every phase, never a zero.
#include "../support/tiny_models.hpp"

#include <entropy_probe/probe/components.hpp>
#include <entropy_probe/tape/ops/linear.hpp>

#include <catch2/catch.hpp>

using namespace entropy_probe;

namespace {
// A model whose named_parameters() forgets one trainable parameter.
struct Forgetful {
  using scalar_type = double;
  using backend_type = CpuBackend;
  Parameter<double> emb{Tensor<double>::full({5, 3}, 0.1)};
  Parameter<double> listed{Tensor<double>::full({3, 3}, 0.2)};
  Parameter<double> hidden{Tensor<double>::full({5, 3}, 0.3)};  // used, not listed
  void named_parameters(const ParameterVisitor<double>& v) {
    v("emb.lora_A.weight", emb);
    v("listed.lora_B.weight", listed);
  }
  index_t vocab_size() const { return 5; }
  Var forward(Tape<double>& tape, const SequenceInput& in) {
    Var h = embedding(tape, use(tape, emb), std::span<const std::int32_t>(in.tokens));
    h = linear(tape, h, use(tape, listed));
    return reshape(tape, linear(tape, h, use(tape, hidden)), {in.rows, in.length, 5});
  }
};
static_assert(CausalLM<Forgetful>);
}  // namespace

TEST_CASE("binding: a used but unregistered parameter fails accumulation and JVP", "[registry][binding]") {
  Forgetful m;
  auto reg = Registry<double>::build(m);
  REQUIRE(reg.size() == 2);
  const TokenBatch E = ep_test::random_batch(2, 2, 5, 5, 1);
  SingleProcess comm;
  ProbeComponents<Forgetful> c(m, reg, ProbeSettings{}, comm);
  REQUIRE_THROWS_WITH(c.accumulate_sum_X(E), Catch::Contains("registry #") && Catch::Contains("named_parameters()"));
  auto v = zeros_like_params<double>(reg);
  REQUIRE_THROWS_WITH(
      c.per_prompt_directional(
          E, v,
          [](const TokenBatch& b, std::span<const double>) { return std::vector<double>(std::size_t(b.rows()), 1.0); },
          "test"),
      Catch::Contains("named_parameters()"));
}

TEST_CASE("binding: LoRA models freeze every base parameter, as PEFT does", "[registry][binding]") {
  nn::LoraConfig l = ep_test::tiny_lora();
  l.target_modules = {"c_attn"};  // c_proj and c_fc untargeted: they must be frozen too
  nn::Gpt2LMHeadModel<double> m(ep_test::tiny_gpt2_config(), l, 1);
  auto reg = Registry<double>::build(m);
  CHECK(reg.size() == reg.lora_count());
  CHECK(reg.size() == 2 * 2);  // lora_A and lora_B of c_attn in two layers
  l.modules_to_save = {"lm_head"};
  nn::Gpt2LMHeadModel<double> with_head(ep_test::tiny_gpt2_config(), l, 1);
  auto reg2 = Registry<double>::build(with_head);
  CHECK(reg2.size() == 5);
  CHECK(reg2.entry(4).name == "base_model.model.lm_head.weight");
}
