// Token datasets in HDF5: `input_ids` and `labels`, int32 [rows, seq_len] (labels -100 where no
// loss), optionally `position_ids` int32 [rows, seq_len] (neat packing: positions restart at 0 for
// every sample of a row), attributes `vocab_size` and `pad_token_id`. A rank reads only the rows
// it trains on (one hyperslab per row). Rows longer than cutoff_len are cut to cutoff_len.
// Preference-pair files (train.stage = dpo) hold `chosen_input_ids`, `chosen_labels`,
// `rejected_input_ids`, `rejected_labels` of one shape instead (PairDataset).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace qlora::io {
class H5File;
}

namespace qlora::data {

class TokenDataset {
 public:
  // Opens and checks the file: both datasets present, 2-D, the same shape, integer (and so
  // position_ids when the file has them); vocab_size
  // and pad_token_id attributes present and sane; throws std::invalid_argument naming the file
  // and what is wrong. `model_vocab`: token ids must be < it (checked per row when read).
  TokenDataset(const std::string& path, int64_t cutoff_len, int64_t model_vocab);
  ~TokenDataset();
  TokenDataset(TokenDataset&&) noexcept;

  int64_t rows() const { return rows_; }
  int64_t seq_len() const { return seq_len_; }  // after the cutoff
  int64_t vocab_size() const { return vocab_size_; }
  int64_t pad_token_id() const { return pad_token_id_; }
  const std::string& path() const { return path_; }
  bool has_position_ids() const { return has_position_ids_; }

  // The given rows as int64 tensors [rows.size(), seq_len]: input ids and labels. An id outside
  // [0, model_vocab) or a label outside it other than -100 is std::invalid_argument naming the
  // file, the row, the column and the value. With `position_ids` given: the rows' position ids
  // [rows.size(), seq_len] int64 when the file has them (each in [0, file seq_len), else
  // std::invalid_argument as above), an undefined tensor when it has none.
  void read(const std::vector<int64_t>& rows, at::Tensor& input_ids, at::Tensor& labels,
            at::Tensor* position_ids = nullptr) const;
  size_t bytes_read() const;

 private:

  std::unique_ptr<io::H5File> file_;
  std::string path_;
  int64_t rows_ = 0, file_seq_len_ = 0, seq_len_ = 0, vocab_size_ = 0, pad_token_id_ = 0;
  int64_t model_vocab_ = 0;
  bool has_position_ids_ = false;
};

// Preference pairs (train.stage = dpo) in HDF5, as `qlora_dist prep` writes them with
// train.stage = dpo: chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels,
// int32 [pairs, seq_len] (labels -100 on the prompt and the padding), attributes vocab_size and
// pad_token_id (format = "qlora_dist.pairs"). Pair i is row i of the four datasets. Checked and
// read as TokenDataset does; rows longer than cutoff_len are cut to cutoff_len. A token file
// (input_ids / labels, for train.stage = sft) is refused with one line saying so, as
// TokenDataset refuses a pair file.
class PairDataset {
 public:
  // Opens and checks the file: the four datasets present, 2-D, one shape, integer; vocab_size
  // and pad_token_id present and sane; std::invalid_argument naming the file and what is wrong.
  // `model_vocab`: token ids must be < it (checked per row when read).
  PairDataset(const std::string& path, int64_t cutoff_len, int64_t model_vocab);
  ~PairDataset();
  PairDataset(PairDataset&&) noexcept;

  int64_t rows() const { return rows_; }        // pairs
  int64_t seq_len() const { return seq_len_; }  // after the cutoff
  int64_t vocab_size() const { return vocab_size_; }
  int64_t pad_token_id() const { return pad_token_id_; }
  const std::string& path() const { return path_; }

  // The given pairs as int64 tensors [2 * pairs.size(), seq_len]: rows 0..n-1 the chosen
  // sequences of pairs[0..n-1], rows n..2n-1 the rejected sequences of the same pairs in the
  // same order. Ids and labels are checked as TokenDataset::read checks them; an error names
  // the file, the dataset (chosen_... / rejected_...), the pair and the column.
  void read(const std::vector<int64_t>& pairs, at::Tensor& input_ids, at::Tensor& labels) const;
  size_t bytes_read() const;

 private:
  std::unique_ptr<io::H5File> file_;
  std::string path_;
  int64_t rows_ = 0, file_seq_len_ = 0, seq_len_ = 0, vocab_size_ = 0, pad_token_id_ = 0;
  int64_t model_vocab_ = 0;
};

enum class SynthTask { copy, reverse, sort };
SynthTask synth_task_from_name(const std::string& name);  // throws naming the valid ones

// A synthetic instruction-style dataset a LoRA on a random base measurably learns. Each row:
//   [prompt: L tokens uniform in [3, vocab)] [separator 2] [answer: L tokens] [end 1] [pad 0 ...]
// with L = (seq_len - 2) / 2 and the answer the prompt copied, reversed or sorted; labels = the
// input ids on the answer and the end token, -100 elsewhere (the model shifts them). Attributes
// vocab_size = vocab, pad_token_id = 0, task, seed. Deterministic by seed. Written beside the
// target and renamed; an existing file is an error, never overwritten.
struct SynthOptions {
  std::string out;
  int64_t vocab = 0;
  int64_t seq_len = 0;
  int64_t rows = 0;
  SynthTask task = SynthTask::copy;
  uint64_t seed = 0;
};
void synth_data_write(const SynthOptions& options);

}  // namespace qlora::data
