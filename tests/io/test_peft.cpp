// PEFT adapter settings as peft 0.17-0.21 writes them (docs/checkpoints.md):
// target_modules as names, suffixes, full paths or a regular expression,
// exclude_modules, layers_to_transform / layers_pattern, rank_pattern and
// alpha_pattern, modules_to_save, bias; the refused settings; config.json
// sizes checked against the weight headers before anything is allocated.
// Checkpoints are written by the library's own writer (hf::save_pretrained)
// and edited by hand where a test needs another adapter_config.json.
#include "../support/files.hpp"
#include "../support/tiny_models.hpp"

#include <entropy_probe/io/hf.hpp>
#include <entropy_probe/probe/sequence_logprob.hpp>

#include <catch2/catch.hpp>

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <vector>

using namespace entropy_probe;
using namespace ep_test;
using Catch::Contains;
using nlohmann::json;

namespace {

void edit_adapter_config(const TempDir& dir, const std::function<void(json&)>& edit) {
  json j = read_json(dir.file("adapter_config.json"));
  edit(j);
  std::ofstream(dir.file("adapter_config.json")) << j.dump(2);
}
void edit_config(const TempDir& dir, const std::function<void(json&)>& edit) {
  json j = read_json(dir.file("config.json"));
  edit(j);
  std::ofstream(dir.file("config.json")) << j.dump(2);
}

template <class M>
std::set<std::string> trainable_names(M& m) {
  std::set<std::string> out;
  for (const auto& [name, info] : params_of(m))
    if (info.requires_grad) out.insert(name);
  return out;
}
std::set<std::string> adapter_keys(const TempDir& dir) {
  std::set<std::string> out;
  const auto file = safetensors::File::open(dir.file("adapter_model.safetensors"));
  for (const auto& t : file.tensors()) out.insert(t.name);
  return out;
}
template <class M>
std::vector<double> logits_of(M& m, index_t vocab) {
  const TokenBatch b = random_batch(2, 2, 6, vocab, 99);
  Tape<double> tape;
  const Var z = m.forward(tape, sequence_input(b));
  return tape.value(z).to_host();
}

// Saves `src`, loads it back and checks that every parameter, its
// trainability and the logits come back exactly, and that the registry is
// exactly the adapter file's keys.
template <class M>
void check_round_trip(M& src, const TempDir& dir, index_t vocab) {
  hf::save_pretrained(src, dir.str(), safetensors::Dtype::F64);
  auto any = hf::load_model<double>(dir.str());
  auto& loaded = std::get<M>(any);
  const auto a = params_of(src), b = params_of(loaded);
  REQUIRE(a.size() == b.size());
  for (const auto& [name, info] : a) {
    INFO(name);
    REQUIRE(b.count(name));
    CHECK(b.at(name).requires_grad == info.requires_grad);
    CHECK(b.at(name).values == info.values);
  }
  CHECK(trainable_names(loaded) == adapter_keys(dir));
  CHECK(logits_of(loaded, vocab) == logits_of(src, vocab));
}

nn::LoraConfig qwen_lora() {
  nn::LoraConfig l;
  l.r = 2;
  l.lora_alpha = 4;
  l.init_lora_b_zero = false;
  return l;
}

const std::string P = "base_model.model.";

}  // namespace

