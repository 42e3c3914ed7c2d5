// TokenBatch: validation (every error names the batch, the field and the
// index), generated lengths and Lmax, the causal shift of the scored targets,
// select/slice and GRPO advantages (docs/math.md, docs/checkpoints.md).
#include "../support/files.hpp"
#include "../support/tiny_models.hpp"

#include <entropy_probe/data/batch.hpp>
#include <entropy_probe/probe/sequence_logprob.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <vector>

using namespace entropy_probe;
using Catch::Contains;

namespace {

constexpr index_t kBatchVocab = 11;

// B = 2 prompts, G = 2 responses, T = 6, vocabulary 11:
//   row (0,0): prompt [1 2]        response [3 4 5]  then padding 0     L = 3
//   row (0,1): prompt [1 2]        response [6]      then padding 0 0 0 L = 1
//   row (1,0): prompt [pad 7 8]    response [9 10 0] (0 = a real end token) L = 3
//   row (1,1): prompt [pad 7 8]    response all padding                 L = 0
TokenBatch valid_batch() {
  TokenBatch b;
  b.B = 2;
  b.G = 2;
  b.T = 6;
  b.sequences = {1, 2, 3, 4, 5,  0,  //
                 1, 2, 6, 0, 0,  0,  //
                 0, 7, 8, 9, 10, 0,  //
                 0, 7, 8, 0, 0,  0};
  b.attention_mask = {1, 1, 1, 1, 1, 0,  //
                      1, 1, 1, 0, 0, 0,  //
                      0, 1, 1, 1, 1, 1,  //
                      0, 1, 1, 0, 0, 0};
  b.prompt_lens = {2, 3};
  b.advantages = {0.5, -0.5, 1.0, -1.0};
  return b;
}

std::size_t at(const TokenBatch& b, index_t p, index_t g, index_t t) { return static_cast<std::size_t>(b.at(p, g, t)); }

}  // namespace

TEST_CASE("batch: a well-formed batch validates, with and without the optional fields", "[batch][validate]") {
  TokenBatch b = valid_batch();
  CHECK_NOTHROW(b.validate(kBatchVocab, "E batch"));
  b.max_lengths = std::vector<double>{4.0, 0.5};
  b.rewards = std::vector<double>{1, 0, 0, 1};
  b.position_ids = std::vector<std::int32_t>(b.sequences.size(), 0);
  CHECK_NOTHROW(b.validate(kBatchVocab, "E batch"));
  // The largest id of the vocabulary and the largest prompt length are inside.
  b.sequences[at(b, 1, 0, 5)] = kBatchVocab - 1;
  b.prompt_lens[1] = 5;
  CHECK_NOTHROW(b.validate(kBatchVocab, "E batch"));
}

TEST_CASE("batch: validate rejects empty dimensions", "[batch][validate]") {
  SECTION("B = 0") {
    TokenBatch b;
    b.G = 2;
    b.T = 4;
    CHECK_INPUT_ERROR(b.validate(kBatchVocab, "E batch"),
                      Contains("E batch") && Contains("empty batch") && Contains("B = 0"));
  }
  SECTION("G = 0") {
    TokenBatch b = valid_batch();
    b.G = 0;
    CHECK_INPUT_ERROR(b.validate(kBatchVocab, "U batch"), Contains("U batch") && Contains("G = 0"));
  }
  SECTION("T too short for a prompt token and a response token") {
    TokenBatch b = valid_batch();
    for (index_t t : {0, 1}) {
      b.T = t;
      CHECK_INPUT_ERROR(b.validate(kBatchVocab, "E batch"), Contains("E batch") && Contains(fmt::format("T = {}", t)));
    }
  }
}

