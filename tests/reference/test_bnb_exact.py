"""Our 4-bit quantization against the real bitsandbytes package (CPU backend), byte for byte.

For every case (shape incl. 1 element, odd counts and partial last blocks; every blocksize;
nf4 and fp4; with and without double quantization; fp32/bf16/fp16 input; every storage dtype)
bitsandbytes quantizes x, our quant_probe quantizes x, and we require:
  - packed bytes identical (and identical across storage dtypes),
  - absmax identical bit for bit (not nested), or offset and nested_absmax identical and each
    quantized absmax either identical or, where bitsandbytes' CPU lookup-table quantizer misses
    the nearest code, exactly one code step away with ours the nearer (DESIGN: CUDA semantics),
  - our dequantize (AVX2 and the libtorch fallback) of bitsandbytes' own state identical to
    bitsandbytes.functional.dequantize_4bit, in fp32, bf16 and fp16, but for the sign of a zero,
    which is checked against our own rule (FP4 code 8 is -0.0; see conftest.py for why).
No tolerance anywhere: every comparison is of bit patterns."""
import itertools
import json
import os
import tempfile

import numpy as np
import pytest
import torch
import bitsandbytes.functional as F
from safetensors.torch import load_file, save_file

from conftest import (FP4_CODE8, KNOWN_BNB_CPU_BUG, assert_fp4_code8_sign, binary, bits,
                      bnb_dequantize, run, same_as_bnb)

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
SHAPES = [(1,), (2,), (3,), (7,), (33,), (64,), (65,), (13, 11), (96, 64), (4097,), (3, 4103),
          (300, 66)]
STORAGE = {"uint8": torch.uint8, "bf16": torch.bfloat16, "fp16": torch.float16,
           "fp32": torch.float32}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def special_inputs():
    """Hand-made inputs: values exactly on the quantization bounds, NaN / Inf / zero blocks."""
    g = torch.Generator().manual_seed(7)
    out = {}
    for qt in ("nf4", "fp4"):
        code = F.get_4bit_type(qt, device="cpu")
        srt = torch.sort(code).values
        bounds = (srt[:-1] + srt[1:]) / 2
        # absmax 1.0 (present in the block) makes x * (1/absmax) == bound exactly: a tie.
        tie = torch.cat([torch.tensor([1.0]), bounds, -bounds, bounds * 0.5])
        out[f"ties_{qt}"] = tie
        # The same ties in a partial last block, which divides instead of multiplying.
        out[f"ties_partial_{qt}"] = torch.cat([torch.randn(64, generator=g), tie[:31]])
        # Ties against a non-trivial absmax: x = bound * a, scaled back by 1/a.
        a = torch.tensor(3.0)
        out[f"ties_scaled_{qt}"] = torch.cat([a.view(1), bounds * a, torch.nextafter(bounds * a, torch.tensor(9.0))])
    z = torch.zeros(64)
    nan_block = torch.randn(64, generator=g); nan_block[5] = float("nan")
    inf_block = torch.randn(64, generator=g); inf_block[9] = float("inf")
    ninf_block = torch.randn(64, generator=g); ninf_block[0] = float("-inf")
    out["special_blocks"] = torch.cat([z, nan_block, inf_block, ninf_block, -z, torch.zeros(13)])
    out["denormals"] = torch.cat([torch.full((64,), 1e-40), torch.full((64,), -3e-39), torch.tensor([1e-45, 0.0, -1e-45])])
    out["huge"] = torch.cat([torch.full((64,), 3e38),
                             torch.linspace(-3.4e38, 3.4e38, 70, dtype=torch.float64).float()])
    return out


