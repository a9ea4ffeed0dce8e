"""Stalled ranks and non-finite steps: real mpirun jobs on the tiny model and synthetic data.

- watchdog: a 3-rank run with dist.timeout_s = 5 whose rank 1 is SIGSTOPped after a few steps
  ends within timeout + 20 s, non-zero, with one line naming the collective (kind, number, step,
  unit) and the stopped rank;
- non-finite steps (QLORA_FAULT_NAN_AT_STEP, a test-only fault that makes the last rank's loss
  NaN at the given steps): one such step is skipped on every rank (no update, the learning-rate
  schedule does not advance, skipped_steps counted) and training goes on; max_skipped_steps in a
  row stop the run with exit status 1 on every rank after checkpoint-<last good step>, from which
  a resume continues bit for bit like the run that never met a NaN.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tiny_job import make_tiny_job, metrics  # noqa: E402

BUILD = os.environ.get("QLORA_BUILD_DIR") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "build")
QLORA = os.path.join(BUILD, "qlora_dist")
MPIRUN = os.environ.get("MPIRUN", "mpirun")
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
           OMP_NUM_THREADS="1")
ENV.pop("QLORA_FAULT_NAN_AT_STEP", None)
TIMEOUT_S = 5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "base.ini").write_text(make_tiny_job(QLORA, d, train_rows=480) + """[finetuning]
lora_rank = 8
lora_alpha = 16
[train]
per_device_train_batch_size = 2
learning_rate = 3e-3
lr_scheduler_type = linear
warmup_steps = 1
max_steps = 6
seed = 5
[output]
logging_steps = 1
""")
    return d


def mpirun(np_, *args, env=None, timeout=300):
    """Every rank's exit status too: each rank runs under sh, which writes it to rc.<rank>."""
    rc_dir = args[0].parent if hasattr(args[0], "parent") else "."
    wrapped = ("\"$@\"; rc=$?; echo $rc > " + str(rc_dir) + "/rc.$OMPI_COMM_WORLD_RANK; exit $rc")
    res = subprocess.run([MPIRUN, "--oversubscribe", "-np", str(np_), "sh", "-c", wrapped, "sh",
                          QLORA, *map(str, args[1:])], capture_output=True, text=True,
                         env=dict(ENV, **(env or {})), timeout=timeout)
    res.rank_rcs = [int(open(os.path.join(rc_dir, f"rc.{r}")).read())
                    for r in range(np_) if os.path.exists(os.path.join(rc_dir, f"rc.{r}"))]
    return res


def train(np_, data, out, *overrides, env=None):
    out.parent.mkdir(parents=True, exist_ok=True)
    return mpirun(np_, out.parent, data / "base.ini", f"--output.output_dir={out}", *overrides,
                  env=env)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """6 steps on 2 ranks that never meet a NaN."""
    out = tmp_path_factory.mktemp("ref") / "out"
    res = train(2, data, out)
    assert res.returncode == 0, res.stderr
    return out


def test_watchdog_names_collective_and_stopped_rank(data, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([MPIRUN, "--oversubscribe", "-np", "3", QLORA, data / "base.ini",
                             f"--output.output_dir={out}", "--train.max_steps=100000",
                             f"--dist.timeout_s={TIMEOUT_S}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    pids = []
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 120:  # a few steps first
            assert proc.poll() is None, f"the job ended early: {proc.returncode}"
            try:
                if len(metrics(out)[0]) >= 3:
                    break
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            time.sleep(0.05)
        else:
            raise AssertionError("no progress")
        pids = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "qlora_dist"],
                                               capture_output=True, text=True).stdout.split()]
        rank_of = {}
        for p in pids:
            env = open(f"/proc/{p}/environ", "rb").read().split(b"\0")
            rank_of[int(next(e for e in env if e.startswith(b"OMPI_COMM_WORLD_RANK=")).split(
                b"=")[1])] = p
        assert sorted(rank_of) == [0, 1, 2], rank_of
        victim = rank_of[1]
        os.kill(victim, signal.SIGSTOP)
        t_stop = time.monotonic()
        _, err = proc.communicate(timeout=TIMEOUT_S + 60)
        elapsed = time.monotonic() - t_stop
    finally:
        for p in pids:
            for s in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(p, s)
                except ProcessLookupError:
                    pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"the job ended {elapsed:.1f} s after SIGSTOP (dist.timeout_s = {TIMEOUT_S})")
    assert proc.returncode != 0
    assert elapsed < TIMEOUT_S + 20, f"{elapsed:.1f} s"
    lines = [l for l in err.splitlines() if "watchdog:" in l]
    assert lines, err
    line = lines[0]
    # "[rank 0] watchdog: all_gather #202 (step 8, gather of lora.1) did not complete within
    #  dist.timeout_s = 5.0 s (waited 5.0 s); rank 1 had not arrived and is not running ..."
    assert any(k in line for k in ("all_gather #", "reduce_scatter #", "all_reduce #",
                                   "barrier #")), line
    assert "(step " in line and f"dist.timeout_s = {TIMEOUT_S}.0 s" in line, line
    assert "rank 1 " in line and "not running" in line, line
    # The other ranks may be waiting on another collective (rank 1 stopped before it), and the
    # line may say so ("rank 0 had not arrived (still running: busy elsewhere)"); only the
    # stopped rank is named as not running.
    for other in ("rank 0 ", "rank 2 "):
        said = line.split("watchdog:")[1].split(other)[1].split(";")[0] if other in \
            line.split("watchdog:")[1] else ""
        assert "not running" not in said, line


