#!/usr/bin/env python3
"""Writes the seed corpora of tests/fuzz/corpus/ (committed; re-run only to change them) with the
reference packages of .venv: safetensors files from safetensors.torch, config.json files from
transformers' config classes, tokenizer.json files from `tokenizers` (a trimmed copy of SmolLM2's,
and small byte-level and SentencePiece-style BPE tokenizers trained here), adapter_config.json as
peft writes it, INI files in the layout of configs/demo.ini, and small datasets in each format
LLaMA-Factory reads. Regression seeds (crash reproducers) are added by hand and never rewritten.

    .venv/bin/python tests/fuzz/make_seeds.py [--model-dir .models/smollm2]
"""
import argparse
import json
import os
import pathlib
import struct

HERE = pathlib.Path(__file__).resolve().parent
CORPUS = HERE / "corpus"


def put(name, file, data):
    d = CORPUS / name
    d.mkdir(parents=True, exist_ok=True)
    (d / file).write_bytes(data if isinstance(data, bytes) else data.encode())


def safetensors_seeds():
    import torch
    from safetensors.torch import save

    put("safetensors", "f32_pair", save({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
                                         "b": torch.ones(4, dtype=torch.float32)}))
    put("safetensors", "mixed_dtypes_metadata",
        save({"w": torch.zeros(2, 2, dtype=torch.bfloat16), "i": torch.arange(3, dtype=torch.int64),
              "h": torch.ones(1, 3, dtype=torch.float16), "u": torch.ones(5, dtype=torch.uint8),
              "q": torch.ones(2, dtype=torch.bool)}, metadata={"format": "pt"}))
    put("safetensors", "scalar_and_empty",
        save({"s": torch.tensor(3.0), "e": torch.zeros(0, 4, dtype=torch.float32)}))
    lora = {f"base_model.model.model.layers.0.self_attn.{m}.lora_{x}.weight":
            torch.full((2, 4) if x == "A" else (4, 2), 0.5) for m in ("q_proj", "v_proj") for x in "AB"}
    put("safetensors", "peft_adapter", save(lora, metadata={"format": "pt"}))
    header = b'{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    put("safetensors", "header_longer_than_file", struct.pack("<Q", 1 << 40) + header + b"\0" * 4)
    put("safetensors", "overlapping",
        struct.pack("<Q", 98) + b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},'
        b'"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}'.ljust(98) + b"\1" * 8)


def hf_config_seeds(model_dir):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if model_dir and (model_dir / "config.json").is_file():
        put("hf_config", "smollm2", (model_dir / "config.json").read_bytes())
    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    put("hf_config", "llama_tied", LlamaConfig(**small, tie_word_embeddings=True).to_json_string())
    put("hf_config", "llama3_rope", LlamaConfig(**small, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}).to_json_string())
    put("hf_config", "llama_linear_rope_bias", LlamaConfig(
        **small, attention_bias=True, mlp_bias=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0}).to_json_string())
    put("hf_config", "mistral_window", MistralConfig(**small, sliding_window=32).to_json_string())
    put("hf_config", "qwen2_layer_types", Qwen2Config(
        **small, use_sliding_window=True, sliding_window=16, max_window_layers=1).to_json_string())
    base = json.loads(LlamaConfig(**small).to_json_string())
    for name, q in {
        "bnb_4bit": {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                     "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
        "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128},
        "awq": {"quant_method": "awq", "w_bit": 4},
        "hqq": {"quant_method": "hqq", "quant_config": {"weight_quant_params": {"nbits": 4}}},
        "old_bnb_8bit": {"load_in_8bit": True},
    }.items():
        put("hf_config", "quant_" + name, json.dumps(dict(base, quantization_config=q), indent=2))


def adapter_config_seeds():
    from peft import LoraConfig

    for name, kw in {"default": {}, "qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                     "regex": dict(r=16, lora_alpha=32, lora_dropout=0.05,
                                   target_modules=r".*\.(q|v)_proj", use_rslora=True)}.items():
        d = LoraConfig(task_type="CAUSAL_LM", **kw).to_dict()
        d = {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()}
        d["peft_type"] = "LORA"
        d["task_type"] = "CAUSAL_LM"
        put("adapter_config", name, json.dumps(d, indent=2, sort_keys=True, default=str))


