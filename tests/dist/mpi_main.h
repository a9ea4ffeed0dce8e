// main() of the MPI GoogleTest binaries: MPI up (rank_env_init) before the tests and down after,
// every failure printed with its rank, and one exit status on every rank (non-zero when any rank
// failed). A test file ends with QLORA_MPI_GTEST_MAIN() and reads the rank numbers from mpi_env().
#pragma once

#include <gtest/gtest.h>

#include <cstdio>
#include <exception>
#include <string>

#include "dist/rank_env.h"

namespace qlora::testing {

inline dist::RankEnv& mpi_env() {
  static dist::RankEnv env;
  return env;
}

// "[rank R] Suite.Test: file:line: message" on stderr, one write per failure.
class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  // The name is kept here: UnitTest::current_test_info() would take the lock GoogleTest holds
  // while it reports a result.
  void OnTestStart(const ::testing::TestInfo& test) override {
    test_name_ = std::string(test.test_suite_name()) + "." + test.name() + ": ";
  }
  void OnTestEnd(const ::testing::TestInfo&) override { test_name_.clear(); }
  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (!result.failed()) return;
    std::string text = "[rank " + std::to_string(rank_) + "] " + test_name_;
    text += std::string(result.file_name() ? result.file_name() : "?") + ":" +
            std::to_string(result.line_number()) + ": " + result.message() + "\n";
    std::fwrite(text.data(), 1, text.size(), stderr);
    std::fflush(stderr);
  }

 private:
  int rank_;
  std::string test_name_;
};

inline int mpi_gtest_main(int argc, char** argv) {
  try {
    mpi_env() = dist::rank_env_init(&argc, &argv);
  } catch (const std::exception& e) {
    dist::job_abort(e.what(), 2);
  }
  const int rank = mpi_env().rank;
  ::testing::InitGoogleTest(&argc, argv);
  ::testing::TestEventListeners& listeners = ::testing::UnitTest::GetInstance()->listeners();
  if (rank != 0) delete listeners.Release(listeners.default_result_printer());  // rank 0 reports
  listeners.Append(new RankFailurePrinter(rank));
  int failed_here = RUN_ALL_TESTS() != 0 ? 1 : 0;
  int failed_anywhere = 0;
  QLORA_MPI_CHECK(
      MPI_Allreduce(&failed_here, &failed_anywhere, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD));
  if (rank == 0 && failed_anywhere) {
    std::fprintf(stderr, "FAILED on at least one of %d ranks (see the [rank R] lines)\n",
                 mpi_env().world_size);
  }
  dist::rank_env_finalize();
  return failed_anywhere;
}

}  // namespace qlora::testing

#define QLORA_MPI_GTEST_MAIN() \
  int main(int argc, char** argv) { return ::qlora::testing::mpi_gtest_main(argc, argv); }
