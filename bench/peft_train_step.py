"""The same QLoRA training step with the Python stack: transformers loading a bitsandbytes NF4
checkpoint (written by `qlora_dist quantize`), peft LoRA on all seven linears, torch AdamW, fp32
compute, on the CPU. Prints tokens/s over the timed steps (the first `--warmup` steps dropped).
Usage: peft_train_step.py Q4_DIR DATA.h5 --steps 8 --batch 8 --seq 64 --rank 8 --threads 2
"""
import argparse
import json
import time

import h5py
import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compute", default="fp32", choices=["fp32", "bf16"])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(a.model, device_map="cpu", torch_dtype=torch.float32)
    for m in model.modules():  # the training path (dequantize + matmul), as in tests/reference
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            # The checkpoint's bnb_4bit_compute_dtype is the model's bf16; compare like for like.
            m.compute_dtype = torch.float32 if a.compute == "fp32" else torch.bfloat16
    model.gradient_checkpointing_enable()  # what a QLoRA user enables (we recompute per block)
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"],
                                             task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with h5py.File(a.data, "r") as f:
        ids = torch.tensor(f["input_ids"][: a.batch * (a.steps + a.warmup), : a.seq], dtype=torch.long)
        labels = torch.tensor(f["labels"][: a.batch * (a.steps + a.warmup), : a.seq], dtype=torch.long)
    model.train()
    times = []
    for s in range(a.steps + a.warmup):
        t0 = time.perf_counter()
        sl = slice(s * a.batch, (s + 1) * a.batch)
        loss = model(input_ids=ids[sl], labels=labels[sl]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    timed = times[a.warmup:]
    print(json.dumps({"tokens_per_second": a.batch * a.seq * len(timed) / sum(timed),
                      "step_seconds": sum(timed) / len(timed)}))


if __name__ == "__main__":
    main()
