"""One-rank QLoRA against transformers + bitsandbytes + peft (real packages, CPU, fp32).

For a tiny LLaMA (GQA, hidden 96: not a multiple of 64, untied), a LLaMA with llama3 rope
scaling, a Mistral-shaped (hidden 80, one KV head), a Qwen2-shaped model (q/k/v bias, tied
embeddings), a Qwen3 (q/k norms, explicit head_dim, biases, a sliding layer) and a Gemma 3 text
model (its norms, GELU-tanh, scaled embeddings, local and global layers with two rope bases):
  - transformers quantizes the fp32 base with bitsandbytes (NF4, double quant) and saves it;
    our model loads that very checkpoint, so both sides compute with identical 4-bit weights;
    logits and loss must agree;
  - with a non-zero LoRA adapter on all seven linears loaded through peft (rank 4, alpha 8),
    logits, loss and every lora_A / lora_B gradient must agree;
  - the adapter as our writer writes it loads in peft and reproduces our logits; the adapter
    peft wrote loads in ours (the comparison above);
  - `qlora_dist export` merges base + adapter; transformers loads the result without peft and
    its logits match ours;
  - neat-packed rows (position ids restarting per sample, pads at position 0): our logits and
    loss equal transformers' given the same position_ids and the 4-D block-diagonal causal mask
    (every pad a one-token sample), and given LLaMA-Factory's own mask from its collator's
    prepare_4d_attention_mask (there on the sample tokens only: LLaMA-Factory masks a pad query
    from every key, so its pad logits are an average over all values; they carry no loss).
Tolerances (fp32 throughout): logits and loss rtol 2e-5 / atol 2e-5 relative to the largest
logit; gradients atol 1e-5 * max|grad| + rtol 1e-4. Both sides do the same math in float32 but
in different orders (MKL GEMM blocking, our SDPA vs transformers' eager attention softmax, our
chunked log-softmax), so results differ by accumulated rounding: with unit roundoff 6e-8 and
reductions over ~200 terms through 2 layers, a few 1e-6 relative is expected; the bounds leave
a margin of ~10x and are still far below any real mistake (a wrong rope, mask or scale moves
logits by 1e-2 or more).
"""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import (binary, bnb_reference_model, lf_module, run,  # noqa: E402
                      use_generic_bnb_cpu_dequantize)

use_generic_bnb_cpu_dequantize()

from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, Gemma3Config,  # noqa: E402
                          Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config,
                          SiglipVisionConfig)
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

MODELS = {
    "llama": lambda: LlamaConfig(vocab_size=160, hidden_size=96, intermediate_size=200,
                                 num_hidden_layers=2, num_attention_heads=6,
                                 num_key_value_heads=2, initializer_range=0.1,
                                 tie_word_embeddings=False),
    "llama3_rope": lambda: LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, initializer_range=0.1,
                                       rope_parameters={"rope_type": "llama3",
                                                        "rope_theta": 500000.0, "factor": 8.0,
                                                        "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 8}),
    "mistral": lambda: MistralConfig(vocab_size=150, hidden_size=80, intermediate_size=176,
                                     num_hidden_layers=2, num_attention_heads=5,
                                     num_key_value_heads=1, head_dim=16,
                                     initializer_range=0.1, sliding_window=None),
    "qwen2": lambda: Qwen2Config(vocab_size=140, hidden_size=112, intermediate_size=240,
                                 num_hidden_layers=2, num_attention_heads=7,
                                 num_key_value_heads=7, initializer_range=0.1,
                                 tie_word_embeddings=True),
    # Qwen3: per-head q/k RMSNorm, an explicit head_dim (20, not 72 / 6), biases on all four
    # attention linears, untied; layer 1 slides with a window of 6 (< the 11 tokens of a row,
    # > the longest packed sample, whose 4-D mask transformers takes as given).
    "qwen3": lambda: Qwen3Config(vocab_size=136, hidden_size=72, intermediate_size=152,
                                 num_hidden_layers=2, num_attention_heads=6,
                                 num_key_value_heads=2, head_dim=20, attention_bias=True,
                                 initializer_range=0.1, tie_word_embeddings=False,
                                 use_sliding_window=True, sliding_window=6,
                                 layer_types=["full_attention", "sliding_attention"]),
    # Gemma 3 (text): (1 + w) RMSNorms, four per block, q/k norms, GELU-tanh, embeddings times
    # sqrt(80), query_pre_attn_scalar 18 (not head_dim 24), tied; layers 0 and 2 local (window 6,
    # rope base 1e4), layer 1 global (base 1e6 with linear scaling 4).
    "gemma3": lambda: Gemma3TextConfig(vocab_size=150, hidden_size=80, intermediate_size=168,
                                       num_hidden_layers=3, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=24,
                                       query_pre_attn_scalar=18, initializer_range=0.1,
                                       sliding_window=6, sliding_window_pattern=2,
                                       rope_parameters={
                                           "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                              "rope_theta": 1e6},
                                           "sliding_attention": {"rope_type": "default",
                                                                 "rope_theta": 1e4}}),
}
# The same language model inside a Gemma3ForConditionalGeneration (a one-layer SigLIP vision
# tower and its projector beside it, which we do not read): tensors under model.language_model.
# (transformers 5), adapters naming model.language_model.layers.{i}...; "_published" renames
# every tensor of both checkpoints to the published files' spelling (language_model.model.*,
# vision_tower.*, multi_modal_projector.*), which transformers 5 reads through its conversion
# mapping.
MODELS["gemma3_mm"] = lambda: Gemma3Config(
    text_config=MODELS["gemma3"]().to_dict(),
    vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                     num_attention_heads=2, image_size=28, patch_size=14),
    mm_tokens_per_image=4)
