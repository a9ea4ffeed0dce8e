// Preference pairs (train.stage = dpo), worked by hand with the byte-level fake tokenizer against
// LLaMA-Factory 0.9.5's rules: its converters' ranking branches (converter.py), its
// PairwiseDatasetProcessor (prompt + each answer, infer_seqlen on the longer answer, labels on
// the answer only), bad rows, the stage checks both ways; then padded pairs, the pair file
// writer and PairDataset (round trip, chosen rows then rejected rows, cutoff, vocabulary
// checks), and each reader refusing the other kind of file.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <filesystem>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "data/packing.h"
#include "data/prepare.h"
#include "data/sft_dataset.h"
#include "expect_error.h"
#include "fake_text_tokenizer.h"
#include "io/h5_file.h"
#include "io/temp_dir.h"

namespace qlora::data {
namespace {

namespace fs = std::filesystem;
using io::testing::file_write;
using io::testing::TempDir;
using testing::bytes;
using testing::cat;
using testing::contains;
using testing::invalid_argument_message;
constexpr int32_t I = kIgnoreLabel, kEos = 257;

// ---- converting rows ----

PairConversation pair_ok(const char* j, Formatting f) {
  PairConvertResult r = convert_pair_row(nlohmann::json::parse(j), f);
  EXPECT_TRUE(r.pair.has_value()) << r.bad_reason;
  return r.pair.value_or(PairConversation{});
}
std::string pair_bad(const char* j, Formatting f) {
  PairConvertResult r = convert_pair_row(nlohmann::json::parse(j), f);
  EXPECT_FALSE(r.pair.has_value()) << j;
  return r.bad_reason;
}

TEST(PrefConvert, AlpacaPromptAsForSftAnswersFromChosenAndRejected) {
  const PairConversation p = pair_ok(
      R"({"instruction": "do", "input": "this", "system": "S", "history": [["q1", "a1"]],
          "chosen": "good", "rejected": "bad", "output": "ignored"})", Formatting::alpaca);
  ASSERT_EQ(p.prompt.size(), 3u);
  EXPECT_EQ(p.system, "S");
  EXPECT_EQ(p.prompt[1].role, Role::assistant);
  EXPECT_EQ(p.prompt[2].role, Role::user);
  EXPECT_EQ(p.prompt[2].content, "do\nthis");
  EXPECT_EQ(p.chosen, "good");
  EXPECT_EQ(p.rejected, "bad");
  const auto A = Formatting::alpaca;
  EXPECT_TRUE(contains(pair_bad(R"({"instruction": "i", "chosen": "c"})", A), "no \"rejected\""));
  EXPECT_TRUE(contains(pair_bad(R"({"instruction": "i", "rejected": "r", "output": "o"})", A), "no \"chosen\""));
  EXPECT_TRUE(contains(pair_bad(R"({"instruction": "i", "chosen": "c", "rejected": 3})", A),
                       "\"rejected\" must be a string, got 3"));
  EXPECT_TRUE(contains(pair_bad(R"({"instruction": "i", "chosen": "", "rejected": "r"})", A),
                       "\"chosen\" is empty"));
  EXPECT_TRUE(contains(pair_bad(R"({"instruction": "", "chosen": "c", "rejected": "r"})", A),
                       "both empty"));
}

TEST(PrefConvert, SharegptConversationEndsWithAPromptAnswersAreAssistantMessages) {
  const PairConversation p = pair_ok(
      R"({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "u"},
          {"from": "gpt", "value": "a"}, {"from": "observation", "value": "o"}],
          "chosen": {"from": "gpt", "value": "yes"}, "rejected": {"from": "gpt", "value": "no"}})",
      Formatting::sharegpt);
  EXPECT_EQ(p.system, "S");
  ASSERT_EQ(p.prompt.size(), 3u);
  EXPECT_EQ(p.prompt[2].role, Role::observation);
  EXPECT_EQ(p.chosen, "yes");
  EXPECT_EQ(p.rejected, "no");
  const auto S = Formatting::sharegpt;
  // An even count: the conversation already ends with an answer (LLaMA-Factory drops the row).
  EXPECT_TRUE(contains(pair_bad(R"({"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}],
      "chosen": {"from": "gpt", "value": "y"}, "rejected": {"from": "gpt", "value": "n"}})", S),
                       "2 turns in \"conversations\""));
  const char* human_answer = R"({"conversations": [{"from": "human", "value": "u"}],
      "chosen": {"from": "gpt", "value": "y"}, "rejected": {"from": "human", "value": "n"}})";
  EXPECT_TRUE(contains(pair_bad(human_answer, S), "\"rejected\": role 'human' where gpt is expected"));
  const char* string_answer = R"({"conversations": [{"from": "human", "value": "u"}],
      "chosen": "y", "rejected": {"from": "gpt", "value": "n"}})";
  EXPECT_TRUE(contains(pair_bad(string_answer, S), "\"chosen\" must be a message {\"from\": \"gpt\", \"value\": ...}"));
  const char* empty_answer = R"({"conversations": [{"from": "human", "value": "u"}],
      "chosen": {"from": "gpt", "value": "y"}, "rejected": {"from": "gpt", "value": ""}})";
  EXPECT_TRUE(contains(pair_bad(empty_answer, S), "\"rejected\": empty \"value\""));
  EXPECT_TRUE(contains(pair_bad(R"({"conversations": [{"from": "human", "value": "u"}],
      "chosen": {"from": "gpt", "value": "y"}})", S), "no \"rejected\""));
  EXPECT_TRUE(contains(pair_bad(R"({"conversations": [{"from": "gpt", "value": "u"}],
      "chosen": {"from": "gpt", "value": "y"}, "rejected": {"from": "gpt", "value": "n"}})", S),
                       "message 1: role 'gpt'"));
}