TEST_CASE("peft: target module rules (names, suffixes, full paths, regex, exclude, layers)", "[io][peft]") {
  nn::LoraConfig l;
  l.target_modules = {"q_proj", "mlp.up_proj", "model.layers.0.self_attn.o_proj"};
  CHECK(l.targets("model.layers.3.self_attn.q_proj"));
  CHECK(l.targets("model.layers.3.mlp.up_proj"));
  CHECK_FALSE(l.targets("model.layers.3.mlp.gate_up_proj"));  // a suffix only after a dot
  CHECK(l.targets("model.layers.0.self_attn.o_proj"));
  CHECK_FALSE(l.targets("model.layers.1.self_attn.o_proj"));
  l.exclude_modules = {"layers.3.self_attn.q_proj"};
  CHECK_FALSE(l.targets("model.layers.3.self_attn.q_proj"));
  CHECK(l.targets("model.layers.2.self_attn.q_proj"));

  nn::LoraConfig r;
  r.target_regex = R"(.*\.(1|3)\.self_attn\.(q|v)_proj)";
  CHECK(r.targets("model.layers.1.self_attn.v_proj"));
  CHECK_FALSE(r.targets("model.layers.11.self_attn.v_proj"));
  CHECK_FALSE(r.targets("x.model.layers.1.self_attn.v_proj.y"));  // a full match, not a search
  r.exclude_regex = ".*\\.3\\..*";
  CHECK_FALSE(r.targets("model.layers.3.self_attn.q_proj"));

  nn::LoraConfig k;
  k.target_modules = {"up_proj"};
  k.layers_to_transform = {1, 2};
  CHECK(k.layer_index("model.layers.12.mlp.experts.3.up_proj") == index_t{12});  // the first numbered segment
  CHECK(k.layer_index("transformer.h.4.mlp.c_fc") == index_t{4});
  CHECK_FALSE(k.layer_index("lm_head"));
  CHECK(k.targets("model.layers.2.mlp.up_proj"));
  CHECK_FALSE(k.targets("model.layers.0.mlp.up_proj"));
  k.layers_pattern = {"blocks"};
  CHECK_FALSE(k.targets("model.layers.2.mlp.up_proj"));
  CHECK(k.targets("model.blocks.2.mlp.up_proj"));

  // modules_to_save: PEFT's suffix rule has no dot, and no adapter sits in a saved module.
  nn::LoraConfig s;
  s.target_modules = {"o_proj"};
  s.modules_to_save = {"norm", "o_proj"};
  CHECK(s.saves("model.layers.0.input_layernorm"));
  CHECK(s.saves("model.norm"));
  CHECK_FALSE(s.targets("model.layers.0.self_attn.o_proj"));

  // rank_pattern / alpha_pattern: a regex for the end of the path, after a dot.
  nn::LoraConfig p;
  p.r = 4;
  p.lora_alpha = 8;
  p.target_modules = {"q_proj", "v_proj"};
  p.rank_pattern = {{"v_proj", 2}};
  p.alpha_pattern = {{"layers\\.1\\.self_attn\\.q_proj", 3}};
  CHECK(p.adapter_for("model.layers.0.self_attn.v_proj")->r == 2);
  CHECK(p.adapter_for("model.layers.0.self_attn.v_proj")->scale == 8.0 / 2);
  CHECK(p.adapter_for("model.layers.1.self_attn.q_proj")->scale == 3.0 / 4);
  CHECK(p.adapter_for("model.layers.11.self_attn.q_proj")->scale == 8.0 / 4);
  CHECK_FALSE(p.adapter_for("model.layers.0.mlp.up_proj"));
  p.use_rslora = true;
  CHECK(p.adapter_for("model.layers.0.self_attn.v_proj")->scale == 8.0 / std::sqrt(2.0));
}

