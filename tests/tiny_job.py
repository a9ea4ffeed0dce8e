"""What the end-to-end tests (tests/train, tests/launch, tests/slurm) share: the inputs of a tiny
training job made with our own commands, and readers of a run's metrics.jsonl.

make_tiny_job(qlora, d, train_rows, eval_rows=0, model_format="h5") writes into d:
  tiny/      the tiny preset (LLaMA, 4 layers, hidden 256, fp32, seed 0)
  tiny.h5    its NF4 unit file (qlora_dist quantize --format h5, double quantization), or with
             model_format="bnb" tiny-bnb/, the same quantization as a bitsandbytes 4-bit
             checkpoint directory (what transformers loads too)
  train.h5   synthetic copy task, vocab 64, 32 tokens a row, seed 1
  eval.h5    the same with seed 2 (when eval_rows > 0)
and returns the `[model]` and `[data]` INI sections that point at them.
"""
import json
import os
import subprocess


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
    return (f"[model]\nmodel_name_or_path = {model}\n"
            f"[data]\ntrain_file = {d / 'train.h5'}\n{eval_line}cutoff_len = 32\n")


def metrics(out):
    """(training lines, evaluation lines) of out/metrics.jsonl."""
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    return [m for m in lines if "loss" in m], [m for m in lines if "eval_loss" in m]


def losses(out):
    return [m["loss"] for m in metrics(out)[0]]
