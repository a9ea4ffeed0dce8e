"""DPO (sigmoid, fresh LoRA r 8 on all seven linears, AdamW) on SmolLM2-135M-Instruct, NF4 with
double quantization, fp32 compute, one process: qlora_dist against TRL 1.16's DPOTrainer on
transformers + bitsandbytes + peft, the same pairs in the same order, the same threads.

The pairs: alpaca preference rows made from real text (/usr/share/doc), chosen = a line,
rejected = another line, tokenized by `qlora_dist prep --train.stage=dpo` with the smollm2
template; TRL gets the very token ids of that pair file (prompt / chosen / rejected split where
the labels start). Both sides run a reference forward per step (TRL: adapters disabled; ours: no
adapter) and recompute the blocks in backward (TRL: gradient checkpointing on).

Prints seconds per step (median of the steps after the first) and peak RSS of each side. Our
rows are padded to the pair file's seq_len, TRL's to each batch's longest row: pairs per second
is the fair unit; the table also gives the padded tokens each side ran.

usage: .venv/bin/python bench/dpo_vs_trl.py [--steps 8] [--pairs 2] [--threads 2] [--cutoff 256]
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
QLORA = os.path.join(os.environ.get("QLORA_BUILD_DIR", os.path.join(ROOT, "build")), "qlora_dist")
MODEL = os.path.join(ROOT, ".models", "smollm2")


def pref_rows(n):
    """Preference rows from real text nobody here wrote: lines of /usr/share/doc files."""
    lines = []
    for dirpath, _, files in sorted(os.walk("/usr/share/doc")):
        for f in sorted(files):
            if f in ("README", "README.md", "NEWS", "changelog") or f.startswith("README"):
                try:
                    for line in open(os.path.join(dirpath, f), errors="replace"):
                        words = line.split()
                        if 8 <= len(words) <= 30:
                            lines.append(" ".join(words))
                except OSError:
                    pass
        if len(lines) >= 2 * n:
            break
    assert len(lines) >= n + 1, "not enough text under /usr/share/doc"
    return [{"instruction": "Repeat the line.", "input": lines[i], "chosen": lines[i],
             "rejected": lines[i + 1]} for i in range(n)]


def ours(d, args):
    ini = os.path.join(d, "dpo.ini")
    with open(ini, "w") as f:
        f.write(f"""[model]
