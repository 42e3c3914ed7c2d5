// `entropy-probe run` (examples/cli/run_command.hpp) and `entropy-probe sample`
// (examples/cli/sample_command.hpp), called in-process on
// checkpoint directories and batch files written here from C++: exit codes
// 0 (success), 2 (usage error, with a pointer to --help), 3 (bad input file,
// naming the file and key), the JSON keys of docs/checkpoints.md, the
// numbers against the library called directly, and `--device` (this test
// program is built without CUDA: `--device cuda` is a usage error here; the
// device path of run_typed runs on the emulated device backend).
#include "../../examples/cli/run_command.hpp"
#include "../../examples/cli/sample_command.hpp"
#include "../cuda/emulated_backend.hpp"
#include "../support/files.hpp"
#include "../support/tiny_models.hpp"

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

using namespace entropy_probe;
using namespace ep_test;
using Catch::Contains;
using nlohmann::json;

namespace {

// Runs `run_command` with stdout and stderr captured.
struct Outcome {
  int rc = -1;
  std::string out, err;
};

class Capture {
 public:
  Capture(int fd, const std::string& path) : fd_(fd), path_(path) {
    std::fflush(nullptr);
    saved_ = ::dup(fd);
    const int f = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    ::dup2(f, fd);
    ::close(f);
  }
  std::string finish() {
    std::fflush(nullptr);
    ::dup2(saved_, fd_);
    ::close(saved_);
    saved_ = -1;
    std::ifstream in(path_);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
  }
  ~Capture() {
    if (saved_ >= 0) finish();
  }

 private:
  int fd_, saved_ = -1;
  std::string path_;
};

// The exit status of command(), its stdout and stderr.
template <class F>
Outcome captured(F&& command) {
  TempDir tmp;
  Outcome o;
  Capture out(1, tmp.file("stdout")), err(2, tmp.file("stderr"));
  o.rc = command();
  o.err = err.finish();
  o.out = out.finish();
  set_log_sink({});
  return o;
}

Outcome run(const std::vector<std::string>& args) {
  std::vector<std::string> copy = args;
  std::vector<char*> argv;
  for (auto& a : copy) argv.push_back(a.data());
  argv.push_back(nullptr);
  return captured([&] { return run_command(static_cast<int>(args.size()), argv.data()); });
}

Outcome sample(const std::vector<std::string>& args) {
  return captured([&] { return ep_sample::sample_command(args); });
}

// A GPT-2 LoRA checkpoint with Adam state and two batches.
struct Gpt2Setup {
  TempDir dir;
  std::string ckpt, E, U;
  AdamHyper hyper;
  Gpt2Setup(bool with_optimizer = true) {
    ckpt = dir.file("ckpt");
    E = dir.file("E.safetensors");
    U = dir.file("U.safetensors");
    auto model = tiny_gpt2<double>(31);
    hf::save_pretrained(model, ckpt, safetensors::Dtype::F64);
    if (with_optimizer) {
      const auto reg = Registry<double>::build(model);
      auto state = random_adam_state(reg, 32);
      state.hyper().lr = 2e-3;
      hyper = state.hyper();
      hf::save_adam_state(state, ckpt + "/optimizer.safetensors");
    }
    hf::save_batch(random_batch(4, 3, 8, 11, 33), E);
    hf::save_batch(random_batch(3, 2, 8, 11, 34), U);
  }
};

}  // namespace

TEST_CASE("cli run: a GPT-2 LoRA checkpoint, every phase, JSON with the documented keys", "[cli]") {
  Gpt2Setup s;
  const std::string out = s.dir.file("result.json");
  const Outcome o = run({s.ckpt, "--e-batch", s.E, "--u-batch", s.U, "--json", out, "--ground-truth", "adam",
                         "--mb-size", "2", "--log-level", "warning", "--dtype", "f64"});
  INFO(o.err);
  REQUIRE(o.rc == 0);
  CHECK_THAT(o.out, Contains("deltaH1") && Contains("bars_dot") && Contains("B_E = 4, B_U = 3") &&
                        Contains("ground truth") && Contains("timing"));
  const json j = read_json(out);
  for (const char* k : {"bars_dot",   "deltaH1",   "learning_rate",   "B_E",   "B_U",
                        "mu_X_norm",  "mu_Y_norm", "SE_conditional",  "V_X",   "V_Y",
                        "SE_deltaH1", "s_values",  "H_orig",          "H_upd", "deltaH_true",
                        "H_orig_tok", "H_upd_tok", "deltaH_true_tok", "ESS",   "preconditioner_missing",
                        "registry",   "timing",    "config"})
    CHECK(j.contains(k));
  CHECK(j["B_E"] == 4);
  CHECK(j["B_U"] == 3);
  CHECK(j["s_values"].size() == 4);
  CHECK(j["learning_rate"] == 2e-3);
  CHECK(j["preconditioner_missing"] == 0);
  CHECK(j["registry"]["trainable_tensors"] == 16);
  CHECK(j["registry"]["lora_tensors"] == 16);
  CHECK(j["registry"]["names"][0] == "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight");
  for (const char* k : {"load", "sum_X", "sum_Y", "conditional_variance", "full_variance", "ground_truth", "total"})
    CHECK(j["timing"].contains(k));
  CHECK(j["config"]["learning_rate_source"] == "optimizer");
  CHECK(j["config"]["dtype"] == "f64");
  CHECK(j["config"]["model_type"] == "gpt2");
  CHECK(j["config"]["ground_truth"] == "adam");
  CHECK(j["config"]["mb_size"] == 2);
  CHECK(j["config"]["weighting"] == "dr_grpo");

  // The same numbers as the library called directly on the same files.
  auto model = hf::load_gpt2<double>(s.ckpt);
  ProbeConfig pc;
  pc.mb_size = 2;
  pc.ground_truth = StepKind::adam;
  OfflineEntropyProbe probe(model, pc);
  const auto state = hf::load_adam_state(s.ckpt + "/optimizer.safetensors", probe.registry());
  const ProbeResult r = probe.run(hf::load_batch(s.E), hf::load_batch(s.U), state);
  CHECK(j["deltaH1"].get<double>() == Approx(r.deltaH1).epsilon(1e-12));
  CHECK(j["SE_deltaH1"].get<double>() == Approx(r.full->se_deltaH1).epsilon(1e-12));
  CHECK(j["deltaH_true_tok"].get<double>() == Approx(r.truth->deltaH_true_tok).epsilon(1e-9));
  CHECK(r.deltaH1 != 0);

  // In float, the default: the same prediction to float accuracy.
  const std::string out32 = s.dir.file("result32.json");
  const Outcome o32 = run({s.ckpt, "--e-batch=" + s.E, "--u-batch=" + s.U, "--json=" + out32, "--log-level=warning"});
  REQUIRE(o32.rc == 0);
  const json j32 = read_json(out32);
  CHECK(j32["config"]["dtype"] == "f32");
  CHECK(j32["deltaH1"].get<double>() == Approx(r.deltaH1).epsilon(1e-3));
  CHECK_FALSE(j32.contains("deltaH_true"));
}

