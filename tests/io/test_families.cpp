// The decoder families (nn/families.hpp) and the config fields of issue 14:
// writing and loading each family, the layout differences between them, the
// sliding-window rule, and the config.json fields honoured or refused by
// name. Numerical agreement with transformers is in tests/parity.
#include "../support/files.hpp"
#include "../support/tiny_models.hpp"

#include <entropy_probe/io/hf.hpp>

#include <catch2/catch.hpp>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

using namespace entropy_probe;
using namespace ep_test;
using Catch::Contains;
using nlohmann::json;

namespace {

// A tiny config of `family`: 2 layers, GQA (4 query heads, 2 KV heads).
nn::DecoderConfig tiny_config(const nn::DecoderFamily& family) {
  nn::DecoderConfig c = family.defaults();
  c.vocab_size = 17;
  c.hidden_size = 16;
  c.intermediate_size = 24;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.max_position_embeddings = 32;
  c.head_dim_override = family.qk_norm ? 6 : 0;  // Qwen3: head_dim independent of hidden / heads
  c.sliding_layers.clear();
  return c;
}

nn::LoraConfig all_linear_lora() {
  nn::LoraConfig l;
  l.r = 2;
  l.lora_alpha = 4;
  l.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  l.init_lora_b_zero = false;
  return l;
}

// Rows of unequal length with left and right padding.
SequenceInput input(index_t rows, index_t length, std::uint64_t seed, std::uint64_t vocab = 17) {
  std::mt19937_64 rng(seed);
  SequenceInput in;
  in.rows = rows;
  in.length = length;
  for (index_t r = 0; r < rows; ++r)
    for (index_t t = 0; t < length; ++t) {
      in.tokens.push_back(static_cast<std::int32_t>(rng() % vocab));
      in.key_mask.push_back(static_cast<std::uint8_t>(!(r == 1 && t == 0) && !(r == 0 && t == length - 1)));
      in.positions.push_back(static_cast<std::int32_t>(t));
    }
  return in;
}

template <class M>
std::vector<double> logits(M& m, const SequenceInput& in) {
  Tape<double> tape;
  return tape.value(m.forward(tape, in)).to_host();
}

template <class M>
std::map<std::string, Shape> parameter_shapes(M& m) {
  std::map<std::string, Shape> out;
  m.named_parameters(
      ParameterVisitor<double>([&](const std::string& name, Parameter<double>& p) { out[name] = p.value.shape(); }));
  return out;
}

}  // namespace

TEST_CASE("families: each decoder family writes and loads with its layout", "[io][families]") {
  for (const nn::DecoderFamily* family : nn::kDecoderFamilies) {
    CAPTURE(family->model_type);
    nn::DecoderConfig c = tiny_config(*family);
    c.attention_bias = true;  // honoured by Llama and Qwen3, fixed by Qwen2, absent in Mistral
    c.mlp_bias = true;        // honoured by Llama only
    c.tie_word_embeddings = std::string(family->model_type) == "qwen2";
    c.rope_theta = 12345.0;
    nn::DecoderForCausalLM<double> m(c, all_linear_lora(), 7);
    // give every norm and bias a value a missing load would not reproduce
    std::mt19937_64 rng(3);
    m.named_parameters(ParameterVisitor<double>([&](const std::string& name, Parameter<double>& p) {
      if (name.find("norm") != std::string::npos || name.find("bias") != std::string::npos)
        p.value = nn::random_uniform<double, CpuBackend>(p.value.shape(), rng, 1.0);
    }));
    TempDir dir;
    hf::save_pretrained(m, dir.str(), safetensors::Dtype::F64);
    const json cfg = read_json(dir.file("config.json"));
    CHECK(cfg["model_type"] == family->model_type);
    CHECK(cfg["architectures"][0] == family->architecture);

    auto any = hf::load_model<double>(dir.str());
    REQUIRE(any.index() == 1);
    auto& loaded = std::get<1>(any);
    CHECK(std::string(loaded.model_type()) == family->model_type);
    CHECK(loaded.config().rope_theta == 12345.0);
    CHECK(parameter_shapes(loaded) == parameter_shapes(m));
    const SequenceInput in = input(2, 5, 9);
    CHECK(logits(loaded, in) == logits(m, in));

    const auto shapes = parameter_shapes(m);
    const std::string l0 = "base_model.model.model.layers.0.";
    const std::string mt = family->model_type;
    CHECK(shapes.count(l0 + "self_attn.q_proj.base_layer.bias") == (mt != "mistral"));
    CHECK(shapes.count(l0 + "self_attn.o_proj.base_layer.bias") == (mt == "llama" || mt == "qwen3"));
    CHECK(shapes.count(l0 + "mlp.gate_proj.base_layer.bias") == (mt == "llama"));
    CHECK(shapes.count(l0 + "self_attn.q_norm.weight") == (mt == "qwen3"));
    CHECK(shapes.count(l0 + "self_attn.k_norm.weight") == (mt == "qwen3"));
    if (mt == "qwen3") {
      CHECK(shapes.at(l0 + "self_attn.q_norm.weight") == Shape{6});
      CHECK(shapes.at(l0 + "self_attn.q_proj.base_layer.weight") == Shape{4 * 6, 16});
      CHECK(shapes.at(l0 + "self_attn.o_proj.base_layer.weight") == Shape{16, 4 * 6});
    }
  }
}

