// Token datasets: checks an HDF5 file of input_ids / labels int32 [rows, seq_len] once when opened,
// then reads the rows a rank asks for one hyperslab each, cut to cutoff_len and range-checked
// against the model's vocabulary. synth-data writes such a file: prompt, separator, answer, end.
#include "io/atomic_write.h"
#include "data/dataset.h"
#include "io/shape_str.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

#include "io/h5_file.h"

namespace qlora::data {
namespace {

namespace fs = std::filesystem;

constexpr int32_t kIgnoreLabel = -100;  // no loss at this position (PyTorch's ignore_index)
constexpr int32_t kPadToken = 0;
constexpr int32_t kEndToken = 1;
constexpr int32_t kSeparatorToken = 2;
constexpr int32_t kFirstPromptToken = 3;  // prompt tokens are uniform in [3, vocab)

// H5File reports everything about the file as std::runtime_error; for a dataset the user named,
// all of it is the user's to fix, so callers get std::invalid_argument with the same text.
template <typename F>
auto as_user_error(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const std::invalid_argument&) {
    throw;
  } catch (const std::runtime_error& e) {
    throw std::invalid_argument(e.what());
  }
}


// splitmix64 (Steele, Lea, Flood 2014): one 64-bit step of a tiny, well-mixed generator.
uint64_t splitmix64_next(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Row r's generator depends on (seed, r) only, so a row's tokens do not change with --rows.
uint64_t synth_row_state(uint64_t seed, int64_t row) {
  uint64_t s = seed;
  uint64_t t = splitmix64_next(s) ^ static_cast<uint64_t>(row);
  return splitmix64_next(t);
}

// Uniform in [lo, hi) by multiply-shift (Lemire); the bias is below (hi - lo) / 2^64.
int32_t uniform_int(uint64_t& state, int64_t lo, int64_t hi) {
  const unsigned __int128 x = splitmix64_next(state);
  const auto range = static_cast<unsigned __int128>(hi - lo);
  return static_cast<int32_t>(lo + static_cast<int64_t>((x * range) >> 64));
}

std::string synth_task_name(SynthTask task) {
  if (task == SynthTask::copy) return "copy";
  if (task == SynthTask::reverse) return "reverse";
  if (task == SynthTask::sort) return "sort";
  throw std::invalid_argument("synth-data: unknown task value " +
                              std::to_string(static_cast<int>(task)) +
                              " (expected copy, reverse or sort)");
}

// One row: ids and labels [seq_len]; see the layout in dataset.h.
void synth_row(const SynthOptions& o, int64_t row, int32_t* ids, int32_t* labels) {
  const int64_t L = (o.seq_len - 2) / 2;
  uint64_t state = synth_row_state(o.seed, row);
  std::fill(ids, ids + o.seq_len, kPadToken);
  std::fill(labels, labels + o.seq_len, kIgnoreLabel);
  for (int64_t i = 0; i < L; ++i) ids[i] = uniform_int(state, kFirstPromptToken, o.vocab);
  ids[L] = kSeparatorToken;
  int32_t* answer = ids + L + 1;  // [L]
  std::copy(ids, ids + L, answer);
  if (o.task == SynthTask::reverse) {
    std::reverse(answer, answer + L);
  } else if (o.task == SynthTask::sort) {
    std::sort(answer, answer + L);
  } else if (o.task != SynthTask::copy) {
    throw std::invalid_argument("synth-data: unknown task value " +
                                std::to_string(static_cast<int>(o.task)) +
                                " (expected copy, reverse or sort)");
  }
  ids[2 * L + 1] = kEndToken;
  std::copy(answer, answer + L + 1, labels + L + 1);  // the answer and the end token
}

void synth_options_check(const SynthOptions& o) {
  if (o.out.empty())
    throw std::invalid_argument("synth-data: empty output path (expected --out FILE)");
  const std::string& who = o.out;
  if (o.vocab < 4 || o.vocab > std::numeric_limits<int32_t>::max())
    throw std::invalid_argument(who + ": vocab " + std::to_string(o.vocab) +
                                " is out of range (expected 4 to 2147483647: ids 0-2 are pad, "
                                "end and separator, and ids are stored as int32)");
  if (o.seq_len < 4)
    throw std::invalid_argument(who + ": seq_len " + std::to_string(o.seq_len) +
                                " is too short (expected 4 or more: a prompt, the separator, an "
                                "answer and the end token)");
  if (o.rows < 1)
    throw std::invalid_argument(who + ": rows " + std::to_string(o.rows) +
                                " (expected 1 or more)");
  if (o.rows > std::numeric_limits<int64_t>::max() / o.seq_len / 8)
    throw std::invalid_argument(who + ": rows " + std::to_string(o.rows) + " x seq_len " +
                                std::to_string(o.seq_len) + " is too many tokens to hold");
  if (o.seed > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
    throw std::invalid_argument(who + ": seed " + std::to_string(o.seed) +
                                " does not fit the int64 'seed' attribute (expected 0 to " +
                                std::to_string(std::numeric_limits<int64_t>::max()) + ")");
  (void)synth_task_name(o.task);
}

}  // namespace

// ---- TokenDataset ----

TokenDataset::TokenDataset(const std::string& path, int64_t cutoff_len, int64_t model_vocab)
    : path_(path), model_vocab_(model_vocab) {
  if (cutoff_len < 2)
    throw std::invalid_argument(path + ": cutoff_len " + std::to_string(cutoff_len) +
                                " is too short (expected 2 or more: the model predicts token t+1 "
                                "from token t)");
  if (model_vocab < 1)
    throw std::invalid_argument(path + ": model vocabulary " + std::to_string(model_vocab) +
                                " (expected 1 or more)");
  file_ = std::make_unique<io::H5File>(as_user_error([&] { return io::H5File::open_read(path); }));
  const io::H5File& f = *file_;

  for (const char* name : {"input_ids", "labels"})
    if (!f.has(name))
      throw std::invalid_argument(path + ": no dataset '" + name +
                                  "' (expected 'input_ids' and 'labels', int32 [rows, seq_len])");
  const std::vector<int64_t> ids_shape = as_user_error([&] { return f.shape("input_ids"); });
  const std::vector<int64_t> labels_shape = as_user_error([&] { return f.shape("labels"); });
  const std::string both = "'input_ids' " + io::shape_str(ids_shape) + ", 'labels' " +
                           io::shape_str(labels_shape);
  if (ids_shape.size() != 2 || labels_shape.size() != 2)
    throw std::invalid_argument(path + ": " + both + " (expected both 2-D [rows, seq_len])");
  if (ids_shape != labels_shape)
    throw std::invalid_argument(path + ": " + both + " (expected the same shape)");
  if (ids_shape[0] < 1)
    throw std::invalid_argument(path + ": " + both + " (expected 1 row or more)");
  if (ids_shape[1] < 2)
    throw std::invalid_argument(path + ": " + both + " (expected seq_len 2 or more)");
  rows_ = ids_shape[0];
  file_seq_len_ = ids_shape[1];
  seq_len_ = std::min(file_seq_len_, cutoff_len);
  // Reading zero rows checks the element type (integers only) without reading any data.
  for (const char* name : {"input_ids", "labels"})
    as_user_error([&] { f.read_int32_rows(name, 0, 0, nullptr); });
  has_position_ids_ = f.has("position_ids");
  if (has_position_ids_) {
    const std::vector<int64_t> pos_shape = as_user_error([&] { return f.shape("position_ids"); });
    if (pos_shape != ids_shape)
      throw std::invalid_argument(path + ": 'position_ids' " + io::shape_str(pos_shape) +
                                  ", 'input_ids' " + io::shape_str(ids_shape) +
                                  " (expected the same shape)");
    as_user_error([&] { f.read_int32_rows("position_ids", 0, 0, nullptr); });
  }

  for (const char* name : {"vocab_size", "pad_token_id"})
    if (!as_user_error([&] { return f.has_attr("/", name); }))
      throw std::invalid_argument(path + ": no attribute '" + name +
                                  "' on the root group (expected integer attributes vocab_size "
                                  "and pad_token_id)");
  vocab_size_ = as_user_error([&] { return f.attr_int64("/", "vocab_size"); });
  pad_token_id_ = as_user_error([&] { return f.attr_int64("/", "pad_token_id"); });
  if (vocab_size_ < 1)
    throw std::invalid_argument(path + ": vocab_size " + std::to_string(vocab_size_) +
                                " (expected 1 or more)");
  if (pad_token_id_ < 0 || pad_token_id_ >= vocab_size_)
    throw std::invalid_argument(path + ": pad_token_id " + std::to_string(pad_token_id_) +
                                " is outside [0, " + std::to_string(vocab_size_) +
                                ") (vocab_size " + std::to_string(vocab_size_) + ")");
  if (vocab_size_ > model_vocab_)
    throw std::invalid_argument(path + ": vocab_size " + std::to_string(vocab_size_) +
                                " is larger than the model's vocabulary " +
                                std::to_string(model_vocab_));
}

TokenDataset::~TokenDataset() = default;
TokenDataset::TokenDataset(TokenDataset&&) noexcept = default;

void TokenDataset::read(const std::vector<int64_t>& rows, at::Tensor& input_ids,
                        at::Tensor& labels, at::Tensor* position_ids) const {
  const auto n = static_cast<int64_t>(rows.size());
  input_ids = at::empty({n, seq_len_}, at::TensorOptions().dtype(at::kLong));  // [n, seq_len]
  labels = at::empty({n, seq_len_}, at::TensorOptions().dtype(at::kLong));     // [n, seq_len]
  int64_t* ids_out = input_ids.data_ptr<int64_t>();
  int64_t* labels_out = labels.data_ptr<int64_t>();
  std::vector<int32_t> buffer(static_cast<size_t>(file_seq_len_));  // one row, uncut

  const auto vocab_text = "[0, " + std::to_string(model_vocab_) + ")";
  // One row of an int32 dataset, cut to seq_len_, into out; `bad(v)` says what is wrong with a
  // value ("" when nothing), and the message names file, dataset, row and column.
  auto read_row = [&](const char* name, int64_t row, int64_t* out, auto&& bad) {
    as_user_error([&] { file_->read_int32_rows(name, row, 1, buffer.data()); });
    for (int64_t c = 0; c < seq_len_; ++c) {
      const int64_t v = buffer[static_cast<size_t>(c)];
      if (const std::string why = bad(v); !why.empty())
        throw std::invalid_argument(path_ + ": " + name + " row " + std::to_string(row) +
                                    ", column " + std::to_string(c) + ": " + why);
      out[c] = v;
    }
  };
  at::Tensor positions;
  int64_t* pos_out = nullptr;
  if (position_ids && has_position_ids_) {
    positions = at::empty({n, seq_len_}, at::TensorOptions().dtype(at::kLong));  // [n, seq_len]
    pos_out = positions.data_ptr<int64_t>();
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t row = rows[static_cast<size_t>(i)];
    if (row < 0 || row >= rows_)
      throw std::invalid_argument(path_ + ": row " + std::to_string(row) + " is outside [0, " +
                                  std::to_string(rows_) + ") (the file has " +
                                  std::to_string(rows_) + " rows)");
    read_row("input_ids", row, ids_out + i * seq_len_, [&](int64_t id) {
      return id < 0 || id >= model_vocab_ ? "token id " + std::to_string(id) +
                                                " is outside the model's vocabulary " + vocab_text
                                          : std::string();
    });
    read_row("labels", row, labels_out + i * seq_len_, [&](int64_t label) {
      return label != kIgnoreLabel && (label < 0 || label >= model_vocab_)
                 ? "token id " + std::to_string(label) + " is outside the model's vocabulary " +
                       vocab_text + " and is not -100 (no loss)"
                 : std::string();
    });
    if (pos_out)
      read_row("position_ids", row, pos_out + i * seq_len_, [&](int64_t p) {
        return p < 0 || p >= file_seq_len_
                   ? "position " + std::to_string(p) + " is outside [0, " +
                         std::to_string(file_seq_len_) + ") (the row length)"
                   : std::string();
      });
  }
  if (position_ids) *position_ids = positions;
}

size_t TokenDataset::bytes_read() const { return file_->bytes_read(); }

// ---- synth-data ----

SynthTask synth_task_from_name(const std::string& name) {
  if (name == "copy") return SynthTask::copy;
  if (name == "reverse") return SynthTask::reverse;
  if (name == "sort") return SynthTask::sort;
  throw std::invalid_argument("unknown task '" + name + "' (expected copy, reverse or sort)");
}

void synth_data_write(const SynthOptions& options) {
  synth_options_check(options);
  const fs::path out(options.out);
  const std::string name = out.filename().string();
  if (name.empty() || name == "." || name == "..")
    throw std::invalid_argument(options.out + ": not a file name (expected e.g. data/train.h5)");
  std::error_code ec;
  if (fs::exists(fs::symlink_status(out, ec)))
    throw std::invalid_argument(options.out + ": exists; synth-data never overwrites");
  const fs::path dir = out.has_parent_path() ? out.parent_path() : fs::path(".");
  if (!fs::is_directory(dir, ec))
    throw std::invalid_argument(options.out + ": directory '" + dir.string() +
                                "' does not exist (create it first)");

  const auto numel = static_cast<size_t>(options.rows * options.seq_len);
  std::vector<int32_t> ids(numel);     // [rows, seq_len]
  std::vector<int32_t> labels(numel);  // [rows, seq_len]
  for (int64_t r = 0; r < options.rows; ++r)
    synth_row(options, r, ids.data() + r * options.seq_len, labels.data() + r * options.seq_len);

  // A hidden sibling, renamed when complete: a reader never sees half a file under `out`.
  io::commit_atomic(out, /*directory=*/false, [&](const fs::path& tmp) {
    io::H5File file = io::H5File::create(tmp.string());
    file.write_int32_2d("input_ids", ids.data(), options.rows, options.seq_len);
    file.write_int32_2d("labels", labels.data(), options.rows, options.seq_len);
    file.set_attr_int64("/", "vocab_size", options.vocab);
    file.set_attr_int64("/", "pad_token_id", kPadToken);
    file.set_attr_string("/", "task", synth_task_name(options.task));
    file.set_attr_int64("/", "seed", static_cast<int64_t>(options.seed));
    file.set_attr_string("/", "format", "qlora_dist.tokens");
    file.close();
    // Checked again: rename() would replace a file that appeared while we were writing.
    std::error_code ec;
    if (fs::exists(fs::symlink_status(out, ec)))
      throw std::invalid_argument(options.out + ": exists; synth-data never overwrites");
  });
}

}  // namespace qlora::data
