// Hugging Face checkpoints, PEFT adapters, Adam state and batch files
// (io/hf.hpp, docs/checkpoints.md).
//
// Checkpoint directories are written here from C++ model instances with a
// hand-written Hugging Face writer (it does not share the loader's naming
// code): GPT-2 under "transformer." or bare names with Conv1D weights stored
// [in, out], Qwen2 under "model.", PEFT adapters keyed by registry name.
// Loading them back must reproduce every parameter and the logits, and every
// bad input must be an InputError naming the file and the key.
#include "../support/files.hpp"
#include "../support/tiny_models.hpp"

#include <entropy_probe/io/hf.hpp>
#include <entropy_probe/probe/sequence_logprob.hpp>

#include <catch2/catch.hpp>

#include <unistd.h>

#include <cmath>
#include <cstdint>
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
namespace st = entropy_probe::safetensors;

namespace {

void write_json(const std::string& path, const json& j) {
  std::ofstream out(path);
  out << j.dump(2);
}

using Tensors = std::map<std::string, st::OutTensor>;

template <class T>
st::OutTensor f64(const Tensor<T>& t, bool transpose = false) {
  std::vector<double> v(static_cast<std::size_t>(t.numel()));
  Shape shape = t.shape();
  if (transpose) {
    const index_t out = shape[0], in = shape[1];
    for (index_t o = 0; o < out; ++o)
      for (index_t i = 0; i < in; ++i) v[static_cast<std::size_t>(i * out + o)] = double(t[o * in + i]);
    shape = {in, out};
  } else {
    for (index_t k = 0; k < t.numel(); ++k) v[static_cast<std::size_t>(k)] = double(t[k]);
  }
  return st::make_out<double>(shape, std::span<const double>(v));
}

st::OutTensor zeros_f32(const Shape& shape) {
  const std::vector<float> v(static_cast<std::size_t>(numel_of(shape)), 0.0f);
  return st::make_out<float>(shape, std::span<const float>(v));
}

// ---- a hand-written Hugging Face / PEFT writer --------------------------------------------

template <class T>
void add_lora(Tensors& adapter, const std::string& module, nn::LoraLinear<T>& l) {
  if (!l.has_lora()) return;
  adapter.emplace("base_model.model." + module + ".lora_A.weight", f64(l.lora_A->value));
  adapter.emplace("base_model.model." + module + ".lora_B.weight", f64(l.lora_B->value));
}

json gpt2_config_json(const nn::Gpt2Config& c) {
  return {{"model_type", "gpt2"},
          {"architectures", {"GPT2LMHeadModel"}},
          {"vocab_size", c.vocab_size},
          {"n_positions", c.n_positions},
          {"n_ctx", c.n_positions},
          {"n_embd", c.n_embd},
          {"n_layer", c.n_layer},
          {"n_head", c.n_head},
          {"n_inner", nullptr},
          {"activation_function", "gelu_new"},
          {"layer_norm_epsilon", c.layer_norm_epsilon},
          {"torch_dtype", "float32"}};
}

json adapter_json(const nn::LoraConfig& l, bool fan_in_fan_out) {
  json j = {{"peft_type", "LORA"},
            {"task_type", "CAUSAL_LM"},
            {"r", l.r},
            {"lora_alpha", l.lora_alpha},
            {"lora_dropout", 0.05},
            {"target_modules", l.target_modules},
            {"use_rslora", l.use_rslora},
            {"fan_in_fan_out", fan_in_fan_out},
            {"bias", "none"},
            {"base_model_name_or_path", "tiny"},
            {"inference_mode", true}};
  j["modules_to_save"] = l.modules_to_save.empty() ? json(nullptr) : json(l.modules_to_save);
  return j;
}

// GPT-2 as transformers + PEFT save it: Conv1D weights [in, out], names with
// or without "transformer.", the causal-mask buffers old checkpoints carry.
struct Gpt2Files {
  Tensors base, adapter;
};
template <class T>
Gpt2Files gpt2_files(nn::Gpt2LMHeadModel<T>& m, bool transformer_prefix) {
  Gpt2Files f;
  const std::string p = transformer_prefix ? "transformer." : "";
  f.base.emplace(p + "wte.weight", f64(m.wte().value));
  f.base.emplace(p + "wpe.weight", f64(m.wpe().value));
  for (std::size_t i = 0; i < m.blocks().size(); ++i) {
    auto& b = m.blocks()[i];
    const std::string h = fmt::format("{}h.{}.", p, i);
    f.base.emplace(h + "ln_1.weight", f64(b.ln_1.weight.value));
    f.base.emplace(h + "ln_1.bias", f64(b.ln_1.bias.value));
    f.base.emplace(h + "attn.c_attn.weight", f64(b.c_attn.weight.value, true));
    f.base.emplace(h + "attn.c_attn.bias", f64(b.c_attn.bias->value));
    f.base.emplace(h + "attn.c_proj.weight", f64(b.attn_c_proj.weight.value, true));
    f.base.emplace(h + "attn.c_proj.bias", f64(b.attn_c_proj.bias->value));
    f.base.emplace(h + "ln_2.weight", f64(b.ln_2.weight.value));
    f.base.emplace(h + "ln_2.bias", f64(b.ln_2.bias.value));
    f.base.emplace(h + "mlp.c_fc.weight", f64(b.c_fc.weight.value, true));
    f.base.emplace(h + "mlp.c_fc.bias", f64(b.c_fc.bias->value));
    f.base.emplace(h + "mlp.c_proj.weight", f64(b.mlp_c_proj.weight.value, true));
    f.base.emplace(h + "mlp.c_proj.bias", f64(b.mlp_c_proj.bias->value));
    f.base.emplace(h + "attn.bias", zeros_f32({1, 1, m.config().n_positions, m.config().n_positions}));  // unused
    const std::string a = fmt::format("transformer.h.{}.", i);
    add_lora(f.adapter, a + "attn.c_attn", b.c_attn);
    add_lora(f.adapter, a + "attn.c_proj", b.attn_c_proj);
    add_lora(f.adapter, a + "mlp.c_fc", b.c_fc);
    add_lora(f.adapter, a + "mlp.c_proj", b.mlp_c_proj);
  }
  f.base.emplace(p + "ln_f.weight", f64(m.ln_f().weight.value));
  f.base.emplace(p + "ln_f.bias", f64(m.ln_f().bias.value));
  if (m.lm_head()) f.adapter.emplace("base_model.model.lm_head.weight", f64(m.lm_head()->value));
  return f;
}

template <class T>
void write_gpt2_dir(nn::Gpt2LMHeadModel<T>& m, const TempDir& dir, bool transformer_prefix = true) {
  const Gpt2Files f = gpt2_files(m, transformer_prefix);
  write_json(dir.file("config.json"), gpt2_config_json(m.config()));
  st::write_file(dir.file("model.safetensors"), f.base, {{"format", "pt"}});
  if (m.lora()) {
    write_json(dir.file("adapter_config.json"), adapter_json(*m.lora(), true));
    st::write_file(dir.file("adapter_model.safetensors"), f.adapter, {{"format", "pt"}});
  }
}

nn::LoraConfig qwen2_lora(bool lm_head, bool rslora) {
  nn::LoraConfig l;
  l.r = 2;
  l.lora_alpha = 5;
  l.use_rslora = rslora;
  l.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  if (lm_head) l.modules_to_save = {"lm_head"};
  l.init_lora_b_zero = false;
  return l;
}

json qwen2_config_json(const nn::DecoderConfig& c) {
  return {{"model_type", "qwen2"},
          {"architectures", {"Qwen2ForCausalLM"}},
          {"vocab_size", c.vocab_size},
          {"hidden_size", c.hidden_size},
          {"intermediate_size", c.intermediate_size},
          {"num_hidden_layers", c.num_hidden_layers},
          {"num_attention_heads", c.num_attention_heads},
          {"num_key_value_heads", c.num_key_value_heads},
          {"max_position_embeddings", c.max_position_embeddings},
          {"rms_norm_eps", c.rms_norm_eps},
          {"rope_theta", c.rope_theta},
          {"hidden_act", "silu"},
          {"rope_scaling", nullptr},
          {"use_sliding_window", false},
          {"sliding_window", 4096},
          {"tie_word_embeddings", c.tie_word_embeddings},
          {"torch_dtype", "bfloat16"}};
}

template <class T>
Gpt2Files qwen2_files(nn::Qwen2ForCausalLM<T>& m) {
  Gpt2Files f;
  f.base.emplace("model.embed_tokens.weight", f64(m.embed_tokens().value));
  for (std::size_t i = 0; i < m.layers().size(); ++i) {
    auto& l = m.layers()[i];
    const std::string h = fmt::format("model.layers.{}.", i);
    f.base.emplace(h + "input_layernorm.weight", f64(l.input_layernorm.weight.value));
    f.base.emplace(h + "post_attention_layernorm.weight", f64(l.post_attention_layernorm.weight.value));
    const std::pair<const char*, nn::LoraLinear<T>*> lin[] = {
        {"self_attn.q_proj", &l.q_proj}, {"self_attn.k_proj", &l.k_proj}, {"self_attn.v_proj", &l.v_proj},
        {"self_attn.o_proj", &l.o_proj}, {"mlp.gate_proj", &l.gate_proj}, {"mlp.up_proj", &l.up_proj},
        {"mlp.down_proj", &l.down_proj}};
    for (auto [name, p] : lin) {
      f.base.emplace(h + name + ".weight", f64(p->weight.value));
      if (p->bias) f.base.emplace(h + name + ".bias", f64(p->bias->value));
      add_lora(f.adapter, h + name, *p);
    }
  }
  f.base.emplace("model.norm.weight", f64(m.norm().weight.value));
  const bool saved = m.lora() && m.lora()->saves("lm_head");
  if (m.lm_head()) {
    if (saved) f.adapter.emplace("base_model.model.lm_head.weight", f64(m.lm_head()->value));
    if (!m.config().tie_word_embeddings) f.base.emplace("lm_head.weight", f64(m.lm_head()->value));
  }
  return f;
}

template <class T>
void write_qwen2_dir(nn::Qwen2ForCausalLM<T>& m, const TempDir& dir) {
  const Gpt2Files f = qwen2_files(m);
  write_json(dir.file("config.json"), qwen2_config_json(m.config()));
  st::write_file(dir.file("model.safetensors"), f.base, {{"format", "pt"}});
  if (m.lora()) {
    write_json(dir.file("adapter_config.json"), adapter_json(*m.lora(), false));
    st::write_file(dir.file("adapter_model.safetensors"), f.adapter, {{"format", "pt"}});
  }
}

// Rewrites one safetensors file of `dir` through `edit`.
void edit_file(const TempDir& dir, const std::string& name, const std::function<void(Tensors&)>& edit) {
  const st::File f = st::File::open(dir.file(name));
  Tensors t;
  for (const auto& v : f.tensors())
    t.emplace(v.name, st::OutTensor{v.dtype, v.shape, std::vector<std::byte>(v.bytes.begin(), v.bytes.end())});
  edit(t);
  st::write_file(dir.file(name), t, f.metadata());
}
void edit_json(const TempDir& dir, const std::string& name, const std::function<void(json&)>& edit) {
  json j = read_json(dir.file(name));
  edit(j);
  write_json(dir.file(name), j);
}

// ---- comparisons -----------------------------------------------------------------------------

template <class M>
std::vector<std::string> names_of(M& m) {
  using T = typename M::scalar_type;
  std::vector<std::string> names;
  m.named_parameters(ParameterVisitor<T>([&](const std::string& name, Parameter<T>&) { names.push_back(name); }));
  return names;
}

// Every parameter (name, order, shape, trainability, value within tol).
template <class A, class B>
void check_same_params(A& a, B& b, double tol = 0) {
  REQUIRE(names_of(a) == names_of(b));
  const auto pa = params_of(a), pb = params_of(b);
  for (const auto& [name, x] : pa) {
    INFO("parameter " << name);
    const ParamInfo& y = pb.at(name);
    CHECK(x.shape == y.shape);
    CHECK(x.requires_grad == y.requires_grad);
    REQUIRE(x.values.size() == y.values.size());
    double worst = 0;
    for (std::size_t k = 0; k < x.values.size(); ++k) worst = std::max(worst, std::abs(x.values[k] - y.values[k]));
    CHECK(worst <= tol);
  }
}

template <class M>
std::vector<double> logits_of(M& m, const TokenBatch& batch) {
  using T = typename M::scalar_type;
  Tape<T> tape;
  const Var z = m.forward(tape, sequence_input(batch));
  const auto h = tape.value(z).to_host();
  return std::vector<double>(h.begin(), h.end());
}

template <class A, class B>
void check_same_logits(A& a, B& b, index_t vocab, double tol = 0) {
  const TokenBatch batch = random_batch(2, 2, 7, vocab, 99);
  const auto za = logits_of(a, batch), zb = logits_of(b, batch);
  REQUIRE(za.size() == zb.size());
  double worst = 0, scale = 0;
  for (std::size_t k = 0; k < za.size(); ++k) {
    worst = std::max(worst, std::abs(za[k] - zb[k]));
    scale = std::max(scale, std::abs(za[k]));
  }
  CHECK(scale > 0);
  CHECK(worst <= tol * std::max(scale, 1.0));
}

std::set<std::string> keys_of(const std::string& path) {
  std::set<std::string> k;
  const st::File f = st::File::open(path);
  for (const auto& t : f.tensors()) k.insert(t.name);
  return k;
}

template <class M>
std::set<std::string> registry_names(M& m) {
  using T = typename M::scalar_type;
  const auto reg = Registry<T>::build(m);
  std::set<std::string> n;
  for (const auto& e : reg.entries()) n.insert(e.name);
  return n;
}

}  // namespace