TEST_CASE("cli run: --direction both and --influence-csv report both directions and every U sequence", "[cli]") {
  Gpt2Setup s;
  const std::string out = s.dir.file("result.json"), csv = s.dir.file("influence.csv");
  const Outcome o =
      run({s.ckpt, "--e-batch", s.E, "--u-batch", s.U, "--json", out, "--direction", "both", "--influence-csv", csv,
           "--variance", "none", "--ground-truth", "adamw", "--dtype", "f64", "--log-level", "warning"});
  INFO(o.err);
  REQUIRE(o.rc == 0);
  CHECK_THAT(o.out,
             Contains("adamw") && Contains("most negative") && Contains("most positive") && Contains("momentum"));
  // Each sequence is listed at most once: the negative and the positive lists do not overlap.
  std::size_t listed = 0;
  for (auto at = o.out.find(" completion "); at != std::string::npos; at = o.out.find(" completion ", at + 1)) ++listed;
  CHECK(listed >= 1);
  CHECK(listed <= 6);
  const json j = read_json(out);
  REQUIRE(j.contains("directions"));
  CHECK(j["deltaH1"] == j["directions"]["precond_sgd"]["deltaH1"]);  // the first direction's
  const json& a = j["directions"]["adamw"];
  CHECK(j["config"]["ground_truth"] == "adam");         // adamw is the adam step
  CHECK(a["deltaH_true_tok"] == j["deltaH_true_tok"]);  // the truth sits beside the prediction it measures
  CHECK(a["ESS"] == j["ESS"]);
  CHECK_FALSE(j["directions"]["precond_sgd"].contains("deltaH_true_tok"));
  CHECK(j["influence_direction"] == "adamw");
  REQUIRE(j["influence"].size() == 6);  // U: B = 3, G = 2
  double total = a["momentum_share"].get<double>() + a["decay_share"].get<double>();
  for (const auto& e : j["influence"]) total += e["influence"].get<double>();
  CHECK(total == Approx(a["deltaH1"].get<double>()).epsilon(1e-12));
  CHECK(j["influence"][3]["prompt"] == 1);
  CHECK(j["influence"][3]["completion"] == 1);
  CHECK(j["zero_second_moment"]["all"] == 0);

  std::ifstream in(csv);
  std::string line;
  std::vector<std::string> lines;
  while (std::getline(in, line)) lines.push_back(line);
  REQUIRE(lines.size() == 7);
  CHECK(lines[0] == "prompt,completion,advantage,reward,length,influence");
  CHECK(lines[4].rfind("1,1,", 0) == 0);
  const double last = std::stod(lines[4].substr(lines[4].rfind(',') + 1));
  CHECK(last == j["influence"][3]["influence"].get<double>());
}

TEST_CASE("cli run: --control-variates prints and writes the estimate beside the plain one", "[cli]") {
  Gpt2Setup s;
  const std::string out = s.dir.file("cv.json");
  const std::vector<std::string> args{s.ckpt, "--e-batch", s.E,   "--u-batch",   s.U,       "--json",
                                      out,    "--dtype",   "f64", "--log-level", "warning", "--control-variates"};
  {
    // The setup's E batch has 4 prompts of G = 3: 5 features need 7.
    const Outcome o = run(args);
    INFO(o.err);
    REQUIRE(o.rc == 0);
    CHECK_THAT(o.err, Contains("B_E = 4 prompts for 5 features"));
    CHECK_THAT(o.out, Contains("control variates: not computed"));
    const json j = read_json(out);
    CHECK_FALSE(j.contains("control_variates"));
    CHECK(j["config"]["control_variates"] == true);
  }
  hf::save_batch(random_batch(9, 3, 8, 11, 35), s.E);
  const Outcome o = run(args);
  INFO(o.err);
  REQUIRE(o.rc == 0);
  CHECK_THAT(o.out, Contains("control variates (5 features, cross-fitted)"));
  const json j = read_json(out);
  REQUIRE(j.contains("control_variates"));
  const json& cv = j["control_variates"];
  CHECK(cv["features"].size() == 5);
  CHECK(cv["beta"].size() == 5);
  CHECK(cv["deltaH1_plain"].get<double>() == Approx(j["deltaH1"].get<double>()).epsilon(1e-12));
  const double se_plain = j["learning_rate"].get<double>() * std::sqrt(j["V_X"].get<double>());
  CHECK(cv["SE_plain"].get<double>() == Approx(se_plain).epsilon(1e-10));
  CHECK(cv["SE"].get<double>() > 0);
  CHECK(j["timing"].contains("control_variates"));
}

