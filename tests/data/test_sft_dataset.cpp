// JSON dataset reading, row conversion, masking, cutoff_len and the train/val split, against
// LLaMA-Factory 0.9.5's rules (converter.py, processor/supervised.py, processor_utils.py) worked
// by hand with the byte-level fake tokenizer.
#include "data/sft_dataset.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <set>

#include "data/tokenizer_config.h"
#include "expect_error.h"
#include "fake_text_tokenizer.h"

namespace qlora::data {
namespace {

namespace fs = std::filesystem;
using testing::bytes;
using testing::cat;
using testing::contains;
using testing::invalid_argument_message;
constexpr int32_t I = kIgnoreLabel, kEos = 257, kBos = 256;

class SftFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("qlora_sft_" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string write(const std::string& name, const std::string& text) {
    const fs::path p = dir_ / name;
    std::ofstream(p, std::ios::binary) << text;
    return p.string();
  }
  fs::path dir_;
};

// ---- reading files ----

TEST_F(SftFiles, JsonLinesRowsKnowTheirLines) {
  const std::string p = write("d.jsonl", "{\"text\": \"a\"}\n\n  \n{\"text\": \"b\"}\r\n");
  const auto rows = read_json_rows(p);
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[0].where, p + ":1");
  EXPECT_EQ(rows[1].where, p + ":4");
  EXPECT_EQ(rows[1].value["text"], "b");
  EXPECT_EQ(read_json_rows(p, 1).size(), 1u);
}

TEST_F(SftFiles, JsonArrayRowsAreNumberedFromOne) {
  const std::string p = write("d.json", "\xEF\xBB\xBF [ {\"text\": \"a\"}, {\"text\": \"b\"} ]");
  const auto rows = read_json_rows(p);
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[1].where, p + " row 2");
}

TEST_F(SftFiles, FileErrorsAreOneClearLine) {
  auto msg = [](const std::string& p) { return invalid_argument_message([&] { read_json_rows(p); }); };
  const std::string jsonl = write("bad.jsonl", "{\"text\": \"a\"}\n{\"text\": oops}\n");
  EXPECT_TRUE(contains(msg(jsonl), jsonl + ":2: not valid JSON")) << msg(jsonl);
  const std::string arr = write("bad.json", "[{\"text\": \"a\"},\n {\"text\" \"b\"}]");  // the parser stops after "b": bytes 26..28 counted from 1
  EXPECT_TRUE(contains(msg(arr), "not valid JSON at byte 28")) << msg(arr);
  EXPECT_TRUE(contains(msg(write("e.json", " \n\t")), "empty file"));
  EXPECT_TRUE(contains(msg(write("n.json", "hello")), "not JSON (it starts with 'h')"));
  EXPECT_TRUE(contains(msg(write("o.json", "{\n \"data\": []\n}\n")), "the top level is one JSON object"));
  const std::string row = write("r.json", "[{\"text\": \"a\"}, 3]");
  EXPECT_TRUE(contains(msg(row), row + " row 2: a row must be a JSON object")) << msg(row);
  EXPECT_TRUE(contains(msg((dir_ / "missing.json").string()), "cannot be read"));
  // A number JSON cannot hold (found by fuzzing: nlohmann's out_of_range escaped unnamed).
  const std::string big = write("big.jsonl", "{\"text\": 1e999}\n");
  EXPECT_TRUE(contains(msg(big), big + ":1: not valid JSON")) << msg(big);
  const std::string big_arr = write("big.json", "[{\"text\": 1e999}]");
  EXPECT_TRUE(contains(msg(big_arr), big_arr + ": not valid JSON")) << msg(big_arr);
}