// ---- loading checkpoints ---------------------------------------------------------------------

TEST_CASE("hf: a GPT-2 checkpoint with a PEFT adapter loads from Hugging Face names and layouts", "[io][hf]") {
  for (bool prefix : {true, false}) {
    INFO("base names " << (prefix ? "with" : "without") << " 'transformer.'");
    auto src = tiny_gpt2<double>(7);
    TempDir dir;
    write_gpt2_dir(src, dir, prefix);
    auto loaded = hf::load_gpt2<double>(dir.str());
    check_same_params(src, loaded);
    check_same_logits(src, loaded, 11);
    CHECK(loaded.lora()->r == 2);
    CHECK(loaded.lora()->lora_alpha == 4);
    CHECK(loaded.blocks()[1].mlp_c_proj.scale == src.blocks()[1].mlp_c_proj.scale);
    // The registry names are exactly the adapter file's keys.
    CHECK(registry_names(loaded) == keys_of(dir.file("adapter_model.safetensors")));
  }
}

TEST_CASE("hf: GPT-2 with modules_to_save lm_head loads the trained head from the adapter", "[io][hf]") {
  auto src = tiny_gpt2<double>(8, true);
  for (index_t k = 0; k < src.lm_head()->value.numel(); ++k) src.lm_head()->value[k] += 0.01 * double(k % 7);
  TempDir dir;
  write_gpt2_dir(src, dir);
  CHECK(keys_of(dir.file("adapter_model.safetensors")).count("base_model.model.lm_head.weight") == 1);
  auto loaded = hf::load_gpt2<double>(dir.str());
  check_same_params(src, loaded);
  check_same_logits(src, loaded, 11);
  CHECK(registry_names(loaded) == keys_of(dir.file("adapter_model.safetensors")));
}