TEST_CASE("cli run: --influence-matrix-csv and --influence-truth write the matrix and the chosen truths", "[cli]") {
  Gpt2Setup s;
  const std::string out = s.dir.file("result.json"), csv = s.dir.file("matrix.csv");
  const Outcome o = run({s.ckpt,    "--e-batch",
                         s.E,       "--u-batch",
                         s.U,       "--json",
                         out,       "--direction",
                         "adamw",   "--influence-matrix-csv",
                         csv,       "--influence-truth",
                         "1",       "--influence-truth-seq",
                         "2:0,0:1", "--variance",
                         "none",    "--dtype",
                         "f64",     "--log-level",
                         "warning"});
  INFO(o.err);
  REQUIRE(o.rc == 0);
  CHECK_THAT(o.out, Contains("influence matrix: ") && Contains("true change along single sequences"));
  const json j = read_json(out);
  const json& m = j["influence_matrix"];
  REQUIRE(m["columns"].size() == 6);  // U: B = 3, G = 2
  REQUIRE(m["values"].size() == m["rows"].size());
  // Column sums are the influences.
  for (std::size_t c = 0; c < 6; ++c) {
    double column = 0;
    for (const auto& row : m["values"]) column += row[c].get<double>();
    CHECK(column == Approx(j["influence"][c]["influence"].get<double>()).epsilon(1e-12));
  }
  CHECK(j["influence"][4].contains("truth"));  // 2:0
  CHECK(j["influence"][1].contains("truth"));  // 0:1
  std::size_t with_truth = 0;
  for (const auto& e : j["influence"]) with_truth += e.contains("truth");
  CHECK(with_truth >= 2);
  CHECK(with_truth <= 3);
  std::ifstream in(csv);
  std::string header;
  std::getline(in, header);
  CHECK(header == "prompt,completion,u0:g0,u0:g1,u1:g0,u1:g1,u2:g0,u2:g1,momentum,decay");

  const Outcome bad = run({s.ckpt, "--e-batch", s.E, "--u-batch", s.U, "--influence-truth-seq", "3:0", "--variance",
                           "none", "--log-level", "warning"});
  CHECK(bad.rc == 1);
  CHECK_THAT(bad.err, Contains("(--influence-truth-seq) 3:0 is outside the U batch of 3 prompts x 2 completions"));
}

TEST_CASE("cli run: --lr-sweep on a log grid gives a table and one JSON point per direction and eta", "[cli]") {
  Gpt2Setup s;
  const std::string out = s.dir.file("sweep.json");
  const Outcome o = run({s.ckpt, "--e-batch", s.E, "--u-batch", s.U, "--json", out, "--direction", "both", "--variance",
                         "none", "--lr-sweep", "1e-4:1e-2:3", "--dtype", "f64", "--log-level", "warning"});
  INFO(o.err);
  REQUIRE(o.rc == 0);
  CHECK_THAT(o.out, Contains("learning-rate sweep") && Contains("RB truth_tok"));
  const json j = read_json(out);
  REQUIRE(j["lr_sweep"].size() == 6);
  const double etas[] = {1e-4, 1e-3, 1e-2};
  for (std::size_t k = 0; k < 6; ++k) {
    const json& p = j["lr_sweep"][k];
    CHECK(p["direction"] == (k < 3 ? "precond_sgd" : "adamw"));
    CHECK(p["learning_rate"].get<double>() == Approx(etas[k % 3]).epsilon(1e-14));
    // deltaH1 = eta * bars_dot of its direction.
    const double bars_dot = j["directions"][p["direction"].get<std::string>()]["bars_dot"].get<double>();
    CHECK(p["deltaH1"].get<double>() == Approx(etas[k % 3] * bars_dot).epsilon(1e-13));
    CHECK(p.contains("rao_blackwell"));
  }
  CHECK_FALSE(j.contains("deltaH_true"));  // no --ground-truth: only the sweep's
}