TEST(PrefConvert, OpenaiMessagesUseRoleAndContent) {
  const PairConversation p = pair_ok(
      R"({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}],
          "chosen": {"role": "assistant", "content": "y"}, "rejected": {"role": "assistant", "content": "n"}})",
      Formatting::openai);
  EXPECT_EQ(p.system, "S");
  ASSERT_EQ(p.prompt.size(), 1u);
  EXPECT_EQ(p.rejected, "n");
  EXPECT_TRUE(contains(pair_bad(R"({"messages": [{"role": "user", "content": "u"}],
      "chosen": {"role": "gpt", "content": "y"}, "rejected": {"role": "assistant", "content": "n"}})",
                                Formatting::openai),
                       "\"chosen\": role 'gpt' where assistant is expected"));
  EXPECT_TRUE(contains(invalid_argument_message([] {
                         convert_pair_row(nlohmann::json::parse(R"({"text": "t"})"), Formatting::text);
                       }),
                       "no preference rows"));
}

TEST(PrefConvert, DetectionAndPairRows) {
  auto detect = [](const char* j) { return detect_formatting(JsonRow{nlohmann::json::parse(j), "f:1"}); };
  EXPECT_EQ(detect(R"({"input": "i", "chosen": "c", "rejected": "r"})"), Formatting::alpaca);
  EXPECT_EQ(detect(R"({"conversations": [], "chosen": {}, "rejected": {}})"), Formatting::sharegpt);
  EXPECT_EQ(detect(R"({"messages": [], "chosen": {}, "rejected": {}})"), Formatting::openai);
  EXPECT_TRUE(is_pair_row(nlohmann::json::parse(R"({"chosen": 1, "rejected": null})")));
  EXPECT_FALSE(is_pair_row(nlohmann::json::parse(R"({"chosen": "c", "output": "o"})")));
}

// ---- encoding ----

PairConversation pair_of(std::string prompt, std::string chosen, std::string rejected) {
  return PairConversation{{{Role::user, std::move(prompt)}}, std::move(chosen), std::move(rejected), ""};
}