def train_config_seeds():
    demo = (HERE.parent.parent / "configs" / "demo.ini").read_text()
    put("train_config", "demo", demo)
    put("train_config", "demo_overrides",
        demo + "--\ntrain.learning_rate=1e-3\n--output.output_dir=out/x\ndata.val_size=0.1\n")
    put("train_config", "minimal_h5",
        "[model]\nmodel_name_or_path = m.h5\n[data]\ntrain_file = t.h5\n[output]\noutput_dir = o\n")
    put("train_config", "dpo_full",
        "[model]\nmodel_name_or_path = m\n[quantization]\nquantization_bit = none\n"
        "[finetuning]\nfinetuning_type = full\n[data]\ndataset = a.json, b.jsonl\ntemplate = chatml\n"
        "[train]\nstage = dpo\npref_loss = ipo\n[output]\noutput_dir = o\nreport_to = none\n"
        "--\nfinetuning.lora_target=q_proj,v_proj\n")


def tokenizer_seeds(model_dir):
    from tokenizers import Tokenizer, SentencePieceBPETokenizer, ByteLevelBPETokenizer

    text = ["Hello world! The quick brown fox jumps over the lazy dog. 12345 ünïcödé 日本語 😀",
            "def f(x):\n    return x * 2  # tabs\tand  spaces"] * 5
    sample = "\n--\nHello <|im_start|>user\nwörld 123 😀\t x<|im_end|>"
    bl = ByteLevelBPETokenizer()
    bl.train_from_iterator(text, vocab_size=300, min_frequency=1, special_tokens=["<s>", "</s>"])
    put("tokenizer", "byte_level_trained", bl._tokenizer.to_str(pretty=True) + sample)
    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(text, vocab_size=120, min_frequency=1, special_tokens=["<unk>", "<s>", "</s>"])
    put("tokenizer", "sentencepiece_trained", sp._tokenizer.to_str(pretty=True) + sample)
    if model_dir and (model_dir / "tokenizer.json").is_file():
        j = json.loads((model_dir / "tokenizer.json").read_text())
        keep = {t: i for t, i in j["model"]["vocab"].items() if i < 600}
        merges = []
        for m in j["model"]["merges"]:
            a, b = m.split(" ") if isinstance(m, str) else m
            if a in keep and b in keep and a + b in keep:
                merges.append(m)
        j["model"]["vocab"] = keep
        j["model"]["merges"] = merges
        Tokenizer.from_str(json.dumps(j))  # still a tokenizer the reference reads
        trimmed = json.dumps(j, ensure_ascii=False, indent=1)
        put("tokenizer", "smollm2_trimmed", trimmed + sample)
        cfg = (model_dir / "tokenizer_config.json").read_text()
        put("tokenizer", "smollm2_trimmed_with_config", trimmed + "\n--\n" + cfg + sample)


def json_dataset_seeds():
    alpaca = [{"instruction": "Say hi", "input": "", "output": "hi"},
              {"instruction": "Add", "input": "1 + 2", "output": "3", "system": "Be terse.",
               "history": [["q", "a"]]}]
    put("json_dataset", "alpaca_array", "auto chatml 64\n" + json.dumps(alpaca, indent=1))
    put("json_dataset", "alpaca_jsonl_prompt", "alpaca default 32 prompt max=1\n" +
        "\n".join(json.dumps(r) for r in alpaca) + "\n\n")
    share = {"conversations": [{"from": "human", "value": "hey"}, {"from": "gpt", "value": "yo"},
                               {"from": "human", "value": "again"}, {"from": "gpt", "value": "ok"}],
             "system": "sys"}
    put("json_dataset", "sharegpt_history", "sharegpt llama3 128 history val=0.5\n" +
        json.dumps([share, share]))
    openai = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                           {"role": "assistant", "content": "a"}]}
    put("json_dataset", "openai_jsonl", "openai qwen 16 skip\n" + json.dumps(openai) + "\n" +
        json.dumps({"messages": []}) + "\n")
    put("json_dataset", "text_rows", "text empty 8\n" + json.dumps([{"text": "a document " * 5}]))
    pairs = [{"instruction": "Pick", "input": "", "chosen": "good", "rejected": "bad"},
             {"conversations": [{"from": "human", "value": "q"}],
              "chosen": {"from": "gpt", "value": "c"}, "rejected": {"from": "gpt", "value": "r"}}]
    put("json_dataset", "pairs_alpaca", "pairs alpaca chatml 64\n" + json.dumps(pairs[:1]))
    put("json_dataset", "pairs_sharegpt", "pairs sharegpt default 64 skip\n" + json.dumps(pairs[1:]))