TEST_CASE("cli run: a Qwen2 checkpoint without optimizer state takes --lr", "[cli]") {
  TempDir dir;
  nn::Qwen2Config c;
  c.vocab_size = 13;
  c.hidden_size = 8;
  c.intermediate_size = 12;
  c.num_hidden_layers = 1;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 1;
  c.tie_word_embeddings = false;
  nn::LoraConfig l;
  l.r = 2;
  l.lora_alpha = 4;
  l.target_modules = {"q_proj", "v_proj"};
  l.init_lora_b_zero = false;
  nn::Qwen2ForCausalLM<float> model(c, l, 41);
  const std::string ckpt = dir.file("qwen"), E = dir.file("E.safetensors"), U = dir.file("U.safetensors");
  hf::save_pretrained(model, ckpt, safetensors::Dtype::BF16);
  hf::save_batch(random_batch(3, 2, 6, 13, 42), E);
  hf::save_batch(random_batch(2, 2, 6, 13, 43), U);
  const std::string out = dir.file("r.json");

  const Outcome missing_lr = run({ckpt, "--e-batch", E, "--u-batch", U});
  CHECK(missing_lr.rc == 2);
  CHECK_THAT(missing_lr.err, Contains("--lr") && Contains("optimizer.safetensors") && Contains("--help"));

  const Outcome o = run({ckpt, "--e-batch", E, "--u-batch", U, "--lr", "0.01", "--variance", "none", "--json", out,
                         "--weighting", "per_token_avg", "--temperature", "0.7"});
  INFO(o.err);
  REQUIRE(o.rc == 0);
  CHECK_THAT(o.err, Contains("optimizer.safetensors: not found"));
  const json j = read_json(out);
  CHECK(j["learning_rate"] == 0.01);
  CHECK(j["config"]["learning_rate_source"] == "config");
  CHECK(j["config"]["model_type"] == "qwen2");
  CHECK(j["config"]["weighting"] == "per_token_avg");
  CHECK(j["config"]["temperature"].get<double>() == Approx(0.7));
  CHECK(j["registry"]["trainable_tensors"] == 4);  // only the adapters: non-targeted linears stay frozen
  CHECK(j["preconditioner_missing"] == 4);
  for (const char* k : {"SE_conditional", "s_values", "V_X", "SE_deltaH1", "H_orig", "ESS"}) CHECK_FALSE(j.contains(k));
  CHECK_FALSE(j["timing"].contains("conditional_variance"));
  CHECK(j["timing"].contains("load"));
  CHECK(std::isfinite(j["deltaH1"].get<double>()));

  const Outcome cond = run({ckpt,
                            "--e-batch",
                            E,
                            "--u-batch",
                            U,
                            "--lr",
                            "0.01",
                            "--variance",
                            "conditional",
                            "--alpha-route",
                            "reverse",
                            "--ground-truth",
                            "precond_sgd",
                            "--is",
                            "clip",
                            "--clip-c",
                            "3",
                            "--json",
                            out,
                            "--log-level",
                            "warning"});
  REQUIRE(cond.rc == 0);
  const json k = read_json(out);
  CHECK(k.contains("SE_conditional"));
  CHECK_FALSE(k.contains("SE_deltaH1"));
  CHECK(k.contains("deltaH_true_tok"));
  CHECK(k["config"]["alpha_route"] == "reverse");
  CHECK(k["config"]["is"] == "clip");
  CHECK(k["config"]["clip_c"] == 3.0);
}

TEST_CASE("cli run: usage errors exit 2 with a pointer to --help", "[cli][errors]") {
  Gpt2Setup s;
  const std::vector<std::string> ok{s.ckpt, "--e-batch", s.E, "--u-batch", s.U};
  auto with = [&](std::vector<std::string> extra) {
    std::vector<std::string> a = ok;
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  };
  struct Case {
    std::vector<std::string> args;
    std::string message;
  };
  const std::vector<Case> cases{
      {{}, "missing CHECKPOINT_DIR"},
      {{s.ckpt, "--e-batch", s.E}, "missing required option --u-batch"},
      {{s.ckpt, "--u-batch", s.U}, "missing required option --e-batch"},
      {with({"--frobnicate", "1"}), "unknown option '--frobnicate'"},
      {with({"--weighting", "mean"}), "--weighting must be one of dr_grpo, per_token_avg, got 'mean'"},
      {with({"--variance", "partial"}), "--variance must be one of"},
      {with({"--ground-truth", "sgd"}), "--ground-truth must be one of"},
      {with({"--dtype", "bf16"}), "--dtype must be one of f32, f64"},
      {with({"--alpha-route", "double"}), "--alpha-route"},
      {with({"--log-level", "loud"}), "--log-level"},
      {with({"--is", "wis"}), "--is must be one of"},
      {with({"--lr", "abc"}), "--lr expects a number, got 'abc'"},
      {with({"--lr", "-1e-3"}), "--lr must be positive"},
      {with({"--lr", "0"}), "--lr must be positive"},
      {with({"--clip-c", "0"}), "--clip-c must be positive"},
      {with({"--temperature", "nan"}), "--temperature expects a number"},
      {with({"--mb-size", "-3"}), "--mb-size expects a non-negative integer, got '-3'"},
      {with({"--mb-size", "2x"}), "--mb-size"},
      {with({"--max-memory", "0"}), "--max-memory expects a size in bytes such as 8589934592, 512M or 1.5GiB, got '0'"},
      {with({"--max-memory", "-1G"}), "--max-memory expects a size in bytes"},
      {with({"--max-memory", "12X"}), "got '12X'"},
      {with({"--max-memory", "4 G"}), "got '4 G'"},
      {with({"--max-memory", "GiB"}), "got 'GiB'"},
      {with({"--max-memory", "inf"}), "got 'inf'"},
      {with({"--max-memory", "1e30"}), "got '1e30'"},
      {with({"--max-memory", ""}), "got ''"},
      {with({"--max-memory", "1G", "--mb-size", "2"}), "--max-memory sizes --mb-size auto; it has no effect"},
      {with({"extra"}), "unexpected argument 'extra'"},
      {with({"--json", s.dir.file("no/such/dir/r.json")}), "does not exist"},
      {with({"--direction", "sgd"}), "--direction must be one of precond_sgd, adamw, both, got 'sgd'"},
      {with({"--influence-csv", s.dir.file("no/such/dir/i.csv")}), "--influence-csv"},
      {with({"--influence=1"}), "option '--influence' takes no value"},
      {with({"--influence-matrix-csv", s.dir.file("no/such/dir/m.csv")}), "--influence-matrix-csv"},
      {with({"--influence-truth", "0"}), "--influence-truth expects a count of at least 1, got '0'"},
      {with({"--influence-truth", "-2"}), "--influence-truth expects a non-negative integer, got '-2'"},
      {with({"--influence-truth-seq", "1:0,2"}),
       "--influence-truth-seq expects U:G,U:G,... (prompt:completion, non-negative integers), got '2' in '1:0,2'"},
      {with({"--influence-truth-seq", "1:x"}), "got '1:x' in '1:x'"},
      {with({"--lr-sweep", "1e-3,0"}),
       "--lr-sweep expects a list X,Y,... or a grid START:STOP:N of positive numbers "
       "('0' is not a positive number), got '1e-3,0'"},
      {with({"--lr-sweep", "1e-3:1e-2"}), "a grid is START:STOP:N with a whole N >= 2"},
      {with({"--lr-sweep", "1e-3:1e-2:2.5"}), "a grid is START:STOP:N with a whole N >= 2"},
      {with({"--lr-sweep", "1e-3,,2"}), "'' is not a positive number"},
      {with({"--lr", "1", "--lr", "2"}), "'--lr' given twice"},
      {with({"--lr"}), "option '--lr' needs a value"},
      {with({"--device", "gpu"}), "--device must be one of cpu, cuda, got 'gpu'"},
      {with({"--device"}), "option '--device' needs a value (DEV)"},
      {with({"--device", "cpu", "--device", "cpu"}), "option '--device' given twice"},
      {{s.ckpt, "--e-batch", "", "--u-batch", s.U}, "--e-batch needs a file name"},
  };
  for (const Case& c : cases) {
    INFO(fmt::format("args: {}", fmt::join(c.args, " ")));
    const Outcome o = run(c.args);
    CHECK(o.rc == 2);
    CHECK_THAT(o.err, Contains(c.message) && Contains("entropy-probe run --help"));
  }
  const Outcome help = run({"--help"});
  CHECK(help.rc == 0);
  CHECK_THAT(help.out, Contains("usage: entropy-probe run CHECKPOINT_DIR") && Contains("--ground-truth") &&
                           Contains("--device DEV") && Contains("Exit status"));
  CHECK(run(with({"-h"})).rc == 0);
}

