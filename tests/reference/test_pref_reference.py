"""Preference pairs (train.stage = dpo) against LLaMA-Factory 0.9.5 itself.

`qlora_dist prep --train.stage=dpo` writes a pair file (chosen_input_ids, chosen_labels,
rejected_input_ids, rejected_labels); the same JSON rows go through LLaMA-Factory's converter of
a ranking dataset ("ranking": true) and its PairwiseDatasetProcessor (what its dpo stage runs)
with the SmolLM2 tokenizer fixed by get_template_and_fix_tokenizer. Every pair's ids and labels
must be equal token for token, the rest of the row padding (pad_token_id / -100) to one length:
alpaca rows (history, input, system) and sharegpt / OpenAI-messages rows (multi-turn, system,
observation), several templates (those whose special tokens SmolLM2's vocabulary has: prep
refuses llama3 on it), cutoff_len cutting prompts and answers, and the rows LLaMA-Factory drops
skipped with data.dataset_skip_bad.

The rows come from text nobody here wrote: paragraphs of Debian's copyright files
(/usr/share/doc/*/copyright); chosen = the paragraph that follows the prompt, rejected = another
row's chosen answer.

Environment: QLORA_SMOLLM2_DIR (default <repo>/.models/smollm2), QLORA_LF_PATH (see
llamafactory_ref).
"""
import glob
import json
import os
import subprocess

import h5py
import numpy as np
import pytest

import llamafactory_ref
from conftest import binary

REPO = os.path.join(os.path.dirname(__file__), "..", "..")
SMOL = os.environ.get("QLORA_SMOLLM2_DIR") or os.path.join(REPO, ".models", "smollm2")
SIDES = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


@pytest.fixture(scope="module", autouse=True)
def _lf():
    if not os.path.exists(os.path.join(SMOL, "tokenizer.json")):
        pytest.fail(f"no SmolLM2 tokenizer in {SMOL} (set QLORA_SMOLLM2_DIR)")
    try:
        llamafactory_ref.load()
    except ImportError as e:
        pytest.fail(str(e))


def paragraphs(n):
    """n paragraphs of Debian's copyright files, sorted by path, deterministic."""
    paras = []
    for path in sorted(glob.glob("/usr/share/doc/*/copyright")):
        with open(path, encoding="utf-8", errors="replace") as f:
            for p in f.read().split("\n\n"):
                p = p.strip()
                if 20 <= len(p) <= 300:
                    paras.append(p)
        if len(paras) >= n:
            return paras[:n]
    pytest.fail(f"only {len(paras)} paragraphs in /usr/share/doc/*/copyright, {n} needed")


def alpaca_rows(n):
    """n alpaca preference rows: instruction (and input on every third), system on every
    fourth, one history turn on every other row."""
    p = paragraphs(5 * n)
    rows = []
    for i in range(n):
        a, b, c, d, _ = p[5 * i:5 * i + 5]
        row = {"instruction": a, "input": c if i % 3 == 1 else "", "chosen": b,
               "rejected": p[5 * ((i + 1) % n) + 1]}
        if i % 4 == 0:
            row["system"] = "You explain software licences."
        if i % 2 == 1:
            row["history"] = [[c, d]]
        rows.append(row)
    return rows


def sharegpt_rows(n, openai=False):
    """n sharegpt (or OpenAI-messages) preference rows: one or two prompt turns (the second
    prompt an observation on every fourth row), a system message on every third."""
    p = paragraphs(5 * n)
    role, content = ("role", "content") if openai else ("from", "value")
    user, gpt = ("user", "assistant") if openai else ("human", "gpt")
    key = "messages" if openai else "conversations"
    rows = []
    for i in range(n):
        a, b, c, d, _ = p[5 * i:5 * i + 5]
        conv = [{role: user, content: a}]
        if i % 2 == 1:
            second = "observation" if i % 4 == 3 else user
            conv += [{role: gpt, content: c}, {role: second, content: d}]
        if i % 3 == 0:
            conv.insert(0, {role: "system", content: "You explain software licences."})
        rows.append({key: conv, "chosen": {role: gpt, content: b},
                     "rejected": {role: gpt, content: p[5 * ((i + 1) % n) + 1]}})
    return rows


