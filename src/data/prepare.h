// From a user's JSON datasets to our token HDF5 files: tokenizer.json and tokenizer_config.json
// of the model directory, a chat template, the dataset format, LLaMA-Factory's supervised (or
// pre-training) processing, an optional seeded validation split, padding or packing, and the
// files written atomically with attributes naming their sources. With `pairwise` (train.stage =
// dpo): preference rows, LLaMA-Factory's pairwise processing, padded pairs, pair files. Used by `qlora_dist prep` and
// by `qlora_dist train` with data.dataset (rank 0 prepares, the other ranks wait).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace qlora::data {

struct PrepareOptions {
  std::vector<std::string> dataset;       // JSON / JSONL files to train on
  std::vector<std::string> eval_dataset;  // JSON / JSONL files to evaluate on (may be empty)
  std::string model_dir;                  // tokenizer.json, tokenizer_config.json
  std::string template_name;              // "" only with formatting text
  std::string formatting = "auto";        // auto | alpaca | sharegpt | openai | text
  int64_t cutoff_len = 1024;
  bool train_on_prompt = false;
  bool mask_history = false;
  bool packing = false;
  bool neat_packing = false;
  int64_t max_samples = 0;  // per file; 0 = all
  double val_size = 0.0;    // < 1 fraction, >= 1 count; 0 = none
  uint64_t seed = 42;
  bool skip_bad = false;
  bool pairwise = false;  // train.stage = dpo: preference pairs (chosen / rejected answers)
};

// What one written file holds. For a pair file: samples = rows = pairs, tokens and
// target_tokens over both sides, packing_efficiency = tokens / (2 * rows * seq_len).
struct PrepareCounts {
  int64_t rows_read = 0;   // dataset rows read
  int64_t samples = 0;     // samples kept
  int64_t skipped = 0;     // bad rows skipped (dataset_skip_bad)
  int64_t truncated = 0;   // samples cut to cutoff_len
  int64_t rows = 0;        // rows of the written file
  int64_t seq_len = 0;     // its row length
  int64_t tokens = 0;      // non-padding tokens
  int64_t target_tokens = 0;  // tokens with a label
  double packing_efficiency = 0.0;  // tokens / (rows * seq_len)
};

struct PrepareReport {
  PrepareCounts train, eval;
  bool has_eval = false;
  bool pairs = false;  // the files are pair files (options.pairwise)
  std::vector<std::string> skipped_rows;  // "FILE:LINE: reason" of the first skipped rows
  std::string summary() const;            // the lines `prep` prints
};

// A key (16 hex digits) of everything the written files depend on: the tokenizer files' bytes,
// each dataset file's path, size and modification time, and the options (pairwise included).
// Equal keys = the files can be re-used.
std::string prepare_key(const PrepareOptions& options);

// Tokenizes and writes `train_out` (and `eval_out` when there is evaluation data: eval_dataset
// or val_size; "" otherwise). An existing output file is an error, never overwritten. Throws
// std::invalid_argument naming file, line and reason for bad input. With options.pairwise both
// files are pair files (PairDataset in dataset.h; the val_size split takes whole pairs) and
// packing is refused.
PrepareReport prepare_write(const PrepareOptions& options, const std::string& train_out,
                            const std::string& eval_out);

}  // namespace qlora::data