TEST_CASE("cli run: bad input files exit 3 naming the file and key", "[cli][errors]") {
  Gpt2Setup s;
  auto args = [&](const std::string& ckpt, const std::string& E, const std::string& U) {
    return std::vector<std::string>{ckpt, "--e-batch", E, "--u-batch", U, "--log-level", "warning"};
  };
  SECTION("no checkpoint directory") {
    const Outcome o = run(args(s.dir.file("nowhere"), s.E, s.U));
    CHECK(o.rc == 3);
    CHECK_THAT(o.err, Contains("nowhere"));
  }
  SECTION("a batch file that is not safetensors, or missing") {
    std::ofstream(s.E) << "not a batch";
    const Outcome o = run(args(s.ckpt, s.E, s.U));
    CHECK(o.rc == 3);
    CHECK_THAT(o.err, Contains(s.E) && Contains("header length"));
    const Outcome m = run(args(s.ckpt, s.dir.file("absent.safetensors"), s.U));
    CHECK(m.rc == 3);
    CHECK_THAT(m.err, Contains("absent.safetensors") && Contains("cannot open"));
  }
  SECTION("a token id beyond the vocabulary") {
    TokenBatch b = random_batch(2, 2, 8, 11, 35);
    b.sequences[5] = 11;
    b.attention_mask[5] = 1;
    hf::save_batch(b, s.U);
    const Outcome o = run(args(s.ckpt, s.E, s.U));
    CHECK(o.rc == 3);
    CHECK_THAT(o.err, Contains(s.U) && Contains("sequences[0,0,5] = 11") && Contains("vocabulary size 11"));
  }
  SECTION("batch tensors whose shapes disagree") {
    std::map<std::string, safetensors::OutTensor> t;
    const std::vector<std::int64_t> seq(2 * 2 * 8, 1), mask(2 * 2 * 7, 1), pl{2, 2};
    const std::vector<double> adv(4, 0.5);
    t.emplace("sequences", safetensors::make_out<std::int64_t>({2, 2, 8}, std::span<const std::int64_t>(seq)));
    t.emplace("attention_mask", safetensors::make_out<std::int64_t>({2, 2, 7}, std::span<const std::int64_t>(mask)));
    t.emplace("prompt_lens", safetensors::make_out<std::int64_t>({2}, std::span<const std::int64_t>(pl)));
    t.emplace("advantages", safetensors::make_out<double>({2, 2}, std::span<const double>(adv)));
    safetensors::write_file(s.E, t);
    const Outcome o = run(args(s.ckpt, s.E, s.U));
    CHECK(o.rc == 3);
    CHECK_THAT(o.err, Contains(s.E) && Contains("'attention_mask' has shape [2, 2, 7]"));
  }
  SECTION("bad optimizer metadata") {
    const std::string opt = s.ckpt + "/optimizer.safetensors";
    const safetensors::File f = safetensors::File::open(opt);
    std::map<std::string, safetensors::OutTensor> t;
    for (const auto& v : f.tensors())
      t.emplace(v.name,
                safetensors::OutTensor{v.dtype, v.shape, std::vector<std::byte>(v.bytes.begin(), v.bytes.end())});
    auto meta = f.metadata();
    meta["eps"] = "tiny";
    safetensors::write_file(opt + ".tmp", t, meta);
    std::filesystem::rename(opt + ".tmp", opt);
    const Outcome o = run(args(s.ckpt, s.E, s.U));
    CHECK(o.rc == 3);
    CHECK_THAT(o.err, Contains(opt) && Contains("'eps' = 'tiny'"));
  }
  SECTION("an unknown model_type and a broken weight file") {
    const std::string cfg = s.ckpt + "/config.json";
    json j = read_json(cfg);
    j["model_type"] = "falcon";
    std::ofstream(cfg) << j.dump();
    const Outcome o = run(args(s.ckpt, s.E, s.U));
    CHECK(o.rc == 3);
    CHECK_THAT(o.err, Contains(cfg) && Contains("model_type 'falcon'"));
    j["model_type"] = "gpt2";
    std::ofstream(cfg) << j.dump();
    std::filesystem::resize_file(s.ckpt + "/model.safetensors", 100);
    const Outcome w = run(args(s.ckpt, s.E, s.U));
    CHECK(w.rc == 3);
    CHECK_THAT(w.err, Contains("model.safetensors"));
  }
}

