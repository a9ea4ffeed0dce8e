"""Multi-node for real: two emulated nodes (tests/multinode/cluster.sh: each node its own network
namespace with its own address on a host bridge, its own hostname and /etc/hosts; the file
system shared as on a cluster). Open MPI reaches node 1 through an rsh agent that starts orted
inside the node's namespaces; SLURM runs one slurmd per node and slurmctld on the host.

- mpirun --hostfile, 2 nodes x 2 ranks, transport forced to TCP (btl tcp,self, pml ob1, only the
  nodes' interface): the losses and the adapter equal the 1-node x 4-rank run within the
  tolerances of tests/dist/test_dist_train.py (loss relative 1e-6, adapter 0.1 x lr); the
  placement line shows each node's ranks with node-local ranks 0-1 of 2 and cores / 2 threads;
  2 nodes x 1 rank run cores / 1 threads (threads are sized per node, not per job);
- launch/qlora_run --nnodes 2 --nproc-per-node 2 --hosts n0,n1 runs the same job, same losses;
- node loss: every process of node 1 (its orted and ranks) killed with SIGKILL mid-run: mpirun
  ends within seconds naming the lost node (whose ranks the placement line names); the last
  checkpoint resumes on two nodes and finishes with the uninterrupted run's losses bit for bit;
- the node guard: a node whose output_dir (and model directory) is a private bind mount: one
  line naming the ranks and the host, exit 1, nothing left in output_dir;
- SLURM: sbatch --nodes=2 --ntasks-per-node=2 slurm/qlora.sbatch trains to the end with the same
  losses; USR1 to the batch shell: checkpoint, exit 75, requeue, the requeued job resumes on both
  nodes and finishes with the uninterrupted run's losses; the ranks of node 1 killed mid-step:
  srun (--kill-on-bad-exit) ends the job within seconds naming the tasks.
Needs root and ip / nsenter / unshare; skipped otherwise (CI runs as root).
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tiny_job import free_port_pair, job_field, losses, make_tiny_job, requeued_run_to_end  # noqa: E402,E501

if os.geteuid() != 0:
    pytest.skip("multinode tests need root (network namespaces)", allow_module_level=True)
for tool in ("ip", "nsenter", "unshare"):
    if shutil.which(tool) is None:
        pytest.skip(f"multinode tests need {tool} (iproute2 / util-linux)", allow_module_level=True)

ROOT = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
BUILD = os.environ.get("QLORA_BUILD_DIR") or os.path.join(ROOT, "build")
QLORA = os.path.join(BUILD, "qlora_dist")
CLUSTER = os.path.join(ROOT, "tests", "multinode", "cluster.sh")
RUN = os.path.join(ROOT, "launch", "qlora_run")
STEPS = 8
LR = 3e-3
LOSS_RTOL = 1e-6
ADAPTER_ATOL = 0.1 * LR
EXIT_PREEMPTED = 75
CORES = os.cpu_count()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("cluster")
    res = subprocess.run(["bash", CLUSTER, "up", str(d), "2", "--owner", str(os.getpid())],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    try:
        env = {}
        for line in open(d / "env"):
            if "=" in line and not line.startswith("export"):
                k, v = line.strip().split(";")[0].split("=", 1)
                env[k] = v.strip('"')
        env["dir"] = str(d)
        env["nodes"] = env["QLMN_NODES"].split()
        yield env
    finally:
        subprocess.run(["bash", CLUSTER, "down", str(d)], timeout=120)


def base_env(cluster):
    return dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                OMP_NUM_THREADS="1", QLORA_DIST=QLORA, QLORA_HOME=ROOT,
                OMPI_MCA_plm_rsh_agent=cluster["OMPI_MCA_plm_rsh_agent"])


# Transport forced to TCP over the nodes' interface (no shared memory, no other NIC).
TCP_MCA = ["--mca", "btl", "tcp,self", "--mca", "pml", "ob1", "--mca", "btl_tcp_if_include",
           "qlmn0", "--mca", "oob_tcp_if_include", "qlmn0"]
TCP_ENV = {"OMPI_MCA_btl": "tcp,self", "OMPI_MCA_pml": "ob1", "OMPI_MCA_btl_tcp_if_include": "qlmn0",
           "OMPI_MCA_oob_tcp_if_include": "qlmn0"}


def on_node(cluster, i, cmd):
    return ["bash", CLUSTER, "exec", cluster["dir"], str(i), *map(str, cmd)]


def mpirun_nodes(cluster, ppn, *args):
    """mpirun on node 0 with the hostfile: 2 nodes x ppn ranks over TCP."""
    return on_node(cluster, 0, ["mpirun", "--hostfile", os.path.join(cluster["dir"], "hostfile"),
                                "-np", 2 * ppn, "--map-by", f"ppr:{ppn}:node", "--bind-to", "none",
                                *TCP_MCA, QLORA, *args])


def run(cmd, env, timeout=300):
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    res.seconds = time.monotonic() - t0
    return res


def placement(stdout):
    return next(l for l in stdout.splitlines() if l.startswith("placement: "))


def two_node_placement(cluster, ppn):
    n0, n1 = cluster["nodes"]
    threads = max(1, CORES // ppn)
    if ppn == 1:
        return (f"placement: 2 node(s), 2 rank(s): {n0}: rank 0 (local 0 of 1, {threads} thread(s) "
                f"each); {n1}: rank 1 (local 0 of 1, {threads} thread(s) each)")
    return (f"placement: 2 node(s), 4 rank(s): {n0}: ranks 0-1 (local 0-1 of 2, {threads} thread(s) "
            f"each); {n1}: ranks 2-3 (local 0-1 of 2, {threads} thread(s) each)")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    # 4 ranks x 2 rows: a global batch of 8 rows x 32 tokens; a checkpoint every 2 steps.
    (d / "base.ini").write_text(make_tiny_job(QLORA, d, train_rows=480) + f"""[train]