TEST_CASE("hf: a GPT-2 base checkpoint without an adapter; load_model dispatches on model_type", "[io][hf]") {
  nn::Gpt2LMHeadModel<double> src(tiny_gpt2_config(), std::nullopt, 5);
  TempDir dir;
  write_gpt2_dir(src, dir, false);
  // A tied lm_head.weight in the base file is an unused extra key.
  edit_file(dir, "model.safetensors", [&](Tensors& t) { t.emplace("lm_head.weight", f64(src.wte().value)); });
  auto any = hf::load_model<double>(dir.str());
  REQUIRE(any.index() == 0);
  auto& loaded = std::get<0>(any);
  CHECK_FALSE(loaded.lora().has_value());
  check_same_params(src, loaded);
  check_same_logits(src, loaded, 11);
  CHECK(registry_names(loaded).count("transformer.wte.weight") == 1);
}

TEST_CASE("hf: Qwen2 checkpoints (untied, rsLoRA on every projection; tied with a saved lm_head)", "[io][hf]") {
  SECTION("untied lm_head, rsLoRA") {
    nn::Qwen2ForCausalLM<double> src(tiny_qwen2_config(false), qwen2_lora(false, true), 3);
    TempDir dir;
    write_qwen2_dir(src, dir);
    auto any = hf::load_model<double>(dir.str());
    REQUIRE(any.index() == 1);
    auto& loaded = std::get<1>(any);
    check_same_params(src, loaded);
    check_same_logits(src, loaded, 13);
    CHECK(loaded.layers()[0].q_proj.scale == Approx(5.0 / std::sqrt(2.0)).epsilon(1e-15));
    CHECK(registry_names(loaded) == keys_of(dir.file("adapter_model.safetensors")));
  }
  SECTION("tied embeddings, modules_to_save lm_head") {
    nn::Qwen2ForCausalLM<double> src(tiny_qwen2_config(true), qwen2_lora(true, false), 4);
    for (index_t k = 0; k < src.lm_head()->value.numel(); ++k) src.lm_head()->value[k] -= 0.02 * double(k % 5);
    TempDir dir;
    write_qwen2_dir(src, dir);
    auto loaded = hf::load_qwen2<double>(dir.str());
    check_same_params(src, loaded);
    check_same_logits(src, loaded, 13);
    CHECK(registry_names(loaded) == keys_of(dir.file("adapter_model.safetensors")));
  }
  SECTION("base only, in float") {
    nn::Qwen2ForCausalLM<float> src(tiny_qwen2_config(false), std::nullopt, 6);
    TempDir dir;
    write_qwen2_dir(src, dir);
    auto loaded = hf::load_qwen2<float>(dir.str());
    check_same_params(src, loaded);
    check_same_logits(src, loaded, 13);
  }
}

// PEFT freezes every parameter that is not an adapter tensor (bias "none")
// or a modules_to_save copy, so the registry of a loaded checkpoint is
// exactly the adapter file's keys even when target_modules leaves some
// linear layers without an adapter.
TEST_CASE("hf: with partial target_modules the registry is still the adapter's keys", "[io][hf]") {
  nn::LoraConfig l = tiny_lora();
  l.target_modules = {"c_attn"};
  nn::Gpt2LMHeadModel<double> g(tiny_gpt2_config(), l, 21);
  TempDir gd;
  write_gpt2_dir(g, gd);
  auto gl = hf::load_gpt2<double>(gd.str());
  check_same_params(g, gl);
  CHECK(registry_names(gl) == keys_of(gd.file("adapter_model.safetensors")));

  nn::LoraConfig ql = qwen2_lora(false, false);
  ql.target_modules = {"q_proj", "v_proj"};
  nn::Qwen2ForCausalLM<double> q(tiny_qwen2_config(false), ql, 22);
  TempDir qd;
  write_qwen2_dir(q, qd);
  auto qlo = hf::load_qwen2<double>(qd.str());
  check_same_params(q, qlo);
  CHECK(registry_names(qlo) == keys_of(qd.file("adapter_model.safetensors")));
}

TEST_CASE("hf: F32, F16 and BF16 weights convert to the model's type", "[io][hf]") {
  auto src = tiny_gpt2<double>(11);
  for (st::Dtype dt : {st::Dtype::F32, st::Dtype::F16, st::Dtype::BF16, st::Dtype::F64}) {
    INFO("dtype " << st::dtype_name(dt));
    TempDir dir;
    hf::save_pretrained(src, dir.str(), dt);
    const st::File written = st::File::open(dir.file("model.safetensors"));
    for (const auto& t : written.tensors()) CHECK(t.dtype == dt);
    auto loaded = hf::load_gpt2<double>(dir.str());
    // Every loaded value is the source value rounded through the stored type.
    auto round = [dt](double x) {
      switch (dt) {
        case st::Dtype::F32:
          return double(float(x));
        case st::Dtype::F16:
          return double(Eigen::half(float(x)));
        case st::Dtype::BF16:
          return double(Eigen::bfloat16(float(x)));
        default:
          return x;
      }
    };
    const auto ps = params_of(src), pl = params_of(loaded);
    for (const auto& [name, p] : ps) {
      INFO(name);
      const auto& q = pl.at(name).values;
      bool same = true;
      for (std::size_t k = 0; k < p.values.size(); ++k) same = same && q[k] == round(p.values[k]);
      CHECK(same);
    }
    auto as_float = hf::load_gpt2<float>(dir.str());  // into float as well
    check_same_params(loaded, as_float, dt == st::Dtype::F64 ? 1e-7 : 0.0);
  }
}

TEST_CASE("hf: save_pretrained round trips both families", "[io][hf]") {
  auto g = tiny_gpt2<double>(12, true);
  TempDir gd;
  hf::save_pretrained(g, gd.str(), st::Dtype::F64);
  auto g2 = hf::load_gpt2<double>(gd.str());
  check_same_params(g, g2);
  // It writes what the hand-written Hugging Face writer writes.
  CHECK(keys_of(gd.file("model.safetensors")).count("transformer.h.0.attn.c_attn.weight") == 1);
  CHECK(st::File::open(gd.file("model.safetensors")).at("transformer.h.0.mlp.c_fc.weight").shape == Shape{8, 32});
  CHECK(read_json(gd.file("adapter_config.json"))["modules_to_save"] == json::array({"lm_head"}));

  nn::Qwen2ForCausalLM<double> q(tiny_qwen2_config(false), qwen2_lora(true, true), 13);
  TempDir qd;
  hf::save_pretrained(q, qd.str(), st::Dtype::F64);
  auto q2 = hf::load_qwen2<double>(qd.str());
  check_same_params(q, q2);
  check_same_logits(q, q2, 13);
}