TEST_CASE("cli run: --device cpu is the default and --device cuda needs a build with CUDA", "[cli][device]") {
  Gpt2Setup s;
  const std::string out = s.dir.file("cpu.json");
  const Outcome cpu = run({s.ckpt, "--e-batch", s.E, "--u-batch", s.U, "--device", "cpu", "--variance", "none",
                           "--json", out, "--log-level", "warning"});
  INFO(cpu.err);
  REQUIRE(cpu.rc == 0);
  CHECK_THAT(cpu.out, Contains("(f32)"));  // the device is printed only when it is not the default
  CHECK(read_json(out)["config"]["device"] == "cpu");

  STATIC_REQUIRE_FALSE(ep_run::kHaveCuda);  // test_cli is a plain C++ program
  const Outcome cuda = run({s.ckpt, "--e-batch", s.E, "--u-batch", s.U, "--device", "cuda"});
  CHECK(cuda.rc == 2);
  CHECK_THAT(cuda.err, Contains("--device cuda: this build of entropy-probe has no CUDA support") &&
                           Contains("-DENTROPY_PROBE_CUDA=ON") && Contains("entropy-probe run --help"));
  CHECK(cuda.out.empty());
}

TEST_CASE("cli run: --mb-size auto is the default and --max-memory takes a byte count", "[cli][memory]") {
  const std::vector<std::string> ok{"ckpt", "--e-batch", "E", "--u-batch", "U"};
  auto parse = [&](std::vector<std::string> extra) {
    std::vector<std::string> a = ok;
    a.insert(a.end(), extra.begin(), extra.end());
    return ep_run::parse_run_args(a);
  };
  CHECK_FALSE(parse({}).probe.mb_size);
  CHECK_FALSE(parse({}).probe.memory_budget);
  CHECK_FALSE(parse({"--mb-size", "auto"}).probe.mb_size);
  CHECK(parse({"--mb-size", "0"}).probe.mb_size == 0);
  CHECK(parse({"--mb-size", "3"}).probe.mb_size == 3);
  const std::uint64_t K = 1024;
  CHECK(parse({"--max-memory", "8589934592"}).probe.memory_budget == 8589934592u);
  CHECK(parse({"--max-memory", "2K"}).probe.memory_budget == 2 * K);
  CHECK(parse({"--max-memory", "512M"}).probe.memory_budget == 512 * K * K);
  CHECK(parse({"--max-memory=512MiB"}).probe.memory_budget == 512 * K * K);
  CHECK(parse({"--max-memory", "1.5GiB"}).probe.memory_budget == 3 * K * K * K / 2);
  CHECK(parse({"--max-memory", "6G", "--mb-size", "auto"}).probe.memory_budget == 6 * K * K * K);
  CHECK(parse({"--max-memory", "1T"}).probe.memory_budget == K * K * K * K);
}

TEST_CASE("cli run: a --max-memory below what the model holds is a clear error, exit 1", "[cli][memory]") {
  Gpt2Setup s;
  const Outcome tight =
      run({s.ckpt, "--e-batch", s.E, "--u-batch", s.U, "--max-memory", "1K", "--log-level", "warning"});
  CHECK(tight.rc == 1);
  CHECK_THAT(tight.err, Contains("sum_X: the") && Contains("exceed the memory budget of 1.00 KiB before any prompt") &&
                            Contains("--max-memory"));
  // With a budget that fits: the sizes each phase chose are in the JSON.
  const std::string out = s.dir.file("auto.json");
  const Outcome o =
      run({s.ckpt, "--e-batch", s.E, "--u-batch", s.U, "--max-memory", "4G", "--json", out, "--log-level", "warning"});
  INFO(o.err);
  REQUIRE(o.rc == 0);
  const json j = read_json(out);
  CHECK(j["config"]["mb_size"] == "auto");
  CHECK(j["config"]["memory_budget"] == 4 * (std::uint64_t(1) << 30));
  CHECK(j["microbatch"]["sum_X"] == 3);  // 4 E prompts: one measured, then the other 3 at once
  CHECK(j["microbatch"]["sum_Y"] == 2);
}

namespace {

// run_typed<T, B> on parsed arguments, stdout and stderr captured.
template <class T, class B>
Outcome run_typed_on(const std::vector<std::string>& args) {
  TempDir tmp;
  const ep_run::RunOptions o = ep_run::parse_run_args(args);
  log_to_stderr(LogLevel::warning);
  Outcome r;
  Capture out(1, tmp.file("stdout")), err(2, tmp.file("stderr"));
  SingleProcess single;
  r.rc = ep_run::guarded([&] { return ep_run::detail::run_typed<T, B>(o, single); }, "entropy-probe run");
  r.err = err.finish();
  r.out = out.finish();
  set_log_sink({});
  return r;
}

}  // namespace

