// Parity with PyTorch: the golden checkpoints of tests/data/golden (real
// transformers models with real PEFT adapters and AdamW state, written by
// tools/make_golden.py) loaded through entropy_probe::hf, and every probe
// quantity compared with the float64 PyTorch reference in golden.json /
// golden_tensors.safetensors.
//
// Tolerances (relative): double 1e-9 for every probe quantity, 1e-11 for
// logits; float 1e-5 for logits and 1e-4 for probe quantities. Vectors
// (logits, s_values, S, mu buffers) are compared normwise: max |a - b| / max |b|.
// Two float comparisons account for cancellation that no implementation can
// avoid (their double comparisons are plain relative):
//   * the differences of two entropies (deltaH_true, deltaH_true_tok) are
//     compared relative to the entropies they are differences of (a float S
//     carries ~1e-7 of |S|, and the difference can be 1e-4 of it);
//   * bars_dot and deltaH1 are compared relative to max(|value|,
//     1e-3 |mu_X| |mu_Y|): a float gradient carries ~3e-7 of its norm, so a dot
//     product of nearly orthogonal buffers (gpt2_lora: |mu_X||mu_Y| = 5300
//     |bars_dot|) cannot be closer than ~1e-7 |mu_X| |mu_Y|.
// The plain relative errors of these are printed as well ("plain").
//
// Every test case prints its measured errors (run with -s, or see the
// "parity:" lines of the ctest log).
#include "../support/numeric.hpp"

#include <catch2/catch.hpp>

#include <entropy_probe/entropy_probe.hpp>
#include <entropy_probe/io/hf.hpp>
#include <entropy_probe/io/safetensors.hpp>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

using ep_test::rel_to;

namespace {

namespace ep = entropy_probe;
using nlohmann::json;

const std::filesystem::path kGoldenDir = std::filesystem::path(__FILE__).parent_path().parent_path() / "data/golden";

json read_golden(const std::filesystem::path& dir) {
  std::ifstream in(dir / "golden.json");
  REQUIRE(in.good());
  return json::parse(in);
}

template <class T>
struct Tol;
template <>
struct Tol<double> {
  static constexpr double probe = 1e-9, logits = 1e-11;
  static constexpr const char* name = "double";
};
template <>
struct Tol<float> {
  static constexpr double probe = 1e-4, logits = 1e-5;
  static constexpr const char* name = "float";
};

// Collects the worst relative error per quantity of one test case and prints them.
class Errors {
 public:
  explicit Errors(std::string label) : label_(std::move(label)) {}
  ~Errors() {
    std::string out = fmt::format("parity: {}\n", label_);
    for (const auto& [k, v] : worst_) out += fmt::format("parity:   {:<28} {:.3e}\n", k, v);
    std::fputs(out.c_str(), stdout);
  }
  // Records one error without checking it.
  void record(const std::string& what, double err) {
    auto& w = worst_[what];
    w = std::max(w, err);
  }
  // Records and checks one relative error.
  void check(const std::string& what, double err, double tol) {
    record(what, err);
    INFO(label_ << ": " << what << " relative error " << err << " (tolerance " << tol << ")");
    CHECK(err <= tol);
  }

 private:
  std::string label_;
  std::map<std::string, double> worst_;
};

// max |a - b| / max |b| over paired entries; a comparison over no entries
// is a failure, not a zero error.
double rel_vec(const std::vector<double>& got, const std::vector<double>& want) {
  REQUIRE(got.size() == want.size());
  REQUIRE_FALSE(want.empty());
  double num = 0, den = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    num = std::max(num, std::abs(got[i] - want[i]));
    den = std::max(den, std::abs(want[i]));
  }
  return num == 0 ? 0 : num / std::max(den, 1e-300);
}

std::vector<double> as_vec(const json& j) { return j.get<std::vector<double>>(); }

