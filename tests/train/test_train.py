"""qlora_dist train / eval end to end: real mpirun jobs on the tiny model and synthetic data.

- the loss falls, evaluation runs, metrics.jsonl has the documented keys, the adapter loads in
  peft and gives the logits our model gives;
- resume at the same world size continues bit for bit (losses equal to an uninterrupted run);
  resume at another world size re-shards the optimizer state (losses within 1e-5 relative);
- an output_dir holding a finished run is not overwritten; overwrite_output_dir starts over;
- bad input: one line, non-zero exit, no hang, nothing of an earlier run changed.
"""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tiny_job import make_tiny_job, metrics  # noqa: E402

BUILD = os.environ.get("QLORA_BUILD_DIR") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "build")
QLORA = os.path.join(BUILD, "qlora_dist")
MPIRUN = os.environ.get("MPIRUN", "mpirun")
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
           OMP_NUM_THREADS="1")
METRIC_KEYS = {"step", "loss", "learning_rate", "grad_norm", "tokens_per_second", "comm_bytes",
               "comm_wait_share", "max_rss_bytes", "skipped_steps"}
EVAL_KEYS = {"step", "eval_loss", "eval_perplexity"}


def run(*args, timeout=300):
    t0 = time.monotonic()
    res = subprocess.run([QLORA, *map(str, args)], capture_output=True, text=True, env=ENV,
                         timeout=timeout)
    res.seconds = time.monotonic() - t0
    return res


def mpirun(np_, *args, timeout=600):
    t0 = time.monotonic()
    res = subprocess.run([MPIRUN, "--oversubscribe", "-np", str(np_), QLORA, *map(str, args)],
                         capture_output=True, text=True, env=ENV, timeout=timeout)
    res.seconds = time.monotonic() - t0
    return res


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    ini = d / "base.ini"
    ini.write_text(make_tiny_job(QLORA, d, train_rows=480, eval_rows=40) + """[finetuning]
lora_rank = 8
lora_alpha = 16
[train]
per_device_train_batch_size = 4
learning_rate = 3e-3
lr_scheduler_type = cosine
warmup_steps = 2
max_steps = 12
seed = 5
do_eval = true
eval_steps = 6
[output]
logging_steps = 1
save_steps = 4
""")
    return d


@pytest.fixture(scope="module")
def run2(data, tmp_path_factory):
    """The uninterrupted reference: 12 steps on 2 ranks (global batch 8)."""
    out = tmp_path_factory.mktemp("run2") / "out"
    res = mpirun(2, data / "base.ini", f"--output.output_dir={out}")
    assert res.returncode == 0, res.stderr + res.stdout
    return out, res


def test_train_end_to_end(data, run2):
    out, res = run2
    train, evals = metrics(out)
    assert [m["step"] for m in train] == list(range(1, 13))
    for m in train:
        assert METRIC_KEYS <= set(m), m
    assert [m["step"] for m in evals] == [6, 12]
    for m in evals:
        assert EVAL_KEYS <= set(m)
        assert m["eval_perplexity"] == pytest.approx(np.exp(m["eval_loss"]), rel=1e-12)
    # The loss falls by a clear margin on the copy task (from ~ln 2048 = 7.6; observed -0.6
    # in these 12 steps of 8 rows).
    assert train[-1]["loss"] < train[0]["loss"] - 0.4, [m["loss"] for m in train]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    # Learning rate: warmup 2 steps, then cosine to 0 at step 12 (HF Trainer's schedule).
    lrs = [m["learning_rate"] for m in train]
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(1.5e-3)
    assert lrs[2] == pytest.approx(3e-3)
    assert lrs[-1] == pytest.approx(3e-3 * 0.5 * (1 + np.cos(np.pi * 9 / 10)))
    assert all(m["comm_bytes"] > 0 for m in train)
    # Outputs: final adapter, checkpoints, resolved config, finished state.
    for f in ("adapter_config.json", "adapter_model.safetensors", "config.ini", "trainer_state.json",
              "eval_results.json"):
        assert os.path.exists(out / f), f
    assert json.load(open(out / "trainer_state.json"))["finished"] is True
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint-")) == [
        "checkpoint-12", "checkpoint-4", "checkpoint-8"]
    assert not [p for p in os.listdir(out) if p.startswith(".")], os.listdir(out)
    assert "model_name_or_path" in res.stdout  # rank 0 printed the resolved configuration