TEST(SftFormatting, AutoDetectionFromTheFirstRowsKeys) {
  auto detect = [](const char* j) { return detect_formatting(JsonRow{nlohmann::json::parse(j), "f:1"}); };
  EXPECT_EQ(detect(R"({"conversations": [], "messages": []})"), Formatting::sharegpt);
  EXPECT_EQ(detect(R"({"messages": []})"), Formatting::openai);
  EXPECT_EQ(detect(R"({"instruction": "i", "text": "t"})"), Formatting::alpaca);
  EXPECT_EQ(detect(R"({"output": "o"})"), Formatting::alpaca);
  EXPECT_EQ(detect(R"({"text": "t"})"), Formatting::text);
  const std::string m = invalid_argument_message([&] { detect(R"({"prompt": "p", "completion": "c"})"); });
  EXPECT_TRUE(contains(m, "f:1") && contains(m, "completion, prompt")) << m;
  EXPECT_EQ(formatting_from_name("auto"), Formatting::automatic);
  EXPECT_TRUE(contains(invalid_argument_message([] { formatting_from_name("csv"); }), "valid: auto"));
}

// ---- converting rows ----

Conversation convert_ok(const char* j, Formatting f) {
  ConvertResult r = convert_row(nlohmann::json::parse(j), f);
  EXPECT_TRUE(r.conversation.has_value()) << r.bad_reason;
  return r.conversation.value_or(Conversation{});
}
std::string convert_bad(const char* j, Formatting f) {
  ConvertResult r = convert_row(nlohmann::json::parse(j), f);
  EXPECT_FALSE(r.conversation.has_value()) << j;
  return r.bad_reason;
}

TEST(SftConvert, AlpacaJoinsInstructionAndInputAndExpandsHistory) {
  const Conversation c = convert_ok(
      R"({"instruction": "do", "input": "this", "output": "done", "system": "S",
          "history": [["q1", "a1"]]})", Formatting::alpaca);
  ASSERT_EQ(c.messages.size(), 4u);
  EXPECT_EQ(c.system, "S");
  EXPECT_EQ(c.messages[0].content, "q1");
  EXPECT_EQ(c.messages[1].content, "a1");
  EXPECT_EQ(c.messages[2].content, "do\nthis");
  EXPECT_EQ(c.messages[3].role, Role::assistant);
  EXPECT_EQ(convert_ok(R"({"instruction": "", "input": "x", "output": "o"})", Formatting::alpaca).messages[0].content, "x");
  EXPECT_TRUE(contains(convert_bad(R"({"instruction": "i"})", Formatting::alpaca), "no \"output\""));
  EXPECT_TRUE(contains(convert_bad(R"({"instruction": "", "output": "o"})", Formatting::alpaca), "both empty"));
  EXPECT_TRUE(contains(convert_bad(R"({"instruction": "i", "output": ""})", Formatting::alpaca), "\"output\" is empty"));
  EXPECT_TRUE(contains(convert_bad(R"({"instruction": "i", "output": "o", "history": [["q"]]})", Formatting::alpaca),
                       "\"history\"[0]"));
}

TEST(SftConvert, SharegptSystemFirstRolesAlternateEvenCount) {
  const Conversation c = convert_ok(
      R"({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "u"},
          {"from": "gpt", "value": "a"}, {"from": "observation", "value": "o"}, {"from": "gpt", "value": "b"}]})",
      Formatting::sharegpt);
  EXPECT_EQ(c.system, "S");
  ASSERT_EQ(c.messages.size(), 4u);
  EXPECT_EQ(c.messages[2].role, Role::observation);
  const char* swapped = R"({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "u"}]})";
  EXPECT_TRUE(contains(convert_bad(swapped, Formatting::sharegpt), "message 1: role 'gpt' where human/observation"));
  const char* late_system = R"({"conversations": [{"from": "human", "value": "u"}, {"from": "system", "value": "s"}]})";
  EXPECT_TRUE(contains(convert_bad(late_system, Formatting::sharegpt), "message 2: role 'system'"));
  const char* odd = R"({"conversations": [{"from": "human", "value": "u"}]})";
  EXPECT_TRUE(contains(convert_bad(odd, Formatting::sharegpt), "1 turns"));
  EXPECT_TRUE(contains(convert_bad(R"({"conversations": [{"from": "system", "value": "s"}]})", Formatting::sharegpt),
                       "no turns"));
  EXPECT_TRUE(contains(convert_bad(R"({"conversations": [{"from": "human"}]})", Formatting::sharegpt), "\"value\""));
  EXPECT_TRUE(contains(convert_bad(R"({"conversations": [{"from": "human", "value": "u"},
      {"from": "function_call", "value": "{}"}]})", Formatting::sharegpt), "not supported"));
}