TEST_CASE("batch: validate names the field whose size is wrong", "[batch][validate]") {
  auto expect = [](const TokenBatch& b, const char* field, std::size_t got, std::size_t want) {
    CHECK_INPUT_ERROR(
        b.validate(kBatchVocab, "U.safetensors"),
        Contains("U.safetensors") && Contains(fmt::format("{} has {} entries, expected {}", field, got, want)));
  };
  TokenBatch b = valid_batch();
  SECTION("sequences") {
    b.sequences.push_back(0);
    expect(b, "sequences", 25, 24);
  }
  SECTION("attention_mask") {
    b.attention_mask.pop_back();
    expect(b, "attention_mask", 23, 24);
  }
  SECTION("prompt_lens") {
    b.prompt_lens.push_back(2);
    expect(b, "prompt_lens", 3, 2);
  }
  SECTION("advantages") {
    b.advantages.pop_back();
    expect(b, "advantages", 3, 4);
  }
  SECTION("max_lengths") {
    b.max_lengths = std::vector<double>{3.0};
    expect(b, "max_lengths", 1, 2);
  }
  SECTION("rewards") {
    b.rewards = std::vector<double>{1, 2, 3, 4, 5};
    expect(b, "rewards", 5, 4);
  }
  SECTION("position_ids") {
    b.position_ids = std::vector<std::int32_t>(23, 0);
    expect(b, "position_ids", 23, 24);
  }
}

TEST_CASE("batch: validate checks token ids against the vocabulary, real and padding", "[batch][validate]") {
  TokenBatch b = valid_batch();
  SECTION("real token == vocabulary size") {
    b.sequences[at(b, 1, 0, 5)] = kBatchVocab;
    CHECK_INPUT_ERROR(b.validate(kBatchVocab, "E batch"),
                      Contains("E batch") && Contains("sequences[1,0,5] = 11") && Contains("vocabulary"));
  }
  SECTION("real token negative") {
    b.sequences[at(b, 0, 1, 2)] = -1;
    CHECK_INPUT_ERROR(b.validate(kBatchVocab, "E batch"),
                      Contains("E batch") && Contains("sequences[0,1,2] = -1") && Contains("vocabulary"));
  }
  SECTION("real prompt token out of range") {
    b.sequences[at(b, 1, 1, 1)] = 1000;
    CHECK_INPUT_ERROR(b.validate(kBatchVocab, "E batch"),
                      Contains("sequences[1,1,1] = 1000") && Contains("vocabulary"));
  }
  SECTION("padding token == vocabulary size") {
    b.sequences[at(b, 1, 1, 4)] = kBatchVocab;
    CHECK_INPUT_ERROR(b.validate(kBatchVocab, "E batch"), Contains("E batch") && Contains("sequences[1,1,4] = 11") &&
                                                              Contains("padding") && Contains("vocabulary"));
  }
  SECTION("padding token negative (left padding inside a prompt)") {
    b.sequences[at(b, 1, 0, 0)] = -3;
    CHECK_INPUT_ERROR(b.validate(kBatchVocab, "E batch"),
                      Contains("sequences[1,0,0] = -3") && Contains("padding") && Contains("vocabulary"));
  }
  SECTION("a smaller vocabulary makes the same batch invalid") {
    CHECK_INPUT_ERROR(b.validate(10, "E batch"), Contains("sequences[1,0,4] = 10") && Contains("vocabulary size 10"));
  }
}