MODELS["gemma3_mm_published"] = MODELS["gemma3_mm"]
MULTIMODAL = ("gemma3_mm", "gemma3_mm_published")

# The same Gemma 3 with config.json in the form the published checkpoints have (written by
# transformers 4.5x): rope_theta, rope_local_base_freq, rope_scaling and sliding_window_pattern
# instead of rope_parameters by layer type and layer_types; both sides read that file.
MODELS["gemma3_legacy"] = MODELS["gemma3"]


def legacy_gemma3_config(path):
    cfg = json.load(open(path))
    for key in ("rope_parameters", "layer_types", "_sliding_window_pattern"):
        cfg.pop(key)
    cfg.update(rope_theta=1e6, rope_local_base_freq=1e4, sliding_window_pattern=2,
               rope_scaling={"rope_type": "linear", "factor": 4.0})
    json.dump(cfg, open(path, "w"), indent=2)


LEGACY_CONFIG = {"gemma3_legacy": legacy_gemma3_config}


def published_tensor_names(model_dir):
    """Renames a Gemma3ForConditionalGeneration checkpoint's tensors as the published files
    spell them."""
    path = model_dir / "model.safetensors"
    renames = (("model.language_model.", "language_model.model."),
               ("model.vision_tower.", "vision_tower."),
               ("model.multi_modal_projector.", "multi_modal_projector."))
    out = {}
    for k, v in load_file(path).items():
        for a, b in renames:
            if k.startswith(a):
                k = b + k[len(a):]
        out[k] = v
    save_file(out, str(path), metadata={"format": "pt"})


def inside_name(layer):
    """Our probe's name of a peft module: model.language_model.X -> model.X."""
    return layer.replace("model.language_model.", "model.", 1)


def close(ours, ref, rtol, atol_rel):
    atol = atol_rel * ref.abs().max().item()
    return torch.allclose(ours, ref, rtol=rtol, atol=atol), (ours - ref).abs().max().item()


@pytest.fixture(scope="module", params=list(MODELS))
def setup(request, tmp_path_factory):
    name = request.param
    d = tmp_path_factory.mktemp(name)
    torch.manual_seed(1234)
    cfg = MODELS[name]()
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    for mod in model.modules():  # make the biases non-zero so they matter
        if isinstance(mod, torch.nn.Linear) and mod.bias is not None:
            torch.nn.init.normal_(mod.bias, std=0.1)
    # Every RMSNorm weight random (input, post-attention, Gemma's pre/post-feedforward, q/k
    # norms, final), so that a mixed-up norm shows; Gemma's are offsets from one.
    mean = 0.0 if name.startswith("gemma3") else 1.0  # (the vision tower's norms too: harmless)
    for n, p in model.named_parameters():
        if n.endswith("norm.weight"):
            torch.nn.init.normal_(p, mean=mean, std=0.2)
    model.save_pretrained(d / "base")
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    q = AutoModelForCausalLM.from_pretrained(d / "base", quantization_config=bnb, device_map="cpu")
    q.save_pretrained(d / "q4")
    if name in LEGACY_CONFIG:
        for checkpoint in ("base", "q4"):
            LEGACY_CONFIG[name](d / checkpoint / "config.json")
    if name == "gemma3_mm_published":
        for checkpoint in ("base", "q4"):
            published_tensor_names(d / checkpoint)
    g = torch.Generator().manual_seed(99)
    ids = torch.randint(0, cfg.get_text_config().vocab_size, (2, 11), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, 7:] = -100
    save_file({"input_ids": ids, "labels": labels}, str(d / "batch.safetensors"))
    return dict(name=name, dir=d, ids=ids, labels=labels, cfg=cfg)