def test_one_nan_step_is_skipped_and_counted(data, reference, tmp_path):
    out = tmp_path / "out"
    res = train(2, data, out, env={"QLORA_FAULT_NAN_AT_STEP": "3"})
    assert res.returncode == 0, res.stderr
    assert res.rank_rcs == [0, 0]
    assert "step 3: non-finite loss or gradient norm" in res.stdout, res.stdout
    got, ref = metrics(out)[0], metrics(reference)[0]
    assert [m["step"] for m in got] == list(range(1, 7))
    assert [m["skipped_steps"] for m in got] == [0, 0, 1, 1, 1, 1]
    assert [m["skipped_steps"] for m in ref] == [0] * 6
    # Before the NaN: the same run bit for bit; at step 3 no loss to report.
    assert [m["loss"] for m in got[:2]] == [m["loss"] for m in ref[:2]]
    assert got[2]["loss"] is None and got[2]["grad_norm"] is None
    # The schedule follows the updates made: step k + 1 runs at the rate of the reference's step k.
    assert [m["learning_rate"] for m in got[3:]] == [m["learning_rate"] for m in ref[2:5]]
    # Training went on: finite losses that keep falling below where the NaN hit.
    later = [m["loss"] for m in got[3:]]
    assert all(math.isfinite(l) for l in later) and later[-1] < got[0]["loss"], later
    adapter = load_file(out / "adapter_model.safetensors")
    assert all(np.isfinite(v).all() for v in adapter.values())
    state = json.load(open(out / "trainer_state.json"))
    assert state["step"] == 6 and state["optimizer_steps"] == 5, state


def test_max_skipped_steps_stops_with_last_good_checkpoint(data, reference, tmp_path):
    out = tmp_path / "out"
    res = train(2, data, out, "--train.max_skipped_steps=2",
                env={"QLORA_FAULT_NAN_AT_STEP": "3-"})
    assert res.returncode != 0
    assert res.rank_rcs == [1, 1], (res.rank_rcs, res.stderr)
    want = ("qlora_dist train: error: 2 steps in a row had a non-finite loss or gradient norm "
            "(last at step 4); stopped; checkpoint-2 holds the last good state")
    assert [l for l in res.stderr.splitlines() if "non-finite" in l][0].startswith(want), res.stderr
    assert [m["step"] for m in metrics(out)[0]] == [1, 2, 3, 4]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert json.load(open(out / "checkpoint-2" / "trainer_state.json"))["optimizer_steps"] == 2
    # checkpoint-2 is the state after step 2: resuming without the fault continues exactly
    # like the run that never met a NaN.
    res = train(2, data, out)
    assert res.returncode == 0, res.stderr
    assert "resumed from" in res.stdout and "at step 2" in res.stdout, res.stdout
    got, ref = metrics(out)[0], metrics(reference)[0]  # steps 1-2 kept, 3-6 from the resume
    assert [m["step"] for m in got] == list(range(1, 7))
    assert [m["loss"] for m in got] == [m["loss"] for m in ref]
    assert [m["skipped_steps"] for m in got] == [0] * 6