per_device_train_batch_size = 2
learning_rate = {LR}
max_steps = {STEPS}
seed = 3
[output]
logging_steps = 1
save_steps = 2
""")
    return d


def adapter(out):
    return load_file(os.path.join(out, "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def reference(data, cluster, tmp_path_factory):
    """1 node x 4 ranks (the host, shared memory)."""
    out = tmp_path_factory.mktemp("ref") / "o"
    res = run(["mpirun", "--oversubscribe", "-np", "4", "--bind-to", "none", QLORA,
               data / "base.ini", f"--output.output_dir={out}"], base_env(cluster))
    assert res.returncode == 0, res.stderr
    host = socket.gethostname()
    assert placement(res.stdout) == (f"placement: 1 node(s), 4 rank(s): {host}: ranks 0-3 (local "
                                     f"0-3 of 4, {max(1, CORES // 4)} thread(s) each)")
    return losses(out), adapter(out)


def assert_like_reference(out, reference, where):
    ref_losses, ref_adapter = reference
    got = losses(out)
    assert len(got) == STEPS, where
    np.testing.assert_allclose(got, ref_losses, rtol=LOSS_RTOL, atol=0, err_msg=where)
    a = adapter(out)
    assert sorted(a) == sorted(ref_adapter)
    worst = max(float(np.abs(a[k] - ref_adapter[k]).max()) for k in ref_adapter)
    assert worst <= ADAPTER_ATOL, f"{where}: adapter differs by {worst}"
    print(f"{where}: losses max relative difference "
          f"{float(np.max(np.abs(np.array(got) - ref_losses) / np.abs(ref_losses))):.2e}, "
          f"adapter max difference {worst:.2e}")


@pytest.fixture(scope="module")
def two_nodes(cluster, data, reference, tmp_path_factory):
    """The uninterrupted 2 nodes x 2 ranks run (mpirun --hostfile, TCP)."""
    out = tmp_path_factory.mktemp("two") / "o"
    res = run(mpirun_nodes(cluster, 2, data / "base.ini", f"--output.output_dir={out}"),
              base_env(cluster))
    assert res.returncode == 0, res.stderr
    res.out = out
    return res


def test_hostfile_two_nodes_tcp(cluster, reference, two_nodes):
    assert placement(two_nodes.stdout) == two_node_placement(cluster, 2), two_nodes.stdout
    assert_like_reference(two_nodes.out, reference, "mpirun --hostfile 2 x 2")
    print(f"2 nodes x 2 ranks: {two_nodes.seconds:.1f} s")


def test_threads_are_sized_per_node(cluster, data, tmp_path):
    res = run(mpirun_nodes(cluster, 1, data / "base.ini", f"--output.output_dir={tmp_path / 'o'}",
                           "--train.max_steps=1", "--train.per_device_train_batch_size=4"),
              base_env(cluster))
    assert res.returncode == 0, res.stderr
    assert placement(res.stdout) == two_node_placement(cluster, 1), res.stdout


def test_qlora_run_two_nodes(cluster, data, reference, tmp_path):
    n0, n1 = cluster["nodes"]
    env = dict(base_env(cluster), **TCP_ENV)
    res = run(on_node(cluster, 0, [RUN, "--nnodes", 2, "--nproc-per-node", 2, "--hosts", f"{n0},{n1}",
                                   "--master-addr", n0, data / "base.ini",
                                   f"--output.output_dir={tmp_path / 'o'}"]), env)
    assert res.returncode == 0, res.stderr
    assert placement(res.stdout) == two_node_placement(cluster, 2), res.stdout
    assert_like_reference(tmp_path / "o", reference, "qlora_run --nnodes 2 --nproc-per-node 2")


def node_pids(cluster, i):
    """Every process of node i but the namespaces' holder (the node's 'init')."""
    holder = cluster["QLMN_PIDS"].split()[i]
    out = subprocess.run(["ip", "netns", "pids", cluster["QLMN_NETNS"].split()[i]],
                         capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if p != holder]


def wait_for(cond, proc, timeout, what):
    t0 = time.monotonic()
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job ended before {what}: {proc.returncode}")
        assert time.monotonic() - t0 < timeout, f"no {what} after {timeout} s"
        time.sleep(0.05)


def steps_done(out):
    try:
        return len(losses(out))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def checkpoints(out):
    return sorted(int(p.split("-")[1]) for p in os.listdir(out) if p.startswith("checkpoint-"))


def test_node_loss_ends_job_and_checkpoint_resumes(cluster, data, two_nodes, tmp_path):
    out = tmp_path / "o"
    env = base_env(cluster)
    proc = subprocess.Popen(mpirun_nodes(cluster, 2, data / "base.ini", f"--output.output_dir={out}"),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: steps_done(out) >= 3, proc, 120, "step 3")
        pids = node_pids(cluster, 1)
        assert len(pids) >= 3, pids  # orted and its two ranks (at least)
        t0 = time.monotonic()
        for p in pids:
            os.kill(p, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=60)
        ended = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    n1 = cluster["nodes"][1]
    assert proc.returncode != 0
    assert ended < 20, ended
    # Open MPI reports the lost node, naming it ("Peer host: <node>") or, when its daemon-failure
    # path notices first (timing: seen once in several runs), with the generic "unable to reliably
    # start one or more daemons"; the placement line names the node's ranks.
    assert n1 in stderr or "ORTE was unable to reliably start one or more daemons" in stderr, \
        stderr[-3000:]
    assert f"{n1}: ranks 2-3" in placement(stdout)
    assert not node_pids(cluster, 1)
    done = steps_done(out)
    assert done < STEPS, "the node was lost after the run had finished"
    last = checkpoints(out)[-1]
    assert 2 <= last < STEPS
    print(f"node loss: job ended {ended:.1f} s after the kill, at step {done}; resuming from "
          f"checkpoint-{last}")
    res = run(mpirun_nodes(cluster, 2, data / "base.ini", f"--output.output_dir={out}"), env)
    assert res.returncode == 0, res.stderr
    assert f"resumed from" in res.stdout, res.stdout
    assert losses(out) == losses(two_nodes.out)
    assert adapter(out).keys() == adapter(two_nodes.out).keys()
    for k, v in adapter(two_nodes.out).items():
        assert np.array_equal(adapter(out)[k], v), k


def test_guard_node_local_output_dir_and_model(cluster, data, tmp_path):
    """Node 1 sees its own private directories at the output_dir's and the model's paths."""
    shared, model_dir = tmp_path / "shared", tmp_path / "model"
    shared.mkdir()
    model_dir.mkdir()
    shutil.copy(data / "tiny.h5", model_dir / "tiny.h5")
    private = tmp_path / "private"
    (private / "a").mkdir(parents=True)
    (private / "b").mkdir()
    env = base_env(cluster)
    mounts = [(private / "a", shared), (private / "b", model_dir)]
    for src, dst in mounts:
        res = run(on_node(cluster, 1, ["mount", "--bind", src, dst]), env)
        assert res.returncode == 0, res.stderr
    try:
        res = run(mpirun_nodes(cluster, 2, data / "base.ini", f"--output.output_dir={shared / 'o'}",
                               f"--model.model_name_or_path={model_dir / 'tiny.h5'}"), env)
    finally:
        for _, dst in mounts:
            run(on_node(cluster, 1, ["umount", dst]), env)
    n0, n1 = cluster["nodes"]
    assert res.returncode == 1, res.stderr
    lines = [l for l in res.stderr.splitlines() if "qlora_dist train: error:" in l]
    assert len(lines) == 1, res.stderr
    assert lines[0] == (
        f"qlora_dist train: error: output_dir {shared / 'o'} is not shared: ranks 2-3 (host {n1}) "
        f"do not see the file rank 0 (host {n0}) wrote there; every node must see the same "
        f"output_dir (a shared file system); model.model_name_or_path {model_dir / 'tiny.h5'} does "
        f"not exist on ranks 2-3 (host {n1}) (rank 0 on host {n0} has it); every node must see "
        f"the model and the data at the same path"), lines[0]
    # Nothing left: the probe file and the directory it was made for are gone on every side.
    assert os.listdir(shared) == [] and os.listdir(private / "a") == []
    assert "placement:" not in res.stdout  # refused before any heavy work


# ---------------------------------------------------------------------------------------------
# SLURM: slurmctld on the host, one slurmd per node.

@pytest.fixture(scope="module")
def slurm(cluster):
    env = dict(base_env(cluster), QLORA_SLURM_PORT=str(free_port_pair()))
    res = subprocess.run(["bash", CLUSTER, "slurm-start", cluster["dir"]], capture_output=True,
                         text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    try:
        yield dict(base_env(cluster), SLURM_CONF=res.stdout.strip(), **TCP_ENV)
    finally:
        subprocess.run(["bash", CLUSTER, "slurm-stop", cluster["dir"]], timeout=120)


def sbatch(env, *args, wait=True):
    """sbatch --nodes=2 --ntasks-per-node=2 ARGS; with wait, until the job ends (polled here:
    sbatch --wait sleeps up to 32 s between its own polls), returncode 0 when it COMPLETED."""
    cmd = ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=2", *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    if not wait or res.returncode != 0:
        return res
    jid = res.stdout.strip().split(";")[0]
    t0 = time.monotonic()
    while (state := job_field(env, jid, "JobState")) in ("PENDING", "RUNNING", "COMPLETING", None):
        assert time.monotonic() - t0 < 300, f"job {jid} still {state}"
        time.sleep(0.2)
    res.returncode = 0 if state == "COMPLETED" else 1
    res.stderr += f"job {jid}: {state}\n"
    return res


SBATCH = os.path.join(ROOT, "slurm", "qlora.sbatch")


def test_sbatch_two_nodes(cluster, slurm, data, reference, two_nodes, tmp_path):
    out, log = tmp_path / "o", tmp_path / "job.out"
    res = sbatch(slurm, f"--output={log}", SBATCH, data / "base.ini", f"--output.output_dir={out}")
    assert res.returncode == 0, res.stderr + (log.read_text() if log.exists() else "")
    text = log.read_text()
    assert placement(text) == two_node_placement(cluster, 2), text
    assert json.load(open(out / "trainer_state.json"))["finished"] is True
    assert losses(out) == losses(two_nodes.out)
    assert_like_reference(out, reference, "sbatch --nodes=2 --ntasks-per-node=2")


def test_sbatch_preemption_requeues_and_resumes(cluster, slurm, data, two_nodes, tmp_path):
    out, log = tmp_path / "o", tmp_path / "job.out"
    res = sbatch(slurm, f"--output={log}", SBATCH, data / "base.ini", f"--output.output_dir={out}",
                 wait=False)
    assert res.returncode == 0, res.stderr
    jid = res.stdout.strip().split(";")[0]
    t0 = time.monotonic()
    wait_for(lambda: steps_done(out) >= 2, None, 120, "step 2")
    subprocess.run(["scancel", "--signal=USR1", "--batch", jid], check=True, env=slurm)
    while job_field(slurm, jid, "Restarts") in (None, "0"):
        assert time.monotonic() - t0 < 180, log.read_text()
        time.sleep(0.2)
    spool = os.path.join(os.path.dirname(slurm["SLURM_CONF"]), "spool")
    requeued_run_to_end(slurm, jid, log, [os.path.join(spool, n) for n in cluster["nodes"]], t0)
    text = log.read_text()
    assert "received SIGUSR1: saving checkpoint-" in text, text
    assert "requeueing job" in text and "(restart 1)" in text and "resumed from" in text, text
    assert text.count(two_node_placement(cluster, 2)) == 2, text
    assert losses(out) == losses(two_nodes.out)


def test_sbatch_node_loss_ends_job(cluster, slurm, data, tmp_path):
    out, log = tmp_path / "o", tmp_path / "job.out"
    res = sbatch(slurm, f"--output={log}", SBATCH, data / "base.ini", f"--output.output_dir={out}",
                 "--train.max_steps=100000", "--output.save_steps=0", wait=False)
    assert res.returncode == 0, res.stderr
    jid = res.stdout.strip().split(";")[0]
    wait_for(lambda: steps_done(out) >= 2, None, 120, "step 2")
    ranks = [p for p in node_pids(cluster, 1)
             if os.path.basename(os.readlink(f"/proc/{p}/exe")) == "qlora_dist"]
    assert len(ranks) == 2, ranks
    t0 = time.monotonic()
    for p in ranks:
        os.kill(p, signal.SIGKILL)
    while job_field(slurm, jid, "JobState") in ("RUNNING", "COMPLETING", None):
        assert time.monotonic() - t0 < 60, log.read_text()
        time.sleep(0.1)
    ended = time.monotonic() - t0
    text = log.read_text()
    assert ended < 20, (ended, text)
    assert job_field(slurm, jid, "JobState") == "FAILED", text
    n1 = cluster["nodes"][1]
    assert f"{n1}: tasks 2-3: Killed" in text, text
    print(f"sbatch node loss: job ended {ended:.1f} s after the kill")


def test_guard_one_host_private_mount(data, tmp_path):
    """The guard without the emulated nodes: rank 1 of a one-host job sees a private directory
    (a mount namespace of its own) at the output_dir's parent."""
    shared, private = tmp_path / "shared", tmp_path / "private"
    shared.mkdir()
    private.mkdir()
    args = f"{QLORA} {data / 'base.ini'} --output.output_dir={shared / 'o'}"
    script = (f'if [ "$OMPI_COMM_WORLD_RANK" = 1 ]; then exec unshare --mount sh -c '
              f'"mount --bind {private} {shared} && exec {args}"; fi; exec {args}')
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    res = run(["mpirun", "--oversubscribe", "-np", "2", "sh", "-c", script], env, timeout=120)
    host = socket.gethostname()
    assert res.returncode == 1, res.stderr
    lines = [l for l in res.stderr.splitlines() if "error:" in l]
    assert lines == [f"qlora_dist train: error: output_dir {shared / 'o'} is not shared: rank 1 "
                     f"(host {host}) does not see the file rank 0 (host {host}) wrote there; every "
                     f"node must see the same output_dir (a shared file system)"], res.stderr
    assert os.listdir(shared) == [] and os.listdir(private) == []