TEST_CASE("batch: validate checks mask values, prompt lengths, advantages, max lengths, positions",
          "[batch][validate]") {
  TokenBatch b = valid_batch();
  SECTION("mask value 2") {
    b.attention_mask[at(b, 0, 1, 3)] = 2;
    CHECK_INPUT_ERROR(b.validate(kBatchVocab, "E batch"),
                      Contains("E batch") && Contains("attention_mask[0,1,3] = 2") && Contains("not 0 or 1"));
  }
  SECTION("prompt length 0") {
    b.prompt_lens[1] = 0;
    CHECK_INPUT_ERROR(b.validate(kBatchVocab, "E batch"), Contains("E batch") && Contains("prompt_lens[1] = 0"));
  }
  SECTION("prompt length negative") {
    b.prompt_lens[0] = -2;
    CHECK_INPUT_ERROR(b.validate(kBatchVocab, "E batch"), Contains("prompt_lens[0] = -2"));
  }
  SECTION("prompt length == T") {
    b.prompt_lens[1] = 6;
    CHECK_INPUT_ERROR(b.validate(kBatchVocab, "E batch"), Contains("E batch") && Contains("prompt_lens[1] = 6"));
  }
  SECTION("prompt length > T") {
    b.prompt_lens[1] = 7;
    CHECK_INPUT_ERROR(b.validate(kBatchVocab, "E batch"), Contains("prompt_lens[1] = 7"));
  }
  SECTION("advantage NaN") {
    b.advantages[2] = std::numeric_limits<double>::quiet_NaN();
    CHECK_INPUT_ERROR(b.validate(kBatchVocab, "U batch"),
                      Contains("U batch") && Contains("advantages[1,0]") && Contains("not finite"));
  }
  SECTION("advantage +inf and -inf") {
    b.advantages[1] = std::numeric_limits<double>::infinity();
    CHECK_INPUT_ERROR(b.validate(kBatchVocab, "U batch"), Contains("U batch") && Contains("advantages[0,1] = inf"));
    b.advantages[1] = -std::numeric_limits<double>::infinity();
    CHECK_INPUT_ERROR(b.validate(kBatchVocab, "U batch"), Contains("advantages[0,1] = -inf"));
  }
  SECTION("max_lengths zero, negative, NaN, inf") {
    for (double m : {0.0, -2.0, std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()}) {
      CAPTURE(m);
      b.max_lengths = std::vector<double>{3.0, m};
      CHECK_INPUT_ERROR(b.validate(kBatchVocab, "E batch"),
                        Contains("E batch") && Contains("max_lengths[1]") && Contains("positive"));
    }
  }
  SECTION("negative position id") {
    b.position_ids = std::vector<std::int32_t>(b.sequences.size(), 1);
    (*b.position_ids)[at(b, 1, 1, 2)] = -1;
    CHECK_INPUT_ERROR(b.validate(kBatchVocab, "E batch"),
                      Contains("E batch") && Contains("position_ids[1,1,2] = -1") && Contains("negative"));
  }
}

TEST_CASE("batch: gen_length counts masked-in tokens after the prompt, and lmax", "[batch][lengths]") {
  TokenBatch b = valid_batch();
  CHECK(b.gen_length(0, 0) == 3);
  CHECK(b.gen_length(0, 1) == 1);
  CHECK(b.gen_length(1, 0) == 3);  // the real end token (id 0) counts
  CHECK(b.gen_length(1, 1) == 0);  // all padding
  CHECK(b.lmax(0) == 3.0);
  CHECK(b.lmax(1) == 3.0);
  // Prompt tokens never count, even with mask 1; a hole in the response does not count.
  CHECK_FALSE(b.generated(0, 0, 1));
  CHECK(b.generated(0, 0, 2));
  b.attention_mask[at(b, 0, 0, 3)] = 0;
  CHECK(b.gen_length(0, 0) == 2);
  CHECK(b.lmax(0) == 2.0);

  SECTION("explicit max_lengths win, even when smaller than the longest response") {
    b.max_lengths = std::vector<double>{7.5, 2.0};
    CHECK(b.lmax(0) == 7.5);
    CHECK(b.lmax(1) == 2.0);
    CHECK(b.gen_length(1, 0) == 3);  // unaffected
  }
  SECTION("a group whose responses are all padding has L = 0 and lmax 1") {
    for (index_t t = 3; t < b.T; ++t) b.attention_mask[at(b, 1, 0, t)] = 0;
    CHECK(b.gen_length(1, 0) == 0);
    CHECK(b.gen_length(1, 1) == 0);
    CHECK(b.lmax(1) == 1.0);
    CHECK_NOTHROW(b.validate(kBatchVocab, "E batch"));
  }
}

