// What a job checks about its nodes before any heavy work, and what it tells about them. On one
// node both are trivial; on a cluster they catch what one node cannot show: an output_dir that
// is node-local (each node would write its own half of every checkpoint), a model or data path
// that only some nodes have, and where the ranks landed (local ranks, threads per node).
// Both functions are collective: every rank of MPI_COMM_WORLD calls them, in the same order.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "dist/rank_env.h"

namespace qlora::app {

// The paths every rank must see as rank 0 does: (config key, path).
using KeyedPaths = std::vector<std::pair<std::string, std::string>>;

// Rank 0 creates `output_dir` if needed and writes a small probe file (a random name and token)
// into it; every rank reads it back, and checks that each of `paths` that exists on rank 0
// exists on it too. Cost: two broadcasts and one gather of a few bytes per rank, one small file
// that rank 0 removes again (with the directories it created for it). Returns "" when every rank
// sees the same, else (on every rank) one line naming the ranks and hosts that do not, e.g.
//   "output_dir /runs/a is not shared: ranks 2-3 (host n1) do not see the file rank 0 (host n0)
//    wrote there; every node must see the same output_dir (a shared file system)".
// When rank 0 cannot create the directory or the file, the probe is skipped (the output
// directory checks that follow report that with their own message).
std::string node_paths_check(const std::filesystem::path& output_dir, const KeyedPaths& paths,
                             const dist::RankEnv& env);

// Where the ranks run, on rank 0 (other ranks get ""): one line per job, e.g.
//   "placement: 2 node(s), 4 rank(s): n0: ranks 0-1 (local 0-1 of 2, 1 thread(s) each);
//    n1: ranks 2-3 (local 0-1 of 2, 1 thread(s) each)"
// `threads`: the intra-op threads this rank runs.
std::string placement_describe(const dist::RankEnv& env, int threads);

// This node's memory for the job in bytes: MemTotal of /proc/meminfo, or the cgroup's limit
// (memory.max, v2; memory.limit_in_bytes, v1) when lower. 0 when neither can be read.
int64_t node_memory_bytes();

// "0-3", "0,2,5-6": ascending rank lists as people write them.
std::string ranks_compact(const std::vector<int>& ranks);

}  // namespace qlora::app