TEST_CASE("hf: sharded base weights through model.safetensors.index.json", "[io][hf]") {
  auto src = tiny_gpt2<double>(14);
  TempDir dir;
  write_gpt2_dir(src, dir);
  const Gpt2Files f = gpt2_files(src, true);
  std::filesystem::remove(dir.file("model.safetensors"));
  Tensors a, b;
  json weight_map = json::object();
  for (const auto& [name, t] : f.base) {
    const bool first = name.find(".h.1.") == std::string::npos && name.find("ln_f") == std::string::npos;
    (first ? a : b).emplace(name, t);
    weight_map[name] = first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
  }
  st::write_file(dir.file("model-00001-of-00002.safetensors"), a);
  st::write_file(dir.file("model-00002-of-00002.safetensors"), b);
  write_json(dir.file("model.safetensors.index.json"),
             {{"metadata", {{"total_size", 1234}}}, {"weight_map", weight_map}});
  auto loaded = hf::load_gpt2<double>(dir.str());
  check_same_params(src, loaded);
  check_same_logits(src, loaded, 11);

  const std::string index = dir.file("model.safetensors.index.json");
  SECTION("an index entry the shard lacks") {
    edit_json(dir, "model.safetensors.index.json",
              [](json& j) { j["weight_map"]["transformer.ln_f.bias"] = "model-00001-of-00002.safetensors"; });
    CHECK_INPUT_ERROR(hf::load_gpt2<double>(dir.str()),
                      Contains(index) && Contains("'transformer.ln_f.bias'") && Contains("model-00001-of-00002"));
  }
  SECTION("a key missing from the index") {
    edit_json(dir, "model.safetensors.index.json", [](json& j) { j["weight_map"].erase("transformer.wpe.weight"); });
    CHECK_INPUT_ERROR(hf::load_gpt2<double>(dir.str()),
                      Contains(index) && Contains("missing tensor 'transformer.wpe.weight'"));
  }
  SECTION("a shard outside the directory, a missing shard, no weight_map") {
    edit_json(dir, "model.safetensors.index.json",
              [](json& j) { j["weight_map"]["transformer.wpe.weight"] = "../elsewhere.safetensors"; });
    CHECK_INPUT_ERROR(hf::load_gpt2<double>(dir.str()), Contains(index) && Contains("'../elsewhere.safetensors'"));
    edit_json(dir, "model.safetensors.index.json",
              [](json& j) { j["weight_map"]["transformer.wpe.weight"] = "model-00003.safetensors"; });
    CHECK_INPUT_ERROR(hf::load_gpt2<double>(dir.str()), Contains("model-00003.safetensors") && Contains("cannot open"));
    edit_json(dir, "model.safetensors.index.json", [](json& j) { j.erase("weight_map"); });
    CHECK_INPUT_ERROR(hf::load_gpt2<double>(dir.str()), Contains(index) && Contains("missing field 'weight_map'"));
  }
}

// ---- bad checkpoints -----------------------------------------------------------------------------

TEST_CASE("hf: a weight whose shape disagrees with config.json", "[io][hf][errors]") {
  auto src = tiny_gpt2<double>(15);
  TempDir dir;
  write_gpt2_dir(src, dir);
  const std::string base = dir.file("model.safetensors");
  SECTION("config.json says another size") {
    edit_json(dir, "config.json", [](json& j) { j["n_positions"] = 20; });
    // Refused from the headers, before the model is built.
    CHECK_INPUT_ERROR(hf::load_gpt2<double>(dir.str()),
                      Contains(dir.file("config.json")) && Contains("field 'n_positions' = 20") && Contains(base) &&
                          Contains("'transformer.wpe.weight'") && Contains("has shape [16, 8]"));
  }
  SECTION("a Conv1D weight stored [out, in]") {
    edit_file(dir, "model.safetensors",
              [&](Tensors& t) { t["transformer.h.0.attn.c_attn.weight"] = f64(src.blocks()[0].c_attn.weight.value); });
    CHECK_INPUT_ERROR(hf::load_gpt2<double>(dir.str()),
                      Contains(base) && Contains("'transformer.h.0.attn.c_attn.weight'") &&
                          Contains("has shape [24, 8], expected [8, 24]") && Contains("Conv1D"));
  }
  SECTION("an adapter tensor of the wrong rank") {
    edit_file(dir, "adapter_model.safetensors", [](Tensors& t) {
      t["base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight"] = zeros_f32({32, 3});
    });
    CHECK_INPUT_ERROR(hf::load_gpt2<double>(dir.str()),
                      Contains("adapter_model.safetensors") &&
                          Contains("'base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight'") &&
                          Contains("has shape [32, 3], expected [32, 2]"));
  }
  SECTION("integer weights") {
    edit_file(dir, "model.safetensors", [](Tensors& t) {
      const std::vector<std::int32_t> v(8, 1);
      t["transformer.ln_f.weight"] = st::make_out<std::int32_t>({8}, std::span<const std::int32_t>(v));
    });
    CHECK_INPUT_ERROR(hf::load_gpt2<double>(dir.str()),
                      Contains(base) && Contains("'transformer.ln_f.weight'") && Contains("dtype I32"));
  }
}

TEST_CASE("hf: a missing base weight, LoRA tensors in the base file", "[io][hf][errors]") {
  auto src = tiny_gpt2<double>(16);
  TempDir dir;
  write_gpt2_dir(src, dir);
  const std::string base = dir.file("model.safetensors");
  SECTION("missing key") {
    edit_file(dir, "model.safetensors", [](Tensors& t) { t.erase("transformer.h.1.ln_2.bias"); });
    CHECK_INPUT_ERROR(hf::load_gpt2<double>(dir.str()), Contains(base) &&
                                                            Contains("missing tensor 'transformer.h.1.ln_2.bias'") &&
                                                            Contains("base_model.model.transformer.h.1.ln_2.bias"));
  }
  SECTION("LoRA tensors in the base file") {
    edit_file(dir, "model.safetensors", [](Tensors& t) {
      t.emplace("transformer.h.0.attn.c_attn.lora_A.weight", zeros_f32({2, 8}));
    });
    CHECK_INPUT_ERROR(hf::load_gpt2<double>(dir.str()), Contains(base) &&
                                                            Contains("'transformer.h.0.attn.c_attn.lora_A.weight'") &&
                                                            Contains("LoRA tensor"));
  }
  SECTION("no weights at all") {
    std::filesystem::remove(base);
    CHECK_INPUT_ERROR(hf::load_gpt2<double>(dir.str()),
                      Contains(dir.str()) && Contains("no model.safetensors or model.safetensors.index.json"));
  }
  SECTION("not a directory") {
    CHECK_INPUT_ERROR(hf::load_model<double>(dir.file("nothing-here")), Contains("nothing-here"));
    CHECK_INPUT_ERROR(hf::load_gpt2<double>(base), Contains(base) && Contains("not a checkpoint directory"));
  }
}