TEST_CASE("batch: token t is scored at position t-1, and the mask (not the id) marks padding",
          "[batch][scored_targets]") {
  const TokenBatch b = valid_batch();
  const ScoredTargets st = scored_targets(b);
  const std::vector<std::int32_t> targets = {-1, 3,  4,  5,  -1, -1,   // row (0,0)
                                             -1, 6,  -1, -1, -1, -1,   // row (0,1)
                                             -1, -1, 9,  10, 0,  -1,   // row (1,0): the end token 0 is scored
                                             -1, -1, -1, -1, -1, -1};  // row (1,1): padding 0 is not
  const std::vector<double> weights = {0, 1, 1, 1, 0, 0,               //
                                       0, 1, 0, 0, 0, 0,               //
                                       0, 0, 1, 1, 1, 0,               //
                                       0, 0, 0, 0, 0, 0};
  CHECK(st.targets == targets);
  CHECK(st.weights == weights);

  SECTION("changing a padding id changes nothing, changing the end token changes its target") {
    TokenBatch c = b;
    c.sequences[at(c, 1, 1, 3)] = 5;  // padding
    c.sequences[at(c, 0, 0, 5)] = 7;  // padding
    CHECK(scored_targets(c).targets == targets);
    c.sequences[at(c, 1, 0, 5)] = 4;  // the real end token
    std::vector<std::int32_t> moved = targets;
    moved[static_cast<std::size_t>(2 * 6 + 4)] = 4;
    CHECK(scored_targets(c).targets == moved);
  }
  SECTION("masking the end token out removes it from the score") {
    TokenBatch c = b;
    c.attention_mask[at(c, 1, 0, 5)] = 0;
    std::vector<std::int32_t> moved = targets;
    moved[static_cast<std::size_t>(2 * 6 + 4)] = -1;
    CHECK(scored_targets(c).targets == moved);
  }
}

TEST_CASE("batch: S sums the log-probabilities of generated tokens, scored by the logits at t-1",
          "[batch][scored_targets]") {
  auto model = ep_test::tiny_gpt2<double>(4);
  const TokenBatch b = valid_batch();
  const double tau = 0.7;
  // Logits of every row from one plain forward, then the sum by hand.
  Tape<double> tape;
  const std::vector<double> z = tape.value(model.forward(tape, sequence_input(b))).to_host();
  std::vector<double> want(4, 0.0);
  for (index_t p = 0; p < 2; ++p)
    for (index_t g = 0; g < 2; ++g)
      for (index_t t = b.prompt_lens[static_cast<std::size_t>(p)]; t < 6; ++t) {
        if (!b.attention_mask[at(b, p, g, t)]) continue;
        const double* zt = z.data() + (b.at(p, g, t - 1)) * kBatchVocab;
        double mx = -std::numeric_limits<double>::infinity(), total = 0;
        for (index_t v = 0; v < kBatchVocab; ++v) mx = std::max(mx, zt[v] / tau);
        for (index_t v = 0; v < kBatchVocab; ++v) total += std::exp(zt[v] / tau - mx);
        want[static_cast<std::size_t>(p * 2 + g)] += zt[b.sequences[at(b, p, g, t)]] / tau - mx - std::log(total);
      }
  const std::vector<double> S = sequence_logprobs(model, b, tau);
  REQUIRE(S.size() == 4);
  for (std::size_t r = 0; r < 4; ++r) CHECK(S[r] == Approx(want[r]).epsilon(1e-13));
  CHECK(S[3] == 0.0);  // an all-padding response scores nothing
  CHECK(want[2] != 0.0);

  // Padding ids (mask 0) are never read: S is unchanged bit for bit. The real
  // end token, with the same id 0, is read: changing it changes S of its row only.
  TokenBatch c = b;
  c.sequences[at(c, 0, 0, 5)] = 9;
  c.sequences[at(c, 1, 1, 3)] = 4;
  c.sequences[at(c, 1, 1, 0)] = 3;  // left padding inside a prompt
  CHECK(sequence_logprobs(model, c, tau) == S);
  c.sequences[at(c, 1, 0, 5)] = 8;
  const std::vector<double> S2 = sequence_logprobs(model, c, tau);
  CHECK(S2[0] == S[0]);
  CHECK(S2[1] == S[1]);
  CHECK(S2[2] != S[2]);
  CHECK(S2[3] == S[3]);
}

