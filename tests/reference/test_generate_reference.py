"""`qlora_dist generate` against transformers' generate: greedy ids token for token.

Both sides run the same NF4 model (bitsandbytes quantizes the fp32 weights on load with nf4,
blocksize 64, double quantization, fp32 compute; ours quantizes the same fp32 directory on load)
with the same non-zero peft adapter (rank 4 on all seven linears, made with peft here), and the
same prompt ids: LLaMA-Factory's chatml template, encode_oneturn([user prompt, empty answer]),
which our printed prompt_ids must equal. transformers runs model.generate(do_sample=False) with
LLaMA-Factory's stop ids (template.get_stop_token_ids) as eos_token_id; the new ids, a final EOS
included, must be equal. Models: (a) a tiny random LLaMA (GQA 6/2 heads) carrying SmolLM2's
tokenizer files (vocab 49152), (b) the real SmolLM2-135M (.models/smollm2, env
QLORA_SMOLLM2_DIR), 2 prompts x 24 new tokens. Both sides print their speed. (c) The tiny LLaMA
as our HDF5 unit file (quantize --format h5: the same nf4/64/double quantization) with
--tokenizer DIR, with and without the adapter: transformers' ids again (without the adapter:
the plain bitsandbytes model, which our model directory must match too).
Every weight row here is a whole number of 64-blocks, so bitsandbytes' native CPU dequantize is
exact (conftest.use_generic_bnb_cpu_dequantize explains the case where it is not); its generic
replacement would make transformers' SmolLM2 generate ~20x slower (0.2 tokens/s).
"""
import json
import os
import shutil
import time

import pytest
import torch

from conftest import binary, run

from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

import llamafactory_ref  # noqa: E402

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
SMOLLM2 = os.environ.get("QLORA_SMOLLM2_DIR") or os.path.join(REPO, ".models", "smollm2")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEMPLATE = "chatml"

PROMPTS = [
    {"prompt": "Hi"},
    {"prompt": "What is the capital of France?"},
    {"prompt": "Summarize: the quick brown fox jumps over the lazy dog, then runs into the forest "
               "where it meets an owl, a hedgehog and three rabbits who argue about the weather, "
               "the price of carrots and whether foxes should be allowed to vote.",
     "system": "You are a terse assistant."},
]


def smollm2_dir():
    if not os.path.isfile(os.path.join(SMOLLM2, "model.safetensors")):
        pytest.fail(f"{SMOLLM2} has no model.safetensors: run scripts/setup.sh (or set "
                    "QLORA_SMOLLM2_DIR)")
    return SMOLLM2