TEST(PrefEncode, PromptThenEachAnswerLabelsOnTheAnswerOnly) {
  const ChatTemplate& t = chat_template_by_name("empty");
  const auto tok = testing::fake_tokenizer(t);
  // A history turn belongs to the prompt: no label on it (encode_oneturn).
  PairConversation p{{{Role::user, "a"}, {Role::assistant, "b"}, {Role::user, "c"}}, "xyz", "w", ""};
  bool cut = true;
  const PairSample s = pair_encode_conversation(tok, t, p, 100, &cut);
  EXPECT_FALSE(cut);
  EXPECT_EQ(s.chosen.input_ids, bytes("abcxyz"));
  EXPECT_EQ(s.chosen.labels, (std::vector<int32_t>{I, I, I, 'x', 'y', 'z'}));
  EXPECT_EQ(s.rejected.input_ids, bytes("abcw"));
  EXPECT_EQ(s.rejected.labels, (std::vector<int32_t>{I, I, I, 'w'}));
  // "default": "Human: {{content}}</s>\nAssistant:" then "{{content}}</s>\n"; the system first.
  const ChatTemplate& d = chat_template_by_name("default");
  p = pair_of("q", "y", "nn");
  p.system = "S";
  const PairSample ds = pair_encode_conversation(testing::fake_tokenizer(d), d, p, 100);
  const std::vector<int32_t> prompt =
      cat({bytes("System: S"), {kEos}, bytes("\nHuman: q"), {kEos}, bytes("\nAssistant:")});
  EXPECT_EQ(ds.chosen.input_ids, cat({prompt, bytes("y"), {kEos}, bytes("\n")}));
  EXPECT_EQ(ds.rejected.input_ids, cat({prompt, bytes("nn"), {kEos}, bytes("\n")}));
  EXPECT_EQ(ds.rejected.labels, cat({std::vector<int32_t>(prompt.size(), I), bytes("nn"), {kEos}, bytes("\n")}));
}

TEST(PrefEncode, EfficientEosEndsBothAnswersAndIsLabelled) {
  ChatTemplate t = chat_template_by_name("empty");
  t.efficient_eos = true;
  const PairSample s = pair_encode_conversation(testing::fake_tokenizer(t), t, pair_of("a", "b", "cd"), 100);
  EXPECT_EQ(s.chosen.input_ids, cat({bytes("ab"), {kEos}}));
  EXPECT_EQ(s.chosen.labels, (std::vector<int32_t>{I, 'b', kEos}));
  EXPECT_EQ(s.rejected.labels, (std::vector<int32_t>{I, 'c', 'd', kEos}));
}

TEST(PrefEncode, CutoffSharesInferSeqlenWithTheLongerAnswer) {
  const ChatTemplate& t = chat_template_by_name("empty");
  const auto tok = testing::fake_tokenizer(t);
  bool cut = false;
  // infer_seqlen(10, 10, 8) = (4, 4): the prompt to 4, the long answer to 4, the short one kept.
  PairSample s = pair_encode_conversation(tok, t, pair_of("0123456789", "ab", "ABCDEFGHIJ"), 8, &cut);
  EXPECT_TRUE(cut);
  EXPECT_EQ(s.chosen.input_ids, bytes("0123ab"));
  EXPECT_EQ(s.rejected.input_ids, bytes("0123ABCD"));
  EXPECT_EQ(s.rejected.labels, (std::vector<int32_t>{I, I, I, I, 'A', 'B', 'C', 'D'}));
  // infer_seqlen(3, 10, 8) = (3, 5); the chosen side decides when it is the longer one.
  s = pair_encode_conversation(tok, t, pair_of("xyz", "ABCDEFGHIJ", "a"), 8, &cut);
  EXPECT_EQ(s.chosen.input_ids, bytes("xyzABCDE"));
  EXPECT_EQ(s.rejected.input_ids, bytes("xyza"));
  pair_encode_conversation(tok, t, pair_of("xyz", "ABCD", "a"), 7, &cut);
  EXPECT_FALSE(cut);
}

// ---- files of rows ----

class PrefFiles : public ::testing::Test {
 protected:
  std::string write(const std::string& name, const std::string& text) {
    const std::string p = dir_.file(name);
    file_write(p, text);
    return p;
  }
  TempDir dir_;
  const ChatTemplate& t_ = chat_template_by_name("empty");
  const TemplateTokenizer tok_ = testing::fake_tokenizer(t_);
};