def ref_model(setup, checkpoint="q4"):
    m = bnb_reference_model(setup["dir"] / checkpoint)
    m.eval()
    return m


def probe(setup, tag, *extra, model="q4", batch="batch.safetensors"):
    out = setup["dir"] / f"ours_{tag}.safetensors"
    run([binary("model_probe"), str(setup["dir"] / model), str(setup["dir"] / batch),
         str(out), *map(str, extra)])
    return load_file(out)


def test_base_logits_and_loss(setup):
    torch.set_num_threads(1)
    m = ref_model(setup)
    with torch.no_grad():
        ref = m(input_ids=setup["ids"], labels=setup["labels"])
    ours = probe(setup, "base", "--chunk", "5")
    ok, diff = close(ours["logits"], ref.logits, 2e-5, 2e-5)
    print(f"\n{setup['name']}: base logits max diff {diff:.3g} (max |logit| "
          f"{ref.logits.abs().max().item():.3g}), loss {ours['loss'].item():.7f} vs {ref.loss.item():.7f}")
    assert ok, f"{setup['name']}: logits differ by up to {diff}"
    assert ours["num_targets"].item() == int((setup["labels"][:, 1:] != -100).sum())
    ok, diff = close(ours["loss"], ref.loss.reshape(1), 2e-5, 2e-5)
    assert ok, f"{setup['name']}: loss {ours['loss'].item()} vs {ref.loss.item()}"


def test_inspect_names_the_architecture(setup):
    """`qlora_dist inspect` says what the decoder will run for this config.json."""
    res = run([binary("qlora_dist"), "inspect", "--model", setup["dir"] / "q4"])
    arch = json.load(open(setup["dir"] / "q4" / "config.json"))["architectures"][0]
    line = next(x for x in res.stdout.splitlines() if x.strip().startswith("architecture:"))
    assert arch in line, line
    cfg = setup["cfg"]
    expect = {"qwen3": ["q/k norm", "1 of 2 layers sliding (window 6)", "biases on q_proj k_proj "
                        "v_proj o_proj", "untied"],
              "gemma3": ["GELU-tanh", "q/k norm", "(1 + w) norms x4", "x sqrt(hidden)",
                         "query_pre_attn_scalar^-0.5 (18)",
                         "2 of 3 layers sliding (window 6, rope base 10000)",
                         "rope base 1e+06 linear x4", "tied"],
              "qwen2": ["SwiGLU", "biases on q_proj k_proj v_proj;", "full attention", "tied"]}
    expect["gemma3_legacy"] = expect["gemma3"]
    expect["gemma3_mm"] = ["Gemma3ForConditionalGeneration"] + expect["gemma3"][1:]
    expect["gemma3_mm_published"] = expect["gemma3_mm"]
    for part in expect.get(setup["name"], ["SwiGLU", "untied" if not cfg.tie_word_embeddings
                                           else "tied"]):
        assert part in line, f"{part!r} not in {line!r}"


