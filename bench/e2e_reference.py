"""The Python stack's side of bench/run_e2e.sh: QLoRA training steps with transformers loading a
bitsandbytes NF4 checkpoint (written by `qlora_dist quantize`), peft LoRA on all seven linears
(rank 8, alpha 16, no dropout), torch AdamW, gradient clipping at 1.0, on the CPU, over the rows
of a qlora_dist token file (input_ids, labels), `--batch` rows of `--seq` tokens per step.
Compute dtype fp32 (the model loaded in fp32) or bf16 (loaded in bf16; peft keeps its LoRA
weights in fp32, as ours are), gradient checkpointing on or off. Prints one JSON line:
tokens/s of the median timed step (the first `--warmup` dropped), its seconds, the process's
peak RSS (ru_maxrss) and the losses.

A second mode, `--gemm-peak HIDDEN FFN TOKENS`, prints the GFLOP/s of one torch.mm of a block's
shapes ([TOKENS, HIDDEN] x [HIDDEN, FFN]) in fp32 and bf16 (the same libtorch our build links).
"""
import argparse
import json
import resource
import time

import torch


def gemm_peak(hidden, ffn, tokens, threads, min_time=1.0):
    torch.set_num_threads(threads)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(tokens, hidden, dtype=dtype)
        b = torch.randn(hidden, ffn, dtype=dtype)
        c = torch.empty(tokens, ffn, dtype=dtype)
        for _ in range(3):
            torch.mm(a, b, out=c)
        best = 0.0
        t_end = time.perf_counter() + min_time
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            best = max(best, 2.0 * tokens * hidden * ffn / (time.perf_counter() - t0) / 1e9)
        out[name] = best
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("data", nargs="?")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compute", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--checkpointing", default="on", choices=["on", "off"])
    ap.add_argument("--gemm-peak", nargs=3, type=int, metavar=("HIDDEN", "FFN", "TOKENS"))
    a = ap.parse_args()
    if a.gemm_peak:
        print(json.dumps(gemm_peak(*a.gemm_peak, a.threads)))
        return
    torch.set_num_threads(a.threads)
    import bitsandbytes as bnb
    import h5py
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    dtype = torch.float32 if a.compute == "fp32" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(a.model, device_map="cpu", dtype=dtype)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            # The training path (dequantize + matmul); the AVX512-BF16 packed-weight path is for
            # inference only.
            m.support_avx512bf16_for_cpu = False
            m.compute_dtype = dtype
    if a.checkpointing == "on":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"],
                                             task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    n = a.batch * (a.steps + a.warmup)
    with h5py.File(a.data, "r") as f:
        if f["input_ids"].shape[0] < n:
            raise SystemExit(f"{a.data}: {f['input_ids'].shape[0]} rows, {n} needed")
        ids = torch.tensor(f["input_ids"][:n, : a.seq], dtype=torch.long)
        labels = torch.tensor(f["labels"][:n, : a.seq], dtype=torch.long)
    model.train()
    times, losses = [], []
    for s in range(a.steps + a.warmup):
        t0 = time.perf_counter()
        sl = slice(s * a.batch, (s + 1) * a.batch)
        loss = model(input_ids=ids[sl], labels=labels[sl]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    timed = sorted(times[a.warmup:])
    median = timed[len(timed) // 2] if len(timed) % 2 else sum(timed[len(timed) // 2 - 1:][:2]) / 2
    print(json.dumps({"tokens_per_second": a.batch * a.seq / median,
                      "step_seconds": median,
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "losses": losses}))


if __name__ == "__main__":
    main()
