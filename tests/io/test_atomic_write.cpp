// Atomic writes: the target holds the old content or the new, never a part; a failure leaves no
// temporary file and the old target as it was; a temporary path that exists is not ours.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>

#include "io/atomic_write.h"
#include "temp_dir.h"

namespace fs = std::filesystem;

namespace qlora::io {
namespace {

using testing::TempDir;

std::string read_all(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

size_t entries(const fs::path& dir) {
  size_t n = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir)) ++n;
  return n;
}

TEST(AtomicWrite, FileReplacesTheOldContentAndLeavesNoTemporary) {
  TempDir dir;
  const fs::path p = dir.file("state.json");
  file_write_atomic(p, "old");
  file_write_atomic(p, std::string(100000, 'x'));
  EXPECT_EQ(read_all(p), std::string(100000, 'x'));
  EXPECT_EQ(entries(dir.path()), 1u) << "a temporary sibling was left behind";
}

TEST(AtomicWrite, FailureKeepsTheOldTargetAndRemovesTheTemporary) {
  TempDir dir;
  const fs::path p = dir.file("model.safetensors");
  file_write_atomic(p, "old");
  EXPECT_THROW(commit_atomic(p, /*directory=*/false,
                             [](const fs::path& tmp) {
                               std::ofstream(tmp) << "half";
                               throw std::runtime_error("disk full");
                             }),
               std::runtime_error);
  EXPECT_EQ(read_all(p), "old");
  EXPECT_EQ(entries(dir.path()), 1u);
}

TEST(AtomicWrite, DirectoryAppearsWhole) {
  TempDir dir;
  const fs::path out = dir.file("merged");
  commit_atomic(out, /*directory=*/true, [](const fs::path& tmp) {
    std::ofstream(tmp / "config.json") << "{}";
    fs::create_directories(tmp / "sub");
    std::ofstream(tmp / "sub" / "w.bin") << "bytes";
  });
  EXPECT_EQ(read_all(out / "config.json"), "{}");
  EXPECT_EQ(read_all(out / "sub" / "w.bin"), "bytes");
  EXPECT_EQ(entries(dir.path()), 1u);
}

TEST(AtomicWrite, AnExistingTemporaryPathIsNotOurs) {
  TempDir dir;
  const fs::path p = dir.file("x.h5");
  const fs::path tmp = temp_sibling(p);
  EXPECT_EQ(tmp.parent_path(), fs::path(dir.path()));
  EXPECT_EQ(tmp.filename().string().rfind(".x.h5.tmp-", 0), 0u) << tmp;
  fs::create_directory(tmp);
  std::ofstream(tmp / "keep") << "someone's";
  try {
    file_write_atomic(p, "new");
    ADD_FAILURE() << "no error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("temporary path exists"), std::string::npos) << e.what();
  }
  EXPECT_EQ(read_all(tmp / "keep"), "someone's");
  EXPECT_FALSE(fs::exists(p));
}

TEST(AtomicWrite, UnwritableDirectoryNamesTheFile) {
  try {
    file_write_atomic("/nonexistent-dir-qlora/x.json", "x");
    ADD_FAILURE() << "no error";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("x.json"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace qlora::io