TEST_CASE("families: Qwen3's q_norm and k_norm act per head before rotary", "[io][families]") {
  // The head norms are part of the forward: one entry of the [head_dim]
  // q_norm weight (shared by every head) and the norm's eps change the
  // logits. Their agreement with transformers is in tests/parity.
  nn::DecoderConfig c = tiny_config(nn::kQwen3Family);
  nn::DecoderForCausalLM<double> m(c, std::nullopt, 5);
  const SequenceInput in = input(2, 6, 4);
  const std::vector<double> base = logits(m, in);
  auto& qn = *m.layers()[0].q_norm;
  REQUIRE(qn.weight.value.shape() == Shape{6});
  qn.weight.value[2] = 3.0;  // the same feature of every head
  CHECK(logits(m, in) != base);
  qn.weight.value[2] = 1.0;
  CHECK(logits(m, in) == base);
  qn.eps = 1e-2;  // rms_norm_eps reaches the head norms
  CHECK(logits(m, in) != base);
}

TEST_CASE("families: a sliding window is exact within it and refused beyond", "[io][families]") {
  nn::DecoderConfig c = tiny_config(nn::kMistralFamily);
  nn::DecoderForCausalLM<double> full(c, std::nullopt, 11);
  c.sliding_window = 5;
  for (index_t l = 0; l < c.num_hidden_layers; ++l) c.sliding_layers.push_back(l);
  nn::DecoderForCausalLM<double> sliding(c, std::nullopt, 11);
  // rows of 6 with one padding token each: real tokens span 5 = the window
  const SequenceInput in = input(2, 6, 3);
  CHECK(logits(sliding, in) == logits(full, in));
  const SequenceInput longer = input(2, 7, 3);  // spans 6 > 5
  CHECK_INPUT_ERROR(logits(sliding, longer),
                    Contains("mistral forward") && Contains("sliding_window 5") && Contains("spans 6 tokens"));
  TempDir dir;
  hf::save_pretrained(sliding, dir.str(), safetensors::Dtype::F64);
  CHECK(read_json(dir.file("config.json"))["sliding_window"] == 5);
  auto loaded = hf::load_decoder<double>(dir.str());
  CHECK(loaded.config().sliding_layers == std::vector<index_t>{0, 1});
  CHECK(logits(loaded, in) == logits(full, in));
}