def make_cases():
    g = torch.Generator().manual_seed(1234)
    cases, inputs = [], {}
    def add(x, name, bs, qt, dq, storage, dtype):
        cid = f"{name}-{dtype}-bs{bs}-{qt}-{'dq' if dq else 'nodq'}-{storage}"
        cases.append(dict(id=cid, blocksize=bs, quant_type=qt, double_quant=dq, storage=storage,
                          dtype=dtype))
        inputs["x/" + cid] = x.to(DTYPES[dtype]).clone()
    for shape, bs, qt, dq in itertools.product(SHAPES, BLOCKSIZES, ("nf4", "fp4"), (False, True)):
        # Scales vary per element so absmax differs per block (and double quant has work to do).
        x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g))
        name = "x".join(map(str, shape))
        for dtype in DTYPES:
            add(x, name, bs, qt, dq, "uint8", dtype)
        for storage in ("bf16", "fp16", "fp32"):
            add(x, name, bs, qt, dq, storage, "fp32")
    for name, x in special_inputs().items():
        for bs, qt, dq in itertools.product((32, 64, 128), ("nf4", "fp4"), (False, True)):
            add(x, name, bs, qt, dq, "uint8", "fp32")
    return cases, inputs


def bnb_quantize(x, c):
    return F.quantize_4bit(x, blocksize=c["blocksize"], compress_statistics=c["double_quant"],
                           quant_type=c["quant_type"], quant_storage=STORAGE[c["storage"]])


@pytest.fixture(scope="module")
def results():
    cases, inputs = make_cases()
    # bitsandbytes' own state goes to the probe too, to be dequantized by our kernels.
    bnb = {}
    for c in cases:
        x = inputs["x/" + c["id"]]
        try:
            packed, st = bnb_quantize(x, c)
        except Exception as e:  # bitsandbytes cannot view an odd byte count as a wider storage
            bnb[c["id"]] = e
            continue
        bnb[c["id"]] = (packed, st)
        p = f"state/{c['id']}/"
        inputs[p + "packed"] = packed.view(torch.uint8).reshape(-1).clone()
        inputs[p + "absmax"] = st.absmax.clone()
        if st.nested:
            inputs[p + "nested_absmax"] = st.state2.absmax.clone()
            inputs[p + "offset"] = st.offset.reshape(1).clone()
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "in.safetensors"), os.path.join(d, "out.safetensors")
        save_file(inputs, src, metadata={"cases": json.dumps(cases)})
        run([binary("quant_probe"), "cases", src, dst])
        ours = load_file(dst)
    return cases, inputs, bnb, ours


def case_ids():
    return [c["id"] for c in make_cases()[0]]


def test_case_count(results):
    cases, _, bnb, _ = results
    assert len(cases) > 1000
    # Every input case except wide storage of an odd byte count went through bitsandbytes.
    failed = [k for k, v in bnb.items() if isinstance(v, Exception)]
    assert all("-uint8" not in k for k in failed), failed


