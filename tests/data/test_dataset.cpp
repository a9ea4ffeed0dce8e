// Token datasets and synth-data: the synthetic rows' structure for every task (prompt, separator,
// answer, end, pad, the label mask), determinism by seed and per row; TokenDataset reading rows in
// any order with the cutoff and the vocabulary checks; and every file a user can get wrong, each a
// one-line std::invalid_argument naming the file and what is wrong. Files of types H5File never
// writes (float, int64) are made with the raw HDF5 API.
#include <gtest/gtest.h>
#include <hdf5.h>

#include <ATen/ATen.h>

#include <signal.h>
#include <sys/resource.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "expect_error.h"
#include "io/h5_file.h"
#include "io/h5_raw.h"
#include "io/temp_dir.h"
#include "data/dataset.h"
#include "io/atomic_write.h"

namespace qlora::data {
namespace {

namespace fs = std::filesystem;
using io::H5File;
using io::testing::file_read;
using io::testing::file_write;
using io::testing::TempDir;
using qlora::testing::contains;

// The std::invalid_argument message of `f`: one line, starting with `path`, naming every one of
// `parts`; HDF5 must print nothing on stderr on the way.
std::string expect_user_error(const std::function<void()>& f, const std::string& path,
                              const std::vector<std::string>& parts) {
  ::testing::internal::CaptureStderr();
  const std::string message = qlora::testing::invalid_argument_message(f);
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(err, "") << "printed on stderr for: " << message;
  EXPECT_EQ(message.rfind(path + ": ", 0), 0u) << "message: " << message;
  EXPECT_EQ(message.find('\n'), std::string::npos) << "message: " << message;
  for (const std::string& part : parts)
    EXPECT_TRUE(contains(message, part)) << "expected '" << part << "' in: " << message;
  return message;
}

// A token file as a user (or h5py) would write it; each piece can be left out or changed.
struct TokenFile {
  int64_t rows = 5, cols = 7;
  std::vector<int32_t> ids, labels;              // [rows, cols] each
  int64_t labels_rows = -1, labels_cols = -1;    // -1: the same as input_ids
  bool with_ids = true, with_labels = true;
  bool with_vocab = true, with_pad = true;
  int64_t vocab_size = 100, pad_token_id = 0;

