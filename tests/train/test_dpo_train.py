"""Preference training (train.stage = dpo) end to end under real mpirun: N ranks train like one,
a job killed with SIGKILL resumes from its last checkpoint bit for bit, a DPO run starts from the
adapter of an SFT run (its frozen copy is the reference), and a preference JSON dataset on the real
SmolLM2 model trains through rank 0's tokenization into a pair file.

The numbers themselves are checked against TRL in tests/reference/test_dpo_reference.py; here the
question is whether sharding, world size and resuming change them. Tolerances as in
tests/dist/test_dist_train.py: loss and metrics relative 1e-6 (the world size changes matmul row
counts and the order of sums), adapter absolute 0.1 x lr. Rewards and log-probabilities are
differences and sums of answer log-probabilities of magnitude ~60, whose fp32 rounding is ~4e-6:
absolute 2e-5 (observed 4e-7 in rewards).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from safetensors.numpy import load_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tiny_job import (MPI_ENV, MPIRUN, QLORA, ROOT, job_kill, make_pairs,  # noqa: E402
                      make_tiny_job, metrics, write_pairs)

ENV = MPI_ENV
LR = 3e-3
STEPS = 6
REWARDS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected"]


def mpirun(np_, *args, timeout=600):
    return subprocess.run([MPIRUN, "--oversubscribe", "-np", str(np_), QLORA, *map(str, args)],
                          capture_output=True, text=True, env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo_train")
    sections = make_tiny_job(QLORA, d, train_rows=16)
    rng = np.random.default_rng(3)
    write_pairs(d / "pairs.h5", make_pairs(rng, 24))
    write_pairs(d / "pairs_eval.h5", make_pairs(rng, 5))
    # An SFT adapter to start from (the README's flow: SFT, then DPO from its adapter).
    (d / "sft.ini").write_text(sections + f"""[train]
per_device_train_batch_size = 4
max_steps = 3
learning_rate = {LR}
[output]
output_dir = {d / 'sft'}
""")
    res = mpirun(1, "train", d / "sft.ini")
    assert res.returncode == 0, res.stderr
    model = sections.split("[data]")[0]
    (d / "dpo.ini").write_text(model + f"""adapter_name_or_path = {d / 'sft'}