TEST_F(PrefFiles, BadRowsThrowOrAreSkippedAndCounted) {
  const std::string p = write("d.jsonl",
                              "{\"instruction\": \"a\", \"chosen\": \"b\", \"rejected\": \"cd\"}\n"
                              "{\"instruction\": \"a\", \"chosen\": \"b\"}\n"
                              "{\"instruction\": \"abcdef\", \"chosen\": \"gh\", \"rejected\": \"i\"}\n"
                              "{\"instruction\": \"abcdefghijkl\", \"chosen\": \"g\", \"rejected\": \"hi\"}\n");
  SftOptions o;
  o.cutoff_len = 4;
  EXPECT_TRUE(contains(invalid_argument_message([&] { pair_dataset_load(p, tok_, t_, o); }),
                       p + ":2: no \"rejected\""));
  o.skip_bad = true;
  o.train_on_prompt = true;  // ignored for pairs, as by LLaMA-Factory's PairwiseDatasetProcessor
  SftReport r;
  const std::vector<PairSample> pairs = pair_dataset_load(p, tok_, t_, o, &r);
  ASSERT_EQ(pairs.size(), 2u);
  EXPECT_EQ(r.formatting, Formatting::alpaca);
  EXPECT_EQ(r.rows_read, 4);
  EXPECT_EQ(r.samples, 2);
  EXPECT_EQ(r.skipped, 2);
  EXPECT_EQ(r.truncated, 1);
  EXPECT_EQ(pairs[0].chosen.labels, (std::vector<int32_t>{I, 'b'}));
  // infer_seqlen(6, 2, 4) = (3, 1): "abc" + "g" and "abc" + "i".
  EXPECT_EQ(pairs[1].chosen.input_ids, bytes("abcg"));
  EXPECT_EQ(pairs[1].rejected.input_ids, bytes("abci"));
  EXPECT_EQ(r.tokens, 2 + 3 + 4 + 4);
  EXPECT_EQ(r.target_tokens, 1 + 2 + 1 + 1);
  ASSERT_EQ(r.first_bad.size(), 2u);
  // infer_seqlen(12, 2, 4): int(4 * 2 / 14) = 0 answer tokens left (the longer answer counts).
  EXPECT_TRUE(contains(r.first_bad[1], p + ":4: no target token left after cutoff_len 4")) << r.first_bad[1];
}

TEST_F(PrefFiles, EachStageRefusesTheOthersRowsWhateverSkipBadSays) {
  const std::string pairs = write("p.json", R"([{"instruction": "a", "chosen": "b", "rejected": "c"}])");
  const std::string sft = write("s.json", R"([{"instruction": "a", "output": "b"}])");
  SftOptions o;
  o.skip_bad = true;
  std::string m = invalid_argument_message([&] { sft_dataset_load(pairs, tok_, t_, o); });
  EXPECT_TRUE(contains(m, pairs + " row 1: a preference row") && contains(m, "set train.stage = dpo")) << m;
  o.formatting = Formatting::alpaca;  // an explicit formatting does not change it
  EXPECT_TRUE(contains(invalid_argument_message([&] { sft_dataset_load(pairs, tok_, t_, o); }), "train.stage = dpo"));
  m = invalid_argument_message([&] { pair_dataset_load(sft, tok_, t_, o); });
  EXPECT_TRUE(contains(m, sft + " row 1: train.stage = dpo needs preference rows") &&
              contains(m, "{instruction, output}"))
      << m;
  o.formatting = Formatting::text;
  EXPECT_TRUE(contains(invalid_argument_message([&] { pair_dataset_load(pairs, tok_, t_, o); }),
                       "formatting text has no preference pairs"));
}

// ---- rows and the pair file ----

PairSample sample_pair(std::vector<int32_t> prompt, std::vector<int32_t> chosen, std::vector<int32_t> rejected) {
  PairSample p;
  for (auto [answer, side] : {std::pair{&chosen, &p.chosen}, std::pair{&rejected, &p.rejected}}) {
    side->input_ids = cat({prompt, *answer});
    side->labels = cat({std::vector<int32_t>(prompt.size(), I), *answer});
  }
  return p;
}

TEST(PrefRows, PaddedToTheLongestSequenceOfEitherSide) {
  const std::vector<PairSample> pairs = {sample_pair({5, 6}, {7}, {8, 9, 10}), sample_pair({11}, {12, 13, 14, 15}, {16})};
  PackReport report;
  const PairRows rows = rows_pad_pairs(pairs, 1, &report);
  ASSERT_EQ(rows.chosen.seq_len, 5);
  ASSERT_EQ(rows.rejected.seq_len, 5);
  EXPECT_EQ(rows.chosen.rows, 2);
  EXPECT_EQ(rows.chosen.input_ids, (std::vector<int32_t>{5, 6, 7, 1, 1, 11, 12, 13, 14, 15}));
  EXPECT_EQ(rows.chosen.labels, (std::vector<int32_t>{I, I, 7, I, I, I, 12, 13, 14, 15}));
  EXPECT_EQ(rows.rejected.input_ids, (std::vector<int32_t>{5, 6, 8, 9, 10, 11, 16, 1, 1, 1}));
  EXPECT_EQ(rows.rejected.labels, (std::vector<int32_t>{I, I, 8, 9, 10, I, 16, I, I, I}));
  EXPECT_TRUE(rows.chosen.position_ids.empty());
  EXPECT_EQ(report.samples, 2);
  EXPECT_EQ(report.tokens, 3 + 5 + 5 + 2);
  EXPECT_EQ(report.padding, 20 - 15);
  PairSample broken = pairs[0];
  broken.rejected.labels.pop_back();
  EXPECT_TRUE(contains(invalid_argument_message([&] { rows_pad_pairs({pairs[1], broken}, 1); }),
                       "rows_pad_pairs (rejected): sample 1"));
}