TEST(SftConvert, OpenaiMessagesUseRoleAndContent) {
  const Conversation c = convert_ok(
      R"({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "u"},
          {"role": "assistant", "content": "a"}]})", Formatting::openai);
  EXPECT_EQ(c.system, "S");
  EXPECT_EQ(c.messages.size(), 2u);
  EXPECT_TRUE(contains(convert_bad(R"({"messages": [{"role": "user", "content": "u"}, {"role": "tool", "content": "t"}]})",
                                   Formatting::openai), "role 'tool'"));
  EXPECT_TRUE(contains(convert_bad(R"({"messages": [{"role": "user", "content": [{"type": "text"}]}]})",
                                   Formatting::openai), "string \"content\""));
}

// ---- processing ----

TEST(SftProcess, InferSeqlenSharesTheCutoff) {
  // LLaMA-Factory's three cases: short target, short source, proportional.
  EXPECT_EQ(infer_seqlen(10, 2, 8), (std::pair<int64_t, int64_t>{6, 2}));
  EXPECT_EQ(infer_seqlen(3, 10, 8), (std::pair<int64_t, int64_t>{3, 5}));
  EXPECT_EQ(infer_seqlen(10, 10, 8), (std::pair<int64_t, int64_t>{4, 4}));
  EXPECT_EQ(infer_seqlen(30, 10, 9), (std::pair<int64_t, int64_t>{7, 2}));  // int(9 * 0.25) = 2
  EXPECT_EQ(infer_seqlen(5, 5, 100), (std::pair<int64_t, int64_t>{5, 5}));
}

Conversation two_turns() {
  return Conversation{{{Role::user, "a"}, {Role::assistant, "b"}, {Role::user, "c"}, {Role::assistant, "d"}}, ""};
}

TEST(SftProcess, PromptMaskingTrainOnPromptAndMaskHistory) {
  const ChatTemplate& t = chat_template_by_name("empty");
  const auto tok = testing::fake_tokenizer(t);
  SftOptions o;
  Sample s = sft_encode_conversation(tok, t, two_turns(), o);
  EXPECT_EQ(s.input_ids, bytes("abcd"));
  EXPECT_EQ(s.labels, (std::vector<int32_t>{I, 'b', I, 'd'}));
  o.train_on_prompt = true;
  EXPECT_EQ(sft_encode_conversation(tok, t, two_turns(), o).labels, bytes("abcd"));
  o.train_on_prompt = false;
  o.mask_history = true;
  s = sft_encode_conversation(tok, t, two_turns(), o);
  EXPECT_EQ(s.input_ids, bytes("abcd"));
  EXPECT_EQ(s.labels, (std::vector<int32_t>{I, I, I, 'd'}));
  o.train_on_prompt = true;
  EXPECT_TRUE(contains(invalid_argument_message([&] { sft_encode_conversation(tok, t, two_turns(), o); }),
                       "cannot be combined"));
}

TEST(SftProcess, CutoffKeepsFirstTurnsOrWithMaskHistoryTheLast) {
  const ChatTemplate& t = chat_template_by_name("empty");
  const auto tok = testing::fake_tokenizer(t);
  SftOptions o;
  o.cutoff_len = 2;
  bool cut = false;
  Sample s = sft_encode_conversation(tok, t, two_turns(), o, &cut);
  EXPECT_TRUE(cut);
  EXPECT_EQ(s.input_ids, bytes("ab"));
  o.mask_history = true;
  s = sft_encode_conversation(tok, t, two_turns(), o, &cut);
  EXPECT_EQ(s.input_ids, bytes("cd"));
  EXPECT_EQ(s.labels, (std::vector<int32_t>{I, 'd'}));
  o.cutoff_len = 4;
  sft_encode_conversation(tok, t, two_turns(), o, &cut);
  EXPECT_FALSE(cut);
}

