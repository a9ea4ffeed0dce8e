// Token rows from samples: padding one sample per row, LLaMA-Factory's greedy-knapsack packing
// (bins of cutoff_len - 1 tokens, rows of cutoff_len), neat packing's restarting position ids,
// padded preference pairs, and the HDF5 token and pair file writers (one checked, atomic writer
// for both, through io::H5File; no libtorch here).
#include "data/packing.h"

#include <algorithm>
#include <filesystem>
#include <limits>
#include <stdexcept>
#include <string>
#include <system_error>

#include "io/atomic_write.h"
#include "io/h5_file.h"

namespace qlora::data {
namespace {

namespace fs = std::filesystem;

void sample_check(const Sample& s, size_t index, const char* who) {
  if (s.input_ids.size() != s.labels.size())
    throw std::invalid_argument(std::string(who) + ": sample " + std::to_string(index) + " has " +
                                std::to_string(s.input_ids.size()) + " input ids but " +
                                std::to_string(s.labels.size()) +
                                " labels (expected one label per token)");
}

TokenRows rows_alloc(int64_t rows, int64_t seq_len, int32_t pad_token_id, bool with_positions) {
  TokenRows out;
  out.rows = rows;
  out.seq_len = seq_len;
  const auto numel = static_cast<size_t>(rows * seq_len);
  out.input_ids.assign(numel, pad_token_id);
  out.labels.assign(numel, kIgnoreLabel);
  if (with_positions) out.position_ids.assign(numel, 0);
  return out;
}

void report_fill(PackReport* report, const TokenRows& rows, int64_t samples, int64_t dropped,
                 int64_t tokens) {
  if (!report) return;
  report->samples = samples;
  report->samples_dropped = dropped;
  report->rows = rows.rows;
  report->tokens = tokens;
  report->padding = rows.rows * rows.seq_len - tokens;
}

}  // namespace

TokenRows rows_pad(const std::vector<Sample>& samples, int32_t pad_token_id, PackReport* report) {
  size_t longest = 0;
  for (size_t i = 0; i < samples.size(); ++i) {
    sample_check(samples[i], i, "rows_pad");
    longest = std::max(longest, samples[i].input_ids.size());
  }
  const auto seq_len = static_cast<int64_t>(longest);
  TokenRows out = rows_alloc(static_cast<int64_t>(samples.size()), seq_len, pad_token_id, false);
  int64_t tokens = 0;
  for (size_t r = 0; r < samples.size(); ++r) {
    const Sample& s = samples[r];
    std::copy(s.input_ids.begin(), s.input_ids.end(), out.input_ids.begin() + r * longest);
    std::copy(s.labels.begin(), s.labels.end(), out.labels.begin() + r * longest);
    tokens += static_cast<int64_t>(s.input_ids.size());
  }
  report_fill(report, out, static_cast<int64_t>(samples.size()), 0, tokens);
  return out;
}

PairRows rows_pad_pairs(const std::vector<PairSample>& pairs, int32_t pad_token_id,
                        PackReport* report) {
  size_t longest = 0;
  for (size_t i = 0; i < pairs.size(); ++i) {
    sample_check(pairs[i].chosen, i, "rows_pad_pairs (chosen)");
    sample_check(pairs[i].rejected, i, "rows_pad_pairs (rejected)");
    longest = std::max({longest, pairs[i].chosen.input_ids.size(), pairs[i].rejected.input_ids.size()});
  }
  const auto n = static_cast<int64_t>(pairs.size());
  PairRows out{rows_alloc(n, static_cast<int64_t>(longest), pad_token_id, false),
               rows_alloc(n, static_cast<int64_t>(longest), pad_token_id, false)};
  int64_t tokens = 0;
  for (size_t r = 0; r < pairs.size(); ++r)
    for (auto [s, rows] : {std::pair{&pairs[r].chosen, &out.chosen}, std::pair{&pairs[r].rejected, &out.rejected}}) {
      std::copy(s->input_ids.begin(), s->input_ids.end(), rows->input_ids.begin() + r * longest);
      std::copy(s->labels.begin(), s->labels.end(), rows->labels.begin() + r * longest);
      tokens += static_cast<int64_t>(s->input_ids.size());
    }
  if (report) {
    *report = PackReport{};
    report->samples = n;
    report->rows = n;
    report->tokens = tokens;
    report->padding = 2 * n * static_cast<int64_t>(longest) - tokens;
  }
  return out;
}

std::vector<std::vector<int64_t>> greedy_knapsack_bins(const std::vector<int64_t>& lengths,
                                                       int64_t capacity) {
  // greedy_knapsack sorts the lengths and repeatedly takes the largest that fits (bisect_right,
  // so of equal lengths its list's last); PackedSupervisedDatasetProcessor then maps each taken
  // length to a sample with length2indexes[length].pop(): of equal lengths the latest sample
  // first. One stack of sample indices per length does both.
  std::map<int64_t, std::vector<int64_t>> by_length;  // length -> sample indices, ascending
  for (size_t i = 0; i < lengths.size(); ++i) {
    if (lengths[i] < 0 || lengths[i] > capacity)
      throw std::invalid_argument("greedy_knapsack_bins: length " + std::to_string(lengths[i]) +
                                  " of sample " + std::to_string(i) + " is outside [0, " +
                                  std::to_string(capacity) + "] (the capacity)");
    by_length[lengths[i]].push_back(static_cast<int64_t>(i));
  }
  std::vector<std::vector<int64_t>> bins;
  while (!by_length.empty()) {
    std::vector<int64_t> bin;
    int64_t remaining = capacity;
    for (;;) {
      auto it = by_length.upper_bound(remaining);
      if (it == by_length.begin()) break;  // nothing fits
      --it;
      remaining -= it->first;
      bin.push_back(it->second.back());
      it->second.pop_back();
      if (it->second.empty()) by_length.erase(it);
    }
    bins.push_back(std::move(bin));
  }
  return bins;
}

TokenRows rows_pack(const std::vector<Sample>& samples, int64_t cutoff_len, bool neat,
                    int32_t pad_token_id, PackReport* report, int64_t group_samples) {
  if (cutoff_len < 2)
    throw std::invalid_argument("rows_pack: cutoff_len " + std::to_string(cutoff_len) +
                                " is too short (expected 2 or more: a row holds up to "
                                "cutoff_len - 1 sample tokens and at least one pad)");
  if (group_samples < 1)
    throw std::invalid_argument("rows_pack: group_samples " + std::to_string(group_samples) +
                                " (expected 1 or more; LLaMA-Factory's default is 1000)");
  for (size_t i = 0; i < samples.size(); ++i) sample_check(samples[i], i, "rows_pack");
  const int64_t capacity = cutoff_len - 1;  // LLaMA-Factory: data_args.cutoff_len -= 1

  std::vector<std::vector<size_t>> row_samples;  // sample indices of each row, in row order
  int64_t dropped = 0;
  for (size_t g0 = 0; g0 < samples.size(); g0 += static_cast<size_t>(group_samples)) {
    const size_t g1 = std::min(samples.size(), g0 + static_cast<size_t>(group_samples));
    std::vector<size_t> kept;  // indices into samples
    std::vector<int64_t> lengths;
    for (size_t i = g0; i < g1; ++i) {
      const auto len = static_cast<int64_t>(samples[i].input_ids.size());
      if (len > capacity) {
        ++dropped;
        continue;
      }
      kept.push_back(i);
      lengths.push_back(len);
    }
    for (const std::vector<int64_t>& bin : greedy_knapsack_bins(lengths, capacity)) {
      std::vector<size_t> row;
      for (int64_t k : bin) row.push_back(kept[static_cast<size_t>(k)]);
      row_samples.push_back(std::move(row));
    }
  }

  TokenRows out =
      rows_alloc(static_cast<int64_t>(row_samples.size()), cutoff_len, pad_token_id, neat);
  int64_t tokens = 0;
  for (size_t r = 0; r < row_samples.size(); ++r) {
    size_t at = r * static_cast<size_t>(cutoff_len);
    for (size_t i : row_samples[r]) {
      const Sample& s = samples[i];
      std::copy(s.input_ids.begin(), s.input_ids.end(), out.input_ids.begin() + at);
      std::copy(s.labels.begin(), s.labels.end(), out.labels.begin() + at);
      if (neat)
        for (size_t p = 0; p < s.input_ids.size(); ++p)
          out.position_ids[at + p] = static_cast<int32_t>(p);
      at += s.input_ids.size();
      tokens += static_cast<int64_t>(s.input_ids.size());
    }
  }
  report_fill(report, out, static_cast<int64_t>(samples.size()), dropped, tokens);
  return out;
}

namespace {

// One set of rows in a file: its datasets are `prefix` + input_ids, labels, position_ids.
struct NamedRows {
  std::string prefix;
  const TokenRows* rows;
};

// The writer token and pair files share: each set's values checked as the readers will check
// them, every dataset written to a hidden sibling of `path` and renamed, never over a file.
void rows_file_write(const std::string& path, const std::vector<NamedRows>& sets, int64_t vocab_size,
                     int64_t pad_token_id, const std::map<std::string, std::string>& string_attrs,
                     const char* format, const char* who) {
  if (vocab_size < 1 || vocab_size > std::numeric_limits<int32_t>::max())
    throw std::invalid_argument(path + ": vocab_size " + std::to_string(vocab_size) +
                                " (expected 1 to 2147483647: ids are stored as int32)");
  if (pad_token_id < 0 || pad_token_id >= vocab_size)
    throw std::invalid_argument(path + ": pad_token_id " + std::to_string(pad_token_id) +
                                " is outside [0, " + std::to_string(vocab_size) + ")");
  for (const char* reserved : {"vocab_size", "pad_token_id", "format"})
    if (string_attrs.count(reserved))
      throw std::invalid_argument(path + ": attribute '" + reserved + "' is written by " + who +
                                  " itself (pass another name)");
  for (const NamedRows& set : sets) {
    const std::string& prefix = set.prefix;  // not a structured binding: the lambda below captures
                                             // it, which C++17 (clang) does not allow for one
    const TokenRows& rows = *set.rows;
    const std::string side = prefix.empty() ? "" : prefix.substr(0, prefix.size() - 1) + ": ";
    if (rows.rows < 1 || rows.seq_len < 2)
      throw std::invalid_argument(path + ": " + side + std::to_string(rows.rows) + " rows of " +
                                  std::to_string(rows.seq_len) +
                                  " tokens (expected 1 row or more of 2 tokens or more)");
    const auto numel = static_cast<size_t>(rows.rows * rows.seq_len);
    if (rows.input_ids.size() != numel || rows.labels.size() != numel ||
        (!rows.position_ids.empty() && rows.position_ids.size() != numel))
      throw std::invalid_argument(path + ": " + prefix + "input_ids " + std::to_string(rows.input_ids.size()) +
                                  ", " + prefix + "labels " + std::to_string(rows.labels.size()) +
                                  ", " + prefix + "position_ids " + std::to_string(rows.position_ids.size()) +
                                  " values (expected rows x seq_len = " + std::to_string(numel) +
                                  " each, position_ids also 0)");
    const auto where = [&](const char* what, size_t i) {
      return path + ": " + prefix + what + " row " + std::to_string(i / static_cast<size_t>(rows.seq_len)) +
             ", column " + std::to_string(i % static_cast<size_t>(rows.seq_len)) + ": ";
    };
    for (size_t i = 0; i < numel; ++i) {
      if (rows.input_ids[i] < 0 || rows.input_ids[i] >= vocab_size)
        throw std::invalid_argument(where("input_ids", i) + "token id " +
                                    std::to_string(rows.input_ids[i]) + " is outside [0, " +
                                    std::to_string(vocab_size) + ")");
      const int32_t label = rows.labels[i];
      if (label != kIgnoreLabel && (label < 0 || label >= vocab_size))
        throw std::invalid_argument(where("labels", i) + "token id " + std::to_string(label) +
                                    " is outside [0, " + std::to_string(vocab_size) +
                                    ") and is not -100 (no loss)");
      if (!rows.position_ids.empty() &&
          (rows.position_ids[i] < 0 || rows.position_ids[i] >= rows.seq_len))
        throw std::invalid_argument(where("position_ids", i) + "position " +
                                    std::to_string(rows.position_ids[i]) + " is outside [0, " +
                                    std::to_string(rows.seq_len) + ")");
    }
  }

  const fs::path out(path);
  const std::string name = out.filename().string();
  if (name.empty() || name == "." || name == "..")
    throw std::invalid_argument(path + ": not a file name (expected e.g. data/train.h5)");
  const std::string exists = path + ": exists; token files are never overwritten";
  std::error_code ec;
  if (fs::exists(fs::symlink_status(out, ec))) throw std::invalid_argument(exists);
  const fs::path dir = out.has_parent_path() ? out.parent_path() : fs::path(".");
  if (!fs::is_directory(dir, ec))
    throw std::invalid_argument(path + ": directory '" + dir.string() +
                                "' does not exist (create it first)");

  io::commit_atomic(out, /*directory=*/false, [&](const fs::path& tmp) {
    io::H5File file = io::H5File::create(tmp.string());
    for (const auto& [prefix, rows] : sets) {
      file.write_int32_2d(prefix + "input_ids", rows->input_ids.data(), rows->rows, rows->seq_len);
      file.write_int32_2d(prefix + "labels", rows->labels.data(), rows->rows, rows->seq_len);
      if (!rows->position_ids.empty())
        file.write_int32_2d(prefix + "position_ids", rows->position_ids.data(), rows->rows, rows->seq_len);
    }
    file.set_attr_int64("/", "vocab_size", vocab_size);
    file.set_attr_int64("/", "pad_token_id", pad_token_id);
    file.set_attr_string("/", "format", format);
    for (const auto& [key, value] : string_attrs) file.set_attr_string("/", key, value);
    file.close();
    // Checked again: the rename would replace a file that appeared while we were writing.
    std::error_code ec2;
    if (fs::exists(fs::symlink_status(out, ec2))) throw std::invalid_argument(exists);
  });
}

}  // namespace

void token_rows_write(const std::string& path, const TokenRows& rows, int64_t vocab_size,
                      int64_t pad_token_id,
                      const std::map<std::string, std::string>& string_attrs) {
  rows_file_write(path, {{"", &rows}}, vocab_size, pad_token_id, string_attrs,
                  "qlora_dist.tokens", "token_rows_write");
}

void pair_rows_write(const std::string& path, const PairRows& pairs, int64_t vocab_size,
                     int64_t pad_token_id,
                     const std::map<std::string, std::string>& string_attrs) {
  if (pairs.chosen.rows != pairs.rejected.rows || pairs.chosen.seq_len != pairs.rejected.seq_len)
    throw std::invalid_argument(path + ": chosen rows [" + std::to_string(pairs.chosen.rows) + ", " +
                                std::to_string(pairs.chosen.seq_len) + "], rejected rows [" +
                                std::to_string(pairs.rejected.rows) + ", " +
                                std::to_string(pairs.rejected.seq_len) +
                                "] (expected the same shape: one of each per pair)");
  if (!pairs.chosen.position_ids.empty() || !pairs.rejected.position_ids.empty())
    throw std::invalid_argument(path + ": preference pairs have no position ids (they are never "
                                "packed)");
  rows_file_write(path, {{"chosen_", &pairs.chosen}, {"rejected_", &pairs.rejected}}, vocab_size,
                  pad_token_id, string_attrs, "qlora_dist.pairs", "pair_rows_write");
}

TokenRows rows_chunk(const std::vector<Sample>& samples, int64_t block_size,
                     std::optional<int32_t> bos, PackReport* report, int64_t group_samples) {
  if (block_size < 1)
    throw std::invalid_argument("rows_chunk: block size " + std::to_string(block_size) +
                                " (expected >= 1)");
  if (group_samples < 1)
    throw std::invalid_argument("rows_chunk: group size " + std::to_string(group_samples) +
                                " (expected >= 1)");
  TokenRows out;
  out.seq_len = block_size;
  const auto n = static_cast<int64_t>(samples.size());
  for (int64_t g0 = 0; g0 < n; g0 += group_samples) {
    std::vector<int32_t> ids, labels;  // the group's documents, concatenated
    for (int64_t i = g0; i < std::min(n, g0 + group_samples); ++i) {
      const Sample& s = samples[static_cast<size_t>(i)];
      if (s.input_ids.size() != s.labels.size())
        throw std::invalid_argument("rows_chunk: sample " + std::to_string(i) + " has " +
                                    std::to_string(s.input_ids.size()) + " ids but " +
                                    std::to_string(s.labels.size()) + " labels");
      ids.insert(ids.end(), s.input_ids.begin(), s.input_ids.end());
      labels.insert(labels.end(), s.labels.begin(), s.labels.end());
    }
    const int64_t blocks = static_cast<int64_t>(ids.size()) / block_size;
    for (int64_t b = 0; b < blocks; ++b) {
      const auto at = static_cast<size_t>(b * block_size);
      const auto row = out.input_ids.size();
      out.input_ids.insert(out.input_ids.end(), ids.begin() + at, ids.begin() + at + block_size);
      out.labels.insert(out.labels.end(), labels.begin() + at, labels.begin() + at + block_size);
      if (bos) out.input_ids[row] = out.labels[row] = *bos;
      ++out.rows;
    }
  }
  if (report) {
    *report = PackReport{};
    report->samples = n;
    report->rows = out.rows;
    report->tokens = out.rows * block_size;
  }
  return out;
}

}  // namespace qlora::data
