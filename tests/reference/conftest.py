"""Shared helpers for the reference tests: where the build is, how to run our binaries."""
import importlib
import os
import subprocess

import pytest

BUILD = os.environ.get("QLORA_BUILD_DIR") or os.path.join(
    os.path.dirname(__file__), "..", "..", "build")


def binary(name):
    for rel in (name, os.path.join("tests", "reference", name)):
        path = os.path.join(BUILD, rel)
        if os.path.exists(path):
            return path
    pytest.fail(f"{name} not built in {BUILD}")


def run(args, **kw):
    """Runs one of our binaries; a non-zero exit fails the test with its stderr."""
    res = subprocess.run(args, capture_output=True, text=True, **kw)
    if res.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {res.returncode}:\n{res.stderr}")
    return res


KNOWN_BNB_CPU_BUG = set()

# How a zero's sign is compared. bitsandbytes' CPU dequantize_4bit decodes FP4 code 8 to +0.0 on
# AVX-512 machines and to -0.0 on AVX2-only ones, so its sign of a zero depends on the machine:
# comparisons with bitsandbytes (same_as_bnb) read every zero as +0.0 and compare all other bits.
# The sign is checked against our own rule instead (assert_fp4_code8_sign): FP4 code 8 decodes
# to FP4_CODE8 * absmax, as on bitsandbytes' CUDA kernel (kernels/quant4_format.h).
FP4_CODE8 = -0.0


def bits(t, fold_zero_sign=False):
    """Bit patterns, so that -0.0 and every rounding compare exactly (NaNs compare as NaN: a
    NaN's sign and payload carry no meaning). fold_zero_sign reads -0.0 as +0.0."""
    import torch
    t = t.contiguous()
    if t.is_floating_point():
        t = torch.where(torch.isnan(t), torch.full_like(t, float("nan")), t)
    if fold_zero_sign:
        t = torch.where(t == 0, torch.zeros_like(t), t)
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def same_as_bnb(mine, ref):
    """Our dequantized values against bitsandbytes': every bit but the sign of a zero."""
    import torch
    return torch.equal(bits(mine, fold_zero_sign=True), bits(ref, fold_zero_sign=True))


def bnb_absmax(st):
    """The fp32 absmax of a bitsandbytes state (double quantization undone by bitsandbytes)."""
    import bitsandbytes.functional as F
    if st.nested:
        return F.dequantize_blockwise(st.absmax, st.state2) + st.offset
    return st.absmax


def assert_fp4_code8_sign(mine, packed, st, what):
    """Every FP4 code 8 whose absmax is finite with a clear sign bit decodes to FP4_CODE8 (bits,
    in mine's dtype). Returns how many elements were checked (0 for nf4)."""
    import torch
    if st.quant_type != "fp4":
        return 0
    mine = mine.reshape(-1)
    n = mine.numel()
    b = packed.contiguous().view(torch.uint8).reshape(-1)
    codes = torch.stack([b >> 4, b & 15], 1).reshape(-1)[:n]
    scale = bnb_absmax(st).float().repeat_interleave(st.blocksize)[:n]
    at = (codes == 8) & torch.isfinite(scale) & ~torch.signbit(scale)
    got = mine[at]
    want = torch.full_like(got, FP4_CODE8)
    assert torch.equal(bits(got), bits(want)), (
        f"{what}: FP4 code 8 must decode to {FP4_CODE8}, got {got[bits(got) != bits(want)][:5]}")
    return int(at.sum())


def bnb_dequantize(packed, st, dtype=None, tag=None):
    """bitsandbytes' dequantize_4bit, with one exception: its native CPU kernel (the AVX-512 one
    this machine runs) assumes every row of a 2-D weight starts on a block boundary and returns
    wrong values when the last dimension is not a multiple of the blocksize (e.g. [256, 688] at
    blocksize 64: everything from row 1 on). There bitsandbytes' own generic torch path, which
    follows the flat-block layout its quantizer writes and its CUDA kernel reads, is the
    reference. `tag` records which cases took that path."""
    import torch
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    dtype = dtype or st.dtype
    shape = tuple(st.shape)
    if len(shape) >= 2 and shape[-1] % 2 == 0 and shape[-1] % st.blocksize != 0:
        if tag is not None:
            KNOWN_BNB_CPU_BUG.add(tag)
        return _dequantize_4bit_compute(packed.view(torch.uint8).reshape(-1), bnb_absmax(st).float(),
                                        st.code, st.blocksize, st.shape, dtype)
    st = F.QuantState(absmax=st.absmax, shape=st.shape, code=st.code, blocksize=st.blocksize,
                      quant_type=st.quant_type, dtype=dtype, offset=st.offset, state2=st.state2)
    return F.dequantize_4bit(packed, st)


def use_generic_bnb_cpu_dequantize():
    """Routes bitsandbytes' CPU dequantize_4bit through its own generic torch implementation
    (see bnb_dequantize for why: its native CPU kernel is wrong for weights whose rows are not
    block-aligned, e.g. in_features 96 at blocksize 64). transformers' and peft's Linear4bit
    forward then computes with the weights bitsandbytes' format actually holds.
    bitsandbytes wraps that function in torch.compile (one compilation per weight shape, about a
    minute for a model on a cold cache); its eager original (`__wrapped__`) is called instead,
    which computes every value as the same single product code[q] * absmax."""
    import torch
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code
    dequantize = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)

    def generic(A, absmax, blocksize, quant_type, shape, dtype):
        if A.dtype != torch.uint8:
            A = A.view(torch.uint8)
        return dequantize(A.reshape(-1), absmax.float(), _get_4bit_code(quant_type, A.device),
                          blocksize, shape, dtype)
    torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", generic)


def bnb_reference_model(path):
    """transformers' model from a bitsandbytes 4-bit checkpoint directory, on the CPU, computing
    as in training (dequantize + matmul) with and without grad. bitsandbytes' Linear4bit, on CPUs
    with AVX512-BF16 and without grad, repacks its weight for a bf16 inference kernel that needs
    out % 32 == 0 and in % blocksize == 0 and is not the path training takes: switched off."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
    for mod in m.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            mod.support_avx512bf16_for_cpu = False
    return m


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_peft_adapter(model_dir, out, seed=11):
    """A peft LoRA (r 8, alpha 16, dropout 0, all seven linears) with random non-zero A and B, so
    that both get gradients from the first step, saved by peft."""
    import torch
    from peft import LoraConfig, get_peft_model
    m = get_peft_model(bnb_reference_model(model_dir),
                       LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                  task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".lora_A." in n:
                bound = p.shape[1] ** -0.5
                p.copy_(torch.rand(p.shape, generator=g) * 2 * bound - bound)
            elif ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    m.save_pretrained(out)


# LLaMA-Factory's source (the directory holding the `llamafactory` package), for tests that run
# its data processing code; its package __init__ files need `datasets` and more, so modules are
# imported one by one (lf_module).
def lf_module(name):
    """llamafactory.<name> from the LLaMA-Factory that scripts/setup.sh installs (see
    llamafactory_ref); a missing install fails the test that asks for it."""
    import llamafactory_ref
    try:
        llamafactory_ref.load()
    except ImportError as e:
        pytest.fail(str(e))
    return importlib.import_module("llamafactory." + name)
