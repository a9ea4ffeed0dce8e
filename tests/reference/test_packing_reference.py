"""Our packing (rows_pack through pack_probe) against LLaMA-Factory 0.9.5's own code.

- greedy_knapsack: processor_utils.py loaded by file path (it imports only the standard library
  at run time); the sample lengths of each of our neat rows (read from the position ids) must be
  its bins, in its order.
- PackedSupervisedDatasetProcessor.preprocess_dataset (supervised.py), fed our samples through its
  _encode_data_example, run per group of preprocessing_batch_size samples as datasets.map does:
  input_ids, labels and (neat) position_ids of every row must equal ours exactly; samples longer
  than cutoff_len - 1 are dropped by both. Plain packing: LLaMA-Factory also emits restarting
  position ids (with an all-ones attention mask); ours writes none (positions 0..T-1), so only
  ids and labels are compared there.

LLaMA-Factory is the one scripts/setup.sh installs (tests/reference/llamafactory_ref.py); without
it the test fails and says so.
"""
import importlib.util
import json
import os
import sys
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from conftest import binary, lf_module, run


def lf_greedy_knapsack():
    path = os.path.join(os.path.dirname(lf_module("data").__file__), "processor", "processor_utils.py")
    spec = importlib.util.spec_from_file_location("lf_processor_utils", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod.greedy_knapsack


def lf_pack(samples, cutoff_len, neat, pad_id, group):
    """LLaMA-Factory's packed rows for our samples: cutoff_len is the user's value (its
    DataArguments.__post_init__ subtracts one when packing)."""
    sup = lf_module("data.processor.supervised")

    class Processor(sup.PackedSupervisedDatasetProcessor):
        def _encode_data_example(self, prompt, response, system, tools, images, videos, audios):
            s = samples[int(prompt[0]["content"])]
            return list(s["input_ids"]), list(s["labels"])

    proc = Processor(template=None, tokenizer=SimpleNamespace(pad_token_id=pad_id), processor=None,
                     data_args=SimpleNamespace(cutoff_len=cutoff_len - 1, neat_packing=neat))
    rows = {"input_ids": [], "labels": [], "position_ids": []}
    for g0 in range(0, len(samples), group):  # datasets.map(batched=True, batch_size=group)
        idx = range(g0, min(len(samples), g0 + group))
        n = len(idx)
        out = proc.preprocess_dataset({
            "_prompt": [[{"role": "user", "content": str(i)}] for i in idx],
            "_response": [[{"role": "assistant", "content": ""}] for _ in idx],
            "_system": [""] * n, "_tools": [""] * n,
            "_images": [None] * n, "_videos": [None] * n, "_audios": [None] * n})
        for k in rows:
            rows[k] += out[k]
    return {k: np.array(v, dtype=np.int64) for k, v in rows.items()}


def random_samples(n, max_len, vocab, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(1, max_len + 1))
        ids = rng.integers(0, vocab, length)
        labels = np.where(rng.random(length) < 0.4, -100, ids)
        out.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return out


def ours(tmp_path, samples, mode, cutoff_len, pad_id, vocab, group):
    src = tmp_path / f"samples_{mode}_{cutoff_len}_{group}.json"
    src.write_text(json.dumps(samples))
    out = tmp_path / f"rows_{mode}_{cutoff_len}_{group}.h5"
    res = run([binary("pack_probe"), *map(str, (src, out, mode, cutoff_len, pad_id, vocab, group))])
    report = json.loads(res.stdout)
    with h5py.File(out, "r") as f:
        rows = {k: f[k][()].astype(np.int64) for k in f.keys()}
        assert f.attrs["pad_token_id"] == pad_id and f.attrs["vocab_size"] == vocab
    return rows, report


# (samples, longest sample, cutoff_len, group): several groups of LLaMA-Factory's default 1000;
# small groups; samples longer than a row; the smallest row (cutoff 2: one token and one pad).
CASES = [(2300, 70, 64, 1000), (53, 20, 16, 7), (40, 4, 2, 1000), (300, 9, 8, 1000)]


@pytest.mark.parametrize("n,max_len,cutoff,group", CASES)
@pytest.mark.parametrize("neat", [True, False])
def test_rows_equal_llamafactory(tmp_path, n, max_len, cutoff, group, neat):
    vocab, pad_id = 500, 7
    samples = random_samples(n, max_len, vocab, seed=n + cutoff)
    ref = lf_pack(samples, cutoff, neat, pad_id, group)
    got, report = ours(tmp_path, samples, "neat" if neat else "pack", cutoff, pad_id, vocab, group)
    where = f"{n} samples, cutoff {cutoff}, group {group}, neat {neat}"
    assert got["input_ids"].shape == ref["input_ids"].shape, where
    assert np.array_equal(got["input_ids"], ref["input_ids"]), where
    assert np.array_equal(got["labels"], ref["labels"]), where
    if neat:
        assert np.array_equal(got["position_ids"], ref["position_ids"]), where
    else:
        assert "position_ids" not in got, where
    kept = [len(s["input_ids"]) for s in samples if len(s["input_ids"]) <= cutoff - 1]
    assert report["samples_dropped"] == n - len(kept), where
    assert report["rows"] == ref["input_ids"].shape[0] and report["tokens"] == sum(kept), where
    print(f"\n{where}: {report['rows']} rows, efficiency {report['efficiency']:.4f}, "
          f"{report['samples_dropped']} dropped")


def test_bins_equal_greedy_knapsack(tmp_path):
    """The sample lengths of each neat row (its position-id segments) are greedy_knapsack's bins
    of the same lengths, bin by bin and in order."""
    greedy_knapsack = lf_greedy_knapsack()
    cutoff, vocab, pad_id = 40, 300, 0
    samples = random_samples(700, 45, vocab, seed=3)
    got, _ = ours(tmp_path, samples, "neat", cutoff, pad_id, vocab, 1000)
    lengths = [len(s["input_ids"]) for s in samples if len(s["input_ids"]) <= cutoff - 1]
    bins = greedy_knapsack(list(lengths), cutoff - 1)
    ours_bins = []
    for pos in got["position_ids"]:
        starts = [i for i in range(len(pos)) if pos[i] == 0]
        segs = [b - a for a, b in zip(starts, starts[1:] + [len(pos)])]
        # Samples first, then every pad a segment of one token (position 0).
        ours_bins.append(segs)
    assert len(ours_bins) == len(bins)
    for r, (segs, b) in enumerate(zip(ours_bins, bins)):
        assert segs[:len(b)] == b, f"row {r}: ours {segs[:len(b)]} vs greedy_knapsack {b}"
        assert all(s == 1 for s in segs[len(b):]) and len(segs) - len(b) == cutoff - sum(b), r