def h5_dataset_seeds():
    # The byte layout tests/fuzz/h5_dataset.cpp reads (see its header comment).
    names = ["input_ids", "labels", "position_ids", "chosen_input_ids", "chosen_labels",
             "rejected_input_ids", "rejected_labels", "units/block.0"]
    types = ["i32", "i64", "i16", "u8", "u64", "f32", "f64", "i32be", "i8"]

    def el(v):  # element byte: 0..49 as is, -100 as the first special value
        return 200 if v == -100 else v

    def dataset(name, typ, dims, values):
        b = [names.index(name), types.index(typ), len(dims)] + list(dims)
        return b + [el(v) for v in values]

    def attr_int(v):
        return [1, 128] + list(struct.pack("<q", v))

    def attr_str(text):
        return [4, len(text)] + list(text.encode())

    def seed(mode, cutoff, vocab, datasets, attrs):
        return bytes([mode, cutoff, vocab & 255, vocab >> 8, len(datasets)] +
                     sum(datasets, []) + sum(attrs, []))

    ids = [1, 5, 7, 2, 3, 9, 0, 0]
    labels = [-100, -100, 7, 2, -100, 9, -100, -100]
    tokens = [attr_int(50), attr_int(0), attr_str("qlora_dist.tokens")]
    put("h5_dataset", "tokens", seed(0, 8, 50, [dataset("input_ids", "i32", [2, 4], ids),
                                                dataset("labels", "i32", [2, 4], labels)], tokens))
    put("h5_dataset", "tokens_positions_cut", seed(
        0, 3, 60, [dataset("input_ids", "i64", [2, 4], ids), dataset("labels", "i32", [2, 4], labels),
                   dataset("position_ids", "i32", [2, 4], [0, 1, 0, 1, 0, 1, 2, 3])], tokens))
    pairs = [dataset(n, "i32", [1, 4], labels[:4] if n.endswith("labels") else ids[:4])
             for n in names[3:7]]
    put("h5_dataset", "pairs", seed(1, 16, 50, pairs,
                                    [attr_int(50), attr_int(0), attr_str("qlora_dist.pairs")]))
    put("h5_dataset", "unit_bytes", seed(2, 8, 50, [
        dataset("units/block.0", "u8", [8], [1, 2, 3, 4, 5, 6, 7, 8]),
        dataset("input_ids", "f32", [1, 2], [1, 2])], [attr_str("qlora_dist.units"), [3, 5], [5, 3] + list(b"abc")]))


def unit_layout_seeds(unit_file):
    # The layout_json attribute of a unit file `qlora_dist quantize --format h5` wrote (e.g. the
    # demo's SmolLM2 NF4 file), cut to its first units; without one, a hand-made table.
    if unit_file and pathlib.Path(unit_file).is_file():
        import h5py

        with h5py.File(unit_file, "r") as f:
            units = json.loads(f.attrs["layout_json"])
        put("unit_layout", "smollm2_nf4_first_units", json.dumps(units[:2] + units[-1:],
                                                                 separators=(",", ":")))
    seg = lambda name, kind, dtype, shape, offset, nbytes: dict(
        name=name, kind=kind, dtype=dtype, shape=shape, offset=offset, nbytes=nbytes)
    put("unit_layout", "plain_and_packed", json.dumps([
        {"name": "head", "nbytes": 128, "segments": [seg("norm.weight", "tensor", "F32", [4], 0, 16),
                                                     seg("w", "packed", "U8", [3, 5], 64, 8)]},
        {"name": "lora.0", "nbytes": 0, "segments": []}]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default=str(HERE.parent.parent / ".models" / "smollm2"))
    ap.add_argument("--unit-file", help="a unit file whose layout_json seeds unit_layout")
    args = ap.parse_args()
    model_dir = pathlib.Path(args.model_dir)
    safetensors_seeds()
    hf_config_seeds(model_dir)
    adapter_config_seeds()
    train_config_seeds()
    tokenizer_seeds(model_dir)
    json_dataset_seeds()
    h5_dataset_seeds()
    unit_layout_seeds(args.unit_file)


if __name__ == "__main__":
    main()
