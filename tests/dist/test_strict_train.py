"""The trainer waits before it reads: whole `qlora_dist train` jobs on 2 ranks under the strict
communicator (QLORA_STRICT_COMM=1: every collective's output reads NaN until its Work::wait(),
src/dist/communicator.h) give exactly what the normal communicator gives.

The tiny preset (LLaMA, 4 layers, hidden 256, NF4, fp32 compute), LoRA rank 8 on all seven
linears, 4 steps of 2 micro-batches of 2 rows, evaluation and a checkpoint every 2 steps. Each
configuration runs twice, normal and strict; per-step loss, gradient norm, learning rate,
communicated bytes and eval loss must be equal (==, not approximately: the same arithmetic on the
same bytes), and so must the adapter files byte for byte. A gather buffer, a reduce-scattered or
all-reduced gradient read before its wait would read NaN: a NaN loss or norm (a skipped step), or
a NaN adapter. This is the discipline the CUDA path depends on (NCCL writes outputs
asynchronously on its own stream).
"""
import os
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tiny_job import MPI_ENV, MPIRUN, QLORA, make_tiny_job, metrics  # noqa: E402

STEPS = 4
BANNER = "communicator_mpi: strict mode (QLORA_STRICT_COMM=1)"
# (sharding, prefetch, gradient_checkpointing): gathers with one and two units in flight,
# recompute on and off (the backward gathers again or not), and the all-reduce of unsharded
# gradients instead of the reduce-scatter.
CONFIGS = [("full", 1, "true"), ("full", 2, "false"), ("none", 1, "true")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "base.ini").write_text(make_tiny_job(QLORA, d, train_rows=64, eval_rows=8) + f"""[finetuning]
lora_rank = 8
lora_alpha = 16
[train]
per_device_train_batch_size = 2
gradient_accumulation_steps = 2
learning_rate = 3e-3
max_steps = {STEPS}
seed = 5
do_eval = true
eval_steps = 2
[output]
logging_steps = 1
save_steps = 2
""")
    return d


def train(data, out, strict, *overrides, timeout=300):
    env = dict(MPI_ENV)
    env.pop("QLORA_STRICT_COMM", None)
    if strict is not None:
        env["QLORA_STRICT_COMM"] = strict
    t0 = time.monotonic()
    res = subprocess.run([MPIRUN, "--oversubscribe", "-np", "2", QLORA, "train", data / "base.ini",
                          f"--output.output_dir={out}", *overrides],
                         capture_output=True, text=True, env=env,
                         timeout=timeout * float(os.environ.get("QLORA_TIMEOUT_SCALE", "1")))
    res.seconds = time.monotonic() - t0
    return res


@pytest.mark.parametrize("sharding,prefetch,recompute", CONFIGS)
def test_strict_communicator_trains_bit_for_bit(data, tmp_path, sharding, prefetch, recompute):
    overrides = [f"--dist.sharding={sharding}", f"--dist.prefetch={prefetch}",
                 f"--train.gradient_checkpointing={recompute}"]
    runs = {}
    for mode, strict in (("normal", None), ("strict", "1")):
        res = train(data, tmp_path / mode, strict, *overrides)
        assert res.returncode == 0, f"{mode}: {res.stderr}{res.stdout}"
        # Strict mode really was on (rank 0 says so when QLORA_STRICT_COMM turns it on).
        assert (BANNER in res.stderr) == (mode == "strict"), res.stderr
        runs[mode] = metrics(tmp_path / mode)
        train_lines, eval_lines = runs[mode]
        assert [m["step"] for m in train_lines] == list(range(1, STEPS + 1)), mode
        # A NaN loss or norm (what reading before wait gives in strict mode) skips the step.
        for m in train_lines:
            assert m["skipped_steps"] == 0 and m["loss"] is not None, f"{mode} run: {m}"
        assert [m["step"] for m in eval_lines] == [2, 4], mode
    (normal_train, normal_eval), (strict_train, strict_eval) = runs["normal"], runs["strict"]
    keys = ("step", "loss", "grad_norm", "learning_rate", "comm_bytes", "skipped_steps")
    assert [[m[k] for k in keys] for m in strict_train] == \
        [[m[k] for k in keys] for m in normal_train]
    assert [(m["step"], m["eval_loss"]) for m in strict_eval] == \
        [(m["step"], m["eval_loss"]) for m in normal_eval]
    for f in ("adapter_model.safetensors", "checkpoint-2/adapter_model.safetensors",
              "checkpoint-4/adapter_model.safetensors"):
        normal_bytes = (tmp_path / "normal" / f).read_bytes()
        assert (tmp_path / "strict" / f).read_bytes() == normal_bytes, f


def test_bad_value_is_one_line_on_every_rank(data, tmp_path):
    res = train(data, tmp_path / "out", "yes")
    assert res.returncode != 0
    lines = [l for l in res.stderr.splitlines() if "QLORA_STRICT_COMM=yes" in l]
    assert sorted(l.split("]")[0] for l in lines) == ["[rank 0", "[rank 1"], res.stderr
    assert all("must be 1 (strict communicator) or 0" in l for l in lines), lines
    assert res.seconds < 60