def write_ini(path, dataset, cutoff_len, template, **data):
    lines = ["[model]", f"model_name_or_path = {SMOL}", "[data]", f"dataset = {dataset}",
             f"template = {template}", f"cutoff_len = {cutoff_len}"]
    lines += [f"{k} = {v}" for k, v in data.items()]
    lines += ["[train]", "stage = dpo", "[output]", f"output_dir = {path.parent / 'run'}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def prep(ini, out, *extra):
    return subprocess.run([binary("qlora_dist"), "prep", str(ini), "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=300)


def read_pairs(path):
    with h5py.File(path) as f:
        got = {k: f[k][()] for k in SIDES}
        return got, dict(f.attrs), sorted(f.keys())


def assert_file_is_llamafactory(tmp_path, rows, template, formatting, cutoff_len, **data):
    """prep's pair file for `rows` against LLaMA-Factory's pairs; returns (want, attrs, stdout)."""
    want = llamafactory_ref.pairs(SMOL, rows, template, formatting, cutoff_len=cutoff_len)
    data_path = tmp_path / f"{formatting}_{template}_{cutoff_len}.jsonl"
    data_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                         encoding="utf-8")
    ini = write_ini(tmp_path / f"{data_path.stem}.ini", data_path, cutoff_len, template, **data)
    out = tmp_path / f"{data_path.stem}.h5"
    res = prep(ini, out)
    assert res.returncode == 0, res.stderr
    got, attrs, keys = read_pairs(out)
    assert keys == sorted(SIDES)
    assert attrs["format"] == "qlora_dist.pairs" and attrs["formatting"] == formatting
    assert attrs["template"] == template and attrs["cutoff_len"] == str(cutoff_len)
    pad = int(attrs["pad_token_id"])
    from transformers import AutoTokenizer
    assert pad == AutoTokenizer.from_pretrained(SMOL).pad_token_id
    seq_len = max(len(x) for pair in want for x in pair)  # the longest sequence of either side
    assert all(got[k].shape == (len(want), seq_len) for k in SIDES), {k: got[k].shape for k in SIDES}
    for i, pair in enumerate(want):
        for k, values in zip(SIDES, pair):
            fill = -100 if k.endswith("labels") else pad
            row = list(values) + [fill] * (seq_len - len(values))
            assert list(map(int, got[k][i])) == row, f"{formatting}/{template} pair {i} {k}"
    return want, attrs, res.stdout


@pytest.mark.parametrize("template", ["smollm2", "llama2", "default", "alpaca"])
def test_alpaca_pairs_equal_llamafactory(tmp_path, template):
    rows = alpaca_rows(12)
    want, _, stdout = assert_file_is_llamafactory(tmp_path, rows, template, "alpaca", 1024)
    assert len(want) == 12
    assert "train: 12 pairs" in stdout and "(12 rows read, 0 skipped, 0 truncated)" in stdout, stdout


@pytest.mark.parametrize("template", ["smollm2", "mistral", "chatml"])
def test_sharegpt_pairs_equal_llamafactory(tmp_path, template):
    want, _, _ = assert_file_is_llamafactory(tmp_path, sharegpt_rows(12), template, "sharegpt", 1024)
    assert len(want) == 12


def test_openai_messages_pairs_equal_llamafactory(tmp_path):
    for template in ("smollm2", "qwen"):
        assert_file_is_llamafactory(tmp_path, sharegpt_rows(8, openai=True), template, "openai", 1024)


@pytest.mark.parametrize("cutoff_len", [16, 37, 90])
def test_cutoff_len_cuts_as_llamafactory(tmp_path, cutoff_len):
    """infer_seqlen on (prompt, the longer answer): prompts and both answers cut to the same
    lengths; every pair's sides at most cutoff_len long."""
    for formatting, rows, template in (("alpaca", alpaca_rows(10), "llama2"),
                                       ("sharegpt", sharegpt_rows(10), "smollm2")):
        want, _, stdout = assert_file_is_llamafactory(tmp_path, rows, template, formatting, cutoff_len)
        assert all(len(x) <= cutoff_len for pair in want for x in pair)
        assert ", 0 truncated" not in stdout, stdout


def test_rows_llamafactory_drops_are_skipped(tmp_path):
    """A conversation with an even number of turns (no prompt left for the answers) and a
    "chosen" that is not a message object: LLaMA-Factory drops both rows; with
    data.dataset_skip_bad we skip them, report their lines, and the rest equals its pairs."""
    rows = sharegpt_rows(6)
    rows[2]["conversations"].append({"from": "gpt", "value": "An answer inside the prompt."})
    rows[4]["chosen"] = "a plain string"
    want, _, stdout = assert_file_is_llamafactory(tmp_path, rows, "smollm2", "sharegpt", 1024,
                                                  dataset_skip_bad="true")
    assert len(want) == 4
    assert "(6 rows read, 2 skipped" in stdout, stdout
    assert "sharegpt_smollm2_1024.jsonl:3: " in stdout and "sharegpt_smollm2_1024.jsonl:5: " in stdout


def test_val_size_splits_whole_pairs(tmp_path):
    """With data.val_size the two pair files together hold every one of LLaMA-Factory's pairs
    once, chosen and rejected of a pair in the same row (the split's indices are our own
    generator's, so the partition is compared as a multiset)."""
    rows = alpaca_rows(12)
    want = llamafactory_ref.pairs(SMOL, rows, "smollm2", "alpaca", cutoff_len=1024)
    data_path = tmp_path / "a.json"
    data_path.write_text(json.dumps(rows), encoding="utf-8")
    ini = write_ini(tmp_path / "a.ini", data_path, 1024, "smollm2", val_size=3)
    res = prep(ini, tmp_path / "p.h5")
    assert res.returncode == 0, res.stderr
    train, attrs, _ = read_pairs(tmp_path / "p.h5")
    ev, _, _ = read_pairs(tmp_path / "p.eval.h5")
    assert (train["chosen_input_ids"].shape[0], ev["chosen_input_ids"].shape[0]) == (9, 3)

    def unpadded(f):
        out = []
        for r in range(f["chosen_input_ids"].shape[0]):
            # a side ends with its last label that is not -100 (answers end labelled)
            sides = []
            for s in ("chosen", "rejected"):
                labels = f[f"{s}_labels"][r]
                n = int(np.nonzero(labels != -100)[0][-1]) + 1
                sides += [tuple(map(int, f[f"{s}_input_ids"][r][:n])), tuple(map(int, labels[:n]))]
            out.append(tuple(sides))
        return out
    assert sorted(unpadded(train) + unpadded(ev)) == sorted(tuple(map(tuple, p)) for p in want)
    assert "eval: 3 pairs" in res.stdout, res.stdout