TEST_CASE("batch: sequence_input uses default positions 0..T-1 or the batch's", "[batch][scored_targets]") {
  TokenBatch b = valid_batch();
  SequenceInput in = sequence_input(b);
  CHECK(in.rows == 4);
  CHECK(in.length == 6);
  CHECK(in.tokens == b.sequences);
  CHECK(in.key_mask == b.attention_mask);
  std::vector<std::int32_t> pos;
  for (int r = 0; r < 4; ++r)
    for (int t = 0; t < 6; ++t) pos.push_back(t);
  CHECK(in.positions == pos);
  std::vector<std::int32_t> explicit_pos(24);
  for (std::size_t i = 0; i < explicit_pos.size(); ++i) explicit_pos[i] = static_cast<std::int32_t>(3 * i % 7);
  b.position_ids = explicit_pos;
  CHECK(sequence_input(b).positions == explicit_pos);
}

TEST_CASE("batch: select and slice keep every field aligned", "[batch][select]") {
  // Distinct values everywhere so a misaligned copy shows.
  TokenBatch b;
  b.B = 3;
  b.G = 2;
  b.T = 3;
  for (int i = 0; i < 18; ++i) {
    b.sequences.push_back(i);
    b.attention_mask.push_back(static_cast<std::uint8_t>(i % 2));
  }
  b.prompt_lens = {10, 20, 30};
  b.advantages = {0.0, 0.5, 1.0, 1.5, 2.0, 2.5};
  b.max_lengths = std::vector<double>{1.5, 2.5, 3.5};
  b.rewards = std::vector<double>{100, 101, 102, 103, 104, 105};
  std::vector<std::int32_t> pos;
  for (int i = 0; i < 18; ++i) pos.push_back(1000 + i);
  b.position_ids = pos;

  const TokenBatch s = b.select({2, 0});
  CHECK(s.B == 2);
  CHECK(s.G == 2);
  CHECK(s.T == 3);
  CHECK(s.sequences == std::vector<std::int32_t>{12, 13, 14, 15, 16, 17, 0, 1, 2, 3, 4, 5});
  CHECK(s.attention_mask == std::vector<std::uint8_t>{0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1});
  CHECK(s.prompt_lens == std::vector<std::int32_t>{30, 10});
  CHECK(s.advantages == std::vector<double>{2.0, 2.5, 0.0, 0.5});
  REQUIRE(s.max_lengths);
  CHECK(*s.max_lengths == std::vector<double>{3.5, 1.5});
  REQUIRE(s.rewards);
  CHECK(*s.rewards == std::vector<double>{104, 105, 100, 101});
  REQUIRE(s.position_ids);
  CHECK(*s.position_ids ==
        std::vector<std::int32_t>{1012, 1013, 1014, 1015, 1016, 1017, 1000, 1001, 1002, 1003, 1004, 1005});
  CHECK(s.advantage(0, 1) == 2.5);
  CHECK(s.lmax(1) == 1.5);

  const TokenBatch sl = b.slice(1, 3);
  const TokenBatch se = b.select({1, 2});
  CHECK(sl.B == 2);
  CHECK(sl.sequences == se.sequences);
  CHECK(sl.sequences == std::vector<std::int32_t>{6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17});
  CHECK(sl.attention_mask == se.attention_mask);
  CHECK(sl.prompt_lens == std::vector<std::int32_t>{20, 30});
  CHECK(sl.advantages == std::vector<double>{1.0, 1.5, 2.0, 2.5});
  CHECK(*sl.max_lengths == std::vector<double>{2.5, 3.5});
  CHECK(*sl.rewards == std::vector<double>{102, 103, 104, 105});
  CHECK(*sl.position_ids == *se.position_ids);

  // A repeated prompt is copied twice; an empty selection is an empty batch.
  CHECK(b.select({1, 1}).prompt_lens == std::vector<std::int32_t>{20, 20});
  CHECK(b.slice(2, 2).B == 0);

  SECTION("absent optional fields stay absent") {
    TokenBatch v = valid_batch();
    const TokenBatch w = v.select({1});
    CHECK_FALSE(w.max_lengths);
    CHECK_FALSE(w.rewards);
    CHECK_FALSE(w.position_ids);
    CHECK(w.sequences == std::vector<std::int32_t>(v.sequences.begin() + 12, v.sequences.end()));
    CHECK(w.gen_length(0, 0) == 3);
    CHECK_NOTHROW(w.validate(kBatchVocab, "selected"));
  }
  SECTION("a prompt index outside the batch is a usage error") {
    CHECK_THROWS_AS(b.select({3}), UsageError);
    CHECK_THROWS_WITH(b.select({0, 3}), Contains("prompt 3") && Contains("[0, 3)"));
    CHECK_THROWS_AS(b.select({-1}), UsageError);
    CHECK_THROWS_AS(b.slice(2, 4), UsageError);
  }
}