def test_adapter_loads_in_peft(data, run2):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    out, _ = run2
    base = AutoModelForCausalLM.from_pretrained(data / "tiny", torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out)
    lora = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert len(lora) == 4 * 7
    assert all(float(p.abs().max()) > 0 for p in lora.values())  # trained (B starts at zero)
    cfg = json.load(open(out / "adapter_config.json"))
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["peft_type"] == "LORA"


def test_eval_loss_matches_transformers_bitsandbytes_peft(data, run2, tmp_path):
    """Our final eval loss (2 ranks, sharded units) against the reference stack: transformers
    loading the same base as a bitsandbytes NF4 checkpoint (qlora_dist quantize: the same bytes
    as the unit file), peft loading our saved adapter, on the same eval rows. fp32 both sides;
    tolerance 1e-5 relative (the reference tests find logits bit-identical; sums differ in order)."""
    import sys
    import h5py
    import torch
    from peft import PeftModel
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reference"))
    from conftest import bnb_reference_model, use_generic_bnb_cpu_dequantize
    use_generic_bnb_cpu_dequantize()
    res = run("quantize", "--model", data / "tiny", "--out", tmp_path / "q4")
    assert res.returncode == 0, res.stderr
    torch.set_num_threads(1)
    model = PeftModel.from_pretrained(bnb_reference_model(tmp_path / "q4"), run2[0])
    model.eval()
    with h5py.File(data / "eval.h5", "r") as f:
        ids = torch.tensor(f["input_ids"][()], dtype=torch.long)
        labels = torch.tensor(f["labels"][()], dtype=torch.long)
    with torch.no_grad():
        ref = float(model(input_ids=ids, labels=labels).loss)
    ours = json.load(open(run2[0] / "eval_results.json"))["eval_loss"]
    assert ours == pytest.approx(ref, rel=1e-5), (ours, ref)


def resume_from(data, run2, tmp_path, np_, per_device):
    """A fresh output_dir holding only checkpoint-8 of the reference run, resumed."""
    ref_out, _ = run2
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(ref_out / "checkpoint-8", out / "checkpoint-8")
    res = mpirun(np_, data / "base.ini", f"--output.output_dir={out}",
                 f"--train.per_device_train_batch_size={per_device}")
    assert res.returncode == 0, res.stderr + res.stdout
    assert "resumed from" in res.stdout
    return metrics(out)[0], metrics(ref_out)[0]


def test_resume_same_world_size_is_bit_identical(data, run2, tmp_path):
    got, ref = resume_from(data, run2, tmp_path, 2, 4)
    assert [m["step"] for m in got] == [9, 10, 11, 12]
    assert [m["loss"] for m in got] == [m["loss"] for m in ref[8:]]
    assert [m["grad_norm"] for m in got] == [m["grad_norm"] for m in ref[8:]]


