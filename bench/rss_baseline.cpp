// The memory a rank of qlora_dist holds before it loads anything: libtorch, MPI, the
// communicator's thread, intra-op threads, one small GEMM (so that the BLAS code and its
// per-thread buffers are in). Each rank prints "rank R: VmRSS <kB> kB VmHWM <kB> kB", read from
// /proc/self/status, the numbers bench/run_scaling.sh subtracts as "libtorch baseline".
// Usage: mpirun -np N bench_rss_baseline [THREADS (default 1)]
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdio>
#include <fstream>
#include <memory>
#include <string>

#include "dist/communicator.h"
#include "dist/rank_env.h"

namespace {

// The value of `key` (e.g. "VmHWM:") in /proc/self/status, in kB; -1 when absent.
long status_kb(const std::string& key) {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind(key, 0) == 0) return std::stol(line.substr(key.size()));
  return -1;
}

}  // namespace

int main(int argc, char** argv) {
  const qlora::dist::RankEnv env = qlora::dist::rank_env_init(&argc, &argv);
  {
    at::set_num_threads(argc > 1 ? std::stoi(argv[1]) : 1);
    std::unique_ptr<qlora::dist::Communicator> comm = qlora::dist::communicator_mpi(env);
    const at::Tensor a = at::randn({128, 2048});
    const at::Tensor w = at::randn({2048, 256});
    const double s = at::mm(a, w).sum().item<double>();
    comm->barrier();
    std::printf("rank %d: VmRSS %ld kB VmHWM %ld kB (checksum %.1f)\n", env.rank,
                status_kb("VmRSS:"), status_kb("VmHWM:"), s);
    std::fflush(stdout);
    comm->barrier();
  }
  qlora::dist::rank_env_finalize();
  return 0;
}