// Pairs 0..2 of 6 tokens in vocabulary 50: pair r = prompt {r+2, 3}, chosen {10+r ...}.
PairRows three_pairs() {
  return rows_pad_pairs({sample_pair({2, 3}, {10, 11}, {20, 21, 22, 23}),
                         sample_pair({3, 3}, {12, 13, 14}, {24}),
                         sample_pair({4, 3}, {15}, {25, 26})},
                        0);
}

std::vector<int64_t> values(const at::Tensor& t) {
  return std::vector<int64_t>(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + t.numel());
}

TEST(PrefFile, WriteThenReadChosenRowsThenRejectedRows) {
  TempDir dir;
  const std::string path = dir.file("pairs.h5");
  const PairRows rows = three_pairs();
  pair_rows_write(path, rows, 50, 0, {{"template", "empty"}});
  EXPECT_EQ(std::vector<std::string>{"pairs.h5"},
            [&] { std::vector<std::string> n; for (auto& e : fs::directory_iterator(dir.path())) n.push_back(e.path().filename()); return n; }());
  {
    const io::H5File f = io::H5File::open_read(path);
    EXPECT_EQ(f.attr_string("/", "format"), "qlora_dist.pairs");
    EXPECT_EQ(f.attr_string("/", "template"), "empty");
    EXPECT_EQ(f.attr_int64("/", "vocab_size"), 50);
    EXPECT_EQ(f.shape("rejected_labels"), (std::vector<int64_t>{3, 6}));
    EXPECT_FALSE(f.has("input_ids"));
  }
  const PairDataset data(path, 1024, 64);
  EXPECT_EQ(data.rows(), 3);
  EXPECT_EQ(data.seq_len(), 6);
  EXPECT_EQ(data.vocab_size(), 50);
  EXPECT_EQ(data.pad_token_id(), 0);
  at::Tensor ids, labels;
  data.read({2, 0}, ids, labels);
  ASSERT_EQ(ids.sizes(), (std::vector<int64_t>{4, 6}));
  EXPECT_EQ(ids.scalar_type(), at::kLong);
  EXPECT_EQ(values(ids), (std::vector<int64_t>{4, 3, 15, 0, 0, 0,  2, 3, 10, 11, 0, 0,
                                               4, 3, 25, 26, 0, 0,  2, 3, 20, 21, 22, 23}));
  EXPECT_EQ(values(labels), (std::vector<int64_t>{I, I, 15, I, I, I,  I, I, 10, 11, I, I,
                                                  I, I, 25, 26, I, I,  I, I, 20, 21, 22, 23}));
  // cutoff_len cuts every row; an id beyond the model's vocabulary is found when read.
  const PairDataset cut(path, 3, 64);
  cut.read({1}, ids, labels);
  EXPECT_EQ(values(ids), (std::vector<int64_t>{3, 3, 12, 3, 3, 24}));
  EXPECT_TRUE(contains(invalid_argument_message([&] { data.read({3}, ids, labels); }),
                       "pair 3 is outside [0, 3) (the file has 3 pairs)"));
  // The writer never overwrites, and checks what the readers will check.
  EXPECT_TRUE(contains(invalid_argument_message([&] { pair_rows_write(path, rows, 50, 0); }),
                       "exists; token files are never overwritten"));
  PairRows bad = rows;
  bad.rejected.labels[1 * 6 + 2] = 77;
  std::string m = invalid_argument_message([&] { pair_rows_write(dir.file("bad.h5"), bad, 50, 0); });
  EXPECT_TRUE(contains(m, "rejected_labels row 1, column 2: token id 77 is outside [0, 50)")) << m;
  bad = rows;
  bad.rejected.rows = 2;
  EXPECT_TRUE(contains(invalid_argument_message([&] { pair_rows_write(dir.file("bad.h5"), bad, 50, 0); }),
                       "expected the same shape"));
  EXPECT_FALSE(fs::exists(dir.file("bad.h5")));
}