@pytest.mark.parametrize("cid", case_ids())
def test_case(results, cid):
    cases, inputs, bnb, ours = results
    c = next(c for c in cases if c["id"] == cid)
    mine_packed = ours[cid + "/packed"]
    assert mine_packed.dtype == STORAGE[c["storage"]], cid
    x = inputs["x/" + cid]
    n = x.numel()
    if isinstance(bnb[cid], Exception):
        # The bytes must be those of uint8 storage, only viewed differently.
        ref_packed, _ = F.quantize_4bit(x, blocksize=c["blocksize"], quant_type=c["quant_type"])
        mine_bytes = mine_packed.view(torch.uint8).reshape(-1)
        assert torch.equal(mine_bytes[: (n + 1) // 2], ref_packed.reshape(-1)), cid
        assert torch.all(mine_bytes[(n + 1) // 2:] == 0), cid
        return
    ref_packed, st = bnb[cid]
    assert mine_packed.shape == ref_packed.shape, f"{cid}: {mine_packed.shape} vs {ref_packed.shape}"
    assert torch.equal(bits(mine_packed), bits(ref_packed)), f"{cid}: packed bytes differ"
    assert torch.equal(bits(ours[cid + "/code"]), bits(st.code)), f"{cid}: quant_map differs"
    if not c["double_quant"]:
        assert torch.equal(bits(ours[cid + "/absmax"]), bits(st.absmax)), f"{cid}: absmax differs"
    else:
        assert torch.equal(bits(ours[cid + "/offset"]), bits(st.offset.reshape(1))), f"{cid}: offset"
        assert torch.equal(bits(ours[cid + "/nested_absmax"]), bits(st.state2.absmax)), cid
        assert torch.equal(bits(ours[cid + "/nested_code"]), bits(st.state2.code)), cid
        check_nested_codes(cid, ours[cid + "/absmax"], st, x, c)
    # Our dequantize of bitsandbytes' state == bitsandbytes' dequantize, every output dtype.
    for tag, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        mine = ours[f"bnb/{cid}/deq_{tag}"]
        assert mine.shape == x.shape, cid
        # bitsandbytes returns [1, n] for a 1-D weight; compare element by element.
        ref = bnb_dequantize(ref_packed, st, dt, tag=cid).reshape(-1)
        if not same_as_bnb(mine.reshape(-1), ref):
            diff = (bits(mine.reshape(-1), True) != bits(ref, True)).nonzero().reshape(-1)
            pytest.fail(f"{cid}: dequantize to {tag} differs at flat {diff[:5].tolist()}: "
                        f"ours {mine.reshape(-1)[diff[:5]].tolist()} bnb {ref[diff[:5]].tolist()}")
        if c["quant_type"] == "fp4":
            FP4_CODE8_CHECKED.append(assert_fp4_code8_sign(mine, ref_packed, st, f"{cid} {tag}"))
    # The libtorch fallback is the second opinion on the kernels: identical.
    for tag in ("fp32", "bf16"):
        assert torch.equal(bits(ours[f"{cid}/deq_torch_{tag}"]), bits(ours[f"{cid}/deq_{tag}"])), cid
        assert torch.equal(bits(ours[f"bnb/{cid}/deq_torch_{tag}"]), bits(ours[f"bnb/{cid}/deq_{tag}"])), cid


NESTED_STEPS = []
FP4_CODE8_CHECKED = []  # per fp4 case and dtype: how many code-8 elements had their sign checked


def check_nested_codes(cid, mine_q, st, x, c):
    """Second-level codes: equal to bitsandbytes', or, where its CPU lookup table misses, ours is
    the nearest code of all 256 (CUDA semantics; ties allowed) and strictly nearer than its."""
    ref_q = st.absmax
    diff = mine_q.int() - ref_q.int()
    idx = diff.nonzero().reshape(-1)
    if idx.numel() == 0:
        return
    NESTED_STEPS.append(diff.abs().max().item())
    # The value both quantized: the first-level absmax minus the offset, scaled by the block.
    _, plain = F.quantize_4bit(x, blocksize=c["blocksize"], quant_type=c["quant_type"])
    target = ((plain.absmax - st.offset) * (1.0 / st.state2.absmax.repeat_interleave(256)[: plain.absmax.numel()])).double()[idx]
    code = st.state2.code.double()
    mine_err = (code[mine_q[idx].long()] - target).abs()
    ref_err = (code[ref_q[idx].long()] - target).abs()
    best_err = (code.view(1, -1) - target.view(-1, 1)).abs().min(dim=1).values
    assert torch.all(mine_err <= best_err + 1e-12), f"{cid}: our nested code is not the nearest at blocks {idx[:5].tolist()}"
    assert torch.all(mine_err < ref_err), f"{cid}: bitsandbytes' code as near as ours at {idx[:5].tolist()}"


def test_report_known_deviations(results):
    """Runs last: says how often bitsandbytes' CPU path was not the reference (not a failure),
    and that the sign of FP4 code 8 was checked somewhere."""
    if FP4_CODE8_CHECKED:
        assert sum(FP4_CODE8_CHECKED) > 0, "no case had an FP4 code 8 to check"
    print(f"\nbitsandbytes generic path used where its native CPU kernel is wrong (rows not block-aligned): {len(KNOWN_BNB_CPU_BUG)} cases;"
          f" nested-absmax LUT misses: {len(NESTED_STEPS)} cases, at most {max(NESTED_STEPS, default=0)} code steps;"
          f" FP4 code 8 decoded to {FP4_CODE8}: {sum(FP4_CODE8_CHECKED)} elements")