TEST_CASE("peft: target_modules as full module paths (what all-linear saves) and as a regex load", "[io][peft]") {
  SECTION("gpt2, full paths") {
    nn::LoraConfig l = tiny_lora();
    l.target_modules = {"transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"};
    nn::Gpt2LMHeadModel<double> src(tiny_gpt2_config(), l, 31);
    TempDir dir;
    check_round_trip(src, dir, tiny_gpt2_config().vocab_size);
    CHECK(trainable_names(src) == std::set<std::string>{
                                      P + "transformer.h.0.attn.c_attn.lora_A.weight",
                                      P + "transformer.h.0.attn.c_attn.lora_B.weight",
                                      P + "transformer.h.1.mlp.c_fc.lora_A.weight",
                                      P + "transformer.h.1.mlp.c_fc.lora_B.weight",
                                      P + "transformer.h.1.mlp.c_proj.lora_A.weight",
                                      P + "transformer.h.1.mlp.c_proj.lora_B.weight",
                                  });
  }
  SECTION("qwen2, regex with exclude_modules and per-module rank and alpha") {
    nn::LoraConfig l = qwen_lora();
    l.target_regex = R"(model\.layers\.\d+\.(self_attn\.(q|v)_proj|mlp\.down_proj))";
    l.exclude_modules = {"layers.0.mlp.down_proj"};
    l.rank_pattern = {{"v_proj", 3}};
    l.alpha_pattern = {{"model.layers.1.self_attn.q_proj", 7}};
    nn::Qwen2ForCausalLM<double> src(tiny_qwen2_config(false), l, 32);
    TempDir dir;
    check_round_trip(src, dir, 13);
    auto any = hf::load_model<double>(dir.str());
    auto& m = std::get<nn::Qwen2ForCausalLM<double>>(any);
    CHECK(m.layers()[1].q_proj.scale == 7.0 / 2);
    CHECK(m.layers()[0].q_proj.scale == 4.0 / 2);
    CHECK(m.layers()[0].v_proj.lora_A->value.shape() == Shape{3, 8});
    CHECK(m.layers()[0].v_proj.scale == 4.0 / 3);
    CHECK_FALSE(m.layers()[0].down_proj.has_lora());
    CHECK(m.layers()[1].down_proj.has_lora());
    CHECK_FALSE(m.layers()[1].k_proj.has_lora());
  }
  SECTION("qwen2, layers_to_transform with layers_pattern, as an int in the file") {
    nn::LoraConfig l = qwen_lora();
    l.target_modules = {"q_proj", "up_proj"};
    l.layers_to_transform = {1};
    l.layers_pattern = {"layers"};
    nn::Qwen2ForCausalLM<double> src(tiny_qwen2_config(true), l, 33);
    TempDir dir;
    check_round_trip(src, dir, 13);
    edit_adapter_config(dir, [](json& j) { j["layers_to_transform"] = 1; });
    auto any = hf::load_model<double>(dir.str());
    auto& m = std::get<nn::Qwen2ForCausalLM<double>>(any);
    CHECK_FALSE(m.layers()[0].q_proj.has_lora());
    CHECK(m.layers()[1].q_proj.has_lora());
    CHECK(m.layers()[1].up_proj.has_lora());
  }
}

TEST_CASE("peft: modules_to_save trains any module; a saved embedding unties the head", "[io][peft]") {
  SECTION("qwen2 tied: embed_tokens and the norms") {
    nn::LoraConfig l = qwen_lora();
    l.target_modules = {"q_proj", "v_proj"};
    l.modules_to_save = {"embed_tokens", "norm"};
    nn::Qwen2ForCausalLM<double> src(tiny_qwen2_config(true), l, 34);
    // The trained copy moves away from the frozen original the head keeps.
    std::vector<double> e = src.embed_tokens().value.to_host();
    for (auto& x : e) x += 0.25;
    src.embed_tokens().value = Tensor<double>::from_host({13, 8}, e);
    TempDir dir;
    check_round_trip(src, dir, 13);
    const auto names = trainable_names(src);
    for (const char* n : {"model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight",
                          "model.layers.1.post_attention_layernorm.weight"})
      CHECK(names.count(P + n));
    CHECK_FALSE(names.count(P + "model.embed_tokens.original_module.weight"));
    REQUIRE(src.lm_head());
    CHECK(src.lm_head()->value.to_host() != e);
    // The base file keeps the original embedding, which the head reads.
    const auto base = safetensors::File::open(dir.file("model.safetensors"));
    CHECK(base.find("model.embed_tokens.weight")->to_vector<double>() == src.lm_head()->value.to_host());
    CHECK_FALSE(base.contains("lm_head.weight"));
  }
  SECTION("gpt2: wte, ln_f and a whole Conv1D linear (kept in Conv1D layout in the adapter file)") {
    nn::LoraConfig l = tiny_lora();
    l.target_modules = {"c_attn"};
    l.modules_to_save = {"wte", "ln_f", "mlp.c_fc"};
    nn::Gpt2LMHeadModel<double> src(tiny_gpt2_config(), l, 35);
    TempDir dir;
    check_round_trip(src, dir, tiny_gpt2_config().vocab_size);
    const auto a = safetensors::File::open(dir.file("adapter_model.safetensors"));
    CHECK(a.find(P + "transformer.h.0.mlp.c_fc.weight")->shape == Shape{8, 32});
    CHECK(a.contains(P + "transformer.h.0.mlp.c_fc.bias"));
    CHECK(a.contains(P + "transformer.ln_f.bias"));
    CHECK(a.contains(P + "transformer.wte.weight"));
  }
}