TEST_CASE("batch: grpo_advantages subtract the group mean, optionally scale by the unbiased std", "[batch][grpo]") {
  // Group 0: rewards 1 2 3, mean 2, unbiased std 1 (biased would be 0.8165).
  // Group 1: rewards 0 0 6, mean 2, unbiased std sqrt(12) (biased would be sqrt(8)).
  const std::vector<double> rewards = {1, 2, 3, 0, 0, 6};
  const std::vector<double> centred = grpo_advantages(rewards, 2, 3);
  CHECK(centred == std::vector<double>{-1, 0, 1, -2, -2, 4});

  const std::vector<double> scaled = grpo_advantages(rewards, 2, 3, true, 0.0);
  const std::vector<double> want = {-1, 0, 1, -0.5773502691896258, -0.5773502691896258, 1.1547005383792517};
  REQUIRE(scaled.size() == want.size());
  for (std::size_t i = 0; i < want.size(); ++i) CHECK(scaled[i] == Approx(want[i]).epsilon(1e-15).margin(0));

  // The default eps (1e-6) is added to the std.
  const std::vector<double> with_eps = grpo_advantages(rewards, 2, 3, true);
  CHECK(with_eps[0] == Approx(-1.0 / (1.0 + 1e-6)).epsilon(1e-15));
  CHECK(with_eps[5] == Approx(4.0 / (std::sqrt(12.0) + 1e-6)).epsilon(1e-15));

  SECTION("equal rewards give zero advantages") {
    CHECK(grpo_advantages({5, 5, 5}, 1, 3) == std::vector<double>{0, 0, 0});
    CHECK(grpo_advantages({5, 5, 5}, 1, 3, true) == std::vector<double>{0, 0, 0});
  }
  SECTION("G = 1 gives zeros, scaled or not") {
    CHECK(grpo_advantages({3.5, -2}, 2, 1) == std::vector<double>{0, 0});
    CHECK(grpo_advantages({3.5, -2}, 2, 1, true) == std::vector<double>{0, 0});
  }
  SECTION("a reward count that is not B*G is a usage error") {
    CHECK_THROWS_AS(grpo_advantages({1, 2, 3}, 2, 2), UsageError);
    CHECK_THROWS_WITH(grpo_advantages({1, 2, 3}, 2, 2), Contains("3 rewards") && Contains("B*G = 4"));
  }
}
