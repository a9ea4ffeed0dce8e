"""Writes tests/lora/data/peft_tiny: a LoRA adapter saved by the real peft (0.21.2), which
test_peft_adapter.cpp reads. LLaMA with hidden 32, FFN 48, 4 heads / 2 KV heads (v_proj out 16),
1 layer; r 4, alpha 8, dropout 0.1, targets q_proj, v_proj, down_proj. Weights are set to
formulas the C++ test recomputes: lora_A[i, j] = (i * in + j) / 1024,
lora_B[i, j] = -(i * r + j) / 512 (exact in fp32).

    .venv/bin/python tests/lora/gen_peft_fixture.py
"""
import os

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "peft_tiny")
config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
torch.manual_seed(0)
model = LlamaForCausalLM(config)
model.name_or_path = "qlora-tests/tiny-llama"
peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                              target_modules=["q_proj", "v_proj", "down_proj"],
                                              task_type="CAUSAL_LM"))
with torch.no_grad():
    for name, p in peft_model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            rows, cols = p.shape
            idx = torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols)
            p.copy_(idx / 1024 if "lora_A" in name else -idx / 512)
peft_model.save_pretrained(out)
os.remove(os.path.join(out, "README.md"))  # peft's model card: not part of what the test reads
os.chmod(os.path.join(out, "adapter_model.safetensors"), 0o644)
print("wrote", out, sorted(os.listdir(out)))
