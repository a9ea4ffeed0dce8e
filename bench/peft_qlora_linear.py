"""The Python stack doing what bench_qlora_linear does: one bitsandbytes Linear4bit (NF4, double
quant, blocksize 64, fp32 compute) with a peft LoRA (rank 16, alpha 32), forward + backward at
512 tokens, fp32, on the CPU; and the same layer with a plain fp32 nn.Linear. Prints ms per step
and GFLOP/s counted as bench_qlora_linear counts them (2 base GEMMs + LoRA).
    .venv/bin/python bench/peft_qlora_linear.py [--threads 2] [--reps 5]"""
import argparse
import statistics
import time
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402
import bitsandbytes as bnb  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--reps", type=int, default=5)
args = ap.parse_args()
torch.set_num_threads(args.threads)
M, R = 512, 16


class One(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def step_time(model, k):
    x = torch.randn(M, k, requires_grad=True)
    g = torch.randn(M, model.proj.base_layer.out_features if hasattr(model.proj, "base_layer") else model.proj.out_features)
    times = []
    for i in range(args.reps + 1):
        t0 = time.perf_counter()
        y = model(x)
        y.backward(g)
        dt = time.perf_counter() - t0
        if i:  # the first call warms up
            times.append(dt)
        x.grad = None
    return statistics.median(times)


print(f"| shape (in x out) | layer | ms per fwd+bwd | GFLOP/s |")
print("| --- | --- | ---: | ---: |")
for k, n in ((4096, 4096), (4096, 11008)):
    flops = 2 * (2 * M * n * k) + 6 * M * R * (k + n)
    w = torch.randn(n, k) * 0.02
    plain = torch.nn.Linear(k, n, bias=False)
    plain.weight.data.copy_(w)
    q = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.float32, compress_statistics=True,
                          quant_type="nf4")
    q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                 blocksize=64)
    q.weight = q.weight._quantize("cpu") if hasattr(q.weight, "_quantize") else q.weight
    for name, layer in (("fp32 nn.Linear + peft LoRA", plain), ("bnb Linear4bit + peft LoRA", q)):
        model = get_peft_model(One(layer), LoraConfig(r=R, lora_alpha=2 * R, target_modules=["proj"]))
        with torch.no_grad():
            for p_name, p in model.named_parameters():
                if "lora_B" in p_name:
                    p.normal_(0, 0.01)
        t = step_time(model, k)
        print(f"| {k}x{n} | {name} | {t * 1e3:.1f} | {flops / t / 1e9:.1f} |")
