// Where this process stands in the job: rank, world size and local rank from MPI (the local rank
// from MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)), cross-checked against what the launcher put in
// the environment (Open MPI's OMPI_COMM_WORLD_*, SLURM's SLURM_PROCID / SLURM_NTASKS, torchrun's
// RANK / WORLD_SIZE / LOCAL_RANK). Also the one way a rank ends the whole job on a fatal error.
#pragma once

#include <mpi.h>

#include <string>
#include <vector>

namespace qlora::dist {

struct RankEnv {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;        // among the ranks on this node
  int local_world_size = 1;  // ranks on this node
  int thread_level = 0;      // MPI_THREAD_* that MPI granted
  std::string launcher;      // "mpirun", "srun", "torchrun-style env" or "singleton"
};

// MPI_Init_thread asking for MPI_THREAD_MULTIPLE (the communication thread makes MPI calls while
// the main thread may abort); at least MPI_THREAD_SERIALIZED is required, else
// std::runtime_error. Then the rank numbers and the cross-checks: an environment that says the
// job has a different size or this process a different rank than MPI does (e.g. WORLD_SIZE=4
// but a singleton MPI world because the binary was started without mpirun / srun --mpi=pmix) is
// std::runtime_error naming both values and how to launch.
RankEnv rank_env_init(int* argc, char*** argv);

// The launcher's view from environment variables alone, for messages and tests: every variable
// that was found, as "NAME=value".
std::vector<std::string> rank_env_launcher_vars();

// This process's rank in MPI_COMM_WORLD, or -1 when MPI is not (or no longer) running: for
// error messages from anywhere.
int world_rank_or_unknown();

// MPI_Finalize if MPI is initialized and not finalized.
void rank_env_finalize();

// A fatal error on this rank: prints `line` (prefixed "[rank R] " when world_size > 1) on stderr,
// flushes, and ends the whole job with exit status `code`: MPI_Abort(MPI_COMM_WORLD) when more
// than one rank runs, so no rank is left waiting in a collective; exit(code) otherwise.
[[noreturn]] void job_abort(const std::string& line, int code);

// Raw MPI calls go through this: on an error it reports file, line, rank and MPI's error string
// and throws std::runtime_error.
void mpi_check(int err, const char* call, const char* file, int line);
#define QLORA_MPI_CHECK(call) ::qlora::dist::mpi_check((call), #call, __FILE__, __LINE__)

}  // namespace qlora::dist
