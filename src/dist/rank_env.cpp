// The rank environment: MPI_Init_thread, rank / world size from MPI_COMM_WORLD, local rank from
// MPI_Comm_split_type(SHARED), and the cross-checks against the launcher's variables (a job whose
// environment and MPI disagree fails here with one line instead of training N copies of rank 0).
#include "dist/rank_env.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace qlora::dist {
namespace {

bool mpi_usable() {
  int initialized = 0;
  int finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  return initialized && !finalized;
}

}  // namespace

int world_rank_or_unknown() {
  int rank = -1;
  if (mpi_usable()) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

namespace {

int world_size_or_one() {
  int size = 1;
  if (mpi_usable()) MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

const char* env_or_null(const char* name) {
  const char* value = std::getenv(name);
  return (value != nullptr && value[0] != '\0') ? value : nullptr;
}

// A launcher variable as a non-negative integer; unset means nullopt, garbage is an error.
std::optional<long> env_int(const char* name) {
  const char* value = env_or_null(name);
  if (value == nullptr) return std::nullopt;
  errno = 0;
  char* end = nullptr;
  long parsed = std::strtol(value, &end, 10);
  if (errno != 0 || *end != '\0' || parsed < 0) {
    throw std::runtime_error(std::string("rank environment: ") + name + "='" + value +
                             "' is not a non-negative integer");
  }
  return parsed;
}

// Started by Open MPI's mpirun (its daemons set the HNP contact). Inside a SLURM allocation those
// daemons were themselves started by srun, so their SLURM_PROCID is a node index, not our rank.
bool under_mpirun() {
  return env_or_null("OMPI_COMM_WORLD_SIZE") != nullptr &&
         env_or_null("OMPI_MCA_orte_hnp_uri") != nullptr;
}

// Inside an srun job step, not the batch script's step (SLURM_STEP_ID "batch"/"extern" in some
// versions, one of the reserved ids 0xfffffff0.. in others).
bool in_slurm_step() {
  const char* step = env_or_null("SLURM_STEP_ID");
  if (step == nullptr) return false;
  char* end = nullptr;
  unsigned long long id = std::strtoull(step, &end, 10);
  if (*end != '\0') return false;
  return id < 0xfffffff0ULL;
}

std::string launch_hint(long world_size) {
  std::string n = std::to_string(world_size);
  return "start every rank through an MPI launcher: mpirun -np " + n + " ..., srun --mpi=pmix -n " +
         n + " ..., or launch/qlora_run --nproc-per-node " + n + " ...";
}

// Throws when the variable is set and differs from what MPI says.
void cross_check(const char* name, long mpi_value, const char* what, const std::string& launcher,
                 long hint_world_size) {
  std::optional<long> value = env_int(name);
  if (!value || *value == mpi_value) return;
  throw std::runtime_error("rank environment: " + std::string(name) + "=" +
                           std::to_string(*value) + " but MPI says " + what + " " +
                           std::to_string(mpi_value) + " (launcher: " + launcher + "); " +
                           launch_hint(hint_world_size));
}

}  // namespace

RankEnv rank_env_init(int* argc, char*** argv) {
  RankEnv env;
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    QLORA_MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &env.thread_level));
  } else {
    QLORA_MPI_CHECK(MPI_Query_thread(&env.thread_level));
  }
  if (env.thread_level < MPI_THREAD_SERIALIZED) {
    throw std::runtime_error(
        "rank environment: MPI granted thread level " + std::to_string(env.thread_level) +
        ", below MPI_THREAD_SERIALIZED; the communication thread needs MPI_THREAD_MULTIPLE "
        "(an Open MPI built with thread support)");
  }
  QLORA_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &env.rank));
  QLORA_MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &env.world_size));
  MPI_Comm local = MPI_COMM_NULL;
  QLORA_MPI_CHECK(
      MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, env.rank, MPI_INFO_NULL, &local));
  QLORA_MPI_CHECK(MPI_Comm_rank(local, &env.local_rank));
  QLORA_MPI_CHECK(MPI_Comm_size(local, &env.local_world_size));
  QLORA_MPI_CHECK(MPI_Comm_free(&local));

  bool torchrun_vars = env_or_null("RANK") != nullptr || env_or_null("WORLD_SIZE") != nullptr;
  if (under_mpirun()) {
    env.launcher = "mpirun";
  } else if (in_slurm_step()) {
    env.launcher = "srun";
  } else if (torchrun_vars) {
    env.launcher = "torchrun-style env";
  } else {
    env.launcher = "singleton";
  }

  // Sizes first: a wrong size explains a wrong rank. The hint names the size the launcher meant.
  long meant = env.world_size;
  for (const char* name : {"WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS"}) {
    if (std::optional<long> v = env_int(name)) meant = std::max(meant, *v);
  }
  cross_check("OMPI_COMM_WORLD_SIZE", env.world_size, "world size", env.launcher, meant);
  cross_check("OMPI_COMM_WORLD_RANK", env.rank, "rank", env.launcher, meant);
  if (in_slurm_step() && !under_mpirun()) {
    cross_check("SLURM_NTASKS", env.world_size, "world size", env.launcher, meant);
    cross_check("SLURM_PROCID", env.rank, "rank", env.launcher, meant);
  }
  cross_check("WORLD_SIZE", env.world_size, "world size", env.launcher, meant);
  cross_check("RANK", env.rank, "rank", env.launcher, meant);
  cross_check("LOCAL_WORLD_SIZE", env.local_world_size, "local world size", env.launcher, meant);
  cross_check("LOCAL_RANK", env.local_rank, "local rank", env.launcher, meant);
  return env;
}

std::vector<std::string> rank_env_launcher_vars() {
  static const char* const kNames[] = {
      "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
      "OMPI_COMM_WORLD_LOCAL_SIZE", "PMIX_RANK", "SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_PROCID",
      "SLURM_LOCALID", "SLURM_NTASKS", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
      "MASTER_ADDR", "MASTER_PORT"};
  std::vector<std::string> found;
  for (const char* name : kNames) {
    if (const char* value = env_or_null(name)) found.push_back(std::string(name) + "=" + value);
  }
  return found;
}

void rank_env_finalize() {
  if (mpi_usable()) MPI_Finalize();
}

[[noreturn]] void job_abort(const std::string& line, int code) {
  int world_size = world_size_or_one();
  std::string text = line;
  if (world_size > 1) text = "[rank " + std::to_string(world_rank_or_unknown()) + "] " + text;
  if (text.empty() || text.back() != '\n') text += '\n';
  std::cout.flush();
  std::fflush(stdout);
  // One write, so that lines of several failing ranks do not interleave mid-line.
  std::fwrite(text.data(), 1, text.size(), stderr);
  std::fflush(stderr);
  if (world_size > 1) MPI_Abort(MPI_COMM_WORLD, code);
  std::exit(code);
}

void mpi_check(int err, const char* call, const char* file, int line) {
  if (err == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING] = {0};
  int length = 0;
  if (MPI_Error_string(err, text, &length) != MPI_SUCCESS) {
    std::snprintf(text, sizeof text, "MPI error code %d", err);
  }
  int rank = world_rank_or_unknown();
  throw std::runtime_error(std::string(file) + ":" + std::to_string(line) + ": " + call +
                           " failed on rank " + (rank >= 0 ? std::to_string(rank) : "?") + ": " +
                           text);
}

}  // namespace qlora::dist