TEST_CASE("hf: adapter tensors that do not match the model", "[io][hf][errors]") {
  auto src = tiny_gpt2<double>(17);
  TempDir dir;
  write_gpt2_dir(src, dir);
  const std::string adapter = dir.file("adapter_model.safetensors");
  SECTION("a module the model does not have") {
    edit_file(dir, "adapter_model.safetensors", [](Tensors& t) {
      t.emplace("base_model.model.transformer.h.5.attn.c_attn.lora_A.weight", zeros_f32({2, 8}));
    });
    CHECK_INPUT_ERROR(hf::load_gpt2<double>(dir.str()),
                      Contains(adapter) && Contains("'base_model.model.transformer.h.5.attn.c_attn.lora_A.weight'") &&
                          Contains("no module 'transformer.h.5.attn.c_attn'"));
  }
  SECTION("another family's module name") {
    edit_file(dir, "adapter_model.safetensors", [](Tensors& t) {
      t.emplace("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", zeros_f32({2, 8}));
    });
    CHECK_INPUT_ERROR(hf::load_gpt2<double>(dir.str()),
                      Contains("'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'"));
  }
  SECTION("a module outside target_modules") {
    edit_json(dir, "adapter_config.json", [](json& j) { j["target_modules"] = {"c_attn", "c_proj"}; });
    CHECK_INPUT_ERROR(hf::load_gpt2<double>(dir.str()),
                      Contains(adapter) && Contains("'base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight'") &&
                          Contains("has no adapter"));
  }
  SECTION("a frozen base weight in the adapter") {
    edit_file(dir, "adapter_model.safetensors",
              [](Tensors& t) { t.emplace("base_model.model.transformer.ln_f.weight", zeros_f32({8})); });
    CHECK_INPUT_ERROR(hf::load_gpt2<double>(dir.str()),
                      Contains(adapter) && Contains("'base_model.model.transformer.ln_f.weight'"));
  }
  SECTION("a LoRA parameter of the model missing from the adapter") {
    edit_file(dir, "adapter_model.safetensors",
              [](Tensors& t) { t.erase("base_model.model.transformer.h.1.attn.c_proj.lora_B.weight"); });
    CHECK_INPUT_ERROR(
        hf::load_gpt2<double>(dir.str()),
        Contains(adapter) && Contains("missing tensor 'base_model.model.transformer.h.1.attn.c_proj.lora_B.weight'"));
  }
  SECTION("modules_to_save lm_head without the head in the adapter") {
    edit_json(dir, "adapter_config.json", [](json& j) { j["modules_to_save"] = {"lm_head"}; });
    CHECK_INPUT_ERROR(hf::load_gpt2<double>(dir.str()),
                      Contains(adapter) && Contains("missing tensor 'base_model.model.lm_head.weight'"));
  }
  SECTION("adapter weights without adapter_config.json, and the reverse") {
    std::filesystem::remove(dir.file("adapter_config.json"));
    CHECK_INPUT_ERROR(hf::load_gpt2<double>(dir.str()), Contains(adapter) && Contains("without adapter_config.json"));
    write_json(dir.file("adapter_config.json"), adapter_json(*src.lora(), true));
    std::filesystem::remove(adapter);
    CHECK_INPUT_ERROR(hf::load_gpt2<double>(dir.str()), Contains(adapter) && Contains("missing"));
  }
}

TEST_CASE("hf: model_type, config.json fields and adapter_config.json fields", "[io][hf][errors]") {
  auto src = tiny_gpt2<double>(18);
  TempDir dir;
  write_gpt2_dir(src, dir);
  const std::string config = dir.file("config.json"), acfg = dir.file("adapter_config.json");
  SECTION("unknown or mismatched model_type") {
    edit_json(dir, "config.json", [](json& j) { j["model_type"] = "gemma"; });
    CHECK_INPUT_ERROR(hf::load_model<double>(dir.str()), Contains(config) &&
                                                             Contains("model_type 'gemma' is not supported") &&
                                                             Contains("gpt2, qwen2, llama, mistral, qwen3"));
    CHECK_INPUT_ERROR(hf::load_decoder<double>(dir.str()), Contains("model_type 'gemma' is not a decoder family"));
    edit_json(dir, "config.json", [](json& j) { j["model_type"] = "llama"; });
    CHECK_INPUT_ERROR(hf::load_gpt2<double>(dir.str()), Contains("model_type 'llama', expected 'gpt2'"));
    CHECK_INPUT_ERROR(hf::load_qwen2<double>(dir.str()), Contains("model_type 'llama', expected 'qwen2'"));
    edit_json(dir, "config.json", [](json& j) { j.erase("model_type"); });
    CHECK_INPUT_ERROR(hf::load_model<double>(dir.str()), Contains(config) && Contains("missing field 'model_type'"));
  }
  SECTION("missing and mistyped config fields") {
    edit_json(dir, "config.json", [](json& j) { j.erase("n_embd"); });
    CHECK_INPUT_ERROR(hf::load_gpt2<double>(dir.str()), Contains(config) && Contains("missing field 'n_embd'"));
    edit_json(dir, "config.json", [](json& j) { j["n_embd"] = "8"; });
    CHECK_INPUT_ERROR(hf::load_gpt2<double>(dir.str()),
                      Contains(config) && Contains("field 'n_embd' must be an integer"));
    edit_json(dir, "config.json", [](json& j) { j["n_embd"] = 9; });  // not divisible by n_head
    CHECK_INPUT_ERROR(hf::load_gpt2<double>(dir.str()), Contains(config) && Contains("not divisible"));
    edit_json(dir, "config.json", [](json& j) {
      j["n_embd"] = 8;
      j["activation_function"] = "gelu_fast";
    });
    CHECK_INPUT_ERROR(hf::load_gpt2<double>(dir.str()), Contains(config) && Contains("'activation_function'"));
  }
  SECTION("invalid JSON") {
    std::ofstream(config) << "{\"model_type\": ";
    CHECK_INPUT_ERROR(hf::load_model<double>(dir.str()), Contains(config) && Contains("not valid JSON"));
    std::filesystem::remove(config);
    CHECK_INPUT_ERROR(hf::load_model<double>(dir.str()), Contains(config) && Contains("cannot open"));
  }
  SECTION("adapter_config.json") {
    edit_json(dir, "adapter_config.json", [](json& j) { j["target_modules"] = "(c_attn"; });
    CHECK_INPUT_ERROR(hf::load_gpt2<double>(dir.str()), Contains(acfg) && Contains("'target_modules' = \"(c_attn\"") &&
                                                            Contains("not a regular expression"));
    edit_json(dir, "adapter_config.json", [](json& j) { j["target_modules"] = {"q_proj"}; });
    CHECK_INPUT_ERROR(hf::load_gpt2<double>(dir.str()),
                      Contains(acfg) && Contains("'target_modules' = [q_proj] selects no linear layer"));
    edit_json(dir, "adapter_config.json", [](json& j) {
      j["target_modules"] = {"c_attn", "c_proj", "c_fc"};
      j["peft_type"] = "PREFIX_TUNING";
    });
    CHECK_INPUT_ERROR(hf::load_gpt2<double>(dir.str()), Contains(acfg) && Contains("'peft_type' = 'PREFIX_TUNING'"));
    edit_json(dir, "adapter_config.json", [](json& j) {
      j["peft_type"] = "LORA";
      j["modules_to_save"] = {"wte"};
    });
    // PEFT's suffix rule: "wte" names transformer.wte, trained from the adapter file.
    CHECK_INPUT_ERROR(hf::load_gpt2<double>(dir.str()),
                      Contains(dir.file("adapter_model.safetensors")) &&
                          Contains("missing tensor 'base_model.model.transformer.wte.weight'"));
    edit_json(dir, "adapter_config.json", [](json& j) {
      j["modules_to_save"] = nullptr;
      j["r"] = 0;
    });
    CHECK_INPUT_ERROR(hf::load_gpt2<double>(dir.str()), Contains(acfg) && Contains("field 'r' = 0"));
    edit_json(dir, "adapter_config.json", [](json& j) {
      j["r"] = 2;
      j["use_rslora"] = "yes";
    });
    CHECK_INPUT_ERROR(hf::load_gpt2<double>(dir.str()),
                      Contains(acfg) && Contains("'use_rslora' must be true or false"));
    edit_json(dir, "adapter_config.json", [](json& j) {
      j["use_rslora"] = false;
      j["use_dora"] = true;
    });
    CHECK_INPUT_ERROR(hf::load_gpt2<double>(dir.str()), Contains(acfg) && Contains("'use_dora'"));
  }
}

