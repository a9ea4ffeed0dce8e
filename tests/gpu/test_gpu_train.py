"""Training on a GPU (ctest label gpu; skipped with one line where no GPU is visible).

- `mpirun -np 1 qlora_dist train` with model.device = cuda (NCCL) against model.device = cpu on
  the same tiny job for 5 steps: losses within 1e-4 relative and gradient norms within 1e-3
  relative at every step (fp32 on both sides; the products differ only in summation order, and
  the difference grows with the steps through AdamW's updates).
- The same with dist.backend = mpi on cuda (collectives staged through host memory): the losses
  of the NCCL run within 1e-5 relative (one rank: nothing is reduced, so only the GPU's own
  run-to-run variation remains; its attention backward may accumulate in a varying order).
- The caching allocator's peak (metrics.jsonl max_gpu_memory_bytes) is below the README's
  formula, which the run logs as its "GPU memory plan per rank".
"""
import json
import os
import re
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tiny_job import MPI_ENV, MPIRUN, QLORA, make_tiny_job, metrics  # noqa: E402


def gpus_visible():
    out = subprocess.run([QLORA, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"(\d+) GPU\(s\) visible", out)
    return int(m.group(1)) if m else 0, out.strip().replace("\n", "; ")


_COUNT, _VERSION = gpus_visible()
pytestmark = pytest.mark.skipif(_COUNT == 0, reason=f"no GPU visible ({_VERSION})")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu")
    ini = d / "job.ini"
    ini.write_text(make_tiny_job(QLORA, d, train_rows=64) + """[finetuning]
lora_rank = 8
lora_alpha = 16
[train]
per_device_train_batch_size = 4
learning_rate = 1e-3
max_steps = 5
seed = 3
[output]
logging_steps = 1
save_steps = 0
""")
    return d, ini


def train(job, name, *overrides):
    d, ini = job
    out = d / name
    res = subprocess.run([MPIRUN, "--oversubscribe", "-np", "1", QLORA, "train", str(ini),
                          f"--output.output_dir={out}", *overrides],
                         capture_output=True, text=True, env=MPI_ENV, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out, res.stdout


@pytest.fixture(scope="module")
def cpu_run(job):
    return train(job, "cpu", "--model.device=cpu")


@pytest.fixture(scope="module")
def cuda_run(job):
    return train(job, "cuda", "--model.device=cuda")


def test_cuda_matches_cpu(cpu_run, cuda_run):
    cpu, gpu = metrics(cpu_run[0])[0], metrics(cuda_run[0])[0]
    assert len(cpu) == len(gpu) == 5
    assert "device: cuda" in cuda_run[1] and "collectives: nccl" in cuda_run[1], cuda_run[1]
    for a, b in zip(cpu, gpu):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-3 * abs(a["grad_norm"]), (a, b)
        assert "max_gpu_memory_bytes" in b and "max_gpu_memory_bytes" not in a


def test_cuda_through_host_staged_mpi(job, cuda_run):
    out, log = train(job, "cuda-mpi", "--model.device=cuda", "--dist.backend=mpi")
    assert "collectives: mpi" in log, log
    staged, nccl = metrics(out)[0], metrics(cuda_run[0])[0]
    assert len(staged) == len(nccl) == 5
    for a, b in zip(staged, nccl):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]), (a, b)


def test_peak_gpu_memory_within_the_plan(cuda_run):
    out, log = cuda_run
    m = re.search(r"GPU memory plan per rank: .* = ([0-9.]+) MiB", log)
    assert m, log
    plan = float(m.group(1)) * 1048576
    peak = max(x["max_gpu_memory_bytes"] for x in metrics(out)[0])
    print(f"peak {peak / 1048576:.1f} MiB, plan {plan / 1048576:.1f} MiB")
    assert 0 < peak <= plan, (peak, plan)