TEST(SftProcess, EfficientEosLabelsTheEosOnceAtTheEndAndAtEachLaterPrompt) {
  ChatTemplate t = chat_template_by_name("empty");
  t.efficient_eos = true;
  const auto tok = testing::fake_tokenizer(t);
  SftOptions o;
  const Sample s = sft_encode_conversation(tok, t, two_turns(), o);
  EXPECT_EQ(s.input_ids, cat({bytes("abcd"), {kEos}}));
  EXPECT_EQ(s.labels, (std::vector<int32_t>{I, 'b', kEos, 'd', kEos}));
  o.train_on_prompt = true;
  EXPECT_TRUE(contains(invalid_argument_message([&] { sft_encode_conversation(tok, t, two_turns(), o); }),
                       "train_on_prompt"));
}

TEST(SftProcess, TextIsBosTextEosCutAndFullyLabelled) {
  const ChatTemplate& t = chat_template_by_name("empty");
  const auto tok = testing::fake_tokenizer(t, testing::fake_config(/*add_bos=*/true));
  SftOptions o;
  bool cut = true;
  Sample s = pretrain_encode_text(tok, t, "hey", o, &cut);
  EXPECT_FALSE(cut);
  EXPECT_EQ(s.input_ids, cat({{kBos}, bytes("hey"), {kEos}}));
  EXPECT_EQ(s.labels, s.input_ids);
  o.cutoff_len = 3;
  s = pretrain_encode_text(tok, t, "hey", o, &cut);
  EXPECT_TRUE(cut);
  EXPECT_EQ(s.input_ids, cat({{kBos}, bytes("he")}));
  // llama3 writes "<|end_of_text|>" as text; the fake tokenizer has it as plain bytes.
  const ChatTemplate& l3 = chat_template_by_name("llama3");
  o.cutoff_len = 100;
  EXPECT_EQ(pretrain_encode_text(testing::fake_tokenizer(l3), l3, "x", o).input_ids,
            cat({bytes("x"), bytes("<|end_of_text|>")}));
}

TEST_F(SftFiles, BadRowsThrowOrAreSkippedAndCounted) {
  const std::string p = write("d.jsonl",
                              "{\"instruction\": \"a\", \"output\": \"b\"}\n"
                              "{\"instruction\": \"a\"}\n"
                              "{\"instruction\": \"abcdef\", \"output\": \"gh\"}\n"
                              "{\"instruction\": \"\", \"output\": \"b\"}\n");
  const ChatTemplate& t = chat_template_by_name("empty");
  const auto tok = testing::fake_tokenizer(t);
  SftOptions o;
  o.cutoff_len = 4;
  EXPECT_TRUE(contains(invalid_argument_message([&] { sft_dataset_load(p, tok, t, o); }), p + ":2: no \"output\""));
  o.skip_bad = true;
  SftReport r;
  const auto samples = sft_dataset_load(p, tok, t, o, &r);
  ASSERT_EQ(samples.size(), 2u);
  EXPECT_EQ(r.formatting, Formatting::alpaca);
  EXPECT_EQ(r.rows_read, 4);
  EXPECT_EQ(r.samples, 2);
  EXPECT_EQ(r.skipped, 2);
  EXPECT_EQ(r.truncated, 1);
  EXPECT_EQ(r.tokens, 2 + 4);
  EXPECT_EQ(r.target_tokens, 1 + 1);  // "b"; "abcdef"->"gh" cut to (3, 1) by infer_seqlen(6, 2, 4)
  EXPECT_EQ(samples[1].input_ids, bytes("abcg"));
  ASSERT_EQ(r.first_bad.size(), 2u);
  EXPECT_TRUE(contains(r.first_bad[1], p + ":4: \"instruction\" and \"input\" are both empty")) << r.first_bad[1];
  // A row whose answer does not fit at all: infer_seqlen(1, 1, 1) leaves (1, 0).
  o.cutoff_len = 1;
  o.skip_bad = false;
  o.max_samples = 1;
  EXPECT_TRUE(contains(invalid_argument_message([&] { sft_dataset_load(p, tok, t, o); }),
                       p + ":1: no target token left after cutoff_len 1"));
}