// The device path without a GPU: EmulatedDeviceBackend has no host element
// access (as CudaBackend), so this builds only if loading, the probe and the
// report touch the model's tensors through the backend alone; and the
// scalars it reports must be the CPU backend's up to summation order.
TEST_CASE("cli run: run_typed on a device-style backend reports the CPU backend's numbers", "[cli][device]") {
  Gpt2Setup s;
  const std::string on_cpu = s.dir.file("cpu.json"), on_device = s.dir.file("device.json");
  auto args = [&](const std::string& json_out) {
    return std::vector<std::string>{s.ckpt,   "--e-batch", s.E, "--u-batch",      s.U,   "--dtype", "f64", "--json",
                                    json_out, "--mb-size", "2", "--ground-truth", "adam"};
  };
  static_assert(!ep_parity::EmulatedDeviceBackend::host_memory);
  const Outcome c = run_typed_on<double, CpuBackend>(args(on_cpu));
  const Outcome d = run_typed_on<double, ep_parity::EmulatedDeviceBackend>(args(on_device));
  INFO(c.err << d.err);
  REQUIRE(c.rc == 0);
  REQUIRE(d.rc == 0);
  CHECK_THAT(d.out, Contains("deltaH1") && Contains("wrote " + on_device));
  const json jc = read_json(on_cpu), jd = read_json(on_device);
  for (const char* k : {"bars_dot", "deltaH1", "mu_X_norm", "mu_Y_norm", "SE_conditional", "V_X", "V_Y", "SE_deltaH1",
                        "H_orig_tok", "H_upd_tok", "deltaH_true_tok", "ESS"}) {
    INFO(k);
    REQUIRE(jd.contains(k));
    CHECK(jd[k].get<double>() == Approx(jc[k].get<double>()).epsilon(1e-10));
  }
  REQUIRE(jd["s_values"].size() == jc["s_values"].size());
  for (std::size_t i = 0; i < jc["s_values"].size(); ++i)
    CHECK(jd["s_values"][i].get<double>() == Approx(jc["s_values"][i].get<double>()).epsilon(1e-10).margin(1e-12));
  CHECK(jd["registry"] == jc["registry"]);
  CHECK(jd["preconditioner_missing"] == jc["preconditioner_missing"]);
}

namespace {

void write_lines(const std::string& path, const std::vector<std::string>& lines) {
  std::ofstream f(path);
  for (const auto& l : lines) f << l << "\n";
}

// A GPT-2 checkpoint and a prompts file of three prompts of unequal length.
struct SampleSetup {
  Gpt2Setup s{false};
  std::string prompts = s.dir.file("prompts.jsonl"), out = s.dir.file("sampled.safetensors");
  std::vector<std::vector<std::int32_t>> tokens{{3, 1, 4}, {9}, {2, 6}};
  SampleSetup() { write_lines(prompts, {"[3, 1, 4]", "[9]", "[2,6]"}); }
  std::vector<std::string> args(std::vector<std::string> extra = {}) const {
    std::vector<std::string> a{s.ckpt, "--prompts",    prompts, "--G",     "2",  "--max-new-tokens",
                               "4",    "--out",        out,     "--seed",  "3",  "--stop-token",
                               "5",    "--stop-token", "7",     "--dtype", "f64"};
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  }
  SamplingConfig config() const {
    SamplingConfig c;
    c.G = 2;
    c.max_new_tokens = 4;
    c.seed = 3;
    c.stop_tokens = {5, 7};
    return c;
  }
};

}  // namespace

TEST_CASE("cli sample: the batch file is the library's sampled batch, advantages zero", "[cli][sample]") {
  SampleSetup t;
  const Outcome o = sample(t.args());
  INFO(o.err);
  REQUIRE(o.rc == 0);
  CHECK_THAT(o.out, Contains("gpt2 checkpoint") && Contains("tokens/s") && Contains("advantages: zero") &&
                        Contains("wrote " + t.out));
  const TokenBatch got = hf::load_batch(t.out);
  auto model = hf::load_gpt2<double>(t.s.ckpt);
  const TokenBatch want = sample_responses(model, t.tokens, t.config());
  CHECK(got.B == 3);
  CHECK(got.G == 2);
  CHECK(got.T == 3 + 4);
  CHECK(got.sequences == want.sequences);
  CHECK(got.attention_mask == want.attention_mask);
  CHECK(got.prompt_lens == std::vector<std::int32_t>{3, 1, 2});
  CHECK(got.advantages == std::vector<double>(6, 0.0));
  CHECK_FALSE(got.rewards);
  CHECK_NOTHROW(got.validate(11, t.out));
  // Other sampling options, another batch.
  const Outcome other = sample(t.args({"--top-k", "5", "--top-p", "0.9", "--temperature", "0.7"}));
  REQUIRE(other.rc == 0);
  CHECK(hf::load_batch(t.out).sequences != want.sequences);
}

TEST_CASE("cli sample: --rewards gives GRPO advantages, and the batch runs through the probe", "[cli][sample]") {
  SampleSetup t;
  const std::string rewards = t.s.dir.file("rewards.jsonl");
  write_lines(rewards, {"[1, 0]", "[0.5, 0.25]", "[-1, 3]"});
  const Outcome o = sample(t.args({"--rewards", rewards}));
  INFO(o.err);
  REQUIRE(o.rc == 0);
  CHECK_THAT(o.out, Contains("advantages: GRPO") && Contains(rewards));
  const TokenBatch b = hf::load_batch(t.out);
  REQUIRE(b.rewards);
  CHECK(*b.rewards == std::vector<double>{1, 0, 0.5, 0.25, -1, 3});
  CHECK(b.advantages == std::vector<double>{0.5, -0.5, 0.125, -0.125, -2, 2});
  const Outcome r = run({t.s.ckpt, "--e-batch", t.out, "--u-batch", t.out, "--lr", "1e-3", "--dtype", "f64",
                         "--variance", "none", "--log-level", "warning"});
  INFO(r.err);
  CHECK(r.rc == 0);
  CHECK_THAT(r.out, Contains("deltaH1"));
}