  // ids[r][c] = 3 + (r * 31 + c * 7) % 97; labels the ids on odd columns, -100 elsewhere.
  TokenFile() { fill(); }
  void fill() {
    ids.resize(static_cast<size_t>(rows * cols));
    labels.resize(ids.size());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const auto i = static_cast<size_t>(r * cols + c);
        ids[i] = static_cast<int32_t>(3 + (r * 31 + c * 7) % 97);
        labels[i] = c % 2 == 1 ? ids[i] : -100;
      }
  }
  void write(const std::string& path) const {
    H5File f = H5File::create(path);
    if (with_ids) f.write_int32_2d("input_ids", ids.data(), rows, cols);
    if (with_labels) {
      const int64_t lr = labels_rows < 0 ? rows : labels_rows;
      const int64_t lc = labels_cols < 0 ? cols : labels_cols;
      std::vector<int32_t> l(static_cast<size_t>(lr * lc), -100);
      std::copy_n(labels.begin(), std::min(l.size(), labels.size()), l.begin());
      f.write_int32_2d("labels", l.data(), lr, lc);
    }
    if (with_vocab) f.set_attr_int64("/", "vocab_size", vocab_size);
    if (with_pad) f.set_attr_int64("/", "pad_token_id", pad_token_id);
    f.close();
  }
};

// ---- raw HDF5, for what H5File never writes ----

using qlora::io::testing::raw_dataset;

void raw_attr(hid_t file, const char* name, hid_t file_type, hid_t mem_type, const void* value) {
  const hid_t scalar = H5Screate(H5S_SCALAR);
  const hid_t a = H5Acreate2(file, name, file_type, scalar, H5P_DEFAULT, H5P_DEFAULT);
  ASSERT_GE(a, 0) << name;
  ASSERT_GE(H5Awrite(a, mem_type, value), 0) << name;
  H5Aclose(a);
  H5Sclose(scalar);
}

// input_ids and labels [2, 3] of `type` (values from `ids` / `labels` as int64), int64 attributes
// vocab_size 100 and pad_token_id 0 unless `float_vocab` (then vocab_size is float64 100.0).
void write_raw_tokens(const std::string& path, hid_t file_type, hid_t mem_type,
                      const void* ids, const void* labels, bool float_vocab = false) {
  const hid_t file = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  ASSERT_GE(file, 0);
  raw_dataset(file, "input_ids", file_type, mem_type, {2, 3}, ids);
  raw_dataset(file, "labels", file_type, mem_type, {2, 3}, labels);
  const int64_t vocab = 100, pad = 0;
  const double vocab_f = 100;
  if (float_vocab)
    raw_attr(file, "vocab_size", H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, &vocab_f);
  else
    raw_attr(file, "vocab_size", H5T_STD_I64LE, H5T_NATIVE_INT64, &vocab);
  raw_attr(file, "pad_token_id", H5T_STD_I64LE, H5T_NATIVE_INT64, &pad);
  ASSERT_GE(H5Fclose(file), 0);
}

std::vector<int64_t> tensor_values(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

// ---- synth-data ----

SynthOptions synth_options(const std::string& out, SynthTask task, int64_t vocab,
                           int64_t seq_len, int64_t rows, uint64_t seed) {
  SynthOptions o;
  o.out = out;
  o.task = task;
  o.vocab = vocab;
  o.seq_len = seq_len;
  o.rows = rows;
  o.seed = seed;
  return o;
}

// All rows of a file through our reader: ids and labels [rows, seq_len], row-major.
void read_all(const std::string& path, int64_t model_vocab, std::vector<int64_t>& ids,
              std::vector<int64_t>& labels) {
  TokenDataset data(path, 1 << 20, model_vocab);
  std::vector<int64_t> rows(static_cast<size_t>(data.rows()));
  for (size_t r = 0; r < rows.size(); ++r) rows[r] = static_cast<int64_t>(r);
  at::Tensor t_ids, t_labels;
  data.read(rows, t_ids, t_labels);
  ids = tensor_values(t_ids);
  labels = tensor_values(t_labels);
}

TEST(SynthData, RowsHaveThePromptSeparatorAnswerEndPadLayout) {
  TempDir dir;
  const std::vector<SynthTask> tasks = {SynthTask::copy, SynthTask::reverse, SynthTask::sort};
  const std::vector<std::string> task_names = {"copy", "reverse", "sort"};
  for (size_t t = 0; t < tasks.size(); ++t) {
    for (const int64_t seq_len : {4, 5, 11, 16}) {
      for (const int64_t vocab : {4, 7, 50000}) {
        const std::string params = "task " + task_names[t] + ", seq_len " +
                                   std::to_string(seq_len) + ", vocab " + std::to_string(vocab);
        const std::string path = dir.file(task_names[t] + "_" + std::to_string(seq_len) + "_" +
                                          std::to_string(vocab) + ".h5");
        const int64_t rows = 13;
        synth_data_write(synth_options(path, tasks[t], vocab, seq_len, rows, 42));

        const H5File f = H5File::open_read(path);
        EXPECT_EQ(f.shape("input_ids"), (std::vector<int64_t>{rows, seq_len})) << params;
        EXPECT_EQ(f.attr_int64("/", "vocab_size"), vocab) << params;
        EXPECT_EQ(f.attr_int64("/", "pad_token_id"), 0) << params;
        EXPECT_EQ(f.attr_string("/", "task"), task_names[t]) << params;
        EXPECT_EQ(f.attr_int64("/", "seed"), 42) << params;
        EXPECT_EQ(f.attr_string("/", "format"), "qlora_dist.tokens") << params;

        std::vector<int64_t> ids, labels;
        read_all(path, vocab, ids, labels);
        const int64_t L = (seq_len - 2) / 2;
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t* row = ids.data() + r * seq_len;
          const int64_t* lab = labels.data() + r * seq_len;
          const std::string where = params + ", row " + std::to_string(r);
          std::vector<int64_t> prompt(row, row + L);
          for (const int64_t p : prompt) {
            EXPECT_GE(p, 3) << where;
            EXPECT_LT(p, vocab) << where;
          }
          EXPECT_EQ(row[L], 2) << where;
          std::vector<int64_t> expected = prompt;
          if (tasks[t] == SynthTask::reverse) std::reverse(expected.begin(), expected.end());
          if (tasks[t] == SynthTask::sort) std::sort(expected.begin(), expected.end());
          EXPECT_EQ(std::vector<int64_t>(row + L + 1, row + 2 * L + 1), expected) << where;
          EXPECT_EQ(row[2 * L + 1], 1) << where;
          for (int64_t c = 2 * L + 2; c < seq_len; ++c)
            EXPECT_EQ(row[c], 0) << where << " col " << c;
          for (int64_t c = 0; c < seq_len; ++c) {
            const bool scored = c >= L + 1 && c <= 2 * L + 1;  // the answer and the end token
            EXPECT_EQ(lab[c], scored ? row[c] : -100) << where << ", column " << c;
          }
        }
      }
    }
  }
}

TEST(SynthData, PromptTokensCoverTheirRangeAndNothingElse) {
  TempDir dir;
  const std::string path = dir.file("cover.h5");
  synth_data_write(synth_options(path, SynthTask::copy, 9, 21, 40, 7));
  std::vector<int64_t> ids, labels;
  read_all(path, 9, ids, labels);
  std::set<int64_t> seen;
  for (int64_t r = 0; r < 40; ++r)
    for (int64_t c = 0; c < 9; ++c) seen.insert(ids[static_cast<size_t>(r * 21 + c)]);
  EXPECT_EQ(seen, (std::set<int64_t>{3, 4, 5, 6, 7, 8}));
}

TEST(SynthData, DeterministicBySeedAndPerRow) {
  TempDir dir;
  const auto write_read = [&](const std::string& name, int64_t rows, uint64_t seed,
                              std::vector<int64_t>& ids) {
    std::vector<int64_t> labels;
    synth_data_write(synth_options(dir.file(name), SynthTask::reverse, 1000, 9, rows, seed));
    read_all(dir.file(name), 1000, ids, labels);
  };
  std::vector<int64_t> a, b, few, other;
  write_read("a.h5", 11, 5, a);
  write_read("b.h5", 11, 5, b);
  EXPECT_EQ(a, b);
  EXPECT_EQ(file_read(dir.file("a.h5")).size(), file_read(dir.file("b.h5")).size());
  // Row r depends on (seed, r) only: the first 3 of 11 rows are the 3 rows of a 3-row file.
  write_read("few.h5", 3, 5, few);
  EXPECT_EQ(few, std::vector<int64_t>(a.begin(), a.begin() + 3 * 9));
  write_read("other.h5", 11, 6, other);
  EXPECT_NE(a, other);
  // Rows differ from each other too.
  EXPECT_NE(std::vector<int64_t>(a.begin(), a.begin() + 9),
            std::vector<int64_t>(a.begin() + 9, a.begin() + 18));
}

TEST(SynthData, TaskNames) {
  EXPECT_EQ(synth_task_from_name("copy"), SynthTask::copy);
  EXPECT_EQ(synth_task_from_name("reverse"), SynthTask::reverse);
  EXPECT_EQ(synth_task_from_name("sort"), SynthTask::sort);
  const std::string message =
      qlora::testing::invalid_argument_message([] { synth_task_from_name("Copy"); });
  EXPECT_TRUE(contains(message, "'Copy'")) << message;
  EXPECT_TRUE(contains(message, "copy, reverse or sort")) << message;
}

TEST(SynthData, BadOptionsAreOneLineErrors) {
  TempDir dir;
  const std::string out = dir.file("bad.h5");
  const auto fails = [&](const SynthOptions& o, const std::string& path,
                         const std::vector<std::string>& parts) {
    expect_user_error([&] { synth_data_write(o); }, path, parts);
    EXPECT_FALSE(fs::exists(o.out)) << o.out;
  };
  fails(synth_options(out, SynthTask::copy, 3, 8, 2, 0), out, {"vocab 3", "4 to 2147483647"});
  fails(synth_options(out, SynthTask::copy, int64_t{1} << 31, 8, 2, 0), out,
        {"vocab 2147483648", "4 to 2147483647"});
  fails(synth_options(out, SynthTask::copy, 10, 3, 2, 0), out, {"seq_len 3", "4 or more"});
  fails(synth_options(out, SynthTask::copy, 10, 8, 0, 0), out, {"rows 0", "1 or more"});
  fails(synth_options(out, SynthTask::copy, 10, 8, int64_t{1} << 60, 0), out, {"too many"});
  fails(synth_options(out, SynthTask::copy, 10, 8, 2, uint64_t{1} << 63), out, {"seed"});
  fails(synth_options(out, static_cast<SynthTask>(7), 10, 8, 2, 0), "synth-data", {"task", "7"});
  fails(synth_options("", SynthTask::copy, 10, 8, 2, 0), "synth-data", {"empty output path"});
  const std::string nodir = dir.file("no/such/dir/x.h5");
  fails(synth_options(nodir, SynthTask::copy, 10, 8, 2, 0), nodir, {"does not exist"});
  expect_user_error(
      [&] { synth_data_write(synth_options(dir.path() + "/", SynthTask::copy, 10, 8, 2, 0)); },
      dir.path() + "/", {"not a file name"});
  EXPECT_TRUE(fs::is_empty(dir.path()));
}

TEST(SynthData, NeverOverwritesAnExistingFile) {
  TempDir dir;
  const std::string out = dir.file("keep.h5");
  file_write(out, "precious bytes");
  expect_user_error([&] { synth_data_write(synth_options(out, SynthTask::sort, 10, 8, 2, 0)); },
                    out, {"exists; synth-data never overwrites"});
  EXPECT_EQ(file_read(out), "precious bytes");
  // A dangling symlink is there too.
  const std::string link = dir.file("link.h5");
  fs::create_symlink(dir.file("nowhere.h5"), link);
  expect_user_error([&] { synth_data_write(synth_options(link, SynthTask::sort, 10, 8, 2, 0)); },
                    link, {"exists"});
  EXPECT_FALSE(fs::exists(dir.file("nowhere.h5")));
  // A successful write leaves only its output.
  synth_data_write(synth_options(dir.file("new.h5"), SynthTask::copy, 10, 8, 2, 0));
  std::set<std::string> names;
  for (const auto& e : fs::directory_iterator(dir.path()))
    names.insert(e.path().filename().string());
  EXPECT_EQ(names, (std::set<std::string>{"keep.h5", "link.h5", "new.h5"}));
}

// Writes past RLIMIT_FSIZE fail (EFBIG, with SIGXFSZ ignored): a disk that fills mid-write.
class FileSizeLimit {
 public:
  explicit FileSizeLimit(rlim_t bytes) {
    old_handler_ = ::signal(SIGXFSZ, SIG_IGN);
    ::getrlimit(RLIMIT_FSIZE, &old_);
    rlimit lim = old_;
    lim.rlim_cur = bytes;
    ::setrlimit(RLIMIT_FSIZE, &lim);
  }
  ~FileSizeLimit() {
    ::setrlimit(RLIMIT_FSIZE, &old_);
    ::signal(SIGXFSZ, old_handler_);
  }

