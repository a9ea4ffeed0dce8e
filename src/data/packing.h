// From tokenized samples to fixed-width token rows, and rows to our HDF5 token file:
//   rows_pad:  one sample per row, right-padded to the longest sample;
//   rows_pack: LLaMA-Factory 0.9.5's packing (PackedSupervisedDatasetProcessor + greedy_knapsack):
//              samples into rows of cutoff_len tokens, at most cutoff_len - 1 of them sample
//              tokens; with `neat`, position ids restart at 0 for every sample (the model then
//              attends within each sample only: a segment starts where the position id is 0).
//   rows_pad_pairs: preference pairs, chosen and rejected rows right-padded to one length.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "data/sample.h"

namespace qlora::data {

struct TokenRows {
  int64_t rows = 0, seq_len = 0;
  std::vector<int32_t> input_ids;     // [rows, seq_len]
  std::vector<int32_t> labels;        // [rows, seq_len], kIgnoreLabel where no loss
  std::vector<int32_t> position_ids;  // [rows, seq_len] with neat packing, else empty
};

struct PackReport {
  int64_t samples = 0;          // given
  int64_t samples_dropped = 0;  // longer than a row can hold (LLaMA-Factory drops them too)
  int64_t rows = 0;
  int64_t tokens = 0;   // sample tokens placed in rows
  int64_t padding = 0;  // rows * seq_len - tokens
  double efficiency() const {  // share of the row slots that hold sample tokens
    return rows > 0 ? static_cast<double>(tokens) / static_cast<double>(tokens + padding) : 0.0;
  }
};

// LLaMA-Factory's preprocessing_batch_size default: it packs each group of this many samples
// (datasets.map(batched=True)) on its own, so a row never mixes samples of two groups.
inline constexpr int64_t kPackGroupSamples = 1000;

// One sample per row, in order, right-padded to the longest sample (ids pad_token_id, labels
// kIgnoreLabel). No samples: a TokenRows with 0 rows. A sample whose input_ids and labels differ
// in length is std::invalid_argument naming its index.
TokenRows rows_pad(const std::vector<Sample>& samples, int32_t pad_token_id,
                   PackReport* report = nullptr);

// Preference pairs as rows: pair i is row i of `chosen` and row i of `rejected`, both padded
// (ids pad_token_id, labels kIgnoreLabel) to one seq_len, the longest sequence of either side.
struct PairRows {
  TokenRows chosen, rejected;  // [pairs, seq_len] each, no position ids
};
// report: samples = pairs, rows = pairs, tokens / padding over both sides (2 x pairs x seq_len
// slots). A side whose ids and labels differ in length is std::invalid_argument naming the pair.
PairRows rows_pad_pairs(const std::vector<PairSample>& pairs, int32_t pad_token_id,
                        PackReport* report = nullptr);

// LLaMA-Factory 0.9.5 packing with `cutoff_len` its user-facing value (it subtracts one when
// packing): per group of `group_samples` samples in order, samples longer than cutoff_len - 1 are
// dropped, the rest go into bins of capacity cutoff_len - 1 by greedy_knapsack (ascending
// lengths; each bin takes repeatedly the longest sample that still fits; among samples of one
// length the last one first), each bin's samples are concatenated in the order the bin took them
// and padded with pad_token_id / kIgnoreLabel to cutoff_len (at least one pad per row).
// neat: position_ids = 0..len-1 per sample and 0 on padding (LLaMA-Factory's, which its
// collator leaves as they are); otherwise no position ids (one causal sequence per row).
TokenRows rows_pack(const std::vector<Sample>& samples, int64_t cutoff_len, bool neat,
                    int32_t pad_token_id, PackReport* report = nullptr,
                    int64_t group_samples = kPackGroupSamples);

// LLaMA-Factory 0.9.5's PretrainDatasetProcessor with packing: per group of `group_samples`
// documents (samples), their tokens concatenated and cut into rows of `block_size` tokens (the
// group's remainder dropped); labels as the documents' (every token for text); with `bos`, each
// row's first token (and label) replaced by it. No padding, no position ids. report: samples =
// documents, tokens = rows * block_size.
TokenRows rows_chunk(const std::vector<Sample>& samples, int64_t block_size,
                     std::optional<int32_t> bos, PackReport* report = nullptr,
                     int64_t group_samples = kPackGroupSamples);

// The bins greedy_knapsack forms from `lengths` (sample indices, in the order each bin takes
// them) for a capacity; every length must be <= capacity. Exposed for tests.
std::vector<std::vector<int64_t>> greedy_knapsack_bins(const std::vector<int64_t>& lengths,
                                                       int64_t capacity);

// Writes the rows as our token file (see dataset.h): input_ids, labels int32 [rows, seq_len],
// position_ids int32 [rows, seq_len] when the rows have them, root attributes vocab_size,
// pad_token_id (int64), format = "qlora_dist.tokens" and every entry of `string_attrs` (source
// files, template, tokenizer hash, ...). Checks ids (in [0, vocab_size)), labels (those or -100)
// and position ids (in [0, seq_len)) first; written to a hidden sibling and renamed, so a reader
// never sees half a file. An existing `path` is an error, never overwritten. Errors a user can
// cause are std::invalid_argument naming the path.
void token_rows_write(const std::string& path, const TokenRows& rows, int64_t vocab_size,
                      int64_t pad_token_id,
                      const std::map<std::string, std::string>& string_attrs = {});

// Writes preference pairs as our pair file (see PairDataset in dataset.h): chosen_input_ids,
// chosen_labels, rejected_input_ids, rejected_labels int32 [pairs, seq_len], root attributes
// vocab_size, pad_token_id (int64), format = "qlora_dist.pairs" and `string_attrs`. The same
// checks, atomic write and refusal of an existing path as token_rows_write; both sides must have
// the same rows and seq_len and no position ids.
void pair_rows_write(const std::string& path, const PairRows& pairs, int64_t vocab_size,
                     int64_t pad_token_id,
                     const std::map<std::string, std::string>& string_attrs = {});

}  // namespace qlora::data