TEST_CASE("cli sample: usage errors exit 2, bad input files exit 3 naming the file and line", "[cli][sample][errors]") {
  SampleSetup t;
  struct Case {
    std::vector<std::string> args;
    std::string message;
  };
  const std::vector<Case> usage{
      {{t.s.ckpt, "--G", "2", "--max-new-tokens", "4", "--out", t.out}, "missing required option --prompts"},
      {{t.s.ckpt, "--prompts", t.prompts, "--max-new-tokens", "4", "--out", t.out}, "missing required option --G"},
      {{t.s.ckpt, "--prompts", t.prompts, "--G", "2", "--max-new-tokens", "4"}, "missing required option --out"},
      {t.args({"--top-p", "1.5"}), "--top-p must be in (0, 1]"},
      {t.args({"--temperature", "0"}), "--temperature must be positive"},
      {t.args({"--stop-token", "x"}), "--stop-token expects a non-negative integer, got 'x'"},
      {t.args({"--seed", "4"}), "option '--seed' given twice"},
      {t.args({"--device", "cuda"}), "--device cuda: this build of entropy-probe has no CUDA support"},
      {{t.s.ckpt, "--prompts", t.prompts, "--G", "0", "--max-new-tokens", "4", "--out", t.out},
       "--G must be at least 1"},
  };
  for (const Case& c : usage) {
    CAPTURE(c.message);
    const Outcome o = sample(c.args);
    CHECK(o.rc == 2);
    CHECK_THAT(o.err, Contains(c.message) && Contains("see 'entropy-probe sample --help'"));
  }
  const std::string rewards = t.s.dir.file("rewards.jsonl");
  const std::vector<std::pair<std::vector<std::string>, std::string>> bad_prompts{
      {{"[1, 2]", "[3, oops]"}, "line 2: not JSON"},
      {{"[1, 2]", ""}, "line 2: not JSON"},
      {{"[1, 2]", "[]"}, "line 2: expected a non-empty JSON array of token ids"},
      {{"{\"a\": 1}"}, "line 1: expected a non-empty JSON array"},
      {{"[1, 11]"}, "line 1: token 1 = 11 is not a token id in the vocabulary [0, 11)"},
      {{"[1, -2]"}, "line 1: token 1 = -2 is not a token id"},
      {{"[1.5]"}, "line 1: token 0 = 1.5 is not a token id"},
  };
  for (const auto& [lines, message] : bad_prompts) {
    CAPTURE(message);
    write_lines(t.prompts, lines);
    const Outcome o = sample(t.args());
    CHECK(o.rc == 3);
    CHECK_THAT(o.err, Contains(t.prompts + " " + message));
  }
  write_lines(t.prompts, {"[3, 1, 4]", "[9]", "[2,6]"});
  const std::vector<std::pair<std::vector<std::string>, std::string>> bad_rewards{
      {{"[1, 0]", "[0, 1]"}, ": 2 lines for 3 prompts"},
      {{"[1, 0]", "[0, 1, 2]", "[0, 0]"}, " line 2: 3 rewards, expected G = 2"},
      {{"[1, 0]", "[0, \"x\"]", "[0, 0]"}, " line 2: reward 1 = \"x\" is not a finite number"},
  };
  for (const auto& [lines, message] : bad_rewards) {
    CAPTURE(message);
    write_lines(rewards, lines);
    const Outcome o = sample(t.args({"--rewards", rewards}));
    CHECK(o.rc == 3);
    CHECK_THAT(o.err, Contains(rewards + message));
  }
  const Outcome missing = sample(t.args({"--rewards", t.s.dir.file("absent.jsonl")}));
  CHECK(missing.rc == 3);
  CHECK_THAT(missing.err, Contains("absent.jsonl: cannot open the file"));
}

TEST_CASE("cli sample: a Qwen2 checkpoint on a device-style backend samples the CPU backend's batch",
          "[cli][sample][device]") {
  TempDir dir;
  nn::Qwen2ForCausalLM<double> model(tiny_qwen2_config(false), std::nullopt, 51);
  const std::string ckpt = dir.file("qwen"), prompts = dir.file("p.jsonl");
  hf::save_pretrained(model, ckpt, safetensors::Dtype::F64);
  write_lines(prompts, {"[1, 2, 3, 4]", "[5]"});
  ep_sample::SampleOptions o;
  o.checkpoint = ckpt;
  o.prompts = prompts;
  o.dtype = "f64";
  o.sampling.G = 3;
  o.sampling.max_new_tokens = 5;
  o.sampling.seed = 9;
  o.out = dir.file("cpu.safetensors");
  const Outcome c = captured([&] { return ep_sample::sample_typed<double, CpuBackend>(o); });
  o.out = dir.file("device.safetensors");
  const Outcome d = captured([&] { return ep_sample::sample_typed<double, ep_parity::EmulatedDeviceBackend>(o); });
  INFO(c.err << d.err);
  REQUIRE(c.rc == 0);
  REQUIRE(d.rc == 0);
  CHECK_THAT(c.out, Contains("qwen2 checkpoint"));
  const TokenBatch bc = hf::load_batch(dir.file("cpu.safetensors")), bd = hf::load_batch(o.out);
  CHECK(bc.sequences == bd.sequences);
  CHECK(bc.attention_mask == bd.attention_mask);
  CHECK(bc.sequences == sample_responses(model, {{1, 2, 3, 4}, {5}}, o.sampling).sequences);
}