def make_adapter(base_dir, out_dir, seed):
    """A peft LoRA adapter on every linear with non-zero B (peft starts B at 0)."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                         lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(out_dir)


def lf_prompt_ids(model_dir, prompts):
    tok, template, _ = llamafactory_ref.tokenizer_and_template(model_dir, TEMPLATE)
    ids = []
    for p in prompts:
        messages = [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": ""}]
        prompt_ids, _ = template.encode_oneturn(tok, messages, p.get("system"))
        ids.append(prompt_ids)
    return ids, template.get_stop_token_ids(tok), tok


def hf_generate(model_dir, adapter_dir, prompt_ids, stop_ids, pad_id, max_new_tokens):
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    m = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, device_map="cpu",
                                             dtype=torch.float32)
    import bitsandbytes as bnbm
    for mod in m.modules():  # the training path (dequantize + matmul), as in bnb_reference_model
        if isinstance(mod, bnbm.nn.Linear4bit):
            mod.support_avx512bf16_for_cpu = False
    if adapter_dir is not None:
        m = PeftModel.from_pretrained(m, adapter_dir)
    m.eval()
    out, new_tokens, seconds = [], 0, 0.0
    for ids in prompt_ids:
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        with torch.no_grad():
            y = m.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                           max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                           pad_token_id=pad_id, temperature=None, top_p=None, top_k=None)
        seconds += time.perf_counter() - t0
        out.append(y[0, len(ids):].tolist())
        new_tokens += len(out[-1])
    print(f"\ntransformers generate: {new_tokens} new tokens in {seconds:.2f} s "
          f"({new_tokens / seconds:.1f} tokens/s, prefill included)")
    return out


def ours_generate(model_dir, adapter_dir, prompts, max_new_tokens, tmp, tokenizer_dir=None):
    path = tmp / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    extra = [] if adapter_dir is None else ["--adapter", str(adapter_dir)]
    if tokenizer_dir is not None:
        extra += ["--tokenizer", str(tokenizer_dir)]
    res = run([binary("qlora_dist"), "generate", "--model", str(model_dir), *extra,
               "--template", TEMPLATE, "--prompts", str(path),
               "--max_new_tokens", str(max_new_tokens), "--print_ids"])
    print(res.stderr.strip())
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(rows) == len(prompts)
    return rows


def compare(model_dir, adapter_dir, prompts, max_new_tokens, tmp, ours_models=None):
    """`ours_models`: (model, tokenizer dir or None) pairs to run ours on; default the model
    directory itself. Each must give transformers' ids."""
    prompt_ids, stop_ids, tok = lf_prompt_ids(model_dir, prompts)
    ref = hf_generate(model_dir, adapter_dir, prompt_ids, stop_ids, tok.pad_token_id or stop_ids[0],
                      max_new_tokens)
    for model, tokenizer_dir in ours_models or [(model_dir, None)]:
        ours = ours_generate(model, adapter_dir, prompts, max_new_tokens, tmp, tokenizer_dir)
        for p, want_prompt, want, row in zip(prompts, prompt_ids, ref, ours):
            assert row["prompt_ids"] == want_prompt, f"{model}: prompt ids of {p}"
            assert row["ids"] == want, f"{model}: {p}:\nours {row['ids']}\nref  {want}"
            assert row["tokens"] == len(want)
            assert row["answer"] == tok.decode(want, skip_special_tokens=True), p
    return ours


def tiny_llama(tmp_path):
    """A tiny random LLaMA (GQA 6/2 heads) with SmolLM2's tokenizer files, in tmp_path/base."""
    src = smollm2_dir()
    base = tmp_path / "base"
    torch.manual_seed(1234)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=192, intermediate_size=320,
                      num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                      initializer_range=0.1, tie_word_embeddings=False, bos_token_id=1,
                      eos_token_id=2, pad_token_id=2)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    for layer in model.model.layers:  # norms != 1 so that a mixed-up norm shows
        torch.nn.init.normal_(layer.input_layernorm.weight, mean=1.0, std=0.2)
        torch.nn.init.normal_(layer.post_attention_layernorm.weight, mean=1.0, std=0.2)
    model.save_pretrained(base)
    for f in TOKENIZER_FILES:
        shutil.copy(os.path.join(src, f), base / f)
    return base


def test_tiny_llama_with_smollm2_tokenizer(tmp_path):
    base = tiny_llama(tmp_path)
    make_adapter(base, tmp_path / "adapter", 7)
    rows = compare(base, tmp_path / "adapter", PROMPTS, 20, tmp_path)
    assert all(r["tokens"] > 0 for r in rows)


def test_tiny_llama_h5_units(tmp_path):
    """generate --model q.h5 --tokenizer DIR (the unit file of quantize --format h5) gives
    transformers' ids, with and without the adapter; the model directory too without it."""
    base = tiny_llama(tmp_path)
    units = tmp_path / "q.h5"
    res = run([binary("qlora_dist"), "quantize", "--model", str(base), "--out", str(units),
               "--format", "h5"])
    assert res.returncode == 0, res.stderr
    make_adapter(base, tmp_path / "adapter", 7)
    # Without the adapter the third prompt meets a near tie at its 5th new token (transformers'
    # top two logits 5.53288 / 5.53273: fp32 summation order decides), so two prompts there.
    rows = compare(base, None, PROMPTS[:2], 20, tmp_path, [(units, base), (base, None)])
    assert all(r["tokens"] > 0 for r in rows)
    rows = compare(base, tmp_path / "adapter", PROMPTS, 20, tmp_path, [(units, base)])
    assert all(r["tokens"] > 0 for r in rows)


def test_smollm2(tmp_path):
    src = smollm2_dir()
    make_adapter(src, tmp_path / "adapter", 11)
    rows = compare(src, tmp_path / "adapter", PROMPTS[1:], 24, tmp_path)
    assert all(r["tokens"] > 0 for r in rows)