TEST_CASE("peft: bias all and lora_only train biases, loaded from the adapter file", "[io][peft]") {
  SECTION("gpt2 all: every bias, layer norms included") {
    nn::LoraConfig l = tiny_lora();
    l.target_modules = {"c_attn"};
    l.bias = nn::LoraBias::all;
    nn::Gpt2LMHeadModel<double> src(tiny_gpt2_config(), l, 36);
    TempDir dir;
    check_round_trip(src, dir, tiny_gpt2_config().vocab_size);
    const auto names = trainable_names(src);
    CHECK(names.count(P + "transformer.h.0.attn.c_attn.base_layer.bias"));
    CHECK(names.count(P + "transformer.h.1.mlp.c_proj.bias"));
    CHECK(names.count(P + "transformer.h.1.ln_2.bias"));
    CHECK(names.count(P + "transformer.ln_f.bias"));
    CHECK_FALSE(names.count(P + "transformer.ln_f.weight"));
  }
  SECTION("qwen2 lora_only: the biases of adapted modules") {
    nn::LoraConfig l = qwen_lora();
    l.target_modules = {"q_proj", "o_proj"};
    l.bias = nn::LoraBias::lora_only;
    nn::Qwen2ForCausalLM<double> src(tiny_qwen2_config(false), l, 37);
    TempDir dir;
    check_round_trip(src, dir, 13);
    const auto names = trainable_names(src);
    CHECK(names.count(P + "model.layers.0.self_attn.q_proj.base_layer.bias"));
    CHECK_FALSE(names.count(P + "model.layers.0.self_attn.k_proj.bias"));
    CHECK(names.size() == 2 * (4 + 1));  // per layer: two adapters (A, B) and q_proj's bias
  }
}

TEST_CASE("peft: fields that do not change the forward pass are accepted", "[io][peft]") {
  auto src = tiny_gpt2<double>(38);
  TempDir dir;
  hf::save_pretrained(src, dir.str(), safetensors::Dtype::F64);
  edit_adapter_config(dir, [](json& j) {
    j["lora_dropout"] = 0.1;
    j["init_lora_weights"] = "gaussian";
    j["task_type"] = "CAUSAL_LM";
    j["inference_mode"] = true;
    j["revision"] = "main";
    j["base_model_name_or_path"] = "gpt2";
    j["megatron_config"] = {{"tensor_model_parallel_size", 1}};
    j["megatron_core"] = "megatron.core";
    j["use_dora"] = false;
    j["ensure_weight_tying"] = false;
    j["a_field_peft_adds_later"] = {{"x", 1}};
  });
  auto any = hf::load_model<double>(dir.str());
  CHECK(logits_of(std::get<0>(any), tiny_gpt2_config().vocab_size) == logits_of(src, tiny_gpt2_config().vocab_size));
}