[data]
train_file = {d / 'pairs.h5'}
eval_file = {d / 'pairs_eval.h5'}
cutoff_len = 32
[train]
stage = dpo
pref_loss = sigmoid
pref_beta = 0.2
pref_ftx = 0.3
gradient_accumulation_steps = 2
learning_rate = {LR}
lr_scheduler_type = cosine
max_steps = {STEPS}
do_eval = true
eval_steps = 3
seed = 9
[output]
logging_steps = 1
save_steps = 2
""")
    return d


def dpo(data, out, np_, per_device, *extra):
    res = mpirun(np_, "train", data / "dpo.ini", f"--output.output_dir={out}",
                 f"--train.per_device_train_batch_size={per_device}", *extra)
    assert res.returncode == 0, res.stderr + res.stdout
    return res


@pytest.fixture(scope="module")
def one_rank(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("np1") / "o"
    res = dpo(data, out, 1, 6, "--dist.sharding=none")  # global batch 6 x 2 x 1 = 12 pairs
    return out, res


def test_trains_from_the_sft_adapter(data, one_rank):
    out, res = one_rank
    assert "reference model: the base with the starting adapter" in res.stdout
    train, evals = metrics(out)
    assert [m["step"] for m in train] == list(range(1, STEPS + 1))
    for m in train:
        assert all(k in m for k in REWARDS) and np.isfinite(m["loss"])
    # Step 1: the policy is its own reference, so every reward is 0 (bit for bit: the same
    # forward runs twice), and the loss is log 2 plus the SFT term.
    assert all(train[0][k] == 0.0 for k in ("rewards/chosen", "rewards/rejected",
                                            "rewards/margins"))
    assert train[0]["loss"] > np.log(2)
    assert abs(train[-1]["rewards/margins"]) > 1e-3  # it trained
    assert [m["step"] for m in evals] == [3, 6]
    for m in evals:
        assert all("eval_" + k in m for k in REWARDS) and m["eval_pairs"] == 5
    ckpts = sorted(p for p in os.listdir(out) if p.startswith("checkpoint-"))
    assert ckpts == ["checkpoint-2", "checkpoint-4", "checkpoint-6"], ckpts


@pytest.mark.parametrize("np_,per_device", [(2, 3), (3, 2)])
def test_world_sizes_train_alike(data, one_rank, tmp_path, np_, per_device):
    out = tmp_path / "o"
    dpo(data, out, np_, per_device)  # sharded, the same global batch of 12 pairs
    ref, ref_eval = metrics(one_rank[0])
    got, got_eval = metrics(out)
    assert len(got) == len(ref) == STEPS and len(got_eval) == len(ref_eval) == 2
    for m, r in zip(got, ref):
        for k in ["loss", "grad_norm"]:
            assert m[k] == pytest.approx(r[k], rel=1e-6), (m["step"], k)
        for k in REWARDS:
            assert m[k] == pytest.approx(r[k], abs=2e-5), (m["step"], k)
    for m, r in zip(got_eval, ref_eval):
        assert m["eval_loss"] == pytest.approx(r["eval_loss"], rel=1e-6), m["step"]
        for k in REWARDS:
            assert m["eval_" + k] == pytest.approx(r["eval_" + k], abs=2e-5), (m["step"], k)
    a = load_file(str(out / "adapter_model.safetensors"))
    b = load_file(str(one_rank[0] / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 0.1 * LR


def test_kill_9_resumes_bit_for_bit(data, tmp_path):
    """SIGKILL of the whole job (mpirun and every rank) once checkpoint-4 exists, in a run long
    enough that the kill lands mid-run; the rerun resumes from the newest complete checkpoint and
    every later step equals the uninterrupted run's bit for bit."""
    steps = 40
    ref = tmp_path / "ref"
    dpo(data, ref, 2, 3, f"--train.max_steps={steps}")
    out = tmp_path / "o"
    proc = subprocess.Popen([MPIRUN, "--oversubscribe", "-np", "2", QLORA, "train",
                             str(data / "dpo.ini"), f"--output.output_dir={out}",
                             "--train.per_device_train_batch_size=3",
                             f"--train.max_steps={steps}"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        t0 = time.monotonic()
        while not (out / "checkpoint-4").exists():
            assert proc.poll() is None, "the job ended before checkpoint-4"
            assert time.monotonic() - t0 < 300, "no checkpoint-4"
            time.sleep(0.02)
        job_kill(proc)  # mpirun and every rank at once
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (out / "adapter_model.safetensors").exists(), "the run finished before the kill"
    newest = max(int(p.split("-")[1]) for p in os.listdir(out) if p.startswith("checkpoint-"))
    assert 4 <= newest < steps
    res = dpo(data, out, 2, 3, f"--train.max_steps={steps}")
    assert f"resumed from {out / f'checkpoint-{newest}'} at step {newest}" in res.stdout, res.stdout
    got = {m["step"]: m for m in metrics(out)[0]}
    want = {m["step"]: m for m in metrics(ref)[0]}
    for step in range(newest + 1, steps + 1):
        for k in ["loss", "grad_norm"] + REWARDS:
            assert got[step][k] == want[step][k], (step, k)
    a = load_file(str(out / "adapter_model.safetensors"))
    b = load_file(str(ref / "adapter_model.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in b)


def test_pair_file_for_sft_and_token_file_for_dpo_are_refused(data, tmp_path):
    """One line from rank 0 (mpirun adds its own report of the exit after it), exit 1."""
    for ini, f, out in (("dpo.ini", "train.h5", "a"), ("sft.ini", "pairs.h5", "b")):
        res = mpirun(2, "train", data / ini, f"--output.output_dir={tmp_path / out}",
                     f"--data.train_file={data / f}")
        assert res.returncode == 1, res.stderr
        errors = [l for l in res.stderr.splitlines() if "error:" in l]
        assert len(errors) == 1 and errors[0].startswith("qlora_dist train: error: "), res.stderr
        assert f in errors[0] and "train.stage" in errors[0], errors[0]


SMOLLM2 = os.path.join(ROOT, ".models", "smollm2")


def test_preference_json_on_smollm2(tmp_path):
    """Rank 0 tokenizes an alpaca preference dataset (real man-page text) with SmolLM2's
    tokenizer and template into a pair file; two ranks train two steps on it."""
    if not os.path.isfile(os.path.join(SMOLLM2, "tokenizer.json")):
        pytest.fail(f"{SMOLLM2} missing: run scripts/setup.sh")
    rows = []
    for line in open("/usr/share/doc/bash/README" if os.path.exists("/usr/share/doc/bash/README")
                     else os.path.join(ROOT, "README.md"), errors="replace"):
        words = line.split()
        if len(words) >= 6:
            rows.append(" ".join(words))
        if len(rows) == 9:
            break
    assert len(rows) == 9
    data = [{"instruction": "Repeat this line.", "input": r, "chosen": r,
             "rejected": rows[(i + 1) % len(rows)]} for i, r in enumerate(rows)]
    (tmp_path / "pref.json").write_text(json.dumps(data))
    (tmp_path / "job.ini").write_text(f"""[model]
model_name_or_path = {SMOLLM2}
[data]
dataset = {tmp_path / 'pref.json'}
template = smollm2
cutoff_len = 96
[train]
stage = dpo
per_device_train_batch_size = 1
max_steps = 2
learning_rate = 1e-4
[output]
output_dir = {tmp_path / 'out'}
logging_steps = 1
""")
    res = mpirun(2, "train", tmp_path / "job.ini", timeout=900)
    assert res.returncode == 0, res.stderr + res.stdout
    train, _ = metrics(tmp_path / "out")
    assert [m["step"] for m in train] == [1, 2]
    assert all(np.isfinite(m["loss"]) and "rewards/margins" in m for m in train)
    assert train[0]["loss"] == pytest.approx(np.log(2), rel=1e-6)  # fresh adapter: B = 0
    files = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "out" / "data") for f in fs
             if f == "train.h5"]
    assert len(files) == 1
    with h5py.File(files[0], "r") as f:
        assert f.attrs["format"] in ("qlora_dist.pairs", b"qlora_dist.pairs")
        assert f["chosen_input_ids"].shape[0] == 9