TEST_CASE("hf: config parsers on their own", "[io][hf]") {
  const json g = gpt2_config_json(tiny_gpt2_config());
  const nn::Gpt2Config c = hf::gpt2_config_from_json(g, "g.json");
  CHECK(c.vocab_size == 11);
  CHECK(c.n_positions == 16);
  CHECK(c.n_embd == 8);
  CHECK(c.n_layer == 2);
  CHECK(c.n_head == 2);
  CHECK(c.layer_norm_epsilon == 1e-5);
  const nn::DecoderConfig q = hf::qwen2_config_from_json(qwen2_config_json(tiny_qwen2_config(true)), "q.json");
  CHECK(q.num_key_value_heads == 1);
  CHECK(q.tie_word_embeddings);
  CHECK(q.rope_theta == 10000.0);
  json q2 = qwen2_config_json(tiny_qwen2_config(false));
  q2["rope_scaling"] = {{"type", "longrope"}, {"factor", 4.0}};
  CHECK_INPUT_ERROR(hf::qwen2_config_from_json(q2, "q.json"),
                    Contains("q.json") && Contains("'rope_scaling.type' = \"longrope\" is not supported"));
  q2.erase("rope_scaling");
  {  // transformers 5 keeps rope_theta in rope_parameters
    json v5 = q2;
    v5.erase("rope_theta");
    v5["rope_parameters"] = {{"rope_theta", 25000.0}, {"rope_type", "default"}};
    v5["layer_types"] = {"full_attention", "full_attention"};
    CHECK(hf::qwen2_config_from_json(v5, "q.json").rope_theta == 25000.0);
    v5["rope_theta"] = 10000.0;
    CHECK_INPUT_ERROR(hf::qwen2_config_from_json(v5, "q.json"), Contains("q.json") && Contains("disagree"));
    v5.erase("rope_theta");
    v5["rope_parameters"]["rope_type"] = "linear";
    CHECK_INPUT_ERROR(hf::qwen2_config_from_json(v5, "q.json"), Contains("missing field 'rope_parameters.factor'"));
    v5["rope_parameters"]["factor"] = 2.0;
    CHECK(hf::qwen2_config_from_json(v5, "q.json").rope_scaling.factor == 2.0);
    v5["rope_parameters"]["rope_type"] = "default";
    v5["layer_types"] = {"full_attention", "sliding_attention"};
    v5["use_sliding_window"] = true;
    CHECK(hf::qwen2_config_from_json(v5, "q.json").sliding_layers == std::vector<index_t>{1});
    v5["layer_types"] = {"full_attention"};
    CHECK_INPUT_ERROR(hf::qwen2_config_from_json(v5, "q.json"),
                      Contains("q.json") && Contains("'layer_types' must be a list of num_hidden_layers = 2"));
  }
  q2["num_key_value_heads"] = 3.0;
  CHECK_INPUT_ERROR(hf::qwen2_config_from_json(q2, "q.json"),
                    Contains("q.json") && Contains("'num_key_value_heads' must be an integer"));
  q2.erase("num_key_value_heads");  // Qwen2Config's default is 32, which 2 heads cannot share
  CHECK_INPUT_ERROR(hf::qwen2_config_from_json(q2, "q.json"),
                    Contains("q.json") && Contains("not divisible by num_key_value_heads 32"));
  q2["rms_norm_eps"] = "1e-6";
  CHECK_INPUT_ERROR(hf::qwen2_config_from_json(q2, "q.json"), Contains("'rms_norm_eps' must be a number"));
  CHECK_INPUT_ERROR(hf::gpt2_config_from_json(json::array(), "g.json"), Contains("g.json"));

  const nn::LoraConfig l = hf::lora_config_from_json(adapter_json(tiny_lora(true), true), "a.json");
  CHECK(l.r == 2);
  CHECK(l.lora_alpha == 4);
  CHECK(l.target_modules == std::vector<std::string>{"c_attn", "c_proj", "c_fc"});
  CHECK(l.modules_to_save == std::vector<std::string>{"lm_head"});
  CHECK_FALSE(l.use_rslora);
  json a = adapter_json(tiny_lora(), true);
  a.erase("lora_alpha");
  CHECK_INPUT_ERROR(hf::lora_config_from_json(a, "a.json"),
                    Contains("a.json") && Contains("missing field 'lora_alpha'"));
  // PEFT 0.21 writes these fields with their defaults: accepted.
  json peft = adapter_json(tiny_lora(), true);
  for (const char* k : {"exclude_modules", "layer_replication", "layers_pattern", "layers_to_transform",
                        "alora_invocation_tokens", "target_parameters", "trainable_token_indices"})
    peft[k] = nullptr;
  peft["lora_bias"] = false;
  peft["use_dora"] = false;
  peft["rank_pattern"] = json::object();
  peft["alpha_pattern"] = json::object();
  peft["loftq_config"] = json::object();
  CHECK(hf::lora_config_from_json(peft, "a.json").r == 2);
  // ... and rejects them when they change the adapter.
  const std::vector<std::pair<std::string, json>> unsupported{{"lora_bias", true},
                                                              {"use_dora", true},
                                                              {"use_qalora", true},
                                                              {"layer_replication", {{0, 1}}},
                                                              {"trainable_token_indices", {1, 2}},
                                                              {"bias", "some"},
                                                              {"rank_pattern", {{"c_attn", 0}}},
                                                              {"alpha_pattern", {{"c_fc", "two"}}},
                                                              {"layers_to_transform", {-1}}};
  for (const auto& [key, value] : unsupported) {
    json bad = peft;
    bad[key] = value;
    CHECK_INPUT_ERROR(hf::lora_config_from_json(bad, "a.json"), Contains("a.json") && Contains("field '" + key));
  }
}

// ---- Adam state ------------------------------------------------------------------------------------