TEST_F(SftFiles, MaxSamplesCountsRowsOfTheFile) {
  const std::string p = write("d.json", R"([{"text": "a"}, {"text": "b"}, {"text": "c"}])");
  const ChatTemplate& t = chat_template_by_name("empty");
  SftOptions o;
  o.max_samples = 2;
  SftReport r;
  const auto samples = sft_dataset_load(p, testing::fake_tokenizer(t), t, o, &r);
  EXPECT_EQ(r.formatting, Formatting::text);
  EXPECT_EQ(r.rows_read, 2);
  ASSERT_EQ(samples.size(), 2u);
  EXPECT_EQ(samples[1].input_ids, cat({bytes("b"), {kEos}}));
}

// ---- split ----

TEST(SftSplit, FractionIsCeiledCountIsExactDeterministicBySeed) {
  const TrainValSplit a = split_train_val(10, 0.25, 42);  // ceil(2.5) = 3, as datasets does
  EXPECT_EQ(a.val.size(), 3u);
  EXPECT_EQ(a.train.size(), 7u);
  std::set<int64_t> all(a.val.begin(), a.val.end());
  all.insert(a.train.begin(), a.train.end());
  EXPECT_EQ(all.size(), 10u);
  EXPECT_EQ(*all.rbegin(), 9);
  const TrainValSplit b = split_train_val(10, 0.25, 42);
  EXPECT_EQ(a.val, b.val);
  EXPECT_EQ(a.train, b.train);
  bool differs = false;
  for (uint64_t seed = 1; seed < 5 && !differs; ++seed) differs = split_train_val(10, 0.25, seed).val != a.val;
  EXPECT_TRUE(differs);
  EXPECT_EQ(split_train_val(10, 4, 0).val.size(), 4u);
  EXPECT_EQ(split_train_val(10, 1e-3, 0).val.size(), 1u);
  EXPECT_TRUE(contains(invalid_argument_message([] { split_train_val(10, 10, 0); }), "both need at least one"));
  EXPECT_TRUE(contains(invalid_argument_message([] { split_train_val(10, 2.5, 0); }), "whole"));
  // Found by fuzzing (tests/fuzz/json_dataset.cpp): a count beyond int64 was cast before the check.
  EXPECT_TRUE(contains(invalid_argument_message([] { split_train_val(3, 1e300, 0); }),
                       "val_size 1.0000000000000001e+300 of 3 samples leaves none to train on"));
  EXPECT_TRUE(contains(invalid_argument_message([] { split_train_val(10, 0, 0); }), "val_size"));
}

// ---- tokenizer config ----

TEST_F(SftFiles, TokenizerConfigTokensTemplatesAndMergeOrder) {
  write("tokenizer_config.json", R"({"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>",
      "add_bos_token": true, "chat_template": [{"name": "tool_use", "template": "T"},
      {"name": "default", "template": "D"}]})");
  write("special_tokens_map.json", R"({"eos_token": {"content": "<eos>"}, "pad_token": "<pad>"})");
  TokenizerConfig c = TokenizerConfig::from_dir(dir_.string());
  EXPECT_EQ(c.bos_token, "<s>");
  EXPECT_EQ(c.eos_token, "<eos>");  // special_tokens_map.json wins (no added_tokens_decoder)
  EXPECT_EQ(c.pad_token, "<pad>");
  EXPECT_FALSE(c.unk_token.has_value());
  EXPECT_TRUE(c.add_bos_token);
  EXPECT_EQ(c.chat_template, "D");
  write("chat_template.jinja", "J");
  write("tokenizer_config.json", R"({"eos_token": "</s>", "chat_template": "C", "added_tokens_decoder": {}})");
  c = TokenizerConfig::from_dir(dir_.string());
  EXPECT_EQ(c.eos_token, "</s>");  // with added_tokens_decoder the map is not read
  EXPECT_EQ(c.chat_template, "J");  // the .jinja file wins
  EXPECT_FALSE(c.add_bos_token);
  write("tokenizer_config.json", R"({"eos_token": 5})");
  EXPECT_TRUE(contains(invalid_argument_message([&] { TokenizerConfig::from_dir(dir_.string()); }), "\"eos_token\""));
  fs::remove(dir_ / "tokenizer_config.json");
  EXPECT_TRUE(contains(invalid_argument_message([&] { TokenizerConfig::from_dir(dir_.string()); }), "not found"));
}

}  // namespace
}  // namespace qlora::data