def test_no_recompute_is_bit_identical(data, run2, tmp_path):
    """train.gradient_checkpointing = false keeps every block's graph instead of recomputing it;
    the gradients are the same numbers computed once: losses, gradient norms and the adapter are
    bit for bit those of the recompute run, at 2 ranks (gathered buffers go back to their pool
    between forward and backward, so a graph that kept a view of one would differ), also with
    LoRA dropout (the masks the recompute draws again are drawn once) and under LLaMA-Factory's
    name for the switch."""
    res = mpirun(2, data / "base.ini", f"--output.output_dir={tmp_path / 'off'}",
                 "--train.gradient_checkpointing=false", "--train.do_eval=false")
    assert res.returncode == 0, res.stderr + res.stdout
    got, ref = metrics(tmp_path / "off")[0], metrics(run2[0])[0]
    assert [m["loss"] for m in got] == [m["loss"] for m in ref]
    assert [m["grad_norm"] for m in got] == [m["grad_norm"] for m in ref]
    assert (open(tmp_path / "off" / "adapter_model.safetensors", "rb").read() ==
            open(run2[0] / "adapter_model.safetensors", "rb").read())
    runs = {}
    for name, switch in (("on", "--train.gradient_checkpointing=true"),
                         ("llamafactory_off", "--train.disable_gradient_checkpointing=true")):
        out = tmp_path / name
        res = mpirun(2, data / "base.ini", f"--output.output_dir={out}", switch,
                     "--finetuning.lora_dropout=0.1", "--train.max_steps=4",
                     "--train.do_eval=false", "--output.save_steps=0")
        assert res.returncode == 0, res.stderr + res.stdout
        runs[name] = metrics(out)[0]
        runs[name + "_adapter"] = open(out / "adapter_model.safetensors", "rb").read()
    assert [m["loss"] for m in runs["on"]] == [m["loss"] for m in runs["llamafactory_off"]]
    assert [m["grad_norm"] for m in runs["on"]] == [m["grad_norm"] for m in runs["llamafactory_off"]]
    assert runs["on_adapter"] == runs["llamafactory_off_adapter"]
    # Dropout does change the run (the comparison above is not vacuous).
    assert [m["loss"] for m in runs["on"]][1:] != [m["loss"] for m in ref][1:4]


def test_resume_other_world_size(data, run2, tmp_path):
    got, ref = resume_from(data, run2, tmp_path, 4, 2)  # same global batch of 8
    assert [m["step"] for m in got] == [9, 10, 11, 12]
    np.testing.assert_allclose([m["loss"] for m in got], [m["loss"] for m in ref[8:]], rtol=1e-5)


def test_resume_with_other_global_batch_is_refused(data, run2, tmp_path):
    ref_out, _ = run2
    out = tmp_path / "o"
    out.mkdir()
    shutil.copytree(ref_out / "checkpoint-8", out / "checkpoint-8")
    res = run(data / "base.ini", f"--output.output_dir={out}")  # 1 rank x 4 rows != 8
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "global batch of 8" in res.stderr, res.stderr


def snapshot(path):
    return {os.path.join(r, f): open(os.path.join(r, f), "rb").read()
            for r, _, fs in os.walk(path) for f in fs}


def test_finished_run_is_not_overwritten(data, run2):
    out, _ = run2
    before = snapshot(out)
    res = run(data / "base.ini", f"--output.output_dir={out}")
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "holds a finished run" in res.stderr, res.stderr
    assert snapshot(out) == before


