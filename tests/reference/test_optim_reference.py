"""Our AdamW (src/dist/adamw.h) and learning-rate schedules (src/train/lr_schedule.h) against
torch.optim.AdamW and transformers.get_scheduler, driven through optim_probe.

AdamW: tensors of 1, 7 and 1000003 elements (the odd size leaves a scalar tail after every
vectorized loop), 7 steps with weight decay, bias correction and a rate that changes every step
(0 at the first, as warmup gives), gradients from 1e-25 (squares below float's normal range) to
1e3 and exact zeros, two sets of betas / eps. The reference is torch's single-tensor path, asked
for explicitly (foreach=False, fused=False) and as AdamW's default picks it for CPU tensors.
Tolerance: none, every parameter and both moments bit for bit after every step. Why that is the
right bound: optim_probe runs the same libtorch kernels (lerp_, mul_, addcmul_, sqrt, div,
add_, addcdiv_) in the same order on the same fp32 data, and the scalars are computed in double
on both sides by the same formulas (1 - lr * wd, 1 - b^t, lr / bc1). The one operation that may
round differently is sqrt(bc2): std::sqrt here, `bc2 ** 0.5` (libm pow) in torch, within 1 ulp
of double; it reaches the fp32 kernel only when that ulp crosses a float rounding boundary
(about 1 in 2^28). Measured: 0 ulp everywhere. The same bits are required when our update runs
with 2 threads or on the tensor cut into shards (as the trainer's shards are), which moves
elements between libtorch's vectorized loop and its scalar tail loop.

Schedules: constant, linear and cosine, warmup given as steps (0, 1, 2, 3, 10 and more than the
total) and as a ratio (TrainingArguments.get_warmup_steps: ceil(ratio * total); transformers 5
takes a ratio as warmup_steps < 1), totals 1, 2, 3, 10, 97. Compared: the warmup step count
(exactly) and the rate of every optimizer step k, which is what LambdaLR holds after k calls of
scheduler.step(). Our "constant" is constant after a linear warmup: transformers'
"constant_with_warmup". transformers' own "constant" (what HF Trainer and LLaMA-Factory's HF
path build for lr_scheduler_type = constant) ignores the warmup; it matches ours only when the
warmup is 0, which is checked too. Both sides compute in double (LambdaLR multiplies Python
floats) with the same operations in the same order (warmup: lr * (k / warmup), as LambdaLR
multiplies the base rate by the factor), so every rate must be equal to the bit.
"""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import binary, run

ADAMW_SIZES = {"n1": 1, "n7": 7, "n1000003": 1000003}
ADAMW_LRS = [0.0, 1e-3, 2e-3, 3e-3, 2.5e-3, 1.2e-3, 4e-4]
ADAMW_OPTIONS = {
    "default_betas": dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1),
    "other_betas": dict(beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.01),
}
TORCH_PATHS = {"single_tensor": dict(foreach=False, fused=False), "default": {}}


def ulps(a, b):
    """Element-wise distance in float32 units in the last place (+0 and -0 are 0 apart)."""
    def ordered(x):
        i = x.contiguous().view(torch.int32).to(torch.int64)
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)
    return (ordered(a) - ordered(b)).abs()


def adamw_inputs(steps, sizes=ADAMW_SIZES):
    g = torch.Generator().manual_seed(7)
    params, grads = {}, {}
    for name, n in sizes.items():
        p = torch.randn(n, generator=g) * 0.05
        p[0] = 0.0 if n > 1 else 0.03
        params[name] = p
        for t in range(1, steps + 1):
            scale = 10.0 ** float(torch.randint(-4, 2, (1,), generator=g))
            gr = torch.randn(n, generator=g) * scale
            special = torch.tensor([1e-25, 0.0, -1e3, 3.5e-20, 1e3, -1e-30, 0.0])
            k = min(n, len(special))
            gr[-k:] = special[:k] if n > 1 else torch.tensor([0.25 * (-1) ** t])
            grads[name, t] = gr
    return params, grads


def our_adamw(tmp_path, params, grads, lrs, options, threads=1, shard_numel=0):
    tensors = {f"param/{k}": v for k, v in params.items()}
    tensors.update({f"grad/{k}/{t}": v for (k, t), v in grads.items()})
    inp, out = tmp_path / "adamw_in.safetensors", tmp_path / "adamw_out.safetensors"
    save_file(tensors, str(inp),
              metadata={"options": json.dumps(dict(options, lr=lrs, threads=threads,
                                                   shard_numel=shard_numel))})
    run([binary("optim_probe"), "adamw", str(inp), str(out)])
    return load_file(str(out))


def torch_adamw(params, grads, lrs, o, **path):
    ps = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = torch.optim.AdamW(list(ps.values()), lr=lrs[0], betas=(o["beta1"], o["beta2"]),
                            eps=o["eps"], weight_decay=o["weight_decay"], **path)
    out = {}
    for t, lr in enumerate(lrs, 1):
        for group in opt.param_groups:
            group["lr"] = lr
        for k, p in ps.items():
            p.grad = grads[k, t].clone()
        opt.step()
        for k, p in ps.items():
            out[f"param/{k}/{t}"] = p.detach().clone()
    for k, p in ps.items():
        out[f"exp_avg/{k}"] = opt.state[p]["exp_avg"]
        out[f"exp_avg_sq/{k}"] = opt.state[p]["exp_avg_sq"]
    return out


