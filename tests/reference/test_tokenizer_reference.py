"""qlora::data::Tokenizer (through tokenize_probe) against the `tokenizers` package, token for
token: the SmolLM2 tokenizer.json, and tokenizers trained here with `tokenizers` itself (GPT-2
and Llama-3 style byte-level BPE, SentencePiece-style BPE with byte_fallback / unk, Metaspace or
Prepend+Replace, NFKC/NFD/Lowercase, Split behaviours), each with added special tokens. Text: a
5 MB corpus of Debian documentation plus adversarial strings (invalid UTF-8 included: our side
gets the raw bytes, `tokenizers` the string bytes.decode("utf-8", errors="replace") makes).
ids are compared exactly, and so are decode() strings."""
import json
import os
import random
import struct

import pytest

from conftest import binary, run
from tokenizer_corpus import adversarial_texts, corpus_texts

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers,  # noqa: E402
                        pre_tokenizers, processors, trainers)

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TRAIN_BYTES = 1_000_000


def smollm2_dir():
    d = os.environ.get("QLORA_SMOLLM2_DIR") or os.path.join(
        os.path.dirname(__file__), "..", "..", ".models", "smollm2")
    if not os.path.exists(os.path.join(d, "tokenizer.json")):
        pytest.fail(f"SmolLM2 tokenizer.json not found in {d} (set QLORA_SMOLLM2_DIR)")
    return d


@pytest.fixture(scope="module")
def corpus():
    return corpus_texts()


@pytest.fixture(scope="module")
def texts(corpus):
    return corpus + adversarial_texts()


@pytest.fixture(scope="module")
def train_text(corpus):
    out, n = [], 0
    for t in corpus:
        out.append(t.decode("utf-8", errors="replace"))
        n += len(t)
        if n >= TRAIN_BYTES:
            break
    return out + [t.decode("utf-8", errors="replace") for t in adversarial_texts()]


def add_probe_tokens(tok):
    """Added tokens with every flag: special and not, lstrip/rstrip, normalized, single_word."""
    tok.add_special_tokens([
        AddedToken("<|im_start|>", special=True, normalized=False),
        AddedToken("<|sep|>", special=True, lstrip=True, rstrip=True, normalized=False),
        AddedToken("[MASK]", special=True, lstrip=True, normalized=True),
    ])
    tok.add_tokens([
        AddedToken("hello world", single_word=True, normalized=True),
        AddedToken("<br>", rstrip=True, normalized=False),
    ])


# ------------------------------------------------------------------------------------------------
# The tokenizers under test, each a tokenizer.json text.

_TRAINED = {}


def trained_once(key, make):
    """Trains once per session; every caller gets its own copy."""
    if key not in _TRAINED:
        _TRAINED[key] = make().to_str()
    return Tokenizer.from_str(_TRAINED[key])


def gpt2_style(train_text):
    return trained_once("gpt2", lambda: _gpt2_style(train_text))


def _gpt2_style(train_text):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    tok.train_from_iterator(train_text, trainers.BpeTrainer(
        vocab_size=3000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"], show_progress=False))
    add_probe_tokens(tok)
    return tok


def llama3_style(train_text):
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.Digits(individual_digits=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(train_text, trainers.BpeTrainer(
        vocab_size=3000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>"], show_progress=False))
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    add_probe_tokens(tok)
    return tok


def sentencepiece_style(train_text, normalizer, pre_tokenizer, decoder, byte_fallback=True,
                        limit_alphabet=150):
    """Trained with Metaspace splitting, then given the normalizer/pre-tokenizer under test."""
    def train():
        tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.train_from_iterator(train_text, trainers.BpeTrainer(
            vocab_size=3000, limit_alphabet=limit_alphabet, special_tokens=["<unk>", "<s>", "</s>"],
            show_progress=False))
        return tok
    j = json.loads(trained_once("sentencepiece", train).to_str())
    j["model"]["byte_fallback"] = byte_fallback
    vocab = j["model"]["vocab"]
    for b in range(256):  # byte tokens as in Llama 2's vocabulary (not added tokens)
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(j))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B", special_tokens=[("<s>", 1), ("</s>", 2)])
    add_probe_tokens(tok)
    return tok


def llama2_style(train_text):
    return sentencepiece_style(
        train_text,
        normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]),
        None,
        decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                           decoders.Strip(" ", 1, 0)]))


def metaspace_first_nfkc(train_text):
    return sentencepiece_style(
        train_text, normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()]),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="first"),
                           decoders.ByteFallback()]))


def metaspace_always_unk(train_text):
    """No byte_fallback: characters outside the 150-letter alphabet become (fused) <unk>."""
    return sentencepiece_style(
        train_text, normalizers.NFD(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False),
        decoders.Metaspace(replacement="▁", prepend_scheme="always"), byte_fallback=False)


# ------------------------------------------------------------------------------------------------
# Running both sides.

def write_records(path, items):
    with open(path, "wb") as f:
        for b in items:
            f.write(struct.pack("<I", len(b)))
            f.write(b)


def read_id_records(path):
    data, out, pos = open(path, "rb").read(), [], 0
    while pos < len(data):
        (n,) = struct.unpack_from("<I", data, pos)
        out.append(list(struct.unpack_from(f"<{n}i", data, pos + 4)))
        pos += 4 + 4 * n
    return out