TEST_CASE("peft: refused settings name the file, the field and the value", "[io][peft][errors]") {
  auto src = tiny_gpt2<double>(39);
  TempDir dir;
  hf::save_pretrained(src, dir.str(), safetensors::Dtype::F64);
  const std::string acfg = dir.file("adapter_config.json");
  const json original = read_json(acfg);
  auto with = [&](const std::function<void(json&)>& edit) {
    std::ofstream(acfg) << original.dump();
    edit_adapter_config(dir, edit);
  };
  auto load = [&] { return hf::load_gpt2<double>(dir.str()); };

  with([](json& j) { j["use_dora"] = true; });
  CHECK_INPUT_ERROR(load(), Contains(acfg) && Contains("'use_dora' = true") && Contains("DoRA"));
  with([](json& j) { j["lora_bias"] = true; });
  CHECK_INPUT_ERROR(load(), Contains(acfg) && Contains("'lora_bias' = true"));
  with([](json& j) { j["bias"] = "sometimes"; });
  CHECK_INPUT_ERROR(load(), Contains(acfg) && Contains("'bias' = 'sometimes'"));
  with([](json& j) { j["target_modules"] = {"c_attn", "wte"}; });
  CHECK_INPUT_ERROR(load(), Contains(acfg) && Contains("'target_modules' = [c_attn, wte]") &&
                                Contains("'transformer.wte', which is an embedding or a norm"));
  with([](json& j) { j["target_modules"] = {"c_attn", "lm_head"}; });
  CHECK_INPUT_ERROR(load(), Contains(acfg) && Contains("'lm_head', which is the output head"));
  with([](json& j) { j["target_modules"] = ".*\\.h\\.0\\.attn"; });
  CHECK_INPUT_ERROR(load(), Contains(acfg) && Contains("'target_modules' = \".*\\.h\\.0\\.attn\"") &&
                                Contains("a container of other modules"));
  with([](json& j) { j["exclude_modules"] = "[c_fc"; });
  CHECK_INPUT_ERROR(
      load(), Contains(acfg) && Contains("'exclude_modules' = \"[c_fc\"") && Contains("not a regular expression"));
  with([](json& j) {
    j["target_modules"] = "c_attn";
    j["layers_to_transform"] = {0};
  });
  CHECK_INPUT_ERROR(load(),
                    Contains(acfg) && Contains("'layers_to_transform' = [0]") && Contains("regular expression"));
  with([](json& j) { j["layers_pattern"] = "h"; });
  CHECK_INPUT_ERROR(load(),
                    Contains(acfg) && Contains("'layers_pattern' = \"h\"") && Contains("needs 'layers_to_transform'"));
  with([](json& j) { j["layers_to_transform"] = {7}; });
  CHECK_INPUT_ERROR(load(),
                    Contains(acfg) && Contains("selects no linear layer") && Contains("layers_to_transform [7]"));
  with([](json& j) { j["rank_pattern"] = {{"c_attn", 3}, {"h\\.0\\.attn\\.c_attn", 5}}; });
  CHECK_INPUT_ERROR(load(), Contains(acfg) && Contains("'rank_pattern'") && Contains("'c_attn'") &&
                                Contains("'transformer.h.0.attn.c_attn'") && Contains("(3 and 5)"));
  with([](json& j) { j["rank_pattern"] = {{"c_attn", 3}}; });  // the adapter file holds rank 2
  CHECK_INPUT_ERROR(load(),
                    Contains(dir.file("adapter_model.safetensors")) && Contains("has rank 2") && Contains("r = 3"));
  with([](json& j) { j["modules_to_save"] = {"attn"}; });
  CHECK_INPUT_ERROR(
      load(), Contains(acfg) && Contains("'modules_to_save' entry 'attn'") && Contains("a container of other modules"));
  with([](json& j) { j["modules_to_save"] = {"embed_tokens"}; });
  CHECK_INPUT_ERROR(load(), Contains(acfg) && Contains("'modules_to_save' entry 'embed_tokens' names no module"));
  with([](json& j) {
    j["modules_to_save"] = {"ln_f"};
    j["bias"] = "all";
  });
  CHECK_INPUT_ERROR(load(), Contains(acfg) && Contains("'bias' = 'all'") && Contains("entry 'ln_f'") &&
                                Contains("'transformer.ln_f'"));
  with([](json& j) {
    j["modules_to_save"] = {"wte"};
    j["ensure_weight_tying"] = true;
  });
  CHECK_INPUT_ERROR(load(), Contains(acfg) && Contains("'ensure_weight_tying' = true"));
}