@pytest.mark.parametrize("path", list(TORCH_PATHS))
@pytest.mark.parametrize("opt_name", list(ADAMW_OPTIONS))
def test_adamw_matches_torch_bit_for_bit(tmp_path, opt_name, path):
    torch.set_num_threads(1)
    o = ADAMW_OPTIONS[opt_name]
    params, grads = adamw_inputs(len(ADAMW_LRS))
    ours = our_adamw(tmp_path, params, grads, ADAMW_LRS, o)
    ref = torch_adamw(params, grads, ADAMW_LRS, o, **TORCH_PATHS[path])
    assert_bit_identical(ours, ref, f"{opt_name}, torch path {path}")
    # The moments of the one-element tensor moved (guards against a vacuous run).
    assert float(ref["exp_avg_sq/n1"]) > 0


@pytest.mark.parametrize("layout", ["2_threads", "shards_of_7", "shards_of_65537"])
def test_adamw_does_not_depend_on_layout(tmp_path, layout):
    """adamw.h promises an update that does not depend on how the weights are sharded. libtorch
    runs each element-wise op as a vectorized loop with a scalar loop for the last elements of
    every contiguous piece (and of every thread's chunk), so sharding moves elements between the
    two: with shards of 7 every element takes the scalar loop, with 65537 some do. Both must give
    the bits of torch's whole-tensor update. (100003 elements instead of 1000003: 14287 shards
    of 7 take a second, 142858 would take 20.)"""
    torch.set_num_threads(1)
    o = ADAMW_OPTIONS["default_betas"]
    params, grads = adamw_inputs(len(ADAMW_LRS), {"n1": 1, "n7": 7, "n100003": 100003})
    threads, shard = {"2_threads": (2, 0), "shards_of_7": (1, 7),
                      "shards_of_65537": (1, 65537)}[layout]
    ours = our_adamw(tmp_path, params, grads, ADAMW_LRS, o, threads=threads, shard_numel=shard)
    ref = torch_adamw(params, grads, ADAMW_LRS, o, foreach=False, fused=False)
    assert_bit_identical(ours, ref, layout)


def assert_bit_identical(ours, ref, where):
    assert sorted(ours) == sorted(ref)
    worst = {k: int(ulps(ours[k], ref[k]).max()) for k in ref}
    print(f"{where}: max {max(worst.values())} ulps over {len(worst)} tensors")
    bad = {k: v for k, v in worst.items() if v != 0}
    assert not bad, f"{where}: not bit-identical to torch (max ulps per tensor): {bad}"


# ------------------------------------------------------------------------------------------
# Learning-rate schedules

HF_NAME = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
TOTALS = [1, 2, 3, 10, 97]
WARMUP_STEPS = [0, 1, 2, 3, 10, 150]
WARMUP_RATIOS = [0.01, 0.03, 0.1, 0.3, 0.5, 0.9, 0.999]
LR = 3e-4


def lr_cases():
    cases = []
    for kind in HF_NAME:
        for total in TOTALS:
            for w in WARMUP_STEPS:
                cases.append(dict(type=kind, learning_rate=LR, warmup_steps=w, warmup_ratio=0.0,
                                  total=total))
            for r in WARMUP_RATIOS:
                cases.append(dict(type=kind, learning_rate=LR, warmup_steps=0, warmup_ratio=r,
                                  total=total))
    return cases


def hf_rates(name, warmup, total):
    """The rate of each optimizer step k: group["lr"] after k calls of scheduler.step()."""
    from transformers import get_scheduler
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=LR)
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)
    rates = []
    for _ in range(total):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


@pytest.fixture(scope="module")
def lr_results():
    cases = lr_cases()
    res = run([binary("optim_probe"), "lr", json.dumps(cases)])
    return cases, json.loads(res.stdout)


def test_lr_schedules_match_transformers(lr_results):
    from transformers import TrainingArguments
    args = TrainingArguments(output_dir="unused", report_to=[])
    cases, ours = lr_results
    assert len(ours) == len(cases)
    worst_warmup = worst_decay = 0.0
    for c, o in zip(cases, ours):
        where = json.dumps(c)
        # transformers 5: warmup_steps >= 1 is a step count, < 1 a ratio of the total.
        args.warmup_steps = c["warmup_steps"] if c["warmup_steps"] > 0 else c["warmup_ratio"]
        warmup = args.get_warmup_steps(c["total"])
        assert o["warmup"] == warmup, where
        names = [HF_NAME[c["type"]]] + (["constant"] if c["type"] == "constant" and warmup == 0
                                         else [])
        for name in names:
            ref = hf_rates(name, warmup, c["total"])
            assert len(o["lr"]) == len(ref), where
            for k, (a, b) in enumerate(zip(o["lr"], ref)):
                d = abs(a - b) / np.spacing(b) if b != 0 else abs(a) / np.spacing(0.0)
                if k < warmup:
                    worst_warmup = max(worst_warmup, d)
                else:
                    worst_decay = max(worst_decay, d)
                assert a == b, f"{where} vs {name}: step {k}: {a!r} vs {b!r}"
    print(f"{len(cases)} schedules: max {worst_warmup:g} ulp during warmup, "
          f"{worst_decay:g} after")


def test_lr_schedules_are_not_vacuous(lr_results):
    """Every phase is exercised: warmup from 0, a rate at the peak, decay to near 0."""
    cases, ours = lr_results
    lin = [o for c, o in zip(cases, ours) if c["type"] == "linear" and c["total"] == 97
           and c["warmup_steps"] == 10]
    assert lin[0]["lr"][0] == 0.0 and lin[0]["lr"][10] == LR and 0 < lin[0]["lr"][-1] < LR / 50