// A buffer entry's elements on the host.
template <class Entry>
std::vector<double> host(const Entry& t) {
  return t.to_host();
}

ep::Weighting weighting_of(const std::string& s) {
  if (s == "dr_grpo") return ep::Weighting::dr_grpo;
  if (s == "per_token_avg") return ep::Weighting::per_token_avg;
  FAIL("unknown weighting " << s);
  return ep::Weighting::dr_grpo;
}

// The adapter file's keys (the registry names PEFT wrote).
std::set<std::string> adapter_keys(const std::filesystem::path& dir) {
  const auto f = ep::safetensors::File::open((dir / "adapter_model.safetensors").string());
  std::set<std::string> keys;
  for (const auto& t : f.tensors()) keys.insert(t.name);
  return keys;
}

template <class T, class M>
void check_checkpoint(const std::string& name, M& model, Errors& err) {
  const std::filesystem::path dir = kGoldenDir / name;
  const json g = read_golden(dir);
  const double tol = Tol<T>::probe;
  const auto E = ep::hf::load_batch((dir / "E.safetensors").string());
  const auto U = ep::hf::load_batch((dir / "U.safetensors").string());
  const auto tensors = ep::safetensors::File::open((dir / "golden_tensors.safetensors").string());

  // ---- logits on E at real query positions
  {
    ep::Tape<T> tape;
    const ep::SequenceInput in = ep::sequence_input(E);
    const ep::Var z = model.forward(tape, in);
    const std::vector<T> got = tape.value(z).to_host();
    const auto& want_view = tensors.at("logits_E");
    const std::vector<double> want = want_view.template to_vector<double>();
    REQUIRE(got.size() == want.size());
    const std::size_t V = static_cast<std::size_t>(model.vocab_size());
    std::vector<double> a, b;
    for (std::size_t row = 0; row < E.attention_mask.size(); ++row)
      if (E.attention_mask[row])
        for (std::size_t v = 0; v < V; ++v) {
          a.push_back(static_cast<double>(got[row * V + v]));
          b.push_back(want[row * V + v]);
        }
    err.check("logits", rel_vec(a, b), Tol<T>::logits);
  }

  REQUIRE(g["variants"].is_array());
  REQUIRE_FALSE(g["variants"].empty());  // a golden without variants checks nothing below
  for (const json& variant : g["variants"]) {
    const json& vc = variant["config"];
    const std::string tag =
        fmt::format("[{} tau={}] ", vc["weighting"].get<std::string>(), vc["temperature"].get<double>());
    ep::ProbeConfig cfg;
    cfg.weighting = weighting_of(vc["weighting"]);
    cfg.temperature = vc["temperature"];
    cfg.variance = ep::VarianceMode::full;

    // ---- sequence log-probs
    {
      const auto S_E = ep::sequence_logprobs(model, E, cfg.temperature);
      const auto S_U = ep::sequence_logprobs(model, U, cfg.temperature);
      err.check(tag + "S (E)", rel_vec(S_E, as_vec(variant["E"]["S"])), tol);
      err.check(tag + "S (U)", rel_vec(S_U, as_vec(variant["U"]["S"])), tol);
      for (ep::index_t b = 0; b < E.B; ++b)
        CHECK(E.lmax(b) == variant["E"]["Lmax"][static_cast<std::size_t>(b)].get<double>());
      for (ep::index_t b = 0; b < U.B; ++b)
        CHECK(U.lmax(b) == variant["U"]["Lmax"][static_cast<std::size_t>(b)].get<double>());
    }

    for (const auto kind : {ep::StepKind::adam, ep::StepKind::precond_sgd}) {
      for (const ep::index_t mb : {ep::index_t{0}, ep::index_t{1}}) {
        if (mb == 1 && kind == ep::StepKind::precond_sgd) continue;  // microbatching: once per variant
        cfg.ground_truth = kind;
        cfg.mb_size = mb;
        cfg.alpha_route = mb == 1 ? ep::AlphaRoute::reverse : ep::AlphaRoute::jvp;
        // Both directions ride on the adam runs, so the influences are along adamw there
        // and along precond_sgd on the precond_sgd run.
        const bool adamw = kind == ep::StepKind::adam;
        cfg.directions = adamw ? std::vector{ep::Direction::precond_sgd, ep::Direction::adamw}
                               : std::vector{ep::Direction::precond_sgd};
        cfg.influence = true;
        ep::OfflineEntropyProbe probe(model, cfg);
        const auto& reg = probe.registry();

        // registry: the adapter file's keys, the golden's names, the LoRA view
        std::set<std::string> names;
        for (const auto& e : reg.entries()) names.insert(e.name);
        CHECK(names == adapter_keys(dir));
        const auto golden_names = g["registry"]["names"].get<std::vector<std::string>>();
        CHECK(names == std::set<std::string>(golden_names.begin(), golden_names.end()));
        CHECK(reg.size() == g["registry"]["trainable_tensors"].get<ep::index_t>());
        CHECK(reg.lora_count() == g["registry"]["lora_tensors"].get<ep::index_t>());
        CHECK(reg.numel() == g["registry"]["trainable_numel"].get<ep::index_t>());

        const auto state = ep::hf::load_adam_state<T>((dir / "optimizer.safetensors").string(), reg);
        CHECK(state.missing_count() == 0);
        CHECK(state.hyper().lr == g["adam"]["lr"].get<double>());
        CHECK(state.hyper().beta1 == g["adam"]["beta1"].get<double>());
        CHECK(state.hyper().beta2 == g["adam"]["beta2"].get<double>());
        CHECK(state.hyper().eps == g["adam"]["eps"].get<double>());
        CHECK(state.hyper().weight_decay == g["adam"]["weight_decay"].get<double>());

        const ep::ProbeResult r = probe.run(E, U, state);
        const std::string k = tag + (mb ? "mb=1 reverse " : "");
        CHECK(r.B_E == variant["B_E"].get<ep::index_t>());
        CHECK(r.B_U == variant["B_U"].get<ep::index_t>());
        CHECK(r.learning_rate == g["learning_rate"].get<double>());
        CHECK(r.learning_rate_source == "optimizer");
        CHECK(r.preconditioner_missing == 0);
        {
          const bool is_float = std::is_same_v<T, float>;
          const double bd = variant["bars_dot"], dh = variant["deltaH1"];
          const double cs = variant["mu_X_norm"].get<double>() * variant["mu_Y_norm"].get<double>();
          const double eta = g["learning_rate"];
          const double s_bd = is_float ? std::max(std::abs(bd), 1e-3 * cs) : std::abs(bd);
          const double s_dh = is_float ? std::max(std::abs(dh), 1e-3 * eta * cs) : std::abs(dh);
          const char* suffix = is_float ? " (cond.)" : "";
          err.check(k + "bars_dot" + suffix, std::abs(r.bars_dot - bd) / s_bd, tol);
          err.check(k + "deltaH1" + suffix, std::abs(r.deltaH1 - dh) / s_dh, tol);
          if (is_float) {
            err.record(k + "bars_dot (plain)", rel_to(r.bars_dot, bd));
            err.record(k + "deltaH1 (plain)", rel_to(r.deltaH1, dh));
          }
        }
        err.check(k + "mu_X_norm", rel_to(r.mu_X_norm, variant["mu_X_norm"]), tol);
        err.check(k + "mu_Y_norm", rel_to(r.mu_Y_norm, variant["mu_Y_norm"]), tol);
        REQUIRE(r.conditional);
        err.check(k + "s_values", rel_vec(r.conditional->s_values, as_vec(variant["s_values"])), tol);
        err.check(k + "SE_conditional", rel_to(r.conditional->se_conditional, variant["SE_conditional"]), tol);
        REQUIRE(r.full);
        err.check(k + "V_X", rel_to(r.full->V_X, variant["V_X"]), tol);
        err.check(k + "V_Y", rel_to(r.full->V_Y, variant["V_Y"]), tol);
        err.check(k + "SE_deltaH1", rel_to(r.full->se_deltaH1, variant["SE_deltaH1"]), tol);

        REQUIRE(r.truth);
        const json& gt = variant["ground_truth"][ep::to_string(kind)];
        const std::string kk = k + ep::to_string(kind) + " ";
        for (const char* f : {"H_orig", "H_upd", "H_orig_tok", "H_upd_tok", "ESS"}) {
          const double got = f == std::string("H_orig")       ? r.truth->H_orig
                             : f == std::string("H_upd")      ? r.truth->H_upd
                             : f == std::string("H_orig_tok") ? r.truth->H_orig_tok
                             : f == std::string("H_upd_tok")  ? r.truth->H_upd_tok
                                                              : r.truth->ESS;
          err.check(kk + f, rel_to(got, gt[f]), tol);
        }
        // Differences of two entropies: in float relative to the entropies themselves.
        const bool is_float = std::is_same_v<T, float>;
        const double scale =
            is_float ? std::abs(gt["H_orig"].get<double>()) : std::abs(gt["deltaH_true"].get<double>());
        const double scale_tok =
            is_float ? std::abs(gt["H_orig_tok"].get<double>()) : std::abs(gt["deltaH_true_tok"].get<double>());
        err.check(kk + "deltaH_true" + (is_float ? " (/H)" : ""),
                  std::abs(r.truth->deltaH_true - gt["deltaH_true"].get<double>()) / scale, tol);
        err.check(kk + "deltaH_true_tok" + (is_float ? " (/H_tok)" : ""),
                  std::abs(r.truth->deltaH_true_tok - gt["deltaH_true_tok"].get<double>()) / scale_tok, tol);
        if (is_float) {  // the plain relative errors, measured and printed, not checked
          err.record(kk + "deltaH_true (plain)", rel_to(r.truth->deltaH_true, gt["deltaH_true"]));
          err.record(kk + "deltaH_true_tok (plain)", rel_to(r.truth->deltaH_true_tok, gt["deltaH_true_tok"]));
        }

        // ---- the adamw direction and the per-sequence influences along it. Checked in
        // double; in float the step's denominator carries float rounding of v', so the
        // errors are measured and printed only.
        std::vector<double> infl;
        for (const auto& s : r.influence) infl.push_back(s.influence);
        if (!adamw) {
          REQUIRE(r.influence_direction == ep::Direction::precond_sgd);
          const double e = rel_vec(infl, as_vec(variant["influence_precond_sgd"]));
          if constexpr (std::is_same_v<T, double>)
            err.check(k + "precond_sgd influence", e, tol);
          else
            err.record(k + "precond_sgd influence (plain)", e);
        }
        if (adamw) {
          const json& ga = variant["adamw"];
          REQUIRE(r.directions.size() == 2);
          const ep::DirectionResult& d = r.directions[1];
          REQUIRE(d.direction == ep::Direction::adamw);
          REQUIRE(r.influence_direction == ep::Direction::adamw);
          REQUIRE(r.influence.size() == ga["influence"].size());
          const std::pair<std::string, double> adamw_errors[] = {
              {"adamw deltaH1", rel_to(d.deltaH1, ga["deltaH1"])},
              {"adamw bars_dot", rel_to(d.bars_dot, ga["bars_dot"])},
              {"adamw momentum_share", rel_to(*d.momentum_share, ga["momentum_share"])},
              {"adamw decay_share", rel_to(*d.decay_share, ga["decay_share"])},
              {"adamw influence", rel_vec(infl, as_vec(ga["influence"]))}};
          for (const auto& [what, e] : adamw_errors) {
            if constexpr (std::is_same_v<T, double>)
              err.check(k + what, e, tol);
            else
              err.record(k + what + " (plain)", e);
          }
        }

        // ---- mu_X and mu_Y per parameter (the golden holds them for the first variant)
        if (&variant == &g["variants"][0] && kind == ep::StepKind::adam && mb == 0) {
          const auto& comp = probe.components();
          auto sx = comp.accumulate_sum_X(E);
          auto sy = comp.accumulate_sum_Y(U);
          ep::AdamPreconditioner<T> pre(state);
          const auto mu_Y = ep::preconditioned_mean(sy.sum, sy.count, pre);
          std::vector<double> gx, wx, gy, wy;
          for (ep::index_t i = 0; i < reg.size(); ++i) {
            const std::string& n = reg.entry(i).name;
            REQUIRE(sx.sum.entry(i));
            REQUIRE(mu_Y.entry(i));
            for (double v : host(*sx.sum.entry(i))) gx.push_back(v / double(sx.count));
            for (double v : host(*mu_Y.entry(i))) gy.push_back(v);
            const auto x = tensors.at("mu_X." + n).template to_vector<double>();
            const auto y = tensors.at("mu_Y." + n).template to_vector<double>();
            wx.insert(wx.end(), x.begin(), x.end());
            wy.insert(wy.end(), y.begin(), y.end());
          }
          err.check("mu_X (per element)", rel_vec(gx, wx), tol);
          err.check("mu_Y (per element)", rel_vec(gy, wy), tol);
        }
      }
    }
  }
}

