"""What the end-to-end tests (tests/train, tests/launch, tests/slurm) share: the inputs of a tiny
training job made with our own commands, and readers of a run's metrics.jsonl.

make_tiny_job(qlora, d, train_rows, eval_rows=0, model_format="h5") writes into d:
  tiny/      the tiny preset (LLaMA, 4 layers, hidden 256, fp32, seed 0)
  tiny.h5    its NF4 unit file (qlora_dist quantize --format h5, double quantization), or with
             model_format="bnb" tiny-bnb/, the same quantization as a bitsandbytes 4-bit
             checkpoint directory (what transformers loads too)
  train.h5   synthetic copy task, vocab 64, 32 tokens a row, seed 1
  eval.h5    the same with seed 2 (when eval_rows > 0)
and returns the `[model]` (compute_dtype = fp32) and `[data]` INI sections that point at them.

job_kill(proc): SIGKILL of a job started with subprocess.Popen([mpirun, ...], start_new_session=True):
mpirun and every rank at once (Open MPI's ranks run in process groups of their own and outlive a
kill of mpirun's group), then waits until none of them runs.

free_port_pair(): two free consecutive TCP ports (a test SLURM's slurmctld and slurmd);
job_field(env, jid, field) and requeued_run_to_end(...): a test SLURM's job state and requeue.

make_pairs(rng, n, vocab) and write_pairs(path, pairs, vocab): a synthetic preference task (prompt:
random tokens; chosen: the prompt copied and an end token; rejected: other random tokens) as our
pair file (src/data/dataset.h PairDataset).

BUILD, QLORA, ROOT, MPIRUN and MPI_ENV: where the build and the binary are (QLORA_BUILD_DIR, set
by ctest), the source root, mpirun, and the environment a test job runs in (root MPI allowed, one
OpenMP thread, no fault injection left over from the caller).
"""
import json
import os
import signal
import socket
import subprocess
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
BUILD = os.environ.get("QLORA_BUILD_DIR") or os.path.join(_HERE, "..", "build")
QLORA = os.path.join(BUILD, "qlora_dist")
ROOT = os.path.join(_HERE, "..")
MPIRUN = os.environ.get("MPIRUN", "mpirun")
MPI_ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS="1")
MPI_ENV.pop("QLORA_FAULT_NAN_AT_STEP", None)


