// abort_probe: a job in which the last rank fails while the other ranks wait for it in a
// collective. The job must end through job_abort (MPI_Abort) with the failing rank's message,
// never hang. Driven by abort_probe_test.sh:
//   abort_probe throw   the last rank throws; the others block in a barrier on the communicator
//   abort_probe stuck   the last rank starts a barrier on the communicator and then throws, while
//                       the others block in MPI_Barrier(MPI_COMM_WORLD): the communicator is
//                       destroyed during unwinding with its thread inside a collective that
//                       will never complete
// Started without mpirun but with WORLD_SIZE=4 RANK=0, rank_env_init itself fails.
#include <chrono>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <thread>

#include "dist/communicator.h"
#include "dist/rank_env.h"

namespace {

using namespace qlora::dist;

void probe_run(const RankEnv& env, const std::string& mode) {
  auto comm = communicator_mpi(env);
  comm->barrier();  // everyone is up
  bool fails = env.rank == env.world_size - 1;
  std::string failure = "rank " + std::to_string(env.rank) + " failed on purpose";
  if (mode == "throw") {
    if (fails) throw std::runtime_error(failure);
    comm->barrier();  // the last rank never comes
  } else if (mode == "stuck") {
    if (fails) {
      Work never = comm->barrier_start();
      // Long enough for the communication thread to be inside MPI_Barrier when we unwind.
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      throw std::runtime_error(failure);
    }
    QLORA_MPI_CHECK(MPI_Barrier(MPI_COMM_WORLD));
  } else {
    throw std::invalid_argument("unknown mode '" + mode + "' (throw or stuck)");
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string mode = argc > 1 ? argv[1] : "throw";
  try {
    RankEnv env = rank_env_init(&argc, &argv);
    probe_run(env, mode);
  } catch (const std::exception& e) {
    job_abort(std::string("abort_probe: ") + e.what(), 3);
  }
  rank_env_finalize();
  return 0;
}