TEST_CASE("families: config fields honoured and refused by name", "[io][families]") {
  TempDir dir;
  nn::DecoderForCausalLM<double> llama(tiny_config(nn::kLlamaFamily), std::nullopt, 2);
  hf::save_pretrained(llama, dir.str(), safetensors::Dtype::F64);
  const json base = read_json(dir.file("config.json"));
  auto parse = [](const json& j, const nn::DecoderFamily& f = nn::kLlamaFamily) {
    return hf::decoder_config_from_json(j, "c.json", f);
  };
  using Type = RopeParameters::Type;

  SECTION("rope scaling in the transformers 4 layout (top-level rope_theta, rope_scaling)") {
    json j = base;
    j.erase("rope_parameters");
    j["rope_theta"] = 500000.0;
    j["rope_scaling"] = {{"rope_type", "llama3"},
                         {"factor", 8.0},
                         {"low_freq_factor", 1.0},
                         {"high_freq_factor", 4.0},
                         {"original_max_position_embeddings", 8}};
    const nn::DecoderConfig c = parse(j);
    CHECK(c.rope_theta == 500000.0);
    CHECK(c.rope_scaling.type == Type::llama3);
    CHECK(c.rope_scaling.factor == 8.0);
    CHECK(c.rope_scaling.original_max_position_embeddings == 8);
    j["rope_scaling"]["high_freq_factor"] = 1.0;
    CHECK_INPUT_ERROR(parse(j), Contains("c.json") && Contains("high_freq_factor 1 must exceed low_freq_factor 1"));
    j["rope_scaling"]["high_freq_factor"] = 4.0;
    j["rope_scaling"].erase("low_freq_factor");
    CHECK_INPUT_ERROR(parse(j), Contains("c.json") && Contains("missing field 'rope_scaling.low_freq_factor'"));
    j["rope_scaling"] = {{"type", "dynamic"}, {"factor", 2.0}};  // the older key
    CHECK(parse(j).rope_scaling.type == Type::dynamic);
    j["rope_scaling"] = {{"type", "yarn"}, {"factor", 4.0}};  // Qwen2.5's long-context setting
    const nn::DecoderConfig y = parse(j);
    CHECK(y.rope_scaling.type == Type::yarn);
    CHECK(y.rope_scaling.original_max_position_embeddings == 32);  // max_position_embeddings
    CHECK(y.rope_scaling.beta_fast == 32.0);
    j["rope_scaling"] = {{"rope_type", "longrope"}, {"factor", 4.0}};
    CHECK_INPUT_ERROR(parse(j), Contains("c.json") && Contains("'rope_scaling.rope_type' = \"longrope\"") &&
                                    Contains("not supported"));
  }
  SECTION("rope scaling in the transformers 5 layout, round trip through the writer") {
    nn::DecoderConfig c = tiny_config(nn::kQwen3Family);
    c.rope_scaling.type = Type::yarn;
    c.rope_scaling.factor = 4.0;
    c.rope_scaling.original_max_position_embeddings = 8;
    c.rope_scaling.attention_factor = 0.9;
    nn::DecoderForCausalLM<double> m(c, std::nullopt, 1);
    TempDir d2;
    hf::save_pretrained(m, d2.str(), safetensors::Dtype::F64);
    const json j = read_json(d2.file("config.json"));
    CHECK(j["rope_parameters"]["rope_type"] == "yarn");
    const nn::DecoderConfig back = parse(j, nn::kQwen3Family);
    CHECK(back.rope_scaling.type == Type::yarn);
    CHECK(back.rope_scaling.attention_factor == 0.9);
    CHECK(back.head_dim() == 6);
    auto loaded = hf::load_model<double>(d2.str());
    const SequenceInput in = input(2, 5, 1);
    CHECK(logits(std::get<1>(loaded), in) == logits(m, in));
    json two = j;
    two["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 2.0}};
    CHECK_INPUT_ERROR(parse(two, nn::kQwen3Family),
                      Contains("disagree") && Contains("\"yarn\"") && Contains("\"linear\""));
  }
  SECTION("head_dim, defaults per family, activations") {
    json j = base;
    j.erase("head_dim");
    CHECK(parse(j).head_dim() == 4);                      // Llama: hidden_size / num_attention_heads
    CHECK(parse(j, nn::kQwen3Family).head_dim() == 128);  // Qwen3Config's default
    j.erase("num_key_value_heads");
    CHECK(parse(j).num_key_value_heads == 4);                                            // Llama: num_attention_heads
    CHECK_INPUT_ERROR(parse(j, nn::kMistralFamily), Contains("num_key_value_heads 8"));  // MistralConfig's 8
    j = base;
    j["hidden_act"] = "gelu";
    CHECK(parse(j).hidden_act == nn::Activation::gelu_erf);
    j["hidden_act"] = "gelu_fast";
    CHECK_INPUT_ERROR(parse(j), Contains("c.json") && Contains("'hidden_act' = 'gelu_fast' is not supported"));
    j = base;
    j["partial_rotary_factor"] = 0.5;
    CHECK_INPUT_ERROR(parse(j), Contains("'partial_rotary_factor' = 0.5 is not supported"));
    j = base;
    j["rope_parameters"]["partial_rotary_factor"] = 0.5;
    CHECK_INPUT_ERROR(parse(j), Contains("'rope_parameters.partial_rotary_factor' = 0.5 is not supported"));
    j = base;
    j["attention_bias"] = true;
    CHECK(parse(j).o_bias());
    CHECK_FALSE(parse(j, nn::kMistralFamily).o_bias());  // transformers' Mistral has no biases
  }
  SECTION("sliding-window fields") {
    json j = base;
    j.erase("sliding_window");
    CHECK(parse(j, nn::kMistralFamily).sliding_window == 4096);  // MistralConfig's default
    CHECK(parse(j, nn::kMistralFamily).sliding_layers.size() == 2);
    j["sliding_window"] = nullptr;
    CHECK(parse(j, nn::kMistralFamily).sliding_layers.empty());
    j["use_sliding_window"] = true;
    j["sliding_window"] = 8;
    j["max_window_layers"] = 1;
    CHECK(parse(j, nn::kQwen2Family).sliding_layers == std::vector<index_t>{1});
    j["layer_types"] = {"sliding_attention", "full_attention"};
    CHECK(parse(j, nn::kQwen2Family).sliding_layers == std::vector<index_t>{0});
    j["use_sliding_window"] = false;  // no window: layer_types alone does not slide
    CHECK(parse(j, nn::kQwen2Family).sliding_layers.empty());
    j["layer_types"] = {"sliding_attention", "chunked_attention"};
    CHECK_INPUT_ERROR(parse(j, nn::kQwen2Family),
                      Contains("c.json") && Contains("'layer_types' has \"chunked_attention\" at index 1"));
  }
}

TEST_CASE("families: GPT-2 n_inner, activation_function and attention scaling", "[io][families]") {
  nn::Gpt2Config c = tiny_gpt2_config();
  c.n_inner = 12;
  c.activation = nn::Activation::relu;
  c.scale_attn_by_inverse_layer_idx = true;
  nn::Gpt2LMHeadModel<double> m(c, tiny_lora(), 3);
  CHECK(m.blocks()[0].c_fc.weight.value.shape() == Shape{12, 8});
  TempDir dir;
  hf::save_pretrained(m, dir.str(), safetensors::Dtype::F64);
  auto loaded = hf::load_gpt2<double>(dir.str());
  CHECK(loaded.config().n_inner == 12);
  CHECK(loaded.config().activation == nn::Activation::relu);
  CHECK(loaded.config().scale_attn_by_inverse_layer_idx);
  const SequenceInput in = input(2, 5, 2, 11);
  const std::vector<double> z = logits(m, in);
  CHECK(logits(loaded, in) == z);
  // each setting reaches the forward
  nn::Gpt2Config other = c;
  other.scale_attn_by_inverse_layer_idx = false;
  nn::Gpt2LMHeadModel<double> m2(other, tiny_lora(), 3);
  CHECK(logits(m2, in) != z);
  other = c;
  other.activation = nn::Activation::gelu_erf;
  nn::Gpt2LMHeadModel<double> m3(other, tiny_lora(), 3);
  CHECK(logits(m3, in) != z);
  CHECK(c.attention_scale(1) == Approx(1.0 / std::sqrt(4.0) / 2.0).epsilon(1e-15));
  other.scale_attn_weights = false;
  other.scale_attn_by_inverse_layer_idx = false;
  CHECK(other.attention_scale(1) == 1.0);

  json j = read_json(dir.file("config.json"));
  j["activation_function"] = "quick_gelu";
  CHECK_INPUT_ERROR(hf::gpt2_config_from_json(j, "g.json"),
                    Contains("g.json") && Contains("'activation_function' = 'quick_gelu' is not supported"));
  j["activation_function"] = "gelu_pytorch_tanh";
  CHECK(hf::gpt2_config_from_json(j, "g.json").activation == nn::Activation::gelu_tanh);
  j["n_inner"] = 0;
  CHECK_INPUT_ERROR(hf::gpt2_config_from_json(j, "g.json"), Contains("'n_inner' = 0 must be at least 1"));
  j["n_inner"] = nullptr;
  CHECK(hf::gpt2_config_from_json(j, "g.json").inner_dim() == 32);
}

TEST_CASE("families: dynamic rope reads the length of the whole grid, padding included", "[io][families]") {
  // transformers takes max(position_ids) + 1 over the batch it is given; with
  // logit_positions the forward computes only the real tokens and the read
  // positions, and must still scale by the grid's length.
  nn::DecoderConfig c = tiny_config(nn::kLlamaFamily);
  c.max_position_embeddings = 4;
  c.rope_scaling.type = RopeParameters::Type::dynamic;
  c.rope_scaling.factor = 2.0;
  nn::DecoderForCausalLM<double> m(c, std::nullopt, 8);
  SequenceInput in = input(2, 8, 6);
  for (index_t r = 0; r < 2; ++r)  // positions 5..7 are padding: only they make the length 8
    for (index_t t = 5; t < 8; ++t) in.key_mask[static_cast<std::size_t>(r * 8 + t)] = 0;
  const std::vector<double> full = logits(m, in);
  const std::vector<std::int32_t> read{0, 3, 8 + 2, 8 + 4};
  in.logit_positions = read;
  const std::vector<double> packed = logits(m, in);
  REQUIRE(packed.size() == read.size() * 17);
  for (std::size_t i = 0; i < read.size(); ++i)
    for (std::size_t v = 0; v < 17; ++v) {
      CAPTURE(i, v);
      CHECK(packed[i * 17 + v] == Approx(full[static_cast<std::size_t>(read[i]) * 17 + v]).epsilon(1e-13));
    }
  // and the scaling is in effect: the same model without it differs
  nn::DecoderConfig plain = c;
  plain.rope_scaling = RopeParameters{};
  nn::DecoderForCausalLM<double> mp(plain, std::nullopt, 8);
  in.logit_positions.reset();
  CHECK(logits(mp, in) != full);
}