template <class T>
void run_parity(const std::string& name) {
  const std::filesystem::path dir = kGoldenDir / name;
  REQUIRE(std::filesystem::exists(dir / "golden.json"));
  Errors err(fmt::format("{} ({})", name, Tol<T>::name));
  auto any = ep::hf::load_model<T>(dir.string());
  const json g = read_golden(dir);
  const std::string family = g["model_type"];
  CHECK(any.index() == (family == "gpt2" ? 0u : 1u));
  std::visit([&](auto& model) { check_checkpoint<T>(name, model, err); }, any);
}

}  // namespace

TEMPLATE_TEST_CASE("golden: gpt2_lora matches PyTorch + PEFT", "[parity]", double, float) {
  run_parity<TestType>("gpt2_lora");
}

TEMPLATE_TEST_CASE("golden: gpt2_lmhead (modules_to_save lm_head) matches PyTorch + PEFT", "[parity]", double, float) {
  run_parity<TestType>("gpt2_lmhead");
}

TEMPLATE_TEST_CASE("golden: qwen2_lora (tied, max_lengths, top-level rope_theta) matches PyTorch + PEFT", "[parity]",
                   double, float) {
  run_parity<TestType>("qwen2_lora");
}

TEMPLATE_TEST_CASE("golden: qwen2_rslora (untied, rsLoRA, position_ids, rope_parameters) matches PyTorch + PEFT",
                   "[parity]", double, float) {
  run_parity<TestType>("qwen2_rslora");
}

