"""FP8 and MXFP4 checkpoints, dequantized on load, against transformers 5.23 and torch.

Checkpoints are written by the test from a random LLaMA made by transformers (odd sizes: hidden
96, intermediate 200, so FP8 blocks of 128 are partial), with torch's own float8 casts:
  fp8   `M.weight` float8_e4m3fn [out, in], `M.weight_scale_inv` [ceil(out/bn), ceil(in/bk)]
        (fp32, or E8M0 as float8_e8m0fnu / uint8 when scale_fmt is ue8m0; [] per tensor)
  mxfp4 `M.weight_blocks` uint8 [out, in/32, 16], `M.weight_scales` uint8 [out, in/32]: random
        bytes (every byte is a valid E2M1 pair / E8M0 scale)
Each has one linear kept as a plain bf16/fp32 weight (modules_to_not_convert).

What is checked, every bit (NaNs as NaN):
  - dequant_probe (our ModelReader, which every loader reads through) against transformers:
    fp8 with scales on a grid that divides the weight: transformers' dequantizing loader
    (from_pretrained with FineGrainedFP8Config(dequantize=True)); fp8 with partial blocks:
    `_dequantize_fp8_weight` (FP8Linear's block layout: row block i // bn, column block j // bk)
    in fp32, then the cast to the model dtype that the loader applies (the loader itself derives
    its block as rows / scale_rows, 100 for 200 rows in blocks of 128, and so disagrees with the
    layout FP8Linear computes with; we follow FP8Linear); mxfp4: `_convert_moe_packed_tensors`
    on the weight as a one-expert [1, out, G, 16] tensor, transposed back.
  - `qlora_dist quantize` of the FP8 / MXFP4 checkpoint writes the same model.safetensors, byte for
    byte, as `quantize` of the float checkpoint holding transformers' dequantized weights, and a
    config.json without the fp8 / mxfp4 quantization_config; with --format h5 the same units and
    attributes (config_json included).
  - `qlora_dist train` on the FP8 / MXFP4 checkpoint (1 and 2 ranks) gives the step-1 loss of the
    same job on the dequantized float checkpoint, exactly.
  - `qlora_dist inspect` names the format.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import binary, bits, run

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tiny_job import MPI_ENV, MPIRUN, QLORA, metrics  # noqa: E402

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
PLAIN = "model.layers.1.self_attn.o_proj"  # kept unquantized (modules_to_not_convert)
FP8_MAX = 448.0


def llama(dtype, intermediate=200, seed=0):
    """(config dict, state dict) of a random 2-layer LLaMA from transformers, in `dtype`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=101, hidden_size=96, intermediate_size=intermediate,
                      num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
                      head_dim=32, max_position_embeddings=64, tie_word_embeddings=False,
                      dtype={torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype])
    m = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # weights of varied size, so that blocks get different scales
        for n, p in m.named_parameters():
            if n.endswith("_proj.weight"):
                p.mul_(torch.exp(torch.randn(p.shape[0], 1) * 1.5).to(dtype))
    c = cfg.to_dict()
    c["architectures"] = ["LlamaForCausalLM"]
    return c, {n: t.contiguous() for n, t in m.state_dict().items()}


def is_linear(name):
    return name.endswith("_proj.weight") and not name.startswith(PLAIN + ".")