TEST_CASE("hf: Adam state round trip; parameters without state stay without", "[io][hf][adam]") {
  auto model = tiny_gpt2<double>(20);
  const auto reg = Registry<double>::build(model);
  auto state = random_adam_state(reg, 3, "h.1.mlp");
  state.hyper() = AdamHyper{3e-4, 0.85, 0.995, 1e-7, 0.05};
  REQUIRE(state.missing_count() == 4);
  TempDir dir;
  const std::string path = dir.file("optimizer.safetensors");
  hf::save_adam_state(state, path);
  const st::File f = st::File::open(path);
  CHECK(f.metadata().at("lr") == "0.0003");
  CHECK(f.contains("base_model.model.transformer.h.0.attn.c_attn.lora_A.weight.exp_avg_sq"));
  CHECK(f.at("base_model.model.transformer.h.0.attn.c_attn.lora_A.weight.step").shape.empty());

  const auto loaded = hf::load_adam_state(path, reg);
  CHECK(loaded.info() == reg.info());
  CHECK(loaded.hyper().lr == 3e-4);
  CHECK(loaded.hyper().beta1 == 0.85);
  CHECK(loaded.hyper().beta2 == 0.995);
  CHECK(loaded.hyper().eps == 1e-7);
  CHECK(loaded.hyper().weight_decay == 0.05);
  CHECK(loaded.missing_count() == 4);
  for (index_t i = 0; i < reg.size(); ++i) {
    INFO(reg.entry(i).name);
    const auto* a = state.entry(i);
    const auto* b = loaded.entry(i);
    REQUIRE((a == nullptr) == (b == nullptr));
    if (!a) continue;
    CHECK(a->exp_avg.to_host() == b->exp_avg.to_host());
    CHECK(a->exp_avg_sq.to_host() == b->exp_avg_sq.to_host());
    CHECK(a->step == b->step);
  }
  // The same file into a float model of the same layout.
  auto fmodel = tiny_gpt2<float>(20);
  const auto freg = Registry<float>::build(fmodel);
  const auto fstate = hf::load_adam_state(path, freg);
  CHECK(fstate.missing_count() == 4);
  CHECK(fstate.entry(0)->exp_avg[0] == float(state.entry(0)->exp_avg[0]));
}

namespace {
// A one-parameter Adam file for the first registry parameter, edited by the caller.
struct AdamFile {
  Tensors t;
  std::map<std::string, std::string> meta{
      {"lr", "0.001"}, {"beta1", "0.9"}, {"beta2", "0.999"}, {"eps", "1e-08"}, {"weight_decay", "0.01"}};
};
AdamFile one_param_state(const Registry<double>& reg) {
  AdamFile f;
  const auto& e = reg.entry(0);
  f.t.emplace(e.name + ".exp_avg", zeros_f32(e.param->value.shape()));
  f.t.emplace(e.name + ".exp_avg_sq", zeros_f32(e.param->value.shape()));
  const std::vector<std::int64_t> step{5};
  f.t.emplace(e.name + ".step", st::make_out<std::int64_t>({1}, std::span<const std::int64_t>(step)));
  return f;
}
}  // namespace

TEST_CASE("hf: Adam state as PyTorch keeps it, and bad optimizer files", "[io][hf][adam][errors]") {
  auto model = tiny_gpt2<double>(21);
  const auto reg = Registry<double>::build(model);
  const std::string name = reg.entry(0).name;
  TempDir dir;
  const std::string path = dir.file("optimizer.safetensors");
  auto load = [&](const AdamFile& f) {
    st::write_file(path, f.t, f.meta);
    return hf::load_adam_state(path, reg);
  };
  {  // step as I64 [1], moments as F32: accepted
    const auto s = load(one_param_state(reg));
    CHECK(s.entry(0)->step == 5);
    CHECK(s.missing_count() == reg.size() - 1);
    CHECK(s.hyper().eps == 1e-8);
  }
  {  // step as an F32 scalar []
    AdamFile f = one_param_state(reg);
    const std::vector<float> step{7};
    f.t[name + ".step"] = st::make_out<float>({}, std::span<const float>(step));
    CHECK(load(f).entry(0)->step == 7);
  }
  SECTION("metadata") {
    AdamFile f = one_param_state(reg);
    f.meta.erase("lr");
    CHECK_INPUT_ERROR(load(f), Contains(path) && Contains("__metadata__ has no 'lr'"));
    f = one_param_state(reg);
    f.meta["beta2"] = "abc";
    CHECK_INPUT_ERROR(load(f), Contains(path) && Contains("'beta2' = 'abc' is not a finite decimal number"));
    f.meta["beta2"] = "0.999x";
    CHECK_INPUT_ERROR(load(f), Contains("'beta2' = '0.999x'"));
    f.meta["beta2"] = "1.5";
    CHECK_INPUT_ERROR(load(f), Contains(path) && Contains("'beta2' = 1.5 is outside [0, 1)"));
    f.meta["beta2"] = "0.999";
    f.meta["eps"] = "nan";
    CHECK_INPUT_ERROR(load(f), Contains("'eps' = 'nan'"));
    f.meta["eps"] = "1e-8";
    f.meta["weight_decay"] = "-0.1";
    CHECK_INPUT_ERROR(load(f), Contains("'weight_decay' = -0.1 is negative"));
    f.meta.clear();
    CHECK_INPUT_ERROR(load(f), Contains("__metadata__ has no 'lr'"));
  }
  SECTION("state for a name the registry does not hold") {
    AdamFile f = one_param_state(reg);
    f.t.emplace("base_model.model.transformer.h.9.attn.c_attn.lora_A.weight.exp_avg", zeros_f32({2, 8}));
    CHECK_INPUT_ERROR(load(f), Contains(path) &&
                                   Contains("'base_model.model.transformer.h.9.attn.c_attn.lora_A.weight'") &&
                                   Contains("not a trainable parameter"));
    f = one_param_state(reg);
    f.t.emplace("base_model.model.transformer.wte.weight.exp_avg", zeros_f32({11, 8}));  // frozen
    CHECK_INPUT_ERROR(load(f), Contains("'base_model.model.transformer.wte.weight'"));
  }
  SECTION("unknown keys, missing parts, wrong shapes") {
    AdamFile f = one_param_state(reg);
    f.t.emplace(name + ".max_exp_avg_sq", zeros_f32(reg.entry(0).param->value.shape()));
    CHECK_INPUT_ERROR(load(f), Contains(path) && Contains("'" + name + ".max_exp_avg_sq'"));
    f = one_param_state(reg);
    f.t.erase(name + ".exp_avg_sq");
    CHECK_INPUT_ERROR(load(f), Contains(path) && Contains("missing tensor '" + name + ".exp_avg_sq'"));
    f = one_param_state(reg);
    f.t[name + ".exp_avg"] = zeros_f32({3, 3});
    CHECK_INPUT_ERROR(load(f), Contains(path) && Contains("'" + name + ".exp_avg' has shape [3, 3]"));
    f = one_param_state(reg);
    f.t[name + ".step"] = zeros_f32({2});
    CHECK_INPUT_ERROR(load(f), Contains("'" + name + ".step' has shape [2], expected [] or [1]"));
    f = one_param_state(reg);
    const std::vector<double> neg{-1};
    f.t[name + ".step"] = st::make_out<double>({}, std::span<const double>(neg));
    CHECK_INPUT_ERROR(load(f), Contains("'" + name + ".step' = -1"));
  }
}

// ---- batch files -----------------------------------------------------------------------------------