def test_overwrite_output_dir_starts_over(data, run2, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(run2[0], out)
    res = run(data / "base.ini", f"--output.output_dir={out}", "--output.overwrite_output_dir=true",
              "--train.max_steps=2", "--train.per_device_train_batch_size=8", "--train.do_eval=false",
              "--output.save_steps=0")
    assert res.returncode == 0, res.stderr
    assert [m["step"] for m in metrics(out)[0]] == [1, 2]
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint-")) == ["checkpoint-2"]


def test_eval_command(data, run2, tmp_path):
    out = tmp_path / "ev"
    res = run("eval", data / "base.ini", f"--output.output_dir={out}",
              f"--model.adapter_name_or_path={run2[0]}")
    assert res.returncode == 0, res.stderr
    r = json.load(open(out / "eval_results.json"))
    ref = metrics(run2[0])[1][-1]
    assert r["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5)
    assert "Evaluating model in 4/8-bit mode may cause lower scores" in res.stdout


# ------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit 1 (2 for usage), nothing written.

def one_line_error(res, *parts, status=1):
    ctx = f"exit {res.returncode}\nstdout: {res.stdout[-2000:]!r}\nstderr: {res.stderr!r}"
    assert res.returncode == status, ctx
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("qlora_dist train: error: "), ctx
    for p in parts:
        assert str(p) in res.stderr, f"expected {p!r}\n{ctx}"
    assert res.seconds < 60


@pytest.fixture
def out(tmp_path):
    return tmp_path / "out"


def test_malformed_ini(tmp_path, out):
    ini = tmp_path / "bad.ini"
    ini.write_text("[model]\nthis line has no equals sign\n")
    res = run(ini, f"--output.output_dir={out}")
    one_line_error(res, str(ini))
    assert not out.exists()


def test_unknown_key_names_nearest(data, out):
    res = run(data / "base.ini", f"--output.output_dir={out}", "--train.learnig_rate=1e-3")
    one_line_error(res, "learnig_rate", "train.learning_rate")
    assert not out.exists()


@pytest.mark.parametrize("key,value,part", [
    ("train.per_device_train_batch_size", "-4", "per_device_train_batch_size"),
    ("train.learning_rate", "fast", "learning_rate"),
    ("train.do_eval", "maybe", "do_eval"),
    ("finetuning.lora_rank", "0", "lora_rank"),
    ("finetuning.lora_dropout", "1.5", "lora_dropout"),
    ("dist.prefetch", "3", "prefetch"),
    ("data.cutoff_len", "-1", "cutoff_len"),
])
def test_bad_values(data, out, key, value, part):
    res = run(data / "base.ini", f"--output.output_dir={out}", f"--{key}={value}")
    one_line_error(res, part, value)
    assert not out.exists()


@pytest.mark.parametrize("key,value,part", [
    ("finetuning.finetuning_type", "full", "Quantization is only compatible with the LoRA or OFT method"),
    ("finetuning.finetuning_type", "freeze", "Quantization is only compatible with the LoRA or OFT method"),
    ("model.resize_vocab", "true", "Cannot resize embedding layers of a quantized model"),
    ("finetuning.pissa_init", "true", "PiSSA"),
    ("model.create_new_adapter", "true", "new adapter"),
    ("model.adapter_name_or_path", "a,b", "Merge them first"),
    ("quantization.quantization_device_map", "auto", "inference"),
])
def test_guards(data, out, key, value, part):
    res = run(data / "base.ini", f"--output.output_dir={out}", f"--{key}={value}")
    one_line_error(res, part)
    assert not out.exists()


def test_missing_files(data, tmp_path, out):
    res = run(data / "base.ini", f"--output.output_dir={out}",
              f"--model.model_name_or_path={tmp_path / 'nope.h5'}")
    one_line_error(res, tmp_path / "nope.h5")
    res = run(data / "base.ini", f"--output.output_dir={out}",
              f"--data.train_file={tmp_path / 'nope_train.h5'}")
    one_line_error(res, tmp_path / "nope_train.h5")
    assert not out.exists()


def test_corrupt_hdf5_and_truncated_safetensors(data, tmp_path, out):
    bad = tmp_path / "bad.h5"
    raw = open(data / "train.h5", "rb").read()
    bad.write_bytes(raw[: len(raw) // 3])
    one_line_error(run(data / "base.ini", f"--output.output_dir={out}", f"--data.train_file={bad}"),
                   bad)
    model = tmp_path / "tiny"
    shutil.copytree(data / "tiny", model)
    st = model / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    one_line_error(run(data / "base.ini", f"--output.output_dir={out}",
                       f"--model.model_name_or_path={model}"), "model.safetensors")
    assert not out.exists()


def test_out_of_vocabulary_ids(data, tmp_path, out):
    import h5py
    bad = tmp_path / "oov.h5"
    shutil.copy(data / "train.h5", bad)
    with h5py.File(bad, "r+") as f:
        ids = f["input_ids"][()]
        ids[3, 5] = 5000  # the model's vocabulary is 2048
        f["input_ids"][...] = ids
        f.attrs["vocab_size"] = 2048
    res = run(data / "base.ini", f"--output.output_dir={out}", f"--data.train_file={bad}",
              "--train.per_device_train_batch_size=480", "--train.max_steps=1")
    assert res.returncode == 1, res.stderr
    assert "row 3" in res.stderr and "5000" in res.stderr, res.stderr


def test_unwritable_output_dir(data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = run(data / "base.ini", f"--output.output_dir={blocker / 'sub'}")
    one_line_error(res, blocker / "sub")
    assert blocker.read_text() == "x"


def test_error_on_two_ranks_prints_once(data, out):
    res = mpirun(2, data / "base.ini", f"--output.output_dir={out}", "--train.learnig_rate=1")
    assert res.returncode != 0
    assert res.stderr.count("qlora_dist train: error:") == 1, res.stderr
    assert res.seconds < 60


def test_tensorboard_events_match_metrics(data, tmp_path):
    """report_to = jsonl,tensorboard: the event file opens with the tensorboard package's own
    reader and holds the metrics.jsonl values (as float32) at the same steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "tb"
    res = mpirun(2, data / "base.ini", f"--output.output_dir={out}", "--train.max_steps=4",
                 "--train.eval_steps=2", "--output.report_to=jsonl,tensorboard")
    assert res.returncode == 0, res.stderr
    runs = out / "runs"
    assert len(os.listdir(runs)) == 1
    acc = EventAccumulator(str(runs))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for t in ("train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second",
              "train/comm_bytes", "train/comm_wait_share", "train/max_rss_bytes", "eval/loss",
              "eval/perplexity"):
        assert t in tags, (t, tags)
    train, evals = metrics(out)
    got = {(e.step, e.value) for e in acc.Scalars("train/loss")}
    assert got == {(m["step"], float(np.float32(m["loss"]))) for m in train}
    assert [e.step for e in acc.Scalars("eval/loss")] == [m["step"] for m in evals]


def built_with_plplot():
    cache = os.path.join(BUILD, "CMakeCache.txt")
    with open(cache) as f:
        return "QLORA_WITH_PLPLOT:BOOL=OFF\n" not in f.read()


def test_plot(data, run2, tmp_path):
    """qlora_dist plot renders a real PNG (PLplot, pngcairo) from a run's metrics.jsonl; a build
    configured with -DQLORA_WITH_PLPLOT=OFF (scripts/gpu_check.sh) says so in one line, exit 1."""
    import struct
    import zlib
    png = tmp_path / "m.png"
    res = run("plot", run2[0], "--out", png)
    if not built_with_plplot():
        assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
        assert "this build has no PLplot (configured with -DQLORA_WITH_PLPLOT=OFF)" in res.stderr
        assert not os.listdir(tmp_path)
        return
    assert res.returncode == 0, res.stderr
    assert "12 training steps, 2 evaluations" in res.stdout
    raw = png.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", raw[16:24])
    assert (width, height) == (1200, 900)
    # Not a blank canvas: the decompressed scanlines hold many distinct byte values.
    idat, pos = b"", 8
    while pos < len(raw):
        n, kind = struct.unpack(">I4s", raw[pos:pos + 8])
        if kind == b"IDAT":
            idat += raw[pos + 8:pos + 8 + n]
        pos += 12 + n
    pixels = zlib.decompress(idat)
    assert len(set(pixels)) > 50
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    # Bad input: one line, exit 1.
    res = run("plot", tmp_path / "nothing_here")
    assert res.returncode == 1 and res.stderr.count("\n") == 1
    assert "metrics.jsonl" in res.stderr and res.stderr.startswith("qlora_dist plot: error:")
