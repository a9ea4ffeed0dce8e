#!/usr/bin/env python3
"""bitsandbytes' own CPU dequantize_4bit (NF4, blocksize 64), single thread, on the shapes and
dtypes of bench_dequantize.cpp, with bytes counted the same way:
    n/2 packed + n/64*4 absmax + n*4 (fp32) or n*2 (bf16) output;  copy: half read, half written.
Rows:
  bnb       the native CPU kernel bitsandbytes dispatches to (libbitsandbytes_cpu), called with a
            preallocated output exactly as bitsandbytes/backends/cpu/ops.py calls it: the kernel
            alone, comparable with our kernels, which also write into a preallocated buffer.
  bnb_api   bitsandbytes.functional.dequantize_4bit(packed, quant_state): what a user calls;
            it also allocates the output (page faults included).
  torch_copy  dst.copy_(src) of uint8 tensors moving the same number of bytes.
Also reports whether bitsandbytes' output equals its own reference formula code[q] * absmax
bit for bit. Usage: bnb_dequantize.py [--min-time SECONDS] [--json]
"""
import os

# OpenMP (bitsandbytes' CPU kernels) and torch's intra-op pool: one thread, set before import.
os.environ["OMP_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import ctypes as ct  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as F  # noqa: E402
from bitsandbytes.cextension import lib  # noqa: E402

BLOCKSIZE = 64
SHAPES = [(4096, 4096), (4096, 11008)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def traffic_nbytes(numel, dtype):
    out_itemsize = torch.empty((), dtype=dtype).element_size()
    return (numel + 1) // 2 + (numel + BLOCKSIZE - 1) // BLOCKSIZE * 4 + numel * out_itemsize


def mean_seconds(fn, min_time):
    fn()  # warm up: first-touch page faults, lazy library loading
    iters, start = 0, time.perf_counter()
    while True:
        fn()
        iters += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time and iters >= 3:
            return elapsed / iters


def exact_formula(packed, absmax, numel, dtype):
    """code[q] * absmax in fp32 (first element in the high nibble), then rounded to dtype."""
    code = F.get_4bit_type("nf4", device="cpu").float()
    flat = packed.view(torch.uint8).reshape(-1)
    q = torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1)[:numel].long()
    scale = absmax.float().repeat_interleave(BLOCKSIZE)[:numel]
    return (code[q] * scale).to(dtype)


def bit_mismatches(a, b):
    ia = a.reshape(-1).view(torch.int32 if a.dtype == torch.float32 else torch.int16)
    ib = b.reshape(-1).view(torch.int32 if b.dtype == torch.float32 else torch.int16)
    return int((ia != ib).sum())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds per measurement")
    ap.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(1234)

    rows_out = []
    for rows, cols in SHAPES:
        shape = f"{rows}x{cols}"
        numel = rows * cols
        for dname, dtype in DTYPES.items():
            w = (torch.randn(rows, cols) * 0.02).to(dtype)
            packed, qs = F.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4")
            del w
            nbytes = traffic_nbytes(numel, dtype)

            native = getattr(lib, f"cdequantize_blockwise_cpu_nf4_{dname}")
            a2d = packed.view(torch.uint8).reshape(rows, cols // 2)
            out = torch.empty(rows, cols, dtype=dtype)

            def kernel():
                native(F.get_ptr(a2d), F.get_ptr(qs.absmax), F.get_ptr(out),
                       ct.c_longlong(BLOCKSIZE), ct.c_longlong(rows), ct.c_longlong(cols))

            def api():
                return F.dequantize_4bit(packed, qs)

            # Validate before timing: the kernel call is what the API computes.
            kernel()
            api_out = api()
            if not torch.equal(out.view(torch.uint8), api_out.view(torch.uint8)):
                raise SystemExit(f"native kernel differs from dequantize_4bit for {shape} {dname}")
            mismatches = bit_mismatches(api_out, exact_formula(packed, qs.absmax, numel, dtype))
            del api_out

            for kernel_name, fn in (("bnb", kernel), ("bnb_api", api)):
                sec = mean_seconds(fn, args.min_time)
                rows_out.append({"kernel": kernel_name, "shape": shape, "dtype": dname,
                                 "seconds": sec, "gbps": nbytes / sec / 1e9,
                                 "exact_mismatches": mismatches})

            half = nbytes // 2
            src = torch.zeros(half, dtype=torch.uint8)
            dst = torch.zeros(half, dtype=torch.uint8)
            sec = mean_seconds(lambda: dst.copy_(src), args.min_time)
            rows_out.append({"kernel": "torch_copy", "shape": shape, "dtype": dname,
                             "seconds": sec, "gbps": 2 * half / sec / 1e9})
            del src, dst, out, packed, qs

    if args.json:
        print(json.dumps({"torch": torch.__version__, "bitsandbytes": bnb.__version__,
                          "rows": rows_out}))
        return
    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, 1 thread")
    print(f"{'kernel':<11} {'shape':<11} {'dtype':<5} {'ms':>8} {'GB/s':>7}  bit-exact")
    for r in rows_out:
        exact = "" if "exact_mismatches" not in r else (
            "yes" if r["exact_mismatches"] == 0 else f"no ({r['exact_mismatches']} differ)")
        print(f"{r['kernel']:<11} {r['shape']:<11} {r['dtype']:<5} {r['seconds'] * 1e3:8.2f} "
              f"{r['gbps']:7.2f}  {exact}")


if __name__ == "__main__":
    main()