namespace {
void check_same_batch(const TokenBatch& a, const TokenBatch& b) {
  CHECK(a.B == b.B);
  CHECK(a.G == b.G);
  CHECK(a.T == b.T);
  CHECK(a.sequences == b.sequences);
  CHECK(a.attention_mask == b.attention_mask);
  CHECK(a.prompt_lens == b.prompt_lens);
  CHECK(a.advantages == b.advantages);
  CHECK(a.max_lengths == b.max_lengths);
  CHECK(a.rewards == b.rewards);
  CHECK(a.position_ids == b.position_ids);
}

template <class T>
st::OutTensor out(const Shape& s, const std::vector<T>& v) {
  return st::make_out<T>(s, std::span<const T>(v));
}

// A batch as PyTorch might write it: I32 ids, BOOL mask, F32 advantages.
Tensors narrow_batch_file(const TokenBatch& b) {
  Tensors t;
  const Shape bgt{b.B, b.G, b.T};
  t.emplace("sequences", out(bgt, b.sequences));
  st::OutTensor mask{st::Dtype::BOOL, bgt, {}};
  for (auto m : b.attention_mask) mask.bytes.push_back(static_cast<std::byte>(m));
  t.emplace("attention_mask", mask);
  t.emplace("prompt_lens", out(Shape{b.B}, b.prompt_lens));
  t.emplace("advantages", out(Shape{b.B, b.G}, std::vector<float>(b.advantages.begin(), b.advantages.end())));
  return t;
}
}  // namespace

TEST_CASE("hf: batch files round trip, with and without the optional tensors", "[io][hf][batch]") {
  TempDir dir;
  const std::string path = dir.file("E.safetensors");
  TokenBatch b = random_batch(3, 2, 7, 11, 5);
  hf::save_batch(b, path);
  check_same_batch(b, hf::load_batch(path));
  b.max_lengths = std::vector<double>{4, 5, 6};
  b.rewards = std::vector<double>{0.5, 1, 0, 0.25, 1, 1};
  b.position_ids = std::vector<std::int32_t>(b.sequences.size());
  for (std::size_t i = 0; i < b.position_ids->size(); ++i) (*b.position_ids)[i] = std::int32_t(i % 7) + 3;
  hf::save_batch(b, path);
  const TokenBatch c = hf::load_batch(path);
  check_same_batch(b, c);
  CHECK_NOTHROW(c.validate(11, path));

  // Narrow dtypes as PyTorch may write them.
  TokenBatch n = random_batch(2, 3, 6, 11, 6);
  for (auto& a : n.advantages) a = double(float(a));
  st::write_file(path, narrow_batch_file(n));
  check_same_batch(n, hf::load_batch(path));
}

TEST_CASE("hf: bad batch files", "[io][hf][batch][errors]") {
  TempDir dir;
  const std::string path = dir.file("U.safetensors");
  const TokenBatch b = random_batch(2, 2, 5, 11, 7);
  auto with = [&](const std::function<void(Tensors&)>& edit) {
    Tensors t = narrow_batch_file(b);
    edit(t);
    st::write_file(path, t);
    return path;
  };
  SECTION("shapes that disagree") {
    with([](Tensors& t) { t["attention_mask"] = out(Shape{2, 2, 4}, std::vector<std::uint8_t>(16, 1)); });
    CHECK_INPUT_ERROR(hf::load_batch(path), Contains(path) && Contains("'attention_mask' has shape [2, 2, 4]") &&
                                                Contains("expected [2, 2, 5]"));
    with([](Tensors& t) { t["advantages"] = out(Shape{2}, std::vector<double>{1, 2}); });
    CHECK_INPUT_ERROR(hf::load_batch(path), Contains(path) && Contains("'advantages' has shape [2], expected [2, 2]"));
    with([](Tensors& t) { t["prompt_lens"] = out(Shape{3}, std::vector<std::int32_t>{1, 2, 3}); });
    CHECK_INPUT_ERROR(hf::load_batch(path), Contains("'prompt_lens' has shape [3], expected [2]"));
    with([](Tensors& t) { t["sequences"] = out(Shape{4, 5}, std::vector<std::int32_t>(20, 1)); });
    CHECK_INPUT_ERROR(hf::load_batch(path),
                      Contains(path) && Contains("'sequences' has shape [4, 5], expected [B, G, T]"));
    with([](Tensors& t) { t["rewards"] = out(Shape{2, 3}, std::vector<double>(6, 1)); });
    CHECK_INPUT_ERROR(hf::load_batch(path), Contains("'rewards' has shape [2, 3], expected [2, 2]"));
    with([](Tensors& t) { t["position_ids"] = out(Shape{2, 2, 6}, std::vector<std::int32_t>(24, 1)); });
    CHECK_INPUT_ERROR(hf::load_batch(path), Contains("'position_ids' has shape [2, 2, 6]"));
    with([](Tensors& t) { t["max_lengths"] = out(Shape{1}, std::vector<double>{3}); });
    CHECK_INPUT_ERROR(hf::load_batch(path), Contains("'max_lengths' has shape [1], expected [2]"));
  }
  SECTION("missing tensors and wrong dtypes") {
    with([](Tensors& t) { t.erase("prompt_lens"); });
    CHECK_INPUT_ERROR(hf::load_batch(path), Contains(path) && Contains("missing tensor 'prompt_lens'"));
    with([&](Tensors& t) {
      t["sequences"] = out(Shape{2, 2, 5}, std::vector<float>(b.sequences.begin(), b.sequences.end()));
    });
    CHECK_INPUT_ERROR(hf::load_batch(path), Contains(path) && Contains("'sequences' has dtype F32"));
    with([&](Tensors& t) { t["advantages"] = out(Shape{2, 2}, std::vector<std::int32_t>{1, 0, -1, 0}); });
    CHECK_INPUT_ERROR(hf::load_batch(path), Contains("'advantages' has dtype I32"));
  }
  SECTION("values outside int32, masks other than 0/1") {
    with([&](Tensors& t) {
      std::vector<std::int64_t> s(b.sequences.begin(), b.sequences.end());
      s[7] = std::int64_t{1} << 31;
      t["sequences"] = out(Shape{2, 2, 5}, s);
    });
    CHECK_INPUT_ERROR(hf::load_batch(path),
                      Contains(path) && Contains("sequences[0,1,2] = 2147483648 is outside the int32 range"));
    with([&](Tensors& t) { t["prompt_lens"] = out(Shape{2}, std::vector<std::int64_t>{2, -(std::int64_t{1} << 40)}); });
    CHECK_INPUT_ERROR(hf::load_batch(path), Contains("prompt_lens[1] = -1099511627776 is outside the int32 range"));
    with([&](Tensors& t) {
      std::vector<std::int64_t> m(b.attention_mask.begin(), b.attention_mask.end());
      m[19] = 2;
      t["attention_mask"] = out(Shape{2, 2, 5}, m);
    });
    CHECK_INPUT_ERROR(hf::load_batch(path), Contains(path) && Contains("attention_mask[1,1,4] = 2 is not 0 or 1"));
  }
  SECTION("a token id beyond the vocabulary (TokenBatch::validate)") {
    with([&](Tensors& t) {
      std::vector<std::int32_t> s = b.sequences;
      s[3] = 11;
      t["sequences"] = out(Shape{2, 2, 5}, s);
    });
    const TokenBatch loaded = hf::load_batch(path);
    CHECK_NOTHROW(loaded.validate(12, path));
    CHECK_INPUT_ERROR(loaded.validate(11, path),
                      Contains(path) && Contains("sequences[0,0,3] = 11") && Contains("vocabulary"));
  }
  SECTION("not a safetensors file") {
    std::ofstream(path) << "hello";
    CHECK_INPUT_ERROR(hf::load_batch(path), Contains(path) && Contains("truncated"));
  }
}