TEST(PrefFile, EachReaderRefusesTheOtherKindNamingTheStage) {
  TempDir dir;
  const std::string pairs = dir.file("pairs.h5"), tokens = dir.file("tokens.h5");
  pair_rows_write(pairs, three_pairs(), 50, 0);
  token_rows_write(tokens, three_pairs().chosen, 50, 0);
  std::string m = invalid_argument_message([&] { TokenDataset(pairs, 1024, 64); });
  EXPECT_EQ(m.rfind(pairs + ": a preference-pair file", 0), 0u) << m;
  EXPECT_TRUE(contains(m, "for train.stage = dpo") && m.find('\n') == std::string::npos) << m;
  m = invalid_argument_message([&] { PairDataset(tokens, 1024, 64); });
  EXPECT_EQ(m.rfind(tokens + ": a token file", 0), 0u) << m;
  EXPECT_TRUE(contains(m, "for train.stage = sft") && contains(m, "train.stage = dpo")) << m;
}

TEST(PrefFile, MalformedPairFilesAreOneLineNamingTheDataset) {
  TempDir dir;
  const PairRows rows = three_pairs();
  auto write = [&](const std::string& name, bool with_rejected_labels, int64_t rejected_rows,
                   int64_t vocab = 50) {
    const std::string path = dir.file(name);
    io::H5File f = io::H5File::create(path);
    f.write_int32_2d("chosen_input_ids", rows.chosen.input_ids.data(), 3, 6);
    f.write_int32_2d("chosen_labels", rows.chosen.labels.data(), 3, 6);
    f.write_int32_2d("rejected_input_ids", rows.rejected.input_ids.data(), rejected_rows, 6);
    if (with_rejected_labels) f.write_int32_2d("rejected_labels", rows.rejected.labels.data(), 3, 6);
    f.set_attr_int64("/", "vocab_size", vocab);
    f.set_attr_int64("/", "pad_token_id", 0);
    f.close();
    return path;
  };
  const std::string missing = write("missing.h5", false, 3);
  std::string m = invalid_argument_message([&] { PairDataset(missing, 1024, 64); });
  EXPECT_TRUE(contains(m, missing + ": no dataset 'rejected_labels'")) << m;
  const std::string shape = write("shape.h5", true, 2);
  m = invalid_argument_message([&] { PairDataset(shape, 1024, 64); });
  EXPECT_TRUE(contains(m, "'rejected_input_ids' [2, 6]") && contains(m, "expected the same shape")) << m;
  EXPECT_TRUE(contains(invalid_argument_message([&] { PairDataset(write("ok.h5", true, 3), 1024, 40); }),
                       "vocab_size 50 is larger than the model's vocabulary 40"));
  // A file (not ours: its ids exceed its own vocab_size 20) read for a model of 25 ids: pair 1
  // fits (ids up to 24), pair 2's rejected 25 does not, found when read.
  const PairDataset small(write("small.h5", true, 3, 20), 1024, 25);
  at::Tensor ids, labels;
  small.read({1}, ids, labels);
  m = invalid_argument_message([&] { small.read({1, 2}, ids, labels); });
  EXPECT_TRUE(contains(m, dir.file("small.h5") + ": rejected_input_ids row 2, column 2: token id 25 "
                       "is outside the model's vocabulary [0, 25)")) << m;
}

TEST(PrefPrepare, PackingIsRefusedBeforeAnythingIsRead) {
  PrepareOptions o;
  o.pairwise = true;
  o.packing = true;
  o.model_dir = "/nonexistent";
  o.dataset = {"/nonexistent.json"};
  const std::string m = invalid_argument_message([&] { prepare_write(o, "/tmp/never.h5", ""); });
  EXPECT_TRUE(contains(m, "data.packing does not apply to train.stage = dpo")) << m;
  PrepareOptions sft = o;
  sft.pairwise = false;
  sft.packing = false;
  EXPECT_NE(prepare_key(o), prepare_key(sft));
  o.packing = false;
  EXPECT_NE(prepare_key(o), prepare_key(sft));  // pairwise alone changes the key
}

}  // namespace
}  // namespace qlora::data