def read_text_records(path):
    data, out, pos = open(path, "rb").read(), [], 0
    while pos < len(data):
        (n,) = struct.unpack_from("<I", data, pos)
        out.append(data[pos + 4:pos + 4 + n].decode("utf-8"))
        pos += 4 + n
    return out


def probe_encode(tmp_path, tok_json, texts, add_special):
    write_records(tmp_path / "texts.bin", texts)
    args = [binary("tokenize_probe"), "encode", tok_json, tmp_path / "texts.bin", tmp_path / "ids.bin"]
    run(args + (["--add-special"] if add_special else []))
    return read_id_records(tmp_path / "ids.bin")


def probe_decode(tmp_path, tok_json, id_lists, skip_special):
    with open(tmp_path / "dec_in.bin", "wb") as f:
        for ids in id_lists:
            f.write(struct.pack(f"<I{len(ids)}i", len(ids), *ids))
    args = [binary("tokenize_probe"), "decode", tok_json, tmp_path / "dec_in.bin", tmp_path / "dec_out.bin"]
    run(args + (["--skip-special"] if skip_special else []))
    return read_text_records(tmp_path / "dec_out.bin")


def first_difference(texts, mine, ref, what):
    for i, (m, r) in enumerate(zip(mine, ref)):
        if m != r:
            k = next((k for k in range(min(len(m), len(r))) if m[k] != r[k]), min(len(m), len(r)))
            return (f"{what}: text {i} ({texts[i][:80]!r}) differs first at position {k}: "
                    f"ours {m[max(0, k - 3):k + 5]} vs tokenizers {r[max(0, k - 3):k + 5]}")
    return f"{what}: {len(mine)} results vs {len(ref)}"


def check_tokenizer(tmp_path, tok, texts, name, add_special=(False, True), decode_texts=100):
    tok_json = tmp_path / f"{name}.json"
    tok_json.write_text(tok.to_str())
    strings = [t.decode("utf-8", errors="replace") for t in texts]
    for special in add_special:
        # The post-processor only adds ids around the text: every 10th chunk suffices for it.
        idx = range(len(texts)) if special == add_special[0] else range(0, len(texts), 10)
        ref = [e.ids for e in tok.encode_batch([strings[i] for i in idx], add_special_tokens=special)]
        mine = probe_encode(tmp_path, tok_json, [texts[i] for i in idx], special)
        assert mine == ref, first_difference([texts[i] for i in idx], mine, ref,
                                             f"{name} encode add_special_tokens={special}")
        if special == add_special[0]:
            all_ids = ref
    # decode: the ids of the adversarial texts and of corpus chunks, plus random id sequences.
    rng = random.Random(13)
    n = tok.get_vocab_size(with_added_tokens=True)
    id_lists = all_ids[:decode_texts] + all_ids[-80:]
    id_lists += [[rng.randrange(n + 2) for _ in range(rng.randrange(1, 40))] for _ in range(300)]
    for skip in (False, True):
        want = tok.decode_batch(id_lists, skip_special_tokens=skip)
        got = probe_decode(tmp_path, tok_json, id_lists, skip)
        assert got == want, first_difference(id_lists, got, want, f"{name} decode skip_special_tokens={skip}")


def test_smollm2(tmp_path, texts):
    tok = Tokenizer.from_file(os.path.join(smollm2_dir(), "tokenizer.json"))
    check_tokenizer(tmp_path, tok, texts, "smollm2")


def test_gpt2_style(tmp_path, texts, train_text):
    check_tokenizer(tmp_path, gpt2_style(train_text), texts, "gpt2_style")


def test_gpt2_style_add_prefix_space(tmp_path, texts, train_text):
    tok = gpt2_style(train_text)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    check_tokenizer(tmp_path, tok, texts[::4], "gpt2_prefix_space", add_special=(False,))


def test_llama3_style(tmp_path, texts, train_text):
    check_tokenizer(tmp_path, llama3_style(train_text), texts, "llama3_style")


def test_llama2_style(tmp_path, texts, train_text):
    check_tokenizer(tmp_path, llama2_style(train_text), texts, "llama2_style")


def test_metaspace_first_nfkc_lowercase(tmp_path, texts, train_text):
    check_tokenizer(tmp_path, metaspace_first_nfkc(train_text), texts[::3], "metaspace_first",
                    add_special=(False,))


def test_metaspace_always_unk_nfd(tmp_path, texts, train_text):
    check_tokenizer(tmp_path, metaspace_always_unk(train_text), texts[::3], "metaspace_unk")


@pytest.mark.parametrize("behavior", ["removed", "isolated", "merged_with_previous",
                                      "merged_with_next", "contiguous"])
@pytest.mark.parametrize("invert", [False, True])
def test_split_behaviours(tmp_path, texts, train_text, behavior, invert):
    """Split (regex and string patterns), each behaviour and invert, then Digits and ByteLevel."""
    tok = gpt2_style(train_text)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\s+|[\p{P}]"), behavior=behavior, invert=invert),
        pre_tokenizers.Split(" ", behavior=behavior, invert=False),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    check_tokenizer(tmp_path, tok, texts[::40] + adversarial_texts(), f"split_{behavior}_{invert}",
                    add_special=(False,), decode_texts=0)