// Adapter settings as peft saves them (docs/checkpoints.md, "Adapter settings").
TEMPLATE_TEST_CASE(
    "golden: gpt2_peft_all_linear (all-linear paths, exclude, rank/alpha patterns, bias lora_only, saved wte and "
    "ln_f) matches PyTorch + PEFT",
    "[parity]", double, float) {
  run_parity<TestType>("gpt2_peft_all_linear");
}

TEMPLATE_TEST_CASE(
    "golden: qwen2_peft_regex (regex targets and exclude, bias all, saved embed_tokens and norms, tied) matches "
    "PyTorch + PEFT",
    "[parity]", double, float) {
  run_parity<TestType>("qwen2_peft_regex");
}

TEMPLATE_TEST_CASE(
    "golden: qwen2_peft_layers (layers_to_transform, layers_pattern, rank/alpha patterns) matches PyTorch + PEFT",
    "[parity]", double, float) {
  run_parity<TestType>("qwen2_peft_layers");
}

TEMPLATE_TEST_CASE("golden: gpt2_variant (n_inner, exact gelu, scale_attn_by_inverse_layer_idx) matches PyTorch + PEFT",
                   "[parity]", double, float) {
  run_parity<TestType>("gpt2_variant");
}

TEMPLATE_TEST_CASE(
    "golden: llama_lora (Llama 3.x shapes, llama3 rope in rope_scaling, attention and MLP biases) "
    "matches PyTorch + PEFT",
    "[parity]", double, float) {
  run_parity<TestType>("llama_lora");
}