TEST_CASE("hf: config.json sizes the weight files contradict are refused before allocating", "[io][hf][errors]") {
  TempDir g, q;
  auto gsrc = tiny_gpt2<double>(40);
  hf::save_pretrained(gsrc, g.str(), safetensors::Dtype::F64);
  nn::Qwen2ForCausalLM<double> qsrc(tiny_qwen2_config(false), std::nullopt, 41);
  hf::save_pretrained(qsrc, q.str(), safetensors::Dtype::F64);
  auto timed = [](auto&& f) {
    const auto t0 = std::chrono::steady_clock::now();
    CHECK_THROWS_AS(f(), InputError);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  SECTION("100000 layers") {
    edit_config(g, [](json& j) { j["n_layer"] = 100000; });
    CHECK_INPUT_ERROR(hf::load_model<double>(g.str()),
                      Contains(g.file("config.json")) && Contains("field 'n_layer' = 100000") &&
                          Contains(g.file("model.safetensors")) && Contains("holds 2 layers"));
    CHECK(timed([&] { return hf::load_model<double>(g.str()); }) < 1.0);
    edit_config(q, [](json& j) {
      j["num_hidden_layers"] = 100000;
      j.erase("layer_types");  // else its length, one per layer, is the first contradiction found
    });
    CHECK_INPUT_ERROR(hf::load_model<double>(q.str()),
                      Contains(q.file("config.json")) && Contains("field 'num_hidden_layers' = 100000"));
  }
  SECTION("a vocabulary of 10^12") {
    edit_config(g, [](json& j) { j["vocab_size"] = 1000000000000; });
    CHECK_INPUT_ERROR(hf::load_model<double>(g.str()), Contains(g.file("config.json")) &&
                                                           Contains("field 'vocab_size' = 1000000000000") &&
                                                           Contains("'transformer.wte.weight' has shape [11, 8]"));
    CHECK(timed([&] { return hf::load_model<double>(g.str()); }) < 1.0);
    edit_config(q, [](json& j) { j["vocab_size"] = 1000000000000; });
    CHECK_INPUT_ERROR(hf::load_model<double>(q.str()),
                      Contains("field 'vocab_size' = 1000000000000") && Contains("'model.embed_tokens.weight'"));
  }
  SECTION("widths") {
    edit_config(q, [](json& j) {
      j["hidden_size"] = 16;
      j["num_attention_heads"] = 4;
    });
    CHECK_INPUT_ERROR(hf::load_model<double>(q.str()), Contains("field 'hidden_size' = 16"));
    edit_config(q, [](json& j) {
      j["hidden_size"] = 8;
      j["num_attention_heads"] = 2;
      j["intermediate_size"] = 100;
    });
    CHECK_INPUT_ERROR(hf::load_model<double>(q.str()),
                      Contains("field 'intermediate_size' = 100") && Contains("'model.layers.0.mlp.up_proj.weight'"));
  }
}

TEST_CASE("hf: a model built to be loaded is never initialised", "[io][hf]") {
  // Tests poison uninitialised storage with NaN (core/config.hpp): a model
  // constructed without a seed holds only what the loader will write.
  nn::Gpt2LMHeadModel<double> m(tiny_gpt2_config(), tiny_lora(), std::nullopt);
  CHECK(std::isnan(m.wte().value.to_host()[0]));
  CHECK(std::isnan(m.blocks()[1].c_fc.weight.value.to_host()[3]));
  CHECK(std::isnan(m.blocks()[1].c_fc.lora_B->value.to_host()[0]));
  // ... and loading fills all of it.
  auto src = tiny_gpt2<double>(42);
  TempDir dir;
  hf::save_pretrained(src, dir.str(), safetensors::Dtype::BF16);
  auto loaded = hf::load_gpt2<double>(dir.str());
  for (const auto& [name, info] : params_of(loaded))
    for (double x : info.values) REQUIRE(std::isfinite(x));
}
