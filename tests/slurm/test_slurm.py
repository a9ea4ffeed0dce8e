"""The sbatch scripts on a real one-node SLURM (slurm-wlm 22.05 + munge from Debian) started on
localhost for this module by tests/slurm/slurm_cluster.sh and stopped afterwards.

- slurm/qlora_single_node.sbatch and slurm/qlora.sbatch (on one node: --nodes=1 on the sbatch
  command line) run `srun --mpi=pmix qlora_dist` and train to the end; their losses equal the same
  run under mpirun bit for bit;
- preemption: USR1 to the batch shell (what --signal=B:USR1@120 does before the time limit) is
  forwarded to the job step, every rank checkpoints, the step exits 75, the script requeues the
  job, and the requeued job resumes and finishes with the losses of an uninterrupted run.
SLURM makes a requeued job eligible only ~2 minutes later; the test moves its start time to now
(scontrol update StartTime=now) instead of waiting.
"""
import json
import os
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tiny_job import free_port_pair, job_field, losses, make_tiny_job, requeued_run_to_end  # noqa: E402,E501

ROOT = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
BUILD = os.environ.get("QLORA_BUILD_DIR") or os.path.join(ROOT, "build")
QLORA = os.path.join(BUILD, "qlora_dist")
CLUSTER = os.path.join(ROOT, "tests", "slurm", "slurm_cluster.sh")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ, QLORA_SLURM_PORT=str(free_port_pair()))
    res = subprocess.run(["bash", CLUSTER, "start", str(d)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    env = dict(os.environ, SLURM_CONF=res.stdout.strip(), QLORA_HOME=ROOT, QLORA_DIST=QLORA,
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")
    yield env
    subprocess.run(["bash", CLUSTER, "stop", str(d)], timeout=120)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "base.ini").write_text(make_tiny_job(QLORA, d, train_rows=480) + """[train]
per_device_train_batch_size = 4
learning_rate = 3e-3
max_steps = 40
seed = 3
[output]
logging_steps = 1
""")
    return d


@pytest.fixture(scope="module")
def reference(data, slurm, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "o"
    res = subprocess.run(["mpirun", "--oversubscribe", "-np", "2", QLORA, str(data / "base.ini"),
                          f"--output.output_dir={out}"], capture_output=True, text=True, env=slurm,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    return losses(out)


def sbatch(env, *args, wait=True):
    cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_single_node_script(slurm, data, reference, tmp_path):
    out, log = tmp_path / "o", tmp_path / "job.out"
    res = sbatch(slurm, "--ntasks=2", f"--output={log}", os.path.join(ROOT, "slurm", "qlora_single_node.sbatch"),
                 data / "base.ini", f"--output.output_dir={out}")
    assert res.returncode == 0, res.stderr + (log.read_text() if log.exists() else "")
    text = log.read_text()
    assert "2 rank(s)" in text and "qlora_step.sh: job" in text
    assert json.load(open(out / "trainer_state.json"))["finished"] is True
    assert losses(out) == reference


def test_multi_node_script_three_tasks(slurm, data, tmp_path):
    out, log = tmp_path / "o", tmp_path / "job.out"
    res = sbatch(slurm, "--nodes=1", "--ntasks-per-node=3", f"--output={log}",
                 os.path.join(ROOT, "slurm", "qlora.sbatch"), data / "base.ini",
                 f"--output.output_dir={out}", "--train.max_steps=4")
    assert res.returncode == 0, res.stderr + (log.read_text() if log.exists() else "")
    assert "3 rank(s)" in log.read_text()
    assert json.load(open(out / "trainer_state.json"))["finished"] is True


def test_preemption_checkpoints_requeues_and_resumes(slurm, data, reference, tmp_path):
    out, log = tmp_path / "o", tmp_path / "job.out"
    res = sbatch(slurm, "--nodes=1", "--ntasks-per-node=2", f"--output={log}",
                 os.path.join(ROOT, "slurm", "qlora.sbatch"), data / "base.ini",
                 f"--output.output_dir={out}", wait=False)
    assert res.returncode == 0, res.stderr
    jid = res.stdout.strip().split(";")[0]
    t0 = time.monotonic()
    while True:
        assert time.monotonic() - t0 < 120, "the job made no progress"
        try:
            if len(losses(out)) >= 3:
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", "--batch", jid], check=True, env=slurm)
    while job_field(slurm, jid, "Restarts") in (None, "0"):
        assert time.monotonic() - t0 < 180, log.read_text()
        time.sleep(0.5)
    spool = os.path.join(os.path.dirname(slurm["SLURM_CONF"]), "spool")
    requeued_run_to_end(slurm, jid, log, [spool], t0)
    text = log.read_text()
    assert "received SIGUSR1: saving checkpoint-" in text, text
    assert "requeueing job" in text and "(restart 1)" in text and "resumed from" in text, text
    assert json.load(open(out / "trainer_state.json"))["finished"] is True
    assert losses(out) == reference