def test_quantize_on_load(setup):
    """Our model quantizing the fp32 base on load (NF4, double quant, blocksize 64).
    bitsandbytes' CPU double quantization misses the nearest 8-bit absmax code in a few blocks
    (test_bnb_exact; we take the nearest), so transformers quantizing the same base holds a few
    different absmax values. Hence two checks: (1) our quantize-on-load logits equal, within
    the fp32 tolerance, those of transformers + bitsandbytes running on our quantization (the
    checkpoint `qlora_dist quantize` writes, which holds the same bytes as on-load); (2) that
    checkpoint differs from transformers' own only in double-quantized absmax codes, and with
    none of those the logits agree within the fp32 tolerance too."""
    ours = probe(setup, "qload", model="base")
    ours_q = setup["dir"] / "ours_q4"
    shutil.rmtree(ours_q, ignore_errors=True)
    run([binary("qlora_dist"), "quantize", "--model", setup["dir"] / "base", "--out", ours_q])
    m = ref_model(setup, "ours_q4")
    with torch.no_grad():
        ref = m(input_ids=setup["ids"], labels=setup["labels"])
    ok, diff = close(ours["logits"], ref.logits, 2e-5, 2e-5)
    assert ok, f"{setup['name']}: logits differ from transformers on our 4-bit weights by {diff}"
    ok, _ = close(ours["loss"], ref.loss.reshape(1), 2e-5, 2e-5)
    assert ok, f"{setup['name']}: loss {ours['loss'].item()} vs {ref.loss.item()}"

    a = load_file(ours_q / "model.safetensors")
    b = load_file(setup["dir"] / "q4" / "model.safetensors")
    if setup["name"] in MULTIMODAL:  # we quantize the language model only; compare that
        a = {k: v for k, v in a.items() if "language_model" in k}
        b = {k: v for k, v in b.items() if "language_model" in k}
    assert sorted(a) == sorted(b)
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert all(k.endswith(".absmax") and a[k].dtype == torch.uint8 for k in differing), differing
    misses = sum(int((a[k] != b[k]).sum()) for k in differing)
    with torch.no_grad():
        theirs = ref_model(setup)(input_ids=setup["ids"]).logits
    _, diff = close(ours["logits"], theirs, 2e-5, 2e-5)
    print(f"\n{setup['name']}: {misses} absmax codes where bitsandbytes' CPU table misses the "
          f"nearest; logits vs transformers' own quantization differ by {diff:.3g}")
    if misses == 0:
        assert diff <= 2e-5 * theirs.abs().max().item() + 2e-5 * theirs.abs().max().item()


@pytest.fixture(scope="module")
def adapter(setup):
    """A peft LoRA on all seven linears with random non-zero A and B, saved by peft."""
    torch.manual_seed(7)
    # A multimodal model: the language model's linears only (LLaMA-Factory's regex form).
    targets = (r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
               if setup["name"] in MULTIMODAL else TARGETS)
    m = get_peft_model(ref_model(setup), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                    target_modules=targets, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.2)
    m.save_pretrained(setup["dir"] / "peft_adapter")
    out = m(input_ids=setup["ids"], labels=setup["labels"])
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if "lora_" in n}
    return dict(logits=out.logits.detach(), loss=out.loss.detach(), grads=grads)


def test_adapter_logits_loss_and_grads(setup, adapter):
    ours = probe(setup, "adapter", "--adapter", setup["dir"] / "peft_adapter",
                 "--write-adapter", setup["dir"] / "our_adapter")
    ok, diff = close(ours["logits"], adapter["logits"], 2e-5, 2e-5)
    assert ok, f"{setup['name']}: logits with adapter differ by up to {diff}"
    worst = max(((ours[f"{inside_name(n.split('base_model.model.')[1].split('.lora_')[0])}."
                       f"{'lora_A' if '.lora_A.' in n else 'lora_B'}.grad"] - g).abs().max()
                 / g.abs().max()).item() for n, g in adapter["grads"].items())
    print(f"\n{setup['name']}: adapter logits max diff {diff:.3g}, worst LoRA grad diff "
          f"{worst:.3g} of that tensor's max")
    ok, _ = close(ours["loss"], adapter["loss"].reshape(1), 2e-5, 2e-5)
    assert ok, f"{setup['name']}: loss {ours['loss'].item()} vs {adapter['loss'].item()}"
    assert len(adapter["grads"]) == 2 * 7 * setup["cfg"].get_text_config().num_hidden_layers
    for peft_name, ref in adapter["grads"].items():
        # base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight
        layer = inside_name(peft_name.split("base_model.model.")[1].split(".lora_")[0])
        ab = "lora_A" if ".lora_A." in peft_name else "lora_B"
        got = ours[f"{layer}.{ab}.grad"]
        assert got.shape == ref.shape, peft_name
        ok = torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
        assert ok, f"{setup['name']}: {peft_name} grad differs by {(got - ref).abs().max().item()}"


def test_our_adapter_loads_in_peft(setup, adapter):
    ours = probe(setup, "adapter2", "--adapter", setup["dir"] / "peft_adapter",
                 "--write-adapter", setup["dir"] / "our_adapter2")
    cfg = json.load(open(setup["dir"] / "our_adapter2" / "adapter_config.json"))
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    if setup["name"] in MULTIMODAL:  # the language model's linears only, under its prefix
        assert isinstance(cfg["target_modules"], str), cfg["target_modules"]
        keys = load_file(setup["dir"] / "our_adapter2" / "adapter_model.safetensors")
        assert all(k.startswith("base_model.model.model.language_model.layers.") for k in keys)
    m = PeftModel.from_pretrained(ref_model(setup), setup["dir"] / "our_adapter2")
    with torch.no_grad():
        logits = m(input_ids=setup["ids"]).logits
    ok, diff = close(ours["logits"], logits, 2e-5, 2e-5)
    assert ok, f"{setup['name']}: peft with our adapter differs by up to {diff}"


