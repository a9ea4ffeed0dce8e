// Token datasets: checks an HDF5 file of input_ids / labels int32 [rows, seq_len] once when opened,
// then reads the rows a rank asks for one hyperslab each, cut to cutoff_len and range-checked
// against the model's vocabulary; preference-pair files (chosen_ / rejected_ input_ids and
// labels) the same way through the same checks. synth-data writes a token file: prompt,
// separator, answer, end.
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
#include <tuple>
#include <utility>
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
  // Both arrays are built in memory before the file is written: bound the tokens, not only
  // the int64 product (2^40 rows would otherwise end as std::bad_alloc, naming nothing).
  constexpr int64_t kMaxTokens = int64_t{1} << 30;  // 8 GiB of ids and labels
  int64_t tokens = 0;
  if (__builtin_mul_overflow(o.rows, o.seq_len, &tokens) || tokens > kMaxTokens)
    throw std::invalid_argument(who + ": rows " + std::to_string(o.rows) + " x seq_len " +
                                std::to_string(o.seq_len) +
                                " is too many tokens to hold (expected at most " +
                                std::to_string(kMaxTokens) + ")");
  if (o.seed > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
    throw std::invalid_argument(who + ": seed " + std::to_string(o.seed) +
                                " does not fit the int64 'seed' attribute (expected 0 to " +
                                std::to_string(std::numeric_limits<int64_t>::max()) + ")");
  (void)synth_task_name(o.task);
}

}  // namespace

// ---- checks and row reads shared by TokenDataset and PairDataset ----

namespace {

void open_args_check(const std::string& path, int64_t cutoff_len, int64_t model_vocab) {
  if (cutoff_len < 2)
    throw std::invalid_argument(path + ": cutoff_len " + std::to_string(cutoff_len) +
                                " is too short (expected 2 or more: the model predicts token t+1 "
                                "from token t)");
  if (model_vocab < 1)
    throw std::invalid_argument(path + ": model vocabulary " + std::to_string(model_vocab) +
                                " (expected 1 or more)");
}

// A token file where a pair file is expected, or the other way round: one line naming the file
// and the train.stage each is for. Told apart by the datasets, else by the format attribute.
void file_kind_check(const io::H5File& f, const std::string& path, bool want_pairs) {
  const std::string format = as_user_error([&] {
    return f.has_attr("/", "format") ? f.attr_string("/", "format") : std::string();
  });
  const bool pairs = f.has("chosen_input_ids") || format == "qlora_dist.pairs";
  const bool tokens = f.has("input_ids") || format == "qlora_dist.tokens";
  if (want_pairs && tokens && !f.has("chosen_input_ids"))
    throw std::invalid_argument(path + ": a token file (input_ids, labels) for train.stage = sft; "
                                "train.stage = dpo reads preference-pair files (chosen_input_ids, "
                                "chosen_labels, rejected_input_ids, rejected_labels), which "
                                "`qlora_dist prep` writes with train.stage = dpo");
  if (!want_pairs && pairs && !f.has("input_ids"))
    throw std::invalid_argument(path + ": a preference-pair file (chosen_/rejected_ input_ids and "
                                "labels) for train.stage = dpo; train.stage = sft reads token files "
                                "(input_ids, labels): set train.stage = dpo or give a token file");
}

// The datasets `names` (input ids and labels of each side): present, 2-D, one shape of 1 row or
// more of 2 tokens or more, integer. Returns the shape.
std::vector<int64_t> rows_shape_check(const io::H5File& f, const std::string& path,
                                      const std::vector<std::string>& names, const char* what) {
  std::string listed;
  for (const std::string& n : names) listed += (listed.empty() ? "'" : "', '") + n;
  listed += "'";
  for (const std::string& n : names)
    if (!f.has(n))
      throw std::invalid_argument(path + ": no dataset '" + n + "' (expected " + listed +
                                  ", int32 [" + what + ", seq_len])");
  std::vector<std::vector<int64_t>> shapes;
  std::string all;
  for (const std::string& n : names) {
    shapes.push_back(as_user_error([&] { return f.shape(n); }));
    all += (all.empty() ? "'" : ", '") + n + "' " + io::shape_str(shapes.back());
  }
  const std::vector<int64_t>& shape = shapes.front();
  for (const auto& sh : shapes)
    if (sh.size() != 2)
      throw std::invalid_argument(path + ": " + all + " (expected " + (names.size() == 2 ? "both" : "all") +
                                  " 2-D [" + what + ", seq_len])");
  for (const auto& sh : shapes)
    if (sh != shape) throw std::invalid_argument(path + ": " + all + " (expected the same shape)");
  if (shape[0] < 1)
    throw std::invalid_argument(path + ": " + all + " (expected 1 " + (names.size() == 2 ? "row" : "pair") + " or more)");
  if (shape[1] < 2)
    throw std::invalid_argument(path + ": " + all + " (expected seq_len 2 or more)");
  // Reading zero rows checks the element type (integers only) without reading any data.
  for (const std::string& n : names) as_user_error([&] { f.read_int32_rows(n, 0, 0, nullptr); });
  return shape;
}

// The root attributes vocab_size and pad_token_id, checked against each other and the model.
std::pair<int64_t, int64_t> vocab_attrs_check(const io::H5File& f, const std::string& path,
                                              int64_t model_vocab) {
  for (const char* name : {"vocab_size", "pad_token_id"})
    if (!as_user_error([&] { return f.has_attr("/", name); }))
      throw std::invalid_argument(path + ": no attribute '" + name +
                                  "' on the root group (expected integer attributes vocab_size "
                                  "and pad_token_id)");
  const int64_t vocab_size = as_user_error([&] { return f.attr_int64("/", "vocab_size"); });
  const int64_t pad_token_id = as_user_error([&] { return f.attr_int64("/", "pad_token_id"); });
  if (vocab_size < 1)
    throw std::invalid_argument(path + ": vocab_size " + std::to_string(vocab_size) +
                                " (expected 1 or more)");
  if (pad_token_id < 0 || pad_token_id >= vocab_size)
    throw std::invalid_argument(path + ": pad_token_id " + std::to_string(pad_token_id) +
                                " is outside [0, " + std::to_string(vocab_size) +
                                ") (vocab_size " + std::to_string(vocab_size) + ")");
  if (vocab_size > model_vocab)
    throw std::invalid_argument(path + ": vocab_size " + std::to_string(vocab_size) +
                                " is larger than the model's vocabulary " +
                                std::to_string(model_vocab));
  return {vocab_size, pad_token_id};
}

// Reads rows of a checked file: one row of an int32 dataset at a time, only its first seq_len
// columns (a file's seq_len is only bounded by HDF5: a few bytes on disk can claim 2^35 columns
// that are never written; cutoff_len bounds what is read), each value checked; an error names
// file, dataset, row and column.
class RowReader {
 public:
  RowReader(const io::H5File& file, const std::string& path, int64_t seq_len, int64_t model_vocab)
      : file_(file), path_(path), seq_len_(seq_len), model_vocab_(model_vocab),
        buffer_(static_cast<size_t>(seq_len)),
        vocab_text_("[0, " + std::to_string(model_vocab) + ")") {}