model_name_or_path = {MODEL}
[data]
train_file = {d}/pairs.h5
cutoff_len = {args.cutoff}
[train]
stage = dpo
pref_loss = sigmoid
per_device_train_batch_size = {args.pairs}
max_steps = {args.steps}
learning_rate = 5e-5
lr_scheduler_type = constant
seed = 1
[output]
output_dir = {d}/ours
logging_steps = 1
""")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS=str(args.threads))
    t0 = time.monotonic()
    res = subprocess.run(["mpirun", "-np", "1", "--bind-to", "none", QLORA, "train", ini],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    wall = time.monotonic() - t0
    lines = [json.loads(l) for l in open(os.path.join(d, "ours", "metrics.jsonl"))]
    lines = [m for m in lines if "loss" in m]
    import h5py
    import numpy as np
    with h5py.File(os.path.join(d, "pairs.h5")) as f:
        seq = f["chosen_input_ids"].shape[1]
        sides = [f["chosen_labels"][()], f["rejected_labels"][()]]
    # tokens_per_second counts rows x the file's seq_len; the trainer runs each micro-batch
    # without its trailing columns that hold no target: those are the padded tokens it ran.
    secs = [2 * args.pairs * seq / m["tokens_per_second"] for m in lines]
    order = json.load(open(os.path.join(d, "order.json")))
    last = [max(int(np.nonzero(side[i] != -100)[0][-1]) + 1 for side in sides) for i in order]
    ran = statistics.mean(2 * args.pairs * max(last[s * args.pairs:(s + 1) * args.pairs])
                          for s in range(args.steps))
    return dict(step=statistics.median(secs[1:]), rss=max(m["max_rss_bytes"] for m in lines),
                tokens=ran, wall=wall, loss=[round(m["loss"], 4) for m in lines])


def trl(d, args):
    for name in (".venv-extras", ".venv-trl"):
        sys.path.insert(0, os.path.realpath(os.path.join(ROOT, name)))
    import datasets
    import h5py
    import torch
    from peft import LoraConfig
    from torch.utils.data import SequentialSampler
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig,
                              TrainerCallback)
    from trl import DPOConfig, DPOTrainer
    torch.set_num_threads(args.threads)
    with h5py.File(os.path.join(d, "pairs.h5")) as f:
        a = {k: f[k][()] for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids",
                                   "rejected_labels")}
    order = json.load(open(os.path.join(d, "order.json")))
    rows = []
    for i in order:
        start = int((a["chosen_labels"][i] != -100).argmax())
        ends = [int((a[f"{s}_labels"][i] != -100).nonzero()[0][-1]) + 1 for s in ("chosen", "rejected")]
        rows.append({"prompt_ids": a["chosen_input_ids"][i, :start].tolist(),
                     "chosen_ids": a["chosen_input_ids"][i, start:ends[0]].tolist(),
                     "rejected_ids": a["rejected_input_ids"][i, start:ends[1]].tolist()})

    class Trainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *a, **k):
            return dataset

        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            times.append(time.monotonic())

        def on_step_end(self, *a, **k):
            times[-1] = time.monotonic() - times[-1]

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32,
                           bnb_4bit_quant_storage=torch.float32)
    t0 = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(MODEL, quantization_config=q, device_map="cpu",
                                                 dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                      "up_proj", "down_proj"])
    cfg = DPOConfig(output_dir=os.path.join(d, "trl"), per_device_train_batch_size=args.pairs,
                    max_steps=args.steps, learning_rate=5e-5, lr_scheduler_type="constant",
                    beta=0.1, loss_type=["sigmoid"], logging_steps=1, save_strategy="no",
                    report_to=[], bf16=False, fp16=False, gradient_checkpointing=True,
                    use_cpu=True, dataloader_num_workers=0, seed=1, max_length=None,
                    optim="adamw_torch")
    trainer = Trainer(model=model, args=cfg, peft_config=lora,
                      train_dataset=datasets.Dataset.from_list(rows),
                      processing_class=AutoTokenizer.from_pretrained(MODEL), callbacks=[Clock()])
    for p in trainer.model.parameters():  # TRL casts a quantized model's adapter to bf16
        if p.requires_grad:
            p.data = p.data.float()
    trainer.train()
    wall = time.monotonic() - t0
    losses = [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]
    padded = sum(2 * args.pairs * max(len(r["prompt_ids"]) +
                                      max(len(r["chosen_ids"]), len(r["rejected_ids"]))
                                      for r in rows[s * args.pairs:(s + 1) * args.pairs])
                 for s in range(args.steps)) / args.steps
    return dict(step=statistics.median(times[1:]), rss=resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss * 1024, tokens=padded, wall=wall, loss=losses)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cutoff", type=int, default=256)
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="dpo_bench_")
    n = args.steps * args.pairs
    with open(os.path.join(d, "pref.json"), "w") as f:
        json.dump(pref_rows(n), f)
    with open(os.path.join(d, "prep.ini"), "w") as f:
        f.write(f"[model]\nmodel_name_or_path = {MODEL}\n[data]\ndataset = {d}/pref.json\n"
                f"template = smollm2\ncutoff_len = {args.cutoff}\n[train]\nstage = dpo\n"
                f"[output]\noutput_dir = {d}/unused\n")
    res = subprocess.run([QLORA, "prep", os.path.join(d, "prep.ini"), "--out",
                          os.path.join(d, "pairs.h5")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    # Our sampler's order of the pairs (seed 1, one rank): TRL reads them in that order.
    probe = os.path.join(os.path.dirname(QLORA), "tests", "reference", "optim_probe")
    order = json.loads(subprocess.run([probe, "sampler", str(n), str(args.pairs), "1", "1",
                                       str(args.steps)], capture_output=True, text=True,
                                      check=True).stdout)
    json.dump([i for step in order for i in step[0]], open(os.path.join(d, "order.json"), "w"))
    o = ours(d, args)
    t = trl(d, args)
    print(f"DPO sigmoid on SmolLM2-135M NF4 fp32, {args.pairs} pairs a step, {args.threads} "
          f"threads, {args.steps} steps ({os.cpu_count()} CPUs)")
    print("| side | s/step (median) | pairs/s | padded tokens/step | peak RSS MiB | wall s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in (("qlora_dist", o), ("TRL 1.16 + peft + bnb", t)):
        print(f"| {name} | {r['step']:.2f} | {args.pairs / r['step']:.2f} | {r['tokens']:.0f} | "
              f"{r['rss'] / 2**20:.0f} | {r['wall']:.1f} |")
    print(f"speed ratio (ours / TRL, pairs/s): {t['step'] / o['step']:.2f}x; losses ours "
          f"{o['loss']}, TRL {t['loss']}")


if __name__ == "__main__":
    main()