def test_export_merged_loads_in_transformers(setup, adapter):
    out = setup["dir"] / "merged"
    shutil.rmtree(out, ignore_errors=True)
    run([binary("qlora_dist"), "export", "--model", setup["dir"] / "q4", "--adapter",
         setup["dir"] / "peft_adapter", "--out", out, "--dtype", "fp32"])
    cfg = json.load(open(out / "config.json"))
    assert "quantization_config" not in cfg
    m = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    with torch.no_grad():
        logits = m(input_ids=setup["ids"]).logits
    # The merged weight W + s B A is the adapter model's math in one matmul instead of two:
    # fp32 rounding only.
    ok, diff = close(logits, adapter["logits"], 2e-5, 2e-5)
    assert ok, f"{setup['name']}: merged logits differ by up to {diff}"


def packed_batch(setup):
    """Two neat-packed rows of 11 tokens (LLaMA-Factory's layout): samples of 4 and 5 tokens and
    2 pads; of 3, 3 and 4 tokens and 1 pad. Pads: id 0, position 0, label -100; each sample's
    first label -100 (its prompt), the rest its ids. `seg` is LLaMA-Factory's neat attention_mask
    (sample index from 1, 0 on pads)."""
    ids = setup["ids"].clone()
    pos = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    seg = torch.zeros_like(ids)
    for r, lengths in enumerate([[4, 5], [3, 3, 4]]):
        c = 0
        for k, n in enumerate(lengths):
            pos[r, c:c + n] = torch.arange(n)
            labels[r, c + 1:c + n] = ids[r, c + 1:c + n]
            seg[r, c:c + n] = k + 1
            c += n
        ids[r, c:] = 0
    return ids, labels, pos, seg


def block_diagonal_mask(pos):
    """The 4-D additive mask [B, 1, T, T] of packed rows: query t sees key j <= t of its own
    sample (a sample starts where its position id is 0; a pad is a sample of one token)."""
    seg = (pos == 0).cumsum(-1)
    t = pos.shape[1]
    allowed = (seg[:, :, None] == seg[:, None, :]) & torch.ones(t, t, dtype=torch.bool).tril()
    zero = torch.tensor(0.0)
    return torch.where(allowed, zero, torch.finfo(torch.float32).min)[:, None]


def test_neat_packed_logits_and_loss(setup):
    torch.set_num_threads(1)
    ids, labels, pos, seg = packed_batch(setup)
    save_file({"input_ids": ids, "labels": labels, "position_ids": pos},
              str(setup["dir"] / "packed.safetensors"))
    ours = probe(setup, "packed", "--chunk", "5", batch="packed.safetensors")
    m = ref_model(setup)
    name = setup["name"]
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=block_diagonal_mask(pos), position_ids=pos,
                labels=labels)
        plain = m(input_ids=ids).logits
    ok, diff = close(ours["logits"], ref.logits, 2e-5, 2e-5)
    assert ok, f"{name}: packed logits differ from transformers' (position_ids, 4-D mask) by {diff}"
    ok, _ = close(ours["loss"], ref.loss.reshape(1), 2e-5, 2e-5)
    assert ok, f"{name}: packed loss {ours['loss'].item()} vs {ref.loss.item()}"
    # The comparison can fail: as one causal sequence, the later samples' logits are far off.
    _, off = close(ours["logits"], plain, 2e-5, 2e-5)
    assert off > 100 * 2e-5 * plain.abs().max().item(), f"{name}: packing changed nothing ({off})"
    msg = f"\n{name}: packed logits max diff {diff:.3g} (vs one causal sequence: {off:.3g})"
    mask = lf_module("data.collator").prepare_4d_attention_mask(seg, torch.float32)
    with torch.no_grad():
        lf = m(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels)
    real = seg != 0
    ok, diff_lf = close(ours["logits"][real], lf.logits[real], 2e-5, 2e-5)
    assert ok, f"{name}: packed logits differ from LLaMA-Factory's 4-D mask run by {diff_lf}"
    ok, _ = close(ours["loss"], lf.loss.reshape(1), 2e-5, 2e-5)
    assert ok, f"{name}: packed loss {ours['loss'].item()} vs {lf.loss.item()} (LF mask)"
    msg += f", with LLaMA-Factory's mask {diff_lf:.3g} on sample tokens"
    print(msg)
