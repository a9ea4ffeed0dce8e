"""Running on clusters: the torchrun-style launcher, stop signals, a lost rank.

- launch/qlora_run: --dry-run prints the mpirun command each flag set maps to; real runs with 2
  and 3 processes train and finish;
- SIGTERM, SIGUSR1 or SIGINT to one rank: every rank finishes the step, a complete checkpoint is
  written, the job exits with status 75; resuming continues bit for bit (losses equal to an
  uninterrupted run);
- kill -9 of one rank: the job ends within seconds (no rank left in a collective) with a message
  naming the lost rank.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tiny_job import losses, make_tiny_job  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
BUILD = os.environ.get("QLORA_BUILD_DIR") or os.path.join(ROOT, "build")
QLORA = os.path.join(BUILD, "qlora_dist")
RUN = os.path.join(ROOT, "launch", "qlora_run")
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
           OMP_NUM_THREADS="1", QLORA_DIST=QLORA)
EXIT_PREEMPTED = 75


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "base.ini").write_text(make_tiny_job(QLORA, d, train_rows=960) + """[train]
per_device_train_batch_size = 2
gradient_accumulation_steps = 2
learning_rate = 3e-3
max_steps = 60
seed = 3
[output]
logging_steps = 1
""")
    return d


def launch(*args, timeout=300):
    t0 = time.monotonic()
    res = subprocess.run([RUN, *map(str, args)], capture_output=True, text=True, env=ENV,
                         timeout=timeout)
    res.seconds = time.monotonic() - t0
    return res


def test_dry_run_maps_torchrun_flags(tmp_path):
    res = launch("--dry-run", "--nproc-per-node", 3, "c.ini", "--train.max_steps=2")
    assert res.returncode == 0, res.stderr
    words = res.stdout.split()
    assert os.path.basename(words[0]) == "mpirun" and words[1:3] == ["-np", "3"], res.stdout
    assert res.stdout.rstrip().endswith(f"{QLORA} c.ini --train.max_steps=2")
    res = launch("--dry-run", "--nnodes", 2, "--nproc_per_node=4", "--hosts", "n1,n2",
                 "--master-addr", "n1", "--master-port", 29500, "c.ini")
    assert res.returncode == 0, res.stderr
    for part in ("-np 8", "ppr:4:node", "MASTER_ADDR=n1", "MASTER_PORT=29500", "n1:4", "n2:4"):
        assert part in res.stdout, res.stdout
    res = launch("--nnodes", 2, "--node-rank", 1, "c.ini")
    assert res.returncode == 0 and "nothing to do" in res.stdout
    for bad, msg in ((["--nproc-per-node", "x", "c.ini"], "not a whole number"),
                     (["--nnodes", 2, "c.ini"], "needs --hostfile or --hosts"),
                     (["--bogus", "c.ini"], "unknown flag --bogus"),
                     ([], "no config file")):
        res = launch(*bad)
        assert res.returncode == 2 and res.stderr.startswith("qlora_run: error:") and msg in res.stderr, res.stderr


@pytest.mark.parametrize("nproc", [2, 3])
def test_launcher_runs(data, tmp_path, nproc):
    # 2 ranks x 2 rows x 2 micro-steps and 3 x 2 x 2: global batches of 8 and 12.
    res = launch("--nproc-per-node", nproc, data / "base.ini", f"--output.output_dir={tmp_path / 'o'}",
                 "--train.max_steps=3")
    assert res.returncode == 0, res.stderr
    assert f"{nproc} rank(s)" in res.stdout
    assert json.load(open(tmp_path / "o" / "trainer_state.json"))["finished"] is True


def rank_pids(parent):
    out = subprocess.run(["pgrep", "-P", str(parent), "-f", "qlora_dist"], capture_output=True,
                         text=True).stdout.split()
    return sorted(int(p) for p in out)


def wait_for_step(out, step, proc, timeout=120):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"the job ended early: {proc.returncode}")
        try:
            if len(losses(out)) >= step:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    raise AssertionError("no progress")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "o"
    res = launch("--nproc-per-node", 2, data / "base.ini", f"--output.output_dir={out}")
    assert res.returncode == 0, res.stderr
    return losses(out)


@pytest.mark.parametrize("sig,repeat", [(signal.SIGTERM, 1), (signal.SIGUSR1, 1),
                                        (signal.SIGINT, 1), (signal.SIGTERM, 5)])
def test_stop_signal_checkpoints_and_resumes(data, reference, tmp_path, sig, repeat):
    """repeat 5: more SIGTERMs to every rank while the checkpoint is being written; they are
    ignored (the first one decided), so the checkpoint is still complete and resumes exactly."""
    out = tmp_path / "o"
    proc = subprocess.Popen(["mpirun", "--oversubscribe", "-np", "2", QLORA, str(data / "base.ini"),
                             f"--output.output_dir={out}"], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(out, 3, proc)
        pids = rank_pids(proc.pid)
        assert len(pids) == 2, pids
        os.kill(pids[1], sig)  # one rank only, as a scheduler signalling a node would
        for _ in range(repeat - 1):
            time.sleep(0.02)
            for p in pids:
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, stderr + stdout
    assert "received SIG" in stdout
    ckpts = sorted(p for p in os.listdir(out) if p.startswith("checkpoint-"))
    assert len(ckpts) == 1, os.listdir(out)
    step = int(ckpts[0].split("-")[1])
    assert 3 <= step < 60
    assert not json.load(open(out / "trainer_state.json" if (out / "trainer_state.json").exists()
                               else out / ckpts[0] / "trainer_state.json"))["finished"]
    assert not [p for p in os.listdir(out) if p.startswith(".")]
    # Resume: the rest of the run equals the uninterrupted one bit for bit.
    res = launch("--nproc-per-node", 2, data / "base.ini", f"--output.output_dir={out}")
    assert res.returncode == 0, res.stderr
    assert losses(out) == reference


def test_kill_9_ends_the_job(data, tmp_path):
    out = tmp_path / "o"
    proc = subprocess.Popen(["mpirun", "--oversubscribe", "-np", "3", QLORA, str(data / "base.ini"),
                             f"--output.output_dir={out}", "--train.per_device_train_batch_size=2",
                             "--train.gradient_accumulation_steps=1", "--train.max_steps=100000"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(out, 2, proc)
        pids = rank_pids(proc.pid)
        t0 = time.monotonic()
        os.kill(pids[1], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=60)
        ended = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert ended < 20, ended
    assert "rank 1" in stderr and "signal 9" in stderr, stderr[-2000:]
    assert not [p for p in rank_pids(proc.pid)]