  // `bad(v)` says what is wrong with a value ("" when nothing).
  template <typename Bad>
  void row(const std::string& name, int64_t row, int64_t* out, Bad&& bad) {
    as_user_error([&] { file_.read_int32_rows(name, row, 1, buffer_.data(), seq_len_); });
    for (int64_t c = 0; c < seq_len_; ++c) {
      const int64_t v = buffer_[static_cast<size_t>(c)];
      if (const std::string why = bad(v); !why.empty())
        throw std::invalid_argument(path_ + ": " + name + " row " + std::to_string(row) +
                                    ", column " + std::to_string(c) + ": " + why);
      out[c] = v;
    }
  }
  void ids(const std::string& name, int64_t row, int64_t* out) {
    this->row(name, row, out, [&](int64_t id) {
      return id < 0 || id >= model_vocab_ ? "token id " + std::to_string(id) +
                                                " is outside the model's vocabulary " + vocab_text_
                                          : std::string();
    });
  }
  void labels(const std::string& name, int64_t row, int64_t* out) {
    this->row(name, row, out, [&](int64_t label) {
      return label != kIgnoreLabel && (label < 0 || label >= model_vocab_)
                 ? "token id " + std::to_string(label) + " is outside the model's vocabulary " +
                       vocab_text_ + " and is not -100 (no loss)"
                 : std::string();
    });
  }

 private:
  const io::H5File& file_;
  const std::string& path_;
  int64_t seq_len_, model_vocab_;
  std::vector<int32_t> buffer_;  // one row, cut to seq_len
  std::string vocab_text_;
};

void row_index_check(const std::string& path, int64_t row, int64_t rows, const char* what) {
  if (row < 0 || row >= rows)
    throw std::invalid_argument(path + ": " + what + " " + std::to_string(row) + " is outside [0, " +
                                std::to_string(rows) + ") (the file has " + std::to_string(rows) +
                                " " + what + "s)");
}

}  // namespace

