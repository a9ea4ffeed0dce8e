"""The GPU path is wired into the qlora_dist binary, not only compiled (CUDA builds only).

The linker keeps an object of a static library only when something references it, so CUDA and
NCCL code that nothing calls compiles, links, and is silently absent from the binary. This test
reads the binary's symbol tables (binutils' nm) and fails naming every missing entry point:
  - NCCL and CUDA runtime functions the GPU path calls: undefined dynamic symbols of the binary
    (resolved from libnccl.so.2 and libcudart.so at run time, as CMake links them);
  - our own CUDA host code, statically linked: defined symbols (demangled);
  - device code: the binary carries a CUDA fat binary (.nv_fatbin section).
Runs without a GPU: nothing is executed but nm and readelf.
"""
import os
import subprocess

BUILD = os.environ.get("QLORA_BUILD_DIR") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "build")
QLORA = os.path.join(BUILD, "qlora_dist")

# Every entry point the GPU path needs, in one place (issue 11, "Train on CUDA GPUs with NCCL").
NCCL = [
    "ncclGetUniqueId",        # rank 0 makes the id, MPI_Bcast sends it
    "ncclCommInitRank",
    "ncclAllGather",          # unit gathers (ncclUint8, count in bytes)
    "ncclReduceScatter",      # LoRA gradients (fp32, sum)
    "ncclAllReduce",          # unsharded gradients, step scalars
    "ncclBroadcast",
    "ncclCommGetAsyncError",  # polled by every wait with the dist.timeout_s deadline
    "ncclCommAbort",          # on error or timeout, before MPI_Abort
    "ncclCommDestroy",
]
CUDA_RUNTIME = [
    "cudaGetDeviceCount",         # placement: a GPU per local rank
    "cudaSetDevice",
    "cudaStreamCreateWithFlags",  # the communication stream
    "cudaEventRecord",            # hand-offs between the compute and communication streams
    "cudaStreamWaitEvent",
    "cudaEventQuery",             # Work::done() and the polling wait
]
# Our CUDA host code (kernels/quant4_cuda.cu, src/quant, src/dist): demangled name prefixes.
DEFINED = [
    "qlora::kernels::dequantize_4bit_cuda(",       # fp32 output launcher
    "qlora::kernels::dequantize_4bit_bf16_cuda(",  # bf16 output launcher
    "qlora::quant::dequantize_4bit_into_cuda(",    # the device dispatch of dequantize_4bit_into
    "qlora::dist::communicator_nccl(",             # the NCCL communicator's factory
]


def nm(*args):
    res = subprocess.run(["nm", *args, QLORA], capture_output=True, text=True)
    assert res.returncode == 0, f"nm {' '.join(args)} {QLORA}: {res.stderr}"
    return res.stdout.splitlines()


def test_binary_references_the_gpu_entry_points():
    assert os.path.exists(QLORA), f"{QLORA} is not built"
    # "                 U cudaEventRecord@libcudart.so.13" -> "cudaEventRecord"
    undefined = {line.split()[-1].split("@")[0] for line in nm("-D", "--undefined-only")
                 if line.strip()}
    # "0000000000220f60 T qlora::kernels::dequantize_4bit_cuda(unsigned char const*, ...)"
    defined = [line.split(" ", 2)[2] for line in nm("-C", "--defined-only")
               if len(line.split(" ", 2)) == 3 and line.split(" ", 2)[1] in "TtWw"]
    missing = [f"{name} (undefined reference to libnccl)" for name in NCCL if name not in undefined]
    missing += [f"{name} (undefined reference to libcudart)" for name in CUDA_RUNTIME
                if name not in undefined]
    missing += [f"{prefix}...) (defined function)" for prefix in DEFINED
                if not any(d.startswith(prefix) for d in defined)]
    sections = subprocess.run(["readelf", "-S", "-W", QLORA], capture_output=True, text=True)
    assert sections.returncode == 0, sections.stderr
    if ".nv_fatbin" not in sections.stdout:
        missing.append(".nv_fatbin (section holding the CUDA device code)")
    assert not missing, (
        f"{QLORA} lacks {len(missing)} GPU entry point(s): the code is compiled but nothing in "
        "the binary calls it, so the linker left it out:\n  " + "\n  ".join(missing))
