// Token rows: rows_pad (one sample per row), rows_pack (LLaMA-Factory's greedy-knapsack packing:
// rows never hold more than cutoff_len - 1 sample tokens, every sample that fits appears exactly
// once with its ids and labels, longer ones are dropped, groups pack on their own, neat position
// ids restart per sample), and token_rows_write read back through TokenDataset. The bin
// assignment itself is compared with LLaMA-Factory's own code in
// tests/reference/test_packing_reference.py; the expected bins below are worked by hand from
// greedy_knapsack's rule (take the longest that fits).
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "data/packing.h"
#include "expect_error.h"
#include "io/h5_file.h"
#include "io/temp_dir.h"

namespace qlora::data {
namespace {

using io::testing::TempDir;
using qlora::testing::contains;

// Sample i: length lengths[i], ids 1000 * (i + 1) + position (unique per token, so every token
// of the packed rows names its sample and position), labels -100 on the first half, ids after.
std::vector<Sample> samples_of(const std::vector<int64_t>& lengths) {
  std::vector<Sample> out;
  for (size_t i = 0; i < lengths.size(); ++i) {
    Sample s;
    for (int64_t p = 0; p < lengths[i]; ++p) {
      const auto id = static_cast<int32_t>(1000 * (i + 1) + p);
      s.input_ids.push_back(id);
      s.labels.push_back(p < lengths[i] / 2 ? kIgnoreLabel : id);
    }
    out.push_back(std::move(s));
  }
  return out;
}

// Per row, the samples it holds in order (decoded from the ids), checking on the way that each
// sample's tokens are contiguous, complete, in order, with their labels, followed only by pads.
std::vector<std::vector<int64_t>> rows_decode(const TokenRows& t, const std::vector<Sample>& s,
                                              int32_t pad, bool neat) {
  std::vector<std::vector<int64_t>> out;
  for (int64_t r = 0; r < t.rows; ++r) {
    std::vector<int64_t> row;
    int64_t c = 0;
    while (c < t.seq_len) {
      const size_t at = static_cast<size_t>(r * t.seq_len + c);
      if (t.input_ids[at] == pad) break;
      const int64_t i = t.input_ids[at] / 1000 - 1;
      EXPECT_TRUE(i >= 0 && i < static_cast<int64_t>(s.size())) << "row " << r << " col " << c;
      if (i < 0 || i >= static_cast<int64_t>(s.size())) return out;
      const Sample& smp = s[static_cast<size_t>(i)];
      for (size_t p = 0; p < smp.input_ids.size(); ++p, ++c) {
        const size_t k = static_cast<size_t>(r * t.seq_len + c);
        EXPECT_LT(c, t.seq_len) << "sample " << i << " runs past row " << r;
        if (c >= t.seq_len) return out;
        EXPECT_EQ(t.input_ids[k], smp.input_ids[p]) << "row " << r << " col " << c;
        EXPECT_EQ(t.labels[k], smp.labels[p]) << "row " << r << " col " << c;
        if (neat) {
          EXPECT_EQ(t.position_ids[k], static_cast<int32_t>(p)) << "row " << r;
        }
      }
      row.push_back(i);
    }
    for (; c < t.seq_len; ++c) {
      const size_t k = static_cast<size_t>(r * t.seq_len + c);
      EXPECT_EQ(t.input_ids[k], pad) << "row " << r << " col " << c;
      EXPECT_EQ(t.labels[k], kIgnoreLabel) << "row " << r << " col " << c;
      if (neat) {
        EXPECT_EQ(t.position_ids[k], 0) << "pad position, row " << r << " col " << c;
      }
    }
    out.push_back(row);
  }
  return out;
}

TEST(RowsPad, OneSamplePerRowPaddedToTheLongest) {
  const std::vector<Sample> s = samples_of({3, 7, 1, 5});
  PackReport rep;
  const TokenRows t = rows_pad(s, 9, &rep);
  ASSERT_EQ(t.rows, 4);
  ASSERT_EQ(t.seq_len, 7);
  EXPECT_TRUE(t.position_ids.empty());
  const auto rows = rows_decode(t, s, 9, false);
  EXPECT_EQ(rows, (std::vector<std::vector<int64_t>>{{0}, {1}, {2}, {3}}));
  EXPECT_EQ(rep.samples, 4);
  EXPECT_EQ(rep.rows, 4);
  EXPECT_EQ(rep.tokens, 16);
  EXPECT_EQ(rep.padding, 12);
  EXPECT_DOUBLE_EQ(rep.efficiency(), 16.0 / 28.0);
}

TEST(RowsPack, HandWorkedBins) {
  // cutoff_len 8: capacity 7. Sorted 2 3 4 5 -> row 1 takes 5 then 2, row 2 takes 4 then 3.
  const std::vector<Sample> s = samples_of({5, 3, 4, 2});
  PackReport rep;
  const TokenRows t = rows_pack(s, 8, /*neat=*/false, 0, &rep);
  ASSERT_EQ(t.seq_len, 8);
  EXPECT_EQ(rows_decode(t, s, 0, false), (std::vector<std::vector<int64_t>>{{0, 3}, {2, 1}}));
  EXPECT_TRUE(t.position_ids.empty());
  EXPECT_EQ(rep.rows, 2);
  EXPECT_EQ(rep.tokens, 14);
  EXPECT_EQ(rep.padding, 2);
  EXPECT_EQ(rep.samples_dropped, 0);
  // Equal lengths: the last sample of that length is taken first (length2indexes[...].pop()).
  EXPECT_EQ(greedy_knapsack_bins({3, 3, 3}, 7),
            (std::vector<std::vector<int64_t>>{{2, 1}, {0}}));
  // A sample of exactly cutoff_len - 1 fills a row; cutoff_len itself is dropped.
  const std::vector<Sample> s2 = samples_of({7, 8, 1});
  const TokenRows t2 = rows_pack(s2, 8, /*neat=*/true, 0, &rep);
  EXPECT_EQ(rows_decode(t2, s2, 0, true), (std::vector<std::vector<int64_t>>{{0}, {2}}));
  EXPECT_EQ(rep.samples_dropped, 1);
}

TEST(RowsPack, RandomSamplesFitOnceAndKeepTheirTokens) {
  std::mt19937 rng(7);
  for (const int64_t cutoff : {2, 5, 16, 33}) {
    for (const int64_t group : {1, 4, 1000}) {
      for (const bool neat : {false, true}) {
        std::vector<int64_t> lengths;
        for (int i = 0; i < 40; ++i)
          lengths.push_back(std::uniform_int_distribution<int64_t>(0, cutoff + 2)(rng));
        const std::vector<Sample> s = samples_of(lengths);
        PackReport rep;
        const TokenRows t = rows_pack(s, cutoff, neat, 0, &rep, group);
        const std::string where = "cutoff " + std::to_string(cutoff) + ", group " +
                                  std::to_string(group) + ", neat " + std::to_string(neat);
        ASSERT_EQ(t.seq_len, cutoff) << where;
        ASSERT_EQ(t.input_ids.size(), static_cast<size_t>(t.rows * cutoff)) << where;
        ASSERT_EQ(t.position_ids.size(), neat ? t.input_ids.size() : 0u) << where;
        // Zero-length samples leave no trace in the ids; every other one appears exactly once
        // if it fits (length <= cutoff - 1), never otherwise, and only with its group.
        std::multiset<int64_t> seen;
        int64_t tokens = 0;
        const auto rows = rows_decode(t, s, 0, neat);
        for (const auto& row : rows) {
          int64_t used = 0;
          for (int64_t i : row) {
            seen.insert(i);
            used += lengths[static_cast<size_t>(i)];
            EXPECT_EQ(i / group, row.front() / group) << where << ": a row mixes groups";
          }
          EXPECT_LE(used, cutoff - 1) << where;
          tokens += used;
        }
        int64_t dropped = 0;
        for (size_t i = 0; i < lengths.size(); ++i) {
          if (lengths[i] == 0) continue;
          const bool fits = lengths[i] <= cutoff - 1;
          dropped += !fits;
          EXPECT_EQ(seen.count(static_cast<int64_t>(i)), fits ? 1u : 0u) << where << " sample " << i;
        }
        EXPECT_EQ(rep.samples_dropped, dropped) << where;
        EXPECT_EQ(rep.tokens, tokens) << where;
        EXPECT_EQ(rep.rows, t.rows) << where;
        EXPECT_EQ(rep.padding, t.rows * cutoff - tokens) << where;
        // Greedy: no two rows of one group could have been merged.
        for (size_t a = 0; a < rows.size(); ++a)
          for (size_t b = a + 1; b < rows.size(); ++b) {
            if (rows[a].empty() || rows[b].empty()) continue;
            if (rows[a].front() / group != rows[b].front() / group) continue;
            int64_t la = 0, lb = 0;
            for (int64_t i : rows[a]) la += lengths[static_cast<size_t>(i)];
            for (int64_t i : rows[b]) lb += lengths[static_cast<size_t>(i)];
            EXPECT_GT(la + lb, cutoff - 1) << where << ": rows " << a << " and " << b;
          }
      }
    }
  }
}

TEST(RowsPack, BadArguments) {
  const std::vector<Sample> s = samples_of({3});
  EXPECT_TRUE(contains(qlora::testing::invalid_argument_message([&] { rows_pack(s, 1, true, 0); }),
                       "cutoff_len 1"));
  EXPECT_TRUE(contains(
      qlora::testing::invalid_argument_message([&] { rows_pack(s, 8, true, 0, nullptr, 0); }),
      "group_samples 0"));
  std::vector<Sample> bad = samples_of({2, 3});
  bad[1].labels.pop_back();
  EXPECT_TRUE(contains(qlora::testing::invalid_argument_message([&] { rows_pad(bad, 0); }),
                       "sample 1 has 3 input ids but 2 labels"));
  EXPECT_TRUE(contains(
      qlora::testing::invalid_argument_message([&] { rows_pack(bad, 8, false, 0); }),
      "sample 1"));
}

// Small ids for files: vocab 50.
std::vector<Sample> small_samples(const std::vector<int64_t>& lengths) {
  std::vector<Sample> s = samples_of(lengths);
  for (Sample& x : s) {
    for (int32_t& id : x.input_ids) id = 1 + id % 49;
    for (size_t p = 0; p < x.labels.size(); ++p)
      if (x.labels[p] != kIgnoreLabel) x.labels[p] = x.input_ids[p];
  }
  return s;
}

TEST(TokenRowsWrite, NeatRowsReadBackWithPositionIds) {
  TempDir dir;
  const std::string path = dir.file("neat.h5");
  const TokenRows t = rows_pack(small_samples({4, 6, 3, 2, 5}), 9, /*neat=*/true, 0);
  token_rows_write(path, t, 50, 0, {{"template", "llama3"}, {"source", "a.jsonl"}});
  {
    io::H5File f = io::H5File::open_read(path);
    EXPECT_EQ(f.shape("position_ids"), (std::vector<int64_t>{t.rows, 9}));
    EXPECT_EQ(f.attr_string("/", "template"), "llama3");
    EXPECT_EQ(f.attr_string("/", "source"), "a.jsonl");
    EXPECT_EQ(f.attr_string("/", "format"), "qlora_dist.tokens");
    EXPECT_EQ(f.attr_int64("/", "vocab_size"), 50);
  }
  // Read back cut to 7 columns: ids, labels and positions are those of the rows.
  const TokenDataset d(path, 7, 64);
  ASSERT_TRUE(d.has_position_ids());
  std::vector<int64_t> order;
  for (int64_t r = t.rows - 1; r >= 0; --r) order.push_back(r);
  at::Tensor ids, labels, pos;
  d.read(order, ids, labels, &pos);
  ASSERT_TRUE(pos.defined());
  ASSERT_EQ(pos.sizes(), (at::IntArrayRef{t.rows, 7}));
  for (size_t i = 0; i < order.size(); ++i)
    for (int64_t c = 0; c < 7; ++c) {
      const size_t k = static_cast<size_t>(order[i] * 9 + c);
      const auto ii = static_cast<int64_t>(i);
      EXPECT_EQ(ids[ii][c].item<int64_t>(), t.input_ids[k]);
      EXPECT_EQ(labels[ii][c].item<int64_t>(), t.labels[k]);
      EXPECT_EQ(pos[ii][c].item<int64_t>(), t.position_ids[k]);
    }
  // A file without position ids reads an undefined tensor.
  const std::string plain = dir.file("plain.h5");
  token_rows_write(plain, rows_pad(small_samples({4, 6}), 0), 50, 0);
  const TokenDataset p(plain, 16, 64);
  EXPECT_FALSE(p.has_position_ids());
  p.read({1, 0}, ids, labels, &pos);
  EXPECT_FALSE(pos.defined());
}

TEST(TokenRowsWrite, ErrorsNameThePathAndNeverOverwrite) {
  TempDir dir;
  const std::string path = dir.file("t.h5");
  TokenRows t = rows_pack(small_samples({4, 6, 3}), 9, /*neat=*/true, 0);
  token_rows_write(path, t, 50, 0);
  const auto msg = [&](const std::function<void()>& f) {
    return qlora::testing::invalid_argument_message(f);
  };
  EXPECT_TRUE(contains(msg([&] { token_rows_write(path, t, 50, 0); }), "exists"));
  const std::string other = dir.file("u.h5");
  EXPECT_TRUE(contains(msg([&] { token_rows_write(other, t, 5, 0); }), "input_ids row 0"));
  EXPECT_TRUE(contains(msg([&] { token_rows_write(other, t, 50, 50); }), "pad_token_id 50"));
  EXPECT_TRUE(contains(msg([&] { token_rows_write(other, t, 50, 0, {{"format", "x"}}); }),
                       "'format'"));
  TokenRows bad = t;
  bad.position_ids[3] = 9;
  EXPECT_TRUE(contains(msg([&] { token_rows_write(other, bad, 50, 0); }),
                       "position_ids row 0, column 3: position 9 is outside [0, 9)"));
  bad = t;
  bad.labels[1] = 77;
  EXPECT_TRUE(contains(msg([&] { token_rows_write(other, bad, 50, 0); }), "labels row 0"));
  EXPECT_TRUE(contains(
      msg([&] { token_rows_write(dir.file("no/x.h5"), t, 50, 0); }),
      "does not exist"));
  EXPECT_FALSE(std::filesystem::exists(other));
  for (const auto& e : std::filesystem::directory_iterator(dir.path()))
    EXPECT_EQ(e.path().filename().string().rfind(".", 0), std::string::npos) << e.path();
}

TEST(TokenDataset, BadPositionIdsAreOneLineErrors) {
  TempDir dir;
  const TokenRows t = rows_pack(small_samples({4, 6, 3}), 9, /*neat=*/false, 0);
  const std::string path = dir.file("p.h5");
  {
    io::H5File f = io::H5File::create(path);
    f.write_int32_2d("input_ids", t.input_ids.data(), t.rows, 9);
    f.write_int32_2d("labels", t.labels.data(), t.rows, 9);
    std::vector<int32_t> pos(static_cast<size_t>(t.rows * 8), 0);
    f.write_int32_2d("position_ids", pos.data(), t.rows, 8);  // one column short
    f.set_attr_int64("/", "vocab_size", 50);
    f.set_attr_int64("/", "pad_token_id", 0);
  }
  EXPECT_TRUE(contains(qlora::testing::invalid_argument_message([&] { TokenDataset(path, 9, 64); }),
                       "'position_ids' [" + std::to_string(t.rows) + ", 8]"));
  const std::string neg = dir.file("n.h5");
  {
    io::H5File f = io::H5File::create(neg);
    f.write_int32_2d("input_ids", t.input_ids.data(), t.rows, 9);
    f.write_int32_2d("labels", t.labels.data(), t.rows, 9);
    std::vector<int32_t> pos(static_cast<size_t>(t.rows * 9), 0);
    pos[9 + 4] = -1;
    f.write_int32_2d("position_ids", pos.data(), t.rows, 9);
    f.set_attr_int64("/", "vocab_size", 50);
    f.set_attr_int64("/", "pad_token_id", 0);
  }
  const TokenDataset d(neg, 9, 64);
  at::Tensor ids, labels, pos;
  d.read({0}, ids, labels, &pos);  // row 0 is fine
  EXPECT_TRUE(contains(qlora::testing::invalid_argument_message([&] { d.read({1}, ids, labels, &pos); }),
                       "position_ids row 1, column 4: position -1"));
}

}  // namespace
}  // namespace qlora::data
