// A user's JSON / JSON Lines dataset turned into tokenized samples as LLaMA-Factory 0.9.5 does:
// rows in alpaca, sharegpt, OpenAI-messages or plain-text form, its converters (data/converter.py),
// SupervisedDatasetProcessor (prompt masking, mask_history, efficient_eos, cutoff_len shared by
// infer_seqlen) and the non-packing PretrainDatasetProcessor for text; a seeded train/val split.
// Preference rows (train.stage = dpo; LLaMA-Factory's ranking datasets) go through the same
// converters' pairwise branches and PairwiseDatasetProcessor into PairSamples.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "data/chat_template.h"
#include "data/sample.h"

namespace qlora::data {

// How rows are read. automatic looks at the first row's keys, first match wins:
//   "conversations" -> sharegpt, "messages" -> openai, "instruction", "output" or "chosen" ->
//   alpaca, "text" -> text; anything else is an error naming the keys found.
enum class Formatting { automatic, alpaca, sharegpt, openai, text };
Formatting formatting_from_name(const std::string& name);  // "auto", "alpaca", ... else throws
const char* formatting_name(Formatting formatting);

struct SftOptions {
  Formatting formatting = Formatting::automatic;
  int64_t cutoff_len = 2048;           // LLaMA-Factory's default
  bool train_on_prompt = false;        // labels on the prompt too (not with efficient_eos)
  bool mask_history = false;           // labels on the last answer only (not with train_on_prompt)
  std::optional<int64_t> max_samples;  // read only the first N rows of the file
  bool skip_bad = false;               // false: the first bad row throws; true: skip and count
};

struct SftReport {
  Formatting formatting = Formatting::automatic;  // the one used (auto resolved)
  int64_t rows_read = 0;
  int64_t samples = 0;
  int64_t skipped = 0;        // bad rows (skip_bad)
  int64_t truncated = 0;      // samples shortened by cutoff_len
  int64_t tokens = 0;         // sum of sample lengths
  int64_t target_tokens = 0;  // labels != kIgnoreLabel
  std::vector<std::string> first_bad;  // "FILE:LINE: reason" of the first kMaxBadListed
  static constexpr size_t kMaxBadListed = 5;
};

// One row of the file and where it is: "PATH:LINE" (JSON Lines) or "PATH row N" (a JSON array,
// N from 1).
struct JsonRow {
  nlohmann::json value;
  std::string where;
};

// Rows of a JSON array file or a JSON Lines file (blank lines skipped); told apart by the first
// character that is not white space. max_rows < 0: all. One-line std::invalid_argument for an
// empty file, text that is not JSON (the line of a JSON Lines error, the byte offset of an array
// error, counted from 1 up to where the parser stopped), a top level that is neither, or a row
// that is not an object.
std::vector<JsonRow> read_json_rows(const std::string& path, int64_t max_rows = -1);

Formatting detect_formatting(const JsonRow& first_row);

// A row as LLaMA-Factory's converters leave it: messages alternate user|observation and
// assistant|function, end with an assistant message; system may be empty (the template's
// default then applies). For text rows, messages holds one user message with the document.
struct Conversation {
  std::vector<Message> messages;
  std::string system;
};

// The row in `formatting` (not automatic), or the reason it is bad ("instruction and input are
// both empty", "message 3: role 'gpt' where user/observation is expected", ...).
struct ConvertResult {
  std::optional<Conversation> conversation;
  std::string bad_reason;
};
ConvertResult convert_row(const nlohmann::json& row, Formatting formatting);

// A preference row as LLaMA-Factory's converters leave a ranking example: the shared prompt
// (messages alternating user|observation and assistant, ending with user|observation) and the
// two assistant answers.
struct PairConversation {
  std::vector<Message> prompt;
  std::string chosen, rejected;
  std::string system;
};

// The preference row in `formatting` (alpaca, sharegpt or openai), or why it is bad:
//   alpaca: instruction, input, system, history as for SFT, and "chosen" / "rejected" strings;
//   sharegpt: "conversations" with an odd number of turns (the last from human/observation) and
//     "chosen" / "rejected" objects {"from": "gpt", "value": ...};
//   openai: the same with "messages" and {"role": "assistant", "content": ...}.
// Missing, empty or non-string answers, and answers of another role, are bad rows.
struct PairConvertResult {
  std::optional<PairConversation> pair;
  std::string bad_reason;
};
PairConvertResult convert_pair_row(const nlohmann::json& row, Formatting formatting);

// Whether a row is a preference row: it has both "chosen" and "rejected" keys.
bool is_pair_row(const nlohmann::json& row);

// LLaMA-Factory's infer_seqlen: how many of source_len / target_len tokens fit in cutoff_len.
std::pair<int64_t, int64_t> infer_seqlen(int64_t source_len, int64_t target_len, int64_t cutoff_len);

// SupervisedDatasetProcessor._encode_data_example. *truncated: whether cutoff_len cut anything.
Sample sft_encode_conversation(const TemplateTokenizer& tokenizer, const ChatTemplate& chat_template,
                               const Conversation& conversation, const SftOptions& options,
                               bool* truncated = nullptr);

// PretrainDatasetProcessor without packing: [BOS if add_bos_token] text EOS, cut to cutoff_len,
// every token labelled. EOS is the template-fixed tokenizer's, written as text ("<|end_of_text|>"
// for the llama3 template), as LLaMA-Factory does.
Sample pretrain_encode_text(const TemplateTokenizer& tokenizer, const ChatTemplate& chat_template,
                            const std::string& text, const SftOptions& options,
                            bool* truncated = nullptr);

// PairwiseDatasetProcessor._encode_data_example: prompt + chosen and prompt + rejected through
// the template (encode_oneturn: every message but the last is the prompt), EOS appended to both
// answers with efficient_eos, infer_seqlen(prompt length, the longer answer's length,
// cutoff_len) cutting the prompt and both answers to the same lengths; labels kIgnoreLabel on the
// prompt, the answer ids after it. As in LLaMA-Factory, train_on_prompt and mask_history do not
// apply: the loss is on the last answer only. *truncated: whether cutoff_len cut anything.
PairSample pair_encode_conversation(const TemplateTokenizer& tokenizer,
                                    const ChatTemplate& chat_template,
                                    const PairConversation& pair, int64_t cutoff_len,
                                    bool* truncated = nullptr);

// The whole file: rows -> samples in file order. A bad row, or one with no target token left
// after cutoff_len, is std::invalid_argument "WHERE: reason" unless options.skip_bad. A file
// whose first row is a preference row (chosen and rejected) is refused whatever skip_bad says:
// it is for train.stage = dpo (LLaMA-Factory refuses a ranking dataset outside its rm stage).
std::vector<Sample> sft_dataset_load(const std::string& path, const TemplateTokenizer& tokenizer,
                                     const ChatTemplate& chat_template, const SftOptions& options,
                                     SftReport* report = nullptr);

// The same for preference rows: rows -> pairs in file order (report: samples = pairs, tokens
// and target_tokens over both sides). The first row must be a preference row (else the file is
// refused: it is for train.stage = sft); formatting text is refused. A bad row, or a pair with no
// target token left on a side, is "WHERE: reason" unless options.skip_bad. train_on_prompt and
// mask_history are ignored, as LLaMA-Factory's PairwiseDatasetProcessor ignores them.
std::vector<PairSample> pair_dataset_load(const std::string& path,
                                          const TemplateTokenizer& tokenizer,
                                          const ChatTemplate& chat_template,
                                          const SftOptions& options, SftReport* report = nullptr);

// A seeded split of n samples, as LLaMA-Factory's split_dataset (datasets' train_test_split):
// val_size > 1 is a count, 0 < val_size <= 1 a fraction (ceil(val_size * n) samples). Indices
// come from our own generator (splitmix64 + Fisher-Yates), deterministic by seed on every
// platform, not numpy's indices. val = the first val count of a random permutation, train = the
// rest, both in permutation order (as datasets returns them).
struct TrainValSplit {
  std::vector<int64_t> train;
  std::vector<int64_t> val;
};
TrainValSplit split_train_val(int64_t n, double val_size, uint64_t seed);

}  // namespace qlora::data
