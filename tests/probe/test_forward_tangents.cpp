// The probe's directional derivatives run on a forward-tangent tape
// (tape/tape.hpp): they must equal the recorded tape's jvp() on every model
// family, and the pass must hold about one layer, not the whole forward.
#include "../support/tiny_models.hpp"

#include <entropy_probe/nn/qwen3.hpp>
#include <entropy_probe/probe/components.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <random>

using namespace entropy_probe;
using namespace ep_test;

namespace {

// In double, as the probe's buffers are, whatever the model's T.
template <class T>
ParamBuffer<double> random_tangent(const Registry<T>& reg, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0, 1);
  ParamBuffer<double> buf(reg.info());
  for (const auto& e : reg.entries()) {
    Tensor<double> t(e.param->value.shape());
    for (index_t i = 0; i < t.numel(); ++i) t[i] = nd(rng);
    buf.set(e.id, std::move(t));
  }
  return buf;
}

constexpr double kTemperature = 0.7;

// d/d(eps) S[row] along the tangent, from a recorded forward and jvp(); the
// forward's S values in `values`.
template <class M, class T = typename M::scalar_type>
std::vector<double> recorded_directional(M& model, const TokenBatch& batch, const ParamBuffer<double>& tangent,
                                         std::vector<double>& values) {
  Tape<T> tape;
  Var S = record_sequence_logprobs(tape, model, batch, kTemperature);
  jvp(tape, tangent);
  REQUIRE(tape.tangent(S) != nullptr);
  std::vector<double> out;
  for (T v : tape.tangent(S)->to_host()) out.push_back(double(v));
  values.clear();
  for (T v : tape.value(S).to_host()) values.push_back(double(v));
  return out;
}

double max_relative_difference(const std::vector<double>& a, const std::vector<double>& ref) {
  REQUIRE(a.size() == ref.size());
  double scale = 0, worst = 0;
  for (double v : ref) scale = std::max(scale, std::abs(v));
  REQUIRE(scale > 0);
  for (std::size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(a[i] - ref[i]) / scale);
  return worst;
}

// per_sequence_directional (forward tangents, unit weights) against the
// recorded jvp, in one microbatch and in microbatches of one prompt; the
// tangent-free sequence_logprobs against the recorded S.
template <class M>
void check_directional(M& model, const TokenBatch& batch, double tol) {
  using T = typename M::scalar_type;
  const Registry<T> reg = Registry<T>::build(model);
  const ParamBuffer<double> tangent = random_tangent(reg, 91);
  std::vector<double> S;
  const std::vector<double> ref = recorded_directional(model, batch, tangent, S);
  CHECK(max_relative_difference(sequence_logprobs(model, batch, kTemperature), S) <= tol);
  SingleProcess comm;
  auto unit = [](const TokenBatch& mb, std::span<const double>) {
    return std::vector<double>(static_cast<std::size_t>(mb.rows()), 1.0);
  };
  for (index_t mb : {index_t(0), index_t(1)}) {
    CAPTURE(mb);
    ProbeComponents<M> c(model, reg, ProbeSettings{.mb_size = mb, .temperature = kTemperature}, comm);
    const std::vector<double> d = c.per_sequence_directional(batch, tangent, unit, "forward_tangents");
    CHECK(max_relative_difference(d, ref) <= tol);
  }
}

nn::LoraConfig decoder_lora() {
  nn::LoraConfig l = tiny_lora();
  l.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  return l;
}

nn::DecoderConfig tiny_qwen3_config() {
  nn::DecoderConfig c = tiny_qwen2_config(/*tie=*/false);
  c.family = &nn::kQwen3Family;
  c.head_dim_override = 6;  // not hidden_size / heads, as Qwen3 allows
  return c;
}

template <class T>
void check_all_families(double tol) {
  // Padded rows: left padding in prompts, right padding after responses.
  const TokenBatch gpt2_batch = random_batch(3, 2, 9, tiny_gpt2_config().vocab_size, 31);
  for (bool lm_head : {false, true}) {
    CAPTURE(lm_head);
    auto gpt2 = tiny_gpt2<T>(5, lm_head);
    check_directional(gpt2, gpt2_batch, tol);
  }
  // Grouped KV heads (2 query heads, 1 KV head), LoRA on every projection.
  const TokenBatch dec_batch = random_batch(3, 2, 9, tiny_qwen2_config(true).vocab_size, 32);
  for (bool tie : {false, true}) {
    CAPTURE(tie);
    nn::Qwen2ForCausalLM<T> qwen2(tiny_qwen2_config(tie), decoder_lora(), 6);
    check_directional(qwen2, dec_batch, tol);
  }
  nn::Qwen3ForCausalLM<T> qwen3(tiny_qwen3_config(), decoder_lora(), 8);
  check_directional(qwen3, dec_batch, tol);
}

}  // namespace

