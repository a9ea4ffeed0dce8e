"""`qlora_dist prep` and `qlora_dist train` with data.dataset, end to end through the binary.

- The rows prep writes equal LLaMA-Factory 0.9.5's own processing of the same JSON file with the
  SmolLM2 tokenizer (llamafactory_ref.samples: its converter + SupervisedDatasetProcessor), for
  sharegpt conversations built from real text (Debian's copyright files, nobody here wrote them),
  with and without a val_size split; with neat packing every row's segments (position ids
  restarting at 0) are LLaMA-Factory's samples, each exactly once (the bin layout itself is
  compared with LLaMA-Factory's packing in test_packing_reference).
- `mpirun -np 2 qlora_dist train` with data.dataset tokenizes once on rank 0 into
  output_dir/data/<key>, trains and evaluates on it, and a second run re-uses the files.
- Bad files (not JSON, a wrong top level, an empty file, a bad row, a tokenizer.json of an
  unsupported kind, an unknown template) give one line and exit 1 (usage: 2) from prep and from
  train on every rank, and leave the user's files as they were.
"""
import glob
import json
import os
import shutil
import subprocess

import h5py
import numpy as np
import pytest

import llamafactory_ref
from conftest import binary

REPO = os.path.join(os.path.dirname(__file__), "..", "..")
SMOL = os.environ.get("QLORA_SMOLLM2_DIR") or os.path.join(REPO, ".models", "smollm2")
MPIRUN = os.environ.get("MPIRUN", "mpirun")
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
           OMPI_MCA_rmaps_base_oversubscribe="1")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def real_conversations(n):
    """n sharegpt rows from the paragraphs of Debian's copyright files (sorted, deterministic):
    one or two turns, every third with a system prompt."""
    paras = []
    for path in sorted(glob.glob("/usr/share/doc/*/copyright")):
        with open(path, encoding="utf-8", errors="replace") as f:
            for p in f.read().split("\n\n"):
                p = p.strip()
                if 20 <= len(p) <= 400:
                    paras.append(p)
        if len(paras) >= 6 * n:
            break
    assert len(paras) >= 4 * n, "too little text in /usr/share/doc/*/copyright"
    rows = []
    for i in range(n):
        a, b, c, d = paras[4 * i:4 * i + 4]
        conv = [{"from": "human", "value": a}, {"from": "gpt", "value": b}]
        if i % 2:
            conv += [{"from": "human", "value": c}, {"from": "gpt", "value": d}]
        row = {"conversations": conv}
        if i % 3 == 0:
            row["system"] = "You explain software licences."
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random LLaMA with SmolLM2's vocabulary and tokenizer files (training it is quick;
    the tokenization is the real model's)."""
    if not os.path.isfile(os.path.join(SMOL, "tokenizer.json")):
        pytest.fail(f"no SmolLM2 tokenizer in {SMOL} (scripts/setup.sh makes it)")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=1024)
    out = tmp_path_factory.mktemp("tiny_smollm2")
    LlamaForCausalLM(cfg).save_pretrained(out)
    for f in TOKENIZER_FILES:
        shutil.copy(os.path.join(SMOL, f), out)
    return out


def write_ini(path, model, dataset, output_dir, cutoff_len=256, **data):
    lines = ["[model]", f"model_name_or_path = {model}", "[data]", f"dataset = {dataset}",
             "template = smollm2", f"cutoff_len = {cutoff_len}"]
    lines += [f"{k} = {v}" for k, v in data.items()]
    lines += ["[train]", "max_steps = 3", "learning_rate = 1e-3", "[output]",
              f"output_dir = {output_dir}", "logging_steps = 1"]
    path.write_text("\n".join(lines) + "\n")
    return path


