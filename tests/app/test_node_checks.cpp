// The node checks' pieces that need no MPI: rank lists as people write them, and that a job of
// one rank writes no probe (nothing can disagree). The collective paths run on real emulated
// nodes in tests/multinode (label multinode).
#include "app/node_checks.h"

#include <gtest/gtest.h>

#include <filesystem>

#include "io/temp_dir.h"

namespace qlora::app {
namespace {

TEST(NodeChecks, RanksCompact) {
  EXPECT_EQ(ranks_compact({}), "");
  EXPECT_EQ(ranks_compact({3}), "3");
  EXPECT_EQ(ranks_compact({2, 3}), "2-3");
  EXPECT_EQ(ranks_compact({0, 2, 5, 6, 7}), "0,2,5-7");
  EXPECT_EQ(ranks_compact({7, 5, 6, 0}), "0,5-7");
  EXPECT_EQ(ranks_compact({1, 1, 2}), "1-2");
}

TEST(NodeChecks, OneRankWritesNothing) {
  io::testing::TempDir tmp;
  dist::RankEnv env;  // world size 1, MPI not needed
  const std::filesystem::path out = std::filesystem::path(tmp.path()) / "out";
  EXPECT_EQ(node_paths_check(out, {{"model.model_name_or_path", "/nonexistent"}}, env), "");
  EXPECT_FALSE(std::filesystem::exists(out));
}

}  // namespace
}  // namespace qlora::app