// ---- TokenDataset ----

TokenDataset::TokenDataset(const std::string& path, int64_t cutoff_len, int64_t model_vocab)
    : path_(path), model_vocab_(model_vocab) {
  open_args_check(path, cutoff_len, model_vocab);
  file_ = std::make_unique<io::H5File>(as_user_error([&] { return io::H5File::open_read(path); }));
  const io::H5File& f = *file_;
  file_kind_check(f, path, /*want_pairs=*/false);
  const std::vector<int64_t> ids_shape = rows_shape_check(f, path, {"input_ids", "labels"}, "rows");
  rows_ = ids_shape[0];
  file_seq_len_ = ids_shape[1];
  seq_len_ = std::min(file_seq_len_, cutoff_len);
  has_position_ids_ = f.has("position_ids");
  if (has_position_ids_) {
    const std::vector<int64_t> pos_shape = as_user_error([&] { return f.shape("position_ids"); });
    if (pos_shape != ids_shape)
      throw std::invalid_argument(path + ": 'position_ids' " + io::shape_str(pos_shape) +
                                  ", 'input_ids' " + io::shape_str(ids_shape) +
                                  " (expected the same shape)");
    as_user_error([&] { f.read_int32_rows("position_ids", 0, 0, nullptr); });
  }
  std::tie(vocab_size_, pad_token_id_) = vocab_attrs_check(f, path, model_vocab_);
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
  RowReader reader(*file_, path_, seq_len_, model_vocab_);
  at::Tensor positions;
  int64_t* pos_out = nullptr;
  if (position_ids && has_position_ids_) {
    positions = at::empty({n, seq_len_}, at::TensorOptions().dtype(at::kLong));  // [n, seq_len]
    pos_out = positions.data_ptr<int64_t>();
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t row = rows[static_cast<size_t>(i)];
    row_index_check(path_, row, rows_, "row");
    reader.ids("input_ids", row, ids_out + i * seq_len_);
    reader.labels("labels", row, labels_out + i * seq_len_);
    if (pos_out)
      reader.row("position_ids", row, pos_out + i * seq_len_, [&](int64_t p) {
        return p < 0 || p >= file_seq_len_
                   ? "position " + std::to_string(p) + " is outside [0, " +
                         std::to_string(file_seq_len_) + ") (the row length)"
                   : std::string();
      });
  }
  if (position_ids) *position_ids = positions;
}

size_t TokenDataset::bytes_read() const { return file_->bytes_read(); }

// ---- PairDataset ----

PairDataset::PairDataset(const std::string& path, int64_t cutoff_len, int64_t model_vocab)
    : path_(path), model_vocab_(model_vocab) {
  open_args_check(path, cutoff_len, model_vocab);
  file_ = std::make_unique<io::H5File>(as_user_error([&] { return io::H5File::open_read(path); }));
  const io::H5File& f = *file_;
  file_kind_check(f, path, /*want_pairs=*/true);
  const std::vector<int64_t> shape = rows_shape_check(
      f, path, {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"},
      "pairs");
  rows_ = shape[0];
  file_seq_len_ = shape[1];
  seq_len_ = std::min(file_seq_len_, cutoff_len);
  std::tie(vocab_size_, pad_token_id_) = vocab_attrs_check(f, path, model_vocab_);
}

PairDataset::~PairDataset() = default;
PairDataset::PairDataset(PairDataset&&) noexcept = default;

void PairDataset::read(const std::vector<int64_t>& pairs, at::Tensor& input_ids,
                       at::Tensor& labels) const {
  const auto n = static_cast<int64_t>(pairs.size());
  input_ids = at::empty({2 * n, seq_len_}, at::TensorOptions().dtype(at::kLong));  // [2n, seq_len]
  labels = at::empty({2 * n, seq_len_}, at::TensorOptions().dtype(at::kLong));     // [2n, seq_len]
  int64_t* ids_out = input_ids.data_ptr<int64_t>();
  int64_t* labels_out = labels.data_ptr<int64_t>();
  RowReader reader(*file_, path_, seq_len_, model_vocab_);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t pair = pairs[static_cast<size_t>(i)];
    row_index_check(path_, pair, rows_, "pair");
    for (const auto& [side, out_row] : {std::pair{"chosen_", i}, std::pair{"rejected_", n + i}}) {
      reader.ids(std::string(side) + "input_ids", pair, ids_out + out_row * seq_len_);
      reader.labels(std::string(side) + "labels", pair, labels_out + out_row * seq_len_);
    }
  }
}

size_t PairDataset::bytes_read() const { return file_->bytes_read(); }

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
