"""qlora_dist train / eval on token files with position_ids (neat packing), end to end.

The files are written here with h5py from one set of samples (tokens of the tiny job's vocabulary
64, the first half of each sample a prompt with labels -100):
  neat.h5    samples packed into rows of 32 (first fit), position_ids restarting per sample, pads
             id 0 / label -100 / position 0;
  plain.h5   the same rows without position_ids (one causal sequence per row);
  padded.h5  one sample per row, right-padded to 32.
- `qlora_dist eval` gives neat.h5 the eval loss of padded.h5 (the same targets, each seen in its
  own sample only: the trainer's eval passes the position ids to every block) within fp32
  rounding, and plain.h5 a clearly different one;
- `qlora_dist train` on neat.h5 runs 4 steps on 2 ranks with finite losses.
"""
import json
import os
import sys

import h5py
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_job import make_tiny_job, metrics  # noqa: E402
from test_train import QLORA, mpirun, run  # noqa: E402

SEQ = 32


def samples(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(4, 15))
        ids = rng.integers(3, 64, length)
        labels = ids.copy()
        labels[:length // 2] = -100  # the first label is never a target: no loss across samples
        out.append((ids, labels))
    return out


def write(path, ids, labels, pos=None):
    with h5py.File(path, "w") as f:
        f["input_ids"] = np.asarray(ids, dtype=np.int32)
        f["labels"] = np.asarray(labels, dtype=np.int32)
        if pos is not None:
            f["position_ids"] = np.asarray(pos, dtype=np.int32)
        f.attrs["vocab_size"] = 64
        f.attrs["pad_token_id"] = 0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("packed")
    (d / "base.ini").write_text(make_tiny_job(QLORA, d, train_rows=8) + """[finetuning]
lora_rank = 8
lora_alpha = 16
[train]
per_device_train_batch_size = 2
learning_rate = 3e-3
max_steps = 4
seed = 5
[output]
logging_steps = 1
save_steps = 100
""")
    smp = samples(60, 11)
    rows = []  # first fit into rows of at most SEQ - 1 sample tokens (LLaMA-Factory's bound)
    for ids, labels in smp:
        for row in rows:
            if sum(len(i) for i, _ in row) + len(ids) <= SEQ - 1:
                row.append((ids, labels))
                break
        else:
            rows.append([(ids, labels)])
    ids = np.zeros((len(rows), SEQ), np.int32)
    labels = np.full((len(rows), SEQ), -100, np.int32)
    pos = np.zeros((len(rows), SEQ), np.int32)
    for r, row in enumerate(rows):
        c = 0
        for i, l in row:
            ids[r, c:c + len(i)], labels[r, c:c + len(i)] = i, l
            pos[r, c:c + len(i)] = np.arange(len(i))
            c += len(i)
    write(d / "neat.h5", ids, labels, pos)
    write(d / "plain.h5", ids, labels)
    pids = np.zeros((len(smp), SEQ), np.int32)
    plabels = np.full((len(smp), SEQ), -100, np.int32)
    for r, (i, l) in enumerate(smp):
        pids[r, :len(i)], plabels[r, :len(i)] = i, l
    write(d / "padded.h5", pids, plabels)
    print(f"\n{len(smp)} samples in {len(rows)} packed rows of {SEQ}")
    return d


def eval_loss(data, name, tmp_path):
    out = tmp_path / f"eval_{name}"
    res = run("eval", data / "base.ini", f"--data.eval_file={data / name}",
              f"--output.output_dir={out}")
    assert res.returncode == 0, res.stderr + res.stdout
    return json.load(open(out / "eval_results.json"))["eval_loss"]


def test_eval_of_neat_rows_equals_samples_alone(data, tmp_path):
    neat = eval_loss(data, "neat.h5", tmp_path)
    padded = eval_loss(data, "padded.h5", tmp_path)
    plain = eval_loss(data, "plain.h5", tmp_path)
    print(f"\neval loss: neat {neat:.7f}, padded {padded:.7f}, plain packing {plain:.7f}")
    # fp32 forward of other shapes: rounding only (tests/model/test_packed_attention.cpp).
    assert neat == pytest.approx(padded, rel=1e-5)
    assert abs(plain - padded) > 1e-3 * padded


def test_train_on_neat_rows(data, tmp_path):
    out = tmp_path / "out"
    res = mpirun(2, data / "base.ini", f"--data.train_file={data / 'neat.h5'}",
                 f"--output.output_dir={out}")
    assert res.returncode == 0, res.stderr + res.stdout
    train, _ = metrics(out)
    assert [m["step"] for m in train] == [1, 2, 3, 4]
    assert all(np.isfinite(m["loss"]) and m["loss"] > 0 for m in train), train