TEST_CASE("forward tangents: the probe's directional derivatives equal the recorded jvp, double",
          "[probe][forward_tangents]") {
  check_all_families<double>(1e-12);
}

TEST_CASE("forward tangents: the probe's directional derivatives equal the recorded jvp, float",
          "[probe][forward_tangents]") {
  check_all_families<float>(1e-5);
}

TEST_CASE("forward tangents: a trainable parameter outside the tangent's registry is an error",
          "[probe][forward_tangents]") {
  auto model = tiny_gpt2<double>(2);
  auto other = tiny_gpt2<double>(2);
  const Registry<double> reg = Registry<double>::build(model);
  const Registry<double> other_reg = Registry<double>::build(other);
  const ParamBuffer<double> tangent = random_tangent(other_reg, 3);  // keys of the other model's parameters
  const TokenBatch batch = random_batch(2, 2, 8, tiny_gpt2_config().vocab_size, 4);
  Tape<double> tape(forward_tangents, param_tangents(tangent, "alpha"));
  CHECK_THROWS_WITH(
      record_sequence_logprobs(tape, model, batch, 1.0),
      Catch::Contains("alpha: the forward pass used trainable parameter id") && Catch::Contains("named_parameters()"));
}

TEST_CASE("forward tangents: the pass holds about one layer, the recorded one every layer",
          "[probe][forward_tangents][memory]") {
  using Cpu = CpuBackend;
  // Bytes above those in use before the pass (model and tangent) at its peak.
  struct Peaks {
    std::size_t recorded = 0, forward_tangents = 0;
  };
  auto peaks = [](index_t layers) {
    nn::DecoderConfig cfg = tiny_qwen2_config(/*tie=*/false);
    cfg.hidden_size = 32;
    cfg.intermediate_size = 64;
    cfg.num_attention_heads = 4;
    cfg.num_key_value_heads = 2;
    cfg.num_hidden_layers = layers;
    nn::Qwen2ForCausalLM<double> model(cfg, decoder_lora(), 12);
    const Registry<double> reg = Registry<double>::build(model);
    const ParamBuffer<double> tangent = random_tangent(reg, 5);
    const TokenBatch batch = random_batch(2, 2, 32, cfg.vocab_size, 6);
    Peaks p;
    std::size_t before = Cpu::memory_in_use();
    Cpu::reset_peak_memory();
    {
      Tape<double> tape;
      Var S = record_sequence_logprobs(tape, model, batch, 1.0);
      jvp(tape, tangent);
      CHECK(tape.tangent(S) != nullptr);
    }
    p.recorded = Cpu::peak_memory() - before;
    before = Cpu::memory_in_use();
    Cpu::reset_peak_memory();
    {
      Tape<double> tape(forward_tangents, param_tangents(tangent, "test"));
      Var S = record_sequence_logprobs(tape, model, batch, 1.0);
      CHECK(tape.tangent(S) != nullptr);
    }
    p.forward_tangents = Cpu::peak_memory() - before;
    return p;
  };
  const Peaks four = peaks(4), eight = peaks(8);
  const double rec_growth = double(eight.recorded) - double(four.recorded);
  const double ft_growth = double(eight.forward_tangents) - double(four.forward_tangents);
  CAPTURE(four.recorded, four.forward_tangents, eight.recorded, eight.forward_tangents);
  WARN("peak above the model, bytes: recorded " << four.recorded << " (4 layers) " << eight.recorded
                                                << " (8), forward tangents " << four.forward_tangents << " (4) "
                                                << eight.forward_tangents << " (8)");
  REQUIRE(rec_growth > 0);
  const double recorded_per_layer = rec_growth / 4;
  // Measured: recorded 3.9 MB (4 layers), 7.9 MB (8); forward tangents 1.0 MB
  // for both, one recorded layer's worth.
  CHECK(double(eight.forward_tangents) < 0.25 * double(eight.recorded));
  CHECK(double(eight.forward_tangents) < 1.5 * recorded_per_layer);
  CHECK(ft_growth < 0.05 * rec_growth);
}