def fp8_quantize(w, block, scale_fmt):
    """(float8_e4m3fn weight, weight_scale_inv) with torch's casts: per block, scale_inv =
    amax / 448 (a power of two, rounded up, for ue8m0), q = clamp(w / scale_inv) cast to fp8."""
    import torch
    w = w.float()
    rows, cols = w.shape
    bn, bk = block if block else (rows, cols)
    sr, sc = -(-rows // bn), -(-cols // bk)
    amax = torch.zeros(sr, sc)
    for i in range(sr):
        for j in range(sc):
            amax[i, j] = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].abs().max()
    s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    if scale_fmt != "float":
        s = torch.exp2(torch.ceil(torch.log2(s)))
    full = s.repeat_interleave(bn, 0)[:rows].repeat_interleave(bk, 1)[:, :cols]
    q = (w / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    if scale_fmt == "ue8m0":
        s = s.to(torch.float8_e8m0fnu)
    elif scale_fmt == "ue8m0-bytes":  # the same exponents as raw uint8 bytes
        s = s.to(torch.float8_e8m0fnu).view(torch.uint8)
    return q, (s.reshape(()) if block is None else s)


def fp8_reference(q, s, block, dtype):
    """transformers' FP8Linear block dequantization (_dequantize_fp8_weight) in fp32, cast to the
    model dtype as its dequantizing loader casts ((q * s).to(dtype))."""
    import torch
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight
    if s.dtype == torch.uint8:
        s32 = (s.float() - 127.0).exp2()  # how transformers reads E8M0 bytes (Fp8Dequantize)
    else:
        s32 = s.float()
    return _dequantize_fp8_weight(q, s32, list(block) if block else None, torch.float32).to(dtype)


def mxfp4_reference(blocks, scales, dtype):
    from transformers.integrations.mxfp4 import _convert_moe_packed_tensors
    return _convert_moe_packed_tensors(blocks[None], scales[None], dtype=dtype)[0].t().contiguous()


def write_dir(d, cfg, tensors):
    from safetensors.torch import save_file
    os.makedirs(d, exist_ok=True)
    save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return d


def make_fp8(d, dtype, block, scale_fmt="float"):
    """An FP8 checkpoint and the dequantized weights transformers gives for it."""
    cfg, sd = llama(dtype)
    tensors, ref = {}, {}
    for n, t in sd.items():
        if not is_linear(n):
            tensors[n] = t
            continue
        q, s = fp8_quantize(t, block, scale_fmt)
        tensors[n], tensors[n[:-len("weight")] + "weight_scale_inv"] = q, s
        ref[n] = fp8_reference(q, s, block, dtype)
    cfg["quantization_config"] = {
        "quant_method": "fp8", "activation_scheme": "dynamic",
        "weight_block_size": list(block) if block else None,
        "modules_to_not_convert": ["lm_head", PLAIN.removeprefix("model.")],
        "scale_fmt": "float" if scale_fmt == "float" else "ue8m0"}
    return write_dir(d, cfg, tensors), cfg, sd, ref


def make_mxfp4(d, dtype, scale_range=(120, 131), seed=3):
    import torch
    cfg, sd = llama(dtype, intermediate=224)  # every in_features a multiple of 32
    g = torch.Generator().manual_seed(seed)
    tensors, ref = {}, {}
    for n, t in sd.items():
        if not is_linear(n):
            tensors[n] = t
            continue
        out, inf = t.shape
        blocks = torch.randint(0, 256, (out, inf // 32, 16), generator=g, dtype=torch.uint8)
        scales = torch.randint(*scale_range, (out, inf // 32), generator=g, dtype=torch.uint8)
        m = n[:-len(".weight")]
        tensors[m + ".weight_blocks"], tensors[m + ".weight_scales"] = blocks, scales
        ref[n] = mxfp4_reference(blocks, scales, dtype)
    cfg["quantization_config"] = {"quant_method": "mxfp4",
                                  "modules_to_not_convert": ["lm_head", PLAIN.removeprefix("model.")]}
    return write_dir(d, cfg, tensors), cfg, sd, ref


def probe(model_dir, tmp_path):
    """Our dequantized linears (dict), the dtype line and the names dequantized."""
    from safetensors.torch import load_file
    out = tmp_path / "probe.safetensors"
    res = run([binary("dequant_probe"), model_dir, out])
    lines = res.stdout.splitlines()
    return load_file(str(out)), lines[0], {l.split()[1] for l in lines[1:]}


def assert_bits_equal(mine, ref, what):
    assert mine.dtype == ref.dtype and mine.shape == ref.shape, (what, mine.dtype, ref.dtype,
                                                               mine.shape, ref.shape)
    differ = int((bits(mine) != bits(ref)).sum())
    assert differ == 0, (f"{what}: {differ} of {mine.numel()} elements differ, max |diff| "
                         f"{(mine.double() - ref.double()).abs().nan_to_num().max().item()}")


def check_probe(model_dir, tmp_path, sd, ref, dtype_name):
    mine, dtype_line, dequantized = probe(model_dir, tmp_path)
    assert dtype_line == f"dtype {dtype_name}"
    assert dequantized == set(ref), sorted(dequantized ^ set(ref))
    for n, t in mine.items():
        assert_bits_equal(t, ref[n] if n in ref else sd[n], n)
    return mine


FP8_CASES = [  # (dtype, block, scale_fmt): partial blocks, blocks dividing every dim, per tensor
    ("bfloat16", (128, 128), "float"),
    ("float32", (64, 48), "float"),
    ("bfloat16", (8, 8), "float"),
    ("bfloat16", None, "float"),
    ("bfloat16", (32, 16), "ue8m0"),
    ("float32", (8, 8), "ue8m0-bytes"),
]


def divides(block, sd):
    return block is None or all(t.shape[0] % block[0] == 0 and t.shape[1] % block[1] == 0
                                for n, t in sd.items() if is_linear(n))


@pytest.mark.parametrize("dtype_name,block,scale_fmt", FP8_CASES,
                         ids=[f"{d}-{b}-{s}" for d, b, s in FP8_CASES])
def test_fp8_dequantizes_as_transformers(tmp_path, dtype_name, block, scale_fmt):
    import torch
    dtype = getattr(torch, dtype_name)
    d, cfg, sd, ref = make_fp8(tmp_path / "fp8", dtype, block, scale_fmt)
    check_probe(d, tmp_path, sd, ref, dtype_name)
    if not divides(block, sd):
        return
    # Where the scale grid divides every weight, transformers' own dequantizing loader is the
    # reference too (it derives the block from the grid).
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config
    m = AutoModelForCausalLM.from_pretrained(d, device_map="cpu",
                                             quantization_config=FineGrainedFP8Config(dequantize=True))
    loaded = m.state_dict()
    for n in ref:
        assert_bits_equal(ref[n], loaded[n], "transformers' loader: " + n)


@pytest.mark.parametrize("dtype_name,scale_range", [("bfloat16", (120, 131)),
                                                    ("float32", (120, 131)),
                                                    ("bfloat16", (0, 256)),
                                                    ("float32", (0, 256))])
def test_mxfp4_dequantizes_as_transformers(tmp_path, dtype_name, scale_range):
    import torch
    d, cfg, sd, ref = make_mxfp4(tmp_path / "mxfp4", getattr(torch, dtype_name), scale_range)
    check_probe(d, tmp_path, sd, ref, dtype_name)


def dequantized_dir(d, cfg, sd, ref):
    """The float checkpoint transformers' dequantization gives: ref for the quantized linears."""
    c = {k: v for k, v in cfg.items() if k != "quantization_config"}
    return write_dir(d, c, {n: ref.get(n, t) for n, t in sd.items()})


def quantize(src, out, fmt="safetensors"):
    res = subprocess.run([QLORA, "quantize", "--model", src, "--out", out, "--double_quantization",
                          "true", "--format", fmt], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return out


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_quantize_equals_quantize_of_dequantized(tmp_path, fmt):
    import torch
    if fmt == "fp8":
        d, cfg, sd, ref = make_fp8(tmp_path / "q", torch.bfloat16, (128, 128))
    else:
        d, cfg, sd, ref = make_mxfp4(tmp_path / "q", torch.bfloat16)
    plain = dequantized_dir(tmp_path / "plain", cfg, sd, ref)
    a = quantize(d, tmp_path / "a")
    b = quantize(plain, tmp_path / "b")
    sa, sb = (open(p / "model.safetensors", "rb").read() for p in (a, b))
    assert len(sa) > 0 and sa == sb, f"{len(sa)} vs {len(sb)} bytes"
    ca, cb = (json.load(open(p / "config.json")) for p in (a, b))
    assert ca == cb
    assert ca["quantization_config"]["quant_method"] == "bitsandbytes"
    # The sharded unit file (what each rank reads its byte ranges of) the same way.
    import h5py
    ha, hb = (h5py.File(quantize(src, tmp_path / f"{n}.h5", "h5"), "r") for n, src in
              (("a", d), ("b", plain)))
    assert sorted(ha["units"]) == sorted(hb["units"])
    for k in ha["units"]:
        assert ha["units"][k][()].tobytes() == hb["units"][k][()].tobytes(), k
    assert {k: str(v) for k, v in ha.attrs.items()} == {k: str(v) for k, v in hb.attrs.items()}


def inspect_text(d):
    res = subprocess.run([QLORA, "inspect", "--model", d], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_inspect_names_the_format(tmp_path):
    import torch
    d = make_fp8(tmp_path / "f", torch.bfloat16, (128, 128))[0]
    text = inspect_text(d)
    assert ("format: fp8 (float8_e4m3fn, block 128x128, float scales), dequantized on load to "
            "bfloat16 then quantized to 4-bit: 13 linears (") in text, text
    assert "1 stored as float (modules_to_not_convert)" in text, text
    d = make_mxfp4(tmp_path / "m", torch.float32)[0]
    text = inspect_text(d)
    assert "format: mxfp4 (E2M1, blocks of 32, E8M0 scales), dequantized on load to float32" in text


def train_first_loss(model_dir, data, out, ranks):
    ini = out.parent / (out.name + ".ini")
    ini.write_text(f"[model]\nmodel_name_or_path = {model_dir}\n"
                   f"[data]\ntrain_file = {data}\ncutoff_len = 32\n"
                   "[train]\nper_device_train_batch_size = 2\nmax_steps = 2\nseed = 3\n"
                   "[output]\nlogging_steps = 1\nsave_steps = 0\n")
    res = subprocess.run([MPIRUN, "--oversubscribe", "-np", str(ranks), QLORA, ini,
                          f"--output.output_dir={out}"], capture_output=True, text=True,
                         env=MPI_ENV, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    steps = metrics(out)[0]
    assert [m["step"] for m in steps] == [1, 2]
    return steps[0]["loss"]


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_train_on_dequantized_checkpoint(tmp_path, fmt):
    import torch
    data = tmp_path / "train.h5"
    res = subprocess.run([QLORA, "synth-data", "--out", data, "--vocab", "64", "--seq-len", "32",
                          "--rows", "16", "--task", "copy", "--seed", "1"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    if fmt == "fp8":
        d, cfg, sd, ref = make_fp8(tmp_path / "q", torch.bfloat16, (128, 128))
    else:
        d, cfg, sd, ref = make_mxfp4(tmp_path / "q", torch.bfloat16)
    plain = dequantized_dir(tmp_path / "plain", cfg, sd, ref)
    for ranks in (1, 2):
        mine = train_first_loss(d, data, tmp_path / f"{fmt}{ranks}", ranks)
        want = train_first_loss(plain, data, tmp_path / f"plain{ranks}", ranks)
        assert mine == want, (ranks, mine, want)