def make_tiny_job(qlora, d, train_rows, eval_rows=0, model_format="h5"):
    model = {"h5": d / "tiny.h5", "bnb": d / "tiny-bnb"}[model_format]
    steps = [["init-model", "--preset", "tiny", "--out", d / "tiny", "--seed", 0],
             ["quantize", "--model", d / "tiny", "--out", model, "--format",
              "h5" if model_format == "h5" else "safetensors"],
             ["synth-data", "--out", d / "train.h5", "--vocab", 64, "--seq-len", 32,
              "--rows", train_rows, "--task", "copy", "--seed", 1]]
    if eval_rows:
        steps.append(["synth-data", "--out", d / "eval.h5", "--vocab", 64, "--seq-len", 32,
                      "--rows", eval_rows, "--task", "copy", "--seed", 2])
    for args in steps:
        res = subprocess.run([qlora, *map(str, args)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    eval_line = f"eval_file = {d / 'eval.h5'}\n" if eval_rows else ""
    # fp32 whatever the CPU (model.compute_dtype = auto picks bf16 where it has AVX512_BF16):
    # the tests compare against fp32 references and their tolerances are fp32's.
    return (f"[model]\nmodel_name_or_path = {model}\ncompute_dtype = fp32\n"
            f"[data]\ntrain_file = {d / 'train.h5'}\n{eval_line}cutoff_len = 32\n")


def metrics(out):
    """(training lines, evaluation lines) of out/metrics.jsonl."""
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    return [m for m in lines if "loss" in m], [m for m in lines if "eval_loss" in m]


def losses(out):
    return [m["loss"] for m in metrics(out)[0]]


def make_pairs(rng, n, vocab=64):
    """(prompt, chosen, rejected) token lists: chosen = the prompt copied + end token 1,
    rejected = other random tokens + 1. Lengths vary, so that per-token averages matter."""
    out = []
    for _ in range(n):
        prompt = [int(t) for t in rng.integers(3, vocab, rng.integers(4, 10))] + [2]
        chosen = prompt[:-1] + [1]
        rejected = [int(t) for t in rng.integers(3, vocab, rng.integers(2, 12))] + [1]
        out.append((prompt, chosen, rejected))
    return out


def write_pairs(path, pairs, vocab=64):
    """Our pair file: chosen_/rejected_ input_ids and labels, int32 [pairs, seq_len], right-padded
    (ids 0, labels -100), labels on the answer only."""
    import h5py
    seq = max(len(p) + max(len(c), len(r)) for p, c, r in pairs)
    arrays = {k: np.full((len(pairs), seq), 0 if k.endswith("ids") else -100, np.int32)
              for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids",
                        "rejected_labels")}
    for i, (p, c, r) in enumerate(pairs):
        for side, answer in (("chosen", c), ("rejected", r)):
            ids = p + answer
            arrays[f"{side}_input_ids"][i, :len(ids)] = ids
            arrays[f"{side}_labels"][i, len(p):len(ids)] = answer
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f[k] = v
        f.attrs["vocab_size"] = np.int64(vocab)
        f.attrs["pad_token_id"] = np.int64(0)
        f.attrs["format"] = "qlora_dist.pairs"


def job_kill(proc, timeout=60):
    ranks = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                            text=True).stdout.split()]
    for pid in [proc.pid, *ranks]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=timeout)
    t0 = time.monotonic()

    def running(pid):
        try:
            return open(f"/proc/{pid}/stat").read().split()[2] != "Z"
        except OSError:
            return False
    while any(running(pid) for pid in ranks):
        assert time.monotonic() - t0 < timeout, "ranks still alive after SIGKILL"
        time.sleep(0.01)


def free_port_pair():
    """A port p with p and p + 1 free (below 60000), for a test SLURM's slurmctld and slurmd."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("", 0))
            p = s.getsockname()[1]
        if p > 60000:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("", p))
                b.bind(("", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def job_field(env, jid, field):
    """A field of `scontrol show job` (None when the job or field is not there)."""
    out = subprocess.run(["scontrol", "show", "job", str(jid)], capture_output=True, text=True,
                         env=env).stdout
    for tok in out.split():
        if tok.startswith(field + "="):
            return tok.split("=", 1)[1]
    return None


def requeued_run_to_end(env, jid, log, spool_dirs, t0):
    """After a requeue: the job keeps its id, so its new step 0 reuses the PMIx socket name of the
    old one (<SlurmdSpoolDir>/stepd.slurm.pmix.<job>.0 on each node): start it only once the old
    step is gone (SLURM's own requeue delay guarantees that; the tests shorten the delay), then
    wait for it to complete (300 s after t0 at most)."""
    import time
    t1 = time.monotonic()
    while (any(os.path.exists(os.path.join(d, f"stepd.slurm.pmix.{jid}.0")) for d in spool_dirs)
           or subprocess.run(["pgrep", "-f", f"slurmstepd: \\[{jid}\\."]).returncode == 0):
        assert time.monotonic() - t1 < 60, "the interrupted step did not go away"
        time.sleep(0.2)
    time.sleep(1.0)
    subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], env=env)
    while job_field(env, jid, "JobState") != "COMPLETED":
        state = job_field(env, jid, "JobState")
        assert state not in ("FAILED", "CANCELLED", "TIMEOUT"), log.read_text()
        assert time.monotonic() - t0 < 300, log.read_text()
        time.sleep(0.3)