 private:
  rlimit old_{};
  sighandler_t old_handler_;
};

TEST(SynthData, FailedWriteLeavesNoTemporaryFile) {
  // The limit lands in the data, in the metadata HDF5 writes when it closes the file, and just
  // past a complete file. HDF5 1.10 used to crash at exit after its close failed (h5_file.cpp,
  // H5File::release): this binary would end with a segfault.
  TempDir dir;
  const std::string out = dir.file("big.h5");
  int threw = 0;
  for (rlim_t limit : {rlim_t{4096}, rlim_t{64 * 1024}, rlim_t{2 * 4000 * 64 * 4 - 4096},
                       rlim_t{2 * 4000 * 64 * 4 + 2048}, rlim_t{2 * 4000 * 64 * 4 + 6000}}) {
    ::testing::internal::CaptureStderr();
    try {
      FileSizeLimit fsize(limit);  // the file is 2 x 4000 x 64 x 4 bytes = 2 MB and metadata
      synth_data_write(synth_options(out, SynthTask::copy, 1000, 64, 4000, 1));
    } catch (const std::exception& e) {
      ++threw;
      EXPECT_TRUE(contains(e.what(), ".big.h5.tmp")) << limit << ": " << e.what();
    }
    EXPECT_EQ(::testing::internal::GetCapturedStderr(), "") << limit;
    if (fs::exists(out)) {  // only a complete file is ever renamed into place
      EXPECT_NO_THROW(TokenDataset(out, 512, 128)) << limit;
      fs::remove(out);
    }
    EXPECT_TRUE(fs::is_empty(dir.path())) << "left behind in " << dir.path() << " at " << limit;
  }
  EXPECT_GE(threw, 3);
  // A directory in the temporary file's place is not ours: the write fails and leaves it.
  const fs::path tmp = qlora::io::temp_sibling(out);
  fs::create_directory(tmp);
  EXPECT_ANY_THROW(synth_data_write(synth_options(out, SynthTask::copy, 10, 8, 2, 0)));
  EXPECT_TRUE(fs::is_directory(tmp));
  EXPECT_FALSE(fs::exists(out));
}

// ---- TokenDataset ----

TEST(TokenDataset, ReadsRowsInAnyOrder) {
  TempDir dir;
  const std::string path = dir.file("tokens.h5");
  TokenFile tf;
  tf.pad_token_id = 5;
  tf.write(path);
  TokenDataset data(path, 512, 128);
  EXPECT_EQ(data.rows(), 5);
  EXPECT_EQ(data.seq_len(), 7);
  EXPECT_EQ(data.vocab_size(), 100);
  EXPECT_EQ(data.pad_token_id(), 5);
  EXPECT_EQ(data.path(), path);
  EXPECT_EQ(data.bytes_read(), 0u);

  const std::vector<int64_t> rows = {4, 0, 4, 2};
  at::Tensor ids, labels;
  data.read(rows, ids, labels);
  EXPECT_EQ(ids.scalar_type(), at::kLong);
  EXPECT_EQ(labels.scalar_type(), at::kLong);
  EXPECT_EQ(ids.sizes().vec(), (std::vector<int64_t>{4, 7}));
  EXPECT_EQ(labels.sizes().vec(), (std::vector<int64_t>{4, 7}));
  const std::vector<int64_t> got_ids = tensor_values(ids), got_labels = tensor_values(labels);
  for (size_t i = 0; i < rows.size(); ++i)
    for (int64_t c = 0; c < 7; ++c) {
      const auto src = static_cast<size_t>(rows[i] * 7 + c);
      const auto dst = static_cast<size_t>(static_cast<int64_t>(i) * 7 + c);
      EXPECT_EQ(got_ids[dst], tf.ids[src]) << "row " << rows[i] << ", column " << c;
      EXPECT_EQ(got_labels[dst], tf.labels[src]) << "row " << rows[i] << ", column " << c;
    }
  // Each row is one hyperslab of each dataset, uncut: 4 rows x 2 datasets x 7 int32.
  EXPECT_EQ(data.bytes_read(), 4u * 2u * 7u * sizeof(int32_t));

  at::Tensor none_ids, none_labels;
  data.read({}, none_ids, none_labels);
  EXPECT_EQ(none_ids.sizes().vec(), (std::vector<int64_t>{0, 7}));

  // A moved dataset reads the same.
  TokenDataset moved(std::move(data));
  at::Tensor again_ids, again_labels;
  moved.read(rows, again_ids, again_labels);
  EXPECT_TRUE(at::equal(again_ids, ids));
  EXPECT_TRUE(at::equal(again_labels, labels));
}

TEST(TokenDataset, CutsRowsToCutoffLen) {
  TempDir dir;
  const std::string path = dir.file("tokens.h5");
  TokenFile tf;
  tf.ids[static_cast<size_t>(1 * 7 + 6)] = 5000;  // past the cutoff: never checked, never read
  tf.labels[static_cast<size_t>(1 * 7 + 5)] = 6000;
  tf.write(path);
  for (const int64_t cutoff : {2, 3, 5}) {
    TokenDataset data(path, cutoff, 128);
    EXPECT_EQ(data.seq_len(), cutoff);
    at::Tensor ids, labels;
    data.read({1, 3}, ids, labels);
    EXPECT_EQ(ids.sizes().vec(), (std::vector<int64_t>{2, cutoff}));
    const std::vector<int64_t> got = tensor_values(ids), got_labels = tensor_values(labels);
    for (int64_t c = 0; c < cutoff; ++c) {
      EXPECT_EQ(got[static_cast<size_t>(c)], tf.ids[static_cast<size_t>(7 + c)]) << cutoff;
      EXPECT_EQ(got[static_cast<size_t>(cutoff + c)], tf.ids[static_cast<size_t>(21 + c)]);
      EXPECT_EQ(got_labels[static_cast<size_t>(cutoff + c)],
                tf.labels[static_cast<size_t>(21 + c)]);
    }
  }
  EXPECT_EQ(TokenDataset(path, 1 << 20, 128).seq_len(), 7);
  for (const int64_t cutoff : {1, 0, -3})
    expect_user_error([&] { TokenDataset(path, cutoff, 128); }, path,
                      {"cutoff_len " + std::to_string(cutoff), "2 or more"});
}

TEST(TokenDataset, TokenIdsOutsideTheModelVocabularyNameRowColumnValue) {
  TempDir dir;
  const std::string path = dir.file("oov.h5");
  TokenFile tf;
  tf.rows = 20;
  tf.cols = 5;
  tf.vocab_size = 2048;
  tf.fill();
  tf.ids[static_cast<size_t>(17 * 5 + 3)] = 4096;
  tf.ids[static_cast<size_t>(11 * 5 + 0)] = -1;
  tf.labels[static_cast<size_t>(9 * 5 + 4)] = 2048;
  tf.labels[static_cast<size_t>(6 * 5 + 1)] = -1;
  tf.write(path);
  TokenDataset data(path, 512, 2048);
  at::Tensor ids, labels;
  const std::string message = expect_user_error([&] { data.read({0, 17}, ids, labels); }, path, {});
  EXPECT_EQ(message, path + ": input_ids row 17, column 3: token id 4096 is outside the model's "
                            "vocabulary [0, 2048)");
  expect_user_error([&] { data.read({11}, ids, labels); }, path,
                    {"input_ids row 11, column 0", "token id -1", "[0, 2048)"});
  expect_user_error([&] { data.read({9}, ids, labels); }, path,
                    {"labels row 9, column 4", "2048", "[0, 2048)", "-100"});
  expect_user_error([&] { data.read({6}, ids, labels); }, path,
                    {"labels row 6, column 1", "token id -1", "-100"});
  // -100 labels (every even column here) pass, and are kept as they are: no shift.
  data.read({0, 1, 19}, ids, labels);
  const std::vector<int64_t> got = tensor_values(labels);
  for (int64_t c = 0; c < 5; ++c)
    EXPECT_EQ(got[static_cast<size_t>(c)], c % 2 == 1 ? tf.ids[static_cast<size_t>(c)] : -100);
  // Ids are checked against the model's vocabulary, not the file's vocab_size.
  TokenDataset bigger(path, 512, 5000);
  bigger.read({17}, ids, labels);
  EXPECT_EQ(ids[0][3].item<int64_t>(), 4096);
}

TEST(TokenDataset, RowsOutsideTheFileAreErrors) {
  TempDir dir;
  const std::string path = dir.file("tokens.h5");
  TokenFile().write(path);
  TokenDataset data(path, 512, 128);
  at::Tensor ids, labels;
  expect_user_error([&] { data.read({0, 5}, ids, labels); }, path, {"row 5", "[0, 5)"});
  expect_user_error([&] { data.read({-1}, ids, labels); }, path, {"row -1", "[0, 5)"});
}

TEST(TokenDataset, MissingDatasetsAndAttributes) {
  TempDir dir;
  const std::string path = dir.file("tokens.h5");
  const auto fails = [&](const TokenFile& tf, const std::vector<std::string>& parts) {
    fs::remove(path);
    tf.write(path);
    expect_user_error([&] { TokenDataset(path, 512, 128); }, path, parts);
  };
  TokenFile tf;
  tf.with_labels = false;
  fails(tf, {"no dataset 'labels'"});
  tf = TokenFile();
  tf.with_ids = false;
  fails(tf, {"no dataset 'input_ids'"});
  tf = TokenFile();
  tf.with_vocab = false;
  fails(tf, {"no attribute 'vocab_size'"});
  tf = TokenFile();
  tf.with_pad = false;
  fails(tf, {"no attribute 'pad_token_id'"});
  tf = TokenFile();
  tf.pad_token_id = 100;
  fails(tf, {"pad_token_id 100", "[0, 100)"});
  tf.pad_token_id = -1;
  fails(tf, {"pad_token_id -1", "[0, 100)"});
  tf = TokenFile();
  tf.vocab_size = 0;
  tf.pad_token_id = 0;
  fails(tf, {"vocab_size 0"});
}

TEST(TokenDataset, ShapesMustMatchAndBe2D) {
  TempDir dir;
  const std::string path = dir.file("tokens.h5");
  const auto fails = [&](const TokenFile& tf, const std::vector<std::string>& parts) {
    fs::remove(path);
    tf.write(path);
    expect_user_error([&] { TokenDataset(path, 512, 128); }, path, parts);
  };
  TokenFile tf;
  tf.labels_cols = 6;
  fails(tf, {"'input_ids' [5, 7]", "'labels' [5, 6]", "the same shape"});
  tf = TokenFile();
  tf.labels_rows = 4;
  fails(tf, {"'input_ids' [5, 7]", "'labels' [4, 7]", "the same shape"});
  tf = TokenFile();
  tf.rows = 0;
  tf.fill();
  fails(tf, {"'input_ids' [0, 7]", "'labels' [0, 7]", "1 row or more"});
  tf = TokenFile();
  tf.cols = 1;
  tf.fill();
  fails(tf, {"'input_ids' [5, 1]", "'labels' [5, 1]", "seq_len 2 or more"});

  // 1-D input_ids.
  fs::remove(path);
  {
    H5File f = H5File::create(path);
    const std::vector<int32_t> flat(35, 3);
    f.write_bytes("input_ids", flat.data(), 35);
    f.write_int32_2d("labels", flat.data(), 5, 7);
    f.set_attr_int64("/", "vocab_size", 100);
    f.set_attr_int64("/", "pad_token_id", 0);
    f.close();
  }
  expect_user_error([&] { TokenDataset(path, 512, 128); }, path,
                    {"'input_ids' [35]", "'labels' [5, 7]", "2-D"});
}

TEST(TokenDataset, IntegerTypesOnly) {
  TempDir dir;
  // h5py's default int64 reads like int32.
  const std::string int64_path = dir.file("int64.h5");
  const int64_t ids64[6] = {3, 4, 5, 6, 7, 8};
  const int64_t labels64[6] = {-100, 4, 5, -100, 7, 8};
  write_raw_tokens(int64_path, H5T_STD_I64LE, H5T_NATIVE_INT64, ids64, labels64);
  {
    TokenDataset data(int64_path, 512, 128);
    at::Tensor ids, labels;
    data.read({1, 0}, ids, labels);
    EXPECT_EQ(tensor_values(ids), (std::vector<int64_t>{6, 7, 8, 3, 4, 5}));
    EXPECT_EQ(tensor_values(labels), (std::vector<int64_t>{-100, 7, 8, -100, 4, 5}));
  }
  // An int64 id past the int32 range is an error when its row is read.
  const std::string big_path = dir.file("big.h5");
  const int64_t big_ids[6] = {3, 4, 5, 6, int64_t{1} << 40, 8};
  write_raw_tokens(big_path, H5T_STD_I64LE, H5T_NATIVE_INT64, big_ids, labels64);
  {
    TokenDataset data(big_path, 512, 128);
    at::Tensor ids, labels;
    data.read({0}, ids, labels);
    expect_user_error([&] { data.read({1}, ids, labels); }, big_path,
                      {"'input_ids'", "int64", "int32 range"});
  }
  // Floats are rejected when the file is opened.
  const std::string float_path = dir.file("float.h5");
  const float ids_f[6] = {3, 4, 5, 6, 7, 8};
  write_raw_tokens(float_path, H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, ids_f, ids_f);
  expect_user_error([&] { TokenDataset(float_path, 512, 128); }, float_path,
                    {"'input_ids'", "float32 [2, 3]", "integer"});
  // So is a float vocab_size.
  const std::string float_attr_path = dir.file("float_attr.h5");
  write_raw_tokens(float_attr_path, H5T_STD_I64LE, H5T_NATIVE_INT64, ids64, labels64, true);
  expect_user_error([&] { TokenDataset(float_attr_path, 512, 128); }, float_attr_path,
                    {"'vocab_size'", "float64", "integer"});
}

TEST(TokenDataset, VocabLargerThanTheModel) {
  TempDir dir;
  const std::string path = dir.file("tokens.h5");
  TokenFile tf;
  tf.vocab_size = 50000;
  tf.write(path);
  const std::string message = expect_user_error([&] { TokenDataset(path, 512, 2048); }, path, {});
  EXPECT_EQ(message, path + ": vocab_size 50000 is larger than the model's vocabulary 2048");
  EXPECT_EQ(TokenDataset(path, 512, 50000).vocab_size(), 50000);
}

TEST(TokenDataset, MissingTruncatedAndNonHdf5Files) {
  TempDir dir;
  const std::string missing = dir.file("missing.h5");
  expect_user_error([&] { TokenDataset(missing, 512, 128); }, missing, {"no such file"});
  expect_user_error([&] { TokenDataset(dir.path(), 512, 128); }, dir.path(), {"directory"});

  const std::string text = dir.file("text.h5");
  file_write(text, "input_ids,labels\n1,2\n");
  expect_user_error([&] { TokenDataset(text, 512, 128); }, text, {"not an HDF5 file"});

  const std::string good = dir.file("good.h5");
  synth_data_write(synth_options(good, SynthTask::copy, 100, 32, 50, 3));
  const std::string bytes = file_read(good);
  const std::string truncated = dir.file("truncated.h5");
  file_write(truncated, bytes.substr(0, bytes.size() / 2));
  // HDF5 either fails to open it, or opens it and fails on the first dataset it touches.
  expect_user_error(
      [&] {
        TokenDataset data(truncated, 512, 128);
        at::Tensor ids, labels;
        data.read({49}, ids, labels);
      },
      truncated, {"truncated"});
}

}  // namespace
}  // namespace qlora::data