def test_cut_link_watchdog_ends_the_ranks(cluster, data, tmp_path):
    """Node 1's link cut mid-run, every process alive: Open MPI runs no heartbeat of its own, so
    the ranks of node 0, waiting on a collective, pass dist.timeout_s; the watchdog names the
    collective and the step, and calls MPI_Abort: node 0's ranks are gone within seconds. (Open
    MPI's mpirun itself then waits for the lost node's daemon to confirm the abort, which a cut
    link never does: the test, like a user or a batch system, ends it. Last in the file: the
    restored link is not trusted for further runs.)"""
    import threading
    out = tmp_path / "o"
    timeout_s = 8
    veth = cluster["QLMN_NETNS"].split()[1] + "h"  # node 1's host-side link
    proc = subprocess.Popen(mpirun_nodes(cluster, 2, data / "base.ini", f"--output.output_dir={out}",
                                         f"--dist.timeout_s={timeout_s}",
                                         "--train.max_steps=100000", "--output.save_steps=0"),
                            env=base_env(cluster), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()

    def node0_ranks():
        return [p for p in node_pids(cluster, 0)
                if "qlora_dist" in open(f"/proc/{p}/cmdline").read().replace("\0", " ")
                and "mpirun" not in open(f"/proc/{p}/cmdline").read()]
    try:
        wait_for(lambda: steps_done(out) >= 3, proc, 120, "step 3")
        assert len(node0_ranks()) == 2
        t0 = time.monotonic()
        subprocess.run(["ip", "link", "set", veth, "down"], check=True)
        while node0_ranks() or not any("watchdog:" in l for l in lines):
            assert time.monotonic() - t0 < timeout_s + 30, "".join(lines)[-3000:]
            time.sleep(0.2)
        ended = time.monotonic() - t0
    finally:
        subprocess.run(["ip", "link", "set", veth, "up"])
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for p in node_pids(cluster, 1):
            os.kill(p, signal.SIGKILL)
    text = "".join(lines)
    print(f"cut link: node 0's ranks ended {ended:.1f} s after the cut (dist.timeout_s = "
          f"{timeout_s})")
    assert "did not complete within dist.timeout_s = 8.0 s" in text and "(step " in text, text
    assert "MPI_ABORT was invoked" in text, text
    assert ended >= timeout_s - 1
