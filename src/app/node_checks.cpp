// Node checks and placement: see node_checks.h.
#include "app/node_checks.h"

#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <sstream>
#include <thread>

namespace fs = std::filesystem;

namespace qlora::app {

namespace {

// What rank 0 learns about each rank (MPI_Gather of the raw bytes; every rank runs the same
// binary, so the layout is the same).
struct RankInfo {
  char host[64];
  int32_t local_rank;
  int32_t local_size;
  int32_t threads;
  int32_t probe_ok;   // 1: read rank 0's probe file back, 0: did not, -1: no probe
  uint64_t present;   // bit i: paths[i] exists here
};

std::string host_name() {
  char buf[256] = {0};
  if (gethostname(buf, sizeof buf - 1) != 0) return "?";
  return buf;
}

RankInfo rank_info_local() {
  RankInfo info{};
  const std::string host = host_name();
  std::strncpy(info.host, host.c_str(), sizeof info.host - 1);
  return info;
}

std::vector<RankInfo> rank_info_gather(const RankInfo& mine, const dist::RankEnv& env) {
  std::vector<RankInfo> all(env.rank == 0 ? static_cast<size_t>(env.world_size) : 0);
  QLORA_MPI_CHECK(MPI_Gather(&mine, sizeof mine, MPI_BYTE, all.data(), sizeof mine, MPI_BYTE, 0,
                             MPI_COMM_WORLD));
  return all;
}

std::string string_bcast(const std::string& s, const dist::RankEnv& env) {
  int n = env.rank == 0 ? static_cast<int>(s.size()) : 0;
  QLORA_MPI_CHECK(MPI_Bcast(&n, 1, MPI_INT, 0, MPI_COMM_WORLD));
  std::string out = env.rank == 0 ? s : std::string(static_cast<size_t>(n), '\0');
  QLORA_MPI_CHECK(MPI_Bcast(out.data(), n, MPI_CHAR, 0, MPI_COMM_WORLD));
  return out;
}

// "ranks 2-3 (host n1), rank 5 (host n2)": the ranks of `which`, grouped by host.
std::string ranks_by_host(const std::vector<int>& which, const std::vector<RankInfo>& all) {
  std::vector<std::string> hosts;
  std::map<std::string, std::vector<int>> ranks;
  for (int r : which) {
    const std::string h = all[static_cast<size_t>(r)].host;
    if (!ranks.count(h)) hosts.push_back(h);
    ranks[h].push_back(r);
  }
  std::string out;
  for (const std::string& h : hosts) {
    const std::vector<int>& rs = ranks[h];
    if (!out.empty()) out += ", ";
    out += (rs.size() == 1 ? "rank " : "ranks ") + ranks_compact(rs) + " (host " + h + ")";
  }
  return out;
}

std::string random_hex(size_t n) {
  std::random_device rd;
  std::mt19937_64 gen((static_cast<uint64_t>(rd()) << 32) ^ rd() ^
                      static_cast<uint64_t>(getpid()) ^
                      static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()));
  static const char* digits = "0123456789abcdef";
  std::string s(n, '0');
  for (char& c : s) c = digits[gen() % 16];
  return s;
}

// Rank 0: the probe file (name, token) in dir, creating dir and its missing parents; `created`
// receives the directories it made (deepest first). Returns false when it could not.
bool probe_write(const fs::path& dir, const std::string& name, const std::string& token,
                 std::vector<fs::path>& created) {
  std::error_code ec;
  for (fs::path p = dir; !p.empty() && !fs::exists(p, ec); p = p.parent_path()) {
    created.push_back(p);
    if (p == p.parent_path()) break;
  }
  fs::create_directories(dir, ec);
  if (ec) return false;
  std::ofstream f(dir / name, std::ios::binary | std::ios::trunc);
  f << token;
  f.close();
  return static_cast<bool>(f);
}

bool probe_read(const fs::path& file, const std::string& token) {
  // A shared file system may show a new file to other clients a moment later (NFS attribute
  // caches): a few tries before calling it missing.
  for (int attempt = 0; attempt < 10; ++attempt) {
    std::ifstream f(file, std::ios::binary);
    std::stringstream s;
    s << f.rdbuf();
    if (f && s.str() == token) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return false;
}

}  // namespace

std::string ranks_compact(const std::vector<int>& ranks) {
  std::vector<int> r = ranks;
  std::sort(r.begin(), r.end());
  r.erase(std::unique(r.begin(), r.end()), r.end());
  std::string out;
  for (size_t i = 0; i < r.size();) {
    size_t j = i;
    while (j + 1 < r.size() && r[j + 1] == r[j] + 1) ++j;
    if (!out.empty()) out += ",";
    out += std::to_string(r[i]);
    if (j > i) out += "-" + std::to_string(r[j]);
    i = j + 1;
  }
  return out;
}

std::string node_paths_check(const fs::path& output_dir, const KeyedPaths& paths,
                             const dist::RankEnv& env) {
  if (env.world_size <= 1) return "";
  const size_t n_paths = std::min<size_t>(paths.size(), 64);
  // Rank 0 writes the probe; "" means it could not (the output_dir checks say why later).
  std::string probe;  // "name\ntoken"
  std::vector<fs::path> created;
  if (env.rank == 0) {
    const std::string name = ".qlora_node_probe-" + random_hex(16);
    const std::string token = random_hex(32);
    if (probe_write(output_dir, name, token, created)) probe = name + "\n" + token;
  }
  probe = string_bcast(probe, env);

  RankInfo mine = rank_info_local();
  mine.probe_ok = -1;
  if (!probe.empty()) {
    const size_t nl = probe.find('\n');
    mine.probe_ok = probe_read(output_dir / probe.substr(0, nl), probe.substr(nl + 1)) ? 1 : 0;
  }
  for (size_t i = 0; i < n_paths; ++i) {
    std::error_code ec;
    if (fs::exists(paths[i].second, ec)) mine.present |= uint64_t{1} << i;
  }
  const std::vector<RankInfo> all = rank_info_gather(mine, env);

  std::string message;
  if (env.rank == 0) {
    std::error_code ec;
    if (!probe.empty()) fs::remove(output_dir / probe.substr(0, probe.find('\n')), ec);
    for (const fs::path& d : created) fs::remove(d, ec);  // deepest first; only if empty

    std::vector<std::string> problems;
    std::vector<int> blind;
    for (int r = 1; r < env.world_size; ++r)
      if (all[static_cast<size_t>(r)].probe_ok == 0) blind.push_back(r);
    if (!blind.empty())
      problems.push_back("output_dir " + output_dir.string() + " is not shared: " +
                         ranks_by_host(blind, all) + (blind.size() == 1 ? " does" : " do") +
                         " not see the file rank 0 (host " + all[0].host +
                         ") wrote there; every node must see the same output_dir (a shared file "
                         "system)");
    for (size_t i = 0; i < n_paths; ++i) {
      const uint64_t bit = uint64_t{1} << i;
      if (!(all[0].present & bit)) continue;  // rank 0 misses it too: the usual checks say so
      std::vector<int> missing;
      for (int r = 1; r < env.world_size; ++r)
        if (!(all[static_cast<size_t>(r)].present & bit)) missing.push_back(r);
      if (!missing.empty())
        problems.push_back(paths[i].first + " " + paths[i].second + " does not exist on " +
                           ranks_by_host(missing, all) + " (rank 0 on host " + all[0].host +
                           " has it); every node must see the model and the data at the same path");
    }
    for (const std::string& p : problems) message += (message.empty() ? "" : "; ") + p;
  }
  return string_bcast(message, env);
}

std::string placement_describe(const dist::RankEnv& env, int threads) {
  RankInfo mine = rank_info_local();
  mine.local_rank = env.local_rank;
  mine.local_size = env.local_world_size;
  mine.threads = threads;
  const std::vector<RankInfo> all = rank_info_gather(mine, env);
  if (env.rank != 0) return "";
  std::vector<std::string> hosts;
  std::map<std::string, std::vector<int>> ranks;
  for (int r = 0; r < env.world_size; ++r) {
    const std::string h = all[static_cast<size_t>(r)].host;
    if (!ranks.count(h)) hosts.push_back(h);
    ranks[h].push_back(r);
  }
  std::string out = "placement: " + std::to_string(hosts.size()) + " node(s), " +
                    std::to_string(env.world_size) + " rank(s):";
  for (size_t k = 0; k < hosts.size(); ++k) {
    const std::vector<int>& rs = ranks[hosts[k]];
    std::vector<int> local;
    std::vector<int> sizes, threads_of;
    for (int r : rs) {
      local.push_back(all[static_cast<size_t>(r)].local_rank);
      sizes.push_back(all[static_cast<size_t>(r)].local_size);
      threads_of.push_back(all[static_cast<size_t>(r)].threads);
    }
    auto same = [](const std::vector<int>& v) {
      return std::all_of(v.begin(), v.end(), [&](int x) { return x == v[0]; });
    };
    out += (k ? "; " : " ") + hosts[k] + ": " + (rs.size() == 1 ? "rank " : "ranks ") +
           ranks_compact(rs) + " (local " + ranks_compact(local) + " of " +
           (same(sizes) ? std::to_string(sizes[0]) : ranks_compact(sizes)) + ", " +
           (same(threads_of) ? std::to_string(threads_of[0]) + " thread(s) each"
                             : "threads " + ranks_compact(threads_of)) +
           ")";
    // MPI's node-local ranks (shared-memory domains) should match the host names.
    std::vector<int> sorted_local = local;
    std::sort(sorted_local.begin(), sorted_local.end());
    bool consistent = same(sizes) && sizes[0] == static_cast<int>(rs.size());
    for (size_t i = 0; consistent && i < sorted_local.size(); ++i)
      consistent = sorted_local[i] == static_cast<int>(i);
    if (!consistent) out += " [MPI's node-local ranks do not match the host names]";
  }
  return out;
}

int64_t node_memory_bytes() {
  int64_t total = 0;
  {
    std::ifstream in("/proc/meminfo");
    std::string key;
    int64_t kib = 0;
    while (in >> key >> kib) {
      if (key == "MemTotal:") {
        total = kib * 1024;
        break;
      }
      in.ignore(std::numeric_limits<std::streamsize>::max(), '\n');
    }
  }
  for (const char* path :
       {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"}) {
    std::ifstream in(path);
    int64_t limit = 0;
    if (in >> limit && limit > 0 && (total == 0 || limit < total)) total = limit;  // "max": no limit
  }
  return total;
}

}  // namespace qlora::app