def prep(ini, out, *extra):
    return subprocess.run([binary("qlora_dist"), "prep", str(ini), "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=300)


def read_rows(path):
    with h5py.File(path) as f:
        rows = {k: f[k][()] for k in ("input_ids", "labels")}
        if "position_ids" in f:
            rows["position_ids"] = f["position_ids"][()]
        attrs = dict(f.attrs)
    return rows, attrs


def unpad(ids, labels, n):
    """The first n tokens of a padded row, after checking that the rest is padding."""
    assert np.all(labels[n:] == -100), "labels after the sample must be -100"
    return list(map(int, ids[:n])), list(map(int, labels[:n]))


def test_prep_rows_equal_llamafactory(tmp_path, model_dir):
    rows = real_conversations(24)
    data = tmp_path / "conv.json"
    data.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    want = llamafactory_ref.samples(str(model_dir), rows, "smollm2", "sharegpt", cutoff_len=256)
    assert len(want) == len(rows)
    ini = write_ini(tmp_path / "cfg.ini", model_dir, data, tmp_path / "run")
    res = prep(ini, tmp_path / "rows.h5")
    assert res.returncode == 0, res.stderr
    got, attrs = read_rows(tmp_path / "rows.h5")
    assert got["input_ids"].shape[0] == len(want)
    assert got["input_ids"].shape[1] == max(len(ids) for ids, _ in want)  # padded to the longest
    for i, (ids, labels) in enumerate(want):
        assert unpad(got["input_ids"][i], got["labels"][i], len(ids)) == (ids, labels), f"row {i}"
    assert attrs["template"] == "smollm2" and attrs["formatting"] == "sharegpt"
    assert attrs["vocab_size"] == 49152 and attrs["source_files"] == str(data)
    from transformers import AutoTokenizer
    assert attrs["pad_token_id"] == AutoTokenizer.from_pretrained(SMOL).pad_token_id
    assert "from 24 samples (24 rows read, 0 skipped" in res.stdout, res.stdout

    # val_size: the two files together hold every sample once (our split's indices are our own
    # generator's, not numpy's, so the partition is compared as a multiset).
    res = prep(ini, tmp_path / "split.h5", "--data.val_size=0.25")
    assert res.returncode == 0, res.stderr
    train, _ = read_rows(tmp_path / "split.h5")
    ev, _ = read_rows(tmp_path / "split.eval.h5")
    assert (train["input_ids"].shape[0], ev["input_ids"].shape[0]) == (18, 6)

    def as_set(r):
        out = []
        for ids, labels in zip(r["input_ids"], r["labels"]):
            n = len(ids)
            while n > 0 and labels[n - 1] == -100 and ids[n - 1] == attrs["pad_token_id"]:
                n -= 1
            out.append(tuple(map(int, ids[:n])))
        return out
    # Trailing pad-id tokens of a sample would be cut by as_set; no sample ends in one (EOS of
    # the answer is <|im_end|> = pad here, but it is labelled, so the loop stops there).
    assert sorted(as_set(train) + as_set(ev)) == sorted(tuple(ids) for ids, _ in want)


def test_prep_neat_packing_segments_are_llamafactory_samples(tmp_path, model_dir):
    rows = real_conversations(40)
    data = tmp_path / "conv.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    # LLaMA-Factory truncates packed samples to cutoff_len - 1 (DataArguments.__post_init__);
    # 200 makes several samples that long.
    want = llamafactory_ref.samples(str(model_dir), rows, "smollm2", "sharegpt", cutoff_len=199)
    assert any(len(ids) == 199 for ids, _ in want)
    ini = write_ini(tmp_path / "cfg.ini", model_dir, data, tmp_path / "run", cutoff_len=200,
                    neat_packing="true")
    res = prep(ini, tmp_path / "packed.h5")
    assert res.returncode == 0, res.stderr
    got, attrs = read_rows(tmp_path / "packed.h5")
    assert attrs["packing"] == "neat_packing" and got["input_ids"].shape[1] == 200
    assert got["input_ids"].shape[0] < len(want)  # packed: fewer rows than samples
    segments = []
    for ids, labels, pos in zip(got["input_ids"], got["labels"], got["position_ids"]):
        starts = [j for j in range(len(pos)) if pos[j] == 0]
        for a, b in zip(starts, starts[1:] + [len(pos)]):
            seg = (tuple(map(int, ids[a:b])), tuple(map(int, labels[a:b])))
            if all(l == -100 for l in seg[1]) and all(t == attrs["pad_token_id"] for t in seg[0]):
                continue  # padding (position id 0 on every pad token)
            assert list(pos[a:b]) == list(range(b - a)), "position ids restart per sample"
            segments.append(seg)
    assert sorted(segments) == sorted((tuple(i), tuple(l)) for i, l in want)


def mpirun(np_, *args, timeout=600):
    return subprocess.run([MPIRUN, "--oversubscribe", "-np", str(np_), binary("qlora_dist"),
                           *map(str, args)], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def test_train_on_json_dataset_two_ranks(tmp_path, model_dir):
    data = tmp_path / "conv.json"
    data.write_text(json.dumps(real_conversations(30)), encoding="utf-8")
    out = tmp_path / "run"
    ini = write_ini(tmp_path / "cfg.ini", model_dir, data, out, val_size=6, neat_packing="true")
    res = mpirun(2, "train", ini, "--train.do_eval=true")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("data: tokenized into") == 1, res.stdout  # rank 0 only
    (key_dir,) = glob.glob(str(out / "data" / "*"))
    assert sorted(os.listdir(key_dir)) == ["eval.h5", "train.h5"]
    steps = [json.loads(l) for l in open(out / "metrics.jsonl")]
    losses = [s["loss"] for s in steps if "loss" in s]
    assert len(losses) == 3 and all(np.isfinite(losses)), steps
    # Random tiny model over 49152 classes: the loss starts near ln(49152) = 10.8.
    assert abs(losses[0] - np.log(49152)) < 1.0, losses
    assert "eval_loss" in json.load(open(out / "eval_results.json"))
    # The same inputs again: the tokenized files are re-used, not rewritten.
    before = {f: os.stat(os.path.join(key_dir, f)).st_mtime_ns for f in os.listdir(key_dir)}
    res = mpirun(2, "train", ini, "--train.do_eval=true", "--output.overwrite_output_dir=true")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "re-using the tokenized dataset" in res.stdout
    assert before == {f: os.stat(os.path.join(key_dir, f)).st_mtime_ns for f in os.listdir(key_dir)}
    # Another option (cutoff_len) is another key: a second directory.
    res = mpirun(2, "train", ini, "--data.cutoff_len=300", "--output.overwrite_output_dir=true")
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(glob.glob(str(out / "data" / "*"))) == 2


def wordpiece_tokenizer_dir(tmp_path, model_dir):
    """A model directory whose tokenizer.json is a WordPiece one, made by the tokenizers package."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["hello world licence text"] * 10,
                            trainers.WordPieceTrainer(vocab_size=60, special_tokens=["[UNK]"]))
    d = tmp_path / "wordpiece_model"
    shutil.copytree(model_dir, d)
    tok.save(str(d / "tokenizer.json"))
    return d


BAD_FILES = {
    "not_json": ("[{\"instruction\": \"a\", \"output\": \"b\"}, {oops}]", "conv.json",
                 "not valid JSON at byte 40"),
    "top_level_string": ("\"just a string\"", "conv.json", None),
    "top_level_wrapped": ("{\"data\": [{\"instruction\": \"a\", \"output\": \"b\"}]}", "conv.json",
                          "data"),
    "empty": ("", "conv.json", "empty"),
    "bad_row": ("{\"conversations\": [{\"from\": \"human\", \"value\": \"hi\"}]}\n"
                "{\"conversations\": [{\"from\": \"gpt\", \"value\": \"hi\"}, "
                "{\"from\": \"human\", \"value\": \"x\"}]}\n", "conv.jsonl", "conv.jsonl:1"),
}


def one_error_line(stderr, command):
    lines = [l for l in stderr.splitlines() if l.strip()]
    errors = [l for l in lines if f"qlora_dist {command}: error:" in l]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.mark.parametrize("case", sorted(BAD_FILES) + ["wordpiece", "unknown_template"])
def test_bad_input_one_line(tmp_path, model_dir, case):
    model = model_dir
    if case in BAD_FILES:
        text, name, fragment = BAD_FILES[case]
        data = tmp_path / name
        data.write_text(text)
    else:
        data = tmp_path / "conv.json"
        data.write_text(json.dumps(real_conversations(2)))
        fragment = "model.type 'WordPiece' is not supported" if case == "wordpiece" else None
        if case == "wordpiece":
            model = wordpiece_tokenizer_dir(tmp_path, model_dir)
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("the user's earlier file")
    ini = write_ini(tmp_path / "cfg.ini", model, data, out)
    extra = ["--data.template=vicuna"] if case == "unknown_template" else []
    want_rc = 1
    if case == "unknown_template":
        fragment = "data.template = 'vicuna'"
    res = prep(ini, tmp_path / "rows.h5", *extra)
    assert res.returncode == want_rc, res.stdout + res.stderr
    line = one_error_line(res.stderr, "prep")
    if fragment:
        assert fragment in line, line
    assert not (tmp_path / "rows.h5").exists()
    res = mpirun(2, "train", ini, *extra, timeout=120)
    assert res.returncode == want_rc, res.stdout[-2000:] + res.stderr[-2000:]
    line = one_error_line(res.stderr, "train")
    if fragment:
        assert fragment in line, line
    assert not glob.glob(str(out / "data" / "*")), "nothing of a failed tokenization is left"
    assert (out / "notes.txt").read_text() == "the user's earlier file"


def real_documents(n):
    """n text rows: the first 4000 characters of Debian copyright files (sorted)."""
    docs = []
    for path in sorted(glob.glob("/usr/share/doc/*/copyright"))[:n]:
        with open(path, encoding="utf-8", errors="replace") as f:
            docs.append({"text": f.read()[:4000]})
    assert len(docs) == n
    return docs


@pytest.mark.parametrize("packing", [False, True])
def test_prep_text_rows_equal_llamafactory(tmp_path, model_dir, packing):
    """Pre-training text: LLaMA-Factory's PretrainDatasetProcessor (per-document truncation, or
    with packing every document + EOS concatenated and cut into blocks of cutoff_len - 1)."""
    rows = real_documents(30)
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cutoff = 300
    want = llamafactory_ref.samples(str(model_dir), rows, "empty", "text", packing=packing,
                                    cutoff_len=cutoff - 1 if packing else cutoff)
    ini = write_ini(tmp_path / "cfg.ini", model_dir, data, tmp_path / "run", cutoff_len=cutoff,
                    formatting="text", packing="true" if packing else "false")
    res = prep(ini, tmp_path / "text.h5", "--data.template=")
    assert res.returncode == 0, res.stderr
    got, attrs = read_rows(tmp_path / "text.h5")
    assert attrs["formatting"] == "text"
    assert got["input_ids"].shape[0] == len(want), res.stdout
    for i, (ids, labels) in enumerate(want):
        assert unpad(got["input_ids"][i], got["labels"][i], len(ids)) == (ids, labels), f"row {i}"
    if packing:
        assert got["input_ids"].shape[1] == cutoff - 1 and len(want) > len(rows)