TEMPLATE_TEST_CASE("golden: qwen3_lora (q_norm / k_norm, head_dim 16, yarn rope, tied, rsLoRA) matches PyTorch + PEFT",
                   "[parity]", double, float) {
  run_parity<TestType>("qwen3_lora");
}

TEMPLATE_TEST_CASE("golden: mistral_lora (sliding_window within the sequences, dynamic rope) matches PyTorch + PEFT",
                   "[parity]", double, float) {
  run_parity<TestType>("mistral_lora");
}

TEST_CASE("golden: the new families load with their settings", "[parity]") {
  auto l = ep::hf::load_decoder<double>((kGoldenDir / "llama_lora").string());
  CHECK(std::string(l.model_type()) == "llama");
  CHECK(l.config().rope_scaling.type == ep::RopeParameters::Type::llama3);
  CHECK(l.config().rope_theta == 500000.0);
  CHECK(l.config().o_bias());
  CHECK(l.config().mlp_has_bias());
  auto q = ep::hf::load_decoder<double>((kGoldenDir / "qwen3_lora").string());
  CHECK(q.config().head_dim() == 16);
  CHECK(q.config().rope_scaling.type == ep::RopeParameters::Type::yarn);
  CHECK(q.layers()[0].q_norm.has_value());
  auto m = ep::hf::load_decoder<double>((kGoldenDir / "mistral_lora").string());
  CHECK(m.config().sliding_window == 16);
  CHECK(m.config().sliding_layers.size() == 2);
  CHECK(m.config().rope_scaling.type == ep::RopeParameters::Type::dynamic);
  CHECK_THROWS_AS(ep::hf::load_qwen2<double>((kGoldenDir / "llama_lora").string()), ep::InputError);
  auto g = ep::hf::load_gpt2<double>((kGoldenDir / "gpt2_variant").string());
  CHECK(g.config().n_inner == 40);
  CHECK(g.config().activation == ep::nn::Activation::gelu_erf);
  CHECK(g.config().scale_attn_by_inverse_layer_idx);
  CHECK(g.config().layer_norm_epsilon == 1e-4);
}

TEST_CASE("golden: the typed loaders agree with load_model", "[parity]") {
  auto g = ep::hf::load_gpt2<double>((kGoldenDir / "gpt2_lora").string());
  auto q = ep::hf::load_qwen2<double>((kGoldenDir / "qwen2_rslora").string());
  CHECK(ep::Registry<double>::build(g).lora_count() == 16);
  CHECK(ep::Registry<double>::build(q).lora_count() == 28);
  CHECK(q.config().tie_word_embeddings == false);
  // rope_theta 25000 (no library default) in both config layouts: transformers >= 5 writes
  // {"rope_parameters": {"rope_theta": ...}} (qwen2_rslora), earlier versions a top-level
  // "rope_theta" (qwen2_lora).
  CHECK(q.config().rope_theta == 25000.0);
  CHECK(ep::hf::load_qwen2<double>((kGoldenDir / "qwen2_lora").string()).config().rope_theta == 25000.0);
  CHECK_THROWS_AS(ep::hf::load_gpt2<double>((kGoldenDir / "qwen2_lora").string()), ep::InputError);
}
